//! Tern's fused ops (`tern_device::fused`) against tract's own kernels on
//! the ImageNet bundle and real photos: the plan really holds the fused
//! ops where the CPU takes them (none elsewhere), and its logits equal
//! those of tract's own plan to 1e-4, at one thread and at two.

mod common;

use common::*;
use tern_device::engine::{optimized_model, Kernels, LoadOptions};
use tern_device::{fused, Classifier};
use tern_model_format::preprocess::open_image;
use tern_model_format::Bundle;

const TOLERANCE: f32 = 1e-4;

fn op_count(bundle: &Bundle, kernels: Kernels, name: &str) -> usize {
    let model = optimized_model(bundle, &LoadOptions::default().kernels(kernels)).expect("plan");
    model.nodes().iter().filter(|n| n.op.name() == name).count()
}

#[test]
fn the_plan_holds_the_fused_ops_where_the_cpu_takes_them() {
    let bundle = Bundle::read(imagenet_bundle()).expect("bundle");
    let count = |k| (op_count(&bundle, k, "TernFusedConv"), op_count(&bundle, k, "TernFusedDepthwise"));
    if fused::supported() {
        // EfficientNet-Lite0: the stem, 32 1×1 convolutions; the 16
        // depthwise layers (the first one channel-first).
        assert_eq!(count(Kernels::Tern), (33, 16), "fused ops in the plan");
        let clf = Classifier::from_bundle(bundle.clone(), &LoadOptions::default()).expect("plan");
        assert_eq!(clf.fused_ops(), 49);
    } else {
        assert_eq!(count(Kernels::Tern), (0, 0), "fused ops on a CPU that does not take them");
    }
    assert_eq!(count(Kernels::Tract), (0, 0), "fused ops with tract's kernels asked for");
}

#[test]
fn fused_plan_matches_tracts_own_on_photos_at_one_and_two_threads() {
    let bundle = Bundle::read(imagenet_bundle()).expect("bundle");
    let images: Vec<_> = ["chelsea.png", "coffee.png", "astronaut.png"]
        .iter()
        .map(|p| open_image(&sample(p)).expect("photo"))
        .collect();
    for threads in [1, 2] {
        let options = LoadOptions::default().threads(threads);
        let mut own = Classifier::from_bundle(bundle.clone(), &options.kernels(Kernels::Tract)).expect("tract plan");
        let mut tern = Classifier::from_bundle(bundle.clone(), &options).expect("fused plan");
        for (k, img) in images.iter().enumerate() {
            let (a, b) = (own.classify(img).expect("run"), tern.classify(img).expect("run"));
            let worst = a.logits.iter().zip(&b.logits).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= TOLERANCE, "photo {k}, {threads} thread(s): max |Δlogit| {worst}");
            assert_eq!(own.top_k(&a, 1)[0].index, tern.top_k(&b, 1)[0].index, "photo {k}, {threads} thread(s)");
        }
    }
}
