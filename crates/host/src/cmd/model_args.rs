//! The model options shared by the visualisation subcommands.

use std::path::PathBuf;

use anyhow::Result;
use tern_host::device::{select, DeviceChoice};
use tern_host::pretrained::ImagenetClassifier;
use tern_model_format::arch::Backbone;

/// Which network to look into.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Backbone architecture.
    #[arg(long, default_value = "efficientnet-lite0", value_parser = super::export_pretrained::parse_backbone)]
    pub backbone: Backbone,
    /// Pretrained weights (safetensors).
    #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
    pub weights: PathBuf,
    /// ImageNet class names.
    #[arg(long, default_value = "models/imagenet-labels.txt")]
    pub labels: PathBuf,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

impl ModelArgs {
    /// Loads the network.
    pub fn load(&self) -> Result<ImagenetClassifier> {
        ImagenetClassifier::load(self.backbone, &self.weights, &self.labels, select(self.device)?)
    }
}
