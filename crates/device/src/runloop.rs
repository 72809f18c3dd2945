//! The capture → classify → decide → act loop.
//!
//! A capture thread reads the [`FrameSource`] and hands frames to the
//! inference thread (the caller's) through a one-frame slot: when
//! inference is slower than capture, the newest frame replaces the waiting
//! one (counted as dropped), so the decision follows what the camera sees
//! now rather than lagging behind. Finite sources (folders, files, tests)
//! can instead be processed frame by frame.
//!
//! A source that is lost (an unplugged camera) is reopened with
//! exponential back-off while the loop keeps running; a replaced bundle is
//! swapped in between two frames ([`crate::reload`]).
//!
//! With regions of interest ([`LoopOptions::regions`]) each frame is
//! cropped to every region and each crop is classified, smoothed and gated
//! on its own: one decision per region, label events that name the region,
//! and [`Sink::frame`] once per region. [`Sink::decision`] sees whole-frame
//! decisions only, so it is not called when regions are set.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::engine::Classifier;
use crate::events::{escape_for_terminal, now_ms, Event, FrameView, Sink};
use crate::reload::{sleep_unless, Reloaded, Reloader};
use crate::roi::{Fit, Region};
use crate::smooth::{argmax, Gate, Hysteresis, Smoother, Smoothing};
use crate::source::{Frame, FrameSource, SourceError};

/// Reopen delays after a source is lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Longest delay; each failure doubles the delay up to this.
    pub max: Duration,
    /// Give up after this many failed reopens (`None`: never).
    pub attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(500), max: Duration::from_secs(30), attempts: None }
    }
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Smoothing over time.
    pub smoothing: Smoothing,
    /// Thresholds of the active label.
    pub thresholds: Hysteresis,
    /// Process only the newest frame (live sources); otherwise every frame
    /// in order, the capture thread waiting for inference.
    pub newest_only: bool,
    /// Stop after this many processed frames.
    pub max_frames: Option<u64>,
    /// Emit a `stats` event this often.
    pub report_every: Option<Duration>,
    /// Emit a `frame` event for every frame.
    pub frame_events: bool,
    /// Reopen delays for a lost source.
    pub reopen: Backoff,
    /// Also write a human-readable line to stderr for source, reload and
    /// stats events.
    pub log: bool,
    /// An inference (preprocessing + plan) slower than this is reported
    /// by a `slow-frame` event and counted (`None`: no watchdog).
    pub slow: Option<Duration>,
    /// Regions of interest, each classified on its own (empty: the whole
    /// frame).
    pub regions: Vec<Region>,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            smoothing: Smoothing::Ema { alpha: 0.5 },
            thresholds: Hysteresis::default(),
            newest_only: true,
            max_frames: None,
            report_every: Some(Duration::from_secs(10)),
            frame_events: false,
            reopen: Backoff::default(),
            log: false,
            slow: None,
            regions: Vec::new(),
        }
    }
}

/// Why a loop stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopReason {
    /// The caller's stop flag was set (SIGINT, SIGTERM).
    #[default]
    Stopped,
    /// `max_frames` frames were processed.
    FrameLimit,
    /// A finite source has no more frames.
    SourceEnded,
    /// The source was lost and every allowed reopen attempt failed.
    SourceGaveUp {
        /// Failed reopen attempts.
        attempts: u32,
    },
}

impl StopReason {
    /// Whether the loop stopped on a failure rather than by design.
    pub fn is_failure(&self) -> bool {
        matches!(self, StopReason::SourceGaveUp { .. })
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Stopped => f.write_str("stopped"),
            StopReason::FrameLimit => f.write_str("frame limit reached"),
            StopReason::SourceEnded => f.write_str("the source ended"),
            StopReason::SourceGaveUp { attempts } => {
                write!(f, "the source was lost and {attempts} reopen attempts failed")
            }
        }
    }
}

/// What a finished loop did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Frames classified.
    pub frames: u64,
    /// Frames captured.
    pub captured: u64,
    /// Frames skipped because a newer one was ready.
    pub dropped: u64,
    /// Frames the source could not decode.
    pub bad_frames: u64,
    /// Times the source was reopened after being lost.
    pub reopens: u64,
    /// Bundles swapped in.
    pub reloads: u64,
    /// Replaced bundles refused.
    pub refused_reloads: u64,
    /// Frames whose inference failed.
    pub failed_frames: u64,
    /// Frames whose inference took longer than [`LoopOptions::slow`].
    pub slow_frames: u64,
    /// Label events emitted.
    pub label_events: u64,
    /// Why the loop stopped.
    pub reason: StopReason,
}

#[derive(Default)]
struct Shared {
    frames: VecDeque<Frame>,
    notes: Vec<Event>,
    /// Set when the capture thread has finished, with the reason.
    done: Option<StopReason>,
    captured: u64,
    dropped: u64,
    bad_frames: u64,
    reopens: u64,
}

struct Slot {
    state: Mutex<Shared>,
    ready: Condvar,
    stop: AtomicBool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic in the other thread poisons the lock; the data is still
        // consistent counters and frames.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, e: Event) {
        self.lock().notes.push(e);
        self.ready.notify_all();
    }
}

/// Frames waiting in frame-by-frame mode.
const QUEUE: usize = 2;

/// Runs the loop until the source ends, `max_frames` is reached, the source
/// is given up, or `stop` is set.
///
/// `open` runs on the capture thread (so the source need not be `Send`);
/// its error is returned before anything else happens.
pub fn run<F>(
    open: F,
    mut classifier: Classifier,
    bundle: &str,
    opts: &LoopOptions,
    sinks: &mut [&mut dyn Sink],
    reloader: Option<&Reloader>,
    stop: &AtomicBool,
) -> Result<Summary>
where
    F: FnOnce() -> Result<Box<dyn FrameSource>> + Send + 'static,
{
    let slot =
        Arc::new(Slot { state: Mutex::new(Shared::default()), ready: Condvar::new(), stop: AtomicBool::new(false) });
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<String>>();
    let capture = {
        let slot = slot.clone();
        let (newest_only, backoff) = (opts.newest_only, opts.reopen);
        std::thread::Builder::new()
            .name("tern-capture".into())
            .spawn(move || capture_thread(open, &slot, newest_only, backoff, opened_tx))
            .context("cannot start the capture thread")?
    };
    let described = match opened_rx.recv() {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            let _ = capture.join();
            return Err(e);
        }
        Err(_) => {
            let _ = capture.join();
            return Err(anyhow!("the capture thread stopped before opening the source"));
        }
    };

    let mut l = Looper {
        opts,
        tracks: Track::all(opts),
        summary: Summary::default(),
        period: Period::new(),
        seq: 0,
    };
    l.emit(
        sinks,
        Event::Started {
            ts_ms: now_ms(),
            bundle: bundle.to_owned(),
            source: described,
            labels: classifier.manifest().labels.clone(),
        },
    );
    let mut last_report = Instant::now();
    let reason = loop {
        if stop.load(Ordering::Relaxed) {
            break StopReason::Stopped;
        }
        let (frame, notes, done) = {
            let mut s = slot.lock();
            if s.frames.is_empty() && s.notes.is_empty() && s.done.is_none() {
                s = slot.ready.wait_timeout(s, Duration::from_millis(50)).map_or_else(|p| p.into_inner().0, |r| r.0);
            }
            let frame = s.frames.pop_front();
            let notes = std::mem::take(&mut s.notes);
            let done = if s.frames.is_empty() { s.done.clone() } else { None };
            (frame, notes, done)
        };
        slot.ready.notify_all();
        for n in notes {
            l.emit(sinks, n);
        }
        if let Some(r) = reloader {
            if let Some(result) = r.try_take() {
                l.reload(sinks, r.path(), result, &mut classifier);
            }
        }
        if let Some(frame) = frame {
            l.frame(sinks, &mut classifier, frame);
        }
        if let Some(every) = opts.report_every {
            if last_report.elapsed() >= every {
                let (captured, dropped) = {
                    let s = slot.lock();
                    (s.captured, s.dropped)
                };
                let e = l.period.report(captured, dropped, last_report.elapsed());
                l.emit(sinks, e);
                last_report = Instant::now();
            }
        }
        if opts.max_frames.is_some_and(|m| l.summary.frames >= m) {
            break StopReason::FrameLimit;
        }
        if let Some(d) = done {
            break d;
        }
    };

    slot.stop.store(true, Ordering::Relaxed);
    slot.ready.notify_all();
    if capture.join().is_err() {
        eprintln!("tern-device: the capture thread panicked");
    }
    let s = slot.lock();
    l.summary.captured = s.captured;
    l.summary.dropped = s.dropped;
    l.summary.bad_frames = s.bad_frames;
    l.summary.reopens = s.reopens;
    drop(s);
    l.summary.reason = reason;
    let stopped = Event::Stopped {
        ts_ms: now_ms(),
        frames: l.summary.frames,
        dropped: l.summary.dropped,
        reason: reason.to_string(),
    };
    l.emit(sinks, stopped);
    for sink in sinks.iter_mut() {
        if let Err(e) = sink.finish() {
            eprintln!("tern-device: warning: {e:#}");
        }
    }
    Ok(l.summary)
}

/// The whole frame, or one region, with its own smoothing and hysteresis.
struct Track {
    region: Option<Region>,
    smoother: Smoother,
    gate: Gate,
    /// The frame size the region was last checked against.
    checked: Option<(u32, u32)>,
}

impl Track {
    fn all(opts: &LoopOptions) -> Vec<Track> {
        let track = |region| Track {
            region,
            smoother: Smoother::new(opts.smoothing),
            gate: Gate::new(opts.thresholds),
            checked: None,
        };
        if opts.regions.is_empty() {
            vec![track(None)]
        } else {
            opts.regions.iter().cloned().map(|r| track(Some(r))).collect()
        }
    }

    /// Warns once per frame size when the region does not lie inside it.
    fn check(&mut self, size: (u32, u32)) {
        let Some(r) = &self.region else { return };
        if self.checked == Some(size) {
            return;
        }
        self.checked = Some(size);
        match r.fit(size.0, size.1) {
            Fit::Inside(_) => {}
            Fit::Clamped((x, y, w, h)) => eprintln!(
                "tern-device: warning: region {r} reaches past the {}x{} frame; classifying {x},{y},{w},{h}",
                size.0, size.1
            ),
            Fit::Outside => eprintln!(
                "tern-device: warning: region {r} lies outside the {}x{} frame; it is not classified",
                size.0, size.1
            ),
        }
    }
}

/// The frame that a classification is of.
struct Seen<'a> {
    index: u64,
    name: Option<&'a str>,
    image: &'a Arc<image::RgbImage>,
    age: Duration,
}

struct Looper<'a> {
    opts: &'a LoopOptions,
    tracks: Vec<Track>,
    summary: Summary,
    period: Period,
    seq: u64,
}

impl Looper<'_> {
    fn emit(&mut self, sinks: &mut [&mut dyn Sink], e: Event) {
        if self.opts.log {
            log_line(&e);
        }
        for s in sinks.iter_mut() {
            if let Err(err) = s.event(&e) {
                eprintln!("tern-device: warning: {err:#}");
            }
        }
    }

    fn frame(&mut self, sinks: &mut [&mut dyn Sink], clf: &mut Classifier, frame: Frame) {
        let image = Arc::new(frame.image);
        let mut tracks = std::mem::take(&mut self.tracks);
        // (track, probabilities, latency) of each classification.
        let mut done = Vec::with_capacity(tracks.len());
        let mut failed = false;
        for (i, track) in tracks.iter_mut().enumerate() {
            track.check(image.dimensions());
            let t0 = Instant::now();
            let out = match &track.region {
                None => clf.classify_rgb8(&image),
                Some(r) => {
                    let Some(crop) = r.crop(&image) else { continue };
                    clf.classify_rgb8(&crop)
                }
            };
            let latency = t0.elapsed();
            match out {
                Ok(o) => done.push((i, clf.label_probabilities(&o), latency)),
                Err(e) => {
                    failed = true;
                    let e = format!("{e:#}");
                    let region = track.region.as_ref().map(|r| format!(" region {}", r.name)).unwrap_or_default();
                    eprintln!(
                        "tern-device: warning: frame {}{region}: inference failed: {}",
                        frame.index,
                        escape_for_terminal(&e)
                    );
                }
            }
        }
        self.summary.failed_frames += u64::from(failed);
        if !done.is_empty() {
            let latency: Duration = done.iter().map(|d| d.2).sum();
            let age = frame.captured.elapsed();
            self.summary.frames += 1;
            self.period.add(latency, age);
            if let Some(limit) = self.opts.slow.filter(|l| latency > *l) {
                self.summary.slow_frames += 1;
                self.period.slow += 1;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let (latency_ms, limit_ms) = (ms(latency), ms(limit));
                self.emit(sinks, Event::SlowFrame { ts_ms: now_ms(), frame: frame.index, latency_ms, limit_ms });
            }
            let seen = Seen { index: frame.index, name: frame.name.as_deref(), image: &image, age };
            for (i, probs, latency) in done {
                self.decide(sinks, clf, &mut tracks[i], &seen, &probs, latency);
            }
        }
        self.tracks = tracks;
    }

    /// Smooths and gates one classification of the whole frame or of one
    /// region, and hands the decision and its events to the sinks.
    fn decide(
        &mut self,
        sinks: &mut [&mut dyn Sink],
        clf: &Classifier,
        track: &mut Track,
        seen: &Seen<'_>,
        probs: &[f32],
        latency: Duration,
    ) {
        let Seen { index, name, image, age } = *seen;
        let labels = &clf.manifest().labels;
        let smoothed = track.smoother.update(probs);
        let d = track.gate.update(&smoothed);
        let region = track.region.as_ref().map(|r| r.name.as_str());
        if region.is_none() {
            for s in sinks.iter_mut() {
                if let Err(e) = s.decision(&d, labels) {
                    eprintln!("tern-device: warning: {e:#}");
                }
            }
        }
        let view = FrameView {
            index,
            name,
            image,
            region,
            labels,
            probabilities: probs,
            smoothed: &smoothed,
            decision: &d,
            latency,
            ts_ms: now_ms(),
        };
        for s in sinks.iter_mut() {
            if let Err(e) = s.frame(&view) {
                eprintln!("tern-device: warning: {e:#}");
            }
        }
        let label = |i: Option<usize>| i.and_then(|i| labels.get(i)).cloned();
        let mut events = Vec::new();
        if d.changed {
            let snapshot = sinks.iter_mut().find_map(|s| s.snapshot(&view));
            self.seq += 1;
            self.summary.label_events += 1;
            events.push(Event::Label {
                ts_ms: now_ms(),
                seq: self.seq,
                frame: index,
                region: region.map(str::to_owned),
                label: label(d.active),
                confidence: d.confidence,
                previous: label(d.previous),
                snapshot,
            });
        }
        if self.opts.frame_events {
            let top = argmax(probs);
            events.push(Event::Frame {
                ts_ms: now_ms(),
                frame: index,
                name: name.map(str::to_owned),
                region: region.map(str::to_owned),
                top: label(top).unwrap_or_default(),
                probability: top.map_or(0.0, |i| probs[i]),
                active: label(d.active),
                confidence: d.confidence,
                latency_ms: latency.as_secs_f64() * 1e3,
                age_ms: age.as_secs_f64() * 1e3,
            });
        }
        for e in events {
            self.emit(sinks, e);
        }
    }

    fn reload(&mut self, sinks: &mut [&mut dyn Sink], path: &std::path::Path, r: Reloaded, clf: &mut Classifier) {
        let bundle = path.display().to_string();
        let e = match r {
            Reloaded::Ready { classifier, detail } => {
                let same_labels = classifier.manifest().labels == clf.manifest().labels;
                *clf = *classifier;
                self.summary.reloads += 1;
                if !same_labels {
                    // Old smoothed scores mean nothing for new labels.
                    for t in &mut self.tracks {
                        t.smoother.reset();
                        t.gate.reset();
                    }
                }
                Event::Reload { ts_ms: now_ms(), bundle, ok: true, detail: format!("now running {detail}") }
            }
            Reloaded::Refused { detail } => {
                self.summary.refused_reloads += 1;
                Event::Reload {
                    ts_ms: now_ms(),
                    bundle,
                    ok: false,
                    detail: format!("refused, the previous bundle keeps running: {detail}"),
                }
            }
        };
        self.emit(sinks, e);
    }
}

/// The human-readable line of an event, for stderr; file names, labels and
/// details are escaped ([`escape_for_terminal`]).
fn log_line(e: &Event) {
    let line = match e {
        Event::Source { state, detail, .. } => format!("source {state}: {detail}"),
        Event::Reload { ok, detail, .. } => format!("reload {}: {detail}", if *ok { "done" } else { "refused" }),
        Event::Stats { fps, latency_ms_mean, latency_ms_max, dropped, frames, slow, .. } => format!(
            "{fps:.1} fps, latency {latency_ms_mean:.1} ms mean / {latency_ms_max:.1} ms max, \
             {frames} frames, {dropped} dropped{}",
            if *slow > 0 { format!(", {slow} slow") } else { String::new() }
        ),
        Event::SlowFrame { frame, latency_ms, limit_ms, .. } => {
            format!("warning: frame {frame}: inference took {latency_ms:.1} ms, more than {limit_ms:.1} ms")
        }
        Event::Started { source, bundle, .. } => format!("running {bundle} on {source}"),
        Event::Stopped { reason, frames, .. } => format!("stopped after {frames} frames: {reason}"),
        Event::Label { .. } | Event::Frame { .. } => return,
    };
    eprintln!("tern-device: {}", escape_for_terminal(&line));
}

/// Latency figures of one report period.
struct Period {
    frames: u64,
    latency_sum: Duration,
    latency_max: Duration,
    age_sum: Duration,
    slow: u64,
    captured_before: u64,
    dropped_before: u64,
}

impl Period {
    fn new() -> Period {
        Period {
            frames: 0,
            latency_sum: Duration::ZERO,
            latency_max: Duration::ZERO,
            age_sum: Duration::ZERO,
            slow: 0,
            captured_before: 0,
            dropped_before: 0,
        }
    }

    fn add(&mut self, latency: Duration, age: Duration) {
        self.frames += 1;
        self.latency_sum += latency;
        self.latency_max = self.latency_max.max(latency);
        self.age_sum += age;
    }

    fn report(&mut self, captured: u64, dropped: u64, elapsed: Duration) -> Event {
        let n = self.frames.max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let e = Event::Stats {
            ts_ms: now_ms(),
            frames: self.frames,
            captured: captured - self.captured_before,
            dropped: dropped - self.dropped_before,
            fps: self.frames as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_ms_mean: ms(self.latency_sum) / n,
            latency_ms_max: ms(self.latency_max),
            age_ms_mean: ms(self.age_sum) / n,
            slow: self.slow,
        };
        *self = Period { captured_before: captured, dropped_before: dropped, ..Period::new() };
        e
    }
}

fn capture_thread<F>(
    open: F,
    slot: &Slot,
    newest_only: bool,
    backoff: Backoff,
    opened: std::sync::mpsc::Sender<Result<String>>,
) where
    F: FnOnce() -> Result<Box<dyn FrameSource>>,
{
    let mut src = match open() {
        Ok(s) => {
            let _ = opened.send(Ok(s.describe()));
            s
        }
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    let source_event = |state: &str, detail: String| Event::Source { ts_ms: now_ms(), state: state.into(), detail };
    let finish = |reason: StopReason| {
        slot.lock().done = Some(reason);
        slot.ready.notify_all();
    };
    while !slot.stop.load(Ordering::Relaxed) {
        match src.next_frame() {
            Ok(Some(frame)) => {
                let mut s = slot.lock();
                s.captured += 1;
                if newest_only {
                    s.dropped += s.frames.len() as u64;
                    s.frames.clear();
                } else {
                    while s.frames.len() >= QUEUE && !slot.stop.load(Ordering::Relaxed) {
                        s = slot.ready.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                }
                s.frames.push_back(frame);
                drop(s);
                slot.ready.notify_all();
            }
            Ok(None) => {
                slot.note(source_event("ended", format!("{} has no more frames", src.describe())));
                finish(StopReason::SourceEnded);
                return;
            }
            Err(SourceError::BadFrame(e)) => {
                slot.lock().bad_frames += 1;
                slot.note(source_event("bad-frame", format!("{e:#} (skipped)")));
            }
            Err(SourceError::Lost(e)) => {
                let mut delay = backoff.initial;
                slot.note(source_event(
                    "lost",
                    format!("{}: {e:#}; reopening in {:.1} s", src.describe(), delay.as_secs_f64()),
                ));
                let mut failures = 0u32;
                loop {
                    sleep_unless(&slot.stop, delay);
                    if slot.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match src.reopen() {
                        Ok(()) => {
                            slot.lock().reopens += 1;
                            slot.note(source_event(
                                "reopened",
                                format!("{} after {} failed attempt(s)", src.describe(), failures),
                            ));
                            break;
                        }
                        Err(e) => {
                            failures += 1;
                            if backoff.attempts.is_some_and(|a| failures >= a) {
                                slot.note(source_event(
                                    "gave-up",
                                    format!("{}: {e:#}; {failures} reopen attempts failed", src.describe()),
                                ));
                                finish(StopReason::SourceGaveUp { attempts: failures });
                                return;
                            }
                            delay = (delay * 2).min(backoff.max);
                            slot.note(source_event(
                                "lost",
                                format!(
                                    "reopen attempt {failures} failed: {e:#}; next in {:.1} s",
                                    delay.as_secs_f64()
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }
}
