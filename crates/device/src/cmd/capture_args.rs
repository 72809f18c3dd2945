//! `run`'s capture and snapshot flags (`--capture DIR ...`,
//! `--snapshot-dir DIR`), flattened into `run::Args`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use tern_device::capture::{Capture, CaptureConfig};
use tern_device::snapshot::{SnapshotConfig, Snapshots};

/// Capture for retraining, and snapshots.
#[derive(clap::Args, Debug, Clone)]
pub struct CaptureArgs {
    /// Save frames for retraining into an ImageFolder:
    /// DIR/<predicted label>/<UTC time>-<frame>.jpg plus a JSON sidecar.
    /// Needs a policy (--capture-below, --capture-on-change, --capture-every).
    #[arg(long, value_name = "DIR")]
    capture: Option<PathBuf>,
    /// Capture frames whose top probability is below P (the model unsure).
    #[arg(long, value_name = "P", requires = "capture")]
    capture_below: Option<f32>,
    /// Capture the frame at which the active label changes.
    #[arg(long, requires = "capture")]
    capture_on_change: bool,
    /// Capture a frame when SECS seconds have passed since the last capture.
    #[arg(long, value_name = "SECS", requires = "capture")]
    capture_every: Option<f64>,
    /// At most N captures in any minute (the others are skipped).
    #[arg(long, value_name = "N", requires = "capture", value_parser = clap::value_parser!(u32).range(1..))]
    capture_max_per_minute: Option<u32>,
    /// Stop capturing once the files under DIR (those there at the start
    /// included) take M MiB.
    #[arg(long, value_name = "M", requires = "capture", value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    capture_quota_mib: Option<u64>,
    /// Captured frames waiting to be written at most (beyond, they are
    /// dropped and counted).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    capture_queue: u64,
    /// Save the frame of each change of the active label into DIR; the
    /// `label` event names the file (`snapshot`).
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Save a clip instead: N frames before the change and N after, as
    /// numbered JPEGs in one folder per change.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "snapshot_dir")]
    snapshot_clip: usize,
}

impl CaptureArgs {
    /// The capture folder (`--capture DIR`), if any.
    pub fn dir(&self) -> Option<&Path> {
        self.capture.as_deref()
    }

    /// The capture sink, if `--capture` was given.
    pub fn capture(&self, bundle: &Path, graph_sha256: &str, log: bool) -> Result<Option<Capture>> {
        let Some(dir) = &self.capture else { return Ok(None) };
        let every = match self.capture_every {
            Some(s) => Some(
                Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| anyhow!("--capture-every {s}: expected a number of seconds > 0"))?,
            ),
            None => None,
        };
        let mut cfg = CaptureConfig::new(dir.clone(), bundle.to_path_buf(), graph_sha256.to_owned());
        cfg.below = self.capture_below;
        cfg.on_change = self.capture_on_change;
        cfg.every = every;
        cfg.max_per_minute = self.capture_max_per_minute;
        cfg.quota_bytes = self.capture_quota_mib.map(|m| m << 20);
        cfg.queue = self.capture_queue as usize;
        cfg.log = log;
        Capture::start(cfg).map(Some)
    }

    /// The snapshot sink, if `--snapshot-dir` was given.
    pub fn snapshots(&self) -> Result<Option<Snapshots>> {
        let Some(dir) = &self.snapshot_dir else { return Ok(None) };
        let queue = 16 + 2 * self.snapshot_clip;
        Snapshots::start(SnapshotConfig { dir: dir.clone(), clip: self.snapshot_clip, queue }).map(Some)
    }
}
