//! [`FusedConv`]: a 1×1 or full f32 convolution with its bias, residual
//! and clamp, over weights packed once at load; the AVX2 + FMA kernel in
//! `avx2`, the portable loops here.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_linalg::multithread::par_chunks_mut;

use super::{check_clamp, finish, operands};
#[cfg(target_arch = "x86_64")]
use super::{has_avx512, has_kernel};

/// Output channels of one weight panel (two AVX2 vectors).
pub(super) const NR: usize = 16;
/// Pixels of one tile.
pub(super) const MR: usize = 6;
/// Bytes of activations one block of pixels is sized to (kept in L1/L2
/// while every weight panel runs over it).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const BLOCK_BYTES: usize = 48 << 10;
/// Work units a convolution is at least split into, for the threads.
const UNITS: usize = 16;

/// Where the channels sit in a tensor of `pixels × channels` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Channel-last: one pixel's channels are contiguous (`HWC`).
    PixelMajor,
    /// Channel-first: one channel's pixels are contiguous (`CHW`).
    ChannelMajor,
}

impl Layout {
    /// Element strides `(pixel, channel)` of a `pixels × channels` tensor.
    pub(super) fn strides(self, pixels: usize, channels: usize) -> (usize, usize) {
        match self {
            Layout::PixelMajor => (channels, 1),
            Layout::ChannelMajor => (1, pixels),
        }
    }
}

/// Where a [`FusedConv`] reads the `k`-th input value of output position `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A 1×1 convolution: the input itself, `pixels × ci` in this layout.
    Pointwise(Layout),
    /// A full convolution: patches of a zero-padded copy of the input.
    Patches(Patches),
}

/// The geometry of a 2-D convolution with one group: input `c × h × w`
/// (channel-first or -last), kernel `kh × kw`, strides, padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patches {
    /// Input channels, rows, columns.
    pub c: usize,
    /// Input rows.
    pub h: usize,
    /// Input columns.
    pub w: usize,
    /// Layout of the input.
    pub layout: Layout,
    /// Kernel rows and columns.
    pub kernel: (usize, usize),
    /// Row and column strides.
    pub strides: (usize, usize),
    /// Zero rows above and below, columns left and right.
    pub pad: (usize, usize, usize, usize),
    /// Output rows and columns.
    pub out: (usize, usize),
}

impl Patches {
    /// Rows and columns of the padded input.
    fn padded(&self) -> (usize, usize) {
        (self.h + self.pad.0 + self.pad.1, self.w + self.pad.2 + self.pad.3)
    }

    /// Offsets in the padded input of the `c·kh·kw` values one output
    /// position sums over, in the kernel's `OIHW` order, from the position's
    /// top-left tap.
    fn tap_offsets(&self) -> Vec<usize> {
        let (hp, wp) = self.padded();
        let mut offsets = Vec::with_capacity(self.c * self.kernel.0 * self.kernel.1);
        for c in 0..self.c {
            for ky in 0..self.kernel.0 {
                for kx in 0..self.kernel.1 {
                    offsets.push(match self.layout {
                        Layout::ChannelMajor => c * hp * wp + ky * wp + kx,
                        Layout::PixelMajor => (ky * wp + kx) * self.c + c,
                    });
                }
            }
        }
        offsets
    }

    /// Offset in the padded input of output position `p`'s top-left tap.
    fn origin(&self, p: usize) -> usize {
        let (_, wp) = self.padded();
        let (oy, ox) = (p / self.out.1, p % self.out.1);
        let at = oy * self.strides.0 * wp + ox * self.strides.1;
        match self.layout {
            Layout::ChannelMajor => at,
            Layout::PixelMajor => at * self.c,
        }
    }

    /// The zero-padded copy of `x`.
    pub(super) fn pad_input(&self, x: &[f32]) -> Vec<f32> {
        let (hp, wp) = self.padded();
        let mut out = vec![0f32; self.c * hp * wp];
        match self.layout {
            Layout::ChannelMajor => {
                for c in 0..self.c {
                    for y in 0..self.h {
                        let src = &x[(c * self.h + y) * self.w..][..self.w];
                        out[(c * hp + y + self.pad.0) * wp + self.pad.2..][..self.w].copy_from_slice(src);
                    }
                }
            }
            Layout::PixelMajor => {
                let row = self.w * self.c;
                for y in 0..self.h {
                    let src = &x[y * row..][..row];
                    out[((y + self.pad.0) * wp + self.pad.2) * self.c..][..row].copy_from_slice(src);
                }
            }
        }
        out
    }
}

/// A convolution of f32 with everything after it that [`rewrite`] folded in:
/// `out[p, o] = clamp(bias[o] + Σₖ x(p, k)·w[o, k] (+ residual[p, o]))`,
/// over `pixels` output positions.
#[derive(Clone, PartialEq)]
pub struct FusedConv {
    /// Values summed per output (input channels × kernel taps).
    ci: usize,
    co: usize,
    pixels: usize,
    input: Input,
    /// `input`'s tap offsets (full convolutions only).
    taps: Arc<Vec<usize>>,
    output: Layout,
    out_shape: TVec<usize>,
    /// Panel `q`, input channel `i`, lane `j` = `w[i, 16q + j]` (0 past `co`).
    packed: Arc<Vec<f32>>,
    /// Padded to a whole number of panels.
    bias: Arc<Vec<f32>>,
    /// A second input (laid out as the output) added before the clamp.
    residual: bool,
    /// Lower and upper bound applied last (±∞ when there is none).
    clamp: (f32, f32),
}

// The clamp bounds are never NaN (they come from the graph's constants and
// are checked when the op is made), so equality is an equivalence.
impl Eq for FusedConv {}

impl std::fmt::Debug for FusedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FusedConv({}→{} over {} pixels, {:?}→{:?}, residual: {}, clamp: {:?})",
            self.ci, self.co, self.pixels, self.input, self.output, self.residual, self.clamp
        )
    }
}

/// What a [`FusedConv`] computes, before its weights are packed.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Values summed per output: input channels (× kernel taps).
    pub ci: usize,
    /// Output channels.
    pub co: usize,
    /// Positions (the product of every other axis).
    pub pixels: usize,
    /// Where the input values come from.
    pub input: Input,
    /// Layout of the output (and of the residual).
    pub output: Layout,
    /// Shape of the output tensor.
    pub out_shape: TVec<usize>,
    /// Whether a residual input is added.
    pub residual: bool,
    /// Bounds applied last.
    pub clamp: (f32, f32),
}

impl FusedConv {
    /// Packs `weights` (`[co, ci]`, row-major: `OIHW` for a full
    /// convolution) and `bias` (`co` values).
    pub fn new(spec: Spec, weights: &[f32], bias: &[f32]) -> TractResult<FusedConv> {
        let Spec { ci, co, pixels, input, output, out_shape, residual, clamp } = spec;
        ensure!(ci > 0 && co > 0, "pointwise convolution of {ci}→{co} channels");
        ensure!(weights.len() == ci * co, "{} weights for {ci}→{co} channels", weights.len());
        ensure!(bias.len() == co, "{} biases for {co} channels", bias.len());
        check_clamp(clamp)?;
        ensure!(out_shape.iter().product::<usize>() == pixels * co, "output {out_shape:?} for {pixels}×{co}");
        let panels = co.div_ceil(NR);
        let mut packed = vec![0f32; panels * ci * NR];
        for o in 0..co {
            let (q, j) = (o / NR, o % NR);
            for i in 0..ci {
                packed[(q * ci + i) * NR + j] = weights[o * ci + i];
            }
        }
        let mut padded = vec![0f32; panels * NR];
        padded[..co].copy_from_slice(bias);
        let taps = match &input {
            Input::Pointwise(_) => vec![],
            Input::Patches(g) => {
                let taps = g.tap_offsets();
                ensure!(taps.len() == ci, "{} taps for {ci} values per output", taps.len());
                ensure!(g.out.0 * g.out.1 == pixels, "{:?} output for {pixels} positions", g.out);
                let (hp, wp) = g.padded();
                ensure!(
                    g.out.0 > 0 && (g.out.0 - 1) * g.strides.0 + g.kernel.0 <= hp && (g.out.1 - 1) * g.strides.1 + g.kernel.1 <= wp,
                    "{g:?}: the patches leave the padded input"
                );
                taps
            }
        };
        Ok(FusedConv {
            ci,
            co,
            pixels,
            input,
            taps: Arc::new(taps),
            output,
            out_shape,
            packed: Arc::new(packed),
            bias: Arc::new(padded),
            residual,
            clamp,
        })
    }

    /// The input value `k` of output position `p`: its offset from `x`
    /// (the input of a 1×1 convolution, the padded input of a full one).
    fn input_offset(&self, p: usize, k: usize) -> usize {
        match &self.input {
            Input::Pointwise(layout) => {
                let (xp, xc) = layout.strides(self.pixels, self.ci);
                p * xp + k * xc
            }
            Input::Patches(g) => g.origin(p) + self.taps[k],
        }
    }

    /// Computes pixels `p0..p1`, panels of 16 output channels `q0..q1`, of
    /// the whole tensors `x`, `residual`, `out`.
    ///
    /// # Safety
    /// `x` is the input (padded, for a full convolution), `out` (and
    /// `residual`) hold `pixels × co` values in the op's layout; `p0 ≤ p1 ≤
    /// pixels`, `q0 ≤ q1 ≤` panels; no other thread writes these outputs.
    unsafe fn compute(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32, p: (usize, usize), q: (usize, usize)) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: as this function's; the CPU has AVX-512F.
            unsafe { avx512::run(self, x, residual, out, p, q) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if has_kernel() {
            // SAFETY: as this function's; the CPU has AVX2 and FMA.
            unsafe { avx2::run(self, x, residual, out, p, q) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        {
            // SAFETY: as this function's; NEON is in the aarch64 baseline.
            unsafe { neon::run(self, x, residual, out, p, q) };
            #[allow(clippy::needless_return)]
            return;
        }
        #[allow(unreachable_code)]
        // SAFETY: as this function's.
        unsafe {
            self.compute_portable(x, residual, out, p, q)
        }
    }

    /// [`FusedConv::compute`] by the AVX2 + FMA kernel whatever else the CPU
    /// has (to check it on CPUs that run the AVX-512 one); `false`, and
    /// nothing written, where the CPU lacks AVX2 or FMA.
    ///
    /// # Safety
    /// As [`FusedConv::compute`].
    pub(super) unsafe fn compute_avx2(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32, p: (usize, usize), q: (usize, usize)) -> bool {
        #[cfg(target_arch = "x86_64")]
        if has_kernel() {
            // SAFETY: as this function's; the CPU has AVX2 and FMA.
            unsafe { avx2::run(self, x, residual, out, p, q) };
            return true;
        }
        let _ = (x, residual, out, p, q);
        false
    }

    /// The same arithmetic without SIMD: the reference for the tests, and
    /// what runs on a CPU without AVX2 (where [`rewrite`] leaves tract's op).
    ///
    /// # Safety
    /// As [`FusedConv::compute`].
    pub(super) unsafe fn compute_portable(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32, p: (usize, usize), q: (usize, usize)) {
        let (ci, co) = (self.ci, self.co);
        let (op, oc) = self.output.strides(self.pixels, co);
        for p in p.0..p.1 {
            for o in q.0 * NR..co.min(q.1 * NR) {
                let w = &self.packed[(o / NR) * ci * NR + o % NR..];
                let mut acc = self.bias[o];
                for i in 0..ci {
                    // SAFETY: `input_offset(p, i)` lies in `x` for `p` < pixels and `i` < ci, the caller's contract.
                    acc = unsafe { *x.add(self.input_offset(p, i)) }.mul_add(w[i * NR], acc);
                }
                let at = p * op + o * oc;
                // SAFETY: `at` < pixels × co: inside `out`, and inside `residual` when given.
                unsafe { *out.add(at) = finish(acc, residual, at, self.clamp) };
            }
        }
    }
}

/// Where input value `k` of a tile's position sits, from the position's
/// first value.
trait Taps: Copy {
    fn offset(self, k: usize) -> usize;
}

/// A 1×1 convolution: values `stride` apart.
#[derive(Clone, Copy)]
struct Strided(usize);

impl Taps for Strided {
    #[inline(always)]
    fn offset(self, k: usize) -> usize {
        k * self.0
    }
}

/// A full convolution: a table of tap offsets.
#[derive(Clone, Copy)]
struct Table(*const usize);

impl Taps for Table {
    #[inline(always)]
    fn offset(self, k: usize) -> usize {
        // SAFETY: `k` < the op's `ci`, the table's length (checked in `FusedConv::new`).
        unsafe { *self.0.add(k) }
    }
}

/// One tile's operands, for the kernels: up to `N` positions, the weight
/// panel(s) from `w`.
struct Tile<const N: usize> {
    /// Where each position's input values start.
    rows: [*const f32; N],
    ci: usize,
    /// The first weight panel; a second one follows `ci × 16` values later.
    w: *const f32,
    b: *const f32,
    res: Option<*const f32>,
    out: *mut f32,
    yc: usize,
    yp: usize,
    channel_last: bool,
    /// Output channels of the tile that exist.
    width: usize,
    clamp: (f32, f32),
}

impl<const N: usize> Tile<N> {
    /// The tile of output positions `p..p + n` and channels from panel `q`
    /// on (`panels` of them at most), `row(p)` being where position `p`'s
    /// input values start.
    ///
    /// # Safety
    /// `p + n` ≤ the op's pixels, `q` < its panels, `n` ≤ `N`; `out` (and
    /// `residual`) hold the op's whole output.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn at(
        op: &FusedConv,
        row: &impl Fn(usize) -> *const f32,
        residual: Option<*const f32>,
        out: *mut f32,
        (p, n): (usize, usize),
        q: usize,
        panels: usize,
    ) -> Tile<N> {
        let (yp, yc) = op.output.strides(op.pixels, op.co);
        let mut rows = [row(p); N];
        for (r, at) in rows.iter_mut().enumerate().take(n).skip(1) {
            *at = row(p + r);
        }
        let at = p * yp + q * NR * yc;
        // SAFETY: as this function's: the offsets stay in the op's buffers.
        unsafe {
            Tile {
                rows,
                ci: op.ci,
                w: op.packed.as_ptr().add(q * op.ci * NR),
                b: op.bias.as_ptr().add(q * NR),
                res: residual.map(|r| r.add(at)),
                out: out.add(at),
                yc,
                yp,
                channel_last: op.output == Layout::PixelMajor,
                width: (op.co - q * NR).min(panels * NR),
                clamp: op.clamp,
            }
        }
    }
}

impl Op for FusedConv {
    fn name(&self) -> StaticName {
        "TernFusedConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for FusedConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (xs, res) = operands(self, &inputs, self.residual, &self.out_shape)?;
        let padded;
        let xs = match &self.input {
            Input::Pointwise(_) => {
                ensure!(xs.len() == self.pixels * self.ci, "{self:?} given a {:?} input", inputs[0].shape());
                xs
            }
            Input::Patches(g) => {
                ensure!(xs.len() == g.c * g.h * g.w, "{self:?} given a {:?} input", inputs[0].shape());
                padded = g.pad_input(xs);
                &padded[..]
            }
        };
        // SAFETY: every value is written by exactly one work unit below before the tensor is read.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.out_shape)? };
        let (x, out) = (xs.as_ptr() as usize, output.as_ptr_mut::<f32>()? as usize);
        // Work is split in units of one tile of pixels × one group of weight
        // panels, group-major; each unit writes only its own outputs, whatever
        // the layout. Few pixels (the last stages, 7×7) split the panels too,
        // so that every thread has work.
        let tiles = self.pixels.div_ceil(MR);
        let panels = self.co.div_ceil(NR);
        let groups = UNITS.div_ceil(tiles).clamp(1, panels);
        let per_group = panels.div_ceil(groups);
        let work = self.pixels * self.ci * self.co;
        par_chunks_mut(&mut vec![(); tiles * groups], 1, work, |first, chunk| {
            let (u0, u1) = (first, first + chunk.len());
            for g in u0 / tiles..u1.div_ceil(tiles) {
                let t0 = u0.max(g * tiles) - g * tiles;
                let t1 = u1.min((g + 1) * tiles) - g * tiles;
                let p = (t0 * MR, self.pixels.min(t1 * MR));
                let q = (g * per_group, panels.min((g + 1) * per_group));
                // SAFETY: the lengths were checked above, and the units are disjoint.
                unsafe { self.compute(x as *const f32, res.map(|r| r as *const f32), out as *mut f32, p, q) };
            }
            Ok(())
        })?;
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for FusedConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + self.residual as usize);
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        let values = match &self.input {
            Input::Pointwise(_) => self.pixels * self.ci,
            Input::Patches(g) => g.c * g.h * g.w,
        };
        ensure!(inputs[0].shape.volume() == values.to_dim());
        Ok(tvec!(f32::fact(&*self.out_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((Cost::FMA(f32::datum_type()), (self.pixels * self.ci * self.co).to_dim())))
    }

    as_op!();
}

/// Checks `transpose` (an `n × n` block in, its transpose out, both
/// row-major) on the block 0, 1, 2, …
#[cfg(all(test, target_arch = "x86_64"))]
fn check_transpose(n: usize, transpose: impl Fn(&[f32]) -> Vec<f32>) {
    let m: Vec<f32> = (0..n * n).map(|i| i as f32).collect();
    let got = transpose(&m);
    for i in 0..n {
        for j in 0..n {
            assert_eq!(got[n * i + j], (n * j + i) as f32, "column {i}, row {j}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::check;
    use super::*;

    #[test]
    fn pointwise_every_layout_tail_and_epilogue_matches_plain_loops() {
        check::pointwise().unwrap();
    }

    #[test]
    fn threads_split_pixels_and_panels_without_overlap() {
        use tract_onnx::tract_core::tract_linalg::multithread::{multithread_tract_scope, Executor};
        multithread_tract_scope(Executor::multithread(3), || {
            // 49 pixels (9 tiles) × 20 panels: panel groups; 4000 pixels: tiles alone.
            for (ci, co, pixels) in [(64, 320, 49), (24, 40, 4000), (40, 24, 13)] {
                for o in [Layout::PixelMajor, Layout::ChannelMajor] {
                    let spec = Spec {
                        ci,
                        co,
                        pixels,
                        input: Input::Pointwise(Layout::ChannelMajor),
                        output: o,
                        out_shape: tvec![pixels, co],
                        residual: true,
                        clamp: (0.0, 6.0),
                    };
                    check::conv(spec, pixels * ci).unwrap();
                }
            }
        });
    }

    #[test]
    fn full_convolution_every_layout_stride_and_padding_matches_plain_loops() {
        check::full().unwrap();
    }

    #[test]
    fn patches_that_leave_the_input_are_refused() {
        let g = Patches {
            c: 3,
            h: 8,
            w: 8,
            layout: Layout::ChannelMajor,
            kernel: (3, 3),
            strides: (2, 2),
            pad: (0, 0, 0, 0),
            out: (4, 4),
        };
        let spec = Spec { ci: 27, co: 8, pixels: 16, input: Input::Patches(g), output: Layout::ChannelMajor, out_shape: tvec![16, 8], residual: false, clamp: (f32::NEG_INFINITY, f32::INFINITY) };
        let e = FusedConv::new(spec, &[0.0; 27 * 8], &[0.0; 8]).unwrap_err();
        assert!(format!("{e}").contains("leave the padded input"), "{e}");
    }
}
