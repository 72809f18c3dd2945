//! Bad input gives a clear error naming the file, a non-zero exit code and
//! no panic.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;
use prost::Message;
use tern_model_format::onnx;

fn assert_clean_failure(out: &std::process::Output, names: &Path, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit code 0; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.contains(&names.display().to_string()), "error does not name {}: {stderr}", names.display());
    assert!(stderr.to_lowercase().contains(says), "error does not say {says:?}: {stderr}");
}

fn classify(bundle: &Path, image: &Path) -> std::process::Output {
    tern_device(&[OsStr::new("classify"), bundle.as_os_str(), image.as_os_str()])
}

#[test]
fn truncated_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(imagenet_bundle()).unwrap();
    let cut = dir.path().join("truncated.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert_clean_failure(&classify(&cut, &sample("chelsea.png")), &cut, "truncated");
}

#[test]
fn empty_bundle_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    assert_clean_failure(&classify(&empty, &sample("chelsea.png")), &empty, "empty");
}

#[test]
fn missing_bundle_file() {
    let missing = Path::new("/nonexistent/model.onnx");
    assert_clean_failure(&classify(missing, &sample("chelsea.png")), missing, "no such file");
}

#[test]
fn label_count_does_not_match_output() {
    // Re-label the real bundle with 999 labels, re-encoded with a correct
    // checksum, so that only the label count is wrong.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(imagenet_bundle()).unwrap();
    let mut model = onnx::ModelProto::decode(bytes.as_slice()).unwrap();
    let entry = model.metadata_props.iter_mut().find(|e| e.key.as_deref() == Some("tern.manifest")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(entry.value.as_deref().unwrap()).unwrap();
    m["labels"].as_array_mut().unwrap().pop();
    m["io"]["output_width"] = 999.into();
    entry.value = Some(m.to_string());
    let bad = dir.path().join("labels.onnx");
    std::fs::write(&bad, model.encode_to_vec()).unwrap();
    assert_clean_failure(&classify(&bad, &sample("chelsea.png")), &bad, "999 labels do not match an output of width 1000");
}

#[test]
fn foreign_onnx_without_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(imagenet_bundle()).unwrap();
    let mut model = onnx::ModelProto::decode(bytes.as_slice()).unwrap();
    model.metadata_props.clear();
    let bad = dir.path().join("plain.onnx");
    std::fs::write(&bad, model.encode_to_vec()).unwrap();
    assert_clean_failure(&classify(&bad, &sample("chelsea.png")), &bad, "no tern manifest");
}

#[test]
fn non_image_and_empty_image_files() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.jpg");
    std::fs::write(&text, b"this is not a picture").unwrap();
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let png = std::fs::read(sample("chelsea.png")).unwrap();
    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 3]).unwrap();
    for (path, says) in [(&text, "cannot decode image"), (&empty, "empty"), (&truncated, "cannot decode image")] {
        assert_clean_failure(&classify(imagenet_bundle(), path), path, says);
    }
}

#[test]
fn a_bad_image_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("bad.png");
    std::fs::write(&text, b"junk").unwrap();
    let out = tern_device(&[
        OsStr::new("classify"),
        OsStr::new("--json"),
        imagenet_bundle().as_os_str(),
        text.as_os_str(),
        sample("chelsea.png").as_os_str(),
    ]);
    assert!(!out.status.success());
    assert_eq!(json_lines(&out.stdout).len(), 1, "chelsea should still be classified");
}
