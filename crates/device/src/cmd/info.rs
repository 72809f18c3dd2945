//! `tern-device info BUNDLE`: the manifest, checked.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use tern_model_format::Bundle;

/// Arguments of `info`.
#[derive(clap::Args)]
pub struct Args {
    /// The bundle (.onnx).
    bundle: PathBuf,
}

/// Prints the manifest as JSON after validating the bundle.
pub fn run(a: Args) -> Result<ExitCode> {
    let b = Bundle::read(&a.bundle).with_context(|| format!("cannot load bundle {}", a.bundle.display()))?;
    outln!("{}", serde_json::to_string_pretty(&b.manifest)?);
    Ok(ExitCode::SUCCESS)
}
