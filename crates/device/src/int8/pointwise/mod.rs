//! [`QPointwise`]: a 1×1 convolution of int8 activations (channel-last or
//! channel-first in and out) with per-channel int8 weights, requantized to
//! int8; the portable loops here, the tiles per ISA beside them (`avx2`:
//! the channel-first tile by `VPMADDWD`; `neon`: the channel-first tile by
//! `SMLAL` by lane, the channel-last one by `SDOT` or `SMULL`/`SADALP`).
//! `x86`: the channel-last tiles by `VPDPBUSD` (AVX-512 VNNI, AVX-VNNI)
//! or `VPMADDWD` (AVX2).
//! Channel-last in and out (the layout tract's declutter gives the 1×1
//! layers between channel-last depthwise ones) runs in place where the
//! CPU has a channel-last tile (aarch64, x86-64 with AVX2); elsewhere, and
//! for mixed layouts, through the channel-first tile and transposes.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_linalg::multithread::par_chunks_mut;

use super::epilogue::Lanes;
use super::{operands, Requant};
use crate::fused::Layout;

/// Pixels of one tile of the channel-major kernel.
const TP: usize = 16;
/// Output channels of one tile of the channel-major kernel.
const TC: usize = 4;
/// Pixels of one tile of the channel-last (pixel-major) kernel.
const PB: usize = 4;
/// Output channels of one tile of the channel-last kernel.
const CB: usize = 4;

/// Element strides `(pixel, channel)` of a `pixels × channels` tensor.
fn strides(layout: Layout, pixels: usize, channels: usize) -> (usize, usize) {
    match layout {
        Layout::PixelMajor => (channels, 1),
        Layout::ChannelMajor => (1, pixels),
    }
}

/// `out[p, c] = requant(Σₖ x[p, k]·w[c, k], c, residual[p, c])` over
/// `pixels` positions, `ci` input and `co` output channels, each side
/// channel-first or channel-last (the residual as the output).
/// The input zero point is folded into the requantization's bias
/// (`− zx·Σₖ w[c, k]`), so the kernels sum plain products.
#[derive(Clone, PartialEq)]
pub struct QPointwise {
    ci: usize,
    co: usize,
    pixels: usize,
    input: Layout,
    output: Layout,
    out_shape: TVec<usize>,
    /// `[co, ci]`, row-major.
    weights: Arc<Vec<i8>>,
    /// Tiles of [`TC`] output channels: tile `t`, input channel `k`, lane
    /// `j` = `w[TC·t + j, k]` widened (0 past `co`).
    tiles: Arc<Vec<i16>>,
    /// Tile `t`, input channels `2kk, 2kk + 1`, lane `j`: the two weights
    /// of channel `TC·t + j` as one i32 of two i16 (AVX2's pairs).
    pairs: Arc<Vec<i32>>,
    /// The channel-last tile's weights: row `c` (`kp` values, the input
    /// channels, zeros past `ci`) for `c` up to `co` rounded up to [`CB`]
    /// (zero rows past `co`).
    rows: Arc<Vec<i8>>,
    /// `ci` rounded up to 16.
    kp: usize,
    /// The x86 channel-last tiles' weights.
    #[cfg(target_arch = "x86_64")]
    packed: Arc<x86::Packed>,
    /// Row length of the channel-last sums: `co` rounded up to 16.
    ld: usize,
    requant: Arc<Requant>,
}

impl Eq for QPointwise {}

impl std::fmt::Debug for QPointwise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QPointwise({}→{} over {} pixels, {:?}→{:?}, residual: {})",
            self.ci,
            self.co,
            self.pixels,
            self.input,
            self.output,
            self.requant.residual.is_some()
        )
    }
}

/// The ISA of the kernel [`QPointwise`] runs on this CPU.
pub(super) fn isa() -> &'static str {
    if let Some(k) = rows_kernel() {
        k.name()
    } else if has_avx2() {
        "avx2 (vpmaddwd)"
    } else {
        "portable"
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The channel-last tiles of this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowsKernel {
    /// `SDOT` (aarch64 with dotprod).
    #[cfg(target_arch = "aarch64")]
    Sdot,
    /// `SMULL`/`SMLAL2`/`SADALP` (any aarch64).
    #[cfg(target_arch = "aarch64")]
    Mull,
    /// `VPDPBUSD` or `VPMADDWD` (x86-64).
    #[cfg(target_arch = "x86_64")]
    X86(x86::Kind),
}

impl RowsKernel {
    pub(super) fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "aarch64")]
            RowsKernel::Sdot => "neon (sdot; smlal channel-first)",
            #[cfg(target_arch = "aarch64")]
            RowsKernel::Mull => "neon (smull/sadalp; smlal channel-first)",
            #[cfg(target_arch = "x86_64")]
            RowsKernel::X86(x86::Kind::Vnni512) => "avx512 vnni (vpdpbusd zmm; vpmaddwd channel-first)",
            #[cfg(target_arch = "x86_64")]
            RowsKernel::X86(x86::Kind::AvxVnni) => "avx-vnni (vpdpbusd ymm; vpmaddwd channel-first)",
            #[cfg(target_arch = "x86_64")]
            RowsKernel::X86(x86::Kind::Avx2) => "avx2 (vpmaddwd)",
        }
    }

    /// Whether this CPU runs the tile.
    pub(super) fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "aarch64")]
            RowsKernel::Sdot => std::arch::is_aarch64_feature_detected!("dotprod"),
            #[cfg(target_arch = "aarch64")]
            RowsKernel::Mull => true,
            #[cfg(target_arch = "x86_64")]
            RowsKernel::X86(k) => k.available(),
        }
    }
}

/// Every channel-last tile of this ISA, fastest first, available or not.
pub(super) fn rows_kernels() -> Vec<RowsKernel> {
    #[cfg(target_arch = "aarch64")]
    {
        vec![RowsKernel::Sdot, RowsKernel::Mull]
    }
    #[cfg(target_arch = "x86_64")]
    {
        vec![RowsKernel::X86(x86::Kind::Vnni512), RowsKernel::X86(x86::Kind::AvxVnni), RowsKernel::X86(x86::Kind::Avx2)]
    }
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
    {
        Vec::new()
    }
}

/// This CPU's channel-last tile, if it has one: the first available, or on
/// x86-64 the one `TERN_INT8_X86` names (`avx512vnni`, `avxvnni`, `avx2`)
/// when this CPU runs it (to measure one against another).
fn rows_kernel() -> Option<RowsKernel> {
    static CHOSEN: std::sync::OnceLock<Option<RowsKernel>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let all = rows_kernels();
        #[cfg(target_arch = "x86_64")]
        {
            let named = match std::env::var("TERN_INT8_X86").as_deref() {
                Ok("avx512vnni") => Some(x86::Kind::Vnni512),
                Ok("avxvnni") => Some(x86::Kind::AvxVnni),
                Ok("avx2") => Some(x86::Kind::Avx2),
                _ => None,
            };
            if let Some(k) = named.map(RowsKernel::X86).filter(|k| k.available()) {
                return Some(k);
            }
        }
        all.into_iter().find(|k| k.available())
    })
}

impl QPointwise {
    /// The op for `weights` (`[co, ci]`, int8) reading an input of zero
    /// point `x_zero_point`; `requant.bias` holds the int32 bias of the
    /// graph (the zero point's share is folded in here).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ci: usize,
        co: usize,
        pixels: usize,
        input: Layout,
        output: Layout,
        out_shape: TVec<usize>,
        weights: &[i8],
        x_zero_point: i32,
        mut requant: Requant,
    ) -> TractResult<QPointwise> {
        ensure!(ci > 0 && co > 0 && pixels > 0, "pointwise convolution of {ci}→{co} channels over {pixels} pixels");
        ensure!(weights.len() == ci * co, "{} weights for {ci}→{co} channels", weights.len());
        ensure!(out_shape.iter().product::<usize>() == pixels * co, "output {out_shape:?} for {pixels}×{co}");
        ensure!((-128..=127).contains(&x_zero_point), "input zero point {x_zero_point}");
        // SMULL/SMLAL2 add two products in i16: exact for weights within ±127.
        ensure!(weights.iter().all(|&w| w != i8::MIN), "a weight is -128 (symmetric int8 weights are within ±127)");
        ensure!(requant.bias.len() == co, "{} biases for {co} channels", requant.bias.len());
        for (c, b) in requant.bias.iter_mut().enumerate() {
            let sum: i64 = weights[c * ci..][..ci].iter().map(|&w| i64::from(w)).sum();
            let folded = i64::from(*b) - i64::from(x_zero_point) * sum;
            *b = i32::try_from(folded).map_err(|_| format_err!("bias of channel {c} overflows i32"))?;
        }
        requant.check(co, ci as i64 * 128 * 128)?;
        let mut tiles = vec![0i16; co.div_ceil(TC) * ci * TC];
        for c in 0..co {
            for k in 0..ci {
                tiles[((c / TC) * ci + k) * TC + c % TC] = i16::from(weights[c * ci + k]);
            }
        }
        let kp = ci.div_ceil(2);
        let mut pairs = vec![0i32; co.div_ceil(TC) * kp * TC];
        for (t, tile) in tiles.chunks_exact(ci * TC).enumerate() {
            for kk in 0..kp {
                for j in 0..TC {
                    let lo = tile[2 * kk * TC + j] as u16 as u32;
                    let hi = if 2 * kk + 1 < ci { tile[(2 * kk + 1) * TC + j] as u16 as u32 } else { 0 };
                    pairs[(t * kp + kk) * TC + j] = (lo | hi << 16) as i32;
                }
            }
        }
        let kp = ci.div_ceil(16) * 16;
        let mut rows = vec![0i8; co.div_ceil(CB) * CB * kp];
        for (c, w) in weights.chunks_exact(ci).enumerate() {
            rows[c * kp..][..ci].copy_from_slice(w);
        }
        #[cfg(target_arch = "x86_64")]
        let packed = Arc::new(x86::Packed::new(weights, ci, co));
        Ok(QPointwise {
            ci,
            co,
            pixels,
            input,
            output,
            out_shape,
            weights: Arc::new(weights.to_vec()),
            tiles: Arc::new(tiles),
            pairs: Arc::new(pairs),
            rows: Arc::new(rows),
            kp,
            #[cfg(target_arch = "x86_64")]
            packed,
            ld: co.div_ceil(16) * 16,
            requant: Arc::new(requant),
        })
    }

    /// Channel-first in and out, output channels `c0..c1`: tiles of
    /// [`TC`] channels × [`TP`] pixels whose i32 sums stay in registers
    /// while the input channels stream past (one contiguous row of `x`
    /// each), by this CPU's tile kernel; the pixels past the last whole
    /// tile in plain loops.
    pub(super) fn channel_major(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize)) {
        self.channel_major_with(x, residual, out, rows, true)
    }

    /// [`QPointwise::channel_major`], with the ISA's tile kernel or
    /// (`kernel` false) the portable tile.
    pub(super) fn channel_major_with(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), kernel: bool) {
        let (ci, co, n) = (self.ci, self.co, self.pixels);
        let whole = n / TP * TP;
        let mut c0 = rows.0;
        while c0 < rows.1 {
            // The tile holding channel c0, and the channels of it in range.
            let t = c0 / TC;
            let c1 = rows.1.min((t + 1) * TC).min(co);
            for p0 in (0..whole).step_by(TP) {
                let acc = self.channel_tile(&x[p0..(ci - 1) * n + p0 + TP], t, kernel);
                for c in c0..c1 {
                    let o = &mut out[(c - rows.0) * n + p0..][..TP];
                    let r = residual.map(|r| &r[c * n + p0..][..TP]);
                    self.requant.run_with(&acc[c % TC], Lanes::Channel(c), r, o, kernel);
                }
            }
            for c in c0..c1 {
                let wc = &self.weights[c * ci..][..ci];
                for p in whole..n {
                    let acc = wc.iter().enumerate().fold(0i32, |a, (k, &w)| a + i32::from(x[k * n + p]) * i32::from(w));
                    out[(c - rows.0) * n + p] = self.requant.apply(acc, c, residual.map_or(0, |r| r[c * n + p]));
                }
            }
            c0 = c1;
        }
    }

    /// Channel-last in, output rows `rows.0..rows.1` (pixels channel-last,
    /// channels channel-first): blocks of [`PB`] pixels, each against the
    /// output channels in this CPU's channel-last tiles or (`kernel` false,
    /// or none) the portable tile; then the sums requantized a pixel's
    /// channels at a time (channel-last out) or a channel's [`TP`] pixels
    /// at a time (channel-first out, runs of 4·[`TP`] pixels).
    pub(super) fn pixel_major_with(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), kernel: bool) {
        self.pixel_major_by(x, residual, out, rows, if kernel { rows_kernel() } else { None }, kernel)
    }

    /// [`QPointwise::pixel_major_with`] by channel-last tile `tile` (`None`,
    /// or one this CPU lacks: the portable one), the vector epilogue with
    /// `vector`.
    pub(super) fn pixel_major_by(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), tile: Option<RowsKernel>, vector: bool) {
        let (ci, co, n, ld) = (self.ci, self.co, self.pixels, self.ld);
        let tile = tile.filter(|k| k.available());
        // The rows of pixels p0.. (past the last pixel, the block repeats it;
        // those sums are unused).
        let block = |p0: usize, np: usize| -> [&[i8]; PB] { std::array::from_fn(|i| &x[(p0 + i.min(np - 1)) * ci..][..ci]) };
        let mut acc = vec![0i32; PB * ld];
        let mut scratch = Vec::new();
        if self.output == Layout::PixelMajor {
            let mut p0 = rows.0;
            while p0 < rows.1 {
                let np = PB.min(rows.1 - p0);
                self.rows_block(tile, &block(p0, np), (0, co), &mut acc, &mut scratch);
                for i in 0..np {
                    let p = p0 + i;
                    let r = residual.map(|r| &r[p * co..][..co]);
                    self.requant.run_with(&acc[i * ld..][..co], Lanes::Channels(0), r, &mut out[(p - rows.0) * co..][..co], vector);
                }
                p0 += np;
            }
            return;
        }
        // Channel-first out: rows are channels c0..c1.
        let (c0, c1) = rows;
        if c0 >= c1 {
            return;
        }
        // Runs of 4·TP pixels a channel through the epilogue (its vector
        // steps 16 at a time, its setup once a run).
        const RUN: usize = 4 * TP;
        let mut sums = vec![0i32; (c1 - c0) * RUN];
        for p0 in (0..n).step_by(RUN) {
            let np = RUN.min(n - p0);
            for q in (0..np).step_by(PB) {
                self.rows_block(tile, &block(p0 + q, PB.min(np - q)), (c0, c1), &mut acc, &mut scratch);
                for p in 0..PB.min(np - q) {
                    for c in c0..c1 {
                        sums[(c - c0) * RUN + q + p] = acc[p * ld + c];
                    }
                }
            }
            for c in c0..c1 {
                let r = residual.map(|r| &r[c * n + p0..][..np]);
                let a = &sums[(c - c0) * RUN..][..np];
                self.requant.run_with(a, Lanes::Channel(c), r, &mut out[(c - c0) * n + p0..][..np], vector);
            }
        }
    }

    /// The sums of pixel rows `xs` against (at least) output channels
    /// `c0..c1`: `acc[p·ld + c]` (`acc` holds [`PB`] rows of `ld`), by
    /// channel-last tile `tile` (one this CPU runs) or the portable one;
    /// `scratch` is the x86 tiles' converted input, reused between calls.
    fn rows_block(&self, tile: Option<RowsKernel>, xs: &[&[i8]; PB], channels: (usize, usize), acc: &mut [i32], scratch: &mut Vec<i32>) {
        let ld = self.ld;
        #[cfg(target_arch = "x86_64")]
        if let Some(RowsKernel::X86(kind)) = tile.filter(|k| k.available()) {
            // SAFETY: `kind` available just above; `packed` was made for ci and co
            // in new(); channels end at co; acc holds PB rows of ld (co rounded up to 16).
            unsafe { x86::rows(kind, &self.packed, xs, self.ci, channels, acc, ld, scratch) };
            return;
        }
        let _ = scratch;
        for t in channels.0 / CB..channels.1.div_ceil(CB) {
            for (p, s) in self.rows_tile(tile, xs, t).iter().enumerate() {
                acc[p * ld + t * CB..][..CB].copy_from_slice(s);
            }
        }
    }

    /// The sums of pixel rows `xs` against output channel tile `t`.
    fn rows_tile(&self, tile: Option<RowsKernel>, xs: &[&[i8]; PB], t: usize) -> [[i32; CB]; PB] {
        let kp = self.kp;
        let w = &self.rows[t * CB * kp..][..CB * kp];
        match tile {
            #[cfg(target_arch = "aarch64")]
            // SAFETY: dotprod detected; each row of `xs` holds ci values, `w`
            // holds CB rows of kp (ci rounded up to 16, zeros past ci).
            Some(RowsKernel::Sdot) => unsafe { neon::rows_sdot(&xs.map(|r| r.as_ptr()), self.ci, w.as_ptr(), kp) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above; the weights are within ±127 (checked in new()).
            Some(RowsKernel::Mull) => unsafe { neon::rows_mull(&xs.map(|r| r.as_ptr()), self.ci, w.as_ptr(), kp) },
            #[cfg(target_arch = "x86_64")]
            Some(RowsKernel::X86(_)) => portable_rows(xs, w, kp),
            None => portable_rows(xs, w, kp),
        }
    }

    /// Channel-first in, channel-last out, output pixels `rows.0..rows.1`:
    /// blocks of [`TP`] pixels, each through the channel-first tile of
    /// every [`TC`] output channels (this CPU's, or the portable one with
    /// `kernel` false), the block's sums then requantized a pixel's
    /// channels at a time; a block that is not whole (at the ends of the
    /// rows or of the tensor) in plain loops.
    pub(super) fn channel_to_pixel_with(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), kernel: bool) {
        let (ci, co, n) = (self.ci, self.co, self.pixels);
        let mut acc = vec![0i32; TP * co];
        let mut p0 = rows.0;
        while p0 < rows.1 {
            let np = TP.min(rows.1 - p0);
            if np == TP {
                for t in 0..co.div_ceil(TC) {
                    let sums = self.channel_tile(&x[p0..(ci - 1) * n + p0 + TP], t, kernel);
                    for (j, s) in sums.iter().enumerate().take(co - t * TC) {
                        for (p, &v) in s.iter().enumerate() {
                            acc[p * co + t * TC + j] = v;
                        }
                    }
                }
            } else {
                for p in 0..np {
                    for c in 0..co {
                        let w = &self.weights[c * ci..][..ci];
                        acc[p * co + c] = w.iter().enumerate().fold(0i32, |a, (k, &w)| a + i32::from(x[k * n + p0 + p]) * i32::from(w));
                    }
                }
            }
            for p in 0..np {
                let r = residual.map(|r| &r[(p0 + p) * co..][..co]);
                self.requant.run_with(&acc[p * co..][..co], Lanes::Channels(0), r, &mut out[(p0 + p - rows.0) * co..][..co], kernel);
            }
            p0 += np;
        }
    }

    /// The sums of channel tile `t` over the [`TP`] pixels from the start of
    /// `tile_x` (`ci` rows of `n`), by this CPU's kernel or (`kernel` false)
    /// in plain loops.
    fn channel_tile(&self, tile_x: &[i8], t: usize, kernel: bool) -> [[i32; TP]; TC] {
        let (ci, n) = (self.ci, self.pixels);
        let w = &self.tiles[t * ci * TC..][..ci * TC];
        #[cfg(target_arch = "x86_64")]
        if kernel && has_avx2() {
            let kp = ci.div_ceil(2);
            // SAFETY: AVX2 checked; `tile_x` holds ci rows of n with TP values
            // from each row start; the pairs slice holds kp × TC values.
            return unsafe { avx2::tile(tile_x.as_ptr(), n, ci, &self.pairs[t * kp * TC..][..kp * TC]) };
        }
        #[cfg(target_arch = "aarch64")]
        if kernel {
            // SAFETY: `tile_x` holds ci rows of n with TP values from each row
            // start; `w` holds ci × TC weights.
            return unsafe { neon::tile(tile_x.as_ptr(), n, ci, w) };
        }
        let _ = kernel;
        portable_tile(tile_x, n, ci, w)
    }

    /// The same arithmetic in plain loops over any layout, output rows
    /// (pixels channel-last, channels channel-first) `r0..r1`: the second
    /// reference of the tests.
    pub(super) fn compute_portable(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize)) {
        let (ci, co, n) = (self.ci, self.co, self.pixels);
        let (xp, xc) = strides(self.input, n, ci);
        let (op, oc) = strides(self.output, n, co);
        let (pixels, channels) = match self.output {
            Layout::PixelMajor => (rows, (0, co)),
            Layout::ChannelMajor => ((0, n), rows),
        };
        let first = rows.0 * if self.output == Layout::PixelMajor { co } else { n };
        for p in pixels.0..pixels.1 {
            for c in channels.0..channels.1 {
                let w = &self.weights[c * ci..][..ci];
                let acc = w.iter().enumerate().fold(0i32, |a, (k, &w)| a + i32::from(x[p * xp + k * xc]) * i32::from(w));
                let at = p * op + c * oc;
                out[at - first] = self.requant.apply(acc, c, residual.map_or(0, |r| r[at]));
            }
        }
    }
}

/// The sums of one tile in plain loops (`x` from the tile's first pixel).
fn portable_tile(x: &[i8], n: usize, ci: usize, w: &[i16]) -> [[i32; TP]; TC] {
    let mut acc = [[0i32; TP]; TC];
    for k in 0..ci {
        let row = &x[k * n..][..TP];
        for (c, a) in acc.iter_mut().enumerate() {
            let wk = i32::from(w[k * TC + c]);
            for (a, &v) in a.iter_mut().zip(row) {
                *a += i32::from(v) * wk;
            }
        }
    }
    acc
}

/// The sums of [`PB`] channel-last pixel rows against [`CB`] weight rows of
/// `kp` values, in plain loops.
fn portable_rows(x: &[&[i8]; PB], w: &[i8], kp: usize) -> [[i32; CB]; PB] {
    let mut acc = [[0i32; CB]; PB];
    for (a, x) in acc.iter_mut().zip(x) {
        for (c, a) in a.iter_mut().enumerate() {
            *a = x.iter().zip(&w[c * kp..]).map(|(&x, &w)| i32::from(x) * i32::from(w)).sum();
        }
    }
    acc
}

impl Op for QPointwise {
    fn name(&self) -> StaticName {
        "TernQPointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QPointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, res) = operands(self, &inputs, self.requant.residual.is_some(), &self.out_shape)?;
        let (n, ci, co) = (self.pixels, self.ci, self.co);
        ensure!(x.len() == n * ci, "{self:?} given a {:?} input", inputs[0].shape());
        if self.input == Layout::ChannelMajor && self.output == Layout::PixelMajor && rows_kernel().is_some() {
            // The channel-last tile is several times the channel-first one
            // where there is one (SDOT: 16 multiply-adds an instruction, against
            // SMLAL's 4), worth one pass over the input (ci values a pixel,
            // against co·ci multiply-adds) to put it channel-last.
            let xt = transpose(x, ci, n);
            let mut out = vec![0i8; n * co];
            par_chunks_mut(&mut out, co, n * ci * co, |first, chunk| {
                self.pixel_major_with(&xt, res, chunk, (first, first + chunk.len() / co), true);
                Ok(())
            })?;
            return Ok(tvec!(Tensor::from_shape(&self.out_shape, &out)?.into_tvalue()));
        }
        let direct = match (self.input, self.output) {
            (Layout::PixelMajor, _) => rows_kernel().is_some(),
            (Layout::ChannelMajor, Layout::PixelMajor) => true,
            (Layout::ChannelMajor, Layout::ChannelMajor) => false,
        };
        if direct {
            // Each op reads and writes where the tensors lie: one output row
            // (a pixel channel-last, a channel channel-first) per chunk row;
            // `first` is the chunk's first.
            let row = if self.output == Layout::PixelMajor { co } else { n };
            let mut out = vec![0i8; n * co];
            par_chunks_mut(&mut out, row, n * ci * co, |first, chunk| {
                let rows = (first, first + chunk.len() / row);
                match self.input {
                    Layout::PixelMajor => self.pixel_major_with(x, res, chunk, rows, true),
                    Layout::ChannelMajor => self.channel_to_pixel_with(x, res, chunk, rows, true),
                }
                Ok(())
            })?;
            return Ok(tvec!(Tensor::from_shape(&self.out_shape, &out)?.into_tvalue()));
        }
        // The channel-first tiles: a channel-last input (and residual)
        // is transposed once, and a channel-last output at the end; each
        // costs a pass over one tensor against ci (or co) multiply-adds per
        // value.
        let (xt, rt);
        let x = if self.input == Layout::PixelMajor {
            xt = transpose(x, n, ci);
            &xt[..]
        } else {
            x
        };
        let res = match res {
            Some(r) if self.output == Layout::PixelMajor => {
                rt = transpose(r, n, co);
                Some(&rt[..])
            }
            r => r,
        };
        let mut out = vec![0i8; n * co];
        // One row per output channel; `first` is the chunk's first channel.
        par_chunks_mut(&mut out, n, n * ci * co, |first, chunk| {
            self.channel_major(x, res, chunk, (first, first + chunk.len() / n));
            Ok(())
        })?;
        if self.output == Layout::PixelMajor {
            out = transpose(&out, co, n);
        }
        Ok(tvec!(Tensor::from_shape(&self.out_shape, &out)?.into_tvalue()))
    }
}

/// `src` as `rows × cols`, row-major, transposed: `cols × rows`.
fn transpose(src: &[i8], rows: usize, cols: usize) -> Vec<i8> {
    let mut dst = vec![0i8; src.len()];
    for (r, row) in src.chunks_exact(cols).enumerate().take(rows) {
        for (c, &v) in row.iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
    dst
}

impl TypedOp for QPointwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + self.requant.residual.is_some() as usize);
        ensure!(inputs.iter().all(|f| f.datum_type == i8::datum_type()));
        ensure!(inputs[0].shape.volume() == (self.pixels * self.ci).to_dim());
        Ok(tvec!(i8::fact(&*self.out_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((Cost::FMA(i32::datum_type()), (self.pixels * self.ci * self.co).to_dim())))
    }

    as_op!();
}
