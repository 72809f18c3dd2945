//! What the loop tells the world: events, and the sinks that receive them
//! (JSON lines on stdout, MQTT, GPIO pins, tests).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use image::RgbImage;
use serde::Serialize;

use crate::smooth::Decision;

/// `text` for a terminal: every control character (C0 such as ESC, CR and
/// newline; DEL; C1) written as `\u{..}`, so that a label from a bundle or a
/// file name from a folder cannot move the cursor, recolour or retitle the
/// terminal, or forge a log line. Other text is unchanged.
pub fn escape_for_terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One event. Serialised as a JSON object with an `event` field naming the
/// kind (`started`, `label`, `frame`, `stats`, `slow-frame`, `source`,
/// `reload`, `stopped`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The loop started.
    Started {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// The bundle file.
        bundle: String,
        /// The frame source.
        source: String,
        /// The bundle's labels.
        labels: Vec<String>,
    },
    /// The active label changed.
    Label {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// Number of this label event, from 1, so that receivers can spot
        /// gaps and duplicates.
        seq: u64,
        /// Frame that caused the change.
        frame: u64,
        /// The region of interest whose label changed (absent: the whole
        /// frame).
        #[serde(skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// The new active label; `null` when no label is confident enough.
        label: Option<String>,
        /// Its smoothed confidence (of the best label when `label` is null).
        confidence: f32,
        /// The label active before.
        previous: Option<String>,
        /// The snapshot of the change (`--snapshot-dir`): a JPEG file, or
        /// with `--snapshot-clip` a folder of numbered JPEGs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<String>,
    },
    /// One processed frame (only with `--every-frame`).
    Frame {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// Frame number given by the source.
        frame: u64,
        /// Name of the frame (file name), if it has one.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The region of interest classified (absent: the whole frame).
        #[serde(skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// Top-1 label of this frame alone.
        top: String,
        /// Its probability.
        probability: f32,
        /// The active label after smoothing and thresholds.
        active: Option<String>,
        /// Smoothed confidence of the active (or best) label.
        confidence: f32,
        /// Preprocessing + inference time, ms.
        latency_ms: f64,
        /// Time from capture to decision, ms.
        age_ms: f64,
    },
    /// Throughput and latency since the previous report.
    Stats {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// Frames processed in the period.
        frames: u64,
        /// Frames captured in the period.
        captured: u64,
        /// Frames skipped in the period because a newer one was ready.
        dropped: u64,
        /// Processed frames per second.
        fps: f64,
        /// Mean preprocessing + inference time, ms.
        latency_ms_mean: f64,
        /// Longest preprocessing + inference time, ms.
        latency_ms_max: f64,
        /// Mean time from capture to decision, ms.
        age_ms_mean: f64,
        /// Frames in the period whose inference was slower than the
        /// watchdog's bound (`slow-frame` events).
        slow: u64,
    },
    /// One inference took longer than the watchdog's bound (`--slow-ms`).
    SlowFrame {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// The frame.
        frame: u64,
        /// Its preprocessing + inference time, ms.
        latency_ms: f64,
        /// The bound, ms.
        limit_ms: f64,
    },
    /// Something happened to the frame source.
    Source {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// `bad-frame`, `lost`, `reopened`, `gave-up` or `ended`.
        state: String,
        /// What happened, in words.
        detail: String,
    },
    /// A replaced bundle was loaded, or refused.
    Reload {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// The bundle file.
        bundle: String,
        /// Whether the new bundle now runs.
        ok: bool,
        /// What was loaded, or why it was refused.
        detail: String,
    },
    /// The loop stopped.
    Stopped {
        /// Wall-clock time, ms since the epoch.
        ts_ms: u64,
        /// Frames processed.
        frames: u64,
        /// Frames skipped because a newer one was ready.
        dropped: u64,
        /// Why it stopped.
        reason: String,
    },
}

impl Event {
    /// The event as one JSON line (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"event\":\"error\",\"detail\":\"{e}\"}}"))
    }
}

/// One classified frame, as the loop hands it to [`Sink::frame`]: the
/// pixels (shared, so a sink keeps the newest frame without copying it), the
/// bundle's labels, this frame's probabilities, the smoothed ones and the
/// decision that followed.
#[derive(Debug, Clone, Copy)]
pub struct FrameView<'a> {
    /// Frame number given by the source.
    pub index: u64,
    /// Name of the frame (file name), if it has one.
    pub name: Option<&'a str>,
    /// The frame as captured (the whole frame, also when `region` is set).
    pub image: &'a Arc<RgbImage>,
    /// The region of interest this classification is for (`None`: the
    /// whole frame).
    pub region: Option<&'a str>,
    /// The bundle's labels.
    pub labels: &'a [String],
    /// This frame's probability per label.
    pub probabilities: &'a [f32],
    /// Smoothed probability per label.
    pub smoothed: &'a [f32],
    /// The decision after smoothing and thresholds.
    pub decision: &'a Decision,
    /// Preprocessing + inference time.
    pub latency: Duration,
    /// Wall-clock time of the decision, ms since the epoch.
    pub ts_ms: u64,
}

/// A receiver of events and per-frame decisions.
pub trait Sink {
    /// Handles one event. An error is logged by the loop, which goes on.
    fn event(&mut self, event: &Event) -> Result<()>;

    /// Sees every frame's decision, with the bundle's labels. Used by
    /// actuators that follow the active label; the default ignores it.
    /// Whole-frame decisions only: with regions of interest each region's
    /// decision comes through [`Sink::frame`] (`region: Some(..)`).
    fn decision(&mut self, _decision: &Decision, _labels: &[String]) -> Result<()> {
        Ok(())
    }

    /// Sees every classified frame with its pixels and probabilities, after
    /// [`Sink::decision`] and before the frame's events. Used by the web
    /// view, capture and snapshots; the default ignores it. It runs on the
    /// inference thread: anything slow (encoding, disk) belongs elsewhere.
    fn frame(&mut self, _view: &FrameView<'_>) -> Result<()> {
        Ok(())
    }

    /// Called when the active label changes, after [`Sink::frame`] for that
    /// frame: a sink that saves snapshots returns the file (or folder) it
    /// saves, which the `label` event then names. It runs on the inference
    /// thread: decide the name here, write elsewhere. The default saves
    /// nothing.
    fn snapshot(&mut self, _view: &FrameView<'_>) -> Option<String> {
        None
    }

    /// Called once when the loop stops.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Writes events as JSON lines.
pub struct JsonLines<W: Write> {
    out: W,
    frames: bool,
}

impl<W: Write> JsonLines<W> {
    /// Writes every event to `out`; `frame` events only if `frames`.
    pub fn new(out: W, frames: bool) -> Self {
        JsonLines { out, frames }
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn event(&mut self, event: &Event) -> Result<()> {
        if matches!(event, Event::Frame { .. }) && !self.frames {
            return Ok(());
        }
        writeln!(self.out, "{}", event.to_json())?;
        self.out.flush()?;
        Ok(())
    }
}

/// Keeps every event in memory (for tests and tools).
#[derive(Debug, Default)]
pub struct Collect {
    /// The events so far.
    pub events: Vec<Event>,
}

impl Sink for Collect {
    fn event(&mut self, event: &Event) -> Result<()> {
        self.events.push(event.clone());
        Ok(())
    }
}

impl Collect {
    /// The labels of the `label` events, in order.
    pub fn labels(&self) -> Vec<Option<String>> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Label { label, .. } => Some(label.clone()),
                _ => None,
            })
            .collect()
    }

    /// The active label after each `frame` event.
    pub fn active_per_frame(&self) -> Vec<Option<String>> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Frame { active, .. } => Some(active.clone()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_terminals() {
        assert!(matches!(escape_for_terminal("chat ünï 猫"), Cow::Borrowed("chat ünï 猫")));
        assert_eq!(escape_for_terminal("\u{1b}]0;pwned\u{7}cat\r\n"), "\\u{1b}]0;pwned\\u{7}cat\\u{d}\\u{a}");
        assert_eq!(escape_for_terminal("a\u{9b}31mb\u{7f}"), "a\\u{9b}31mb\\u{7f}");
    }
}
