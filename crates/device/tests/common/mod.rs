//! Shared fixtures: where the set-up step put weights, labels, photos and
//! the Python venv, and a freshly exported ImageNet bundle.
//!
//! Missing fixtures fail the test with the command that makes them; they
//! never skip it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tern_model_format::arch::Backbone;
use tern_model_format::export::pretrained_bundle;
use tern_model_format::weights::SafeTensorsFile;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn fixture(env: &str, default: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| repo().join(default));
    assert!(p.exists(), "{} is missing ({env} unset): run scripts/setup.sh first", p.display());
    p
}

pub fn weights() -> PathBuf {
    fixture("TERN_WEIGHTS", "models/efficientnet-lite0.safetensors")
}

pub fn labels() -> PathBuf {
    fixture("TERN_IMAGENET_LABELS", "models/imagenet-labels.txt")
}

pub fn sample(name: &str) -> PathBuf {
    fixture("TERN_SAMPLES", "data/samples").join(name)
}

pub fn python() -> PathBuf {
    // The venv scripts/setup-python.sh made: $TERN_VENV when set (as
    // scripts/env.sh exports it), else <repo>/.venv.
    match std::env::var_os("TERN_VENV") {
        Some(v) if std::env::var_os("TERN_PYTHON").is_none() => {
            let p = PathBuf::from(v).join("bin/python");
            assert!(p.exists(), "{} is missing (TERN_VENV is set): run scripts/setup.sh first", p.display());
            p
        }
        _ => fixture("TERN_PYTHON", ".venv/bin/python"),
    }
}

/// The 1000-class EfficientNet-Lite0 bundle, exported once per test binary
/// by the format crate from the pretrained weights.
pub fn imagenet_bundle() -> &'static Path {
    static BUNDLE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &BUNDLE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("imagenet-efficientnet-lite0.onnx");
            let weights = SafeTensorsFile::open(&weights()).expect("weights");
            let labels: Vec<String> =
                std::fs::read_to_string(labels()).expect("labels").lines().map(str::to_owned).collect();
            let (graph, manifest) =
                pretrained_bundle(Backbone::EfficientnetLite0, &weights, labels, "test fixture", "tern tests")
                    .expect("export");
            tern_model_format::bundle::write(&path, graph, manifest).expect("write bundle");
            (dir, path)
        })
        .1
}

/// Runs `tern-device` with `args`.
pub fn tern_device(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern-device")).args(args).output().expect("run tern-device")
}

/// Parses JSON lines.
pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}
