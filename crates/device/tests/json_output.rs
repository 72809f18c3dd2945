//! The JSON lines of `classify`, `eval` and `bench` read back into the
//! shared `tern_model_format::report` types — the types the host parses
//! them with — and nothing in them left over: each line is exactly what
//! its type writes.

mod common;
mod support;

use std::ffi::OsStr;
use std::path::Path;

use serde::Serialize;
use tern_model_format::report::{BenchReport, ClassifyLine, EvalLine};

/// Parses `line` as `T` and checks that `T` writes the same JSON back: no
/// key the type does not know, none it would add.
fn typed<T: serde::de::DeserializeOwned + Serialize>(line: &str) -> T {
    let v: T = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    let raw: serde_json::Value = serde_json::from_str(line).unwrap();
    let back: serde_json::Value = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(back, raw, "the type does not write the line back");
    v
}

fn stdout_lines(args: &[&OsStr]) -> Vec<String> {
    let out = common::tern_device(args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// Class folders sort as the bundle's outputs (red, green, blue channel).
const CLASSES: [&str; 3] = ["a-red", "b-green", "c-blue"];
const RGB: [[u8; 3]; 3] = [[230, 20, 20], [20, 230, 20], [20, 20, 230]];

fn image_folder(root: &Path) {
    for (class, rgb) in CLASSES.iter().zip(RGB) {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for k in 0..2 {
            support::solid_png(&root.join(class).join(format!("{k}.png")), rgb);
        }
    }
}

#[test]
fn classify_eval_and_bench_lines_read_into_the_shared_types() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("colour.onnx");
    support::color_bundle(&bundle, CLASSES, 10.0);
    let data = dir.path().join("data");
    image_folder(&data);

    let blue = data.join("c-blue/0.png");
    let lines = stdout_lines(&[
        OsStr::new("classify"),
        OsStr::new("--json"),
        OsStr::new("--logits"),
        OsStr::new("--top-k"),
        OsStr::new("2"),
        bundle.as_os_str(),
        blue.as_os_str(),
    ]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let c: ClassifyLine = typed(&lines[0]);
    assert_eq!(c.image, blue);
    assert_eq!((c.top.len(), c.top[0].index, c.top[0].label.as_str()), (2, 2, "c-blue"));
    assert_eq!(c.logits.as_ref().map(Vec::len), Some(3));

    let lines = stdout_lines(&[
        OsStr::new("eval"),
        OsStr::new("--json"),
        OsStr::new("--split"),
        OsStr::new("all"),
        bundle.as_os_str(),
        data.as_os_str(),
    ]);
    let parsed: Vec<EvalLine> = lines.iter().map(|l| typed(l)).collect();
    let (last, images) = parsed.split_last().expect("eval printed nothing");
    let EvalLine::Summary { summary } = last else { panic!("the last eval line is not the summary: {last:?}") };
    assert_eq!((summary.images, summary.correct, summary.skipped), (6, 6, 0));
    assert_eq!(summary.accuracy, 1.0);
    assert_eq!(images.len(), 6);
    for line in images {
        let EvalLine::Image(p) = line else { panic!("a second summary: {line:?}") };
        assert_eq!(p.predicted, p.label, "{p:?}");
        assert_eq!(p.probabilities.len(), 3, "{p:?}");
    }

    let lines = stdout_lines(&[
        OsStr::new("bench"),
        OsStr::new("--json"),
        OsStr::new("--iters"),
        OsStr::new("3"),
        OsStr::new("--warmup"),
        OsStr::new("0"),
        OsStr::new("--profile"),
        OsStr::new("3"),
        OsStr::new("--frame"),
        bundle.as_os_str(),
    ]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let b: BenchReport = typed(&lines[0]);
    assert_eq!((b.bundle.as_path(), b.precision.as_str(), b.compute.as_str()), (bundle.as_path(), "f32", "f32"));
    assert_eq!(b.latency.n, 3);
    assert!(b.latency.min_ms <= b.latency.p50_ms && b.latency.p50_ms <= b.latency.max_ms, "{:?}", b.latency);
    assert!(b.frame_640x480.is_some() && b.profile.as_ref().is_some_and(|p| !p.nodes.is_empty()), "{b:?}");
}
