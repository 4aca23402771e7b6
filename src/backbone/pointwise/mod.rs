//! graft's own 1×1 convolution inside tract's plan.
//!
//! tract declutters a 1×1 `Conv` into an `EinSum` (`IHW,OI->OHW`), an `Add` of the bias, the
//! clip that follows and, at the end of a residual block, the `Add` of the block's input; its
//! codegen turns the einsum into a matrix product over packed activations. On the wide early
//! maps of EfficientNet-Lite0 that product ran at 6–18 GMAC/s (`docs/performance.md`).
//! [`substitute`] replaces each such chain, before tract's codegen sees it, by
//! [`GraftPointwise`], which runs [`kernel`]'s tiles over tract's own executor (the backbone's
//! threads) with bias, clip and residual fused.
//!
//! That includes Lite0's 7×7 stage, where a tile of 64 positions is a quarter padding: on one
//! thread tract's products and graft's kernel are even there, but tract does not split those
//! products over threads (a second thread gained them 0–20%), and graft's tiles split. [`check_against_tract`] runs tract's plan and
//! ours on the same random convolutions: the tests call it, and so does `graft doctor`.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;

use super::depthwise::{clip_after, then_clip};
use super::quant::{FloatPointwise, GraftPointwiseQ8, Isa8};
#[cfg(target_arch = "x86_64")]
use super::simd::threads;
use super::simd::{par_parts, same_bits, seeded_uniform, Isa, SharedOut, SharedPtr};
pub use kernel::Shape;

/// The smallest map (`h × w`) whose 1×1 convolutions graft's kernel takes over: every map.
/// (Measured on Lite0, one frame: with the 7×7 maps left to tract, 12.4 ms on one thread and
/// 8.6 on two; with them, 12.2 and 7.6.)
pub const MIN_POSITIONS: usize = 1;

/// A 1×1 convolution with its bias, clip and residual, run by graft's kernel.
#[derive(Debug, Clone)]
pub struct GraftPointwise {
    shape: Shape,
    /// The plane's `[h, w]`.
    hw: [usize; 2],
    /// The input's shape and the output's (and residual's): `[N, C, H, W]`, or `[C, H, W]`
    /// where tract dropped a batch axis of 1 (the two can differ).
    in_shape: TVec<usize>,
    out_shape: TVec<usize>,
    /// [`kernel::pack`]ed.
    weights: Arc<[f32]>,
    bias: Arc<[f32]>,
    lo: f32,
    hi: f32,
    /// A second input, added after the clip.
    residual: bool,
    /// With the residual, the sum clamped to `[lo, hi]`: in the `w8` graph, a residual
    /// block's output range (its quantisation pair made a `Max`/`Min` clip), which tract
    /// would otherwise run as a pass of its own on one thread.
    post: Option<[f32; 2]>,
    isa: Isa,
    /// Packed for the CPU's matrix unit ([`use_matrix_unit`]), which then runs it instead of
    /// the vector kernel (`weights` and `bias` are then empty).
    matrix: Option<Arc<MatrixWeights>>,
}

/// The weights of the matrix unit's kernel: AMX's ([`amx::Weights`]) on x86-64; no other
/// architecture has one graft uses.
#[cfg(target_arch = "x86_64")]
type MatrixWeights = amx::Weights;
#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug)]
enum MatrixWeights {}

/// A graft 1×1 convolution as plain numbers, for [`super::depthwise::fuse_expand`].
#[derive(Debug, Clone)]
pub(crate) struct PointwiseParts {
    pub shape: Shape,
    /// `[h, w]`.
    pub hw: [usize; 2],
    /// Its input's shape.
    pub in_shape: TVec<usize>,
    /// `[cout][cin]` and `[cout]`, unpacked.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    pub lo: f32,
    pub hi: f32,
}

impl GraftPointwise {
    /// The vector kernel's packed weights back as `[cout][cin]` (empty once on the matrix
    /// unit).
    fn unpacked_weights(&self) -> Vec<f32> {
        let s = self.shape;
        if self.matrix.is_some() {
            return Vec::new();
        }
        let rows = s.rows(self.isa);
        let mut weights = vec![0.0; s.cout * s.cin];
        for co in 0..s.cout {
            let (b, r) = (co / rows, co % rows);
            for ci in 0..s.cin {
                weights[co * s.cin + ci] = self.weights[(b * s.cin + ci) * rows + r];
            }
        }
        weights
    }

    /// This convolution's weights, bias and clip, unpacked (`None` if it adds a residual, or
    /// runs on the matrix unit).
    pub(crate) fn parts(&self) -> Option<PointwiseParts> {
        if self.residual || self.matrix.is_some() {
            return None;
        }
        let s = self.shape;
        let weights = self.unpacked_weights();
        Some(PointwiseParts {
            shape: s,
            hw: self.hw,
            in_shape: self.in_shape.clone(),
            weights,
            bias: self.bias[..s.cout].to_vec(),
            lo: self.lo,
            hi: self.hi,
        })
    }
}

impl PartialEq for GraftPointwise {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape
            && self.hw == other.hw
            && self.isa == other.isa
            && match (&self.matrix, &other.matrix) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
            && self.residual == other.residual
            && self.post.map(|p| p.map(f32::to_bits)) == other.post.map(|p| p.map(f32::to_bits))
            && self.in_shape == other.in_shape
            && self.out_shape == other.out_shape
            && self.lo.to_bits() == other.lo.to_bits()
            && self.hi.to_bits() == other.hi.to_bits()
            && same_bits(&self.weights, &other.weights)
            && same_bits(&self.bias, &other.bias)
    }
}

impl Eq for GraftPointwise {}

impl Op for GraftPointwise {
    fn name(&self) -> StaticName {
        "GraftPointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let s = &self.shape;
        Ok(vec![format!(
            "{}->{}ch {}x{}, clip [{}, {}]{}{}, {}",
            s.cin,
            s.cout,
            self.hw[0],
            self.hw[1],
            self.lo,
            self.hi,
            if self.residual { ", + residual" } else { "" },
            match self.post {
                Some([lo, hi]) => format!(", clip [{lo}, {hi}]"),
                None => String::new(),
            },
            if self.matrix.is_some() {
                MATRIX_UNIT
            } else {
                self.isa.name()
            }
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for GraftPointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let s = self.shape;
        let (input, residual) = inputs_of("GraftPointwise", &inputs, &s, self.residual)?;
        let residual = residual.map(|r| r.as_ptr());
        // SAFETY: every value is written below: the tiles cover every (image, channel,
        // position) once.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.out_shape)? };
        #[cfg(target_arch = "x86_64")]
        if let Some(weights) = &self.matrix {
            {
                let mut view = output.try_as_plain_ram_mut()?;
                let out = SharedOut(view.as_slice_mut::<f32>()?.as_mut_ptr());
                let m = amx::Matrix {
                    weights,
                    batch: s.batch,
                    hw: s.hw,
                    lo: self.lo,
                    hi: self.hi,
                    post: self.post.as_ref(),
                    threads: threads(),
                };
                let input = SharedPtr(input.as_ptr());
                let residual = residual.map(SharedPtr);
                let parts = m.k_parts();
                if parts > 1 {
                    // Each thread sums its own input channels, then they add up the output
                    // between them (`amx::Matrix::run_share`).
                    let shared = amx::Reduction::new(parts);
                    par_parts(parts, s.macs(), |range| {
                        let (out, input) = (out, input);
                        for first in range {
                            // SAFETY: lengths were checked above; the threads share `shared`.
                            unsafe {
                                m.run_share(input.0, residual.map(|r| r.0), out.0, first, &shared)
                            };
                        }
                    });
                    return Ok(tvec!(output.into_tvalue()));
                }
                // Each thread takes an equal run of consecutive items (`amx::Matrix::items`).
                par_parts(m.items(), s.macs(), |items| {
                    let (out, input) = (out, input);
                    // SAFETY: lengths were checked above; these items are this thread's alone.
                    unsafe { m.run_items(input.0, residual.map(|r| r.0), out.0, items) };
                });
            }
            return Ok(tvec!(output.into_tvalue()));
        }
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = SharedOut(view.as_slice_mut::<f32>()?.as_mut_ptr());
            let p = kernel::Pointwise {
                shape: s,
                weights: &self.weights,
                bias: &self.bias,
                lo: self.lo,
                hi: self.hi,
                post: self.post.as_ref(),
                isa: self.isa,
            };
            let input = SharedPtr(input.as_ptr());
            let residual = residual.map(SharedPtr);
            // Each thread takes an equal run of consecutive tiles, which share their weights
            // or their input positions (`Shape::channel_major`).
            par_parts(s.tiles(self.isa), s.macs(), |tiles| {
                let (out, input) = (out, input);
                // SAFETY: lengths were checked above; these tiles are this thread's alone.
                unsafe { p.run_tiles(input.0, residual.map(|r| r.0), out.0, tiles) };
            });
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for GraftPointwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        output_facts_of(
            "GraftPointwise",
            inputs,
            &self.in_shape,
            &self.out_shape,
            self.residual,
        )
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            self.shape.macs().into()
        )))
    }

    as_op!();
}

/// A 1×1 operator's output fact, its inputs' facts checked: float, `in_shape` and (the
/// residual, if it takes one) `out_shape`.
pub(crate) fn output_facts_of(
    op: &str,
    inputs: &[&TypedFact],
    in_shape: &[usize],
    out_shape: &[usize],
    residual: bool,
) -> TractResult<TVec<TypedFact>> {
    ensure!(inputs.len() == 1 + residual as usize);
    ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
    ensure!(
        inputs[0].shape.as_concrete() == Some(in_shape),
        "{op} expects {in_shape:?}, got {:?}",
        inputs[0].shape
    );
    if let Some(r) = inputs.get(1) {
        ensure!(r.shape.as_concrete() == Some(out_shape));
    }
    Ok(tvec!(f32::fact(out_shape)))
}

/// A 1×1 operator's input (`batch × cin × hw` floats) and, if it takes one, its residual
/// (`batch × cout × hw`), their counts checked.
pub(crate) fn inputs_of<'a>(
    op: &str,
    inputs: &'a [TValue],
    s: &Shape,
    residual: bool,
) -> TractResult<(&'a [f32], Option<&'a [f32]>)> {
    ensure!(
        inputs.len() == 1 + residual as usize,
        "{op} takes {} inputs",
        1 + residual as usize
    );
    let input = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
    ensure!(
        input.len() == s.batch * s.cin * s.hw,
        "{op} input has {} values, expected {}",
        input.len(),
        s.batch * s.cin * s.hw
    );
    let residual = match inputs.get(1) {
        Some(r) => {
            let r = r.try_as_plain_ram()?.as_slice::<f32>()?;
            ensure!(
                r.len() == s.batch * s.cout * s.hw,
                "{op} residual has {} values, expected {}",
                r.len(),
                s.batch * s.cout * s.hw
            );
            Some(r)
        }
        None => None,
    };
    Ok((input, residual))
}

/// A matrix–vector product with a constant matrix and its bias (a classifier over pooled
/// features, ONNX's `Gemm`), run by [`kernel::Gemv`] with its blocks split over threads.
#[derive(Debug, Clone)]
pub struct GraftGemv {
    n: usize,
    k: usize,
    /// [`kernel::pack_gemv`]ed.
    weights: Arc<[f32]>,
    bias: Arc<[f32]>,
    /// The input's shape (`k` values) and the output's (`n`).
    in_shape: TVec<usize>,
    out_shape: TVec<usize>,
    isa: Isa,
}

impl PartialEq for GraftGemv {
    fn eq(&self, other: &Self) -> bool {
        (self.n, self.k, self.isa) == (other.n, other.k, other.isa)
            && self.in_shape == other.in_shape
            && self.out_shape == other.out_shape
            && same_bits(&self.weights, &other.weights)
            && same_bits(&self.bias, &other.bias)
    }
}

impl Eq for GraftGemv {}

impl Op for GraftGemv {
    fn name(&self) -> StaticName {
        "GraftGemv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {}, {}",
            self.k,
            self.n,
            self.isa.name()
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for GraftGemv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "GraftGemv takes one input");
        let x = inputs[0].try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        ensure!(
            x.len() == self.k,
            "GraftGemv input has {} values, expected {}",
            x.len(),
            self.k
        );
        // SAFETY: every output is written: the blocks cover all `n`.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.out_shape)? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = SharedOut(view.as_slice_mut::<f32>()?.as_mut_ptr());
            let g = kernel::Gemv {
                n: self.n,
                k: self.k,
                weights: &self.weights,
                bias: &self.bias,
                isa: self.isa,
            };
            let x = SharedPtr(x.as_ptr());
            let mut blocks = vec![(); g.blocks()];
            tract_linalg::multithread::par_chunks_mut(
                &mut blocks,
                1,
                self.n * self.k,
                |first, chunk| {
                    let (out, x) = (out, x);
                    // SAFETY: lengths checked above; these blocks are this chunk's alone.
                    unsafe { g.run_blocks(x.0, out.0, first..first + chunk.len()) };
                    Ok(())
                },
            )?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for GraftGemv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        ensure!(inputs[0].shape.as_concrete() == Some(&self.in_shape[..]));
        Ok(tvec!(f32::fact(self.out_shape.clone())))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (self.n * self.k).into()
        )))
    }

    as_op!();
}

/// If node `id` is a matrix–vector product graft runs (an `EinSum` of a vector, every other
/// axis of size 1, with a constant `[n, k]` or `[k, n]` matrix, and the constant bias `Add` that
/// follows, if any): the op (scalar ISA) and the last node it replaces.
fn gemv_at(model: &TypedModel, id: usize) -> TractResult<Option<(GraftGemv, usize)>> {
    let node = &model.nodes[id];
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
    {
        return Ok(None);
    }
    let x = model.outlet_fact(node.inputs[0])?;
    let (Some(xs), Some(w)) = (
        x.shape.as_concrete(),
        model.outlet_fact(node.inputs[1])?.konst.clone(),
    ) else {
        return Ok(None);
    };
    let out_shape = model.outlet_fact(OutletId::new(id, 0))?.shape.clone();
    let Some(os) = out_shape.as_concrete().map(TVec::from) else {
        return Ok(None);
    };
    if x.datum_type != f32::datum_type() || w.datum_type() != f32::datum_type() || w.rank() != 2 {
        return Ok(None);
    }
    let (ins, outs) = einsum.axes.to_strs();
    let ([a, b], [c]) = (&ins[..], &outs[..]) else {
        return Ok(None);
    };
    let (a, b, c): (Vec<char>, Vec<char>, Vec<char>) = (
        a.chars().collect(),
        b.chars().collect(),
        c.chars().collect(),
    );
    // The contracted letter is the matrix's one the vector has; the other is the output's.
    let k_at = match (a.contains(&b[0]), a.contains(&b[1])) {
        (true, false) => 0,
        (false, true) => 1,
        _ => return Ok(None),
    };
    let (k_letter, n_letter) = (b[k_at], b[1 - k_at]);
    let (k, n) = (w.shape()[k_at], w.shape()[1 - k_at]);
    let size_of = |letters: &[char], shape: &[usize], l: char| {
        letters.iter().position(|&x| x == l).map(|i| shape[i])
    };
    let ones = |letters: &[char], shape: &[usize], keep: char| {
        letters.len() == shape.len()
            && letters
                .iter()
                .zip(shape)
                .all(|(&l, &d)| l == keep || d == 1)
    };
    if a.len() != xs.len()
        || size_of(&a, xs, k_letter) != Some(k)
        || !ones(&a, xs, k_letter)
        || size_of(&c, &os, n_letter) != Some(n)
        || !ones(&c, &os, n_letter)
        || c.contains(&k_letter)
        || k == 0
        || n == 0
    {
        return Ok(None);
    }
    let w = w.try_as_plain_ram()?;
    let w = w.as_slice::<f32>()?;
    let weights: Vec<f32> = if k_at == 1 {
        w.to_vec()
    } else {
        (0..n * k).map(|j| w[(j % k) * n + j / k]).collect()
    };
    let mut last = id;
    let mut bias = vec![0f32; n];
    if let Some((next, slot)) = sole_successor(model, id) {
        let nn = &model.nodes[next];
        let other = (nn.inputs.len() == 2).then(|| nn.inputs[1 - slot]);
        let is_add = nn
            .op_as::<TypedBinOp>()
            .is_some_and(|bin| bin.0.is::<Add>() && bin.1.is_none());
        if let (true, Some(other)) = (is_add, other) {
            let fact = model.outlet_fact(other)?;
            if let Some(kb) = fact.konst.as_ref() {
                if kb.datum_type() == f32::datum_type()
                    && kb.len() == n
                    && model.outlet_fact(OutletId::new(next, 0))?.shape == out_shape
                {
                    bias = kb.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
                    last = next;
                }
            }
        }
    }
    let op = GraftGemv {
        n,
        k,
        weights: kernel::pack_gemv(&weights, n, k).into(),
        bias: bias.into(),
        in_shape: xs.into(),
        out_shape: os,
        isa: Isa::Scalar,
    };
    Ok(Some((op, last)))
}

/// What [`substitute`] did to a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Substituted {
    /// 1×1 convolutions now run by graft's kernel.
    pub convolutions: usize,
    /// Of those, the ones run in integers ([`super::quant::GraftPointwiseQ8`]).
    pub integer: usize,
    /// Of those, the ones run on the CPU's matrix unit ([`use_matrix_unit`]).
    pub matrix: usize,
    /// Activation `QuantizeLinear → DequantizeLinear` pairs run as one pass
    /// ([`super::quant::GraftFakeQuant`]; QDQ graphs only).
    pub fake_quant_pairs: usize,
    /// Of those, the ones folded into the graft convolution that writes their input.
    pub fake_quant_fused: usize,
    /// `Max`/`Min` clips folded into them.
    pub clips: usize,
    /// Residual `Add`s folded into them.
    pub residuals: usize,
    /// Matrix–vector products (a classifier) now run by graft's kernel.
    pub products: usize,
    /// Poolings whose powers and sum run as one pass ([`super::pool::GraftPowSum`]).
    pub pools: usize,
}

/// Speaks tract's types: for the backbone and the benches, not graft's API.
#[doc(hidden)]
/// Replaces every float 1×1 convolution of a decluttered model over at least `min_positions`
/// positions (the `EinSum` tract made of it, with constant weights, and the bias `Add`, clips
/// and residual `Add` that follow) by [`GraftPointwise`].
pub fn substitute(
    model: &mut TypedModel,
    isa: Isa,
    min_positions: usize,
) -> TractResult<Substituted> {
    substitute_with(model, isa, None, min_positions)
}

/// Speaks tract's types: for the backbone and the benches, not graft's API.
#[doc(hidden)]
/// [`substitute`], and with `int8`, each 1×1 convolution that reads a
/// [`super::quant::GraftFakeQuant`] and has per-channel `s8` weights in integers
/// ([`super::quant::GraftPointwiseQ8`]).
pub fn substitute_with(
    model: &mut TypedModel,
    isa: Isa,
    int8: Option<Isa8>,
    min_positions: usize,
) -> TractResult<Substituted> {
    let mut done = Substituted::default();
    for id in model.eval_order()? {
        if id >= model.nodes.len() {
            continue;
        }
        if let Some((op, last)) = gemv_at(model, id)? {
            let node = &model.nodes[id];
            let name = node.name.clone();
            let mut patch = TypedModelPatch::new(format!("graft-gemv {name}"));
            let x = patch.tap_model(model, node.inputs[0])?;
            let out = patch.wire_node(name, GraftGemv { isa, ..op }, &[x])?[0];
            patch.shunt_outside(model, OutletId::new(last, 0), out)?;
            patch.apply(model)?;
            done.products += 1;
            continue;
        }
        let Some(found) = pointwise_at(model, id, min_positions)? else {
            continue;
        };
        let node = &model.nodes[id];
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("graft-pointwise {name}"));
        let mut taps = vec![patch.tap_model(model, node.inputs[0])?];
        if let Some(r) = found.residual {
            taps.push(patch.tap_model(model, r)?);
        }
        // Packed for the tiles this ISA runs on this map (`Shape::rows`).
        let (weights, bias) = kernel::pack(
            &found.weights,
            &found.bias,
            found.op.shape.cin,
            found.op.shape.cout,
            found.op.shape.rows(isa),
        );
        let op = GraftPointwise {
            isa,
            weights: weights.into(),
            bias: bias.into(),
            ..found.op
        };
        // The integer kernel has no clip after its residual (nor a graph that needs one: the
        // `int8` graph quantises the sum instead).
        let q8 = int8.filter(|_| op.post.is_none()).and_then(|i8isa| {
            let f = FloatPointwise {
                shape: op.shape,
                hw: op.hw,
                in_shape: &op.in_shape,
                out_shape: &op.out_shape,
                weights: &found.weights,
                bias: &found.bias,
                lo: op.lo,
                hi: op.hi,
                residual: op.residual,
            };
            GraftPointwiseQ8::of(model, node.inputs[0], &f, i8isa)
        });
        let out = match q8 {
            Some(q8) => {
                done.integer += 1;
                patch.wire_node(name, q8, &taps)?[0]
            }
            None => patch.wire_node(name, op, &taps)?[0],
        };
        patch.shunt_outside(model, OutletId::new(found.last, 0), out)?;
        patch.apply(model)?;
        done.convolutions += 1;
        done.clips += found.clips;
        done.residuals += found.residual.is_some() as usize;
    }
    if done.convolutions + done.products > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// How `info` names the matrix unit's kernel.
const MATRIX_UNIT: &str = "amx-bf16";

/// The fewest output channels a 1×1 convolution has for the matrix unit to run it. Its
/// tiles hold 32 output channels and it splits each input into two bfloat16 halves first: on
/// Lite0's 56×56 projections to 24 channels it ran 0.01–0.03 ms slower than the vector kernel
/// (AMX, one thread, `docs/performance.md`); from 40 channels on it ran faster.
const MATRIX_FROM_COUT: usize = 32;

/// Whether this CPU has a matrix unit graft's 1×1 kernel runs on: AMX-BF16 (x86-64, Linux).
pub fn matrix_unit() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        return Some(MATRIX_UNIT);
    }
    None
}

/// Speaks tract's types: for the backbone, not graft's API.
#[doc(hidden)]
/// Moves every [`GraftPointwise`] of `model` onto the CPU's matrix unit ([`matrix_unit`]),
/// but those of fewer than [`MATRIX_FROM_COUT`] output channels and those that feed a
/// depthwise convolution run row by row with nothing folded in yet: those are the expands
/// [`super::depthwise::fuse_expand`] runs inside it, whose numbers must not depend on whether
/// they are fused (`--cpu-kernels unfused`). Returns how many moved (0 without a unit).
pub fn use_matrix_unit(model: &mut TypedModel) -> TractResult<usize> {
    move_to_matrix(model, MATRIX_FROM_COUT)
}

/// [`use_matrix_unit`] for 1×1 convolutions of at least `from_cout` output channels.
fn move_to_matrix(model: &mut TypedModel, from_cout: usize) -> TractResult<usize> {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        let mut moved = 0;
        for id in 0..model.nodes.len() {
            let Some(op) = model.nodes[id].op_as::<GraftPointwise>() else {
                continue;
            };
            if op.matrix.is_some()
                || op.shape.cout < from_cout
                || super::depthwise::reads_rows(model, OutletId::new(id, 0))
            {
                continue;
            }
            let s = op.shape;
            let weights = op.unpacked_weights();
            let packed = amx::Weights::pack(&weights, &op.bias[..s.cout], s.cin, s.cout);
            let op = GraftPointwise {
                matrix: Some(Arc::new(packed)),
                weights: Arc::from([]),
                bias: Arc::from([]),
                ..op.clone()
            };
            model.nodes[id].op = Box::new(op);
            moved += 1;
        }
        return Ok(moved);
    }
    let _ = (model, from_cout);
    Ok(0)
}

struct Found {
    op: GraftPointwise,
    /// The convolution's `[cout][cin]` weights and `[cout]` bias, unpacked.
    weights: Vec<f32>,
    bias: Vec<f32>,
    clips: usize,
    residual: Option<OutletId>,
    last: usize,
}

/// The only node reading node `id`'s only output, when that output is not a model output.
pub(crate) fn sole_successor(model: &TypedModel, id: usize) -> Option<(usize, usize)> {
    let outlet = OutletId::new(id, 0);
    if model.outputs.contains(&outlet) || model.nodes[id].outputs.len() != 1 {
        return None;
    }
    match model.outlet_successors(outlet) {
        [inlet] => Some((inlet.node, inlet.slot)),
        _ => None,
    }
}

/// If node `id` is a 1×1 convolution's einsum graft runs: the op (scalar ISA), what it folds
/// and the last node it replaces.
fn pointwise_at(model: &TypedModel, id: usize, min_positions: usize) -> TractResult<Option<Found>> {
    let node = &model.nodes[id];
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
    {
        return Ok(None);
    }
    let x = model.outlet_fact(node.inputs[0])?;
    let kernel = model.outlet_fact(node.inputs[1])?;
    let (Some(xs), Some(k)) = (x.shape.as_concrete(), kernel.konst.clone()) else {
        return Ok(None);
    };
    if x.datum_type != f32::datum_type() || k.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let &[cout, cin] = k.shape() else {
        return Ok(None);
    };
    // `IHW,OI->OHW` or `NIHW,OI->NOHW`, whatever the letters; for a batch of 1 tract may also
    // drop the batch axis on one side only (`NIHW,OI->OHW`, `IHW,OI->NOHW`).
    let (ins, outs) = einsum.axes.to_strs();
    let ([a, b], [c]) = (&ins[..], &outs[..]) else {
        return Ok(None);
    };
    let (a, b, c): (Vec<char>, Vec<char>, Vec<char>) = (
        a.chars().collect(),
        b.chars().collect(),
        c.chars().collect(),
    );
    let (&[o, i], 3..=4, 3..=4) = (&b[..], a.len(), c.len()) else {
        return Ok(None);
    };
    let (a_n, a3) = a.split_at(a.len() - 3);
    let (c_n, c3) = c.split_at(c.len() - 3);
    let mut letters = a3.to_vec();
    letters.push(o);
    letters.sort_unstable();
    letters.dedup();
    let batch_kept = a_n.is_empty() || c_n.is_empty() || a_n == c_n;
    if a3[0] != i || c3 != [o, a3[1], a3[2]] || letters.len() != 4 || !batch_kept {
        return Ok(None);
    }
    let (batch, [ci, h, w]) = match *xs {
        [n, ci, h, w] => (n, [ci, h, w]),
        [ci, h, w] => (1, [ci, h, w]),
        _ => return Ok(None),
    };
    if ci != cin || h * w < min_positions || cin == 0 || cout == 0 || batch == 0 {
        return Ok(None);
    }
    let out_shape = model.outlet_fact(OutletId::new(id, 0))?.shape.clone();
    let Some(out_concrete) = out_shape.as_concrete().map(TVec::from) else {
        return Ok(None);
    };
    if out_concrete.iter().product::<usize>() != batch * cout * h * w {
        return Ok(None);
    }
    let same_shape = |n: usize| -> TractResult<bool> {
        Ok(model.outlet_fact(OutletId::new(n, 0))?.shape == out_shape)
    };
    // The bias: `Add` of a constant with one value per output channel (or one in all).
    let mut last = id;
    let mut bias = vec![0f32; cout];
    if let Some((next, slot)) = sole_successor(model, last) {
        let n = &model.nodes[next];
        if let (Some(bin), true) = (n.op_as::<TypedBinOp>(), n.inputs.len() == 2) {
            let other = model.outlet_fact(n.inputs[1 - slot])?;
            if let (true, None, Some(k)) = (bin.0.is::<Add>(), &bin.1, other.konst.as_ref()) {
                if k.datum_type() == f32::datum_type()
                    && (k.len() == cout || k.len() == 1)
                    && same_shape(next)?
                {
                    let v = k.try_as_plain_ram()?;
                    let v = v.as_slice::<f32>()?;
                    bias = if v.len() == cout {
                        v.to_vec()
                    } else {
                        vec![v[0]; cout]
                    };
                    last = next;
                }
            }
        }
    }
    if bias.iter().any(|b| !b.is_finite()) {
        return Ok(None);
    }
    let (mut range, mut clips) = ((f32::NEG_INFINITY, f32::INFINITY), 0);
    while let Some((is_max, bound, next)) = clip_after(model, last)? {
        range = then_clip(range, is_max, bound);
        last = next;
        clips += 1;
    }
    let (lo, hi) = range;
    // The residual: an `Add` of another tensor of the same shape.
    let mut residual = None;
    if let Some((next, slot)) = sole_successor(model, last) {
        let n = &model.nodes[next];
        let is_add = n
            .op_as::<TypedBinOp>()
            .is_some_and(|bin| bin.0.is::<Add>() && bin.1.is_none());
        if is_add && n.inputs.len() == 2 {
            let other = n.inputs[1 - slot];
            let fact = model.outlet_fact(other)?;
            if fact.konst.is_none()
                && fact.datum_type == f32::datum_type()
                && fact.shape == out_shape
                && same_shape(next)?
            {
                residual = Some(other);
                last = next;
            }
        }
    }
    // The sum's clip.
    let mut post = None;
    if residual.is_some() {
        let mut range = (f32::NEG_INFINITY, f32::INFINITY);
        while let Some((is_max, bound, next)) = clip_after(model, last)? {
            range = then_clip(range, is_max, bound);
            last = next;
            clips += 1;
        }
        if range != (f32::NEG_INFINITY, f32::INFINITY) {
            post = Some([range.0, range.1]);
        }
    }
    let raw = k.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let op = GraftPointwise {
        shape: Shape {
            batch,
            cin,
            cout,
            hw: h * w,
        },
        hw: [h, w],
        in_shape: xs.into(),
        out_shape: out_concrete,
        // Packed once the ISA is known (`substitute_with`).
        weights: Arc::from([]),
        bias: Arc::from([]),
        lo,
        hi,
        residual: residual.is_some(),
        post,
        isa: Isa::Scalar,
        matrix: None,
    };
    Ok(Some(Found {
        op,
        weights: raw,
        bias,
        clips,
        residual,
        last,
    }))
}

/// One convolution [`check_against_tract`] ran.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedShape {
    /// The convolution.
    pub shape: Shape,
    /// Largest |graft − tract| over the output, relative to the largest |tract| value.
    pub max_rel_error: f32,
}

/// EfficientNet-Lite0's 1×1 convolutions at 224×224: `(in, out, side, residual)`; the ones
/// without a residual are followed by a ReLU6 (expansions) or nothing (projections that
/// change the channel count), which the check alternates.
pub const LITE0_SHAPES: [(usize, usize, usize, bool); 19] = [
    (32, 16, 112, false),
    (16, 96, 112, false),
    (96, 24, 56, false),
    (24, 144, 56, false),
    (144, 24, 56, true),
    (144, 40, 28, false),
    (40, 240, 28, false),
    (240, 40, 28, true),
    (240, 80, 14, false),
    (80, 480, 14, false),
    (480, 80, 14, true),
    (480, 112, 14, false),
    (112, 672, 14, false),
    (672, 112, 14, true),
    (672, 192, 7, false),
    (192, 1152, 7, false),
    (1152, 192, 7, true),
    (1152, 320, 7, false),
    (320, 1280, 7, false),
];

/// What follows a convolution in a check: a ReLU6, the residual `Add`, both, or nothing;
/// with the `Add`, maybe a clip of the sum (the `w8` graph's residual blocks).
#[derive(Debug, Clone, Copy)]
struct Tail {
    clip: bool,
    residual: bool,
    post: bool,
}

/// Speaks tract's error type: graft's API is [`super::check_cpu_kernels`].
#[doc(hidden)]
/// Runs `random` seeded random 1×1 convolutions (2–40 channels in and out: tract declutters a
/// single channel into something else, maps of 4–400
/// positions, batch 1–3, each followed by a ReLU6, a residual `Add` (then maybe a clip of the
/// sum), both or nothing) and, with
/// `lite0`, EfficientNet-Lite0's 19 shapes, once through tract's own plan and once with graft's
/// kernel on `isa` (taking every size, whatever [`MIN_POSITIONS`] says). Errors if an output
/// differs by more than a relative 1e-5.
pub fn check_against_tract(
    isa: Isa,
    seed: u64,
    random: usize,
    lite0: bool,
) -> TractResult<Vec<CheckedShape>> {
    check_with(isa, false, seed, random, lite0)
}

/// [`check_against_tract`] for the matrix unit's kernel ([`matrix_unit`]), every convolution
/// on it whatever its channels; `None` where the CPU has no matrix unit.
pub fn check_matrix_against_tract(
    seed: u64,
    random: usize,
    lite0: bool,
) -> Option<TractResult<Vec<CheckedShape>>> {
    matrix_unit()?;
    Some(check_with(Isa::detect(), true, seed, random, lite0))
}

fn check_with(
    isa: Isa,
    matrix: bool,
    seed: u64,
    random: usize,
    lite0: bool,
) -> TractResult<Vec<CheckedShape>> {
    let kernel = if matrix { MATRIX_UNIT } else { isa.name() };
    let mut cases: Vec<(Shape, [usize; 2], Tail)> = Vec::new();
    if lite0 {
        for (i, &(cin, cout, side, residual)) in LITE0_SHAPES.iter().enumerate() {
            let shape = Shape::square(cin, cout, side);
            let clip = !residual && i % 2 == 1;
            let post = residual && i % 3 != 0;
            cases.push((
                shape,
                [side, side],
                Tail {
                    clip,
                    residual,
                    post,
                },
            ));
        }
    }
    let mut s = seed;
    let mut next = |n: usize| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as usize) % n
    };
    for _ in 0..random {
        let (h, w) = (2 + next(19), 2 + next(19));
        let shape = Shape {
            batch: 1 + next(3),
            cin: 2 + next(39),
            // Past `kernel::CHANNEL_MAJOR_FROM` too: both tile orders.
            cout: 2 + next(79),
            hw: h * w,
        };
        let t = next(8);
        let tail = Tail {
            clip: t & 1 == 1,
            residual: t & 2 == 2,
            post: t & 6 == 6,
        };
        cases.push((shape, [h, w], tail));
    }
    let mut checked = Vec::with_capacity(cases.len());
    for (i, (shape, [h, w], tail)) in cases.into_iter().enumerate() {
        let mut data_seed = seed ^ (i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
        let mut values = |n: usize| seeded_uniform(&mut data_seed, n, 2.0);
        let s = &shape;
        let input = values(s.batch * s.cin * s.hw);
        let weights = values(s.cout * s.cin);
        let bias = values(s.cout);
        let residual = values(s.batch * s.cout * s.hw);
        let mut inputs = tvec!(Tensor::from_shape(&[s.batch, s.cin, h, w], &input)?.into_tvalue());
        if tail.residual {
            inputs.push(Tensor::from_shape(&[s.batch, s.cout, h, w], &residual)?.into_tvalue());
        }
        // The outputs' range before a clip of the sum: the errors' scale (the largest |value|),
        // and where the sum's clip is put so that it cuts both ends (a quarter in from each).
        let range = |tail: Tail| -> TractResult<(f32, f32)> {
            let model = single_conv(s, [h, w], tail, &weights, &bias, [0.0; 2])?;
            let y = model
                .into_optimized()?
                .into_runnable()?
                .run(inputs.clone())?;
            let y = y[0].try_as_plain_ram()?;
            Ok(y.as_slice::<f32>()?
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                }))
        };
        let (lo, hi) = range(Tail {
            post: false,
            ..tail
        })?;
        let scale = lo.abs().max(hi.abs()).max(1e-6);
        let post = [lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo)];
        let model = single_conv(s, [h, w], tail, &weights, &bias, post)?;
        let reference = model.clone().into_optimized()?.into_runnable()?;
        let want = reference.run(inputs.clone())?;
        let mut ours = model;
        let done = substitute(&mut ours, isa, 1)?;
        let want_clips = 2 * tail.clip as usize + 2 * tail.post as usize;
        ensure!(
            done.convolutions == 1
                && done.clips == want_clips
                && done.residuals == tail.residual as usize,
            "graft's 1x1 convolution did not take {s:?} {tail:?} (substituted {done:?})"
        );
        if matrix {
            ensure!(
                move_to_matrix(&mut ours, 1)? == 1,
                "the matrix unit's 1x1 convolution did not take {s:?}"
            );
        }
        let ours = ours.into_optimized()?.into_runnable()?;
        let got = ours.run(inputs)?;
        let want = want[0].try_as_plain_ram()?;
        let want = want.as_slice::<f32>()?;
        let got = got[0].try_as_plain_ram()?;
        let got = got.as_slice::<f32>()?;
        ensure!(
            got.len() == want.len(),
            "{s:?}: {} outputs vs tract's {}",
            got.len(),
            want.len()
        );
        if tail.post {
            ensure!(
                want.contains(&post[0]) && want.contains(&post[1]),
                "{s:?} {tail:?}: the sum's clip {post:?} cuts nothing"
            );
        }
        let mut worst = 0f32;
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            let rel = (a - b).abs() / scale;
            // The matrix unit's bfloat16 halves keep 16 bits of each float, so each product
            // may be off by 2⁻¹⁶ of its size: bounded by the sum of |w·x| of this output.
            let bound = if matrix {
                let (p, co, n) = (j % s.hw, j / s.hw % s.cout, j / (s.hw * s.cout));
                let sum: f32 = (0..s.cin)
                    .map(|ci| (weights[co * s.cin + ci] * input[(n * s.cin + ci) * s.hw + p]).abs())
                    .sum();
                1e-5 + sum * 2f32.powi(-16) / scale
            } else {
                1e-5
            };
            ensure!(
                rel <= bound,
                "graft's 1x1 convolution ({kernel}) differs from tract's on {s:?} {tail:?} at output {j}: {a} vs {b}",
            );
            worst = worst.max(rel);
        }
        checked.push(CheckedShape {
            shape,
            max_rel_error: worst,
        });
    }
    // The matrix unit runs no matrix–vector product: those are the vector kernels' check.
    if matrix {
        return Ok(checked);
    }
    // Matrix–vector products: Lite0's classifier (1280 → 1000) and random ones, with the
    // matrix as `[n, k]` (ONNX's `Gemm` with `transB`) and as `[k, n]`.
    let mut products: Vec<(usize, usize, bool)> = Vec::new();
    if lite0 {
        products.push((1280, 1000, true));
    }
    for i in 0..random.div_ceil(6) {
        products.push((1 + next(300), 1 + next(200), i % 2 == 0));
    }
    for (i, (k, n, n_first)) in products.into_iter().enumerate() {
        let mut data_seed = seed ^ (i as u64 + 101).wrapping_mul(0x9E3779B97F4A7C15);
        let mut values = |len: usize| seeded_uniform(&mut data_seed, len, 2.0);
        let (x, w, bias) = (values(k), values(n * k), values(n));
        let mut model = TypedModel::default();
        let xs = model.add_source("x", f32::fact([k, 1, 1]))?;
        let (shape, axes) = if n_first {
            ([n, k], "kba,nk->mn")
        } else {
            ([k, n], "kba,kn->mn")
        };
        let wc = model.add_const("w", Tensor::from_shape(&shape, &w)?)?;
        let bc = model.add_const("b", Tensor::from_shape(&[1, n], &bias)?)?;
        let op = EinSum {
            axes: axes.parse()?,
            operating_dt: f32::datum_type(),
            q_params: None,
        };
        let y = model.wire_node("gemv", op, &[xs, wc])?[0];
        let y = model.wire_node("bias", TypedBinOp(Box::new(Add), None), &[y, bc])?[0];
        model.select_output_outlets(&[y])?;
        let input = tvec!(Tensor::from_shape(&[k, 1, 1], &x)?.into_tvalue());
        let want = model
            .clone()
            .into_optimized()?
            .into_runnable()?
            .run(input.clone())?;
        let mut ours = model;
        let done = substitute(&mut ours, isa, 1)?;
        ensure!(
            done.products == 1,
            "graft's matrix-vector product did not take {k} -> {n} ({axes}): {done:?}"
        );
        let got = ours.into_optimized()?.into_runnable()?.run(input)?;
        let (want, got) = (want[0].try_as_plain_ram()?, got[0].try_as_plain_ram()?);
        let (want, got) = (want.as_slice::<f32>()?, got.as_slice::<f32>()?);
        ensure!(
            got.len() == want.len() && want.len() == n,
            "{k} -> {n}: output sizes"
        );
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let mut worst = 0f32;
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            let rel = (a - b).abs() / scale;
            ensure!(
                rel <= 1e-5,
                "graft's matrix-vector product ({}) differs from tract's on {k} -> {n} at {j}: {a} vs {b}",
                isa.name()
            );
            worst = worst.max(rel);
        }
        checked.push(CheckedShape {
            shape: Shape {
                batch: 1,
                cin: k,
                cout: n,
                hw: 1,
            },
            max_rel_error: worst,
        });
    }
    Ok(checked)
}

/// A decluttered model of one 1×1 `Conv`, as tract-onnx loads it, with what `tail` asks after
/// it: a ReLU6 as `Max(x, 0)`, `Min(x, 6)`, then the `Add` of a second input, then its clip
/// to `post`.
fn single_conv(
    s: &Shape,
    [h, w]: [usize; 2],
    tail: Tail,
    weights: &[f32],
    bias: &[f32],
    post: [f32; 2],
) -> TractResult<TypedModel> {
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math::{Max, Min};
    use tract_onnx::tract_core::ops::nn::DataFormat;
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact([s.batch, s.cin, h, w]))?;
    let r = if tail.residual {
        Some(model.add_source("residual", f32::fact([s.batch, s.cout, h, w]))?)
    } else {
        None
    };
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
    if tail.clip {
        let zero = model.add_const("zero", Tensor::from_shape(&[1, 1, 1, 1], &[0f32])?)?;
        let six = model.add_const("six", Tensor::from_shape(&[1, 1, 1, 1], &[6f32])?)?;
        y = model.wire_node("relu6.min", TypedBinOp(Box::new(Max), None), &[y, zero])?[0];
        y = model.wire_node("relu6.max", TypedBinOp(Box::new(Min), None), &[y, six])?[0];
    }
    if let Some(r) = r {
        y = model.wire_node("add", TypedBinOp(Box::new(Add), None), &[y, r])?[0];
        if tail.post {
            let lo = model.add_const("lo", Tensor::from_shape(&[1, 1, 1, 1], &post[..1])?)?;
            let hi = model.add_const("hi", Tensor::from_shape(&[1, 1, 1, 1], &post[1..])?)?;
            y = model.wire_node("sum.max", TypedBinOp(Box::new(Max), None), &[y, lo])?[0];
            y = model.wire_node("sum.min", TypedBinOp(Box::new(Min), None), &[y, hi])?[0];
        }
    }
    model.select_output_outlets(&[y])?;
    model.into_decluttered()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_matches_tracts_1x1_convolution_on_lite0_and_random_shapes() {
        for isa in Isa::available() {
            let checked = check_against_tract(isa, 23, 30, true).unwrap();
            assert_eq!(checked.len(), 49 + 6);
        }
    }

    /// Over three threads each takes a third of the tiles (`par_parts`), which cuts through
    /// channel blocks and runs of positions alike.
    #[test]
    fn tiles_shared_by_three_threads_match_tracts_1x1_convolution() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        for isa in Isa::available() {
            let checked = multithread_tract_scope(Executor::multithread(3), || {
                check_against_tract(isa, 29, 12, true)
            })
            .unwrap();
            assert_eq!(checked.len(), 31 + 3);
        }
    }
}
