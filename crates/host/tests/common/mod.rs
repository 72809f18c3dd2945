//! Paths the host's integration tests share: the repository, its fixtures
//! (made by the set-up scripts) and the tern-device binary beside them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// `rel` under the repository; it must exist.
pub fn fixture(rel: &str) -> PathBuf {
    let p = repo().join(rel);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh (or scripts/setup-data.sh) first", p.display());
    p
}

/// The tern-device binary of the same build (target/release/deps/TEST-… →
/// target/release/tern-device).
pub fn device_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join("tern-device");
    assert!(p.is_file(), "{} is missing: cargo build --release -p tern-device", p.display());
    p
}
