//! `tern-host keygen --out KEY`: a signing key pair (KEY, KEY.pub).

use std::path::PathBuf;

use anyhow::Result;
use tern_host::signing::{keygen, public_path};

/// Arguments of `keygen`.
#[derive(clap::Args)]
pub struct Args {
    /// The secret key file to write (mode 0600); the public key goes to
    /// OUT.pub. Neither may exist.
    #[arg(long)]
    pub out: PathBuf,
    /// A comment stored in OUT.pub and shown by `tern-device` when it
    /// verifies a bundle signed by this key (default: OUT's file name).
    #[arg(long)]
    pub comment: Option<String>,
}

/// Writes the key pair and prints the key id.
pub fn run(a: Args) -> Result<()> {
    let public = keygen(&a.out, a.comment.as_deref())?;
    println!(
        "wrote {} (secret: keep it private) and {} (key id {}): give the .pub file to devices with --trust",
        a.out.display(),
        public_path(&a.out).display(),
        public.key_id()
    );
    Ok(())
}
