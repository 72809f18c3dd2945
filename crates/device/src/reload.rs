//! Hot reload: a background thread watches the bundle file; when it is
//! replaced (typically by an atomic rename), the new bundle is loaded,
//! verified (checksum, shapes, the signature when keys are trusted, a trial
//! inference, the caller's checks) and handed to the loop, which swaps it
//! in between two frames. A bundle that fails any check, or whose loading
//! panics, is refused and the running one stays; the thread goes on
//! watching.
//!
//! The file is polled (one `stat` per interval) rather than watched with
//! inotify: an atomic rename replaces the inode, which a poll of (inode,
//! size, mtime) sees without watching the directory, and a half-written
//! file simply fails validation and is retried when it changes again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tern_model_format::Manifest;

use crate::engine::{Classifier, LoadOptions};
use crate::trust::Trust;

/// Extra checks a new bundle must pass (e.g. that the GPIO labels exist).
pub type Check = Box<dyn Fn(&Manifest) -> Result<()> + Send>;

/// The outcome of one reload attempt.
pub enum Reloaded {
    /// The new bundle, verified and ready.
    Ready {
        /// The loaded bundle.
        classifier: Box<Classifier>,
        /// What it is, in words.
        detail: String,
    },
    /// The new file was refused; the old bundle keeps running.
    Refused {
        /// Why.
        detail: String,
    },
}

/// Identity of the file's current contents.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp { len: m.len(), modified: m.modified().ok(), inode })
}

/// Watches a bundle file from a background thread.
pub struct Reloader {
    rx: Receiver<Reloaded>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Reloader {
    /// Starts watching `path`, checking every `interval`; new bundles are
    /// loaded with `options` and must pass `trust`. The file as it is now
    /// counts as already loaded.
    pub fn spawn(path: &Path, interval: Duration, options: LoadOptions, trust: Trust, check: Check) -> Result<Reloader> {
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut seen = stamp(path);
        let (p, s) = (path.to_owned(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("tern-reload".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    sleep_unless(&s, interval);
                    let now = stamp(&p);
                    // A missing file is the middle of a replacement, or a
                    // mistake; either way the running bundle stays.
                    if now.is_none() || now == seen {
                        continue;
                    }
                    seen = now;
                    // A panic anywhere in one attempt refuses that bundle;
                    // the thread goes on watching for the next.
                    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_checked(&p, &options, &trust, &check)));
                    let result = match attempt {
                        Ok(Ok((classifier, detail))) => Reloaded::Ready { classifier: Box::new(classifier), detail },
                        Ok(Err(e)) => Reloaded::Refused { detail: format!("{e:#}") },
                        Err(panic) => Reloaded::Refused {
                            detail: format!(
                                "{}: loading it panicked: {}",
                                p.display(),
                                crate::engine::panic_message(panic.as_ref())
                            ),
                        },
                    };
                    if tx.send(result).is_err() {
                        return;
                    }
                }
            })
            .context("cannot start the reload thread")?;
        Ok(Reloader { rx, stop, handle: Some(handle), path: path.to_owned() })
    }

    /// The bundle file watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A finished reload attempt, if any.
    pub fn try_take(&self) -> Option<Reloaded> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Loads `path` with `options` and runs every check: the bundle's own
/// (manifest, checksum, graph shapes), its signature against `trust`, a
/// trial inference on a blank input, then `check`.
pub fn load_checked(path: &Path, options: &LoadOptions, trust: &Trust, check: &Check) -> Result<(Classifier, String)> {
    let (mut c, signer) = trust.load(path, options)?;
    let n: usize = c.manifest().preprocessing.input_shape().iter().product();
    let out = c.run(&vec![0.0; n]).with_context(|| format!("{}: trial inference failed", path.display()))?;
    if out.probabilities.iter().any(|p| !p.is_finite()) {
        anyhow::bail!("{}: trial inference gave non-finite probabilities", path.display());
    }
    check(c.manifest()).with_context(|| format!("{} does not fit this configuration", path.display()))?;
    let m = c.manifest();
    let signed = signer.map(|k| format!(", signed by {}", k.describe())).unwrap_or_default();
    let detail = format!(
        "{} ({}, {} labels, graph {}{signed})",
        path.display(),
        m.architecture.backbone,
        m.labels.len(),
        &m.graph_sha256[..12.min(m.graph_sha256.len())]
    );
    Ok((c, detail))
}

/// Sleeps for `d`, waking early when `stop` is set.
pub(crate) fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}
