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
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        labels: labels.iter().map(|s| s.to_string()).collect(),
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
    };
    tern_model_format::bundle::write(path, graph, manifest)
}

pub fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<onnx::AttributeProto>) -> onnx::NodeProto {
    onnx::NodeProto {
        name: Some(output.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: Some(name.into()),
        r#type: Some(onnx::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: Some(name.into()),
        r#type: Some(onnx::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn i64_tensor(name: &str, v: &[i64]) -> onnx::TensorProto {
    onnx::TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(onnx::tensor_proto::DataType::Int64 as i32),
        raw_data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}

pub fn tensor(name: &str, dims: &[i64], data: &[f32]) -> onnx::TensorProto {
    onnx::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(onnx::tensor_proto::DataType::Float as i32),
        raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn value_info(name: &str, shape: &[i64]) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{dimension::Value, Dimension};
    use onnx::type_proto::{Tensor, Value as TypeValue};
    onnx::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(onnx::TypeProto {
            value: Some(TypeValue::TensorType(Tensor {
                elem_type: Some(onnx::tensor_proto::DataType::Float as i32),
                shape: Some(onnx::TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
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

/// A mosquitto broker on a loopback port, stopped on drop.
pub struct Broker {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
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

impl Broker {
    /// Starts mosquitto on a free loopback port.
    pub fn start(bin: &Path) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        // Started as root, mosquitto drops to the `mosquitto` user, which
        // must still be able to save its sessions here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut b = Broker { port, dir, child: None };
        b.restart(bin);
        b
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self, bin: &Path) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 log_dest stderr\n",
                self.port,
                self.dir.path().display()
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on port {} within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
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
