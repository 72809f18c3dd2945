//! The AVX2 epilogue step: 16 lanes as two 8-lane vectors, `VCVTDQ2PS`,
//! `VMULPS`, `VADDPS`, `VMAXPS`/`VMINPS`, `VCVTPS2DQ` (the default MXCSR
//! rounding: to nearest, ties to even), the zero point, the clamp, and two
//! packs to one 16-byte store.

use std::arch::x86_64::*;

use super::{Params, Requant};

/// The vectors every step shares.
pub(super) struct Consts {
    zero_point: __m256i,
    lo: __m256i,
    hi: __m256i,
    /// The residual's multiplier and zero point.
    residual: Option<(__m256, __m256i)>,
}

impl Consts {
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn new(rq: &Requant) -> Consts {
        Consts {
            zero_point: _mm256_set1_epi32(rq.zero_point),
            lo: _mm256_set1_epi32(i32::from(rq.clamp.0)),
            hi: _mm256_set1_epi32(i32::from(rq.clamp.1)),
            residual: rq.residual.map(|(m, z)| (_mm256_set1_ps(m), _mm256_set1_epi32(z))),
        }
    }
}

/// Requantizes 16 lanes: `out[j] = Requant::apply(acc[j], c(j), res[j])`.
///
/// # Safety
/// The CPU has AVX2; `acc` has 16 readable values, `res` (when given) 16,
/// `out` 16 writable.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn requant16(k: &Consts, acc: *const i32, p: Params<'_>, res: Option<*const i8>, out: *mut i8) {
    let limit = _mm256_set1_ps(super::super::LIMIT);
    let neg = _mm256_set1_ps(-super::super::LIMIT);
    // SAFETY: the caller vouches for 16 residual bytes.
    let r = res.map(|r| unsafe { _mm_loadu_si128(r as *const __m128i) });
    let mut q = [_mm256_setzero_si256(); 2];
    for (i, q) in q.iter_mut().enumerate() {
        // SAFETY: a `Params::Row` holds 16 multipliers and biases (sliced to length).
        let (m, b) = match p {
            Params::Row(m, b) => unsafe {
                (_mm256_loadu_ps(m.as_ptr().add(8 * i)), _mm256_loadu_si256(b.as_ptr().add(8 * i) as *const __m256i))
            },
            Params::One(m, b) => (_mm256_set1_ps(m), _mm256_set1_epi32(b)),
        };
        // SAFETY: the caller vouches for 16 accumulators at `acc`.
        let a = unsafe { _mm256_loadu_si256(acc.add(8 * i) as *const __m256i) };
        let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a, b)), m);
        if let (Some(r), Some((mr, zr))) = (r, k.residual) {
            let ri = _mm256_cvtepi8_epi32(if i == 0 { r } else { _mm_srli_si128::<8>(r) });
            v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ri, zr)), mr));
        }
        let v = _mm256_min_ps(_mm256_max_ps(v, neg), limit);
        *q = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(v), k.zero_point), k.lo), k.hi);
    }
    // [q0 0-3, q1 0-3 | q0 4-7, q1 4-7] → [q0 0-7 | q1 0-7] as i16, then i8.
    let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
    let b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
    // SAFETY: the caller vouches for 16 writable bytes at `out`.
    unsafe { _mm_storeu_si128(out as *mut __m128i, b) };
}
