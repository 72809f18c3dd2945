//! Hostile input against the built `tern-device`: crafted bundles that made
//! tract panic or allocate without bound, images that cost far more than
//! their size, files that are not files. Each must end in a prompt, clear
//! error (or a bounded success), never a panic, an abort or a hang.

mod support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tern_model_format::manifest::ResizeMode;
use tern_model_format::onnx;

/// Runs `tern-device args` under a 2 GiB address-space limit (a run that
/// tries to allocate gigabytes fails instead of swapping), killed after
/// `limit`; returns its output and how long it took.
fn device(args: &[&OsStr], limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tern-device"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tern-device");
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("still running after {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("output");
    (out, t.elapsed())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A clean refusal: exit status 1, no panic, an error saying each of `says`.
fn assert_refused(out: &Output, says: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for s in says {
        assert!(err.contains(s), "does not say {s:?}: {err}");
    }
}

fn png(dir: &Path) -> PathBuf {
    let p = dir.join("red.png");
    solid_png(&p, [220, 20, 20]);
    p
}

/// The GlobalAveragePool the colour head needs after a crafted node that
/// leaves `x`.
fn pool_of(x: &str) -> onnx::NodeProto {
    node("GlobalAveragePool", &[x], "pooled", vec![])
}

fn head_weights() -> onnx::TensorProto {
    tensor("w", &[3, 3], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
}

/// A 1×1 convolution 3 → 3 with `attrs`, leaving `x`.
fn conv_with(attrs: Vec<onnx::AttributeProto>) -> (Vec<onnx::NodeProto>, Vec<onnx::TensorProto>) {
    let k = tensor("k", &[3, 3, 1, 1], &[0.5; 9]);
    (vec![node("Conv", &["input", "k"], "x", attrs), pool_of("x")], vec![k, head_weights()])
}

#[test]
fn crafted_bundles_are_refused_before_tract_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let image = png(dir.path());
    let chain: Vec<onnx::NodeProto> = (0..200_000)
        .map(|i| node("Identity", &[&if i == 0 { "input".to_string() } else { format!("i{}", i - 1) }], &format!("i{i}"), vec![]))
        .collect();
    let mut bomb = chain;
    bomb.push(pool_of("i199999"));
    let mut big_dims = tensor("k", &[3, 3, 1, 1], &[0.5; 9]);
    big_dims.dims = vec![3, 3, 20_000, 20_000];
    let cases: Vec<(&str, Vec<onnx::NodeProto>, Vec<onnx::TensorProto>, &[&str])> = vec![
        {
            let (n, i) = conv_with(vec![attr_ints("strides", &[0, 0])]);
            ("zero-strides", n, i, &["graph node `x` (Conv)", "strides [0, 0]: each must be between 1 and 65536"])
        },
        {
            let (n, i) = conv_with(vec![attr_ints("pads", &[1, 1])]);
            ("pads-length", n, i, &["graph node `x` (Conv)", "pads [1, 1]: 2 values, expected 4"])
        },
        {
            let (n, i) = conv_with(vec![attr_int("group", 2)]);
            ("group", n, i, &["graph node `x` (Conv)", "group 2 does not divide 3 input channels"])
        },
        (
            "constant-of-shape",
            vec![node("ConstantOfShape", &["s"], "x", vec![]), pool_of("x")],
            vec![i64_tensor("s", &[1, 3, 1 << 20, 1 << 20]), head_weights()],
            &["graph node `x` (ConstantOfShape)", "more than the memory budget of 1073741824 bytes"],
        ),
        (
            "reshape",
            vec![node("Reshape", &["input", "s"], "x", vec![]), pool_of("x")],
            vec![i64_tensor("s", &[1, 3, 1 << 30, 1 << 30]), head_weights()],
            &["graph node `x` (Reshape)", "reshapes [1, 3, 16, 16] (768 values)"],
        ),
        (
            "initializer",
            vec![node("Conv", &["input", "k"], "x", vec![]), pool_of("x")],
            vec![big_dims, head_weights()],
            &["initializer `k`", "declare 3600000000 float32 values, but it holds 36 bytes"],
        ),
        ("node-count", bomb, vec![head_weights()], &["graph: 10001 nodes or more, more than the limit of 10000 nodes"]),
    ];
    for (name, nodes, inits, says) in cases {
        let path = dir.path().join(format!("{name}.onnx"));
        graph_bundle(&path, COLORS, ResizeMode::Stretch, nodes, inits).unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        let (out, took) = device(&[OsStr::new("classify"), path.as_os_str(), image.as_os_str()], Duration::from_secs(60));
        let mut says = says.to_vec();
        let shown = path.display().to_string();
        says.push(&shown);
        assert_refused(&out, &says);
        eprintln!("{name}: {size} bytes, refused in {took:?}");
        assert!(took < Duration::from_secs(5), "{name} took {took:?}");
    }
}

#[test]
fn the_budget_flag_lets_a_larger_graph_through() {
    let dir = tempfile::tempdir().unwrap();
    let image = png(dir.path());
    // Tile the input to [1, 3, 4096, 4096] f32 (201 MB), then pool it.
    let path = dir.path().join("tile.onnx");
    let nodes = vec![node("Tile", &["input", "r"], "x", vec![]), pool_of("x")];
    graph_bundle(&path, COLORS, ResizeMode::Stretch, nodes, vec![i64_tensor("r", &[1, 1, 256, 256]), head_weights()])
        .unwrap();
    let small = OsStr::new("--memory-budget-mib=100");
    let (out, _) = device(&[OsStr::new("classify"), small, path.as_os_str(), image.as_os_str()], Duration::from_secs(60));
    assert_refused(&out, &["graph node `x` (Tile)", "memory budget of 104857600 bytes", "--memory-budget-mib"]);
    let (out, _) = device(&[OsStr::new("classify"), path.as_os_str(), image.as_os_str()], Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn an_extreme_aspect_ratio_image_is_bounded_with_a_center_crop_bundle() {
    let dir = tempfile::tempdir().unwrap();
    // One column of 16 384 pixels: a file of a few hundred bytes.
    let tall = dir.path().join("tall.png");
    image::GrayImage::from_pixel(1, 16_384, image::Luma([200])).save(&tall).unwrap();
    let size = std::fs::metadata(&tall).unwrap().len();
    for shorter_side in [256, 4096] {
        let bundle = dir.path().join(format!("crop{shorter_side}.onnx"));
        let pool = node("GlobalAveragePool", &["input"], "pooled", vec![]);
        graph_bundle(&bundle, COLORS, ResizeMode::CenterCrop { shorter_side }, vec![pool], vec![head_weights()]).unwrap();
        let (out, took) = device(&[OsStr::new("classify"), bundle.as_os_str(), tall.as_os_str()], Duration::from_secs(60));
        assert!(out.status.success(), "{size}-byte PNG, shorter side {shorter_side}: {:?} {}", out.status, stderr(&out));
        eprintln!("{size}-byte 1x16384 PNG, center crop to shorter side {shorter_side}: {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}

#[test]
fn devices_and_fifos_are_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, bundle) = color_bundle_in_tempdir();
    let fifo = dir.path().join("fifo.png");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let zero = Path::new("/dev/zero");
    let limit = Duration::from_secs(20);
    for (b, img, says) in [
        (bundle.as_path(), zero, "image /dev/zero: a device, not a regular file"),
        (bundle.as_path(), fifo.as_path(), "fifo.png: a FIFO, not a regular file"),
        (zero, fifo.as_path(), "bundle /dev/zero: a device, not a regular file"),
        (fifo.as_path(), zero, "fifo.png: a FIFO, not a regular file"),
    ] {
        let (out, took) = device(&[OsStr::new("classify"), b.as_os_str(), img.as_os_str()], limit);
        assert_refused(&out, &[says]);
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}

/// A JPEG of a red square, and a copy without its last quarter.
fn jpegs(dir: &Path) -> (PathBuf, PathBuf) {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([200, (x * 3) as u8, (y * 3) as u8]));
    let whole = dir.join("whole.jpg");
    img.save(&whole).unwrap();
    let bytes = std::fs::read(&whole).unwrap();
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).unwrap();
    (whole, cut)
}

#[test]
fn a_truncated_jpeg_is_an_error_in_classify() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, bundle) = color_bundle_in_tempdir();
    let (whole, cut) = jpegs(dir.path());
    let (out, _) = device(&[OsStr::new("classify"), bundle.as_os_str(), whole.as_os_str()], Duration::from_secs(20));
    assert!(out.status.success(), "{}", stderr(&out));
    let (out, _) = device(&[OsStr::new("classify"), bundle.as_os_str(), cut.as_os_str()], Duration::from_secs(20));
    assert_refused(&out, &["cut.jpg", "truncated JPEG"]);
    // A truncated sample PNG too.
    let png = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/samples/camera.png"))
        .expect("data/samples/camera.png: run scripts/setup.sh first");
    let cut_png = dir.path().join("cut.png");
    std::fs::write(&cut_png, &png[..png.len() - 12]).unwrap();
    let (out, _) = device(&[OsStr::new("classify"), bundle.as_os_str(), cut_png.as_os_str()], Duration::from_secs(20));
    assert_refused(&out, &["cut.png", "truncated PNG"]);
}

#[test]
fn a_truncated_jpeg_is_a_counted_skip_in_run() {
    use std::sync::atomic::AtomicBool;
    use tern_device::runloop::{self, LoopOptions};
    use tern_device::source::{FrameSource, ImageFiles};
    let dir = tempfile::tempdir().unwrap();
    let (_d, bundle) = color_bundle_in_tempdir();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let (whole, cut) = jpegs(dir.path());
    std::fs::copy(&whole, frames.join("1.jpg")).unwrap();
    std::fs::copy(&cut, frames.join("2.jpg")).unwrap();
    std::fs::copy(&whole, frames.join("3.jpg")).unwrap();
    let clf = tern_device::Classifier::load(&bundle, &tern_device::LoadOptions::default()).unwrap();
    let src = ImageFiles::folder(&frames).unwrap();
    let mut events = tern_device::events::Collect::default();
    let opts = LoopOptions { newest_only: false, report_every: None, ..LoopOptions::default() };
    let summary = runloop::run(
        move || Ok(Box::new(src) as Box<dyn FrameSource>),
        clf,
        "colour.onnx",
        &opts,
        &mut [&mut events],
        None,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!((summary.frames, summary.bad_frames), (2, 1), "{summary:?}");
    let bad: Vec<String> = events
        .events
        .iter()
        .filter_map(|e| match e {
            tern_device::events::Event::Source { state, detail, .. } if state == "bad-frame" => Some(detail.clone()),
            _ => None,
        })
        .collect();
    assert!(bad.len() == 1 && bad[0].contains("2.jpg") && bad[0].contains("truncated JPEG"), "{bad:?}");
}

#[test]
fn labels_and_file_names_are_escaped_on_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("escape.onnx");
    let pool = node("GlobalAveragePool", &["input"], "pooled", vec![]);
    graph_bundle(&bundle, ["\u{1b}]0;owned\u{7}red", "green", "blue"], ResizeMode::Stretch, vec![pool], vec![head_weights()])
        .unwrap();
    let image = dir.path().join("a\u{1b}[2Jb.png");
    solid_png(&image, [220, 20, 20]);
    let (out, _) = device(&[OsStr::new("classify"), bundle.as_os_str(), image.as_os_str()], Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout.contains('\u{1b}') && !stdout.contains('\u{7}'), "{stdout:?}");
    assert!(stdout.contains("\\u{1b}]0;owned\\u{7}red") && stdout.contains("a\\u{1b}[2Jb.png"), "{stdout}");
    // JSON keeps the text as it is (escaped by JSON itself).
    let (out, _) =
        device(&[OsStr::new("classify"), OsStr::new("--json"), bundle.as_os_str(), image.as_os_str()], Duration::from_secs(20));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["top"][0]["label"], "\u{1b}]0;owned\u{7}red");
}

#[test]
fn an_absurd_sequence_width_is_an_error() {
    let (_d, bundle) = color_bundle_in_tempdir();
    let pattern = OsStr::new("/tmp/f%0999999999999d.png");
    let (out, _) = device(
        &[OsStr::new("run"), bundle.as_os_str(), OsStr::new("--sequence"), pattern, OsStr::new("--no-reload")],
        Duration::from_secs(20),
    );
    assert_refused(&out, &["width"]);
}
