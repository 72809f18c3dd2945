//! The NEON epilogue step: 16 lanes as four 4-lane vectors, `SCVTF`,
//! `FMUL`, `FADD`, `FMAX`/`FMIN`, `FCVTNS` (round to nearest, ties to
//! even), the zero point, the clamp, and two narrowing moves to one 16-byte
//! store.

use std::arch::aarch64::*;

use super::{Params, Requant};

/// The vectors every step shares.
pub(super) struct Consts {
    zero_point: int32x4_t,
    lo: int32x4_t,
    hi: int32x4_t,
    /// The residual's multiplier and zero point.
    residual: Option<(float32x4_t, int32x4_t)>,
}

impl Consts {
    #[allow(unused_unsafe)]
    pub(super) fn new(rq: &Requant) -> Consts {
        // SAFETY: NEON is in the aarch64 baseline; dup takes no pointer.
        unsafe {
            Consts {
                zero_point: vdupq_n_s32(rq.zero_point),
                lo: vdupq_n_s32(i32::from(rq.clamp.0)),
                hi: vdupq_n_s32(i32::from(rq.clamp.1)),
                residual: rq.residual.map(|(m, z)| (vdupq_n_f32(m), vdupq_n_s32(z))),
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
        let limit = vdupq_n_f32(super::super::LIMIT);
        let neg = vnegq_f32(limit);
        let r = res.map(|r| {
            let v = vld1q_s8(r);
            let (l, h) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
            [vmovl_s16(vget_low_s16(l)), vmovl_high_s16(l), vmovl_s16(vget_low_s16(h)), vmovl_high_s16(h)]
        });
        let mut q = [vdupq_n_s32(0); 4];
        for (i, q) in q.iter_mut().enumerate() {
            let (m, b) = match p {
                Params::Row(m, b) => (vld1q_f32(m.as_ptr().add(4 * i)), vld1q_s32(b.as_ptr().add(4 * i))),
                Params::One(m, b) => (vdupq_n_f32(m), vdupq_n_s32(b)),
            };
            let mut v = vmulq_f32(vcvtq_f32_s32(vaddq_s32(vld1q_s32(acc.add(4 * i)), b)), m);
            if let (Some(r), Some((mr, zr))) = (r, k.residual) {
                v = vaddq_f32(v, vmulq_f32(vcvtq_f32_s32(vsubq_s32(r[i], zr)), mr));
            }
            let v = vminq_f32(vmaxq_f32(v, neg), limit);
            *q = vminq_s32(vmaxq_s32(vaddq_s32(vcvtnq_s32_f32(v), k.zero_point), k.lo), k.hi);
        }
        let l = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
        let h = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
        vst1q_s8(out, vcombine_s8(vmovn_s16(l), vmovn_s16(h)));
    }
}
