//! [`QAdd`](super::QAdd) in NEON: 16 values a step, each input widened to
//! i32 less its zero point, converted, multiplied, the two products added,
//! bounded, rounded half to even (`FCVTNS`), plus the output's zero point,
//! narrowed with saturation (the clamp to int8).

use std::arch::aarch64::*;

/// `out[j] = QAdd::apply(a[j], b[j])` for `j < n16` (a multiple of 16).
///
/// # Safety
/// `a`, `b` have `n16` readable values, `out` `n16` writable.
pub(super) unsafe fn add(op: &super::QAdd, a: *const i8, b: *const i8, out: *mut i8, n16: usize) {
    // SAFETY: the loads and stores stay in the n16 values the caller vouches for.
    unsafe {
        let (ma, za) = (vdupq_n_f32(op.a.0), vdupq_n_s32(op.a.1));
        let (mb, zb) = (vdupq_n_f32(op.b.0), vdupq_n_s32(op.b.1));
        let zy = vdupq_n_s32(op.zero_point);
        let limit = vdupq_n_f32(super::super::LIMIT);
        let neg = vnegq_f32(limit);
        let widen = |v: int8x16_t| {
            let (l, h) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
            [vmovl_s16(vget_low_s16(l)), vmovl_high_s16(l), vmovl_s16(vget_low_s16(h)), vmovl_high_s16(h)]
        };
        let mut j = 0;
        while j < n16 {
            let (av, bv) = (widen(vld1q_s8(a.add(j))), widen(vld1q_s8(b.add(j))));
            let mut q = [vdupq_n_s32(0); 4];
            for i in 0..4 {
                let x = vmulq_f32(vcvtq_f32_s32(vsubq_s32(av[i], za)), ma);
                let y = vmulq_f32(vcvtq_f32_s32(vsubq_s32(bv[i], zb)), mb);
                let v = vminq_f32(vmaxq_f32(vaddq_f32(x, y), neg), limit);
                q[i] = vaddq_s32(vcvtnq_s32_f32(v), zy);
            }
            let l = vcombine_s16(vqmovn_s32(q[0]), vqmovn_s32(q[1]));
            let h = vcombine_s16(vqmovn_s32(q[2]), vqmovn_s32(q[3]));
            vst1q_s8(out.add(j), vcombine_s8(vqmovn_s16(l), vqmovn_s16(h)));
            j += 16;
        }
    }
}
