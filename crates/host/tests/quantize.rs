//! `tern-host quantize`: calibration on real images, the int8 bundle and
//! what its manifest records, float-vs-int8 agreement on held-out images,
//! and clear refusals of bad input.
//!
//! The ImageNet bundle is calibrated on data/cats-dogs/train and compared
//! on the sample photos (never the same files). tract and onnxruntime
//! running the same kind of file are tested in
//! crates/device/tests/quantize.rs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tern_model_format::manifest::Precision;
use tern_model_format::Bundle;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn fixture(rel: &str, make: &str) -> PathBuf {
    let p = repo().join(rel);
    assert!(p.exists(), "{} is missing: run {make} first", p.display());
    p
}

fn host(args: &[&OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern-host")).current_dir(repo()).args(args).output().expect("run tern-host")
}

/// The pretrained ImageNet bundle, exported once per test binary.
fn float_bundle() -> &'static Path {
    static B: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &B.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("imagenet.onnx");
        tern_host::pretrained::export_imagenet(
            tern_model_format::arch::Backbone::EfficientnetLite0,
            &fixture("models/efficientnet-lite0.safetensors", "scripts/setup.sh"),
            &fixture("models/imagenet-labels.txt", "scripts/setup.sh"),
            &out,
        )
        .unwrap();
        (dir, out)
    })
    .1
}

/// Runs `tern-host quantize` on the ImageNet bundle (calibration: cats and
/// dogs; held out: the sample photos) and returns the written bundle.
fn quantize(dir: &Path, extra: &[&str]) -> (PathBuf, Bundle) {
    let calib = fixture("data/cats-dogs/train", "scripts/setup-data.sh");
    let samples = fixture("data/samples", "scripts/setup.sh");
    let out = dir.join("int8.onnx");
    let mut args: Vec<&OsStr> = vec![
        "quantize".as_ref(),
        float_bundle().as_os_str(),
        calib.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--calib-images".as_ref(),
        "24".as_ref(),
        "--eval-data".as_ref(),
        samples.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let o = host(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    eprintln!("{stderr}");
    let b = Bundle::read(&out).unwrap();
    (out, b)
}

fn check_common(out: &Path, b: &Bundle, min_ratio: f64) {
    let m = &b.manifest;
    assert_eq!(m.precision, Precision::Int8);
    let c = &m.metrics.as_ref().unwrap()["int8_vs_float"];
    assert_eq!(c["images"], 4);
    let agreement = c["top1_agreement"].as_f64().unwrap();
    assert!(agreement >= 0.99, "int8 agrees with float on {agreement}");
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    let ratio = size(float_bundle()) / size(out);
    assert!(ratio >= min_ratio, "int8 is only {ratio:.2}× smaller");
    let q = m.quantization.as_ref().unwrap();
    let float_layers = q["float_layers"].as_array().unwrap();
    // The 16 depthwise convolutions stay float compute (with int8 weights,
    // unless kept float as sensitive).
    let depthwise: Vec<_> =
        float_layers.iter().filter(|l| l["layer"].as_str().unwrap().ends_with("_depthwise_conv")).collect();
    assert_eq!(depthwise.len(), 16);
    assert!(depthwise.iter().all(|l| l["reason"] == "depthwise" || l["reason"] == "requested"), "{depthwise:?}");
    assert_eq!(q["float_bundle_graph_sha256"], Bundle::read(float_bundle()).unwrap().manifest.graph_sha256);
}

#[test]
fn default_int8_stores_int8_weights_and_agrees_with_float() {
    let dir = tempfile::tempdir().unwrap();
    let (out, b) = quantize(dir.path(), &[]);
    check_common(&out, &b, 3.5);
    let q = b.manifest.quantization.as_ref().unwrap();
    assert_eq!(q["scheme"], "weights");
    assert_eq!(q["activations"]["dtype"], "float32");
    // No activation is quantized; the calibration images give the input
    // means for bias correction of every int8-weight layer. The layers
    // most sensitive to int8 weights keep float weights (--min-shrink 3.5
    // by default), and only those.
    assert_eq!(q["calibration"]["images"], 24);
    assert_eq!(q["calibration"]["bias_correction"], true);
    let kept: Vec<&str> =
        q["sensitive_float"]["kept_float"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert!(!kept.is_empty(), "{}", q["sensitive_float"]);
    // One entry per Conv/Gemm, which are all float compute here.
    let layers = q["float_layers"].as_array().unwrap().len();
    assert_eq!(q["sensitive_float"]["sensitivity"].as_array().unwrap().len(), layers);
    for l in q["float_layers"].as_array().unwrap() {
        if kept.contains(&l["layer"].as_str().unwrap()) {
            assert!(l["weights"] == "float32" && l["reason"] == "requested", "{l}");
        } else {
            assert!(l["weights"] == "int8" && l["bias_corrected"] == true, "{l}");
        }
    }
}

#[test]
fn min_shrink_0_stores_every_weight_in_int8() {
    let dir = tempfile::tempdir().unwrap();
    let (out, b) = quantize(dir.path(), &["--min-shrink", "0"]);
    check_common(&out, &b, 3.7);
    let q = b.manifest.quantization.as_ref().unwrap();
    assert!(q.get("sensitive_float").is_none(), "{q}");
    assert!(q["float_layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["weights"] == "int8" && l["bias_corrected"] == true));
}

#[test]
fn static_int8_records_calibrated_ranges_and_agrees_with_float() {
    let dir = tempfile::tempdir().unwrap();
    let (out, b) = quantize(dir.path(), &["--scheme", "static", "--calibration", "percentile"]);
    check_common(&out, &b, 3.0);
    let q = b.manifest.quantization.as_ref().unwrap();
    assert_eq!(q["scheme"], "static");
    assert_eq!(q["calibration"]["ranges"]["method"], "percentile");
    assert_eq!(q["calibration"]["images"], 24);
    // Every quantized activation has a positive scale and an int8 zero point.
    let tensors = q["tensors"].as_object().unwrap();
    assert!(tensors.len() > 30, "{} tensors", tensors.len());
    for (name, t) in tensors {
        let s = t["scale"].as_f64().unwrap();
        let z = t["zero_point"].as_i64().unwrap();
        assert!(s > 0.0 && s.is_finite() && (-128..=127).contains(&z), "{name}: {t}");
    }
    let layers = q["quantized_layers"].as_array().unwrap();
    assert!(layers.iter().any(|l| l["layer"] == "_conv_stem" && l["relu6_folded"] == true));
}

#[test]
fn bad_inputs_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dir.path().join("int8.onnx");
    let run = |bundle: &Path, calib: &Path, extra: &[&str]| {
        let mut args: Vec<&OsStr> =
            vec!["quantize".as_ref(), bundle.as_os_str(), calib.as_os_str(), "--out".as_ref(), out.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        let o = host(&args);
        assert!(!o.status.success(), "accepted {args:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(float_bundle(), &empty, &[]);
    assert!(e.contains("no image files") && e.contains("empty"), "{e}");

    let not_onnx = dir.path().join("not.onnx");
    std::fs::write(&not_onnx, b"not a model").unwrap();
    let samples = fixture("data/samples", "scripts/setup.sh");
    let e = run(&not_onnx, &samples, &[]);
    assert!(e.contains("not.onnx"), "{e}");

    // Flags out of range are named.
    let e = run(float_bundle(), &samples, &["--min-shrink", "-1"]);
    assert!(e.contains("--min-shrink -1 must be 0 (off) or more"), "{e}");
    let e = run(float_bundle(), &samples, &["--auto"]);
    assert!(e.contains("--eval-data"), "{e}");

    // Held-out images must not be calibration images.
    let e = run(float_bundle(), &samples, &["--calib-images", "100", "--eval-data", samples.to_str().unwrap()]);
    assert!(e.contains("calibration image"), "{e}");
    assert!(!out.exists(), "a failed run left {}", out.display());
}

#[test]
fn qdq_keeps_the_first_three_convolutions_float_and_calibrates_by_minmax() {
    let dir = tempfile::tempdir().unwrap();
    let (_, b) = quantize(dir.path(), &["--scheme", "qdq"]);
    let q = b.manifest.quantization.as_ref().unwrap();
    assert_eq!(q["scheme"], "qdq");
    assert_eq!(q["calibration"]["ranges"]["method"], "minmax");
    let agreement = b.manifest.metrics.as_ref().unwrap()["int8_vs_float"]["top1_agreement"].as_f64().unwrap();
    assert!(agreement >= 0.99, "QDQ agrees with float on {agreement}");
    // --float-first 3 by default: the stem and the first block compute in
    // float on the unquantized input; the first int8 convolution reads the
    // first block's quantized output.
    let first = ["_conv_stem", "_blocks.0._depthwise_conv", "_blocks.0._project_conv"];
    let float: Vec<&str> = q["float_layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["reason"] == "requested")
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    assert_eq!(float, first, "{}", q["float_layers"]);
    let quantized = q["quantized_layers"].as_array().unwrap();
    assert_eq!(quantized.len(), 49 - first.len());
    assert_eq!(quantized[0]["layer"], "_blocks.1._expand_conv");
    let tensors = q["tensors"].as_object().unwrap();
    assert!(!tensors.contains_key("input") && !tensors.contains_key("_conv_stem.relu6"), "{:?}", tensors.keys());
    assert!(tensors.contains_key("_blocks.0._project_conv.out"), "{:?}", tensors.keys());
}
