//! Which bundles this device runs.
//!
//! Without trusted keys (the default) any valid bundle runs, signed or not:
//! the graph checksum catches accidents only. With trusted keys
//! (`--trust KEY.pub`, repeatable, or `TERN_TRUST`), a bundle runs only if
//! it is signed by one of them and unchanged since
//! ([`tern_model_format::signature`]): unsigned, unknown-signer and
//! tampered bundles are refused, at start and on every hot reload. Two keys
//! let a fleet move from an old signing key to a new one.
//!
//! The signature is checked on the very bytes that are then planned, so a
//! file replaced between the check and the load cannot slip through.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tern_model_format::signature::{self, PublicKey};
use tern_model_format::Bundle;

use crate::engine::{Classifier, LoadOptions};

/// The keys whose bundles this device runs; none: any bundle.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    keys: Vec<PublicKey>,
}

impl Trust {
    /// No trusted key: every valid bundle runs, signed or not.
    pub fn any() -> Trust {
        Trust::default()
    }

    /// Only bundles signed by one of `keys` run (an empty list: any bundle).
    pub fn keys(keys: Vec<PublicKey>) -> Trust {
        Trust { keys }
    }

    /// Reads public key files (`tern-host keygen`'s `KEY.pub`).
    pub fn read(paths: &[PathBuf]) -> Result<Trust> {
        let keys = paths
            .iter()
            .map(|p| PublicKey::read(p).with_context(|| format!("cannot read trusted key {}", p.display())))
            .collect::<Result<_>>()?;
        Ok(Trust { keys })
    }

    /// Whether a signature is required.
    pub fn is_enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The trusted keys.
    pub fn trusted(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks `bundle` against the trusted keys: the key that signed it, or
    /// `None` when no key is trusted (nothing is checked then).
    pub fn check(&self, bundle: &Bundle) -> Result<Option<PublicKey>> {
        if !self.is_enforced() {
            return Ok(None);
        }
        match signature::verify(bundle, &self.keys) {
            Ok(key) => Ok(Some(key.clone())),
            Err(e) => {
                let ids: Vec<String> = self.keys.iter().map(PublicKey::describe).collect();
                Err(anyhow::Error::new(e).context(format!("refused (trusted keys: {})", ids.join(", "))))
            }
        }
    }

    /// Reads the bundle at `path`, checks it (see [`Trust::check`]) and
    /// prepares it with `options`; also returns the trusted key that signed it.
    pub fn load(&self, path: &Path, options: &LoadOptions) -> Result<(Classifier, Option<PublicKey>)> {
        let bundle = Bundle::read(path).with_context(|| format!("cannot load bundle {}", path.display()))?;
        let signer = self.check(&bundle).with_context(|| format!("bundle {}", path.display()))?;
        let what = if options.compute == crate::engine::Compute::F32 { String::new() } else { format!(" for {}", options.compute) };
        let classifier = Classifier::from_bundle(bundle, options)
            .with_context(|| format!("cannot prepare bundle {}{what}", path.display()))?;
        Ok((classifier, signer))
    }
}
