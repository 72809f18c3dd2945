//! The round trip of issue 16 ("capture for retraining"): a device
//! captures frames (`tern-device run --folder … --capture DIR
//! --capture-below 1.01`); a person reviews them through the web view's API
//! of a running device (`tern-device run --capture DIR --http …`: frames of
//! a colour the model does not know are moved to a new label, some others
//! confirmed); `tern-host train --extra DIR` trains a new bundle with that
//! label; and that running device reloads it and reports the new label.
//!
//! The training set is made here: solid colours with noise, 6 images per
//! class, 48×48, a few epochs; both trainings take seconds on two cores
//! (the second reads the first's features from the cache).

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::{device_bin, fixture};
use serde_json::Value;

/// The web view's review API (`/api/captures…`) of a running device.
struct HttpReviewer {
    /// `http://ADDR`.
    base: String,
}

impl HttpReviewer {
    /// Every capture (newest first), as the API's `ListResponse` JSON.
    fn list(&self) -> Value {
        ureq::get(&format!("{}/api/captures?per_page=500", self.base)).call().unwrap().into_json().unwrap()
    }
    fn post(&self, path: &str, body: Value) -> Value {
        match ureq::post(&format!("{}{path}", self.base)).send_json(body.clone()) {
            Ok(r) => r.into_json().unwrap(),
            Err(e) => panic!("POST {path} {body}: {e}"),
        }
    }
    /// Files capture `id` under `label`; the moved item.
    fn relabel(&self, id: &str, label: &str) -> Value {
        self.post("/api/captures/move", serde_json::json!({ "id": id, "label": label }))
    }
    /// Confirms capture `id`; the item.
    fn confirm(&self, id: &str) -> Value {
        self.post("/api/captures/confirm", serde_json::json!({ "id": id }))
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
    /// The web view's `http://ADDR`, when started with `--http`.
    web: Option<String>,
}

impl Device {
    /// `tern-device run BUNDLE --synthetic SCRIPT --loop … ARGS`; with
    /// `--http 127.0.0.1:0` among `args`, waits for the web view's address.
    fn start(bundle: &Path, script: &str, args: &[&OsStr]) -> Device {
        let mut child = Command::new(device_bin())
            .arg("run")
            .arg(bundle)
            .args(["--synthetic", script, "--loop", "--fps", "20", "--every-frame", "--quiet"])
            .args(["--reload-interval", "0.2", "--report-every", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
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
        // stderr passed on; the web view's address taken from it.
        let stderr = child.stderr.take().unwrap();
        let (addr_tx, addr) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                if let Some(rest) = line.strip_prefix("tern-device: web view on http://") {
                    let _ = addr_tx.send(rest.split(['/', ' ']).next().unwrap_or_default().to_owned());
                }
            }
        });
        let web = args.iter().any(|a| *a == "--http").then(|| {
            let a = addr.recv_timeout(Duration::from_secs(60)).expect("the web view's address on stderr");
            format!("http://{a}")
        });
        Device { child, events, web }
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

    // The device that will take the new bundle runs on the old one, shows
    // blue frames (which v1 calls red or green) and serves the review API
    // over the captures (its own policy captures nothing: two classes, so
    // the top probability is never below 0.01).
    let live = d.path().join("live.onnx");
    std::fs::copy(&v1, &live).unwrap();
    let args: [&OsStr; 6] =
        ["--http".as_ref(), "127.0.0.1:0".as_ref(), "--capture".as_ref(), cap.as_os_str(), "--capture-below".as_ref(), "0.01".as_ref()];
    let dev = Device::start(&live, "blue", &args);
    let seen = dev.until(Duration::from_secs(30), |v| v["event"] == "frame");
    assert!(seen[0]["event"] == "started" && seen[0]["labels"] == serde_json::json!(["green", "red"]), "{seen:?}");

    // Review over HTTP: the blue frames (known by their source file's name)
    // go to a new label; two of the others are confirmed, the rest left
    // unreviewed.
    let review = HttpReviewer { base: dev.web.clone().unwrap() };
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
    assert_eq!(review.list()["items"].as_array().unwrap().len(), 12, "the running device captured more");

    let v2 = d.path().join("v2.onnx");
    let report = train(&data, Some(&cap), &v2, &cache);
    assert!(report.contains("new classes: [blue]"), "{report}");
    assert!(report.contains("8 image(s) added") && report.contains("4 unreviewed skipped"), "{report}");

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
