//! Reading an ImageFolder for training: decoding (unreadable files skipped
//! and listed), the shared preprocessing, optional augmentation, and
//! backbone features cached on disk.
//!
//! Images are streamed in batches: nothing holds more than one batch of
//! decoded inputs at a time, so a data set of any size fits in memory as
//! long as its pooled features do.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::RngExt;
use tch::{Device, Kind, Tensor};
use tern_model_format::dataset::Sample;
use tern_model_format::preprocess::{decode_image, preprocess, MAX_IMAGE_FILE_BYTES};
use tern_model_format::Preprocessing;

/// A file that could not be used, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// A readable sample: its file, label and content hash.
#[derive(Debug, Clone)]
pub struct Item {
    /// The file.
    pub path: PathBuf,
    /// Label index.
    pub label: usize,
    /// sha256 (hex) of the file's bytes.
    pub sha256: String,
}

/// Reads one file: its bytes (size-limited) and their sha256.
fn read_file(path: &Path) -> Result<(Vec<u8>, String)> {
    let len = std::fs::metadata(path).context("cannot stat")?.len();
    if len > MAX_IMAGE_FILE_BYTES {
        bail!("{len} bytes, more than the {MAX_IMAGE_FILE_BYTES} accepted");
    }
    let bytes = std::fs::read(path).context("cannot read")?;
    let sha = sha256_hex(&bytes);
    Ok((bytes, sha))
}

/// Decodes one sample into a model input (with `augment`, randomly
/// flipped, cropped and colour-jittered first).
pub fn input_of(path: &Path, pre: &Preprocessing, augment: Option<&mut StdRng>) -> Result<Vec<f32>> {
    let (bytes, _) = read_file(path).with_context(|| path.display().to_string())?;
    let img = decode_image(&bytes).with_context(|| path.display().to_string())?;
    Ok(match augment {
        Some(rng) => augmented(&img, pre, rng),
        None => preprocess(&img, pre),
    })
}

/// Random horizontal flip, random resized crop (scale 0.6–1, aspect
/// 3/4–4/3), brightness and contrast jitter (±20 %), then the shared
/// preprocessing.
pub fn augmented(img: &DynamicImage, pre: &Preprocessing, rng: &mut StdRng) -> Vec<f32> {
    let (w, h) = (img.width(), img.height());
    let area = f64::from(w) * f64::from(h) * rng.random_range(0.6..=1.0);
    let aspect = (rng.random_range((0.75f64).ln()..=(4.0f64 / 3.0).ln())).exp();
    let cw = ((area * aspect).sqrt().round() as u32).clamp(1, w);
    let ch = ((area / aspect).sqrt().round() as u32).clamp(1, h);
    let x = rng.random_range(0..=w - cw);
    let y = rng.random_range(0..=h - ch);
    let mut crop = img.crop_imm(x, y, cw, ch);
    if rng.random_bool(0.5) {
        crop = crop.fliph();
    }
    let mut v = preprocess(&crop, pre);
    let brightness: f32 = rng.random_range(-0.2..=0.2);
    let contrast: f32 = rng.random_range(0.8..=1.2);
    let plane = v.len() / 3;
    for (c, chunk) in v.chunks_mut(plane).enumerate() {
        let (m, s) = (pre.mean[c], pre.std[c]);
        for x in chunk {
            let p = *x * s + m;
            let p = ((p - 0.5) * contrast + 0.5 + brightness).clamp(0.0, 1.0);
            *x = (p - m) / s;
        }
    }
    v
}

/// A batch `[N, 3, H, W]` from flat inputs.
pub fn stack(inputs: &[Vec<f32>], pre: &Preprocessing, device: Device) -> Tensor {
    let (h, w) = (i64::from(pre.height), i64::from(pre.width));
    let flat: Vec<f32> = inputs.iter().flat_map(|v| v.iter().copied()).collect();
    Tensor::from_slice(&flat).reshape([inputs.len() as i64, 3, h, w]).to_device(device)
}

/// On-disk cache of pooled backbone features, one small file per image,
/// keyed by (backbone weights, architecture, preprocessing, image sha256).
pub struct FeatureCache {
    dir: PathBuf,
    model_key: String,
}

impl FeatureCache {
    /// A cache under `dir` for the network described by `model_key`.
    pub fn new(dir: &Path, model_key: &str) -> Self {
        FeatureCache { dir: dir.to_path_buf(), model_key: sha256_hex(model_key.as_bytes()) }
    }

    fn path(&self, image_sha: &str) -> PathBuf {
        let key = sha256_hex(format!("{}:{image_sha}", self.model_key).as_bytes());
        self.dir.join(&key[..2]).join(format!("{key}.f32"))
    }

    fn get(&self, image_sha: &str, width: usize) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.path(image_sha)).ok()?;
        if bytes.len() != width * 4 {
            return None;
        }
        Some(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn put(&self, image_sha: &str, v: &[f32]) -> Result<()> {
        let path = self.path(image_sha);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        tern_model_format::files::write_atomic(&path, &bytes)?;
        Ok(())
    }
}

/// Counts of cache use.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    /// Features read from the cache.
    pub hits: usize,
    /// Features computed (and stored when a cache is used).
    pub computed: usize,
}

/// The outcome of [`encode`]: one row of `values` per readable sample.
pub struct Encoded {
    /// The readable samples, in input order.
    pub items: Vec<Item>,
    /// `[N, …]` outputs of the network for `items`, on the CPU.
    pub values: Tensor,
    /// The files that could not be used.
    pub skipped: Vec<Skipped>,
    /// Cache use.
    pub stats: CacheStats,
}

/// Streams `samples` through `net` (a function of a normalised batch,
/// called under `no_grad`) in batches of `batch_size`, reading from and
/// writing to `cache` when given (then `net`'s output must be `[N, width]`).
/// Unreadable or undecodable files are skipped and listed.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    samples: &[Sample],
    pre: &Preprocessing,
    net: &dyn Fn(&Tensor) -> Tensor,
    width: Option<usize>,
    cache: Option<&FeatureCache>,
    device: Device,
    batch_size: usize,
    what: &str,
) -> Result<Encoded> {
    let bar = progress(samples.len() as u64, what);
    let mut items = Vec::with_capacity(samples.len());
    let mut rows: Vec<Option<Tensor>> = Vec::with_capacity(samples.len());
    let mut skipped = Vec::new();
    let mut stats = CacheStats::default();
    let mut pending: Vec<(usize, Vec<f32>)> = Vec::new();
    let flush = |pending: &mut Vec<(usize, Vec<f32>)>, rows: &mut Vec<Option<Tensor>>, items: &[Item]| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let inputs: Vec<Vec<f32>> = pending.iter_mut().map(|(_, v)| std::mem::take(v)).collect();
        let out = tch::no_grad(|| net(&stack(&inputs, pre, device))).to_device(Device::Cpu).to_kind(Kind::Float);
        for (k, (i, _)) in pending.iter().enumerate() {
            let row = out.get(k as i64);
            if let Some(c) = cache {
                let v = Vec::<f32>::try_from(row.flatten(0, -1))?;
                c.put(&items[*i].sha256, &v)?;
            }
            rows[*i] = Some(row);
        }
        pending.clear();
        Ok(())
    };
    for s in samples {
        bar.inc(1);
        let (bytes, sha) = match read_file(&s.path) {
            Ok(r) => r,
            Err(e) => {
                skipped.push(Skipped { path: s.path.clone(), reason: format!("{e:#}") });
                continue;
            }
        };
        if let (Some(c), Some(w)) = (cache, width) {
            if let Some(v) = c.get(&sha, w) {
                items.push(Item { path: s.path.clone(), label: s.label, sha256: sha });
                rows.push(Some(Tensor::from_slice(&v)));
                stats.hits += 1;
                continue;
            }
        }
        let img = match decode_image(&bytes) {
            Ok(img) => img,
            Err(e) => {
                skipped.push(Skipped { path: s.path.clone(), reason: e.to_string() });
                continue;
            }
        };
        items.push(Item { path: s.path.clone(), label: s.label, sha256: sha });
        rows.push(None);
        pending.push((items.len() - 1, preprocess(&img, pre)));
        stats.computed += 1;
        if pending.len() >= batch_size.max(1) {
            flush(&mut pending, &mut rows, &items)?;
        }
    }
    flush(&mut pending, &mut rows, &items)?;
    bar.finish_and_clear();
    let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
    let values = if rows.is_empty() { Tensor::zeros([0], (Kind::Float, Device::Cpu)) } else { Tensor::stack(&rows, 0) };
    Ok(Encoded { items, values, skipped, stats })
}

/// Refuses a split in which some class kept no readable image.
pub fn check_classes(classes: &[String], items: &[Item], what: &str) -> Result<()> {
    for (i, c) in classes.iter().enumerate() {
        if !items.iter().any(|l| l.label == i) {
            bail!("class `{c}` has no readable image in the {what} set");
        }
    }
    Ok(())
}

/// A progress bar on stderr (indicatif hides it when stderr is not a
/// terminal).
pub fn progress(len: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:>20} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg.to_owned());
    bar
}

pub use tern_model_format::files::sha256_hex;
