//! `tern-host quantize BUNDLE CALIB_DATA --out OUT`: static post-training
//! int8 quantization.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tern_host::quantize::{
    auto, auto_recipes, first_convolutions, float_graph, held_out, pick_images, quantize_bundle, Budget, Recipe,
    Request,
};
use tern_model_format::quantize::{Method, Options, Scheme};
use tern_model_format::report::BenchReport;

/// `--calibration` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Calibration {
    /// Smallest and largest activation seen.
    Minmax,
    /// `--percentile` at each end (outliers saturate).
    Percentile,
    /// KL-divergence threshold (TensorRT style).
    Entropy,
}

/// `--scheme` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemeArg {
    /// int8 weights only (DequantizeLinear of constants, folded by the
    /// runtime at load): float speed, ~4× smaller. The default: in tract
    /// 0.23 int8 convolutions measured 1.8–2.1× (per tensor) to 9.6× (per
    /// channel) slower than float here.
    Weights,
    /// int8 weights and activations (QLinearConv) for full and 1×1
    /// convolutions; depthwise, residual adds, pooling and head in float.
    Static,
    /// QDQ form (onnxruntime's): QuantizeLinear/DequantizeLinear on every
    /// activation between convolutions, per-channel int8 weights, int32
    /// biases, ReLU6 folded into the ranges; the head in float. The form
    /// integer kernels fuse (onnxruntime, Tern's device).
    Qdq,
}

/// Arguments of `quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// The float bundle.
    pub bundle: PathBuf,
    /// Calibration images: a folder, searched recursively (real images of
    /// the kind the model will see).
    pub calib_data: PathBuf,
    /// The int8 bundle to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Calibration images drawn (seeded) from CALIB_DATA.
    #[arg(long, default_value_t = 200)]
    pub calib_images: usize,
    /// How activation ranges are chosen. Default: minmax with `--scheme
    /// qdq` (measured closer to float there, see docs/quantization.md),
    /// percentile otherwise.
    #[arg(long, value_enum)]
    pub calibration: Option<Calibration>,
    /// Percentile for `--calibration percentile`.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// What is quantized.
    #[arg(long, value_enum, default_value_t = SchemeArg::Weights)]
    pub scheme: SchemeArg,
    /// One weight scale per output channel in QLinearConv (slower in tract).
    #[arg(long)]
    pub per_channel: bool,
    /// Layers kept in float compute (comma-separated weight prefixes, e.g.
    /// `_conv_stem,_blocks.0._project_conv`).
    #[arg(long, value_delimiter = ',')]
    pub float_layers: Vec<String>,
    /// Keep the first N convolutions of the graph (the stem and the block
    /// after it) in float, their activations included: with int8 the
    /// network's first layers cost most of the agreement with float (see
    /// docs/quantization.md). Default: 3 with `--scheme qdq`, 0 otherwise.
    #[arg(long, value_name = "N")]
    pub float_first: Option<usize>,
    /// Held-out images (not calibration images) for the float-vs-int8
    /// comparison recorded in the manifest; folders named like the
    /// bundle's labels also give accuracies.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Held-out images used.
    #[arg(long, default_value_t = 500)]
    pub eval_images: usize,
    /// Leave the biases of int8-weight float layers as they are (by default
    /// they absorb the mean output shift of the weight rounding, measured
    /// on the calibration images).
    #[arg(long)]
    pub no_bias_correction: bool,
    /// Keep the weights of the layers most sensitive to int8 (measured on
    /// calibration images, cheapest fixes first) in float while the file
    /// stays N× smaller than the float bundle. Default: 3.5 with
    /// `--scheme weights`, off with `--scheme static`; 0 turns it off.
    #[arg(long, allow_negative_numbers = true)]
    pub min_shrink: Option<f64>,
    /// Seed of the image draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Try the schemes, calibration methods and float fallbacks for the
    /// first and last convolutions; keep the fastest (measured with
    /// `tern-device bench`) whose accuracy drop on --eval-data is within
    /// --budget and whose top-1 agrees with float on at least
    /// --min-agreement of them. Run it on the target machine for latencies that hold there.
    /// The candidates are fixed: --scheme, --calibration, --per-channel,
    /// --float-layers, --float-first, --min-shrink and --no-bias-correction do not apply
    /// (--percentile does).
    #[arg(long, requires = "eval_data")]
    pub auto: bool,
    /// Accuracy budget of --auto, in points (without labelled held-out
    /// folders: the share of changed top-1 predictions).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub budget: f64,
    /// Smallest top-1 agreement with float that --auto accepts, in percent
    /// of the held-out images (the quantized-vs-float tests ask for 99).
    #[arg(long, default_value_t = 99.0)]
    pub min_agreement: f64,
    /// tern-device binary for --auto's latencies (default: next to tern-host).
    #[arg(long)]
    pub device_bin: Option<PathBuf>,
    /// Threads of --auto's benchmark.
    #[arg(long, default_value_t = 1)]
    pub bench_threads: usize,
    /// Runs per candidate in --auto's benchmark.
    #[arg(long, default_value_t = 30)]
    pub bench_iters: usize,
    #[command(flatten)]
    pub sign: super::sign::SignArg,
}

/// `--min-shrink`'s default with `--scheme weights`: room for the
/// sensitive layers while the file stays well past the 3× goal.
pub const DEFAULT_MIN_SHRINK: f64 = 3.5;

/// `--float-first`'s default with `--scheme qdq`: the stem and the first
/// block's depthwise and 1×1 convolutions (EfficientNet-Lite0, MobileNetV2).
pub const DEFAULT_QDQ_FLOAT_FIRST: usize = 3;

/// The recipe the flags describe; `--float-first` needs the float bundle's
/// graph.
pub fn recipe(a: &Args) -> Result<Recipe> {
    let default = if a.scheme == SchemeArg::Qdq { Calibration::Minmax } else { Calibration::Percentile };
    let method = match a.calibration.unwrap_or(default) {
        Calibration::Minmax => Method::MinMax,
        Calibration::Percentile => {
            if !(50.0..=100.0).contains(&a.percentile) {
                bail!("--percentile {} is outside 50..=100", a.percentile);
            }
            Method::Percentile(a.percentile)
        }
        Calibration::Entropy => Method::Entropy,
    };
    let scheme = match a.scheme {
        SchemeArg::Static => Scheme::Static,
        SchemeArg::Weights => Scheme::Weights,
        SchemeArg::Qdq => Scheme::Qdq,
    };
    Ok(Recipe {
        method,
        options: Options {
            scheme,
            per_channel: a.per_channel,
            float_layers: float_layers(a, scheme)?,
            input_means: Default::default(),
        },
        bias_correction: !a.no_bias_correction,
        min_shrink: match (a.min_shrink, scheme) {
            (Some(r), _) if r.is_nan() || r < 0.0 => bail!("--min-shrink {r} must be 0 (off) or more"),
            (Some(r), _) if r == 0.0 => None,
            (Some(r), _) => Some(r.max(1.0)),
            (None, Scheme::Weights) => Some(DEFAULT_MIN_SHRINK),
            (None, Scheme::Static | Scheme::Qdq) => None,
        },
    })
}

/// `--float-layers` and the layers of `--float-first`, each once.
fn float_layers(a: &Args, scheme: Scheme) -> Result<Vec<String>> {
    let first = a.float_first.unwrap_or(if scheme == Scheme::Qdq { DEFAULT_QDQ_FLOAT_FIRST } else { 0 });
    let mut layers = a.float_layers.clone();
    if first > 0 && !a.auto {
        for l in first_convolutions(&float_graph(&a.bundle)?, first) {
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
    }
    Ok(layers)
}

/// The tern-device binary: `explicit`, else next to this executable.
pub fn device_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let p = exe.with_file_name(format!("tern-device{}", std::env::consts::EXE_SUFFIX));
    if !p.is_file() {
        bail!("{} is missing: build it (cargo build --release -p tern-device) or give --device-bin", p.display());
    }
    Ok(p)
}

/// Median latency (ms) of `bundle` by `tern-device bench`.
pub fn bench_p50(bin: &Path, bundle: &Path, threads: usize, iters: usize) -> Result<f64> {
    let out = Command::new(bin)
        .arg("bench")
        .arg(bundle)
        .args(["--threads", &threads.to_string(), "--iters", &iters.max(1).to_string(), "--json"])
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!("{} bench {} failed: {}", bin.display(), bundle.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let report: BenchReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} bench printed no JSON report", bin.display()))?;
    Ok(report.latency.p50_ms)
}

/// Quantizes and prints a summary.
pub fn run(a: Args) -> Result<()> {
    if a.calib_images == 0 {
        bail!("--calib-images must be at least 1");
    }
    let recipe = recipe(&a)?;
    let key = a.sign.read()?;
    if !(a.budget >= 0.0) {
        bail!("--budget {} must be 0 points or more", a.budget);
    }
    if !(0.0..=100.0).contains(&a.min_agreement) {
        bail!("--min-agreement {} is outside 0..=100 (percent)", a.min_agreement);
    }
    let calib_files = pick_images(&a.calib_data, a.calib_images, a.seed)?;
    let eval_files = match &a.eval_data {
        Some(dir) => held_out(dir, &calib_files, a.eval_images, a.seed)?,
        None => Vec::new(),
    };
    let r = Request {
        bundle: &a.bundle,
        calib_files: &calib_files,
        calib_source: a.calib_data.display().to_string(),
        eval_files: &eval_files,
        eval_source: a.eval_data.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
        out: &a.out,
        seed: a.seed,
    };
    if a.auto {
        if !(50.0..=100.0).contains(&a.percentile) {
            bail!("--percentile {} is outside 50..=100", a.percentile);
        }
        let bin = device_bin(a.device_bin.as_deref())?;
        let graph = tern_host::quantize::float_graph(&a.bundle)?;
        let recipes = auto_recipes(&graph, a.percentile);
        let bench = |p: &Path| bench_p50(&bin, p, a.bench_threads, a.bench_iters);
        let budget = Budget { points: a.budget, min_agreement: a.min_agreement / 100.0 };
        let o = auto(&r, &recipes, budget, &bench)?;
        println!("float: p50 {:.2} ms, {:.2} MB", o.float_latency_ms, o.sizes.0 as f64 / 1e6);
        let w = o.tried.iter().map(|t| t.recipe.chars().count()).chain(["candidate".len()]).max().unwrap_or(9);
        println!(
            "{:<w$} {:>9} {:>9} {:>9} {:>7} {:>8} {:>7}  budget",
            "candidate", "agree %", "float %", "int8 %", "drop", "p50 ms", "MB"
        );
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", v * 100.0));
        for t in &o.tried {
            println!(
                "{:<w$} {:>9.2} {:>9} {:>9} {:>7.2} {:>8.2} {:>7.2}  {}{}",
                t.recipe,
                t.comparison.top1_agreement * 100.0,
                pct(t.comparison.float_accuracy),
                pct(t.comparison.int8_accuracy),
                t.drop_points,
                t.latency_ms,
                t.bytes as f64 / 1e6,
                if t.within_budget { "ok" } else { "over" },
                if t.recipe == o.chosen { "  ← chosen" } else { "" }
            );
        }
        println!("wrote {} ({})", a.out.display(), o.chosen);
        if let Some(k) = &key {
            super::sign::signed(&a.out, k)?;
        }
        return Ok(());
    }
    let o = quantize_bundle(&r, &recipe)?;
    eprintln!(
        "wrote {} (int8, {}): {:.2} MB, float {:.2} MB (÷{:.2})",
        a.out.display(),
        recipe.name(),
        o.sizes.1 as f64 / 1e6,
        o.sizes.0 as f64 / 1e6,
        o.sizes.0 as f64 / o.sizes.1.max(1) as f64
    );
    if let Some(c) = &o.comparison {
        let acc = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
        eprintln!(
            "held-out: {} images, top-1 agreement {:.2}%, accuracy float {} int8 {}, max |Δlogit| {:.3}",
            c.images,
            c.top1_agreement * 100.0,
            acc(c.float_accuracy),
            acc(c.int8_accuracy),
            c.max_abs_logit_diff
        );
    }
    if let Some(k) = &key {
        super::sign::signed(&a.out, k)?;
    }
    Ok(())
}
