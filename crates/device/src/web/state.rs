//! What the web view knows about the loop: the newest frame and its
//! probabilities, counters, recent events. Written by [`WebSink`] on the
//! inference thread, read by the server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use anyhow::Result;
use axum::body::Bytes;
use image::RgbImage;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::events::{Event, FrameView, Sink};
use crate::mqtt::{MqttMonitor, MqttStats};

use super::metrics::Metrics;

/// Events kept for a page that connects late.
pub(crate) const RECENT_EVENTS: usize = 50;
/// Events waiting per `/api/events` client; a client further behind skips
/// the oldest.
const EVENT_QUEUE: usize = 256;
/// Frame times kept for the frames-per-second figure.
const FPS_WINDOW: usize = 32;

/// The newest classified frame and what the loop said about it.
#[derive(Default)]
pub(crate) struct Live {
    /// Frames seen by the sink (the stream's frame counter).
    pub seq: u64,
    pub image: Option<Arc<RgbImage>>,
    pub index: u64,
    pub name: Option<String>,
    pub labels: Vec<String>,
    pub probabilities: Vec<f32>,
    pub smoothed: Vec<f32>,
    pub active: Option<String>,
    pub confidence: f32,
    pub latency_ms: f64,
    pub ts_ms: u64,
    pub captured: u64,
    pub dropped: u64,
    pub slow: u64,
    pub reloads: u64,
    pub reloads_refused: u64,
    pub bundle: String,
    pub source: String,
    pub recent: VecDeque<Arc<str>>,
    /// The newest snapshot named in a `label` event, with its frame.
    pub snapshot: Option<LatestSnapshot>,
    times: VecDeque<Instant>,
}

/// The frame of the newest snapshot (`--snapshot-dir`), kept in memory so
/// that the page shows it without reading the folder (the file is written
/// by another thread, maybe not yet).
#[derive(Clone)]
pub(crate) struct LatestSnapshot {
    pub info: SnapshotInfo,
    pub image: Arc<RgbImage>,
    /// Its JPEG, encoded by the first request and served to the rest.
    pub jpeg: Arc<OnceLock<Bytes>>,
}

impl Live {
    fn fps(&self) -> f64 {
        match (self.times.front(), self.times.back()) {
            (Some(a), Some(b)) if self.times.len() > 1 && b > a => {
                (self.times.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// One encoded frame of the MJPEG stream: the whole multipart part
/// (boundary, headers, JPEG, CRLF), shared by every viewer.
#[derive(Clone)]
pub(crate) struct Part {
    pub seq: u64,
    pub bytes: Bytes,
}

/// State shared by the sink (inference thread) and the server.
pub(crate) struct Shared {
    live: Mutex<Live>,
    /// The sink's frame counter, for the encoder to wait on.
    pub frames: watch::Sender<u64>,
    /// Viewers of the stream, for the encoder to wait on.
    pub viewers: watch::Sender<usize>,
    /// The newest encoded part.
    pub parts: watch::Sender<Option<Part>>,
    /// Events as JSON, for `/api/events`.
    pub events: broadcast::Sender<Arc<str>>,
    /// Counted up on each successful reload, so that the classifier of
    /// `/api/classify` knows to load the new bundle.
    pub generation: AtomicU64,
    /// Requests being served (streams included).
    pub clients: AtomicUsize,
    pub metrics: Metrics,
    /// The MQTT sink's counters, when the run publishes to MQTT.
    pub mqtt: Option<MqttMonitor>,
    pub started: Instant,
}

impl Shared {
    pub fn new(mqtt: Option<MqttMonitor>) -> Shared {
        Shared {
            live: Mutex::new(Live::default()),
            frames: watch::Sender::new(0),
            viewers: watch::Sender::new(0),
            parts: watch::Sender::new(None),
            events: broadcast::Sender::new(EVENT_QUEUE),
            generation: AtomicU64::new(0),
            clients: AtomicUsize::new(0),
            metrics: Metrics::new(mqtt.is_some()),
            mqtt,
            started: Instant::now(),
        }
    }

    /// The live state. A panic elsewhere while it was held leaves plain
    /// data, still good to read.
    pub fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `/api/status`.
    pub fn status(&self, top_k: usize) -> Status {
        let live = self.live();
        let mut top: Vec<(usize, f32)> = live.probabilities.iter().copied().enumerate().collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(top_k);
        let top = top
            .into_iter()
            .map(|(i, p)| Score { label: live.labels.get(i).cloned().unwrap_or_default(), probability: p })
            .collect();
        Status {
            bundle: live.bundle.clone(),
            source: live.source.clone(),
            frame: live.index,
            name: live.name.clone(),
            width: live.image.as_ref().map_or(0, |i| i.width()),
            height: live.image.as_ref().map_or(0, |i| i.height()),
            label: live.active.clone(),
            confidence: live.confidence,
            top,
            fps: live.fps(),
            latency_ms: live.latency_ms,
            frames: live.seq,
            captured: live.captured,
            dropped: live.dropped,
            slow: live.slow,
            reloads: live.reloads,
            reloads_refused: live.reloads_refused,
            viewers: *self.viewers.borrow(),
            clients: self.clients.load(Ordering::Relaxed),
            ts_ms: live.ts_ms,
            uptime_s: self.started.elapsed().as_secs_f64(),
            snapshot: live.snapshot.as_ref().map(|s| s.info.clone()),
            mqtt: self.mqtt.as_ref().map(|m| MqttStatus::from(m.stats())),
        }
    }
}

/// One label and its probability.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// The label.
    pub label: String,
    /// Its probability in the newest frame.
    pub probability: f32,
}

/// The answer of `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The bundle file.
    pub bundle: String,
    /// The frame source.
    pub source: String,
    /// Index of the newest classified frame.
    pub frame: u64,
    /// Its name (file name), if it has one.
    pub name: Option<String>,
    /// Its width in pixels (0 before the first frame).
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
    /// The active label after smoothing and thresholds (`null`: none).
    pub label: Option<String>,
    /// Smoothed confidence of the active (or best) label.
    pub confidence: f32,
    /// The newest frame's best labels, most probable first.
    pub top: Vec<Score>,
    /// Classified frames per second over the last frames.
    pub fps: f64,
    /// Preprocessing + inference time of the newest frame, ms.
    pub latency_ms: f64,
    /// Frames classified since the start.
    pub frames: u64,
    /// Frames captured, as of the last `stats` report.
    pub captured: u64,
    /// Frames dropped because a newer one was ready, as of the last `stats` report.
    pub dropped: u64,
    /// Inferences slower than `--slow-ms`.
    pub slow: u64,
    /// Bundles reloaded.
    pub reloads: u64,
    /// Replacement bundles refused.
    pub reloads_refused: u64,
    /// Clients watching the MJPEG stream.
    pub viewers: usize,
    /// Requests being served, streams included.
    pub clients: usize,
    /// Wall-clock time of the newest decision, ms since the epoch.
    pub ts_ms: u64,
    /// Seconds since the server started.
    pub uptime_s: f64,
    /// The newest snapshot (`--snapshot-dir`); its frame is `/snapshot.jpg`.
    pub snapshot: Option<SnapshotInfo>,
    /// The MQTT sink's figures (`--mqtt`).
    pub mqtt: Option<MqttStatus>,
}

/// The newest snapshot, as `/api/status` gives it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The file (or, for a clip, the folder) the `label` event named.
    pub name: String,
    /// The label that became active (`null`: none).
    pub label: Option<String>,
    /// The region whose label changed (`null`: the whole frame).
    pub region: Option<String>,
    /// Index of the frame.
    pub frame: u64,
    /// When, ms since the epoch.
    pub ts_ms: u64,
}

/// The MQTT sink's figures in `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct MqttStatus {
    /// Whether the broker is connected now.
    pub connected: bool,
    /// Events waiting to be sent.
    pub queued: usize,
    /// Events delivered.
    pub delivered: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events given up.
    pub failed: u64,
}

impl From<MqttStats> for MqttStatus {
    fn from(s: MqttStats) -> Self {
        MqttStatus { connected: s.connected, queued: s.queued, delivered: s.delivered, dropped: s.dropped, failed: s.failed }
    }
}

/// The loop's side of the web view: a [`Sink`] that keeps the newest frame
/// (the `Arc`, never a copy of the pixels), its probabilities, counters and
/// recent events for the server. Nothing here encodes or waits on a client.
pub struct WebSink {
    shared: Arc<Shared>,
}

impl WebSink {
    pub(crate) fn new(shared: Arc<Shared>) -> WebSink {
        WebSink { shared }
    }
}

impl Sink for WebSink {
    fn event(&mut self, event: &Event) -> Result<()> {
        if matches!(event, Event::Frame { .. }) {
            return Ok(());
        }
        let m = &self.shared.metrics;
        let json: Arc<str> = event.to_json().into();
        {
            let mut live = self.shared.live();
            match event {
                Event::Started { bundle, source, labels, .. } => {
                    live.bundle.clone_from(bundle);
                    live.source.clone_from(source);
                    live.labels.clone_from(labels);
                }
                Event::Stats { captured, dropped, .. } => {
                    live.captured += captured;
                    live.dropped += dropped;
                    m.captured.inc_by(*captured);
                    m.dropped.inc_by(*dropped);
                }
                Event::SlowFrame { .. } => {
                    live.slow += 1;
                    m.slow.inc();
                }
                Event::Reload { ok: true, .. } => {
                    live.reloads += 1;
                    m.reloads.inc();
                    self.shared.generation.fetch_add(1, Ordering::Relaxed);
                }
                Event::Reload { ok: false, .. } => {
                    live.reloads_refused += 1;
                    m.reloads_refused.inc();
                }
                // The frame of the change was handed to `frame` just before
                // (regions' frames are not kept: the whole frame shows).
                Event::Label { snapshot: Some(name), label, region, frame, ts_ms, .. } => {
                    if let Some(image) = live.image.clone() {
                        let info = SnapshotInfo {
                            name: name.clone(),
                            label: label.clone(),
                            region: region.clone(),
                            frame: *frame,
                            ts_ms: *ts_ms,
                        };
                        live.snapshot = Some(LatestSnapshot { info, image, jpeg: Arc::default() });
                    }
                }
                _ => {}
            }
            if live.recent.len() == RECENT_EVENTS {
                live.recent.pop_front();
            }
            live.recent.push_back(json.clone());
        }
        // No receiver (no page open) is not an error.
        let _ = self.shared.events.send(json);
        Ok(())
    }

    fn frame(&mut self, v: &FrameView<'_>) -> Result<()> {
        if v.region.is_some() {
            return Ok(());
        }
        let latency_ms = v.latency.as_secs_f64() * 1e3;
        let seq = {
            let mut live = self.shared.live();
            live.seq += 1;
            live.image = Some(Arc::clone(v.image));
            live.index = v.index;
            match (&mut live.name, v.name) {
                (Some(n), Some(new)) => {
                    n.clear();
                    n.push_str(new);
                }
                (n, new) => *n = new.map(str::to_owned),
            }
            if live.labels.as_slice() != v.labels {
                live.labels = v.labels.to_vec();
            }
            live.probabilities.clear();
            live.probabilities.extend_from_slice(v.probabilities);
            live.smoothed.clear();
            live.smoothed.extend_from_slice(v.smoothed);
            let d = v.decision;
            live.active = d.active.and_then(|i| v.labels.get(i).cloned());
            live.confidence = d.confidence;
            live.latency_ms = latency_ms;
            live.ts_ms = v.ts_ms;
            if live.times.len() == FPS_WINDOW {
                live.times.pop_front();
            }
            live.times.push_back(Instant::now());
            live.seq
        };
        self.shared.metrics.frames.inc();
        self.shared.metrics.latency.observe(v.latency.as_secs_f64());
        self.shared.frames.send_replace(seq);
        Ok(())
    }
}

