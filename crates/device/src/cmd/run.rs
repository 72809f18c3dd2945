//! `tern-device run BUNDLE --camera 0 | --folder DIR | ...`: the live loop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tern_device::actions::{check_labels, parse_rules_in, GpioOutputs, PinRule};
use tern_device::events::{JsonLines, Sink};
use tern_device::mqtt::{parse_qos, Credentials, MqttSettings, MqttSink, MqttTarget, TlsFiles};
use tern_device::reload::{Check, Reloader};
use tern_device::runloop::{self, Backoff, LoopOptions};
use tern_device::smooth::{Hysteresis, Smoothing};
use tern_device::source::{FrameSource, ImageFiles, MjpegFile, Synthetic};
use tern_device::{camera, gpio};

/// Arguments of `run`.
#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("source").required(true).multiple(false))]
pub struct Args {
    /// The bundle (.onnx). Replacing the file (atomic rename) reloads it.
    bundle: PathBuf,
    /// Camera index or device (`0`, `/dev/video0`); needs the `camera` feature.
    #[arg(long, group = "source", value_name = "INDEX|/dev/videoN")]
    camera: Option<String>,
    /// A folder of images, in file-name order.
    #[arg(long, group = "source", value_name = "DIR")]
    folder: Option<PathBuf>,
    /// A numbered image sequence, e.g. `frames/%05d.png`.
    #[arg(long, group = "source", value_name = "PATTERN")]
    sequence: Option<String>,
    /// A Motion-JPEG video (`ffmpeg -i in.mp4 -f mjpeg out.mjpeg`).
    #[arg(long, group = "source", value_name = "FILE")]
    video: Option<PathBuf>,
    /// Synthetic frames of solid colours, e.g. `red*20,green,red*20`.
    #[arg(long, group = "source", value_name = "SCRIPT")]
    synthetic: Option<String>,
    /// Camera resolution to ask for.
    #[arg(long, value_name = "WxH", value_parser = parse_resolution)]
    resolution: Option<(u32, u32)>,
    /// Frame rate: asked of the camera; for files and synthetic frames, the
    /// pace at which they are produced (then only the newest is processed).
    #[arg(long)]
    fps: Option<f64>,
    /// Start files and synthetic scripts again at their end.
    #[arg(long = "loop")]
    repeat: bool,
    /// Stop after this many processed frames.
    #[arg(long)]
    frames: Option<u64>,
    /// Process every frame in order even from a paced source (no dropping).
    #[arg(long)]
    no_drop: bool,
    /// Smoothing: `none`, `ema:ALPHA` or `majority:K`.
    #[arg(long, default_value = "ema:0.5", value_parser = Smoothing::parse)]
    smoothing: Smoothing,
    /// Confidence at which a label becomes active.
    #[arg(long, default_value_t = 0.6)]
    on: f32,
    /// Confidence under which the active label is released.
    #[arg(long, default_value_t = 0.4)]
    off: f32,
    /// Print a `frame` event for every frame, not only label changes.
    #[arg(long)]
    every_frame: bool,
    /// Seconds between `stats` events (0: none).
    #[arg(long, default_value_t = 10.0)]
    report_every: f64,
    /// GPIO outputs: `LABEL=LINE[@MIN_CONFIDENCE],...`; needs the `gpio` feature.
    #[arg(long, value_name = "RULES")]
    gpio: Option<String>,
    /// GPIO chip of the lines.
    #[arg(long, default_value = "/dev/gpiochip0")]
    gpio_chip: String,
    /// Publish events to MQTT: `mqtt://HOST[:PORT]/tern/<device-id>`, or
    /// `mqtts://HOST[:PORT]/...` for TLS (port 8883 by default). No user
    /// name or password in the URL.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// PEM CA certificate(s) the broker's certificate must chain to
    /// (mqtts://; default: the system's CA certificates).
    #[arg(long, value_name = "FILE", requires = "mqtt")]
    mqtt_ca: Option<PathBuf>,
    /// PEM client certificate, for brokers that ask for one (with --mqtt-key).
    #[arg(long, value_name = "FILE", requires = "mqtt_key", requires = "mqtt")]
    mqtt_cert: Option<PathBuf>,
    /// PEM private key of --mqtt-cert.
    #[arg(long, value_name = "FILE", requires = "mqtt_cert")]
    mqtt_key: Option<PathBuf>,
    /// MQTT user name (default: $TERN_MQTT_USERNAME).
    #[arg(long, value_name = "NAME", requires = "mqtt")]
    mqtt_username: Option<String>,
    /// File whose first line is the MQTT password (default:
    /// $TERN_MQTT_PASSWORD). Never on the command line.
    #[arg(long, value_name = "FILE", requires = "mqtt")]
    mqtt_password_file: Option<PathBuf>,
    /// MQTT client id (default: tern-<last topic level>-<6 hex digits>,
    /// unique per process).
    #[arg(long, value_name = "ID", requires = "mqtt")]
    mqtt_client_id: Option<String>,
    /// Largest MQTT packet sent or accepted, bytes; longer events are
    /// trimmed to fit (e.g. the `started` event's label list).
    #[arg(long, value_name = "BYTES", default_value_t = tern_device::mqtt::DEFAULT_MAX_PACKET)]
    mqtt_max_packet: usize,
    /// MQTT QoS of events and state.
    #[arg(long, default_value = "1", value_parser = parse_qos)]
    mqtt_qos: rumqttc::QoS,
    /// Events kept while the broker is away (the oldest are dropped beyond).
    #[arg(long, default_value_t = 1000)]
    mqtt_queue: usize,
    /// Do not watch the bundle file for replacement.
    #[arg(long)]
    no_reload: bool,
    /// Seconds between checks of the bundle file.
    #[arg(long, default_value_t = 1.0)]
    reload_interval: f64,
    /// Longest delay between attempts to reopen a lost camera, seconds.
    #[arg(long, default_value_t = 30.0)]
    reopen_max: f64,
    /// Give up (exit with an error) after this many failed reopen attempts.
    #[arg(long)]
    reopen_attempts: Option<u32>,
    /// Report (a `slow-frame` event, counted in `stats`) every inference
    /// slower than this many milliseconds.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    slow_ms: Option<u64>,
    /// No human-readable log lines on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// How the bundle, and every reloaded one, is loaded.
    #[command(flatten)]
    engine: super::EngineArgs,
    #[command(flatten)]
    roi: super::run_extras::RoiArgs,
    #[command(flatten)]
    ha: super::run_extras::HaArgs,
    /// A network camera (`--url`) and its options.
    #[command(flatten)]
    netcam: super::netcam::NetcamArgs,
    #[command(flatten)]
    capture: super::capture_args::CaptureArgs,
    #[command(flatten)]
    http: super::http::HttpArgs,
}

fn parse_resolution(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT"))?;
    match (w.parse::<u32>(), h.parse::<u32>()) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => Err(format!("{s:?}: expected WIDTHxHEIGHT")),
    }
}

fn seconds(v: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|_| anyhow!("{what} {v}: expected a number of seconds >= 0"))
}

/// Runs the loop until the source ends, `--frames` is reached, or SIGINT /
/// SIGTERM (then pins go low and MQTT says `offline`).
pub fn run(a: Args) -> Result<ExitCode> {
    let thresholds = Hysteresis::new(a.on, a.off).map_err(|e| anyhow!(e))?;
    let options = a.engine.options();
    let trust = a.engine.trust.trust()?;
    let (classifier, signer) = trust.load(&a.bundle, &options)?;
    if let (Some(k), false) = (&signer, a.quiet) {
        eprintln!("{}: signed by trusted key {}", a.bundle.display(), k.describe());
    }
    let regions = a.roi.regions()?;
    let names: Vec<String> = regions.iter().map(|r| r.name.clone()).collect();
    let rules = a.gpio.as_deref().map(|g| parse_rules_in(g, &names)).transpose()?;
    if let Some(r) = &rules {
        check_labels(r, &classifier.manifest().labels).with_context(|| format!("bundle {}", a.bundle.display()))?;
    }
    let live = a.camera.is_some() || a.netcam.url.is_some() || a.fps.is_some();
    let opts = LoopOptions {
        smoothing: a.smoothing,
        thresholds,
        newest_only: live && !a.no_drop,
        max_frames: a.frames,
        report_every: if a.report_every > 0.0 { Some(seconds(a.report_every, "--report-every")?) } else { None },
        frame_events: a.every_frame,
        reopen: Backoff {
            initial: Duration::from_millis(500),
            max: seconds(a.reopen_max, "--reopen-max")?.max(Duration::from_millis(500)),
            attempts: a.reopen_attempts,
        },
        log: !a.quiet,
        slow: a.slow_ms.map(Duration::from_millis),
        regions: regions.clone(),
    };

    let mut stdout = JsonLines::new(std::io::stdout(), a.every_frame);
    let mut gpio_out = match &rules {
        Some(rules) => Some(open_pins(rules, &a.gpio_chip)?),
        None => None,
    };
    let mut mqtt = match &a.mqtt {
        Some(url) => {
            let target = MqttTarget::parse(url)?;
            let ha = a.ha.discovery(&target, a.mqtt_client_id.as_deref(), &regions)?;
            let credentials = Credentials::resolve(a.mqtt_username.clone(), a.mqtt_password_file.as_deref(), |k| {
                std::env::var(k).ok()
            })?;
            let settings = MqttSettings {
                qos: a.mqtt_qos,
                queue: a.mqtt_queue,
                client_id: a.mqtt_client_id.clone(),
                max_packet: a.mqtt_max_packet,
                tls: TlsFiles { ca: a.mqtt_ca.clone(), cert: a.mqtt_cert.clone(), key: a.mqtt_key.clone() },
                credentials,
                log: !a.quiet,
                ha,
                ..MqttSettings::default()
            };
            Some(MqttSink::start(target, settings).with_context(|| format!("MQTT {url}"))?)
        }
        None => None,
    };
    let mut web = a.http.start(&a.bundle, &trust, &options, a.capture.dir(), mqtt.as_ref().map(MqttSink::monitor))?;
    let reloader = if a.no_reload {
        None
    } else {
        let rules = rules.clone().unwrap_or_default();
        let check: Check = Box::new(move |m: &tern_model_format::Manifest| check_labels(&rules, &m.labels));
        Some(Reloader::spawn(&a.bundle, seconds(a.reload_interval, "--reload-interval")?, options, trust, check)?)
    };

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install the signal handler")?;
    }

    let mut capture = a.capture.capture(&a.bundle, &classifier.manifest().graph_sha256, !a.quiet)?;
    let mut snapshots = a.capture.snapshots()?;
    let open = source_opener(&a)?;
    let mut sinks: Vec<&mut dyn Sink> = vec![&mut stdout];
    if let Some(c) = &mut capture {
        sinks.push(c);
    }
    if let Some(s) = &mut snapshots {
        sinks.push(s);
    }
    if let Some(g) = &mut gpio_out {
        sinks.push(g);
    }
    if let Some(m) = &mut mqtt {
        sinks.push(m);
    }
    if let Some((_, w)) = &mut web {
        sinks.push(w);
    }
    let bundle = a.bundle.display().to_string();
    let summary = runloop::run(open, classifier, &bundle, &opts, &mut sinks, reloader.as_ref(), &stop)?;
    if summary.reason.is_failure() {
        return Err(anyhow!("{}", summary.reason));
    }
    Ok(ExitCode::SUCCESS)
}

type Opener = Box<dyn FnOnce() -> Result<Box<dyn FrameSource>> + Send>;

fn source_opener(a: &Args) -> Result<Opener> {
    let (repeat, fps) = (a.repeat, a.fps);
    if let Some(dev) = &a.camera {
        let spec = camera::CameraSpec {
            device: dev.clone(),
            resolution: a.resolution,
            fps: fps.map(|f| f.round().max(1.0) as u32),
        };
        return Ok(Box::new(move || camera::open(&spec)));
    }
    if let Some((url, settings)) = a.netcam.settings(fps)? {
        return Ok(Box::new(move || tern_device::netcam::open(&url, &settings)));
    }
    if let Some(dir) = &a.folder {
        let src = ImageFiles::folder(dir)?.repeat(repeat).fps(fps);
        return Ok(Box::new(move || Ok(Box::new(src) as Box<dyn FrameSource>)));
    }
    if let Some(pattern) = &a.sequence {
        let src = ImageFiles::sequence(pattern)?.repeat(repeat).fps(fps);
        return Ok(Box::new(move || Ok(Box::new(src) as Box<dyn FrameSource>)));
    }
    if let Some(path) = &a.video {
        let src = MjpegFile::open(path)?.repeat(repeat).fps(fps);
        return Ok(Box::new(move || Ok(Box::new(src) as Box<dyn FrameSource>)));
    }
    if let Some(script) = &a.synthetic {
        let src = Synthetic::parse(script)?.repeat(repeat).fps(fps);
        return Ok(Box::new(move || Ok(Box::new(src) as Box<dyn FrameSource>)));
    }
    Err(anyhow!("no frame source: give --camera, --url, --folder, --sequence, --video or --synthetic"))
}

fn open_pins(rules: &[PinRule], chip: &str) -> Result<GpioOutputs<gpio::Pin>> {
    let mut pins = Vec::with_capacity(rules.len());
    for r in rules {
        pins.push((r.clone(), gpio::output(chip, r.line)?));
    }
    GpioOutputs::new(pins)
}
