//! The manifest: everything the device needs to know about a model, stored
//! as JSON under the `tern.manifest` key of the ONNX `metadata_props`.

use serde::{Deserialize, Serialize};

use crate::error::FormatError;

/// Version of the manifest layout. Readers refuse any other version.
pub const FORMAT_VERSION: u32 = 1;

/// Most labels a bundle may carry.
pub const MAX_LABELS: usize = 100_000;
/// Longest label, in bytes.
pub const MAX_LABEL_BYTES: usize = 512;
/// Largest input side accepted, in pixels.
pub const MAX_INPUT_SIDE: u32 = 4096;

/// The manifest of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] for files this crate writes.
    pub format_version: u32,
    /// Class names, in output order.
    pub labels: Vec<String>,
    /// How an image becomes the input tensor.
    pub preprocessing: Preprocessing,
    /// Names and meaning of the graph's input and outputs.
    pub io: Io,
    /// Numeric precision of the graph.
    pub precision: Precision,
    /// Quantization parameters, for quantized graphs.
    #[serde(default)]
    pub quantization: Option<serde_json::Value>,
    /// Accuracy figures measured when the bundle was made.
    #[serde(default)]
    pub metrics: Option<serde_json::Value>,
    /// The network: backbone, dropped blocks, head.
    pub architecture: ArchitectureInfo,
    /// Where the weights came from and how the bundle was made.
    pub provenance: Provenance,
    /// sha256 (hex) of the serialized ONNX `GraphProto`, exactly as stored
    /// in the file. Checked on load.
    pub graph_sha256: String,
}

/// How to turn a decoded RGB image into the `[1, 3, height, width]` input.
///
/// Pixels are scaled to `[0, 1]`, then `(x - mean) / std` per channel, in
/// RGB order, NCHW layout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// Input width in pixels.
    pub width: u32,
    /// Input height in pixels.
    pub height: u32,
    /// How the image is brought to the input size.
    pub resize: ResizeMode,
    /// Per-channel mean, RGB, on the `[0, 1]` scale.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, RGB, on the `[0, 1]` scale.
    pub std: [f32; 3],
}

/// How an image is brought to the input size. The filter is always
/// bilinear (triangle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum ResizeMode {
    /// Resize to exactly `width × height`, ignoring the aspect ratio.
    Stretch,
    /// Resize so the shorter side is `shorter_side`, then take the centre
    /// `width × height`.
    CenterCrop {
        /// Length of the shorter side after resizing.
        shorter_side: u32,
    },
}

/// Names of the graph's input and outputs and what the outputs mean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Io {
    /// Name of the single input, shape `[1, 3, height, width]`, f32.
    pub input: String,
    /// Name of the raw scores output, shape `[1, width]`.
    pub logits: String,
    /// Name of the probabilities output, shape `[1, width]`.
    pub probabilities: String,
    /// Width of both outputs.
    pub output_width: usize,
    /// What turns logits into probabilities.
    pub output_kind: OutputKind,
}

/// The final activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputKind {
    /// One probability distribution over all labels.
    Softmax,
    /// Independent probabilities. With two labels and one output, the
    /// output is the probability of the second label (binary task).
    Sigmoid,
}

/// Numeric precision of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// 32-bit float throughout.
    F32,
    /// int8 quantized operators.
    Int8,
}

/// The network that produced the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchitectureInfo {
    /// Backbone name ([`crate::arch::Backbone::name`]).
    pub backbone: String,
    /// How many of the backbone's last blocks were dropped.
    pub drop_blocks: usize,
    /// Widths of the hidden layers of the head (ReLU between).
    pub hidden: Vec<usize>,
}

/// Where the bundle came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The tool and version that wrote the bundle, e.g. `tern-host 0.1.0`.
    pub created_by: String,
    /// sha256 of the pretrained backbone weights file.
    pub backbone_weights_sha256: String,
    /// Where the pretrained weights came from (package, version, license).
    pub backbone_weights_source: String,
    /// Training settings and data, for trained heads.
    #[serde(default)]
    pub training: Option<serde_json::Value>,
}

impl Manifest {
    /// Checks the manifest on its own: version, labels, sizes, names.
    /// Checks against the graph are in [`crate::bundle`].
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.format_version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: self.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let invalid = |what: &str, detail: String| FormatError::Invalid { what: what.into(), detail };
        if self.labels.is_empty() {
            return Err(invalid("labels", "no labels".into()));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(invalid("labels", format!("{} labels, at most {MAX_LABELS}", self.labels.len())));
        }
        if let Some(l) = self.labels.iter().find(|l| l.is_empty() || l.len() > MAX_LABEL_BYTES) {
            return Err(invalid("labels", format!("label {l:?} is empty or longer than {MAX_LABEL_BYTES} bytes")));
        }
        let expected = expected_output_width(self.labels.len(), self.io.output_kind, self.io.output_width);
        if !expected {
            return Err(FormatError::LabelCountMismatch {
                labels: self.labels.len(),
                output_width: self.io.output_width,
                kind: self.io.output_kind,
            });
        }
        self.preprocessing.validate()?;
        if self.graph_sha256.len() != 64 || !self.graph_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("graph_sha256", format!("{:?} is not a sha256 hex digest", self.graph_sha256)));
        }
        Ok(())
    }

    /// The label of output `index`, the way a user should read it. For a
    /// binary sigmoid bundle (two labels, one output) this is the second
    /// label.
    pub fn label(&self, index: usize) -> Option<&str> {
        self.labels.get(index).map(String::as_str)
    }
}

/// Whether `labels` labels fit an output of `width` with this activation.
fn expected_output_width(labels: usize, kind: OutputKind, width: usize) -> bool {
    match kind {
        OutputKind::Softmax => width == labels,
        OutputKind::Sigmoid => width == labels || (labels == 2 && width == 1),
    }
}

impl Preprocessing {
    /// Checks sizes and normalisation constants.
    pub fn validate(&self) -> Result<(), FormatError> {
        let invalid = |detail: String| FormatError::Invalid { what: "preprocessing".into(), detail };
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v > MAX_INPUT_SIDE {
                return Err(invalid(format!("{name} {v} is outside 1..={MAX_INPUT_SIDE}")));
            }
        }
        if let ResizeMode::CenterCrop { shorter_side } = self.resize {
            if shorter_side < self.width.min(self.height) || shorter_side > MAX_INPUT_SIDE {
                return Err(invalid(format!(
                    "shorter side {shorter_side} cannot be cropped to {}x{}",
                    self.width, self.height
                )));
            }
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(invalid(format!("mean {:?} / std {:?} must be finite, std > 0", self.mean, self.std)));
        }
        Ok(())
    }

    /// The input tensor shape `[1, 3, height, width]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [1, 3, self.height as usize, self.width as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            labels: vec!["cat".into(), "dog".into()],
            preprocessing: crate::arch::Backbone::EfficientnetLite0.preprocessing(),
            io: Io {
                input: "input".into(),
                logits: "logits".into(),
                probabilities: "probabilities".into(),
                output_width: 2,
                output_kind: OutputKind::Softmax,
            },
            precision: Precision::F32,
            quantization: None,
            metrics: None,
            architecture: ArchitectureInfo { backbone: "efficientnet-lite0".into(), drop_blocks: 0, hidden: vec![] },
            provenance: Provenance {
                created_by: "test".into(),
                backbone_weights_sha256: "00".repeat(32),
                backbone_weights_source: "test".into(),
                training: None,
            },
            graph_sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample();
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(m, back);
        back.validate().unwrap();
    }

    #[test]
    fn label_count_must_match_output() {
        let mut m = sample();
        m.io.output_width = 3;
        assert!(matches!(m.validate(), Err(FormatError::LabelCountMismatch { labels: 2, output_width: 3, .. })));
        m.io.output_width = 1;
        assert!(m.validate().is_err());
        m.io.output_kind = OutputKind::Sigmoid;
        m.validate().unwrap();
    }

    #[test]
    fn refuses_other_versions_and_bad_constants() {
        let mut m = sample();
        m.format_version = 2;
        assert!(matches!(m.validate(), Err(FormatError::UnsupportedVersion { found: 2, .. })));
        let mut m = sample();
        m.preprocessing.std[1] = 0.0;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.labels[0].clear();
        assert!(m.validate().is_err());
        let mut m = sample();
        m.graph_sha256 = "xyz".into();
        assert!(m.validate().is_err());
    }
}
