//! Looking inside the network: feature maps, "ideal" class images by
//! activation maximisation with a total-variation penalty, and adversarial
//! examples (iterative FGSM / PGD within an L∞ budget).
//!
//! Images are handled as pixel tensors `[1, 3, H, W]` in `[0, 1]`; the
//! bundle's normalisation `(p − mean) / std` is applied inside the
//! differentiable forward pass.

use anyhow::{bail, Result};
use image::RgbImage;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tern_model_format::manifest::Preprocessing;

use crate::backbone::Backbone;

/// A classifier that gradients can flow through.
pub trait Differentiable {
    /// Logits `[N, classes]` of normalised inputs, autograd kept.
    fn forward(&self, x: &Tensor) -> Tensor;
    /// The backbone (for feature maps).
    fn backbone(&self) -> &Backbone;
    /// Preprocessing of the model's inputs.
    fn preprocessing(&self) -> Preprocessing;
    /// Class names.
    fn labels(&self) -> &[String];
    /// Device of the weights.
    fn device(&self) -> Device;
}

/// `(p − mean) / std`, per channel.
pub fn normalize(p: &Tensor, pre: &Preprocessing) -> Tensor {
    let dev = p.device();
    let mean = Tensor::from_slice(&pre.mean).reshape([1, 3, 1, 1]).to_device(dev);
    let std = Tensor::from_slice(&pre.std).reshape([1, 3, 1, 1]).to_device(dev);
    (p - mean) / std
}

/// The pixels `[1, 3, H, W]` in `[0, 1]` of an image after the bundle's
/// resizing, exactly as the device sees it.
pub fn pixels(img: &image::DynamicImage, pre: &Preprocessing, device: Device) -> Tensor {
    let x = tern_model_format::preprocess::preprocess(img, pre);
    let x = Tensor::from_slice(&x).reshape([1, 3, i64::from(pre.height), i64::from(pre.width)]);
    let mean = Tensor::from_slice(&pre.mean).reshape([1, 3, 1, 1]);
    let std = Tensor::from_slice(&pre.std).reshape([1, 3, 1, 1]);
    // Back to the 8-bit grid the photo was on.
    ((x * std + mean) * 255.0).round().clamp(0.0, 255.0).divide_scalar(255.0).to_device(device)
}

/// Pixels `[1, 3, H, W]` or `[3, H, W]` in `[0, 1]` to an RGB image.
pub fn to_rgb(p: &Tensor) -> Result<RgbImage> {
    let p = p.detach().to_device(Device::Cpu).squeeze().clamp(0.0, 1.0);
    let size = p.size();
    let (h, w) = (size[1] as u32, size[2] as u32);
    let bytes = Vec::<u8>::try_from((p * 255.0).round().to_kind(Kind::Uint8).permute([1, 2, 0]).contiguous().flatten(0, -1))?;
    RgbImage::from_raw(w, h, bytes).ok_or_else(|| anyhow::anyhow!("bad image size {w}x{h}"))
}

/// Anisotropic total variation: mean |vertical difference| + mean
/// |horizontal difference|.
pub fn total_variation(p: &Tensor) -> Tensor {
    let h = p.size()[2];
    let w = p.size()[3];
    let dy = (p.narrow(2, 1, h - 1) - p.narrow(2, 0, h - 1)).abs().mean(Kind::Float);
    let dx = (p.narrow(3, 1, w - 1) - p.narrow(3, 0, w - 1)).abs().mean(Kind::Float);
    dy + dx
}

/// Softmax probabilities of `pixels` (no gradient).
pub fn probabilities(model: &dyn Differentiable, pixels: &Tensor) -> Result<Vec<f32>> {
    let pre = model.preprocessing();
    let logits = tch::no_grad(|| model.forward(&normalize(pixels, &pre)));
    Ok(Vec::<f32>::try_from(logits.softmax(-1, Kind::Float).squeeze_dim(0).to_device(Device::Cpu))?)
}

/// Settings of [`dream`].
#[derive(Debug, Clone)]
pub struct DreamOptions {
    /// Gradient steps.
    pub steps: usize,
    /// Adam learning rate on the pixels.
    pub lr: f64,
    /// Weight of the total-variation penalty.
    pub tv_weight: f64,
    /// Random shift of up to this many pixels per step (0: none).
    pub jitter: i64,
    /// Blur the image every this many steps (0: never).
    pub blur_every: usize,
    /// Seed of the starting noise and the jitter.
    pub seed: i64,
}

impl Default for DreamOptions {
    fn default() -> Self {
        DreamOptions { steps: 200, lr: 0.05, tv_weight: 300.0, jitter: 8, blur_every: 0, seed: 0 }
    }
}

/// The outcome of [`dream`].
pub struct Dream {
    /// The image, pixels in `[0, 1]`.
    pub pixels: Tensor,
    /// Probability of the class on the final image.
    pub probability: f32,
    /// Total variation of the final image.
    pub total_variation: f64,
}

/// Gradient ascent on the input, from noise, towards `class`: minimises
/// `−log p(class) + tv_weight · TV(image)` with Adam (step size decaying
/// from `lr` to 0 along a cosine), jitter and optional blur.
pub fn dream(model: &dyn Differentiable, class: usize, o: &DreamOptions) -> Result<Dream> {
    let pre = model.preprocessing();
    if class >= model.labels().len() {
        bail!("class {class} is out of range (the model has {} classes)", model.labels().len());
    }
    let dev = model.device();
    tch::manual_seed(o.seed);
    let vs = nn::VarStore::new(dev);
    let shape = [1, 3, i64::from(pre.height), i64::from(pre.width)];
    // Smooth low-amplitude noise: random values on a grid 8 times coarser,
    // upsampled bilinearly.
    let coarse = Tensor::rand([1, 3, shape[2] / 8, shape[3] / 8], (Kind::Float, dev)) * 0.2 + 0.4;
    let start = coarse.upsample_bilinear2d([shape[2], shape[3]], false, None, None);
    let p = vs.root().var_copy("pixels", &start);
    let mut opt = nn::Adam::default().build(&vs, o.lr)?;
    let mut rng = o.seed as u64 ^ 0x5eed;
    for step in 0..o.steps {
        // Cosine decay of the step size to 0: with a constant one, Adam's
        // sign-like steps on the L1 total variation keep every pixel moving
        // by about `lr` once the class is reached, which can leave the image
        // as noise at the last step (seen on AVX2 libtorch: TV 0.065 at step
        // 120, 0.343 at 200).
        opt.set_lr(o.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / o.steps as f64).cos()));
        let (dy, dx) = if o.jitter > 0 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (rng >> 33) as i64;
            (r % (2 * o.jitter + 1) - o.jitter, (r / 7919) % (2 * o.jitter + 1) - o.jitter)
        } else {
            (0, 0)
        };
        let shifted = p.roll([dy, dx], [2, 3]);
        let logp = model.forward(&normalize(&shifted, &pre)).log_softmax(-1, Kind::Float);
        let loss = -logp.get(0).get(class as i64) + total_variation(&p) * o.tv_weight;
        opt.backward_step(&loss);
        tch::no_grad(|| {
            let _ = p.shallow_clone().clamp_(0.0, 1.0);
            if o.blur_every > 0 && (step + 1) % o.blur_every == 0 && step + 1 < o.steps {
                let blurred = blur3(&p);
                p.shallow_clone().copy_(&blurred);
            }
        });
    }
    let pixels = p.detach().copy();
    let probability = probabilities(model, &pixels)?[class];
    let total_variation = f64::try_from(total_variation(&pixels))?;
    Ok(Dream { pixels, probability, total_variation })
}

/// A 3×3 Gaussian blur per channel.
fn blur3(p: &Tensor) -> Tensor {
    let k = Tensor::from_slice(&[1f32, 2., 1., 2., 4., 2., 1., 2., 1.]).divide_scalar(16.0).reshape([1, 1, 3, 3]);
    let k = k.repeat([3, 1, 1, 1]).to_device(p.device());
    p.conv2d(&k, None::<Tensor>, [1, 1], [1, 1], [1, 1], 3)
}

/// Settings of [`attack`].
#[derive(Debug, Clone)]
pub struct AttackOptions {
    /// The class to reach; `None`: any class but the original top-1.
    pub target: Option<usize>,
    /// L∞ budget in 8-bit steps (e.g. 8 = 8/255).
    pub eps: u8,
    /// Gradient sign steps.
    pub steps: usize,
    /// Step size in 8-bit steps.
    pub alpha: f64,
}

/// The outcome of [`attack`].
pub struct Attack {
    /// The adversarial image, on the 8-bit grid, pixels in `[0, 1]`.
    pub pixels: Tensor,
    /// Probabilities before.
    pub before: Vec<f32>,
    /// Probabilities after.
    pub after: Vec<f32>,
    /// The L∞ distance actually used, in `[0, 1]` units.
    pub linf: f64,
    /// Steps taken.
    pub steps: usize,
}

/// Iterative FGSM (PGD with sign steps) within an L∞ ball around `x0`,
/// then rounded to 8-bit pixels (which stays within the budget since `x0`
/// is on the 8-bit grid and the budget is a whole number of steps).
pub fn attack(model: &dyn Differentiable, x0: &Tensor, o: &AttackOptions) -> Result<Attack> {
    let pre = model.preprocessing();
    let before = probabilities(model, x0)?;
    let original = argmax(&before);
    if let Some(t) = o.target {
        if t >= before.len() {
            bail!("target class {t} is out of range (the model has {} classes)", before.len());
        }
    }
    let eps = f64::from(o.eps) / 255.0;
    let alpha = o.alpha / 255.0;
    let lo = (x0 - eps).clamp(0.0, 1.0);
    let hi = (x0 + eps).clamp(0.0, 1.0);
    let mut adv = x0.detach().copy();
    let mut taken = 0;
    for step in 0..o.steps {
        taken = step + 1;
        let x = adv.detach().set_requires_grad(true);
        let logp = model.forward(&normalize(&x, &pre)).log_softmax(-1, Kind::Float).get(0);
        // Descend −log p(target), or ascend −log p(original).
        let (loss, sign) = match o.target {
            Some(t) => (-logp.get(t as i64), -1.0),
            None => (-logp.get(original as i64), 1.0),
        };
        let g = Tensor::run_backward(&[loss], &[&x], false, false).remove(0);
        adv = tch::no_grad(|| (x.detach() + g.sign() * (sign * alpha)).clamp_tensor(Some(&lo), Some(&hi)));
        // Stop once the goal holds on the 8-bit image with a margin.
        let q = quantize(&adv);
        let p = probabilities(model, &q)?;
        let done = match o.target {
            Some(t) => argmax(&p) == t && p[t] > 0.5,
            None => argmax(&p) != original && p[original] < 0.2,
        };
        if done {
            break;
        }
    }
    let pixels = quantize(&adv);
    let after = probabilities(model, &pixels)?;
    let linf = f64::try_from((&pixels - x0).abs().max())?;
    Ok(Attack { pixels, before, after, linf, steps: taken })
}

fn quantize(p: &Tensor) -> Tensor {
    (p * 255.0).round().divide_scalar(255.0)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// One layer's activations rendered as one tile per channel.
pub struct FeatureMaps {
    /// Layer name (`stem`, `block.N`, `head`).
    pub layer: String,
    /// Channel maps, each normalised to its own min..max, as images.
    pub tiles: Vec<RgbImage>,
    /// Channels by mean activation, strongest first: (channel, mean).
    pub strongest: Vec<(usize, f32)>,
    /// Spatial size (height, width).
    pub size: (usize, usize),
}

/// The activations of `layers` for one image.
pub fn feature_maps(backbone: &Backbone, x: &Tensor, layers: &[String]) -> Result<Vec<FeatureMaps>> {
    let acts = tch::no_grad(|| backbone.activations(x));
    let mut out = Vec::new();
    for want in layers {
        let Some((_, a)) = acts.iter().find(|(n, _)| n == want) else {
            let names: Vec<&str> = acts.iter().map(|(n, _)| n.as_str()).collect();
            bail!("no layer `{want}`; the layers are: {}", names.join(", "));
        };
        let a = a.to_device(Device::Cpu).squeeze_dim(0);
        let size = a.size();
        let (c, h, w) = (size[0] as usize, size[1] as usize, size[2] as usize);
        let flat = a.reshape([c as i64, -1]);
        let min = flat.amin(&[1i64][..], true);
        let max = flat.amax(&[1i64][..], true);
        let norm = (&flat - &min) / (max - &min).clamp_min(1e-6);
        let norm = Vec::<f32>::try_from(norm.flatten(0, -1))?;
        let means = Vec::<f32>::try_from(flat.mean_dim(&[1i64][..], false, Kind::Float))?;
        let tiles = (0..c)
            .map(|ch| {
                RgbImage::from_fn(w as u32, h as u32, |x, y| colormap(norm[ch * h * w + y as usize * w + x as usize]))
            })
            .collect();
        let mut strongest: Vec<(usize, f32)> = means.into_iter().enumerate().collect();
        strongest.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.push(FeatureMaps { layer: want.clone(), tiles, strongest, size: (h, w) });
    }
    Ok(out)
}

/// A perceptually ordered dark-blue → yellow ramp (approximates viridis).
fn colormap(v: f32) -> image::Rgb<u8> {
    const STOPS: [[f32; 3]; 5] =
        [[68., 1., 84.], [59., 82., 139.], [33., 145., 140.], [94., 201., 98.], [253., 231., 37.]];
    let v = v.clamp(0.0, 1.0) * 4.0;
    let i = (v.floor() as usize).min(3);
    let t = v - i as f32;
    let c: [u8; 3] = std::array::from_fn(|k| (STOPS[i][k] * (1.0 - t) + STOPS[i + 1][k] * t).round() as u8);
    image::Rgb(c)
}
