//! Measuring the engine: thread pool choice, peak memory, latency
//! statistics and a per-operator profile of one tract plan.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use prost::Message;
use tern_model_format::{onnx, Bundle};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::OpState;
use tract_onnx::tract_core::plan::{eval, EvalContext};

use crate::engine::{optimized_model, LoadOptions};

/// The peak resident set size of this process (`VmHWM`), in bytes, where
/// the kernel reports it (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub use tern_model_format::report::{LatencyStats, NodeTime, Profile};

/// What a layer of the ONNX graph is, for comparing runtimes per kind of
/// work (their fused node names differ, the layer prefixes do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerKind {
    /// Convolution with a 1×1 kernel, one group (expand and project).
    Pointwise,
    /// Grouped convolution (group > 1).
    Depthwise,
    /// Any other convolution (the stem).
    FullConv,
    /// Gemm / MatMul (the classifier).
    Head,
    /// Everything else: pooling, residual adds, softmax, layout changes.
    Other,
}

impl LayerKind {
    /// The kind's name in reports (`bench/compare.sh` and
    /// `bench/ort_bench.py` use the same names).
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Pointwise => "pointwise 1x1",
            LayerKind::Depthwise => "depthwise",
            LayerKind::FullConv => "full conv",
            LayerKind::Head => "head (gemm)",
            LayerKind::Other => "other",
        }
    }
}

/// Layer prefixes of an ONNX graph and their kinds.
///
/// A convolution's layer is its weight's name without `.weight` (and
/// `.int8`), e.g. `_blocks.1._expand_conv`, so its tract nodes
/// (`_blocks.1._expand_conv.relu6.max.prefused`,
/// `_blocks.1._depthwise_conv.relu6.min`) and onnxruntime's fused ones
/// (`_blocks.1._expand_conv.out_nchwc`) map to it; its ONNX node name
/// without the last component is a second prefix. A Gemm or MatMul is known
/// by its node name and its weight's layer.
#[derive(Debug, Clone, Default)]
pub struct LayerKinds {
    /// (prefix, kind), longest prefix first.
    prefixes: Vec<(String, LayerKind)>,
}

impl LayerKinds {
    /// Reads the layers of `graph`.
    pub fn of_graph(graph: &onnx::GraphProto) -> LayerKinds {
        let dims: HashMap<&str, &[i64]> =
            graph.initializer.iter().filter_map(|t| Some((t.name.as_deref()?, t.dims.as_slice()))).collect();
        let producer: HashMap<&str, &onnx::NodeProto> =
            graph.node.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
        // A weight's shape: an initializer, or one behind a DequantizeLinear.
        let weight_dims = |name: &str| -> Option<&[i64]> {
            dims.get(name).copied().or_else(|| {
                let n = producer.get(name)?;
                (n.op_type.as_deref() == Some("DequantizeLinear")).then_some(())?;
                dims.get(n.input.first()?.as_str()).copied()
            })
        };
        let layer = |weight: &str| {
            let w = weight.strip_suffix(".int8").unwrap_or(weight);
            w.strip_suffix(".weight").unwrap_or(w).to_owned()
        };
        let mut prefixes = Vec::new();
        for n in &graph.node {
            let op = n.op_type.as_deref().unwrap_or("");
            let weight = match op {
                "Conv" | "ConvInteger" | "Gemm" | "MatMul" | "MatMulInteger" => n.input.get(1),
                "QLinearConv" | "QLinearMatMul" => n.input.get(3),
                _ => continue,
            };
            let Some(weight) = weight else { continue };
            let kind = match op {
                "Gemm" | "MatMul" | "MatMulInteger" | "QLinearMatMul" => LayerKind::Head,
                _ => {
                    let attr = |a: &str| n.attribute.iter().find(|x| x.name.as_deref() == Some(a));
                    let group = attr("group").and_then(|a| a.i).unwrap_or(1);
                    let kernel: Vec<i64> = match attr("kernel_shape") {
                        Some(a) if !a.ints.is_empty() => a.ints.clone(),
                        _ => weight_dims(weight).map(|d| d.iter().skip(2).copied().collect()).unwrap_or_default(),
                    };
                    if group > 1 {
                        LayerKind::Depthwise
                    } else if !kernel.is_empty() && kernel.iter().all(|&k| k == 1) {
                        LayerKind::Pointwise
                    } else {
                        LayerKind::FullConv
                    }
                }
            };
            prefixes.push((layer(weight), kind));
            if let Some(name) = n.name.as_deref().filter(|s| !s.is_empty()) {
                let base = if kind == LayerKind::Head { name } else { name.rsplit_once('.').map_or(name, |p| p.0) };
                prefixes.push((base.to_owned(), kind));
            }
        }
        prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        prefixes.dedup();
        LayerKinds { prefixes }
    }

    /// The kind of the layer a node name starts with (the whole name, or the
    /// prefix followed by `.`, `_`, `/` or `:`); `Other` when none does.
    pub fn kind(&self, node: &str) -> LayerKind {
        self.prefixes
            .iter()
            .find(|(p, _)| {
                node.strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '_', '/', ':']))
            })
            .map_or(LayerKind::Other, |(_, k)| *k)
    }
}

/// Sums node times per layer kind, slowest first: (kind, nodes, ms).
pub fn group_by_kind<'a>(
    kinds: &LayerKinds,
    times: impl IntoIterator<Item = (&'a str, f64)>,
) -> Vec<(String, usize, f64)> {
    let mut sum: HashMap<LayerKind, (usize, f64)> = HashMap::new();
    for (name, ms) in times {
        let e = sum.entry(kinds.kind(name)).or_default();
        e.0 += 1;
        e.1 += ms;
    }
    let mut v: Vec<(String, usize, f64)> = sum.into_iter().map(|(k, (c, t))| (k.name().to_owned(), c, t)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

/// Profiles the optimised plan of `bundle_path`, computing in `compute`, on
/// `input`: every node is timed around its own evaluation, over `iters` runs
/// after one warm-up.
pub fn profile(bundle_path: &Path, options: &LoadOptions, input: &[f32], iters: usize) -> Result<Profile> {
    let bundle = Bundle::read(bundle_path).with_context(|| format!("cannot load bundle {}", bundle_path.display()))?;
    let m = &bundle.manifest;
    let shape = m.preprocessing.input_shape();
    if input.len() != shape.iter().product::<usize>() {
        bail!("input has {} values, the model takes {shape:?}", input.len());
    }
    let compute = options.compute;
    let executor = options.executor()?;
    let plan = optimized_model(&bundle, options)?.into_runnable()?;
    let mut state = plan.spawn()?;
    let tensor: TValue = Tensor::from_shape(&shape, input)?.cast_to_dt(compute.datum_type())?.into_owned().into();
    let mut times: HashMap<usize, Duration> = HashMap::new();
    for i in 0..=iters {
        let mut timer = |ctx: &EvalContext,
                         st: Option<&mut (dyn OpState + 'static)>,
                         node: &TypedNode,
                         inputs: TVec<TValue>|
         -> TractResult<TVec<TValue>> {
            let t = Instant::now();
            let r = eval(ctx, st, node, inputs);
            if i > 0 {
                *times.entry(node.id).or_default() += t.elapsed();
            }
            r
        };
        crate::threads::scope(&executor, || state.run_plan_with_eval(tvec!(tensor.clone()), &mut timer))?;
    }
    let graph = plan.model();
    let per_run = |d: Duration| d.as_secs_f64() * 1e3 / iters.max(1) as f64;
    let mut nodes: Vec<NodeTime> = times
        .iter()
        .map(|(&id, &d)| {
            let node = graph.node(id);
            NodeTime { name: node.name.clone(), op: node.op().name().to_string(), mean_ms: per_run(d) }
        })
        .collect();
    nodes.sort_by(|a, b| b.mean_ms.total_cmp(&a.mean_ms));
    let mut by_op: HashMap<String, (usize, f64)> = HashMap::new();
    for n in &nodes {
        let e = by_op.entry(n.op.clone()).or_default();
        e.0 += 1;
        e.1 += n.mean_ms;
    }
    let mut by_op: Vec<(String, usize, f64)> = by_op.into_iter().map(|(k, (c, t))| (k, c, t)).collect();
    by_op.sort_by(|a, b| b.2.total_cmp(&a.2));
    let graph = onnx::ModelProto::decode(bundle.onnx.as_slice())
        .ok()
        .and_then(|m| m.graph)
        .with_context(|| format!("{}: cannot decode the ONNX graph", bundle_path.display()))?;
    let by_kind = group_by_kind(&LayerKinds::of_graph(&graph), nodes.iter().map(|n| (n.name.as_str(), n.mean_ms)));
    Ok(Profile { total_ms: nodes.iter().map(|n| n.mean_ms).sum(), nodes, by_op, by_kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = LatencyStats::of(&d).unwrap();
        assert_eq!((s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.min_ms), (50.0, 90.0, 99.0, 100.0, 1.0));
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        let one = LatencyStats::of(&[Duration::from_millis(3)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (3.0, 3.0));
        assert!(LatencyStats::of(&[]).is_none());
    }

    fn node(op: &str, name: &str, inputs: &[&str], attrs: &[(&str, Option<i64>, &[i64])]) -> onnx::NodeProto {
        onnx::NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.into()],
            attribute: attrs
                .iter()
                .map(|(n, i, ints)| onnx::AttributeProto {
                    name: Some(n.to_string()),
                    i: *i,
                    ints: ints.to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn init(name: &str, dims: &[i64]) -> onnx::TensorProto {
        onnx::TensorProto { name: Some(name.into()), dims: dims.to_vec(), ..Default::default() }
    }

    #[test]
    fn layer_kinds_follow_the_onnx_convolutions() {
        let graph = onnx::GraphProto {
            node: vec![
                node("Conv", "_conv_stem.out", &["input", "_conv_stem.weight"], &[]),
                node("Clip", "_conv_stem.relu6", &["_conv_stem.out"], &[]),
                node("Conv", "_blocks.1._expand_conv.out", &["x", "_blocks.1._expand_conv.weight"], &[]),
                node("DequantizeLinear", "dq", &["_blocks.1._depthwise_conv.weight.int8"], &[]),
                node("Conv", "_blocks.1._depthwise_conv.out", &["x", "dq"], &[("group", Some(96), &[])]),
                node(
                    "QLinearConv",
                    "_blocks.10._project_conv.out",
                    &["x", "s", "z", "_blocks.10._project_conv.weight.int8"],
                    &[("kernel_shape", None, &[1, 1])],
                ),
                node("Gemm", "logits", &["features", "_fc.weight"], &[]),
            ],
            initializer: vec![
                init("_conv_stem.weight", &[32, 3, 3, 3]),
                init("_blocks.1._expand_conv.weight", &[96, 16, 1, 1]),
                init("_blocks.1._depthwise_conv.weight.int8", &[96, 1, 3, 3]),
                init("_blocks.10._project_conv.weight.int8", &[80, 480, 1, 1]),
                init("_fc.weight", &[1000, 1280]),
            ],
            ..Default::default()
        };
        let k = LayerKinds::of_graph(&graph);
        let cases = [
            ("_conv_stem.relu6.max", LayerKind::FullConv),
            ("_conv_stem.out", LayerKind::FullConv),
            ("_blocks.1._expand_conv.relu6.max.prefused", LayerKind::Pointwise),
            ("_blocks.1._expand_conv.out.pack_a", LayerKind::Pointwise),
            ("_blocks.1._expand_conv.out_nchwc", LayerKind::Pointwise),
            ("_blocks.1._depthwise_conv.out", LayerKind::Depthwise),
            ("_blocks.1._depthwise_conv.relu6.min", LayerKind::Depthwise),
            ("_blocks.10._project_conv.out", LayerKind::Pointwise),
            // `_blocks.1` is not a prefix of `_blocks.10`'s layers and back.
            ("_blocks.10._depthwise_conv.out", LayerKind::Other),
            ("_blocks.1._project_conv.residual", LayerKind::Other),
            ("logits", LayerKind::Head),
            ("_fc.weight.pack_a", LayerKind::Head),
            ("logitsx", LayerKind::Other),
            ("features.pooled.sum", LayerKind::Other),
            ("probabilities", LayerKind::Other),
        ];
        for (name, want) in cases {
            assert_eq!(k.kind(name), want, "{name}");
        }
        let g = group_by_kind(&k, [("_conv_stem.out", 1.0), ("_blocks.1._depthwise_conv.out", 2.0), ("x", 0.5)]);
        assert_eq!(g[0], ("depthwise".to_owned(), 1, 2.0));
        assert_eq!(g.iter().map(|r| r.1).sum::<usize>(), 3);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = peak_rss_bytes().unwrap();
            assert!(rss > 1 << 20, "{rss}");
        }
    }
}
