//! The live web view of `tern-device run --http`, served by the real binary
//! on 127.0.0.1 with a synthetic source and the tiny colour bundle: status,
//! MJPEG stream, server-sent events, uploads, metrics, the token, the client
//! limit, and bad clients that must never stall the loop.

mod support;
mod web_common;

use ureq2 as ureq;
use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use support::*;
use web_common::*;

/// Red then green, 20 frames each, 50 frames a second, over and over: the
/// active label changes every 0.4 s.
const RED_GREEN: &[&str] = &["--synthetic", "red*20,green*20", "--fps", "50", "--loop", "--report-every", "0.5"];

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(40, 30, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn frames(d: &Device) -> u64 {
    d.status(None)["frames"].as_u64().expect("frames")
}

#[test]
fn status_and_metrics_follow_the_loop() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let d = Device::start(&bundle, RED_GREEN, &[]);
    let red = d.wait_status(Duration::from_secs(10), "label red", |s| s["label"] == "red");
    assert_eq!(red["top"][0]["label"], "red", "{red}");
    assert!(red["top"][0]["probability"].as_f64().unwrap() > 0.5, "{red}");
    assert_eq!((red["width"].as_u64(), red["height"].as_u64()), (Some(64), Some(48)), "{red}");
    assert!(red["bundle"].as_str().unwrap().ends_with(".onnx"), "{red}");
    let green = d.wait_status(Duration::from_secs(10), "label green", |s| s["label"] == "green");
    assert_eq!(green["top"][0]["label"], "green", "{green}");
    assert!(green["frames"].as_u64() > red["frames"].as_u64());
    let s = d.wait_status(Duration::from_secs(10), "fps and captured figures", |s| {
        s["fps"].as_f64().unwrap() > 5.0 && s["captured"].as_u64().unwrap() > 0
    });
    assert!(s["latency_ms"].as_f64().unwrap() > 0.0, "{s}");

    let metrics = ureq::get(&d.url("/metrics")).call().unwrap().into_string().unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(value("tern_frames_total") > 0.0, "{metrics}");
    assert!(value("tern_inference_latency_seconds_count") > 0.0, "{metrics}");
    assert!(value("tern_captured_frames_total") > 0.0, "{metrics}");
    for name in ["tern_dropped_frames_total", "tern_reloads_total", "tern_reloads_refused_total", "tern_slow_frames_total"]
    {
        value(name);
    }
    assert!(value("tern_http_clients") >= 1.0, "this request is a client\n{metrics}");
    assert!(metrics.contains("tern_inference_latency_seconds_bucket{le=\"0.001\"}"), "{metrics}");

    let page = ureq::get(&d.url("/")).call().unwrap();
    assert!(page.content_type().starts_with("text/html"));
    let page = page.into_string().unwrap();
    assert!(page.contains("id=\"stream\"") && page.contains("app.js"), "{page}");
    let js = ureq::get(&d.url("/app.js")).call().unwrap().into_string().unwrap();
    assert!(js.contains("stream.mjpg") && js.contains("api/events"));
    assert_eq!(ureq::get(&d.url("/nothing-here")).call().unwrap_err().into_response().map(|r| r.status()), Some(404));
}

#[test]
fn the_mjpeg_stream_yields_decodable_frames_and_counts_its_viewers() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let d = Device::start(&bundle, RED_GREEN, &[]);
    let (s, head) = d.raw(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code(&head), 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: multipart/x-mixed-replace; boundary=ternframe"), "{head}");
    let mut r = BufReader::new(s);
    let mut colours = Vec::new();
    let started = Instant::now();
    for _ in 0..6 {
        // Chunked transfer: skip chunk-size lines until the boundary.
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "stream ended");
            if line.trim_end() == "--ternframe" {
                break;
            }
        }
        let mut len = None;
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.trim_end().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = Some(v.trim().parse::<usize>().unwrap());
            }
        }
        let mut jpeg = vec![0; len.expect("part without Content-Length")];
        read_chunked(&mut r, &mut jpeg);
        let img = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).expect("a JPEG").to_rgb8();
        assert_eq!(img.dimensions(), (64, 48));
        let p = img.get_pixel(32, 24).0;
        colours.push(if p[0] > p[1] { "red" } else { "green" });
    }
    // 6 frames at the default 10 frames a second: the rate cap holds.
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
    let s = d.status(None);
    assert_eq!(s["viewers"], 1, "{s}");
    assert!(colours.contains(&"red") || colours.contains(&"green"), "{colours:?}");
    drop(r);
    d.wait_status(Duration::from_secs(5), "viewer gone", |s| s["viewers"] == 0);
}

/// Reads `buf.len()` bytes of a chunked body's payload, skipping the chunk
/// framing (each chunk of the stream is one whole part, or a part split by
/// hyper; the framing lines are hex sizes and CRLFs).
fn read_chunked(r: &mut BufReader<std::net::TcpStream>, buf: &mut [u8]) {
    // hyper writes each part as one chunk, so the JPEG lies inside one
    // chunk after its headers: read it directly.
    r.read_exact(buf).unwrap();
}

#[test]
fn server_sent_events_deliver_label_changes() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let d = Device::start(&bundle, RED_GREEN, &[]);
    let (s, head) = d.raw(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code(&head), 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("text/event-stream"), "{head}");
    let mut r = BufReader::new(s);
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut line = String::new();
    while !(seen.contains(&"red".to_owned()) && seen.contains(&"green".to_owned())) {
        assert!(Instant::now() < end, "labels seen: {seen:?}");
        line.clear();
        r.read_line(&mut line).unwrap();
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            let e: serde_json::Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{data}: {e}"));
            if e["event"] == "label" {
                seen.push(e["label"].as_str().unwrap_or("null").to_owned());
            }
            assert_ne!(e["event"], "frame");
        }
    }
}

#[test]
fn an_uploaded_image_is_classified_and_bad_uploads_are_refused() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let d = Device::start(&bundle, &[RED_GREEN, &["--http-max-upload", "1000000"][..]].concat(), &[]);
    let r: serde_json::Value =
        ureq::post(&d.url("/api/classify")).send_bytes(&png([230, 10, 20])).unwrap().into_json().unwrap();
    assert_eq!(r["label"], "red", "{r}");
    assert_eq!(r["top"][0]["label"], "red", "{r}");
    assert_eq!((r["width"].as_u64(), r["height"].as_u64()), (Some(40), Some(30)), "{r}");
    let r: serde_json::Value =
        ureq::post(&d.url("/api/classify")).send_bytes(&png([10, 20, 230])).unwrap().into_json().unwrap();
    assert_eq!(r["label"], "blue", "{r}");

    // Not an image: 400, saying so.
    let e = ureq::post(&d.url("/api/classify")).send_bytes(b"hello, not a picture").unwrap_err();
    let resp = e.into_response().expect("a response");
    assert_eq!(resp.status(), 400);
    let body = resp.into_string().unwrap();
    assert!(body.contains("not a readable image"), "{body}");

    // Too big by its Content-Length: 413 before the body is sent.
    let (_s, head) =
        d.raw(b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\nContent-Type: image/png\r\n\r\n");
    assert_eq!(code(&head), 413, "{head}");
    // Too big, chunked (no length): 413 once the limit is passed.
    let mut s = d.connect();
    s.write_all(b"POST /api/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let chunk = vec![b'x'; 65536];
    let mut sent = 0;
    while sent <= 1_000_000 {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
        sent += chunk.len();
    }
    let head = read_head(&mut s);
    assert_eq!(code(&head), 413, "{head}");
    assert!(frames(&d) > 0);
}

#[test]
fn the_token_is_required_from_header_or_query() {
    let (dir, bundle) = color_bundle_in_tempdir();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let d = Device::start(
        &bundle,
        &[RED_GREEN, &["--http-token-file", token_file.to_str().unwrap()][..]].concat(),
        &[("TERN_HTTP_TOKEN", "the-file-wins")],
    );
    for path in ["/", "/api/status", "/stream.mjpg", "/api/events", "/metrics", "/api/status?token=wrong"] {
        let e = ureq::get(&d.url(path)).call().unwrap_err();
        assert_eq!(e.into_response().map(|r| r.status()), Some(401), "{path}");
    }
    let e = ureq::get(&d.url("/api/status")).set("Authorization", "Bearer the-file-wins").call().unwrap_err();
    assert_eq!(e.into_response().map(|r| r.status()), Some(401));
    assert!(d.status(Some("s3cret-token"))["frames"].is_u64());
    let r = ureq::get(&d.url("/api/status?token=s3cret-token")).call().unwrap();
    assert_eq!(r.status(), 200);
    let (_s, head) = d.raw(b"GET /stream.mjpg?token=s3cret-token HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code(&head), 200, "{head}");

    // From the environment when there is no file.
    drop(d);
    let d = Device::start(&bundle, RED_GREEN, &[("TERN_HTTP_TOKEN", "from-env")]);
    assert_eq!(ureq::get(&d.url("/metrics")).call().unwrap_err().into_response().map(|r| r.status()), Some(401));
    assert!(d.status(Some("from-env"))["frames"].is_u64());
}

#[test]
fn clients_beyond_the_limit_get_503() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let d = Device::start(&bundle, &[RED_GREEN, &["--http-max-clients", "2"][..]].concat(), &[]);
    let (a, head) = d.raw(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code(&head), 200);
    let (_b, head) = d.raw(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code(&head), 200);
    let (_c, head) = d.raw(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code(&head), 503, "{head}");
    drop(a);
    // The stream's slot comes back once its connection is gone.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let (_c, head) = d.raw(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n");
        if code(&head) == 200 {
            break;
        }
        assert!(Instant::now() < end, "the slot was not given back: {head}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_and_slow_clients_never_stall_the_loop() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let d = Device::start(&bundle, RED_GREEN, &[]);
    d.wait_status(Duration::from_secs(10), "first frames", |s| s["frames"].as_u64().unwrap() > 0);

    // Not HTTP: 400.
    let (_s, head) = d.raw(b"\x16\x03\x01 this is no request at all\r\n\r\n");
    assert_eq!(code(&head), 400, "{head}");
    // Headers over the limit: refused (431), not read into memory.
    let big = format!("GET /api/status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 << 10));
    let mut s = d.connect();
    let _ = s.write_all(big.as_bytes());
    let head = read_head(&mut s);
    assert!(head.is_empty() || code(&head) == 431 || code(&head) == 400, "{head}");
    // A head that never ends, and viewers that never read, many of them.
    let mut stuck = Vec::new();
    let mut half = d.connect();
    half.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n").unwrap();
    stuck.push(half);
    for _ in 0..3 {
        let mut s = d.connect();
        s.write_all(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // Keep the socket's receive buffer small, and never read it.
        stuck.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = frames(&d);
    std::thread::sleep(Duration::from_secs(1));
    let after = frames(&d);
    assert!(after >= before + 20, "the loop stalled: {before} then {after} frames in 1 s");
    // A client that said it would send a body and never does gets an
    // error or is dropped, and costs no more than its own slot.
    let (mut s, _) = (d.connect(), ());
    s.write_all(b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").unwrap();
    let before = frames(&d);
    std::thread::sleep(Duration::from_millis(500));
    assert!(frames(&d) > before);
    drop(stuck);
}

/// The review of captured frames over HTTP (`--capture DIR` with `--http`):
/// listed, their JPEG served, one moved to a new label, one confirmed, one
/// deleted — and the folder on disk says the same; bad ids are refused.
#[test]
fn captured_frames_are_reviewed_over_http() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let captures = tempfile::tempdir().unwrap();
    let dir = captures.path().to_str().unwrap().to_owned();
    let args = ["--synthetic", "red*20,green*20", "--fps", "50", "--loop", "--capture", &dir, "--capture-below", "1.01"];
    let d = Device::start(&bundle, &args, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let list = loop {
        let l: serde_json::Value =
            ureq::get(&d.url("/api/captures?per_page=10")).call().unwrap().into_json().unwrap();
        if l["total"].as_u64().unwrap_or(0) >= 3 {
            break l;
        }
        assert!(Instant::now() < deadline, "fewer than 3 captures in 20 s: {l}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let ids: Vec<String> = list["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect();
    let jpeg = ureq::get(&d.url(&format!("/api/captures/image?id={}", ids[0]))).call().unwrap();
    assert_eq!(jpeg.content_type(), "image/jpeg");
    let mut bytes = Vec::new();
    jpeg.into_reader().read_to_end(&mut bytes).unwrap();
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 64);

    let post = |path: &str, body: serde_json::Value| ureq::post(&d.url(path)).send_json(body);
    let moved: serde_json::Value =
        post("/api/captures/move", serde_json::json!({"id": ids[0], "label": "yellow"})).unwrap().into_json().unwrap();
    assert_eq!(moved["label"], "yellow", "{moved}");
    let new_id = moved["id"].as_str().unwrap();
    assert!(new_id.starts_with("yellow/"), "{moved}");
    assert!(captures.path().join(new_id).is_file());
    assert!(!captures.path().join(&ids[0]).exists());
    let confirmed: serde_json::Value =
        post("/api/captures/confirm", serde_json::json!({"id": ids[1]})).unwrap().into_json().unwrap();
    assert_eq!(confirmed["sidecar"]["reviewed"], true, "{confirmed}");
    post("/api/captures/delete", serde_json::json!({"id": ids[2]})).unwrap();
    assert!(!captures.path().join(&ids[2]).exists());

    let status = |r: Result<ureq::Response, ureq::Error>| match r {
        Ok(r) => r.status(),
        Err(e) => e.into_response().map_or(0, |r| r.status()),
    };
    assert_eq!(status(post("/api/captures/delete", serde_json::json!({"id": "../../etc/passwd"}))), 400);
    assert_eq!(status(post("/api/captures/delete", serde_json::json!({"id": ids[2]}))), 404);
    assert_eq!(status(ureq::get(&d.url("/api/captures/image?id=red/..%2F..%2Fx.jpg")).call()), 400);
    assert!(frames(&d) > 0);
}

/// The mean colour of a JPEG's pixels.
fn mean_rgb(jpeg: &[u8]) -> [f64; 3] {
    let img = image::load_from_memory(jpeg).expect("a JPEG").to_rgb8();
    let mut sum = [0f64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            sum[c] += f64::from(p[c]);
        }
    }
    sum.map(|s| s / f64::from(img.width() * img.height()))
}

fn get_bytes(url: &str) -> Result<Vec<u8>, u16> {
    match ureq::get(url).call() {
        Ok(r) => {
            assert_eq!(r.content_type(), "image/jpeg");
            let mut b = Vec::new();
            r.into_reader().read_to_end(&mut b).unwrap();
            Ok(b)
        }
        Err(e) => Err(e.into_response().map_or(0, |r| r.status())),
    }
}

#[test]
fn the_page_shows_the_latest_snapshot() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let snaps = tempfile::tempdir().unwrap();
    let mut args = RED_GREEN.to_vec();
    args.extend(["--snapshot-dir", snaps.path().to_str().unwrap()]);
    let d = Device::start(&bundle, &args, &[]);
    // Each change of label names a snapshot; /snapshot.jpg is its frame.
    for (label, rgb) in [("green", 1), ("red", 0), ("green", 1)] {
        let s = d.wait_status(Duration::from_secs(20), &format!("a {label} snapshot"), |s| s["snapshot"]["label"] == label);
        let name = s["snapshot"]["name"].as_str().unwrap().to_owned();
        assert!(name.starts_with(snaps.path().to_str().unwrap()) && name.ends_with(".jpg"), "{s}");
        let jpeg = get_bytes(&d.url("/snapshot.jpg")).expect("GET /snapshot.jpg");
        let m = mean_rgb(&jpeg);
        // The served frame is the one of the newest snapshot: if a newer
        // one came meanwhile, it is of the other colour and named anew.
        let now = d.status(None);
        if now["snapshot"]["name"] == name.as_str() {
            assert!(m[rgb] > 150.0 && m[1 - rgb] < 100.0, "{label} snapshot, mean colour {m:?}");
            // Encoded once, then served as is.
            let again = get_bytes(&d.url("/snapshot.jpg")).expect("GET /snapshot.jpg again");
            assert!(again == jpeg || d.status(None)["snapshot"]["name"] != name.as_str(), "the same snapshot re-encoded differently");
        }
        let end = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(&name).is_file() {
            assert!(Instant::now() < end, "{name} never written");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let page = ureq::get(&d.url("/")).call().unwrap().into_string().unwrap();
    assert!(page.contains("id=\"snapshot-img\""), "{page}");
}

#[test]
fn without_snapshots_or_mqtt_the_status_says_so() {
    let (_dir, bundle) = color_bundle_in_tempdir();
    let d = Device::start(&bundle, RED_GREEN, &[]);
    let s = d.wait_status(Duration::from_secs(10), "a label", |s| !s["label"].is_null());
    assert!(s["snapshot"].is_null() && s["mqtt"].is_null(), "{s}");
    assert_eq!(get_bytes(&d.url("/snapshot.jpg")), Err(404));
    let metrics = ureq::get(&d.url("/metrics")).call().unwrap().into_string().unwrap();
    assert!(!metrics.contains("tern_mqtt"), "{metrics}");
}

#[test]
fn metrics_and_status_show_the_mqtt_queue() {
    let Some(bin) = mosquitto() else { return };
    let mut broker = Broker::start(&bin);
    let (_dir, bundle) = color_bundle_in_tempdir();
    let url = format!("mqtt://127.0.0.1:{}/tern/web-test", broker.port);
    let mut args = RED_GREEN.to_vec();
    args.extend(["--mqtt", &url]);
    let d = Device::start(&bundle, &args, &[]);
    let s = d.wait_status(Duration::from_secs(20), "MQTT connected, events delivered", |s| {
        s["mqtt"]["connected"] == true && s["mqtt"]["delivered"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(s["mqtt"]["dropped"], 0, "{s}");
    let metric = |name: &str| -> f64 {
        let text = ureq::get(&d.url("/metrics")).call().unwrap().into_string().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(metric("tern_mqtt_connected"), 1.0);
    assert!(metric("tern_mqtt_delivered_events_total") >= 2.0);
    // The broker goes: label events (every 0.4 s) wait in the queue.
    broker.stop();
    let s = d.wait_status(Duration::from_secs(20), "events queued while the broker is away", |s| {
        s["mqtt"]["connected"] == false && s["mqtt"]["queued"].as_u64().unwrap_or(0) >= 3
    });
    assert!(metric("tern_mqtt_queued_events") >= 3.0, "{s}");
    assert_eq!(metric("tern_mqtt_connected"), 0.0);
    let before = s["mqtt"]["delivered"].as_u64().unwrap();
    // Back: the queue drains (what waited is delivered).
    broker.restart(&bin);
    let s = d.wait_status(Duration::from_secs(30), "the queue drained", |s| {
        s["mqtt"]["connected"] == true && s["mqtt"]["delivered"].as_u64().unwrap_or(0) >= before + 3
    });
    assert!(metric("tern_mqtt_delivered_events_total") >= (before + 3) as f64, "{s}");
}
