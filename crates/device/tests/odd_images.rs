//! Photos in awkward encodings (grayscale, RGBA, 16-bit, CMYK, palette,
//! EXIF-rotated) classify like the plain photo they show.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use common::*;

/// Reads back an `.npy` written by `--dump-input` (header skipped).
fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

#[test]
fn odd_encodings_of_chelsea() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(python())
        .arg(repo().join("tests/python/make_odd_images.py"))
        .arg(sample("chelsea.png"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let names = ["upright.jpg", "rotated-exif.jpg", "gray.png", "rgba.png", "rgb16.png", "cmyk.jpg", "palette.gif"];
    let dump = dir.path().join("inputs");
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("classify"),
        OsStr::new("--json"),
        OsStr::new("--dump-input"),
        dump.as_os_str(),
        imagenet_bundle().as_os_str(),
    ];
    let paths: Vec<_> = names.iter().map(|n| dir.path().join(n)).collect();
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let out = tern_device(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), names.len());
    let upright = read_npy(&dump.join("upright.npy"));
    for (name, line) in names.iter().zip(&lines) {
        let top1 = line["top"][0]["index"].as_u64().unwrap();
        let input = read_npy(&dump.join(Path::new(name).with_extension("npy")));
        let diff = mean_abs_diff(&upright, &input);
        eprintln!("{name}: top-1 {} {}, mean |input - upright| = {diff:.4}", top1, line["top"][0]["label"]);
        assert!((281..=285).contains(&top1), "{name}: top-1 {}", line["top"][0]);
        // Colour encodings keep the scene (JPEG re-encoding and palette
        // quantisation cost a little); grayscale loses the colour.
        let limit = match *name {
            "gray.png" => 0.5,
            "palette.gif" | "cmyk.jpg" => 0.1,
            _ => 0.03,
        };
        assert!(diff < limit, "{name}: input differs from the upright photo by {diff}");
    }
    // Ignoring the EXIF orientation would give a very different input.
    let rotated_raw = Command::new(python())
        .args(["-c", "import sys; from PIL import Image; Image.open(sys.argv[1]).save(sys.argv[2])"])
        .arg(dir.path().join("rotated-exif.jpg"))
        .arg(dir.path().join("raw-rotated.png"))
        .status()
        .unwrap();
    assert!(rotated_raw.success());
    let out = tern_device(&[
        OsStr::new("classify"),
        OsStr::new("--json"),
        OsStr::new("--dump-input"),
        dump.as_os_str(),
        imagenet_bundle().as_os_str(),
        dir.path().join("raw-rotated.png").as_os_str(),
    ]);
    assert!(out.status.success());
    let raw = read_npy(&dump.join("raw-rotated.npy"));
    assert!(mean_abs_diff(&upright, &raw) > 0.2, "the control image should differ");
}
