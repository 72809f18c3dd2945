//! Writes the ONNX graph of a backbone and head from named weights.
//!
//! Operators (opset 13, standard domain only): `Conv` with batch norm
//! folded into its weight and bias, `Clip(0, 6)` for ReLU6, `Add` for
//! residuals, `GlobalAveragePool`, `Flatten`, `Gemm`, `Relu` between head
//! layers, and `Softmax`/`Sigmoid` for the probabilities output.

use crate::arch::{Backbone, BackboneSpec, ConvBn, BN_SUFFIXES};
use crate::error::FormatError;
use crate::manifest::{ArchitectureInfo, Io, Manifest, OutputKind, Precision, Preprocessing, Provenance, FORMAT_VERSION};
use crate::onnx;
use crate::onnx_build::{attr_int, attr_ints, node, tensor_f32, value_info_f32};
use crate::weights::{SafeTensorsFile, TensorData, TensorSource};

/// ONNX opset written.
pub const OPSET: i64 = 13;
/// ONNX IR version matching [`OPSET`].
pub const IR_VERSION: i64 = 7;

/// One fully connected layer of the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linear {
    /// Weight tensor name, shape `[out_features, in_features]`.
    pub weight: String,
    /// Bias tensor name, shape `[out_features]`.
    pub bias: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
}

/// The classifier on top of the pooled features: linear layers with ReLU
/// between them, then the output activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSpec {
    /// Layers, in order. The last one produces the logits.
    pub layers: Vec<Linear>,
    /// Activation giving the probabilities output.
    pub output_kind: OutputKind,
}

impl HeadSpec {
    /// The head that Tern trains: `head.hidden.{i}` layers of the given
    /// widths, then `head.out` with `outputs` units.
    pub fn trainable(features: usize, hidden: &[usize], outputs: usize, output_kind: OutputKind) -> HeadSpec {
        let mut layers = Vec::new();
        let mut width = features;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(Linear {
                weight: format!("head.hidden.{i}.weight"),
                bias: format!("head.hidden.{i}.bias"),
                in_features: width,
                out_features: h,
            });
            width = h;
        }
        layers.push(Linear {
            weight: "head.out.weight".into(),
            bias: "head.out.bias".into(),
            in_features: width,
            out_features: outputs,
        });
        HeadSpec { layers, output_kind }
    }

    /// The original 1000-class ImageNet classifier of a pretrained backbone.
    pub fn imagenet(spec: &BackboneSpec) -> HeadSpec {
        let (weight, bias) = spec.backbone.imagenet_classifier();
        HeadSpec {
            layers: vec![Linear {
                weight: weight.into(),
                bias: bias.into(),
                in_features: spec.feature_width(),
                out_features: 1000,
            }],
            output_kind: OutputKind::Softmax,
        }
    }

    /// Width of the logits.
    pub fn output_width(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_features)
    }
}

/// Names used for the graph's input and outputs.
pub fn default_io(head: &HeadSpec) -> Io {
    Io {
        input: "input".into(),
        logits: "logits".into(),
        probabilities: "probabilities".into(),
        output_width: head.output_width(),
        output_kind: head.output_kind,
    }
}

/// Builds the inference graph of `spec` + `head` with weights from `weights`.
///
/// Batch norm is folded into the convolutions (in f64, then rounded). The
/// input is `[1, 3, height, width]` as given by `pre`.
pub fn build_graph(
    spec: &BackboneSpec,
    head: &HeadSpec,
    weights: &dyn TensorSource,
    pre: &Preprocessing,
    io: &Io,
) -> Result<onnx::GraphProto, FormatError> {
    let mut g = Builder::default();
    let (mut h, mut w) = (pre.height as usize, pre.width as usize);
    g.initializers.push(scalar("relu6.min", 0.0));
    g.initializers.push(scalar("relu6.max", 6.0));

    let mut x = io.input.clone();
    x = g.conv_bn(spec, &spec.stem, &x, &mut h, &mut w, weights)?;
    for block in &spec.blocks {
        let input = x.clone();
        for conv in block.convs() {
            x = g.conv_bn(spec, conv, &x, &mut h, &mut w, weights)?;
        }
        if block.residual {
            let out = format!("{}.residual", block.project.conv);
            g.node("Add", &[&input, &x], &out, vec![]);
            x = out;
        }
    }
    if let Some(conv) = &spec.head_conv {
        x = g.conv_bn(spec, conv, &x, &mut h, &mut w, weights)?;
    }
    g.node("GlobalAveragePool", &[&x], "features.pooled", vec![]);
    g.node("Flatten", &["features.pooled"], "features", vec![attr_int("axis", 1)]);
    x = "features".into();

    let mut width = spec.feature_width();
    for (i, layer) in head.layers.iter().enumerate() {
        if layer.in_features != width {
            return Err(FormatError::Invalid {
                what: "head".into(),
                detail: format!("layer {} takes {} features but receives {width}", layer.weight, layer.in_features),
            });
        }
        let last = i + 1 == head.layers.len();
        let wt = weights.tensor_shaped(&layer.weight, &[layer.out_features, layer.in_features])?;
        let bt = weights.tensor_shaped(&layer.bias, &[layer.out_features])?;
        g.initializers.push(tensor(&layer.weight, &wt));
        g.initializers.push(tensor(&layer.bias, &bt));
        let out = if last { io.logits.clone() } else { format!("{}.linear", layer.weight) };
        g.node("Gemm", &[&x, &layer.weight, &layer.bias], &out, vec![attr_int("transB", 1)]);
        x = out;
        if !last {
            let relu = format!("{}.relu", layer.weight);
            g.node("Relu", &[&x], &relu, vec![]);
            x = relu;
        }
        width = layer.out_features;
    }
    if width != io.output_width {
        return Err(FormatError::Invalid {
            what: "head".into(),
            detail: format!("head produces {width} outputs, io says {}", io.output_width),
        });
    }
    match head.output_kind {
        OutputKind::Softmax => g.node("Softmax", &[&x], &io.probabilities, vec![attr_int("axis", 1)]),
        OutputKind::Sigmoid => g.node("Sigmoid", &[&x], &io.probabilities, vec![]),
    }

    let [n, c, ih, iw] = pre.input_shape();
    Ok(onnx::GraphProto {
        name: Some(format!("tern-{}", spec.backbone.name())),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![value_info_f32(&io.input, &[n, c, ih, iw].map(|d| d as i64))],
        output: vec![
            value_info_f32(&io.logits, &[1, width as i64]),
            value_info_f32(&io.probabilities, &[1, width as i64]),
        ],
        ..Default::default()
    })
}

/// The pretrained network with its original 1000-class ImageNet head, as a
/// graph and a manifest ready for [`crate::bundle::write`].
///
/// `labels` must hold the 1000 ImageNet class names; `source` says where the
/// weights came from (package, version, license).
pub fn pretrained_bundle(
    backbone: Backbone,
    weights: &SafeTensorsFile,
    labels: Vec<String>,
    source: &str,
    created_by: &str,
) -> Result<(onnx::GraphProto, Manifest), FormatError> {
    let spec = backbone.spec();
    let head = HeadSpec::imagenet(&spec);
    if labels.len() != head.output_width() {
        return Err(FormatError::LabelCountMismatch {
            labels: labels.len(),
            output_width: head.output_width(),
            kind: head.output_kind,
        });
    }
    let pre = backbone.preprocessing();
    let io = default_io(&head);
    let graph = build_graph(&spec, &head, weights, &pre, &io)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        labels,
        preprocessing: pre,
        io,
        precision: Precision::F32,
        quantization: None,
        metrics: None,
        architecture: ArchitectureInfo { backbone: backbone.name().into(), drop_blocks: 0, hidden: vec![] },
        provenance: Provenance {
            created_by: created_by.into(),
            backbone_weights_sha256: weights.sha256().into(),
            backbone_weights_source: source.into(),
            training: None,
        },
        graph_sha256: String::new(),
    };
    Ok((graph, manifest))
}

#[derive(Default)]
struct Builder {
    nodes: Vec<onnx::NodeProto>,
    initializers: Vec<onnx::TensorProto>,
}

impl Builder {
    fn node(&mut self, op: &str, inputs: &[&str], output: &str, attribute: Vec<onnx::AttributeProto>) {
        self.nodes.push(node(op, inputs, output, attribute));
    }

    /// Conv (+ folded BN) (+ ReLU6); updates the spatial size.
    fn conv_bn(
        &mut self,
        spec: &BackboneSpec,
        c: &ConvBn,
        x: &str,
        h: &mut usize,
        w: &mut usize,
        weights: &dyn TensorSource,
    ) -> Result<String, FormatError> {
        let (weight, bias) = fold_conv_bn(c, spec.bn_eps, weights)?;
        let (pt, pb) = spec.padding.pads(*h, c.kernel, c.stride);
        let (pl, pr) = spec.padding.pads(*w, c.kernel, c.stride);
        *h = spec.padding.output_len(*h, c.kernel, c.stride);
        *w = spec.padding.output_len(*w, c.kernel, c.stride);
        let wname = format!("{}.weight", c.conv);
        let bname = format!("{}.bias", c.conv);
        self.initializers.push(tensor(&wname, &weight));
        self.initializers.push(tensor(&bname, &bias));
        let k = c.kernel as i64;
        let s = c.stride as i64;
        let conv_out = format!("{}.out", c.conv);
        self.node(
            "Conv",
            &[x, &wname, &bname],
            &conv_out,
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[s, s]),
                attr_ints("pads", &[pt as i64, pl as i64, pb as i64, pr as i64]),
                attr_ints("dilations", &[1, 1]),
                attr_int("group", c.groups as i64),
            ],
        );
        if !c.relu6 {
            return Ok(conv_out);
        }
        let out = format!("{}.relu6", c.conv);
        self.node("Clip", &[&conv_out, "relu6.min", "relu6.max"], &out, vec![]);
        Ok(out)
    }
}

/// Folds batch norm into the preceding convolution:
/// `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`.
pub fn fold_conv_bn(
    c: &ConvBn,
    eps: f64,
    weights: &dyn TensorSource,
) -> Result<(TensorData, TensorData), FormatError> {
    let shape = c.weight_shape();
    let mut w = weights.tensor_shaped(&format!("{}.weight", c.conv), &shape)?;
    let [gamma, beta, mean, var] = BN_SUFFIXES
        .map(|s| weights.tensor_shaped(&format!("{}.{s}", c.bn), &[c.cout]).map(|t| t.data));
    let (gamma, beta, mean, var) = (gamma?, beta?, mean?, var?);
    let per_out = shape[1] * shape[2] * shape[3];
    let mut bias = Vec::with_capacity(c.cout);
    for o in 0..c.cout {
        let v = f64::from(var[o]);
        if !(v >= 0.0) {
            return Err(FormatError::Invalid {
                what: format!("{}.running_var", c.bn),
                detail: format!("negative or NaN variance {v} at channel {o}"),
            });
        }
        let scale = f64::from(gamma[o]) / (v + eps).sqrt();
        for x in &mut w.data[o * per_out..(o + 1) * per_out] {
            *x = (f64::from(*x) * scale) as f32;
        }
        bias.push((f64::from(beta[o]) - f64::from(mean[o]) * scale) as f32);
    }
    Ok((w, TensorData { shape: vec![c.cout], data: bias }))
}

fn tensor(name: &str, t: &TensorData) -> onnx::TensorProto {
    let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    tensor_f32(name, &dims, &t.data)
}

fn scalar(name: &str, v: f32) -> onnx::TensorProto {
    tensor_f32(name, &[], &[v])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn folding_matches_batch_norm() {
        let c = ConvBn {
            conv: "c".into(),
            bn: "bn".into(),
            cin: 1,
            cout: 2,
            kernel: 1,
            stride: 1,
            groups: 1,
            relu6: false,
        };
        let mut m = HashMap::new();
        m.insert("c.weight".to_string(), TensorData::new(vec![2, 1, 1, 1], vec![2.0, -1.0]).unwrap());
        m.insert("bn.weight".to_string(), TensorData::new(vec![2], vec![3.0, 1.0]).unwrap());
        m.insert("bn.bias".to_string(), TensorData::new(vec![2], vec![0.5, 0.0]).unwrap());
        m.insert("bn.running_mean".to_string(), TensorData::new(vec![2], vec![1.0, -2.0]).unwrap());
        m.insert("bn.running_var".to_string(), TensorData::new(vec![2], vec![4.0, 1.0]).unwrap());
        let (w, b) = fold_conv_bn(&c, 0.0, &m).unwrap();
        // For x = 5: conv 10, bn 3·(10−1)/2 + 0.5 = 14; folded 5·3 + (0.5 − 1.5) = 14.
        let x = 5.0f32;
        assert!((w.data[0] * x + b.data[0] - 14.0).abs() < 1e-6);
        // Channel 2: conv −5, bn (−5+2)/1 = −3.
        assert!((w.data[1] * x + b.data[1] + 3.0).abs() < 1e-6);
    }

    #[test]
    fn missing_weights_are_named() {
        let spec = Backbone::EfficientnetLite0.spec();
        let head = HeadSpec::imagenet(&spec);
        let io = default_io(&head);
        let err = build_graph(&spec, &head, &HashMap::new(), &Backbone::EfficientnetLite0.preprocessing(), &io)
            .unwrap_err();
        assert!(err.to_string().contains("_conv_stem.weight"), "{err}");
    }

    #[test]
    fn trainable_head_names() {
        let h = HeadSpec::trainable(1280, &[256], 2, OutputKind::Softmax);
        assert_eq!(h.layers.len(), 2);
        assert_eq!(h.layers[0].weight, "head.hidden.0.weight");
        assert_eq!(h.layers[1].in_features, 256);
        assert_eq!(h.output_width(), 2);
    }
}
