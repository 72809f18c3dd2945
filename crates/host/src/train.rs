//! Transfer learning: a pretrained backbone, frozen, with a new head trained
//! on an ImageFolder data set; optionally the last blocks fine-tuned after
//! the head has converged.
//!
//! With the backbone frozen and no augmentation, its pooled features are
//! computed once (under `no_grad`) and cached on disk, keyed by the
//! weights, the architecture, the preprocessing and each image's sha256:
//! a second run on the same data trains the head in seconds. Batch norm
//! always uses its running statistics (also in fine-tuned blocks: small
//! batches of a few hundred photos would only add noise to them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};
use tern_model_format::arch::{Backbone as Arch, BackboneSpec};
use tern_model_format::dataset::{self, ExtraReport, Sample};
use tern_model_format::export::{build_graph, default_io, HeadSpec};
use tern_model_format::manifest::{ArchitectureInfo, Manifest, OutputKind, Precision, Provenance};
use tern_model_format::weights::{SafeTensorsFile, TensorData};
use tern_model_format::{Preprocessing, FORMAT_VERSION};

use crate::backbone::{named_tensors, Backbone};
use crate::data::{self, check_classes, progress, CacheStats, Encoded, FeatureCache, Item, Skipped};
use crate::metrics::Metrics;

/// `--output`: the final activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OutputChoice {
    /// Two classes: one sigmoid unit (the probability of the second
    /// class); more: softmax.
    Auto,
    /// One softmax unit per class.
    Softmax,
    /// Sigmoid: one unit for two classes, one per class otherwise.
    Sigmoid,
}

/// `--augment`: random flips, crops and colour jitter of training images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AugmentChoice {
    /// Only while fine-tuning (the frozen phase uses cached features).
    Auto,
    /// Always (features are then computed every epoch, not cached).
    On,
    /// Never.
    Off,
}

/// Everything that defines a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    /// The ImageFolder root.
    pub data: PathBuf,
    /// The backbone.
    pub backbone: Arch,
    /// Pretrained weights (safetensors); `None` starts the backbone from
    /// random weights (a baseline that shows what pretraining brings).
    pub weights: Option<PathBuf>,
    /// Validation fraction when the data has no `train/` + `val/` folders.
    pub val_fraction: f64,
    /// Seed of the split, the head's initialisation, shuffling, dropout
    /// and augmentation.
    pub seed: u64,
    /// Epochs of head training.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Learning rate of the head (AdamW).
    pub lr: f64,
    /// Weight decay (AdamW).
    pub weight_decay: f64,
    /// Hidden layer widths of the head (ReLU between).
    pub hidden: Vec<usize>,
    /// Dropout before each layer of the head, while training.
    pub dropout: f64,
    /// Backbone blocks cut from the end.
    pub drop_blocks: usize,
    /// Final activation.
    pub output: OutputChoice,
    /// Last blocks fine-tuned after the head has converged (0: none).
    pub fine_tune_blocks: usize,
    /// Epochs of fine-tuning.
    pub fine_tune_epochs: usize,
    /// Learning rate while fine-tuning (blocks and head).
    pub fine_tune_lr: f64,
    /// Augmentation.
    pub augment: AugmentChoice,
    /// Stop after this many epochs without a better validation result
    /// (0: never stop early).
    pub patience: usize,
    /// Feature cache directory (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Use at most this many images per class and split (quick runs).
    pub max_per_class: Option<usize>,
    /// Batch size of feature extraction.
    pub feature_batch: usize,
    /// Extra ImageFolders merged with `data` (`--extra`; captures).
    pub extra: Vec<PathBuf>,
    /// Take only the extra images that a person reviewed (sidecar
    /// `reviewed: true`, or no sidecar).
    pub extra_reviewed_only: bool,
    /// Where tch computes.
    #[serde(skip)]
    pub device: Device,
}

impl TrainOptions {
    /// Defaults for `data` with pretrained `weights`.
    pub fn new(data: &Path, backbone: Arch, weights: Option<&Path>) -> TrainOptions {
        TrainOptions {
            data: data.to_path_buf(),
            backbone,
            weights: weights.map(Path::to_path_buf),
            val_fraction: 0.2,
            seed: 0,
            epochs: 30,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 1e-4,
            hidden: vec![],
            dropout: 0.2,
            drop_blocks: 0,
            output: OutputChoice::Auto,
            fine_tune_blocks: 0,
            fine_tune_epochs: 5,
            fine_tune_lr: 1e-4,
            augment: AugmentChoice::Auto,
            patience: 8,
            cache_dir: None,
            max_per_class: None,
            feature_batch: 32,
            extra: vec![],
            extra_reviewed_only: true,
            device: Device::Cpu,
        }
    }

    /// The data set these options train on: `data` scanned and split, the
    /// `extra` folders merged in (with what the merge did), then cut to
    /// `max_per_class`. `train` and `train --quantize`'s calibration both
    /// call it, so they see the same split.
    pub fn dataset(&self) -> Result<(dataset::Dataset, Option<ExtraReport>)> {
        let ds = dataset::scan(&self.data, self.val_fraction, self.seed)
            .with_context(|| format!("cannot use {} as an ImageFolder", self.data.display()))?;
        let (ds, extra) = if self.extra.is_empty() {
            (ds, None)
        } else {
            let (ds, r) =
                dataset::merge_extra(ds, &self.extra, self.extra_reviewed_only, self.val_fraction, self.seed)
                    .context("cannot merge the --extra folders")?;
            (ds, Some(r))
        };
        Ok((ds.limit_per_class(self.max_per_class), extra))
    }
}

/// Loss and accuracy after one epoch.
#[derive(Debug, Clone, Serialize)]
pub struct EpochStats {
    /// `head` or `fine-tune`.
    pub phase: &'static str,
    /// 1-based, counted over both phases.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (with dropout and augmentation on).
    pub train_accuracy: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy.
    pub val_accuracy: f64,
    /// Seconds the epoch took.
    pub seconds: f64,
}

/// One validation image's result (the same type as a line of
/// `tern-device eval --json`).
pub use tern_model_format::report::Prediction;

/// Seconds spent in each stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Listing, reading and caching/computing the features (or the
    /// frozen front of the network) before the first epoch.
    pub features: f64,
    /// Head training.
    pub head: f64,
    /// Fine-tuning.
    pub fine_tune: f64,
    /// The final evaluation of the validation set.
    pub evaluation: f64,
    /// Start to end.
    pub total: f64,
}

/// What a training run did and reached.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// The settings.
    pub options: TrainOptions,
    /// Class names.
    pub classes: Vec<String>,
    /// Training images per class (listed).
    pub train_counts: Vec<usize>,
    /// Validation images per class (listed).
    pub val_counts: Vec<usize>,
    /// Whether the split came from `train/` + `val/` folders.
    pub presplit: bool,
    /// Files that could not be used.
    pub skipped: Vec<Skipped>,
    /// What merging the `--extra` folders did.
    pub extra: Option<ExtraReport>,
    /// Per-epoch figures of both phases.
    pub history: Vec<EpochStats>,
    /// The epoch whose weights were kept (1-based).
    pub best_epoch: usize,
    /// Validation metrics of the kept weights after the head phase.
    pub head_metrics: Metrics,
    /// Final validation metrics (after fine-tuning, when it ran).
    pub metrics: Metrics,
    /// Feature cache use.
    pub cache: CacheStats,
    /// Time per stage.
    pub timings: Timings,
    /// The final prediction for each validation image.
    pub predictions: Vec<Prediction>,
}

/// Features whose standard deviation on the training set is below this
/// are treated as constant (pooled ReLU6 features vary by 0.1–1).
const MIN_FEATURE_STD: f64 = 1e-3;

/// Standard deviations are floored (in quadrature) at this fraction of the
/// mean standard deviation of all features.
const RELATIVE_STD_FLOOR: f64 = 0.25;

/// The new classifier on top of the pooled features. The features are
/// standardised first, `(x − shift) / scale` with the training set's mean
/// and standard deviation; export folds that into the first layer, so the
/// graph is plain Gemm layers.
struct Head {
    hidden: Vec<nn::Linear>,
    out: nn::Linear,
    dropout: f64,
    shift: Tensor,
    scale: Tensor,
}

impl Head {
    fn new(root: &nn::Path, features: usize, hidden: &[usize], outputs: usize, dropout: f64) -> Head {
        let head = root.sub("head");
        let mut width = features as i64;
        let mut layers = Vec::new();
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(nn::linear(head.sub("hidden").sub(i.to_string()), width, h as i64, Default::default()));
            width = h as i64;
        }
        let out = nn::linear(head.sub("out"), width, outputs as i64, Default::default());
        let device = root.device();
        let shift = Tensor::zeros([features as i64], (Kind::Float, device));
        let scale = Tensor::ones([features as i64], (Kind::Float, device));
        Head { hidden: layers, out, dropout, shift, scale }
    }

    /// Standardises with the statistics of `features` `[N, F]`. A feature
    /// that (almost) never varies on the training set keeps scale 1: its
    /// weight would otherwise be divided by ~0 when export folds the
    /// scale in, and the least change of that feature (another runtime's
    /// rounding, int8 weights upstream, an unusual image) would swamp the
    /// logits. Seen: a Fashion-MNIST head with a weight of 6.7e10.
    fn fit_standardisation(&mut self, features: &Tensor) {
        let device = self.shift.device();
        self.shift = features.mean_dim(&[0i64][..], false, Kind::Float).to_device(device);
        let std = features.std_dim(&[0i64][..], false, false);
        // A floor relative to the typical feature spread: a feature that
        // barely varies on the training set would otherwise get a weight
        // ~1/std once folded, and amplify any upstream noise (int8 weights,
        // another runtime's rounding) by as much.
        let floor = std.mean(Kind::Float) * RELATIVE_STD_FLOOR;
        let floored = (&std * &std + &floor * &floor).sqrt();
        self.scale = floored.where_self(&std.ge(MIN_FEATURE_STD), &std.ones_like()).to_device(device);
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = ((x - &self.shift) / &self.scale).dropout(self.dropout, train);
        for l in &self.hidden {
            y = y.apply(l).relu().dropout(self.dropout, train);
        }
        y.apply(&self.out)
    }

    /// Name of the first layer's weight, where the standardisation folds in.
    fn first_layer(&self) -> &'static str {
        if self.hidden.is_empty() {
            "head.out"
        } else {
            "head.hidden.0"
        }
    }
}

/// The trained network: backbone (possibly cut and fine-tuned) and head.
pub struct Trained {
    spec: BackboneSpec,
    backbone: Backbone,
    head: Head,
    backbone_vs: nn::VarStore,
    head_vs: nn::VarStore,
    head_spec: HeadSpec,
    classes: Vec<String>,
    pre: Preprocessing,
    weights_sha256: String,
    weights_source: String,
    device: Device,
    /// What the run did.
    pub report: TrainReport,
}

/// Trains a classifier as `o` says; the progress goes to stderr.
pub fn train(o: &TrainOptions) -> Result<Trained> {
    let start = Instant::now();
    let mut timings = Timings::default();
    let (ds, extra) = scan(o)?;
    let mut t = Trained::untrained(o, &ds, extra)?;
    print_counts(&t.report);

    // Phase 1: the head on the frozen backbone.
    let t0 = Instant::now();
    let features = t.encode_features(o, &ds)?;
    timings.features = t0.elapsed().as_secs_f64();
    eprintln!(
        "features: {} from the cache, {} computed, {:.1} s",
        t.report.cache.hits, t.report.cache.computed, timings.features
    );

    let t1 = Instant::now();
    let mut rng = StdRng::seed_from_u64(o.seed);
    let mut best = t.train_head(o, &features, &mut rng)?;
    timings.head = t1.elapsed().as_secs_f64();
    eprintln!(
        "head: best epoch {} with validation accuracy {:.2}% ({:.1} s)",
        best.epoch,
        t.report.head_metrics.accuracy * 100.0,
        timings.head
    );

    // Phase 2: fine-tune the last blocks with the head.
    if o.fine_tune_blocks > 0 && o.fine_tune_epochs > 0 {
        let t2 = Instant::now();
        t.fine_tune(o, &features.train_items, &features.val.items, &mut best, &mut rng)?;
        timings.fine_tune = t2.elapsed().as_secs_f64();
    }

    let t3 = Instant::now();
    t.final_metrics(o, &features.val)?;
    timings.evaluation = t3.elapsed().as_secs_f64();
    timings.total = start.elapsed().as_secs_f64();
    t.report.timings = timings;
    Ok(t)
}

/// The ImageFolder of `o`, split and limited; an error without validation
/// images.
fn scan(o: &TrainOptions) -> Result<(dataset::Dataset, Option<ExtraReport>)> {
    let (ds, extra) = o.dataset()?;
    if let Some(r) = &extra {
        eprintln!(
            "--extra: {} image(s) added, {} duplicate(s) skipped, {} unreviewed skipped{}{}",
            r.added,
            r.duplicates,
            r.unreviewed,
            if r.new_classes.is_empty() { String::new() } else { format!(", new classes: {}", r.new_classes.join(", ")) },
            if o.extra_reviewed_only { " (--extra-reviewed-only)" } else { "" }
        );
    }
    if ds.val.is_empty() {
        bail!("{}: no validation images: give a val/ folder or a --val-fraction above 0", o.data.display());
    }
    Ok((ds, extra))
}

/// How many output units and which activation for `classes` classes.
fn output_units(choice: OutputChoice, classes: usize) -> (usize, OutputKind) {
    match (choice, classes) {
        (OutputChoice::Softmax, _) => (classes, OutputKind::Softmax),
        (OutputChoice::Sigmoid, 2) | (OutputChoice::Auto, 2) => (1, OutputKind::Sigmoid),
        (OutputChoice::Sigmoid, n) => (n, OutputKind::Sigmoid),
        (OutputChoice::Auto, n) => (n, OutputKind::Softmax),
    }
}

/// The inputs of the head for phase 1: features of the training images
/// (`None` with augmentation: they are computed anew every batch), of the
/// validation images, and the readable training images.
struct Features {
    train: Option<Encoded>,
    val: Encoded,
    train_items: Vec<Item>,
}

/// The samples whose files can be read and decoded.
fn readable(samples: &[Sample], skipped: &mut Vec<Skipped>) -> Vec<Item> {
    let bar = progress(samples.len() as u64, "checking images");
    let mut out = Vec::new();
    for s in samples {
        bar.inc(1);
        match std::fs::read(&s.path)
            .map_err(anyhow::Error::from)
            .and_then(|b| tern_model_format::preprocess::decode_image(&b).map(|_| b).map_err(anyhow::Error::from))
        {
            Ok(b) => out.push(Item { path: s.path.clone(), label: s.label, sha256: data::sha256_hex(&b) }),
            Err(e) => skipped.push(Skipped { path: s.path.clone(), reason: format!("{e:#}") }),
        }
    }
    bar.finish_and_clear();
    out
}

fn print_counts(r: &TrainReport) {
    eprintln!(
        "{} classes, {} training and {} validation images{}",
        r.classes.len(),
        r.train_counts.iter().sum::<usize>(),
        r.val_counts.iter().sum::<usize>(),
        if r.presplit { " (train/ and val/ folders)" } else { " (seeded stratified split)" }
    );
    for ((c, tr), va) in r.classes.iter().zip(&r.train_counts).zip(&r.val_counts) {
        eprintln!("  {c:>24}: {tr:>6} train {va:>6} val");
    }
}

impl EpochStats {
    fn new(phase: &'static str, epoch: usize, train: (f64, f64), val: (f64, f64), start: Instant) -> EpochStats {
        EpochStats {
            phase,
            epoch,
            train_loss: train.0,
            train_accuracy: train.1,
            val_loss: val.0,
            val_accuracy: val.1,
            seconds: start.elapsed().as_secs_f64(),
        }
    }
}

/// Advances the epoch bar, prints the epoch's line and keeps it.
fn record(bar: &indicatif::ProgressBar, history: &mut Vec<EpochStats>, stats: EpochStats) {
    bar.inc(1);
    bar.println(epoch_line(&stats));
    history.push(stats);
}

fn epoch_line(s: &EpochStats) -> String {
    format!(
        "{:>9} epoch {:>3}: train loss {:.4} acc {:.2}% | val loss {:.4} acc {:.2}% ({:.1} s)",
        s.phase,
        s.epoch,
        s.train_loss,
        s.train_accuracy * 100.0,
        s.val_loss,
        s.val_accuracy * 100.0,
        s.seconds
    )
}

fn labels(items: &[Item]) -> Vec<usize> {
    items.iter().map(|i| i.label).collect()
}

fn labels_tensor(items: &[Item]) -> Tensor {
    let v: Vec<i64> = items.iter().map(|i| i.label as i64).collect();
    Tensor::from_slice(&v)
}

/// Where an epoch's mini-batches come from.
#[derive(Clone, Copy)]
enum Batches<'a> {
    /// Rows of precomputed values (features or the frozen front's output).
    Cached(&'a Encoded),
    /// The images, decoded and augmented for every batch.
    Images(&'a [Item]),
}

/// The best validation result so far and a copy of its weights.
#[derive(Default)]
struct Best {
    epoch: usize,
    accuracy: f64,
    loss: f64,
    saved: Vec<Vec<(String, Tensor)>>,
}

impl Best {
    fn improves(&self, accuracy: f64, loss: f64) -> bool {
        self.saved.is_empty() || accuracy > self.accuracy || (accuracy == self.accuracy && loss < self.loss)
    }

    fn keep(&mut self, epoch: usize, accuracy: f64, loss: f64, stores: &[&nn::VarStore]) {
        self.epoch = epoch;
        self.accuracy = accuracy;
        self.loss = loss;
        self.saved =
            stores.iter().map(|vs| vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect()).collect();
    }

    fn restore(&self, stores: &[&nn::VarStore]) -> Result<()> {
        for (vs, saved) in stores.iter().zip(&self.saved) {
            let vars = vs.variables();
            for (name, value) in saved {
                let var = vars.get(name).with_context(|| format!("variable {name} vanished"))?;
                tch::no_grad(|| var.shallow_clone().copy_(value));
            }
        }
        Ok(())
    }
}

impl Trained {
    /// The backbone (pretrained weights loaded, frozen) and a new head for
    /// the classes of `ds`, with an empty report.
    fn untrained(o: &TrainOptions, ds: &dataset::Dataset, extra: Option<ExtraReport>) -> Result<Trained> {
        let classes = ds.classes.clone();
        let (outputs, kind) = output_units(o.output, classes.len());

        tch::manual_seed(o.seed as i64);
        let full_spec = o.backbone.spec();
        let spec = full_spec.drop_blocks(o.drop_blocks)?;
        let pre = o.backbone.preprocessing();
        let mut backbone_vs = nn::VarStore::new(o.device);
        let backbone = Backbone::new(&backbone_vs.root(), &spec);
        let (weights_sha256, weights_source) = match &o.weights {
            Some(w) => {
                let file = SafeTensorsFile::open(w).with_context(|| format!("cannot read weights {}", w.display()))?;
                backbone_vs
                    .load(w)
                    .with_context(|| format!("cannot load {} weights from {}", o.backbone.name(), w.display()))?;
                (file.sha256().to_string(), crate::pretrained::weights_source(w))
            }
            None => ("none".to_string(), format!("random initialisation (tch defaults, seed {})", o.seed)),
        };
        backbone_vs.freeze();
        let head_vs = nn::VarStore::new(o.device);
        let head = Head::new(&head_vs.root(), spec.feature_width(), &o.hidden, outputs, o.dropout);
        let head_spec = HeadSpec::trainable(spec.feature_width(), &o.hidden, outputs, kind);

        Ok(Trained {
            spec,
            backbone,
            head,
            backbone_vs,
            head_vs,
            head_spec,
            classes: classes.clone(),
            pre,
            weights_sha256,
            weights_source,
            device: o.device,
            report: TrainReport {
                options: o.clone(),
                train_counts: ds.counts(&ds.train),
                val_counts: ds.counts(&ds.val),
                presplit: ds.presplit,
                classes,
                skipped: vec![],
                extra,
                history: vec![],
                best_epoch: 0,
                head_metrics: Metrics::new(&[], &[], &[]),
                metrics: Metrics::new(&[], &[], &[]),
                cache: CacheStats::default(),
                timings: Timings::default(),
                predictions: vec![],
            },
        })
    }

    /// The frozen backbone's features of the images of `ds` (through the
    /// cache when `o` names one), the skipped files recorded and listed, the
    /// classes checked, the head's standardisation fitted.
    fn encode_features(&mut self, o: &TrainOptions, ds: &dataset::Dataset) -> Result<Features> {
        let pre = self.pre;
        let head_augment = o.augment == AugmentChoice::On;
        let cache = o.cache_dir.as_ref().map(|d| FeatureCache::new(d, &self.cache_key()));
        let width = self.spec.feature_width();
        let (train_enc, val_enc) = {
            let bb = &self.backbone;
            let net = |x: &Tensor| bb.features(x);
            let train_enc = if head_augment {
                None
            } else {
                Some(data::encode(
                    &ds.train,
                    &pre,
                    &net,
                    Some(width),
                    cache.as_ref(),
                    o.device,
                    o.feature_batch,
                    "features train",
                )?)
            };
            let val_enc = data::encode(
                &ds.val,
                &pre,
                &net,
                Some(width),
                cache.as_ref(),
                o.device,
                o.feature_batch,
                "features val",
            )?;
            (train_enc, val_enc)
        };
        let train_items: Vec<Item> = match &train_enc {
            Some(e) => e.items.clone(),
            None => readable(&ds.train, &mut self.report.skipped),
        };
        for e in train_enc.iter().chain([&val_enc]) {
            self.report.skipped.extend(e.skipped.iter().cloned());
            self.report.cache.hits += e.stats.hits;
            self.report.cache.computed += e.stats.computed;
        }
        for s in &self.report.skipped {
            eprintln!("skipped {}: {}", s.path.display(), s.reason);
        }
        check_classes(&self.classes, &train_items, "training")?;
        check_classes(&self.classes, &val_enc.items, "validation")?;
        if let Some(enc) = &train_enc {
            self.head.fit_standardisation(&enc.values);
        }
        Ok(Features { train: train_enc, val: val_enc, train_items })
    }

    /// Phase 1: AdamW on the head for up to `o.epochs` epochs (early stop
    /// after `o.patience` without a better validation result), the best
    /// epoch's weights restored and its metrics recorded. Returns the best.
    fn train_head(&mut self, o: &TrainOptions, f: &Features, rng: &mut StdRng) -> Result<Best> {
        let val_y = labels_tensor(&f.val.items);
        let mut best = Best::default();
        let mut opt = nn::AdamW { wd: o.weight_decay, ..Default::default() }.build(&self.head_vs, o.lr)?;
        let bar = progress(o.epochs as u64, "head epochs");
        for epoch in 1..=o.epochs {
            let e0 = Instant::now();
            let (train_loss, train_acc) = match &f.train {
                Some(enc) => {
                    let net = |x: &Tensor| self.head.forward(x, true);
                    self.epoch(Batches::Cached(enc), &net, &mut [&mut opt], o.batch_size, rng)?
                }
                None => {
                    let net = |x: &Tensor| self.head.forward(&tch::no_grad(|| self.backbone.features(x)), true);
                    self.epoch(Batches::Images(&f.train_items), &net, &mut [&mut opt], o.batch_size, rng)?
                }
            };
            let (val_loss, val_acc) = self.score(&self.head.forward(&f.val.values.to_device(o.device), false), &val_y)?;
            let stats = EpochStats::new("head", epoch, (train_loss, train_acc), (val_loss, val_acc), e0);
            record(&bar, &mut self.report.history, stats);
            if best.improves(val_acc, val_loss) {
                best.keep(epoch, val_acc, val_loss, &[&self.head_vs]);
            } else if o.patience > 0 && epoch - best.epoch >= o.patience {
                bar.println(format!("early stop: no better validation result for {} epochs", o.patience));
                break;
            }
        }
        bar.finish_and_clear();
        best.restore(&[&self.head_vs])?;
        self.report.best_epoch = best.epoch;
        let head_logits = self.head.forward(&f.val.values.to_device(o.device), false);
        self.report.head_metrics = Metrics::new(&self.classes, &labels(&f.val.items), &self.predict(&head_logits)?.0);
        Ok(best)
    }

    /// The final predictions on the validation images and their metrics,
    /// into the report.
    fn final_metrics(&mut self, o: &TrainOptions, val: &Encoded) -> Result<()> {
        // A backbone that stayed frozen gives the cached features again: only
        // the head needs to run.
        let fine_tuned =
            self.report.history.iter().any(|e| e.phase == "fine-tune" && e.epoch == self.report.best_epoch);
        let predictions = if fine_tuned {
            self.evaluate(&val.items, o.feature_batch)?
        } else {
            let logits = tch::no_grad(|| self.head.forward(&val.values.to_device(o.device), false));
            self.predictions(&val.items, &logits)?
        };
        let truth: Vec<usize> = predictions.iter().map(|p| p.label).collect();
        let predicted: Vec<usize> = predictions.iter().map(|p| p.predicted).collect();
        self.report.metrics = Metrics::new(&self.classes, &truth, &predicted);
        self.report.predictions = predictions;
        Ok(())
    }

    /// The cache key of the frozen feature extractor.
    fn cache_key(&self) -> String {
        format!(
            "tern-features v1|{}|drop {}|{}|{:?}",
            self.weights_sha256,
            self.report.options.drop_blocks,
            self.spec.backbone.name(),
            self.pre
        ) + &match &self.report.options.weights {
            Some(_) => String::new(),
            None => format!("|random seed {}", self.report.options.seed),
        }
    }

    /// The loss of `logits` against labels `y` (on any device).
    fn loss(&self, logits: &Tensor, y: &Tensor) -> Tensor {
        let y = y.to_device(logits.device());
        match (self.head_spec.output_kind, self.head_spec.output_width()) {
            (OutputKind::Softmax, _) => logits.cross_entropy_for_logits(&y),
            (OutputKind::Sigmoid, 1) => logits.squeeze_dim(1).binary_cross_entropy_with_logits::<Tensor>(
                &y.to_kind(Kind::Float),
                None,
                None,
                Reduction::Mean,
            ),
            (OutputKind::Sigmoid, n) => logits.binary_cross_entropy_with_logits::<Tensor>(
                &y.one_hot(n as i64).to_kind(Kind::Float),
                None,
                None,
                Reduction::Mean,
            ),
        }
    }

    /// Predicted labels and per-label probabilities of `logits`.
    fn predict(&self, logits: &Tensor) -> Result<(Vec<usize>, Vec<Vec<f32>>)> {
        let logits = logits.detach().to_device(Device::Cpu).to_kind(Kind::Float);
        let probs = match (self.head_spec.output_kind, self.head_spec.output_width()) {
            (OutputKind::Softmax, _) => logits.softmax(-1, Kind::Float),
            (OutputKind::Sigmoid, 1) => {
                let p = logits.sigmoid();
                Tensor::cat(&[p.ones_like() - &p, p], 1)
            }
            (OutputKind::Sigmoid, _) => logits.sigmoid(),
        };
        let n = probs.size()[0];
        let mut preds = Vec::with_capacity(n as usize);
        let mut all = Vec::with_capacity(n as usize);
        for i in 0..n {
            let row = Vec::<f32>::try_from(probs.get(i))?;
            // Ties go to the lower index, as on the device.
            let best = row.iter().enumerate().fold(0, |b, (k, v)| if *v > row[b] { k } else { b });
            preds.push(best);
            all.push(row);
        }
        Ok((preds, all))
    }

    /// Loss and accuracy of `logits` against `y`.
    fn score(&self, logits: &Tensor, y: &Tensor) -> Result<(f64, f64)> {
        let loss = f64::try_from(tch::no_grad(|| self.loss(logits, y)))?;
        let (pred, _) = self.predict(logits)?;
        let y = Vec::<i64>::try_from(y.to_device(Device::Cpu))?;
        let correct = pred.iter().zip(&y).filter(|(p, t)| **p as i64 == **t).count();
        Ok((loss, correct as f64 / y.len().max(1) as f64))
    }

    /// One epoch over shuffled mini-batches of `src`: `net` maps a batch
    /// to logits (with gradients where something trains), and every
    /// optimizer in `opts` is zeroed, back-propagated into and stepped.
    /// Returns the mean loss and the accuracy.
    fn epoch(
        &self,
        src: Batches,
        net: &dyn Fn(&Tensor) -> Tensor,
        opts: &mut [&mut nn::Optimizer],
        batch: usize,
        rng: &mut StdRng,
    ) -> Result<(f64, f64)> {
        let labels: Vec<usize> = match src {
            Batches::Cached(enc) => enc.items.iter().map(|i| i.label).collect(),
            Batches::Images(items) => items.iter().map(|i| i.label).collect(),
        };
        let n = labels.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);
        let bar = match src {
            Batches::Images(_) => progress(n as u64, "augmented epoch"),
            Batches::Cached(_) => indicatif::ProgressBar::hidden(),
        };
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        for chunk in order.chunks(batch.max(1)) {
            let x = match src {
                Batches::Cached(enc) => {
                    let idx: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
                    enc.values.index_select(0, &Tensor::from_slice(&idx)).to_device(self.device)
                }
                Batches::Images(items) => {
                    let inputs = chunk
                        .iter()
                        .map(|&i| data::input_of(&items[i].path, &self.pre, Some(rng)))
                        .collect::<Result<Vec<_>>>()?;
                    data::stack(&inputs, &self.pre, self.device)
                }
            };
            let logits = net(&x);
            let y: Vec<i64> = chunk.iter().map(|&i| labels[i] as i64).collect();
            let loss = self.loss(&logits, &Tensor::from_slice(&y));
            for o in opts.iter_mut() {
                o.zero_grad();
            }
            loss.backward();
            for o in opts.iter_mut() {
                o.step();
            }
            loss_sum += f64::try_from(&loss)? * chunk.len() as f64;
            let (pred, _) = self.predict(&logits)?;
            correct += pred.iter().zip(chunk).filter(|(p, &i)| **p == labels[i]).count();
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok((loss_sum / n.max(1) as f64, correct as f64 / n.max(1) as f64))
    }

    /// Unfreezes the last `o.fine_tune_blocks` blocks (and the head
    /// convolution) and trains them with the head at the lower rate.
    fn fine_tune(
        &mut self,
        o: &TrainOptions,
        train_items: &[Item],
        val_items: &[Item],
        best: &mut Best,
        rng: &mut StdRng,
    ) -> Result<()> {
        let n_blocks = self.backbone.num_blocks();
        if o.fine_tune_blocks > n_blocks {
            bail!("--fine-tune-blocks {}: the backbone has {n_blocks} blocks", o.fine_tune_blocks);
        }
        let split = n_blocks - o.fine_tune_blocks;
        let mut prefixes: Vec<String> = self.spec.blocks[split..]
            .iter()
            .flat_map(|b| b.convs().flat_map(|c| [format!("{}.", c.conv), format!("{}.", c.bn)]))
            .collect();
        if let Some(h) = &self.spec.head_conv {
            prefixes.extend([format!("{}.", h.conv), format!("{}.", h.bn)]);
        }
        let mut original = Best::default();
        original.keep(0, 0.0, 0.0, &[&self.backbone_vs]);
        let mut unfrozen = 0;
        for (name, t) in self.backbone_vs.variables() {
            let stat = name.ends_with("running_mean") || name.ends_with("running_var");
            if !stat && prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                let _ = t.set_requires_grad(true);
                unfrozen += t.numel();
            }
        }
        eprintln!("fine-tuning blocks {split}..{n_blocks} ({unfrozen} weights) at lr {}", o.fine_tune_lr);
        let augment = o.augment != AugmentChoice::Off;
        // Without augmentation the frozen front is the same every epoch:
        // computed once, in memory.
        let (front_train, front_val) = {
            let bb = &self.backbone;
            let net = |x: &Tensor| bb.forward_front(x, split);
            let tr = if augment {
                None
            } else {
                let s: Vec<Sample> =
                    train_items.iter().map(|i| Sample { path: i.path.clone(), label: i.label }).collect();
                Some(data::encode(&s, &self.pre, &net, None, None, self.device, o.feature_batch, "front train")?)
            };
            let s: Vec<Sample> = val_items.iter().map(|i| Sample { path: i.path.clone(), label: i.label }).collect();
            (tr, data::encode(&s, &self.pre, &net, None, None, self.device, o.feature_batch, "front val")?)
        };
        let wd = nn::AdamW { wd: o.weight_decay, ..Default::default() };
        let mut opt_bb = wd.build(&self.backbone_vs, o.fine_tune_lr)?;
        let mut opt_head = wd.build(&self.head_vs, o.fine_tune_lr)?;
        let val_y = labels_tensor(&front_val.items);
        let first = self.report.history.len() + 1;
        let bar = progress(o.fine_tune_epochs as u64, "fine-tune epochs");
        // The head phase's best is the bar to beat.
        for epoch in first..first + o.fine_tune_epochs {
            let e0 = Instant::now();
            let opts: &mut [&mut nn::Optimizer] = &mut [&mut opt_bb, &mut opt_head];
            let (train_loss, train_acc) = match &front_train {
                Some(enc) => {
                    let net = |x: &Tensor| self.head.forward(&self.backbone.forward_back(x, split, false), true);
                    self.epoch(Batches::Cached(enc), &net, opts, o.batch_size, rng)?
                }
                None => {
                    let net = |x: &Tensor| {
                        let front = tch::no_grad(|| self.backbone.forward_front(x, split));
                        self.head.forward(&self.backbone.forward_back(&front, split, false), true)
                    };
                    self.epoch(Batches::Images(train_items), &net, opts, o.batch_size, rng)?
                }
            };
            let logits = self.back_logits(&front_val.values, split, o.feature_batch);
            let (val_loss, val_acc) = self.score(&logits, &val_y)?;
            let stats = EpochStats::new("fine-tune", epoch, (train_loss, train_acc), (val_loss, val_acc), e0);
            record(&bar, &mut self.report.history, stats);
            if best.improves(val_acc, val_loss) {
                best.keep(epoch, val_acc, val_loss, &[&self.head_vs, &self.backbone_vs]);
            }
        }
        bar.finish_and_clear();
        if best.epoch >= first {
            best.restore(&[&self.head_vs, &self.backbone_vs])?;
        } else {
            // Fine-tuning never beat the head alone: keep the head phase's
            // weights, and the backbone as it was.
            best.restore(&[&self.head_vs])?;
            original.restore(&[&self.backbone_vs])?;
            eprintln!("fine-tuning did not improve on the head alone; the head-only weights are kept");
        }
        self.report.best_epoch = best.epoch;
        self.backbone_vs.freeze();
        Ok(())
    }

    fn back_logits(&self, front: &Tensor, split: usize, batch: usize) -> Tensor {
        tch::no_grad(|| {
            let n = front.size()[0];
            let mut outs = Vec::new();
            let mut i = 0;
            while i < n {
                let len = (batch as i64).min(n - i);
                let x = front.narrow(0, i, len).to_device(self.device);
                outs.push(self.head.forward(&self.backbone.forward_back(&x, split, false), false));
                i += len;
            }
            Tensor::cat(&outs, 0)
        })
    }

    /// Runs the whole trained network on `items` (no cache, no
    /// augmentation): the host's own predictions.
    pub fn evaluate(&self, items: &[Item], batch: usize) -> Result<Vec<Prediction>> {
        let samples: Vec<Sample> = items.iter().map(|i| Sample { path: i.path.clone(), label: i.label }).collect();
        let bb = &self.backbone;
        let head = &self.head;
        let net = |x: &Tensor| head.forward(&bb.features(x), false);
        let enc = data::encode(&samples, &self.pre, &net, None, None, self.device, batch, "evaluating")?;
        self.predictions(&enc.items, &enc.values)
    }

    /// One [`Prediction`] per item from the head's logits.
    fn predictions(&self, items: &[Item], logits: &Tensor) -> Result<Vec<Prediction>> {
        let (preds, probs) = self.predict(logits)?;
        Ok(items
            .iter()
            .zip(preds)
            .zip(probs)
            .map(|((i, predicted), probabilities)| Prediction {
                path: i.path.clone(),
                label: i.label,
                predicted,
                probabilities,
            })
            .collect())
    }

    /// Class names, in output order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The trained weights under their export names.
    pub fn named_tensors(&self) -> Result<HashMap<String, TensorData>> {
        let mut all = named_tensors(&self.backbone_vs)?;
        let mut head = named_tensors(&self.head_vs)?;
        // Fold the standardisation into the first layer:
        // W (x − m) / s + b = (W / s) x + (b − W (m / s)).
        let first = self.head.first_layer();
        let vars = self.head_vs.variables();
        let (w, b) = match (vars.get(&format!("{first}.weight")), vars.get(&format!("{first}.bias"))) {
            (Some(w), Some(b)) => (w.detach().to_kind(Kind::Double), b.detach().to_kind(Kind::Double)),
            _ => bail!("the head has no layer {first}"),
        };
        let s = self.head.scale.to_kind(Kind::Double);
        let m = self.head.shift.to_kind(Kind::Double);
        let w2 = &w / s.unsqueeze(0);
        let b2 = &b - w2.matmul(&m);
        for (name, t) in [(format!("{first}.weight"), w2), (format!("{first}.bias"), b2)] {
            let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let data = Vec::<f32>::try_from(t.flatten(0, -1))?;
            head.insert(name, TensorData::new(shape, data)?);
        }
        all.extend(head);
        Ok(all)
    }

    /// Writes the float bundle (atomically) with labels, preprocessing,
    /// metrics and provenance.
    pub fn export(&self, out: &Path) -> Result<Manifest> {
        let weights = self.named_tensors()?;
        let io = default_io(&self.head_spec);
        let graph = build_graph(&self.spec, &self.head_spec, &weights, &self.pre, &io)
            .context("cannot build the ONNX graph of the trained network")?;
        let r = &self.report;
        let metrics = serde_json::json!({
            "validation": {
                "accuracy": r.metrics.accuracy,
                "samples": r.metrics.samples,
                "per_class": r.metrics.per_class,
                "confusion": r.metrics.confusion,
                "measured_by": "tern-host (libtorch), float",
            },
            "head_only_validation_accuracy": r.head_metrics.accuracy,
        });
        let training = serde_json::json!({
            "data": r.options.data,
            "options": r.options,
            "train_counts": r.train_counts,
            "val_counts": r.val_counts,
            "presplit": r.presplit,
            "skipped_files": r.skipped.len(),
            "best_epoch": r.best_epoch,
            "epochs_run": r.history.len(),
        });
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            labels: self.classes.clone(),
            preprocessing: self.pre,
            io,
            precision: Precision::F32,
            quantization: None,
            metrics: Some(metrics),
            architecture: ArchitectureInfo {
                backbone: self.spec.backbone.name().into(),
                drop_blocks: r.options.drop_blocks,
                hidden: r.options.hidden.clone(),
            },
            provenance: Provenance {
                created_by: format!("tern-host {}", env!("CARGO_PKG_VERSION")),
                backbone_weights_sha256: self.weights_sha256.clone(),
                backbone_weights_source: self.weights_source.clone(),
                training: Some(training),
            },
            graph_sha256: String::new(),
        };
        tern_model_format::bundle::write(out, graph, manifest)
            .with_context(|| format!("cannot write {}", out.display()))
    }
}

impl Trained {
    /// Writes `report.json`, `metrics.txt`, `confusion.png` and
    /// `curves.png` into `dir`.
    pub fn write_report(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let r = &self.report;
        let json = serde_json::to_vec_pretty(r)?;
        tern_model_format::files::write_atomic(&dir.join("report.json"), &json)?;
        let mut text = format!("after the head phase (best epoch {}):\n{}", r.best_epoch, r.head_metrics.table());
        text += &format!("\nfinal:\n{}", r.metrics.table());
        tern_model_format::files::write_atomic(&dir.join("metrics.txt"), text.as_bytes())?;
        let title = format!("validation, accuracy {:.2}% on {} images", r.metrics.accuracy * 100.0, r.metrics.samples);
        crate::plot::confusion_png(&dir.join("confusion.png"), &title, &self.classes, &r.metrics.confusion)?;
        let series: Vec<_> =
            r.history.iter().map(|e| (e.epoch, e.train_loss, e.val_loss, e.train_accuracy, e.val_accuracy)).collect();
        crate::plot::curves_png(&dir.join("curves.png"), "training curves", &series)?;
        Ok(())
    }
}
