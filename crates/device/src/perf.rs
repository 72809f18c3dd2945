//! Measuring the engine: thread pool choice, peak memory, latency
//! statistics and a per-operator profile of one tract plan.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tern_model_format::Bundle;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::OpState;
use tract_onnx::tract_core::plan::{eval, EvalContext};
use tract_onnx::tract_core::tract_linalg::multithread::{set_default_executor, Executor};

use crate::engine::{optimized_model, Compute};

/// Makes every tract plan run in this process use `threads` threads for its
/// matrix products, depthwise convolutions and element-wise kernels: one
/// thread is tract's single-threaded executor, more is a rayon pool of that
/// size (tract-linalg's `multithread-mm`).
///
/// Call it before loading a bundle; plans read the default executor when
/// they run.
pub fn use_threads(threads: usize) -> Result<()> {
    match threads {
        0 => bail!("--threads must be at least 1"),
        1 => set_default_executor(Executor::SingleThread),
        n => set_default_executor(Executor::multithread(n)),
    }
    Ok(())
}

/// The peak resident set size of this process (`VmHWM`), in bytes, where
/// the kernel reports it (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Percentiles and mean of a set of durations.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencyStats {
    /// How many samples.
    pub n: usize,
    /// Mean, ms.
    pub mean_ms: f64,
    /// Fastest, ms.
    pub min_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
}

impl LatencyStats {
    /// Statistics of `samples` (nearest-rank percentiles). `None` when empty.
    pub fn of(samples: &[Duration]) -> Option<LatencyStats> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Some(LatencyStats {
            n: ms.len(),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            min_ms: ms[0],
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: ms[ms.len() - 1],
        })
    }
}

/// Time spent in one node of the optimised plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeTime {
    /// Node name in the optimised graph (derived from the ONNX node names).
    pub name: String,
    /// tract operator, e.g. `Conv`, `DepthWise`, `OptMatMul`.
    pub op: String,
    /// Mean time per run, ms.
    pub mean_ms: f64,
}

/// A per-node profile of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Profile {
    /// Sum of the node times, ms per run.
    pub total_ms: f64,
    /// Every node that ran, slowest first.
    pub nodes: Vec<NodeTime>,
    /// Time per operator kind, ms per run, slowest first: (op, count, ms).
    pub by_op: Vec<(String, usize, f64)>,
}

/// Profiles the optimised plan of `bundle_path`, computing in `compute`, on
/// `input`: every node is timed around its own evaluation, over `iters` runs
/// after one warm-up.
pub fn profile(bundle_path: &Path, compute: Compute, input: &[f32], iters: usize) -> Result<Profile> {
    let bundle = Bundle::read(bundle_path).with_context(|| format!("cannot load bundle {}", bundle_path.display()))?;
    let m = &bundle.manifest;
    let shape = m.preprocessing.input_shape();
    if input.len() != shape.iter().product::<usize>() {
        bail!("input has {} values, the model takes {shape:?}", input.len());
    }
    let plan = optimized_model(&bundle, compute)?.into_runnable()?;
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
        state.run_plan_with_eval(tvec!(tensor.clone()), &mut timer)?;
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
    Ok(Profile { total_ms: nodes.iter().map(|n| n.mean_ms).sum(), nodes, by_op })
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

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = peak_rss_bytes().unwrap();
            assert!(rss > 1 << 20, "{rss}");
        }
    }
}
