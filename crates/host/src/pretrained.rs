//! The pretrained network: its ImageNet bundle and its tch forward pass.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::nn;
use tern_model_format::arch::Backbone as Arch;
use tern_model_format::export::pretrained_bundle;
use tern_model_format::weights::SafeTensorsFile;
use tern_model_format::Manifest;

use crate::backbone::Backbone;

/// Where the pretrained weights came from, as recorded next to them by
/// `scripts/prepare_models.py` (`<weights>.provenance.json` with the
/// extension replaced); "unrecorded" otherwise.
pub fn weights_source(weights: &Path) -> String {
    let prov = weights.with_extension("provenance.json");
    let Ok(text) = std::fs::read_to_string(&prov) else { return "unrecorded".into() };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => {
            let s = &v["source"];
            format!(
                "{} {}=={} ({}), license: {}",
                s["registry"].as_str().unwrap_or("?"),
                s["package"].as_str().unwrap_or("?"),
                s["version"].as_str().unwrap_or("?"),
                s["file"].as_str().unwrap_or("?"),
                s["license"].as_str().unwrap_or("?")
            )
        }
        Err(_) => "unrecorded".into(),
    }
}

/// Reads a label file: one label per line, blank lines refused.
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read labels {}", path.display()))?;
    let labels: Vec<String> = text.lines().map(|l| l.trim().to_owned()).collect();
    if let Some(i) = labels.iter().position(String::is_empty) {
        bail!("{}: line {} is empty", path.display(), i + 1);
    }
    Ok(labels)
}

/// Writes the 1000-class ImageNet bundle of the pretrained backbone.
pub fn export_imagenet(arch: Arch, weights: &Path, labels: &Path, out: &Path) -> Result<Manifest> {
    let file = SafeTensorsFile::open(weights).with_context(|| format!("cannot read weights {}", weights.display()))?;
    let labels = read_labels(labels)?;
    let created_by = format!("tern-host {}", env!("CARGO_PKG_VERSION"));
    let (graph, manifest) = pretrained_bundle(arch, &file, labels, &weights_source(weights), &created_by)
        .with_context(|| format!("cannot build the {} graph from {}", arch.name(), weights.display()))?;
    tern_model_format::bundle::write(out, graph, manifest).with_context(|| format!("cannot write {}", out.display()))
}

/// The pretrained backbone with its ImageNet classifier, in tch.
pub struct ImagenetModel {
    /// The variables (backbone and classifier).
    pub vs: nn::VarStore,
    /// The backbone.
    pub backbone: Backbone,
    /// The 1000-class classifier.
    pub fc: nn::Linear,
}

impl ImagenetModel {
    /// Loads the weights file into a new var store on `device`.
    pub fn load(arch: Arch, weights: &Path, device: tch::Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let spec = arch.spec();
        let backbone = Backbone::new(&vs.root(), &spec);
        let (w, _) = arch.imagenet_classifier();
        let prefix = w.trim_end_matches(".weight");
        let mut p = vs.root();
        for part in prefix.split('.') {
            p = p.sub(part);
        }
        let fc = nn::linear(p, spec.feature_width() as i64, 1000, Default::default());
        vs.load(weights).with_context(|| format!("cannot load {} weights from {}", arch.name(), weights.display()))?;
        vs.freeze();
        Ok(ImagenetModel { vs, backbone, fc })
    }

    /// Logits `[N, 1000]` for a batch of preprocessed inputs.
    pub fn logits(&self, x: &tch::Tensor) -> tch::Tensor {
        tch::no_grad(|| self.forward(x))
    }

    /// Logits with the autograd graph kept (gradients flow to `x`; the
    /// weights are frozen).
    pub fn forward(&self, x: &tch::Tensor) -> tch::Tensor {
        self.backbone.features(x).apply(&self.fc)
    }
}

/// The pretrained ImageNet network with its labels, for the
/// visualisations.
pub struct ImagenetClassifier {
    /// The network.
    pub model: ImagenetModel,
    /// The 1000 class names.
    pub labels: Vec<String>,
    /// Its preprocessing.
    pub preprocessing: tern_model_format::Preprocessing,
    /// Where it computes.
    pub device: tch::Device,
}

impl ImagenetClassifier {
    /// Loads weights and labels.
    pub fn load(arch: Arch, weights: &Path, labels: &Path, device: tch::Device) -> Result<Self> {
        let labels = read_labels(labels)?;
        if labels.len() != 1000 {
            bail!("{}: {} labels, expected the 1000 ImageNet classes", "labels", labels.len());
        }
        Ok(ImagenetClassifier {
            model: ImagenetModel::load(arch, weights, device)?,
            labels,
            preprocessing: arch.preprocessing(),
            device,
        })
    }
}

impl crate::viz::Differentiable for ImagenetClassifier {
    fn forward(&self, x: &tch::Tensor) -> tch::Tensor {
        self.model.forward(x)
    }
    fn backbone(&self) -> &Backbone {
        &self.model.backbone
    }
    fn preprocessing(&self) -> tern_model_format::Preprocessing {
        self.preprocessing
    }
    fn labels(&self) -> &[String] {
        &self.labels
    }
    fn device(&self) -> tch::Device {
        self.device
    }
}

/// Resolves a class given as an index or a label (exact, then
/// case-insensitive).
pub fn class_index(labels: &[String], class: &str) -> Result<usize> {
    if let Ok(i) = class.parse::<usize>() {
        if i < labels.len() {
            return Ok(i);
        }
        bail!("class index {i} is out of range (0..{})", labels.len());
    }
    labels
        .iter()
        .position(|l| l == class)
        .or_else(|| labels.iter().position(|l| l.eq_ignore_ascii_case(class)))
        .with_context(|| format!("no class named {class:?}"))
}
