//! The aarch64 NEON kernel of [`FusedDepthwise`]: 4 interior positions ×
//! 16 channels a step (16 accumulators), 32 channels a step at the
//! borders, the last `c mod 4` channels one at a time.
//!
//! NEON is part of the aarch64 baseline: no run-time check is needed.

use std::arch::aarch64::*;

use super::{FusedDepthwise, PlaneRow};

/// Channels of one NEON vector.
const V: usize = 4;
/// Output positions of one row computed together in the interior (every
/// tap inside the input): each kernel vector is loaded once for them all.
const QUAD: usize = 4;

/// Computes output rows `oy0..oy1`.
///
/// # Safety
/// As [`FusedDepthwise::compute`].
pub(super) unsafe fn rows(
    op: &FusedDepthwise,
    x: *const f32,
    res: Option<*const f32>,
    out: *mut f32,
    oy0: usize,
    oy1: usize,
) {
    let g = &op.geometry;
    let (kw, sw) = (g.kernel.1, g.strides.1);
    // Columns whose taps are all inside the input: lo..hi.
    let lo = g.pad.1.div_ceil(sw).min(g.out.1);
    let hi = if g.w + g.pad.1 >= kw { ((g.w + g.pad.1 - kw) / sw + 1).min(g.out.1) } else { 0 }.max(lo);
    let whole = g.c / V * V;
    for oy in oy0..oy1 {
        let (ky0, ky1) = g.rows(oy);
        let mut ox = 0;
        while ox < g.out.1 {
            let quad_fits = ox >= lo && ox + QUAD <= hi;
            let cols = g.cols(ox);
            let at = (oy, ox);
            let mut ch = 0;
            // Every vector call has `ch + 4·NB` ≤ `whole` ≤ `c`, positions
            // inside the output (`ox + QUAD ≤ hi ≤ ow` for a quad) and taps
            // inside the input (`ky0..ky1`, and `cols` or `lo..hi`).
            // SAFETY: those bounds are what `quad`, `single` and `scalar` need.
            unsafe {
                if quad_fits {
                    while ch + 4 * V <= whole {
                        quad::<4>(op, x, res, out, at, ch, (ky0, ky1));
                        ch += 4 * V;
                    }
                    while ch < whole {
                        quad::<1>(op, x, res, out, at, ch, (ky0, ky1));
                        ch += V;
                    }
                } else {
                    while ch + 8 * V <= whole {
                        single::<8>(op, x, res, out, at, ch, (ky0, ky1), cols);
                        ch += 8 * V;
                    }
                    while ch < whole {
                        single::<1>(op, x, res, out, at, ch, (ky0, ky1), cols);
                        ch += V;
                    }
                }
                let positions = if quad_fits { QUAD } else { 1 };
                for dx in 0..positions {
                    for c in whole..g.c {
                        scalar(op, x, res, out, (oy, ox + dx), c, (ky0, ky1), g.cols(ox + dx));
                    }
                }
            }
            ox += if quad_fits { QUAD } else { 1 };
        }
    }
}

/// Adds the residual, clamps and stores 4 channels at `at`.
#[inline(always)]
unsafe fn store(op: &FusedDepthwise, res: Option<*const f32>, out: *mut f32, at: usize, mut v: float32x4_t) {
    // SAFETY: the caller's `at` holds 4 channels of the output (and residual).
    unsafe {
        if let Some(r) = res {
            v = vaddq_f32(v, vld1q_f32(r.add(at)));
        }
        v = vminnmq_f32(vmaxnmq_f32(v, vdupq_n_f32(op.clamp.0)), vdupq_n_f32(op.clamp.1));
        vst1q_f32(out.add(at), v);
    }
}

/// Four interior output positions `ox..ox+4` of row `oy`, channels
/// `ch..ch+4·NB`.
#[inline]
unsafe fn quad<const NB: usize>(
    op: &FusedDepthwise,
    x: *const f32,
    res: Option<*const f32>,
    out: *mut f32,
    (oy, ox): (usize, usize),
    ch: usize,
    (ky0, ky1): (usize, usize),
) {
    // SAFETY: as [`rows`] says at the call.
    unsafe {
        let g = &op.geometry;
        let (c, cp, kw, sw) = (g.c, op.bias.len(), g.kernel.1, g.strides.1);
        let step = sw * c;
        let mut acc = [[vdupq_n_f32(0.0); NB]; QUAD];
        for a in acc.iter_mut() {
            for (v, av) in a.iter_mut().enumerate() {
                *av = vld1q_f32(op.bias.as_ptr().add(ch + v * V));
            }
        }
        for ky in ky0..ky1 {
            let iy = oy * g.strides.0 + ky - g.pad.0;
            let mut p = x.add((iy * g.w + ox * sw - g.pad.1) * c + ch);
            let mut k = op.packed.as_ptr().add(ky * kw * cp + ch);
            for _ in 0..kw {
                for v in 0..NB {
                    let kv = vld1q_f32(k.add(v * V));
                    for (j, a) in acc.iter_mut().enumerate() {
                        a[v] = vfmaq_f32(a[v], vld1q_f32(p.add(j * step + v * V)), kv);
                    }
                }
                p = p.add(c);
                k = k.add(cp);
            }
        }
        let at = (oy * g.out.1 + ox) * c + ch;
        for (j, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                store(op, res, out, at + j * c + v * V, *av);
            }
        }
    }
}

/// One output position `ox` of row `oy`, channels `ch..ch+4·NB`, with the
/// taps inside the input.
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn single<const NB: usize>(
    op: &FusedDepthwise,
    x: *const f32,
    res: Option<*const f32>,
    out: *mut f32,
    (oy, ox): (usize, usize),
    ch: usize,
    (ky0, ky1): (usize, usize),
    (kx0, kx1): (usize, usize),
) {
    // SAFETY: as [`rows`] says at the call.
    unsafe {
        let g = &op.geometry;
        let (c, cp, kw) = (g.c, op.bias.len(), g.kernel.1);
        let mut acc = [vdupq_n_f32(0.0); NB];
        for (v, a) in acc.iter_mut().enumerate() {
            *a = vld1q_f32(op.bias.as_ptr().add(ch + v * V));
        }
        for ky in ky0..ky1 {
            let iy = oy * g.strides.0 + ky - g.pad.0;
            for kx in kx0..kx1 {
                let ix = ox * g.strides.1 + kx - g.pad.1;
                let p = x.add((iy * g.w + ix) * c + ch);
                let k = op.packed.as_ptr().add((ky * kw + kx) * cp + ch);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = vfmaq_f32(*a, vld1q_f32(p.add(v * V)), vld1q_f32(k.add(v * V)));
                }
            }
        }
        let at = (oy * g.out.1 + ox) * c + ch;
        for (v, a) in acc.iter().enumerate() {
            store(op, res, out, at + v * V, *a);
        }
    }
}

/// One output position, one channel `ch` (the channels past the last whole
/// vector).
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn scalar(
    op: &FusedDepthwise,
    x: *const f32,
    res: Option<*const f32>,
    out: *mut f32,
    (oy, ox): (usize, usize),
    ch: usize,
    (ky0, ky1): (usize, usize),
    (kx0, kx1): (usize, usize),
) {
    let g = &op.geometry;
    let (c, cp, kw) = (g.c, op.bias.len(), g.kernel.1);
    let mut acc = op.bias[ch];
    for ky in ky0..ky1 {
        let iy = oy * g.strides.0 + ky - g.pad.0;
        for kx in kx0..kx1 {
            let ix = ox * g.strides.1 + kx - g.pad.1;
            // SAFETY: the tap is inside the input, `ch` < `c`.
            let v = unsafe { *x.add((iy * g.w + ix) * c + ch) };
            acc = v.mul_add(op.packed[(ky * kw + kx) * cp + ch], acc);
        }
    }
    let at = (oy * g.out.1 + ox) * c + ch;
    // SAFETY: `at` is inside the output (and residual).
    unsafe { *out.add(at) = super::super::finish(acc, res, at, op.clamp) };
}

/// One channel-first output row: 16 columns at a time (four vectors), then
/// 4, then one at a time; the residual and the clamp before the one store.
///
/// # Safety
/// `r`'s pointers hold what [`PlaneRow`] says.
pub(super) unsafe fn plane_row(r: &PlaneRow) {
    // Every load reads row `ky` < kh of `wp` = ow + kw − 1 values at column
    // `x + kx + lane` < ow + kw − 1 (x + 16 or x + 4 ≤ ow).
    // SAFETY: as above; the stores and residual loads stay in the row's `ow` columns.
    unsafe {
        let (kh, kw) = r.kernel;
        let (lo, hi) = (vdupq_n_f32(r.clamp.0), vdupq_n_f32(r.clamp.1));
        let mut x = 0;
        while x + 16 <= r.ow {
            let mut a = [vdupq_n_f32(r.bias); 4];
            for ky in 0..kh {
                let row = r.src.add(ky * r.wp + x);
                for kx in 0..kw {
                    let w = *r.taps.add(ky * kw + kx);
                    for (j, v) in a.iter_mut().enumerate() {
                        *v = vfmaq_n_f32(*v, vld1q_f32(row.add(kx + V * j)), w);
                    }
                }
            }
            for (j, v) in a.iter().enumerate() {
                let mut v = *v;
                if let Some(p) = r.res {
                    v = vaddq_f32(v, vld1q_f32(p.add(x + V * j)));
                }
                vst1q_f32(r.dst.add(x + V * j), vminnmq_f32(vmaxnmq_f32(v, lo), hi));
            }
            x += 16;
        }
        while x + V <= r.ow {
            let mut a = vdupq_n_f32(r.bias);
            for ky in 0..kh {
                let row = r.src.add(ky * r.wp + x);
                for kx in 0..kw {
                    a = vfmaq_n_f32(a, vld1q_f32(row.add(kx)), *r.taps.add(ky * kw + kx));
                }
            }
            if let Some(p) = r.res {
                a = vaddq_f32(a, vld1q_f32(p.add(x)));
            }
            vst1q_f32(r.dst.add(x), vminnmq_f32(vmaxnmq_f32(a, lo), hi));
            x += V;
        }
        r.tail(x);
    }
}
