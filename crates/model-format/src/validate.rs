//! Checks a bundle's graph before a runtime builds a plan from it.
//!
//! A runtime such as tract trusts the graph it reads: a convolution with a
//! stride of 0, pads of the wrong length or a `ConstantOfShape` to a huge
//! shape make it panic or allocate without bound, and its load time grows
//! faster than the node count. [`check`] reads the graph first, one node and
//! one initializer at a time (never the whole graph at once), and refuses it
//! with an error naming the node and the rule or limit when:
//!
//! - it has more than [`Limits::max_nodes`] nodes, or more than
//!   [`MAX_INITIALIZERS`] initializers;
//! - a node's operator is not in [`OPS`] (the operators Tern's exporter and
//!   quantizer write, and a few common ones), or is outside the standard
//!   domain, or reads a value nothing defined before it;
//! - an attribute is out of range: strides, dilations and group below 1,
//!   pads, strides or dilations of the wrong length, a group that does not
//!   divide the channels, a kernel larger than the padded input, an axis
//!   out of range, a reshape that changes the element count;
//! - an initializer's (or `Constant`'s) data does not match its dims and
//!   type, or lives in another file;
//! - a value's static shape cannot be worked out from the manifest's input
//!   shape and the constants (every shape here is static);
//! - the memory the values need — every initializer and every node output,
//!   plus the patches a full convolution gathers — exceeds
//!   [`Limits::memory_budget`] ([`DEFAULT_MEMORY_BUDGET`] unless raised).
//!   A single output over the budget is refused at that node, before
//!   anything is allocated for it.
//!
//! The estimate is a sum over all values, an upper bound on what a plan
//! holds at once (tract reuses buffers), so the budget is conservative.

use std::collections::HashMap;

use prost::Message;

use crate::bundle::{Fields, Payload};
use crate::error::FormatError;
use crate::manifest::Manifest;
use crate::onnx::{self, attribute_proto::AttributeType, tensor_proto::DataType};
use crate::Bundle;

/// Most nodes a graph may have by default. Tern's largest bundles (an int8
/// EfficientNet-Lite0) have a few hundred.
pub const MAX_NODES: usize = 10_000;
/// Most initializers a graph may have.
pub const MAX_INITIALIZERS: usize = 100_000;
/// Default memory budget of the values of a graph (1 GiB).
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;
/// Highest tensor rank accepted.
pub const MAX_RANK: usize = 8;
/// The operators a graph may hold (standard ONNX domain).
pub const OPS: &[&str] = &[
    "Add",
    "Clip",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "DequantizeLinear",
    "Div",
    "Expand",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "MatMul",
    "Mul",
    "QLinearConv",
    "QuantizeLinear",
    "Relu",
    "Reshape",
    "Sigmoid",
    "Softmax",
    "Sub",
    "Tanh",
    "Tile",
];

/// How far [`check`] lets a graph go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most nodes.
    pub max_nodes: usize,
    /// Most bytes the graph's values may need (see the module docs).
    pub memory_budget: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_nodes: MAX_NODES, memory_budget: DEFAULT_MEMORY_BUDGET }
    }
}

/// What [`check`] found in a graph it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Nodes in the graph.
    pub nodes: usize,
    /// Bytes the graph's values need (the figure held against the budget).
    pub bytes: u64,
}

/// Checks the graph of `bundle` against `limits` (see the module docs).
pub fn check(bundle: &Bundle, limits: &Limits) -> Result<Estimate, FormatError> {
    let mut graph = None;
    for field in Fields::new(&bundle.onnx) {
        let field = field?;
        if let (MODEL_GRAPH, Payload::Bytes(b)) = (field.number, field.payload) {
            graph = Some(b);
        }
    }
    let graph = graph.ok_or_else(|| FormatError::Malformed { detail: "no graph".into() })?;
    Checker::new(&bundle.manifest, limits).run(graph)
}

// Field numbers of ModelProto and GraphProto.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_SPARSE_INITIALIZER: u32 = 15;

/// Element types a graph's values may have.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
    I8,
    U8,
    I32,
    I64,
}

impl std::fmt::Display for Elem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Debug for Elem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Elem {
    fn from_onnx(dt: i32) -> Option<Elem> {
        Some(match DataType::try_from(dt).ok()? {
            DataType::Float => Elem::F32,
            DataType::Float16 => Elem::F16,
            DataType::Int8 => Elem::I8,
            DataType::Uint8 => Elem::U8,
            DataType::Int32 => Elem::I32,
            DataType::Int64 => Elem::I64,
            _ => return None,
        })
    }

    fn size(self) -> u64 {
        match self {
            Elem::I8 | Elem::U8 => 1,
            Elem::F16 => 2,
            Elem::F32 | Elem::I32 => 4,
            Elem::I64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::F16 => "float16",
            Elem::I8 => "int8",
            Elem::U8 => "uint8",
            Elem::I32 => "int32",
            Elem::I64 => "int64",
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Elem::F32 | Elem::F16)
    }
}

/// What is known of a value: its static shape and element type, and the
/// values of small int64 constants (shapes, repeats).
#[derive(Debug, Clone)]
struct Value {
    shape: Vec<u64>,
    elem: Elem,
    ints: Option<Vec<i64>>,
}

impl Value {
    fn new(shape: Vec<u64>, elem: Elem) -> Value {
        Value { shape, elem, ints: None }
    }

    fn rank(&self) -> usize {
        self.shape.len()
    }

    fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    fn is_scalar(&self) -> bool {
        self.rank() <= 1 && self.numel() == Some(1)
    }
}

/// Largest int64 constant whose values are kept (for shapes and repeats).
const MAX_KEPT_INTS: u64 = 64;

struct Checker<'m> {
    manifest: &'m Manifest,
    limits: Limits,
    values: HashMap<String, Value>,
    bytes: u64,
}

/// A rule broken by one node: the detail of a [`FormatError::BadNode`].
type Rule<T> = Result<T, String>;

impl<'m> Checker<'m> {
    fn new(manifest: &'m Manifest, limits: &Limits) -> Self {
        Checker { manifest, limits: *limits, values: HashMap::new(), bytes: 0 }
    }

    fn run(mut self, graph: &[u8]) -> Result<Estimate, FormatError> {
        let mut nodes: Vec<onnx::NodeProto> = Vec::new();
        let mut initializers = 0usize;
        let malformed = |what: &str, e: prost::DecodeError| FormatError::Malformed { detail: format!("{what}: {e}") };
        for field in Fields::new(graph) {
            let field = field?;
            let Payload::Bytes(b) = field.payload else { continue };
            match field.number {
                GRAPH_NODE => {
                    // Counted before decoding: a graph of a million nodes is
                    // refused after a scan, not after building them.
                    if nodes.len() >= self.limits.max_nodes {
                        return Err(FormatError::OverLimit {
                            what: "graph".into(),
                            found: (nodes.len() + 1) as u64,
                            limit: self.limits.max_nodes as u64,
                            unit: "nodes or more",
                            hint: "",
                        });
                    }
                    nodes.push(onnx::NodeProto::decode(b).map_err(|e| malformed("graph node", e))?);
                }
                GRAPH_INITIALIZER => {
                    initializers += 1;
                    if initializers > MAX_INITIALIZERS {
                        return Err(FormatError::OverLimit {
                            what: "graph".into(),
                            found: initializers as u64,
                            limit: MAX_INITIALIZERS as u64,
                            unit: "initializers or more",
                            hint: "",
                        });
                    }
                    let t = onnx::TensorProto::decode(b).map_err(|e| malformed("graph initializer", e))?;
                    let name = t.name.clone().unwrap_or_default();
                    let v = tensor_value(&t).map_err(|detail| FormatError::Invalid {
                        what: format!("initializer `{name}`"),
                        detail,
                    })?;
                    self.define(&format!("initializer `{name}`"), None, &name, v)?;
                }
                GRAPH_SPARSE_INITIALIZER => {
                    return Err(FormatError::Invalid {
                        what: "graph".into(),
                        detail: "sparse initializers are not supported".into(),
                    });
                }
                _ => {}
            }
        }
        let input = self.manifest.preprocessing.input_shape().iter().map(|&d| d as u64).collect();
        let name = self.manifest.io.input.clone();
        if self.values.contains_key(&name) {
            return Err(FormatError::Invalid {
                what: "graph".into(),
                detail: format!("the input `{name}` is also an initializer"),
            });
        }
        self.define("the graph input", None, &name, Value::new(input, Elem::F32))?;
        for (i, node) in nodes.iter().enumerate() {
            self.node(i, node)?;
        }
        let width = self.manifest.io.output_width as u64;
        for out in [&self.manifest.io.logits, &self.manifest.io.probabilities] {
            let v = self.values.get(out).ok_or_else(|| FormatError::Invalid {
                what: "graph".into(),
                detail: format!("no node computes the output `{out}`"),
            })?;
            if v.numel() != Some(width) || !v.elem.is_float() {
                return Err(FormatError::Invalid {
                    what: "graph".into(),
                    detail: format!(
                        "the output `{out}` comes out as {:?} {:?}, the manifest says {width} float values",
                        v.elem, v.shape
                    ),
                });
            }
        }
        Ok(Estimate { nodes: nodes.len(), bytes: self.bytes })
    }

    /// Adds the value `name` and its bytes to the estimate.
    fn define(&mut self, what: &str, node: Option<(&str, &str)>, name: &str, v: Value) -> Result<(), FormatError> {
        let budget = self.limits.memory_budget;
        let over = |what: String, found: u64| FormatError::OverLimit {
            what,
            found,
            limit: budget,
            unit: "bytes",
            hint: "; a larger --memory-budget-mib allows it",
        };
        let bytes = v.numel().and_then(|n| n.checked_mul(v.elem.size())).unwrap_or(u64::MAX);
        if bytes > budget {
            return Err(over(format!("{what}: `{name}` {:?} {:?}", v.elem, v.shape), bytes));
        }
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes > budget {
            let at = node.map_or_else(|| what.to_owned(), |(n, op)| format!("graph node `{n}` ({op})"));
            return Err(over(format!("the graph's values up to {at}"), self.bytes));
        }
        if name.is_empty() || self.values.insert(name.to_owned(), v).is_some() {
            let detail = format!("defines `{name}`, which is empty or already defined");
            return Err(match node {
                Some((n, op)) => FormatError::BadNode { node: n.into(), op: op.into(), detail },
                None => FormatError::Invalid { what: what.into(), detail },
            });
        }
        Ok(())
    }

    fn node(&mut self, i: usize, node: &onnx::NodeProto) -> Result<(), FormatError> {
        let op = node.op_type.clone().unwrap_or_default();
        let name = match (&node.name, node.output.first()) {
            (Some(n), _) if !n.is_empty() => n.clone(),
            (_, Some(o)) if !o.is_empty() => o.clone(),
            _ => format!("#{i}"),
        };
        let bad = |detail: String| FormatError::BadNode { node: name.clone(), op: op.clone(), detail };
        if !matches!(node.domain.as_deref(), None | Some("" | "ai.onnx")) {
            return Err(bad(format!("operator domain `{}` is not supported", node.domain.as_deref().unwrap_or(""))));
        }
        if !OPS.contains(&op.as_str()) {
            return Err(bad(format!("operator `{op}` is not one the device runs (it runs {})", OPS.join(", "))));
        }
        for a in &node.attribute {
            if a.g.is_some() || !a.graphs.is_empty() || a.ref_attr_name.is_some() {
                return Err(bad(format!("attribute `{}` holds a subgraph or a reference", a.name.as_deref().unwrap_or(""))));
            }
        }
        let mut inputs = Vec::with_capacity(node.input.len());
        for input in &node.input {
            if input.is_empty() {
                inputs.push(None);
                continue;
            }
            let v = self
                .values
                .get(input)
                .ok_or_else(|| bad(format!("reads `{input}`, which no earlier node, initializer or input defines")))?;
            inputs.push(Some(v));
        }
        let out = infer(&op, node, &inputs, self.limits.memory_budget).map_err(bad)?;
        if node.output.len() != 1 {
            return Err(bad(format!("{} outputs, expected 1", node.output.len())));
        }
        for v in &out.scratch {
            self.bytes = self.bytes.saturating_add(*v);
        }
        self.define(&format!("graph node `{name}` ({op})"), Some((&name, &op)), &node.output[0], out.value)
    }
}

/// What one node makes: its output, and scratch memory it needs while it runs.
struct Made {
    value: Value,
    scratch: Vec<u64>,
}

impl From<Value> for Made {
    fn from(value: Value) -> Made {
        Made { value, scratch: vec![] }
    }
}

/// Works out the output of one node from its inputs, checking its
/// attributes. `budget` bounds shapes taken from constants before anything
/// is made of them.
fn infer(op: &str, node: &onnx::NodeProto, inputs: &[Option<&Value>], budget: u64) -> Rule<Made> {
    let input = |k: usize| -> Rule<&Value> {
        inputs.get(k).copied().flatten().ok_or_else(|| format!("input {k} is missing"))
    };
    let at_most = |n: usize| -> Rule<()> {
        if inputs.len() > n {
            return Err(format!("{} inputs, at most {n} expected", inputs.len()));
        }
        Ok(())
    };
    Ok(match op {
        "Relu" | "Sigmoid" | "Tanh" | "HardSwish" | "HardSigmoid" | "Identity" => {
            at_most(1)?;
            let x = input(0)?;
            if op != "Identity" && !x.elem.is_float() {
                return Err(format!("takes floats, not {:?}", x.elem));
            }
            Value::new(x.shape.clone(), x.elem).into()
        }
        "Clip" => {
            at_most(3)?;
            let x = input(0)?;
            for k in [1, 2] {
                if let Some(Some(b)) = inputs.get(k) {
                    if !b.is_scalar() || b.elem != x.elem {
                        return Err(format!("bound {k} is {:?} {:?}, expected one {:?}", b.elem, b.shape, x.elem));
                    }
                }
            }
            Value::new(x.shape.clone(), x.elem).into()
        }
        "Softmax" => {
            at_most(1)?;
            let x = input(0)?;
            axis(node, "axis", -1, x.rank(), false)?;
            Value::new(x.shape.clone(), x.elem).into()
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            at_most(2)?;
            let (a, b) = (input(0)?, input(1)?);
            if a.elem != b.elem {
                return Err(format!("adds {:?} to {:?}", a.elem, b.elem));
            }
            Value::new(broadcast(&a.shape, &b.shape)?, a.elem).into()
        }
        "Conv" => {
            at_most(3)?;
            let (x, w) = (input(0)?, input(1)?);
            if !x.elem.is_float() || w.elem != x.elem {
                return Err(format!("takes {:?} input and {:?} weights, expected floats", x.elem, w.elem));
            }
            conv(node, x, w, inputs.get(2).copied().flatten(), x.elem)?
        }
        "QLinearConv" => {
            at_most(9)?;
            let (x, w) = (input(0)?, input(3)?);
            let (x_scale, x_zp, w_scale, w_zp, y_scale, y_zp) =
                (input(1)?, input(2)?, input(4)?, input(5)?, input(6)?, input(7)?);
            let int8 = |v: &Value| matches!(v.elem, Elem::I8 | Elem::U8);
            if !int8(x) || !int8(w) || x_zp.elem != x.elem || w_zp.elem != w.elem || !int8(y_zp) {
                return Err("takes int8 input, weights and zero points".into());
            }
            for (what, v) in [("x_scale", x_scale), ("x_zero_point", x_zp), ("y_scale", y_scale), ("y_zero_point", y_zp)]
            {
                if !v.is_scalar() {
                    return Err(format!("{what} has shape {:?}, expected one value", v.shape));
                }
            }
            let m = w.shape.first().copied().unwrap_or(0);
            for (what, v) in [("w_scale", w_scale), ("w_zero_point", w_zp)] {
                if !(v.is_scalar() || v.shape == [m]) {
                    return Err(format!("{what} has shape {:?}, expected one value or {m}", v.shape));
                }
            }
            let bias = inputs.get(8).copied().flatten();
            if bias.is_some_and(|b| b.elem != Elem::I32) {
                return Err("takes an int32 bias".into());
            }
            conv(node, x, w, bias, y_zp.elem)?
        }
        "QuantizeLinear" | "DequantizeLinear" => {
            at_most(3)?;
            let (x, scale) = (input(0)?, input(1)?);
            let zp = inputs.get(2).copied().flatten();
            if scale.elem != Elem::F32 {
                return Err(format!("scale of {:?}, expected float32", scale.elem));
            }
            if !scale.is_scalar() {
                let a = axis(node, "axis", 1, x.rank(), false)?;
                if scale.shape != [x.shape[a]] {
                    return Err(format!("scale of shape {:?} along axis {a} of {:?}", scale.shape, x.shape));
                }
            }
            if let Some(zp) = zp {
                if zp.shape != scale.shape {
                    return Err(format!("zero point of shape {:?}, scale of {:?}", zp.shape, scale.shape));
                }
            }
            if op == "QuantizeLinear" {
                if x.elem != Elem::F32 {
                    return Err(format!("quantizes {:?}, expected float32", x.elem));
                }
                let elem = zp.map_or(Elem::U8, |z| z.elem);
                if !matches!(elem, Elem::I8 | Elem::U8) {
                    return Err(format!("quantizes to {elem}, expected int8 or uint8"));
                }
                Value::new(x.shape.clone(), elem).into()
            } else {
                if !matches!(x.elem, Elem::I8 | Elem::U8 | Elem::I32) || zp.is_some_and(|z| z.elem != x.elem) {
                    return Err(format!("dequantizes {:?}, expected int8, uint8 or int32 with a zero point of that type", x.elem));
                }
                Value::new(x.shape.clone(), Elem::F32).into()
            }
        }
        "GlobalAveragePool" => {
            at_most(1)?;
            let x = input(0)?;
            if x.rank() < 3 || !x.elem.is_float() {
                return Err(format!("takes a float tensor of rank 3 or more, not {} {:?}", x.elem, x.shape));
            }
            let mut shape = x.shape[..2].to_vec();
            shape.resize(x.rank(), 1);
            Value::new(shape, x.elem).into()
        }
        "Flatten" => {
            at_most(1)?;
            let x = input(0)?;
            let a = axis(node, "axis", 1, x.rank(), true)?;
            let (outer, inner) = (product(&x.shape[..a])?, product(&x.shape[a..])?);
            Value::new(vec![outer, inner], x.elem).into()
        }
        "Gemm" => {
            at_most(3)?;
            let (a, b) = (input(0)?, input(1)?);
            if a.rank() != 2 || b.rank() != 2 || a.elem != b.elem || !a.elem.is_float() {
                return Err(format!("multiplies {:?} {:?} by {:?} {:?}, expected 2-D floats", a.elem, a.shape, b.elem, b.shape));
            }
            let (ta, tb) = (flag(node, "transA")?, flag(node, "transB")?);
            let (m, k) = if ta { (a.shape[1], a.shape[0]) } else { (a.shape[0], a.shape[1]) };
            let (k2, n) = if tb { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
            if k != k2 {
                return Err(format!("multiplies {:?} by {:?} (transA {ta}, transB {tb}): inner sizes {k} and {k2}", a.shape, b.shape));
            }
            if let Some(c) = inputs.get(2).copied().flatten() {
                if c.elem != a.elem || broadcast(&[m, n], &c.shape)? != [m, n] {
                    return Err(format!("C of shape {:?} does not broadcast to [{m}, {n}]", c.shape));
                }
            }
            Value::new(vec![m, n], a.elem).into()
        }
        "MatMul" => {
            at_most(2)?;
            let (a, b) = (input(0)?, input(1)?);
            if a.elem != b.elem || !a.elem.is_float() || a.rank() == 0 || b.rank() == 0 {
                return Err(format!("multiplies {:?} {:?} by {} {:?}", a.elem, a.shape, b.elem, b.shape));
            }
            let (ra, rb) = (a.rank(), b.rank());
            let k = a.shape[ra - 1];
            let k2 = if rb == 1 { b.shape[0] } else { b.shape[rb - 2] };
            if k != k2 {
                return Err(format!("multiplies {:?} by {:?}: inner sizes {k} and {k2}", a.shape, b.shape));
            }
            let batch_a = if ra > 2 { &a.shape[..ra - 2] } else { &[][..] };
            let batch_b = if rb > 2 { &b.shape[..rb - 2] } else { &[][..] };
            let mut shape = broadcast(batch_a, batch_b)?;
            if ra > 1 {
                shape.push(a.shape[ra - 2]);
            }
            if rb > 1 {
                shape.push(b.shape[rb - 1]);
            }
            Value::new(shape, a.elem).into()
        }
        "Reshape" => {
            at_most(2)?;
            let (x, s) = (input(0)?, input(1)?);
            let spec = constant_ints(s, "shape")?;
            let allowzero = int_attr(node, "allowzero")?.unwrap_or(0) != 0;
            let total = x.numel().ok_or("the input's size overflows")?;
            let mut shape = Vec::with_capacity(spec.len());
            let mut infer_at = None;
            for (i, &d) in spec.iter().enumerate() {
                shape.push(match d {
                    -1 if infer_at.is_none() => {
                        infer_at = Some(i);
                        1
                    }
                    0 if !allowzero => *x.shape.get(i).ok_or_else(|| format!("shape {spec:?} copies a dimension the input {:?} lacks", x.shape))?,
                    d if d >= 0 => d as u64,
                    _ => return Err(format!("shape {spec:?} is not a valid reshape")),
                });
            }
            let known = product(&shape)?;
            if let Some(i) = infer_at {
                if known == 0 || total % known != 0 {
                    return Err(format!("cannot reshape {:?} to {spec:?}", x.shape));
                }
                shape[i] = total / known;
            } else if known != total {
                return Err(format!("reshapes {:?} ({total} values) to {spec:?} ({known} values)", x.shape));
            }
            Value::new(shape, x.elem).into()
        }
        "ConstantOfShape" => {
            at_most(1)?;
            let s = input(0)?;
            let spec = constant_ints(s, "shape")?;
            let elem = match attr(node, "value") {
                Some(a) => {
                    let t = a.t.as_ref().ok_or("attribute `value` is not a tensor")?;
                    let v = tensor_value(t)?;
                    if v.numel() != Some(1) {
                        return Err(format!("value of shape {:?}, expected one value", v.shape));
                    }
                    v.elem
                }
                None => Elem::F32,
            };
            let shape = dims(&spec)?;
            check_size(&shape, elem, budget)?;
            Value::new(shape, elem).into()
        }
        "Expand" => {
            at_most(2)?;
            let (x, s) = (input(0)?, input(1)?);
            let spec = dims(&constant_ints(s, "shape")?)?;
            let shape = broadcast(&x.shape, &spec)?;
            check_size(&shape, x.elem, budget)?;
            Value::new(shape, x.elem).into()
        }
        "Tile" => {
            at_most(2)?;
            let (x, r) = (input(0)?, input(1)?);
            let repeats = dims(&constant_ints(r, "repeats")?)?;
            if repeats.len() != x.rank() {
                return Err(format!("{} repeats for a tensor of rank {}", repeats.len(), x.rank()));
            }
            let shape = x
                .shape
                .iter()
                .zip(&repeats)
                .map(|(&d, &r)| d.checked_mul(r).ok_or_else(|| format!("repeats {repeats:?} of {:?} overflow", x.shape)))
                .collect::<Rule<Vec<u64>>>()?;
            check_size(&shape, x.elem, budget)?;
            Value::new(shape, x.elem).into()
        }
        "Constant" => {
            at_most(0)?;
            if node.attribute.len() != 1 {
                return Err(format!("{} attributes, expected one", node.attribute.len()));
            }
            let a = &node.attribute[0];
            match a.name.as_deref() {
                Some("value") => tensor_value(a.t.as_ref().ok_or("attribute `value` is not a tensor")?)?,
                Some("value_float") => Value::new(vec![], Elem::F32),
                Some("value_int") => Value { shape: vec![], elem: Elem::I64, ints: a.i.map(|i| vec![i]) },
                Some("value_floats") => Value::new(vec![a.floats.len() as u64], Elem::F32),
                Some("value_ints") => Value {
                    shape: vec![a.ints.len() as u64],
                    elem: Elem::I64,
                    ints: (a.ints.len() as u64 <= MAX_KEPT_INTS).then(|| a.ints.clone()),
                },
                other => return Err(format!("attribute `{}` is not supported", other.unwrap_or(""))),
            }
            .into()
        }
        _ => return Err(format!("operator `{op}` has no shape rule")),
    })
}

/// A convolution's output (`Conv` or `QLinearConv`): input `[N, C, D...]`,
/// weights `[M, C/group, K...]`, optional bias `[M]`.
fn conv(node: &onnx::NodeProto, x: &Value, w: &Value, bias: Option<&Value>, elem: Elem) -> Rule<Made> {
    let r = x.rank();
    if !(3..=5).contains(&r) || w.rank() != r {
        return Err(format!("input {:?} and weights {:?}: expected 1-D to 3-D convolution shapes", x.shape, w.shape));
    }
    let s = r - 2;
    let (n, c, m, cg) = (x.shape[0], x.shape[1], w.shape[0], w.shape[1]);
    let group = int_attr(node, "group")?.unwrap_or(1);
    if group < 1 {
        return Err(format!("group {group}: must be at least 1"));
    }
    let g = group as u64;
    if c % g != 0 || m % g != 0 || cg.checked_mul(g) != Some(c) {
        return Err(format!("group {group} does not divide {c} input channels into weights {:?}", w.shape));
    }
    let kernel = &w.shape[2..];
    if kernel.contains(&0) || m == 0 {
        return Err(format!("weights {:?}: empty kernel", w.shape));
    }
    if let Some(ks) = ints_attr(node, "kernel_shape")? {
        if ks.len() != s || ks.iter().zip(kernel).any(|(&a, &b)| a != b as i64) {
            return Err(format!("kernel_shape {ks:?} does not match the weights {:?}", w.shape));
        }
    }
    let list = |name: &str, len: usize, default: i64, min: i64| -> Rule<Vec<u64>> {
        match ints_attr(node, name)? {
            None => Ok(vec![default as u64; len]),
            Some(v) if v.len() != len => Err(format!("{name} {v:?}: {} values, expected {len}", v.len())),
            Some(v) if v.iter().any(|&d| d < min || d > 1 << 16) => {
                Err(format!("{name} {v:?}: each must be between {min} and 65536"))
            }
            Some(v) => Ok(v.iter().map(|&d| d as u64).collect()),
        }
    };
    let strides = list("strides", s, 1, 1)?;
    let dilations = list("dilations", s, 1, 1)?;
    let auto_pad = string_attr(node, "auto_pad")?.unwrap_or_else(|| "NOTSET".into());
    let explicit = ints_attr(node, "pads")?.is_some();
    let pads = list("pads", 2 * s, 0, 0)?;
    if explicit && auto_pad != "NOTSET" {
        return Err(format!("both pads and auto_pad {auto_pad}"));
    }
    let mut out = vec![n, m];
    let mut patches = cg;
    for i in 0..s {
        let d = x.shape[2 + i];
        let eff = (kernel[i] - 1) * dilations[i] + 1;
        let o = match auto_pad.as_str() {
            "NOTSET" | "VALID" => {
                let (b, a) = if auto_pad == "NOTSET" { (pads[i], pads[i + s]) } else { (0, 0) };
                let padded = d + b + a;
                if eff > padded {
                    return Err(format!(
                        "kernel {:?} (dilations {dilations:?}) is larger than the padded input {:?} (pads {pads:?})",
                        kernel, &x.shape[2..]
                    ));
                }
                (padded - eff) / strides[i] + 1
            }
            "SAME_UPPER" | "SAME_LOWER" => d.div_ceil(strides[i]),
            other => return Err(format!("auto_pad {other:?} is not NOTSET, VALID, SAME_UPPER or SAME_LOWER")),
        };
        patches = patches.saturating_mul(kernel[i]).saturating_mul(o);
        out.push(o);
    }
    if let Some(b) = bias {
        if b.shape != [m] {
            return Err(format!("bias of shape {:?}, expected [{m}]", b.shape));
        }
    }
    // A full convolution gathers its input patches (im2col) before the
    // product: one row of C/group × kernel values per output position.
    let scratch = if g == 1 && kernel.iter().product::<u64>() > 1 {
        vec![patches.saturating_mul(n).saturating_mul(elem.size().max(4))]
    } else {
        vec![]
    };
    Ok(Made { value: Value::new(out, elem), scratch })
}

/// Numpy broadcasting of two shapes.
fn broadcast(a: &[u64], b: &[u64]) -> Rule<Vec<u64>> {
    let r = a.len().max(b.len());
    if r > MAX_RANK {
        return Err(format!("rank {r} is more than {MAX_RANK}"));
    }
    let at = |s: &[u64], i: usize| if i + s.len() >= r { s[i + s.len() - r] } else { 1 };
    (0..r)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

fn product(shape: &[u64]) -> Rule<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| format!("shape {shape:?} overflows"))
}

/// Refuses a shape taken from constants whose tensor would exceed `budget`.
fn check_size(shape: &[u64], elem: Elem, budget: u64) -> Rule<()> {
    let bytes = product(shape)?.checked_mul(elem.size());
    match bytes {
        Some(b) if b <= budget => Ok(()),
        _ => Err(format!(
            "makes a {elem} tensor of shape {shape:?}, {} bytes, more than the memory budget of {budget} bytes; \
             a larger --memory-budget-mib allows it",
            bytes.map_or_else(|| "over 2^64".to_owned(), |b| b.to_string())
        )),
    }
}

/// Shape values as dimensions (each ≥ 0, rank ≤ [`MAX_RANK`]).
fn dims(v: &[i64]) -> Rule<Vec<u64>> {
    if v.len() > MAX_RANK {
        return Err(format!("shape of rank {}, more than {MAX_RANK}", v.len()));
    }
    v.iter().map(|&d| u64::try_from(d).map_err(|_| format!("negative dimension in {v:?}"))).collect()
}

/// The values of a 1-D int64 constant.
fn constant_ints(v: &Value, what: &str) -> Rule<Vec<i64>> {
    if v.elem != Elem::I64 || v.rank() != 1 {
        return Err(format!("{what} is {:?} {:?}, expected a 1-D int64 constant", v.elem, v.shape));
    }
    v.ints.clone().ok_or_else(|| format!("{what} must be a constant (an initializer or a Constant node) of at most {MAX_KEPT_INTS} values"))
}

/// The shape, type and (for small int64 tensors) values of a tensor stored
/// in the graph, checking its data against its dims and type.
fn tensor_value(t: &onnx::TensorProto) -> Rule<Value> {
    if t.data_location == Some(onnx::tensor_proto::DataLocation::External as i32) || !t.external_data.is_empty() {
        return Err("its data is in another file, which the device does not read".into());
    }
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    let dt = t.data_type.unwrap_or(0);
    let elem = Elem::from_onnx(dt).ok_or_else(|| format!("data type {dt} is not supported"))?;
    let shape = dims(&t.dims)?;
    let n = product(&shape)?;
    let stored = match &t.raw_data {
        Some(raw) => raw.len() as u64 / elem.size(),
        None => (match elem {
            Elem::F32 => t.float_data.len(),
            Elem::I64 => t.int64_data.len(),
            _ => t.int32_data.len(),
        }) as u64,
    };
    let exact = t.raw_data.as_ref().is_none_or(|raw| raw.len() as u64 % elem.size() == 0);
    if stored != n || !exact {
        let held = t.raw_data.as_ref().map_or_else(|| format!("{stored} values"), |r| format!("{} bytes", r.len()));
        return Err(format!("dims {:?} declare {n} {elem} values, but it holds {held}", t.dims));
    }
    let ints = (elem == Elem::I64 && n <= MAX_KEPT_INTS).then(|| match &t.raw_data {
        Some(raw) => raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect(),
        None => t.int64_data.clone(),
    });
    Ok(Value { shape, elem, ints })
}

fn attr<'a>(node: &'a onnx::NodeProto, name: &str) -> Option<&'a onnx::AttributeProto> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

/// An attribute of type `ty`, if present; an error if present with another type.
fn typed_attr<'a>(node: &'a onnx::NodeProto, name: &str, ty: AttributeType) -> Rule<Option<&'a onnx::AttributeProto>> {
    match attr(node, name) {
        None => Ok(None),
        Some(a) if a.r#type.is_none_or(|t| t == ty as i32) => Ok(Some(a)),
        Some(a) => Err(format!("attribute `{name}` has type {:?}, expected {}", a.r#type, ty.as_str_name())),
    }
}

fn int_attr(node: &onnx::NodeProto, name: &str) -> Rule<Option<i64>> {
    Ok(typed_attr(node, name, AttributeType::Int)?.map(|a| a.i.unwrap_or(0)))
}

fn ints_attr<'a>(node: &'a onnx::NodeProto, name: &str) -> Rule<Option<&'a [i64]>> {
    Ok(typed_attr(node, name, AttributeType::Ints)?.map(|a| a.ints.as_slice()))
}

fn string_attr(node: &onnx::NodeProto, name: &str) -> Rule<Option<String>> {
    Ok(typed_attr(node, name, AttributeType::String)?.map(|a| String::from_utf8_lossy(a.s.as_deref().unwrap_or(&[])).into_owned()))
}

/// A 0/1 attribute.
fn flag(node: &onnx::NodeProto, name: &str) -> Rule<bool> {
    match int_attr(node, name)?.unwrap_or(0) {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("{name} {v}: expected 0 or 1")),
    }
}

/// An axis attribute in `[-rank, rank)` (or `[-rank, rank]` when `inclusive`),
/// made non-negative.
fn axis(node: &onnx::NodeProto, name: &str, default: i64, rank: usize, inclusive: bool) -> Rule<usize> {
    let a = int_attr(node, name)?.unwrap_or(default);
    let r = rank as i64;
    let hi = if inclusive { r } else { r - 1 };
    if a < -r || a > hi {
        return Err(format!("{name} {a} is out of range for rank {rank}"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Backbone;
    use crate::bundle::encode;
    use crate::export::{build_graph, default_io, HeadSpec};
    use crate::manifest::{ArchitectureInfo, OutputKind, Precision, Preprocessing, Provenance, ResizeMode, FORMAT_VERSION};
    use crate::onnx_build::{attr_int as int, attr_ints as ints, node as n, tensor_f32 as f32s};
    use crate::quantize::{calibration_tensors, quantize_graph, Options, Range, Scheme};
    use crate::weights::TensorData;
    use std::collections::{BTreeMap, HashMap};
    use std::time::{Duration, Instant};

    fn manifest(pre: Preprocessing, io: crate::manifest::Io, labels: usize) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            labels: (0..labels).map(|i| format!("l{i}")).collect(),
            preprocessing: pre,
            io,
            precision: Precision::F32,
            quantization: None,
            metrics: None,
            architecture: ArchitectureInfo { backbone: "test".into(), drop_blocks: 0, hidden: vec![] },
            provenance: Provenance {
                created_by: "test".into(),
                backbone_weights_sha256: "0".repeat(64),
                backbone_weights_source: "test".into(),
                training: None,
            },
            graph_sha256: String::new(),
        }
    }

    /// The float graph of a truncated EfficientNet-Lite0 with a 3-class head,
    /// as the exporter writes it, and its manifest.
    fn exported() -> (onnx::GraphProto, Manifest) {
        let backbone = Backbone::EfficientnetLite0;
        let spec = backbone.spec().drop_blocks(15).unwrap();
        let head = HeadSpec::trainable(spec.feature_width(), &[8], 3, OutputKind::Softmax);
        let mut w: HashMap<String, TensorData> = HashMap::new();
        for c in spec.convs() {
            let shape = c.weight_shape().to_vec();
            let n = shape.iter().product();
            w.insert(format!("{}.weight", c.conv), TensorData::new(shape, vec![0.01; n]).unwrap());
            for (s, v) in crate::arch::BN_SUFFIXES.iter().zip([1.0, 0.0, 0.0, 1.0]) {
                w.insert(format!("{}.{s}", c.bn), TensorData::new(vec![c.cout], vec![v; c.cout]).unwrap());
            }
        }
        w.insert("head.hidden.0.weight".into(), TensorData::new(vec![8, 16], vec![0.1; 128]).unwrap());
        w.insert("head.hidden.0.bias".into(), TensorData::new(vec![8], vec![0.0; 8]).unwrap());
        w.insert("head.out.weight".into(), TensorData::new(vec![3, 8], vec![0.1; 24]).unwrap());
        w.insert("head.out.bias".into(), TensorData::new(vec![3], vec![0.0; 3]).unwrap());
        let pre = backbone.preprocessing();
        let io = default_io(&head);
        let graph = build_graph(&spec, &head, &w, &pre, &io).unwrap();
        (graph, manifest(pre, io, 3))
    }

    fn bundle(graph: onnx::GraphProto, m: Manifest) -> Bundle {
        let (bytes, manifest) = encode(graph, m).unwrap();
        Bundle::unchecked(manifest, bytes)
    }

    fn check_default(graph: onnx::GraphProto, m: Manifest) -> Result<Estimate, FormatError> {
        check(&bundle(graph, m), &Limits::default())
    }

    #[test]
    fn what_the_exporter_and_the_quantizer_write_passes() {
        let (graph, m) = exported();
        let est = check_default(graph.clone(), m.clone()).unwrap();
        assert_eq!(est.nodes, graph.node.len());
        // The 224×224 input alone is 602 112 bytes; the stem output 1.6 MB.
        assert!(est.bytes > 2_000_000 && est.bytes < 100_000_000, "{est:?}");
        for scheme in [Scheme::Weights, Scheme::Static, Scheme::Qdq] {
            let options = Options { scheme, per_channel: true, float_layers: vec![], input_means: BTreeMap::new() };
            let ranges: BTreeMap<String, Range> = calibration_tensors(&graph, &options)
                .unwrap()
                .into_iter()
                .map(|t| (t, Range { min: 0.0, max: 6.0 }))
                .collect();
            let (q, _) = quantize_graph(&graph, &ranges, &options).unwrap();
            if scheme == Scheme::Static {
                assert!(q.node.iter().any(|n| n.op_type.as_deref() == Some("QLinearConv")));
            }
            if scheme == Scheme::Qdq {
                let count = |op: &str| q.node.iter().filter(|n| n.op_type.as_deref() == Some(op)).count();
                // Every ReLU6 after a convolution is folded into a range.
                assert_eq!(count("Clip"), 0);
                assert_eq!(count("Conv"), graph.node.iter().filter(|n| n.op_type.as_deref() == Some("Conv")).count());
                assert_eq!(count("QuantizeLinear"), ranges.len());
                // Every int32 bias within 2^24 steps (a weight scale is raised where needed).
                for t in q.initializer.iter().filter(|t| t.data_type == Some(crate::onnx::tensor_proto::DataType::Int32 as i32)) {
                    let raw = t.raw_data.as_deref().unwrap_or_default();
                    assert!(raw.chunks_exact(4).all(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]).unsigned_abs() <= 1 << 24), "{:?}", t.name);
                }
            }
            check_default(q, m.clone()).unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
        }
    }

    // A small graph around one node: input [1, 3, 8, 8] → `node` → a
    // GlobalAveragePool, Flatten and Gemm to 2 outputs; Softmax.
    fn around(node: onnx::NodeProto, inits: Vec<onnx::TensorProto>, channels: i64) -> (onnx::GraphProto, Manifest) {
        let pre = Preprocessing { width: 8, height: 8, resize: ResizeMode::Stretch, mean: [0.0; 3], std: [1.0; 3] };
        let io = crate::manifest::Io {
            input: "input".into(),
            logits: "logits".into(),
            probabilities: "probabilities".into(),
            output_width: 2,
            output_kind: OutputKind::Softmax,
        };
        let out = node.output[0].clone();
        let mut initializer = inits;
        initializer.push(f32s("head.w", &[2, channels], &vec![0.5; 2 * channels as usize]));
        initializer.push(f32s("head.b", &[2], &[0.0; 2]));
        let graph = onnx::GraphProto {
            name: Some("t".into()),
            node: vec![
                node,
                n("GlobalAveragePool", &[&out], "pooled", vec![]),
                n("Flatten", &["pooled"], "features", vec![]),
                n("Gemm", &["features", "head.w", "head.b"], "logits", vec![int("transB", 1)]),
                n("Softmax", &["logits"], "probabilities", vec![]),
            ],
            initializer,
            input: vec![],
            output: vec![],
            ..Default::default()
        };
        (graph, manifest(pre, io, 2))
    }

    // int64_data rather than raw_data: the other way ONNX stores tensors.
    fn i64s(name: &str, v: &[i64]) -> onnx::TensorProto {
        onnx::TensorProto {
            name: Some(name.into()),
            dims: vec![v.len() as i64],
            data_type: Some(DataType::Int64 as i32),
            int64_data: v.to_vec(),
            ..Default::default()
        }
    }

    /// A 3×3 convolution 3 → 4 channels with `attrs`.
    fn conv(attrs: Vec<onnx::AttributeProto>) -> (onnx::GraphProto, Manifest) {
        let w = f32s("w", &[4, 3, 3, 3], &[0.1; 108]);
        around(n("Conv", &["input", "w"], "y", attrs), vec![w], 4)
    }

    /// The error text of a refused graph, which must name `node` and say `says`,
    /// found within a second.
    fn refused(g: (onnx::GraphProto, Manifest), node: &str, says: &str) {
        let t = Instant::now();
        let err = check_default(g.0, g.1).expect_err("accepted").to_string();
        assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
        assert!(err.contains(node), "does not name `{node}`: {err}");
        assert!(err.contains(says), "does not say {says:?}: {err}");
    }

    #[test]
    fn a_plain_convolution_passes() {
        let (g, m) = conv(vec![ints("strides", &[1, 1]), ints("pads", &[1, 1, 1, 1])]);
        check_default(g, m).unwrap();
    }

    #[test]
    fn convolution_attributes_are_checked() {
        refused(conv(vec![ints("strides", &[0, 1])]), "`y` (Conv)", "strides [0, 1]: each must be between 1");
        refused(conv(vec![ints("pads", &[1, 1])]), "`y` (Conv)", "pads [1, 1]: 2 values, expected 4");
        refused(conv(vec![ints("dilations", &[1, 1, 1])]), "`y`", "dilations [1, 1, 1]: 3 values, expected 2");
        refused(conv(vec![ints("dilations", &[5, 5])]), "`y`", "larger than the padded input");
        refused(conv(vec![int("group", 0)]), "`y`", "group 0");
        refused(conv(vec![int("group", 2)]), "`y`", "group 2 does not divide 3 input channels");
        refused(conv(vec![ints("kernel_shape", &[2, 2])]), "`y`", "kernel_shape [2, 2] does not match");
        refused(conv(vec![ints("pads", &[-1, 0, 0, 0])]), "`y`", "each must be between 0");
    }

    #[test]
    fn initializers_must_hold_what_their_dims_declare() {
        let mut w = f32s("w", &[4, 3, 3, 3], &[0.1; 108]);
        w.dims = vec![4000, 3000, 3, 3];
        refused(around(n("Conv", &["input", "w"], "y", vec![]), vec![w], 4), "initializer `w`", "dims [4000, 3000, 3, 3] declare 108000000 float32 values, but it holds 432 bytes");
    }

    #[test]
    fn constant_of_shape_to_a_huge_shape_is_refused() {
        let s = i64s("s", &[1, 3, 1 << 20, 1 << 20]);
        refused(around(n("ConstantOfShape", &["s"], "y", vec![]), vec![s], 3), "`y` (ConstantOfShape)", "memory budget");
    }

    #[test]
    fn a_huge_reshape_is_refused() {
        let s = i64s("s", &[1, 3, 1 << 30, 1 << 30]);
        refused(around(n("Reshape", &["input", "s"], "y", vec![]), vec![s], 3), "`y` (Reshape)", "reshapes [1, 3, 8, 8]");
        let s = i64s("s", &[1, 3, -1, -1]);
        refused(around(n("Reshape", &["input", "s"], "y", vec![]), vec![s], 3), "`y` (Reshape)", "not a valid reshape");
        let s = i64s("s", &[1, 3, 4, 16]);
        let (g, m) = around(n("Reshape", &["input", "s"], "y", vec![]), vec![s], 3);
        check_default(g, m).unwrap();
    }

    #[test]
    fn expand_and_tile_are_bounded_by_the_budget() {
        let s = i64s("s", &[64, 1 << 16, 3, 8, 8]);
        refused(around(n("Expand", &["input", "s"], "y", vec![]), vec![s], 3), "`y` (Expand)", "memory budget");
        let r = i64s("r", &[1, 1, 1 << 14, 1 << 14]);
        refused(around(n("Tile", &["input", "r"], "y", vec![]), vec![r], 3), "`y` (Tile)", "memory budget");
    }

    #[test]
    fn the_budget_is_a_limit_that_can_be_raised() {
        let (g, m) = exported();
        let b = bundle(g, m);
        let est = check(&b, &Limits::default()).unwrap();
        let tight = Limits { memory_budget: est.bytes - 1, ..Limits::default() };
        let err = check(&b, &tight).unwrap_err().to_string();
        assert!(err.contains("more than the limit of") && err.contains("--memory-budget-mib"), "{err}");
        check(&b, &Limits { memory_budget: est.bytes, ..Limits::default() }).unwrap();
    }

    #[test]
    fn a_node_count_bomb_is_refused_before_it_is_decoded() {
        let (mut g, m) = around(n("Relu", &["input"], "y", vec![]), vec![], 3);
        let relu = n("Identity", &["y"], "y", vec![]);
        g.node.splice(1..1, std::iter::repeat_n(relu, 200_000));
        let t = Instant::now();
        let err = check_default(g, m).unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
        assert!(err.contains("10001 nodes or more, more than the limit of 10000"), "{err}");
    }

    #[test]
    fn unknown_operators_domains_and_inputs_are_refused() {
        refused(around(n("Loop", &["input"], "y", vec![]), vec![], 3), "`y` (Loop)", "not one the device runs");
        let mut node = n("Relu", &["input"], "y", vec![]);
        node.domain = Some("com.microsoft".into());
        refused(around(node, vec![], 3), "`y` (Relu)", "domain `com.microsoft`");
        refused(around(n("Relu", &["nowhere"], "y", vec![]), vec![], 3), "`y` (Relu)", "reads `nowhere`");
    }
}
