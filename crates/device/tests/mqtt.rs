//! MQTT against a real mosquitto broker on a loopback port: events arrive
//! with the right payload, the current label is retained, and stopping and
//! restarting the broker loses no event within the queue bound (beyond it,
//! the oldest are dropped and counted). Over TLS (a CA and certificates
//! made at test time) with a user name and password: a bundle with 1000
//! long labels, whose `started` event exceeds the packet limit, delivers
//! every event across a broker restart; a client certificate is presented
//! when the broker asks for one; a wrong password is reported and retried
//! with back-off; two devices whose topics end alike keep both connected.
//!
//! Needs the `mosquitto` binary (scripts/install-test-deps.sh); without it
//! the test fails, unless TERN_SKIP_MQTT=1.

mod support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::Value;
use support::*;
use tern_device::events::{now_ms, Event, Sink};
use tern_device::mqtt::{Credentials, MqttSettings, MqttSink, MqttTarget, Password, TlsFiles};

/// A subscriber with a persistent session (clean session off, QoS 1), so
/// that the broker keeps its messages across its own restart.
struct Subscriber {
    got: Arc<Mutex<Vec<(String, Value, bool)>>>,
    client: Client,
}

impl Subscriber {
    fn start(port: u16, id: &str, filter: &str, clean: bool) -> Subscriber {
        Subscriber::start_as(port, id, filter, clean, None)
    }

    /// Subscribes, logging in as `login` (user, password) if given. Takes
    /// packets up to 1 MiB (rumqttc's default is 10 KiB).
    fn start_as(port: u16, id: &str, filter: &str, clean: bool, login: Option<(&str, &str)>) -> Subscriber {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        let (client, mut conn) = Client::new(o, 16);
        let got = Arc::new(Mutex::new(Vec::new()));
        let (g, c, f) = (got.clone(), client.clone(), filter.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut subscribed = false;
            loop {
                match conn.recv() {
                    Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) if !subscribed => {
                        c.subscribe(&f, QoS::AtLeastOnce).unwrap();
                    }
                    Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                        subscribed = true;
                        let _ = tx.send(());
                    }
                    Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                        let v: Value = serde_json::from_slice(&p.payload)
                            .unwrap_or(Value::String(String::from_utf8_lossy(&p.payload).into_owned()));
                        g.lock().unwrap().push((p.topic.clone(), v, p.retain));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => std::thread::sleep(Duration::from_millis(50)),
                    Err(_) => return,
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("subscribed within 10 s");
        Subscriber { got, client }
    }

    /// Label `seq`s received on the events topic, with their payloads.
    fn labels(&self, topic: &str) -> BTreeMap<u64, Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, v, _)| t == topic && v["event"] == "label")
            .map(|(_, v, _)| (v["seq"].as_u64().unwrap(), v.clone()))
            .collect()
    }

    /// Payloads received on `topic`.
    fn on(&self, topic: &str) -> Vec<Value> {
        self.got.lock().unwrap().iter().filter(|(t, _, _)| t == topic).map(|(_, v, _)| v.clone()).collect()
    }

    fn wait_for<F: Fn(&Subscriber) -> bool>(&self, what: &str, f: F) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; got {:?}", self.got.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

fn label_event(seq: u64) -> Event {
    let label = COLORS[(seq % 3) as usize];
    Event::Label {
        ts_ms: now_ms(),
        seq,
        frame: seq * 10,
        region: None,
        label: Some(label.into()),
        confidence: 0.9,
        previous: Some(COLORS[((seq + 2) % 3) as usize].into()),
        snapshot: None,
    }
}

#[test]
fn events_survive_a_broker_restart_within_the_queue_bound() {
    let Some(bin) = mosquitto() else { return };
    let mut broker = Broker::start(&bin);
    let target = MqttTarget::parse(&format!("mqtt://127.0.0.1:{}/tern/test-device", broker.port)).unwrap();
    let events_topic = target.events_topic();
    let sub = Subscriber::start(broker.port, "tern-test-sub", "tern/test-device/#", false);
    let settings = MqttSettings {
        queue: 40,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        ..MqttSettings::default()
    };
    let mut sink = MqttSink::start(target.clone(), settings).unwrap();

    // 1. Connected: events 1..=10 arrive with their payload.
    for seq in 1..=10 {
        sink.event(&label_event(seq)).unwrap();
    }
    sub.wait_for("events 1..=10", |s| s.labels(&events_topic).len() >= 10);
    let got = sub.labels(&events_topic);
    assert_eq!(got[&4]["label"], "green");
    assert_eq!(got[&4]["previous"], "red");
    assert_eq!(got[&4]["frame"], 40);
    assert!((got[&4]["confidence"].as_f64().unwrap() - 0.9).abs() < 1e-6);

    // 2. The broker goes away; 30 events (fewer than the 40 the queue
    //    holds) happen meanwhile; the broker comes back: all arrive.
    broker.stop();
    for seq in 11..=40 {
        sink.event(&label_event(seq)).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!sink.stats().connected, "the sink noticed the broker is gone: {:?}", sink.stats());
    broker.restart(&bin);
    sub.wait_for("events 11..=40 after the restart", |s| (1..=40).all(|q| s.labels(&events_topic).contains_key(&q)));
    assert_eq!(sink.stats().dropped, 0);
    assert!(sink.stats().connects >= 2, "{:?}", sink.stats());

    // 3. The current label is retained: a newcomer learns it at once.
    sink.flush(Duration::from_secs(10));
    let newcomer = Subscriber::start(broker.port, "tern-test-newcomer", &target.state_topic(), true);
    newcomer.wait_for("the retained state", |s| !s.got.lock().unwrap().is_empty());
    let (topic, state, retained) = newcomer.got.lock().unwrap()[0].clone();
    assert_eq!(topic, target.state_topic());
    assert!(retained);
    assert_eq!(state["label"], COLORS[40 % 3]);
    assert_eq!(state["seq"], 40);
    drop(newcomer);

    // 4. Beyond the bound: 60 events while the broker is away, the queue
    //    keeps the newest 40 and counts 20 dropped.
    broker.stop();
    std::thread::sleep(Duration::from_millis(200));
    for seq in 41..=100 {
        sink.event(&label_event(seq)).unwrap();
    }
    assert_eq!(sink.stats().dropped, 20, "{:?}", sink.stats());
    broker.restart(&bin);
    sub.wait_for("the newest 40 events", |s| (61..=100).all(|q| s.labels(&events_topic).contains_key(&q)));
    let got = sub.labels(&events_topic);
    assert!((41..=60).all(|q| !got.contains_key(&q)), "dropped events arrived?");
    assert_eq!(got[&100]["label"], COLORS[100 % 3]);
    let stats = sink.close();
    assert_eq!(stats.queued, 0, "{stats:?}");
}

#[test]
fn run_publishes_events_and_the_retained_state() {
    let Some(bin) = mosquitto() else { return };
    let broker = Broker::start(&bin);
    let (_dir, bundle) = color_bundle_in_tempdir();
    let url = format!("mqtt://127.0.0.1:{}/tern/cli-device", broker.port);
    let sub = Subscriber::start(broker.port, "tern-cli-sub", "tern/cli-device/#", true);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern-device"))
        .args([
            OsStr::new("run"),
            bundle.as_os_str(),
            OsStr::new("--synthetic"),
            OsStr::new("red*5,blue*5"),
            OsStr::new("--smoothing"),
            OsStr::new("none"),
            OsStr::new("--no-reload"),
            OsStr::new("--mqtt"),
            OsStr::new(&url),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sub.wait_for("started, two labels, stopped", |s| {
        s.got.lock().unwrap().iter().any(|(_, v, _)| v["event"] == "stopped")
    });
    let got = sub.got.lock().unwrap().clone();
    let events: Vec<&Value> = got.iter().filter(|(t, _, _)| t == "tern/cli-device/events").map(|(_, v, _)| v).collect();
    let kinds: Vec<&str> = events.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"started"));
    let labels: Vec<&str> =
        events.iter().filter(|v| v["event"] == "label").map(|v| v["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["red", "blue"]);
    let states: Vec<&Value> = got.iter().filter(|(t, _, _)| t == "tern/cli-device/state").map(|(_, v, _)| v).collect();
    assert_eq!(states.last().map(|s| &s["label"]), Some(&Value::from("blue")));
    // The status topic says online, then offline at the end.
    let status: Vec<String> = got
        .iter()
        .filter(|(t, _, _)| t == "tern/cli-device/status")
        .map(|(_, v, _)| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
        .collect();
    assert_eq!(status.first().map(String::as_str), Some("online"), "{status:?}");
    // The same lines went to stdout.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.contains("\"event\":\"label\"")).count(), 2);
}

/// The JSON lines of a run's stdout.
fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Waits for a child process, killing it after `limit`.
fn wait_child(mut child: std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().expect("wait for tern-device");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 1000 labels of 90-odd characters: the `started` event is ~95 KB, over
/// the 64 KiB packet limit.
fn long_labels() -> Vec<String> {
    let pad = "x".repeat(70);
    let mut labels: Vec<String> = COLORS.iter().map(|c| format!("{c} {pad}")).collect();
    labels.extend((3..1000).map(|i| format!("label {i:04} {pad}")));
    labels
}

#[test]
fn tls_with_a_password_and_1000_labels_delivers_every_event_across_a_broker_restart() {
    let Some(bin) = mosquitto() else { return };
    let mut broker = Broker::start_secure(&bin, &[("tern", "correct horse"), ("watcher", "battery staple")]);
    let ca = broker.pki.as_ref().map(|p| p.ca.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("big.onnx");
    let labels = long_labels();
    labelled_bundle(&bundle, &labels, 10.0);
    let password = dir.path().join("mqtt-password");
    std::fs::write(&password, "correct horse\n").unwrap();
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let sub =
        Subscriber::start_as(broker.port, "tern-tls-sub", "tern/big/#", false, Some(("watcher", "battery staple")));
    let url = format!("mqtts://127.0.0.1:{}/tern/big", broker.tls_port);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tern-device"))
        .args([OsStr::new("run"), bundle.as_os_str()])
        .args(["--synthetic", "red*4,green*4,blue*4", "--loop", "--fps", "40", "--frames", "160"])
        .args(["--smoothing", "none", "--no-reload", "--report-every", "1", "--mqtt", &url])
        .args([OsStr::new("--mqtt-ca"), ca.as_os_str(), OsStr::new("--mqtt-username"), OsStr::new("tern")])
        .args([OsStr::new("--mqtt-password-file"), password.as_os_str()])
        .env_remove("TERN_MQTT_USERNAME")
        .env_remove("TERN_MQTT_PASSWORD")
        // Files, not pipes: the `started` line alone is larger than a pipe
        // holds, and nothing reads the pipe until the run ends.
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();

    // Connected over TLS: the trimmed `started` event and the first labels.
    let events = "tern/big/events";
    sub.wait_for("started and 3 labels", |s| s.labels(events).len() >= 3);
    let before = sub.labels(events).keys().max().copied().unwrap();
    // The broker goes away for a moment while the loop goes on.
    broker.stop();
    std::thread::sleep(Duration::from_millis(600));
    broker.restart(&bin);
    let status = wait_child(child, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let printed = json_lines(&std::fs::read(&stdout).unwrap());
    let n = printed.iter().filter(|v| v["event"] == "label").count() as u64;
    assert!(n > before + 5, "the run went on after the restart: {n} labels, {before} before it");
    sub.wait_for("every label event", |s| (1..=n).all(|q| s.labels(events).contains_key(&q)));
    assert!(stderr.contains("again"), "the sink reconnected: {stderr}");
    assert!(stderr.contains(" 0 dropped (queue full), 0 failed, 1 trimmed"), "{stderr}");

    // `started`: within the packet limit, the first labels kept and counted.
    let started = sub.on(events).into_iter().find(|v| v["event"] == "started").expect("a started event");
    assert_eq!(started["labels_total"], 1000);
    assert_eq!(started["labels_truncated"], true);
    let kept = started["labels"].as_array().unwrap();
    assert!(kept.len() > 100 && kept.len() < 1000, "{} labels kept", kept.len());
    assert_eq!(kept[0].as_str(), Some(labels[0].as_str()));
    assert_eq!(kept[kept.len() - 1].as_str(), Some(labels[kept.len() - 1].as_str()));
    assert!(started.to_string().len() <= 64 * 1024);
    // The labels themselves arrive whole, and `stats` carry the counters.
    let got = sub.labels(events);
    assert_eq!(got[&1]["label"].as_str(), Some(labels[0].as_str()));
    assert_eq!(got[&2]["label"].as_str(), Some(labels[1].as_str()));
    let stats = sub.on(events).into_iter().find(|v| v["event"] == "stats").expect("a stats event");
    assert!(stats["mqtt"]["delivered"].as_u64().is_some(), "{stats}");
    assert_eq!(sub.on("tern/big/status").first().and_then(Value::as_str), Some("online"));
}

#[test]
fn a_client_certificate_is_presented_when_the_broker_asks() {
    let Some(bin) = mosquitto() else { return };
    let broker = Broker::start_secure(&bin, &[("tern", "pw"), ("watcher", "pw2")]);
    let pki = broker.pki.as_ref().unwrap();
    let sub = Subscriber::start_as(broker.port, "tern-mtls-sub", "tern/+/events", true, Some(("watcher", "pw2")));
    let credentials = Some(Credentials { username: "tern".into(), password: Some(Password::new("pw".into())) });
    let url = |name: &str| MqttTarget::parse(&format!("mqtts://127.0.0.1:{}/tern/{name}", broker.mtls_port)).unwrap();
    let settings = MqttSettings {
        tls: TlsFiles {
            ca: Some(pki.ca.clone()),
            cert: Some(pki.client_cert.clone()),
            key: Some(pki.client_key.clone()),
        },
        credentials: credentials.clone(),
        backoff_initial: Duration::from_millis(100),
        ..MqttSettings::default()
    };
    let mut with_cert = MqttSink::start(url("with-cert"), settings.clone()).unwrap();
    let no_cert = TlsFiles { ca: Some(pki.ca.clone()), ..TlsFiles::default() };
    let mut without = MqttSink::start(url("without"), MqttSettings { tls: no_cert, ..settings }).unwrap();
    with_cert.event(&label_event(1)).unwrap();
    without.event(&label_event(1)).unwrap();
    sub.wait_for("the event of the sink with a certificate", |s| s.labels("tern/with-cert/events").contains_key(&1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while without.stats().connection_errors == 0 {
        assert!(Instant::now() < deadline, "the sink without a certificate was never refused");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(without.stats().connects, 0, "{:?}", without.stats());
    assert!(sub.labels("tern/without/events").is_empty());
    drop(without);
    assert_eq!(with_cert.close().delivered, 1);
}

#[test]
fn a_wrong_password_is_reported_and_retried_with_back_off() {
    let Some(bin) = mosquitto() else { return };
    let broker = Broker::start_secure(&bin, &[("tern", "right")]);
    let ca = broker.pki.as_ref().map(|p| p.ca.clone()).unwrap();
    let (_dir, bundle) = color_bundle_in_tempdir();
    let url = format!("mqtts://127.0.0.1:{}/tern/locked-out", broker.tls_port);
    // Two seconds of frames; the user name and password from the environment.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern-device"))
        .args([OsStr::new("run"), bundle.as_os_str()])
        .args(["--synthetic", "red*5,blue*5", "--loop", "--fps", "20", "--frames", "40", "--smoothing", "none"])
        .args([
            OsStr::new("--no-reload"),
            OsStr::new("--mqtt"),
            OsStr::new(&url),
            OsStr::new("--mqtt-ca"),
            ca.as_os_str(),
        ])
        .env("TERN_MQTT_USERNAME", "tern")
        .env("TERN_MQTT_PASSWORD", "wrong")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "MQTT trouble does not stop the loop: {stderr}");
    assert!(json_lines(&out.stdout).iter().filter(|v| v["event"] == "label").count() >= 3, "{stderr}");
    let refusals = stderr.lines().filter(|l| l.contains("refused")).count();
    assert!(refusals >= 1, "the refusal is reported: {stderr}");
    assert!(
        stderr.contains("bad user name or password") || stderr.contains("not authorized"),
        "the refusal says why: {stderr}"
    );
    // Attempts at 0, 0.5, 1.5 s (then 3.5 s): a handful, not hundreds.
    let errors: u64 = stderr
        .lines()
        .find_map(|l| l.split("connection(s), ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line: {stderr}"));
    assert!((1..=6).contains(&errors), "{errors} connection attempts in 2 s: {stderr}");
    assert!(refusals <= 4, "{stderr}");
}

#[test]
fn devices_whose_topics_end_alike_do_not_disconnect_each_other() {
    let Some(bin) = mosquitto() else { return };
    let broker = Broker::start(&bin);
    let sub = Subscriber::start(broker.port, "tern-pair-sub", "+/camera/events", true);
    let target = |site: &str| MqttTarget::parse(&format!("mqtt://127.0.0.1:{}/{site}/camera", broker.port)).unwrap();
    let mut a = MqttSink::start(target("site-a"), MqttSettings::default()).unwrap();
    let mut b = MqttSink::start(target("site-b"), MqttSettings::default()).unwrap();
    assert_ne!(a.client_id(), b.client_id());
    assert!(a.client_id().len() <= 23, "{}", a.client_id());
    a.event(&label_event(1)).unwrap();
    b.event(&label_event(1)).unwrap();
    sub.wait_for("both first events", |s| {
        s.labels("site-a/camera/events").contains_key(&1) && s.labels("site-b/camera/events").contains_key(&1)
    });
    // Had b taken a's id, a would have been disconnected by now and its
    // second event would come after a reconnect.
    a.event(&label_event(2)).unwrap();
    b.event(&label_event(2)).unwrap();
    sub.wait_for("both second events", |s| {
        s.labels("site-a/camera/events").contains_key(&2) && s.labels("site-b/camera/events").contains_key(&2)
    });
    for sink in [&mut a, &mut b] {
        let stats = sink.close();
        assert_eq!((stats.connects, stats.connection_errors, stats.delivered), (1, 0, 2), "{stats:?}");
    }
}
