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

use crate::data::progress;
use tern_model_format::preprocess::{open_image, preprocess};
use tern_model_format::quantize::{
    calibration_tensors, mean_tensors, quantize_graph, Calibrator, Method, Options, Range,
};
use tern_model_format::{Bundle, Manifest, Preprocessing};

/// Images per forward pass.
const BATCH: usize = 16;

/// Calibration images used by the empirical bias correction (held in
/// memory at once, layer by layer: ~2 GB at 224×224 for this many).
pub const BIAS_CORRECTION_IMAGES: usize = 64;

/// Calibration images used to rank the layers by sensitivity (enough to
/// rank them; each layer costs a forward pass over them).
pub const SENSITIVITY_IMAGES: usize = 32;

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
            let y = self.eval(n, |name| values.get(name))?;
            let out = n.output.first().with_context(|| format!("node {:?} has no output", n.name))?;
            if watch.iter().any(|w| w == out) {
                visit(out, &y);
            }
            values.insert(out.as_str(), y);
        }
        values.remove(self.logits.as_str()).with_context(|| format!("the graph does not compute `{}`", self.logits))
    }

    /// For each tensor a node reads, the index of the last node reading it.
    fn last_uses(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for input in &n.input {
                m.insert(input.clone(), i);
            }
        }
        m
    }

    /// Drops from `values` what no node after node `k` reads (`last_uses`).
    fn drop_dead(values: &mut HashMap<String, Tensor>, last_uses: &HashMap<String, usize>, k: usize) {
        values.retain(|name, _| last_uses.get(name).is_some_and(|&u| u > k));
    }

    /// The graph from node `start` on, given the values computed before it
    /// (`prefix`) and with the constant `replace.0` read as `replace.1`.
    /// Returns the logits.
    fn run_from(&self, start: usize, prefix: &HashMap<String, Tensor>, replace: (&str, &Tensor)) -> Result<Tensor> {
        let mut values: HashMap<&str, Tensor> = prefix.iter().map(|(k, v)| (k.as_str(), v.shallow_clone())).collect();
        for n in self.nodes.get(start..).unwrap_or_default() {
            let y = self.eval(n, |name| if name == replace.0 { Some(replace.1) } else { values.get(name) })?;
            let out = n.output.first().with_context(|| format!("node {:?} has no output", n.name))?;
            values.insert(out.as_str(), y);
        }
        values.remove(self.logits.as_str()).with_context(|| format!("the graph does not compute `{}`", self.logits))
    }

    /// One node, its inputs looked up by `value` (computed tensors) and
    /// then among the constants.
    fn eval<'v>(&'v self, n: &onnx::NodeProto, value: impl Fn(&str) -> Option<&'v Tensor>) -> Result<Tensor> {
        let get = |i: usize| -> Result<&Tensor> {
            let name = n.input.get(i).with_context(|| format!("node {:?} lacks input {i}", n.name))?;
            value(name)
                .or_else(|| self.consts.get(name))
                .with_context(|| format!("node {:?}: input `{name}` is not computed yet", n.name))
        };
        let op = n.op_type.as_deref().unwrap_or_default();
        Ok(match op {
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
        })
    }
}

/// Empirical bias correction (Nagel et al. 2019, §4.2) of the graph
/// `int8` (int8 weights, float compute) against `float`, on `batches`:
/// layer by layer in graph order, each Conv or Gemm with a bias whose
/// output differs from the float layer's gets its bias shifted by minus
/// the mean difference per output channel, measured with every upstream
/// correction already in place. Analytic correction ([`Options::input_means`])
/// only sees a layer's own rounding; this also removes the mean of the
/// error that reaches it from upstream layers. Returns the corrected
/// biases (initializer name → values).
///
/// Every batch is held in memory at once (the layers run one at a time
/// over all of them): give a few batches.
pub fn empirical_bias_correction(
    float: &OnnxNet,
    int8: &OnnxNet,
    batches: &[Tensor],
) -> Result<BTreeMap<String, Vec<f32>>> {
    // The graph's own names: the int8 graph keeps the float graph's node
    // outputs (its weights come from DequantizeLinear under the float
    // weight's name), so each layer is found in both by its output.
    let (f_last, q_last) = (float.last_uses(), int8.last_uses());
    let mut fv: Vec<HashMap<String, Tensor>> =
        batches.iter().map(|x| HashMap::from([(float.input.clone(), x.shallow_clone())])).collect();
    let mut qv: Vec<HashMap<String, Tensor>> =
        batches.iter().map(|x| HashMap::from([(int8.input.clone(), x.shallow_clone())])).collect();
    let mut f_next = 0usize;
    let mut biases = BTreeMap::new();
    let mut consts: HashMap<String, Tensor> = HashMap::new();
    let bar = progress(int8.nodes.len() as u64, "bias correction");
    for (qi, n) in int8.nodes.iter().enumerate() {
        bar.inc(1);
        let out = n.output.first().with_context(|| format!("node {:?} has no output", n.name))?.clone();
        let mut ys = Vec::with_capacity(batches.len());
        for v in &qv {
            let y = tch::no_grad(|| int8.eval(n, |name| v.get(name).or_else(|| consts.get(name))))?;
            ys.push(y);
        }
        let op = n.op_type.as_deref().unwrap_or_default();
        let bias = n.input.get(2).filter(|_| matches!(op, "Conv" | "Gemm")).cloned();
        if let Some(b_name) = bias {
            // The float graph up to this layer's output.
            while !fv.first().is_some_and(|v| v.contains_key(&out)) {
                let fnode = float.nodes.get(f_next).with_context(|| {
                    format!("bias correction: the float graph does not compute `{out}` (layer {:?})", n.name)
                })?;
                let fout = fnode.output.first().cloned().unwrap_or_default();
                for v in fv.iter_mut() {
                    let y = tch::no_grad(|| float.eval(fnode, |name| v.get(name)))?;
                    // Pruned before the insert: `out` is compared below even
                    // when no later node reads it.
                    OnnxNet::drop_dead(v, &f_last, f_next);
                    v.insert(fout.clone(), y);
                }
                f_next += 1;
            }
            // Mean difference per output channel (axis 1) over the batch
            // and the spatial positions.
            let (mut sum, mut count) = (None::<Tensor>, 0f64);
            for (y, v) in ys.iter().zip(&fv) {
                let f = v.get(&out).with_context(|| format!("bias correction: no float value of `{out}`"))?;
                let d = (y - f).to_kind(Kind::Double);
                let dims: Vec<i64> = (0..d.dim() as i64).filter(|&k| k != 1).collect();
                let s = d.sum_dim_intlist(dims.as_slice(), false, Kind::Double);
                count += (d.numel() / d.size().get(1).copied().unwrap_or(1).max(1) as usize) as f64;
                sum = Some(match sum {
                    Some(t) => t + s,
                    None => s,
                });
            }
            if let Some(sum) = sum.filter(|t| t.abs().max().double_value(&[]) > 0.0) {
                let shift = (sum / count.max(1.0)).to_kind(Kind::Float);
                let old = consts
                    .get(&b_name)
                    .or_else(|| int8.consts.get(&b_name))
                    .with_context(|| format!("bias correction: bias `{b_name}` of {:?} is not a constant", n.name))?;
                if old.size() == shift.size() {
                    let corrected = old - &shift;
                    let shape: Vec<i64> = (0..ys[0].dim() as i64).map(|k| if k == 1 { -1 } else { 1 }).collect();
                    let delta = shift.reshape(shape.as_slice());
                    for y in ys.iter_mut() {
                        *y = &*y - &delta;
                    }
                    biases.insert(b_name.clone(), Vec::<f32>::try_from(&corrected)?);
                    consts.insert(b_name, corrected);
                }
            }
        }
        for (y, v) in ys.into_iter().zip(qv.iter_mut()) {
            v.insert(out.clone(), y);
            OnnxNet::drop_dead(v, &q_last, qi);
        }
    }
    bar.finish_and_clear();
    Ok(biases)
}

/// `w` rounded to int8 with one symmetric scale per output channel (axis
/// 0), as [`tern_model_format::quantize`] stores weights, back in float.
fn fake_quant_per_channel(w: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..w.dim() as i64).collect();
    let amax = if dims.is_empty() { w.abs() } else { w.abs().amax(dims.as_slice(), true) };
    let scale = (amax / 127.0).clamp_min(f64::from(f32::MIN_POSITIVE));
    (w / &scale).round().clamp(-127.0, 127.0) * scale
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
    /// Calibration images.
    pub calib_files: &'a [PathBuf],
    /// Where they came from (recorded in the manifest).
    pub calib_source: String,
    /// Held-out images for the float-vs-int8 comparison (none: no
    /// comparison). Calibration images among them are an error.
    pub eval_files: &'a [PathBuf],
    /// Where they came from (recorded in the manifest).
    pub eval_source: String,
    /// Where to write the int8 bundle.
    pub out: &'a Path,
    /// Seed of the image draws (recorded).
    pub seed: u64,
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

/// What [`quantize_bundle`] did.
pub struct Outcome {
    /// The written manifest.
    pub manifest: Manifest,
    /// The float-vs-int8 comparison, when held-out images were given.
    pub comparison: Option<Comparison>,
    /// Size of the float and int8 files in bytes.
    pub sizes: (u64, u64),
}

/// One way to quantize: a range method, graph options and bias correction.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Range method.
    pub method: Method,
    /// Graph options.
    pub options: Options,
    /// Bias correction of int8-weight float layers.
    pub bias_correction: bool,
    /// Keep the weights of the most sensitive layers in float (see
    /// [`Session::sensitivity`]) as long as the graph stays this many
    /// times smaller than the float one; `None`: every layer int8.
    pub min_shrink: Option<f64>,
}

impl Recipe {
    /// A short name, e.g. `static/percentile-99.99/per-tensor`.
    pub fn name(&self) -> String {
        let scheme = match self.options.scheme {
            tern_model_format::quantize::Scheme::Weights => "weights",
            tern_model_format::quantize::Scheme::Static => "static",
            tern_model_format::quantize::Scheme::Qdq => "qdq",
        };
        let mut s = format!("{scheme}/{}", method_name(self.method));
        if self.options.scheme == tern_model_format::quantize::Scheme::Static {
            s.push_str(if self.options.per_channel { "/per-channel" } else { "/per-tensor" });
        }
        if !self.options.float_layers.is_empty() {
            s.push_str(&format!("/float:{}", self.options.float_layers.join("+")));
        }
        if !self.bias_correction {
            s.push_str("/no-bias-correction");
        }
        if let Some(r) = self.min_shrink {
            s.push_str(&format!("/sensitive-float-{r}x"));
        }
        s
    }
}

fn method_name(m: Method) -> String {
    match m {
        Method::MinMax => "minmax".into(),
        Method::Percentile(p) => format!("percentile-{p}"),
        Method::Entropy => "entropy".into(),
    }
}

/// How much one layer's int8 weights alone move the logits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sensitivity {
    /// The layer (its weight's name without `.weight`).
    pub layer: String,
    /// Mean |Δ logit| against the float graph.
    pub mean_abs_logit_diff: f64,
    /// Weights in the layer.
    pub params: usize,
}

/// An int8 graph made by a [`Session`], not yet written.
pub struct Quantized {
    /// The recipe.
    pub recipe: Recipe,
    /// The graph.
    pub graph: onnx::GraphProto,
    /// The manifest to write with it.
    pub manifest: Manifest,
    /// The float-vs-int8 comparison on the held-out images.
    pub comparison: Option<Comparison>,
}

impl Quantized {
    /// Writes the bundle (atomically, checksummed) to `out`.
    pub fn write(&self, out: &Path) -> Result<Manifest> {
        tern_model_format::bundle::write(out, self.graph.clone(), self.manifest.clone())
            .with_context(|| format!("cannot write {}", out.display()))
    }
}

/// A float bundle with its calibration and held-out images loaded once, to
/// try one or more [`Recipe`]s.
pub struct Session<'a> {
    request: &'a Request<'a>,
    bundle: Bundle,
    graph: onnx::GraphProto,
    float: OnnxNet,
    calib: Option<Vec<Tensor>>,
    eval: Option<(Vec<Tensor>, Vec<PathBuf>)>,
    sensitivity: Option<Vec<Sensitivity>>,
}

impl<'a> Session<'a> {
    /// Loads the float bundle and checks the image lists.
    pub fn new(r: &'a Request<'a>) -> Result<Session<'a>> {
        let bundle = Bundle::read(r.bundle).with_context(|| format!("cannot load bundle {}", r.bundle.display()))?;
        if bundle.manifest.precision != tern_model_format::manifest::Precision::F32 {
            bail!(
                "{}: already quantized ({:?}); quantize the float bundle",
                r.bundle.display(),
                bundle.manifest.precision
            );
        }
        let model = onnx::ModelProto::decode(bundle.onnx.as_slice())
            .with_context(|| format!("{}: cannot decode the ONNX model", r.bundle.display()))?;
        let graph = model.graph.with_context(|| format!("{}: the model has no graph", r.bundle.display()))?;
        let float = OnnxNet::new(&graph, &bundle.manifest)?;
        if r.calib_files.is_empty() {
            bail!("no calibration images");
        }
        let calib: std::collections::HashSet<PathBuf> =
            r.calib_files.iter().filter_map(|f| f.canonicalize().ok()).collect();
        if let Some(f) = r.eval_files.iter().find(|f| f.canonicalize().is_ok_and(|c| calib.contains(&c))) {
            bail!(
                "{} is both a calibration and a held-out image; held-out images must be new to the model",
                f.display()
            );
        }
        Ok(Session { request: r, bundle, graph, float, calib: None, eval: None, sensitivity: None })
    }

    fn calib_batches(&mut self) -> Result<&[Tensor]> {
        if self.calib.is_none() {
            let (b, _) = load_batches(self.request.calib_files, &self.bundle.manifest.preprocessing, "calibration")?;
            self.calib = Some(b);
        }
        Ok(self.calib.as_deref().unwrap_or_default())
    }

    /// How much each weight layer alone moves the logits when its weights
    /// become int8 (every other layer float): mean |Δ logit| over (at most
    /// [`SENSITIVITY_IMAGES`] of) the calibration images, most sensitive
    /// first. Computed once per session.
    pub fn sensitivity(&mut self) -> Result<&[Sensitivity]> {
        if self.sensitivity.is_none() {
            self.calib_batches()?;
            // Evenly spaced over all calibration images: a list sorted by
            // class folder would otherwise be ranked on its first classes.
            let all = self.calib.as_deref().unwrap_or_default();
            let batches: Vec<Tensor> = if all.is_empty() {
                Vec::new()
            } else {
                let all = Tensor::cat(all, 0);
                let n = all.size()[0];
                let step = (n / SENSITIVITY_IMAGES as i64).max(1);
                let rows = Tensor::arange_start_step(0, n, step, (Kind::Int64, all.device()));
                let rows = rows.narrow(0, 0, rows.size()[0].min(SENSITIVITY_IMAGES as i64));
                all.index_select(0, &rows).split(BATCH as i64, 0)
            };
            let reference: Vec<Tensor> =
                batches.iter().map(|x| tch::no_grad(|| self.float.run(x, &[], |_, _| {}))).collect::<Result<_>>()?;
            let params: HashMap<&str, usize> = self
                .graph
                .initializer
                .iter()
                .map(|t| (t.name.as_deref().unwrap_or_default(), t.dims.iter().product::<i64>().max(0) as usize))
                .collect();
            // Graph order; each layer's prefix is the float graph's, so the
            // float values just before it are computed once (shared by all
            // layers) and only the rest of the graph runs per layer.
            let net = &self.float;
            let layers: Vec<usize> = (0..net.nodes.len())
                .filter(|&i| matches!(net.nodes[i].op_type.as_deref(), Some("Conv" | "Gemm")))
                .filter(|&i| net.nodes[i].input.get(1).is_some_and(|w| net.consts.contains_key(w)))
                .collect();
            let last_use = net.last_uses();
            let mut prefix: Vec<HashMap<String, Tensor>> =
                batches.iter().map(|x| HashMap::from([(net.input.clone(), x.shallow_clone())])).collect();
            let mut done = 0usize;
            let bar = progress(layers.len() as u64, "layer sensitivity");
            let mut out = Vec::new();
            for &li in &layers {
                bar.inc(1);
                // Advance the prefix to just before node `li`.
                for k in done..li {
                    let n = &net.nodes[k];
                    let o = n.output.first().cloned().unwrap_or_default();
                    for v in prefix.iter_mut() {
                        let y = tch::no_grad(|| net.eval(n, |name| v.get(name)))?;
                        v.insert(o.clone(), y);
                        OnnxNet::drop_dead(v, &last_use, k);
                    }
                }
                done = li;
                let w = &net.nodes[li].input[1];
                let wq = match net.consts.get(w) {
                    Some(t) => fake_quant_per_channel(t),
                    None => continue,
                };
                let (mut sum, mut count) = (0f64, 0f64);
                for (v, r) in prefix.iter().zip(&reference) {
                    let y = tch::no_grad(|| net.run_from(li, v, (w, &wq)))?;
                    sum += (&y - r).abs().sum(Kind::Double).double_value(&[]);
                    count += r.numel() as f64;
                }
                out.push(Sensitivity {
                    layer: tern_model_format::quantize::layer_name(w),
                    mean_abs_logit_diff: sum / count.max(1.0),
                    params: params.get(w.as_str()).copied().unwrap_or(0),
                });
            }
            bar.finish_and_clear();
            out.sort_by(|a, b| b.mean_abs_logit_diff.total_cmp(&a.mean_abs_logit_diff));
            self.sensitivity = Some(out);
        }
        Ok(self.sensitivity.as_deref().unwrap_or_default())
    }

    /// The layers to keep float for `min_shrink`: by sensitivity per
    /// parameter (the cheapest fixes first), while the int8 graph stays
    /// `min_shrink`× smaller than the float one.
    fn sensitive_layers(&mut self, options: &Options, min_shrink: f64) -> Result<Vec<String>> {
        // The ratio is between the files, manifests included: the float
        // bundle's manifest is carried over, and the int8 one adds the
        // quantization record (with the sensitivity table) and the
        // comparison; their size is estimated with a margin.
        let float_file = file_size(self.request.bundle) as f64;
        let carried = (float_file - self.graph.encoded_len() as f64).max(0.0);
        // Weight storage is the same in both schemes, and the weights-only
        // graph needs no activation ranges.
        let weights_only = Options { scheme: tern_model_format::quantize::Scheme::Weights, ..options.clone() };
        let (all_int8, record) = quantize_graph(&self.graph, &BTreeMap::new(), &weights_only)?;
        let ranked: Vec<Sensitivity> = self.sensitivity()?.to_vec();
        let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v).map_or(0, |s| s.len()) as f64;
        // Nested in the manifest, the record is indented deeper than alone.
        let added = 1.25 * (pretty(record) + pretty(serde_json::json!(ranked))) + 2048.0;
        let mut room = float_file / min_shrink.max(1.0) - (all_int8.encoded_len() as f64 + carried + added);
        let mut ranked = ranked;
        ranked.sort_by(|a, b| {
            let per = |s: &Sensitivity| s.mean_abs_logit_diff / s.params.max(1) as f64;
            per(b).total_cmp(&per(a))
        });
        let mut keep = Vec::new();
        for s in ranked {
            // float32 instead of int8: three more bytes a weight.
            let extra = 3.0 * s.params as f64;
            if s.mean_abs_logit_diff > 0.0 && extra <= room && !options.float_layers.contains(&s.layer) {
                room -= extra;
                keep.push(s.layer);
            }
        }
        Ok(keep)
    }

    /// Calibrates, quantizes and (with held-out images) compares one recipe.
    pub fn quantize(&mut self, recipe: &Recipe) -> Result<Quantized> {
        let r = self.request;
        let names = calibration_tensors(&self.graph, &recipe.options)?;
        let mean_names = if recipe.bias_correction { mean_tensors(&self.graph, &recipe.options)? } else { Vec::new() };
        let mut options = recipe.options.clone();
        let mut kept_float = Vec::new();
        if let Some(shrink) = recipe.min_shrink {
            kept_float = self.sensitive_layers(&options, shrink)?;
            options.float_layers.extend(kept_float.iter().cloned());
        }
        let used_images = !(names.is_empty() && mean_names.is_empty());
        let mut ranges = BTreeMap::new();
        if !mean_names.is_empty() {
            self.calib_batches()?;
            options.input_means = channel_means(&self.float, self.calib.as_deref().unwrap_or_default(), &mean_names)?;
        }
        if !names.is_empty() {
            self.calib_batches()?;
            ranges = calibrate(&self.float, self.calib.as_deref().unwrap_or_default(), &names, recipe.method)?;
        }
        let (mut qgraph, mut record) = quantize_graph(&self.graph, &ranges, &options)?;
        let mut empirical = serde_json::Value::Null;
        if recipe.bias_correction && options.scheme == tern_model_format::quantize::Scheme::Weights {
            // Evenly spaced over the calibration list, which may be sorted
            // by class folder.
            let files = r.calib_files;
            let step = (files.len() / BIAS_CORRECTION_IMAGES).max(1);
            let some: Vec<PathBuf> = files.iter().step_by(step).take(BIAS_CORRECTION_IMAGES).cloned().collect();
            let (batches, kept) = load_batches(&some, &self.bundle.manifest.preprocessing, "bias correction")?;
            let int8 = OnnxNet::new(&qgraph, &self.bundle.manifest)?;
            let biases = empirical_bias_correction(&self.float, &int8, &batches)?;
            let images = kept.len();
            tern_model_format::quantize::replace_float_initializers(&mut qgraph, &biases)?;
            let biases: Vec<&String> = biases.keys().collect();
            empirical = serde_json::json!({"images": images, "biases": biases});
        }
        let mut manifest = self.bundle.manifest.clone();
        let method = match recipe.method {
            Method::MinMax => serde_json::json!({"method": "minmax"}),
            Method::Percentile(p) => serde_json::json!({"method": "percentile", "percentile": p}),
            Method::Entropy => serde_json::json!({"method": "entropy", "bins": tern_model_format::quantize::BINS}),
        };
        record["recipe"] = recipe.name().into();
        if let Some(shrink) = recipe.min_shrink {
            record["sensitive_float"] = serde_json::json!({
                "min_shrink": shrink,
                "kept_float": kept_float,
                "measure": format!("mean |Δ logit| on up to {SENSITIVITY_IMAGES} calibration images with only that layer's weights int8"),
                "sensitivity": self.sensitivity.as_deref().unwrap_or_default(),
            });
        }
        record["calibration"] = serde_json::json!({
            "ranges": method,
            "images": if used_images { r.calib_files.len() } else { 0 },
            "bias_correction": recipe.bias_correction,
            "empirical_bias_correction": empirical,
            "source": r.calib_source,
            "seed": r.seed,
        });
        record["float_bundle_graph_sha256"] = self.bundle.manifest.graph_sha256.clone().into();

        let comparison = if r.eval_files.is_empty() {
            None
        } else {
            if self.eval.is_none() {
                self.eval = Some(load_batches(r.eval_files, &manifest.preprocessing, "held-out")?);
            }
            let (batches, kept) = self.eval.as_ref().map(|(b, k)| (b.as_slice(), k.as_slice())).unwrap_or_default();
            let int8 = OnnxNet::new(&qgraph, &manifest)?;
            let c = compare(&self.float, &int8, batches, kept, &manifest.labels)?;
            let mut metrics = manifest.metrics.take().unwrap_or_else(|| serde_json::json!({}));
            if !metrics.is_object() {
                metrics = serde_json::json!({"previous": metrics});
            }
            metrics["int8_vs_float"] = serde_json::json!({
                "held_out": r.eval_source,
                "images": c.images,
                "top1_agreement": c.top1_agreement,
                "float_accuracy": c.float_accuracy,
                "int8_accuracy": c.int8_accuracy,
                "max_abs_logit_diff": c.max_abs_logit_diff,
                "evaluated_by": "tern-host (libtorch, ONNX integer semantics)",
            });
            manifest.metrics = Some(metrics);
            Some(c)
        };
        manifest.precision = tern_model_format::manifest::Precision::Int8;
        manifest.quantization = Some(record);
        manifest.provenance.created_by = format!("tern-host {} quantize", env!("CARGO_PKG_VERSION"));
        Ok(Quantized { recipe: recipe.clone(), graph: qgraph, manifest, comparison })
    }
}

/// The ONNX graph of the float bundle at `path`.
pub fn float_graph(path: &Path) -> Result<onnx::GraphProto> {
    let bundle = Bundle::read(path).with_context(|| format!("cannot load bundle {}", path.display()))?;
    let model = onnx::ModelProto::decode(bundle.onnx.as_slice())
        .with_context(|| format!("{}: cannot decode the ONNX model", path.display()))?;
    model.graph.with_context(|| format!("{}: the model has no graph", path.display()))
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Calibrates, quantizes, evaluates and writes the int8 bundle.
pub fn quantize_bundle(r: &Request, recipe: &Recipe) -> Result<Outcome> {
    let mut session = Session::new(r)?;
    let q = session.quantize(recipe)?;
    let manifest = q.write(r.out)?;
    Ok(Outcome { manifest, comparison: q.comparison, sizes: (file_size(r.bundle), file_size(r.out)) })
}

/// One candidate tried by [`auto`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tried {
    /// The recipe's name.
    pub recipe: String,
    /// Float against int8 on the held-out images.
    #[serde(flatten)]
    pub comparison: Comparison,
    /// The accuracy drop in points (float − int8); without labels, the
    /// share of images whose top-1 changed, in points.
    pub drop_points: f64,
    /// Median latency measured by the benchmark, ms.
    pub latency_ms: f64,
    /// File size, bytes.
    pub bytes: u64,
    /// Whether the drop is within the budget and the top-1 agreement at
    /// least the minimum.
    pub within_budget: bool,
}

/// What `--auto` accepts: an accuracy drop of at most `points`, and int8
/// top-1 equal to float top-1 on at least `min_agreement` of the images.
/// Accuracy alone is not enough: on 40 images a recipe that changed 17.5%
/// of the predictions lost no accuracy (its errors cancelled out).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Budget {
    /// Largest accuracy drop, in points (without labels: the share of
    /// changed top-1 predictions, in points).
    pub points: f64,
    /// Smallest top-1 agreement with float, a fraction.
    pub min_agreement: f64,
}

impl Budget {
    /// Whether `t`'s drop and agreement are within the budget.
    pub fn admits(&self, drop_points: f64, top1_agreement: f64) -> bool {
        drop_points <= self.points + 1e-9 && top1_agreement + 1e-9 >= self.min_agreement
    }
}

/// What [`auto`] did.
pub struct AutoOutcome {
    /// The written bundle's manifest.
    pub manifest: Manifest,
    /// The chosen recipe.
    pub chosen: String,
    /// The float bundle's latency, ms.
    pub float_latency_ms: f64,
    /// Every candidate, in the order tried.
    pub tried: Vec<Tried>,
    /// Size of the float and int8 files in bytes.
    pub sizes: (u64, u64),
}

/// The candidates of `--auto`: the int8-weight scheme, static int8 with
/// each calibration method, per-channel weight scales, and static int8
/// with the first and last convolutions (the usual sensitive layers) kept
/// in float.
pub fn auto_recipes(graph: &onnx::GraphProto, percentile: f64) -> Vec<Recipe> {
    use tern_model_format::quantize::Scheme;
    let opts = |scheme, per_channel, float_layers: Vec<String>| Options {
        scheme,
        per_channel,
        float_layers,
        input_means: Default::default(),
    };
    let r = |method, options| Recipe { method, options, bias_correction: true, min_shrink: None };
    let p = Method::Percentile(percentile);
    let mut v = vec![
        Recipe { min_shrink: Some(3.5), ..r(p, opts(Scheme::Weights, false, vec![])) },
        r(p, opts(Scheme::Weights, false, vec![])),
        r(Method::MinMax, opts(Scheme::Static, false, vec![])),
        r(p, opts(Scheme::Static, false, vec![])),
        r(Method::Entropy, opts(Scheme::Static, false, vec![])),
        r(p, opts(Scheme::Static, true, vec![])),
        r(p, opts(Scheme::Qdq, true, vec![])),
    ];
    let convs: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Conv"))
        .filter_map(|n| n.input.get(1))
        .map(|w| tern_model_format::quantize::layer_name(w))
        .collect();
    if let (Some(first), Some(last)) = (convs.first(), convs.last()) {
        let mut fl = vec![first.clone()];
        if last != first {
            fl.push(last.clone());
        }
        v.push(r(p, opts(Scheme::Static, false, fl)));
    }
    v
}

/// Tries `recipes`, measures each with `bench` (a file → median latency in
/// ms, e.g. `tern-device bench`), and writes the fastest that `budget`
/// admits on the held-out images. The manifest records every candidate.
/// Needs held-out images.
pub fn auto(
    r: &Request,
    recipes: &[Recipe],
    budget: Budget,
    bench: &dyn Fn(&Path) -> Result<f64>,
) -> Result<AutoOutcome> {
    if r.eval_files.is_empty() {
        bail!("--auto needs held-out images (--eval-data) to judge accuracy");
    }
    let mut session = Session::new(r)?;
    let float_latency_ms = bench(r.bundle).context("benchmarking the float bundle")?;
    let parent = r.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tern-auto-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot make a scratch folder in {}", parent.display()))?;
    let mut tried = Vec::new();
    let mut made = Vec::new();
    for (i, recipe) in recipes.iter().enumerate() {
        eprintln!("candidate {}/{}: {}", i + 1, recipes.len(), recipe.name());
        let q = session.quantize(recipe)?;
        let file = tmp.path().join(format!("candidate-{i}.onnx"));
        q.write(&file)?;
        let c = q.comparison.clone().context("no comparison")?;
        let drop_points = match (c.float_accuracy, c.int8_accuracy) {
            (Some(f), Some(q)) => (f - q) * 100.0,
            _ => (1.0 - c.top1_agreement) * 100.0,
        };
        let latency_ms = bench(&file).with_context(|| format!("benchmarking {}", recipe.name()))?;
        let t = Tried {
            recipe: recipe.name(),
            within_budget: budget.admits(drop_points, c.top1_agreement),
            comparison: c,
            drop_points,
            latency_ms,
            bytes: file_size(&file),
        };
        eprintln!(
            "  agreement {:.2}%, drop {:.2} points, p50 {:.2} ms, {:.2} MB",
            t.comparison.top1_agreement * 100.0,
            t.drop_points,
            t.latency_ms,
            t.bytes as f64 / 1e6
        );
        tried.push(t);
        made.push(q);
    }
    let best = tried
        .iter()
        .enumerate()
        .filter(|(_, t)| t.within_budget)
        .min_by(|(_, a), (_, b)| a.latency_ms.total_cmp(&b.latency_ms).then(a.drop_points.total_cmp(&b.drop_points)))
        .map(|(i, _)| i);
    let Some(best) = best else {
        let closest = tried.iter().min_by(|a, b| {
            a.drop_points
                .total_cmp(&b.drop_points)
                .then(b.comparison.top1_agreement.total_cmp(&a.comparison.top1_agreement))
        });
        bail!(
            "no candidate is within the budget (drop ≤ {} points, top-1 agreement ≥ {:.2}%){}",
            budget.points,
            budget.min_agreement * 100.0,
            closest
                .map(|c| format!(
                    "; the closest is {} ({:.2} points, agreement {:.2}%)",
                    c.recipe,
                    c.drop_points,
                    c.comparison.top1_agreement * 100.0
                ))
                .unwrap_or_default()
        );
    };
    let mut q = made.swap_remove(best);
    if let Some(rec) = q.manifest.quantization.as_mut() {
        rec["auto"] = serde_json::json!({
            "budget_points": budget.points,
            "min_top1_agreement": budget.min_agreement,
            "float_latency_ms": float_latency_ms,
            "latency": "median of tern-device bench on the machine that ran --auto",
            "candidates": tried,
            "chosen": q.recipe.name(),
        });
    }
    let manifest = q.write(r.out)?;
    Ok(AutoOutcome {
        manifest,
        chosen: q.recipe.name(),
        float_latency_ms,
        tried,
        sizes: (file_size(r.bundle), file_size(r.out)),
    })
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn the_budget_bounds_agreement_as_well_as_accuracy() {
        let b = Budget { points: 0.5, min_agreement: 0.99 };
        // Seen: no accuracy lost, but 1.25% of the predictions changed.
        assert!(!b.admits(-1.25, 0.9875));
        assert!(!b.admits(0.6, 1.0));
        assert!(b.admits(0.5, 0.99));
        assert!(b.admits(-0.25, 0.9975));
    }
}
