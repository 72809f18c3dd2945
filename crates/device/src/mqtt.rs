//! Events to an MQTT broker, with rumqttc.
//!
//! `mqtt://HOST[:PORT]/BASE/TOPIC` (or `mqtts://` for TLS, port 8883 by
//! default) publishes:
//! - `BASE/TOPIC/events`: every event except `frame`, as the same JSON as
//!   on stdout, at the chosen QoS (default 1), not retained;
//! - `BASE/TOPIC/state`: the current label, retained, so a subscriber that
//!   connects later learns it at once;
//! - `BASE/TOPIC/status`: `online`, retained, and `offline` as the last
//!   will when the device drops off;
//! - with regions of interest, `BASE/TOPIC/REGION/state`: each region's
//!   current label, retained, like `BASE/TOPIC/state` (label events on
//!   `BASE/TOPIC/events` carry `region`);
//! - with Home Assistant discovery ([`MqttSettings::ha`], [`crate::ha`]),
//!   the retained config messages of its entities, sent again on every
//!   connection and whenever Home Assistant announces `online` on
//!   `PREFIX/status`.
//!
//! Every packet is at most [`MqttSettings::max_packet`] bytes (64 KiB by
//! default, both directions). An event whose JSON would not fit is trimmed
//! ([`fit_json`]): a long `labels` list keeps its first labels and gains
//! `labels_total` and `labels_truncated: true`; failing that, long strings
//! are shortened and `truncated: true` is added. `stats` events sent to
//! MQTT carry the sink's own counters under `mqtt`.
//!
//! The loop never waits for the network. Events go into a bounded queue
//! that a background thread feeds to the broker; while the broker is away
//! the queue holds them (the oldest are dropped, and counted, once it is
//! full), the connection is retried with exponential back-off (which starts
//! again from the first delay only after a connection proved good: an
//! acknowledgement, or 10 s up), and events sent but not acknowledged when
//! the connection dropped are sent again after reconnecting. An event that
//! was the oldest unacknowledged one on [`MAX_TRIES`] connections that
//! dropped is given up and counted (`failed`), so that one message the
//! broker will not take cannot block the queue. Delivery is at least once:
//! a receiver that must not see a repeat skips `label` events whose `seq`
//! it has already seen.
//!
//! TLS is rustls with the `ring` provider: the server is checked against a
//! CA file ([`TlsFiles::ca`]) or, without one, the system's CA
//! certificates; a client certificate and key are optional. A user name
//! and password ([`Credentials`]) come from the command line (the name
//! only), a file or the environment, never from the URL.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{
    Client, ConnectReturnCode, Connection, ConnectionError, Event as MqttEvent, LastWill, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::events::{now_ms, Event, FrameView, Sink};
use crate::ha::{HaDiscovery, MAX_BINARY_SENSORS};
pub use crate::secret::Password;
use crate::secret::Sources;

/// Where to publish: `mqtt://host:1883/tern/kitchen-pi`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTarget {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic prefix, e.g. `tern/kitchen-pi`.
    pub base: String,
    /// TLS (`mqtts://`).
    pub tls: bool,
}

impl MqttTarget {
    /// Parses `mqtt://HOST[:PORT]/TOPIC/PREFIX` (port 1883 by default) or
    /// `mqtts://HOST[:PORT]/TOPIC/PREFIX` (TLS, port 8883 by default).
    ///
    /// A user name or password in the URL is refused: the password goes in
    /// a file or the environment ([`Credentials::resolve`]), never on a
    /// command line where `ps` and the shell history show it.
    pub fn parse(url: &str) -> Result<MqttTarget> {
        let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
            (r, false)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (r, true)
        } else {
            bail!("MQTT URL {url:?} must start with mqtt:// or mqtts:// (TLS)");
        };
        let (authority, base) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            let shown = format!("{}://…@{}", if tls { "mqtts" } else { "mqtt" }, &rest[userinfo.len() + 1..]);
            if userinfo.contains(':') {
                bail!(
                    "MQTT URL {shown:?} holds a password: passwords are never taken from the command line \
                     (ps and the shell history would show it); put it in a file given with \
                     --mqtt-password-file, or in TERN_MQTT_PASSWORD"
                );
            }
            bail!("MQTT URL {shown:?} holds a user name: give it with --mqtt-username (or TERN_MQTT_USERNAME)");
        }
        let base = base.trim_matches('/');
        if base.is_empty() {
            bail!("MQTT URL {url:?} has no topic: expected mqtt://host:1883/tern/<device-id>");
        }
        if base.contains(['+', '#']) || base.split('/').any(str::is_empty) {
            bail!("MQTT topic {base:?} in {url:?}: no wildcards (+ #) or empty levels");
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
            None if tls => 8883,
            None => 1883,
        };
        Ok(MqttTarget { host: host.to_owned(), port, base: base.to_owned(), tls })
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

    /// `BASE/REGION/state` of a region of interest; `BASE/state` for the
    /// whole frame.
    pub fn state_topic_of(&self, region: Option<&str>) -> String {
        match region {
            Some(r) => format!("{}/{r}/state", self.base),
            None => self.state_topic(),
        }
    }
}

/// Certificate files of a TLS connection, all PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) that the broker's certificate must chain to;
    /// without it, the system's CA certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate (chain), for brokers that ask for one.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any file is given.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// User name and optional password sent in the MQTT CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password, if any.
    pub password: Option<Password>,
}

/// Environment variable holding the MQTT user name.
pub const ENV_USERNAME: &str = "TERN_MQTT_USERNAME";
/// Environment variable holding the MQTT password.
pub const ENV_PASSWORD: &str = "TERN_MQTT_PASSWORD";

/// Largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1024 * 1024;

impl Credentials {
    /// Gathers the credentials: the user name from `username` (the command
    /// line) or [`ENV_USERNAME`]; the password from `password_file` or
    /// [`ENV_PASSWORD`] (both at once is an error). `env` looks a variable
    /// up (`|k| std::env::var(k).ok()`). `None` when neither a name nor a
    /// password is given; a password without a user name is an error.
    pub fn resolve(
        username: Option<String>,
        password_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Credentials>> {
        let (Some(username), password) = SOURCES.gather(username, password_file, env)? else { return Ok(None) };
        if username.len() > u16::MAX as usize {
            bail!("MQTT user name longer than MQTT's 65535 bytes");
        }
        if password.as_ref().is_some_and(|p| p.expose().len() > u16::MAX as usize) {
            bail!("MQTT password longer than MQTT's 65535 bytes");
        }
        Ok(Some(Credentials { username, password }))
    }
}

/// Where the broker's credentials come from.
const SOURCES: Sources = Sources {
    service: "MQTT",
    username_flag: "--mqtt-username",
    username_env: ENV_USERNAME,
    password_flag: "--mqtt-password-file",
    password_env: ENV_PASSWORD,
};

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
    /// Client id; by default `tern-<last topic level>-<6 hex digits>`,
    /// unique per process ([`default_client_id`]).
    pub client_id: Option<String>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// How long [`Sink::finish`] waits for queued events to be delivered.
    pub flush_timeout: Duration,
    /// Largest MQTT packet sent or accepted, bytes. Events are trimmed to
    /// fit.
    pub max_packet: usize,
    /// Certificate files of `mqtts://` (only with TLS).
    pub tls: TlsFiles,
    /// User name and password.
    pub credentials: Option<Credentials>,
    /// Print a summary line of the counters on stderr when closing.
    pub log: bool,
    /// Home Assistant discovery: the config messages sent once the bundle's
    /// labels are known (the `started` event).
    pub ha: Option<HaDiscovery>,
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
            max_packet: DEFAULT_MAX_PACKET,
            tls: TlsFiles::default(),
            credentials: None,
            log: false,
            ha: None,
        }
    }
}

/// Default packet limit: 64 KiB, far above every event but a `started`
/// event of a bundle with thousands of labels (which is trimmed), and
/// within what hosted brokers accept (AWS IoT: 128 KB).
pub const DEFAULT_MAX_PACKET: usize = 64 * 1024;
/// Smallest packet limit accepted.
pub const MIN_MAX_PACKET: usize = 1024;
/// MQTT 3.1.1's own limit on a packet.
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// Parses `0`, `1` or `2`.
pub fn parse_qos(s: &str) -> Result<QoS, String> {
    match s {
        "0" => Ok(QoS::AtMostOnce),
        "1" => Ok(QoS::AtLeastOnce),
        "2" => Ok(QoS::ExactlyOnce),
        _ => Err(format!("QoS {s:?}: expected 0, 1 or 2")),
    }
}

/// A client id unique to this process: `tern-`, the last topic level
/// (letters, digits, `-` and `_`, at most 11 of them) and 6 hex digits of a
/// hash of the host name, the topic, the process id and a per-process
/// random key — 23 characters at most, MQTT 3.1.1's guidance. Two devices
/// whose topics end in the same level get different ids, so the broker
/// does not disconnect one when the other connects.
pub fn default_client_id(base: &str) -> String {
    let level: String = base
        .rsplit('/')
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(11)
        .collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let suffix = RandomState::new().hash_one((host.trim(), base, std::process::id())) & 0xff_ffff;
    if level.is_empty() {
        format!("tern-{suffix:06x}")
    } else {
        format!("tern-{level}-{suffix:06x}")
    }
}

/// Counters of the MQTT sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStats {
    /// Events acknowledged by the broker (or sent, at QoS 0).
    pub delivered: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events given up: the oldest unacknowledged one on [`MAX_TRIES`]
    /// connections that dropped, or too large for the packet limit.
    pub failed: u64,
    /// Events trimmed to fit the packet limit.
    pub trimmed: u64,
    /// Events waiting.
    pub queued: usize,
    /// Successful connections so far.
    pub connects: u64,
    /// Failed connection attempts and lost connections so far.
    pub connection_errors: u64,
    /// Whether the broker is connected now.
    pub connected: bool,
}

/// Reads an [`MqttSink`]'s counters from any thread ([`MqttSink::monitor`]).
#[derive(Clone)]
pub struct MqttMonitor {
    shared: Arc<Shared>,
}

impl MqttMonitor {
    /// Counters now.
    pub fn stats(&self) -> MqttStats {
        let s = self.shared.lock();
        MqttStats { queued: s.queue.len(), ..s.stats }
    }
}

impl std::fmt::Debug for MqttMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttMonitor").field("stats", &self.stats()).finish()
    }
}

/// Connections that may drop while an event is the oldest unacknowledged
/// one before it is given up.
pub const MAX_TRIES: u8 = 3;

/// A connection up this long counts as good even without an
/// acknowledgement (QoS 0): the back-off starts again from its first delay.
const STABLE: Duration = Duration::from_secs(10);

/// An event waiting, with the number of dropped connections on which it
/// was the oldest unacknowledged one.
#[derive(Debug)]
struct Queued {
    payload: Vec<u8>,
    tries: u8,
}

#[derive(Debug)]
enum Kind {
    Event(Queued),
    /// A retained message ([`Retained`]), by topic.
    Retained(String),
    Status,
}

/// A retained message sent on every connection: a current label, or a
/// discovery config (an empty payload removes a config).
#[derive(Debug)]
struct Retained {
    topic: String,
    payload: Vec<u8>,
    /// To be sent.
    dirty: bool,
}

/// Sets the retained message of `topic` in `list`, to be sent.
fn set_retained(list: &mut Vec<Retained>, topic: String, payload: Vec<u8>) {
    match list.iter_mut().find(|r| r.topic == topic) {
        Some(r) => {
            r.payload = payload;
            r.dirty = true;
        }
        None => list.push(Retained { topic, payload, dirty: true }),
    }
}

/// A publish handed to rumqttc, waiting for its packet id and ack.
#[derive(Debug)]
struct Inflight {
    pkid: Option<u16>,
    kind: Kind,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    inflight: VecDeque<Inflight>,
    /// Discovery configs, sent before the states.
    discovery: Vec<Retained>,
    /// Current labels: the whole frame's, or each region's.
    states: Vec<Retained>,
    /// Home Assistant's status topic, to subscribe to on every connection.
    ha_status: Option<String>,
    subscribe_dirty: bool,
    status_dirty: bool,
    connected: bool,
    /// The last connection attempt was refused by the broker (credentials,
    /// client id): waiting will not change that.
    refused: bool,
    last_error: Option<String>,
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

impl State {
    /// Marks every retained message to be sent again.
    fn resend_retained(&mut self) {
        for r in self.discovery.iter_mut().chain(self.states.iter_mut()) {
            r.dirty = true;
        }
    }

    /// The next retained message to send (discovery first), marked sent.
    fn take_dirty(&mut self) -> Option<(String, Vec<u8>)> {
        let r = self.discovery.iter_mut().chain(self.states.iter_mut()).find(|r| r.dirty)?;
        r.dirty = false;
        Some((r.topic.clone(), r.payload.clone()))
    }

    /// Marks the retained message of `topic` to be sent again.
    fn mark_dirty(&mut self, topic: &str) {
        if let Some(r) = self.discovery.iter_mut().chain(self.states.iter_mut()).find(|r| r.topic == topic) {
            r.dirty = true;
        }
    }

    fn retained_dirty(&self) -> bool {
        self.discovery.iter().chain(&self.states).any(|r| r.dirty)
    }
}

/// Most publishes handed to rumqttc and not yet acknowledged.
const MAX_INFLIGHT: usize = 16;

/// Room for the payload of a publish on `topic` in a packet of at most
/// `max_packet` bytes: the fixed header (1 + up to 4 length bytes), the
/// topic with its 2-byte length and the 2-byte packet id come first.
pub fn payload_room(max_packet: usize, topic: &str) -> usize {
    max_packet.saturating_sub(5 + 2 + topic.len() + 2)
}

/// `value` as JSON of at most `limit` bytes, and whether it had to be
/// trimmed; `None` when not even `{"event":…,"ts_ms":…,"truncated":true}`
/// fits.
///
/// Trimming, in order, until it fits: a `labels` array keeps as many of its
/// first labels as fit, and `labels_total` (its length) and
/// `labels_truncated: true` are added; then every string longer than a
/// halving cap is cut (ending in `…`) and `truncated: true` is added; last,
/// only `event`, `ts_ms` and `truncated` are kept.
pub fn fit_json(mut value: Value, limit: usize) -> Option<(Vec<u8>, bool)> {
    let size = |v: &Value| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    if let Ok(bytes) = serde_json::to_vec(&value) {
        if bytes.len() <= limit {
            return Some((bytes, false));
        }
    }
    let Value::Object(obj) = &mut value else { return None };
    if let Some(Value::Array(all)) = obj.remove("labels") {
        obj.insert("labels_total".into(), Value::from(all.len()));
        obj.insert("labels_truncated".into(), Value::Bool(true));
        // The largest prefix that fits, by bisection.
        let (mut lo, mut hi) = (0, all.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            obj.insert("labels".into(), Value::Array(all[..mid].to_vec()));
            if size(&Value::Object(obj.clone())) <= limit {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        obj.insert("labels".into(), Value::Array(all[..lo].to_vec()));
    }
    let fits = |obj: &serde_json::Map<String, Value>| {
        serde_json::to_vec(obj).ok().filter(|b| b.len() <= limit).map(|b| (b, true))
    };
    if let Some(done) = fits(&*obj) {
        return Some(done);
    }
    obj.insert("truncated".into(), Value::Bool(true));
    let mut cap = longest_string(&Value::Object(obj.clone()));
    while cap > 8 {
        cap /= 2;
        for v in obj.values_mut() {
            shorten(v, cap);
        }
        if let Some(done) = fits(&*obj) {
            return Some(done);
        }
    }
    let mut bare = serde_json::Map::new();
    for key in ["event", "ts_ms", "truncated"] {
        if let Some(v) = obj.get(key) {
            bare.insert(key.into(), v.clone());
        }
    }
    fits(&bare)
}

fn longest_string(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(a) => a.iter().map(longest_string).max().unwrap_or(0),
        Value::Object(o) => o.values().map(longest_string).max().unwrap_or(0),
        _ => 0,
    }
}

/// Cuts every string in `v` longer than `cap` characters to `cap`, the last
/// one `…`.
fn shorten(v: &mut Value, cap: usize) {
    match v {
        Value::String(s) if s.chars().count() > cap => {
            let mut t: String = s.chars().take(cap.saturating_sub(1)).collect();
            t.push('…');
            *s = t;
        }
        Value::Array(a) => a.iter_mut().for_each(|x| shorten(x, cap)),
        Value::Object(o) => o.values_mut().for_each(|x| shorten(x, cap)),
        _ => {}
    }
}

/// Reads a whole file of at most `limit` bytes (checked before reading).
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
    if len > limit {
        bail!("{} is {len} bytes, more than the {limit} expected", path.display());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > limit {
        bail!("{} grew past {limit} bytes while read", path.display());
    }
    Ok(bytes)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_limited(path, MAX_PEM_FILE).with_context(|| format!("{what} {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} {}: bad PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it", path.display());
    }
    Ok(certs)
}

/// The rustls client configuration of `mqtts://`: ring, TLS 1.2 and 1.3,
/// the CA file's certificates or the system's, and the client certificate
/// if given.
pub fn tls_config(files: &TlsFiles) -> Result<rustls::ClientConfig> {
    match (&files.cert, &files.key) {
        (Some(_), None) => bail!("an MQTT client certificate needs its key (--mqtt-key FILE)"),
        (None, Some(_)) => bail!("an MQTT client key needs its certificate (--mqtt-cert FILE)"),
        _ => {}
    }
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca {
        Some(path) => {
            for cert in read_certs(path, "MQTT CA file")? {
                roots.add(cert).with_context(|| format!("MQTT CA file {}: unusable certificate", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                bail!(
                    "no CA certificates found in the system store{why}: install ca-certificates, \
                     or give the broker's CA with --mqtt-ca FILE"
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up")?
        .with_root_certificates(roots);
    Ok(match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "MQTT client certificate")?;
            let pem = read_limited(key, MAX_PEM_FILE).with_context(|| format!("MQTT client key {}", key.display()))?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .with_context(|| format!("MQTT client key {}: no PEM private key in it", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| format!("MQTT client certificate {} with key {}", cert.display(), key.display()))?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// An error of the connection, in words.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => {
                "the broker refused the user name or password (bad user name or password)".into()
            }
            ConnectReturnCode::NotAuthorized => {
                "the broker refused the connection: not authorized (check the user name and password, \
                 or the client certificate)"
                    .into()
            }
            ConnectReturnCode::BadClientId => "the broker refused the client id (--mqtt-client-id)".into(),
            ConnectReturnCode::RefusedProtocolVersion => "the broker does not speak MQTT 3.1.1".into(),
            ConnectReturnCode::ServiceUnavailable => "the broker says it is unavailable".into(),
            ConnectReturnCode::Success => "the broker refused the connection".into(),
        },
        other => other.to_string(),
    }
}

/// Publishes events to MQTT from background threads.
pub struct MqttSink {
    target: MqttTarget,
    settings: MqttSettings,
    client_id: String,
    shared: Arc<Shared>,
    client: Client,
    threads: Vec<JoinHandle<()>>,
    /// The labels whose discovery configs were sent.
    advertised: Option<Vec<String>>,
    /// A bundle was reloaded: the labels may have changed.
    relabelled: bool,
}

impl MqttSink {
    /// Reads the certificate files and starts connecting to the broker;
    /// never blocks on the network.
    pub fn start(target: MqttTarget, settings: MqttSettings) -> Result<MqttSink> {
        if settings.queue == 0 {
            bail!("the MQTT queue must hold at least one event");
        }
        if !(MIN_MAX_PACKET..=MQTT_MAX_PACKET).contains(&settings.max_packet) {
            bail!("MQTT packet limit {} bytes: expected {MIN_MAX_PACKET} to {MQTT_MAX_PACKET}", settings.max_packet);
        }
        if !target.tls && !settings.tls.is_empty() {
            bail!("MQTT certificate files (--mqtt-ca, --mqtt-cert, --mqtt-key) need an mqtts:// URL");
        }
        let client_id = match &settings.client_id {
            Some(id) if id.is_empty() || id.len() > u16::MAX as usize || id.chars().any(char::is_control) => {
                bail!("MQTT client id {id:?}: expected 1 to 65535 bytes, no control characters")
            }
            Some(id) => id.clone(),
            None => default_client_id(&target.base),
        };
        let mut o = MqttOptions::new(client_id.clone(), target.host.clone(), target.port);
        o.set_keep_alive(settings.keep_alive.max(Duration::from_secs(1)));
        // A clean session: whatever the broker or rumqttc held is dropped on
        // reconnect, and this sink resends what was not acknowledged.
        o.set_clean_session(true);
        o.set_inflight(MAX_INFLIGHT as u16 + 4);
        o.set_max_packet_size(settings.max_packet, settings.max_packet);
        o.set_last_will(LastWill::new(target.status_topic(), "offline", QoS::AtLeastOnce, true));
        if let Some(c) = &settings.credentials {
            o.set_credentials(c.username.clone(), c.password.as_ref().map_or("", Password::expose));
            if !target.tls && c.password.is_some() {
                eprintln!(
                    "tern-device: mqtt: warning: the password goes to {}:{} unencrypted (mqtt://); use mqtts://",
                    target.host, target.port
                );
            }
        }
        if target.tls {
            let config = tls_config(&settings.tls)?;
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
        }
        let (client, mut conn) = Client::new(o, 4 * MAX_INFLIGHT);
        let mut net = conn.eventloop.network_options();
        net.set_connection_timeout(3);
        conn.eventloop.set_network_options(net);
        let state = State { ha_status: settings.ha.as_ref().map(HaDiscovery::status_topic), ..State::default() };
        let shared = Arc::new(Shared { state: Mutex::new(state), wake: Condvar::new() });
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
        Ok(MqttSink { target, settings, client_id, shared, client, threads, advertised: None, relabelled: false })
    }

    /// The topics' target.
    pub fn target(&self) -> &MqttTarget {
        &self.target
    }

    /// The client id sent to the broker.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Queues one payload for `BASE/events`. Returns `false` if it was not
    /// kept whole: the queue was full and the oldest event was dropped to
    /// make room, or the payload is too large for the packet limit (then it
    /// is dropped and counted as failed).
    pub fn publish_event(&self, payload: Vec<u8>) -> bool {
        let mut s = self.shared.lock();
        if payload.len() > payload_room(self.settings.max_packet, &self.target.events_topic()) {
            s.stats.failed += 1;
            return false;
        }
        let mut kept = true;
        if s.queue.len() >= self.settings.queue {
            s.queue.pop_front();
            s.stats.dropped += 1;
            kept = false;
        }
        s.queue.push_back(Queued { payload, tries: 0 });
        drop(s);
        self.shared.wake.notify_all();
        kept
    }

    /// Sets the retained current label on `BASE/state`.
    pub fn set_state(&self, payload: Vec<u8>) {
        self.set_state_of(None, payload);
    }

    /// Sets the retained current label of a region on `BASE/REGION/state`
    /// (`None`: the whole frame's, on `BASE/state`).
    pub fn set_state_of(&self, region: Option<&str>, payload: Vec<u8>) {
        let mut s = self.shared.lock();
        set_retained(&mut s.states, self.target.state_topic_of(region), payload);
        drop(s);
        self.shared.wake.notify_all();
    }

    /// Publishes the Home Assistant discovery configs for a bundle with
    /// `labels` (retained, and again on every connection), and removes
    /// those of an earlier bundle that the new labels no longer have. A
    /// config too large for the packet limit is left out and counted as
    /// failed. Nothing without [`MqttSettings::ha`].
    pub fn advertise(&mut self, labels: &[String]) {
        let Some(ha) = &self.settings.ha else { return };
        if self.advertised.as_deref() == Some(labels) {
            return;
        }
        if !HaDiscovery::binary_sensors(labels) && self.settings.log {
            eprintln!(
                "tern-device: mqtt: Home Assistant: the bundle has {} labels; binary sensors are made for at most \
                 {MAX_BINARY_SENSORS}, so only the label sensor is announced",
                labels.len()
            );
        }
        let configs = ha.configs(&self.target, labels);
        let mut s = self.shared.lock();
        let mut fresh: Vec<String> = Vec::with_capacity(configs.len());
        for c in configs {
            let payload = c.payload.to_string().into_bytes();
            if payload.len() > payload_room(self.settings.max_packet, &c.topic) {
                s.stats.failed += 1;
                eprintln!(
                    "tern-device: mqtt: Home Assistant config {} ({} bytes) exceeds the packet limit \
                     (--mqtt-max-packet {}); left out",
                    c.topic,
                    payload.len(),
                    self.settings.max_packet
                );
                continue;
            }
            fresh.push(c.topic.clone());
            set_retained(&mut s.discovery, c.topic, payload);
        }
        for r in s.discovery.iter_mut().filter(|r| !fresh.contains(&r.topic) && !r.payload.is_empty()) {
            r.payload.clear();
            r.dirty = true;
        }
        drop(s);
        self.shared.wake.notify_all();
        self.advertised = Some(labels.to_vec());
    }

    /// Counters now.
    pub fn stats(&self) -> MqttStats {
        self.monitor().stats()
    }

    /// A handle that reads the counters from another thread (the web
    /// view's `/metrics` and `/api/status`), for as long as it is kept.
    pub fn monitor(&self) -> MqttMonitor {
        MqttMonitor { shared: Arc::clone(&self.shared) }
    }

    /// The last connection error, in words (`None` before the first).
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().last_error.clone()
    }

    /// Waits until every queued event is acknowledged, up to `timeout`.
    /// Returns whether everything was delivered.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            if s.queue.is_empty() && s.inflight.is_empty() && !s.retained_dirty() {
                return true;
            }
            let now = Instant::now();
            // A broker that refused the credentials will not take them in
            // the next seconds either.
            if now >= deadline || (s.refused && !s.connected) {
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
            let why = self.last_error().map(|e| format!(" (last error: {e})")).unwrap_or_default();
            eprintln!(
                "tern-device: mqtt: {} event(s) not delivered to {}:{} before exit{why}",
                stats.queued, self.target.host, self.target.port
            );
        }
        if self.settings.log || stats.dropped > 0 || stats.failed > 0 {
            eprintln!(
                "tern-device: mqtt: {} delivered, {} dropped (queue full), {} failed, {} trimmed; \
                 {} connection(s), {} connection error(s)",
                stats.delivered, stats.dropped, stats.failed, stats.trimmed, stats.connects, stats.connection_errors
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

    /// `value` fitted to the packet limit on `topic`, counting a trim.
    fn fit(&self, value: Value, topic: &str) -> Option<Vec<u8>> {
        let fitted = fit_json(value, payload_room(self.settings.max_packet, topic));
        let mut s = self.shared.lock();
        match fitted {
            Some((bytes, trimmed)) => {
                s.stats.trimmed += u64::from(trimmed);
                Some(bytes)
            }
            None => {
                s.stats.failed += 1;
                None
            }
        }
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
            Event::Label { label, confidence, frame, seq, region, .. } => {
                let mut state = serde_json::json!({
                    "label": label, "confidence": confidence, "frame": frame, "seq": seq, "ts_ms": now_ms(),
                });
                if let (Some(r), Value::Object(o)) = (region, &mut state) {
                    o.insert("region".into(), Value::from(r.as_str()));
                }
                if let Some(p) = self.fit(state, &self.target.state_topic_of(region.as_deref())) {
                    self.set_state_of(region.as_deref(), p);
                }
            }
            Event::Started { labels, .. } => self.advertise(labels),
            Event::Reload { ok: true, .. } => self.relabelled = true,
            _ => {}
        }
        let topic = self.target.events_topic();
        let payload = if let Event::Stats { .. } = event {
            let mut value = serde_json::to_value(event)?;
            if let Value::Object(obj) = &mut value {
                let s = self.stats();
                obj.insert(
                    "mqtt".into(),
                    serde_json::json!({
                        "delivered": s.delivered, "dropped": s.dropped, "failed": s.failed, "trimmed": s.trimmed,
                        "queued": s.queued, "connects": s.connects, "connection_errors": s.connection_errors,
                    }),
                );
            }
            self.fit(value, &topic)
        } else {
            // The very line printed on stdout whenever it fits.
            let line = event.to_json();
            if line.len() <= payload_room(self.settings.max_packet, &topic) {
                Some(line.into_bytes())
            } else {
                self.fit(serde_json::from_str(&line)?, &topic)
            }
        };
        if let Some(p) = payload {
            self.publish_event(p);
        }
        Ok(())
    }

    fn frame(&mut self, view: &FrameView<'_>) -> Result<()> {
        if std::mem::take(&mut self.relabelled) {
            self.advertise(view.labels);
        }
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
        } else if s.subscribe_dirty {
            s.subscribe_dirty = false;
            if let Some(topic) = s.ha_status.clone() {
                if client.try_subscribe(topic, QoS::AtMostOnce).is_err() {
                    s.subscribe_dirty = true;
                    let wait = shared.wake.wait_timeout(s, Duration::from_millis(20));
                    s = wait.map_or_else(|p| p.into_inner().0, |r| r.0);
                }
            }
            continue;
        } else if let Some((topic, payload)) = s.take_dirty() {
            (topic.clone(), true, Kind::Retained(topic), payload)
        } else if let Some(q) = s.queue.pop_front() {
            let p = q.payload.clone();
            (target.events_topic(), false, Kind::Event(q), p)
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
                    Kind::Event(q) => s.queue.push_front(q),
                    Kind::Retained(topic) => s.mark_dirty(&topic),
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
    // Errors in a row without a good connection between them.
    let mut failures = 0u64;
    let mut connected_at: Option<Instant> = None;
    let mut acked = false;
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
                s.refused = false;
                s.stats.connected = true;
                s.stats.connects += 1;
                s.status_dirty = true;
                s.resend_retained();
                s.subscribe_dirty = s.ha_status.is_some();
                if failures > 0 {
                    eprintln!("tern-device: mqtt: connected to {}:{} again", target.host, target.port);
                }
                connected_at = Some(Instant::now());
                acked = false;
            }
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p))))
                if s.ha_status.as_deref() == Some(p.topic.as_str()) && p.payload.as_ref() == b"online" =>
            {
                // Home Assistant (re)started: it wants the configs again.
                s.resend_retained();
            }
            Ok(Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid)))) if pkid != 0 => {
                if let Some(f) = s.inflight.iter_mut().find(|f| f.pkid.is_none()) {
                    f.pkid = Some(pkid);
                }
            }
            Ok(Ok(MqttEvent::Incoming(Packet::PubAck(rumqttc::PubAck { pkid, .. }))))
            | Ok(Ok(MqttEvent::Incoming(Packet::PubComp(rumqttc::PubComp { pkid, .. })))) => {
                acked = true;
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
                s.stats.connection_errors += 1;
                s.refused = matches!(e, ConnectionError::ConnectionRefused(_));
                let what = describe(&e);
                s.last_error = Some(what.clone());
                // A connection that delivered (or stayed up) was good: the
                // back-off starts again. One that dropped at once was not,
                // and the delay keeps growing, so that a broker that takes
                // the connection and drops it is not hammered.
                if acked || connected_at.is_some_and(|t| t.elapsed() >= STABLE) {
                    delay = settings.backoff_initial;
                    failures = 0;
                }
                connected_at = None;
                acked = false;
                failures += 1;
                requeue_inflight(&mut s, settings.queue, target);
                if s.stop {
                    return;
                }
                if was_connected || failures.is_power_of_two() {
                    eprintln!(
                        "tern-device: mqtt: {}:{}: {what}; {} event(s) queued, retrying in {:.1} s",
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

/// After a lost connection: everything not acknowledged goes back to the
/// front of the queue, in order (state and status are sent again anyway).
/// The oldest unacknowledged event takes the blame — a broker that drops
/// the connection over a message drops it at the first one it will not
/// take — and is given up after [`MAX_TRIES`].
fn requeue_inflight(s: &mut State, bound: usize, target: &MqttTarget) {
    let lost: Vec<Inflight> = s.inflight.drain(..).collect();
    let mut blamed = false;
    let mut back = Vec::with_capacity(lost.len());
    for f in lost {
        if let Kind::Event(mut q) = f.kind {
            if !blamed {
                blamed = true;
                q.tries += 1;
                if q.tries >= MAX_TRIES {
                    s.stats.failed += 1;
                    eprintln!(
                        "tern-device: mqtt: {}:{}: an event ({} bytes) was unacknowledged on {MAX_TRIES} \
                         connections that dropped; given up",
                        target.host,
                        target.port,
                        q.payload.len()
                    );
                    continue;
                }
            }
            back.push(q);
        }
    }
    for q in back.into_iter().rev() {
        s.queue.push_front(q);
    }
    while s.queue.len() > bound {
        s.queue.pop_front();
        s.stats.dropped += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = MqttTarget::parse("mqtt://broker.local:1884/tern/kitchen-pi").unwrap();
        assert_eq!(
            t,
            MqttTarget { host: "broker.local".into(), port: 1884, base: "tern/kitchen-pi".into(), tls: false }
        );
        assert_eq!(t.state_topic(), "tern/kitchen-pi/state");
        let t = MqttTarget::parse("mqtt://10.0.0.2/tern/x/").unwrap();
        assert_eq!((t.port, t.base.as_str()), (1883, "tern/x"));
        let t = MqttTarget::parse("mqtt://[::1]:1999/a").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 1999));
        let t = MqttTarget::parse("mqtts://broker.local/tern/porch").unwrap();
        assert_eq!((t.port, t.tls), (8883, true));
        assert_eq!(MqttTarget::parse("mqtts://h:9999/t").unwrap().port, 9999);
        for bad in ["http://h/t", "mqtt://h", "mqtt://h:x/t", "mqtt:///t", "mqtt://h/t/#", "mqtt://h/a//b", "ssl://h/t"]
        {
            assert!(MqttTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_repeating_it() {
        for url in ["mqtt://tern:s3cret@h/t", "mqtts://tern:s3cret@h:8883/t"] {
            let e = format!("{:#}", MqttTarget::parse(url).unwrap_err());
            assert!(e.contains("--mqtt-password-file") && e.contains(ENV_PASSWORD), "{e}");
            assert!(!e.contains("s3cret"), "the error repeats the password: {e}");
        }
        let e = format!("{:#}", MqttTarget::parse("mqtt://tern@h/t").unwrap_err());
        assert!(e.contains("--mqtt-username"), "{e}");
    }

    #[test]
    fn credentials_come_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let none = |_: &str| None;
        let env = |k: &str| match k {
            ENV_USERNAME => Some("env-user".to_owned()),
            ENV_PASSWORD => Some("from-env".to_owned()),
            _ => None,
        };
        assert_eq!(Credentials::resolve(None, None, none).unwrap(), None);
        let c = Credentials::resolve(Some("cli-user".into()), Some(&file), none).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_ref().map(Password::expose)), ("cli-user", Some("from-file")));
        let c = Credentials::resolve(None, None, env).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_ref().map(Password::expose)), ("env-user", Some("from-env")));
        // The command line's user name wins over the environment's.
        let c = Credentials::resolve(Some("cli-user".into()), None, env).unwrap().unwrap();
        assert_eq!(c.username, "cli-user");
        // A user name alone is fine.
        let c = Credentials::resolve(Some("u".into()), None, none).unwrap().unwrap();
        assert_eq!(c.password, None);
        // Two passwords, a password without a user, an empty or missing file.
        let e = Credentials::resolve(None, Some(&file), env).unwrap_err();
        assert!(format!("{e:#}").contains("given twice"), "{e:#}");
        let e = Credentials::resolve(None, Some(&file), none).unwrap_err();
        assert!(format!("{e:#}").contains("--mqtt-username"), "{e:#}");
        std::fs::write(&file, "\nsecond line\n").unwrap();
        let e = Credentials::resolve(Some("u".into()), Some(&file), none).unwrap_err();
        assert!(format!("{e:#}").contains("empty"), "{e:#}");
        let missing = dir.path().join("missing");
        let e = Credentials::resolve(Some("u".into()), Some(&missing), none).unwrap_err();
        assert!(format!("{e:#}").contains(&missing.display().to_string()), "{e:#}");
        // Debug never shows the password.
        let c = Credentials::resolve(None, None, env).unwrap().unwrap();
        assert!(!format!("{c:?}").contains("from-env"));
    }

    #[test]
    fn client_ids_are_unique_and_short() {
        let a = default_client_id("site-a/camera");
        let b = default_client_id("site-b/camera");
        assert_ne!(a, b);
        assert!(a.starts_with("tern-camera-"), "{a}");
        let long = default_client_id("tern/a-very-long-device-name-indeed");
        assert!(long.len() <= 23, "{long}");
        assert!(default_client_id("tern/#weird$").starts_with("tern-weird-"));
    }

    #[test]
    fn long_label_lists_are_trimmed_with_their_count() {
        let labels: Vec<String> = (0..1000).map(|i| format!("label number {i:04} with a long name")).collect();
        let v = serde_json::json!({"event": "started", "ts_ms": 1, "bundle": "b.onnx", "labels": labels});
        let (bytes, trimmed) = fit_json(v.clone(), 10_000).unwrap();
        assert!(trimmed && bytes.len() <= 10_000, "{}", bytes.len());
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back["labels_total"], 1000);
        assert_eq!(back["labels_truncated"], true);
        assert_eq!(back["bundle"], "b.onnx");
        let kept = back["labels"].as_array().unwrap();
        assert!(kept.len() > 200 && kept.len() < 1000, "{}", kept.len());
        assert_eq!(kept[7], "label number 0007 with a long name");
        // The largest prefix: one more label would not fit.
        let mut more = back.clone();
        more["labels"].as_array_mut().unwrap().push(Value::from(labels[kept.len()].clone()));
        assert!(serde_json::to_vec(&more).unwrap().len() > 10_000);
        // Small enough: untouched.
        let (bytes, trimmed) = fit_json(v.clone(), 1 << 20).unwrap();
        assert!(!trimmed);
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), v);
    }

    #[test]
    fn long_strings_are_shortened_and_nothing_fits_in_nothing() {
        let detail = "é".repeat(5000);
        let v = serde_json::json!({"event": "reload", "ts_ms": 5, "ok": false, "detail": detail});
        let (bytes, trimmed) = fit_json(v.clone(), 1000).unwrap();
        assert!(trimmed && bytes.len() <= 1000);
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (back["event"].as_str(), back["truncated"].as_bool(), back["ok"].as_bool()),
            (Some("reload"), Some(true), Some(false))
        );
        assert!(back["detail"].as_str().unwrap().ends_with('…'));
        assert!(fit_json(v, 10).is_none());
    }

    #[test]
    fn payload_room_leaves_space_for_the_header() {
        // 1 + 4 (fixed header) + 2 + topic + 2 (packet id).
        assert_eq!(payload_room(1000, "tern/x/events"), 1000 - 9 - 13);
        assert_eq!(payload_room(5, "t"), 0);
    }

    #[test]
    fn certificate_files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let e = tls_config(&TlsFiles { ca: Some(ca.clone()), ..TlsFiles::default() }).unwrap_err();
        assert!(format!("{e:#}").contains(&ca.display().to_string()), "{e:#}");
        let e = tls_config(&TlsFiles { cert: Some(ca.clone()), ..TlsFiles::default() }).unwrap_err();
        assert!(format!("{e:#}").contains("--mqtt-key"), "{e:#}");
    }
}
