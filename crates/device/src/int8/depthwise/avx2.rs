//! The channel-last kernel of [`QDepthwise`](super::QDepthwise) in AVX2: one
//! output position, 16 channels a step, their i32 sums in two registers
//! while the kernel taps stream past; each tap's input widened to i16
//! (`VPMOVSXBW`) less the zero point, multiplied by the i16 weights into
//! the low and high halves of the i32 products (`VPMULLW`, `VPMULHW`: exact,
//! the full product of two i16) interleaved back to i32 (`VPUNPCKLWD`,
//! `VPUNPCKHWD`).

use std::arch::x86_64::*;

/// The taps of one output position (as the NEON kernel's).
pub(super) struct Taps {
    /// Kernel rows and columns inside the input.
    pub ky: usize,
    pub kx: usize,
    /// Elements between input rows, and between kernel rows in the weights.
    pub row: usize,
    pub wrow: usize,
    /// Channels (elements between input columns and between taps).
    pub c: usize,
}

/// `acc[ch] = Σ_taps (x[tap, ch] − zx)·w[tap, ch]` for `ch < c16` (a
/// multiple of 16), where tap `(i, j)` reads `x[i·row + j·c + ch]` and
/// `w[i·wrow + j·c + ch]`.
///
/// # Safety
/// The CPU has AVX2; every such index, for `i < ky`, `j < kx`, `ch < c16`,
/// is in `x` and `w`; `acc` has `c16` writable values.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn position(x: *const i8, w: *const i16, t: &Taps, zx: i8, c16: usize, acc: *mut i32) {
    let z = _mm256_set1_epi16(i16::from(zx));
    let mut ch = 0;
    while ch < c16 {
        // Lanes of `lo`: channels 0–3 and 8–11 of the step; of `hi`: 4–7, 12–15.
        let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for i in 0..t.ky {
            for j in 0..t.kx {
                // SAFETY: tap (i, j), channels ch..ch + 16 ≤ c16: in `x` and `w`
                // (the caller's contract).
                let (xv, wv) = unsafe {
                    (_mm_loadu_si128(x.add(i * t.row + j * t.c + ch) as *const __m128i), _mm256_loadu_si256(w.add(i * t.wrow + j * t.c + ch) as *const __m256i))
                };
                let xv = _mm256_sub_epi16(_mm256_cvtepi8_epi16(xv), z);
                let (pl, ph) = (_mm256_mullo_epi16(xv, wv), _mm256_mulhi_epi16(xv, wv));
                lo = _mm256_add_epi32(lo, _mm256_unpacklo_epi16(pl, ph));
                hi = _mm256_add_epi32(hi, _mm256_unpackhi_epi16(pl, ph));
            }
        }
        // SAFETY: channels ch..ch + 16 ≤ c16 of `acc` (the caller's contract).
        unsafe {
            _mm256_storeu_si256(acc.add(ch) as *mut __m256i, _mm256_permute2x128_si256::<0x20>(lo, hi));
            _mm256_storeu_si256(acc.add(ch + 8) as *mut __m256i, _mm256_permute2x128_si256::<0x31>(lo, hi));
        }
        ch += 16;
    }
}
