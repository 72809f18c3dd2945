//! MQTT against a real mosquitto broker on a loopback port: events arrive
//! with the right payload, the current label is retained, and stopping and
//! restarting the broker loses no event within the queue bound (beyond it,
//! the oldest are dropped and counted).
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
use tern_device::mqtt::{MqttSettings, MqttSink, MqttTarget};

/// A subscriber with a persistent session (clean session off, QoS 1), so
/// that the broker keeps its messages across its own restart.
struct Subscriber {
    got: Arc<Mutex<Vec<(String, Value, bool)>>>,
    client: Client,
}

impl Subscriber {
    fn start(port: u16, id: &str, filter: &str, clean: bool) -> Subscriber {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(5));
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
        label: Some(label.into()),
        confidence: 0.9,
        previous: Some(COLORS[((seq + 2) % 3) as usize].into()),
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
