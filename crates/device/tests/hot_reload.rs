//! Hot reload: the bundle file is replaced while the loop runs. A bad
//! replacement (garbage, a truncated bundle, a bundle without the labels
//! the GPIO rules need; with a trusted key, an unsigned or tampered one) is
//! refused and the running bundle goes on; a good one is swapped in without
//! stopping.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use support::*;
use tern_device::actions::{check_labels, parse_rules};
use tern_device::events::{Event, Sink};
use tern_device::reload::{Check, Reloader};
use tern_device::runloop::{self, LoopOptions, StopReason};
use tern_device::smooth::Smoothing;
use tern_device::source::{FrameSource, Synthetic};
use tern_device::trust::Trust;
use tern_device::{Classifier, LoadOptions};

/// Replaces the bundle step by step as the loop reports back, and stops the
/// loop once the last step is seen.
struct Script {
    bundle: PathBuf,
    dir: PathBuf,
    step: usize,
    frames: u64,
    stop: Arc<AtomicBool>,
    reloads: Vec<(bool, String)>,
    labels: Vec<Option<String>>,
    labels_at_reload: Vec<usize>,
    started: Instant,
}

/// Writes `bytes` as the bundle by an atomic rename, as a deploy would.
fn replace(bundle: &Path, dir: &Path, bytes: &[u8]) {
    let tmp = dir.join("incoming.onnx");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, bundle).unwrap();
}

impl Script {
    fn next_step(&mut self) {
        let good = std::fs::read(self.dir.join("good-fr.onnx")).unwrap();
        let wrong_labels = std::fs::read(self.dir.join("wrong-labels.onnx")).unwrap();
        match self.step {
            0 => replace(&self.bundle, &self.dir, b"this is not an ONNX file"),
            1 => replace(&self.bundle, &self.dir, &good[..good.len() / 2]),
            2 => replace(&self.bundle, &self.dir, &wrong_labels),
            3 => replace(&self.bundle, &self.dir, &good),
            _ => {}
        }
        self.step += 1;
    }
}

impl Sink for Script {
    fn event(&mut self, e: &Event) -> Result<()> {
        assert!(self.started.elapsed() < Duration::from_secs(60), "reload test took over a minute: {:?}", self.reloads);
        match e {
            Event::Frame { .. } => {
                self.frames += 1;
                if self.frames == 20 {
                    self.next_step();
                }
            }
            Event::Reload { ok, detail, .. } => {
                self.reloads.push((*ok, detail.clone()));
                self.labels_at_reload.push(self.labels.len());
                if *ok {
                    // Let the new model decide a few frames, then stop.
                    self.step = 99;
                } else {
                    self.next_step();
                }
            }
            Event::Label { label, .. } => {
                self.labels.push(label.clone());
                if label.as_deref() == Some("rouge") {
                    self.stop.store(true, Ordering::Relaxed);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[test]
fn bad_bundles_are_refused_and_a_good_one_is_swapped_in_without_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("live.onnx");
    color_bundle(&bundle, COLORS, 10.0);
    // The good replacement: same network, French labels, so the swap shows.
    color_bundle(&dir.path().join("good-fr.onnx"), ["rouge", "vert", "bleu"], 10.0);
    // A valid bundle that lacks the label the GPIO rule needs.
    color_bundle(&dir.path().join("wrong-labels.onnx"), ["cyan", "magenta", "yellow"], 10.0);

    // A GPIO rule on `red` (or `rouge`, its French name): a bundle with
    // neither label would leave the pin dead, so it must be refused.
    let rules = parse_rules("red=17,rouge=18").unwrap();
    let check: Check = Box::new(move |m: &tern_model_format::Manifest| {
        if rules.iter().any(|r| m.labels.contains(&r.label)) {
            Ok(())
        } else {
            check_labels(&rules[..1], &m.labels)
        }
    });
    let reloader =
        Reloader::spawn(&bundle, Duration::from_millis(30), LoadOptions::default(), Trust::any(), check).unwrap();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut script = Script {
        bundle: bundle.clone(),
        dir: dir.path().to_owned(),
        step: 0,
        frames: 0,
        stop: stop.clone(),
        reloads: vec![],
        labels: vec![],
        labels_at_reload: vec![],
        started: Instant::now(),
    };
    let src = Synthetic::parse("red").unwrap().repeat(true).fps(Some(200.0));
    let opts = LoopOptions {
        smoothing: Smoothing::None,
        frame_events: true,
        report_every: None,
        max_frames: Some(20_000),
        ..LoopOptions::default()
    };
    let summary = runloop::run(
        move || Ok(Box::new(src) as Box<dyn FrameSource>),
        clf,
        "live.onnx",
        &opts,
        &mut [&mut script],
        Some(&reloader),
        &stop,
    )
    .unwrap();

    let oks: Vec<bool> = script.reloads.iter().map(|r| r.0).collect();
    assert_eq!(oks, [false, false, false, true], "{:#?}", script.reloads);
    let why = |i: usize| script.reloads[i].1.as_str();
    assert!(why(0).contains("live.onnx") && why(0).contains("refused"), "{}", why(0));
    assert!(why(1).contains("truncated") || why(1).contains("remain"), "{}", why(1));
    assert!(why(2).contains("does not have") && why(2).contains("red"), "{}", why(2));
    assert!(why(3).contains("3 labels"), "{}", why(3));
    // The old bundle ran on through every refusal: one `red` and nothing
    // else until the good bundle came; then its own label.
    assert_eq!(script.labels_at_reload[..3], [1, 1, 1]);
    assert_eq!(script.labels, vec![Some("red".into()), Some("rouge".into())]);
    assert_eq!((summary.reloads, summary.refused_reloads), (1, 3));
    assert_eq!(summary.reason, StopReason::Stopped);
    assert_eq!(summary.failed_frames, 0);
}

#[test]
fn the_reloader_ignores_an_unchanged_file_and_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("b.onnx");
    color_bundle(&bundle, COLORS, 10.0);
    let r = Reloader::spawn(&bundle, Duration::from_millis(10), LoadOptions::default(), Trust::any(), Box::new(|_: &tern_model_format::Manifest| Ok(())))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(r.try_take().is_none(), "nothing changed");
    std::fs::remove_file(&bundle).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(r.try_take().is_none(), "a missing file is not a reload");
    color_bundle(&bundle, ["a", "b", "c"], 10.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(tern_device::reload::Reloaded::Ready { classifier, .. }) = r.try_take() {
            assert_eq!(classifier.manifest().labels, ["a", "b", "c"]);
            break;
        }
        assert!(Instant::now() < deadline, "the new bundle was not loaded");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_crafted_and_a_panicking_bundle_are_refused_and_the_next_good_one_is_loaded() {
    use tern_device::reload::Reloaded;
    use tern_model_format::manifest::ResizeMode;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("live.onnx");
    color_bundle(&bundle, COLORS, 10.0);
    // A check that panics on one bundle's labels: a panic inside the
    // reload attempt, as a tract panic would be.
    let check: Check = Box::new(|m: &tern_model_format::Manifest| {
        if m.labels[0] == "boom" {
            panic!("a check that panics");
        }
        Ok(())
    });
    let r = Reloader::spawn(&bundle, Duration::from_millis(10), LoadOptions::default(), Trust::any(), check).unwrap();
    let next = |what: &str| -> Reloaded {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = r.try_take() {
                return r;
            }
            assert!(Instant::now() < deadline, "no reload attempt after writing {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let write = |name: &str, f: &dyn Fn(&Path)| {
        let tmp = dir.path().join(name);
        f(&tmp);
        std::fs::rename(&tmp, &bundle).unwrap();
    };
    // A convolution with strides of 0, which made tract panic at load.
    write("zero-strides.onnx", &|p| {
        let k = tensor("k", &[3, 3, 1, 1], &[0.5; 9]);
        let w = tensor("w", &[3, 3], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        let nodes = vec![
            node("Conv", &["input", "k"], "x", vec![attr_ints("strides", &[0, 0])]),
            node("GlobalAveragePool", &["x"], "pooled", vec![]),
        ];
        graph_bundle(p, COLORS, ResizeMode::Stretch, nodes, vec![k, w]).unwrap();
    });
    match next("the zero-stride bundle") {
        Reloaded::Refused { detail } => assert!(detail.contains("graph node `x` (Conv)") && detail.contains("strides [0, 0]"), "{detail}"),
        Reloaded::Ready { .. } => panic!("a zero-stride bundle was loaded"),
    }
    write("boom.onnx", &|p| color_bundle(p, ["boom", "b", "c"], 10.0));
    match next("the panicking bundle") {
        Reloaded::Refused { detail } => assert!(detail.contains("panicked: a check that panics"), "{detail}"),
        Reloaded::Ready { .. } => panic!("the panicking bundle was loaded"),
    }
    write("good.onnx", &|p| color_bundle(p, ["rouge", "vert", "bleu"], 10.0));
    match next("the good bundle") {
        Reloaded::Ready { classifier, .. } => assert_eq!(classifier.manifest().labels, ["rouge", "vert", "bleu"]),
        Reloaded::Refused { detail } => panic!("the good bundle was refused: {detail}"),
    }
}

/// Puts `replacements` in place one after the other: the first after 20
/// frames, each next one when the previous was refused; stops the loop once
/// a `rouge` label is seen.
struct Replacements {
    bundle: PathBuf,
    dir: PathBuf,
    next: std::vec::IntoIter<Vec<u8>>,
    frames: u64,
    stop: Arc<AtomicBool>,
    reloads: Vec<(bool, String)>,
    labels: Vec<Option<String>>,
    labels_at_reload: Vec<usize>,
    started: Instant,
}

impl Replacements {
    fn replace_next(&mut self) {
        if let Some(bytes) = self.next.next() {
            replace(&self.bundle, &self.dir, &bytes);
        }
    }
}

impl Sink for Replacements {
    fn event(&mut self, e: &Event) -> Result<()> {
        assert!(self.started.elapsed() < Duration::from_secs(60), "reload test took over a minute: {:?}", self.reloads);
        match e {
            Event::Frame { .. } => {
                self.frames += 1;
                if self.frames == 20 {
                    self.replace_next();
                }
            }
            Event::Reload { ok, detail, .. } => {
                self.reloads.push((*ok, detail.clone()));
                self.labels_at_reload.push(self.labels.len());
                if !*ok {
                    self.replace_next();
                }
            }
            Event::Label { label, .. } => {
                self.labels.push(label.clone());
                if label.as_deref() == Some("rouge") {
                    self.stop.store(true, Ordering::Relaxed);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[test]
fn with_a_trusted_key_unsigned_and_tampered_replacements_are_refused() {
    use prost::Message;
    use tern_model_format::signature::{sign_file, SecretKey};

    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate().unwrap();
    let trust = Trust::keys(vec![key.public_key().with_comment("fleet key")]);
    let bundle = dir.path().join("live.onnx");
    color_bundle(&bundle, COLORS, 10.0);
    sign_file(&bundle, &key).unwrap();
    let french = ["rouge", "vert", "bleu"];
    let unsigned = dir.path().join("unsigned.onnx");
    color_bundle(&unsigned, french, 10.0);
    let signed = dir.path().join("signed.onnx");
    color_bundle(&signed, french, 10.0);
    sign_file(&signed, &key).unwrap();
    // The signed bundle with its labels edited after signing (the graph,
    // and so its checksum, unchanged).
    let mut model = tern_model_format::onnx::ModelProto::decode(std::fs::read(&signed).unwrap().as_slice()).unwrap();
    for e in &mut model.metadata_props {
        if e.key.as_deref() == Some(tern_model_format::bundle::MANIFEST_KEY) {
            e.value = Some(e.value.take().unwrap().replace("\"rouge\"", "\"ROUGE\""));
        }
    }
    let relabelled = model.encode_to_vec();
    tern_model_format::Bundle::from_bytes(relabelled.clone()).expect("the relabelled bundle passes the checksum");

    let accept_all: Check = Box::new(|_: &tern_model_format::Manifest| Ok(()));
    let reloader =
        Reloader::spawn(&bundle, Duration::from_millis(30), LoadOptions::default(), trust.clone(), accept_all).unwrap();
    let (clf, signer) = trust.load(&bundle, &LoadOptions::default()).unwrap();
    assert_eq!(signer, Some(key.public_key().with_comment("fleet key")));
    let stop = Arc::new(AtomicBool::new(false));
    let mut script = Replacements {
        bundle: bundle.clone(),
        dir: dir.path().to_owned(),
        next: vec![std::fs::read(&unsigned).unwrap(), relabelled, std::fs::read(&signed).unwrap()].into_iter(),
        frames: 0,
        stop: stop.clone(),
        reloads: vec![],
        labels: vec![],
        labels_at_reload: vec![],
        started: Instant::now(),
    };
    let src = Synthetic::parse("red").unwrap().repeat(true).fps(Some(200.0));
    let opts = LoopOptions {
        smoothing: Smoothing::None,
        frame_events: true,
        report_every: None,
        max_frames: Some(20_000),
        ..LoopOptions::default()
    };
    let summary = runloop::run(
        move || Ok(Box::new(src) as Box<dyn FrameSource>),
        clf,
        "live.onnx",
        &opts,
        &mut [&mut script],
        Some(&reloader),
        &stop,
    )
    .unwrap();

    let oks: Vec<bool> = script.reloads.iter().map(|r| r.0).collect();
    assert_eq!(oks, [false, false, true], "{:#?}", script.reloads);
    let why = |i: usize| script.reloads[i].1.as_str();
    assert!(why(0).contains("refused") && why(0).contains("not signed"), "{}", why(0));
    assert!(why(1).contains("modified after it was signed"), "{}", why(1));
    let id = key.public_key().key_id();
    assert!(why(2).contains(&format!("signed by {id} (fleet key)")), "{}", why(2));
    // The old bundle ran on through both refusals.
    assert_eq!(script.labels_at_reload[..2], [1, 1]);
    assert_eq!(script.labels, vec![Some("red".into()), Some("rouge".into())]);
    assert_eq!((summary.reloads, summary.refused_reloads), (1, 2));
    assert_eq!(summary.reason, StopReason::Stopped);
}
