//! The tiles of [`QPointwise`] in NEON. Channel-first input: [`TC`] output
//! channels × [`TP`] pixels, one input channel a step, the pixels widened
//! to i16 once and multiplied into i32 sums by lane (`SMLAL`/`SMLAL2`), 16
//! accumulators (the portable paths' kernel; the op itself transposes a
//! channel-first input on aarch64). Channel-last input, with `SDOT`: the
//! broadcast tile, 4 pixels × 16 output channels, each pixel's 4 input
//! channels the lane of `SDOT` by element against 4 output channels' 4
//! weights ([`last_tile`]; [`last_tile_t`] stores it channel-first, its
//! sums transposed in registers). Without `SDOT`: [`PB`] pixels × [`CB`]
//! output channels, each pair's partial sums by `SMULL`/`SMLAL2`/`SADALP`,
//! reduced at the end, four such tiles per 4 × 16 ([`last_tile_mull`]) or
//! 16 × 4 ([`first_tile_mull`]) block. The fused tiles requantize their
//! sums in registers ([`requant_sums`]) and store int8.

use std::arch::aarch64::*;

use super::super::epilogue::neon::{requant_regs, requant_sums, Consts};
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
macro_rules! rows_sums {
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
            // The last input channels of each row by an 8-byte load where
            // there are 8, else through a zeroed buffer (the weights past
            // `ci` are zeros).
            let mut xv = [vdupq_n_s8(0); PB];
            for (p, xv) in xv.iter_mut().enumerate() {
                if $ci - whole == 8 {
                    *xv = vcombine_s8(vld1_s8($x[p].add(whole)), vdup_n_s8(0));
                } else {
                    let mut b = [0i8; 16];
                    std::ptr::copy_nonoverlapping($x[p].add(whole), b.as_mut_ptr(), $ci - whole);
                    *xv = vld1q_s8(b.as_ptr());
                }
            }
            let wv = [vld1q_s8($w.add(k)), vld1q_s8($w.add($kp + k)), vld1q_s8($w.add(2 * $kp + k)), vld1q_s8($w.add(3 * $kp + k))];
            for p in 0..PB {
                for c in 0..CB {
                    a[p][c] = $step(a[p][c], xv[p], wv[c]);
                }
            }
        }
        let s: [int32x4_t; PB] = std::array::from_fn(|p| vpaddq_s32(vpaddq_s32(a[p][0], a[p][1]), vpaddq_s32(a[p][2], a[p][3])));
        s
    }};
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


/// `acc[i] += Σⱼ w[4i + j]·x[4·L + j]`: `SDOT` by element, lane `L` of `x`.
macro_rules! sdot_lane {
    ($acc:expr, $w:expr, $x:expr, $l:literal) => {
        std::arch::asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.4b[{l}]", inout(vreg) $acc, in(vreg) $w, in(vreg) $x, l = const $l,
            options(pure, nomem, nostack))
    };
}

/// The pixel values of rows `x + p·ci` (p < P), input channels
/// `16·s..16·s + 16`, where fewer than 16 remain (`rem`, then zeros past
/// them: their weights are zeros).
///
/// # Safety
/// Each row has `16·s + rem` readable values.
#[inline(always)]
unsafe fn tail_rows<const P: usize>(x: *const i8, ci: usize, at: usize, rem: usize) -> [int8x16_t; P] {
    // SAFETY: reads `rem` values of each row from `at`, as the caller vouches.
    unsafe {
        std::array::from_fn(|p| {
            let r = x.add(p * ci + at);
            if rem == 8 {
                vcombine_s8(vld1_s8(r), vdup_n_s8(0))
            } else {
                let mut b = [0i8; 16];
                std::ptr::copy_nonoverlapping(r, b.as_mut_ptr(), rem.min(16));
                vld1q_s8(b.as_ptr())
            }
        })
    }
}

/// The sums of `P` channel-last pixel rows (`x + p·ci`) against `V` vectors
/// of 4 output channels, starting from `init`: `acc[p][v][i] = init[p][v][i]
/// + Σₖ x[p·ci + k]·w(4v + i, k)`, the weights packed by groups of 4 input
/// channels: group `g`, vector `v`, `w(4v + i, 4g + j)` at `(g·V + v)·16 +
/// 4i + j`; each pixel's four input channels broadcast by `SDOT` by
/// element, so the sums land channel-last with no reduction.
///
/// # Safety
/// dotprod; `x` has `P` rows of `ci` at a stride of `ci`; `w` has
/// `ci.div_ceil(4)·V·16` values, zeros past `ci`.
#[inline(always)]
unsafe fn broadcast<const P: usize, const V: usize>(x: *const i8, ci: usize, w: *const i8, init: [[int32x4_t; V]; P]) -> [[int32x4_t; V]; P] {
    // SAFETY: loads inside the rows and the packed weights the caller
    // vouches for; `tail_rows` reads the last `ci % 16` of each row.
    unsafe {
        let mut a = init;
        let whole = ci / 16;
        macro_rules! lane {
            ($xv:ident, $wp:ident, $l:literal) => {
                let wv: [int8x16_t; V] = std::array::from_fn(|v| vld1q_s8($wp.add(($l * V + v) * 16)));
                for p in 0..P {
                    for v in 0..V {
                        sdot_lane!(a[p][v], wv[v], $xv[p], $l);
                    }
                }
            };
        }
        for s in 0..whole {
            let xv: [int8x16_t; P] = std::array::from_fn(|p| vld1q_s8(x.add(p * ci + 16 * s)));
            let wp = w.add(s * 4 * V * 16);
            lane!(xv, wp, 0);
            lane!(xv, wp, 1);
            lane!(xv, wp, 2);
            lane!(xv, wp, 3);
        }
        let rem = ci - 16 * whole;
        if rem > 0 {
            let xv = tail_rows::<P>(x, ci, 16 * whole, rem);
            let wp = w.add(whole * 4 * V * 16);
            lane!(xv, wp, 0);
            if rem > 4 {
                lane!(xv, wp, 1);
            }
            if rem > 8 {
                lane!(xv, wp, 2);
            }
            if rem > 12 {
                lane!(xv, wp, 3);
            }
        }
        a
    }
}

/// Channel-last in and out: 4 pixel rows (`x + p·ci`) against one block of
/// [`BC`](super::BC) output channels (`w`, packed for [`broadcast`] with 4 vectors),
/// the sums from the biases, requantized in registers: `out[p·stride + c]`
/// for `c < BC`, the residual at `res[p·stride + c]`.
///
/// # Safety
/// dotprod; `x` has 4 rows of `ci` at a stride of `ci`; `w` has
/// `ci.div_ceil(4)·64` values, zeros past `ci`; `mult`, `bias` have [`BC`](super::BC)
/// values; `res` (when given) and `out` hold [`BC`](super::BC) values at each of the 4
/// rows of `stride`.
#[target_feature(enable = "dotprod")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn last_tile(
    x: *const i8,
    ci: usize,
    w: *const i8,
    k: &Consts,
    mult: *const f32,
    bias: *const i32,
    res: Option<*const i8>,
    out: *mut i8,
    stride: usize,
) {
    // SAFETY: the loads and stores stay in the ranges the caller vouches for.
    unsafe {
        let b: [int32x4_t; 4] = std::array::from_fn(|v| vld1q_s32(bias.add(4 * v)));
        let a = broadcast::<4, 4>(x, ci, w, [b; 4]);
        let m: [float32x4_t; 4] = std::array::from_fn(|v| vld1q_f32(mult.add(4 * v)));
        for (p, a) in a.iter().enumerate() {
            vst1q_s8(out.add(p * stride), requant_sums(k, *a, m, res.map(|r| r.add(p * stride))));
        }
    }
}

/// The sums of 16 pixels × 4 channels (`a[p][0]`: channels 0..4 of pixel
/// `p`, biases included) transposed to 4 channels × 16 pixels,
/// requantized, channel `j` of `j0..j1` stored at `out[(j − j0)·stride]`
/// with the residual at `res[(j − j0)·stride]`.
///
/// # Safety
/// `mult` has 4 values; `j0 ≤ j1 ≤ 4`; `res` (when given) and `out` hold 16
/// values at each of the `j1 − j0` rows of `stride`.
#[inline(always)]
unsafe fn store_first(a: [[int32x4_t; 1]; 16], k: &Consts, mult: *const f32, res: Option<*const i8>, out: *mut i8, stride: usize, (j0, j1): (usize, usize)) {
    // SAFETY: the loads and stores stay in the ranges the caller vouches for.
    unsafe {
        // s[j][q]: pixels 4q..4q + 4 of channel j.
        let mut s = [[vdupq_n_s32(0); 4]; 4];
        for q in 0..4 {
            let (a0, a1, a2, a3) = (a[4 * q][0], a[4 * q + 1][0], a[4 * q + 2][0], a[4 * q + 3][0]);
            let (t0, t1) = (vtrn1q_s32(a0, a1), vtrn2q_s32(a0, a1));
            let (t2, t3) = (vtrn1q_s32(a2, a3), vtrn2q_s32(a2, a3));
            let d = |v: int32x4_t| vreinterpretq_s64_s32(v);
            s[0][q] = vreinterpretq_s32_s64(vtrn1q_s64(d(t0), d(t2)));
            s[1][q] = vreinterpretq_s32_s64(vtrn1q_s64(d(t1), d(t3)));
            s[2][q] = vreinterpretq_s32_s64(vtrn2q_s64(d(t0), d(t2)));
            s[3][q] = vreinterpretq_s32_s64(vtrn2q_s64(d(t1), d(t3)));
        }
        for j in j0..j1 {
            let m = vdupq_n_f32(*mult.add(j));
            let at = (j - j0) * stride;
            vst1q_s8(out.add(at), requant_sums(k, s[j], [m; 4], res.map(|r| r.add(at))));
        }
    }
}

/// `dst[c·rows + r] = src[r·cols + c]` over the 16 × 16 block of rows
/// `r0..r0 + 16` and columns `c0..c0 + 16`: 16 loads, four rounds of
/// `TRN1`/`TRN2` (8, 16, 32, 64 bits), 16 stores.
///
/// # Safety
/// `r0 + 16 ≤ rows`, `c0 + 16 ≤ cols`; `src` and `dst` have `rows·cols`
/// values.
pub(super) unsafe fn transpose16(src: *const i8, dst: *mut i8, rows: usize, cols: usize, r0: usize, c0: usize) {
    // SAFETY: every row and column read or written is inside the block the
    // caller vouches for.
    unsafe {
        let mut v: [int8x16_t; 16] = std::array::from_fn(|i| vld1q_s8(src.add((r0 + i) * cols + c0)));
        for i in (0..16).filter(|i| i & 1 == 0) {
            let (a, b) = (v[i], v[i + 1]);
            v[i] = vtrn1q_s8(a, b);
            v[i + 1] = vtrn2q_s8(a, b);
        }
        for i in (0..16).filter(|i| i & 2 == 0) {
            let (a, b) = (vreinterpretq_s16_s8(v[i]), vreinterpretq_s16_s8(v[i + 2]));
            v[i] = vreinterpretq_s8_s16(vtrn1q_s16(a, b));
            v[i + 2] = vreinterpretq_s8_s16(vtrn2q_s16(a, b));
        }
        for i in (0..16).filter(|i| i & 4 == 0) {
            let (a, b) = (vreinterpretq_s32_s8(v[i]), vreinterpretq_s32_s8(v[i + 4]));
            v[i] = vreinterpretq_s8_s32(vtrn1q_s32(a, b));
            v[i + 4] = vreinterpretq_s8_s32(vtrn2q_s32(a, b));
        }
        for i in 0..8 {
            let (a, b) = (vreinterpretq_s64_s8(v[i]), vreinterpretq_s64_s8(v[i + 8]));
            v[i] = vreinterpretq_s8_s64(vtrn1q_s64(a, b));
            v[i + 8] = vreinterpretq_s8_s64(vtrn2q_s64(a, b));
        }
        for (j, v) in v.iter().enumerate() {
            vst1q_s8(dst.add((c0 + j) * rows + r0), *v);
        }
    }
}

/// [`last_tile`] without the dot product instructions: the 16 channels as
/// four tiles of [`CB`] weight rows (`w`: 16 rows of `kp`, zeros past
/// `ci`), each by `SMULL`/`SMLAL2`/`SADALP` ([`mull`]'s step).
///
/// # Safety
/// As [`last_tile`], with `w` holding 16 rows of `kp` (`ci` rounded up to
/// 16) and weights within ±127 instead of dotprod.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn last_tile_mull(
    x: *const i8,
    ci: usize,
    w: *const i8,
    kp: usize,
    k: &Consts,
    mult: *const f32,
    bias: *const i32,
    res: Option<*const i8>,
    out: *mut i8,
    stride: usize,
) {
    // SAFETY: the loads and stores stay in the ranges the caller vouches for.
    unsafe {
        let xs = [x, x.add(ci), x.add(2 * ci), x.add(3 * ci)];
        let mut s = [[vdupq_n_s32(0); 4]; PB];
        for (t, b) in (0..4).map(|t| (t, vld1q_s32(bias.add(4 * t)))) {
            let wt = w.add(t * CB * kp);
            let r = rows_sums!(xs, ci, wt, kp, mull);
            for p in 0..PB {
                s[p][t] = vaddq_s32(r[p], b);
            }
        }
        let m: [float32x4_t; 4] = std::array::from_fn(|v| vld1q_f32(mult.add(4 * v)));
        for (p, s) in s.iter().enumerate() {
            vst1q_s8(out.add(p * stride), requant_sums(k, *s, m, res.map(|r| r.add(p * stride))));
        }
    }
}

/// [`first_tile`] without the dot product instructions: the 16 pixels as
/// four blocks of [`PB`] against the 4 weight rows `w` (of `kp`, zeros
/// past `ci`), each by [`mull`]'s step.
///
/// # Safety
/// As [`first_tile`], with `w` holding 4 rows of `kp` (`ci` rounded up to
/// 16) and weights within ±127 instead of dotprod.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn first_tile_mull(
    x: *const i8,
    ci: usize,
    w: *const i8,
    kp: usize,
    k: &Consts,
    mult: *const f32,
    bias: *const i32,
    res: Option<*const i8>,
    out: *mut i8,
    stride: usize,
    channels: (usize, usize),
) {
    // SAFETY: the loads and stores stay in the ranges the caller vouches for.
    unsafe {
        let b = vld1q_s32(bias);
        let mut a = [[b]; 16];
        for q in 0..4 {
            let xs = [x.add(4 * q * ci), x.add((4 * q + 1) * ci), x.add((4 * q + 2) * ci), x.add((4 * q + 3) * ci)];
            let r = rows_sums!(xs, ci, w, kp, mull);
            for p in 0..PB {
                a[4 * q + p][0] = vaddq_s32(r[p], b);
            }
        }
        store_first(a, k, mult, res, out, stride, channels);
    }
}

/// Channel-last in, channel-first out: 4 pixel rows against one block of
/// [`BC`](super::BC) output channels, as [`last_tile`], the sums of each 4
/// channels transposed in registers to 4 channels × 4 pixels and
/// requantized (`mult4`: each channel's multiplier 4 times): channel `j`
/// of `j0..j1` to `out[(j − j0)·stride + p]`, `p < 4`, the residual at
/// `res[(j − j0)·stride + p]`.
///
/// # Safety
/// dotprod; `x` has 4 rows of `ci` at a stride of `ci`; `w` has
/// `ci.div_ceil(4)·64` values, zeros past `ci`; `mult4` has 64 values,
/// `bias` 16; `j0 < j1 ≤ 16`; `res` (when given) and `out` hold 4 values at
/// each of the `j1 − j0` rows of `stride`.
#[target_feature(enable = "dotprod")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn last_tile_t(
    x: *const i8,
    ci: usize,
    w: *const i8,
    k: &Consts,
    mult4: *const f32,
    bias: *const i32,
    res: Option<*const i8>,
    out: *mut i8,
    stride: usize,
    (j0, j1): (usize, usize),
) {
    // SAFETY: the loads and stores stay in the ranges the caller vouches
    // for: channel c = 4v + j is read and written only for j0 ≤ c < j1.
    unsafe {
        let b: [int32x4_t; 4] = std::array::from_fn(|v| vld1q_s32(bias.add(4 * v)));
        let a = broadcast::<4, 4>(x, ci, w, [b; 4]);
        for v in (j0 / 4)..j1.div_ceil(4) {
            let (a0, a1, a2, a3) = (a[0][v], a[1][v], a[2][v], a[3][v]);
            let (t0, t1) = (vtrn1q_s32(a0, a1), vtrn2q_s32(a0, a1));
            let (t2, t3) = (vtrn1q_s32(a2, a3), vtrn2q_s32(a2, a3));
            let d = |v: int32x4_t| vreinterpretq_s64_s32(v);
            let s = [
                vreinterpretq_s32_s64(vtrn1q_s64(d(t0), d(t2))),
                vreinterpretq_s32_s64(vtrn1q_s64(d(t1), d(t3))),
                vreinterpretq_s32_s64(vtrn2q_s64(d(t0), d(t2))),
                vreinterpretq_s32_s64(vtrn2q_s64(d(t1), d(t3))),
            ];
            let m: [float32x4_t; 4] = std::array::from_fn(|j| vld1q_f32(mult4.add(16 * v + 4 * j)));
            let inside = |j: usize| (j0..j1).contains(&(4 * v + j));
            let at = |j: usize| (4 * v + j - j0) * stride;
            let r = res.map(|r| {
                let mut g = vdupq_n_s32(0);
                macro_rules! gather {
                    ($j:literal) => {
                        if inside($j) {
                            g = vsetq_lane_s32::<$j>(std::ptr::read_unaligned(r.add(at($j)) as *const i32), g);
                        }
                    };
                }
                gather!(0);
                gather!(1);
                gather!(2);
                gather!(3);
                vreinterpretq_s8_s32(g)
            });
            let o = vreinterpretq_s32_s8(requant_regs(k, s, m, r));
            macro_rules! scatter {
                ($j:literal) => {
                    if inside($j) {
                        std::ptr::write_unaligned(out.add(at($j)) as *mut i32, vgetq_lane_s32::<$j>(o));
                    }
                };
            }
            scatter!(0);
            scatter!(1);
            scatter!(2);
            scatter!(3);
        }
    }
}
