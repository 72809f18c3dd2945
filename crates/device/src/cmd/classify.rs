//! `tern-device classify BUNDLE IMAGE...`: top-k labels per image.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use tern_device::events::escape_for_terminal as esc;
use tern_device::{npy, Classifier};
use tern_model_format::report::ClassifyLine;
use tern_model_format::preprocess::open_image;

/// Arguments of `classify`.
#[derive(clap::Args)]
pub struct Args {
    /// The bundle (.onnx).
    bundle: PathBuf,
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many labels to show per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// One JSON object per image on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Include the raw logits in the JSON output.
    #[arg(long, requires = "json")]
    logits: bool,
    /// Write each preprocessed input tensor as DIR/<image stem>.npy.
    #[arg(long, value_name = "DIR")]
    dump_input: Option<PathBuf>,
    #[command(flatten)]
    engine: super::EngineArgs,
}

/// Classifies every image; an image that cannot be read is reported and the
/// others still run (the exit code is then non-zero).
pub fn run(a: Args) -> Result<ExitCode> {
    let mut clf = a.engine.load(&a.bundle)?;
    if let Some(dir) = &a.dump_input {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut failed = 0;
    for path in &a.images {
        if let Err(e) = one(&mut clf, &a, path) {
            eprintln!("error: {}: {}", esc(&path.display().to_string()), esc(&format!("{e:#}")));
            failed += 1;
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn one(clf: &mut Classifier, a: &Args, path: &Path) -> Result<()> {
    let img = open_image(path)?;
    let input = clf.preprocess(&img);
    if let Some(dir) = &a.dump_input {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "input".into());
        npy::write_f32(&dir.join(format!("{stem}.npy")), &clf.manifest().preprocessing.input_shape(), &input)?;
    }
    let (out, took) = clf.run_timed(&input)?;
    let top = clf.top_k(&out, a.top_k);
    let latency_ms = took.as_secs_f64() * 1e3;
    if a.json {
        let line = ClassifyLine { image: path.to_path_buf(), top, logits: a.logits.then(|| out.logits.clone()), latency_ms };
        outln!("{}", serde_json::to_string(&line)?);
    } else {
        outln!("{} ({latency_ms:.1} ms)", esc(&path.display().to_string()));
        for r in top {
            outln!("  {:>6.2}%  {:>4}  {}", r.probability * 100.0, r.index, esc(&r.label));
        }
    }
    Ok(())
}
