//! The AVX2 + FMA kernel of [`FusedDepthwise`].

use std::arch::x86_64::*;

use super::{FusedDepthwise, PlaneRow, LANES};

/// Output positions of one row computed together in the interior (every
/// tap inside the input): each kernel vector is loaded once for them all.
const QUAD: usize = 4;

/// Computes output rows `oy0..oy1`.
///
/// # Safety
/// As [`FusedDepthwise::compute`]; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rows(op: &FusedDepthwise, x: *const f32, res: Option<*const f32>, out: *mut f32, oy0: usize, oy1: usize) {
    // SAFETY: the caller's contract (`FusedDepthwise::compute`): rows `oy0..oy1` of the output, taps inside the input (`rows`, `cols`, the interior `lo..hi`).
    unsafe {
        let g = &op.geometry;
        let (kw, sw) = (g.kernel.1, g.strides.1);
        // Columns whose taps are all inside the input: lo..hi.
        let lo = g.pad.1.div_ceil(sw).min(g.out.1);
        let hi = if g.w + g.pad.1 >= kw { ((g.w + g.pad.1 - kw) / sw + 1).min(g.out.1) } else { 0 }.max(lo);
        for oy in oy0..oy1 {
            let (ky0, ky1) = g.rows(oy);
            let mut ox = 0;
            while ox < g.out.1 {
                let quad_fits = ox >= lo && ox + QUAD <= hi;
                let cols = g.cols(ox);
                let at = (oy, ox);
                let mut ch = 0;
                // Several channel vectors at once: independent
                // accumulators to hide the FMA latency.
                if quad_fits {
                    while ch + 2 * LANES <= g.c {
                        quad::<2, true>(op, x, res, out, at, ch, (ky0, ky1));
                        ch += 2 * LANES;
                    }
                } else {
                    while ch + 4 * LANES <= g.c {
                        single::<4, true>(op, x, res, out, at, ch, (ky0, ky1), cols);
                        ch += 4 * LANES;
                    }
                }
                while ch < g.c {
                    match (quad_fits, ch + LANES <= g.c) {
                        (true, true) => quad::<1, true>(op, x, res, out, at, ch, (ky0, ky1)),
                        (true, false) => quad::<1, false>(op, x, res, out, at, ch, (ky0, ky1)),
                        (false, true) => single::<1, true>(op, x, res, out, at, ch, (ky0, ky1), cols),
                        (false, false) => single::<1, false>(op, x, res, out, at, ch, (ky0, ky1), cols),
                    }
                    ch += LANES;
                }
                ox += if quad_fits { QUAD } else { 1 };
            }
        }
    }
}

/// Lanes `c..c+8` of the channels: a mask of those below `channels`.
#[target_feature(enable = "avx2")]
#[inline]
fn lanes(c: usize, channels: usize) -> __m256i {
    let left = channels.saturating_sub(c).min(LANES) as i32;
    _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// Loads 8 channels at `p` (those under `mask` unless `FULL`).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load<const FULL: bool>(p: *const f32, mask: __m256i) -> __m256 {
    // SAFETY: `p` holds 8 values, or those under `mask` (the caller's channel count).
    unsafe { if FULL { _mm256_loadu_ps(p) } else { _mm256_maskload_ps(p, mask) } }
}

/// Adds the residual, clamps and stores 8 channels at `at`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store<const FULL: bool>(op: &FusedDepthwise, res: Option<*const f32>, out: *mut f32, at: usize, mask: __m256i, mut v: __m256) {
    // SAFETY: `at` holds 8 channels (those under `mask`) of the output and residual.
    unsafe {
        if let Some(r) = res {
            v = _mm256_add_ps(v, load::<FULL>(r.add(at), mask));
        }
        v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(op.clamp.0)), _mm256_set1_ps(op.clamp.1));
        if FULL {
            _mm256_storeu_ps(out.add(at), v);
        } else {
            _mm256_maskstore_ps(out.add(at), mask, v);
        }
    }
}

/// Four interior output positions `ox..ox+4` of row `oy`, channels
/// `ch..ch+8·NB` (only those under `c` unless `FULL`, with `NB` 1).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn quad<const NB: usize, const FULL: bool>(
    op: &FusedDepthwise,
    x: *const f32,
    res: Option<*const f32>,
    out: *mut f32,
    (oy, ox): (usize, usize),
    ch: usize,
    (ky0, ky1): (usize, usize),
) {
    // SAFETY: the positions and taps are inside the input and output, as `rows` says at the call.
    unsafe {
        let g = &op.geometry;
        let (c, cp, kw, sw) = (g.c, op.bias.len(), g.kernel.1, g.strides.1);
        let step = sw * c;
        let mask = lanes(ch, c);
        let mut acc = [[_mm256_setzero_ps(); NB]; QUAD];
        for a in acc.iter_mut() {
            for (v, av) in a.iter_mut().enumerate() {
                *av = _mm256_loadu_ps(op.bias.as_ptr().add(ch + v * LANES));
            }
        }
        for ky in ky0..ky1 {
            let iy = oy * g.strides.0 + ky - g.pad.0;
            let mut p = x.add((iy * g.w + ox * sw - g.pad.1) * c + ch);
            let mut k = op.packed.as_ptr().add(ky * kw * cp + ch);
            for _ in 0..kw {
                for v in 0..NB {
                    let kv = _mm256_loadu_ps(k.add(v * LANES));
                    for (j, a) in acc.iter_mut().enumerate() {
                        a[v] = _mm256_fmadd_ps(load::<FULL>(p.add(j * step + v * LANES), mask), kv, a[v]);
                    }
                }
                p = p.add(c);
                k = k.add(cp);
            }
        }
        let at = (oy * g.out.1 + ox) * c + ch;
        for (j, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                store::<FULL>(op, res, out, at + j * c + v * LANES, mask, *av);
            }
        }
    }
}

/// One output position `ox` of row `oy`, channels `ch..ch+8·NB` (only
/// those under `c` unless `FULL`, with `NB` 1), with the taps inside
/// the input.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn single<const NB: usize, const FULL: bool>(
    op: &FusedDepthwise,
    x: *const f32,
    res: Option<*const f32>,
    out: *mut f32,
    (oy, ox): (usize, usize),
    ch: usize,
    (ky0, ky1): (usize, usize),
    (kx0, kx1): (usize, usize),
) {
    // SAFETY: the position and its taps `kx0..kx1`, `ky0..ky1` are inside the input and output, as `rows` says at the call.
    unsafe {
        let g = &op.geometry;
        let (c, cp, kw) = (g.c, op.bias.len(), g.kernel.1);
        let mask = lanes(ch, c);
        let mut acc = [_mm256_setzero_ps(); NB];
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(op.bias.as_ptr().add(ch + v * LANES));
        }
        for ky in ky0..ky1 {
            let iy = oy * g.strides.0 + ky - g.pad.0;
            for kx in kx0..kx1 {
                let ix = ox * g.strides.1 + kx - g.pad.1;
                let p = x.add((iy * g.w + ix) * c + ch);
                let k = op.packed.as_ptr().add((ky * kw + kx) * cp + ch);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load::<FULL>(p.add(v * LANES), mask), _mm256_loadu_ps(k.add(v * LANES)), *a);
                }
            }
        }
        let at = (oy * g.out.1 + ox) * c + ch;
        for (v, a) in acc.iter().enumerate() {
            store::<FULL>(op, res, out, at + v * LANES, mask, *a);
        }
    }
}

/// One channel-first output row: 32 columns at a time (four independent
/// sums a tap, against the FMA's latency), then 8, then one at a time;
/// the residual and the clamp before the one store.
///
/// # Safety
/// `r`'s pointers hold what [`PlaneRow`] says; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn plane_row(r: &PlaneRow) {
    // SAFETY: as this function's; each call covers columns below `ow`.
    unsafe {
        let mut x = 0;
        while x + 32 <= r.ow {
            plane_columns::<4>(r, x);
            x += 32;
        }
        while x + 8 <= r.ow {
            plane_columns::<1>(r, x);
            x += 8;
        }
        r.tail(x);
    }
}

/// Columns `x..x + 8·V` of a channel-first output row.
///
/// # Safety
/// As [`plane_row`], and `x + 8·V ≤ ow`: every load reads row `ky` < kh of
/// `wp` = ow + kw − 1 values at a column below `x + 8·V + kw − 1`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn plane_columns<const V: usize>(r: &PlaneRow, x: usize) {
    // SAFETY: as this function's.
    unsafe {
        let (kh, kw) = r.kernel;
        let mut a = [_mm256_set1_ps(r.bias); V];
        for ky in 0..kh {
            let row = r.src.add(ky * r.wp + x);
            for kx in 0..kw {
                let w = _mm256_broadcast_ss(&*r.taps.add(ky * kw + kx));
                for (j, v) in a.iter_mut().enumerate() {
                    *v = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(kx + 8 * j)), w, *v);
                }
            }
        }
        let (lo, hi) = (_mm256_set1_ps(r.clamp.0), _mm256_set1_ps(r.clamp.1));
        for (j, v) in a.iter().enumerate() {
            let mut v = *v;
            if let Some(p) = r.res {
                v = _mm256_add_ps(v, _mm256_loadu_ps(p.add(x + 8 * j)));
            }
            _mm256_storeu_ps(r.dst.add(x + 8 * j), _mm256_min_ps(_mm256_max_ps(v, lo), hi));
        }
    }
}
