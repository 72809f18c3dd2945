//! A channel-last depthwise convolution kernel for x86-64, handed to tract.
//!
//! tract 0.23 runs a depthwise convolution channel-last (NHWC) only where
//! tract-linalg has a "channel-inner" kernel for the machine
//! (`tract_linalg::routines::depthwise_c_f32`): its declutter pass then moves
//! the depthwise layers of a MobileNet-style graph to NHWC on its own, and
//! the neighbouring 1×1 convolutions absorb the layout change. tract ships
//! such a kernel for aarch64 and wasm but not for x86-64, where every
//! depthwise layer stays NCHW and walks one channel plane at a time — 42%
//! of EfficientNet-Lite0's time in the profile against onnxruntime.
//!
//! This module registers one, through tract-linalg's own routine registry
//! (the `inventory` collection of `tract_linalg::routines::Routine`, the
//! mechanism tract's built-in kernels use): an AVX-512 version (16 channels
//! a vector, masked tails) and an AVX2 + FMA one (8 channels, scalar
//! tails). tract picks between them, and its own code, at run time from
//! the CPU's features, so one binary still runs on any x86-64.
//!
//! It also adds one rung to tract-linalg's matrix-product kernel ladder
//! (`tract_linalg::mmm_tiers::MmmTier`, asked before tract's own x86
//! tiers): on AVX-512 machines a product with at most 32 rows and long
//! rows, the 3-channel stem convolution of MobileNet-style graphs, runs
//! the 16×12 AVX-512 tile instead of the 32×3 AVX2 one tract's cost model
//! picks (see [`x86::small_m_preferred`]).
//!
//! The contract is tract's `DepthwiseCF32`: `len` output positions of
//! `channels` contiguous channels each; point `i`, channel `c` is
//! `bias[c] + Σₜ kernel[tap_indices[t]·k_stride + c] ·
//! input[i·in_stride + offsets[t] + c]`.

/// Makes sure this module's registrations are linked into the binary
/// (a library's `inventory` entries are dropped by the linker when nothing
/// refers to their object file) and returns whether tract now has a
/// channel-last depthwise kernel on this machine.
pub fn ensure_registered() -> bool {
    #[cfg(target_arch = "x86_64")]
    std::hint::black_box((x86::depthwise_c_f32_avx2 as *const (), x86::small_m_preferred as *const ()));
    tract_linalg::routines::depthwise_c_f32().is_some()
}

/// The name of the channel-last depthwise kernel tract runs here, if any.
pub fn depthwise_c_kernel_name() -> Option<&'static str> {
    use tract_linalg::routines::{best_for, Func};
    ensure_registered();
    let isa = tract_linalg::isa::native();
    best_for(Func::DepthwiseC, tract_onnx::prelude::DatumType::F32, &isa).map(|r| r.name())
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use tract_linalg::isa::{Arch, Isa, IsaReq, IsaSet};
    use tract_linalg::mmm::{Query, Suitable};
    use tract_linalg::mmm_tiers::MmmTier;
    use tract_linalg::routines::{Func, Routine, RoutineFactory};
    use tract_onnx::prelude::DatumType;

    inventory::submit! {
        Routine {
            func: Func::DepthwiseC,
            arch: Some(Arch::X86_64),
            isa: IsaReq::ANY.needing(&[Isa::X86_64Avx2, Isa::X86_64Fma]),
            boost: 0,
            round_trip: false,
            factory: RoutineFactory::DepthwiseCF32 { name: "tern_avx2_fma_depthwise_c_f32", run: depthwise_c_f32_avx2 },
        }
    }

    inventory::submit! {
        Routine {
            func: Func::DepthwiseC,
            arch: Some(Arch::X86_64),
            isa: IsaReq::ANY.needing(&[Isa::X86_64Avx512f]),
            boost: 0,
            round_trip: false,
            factory: RoutineFactory::DepthwiseCF32 { name: "tern_avx512_depthwise_c_f32", run: depthwise_c_f32_avx512 },
        }
    }

    inventory::submit! {
        MmmTier {
            arch: Some(Arch::X86_64),
            precedence: 9,
            name: "tern-avx512-small-m",
            applies: |isa| isa.has(Isa::X86_64Avx512f),
            preferred: small_m_preferred,
        }
    }

    /// The 16×12 AVX-512 tile for f32 products of at most 32 rows (m) and
    /// at least 1024 columns (n); no opinion otherwise (tract's own tiers
    /// answer), nor where that kernel does not suit the query.
    ///
    /// tract's cost model answers `fma_mmm_f32_32x3` for the stem of
    /// EfficientNet-Lite0 (m 32 output channels, k 27, n 12544 pixels,
    /// through lazy im2col): one 32-row panel storing three pixels per row
    /// at a time. Measured in four alternating rounds on this machine
    /// (`tern-device bench --profile`), that node took 2.0–2.8 ms with the
    /// 32×3 kernel, 1.06–1.37 ms with 16×12 and 1.38–1.57 ms with 32×6.
    pub fn small_m_preferred(
        _isa: &IsaSet,
        dt: DatumType,
        query: &Query,
        _suitable: &[Suitable],
    ) -> Option<&'static str> {
        let small_m = query.m.is_some_and(|m| m <= 32);
        let long_n = query.n.is_some_and(|n| n >= 1024);
        (dt == DatumType::F32 && small_m && long_n).then_some(SMALL_M_KERNEL)
    }

    /// The kernel [`small_m_preferred`] names.
    pub const SMALL_M_KERNEL: &str = "avx512_mmm_f32_16x12";

    /// tract's `DepthwiseCF32` with AVX2 and FMA.
    ///
    /// # Safety
    /// As `tract_linalg::routines::DepthwiseCF32`; the CPU must have AVX2
    /// and FMA (tract checks before it picks this routine).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn depthwise_c_f32_avx2(
        input: *const f32,
        output: *mut f32,
        kernel: *const f32,
        tap_indices: &[usize],
        offsets: &[isize],
        bias: *const f32,
        channels: usize,
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: isize,
    ) {
        // SAFETY: the caller's `DepthwiseCF32` contract, passed on; the CPU has AVX2 and FMA (the routine's ISA requirement).
        unsafe {
            avx2(input, output, kernel, tap_indices, offsets, bias, channels, k_stride, len, in_stride, out_stride)
        }
    }

    /// tract's `DepthwiseCF32` with AVX-512F.
    ///
    /// # Safety
    /// As `tract_linalg::routines::DepthwiseCF32`; the CPU must have
    /// AVX-512F (tract checks before it picks this routine).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn depthwise_c_f32_avx512(
        input: *const f32,
        output: *mut f32,
        kernel: *const f32,
        tap_indices: &[usize],
        offsets: &[isize],
        bias: *const f32,
        channels: usize,
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: isize,
    ) {
        // SAFETY: the caller's `DepthwiseCF32` contract, passed on; the CPU has AVX-512F (the routine's ISA requirement).
        unsafe {
            avx512(input, output, kernel, tap_indices, offsets, bias, channels, k_stride, len, in_stride, out_stride)
        }
    }

    /// Output positions computed together: each tap's kernel vector is
    /// loaded once for all of them.
    const POINTS: usize = 4;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512(
        input: *const f32,
        output: *mut f32,
        kernel: *const f32,
        tap_indices: &[usize],
        offsets: &[isize],
        bias: *const f32,
        channels: usize,
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: isize,
    ) {
        // SAFETY: the caller's `DepthwiseCF32` contract: `len` points of `channels` values at the given strides, `taps` offsets inside the input.
        unsafe {
            let taps = tap_indices.len().min(offsets.len());
            let mut c = 0usize;
            while c < channels {
                let left = channels - c;
                let mask: __mmask16 = if left >= 16 { 0xffff } else { (1u16 << left) - 1 };
                let b = _mm512_maskz_loadu_ps(mask, bias.add(c));
                let mut i = 0usize;
                while i + POINTS <= len {
                    let x = input.offset(i as isize * in_stride).add(c);
                    let (mut a0, mut a1, mut a2, mut a3) = (b, b, b, b);
                    for t in 0..taps {
                        let k = _mm512_maskz_loadu_ps(mask, kernel.add(*tap_indices.get_unchecked(t) * k_stride + c));
                        let p = x.offset(*offsets.get_unchecked(t));
                        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p), k, a0);
                        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p.offset(in_stride)), k, a1);
                        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p.offset(2 * in_stride)), k, a2);
                        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p.offset(3 * in_stride)), k, a3);
                    }
                    let o = output.offset(i as isize * out_stride).add(c);
                    _mm512_mask_storeu_ps(o, mask, a0);
                    _mm512_mask_storeu_ps(o.offset(out_stride), mask, a1);
                    _mm512_mask_storeu_ps(o.offset(2 * out_stride), mask, a2);
                    _mm512_mask_storeu_ps(o.offset(3 * out_stride), mask, a3);
                    i += POINTS;
                }
                while i < len {
                    let x = input.offset(i as isize * in_stride).add(c);
                    let mut a = b;
                    for t in 0..taps {
                        let k = _mm512_maskz_loadu_ps(mask, kernel.add(*tap_indices.get_unchecked(t) * k_stride + c));
                        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x.offset(*offsets.get_unchecked(t))), k, a);
                    }
                    _mm512_mask_storeu_ps(output.offset(i as isize * out_stride).add(c), mask, a);
                    i += 1;
                }
                c += 16;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2(
        input: *const f32,
        output: *mut f32,
        kernel: *const f32,
        tap_indices: &[usize],
        offsets: &[isize],
        bias: *const f32,
        channels: usize,
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: isize,
    ) {
        // SAFETY: the caller's `DepthwiseCF32` contract: `len` points of `channels` values at the given strides, `taps` offsets inside the input.
        unsafe {
            let taps = tap_indices.len().min(offsets.len());
            let mut c = 0usize;
            while c + 8 <= channels {
                let b = _mm256_loadu_ps(bias.add(c));
                let mut i = 0usize;
                while i + POINTS <= len {
                    let x = input.offset(i as isize * in_stride).add(c);
                    let (mut a0, mut a1, mut a2, mut a3) = (b, b, b, b);
                    for t in 0..taps {
                        let k = _mm256_loadu_ps(kernel.add(*tap_indices.get_unchecked(t) * k_stride + c));
                        let p = x.offset(*offsets.get_unchecked(t));
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p), k, a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p.offset(in_stride)), k, a1);
                        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(p.offset(2 * in_stride)), k, a2);
                        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(p.offset(3 * in_stride)), k, a3);
                    }
                    let o = output.offset(i as isize * out_stride).add(c);
                    _mm256_storeu_ps(o, a0);
                    _mm256_storeu_ps(o.offset(out_stride), a1);
                    _mm256_storeu_ps(o.offset(2 * out_stride), a2);
                    _mm256_storeu_ps(o.offset(3 * out_stride), a3);
                    i += POINTS;
                }
                while i < len {
                    let x = input.offset(i as isize * in_stride).add(c);
                    let mut a = b;
                    for t in 0..taps {
                        let k = _mm256_loadu_ps(kernel.add(*tap_indices.get_unchecked(t) * k_stride + c));
                        a = _mm256_fmadd_ps(_mm256_loadu_ps(x.offset(*offsets.get_unchecked(t))), k, a);
                    }
                    _mm256_storeu_ps(output.offset(i as isize * out_stride).add(c), a);
                    i += 1;
                }
                c += 8;
            }
            for c in c..channels {
                for i in 0..len {
                    let x = input.offset(i as isize * in_stride).add(c);
                    let mut sum = *bias.add(c);
                    for t in 0..taps {
                        sum = (*kernel.add(*tap_indices.get_unchecked(t) * k_stride + c))
                            .mul_add(*x.offset(*offsets.get_unchecked(t)), sum);
                    }
                    *output.offset(i as isize * out_stride).add(c) = sum;
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        type Kernel = unsafe fn(
            *const f32,
            *mut f32,
            *const f32,
            &[usize],
            &[isize],
            *const f32,
            usize,
            usize,
            usize,
            isize,
            isize,
        );

        /// A small deterministic generator (no test-only dependency).
        fn values(n: usize, seed: u32) -> Vec<f32> {
            let mut s = seed.wrapping_mul(2654435761).max(1);
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    (s % 2001) as f32 / 1000.0 - 1.0
                })
                .collect()
        }

        /// Every channel count around the vector widths, tap lists of a
        /// 3×3 and a 5×5 zone with some taps missing (a border zone), and
        /// strided input (stride 2) and output (padding between points):
        /// the kernel against the contract's formula in f64.
        fn check(kernel: Kernel) {
            for channels in [1usize, 3, 7, 8, 9, 15, 16, 17, 24, 31, 33, 96, 1152] {
                for (taps, len, in_stride) in [(9usize, 7usize, 2isize), (25, 5, 1), (6, 1, 1), (4, 13, 3)] {
                    let k_stride = channels + 5;
                    let tap_indices: Vec<usize> = (0..taps).map(|t| (t * 7) % taps).collect();
                    let offsets: Vec<isize> = (0..taps).map(|t| (t as isize) * channels as isize).collect();
                    let in_len = (len as isize * in_stride.abs() * channels as isize
                        + offsets.iter().max().copied().unwrap_or(0)
                        + channels as isize) as usize;
                    let input = values(in_len, channels as u32 * 31 + taps as u32);
                    let kernel_v = values(k_stride * taps, 7 + channels as u32);
                    let bias = values(channels, 11);
                    let out_stride = channels as isize + 3;
                    let mut out = vec![f32::NAN; len * out_stride as usize];
                    // SAFETY: `input`, `kernel_v` and `out` are sized for `len` points at these strides and `taps` offsets.
                    unsafe {
                        kernel(
                            input.as_ptr(),
                            out.as_mut_ptr(),
                            kernel_v.as_ptr(),
                            &tap_indices,
                            &offsets,
                            bias.as_ptr(),
                            channels,
                            k_stride,
                            len,
                            in_stride,
                            out_stride,
                        )
                    };
                    for i in 0..len {
                        for c in 0..channels {
                            let mut want = bias[c] as f64;
                            for t in 0..taps {
                                want += kernel_v[tap_indices[t] * k_stride + c] as f64
                                    * input[(i as isize * in_stride + offsets[t]) as usize + c] as f64;
                            }
                            let got = out[i * out_stride as usize + c] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "channels {channels}, taps {taps}, point {i}, channel {c}: {got} != {want}"
                            );
                        }
                        // The gap between points is never written.
                        for c in channels..out_stride as usize {
                            if i * (out_stride as usize) + c < out.len() {
                                assert!(out[i * out_stride as usize + c].is_nan(), "wrote past channel {channels}");
                            }
                        }
                    }
                }
            }
        }

        #[test]
        fn tract_picks_a_tern_kernel_where_the_cpu_has_one() {
            let name = crate::kernels::depthwise_c_kernel_name();
            if is_x86_feature_detected!("avx512f") {
                assert_eq!(name, Some("tern_avx512_depthwise_c_f32"));
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                assert_eq!(name, Some("tern_avx2_fma_depthwise_c_f32"));
            }
            assert_eq!(crate::kernels::ensure_registered(), name.is_some());
        }

        #[test]
        fn the_stem_shape_gets_the_16x12_tile_and_other_shapes_keep_tracts_choice() {
            crate::kernels::ensure_registered();
            let pick = |m, k, n| {
                tract_linalg::MmmDispatch::native()
                    .preferred_kernel(DatumType::F32, Some(m), Some(k), Some(n))
                    .map(|k| k.name().to_string())
            };
            let stem = pick(32, 27, 12544);
            if is_x86_feature_detected!("avx512f") {
                assert_eq!(stem.as_deref(), Some(SMALL_M_KERNEL));
            } else {
                assert_ne!(stem.as_deref(), Some(SMALL_M_KERNEL));
            }
            // A pointwise layer (m = pixels) and a matrix-vector product are
            // not this rule's.
            let q = |m, n| Query::plain(DatumType::F32, Some(m), Some(16), Some(n));
            let isa = tract_linalg::isa::native();
            assert_eq!(small_m_preferred(&isa, DatumType::F32, &q(12544, 96), &[]), None);
            assert_eq!(small_m_preferred(&isa, DatumType::F32, &q(32, 1), &[]), None);
            assert_eq!(small_m_preferred(&isa, DatumType::I32, &q(32, 12544), &[]), None);
            assert_eq!(small_m_preferred(&isa, DatumType::F32, &q(32, 12544), &[]), Some(SMALL_M_KERNEL));
        }

        #[test]
        fn avx2_matches_the_formula() {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                check(depthwise_c_f32_avx2);
            } else {
                eprintln!("skipped: this CPU has no AVX2/FMA");
            }
        }

        #[test]
        fn avx512_matches_the_formula() {
            if is_x86_feature_detected!("avx512f") {
                check(depthwise_c_f32_avx512);
            } else {
                eprintln!("skipped: this CPU has no AVX-512F");
            }
        }
    }
}
