//! Fixtures of the loop tests: a tiny real bundle (a colour classifier
//! that tract runs in microseconds), images, and a mosquitto broker.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_model_format::manifest::{
    ArchitectureInfo, Io, Manifest, OutputKind, Precision, Preprocessing, Provenance, ResizeMode, FORMAT_VERSION,
};
use tern_model_format::onnx;
#[allow(unused_imports)] // each test binary uses some of them
pub use tern_model_format::onnx_build::{attr_int, attr_ints, node, tensor_f32 as tensor};
use tern_model_format::onnx_build::{tensor_i64, value_info_f32 as value_info};

/// The three labels of [`color_bundle`], in output order.
pub const COLORS: [&str; 3] = ["red", "green", "blue"];

/// Writes a real bundle that classifies a frame by its dominant colour:
/// global average pool of the RGB input, a 3×3 linear layer (`gain` × the
/// identity) and softmax. `labels` names the outputs (red, green, blue
/// channel, in that order). Input 16×16, no normalisation.
pub fn color_bundle(path: &Path, labels: [&str; 3], gain: f32) {
    let mut w = vec![0f32; 9];
    for i in 0..3 {
        w[i * 3 + i] = gain;
    }
    let pool = node("GlobalAveragePool", &["input"], "pooled", vec![]);
    graph_bundle(path, labels, ResizeMode::Stretch, vec![pool], vec![tensor("w", &[3, 3], &w)]).expect("write colour bundle");
}

/// Writes a bundle with the colour network's manifest (`labels`, a 16×16
/// input brought to size by `resize`) and head (Flatten of `pooled`, Gemm
/// with the 3×3 initializer `w`, Softmax) after `body`, which reads `input`
/// and must leave `pooled` ([1, 3, 1, 1]). The graph is not checked, so
/// crafted graphs can be written.
pub fn graph_bundle(
    path: &Path,
    labels: [&str; 3],
    resize: ResizeMode,
    body: Vec<onnx::NodeProto>,
    initializers: Vec<onnx::TensorProto>,
) -> Result<Manifest, tern_model_format::FormatError> {
    let pre = Preprocessing { width: 16, height: 16, resize, mean: [0.0; 3], std: [1.0; 3] };
    let io = Io {
        input: "input".into(),
        logits: "logits".into(),
        probabilities: "probabilities".into(),
        output_width: 3,
        output_kind: OutputKind::Softmax,
    };
    let mut node_list = body;
    node_list.extend([
        node("Flatten", &["pooled"], "features", vec![attr_int("axis", 1)]),
        node("Gemm", &["features", "w", "b"], "logits", vec![attr_int("transB", 1)]),
        node("Softmax", &["logits"], "probabilities", vec![attr_int("axis", 1)]),
    ]);
    let mut initializer = initializers;
    initializer.push(tensor("b", &[3], &[0.0; 3]));
    let graph = onnx::GraphProto {
        name: Some("colour".into()),
        node: node_list,
        initializer,
        input: vec![value_info("input", &[1, 3, 16, 16])],
        output: vec![value_info("logits", &[1, 3]), value_info("probabilities", &[1, 3])],
        ..Default::default()
    };
    let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
    tern_model_format::bundle::write(path, graph, test_manifest(labels, pre, io))
}

/// The manifest of the hand-made test bundles: `labels`, `pre`, `io`, f32.
fn test_manifest(labels: Vec<String>, pre: Preprocessing, io: Io) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        labels,
        preprocessing: pre,
        io,
        precision: Precision::F32,
        quantization: None,
        metrics: None,
        architecture: ArchitectureInfo { backbone: "test-colour".into(), drop_blocks: 0, hidden: vec![] },
        provenance: Provenance {
            created_by: "tern-device tests".into(),
            backbone_weights_sha256: "0".repeat(64),
            backbone_weights_source: "none: hand-set weights".into(),
            training: None,
        },
        graph_sha256: String::new(),
    }
}

/// A one-dimensional int64 tensor (shapes, axes).
pub fn i64_tensor(name: &str, v: &[i64]) -> onnx::TensorProto {
    tensor_i64(name, &[v.len() as i64], v)
}

/// [`color_bundle`] with any number (>= 3) of outputs: the first three are
/// the red, green and blue channels, the others have zero weights (so a
/// solid colour still wins with `gain` 10: e^10 / (e^10 + n - 1) > 0.9 up
/// to n = 2000).
pub fn labelled_bundle(path: &Path, labels: &[String], gain: f32) {
    let n = labels.len();
    assert!(n >= 3, "at least the three colour outputs");
    let pre = Preprocessing { width: 16, height: 16, resize: ResizeMode::Stretch, mean: [0.0; 3], std: [1.0; 3] };
    let io = Io {
        input: "input".into(),
        logits: "logits".into(),
        probabilities: "probabilities".into(),
        output_width: n,
        output_kind: OutputKind::Softmax,
    };
    let mut w = vec![0f32; n * 3];
    for i in 0..3 {
        w[i * 3 + i] = gain;
    }
    let graph = onnx::GraphProto {
        name: Some("colour".into()),
        node: vec![
            node("GlobalAveragePool", &["input"], "pooled", vec![]),
            node("Flatten", &["pooled"], "features", vec![attr_int("axis", 1)]),
            node("Gemm", &["features", "w", "b"], "logits", vec![attr_int("transB", 1)]),
            node("Softmax", &["logits"], "probabilities", vec![attr_int("axis", 1)]),
        ],
        initializer: vec![tensor("w", &[n as i64, 3], &w), tensor("b", &[n as i64], &vec![0.0; n])],
        input: vec![value_info("input", &[1, 3, 16, 16])],
        output: vec![value_info("logits", &[1, n as i64]), value_info("probabilities", &[1, n as i64])],
        ..Default::default()
    };
    tern_model_format::bundle::write(path, graph, test_manifest(labels.to_vec(), pre, io)).expect("write colour bundle");
}

/// A temp dir holding `colour.onnx`.
pub fn color_bundle_in_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("colour.onnx");
    color_bundle(&path, COLORS, 10.0);
    (dir, path)
}

/// Writes a solid-colour PNG.
pub fn solid_png(path: &Path, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(40, 30, image::Rgb(rgb)).save(path).expect("write png");
}

/// Resident set size of this process, bytes (Linux).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// A mosquitto broker on loopback ports, stopped on drop.
pub struct Broker {
    /// Plain MQTT listener (anonymous, or user name and password with
    /// [`Broker::start_secure`]).
    pub port: u16,
    /// With [`Broker::start_secure`]: TLS listener (user name and password).
    pub tls_port: u16,
    /// With [`Broker::start_secure`]: TLS listener that also requires a
    /// client certificate signed by the test CA.
    pub mtls_port: u16,
    /// With [`Broker::start_secure`]: the certificates made for it.
    pub pki: Option<Pki>,
    dir: tempfile::TempDir,
    conf: String,
    child: Option<Child>,
}

/// A throwaway CA, and a server (localhost, 127.0.0.1) and a client
/// certificate it signed, as PEM files; made with rcgen at test time.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// Writes the PEM files into `dir`.
    pub fn make(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "tern test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = ca.self_signed(&ca_key).expect("CA certificate");
        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(names).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &ca, &ca_key).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key_pem) =
            leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_pem, client_key_pem) = leaf(vec![], "tern-test-client", ExtendedKeyUsagePurpose::ClientAuth);
        let pki = Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, text) in [
            (&pki.ca, ca.pem()),
            (&pki.server_cert, server_pem),
            (&pki.server_key, server_key_pem),
            (&pki.client_cert, client_pem),
            (&pki.client_key, client_key_pem),
        ] {
            std::fs::write(path, text).expect("write PEM");
        }
        pki
    }
}

/// The mosquitto binary; a missing broker fails the test with the command
/// that installs it, unless TERN_SKIP_MQTT=1.
pub fn mosquitto() -> Option<PathBuf> {
    if std::env::var("TERN_SKIP_MQTT").as_deref() == Ok("1") {
        eprintln!("TERN_SKIP_MQTT=1: MQTT test skipped");
        return None;
    }
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    panic!(
        "mosquitto is not installed: run scripts/install-test-deps.sh (apt-get install mosquitto), \
         or set TERN_SKIP_MQTT=1 to skip the MQTT tests"
    );
}

fn free_ports<const N: usize>() -> [u16; N] {
    // All bound at once, so that they differ.
    let listeners: Vec<_> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("addr").port())
}

fn broker_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    // Started as root, mosquitto drops to the `mosquitto` user, which
    // must still be able to save its sessions here and read its files.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod temp dir");
    dir
}

impl Broker {
    /// Starts mosquitto on a free loopback port, anonymous access.
    pub fn start(bin: &Path) -> Broker {
        let dir = broker_dir();
        let [port] = free_ports::<1>();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             log_dest stderr\n",
            dir.path().display()
        );
        let mut b = Broker { port, tls_port: 0, mtls_port: 0, pki: None, dir, conf, child: None };
        b.restart(bin);
        b
    }

    /// Starts mosquitto with three loopback listeners — plain, TLS, and TLS
    /// requiring a client certificate — all asking for a user name and
    /// password from `users` (a password file made by mosquitto_passwd).
    pub fn start_secure(bin: &Path, users: &[(&str, &str)]) -> Broker {
        let dir = broker_dir();
        let [port, tls_port, mtls_port] = free_ports::<3>();
        let pki = Pki::make(dir.path());
        let passwd = dir.path().join("passwd");
        let tool = bin.with_file_name("mosquitto_passwd");
        let tool = if tool.exists() { tool } else { PathBuf::from("/usr/bin/mosquitto_passwd") };
        for (i, (user, password)) in users.iter().enumerate() {
            let mut cmd = Command::new(&tool);
            cmd.arg("-b");
            if i == 0 {
                cmd.arg("-c");
            }
            let st = cmd.arg(&passwd).arg(user).arg(password).status().expect("run mosquitto_passwd");
            assert!(st.success(), "mosquitto_passwd failed: {st}");
        }
        use std::os::unix::fs::PermissionsExt;
        for f in [&passwd, &pki.server_key] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let d = dir.path().display();
        let tls = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        );
        let conf = format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {}\n\
             persistence true\npersistence_location {d}/\nlog_dest stderr\n\
             listener {port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\n{tls}\
             listener {mtls_port} 127.0.0.1\n{tls}require_certificate true\n",
            passwd.display()
        );
        let mut b = Broker { port, tls_port, mtls_port, pki: Some(pki), dir, conf, child: None };
        b.restart(bin);
        b
    }

    /// Starts (again) on the same ports.
    pub fn restart(&mut self, bin: &Path) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(&conf, &self.conf).expect("write mosquitto.conf");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .expect("open mosquitto.log");
        let child =
            Command::new(bin).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [self.port, self.tls_port, self.mtls_port].into_iter().filter(|p| *p != 0) {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "mosquitto did not listen on port {port} within 10 s; its log:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// What mosquitto wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker with SIGTERM, as `systemctl stop` would: it closes
    /// every connection and saves its sessions to disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
