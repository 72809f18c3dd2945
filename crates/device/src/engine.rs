//! The inference engine: a bundle loaded once into a tract plan.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tern_model_format::manifest::{Manifest, OutputKind};
use tern_model_format::Bundle;
use tract_onnx::prelude::*;

/// The raw outputs of one inference.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Scores before the final activation, one per output unit.
    pub logits: Vec<f32>,
    /// Probabilities, one per output unit.
    pub probabilities: Vec<f32>,
}

/// One ranked class.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ranked {
    /// Label index.
    pub index: usize,
    /// Label text.
    pub label: String,
    /// Probability of this label.
    pub probability: f32,
}

/// A bundle ready to run: the manifest and an optimised tract plan.
pub struct Classifier {
    manifest: Manifest,
    plan: TypedSimpleState,
}

impl Classifier {
    /// Loads, verifies (manifest, checksum, shapes) and optimises the bundle
    /// at `path`.
    pub fn load(path: &Path) -> Result<Classifier> {
        let bundle = Bundle::read(path).with_context(|| format!("cannot load bundle {}", path.display()))?;
        Classifier::from_bundle(bundle).with_context(|| format!("cannot prepare bundle {}", path.display()))
    }

    /// Prepares an already validated bundle.
    pub fn from_bundle(bundle: Bundle) -> Result<Classifier> {
        let m = bundle.manifest;
        let shape = m.preprocessing.input_shape();
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut bundle.onnx.as_slice())
            .context("tract cannot read the ONNX graph")?;
        model.select_outputs_by_name([m.io.logits.as_str(), m.io.probabilities.as_str()])?;
        let plan = model
            .with_input_fact(0, f32::fact(shape).into())?
            .into_optimized()
            .context("tract cannot optimise the graph")?
            .into_runnable()?;
        let plan = plan.spawn()?;
        Ok(Classifier { manifest: m, plan })
    }

    /// The bundle's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Runs one preprocessed input (`[1, 3, H, W]` values, as made by
    /// [`tern_model_format::preprocess::preprocess`]).
    pub fn run(&mut self, input: &[f32]) -> Result<Output> {
        let shape = self.manifest.preprocessing.input_shape();
        if input.len() != shape.iter().product::<usize>() {
            bail!("input has {} values, the model takes {shape:?}", input.len());
        }
        let tensor = Tensor::from_shape(&shape, input)?;
        let out = self.plan.run(tvec!(tensor.into()))?;
        let vec = |i: usize| -> Result<Vec<f32>> {
            let t = out.get(i).context("missing output")?;
            Ok(t.to_plain_array_view::<f32>()?.iter().copied().collect())
        };
        let (logits, probabilities) = (vec(0)?, vec(1)?);
        let width = self.manifest.io.output_width;
        if logits.len() != width || probabilities.len() != width {
            bail!("the graph returned {} values, the manifest says {width}", logits.len());
        }
        Ok(Output { logits, probabilities })
    }

    /// Runs and times one input.
    pub fn run_timed(&mut self, input: &[f32]) -> Result<(Output, Duration)> {
        let t = Instant::now();
        let out = self.run(input)?;
        Ok((out, t.elapsed()))
    }

    /// The `k` most probable labels, best first.
    pub fn top_k(&self, out: &Output, k: usize) -> Vec<Ranked> {
        rank(&self.manifest, out, k)
    }
}

/// One probability per label, in label order. A binary sigmoid bundle (two
/// labels, one output `p`) gives `[1 − p, p]`.
pub fn label_probabilities(m: &Manifest, out: &Output) -> Vec<f32> {
    if m.io.output_kind == OutputKind::Sigmoid && m.io.output_width == 1 && m.labels.len() == 2 {
        let p = out.probabilities.first().copied().unwrap_or(0.0);
        vec![1.0 - p, p]
    } else {
        out.probabilities.clone()
    }
}

/// Ranks the labels of `out`. A binary sigmoid bundle (two labels, one
/// output `p`) ranks the second label at `p` and the first at `1 − p`.
pub fn rank(m: &Manifest, out: &Output, k: usize) -> Vec<Ranked> {
    let probs = label_probabilities(m, out);
    let mut idx: Vec<usize> = (0..probs.len().min(m.labels.len())).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    idx.into_iter()
        .take(k)
        .map(|i| Ranked { index: i, label: m.labels[i].clone(), probability: probs[i] })
        .collect()
}
