//! Tern's own fused convolution ops for x86-64, put in tract's plan in
//! place of tract's.
//!
//! tract 0.23 turns a 1×1 convolution into a matrix product whose
//! activation operand it packs into panels at every inference
//! (`OptMatMulPack`), and a full convolution such as a MobileNet stem into a
//! padding pass, a lazy im2col and a product; a ReLU6 after a convolution
//! is a separate pass over its output. In a MobileNet-style graph these are
//! most of the work. This module replaces, in the decluttered graph:
//! - each f32 1×1 convolution (the `EinSum` tract's declutter makes of it,
//!   channels first or last on either side) with the bias `Add` after it;
//! - each f32 full convolution (`Conv`, one group, 2-D) with its bias;
//!
//! and in both cases a residual `Add` and a `Max`/`Min` clamp (ReLU, ReLU6)
//! that follow alone, by one op, [`FusedConv`], that:
//! - packs the weights once, at load, in panels of 16 output channels;
//! - reads the activations where they are (a 1×1 convolution) or from one
//!   zero-padded copy of the input (a full convolution), broadcasting one
//!   input value at a time against a panel of weights: nothing is packed
//!   or gathered per inference;
//! - adds the bias and the residual and clamps in registers before the
//!   single store of each output.
//!
//! A channel-last depthwise convolution, with the same clamp and residual
//! after it, becomes a [`FusedDepthwise`] (see its module).
//!
//! The kernels are AVX2 + FMA; the convolution's is 6 positions × 16
//! channels a tile (12 accumulators). [`rewrite`] uses them where
//! [`supported`] says so and leaves the graph to tract elsewhere: aarch64
//! devices keep tract's NEON kernels, and AVX-512 machines tract's 16-lane
//! ones, which these have not been measured against.

mod depthwise;

use std::sync::Arc;

pub use depthwise::{FusedDepthwise, Geometry};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::tract_linalg::multithread::par_chunks_mut;

/// Output channels of one weight panel (two AVX2 vectors).
const NR: usize = 16;
/// Pixels of one tile.
const MR: usize = 6;
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
    fn strides(self, pixels: usize, channels: usize) -> (usize, usize) {
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
    fn pad_input(&self, x: &[f32]) -> Vec<f32> {
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

/// Whether [`rewrite`] puts Tern's fused ops in plans on this CPU: x86-64
/// with AVX2 and FMA, and without AVX-512, where tract's 16-lane kernels
/// have not been measured against these 8-lane ones.
pub fn supported() -> bool {
    has_kernel() && !has_avx512()
}

/// Whether the AVX2 + FMA kernels can run here (the ops run their portable
/// loops elsewhere).
fn has_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
        if has_kernel() {
            // SAFETY: as this function's; the CPU has AVX2 and FMA.
            unsafe { x86::run(self, x, residual, out, p, q) };
            return;
        }
        unsafe { self.compute_portable(x, residual, out, p, q) }
    }

    /// The same arithmetic without SIMD: the reference for the tests, and
    /// what runs on a CPU without AVX2 (where [`rewrite`] leaves tract's op).
    ///
    /// # Safety
    /// As [`FusedConv::compute`].
    unsafe fn compute_portable(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32, p: (usize, usize), q: (usize, usize)) {
        let (ci, co) = (self.ci, self.co);
        let (op, oc) = self.output.strides(self.pixels, co);
        for p in p.0..p.1 {
            for o in q.0 * NR..co.min(q.1 * NR) {
                let w = &self.packed[(o / NR) * ci * NR + o % NR..];
                let mut acc = self.bias[o];
                for i in 0..ci {
                    acc = unsafe { *x.add(self.input_offset(p, i)) }.mul_add(w[i * NR], acc);
                }
                let at = p * op + o * oc;
                unsafe { *out.add(at) = finish(acc, residual, at, self.clamp) };
            }
        }
    }
}

/// Refuses NaN clamp bounds: the ops' equality (`Eq`) and `max`/`min`
/// chain assume there are none.
fn check_clamp(clamp: (f32, f32)) -> TractResult<()> {
    ensure!(!clamp.0.is_nan() && !clamp.1.is_nan(), "clamp to {clamp:?}");
    Ok(())
}

/// The data of a fused op's inputs: the first's, and the residual's (the
/// second input, shaped as the output) when the op adds one.
fn operands<'a>(op: &dyn std::fmt::Debug, inputs: &'a [TValue], residual: bool, out_shape: &[usize]) -> TractResult<(&'a [f32], Option<usize>)> {
    ensure!(inputs.len() == 1 + residual as usize, "{} inputs to {op:?}", inputs.len());
    let x = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
    let res = if residual {
        ensure!(inputs[1].shape() == out_shape, "{op:?} given a {:?} residual", inputs[1].shape());
        Some(inputs[1].as_ptr::<f32>()? as usize)
    } else {
        None
    };
    Ok((x, res))
}

/// The end of every output of the portable loops: the residual at `at`,
/// then the clamp.
///
/// # Safety
/// `residual`, when given, holds a value at `at`.
unsafe fn finish(mut acc: f32, residual: Option<*const f32>, at: usize, clamp: (f32, f32)) -> f32 {
    if let Some(r) = residual {
        acc += unsafe { *r.add(at) };
    }
    acc.max(clamp.0).min(clamp.1)
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

/// Replaces, in a decluttered model, every f32 convolution the kernel takes
/// by a [`FusedConv`]: 1×1 convolutions (an `EinSum` of a constant `[co,
/// ci]` weight, channels first or last on each side) with the bias `Add`
/// after them, and 2-D convolutions of one group with constant `OIHW`
/// weights; in both cases with a residual `Add` and then `Max`/`Min` with
/// constants where they follow alone. Returns how many it replaced; none
/// where [`supported`] is false. Products over fewer than 6 positions
/// (matrix × vector, as in a classifier head) stay tract's.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !supported() {
        return Ok(0);
    }
    let mut done = 0;
    'again: loop {
        for id in model.eval_order()? {
            let node = model.node(id);
            let found = if let Some(einsum) = node.op_as::<EinSum>() {
                pointwise(model, node, einsum)?
            } else if let Some(conv) = node.op_as::<Conv>() {
                if conv.group == 1 {
                    full_conv(model, node, conv)?
                } else {
                    depthwise(model, node, conv)?
                }
            } else {
                None
            };
            if let Some(found) = found {
                fuse(model, node, found)?.apply(model)?;
                done += 1;
                continue 'again;
            }
        }
        return Ok(done);
    }
}

/// Builds the fused op from the bias, whether a residual is added and the
/// clamp that [`fuse`] found after the convolution.
type Build = Box<dyn FnOnce(Vec<f32>, bool, (f32, f32)) -> TractResult<Box<dyn TypedOp>>>;

/// A convolution node [`rewrite`] takes, before what follows it is looked at.
struct Found {
    co: usize,
    out_shape: TVec<usize>,
    /// The axis of `out_shape` that holds the output channels.
    channel_axis: usize,
    bias: Vec<f32>,
    build: Build,
}

impl Found {
    /// A [`FusedConv`] of `spec`.
    fn conv(spec: Spec, weights: Arc<Tensor>, bias: Vec<f32>, channel_axis: usize) -> Found {
        let (co, out_shape) = (spec.co, spec.out_shape.clone());
        let build: Build = Box::new(move |bias, residual, clamp| {
            let spec = Spec { residual, clamp, ..spec };
            Ok(Box::new(FusedConv::new(spec, weights.try_as_plain_ram()?.as_slice::<f32>()?, &bias)?))
        });
        Found { co, out_shape, channel_axis, bias, build }
    }
}

/// The 1×1 convolution `node` is, if [`FusedConv`] takes it.
fn pointwise(model: &TypedModel, node: &TypedNode, einsum: &EinSum) -> TractResult<Option<Found>> {
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let (Some(x), Some(w), Some(y)) =
        (facts[0].shape.as_concrete(), facts[1].shape.as_concrete(), node.outputs[0].fact.shape.as_concrete())
    else {
        return Ok(None);
    };
    if facts[0].datum_type != f32::datum_type() {
        return Ok(None);
    }
    let Some(weights) = konst(model, node.inputs[1])? else { return Ok(None) };
    let Some((ci, co, pixels, input, output)) = conv_axes(einsum, x, w, y) else { return Ok(None) };
    // The output axis of the weight's first (output channel) axis.
    let (inputs, outputs) = einsum.axes.to_strs();
    let o_label = inputs.get(1).and_then(|w| w.chars().next());
    let Some(channel_axis) = outputs.first().and_then(|ys| ys.chars().position(|c| Some(c) == o_label)) else {
        return Ok(None);
    };
    let spec = Spec {
        ci,
        co,
        pixels,
        input: Input::Pointwise(input),
        output,
        out_shape: y.into(),
        residual: false,
        clamp: (f32::NEG_INFINITY, f32::INFINITY),
    };
    Ok(Some(Found::conv(spec, weights, vec![0f32; co], channel_axis)))
}

/// The full convolution `node` is, if [`FusedConv`] takes it: f32, 2-D, one
/// group, no dilation, a batch of one (or none), constant `OIHW` weights
/// and bias.
fn full_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Found>> {
    let ps = &conv.pool_spec;
    if conv.group != 1 || ps.kernel_shape.iter().product::<usize>() == 1 {
        return Ok(None);
    }
    let Some(ConvOperands { x, y, weights, bias }) = conv_operands(model, node, conv)? else { return Ok(None) };
    let fmt = ps.data_format;
    let (xs, ys) = (fmt.shape(&x)?, fmt.shape(&y)?);
    let (c, co, channel_axis) = (*xs.c(), *ys.c(), ys.c_axis());
    let (hw, ohw) = (xs.hw_dims(), ys.hw_dims());
    let layout = if fmt.c_is_last() { Layout::PixelMajor } else { Layout::ChannelMajor };
    let (kh, kw) = (ps.kernel_shape[0], ps.kernel_shape[1]);
    if weights.shape() != [co, c, kh, kw] || c != ps.input_channels || co != ps.output_channels {
        return Ok(None);
    }
    let padding = ps.computed_padding(hw);
    let strides = ps.strides();
    let geometry = Patches {
        c,
        h: hw[0],
        w: hw[1],
        layout,
        kernel: (kh, kw),
        strides: (strides[0], strides[1]),
        pad: (padding[0].pad_before, padding[0].pad_after, padding[1].pad_before, padding[1].pad_after),
        out: (ohw[0], ohw[1]),
    };
    if padding[0].convoluted != ohw[0] || padding[1].convoluted != ohw[1] {
        return Ok(None);
    }
    let Some(bias) = per_channel(&bias, co)? else { return Ok(None) };
    let spec = Spec {
        ci: c * kh * kw,
        co,
        pixels: ohw[0] * ohw[1],
        input: Input::Patches(geometry),
        output: layout,
        out_shape: y.clone(),
        residual: false,
        clamp: (f32::NEG_INFINITY, f32::INFINITY),
    };
    Ok(Some(Found::conv(spec, weights, bias, channel_axis)))
}

/// What an f32 2-D convolution node computes with, where [`rewrite`] can
/// take it: concrete shapes, constant weights and bias.
struct ConvOperands {
    x: TVec<usize>,
    y: TVec<usize>,
    weights: Arc<Tensor>,
    bias: Arc<Tensor>,
}

/// The operands of `node` if it is an f32 2-D convolution with `OIHW`
/// constant weights and bias, no dilation, concrete shapes and a batch of
/// one (or none).
fn conv_operands(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<ConvOperands>> {
    let ps = &conv.pool_spec;
    if conv.q_params.is_some() || conv.kernel_fmt != KernelFormat::OIHW || node.inputs.len() != 3 {
        return Ok(None);
    }
    if ps.kernel_shape.len() != 2 || ps.dilations().iter().any(|&d| d != 1) {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let (Some(x), Some(y)) = (facts[0].shape.as_concrete(), node.outputs[0].fact.shape.as_concrete()) else {
        return Ok(None);
    };
    if facts[0].datum_type != f32::datum_type() || node.outputs[0].fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let (Some(weights), Some(bias)) = (konst(model, node.inputs[1])?, konst(model, node.inputs[2])?) else {
        return Ok(None);
    };
    let (Ok(xs), Ok(_)) = (ps.data_format.shape(x), ps.data_format.shape(y)) else { return Ok(None) };
    if xs.n().is_some_and(|&n| n != 1) {
        return Ok(None);
    }
    Ok(Some(ConvOperands { x: x.into(), y: y.into(), weights, bias }))
}

/// `bias` as one value per channel of `co`: as it is, or one value repeated.
fn per_channel(bias: &Tensor, co: usize) -> TractResult<Option<Vec<f32>>> {
    let b = bias.try_as_plain_ram()?.as_slice::<f32>()?;
    Ok(match b.len() {
        1 => Some(vec![b[0]; co]),
        n if n == co => Some(b.to_vec()),
        _ => None,
    })
}

/// The depthwise convolution `node` is, if [`FusedDepthwise`] takes it:
/// f32, 2-D, channel-last, one group per channel, no dilation, a batch of
/// one (or none), constant weights and bias.
fn depthwise(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Found>> {
    let ps = &conv.pool_spec;
    let c = ps.input_channels;
    if !ps.data_format.c_is_last() || c < 2 || conv.group != c || ps.output_channels != c {
        return Ok(None);
    }
    let Some(ConvOperands { x, y, weights, bias }) = conv_operands(model, node, conv)? else { return Ok(None) };
    let (xs, ys) = (ps.data_format.shape(&x)?, ps.data_format.shape(&y)?);
    let (kh, kw) = (ps.kernel_shape[0], ps.kernel_shape[1]);
    if *xs.c() != c || *ys.c() != c || weights.shape() != [c, 1, kh, kw] {
        return Ok(None);
    }
    let (hw, ohw) = (xs.hw_dims(), ys.hw_dims());
    let padding = ps.computed_padding(hw);
    if padding[0].convoluted != ohw[0] || padding[1].convoluted != ohw[1] {
        return Ok(None);
    }
    let strides = ps.strides();
    let geometry = Geometry {
        c,
        h: hw[0],
        w: hw[1],
        kernel: (kh, kw),
        strides: (strides[0], strides[1]),
        pad: (padding[0].pad_before, padding[1].pad_before),
        out: (ohw[0], ohw[1]),
    };
    let Some(bias) = per_channel(&bias, c)? else { return Ok(None) };
    let channel_axis = ys.c_axis();
    let out_shape = y.clone();
    let shape = out_shape.clone();
    let build: Build = Box::new(move |bias, residual, clamp| {
        let w = weights.try_as_plain_ram()?.as_slice::<f32>()?;
        Ok(Box::new(FusedDepthwise::new(geometry, shape, w, &bias, residual, clamp)?))
    });
    Ok(Some(Found { co: c, out_shape, channel_axis, bias, build }))
}

/// The axes of `einsum` as a 1×1 convolution, if it is one: `(ci, co,
/// pixels, input layout, output layout)`.
fn conv_axes(einsum: &EinSum, x: &[usize], w: &[usize], y: &[usize]) -> Option<(usize, usize, usize, Layout, Layout)> {
    let (inputs, outputs) = einsum.axes.to_strs();
    let (xs, ws, ys) = (inputs.first()?, inputs.get(1)?, outputs.first()?);
    let (xs, ws, ys): (Vec<char>, Vec<char>, Vec<char>) = (xs.chars().collect(), ws.chars().collect(), ys.chars().collect());
    if inputs.len() != 2 || xs.len() != x.len() || ws.len() != 2 || w.len() != 2 || ys.len() != y.len() {
        return None;
    }
    // The weight is [o, i]: `i` is summed (in x, not in y), `o` is new (in y, not in x).
    let (o, i) = (ws[0], ws[1]);
    if xs.contains(&o) || !xs.contains(&i) || ys.contains(&i) || !ys.contains(&o) {
        return None;
    }
    // Axes of size 1 carry nothing (the batch of 1); the rest must be the
    // same pixel axes, in the same order, on both sides.
    let live = |s: &[char], d: &[usize]| -> Vec<char> { s.iter().zip(d).filter(|(_, &n)| n != 1).map(|(&c, _)| c).collect() };
    let (xl, yl) = (live(&xs, x), live(&ys, y));
    let (ci, co) = (w[1], w[0]);
    let pixels_x: Vec<char> = xl.iter().copied().filter(|&c| c != i).collect();
    let pixels_y: Vec<char> = yl.iter().copied().filter(|&c| c != o).collect();
    if pixels_x != pixels_y || ci == 1 || co == 1 {
        return None;
    }
    let pixels = x.iter().product::<usize>() / ci;
    if pixels < MR {
        // A matrix-vector product (the classifier head): one tile, no
        // threads; tract's own kernels split it across threads.
        return None;
    }
    let layout = |l: &[char], c: char| -> Option<Layout> {
        if l.last() == Some(&c) {
            Some(Layout::PixelMajor)
        } else if l.first() == Some(&c) {
            Some(Layout::ChannelMajor)
        } else {
            None
        }
    };
    Some((ci, co, pixels, layout(&xl, i)?, layout(&yl, o)?))
}

/// The constant `dt` f32 value of `outlet`, if it has one.
fn konst(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Arc<Tensor>>> {
    let fact = model.outlet_fact(outlet)?;
    Ok(fact.konst.clone().filter(|t| t.datum_type() == f32::datum_type()))
}

/// The one node reading `id`'s only output, if `id` is no model output.
fn sole_successor(model: &TypedModel, id: usize) -> TractResult<Option<(&TypedNode, usize)>> {
    let node = model.node(id);
    if node.outputs.len() != 1 || node.outputs[0].successors.len() != 1 || model.output_outlets()?.contains(&OutletId::new(id, 0)) {
        return Ok(None);
    }
    let inlet = node.outputs[0].successors[0];
    Ok(Some((model.node(inlet.node), inlet.slot)))
}

/// A binary op of `name` on `node`, and its other operand.
fn binary(node: &TypedNode, slot: usize, name: &str) -> Option<OutletId> {
    let op = node.op_as::<TypedBinOp>()?;
    (op.0.name() == name && node.inputs.len() == 2 && op.1.is_none()).then(|| node.inputs[1 - slot])
}

/// The patch that replaces the convolution `node` and what follows it alone:
/// a bias `Add`, a residual `Add`, `Max` then `Min` with constants.
fn fuse(model: &TypedModel, node: &TypedNode, found: Found) -> TractResult<TypedModelPatch> {
    let Found { co, out_shape, channel_axis, mut bias, build } = found;
    let mut clamp = (f32::NEG_INFINITY, f32::INFINITY);
    let mut last = node.id;
    let mut residual = None;
    let same_shape = |o: OutletId| model.outlet_fact(o).map(|f| f.shape.as_concrete() == Some(&*out_shape));
    if let Some((succ, slot)) = sole_successor(model, last)? {
        if let Some(other) = binary(succ, slot, "Add") {
            if let Some(b) = konst(model, other)? {
                // A bias: one value per output channel along the channel
                // axis (shapes aligned on the right), broadcast over the rest.
                let shape = b.shape();
                let skip = out_shape.len().saturating_sub(shape.len());
                let along_channels =
                    shape.iter().enumerate().all(|(a, &d)| d == 1 || (d == co && skip + a == channel_axis));
                if b.len() == co && shape.len() <= out_shape.len() && along_channels && same_shape(OutletId::new(succ.id, 0))? {
                    for (acc, v) in bias.iter_mut().zip(b.try_as_plain_ram()?.as_slice::<f32>()?) {
                        *acc += v;
                    }
                    last = succ.id;
                }
            }
        }
    }
    if let Some((succ, slot)) = sole_successor(model, last)? {
        if let Some(other) = binary(succ, slot, "Add") {
            if konst(model, other)?.is_none() && same_shape(other)? && model.outlet_fact(other)?.datum_type == f32::datum_type() {
                residual = Some(other);
                last = succ.id;
            }
        }
    }
    for (name, is_max) in [("Max", true), ("Min", false)] {
        let Some((succ, slot)) = sole_successor(model, last)? else { break };
        let Some(other) = binary(succ, slot, name) else { break };
        let Some(c) = konst(model, other)? else { break };
        if c.len() != 1 || !same_shape(OutletId::new(succ.id, 0))? {
            break;
        }
        let v = c.try_as_plain_ram()?.as_slice::<f32>()?[0];
        if v.is_nan() {
            break;
        }
        if is_max {
            clamp.0 = v;
        } else {
            clamp.1 = v;
        }
        last = succ.id;
    }
    let op = build(bias, residual.is_some(), clamp)?;
    let mut patch = TypedModelPatch::new(format!("tern-fused-conv {}", node.name));
    let mut inputs = tvec![patch.tap_model(model, node.inputs[0])?];
    if let Some(r) = residual {
        inputs.push(patch.tap_model(model, r)?);
    }
    let name = model.node(last).name.clone();
    let wire = patch.wire_node(name, op, &inputs)?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), wire)?;
    Ok(patch)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{FusedConv, Input, Layout, BLOCK_BYTES, MR, NR};

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

    /// Computes pixels `p0..p1`.
    ///
    /// # Safety
    /// As [`FusedConv::compute`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(op: &FusedConv, x: *const f32, residual: Option<*const f32>, out: *mut f32, p: (usize, usize), q: (usize, usize)) {
        unsafe {
            match &op.input {
                Input::Pointwise(layout) => {
                    let (xp, xc) = layout.strides(op.pixels, op.ci);
                    blocks(op, |p| x.add(p * xp), Strided(xc), residual, out, p, q)
                }
                Input::Patches(g) => blocks(op, |p| x.add(g.origin(p)), Table(op.taps.as_ptr()), residual, out, p, q),
            }
        }
    }

    /// Walks pixels `p0..p1` by blocks that stay in cache while the weight
    /// panels `q0..q1` run over them; `row(p)` is where pixel `p`'s values
    /// start.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn blocks<T: Taps>(
        op: &FusedConv,
        row: impl Fn(usize) -> *const f32,
        taps: T,
        residual: Option<*const f32>,
        out: *mut f32,
        (p0, p1): (usize, usize),
        (q0, q1): (usize, usize),
    ) {
        unsafe {
            let (ci, co) = (op.ci, op.co);
            let (yp, yc) = op.output.strides(op.pixels, co);
            let block = ((BLOCK_BYTES / (4 * ci)) / MR * MR).max(MR);
            let mut b0 = p0;
            while b0 < p1 {
                let b1 = p1.min(b0 + block);
                for q in q0..q1 {
                    let mut p = b0;
                    while p < b1 {
                        let n = (b1 - p).min(MR);
                        let mut rows = [row(p); MR];
                        for (r, at) in rows.iter_mut().enumerate().take(n).skip(1) {
                            *at = row(p + r);
                        }
                        let t = Tile {
                            rows,
                            ci,
                            w: op.packed.as_ptr().add(q * ci * NR),
                            b: op.bias.as_ptr().add(q * NR),
                            res: residual.map(|r| r.add(p * yp + q * NR * yc)),
                            out: out.add(p * yp + q * NR * yc),
                            yc,
                            yp,
                            channel_last: op.output == Layout::PixelMajor,
                            width: NR.min(co - q * NR),
                            clamp: op.clamp,
                        };
                        match n {
                            6 => tile::<6, T>(&t, taps),
                            5 => tile::<5, T>(&t, taps),
                            4 => tile::<4, T>(&t, taps),
                            3 => tile::<3, T>(&t, taps),
                            2 => tile::<2, T>(&t, taps),
                            _ => tile::<1, T>(&t, taps),
                        }
                        p += MR;
                    }
                }
                b0 = b1;
            }
        }
    }

    /// One tile's operands: up to 6 positions, one weight panel.
    struct Tile {
        rows: [*const f32; MR],
        ci: usize,
        w: *const f32,
        b: *const f32,
        res: Option<*const f32>,
        out: *mut f32,
        yc: usize,
        yp: usize,
        channel_last: bool,
        width: usize,
        clamp: (f32, f32),
    }

    /// `R` positions × one panel of 16 output channels.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize, T: Taps>(t: &Tile, taps: T) {
        unsafe {
            let mut a0 = [_mm256_loadu_ps(t.b); R];
            let mut a1 = [_mm256_loadu_ps(t.b.add(8)); R];
            let mut w = t.w;
            for k in 0..t.ci {
                let off = taps.offset(k);
                let w0 = _mm256_loadu_ps(w);
                let w1 = _mm256_loadu_ps(w.add(8));
                for r in 0..R {
                    let v = _mm256_broadcast_ss(&*t.rows[r].add(off));
                    a0[r] = _mm256_fmadd_ps(v, w0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(v, w1, a1[r]);
                }
                w = w.add(NR);
            }
            let lo = _mm256_set1_ps(t.clamp.0);
            let hi = _mm256_set1_ps(t.clamp.1);
            if t.channel_last && t.width == NR {
                for r in 0..R {
                    let o = t.out.add(r * t.yp);
                    let (mut v0, mut v1) = (a0[r], a1[r]);
                    if let Some(p) = t.res {
                        let p = p.add(r * t.yp);
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
                    }
                    _mm256_storeu_ps(o, _mm256_min_ps(_mm256_max_ps(v0, lo), hi));
                    _mm256_storeu_ps(o.add(8), _mm256_min_ps(_mm256_max_ps(v1, lo), hi));
                }
                return;
            }
            // Channel-first output or a partial panel: through a buffer, one
            // output channel at a time (R contiguous positions each when
            // channel-first).
            let mut tmp = [[0f32; NR]; R];
            for r in 0..R {
                _mm256_storeu_ps(tmp[r].as_mut_ptr(), a0[r]);
                _mm256_storeu_ps(tmp[r].as_mut_ptr().add(8), a1[r]);
            }
            for j in 0..t.width {
                for (r, row) in tmp.iter().enumerate() {
                    let at = r * t.yp + j * t.yc;
                    let mut v = row[j];
                    if let Some(p) = t.res {
                        v += *p.add(at);
                    }
                    *t.out.add(at) = v.max(t.clamp.0).min(t.clamp.1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    pub(super) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x(p, k)` read from the unpadded input with plain index arithmetic
    /// (zero outside it), independent of the op's offset tables.
    fn input_value(x: &[f32], spec: &Spec, p: usize, k: usize) -> f32 {
        match &spec.input {
            Input::Pointwise(layout) => {
                let (xp, xc) = layout.strides(spec.pixels, spec.ci);
                x[p * xp + k * xc]
            }
            Input::Patches(g) => {
                let (c, ky, kx) = (k / (g.kernel.0 * g.kernel.1), k / g.kernel.1 % g.kernel.0, k % g.kernel.1);
                let (oy, ox) = (p / g.out.1, p % g.out.1);
                let y = (oy * g.strides.0 + ky) as isize - g.pad.0 as isize;
                let xx = (ox * g.strides.1 + kx) as isize - g.pad.2 as isize;
                if y < 0 || xx < 0 || y >= g.h as isize || xx >= g.w as isize {
                    return 0.0;
                }
                let (y, xx) = (y as usize, xx as usize);
                match g.layout {
                    Layout::ChannelMajor => x[(c * g.h + y) * g.w + xx],
                    Layout::PixelMajor => x[(y * g.w + xx) * g.c + c],
                }
            }
        }
    }

    /// Plain loops over the unpacked weights, in f64.
    fn reference(x: &[f32], w: &[f32], b: &[f32], res: Option<&[f32]>, spec: &Spec) -> Vec<f32> {
        let (ci, co, n) = (spec.ci, spec.co, spec.pixels);
        let (yp, yc) = spec.output.strides(n, co);
        let mut y = vec![0f32; n * co];
        for p in 0..n {
            for o in 0..co {
                let mut acc = b[o] as f64;
                for k in 0..ci {
                    acc += input_value(x, spec, p, k) as f64 * w[o * ci + k] as f64;
                }
                if let Some(r) = res {
                    acc += r[p * yp + o * yc] as f64;
                }
                y[p * yp + o * yc] = (acc as f32).max(spec.clamp.0).min(spec.clamp.1);
            }
        }
        y
    }

    /// The op (the AVX2 kernel where the CPU has it) and its portable loops
    /// against [`reference`].
    fn check(spec: Spec, inputs: usize) {
        let (ci, co, pixels) = (spec.ci, spec.co, spec.pixels);
        let (x, w, b, r) = (values(inputs, 1), values(ci * co, 2), values(co, 3), values(pixels * co, 4));
        let op = FusedConv::new(spec.clone(), &w, &b).unwrap();
        let want = reference(&x, &w, &b, spec.residual.then_some(&r[..]), &spec);
        let mut tensors = tvec![Tensor::from_shape(&[inputs], &x).unwrap().into_tvalue()];
        if spec.residual {
            tensors.push(Tensor::from_shape(&spec.out_shape, &r).unwrap().into_tvalue());
        }
        let got = op.eval(&EvalContext::out_of_plan(), tensors).unwrap();
        let got = got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let padded = match &spec.input {
            Input::Pointwise(_) => x.clone(),
            Input::Patches(g) => g.pad_input(&x),
        };
        let mut portable = vec![f32::NAN; pixels * co];
        let rp = spec.residual.then_some(r.as_ptr());
        unsafe { op.compute_portable(padded.as_ptr(), rp, portable.as_mut_ptr(), (0, pixels), (0, co.div_ceil(NR))) };
        let tol = 1e-5 * (ci as f32).sqrt() * 4.0;
        for (k, ((g, p), e)) in got.iter().zip(&portable).zip(&want).enumerate() {
            assert!((g - e).abs() <= tol, "{spec:?} at {k}: kernel {g}, reference {e}");
            assert!((p - e).abs() <= tol, "{spec:?} at {k}: portable {p}, reference {e}");
        }
    }

    const NONE: (f32, f32) = (f32::NEG_INFINITY, f32::INFINITY);

    #[test]
    fn pointwise_every_layout_tail_and_epilogue_matches_plain_loops() {
        use Layout::*;
        for (ci, co, pixels) in [(16, 96, 61), (24, 40, 13), (3, 8, 6), (32, 16, 6), (144, 24, 7), (5, 33, 12)] {
            for (i, o) in [(PixelMajor, PixelMajor), (ChannelMajor, PixelMajor), (PixelMajor, ChannelMajor), (ChannelMajor, ChannelMajor)] {
                for (residual, clamp) in [(false, NONE), (true, NONE), (false, (0.0, 0.5))] {
                    let out_shape = tvec![pixels, co];
                    let spec = Spec { ci, co, pixels, input: Input::Pointwise(i), output: o, out_shape, residual, clamp };
                    check(spec, pixels * ci);
                }
            }
        }
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
                    check(spec, pixels * ci);
                }
            }
        });
    }

    #[test]
    fn full_convolution_every_layout_stride_and_padding_matches_plain_loops() {
        use Layout::*;
        // (c, h, w, kernel, strides, pad top/bottom/left/right, co)
        let cases = [
            (3, 15, 15, (3, 3), (2, 2), (0, 1, 0, 1), 32),
            (3, 9, 11, (3, 3), (1, 1), (1, 1, 1, 1), 20),
            (5, 8, 7, (5, 5), (2, 1), (2, 2, 0, 3), 16),
            (2, 6, 6, (1, 3), (1, 2), (0, 0, 1, 1), 7),
        ];
        for (c, h, w, kernel, strides, pad, co) in cases {
            let out = ((h + pad.0 + pad.1 - kernel.0) / strides.0 + 1, (w + pad.2 + pad.3 - kernel.1) / strides.1 + 1);
            for layout in [ChannelMajor, PixelMajor] {
                for (residual, clamp) in [(false, NONE), (true, (0.0, 6.0))] {
                    let g = Patches { c, h, w, layout, kernel, strides, pad, out };
                    let pixels = out.0 * out.1;
                    let spec = Spec {
                        ci: c * kernel.0 * kernel.1,
                        co,
                        pixels,
                        input: Input::Patches(g),
                        output: layout,
                        out_shape: tvec![pixels, co],
                        residual,
                        clamp,
                    };
                    check(spec, c * h * w);
                }
            }
        }
    }

    /// A 1×1 convolution `IHW,OI->HWO` of 4 → 8 channels over 8×8 pixels,
    /// then an `Add` of a constant of `bias_shape`, rewritten: how many
    /// convolutions were replaced, the ops left, and the largest |Δ| of the
    /// outputs against the graph as built.
    fn rewritten_bias(bias_shape: &[usize]) -> (usize, Vec<String>, f32) {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([4usize, 8, 8])).unwrap();
        let w = m.add_const("w", Tensor::from_shape(&[8, 4], &values(32, 5)).unwrap()).unwrap();
        let einsum = EinSum { axes: "IHW,OI->HWO".parse().unwrap(), operating_dt: f32::datum_type(), q_params: None };
        let y = m.wire_node("conv", einsum, &[x, w]).unwrap()[0];
        let b = m.add_const("b", Tensor::from_shape(bias_shape, &values(8, 6)).unwrap()).unwrap();
        let y = m.wire_node("bias", tract_onnx::tract_core::ops::math::add(), &[y, b]).unwrap()[0];
        m.select_output_outlets(&[y]).unwrap();
        let input = Tensor::from_shape(&[4, 8, 8], &values(256, 7)).unwrap();
        let run = |m: &TypedModel| {
            let out = m.clone().into_runnable().unwrap().run(tvec![input.clone().into_tvalue()]).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let want = run(&m);
        let n = rewrite(&mut m).unwrap();
        let got = run(&m);
        let live = m.eval_order().unwrap().into_iter().map(|id| m.node(id).op.name().to_string()).collect();
        (n, live, want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max))
    }

    #[test]
    fn rewrite_folds_a_bias_along_the_channels_only() {
        // [1, 1, 8]: along O, the output's last axis: folded in.
        let (n, ops, worst) = rewritten_bias(&[1, 1, 8]);
        assert!(worst <= 1e-5, "max |Δ| {worst}");
        if supported() {
            assert_eq!((n, ops.iter().filter(|o| o.as_str() == "Add").count()), (1, 0), "{ops:?}");
        }
        // [8, 1, 1]: as long as the channels, but along H: left as an Add.
        let (n, ops, worst) = rewritten_bias(&[8, 1, 1]);
        assert!(worst <= 1e-5, "max |Δ| {worst}");
        if supported() {
            assert_eq!((n, ops.iter().filter(|o| o.as_str() == "Add").count()), (1, 1), "{ops:?}");
        } else {
            assert_eq!(n, 0);
        }
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
        let spec = Spec { ci: 27, co: 8, pixels: 16, input: Input::Patches(g), output: Layout::ChannelMajor, out_shape: tvec![16, 8], residual: false, clamp: NONE };
        let e = FusedConv::new(spec, &[0.0; 27 * 8], &[0.0; 8]).unwrap_err();
        assert!(format!("{e}").contains("leave the padded input"), "{e}");
    }
}
