//! Finds the QDQ convolution chains Tern's integer ops take in a
//! decluttered tract graph and patches each into one op.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8};

use super::{supported, QAdd, QDepthwise, QPointwise, Requant};
use crate::fused::{Geometry, Layout};

/// Replaces, in a decluttered model, every chain `DequantizeLinear`(int8) →
/// 1×1 convolution (`EinSum`) with its bias `Add`, or depthwise `Conv`,
/// over constant per-channel int8 weights → [residual `Add` of a
/// `DequantizeLinear`] → `QuantizeLinear`(int8) by a [`QPointwise`] or
/// [`QDepthwise`]. Returns how many it replaced. A chain whose op refuses
/// it (its `new()` fails: weights that are not int8 steps, a geometry it
/// does not take) stays tract's.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !supported() {
        return Ok(0);
    }
    let mut done = 0;
    let mut refused: std::collections::HashSet<String> = std::collections::HashSet::new();
    'again: loop {
        for id in model.eval_order()? {
            let node = model.node(id);
            if refused.contains(&node.name) {
                continue;
            }
            let patch = if node.op_as::<EinSum>().is_some() || node.op_as::<Conv>().is_some() {
                chain(model, node)?
            } else if node.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == "Add") {
                residual_add(model, node)?
            } else {
                continue;
            };
            match patch {
                Some(patch) => {
                    patch.apply(model)?;
                    done += 1;
                }
                None => {
                    refused.insert(node.name.clone());
                }
            }
            continue 'again;
        }
        return Ok(done);
    }
}

/// The dequantized int8 tensor `outlet` is, if it is one: the int8 outlet,
/// its scale and zero point.
fn dequantized(model: &TypedModel, outlet: OutletId) -> TractResult<Option<(OutletId, f32, i32)>> {
    let node = model.node(outlet.node);
    let Some(dq) = node.op_as::<DequantizeLinearF32>() else { return Ok(None) };
    let input = node.inputs[0];
    if model.outlet_fact(input)?.datum_type != i8::datum_type() {
        return Ok(None);
    }
    Ok(Some((input, dq.scale, dq.zero_point)))
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

/// `Add` on `node`, and its other operand.
fn add(node: &TypedNode, slot: usize) -> Option<OutletId> {
    let op = node.op_as::<TypedBinOp>()?;
    (op.0.name() == "Add" && node.inputs.len() == 2 && op.1.is_none()).then(|| node.inputs[1 - slot])
}

/// The constant f32 value of `outlet`, if it has one.
fn konst(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Arc<Tensor>>> {
    Ok(model.outlet_fact(outlet)?.konst.clone().filter(|t| t.datum_type() == f32::datum_type()))
}

/// Float weights `[co, …]` that are int8 steps of one scale per output
/// channel (as `DequantizeLinear` of symmetric int8 weights folds to): the
/// int8 values and the scales; `None` otherwise. A channel's largest step
/// is 127 unless its scale was raised (the quantizer does so where the
/// int32 bias would pass 2²⁴ steps), so the scales `max|w| / top` are
/// tried from the coarsest (`top` 1) up: the first that fits keeps the
/// int32 bias as small as the file's.
fn int8_weights(w: &[f32], co: usize) -> Option<(Vec<i8>, Vec<f32>)> {
    if co == 0 || w.len() % co != 0 {
        return None;
    }
    let per = w.len() / co;
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(co);
    for row in w.chunks(per) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 {
            q.extend(std::iter::repeat_n(0i8, per));
            scales.push(1.0);
            continue;
        }
        // A hundredth of the finest step there can be: the scale recomputed
        // here may differ from the file's by an ulp, which moves `k·s` by up
        // to 127 ulps, far less.
        let eps = 0.01 * amax / 127.0;
        let (steps, s) = (1..=127u8).find_map(|top| {
            let s = amax / f32::from(top);
            int8_steps(row, s, eps).map(|k| (k, s))
        })?;
        q.extend(steps);
        scales.push(s);
    }
    Some((q, scales))
}

/// `row` as int8 multiples of `s`, each within `eps` of its value, if it is.
fn int8_steps(row: &[f32], s: f32, eps: f32) -> Option<Vec<i8>> {
    row.iter()
        .map(|&v| {
            let k = (v / s).round();
            ((-127.0..=127.0).contains(&k) && (k * s - v).abs() <= eps).then_some(k as i8)
        })
        .collect()
}

/// The int32 bias of `b` (float, `co` values or one) at scales `sx·ws[c]`.
fn int_bias(b: &[f32], sx: f32, ws: &[f32]) -> Option<Vec<i32>> {
    let co = ws.len();
    if b.len() != co && b.len() != 1 {
        return None;
    }
    (0..co)
        .map(|c| {
            let v = f64::from(b[if b.len() == 1 { 0 } else { c }]) / (f64::from(sx) * f64::from(ws[c]));
            (v.is_finite() && v.abs() < 1e9).then(|| v.round() as i32)
        })
        .collect()
}

/// What follows the convolution alone: [residual `Add` of a dequantized
/// int8 tensor of the output's shape] then `QuantizeLinear` to int8. The
/// last node, the residual, and the quantizer's 1/scale and zero point.
fn tail(model: &TypedModel, mut last: usize, out_shape: &[usize]) -> TractResult<Option<(usize, Option<(OutletId, f32, i32)>, f32, i32)>> {
    let mut residual = None;
    let Some((mut succ, mut slot)) = sole_successor(model, last)? else { return Ok(None) };
    if let Some(other) = add(succ, slot) {
        let Some(r) = dequantized(model, other)? else { return Ok(None) };
        if model.outlet_fact(r.0)?.shape.as_concrete() != Some(out_shape) {
            return Ok(None);
        }
        residual = Some(r);
        last = succ.id;
        let Some(next) = sole_successor(model, last)? else { return Ok(None) };
        (succ, slot) = next;
    }
    let _ = slot;
    let Some(q) = succ.op_as::<ElementWiseOp>().and_then(|op| op.0.downcast_ref::<QuantizeLinearI8>()) else {
        return Ok(None);
    };
    if !q.scale.is_finite() || q.scale <= 0.0 {
        return Ok(None);
    }
    Ok(Some((succ.id, residual, q.scale, i32::from(q.zero_point))))
}

/// The patch for the chain at convolution `node`, if the ops take it.
fn chain(model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
    let Some((x, sx, zx)) = dequantized(model, node.inputs[0])? else { return Ok(None) };
    let Some(y) = node.outputs[0].fact.shape.as_concrete().map(TVec::<usize>::from) else { return Ok(None) };
    let Some(xs) = model.outlet_fact(x)?.shape.as_concrete().map(TVec::<usize>::from) else { return Ok(None) };
    if node.outputs[0].fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    // (op builder, last node of the chain before the tail, out shape)
    type Build = Box<dyn FnOnce(Requant) -> TractResult<Box<dyn TypedOp>>>;
    let (build, last, co, ws): (Build, usize, usize, Vec<f32>) = if let Some(einsum) = node.op_as::<EinSum>() {
        if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
            return Ok(None);
        }
        let Some(w) = konst(model, node.inputs[1])? else { return Ok(None) };
        if w.rank() != 2 {
            return Ok(None);
        }
        let (co, ci) = (w.shape()[0], w.shape()[1]);
        let Some((layout_in, layout_out, pixels)) = pointwise_axes(einsum, &xs, &y, ci, co) else { return Ok(None) };
        let Some((wq, ws)) = int8_weights(w.try_as_plain_ram()?.as_slice::<f32>()?, co) else { return Ok(None) };
        // The bias Add, along the output channels.
        let Some((succ, slot)) = sole_successor(model, node.id)? else { return Ok(None) };
        let Some(b) = add(succ, slot).map(|o| konst(model, o)).transpose()?.flatten() else { return Ok(None) };
        let channel_axis = match layout_out {
            Layout::ChannelMajor => y.iter().position(|&d| d == co),
            Layout::PixelMajor => Some(y.len() - 1),
        };
        let skip = y.len().saturating_sub(b.rank());
        let along = b.shape().iter().enumerate().all(|(a, &d)| d == 1 || (d == co && Some(skip + a) == channel_axis));
        if !along || b.len() != co || succ.outputs[0].fact.shape.as_concrete() != Some(&*y) {
            return Ok(None);
        }
        let Some(bias) = int_bias(b.try_as_plain_ram()?.as_slice::<f32>()?, sx, &ws) else { return Ok(None) };
        let shape = y.clone();
        let build: Build = Box::new(move |mut r: Requant| {
            r.bias = bias;
            Ok(Box::new(QPointwise::new(ci, co, pixels, layout_in, layout_out, shape, &wq, zx, r)?))
        });
        (build, succ.id, co, ws)
    } else if let Some(conv) = node.op_as::<Conv>() {
        let ps = &conv.pool_spec;
        let c = ps.input_channels;
        if conv.q_params.is_some() || conv.kernel_fmt != KernelFormat::OIHW || node.inputs.len() != 3 {
            return Ok(None);
        }
        if c < 2 || conv.group != c || ps.output_channels != c || ps.kernel_shape.len() != 2 || ps.dilations().iter().any(|&d| d != 1) {
            return Ok(None);
        }
        let (Some(w), Some(b)) = (konst(model, node.inputs[1])?, konst(model, node.inputs[2])?) else { return Ok(None) };
        let (Ok(xshape), Ok(yshape)) = (ps.data_format.shape(&xs), ps.data_format.shape(&y)) else { return Ok(None) };
        if xshape.n().is_some_and(|&n| n != 1) || *xshape.c() != c || *yshape.c() != c {
            return Ok(None);
        }
        let (kh, kw) = (ps.kernel_shape[0], ps.kernel_shape[1]);
        if w.shape() != [c, 1, kh, kw] {
            return Ok(None);
        }
        let (hw, ohw) = (xshape.hw_dims(), yshape.hw_dims());
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
        let layout = if ps.data_format.c_is_last() { Layout::PixelMajor } else { Layout::ChannelMajor };
        let Some((wq, ws)) = int8_weights(w.try_as_plain_ram()?.as_slice::<f32>()?, c) else { return Ok(None) };
        let Some(bias) = int_bias(b.try_as_plain_ram()?.as_slice::<f32>()?, sx, &ws) else { return Ok(None) };
        let shape = y.clone();
        let build: Build = Box::new(move |mut r: Requant| {
            r.bias = bias;
            Ok(Box::new(QDepthwise::new(geometry, layout, shape, &wq, zx, r)?))
        });
        (build, node.id, c, ws)
    } else {
        return Ok(None);
    };
    let Some((q, residual, inv_y, zy)) = tail(model, last, &y)? else { return Ok(None) };
    let requant = Requant {
        multiplier: ws.iter().map(|w| sx * w * inv_y).collect(),
        bias: vec![0; co],
        zero_point: zy,
        residual: residual.map(|(_, s, z)| (s * inv_y, z)),
        clamp: (i8::MIN, i8::MAX),
    };
    let Ok(op) = build(requant) else { return Ok(None) };
    let mut patch = TypedModelPatch::new(format!("tern-int8 {}", node.name));
    let mut inputs = tvec![patch.tap_model(model, x)?];
    if let Some((r, _, _)) = residual {
        inputs.push(patch.tap_model(model, r)?);
    }
    let wire = patch.wire_node(model.node(q).name.clone(), op, &inputs)?[0];
    patch.shunt_outside(model, OutletId::new(q, 0), wire)?;
    Ok(Some(patch))
}

/// The patch for `DequantizeLinear`(a) + `DequantizeLinear`(b) → `Add` →
/// `QuantizeLinear`, all of one shape, if `node` is that `Add`.
fn residual_add(model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
    if node.inputs.len() != 2 {
        return Ok(None);
    }
    let (Some(a), Some(b)) = (dequantized(model, node.inputs[0])?, dequantized(model, node.inputs[1])?) else {
        return Ok(None);
    };
    let Some(shape) = node.outputs[0].fact.shape.as_concrete().map(TVec::<usize>::from) else { return Ok(None) };
    for o in [a.0, b.0] {
        if model.outlet_fact(o)?.shape.as_concrete() != Some(&*shape) {
            return Ok(None);
        }
    }
    let Some((succ, _)) = sole_successor(model, node.id)? else { return Ok(None) };
    let Some(q) = succ.op_as::<ElementWiseOp>().and_then(|op| op.0.downcast_ref::<QuantizeLinearI8>()) else {
        return Ok(None);
    };
    let op = QAdd { a: (a.1 * q.scale, a.2), b: (b.1 * q.scale, b.2), zero_point: i32::from(q.zero_point), shape };
    if op.check().is_err() {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::new(format!("tern-int8 {}", node.name));
    let inputs = tvec![patch.tap_model(model, a.0)?, patch.tap_model(model, b.0)?];
    let wire = patch.wire_node(succ.name.clone(), op, &inputs)?[0];
    patch.shunt_outside(model, OutletId::new(succ.id, 0), wire)?;
    Ok(Some(patch))
}

/// The layouts and pixel count of `einsum` as a 1×1 convolution of `ci` →
/// `co` channels over input `x` and output `y`: weights `[o, i]`, every
/// other axis of size 1 or the same pixel axes in the same order on both
/// sides, the channels first or last.
fn pointwise_axes(einsum: &EinSum, x: &[usize], y: &[usize], ci: usize, co: usize) -> Option<(Layout, Layout, usize)> {
    let (inputs, outputs) = einsum.axes.to_strs();
    let (xs, ws, ys) = (inputs.first()?, inputs.get(1)?, outputs.first()?);
    let (xs, ws, ys): (Vec<char>, Vec<char>, Vec<char>) = (xs.chars().collect(), ws.chars().collect(), ys.chars().collect());
    if inputs.len() != 2 || xs.len() != x.len() || ws.len() != 2 || ys.len() != y.len() {
        return None;
    }
    let (o, i) = (ws[0], ws[1]);
    if xs.contains(&o) || !xs.contains(&i) || ys.contains(&i) || !ys.contains(&o) {
        return None;
    }
    let live = |s: &[char], d: &[usize]| -> Vec<char> { s.iter().zip(d).filter(|(_, &n)| n != 1).map(|(&c, _)| c).collect() };
    let (xl, yl) = (live(&xs, x), live(&ys, y));
    let pixels_x: Vec<char> = xl.iter().copied().filter(|&c| c != i).collect();
    let pixels_y: Vec<char> = yl.iter().copied().filter(|&c| c != o).collect();
    if pixels_x != pixels_y || ci < 2 || co < 2 {
        return None;
    }
    let pixels = x.iter().product::<usize>() / ci;
    let layout = |l: &[char], c: char| -> Option<Layout> {
        if l.last() == Some(&c) {
            Some(Layout::PixelMajor)
        } else if l.first() == Some(&c) {
            Some(Layout::ChannelMajor)
        } else {
            None
        }
    };
    Some((layout(&xl, i)?, layout(&yl, o)?, pixels))
}

#[cfg(test)]
mod tests {
    use super::int8_weights;

    #[test]
    fn weights_with_a_raised_scale_or_all_zero_are_int8_steps() {
        // Row 0 spans ±127 steps of 0.01; row 1 only ±25 steps of 0.003 (a
        // raised scale; also ±125 steps of 0.0006, but the coarsest scale
        // that fits comes first); row 2 is zero; row 3 is not steps of any
        // scale. [1.27, 0.64] is not 2 and 1 steps of 0.635 (0.64 is 0.005
        // from 0.635, half a step of 0.01): every value is kept within a
        // hundredth of the finest step.
        let w = [1.27, -0.5, 0.01, 0.075, -0.003, 0.069, 0.0, 0.0, 0.0, 1.0, 0.5037, 0.3];
        let (q, s) = int8_weights(&w[..9], 3).unwrap();
        assert_eq!(q, [127, -50, 1, 25, -1, 23, 0, 0, 0]);
        for (k, (&q, &w)) in q.iter().zip(&w[..9]).enumerate() {
            assert!((f32::from(q) * s[k / 3] - w).abs() <= 1e-6, "{k}: {q} × {} ≠ {w}", s[k / 3]);
        }
        assert!(int8_weights(&w, 4).is_none());
        let (q, s) = int8_weights(&[1.27, 0.64, 0.0], 1).unwrap();
        for (&q, w) in q.iter().zip([1.27f32, 0.64, 0.0]) {
            assert!((f32::from(q) * s[0] - w).abs() <= 1e-4, "{q} × {} ≠ {w}", s[0]);
        }
    }
}
