//! Float vs int8 on held-out images.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::data::progress;

use super::OnnxNet;

/// Top-1 index per row of `logits` (`[N, 1]` sigmoid outputs: 1 when the
/// logit is positive).
pub fn top1(logits: &Tensor) -> Result<Vec<usize>> {
    let idx = if logits.size().get(1) == Some(&1) {
        logits.gt(0.0).to_kind(Kind::Int64).flatten(0, -1)
    } else {
        logits.argmax(1, false)
    };
    Ok(Vec::<i64>::try_from(idx)?.into_iter().map(|i| i as usize).collect())
}

/// Float vs int8 on held-out images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Images compared.
    pub images: usize,
    /// Fraction whose int8 top-1 equals the float top-1.
    pub top1_agreement: f64,
    /// Float top-1 accuracy, when the images' folders name bundle labels.
    pub float_accuracy: Option<f64>,
    /// int8 top-1 accuracy, likewise.
    pub int8_accuracy: Option<f64>,
    /// Largest |Δ logit| seen.
    pub max_abs_logit_diff: f64,
}

/// The label index of `file` when its parent folder is named like one of
/// `labels`.
pub fn folder_label(file: &Path, labels: &[String]) -> Option<usize> {
    let dir = file.parent()?.file_name()?.to_string_lossy();
    labels.iter().position(|l| *l == dir)
}

/// Runs both graphs on `batches` (of `files`) and compares.
pub fn compare(
    float: &OnnxNet,
    int8: &OnnxNet,
    batches: &[Tensor],
    files: &[PathBuf],
    labels: &[String],
) -> Result<Comparison> {
    let (mut agree, mut n, mut max_diff) = (0usize, 0usize, 0f64);
    let (mut fc, mut qc, mut labelled) = (0usize, 0usize, 0usize);
    let bar = progress(batches.len() as u64, "evaluating float vs int8");
    for x in batches {
        let (lf, lq) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            Ok((float.run(x, &[], |_, _| {})?, int8.run(x, &[], |_, _| {})?))
        })?;
        max_diff = max_diff.max((&lf - &lq).abs().max().double_value(&[]));
        for (pf, pq) in top1(&lf)?.into_iter().zip(top1(&lq)?) {
            agree += usize::from(pf == pq);
            if let Some(truth) = files.get(n).and_then(|f| folder_label(f, labels)) {
                labelled += 1;
                fc += usize::from(pf == truth);
                qc += usize::from(pq == truth);
            }
            n += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let frac = |k: usize, of: usize| k as f64 / of.max(1) as f64;
    Ok(Comparison {
        images: n,
        top1_agreement: frac(agree, n),
        float_accuracy: (labelled > 0).then(|| frac(fc, labelled)),
        int8_accuracy: (labelled > 0).then(|| frac(qc, labelled)),
        max_abs_logit_diff: max_diff,
    })
}
