//! Signing keys and signed bundles on the workstation: `keygen`, `sign`
//! and the `--sign KEY` of the commands that write bundles. The format and
//! the checks are [`tern_model_format::signature`]'s; this module adds the
//! file handling and the messages.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tern_model_format::signature::{sign_file, PublicKey, SecretKey};

/// The public key file of secret key file `secret`: `KEY.pub`.
pub fn public_path(secret: &Path) -> PathBuf {
    let mut p = secret.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Makes a new key pair from the system's randomness: `out`, the secret
/// key (mode 0600), and `out.pub`, the public key with `comment` (default:
/// the file name). Neither file may exist yet.
pub fn keygen(out: &Path, comment: Option<&str>) -> Result<PublicKey> {
    let public_out = public_path(out);
    for p in [out, public_out.as_path()] {
        if p.exists() {
            bail!("{} exists: a key is never overwritten (remove it, or choose another --out)", p.display());
        }
    }
    let default = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let secret = SecretKey::generate().context("cannot generate a key")?;
    let public = secret.public_key().with_comment(comment.unwrap_or(&default));
    secret.write_new(out).with_context(|| format!("cannot write the secret key {}", out.display()))?;
    public.write_new(&public_out).with_context(|| format!("cannot write the public key {}", public_out.display()))?;
    Ok(public)
}

/// Reads a secret key file.
pub fn read_secret(path: &Path) -> Result<SecretKey> {
    SecretKey::read(path).with_context(|| format!("cannot read the signing key {}", path.display()))
}

/// Signs the bundle at `bundle` in place (atomically; an earlier signature
/// is replaced) and returns the signing key's public half.
pub fn sign(bundle: &Path, key: &SecretKey) -> Result<PublicKey> {
    sign_file(bundle, key).with_context(|| format!("cannot sign {}", bundle.display()))?;
    Ok(key.public_key())
}
