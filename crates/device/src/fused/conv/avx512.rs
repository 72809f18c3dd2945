//! The AVX-512 kernel of [`FusedConv`]: 12 positions × 32 output channels
//! (two weight panels of 16, one vector each) a tile, 24 accumulators of
//! the 32 vector registers; partial panels store through a lane mask.

use std::arch::x86_64::*;

use super::{FusedConv, Input, Strided, Table, Taps, Tile, BLOCK_BYTES, NR};

/// Positions of one tile.
const ROWS: usize = 12;
/// Positions of one tile of a full convolution. With 12, LLVM hoists the
/// 12 broadcasts of a step above its products (the tap table's offset load
/// comes first) and, 12 + 24 accumulators + 2 weight vectors being more
/// than 32 registers, keeps accumulators in memory inside the loop (seen in
/// the disassembly); 8 positions leave room for all of them.
const PATCH_ROWS: usize = 8;

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
                blocks::<ROWS, _>(op, |p| x.add(p * xp), Strided(xc), residual, out, p, q)
            }
            Input::Patches(g) => {
                blocks::<PATCH_ROWS, _>(op, |p| x.add(g.origin(p)), Table(op.taps.as_ptr()), residual, out, p, q)
            }
        }
    }
}

/// Walks pixels `p0..p1` by blocks that stay in cache while the weight
/// panels `q0..q1`, two at a time, run over them; `row(p)` is where pixel
/// `p`'s values start.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn blocks<const N: usize, T: Taps>(
    op: &FusedConv,
    row: impl Fn(usize) -> *const f32,
    taps: T,
    residual: Option<*const f32>,
    out: *mut f32,
    (p0, p1): (usize, usize),
    (q0, q1): (usize, usize),
) {
    let block = ((BLOCK_BYTES / (4 * op.ci)) / N * N).max(N);
    let mut b0 = p0;
    while b0 < p1 {
        let b1 = p1.min(b0 + block);
        let mut q = q0;
        while q < q1 {
            let pair = q + 1 < q1;
            let mut p = b0;
            while p < b1 {
                let n = (b1 - p).min(N);
                // SAFETY: `q` (and `q + 1` for a pair) < the panel count and
                // `p + n` ≤ `pixels` (the caller's ranges).
                unsafe {
                    let t = Tile::<N>::at(op, &row, residual, out, (p, n), q, if pair { 2 } else { 1 });
                    macro_rules! dispatch {
                        ($($r:literal)*) => {
                            match (n, pair) {
                                $(($r, true) if $r <= N => tile::<$r, 2, N, T>(&t, taps),
                                  ($r, false) if $r <= N => tile::<$r, 1, N, T>(&t, taps),)*
                                _ => {}
                            }
                        };
                    }
                    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
                }
                p += N;
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
unsafe fn tile<const R: usize, const P: usize, const N: usize, T: Taps>(t: &Tile<N>, taps: T) {
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
        // Channel-first output (positions contiguous, `yp` = 1): each panel's
        // R × 16 block transposed in registers, then one masked vector of R
        // positions per output channel.
        // (Through a buffer on the stack: indexing the accumulators by
        // position here would make the compiler keep them in memory during
        // the products.)
        let mut tmp = [[[0f32; NR]; P]; 16];
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                _mm512_storeu_ps(tmp[r][j].as_mut_ptr(), *v);
            }
        }
        let rows: __mmask16 = ((1u32 << R) - 1) as __mmask16;
        for j in 0..P {
            let cols = transpose16(std::array::from_fn(|r| _mm512_loadu_ps(tmp[r][j].as_ptr())));
            let lanes = t.width.saturating_sub(j * NR).min(NR);
            for (o, &c) in cols.iter().enumerate().take(lanes) {
                let at = (j * NR + o) * t.yc;
                let mut v = c;
                if let Some(p) = t.res {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(rows, p.add(at)));
                }
                _mm512_mask_storeu_ps(t.out.add(at), rows, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
            }
        }
    }
}

/// The transpose of a 16 × 16 block: lane `i` of vector `j` becomes lane
/// `j` of vector `i`.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved by 32-bit lanes, then by 64-bit lanes: each
    // 128-bit lane of `b[i]` holds a 4 × 4 sub-block's column.
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let (lo, hi) = (4 * i, 4 * i + 2);
        for k in 0..2 {
            let (x, y) = (_mm512_castps_pd(a[lo + k]), _mm512_castps_pd(a[hi + k]));
            b[4 * i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
            b[4 * i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
        }
    }
    // Then the 128-bit lanes of four row groups, twice.
    let mut c = [_mm512_setzero_ps(); 16];
    for g in 0..2 {
        for k in 0..4 {
            let (x, y) = (b[8 * g + k], b[8 * g + 4 + k]);
            c[8 * g + k] = _mm512_shuffle_f32x4::<0x88>(x, y);
            c[8 * g + 4 + k] = _mm512_shuffle_f32x4::<0xdd>(x, y);
        }
    }
    let mut d = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        d[k] = _mm512_shuffle_f32x4::<0x88>(c[k], c[8 + k]);
        d[8 + k] = _mm512_shuffle_f32x4::<0xdd>(c[k], c[8 + k]);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_swaps_rows_and_columns() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        super::super::check_transpose(16, |m| {
            let mut got = vec![0f32; 256];
            // SAFETY: the CPU has AVX-512F (checked above); every load and
            // store is of 16 values inside `m` or `got` (256 each).
            unsafe {
                let r = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
                for (i, v) in transpose16(r).iter().enumerate() {
                    _mm512_storeu_ps(got.as_mut_ptr().add(16 * i), *v);
                }
            }
            got
        });
    }
}
