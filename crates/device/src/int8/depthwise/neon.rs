//! The channel-last kernel of [`QDepthwise`](super::QDepthwise) in NEON, over
//! the input padded with its zero point (so every tap is inside and the
//! zero point's share sits in the bias): one output row, 16 channels a
//! step, the positions of the row one after another. Two taps' products
//! are summed in i16 (`SMULL` then `SMLAL`, or their `2` forms: each
//! |product| ≤ 128·127, two ≤ 32 512, exact), then widened into the four
//! i32 sums (`SADDW`/`SADDW2`), which start at the bias; the 16 sums are
//! requantized in registers ([`requant_sums`]) and stored once.

use std::arch::aarch64::*;

use super::super::epilogue::neon::{requant_sums, Consts};

/// The window of one output position in the padded input.
pub(super) struct Window {
    /// Kernel rows and columns.
    pub kh: usize,
    pub kw: usize,
    /// Elements between padded input rows.
    pub row: usize,
    /// Channels (elements between input columns and between taps).
    pub c: usize,
    /// Elements between the windows of two neighbouring output positions.
    pub step: usize,
}

/// One output row, channels `0..c16` (a multiple of 16): for output
/// position `ox < ow`, `out[ox·c + ch] = requant(bias[ch] + Σ_taps x[ky·row
/// + kx·c + ox·step + ch]·w(ky·kw + kx, ch))` with the residual at
/// `res[ox·c + ch]`; the weights by blocks of 16 channels, each tap's 16
/// together: `w(t, ch)` at `(ch / 16·kh·kw + t)·16 + ch % 16`.
///
/// # Safety
/// Every such index of `x`, `w`, `res` and `out` is in range; `mult` and
/// `bias` have `c16` values; the weights are within ±127.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn row(
    x: *const i8,
    w: *const i8,
    t: &Window,
    ow: usize,
    k: &Consts,
    mult: *const f32,
    bias: *const i32,
    res: Option<*const i8>,
    out: *mut i8,
    c16: usize,
) {
    // The row's loops around `$taps`, which adds the taps of one position
    // and 16 channels to `$a` with `$tap(i)`: tap i's input and weights.
    macro_rules! row_with {
        ($kh:expr, $kw:expr, |$a:ident, $tap:ident| $taps:block) => {{
            let (kh, kw, c) = ($kh, $kw, t.c);
            let mut ch = 0;
            while ch < c16 {
                let b = [vld1q_s32(bias.add(ch)), vld1q_s32(bias.add(ch + 4)), vld1q_s32(bias.add(ch + 8)), vld1q_s32(bias.add(ch + 12))];
                let m = [vld1q_f32(mult.add(ch)), vld1q_f32(mult.add(ch + 4)), vld1q_f32(mult.add(ch + 8)), vld1q_f32(mult.add(ch + 12))];
                let wb = w.add(ch * kh * kw);
                for ox in 0..ow {
                    let xc = x.add(ox * t.step + ch);
                    let $tap = |i: usize| (vld1q_s8(xc.add((i / kw) * t.row + (i % kw) * c)), vld1q_s8(wb.add(16 * i)));
                    let mut $a = b;
                    $taps
                    let r = res.map(|r| r.add(ox * c + ch));
                    vst1q_s8(out.add(ox * c + ch), requant_sums(k, $a, m, r));
                }
                ch += 16;
            }
        }};
    }
    // Tap i = (ky, kx) of position ox, channels ch..ch + 16, reads x[ky·row + kx·c + ox·step + ch..] and the block's 16
    // weights of tap i, and writes out[ox·c + ch..]. SAFETY: the indices the caller vouches for (each arm's kernel is the window's).
    unsafe {
        match (t.kh, t.kw) {
            (3, 3) => row_with!(3, 3, |a, tap| {
                pair(&mut a, tap(0), tap(1));
                pair(&mut a, tap(2), tap(3));
                pair(&mut a, tap(4), tap(5));
                pair(&mut a, tap(6), tap(7));
                single(&mut a, tap(8));
            }),
            (5, 5) => row_with!(5, 5, |a, tap| {
                pair(&mut a, tap(0), tap(1));
                pair(&mut a, tap(2), tap(3));
                pair(&mut a, tap(4), tap(5));
                pair(&mut a, tap(6), tap(7));
                pair(&mut a, tap(8), tap(9));
                pair(&mut a, tap(10), tap(11));
                pair(&mut a, tap(12), tap(13));
                pair(&mut a, tap(14), tap(15));
                pair(&mut a, tap(16), tap(17));
                pair(&mut a, tap(18), tap(19));
                pair(&mut a, tap(20), tap(21));
                pair(&mut a, tap(22), tap(23));
                single(&mut a, tap(24));
            }),
            (kh, kw) => row_with!(kh, kw, |a, tap| {
                let mut i = 0;
                while i + 1 < kh * kw {
                    pair(&mut a, tap(i), tap(i + 1));
                    i += 2;
                }
                if i < kh * kw {
                    single(&mut a, tap(i));
                }
            }),
        }
    }
}

/// The products of two taps (input, weights) summed in i16, widened into
/// `a`.
#[inline(always)]
fn pair(a: &mut [int32x4_t; 4], (x0, w0): (int8x16_t, int8x16_t), (x1, w1): (int8x16_t, int8x16_t)) {
    // SAFETY: NEON is in the aarch64 baseline; registers only.
    #[allow(unused_unsafe)]
    unsafe {
        let lo = vmlal_s8(vmull_s8(vget_low_s8(x0), vget_low_s8(w0)), vget_low_s8(x1), vget_low_s8(w1));
        let hi = vmlal_high_s8(vmull_high_s8(x0, w0), x1, w1);
        widen(a, lo, hi);
    }
}

/// The products of one tap, widened into `a`.
#[inline(always)]
fn single(a: &mut [int32x4_t; 4], (x0, w0): (int8x16_t, int8x16_t)) {
    // SAFETY: NEON is in the aarch64 baseline; registers only.
    #[allow(unused_unsafe)]
    unsafe {
        widen(a, vmull_s8(vget_low_s8(x0), vget_low_s8(w0)), vmull_high_s8(x0, w0));
    }
}

/// `a` += the 16 i16 values `lo`, `hi`, widened.
#[inline(always)]
fn widen(a: &mut [int32x4_t; 4], lo: int16x8_t, hi: int16x8_t) {
    // SAFETY: NEON is in the aarch64 baseline; registers only.
    #[allow(unused_unsafe)]
    unsafe {
        a[0] = vaddw_s16(a[0], vget_low_s16(lo));
        a[1] = vaddw_high_s16(a[1], lo);
        a[2] = vaddw_s16(a[2], vget_low_s16(hi));
        a[3] = vaddw_high_s16(a[3], hi);
    }
}
