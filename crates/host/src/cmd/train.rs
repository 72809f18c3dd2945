//! `tern-host train DATA --out MODEL.onnx`: transfer learning on an
//! ImageFolder, then the float bundle and a report (JSON, text, PNG).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tern_host::device::{select, DeviceChoice};
use tern_host::quantize::{quantize_bundle, Recipe, Request};
use tern_host::train::{train, AugmentChoice, OutputChoice, TrainOptions};
use tern_model_format::arch::Backbone;
use tern_model_format::quantize::{Method, Options, Scheme};

/// Arguments of `train`.
#[derive(clap::Args)]
pub struct Args {
    /// ImageFolder root: `DATA/<class>/*.jpg`, or `DATA/train/<class>/…` + `DATA/val/<class>/…`.
    pub data: PathBuf,
    /// The float bundle to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the report goes (report.json, metrics.txt, confusion.png,
    /// curves.png); default: OUT without `.onnx`, plus `.report`.
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Backbone architecture.
    #[arg(long, default_value = "efficientnet-lite0", value_parser = super::export_pretrained::parse_backbone)]
    pub backbone: Backbone,
    /// Pretrained backbone weights (safetensors).
    #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
    pub weights: PathBuf,
    /// Start the backbone from random weights instead (a baseline).
    #[arg(long)]
    pub random_init: bool,
    /// Epochs of head training.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Learning rate of the head (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Weight decay (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Hidden layers of the head, e.g. `256` or `512,128`.
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    /// Dropout before each head layer while training.
    #[arg(long, default_value_t = 0.2)]
    pub dropout: f64,
    /// Cut the last K blocks of the backbone (late layers specialise in
    /// ImageNet; earlier ones transfer more generally).
    #[arg(long, default_value_t = 0)]
    pub drop_blocks: usize,
    /// Final activation.
    #[arg(long, value_enum, default_value_t = OutputChoice::Auto)]
    pub output: OutputChoice,
    /// After the head converges, fine-tune the last N blocks with it.
    #[arg(long, default_value_t = 0)]
    pub fine_tune_blocks: usize,
    /// Epochs of fine-tuning.
    #[arg(long, default_value_t = 5)]
    pub fine_tune_epochs: usize,
    /// Learning rate while fine-tuning.
    #[arg(long, default_value_t = 1e-4)]
    pub fine_tune_lr: f64,
    /// Random flips, crops, colour jitter: auto = while fine-tuning only.
    #[arg(long, value_enum, default_value_t = AugmentChoice::Auto)]
    pub augment: AugmentChoice,
    /// Stop after this many epochs without a better validation result (0: never).
    #[arg(long, default_value_t = 8)]
    pub patience: usize,
    /// Validation fraction when DATA has no train/ and val/ folders.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Seed of the split, initialisation, shuffling, dropout, augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feature cache directory (default: $XDG_CACHE_HOME/tern/features or ~/.cache/tern/features).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Compute features every run instead of caching them.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Use at most N images per class and split (quick runs).
    #[arg(long)]
    pub max_per_class: Option<usize>,
    /// Batch size of feature extraction.
    #[arg(long, default_value_t = 32)]
    pub feature_batch: usize,
    /// Another ImageFolder to train on too (repeatable), such as the
    /// captures of `tern-device run --capture DIR`: its classes join DATA's
    /// by folder name, a class only it has becomes a new class, images
    /// whose content is already in the set are skipped; JSON sidecars are
    /// read only for `reviewed`.
    #[arg(long, value_name = "DIR")]
    pub extra: Vec<PathBuf>,
    /// Take only the --extra images a person has reviewed (sidecar
    /// `"reviewed": true`, or no sidecar): unreviewed captures are labelled
    /// by the model's own guess. `--extra-reviewed-only=false` takes them all.
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub extra_reviewed_only: bool,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Also write an int8 bundle next to OUT (`NAME-int8.onnx`, int8
    /// weights with bias correction and the most sensitive layers in
    /// float, the `quantize` default): calibrated
    /// on training images, compared with the float bundle on every
    /// validation image (recorded in its manifest).
    #[arg(long)]
    pub quantize: bool,
    /// Training images drawn for --quantize's calibration.
    #[arg(long, default_value_t = 200)]
    pub calib_images: usize,
    #[command(flatten)]
    pub sign: super::sign::SignArg,
}

fn default_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tern").join("features"))
}

/// Trains, exports, writes the report and prints the metrics.
pub fn run(a: Args) -> Result<()> {
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if a.quantize && a.calib_images == 0 {
        bail!("--calib-images must be at least 1");
    }
    let key = a.sign.read()?;
    let device = select(a.device)?;
    eprintln!("computing on {device:?}");
    let weights = (!a.random_init).then_some(a.weights.as_path());
    let mut o = TrainOptions::new(&a.data, a.backbone, weights);
    o.epochs = a.epochs;
    o.batch_size = a.batch_size.max(1);
    o.lr = a.lr;
    o.weight_decay = a.weight_decay;
    o.hidden = a.hidden;
    o.dropout = a.dropout;
    o.drop_blocks = a.drop_blocks;
    o.output = a.output;
    o.fine_tune_blocks = a.fine_tune_blocks;
    o.fine_tune_epochs = a.fine_tune_epochs;
    o.fine_tune_lr = a.fine_tune_lr;
    o.augment = a.augment;
    o.patience = a.patience;
    o.val_fraction = a.val_fraction;
    o.seed = a.seed;
    o.cache_dir = if a.no_cache { None } else { a.cache_dir.or_else(default_cache) };
    o.max_per_class = a.max_per_class;
    o.feature_batch = a.feature_batch.max(1);
    o.extra = a.extra;
    o.extra_reviewed_only = a.extra_reviewed_only;
    o.device = device;
    let trained = train(&o)?;
    let r = &trained.report;
    let m = trained.export(&a.out)?;
    if let Some(k) = &key {
        super::sign::signed(&a.out, k)?;
    }
    let report_dir = a.report_dir.unwrap_or_else(|| a.out.with_extension("report"));
    trained.write_report(&report_dir)?;
    println!("{}", r.metrics.table());
    if !r.skipped.is_empty() {
        println!("{} file(s) skipped (listed in {}/report.json)", r.skipped.len(), report_dir.display());
    }
    if let Some(x) = &r.extra {
        println!(
            "--extra: {} image(s) added, {} duplicate(s) skipped, {} unreviewed skipped, new classes: [{}]",
            x.added,
            x.duplicates,
            x.unreviewed,
            x.new_classes.join(", ")
        );
    }
    println!(
        "times: features {:.1} s ({} cached, {} computed), head {:.1} s, fine-tune {:.1} s, evaluation {:.1} s, total {:.1} s",
        r.timings.features,
        r.cache.hits,
        r.cache.computed,
        r.timings.head,
        r.timings.fine_tune,
        r.timings.evaluation,
        r.timings.total
    );
    println!(
        "wrote {} ({} labels, {:?} output, graph sha256 {}) and {}/",
        a.out.display(),
        m.labels.len(),
        m.io.output_kind,
        &m.graph_sha256[..12],
        report_dir.display()
    );
    if a.quantize {
        let int8 = quantize(&a.out, a.calib_images, &o).with_context(|| format!("--quantize {}", a.out.display()))?;
        if let Some(k) = &key {
            super::sign::signed(&int8, k)?;
        }
    }
    Ok(())
}

/// `--quantize`: the int8 bundle of the one just written, calibrated on
/// the training split and compared on the validation split.
fn quantize(float: &std::path::Path, calib_images: usize, o: &TrainOptions) -> Result<PathBuf> {
    // The split `train` used: same folders, fraction, seed and cap.
    let (ds, _) = o.dataset()?;
    let mut train: Vec<PathBuf> = ds.train.iter().map(|s| s.path.clone()).collect();
    let val: Vec<PathBuf> = ds.val.iter().map(|s| s.path.clone()).collect();
    // Evenly spaced over the sorted paths, so every class folder is drawn.
    train.sort();
    let step = (train.len() / calib_images).max(1);
    let calib: Vec<PathBuf> = train.into_iter().step_by(step).take(calib_images).collect();
    let stem = float.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let out = float.with_file_name(format!("{stem}-int8.onnx"));
    let recipe = Recipe {
        method: Method::Percentile(99.99),
        options: Options {
            scheme: Scheme::Weights,
            per_channel: false,
            float_layers: vec![],
            input_means: Default::default(),
        },
        bias_correction: true,
        min_shrink: Some(super::quantize::DEFAULT_MIN_SHRINK),
    };
    let r = Request {
        bundle: float,
        calib_files: &calib,
        calib_source: format!("{} (training split)", o.data.display()),
        eval_files: &val,
        eval_source: format!("{} (validation split)", o.data.display()),
        out: &out,
        seed: o.seed,
    };
    let q = quantize_bundle(&r, &recipe)?;
    let c = q.comparison.context("no validation images to compare on")?;
    let acc = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
    println!(
        "wrote {} (int8 weights, {:.2} MB, ÷{:.2}): on {} validation images top-1 agrees with float on {:.2}%, accuracy {} → {}",
        out.display(),
        q.sizes.1 as f64 / 1e6,
        q.sizes.0 as f64 / q.sizes.1.max(1) as f64,
        c.images,
        c.top1_agreement * 100.0,
        acc(c.float_accuracy),
        acc(c.int8_accuracy)
    );
    Ok(out)
}
