//! The tiles of [`QPointwise`] in NEON. Channel-first input: [`TC`] output
//! channels × [`TP`] pixels, one input channel a step, the pixels widened
//! to i16 once and multiplied into i32 sums by lane (`SMLAL`/`SMLAL2`), 16
//! accumulators. Channel-last input: [`PB`] pixels × [`CB`] output
//! channels, 16 input channels a step, by `SDOT` where the CPU has it
//! (16 multiply-accumulates an instruction) and by `SMULL`/`SMLAL2`/`SADALP`
//! elsewhere.

use std::arch::aarch64::*;

use super::{CB, PB, TC, TP};

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

/// Rows of [`PB`] pixels (channel-last) against [`CB`] output channels:
/// `acc[p][c] = Σₖ x_p[k]·w_c[k]`, 16 input channels a step, each pixel
/// against each channel in one vector of four 4-wide partial sums, reduced
/// by pairwise adds at the end.
macro_rules! rows_tile {
    ($x:ident, $ci:ident, $w:ident, $kp:ident, $step:ident) => {{
        let mut a = [[vdupq_n_s32(0); CB]; PB];
        let whole = $ci / 16 * 16;
        let mut k = 0;
        while k < whole {
            let xv = [vld1q_s8($x[0].add(k)), vld1q_s8($x[1].add(k)), vld1q_s8($x[2].add(k)), vld1q_s8($x[3].add(k))];
            let wv = [vld1q_s8($w.add(k)), vld1q_s8($w.add($kp + k)), vld1q_s8($w.add(2 * $kp + k)), vld1q_s8($w.add(3 * $kp + k))];
            for p in 0..PB {
                for c in 0..CB {
                    a[p][c] = $step(a[p][c], xv[p], wv[c]);
                }
            }
            k += 16;
        }
        if whole < $ci {
            // The last input channels of each row through a zeroed buffer
            // (the weights past `ci` are zeros).
            let mut xv = [vdupq_n_s8(0); PB];
            for (p, xv) in xv.iter_mut().enumerate() {
                let mut b = [0i8; 16];
                std::ptr::copy_nonoverlapping($x[p].add(whole), b.as_mut_ptr(), $ci - whole);
                *xv = vld1q_s8(b.as_ptr());
            }
            let wv = [vld1q_s8($w.add(k)), vld1q_s8($w.add($kp + k)), vld1q_s8($w.add(2 * $kp + k)), vld1q_s8($w.add(3 * $kp + k))];
            for p in 0..PB {
                for c in 0..CB {
                    a[p][c] = $step(a[p][c], xv[p], wv[c]);
                }
            }
        }
        let mut out = [[0i32; CB]; PB];
        for p in 0..PB {
            let s = vpaddq_s32(vpaddq_s32(a[p][0], a[p][1]), vpaddq_s32(a[p][2], a[p][3]));
            vst1q_s32(out[p].as_mut_ptr(), s);
        }
        out
    }};
}

/// One `SDOT`: `acc[i] += Σⱼ a[4i + j]·b[4i + j]`.
///
/// # Safety
/// The CPU has the dot product instructions.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register operands only; the caller vouches for dotprod.
    unsafe {
        std::arch::asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) acc, in(vreg) a, in(vreg) b,
            options(pure, nomem, nostack));
    }
    acc
}

/// `acc[i] += a[4i]·b[4i] + … + a[4i + 3]·b[4i + 3]` without `SDOT`: the
/// products two by two into i16 (`SMULL`, `SMLAL2`: each ≤ 128·127, two
/// ≤ 32 512, exact), then pairwise into i32 (`SADALP`).
#[inline(always)]
fn mull(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is in the aarch64 baseline; registers only.
    #[allow(unused_unsafe)]
    unsafe {
        vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b))
    }
}

/// The sums of [`PB`] channel-last pixel rows against [`CB`] weight rows,
/// by `SDOT`: `acc[p][c] = Σₖ x[p][k]·w[c·kp + k]` over `k < ci`.
///
/// # Safety
/// The CPU has dotprod; each `x[p]` has `ci` readable values; `w` has
/// `CB × kp` readable, `kp` = `ci` rounded up to 16, zeros past `ci`.
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn rows_sdot(x: &[*const i8; PB], ci: usize, w: *const i8, kp: usize) -> [[i32; CB]; PB] {
    // SAFETY: every load is in a row of `ci` values (the tail through a
    // buffer) or in the `CB × kp` weights, as the caller vouches.
    unsafe { rows_tile!(x, ci, w, kp, sdot) }
}

/// [`rows_sdot`] without the dot product instructions (`SMULL`,
/// `SMLAL2`, `SADALP`); weights within ±127.
///
/// # Safety
/// As [`rows_sdot`], less dotprod.
pub(super) unsafe fn rows_mull(x: &[*const i8; PB], ci: usize, w: *const i8, kp: usize) -> [[i32; CB]; PB] {
    // SAFETY: as in `rows_sdot`.
    unsafe { rows_tile!(x, ci, w, kp, mull) }
}
