//! Tern's integer convolution ops for QDQ int8 bundles, put in tract's plan
//! in place of the float chain the QDQ form spells out.
//!
//! A QDQ bundle (`tern-host quantize --scheme qdq`) writes each convolution
//! as `DequantizeLinear(x_i8)` → `Conv`(int8 weights behind
//! `DequantizeLinear`, int32 bias) → `QuantizeLinear`, residual adds as
//! `DequantizeLinear` + `DequantizeLinear` → `Add` → `QuantizeLinear`.
//! tract runs that as written: float convolutions between element-wise
//! conversions. [`rewrite`] finds, in the decluttered graph, the chains
//! `DequantizeLinear` → 1×1 or depthwise convolution (constant weights) →
//! bias `Add` → [residual `Add` of a `DequantizeLinear`] → `QuantizeLinear`
//! and replaces each by one integer op ([`QPointwise`], [`QDepthwise`]):
//! int8 activations in, int32 accumulation, the bias, the zero points, the
//! residual and the clamp applied per output by [`Requant`], int8 out; and
//! each `DequantizeLinear` + `DequantizeLinear` → `Add` → `QuantizeLinear`
//! (a residual add between quantized tensors) by one [`QAdd`].
//!
//! Requantization uses an f32 multiplier per output channel (input scale ×
//! weight scale ÷ output scale), not a fixed-point one: it is the
//! arithmetic the QDQ graph itself states (dequantize, multiply, round half
//! to even), every target (NEON, SSE/AVX) converts and rounds in one
//! instruction per four or eight lanes, and the whole epilogue is a few
//! instructions per output against the hundreds of multiply-accumulates
//! before it. [`Requant::apply`] is the one definition every kernel follows
//! operation for operation (no fused multiply-add), so the kernels equal
//! the reference loops exactly.
//!
//! Layout: each op in its own module with its portable loops; the kernels
//! per ISA below it, chosen at run time; the matcher in `rewrite`; the
//! checks against plain integer loops in [`check`] (run by `tern-device
//! selftest`, which is how the aarch64 kernels are checked under qemu).

mod add;
pub mod check;
mod depthwise;
mod epilogue;
mod pointwise;
mod rewrite;

pub use add::QAdd;
pub use depthwise::QDepthwise;
pub use pointwise::QPointwise;
pub use rewrite::rewrite;

use tract_onnx::tract_core::internal::*;

/// What turns an i32 accumulator of output channel `c` into an int8 value.
#[derive(Debug, Clone, PartialEq)]
pub struct Requant {
    /// Per output channel: input scale × weight scale ÷ output scale.
    pub multiplier: Vec<f32>,
    /// Per output channel, added to the accumulator (the int32 bias, less
    /// what the input zero point contributes where the op folds it here).
    pub bias: Vec<i32>,
    /// The output's zero point.
    pub zero_point: i32,
    /// A residual (int8, laid out as the output) added before rounding:
    /// its scale ÷ the output scale, and its zero point.
    pub residual: Option<(f32, i32)>,
    /// Lowest and highest output value.
    pub clamp: (i8, i8),
}

/// Bound on |v| before rounding: far outside any int8 output, and inside
/// every ISA's exact f32 → i32 conversion.
const LIMIT: f32 = 1024.0;

/// Bound on |multiplier|: `f32(acc)·m` and `f32(r − zr)·mr` stay finite
/// (|acc| < 2³¹, |r − zr| < 2⁸), and so does their sum.
const MULTIPLIER: f32 = 1e20;

impl Requant {
    /// Checks the parameters for `co` output channels; `worst` bounds
    /// |accumulator| (so `acc + bias` cannot overflow).
    fn check(&self, co: usize, worst: i64) -> TractResult<()> {
        ensure!(self.multiplier.len() == co && self.bias.len() == co, "requantization for {co} channels");
        // Bounded multipliers keep every product, and their sum, finite.
        ensure!(self.multiplier.iter().all(|m| m.abs() < MULTIPLIER), "a requantization multiplier is not below {MULTIPLIER}");
        ensure!(self.residual.is_none_or(|(m, _)| m.abs() < MULTIPLIER), "the residual multiplier is not below {MULTIPLIER}");
        let int8 = -128..=127;
        ensure!(int8.contains(&self.zero_point) && self.residual.is_none_or(|(_, z)| int8.contains(&z)), "zero points not int8");
        ensure!(self.clamp.0 <= self.clamp.1, "clamp {:?}", self.clamp);
        let big = self.bias.iter().map(|b| i64::from(*b).abs()).max().unwrap_or(0);
        ensure!(big + worst < i64::from(i32::MAX), "the accumulator may overflow i32");
        Ok(())
    }

    /// The output of channel `c` for accumulator `acc` and residual value `r`:
    /// `v = f32(acc + bias[c]) × multiplier[c]`, then `+ f32(r − zr) × mr`
    /// with a residual, bounded to ±[`LIMIT`], rounded half to even, plus
    /// the zero point, clamped.
    #[inline]
    pub fn apply(&self, acc: i32, c: usize, r: i8) -> i8 {
        let mut v = (acc.wrapping_add(self.bias[c])) as f32 * self.multiplier[c];
        if let Some((m, z)) = self.residual {
            v += (i32::from(r) - z) as f32 * m;
        }
        let v = v.max(-LIMIT).min(LIMIT).round_ties_even() as i32 + self.zero_point;
        v.clamp(i32::from(self.clamp.0), i32::from(self.clamp.1)) as i8
    }
}

/// Whether [`rewrite`] puts the integer ops in plans on this CPU: always
/// (every CPU runs at least the portable loops, which are exact).
pub fn supported() -> bool {
    true
}

/// The ISA of the integer kernels on this CPU, in words.
pub fn kernel_isa() -> String {
    format!("{}, epilogue {}", pointwise::isa(), epilogue::isa())
}

/// The int8 data of a fused op's inputs: the first's, and the residual's
/// (the second input, shaped as the output) when the op adds one.
fn operands<'a>(op: &dyn std::fmt::Debug, inputs: &'a [TValue], residual: bool, out_shape: &[usize]) -> TractResult<(&'a [i8], Option<&'a [i8]>)> {
    ensure!(inputs.len() == 1 + residual as usize, "{} inputs to {op:?}", inputs.len());
    let x = inputs[0].try_as_plain_ram()?.as_slice::<i8>()?;
    let res = if residual {
        ensure!(inputs[1].shape() == out_shape, "{op:?} given a {:?} residual", inputs[1].shape());
        Some(inputs[1].try_as_plain_ram()?.as_slice::<i8>()?)
    } else {
        None
    };
    Ok((x, res))
}
