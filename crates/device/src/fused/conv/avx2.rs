//! The AVX2 + FMA kernel of [`FusedConv`]: 6 positions × 16 output
//! channels a tile, 12 accumulators.

use std::arch::x86_64::*;

use super::{FusedConv, Input, Strided, Table, Taps, Tile, BLOCK_BYTES, MR, NR};

/// Computes pixels `p0..p1`.
///
/// # Safety
/// As [`FusedConv::compute`]; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run(op: &FusedConv, x: *const f32, residual: Option<*const f32>, out: *mut f32, p: (usize, usize), q: (usize, usize)) {
    // SAFETY: the caller's contract (`FusedConv::compute`), passed on.
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
#[target_feature(enable = "avx2,fma")]
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
    // SAFETY: `q` < the panel count and every tile lies in `p0..p1` ≤ the op's pixels (the caller's ranges), so `Tile::at` keeps each pointer in its buffer.
    unsafe {
        let block = ((BLOCK_BYTES / (4 * op.ci)) / MR * MR).max(MR);
        let mut b0 = p0;
        while b0 < p1 {
            let b1 = p1.min(b0 + block);
            for q in q0..q1 {
                let mut p = b0;
                while p < b1 {
                    let n = (b1 - p).min(MR);
                    let t = Tile::<MR>::at(op, &row, residual, out, (p, n), q, 1);
                    match n {
                        6 => tile::<6, T>(&t, taps),
                        5 => tile::<5, T>(&t, taps),
                        4 => tile::<4, T>(&t, taps),
                        3 => tile::<3, T>(&t, taps),
                        2 => tile::<2, T>(&t, taps),
                        _ => tile::<1, T>(&t, taps),
                    }
                    p += MR;
                }
            }
            b0 = b1;
        }
    }
}

/// `R` positions × one panel of 16 output channels.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, T: Taps>(t: &Tile<MR>, taps: T) {
    // SAFETY: `t` holds R positions × one panel as `blocks` built it (`Tile::at`); the CPU has AVX2 and FMA.
    unsafe {
        let mut a0 = [_mm256_loadu_ps(t.b); R];
        let mut a1 = [_mm256_loadu_ps(t.b.add(8)); R];
        let mut w = t.w;
        for k in 0..t.ci {
            let off = taps.offset(k);
            let w0 = _mm256_loadu_ps(w);
            let w1 = _mm256_loadu_ps(w.add(8));
            for r in 0..R {
                let v = _mm256_broadcast_ss(&*t.rows[r].add(off));
                a0[r] = _mm256_fmadd_ps(v, w0, a0[r]);
                a1[r] = _mm256_fmadd_ps(v, w1, a1[r]);
            }
            w = w.add(NR);
        }
        let lo = _mm256_set1_ps(t.clamp.0);
        let hi = _mm256_set1_ps(t.clamp.1);
        if t.channel_last && t.width == NR {
            for r in 0..R {
                let o = t.out.add(r * t.yp);
                let (mut v0, mut v1) = (a0[r], a1[r]);
                if let Some(p) = t.res {
                    let p = p.add(r * t.yp);
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
                }
                _mm256_storeu_ps(o, _mm256_min_ps(_mm256_max_ps(v0, lo), hi));
                _mm256_storeu_ps(o.add(8), _mm256_min_ps(_mm256_max_ps(v1, lo), hi));
            }
            return;
        }
        // Channel-first output or a partial panel: through a buffer, one
        // output channel at a time (R contiguous positions each when
        // channel-first).
        let mut tmp = [[0f32; NR]; R];
        for r in 0..R {
            _mm256_storeu_ps(tmp[r].as_mut_ptr(), a0[r]);
            _mm256_storeu_ps(tmp[r].as_mut_ptr().add(8), a1[r]);
        }
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
