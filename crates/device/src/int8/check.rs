//! The integer ops against plain reference loops (i64 sums over signed
//! coordinates, the input zero point subtracted per value, the
//! requantization written out again), over both layouts, channel tails,
//! strides, padding, 1×1 spatial inputs, residuals, clamps and zero
//! points: the op as planned (this CPU's kernel) and the portable loops
//! must equal the reference exactly. The unit tests run these cases, and
//! so does `tern-device selftest` (how the aarch64 kernels are checked
//! under qemu-user).

use tract_onnx::tract_core::internal::*;

use super::{QAdd, QDepthwise, QPointwise, Requant};
use crate::fused::{Geometry, Layout};

/// Deterministic int8 values over the whole range.
fn bytes(n: usize, seed: u32) -> Vec<i8> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 24) as u8 as i8
        })
        .collect()
}

/// Requantization parameters for `co` channels summing `terms` products:
/// multipliers that spread the outputs over the int8 range.
fn requant(co: usize, terms: usize, residual: bool, zero_point: i32, clamp: (i8, i8)) -> Requant {
    let b = bytes(co, 9);
    Requant {
        multiplier: (0..co).map(|c| (1.0 + (c % 7) as f32 / 3.0) / (terms as f32).sqrt() / 160.0).collect(),
        bias: b.iter().map(|&v| i32::from(v) * 37).collect(),
        zero_point,
        residual: residual.then_some((0.73, -5)),
        clamp,
    }
}

/// The requantization of a sum `acc` (bias included), written out.
fn reference_requant(acc: i64, m: f32, r: Option<(i8, f32, i32)>, zy: i32, clamp: (i8, i8)) -> i8 {
    let mut v = acc as i32 as f32 * m;
    if let Some((r, mr, zr)) = r {
        v += (i32::from(r) - zr) as f32 * mr;
    }
    let v = v.clamp(-1024.0, 1024.0).round_ties_even() as i32 + zy;
    v.clamp(i32::from(clamp.0), i32::from(clamp.1)) as i8
}

/// Runs every case; the number of cases checked, or the first mismatch.
pub fn all() -> TractResult<usize> {
    Ok(epilogue()? + pointwise()? + depthwise()? + add()?)
}

/// The channel-last 1×1 tiles of this ISA that [`all`] checks on this CPU,
/// each forced in turn, and those it skips (the CPU lacks them), in words.
pub fn variants() -> String {
    let (run, skip): (Vec<_>, Vec<_>) = super::pointwise::rows_kernels().into_iter().partition(|k| k.available());
    let names = |v: Vec<super::pointwise::RowsKernel>| v.iter().map(|k| k.name()).collect::<Vec<_>>().join("; ");
    if skip.is_empty() {
        format!("channel-last tiles checked: {}", names(run))
    } else {
        format!("channel-last tiles checked: {}; skipped (not on this CPU): {}", names(run), names(skip))
    }
}

/// The vector epilogue against [`Requant::apply`] and the written-out
/// reference: runs of every length up to 40 (whole steps and tails), lanes
/// along channels and along one channel, with and without a residual,
/// accumulators that round at ties, saturate the clamp and pass ±LIMIT.
pub(super) fn epilogue() -> TractResult<usize> {
    use super::epilogue::Lanes;
    let co = 48;
    let mut n = 0;
    for (residual, zy, clamp) in [(false, -128, (-128, 127)), (true, 5, (-128, 127)), (true, -3, (-90, 100))] {
        let mut rq = requant(co, 64, residual, zy, clamp);
        // Ties: a multiplier of 1/2 or 1/4 on odd sums gives .5 exactly.
        rq.multiplier[1] = 0.5;
        rq.multiplier[2] = 0.25;
        let b = bytes(4 * co, 21);
        let acc: Vec<i32> = b.chunks(4).enumerate().map(|(j, q)| match j % 4 {
            0 => i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]) >> 14,
            1 => i32::from(q[0]) * 3 + 1,
            2 => i32::from(q[0]) * 1000,
            _ => i32::from(q[0]) * 61 - 7,
        }).collect();
        let r = bytes(co, 22);
        for len in 0..=40 {
            for lanes in [Lanes::Channels(co - len), Lanes::Channels(0), Lanes::Channel(1), Lanes::Channel(2), Lanes::Channel(7)] {
                let (a, res) = (&acc[..len], residual.then_some(&r[..len]));
                let mut got = vec![0i8; len];
                rq.run(a, lanes, res, &mut got);
                for (j, &g) in got.iter().enumerate() {
                    let c = match lanes {
                        Lanes::Channels(c0) => c0 + j,
                        Lanes::Channel(c) => c,
                    };
                    let s = i64::from(a[j]) + i64::from(rq.bias[c]);
                    let want = reference_requant(s, rq.multiplier[c], rq.residual.map(|(m, z)| (r[j], m, z)), zy, clamp);
                    let by_apply = rq.apply(a[j], c, r[j]);
                    ensure!(g == want && by_apply == want, "epilogue {lanes:?} of {len} at {j}: {g}, apply {by_apply}, reference {want}");
                }
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Residual adds: every pair of int8 values, zero points and multipliers
/// that saturate and that do not.
pub(super) fn add() -> TractResult<usize> {
    let all: Vec<i8> = (-128..=127).collect();
    let (a, b): (Vec<i8>, Vec<i8>) = all.iter().flat_map(|&x| all.iter().map(move |&y| (x, y))).unzip();
    let mut n = 0;
    for (ma, za, mb, zb, zy) in [(0.5f32, -128, 0.75f32, 3, -5), (1.7, 10, 0.2, -128, 0), (0.31, 0, 0.29, 0, 127)] {
        let op = QAdd { a: (ma, za), b: (mb, zb), zero_point: zy, shape: tvec![a.len()] };
        op.check()?;
        let got = op.eval(&EvalContext::out_of_plan(), tvec![tensor1(&a).into_tvalue(), tensor1(&b).into_tvalue()])?;
        let got = got[0].try_as_plain_ram()?.as_slice::<i8>()?;
        for (k, ((&x, &y), &g)) in a.iter().zip(&b).zip(got).enumerate() {
            let v = (i32::from(x) - za) as f32 * ma + (i32::from(y) - zb) as f32 * mb;
            let want = (v.clamp(-1024.0, 1024.0).round_ties_even() as i32 + zy).clamp(-128, 127) as i8;
            ensure!(g == want, "{op:?} at {k} ({x} + {y}): {g}, reference {want}");
        }
        // Offset and shortened: the vector steps off alignment, and a tail.
        let mut part = vec![0i8; a.len() - 21];
        op.compute(&a[5..], &b[5..], &mut part, true);
        ensure!(part[..] == got[5..a.len() - 16], "{op:?}: the offset run differs from the whole");
        n += 1;
    }
    Ok(n)
}

/// 1×1 convolutions.
pub(super) fn pointwise() -> TractResult<usize> {
    use Layout::*;
    let mut n = 0;
    let shapes = [(16, 96, 61), (24, 40, 13), (3, 8, 1), (32, 16, 64), (144, 24, 7), (5, 33, 130), (96, 24, 3136), (7, 72, 9), (130, 200, 6), (66, 17, 23)];
    for (ci, co, pixels) in shapes {
        for (i, o) in [(ChannelMajor, ChannelMajor), (PixelMajor, PixelMajor), (ChannelMajor, PixelMajor), (PixelMajor, ChannelMajor)] {
            for (residual, zx, zy, clamp) in [(false, -128, -128, (-128, 127)), (true, 7, 3, (-128, 127)), (false, -20, 0, (-100, 90))] {
                pointwise_case(ci, co, pixels, i, o, residual, zx, zy, clamp)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
fn pointwise_case(ci: usize, co: usize, pixels: usize, i: Layout, o: Layout, residual: bool, zx: i32, zy: i32, clamp: (i8, i8)) -> TractResult<()> {
    let (x, w, r) = (bytes(pixels * ci, 1), bytes(ci * co, 2).iter().map(|&v| v.max(-127)).collect::<Vec<i8>>(), bytes(pixels * co, 4));
    let rq = requant(co, ci, residual, zy, clamp);
    let at = |l: Layout, p: usize, c: usize, channels: usize| match l {
        PixelMajor => p * channels + c,
        ChannelMajor => c * pixels + p,
    };
    use Layout::*;
    let mut want = vec![0i8; pixels * co];
    for p in 0..pixels {
        for c in 0..co {
            let mut acc = i64::from(rq.bias[c]);
            for k in 0..ci {
                acc += (i64::from(x[at(i, p, k, ci)]) - i64::from(zx)) * i64::from(w[c * ci + k]);
            }
            let y = at(o, p, c, co);
            let res = rq.residual.map(|(m, z)| (r[y], m, z));
            want[y] = reference_requant(acc, rq.multiplier[c], res, zy, clamp);
        }
    }
    let shape = match o {
        PixelMajor => tvec![pixels, co],
        ChannelMajor => tvec![co, pixels],
    };
    let op = QPointwise::new(ci, co, pixels, i, o, shape.clone(), &w, zx, rq)?;
    let mut inputs = tvec![Tensor::from_shape(&[pixels * ci], &x)?.into_tvalue()];
    if residual {
        inputs.push(Tensor::from_shape(&shape, &r)?.into_tvalue());
    }
    let got = op.eval(&EvalContext::out_of_plan(), inputs)?;
    let got = got[0].try_as_plain_ram()?.as_slice::<i8>()?.to_vec();
    let rows = if o == PixelMajor { pixels } else { co };
    let mut portable = vec![0i8; pixels * co];
    op.compute_portable(&x, residual.then_some(&r[..]), &mut portable, (0, rows));
    let case = format!("{op:?} zx {zx} zy {zy} clamp {clamp:?}");
    compare(&case, &got, &portable, &want, clamp)?;
    if i == ChannelMajor && o == ChannelMajor {
        // The channel-major tiles without the ISA's kernel.
        op.channel_major_with(&x, residual.then_some(&r[..]), &mut portable, (0, co), false);
        compare(&format!("{case}, portable tiles"), &got, &portable, &want, clamp)?;
    }
    if i == PixelMajor || o == PixelMajor {
        // The direct paths (no transposes) with and without the ISA's
        // tiles, whole and split at an output row that is no multiple of a
        // block.
        let (rows, row) = if o == PixelMajor { (pixels, co) } else { (co, pixels) };
        let cut = rows / 3;
        for kernel in [false, true] {
            let res = residual.then_some(&r[..]);
            let (a, b) = portable.split_at_mut(cut * row);
            if i == PixelMajor {
                op.pixel_major_with(&x, res, a, (0, cut), kernel);
                op.pixel_major_with(&x, res, b, (cut, rows), kernel);
            } else {
                op.channel_to_pixel_with(&x, res, a, (0, cut), kernel);
                op.channel_to_pixel_with(&x, res, b, (cut, rows), kernel);
            }
            compare(&format!("{case}, direct (kernel: {kernel})"), &got, &portable, &want, clamp)?;
        }
        // Every channel-last tile this CPU runs, forced (on the input as
        // is, or transposed to channel-last as the op does).
        let xl: Vec<i8> = if i == PixelMajor { x.clone() } else { (0..pixels * ci).map(|j| x[(j % ci) * pixels + j / ci]).collect() };
        for tile in super::pointwise::rows_kernels().into_iter().filter(|k| k.available()) {
            let res = residual.then_some(&r[..]);
            portable.fill(0);
            let (a, b) = portable.split_at_mut(cut * row);
            let pl = QPointwise::new(ci, co, pixels, PixelMajor, o, shape.clone(), &w, zx, requant(co, ci, residual, zy, clamp))?;
            pl.pixel_major_by(&xl, res, a, (0, cut), Some(tile), true);
            pl.pixel_major_by(&xl, res, b, (cut, rows), Some(tile), true);
            compare(&format!("{case}, channel-last tile {}", tile.name()), &got, &portable, &want, clamp)?;
        }
    }
    Ok(())
}

/// Depthwise convolutions.
pub(super) fn depthwise() -> TractResult<usize> {
    // (c, h, w, kernel, strides, pad top/left, pad bottom/right)
    let cases = [
        (96, 12, 13, (3, 3), (2, 2), (0, 0), (1, 1)),
        (32, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
        (20, 7, 7, (5, 5), (1, 1), (2, 2), (2, 2)),
        (11, 10, 15, (5, 5), (2, 2), (1, 2), (2, 2)),
        (3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),
        (16, 3, 17, (1, 3), (1, 3), (0, 1), (0, 1)),
        (24, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
        (36, 6, 20, (3, 3), (1, 1), (1, 1), (1, 1)),
        (48, 7, 7, (5, 5), (1, 1), (2, 2), (2, 2)),
        (32, 8, 9, (5, 5), (2, 2), (1, 2), (2, 2)),
        (16, 1, 1, (5, 5), (1, 1), (2, 2), (2, 2)),
        (64, 5, 6, (3, 3), (2, 2), (0, 0), (1, 1)),
        (16, 2, 1, (1, 1), (4, 4), (3, 3), (0, 0)),
    ];
    let mut n = 0;
    for (c, h, w, kernel, strides, pad, after) in cases {
        let out = ((h + pad.0 + after.0 - kernel.0) / strides.0 + 1, (w + pad.1 + after.1 - kernel.1) / strides.1 + 1);
        let g = Geometry { c, h, w, kernel, strides, pad, out };
        for layout in [Layout::ChannelMajor, Layout::PixelMajor] {
            for (residual, zx, zy, clamp) in [(false, -128, -128, (-128, 127)), (true, 9, -3, (-128, 127)), (false, 0, 5, (-128, 100))] {
                depthwise_case(&g, layout, residual, zx, zy, clamp)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn depthwise_case(g: &Geometry, layout: Layout, residual: bool, zx: i32, zy: i32, clamp: (i8, i8)) -> TractResult<()> {
    let (kh, kw) = g.kernel;
    let len = g.out.0 * g.out.1 * g.c;
    let (x, k, r) = (bytes(g.h * g.w * g.c, 1), bytes(g.c * kh * kw, 2).iter().map(|&v| v.max(-127)).collect::<Vec<i8>>(), bytes(len, 4));
    let rq = requant(g.c, kh * kw, residual, zy, clamp);
    let xi = |y: usize, xx: usize, c: usize| match layout {
        Layout::PixelMajor => (y * g.w + xx) * g.c + c,
        Layout::ChannelMajor => (c * g.h + y) * g.w + xx,
    };
    let yi = |y: usize, xx: usize, c: usize| match layout {
        Layout::PixelMajor => (y * g.out.1 + xx) * g.c + c,
        Layout::ChannelMajor => (c * g.out.0 + y) * g.out.1 + xx,
    };
    let mut want = vec![0i8; len];
    for oy in 0..g.out.0 {
        for ox in 0..g.out.1 {
            for c in 0..g.c {
                let mut acc = i64::from(rq.bias[c]);
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (oy * g.strides.0 + ky) as isize - g.pad.0 as isize;
                        let ix = (ox * g.strides.1 + kx) as isize - g.pad.1 as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                            let v = i64::from(x[xi(iy as usize, ix as usize, c)]) - i64::from(zx);
                            acc += v * i64::from(k[(c * kh + ky) * kw + kx]);
                        }
                    }
                }
                let at = yi(oy, ox, c);
                let res = rq.residual.map(|(m, z)| (r[at], m, z));
                want[at] = reference_requant(acc, rq.multiplier[c], res, zy, clamp);
            }
        }
    }
    let shape = match layout {
        Layout::PixelMajor => tvec![g.out.0, g.out.1, g.c],
        Layout::ChannelMajor => tvec![g.c, g.out.0, g.out.1],
    };
    let op = QDepthwise::new(g.clone(), layout, shape.clone(), &k, zx, rq)?;
    let mut inputs = tvec![Tensor::from_shape(&[x.len()], &x)?.into_tvalue()];
    if residual {
        inputs.push(Tensor::from_shape(&shape, &r)?.into_tvalue());
    }
    let got = op.eval(&EvalContext::out_of_plan(), inputs)?;
    let got = got[0].try_as_plain_ram()?.as_slice::<i8>()?.to_vec();
    let mut portable = vec![0i8; len];
    let res = residual.then_some(&r[..]);
    match layout {
        Layout::PixelMajor => op.pixel_major(&x, res, &mut portable, (0, g.out.0), false),
        Layout::ChannelMajor => op.channel_major(&x, res, &mut portable, (0, g.c), false),
    }
    let case = format!("{op:?} zx {zx} zy {zy} clamp {clamp:?}");
    compare(&case, &got, &portable, &want, clamp)?;
    if layout == Layout::PixelMajor {
        // Over the padded input, with and without the ISA's kernel, whole
        // and split at an output row.
        let xp = op.padded(&x);
        let cut = g.out.0 / 3;
        for kernel in [false, true] {
            let (a, b) = portable.split_at_mut(cut * g.out.1 * g.c);
            op.pixel_major_padded(&xp, res, a, (0, cut), kernel);
            op.pixel_major_padded(&xp, res, b, (cut, g.out.0), kernel);
            compare(&format!("{case}, padded (kernel: {kernel})"), &got, &portable, &want, clamp)?;
        }
    }
    Ok(())
}

/// The op's outputs and its loops' equal to the reference, and the case
/// not degenerate: at least 16 distinct output levels strictly inside
/// the clamp (one per eight outputs in small cases; none asked of cases
/// under 64 outputs).
fn compare(case: &str, kernel: &[i8], portable: &[i8], want: &[i8], clamp: (i8, i8)) -> TractResult<()> {
    ensure!(kernel.len() == want.len() && portable.len() == want.len(), "{case}: output lengths differ");
    for (k, ((g, p), e)) in kernel.iter().zip(portable).zip(want).enumerate() {
        ensure!(g == e, "{case} at {k}: kernel {g}, reference {e}");
        ensure!(p == e, "{case} at {k}: portable {p}, reference {e}");
    }
    let levels: std::collections::HashSet<i8> = want.iter().copied().filter(|&v| v > clamp.0 && v < clamp.1).collect();
    ensure!(want.len() < 64 || levels.len() >= 16.min(want.len() / 8), "{case}: only {} output levels inside the clamp", levels.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pointwise_every_layout_tail_residual_and_clamp_equals_plain_loops() {
        super::pointwise().unwrap();
    }

    #[test]
    fn depthwise_every_layout_stride_padding_residual_and_clamp_equals_plain_loops() {
        super::depthwise().unwrap();
    }

    #[test]
    fn vector_epilogue_equals_apply_at_ties_tails_and_clamps() {
        super::epilogue().unwrap();
    }

    #[test]
    fn residual_add_of_every_pair_equals_the_formula() {
        super::add().unwrap();
    }

    #[test]
    fn pointwise_threads_split_rows_without_overlap() {
        use tract_onnx::tract_core::tract_linalg::multithread::{multithread_tract_scope, Executor};
        multithread_tract_scope(Executor::multithread(3), || {
            for (i, o) in [(super::Layout::ChannelMajor, super::Layout::ChannelMajor), (super::Layout::PixelMajor, super::Layout::PixelMajor)] {
                super::pointwise_case(64, 320, 3136, i, o, true, 3, -2, (-128, 127)).unwrap();
            }
        });
    }
}
