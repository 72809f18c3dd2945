//! Finds the convolutions Tern's fused ops take in a decluttered tract
//! graph, with the bias, residual and clamp that follow them alone, and
//! patches each into one fused op.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::conv::MR;
use super::{supported, FusedConv, FusedDepthwise, Geometry, Input, Layout, Patches, Spec};

/// Replaces, in a decluttered model, every f32 convolution the kernel takes
/// by a [`FusedConv`]: 1×1 convolutions (an `EinSum` of a constant `[co,
/// ci]` weight, channels first or last on each side) with the bias `Add`
/// after them, and 2-D convolutions of one group with constant `OIHW`
/// weights; in both cases with a residual `Add` and then `Max`/`Min` with
/// constants where they follow alone. Returns how many it replaced; none
/// where [`supported`] is false. Products over fewer than 6 positions
/// (matrix × vector, as in a classifier head) stay tract's, and so does a
/// convolution the matcher takes but whose fused op refuses it (its
/// `new()` returns an error): that node runs on tract's op.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !supported() {
        return Ok(0);
    }
    rewrite_with(model, &|found| found)
}

/// [`rewrite`], with `adjust` applied to each match before its op is built
/// (the tests make a build fail through it).
fn rewrite_with(model: &mut TypedModel, adjust: &dyn Fn(Found) -> Found) -> TractResult<usize> {
    let mut done = 0;
    // Nodes whose fused op refused them, by name (ids change as patches apply).
    let mut refused: std::collections::HashSet<String> = std::collections::HashSet::new();
    'again: loop {
        for id in model.eval_order()? {
            let node = model.node(id);
            if refused.contains(&node.name) {
                continue;
            }
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
                match fuse(model, node, adjust(found))? {
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
/// f32, 2-D, one group per channel, no dilation, a batch of one (or none),
/// constant weights and bias; channel-last, or channel-first with a column
/// stride of 1 (EfficientNet-Lite0's first depthwise layer, behind the
/// channel-first stem).
fn depthwise(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Found>> {
    let ps = &conv.pool_spec;
    let c = ps.input_channels;
    let planes = !ps.data_format.c_is_last();
    if c < 2 || conv.group != c || ps.output_channels != c || (planes && ps.strides()[1] != 1) {
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
        let op = FusedDepthwise::new(geometry, shape, w, &bias, residual, clamp)?;
        Ok(Box::new(if planes { op.channel_first()? } else { op }))
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
/// a bias `Add`, a residual `Add`, `Max` then `Min` with constants; `None`
/// when the fused op refuses the convolution, which then stays tract's.
fn fuse(model: &TypedModel, node: &TypedNode, found: Found) -> TractResult<Option<TypedModelPatch>> {
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
    let Ok(op) = build(bias, residual.is_some(), clamp) else { return Ok(None) };
    let mut patch = TypedModelPatch::new(format!("tern-fused-conv {}", node.name));
    let mut inputs = tvec![patch.tap_model(model, node.inputs[0])?];
    if let Some(r) = residual {
        inputs.push(patch.tap_model(model, r)?);
    }
    let name = model.node(last).name.clone();
    let wire = patch.wire_node(name, op, &inputs)?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), wire)?;
    Ok(Some(patch))
}

#[cfg(test)]
mod tests {
    use super::super::check::values;
    use super::*;

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
    fn a_convolution_its_fused_op_refuses_stays_on_tract() {
        // The 1×1 convolution of `rewritten_bias`, with a build that fails
        // as `FusedConv::new` does on weights it cannot take.
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([4usize, 8, 8])).unwrap();
        let w = m.add_const("w", Tensor::from_shape(&[8, 4], &values(32, 5)).unwrap()).unwrap();
        let einsum = EinSum { axes: "IHW,OI->HWO".parse().unwrap(), operating_dt: f32::datum_type(), q_params: None };
        let y = m.wire_node("conv", einsum, &[x, w]).unwrap()[0];
        m.select_output_outlets(&[y]).unwrap();
        let input = Tensor::from_shape(&[4, 8, 8], &values(256, 7)).unwrap();
        let run = |m: &TypedModel| {
            let out = m.clone().into_runnable().unwrap().run(tvec![input.clone().into_tvalue()]).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let want = run(&m);
        let refuse = |found: Found| Found {
            build: Box::new(|_, _, _| -> TractResult<Box<dyn TypedOp>> { Err(anyhow::anyhow!("refused by the op")) }),
            ..found
        };
        let n = rewrite_with(&mut m, &refuse).unwrap();
        assert_eq!(n, 0);
        assert_eq!(run(&m), want);
        let ops: Vec<String> = m.eval_order().unwrap().into_iter().map(|id| m.node(id).op.name().to_string()).collect();
        assert!(ops.iter().any(|o| o == "EinSum"), "{ops:?}");
        // And with the op's own build, it is fused (where the kernels run).
        let n = rewrite_with(&mut m, &|f| f).unwrap();
        assert_eq!(n, 1);
        let got = run(&m);
        assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() <= 1e-5));
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

}
