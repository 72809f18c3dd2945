//! [`QAdd`](super::QAdd) in AVX2: 16 values a step as two 8-lane vectors,
//! each input widened to i32 less its zero point, converted, multiplied,
//! the two products added, bounded, rounded half to even (`VCVTPS2DQ`, the
//! default MXCSR rounding), plus the output's zero point, narrowed with
//! saturation (`VPACKSSDW`, `VPACKSSWB`: the clamp to int8).

use std::arch::x86_64::*;

/// `out[j] = QAdd::apply(a[j], b[j])` for `j < n16` (a multiple of 16).
///
/// # Safety
/// The CPU has AVX2; `a`, `b` have `n16` readable values, `out` `n16`
/// writable.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn add(op: &super::QAdd, a: *const i8, b: *const i8, out: *mut i8, n16: usize) {
    let (ma, za) = (_mm256_set1_ps(op.a.0), _mm256_set1_epi32(op.a.1));
    let (mb, zb) = (_mm256_set1_ps(op.b.0), _mm256_set1_epi32(op.b.1));
    let zy = _mm256_set1_epi32(op.zero_point);
    let limit = _mm256_set1_ps(super::super::LIMIT);
    let neg = _mm256_set1_ps(-super::super::LIMIT);
    let mut j = 0;
    while j < n16 {
        // SAFETY: values j..j + 16 ≤ n16 of `a` and `b` (the caller's contract).
        let (av, bv) = unsafe { (_mm_loadu_si128(a.add(j) as *const __m128i), _mm_loadu_si128(b.add(j) as *const __m128i)) };
        let mut q = [_mm256_setzero_si256(); 2];
        for (i, q) in q.iter_mut().enumerate() {
            let (ai, bi) = if i == 0 { (av, bv) } else { (_mm_srli_si128::<8>(av), _mm_srli_si128::<8>(bv)) };
            let x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepi8_epi32(ai), za)), ma);
            let y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepi8_epi32(bi), zb)), mb);
            let v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(x, y), neg), limit);
            *q = _mm256_add_epi32(_mm256_cvtps_epi32(v), zy);
        }
        // [q0 0-3, q1 0-3 | q0 4-7, q1 4-7] → [q0 0-7 | q1 0-7] as i16, then i8.
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
        let v = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
        // SAFETY: values j..j + 16 ≤ n16 of `out` (the caller's contract).
        unsafe { _mm_storeu_si128(out.add(j) as *mut __m128i, v) };
        j += 16;
    }
}
