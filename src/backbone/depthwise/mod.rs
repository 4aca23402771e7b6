//! graft's own depthwise convolution inside tract's plan.
//!
//! tract 0.23.9 runs a float depthwise convolution as its `DepthWise` op: on x86 only the interior
//! zones of unit-stride nodes are vectorised (8 lanes, no FMA), the stride-2 nodes and every
//! border run scalar, and on EfficientNet-Lite0 that op was half of the forward pass
//! (`docs/performance.md`). [`substitute`] replaces each such `Conv` of the decluttered model,
//! before tract's codegen sees it, by [`GraftDepthwise`], which runs [`kernel`]'s vectorised
//! planes, threads over channels with tract's own executor, and takes in the `Max`/`Min` clip
//! that follows (ReLU6, or `w8`'s quantisation range) so that pass over memory disappears too.
//!
//! The same kernel runs a dense convolution over few input channels ([`MAX_DENSE_CHANNELS`]):
//! a network's stem (3 → 32 channels, 3×3, stride 2 on Lite0), which tract ran as a lazy im2col
//! product on an AVX2 `32x3` tile behind a separate `Pad` and clip, 2.4 ms of a 20 ms pass
//! against onnxruntime's 0.37 ms. Each output channel is one flat convolution with `3 × 9` taps
//! over the image's phase planes, laid out once per image.
//!
//! Everything else stays tract's (or [`super::pointwise`]'s). [`check_against_tract`] runs
//! tract's op and ours on the same random convolutions: the tests call it, and so does `graft
//! doctor` on the board itself.

pub mod blocked;
pub mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::math::{Max, Min};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::quant::Grid;
use super::simd::{par_parts, same_bits, seeded_uniform, threads, SharedOut, SharedPtr};
pub use kernel::{Geometry, Isa};

/// The most input channels of a dense convolution graft's kernel takes (an image's stem has 3):
/// each output channel reads every input channel's phase planes, so this bounds the taps.
pub const MAX_DENSE_CHANNELS: usize = 4;

/// A depthwise convolution (or, with `dense`, a dense one over few input channels: a network's
/// stem) with its weights, bias and clip, run by graft's kernel.
#[derive(Debug, Clone)]
pub struct GraftDepthwise {
    geo: Geometry,
    /// A dense convolution's output channels (`geo.channels` are then its input channels).
    dense: Option<usize>,
    /// [`Geometry::tap_offsets`], or for a dense convolution [`Geometry::dense_offsets`].
    offsets: Arc<[usize]>,
    /// `[channels, kh, kw]`, or `[out, in, kh, kw]`.
    weights: Arc<[f32]>,
    /// One per output channel.
    bias: Arc<[f32]>,
    lo: f32,
    hi: f32,
    isa: Isa,
    /// A depthwise convolution run channel-blocked ([`blocked`]): its weights and biases
    /// packed for `isa`'s vectors. Without, plane by plane ([`kernel`]).
    blocked: Option<Packed>,
    /// `[N, C, H, W]` tensors; without, `[C, H, W]` (tract drops a batch axis of 1).
    batch_axis: bool,
    /// The fake quantisation that follows in a QDQ graph, folded in
    /// ([`super::quant::fuse_fake_quant`]): the channel-blocked kernels apply it to each
    /// output vector before they store it, the plane kernels to each plane they wrote.
    grid: Option<Grid>,
    /// The 1×1 convolution before, folded in ([`fuse_expand`]): the input is then its input.
    expand: Option<ExpandOp>,
    /// Or the stem before (a channel-blocked dense convolution), folded in the same way.
    stem: Option<Box<GraftDepthwise>>,
    /// A dense convolution's input clamped to this range as it is padded: the clip of the
    /// image before the stem (the `w8` graph's input range), folded in ([`fuse_input_clip`]).
    in_clip: Option<(f32, f32)>,
}

/// A 1×1 convolution run inside a channel-blocked depthwise one ([`blocked::Expand`]).
#[derive(Debug, Clone)]
struct ExpandOp {
    cin: usize,
    /// [`blocked::pack`]ed for the depthwise's lanes (`cin` taps per channel).
    weights: Arc<[f32]>,
    bias: Arc<[f32]>,
    lo: f32,
    hi: f32,
}

impl PartialEq for ExpandOp {
    fn eq(&self, other: &Self) -> bool {
        self.cin == other.cin
            && self.lo.to_bits() == other.lo.to_bits()
            && self.hi.to_bits() == other.hi.to_bits()
            && same_bits(&self.weights, &other.weights)
            && same_bits(&self.bias, &other.bias)
    }
}

thread_local! {
    /// Each thread's working memory for channel blocks, kept between calls: laid out again
    /// only when the geometry changes.
    static BLOCK_SCRATCH: std::cell::RefCell<blocked::BlockScratch> = Default::default();
}

/// Weights and biases packed for a kernel.
type Packed = (Arc<[f32]>, Arc<[f32]>);

impl PartialEq for GraftDepthwise {
    fn eq(&self, other: &Self) -> bool {
        self.geo == other.geo
            && self.dense == other.dense
            && self.isa == other.isa
            && self.batch_axis == other.batch_axis
            && self.grid == other.grid
            && self.expand == other.expand
            && self.stem == other.stem
            && self.in_clip.map(|(a, b)| (a.to_bits(), b.to_bits()))
                == other.in_clip.map(|(a, b)| (a.to_bits(), b.to_bits()))
            && self.blocked.is_some() == other.blocked.is_some()
            && self.lo.to_bits() == other.lo.to_bits()
            && self.hi.to_bits() == other.hi.to_bits()
            && same_bits(&self.weights, &other.weights)
            && same_bits(&self.bias, &other.bias)
    }
}

impl Eq for GraftDepthwise {}

impl Op for GraftDepthwise {
    fn name(&self) -> StaticName {
        match (self.dense, &self.expand, &self.stem) {
            (Some(_), ..) => "GraftDenseConv".into(),
            (None, Some(_), _) => "GraftExpandDepthWise".into(),
            (None, None, Some(_)) => "GraftStemDepthWise".into(),
            (None, None, None) => "GraftDepthWise".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geo;
        let channels = match (self.dense, &self.expand) {
            (Some(out), _) => format!("{}->{}ch", g.channels, out),
            (None, Some(e)) => format!(
                "1x1 {}->{}ch clip [{}, {}], then {}ch",
                e.cin, g.channels, e.lo, e.hi, g.channels
            ),
            (None, None) => match &self.stem {
                Some(d) => format!("{}, then {}ch", d.info()?.join("; "), g.channels),
                None => format!("{}ch", g.channels),
            },
        };
        let layout = if self.blocked.is_some() {
            ", channel-blocked"
        } else {
            ""
        };
        Ok(vec![format!(
            "{} {}x{} k{}x{} s{}x{} pad {},{} -> {}x{}, clip [{}, {}], {}{}",
            channels,
            g.h,
            g.w,
            g.kh,
            g.kw,
            g.sh,
            g.sw,
            g.pad_top,
            g.pad_left,
            g.ho,
            g.wo,
            self.lo,
            self.hi,
            self.isa.name(),
            layout
        )]
        .into_iter()
        .chain(self.grid.map(|g| g.describe()))
        .chain(
            self.in_clip
                .map(|(lo, hi)| format!("input clipped to [{lo}, {hi}]")),
        )
        .collect())
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for GraftDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = self.geo;
        ensure!(inputs.len() == 1, "{} takes one input", self.name());
        let input = inputs[0].try_as_plain_ram()?;
        let input = input.as_slice::<f32>()?;
        let [cin, h, w] = self.input_planes();
        ensure!(
            input.len() == g.batch * cin * h * w,
            "{} input has {} values, expected {:?}",
            self.name(),
            input.len(),
            [g.batch, cin, h, w]
        );
        // SAFETY: every value is written below (each plane of the output is one row of
        // `par_chunks_mut`, and `Plane::run` writes all `ho × wo` values of its plane).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.out_shape())? };
        if let Some(cout) = self.dense {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            self.eval_dense(input, cout, out)?;
        } else if let Some((weights, bias)) = &self.blocked {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            self.eval_blocked(input, weights, bias, out)?;
        } else {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            let plane = kernel::Plane {
                geo: &self.geo,
                offsets: &self.offsets,
                isa: self.isa,
                lo: self.lo,
                hi: self.hi,
            };
            let (taps, in_len, out_len) = (g.kh * g.kw, g.h * g.w, g.ho * g.wo);
            // One row per (image, channel) plane: tract's executor (the backbone's threads)
            // splits them, whole planes each.
            tract_linalg::multithread::par_chunks_mut(out, out_len, g.macs(), |first, chunk| {
                let mut scratch = kernel::Scratch::default();
                for (i, o) in chunk.chunks_exact_mut(out_len).enumerate() {
                    let p = first + i;
                    let c = p % g.channels;
                    plane.run(
                        &input[p * in_len..(p + 1) * in_len],
                        &self.weights[c * taps..(c + 1) * taps],
                        self.bias[c],
                        o,
                        &mut scratch,
                    );
                    if let Some(g) = self.grid {
                        g.apply(o);
                    }
                }
                Ok(())
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl GraftDepthwise {
    /// This convolution with the fake quantisation `grid` folded in (`None` if it has one).
    pub(crate) fn with_grid(&self, grid: Grid) -> Option<GraftDepthwise> {
        self.grid.is_none().then(|| GraftDepthwise {
            grid: Some(grid),
            ..self.clone()
        })
    }

    /// This convolution run on `isa`, laid out as `layout` says (a dense one: planes).
    fn for_isa(self, isa: Isa, layout: Layout) -> GraftDepthwise {
        let g = &self.geo;
        let blocked = match layout {
            Layout::Auto => blocked::suits(isa),
            Layout::Planes => false,
            Layout::Blocked => true,
        };
        let blocked = blocked.then(|| {
            // A dense convolution's blocks are of output channels, each with every input
            // channel's taps.
            let (channels, taps) = match self.dense {
                None => (g.channels, g.kh * g.kw),
                Some(cout) => (cout, g.channels * g.kh * g.kw),
            };
            let lanes = blocked::block_channels(isa);
            let (w, b) = blocked::pack(&self.weights, &self.bias, channels, taps, lanes);
            (w.into(), b.into())
        });
        GraftDepthwise {
            isa,
            blocked,
            ..self
        }
    }

    /// A tensor shape of `channels` planes of `h × w`.
    fn shape(&self, channels: usize, h: usize, w: usize) -> TVec<usize> {
        if self.batch_axis {
            tvec![self.geo.batch, channels, h, w]
        } else {
            tvec![channels, h, w]
        }
    }

    /// Channels, rows and columns of the input: this convolution's, or with an expand or a
    /// stem folded in, theirs.
    fn input_planes(&self) -> [usize; 3] {
        let g = &self.geo;
        match (&self.expand, &self.stem) {
            (Some(e), _) => [e.cin, g.h, g.w],
            (None, Some(d)) => [d.geo.channels, d.geo.h, d.geo.w],
            (None, None) => [g.channels, g.h, g.w],
        }
    }

    fn in_shape(&self) -> TVec<usize> {
        let [c, h, w] = self.input_planes();
        self.shape(c, h, w)
    }

    fn out_shape(&self) -> TVec<usize> {
        let g = &self.geo;
        self.shape(self.dense.unwrap_or(g.channels), g.ho, g.wo)
    }

    /// Multiply-adds of one pass.
    fn macs(&self) -> usize {
        let g = &self.geo;
        let expand = self
            .expand
            .as_ref()
            .map_or(0, |e| g.batch * e.cin * g.channels * g.h * g.w);
        let stem = self.stem.as_ref().map_or(0, |d| d.macs());
        g.macs() * self.dense.unwrap_or(1) + expand + stem
    }

    /// Channel blocks of [`blocked::block_channels`], every image's, split over the
    /// backbone's threads.
    fn eval_blocked(
        &self,
        input: &[f32],
        weights: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) -> TractResult<()> {
        let g = self.geo;
        let op = blocked::Blocked {
            geo: &self.geo,
            weights,
            bias,
            isa: self.isa,
            lo: self.lo,
            hi: self.hi,
            grid: self.grid,
            expand: self.expand.as_ref().map(|e| blocked::Expand {
                cin: e.cin,
                weights: &e.weights,
                bias: &e.bias,
                lo: e.lo,
                hi: e.hi,
            }),
            stem: self.stem.as_ref().and_then(|d| {
                let (weights, bias) = d.blocked.as_ref()?;
                Some(blocked::DenseBlocked {
                    geo: &d.geo,
                    cout: g.channels,
                    weights,
                    bias,
                    isa: d.isa,
                    lo: d.lo,
                    hi: d.hi,
                    grid: d.grid,
                    in_clip: d.in_clip,
                })
            }),
        };
        if let Some(stem) = op.stem {
            return self.eval_stem_blocked(op, stem, input, out);
        }
        let lanes = blocked::block_channels(self.isa);
        let blocks = g.channels.div_ceil(lanes);
        let (in_len, out_len) = (g.h * g.w, g.ho * g.wo);
        let (input, output) = (SharedPtr(input.as_ptr()), SharedOut(out.as_mut_ptr()));
        if let Some(cin) = self.expand.as_ref().map(|e| e.cin) {
            // With an expand, each block reads all of its image's `cin` input planes: the
            // threads take bands of output rows instead, each of every block, and read only
            // their band of the input (and its halo), which the 1×1 convolution before wrote
            // cutting its positions in the same order; the 1×1 convolution after cuts them so
            // too. (Cut by blocks, each thread read the whole input, half of it from the other
            // core's cache. Cut in bands, here and in the stem's node, Lite0's w8 on two
            // threads: the stem's node 0.215 → 0.208 ms, the projections of blocks 1 and 2
            // 0.063 → 0.053 and 0.091 → 0.081 ms; the frame 2% faster.)
            let parts = threads().min(g.ho);
            par_parts(parts, g.macs(), |range| {
                let (input, output) = (input, output);
                BLOCK_SCRATCH.with_borrow_mut(|scratch| {
                    for part in range {
                        let rows = part * g.ho / parts..(part + 1) * g.ho / parts;
                        for nb in 0..g.batch * blocks {
                            let (n, b) = (nb / blocks, nb % blocks);
                            // SAFETY: the input holds `batch × cin` planes (checked in
                            // `eval`), the output `batch × channels`; bands never overlap, so
                            // these rows of this block's output planes are this part's alone.
                            unsafe {
                                let x = std::slice::from_raw_parts(
                                    input.0.add(n * cin * in_len),
                                    cin * in_len,
                                );
                                let at = output.0.add((n * g.channels + b * lanes) * out_len);
                                op.run_rows(x, b, rows.clone(), at, scratch);
                            }
                        }
                    }
                });
            });
            return Ok(());
        }
        // Else each thread takes an equal, contiguous share of the (image, channel block, output
        // row) units: whole blocks, and where the blocks do not split evenly over the threads,
        // the rows of the one block on the boundary (its halo rows interleaved twice). Channel
        // order matches the 1×1 convolution before (each of its threads computes a contiguous
        // range of output channels, `pointwise::Shape::channel_major`), so each thread mostly
        // reads what it wrote. (Cutting every block's rows in as many bands as threads instead
        // interleaved every halo twice and read the other core's rows: 1.1–1.4× on 2 threads
        // for the 9- and 15-block maps of Lite0, against 1.6–2.2× for the even ones.)
        let units = g.batch * blocks * g.ho;
        let parts = threads().min(units);
        par_parts(parts, g.macs(), |range| {
            let (input, output) = (input, output);
            BLOCK_SCRATCH.with_borrow_mut(|scratch| {
                for part in range {
                    let (mut u, end) = (part * units / parts, (part + 1) * units / parts);
                    while u < end {
                        let (nb, row) = (u / g.ho, u % g.ho);
                        let stop = end.min((nb + 1) * g.ho);
                        let (n, b) = (nb / blocks, nb % blocks);
                        let c0 = n * g.channels + b * lanes;
                        let planes = lanes.min(g.channels - b * lanes);
                        // SAFETY: the input and the output hold `batch × channels` planes
                        // (checked in `eval`); units never overlap, so rows `row..` of this
                        // block's output planes are this part's alone.
                        unsafe {
                            let x = std::slice::from_raw_parts(
                                input.0.add(c0 * in_len),
                                planes * in_len,
                            );
                            let rows = row..row + (stop - u);
                            op.run_rows(x, b, rows, output.0.add(c0 * out_len), scratch);
                        }
                        u = stop;
                    }
                }
            });
        });
        Ok(())
    }

    /// With the stem folded in: per image, bands of output rows, each of every channel block,
    /// split over the threads as [`Self::eval_blocked`] splits them with an expand (each
    /// thread reads its band of the image, not all of it), each ring row computed by the stem
    /// from the image rows it reads, gathered and padded by the thread that reads them, a few
    /// rows at a time (no padded copy of the whole image, written by one thread before the
    /// others start: the stem with the depthwise 0.46 → 0.43 ms on one thread; no change
    /// measured on two).
    fn eval_stem_blocked(
        &self,
        op: blocked::Blocked,
        stem: blocked::DenseBlocked,
        input: &[f32],
        out: &mut [f32],
    ) -> TractResult<()> {
        let g = self.geo;
        let lanes = blocked::block_channels(self.isa);
        let blocks = g.channels.div_ceil(lanes);
        let sg = stem.geo;
        let (in_len, out_len) = (sg.channels * sg.h * sg.w, g.ho * g.wo);
        for (image, out) in input
            .chunks_exact(in_len)
            .zip(out.chunks_exact_mut(g.channels * out_len))
        {
            let parts = threads().min(g.ho);
            let output = SharedOut(out.as_mut_ptr());
            par_parts(parts, g.macs(), |range| {
                BLOCK_SCRATCH.with_borrow_mut(|scratch| {
                    for part in range {
                        let rows = part * g.ho / parts..(part + 1) * g.ho / parts;
                        for b in 0..blocks {
                            // SAFETY: `out` holds this image's `channels` planes; bands never
                            // overlap, so these rows of block `b`'s planes are this part's.
                            unsafe {
                                let at = output.ptr().add(b * lanes * out_len);
                                op.run_rows(image, b, rows.clone(), at, scratch);
                            }
                        }
                    }
                });
            });
        }
        Ok(())
    }

    /// A dense convolution: per image, the input's phase planes laid out once, then the output
    /// planes split over the backbone's threads.
    fn eval_dense(&self, input: &[f32], cout: usize, out: &mut [f32]) -> TractResult<()> {
        if let Some((weights, bias)) = &self.blocked {
            return self.eval_dense_blocked(input, cout, weights, bias, out);
        }
        let g = self.geo;
        let dense = kernel::Plane {
            geo: &self.geo,
            offsets: &self.offsets,
            isa: self.isa,
            lo: self.lo,
            hi: self.hi,
        };
        let (taps, in_len, out_len) = (
            g.channels * g.kh * g.kw,
            g.channels * g.h * g.w,
            g.ho * g.wo,
        );
        let mut phases = Vec::new();
        for (image, out) in input
            .chunks_exact(in_len)
            .zip(out.chunks_exact_mut(cout * out_len))
        {
            dense.fill_dense(image, &mut phases);
            let phases = &phases;
            tract_linalg::multithread::par_chunks_mut(
                out,
                out_len,
                self.macs(),
                |first, chunk| {
                    let mut flat = Vec::new();
                    for (i, o) in chunk.chunks_exact_mut(out_len).enumerate() {
                        let co = first + i;
                        dense.run_dense(
                            phases,
                            &self.weights[co * taps..(co + 1) * taps],
                            self.bias[co],
                            o,
                            &mut flat,
                        );
                        if let Some(g) = self.grid {
                            g.apply(o);
                        }
                    }
                    Ok(())
                },
            )?;
        }
        Ok(())
    }
}

impl GraftDepthwise {
    /// A dense convolution with output channels side by side: per image, one padded copy of
    /// the input, then the output rows split over the backbone's threads.
    fn eval_dense_blocked(
        &self,
        input: &[f32],
        cout: usize,
        weights: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) -> TractResult<()> {
        let g = self.geo;
        let op = blocked::DenseBlocked {
            geo: &self.geo,
            cout,
            weights,
            bias,
            isa: self.isa,
            lo: self.lo,
            hi: self.hi,
            grid: self.grid,
            in_clip: self.in_clip,
        };
        let (in_len, out_len) = (g.channels * g.h * g.w, cout * g.ho * g.wo);
        let mut padded = Vec::new();
        for (image, out) in input
            .chunks_exact(in_len)
            .zip(out.chunks_exact_mut(out_len))
        {
            op.pad(image, &mut padded);
            let padded = &padded;
            let output = SharedOut(out.as_mut_ptr());
            // One (empty) item per output row.
            let mut rows = vec![(); g.ho];
            tract_linalg::multithread::par_chunks_mut(
                &mut rows,
                1,
                self.macs(),
                |first, chunk| {
                    let mut row = Vec::new();
                    // SAFETY: `out` is one image's `cout × ho × wo`, and rows `first..` are this
                    // chunk's alone.
                    unsafe {
                        op.run_rows(padded, first..first + chunk.len(), output.ptr(), &mut row)
                    };
                    Ok(())
                },
            )?;
        }
        Ok(())
    }
}

impl TypedOp for GraftDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1);
        ensure!(inputs[0].datum_type == f32::datum_type());
        ensure!(
            inputs[0].shape.as_concrete() == Some(&self.in_shape()[..]),
            "{} expects {:?}, got {:?}",
            self.name(),
            self.in_shape(),
            inputs[0].shape
        );
        Ok(tvec!(f32::fact(self.out_shape())))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((Cost::FMA(f32::datum_type()), self.macs().into())))
    }

    as_op!();
}

/// Whether a node of a decluttered model is a depthwise convolution: graft's, or a grouped
/// `Conv` tract will run (one group per channel).
pub fn is_depthwise(node: &TypedNode) -> bool {
    node.op_is::<GraftDepthwise>()
        || node.op_as::<Conv>().is_some_and(|c| {
            c.group > 1
                && c.group == c.pool_spec.input_channels
                && c.group == c.pool_spec.output_channels
        })
}

/// Speaks tract's types: for the backbone, not graft's API.
#[doc(hidden)]
/// tract's declutter, keeping the convolutions channels-first (NCHW, as in the ONNX file).
///
/// Where tract has a channel-last depthwise kernel (aarch64's NEON `depthwise_c_f32`), its
/// `Conv` suggests moving every depthwise convolution's channels last, and tract's layout pass
/// carries that through the graph: on Lite0 under aarch64 every depthwise and 1×1 convolution
/// but the stem's became channel-last, and graft's kernels, which read NCHW, took 1 of 16
/// depthwise and 2 of 32 1×1 convolutions. This runs the same passes as
/// `TypedModel::declutter` with tract's `ChangeAxes` replaced by [`ChannelsFirst`], which
/// makes every change `ChangeAxes` makes but the convolutions' own suggestions. On x86 tract
/// suggests none, so the result is the same graph.
pub fn declutter_channels_first(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::optim::Optimizer;
    let mut optimizer = Optimizer::declutter();
    let at = optimizer
        .passes
        .iter()
        .position(|p| format!("{p:?}") == "ChangeAxes")
        .context("tract's declutter has no ChangeAxes pass (tract's version moved?)")?;
    optimizer.passes[at] = Box::<ChannelsFirst>::default();
    optimizer.session().optimize(model)
}

/// tract 0.23.9's `ChangeAxes` pass (`core/src/optim/change_axes.rs`), line for line, but for
/// the suggestions of `Conv` nodes, which it skips: see [`declutter_channels_first`].
#[derive(Clone, Default)]
struct ChannelsFirst(
    std::collections::HashSet<tract_onnx::tract_core::ops::change_axes::AxisChange>,
    usize,
);

impl std::fmt::Debug for ChannelsFirst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelsFirst")
    }
}

impl tract_onnx::tract_core::optim::TypedPass for ChannelsFirst {
    fn reset(&mut self) -> TractResult<()> {
        self.0.clear();
        self.1 = 0;
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut tract_onnx::tract_core::optim::OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        use tract_onnx::tract_core::ops::change_axes::AxisChange;
        use tract_onnx::tract_core::ops::dummy::Dummy;
        use tract_onnx::tract_core::optim::change_axes::change_axes;
        let mut explored = Default::default();
        let mut interfaces = model.output_outlets()?.to_vec();
        interfaces.extend(model.input_outlets()?.iter());
        for node in &model.nodes[self.1..] {
            if node.op_is::<Dummy>() {
                continue;
            }
            let suggestions = if node.op_is::<Conv>() {
                tvec!()
            } else {
                node.op.suggested_axis_changes()?
            };
            for suggestion in suggestions {
                let outlet = suggestion.0.as_outlet(node);
                let change = AxisChange {
                    outlet,
                    op: suggestion.1,
                };
                if self.0.insert(change.clone()) {
                    if let Some((patch, _)) =
                        change_axes(model, &change, &interfaces, &[], &mut explored)
                            .with_context(|| format!("Making patch for {change:?} from {node}"))?
                    {
                        self.1 = node.id;
                        return Ok(Some(patch));
                    }
                }
            }
            for (slot, fact) in node.outputs.iter().enumerate() {
                for (ix, dim) in fact.fact.shape.iter().enumerate() {
                    if dim.is_one() {
                        let change = AxisChange {
                            outlet: OutletId::new(node.id, slot),
                            op: AxisOp::Rm(ix),
                        };
                        if self.0.insert(change.clone()) {
                            if let Some((patch, _)) =
                                change_axes(model, &change, &interfaces, &[], &mut explored)
                                    .with_context(|| {
                                        format!("Making patch for {change:?} from {node}")
                                    })?
                            {
                                self.1 = node.id;
                                return Ok(Some(patch));
                            }
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

/// What [`substitute`] did to a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Substituted {
    /// Depthwise convolutions now run by graft's kernel.
    pub convolutions: usize,
    /// Dense convolutions over few input channels (a stem) now run by it.
    pub dense: usize,
    /// `Max`/`Min` clips folded into them.
    pub clips: usize,
    /// 1×1 convolutions and stems run inside the depthwise convolution after them
    /// ([`fuse_expand`]).
    pub expands: usize,
}

/// Speaks tract's types: for the backbone and `benches/depthwise.rs`, not graft's API.
#[doc(hidden)]
/// Replaces every float NCHW depthwise `Conv` of a decluttered model (constant weights and
/// bias, dilation 1, concrete shapes) by [`GraftDepthwise`], folding the clips that follow.
/// Convolutions of any other kind are left to tract.
pub fn substitute(model: &mut TypedModel, isa: Isa, dense: bool) -> TractResult<Substituted> {
    substitute_with(model, isa, dense, Layout::Auto)
}

/// How a depthwise convolution's planes are laid out for graft's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Whichever [`blocked::suits`] the ISA.
    Auto,
    /// One channel plane at a time ([`kernel`]).
    Planes,
    /// Channels side by side ([`blocked`]).
    Blocked,
}

/// [`substitute`] with the layout chosen (the checks run both).
fn substitute_with(
    model: &mut TypedModel,
    isa: Isa,
    dense: bool,
    layout: Layout,
) -> TractResult<Substituted> {
    let mut done = Substituted::default();
    for id in model.eval_order()? {
        let Some((op, clips, last)) = depthwise_at(model, id)? else {
            continue;
        };
        if op.dense.is_some() && !dense {
            continue;
        }
        let node = &model.nodes[id];
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("graft-depthwise {name}"));
        let x = patch.tap_model(model, node.inputs[0])?;
        let op = op.for_isa(isa, layout);
        if op.dense.is_some() {
            done.dense += 1;
        } else {
            done.convolutions += 1;
        }
        let out = patch.wire_node(name, op, &[x])?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), out)?;
        patch.apply(model)?;
        done.clips += clips;
    }
    if done.convolutions + done.dense > 0 {
        // Drops the replaced nodes and their now unused constants.
        model.compact()?;
    }
    Ok(done)
}

/// Whether `outlet`'s only reader is a channel-blocked depthwise convolution that runs row by
/// row, with nothing folded into it yet: where [`fuse_expand`] folds the 1×1 convolution
/// writing it.
#[cfg(target_arch = "x86_64")]
pub(crate) fn reads_rows(model: &TypedModel, outlet: OutletId) -> bool {
    let readers = model.outlet_successors(outlet);
    let [reader] = readers else {
        return false;
    };
    model.nodes[reader.node]
        .op_as::<GraftDepthwise>()
        .is_some_and(|d| {
            d.blocked.is_some()
                && d.dense.is_none()
                && d.expand.is_none()
                && d.stem.is_none()
                && blocked::by_rows(&d.geo, blocked::block_channels(d.isa))
        })
}

/// Speaks tract's types: for the backbone, not graft's API.
#[doc(hidden)]
/// Folds each graft 1×1 convolution without a residual, and the stem, whose only reader is a
/// channel-blocked depthwise convolution that runs row by row (the wide maps:
/// [`blocked::Expand`], [`blocked::Blocked::stem`]) into that convolution. Returns how many it
/// folded.
///
/// Only there: on Lite0's 28×28 maps folding measured no gain, and on the 14×14 and 7×7 maps
/// (large weights, small outputs) each row re-reading its block's weights made the frame
/// 1.2–1.6× slower.
pub fn fuse_expand(model: &mut TypedModel) -> TractResult<usize> {
    use super::pointwise::GraftPointwise;
    let mut done = 0;
    for id in model.eval_order()? {
        let Some(d) = model.nodes[id].op_as::<GraftDepthwise>() else {
            continue;
        };
        let g = d.geo;
        if d.blocked.is_none()
            || d.dense.is_some()
            || d.expand.is_some()
            || !blocked::by_rows(&g, blocked::block_channels(d.isa))
        {
            continue;
        }
        let input = model.nodes[id].inputs[0];
        if model.outputs.contains(&input)
            || model.outlet_successors(input).len() != 1
            || model.nodes[input.node].outputs.len() != 1
        {
            continue;
        }
        let producer = &model.nodes[input.node];
        // A channel-blocked stem: its output blocks are this convolution's (each on its grid
        // in a QDQ graph).
        if let Some(stem) = producer.op_as::<GraftDepthwise>().filter(|p| {
            p.dense == Some(g.channels)
                && p.blocked.is_some()
                && p.isa == d.isa
                && [p.geo.ho, p.geo.wo] == [g.h, g.w]
                && p.geo.batch == g.batch
        }) {
            let fused = GraftDepthwise {
                stem: Some(Box::new(stem.clone())),
                ..d.clone()
            };
            if model.outlet_fact(producer.inputs[0])?.shape.as_concrete()
                != Some(&fused.in_shape()[..])
            {
                continue;
            }
            replace_with(model, producer.inputs[0], id, fused, "graft-stem-depthwise")?;
            done += 1;
            continue;
        }
        // An expand's own output has no grid here: not in a QDQ graph.
        let Some(p) = producer
            .op_as::<GraftPointwise>()
            .and_then(GraftPointwise::parts)
            .filter(|_| d.grid.is_none())
        else {
            continue;
        };
        let s = p.shape;
        let lanes = blocked::block_channels(d.isa);
        let fused = GraftDepthwise {
            expand: Some(ExpandOp {
                cin: s.cin,
                weights: Arc::from([]),
                bias: Arc::from([]),
                lo: p.lo,
                hi: p.hi,
            }),
            ..d.clone()
        };
        // The same images and map, and the input's shape as the fused op reads it.
        if s.cout != g.channels
            || s.batch != g.batch
            || p.hw != [g.h, g.w]
            || p.in_shape != fused.in_shape()
        {
            continue;
        }
        let (weights, bias) = blocked::pack(&p.weights, &p.bias, s.cout, s.cin, lanes);
        let fused = GraftDepthwise {
            expand: fused.expand.map(|e| ExpandOp {
                weights: weights.into(),
                bias: bias.into(),
                ..e
            }),
            ..fused
        };
        replace_with(
            model,
            producer.inputs[0],
            id,
            fused,
            "graft-expand-depthwise",
        )?;
        done += 1;
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// Speaks tract's types: for the backbone, not graft's API.
#[doc(hidden)]
/// Folds the `Max`/`Min` clip of a channel-blocked stem's input (in the `w8` graph, the image's
/// quantisation range; the stem possibly run inside the depthwise convolution after it) into
/// the stem, which clamps the image as it pads it: tract's separate pass over the image ran
/// no faster on two threads than on one (0.038 and 0.077 ms). Returns how many clip nodes it
/// folded.
pub fn fuse_input_clip(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let Some(d) = model.nodes[id].op_as::<GraftDepthwise>() else {
            continue;
        };
        // The dense convolution that reads the image: this one, or the stem inside it.
        let dense = match &d.stem {
            Some(stem) => stem.as_ref(),
            None => d,
        };
        if dense.dense.is_none() || dense.blocked.is_none() || dense.in_clip.is_some() {
            continue;
        }
        // Walk back over the clip's nodes, each read only by the next.
        let mut input = model.nodes[id].inputs[0];
        let mut chain = Vec::new();
        loop {
            let node = &model.nodes[input.node];
            if model.outputs.contains(&input) || model.outlet_successors(input).len() != 1 {
                break;
            }
            let Some(bin) = node.op_as::<TypedBinOp>() else {
                break;
            };
            let is_max = bin.0.is::<Max>();
            if !(is_max || bin.0.is::<Min>()) || bin.1.is_some() || node.inputs.len() != 2 {
                break;
            }
            let konst = |o: OutletId| -> TractResult<Option<f32>> {
                let fact = model.outlet_fact(o)?;
                Ok(match fact.konst.as_ref() {
                    Some(k) if k.len() == 1 && k.datum_type() == f32::datum_type() => {
                        Some(k.try_as_plain_ram()?.as_slice::<f32>()?[0])
                    }
                    _ => None,
                })
            };
            let (data, bound) = match (konst(node.inputs[0])?, konst(node.inputs[1])?) {
                (None, Some(b)) => (node.inputs[0], b),
                (Some(b), None) => (node.inputs[1], b),
                _ => break,
            };
            if bound.is_nan() || model.outlet_fact(data)?.shape != model.outlet_fact(input)?.shape {
                break;
            }
            chain.push((is_max, bound));
            input = data;
        }
        if chain.is_empty() {
            continue;
        }
        // In the graph's order: the clamp the chain computes.
        let (lo, hi) = chain
            .iter()
            .rev()
            .fold((f32::NEG_INFINITY, f32::INFINITY), |r, &(m, b)| {
                then_clip(r, m, b)
            });
        let fused = match &d.stem {
            Some(stem) => GraftDepthwise {
                stem: Some(Box::new(GraftDepthwise {
                    in_clip: Some((lo, hi)),
                    ..stem.as_ref().clone()
                })),
                ..d.clone()
            },
            None => GraftDepthwise {
                in_clip: Some((lo, hi)),
                ..d.clone()
            },
        };
        replace_with(model, input, id, fused, "graft-input-clip")?;
        done += chain.len();
    }
    if done > 0 {
        model.compact()?;
    }
    Ok(done)
}

/// A clip range `(lo, hi)` followed by `Max(x, bound)` (`is_max`) or `Min(x, bound)`: the range
/// of the two, as one clamp.
pub(super) fn then_clip((lo, hi): (f32, f32), is_max: bool, bound: f32) -> (f32, f32) {
    if is_max {
        (lo.max(bound), hi.max(bound))
    } else {
        (lo.min(bound), hi.min(bound))
    }
}

/// Replaces the nodes from `input`'s reader to `last` by `op` on `input`.
pub(super) fn replace_with(
    model: &mut TypedModel,
    input: OutletId,
    last: usize,
    op: impl TypedOp,
    what: &str,
) -> TractResult<()> {
    let name = model.nodes[last].name.clone();
    let mut patch = TypedModelPatch::new(format!("{what} {name}"));
    let x = patch.tap_model(model, input)?;
    let out = patch.wire_node(name, op, &[x])?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), out)?;
    patch.apply(model)
}

/// If node `id` is a depthwise convolution graft runs: the op (with scalar ISA), the number of
/// clip nodes folded, and the last node it replaces.
fn depthwise_at(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<(GraftDepthwise, usize, usize)>> {
    let node = &model.nodes[id];
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let ps = &conv.pool_spec;
    let c = ps.input_channels;
    // Depthwise (one group per channel), or dense over few input channels with a kernel
    // larger than 1×1 (a 1×1 is the pointwise kernel's).
    let depthwise = conv.group == c && ps.output_channels == c && c >= 2;
    let dense = conv.group == 1
        && (1..=MAX_DENSE_CHANNELS).contains(&c)
        && ps.output_channels >= 1
        && ps.kernel_shape.iter().product::<usize>() > 1;
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || !matches!(ps.data_format, DataFormat::NCHW | DataFormat::CHW)
        || ps.kernel_shape.len() != 2
        || !(depthwise || dense)
        || ps
            .dilations
            .as_ref()
            .is_some_and(|d| d.iter().any(|&d| d != 1))
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let x = model.outlet_fact(node.inputs[0])?;
    let (Some(xs), true) = (x.shape.as_concrete(), x.datum_type == f32::datum_type()) else {
        return Ok(None);
    };
    let (Some(kernel), Some(bias)) = (
        model.outlet_fact(node.inputs[1])?.konst.clone(),
        model.outlet_fact(node.inputs[2])?.konst.clone(),
    ) else {
        return Ok(None);
    };
    // `[N, C, H, W]`, or `[C, H, W]` where tract dropped a batch of 1.
    let batch_axis = ps.data_format == DataFormat::NCHW;
    let (batch, xs) = match (batch_axis, xs) {
        (true, &[n, c, h, w]) => (n, [c, h, w]),
        (false, &[c, h, w]) => (1, [c, h, w]),
        _ => return Ok(None),
    };
    if xs[0] != c {
        return Ok(None);
    }
    let (kh, kw) = (ps.kernel_shape[0], ps.kernel_shape[1]);
    let cout = ps.output_channels;
    let want_kernel = if depthwise {
        [c, 1, kh, kw]
    } else {
        [cout, c, kh, kw]
    };
    if kernel.datum_type() != f32::datum_type() || kernel.shape() != want_kernel {
        return Ok(None);
    }
    if bias.datum_type() != f32::datum_type() || !(bias.len() == cout || bias.len() == 1) {
        return Ok(None);
    }
    let padding = ps.computed_padding(&xs[1..]);
    let strides = ps.strides();
    let geo = Geometry {
        batch,
        channels: c,
        h: xs[1],
        w: xs[2],
        kh,
        kw,
        sh: strides[0],
        sw: strides[1],
        pad_top: padding[0].pad_before,
        pad_left: padding[1].pad_before,
        ho: padding[0].convoluted,
        wo: padding[1].convoluted,
    };
    if !geo.is_valid() {
        return Ok(None);
    }
    let weights: Arc<[f32]> = kernel.try_as_plain_ram()?.as_slice::<f32>()?.into();
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias: Arc<[f32]> = if bias.len() == cout {
        bias.into()
    } else {
        vec![bias[0]; cout].into()
    };
    // Fold the clip chain that follows, if this convolution is its only input.
    let (mut range, mut last, mut clips) = ((f32::NEG_INFINITY, f32::INFINITY), id, 0);
    while let Some((is_max, bound, next)) = clip_after(model, last)? {
        range = then_clip(range, is_max, bound);
        last = next;
        clips += 1;
    }
    let (lo, hi) = range;
    let (dense, offsets) = if depthwise {
        (None, geo.tap_offsets())
    } else {
        (Some(cout), geo.dense_offsets())
    };
    let op = GraftDepthwise {
        offsets: offsets.into(),
        dense,
        geo,
        weights,
        bias,
        lo,
        hi,
        isa: Isa::Scalar,
        blocked: None,
        batch_axis,
        grid: None,
        expand: None,
        stem: None,
        in_clip: None,
    };
    Ok(Some((op, clips, last)))
}

/// The `Max(x, b)` or `Min(x, b)` with a scalar constant `b` that alone reads node `id`'s only
/// output, when nothing else does and it is not a model output.
pub(super) fn clip_after(model: &TypedModel, id: usize) -> TractResult<Option<(bool, f32, usize)>> {
    let outlet = OutletId::new(id, 0);
    if model.outputs.contains(&outlet) || model.nodes[id].outputs.len() != 1 {
        return Ok(None);
    }
    let succ = model.outlet_successors(outlet);
    let [inlet] = succ else {
        return Ok(None);
    };
    let next = &model.nodes[inlet.node];
    let Some(bin) = next.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    let is_max = if bin.0.is::<Max>() {
        true
    } else if bin.0.is::<Min>() {
        false
    } else {
        return Ok(None);
    };
    if next.inputs.len() != 2 || bin.1.is_some() {
        return Ok(None);
    }
    let other = next.inputs[1 - inlet.slot];
    let fact = model.outlet_fact(other)?;
    let Some(k) = fact.konst.as_ref() else {
        return Ok(None);
    };
    if k.len() != 1 || k.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    // The clip must not change the shape (broadcast of a scalar only).
    if model.outlet_fact(OutletId::new(next.id, 0))?.shape != model.outlet_fact(outlet)?.shape {
        return Ok(None);
    }
    let bound = k.try_as_plain_ram()?.as_slice::<f32>()?[0];
    if bound.is_nan() {
        return Ok(None);
    }
    Ok(Some((is_max, bound, next.id)))
}

/// One convolution [`check_against_tract`] ran.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedShape {
    /// The convolution.
    pub geo: Geometry,
    /// A dense convolution's output channels (`geo.channels` its input channels).
    pub dense: Option<usize>,
    /// Largest |graft − tract| over the output, relative to the largest |tract| value.
    pub max_rel_error: f32,
}

/// A seeded random depthwise convolution: `(input [N,C,H,W], weights, bias, geometry, pads
/// after)`.
fn random_case(seed: &mut u64) -> (Geometry, [usize; 2]) {
    let mut next = |n: usize| {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as usize) % n
    };
    let k = [3, 5][next(2)];
    let (sh, sw) = if next(4) == 0 {
        (1, 2)
    } else {
        [(1, 1), (2, 2)][next(2)]
    };
    let (pt, pl, pb, pr) = (next(k), next(k), next(k), next(k));
    // At least one kernel's worth of padded input.
    let h = (1 + next(20)).max(k.saturating_sub(pt + pb));
    let w = (1 + next(20)).max(k.saturating_sub(pl + pr));
    let channels = 2 + next(37);
    let batch = 1 + next(3);
    let ho = (h + pt + pb - k) / sh + 1;
    let wo = (w + pl + pr - k) / sw + 1;
    let geo = Geometry {
        batch,
        channels,
        h,
        w,
        kh: k,
        kw: k,
        sh,
        sw,
        pad_top: pt,
        pad_left: pl,
        ho,
        wo,
    };
    (geo, [pb, pr])
}

/// EfficientNet-Lite0's 16 depthwise convolutions at 224×224: `(channels, h, k, stride)`,
/// "same" padding.
pub const LITE0_SHAPES: [(usize, usize, usize, usize); 16] = [
    (32, 112, 3, 1),
    (96, 112, 3, 2),
    (144, 56, 3, 1),
    (144, 56, 5, 2),
    (240, 28, 5, 1),
    (240, 28, 3, 2),
    (480, 14, 3, 1),
    (480, 14, 3, 1),
    (480, 14, 5, 1),
    (672, 14, 5, 1),
    (672, 14, 5, 1),
    (672, 14, 5, 2),
    (1152, 7, 5, 1),
    (1152, 7, 5, 1),
    (1152, 7, 5, 1),
    (1152, 7, 3, 1),
];

/// The geometry of [`LITE0_SHAPES`]`[i]`, one image, with TensorFlow's "same" padding (the
/// extra row and column after), as in the bundled model.
pub fn lite0_geometry(i: usize) -> Geometry {
    lite0_case(i).0
}

fn lite0_case(i: usize) -> (Geometry, [usize; 2]) {
    let (c, h, k, s) = LITE0_SHAPES[i];
    let ho = h.div_ceil(s);
    let total = ((ho - 1) * s + k).saturating_sub(h);
    let (before, after) = (total / 2, total - total / 2);
    let geo = Geometry {
        batch: 1,
        channels: c,
        h,
        w: h,
        kh: k,
        kw: k,
        sh: s,
        sw: s,
        pad_top: before,
        pad_left: before,
        ho,
        wo: ho,
    };
    (geo, [after, after])
}

/// Speaks tract's error type: graft's API is [`super::check_cpu_kernels`].
#[doc(hidden)]
/// Runs `random` seeded random depthwise convolutions (kernels 3 and 5, strides 1 and 2, uneven
/// pads, odd channel counts, batch 1–3; every fifth a dense one over 1–4 input channels) and,
/// with `lite0`, EfficientNet-Lite0's 16 shapes and its stem, once through tract's own plan and
/// with graft's kernel on `isa` (in both layouts, planes and channel-blocked),
/// with a ReLU6 after each.
/// Errors if an output differs by more than a relative 1e-5.
pub fn check_against_tract(
    isa: Isa,
    seed: u64,
    random: usize,
    lite0: bool,
) -> TractResult<Vec<CheckedShape>> {
    // (geometry, pads after, a dense convolution's output channels)
    let mut cases: Vec<(Geometry, [usize; 2], Option<usize>)> = Vec::new();
    if lite0 {
        cases.extend(
            (0..LITE0_SHAPES.len())
                .map(lite0_case)
                .map(|(g, a)| (g, a, None)),
        );
        // The stem: 3 → 32 channels, 3×3, stride 2, TensorFlow's "same" padding.
        let (mut geo, after) = lite0_case(1);
        (geo.channels, geo.h, geo.w, geo.ho, geo.wo) = (3, 224, 224, 112, 112);
        cases.push((geo, after, Some(32)));
    }
    let mut s = seed;
    for i in 0..random {
        let (mut geo, after) = random_case(&mut s);
        // Every fifth a dense convolution over 1–4 input channels, to 7–33 output channels
        // (one block of 16, two, two and a part: the blocked kernel computes pairs).
        let dense = (i % 5 == 4).then(|| {
            geo.channels = 1 + geo.channels % MAX_DENSE_CHANNELS;
            2 + geo.batch * 5 + (i / 5 % 2) * 16
        });
        cases.push((geo, after, dense));
    }
    let mut checked = Vec::with_capacity(cases.len());
    for (i, (geo, after, dense)) in cases.into_iter().enumerate() {
        let mut data_seed = seed ^ (i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
        let mut values = |n: usize| seeded_uniform(&mut data_seed, n, 2.0);
        let g = &geo;
        let cout = dense.unwrap_or(g.channels);
        let input = values(g.batch * g.channels * g.h * g.w);
        let per_output = if dense.is_some() { g.channels } else { 1 };
        let weights = values(cout * per_output * g.kh * g.kw);
        let bias = values(cout);
        let model = single_conv(g, after, &weights, &bias, dense)?;
        let input = Tensor::from_shape(&[g.batch, g.channels, g.h, g.w], &input)?;
        let reference = model.clone().into_optimized()?.into_runnable()?;
        let want = reference.run(tvec!(input.clone().into_tvalue()))?;
        let want = want[0].try_as_plain_ram()?;
        let want = want.as_slice::<f32>()?;
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let mut worst = 0f32;
        // Through both layouts, whichever this ISA would pick.
        let layouts = [Layout::Planes, Layout::Blocked];
        for layout in layouts {
            let mut ours = model.clone();
            let done = substitute_with(&mut ours, isa, true, layout)?;
            ensure!(
                done.convolutions + done.dense == 1
                    && done.dense == dense.is_some() as usize
                    && done.clips == 2,
                "graft's depthwise did not take {g:?} {dense:?} (substituted {done:?})"
            );
            let plan = ours.clone().into_optimized()?.into_runnable()?;
            let got = plan.run(tvec!(input.clone().into_tvalue()))?;
            let got = got[0].try_as_plain_ram()?;
            let got = got.as_slice::<f32>()?;
            // A QDQ graph's fake quantisation folded in gives the same values as after it.
            super::quant::check_fused_grid(
                &ours,
                tvec!(input.clone().into_tvalue()),
                got,
                super::quant::check_grid(i),
            )?;
            ensure!(
                got.len() == want.len(),
                "{g:?}: {} outputs vs tract's {}",
                got.len(),
                want.len()
            );
            for (j, (a, b)) in got.iter().zip(want).enumerate() {
                let rel = (a - b).abs() / scale;
                ensure!(
                    rel <= 1e-5,
                    "graft's depthwise ({}, {layout:?}) differs from tract's on {g:?} {dense:?} at output {j}: {a} vs {b}",
                    isa.name()
                );
                worst = worst.max(rel);
            }
        }
        checked.push(CheckedShape {
            geo,
            dense,
            max_rel_error: worst,
        });
    }
    Ok(checked)
}

/// A decluttered model of one depthwise `Conv` (or with `dense`, a dense one with that many
/// output channels; explicit pads) followed by a ReLU6 as `Max(x, 0)`, `Min(x, 6)`, the way
/// tract-onnx wires ONNX's `Clip`.
fn single_conv(
    g: &Geometry,
    after: [usize; 2],
    weights: &[f32],
    bias: &[f32],
    dense: Option<usize>,
) -> TractResult<TypedModel> {
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact([g.batch, g.channels, g.h, g.w]))?;
    let (cout, per_group, group) = match dense {
        None => (g.channels, 1, g.channels),
        Some(out) => (out, g.channels, 1),
    };
    let k = model.add_const(
        "kernel",
        Tensor::from_shape(&[cout, per_group, g.kh, g.kw], weights)?,
    )?;
    let b = model.add_const("bias", Tensor::from_shape(&[cout], bias)?)?;
    let conv = Conv {
        pool_spec: PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![g.kh, g.kw],
            padding: PaddingSpec::Explicit(tvec![g.pad_top, g.pad_left], tvec![after[0], after[1]]),
            dilations: None,
            strides: Some(tvec![g.sh, g.sw]),
            input_channels: g.channels,
            output_channels: cout,
        },
        kernel_fmt: KernelFormat::OIHW,
        group,
        q_params: None,
    };
    let y = model.wire_node("conv", conv, &[x, k, b])?[0];
    let zero = model.add_const("zero", Tensor::from_shape(&[1, 1, 1, 1], &[0f32])?)?;
    let six = model.add_const("six", Tensor::from_shape(&[1, 1, 1, 1], &[6f32])?)?;
    let y = model.wire_node("relu6.min", TypedBinOp(Box::new(Max), None), &[y, zero])?[0];
    let y = model.wire_node("relu6.max", TypedBinOp(Box::new(Min), None), &[y, six])?[0];
    model.select_output_outlets(&[y])?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Conv` of `g` (dense with `dense` output channels, else depthwise) on `x`, with its
    /// ReLU6; bottom and right padding `after`.
    fn wire_conv(
        model: &mut TypedModel,
        name: &str,
        x: OutletId,
        g: &Geometry,
        after: usize,
        dense: Option<usize>,
        seed: &mut u64,
    ) -> TractResult<OutletId> {
        let (cout, per_group, group) = match dense {
            None => (g.channels, 1, g.channels),
            Some(out) => (out, g.channels, 1),
        };
        let w = seeded_uniform(seed, cout * per_group * g.kh * g.kw, 1.0);
        let b = seeded_uniform(seed, cout, 1.0);
        let k = model.add_const(
            format!("{name}.kernel"),
            Tensor::from_shape(&[cout, per_group, g.kh, g.kw], &w)?,
        )?;
        let b = model.add_const(format!("{name}.bias"), Tensor::from_shape(&[cout], &b)?)?;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![g.kh, g.kw],
                padding: PaddingSpec::Explicit(tvec![g.pad_top, g.pad_left], tvec![after, after]),
                dilations: None,
                strides: Some(tvec![g.sh, g.sw]),
                input_channels: g.channels,
                output_channels: cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        };
        let y = model.wire_node(name, conv, &[x, k, b])?[0];
        let zero = model.add_const(
            format!("{name}.zero"),
            tensor0(0f32).broadcast_into_rank(4)?,
        )?;
        let six = model.add_const(format!("{name}.six"), tensor0(6f32).broadcast_into_rank(4)?)?;
        let y = model.wire_node(
            format!("{name}.max"),
            TypedBinOp(Box::new(Max), None),
            &[y, zero],
        )?[0];
        Ok(model.wire_node(
            format!("{name}.min"),
            TypedBinOp(Box::new(Min), None),
            &[y, six],
        )?[0])
    }

    /// Lite0's own graph, decluttered with [`declutter_channels_first`]: every convolution
    /// stays channels-first, where graft's kernels take it; and on a host where tract has no
    /// channel-last depthwise kernel (x86: it suggests nothing) the graph is the one tract's
    /// own declutter makes, node for node. (On aarch64 tract's declutter moves all but the
    /// stem channel-last: `boards/qemu-check.sh` checks there that graft takes them all.)
    #[test]
    fn lite0_stays_channels_first_and_else_decluttered_as_tract_does() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/efficientnet-lite0/fp32.onnx"
        );
        let mut typed = tract_onnx::onnx().model_for_path(path).unwrap();
        typed
            .set_input_fact(0, f32::fact([1, 3, 224, 224]).into())
            .unwrap();
        let typed = typed.into_typed().unwrap();
        let mut ours = typed.clone();
        declutter_channels_first(&mut ours).unwrap();
        let convs: Vec<_> = ours
            .nodes
            .iter()
            .filter_map(|n| n.op_as::<Conv>())
            .collect();
        // (the 1×1s are einsums by now)
        assert_eq!(convs.len(), 1 + 16, "stem and depthwise convolutions");
        for c in &convs {
            // (NCHW, or CHW once tract has dropped the batch of 1)
            assert!(!c.pool_spec.data_format.c_is_last(), "{c:?}");
        }
        if tract_linalg::routines::depthwise_c_f32().is_none() {
            let theirs = typed.into_decluttered().unwrap();
            let ops = |m: &TypedModel| -> Vec<String> {
                m.eval_order()
                    .unwrap()
                    .iter()
                    .map(|&id| format!("{} {:?}", m.nodes[id].name, m.nodes[id].op))
                    .collect()
            };
            assert_eq!(ops(&ours), ops(&theirs));
        }
    }

    /// The `w8` graph's front: a clip of the image, the stem, a depthwise convolution. The clip
    /// folds into the stem (which clamps the image as it pads it) and, where the depthwise
    /// convolution runs through its ring, the stem into it: tract's numbers either way, with
    /// image values well past the clip's bounds.
    #[test]
    fn a_clipped_image_into_the_stem_into_the_depthwise_matches_tract() {
        for isa in Isa::available() {
            let mut seed = 41;
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([1, 3, 100, 100])).unwrap();
            let lo = model
                .add_const("lo", tensor0(-0.5f32).broadcast_into_rank(4).unwrap())
                .unwrap();
            let hi = model
                .add_const("hi", tensor0(0.75f32).broadcast_into_rank(4).unwrap())
                .unwrap();
            let y = model
                .wire_node("clip.max", TypedBinOp(Box::new(Max), None), &[x, lo])
                .unwrap()[0];
            let y = model
                .wire_node("clip.min", TypedBinOp(Box::new(Min), None), &[y, hi])
                .unwrap()[0];
            let stem = Geometry {
                batch: 1,
                channels: 3,
                h: 100,
                w: 100,
                kh: 3,
                kw: 3,
                sh: 2,
                sw: 2,
                pad_top: 0,
                pad_left: 0,
                ho: 50,
                wo: 50,
            };
            let y = wire_conv(&mut model, "stem", y, &stem, 1, Some(21), &mut seed).unwrap();
            let dw = Geometry {
                channels: 21,
                h: 50,
                w: 50,
                sh: 1,
                sw: 1,
                pad_top: 1,
                pad_left: 1,
                ..stem
            };
            let y = wire_conv(&mut model, "dw", y, &dw, 1, None, &mut seed).unwrap();
            model.select_output_outlets(&[y]).unwrap();
            let model = model.into_decluttered().unwrap();
            let image = seeded_uniform(&mut seed, 3 * 100 * 100, 2.0);
            let input = tvec!(Tensor::from_shape(&[1, 3, 100, 100], &image)
                .unwrap()
                .into_tvalue());
            let want = model
                .clone()
                .into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap();
            let want = want.run(input.clone()).unwrap();
            let mut ours = model;
            let done = substitute_with(&mut ours, isa, true, Layout::Blocked).unwrap();
            assert_eq!((done.convolutions, done.dense), (1, 1), "{isa:?}");
            let fused = fuse_expand(&mut ours).unwrap();
            let lanes = blocked::block_channels(isa);
            assert_eq!(fused, usize::from(blocked::by_rows(&dw, lanes)), "{isa:?}");
            assert_eq!(fuse_input_clip(&mut ours).unwrap(), 2, "{isa:?}");
            let plan = ours.into_optimized().unwrap().into_runnable().unwrap();
            let got = plan.run(input.clone()).unwrap();
            // Three threads, each a band of rows of every block: the very same numbers.
            let three = tract_linalg::multithread::multithread_tract_scope(
                tract_linalg::multithread::Executor::multithread(3),
                || plan.run(input.clone()).unwrap(),
            );
            assert!(
                crate::backbone::simd::same_bits(
                    got[0]
                        .try_as_plain_ram()
                        .unwrap()
                        .as_slice::<f32>()
                        .unwrap(),
                    three[0]
                        .try_as_plain_ram()
                        .unwrap()
                        .as_slice::<f32>()
                        .unwrap(),
                ),
                "{isa:?}: 3 threads"
            );
            let (want, got) = (
                want[0].try_as_plain_ram().unwrap(),
                got[0].try_as_plain_ram().unwrap(),
            );
            let (want, got) = (
                want.as_slice::<f32>().unwrap(),
                got.as_slice::<f32>().unwrap(),
            );
            assert_eq!(want.len(), got.len());
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{isa:?} at {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn every_isa_matches_tracts_depthwise_on_lite0_and_random_shapes() {
        for isa in Isa::available() {
            let checked = check_against_tract(isa, 17, 30, true).unwrap();
            assert_eq!(checked.len(), 47);
        }
    }

    /// With several threads the channel-blocked layout splits the (image, block, row) units
    /// in equal parts, cutting the rows of the blocks on the parts' boundaries: three threads
    /// here, so that the cuts fall mid-block, and at odd rows, on most maps.
    #[test]
    fn blocks_cut_over_three_threads_match_tracts_depthwise() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        for isa in Isa::available() {
            let checked = multithread_tract_scope(Executor::multithread(3), || {
                check_against_tract(isa, 5, 12, true)
            })
            .unwrap();
            assert_eq!(checked.len(), 29);
        }
    }
}
