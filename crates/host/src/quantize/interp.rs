//! The libtorch interpreter of Tern's ONNX graphs.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use prost::Message;
use tch::{Kind, Tensor};
use tern_model_format::onnx::{self, tensor_proto::DataType};

use tern_model_format::{Bundle, Manifest};

/// A Tern ONNX graph ready to run in libtorch (CPU).
pub struct OnnxNet {
    pub(super) nodes: Vec<onnx::NodeProto>,
    pub(super) consts: HashMap<String, Tensor>,
    pub(super) input: String,
    pub(super) logits: String,
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
    pub(super) fn last_uses(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for input in &n.input {
                m.insert(input.clone(), i);
            }
        }
        m
    }

    /// Drops from `values` what no node after node `k` reads (`last_uses`).
    pub(super) fn drop_dead(values: &mut HashMap<String, Tensor>, last_uses: &HashMap<String, usize>, k: usize) {
        values.retain(|name, _| last_uses.get(name).is_some_and(|&u| u > k));
    }

    /// The graph from node `start` on, given the values computed before it
    /// (`prefix`) and with the constant `replace.0` read as `replace.1`.
    /// Returns the logits.
    pub(super) fn run_from(
        &self,
        start: usize,
        prefix: &HashMap<String, Tensor>,
        replace: (&str, &Tensor),
    ) -> Result<Tensor> {
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
    pub(super) fn eval<'v>(
        &'v self,
        n: &onnx::NodeProto,
        value: impl Fn(&str) -> Option<&'v Tensor>,
    ) -> Result<Tensor> {
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
