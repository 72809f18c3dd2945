//! [`QAdd`](super::QAdd) in NEON: 16 values a step, each input less its zero
//! point widened to i16 (`SSUBL`, exact) then i32, converted, multiplied,
//! the two products added, rounded half to even (`FCVTNS`, saturating),
//! narrowed with saturation to i16, plus the output's zero point (a
//! saturating i16 add), narrowed with saturation to int8 (the clamp). With
//! the multipliers bounded ([`QAdd::check`](super::QAdd::check)) every sum
//! is finite, and past ±1024 the saturating steps give the same extreme as
//! [`QAdd::apply`]'s bound and clamp.

use std::arch::aarch64::*;

/// `out[j] = QAdd::apply(a[j], b[j])` for `j < n16` (a multiple of 16).
///
/// # Safety
/// `a`, `b` have `n16` readable values, `out` `n16` writable; the zero
/// points are int8 ([`QAdd::check`](super::QAdd::check)).
pub(super) unsafe fn add(op: &super::QAdd, a: *const i8, b: *const i8, out: *mut i8, n16: usize) {
    // SAFETY: the loads and stores stay in the n16 values the caller vouches for.
    unsafe {
        let (ma, za) = (vdupq_n_f32(op.a.0), vdup_n_s8(op.a.1 as i8));
        let (mb, zb) = (vdupq_n_f32(op.b.0), vdup_n_s8(op.b.1 as i8));
        let zy = vdupq_n_s16(op.zero_point as i16);
        // The 16 values less `z`, as four f32 vectors times `m`.
        let scaled = |v: int8x16_t, z: int8x8_t, m: float32x4_t| {
            let (l, h) = (vsubl_s8(vget_low_s8(v), z), vsubl_s8(vget_high_s8(v), z));
            let w = [vmovl_s16(vget_low_s16(l)), vmovl_high_s16(l), vmovl_s16(vget_low_s16(h)), vmovl_high_s16(h)];
            w.map(|w| vmulq_f32(vcvtq_f32_s32(w), m))
        };
        let mut j = 0;
        while j < n16 {
            let (x, y) = (scaled(vld1q_s8(a.add(j)), za, ma), scaled(vld1q_s8(b.add(j)), zb, mb));
            let q: [int32x4_t; 4] = std::array::from_fn(|i| vcvtnq_s32_f32(vaddq_f32(x[i], y[i])));
            let l = vqaddq_s16(vqmovn_high_s32(vqmovn_s32(q[0]), q[1]), zy);
            let h = vqaddq_s16(vqmovn_high_s32(vqmovn_s32(q[2]), q[3]), zy);
            vst1q_s8(out.add(j), vqmovn_high_s16(vqmovn_s16(l), h));
            j += 16;
        }
    }
}
