//! The features' pooling as one graft pass: `Σ x^p` over each channel of the last feature map.
//!
//! Both pools graft's models end with sum the last map's channel planes: the average
//! (`Reduce<Sum>`, then a scale) and GeM's generalised mean with `p = 3` (`x·x·x`, the products
//! [`super::quant::integer_powers`] made of tract's `powf`, then the same sum, scale and cube
//! root). tract ran the cube as two passes over the 1280 × 7 × 7 map (`Square`, then `Mul`)
//! and the sum as a third, each on one thread: on two threads 0.06 ms of a 3.5 ms frame, 2%,
//! and the square read a map the other core had half written. [`fuse_pow_sums`] makes the
//! powers and the sum one operator, [`GraftPowSum`], that reads each value once and splits the
//! channels over the backbone's threads as the 1×1 convolution before it split them (each
//! thread then reads what it wrote). Each channel is summed in the order tract's sum used
//! (ndarray's eight-way unrolled fold), with the products tract computed: the same bits.

use std::ops::Range;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Mul, Square};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

use super::depthwise::replace_with;
use super::simd::{par_parts, SharedOut};

/// `Σ x^power` over the last two axes of a float tensor (kept, of size 1, as `Reduce` keeps
/// them), `power` 1, 2 or 3.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GraftPowSum {
    /// 1 (a plain sum), 2 or 3.
    pub power: u8,
}

impl Op for GraftPowSum {
    fn name(&self) -> StaticName {
        "GraftPowSum".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "sum of x^{} over each channel plane",
            self.power
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GraftPowSum {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "GraftPowSum takes one input");
        let x = inputs[0].try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let shape = inputs[0].shape();
        ensure!(shape.len() >= 3, "GraftPowSum: rank {} < 3", shape.len());
        let plane: usize = shape[shape.len() - 2..].iter().product();
        let rows = x.len().checked_div(plane).unwrap_or(0);
        let mut out_shape: TVec<usize> = shape.into();
        let rank = out_shape.len();
        out_shape[rank - 2] = 1;
        out_shape[rank - 1] = 1;
        let mut out = vec![0f32; rows];
        let dst = SharedOut(out.as_mut_ptr());
        let power = self.power;
        par_parts(
            rows,
            rows * plane * power as usize,
            |range: Range<usize>| {
                let dst = dst.ptr();
                for r in range {
                    let sum = match power {
                        1 => pow_sum::<1>(&x[r * plane..(r + 1) * plane]),
                        2 => pow_sum::<2>(&x[r * plane..(r + 1) * plane]),
                        _ => pow_sum::<3>(&x[r * plane..(r + 1) * plane]),
                    };
                    // SAFETY: `r < rows`, and each part writes only its own rows.
                    unsafe { *dst.add(r) = sum };
                }
            },
        );
        Ok(tvec!(Tensor::from_shape(&out_shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for GraftPowSum {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        let mut shape = inputs[0].shape.to_tvec();
        let rank = shape.len();
        ensure!(rank >= 3, "GraftPowSum: rank {rank} < 3");
        shape[rank - 2] = 1.into();
        shape[rank - 1] = 1.into();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// `x^P` as tract computed it: `x`, `Square` (`x·x`), or `Square` then `Mul` by `x`.
#[inline(always)]
fn pow<const P: u8>(v: f32) -> f32 {
    match P {
        1 => v,
        2 => v * v,
        _ => v * v * v,
    }
}

/// `Σ row[i]^P` in the order of ndarray's `unrolled_fold`, which tract's `Reduce<Sum>` runs
/// over a contiguous plane: eight partial sums over runs of eight, combined as
/// `((p0 + p4) + (p1 + p5)) + ...`, then the last few values one by one.
fn pow_sum<const P: u8>(row: &[f32]) -> f32 {
    let mut p = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (s, &v) in p.iter_mut().zip(c) {
            *s += pow::<P>(v);
        }
    }
    let mut acc = 0f32;
    acc += p[0] + p[4];
    acc += p[1] + p[5];
    acc += p[2] + p[6];
    acc += p[3] + p[7];
    for &v in chunks.remainder() {
        acc += pow::<P>(v);
    }
    acc
}

/// Speaks tract's types: for the backbone, not graft's API.
#[doc(hidden)]
/// Replaces each `Reduce<Sum>` over the last two axes of a float tensor, with the `x·x` or
/// `x·x·x` before it (tract's `Square`, and `Mul` by `x`, each read only by the next), by
/// [`GraftPowSum`]. Returns how many.
pub fn fuse_pow_sums(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(reduce) = node.op_as::<Reduce>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        let rank = fact.rank();
        if reduce.reducer != Reducer::Sum
            || fact.datum_type != f32::datum_type()
            || rank < 3
            || reduce.axes[..] != [rank - 2, rank - 1]
            || fact.shape.as_concrete().is_none()
        {
            continue;
        }
        let only_reader =
            |o: OutletId| model.outlet_successors(o).len() == 1 && !model.outputs.contains(&o);
        let square_of = |o: OutletId| -> Option<OutletId> {
            let n = &model.nodes[o.node];
            let is_square = n
                .op_as::<ElementWiseOp>()
                .is_some_and(|e| e.0.is::<Square>() && e.1.is_none());
            (is_square && n.inputs.len() == 1 && only_reader(o)).then(|| n.inputs[0])
        };
        let mut x = node.inputs[0];
        let mut power = 1u8;
        if only_reader(x) {
            let n = &model.nodes[x.node];
            let is_mul = n
                .op_as::<TypedBinOp>()
                .is_some_and(|b| b.0.is::<Mul>() && b.1.is_none());
            if is_mul && n.inputs.len() == 2 {
                let (a, b) = (n.inputs[0], n.inputs[1]);
                let same = |o: OutletId| -> TractResult<bool> {
                    Ok(model.outlet_fact(o)?.shape == fact.shape)
                };
                if square_of(a) == Some(b) && same(b)? {
                    (x, power) = (b, 3);
                } else if square_of(b) == Some(a) && same(a)? {
                    (x, power) = (a, 3);
                }
            } else if let Some(input) = square_of(x) {
                (x, power) = (input, 2);
            }
        }
        replace_with(model, x, id, GraftPowSum { power }, "graft-pow-sum")?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::simd::seeded_uniform;
    use tract_onnx::tract_core::ops::math::{mul, square};

    /// `x`, `x²` and `x³` summed over planes of 49, 50, 8 and 3 values, on one thread and
    /// three: tract's bits, from one operator where tract ran one to three.
    #[test]
    fn pow_sums_give_tracts_bits() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        for (c, h, w) in [(40, 7, 7), (7, 5, 10), (3, 2, 4), (5, 1, 3)] {
            for power in [1u8, 2, 3] {
                let mut m = TypedModel::default();
                let x = m.add_source("x", f32::fact([1, c, h, w])).unwrap();
                let y = match power {
                    1 => x,
                    2 => m.wire_node("sq", square(), &[x]).unwrap()[0],
                    _ => {
                        let sq = m.wire_node("sq", square(), &[x]).unwrap()[0];
                        m.wire_node("cube", mul(), &[sq, x]).unwrap()[0]
                    }
                };
                let s = m
                    .wire_node("sum", Reduce::new(tvec![2, 3], Reducer::Sum), &[y])
                    .unwrap();
                m.select_output_outlets(&s).unwrap();
                let mut seed = (c * h * w) as u64 + power as u64;
                let data = seeded_uniform(&mut seed, c * h * w, 3.0);
                let input = || {
                    tvec!(Tensor::from_shape(&[1, c, h, w], &data)
                        .unwrap()
                        .into_tvalue())
                };
                let run = |m: TypedModel| -> Vec<f32> {
                    let out = m.into_runnable().unwrap().run(input()).unwrap();
                    assert_eq!(out[0].shape(), &[1, c, 1, 1]);
                    let out = out[0].try_as_plain_ram().unwrap();
                    out.as_slice::<f32>().unwrap().to_vec()
                };
                let want = run(m.clone().into_optimized().unwrap());
                let mut ours = m;
                assert_eq!(fuse_pow_sums(&mut ours).unwrap(), 1);
                assert_eq!(
                    ours.nodes
                        .iter()
                        .filter(|n| n.op_is::<GraftPowSum>())
                        .count(),
                    1
                );
                // The powers went into it: only the source, the sum and nothing else.
                assert_eq!(ours.nodes.len(), 2, "x^{power}: {ours}");
                let ours = ours.into_optimized().unwrap();
                for threads in [1, 3] {
                    let got = multithread_tract_scope(Executor::multithread(threads), || {
                        run(ours.clone())
                    });
                    let (a, b): (Vec<u32>, Vec<u32>) = (
                        got.iter().map(|v| v.to_bits()).collect(),
                        want.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert_eq!(a, b, "x^{power} over {c}x{h}x{w}, {threads} threads");
                }
            }
        }
    }

    /// A power read by something else too stays tract's: only the sum is graft's.
    #[test]
    fn a_power_read_elsewhere_is_left_in_place() {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 4, 3, 3])).unwrap();
        let sq = m.wire_node("sq", square(), &[x]).unwrap()[0];
        let s = m
            .wire_node("sum", Reduce::new(tvec![2, 3], Reducer::Sum), &[sq])
            .unwrap()[0];
        m.select_output_outlets(&[s, sq]).unwrap();
        assert_eq!(fuse_pow_sums(&mut m).unwrap(), 1);
        let op = m
            .nodes
            .iter()
            .find_map(|n| n.op_as::<GraftPowSum>())
            .unwrap();
        assert_eq!(op.power, 1);
    }
}
