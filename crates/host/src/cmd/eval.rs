//! `tern-host eval BUNDLE DATA`: the bundle's accuracy through tract, the
//! device's own code path (`tern-device eval`), with the confusion matrix;
//! with `--against REPORT.json`, image by image against the host's
//! predictions from training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tern_host::metrics::Metrics;
use tern_host::train::Prediction;
use tern_model_format::report::EvalLine;
use tern_model_format::Bundle;

/// Arguments of `eval`.
#[derive(clap::Args)]
pub struct Args {
    /// The bundle (.onnx).
    pub bundle: PathBuf,
    /// ImageFolder root; the validation split is the one training used
    /// (seed and fraction are read from the bundle).
    pub data: PathBuf,
    /// A training report (report.json) whose predictions must agree.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Least fraction of identical top-1 predictions with `--against`.
    #[arg(long, default_value_t = 0.995)]
    pub min_agreement: f64,
    /// Writes confusion.png and eval.json here.
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// The tern-device binary (default: $TERN_DEVICE_BIN, then beside
    /// tern-host, then PATH).
    #[arg(long)]
    pub device_bin: Option<PathBuf>,
}

/// The tern-device binary: `given`, else $TERN_DEVICE_BIN, else beside
/// tern-host, else `tern-device` on PATH.
pub fn device_bin(given: Option<PathBuf>) -> PathBuf {
    given.or_else(|| std::env::var_os("TERN_DEVICE_BIN").map(PathBuf::from)).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("tern-device")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("tern-device"))
    })
}

/// The device's predictions for the validation split of `data`.
pub fn device_predictions(bin: &Path, bundle: &Path, data: &Path) -> Result<Vec<Prediction>> {
    let out =
        Command::new(bin).args(["eval", "--json"]).arg(bundle).arg(data).output().with_context(|| {
            format!("cannot run {} (build it: cargo build --release -p tern-device)", bin.display())
        })?;
    if !out.status.success() {
        bail!("{} eval failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut preds = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match serde_json::from_str(line).with_context(|| format!("bad line from tern-device: {line}"))? {
            EvalLine::Image(p) => preds.push(p),
            EvalLine::Summary { .. } => {}
        }
    }
    Ok(preds)
}

/// Runs the evaluation and prints the metrics (and the agreement).
pub fn run(a: Args) -> Result<()> {
    let bundle = Bundle::read(&a.bundle).with_context(|| format!("cannot load bundle {}", a.bundle.display()))?;
    let labels = bundle.manifest.labels.clone();
    let bin = device_bin(a.device_bin.clone());
    let preds = device_predictions(&bin, &a.bundle, &a.data)?;
    let truth: Vec<usize> = preds.iter().map(|p| p.label).collect();
    let predicted: Vec<usize> = preds.iter().map(|p| p.predicted).collect();
    let metrics = Metrics::new(&labels, &truth, &predicted);
    println!("{} through tract ({}):\n{}", a.bundle.display(), bin.display(), metrics.table());
    let mut agreement = None;
    if let Some(report) = &a.against {
        let text = std::fs::read(report).with_context(|| format!("cannot read {}", report.display()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", report.display()))?;
        let host: Vec<Prediction> = serde_json::from_value(v.get("predictions").cloned().unwrap_or_default())
            .with_context(|| format!("{} has no predictions list", report.display()))?;
        let by_path: HashMap<&Path, &Prediction> = host.iter().map(|p| (p.path.as_path(), p)).collect();
        let (mut same, mut compared, mut max_dp) = (0usize, 0usize, 0f32);
        for d in &preds {
            if let Some(h) = by_path.get(d.path.as_path()) {
                compared += 1;
                same += usize::from(h.predicted == d.predicted);
                for (x, y) in h.probabilities.iter().zip(&d.probabilities) {
                    max_dp = max_dp.max((x - y).abs());
                }
            }
        }
        if compared == 0 || compared != host.len() {
            bail!(
                "{} lists {} images, {} of them evaluated here: not the same split",
                report.display(),
                host.len(),
                compared
            );
        }
        let frac = same as f64 / compared as f64;
        let host_acc = host.iter().filter(|p| p.label == p.predicted).count() as f64 / host.len() as f64;
        println!(
            "host (libtorch) accuracy {:.2}%, device (tract) {:.2}%; identical top-1 on {same}/{compared} images ({:.2}%), max |Δp| {max_dp:.2e}",
            host_acc * 100.0,
            metrics.accuracy * 100.0,
            frac * 100.0
        );
        agreement = Some(
            serde_json::json!({"identical": same, "compared": compared, "fraction": frac, "max_abs_probability_difference": max_dp, "host_accuracy": host_acc}),
        );
        if frac < a.min_agreement {
            bail!(
                "only {:.2}% of top-1 predictions agree (at least {:.2}% required)",
                frac * 100.0,
                a.min_agreement * 100.0
            );
        }
    }
    if let Some(dir) = &a.report_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let title =
            format!("{} (tract): {:.2}% on {} images", a.bundle.display(), metrics.accuracy * 100.0, metrics.samples);
        tern_host::plot::confusion_png(&dir.join("confusion.png"), &title, &labels, &metrics.confusion)?;
        let json = serde_json::json!({"metrics": metrics, "agreement": agreement, "predictions": preds});
        tern_model_format::files::write_atomic(&dir.join("eval.json"), &serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}
