//! [`QPointwise`]: a 1×1 convolution of int8 activations (channel-last in
//! and out) with per-channel int8 weights, requantized to int8; the
//! portable loops here, the channel-major tile per ISA beside them
//! (`avx2`: `VPMADDWD`; `neon`: `SMLAL` by lane).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_linalg::multithread::par_chunks_mut;

use super::{operands, Requant};
use crate::fused::Layout;

/// Pixels of one tile of the channel-major kernel.
const TP: usize = 16;
/// Output channels of one tile of the channel-major kernel.
const TC: usize = 4;

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
    if cfg!(target_arch = "aarch64") {
        "neon (smlal)"
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
        #[cfg(target_arch = "x86_64")]
        let kp = ci.div_ceil(2);
        #[cfg(target_arch = "x86_64")]
        let avx2 = kernel && has_avx2();
        let mut c0 = rows.0;
        while c0 < rows.1 {
            // The tile holding channel c0, and the channels of it in range.
            let t = c0 / TC;
            let c1 = rows.1.min((t + 1) * TC).min(co);
            let w = &self.tiles[t * ci * TC..][..ci * TC];
            for p0 in (0..whole).step_by(TP) {
                let tile_x = &x[p0..(ci - 1) * n + p0 + TP];
                #[allow(unused_mut)]
                let mut acc = None;
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 checked; `tile_x` (sliced) holds ci rows of n with TP
                    // values from each row start; the pairs slice holds kp × TC values.
                    acc = Some(unsafe { avx2::tile(tile_x.as_ptr(), n, ci, &self.pairs[t * kp * TC..][..kp * TC]) });
                }
                #[cfg(target_arch = "aarch64")]
                if kernel {
                    // SAFETY: `tile_x` holds ci rows of n with TP values from
                    // each row start; `w` holds ci × TC weights.
                    acc = Some(unsafe { neon::tile(tile_x.as_ptr(), n, ci, w) });
                }
                let acc = acc.unwrap_or_else(|| portable_tile(tile_x, n, ci, w));
                for c in c0..c1 {
                    let o = &mut out[(c - rows.0) * n + p0..][..TP];
                    for (j, (o, &a)) in o.iter_mut().zip(&acc[c % TC]).enumerate() {
                        *o = self.requant.apply(a, c, residual.map_or(0, |r| r[c * n + p0 + j]));
                    }
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
        // The tiles run channel-first: a channel-last input (and residual)
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
