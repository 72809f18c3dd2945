//! Tern's fused ops (`tern_device::fused`) against tract's own kernels on
//! the ImageNet bundle and real photos: the plan really holds the fused
//! ops where the CPU takes them (none elsewhere), and its logits equal
//! those of tract's own plan to 1e-4, at one thread and at two.
//!
//! One test function: the kernel choice and the thread count are
//! process-wide settings.

mod common;

use common::*;
use tern_device::engine::{optimized_model, use_tract_kernels_only, Compute};
use tern_device::{fused, perf, Classifier};
use tern_model_format::preprocess::{open_image, preprocess};
use tern_model_format::Bundle;

const TOLERANCE: f32 = 1e-4;

fn op_count(bundle: &Bundle, name: &str) -> usize {
    let model = optimized_model(bundle, Compute::F32).expect("plan");
    model.nodes().iter().filter(|n| n.op.name() == name).count()
}

#[test]
fn fused_plan_matches_tracts_own_on_photos_at_one_and_two_threads() {
    let bundle = Bundle::read(imagenet_bundle()).expect("bundle");
    use_tract_kernels_only(false);
    let (convs, depthwise) = (op_count(&bundle, "TernFusedConv"), op_count(&bundle, "TernFusedDepthwise"));
    if fused::supported() {
        // EfficientNet-Lite0: the stem, 32 1×1 convolutions; 15 of the 16
        // depthwise layers (the first stays channel-first).
        assert_eq!((convs, depthwise), (33, 15), "fused ops in the plan");
    } else {
        assert_eq!((convs, depthwise), (0, 0), "fused ops on a CPU that does not take them");
    }
    use_tract_kernels_only(true);
    assert_eq!(op_count(&bundle, "TernFusedConv") + op_count(&bundle, "TernFusedDepthwise"), 0);

    let pre = bundle.manifest.preprocessing;
    let inputs: Vec<Vec<f32>> = ["chelsea.png", "coffee.png", "astronaut.png"]
        .iter()
        .map(|p| preprocess(&open_image(&sample(p)).expect("photo"), &pre))
        .collect();
    for threads in [1, 2] {
        perf::use_threads(threads).expect("threads");
        use_tract_kernels_only(true);
        let mut own = Classifier::from_bundle(bundle.clone()).expect("tract plan");
        use_tract_kernels_only(false);
        let mut tern = Classifier::from_bundle(bundle.clone()).expect("fused plan");
        for (k, x) in inputs.iter().enumerate() {
            let (a, b) = (own.run(x).expect("run"), tern.run(x).expect("run"));
            let worst = a.logits.iter().zip(&b.logits).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= TOLERANCE, "photo {k}, {threads} thread(s): max |Δlogit| {worst}");
            assert_eq!(own.top_k(&a, 1)[0].index, tern.top_k(&b, 1)[0].index, "photo {k}, {threads} thread(s)");
        }
    }
    perf::use_threads(1).expect("threads");
}
