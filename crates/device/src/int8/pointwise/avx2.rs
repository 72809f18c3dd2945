//! The channel-major tile of [`QPointwise`] in AVX2: [`TC`] output channels
//! × [`TP`] pixels, two input channels a step, `VPMADDWD` of interleaved
//! (x[k], x[k+1]) i16 pairs against the broadcast (w[c, k], w[c, k+1])
//! pair: exact (each product ≤ 2¹⁴, each pair sum ≤ 2¹⁵), no i16
//! saturation as with `VPMADDUBSW`.

use std::arch::x86_64::*;

use super::{TC, TP};

/// The i32 sums of a tile: `acc[c][j] = Σₖ x[k·n + j]·w[k, c]` for the
/// `ci` input channels.
///
/// # Safety
/// The CPU has AVX2; `x` points at a tile's first pixel with `ci` rows of
/// `n` values and at least [`TP`] readable from each row start;
/// `pairs` holds `ci.div_ceil(2) × TC` values.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn tile(x: *const i8, n: usize, ci: usize, pairs: &[i32]) -> [[i32; TP]; TC] {
    let mut acc = [[_mm256_setzero_si256(); 2]; TC];
    let zero = _mm_setzero_si128();
    for kk in 0..ci.div_ceil(2) {
        let k = 2 * kk;
        // SAFETY: row k < ci holds TP values from the tile start (the caller's contract).
        let a = unsafe { _mm_loadu_si128(x.add(k * n) as *const __m128i) };
        // SAFETY: as above for row k + 1 when it exists; zeros past the last row.
        let b = if k + 1 < ci { unsafe { _mm_loadu_si128(x.add((k + 1) * n) as *const __m128i) } } else { zero };
        let lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
        let hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
        let w = &pairs[kk * TC..][..TC];
        for c in 0..TC {
            let wv = _mm256_set1_epi32(w[c]);
            acc[c][0] = _mm256_add_epi32(acc[c][0], _mm256_madd_epi16(lo, wv));
            acc[c][1] = _mm256_add_epi32(acc[c][1], _mm256_madd_epi16(hi, wv));
        }
    }
    let mut out = [[0i32; TP]; TC];
    for c in 0..TC {
        // SAFETY: `out[c]` holds TP = 16 i32, two unaligned 8-lane stores.
        unsafe {
            _mm256_storeu_si256(out[c].as_mut_ptr() as *mut __m256i, acc[c][0]);
            _mm256_storeu_si256(out[c].as_mut_ptr().add(8) as *mut __m256i, acc[c][1]);
        }
    }
    out
}
