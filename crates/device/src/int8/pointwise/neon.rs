//! The channel-major tile of [`QPointwise`] in NEON: [`TC`] output channels
//! × [`TP`] pixels, one input channel a step, the pixels widened to i16
//! once and multiplied into i32 sums by lane (`SMLAL`/`SMLAL2`), 16
//! accumulators.

use std::arch::aarch64::*;

use super::{TC, TP};

/// The i32 sums of a tile: `acc[c][j] = Σₖ x[k·n + j]·w[k, c]` for the
/// `ci` input channels.
///
/// # Safety
/// `x` points at a tile's first pixel with `ci` rows of `n` values and at
/// least [`TP`] readable from each row start; `w` holds `ci × TC` values.
pub(super) unsafe fn tile(x: *const i8, n: usize, ci: usize, w: &[i16]) -> [[i32; TP]; TC] {
    // SAFETY: NEON is in the aarch64 baseline; every load stays in the
    // rows and weights the caller vouches for.
    unsafe {
        let mut a = [[vdupq_n_s32(0); 4]; TC];
        for k in 0..ci {
            let xv = vld1q_s8(x.add(k * n));
            let (xl, xh) = (vmovl_s8(vget_low_s8(xv)), vmovl_high_s8(xv));
            let wv = vld1_s16(w.as_ptr().add(k * TC));
            macro_rules! lane {
                ($c:literal) => {
                    a[$c][0] = vmlal_lane_s16::<$c>(a[$c][0], vget_low_s16(xl), wv);
                    a[$c][1] = vmlal_high_lane_s16::<$c>(a[$c][1], xl, wv);
                    a[$c][2] = vmlal_lane_s16::<$c>(a[$c][2], vget_low_s16(xh), wv);
                    a[$c][3] = vmlal_high_lane_s16::<$c>(a[$c][3], xh, wv);
                };
            }
            lane!(0);
            lane!(1);
            lane!(2);
            lane!(3);
        }
        let mut out = [[0i32; TP]; TC];
        for c in 0..TC {
            for q in 0..4 {
                vst1q_s32(out[c].as_mut_ptr().add(4 * q), a[c][q]);
            }
        }
        out
    }
}
