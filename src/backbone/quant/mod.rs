//! graft's int8 path inside tract's plan, for static QDQ graphs (the `int8` manifest).
//!
//! tract 0.23.9 runs a QDQ graph's convolutions in float and every activation's
//! `QuantizeLinear → DequantizeLinear` pair as two scalar passes over memory, 62 pairs and 60%
//! of Lite0's int8 pass on x86 (`docs/performance.md`). graft changes two things, keeping the
//! graph's values:
//!
//! - [`fake_quant_pairs`] replaces each such pair by [`GraftFakeQuant`]: one vectorised pass,
//!   in place, giving the same values (`round_even`, saturate, scale back).
//! - A 1×1 convolution that reads such a pair's output, on a CPU with an integer kernel
//!   ([`kernel::Isa8::vectorised`]: AVX-512 VNNI), becomes [`GraftPointwiseQ8`]: the input is
//!   quantised back to `u8` as it is packed (exact: it is already on the pair's grid), the
//!   products are summed in `i32` from the `s8` weights the float constants were made of
//!   ([`recover_weights`]), and the epilogue scales, adds the bias, clamps and adds the
//!   residual as graft's float 1×1 kernel does ([`super::pointwise`] finds the chain).
//!
//! [`check_against_tract`] runs tract's plan and graft's on the same random quantised
//! convolutions and pairs: the tests call it, and so does `graft doctor`.

pub mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearU8};

use super::pointwise::{inputs_of, output_facts_of, sole_successor, Shape};
use super::simd::{par_parts, same_bits, seeded_uniform, threads};
pub use kernel::{Grid, Isa8};

thread_local! {
    /// The packed input of the integer 1×1 convolutions run from this thread, kept between
    /// them: each reuses the memory the one before just used (in cache), without allocating
    /// and clearing it.
    static PACKED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest [`PACKED`] buffer kept between convolutions (4 MiB; Lite0's largest packed
/// input is 0.45 MiB an image).
const KEPT_PACKED_WORDS: usize = 1 << 20;

/// A `QuantizeLinear → DequantizeLinear` pair (`u8`) run as one float pass, in place.
#[derive(Debug, Clone, PartialEq)]
pub struct GraftFakeQuant {
    /// `1 / s`, as tract's `QuantizeLinearU8` holds it.
    pub inv: f32,
    /// `s`, as tract's `DequantizeLinearF32` holds it.
    pub scale: f32,
    /// `zp`.
    pub zero_point: u8,
}

impl Eq for GraftFakeQuant {}

impl GraftFakeQuant {
    /// Its grid.
    pub fn grid(&self) -> Grid {
        Grid {
            inv: self.inv,
            scale: self.scale,
            zero_point: self.zero_point,
        }
    }
}

impl Op for GraftFakeQuant {
    fn name(&self) -> StaticName {
        "GraftFakeQuant".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "scale {} zero point {}",
            self.scale, self.zero_point
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GraftFakeQuant {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "GraftFakeQuant takes one input");
        // In place when this op holds the only reference (tract frees an activation once its
        // last reader has it).
        let mut t = inputs
            .into_iter()
            .next()
            .map(|v| v.into_tensor())
            .unwrap_or_default();
        {
            let mut view = t.try_as_plain_ram_mut()?;
            let x = view.as_slice_mut::<f32>()?;
            // On the running thread alone: a pass over memory, mostly just written by this
            // core (the image, a residual sum). Split over two threads the other core read
            // its half from this one's cache: the image's pass took 0.055 ms against 0.021
            // (2 threads, same process, alternating passes; a frame 0.024 ms faster).
            kernel::fake_quant(x, self.inv, self.scale, self.zero_point);
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for GraftFakeQuant {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }

    as_op!();
}

/// Replaces every `QuantizeLinearU8 → DequantizeLinearF32` pair of a decluttered model (a
/// float activation quantised and dequantised with the same zero point, the quantised tensor
/// read by nothing else) by [`GraftFakeQuant`]. Returns how many.
#[doc(hidden)]
pub fn fake_quant_pairs(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(q) = node
            .op_as::<ElementWiseOp>()
            .and_then(|e| e.0.downcast_ref::<QuantizeLinearU8>())
        else {
            continue;
        };
        if node.inputs.len() != 1
            || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type()
        {
            continue;
        }
        let outlet = OutletId::new(id, 0);
        let [succ] = model.outlet_successors(outlet) else {
            continue;
        };
        if model.outputs.contains(&outlet) {
            continue;
        }
        let next = &model.nodes[succ.node];
        let Some(dq) = next.op_as::<DequantizeLinearF32>() else {
            continue;
        };
        if dq.zero_point != q.zero_point as i32 {
            continue;
        }
        let op = GraftFakeQuant {
            inv: q.scale,
            scale: dq.scale,
            zero_point: q.zero_point,
        };
        let mut patch = TypedModelPatch::new(format!("graft-fake-quant {}", node.name));
        let x = patch.tap_model(model, node.inputs[0])?;
        let y = patch.wire_node(&next.name, op, &[x])?[0];
        patch.shunt_outside(model, OutletId::new(succ.node, 0), y)?;
        patch.apply(model)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Replaces every `x^2`, `x^3` and `x^4` of a decluttered float model (tract's `PowConst`, a
/// `powf` per value) by products (`Square`, then `Mul` by `x` or `Square` again), which tract
/// runs as vectorised passes. Returns how many. GeM pooling's cube of the last 7×7 map
/// (`[graph] gem_power = 3`, the default models) took 0.13 ms a frame on one thread, 2% of
/// the frame; the products give the cube within an ulp or two of `powf`'s.
#[doc(hidden)]
pub fn integer_powers(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::math::{mul, square, PowConst};
    let mut done = 0;
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(e) = node
            .op_as::<ElementWiseOp>()
            .and_then(|e| e.0.downcast_ref::<PowConst>())
            .map(|p| p.exponent)
        else {
            continue;
        };
        if !(e == 2.0 || e == 3.0 || e == 4.0)
            || node.inputs.len() != 1
            || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type()
        {
            continue;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("graft-integer-power {name}"));
        let x = patch.tap_model(model, node.inputs[0])?;
        let sq = patch.wire_node(format!("{name}.square"), square(), &[x])?[0];
        let y = match e as u8 {
            2 => sq,
            3 => patch.wire_node(format!("{name}.cube"), mul(), &[sq, x])?[0],
            _ => patch.wire_node(format!("{name}.square2"), square(), &[sq])?[0],
        };
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Folds every node of a decluttered model whose inputs are all constants into a constant
/// (returns how many). tract folds them too, but not past a 4 MiB output that is larger than
/// its inputs: so in a QDQ graph the classifier's `s8` matrix (1.3 MB, 5.1 MB once in floats)
/// was dequantised and packed again on every pass, 1.8 ms of Lite0's 7.
#[doc(hidden)]
pub fn fold_constants(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::ops::source::TypedSource;
    let mut done = 0;
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        if node.op_is::<Const>()
            || node.op_is::<TypedSource>()
            || node.outputs.len() != 1
            || node.inputs.is_empty()
            || model.outlet_fact(OutletId::new(id, 0))?.konst.is_some()
        {
            continue;
        }
        let inputs = model
            .node_input_facts(id)?
            .iter()
            .map(|f| f.konst.clone().map(|k| k.into_tvalue()))
            .collect::<Option<TVec<TValue>>>();
        let Some(inputs) = inputs else {
            continue;
        };
        let Ok(Some(mut out)) = node.op.eval_out_of_plan(inputs) else {
            continue;
        };
        let Some(value) = out.pop().filter(|_| out.is_empty()) else {
            continue;
        };
        let mut patch = TypedModelPatch::new(format!("graft-fold {}", node.name));
        let k = patch.add_const(&node.name, value.into_tensor())?;
        patch.shunt_outside(model, OutletId::new(id, 0), k)?;
        patch.apply(model)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Folds each [`GraftFakeQuant`] into the graft operator before it (an int8 1×1 convolution,
/// a depthwise or the stem) when it is that operator's only reader: the operator then puts its
/// output on the grid as it writes it, while it is in cache, and the pass over memory is gone.
/// The values are the same, bit for bit. Returns how many.
#[doc(hidden)]
pub fn fuse_fake_quant(model: &mut TypedModel) -> TractResult<usize> {
    use super::depthwise::GraftDepthwise;
    let mut done = 0;
    for id in model.eval_order()? {
        let Some(fq) = model.nodes[id].op_as::<GraftFakeQuant>() else {
            continue;
        };
        let grid = fq.grid();
        let input = model.nodes[id].inputs[0];
        if model.outputs.contains(&input)
            || model.outlet_successors(input).len() != 1
            || model.nodes[input.node].outputs.len() != 1
        {
            continue;
        }
        let producer = &model.nodes[input.node];
        let op: Box<dyn TypedOp> = if let Some(q8) = producer.op_as::<GraftPointwiseQ8>() {
            if q8.grid.is_some() {
                continue;
            }
            Box::new(GraftPointwiseQ8 {
                grid: Some(grid),
                ..q8.clone()
            })
        } else if let Some(d) = producer.op_as::<GraftDepthwise>() {
            match d.with_grid(grid) {
                Some(d) => Box::new(d),
                None => continue,
            }
        } else {
            continue;
        };
        let patch = TypedModelPatch::fuse_with_next(model, producer, op)?;
        patch.apply(model)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Folds each residual `Add` of an integer 1×1 convolution's fake-quantised output and the
/// [`GraftFakeQuant`] after it into that convolution ([`GraftPointwiseQ8`]'s `sum`): tract ran
/// the `Add` and graft the pair as two passes on one thread. Returns how many.
#[doc(hidden)]
pub fn fuse_residual_sums(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::math::Add;
    let mut done = 0;
    for id in model.eval_order()? {
        let Some(fq) = model.nodes[id].op_as::<GraftFakeQuant>() else {
            continue;
        };
        let sum_grid = fq.grid();
        let add_out = model.nodes[id].inputs[0];
        let add = &model.nodes[add_out.node];
        let is_add = add
            .op_as::<TypedBinOp>()
            .is_some_and(|b| b.0.is::<Add>() && b.1.is_none());
        if !is_add || add.inputs.len() != 2 || sole_successor(model, add_out.node).is_none() {
            continue;
        }
        // The convolution: an input of the `Add` read by nothing else, with its output on a
        // grid and no residual of its own.
        let found = (0..2).find_map(|slot| {
            let from = add.inputs[slot];
            let q8 = model.nodes[from.node].op_as::<GraftPointwiseQ8>()?;
            let alone = sole_successor(model, from.node).is_some();
            (alone && q8.grid.is_some() && !q8.residual && q8.sum.is_none())
                .then(|| (q8.clone(), from.node, add.inputs[1 - slot]))
        });
        let Some((q8, conv, other)) = found else {
            continue;
        };
        let fact = model.outlet_fact(other)?;
        if fact.datum_type != f32::datum_type()
            || fact.shape.as_concrete() != Some(&q8.out_shape[..])
            || model.outlet_fact(add_out)?.shape != fact.shape
        {
            continue;
        }
        let name = model.nodes[conv].name.clone();
        let mut patch = TypedModelPatch::new(format!("graft-residual-sum {name}"));
        let x = patch.tap_model(model, model.nodes[conv].inputs[0])?;
        let r = patch.tap_model(model, other)?;
        let op = GraftPointwiseQ8 {
            residual: true,
            sum: Some(sum_grid),
            ..q8
        };
        let out = patch.wire_node(name, op, &[x, r])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
        patch.apply(model)?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Has each integer 1×1 convolution whose input another one wrote by ranges of positions (its
/// tiles position-major: fewer than 64 output channels) pack that input by positions too, so
/// that on several threads each quantises the values its own core wrote (on two threads, read
/// by channel groups, half of every row came from the other core's cache: Lite0's expansions
/// after its projections packed slower on two threads than on one). Returns how many.
#[doc(hidden)]
pub fn align_packing(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let Some(q8) = model.nodes[id].op_as::<GraftPointwiseQ8>() else {
            continue;
        };
        let from = model.nodes[id].inputs[0].node;
        let by_positions = model.nodes[from]
            .op_as::<GraftPointwiseQ8>()
            .is_some_and(|p| !p.kernel().channel_major());
        if by_positions && !q8.pack_positions {
            let op = GraftPointwiseQ8 {
                pack_positions: true,
                ..q8.clone()
            };
            model.nodes[id].op = Box::new(op);
            done += 1;
        }
    }
    Ok(done)
}

/// Per output channel, the `s8` weights and scale a float `[cout][cin]` matrix was
/// dequantised from (`w = qw · sw`, symmetric, the largest |qw| 127, as onnxruntime's
/// quantiser makes them), or `None` if some channel is not exactly so.
pub fn recover_weights(w: &[f32], cin: usize, cout: usize) -> Option<(Vec<i8>, Vec<f32>)> {
    if w.len() != cin * cout || cin == 0 {
        return None;
    }
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(cout);
    for row in w.chunks_exact(cin) {
        let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if !m.is_finite() {
            return None;
        }
        // The largest |qw| is 127 unless the channel's scale hit the quantiser's floor (a
        // dead channel: onnxruntime then keeps a few levels): try 127 first, then fewer.
        let exact = |k: f32| -> Option<(f32, Vec<i8>)> {
            let s = m / k;
            let mut out = Vec::with_capacity(cin);
            for &v in row {
                let t = if s > 0.0 { v / s } else { 0.0 };
                let r = t.round();
                if (t - r).abs() > 1e-3 || r.abs() > 127.0 {
                    return None;
                }
                out.push(r as i8);
            }
            Some((s, out))
        };
        let (s, row_q) = (1..=127).rev().find_map(|k| exact(k as f32))?;
        q.extend(row_q);
        scales.push(s);
    }
    Some((q, scales))
}

/// A 1×1 convolution over a fake-quantised input, in integers ([`kernel::Quantized`]), with
/// its bias, clip and residual.
#[derive(Debug, Clone)]
pub struct GraftPointwiseQ8 {
    shape: Shape,
    hw: [usize; 2],
    in_shape: TVec<usize>,
    out_shape: TVec<usize>,
    /// [`kernel::pack_weights`]ed.
    weights: Arc<[i32]>,
    zp_sums: Arc<[i32]>,
    scales: Arc<[f32]>,
    bias: Arc<[f32]>,
    lo: f32,
    hi: f32,
    inv: f32,
    zero_point: u8,
    residual: bool,
    /// The fake quantisation that follows, folded in ([`fuse_fake_quant`]).
    grid: Option<Grid>,
    /// The residual added after `grid` and the sum fake-quantised on this grid
    /// ([`fuse_residual_sums`]).
    sum: Option<Grid>,
    isa: Isa8,
    /// Pack the input by positions ([`kernel::Quantized::pack_positions`]; set by
    /// [`align_packing`]).
    pack_positions: bool,
}

impl PartialEq for GraftPointwiseQ8 {
    fn eq(&self, o: &Self) -> bool {
        (
            self.shape,
            self.hw,
            self.isa,
            self.residual,
            self.zero_point,
            self.pack_positions,
        ) == (
            o.shape,
            o.hw,
            o.isa,
            o.residual,
            o.zero_point,
            o.pack_positions,
        ) && self.in_shape == o.in_shape
            && self.out_shape == o.out_shape
            && self.grid == o.grid
            && self.sum == o.sum
            && [self.lo, self.hi, self.inv].map(f32::to_bits)
                == [o.lo, o.hi, o.inv].map(f32::to_bits)
            && self.weights == o.weights
            && self.zp_sums == o.zp_sums
            && same_bits(&self.scales, &o.scales)
            && same_bits(&self.bias, &o.bias)
    }
}

impl Eq for GraftPointwiseQ8 {}

/// What a float 1×1 convolution found by [`super::pointwise`] is made of.
pub(crate) struct FloatPointwise<'a> {
    pub shape: Shape,
    pub hw: [usize; 2],
    pub in_shape: &'a [usize],
    pub out_shape: &'a [usize],
    /// `[cout][cin]`.
    pub weights: &'a [f32],
    /// `[cout]`.
    pub bias: &'a [f32],
    pub lo: f32,
    pub hi: f32,
    pub residual: bool,
}

impl GraftPointwiseQ8 {
    /// The integer form of `f` if its input is [`GraftFakeQuant`]'s output (`input`) and its
    /// weights are per-channel `s8` ([`recover_weights`]).
    pub(crate) fn of(
        model: &TypedModel,
        input: OutletId,
        f: &FloatPointwise,
        isa: Isa8,
    ) -> Option<GraftPointwiseQ8> {
        let fq = model.nodes[input.node].op_as::<GraftFakeQuant>()?;
        let s = f.shape;
        let (q, wscales) = recover_weights(f.weights, s.cin, s.cout)?;
        let (weights, sums) = kernel::pack_weights(&q, s.cin, s.cout);
        let padded = sums.len();
        let mut scales = vec![0f32; padded];
        let mut bias = vec![0f32; padded];
        for co in 0..s.cout {
            scales[co] = fq.scale * wscales[co];
            bias[co] = f.bias[co];
        }
        let zp = fq.zero_point as i32;
        let zp_sums: Vec<i32> = sums
            .iter()
            .map(|&v| kernel::zp_correction(isa, zp, v))
            .collect();
        Some(GraftPointwiseQ8 {
            shape: s,
            hw: f.hw,
            in_shape: f.in_shape.into(),
            out_shape: f.out_shape.into(),
            weights: weights.into(),
            zp_sums: zp_sums.into(),
            scales: scales.into(),
            bias: bias.into(),
            lo: f.lo,
            hi: f.hi,
            inv: fq.inv,
            zero_point: fq.zero_point,
            residual: f.residual,
            grid: None,
            sum: None,
            isa,
            pack_positions: false,
        })
    }

    fn kernel(&self) -> kernel::Quantized<'_> {
        kernel::Quantized {
            shape: self.shape,
            weights: &self.weights,
            zp_sums: &self.zp_sums,
            scales: &self.scales,
            bias: &self.bias,
            lo: self.lo,
            hi: self.hi,
            inv: self.inv,
            zero_point: self.zero_point,
            grid: self.grid,
            sum: self.sum,
            isa: self.isa,
            pack_positions: self.pack_positions,
        }
    }
}

impl Op for GraftPointwiseQ8 {
    fn name(&self) -> StaticName {
        "GraftPointwiseQ8".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let s = &self.shape;
        Ok(vec![format!(
            "{}->{}ch {}x{}, input zp {}, clip [{}, {}]{}, {}",
            s.cin,
            s.cout,
            self.hw[0],
            self.hw[1],
            self.zero_point,
            self.lo,
            self.hi,
            if self.residual { ", + residual" } else { "" },
            self.isa.name()
        )]
        .into_iter()
        .chain(self.grid.map(|g| g.describe()))
        .chain(
            self.sum
                .map(|g| format!("then + residual, {}", g.describe())),
        )
        .collect())
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for GraftPointwiseQ8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let s = self.shape;
        let (input, residual) = inputs_of("GraftPointwiseQ8", &inputs, &s, self.residual)?;
        let residual = residual.map(|r| r.as_ptr() as usize);
        let k = self.kernel();
        // SAFETY: every value is written below: the tiles cover every (image, channel,
        // position) once.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.out_shape)? };
        let out = output
            .try_as_plain_ram_mut()?
            .as_slice_mut::<f32>()?
            .as_mut_ptr() as usize;
        let x = input.as_ptr() as usize;
        // Taken out while in use (a run nested in this one, on this thread, gets an empty one).
        let mut packed = PACKED.take();
        // Every unit is packed before a tile reads it (`Claims`): no need to clear it.
        packed.resize(packed.len().max(kernel::packed_input_words(&s)), 0);
        let pk = packed.as_mut_ptr() as usize;
        let claims = kernel::Claims::new(k.units());
        let parts = threads().min(k.tiles()).max(1);
        par_parts(parts, s.macs(), |range| {
            for part in range {
                let io = (
                    x as *const f32,
                    pk as *mut u32,
                    residual.map(|r| r as *const f32),
                    out as *mut f32,
                );
                // SAFETY: lengths checked above; the claims are this run's; each part writes
                // its own tiles.
                unsafe { k.run_part(io, part, parts, &claims) };
            }
        });
        // Kept for the next convolution unless a large batch made it large.
        if packed.len() <= KEPT_PACKED_WORDS {
            PACKED.set(packed);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for GraftPointwiseQ8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        output_facts_of(
            "GraftPointwiseQ8",
            inputs,
            &self.in_shape,
            &self.out_shape,
            self.residual,
        )
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(i32::datum_type()),
            self.shape.macs().into()
        )))
    }

    as_op!();
}

/// One case [`check_against_tract`] ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The convolution (`cout` 0: a quantise/dequantise pair alone, over `cin × hw` values).
    pub shape: Shape,
    /// Largest |graft − tract| over the output, relative to the largest |tract| value (or,
    /// where tract's float sum rounds more than that, to it plus the sum of the output's
    /// terms' magnitudes); 0 for the pairs, which must match exactly.
    pub max_rel_error: f32,
}

/// Speaks tract's error type: graft's API is [`super::check_cpu_kernels`].
#[doc(hidden)]
/// Runs tract's plan and graft's on the same seeded random cases, and errors if they differ:
///
/// - `random` quantise/dequantise pairs over values that overflow the `u8` range both ways
///   (zero points 0, 128, 255 and random), which must match tract's exactly;
/// - `random` int8 1×1 convolutions (`x → QuantizeLinear → DequantizeLinear → Conv` with
///   per-channel `s8` weights, some channels with fewer than 127 levels, 2–40 channels in,
///   2–80 out, 4–400 positions, batch 1–3, with a ReLU6, a residual `Add`, both or nothing),
///   and with `lite0`, EfficientNet-Lite0's 19 shapes, on `isa`, within a relative 1e-5 of
///   tract's float sums.
pub fn check_against_tract(
    isa: Isa8,
    seed: u64,
    random: usize,
    lite0: bool,
) -> TractResult<Vec<Checked>> {
    use tract_onnx::tract_core::ops::quant::quantize_linear_u8;
    let mut s = seed;
    let mut next = |n: usize| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as usize) % n
    };
    let mut checked = Vec::new();
    // Pairs alone.
    for i in 0..random {
        let zp = match i % 4 {
            0 => 0u8,
            1 => 128,
            2 => 255,
            _ => next(256) as u8,
        };
        let scale = 0.01 + next(1000) as f32 / 997.0;
        let n = 1 + next(5000);
        let mut data_seed = seed ^ (i as u64 + 7).wrapping_mul(0x9E3779B97F4A7C15);
        // Values past both ends of the range, and some exactly on ties.
        let mut x = seeded_uniform(&mut data_seed, n, 300.0 * scale);
        for (j, v) in x.iter_mut().enumerate().step_by(7) {
            *v = (j as f32 - 100.0 + 0.5) * scale;
        }
        let mut model = TypedModel::default();
        let src = model.add_source("x", f32::fact([n]))?;
        let q = model.wire_node("q", quantize_linear_u8(scale.recip(), zp), &[src])?[0];
        let y = model.wire_node("dq", DequantizeLinearF32::new(scale, zp as i32), &[q])?[0];
        model.select_output_outlets(&[y])?;
        let model = model.into_decluttered()?;
        let input = tvec!(Tensor::from_shape(&[n], &x)?.into_tvalue());
        let want = model
            .clone()
            .into_optimized()?
            .into_runnable()?
            .run(input.clone())?;
        let mut ours = model;
        ensure!(
            fake_quant_pairs(&mut ours)? == 1,
            "graft's fake quantisation did not take the pair (zero point {zp})"
        );
        let got = ours.into_optimized()?.into_runnable()?.run(input)?;
        let (want, got) = (want[0].try_as_plain_ram()?, got[0].try_as_plain_ram()?);
        let (want, got) = (want.as_slice::<f32>()?, got.as_slice::<f32>()?);
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            ensure!(
                a == b,
                "graft's fake quantisation differs from tract's pair at {j} (x {}, scale {scale}, zero point {zp}): {a} vs {b}",
                x[j]
            );
        }
        checked.push(Checked {
            shape: Shape {
                batch: 1,
                cin: n,
                cout: 0,
                hw: 1,
            },
            max_rel_error: 0.0,
        });
    }
    // Convolutions.
    let mut cases: Vec<(Shape, [usize; 2], bool, bool)> = Vec::new();
    if lite0 {
        for (i, &(cin, cout, side, residual)) in super::pointwise::LITE0_SHAPES.iter().enumerate() {
            let shape = Shape::square(cin, cout, side);
            cases.push((shape, [side, side], !residual && i % 2 == 1, residual));
        }
    }
    for _ in 0..random {
        let (h, w) = (2 + next(19), 2 + next(19));
        let shape = Shape {
            batch: 1 + next(3),
            cin: 2 + next(39),
            cout: 2 + next(79),
            hw: h * w,
        };
        let t = next(4);
        cases.push((shape, [h, w], t & 1 == 1, t & 2 == 2));
    }
    for (i, (shape, [h, w], clip, residual)) in cases.into_iter().enumerate() {
        let sh = &shape;
        let mut data_seed = seed ^ (i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
        let zp = if i % 3 == 0 { 0u8 } else { next(256) as u8 };
        let xs = 0.02 + next(100) as f32 / 1000.0;
        let input = seeded_uniform(&mut data_seed, sh.batch * sh.cin * sh.hw, 300.0 * xs);
        // s8 weights: each channel's largest |q| 127, except every fifth channel's (the
        // floor a dead channel's scale hits), with a random scale per channel.
        let mut weights = Vec::with_capacity(sh.cout * sh.cin);
        for co in 0..sh.cout {
            let levels = if co % 5 == 4 { 1 + next(60) } else { 127 };
            let ws = 0.001 + next(1000) as f32 / 50_000.0;
            let at = next(sh.cin);
            for ci in 0..sh.cin {
                let q = if ci == at {
                    levels as i32 * if next(2) == 0 { 1 } else { -1 }
                } else {
                    next(2 * levels + 1) as i32 - levels as i32
                };
                weights.push(q as f32 * ws);
            }
        }
        let bias = seeded_uniform(&mut data_seed, sh.cout, 2.0);
        let res = seeded_uniform(&mut data_seed, sh.batch * sh.cout * sh.hw, 2.0);
        let model = quantised_conv(sh, [h, w], clip, residual, xs, zp, &weights, &bias)?;
        let mut inputs =
            tvec!(Tensor::from_shape(&[sh.batch, sh.cin, h, w], &input)?.into_tvalue());
        if residual {
            inputs.push(Tensor::from_shape(&[sh.batch, sh.cout, h, w], &res)?.into_tvalue());
        }
        let want = model
            .clone()
            .into_optimized()?
            .into_runnable()?
            .run(inputs.clone())?;
        let mut ours = model;
        ensure!(fake_quant_pairs(&mut ours)? == 1);
        let done =
            super::pointwise::substitute_with(&mut ours, super::simd::Isa::Scalar, Some(isa), 1)?;
        ensure!(
            done.integer == 1 && done.residuals == residual as usize,
            "graft's int8 1x1 convolution did not take {sh:?} (clip {clip}, residual {residual}): {done:?}"
        );
        let got = ours
            .clone()
            .into_optimized()?
            .into_runnable()?
            .run(inputs.clone())?;
        let (want, got) = (want[0].try_as_plain_ram()?, got[0].try_as_plain_ram()?);
        let (want, got) = (want.as_slice::<f32>()?, got.as_slice::<f32>()?);
        ensure!(got.len() == want.len(), "{sh:?}: output sizes");
        check_fused_grid(&ours, inputs.clone(), got, check_grid(i))?;
        check_packed_by_positions(&ours, inputs.clone(), got)?;
        if !residual {
            let grids = [check_grid(i), check_grid(i + 1)];
            check_fused_sum(&ours, inputs, got, &res, grids)?;
        }
        // graft's sums are exact integers; tract's are float sums of `cin` terms, whose
        // rounding grows with their magnitudes (a ReLU6 may clip an output of 6 out of sums
        // of hundreds): each output is allowed a relative 1e-5 of the largest output plus
        // 1e-6 of its own terms' magnitudes.
        let xq: Vec<f32> = input
            .iter()
            .map(|&v| (kernel::quantize(v, xs.recip(), zp as i32) as f32 - zp as f32) * xs)
            .collect();
        let magnitude = |j: usize| -> f32 {
            let (image, co, p) = (j / (sh.cout * sh.hw), (j / sh.hw) % sh.cout, j % sh.hw);
            (0..sh.cin)
                .map(|ci| (xq[(image * sh.cin + ci) * sh.hw + p] * weights[co * sh.cin + ci]).abs())
                .sum()
        };
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let mut worst = 0f32;
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            let diff = (a - b).abs();
            let rel = if diff <= 1e-5 * scale {
                diff / scale
            } else {
                let m = magnitude(j);
                ensure!(
                    diff <= 1e-5 * scale + 1e-6 * m,
                    "graft's int8 1x1 convolution ({}) differs from tract's on {sh:?} (zero point {zp}, clip {clip}, residual {residual}) at output {j}: {a} vs {b}",
                    isa.name()
                );
                diff / (scale + m)
            };
            ensure!(
                rel <= 1e-5,
                "graft's int8 1x1 convolution ({}) differs from tract's on {sh:?} (zero point {zp}, clip {clip}, residual {residual}) at output {j}: {a} vs {b}",
                isa.name()
            );
            worst = worst.max(rel);
        }
        checked.push(Checked {
            shape,
            max_rel_error: worst,
        });
    }
    Ok(checked)
}

/// Checks [`align_packing`]'s packing by positions on a model holding one
/// [`GraftPointwiseQ8`] that gave `plain` on `inputs` packed by groups: the same bits.
fn check_packed_by_positions(
    model: &TypedModel,
    inputs: TVec<TValue>,
    plain: &[f32],
) -> TractResult<()> {
    let mut m = model.clone();
    let id = m
        .nodes
        .iter()
        .position(|n| n.op_is::<GraftPointwiseQ8>())
        .context("no integer 1x1 convolution")?;
    let q8 = m.nodes[id].op_as::<GraftPointwiseQ8>().context("checked")?;
    let shape = q8.shape;
    m.nodes[id].op = Box::new(GraftPointwiseQ8 {
        pack_positions: true,
        ..q8.clone()
    });
    let got = m.into_optimized()?.into_runnable()?.run(inputs)?;
    let got = got[0].try_as_plain_ram()?;
    ensure!(
        same_bits(got.as_slice::<f32>()?, plain),
        "the int8 1x1 convolution {shape:?} packed by positions differs from packed by groups"
    );
    Ok(())
}

/// Checks [`fuse_fake_quant`] on a model whose output node is a graft convolution (after its
/// substitution) that gave `plain` on `inputs`: with a [`GraftFakeQuant`] of `grid` after it,
/// folded in, every output must be `grid` applied to `plain`, bit for bit.
pub(crate) fn check_fused_grid(
    model: &TypedModel,
    inputs: TVec<TValue>,
    plain: &[f32],
    grid: Grid,
) -> TractResult<()> {
    let mut m = model.clone();
    let out = m.output_outlets()?[0];
    let fq = GraftFakeQuant {
        inv: grid.inv,
        scale: grid.scale,
        zero_point: grid.zero_point,
    };
    let y = m.wire_node("fq", fq, &[out])?[0];
    m.select_output_outlets(&[y])?;
    ensure!(
        fuse_fake_quant(&mut m)? == 1,
        "the fake quantisation was not folded into {}",
        model.node(out.node).op.name()
    );
    let got = m.into_optimized()?.into_runnable()?.run(inputs)?;
    let got = got[0].try_as_plain_ram()?;
    let got = got.as_slice::<f32>()?;
    ensure!(got.len() == plain.len());
    for (j, (a, p)) in got.iter().zip(plain).enumerate() {
        let want = grid.one(*p);
        ensure!(
            a.to_bits() == want.to_bits() || (*a == 0.0 && want == 0.0),
            "{} with its fake quantisation folded in gives {a} at output {j}, the pair gives {want} (from {p})",
            model.node(out.node).op.name()
        );
    }
    Ok(())
}

/// Checks [`fuse_residual_sums`] on a model whose output node is a graft integer convolution
/// without a residual that gave `plain` on `inputs`: with a [`GraftFakeQuant`] of `grids[0]`,
/// the `Add` of `residual` (one more input) and a [`GraftFakeQuant`] of `grids[1]` after it,
/// all folded in, every output must be what the three give, bit for bit.
fn check_fused_sum(
    model: &TypedModel,
    mut inputs: TVec<TValue>,
    plain: &[f32],
    residual: &[f32],
    grids: [Grid; 2],
) -> TractResult<()> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::math::Add;
    let mut m = model.clone();
    let out = m.output_outlets()?[0];
    let shape: TVec<usize> = m
        .outlet_fact(out)?
        .shape
        .as_concrete()
        .context("a concrete output shape")?
        .into();
    let r = m.add_source("sum.residual", f32::fact(&shape))?;
    let fq = |g: Grid| GraftFakeQuant {
        inv: g.inv,
        scale: g.scale,
        zero_point: g.zero_point,
    };
    let y = m.wire_node("fq", fq(grids[0]), &[out])?[0];
    let y = m.wire_node("sum", TypedBinOp(Box::new(Add), None), &[y, r])?[0];
    let y = m.wire_node("sum.fq", fq(grids[1]), &[y])?[0];
    m.select_output_outlets(&[y])?;
    ensure!(
        fuse_fake_quant(&mut m)? == 1 && fuse_residual_sums(&mut m)? == 1,
        "the residual sum was not folded into {}",
        model.node(out.node).op.name()
    );
    ensure!(residual.len() == plain.len());
    inputs.push(Tensor::from_shape(&shape, residual)?.into_tvalue());
    let got = m.into_optimized()?.into_runnable()?.run(inputs)?;
    let got = got[0].try_as_plain_ram()?;
    let got = got.as_slice::<f32>()?;
    ensure!(got.len() == plain.len());
    for (j, ((a, p), r)) in got.iter().zip(plain).zip(residual).enumerate() {
        let sum = grids[0].one(*p) + r;
        let want = grids[1].one(sum);
        ensure!(
            a.to_bits() == want.to_bits() || (*a == 0.0 && want == 0.0),
            "{} with its residual sum folded in gives {a} at output {j}, the three passes give {want} (from {p} + {r})",
            model.node(out.node).op.name()
        );
    }
    Ok(())
}

/// A grid for the checks: ReLU6's (scale 6/255, zero point 0) or a zero point inside the
/// range, so that both ends saturate.
pub(crate) fn check_grid(i: usize) -> Grid {
    let (scale, zero_point) = if i.is_multiple_of(2) {
        (6.0 / 255.0, 0)
    } else {
        (0.011, 97)
    };
    Grid {
        inv: f32::recip(scale),
        scale,
        zero_point,
    }
}

/// A decluttered model of `x → QuantizeLinear → DequantizeLinear → Conv 1×1` (as tract-onnx
/// loads a QDQ graph, the weights already folded to floats), then a ReLU6 and a residual
/// `Add` if asked.
#[allow(clippy::too_many_arguments)]
fn quantised_conv(
    s: &Shape,
    [h, w]: [usize; 2],
    clip: bool,
    residual: bool,
    scale: f32,
    zp: u8,
    weights: &[f32],
    bias: &[f32],
) -> TractResult<TypedModel> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math::{Add, Max, Min};
    use tract_onnx::tract_core::ops::nn::DataFormat;
    use tract_onnx::tract_core::ops::quant::quantize_linear_u8;
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact([s.batch, s.cin, h, w]))?;
    let r = if residual {
        Some(model.add_source("residual", f32::fact([s.batch, s.cout, h, w]))?)
    } else {
        None
    };
    let q = model.wire_node("q", quantize_linear_u8(scale.recip(), zp), &[x])?[0];
    let x = model.wire_node("dq", DequantizeLinearF32::new(scale, zp as i32), &[q])?[0];
    let k = model.add_const(
        "kernel",
        Tensor::from_shape(&[s.cout, s.cin, 1, 1], weights)?,
    )?;
    let b = model.add_const("bias", Tensor::from_shape(&[s.cout], bias)?)?;
    let conv = Conv {
        pool_spec: PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![1, 1],
            padding: PaddingSpec::Valid,
            dilations: None,
            strides: None,
            input_channels: s.cin,
            output_channels: s.cout,
        },
        kernel_fmt: KernelFormat::OIHW,
        group: 1,
        q_params: None,
    };
    let mut y = model.wire_node("conv", conv, &[x, k, b])?[0];
    if clip {
        let zero = model.add_const("zero", Tensor::from_shape(&[1, 1, 1, 1], &[0f32])?)?;
        let six = model.add_const("six", Tensor::from_shape(&[1, 1, 1, 1], &[6f32])?)?;
        y = model.wire_node("relu6.min", TypedBinOp(Box::new(Max), None), &[y, zero])?[0];
        y = model.wire_node("relu6.max", TypedBinOp(Box::new(Min), None), &[y, six])?[0];
    }
    if let Some(r) = r {
        y = model.wire_node("add", TypedBinOp(Box::new(Add), None), &[y, r])?[0];
    }
    model.select_output_outlets(&[y])?;
    model.into_decluttered()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_integer_kernel_matches_tracts_quantised_1x1_convolution_and_pairs() {
        for isa in Isa8::available() {
            let checked = check_against_tract(isa, 31, 30, true).unwrap();
            assert_eq!(checked.len(), 30 + 19 + 30);
        }
    }

    /// Over three threads each takes a third of the packing units and of the tiles.
    #[test]
    fn integer_tiles_shared_by_three_threads_match_tract() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        for isa in Isa8::available() {
            let checked = multithread_tract_scope(Executor::multithread(3), || {
                check_against_tract(isa, 37, 10, true)
            })
            .unwrap();
            assert_eq!(checked.len(), 10 + 19 + 10);
        }
    }

    /// The parts of one run, on one thread and in any order, give `run`'s bits: a part
    /// packs what earlier parts left, and finds done what they packed.
    #[test]
    fn parts_run_in_any_order_give_the_same_bits() {
        for isa in Isa8::available() {
            for (cin, cout, hw, batch) in [(16, 96, 700, 1), (144, 24, 300, 2), (40, 70, 33, 3)] {
                let s = Shape {
                    batch,
                    cin,
                    cout,
                    hw,
                };
                let mut seed = (cin * cout + hw) as u64;
                let x: Vec<f32> = seeded_uniform(&mut seed, batch * cin * hw, 4.0);
                let q: Vec<i8> = (0..cin * cout).map(|i| ((i * 7919) % 255) as i8).collect();
                let (weights, sums) = kernel::pack_weights(&q, cin, cout);
                let n = sums.len();
                let zp_sums: Vec<i32> = sums
                    .iter()
                    .map(|&v| kernel::zp_correction(isa, 3, v))
                    .collect();
                let scales = vec![0.001f32; n];
                let bias = seeded_uniform(&mut seed, n, 1.0);
                for pack_positions in [false, true] {
                    let k = kernel::Quantized {
                        shape: s,
                        weights: &weights,
                        zp_sums: &zp_sums,
                        scales: &scales,
                        bias: &bias,
                        lo: -3.0,
                        hi: 3.0,
                        inv: 20.0,
                        zero_point: 3,
                        grid: None,
                        sum: None,
                        isa,
                        pack_positions,
                    };
                    let mut want = vec![0f32; batch * cout * hw];
                    k.run(&x, None, &mut want);
                    for parts in [2, 3, 5] {
                        let mut got = vec![f32::NAN; want.len()];
                        let mut packed = vec![0u32; kernel::packed_input_words(&s)];
                        let claims = kernel::Claims::new(k.units());
                        let io = (x.as_ptr(), packed.as_mut_ptr(), None, got.as_mut_ptr());
                        for part in (0..parts).rev() {
                            // SAFETY: full-length buffers, this CPU's ISA, one thread.
                            unsafe { k.run_part(io, part, parts, &claims) };
                        }
                        assert!(
                            same_bits(&got, &want),
                            "{} {s:?} by positions {pack_positions}, {parts} parts",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    /// `x^2`, `x^3`, `x^4` become products, within two ulps of `powf` (exactly `x·x·x` for
    /// the cube); another exponent stays tract's `PowConst`.
    #[test]
    fn integer_powers_become_products() {
        use tract_onnx::tract_core::ops::math::pow_const;
        let mut seed = 7;
        let x = seeded_uniform(&mut seed, 4 * 49, 8.0);
        for (e, replaced) in [(2.0f32, 1), (3.0, 1), (4.0, 1), (2.5, 0), (3.0001, 0)] {
            let mut m = TypedModel::default();
            let src = m.add_source("x", f32::fact([4, 49])).unwrap();
            let y = m.wire_node("pow", pow_const(e), &[src]).unwrap();
            m.select_output_outlets(&y).unwrap();
            let run = |m: TypedModel| -> Vec<f32> {
                let t = tract_ndarray::Array2::from_shape_vec((4, 49), x.clone()).unwrap();
                let out = m
                    .into_runnable()
                    .unwrap()
                    .run(tvec!(Tensor::from(t).into()))
                    .unwrap();
                let out = out[0].try_as_plain_ram().unwrap();
                out.as_slice::<f32>().unwrap().to_vec()
            };
            let want = run(m.clone());
            assert_eq!(integer_powers(&mut m).unwrap(), replaced, "x^{e}");
            let ops: Vec<String> = m.nodes.iter().map(|n| n.op.name().to_string()).collect();
            assert_eq!(
                ops.iter().any(|o| o == "PowConst"),
                replaced == 0,
                "{ops:?}"
            );
            let got = run(m);
            for ((a, b), v) in want.iter().zip(&got).zip(&x) {
                let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
                assert!(ulps <= 2, "x^{e} of {v}: {a} vs {b}");
                if e == 3.0 {
                    assert_eq!(b.to_bits(), (v * v * v).to_bits(), "{v}");
                }
            }
        }
    }

    #[test]
    fn weights_not_quantised_per_channel_stay_float() {
        // A channel whose values are no integer multiples of a common step.
        let w = [0.5f32, 0.3, 0.123_456, 1.0, 0.25, -0.5];
        assert!(recover_weights(&w, 3, 2).is_none());
        // Exact multiples: recovered, the largest |q| 127 where the step allows it.
        let w: Vec<f32> = [127i32, -3, 0, 4, -2, 1]
            .iter()
            .map(|&q| q as f32 * 0.01)
            .collect();
        let (q, s) = recover_weights(&w, 3, 2).unwrap();
        assert_eq!(&q[..3], &[127, -3, 0]);
        assert!((s[0] - 0.01).abs() < 1e-9);
        // The second channel's step is any that makes every value an integer multiple
        // (here 0.04 / 124: 124, -62, 31).
        for (j, &v) in w.iter().enumerate() {
            assert!((q[j] as f32 * s[j / 3] - v).abs() < 1e-6, "{j}");
        }
        assert!(q.iter().all(|&v| v != i8::MIN));
    }
}
