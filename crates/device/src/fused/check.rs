//! The fused ops against plain reference loops (f64 accumulation, index
//! arithmetic independent of the ops' offset tables), over every layout,
//! stride, padding, channel tail, residual and clamp the ops take: both the
//! kernel this CPU runs and the portable loops. The unit tests run these
//! cases, and so does `tern-device selftest`, which is how the aarch64
//! kernels are checked under qemu-user (whose threads hang the test
//! harness) and how a user checks a board.

use tract_onnx::tract_core::internal::*;

use super::conv::NR;
use super::{FusedConv, FusedDepthwise, Geometry, Input, Layout, Patches, Spec};

/// No clamp.
const NONE: (f32, f32) = (f32::NEG_INFINITY, f32::INFINITY);

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

/// Runs every case; the number of cases checked, or the first mismatch.
pub fn all() -> TractResult<usize> {
    Ok(pointwise()? + full()? + depthwise()?)
}

/// 1×1 convolutions: every input and output layout, channel and pixel
/// tails, residual and clamp.
pub(super) fn pointwise() -> TractResult<usize> {
    use Layout::*;
    let mut n = 0;
    for (ci, co, pixels) in [(16, 96, 61), (24, 40, 13), (3, 8, 6), (32, 16, 6), (144, 24, 7), (5, 33, 12)] {
        for (i, o) in [(PixelMajor, PixelMajor), (ChannelMajor, PixelMajor), (PixelMajor, ChannelMajor), (ChannelMajor, ChannelMajor)] {
            for (residual, clamp) in [(false, NONE), (true, NONE), (false, (0.0, 0.5))] {
                let out_shape = tvec![pixels, co];
                conv(Spec { ci, co, pixels, input: Input::Pointwise(i), output: o, out_shape, residual, clamp }, pixels * ci)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Full convolutions: both layouts, strides, asymmetric padding, kernels
/// that are not square.
pub(super) fn full() -> TractResult<usize> {
    use Layout::*;
    // (c, h, w, kernel, strides, pad top/bottom/left/right, co)
    let cases = [
        (3, 15, 15, (3, 3), (2, 2), (0, 1, 0, 1), 32),
        (3, 9, 11, (3, 3), (1, 1), (1, 1, 1, 1), 20),
        (5, 8, 7, (5, 5), (2, 1), (2, 2, 0, 3), 16),
        (2, 6, 6, (1, 3), (1, 2), (0, 0, 1, 1), 7),
    ];
    let mut n = 0;
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
                conv(spec, c * h * w)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// `x(p, k)` read from the unpadded input with plain index arithmetic
/// (zero outside it).
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
fn conv_reference(x: &[f32], w: &[f32], b: &[f32], res: Option<&[f32]>, spec: &Spec) -> Vec<f32> {
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

/// One [`FusedConv`] case: the op as it runs here (its kernel where the
/// CPU has one) and its portable loops against [`conv_reference`].
pub(super) fn conv(spec: Spec, inputs: usize) -> TractResult<()> {
    let (ci, co, pixels) = (spec.ci, spec.co, spec.pixels);
    let (x, w, b, r) = (values(inputs, 1), values(ci * co, 2), values(co, 3), values(pixels * co, 4));
    let op = FusedConv::new(spec.clone(), &w, &b)?;
    let want = conv_reference(&x, &w, &b, spec.residual.then_some(&r[..]), &spec);
    let mut tensors = tvec![Tensor::from_shape(&[inputs], &x)?.into_tvalue()];
    if spec.residual {
        tensors.push(Tensor::from_shape(&spec.out_shape, &r)?.into_tvalue());
    }
    let got = op.eval(&EvalContext::out_of_plan(), tensors)?;
    let got = got[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let padded = match &spec.input {
        Input::Pointwise(_) => x.clone(),
        Input::Patches(g) => g.pad_input(&x),
    };
    let mut portable = vec![f32::NAN; pixels * co];
    let rp = spec.residual.then_some(r.as_ptr());
    // SAFETY: `padded` is the op's (padded) input, `portable` and `r` hold
    // `pixels × co` values, and the ranges are the whole op.
    unsafe { op.compute_portable(padded.as_ptr(), rp, portable.as_mut_ptr(), (0, pixels), (0, co.div_ceil(NR))) };
    let tol = 1e-5 * (ci as f32).sqrt() * 4.0;
    compare(&format!("{spec:?}"), &got, &portable, &want, tol)?;
    // On a CPU with AVX-512 the op ran that kernel: the AVX2 one (what an
    // AVX2-only CPU runs) is checked too.
    let mut avx2 = vec![f32::NAN; pixels * co];
    // SAFETY: as for `compute_portable` above.
    if unsafe { op.compute_avx2(padded.as_ptr(), rp, avx2.as_mut_ptr(), (0, pixels), (0, co.div_ceil(NR))) } {
        compare(&format!("{spec:?} (AVX2 kernel)"), &avx2, &portable, &want, tol)?;
    }
    Ok(())
}

/// Depthwise convolutions: strides, padding on every side, borders,
/// channel counts that are not whole vectors, residual and clamp.
pub(super) fn depthwise() -> TractResult<usize> {
    // (c, h, w, kernel, strides, pad top/left, pad bottom/right)
    let cases = [
        (96, 12, 13, (3, 3), (2, 2), (0, 0), (1, 1)),
        (32, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
        (20, 7, 7, (5, 5), (1, 1), (2, 2), (2, 2)),
        (11, 10, 15, (5, 5), (2, 2), (1, 2), (2, 2)),
        (3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),
        (16, 3, 17, (1, 3), (1, 3), (0, 1), (0, 1)),
        (36, 6, 20, (3, 3), (1, 1), (1, 1), (1, 1)),
        (8, 9, 21, (3, 3), (2, 1), (1, 1), (1, 1)),
    ];
    let mut n = 0;
    for (c, h, w, kernel, strides, pad, after) in cases {
        let out = ((h + pad.0 + after.0 - kernel.0) / strides.0 + 1, (w + pad.1 + after.1 - kernel.1) / strides.1 + 1);
        let g = Geometry { c, h, w, kernel, strides, pad, out };
        for (residual, clamp) in [(false, (0.0f32, 6.0f32)), (true, NONE)] {
            let len = out.0 * out.1 * c;
            let (x, k, b, r) = (values(h * w * c, 1), values(c * kernel.0 * kernel.1, 2), values(c, 3), values(len, 4));
            let op = FusedDepthwise::new(g.clone(), tvec![out.0, out.1, c], &k, &b, residual, clamp)?;
            let want = depthwise_reference(&x, &k, &b, residual.then_some(&r[..]), &g, clamp);
            let mut inputs = tvec![Tensor::from_shape(&[h, w, c], &x)?.into_tvalue()];
            if residual {
                inputs.push(Tensor::from_shape(&[out.0, out.1, c], &r)?.into_tvalue());
            }
            let got = op.eval(&EvalContext::out_of_plan(), inputs)?;
            let got = got[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
            let mut portable = vec![f32::NAN; len];
            // SAFETY: `x` holds `h × w × c` values, `portable` and `r`
            // `oh × ow × c`, and the rows are the whole output.
            unsafe { op.compute_portable(x.as_ptr(), residual.then_some(r.as_ptr()), portable.as_mut_ptr(), 0, out.0) };
            compare(&format!("{g:?}"), &got, &portable, &want, 2e-5)?;
            n += 1;
            if strides.1 == 1 {
                depthwise_planes(&g, (&x, &k, &b, &r), residual, clamp, &want)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// One depthwise case channel-first (the channel-last case's values and
/// expected output, transposed).
fn depthwise_planes(g: &Geometry, (x, k, b, r): (&[f32], &[f32], &[f32], &[f32]), residual: bool, clamp: (f32, f32), want: &[f32]) -> TractResult<()> {
    let c = g.c;
    let planes = |v: &[f32]| -> Vec<f32> {
        let pixels = v.len() / c;
        let mut t = vec![0f32; v.len()];
        for (i, &e) in v.iter().enumerate() {
            t[(i % c) * pixels + i / c] = e;
        }
        t
    };
    let (x, r, want) = (planes(x), planes(r), planes(want));
    let op = FusedDepthwise::new(g.clone(), tvec![c, g.out.0, g.out.1], k, b, residual, clamp)?.channel_first()?;
    let mut inputs = tvec![Tensor::from_shape(&[c, g.h, g.w], &x)?.into_tvalue()];
    if residual {
        inputs.push(Tensor::from_shape(&[c, g.out.0, g.out.1], &r)?.into_tvalue());
    }
    let got = op.eval(&EvalContext::out_of_plan(), inputs)?;
    let got = got[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let mut portable = vec![f32::NAN; want.len()];
    // SAFETY: `x` holds `c × h × w` values, `portable` and `r` `c × oh × ow`.
    unsafe { op.planes_portable(x.as_ptr(), residual.then_some(r.as_ptr()), portable.as_mut_ptr()) };
    compare(&format!("{g:?} channel-first"), &got, &portable, &want, 2e-5)
}

/// Plain loops over signed coordinates, in f64.
fn depthwise_reference(x: &[f32], w: &[f32], b: &[f32], res: Option<&[f32]>, g: &Geometry, clamp: (f32, f32)) -> Vec<f32> {
    let (kh, kw) = g.kernel;
    let mut y = vec![0f32; g.out.0 * g.out.1 * g.c];
    for oy in 0..g.out.0 {
        for ox in 0..g.out.1 {
            for c in 0..g.c {
                let mut acc = b[c] as f64;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (oy * g.strides.0 + ky) as isize - g.pad.0 as isize;
                        let ix = (ox * g.strides.1 + kx) as isize - g.pad.1 as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                            let v = x[(iy as usize * g.w + ix as usize) * g.c + c] as f64;
                            acc += v * w[(c * kh + ky) * kw + kx] as f64;
                        }
                    }
                }
                let at = (oy * g.out.1 + ox) * g.c + c;
                if let Some(r) = res {
                    acc += r[at] as f64;
                }
                y[at] = (acc as f32).max(clamp.0).min(clamp.1);
            }
        }
    }
    y
}

/// The op's outputs and its portable loops' against the reference.
fn compare(case: &str, kernel: &[f32], portable: &[f32], want: &[f32], tol: f32) -> TractResult<()> {
    ensure!(kernel.len() == want.len() && portable.len() == want.len(), "{case}: output lengths differ");
    for (k, ((g, p), e)) in kernel.iter().zip(portable).zip(want).enumerate() {
        ensure!((g - e).abs() <= tol, "{case} at {k}: kernel {g}, reference {e}");
        ensure!((p - e).abs() <= tol, "{case} at {k}: portable {p}, reference {e}");
    }
    Ok(())
}
