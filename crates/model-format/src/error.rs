//! The one error type of the format crate.

use std::path::PathBuf;

use crate::manifest::OutputKind;

/// Everything that can be wrong with a bundle, a weights file or an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not a valid ONNX protobuf (truncated, corrupt or not ONNX).
    #[error("not a valid ONNX model: {detail}")]
    Malformed {
        /// What was wrong, with the byte offset where known.
        detail: String,
    },
    /// The ONNX file carries no Tern manifest.
    #[error("no Tern manifest: the ONNX metadata has no `{key}` entry (was this file written by tern-host?)")]
    MissingManifest {
        /// The metadata key looked for.
        key: &'static str,
    },
    /// The manifest is not valid JSON for this format version.
    #[error("manifest is not valid: {0}")]
    ManifestJson(#[from] serde_json::Error),
    /// The manifest was written by another format version.
    #[error("manifest format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The labels do not fit the output width.
    #[error("{labels} labels do not match an output of width {output_width} ({kind:?})")]
    LabelCountMismatch {
        /// Labels in the manifest.
        labels: usize,
        /// Width of the output.
        output_width: usize,
        /// Output activation.
        kind: OutputKind,
    },
    /// The graph does not hash to the value recorded in the manifest.
    #[error("graph checksum mismatch: manifest says {expected}, the file has {found} (file modified or corrupt)")]
    ChecksumMismatch {
        /// sha256 in the manifest.
        expected: String,
        /// sha256 of the graph bytes.
        found: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which field or part.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// A file exceeds a size limit.
    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Which part.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A named tensor is missing from a weights file.
    #[error("tensor `{name}` is missing from the weights")]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A named tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Found shape.
        found: Vec<usize>,
    },
    /// A safetensors file could not be read.
    #[error("safetensors: {0}")]
    SafeTensors(String),
    /// An unknown backbone name.
    #[error("unknown backbone `{name}` (known: efficientnet-lite0, mobilenet-v2)")]
    UnknownBackbone {
        /// The name given.
        name: String,
    },
    /// A graph node breaks a rule checked before a runtime sees the graph
    /// (see [`crate::validate`]).
    #[error("graph node `{node}` ({op}): {detail}")]
    BadNode {
        /// The node's name (or its first output, or its position).
        node: String,
        /// Its operator.
        op: String,
        /// What is wrong.
        detail: String,
    },
    /// The graph, or one node of it, exceeds a limit of [`crate::validate`].
    #[error("{what}: {found} {unit}, more than the limit of {limit} {unit}{hint}")]
    OverLimit {
        /// What exceeds the limit, naming the node where there is one.
        what: String,
        /// How much it needs.
        found: u64,
        /// The limit.
        limit: u64,
        /// `nodes`, `bytes`, ...
        unit: &'static str,
        /// How to raise the limit, if it can be raised (starts with `; `).
        hint: &'static str,
    },
    /// A signature was required and the bundle has none.
    #[error("the bundle is not signed, and only bundles signed by a trusted key are accepted")]
    Unsigned,
    /// The bundle is signed by a key that is not among the trusted ones.
    #[error("the bundle is signed by key {key_id}, which is not a trusted key")]
    UnknownSigner {
        /// Id of the key that signed it.
        key_id: String,
    },
    /// The signature does not match the bundle's contents.
    #[error("the signature by key {key_id} does not match the bundle: it was modified after it was signed")]
    BadSignature {
        /// Id of the (trusted) key the signature claims.
        key_id: String,
    },
    /// An image could not be decoded.
    #[error("cannot decode image: {detail}")]
    Image {
        /// What the decoder said.
        detail: String,
    },
}

impl FormatError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io { path: path.into(), source }
    }
}
