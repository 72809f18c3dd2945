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
        // Through a buffer: indexing the accumulators by position below
        // would make the compiler keep them in memory during the products.
        let mut tmp = [[0f32; NR]; 8];
        for r in 0..R {
            _mm256_storeu_ps(tmp[r].as_mut_ptr(), a0[r]);
            _mm256_storeu_ps(tmp[r].as_mut_ptr().add(8), a1[r]);
        }
        if !t.channel_last {
            // Channel-first output (positions contiguous, `yp` = 1): each
            // half panel's 8 × 8 block (rows past R zero) transposed, then
            // one masked vector of R positions per output channel.
            let rows = _mm256_loadu_si256(ROW_MASKS[R].as_ptr() as *const __m256i);
            for half in 0..2 {
                let cols = transpose8(std::array::from_fn(|r| _mm256_loadu_ps(tmp[r].as_ptr().add(8 * half))));
                let lanes = t.width.saturating_sub(8 * half).min(8);
                for (o, &c) in cols.iter().enumerate().take(lanes) {
                    let at = (8 * half + o) * t.yc;
                    let mut v = c;
                    if let Some(p) = t.res {
                        v = _mm256_add_ps(v, _mm256_maskload_ps(p.add(at), rows));
                    }
                    let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
                    if R == 6 {
                        // A whole tile: two plain stores (a masked store is
                        // slow on some AMD cores).
                        _mm_storeu_ps(t.out.add(at), _mm256_castps256_ps128(v));
                        _mm_store_sd(t.out.add(at + 4) as *mut f64, _mm_castps_pd(_mm256_extractf128_ps::<1>(v)));
                    } else {
                        _mm256_maskstore_ps(t.out.add(at), rows, v);
                    }
                }
            }
            return;
        }
        // A partial channel-last panel: one output channel at a time.
        for j in 0..t.width {
            for (r, row) in tmp.iter().enumerate().take(R) {
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

/// Lane masks of the first `R` of 8 lanes, by `R`.
const ROW_MASKS: [[i32; 8]; 9] = {
    let mut m = [[0; 8]; 9];
    let mut r = 0;
    while r <= 8 {
        let mut l = 0;
        while l < r {
            m[r][l] = -1;
            l += 1;
        }
        r += 1;
    }
    m
};

/// The transpose of an 8 × 8 block: lane `i` of vector `j` becomes lane
/// `j` of vector `i`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let mut a = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Within each 128-bit lane, a 4 × 4 sub-block's columns.
    let mut b = [_mm256_setzero_ps(); 8];
    for g in 0..2 {
        let (x0, x1, y0, y1) = (a[4 * g], a[4 * g + 1], a[4 * g + 2], a[4 * g + 3]);
        b[4 * g] = _mm256_shuffle_ps::<0x44>(x0, y0);
        b[4 * g + 1] = _mm256_shuffle_ps::<0xee>(x0, y0);
        b[4 * g + 2] = _mm256_shuffle_ps::<0x44>(x1, y1);
        b[4 * g + 3] = _mm256_shuffle_ps::<0xee>(x1, y1);
    }
    let mut c = [_mm256_setzero_ps(); 8];
    for k in 0..4 {
        c[k] = _mm256_permute2f128_ps::<0x20>(b[k], b[4 + k]);
        c[4 + k] = _mm256_permute2f128_ps::<0x31>(b[k], b[4 + k]);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose8_swaps_rows_and_columns() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return;
        }
        super::super::check_transpose(8, |m| {
            let mut got = vec![0f32; 64];
            // SAFETY: the CPU has AVX2 and FMA (checked above); every load
            // and store is of 8 values inside `m` or `got` (64 each).
            unsafe {
                let r = std::array::from_fn(|i| _mm256_loadu_ps(m.as_ptr().add(8 * i)));
                for (i, v) in transpose8(r).iter().enumerate() {
                    _mm256_storeu_ps(got.as_mut_ptr().add(8 * i), *v);
                }
            }
            got
        });
    }
}
