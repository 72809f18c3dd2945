//! The second architecture, MobileNetV2 (torchvision layout), checked
//! against tch's own independent `tch::vision::mobilenet::v2` on the same
//! random weights and statistics: our spec must name and wire every layer
//! the way torchvision does, so real torchvision weights load as they are.

use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tern_host::pretrained::ImagenetModel;
use tern_model_format::arch::Backbone;

#[test]
fn matches_tch_vision_mobilenet_v2() {
    tch::manual_seed(7);
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("mobilenet-v2-random.safetensors");

    // tch's reference model, with non-trivial batch-norm statistics.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let reference = tch::vision::mobilenet::v2(&vs.root(), 1000);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("running_mean") {
                t.copy_(&(Tensor::randn_like(&t) * 0.1));
            } else if name.ends_with("running_var") {
                t.copy_(&(Tensor::rand_like(&t) + 0.5));
            } else if name.ends_with(".weight") && t.dim() == 1 {
                // Batch-norm scale (convolution and linear weights are 4-D and 2-D).
                t.copy_(&(Tensor::rand_like(&t) + 0.5));
            }
        }
    });
    vs.save(&weights).unwrap();
    vs.freeze();

    let x = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| reference.forward_t(&x, false));
    let ours = ImagenetModel::load(Backbone::MobilenetV2, &weights, Device::Cpu).unwrap();
    let got = ours.logits(&x);
    let diff = f64::try_from((&want - &got).abs().max()).unwrap();
    let scale = f64::try_from(want.abs().max()).unwrap();
    eprintln!("MobileNetV2: max |Δlogit| = {diff:.2e} (max |logit| {scale:.2})");
    assert!(scale > 0.1, "degenerate logits");
    assert!(diff <= 1e-4, "max |Δlogit| {diff:e}");

    // The exporter accepts the same file.
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, (0..1000).map(|i| format!("class {i}\n")).collect::<String>()).unwrap();
    let bundle = dir.path().join("mobilenet-v2.onnx");
    let m = tern_host::pretrained::export_imagenet(Backbone::MobilenetV2, &weights, &labels, &bundle).unwrap();
    assert_eq!(m.architecture.backbone, "mobilenet-v2");
    assert_eq!(m.preprocessing, Backbone::MobilenetV2.preprocessing());
}
