//! `tern-device run` on a folder of real photos with the pretrained
//! ImageNet bundle: the loop's per-frame labels are the ones `classify`
//! gives (same preprocessing, same model).

mod common;

use std::ffi::OsStr;

use common::*;

#[test]
fn run_on_a_photo_folder_names_the_cat_and_the_espresso() {
    let labels: Vec<String> = std::fs::read_to_string(labels()).unwrap().lines().map(str::to_owned).collect();
    let dir = tempfile::tempdir().unwrap();
    // File names set the order: the cat, then the coffee.
    std::fs::copy(sample("chelsea.png"), dir.path().join("1-chelsea.png")).unwrap();
    std::fs::copy(sample("coffee.png"), dir.path().join("2-coffee.png")).unwrap();
    let out = tern_device(&[
        OsStr::new("run"),
        imagenet_bundle().as_os_str(),
        OsStr::new("--folder"),
        dir.path().as_os_str(),
        OsStr::new("--smoothing"),
        OsStr::new("none"),
        OsStr::new("--on"),
        OsStr::new("0.1"),
        OsStr::new("--off"),
        OsStr::new("0.05"),
        OsStr::new("--every-frame"),
        OsStr::new("--no-reload"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    let frames: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"] == "frame").collect();
    assert_eq!(frames.len(), 2);
    let cats = &labels[281..=285];
    let top0 = frames[0]["top"].as_str().unwrap();
    assert!(cats.iter().any(|c| c == top0), "chelsea's top-1 is {top0:?}");
    assert_eq!(frames[1]["top"].as_str().unwrap(), labels[967], "coffee");
    // With these thresholds both photos are confident enough to be active.
    let active: Vec<&str> = frames.iter().map(|f| f["active"].as_str().unwrap_or("")).collect();
    assert_eq!(active, [top0, labels[967].as_str()]);
}
