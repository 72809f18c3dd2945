//! Snapshots: `tern-device run --snapshot-dir DIR` saves the frame at
//! which the active label changes, and the `label` event names the file
//! (`snapshot`). With `--snapshot-clip N` it saves a short clip instead: a
//! folder of numbered JPEGs (`0001.jpg`, …) holding up to N frames before
//! the change, the frame of the change and N frames after; the event then
//! names the folder.
//!
//! Names are decided on the inference thread ([`Sink::snapshot`]); the
//! frames are encoded and written by a worker thread through a bounded
//! queue (full: the frame is dropped and counted, and a snapshot whose own
//! frame is dropped is not named). Names:
//! `DIR/<UTC time>-<frame>-<label folder>.jpg` (or the same without `.jpg`
//! as a folder), the label being the new active one (`none` when no label
//! is active).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use image::RgbImage;

use crate::capture::writer::{Counters, Job, Writer};
use crate::capture::{compact_time, label_folder, utc_time};
use crate::events::{Event, FrameView, Sink};

/// Longest clip on either side of the change, frames.
pub const MAX_CLIP: usize = 1000;

/// Where and how snapshots are saved.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// The folder.
    pub dir: PathBuf,
    /// Frames saved before and after the change (0: the one frame).
    pub clip: usize,
    /// Frames waiting for the writer at most.
    pub queue: usize,
}

/// A clip still taking the frames after its change.
struct OpenClip {
    dir: PathBuf,
    next: usize,
    remaining: usize,
}

/// The snapshot sink.
pub struct Snapshots {
    cfg: SnapshotConfig,
    before: VecDeque<Arc<RgbImage>>,
    open: Vec<OpenClip>,
    named: u64,
    writer: Writer,
}

/// What [`Snapshots`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Snapshots named in `label` events.
    pub named: u64,
    /// Frames written.
    pub written: u64,
    /// Frames dropped because the queue was full.
    pub dropped: u64,
    /// Frames that could not be written.
    pub failed: u64,
}

impl Snapshots {
    /// Creates the folder and starts the writer thread.
    pub fn start(cfg: SnapshotConfig) -> Result<Snapshots> {
        if cfg.clip > MAX_CLIP {
            anyhow::bail!("--snapshot-clip {}: at most {MAX_CLIP} frames", cfg.clip);
        }
        std::fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("--snapshot-dir {}: cannot create the folder", cfg.dir.display()))?;
        // A clip's frames before the change, and one more so that a second
        // change during the after-part is not starved.
        let queue = cfg.queue.max(2 * cfg.clip + 2);
        let writer = Writer::spawn("tern-snapshot-writer", queue, Arc::new(Counters::default()), None, false)?;
        Ok(Snapshots { before: VecDeque::with_capacity(cfg.clip + 1), open: Vec::new(), named: 0, writer, cfg })
    }

    /// What it did so far.
    pub fn stats(&self) -> SnapshotStats {
        let c = &self.writer.counters;
        SnapshotStats {
            named: self.named,
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }
}

impl Sink for Snapshots {
    fn event(&mut self, _event: &Event) -> Result<()> {
        Ok(())
    }

    fn frame(&mut self, view: &FrameView<'_>) -> Result<()> {
        if view.region.is_some() {
            return Ok(());
        }
        for clip in &mut self.open {
            let path = clip.dir.join(format!("{:04}.jpg", clip.next));
            self.writer.offer(Job::Image { path, image: view.image.clone() });
            clip.next += 1;
            clip.remaining -= 1;
        }
        self.open.retain(|c| c.remaining > 0);
        if self.cfg.clip > 0 {
            if self.before.len() > self.cfg.clip {
                self.before.pop_front();
            }
            self.before.push_back(view.image.clone());
        }
        Ok(())
    }

    fn snapshot(&mut self, view: &FrameView<'_>) -> Option<String> {
        if view.region.is_some() {
            return None;
        }
        let label = view.decision.active.and_then(|i| view.labels.get(i)).map_or("none".to_string(), |l| label_folder(l));
        let stem = format!("{}-{:06}-{label}", compact_time(&utc_time(view.ts_ms)), view.index);
        if self.cfg.clip == 0 {
            let path = self.cfg.dir.join(format!("{stem}.jpg"));
            if !self.writer.offer(Job::Image { path: path.clone(), image: view.image.clone() }) {
                return None;
            }
            self.named += 1;
            return Some(path.display().to_string());
        }
        // `before` ends with this frame (`frame` ran first).
        let dir = self.cfg.dir.join(&stem);
        let mut next = 1;
        let mut ok = true;
        for image in &self.before {
            let path = dir.join(format!("{next:04}.jpg"));
            ok = self.writer.offer(Job::Image { path, image: image.clone() });
            next += 1;
        }
        if !ok {
            return None;
        }
        self.open.push(OpenClip { dir: dir.clone(), next, remaining: self.cfg.clip });
        self.named += 1;
        Some(dir.display().to_string())
    }

    fn finish(&mut self) -> Result<()> {
        self.writer.finish();
        let s = self.stats();
        if s.dropped > 0 || s.failed > 0 {
            eprintln!(
                "tern-device: snapshots: {} frames written, {} dropped (queue full), {} failed",
                s.written, s.dropped, s.failed
            );
        }
        Ok(())
    }
}
