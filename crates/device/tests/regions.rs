//! Regions of interest (`--roi`) on the tiny colour bundle: frames whose
//! left and right halves differ give each region its own labels and events,
//! GPIO pins follow their own region (embedded-hal-mock), the CLI prints
//! the region in its events and refuses bad `--roi` values clearly.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction};
use support::*;
use tern_device::actions::{parse_rules_in, GpioOutputs};
use tern_device::events::{Collect, Event, FrameView, Sink};
use tern_device::roi::Region;
use tern_device::runloop::{self, LoopOptions, Summary};
use tern_device::smooth::Smoothing;
use tern_device::source::{FrameSource, ImageFiles};
use tern_device::{Classifier, LoadOptions};

const RED: [u8; 3] = [220, 20, 20];
const GREEN: [u8; 3] = [20, 200, 30];
const BLUE: [u8; 3] = [10, 20, 230];

/// Writes 40×30 PNGs whose left half (x < 20) and right half have the
/// given colours, named `00.png`, `01.png`, … in order.
fn halves(dir: &Path, frames: &[([u8; 3], [u8; 3])]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, (left, right)) in frames.iter().enumerate() {
        let img = image::RgbImage::from_fn(40, 30, |x, _| image::Rgb(if x < 20 { *left } else { *right }));
        img.save(dir.join(format!("{i:02}.png"))).unwrap();
    }
}

/// Four frames red | blue, four red | green, four green | green.
fn scene(dir: &Path) {
    let mut f = vec![(RED, BLUE); 4];
    f.extend([(RED, GREEN); 4]);
    f.extend([(GREEN, GREEN); 4]);
    halves(dir, &f);
}

fn left_right() -> Vec<Region> {
    Region::parse_all(&["left=0,0,20,30".into(), "right=20,0,20,30".into()]).unwrap()
}

fn run_regions(frames: &Path, sinks: &mut [&mut dyn Sink]) -> Summary {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    let src = ImageFiles::folder(frames).unwrap();
    let opts = LoopOptions {
        smoothing: Smoothing::None,
        newest_only: false,
        report_every: None,
        frame_events: true,
        regions: left_right(),
        ..LoopOptions::default()
    };
    let stop = AtomicBool::new(false);
    runloop::run(move || Ok(Box::new(src) as Box<dyn FrameSource>), clf, "colour.onnx", &opts, sinks, None, &stop)
        .unwrap()
}

/// (region, label, frame) of each label event.
fn label_events(events: &Collect) -> Vec<(Option<String>, Option<String>, u64)> {
    events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Label { region, label, frame, .. } => Some((region.clone(), label.clone(), *frame)),
            _ => None,
        })
        .collect()
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

/// Keeps (frame, region, image size, active label) of each [`Sink::frame`].
#[derive(Default)]
struct Views(Vec<(u64, Option<String>, (u32, u32), Option<usize>)>);

impl Sink for Views {
    fn event(&mut self, _: &Event) -> Result<()> {
        Ok(())
    }

    fn frame(&mut self, v: &FrameView<'_>) -> Result<()> {
        self.0.push((v.index, v.region.map(str::to_owned), v.image.dimensions(), v.decision.active));
        Ok(())
    }
}

#[test]
fn two_regions_get_their_own_labels_and_events() {
    let dir = tempfile::tempdir().unwrap();
    scene(dir.path());
    let mut events = Collect::default();
    let mut views = Views::default();
    let summary = run_regions(dir.path(), &mut [&mut events, &mut views]);
    assert_eq!(summary.frames, 12, "frames, not classifications, are counted");
    let mut got = label_events(&events);
    got.sort_by_key(|(r, _, f)| (r.clone(), *f));
    assert_eq!(
        got,
        [(s("left"), s("red"), 0), (s("left"), s("green"), 8), (s("right"), s("blue"), 0), (s("right"), s("green"), 4)]
    );
    // Label events are numbered across regions, without gaps.
    let seqs: Vec<u64> =
        events.events.iter().filter_map(|e| if let Event::Label { seq, .. } = e { Some(*seq) } else { None }).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    // One frame event per region and frame, naming the region.
    let frame_events: Vec<(u64, Option<String>, Option<String>)> = events
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Frame { frame, region, active, .. } => Some((*frame, region.clone(), active.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(frame_events.len(), 24);
    assert_eq!(frame_events[0], (0, s("left"), s("red")));
    assert_eq!(frame_events[1], (0, s("right"), s("blue")));
    assert_eq!(frame_events[11], (5, s("right"), s("green")));
    // Sinks see every region's decision, with the whole frame's pixels.
    let (red, green, blue) = (Some(0), Some(1), Some(2));
    assert_eq!(views.0.len(), 24);
    assert_eq!(views.0[0], (0, s("left"), (40, 30), red));
    assert_eq!(views.0[1], (0, s("right"), (40, 30), blue));
    assert_eq!(views.0[23], (11, s("right"), (40, 30), green));
}

#[test]
fn gpio_pins_follow_their_own_region() {
    let dir = tempfile::tempdir().unwrap();
    scene(dir.path());
    let regions = vec!["left".to_string(), "right".to_string()];
    let rules = parse_rules_in("left:red=17,right:blue=27,right:green=22", &regions).unwrap();
    let left_red = PinMock::new(&[
        Transaction::set(State::Low),  // initialised low
        Transaction::set(State::High), // frame 0: left is red
        Transaction::set(State::Low),  // frame 8: left turns green
    ]);
    let right_blue = PinMock::new(&[
        Transaction::set(State::Low),
        Transaction::set(State::High), // frame 0: right is blue
        Transaction::set(State::Low),  // frame 4: right turns green
    ]);
    let right_green = PinMock::new(&[
        Transaction::set(State::Low),
        Transaction::set(State::High), // frame 4
        Transaction::set(State::Low),  // the loop ends: all low
    ]);
    let pins = rules.into_iter().zip([left_red, right_blue, right_green]).collect();
    let mut gpio = GpioOutputs::new(pins).unwrap();
    let mut events = Collect::default();
    run_regions(dir.path(), &mut [&mut gpio, &mut events]);
    assert_eq!(gpio.states(), [(17, false), (27, false), (22, false)]);
    for mut pin in gpio.into_pins() {
        pin.done();
    }
}

fn tern_device(args: &[&OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern-device")).args(args).output().expect("run tern-device")
}

#[test]
fn the_cli_runs_regions_and_refuses_bad_ones() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let frames = dir.path().join("frames");
    scene(&frames);
    let base = [OsStr::new("run"), bundle.as_os_str(), OsStr::new("--folder"), frames.as_os_str()];
    let with = |extra: &[&str]| -> std::process::Output {
        let mut args: Vec<&OsStr> = base.to_vec();
        args.extend([OsStr::new("--smoothing"), OsStr::new("none"), OsStr::new("--no-reload")]);
        args.extend(extra.iter().map(OsStr::new));
        tern_device(&args)
    };
    // The right region reaches past the frame: clamped, with a warning.
    let out = with(&["--roi", "left=0,0,20,30", "--roi", "right=20,0,100,30"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("right=20,0,100,30 reaches past the 40x30 frame; classifying 20,0,20,30"), "{stderr}");
    let labels: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "label")
        .map(|v| (v["region"].as_str().unwrap().to_owned(), v["label"].as_str().unwrap().to_owned()))
        .collect();
    let want = [("left", "red"), ("right", "blue"), ("right", "green"), ("left", "green")];
    assert_eq!(labels, want.map(|(r, l)| (r.to_owned(), l.to_owned())));
    // Without --roi, label events have no region field at all.
    let out = with(&[]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("region"));

    let cases: &[(&[&str], &str)] = &[
        (&["--roi", "left"], "expected NAME=x,y,w,h"),
        (&["--roi", "a/b=0,0,1,1"], "A-Z a-z 0-9 _ -"),
        (&["--roi", "left=0,0,0,30"], "at least 1 pixel"),
        (&["--roi", "left=0,0,20"], "four numbers"),
        (&["--roi", "left=-5,0,20,30"], "not a whole number"),
        (&["--roi", "a=0,0,1,1", "--roi", "a=1,1,1,1"], "used twice"),
        (&["--roi", "left=0,0,20,30", "--gpio", "red=17"], "REGION:LABEL=LINE"),
        (&["--roi", "left=0,0,20,30", "--gpio", "middle:red=17"], "no region \"middle\""),
        (&["--roi", "left=0,0,20,30", "--gpio", "left:purple=17"], "purple"),
        (&["--ha-discovery"], "--mqtt"),
    ];
    for (extra, needle) in cases {
        let out = with(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
}
