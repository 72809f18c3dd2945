//! The channel-last tiles of [`QPointwise`](super::QPointwise) on x86-64:
//! [`PB`] pixels × blocks of output channels whose i32 sums stay in
//! registers while the input channels stream past, each pixel's input
//! broadcast to every lane (`VPBROADCASTD`) so the sums land channel-last,
//! no horizontal reduction.
//!
//! - `VPDPBUSD` (AVX-512 VNNI, zmm: 16 channels × 4 input channels an
//!   instruction; AVX-VNNI, ymm: 8 × 4): unsigned × signed bytes, so the
//!   input is made unsigned (`x ^ 0x80` = `x + 128`) and the sums start
//!   from `−128·Σₖ w[c, k]` (computed once in [`Packed::new`]): exact, no
//!   saturation (the instruction adds four products into i32).
//! - `VPMADDWD` (AVX2): the input pair `(x[k], x[k + 1])` widened to two
//!   i16 and broadcast against the weights' pairs: exact (each product ≤
//!   2¹⁴); `VPMADDUBSW`, which saturates its i16 pair sums, is not used.
//!
//! Weights: blocks of 16 output channels, each step (4 input channels for
//! VNNI, 2 for AVX2) 64 bytes: lane `j` holds channel `16·b + j`'s weights
//! of that step (zeros past `co` and `ci`). The ymm kernels take a block's
//! halves. The pixels' inputs are converted per block of [`PB`] pixels into
//! a scratch of i32 steps (bytes `x ^ 0x80`, or i16 pairs); past `ci` the
//! weights are zeros, so the scratch there may hold anything.

use std::arch::x86_64::*;

use super::PB;

/// Output channels of one block of packed weights.
pub(super) const BLOCK: usize = 16;

/// The x86 channel-last kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::int8) enum Kind {
    /// `VPDPBUSD` on zmm (avx512f, avx512vnni).
    Vnni512,
    /// `VPDPBUSD` on ymm (avxvnni).
    AvxVnni,
    /// `VPMADDWD` on ymm (avx2).
    Avx2,
}

impl Kind {
    /// Whether this CPU runs the kernel.
    pub(super) fn available(self) -> bool {
        match self {
            Kind::Vnni512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"),
            Kind::AvxVnni => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"),
            Kind::Avx2 => is_x86_feature_detected!("avx2"),
        }
    }
}

/// The weights of one op in the kernels' layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Packed {
    /// VNNI steps: block `b`, step `s`, lane `j`, byte `i` = `w[16b + j, 4s + i]`.
    quads: Vec<i8>,
    /// Per output channel (`co` rounded up to [`BLOCK`]): `−128·Σₖ w[c, k]`.
    init: Vec<i32>,
    /// AVX2 steps: block `b`, step `s`, lane `j` = `w[16b + j, 2s]` and
    /// `w[16b + j, 2s + 1]` as two i16 in one i32.
    pairs: Vec<i32>,
    /// Input channels rounded up to 4, ÷ 4 (VNNI steps).
    quad_steps: usize,
    /// Input channels rounded up to 2, ÷ 2 (AVX2 steps).
    pair_steps: usize,
}

impl Packed {
    /// Packs `weights` (`[co, ci]`, row-major).
    pub(super) fn new(weights: &[i8], ci: usize, co: usize) -> Packed {
        let (qs, ps, blocks) = (ci.div_ceil(4), ci.div_ceil(2), co.div_ceil(BLOCK));
        let mut quads = vec![0i8; blocks * qs * BLOCK * 4];
        let mut pairs = vec![0i32; blocks * ps * BLOCK];
        let mut init = vec![0i32; blocks * BLOCK];
        for (c, w) in weights.chunks_exact(ci).enumerate().take(co) {
            let (b, j) = (c / BLOCK, c % BLOCK);
            for (k, &v) in w.iter().enumerate() {
                quads[((b * qs + k / 4) * BLOCK + j) * 4 + k % 4] = v;
                let half = (v as i16 as u16 as u32) << (16 * (k % 2));
                pairs[(b * ps + k / 2) * BLOCK + j] |= half as i32;
            }
            init[c] = -128 * w.iter().map(|&v| i32::from(v)).sum::<i32>();
        }
        Packed { quads, init, pairs, quad_steps: qs, pair_steps: ps }
    }
}

/// The register tile: `acc[p·ld + col[v] + lane] = init + Σₛ x[p·steps + s] ⊙ w[v] step s`
/// for `P` pixels and `V` vectors, `$dp` the step's multiply-add.
macro_rules! tile {
    ($name:ident, $feat:literal, $vec:ty, $zero:ident, $load:ident, $store:ident, $bcast:ident, $dp:expr) => {
        /// One register tile (see the macro).
        ///
        /// # Safety
        /// The CPU has the features enabled here; `x` has `P × steps`
        /// readable i32; each `w[v]` has `steps` steps of 16 i32 (64 bytes)
        /// readable; `init[v]` (when given) one vector; `out` has
        /// `(P − 1)·ld + col[v] + lanes` writable for every `v`.
        #[target_feature(enable = $feat)]
        unsafe fn $name<const P: usize, const V: usize>(
            x: *const i32,
            steps: usize,
            w: [*const i32; V],
            init: Option<[*const i32; V]>,
            out: *mut i32,
            ld: usize,
            col: [usize; V],
        ) {
            // SAFETY: every pointer stays in the ranges the caller vouches for.
            unsafe {
                let mut a = [[$zero(); V]; P];
                if let Some(init) = init {
                    for v in 0..V {
                        let i = $load(init[v] as *const _);
                        for a in a.iter_mut() {
                            a[v] = i;
                        }
                    }
                }
                for s in 0..steps {
                    let mut wv = [$zero(); V];
                    for v in 0..V {
                        wv[v] = $load(w[v].add(16 * s) as *const _);
                    }
                    for (p, a) in a.iter_mut().enumerate() {
                        let xv = $bcast(*x.add(p * steps + s));
                        for v in 0..V {
                            a[v] = $dp(a[v], xv, wv[v]);
                        }
                    }
                }
                for (p, a) in a.iter().enumerate() {
                    for v in 0..V {
                        $store(out.add(p * ld + col[v]) as *mut _, a[v]);
                    }
                }
            }
        }
    };
}

tile!(tile512, "avx512f,avx512vnni", __m512i, _mm512_setzero_si512, _mm512_loadu_si512, _mm512_storeu_si512, _mm512_set1_epi32, _mm512_dpbusd_epi32);
tile!(tile_vnni, "avx2,avxvnni", __m256i, _mm256_setzero_si256, _mm256_loadu_si256, _mm256_storeu_si256, _mm256_set1_epi32, _mm256_dpbusd_avx_epi32);
tile!(tile_avx2, "avx2", __m256i, _mm256_setzero_si256, _mm256_loadu_si256, _mm256_storeu_si256, _mm256_set1_epi32, madd_add);

/// `acc + VPMADDWD(x, w)`.
#[inline]
#[target_feature(enable = "avx2")]
fn madd_add(acc: __m256i, x: __m256i, w: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(x, w))
}

/// The sums of the [`PB`] pixel rows `xs` (`ci` values each) against output
/// channels `c0..c1` (rounded out to the kernel's vectors):
/// `acc[p·ld + c] = Σₖ xs[p][k]·w[c, k]`; `scratch` is reused between calls.
///
/// # Safety
/// `kind` is available on this CPU; `packed` was made for these `ci` and
/// `co`; `c0 < c1 ≤ co`; `ld` ≥ `co` rounded up to [`BLOCK`] and `acc`
/// holds `PB × ld`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows(kind: Kind, packed: &Packed, xs: &[&[i8]; PB], ci: usize, channels: (usize, usize), acc: &mut [i32], ld: usize, scratch: &mut Vec<i32>) {
    let steps = if kind == Kind::Avx2 { packed.pair_steps } else { packed.quad_steps };
    // Past `ci` a row keeps whatever it held (zeros at first): the weights
    // there are zeros.
    if scratch.len() < PB * steps {
        scratch.resize(PB * steps, 0);
    }
    for (row, x) in scratch[..PB * steps].chunks_exact_mut(steps).zip(xs) {
        let x = &x[..ci];
        // Little-endian: byte (i16) `k` of the row is input channel `k`.
        if kind == Kind::Avx2 {
            // SAFETY: a view of the row's 2·steps ≥ ci i16 (alignment 2 ≤ 4, every bit pattern valid).
            let halves = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut i16, 2 * steps) };
            for (h, &v) in halves.iter_mut().zip(x) {
                *h = i16::from(v);
            }
        } else {
            // SAFETY: a view of the row's 4·steps ≥ ci bytes (alignment 1, every bit pattern valid).
            let bytes = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut u8, 4 * steps) };
            for (b, &v) in bytes.iter_mut().zip(x) {
                *b = v as u8 ^ 0x80;
            }
        }
    }
    assert!(acc.len() >= PB * ld && ld >= packed.init.len() && channels.1 <= packed.init.len(), "sums past the buffer");
    let x = scratch.as_ptr();
    let out = acc.as_mut_ptr();
    match kind {
        Kind::Vnni512 => {
            // Vectors are whole blocks of 16 channels, four at a time.
            let (mut b, b1) = (channels.0 / BLOCK, channels.1.div_ceil(BLOCK));
            let w = |b: usize| packed.quads[b * packed.quad_steps * BLOCK * 4..].as_ptr() as *const i32;
            let i = |b: usize| packed.init[b * BLOCK..].as_ptr();
            while b < b1 {
                macro_rules! go {
                    ($v:literal) => {{
                        let (wv, iv, col): ([*const i32; $v], [*const i32; $v], [usize; $v]) =
                            (std::array::from_fn(|j| w(b + j)), std::array::from_fn(|j| i(b + j)), std::array::from_fn(|j| (b + j) * BLOCK));
                        // SAFETY: avx512f/avx512vnni (the caller's contract); blocks b..b + v ≤ b1
                        // hold `steps` steps each; the stores end at column b1·16 ≤ ld, row PB − 1.
                        unsafe { tile512::<PB, $v>(x, steps, wv, Some(iv), out, ld, col) };
                        b += $v;
                    }};
                }
                match b1 - b {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    _ => go!(4),
                }
            }
        }
        Kind::AvxVnni | Kind::Avx2 => {
            // Vectors are halves of blocks (8 channels), two at a time.
            let (mut h, h1) = (channels.0 / 8, channels.1.div_ceil(8));
            let vnni = kind == Kind::AvxVnni;
            let w = |h: usize| {
                let at = (h / 2) * BLOCK * if vnni { packed.quad_steps } else { packed.pair_steps } + (h % 2) * 8;
                if vnni { packed.quads[4 * at..].as_ptr() as *const i32 } else { packed.pairs[at..].as_ptr() }
            };
            let i = |h: usize| packed.init[8 * h..].as_ptr();
            while h < h1 {
                macro_rules! go {
                    ($v:literal) => {{
                        let (wv, iv, col): ([*const i32; $v], [*const i32; $v], [usize; $v]) =
                            (std::array::from_fn(|j| w(h + j)), std::array::from_fn(|j| i(h + j)), std::array::from_fn(|j| (h + j) * 8));
                        if vnni {
                            // SAFETY: avx2/avxvnni (the caller's contract); halves h..h + v ≤ h1 lie in
                            // blocks of `steps` steps; the stores end at column h1·8 ≤ ld, row PB − 1.
                            unsafe { tile_vnni::<PB, $v>(x, steps, wv, Some(iv), out, ld, col) };
                        } else {
                            // SAFETY: as above, with avx2.
                            unsafe { tile_avx2::<PB, $v>(x, steps, wv, None, out, ld, col) };
                        }
                        h += $v;
                    }};
                }
                match h1 - h {
                    1 => go!(1),
                    _ => go!(2),
                }
            }
        }
    }
}
