//! `POST /api/classify`: one uploaded image, answered with ranked labels.
//!
//! The upload runs on its own [`Classifier`], loaded from the same bundle
//! (through the same trust check) on first use and again after each
//! reload, on one thread of tokio's blocking pool. The loop's classifier
//! is never borrowed: an upload costs the loop some CPU but never a wait,
//! and the loop's code is unchanged. The price is a second copy of the
//! plan in memory, paid only once someone uploads. Uploads are classified
//! one at a time.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::engine::{Classifier, Ranked};

use super::state::Shared;

/// Loads the classifier of `/api/classify` (the run's bundle, with its
/// trust check and load options).
pub type Loader = Box<dyn Fn() -> Result<Classifier> + Send + Sync>;

/// The answer of `/api/classify`.
#[derive(Debug, Clone, Serialize)]
pub struct Classified {
    /// The best label.
    pub label: String,
    /// Its probability.
    pub probability: f32,
    /// The best labels, most probable first.
    pub top: Vec<Ranked>,
    /// Width of the decoded image.
    pub width: u32,
    /// Its height.
    pub height: u32,
    /// Preprocessing + inference time, ms.
    pub latency_ms: f64,
}

/// Why an upload got no answer.
pub(crate) enum Failed {
    /// The upload is not an image this build can decode (400).
    BadImage(String),
    /// No classifier (500).
    Internal(String),
}

pub(crate) struct Worker {
    loader: Loader,
    slot: Mutex<Option<(u64, Classifier)>>,
    shared: Arc<Shared>,
}

impl Worker {
    pub fn new(loader: Loader, shared: Arc<Shared>) -> Worker {
        Worker { loader, slot: Mutex::new(None), shared }
    }

    /// Decodes (with the format crate's limits) and classifies `bytes`.
    /// Blocks: call it off the server's thread.
    pub fn classify(&self, bytes: &[u8], top_k: usize) -> Result<Classified, Failed> {
        let image = tern_model_format::preprocess::decode_image(bytes)
            .map_err(|e| Failed::BadImage(format!("the upload is not a readable image: {e}")))?;
        let generation = self.shared.generation.load(Ordering::Relaxed);
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|(g, _)| *g != generation) {
            *slot = None;
            let c = (self.loader)()
                .context("cannot load the bundle for /api/classify")
                .map_err(|e| Failed::Internal(format!("{e:#}")))?;
            *slot = Some((generation, c));
        }
        let Some((_, classifier)) = slot.as_mut() else {
            return Err(Failed::Internal("no classifier".into()));
        };
        let started = Instant::now();
        let out = classifier.classify(&image).map_err(|e| Failed::Internal(format!("classification failed: {e:#}")))?;
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let top = classifier.top_k(&out, top_k.max(1));
        let best = top.first().cloned().ok_or_else(|| Failed::Internal("the bundle has no labels".into()))?;
        Ok(Classified {
            label: best.label,
            probability: best.probability,
            top,
            width: image.width(),
            height: image.height(),
            latency_ms,
        })
    }
}
