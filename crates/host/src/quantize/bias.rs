//! Empirical bias correction of int8-weight layers.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use crate::data::progress;

use super::OnnxNet;

/// Empirical bias correction (Nagel et al. 2019, §4.2) of the graph
/// `int8` (int8 weights, float compute) against `float`, on `batches`:
/// layer by layer in graph order, each Conv or Gemm with a bias whose
/// output differs from the float layer's gets its bias shifted by minus
/// the mean difference per output channel, measured with every upstream
/// correction already in place. Analytic correction ([`Options::input_means`])
/// only sees a layer's own rounding; this also removes the mean of the
/// error that reaches it from upstream layers. Returns the corrected
/// biases (initializer name → values).
///
/// Every batch is held in memory at once (the layers run one at a time
/// over all of them): give a few batches.
pub fn empirical_bias_correction(
    float: &OnnxNet,
    int8: &OnnxNet,
    batches: &[Tensor],
) -> Result<BTreeMap<String, Vec<f32>>> {
    // The graph's own names: the int8 graph keeps the float graph's node
    // outputs (its weights come from DequantizeLinear under the float
    // weight's name), so each layer is found in both by its output.
    let (f_last, q_last) = (float.last_uses(), int8.last_uses());
    let mut fv: Vec<HashMap<String, Tensor>> =
        batches.iter().map(|x| HashMap::from([(float.input.clone(), x.shallow_clone())])).collect();
    let mut qv: Vec<HashMap<String, Tensor>> =
        batches.iter().map(|x| HashMap::from([(int8.input.clone(), x.shallow_clone())])).collect();
    let mut f_next = 0usize;
    let mut biases = BTreeMap::new();
    let mut consts: HashMap<String, Tensor> = HashMap::new();
    let bar = progress(int8.nodes.len() as u64, "bias correction");
    for (qi, n) in int8.nodes.iter().enumerate() {
        bar.inc(1);
        let out = n.output.first().with_context(|| format!("node {:?} has no output", n.name))?.clone();
        let mut ys = Vec::with_capacity(batches.len());
        for v in &qv {
            let y = tch::no_grad(|| int8.eval(n, |name| v.get(name).or_else(|| consts.get(name))))?;
            ys.push(y);
        }
        let op = n.op_type.as_deref().unwrap_or_default();
        let bias = n.input.get(2).filter(|_| matches!(op, "Conv" | "Gemm")).cloned();
        if let Some(b_name) = bias {
            // The float graph up to this layer's output.
            while !fv.first().is_some_and(|v| v.contains_key(&out)) {
                let fnode = float.nodes.get(f_next).with_context(|| {
                    format!("bias correction: the float graph does not compute `{out}` (layer {:?})", n.name)
                })?;
                let fout = fnode.output.first().cloned().unwrap_or_default();
                for v in fv.iter_mut() {
                    let y = tch::no_grad(|| float.eval(fnode, |name| v.get(name)))?;
                    // Pruned before the insert: `out` is compared below even
                    // when no later node reads it.
                    OnnxNet::drop_dead(v, &f_last, f_next);
                    v.insert(fout.clone(), y);
                }
                f_next += 1;
            }
            // Mean difference per output channel (axis 1) over the batch
            // and the spatial positions.
            let (mut sum, mut count) = (None::<Tensor>, 0f64);
            for (y, v) in ys.iter().zip(&fv) {
                let f = v.get(&out).with_context(|| format!("bias correction: no float value of `{out}`"))?;
                let d = (y - f).to_kind(Kind::Double);
                let dims: Vec<i64> = (0..d.dim() as i64).filter(|&k| k != 1).collect();
                let s = d.sum_dim_intlist(dims.as_slice(), false, Kind::Double);
                count += (d.numel() / d.size().get(1).copied().unwrap_or(1).max(1) as usize) as f64;
                sum = Some(match sum {
                    Some(t) => t + s,
                    None => s,
                });
            }
            if let Some(sum) = sum.filter(|t| t.abs().max().double_value(&[]) > 0.0) {
                let shift = (sum / count.max(1.0)).to_kind(Kind::Float);
                let old = consts
                    .get(&b_name)
                    .or_else(|| int8.consts.get(&b_name))
                    .with_context(|| format!("bias correction: bias `{b_name}` of {:?} is not a constant", n.name))?;
                if old.size() == shift.size() {
                    let corrected = old - &shift;
                    let shape: Vec<i64> = (0..ys[0].dim() as i64).map(|k| if k == 1 { -1 } else { 1 }).collect();
                    let delta = shift.reshape(shape.as_slice());
                    for y in ys.iter_mut() {
                        *y = &*y - &delta;
                    }
                    biases.insert(b_name.clone(), Vec::<f32>::try_from(&corrected)?);
                    consts.insert(b_name, corrected);
                }
            }
        }
        for (y, v) in ys.into_iter().zip(qv.iter_mut()) {
            v.insert(out.clone(), y);
            OnnxNet::drop_dead(v, &q_last, qi);
        }
    }
    bar.finish_and_clear();
    Ok(biases)
}

/// `w` rounded to int8 with one symmetric scale per output channel (axis
/// 0), as [`tern_model_format::quantize`] stores weights, back in float.
pub(super) fn fake_quant_per_channel(w: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..w.dim() as i64).collect();
    let amax = if dims.is_empty() { w.abs() } else { w.abs().amax(dims.as_slice(), true) };
    let scale = (amax / 127.0).clamp_min(f64::from(f32::MIN_POSITIVE));
    (w / &scale).round().clamp(-127.0, 127.0) * scale
}
