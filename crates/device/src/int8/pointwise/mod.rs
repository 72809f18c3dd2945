//! [`QPointwise`]: a 1×1 convolution of int8 activations (channel-last or
//! channel-first in and out) with per-channel int8 weights, requantized to
//! int8; the portable loops here, the tiles per ISA beside them (`avx2`:
//! the channel-first tile by `VPMADDWD`; `neon`: the channel-last tiles by
//! `SDOT` by element or `SMULL`/`SADALP`, requantized in registers, and a
//! channel-first tile by `SMLAL` by lane). Where the CPU has a channel-last
//! tile (aarch64; x86-64 with AVX2: `x86`, by `VPDPBUSD` with AVX-512
//! VNNI or AVX-VNNI, `VPMADDWD` with AVX2) every layout runs on it: a
//! channel-last input in place, a channel-first one transposed once;
//! elsewhere the channel-first tile, with transposes for channel-last
//! inputs.

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
/// Output channels of one block of the channel-last broadcast tile.
const BC: usize = 16;

/// `w` (`[co, ci]`) packed for `neon::broadcast` with blocks of `4·v`
/// output channels: block `b`, group `g` of 4 input channels, vector `u`,
/// `w[4v·b + 4u + i, 4g + j]` at `((b·kq + g)·v + u)·16 + 4i + j` (`kq` =
/// `ci` ÷ 4 rounded up; zeros past `co` and `ci`).
fn broadcast_pack(w: &[i8], ci: usize, co: usize, v: usize) -> Vec<i8> {
    let kq = ci.div_ceil(4);
    let mut out = vec![0i8; co.div_ceil(4 * v) * kq * v * 16];
    for (c, row) in w.chunks_exact(ci).enumerate().take(co) {
        let (b, u, i) = (c / (4 * v), (c % (4 * v)) / 4, c % 4);
        for (k, &x) in row.iter().enumerate() {
            out[((b * kq + k / 4) * v + u) * 16 + 4 * i + k % 4] = x;
        }
    }
    out
}

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
    /// channels, zeros past `ci`) for `c` up to `co` rounded up to [`BC`]
    /// (zero rows past `co`).
    rows: Arc<Vec<i8>>,
    /// `ci` rounded up to 16.
    kp: usize,
    /// The broadcast tile's weights (`SDOT` by element, where the CPU has
    /// it; empty elsewhere): blocks of [`BC`] output channels, each by
    /// groups of 4 input channels, as `neon::broadcast` reads them.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    broadcast: Arc<Vec<i8>>,
    /// The multipliers and biases, zeros past `co` up to a whole block of
    /// [`BC`] (empty without a channel-last tile).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    padded: Arc<(Vec<f32>, Vec<i32>)>,
    /// The padded multipliers, each 4 times (the broadcast tile's
    /// channel-first output; empty without it).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    mult4: Arc<Vec<f32>>,
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
    /// Whether the broadcast tiles (`SDOT` by element) take the place of
    /// the 4 × 4 tile.
    #[cfg(target_arch = "aarch64")]
    fn broadcast(self) -> bool {
        match self {
            RowsKernel::Sdot => true,
            RowsKernel::Mull => false,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "aarch64")]
            RowsKernel::Sdot => "neon (sdot by element)",
            #[cfg(target_arch = "aarch64")]
            RowsKernel::Mull => "neon (smull/sadalp)",
            #[cfg(target_arch = "x86_64")]
            RowsKernel::X86(x86::Kind::Vnni512) => "avx512 vnni (vpdpbusd zmm)",
            #[cfg(target_arch = "x86_64")]
            RowsKernel::X86(x86::Kind::AvxVnni) => "avx-vnni (vpdpbusd ymm)",
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
        rows_kernels().into_iter().find(|k| k.available())
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
        let mut rows = vec![0i8; co.div_ceil(BC) * BC * kp];
        for (c, w) in weights.chunks_exact(ci).enumerate() {
            rows[c * kp..][..ci].copy_from_slice(w);
        }
        #[cfg(target_arch = "aarch64")]
        let sdot = rows_kernel().is_some_and(|k| k.broadcast());
        #[cfg(not(target_arch = "aarch64"))]
        let sdot = false;
        let broadcast = if sdot { broadcast_pack(weights, ci, co, BC / 4) } else { Vec::new() };
        let mult4 = if sdot {
            (0..co.div_ceil(BC) * BC * 4).map(|i| requant.multiplier.get(i / 4).copied().unwrap_or(0.0)).collect()
        } else {
            Vec::new()
        };
        let padded = if cfg!(target_arch = "aarch64") {
            let cp = co.div_ceil(BC) * BC;
            let mut m = requant.multiplier.clone();
            let mut b = requant.bias.clone();
            m.resize(cp, 0.0);
            b.resize(cp, 0);
            (m, b)
        } else {
            Default::default()
        };
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
            broadcast: Arc::new(broadcast),
            padded: Arc::new(padded),
            mult4: Arc::new(mult4),
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
    /// channels channel-first): by this CPU's fused channel-last tiles
    /// where it has them and `kernel` is set; else blocks of [`PB`] pixels,
    /// each against tiles of [`CB`] output channels in plain loops, then
    /// the sums requantized a pixel's channels at a time (channel-last
    /// out) or a channel's [`TP`] pixels at a time (channel-first out,
    /// blocks of [`TP`] pixels).
    pub(super) fn pixel_major_with(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), kernel: bool) {
        self.pixel_major_by(x, residual, out, rows, if kernel { rows_kernel() } else { None }, kernel)
    }

    /// [`QPointwise::pixel_major_with`] by channel-last tile `tile` (`None`,
    /// or one this CPU lacks: the portable one), the vector epilogue with
    /// `vector`.
    pub(super) fn pixel_major_by(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), tile: Option<RowsKernel>, vector: bool) {
        let (ci, co, n, ld) = (self.ci, self.co, self.pixels, self.ld);
        let tile = tile.filter(|k| k.available());
        #[cfg(target_arch = "aarch64")]
        if let Some(tile) = tile {
            match self.output {
                Layout::PixelMajor => self.fused_last(tile, x, residual, out, rows),
                Layout::ChannelMajor if tile.broadcast() => self.broadcast_first(x, residual, out, rows),
                Layout::ChannelMajor => self.mull_first(x, residual, out, rows),
            }
            return;
        }
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
        let _ = (tile, scratch);
        for t in channels.0 / CB..channels.1.div_ceil(CB) {
            for (p, s) in self.rows_tile(xs, t).iter().enumerate() {
                acc[p * ld + t * CB..][..CB].copy_from_slice(s);
            }
        }
    }

    /// Channel-last in and out by this CPU's tile, output pixels
    /// `rows.0..rows.1`: 4 pixels × [`BC`] output channels a tile (the
    /// broadcast tile with `SDOT`, four 4 × 4 tiles without), the sums
    /// requantized in registers; a block short of pixels or channels
    /// through buffers.
    #[cfg(target_arch = "aarch64")]
    fn fused_last(&self, tile: RowsKernel, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize)) {
        const P: usize = 4;
        let (ci, co, kp) = (self.ci, self.co, self.kp);
        let w = &*self.broadcast;
        // One block's tile on P rows of ci from `x`; the residual and output
        // (when given) P rows of BC at a stride of `stride`.
        let run = |x: &[i8], b: usize, k: &super::epilogue::neon::Consts, r: Option<&[i8]>, o: &mut [i8], stride: usize| {
            let (m, bs) = (&self.padded.0[b * BC..][..BC], &self.padded.1[b * BC..][..BC]);
            let (x, r) = (&x[..P * ci], r.map(|r| &r[..(P - 1) * stride + BC]));
            let o = &mut o[..(P - 1) * stride + BC];
            match tile {
                RowsKernel::Sdot => {
                    let block = ci.div_ceil(4) * BC * 4;
                    let wb = &w[b * block..][..block];
                    // SAFETY: dotprod (this tile's CPUs); `x` holds P rows of ci, `wb` one block of ci ÷ 4 rounded up groups,
                    // `m`, `bs` BC values; `r` and `o` P rows of BC at a stride of `stride` (sliced just above).
                    unsafe { neon::last_tile(x.as_ptr(), ci, wb.as_ptr(), k, m.as_ptr(), bs.as_ptr(), r.map(|r| r.as_ptr()), o.as_mut_ptr(), stride) }
                }
                RowsKernel::Mull => {
                    let wb = &self.rows[b * BC * kp..][..BC * kp];
                    // SAFETY: as above, `wb` BC rows of kp (ci rounded up to 16, zeros
                    // past ci); the weights are within ±127 (checked in new()).
                    unsafe {
                        neon::last_tile_mull(x.as_ptr(), ci, wb.as_ptr(), kp, k, m.as_ptr(), bs.as_ptr(), r.map(|r| r.as_ptr()), o.as_mut_ptr(), stride)
                    }
                }
            }
        };
        let k = super::epilogue::neon::Consts::new(&self.requant);
        let mut xb = vec![0i8; P * ci];
        let (mut ob, mut rb) = ([0i8; P * BC], [0i8; P * BC]);
        let mut p0 = rows.0;
        while p0 < rows.1 {
            let np = P.min(rows.1 - p0);
            let xs = if np == P {
                &x[p0 * ci..][..P * ci]
            } else {
                xb[..np * ci].copy_from_slice(&x[p0 * ci..][..np * ci]);
                &xb[..]
            };
            for b in 0..co.div_ceil(BC) {
                let (c0, nc) = (b * BC, BC.min(co - b * BC));
                let o = &mut out[(p0 - rows.0) * co..][..np * co];
                if np == P && nc == BC {
                    run(xs, b, &k, residual.map(|r| &r[p0 * co + c0..]), &mut o[c0..], co);
                    continue;
                }
                if let Some(r) = residual {
                    for p in 0..np {
                        rb[p * BC..][..nc].copy_from_slice(&r[(p0 + p) * co + c0..][..nc]);
                    }
                }
                run(xs, b, &k, residual.map(|_| &rb[..]), &mut ob, BC);
                for p in 0..np {
                    o[p * co + c0..][..nc].copy_from_slice(&ob[p * BC..][..nc]);
                }
            }
            p0 += np;
        }
    }

    /// Channel-last in, channel-first out without the broadcast tile,
    /// output channels `rows.0..rows.1`: 16 pixels × 4 output channels a
    /// tile (four 4 × 4 `SMULL`/`SADALP` tiles), the sums transposed and
    /// requantized in registers; a block short of pixels through buffers.
    #[cfg(target_arch = "aarch64")]
    fn mull_first(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize)) {
        const P: usize = 16;
        let (ci, n, kp) = (self.ci, self.pixels, self.kp);
        let k = super::epilogue::neon::Consts::new(&self.requant);
        // Tile t's channels j0..j1 on P rows of ci from `x`; the residual and
        // output (when given) j1 − j0 rows of P at a stride of `stride`.
        let run = |x: &[i8], t: usize, js: (usize, usize), r: Option<&[i8]>, o: &mut [i8], stride: usize| {
            let (m, bs) = (&self.padded.0[4 * t..][..4], &self.padded.1[4 * t..][..4]);
            let (x, r) = (&x[..P * ci], r.map(|r| &r[..(js.1 - js.0 - 1) * stride + P]));
            let o = &mut o[..(js.1 - js.0 - 1) * stride + P];
            let wb = &self.rows[4 * t * kp..][..4 * kp];
            // SAFETY: `x` holds P rows of ci, `wb` 4 rows of kp (ci rounded up to 16, zeros past ci), `m`, `bs` 4; j0 < j1 ≤ 4;
            // `r`, `o` j1 − j0 rows of P at a stride of `stride` (sliced just above); weights within ±127 (new()).
            unsafe {
                neon::first_tile_mull(x.as_ptr(), ci, wb.as_ptr(), kp, &k, m.as_ptr(), bs.as_ptr(), r.map(|r| r.as_ptr()), o.as_mut_ptr(), stride, js)
            }
        };
        let (c0, c1) = rows;
        if c0 >= c1 {
            return;
        }
        let mut xb = vec![0i8; P * ci];
        let (last, np_last) = (n / P * P, n % P);
        xb[..np_last * ci].copy_from_slice(&x[last * ci..][..np_last * ci]);
        let (mut ob, mut rb) = ([0i8; 4 * P], [0i8; 4 * P]);
        for t in c0 / 4..(c1 - 1) / 4 + 1 {
            // The channels of tile t in the chunk: j0..j1 of its four.
            let (j0, j1) = (c0.max(4 * t) - 4 * t, c1.min(4 * t + 4) - 4 * t);
            let o = &mut out[(4 * t + j0 - c0) * n..][..(j1 - j0) * n];
            for p0 in (0..n).step_by(P) {
                let np = P.min(n - p0);
                if np == P {
                    run(&x[p0 * ci..], t, (j0, j1), residual.map(|r| &r[(4 * t + j0) * n + p0..]), &mut o[p0..], n);
                    continue;
                }
                if let Some(r) = residual {
                    for j in j0..j1 {
                        rb[(j - j0) * P..][..np].copy_from_slice(&r[(4 * t + j) * n + p0..][..np]);
                    }
                }
                run(&xb, t, (j0, j1), residual.map(|_| &rb[..]), &mut ob, P);
                for j in 0..j1 - j0 {
                    o[j * n + p0..][..np].copy_from_slice(&ob[j * P..][..np]);
                }
            }
        }
    }

    /// Channel-last in, channel-first out by the broadcast tile, output
    /// channels `rows.0..rows.1`: 4 pixels × [`BC`] output channels a tile
    /// (as channel-last out), the sums of each 4 channels transposed and
    /// requantized in registers, stored 4 pixels a channel; a block short
    /// of pixels through buffers.
    #[cfg(target_arch = "aarch64")]
    fn broadcast_first(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize)) {
        const P: usize = 4;
        let (ci, n) = (self.ci, self.pixels);
        let w = &*self.broadcast;
        let block = ci.div_ceil(4) * BC * 4;
        let k = super::epilogue::neon::Consts::new(&self.requant);
        let (c0, c1) = rows;
        if c0 >= c1 {
            return;
        }
        let mut xb = vec![0i8; P * ci];
        let (last, np_last) = (n / P * P, n % P);
        xb[..np_last * ci].copy_from_slice(&x[last * ci..][..np_last * ci]);
        let (mut ob, mut rb) = ([0i8; BC * P], [0i8; BC * P]);
        for b in c0 / BC..(c1 - 1) / BC + 1 {
            // The channels of block b in the chunk: j0..j1 of its BC.
            let (j0, j1) = (c0.max(BC * b) - BC * b, c1.min(BC * b + BC) - BC * b);
            let o = &mut out[(BC * b + j0 - c0) * n..][..(j1 - j0) * n];
            let wb = &w[b * block..][..block];
            let (m4, bs) = (&self.mult4[4 * BC * b..][..4 * BC], &self.padded.1[BC * b..][..BC]);
            let len = |stride: usize| (j1 - j0 - 1) * stride + P;
            for p0 in (0..n).step_by(P) {
                let np = P.min(n - p0);
                if np == P {
                    let xs = &x[p0 * ci..][..P * ci];
                    let r = residual.map(|r| &r[(BC * b + j0) * n + p0..][..len(n)]);
                    let o = &mut o[p0..][..len(n)];
                    // SAFETY: dotprod (this tile's CPUs); `xs` holds P rows of ci, `wb` one block of ci ÷ 4 rounded up groups,
                    // `m4` 4·BC and `bs` BC values; j0 < j1 ≤ BC; `r` and `o` j1 − j0 rows of P at a stride of n.
                    unsafe {
                        neon::last_tile_t(xs.as_ptr(), ci, wb.as_ptr(), &k, m4.as_ptr(), bs.as_ptr(), r.map(|r| r.as_ptr()), o.as_mut_ptr(), n, (j0, j1))
                    };
                    continue;
                }
                if let Some(r) = residual {
                    for j in j0..j1 {
                        rb[(j - j0) * P..][..np].copy_from_slice(&r[(BC * b + j) * n + p0..][..np]);
                    }
                }
                // SAFETY: as above, through the buffers (P rows of ci; j1 − j0 rows of P
                // at a stride of P, in BC·P values).
                unsafe {
                    neon::last_tile_t(xb.as_ptr(), ci, wb.as_ptr(), &k, m4.as_ptr(), bs.as_ptr(), residual.map(|_| rb.as_ptr()), ob.as_mut_ptr(), P, (j0, j1))
                };
                for j in 0..j1 - j0 {
                    o[j * n + p0..][..np].copy_from_slice(&ob[j * P..][..np]);
                }
            }
        }
    }

    /// The sums of pixel rows `xs` against output channel tile `t`, in
    /// plain loops (the CPUs with a channel-last tile run the fused ones).
    fn rows_tile(&self, xs: &[&[i8]; PB], t: usize) -> [[i32; CB]; PB] {
        let kp = self.kp;
        portable_rows(xs, &self.rows[t * CB * kp..][..CB * kp], kp)
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
        if self.input == Layout::ChannelMajor && rows_kernel().is_some() {
            // The channel-last tiles are several times the channel-first one
            // where there are some (SDOT: 16 multiply-adds an instruction, against
            // SMLAL's 4), worth one pass over the input (ci values a pixel,
            // against co·ci multiply-adds) to put it channel-last.
            let xt = transpose(x, ci, n);
            let row = if self.output == Layout::PixelMajor { co } else { n };
            let mut out = vec![0i8; n * co];
            par_chunks_mut(&mut out, row, n * ci * co, |first, chunk| {
                self.pixel_major_with(&xt, res, chunk, (first, first + chunk.len() / row), true);
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

/// `src` as `rows × cols`, row-major, transposed: `cols × rows`; by
/// blocks of 16 × 16 in NEON, the rows and columns past the last whole
/// block in plain loops.
fn transpose(src: &[i8], rows: usize, cols: usize) -> Vec<i8> {
    let mut dst = vec![0i8; src.len()];
    #[allow(unused_mut)]
    let (mut r16, mut c16) = (0, 0);
    #[cfg(target_arch = "aarch64")]
    if src.len() >= rows * cols {
        (r16, c16) = (rows / 16 * 16, cols / 16 * 16);
        for r0 in (0..r16).step_by(16) {
            for c0 in (0..c16).step_by(16) {
                // SAFETY: r0 + 16 ≤ rows, c0 + 16 ≤ cols; `src` (checked) and `dst`
                // (its length) hold rows·cols values.
                unsafe { neon::transpose16(src.as_ptr(), dst.as_mut_ptr(), rows, cols, r0, c0) };
            }
        }
    }
    for (r, row) in src.chunks_exact(cols).enumerate().take(rows) {
        let first = if r < r16 { c16 } else { 0 };
        for (c, &v) in row.iter().enumerate().skip(first) {
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
