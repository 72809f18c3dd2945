//! Backbone architectures, described once and used by both sides.
//!
//! A [`BackboneSpec`] lists every convolution of a network with the name its
//! weights carry in a state dict. The host builds its tch modules from the
//! spec (so a trained var store has exactly these names) and the exporter in
//! [`crate::export`] walks the same spec to write the ONNX graph.

use serde::{Deserialize, Serialize};

use crate::error::FormatError;
use crate::manifest::{Preprocessing, ResizeMode};

/// A supported backbone family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backbone {
    /// EfficientNet-Lite0 (TensorFlow port, lukemelas naming: `_conv_stem`,
    /// `_blocks.N._expand_conv`, ...). Inverted residuals, ReLU6, no
    /// squeeze-excite, TensorFlow "SAME" padding, batch-norm eps 1e-3.
    EfficientnetLite0,
    /// MobileNetV2 1.0 (torchvision naming: `features.N.conv.M`), symmetric
    /// padding, batch-norm eps 1e-5.
    MobilenetV2,
}

impl Backbone {
    /// Every supported backbone.
    pub const ALL: [Backbone; 2] = [Backbone::EfficientnetLite0, Backbone::MobilenetV2];

    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Backbone::EfficientnetLite0 => "efficientnet-lite0",
            Backbone::MobilenetV2 => "mobilenet-v2",
        }
    }

    /// Parses a name as written by [`Backbone::name`].
    pub fn from_name(name: &str) -> Result<Self, FormatError> {
        Backbone::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| FormatError::UnknownBackbone { name: name.to_owned() })
    }

    /// The full network description, from the stem to the 1280-wide head
    /// convolution.
    pub fn spec(self) -> BackboneSpec {
        match self {
            Backbone::EfficientnetLite0 => efficientnet_lite0(),
            Backbone::MobilenetV2 => mobilenet_v2(),
        }
    }

    /// The preprocessing the pretrained weights were trained with.
    pub fn preprocessing(self) -> Preprocessing {
        match self {
            Backbone::EfficientnetLite0 => Preprocessing {
                width: 224,
                height: 224,
                resize: ResizeMode::Stretch,
                mean: [0.5, 0.5, 0.5],
                std: [0.5, 0.5, 0.5],
            },
            Backbone::MobilenetV2 => Preprocessing {
                width: 224,
                height: 224,
                resize: ResizeMode::CenterCrop { shorter_side: 256 },
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
            },
        }
    }

    /// The names of the original 1000-class ImageNet classifier (weight, bias).
    pub fn imagenet_classifier(self) -> (&'static str, &'static str) {
        match self {
            Backbone::EfficientnetLite0 => ("_fc.weight", "_fc.bias"),
            Backbone::MobilenetV2 => ("classifier.1.weight", "classifier.1.bias"),
        }
    }
}

/// How convolutions are padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Padding {
    /// TensorFlow "SAME": output = ceil(input / stride); the odd pixel of
    /// padding goes after (bottom/right). Depends on the input size.
    TfSame,
    /// `(kernel - 1) / 2` on every side (PyTorch style).
    Symmetric,
}

impl Padding {
    /// Padding `(before, after)` along one axis of length `input`.
    pub fn pads(self, input: usize, kernel: usize, stride: usize) -> (usize, usize) {
        match self {
            Padding::Symmetric => ((kernel - 1) / 2, (kernel - 1) / 2),
            Padding::TfSame => {
                let out = input.div_ceil(stride);
                let total = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(input);
                (total / 2, total - total / 2)
            }
        }
    }

    /// Output length along one axis.
    pub fn output_len(self, input: usize, kernel: usize, stride: usize) -> usize {
        let (a, b) = self.pads(input, kernel, stride);
        (input + a + b - kernel) / stride + 1
    }
}

/// A convolution followed by batch norm, with an optional ReLU6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvBn {
    /// Prefix of the convolution weight: the tensor is `{conv}.weight`
    /// (no bias).
    pub conv: String,
    /// Prefix of the batch norm: `{bn}.weight`, `.bias`, `.running_mean`,
    /// `.running_var`.
    pub bn: String,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Groups (`cin` for a depthwise convolution).
    pub groups: usize,
    /// Whether ReLU6 follows.
    pub relu6: bool,
}

impl ConvBn {
    /// Shape of the convolution weight `[cout, cin / groups, k, k]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.cout, self.cin / self.groups, self.kernel, self.kernel]
    }
}

/// One inverted-residual block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The 1×1 expansion (absent when the expand ratio is 1).
    pub expand: Option<ConvBn>,
    /// The depthwise convolution.
    pub depthwise: ConvBn,
    /// The linear 1×1 projection (no activation).
    pub project: ConvBn,
    /// Whether the block input is added to its output.
    pub residual: bool,
}

impl Block {
    /// Every convolution of the block, in order.
    pub fn convs(&self) -> impl Iterator<Item = &ConvBn> {
        self.expand.iter().chain([&self.depthwise, &self.project])
    }
}

/// A whole backbone: stem, blocks, and the optional 1×1 head convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneSpec {
    /// Which family.
    pub backbone: Backbone,
    /// The first convolution (3 → 32, stride 2).
    pub stem: ConvBn,
    /// The inverted-residual blocks.
    pub blocks: Vec<Block>,
    /// The 1×1 convolution to 1280 channels; `None` once blocks are dropped.
    pub head_conv: Option<ConvBn>,
    /// Padding scheme of every convolution.
    pub padding: Padding,
    /// Batch-norm epsilon.
    pub bn_eps: f64,
}

impl BackboneSpec {
    /// Width of the pooled feature vector.
    pub fn feature_width(&self) -> usize {
        match (&self.head_conv, self.blocks.last()) {
            (Some(h), _) => h.cout,
            (None, Some(b)) => b.project.cout,
            (None, None) => self.stem.cout,
        }
    }

    /// The spec without its last `k` blocks. Dropping any block also drops
    /// the head convolution, whose input width no longer matches; the
    /// features are then the pooled output of the last kept block.
    pub fn drop_blocks(&self, k: usize) -> Result<BackboneSpec, FormatError> {
        if k == 0 {
            return Ok(self.clone());
        }
        if k >= self.blocks.len() {
            return Err(FormatError::Invalid {
                what: "drop_blocks".into(),
                detail: format!("cannot drop {k} of {} blocks", self.blocks.len()),
            });
        }
        let mut spec = self.clone();
        spec.blocks.truncate(self.blocks.len() - k);
        spec.head_conv = None;
        Ok(spec)
    }

    /// Every convolution, stem to head, in forward order.
    pub fn convs(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem)
            .chain(self.blocks.iter().flat_map(|b| b.convs()))
            .chain(self.head_conv.iter())
    }

    /// Names of every tensor the backbone reads.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for c in self.convs() {
            names.push(format!("{}.weight", c.conv));
            for s in BN_SUFFIXES {
                names.push(format!("{}.{s}", c.bn));
            }
        }
        names
    }
}

/// The four batch-norm tensors, by suffix.
pub const BN_SUFFIXES: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// (expand ratio, kernel, stride, output channels, repeats) per stage.
type Stage = (usize, usize, usize, usize, usize);

fn build(
    backbone: Backbone,
    stages: &[Stage],
    padding: Padding,
    bn_eps: f64,
    names: &dyn Fn(usize, bool) -> BlockNames,
    stem: (String, String),
    head: (String, String),
) -> BackboneSpec {
    let stem = ConvBn {
        conv: stem.0,
        bn: stem.1,
        cin: 3,
        cout: 32,
        kernel: 3,
        stride: 2,
        groups: 1,
        relu6: true,
    };
    let mut blocks = Vec::new();
    let mut cin = stem.cout;
    let mut index = 0;
    for &(expand, kernel, stride, cout, repeats) in stages {
        for r in 0..repeats {
            let stride = if r == 0 { stride } else { 1 };
            let hidden = cin * expand;
            let n = names(index, expand != 1);
            let expand_conv = n.expand.map(|(conv, bn)| ConvBn {
                conv,
                bn,
                cin,
                cout: hidden,
                kernel: 1,
                stride: 1,
                groups: 1,
                relu6: true,
            });
            blocks.push(Block {
                expand: expand_conv,
                depthwise: ConvBn {
                    conv: n.depthwise.0,
                    bn: n.depthwise.1,
                    cin: hidden,
                    cout: hidden,
                    kernel,
                    stride,
                    groups: hidden,
                    relu6: true,
                },
                project: ConvBn {
                    conv: n.project.0,
                    bn: n.project.1,
                    cin: hidden,
                    cout,
                    kernel: 1,
                    stride: 1,
                    groups: 1,
                    relu6: false,
                },
                residual: stride == 1 && cin == cout,
            });
            cin = cout;
            index += 1;
        }
    }
    BackboneSpec {
        backbone,
        head_conv: Some(ConvBn {
            conv: head.0,
            bn: head.1,
            cin,
            cout: 1280,
            kernel: 1,
            stride: 1,
            groups: 1,
            relu6: true,
        }),
        stem,
        blocks,
        padding,
        bn_eps,
    }
}

struct BlockNames {
    expand: Option<(String, String)>,
    depthwise: (String, String),
    project: (String, String),
}

fn efficientnet_lite0() -> BackboneSpec {
    const STAGES: [Stage; 7] = [
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    ];
    let names = |i: usize, expands: bool| {
        let p = format!("_blocks.{i}");
        BlockNames {
            expand: expands.then(|| (format!("{p}._expand_conv"), format!("{p}._bn0"))),
            depthwise: (format!("{p}._depthwise_conv"), format!("{p}._bn1")),
            project: (format!("{p}._project_conv"), format!("{p}._bn2")),
        }
    };
    build(
        Backbone::EfficientnetLite0,
        &STAGES,
        Padding::TfSame,
        1e-3,
        &names,
        ("_conv_stem".into(), "_bn0".into()),
        ("_conv_head".into(), "_bn1".into()),
    )
}

fn mobilenet_v2() -> BackboneSpec {
    const STAGES: [Stage; 7] = [
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 3, 2, 32, 3),
        (6, 3, 2, 64, 4),
        (6, 3, 1, 96, 3),
        (6, 3, 2, 160, 3),
        (6, 3, 1, 320, 1),
    ];
    // torchvision: features.0 is the stem, features.1..=17 the blocks,
    // features.18 the head convolution.
    let names = |i: usize, expands: bool| {
        let p = format!("features.{}.conv", i + 1);
        if expands {
            BlockNames {
                expand: Some((format!("{p}.0.0"), format!("{p}.0.1"))),
                depthwise: (format!("{p}.1.0"), format!("{p}.1.1")),
                project: (format!("{p}.2"), format!("{p}.3")),
            }
        } else {
            BlockNames {
                expand: None,
                depthwise: (format!("{p}.0.0"), format!("{p}.0.1")),
                project: (format!("{p}.1"), format!("{p}.2")),
            }
        }
    };
    build(
        Backbone::MobilenetV2,
        &STAGES,
        Padding::Symmetric,
        1e-5,
        &names,
        ("features.0.0".into(), "features.0.1".into()),
        ("features.18.0".into(), "features.18.1".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efficientnet_lite0_shape() {
        let s = Backbone::EfficientnetLite0.spec();
        assert_eq!(s.blocks.len(), 16);
        assert!(s.blocks[0].expand.is_none());
        assert_eq!(s.blocks[0].depthwise.bn, "_blocks.0._bn1");
        assert_eq!(s.blocks[15].project.cout, 320);
        assert_eq!(s.blocks[3].depthwise.kernel, 5);
        assert_eq!(s.blocks[3].depthwise.cin, 144);
        assert_eq!(s.feature_width(), 1280);
        // 296 tensors in the state dict: 5 per conv+bn plus num_batches_tracked
        // per bn (dropped on conversion) plus the 2 classifier tensors.
        let convs = s.convs().count();
        assert_eq!(convs * 6 + 2, 296);
        let residual: Vec<usize> =
            s.blocks.iter().enumerate().filter(|(_, b)| b.residual).map(|(i, _)| i).collect();
        assert_eq!(residual, vec![2, 4, 6, 7, 9, 10, 12, 13, 14]);
    }

    #[test]
    fn mobilenet_v2_names_follow_torchvision() {
        let s = Backbone::MobilenetV2.spec();
        assert_eq!(s.blocks.len(), 17);
        assert_eq!(s.blocks[0].project.conv, "features.1.conv.1");
        assert_eq!(s.blocks[1].expand.as_ref().map(|c| c.conv.as_str()), Some("features.2.conv.0.0"));
        assert_eq!(s.blocks[16].project.bn, "features.17.conv.3");
        assert_eq!(s.head_conv.as_ref().map(|c| c.cin), Some(320));
    }

    #[test]
    fn tf_same_padding_matches_tensorflow() {
        // 224 → 112 with k3 s2: one pixel of padding, after.
        assert_eq!(Padding::TfSame.pads(224, 3, 2), (0, 1));
        assert_eq!(Padding::TfSame.pads(56, 5, 2), (1, 2));
        assert_eq!(Padding::TfSame.pads(14, 5, 1), (2, 2));
        assert_eq!(Padding::TfSame.output_len(224, 3, 2), 112);
        assert_eq!(Padding::TfSame.output_len(7, 3, 2), 4);
        assert_eq!(Padding::Symmetric.output_len(224, 3, 2), 112);
    }

    #[test]
    fn dropping_blocks_drops_the_head_conv() {
        let s = Backbone::EfficientnetLite0.spec().drop_blocks(2).unwrap();
        assert_eq!(s.blocks.len(), 14);
        assert!(s.head_conv.is_none());
        assert_eq!(s.feature_width(), 192);
        assert!(Backbone::EfficientnetLite0.spec().drop_blocks(16).is_err());
    }
}
