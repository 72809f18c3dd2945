//! [`QDepthwise`]: a depthwise convolution of int8 activations
//! (channel-last or channel-first) with per-channel int8 weights,
//! requantized to int8; the portable loops here, the channel-last kernel
//! in NEON and AVX2 beside them (`neon`, `avx2`), the requantization by the
//! vector epilogue.

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
    x_zero_point: i32,
    requant: Arc<Requant>,
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
        requant.check(c, (kh * kw) as i64 * 256 * 128)?;
        let mut packed = vec![0i16; kh * kw * c];
        for ch in 0..c {
            for t in 0..kh * kw {
                packed[t * c + ch] = i16::from(weights[ch * kh * kw + t]);
            }
        }
        Ok(QDepthwise { geometry, layout, out_shape, weights: Arc::new(packed), x_zero_point, requant: Arc::new(requant) })
    }

    /// Rows `r0..r1` of the output (output rows channel-last, channels
    /// channel-first) of the whole tensors `x`, `residual`, into `out`
    /// (those rows).
    fn compute(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize)) {
        match self.layout {
            Layout::PixelMajor => self.pixel_major(x, residual, out, rows, true),
            Layout::ChannelMajor => self.channel_major(x, residual, out, rows, true),
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
                    for (kx, &(ox0, ox1)) in cols.iter().enumerate() {
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

    /// Channel-last, output rows `oy0..oy1`: every channel of a position at
    /// once, by the NEON or AVX2 kernel where there is one and `kernel` is set (the
    /// channels past the last 16 in plain loops), then the position's
    /// channels requantized together (the vector epilogue with `kernel`).
    pub(super) fn pixel_major(&self, x: &[i8], residual: Option<&[i8]>, out: &mut [i8], rows: (usize, usize), kernel: bool) {
        let g = &self.geometry;
        let (c, (_, kw)) = (g.c, g.kernel);
        let zx = self.x_zero_point;
        let mut acc = vec![0i32; c];
        let mut at = 0;
        #[allow(unused_mut)]
        let mut c16 = 0;
        #[cfg(target_arch = "aarch64")]
        if kernel {
            c16 = c / 16 * 16;
        }
        #[cfg(target_arch = "x86_64")]
        let avx2 = kernel && is_x86_feature_detected!("avx2");
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            c16 = c / 16 * 16;
        }
        for oy in rows.0..rows.1 {
            let (ky0, ky1) = inside(oy * g.strides.0, g.pad.0, g.kernel.0, g.h);
            for ox in 0..g.out.1 {
                let (kx0, kx1) = inside(ox * g.strides.1, g.pad.1, kw, g.w);
                // The kernel writes channels ..c16 where it runs; the rest start from 0.
                let ran = c16 > 0 && ky1 > ky0 && kx1 > kx0;
                acc[if ran { c16 } else { 0 }..].fill(0);
                #[cfg(target_arch = "aarch64")]
                if c16 > 0 && ky1 > ky0 && kx1 > kx0 {
                    let first = ((oy * g.strides.0 + ky0 - g.pad.0) * g.w + ox * g.strides.1 + kx0 - g.pad.1) * c;
                    let taps = neon::Taps { ky: ky1 - ky0, kx: kx1 - kx0, row: g.w * c, wrow: kw * c, c };
                    let xs = &x[first..][..(taps.ky - 1) * taps.row + (taps.kx - 1) * c + c];
                    let ws = &self.weights[(ky0 * kw + kx0) * c..][..(taps.ky - 1) * taps.wrow + (taps.kx - 1) * c + c];
                    // SAFETY: `xs` and `ws` are sliced to the last tap's last channel
                    // (i < ky, j < kx, ch < c16 ≤ c); `acc` holds c ≥ c16 values.
                    unsafe { neon::position(xs.as_ptr(), ws.as_ptr(), &taps, zx as i8, c16, acc.as_mut_ptr()) };
                }
                #[cfg(target_arch = "x86_64")]
                if c16 > 0 && ky1 > ky0 && kx1 > kx0 {
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
                        let xs = &x[(iy * g.w + ix) * c + c16..(iy * g.w + ix + 1) * c];
                        let ws = &self.weights[(ky * kw + kx) * c + c16..(ky * kw + kx + 1) * c];
                        for ((a, &x), &w) in acc[c16..].iter_mut().zip(xs).zip(ws) {
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
        // Rows: output rows channel-last, channels channel-first; `first`
        // is the chunk's first.
        par_chunks_mut(&mut out, row, work, |first, chunk| {
            self.compute(x, res, chunk, (first, first + chunk.len() / row));
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
