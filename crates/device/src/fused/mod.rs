//! Tern's own fused convolution ops for x86-64, put in tract's plan in
//! place of tract's.
//!
//! tract 0.23 turns a 1×1 convolution into a matrix product whose
//! activation operand it packs into panels at every inference
//! (`OptMatMulPack`), and a full convolution such as a MobileNet stem into a
//! padding pass, a lazy im2col and a product; a ReLU6 after a convolution
//! is a separate pass over its output. In a MobileNet-style graph these are
//! most of the work. This module replaces, in the decluttered graph:
//! - each f32 1×1 convolution (the `EinSum` tract's declutter makes of it,
//!   channels first or last on either side) with the bias `Add` after it;
//! - each f32 full convolution (`Conv`, one group, 2-D) with its bias;
//!
//! and in both cases a residual `Add` and a `Max`/`Min` clamp (ReLU, ReLU6)
//! that follow alone, by one op, [`FusedConv`], that:
//! - packs the weights once, at load, in panels of 16 output channels;
//! - reads the activations where they are (a 1×1 convolution) or from one
//!   zero-padded copy of the input (a full convolution), broadcasting one
//!   input value at a time against a panel of weights: nothing is packed
//!   or gathered per inference;
//! - adds the bias and the residual and clamps in registers before the
//!   single store of each output.
//!
//! A channel-last depthwise convolution, with the same clamp and residual
//! after it, becomes a [`FusedDepthwise`] (see its module).
//!
//! The kernels are AVX2 + FMA (the convolution's 6 positions × 16 channels
//! a tile, 12 accumulators), AVX-512 for the convolution (12 × 32, 24
//! accumulators) and NEON on aarch64. [`rewrite`] uses them where
//! [`supported`] says so and leaves the graph to tract elsewhere.
//!
//! Layout: each op in its own module with its portable loops (`conv`,
//! `depthwise`), its kernels below it, one file per ISA (`conv/avx2.rs`,
//! `depthwise/avx2.rs`), chosen at run time from the CPU's features; the
//! graph matcher apart (`rewrite`). The ops know their kernels only by the
//! `compute` call that picks one.

pub mod check;
mod conv;
mod depthwise;
mod rewrite;

pub use conv::{FusedConv, Input, Layout, Patches, Spec};
pub use depthwise::{FusedDepthwise, Geometry};
pub use rewrite::rewrite;

use tract_onnx::tract_core::internal::*;

/// Whether [`rewrite`] puts Tern's fused ops in plans on this CPU: every
/// aarch64 CPU (NEON kernels) and x86-64 with AVX2 and FMA (the AVX-512
/// convolution kernel where the CPU has it). Each was measured against
/// tract's own kernels on such a CPU (docs/performance.md).
pub fn supported() -> bool {
    cfg!(target_arch = "aarch64") || has_kernel()
}

/// The ISA of the kernels the fused ops run on this CPU, in words: NEON,
/// AVX-512, AVX2 + FMA, or portable (plain loops).
pub fn kernel_isa() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "neon"
    } else if has_avx512() {
        "avx-512 (convolutions), avx2+fma (depthwise)"
    } else if has_kernel() {
        "avx2+fma"
    } else {
        "portable"
    }
}

/// Whether the AVX2 + FMA kernels can run here (the ops run their portable
/// loops elsewhere).
fn has_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the convolutions run the AVX-512 kernel: where the CPU has
/// AVX-512F, unless `TERN_FUSED_X86=avx2` asks for the AVX2 one (to measure
/// on one machine what an AVX2-only CPU such as Zen 3 runs).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && std::env::var("TERN_FUSED_X86").as_deref() != Ok("avx2")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}


/// Refuses NaN clamp bounds: the ops' equality (`Eq`) and `max`/`min`
/// chain assume there are none.
fn check_clamp(clamp: (f32, f32)) -> TractResult<()> {
    ensure!(!clamp.0.is_nan() && !clamp.1.is_nan(), "clamp to {clamp:?}");
    Ok(())
}

/// The data of a fused op's inputs: the first's, and the residual's (the
/// second input, shaped as the output) when the op adds one.
fn operands<'a>(op: &dyn std::fmt::Debug, inputs: &'a [TValue], residual: bool, out_shape: &[usize]) -> TractResult<(&'a [f32], Option<usize>)> {
    ensure!(inputs.len() == 1 + residual as usize, "{} inputs to {op:?}", inputs.len());
    let x = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
    let res = if residual {
        ensure!(inputs[1].shape() == out_shape, "{op:?} given a {:?} residual", inputs[1].shape());
        Some(inputs[1].as_ptr::<f32>()? as usize)
    } else {
        None
    };
    Ok((x, res))
}

/// The end of every output of the portable loops: the residual at `at`,
/// then the clamp.
///
/// # Safety
/// `residual`, when given, holds a value at `at`.
unsafe fn finish(mut acc: f32, residual: Option<*const f32>, at: usize, clamp: (f32, f32)) -> f32 {
    if let Some(r) = residual {
        // SAFETY: the caller's residual holds a value at `at`.
        acc += unsafe { *r.add(at) };
    }
    acc.max(clamp.0).min(clamp.1)
}
