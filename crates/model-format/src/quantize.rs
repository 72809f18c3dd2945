//! Static post-training int8 quantization of a Tern float graph, written
//! with standard ONNX operators only (opset 13), so tract and onnxruntime
//! run the same file.
//!
//! Two schemes, chosen by what tract runs fast (measured, see docs/quantization.md):
//! - [`Scheme::Weights`]: every weight stored as int8 (symmetric, one
//!   scale per output channel) behind a `DequantizeLinear` of a constant,
//!   which runtimes fold at load. Float compute, a ~4× smaller file.
//! - [`Scheme::Static`]: full and 1×1 convolutions become `QLinearConv`
//!   with int8 activations (asymmetric, per tensor, calibrated), int8
//!   weights (symmetric, zero point 0) and int32 bias; a following ReLU6
//!   is folded into the output range. Depthwise convolutions, residual
//!   `Add`s, pooling and the head stay float (their weights int8 behind
//!   `DequantizeLinear`), with `QuantizeLinear`/`DequantizeLinear` at the
//!   boundaries: tract's fast depthwise kernel is float-only.
//!
//! - [`Scheme::Qdq`]: the float graph with `QuantizeLinear` →
//!   `DequantizeLinear` pairs on every activation between convolutions
//!   (int8, asymmetric, per tensor), per-channel int8 weights and int32
//!   biases behind `DequantizeLinear`, ReLU6 folded into the ranges: the
//!   form runtimes fuse into integer kernels (onnxruntime; Tern's device).
//!
//! Activation ranges come from a [`Calibrator`] fed real activations by the
//! caller (the host runs the float graph in libtorch).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::json;

use crate::error::FormatError;
use crate::onnx::{self, tensor_proto::DataType};
use crate::onnx_build::{attr_int, named_node, node, tensor_f32, tensor_i32, tensor_i8};

/// Which graph to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// int8 weights, float compute.
    Weights,
    /// int8 weights and activations for full and 1×1 convolutions.
    Static,
    /// QDQ form, as onnxruntime's quantizer writes it: every convolution
    /// (stem, 1×1 and depthwise) reads `DequantizeLinear(QuantizeLinear(x))`
    /// and int8 weights (per channel) and an int32 bias behind
    /// `DequantizeLinear`; every tensor between convolutions (residual
    /// `Add` inputs and outputs included) is quantized once; ReLU6 clamps
    /// become the output range. The head stays float compute.
    Qdq,
}

/// How the range of an activation is chosen from its observed values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Smallest and largest value seen.
    MinMax,
    /// The given percentile at each end (e.g. 99.99): outliers saturate.
    Percentile(f64),
    /// The clipping threshold minimising the KL divergence between the
    /// activation histogram and its 8-bit quantized version.
    Entropy,
}

/// Number of histogram bins per tensor.
pub const BINS: usize = 2048;

/// An observed activation range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Range {
    /// Lower end.
    pub min: f32,
    /// Upper end.
    pub max: f32,
}

#[derive(Debug, Clone)]
struct Stats {
    min: f32,
    max: f32,
    /// Histogram over `[lo, hi]` = the observed range widened to include 0.
    hist: Vec<u64>,
    /// Histogram of |x| over `[0, max(|lo|, hi)]`.
    abs_hist: Vec<u64>,
}

impl Stats {
    fn bounds(&self) -> (f32, f32) {
        (self.min.min(0.0), self.max.max(0.0))
    }
}

/// Collects activation statistics in two passes over the calibration set:
/// [`Calibrator::observe_range`] for every batch, then (for percentile and
/// entropy) [`Calibrator::observe_histogram`] for every batch.
#[derive(Debug, Clone)]
pub struct Calibrator {
    method: Method,
    stats: BTreeMap<String, Stats>,
}

impl Calibrator {
    /// A calibrator for `method`.
    pub fn new(method: Method) -> Calibrator {
        Calibrator { method, stats: BTreeMap::new() }
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// Whether [`Calibrator::observe_histogram`] passes are needed.
    pub fn needs_histograms(&self) -> bool {
        self.method != Method::MinMax
    }

    /// Pass 1: widens the range of `name` to cover `values` (non-finite
    /// values are ignored).
    pub fn observe_range(&mut self, name: &str, values: &[f32]) {
        let s = self.stats.entry(name.to_owned()).or_insert_with(|| Stats {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            hist: Vec::new(),
            abs_hist: Vec::new(),
        });
        for &v in values.iter().filter(|v| v.is_finite()) {
            s.min = s.min.min(v);
            s.max = s.max.max(v);
        }
    }

    /// Pass 2: adds `values` to the histograms of `name` over the range
    /// found in pass 1 (values outside it land in the end bins).
    pub fn observe_histogram(&mut self, name: &str, values: &[f32]) {
        let Some(s) = self.stats.get_mut(name) else { return };
        if !(s.min <= s.max) {
            return;
        }
        if s.hist.is_empty() {
            s.hist = vec![0; BINS];
            s.abs_hist = vec![0; BINS];
        }
        let (lo, hi) = s.bounds();
        let width = (hi - lo).max(f32::MIN_POSITIVE);
        let amax = (-lo).max(hi).max(f32::MIN_POSITIVE);
        let last = (BINS - 1) as f32;
        for &v in values.iter().filter(|v| v.is_finite()) {
            s.hist[(((v - lo) / width) * BINS as f32).clamp(0.0, last) as usize] += 1;
            // Exact zeros (ReLU's, padding's) are exact at every threshold
            // (the zero point), so they say nothing about where to clip; in
            // the histogram their spike made every merged first bin look
            // costly and drove the search to the smallest threshold.
            if v != 0.0 {
                s.abs_hist[((v.abs() / amax) * BINS as f32).clamp(0.0, last) as usize] += 1;
            }
        }
    }

    /// The chosen range of every observed tensor.
    pub fn ranges(&self) -> Result<BTreeMap<String, Range>, FormatError> {
        let mut out = BTreeMap::new();
        for (name, s) in &self.stats {
            if !(s.min <= s.max) {
                return Err(FormatError::Invalid {
                    what: format!("calibration of `{name}`"),
                    detail: "no finite value was observed".into(),
                });
            }
            let r = match self.method {
                Method::MinMax => Range { min: s.min, max: s.max },
                _ if s.hist.is_empty() => {
                    return Err(FormatError::Invalid {
                        what: format!("calibration of `{name}`"),
                        detail: "the histogram pass did not see this tensor".into(),
                    })
                }
                Method::Percentile(p) => percentile_range(s, p),
                Method::Entropy => entropy_range(s),
            };
            out.insert(name.clone(), r);
        }
        Ok(out)
    }
}

fn percentile_range(s: &Stats, p: f64) -> Range {
    let (lo, hi) = s.bounds();
    let total: u64 = s.hist.iter().sum();
    let tail = ((1.0 - p / 100.0).clamp(0.0, 1.0) * total as f64) as u64;
    let edge = |i: usize| lo + (hi - lo) * i as f32 / BINS as f32;
    let mut acc = 0;
    let mut first = 0;
    for (i, &c) in s.hist.iter().enumerate() {
        acc += c;
        if acc > tail {
            first = i;
            break;
        }
    }
    acc = 0;
    let mut last = BINS - 1;
    for (i, &c) in s.hist.iter().enumerate().rev() {
        acc += c;
        if acc > tail {
            last = i;
            break;
        }
    }
    Range { min: edge(first).max(s.min), max: edge(last + 1).min(s.max) }
}

/// TensorRT-style KL calibration on the |x| histogram: for each candidate
/// threshold, the clipped distribution P (outliers folded into the last
/// bin) against its `levels`-level quantization Q; the threshold of least
/// KL(P‖Q). Non-negative tensors get `[0, t]` (256 levels), signed ones
/// `[-t, t]` (128 levels per side).
fn entropy_range(s: &Stats) -> Range {
    let (lo, hi) = s.bounds();
    let amax = (-lo).max(hi);
    let signed = s.min < 0.0;
    let levels = if signed { 128 } else { 256 };
    let h = &s.abs_hist;
    let mut best = (f64::INFINITY, BINS);
    for i in (levels..=BINS).step_by(8) {
        let mut p: Vec<f64> = h[..i].iter().map(|&c| c as f64).collect();
        p[i - 1] += h[i..].iter().sum::<u64>() as f64;
        // Q: merge the i bins into `levels` groups, spread each group's
        // mass evenly over its non-empty bins.
        let mut q = vec![0f64; i];
        for l in 0..levels {
            let (a, b) = (l * i / levels, ((l + 1) * i / levels).max(l * i / levels + 1));
            let mass: f64 = h[a..b].iter().map(|&c| c as f64).sum();
            let nonzero = h[a..b].iter().filter(|&&c| c > 0).count();
            if nonzero > 0 {
                for j in a..b {
                    if h[j] > 0 {
                        q[j] = mass / nonzero as f64;
                    }
                }
            }
        }
        let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
        if sp == 0.0 || sq == 0.0 {
            continue;
        }
        let mut kl = 0.0;
        for (pj, qj) in p.iter().zip(&q) {
            if *pj > 0.0 {
                let qj = if *qj > 0.0 { qj / sq } else { 1e-12 };
                kl += pj / sp * ((pj / sp) / qj).ln();
            }
        }
        if kl < best.0 {
            best = (kl, i);
        }
    }
    let t = amax * best.1 as f32 / BINS as f32;
    if signed {
        Range { min: (-t).max(s.min), max: t.min(s.max) }
    } else {
        Range { min: 0.0, max: t.min(s.max) }
    }
}

/// int8 quantization parameters of one activation tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QParams {
    /// Step between levels.
    pub scale: f32,
    /// The int8 value of 0.0.
    pub zero_point: i8,
}

impl QParams {
    /// Asymmetric int8 parameters covering `r` widened to include 0 (so
    /// zero padding and ReLU are exact).
    pub fn asymmetric(r: Range) -> QParams {
        let (lo, hi) = (r.min.min(0.0), r.max.max(0.0));
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zp = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i8;
        QParams { scale, zero_point: zp }
    }
}

/// What to quantize and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The scheme.
    pub scheme: Scheme,
    /// One weight scale per output channel for `QLinearConv` (per tensor
    /// otherwise). Weight-only layers always use per-channel scales.
    pub per_channel: bool,
    /// Convolutions (by the name of their weight's prefix, e.g.
    /// `_blocks.3._project_conv`) kept in float compute.
    pub float_layers: Vec<String>,
    /// Per-channel means of the inputs of the int8-weight float layers
    /// (by tensor name, see [`mean_tensors`]), measured on calibration
    /// images. When given, each such layer's bias absorbs the expected
    /// output shift its weight rounding causes (bias correction,
    /// Nagel et al. 2019): `b' = b − Σ (W_q − W)·E[x]`.
    pub input_means: BTreeMap<String, Vec<f32>>,
}

/// The inputs of the layers that keep float compute with int8 weights:
/// their per-channel means feed [`Options::input_means`].
pub fn mean_tensors(graph: &onnx::GraphProto, options: &Options) -> Result<Vec<String>, FormatError> {
    let quantized: HashSet<usize> =
        plan_convs(graph, options)?.iter().filter(|p| p.quantized).map(|p| p.node).collect();
    let mut names: Vec<String> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, n)| {
            matches!(n.op_type.as_deref(), Some("Conv" | "Gemm"))
                && !quantized.contains(i)
                && !n.input.get(1).is_some_and(|w| options.float_layers.contains(&layer_name(w)))
        })
        .filter_map(|(_, n)| n.input.first().cloned())
        .collect();
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Ok(names)
}

/// The expected output error per output channel of a layer whose weight
/// `w` (`[cout, cin/groups, k, k]` or `[cout, cin]`) became `wq·scale`,
/// for inputs with per-channel means `mean` (padding ignored).
fn expected_error(w: &[f32], wq: &[i8], scales: &[f32], dims: &[i64], groups: usize, mean: &[f32]) -> Option<Vec<f64>> {
    let cout = *dims.first()? as usize;
    let per_out = w.len() / cout.max(1);
    let cin_g = *dims.get(1)? as usize;
    let taps = per_out / cin_g.max(1);
    if cout == 0 || groups == 0 || cout % groups != 0 || mean.len() != cin_g * groups {
        return None;
    }
    let out_per_group = cout / groups;
    Some(
        (0..cout)
            .map(|o| {
                let g = o / out_per_group;
                let mut e = 0f64;
                for i in 0..cin_g {
                    let mu = f64::from(mean[g * cin_g + i]);
                    for t in 0..taps {
                        let j = o * per_out + i * taps + t;
                        e += (f64::from(wq[j]) * f64::from(scales[o]) - f64::from(w[j])) * mu;
                    }
                }
                e
            })
            .collect(),
    )
}

/// One convolution of the float graph and the decision taken for it.
#[derive(Debug, Clone)]
struct ConvPlan {
    node: usize,
    layer: String,
    quantized: bool,
    /// The Clip(0, 6) node folded into the output range, if any.
    clip: Option<usize>,
    /// The tensor the layer's consumers read (the Clip output if folded).
    output: String,
}

/// The tensors whose ranges [`quantize_graph`] needs for `options`: the
/// inputs and (ReLU6-fused) outputs of the convolutions it quantizes.
pub fn calibration_tensors(graph: &onnx::GraphProto, options: &Options) -> Result<Vec<String>, FormatError> {
    if options.scheme == Scheme::Qdq {
        return Ok(qdq_plan(graph, options)?.tensors);
    }
    let plans = plan_convs(graph, options)?;
    let mut names = Vec::new();
    for p in plans.iter().filter(|p| p.quantized) {
        names.push(graph.node[p.node].input[0].clone());
        names.push(p.output.clone());
    }
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Ok(names)
}

fn attr_i(node: &onnx::NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i)
}

fn f_name(n: &onnx::NodeProto) -> String {
    n.input.get(1).map(|w| layer_name(w)).unwrap_or_default()
}

/// The layer name of a weight tensor (`_blocks.3._project_conv.weight` →
/// `_blocks.3._project_conv`), as `Options::float_layers` takes it.
pub fn layer_name(weight: &str) -> String {
    weight.strip_suffix(".weight").unwrap_or(weight).to_owned()
}

fn plan_convs(graph: &onnx::GraphProto, options: &Options) -> Result<Vec<ConvPlan>, FormatError> {
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            consumers.entry(input.as_str()).or_default().push(i);
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().filter_map(|o| o.name.as_deref()).collect();
    let mut plans = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type.as_deref() != Some("Conv") {
            continue;
        }
        let (Some(w), Some(out)) = (n.input.get(1), n.output.first()) else {
            return Err(FormatError::Invalid {
                what: "graph".into(),
                detail: format!("Conv node {i} lacks a weight or output"),
            });
        };
        let layer = layer_name(w);
        let depthwise = attr_i(n, "group").unwrap_or(1) > 1;
        let quantized =
            options.scheme == Scheme::Static && !depthwise && !options.float_layers.iter().any(|f| f == &layer);
        let mut clip = None;
        let mut output = out.clone();
        if let [c] = consumers.get(out.as_str()).map(Vec::as_slice).unwrap_or_default() {
            let cn = &graph.node[*c];
            if cn.op_type.as_deref() == Some("Clip") && !outputs.contains(out.as_str()) && is_relu6(graph, cn) {
                clip = Some(*c);
                output = cn.output[0].clone();
            }
        }
        plans.push(ConvPlan { node: i, layer, quantized, clip: if quantized { clip } else { None }, output });
    }
    Ok(plans)
}

/// Whether a Clip node clips to [0, 6] (its bounds are scalar initializers).
fn is_relu6(graph: &onnx::GraphProto, clip: &onnx::NodeProto) -> bool {
    let value = |name: Option<&String>| -> Option<f32> {
        let t = graph.initializer.iter().find(|t| t.name.as_ref() == name)?;
        float_values(t).ok()?.first().copied()
    };
    value(clip.input.get(1)) == Some(0.0) && value(clip.input.get(2)) == Some(6.0)
}

/// The f32 values of an initializer (raw little-endian or `float_data`).
pub fn float_values(t: &onnx::TensorProto) -> Result<Vec<f32>, FormatError> {
    let name = t.name.clone().unwrap_or_default();
    if t.data_type != Some(DataType::Float as i32) {
        return Err(FormatError::Invalid { what: format!("initializer `{name}`"), detail: "not float32".into() });
    }
    let n: i64 = t.dims.iter().product();
    let values: Vec<f32> = match &t.raw_data {
        Some(raw) => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        None => t.float_data.clone(),
    };
    if values.len() as i64 != n {
        return Err(FormatError::Invalid {
            what: format!("initializer `{name}`"),
            detail: format!("{} values for dims {:?}", values.len(), t.dims),
        });
    }
    Ok(values)
}

/// The output channels (dimension 0) of weight `t` holding `len` values:
/// an error for an empty weight, a dimension below 1, or values that do
/// not split evenly into channels (a crafted file), never a panic later.
fn out_channels(t: &onnx::TensorProto, len: usize) -> Result<usize, FormatError> {
    let name = t.name.clone().unwrap_or_default();
    let bad = |detail: String| FormatError::Invalid { what: format!("weight `{name}`"), detail };
    if t.dims.iter().any(|d| *d < 1) || len == 0 {
        return Err(bad(format!("dims {:?}: expected every dimension ≥ 1", t.dims)));
    }
    let cout = t.dims.first().map_or(1, |d| *d as usize);
    if len % cout != 0 {
        return Err(bad(format!("{len} values do not split into {cout} output channels")));
    }
    Ok(cout)
}

/// Symmetric int8 weights: `round(w / s)`, `s = max|w| / 127` per output
/// channel (axis 0) or for the whole tensor. `w` is not empty and splits
/// evenly into `out_channels` ([`out_channels`] checks both).
fn quantize_weights(w: &[f32], out_channels: usize, per_channel: bool) -> (Vec<i8>, Vec<f32>) {
    let per = (w.len() / out_channels.max(1)).max(1);
    let amax = |s: &[f32]| s.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scales: Vec<f32> = if per_channel {
        w.chunks(per).map(|c| (amax(c) / 127.0).max(1e-12)).collect()
    } else {
        vec![(amax(w) / 127.0).max(1e-12)]
    };
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = if per_channel { scales[i / per] } else { scales[0] };
            (v / s).round().clamp(-127.0, 127.0) as i8
        })
        .collect();
    (q, scales)
}

/// Replaces the values of float initializers of `graph` (e.g. biases
/// corrected after [`quantize_graph`]); each must exist and keep its size.
pub fn replace_float_initializers(
    graph: &mut onnx::GraphProto,
    values: &BTreeMap<String, Vec<f32>>,
) -> Result<(), FormatError> {
    for (name, v) in values {
        let t = graph.initializer.iter_mut().find(|t| t.name.as_deref() == Some(name.as_str())).ok_or_else(|| {
            FormatError::Invalid { what: format!("initializer `{name}`"), detail: "not in the graph".into() }
        })?;
        let n: i64 = t.dims.iter().product();
        if n != v.len() as i64 {
            return Err(FormatError::Invalid {
                what: format!("initializer `{name}`"),
                detail: format!("{} values for dims {:?}", v.len(), t.dims),
            });
        }
        *t = tensor_f32(name, &t.dims, v);
    }
    Ok(())
}

/// The quantized graph, and the record for the manifest's `quantization`
/// field (scheme, parameters of every quantized tensor, float layers).
///
/// `ranges` must hold every tensor of [`calibration_tensors`] (not needed
/// for [`Scheme::Weights`]).
pub fn quantize_graph(
    graph: &onnx::GraphProto,
    ranges: &BTreeMap<String, Range>,
    options: &Options,
) -> Result<(onnx::GraphProto, serde_json::Value), FormatError> {
    if options.scheme == Scheme::Qdq {
        return quantize_qdq(graph, ranges, options);
    }
    let plans = plan_convs(graph, options)?;
    let by_node: HashMap<usize, &ConvPlan> = plans.iter().map(|p| (p.node, p)).collect();
    let folded_clips: HashSet<usize> = plans.iter().filter_map(|p| p.clip).collect();
    let float_readers = float_readers(graph, &plans, &folded_clips);
    let mut rw = Rewrite::new(graph, ranges, options);
    for (i, n) in graph.node.iter().enumerate() {
        if folded_clips.contains(&i) {
            continue;
        }
        let op = n.op_type.as_deref().unwrap_or_default();
        let plan = by_node.get(&i).copied();
        match (op, plan) {
            ("Conv", Some(p)) if p.quantized => rw.qlinear_conv(n, p, &float_readers)?,
            ("Conv" | "Gemm", _) if rw.requested_float(n) => rw.keep_float(n, op),
            ("Conv" | "Gemm", _) => rw.int8_weights_float_compute(n, op, plan)?,
            _ => rw.nodes.push(n.clone()),
        }
    }
    Ok(rw.finish(graph))
}

/// The float tensors still read by float nodes (or that are graph outputs)
/// once the quantized convolutions of `plans` read int8 versions: each
/// needs a DequantizeLinear after its producer.
fn float_readers<'g>(
    graph: &'g onnx::GraphProto,
    plans: &[ConvPlan],
    folded_clips: &HashSet<usize>,
) -> HashSet<&'g str> {
    let quantized_inputs: HashSet<(usize, usize)> = plans.iter().filter(|p| p.quantized).map(|p| (p.node, 0)).collect();
    let mut float_readers: HashSet<&str> = graph.output.iter().filter_map(|o| o.name.as_deref()).collect();
    for (i, n) in graph.node.iter().enumerate() {
        if folded_clips.contains(&i) {
            continue;
        }
        for (j, input) in n.input.iter().enumerate() {
            if !quantized_inputs.contains(&(i, j)) {
                float_readers.insert(input.as_str());
            }
        }
    }
    float_readers
}

/// An int8 weight written by [`Rewrite::int8_weight`]: its shape and float
/// values, the int8 values and scales, and the names of the three
/// initializers.
struct Int8Weight {
    dims: Vec<i64>,
    w: Vec<f32>,
    wq: Vec<i8>,
    scales: Vec<f32>,
    names: [String; 3],
}

/// The graph being rewritten by [`quantize_graph`], node by node, and the
/// record of what was done.
struct Rewrite<'g> {
    options: &'g Options,
    ranges: &'g BTreeMap<String, Range>,
    inits: HashMap<String, onnx::TensorProto>,
    nodes: Vec<onnx::NodeProto>,
    new_inits: Vec<onnx::TensorProto>,
    /// Initializers replaced by quantized (or corrected) ones.
    removed: HashSet<String>,
    /// float tensor name → (int8 tensor, scale name, zero point name)
    int8: HashMap<String, (String, String, String)>,
    tensors: serde_json::Map<String, serde_json::Value>,
    layers: Vec<serde_json::Value>,
    float_layers: Vec<serde_json::Value>,
}

impl<'g> Rewrite<'g> {
    fn new(graph: &onnx::GraphProto, ranges: &'g BTreeMap<String, Range>, options: &'g Options) -> Rewrite<'g> {
        Rewrite {
            options,
            ranges,
            inits: graph.initializer.iter().map(|t| (t.name.clone().unwrap_or_default(), t.clone())).collect(),
            nodes: Vec::new(),
            new_inits: Vec::new(),
            removed: HashSet::new(),
            int8: HashMap::new(),
            tensors: serde_json::Map::new(),
            layers: Vec::new(),
            float_layers: Vec::new(),
        }
    }

    fn range(&self, name: &str) -> Result<Range, FormatError> {
        self.ranges.get(name).copied().ok_or_else(|| FormatError::Invalid {
            what: "calibration".into(),
            detail: format!("no range for tensor `{name}`"),
        })
    }

    fn init(&self, name: &str, what: &str) -> Result<&onnx::TensorProto, FormatError> {
        self.inits.get(name).ok_or_else(|| FormatError::Invalid {
            what: "graph".into(),
            detail: format!("{what} `{name}` is not an initializer"),
        })
    }

    /// Scale and zero point of activation `name` from its range, as
    /// initializers; returns their names.
    fn qparam(&mut self, name: &str) -> Result<(String, String), FormatError> {
        let r = self.range(name)?;
        let q = QParams::asymmetric(r);
        let (s, z) = (format!("{name}.scale"), format!("{name}.zero_point"));
        self.new_inits.push(tensor_f32(&s, &[], &[q.scale]));
        self.new_inits.push(tensor_i8(&z, &[], &[q.zero_point]));
        self.tensors
            .insert(name.to_owned(), json!({"scale": q.scale, "zero_point": q.zero_point, "min": r.min, "max": r.max}));
        Ok((s, z))
    }

    /// Weight `w_name` of an `op` node rounded to int8 (symmetric, one scale
    /// per output channel or one in all), written as three initializers in
    /// place of the float one.
    fn int8_weight(&mut self, w_name: &str, op: &str, per_channel: bool) -> Result<Int8Weight, FormatError> {
        let w_t = self.init(w_name, &format!("{op} weight"))?;
        let w = float_values(w_t)?;
        let dims = w_t.dims.clone();
        let cout = out_channels(w_t, w.len())?;
        let (wq, scales) = quantize_weights(&w, cout, per_channel);
        let sdims: Vec<i64> = if per_channel { vec![cout as i64] } else { vec![] };
        let names = [format!("{w_name}.int8"), format!("{w_name}.scale"), format!("{w_name}.zero_point")];
        self.new_inits.push(tensor_i8(&names[0], &dims, &wq));
        self.new_inits.push(tensor_f32(&names[1], &sdims, &scales));
        self.new_inits.push(tensor_i8(&names[2], &sdims, &vec![0; scales.len()]));
        self.removed.insert(w_name.to_owned());
        Ok(Int8Weight { dims, w, wq, scales, names })
    }

    /// A quantized convolution: its input quantized once (QuantizeLinear),
    /// int8 weights, an int32 bias, QLinearConv, and a DequantizeLinear of
    /// the output where a float node reads it.
    fn qlinear_conv(
        &mut self,
        n: &onnx::NodeProto,
        p: &ConvPlan,
        float_readers: &HashSet<&str>,
    ) -> Result<(), FormatError> {
        let per_channel = self.options.per_channel;
        let x = &n.input[0];
        if !self.int8.contains_key(x) {
            let (s, z) = self.qparam(x)?;
            let q = format!("{x}.int8");
            self.nodes.push(node("QuantizeLinear", &[x, &s, &z], &q, vec![]));
            self.int8.insert(x.clone(), (q, s, z));
        }
        let (xq, xs, xz) = self.int8[x].clone();
        let Int8Weight { scales: ws, names: [wqn, wsn, wzn], .. } = self.int8_weight(&n.input[1], "Conv", per_channel)?;
        let x_scale = QParams::asymmetric(self.range(x)?).scale;
        let mut inputs: Vec<String> = vec![xq, xs, xz, wqn, wsn, wzn];
        let (ys, yz) = self.qparam(&p.output)?;
        inputs.push(ys.clone());
        inputs.push(yz.clone());
        if let Some(b_name) = n.input.get(2) {
            let b_t = self.init(b_name, "Conv bias")?;
            let b = float_values(b_t)?;
            let bq: Vec<i32> = b
                .iter()
                .enumerate()
                .map(|(c, v)| {
                    let s = x_scale * if per_channel { ws[c] } else { ws[0] };
                    (f64::from(*v) / f64::from(s)).round().clamp(i32::MIN as f64, i32::MAX as f64) as i32
                })
                .collect();
            let bqn = format!("{b_name}.int32");
            let bias = tensor_i32(&bqn, &b_t.dims, &bq);
            self.new_inits.push(bias);
            self.removed.insert(b_name.clone());
            inputs.push(bqn);
        }
        let yq = format!("{}.int8", p.output);
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let mut conv = node("QLinearConv", &refs, &yq, n.attribute.clone());
        conv.name = n.name.clone();
        self.nodes.push(conv);
        if float_readers.contains(p.output.as_str()) {
            let name = format!("{}.dequantize", p.output);
            let dequantize = node("DequantizeLinear", &[&yq, &ys, &yz], &p.output, vec![]);
            self.nodes.push(onnx::NodeProto { name: Some(name), ..dequantize });
        }
        self.int8.insert(p.output.clone(), (yq, ys, yz));
        self.layers.push(json!({
            "layer": p.layer,
            "op": "QLinearConv",
            "relu6_folded": p.clip.is_some(),
            "weight_scale": if per_channel { json!(ws) } else { json!(ws[0]) },
        }));
        Ok(())
    }

    /// Whether `n`'s layer is one of [`Options::float_layers`].
    fn requested_float(&self, n: &onnx::NodeProto) -> bool {
        self.options.float_layers.iter().any(|f| n.input.get(1).map(|w| layer_name(w)) == Some(f.clone()))
    }

    /// A layer kept entirely in float, as asked.
    fn keep_float(&mut self, n: &onnx::NodeProto, op: &str) {
        self.float_layers.push(json!({"layer": f_name(n), "op": op, "reason": "requested", "weights": "float32"}));
        self.nodes.push(n.clone());
    }

    /// Float compute, int8 weights behind a constant DequantizeLinear; the
    /// bias corrected for the weights' expected error where the input's
    /// channel means are known ([`Options::input_means`]).
    fn int8_weights_float_compute(
        &mut self,
        n: &onnx::NodeProto,
        op: &str,
        plan: Option<&ConvPlan>,
    ) -> Result<(), FormatError> {
        let w_name = &n.input[1];
        let Int8Weight { dims, w, wq, scales: ws, names: [wqn, wsn, wzn] } = self.int8_weight(w_name, op, true)?;
        let dq = format!("{w_name}.dequantize");
        let dequantize = node("DequantizeLinear", &[&wqn, &wsn, &wzn], w_name, vec![attr_int("axis", 0)]);
        self.nodes.push(onnx::NodeProto { name: Some(dq), ..dequantize });
        let groups = attr_i(n, "group").unwrap_or(1).max(1) as usize;
        let correction = match (self.options.input_means.get(&n.input[0]), n.input.get(2)) {
            (Some(mean), Some(b_name)) => expected_error(&w, &wq, &ws, &dims, groups, mean)
                .and_then(|e| Some((b_name, self.inits.get(b_name)?, e))),
            _ => None,
        };
        let depthwise = attr_i(n, "group").unwrap_or(1) > 1;
        let mut n = n.clone();
        if let Some((b_name, b_t, e)) = correction {
            let b = float_values(b_t)?;
            if b.len() == e.len() {
                let corrected: Vec<f32> = b.iter().zip(&e).map(|(b, e)| (f64::from(*b) - e) as f32).collect();
                let name = format!("{b_name}.corrected");
                let bias = tensor_f32(&name, &b_t.dims, &corrected);
                self.new_inits.push(bias);
                n.input[2] = name;
                self.removed.insert(b_name.clone());
            }
        }
        let corrected = n.input.get(2).is_some_and(|b| b.ends_with(".corrected"));
        self.nodes.push(n);
        let reason = match plan {
            Some(_) if depthwise => "depthwise",
            _ if op == "Gemm" => "head",
            _ => "weights-only scheme",
        };
        self.float_layers.push(json!({
            "layer": layer_name(w_name), "op": op, "reason": reason, "weights": "int8",
            "bias_corrected": corrected,
        }));
        Ok(())
    }

    /// The rewritten graph (the untouched initializers after the new ones)
    /// and the manifest's `quantization` record.
    fn finish(mut self, graph: &onnx::GraphProto) -> (onnx::GraphProto, serde_json::Value) {
        for t in &graph.initializer {
            let name = t.name.clone().unwrap_or_default();
            if !self.removed.contains(&name) {
                self.new_inits.push(t.clone());
            }
        }
        let options = self.options;
        let mut out = graph.clone();
        out.node = self.nodes;
        out.initializer = self.new_inits;
        let record = json!({
            "scheme": options.scheme,
            "weights": {"dtype": "int8", "symmetric": true, "zero_point": 0,
                        "per_channel": if options.scheme == Scheme::Static { options.per_channel } else { true }},
            "activations": if options.scheme == Scheme::Static {
                json!({"dtype": "int8", "asymmetric": true, "per_tensor": true})
            } else {
                json!({"dtype": "float32"})
            },
            "quantized_layers": self.layers,
            "float_layers": self.float_layers,
            "tensors": self.tensors,
        });
        (out, record)
    }
}

/// What [`Scheme::Qdq`] quantizes: the convolutions, the ReLU6 clips folded
/// into their output ranges, and the activation tensors given a
/// `QuantizeLinear` → `DequantizeLinear` pair, in graph order.
struct QdqPlan {
    convs: HashSet<usize>,
    /// Conv node → the Clip(0, 6) node after it, folded.
    folded: HashMap<usize, usize>,
    tensors: Vec<String>,
}

fn qdq_plan(graph: &onnx::GraphProto, options: &Options) -> Result<QdqPlan, FormatError> {
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            consumers.entry(input.as_str()).or_default().push(i);
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().filter_map(|o| o.name.as_deref()).collect();
    let mut plan = QdqPlan { convs: HashSet::new(), folded: HashMap::new(), tensors: Vec::new() };
    for (i, n) in graph.node.iter().enumerate() {
        match n.op_type.as_deref() {
            Some("Conv") => {
                let (Some(x), Some(w), Some(out)) = (n.input.first(), n.input.get(1), n.output.first()) else {
                    return Err(FormatError::Invalid {
                        what: "graph".into(),
                        detail: format!("Conv node {i} lacks an input, a weight or an output"),
                    });
                };
                if options.float_layers.iter().any(|f| f == &layer_name(w)) {
                    continue;
                }
                plan.convs.insert(i);
                plan.tensors.push(x.clone());
                let mut y = out.clone();
                if let [c] = consumers.get(out.as_str()).map(Vec::as_slice).unwrap_or_default() {
                    let cn = &graph.node[*c];
                    let clip_out = cn.output.first().map(String::as_str).unwrap_or_default();
                    if cn.op_type.as_deref() == Some("Clip")
                        && is_relu6(graph, cn)
                        && !outputs.contains(out.as_str())
                        && !outputs.contains(clip_out)
                    {
                        plan.folded.insert(i, *c);
                        y = clip_out.to_owned();
                    }
                }
                plan.tensors.push(y);
            }
            Some("Add") => plan.tensors.extend(n.input.iter().chain(&n.output).cloned()),
            _ => {}
        }
    }
    let inits: HashSet<&str> = graph.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    let mut seen = HashSet::new();
    plan.tensors.retain(|t| !outputs.contains(t.as_str()) && !inits.contains(t.as_str()) && seen.insert(t.clone()));
    Ok(plan)
}

/// The largest |int32 bias| [`Scheme::Qdq`] writes: far inside i32 with
/// the largest accumulator added (2²⁴ + 1152 channels × 2¹⁴ < 2³¹).
const MAX_BIAS: f32 = (1 << 24) as f32;

/// Per-channel int8 weights of `w_t` behind a `DequantizeLinear` (axis 0)
/// whose output keeps the weight's name; a channel's scale is at least
/// `min_scale[c]` where given. Returns the float weights, the int8 weights
/// and their scales.
fn dequantized_weight(
    w_t: &onnx::TensorProto,
    min_scale: Option<&[f32]>,
    nodes: &mut Vec<onnx::NodeProto>,
    inits: &mut Vec<onnx::TensorProto>,
) -> Result<(Vec<f32>, Vec<i8>, Vec<f32>), FormatError> {
    let w_name = w_t.name.clone().unwrap_or_default();
    let w = float_values(w_t)?;
    let cout = out_channels(w_t, w.len())?;
    let (mut wq, mut ws) = quantize_weights(&w, cout, true);
    if let Some(min) = min_scale.filter(|m| m.len() == cout) {
        let per = w.len() / cout.max(1);
        for (c, (s, &m)) in ws.iter_mut().zip(min).enumerate() {
            if *s < m {
                *s = m;
                for j in c * per..(c + 1) * per {
                    wq[j] = (w[j] / m).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
    }
    let (wqn, wsn, wzn) = (format!("{w_name}.int8"), format!("{w_name}.scale"), format!("{w_name}.zero_point"));
    inits.push(tensor_i8(&wqn, &w_t.dims, &wq));
    inits.push(tensor_f32(&wsn, &[ws.len() as i64], &ws));
    inits.push(tensor_i8(&wzn, &[ws.len() as i64], &vec![0; ws.len()]));
    nodes.push(named_node("DequantizeLinear", &format!("{w_name}.dequantize"), &[&wqn, &wsn, &wzn], &w_name, vec![attr_int("axis", 0)]));
    Ok((w, wq, ws))
}

/// [`Scheme::Qdq`]: see the module docs.
fn quantize_qdq(
    graph: &onnx::GraphProto,
    ranges: &BTreeMap<String, Range>,
    options: &Options,
) -> Result<(onnx::GraphProto, serde_json::Value), FormatError> {
    let plan = qdq_plan(graph, options)?;
    let folded_clips: HashSet<usize> = plan.folded.values().copied().collect();
    let inits: HashMap<String, onnx::TensorProto> =
        graph.initializer.iter().map(|t| (t.name.clone().unwrap_or_default(), t.clone())).collect();
    let init = |name: &str, what: &str| {
        inits.get(name).ok_or_else(|| FormatError::Invalid {
            what: "graph".into(),
            detail: format!("{what} `{name}` is not an initializer"),
        })
    };
    // Each quantized tensor's parameters; a tensor whose range is folded
    // from a ReLU6 keeps within [0, 6] so the saturation is the clip.
    let mut params: HashMap<String, QParams> = HashMap::new();
    let mut tensors = serde_json::Map::new();
    let mut new_inits: Vec<onnx::TensorProto> = Vec::new();
    let relu6_outputs: HashSet<&str> =
        plan.folded.values().filter_map(|&c| graph.node[c].output.first().map(String::as_str)).collect();
    for t in &plan.tensors {
        let mut r = ranges.get(t).copied().ok_or_else(|| FormatError::Invalid {
            what: "calibration".into(),
            detail: format!("no range for tensor `{t}`"),
        })?;
        if relu6_outputs.contains(t.as_str()) {
            r = Range { min: 0.0, max: r.max.clamp(0.0, 6.0) };
        }
        let q = QParams::asymmetric(r);
        new_inits.push(tensor_f32(&format!("{t}.scale"), &[], &[q.scale]));
        new_inits.push(tensor_i8(&format!("{t}.zero_point"), &[], &[q.zero_point]));
        tensors.insert(t.clone(), json!({"scale": q.scale, "zero_point": q.zero_point, "min": r.min, "max": r.max}));
        params.insert(t.clone(), q);
    }
    // `float` → Q → DQ → `out`, with the parameters of tensor `t`.
    let qdq = |float: &str, t: &str, out: &str| {
        let (s, z, q) = (format!("{t}.scale"), format!("{t}.zero_point"), format!("{out}.quantized"));
        [
            named_node("QuantizeLinear", &format!("{out}.quantize"), &[float, &s, &z], &q, vec![]),
            named_node("DequantizeLinear", &format!("{out}.dequantize"), &[&q, &s, &z], out, vec![]),
        ]
    };

    let mut nodes = Vec::new();
    // Graph inputs cannot be renamed: their consumers read a new name.
    let mut renamed: HashMap<String, String> = HashMap::new();
    for i in &graph.input {
        let Some(name) = i.name.as_deref() else { continue };
        if params.contains_key(name) {
            let dq = format!("{name}.dequantized");
            nodes.extend(qdq(name, name, &dq));
            renamed.insert(name.to_owned(), dq);
        }
    }
    let mut removed: HashSet<String> = HashSet::new();
    let mut layers = Vec::new();
    let mut float_layers = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        if folded_clips.contains(&i) {
            continue;
        }
        let mut n = n.clone();
        for input in n.input.iter_mut() {
            if let Some(r) = renamed.get(input.as_str()) {
                *input = r.clone();
            }
        }
        let op = n.op_type.clone().unwrap_or_default();
        let original_out = n.output.first().cloned().unwrap_or_default();
        if plan.convs.contains(&i) {
            let x = &graph.node[i].input[0];
            let xs = params.get(x).map(|q| q.scale).ok_or_else(|| FormatError::Invalid {
                what: "graph".into(),
                detail: format!("the input `{x}` of Conv node {i} is not quantized"),
            })?;
            let w_t = init(&n.input[1], "Conv weight")?;
            // A channel of (nearly) zero weights and a bias would need an
            // int32 bias past i32 at scale xs·ws: its weight scale is
            // raised so the bias stays within MAX_BIAS steps.
            let min_scale = match n.input.get(2) {
                Some(b) => Some(float_values(init(b, "Conv bias")?)?.iter().map(|b| b.abs() / (xs * MAX_BIAS)).collect::<Vec<f32>>()),
                None => None,
            };
            let (w, wq, ws) = dequantized_weight(w_t, min_scale.as_deref(), &mut nodes, &mut new_inits)?;
            removed.insert(n.input[1].clone());
            let mut corrected = false;
            if let Some(b_name) = n.input.get(2).cloned() {
                let mut b = float_values(init(&b_name, "Conv bias")?)?;
                let groups = attr_i(&n, "group").unwrap_or(1).max(1) as usize;
                if let Some(e) = options
                    .input_means
                    .get(x)
                    .and_then(|mean| expected_error(&w, &wq, &ws, &w_t.dims, groups, mean))
                    .filter(|e| e.len() == b.len())
                {
                    b.iter_mut().zip(&e).for_each(|(b, e)| *b = (f64::from(*b) - e) as f32);
                    corrected = true;
                }
                if b.len() != ws.len() {
                    return Err(FormatError::Invalid {
                        what: format!("Conv bias `{b_name}`"),
                        detail: format!("{} values for {} output channels", b.len(), ws.len()),
                    });
                }
                let bs: Vec<f32> = ws.iter().map(|w| w * xs).collect();
                let bq: Vec<i32> = b
                    .iter()
                    .zip(&bs)
                    .map(|(v, s)| (f64::from(*v) / f64::from(*s)).round().clamp(i32::MIN as f64, i32::MAX as f64) as i32)
                    .collect();
                let (bqn, bsn, bzn) = (format!("{b_name}.int32"), format!("{b_name}.scale"), format!("{b_name}.zero_point"));
                let dims = [bq.len() as i64];
                new_inits.push(tensor_i32(&bqn, &dims, &bq));
                new_inits.push(tensor_f32(&bsn, &dims, &bs));
                new_inits.push(tensor_i32(&bzn, &dims, &vec![0; bq.len()]));
                nodes.push(named_node("DequantizeLinear", &format!("{b_name}.dequantize"), &[&bqn, &bsn, &bzn], &b_name, vec![attr_int("axis", 0)]));
                removed.insert(b_name);
            }
            let relu6 = plan.folded.get(&i).map(|&c| graph.node[c].output[0].clone());
            layers.push(json!({
                "layer": layer_name(&n.input[1]),
                "op": "Conv",
                "relu6_folded": relu6.is_some(),
                "bias_corrected": corrected,
                "weight_scale": ws,
            }));
            if let Some(y) = relu6 {
                nodes.push(n);
                nodes.extend(qdq(&original_out, &y, &y));
                continue;
            }
        } else if matches!(op.as_str(), "Conv" | "Gemm") {
            let w_name = n.input.get(1).cloned().unwrap_or_default();
            if options.float_layers.iter().any(|f| f == &layer_name(&w_name)) {
                float_layers.push(json!({"layer": layer_name(&w_name), "op": op, "reason": "requested", "weights": "float32"}));
            } else {
                let w_t = init(&w_name, &format!("{op} weight"))?;
                dequantized_weight(w_t, None, &mut nodes, &mut new_inits)?;
                removed.insert(w_name.clone());
                float_layers.push(json!({"layer": layer_name(&w_name), "op": op, "reason": "head", "weights": "int8"}));
            }
        }
        if params.contains_key(&original_out) {
            let float = format!("{original_out}.float");
            n.output[0] = float.clone();
            nodes.push(n);
            nodes.extend(qdq(&float, &original_out, &original_out));
        } else {
            nodes.push(n);
        }
    }
    for t in &graph.initializer {
        let name = t.name.clone().unwrap_or_default();
        if !removed.contains(&name) {
            new_inits.push(t.clone());
        }
    }
    let mut out = graph.clone();
    out.node = nodes;
    out.initializer = new_inits;
    let record = json!({
        "scheme": Scheme::Qdq,
        "weights": {"dtype": "int8", "symmetric": true, "zero_point": 0, "per_channel": true},
        "activations": {"dtype": "int8", "asymmetric": true, "per_tensor": true},
        "bias": {"dtype": "int32", "scale": "input scale × weight scale, per output channel"},
        "quantized_layers": layers,
        "float_layers": float_layers,
        "tensors": tensors,
    });
    Ok((out, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_params_cover_the_range_and_zero() {
        let q = QParams::asymmetric(Range { min: 0.0, max: 6.0 });
        assert_eq!(q.zero_point, -128);
        assert!((q.scale - 6.0 / 255.0).abs() < 1e-7);
        let q = QParams::asymmetric(Range { min: -1.0, max: 3.0 });
        // 0.0 maps exactly to an integer level.
        let zero = (0.0 / q.scale).round() + f32::from(q.zero_point);
        assert_eq!(zero, f32::from(q.zero_point));
        let level = |x: f32| (x / q.scale).round() + f32::from(q.zero_point);
        assert!((level(-1.0) + 128.0).abs() <= 1.0, "{q:?}");
        assert!((level(3.0) - 127.0).abs() <= 1.0, "{q:?}");
    }

    #[test]
    fn odd_weight_shapes_are_errors_not_panics() {
        let t = |dims: Vec<i64>, n: usize| onnx::TensorProto {
            name: Some("w".into()),
            dims,
            data_type: Some(DataType::Float as i32),
            float_data: vec![0.5; n],
            ..Default::default()
        };
        for (dims, n) in [(vec![0, 3, 1, 1], 0), (vec![-2, -3], 6), (vec![], 0)] {
            let w = t(dims.clone(), n);
            let err = out_channels(&w, float_values(&w).map_or(n, |v| v.len())).unwrap_err().to_string();
            assert!(err.contains("weight `w`"), "{dims:?}: {err}");
        }
        assert_eq!(out_channels(&t(vec![4, 2, 3, 3], 72), 72).unwrap(), 4);
        assert!(out_channels(&t(vec![4, 2, 3, 3], 72), 70).is_err());
    }

    #[test]
    fn weights_round_trip_within_half_a_step() {
        let w: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) * if i < 32 { 0.01 } else { 1.0 }).collect();
        for per_channel in [false, true] {
            let (q, s) = quantize_weights(&w, 2, per_channel);
            for (i, (v, q)) in w.iter().zip(&q).enumerate() {
                let s = if per_channel { s[i / 32] } else { s[0] };
                assert!((v - f32::from(*q) * s).abs() <= s / 2.0 + 1e-7);
            }
        }
        // Per-channel keeps the small channel precise.
        let (q, _) = quantize_weights(&w, 2, true);
        assert!(q[..32].iter().any(|&v| v.abs() > 100));
    }

    #[test]
    fn percentile_clips_outliers_and_minmax_does_not() {
        let mut values: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        values.push(50.0);
        let run = |m: Method| {
            let mut c = Calibrator::new(m);
            c.observe_range("x", &values);
            if c.needs_histograms() {
                c.observe_histogram("x", &values);
            }
            c.ranges().unwrap()["x"]
        };
        assert_eq!(run(Method::MinMax).max, 50.0);
        let p = run(Method::Percentile(99.9));
        assert!(p.max < 1.1 && p.max > 0.9, "{p:?}");
        // Entropy searches thresholds from 256 of the 2048 bins up (as
        // TensorRT does from 128): here it clips the lone outlier away.
        let e = run(Method::Entropy);
        assert!(e.max <= 50.0 * 256.0 / 2048.0 + 1e-3 && e.min == 0.0, "{e:?}");
    }

    #[test]
    fn entropy_is_not_pulled_down_by_the_zeros_of_a_relu() {
        // 60% exact zeros (as after ReLU6), the rest spread evenly over
        // [0, 6): no outliers, so the range must stay close to 6.
        let values: Vec<f32> =
            (0..100_000).map(|i| if i % 10 < 6 { 0.0 } else { 6.0 * ((i * 7919) % 1000) as f32 / 1000.0 }).collect();
        let mut c = Calibrator::new(Method::Entropy);
        c.observe_range("x", &values);
        c.observe_histogram("x", &values);
        let e = c.ranges().unwrap()["x"];
        assert!(e.min == 0.0 && e.max > 5.0, "{e:?}");
    }

    #[test]
    fn a_tensor_never_seen_is_an_error() {
        let mut c = Calibrator::new(Method::Entropy);
        c.observe_range("x", &[f32::NAN]);
        assert!(c.ranges().is_err());
    }

    #[test]
    fn replaced_initializers_keep_their_size_and_must_exist() {
        let mut g = onnx::GraphProto { initializer: vec![tensor_f32("b", &[2], &[1.0, 2.0])], ..Default::default() };
        replace_float_initializers(&mut g, &BTreeMap::from([("b".to_string(), vec![3.0, 4.0])])).unwrap();
        assert_eq!(float_values(&g.initializer[0]).unwrap(), vec![3.0, 4.0]);
        assert_eq!(g.initializer[0].dims, vec![2]);
        let wrong = replace_float_initializers(&mut g, &BTreeMap::from([("b".to_string(), vec![3.0])]));
        assert!(wrong.unwrap_err().to_string().contains("`b`"));
        assert!(replace_float_initializers(&mut g, &BTreeMap::from([("c".to_string(), vec![])])).is_err());
        assert_eq!(float_values(&g.initializer[0]).unwrap(), vec![3.0, 4.0]);
    }
}
