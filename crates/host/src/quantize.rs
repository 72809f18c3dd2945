//! Post-training int8 quantization of a bundle: calibration on real images
//! and float-vs-int8 evaluation on held-out ones.
//!
//! The bundle's own ONNX graph is run in libtorch by a small interpreter of
//! the operators Tern writes (float: `Conv`, `Clip`, `Add`,
//! `GlobalAveragePool`, `Flatten`, `Gemm`, `Relu`, `Softmax`, `Sigmoid`;
//! int8: `QuantizeLinear`, `DequantizeLinear`, `QLinearConv`), so any
//! bundle (pretrained or trained) is calibrated from the very graph that
//! gets quantized, and the quantized graph is evaluated with ONNX's integer
//! semantics (int32 accumulation, round half to even, saturation) before it
//! is written. The graph writing itself is in
//! [`tern_model_format::quantize`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use prost::Message;
use tch::{Kind, Tensor};
use tern_model_format::onnx::{self, tensor_proto::DataType};
use tern_model_format::preprocess::{open_image, preprocess};
use tern_model_format::quantize::{
    calibration_tensors, mean_tensors, quantize_graph, Calibrator, Method, Options, Range,
};
use tern_model_format::{Bundle, Manifest, Preprocessing};

/// Images per forward pass.
const BATCH: usize = 16;

/// A progress bar on stderr (hidden when stderr is not a terminal).
fn progress(len: u64, msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg.to_owned());
    bar
}

/// A Tern ONNX graph ready to run in libtorch (CPU).
pub struct OnnxNet {
    nodes: Vec<onnx::NodeProto>,
    consts: HashMap<String, Tensor>,
    input: String,
    logits: String,
}

fn attr<'a>(n: &'a onnx::NodeProto, name: &str) -> Option<&'a onnx::AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

fn ints(n: &onnx::NodeProto, name: &str, default: &[i64]) -> Vec<i64> {
    attr(n, name).map(|a| a.ints.clone()).filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_vec())
}

fn int(n: &onnx::NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).and_then(|a| a.i).unwrap_or(default)
}

/// An initializer as a tch tensor (integers are held exactly in f32/f64).
fn to_tensor(t: &onnx::TensorProto) -> Result<Tensor> {
    let name = t.name.as_deref().unwrap_or("?");
    let dims: Vec<i64> = t.dims.clone();
    let n: i64 = dims.iter().product();
    let raw = t.raw_data.as_deref().unwrap_or_default();
    let values: Vec<f64> = match DataType::try_from(t.data_type.unwrap_or(0)) {
        Ok(DataType::Float) if !raw.is_empty() => {
            raw.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect()
        }
        Ok(DataType::Float) => t.float_data.iter().map(|&v| f64::from(v)).collect(),
        Ok(DataType::Int8) => raw.iter().map(|&b| f64::from(b as i8)).collect(),
        Ok(DataType::Int32) if !raw.is_empty() => {
            raw.chunks_exact(4).map(|b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect()
        }
        Ok(DataType::Int32) => t.int32_data.iter().map(|&v| f64::from(v)).collect(),
        other => bail!("initializer `{name}`: data type {other:?} is not supported"),
    };
    if values.len() as i64 != n {
        bail!("initializer `{name}`: {} values for dims {dims:?}", values.len());
    }
    Ok(Tensor::from_slice(&values).to_kind(Kind::Float).reshape(dims.as_slice()))
}

impl OnnxNet {
    /// The graph of a bundle.
    pub fn from_bundle(bundle: &Bundle) -> Result<OnnxNet> {
        let model = onnx::ModelProto::decode(bundle.onnx.as_slice()).context("cannot decode the ONNX model")?;
        let graph = model.graph.context("the model has no graph")?;
        OnnxNet::new(&graph, &bundle.manifest)
    }

    /// A graph with the names of `manifest`.
    pub fn new(graph: &onnx::GraphProto, manifest: &Manifest) -> Result<OnnxNet> {
        let mut consts = HashMap::new();
        for t in &graph.initializer {
            consts.insert(t.name.clone().unwrap_or_default(), to_tensor(t)?);
        }
        Ok(OnnxNet {
            nodes: graph.node.clone(),
            consts,
            input: manifest.io.input.clone(),
            logits: manifest.io.logits.clone(),
        })
    }

    /// Runs a batch `[N, 3, H, W]`; `visit` sees every tensor named in
    /// `watch` as it is produced. Returns the logits `[N, width]`.
    pub fn run(&self, x: &Tensor, watch: &[String], mut visit: impl FnMut(&str, &Tensor)) -> Result<Tensor> {
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        values.insert(self.input.as_str(), x.shallow_clone());
        if watch.contains(&self.input) {
            visit(&self.input, x);
        }
        for n in &self.nodes {
            let get = |i: usize| -> Result<&Tensor> {
                let name = n.input.get(i).with_context(|| format!("node {:?} lacks input {i}", n.name))?;
                values
                    .get(name.as_str())
                    .or_else(|| self.consts.get(name))
                    .with_context(|| format!("node {:?}: input `{name}` is not computed yet", n.name))
            };
            let op = n.op_type.as_deref().unwrap_or_default();
            let y = match op {
                "Conv" => conv(n, get(0)?, get(1)?, n.input.get(2).map(|_| get(2)).transpose()?)?,
                "Clip" => get(0)?.clamp(get(1)?.double_value(&[]), get(2)?.double_value(&[])),
                "Add" => get(0)? + get(1)?,
                "Relu" => get(0)?.relu(),
                "GlobalAveragePool" => get(0)?.mean_dim(&[2i64, 3][..], true, Kind::Float),
                "Flatten" => get(0)?.flatten(int(n, "axis", 1), -1),
                "Gemm" => {
                    if int(n, "transA", 0) != 0 || int(n, "transB", 0) != 1 {
                        bail!("Gemm {:?}: only transA=0, transB=1 is supported", n.name);
                    }
                    let y = get(0)?.matmul(&get(1)?.tr());
                    if n.input.len() > 2 {
                        y + get(2)?
                    } else {
                        y
                    }
                }
                "Softmax" => get(0)?.softmax(int(n, "axis", -1), Kind::Float),
                "Sigmoid" => get(0)?.sigmoid(),
                "QuantizeLinear" => (get(0)? / get(1)?).round().g_add(get(2)?).clamp(-128.0, 127.0),
                "DequantizeLinear" => {
                    let (q, s, z) = (get(0)?, get(1)?, get(2)?);
                    let axis = int(n, "axis", 1);
                    let rank = q.dim() as i64;
                    let axis = if axis < 0 { axis + rank } else { axis };
                    let (s, z) = if s.dim() == 1 && rank > 1 {
                        let mut shape = vec![1i64; rank as usize];
                        shape[axis as usize] = -1;
                        (s.reshape(&shape), z.reshape(&shape))
                    } else {
                        (s.shallow_clone(), z.shallow_clone())
                    };
                    (q - z) * s
                }
                "QLinearConv" => qlinear_conv(n, &(0..9).map(|i| get(i)).collect::<Result<Vec<_>>>()?)?,
                other => bail!("operator {other} (node {:?}) is not supported by the host interpreter", n.name),
            };
            let out = n.output.first().with_context(|| format!("node {:?} has no output", n.name))?;
            if watch.iter().any(|w| w == out) {
                visit(out, &y);
            }
            values.insert(out.as_str(), y);
        }
        values.remove(self.logits.as_str()).with_context(|| format!("the graph does not compute `{}`", self.logits))
    }
}

fn conv(n: &onnx::NodeProto, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let pads = ints(n, "pads", &[0, 0, 0, 0]);
    let strides = ints(n, "strides", &[1, 1]);
    let dil = ints(n, "dilations", &[1, 1]);
    if pads.len() != 4 || strides.len() != 2 || dil.len() != 2 {
        bail!("Conv {:?}: only 2-D convolutions are supported", n.name);
    }
    let x = if pads.iter().any(|&p| p != 0) {
        // ONNX pads: [top, left, bottom, right]; torch: [left, right, top, bottom].
        x.constant_pad_nd([pads[1], pads[3], pads[0], pads[2]])
    } else {
        x.shallow_clone()
    };
    Ok(x.conv2d(w, b, &strides[..], [0i64, 0], &dil[..], int(n, "group", 1)))
}

/// ONNX QLinearConv: `saturate(round((Σ (x−zx)(w−zw) + b) · sx·sw/sy) + zy)`,
/// accumulated in f32 (exact up to 2^24; beyond, off by far less than one
/// output step).
fn qlinear_conv(n: &onnx::NodeProto, t: &[&Tensor]) -> Result<Tensor> {
    let (x, xs, xz, w, ws, wz, ys, yz, b) = (t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]);
    let per_channel = |s: &Tensor| if s.dim() == 1 { s.reshape([1, -1, 1, 1]) } else { s.shallow_clone() };
    let xd = x - xz;
    let wd = if wz.dim() == 1 { w - wz.reshape([-1, 1, 1, 1]) } else { w - wz };
    // Zero-point-shifted padding is 0 after the shift, so padding the
    // shifted input with 0 is ONNX's padding with zx.
    let acc = conv(n, &xd, &wd, Some(b))?;
    let m = (per_channel(ws) * xs) / ys;
    Ok((acc * m).round().g_add(yz).clamp(-128.0, 127.0))
}

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

/// Top-1 index per row of `logits` (`[N, 1]` sigmoid outputs: 1 when the
/// logit is positive).
pub fn top1(logits: &Tensor) -> Result<Vec<usize>> {
    let idx = if logits.size().get(1) == Some(&1) {
        logits.gt(0.0).to_kind(Kind::Int64).flatten(0, -1)
    } else {
        logits.argmax(1, false)
    };
    Ok(Vec::<i64>::try_from(idx)?.into_iter().map(|i| i as usize).collect())
}

/// Float vs int8 on held-out images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Images compared.
    pub images: usize,
    /// Fraction whose int8 top-1 equals the float top-1.
    pub top1_agreement: f64,
    /// Float top-1 accuracy, when the images' folders name bundle labels.
    pub float_accuracy: Option<f64>,
    /// int8 top-1 accuracy, likewise.
    pub int8_accuracy: Option<f64>,
    /// Largest |Δ logit| seen.
    pub max_abs_logit_diff: f64,
}

/// The label index of `file` when its parent folder is named like one of
/// `labels`.
pub fn folder_label(file: &Path, labels: &[String]) -> Option<usize> {
    let dir = file.parent()?.file_name()?.to_string_lossy();
    labels.iter().position(|l| *l == dir)
}

/// Runs both graphs on `batches` (of `files`) and compares.
pub fn compare(
    float: &OnnxNet,
    int8: &OnnxNet,
    batches: &[Tensor],
    files: &[PathBuf],
    labels: &[String],
) -> Result<Comparison> {
    let (mut agree, mut n, mut max_diff) = (0usize, 0usize, 0f64);
    let (mut fc, mut qc, mut labelled) = (0usize, 0usize, 0usize);
    let bar = progress(batches.len() as u64, "evaluating float vs int8");
    for x in batches {
        let (lf, lq) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            Ok((float.run(x, &[], |_, _| {})?, int8.run(x, &[], |_, _| {})?))
        })?;
        max_diff = max_diff.max((&lf - &lq).abs().max().double_value(&[]));
        for (pf, pq) in top1(&lf)?.into_iter().zip(top1(&lq)?) {
            agree += usize::from(pf == pq);
            if let Some(truth) = files.get(n).and_then(|f| folder_label(f, labels)) {
                labelled += 1;
                fc += usize::from(pf == truth);
                qc += usize::from(pq == truth);
            }
            n += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let frac = |k: usize, of: usize| k as f64 / of.max(1) as f64;
    Ok(Comparison {
        images: n,
        top1_agreement: frac(agree, n),
        float_accuracy: (labelled > 0).then(|| frac(fc, labelled)),
        int8_accuracy: (labelled > 0).then(|| frac(qc, labelled)),
        max_abs_logit_diff: max_diff,
    })
}

/// Everything `tern-host quantize` does, as a library call.
pub struct Request<'a> {
    /// The float bundle.
    pub bundle: &'a Path,
    /// Calibration images (a folder, searched recursively).
    pub calib_data: &'a Path,
    /// How many calibration images.
    pub calib_images: usize,
    /// Range method.
    pub method: Method,
    /// Graph options.
    pub options: Options,
    /// Held-out images for the float-vs-int8 comparison (must not overlap
    /// the calibration images).
    pub eval_data: Option<&'a Path>,
    /// How many held-out images.
    pub eval_images: usize,
    /// Where to write the int8 bundle.
    pub out: &'a Path,
    /// Seed of the image draws.
    pub seed: u64,
    /// Correct the biases of int8-weight float layers with the mean
    /// inputs measured on the calibration images.
    pub bias_correction: bool,
}

/// What [`quantize_bundle`] did.
pub struct Outcome {
    /// The written manifest.
    pub manifest: Manifest,
    /// The float-vs-int8 comparison, when held-out images were given.
    pub comparison: Option<Comparison>,
    /// Size of the float and int8 files in bytes.
    pub sizes: (u64, u64),
}

/// Calibrates, quantizes, evaluates and writes the int8 bundle.
pub fn quantize_bundle(r: &Request) -> Result<Outcome> {
    let bundle = Bundle::read(r.bundle).with_context(|| format!("cannot load bundle {}", r.bundle.display()))?;
    if bundle.manifest.precision != tern_model_format::manifest::Precision::F32 {
        bail!("{}: already quantized ({:?}); quantize the float bundle", r.bundle.display(), bundle.manifest.precision);
    }
    let model = onnx::ModelProto::decode(bundle.onnx.as_slice()).context("cannot decode the ONNX model")?;
    let graph = model.graph.context("the model has no graph")?;
    let float = OnnxNet::new(&graph, &bundle.manifest)?;
    let pre = bundle.manifest.preprocessing;

    let calib_files = pick_images(r.calib_data, r.calib_images, r.seed)?;
    let names = calibration_tensors(&graph, &r.options)?;
    let mean_names = if r.bias_correction { mean_tensors(&graph, &r.options)? } else { Vec::new() };
    let mut options = r.options.clone();
    let ranges = if names.is_empty() && mean_names.is_empty() {
        BTreeMap::new()
    } else {
        let (batches, _) = load_batches(&calib_files, &pre, "calibration")?;
        if !mean_names.is_empty() {
            options.input_means = channel_means(&float, &batches, &mean_names)?;
        }
        if names.is_empty() {
            BTreeMap::new()
        } else {
            calibrate(&float, &batches, &names, r.method)?
        }
    };
    let used_images = !(names.is_empty() && mean_names.is_empty());
    let (qgraph, mut record) = quantize_graph(&graph, &ranges, &options)?;
    let mut manifest = bundle.manifest.clone();
    let method = match r.method {
        Method::MinMax => serde_json::json!({"method": "minmax"}),
        Method::Percentile(p) => serde_json::json!({"method": "percentile", "percentile": p}),
        Method::Entropy => serde_json::json!({"method": "entropy", "bins": tern_model_format::quantize::BINS}),
    };
    record["calibration"] = serde_json::json!({
        "ranges": method,
        "images": if used_images { calib_files.len() } else { 0 },
        "bias_correction": r.bias_correction,
        "source": r.calib_data.display().to_string(),
        "seed": r.seed,
    });
    record["float_bundle_graph_sha256"] = bundle.manifest.graph_sha256.clone().into();

    let comparison = match r.eval_data {
        Some(dir) => {
            let calib: std::collections::HashSet<PathBuf> =
                calib_files.iter().filter_map(|f| f.canonicalize().ok()).collect();
            let eval_files: Vec<PathBuf> = pick_images(dir, usize::MAX, r.seed ^ 0x5EED)?
                .into_iter()
                .filter(|f| f.canonicalize().map(|c| !calib.contains(&c)).unwrap_or(true))
                .take(r.eval_images)
                .collect();
            if eval_files.is_empty() {
                bail!("{}: every image is also a calibration image; give held-out images", dir.display());
            }
            let int8 = OnnxNet::new(&qgraph, &manifest)?;
            let (batches, kept) = load_batches(&eval_files, &pre, "held-out")?;
            let c = compare(&float, &int8, &batches, &kept, &manifest.labels)?;
            let mut metrics = manifest.metrics.take().unwrap_or_else(|| serde_json::json!({}));
            if !metrics.is_object() {
                metrics = serde_json::json!({"previous": metrics});
            }
            metrics["int8_vs_float"] = serde_json::json!({
                "held_out": dir.display().to_string(),
                "images": c.images,
                "top1_agreement": c.top1_agreement,
                "float_accuracy": c.float_accuracy,
                "int8_accuracy": c.int8_accuracy,
                "max_abs_logit_diff": c.max_abs_logit_diff,
                "evaluated_by": "tern-host (libtorch, ONNX integer semantics)",
            });
            manifest.metrics = Some(metrics);
            Some(c)
        }
        None => None,
    };
    manifest.precision = tern_model_format::manifest::Precision::Int8;
    manifest.quantization = Some(record);
    manifest.provenance.created_by = format!("tern-host {} quantize", env!("CARGO_PKG_VERSION"));
    let manifest = tern_model_format::bundle::write(r.out, qgraph, manifest)
        .with_context(|| format!("cannot write {}", r.out.display()))?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(Outcome { manifest, comparison, sizes: (size(r.bundle), size(r.out)) })
}
