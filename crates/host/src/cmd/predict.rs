//! `tern-host predict`: the pretrained network in libtorch on images.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tern_host::device::{select, DeviceChoice};
use tern_host::pretrained::{read_labels, ImagenetModel};
use tern_model_format::arch::Backbone;
use tern_model_format::preprocess::{open_image, preprocess};

/// Arguments of `predict`.
#[derive(clap::Args)]
pub struct Args {
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Backbone architecture.
    #[arg(long, default_value = "efficientnet-lite0", value_parser = super::export_pretrained::parse_backbone)]
    backbone: Backbone,
    /// Pretrained weights.
    #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
    weights: PathBuf,
    /// ImageNet class names.
    #[arg(long, default_value = "models/imagenet-labels.txt")]
    labels: PathBuf,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// One JSON object per image, with all logits.
    #[arg(long)]
    json: bool,
}

/// Prints the top-5 (or JSON with logits) per image.
pub fn run(a: Args) -> Result<()> {
    let device = select(a.device)?;
    let labels = read_labels(&a.labels)?;
    let model = ImagenetModel::load(a.backbone, &a.weights, device)?;
    let pre = a.backbone.preprocessing();
    for path in &a.images {
        let img = open_image(path).with_context(|| format!("cannot read {}", path.display()))?;
        let x = tch::Tensor::from_slice(&preprocess(&img, &pre))
            .reshape([1, 3, i64::from(pre.height), i64::from(pre.width)])
            .to_device(device);
        let logits = model.logits(&x).to_device(tch::Device::Cpu).squeeze_dim(0);
        let probs = logits.softmax(0, tch::Kind::Float);
        let (p, idx) = probs.topk(5, 0, true, true);
        let p = Vec::<f32>::try_from(p)?;
        let idx = Vec::<i64>::try_from(idx)?;
        if a.json {
            let line = serde_json::json!({
                "image": path,
                "top": idx.iter().zip(&p).map(|(&i, &q)| serde_json::json!({
                    "index": i, "label": labels.get(i as usize), "probability": q})).collect::<Vec<_>>(),
                "logits": Vec::<f32>::try_from(&logits)?,
            });
            println!("{line}");
        } else {
            println!("{}", path.display());
            for (&i, &q) in idx.iter().zip(&p) {
                println!("  {:>6.2}%  {:>4}  {}", q * 100.0, i, labels.get(i as usize).map_or("?", String::as_str));
            }
        }
    }
    Ok(())
}
