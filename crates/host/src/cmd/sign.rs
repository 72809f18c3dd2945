//! `tern-host sign BUNDLE... --key KEY`, and the `--sign KEY` flag of the
//! commands that write bundles.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tern_host::signing::{read_secret, sign};
use tern_model_format::signature::SecretKey;

/// Arguments of `sign`.
#[derive(clap::Args)]
pub struct Args {
    /// Bundles to sign in place (an earlier signature is replaced).
    #[arg(required = true)]
    pub bundles: Vec<PathBuf>,
    /// The secret key file (from `tern-host keygen`).
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
}

/// Signs every bundle.
pub fn run(a: Args) -> Result<()> {
    let key = read_secret(&a.key)?;
    for b in &a.bundles {
        signed(b, &key)?;
    }
    Ok(())
}

/// `--sign KEY`: sign the bundles this command writes.
#[derive(clap::Args)]
pub struct SignArg {
    /// Sign the bundles written (with `train --quantize`, both) with this
    /// secret key file (from `tern-host keygen`), for devices that run only
    /// signed bundles (`tern-device --trust KEY.pub`).
    #[arg(long = "sign", value_name = "KEY")]
    pub key: Option<PathBuf>,
}

impl SignArg {
    /// The key, read now so that a bad key fails before the work starts.
    pub fn read(&self) -> Result<Option<SecretKey>> {
        self.key.as_deref().map(read_secret).transpose()
    }
}

/// Signs `bundle` with `key` and says so on stderr.
pub fn signed(bundle: &Path, key: &SecretKey) -> Result<()> {
    let public = sign(bundle, key)?;
    eprintln!("signed {} with key {}", bundle.display(), public.key_id());
    Ok(())
}
