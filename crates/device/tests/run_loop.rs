//! The capture → classify → decide → act loop on a tiny real bundle (a
//! colour classifier run by tract): image-folder and synthetic sources,
//! smoothing against flicker, GPIO pins through embedded-hal-mock, frame
//! dropping, a lost source reopened, and the CLI.

mod support;

use std::ffi::OsStr;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Result;
use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction};
use support::*;
use tern_device::actions::{GpioOutputs, PinRule};
use tern_device::events::{Collect, Event, FrameView, Sink};
use tern_device::runloop::{self, Backoff, LoopOptions, StopReason, Summary};
use tern_device::smooth::{Decision, Hysteresis, Smoothing};
use tern_device::source::{FrameSource, LoseAfter, Synthetic};
use tern_device::{Classifier, LoadOptions};

fn opts(smoothing: Smoothing) -> LoopOptions {
    LoopOptions {
        smoothing,
        thresholds: Hysteresis::default(),
        newest_only: false,
        max_frames: None,
        report_every: None,
        frame_events: true,
        reopen: Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(40), attempts: Some(10) },
        log: false,
        slow: None,
        regions: Vec::new(),
    }
}

fn run_synthetic(script: &str, o: &LoopOptions, sinks: &mut [&mut dyn Sink]) -> Summary {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    let src = Synthetic::parse(script).unwrap();
    let stop = AtomicBool::new(false);
    runloop::run(move || Ok(Box::new(src) as Box<dyn FrameSource>), clf, "colour.onnx", o, sinks, None, &stop).unwrap()
}

fn some(v: &[&str]) -> Vec<Option<String>> {
    v.iter().map(|s| Some(s.to_string())).collect()
}

#[test]
fn synthetic_source_gives_the_expected_labels() {
    let mut events = Collect::default();
    let s = run_synthetic("red*5,green*5,blue*5", &opts(Smoothing::None), &mut [&mut events]);
    assert_eq!(s.frames, 15);
    assert_eq!(s.reason, StopReason::SourceEnded);
    let per_frame = events.active_per_frame();
    let want: Vec<&str> = ["red"; 5].iter().chain(&["green"; 5]).chain(&["blue"; 5]).copied().collect();
    assert_eq!(per_frame, some(&want));
    assert_eq!(events.labels(), some(&["red", "green", "blue"]));
    // Label events are numbered from 1 and say what came before.
    let seqs: Vec<(u64, Option<String>)> = events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Label { seq, previous, .. } => Some((*seq, previous.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![(1, None), (2, Some("red".into())), (3, Some("green".into()))]);
    assert!(matches!(events.events.first(), Some(Event::Started { .. })));
    assert!(matches!(events.events.last(), Some(Event::Stopped { frames: 15, .. })));
}

/// Keeps what [`Sink::frame`] shows of each frame.
#[derive(Default)]
struct Frames {
    seen: Vec<(u64, (u32, u32), Vec<String>, usize, Option<usize>, bool)>,
}

impl Sink for Frames {
    fn event(&mut self, _e: &Event) -> Result<()> {
        Ok(())
    }

    fn frame(&mut self, v: &FrameView<'_>) -> Result<()> {
        assert_eq!(v.probabilities.len(), v.smoothed.len());
        let sum: f32 = v.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-3, "probabilities sum to {sum}");
        self.seen.push((
            v.index,
            v.image.dimensions(),
            v.labels.to_vec(),
            v.probabilities.len(),
            v.decision.active,
            v.region.is_none(),
        ));
        Ok(())
    }
}

#[test]
fn sinks_see_every_classified_frame_with_its_pixels_and_probabilities() {
    let mut frames = Frames::default();
    let s = run_synthetic("red*3,blue*2", &opts(Smoothing::None), &mut [&mut frames]);
    assert_eq!(s.frames, 5);
    let labels: Vec<String> = ["red", "green", "blue"].iter().map(|s| s.to_string()).collect();
    let index = |l: &str| labels.iter().position(|x| x == l);
    let want: Vec<_> = ["red", "red", "red", "blue", "blue"]
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64, (64, 48), labels.clone(), 3, index(l), true))
        .collect();
    assert_eq!(frames.seen, want);
}

#[test]
fn smoothing_suppresses_a_one_frame_flicker() {
    let script = "red*8,green,red*8";
    let mut raw = Collect::default();
    run_synthetic(script, &opts(Smoothing::None), &mut [&mut raw]);
    assert_eq!(raw.labels(), some(&["red", "green", "red"]), "without smoothing the flicker shows");
    for smoothing in [Smoothing::Ema { alpha: 0.4 }, Smoothing::Majority { k: 3 }] {
        let mut smoothed = Collect::default();
        run_synthetic(script, &opts(smoothing), &mut [&mut smoothed]);
        assert_eq!(smoothed.labels(), some(&["red"]), "{smoothing:?}");
        assert!(smoothed.active_per_frame().iter().all(|a| a.as_deref() == Some("red")), "{smoothing:?}");
    }
    // A lasting change still goes through.
    let mut lasting = Collect::default();
    run_synthetic("red*8,green*8", &opts(Smoothing::Majority { k: 3 }), &mut [&mut lasting]);
    assert_eq!(lasting.labels(), some(&["red", "green"]));
}

#[test]
fn gpio_pins_follow_the_active_label() {
    // red → line 17, blue → line 27 once confidence >= 0.9.
    let red = PinMock::new(&[
        Transaction::set(State::Low),  // initialised low
        Transaction::set(State::High), // red appears
        Transaction::set(State::Low),  // blue takes over
        Transaction::set(State::High), // red again
        Transaction::set(State::Low),  // loop end: all low
    ]);
    let blue =
        PinMock::new(&[Transaction::set(State::Low), Transaction::set(State::High), Transaction::set(State::Low)]);
    let rules = [
        PinRule { region: None, label: "red".into(), line: 17, min_confidence: 0.0 },
        PinRule { region: None, label: "blue".into(), line: 27, min_confidence: 0.9 },
    ];
    let mut gpio = GpioOutputs::new(vec![(rules[0].clone(), red), (rules[1].clone(), blue)]).unwrap();
    let mut events = Collect::default();
    run_synthetic("red*4,blue*4,green*4,red*4", &opts(Smoothing::None), &mut [&mut gpio, &mut events]);
    assert_eq!(events.labels(), some(&["red", "blue", "green", "red"]));
    for mut pin in gpio.into_pins() {
        pin.done();
    }
}

#[test]
fn the_minimum_confidence_keeps_a_pin_off() {
    // Blue frames give ~0.99; a minimum of 0.999 9 is never reached.
    let blue = PinMock::new(&[Transaction::set(State::Low)]);
    let rule = PinRule { region: None, label: "blue".into(), line: 27, min_confidence: 0.9999 };
    let mut gpio = GpioOutputs::new(vec![(rule, blue)]).unwrap();
    let mut events = Collect::default();
    run_synthetic("blue*6", &opts(Smoothing::None), &mut [&mut gpio, &mut events]);
    assert_eq!(events.labels(), some(&["blue"]), "the label is active, only the pin stays off");
    for mut pin in gpio.into_pins() {
        pin.done();
    }
}

/// Makes inference look slow.
struct Slow(Duration);

impl Sink for Slow {
    fn event(&mut self, _: &Event) -> Result<()> {
        Ok(())
    }

    fn decision(&mut self, _: &Decision, _: &[String]) -> Result<()> {
        std::thread::sleep(self.0);
        Ok(())
    }
}

#[test]
fn the_newest_frame_wins_when_inference_is_slower_than_capture() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    // 400 fps of capture, ~20 ms per decision: most frames must be dropped,
    // and the frames processed must be fresh.
    let src = Synthetic::parse("red*20,blue*20").unwrap().repeat(true).fps(Some(400.0));
    let mut o = opts(Smoothing::None);
    o.newest_only = true;
    o.max_frames = Some(25);
    let mut events = Collect::default();
    let mut slow = Slow(Duration::from_millis(20));
    let stop = AtomicBool::new(false);
    let s = runloop::run(
        move || Ok(Box::new(src) as Box<dyn FrameSource>),
        clf,
        "colour.onnx",
        &o,
        &mut [&mut slow, &mut events],
        None,
        &stop,
    )
    .unwrap();
    assert_eq!(s.frames, 25);
    assert!(s.dropped > s.frames, "{s:?}");
    assert!(s.captured >= s.frames + s.dropped, "{s:?}");
    let frames: Vec<(u64, f64)> = events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Frame { frame, age_ms, .. } => Some((*frame, *age_ms)),
            _ => None,
        })
        .collect();
    assert!(frames.windows(2).all(|w| w[1].0 > w[0].0), "frames go forward");
    assert!(frames.windows(2).any(|w| w[1].0 > w[0].0 + 1), "frames were skipped: {frames:?}");
    // Frame-by-frame at this speed would reach 25 frames × 20 ms behind;
    // newest-first keeps each frame about one decision old at most.
    let mean_age = frames.iter().map(|f| f.1).sum::<f64>() / frames.len() as f64;
    assert!(mean_age < 60.0, "mean frame age {mean_age:.1} ms");
}

#[test]
fn a_lost_source_is_reopened_with_back_off_and_the_loop_goes_on() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    let src = Synthetic::parse("green*30").unwrap().lose_after(Some(LoseAfter { frames: 10, failed_reopens: 3 }));
    let mut events = Collect::default();
    let stop = AtomicBool::new(false);
    let s = runloop::run(
        move || Ok(Box::new(src) as Box<dyn FrameSource>),
        clf,
        "colour.onnx",
        &opts(Smoothing::None),
        &mut [&mut events],
        None,
        &stop,
    )
    .unwrap();
    assert_eq!(s.frames, 30, "{s:?}");
    assert_eq!(s.reopens, 1);
    let states: Vec<String> = events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Source { state, .. } => Some(state.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(states, ["lost", "lost", "lost", "lost", "reopened", "ended"]);
    let details: Vec<&str> = events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Source { detail, .. } => Some(detail.as_str()),
            _ => None,
        })
        .collect();
    // The delays double: 10, 20, 40 (max), 40 ms.
    assert!(details[1].contains("next in 0.0 s") && details[3].contains("attempt 3"), "{details:?}");
    assert_eq!(events.labels(), some(&["green"]), "the label survives the outage");
}

#[test]
fn a_source_that_stays_lost_is_given_up_after_the_attempts() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    let src = Synthetic::parse("red*30").unwrap().lose_after(Some(LoseAfter { frames: 5, failed_reopens: 100 }));
    let mut o = opts(Smoothing::None);
    o.reopen.attempts = Some(3);
    let stop = AtomicBool::new(false);
    let mut events = Collect::default();
    let s = runloop::run(
        move || Ok(Box::new(src) as Box<dyn FrameSource>),
        clf,
        "colour.onnx",
        &o,
        &mut [&mut events],
        None,
        &stop,
    )
    .unwrap();
    assert_eq!(s.frames, 5);
    assert_eq!(s.reason, StopReason::SourceGaveUp { attempts: 3 });
    assert!(s.reason.to_string().contains("3 reopen attempts failed"), "{}", s.reason);
}

#[test]
fn a_source_that_cannot_open_is_an_error() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    let stop = AtomicBool::new(false);
    let err = runloop::run(
        || Err(anyhow::anyhow!("no such camera")),
        clf,
        "colour.onnx",
        &opts(Smoothing::None),
        &mut [],
        None,
        &stop,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no such camera"));
}

fn tern_device(args: &[&OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern-device")).args(args).output().expect("run tern-device")
}

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

#[test]
fn run_on_an_image_folder_gives_the_expected_labels_and_skips_a_corrupt_file() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let colours = [("00", [200, 20, 20]), ("01", [210, 40, 30]), ("02", [20, 180, 30]), ("04", [10, 20, 230])];
    for (name, c) in colours {
        solid_png(&frames.join(format!("{name}.png")), c);
    }
    std::fs::write(frames.join("03.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    std::fs::write(frames.join("notes.txt"), "not an image").unwrap();
    let out = tern_device(&[
        OsStr::new("run"),
        bundle.as_os_str(),
        OsStr::new("--folder"),
        frames.as_os_str(),
        OsStr::new("--smoothing"),
        OsStr::new("none"),
        OsStr::new("--every-frame"),
        OsStr::new("--no-reload"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines = json_lines(&out.stdout);
    let of = |kind: &str| -> Vec<&serde_json::Value> { lines.iter().filter(|l| l["event"] == kind).collect() };
    let frames: Vec<(String, String)> = of("frame")
        .iter()
        .map(|f| {
            let name = f["name"].as_str().unwrap();
            let file = std::path::Path::new(name).file_name().unwrap().to_string_lossy().into_owned();
            (file, f["active"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    let want = [("00.png", "red"), ("01.png", "red"), ("02.png", "green"), ("04.png", "blue")];
    assert_eq!(frames, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
    let labels: Vec<&str> = of("label").iter().map(|l| l["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["red", "green", "blue"]);
    let bad = of("source");
    assert!(
        bad.iter().any(|s| s["state"] == "bad-frame" && s["detail"].as_str().unwrap().contains("03.png")),
        "{bad:?}"
    );
    assert!(stderr.contains("03.png"), "a clear log line: {stderr}");
    assert_eq!(of("stopped").len(), 1);
}

#[test]
fn run_refuses_bad_arguments_clearly() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let b = bundle.as_os_str();
    let syn = OsStr::new("--synthetic");
    let red = OsStr::new("red");
    let cases: &[(&[&OsStr], &str)] = &[
        (&[OsStr::new("run"), b, syn, red, OsStr::new("--gpio"), OsStr::new("purple=4")], "purple"),
        (&[OsStr::new("run"), b, syn, red, OsStr::new("--on"), OsStr::new("0.3")], "off <= on"),
        (&[OsStr::new("run"), b, syn, OsStr::new("mauve")], "mauve"),
        (&[OsStr::new("run"), b, syn, red, OsStr::new("--mqtt"), OsStr::new("http://x/y")], "mqtt://"),
        (&[OsStr::new("run"), b, OsStr::new("--folder"), OsStr::new("/nonexistent/frames")], "/nonexistent/frames"),
        (&[OsStr::new("run"), OsStr::new("/nonexistent/b.onnx"), syn, red], "/nonexistent/b.onnx"),
    ];
    for (args, needle) in cases {
        let out = tern_device(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn camera_and_gpio_say_when_they_are_not_compiled_in() {
    let out = tern_device(&[OsStr::new("cameras")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The device nodes are listed in every build (tests/cameras.rs).
    assert!(out.status.success(), "{stderr}");
    if !cfg!(feature = "camera") {
        assert!(String::from_utf8_lossy(&out.stdout).contains("without camera support"));
        let (_dir, bundle) = color_bundle_in_tempdir();
        let out = tern_device(&[OsStr::new("run"), bundle.as_os_str(), OsStr::new("--camera"), OsStr::new("0")]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("without camera support"));
    }
    if !cfg!(feature = "gpio") {
        let (_dir, bundle) = color_bundle_in_tempdir();
        let out = tern_device(&[
            OsStr::new("run"),
            bundle.as_os_str(),
            OsStr::new("--synthetic"),
            OsStr::new("red"),
            OsStr::new("--gpio"),
            OsStr::new("red=17"),
        ]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("without GPIO support"));
    }
}

#[test]
fn the_watchdog_reports_and_counts_slow_inferences() {
    let mut events = Collect::default();
    // Every inference takes longer than a nanosecond; none takes an hour.
    let fast = LoopOptions { slow: Some(Duration::from_secs(3600)), ..opts(Smoothing::None) };
    let s = run_synthetic("red*3", &fast, &mut [&mut events]);
    assert_eq!((s.frames, s.slow_frames), (3, 0));
    let slow = LoopOptions { slow: Some(Duration::from_nanos(1)), report_every: Some(Duration::ZERO), ..opts(Smoothing::None) };
    let mut events = Collect::default();
    let s = run_synthetic("red*3", &slow, &mut [&mut events]);
    assert_eq!((s.frames, s.slow_frames), (3, 3));
    let flagged: Vec<u64> = events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SlowFrame { frame, latency_ms, limit_ms, .. } if latency_ms > limit_ms => Some(*frame),
            _ => None,
        })
        .collect();
    assert_eq!(flagged, [0, 1, 2]);
    let counted: u64 = events.events.iter().map(|e| if let Event::Stats { slow, .. } = e { *slow } else { 0 }).sum();
    assert_eq!(counted, 3);
    assert!(Event::SlowFrame { ts_ms: 0, frame: 0, latency_ms: 2.0, limit_ms: 1.0 }.to_json().contains("\"event\":\"slow-frame\""));
}
