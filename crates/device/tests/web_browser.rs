//! The web view in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver): the page loads, the `<img>`
//! stream shows frames, the label on the page follows the synthetic source
//! from red to green, and a screenshot of the page is a real picture.
//!
//! Without chromium and chromedriver the test says so and passes, unless
//! `CI` is set: in CI a missing browser is a failure.

mod support;
mod web_common;

use ureq2 as ureq;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use support::*;
use web_common::*;

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|n| std::env::split_paths(&path).map(|d| d.join(n)).find(|p| p.is_file()))
}

struct Driver {
    child: Child,
    base: String,
    session: Option<String>,
}

impl Driver {
    fn start(chromedriver: &PathBuf) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let end = Instant::now() + Duration::from_secs(15);
        while ureq::get(&format!("{base}/status")).timeout(Duration::from_secs(1)).call().is_err() {
            assert!(Instant::now() < end, "chromedriver did not answer on {base}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver { child, base, session: None }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = match &self.session {
            Some(s) => format!("{}/session/{s}{path}", self.base),
            None => format!("{}{path}", self.base),
        };
        let req = ureq::request(method, &url).timeout(Duration::from_secs(30));
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(r) => r.into_json::<Value>().expect("WebDriver JSON")["value"].take(),
            Err(ureq::Error::Status(code, r)) => panic!("WebDriver {method} {path}: {code} {}", r.into_string().unwrap_or_default()),
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({ "script": js, "args": [] })))
    }

    fn wait(&self, within: Duration, what: &str, js: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + within;
        loop {
            let v = self.script(js);
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < end, "{what}: not within {within:?}, last {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session.as_deref().unwrap_or("")))
                .timeout(Duration::from_secs(10))
                .call();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_page_shows_the_stream_and_follows_the_label_in_headless_chromium() {
    let (chromium, chromedriver) = (find(&["chromium", "chromium-browser"]), find(&["chromedriver"]));
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!ci, "CI is set but chromium or chromedriver is missing: run scripts/install-test-deps.sh");
        eprintln!("SKIPPED: chromium and chromedriver not found (install: scripts/install-test-deps.sh)");
        return;
    };
    let (_dir, bundle) = color_bundle_in_tempdir();
    // Long runs of each colour, so that the page (polling every 0.3 s) sees
    // both; a snapshot at each change.
    let snaps = tempfile::tempdir().unwrap();
    let snap_dir = snaps.path().to_str().unwrap();
    let d = Device::start(&bundle, &["--synthetic", "red*60,green*60", "--fps", "30", "--loop", "--snapshot-dir", snap_dir], &[]);

    let mut driver = Driver::start(&chromedriver);
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium.to_string_lossy(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,800", "--hide-scrollbars", "--no-first-run"]
        }
    }}});
    let session = driver.call("POST", "/session", Some(caps));
    driver.session = Some(session["sessionId"].as_str().expect("session id").to_owned());
    driver.call("POST", "/url", Some(json!({ "url": d.url("/") })));

    assert_eq!(driver.script("return document.title"), "Tern live view");
    driver.wait(Duration::from_secs(10), "stream frames in the <img>", "return document.getElementById('stream').naturalWidth", |v| {
        v.as_u64().is_some_and(|w| w == 64)
    });
    let label = "return document.getElementById('label').textContent";
    driver.wait(Duration::from_secs(10), "label red on the page", label, |v| v == "red");
    driver.wait(Duration::from_secs(10), "label green on the page", label, |v| v == "green");
    driver.wait(Duration::from_secs(10), "events listed", "return document.querySelectorAll('#events li').length", |v| {
        v.as_u64().is_some_and(|n| n >= 2)
    });
    driver.wait(Duration::from_secs(10), "the latest snapshot shown", "return document.getElementById('snapshot-img').naturalWidth", |v| {
        v.as_u64().is_some_and(|w| w == 64)
    });
    let caption = driver.script("return document.getElementById('snapshot-caption').textContent");
    assert!(caption.as_str().is_some_and(|c| c.contains(snap_dir) && (c.contains("red") || c.contains("green"))), "{caption}");
    let bars = driver.script("return document.querySelectorAll('#bars .row').length");
    assert_eq!(bars, 3, "one bar per label of the colour bundle");

    let size = driver.script("return [window.innerWidth * devicePixelRatio, window.innerHeight * devicePixelRatio]");
    let shot = driver.call("GET", "/screenshot", None);
    let png = base64::engine::general_purpose::STANDARD.decode(shot.as_str().expect("base64 screenshot")).unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).expect("the screenshot is a PNG").to_rgb8();
    assert_eq!(
        (u64::from(img.width()), u64::from(img.height())),
        (size[0].as_f64().unwrap() as u64, size[1].as_f64().unwrap() as u64),
        "screenshot size against the viewport"
    );
    // Not blank: many colours, among them the page's dark background and
    // the stream's red or green.
    let mut colours = std::collections::HashSet::new();
    let (mut red_or_green, mut dark) = (0usize, 0usize);
    for p in img.pixels() {
        colours.insert(p.0);
        let [r, g, b] = p.0.map(i32::from);
        if (r > 150 && g < 80 && b < 80) || (g > 150 && r < 80 && b < 80) {
            red_or_green += 1;
        }
        if r < 40 && g < 40 && b < 40 {
            dark += 1;
        }
    }
    let n = (img.width() * img.height()) as usize;
    assert!(colours.len() > 50, "{} colours: blank?", colours.len());
    assert!(red_or_green > n / 50, "the stream is not on the screenshot ({red_or_green} of {n} pixels red or green)");
    assert!(dark > n / 4, "the page's background is not on the screenshot ({dark} of {n} dark pixels)");
    if let Some(out) = std::env::var_os("TERN_WEB_SCREENSHOT") {
        std::fs::write(&out, &png).unwrap();
    }
}
