//! [`QDepthwise`]: a depthwise convolution of int8 activations
//! (channel-last or channel-first) with per-channel int8 weights,
//! requantized to int8; the portable loops here, the channel-last kernel
//! in NEON beside them (`neon`), the requantization by the vector epilogue.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_linalg::multithread::par_chunks_mut;

use super::epilogue::Lanes;
use super::{operands, Requant};
use crate::fused::{Geometry, Layout};

/// Channel-last or channel-first (input, output and residual alike):
/// `out[y, x, c] = requant(Σ (x[y·sh + ky − pt, x·sw + kx − pl, c] − zx)·k[c, ky, kx], c,
/// residual[y, x, c])`; taps outside the input add nothing (they are the
/// input's zero, `zx`).
#[derive(Clone, PartialEq)]
pub struct QDepthwise {
    geometry: Geometry,
    layout: Layout,
    out_shape: TVec<usize>,
    /// Tap `t = ky·kw + kx`, channel `c` at `t·c + c`, widened.
    weights: Arc<Vec<i16>>,
    /// Int8, by blocks of 16 channels: block `b`, tap `t`, channel `16b + j`
    /// at `(b·kh·kw + t)·16 + j` (the NEON kernel's; the last `c % 16`
    /// channels are not in it).
    weights8: Arc<Vec<i8>>,
    x_zero_point: i32,
    requant: Arc<Requant>,
    /// `requant` with the zero point's share of every tap in the bias
    /// (`bias − zx·Σ_taps w`): the requantization over the padded input.
    folded: Arc<Requant>,
}

impl Eq for QDepthwise {}

impl std::fmt::Debug for QDepthwise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QDepthwise({:?}, {:?}, residual: {})", self.geometry, self.layout, self.requant.residual.is_some())
    }
}

/// Kernel taps `k0..k1` of `k` whose first sits at `start − pad` that fall
/// in `0..len`.
fn inside(start: usize, pad: usize, k: usize, len: usize) -> (usize, usize) {
    let k0 = pad.saturating_sub(start).min(k);
    let k1 = (len + pad).saturating_sub(start).min(k).max(k0);
    (k0, k1)
}

impl QDepthwise {
    /// The op for `weights` (`[c, 1, kh, kw]`, int8) over an input of zero
    /// point `x_zero_point`.
    pub fn new(geometry: Geometry, layout: Layout, out_shape: TVec<usize>, weights: &[i8], x_zero_point: i32, requant: Requant) -> TractResult<QDepthwise> {
        let g = &geometry;
        let (c, (kh, kw)) = (g.c, g.kernel);
        ensure!(c > 0 && kh > 0 && kw > 0 && g.strides.0 > 0 && g.strides.1 > 0, "{g:?}");
        ensure!(weights.len() == c * kh * kw, "{} weights for {g:?}", weights.len());
        ensure!(out_shape.iter().product::<usize>() == g.out.0 * g.out.1 * c, "output {out_shape:?} for {g:?}");
        ensure!(
            g.out.0 > 0 && g.out.1 > 0 && (g.out.0 - 1) * g.strides.0 < g.h + g.pad.0 && (g.out.1 - 1) * g.strides.1 < g.w + g.pad.1,
            "{g:?}: output positions past the input"
        );
        ensure!((-128..=127).contains(&x_zero_point), "input zero point {x_zero_point}");
        // The NEON kernel sums two products in i16: exact for weights within ±127.
        ensure!(weights.iter().all(|&w| w != i8::MIN), "a weight is -128 (symmetric int8 weights are within ±127)");
        requant.check(c, (kh * kw) as i64 * 256 * 128)?;
        let mut packed = vec![0i16; kh * kw * c];
        for ch in 0..c {
            for t in 0..kh * kw {
                packed[t * c + ch] = i16::from(weights[ch * kh * kw + t]);
            }
        }
        let mut folded = requant.clone();
        for (ch, b) in folded.bias.iter_mut().enumerate() {
            let sum: i64 = weights[ch * kh * kw..][..kh * kw].iter().map(|&w| i64::from(w)).sum();
            let f = i64::from(*b) - i64::from(x_zero_point) * sum;
            *b = i32::try_from(f).map_err(|_| format_err!("bias of channel {ch} overflows i32"))?;
        }
        // Over the padded input every term is an int8 value times a weight.
        folded.check(c, (kh * kw) as i64 * 128 * 128)?;
        // By blocks of 16 channels, each tap's 16 together (the NEON kernel's
        // order); the channels past the last 16 are read from `weights`.
        let mut weights8 = vec![0i8; c / 16 * 16 * kh * kw];
        for (i, w8) in weights8.iter_mut().enumerate() {
            let (block, t, ch) = (i / (16 * kh * kw), i / 16 % (kh * kw), i % 16);
            *w8 = weights[(16 * block + ch) * kh * kw + t];
        }
        Ok(QDepthwise {
            geometry,
            layout,
            out_shape,
            weights: Arc::new(packed),
            weights8: Arc::new(weights8),
            x_zero_point,
            requant: Arc::new(requant),
            folded: Arc::new(folded),
        })
    }

    /// The rows and columns of the padded input: every output position's
    /// whole window.
    fn padded_size(&self) -> (usize, usize) {
        let g = &self.geometry;
        ((g.out.0 - 1) * g.strides.0 + g.kernel.0, (g.out.1 - 1) * g.strides.1 + g.kernel.1)
    }

    /// The channel-last input `x` inside a border of its zero point, as
    /// large as [`QDepthwise::padded_size`]: input `(y, x)` at padded
    /// `(y + pad top, x + pad left)`.
    pub(super) fn padded(&self, x: &[i8]) -> Vec<i8> {
        let g = &self.geometry;
        let (hp, wp) = self.padded_size();
        let mut xp = vec![self.x_zero_point as i8; hp * wp * g.c];
        // The input columns that land inside the padded width (none where
        // the left padding covers it all).
        let cols = (wp - g.pad.1.min(wp)).min(g.w);
        if cols > 0 {
            for yp in g.pad.0..hp.min(g.h + g.pad.0) {
                let src = &x[(yp - g.pad.0) * g.w * g.c..][..cols * g.c];
                xp[(yp * wp + g.pad.1) * g.c..][..cols * g.c].copy_from_slice(src);
            }
        }
        xp
    }

    /// Channel-last over the padded input `xp` ([`QDepthwise::padded`]),
    /// output rows `oy0..oy1`: 16 channels a step by the NEON kernel where
    /// there is one (`kernel` set), the other channels in plain loops;
    /// every tap inside, the zero point's share in the folded bias.
    pub(super) fn pixel_major_padded(&self, xp: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), kernel: bool) {
        let g = &self.geometry;
        let (c, (kh, kw), (sy, sx), ow) = (g.c, g.kernel, g.strides, g.out.1);
        let (_, wp) = self.padded_size();
        let rq = &*self.folded;
        #[allow(unused_mut)]
        let mut c16 = 0;
        #[cfg(target_arch = "aarch64")]
        let k = super::epilogue::neon::Consts::new(rq);
        for oy in rows.0..rows.1 {
            let x0 = oy * sy * wp * c;
            let o = &mut out[(oy - rows.0) * ow * c..][..ow * c];
            let r = residual.map(|r| &r[oy * ow * c..][..ow * c]);
            #[cfg(target_arch = "aarch64")]
            if kernel {
                c16 = c / 16 * 16;
                let t = neon::Window { kh, kw, row: wp * c, c, step: sx * c };
                let xs = &xp[x0..][..((kh - 1) * wp + (ow - 1) * sx + kw) * c];
                // SAFETY: `xs` runs to the last tap of the last position (ky < kh, kx < kw, ox < ow, ch < c16 ≤ c), the weights
                // hold kh·kw·c16 values, `o` and `r` ow·c, the multipliers and biases c ≥ c16; weights within ±127 (new()).
                unsafe {
                    neon::row(
                        xs.as_ptr(),
                        self.weights8.as_ptr(),
                        &t,
                        ow,
                        &k,
                        rq.multiplier.as_ptr(),
                        rq.bias.as_ptr(),
                        r.map(|r| r.as_ptr()),
                        o.as_mut_ptr(),
                        c16,
                    )
                };
            }
            let _ = kernel;
            for ox in 0..ow {
                for ch in c16..c {
                    let mut acc = 0i32;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let v = xp[x0 + (ky * wp + ox * sx + kx) * c + ch];
                            acc += i32::from(v) * i32::from(self.weights[(ky * kw + kx) * c + ch]);
                        }
                    }
                    o[ox * c + ch] = rq.apply(acc, ch, r.map_or(0, |r| r[ox * c + ch]));
                }
            }
        }
    }

    /// Rows `r0..r1` of the output (output rows channel-last, channels
    /// channel-first) of the whole tensors `x` (or, channel-last, its
    /// padded copy `xp`), `residual`, into `out` (those rows).
    fn compute(&self, x: &[i8], xp: Option<&[i8]>, residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize)) {
        match (self.layout, xp) {
            (Layout::PixelMajor, Some(xp)) => self.pixel_major_padded(xp, residual, out, rows, true),
            (Layout::PixelMajor, None) => self.pixel_major(x, residual, out, rows, true),
            (Layout::ChannelMajor, _) => self.channel_major(x, residual, out, rows, true),
        }
    }

    /// Channel-first, channels `c0..c1`: one plane at a time, one output
    /// row at a time, each kernel tap added to the whole row (the columns
    /// where it falls inside the input) so the inner loop runs over
    /// contiguous outputs.
    pub(super) fn channel_major(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], channels: (usize, usize), vector: bool) {
        let g = &self.geometry;
        let (c, (kh, kw), (sy, sx)) = (g.c, g.kernel, g.strides);
        let (plane, oplane, ow) = (g.h * g.w, g.out.0 * g.out.1, g.out.1);
        let zx = self.x_zero_point;
        let mut acc = vec![0i32; ow];
        // The output columns where tap column kx falls inside the input.
        let cols: Vec<(usize, usize)> = (0..kw)
            .map(|kx| {
                let first = g.pad.1.saturating_sub(kx).div_ceil(sx);
                let end = if g.w + g.pad.1 > kx { ((g.w + g.pad.1 - kx - 1) / sx + 1).min(ow) } else { 0 };
                (first.min(end), end)
            })
            .collect();
        for ch in channels.0..channels.1 {
            let xs = &x[ch * plane..][..plane];
            let o = &mut out[(ch - channels.0) * oplane..][..oplane];
            for oy in 0..g.out.0 {
                let (ky0, ky1) = inside(oy * sy, g.pad.0, kh, g.h);
                acc.fill(0);
                for ky in ky0..ky1 {
                    let row = &xs[(oy * sy + ky - g.pad.0) * g.w..][..g.w];
                    for (kx, &(ox0, ox1)) in cols.iter().enumerate().filter(|(_, &(ox0, ox1))| ox0 < ox1) {
                        let w = i32::from(self.weights[(ky * kw + kx) * c + ch]);
                        let first = ox0 * sx + kx - g.pad.1;
                        if sx == 1 {
                            tap_row(&mut acc[ox0..ox1], &row[first..], zx, w, vector);
                        } else {
                            for (a, &v) in acc[ox0..ox1].iter_mut().zip(row[first..].iter().step_by(sx)) {
                                *a += (i32::from(v) - zx) * w;
                            }
                        }
                    }
                }
                let base = oy * ow;
                let r = residual.map(|r| &r[ch * oplane + base..][..ow]);
                self.requant.run_with(&acc, Lanes::Channel(ch), r, &mut o[base..][..ow], vector);
            }
        }
    }

    /// Channel-last, output rows `oy0..oy1`, on the unpadded input: every
    /// channel of a position at once (the zero point taken off each tap
    /// inside the input), by the AVX2 kernel where there is one and
    /// `kernel` is set (the channels past the last 16 in plain loops),
    /// then the position's channels requantized together (the vector
    /// epilogue with `kernel`).
    pub(super) fn pixel_major(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), kernel: bool) {
        let g = &self.geometry;
        let (c, (_, kw)) = (g.c, g.kernel);
        let zx = self.x_zero_point;
        let mut acc = vec![0i32; c];
        let mut at = 0;
        #[allow(unused_mut)]
        let mut c16 = 0;
        #[cfg(target_arch = "x86_64")]
        if kernel && is_x86_feature_detected!("avx2") {
            c16 = c / 16 * 16;
        }
        for oy in rows.0..rows.1 {
            let (ky0, ky1) = inside(oy * g.strides.0, g.pad.0, g.kernel.0, g.h);
            for ox in 0..g.out.1 {
                let (kx0, kx1) = inside(ox * g.strides.1, g.pad.1, kw, g.w);
                // The kernel writes channels ..c16 where it runs; the rest start from 0.
                let ran = c16 > 0 && ky1 > ky0 && kx1 > kx0;
                acc[if ran { c16 } else { 0 }..].fill(0);
                #[cfg(target_arch = "x86_64")]
                if ran {
                    let first = ((oy * g.strides.0 + ky0 - g.pad.0) * g.w + ox * g.strides.1 + kx0 - g.pad.1) * c;
                    let taps = avx2::Taps { ky: ky1 - ky0, kx: kx1 - kx0, row: g.w * c, wrow: kw * c, c };
                    let xs = &x[first..][..(taps.ky - 1) * taps.row + (taps.kx - 1) * c + c];
                    let ws = &self.weights[(ky0 * kw + kx0) * c..][..(taps.ky - 1) * taps.wrow + (taps.kx - 1) * c + c];
                    // SAFETY: AVX2 checked (c16 > 0 only then); `xs`, `ws` sliced to the last
                    // tap's last channel (i < ky, j < kx, ch < c16 ≤ c); `acc` holds c ≥ c16.
                    unsafe { avx2::position(xs.as_ptr(), ws.as_ptr(), &taps, zx as i8, c16, acc.as_mut_ptr()) };
                }
                for ky in ky0..ky1 {
                    let iy = oy * g.strides.0 + ky - g.pad.0;
                    for kx in kx0..kx1 {
                        let ix = ox * g.strides.1 + kx - g.pad.1;
                        let xs = &x[(iy * g.w + ix) * c..][..c];
                        let ws = &self.weights[(ky * kw + kx) * c..][..c];
                        for ((a, &x), &w) in acc.iter_mut().zip(xs).zip(ws).skip(if ran { c16 } else { 0 }) {
                            *a += (i32::from(x) - zx) * i32::from(w);
                        }
                    }
                }
                let base = (oy * g.out.1 + ox) * c;
                let r = residual.map(|r| &r[base..][..c]);
                self.requant.run_with(&acc, Lanes::Channels(0), r, &mut out[at..][..c], kernel);
                at += c;
            }
        }
    }
}

/// `acc[i] += (x[i] − zx)·w` over `acc`'s length (`x` no shorter): with
/// `vector` on a CPU with AVX2, the same loop compiled for AVX2 (the
/// baseline's SSE2 lacks the widening and the 32-bit multiply).
fn tap_row(acc: &mut [i32], x: &[i8], zx: i32, w: i32, vector: bool) {
    fn plain(acc: &mut [i32], x: &[i8], zx: i32, w: i32) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += (i32::from(v) - zx) * w;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if vector && is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2(acc: &mut [i32], x: &[i8], zx: i32, w: i32) {
            plain(acc, x, zx, w)
        }
        // SAFETY: AVX2 detected just above; the function takes no pointer.
        unsafe { avx2(acc, x, zx, w) };
        return;
    }
    let _ = vector;
    plain(acc, x, zx, w)
}

impl Op for QDepthwise {
    fn name(&self) -> StaticName {
        "TernQDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        let (x, res) = operands(self, &inputs, self.requant.residual.is_some(), &self.out_shape)?;
        ensure!(x.len() == g.h * g.w * g.c, "{self:?} given a {:?} input", inputs[0].shape());
        let row = match self.layout {
            Layout::PixelMajor => g.out.1 * g.c,
            Layout::ChannelMajor => g.out.0 * g.out.1,
        };
        let mut out = vec![0i8; g.out.0 * g.out.1 * g.c];
        let work = out.len() * g.kernel.0 * g.kernel.1;
        // Channel-last on aarch64: the NEON kernel over the input padded
        // with its zero point (a copy of the input against kh·kw
        // multiply-adds a value).
        let xp = (cfg!(target_arch = "aarch64") && self.layout == Layout::PixelMajor).then(|| self.padded(x));
        // Rows: output rows channel-last, channels channel-first; `first`
        // is the chunk's first.
        par_chunks_mut(&mut out, row, work, |first, chunk| {
            self.compute(x, xp.as_deref(), res, chunk, (first, first + chunk.len() / row));
            Ok(())
        })?;
        Ok(tvec!(Tensor::from_shape(&self.out_shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for QDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geometry;
        ensure!(inputs.len() == 1 + self.requant.residual.is_some() as usize);
        ensure!(inputs.iter().all(|f| f.datum_type == i8::datum_type()));
        ensure!(inputs[0].shape.volume() == (g.h * g.w * g.c).to_dim());
        Ok(tvec!(i8::fact(&*self.out_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        Ok(tvec!((Cost::FMA(i32::datum_type()), (g.out.0 * g.out.1 * g.c * g.kernel.0 * g.kernel.1).to_dim())))
    }

    as_op!();
}
