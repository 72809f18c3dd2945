//! Home Assistant MQTT discovery against a real mosquitto on a loopback
//! port: `tern-device run --ha-discovery` leaves retained config messages
//! (valid JSON, the right state and availability topics, one device) that
//! a subscriber arriving later reads; the state topic then carries the
//! label as the synthetic source changes colour, and the configs'
//! templates, rendered by Jinja2 (the engine Home Assistant uses) on those
//! very state messages, give the label and turn exactly one binary sensor
//! on. With regions, each region has its retained state topic and its own
//! entities; when Home Assistant announces `online` the configs are sent
//! again.
//!
//! Needs the `mosquitto` binary (scripts/install-test-deps.sh; skipped with
//! TERN_SKIP_MQTT=1) and the venv's Jinja2 (scripts/setup-python.sh).

mod common;
mod support;

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use support::*;
use tern_device::events::{now_ms, Event, Sink};
use tern_device::ha::HaDiscovery;
use tern_device::mqtt::{MqttSettings, MqttSink, MqttTarget};

/// Messages received: (topic, payload as JSON or as a string, retain flag).
type Got = Arc<Mutex<Vec<(String, Value, bool)>>>;

/// A subscriber to `filter` (QoS 1, clean session).
struct Subscriber {
    got: Got,
    client: Client,
}

impl Subscriber {
    fn start(port: u16, id: &str, filter: &str) -> Subscriber {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(o, 64);
        let got: Got = Arc::new(Mutex::new(Vec::new()));
        let (g, c, f) = (got.clone(), client.clone(), filter.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || loop {
            match conn.recv() {
                Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => c.subscribe(&f, QoS::AtLeastOnce).unwrap(),
                Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                    let _ = tx.send(());
                }
                Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                    let v = serde_json::from_slice(&p.payload)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&p.payload).into_owned()));
                    g.lock().unwrap().push((p.topic.clone(), v, p.retain));
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => return,
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("subscribed within 10 s");
        Subscriber { got, client }
    }

    fn all(&self) -> Vec<(String, Value, bool)> {
        self.got.lock().unwrap().clone()
    }

    fn on(&self, topic: &str) -> Vec<Value> {
        self.all().into_iter().filter(|(t, _, _)| t == topic).map(|(_, v, _)| v).collect()
    }

    /// The configs received under `prefix`, by topic (the last of each).
    fn configs(&self, prefix: &str) -> Vec<(String, Value, bool)> {
        let mut out: Vec<(String, Value, bool)> = Vec::new();
        for (t, v, r) in self.all().into_iter().filter(|(t, _, _)| t.starts_with(prefix) && t.ends_with("/config")) {
            out.retain(|(o, _, _)| o != &t);
            out.push((t, v, r));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn wait_for<F: Fn(&Subscriber) -> bool>(&self, what: &str, f: F) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; got {:#?}", self.all());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// Renders each Jinja2 template with `value_json` = the given payload,
/// in the venv's Python (Jinja2 is what Home Assistant renders with).
fn render(cases: &[(String, Value)]) -> Vec<String> {
    let script = "import sys, json, jinja2\n\
                  env = jinja2.sandbox.ImmutableSandboxedEnvironment()\n\
                  for t, v in json.load(sys.stdin):\n    \
                      print(json.dumps(env.from_string(t).render(value_json=v)))\n";
    let mut child = Command::new(common::python())
        .args(["-c", &format!("import jinja2.sandbox\n{script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the venv's python");
    let input = serde_json::to_vec(&cases.iter().map(|(t, v)| json!([t, v])).collect::<Vec<_>>()).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jinja2: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str::<String>(l).unwrap()).collect()
}

fn tern_device_run(bundle: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![OsStr::new("run"), bundle.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    all.extend(["--smoothing", "none", "--no-reload"].map(OsStr::new));
    let out = Command::new(env!("CARGO_BIN_EXE_tern-device")).args(&all).output().expect("run tern-device");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn discovery_configs_are_retained_and_the_state_follows_the_label() {
    let Some(bin) = mosquitto() else { return };
    let broker = Broker::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("colour.onnx");
    // Labels that a template must quote with care.
    let labels: Vec<String> = ["red", "Dog \"Rex\" {{ x }}", "blue ünï"].map(String::from).to_vec();
    labelled_bundle(&bundle, &labels, 10.0);
    let live = Subscriber::start(broker.port, "ha-live", "#");
    let url = format!("mqtt://127.0.0.1:{}/tern/porch", broker.port);
    // Paced: the state topic is retained and latest-wins (a state not yet
    // sent is replaced by the next), so each colour lasts 0.8 s for its
    // state to go out; unpaced, the 12 frames can all pass before the
    // connection is up and only the last state is ever published.
    tern_device_run(&bundle, &["--synthetic", "red*4,green*4,blue*4", "--fps", "5", "--mqtt", &url, "--ha-discovery"]);

    // Home Assistant arriving later reads the retained configs.
    let late = Subscriber::start(broker.port, "ha-late", "homeassistant/#");
    late.wait_for("four retained configs", |s| s.configs("homeassistant/").len() == 4);
    let configs = late.configs("homeassistant/");
    let topics: Vec<&str> = configs.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "homeassistant/binary_sensor/tern_porch/blue__n_/config",
            "homeassistant/binary_sensor/tern_porch/dog__rex_____x___/config",
            "homeassistant/binary_sensor/tern_porch/red/config",
            "homeassistant/sensor/tern_porch/label/config",
        ]
    );
    let mut unique_ids = Vec::new();
    for (topic, c, retained) in &configs {
        assert!(retained, "{topic} is not retained");
        assert!(c.is_object(), "{topic}: not a JSON object: {c}");
        assert_eq!(c["state_topic"], "tern/porch/state", "{topic}");
        assert_eq!(c["availability_topic"], "tern/porch/status", "{topic}");
        let availability = (c["payload_available"].as_str(), c["payload_not_available"].as_str());
        assert_eq!(availability, (Some("online"), Some("offline")), "{topic}");
        assert_eq!(c["device"]["identifiers"], json!(["tern_tern_porch"]));
        assert_eq!(c["device"]["name"], "porch");
        assert_eq!(c["device"]["model"], "Tern");
        assert_eq!(c["device"]["sw_version"], env!("CARGO_PKG_VERSION"));
        unique_ids.push(c["unique_id"].as_str().unwrap().to_owned());
    }
    unique_ids.sort();
    unique_ids.dedup();
    assert_eq!(unique_ids.len(), 4);
    let sensor = &configs[3].1;
    assert_eq!(sensor["json_attributes_topic"], "tern/porch/state");
    // After a clean stop the device is offline, retained.
    let late_status = Subscriber::start(broker.port, "ha-status", "tern/porch/status");
    late_status.wait_for("offline", |s| s.on("tern/porch/status") == [Value::from("offline")]);

    // The state topic carried the label as the colour changed.
    live.wait_for("three states", |s| s.on("tern/porch/state").len() >= 3);
    let states = live.on("tern/porch/state");
    let seen: Vec<&str> = states.iter().map(|s| s["label"].as_str().unwrap()).collect();
    assert_eq!(seen, labels.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(states.iter().all(|s| s["confidence"].as_f64().unwrap() > 0.9), "{states:?}");
    // Home Assistant's view of each state: the sensor shows the label, and
    // exactly the binary sensor of that label is on.
    let mut cases = Vec::new();
    for s in &states {
        for (_, c, _) in &configs {
            cases.push((c["value_template"].as_str().unwrap().to_owned(), s.clone()));
        }
    }
    let rendered = render(&cases);
    for (i, s) in states.iter().enumerate() {
        let row = &rendered[i * 4..i * 4 + 4];
        let label = s["label"].as_str().unwrap();
        assert_eq!(row[3], label, "the sensor's state");
        let on: Vec<&str> = configs[..3]
            .iter()
            .zip(row)
            .filter(|(_, r)| r.as_str() == "ON")
            .map(|((_, c, _), _)| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(on, [label], "{row:?}");
        assert!(row[..3].iter().all(|r| r == "ON" || r == "OFF"), "{row:?}");
    }
    let none = render(&[(sensor["value_template"].as_str().unwrap().to_owned(), json!({"label": null}))]);
    assert_eq!(none, ["none"]);
}

#[test]
fn regions_have_their_own_state_topics_and_entities() {
    let Some(bin) = mosquitto() else { return };
    let broker = Broker::start(&bin);
    let (dir, bundle) = color_bundle_in_tempdir();
    // Left half red, right half blue.
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let img = image::RgbImage::from_fn(40, 30, |x, _| image::Rgb(if x < 20 { [220, 20, 20] } else { [10, 20, 230] }));
    for i in 0..3 {
        img.save(frames.join(format!("{i}.png"))).unwrap();
    }
    let url = format!("mqtt://127.0.0.1:{}/tern/lot", broker.port);
    let folder = frames.to_str().unwrap();
    tern_device_run(
        &bundle,
        &[
            "--folder",
            folder,
            "--roi",
            "left=0,0,20,30",
            "--roi",
            "right=20,0,20,30",
            "--mqtt",
            &url,
            "--ha-discovery",
            "--ha-node-id",
            "lot",
            "--ha-prefix",
            "ha",
        ],
    );
    let late = Subscriber::start(broker.port, "ha-late", "#");
    late.wait_for("the retained region states", |s| {
        !s.on("tern/lot/left/state").is_empty() && !s.on("tern/lot/right/state").is_empty()
    });
    assert_eq!(late.on("tern/lot/left/state")[0]["label"], "red");
    assert_eq!(late.on("tern/lot/left/state")[0]["region"], "left");
    assert_eq!(late.on("tern/lot/right/state")[0]["label"], "blue");
    assert!(late.on("tern/lot/state").is_empty(), "no whole-frame state with regions");
    late.wait_for("2 + 2 x 3 configs", |s| s.configs("ha/").len() == 8);
    let configs = late.configs("ha/");
    let by_topic = |t: &str| configs.iter().find(|(x, _, _)| x == t).map(|(_, v, _)| v.clone()).unwrap();
    assert_eq!(by_topic("ha/sensor/lot/left_label/config")["state_topic"], "tern/lot/left/state");
    assert_eq!(by_topic("ha/sensor/lot/right_label/config")["name"], "right label");
    let b = by_topic("ha/binary_sensor/lot/right_blue/config");
    assert_eq!((b["state_topic"].as_str(), b["name"].as_str()), (Some("tern/lot/right/state"), Some("right blue")));
    assert!(configs.iter().all(|(_, c, _)| c["availability_topic"] == "tern/lot/status"));
}

#[test]
fn configs_are_sent_again_when_home_assistant_comes_online() {
    let Some(bin) = mosquitto() else { return };
    let broker = Broker::start(&bin);
    let target = MqttTarget::parse(&format!("mqtt://127.0.0.1:{}/tern/feeder", broker.port)).unwrap();
    let ha = HaDiscovery::new("homeassistant", "feeder", "Feeder", vec![]).unwrap();
    let settings = MqttSettings { ha: Some(ha), ..MqttSettings::default() };
    let sub = Subscriber::start(broker.port, "ha-watch", "homeassistant/#");
    let mut sink = MqttSink::start(target, settings).unwrap();
    let labels: Vec<String> = COLORS.map(String::from).to_vec();
    sink.event(&Event::Started { ts_ms: now_ms(), bundle: "b.onnx".into(), source: "test".into(), labels }).unwrap();
    let count = |s: &Subscriber| s.all().iter().filter(|(t, _, _)| t.ends_with("/config")).count();
    sub.wait_for("the first configs", |s| count(s) == 4);
    // Home Assistant's birth message.
    sub.client.publish("homeassistant/status", QoS::AtLeastOnce, false, "online").unwrap();
    sub.wait_for("the configs again", |s| count(s) == 8);
    // A bundle with fewer labels: the binary sensor of the label gone is
    // removed (an empty retained payload).
    sink.advertise(&["red".into(), "green".into(), "teal".into()]);
    sub.wait_for("blue removed, teal added", |s| {
        s.on("homeassistant/binary_sensor/feeder/blue/config").contains(&Value::String(String::new()))
            && !s.on("homeassistant/binary_sensor/feeder/teal/config").is_empty()
    });
    sink.close();
}

#[test]
fn a_config_over_the_packet_limit_is_left_out_and_counted() {
    // No broker needed: configs are built and sized before any connection.
    let target = MqttTarget::parse("mqtt://127.0.0.1:1/tern/big").unwrap();
    let ha = HaDiscovery::new("homeassistant", "big", "Big", vec![]).unwrap();
    let settings = MqttSettings {
        ha: Some(ha),
        max_packet: 1024,
        flush_timeout: Duration::from_millis(10),
        ..MqttSettings::default()
    };
    let mut sink = MqttSink::start(target, settings).unwrap();
    // The binary sensor of the long label names it twice (name and
    // template): over 1 KiB. The sensor and the short label fit.
    let labels = vec!["red".to_owned(), "g".repeat(600), "blue".to_owned()];
    sink.advertise(&labels);
    assert_eq!(sink.stats().failed, 1);
    sink.close();
}
