//! The JSON lines `tern-device` prints with `--json`, as types both sides
//! share: the device writes them from these structs, the host reads them
//! back into the same structs, so a renamed or retyped key fails to compile
//! instead of reading as a missing value.
//!
//! - `classify --json`: one [`ClassifyLine`] per image.
//! - `eval --json`: one [`Prediction`] per image, then one summary line
//!   (`{"summary": {..}}`); [`EvalLine`] reads either.
//! - `bench --json`: one [`BenchReport`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One ranked class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    /// Label index.
    pub index: usize,
    /// Label text.
    pub label: String,
    /// Probability of this label.
    pub probability: f32,
}

/// A line of `tern-device classify --json`: one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyLine {
    /// The image file.
    pub image: PathBuf,
    /// The best labels, most probable first (`--top-k` of them).
    pub top: Vec<Ranked>,
    /// The raw logits (with `--logits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
    /// Time of the inference alone, ms.
    pub latency_ms: f64,
}

/// One labelled image's result: a line of `tern-device eval --json`, and
/// an entry of the host's training report (`predictions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The file.
    pub path: PathBuf,
    /// True label index.
    pub label: usize,
    /// Predicted label index (top-1).
    pub predicted: usize,
    /// Probability of each label (for a one-unit sigmoid bundle:
    /// `[1 − p, p]`).
    pub probabilities: Vec<f32>,
}

/// The last line of `tern-device eval --json`, under the key `summary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Images evaluated.
    pub images: usize,
    /// Of them, predicted right.
    pub correct: usize,
    /// `correct / images` (0 when none).
    pub accuracy: f64,
    /// Files that could not be read.
    pub skipped: usize,
}

/// Any line of `tern-device eval --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EvalLine {
    /// The closing line, `{"summary": {..}}`.
    Summary {
        /// The totals.
        summary: EvalSummary,
    },
    /// One image.
    Image(Prediction),
}

/// Percentiles and mean of a set of durations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeTime {
    /// Node name in the optimised graph (derived from the ONNX node names).
    pub name: String,
    /// tract operator, e.g. `Conv`, `DepthWise`, `OptMatMul`.
    pub op: String,
    /// Mean time per run, ms.
    pub mean_ms: f64,
}

/// A per-node profile of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Sum of the node times, ms per run.
    pub total_ms: f64,
    /// Every node that ran, slowest first.
    pub nodes: Vec<NodeTime>,
    /// Time per operator kind, ms per run, slowest first: (op, count, ms).
    pub by_op: Vec<(String, usize, f64)>,
    /// Time per layer kind of the ONNX graph (pointwise, depthwise, full
    /// convolution, head, other), ms per run, slowest first: (kind, nodes,
    /// ms). Every node counts towards the layer its name starts with:
    /// packing, fused activations and separate clips included.
    pub by_kind: Vec<(String, usize, f64)>,
}

/// Cost of turning a 640×480 JPEG frame into the model input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FrameCost {
    /// JPEG decoding.
    pub decode: LatencyStats,
    /// Resizing, cropping and normalising (the shared preprocessing).
    pub resize_normalise: LatencyStats,
}

/// What `tern-device bench --json` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The bundle file.
    pub bundle: PathBuf,
    /// The bundle's precision (`f32`, `int8`, …), lowercase.
    pub precision: String,
    /// The float type the plan computes in: `f32`, or `f16` with `--f16`.
    pub compute: String,
    /// Size of the bundle file.
    pub model_bytes: u64,
    /// Threads of the plan's pool.
    pub threads: usize,
    /// tract-linalg's channel-last depthwise kernel on this machine (`None`:
    /// depthwise layers stay channel-first).
    pub depthwise_kernel: Option<String>,
    /// Whether Tern's fused ops ran (false with `--tract-kernels`, or on a
    /// CPU without their kernels).
    pub tern_kernels: bool,
    /// How many of tract's ops Tern's fused ops replaced.
    pub fused_ops: usize,
    /// Load + verify + optimise the bundle, ms.
    pub load_ms: f64,
    /// Load → first result, ms.
    pub cold_start_ms: f64,
    /// Latency of one inference.
    pub latency: LatencyStats,
    /// Inferences per second, one at a time, from the mean latency.
    pub throughput_per_s: f64,
    /// Peak resident memory of the process, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Top-1 label index of the benchmarked input.
    pub top1: usize,
    /// With `--frame`: the cost of preparing a camera frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_640x480: Option<FrameCost>,
    /// With `--profile`: time per node and per operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(n: usize) -> LatencyStats {
        let samples: Vec<Duration> = (1..=n as u64).map(Duration::from_millis).collect();
        LatencyStats::of(&samples).unwrap()
    }

    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(v: &T) -> String {
        let text = serde_json::to_string(v).unwrap();
        assert!(!text.contains('\n'), "one line: {text}");
        assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), v);
        text
    }

    #[test]
    fn latency_percentiles_are_nearest_rank() {
        let s = stats(100);
        assert_eq!((s.n, s.min_ms, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms), (100, 1.0, 50.0, 90.0, 99.0, 100.0));
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(LatencyStats::of(&[]), None);
    }

    #[test]
    fn classify_lines_round_trip_and_omit_absent_logits() {
        let top = vec![Ranked { index: 3, label: "cat".into(), probability: 0.75 }];
        let line = ClassifyLine { image: "a/b.jpg".into(), top, logits: None, latency_ms: 1.5 };
        let text = round_trip(&line);
        assert_eq!(
            text,
            r#"{"image":"a/b.jpg","top":[{"index":3,"label":"cat","probability":0.75}],"latency_ms":1.5}"#
        );
        round_trip(&ClassifyLine { logits: Some(vec![0.5, -2.0]), ..line });
    }

    #[test]
    fn eval_lines_are_told_apart() {
        let p = Prediction { path: "val/cat/1.jpg".into(), label: 0, predicted: 1, probabilities: vec![0.25, 0.75] };
        let summary = EvalSummary { images: 2, correct: 1, accuracy: 0.5, skipped: 0 };
        let image_text = round_trip(&EvalLine::Image(p.clone()));
        assert_eq!(image_text, serde_json::to_string(&p).unwrap());
        let summary_text = round_trip(&EvalLine::Summary { summary: summary.clone() });
        assert_eq!(summary_text, r#"{"summary":{"images":2,"correct":1,"accuracy":0.5,"skipped":0}}"#);
        assert_eq!(serde_json::from_str::<EvalLine>(&image_text).unwrap(), EvalLine::Image(p));
        assert!(serde_json::from_str::<EvalLine>(r#"{"summary":{"images":2}}"#).is_err());
    }

    #[test]
    fn bench_reports_round_trip_with_and_without_the_optional_parts() {
        let mut r = BenchReport {
            bundle: "m.onnx".into(),
            precision: "int8".into(),
            compute: "f32".into(),
            model_bytes: 4_000_000,
            threads: 2,
            depthwise_kernel: None,
            tern_kernels: true,
            fused_ops: 52,
            load_ms: 80.0,
            cold_start_ms: 95.0,
            latency: stats(7),
            throughput_per_s: 250.0,
            peak_rss_bytes: Some(1 << 26),
            top1: 281,
            frame_640x480: None,
            profile: None,
        };
        let text = round_trip(&r);
        assert!(!text.contains("profile") && !text.contains("frame_640x480"), "{text}");
        r.depthwise_kernel = Some("avx2".into());
        r.frame_640x480 = Some(FrameCost { decode: stats(3), resize_normalise: stats(4) });
        let node = NodeTime { name: "conv_0".into(), op: "Conv".into(), mean_ms: 0.5 };
        r.profile = Some(Profile {
            total_ms: 0.5,
            nodes: vec![node],
            by_op: vec![("Conv".into(), 1, 0.5)],
            by_kind: vec![("full conv".into(), 1, 0.5)],
        });
        round_trip(&r);
    }
}
