//! The NEON epilogue step: 16 lanes as four 4-lane vectors, `SCVTF`,
//! `FMUL` (the residual's product added by `FADD`), `FCVTNS` (round to
//! nearest, ties to even, saturating), two saturating narrows to i16, the
//! zero point by a saturating i16 add, a saturating narrow to one int8
//! vector, the clamp on it (`SMAX`/`SMIN`), one 16-byte store.
//!
//! It equals [`Requant::apply`] without its bound to ±`LIMIT`:
//! [`Requant::check`] keeps every `v` finite, a rounded `v` past ±1024 has
//! its sign's extreme after the saturating steps just as a bounded one
//! has after the clamp, and a clamp inside the int8 range commutes with
//! the saturation to it. [`requant_sums`] is the step on sums in
//! registers, for kernels that requantize their tiles where they are.

use std::arch::aarch64::*;

use super::{Params, Requant};

/// The vectors every step shares.
pub(in crate::int8) struct Consts {
    zero_point: int16x8_t,
    lo: int8x16_t,
    hi: int8x16_t,
    /// The residual's multiplier and zero point.
    residual: Option<(float32x4_t, int8x8_t)>,
}

impl Consts {
    /// The vectors of `rq`, whose zero points are int8 ([`Requant::check`]).
    #[allow(unused_unsafe)]
    pub(in crate::int8) fn new(rq: &Requant) -> Consts {
        // SAFETY: NEON is in the aarch64 baseline; dup takes no pointer.
        unsafe {
            Consts {
                zero_point: vdupq_n_s16(rq.zero_point as i16),
                lo: vdupq_n_s8(rq.clamp.0),
                hi: vdupq_n_s8(rq.clamp.1),
                residual: rq.residual.map(|(m, z)| (vdupq_n_f32(m), vdup_n_s8(z as i8))),
            }
        }
    }
}

/// Requantizes 16 lanes: `out[j] = Requant::apply(acc[j], c(j), res[j])`.
///
/// # Safety
/// `acc` has 16 readable values, `res` (when given) 16, `out` 16 writable.
#[inline]
pub(super) unsafe fn requant16(k: &Consts, acc: *const i32, p: Params<'_>, res: Option<*const i8>, out: *mut i8) {
    // SAFETY: the caller vouches for 16 lanes at `acc`, `res` and `out`;
    // a `Params::Row` holds 16 multipliers and biases (sliced to length).
    unsafe {
        let mut s = [vdupq_n_s32(0); 4];
        let mut m = [vdupq_n_f32(0.0); 4];
        for i in 0..4 {
            let (mi, b) = match p {
                Params::Row(m, b) => (vld1q_f32(m.as_ptr().add(4 * i)), vld1q_s32(b.as_ptr().add(4 * i))),
                Params::One(m, b) => (vdupq_n_f32(m), vdupq_n_s32(b)),
            };
            s[i] = vaddq_s32(vld1q_s32(acc.add(4 * i)), b);
            m[i] = mi;
        }
        vst1q_s8(out, requant_sums(k, s, m, res));
    }
}

/// The 16 int8 outputs of sums `s` (bias included; lanes 4i..4i + 4 in
/// `s[i]`) with multipliers `m` and the residual's 16 values at `res`.
///
/// # Safety
/// `res` (when given) has 16 readable values.
#[inline(always)]
pub(in crate::int8) unsafe fn requant_sums(k: &Consts, s: [int32x4_t; 4], m: [float32x4_t; 4], res: Option<*const i8>) -> int8x16_t {
    // SAFETY: the one load is the 16 residual values the caller vouches for.
    unsafe { requant_regs(k, s, m, res.map(|r| vld1q_s8(r))) }
}

/// [`requant_sums`] with the residual's 16 values in a register.
#[inline(always)]
pub(in crate::int8) fn requant_regs(k: &Consts, s: [int32x4_t; 4], m: [float32x4_t; 4], res: Option<int8x16_t>) -> int8x16_t {
    // SAFETY: NEON is in the aarch64 baseline; registers only.
    #[allow(unused_unsafe)]
    unsafe {
        let mut v = [vdupq_n_f32(0.0); 4];
        for i in 0..4 {
            v[i] = vmulq_f32(vcvtq_f32_s32(s[i]), m[i]);
        }
        if let (Some(r), Some((mr, zr))) = (res, k.residual) {
            let (l, h) = (vsubl_s8(vget_low_s8(r), zr), vsubl_s8(vget_high_s8(r), zr));
            let r = [vmovl_s16(vget_low_s16(l)), vmovl_high_s16(l), vmovl_s16(vget_low_s16(h)), vmovl_high_s16(h)];
            for i in 0..4 {
                v[i] = vaddq_f32(v[i], vmulq_f32(vcvtq_f32_s32(r[i]), mr));
            }
        }
        let l = vqmovn_high_s32(vqmovn_s32(vcvtnq_s32_f32(v[0])), vcvtnq_s32_f32(v[1]));
        let h = vqmovn_high_s32(vqmovn_s32(vcvtnq_s32_f32(v[2])), vcvtnq_s32_f32(v[3]));
        let (l, h) = (vqaddq_s16(l, k.zero_point), vqaddq_s16(h, k.zero_point));
        vminq_s8(vmaxq_s8(vqmovn_high_s16(vqmovn_s16(l), h), k.lo), k.hi)
    }
}
