//! [`QAdd`]: the residual `Add` of two int8 tensors into a third, as the
//! QDQ form writes it (`DequantizeLinear` of each, `Add`,
//! `QuantizeLinear`), in one pass: 16 values a step in NEON or AVX2
//! (`neon`, `avx2`), the rest by [`QAdd::apply`].

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// `out = clamp(round_half_even(f32(a − za)·ma + f32(b − zb)·mb) + zy)`,
/// element by element; `ma`, `mb` are each input's scale ÷ the output's.
#[derive(Debug, Clone, PartialEq)]
pub struct QAdd {
    /// Multiplier and zero point of the first input.
    pub a: (f32, i32),
    /// Multiplier and zero point of the second input.
    pub b: (f32, i32),
    /// The output's zero point.
    pub zero_point: i32,
    /// The shape of all three tensors.
    pub shape: TVec<usize>,
}

impl Eq for QAdd {}

impl QAdd {
    /// One output value.
    #[inline]
    pub fn apply(&self, a: i8, b: i8) -> i8 {
        let v = (i32::from(a) - self.a.1) as f32 * self.a.0 + (i32::from(b) - self.b.1) as f32 * self.b.0;
        (v.max(-super::LIMIT).min(super::LIMIT).round_ties_even() as i32 + self.zero_point).clamp(-128, 127) as i8
    }

    /// `out[j] = self.apply(a[j], b[j])` over `out`'s length (no longer
    /// than `a`'s or `b`'s), 16 at a time in NEON or AVX2 with `kernel`.
    pub(super) fn compute(&self, a: &[i8], b: &[i8], out: &mut [i8], kernel: bool) {
        let n = out.len().min(a.len()).min(b.len());
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "aarch64")]
        if kernel {
            done = n / 16 * 16;
            // SAFETY: `a`, `b` and `out` each hold n ≥ done values.
            unsafe { neon::add(self, a.as_ptr(), b.as_ptr(), out.as_mut_ptr(), done) };
        }
        #[cfg(target_arch = "x86_64")]
        if kernel && is_x86_feature_detected!("avx2") {
            done = n / 16 * 16;
            // SAFETY: AVX2 checked; `a`, `b` and `out` each hold n ≥ done values.
            unsafe { avx2::add(self, a.as_ptr(), b.as_ptr(), out.as_mut_ptr(), done) };
        }
        let _ = kernel;
        for j in done..n {
            out[j] = self.apply(a[j], b[j]);
        }
    }

    /// Checks the multipliers (below [`MULTIPLIER`](super::MULTIPLIER) in
    /// magnitude) and zero points (int8).
    pub fn check(&self) -> TractResult<()> {
        // Bounded multipliers keep both products, and their sum, finite.
        let bound = super::MULTIPLIER;
        ensure!(self.a.0.abs() < bound && self.b.0.abs() < bound, "{self:?}: multipliers not below {bound}");
        let int8 = -128..=127;
        ensure!(int8.contains(&self.a.1) && int8.contains(&self.b.1) && int8.contains(&self.zero_point), "{self:?}: zero points");
        Ok(())
    }
}

impl Op for QAdd {
    fn name(&self) -> StaticName {
        "TernQAdd".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QAdd {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2 && inputs.iter().all(|t| t.shape() == &*self.shape), "{self:?} given {inputs:?}");
        let a = inputs[0].try_as_plain_ram()?.as_slice::<i8>()?;
        let b = inputs[1].try_as_plain_ram()?.as_slice::<i8>()?;
        let mut out = vec![0i8; a.len().min(b.len())];
        self.compute(a, b, &mut out, true);
        Ok(tvec!(Tensor::from_shape(&self.shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for QAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2 && inputs.iter().all(|f| f.datum_type == i8::datum_type()));
        ensure!(inputs.iter().all(|f| f.shape.as_concrete() == Some(&*self.shape)));
        Ok(tvec!(i8::fact(&*self.shape)))
    }

    as_op!();
}
