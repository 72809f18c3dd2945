//! `/metrics` in the Prometheus text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The counters the sink and the server update (atomics: cheap on the
/// inference thread).
pub(crate) struct Metrics {
    registry: Registry,
    pub frames: Counter,
    pub captured: Counter,
    pub dropped: Counter,
    pub slow: Counter,
    pub reloads: Counter,
    pub reloads_refused: Counter,
    pub latency: Histogram,
    pub viewers: Gauge,
    pub clients: Gauge,
    pub rejected: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tern");
        let frames = Counter::default();
        let captured = Counter::default();
        let dropped = Counter::default();
        let slow = Counter::default();
        let reloads = Counter::default();
        let reloads_refused = Counter::default();
        // 0.5 ms to about 4 s.
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let viewers = Gauge::default();
        let clients = Gauge::default();
        let rejected = Counter::default();
        registry.register("frames", "Frames classified", frames.clone());
        registry.register("captured_frames", "Frames captured (as of the last stats report)", captured.clone());
        registry.register(
            "dropped_frames",
            "Frames skipped because a newer one was ready (as of the last stats report)",
            dropped.clone(),
        );
        registry.register("slow_frames", "Inferences slower than --slow-ms", slow.clone());
        registry.register("reloads", "Replaced bundles loaded", reloads.clone());
        registry.register("reloads_refused", "Replaced bundles refused", reloads_refused.clone());
        registry.register("inference_latency_seconds", "Preprocessing + inference time", latency.clone());
        registry.register("http_viewers", "Clients watching the MJPEG stream", viewers.clone());
        registry.register("http_clients", "HTTP requests being served, streams included", clients.clone());
        registry.register("http_rejected", "HTTP requests refused with 503 (too many clients)", rejected.clone());
        Metrics {
            registry,
            frames,
            captured,
            dropped,
            slow,
            reloads,
            reloads_refused,
            latency,
            viewers,
            clients,
            rejected,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            out = format!("# cannot encode the metrics: {e}\n");
        }
        out
    }
}
