//! A soak: 10 000 synthetic frames through the whole loop (capture thread,
//! preprocessing, tract, smoothing, thresholds, events serialised as JSON)
//! with flat memory: the resident set at the end is within 5 % of the
//! resident set after a warm-up of 1 000 frames.

mod support;

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use support::*;
use tern_device::events::{Event, JsonLines, Sink};
use tern_device::runloop::{self, LoopOptions};
use tern_device::smooth::{Hysteresis, Smoothing};
use tern_device::source::{FrameSource, Synthetic};
use tern_device::{Classifier, LoadOptions};

const FRAMES: u64 = 10_000;
const WARM_UP: u64 = 1_000;

#[derive(Default)]
struct Rss {
    frames: u64,
    labels: u64,
    after_warm_up: u64,
    peak_after_warm_up: u64,
}

impl Sink for Rss {
    fn event(&mut self, e: &Event) -> Result<()> {
        match e {
            Event::Frame { .. } => {
                self.frames += 1;
                if self.frames == WARM_UP {
                    self.after_warm_up = rss_bytes();
                }
                if self.frames > WARM_UP && self.frames % 500 == 0 {
                    self.peak_after_warm_up = self.peak_after_warm_up.max(rss_bytes());
                }
            }
            Event::Label { .. } => self.labels += 1,
            _ => {}
        }
        Ok(())
    }
}

#[test]
fn ten_thousand_frames_with_flat_memory() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let clf = Classifier::load(&bundle, &LoadOptions::default()).unwrap();
    let src = Synthetic::parse("red*40,green*40,blue*40").unwrap().size(160, 120).repeat(true).limit(Some(FRAMES));
    let opts = LoopOptions {
        smoothing: Smoothing::Majority { k: 5 },
        // A colour change wins the vote at 3 of 5 frames (confidence ~0.6)
        // and switches straight over: one label event per change.
        thresholds: Hysteresis { on: 0.5, off: 0.3 },
        newest_only: false,
        frame_events: true,
        report_every: Some(std::time::Duration::from_millis(200)),
        ..LoopOptions::default()
    };
    let mut rss = Rss::default();
    let mut json = JsonLines::new(std::io::sink(), true);
    let stop = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let s = runloop::run(
        move || Ok(Box::new(src) as Box<dyn FrameSource>),
        clf,
        "colour.onnx",
        &opts,
        &mut [&mut rss, &mut json],
        None,
        &stop,
    )
    .unwrap();
    let end = rss_bytes();
    let took = started.elapsed();
    assert_eq!(s.frames, FRAMES, "{s:?}");
    assert_eq!(s.dropped, 0);
    // 250 colour changes, each one label event after smoothing.
    assert_eq!(rss.labels, FRAMES / 40, "label events");
    let warm = rss.after_warm_up as f64;
    let grew = (end as f64 - warm) / warm;
    eprintln!(
        "soak: {FRAMES} frames in {:.1} s ({:.0} fps); RSS after {WARM_UP} frames {:.1} MiB, \
         peak after {:.1} MiB, at the end {:.1} MiB ({:+.2} %)",
        took.as_secs_f64(),
        FRAMES as f64 / took.as_secs_f64(),
        warm / 1048576.0,
        rss.peak_after_warm_up as f64 / 1048576.0,
        end as f64 / 1048576.0,
        grew * 100.0
    );
    assert!(grew.abs() <= 0.05, "RSS moved {:+.2} % between frame {WARM_UP} and the end", grew * 100.0);
}
