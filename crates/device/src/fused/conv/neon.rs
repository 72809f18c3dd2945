//! The aarch64 NEON kernel of [`FusedConv`]: 6 positions × 16 output
//! channels a tile, 24 accumulators of 4 lanes (of the 32 vector
//! registers), one broadcast load per position and input value.
//!
//! NEON is part of the aarch64 baseline: no run-time check is needed.

use std::arch::aarch64::*;

use super::{FusedConv, Input, Strided, Table, Taps, Tile, BLOCK_BYTES, MR, NR};

/// Computes pixels `p.0..p.1`, panels `q.0..q.1`.
///
/// # Safety
/// As [`FusedConv::compute`].
pub(super) unsafe fn run(
    op: &FusedConv,
    x: *const f32,
    residual: Option<*const f32>,
    out: *mut f32,
    p: (usize, usize),
    q: (usize, usize),
) {
    // SAFETY: the pointers and ranges are this function's, passed on.
    unsafe {
        match &op.input {
            Input::Pointwise(layout) => {
                let (xp, xc) = layout.strides(op.pixels, op.ci);
                blocks(op, |p| x.add(p * xp), Strided(xc), residual, out, p, q)
            }
            Input::Patches(g) => blocks(op, |p| x.add(g.origin(p)), Table(op.taps.as_ptr()), residual, out, p, q),
        }
    }
}

/// Walks pixels `p0..p1` by blocks that stay in cache while the weight
/// panels `q0..q1` run over them; `row(p)` is where pixel `p`'s values
/// start.
#[inline]
unsafe fn blocks<T: Taps>(
    op: &FusedConv,
    row: impl Fn(usize) -> *const f32,
    taps: T,
    residual: Option<*const f32>,
    out: *mut f32,
    (p0, p1): (usize, usize),
    (q0, q1): (usize, usize),
) {
    let block = ((BLOCK_BYTES / (4 * op.ci)) / MR * MR).max(MR);
    let mut b0 = p0;
    while b0 < p1 {
        let b1 = p1.min(b0 + block);
        for q in q0..q1 {
            let mut p = b0;
            while p < b1 {
                let n = (b1 - p).min(MR);
                // SAFETY: `q` < the panel count and `p + n` ≤ `pixels` (the
                // caller's ranges).
                unsafe {
                    let t = Tile::<MR>::at(op, &row, residual, out, (p, n), q, 1);
                    match n {
                        6 => tile::<6, T>(&t, taps),
                        5 => tile::<5, T>(&t, taps),
                        4 => tile::<4, T>(&t, taps),
                        3 => tile::<3, T>(&t, taps),
                        2 => tile::<2, T>(&t, taps),
                        _ => tile::<1, T>(&t, taps),
                    }
                }
                p += MR;
            }
        }
        b0 = b1;
    }
}

/// `R` positions × one panel of 16 output channels.
///
/// # Safety
/// `t`'s pointers hold what [`blocks`] says: `ci` inputs per row (through
/// `taps`), a `ci × 16` panel, 16 biases, `R` output positions.
#[inline]
unsafe fn tile<const R: usize, T: Taps>(t: &Tile<MR>, taps: T) {
    // SAFETY: as this function's.
    unsafe {
        let b = [vld1q_f32(t.b), vld1q_f32(t.b.add(4)), vld1q_f32(t.b.add(8)), vld1q_f32(t.b.add(12))];
        let mut acc = [b; R];
        let mut w = t.w;
        for k in 0..t.ci {
            let off = taps.offset(k);
            let w0 = vld1q_f32(w);
            let w1 = vld1q_f32(w.add(4));
            let w2 = vld1q_f32(w.add(8));
            let w3 = vld1q_f32(w.add(12));
            for r in 0..R {
                let v = vld1q_dup_f32(t.rows[r].add(off));
                acc[r][0] = vfmaq_f32(acc[r][0], v, w0);
                acc[r][1] = vfmaq_f32(acc[r][1], v, w1);
                acc[r][2] = vfmaq_f32(acc[r][2], v, w2);
                acc[r][3] = vfmaq_f32(acc[r][3], v, w3);
            }
            w = w.add(NR);
        }
        let lo = vdupq_n_f32(t.clamp.0);
        let hi = vdupq_n_f32(t.clamp.1);
        if t.channel_last && t.width == NR {
            for (r, a) in acc.iter().enumerate() {
                let o = t.out.add(r * t.yp);
                for (j, v) in a.iter().enumerate() {
                    let mut v = *v;
                    if let Some(p) = t.res {
                        v = vaddq_f32(v, vld1q_f32(p.add(r * t.yp + 4 * j)));
                    }
                    vst1q_f32(o.add(4 * j), vminnmq_f32(vmaxnmq_f32(v, lo), hi));
                }
            }
            return;
        }
        // Through a buffer: indexing the accumulators by position below
        // would make the compiler keep them in memory during the products.
        let mut tmp = [[0f32; NR]; R];
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                vst1q_f32(tmp[r].as_mut_ptr().add(4 * j), *v);
            }
        }
        if !t.channel_last && R == 6 {
            // A whole tile, channel-first (positions contiguous, `yp` = 1):
            // per 4 channels, positions 0–3 transposed 4 × 4 and positions
            // 4–5 interleaved, then 4 + 2 values stored per channel.
            for j in 0..NR / 4 {
                let row = |r: usize| vld1q_f32(tmp[r].as_ptr().add(4 * j));
                let head = transpose4([row(0), row(1), row(2), row(3)]);
                let (r4, r5) = (row(4), row(5));
                let pairs = [vzip1q_f32(r4, r5), vzip2q_f32(r4, r5)];
                for (c, &h) in head.iter().enumerate() {
                    let o = 4 * j + c;
                    if o >= t.width {
                        break;
                    }
                    let at = o * t.yc;
                    let pair = pairs[c / 2];
                    let (mut h, mut tail) = (h, if c % 2 == 0 { vget_low_f32(pair) } else { vget_high_f32(pair) });
                    if let Some(p) = t.res {
                        h = vaddq_f32(h, vld1q_f32(p.add(at)));
                        tail = vadd_f32(tail, vld1_f32(p.add(at + 4)));
                    }
                    vst1q_f32(t.out.add(at), vminnmq_f32(vmaxnmq_f32(h, lo), hi));
                    vst1_f32(t.out.add(at + 4), vminnm_f32(vmaxnm_f32(tail, vget_low_f32(lo)), vget_low_f32(hi)));
                }
            }
            return;
        }
        // Otherwise one output channel at a time.
        for j in 0..t.width {
            for (r, row) in tmp.iter().enumerate() {
                let at = r * t.yp + j * t.yc;
                let mut v = row[j];
                if let Some(p) = t.res {
                    v += *p.add(at);
                }
                *t.out.add(at) = v.max(t.clamp.0).min(t.clamp.1);
            }
        }
    }
}

/// The transpose of a 4 × 4 block: lane `i` of vector `j` becomes lane `j`
/// of vector `i`.
#[inline]
fn transpose4(r: [float32x4_t; 4]) -> [float32x4_t; 4] {
    // SAFETY: NEON is in the aarch64 baseline; these only move lanes.
    unsafe {
        let (t0, t1) = (vtrn1q_f32(r[0], r[1]), vtrn2q_f32(r[0], r[1]));
        let (t2, t3) = (vtrn1q_f32(r[2], r[3]), vtrn2q_f32(r[2], r[3]));
        let d = |x: float32x4_t| vreinterpretq_f64_f32(x);
        let f = |x: float64x2_t| vreinterpretq_f32_f64(x);
        [f(vtrn1q_f64(d(t0), d(t2))), f(vtrn1q_f64(d(t1), d(t3))), f(vtrn2q_f64(d(t0), d(t2))), f(vtrn2q_f64(d(t1), d(t3)))]
    }
}
