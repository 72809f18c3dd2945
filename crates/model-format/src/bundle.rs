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
//! and the graph bytes are hashed. A file with two graphs, two manifests or
//! two signatures is refused: protobuf readers merge repeated message
//! fields, so a second graph would change what runs without changing the
//! graph that was hashed.
//!
//! A bundle may also carry a signature under
//! [`crate::signature::SIGNATURE_KEY`]; see [`crate::signature`] for what it
//! covers and how it is checked.

use std::path::Path;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::FormatError;
use crate::files::{hex, sha256_hex, write_atomic};
use crate::manifest::Manifest;
use crate::onnx;
use crate::signature::{Signature, MAX_SIGNATURE_BYTES, SIGNATURE_KEY};

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
    /// The whole ONNX file, for the runtime. [`crate::signature::verify`]
    /// checks these bytes as they were read: the digests are taken on load.
    pub onnx: Vec<u8>,
    /// What a signature covers, as read.
    digests: Digests,
    /// The signature entry, if the bundle has one (parsed, not verified).
    signature: Option<Signature>,
}

/// The two sha256 digests a signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Digests {
    /// sha256 of the graph field's bytes as stored (the bytes of
    /// `manifest.graph_sha256`).
    pub graph: [u8; 32],
    /// sha256 of every other top-level field, each as stored (tag, length
    /// and value), in file order, leaving out the signature entry: the
    /// manifest entry, opsets, IR version, producer, any other metadata.
    pub rest: [u8; 32],
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
        let mut signature_json: Option<String> = None;
        let mut rest = Sha256::new();
        for field in Fields::new(&onnx) {
            let field = field?;
            let entry = match (field.number, field.payload) {
                (MODEL_GRAPH, Payload::Bytes(b)) => {
                    if graph.replace(b).is_some() {
                        return Err(FormatError::Malformed { detail: "two graphs (a bundle has one)".into() });
                    }
                    continue;
                }
                (MODEL_METADATA_PROPS, Payload::Bytes(b)) => onnx::StringStringEntryProto::decode(b)
                    .map_err(|e| FormatError::Malformed { detail: format!("metadata entry: {e}") })?,
                _ => {
                    rest.update(field.raw);
                    continue;
                }
            };
            let (slot, limit) = match entry.key.as_deref() {
                Some(MANIFEST_KEY) => (&mut manifest_json, MAX_MANIFEST_BYTES),
                // The one field a signature does not cover: itself.
                Some(SIGNATURE_KEY) => (&mut signature_json, MAX_SIGNATURE_BYTES),
                _ => {
                    rest.update(field.raw);
                    continue;
                }
            };
            let key = entry.key.unwrap_or_default();
            let value = entry.value.unwrap_or_default();
            if value.len() > limit {
                return Err(FormatError::TooLarge { what: format!("`{key}`"), size: value.len() as u64, limit: limit as u64 });
            }
            if slot.replace(value).is_some() {
                return Err(FormatError::Malformed { detail: format!("two `{key}` metadata entries (a bundle has one)") });
            }
            if key != SIGNATURE_KEY {
                rest.update(field.raw);
            }
        }
        let graph = graph.ok_or_else(|| FormatError::Malformed { detail: "no graph".into() })?;
        let json = manifest_json.ok_or(FormatError::MissingManifest { key: MANIFEST_KEY })?;
        let manifest: Manifest = serde_json::from_str(&json)?;
        manifest.validate()?;
        let graph_digest: [u8; 32] = Sha256::digest(graph).into();
        let found = hex(&graph_digest);
        if found != manifest.graph_sha256 {
            return Err(FormatError::ChecksumMismatch { expected: manifest.graph_sha256.clone(), found });
        }
        check_graph_io(graph, &manifest)?;
        let signature = signature_json.as_deref().map(Signature::from_json).transpose()?;
        let digests = Digests { graph: graph_digest, rest: rest.finalize().into() };
        Ok(Bundle { manifest, onnx, digests, signature })
    }

    /// The bundle's signature entry, if it has one. It is parsed, not
    /// verified: [`crate::signature::verify`] checks it.
    pub fn signature(&self) -> Option<&Signature> {
        self.signature.as_ref()
    }

    /// A bundle of `onnx` and `manifest` as given, unchecked: for the unit
    /// tests of the checks that run on crafted graphs.
    #[cfg(test)]
    pub(crate) fn unchecked(manifest: Manifest, onnx: Vec<u8>) -> Bundle {
        Bundle { manifest, onnx, digests: Digests { graph: [0; 32], rest: [0; 32] }, signature: None }
    }

    /// The digests a signature covers, as taken on load.
    pub(crate) fn digests(&self) -> &Digests {
        &self.digests
    }

    /// The file with its signature entry, if any, left out: every other
    /// top-level field exactly as stored, in order.
    pub(crate) fn without_signature(&self) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::with_capacity(self.onnx.len());
        for field in Fields::new(&self.onnx) {
            let field = field?;
            if let (MODEL_METADATA_PROPS, Payload::Bytes(b)) = (field.number, field.payload) {
                let entry = onnx::StringStringEntryProto::decode(b)
                    .map_err(|e| FormatError::Malformed { detail: format!("metadata entry: {e}") })?;
                if entry.key.as_deref() == Some(SIGNATURE_KEY) {
                    continue;
                }
            }
            out.extend_from_slice(field.raw);
        }
        Ok(out)
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
    /// The whole field as stored: tag, length (if any) and value.
    pub(crate) raw: &'a [u8],
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
        let start = self.pos;
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
        Ok(Field { number, payload, raw: &self.buf[start..self.pos] })
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

    mod signed {
        use super::*;
        use crate::signature::{verify, verify_claimed, PublicKey, SecretKey};

        fn key(n: u8) -> SecretKey {
            SecretKey::from_seed(&[n; 32])
        }

        fn signed(k: &SecretKey) -> Bundle {
            let (bytes, _) = tiny_bundle();
            let b = Bundle::from_bytes(bytes).unwrap();
            assert!(b.signature().is_none());
            Bundle::from_bytes(k.sign(&b).unwrap()).unwrap()
        }

        /// Re-encodes the model after `edit`, with the manifest's
        /// graph_sha256 recomputed, as an attacker would; the signature
        /// entry is carried over untouched.
        fn tamper(b: &Bundle, edit: impl FnOnce(&mut onnx::ModelProto, &mut Manifest)) -> Bundle {
            let mut model = onnx::ModelProto::decode(b.onnx.as_slice()).unwrap();
            let mut m = b.manifest.clone();
            edit(&mut model, &mut m);
            m.graph_sha256 = sha256_hex(&model.graph.as_ref().unwrap().encode_to_vec());
            for e in &mut model.metadata_props {
                if e.key.as_deref() == Some(MANIFEST_KEY) {
                    e.value = Some(serde_json::to_string_pretty(&m).unwrap());
                }
            }
            // The checksum alone is fooled: the file loads.
            Bundle::from_bytes(model.encode_to_vec()).unwrap()
        }

        #[test]
        fn the_signing_key_is_accepted_others_are_not() {
            let (a, b) = (key(1), key(2));
            let bundle = signed(&a);
            let trusted = [b.public_key(), a.public_key().with_comment("release")];
            let by = verify(&bundle, &trusted).unwrap();
            assert_eq!(by.comment(), "release");
            assert_eq!(by.key_id(), bundle.signature().unwrap().key_id);
            assert_eq!(verify_claimed(&bundle).unwrap(), a.public_key());
            let err = verify(&bundle, &[b.public_key()]).unwrap_err();
            assert!(matches!(&err, FormatError::UnknownSigner { key_id } if *key_id == a.public_key().key_id()), "{err}");
            let err = verify(&bundle, &[]).unwrap_err();
            assert!(matches!(err, FormatError::UnknownSigner { .. }), "{err}");
        }

        #[test]
        fn an_unsigned_bundle_is_refused() {
            let (bytes, _) = tiny_bundle();
            let b = Bundle::from_bytes(bytes).unwrap();
            let err = verify(&b, &[key(1).public_key()]).unwrap_err();
            assert!(matches!(err, FormatError::Unsigned), "{err}");
        }

        #[test]
        fn signing_changes_nothing_but_the_signature_entry() {
            let (bytes, manifest) = tiny_bundle();
            let b = signed(&key(1));
            assert_eq!(b.manifest, manifest);
            assert_eq!(b.onnx[..bytes.len()], bytes[..], "the original bytes are kept as a prefix");
            // Signing again replaces the entry: one signature, the new key's.
            let again = Bundle::from_bytes(key(2).sign(&b).unwrap()).unwrap();
            assert_eq!(again.onnx.len(), b.onnx.len());
            verify(&again, &[key(2).public_key()]).unwrap();
            let model = onnx::ModelProto::decode(again.onnx.as_slice()).unwrap();
            assert_eq!(model.metadata_props.len(), 2);
        }

        #[test]
        fn a_changed_weight_with_a_recomputed_checksum_is_refused() {
            let a = key(1);
            let b = signed(&a);
            let evil = tamper(&b, |model, _| {
                let g = model.graph.as_mut().unwrap();
                let t = g.initializer.iter_mut().find(|t| t.name.as_deref() == Some("head.out.bias")).unwrap();
                let raw = t.raw_data.as_mut().unwrap();
                raw[0] ^= 0x01;
            });
            assert_ne!(evil.manifest.graph_sha256, b.manifest.graph_sha256);
            let err = verify(&evil, &[a.public_key()]).unwrap_err();
            assert!(matches!(&err, FormatError::BadSignature { key_id } if *key_id == a.public_key().key_id()), "{err}");
            assert!(verify_claimed(&evil).is_err());
        }

        #[test]
        fn changed_labels_or_opsets_are_refused() {
            let a = key(1);
            let b = signed(&a);
            let evil = tamper(&b, |_, m| m.labels.swap(0, 1));
            assert!(matches!(verify(&evil, &[a.public_key()]), Err(FormatError::BadSignature { .. })));
            let evil = tamper(&b, |model, _| model.opset_import[0].version = Some(12));
            assert!(matches!(verify(&evil, &[a.public_key()]), Err(FormatError::BadSignature { .. })));
            // The untouched re-encoding still verifies: the test edits, not prost, break it.
            let same = tamper(&b, |_, _| {});
            verify(&same, &[a.public_key()]).unwrap();
        }

        #[test]
        fn a_signature_claiming_a_trusted_key_is_checked_with_it() {
            let (trusted, attacker) = (key(1), key(2));
            let b = signed(&trusted);
            let evil = tamper(&b, |_, m| m.labels[0] = "evil".into());
            // The attacker signs the altered bundle with their own key, then
            // names the trusted public key in the entry.
            let mut model = onnx::ModelProto::decode(attacker.sign(&evil).unwrap().as_slice()).unwrap();
            let entry = model.metadata_props.iter_mut().find(|e| e.key.as_deref() == Some(SIGNATURE_KEY)).unwrap();
            let mut sig: Signature = serde_json::from_str(entry.value.as_deref().unwrap()).unwrap();
            sig.public_key = crate::files::hex(trusted.public_key().as_bytes());
            sig.key_id = trusted.public_key().key_id();
            entry.value = Some(serde_json::to_string(&sig).unwrap());
            let evil = Bundle::from_bytes(model.encode_to_vec()).unwrap();
            let err = verify(&evil, &[trusted.public_key()]).unwrap_err();
            assert!(matches!(err, FormatError::BadSignature { .. }), "{err}");
        }

        #[test]
        fn a_second_graph_or_signature_is_refused() {
            let b = signed(&key(1));
            let model = onnx::ModelProto::decode(b.onnx.as_slice()).unwrap();
            let graph_only = onnx::ModelProto { graph: model.graph.clone(), ..Default::default() };
            let mut two_graphs = b.onnx.clone();
            two_graphs.extend(graph_only.encode_to_vec());
            let err = Bundle::from_bytes(two_graphs).unwrap_err();
            assert!(err.to_string().contains("two graphs"), "{err}");
            let sig_only = onnx::ModelProto {
                metadata_props: model.metadata_props.iter().filter(|e| e.key.as_deref() == Some(SIGNATURE_KEY)).cloned().collect(),
                ..Default::default()
            };
            let mut two_sigs = b.onnx.clone();
            two_sigs.extend(sig_only.encode_to_vec());
            let err = Bundle::from_bytes(two_sigs).unwrap_err();
            assert!(err.to_string().contains("two `tern.signature`"), "{err}");
        }

        #[test]
        fn a_malformed_or_huge_signature_entry_is_refused() {
            let (bytes, _) = tiny_bundle();
            let with_entry = |value: String| {
                let extra = onnx::ModelProto {
                    metadata_props: vec![onnx::StringStringEntryProto { key: Some(SIGNATURE_KEY.into()), value: Some(value) }],
                    ..Default::default()
                };
                let mut b = bytes.clone();
                b.extend(extra.encode_to_vec());
                Bundle::from_bytes(b)
            };
            assert!(matches!(with_entry("x".repeat(5000)), Err(FormatError::TooLarge { .. })));
            assert!(matches!(with_entry("{".into()), Err(FormatError::Invalid { .. })));
            let b = with_entry(
                r#"{"algorithm":"rsa","key_id":"0","public_key":"00","signature":"00"}"#.into(),
            )
            .unwrap();
            let err = verify(&b, &[key(1).public_key()]).unwrap_err();
            assert!(err.to_string().contains("rsa"), "{err}");
        }

        #[test]
        fn sign_file_signs_in_place() {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.onnx");
            let (bytes, _) = tiny_bundle();
            write_atomic(&p, &bytes).unwrap();
            let k = key(3);
            crate::signature::sign_file(&p, &k).unwrap();
            let b = Bundle::read(&p).unwrap();
            let pk: PublicKey = k.public_key();
            verify(&b, &[pk]).unwrap();
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
        }
    }
}
