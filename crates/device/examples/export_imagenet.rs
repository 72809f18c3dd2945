//! Writes the pretrained 1000-class ImageNet bundle with the format crate
//! alone: the same graph as `tern-host export-pretrained`, without libtorch.
//! Used where only the device crate builds (the aarch64 cross check in CI).
//!
//! ```text
//! cargo run --release -p tern-device --example export_imagenet -- \
//!     --out models/imagenet-efficientnet-lite0.onnx
//! wrote models/imagenet-efficientnet-lite0.onnx (efficientnet-lite0, 1000 labels)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tern_model_format::arch::Backbone;
use tern_model_format::export::pretrained_bundle;
use tern_model_format::weights::SafeTensorsFile;

/// Exports a pretrained backbone with its ImageNet classifier as a bundle.
#[derive(Parser)]
struct Args {
    /// Backbone architecture.
    #[arg(long, default_value = "efficientnet-lite0", value_parser = |s: &str| Backbone::from_name(s).map_err(|e| e.to_string()))]
    backbone: Backbone,
    /// Pretrained weights (safetensors, state-dict names).
    #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
    weights: PathBuf,
    /// ImageNet class names, one per line.
    #[arg(long, default_value = "models/imagenet-labels.txt")]
    labels: PathBuf,
    /// Bundle to write.
    #[arg(long)]
    out: PathBuf,
}

fn export(a: &Args) -> Result<()> {
    let weights =
        SafeTensorsFile::open(&a.weights).with_context(|| format!("cannot read weights {}", a.weights.display()))?;
    let labels: Vec<String> = std::fs::read_to_string(&a.labels)
        .with_context(|| format!("cannot read labels {}", a.labels.display()))?
        .lines()
        .map(str::to_owned)
        .collect();
    let source = a.weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let created_by = concat!("tern-device export_imagenet example ", env!("CARGO_PKG_VERSION"));
    let (graph, manifest) = pretrained_bundle(a.backbone, &weights, labels, &source, created_by)
        .with_context(|| format!("cannot build the {} graph from {}", a.backbone.name(), a.weights.display()))?;
    let m = tern_model_format::bundle::write(&a.out, graph, manifest)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!("wrote {} ({}, {} labels)", a.out.display(), a.backbone.name(), m.labels.len());
    Ok(())
}

fn main() -> ExitCode {
    match export(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
