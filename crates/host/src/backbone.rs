//! The backbone as tch modules, built from the shared
//! [`BackboneSpec`](tern_model_format::arch::BackboneSpec) so that every
//! variable has exactly the state-dict name the exporter reads.

use std::collections::HashMap;

use anyhow::{Context, Result};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};
use tern_model_format::arch::{BackboneSpec, ConvBn, Padding};
use tern_model_format::weights::TensorData;

/// A convolution + batch norm (+ ReLU6) with the spec's padding.
#[derive(Debug)]
struct ConvBnLayer {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    kernel: usize,
    stride: usize,
    relu6: bool,
    padding: Padding,
}

impl ConvBnLayer {
    fn new(root: &nn::Path, spec: &BackboneSpec, c: &ConvBn) -> Self {
        let conv = nn::conv2d(
            sub(root, &c.conv),
            c.cin as i64,
            c.cout as i64,
            c.kernel as i64,
            nn::ConvConfig { stride: c.stride as i64, padding: 0, groups: c.groups as i64, bias: false, ..Default::default() },
        );
        let bn = nn::batch_norm2d(
            sub(root, &c.bn),
            c.cout as i64,
            nn::BatchNormConfig { eps: spec.bn_eps, momentum: 0.01, ..Default::default() },
        );
        ConvBnLayer { conv, bn, kernel: c.kernel, stride: c.stride, relu6: c.relu6, padding: spec.padding }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        let (h, w) = (size[2] as usize, size[3] as usize);
        let (pt, pb) = self.padding.pads(h, self.kernel, self.stride);
        let (pl, pr) = self.padding.pads(w, self.kernel, self.stride);
        let y = if pt + pb + pl + pr > 0 {
            x.constant_pad_nd([pl as i64, pr as i64, pt as i64, pb as i64]).apply(&self.conv)
        } else {
            x.apply(&self.conv)
        };
        let y = self.bn.forward_t(&y, train);
        if self.relu6 {
            y.clamp(0.0, 6.0)
        } else {
            y
        }
    }
}

/// Descends `root` along a dotted state-dict prefix (`_blocks.3._bn1`):
/// tch path components cannot contain dots.
fn sub<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    let mut parts = dotted.split('.');
    let mut p = root.sub(parts.next().unwrap_or_default());
    for part in parts {
        p = p.sub(part);
    }
    p
}

#[derive(Debug)]
struct BlockLayer {
    convs: Vec<ConvBnLayer>,
    residual: bool,
}

impl BlockLayer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for c in &self.convs {
            y = c.forward_t(&y, train);
        }
        if self.residual {
            y + x
        } else {
            y
        }
    }
}

/// The backbone: stem, inverted-residual blocks, optional head convolution.
#[derive(Debug)]
pub struct Backbone {
    stem: ConvBnLayer,
    blocks: Vec<BlockLayer>,
    head: Option<ConvBnLayer>,
    spec: BackboneSpec,
}

impl Backbone {
    /// Creates the variables under `root` with the spec's names.
    pub fn new(root: &nn::Path, spec: &BackboneSpec) -> Self {
        let stem = ConvBnLayer::new(root, spec, &spec.stem);
        let blocks = spec
            .blocks
            .iter()
            .map(|b| BlockLayer { convs: b.convs().map(|c| ConvBnLayer::new(root, spec, c)).collect(), residual: b.residual })
            .collect();
        let head = spec.head_conv.as_ref().map(|c| ConvBnLayer::new(root, spec, c));
        Backbone { stem, blocks, head, spec: spec.clone() }
    }

    /// The spec this backbone was built from.
    pub fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Runs the stem and blocks `..split` (the frozen part, always with
    /// batch-norm running statistics).
    pub fn forward_front(&self, x: &Tensor, split: usize) -> Tensor {
        let mut y = self.stem.forward_t(x, false);
        for b in &self.blocks[..split.min(self.blocks.len())] {
            y = b.forward_t(&y, false);
        }
        y
    }

    /// Runs blocks `split..` and the head convolution on the output of
    /// [`Backbone::forward_front`], then pools: `[N, feature_width]`.
    pub fn forward_back(&self, x: &Tensor, split: usize, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for b in &self.blocks[split.min(self.blocks.len())..] {
            y = b.forward_t(&y, train);
        }
        if let Some(h) = &self.head {
            y = h.forward_t(&y, train);
        }
        y.mean_dim(&[2i64, 3][..], false, Kind::Float)
    }

    /// Pooled features of a batch `[N, 3, H, W]` in inference mode.
    pub fn features(&self, x: &Tensor) -> Tensor {
        let n = self.blocks.len();
        self.forward_back(&self.forward_front(x, n), n, false)
    }

    /// The activation after the stem, after every block and after the head
    /// convolution, named `stem`, `block.N`, `head`, in inference mode.
    pub fn activations(&self, x: &Tensor) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut y = self.stem.forward_t(x, false);
        out.push(("stem".to_string(), y.shallow_clone()));
        for (i, b) in self.blocks.iter().enumerate() {
            y = b.forward_t(&y, false);
            out.push((format!("block.{i}"), y.shallow_clone()));
        }
        if let Some(h) = &self.head {
            out.push(("head".to_string(), h.forward_t(&y, false)));
        }
        out
    }
}

/// Copies every variable of `vs` into named f32 tensors for the exporter.
pub fn named_tensors(vs: &nn::VarStore) -> Result<HashMap<String, TensorData>> {
    let mut out = HashMap::new();
    for (name, t) in vs.variables() {
        let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let data = Vec::<f32>::try_from(t.flatten(0, -1)).with_context(|| format!("reading tensor {name}"))?;
        out.insert(name, TensorData::new(shape, data)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_model_format::arch::Backbone as Arch;

    #[test]
    fn variable_names_are_the_state_dict_names() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let spec = Arch::EfficientnetLite0.spec();
        let _b = Backbone::new(&vs.root(), &spec);
        let mut have: Vec<String> = vs.variables().into_keys().collect();
        let mut want = spec.tensor_names();
        have.sort();
        want.sort();
        assert_eq!(have, want);
    }

    #[test]
    fn output_shapes() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let spec = Arch::MobilenetV2.spec();
        let b = Backbone::new(&vs.root(), &spec);
        let x = Tensor::zeros([2, 3, 224, 224], (Kind::Float, tch::Device::Cpu));
        assert_eq!(b.features(&x).size(), vec![2, 1280]);
        let acts = b.activations(&x);
        assert_eq!(acts.len(), 1 + 17 + 1);
        assert_eq!(acts[0].1.size(), vec![2, 32, 112, 112]);
        assert_eq!(acts[17].1.size(), vec![2, 320, 7, 7]);
    }
}
