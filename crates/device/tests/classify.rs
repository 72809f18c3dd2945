//! The spine end to end: the pretrained backbone exported by the format
//! crate, run by `tern-device classify` on real photos.

mod common;

use std::ffi::OsStr;

use common::*;

#[test]
fn chelsea_is_a_cat_and_coffee_is_espresso() {
    let bundle = imagenet_bundle();
    let out = tern_device(&[
        OsStr::new("classify"),
        OsStr::new("--json"),
        bundle.as_os_str(),
        sample("chelsea.png").as_os_str(),
        sample("coffee.png").as_os_str(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2);
    let top1 = |i: usize| lines[i]["top"][0]["index"].as_u64().expect("index");
    assert!((281..=285).contains(&top1(0)), "chelsea top-1 is {}", lines[0]["top"][0]);
    assert_eq!(top1(1), 967, "coffee top-1 is {}", lines[1]["top"][0]);
    assert_eq!(lines[0]["top"].as_array().map(Vec::len), Some(5));
    let p: f64 = lines[0]["top"].as_array().unwrap().iter().map(|r| r["probability"].as_f64().unwrap()).sum();
    assert!(p > 0.5 && p <= 1.0 + 1e-5, "top-5 probabilities sum to {p}");
}

#[test]
fn text_output_names_the_label() {
    let out = tern_device(&[
        OsStr::new("classify"),
        imagenet_bundle().as_os_str(),
        sample("chelsea.png").as_os_str(),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cat"), "{text}");
}

#[test]
fn info_prints_the_manifest() {
    let out = tern_device(&[OsStr::new("info"), imagenet_bundle().as_os_str()]);
    assert!(out.status.success());
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["labels"].as_array().map(Vec::len), Some(1000));
    assert_eq!(m["architecture"]["backbone"], "efficientnet-lite0");
    assert_eq!(m["format_version"], 1);
}
