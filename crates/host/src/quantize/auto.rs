//! `--auto`: the candidate recipes and the search among them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tern_model_format::onnx;

use tern_model_format::quantize::{Method, Options};
use tern_model_format::Manifest;

use super::{file_size, Comparison, Recipe, Request, Session};

/// One candidate tried by [`auto`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tried {
    /// The recipe's name.
    pub recipe: String,
    /// Float against int8 on the held-out images.
    #[serde(flatten)]
    pub comparison: Comparison,
    /// The accuracy drop in points (float − int8); without labels, the
    /// share of images whose top-1 changed, in points.
    pub drop_points: f64,
    /// Median latency measured by the benchmark, ms.
    pub latency_ms: f64,
    /// File size, bytes.
    pub bytes: u64,
    /// Whether the drop is within the budget and the top-1 agreement at
    /// least the minimum.
    pub within_budget: bool,
}

/// What `--auto` accepts: an accuracy drop of at most `points`, and int8
/// top-1 equal to float top-1 on at least `min_agreement` of the images.
/// Accuracy alone is not enough: on 40 images a recipe that changed 17.5%
/// of the predictions lost no accuracy (its errors cancelled out).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Budget {
    /// Largest accuracy drop, in points (without labels: the share of
    /// changed top-1 predictions, in points).
    pub points: f64,
    /// Smallest top-1 agreement with float, a fraction.
    pub min_agreement: f64,
}

impl Budget {
    /// Whether `t`'s drop and agreement are within the budget.
    pub fn admits(&self, drop_points: f64, top1_agreement: f64) -> bool {
        drop_points <= self.points + 1e-9 && top1_agreement + 1e-9 >= self.min_agreement
    }
}

/// What [`auto`] did.
pub struct AutoOutcome {
    /// The written bundle's manifest.
    pub manifest: Manifest,
    /// The chosen recipe.
    pub chosen: String,
    /// The float bundle's latency, ms.
    pub float_latency_ms: f64,
    /// Every candidate, in the order tried.
    pub tried: Vec<Tried>,
    /// Size of the float and int8 files in bytes.
    pub sizes: (u64, u64),
}

/// The candidates of `--auto`: the int8-weight scheme, static int8 with
/// each calibration method, per-channel weight scales, and static int8
/// with the first and last convolutions (the usual sensitive layers) kept
/// in float.
pub fn auto_recipes(graph: &onnx::GraphProto, percentile: f64) -> Vec<Recipe> {
    use tern_model_format::quantize::Scheme;
    let opts = |scheme, per_channel, float_layers: Vec<String>| Options {
        scheme,
        per_channel,
        float_layers,
        input_means: Default::default(),
    };
    let r = |method, options| Recipe { method, options, bias_correction: true, min_shrink: None };
    let p = Method::Percentile(percentile);
    let mut v = vec![
        Recipe { min_shrink: Some(3.5), ..r(p, opts(Scheme::Weights, false, vec![])) },
        r(p, opts(Scheme::Weights, false, vec![])),
        r(Method::MinMax, opts(Scheme::Static, false, vec![])),
        r(p, opts(Scheme::Static, false, vec![])),
        r(Method::Entropy, opts(Scheme::Static, false, vec![])),
        r(p, opts(Scheme::Static, true, vec![])),
        r(p, opts(Scheme::Qdq, true, vec![])),
    ];
    let convs: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Conv"))
        .filter_map(|n| n.input.get(1))
        .map(|w| tern_model_format::quantize::layer_name(w))
        .collect();
    if let (Some(first), Some(last)) = (convs.first(), convs.last()) {
        let mut fl = vec![first.clone()];
        if last != first {
            fl.push(last.clone());
        }
        v.push(r(p, opts(Scheme::Static, false, fl)));
    }
    v
}

/// Tries `recipes`, measures each with `bench` (a file → median latency in
/// ms, e.g. `tern-device bench`), and writes the fastest that `budget`
/// admits on the held-out images. The manifest records every candidate.
/// Needs held-out images.
pub fn auto(
    r: &Request,
    recipes: &[Recipe],
    budget: Budget,
    bench: &dyn Fn(&Path) -> Result<f64>,
) -> Result<AutoOutcome> {
    if r.eval_files.is_empty() {
        bail!("--auto needs held-out images (--eval-data) to judge accuracy");
    }
    let mut session = Session::new(r)?;
    let float_latency_ms = bench(r.bundle).context("benchmarking the float bundle")?;
    let parent = r.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tern-auto-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot make a scratch folder in {}", parent.display()))?;
    let mut tried = Vec::new();
    let mut made = Vec::new();
    for (i, recipe) in recipes.iter().enumerate() {
        eprintln!("candidate {}/{}: {}", i + 1, recipes.len(), recipe.name());
        let q = session.quantize(recipe)?;
        let file = tmp.path().join(format!("candidate-{i}.onnx"));
        q.write(&file)?;
        let c = q.comparison.clone().context("no comparison")?;
        let drop_points = match (c.float_accuracy, c.int8_accuracy) {
            (Some(f), Some(q)) => (f - q) * 100.0,
            _ => (1.0 - c.top1_agreement) * 100.0,
        };
        let latency_ms = bench(&file).with_context(|| format!("benchmarking {}", recipe.name()))?;
        let t = Tried {
            recipe: recipe.name(),
            within_budget: budget.admits(drop_points, c.top1_agreement),
            comparison: c,
            drop_points,
            latency_ms,
            bytes: file_size(&file),
        };
        eprintln!(
            "  agreement {:.2}%, drop {:.2} points, p50 {:.2} ms, {:.2} MB",
            t.comparison.top1_agreement * 100.0,
            t.drop_points,
            t.latency_ms,
            t.bytes as f64 / 1e6
        );
        tried.push(t);
        made.push(q);
    }
    let best = tried
        .iter()
        .enumerate()
        .filter(|(_, t)| t.within_budget)
        .min_by(|(_, a), (_, b)| a.latency_ms.total_cmp(&b.latency_ms).then(a.drop_points.total_cmp(&b.drop_points)))
        .map(|(i, _)| i);
    let Some(best) = best else {
        let closest = tried.iter().min_by(|a, b| {
            a.drop_points
                .total_cmp(&b.drop_points)
                .then(b.comparison.top1_agreement.total_cmp(&a.comparison.top1_agreement))
        });
        bail!(
            "no candidate is within the budget (drop ≤ {} points, top-1 agreement ≥ {:.2}%){}",
            budget.points,
            budget.min_agreement * 100.0,
            closest
                .map(|c| format!(
                    "; the closest is {} ({:.2} points, agreement {:.2}%)",
                    c.recipe,
                    c.drop_points,
                    c.comparison.top1_agreement * 100.0
                ))
                .unwrap_or_default()
        );
    };
    let mut q = made.swap_remove(best);
    if let Some(rec) = q.manifest.quantization.as_mut() {
        rec["auto"] = serde_json::json!({
            "budget_points": budget.points,
            "min_top1_agreement": budget.min_agreement,
            "float_latency_ms": float_latency_ms,
            "latency": "median of tern-device bench on the machine that ran --auto",
            "candidates": tried,
            "chosen": q.recipe.name(),
        });
    }
    let manifest = q.write(r.out)?;
    Ok(AutoOutcome {
        manifest,
        chosen: q.recipe.name(),
        float_latency_ms,
        tried,
        sizes: (file_size(r.bundle), file_size(r.out)),
    })
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn the_budget_bounds_agreement_as_well_as_accuracy() {
        let b = Budget { points: 0.5, min_agreement: 0.99 };
        // Seen: no accuracy lost, but 1.25% of the predictions changed.
        assert!(!b.admits(-1.25, 0.9875));
        assert!(!b.admits(0.6, 1.0));
        assert!(b.admits(0.5, 0.99));
        assert!(b.admits(-0.25, 0.9975));
    }
}
