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
/// + kx·c + ox·step + ch]·w[(ky·kw + kx)·c + ch])` with the residual at
/// `res[ox·c + ch]`.
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
    // SAFETY: the caller vouches for every index; the kernel sizes below
    // are the same window.
    unsafe {
        match (t.kh, t.kw) {
            (3, 3) => row_of::<3, 3>(x, w, t, ow, k, mult, bias, res, out, c16),
            (5, 5) => row_of::<5, 5>(x, w, t, ow, k, mult, bias, res, out, c16),
            _ => row_any(x, w, t, ow, k, mult, bias, res, out, c16),
        }
    }
}

/// [`row`] for a `KH × KW` kernel, its taps unrolled.
#[allow(clippy::too_many_arguments)]
unsafe fn row_of<const KH: usize, const KW: usize>(
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
    // SAFETY: as in `row`.
    unsafe { row_taps(x, w, t, KH, KW, ow, k, mult, bias, res, out, c16) }
}

/// [`row`] for any kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn row_any(
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
    // SAFETY: as in `row`.
    unsafe { row_taps(x, w, t, t.kh, t.kw, ow, k, mult, bias, res, out, c16) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_taps(
    x: *const i8,
    w: *const i8,
    t: &Window,
    kh: usize,
    kw: usize,
    ow: usize,
    k: &Consts,
    mult: *const f32,
    bias: *const i32,
    res: Option<*const i8>,
    out: *mut i8,
    c16: usize,
) {
    // SAFETY: tap (ky, kx) of position ox, channels ch..ch + 16, reads
    // x[ky·row + kx·c + ox·step + ch..] and w[(ky·kw + kx)·c + ch..], and
    // writes out[ox·c + ch..]: the indices the caller vouches for.
    unsafe {
        let taps = kh * kw;
        let c = t.c;
        let at = |i: usize| (i / kw) * t.row + (i % kw) * c;
        let mut ch = 0;
        while ch < c16 {
            let b = [vld1q_s32(bias.add(ch)), vld1q_s32(bias.add(ch + 4)), vld1q_s32(bias.add(ch + 8)), vld1q_s32(bias.add(ch + 12))];
            let m = [vld1q_f32(mult.add(ch)), vld1q_f32(mult.add(ch + 4)), vld1q_f32(mult.add(ch + 8)), vld1q_f32(mult.add(ch + 12))];
            let wc = w.add(ch);
            for ox in 0..ow {
                let xc = x.add(ox * t.step + ch);
                let mut a = b;
                let mut i = 0;
                while i + 1 < taps {
                    let (x0, x1) = (vld1q_s8(xc.add(at(i))), vld1q_s8(xc.add(at(i + 1))));
                    let (w0, w1) = (vld1q_s8(wc.add(i * c)), vld1q_s8(wc.add((i + 1) * c)));
                    let lo = vmlal_s8(vmull_s8(vget_low_s8(x0), vget_low_s8(w0)), vget_low_s8(x1), vget_low_s8(w1));
                    let hi = vmlal_high_s8(vmull_high_s8(x0, w0), x1, w1);
                    a[0] = vaddw_s16(a[0], vget_low_s16(lo));
                    a[1] = vaddw_high_s16(a[1], lo);
                    a[2] = vaddw_s16(a[2], vget_low_s16(hi));
                    a[3] = vaddw_high_s16(a[3], hi);
                    i += 2;
                }
                if i < taps {
                    let (x0, w0) = (vld1q_s8(xc.add(at(i))), vld1q_s8(wc.add(i * c)));
                    let lo = vmull_s8(vget_low_s8(x0), vget_low_s8(w0));
                    let hi = vmull_high_s8(x0, w0);
                    a[0] = vaddw_s16(a[0], vget_low_s16(lo));
                    a[1] = vaddw_high_s16(a[1], lo);
                    a[2] = vaddw_s16(a[2], vget_low_s16(hi));
                    a[3] = vaddw_high_s16(a[3], hi);
                }
                let r = res.map(|r| r.add(ox * c + ch));
                vst1q_s8(out.add(ox * c + ch), requant_sums(k, a, m, r));
            }
            ch += 16;
        }
    }
}
