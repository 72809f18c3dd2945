//! Parity of tract's logits with two independent computations on real
//! photos, fed the very input tensor tern-device computed:
//! - a PyTorch reference forward pass of the same weights
//!   (tests/python/reference.py, torch.nn.functional, no ONNX involved);
//! - onnxruntime running the same bundle file (interoperability), after
//!   the ONNX checker accepts it.
//!
//! Tolerance: max |Δ| ≤ 1e-4 on every logit (and probability).

mod common;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;
const PHOTOS: [&str; 3] = ["chelsea.png", "coffee.png", "astronaut.png"];

/// Classifies the photos; returns (input .npy paths, tract JSON lines).
fn tract_run(dump: &std::path::Path) -> (Vec<PathBuf>, Vec<Value>) {
    let photos: Vec<PathBuf> = PHOTOS.iter().map(|p| sample(p)).collect();
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("classify"),
        OsStr::new("--json"),
        OsStr::new("--logits"),
        OsStr::new("--top-k"),
        OsStr::new("1000"),
        OsStr::new("--dump-input"),
        dump.as_os_str(),
        imagenet_bundle().as_os_str(),
    ];
    args.extend(photos.iter().map(|p| p.as_os_str()));
    let out = tern_device(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inputs = PHOTOS.iter().map(|p| dump.join(std::path::Path::new(p).with_extension("npy"))).collect();
    (inputs, json_lines(&out.stdout))
}

fn python_json(args: &[&OsStr]) -> Value {
    let out = Command::new(python()).args(args).output().expect("run python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("python JSON")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Probabilities in label order from a `--top-k 1000` JSON line.
fn probabilities(line: &Value) -> Vec<f64> {
    let mut p = vec![0.0; 1000];
    for r in line["top"].as_array().unwrap() {
        p[r["index"].as_u64().unwrap() as usize] = r["probability"].as_f64().unwrap();
    }
    p
}

#[test]
fn tract_matches_the_pytorch_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (inputs, lines) = tract_run(dir.path());
    let script = repo().join("tests/python/reference.py");
    let weights = weights();
    let mut args: Vec<&OsStr> = vec![script.as_os_str(), OsStr::new("--weights"), weights.as_os_str()];
    for i in &inputs {
        args.push(OsStr::new("--input"));
        args.push(i.as_os_str());
    }
    let reference = python_json(&args);
    for ((photo, input), line) in PHOTOS.iter().zip(&inputs).zip(&lines) {
        let want = floats(&reference[input.to_str().unwrap()]);
        let got = floats(&line["logits"]);
        let d = max_abs_diff(&want, &got);
        eprintln!("{photo}: tract vs PyTorch max |Δlogit| = {d:.2e}");
        assert!(d <= TOLERANCE, "{photo}: max |Δlogit| {d:e} > {TOLERANCE:e}");
        let argmax = |v: &[f64]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
        assert_eq!(argmax(&want), argmax(&got), "{photo}: top-1 differs");
    }
}

#[test]
fn onnxruntime_opens_the_bundle_and_agrees_with_tract() {
    let dir = tempfile::tempdir().unwrap();
    let (inputs, lines) = tract_run(dir.path());
    let script = repo().join("tests/python/ort_run.py");
    let mut args: Vec<&OsStr> = vec![script.as_os_str(), imagenet_bundle().as_os_str(), OsStr::new("--check")];
    for i in &inputs {
        args.push(OsStr::new("--input"));
        args.push(i.as_os_str());
    }
    let ort = python_json(&args);
    for ((photo, input), line) in PHOTOS.iter().zip(&inputs).zip(&lines) {
        let outs = &ort[input.to_str().unwrap()];
        let dl = max_abs_diff(&floats(&outs["logits"]), &floats(&line["logits"]));
        let dp = max_abs_diff(&floats(&outs["probabilities"]), &probabilities(line));
        eprintln!("{photo}: tract vs onnxruntime max |Δlogit| = {dl:.2e}, max |Δp| = {dp:.2e}");
        assert!(dl <= TOLERANCE && dp <= TOLERANCE, "{photo}: |Δlogit| {dl:e}, |Δp| {dp:e}");
    }
}
