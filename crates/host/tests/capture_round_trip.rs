//! The round trip of issue 16 ("capture for retraining"): a running
//! device captures frames (`tern-device run --folder … --capture DIR
//! --capture-below 1.01`), a person reviews them (frames of a colour the
//! model does not know are moved to a new label, some others confirmed),
//! `tern-host train --extra DIR` trains a new bundle with that label, and a
//! running `tern-device run` reloads it and reports the new label.
//!
//! The review goes through [`Reviewer`]; [`CliReviewer`] drives
//! `tern-device review`, and an HTTP reviewer for the web view's API can
//! take its place. The training set is made here: solid colours with
//! noise, 6 images per class, 48×48, a few epochs; both trainings take
//! seconds on two cores (the second reads the first's features from the
//! cache).

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::{device_bin, fixture};
use serde_json::Value;

/// The review API as the round trip uses it.
trait Reviewer {
    /// Every capture (newest first), as the API's `ListResponse` JSON.
    fn list(&self) -> Value;
    /// Files capture `id` under `label`; the moved item.
    fn relabel(&self, id: &str, label: &str) -> Value;
    /// Confirms capture `id`; the item.
    fn confirm(&self, id: &str) -> Value;
}

/// `tern-device review DIR …`.
struct CliReviewer {
    dir: PathBuf,
}

impl CliReviewer {
    fn call(&self, args: &[&str]) -> Value {
        let out = Command::new(device_bin()).arg("review").arg(&self.dir).args(args).output().unwrap();
        assert!(out.status.success(), "review {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Reviewer for CliReviewer {
    fn list(&self) -> Value {
        self.call(&["list", "--per-page", "500"])
    }
    fn relabel(&self, id: &str, label: &str) -> Value {
        self.call(&["move", id, label])
    }
    fn confirm(&self, id: &str) -> Value {
        self.call(&["confirm", id])
    }
}

const RED: [u8; 3] = [220, 30, 30];
const GREEN: [u8; 3] = [30, 200, 40];
/// `tern-device`'s synthetic `blue`.
const BLUE: [u8; 3] = [30, 40, 220];

/// A 48×48 image of `rgb` with ±20 of seeded noise per channel.
fn noisy(path: &Path, rgb: [u8; 3], seed: u64) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let img = image::RgbImage::from_fn(48, 48, |_, _| {
        image::Rgb(rgb.map(|c| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (c as i32 + (s % 41) as i32 - 20).clamp(0, 255) as u8
        }))
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

fn host(args: &[&OsStr]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-host")).args(args).output().expect("run tern-host");
    assert!(out.status.success(), "tern-host {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn train(data: &Path, extra: Option<&Path>, out: &Path, cache: &Path) -> String {
    let weights = fixture("models/efficientnet-lite0.safetensors");
    let mut args: Vec<&OsStr> = vec![
        "train".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--epochs".as_ref(),
        "20".as_ref(),
        "--lr".as_ref(),
        "0.01".as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ];
    if let Some(e) = extra {
        args.extend(["--extra".as_ref(), e.as_os_str()]);
    }
    String::from_utf8_lossy(&host(&args).stdout).into_owned()
}

/// A running `tern-device run` and its events, line by line.
struct Device {
    child: Child,
    events: Receiver<Value>,
}

impl Device {
    fn start(bundle: &Path, script: &str) -> Device {
        let mut child = Command::new(device_bin())
            .arg("run")
            .arg(bundle)
            .args(["--synthetic", script, "--loop", "--fps", "20", "--every-frame", "--quiet"])
            .args(["--reload-interval", "0.2", "--report-every", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Device { child, events }
    }

    /// Waits (at most `limit`) for an event `want` accepts; the events seen.
    fn until(&self, limit: Duration, want: impl Fn(&Value) -> bool) -> Vec<Value> {
        let end = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    let done = want(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("not seen within {limit:?}; events: {seen:?}");
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn captured_frames_relabelled_teach_a_running_device_a_new_label() {
    let d = tempfile::tempdir().unwrap();
    let (data, frames, cap, cache) =
        (d.path().join("data"), d.path().join("frames"), d.path().join("captures"), d.path().join("cache"));
    for i in 0..6 {
        noisy(&data.join(format!("red/{i}.png")), RED, i);
        noisy(&data.join(format!("green/{i}.png")), GREEN, 100 + i);
    }
    let v1 = d.path().join("v1.onnx");
    train(&data, None, &v1, &cache);

    // What the device sees: red, green, and a colour it has no label for.
    for i in 0..3 {
        noisy(&frames.join(format!("a-red-{i}.png")), RED, 200 + i);
        noisy(&frames.join(format!("b-green-{i}.png")), GREEN, 300 + i);
    }
    for i in 0..6 {
        noisy(&frames.join(format!("c-blue-{i}.png")), BLUE, 400 + i);
    }
    let out = Command::new(device_bin())
        .arg("run")
        .arg(&v1)
        .arg("--folder")
        .arg(&frames)
        .arg("--capture")
        .arg(&cap)
        .args(["--capture-below", "1.01", "--quiet", "--no-reload", "--report-every", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Review: the blue frames (known by their source file's name) go to a
    // new label; two of the others are confirmed, the rest left unreviewed.
    let review = CliReviewer { dir: cap.clone() };
    let list = review.list();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 12, "every frame captured: {list}");
    let mut confirmed = 0;
    for item in items {
        let id = item["id"].as_str().unwrap();
        let name = item["sidecar"]["name"].as_str().unwrap();
        assert_eq!(item["sidecar"]["reviewed"], false);
        if name.contains("-blue-") {
            let moved = review.relabel(id, "blue");
            assert!(moved["id"].as_str().unwrap().starts_with("blue/"), "{moved}");
            assert_eq!(moved["sidecar"]["predicted"], item["sidecar"]["predicted"]);
        } else if confirmed < 2 {
            assert_eq!(review.confirm(id)["sidecar"]["reviewed"], true);
            confirmed += 1;
        }
    }

    let v2 = d.path().join("v2.onnx");
    let report = train(&data, Some(&cap), &v2, &cache);
    assert!(report.contains("new classes: [blue]"), "{report}");
    assert!(report.contains("8 image(s) added") && report.contains("4 unreviewed skipped"), "{report}");

    // The running device: blue frames, which v1 calls red or green.
    let live = d.path().join("live.onnx");
    std::fs::copy(&v1, &live).unwrap();
    let dev = Device::start(&live, "blue");
    let seen = dev.until(Duration::from_secs(30), |v| v["event"] == "frame");
    assert!(seen[0]["event"] == "started" && seen[0]["labels"] == serde_json::json!(["green", "red"]), "{seen:?}");
    let tmp = d.path().join("incoming.onnx");
    std::fs::copy(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &live).unwrap();
    let seen = dev.until(Duration::from_secs(30), |v| v["event"] == "reload");
    let reload = seen.last().unwrap();
    assert_eq!(reload["ok"], true, "{reload}");
    dev.until(Duration::from_secs(30), |v| v["event"] == "label" && v["label"] == "blue");
    let after = dev.until(Duration::from_secs(10), |v| v["event"] == "frame");
    let frame = after.last().unwrap();
    assert_eq!(frame["top"], "blue", "{frame}");
}
