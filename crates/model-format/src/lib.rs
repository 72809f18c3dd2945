//! The Tern bundle format, shared by the host (training, export) and the
//! device (inference).
//!
//! # Layout
//!
//! A bundle is one ordinary ONNX file (IR 7, opset 13, standard operators
//! only), so onnxruntime, Netron or any ONNX tool opens it. Its
//! `metadata_props` carry one entry, [`bundle::MANIFEST_KEY`]
//! (`tern.manifest`), whose value is the JSON [`manifest::Manifest`]:
//!
//! | key | meaning |
//! |---|---|
//! | `format_version` | [`FORMAT_VERSION`]; readers refuse others |
//! | `labels` | class names in output order |
//! | `preprocessing` | input size, resize mode, mean/std (RGB, NCHW, `[0,1]` scale) |
//! | `io` | input and output names, output width, softmax or sigmoid |
//! | `precision` | `f32` or `int8` |
//! | `quantization` | scales and zero points, for int8 bundles |
//! | `metrics` | accuracy figures measured when the bundle was made |
//! | `architecture` | backbone, dropped blocks, hidden widths of the head |
//! | `provenance` | tool version, pretrained weights sha256 and source, training settings |
//! | `graph_sha256` | sha256 of the stored `GraphProto` bytes, checked on load |
//!
//! The graph has one input `[1, 3, H, W]` f32 and two outputs, the logits
//! and the probabilities, both `[1, N]`.
//!
//! A signed bundle has a second entry, [`signature::SIGNATURE_KEY`]
//! (`tern.signature`): an ed25519 signature over the graph, the manifest
//! and every other field of the file but itself (see [`signature`]).
//!
//! # Modules
//! - [`arch`]: backbone descriptions with their state-dict names.
//! - [`export`]: writes the ONNX graph from named weights (batch norm folded).
//! - [`bundle`]: reads (limits checked before allocation), validates and
//!   atomically writes bundles.
//! - [`preprocess`]: the single image → tensor function (feature `preprocess`).
//! - [`validate`]: the checks a graph passes before a runtime sees it
//!   (operators, attributes, initializer sizes, a memory budget).
//! - [`signature`]: ed25519 key files, signing and verifying bundles.
//! - [`report`]: the JSON lines `tern-device` prints with `--json`, read
//!   back by the host.
#![deny(missing_docs)]

pub mod arch;
pub mod bundle;
pub mod dataset;
mod error;
pub mod export;
pub mod files;
pub mod manifest;
#[allow(missing_docs, clippy::all)]
pub mod onnx;
pub mod onnx_build;
#[cfg(feature = "preprocess")]
pub mod preprocess;
pub mod quantize;
pub mod report;
pub mod validate;
pub mod signature;
pub mod weights;

pub use bundle::Bundle;
pub use error::FormatError;
pub use manifest::{Manifest, Preprocessing, FORMAT_VERSION};
