//! Reading, validating and writing bundles.
//!
//! A bundle is an ordinary ONNX file. Its `metadata_props` hold the JSON
//! [`Manifest`] under [`MANIFEST_KEY`]; the manifest's `graph_sha256` is the
//! sha256 of the `graph` field's bytes exactly as stored, so any change to
//! the graph or its weights is caught on load.
//!
//! Loading never decodes the weights: the top-level protobuf fields are
//! scanned (every length checked against the bytes that remain), the small
//! metadata entries and the graph's input/output declarations are decoded,
//! and the graph bytes are hashed.

use std::path::Path;

use prost::Message;

use crate::error::FormatError;
use crate::manifest::Manifest;
use crate::onnx;
use crate::files::{sha256_hex, write_atomic};

/// The `metadata_props` key that holds the manifest.
pub const MANIFEST_KEY: &str = "tern.manifest";
/// Largest bundle accepted (1 GiB).
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;
/// Largest manifest accepted (16 MiB).
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

// Field numbers of onnx.proto.
const MODEL_GRAPH: u32 = 7;
const MODEL_METADATA_PROPS: u32 = 14;
const GRAPH_INPUT: u32 = 11;
const GRAPH_OUTPUT: u32 = 12;

/// A loaded, validated bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The manifest.
    pub manifest: Manifest,
    /// The whole ONNX file, for the runtime.
    pub onnx: Vec<u8>,
}

impl Bundle {
    /// Reads and validates the bundle at `path`, a regular file of at most
    /// [`MAX_BUNDLE_BYTES`].
    pub fn read(path: &Path) -> Result<Bundle, FormatError> {
        let bytes = crate::files::read_regular(path, MAX_BUNDLE_BYTES, "bundle")?;
        Bundle::from_bytes(bytes)
    }

    /// Validates an ONNX file already in memory.
    pub fn from_bytes(onnx: Vec<u8>) -> Result<Bundle, FormatError> {
        if onnx.is_empty() {
            return Err(FormatError::Malformed { detail: "the file is empty".into() });
        }
        let mut graph: Option<&[u8]> = None;
        let mut manifest_json: Option<String> = None;
        for field in Fields::new(&onnx) {
            let field = field?;
            match (field.number, field.payload) {
                (MODEL_GRAPH, Payload::Bytes(b)) => graph = Some(b),
                (MODEL_METADATA_PROPS, Payload::Bytes(b)) => {
                    let entry = onnx::StringStringEntryProto::decode(b)
                        .map_err(|e| FormatError::Malformed { detail: format!("metadata entry: {e}") })?;
                    if entry.key.as_deref() == Some(MANIFEST_KEY) {
                        let value = entry.value.unwrap_or_default();
                        if value.len() > MAX_MANIFEST_BYTES {
                            return Err(FormatError::TooLarge {
                                what: "manifest".into(),
                                size: value.len() as u64,
                                limit: MAX_MANIFEST_BYTES as u64,
                            });
                        }
                        manifest_json = Some(value);
                    }
                }
                _ => {}
            }
        }
        let graph = graph.ok_or_else(|| FormatError::Malformed { detail: "no graph".into() })?;
        let json = manifest_json.ok_or(FormatError::MissingManifest { key: MANIFEST_KEY })?;
        let manifest: Manifest = serde_json::from_str(&json)?;
        manifest.validate()?;
        let found = sha256_hex(graph);
        if found != manifest.graph_sha256 {
            return Err(FormatError::ChecksumMismatch { expected: manifest.graph_sha256.clone(), found });
        }
        check_graph_io(graph, &manifest)?;
        Ok(Bundle { manifest, onnx })
    }
}

/// Checks the graph's declared input and outputs against the manifest.
fn check_graph_io(graph: &[u8], m: &Manifest) -> Result<(), FormatError> {
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    for field in Fields::new(graph) {
        let field = field?;
        if let Payload::Bytes(b) = field.payload {
            let list = match field.number {
                GRAPH_INPUT => &mut inputs,
                GRAPH_OUTPUT => &mut outputs,
                _ => continue,
            };
            let vi = onnx::ValueInfoProto::decode(b)
                .map_err(|e| FormatError::Malformed { detail: format!("graph input/output: {e}") })?;
            list.push((vi.name.clone().unwrap_or_default(), dims(&vi)));
        }
    }
    let find = |list: &[(String, Option<Vec<i64>>)], name: &str, what: &str| {
        list.iter().find(|(n, _)| n == name).map(|(_, d)| d.clone()).ok_or_else(|| FormatError::Invalid {
            what: "graph".into(),
            detail: format!("the manifest names {what} `{name}`, which the graph does not declare"),
        })
    };
    let want_in: Vec<i64> = m.preprocessing.input_shape().iter().map(|&d| d as i64).collect();
    if let Some(d) = find(&inputs, &m.io.input, "input")? {
        if d != want_in {
            return Err(FormatError::Invalid {
                what: "graph input".into(),
                detail: format!("shape {d:?}, but the preprocessing gives {want_in:?}"),
            });
        }
    }
    for name in [&m.io.logits, &m.io.probabilities] {
        if let Some(d) = find(&outputs, name, "output")? {
            if d.last().copied() != Some(m.io.output_width as i64) {
                return Err(FormatError::LabelCountMismatch {
                    labels: m.labels.len(),
                    output_width: d.last().copied().unwrap_or(0).max(0) as usize,
                    kind: m.io.output_kind,
                });
            }
        }
    }
    Ok(())
}

/// Static dimensions of a tensor value, `None` if any is symbolic.
fn dims(vi: &onnx::ValueInfoProto) -> Option<Vec<i64>> {
    use onnx::tensor_shape_proto::dimension::Value;
    use onnx::type_proto::Value as TypeValue;
    let TypeValue::TensorType(t) = vi.r#type.as_ref()?.value.as_ref()? else { return None };
    t.shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Value::DimValue(v)) => Some(v),
            _ => None,
        })
        .collect()
}

/// Encodes a bundle: fills in `manifest.graph_sha256` and returns the ONNX
/// file bytes together with the completed manifest.
pub fn encode(graph: onnx::GraphProto, mut manifest: Manifest) -> Result<(Vec<u8>, Manifest), FormatError> {
    manifest.graph_sha256 = sha256_hex(&graph.encode_to_vec());
    manifest.validate()?;
    let model = onnx::ModelProto {
        ir_version: Some(crate::export::IR_VERSION),
        opset_import: vec![onnx::OperatorSetIdProto { domain: Some(String::new()), version: Some(crate::export::OPSET) }],
        producer_name: Some("tern".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!("Tern bundle: {} labels, {}", manifest.labels.len(), manifest.architecture.backbone)),
        graph: Some(graph),
        metadata_props: vec![onnx::StringStringEntryProto {
            key: Some(MANIFEST_KEY.into()),
            value: Some(serde_json::to_string_pretty(&manifest)?),
        }],
        ..Default::default()
    };
    Ok((model.encode_to_vec(), manifest))
}

/// Encodes and writes a bundle atomically, then reads it back to check it.
pub fn write(path: &Path, graph: onnx::GraphProto, manifest: Manifest) -> Result<Manifest, FormatError> {
    let (bytes, manifest) = encode(graph, manifest)?;
    Bundle::from_bytes(bytes.clone())?;
    write_atomic(path, &bytes)?;
    Ok(manifest)
}

/// A top-level protobuf field.
pub(crate) struct Field<'a> {
    pub(crate) number: u32,
    pub(crate) payload: Payload<'a>,
}

pub(crate) enum Payload<'a> {
    Varint,
    Fixed,
    Bytes(&'a [u8]),
}

/// Iterates over the fields of one protobuf message without decoding
/// nested messages. Stops with an error at the first field that runs past
/// the end of the buffer (a truncated file).
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0, failed: false }
    }

    fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.malformed("ends inside a varint (truncated?)"));
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.malformed("varint longer than 10 bytes"))
    }

    fn malformed(&self, what: &str) -> FormatError {
        FormatError::Malformed { detail: format!("at byte {} of {}: {what}", self.pos, self.buf.len()) }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], FormatError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.malformed(&format!("a field of {n} bytes, but only {remaining} remain (truncated file?)")));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn next_field(&mut self) -> Result<Field<'a>, FormatError> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| self.malformed("field number out of range"))?;
        if number == 0 {
            return Err(self.malformed("field number 0 (not a protobuf message)"));
        }
        let payload = match key & 7 {
            0 => {
                self.varint()?;
                Payload::Varint
            }
            1 => {
                self.take(8)?;
                Payload::Fixed
            }
            2 => {
                let n = self.varint()?;
                Payload::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Payload::Fixed
            }
            w => return Err(self.malformed(&format!("wire type {w} (not an ONNX file)"))),
        };
        Ok(Field { number, payload })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let r = self.next_field();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Backbone;
    use crate::export::{build_graph, default_io, HeadSpec};
    use crate::manifest::{ArchitectureInfo, Precision, Provenance, FORMAT_VERSION};
    use crate::weights::TensorData;
    use std::collections::HashMap;

    /// A complete EfficientNet-Lite0 with a 3-class head and made-up weights.
    fn tiny_bundle() -> (Vec<u8>, Manifest) {
        let backbone = Backbone::EfficientnetLite0;
        let spec = backbone.spec().drop_blocks(15).unwrap();
        let head = HeadSpec::trainable(spec.feature_width(), &[], 3, crate::manifest::OutputKind::Softmax);
        let mut w: HashMap<String, TensorData> = HashMap::new();
        for c in spec.convs() {
            let shape = c.weight_shape().to_vec();
            let n = shape.iter().product();
            w.insert(format!("{}.weight", c.conv), TensorData::new(shape, vec![0.01; n]).unwrap());
            for (s, v) in crate::arch::BN_SUFFIXES.iter().zip([1.0, 0.0, 0.0, 1.0]) {
                w.insert(format!("{}.{s}", c.bn), TensorData::new(vec![c.cout], vec![v; c.cout]).unwrap());
            }
        }
        w.insert("head.out.weight".into(), TensorData::new(vec![3, 16], vec![0.1; 48]).unwrap());
        w.insert("head.out.bias".into(), TensorData::new(vec![3], vec![0.0, 1.0, 2.0]).unwrap());
        let pre = backbone.preprocessing();
        let io = default_io(&head);
        let graph = build_graph(&spec, &head, &w, &pre, &io).unwrap();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            labels: vec!["a".into(), "b c".into(), "ünï".into()],
            preprocessing: pre,
            io,
            precision: Precision::F32,
            quantization: None,
            metrics: None,
            architecture: ArchitectureInfo { backbone: backbone.name().into(), drop_blocks: 15, hidden: vec![] },
            provenance: Provenance {
                created_by: "test".into(),
                backbone_weights_sha256: "0".repeat(64),
                backbone_weights_source: "test".into(),
                training: None,
            },
            graph_sha256: String::new(),
        };
        encode(graph, manifest).unwrap()
    }

    #[test]
    fn round_trip() {
        let (bytes, manifest) = tiny_bundle();
        let b = Bundle::from_bytes(bytes).unwrap();
        assert_eq!(b.manifest, manifest);
        assert_eq!(b.manifest.labels[2], "ünï");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (bytes, _) = tiny_bundle();
        // Every prefix of the file must be refused without panicking.
        for cut in (0..bytes.len()).step_by(997).chain([bytes.len() - 1]) {
            assert!(Bundle::from_bytes(bytes[..cut].to_vec()).is_err(), "prefix of {cut} bytes accepted");
        }
    }

    #[test]
    fn a_flipped_weight_byte_fails_the_checksum() {
        let (mut bytes, _) = tiny_bundle();
        // Somewhere in the middle: inside the initializers.
        let i = bytes.len() / 2;
        bytes[i] ^= 0x55;
        let err = Bundle::from_bytes(bytes).unwrap_err();
        assert!(matches!(err, FormatError::ChecksumMismatch { .. } | FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn label_count_is_checked_against_the_graph() {
        let (bytes, manifest) = tiny_bundle();
        let model = onnx::ModelProto::decode(bytes.as_slice()).unwrap();
        let mut m = manifest.clone();
        m.labels.push("extra".into());
        m.io.output_width = 4;
        let (bytes, _) = encode(model.graph.unwrap(), m).unwrap();
        let err = Bundle::from_bytes(bytes).unwrap_err();
        assert!(matches!(err, FormatError::LabelCountMismatch { labels: 4, output_width: 3, .. }), "{err}");
    }

    #[test]
    fn garbage_and_foreign_onnx_are_refused() {
        assert!(matches!(Bundle::from_bytes(vec![]), Err(FormatError::Malformed { .. })));
        assert!(Bundle::from_bytes(b"\x89PNG\r\n\x1a\n not onnx".to_vec()).is_err());
        let (bytes, _) = tiny_bundle();
        let mut model = onnx::ModelProto::decode(bytes.as_slice()).unwrap();
        model.metadata_props.clear();
        let err = Bundle::from_bytes(model.encode_to_vec()).unwrap_err();
        assert!(matches!(err, FormatError::MissingManifest { .. }), "{err}");
    }
}
