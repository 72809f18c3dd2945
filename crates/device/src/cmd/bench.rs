//! `tern-device bench BUNDLE`: cold start, latency percentiles, throughput,
//! peak memory and model size of one bundle; optionally the per-operator
//! profile and the cost of preprocessing a 640×480 camera frame.
//!
//! `bench/compare.sh` runs this next to onnxruntime on the same
//! files and the same input (`--dump-input`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tern_device::npy;
use tern_device::perf;
use tern_model_format::preprocess::{decode_image, open_image, preprocess_rgb8};
use tern_model_format::report::{BenchReport, FrameCost, LatencyStats};
use tern_model_format::Bundle;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// The bundle (.onnx).
    bundle: PathBuf,
    /// Timed runs.
    #[arg(long, default_value_t = 100)]
    iters: usize,
    /// Untimed runs before the timed ones (after the first, cold one).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Image to classify; without it, a fixed pseudo-random input.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Write the input tensor used as a .npy file (to feed other runtimes).
    #[arg(long, value_name = "FILE")]
    dump_input: Option<PathBuf>,
    /// Also time every operator of the plan and print the slowest N.
    #[arg(long, value_name = "N")]
    profile: Option<usize>,
    /// Also time decoding (JPEG) and preprocessing a 640×480 frame.
    #[arg(long)]
    frame: bool,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: super::EngineArgs,
}

/// Runs the benchmark and prints the report.
pub fn run(a: Args) -> Result<ExitCode> {
    let options = a.engine.options();
    let model_bytes =
        std::fs::metadata(&a.bundle).with_context(|| format!("cannot read {}", a.bundle.display()))?.len();

    let trust = a.engine.trust.trust()?;
    let start = Instant::now();
    let (mut clf, _) = trust.load(&a.bundle, &options)?;
    let load = start.elapsed();
    let pre = clf.manifest().preprocessing;
    let input = match &a.image {
        Some(p) => clf.preprocess(&open_image(p)?),
        None => synthetic_input(pre.input_shape().iter().product()),
    };
    let first = clf.run(&input)?;
    let cold = start.elapsed();
    if let Some(p) = &a.dump_input {
        npy::write_f32(p, &pre.input_shape(), &input)?;
    }

    for _ in 0..a.warmup {
        clf.run(&input)?;
    }
    let mut samples = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let (_, took) = clf.run_timed(&input)?;
        samples.push(took);
    }
    let latency = LatencyStats::of(&samples).context("--iters must be at least 1")?;
    let top1 = clf.top_k(&first, 1).first().map_or(0, |r| r.index);

    let frame = if a.frame { Some(frame_cost(&a, &pre)?) } else { None };
    let profile = match a.profile {
        Some(_) => Some(perf::profile(&a.bundle, &options, &input, a.iters.min(20))?),
        None => None,
    };
    let precision = Bundle::read(&a.bundle).map(|b| format!("{:?}", b.manifest.precision).to_lowercase())?;
    let report = BenchReport {
        bundle: a.bundle.clone(),
        precision,
        compute: options.compute.name().into(),
        model_bytes,
        threads: options.threads,
        depthwise_kernel: tern_device::kernels::depthwise_c_kernel_name().map(String::from),
        tern_kernels: clf.fused_ops() > 0,
        fused_ops: clf.fused_ops(),
        load_ms: ms(load),
        cold_start_ms: ms(cold),
        latency,
        throughput_per_s: 1e3 / latency.mean_ms,
        peak_rss_bytes: perf::peak_rss_bytes(),
        top1,
        frame_640x480: frame,
        profile,
    };
    if a.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report, a.profile.unwrap_or(0));
    }
    Ok(ExitCode::SUCCESS)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A fixed input in the range of normalised pixels (xorshift, seed 1).
fn synthetic_input(n: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

/// Times JPEG decoding and preprocessing of a 640×480 frame made from
/// `--image` (or a smooth synthetic picture).
fn frame_cost(a: &Args, pre: &tern_model_format::Preprocessing) -> Result<FrameCost> {
    use image::{imageops::FilterType, ImageFormat, RgbImage};
    let rgb: RgbImage = match &a.image {
        Some(p) => image::imageops::resize(&open_image(p)?.to_rgb8(), 640, 480, FilterType::Triangle),
        None => RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x / 3) as u8, (y / 2) as u8, ((x + y) / 5) as u8])),
    };
    let mut jpeg = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut jpeg), ImageFormat::Jpeg).context("cannot encode the frame")?;
    let n = a.iters.max(1);
    let (mut decode, mut prep) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        let img = decode_image(&jpeg)?;
        decode.push(t.elapsed());
        let t = Instant::now();
        let x = preprocess_rgb8(&img.to_rgb8(), pre);
        prep.push(t.elapsed());
        std::hint::black_box(x);
    }
    Ok(FrameCost {
        decode: LatencyStats::of(&decode).context("no samples")?,
        resize_normalise: LatencyStats::of(&prep).context("no samples")?,
    })
}

fn print_text(r: &BenchReport, top: usize) {
    let l = &r.latency;
    outln!(
        "{} ({}, computing in {}, {:.2} MB, {} thread(s))",
        r.bundle.display(),
        r.precision,
        r.compute,
        r.model_bytes as f64 / 1e6,
        r.threads
    );
    outln!("  load {:.1} ms, cold start (load → first result) {:.1} ms", r.load_ms, r.cold_start_ms);
    match &r.depthwise_kernel {
        Some(k) => outln!("  depthwise layers channel-last with {k}"),
        None => outln!("  depthwise layers channel-first (no channel-last depthwise kernel on this machine)"),
    }
    if r.tern_kernels {
        outln!("  {} convolutions on Tern's fused ops (tract's own with --tract-kernels)", r.fused_ops);
    } else {
        outln!("  convolutions on tract's own kernels");
    }
    outln!(
        "  latency over {} runs: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms (min {:.2}, mean {:.2}, max {:.2})",
        l.n,
        l.p50_ms,
        l.p90_ms,
        l.p99_ms,
        l.min_ms,
        l.mean_ms,
        l.max_ms
    );
    outln!("  throughput {:.1} inferences/s", r.throughput_per_s);
    if let Some(rss) = r.peak_rss_bytes {
        outln!("  peak RSS {:.1} MB", rss as f64 / 1e6);
    }
    if let Some(f) = &r.frame_640x480 {
        outln!(
            "  640×480 frame: JPEG decode p50 {:.2} ms, resize + normalise p50 {:.2} ms",
            f.decode.p50_ms,
            f.resize_normalise.p50_ms
        );
    }
    if let Some(p) = &r.profile {
        outln!("  profile: {:.2} ms per run in {} nodes; by operator:", p.total_ms, p.nodes.len());
        for (op, count, t) in &p.by_op {
            outln!("    {t:>8.3} ms {:>5.1}%  {count:>3} × {op}", 100.0 * t / p.total_ms);
        }
        outln!("  by layer kind (each node counted in the ONNX layer its name starts with):");
        for (kind, count, t) in &p.by_kind {
            outln!("    {t:>8.3} ms {:>5.1}%  {count:>3} nodes  {kind}", 100.0 * t / p.total_ms);
        }
        outln!("  slowest {top} nodes:");
        for n in p.nodes.iter().take(top) {
            outln!("    {:>8.3} ms  {:<14} {}", n.mean_ms, n.op, tern_device::events::escape_for_terminal(&n.name));
        }
    }
}
