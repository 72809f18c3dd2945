//! `tern-device info BUNDLE [--trust KEY.pub]`: the manifest, checked, and
//! who signed the bundle.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use tern_model_format::{signature, Bundle};

/// Arguments of `info`.
#[derive(clap::Args)]
pub struct Args {
    /// The bundle (.onnx).
    bundle: PathBuf,
    /// Keys to check the signature against (with none, the signature is
    /// only checked against the key the bundle names).
    #[command(flatten)]
    trust: super::TrustArgs,
}

/// Prints the manifest as JSON on stdout after validating the bundle, and
/// the signature's status on stderr. Fails if the signature does not
/// verify, or if keys are trusted and none of them signed the bundle.
pub fn run(a: Args) -> Result<ExitCode> {
    let trust = a.trust.trust()?;
    let b = Bundle::read(&a.bundle).with_context(|| format!("cannot load bundle {}", a.bundle.display()))?;
    let signer = trust.check(&b).with_context(|| format!("bundle {}", a.bundle.display()))?;
    outln!("{}", serde_json::to_string_pretty(&b.manifest)?);
    match (signer, b.signature()) {
        (Some(key), _) => eprintln!("signature: valid, by trusted key {}", key.describe()),
        (None, None) => eprintln!("signature: none (unsigned)"),
        (None, Some(_)) => match signature::verify_claimed(&b) {
            Ok(key) => eprintln!(
                "signature: valid, by key {} (not checked against trusted keys: give --trust KEY.pub)",
                key.key_id()
            ),
            Err(e) => {
                eprintln!("error: {}: signature: {e}", a.bundle.display());
                return Ok(ExitCode::FAILURE);
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
