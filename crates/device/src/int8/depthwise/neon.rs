//! The channel-last kernel of [`QDepthwise`](super::QDepthwise) in NEON: one
//! output position, 16 channels a step, their i32 sums in four registers
//! while the kernel taps stream past; each tap's input widened to i16 less
//! the zero point in one instruction (`SSUBL`), multiplied into the sums
//! by `SMLAL`/`SMLAL2`.

use std::arch::aarch64::*;

/// The taps of one output position.
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
/// Every such index, for `i < ky`, `j < kx`, `ch < c16`, is in `x` and `w`;
/// `acc` has `c16` writable values.
pub(super) unsafe fn position(x: *const i8, w: *const i16, t: &Taps, zx: i8, c16: usize, acc: *mut i32) {
    // SAFETY: the loads and stores stay in the ranges the caller vouches for.
    unsafe {
        let z = vdupq_n_s8(zx);
        let mut ch = 0;
        while ch < c16 {
            let mut a = [vdupq_n_s32(0); 4];
            for i in 0..t.ky {
                for j in 0..t.kx {
                    let xv = vld1q_s8(x.add(i * t.row + j * t.c + ch));
                    let wp = w.add(i * t.wrow + j * t.c + ch);
                    let (w0, w1) = (vld1q_s16(wp), vld1q_s16(wp.add(8)));
                    let xl = vsubl_s8(vget_low_s8(xv), vget_low_s8(z));
                    let xh = vsubl_high_s8(xv, z);
                    a[0] = vmlal_s16(a[0], vget_low_s16(xl), vget_low_s16(w0));
                    a[1] = vmlal_high_s16(a[1], xl, w0);
                    a[2] = vmlal_s16(a[2], vget_low_s16(xh), vget_low_s16(w1));
                    a[3] = vmlal_high_s16(a[3], xh, w1);
                }
            }
            for (q, a) in a.iter().enumerate() {
                vst1q_s32(acc.add(ch + 4 * q), *a);
            }
            ch += 16;
        }
    }
}
