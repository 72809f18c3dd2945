//! A channel-last depthwise convolution with its bias, a residual and a
//! clamp in registers: [`FusedDepthwise`].
//!
//! tract runs a channel-last depthwise layer through its zone walk and a
//! channel-inner kernel (Tern registers an x86-64 one, `crate::kernels`), then
//! clamps the output (ReLU6) in a pass of its own, and splits the layer
//! across threads by blocks of 16 channels. This op clamps before the one
//! store, and splits by output rows.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_linalg::multithread::par_chunks_mut;

/// Channels of one vector.
const LANES: usize = 8;

/// The geometry of a depthwise convolution over channel-last data: input
/// `h × w × c`, kernel `kh × kw` per channel, strides, zero padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Channels.
    pub c: usize,
    /// Input rows.
    pub h: usize,
    /// Input columns.
    pub w: usize,
    /// Kernel rows and columns.
    pub kernel: (usize, usize),
    /// Row and column strides.
    pub strides: (usize, usize),
    /// Zero rows above, columns to the left.
    pub pad: (usize, usize),
    /// Output rows and columns.
    pub out: (usize, usize),
}

impl Geometry {
    /// The kernel rows that stay inside the input for output row `oy`.
    fn rows(&self, oy: usize) -> (usize, usize) {
        Geometry::inside(oy * self.strides.0, self.pad.0, self.kernel.0, self.h)
    }

    /// The kernel columns that stay inside the input for output column `ox`.
    fn cols(&self, ox: usize) -> (usize, usize) {
        Geometry::inside(ox * self.strides.1, self.pad.1, self.kernel.1, self.w)
    }

    /// Taps `k0..k1` of a kernel of `k` taps whose first tap sits at
    /// `start - pad` that fall in `0..len`.
    fn inside(start: usize, pad: usize, k: usize, len: usize) -> (usize, usize) {
        let k0 = pad.saturating_sub(start).min(k);
        let k1 = (len + pad).saturating_sub(start).min(k).max(k0);
        (k0, k1)
    }
}

/// A depthwise convolution of channel-last f32 data: `out[y, x, c] =
/// clamp(bias[c] + Σ x[y·sh + ky − pt, x·sw + kx − pl, c]·k[c, ky, kx]
/// (+ residual[y, x, c]))`, zero outside the input.
#[derive(Clone, PartialEq)]
pub struct FusedDepthwise {
    geometry: Geometry,
    out_shape: TVec<usize>,
    /// Tap `t = ky·kw + kx`, channel `c` at `t·cp + c`; `cp` is `c` rounded
    /// up to whole vectors, zeros past `c`.
    packed: Arc<Vec<f32>>,
    /// `cp` values, zeros past `c`.
    bias: Arc<Vec<f32>>,
    residual: bool,
    clamp: (f32, f32),
    /// Channel-first data (`c × h × w` in, `c × oh × ow` out) instead of
    /// channel-last.
    planes: bool,
}

/// One output row of a channel-first plane, for the row kernels: `src`
/// is the top-left of the `kh` rows of the zero-padded plane it reads
/// (`wp` = `ow + kw − 1` values each, so every tap of every column is
/// there), `taps` the channel's `kh × kw` kernel.
pub(super) struct PlaneRow {
    pub(super) src: *const f32,
    pub(super) wp: usize,
    pub(super) taps: *const f32,
    pub(super) kernel: (usize, usize),
    pub(super) bias: f32,
    pub(super) clamp: (f32, f32),
    /// The residual's row, as `dst`.
    pub(super) res: Option<*const f32>,
    pub(super) dst: *mut f32,
    pub(super) ow: usize,
}

impl PlaneRow {
    /// Output columns `x0..ow`, one at a time.
    ///
    /// # Safety
    /// The pointers hold what [`PlaneRow`] says.
    pub(super) unsafe fn tail(&self, x0: usize) {
        let (kh, kw) = self.kernel;
        for x in x0..self.ow {
            let mut a = self.bias;
            for ky in 0..kh {
                for kx in 0..kw {
                    // SAFETY: row `ky` < kh of `wp` values, column `x + kx` < `ow + kw − 1`; tap `ky·kw + kx` < kh·kw.
                    a = unsafe { (*self.src.add(ky * self.wp + x + kx)).mul_add(*self.taps.add(ky * kw + kx), a) };
                }
            }
            // SAFETY: column `x` < ow of the output row (and the residual's).
            unsafe { *self.dst.add(x) = super::finish(a, self.res, x, self.clamp) };
        }
    }
}

// The clamp bounds are never NaN (checked in `new`), so equality is an
// equivalence.
impl Eq for FusedDepthwise {}

impl std::fmt::Debug for FusedDepthwise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layout = if self.planes { "channel-first" } else { "channel-last" };
        write!(f, "FusedDepthwise({:?}, {layout}, residual: {}, clamp: {:?})", self.geometry, self.residual, self.clamp)
    }
}

impl FusedDepthwise {
    /// Packs `weights` (`[c, 1, kh, kw]`, row-major) and `bias` (`c` values).
    pub fn new(
        geometry: Geometry,
        out_shape: TVec<usize>,
        weights: &[f32],
        bias: &[f32],
        residual: bool,
        clamp: (f32, f32),
    ) -> TractResult<FusedDepthwise> {
        let g = &geometry;
        let (c, taps) = (g.c, g.kernel.0 * g.kernel.1);
        ensure!(c > 0 && taps > 0 && g.strides.0 > 0 && g.strides.1 > 0, "depthwise convolution {g:?}");
        ensure!(weights.len() == c * taps, "{} weights for {g:?}", weights.len());
        ensure!(bias.len() == c, "{} biases for {c} channels", bias.len());
        super::check_clamp(clamp)?;
        ensure!(out_shape.iter().product::<usize>() == g.out.0 * g.out.1 * c, "output {out_shape:?} for {g:?}");
        // Every output position must have a tap inside the input, or its
        // output would be the bias alone where the graph's padding says so;
        // that is still right, but the row and column ranges assume it.
        ensure!(
            g.out.0 > 0 && g.out.1 > 0 && (g.out.0 - 1) * g.strides.0 < g.h + g.pad.0 + g.kernel.0 && (g.out.1 - 1) * g.strides.1 < g.w + g.pad.1 + g.kernel.1,
            "{g:?}: the output runs past the padded input"
        );
        let cp = c.div_ceil(LANES) * LANES;
        let mut packed = vec![0f32; taps * cp];
        for ch in 0..c {
            for t in 0..taps {
                packed[t * cp + ch] = weights[ch * taps + t];
            }
        }
        let mut padded = vec![0f32; cp];
        padded[..c].copy_from_slice(bias);
        Ok(FusedDepthwise {
            geometry,
            out_shape,
            packed: Arc::new(packed),
            bias: Arc::new(padded),
            residual,
            clamp,
            planes: false,
        })
    }

    /// The same convolution over channel-first data: input `c × h × w`,
    /// output (and residual) `c × oh × ow`, one channel plane at a time.
    /// Only with a column stride of 1 (the row kernels read runs of
    /// columns).
    pub fn channel_first(self) -> TractResult<FusedDepthwise> {
        ensure!(self.geometry.strides.1 == 1, "{self:?}: channel-first needs a column stride of 1");
        Ok(FusedDepthwise { planes: true, ..self })
    }

    /// Computes the output planes of channels `c0..c1` (channel-first):
    /// each input plane copied once into a zero-padded buffer, then each
    /// output row by the CPU's row kernel.
    ///
    /// # Safety
    /// `x` holds `c × h × w` values, `out` (and `residual`) `c × oh × ow`;
    /// `c0 ≤ c1 ≤ c`; no other thread writes these planes.
    unsafe fn compute_planes(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32, c0: usize, c1: usize, portable: bool) {
        let g = &self.geometry;
        let ((oh, ow), (kh, kw)) = (g.out, g.kernel);
        let cp = self.bias.len();
        let (wp, hp) = (ow + kw - 1, (oh - 1) * g.strides.0 + kh);
        let mut padded = vec![0f32; wp * hp];
        let mut taps = vec![0f32; kh * kw];
        for c in c0..c1 {
            // SAFETY: plane `c` < channels of the `c × h × w` input.
            let plane = unsafe { std::slice::from_raw_parts(x.add(c * g.h * g.w), g.h * g.w) };
            for (iy, row) in plane.chunks_exact(g.w).enumerate() {
                let py = iy + g.pad.0;
                if py < hp {
                    // Columns past the output's reach are never read.
                    let n = g.w.min(wp - g.pad.1);
                    padded[py * wp + g.pad.1..][..n].copy_from_slice(&row[..n]);
                }
            }
            for (t, v) in taps.iter_mut().enumerate() {
                *v = self.packed[t * cp + c];
            }
            for oy in 0..oh {
                let at = (c * oh + oy) * ow;
                let r = PlaneRow {
                    src: padded[oy * g.strides.0 * wp..].as_ptr(),
                    wp,
                    taps: taps.as_ptr(),
                    kernel: (kh, kw),
                    bias: self.bias[c],
                    clamp: self.clamp,
                    // SAFETY: row `oy` of plane `c` lies in the output and the residual (`c × oh × ow` values).
                    res: residual.map(|p| unsafe { p.add(at) }),
                    // SAFETY: as `res`.
                    dst: unsafe { out.add(at) },
                    ow,
                };
                // SAFETY: `src` starts `kh` whole rows of `padded` (`hp` rows
                // of `wp`), `taps` holds kh·kw values, `dst` and `res` `ow`.
                unsafe { self.plane_row(&r, portable) };
            }
        }
    }

    /// One output row by the CPU's row kernel (or one column at a time).
    ///
    /// # Safety
    /// `r`'s pointers hold what [`PlaneRow`] says.
    unsafe fn plane_row(&self, r: &PlaneRow, portable: bool) {
        #[cfg(target_arch = "x86_64")]
        if !portable && super::has_kernel() {
            // SAFETY: as this function's; the CPU has AVX2 and FMA.
            unsafe { avx2::plane_row(r) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if !portable {
            // SAFETY: as this function's; NEON is in the aarch64 baseline.
            unsafe { neon::plane_row(r) };
            return;
        }
        let _ = portable;
        // SAFETY: as this function's.
        unsafe { r.tail(0) }
    }

    /// [`FusedDepthwise::compute_planes`] one column at a time (for the
    /// tests).
    ///
    /// # Safety
    /// As [`FusedDepthwise::compute_planes`].
    pub(super) unsafe fn planes_portable(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32) {
        // SAFETY: as this function's, over every channel.
        unsafe { self.compute_planes(x, residual, out, 0, self.geometry.c, true) }
    }

    /// Computes output rows `oy0..oy1`.
    ///
    /// # Safety
    /// `x` holds `h × w × c` values, `out` (and `residual`) `oh × ow × c`; `oy0
    /// ≤ oy1 ≤ oh`; no other thread writes these rows.
    unsafe fn compute(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32, oy0: usize, oy1: usize) {
        #[cfg(target_arch = "x86_64")]
        if super::has_kernel() {
            // SAFETY: as this function's; the CPU has AVX2 and FMA.
            unsafe { avx2::rows(self, x, residual, out, oy0, oy1) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        {
            // SAFETY: as this function's; NEON is in the aarch64 baseline.
            unsafe { neon::rows(self, x, residual, out, oy0, oy1) };
            #[allow(clippy::needless_return)]
            return;
        }
        #[allow(unreachable_code)]
        // SAFETY: as this function's.
        unsafe {
            self.compute_portable(x, residual, out, oy0, oy1)
        }
    }

    /// The same arithmetic without SIMD.
    ///
    /// # Safety
    /// As [`FusedDepthwise::compute`].
    pub(super) unsafe fn compute_portable(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32, oy0: usize, oy1: usize) {
        let g = &self.geometry;
        let cp = self.bias.len();
        for oy in oy0..oy1 {
            let (ky0, ky1) = g.rows(oy);
            for ox in 0..g.out.1 {
                let (kx0, kx1) = g.cols(ox);
                for c in 0..g.c {
                    let mut acc = self.bias[c];
                    for ky in ky0..ky1 {
                        let iy = oy * g.strides.0 + ky - g.pad.0;
                        for kx in kx0..kx1 {
                            let ix = ox * g.strides.1 + kx - g.pad.1;
                            // SAFETY: the tap (`iy`, `ix`) is inside the input (`rows`, `cols`), `c` < channels.
                            let v = unsafe { *x.add((iy * g.w + ix) * g.c + c) };
                            acc = v.mul_add(self.packed[(ky * g.kernel.1 + kx) * cp + c], acc);
                        }
                    }
                    let at = (oy * g.out.1 + ox) * g.c + c;
                    // SAFETY: `at` is inside the output (and residual): `oy` < oh, `ox` < ow, `c` < channels.
                    unsafe { *out.add(at) = super::finish(acc, residual, at, self.clamp) };
                }
            }
        }
    }
}

impl Op for FusedDepthwise {
    fn name(&self) -> StaticName {
        "TernFusedDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for FusedDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        let (xs, res) = super::operands(self, &inputs, self.residual, &self.out_shape)?;
        ensure!(xs.len() == g.h * g.w * g.c, "{self:?} given a {:?} input", inputs[0].shape());
        // SAFETY: every row is written by exactly one work unit below before the tensor is read.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.out_shape)? };
        let (x, out) = (xs.as_ptr() as usize, output.as_ptr_mut::<f32>()? as usize);
        let work = g.out.0 * g.out.1 * g.c * g.kernel.0 * g.kernel.1;
        if self.planes {
            par_chunks_mut(&mut vec![(); g.c], 1, work, |first, planes| {
                // SAFETY: the lengths were checked above, and the channel blocks are disjoint.
                unsafe {
                    self.compute_planes(x as *const f32, res.map(|r| r as *const f32), out as *mut f32, first, first + planes.len(), false)
                };
                Ok(())
            })?;
            return Ok(tvec!(output.into_tvalue()));
        }
        par_chunks_mut(&mut vec![(); g.out.0], 1, work, |first, rows| {
            // SAFETY: the lengths were checked above, and the row blocks are disjoint.
            unsafe {
                self.compute(x as *const f32, res.map(|r| r as *const f32), out as *mut f32, first, first + rows.len())
            };
            Ok(())
        })?;
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for FusedDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geometry;
        ensure!(inputs.len() == 1 + self.residual as usize);
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        ensure!(inputs[0].shape.volume() == (g.h * g.w * g.c).to_dim());
        Ok(tvec!(f32::fact(&*self.out_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        Ok(tvec!((Cost::FMA(f32::datum_type()), (g.out.0 * g.out.1 * g.c * g.kernel.0 * g.kernel.1).to_dim())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::super::check;

    #[test]
    fn every_stride_padding_border_and_channel_tail_matches_plain_loops() {
        check::depthwise().unwrap();
    }
}
