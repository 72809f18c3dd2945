//! Image picking, batching and activation ranges for calibration.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::data::progress;
use tern_model_format::preprocess::{open_image, preprocess};
use tern_model_format::quantize::{Calibrator, Method, Range};
use tern_model_format::Preprocessing;

use super::{OnnxNet, BATCH};

/// Image files under `root` (recursively), sorted, then a seeded shuffle
/// keeps `max` of them.
pub fn pick_images(root: &Path, max: usize, seed: u64) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir.is_file() {
            files.push(dir);
            continue;
        }
        let entries = std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for e in entries {
            let p = e.with_context(|| format!("cannot read {}", dir.display()))?.path();
            let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if tern_model_format::dataset::is_image_path(&p) {
                files.push(p);
            }
        }
    }
    if files.is_empty() {
        bail!("{}: no image files", root.display());
    }
    files.sort();
    // Fisher–Yates with splitmix64: the same files on every machine.
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..files.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        files.swap(i, j);
    }
    files.truncate(max);
    Ok(files)
}

/// Preprocessed batches of `files`; unreadable images are reported on
/// stderr and skipped. Returns the batches and the files kept.
pub fn load_batches(files: &[PathBuf], pre: &Preprocessing, what: &str) -> Result<(Vec<Tensor>, Vec<PathBuf>)> {
    let bar = progress(files.len() as u64, what);
    let [_, c, h, w] = pre.input_shape().map(|d| d as i64);
    let mut batches = Vec::new();
    let mut kept = Vec::new();
    let mut cur: Vec<f32> = Vec::new();
    let mut n = 0;
    for f in files {
        bar.inc(1);
        match open_image(f) {
            Ok(img) => {
                cur.extend(preprocess(&img, pre));
                kept.push(f.clone());
                n += 1;
            }
            Err(e) => bar.println(format!("skipping {}: {e}", f.display())),
        }
        if n == BATCH {
            batches.push(Tensor::from_slice(&cur).reshape([n as i64, c, h, w]));
            cur.clear();
            n = 0;
        }
    }
    if n > 0 {
        batches.push(Tensor::from_slice(&cur).reshape([n as i64, c, h, w]));
    }
    bar.finish_and_clear();
    if kept.is_empty() {
        bail!("none of the {} {what} images could be read", files.len());
    }
    Ok((batches, kept))
}

/// Activation ranges of `names` over `batches` by `method`.
pub fn calibrate(
    net: &OnnxNet,
    batches: &[Tensor],
    names: &[String],
    method: Method,
) -> Result<BTreeMap<String, Range>> {
    let mut cal = Calibrator::new(method);
    let passes = if cal.needs_histograms() { 2 } else { 1 };
    let bar = progress((batches.len() * passes) as u64, "calibrating");
    for pass in 0..passes {
        for x in batches {
            let _logits = tch::no_grad(|| {
                net.run(x, names, |name, t| {
                    let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default();
                    if pass == 0 {
                        cal.observe_range(name, &v);
                    } else {
                        cal.observe_histogram(name, &v);
                    }
                })
            })?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(cal.ranges()?)
}

/// Per-channel means (axis 1) of `names` over `batches`.
pub fn channel_means(net: &OnnxNet, batches: &[Tensor], names: &[String]) -> Result<BTreeMap<String, Vec<f32>>> {
    let mut sums: HashMap<String, (Tensor, f64)> = HashMap::new();
    let bar = progress(batches.len() as u64, "input means");
    for x in batches {
        let _logits = tch::no_grad(|| {
            net.run(x, names, |name, t| {
                let c = t.size().get(1).copied().unwrap_or(1).max(1);
                let dims: Vec<i64> = (0..t.dim() as i64).filter(|&d| d != 1).collect();
                let s = t.sum_dim_intlist(dims.as_slice(), false, Kind::Double);
                let count = (t.numel() as i64 / c) as f64;
                let e = sums
                    .entry(name.to_owned())
                    .or_insert_with(|| (Tensor::zeros([c], (Kind::Double, tch::Device::Cpu)), 0.0));
                e.0 += s;
                e.1 += count;
            })
        })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut out = BTreeMap::new();
    for (name, (s, n)) in sums {
        let mean = Vec::<f64>::try_from(s / n.max(1.0))?;
        out.insert(name, mean.into_iter().map(|v| v as f32).collect());
    }
    Ok(out)
}

/// Up to `max` images of `dir` (seeded draw) that are not among `calib`.
/// An error when every image of `dir` is a calibration image.
pub fn held_out(dir: &Path, calib: &[PathBuf], max: usize, seed: u64) -> Result<Vec<PathBuf>> {
    let calib: std::collections::HashSet<PathBuf> = calib.iter().filter_map(|f| f.canonicalize().ok()).collect();
    let files: Vec<PathBuf> = pick_images(dir, usize::MAX, seed ^ 0x5EED)?
        .into_iter()
        .filter(|f| f.canonicalize().map(|c| !calib.contains(&c)).unwrap_or(true))
        .take(max)
        .collect();
    if files.is_empty() {
        bail!("{}: every image is also a calibration image; give held-out images", dir.display());
    }
    Ok(files)
}
