//! The AVX-512 kernel of [`FusedConv`]: 12 positions × 32 output channels
//! (two weight panels of 16, one vector each) a tile, 24 accumulators of
//! the 32 vector registers; partial panels store through a lane mask.

use std::arch::x86_64::*;

use super::{FusedConv, Input, Strided, Table, Taps, Tile, BLOCK_BYTES, NR};

/// Positions of one tile.
const ROWS: usize = 12;

/// Computes pixels `p.0..p.1`, panels `q.0..q.1`.
///
/// # Safety
/// As [`FusedConv::compute`]; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
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
/// panels `q0..q1`, two at a time, run over them; `row(p)` is where pixel
/// `p`'s values start.
#[target_feature(enable = "avx512f")]
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
    let block = ((BLOCK_BYTES / (4 * op.ci)) / ROWS * ROWS).max(ROWS);
    let mut b0 = p0;
    while b0 < p1 {
        let b1 = p1.min(b0 + block);
        let mut q = q0;
        while q < q1 {
            let pair = q + 1 < q1;
            let mut p = b0;
            while p < b1 {
                let n = (b1 - p).min(ROWS);
                // SAFETY: `q` (and `q + 1` for a pair) < the panel count and
                // `p + n` ≤ `pixels` (the caller's ranges).
                unsafe {
                    let t = Tile::<ROWS>::at(op, &row, residual, out, (p, n), q, if pair { 2 } else { 1 });
                    macro_rules! dispatch {
                        ($($r:literal)*) => {
                            match (n, pair) {
                                $(($r, true) => tile::<$r, 2, T>(&t, taps),
                                  ($r, false) => tile::<$r, 1, T>(&t, taps),)*
                                _ => {}
                            }
                        };
                    }
                    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
                }
                p += ROWS;
            }
            q += if pair { 2 } else { 1 };
        }
        b0 = b1;
    }
}

/// `R` positions × `P` panels of 16 output channels.
///
/// # Safety
/// `t`'s pointers hold what [`blocks`] says: `ci` inputs per row (through
/// `taps`), `P` panels of `ci × 16` weights, `16·P` biases, `R` output
/// positions of `t.width` channels; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const P: usize, T: Taps>(t: &Tile<ROWS>, taps: T) {
    // SAFETY: as this function's.
    unsafe {
        let panel = t.ci * NR;
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for a in acc.iter_mut() {
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(t.b.add(j * NR));
            }
        }
        let mut w = t.w;
        for k in 0..t.ci {
            let off = taps.offset(k);
            let mut wv = [_mm512_setzero_ps(); P];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(w.add(j * panel));
            }
            for r in 0..R {
                let v = _mm512_set1_ps(*t.rows[r].add(off));
                for j in 0..P {
                    acc[r][j] = _mm512_fmadd_ps(v, wv[j], acc[r][j]);
                }
            }
            w = w.add(NR);
        }
        let lo = _mm512_set1_ps(t.clamp.0);
        let hi = _mm512_set1_ps(t.clamp.1);
        if t.channel_last {
            for (r, a) in acc.iter().enumerate() {
                for (j, v) in a.iter().enumerate() {
                    let lanes = t.width.saturating_sub(j * NR).min(NR);
                    let mask: __mmask16 = if lanes == NR { 0xffff } else { ((1u32 << lanes) - 1) as __mmask16 };
                    let at = r * t.yp + j * NR;
                    let mut v = *v;
                    if let Some(p) = t.res {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.add(at)));
                    }
                    _mm512_mask_storeu_ps(t.out.add(at), mask, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
                }
            }
            return;
        }
        // Channel-first output: through a buffer, one output channel (R
        // contiguous positions) at a time.
        let mut tmp = [[[0f32; NR]; P]; R];
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                _mm512_storeu_ps(tmp[r][j].as_mut_ptr(), *v);
            }
        }
        for o in 0..t.width {
            for (r, row) in tmp.iter().enumerate() {
                let at = r * t.yp + o * t.yc;
                let mut v = row[o / NR][o % NR];
                if let Some(p) = t.res {
                    v += *p.add(at);
                }
                *t.out.add(at) = v.max(t.clamp.0).min(t.clamp.1);
            }
        }
    }
}
