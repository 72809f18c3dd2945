//! `tern-host export-pretrained`.

use std::path::PathBuf;

use anyhow::Result;
use tern_model_format::arch::Backbone;

/// Arguments of `export-pretrained`.
#[derive(clap::Args)]
pub struct Args {
    /// Backbone architecture.
    #[arg(long, default_value = "efficientnet-lite0", value_parser = parse_backbone)]
    pub backbone: Backbone,
    /// Pretrained weights (safetensors, state-dict names).
    #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
    pub weights: PathBuf,
    /// ImageNet class names, one per line.
    #[arg(long, default_value = "models/imagenet-labels.txt")]
    pub labels: PathBuf,
    /// Bundle to write.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub sign: super::sign::SignArg,
}

/// Parses a backbone name for clap.
pub fn parse_backbone(s: &str) -> Result<Backbone, String> {
    Backbone::from_name(s).map_err(|e| e.to_string())
}

/// Exports and prints a one-line summary.
pub fn run(a: Args) -> Result<()> {
    let key = a.sign.read()?;
    let m = tern_host::pretrained::export_imagenet(a.backbone, &a.weights, &a.labels, &a.out)?;
    eprintln!(
        "wrote {} ({}, {} labels, graph sha256 {})",
        a.out.display(),
        m.architecture.backbone,
        m.labels.len(),
        &m.graph_sha256[..12]
    );
    if let Some(k) = &key {
        super::sign::signed(&a.out, k)?;
    }
    Ok(())
}
