//! `tern-host quantize BUNDLE CALIB_DATA --out OUT`: static post-training
//! int8 quantization.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tern_host::quantize::{quantize_bundle, Request};
use tern_model_format::quantize::{Method, Options, Scheme};

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
    /// 0.23 int8 convolutions measured 3–4× slower than float here.
    Weights,
    /// int8 weights and activations (QLinearConv) for full and 1×1
    /// convolutions; depthwise, residual adds, pooling and head in float.
    Static,
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
    /// How activation ranges are chosen.
    #[arg(long, value_enum, default_value_t = Calibration::Percentile)]
    pub calibration: Calibration,
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
    /// Seed of the image draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Quantizes and prints a summary.
pub fn run(a: Args) -> Result<()> {
    let method = match a.calibration {
        Calibration::Minmax => Method::MinMax,
        Calibration::Percentile => {
            if !(50.0..=100.0).contains(&a.percentile) {
                bail!("--percentile {} is outside 50..=100", a.percentile);
            }
            Method::Percentile(a.percentile)
        }
        Calibration::Entropy => Method::Entropy,
    };
    if a.calib_images == 0 {
        bail!("--calib-images must be at least 1");
    }
    let scheme = match a.scheme {
        SchemeArg::Static => Scheme::Static,
        SchemeArg::Weights => Scheme::Weights,
    };
    let r = Request {
        bundle: &a.bundle,
        calib_data: &a.calib_data,
        calib_images: a.calib_images,
        method,
        options: Options {
            scheme,
            per_channel: a.per_channel,
            float_layers: a.float_layers.clone(),
            input_means: Default::default(),
        },
        bias_correction: !a.no_bias_correction,
        eval_data: a.eval_data.as_deref(),
        eval_images: a.eval_images,
        out: &a.out,
        seed: a.seed,
    };
    let o = quantize_bundle(&r)?;
    eprintln!(
        "wrote {} (int8, {:?}): {:.2} MB, float {:.2} MB (÷{:.2})",
        a.out.display(),
        scheme,
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
    Ok(())
}
