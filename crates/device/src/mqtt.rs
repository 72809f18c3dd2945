//! Events to an MQTT broker, with rumqttc.
//!
//! `mqtt://HOST[:PORT]/BASE/TOPIC` publishes:
//! - `BASE/TOPIC/events`: every event except `frame`, as the same JSON as
//!   on stdout, at the chosen QoS (default 1), not retained;
//! - `BASE/TOPIC/state`: the current label, retained, so a subscriber that
//!   connects later learns it at once;
//! - `BASE/TOPIC/status`: `online`, retained, and `offline` as the last
//!   will when the device drops off.
//!
//! The loop never waits for the network. Events go into a bounded queue
//! that a background thread feeds to the broker; while the broker is away
//! the queue holds them (the oldest are dropped, and counted, once it is
//! full), the connection is retried with exponential back-off, and events
//! sent but not acknowledged when the connection dropped are sent again
//! after reconnecting. Delivery is at least once: a receiver that must
//! not see a repeat skips `label` events whose `seq` it has already seen.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{Client, Connection, Event as MqttEvent, LastWill, MqttOptions, Outgoing, Packet, QoS};

use crate::events::{now_ms, Event, Sink};

/// Where to publish: `mqtt://host:1883/tern/kitchen-pi`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTarget {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic prefix, e.g. `tern/kitchen-pi`.
    pub base: String,
}

impl MqttTarget {
    /// Parses `mqtt://HOST[:PORT]/TOPIC/PREFIX` (port 1883 by default).
    pub fn parse(url: &str) -> Result<MqttTarget> {
        let rest = url
            .strip_prefix("mqtt://")
            .ok_or_else(|| anyhow!("MQTT URL {url:?} must start with mqtt:// (TLS is not supported)"))?;
        let (authority, base) = rest.split_once('/').unwrap_or((rest, ""));
        let base = base.trim_matches('/');
        if base.is_empty() {
            bail!("MQTT URL {url:?} has no topic: expected mqtt://host:1883/tern/<device-id>");
        }
        if base.contains(['+', '#']) || base.split('/').any(str::is_empty) {
            bail!("MQTT topic {base:?} in {url:?}: no wildcards (+ #) or empty levels");
        }
        if authority.contains('@') {
            bail!("MQTT URL {url:?}: user names and passwords are not supported");
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            // [v6 address]:port
            let (h, p) = h.split_once(']').ok_or_else(|| anyhow!("MQTT URL {url:?}: unclosed ["))?;
            (h, p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            bail!("MQTT URL {url:?} has no host");
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| anyhow!("MQTT URL {url:?}: {p:?} is not a port"))?,
            None => 1883,
        };
        Ok(MqttTarget { host: host.to_owned(), port, base: base.to_owned() })
    }

    /// `BASE/events`.
    pub fn events_topic(&self) -> String {
        format!("{}/events", self.base)
    }

    /// `BASE/state`.
    pub fn state_topic(&self) -> String {
        format!("{}/state", self.base)
    }

    /// `BASE/status`.
    pub fn status_topic(&self) -> String {
        format!("{}/status", self.base)
    }
}

/// Settings of the MQTT sink.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// QoS of events and state.
    pub qos: QoS,
    /// Events held while the broker is away; beyond this the oldest are
    /// dropped.
    pub queue: usize,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Client id (default `tern-<last topic level>`).
    pub client_id: Option<String>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// How long [`Sink::finish`] waits for queued events to be delivered.
    pub flush_timeout: Duration,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            qos: QoS::AtLeastOnce,
            queue: 1000,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            client_id: None,
            keep_alive: Duration::from_secs(15),
            flush_timeout: Duration::from_secs(3),
        }
    }
}

/// Parses `0`, `1` or `2`.
pub fn parse_qos(s: &str) -> Result<QoS, String> {
    match s {
        "0" => Ok(QoS::AtMostOnce),
        "1" => Ok(QoS::AtLeastOnce),
        "2" => Ok(QoS::ExactlyOnce),
        _ => Err(format!("QoS {s:?}: expected 0, 1 or 2")),
    }
}

/// Counters of the MQTT sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStats {
    /// Events acknowledged by the broker (or sent, at QoS 0).
    pub delivered: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events waiting.
    pub queued: usize,
    /// Successful connections so far.
    pub connects: u64,
    /// Whether the broker is connected now.
    pub connected: bool,
}

#[derive(Debug)]
enum Kind {
    Event(Vec<u8>),
    State,
    Status,
}

/// A publish handed to rumqttc, waiting for its packet id and ack.
#[derive(Debug)]
struct Inflight {
    pkid: Option<u16>,
    kind: Kind,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Vec<u8>>,
    inflight: VecDeque<Inflight>,
    current: Option<Vec<u8>>,
    state_dirty: bool,
    status_dirty: bool,
    connected: bool,
    stop: bool,
    stats: MqttStats,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Most publishes handed to rumqttc and not yet acknowledged.
const MAX_INFLIGHT: usize = 16;

/// Publishes events to MQTT from background threads.
pub struct MqttSink {
    target: MqttTarget,
    settings: MqttSettings,
    shared: Arc<Shared>,
    client: Client,
    threads: Vec<JoinHandle<()>>,
}

impl MqttSink {
    /// Starts connecting to the broker; never blocks on the network.
    pub fn start(target: MqttTarget, settings: MqttSettings) -> Result<MqttSink> {
        if settings.queue == 0 {
            bail!("the MQTT queue must hold at least one event");
        }
        let id = settings
            .client_id
            .clone()
            .unwrap_or_else(|| format!("tern-{}", target.base.rsplit('/').next().unwrap_or("device")));
        let mut o = MqttOptions::new(id, target.host.clone(), target.port);
        o.set_keep_alive(settings.keep_alive.max(Duration::from_secs(1)));
        // A clean session: whatever the broker or rumqttc held is dropped on
        // reconnect, and this sink resends what was not acknowledged.
        o.set_clean_session(true);
        o.set_inflight(MAX_INFLIGHT as u16 + 4);
        o.set_last_will(LastWill::new(target.status_topic(), "offline", QoS::AtLeastOnce, true));
        let (client, mut conn) = Client::new(o, 4 * MAX_INFLIGHT);
        let mut net = conn.eventloop.network_options();
        net.set_connection_timeout(3);
        conn.eventloop.set_network_options(net);
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new() });
        let mut threads = Vec::new();
        {
            let (shared, settings, target) = (shared.clone(), settings.clone(), target.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tern-mqtt-net".into())
                    .spawn(move || network_thread(conn, &shared, &settings, &target))
                    .context("cannot start the MQTT thread")?,
            );
        }
        {
            let (shared, settings, target, client) = (shared.clone(), settings.clone(), target.clone(), client.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tern-mqtt-feed".into())
                    .spawn(move || feed_thread(&client, &shared, &settings, &target))
                    .context("cannot start the MQTT thread")?,
            );
        }
        Ok(MqttSink { target, settings, shared, client, threads })
    }

    /// The topics' target.
    pub fn target(&self) -> &MqttTarget {
        &self.target
    }

    /// Queues one payload for `BASE/events`. Returns `false` if the queue
    /// was full and the oldest event was dropped to make room.
    pub fn publish_event(&self, payload: Vec<u8>) -> bool {
        let mut s = self.shared.lock();
        let mut kept = true;
        if s.queue.len() >= self.settings.queue {
            s.queue.pop_front();
            s.stats.dropped += 1;
            kept = false;
        }
        s.queue.push_back(payload);
        drop(s);
        self.shared.wake.notify_all();
        kept
    }

    /// Sets the retained current label on `BASE/state`.
    pub fn set_state(&self, payload: Vec<u8>) {
        let mut s = self.shared.lock();
        s.current = Some(payload);
        s.state_dirty = true;
        drop(s);
        self.shared.wake.notify_all();
    }

    /// Counters now.
    pub fn stats(&self) -> MqttStats {
        let s = self.shared.lock();
        MqttStats { queued: s.queue.len(), ..s.stats }
    }

    /// Waits until every queued event is acknowledged, up to `timeout`.
    /// Returns whether everything was delivered.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            if s.queue.is_empty() && s.inflight.is_empty() && !s.state_dirty {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.shared.wake.wait_timeout(s, deadline - now).map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Flushes (up to the settings' timeout), says `offline`, disconnects
    /// and stops the threads.
    pub fn close(&mut self) -> MqttStats {
        if self.threads.is_empty() {
            return self.stats();
        }
        let delivered_all = self.flush(self.settings.flush_timeout);
        let stats = self.stats();
        if !delivered_all {
            eprintln!(
                "tern-device: mqtt: {} event(s) not delivered to {}:{} before exit",
                stats.queued, self.target.host, self.target.port
            );
        }
        let connected = {
            let mut s = self.shared.lock();
            s.stop = true;
            s.connected
        };
        self.shared.wake.notify_all();
        if connected {
            let _ = self.client.try_publish(self.target.status_topic(), QoS::AtMostOnce, true, "offline");
            let _ = self.client.try_disconnect();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        stats
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.close();
    }
}

impl Sink for MqttSink {
    fn event(&mut self, event: &Event) -> Result<()> {
        match event {
            Event::Frame { .. } => return Ok(()),
            Event::Label { label, confidence, frame, seq, .. } => {
                let state = serde_json::json!({
                    "label": label, "confidence": confidence, "frame": frame, "seq": seq, "ts_ms": now_ms(),
                });
                self.set_state(state.to_string().into_bytes());
            }
            _ => {}
        }
        self.publish_event(event.to_json().into_bytes());
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.close();
        Ok(())
    }
}

/// Hands queued publishes to rumqttc while connected, at most
/// [`MAX_INFLIGHT`] unacknowledged at a time.
fn feed_thread(client: &Client, shared: &Shared, settings: &MqttSettings, target: &MqttTarget) {
    let mut s = shared.lock();
    loop {
        if s.stop {
            return;
        }
        if !s.connected || s.inflight.len() >= MAX_INFLIGHT {
            s = shared.wake.wait_timeout(s, Duration::from_millis(200)).map_or_else(|p| p.into_inner().0, |r| r.0);
            continue;
        }
        // Publish under the lock, so that the order of `inflight` is the
        // order in which rumqttc assigns packet ids.
        let (topic, retain, kind, payload) = if s.status_dirty {
            s.status_dirty = false;
            (target.status_topic(), true, Kind::Status, b"online".to_vec())
        } else if s.state_dirty && s.current.is_some() {
            s.state_dirty = false;
            (target.state_topic(), true, Kind::State, s.current.clone().unwrap_or_default())
        } else if let Some(p) = s.queue.pop_front() {
            (target.events_topic(), false, Kind::Event(p.clone()), p)
        } else {
            s = shared.wake.wait_timeout(s, Duration::from_millis(200)).map_or_else(|p| p.into_inner().0, |r| r.0);
            continue;
        };
        match client.try_publish(topic, settings.qos, retain, payload) {
            Ok(()) => {
                if settings.qos == QoS::AtMostOnce {
                    if matches!(kind, Kind::Event(_)) {
                        s.stats.delivered += 1;
                    }
                } else {
                    s.inflight.push_back(Inflight { pkid: None, kind });
                }
            }
            Err(_) => {
                // rumqttc's request channel is full: put it back and wait.
                match kind {
                    Kind::Event(p) => s.queue.push_front(p),
                    Kind::State => s.state_dirty = true,
                    Kind::Status => s.status_dirty = true,
                }
                s = shared.wake.wait_timeout(s, Duration::from_millis(20)).map_or_else(|p| p.into_inner().0, |r| r.0);
            }
        }
        shared.wake.notify_all();
    }
}

/// Drives the connection: acks, reconnects with back-off.
fn network_thread(mut conn: Connection, shared: &Shared, settings: &MqttSettings, target: &MqttTarget) {
    let mut delay = settings.backoff_initial;
    let mut failures = 0u64;
    loop {
        // Connecting may take up to the 3 s connection timeout: never cut
        // it short. Once connected, wake every second to notice `stop`.
        let wait = if shared.lock().connected { Duration::from_secs(1) } else { Duration::from_secs(5) };
        let ev = conn.recv_timeout(wait);
        let mut s = shared.lock();
        match ev {
            Err(rumqttc::RecvTimeoutError::Timeout) => {
                if s.stop && !s.connected {
                    return;
                }
            }
            Err(rumqttc::RecvTimeoutError::Disconnected) => return,
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                s.connected = true;
                s.stats.connected = true;
                s.stats.connects += 1;
                s.status_dirty = true;
                s.state_dirty = s.current.is_some();
                if failures > 0 {
                    eprintln!("tern-device: mqtt: connected to {}:{} again", target.host, target.port);
                }
                failures = 0;
                delay = settings.backoff_initial;
            }
            Ok(Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid)))) if pkid != 0 => {
                if let Some(f) = s.inflight.iter_mut().find(|f| f.pkid.is_none()) {
                    f.pkid = Some(pkid);
                }
            }
            Ok(Ok(MqttEvent::Incoming(Packet::PubAck(rumqttc::PubAck { pkid, .. }))))
            | Ok(Ok(MqttEvent::Incoming(Packet::PubComp(rumqttc::PubComp { pkid, .. })))) => {
                if let Some(i) = s.inflight.iter().position(|f| f.pkid == Some(pkid)) {
                    if let Some(Inflight { kind: Kind::Event(_), .. }) = s.inflight.remove(i) {
                        s.stats.delivered += 1;
                    }
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let was_connected = s.connected;
                s.connected = false;
                s.stats.connected = false;
                // Everything not acknowledged goes back to the front of the
                // queue, in order; state and status are sent again anyway.
                let lost: Vec<Inflight> = s.inflight.drain(..).collect();
                for f in lost.into_iter().rev() {
                    if let Kind::Event(p) = f.kind {
                        s.queue.push_front(p);
                    }
                }
                while s.queue.len() > settings.queue {
                    s.queue.pop_front();
                    s.stats.dropped += 1;
                }
                if s.stop {
                    return;
                }
                failures += 1;
                if was_connected || failures == 1 || failures.is_power_of_two() {
                    eprintln!(
                        "tern-device: mqtt: {}:{}: {e}; {} event(s) queued, retrying in {:.1} s",
                        target.host,
                        target.port,
                        s.queue.len(),
                        delay.as_secs_f64()
                    );
                }
                drop(s);
                shared.wake.notify_all();
                let until = Instant::now() + delay;
                let mut s = shared.lock();
                while !s.stop && Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now());
                    s = shared.wake.wait_timeout(s, left).map_or_else(|p| p.into_inner().0, |r| r.0);
                }
                if s.stop {
                    return;
                }
                delay = (delay * 2).min(settings.backoff_max);
                continue;
            }
        }
        drop(s);
        shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = MqttTarget::parse("mqtt://broker.local:1884/tern/kitchen-pi").unwrap();
        assert_eq!(t, MqttTarget { host: "broker.local".into(), port: 1884, base: "tern/kitchen-pi".into() });
        assert_eq!(t.state_topic(), "tern/kitchen-pi/state");
        let t = MqttTarget::parse("mqtt://10.0.0.2/tern/x/").unwrap();
        assert_eq!((t.port, t.base.as_str()), (1883, "tern/x"));
        let t = MqttTarget::parse("mqtt://[::1]:1999/a").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 1999));
        for bad in
            ["http://h/t", "mqtt://h", "mqtt://h:x/t", "mqtt:///t", "mqtt://h/t/#", "mqtt://u:p@h/t", "mqtt://h/a//b"]
        {
            assert!(MqttTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
