//! `/metrics` in the Prometheus text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use std::sync::Mutex;

use crate::mqtt::MqttStats;

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
    /// The MQTT sink's figures, registered when the run publishes to MQTT
    /// and brought up to date at each scrape ([`Metrics::encode`]).
    mqtt: Option<MqttMetrics>,
}

struct MqttMetrics {
    /// Held while the counters catch up, so two scrapes never both add the
    /// same rise.
    update: Mutex<()>,
    queued: Gauge,
    connected: Gauge,
    delivered: Counter,
    dropped: Counter,
    failed: Counter,
}

impl Metrics {
    pub fn new(mqtt: bool) -> Metrics {
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
        let mqtt = mqtt.then(|| {
            let m = MqttMetrics {
                update: Mutex::new(()),
                queued: Gauge::default(),
                connected: Gauge::default(),
                delivered: Counter::default(),
                dropped: Counter::default(),
                failed: Counter::default(),
            };
            registry.register("mqtt_queued_events", "Events waiting in the MQTT queue", m.queued.clone());
            registry.register("mqtt_connected", "1 while the MQTT broker is connected", m.connected.clone());
            registry.register("mqtt_delivered_events", "Events the MQTT broker acknowledged", m.delivered.clone());
            registry.register("mqtt_dropped_events", "Events dropped because the MQTT queue was full", m.dropped.clone());
            registry.register("mqtt_failed_events", "Events given up by the MQTT sink", m.failed.clone());
            m
        });
        Metrics {
            mqtt,
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

    /// The text exposition; `mqtt`: the MQTT sink's counters now.
    pub fn encode(&self, mqtt: Option<MqttStats>) -> String {
        if let (Some(m), Some(s)) = (&self.mqtt, mqtt) {
            let _one = m.update.lock().unwrap_or_else(|p| p.into_inner());
            m.queued.set(i64::try_from(s.queued).unwrap_or(i64::MAX));
            m.connected.set(i64::from(s.connected));
            // The sink's counters only grow: the counters take the rise.
            for (c, now) in [(&m.delivered, s.delivered), (&m.dropped, s.dropped), (&m.failed, s.failed)] {
                c.inc_by(now.saturating_sub(c.get()));
            }
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            out = format!("# cannot encode the metrics: {e}\n");
        }
        out
    }
}
