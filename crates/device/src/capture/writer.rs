//! The worker thread that encodes and writes captured frames and snapshots,
//! off the inference thread, through a bounded queue: when the queue is
//! full the frame is dropped and counted, so a slow disk never slows the
//! loop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use image::RgbImage;

use super::Sidecar;
use crate::events::escape_for_terminal;

/// JPEG quality of captures and snapshots.
pub const JPEG_QUALITY: u8 = 90;

/// One piece of work for the writer.
pub(crate) enum Job {
    /// A JPEG file, nothing else (snapshots).
    Image { path: PathBuf, image: Arc<RgbImage> },
    /// A capture: the sidecar (its `graph_sha256` filled in by the worker)
    /// then the JPEG.
    Capture { path: PathBuf, image: Arc<RgbImage>, sidecar: Box<Sidecar> },
    /// The bundle was reloaded: read its manifest again for the graph
    /// sha256 of the captures that follow.
    Reloaded,
}

/// What the writer did, shared with the sink that feeds it.
#[derive(Debug, Default)]
pub struct Counters {
    /// Files (frames) written.
    pub written: AtomicU64,
    /// Frames dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Frames that could not be encoded or written.
    pub failed: AtomicU64,
    /// Frames not written because the quota is used up.
    pub over_quota: AtomicU64,
    /// Bytes in the folder (those found at the start plus those written).
    pub bytes: AtomicU64,
    /// Set once the quota is used up.
    pub full: AtomicBool,
}

/// Settings of the worker that only captures use.
pub(crate) struct CaptureSide {
    /// Largest number of bytes in the folder (`None`: no quota).
    pub quota: Option<u64>,
    /// The bundle, read again on [`Job::Reloaded`].
    pub bundle: PathBuf,
    /// The graph sha256 of the running bundle.
    pub graph_sha256: Arc<Mutex<String>>,
    /// The folder, for messages.
    pub dir: PathBuf,
}

/// The sending end; dropping it (or [`Writer::finish`]) lets the worker
/// write what is queued and stop.
pub(crate) struct Writer {
    tx: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
    pub counters: Arc<Counters>,
}

impl Writer {
    /// Starts the worker thread `name` with a queue of `capacity` jobs.
    pub fn spawn(name: &str, capacity: usize, counters: Arc<Counters>, side: Option<CaptureSide>, log: bool) -> Result<Writer> {
        let (tx, rx) = sync_channel(capacity.max(1));
        let c = counters.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(&rx, &c, side.as_ref(), log))
            .with_context(|| format!("cannot start the {name} thread"))?;
        Ok(Writer { tx: Some(tx), handle: Some(handle), counters })
    }

    /// Queues `job`; `false` (and counted as dropped) when the queue is full
    /// or the worker is gone.
    pub fn offer(&self, job: Job) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues `job`, waiting for room (for rare control jobs).
    pub fn send(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }

    /// Lets the worker write what is queued, and waits for it.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                eprintln!("tern-device: warning: the capture writer panicked");
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.finish();
    }
}

fn work(rx: &Receiver<Job>, c: &Counters, side: Option<&CaptureSide>, log: bool) {
    while let Ok(job) = rx.recv() {
        let r = match job {
            Job::Image { path, image } => write_jpeg(&path, &image).map(|n| (n, path)),
            Job::Capture { path, image, mut sidecar } => {
                let Some(side) = side else { continue };
                if c.full.load(Ordering::Relaxed) {
                    c.over_quota.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                sidecar.graph_sha256 = side.graph_sha256.lock().map(|g| g.clone()).unwrap_or_default();
                write_capture(&path, &image, &sidecar).map(|n| (n, path))
            }
            Job::Reloaded => {
                if let Some(side) = side {
                    match tern_model_format::Bundle::read(&side.bundle) {
                        Ok(b) => {
                            if let Ok(mut g) = side.graph_sha256.lock() {
                                *g = b.manifest.graph_sha256.clone();
                            }
                        }
                        Err(e) => eprintln!(
                            "tern-device: warning: capture: cannot read the reloaded bundle's manifest: {}",
                            escape_for_terminal(&format!("{e:#}"))
                        ),
                    }
                }
                continue;
            }
        };
        match r {
            Ok((n, _)) => {
                c.written.fetch_add(1, Ordering::Relaxed);
                let total = c.bytes.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(side) = side {
                    if side.quota.is_some_and(|q| total >= q) && !c.full.swap(true, Ordering::Relaxed) && log {
                        eprintln!("tern-device: {}", escape_for_terminal(&quota_message(&side.dir, total, side.quota)));
                    }
                }
            }
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("tern-device: warning: {}", escape_for_terminal(&format!("{e:#}")));
            }
        }
    }
}

/// The one line said when capturing stops for the quota.
pub(crate) fn quota_message(dir: &Path, bytes: u64, quota: Option<u64>) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    format!(
        "capture: {} holds {:.1} MiB, at or over --capture-quota-mib {:.0}: capturing stopped \
         (review or delete captures, then restart)",
        dir.display(),
        mib(bytes),
        mib(quota.unwrap_or(0))
    )
}

/// The frame as JPEG bytes.
pub(crate) fn encode_jpeg(image: &RgbImage) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, JPEG_QUALITY)
        .encode_image(image)
        .context("cannot encode the frame as JPEG")?;
    Ok(buf)
}

/// Writes a new JPEG (temp + rename, never over an existing file); its size.
fn write_jpeg(path: &Path, image: &RgbImage) -> Result<u64> {
    let bytes = encode_jpeg(image)?;
    new_file(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// The sidecar first, then the JPEG, so a listed image always has its
/// sidecar; their sizes together.
fn write_capture(path: &Path, image: &RgbImage, sidecar: &Sidecar) -> Result<u64> {
    let bytes = encode_jpeg(image)?;
    let json = serde_json::to_vec_pretty(sidecar).context("cannot serialise the sidecar")?;
    let side = path.with_extension("json");
    new_file(&side, &json)?;
    new_file(path, &bytes)?;
    Ok((bytes.len() + json.len()) as u64)
}

fn new_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    tern_model_format::files::write_new(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Bytes of the regular files under `dir` (recursively; symbolic links not
/// followed); 0 for a folder that does not exist yet.
pub fn folder_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d == dir => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", d.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", d.display()))?;
            let meta = entry.metadata().with_context(|| format!("cannot stat {}", entry.path().display()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(total)
}
