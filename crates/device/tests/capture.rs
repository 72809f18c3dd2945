//! Capture for retraining and snapshots on the tiny colour bundle: the
//! policies (below a probability, on a change, every N seconds), the rate
//! limit, the quota, the bounded writer queue, the ImageFolder layout and
//! sidecars written by `tern-device run --capture`, reviewed with
//! `tern-device review`; snapshots (one frame, and clips) named by the
//! `label` events.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use support::*;
use tern_device::capture::{Capture, CaptureConfig, CaptureStats, Sidecar};
use tern_device::events::{Collect, Event, Sink};
use tern_device::runloop::{self, Backoff, LoopOptions};
use tern_device::smooth::{Hysteresis, Smoothing};
use tern_device::snapshot::{SnapshotConfig, Snapshots};
use tern_device::source::{FrameSource, Synthetic};
use tern_device::{Classifier, LoadOptions};

fn opts() -> LoopOptions {
    LoopOptions {
        smoothing: Smoothing::None,
        thresholds: Hysteresis::default(),
        newest_only: false,
        max_frames: None,
        report_every: None,
        frame_events: false,
        reopen: Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(40), attempts: Some(3) },
        log: false,
        slow: None,
        regions: Vec::new(),
    }
}

fn run(src: Synthetic, bundle: &Path, sinks: &mut [&mut dyn Sink]) {
    let clf = Classifier::load(bundle, &LoadOptions::default()).unwrap();
    let stop = AtomicBool::new(false);
    runloop::run(move || Ok(Box::new(src) as Box<dyn FrameSource>), clf, "colour.onnx", &opts(), sinks, None, &stop)
        .unwrap();
}

/// Runs `script` through a capture sink configured by `set`; its stats and
/// the sidecars written, sorted by frame.
fn capture(script: &str, set: impl FnOnce(&mut CaptureConfig)) -> (tempfile::TempDir, CaptureStats, Vec<Sidecar>) {
    let (dir, bundle) = color_bundle_in_tempdir();
    let sha = tern_model_format::Bundle::read(&bundle).unwrap().manifest.graph_sha256;
    let mut cfg = CaptureConfig::new(dir.path().join("cap"), bundle.clone(), sha);
    cfg.log = false;
    set(&mut cfg);
    let mut cap = Capture::start(cfg).unwrap();
    run(Synthetic::parse(script).unwrap(), &bundle, &mut [&mut cap]);
    let stats = cap.stats();
    let sidecars = sidecars(&dir.path().join("cap"));
    (dir, stats, sidecars)
}

fn sidecars(root: &Path) -> Vec<Sidecar> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(root).unwrap() {
        let d = d.unwrap().path();
        if !d.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "json") {
                let s: Sidecar = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
                assert!(f.with_extension("jpg").is_file(), "{} has no image", f.display());
                assert_eq!(d.file_name().unwrap().to_str().unwrap(), s.label, "filed under its label");
                v.push(s);
            }
        }
    }
    v.sort_by_key(|s| s.frame);
    v
}

#[test]
fn capture_on_change_takes_the_frames_of_each_change() {
    let (_d, stats, sc) = capture("red*4,green*4,blue*4", |c| c.on_change = true);
    assert_eq!(stats.written, 3, "{stats:?}");
    let got: Vec<(&str, u64)> = sc.iter().map(|s| (s.label.as_str(), s.frame)).collect();
    assert_eq!(got, [("red", 0), ("green", 4), ("blue", 8)]);
    assert!(sc.iter().all(|s| s.policy == tern_device::capture::Policy::Change && !s.reviewed));
}

#[test]
fn capture_below_takes_only_unsure_frames() {
    // Grey: every label at 1/3; solid colours: over 0.99.
    let (_d, stats, sc) = capture("red*3,gray*2,green*3", |c| c.below = Some(0.6));
    assert_eq!(stats.written, 2, "{stats:?}");
    for s in &sc {
        assert!(s.probability < 0.6, "{s:?}");
        assert_eq!(s.probabilities.len(), 3);
        assert_eq!(s.graph_sha256.len(), 64);
        assert!(s.source.starts_with("synthetic"), "{}", s.source);
        assert_eq!(s.predicted, s.label);
    }
    assert_eq!(sc.iter().map(|s| s.frame).collect::<Vec<_>>(), [3, 4]);
}

#[test]
fn capture_every_and_the_rate_limit() {
    // An hour apart: only the first frame.
    let (_d, stats, _) = capture("red*6", |c| c.every = Some(Duration::from_secs(3600)));
    assert_eq!((stats.written, stats.queued), (1, 1), "{stats:?}");
    // Every frame asked for, three a minute allowed.
    let (_d, stats, sc) = capture("red*5,green*5", |c| {
        c.below = Some(1.01);
        c.max_per_minute = Some(3);
    });
    assert_eq!((stats.written, stats.rate_limited), (3, 7), "{stats:?}");
    assert_eq!(sc.iter().map(|s| s.frame).collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn the_quota_counts_what_is_there_and_stops_capturing() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let root = dir.path().join("cap");
    std::fs::create_dir_all(root.join("red")).unwrap();
    std::fs::write(root.join("red/old.jpg"), vec![0u8; 3 << 20]).unwrap();
    let mut cfg = CaptureConfig::new(root.clone(), bundle.clone(), "x".into());
    (cfg.below, cfg.quota_bytes, cfg.log) = (Some(1.01), Some(2 << 20), false);
    let mut cap = Capture::start(cfg).unwrap();
    run(Synthetic::parse("red*5").unwrap(), &bundle, &mut [&mut cap]);
    let s = cap.stats();
    assert!(s.full && s.written == 0 && s.over_quota == 5 && s.bytes == 3 << 20, "{s:?}");

    // Room for some frames: capturing stops once the quota is reached.
    let root = dir.path().join("cap2");
    let mut cfg = CaptureConfig::new(root.clone(), bundle.clone(), "x".into());
    (cfg.below, cfg.quota_bytes, cfg.log) = (Some(1.01), Some(3000), false);
    let mut cap = Capture::start(cfg).unwrap();
    run(Synthetic::parse("red*40").unwrap().size(32, 32), &bundle, &mut [&mut cap]);
    let s = cap.stats();
    assert!(s.full && s.written >= 1 && s.written < 40 && s.over_quota > 0, "{s:?}");
    assert_eq!(s.written + s.over_quota + s.dropped, 40, "{s:?}");
    assert_eq!(sidecars(&root).len() as u64, s.written);
}

#[test]
fn a_full_queue_drops_frames_and_counts_them() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let mut cfg = CaptureConfig::new(dir.path().join("cap"), bundle.clone(), "x".into());
    (cfg.below, cfg.queue, cfg.log) = (Some(1.01), 1, false);
    let mut cap = Capture::start(cfg).unwrap();
    // Large frames encode far slower than the tiny bundle classifies them.
    run(Synthetic::parse("red*60").unwrap().size(1280, 960), &bundle, &mut [&mut cap]);
    let s = cap.stats();
    assert_eq!(s.written + s.dropped, 60, "{s:?}");
    assert_eq!(s.queued, s.written, "{s:?}");
    assert!(s.dropped > 0 && s.written > 0, "{s:?}");
    assert_eq!(sidecars(&dir.path().join("cap")).len() as u64, s.written);
}

fn snapshots_of(events: &Collect) -> Vec<Option<String>> {
    events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Label { snapshot, .. } => Some(snapshot.clone()),
            _ => None,
        })
        .collect()
}

fn dominant(path: &Path) -> usize {
    let img = image::open(path).unwrap().to_rgb8();
    let p = img.get_pixel(img.width() / 2, img.height() / 2).0;
    (0..3).max_by_key(|&i| p[i]).unwrap()
}

#[test]
fn snapshots_are_named_by_the_label_events() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let snaps = dir.path().join("snaps");
    let mut sink = Snapshots::start(SnapshotConfig { dir: snaps.clone(), clip: 0, queue: 8 }).unwrap();
    let mut events = Collect::default();
    run(Synthetic::parse("red*3,green*3,blue*3").unwrap(), &bundle, &mut [&mut sink, &mut events]);
    let named = snapshots_of(&events);
    assert_eq!(named.len(), 3);
    for (i, n) in named.iter().enumerate() {
        let p = Path::new(n.as_deref().unwrap());
        assert!(p.starts_with(&snaps) && p.is_file(), "{p:?}");
        assert!(p.file_name().unwrap().to_str().unwrap().ends_with(&format!("-{}.jpg", COLORS[i])), "{p:?}");
        assert_eq!(dominant(p), i, "{p:?} is not the frame of the change");
    }
    let label = events.events.iter().find(|e| matches!(e, Event::Label { .. })).unwrap();
    assert!(label.to_json().contains("\"snapshot\":"));
}

#[test]
fn snapshot_clips_hold_frames_before_and_after() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let snaps = dir.path().join("snaps");
    let mut sink = Snapshots::start(SnapshotConfig { dir: snaps.clone(), clip: 2, queue: 64 }).unwrap();
    let mut events = Collect::default();
    run(Synthetic::parse("red*4,green*4,blue*4").unwrap(), &bundle, &mut [&mut sink, &mut events]);
    let named: Vec<String> = snapshots_of(&events).into_iter().map(Option::unwrap).collect();
    assert_eq!(named.len(), 3);
    let files = |d: &str| {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    };
    // The first change is the first frame: nothing before it.
    let first = files(&named[0]);
    assert_eq!(first.iter().map(|p| dominant(p)).collect::<Vec<_>>(), [0, 0, 0]);
    // Red, red | green (the change) | green, green.
    let second = files(&named[1]);
    let names: Vec<_> = second.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg", "0005.jpg"]);
    assert_eq!(second.iter().map(|p| dominant(p)).collect::<Vec<_>>(), [0, 0, 1, 1, 1]);
    let third = files(&named[2]);
    assert_eq!(third.iter().map(|p| dominant(p)).collect::<Vec<_>>(), [1, 1, 2, 2, 2]);
}

fn tern_device(args: &[&OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern-device")).args(args).output().expect("run tern-device")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cli_captures_a_folder_and_reviews_it() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    for (name, c) in [("00", [200, 20, 20]), ("01", [128, 128, 128]), ("02", [20, 180, 30]), ("03", [120, 120, 120])] {
        solid_png(&frames.join(format!("{name}.png")), c);
    }
    let cap = dir.path().join("cap");
    let snaps = dir.path().join("snaps");
    let out = tern_device(&[
        "run".as_ref(),
        bundle.as_os_str(),
        "--folder".as_ref(),
        frames.as_os_str(),
        "--capture".as_ref(),
        cap.as_os_str(),
        "--capture-below".as_ref(),
        "0.6".as_ref(),
        "--snapshot-dir".as_ref(),
        snaps.as_os_str(),
        "--quiet".as_ref(),
        "--report-every".as_ref(),
        "0".as_ref(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let labels: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "label")
        .collect();
    assert!(!labels.is_empty());
    for l in &labels {
        let s = l["snapshot"].as_str().unwrap_or_else(|| panic!("no snapshot in {l}"));
        assert!(Path::new(s).is_file(), "{s}");
    }
    let sc = sidecars(&cap);
    let names: Vec<_> = sc.iter().map(|s| s.name.clone().unwrap()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].ends_with("01.png") && names[1].ends_with("03.png"), "only the grey frames are unsure: {names:?}");
    let sha = tern_model_format::Bundle::read(&bundle).unwrap().manifest.graph_sha256;
    assert!(sc.iter().all(|s| s.graph_sha256 == sha && s.bundle == bundle.display().to_string()));

    let list = json(&tern_device(&["review".as_ref(), cap.as_os_str(), "list".as_ref()]));
    assert_eq!(list["total"], 2);
    let id = list["items"][0]["id"].as_str().unwrap().to_owned();
    let moved = json(&tern_device(&["review".as_ref(), cap.as_os_str(), "move".as_ref(), id.as_ref(), "gray".as_ref()]));
    let new_id = moved["id"].as_str().unwrap();
    assert!(new_id.starts_with("gray/"), "{moved}");
    assert_eq!(moved["sidecar"]["reviewed"], true);
    assert!(cap.join(new_id).is_file() && !cap.join(&id).exists());
    let id2 = list["items"][1]["id"].as_str().unwrap();
    json(&tern_device(&["review".as_ref(), cap.as_os_str(), "delete".as_ref(), id2.as_ref()]));
    let out = tern_device(&["review".as_ref(), cap.as_os_str(), "confirm".as_ref(), "../../etc/passwd.jpg".as_ref()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad request"), "{}", String::from_utf8_lossy(&out.stderr));
    let list = json(&tern_device(&["review".as_ref(), cap.as_os_str(), "list".as_ref()]));
    assert_eq!(list["total"], 1);

    // No policy: a clear refusal.
    let out = tern_device(&[
        "run".as_ref(),
        bundle.as_os_str(),
        "--folder".as_ref(),
        frames.as_os_str(),
        "--capture".as_ref(),
        cap.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no policy"));
}
