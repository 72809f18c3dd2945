//! Capture for retraining: `tern-device run --capture DIR` saves frames by
//! policy (the model unsure, the active label changed, one every N
//! seconds) as an ImageFolder that `tern-host train --extra DIR` reads:
//!
//! ```text
//! DIR/<predicted label>/<UTC time>-<frame>.jpg
//! DIR/<predicted label>/<UTC time>-<frame>.json   the sidecar (Sidecar)
//! ```
//!
//! The [`Capture`] sink decides on the inference thread (cheap: a few
//! comparisons and an `Arc` clone of the frame); a worker thread encodes and
//! writes through a bounded queue (full: the frame is dropped and counted).
//! Files are written atomically (temporary file + rename), the sidecar
//! before its image. A rate limit (`max_per_minute`) and a disk quota
//! (bytes under DIR, those already there at the start included) bound what
//! is written; when the quota is reached capturing stops, said once on
//! stderr. [`review`] lists, confirms, relabels and deletes captures.
//!
//! Label names become folder names through [`label_folder`]: `/`, `\`,
//! `%`, control characters and a leading `.` are percent-encoded, so the
//! name stays one path component and [`folder_label`] gives the label back;
//! the sidecar keeps the real label in any case.

pub mod review;
pub(crate) mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::events::{escape_for_terminal, Event, FrameView, Sink};
use crate::smooth::argmax;
pub use writer::{folder_bytes, Counters};
use writer::{CaptureSide, Job, Writer};

/// Longest folder name made from a label, bytes.
const MAX_FOLDER_BYTES: usize = 200;

/// The JSON file beside each captured image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// The label the image is filed under: the prediction at capture, the
    /// reviewer's choice after a move.
    pub label: String,
    /// The top-1 label the model predicted for this frame.
    pub predicted: String,
    /// Its probability.
    pub probability: f32,
    /// This frame's probability per label.
    pub probabilities: BTreeMap<String, f32>,
    /// The bundle file that ran.
    pub bundle: String,
    /// The sha256 of the bundle's graph (its manifest's `graph_sha256`,
    /// what `tern-device info` shows): which model saw the frame.
    pub graph_sha256: String,
    /// The frame source, in words.
    pub source: String,
    /// The frame's own name (file name of a folder source), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Frame number given by the source.
    pub frame: u64,
    /// Wall-clock time of the decision, ms since the epoch.
    pub ts_ms: u64,
    /// The same time in UTC, ISO 8601.
    pub time: String,
    /// The policy that saved it.
    pub policy: Policy,
    /// Whether a person has confirmed or moved it.
    pub reviewed: bool,
}

/// Why a frame was captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The active label changed (`--capture-on-change`).
    Change,
    /// The top probability was below the bound (`--capture-below`).
    Below,
    /// The period passed (`--capture-every`).
    Every,
}

/// What to capture and where.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The ImageFolder root.
    pub dir: PathBuf,
    /// Capture frames whose top probability is below this.
    pub below: Option<f32>,
    /// Capture the frame at which the active label changes.
    pub on_change: bool,
    /// Capture a frame when this long has passed since the last capture.
    pub every: Option<Duration>,
    /// At most this many captures in any 60 seconds.
    pub max_per_minute: Option<u32>,
    /// Stop capturing once the files under `dir` take this many bytes.
    pub quota_bytes: Option<u64>,
    /// Frames waiting for the writer at most.
    pub queue: usize,
    /// The bundle file (named in sidecars; read again after a reload).
    pub bundle: PathBuf,
    /// Its graph sha256 at the start.
    pub graph_sha256: String,
    /// Say on stderr when the quota stops capturing.
    pub log: bool,
}

impl CaptureConfig {
    /// A configuration with no policy, no limits and a queue of 8 frames.
    pub fn new(dir: PathBuf, bundle: PathBuf, graph_sha256: String) -> CaptureConfig {
        CaptureConfig {
            dir,
            below: None,
            on_change: false,
            every: None,
            max_per_minute: None,
            quota_bytes: None,
            queue: 8,
            bundle,
            graph_sha256,
            log: true,
        }
    }
}

/// What a [`Capture`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CaptureStats {
    /// Frames chosen by a policy and queued.
    pub queued: u64,
    /// Frames written.
    pub written: u64,
    /// Frames dropped because the writer's queue was full.
    pub dropped: u64,
    /// Frames skipped by the rate limit.
    pub rate_limited: u64,
    /// Frames not captured because the quota is used up.
    pub over_quota: u64,
    /// Frames that could not be written.
    pub failed: u64,
    /// Bytes under the folder.
    pub bytes: u64,
    /// Whether the quota stopped capturing.
    pub full: bool,
}

/// The capture sink.
pub struct Capture {
    cfg: CaptureConfig,
    source: String,
    last: Option<Instant>,
    recent: VecDeque<Instant>,
    queued: u64,
    rate_limited: u64,
    writer: Writer,
}

impl Capture {
    /// Checks the settings, counts the bytes already under `cfg.dir` (for
    /// the quota) and starts the writer thread.
    pub fn start(cfg: CaptureConfig) -> Result<Capture> {
        if cfg.below.is_none() && !cfg.on_change && cfg.every.is_none() {
            bail!(
                "--capture {}: no policy; give --capture-below P, --capture-on-change or --capture-every SECS",
                cfg.dir.display()
            );
        }
        if let Some(p) = cfg.below {
            if !(p > 0.0 && p <= 1.01) {
                bail!("--capture-below {p}: expected a probability in (0, 1] (1.01 captures every frame)");
            }
        }
        if cfg.max_per_minute == Some(0) {
            bail!("--capture-max-per-minute 0 would capture nothing");
        }
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| anyhow::anyhow!("--capture {}: cannot create the folder: {e}", cfg.dir.display()))?;
        let counters = Arc::new(Counters::default());
        let bytes = folder_bytes(&cfg.dir)?;
        counters.bytes.store(bytes, Ordering::Relaxed);
        if cfg.quota_bytes.is_some_and(|q| bytes >= q) {
            counters.full.store(true, Ordering::Relaxed);
            if cfg.log {
                let m = writer::quota_message(&cfg.dir, bytes, cfg.quota_bytes);
                eprintln!("tern-device: {}", escape_for_terminal(&m));
            }
        }
        let side = CaptureSide {
            quota: cfg.quota_bytes,
            bundle: cfg.bundle.clone(),
            graph_sha256: Arc::new(Mutex::new(cfg.graph_sha256.clone())),
            dir: cfg.dir.clone(),
        };
        let writer = Writer::spawn("tern-capture-writer", cfg.queue, counters, Some(side), cfg.log)?;
        Ok(Capture {
            cfg,
            source: String::new(),
            last: None,
            recent: VecDeque::new(),
            queued: 0,
            rate_limited: 0,
            writer,
        })
    }

    /// What it did so far.
    pub fn stats(&self) -> CaptureStats {
        let c = &self.writer.counters;
        CaptureStats {
            queued: self.queued,
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            rate_limited: self.rate_limited,
            over_quota: c.over_quota.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            full: c.full.load(Ordering::Relaxed),
        }
    }

    /// The policy that takes this frame, if any.
    fn policy(&self, view: &FrameView<'_>, top: f32, now: Instant) -> Option<Policy> {
        if self.cfg.on_change && view.decision.changed {
            return Some(Policy::Change);
        }
        if self.cfg.below.is_some_and(|b| top < b) {
            return Some(Policy::Below);
        }
        match (self.cfg.every, self.last) {
            (Some(_), None) => Some(Policy::Every),
            (Some(every), Some(last)) if now.duration_since(last) >= every => Some(Policy::Every),
            _ => None,
        }
    }
}

impl Sink for Capture {
    fn event(&mut self, event: &Event) -> Result<()> {
        match event {
            Event::Started { source, .. } => self.source = source.clone(),
            Event::Reload { ok: true, .. } => self.writer.send(Job::Reloaded),
            _ => {}
        }
        Ok(())
    }

    fn frame(&mut self, view: &FrameView<'_>) -> Result<()> {
        // Regions are crops of the frame; their labels do not name the
        // whole frame.
        if view.region.is_some() {
            return Ok(());
        }
        let Some(top) = argmax(view.probabilities) else { return Ok(()) };
        let Some(label) = view.labels.get(top) else { return Ok(()) };
        let now = Instant::now();
        let p = view.probabilities[top];
        let Some(policy) = self.policy(view, p, now) else { return Ok(()) };
        let counters = &self.writer.counters;
        if counters.full.load(Ordering::Relaxed) {
            counters.over_quota.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Some(max) = self.cfg.max_per_minute {
            while self.recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
                self.recent.pop_front();
            }
            if self.recent.len() >= max as usize {
                self.rate_limited += 1;
                return Ok(());
            }
        }
        let time = utc_time(view.ts_ms);
        let stem = format!("{}-{:06}", compact_time(&time), view.index);
        let path = self.cfg.dir.join(label_folder(label)).join(format!("{stem}.jpg"));
        let sidecar = Sidecar {
            label: label.clone(),
            predicted: label.clone(),
            probability: p,
            probabilities: view.labels.iter().cloned().zip(view.probabilities.iter().copied()).collect(),
            bundle: self.cfg.bundle.display().to_string(),
            graph_sha256: String::new(),
            source: self.source.clone(),
            name: view.name.map(str::to_owned),
            frame: view.index,
            ts_ms: view.ts_ms,
            time,
            policy,
            reviewed: false,
        };
        if self.writer.offer(Job::Capture { path, image: view.image.clone(), sidecar: Box::new(sidecar) }) {
            self.queued += 1;
            self.last = Some(now);
            if self.cfg.max_per_minute.is_some() {
                self.recent.push_back(now);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.writer.finish();
        let s = self.stats();
        if self.cfg.log && (s.dropped > 0 || s.failed > 0 || s.rate_limited > 0 || s.over_quota > 0) {
            eprintln!(
                "tern-device: capture: {} written, {} dropped (queue full), {} rate-limited, {} over quota, {} failed",
                s.written, s.dropped, s.rate_limited, s.over_quota, s.failed
            );
        }
        Ok(())
    }
}

/// The folder name of `label`: one path component, never hidden, with `/`,
/// `\`, `%`, control characters and a leading `.` percent-encoded (UTF-8
/// bytes, `%2F`), so [`folder_label`] gives the label back. An empty label
/// becomes `_`, and a name longer than 200 bytes is cut and given a hash of
/// the whole label; both are lossy, and the sidecar keeps the real label.
pub fn label_folder(label: &str) -> String {
    if label.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(label.len());
    for (i, c) in label.chars().enumerate() {
        if c == '/' || c == '\\' || c == '%' || c.is_control() || (i == 0 && c == '.') {
            for b in c.encode_utf8(&mut [0; 4]).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    if out.len() > MAX_FOLDER_BYTES {
        let mut cut = MAX_FOLDER_BYTES - 17;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        let hash = tern_model_format::files::sha256_hex(label.as_bytes());
        out.push('~');
        out.push_str(&hash[..16]);
    }
    out
}

/// The label a folder name stands for: [`label_folder`] undone (`%XX`
/// decoded; invalid UTF-8 replaced).
pub fn folder_label(folder: &str) -> String {
    let b = folder.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `ts_ms` (ms since the epoch) as UTC ISO 8601 with milliseconds:
/// `2026-12-03T19:48:20.123Z`.
pub fn utc_time(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", s / 3600, s / 60 % 60, s % 60, ts_ms % 1000)
}

/// [`utc_time`] without separators, for file names: `20261203T194820.123Z`.
pub fn compact_time(iso: &str) -> String {
    iso.chars().filter(|c| *c != '-' && *c != ':').collect()
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00.000Z");
        // date -u -d @1780000000
        assert_eq!(utc_time(1_780_000_000_123), "2026-05-28T20:26:40.123Z");
        // A leap day, and the end of a century leap year.
        assert_eq!(utc_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_time(978_307_199_999), "2000-12-31T23:59:59.999Z");
        assert_eq!(compact_time("2026-05-28T20:26:40.123Z"), "20260528T202640.123Z");
    }

    #[test]
    fn label_folders_are_one_safe_component_and_reversible() {
        for label in ["cat", "dög ü 猫", "a/b", "..", ".hidden", "50%", "x\\y", "new\nline", "\u{1b}[31m", "a..b"] {
            let f = label_folder(label);
            assert!(!f.contains('/') && !f.contains('\\') && !f.starts_with('.'), "{label:?} -> {f:?}");
            assert!(!f.chars().any(char::is_control), "{label:?} -> {f:?}");
            assert_ne!(f, "..");
            assert_eq!(folder_label(&f), label, "{f:?}");
        }
        assert_eq!(label_folder("a/b"), "a%2Fb");
        assert_eq!(label_folder(".."), "%2E.");
        assert_eq!(label_folder(""), "_");
        let long = "é".repeat(300);
        let f = label_folder(&long);
        assert!(f.len() <= MAX_FOLDER_BYTES, "{}", f.len());
        assert_ne!(f, label_folder(&"é".repeat(301)), "long labels must stay apart");
        assert_eq!(folder_label("100%"), "100%", "a stray % is kept");
        assert_eq!(folder_label("%zz%4"), "%zz%4");
    }
}
