//! `tern-device eval BUNDLE DATA`: accuracy on a labelled ImageFolder with
//! the device's code path.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use tern_device::evaluate::{check_labels, evaluate};
use tern_device::events::escape_for_terminal as esc;
use tern_model_format::dataset;
use tern_model_format::report::{EvalLine, EvalSummary};

/// Which part of the data set to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// The validation split (as the host made it).
    Val,
    /// The training split.
    Train,
    /// Every image.
    All,
}

/// Arguments of `eval`.
#[derive(clap::Args)]
pub struct Args {
    /// The bundle (.onnx).
    bundle: PathBuf,
    /// ImageFolder root (the layout `tern-host train` reads).
    data: PathBuf,
    /// Which images.
    #[arg(long, value_enum, default_value_t = Split::Val)]
    split: Split,
    /// Validation fraction (default: the one the bundle was trained with, else 0.2).
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Split seed (default: the bundle's training seed, else 0).
    #[arg(long)]
    seed: Option<u64>,
    /// At most N images per class and split (default: as in training).
    #[arg(long)]
    max_per_class: Option<usize>,
    /// One JSON object per image, then one summary object, on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: super::EngineArgs,
}

/// Evaluates and prints accuracy (or JSON lines).
pub fn run(a: Args) -> Result<ExitCode> {
    let mut clf = a.engine.load(&a.bundle)?;
    let trained =
        clf.manifest().provenance.training.as_ref().and_then(|t| t.get("options")).cloned().unwrap_or_default();
    let val_fraction = a.val_fraction.or_else(|| trained.get("val_fraction").and_then(|v| v.as_f64())).unwrap_or(0.2);
    let seed = a.seed.or_else(|| trained.get("seed").and_then(|v| v.as_u64())).unwrap_or(0);
    let max = a.max_per_class.or_else(|| trained.get("max_per_class").and_then(|v| v.as_u64()).map(|v| v as usize));
    let ds = dataset::scan(&a.data, val_fraction, seed)
        .with_context(|| format!("cannot use {} as an ImageFolder", a.data.display()))?
        .limit_per_class(max);
    check_labels(&clf, &ds.classes)
        .with_context(|| format!("{} does not fit {}", a.data.display(), a.bundle.display()))?;
    let samples = match a.split {
        Split::Val => ds.val.clone(),
        Split::Train => ds.train.clone(),
        Split::All => ds.train.iter().chain(&ds.val).cloned().collect(),
    };
    let json = a.json;
    let (results, skipped) = evaluate(&mut clf, &samples, |r| {
        if json {
            if let Ok(line) = serde_json::to_string(r) {
                outln!("{line}");
            }
        }
    })?;
    for (path, why) in &skipped {
        eprintln!("skipped {}: {}", esc(&path.display().to_string()), esc(why));
    }
    let correct = results.iter().filter(|r| r.label == r.predicted).count();
    let accuracy = correct as f64 / results.len().max(1) as f64;
    if json {
        let summary = EvalSummary { images: results.len(), correct, accuracy, skipped: skipped.len() };
        outln!("{}", serde_json::to_string(&EvalLine::Summary { summary })?);
    } else {
        outln!("accuracy {:.2}% ({correct}/{} images, {} skipped)", accuracy * 100.0, results.len(), skipped.len());
    }
    Ok(ExitCode::SUCCESS)
}
