//! graft's depthwise kernel with channels side by side (what x86 runs; the stem too).
//!
//! [`super::kernel`] convolves one channel plane at a time, vectorised along the plane. On the
//! last stages of a network that leaves little to vectorise (a 7×7 map is 49 outputs: four
//! AVX-512 vectors, a quarter of them padding), every plane pays the set-up of its scratch and
//! its copies, and a stride-2 plane must first be split into phase planes. Here a vector holds
//! one position of `N` neighbouring channels (`N` = the vector width) instead, the layout
//! onnxruntime's NCHWc kernels keep between operators:
//!
//! 1. the block's `N` input planes are interleaved by in-register `N × N` transposes into a
//!    zero-padded scratch `[row][column][channel]` (on maps 32 or more wide, a ring of `kh`
//!    such rows, `RowsJob`): every tap of every output is then one aligned vector load,
//!    whatever the stride;
//! 2. each output position is the sum of `kh × kw` fused multiply-adds of those vectors by the
//!    tap's `N` weights (packed at load as `[block][tap][channel]`), eight positions at a time
//!    for eight independent chains, then the bias, then the clip that follows;
//! 3. the `[position][channel]` results are transposed back into the `N` NCHW output planes.
//!
//! A block can run only some of its output rows ([`Blocked::run_rows`]): with several threads
//! the tract op cuts the rows of a block that falls between two threads' shares. [`DenseBlocked`] runs a
//! network's stem the same way, with *output* channels side by side. The tract op
//! ([`super::GraftDepthwise`]) picks this layout or the planes ([`suits`]); both are checked
//! against tract's own depthwise.

use std::ops::Range;

use super::kernel::Geometry;
use crate::backbone::quant::Grid;
use crate::backbone::simd::{dispatch, Isa, Lanes, Work};

/// Whether the channel-blocked layout is the one to run on `isa`: where the interleaving is an
/// in-register transpose (x86's AVX-512 and AVX2; faster than the planes on all 16 of
/// EfficientNet-Lite0's shapes, 1.15–4.2× with AVX-512 and 1.02–3.1× with AVX2, `cargo bench
/// --bench depthwise_layouts`, `docs/performance.md`). NEON's transpose is the
/// float-at-a-time default, so aarch64 keeps the planes until it is measured on a board.
pub fn suits(isa: Isa) -> bool {
    isa.lanes() >= 8
}

/// Channels per block on `isa`: one vector.
pub fn block_channels(isa: Isa) -> usize {
    isa.lanes()
}

/// `[channels][kh·kw]` weights and `[channels]` biases laid out for blocks of `lanes` channels:
/// `[block][tap][lane]` and `[block][lane]`, zero past the last channel.
pub fn pack(
    weights: &[f32],
    bias: &[f32],
    channels: usize,
    taps: usize,
    lanes: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(weights.len(), channels * taps, "depthwise weights");
    assert_eq!(bias.len(), channels, "depthwise bias");
    let blocks = channels.div_ceil(lanes);
    let mut packed = vec![0.0; blocks * taps * lanes];
    let mut padded = vec![0.0; blocks * lanes];
    for c in 0..channels {
        let (b, l) = (c / lanes, c % lanes);
        for t in 0..taps {
            packed[(b * taps + t) * lanes + l] = weights[c * taps + t];
        }
        padded[c] = bias[c];
    }
    (packed, padded)
}

impl Geometry {
    /// Rows and columns of the padded input the outputs read: `(ho − 1)·sh + kh` by
    /// `(wo − 1)·sw + kw`.
    fn padded(&self) -> (usize, usize) {
        (
            (self.ho - 1) * self.sh + self.kh,
            (self.wo - 1) * self.sw + self.kw,
        )
    }
}

/// Floats in a cache line: the scratch buffers start on one, so that no vector load or store
/// of a block straddles two lines (each would cost two accesses).
const ALIGN_FLOATS: usize = 16;

/// The `len` floats of `v` (allocated `len + ALIGN_FLOATS` long) from its first cache line on.
fn aligned(v: &mut [f32], len: usize) -> &mut [f32] {
    let skip = v.as_ptr().align_offset(ALIGN_FLOATS * 4).min(ALIGN_FLOATS);
    &mut v[skip..skip + len]
}

/// Per-thread working memory of [`Blocked::run`], reused across blocks.
#[derive(Debug, Default)]
pub struct BlockScratch {
    /// The padded input, `[row][column][channel]`, and a vector of trash.
    padded: Vec<f32>,
    /// `N` output positions, `[position][channel]`.
    tile: Vec<f32>,
    /// Wide maps: the last `kh` padded rows, `[row % kh][column][channel]`.
    ring: Vec<f32>,
    /// Where each input position goes in `padded`.
    slots: Vec<usize>,
    /// Scratch offset of each tap from an output's first input, row-major like the weights.
    offsets: Vec<usize>,
    /// Scratch offset of each output's first input (the whole block's layout): a table, not
    /// `q / wo` and `q % wo` per output, whose divisions cost more than the taps of a 3×3
    /// convolution on a 7×7 map.
    bases: Vec<usize>,
    /// What `padded` (or the ring: `true`) is laid out for: its zeros (the padding) are
    /// written once per geometry, and each block only overwrites the input's own positions.
    laid_out: Option<(Geometry, usize, bool)>,
}

/// One convolution, ready to run block by block.
#[derive(Debug, Clone, Copy)]
pub struct Blocked<'a> {
    /// The convolution's shape.
    pub geo: &'a Geometry,
    /// Weights from [`pack`] with this ISA's lanes.
    pub weights: &'a [f32],
    /// Biases from [`pack`].
    pub bias: &'a [f32],
    /// Which compiled kernel runs it.
    pub isa: Isa,
    /// Outputs are clamped to `[lo, hi]` (±∞: no clip).
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
    /// Then put on a quantisation grid (a QDQ graph's fake quantisation, folded in).
    pub grid: Option<Grid>,
    /// The 1×1 convolution before, computed into the ring as its rows are reached
    /// ([`Expand`]): the input is then that convolution's.
    pub expand: Option<Expand<'a>>,
    /// Or the stem before, computed into the ring the same way: the input is then the stem's
    /// input (the image, `[channel][h][w]`), and the stem's output blocks are this
    /// convolution's channel blocks (its `cout` = these channels, packed with the same lanes).
    pub stem: Option<DenseBlocked<'a>>,
}

/// A 1×1 convolution (with its bias and clip) whose only reader is this depthwise
/// convolution, run inside it ([`super::fuse_expand`]): each row of its output is computed
/// straight into the ring of interleaved rows the taps read, `N` channels side by side, and
/// never goes to memory. On a wide map that output is the largest tensor of the network
/// (96 × 112 × 112 floats, 4.8 MB, on Lite0), written once and read back by the depthwise
/// convolution.
#[derive(Debug, Clone, Copy)]
pub struct Expand<'a> {
    /// Its input channels.
    pub cin: usize,
    /// `[cout][cin]` weights from [`pack`] (`cin` taps per channel) with this ISA's lanes.
    pub weights: &'a [f32],
    /// Biases from [`pack`].
    pub bias: &'a [f32],
    /// Outputs are clamped to `[lo, hi]` (±∞: no clip).
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
}

/// One block's part of an [`Expand`].
#[derive(Clone, Copy)]
struct ExpandRows {
    cin: usize,
    /// The block's `[ci][lane]` weights and its biases.
    weights: *const f32,
    bias: *const f32,
    lo: f32,
    hi: f32,
}

impl ExpandRows {
    /// Columns `0..cols` of one row of the 1×1 convolution's output into `dst`
    /// (`[column][lane]`): per column the bias, then per input channel a fused multiply-add of
    /// the input broadcast by the channel's weights, then the clip. The same operations in the
    /// same order as the 1×1 kernel (`pointwise::kernel`): the same values.
    ///
    /// # Safety
    /// `x` is the row's first input of channel 0, channel `ci`'s `plane` floats further on,
    /// each with `cols` values; `dst` holds `cols` vectors; the CPU runs `L`.
    #[inline(always)]
    unsafe fn row<L: Lanes>(&self, x: *const f32, plane: usize, cols: usize, dst: *mut f32) {
        unsafe {
            let clip = self.lo > f32::NEG_INFINITY || self.hi < f32::INFINITY;
            let mut c = 0;
            while c + 16 <= cols {
                self.group::<L, 16>(x, plane, c, dst, clip);
                c += 16;
            }
            while c + 8 <= cols {
                self.group::<L, 8>(x, plane, c, dst, clip);
                c += 8;
            }
            while c < cols {
                self.group::<L, 1>(x, plane, c, dst, clip);
                c += 1;
            }
        }
    }

    /// Columns `c0 .. c0 + R` of [`ExpandRows::row`].
    #[inline(always)]
    unsafe fn group<L: Lanes, const R: usize>(
        &self,
        x: *const f32,
        plane: usize,
        c0: usize,
        dst: *mut f32,
        clip: bool,
    ) {
        unsafe {
            let n = L::N;
            let mut acc = [L::load(self.bias); R];
            for ci in 0..self.cin {
                let w = L::load(self.weights.add(ci * n));
                let xp = x.add(ci * plane + c0);
                // The next group's line of this channel: the 16–24 input planes are as many
                // streams, more than the hardware's prefetcher follows (measured on AVX-512:
                // Lite0's block 1 0.438 -> 0.374 ms, `docs/performance.md`).
                if R == 16 {
                    L::prefetch(xp.wrapping_add(R));
                }
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = L::mul_add(L::splat_at(xp.add(j)), w, *a);
                }
            }
            let (lo, hi) = (L::splat(self.lo), L::splat(self.hi));
            for (j, a) in acc.iter().enumerate() {
                let y = if clip { a.clamp(lo, hi) } else { *a };
                y.store(dst.add((c0 + j) * n));
            }
        }
    }
}

/// One block's part of a stem run inside a depthwise convolution ([`Blocked::stem`]).
struct StemRows {
    /// The stem's input, the image (`[channel][h][w]`).
    image: *const f32,
    /// The stem's geometry.
    sg: Geometry,
    /// The `kh` padded input rows of each channel that one output row reads
    /// (`[channel][ky][wp]`), gathered from the image for each output row, zeros around:
    /// in the cache of the thread that reads them, instead of a padded copy of the whole
    /// image made by one thread before the others start.
    rows: Vec<f32>,
    /// Offset of each tap `(ci, ky, kx)` in `rows` from an output's first input.
    offsets: Vec<usize>,
    /// The block's `[tap][lane]` weights and its biases.
    weights: *const f32,
    bias: *const f32,
    lo: f32,
    hi: f32,
    /// The stem's output put on this grid (a QDQ graph's fake quantisation after it).
    grid: Option<Grid>,
    /// The image clamped to this range as it is gathered ([`DenseBlocked::in_clip`]).
    in_clip: Option<(f32, f32)>,
}

impl StemRows {
    /// Output row `y` of the stem, columns `0..cols`, into `dst` (`[column][lane]`): what
    /// [`DenseBlocked::run_rows`] computes for this block from [`DenseBlocked::pad`]'s
    /// padded image (the same taps, values and order, then the bias, clip and grid), eight
    /// columns at a time.
    ///
    /// # Safety
    /// `y < ho` and `cols ≤ wo` of the stem; `dst` holds `cols` vectors; the CPU runs `L`.
    #[inline(always)]
    unsafe fn row<L: Lanes>(&mut self, y: usize, cols: usize, dst: *mut f32) {
        let sg = &self.sg;
        let (_, wp) = sg.padded();
        let width = sg.w.min(wp.saturating_sub(sg.pad_left));
        // The rows `y` reads, as `DenseBlocked::pad` lays them out; columns outside
        // `pad_left..pad_left + width` stay zero (nothing else is written there).
        for c in 0..sg.channels {
            for ky in 0..sg.kh {
                let at = (c * sg.kh + ky) * wp;
                let slot = &mut self.rows[at..at + wp];
                match (y * sg.sh + ky)
                    .checked_sub(sg.pad_top)
                    .filter(|&iy| iy < sg.h)
                {
                    Some(iy) => {
                        // SAFETY: row `iy` of channel `c` is inside the image.
                        let src = unsafe {
                            std::slice::from_raw_parts(
                                self.image.add((c * sg.h + iy) * sg.w),
                                width,
                            )
                        };
                        let dst = &mut slot[sg.pad_left..sg.pad_left + width];
                        match self.in_clip {
                            // `max` then `min`, as the clip's nodes.
                            Some((lo, hi)) => {
                                for (d, &v) in dst.iter_mut().zip(src) {
                                    *d = v.max(lo).min(hi);
                                }
                            }
                            None => dst.copy_from_slice(src),
                        }
                    }
                    None => slot.fill(0.0),
                }
            }
        }
        let k = Broadcasts {
            src: self.rows.as_ptr(),
            offsets: &self.offsets,
            weights: self.weights,
            bias: self.bias,
            lo: self.lo,
            hi: self.hi,
            grid: self.grid,
            dst,
        };
        let sw = sg.sw;
        let base = |ox: usize| ox * sw;
        // SAFETY: the caller's contract; every read is inside `rows` (as in
        // `DenseBlocked::run_rows`, one output row's taps).
        unsafe {
            let mut ox = 0;
            while ox + 8 <= cols {
                k.run::<L, 8>(ox, std::array::from_fn(|i| base(ox + i)));
                ox += 8;
            }
            if ox + 4 <= cols {
                k.run::<L, 4>(ox, std::array::from_fn(|i| base(ox + i)));
                ox += 4;
            }
            if ox + 2 <= cols {
                k.run::<L, 2>(ox, std::array::from_fn(|i| base(ox + i)));
                ox += 2;
            }
            if ox < cols {
                k.run::<L, 1>(ox, [base(ox)]);
            }
        }
    }
}

impl Blocked<'_> {
    /// Convolves channel block `block` of one image: `input` holds its `cn ≤ lanes` planes of
    /// `h × w` (channels `block·lanes ..`), `output` their `ho × wo` results.
    ///
    /// # Panics
    /// If a slice has the wrong length (a programming error: the tract op checks shapes first).
    pub fn run(&self, input: &[f32], block: usize, output: &mut [f32], scratch: &mut BlockScratch) {
        let g = self.geo;
        let cn = input.len() / (g.h * g.w).max(1);
        assert_eq!(output.len(), cn * g.ho * g.wo, "depthwise output block");
        // SAFETY: `output` is the block's, whole, and borrowed mutably here.
        unsafe { self.run_rows(input, block, 0..g.ho, output.as_mut_ptr(), scratch) }
    }

    /// [`Blocked::run`] for output rows `rows` only, of the block's output planes at `output`
    /// (`cn × ho × wo` floats): the threads of one convolution split its rows too, so that each
    /// reads mostly what it wrote in the previous operator (which split positions).
    ///
    /// # Safety
    /// `output` must hold the block's `cn` output planes, and no one else may write these rows
    /// of them meanwhile.
    ///
    /// # Panics
    /// As [`Blocked::run`], and if `rows` passes `ho`.
    pub unsafe fn run_rows(
        &self,
        input: &[f32],
        block: usize,
        rows: Range<usize>,
        output: *mut f32,
        scratch: &mut BlockScratch,
    ) {
        let g = self.geo;
        assert!(rows.start <= rows.end && rows.end <= g.ho, "depthwise rows");
        let lanes = self.isa.lanes();
        let taps = g.kh * g.kw;
        let in_plane = g.h * g.w;
        assert!(
            in_plane > 0 && (self.stem.is_some() || input.len().is_multiple_of(in_plane)),
            "depthwise input block"
        );
        // With an expand, the input is the image's `cin` planes, from which the block's
        // channels are computed; with a stem, the stem's input (the image).
        let stem = self.stem.map(|d| {
            let sg = d.geo;
            let (_, wp) = sg.padded();
            let taps = sg.channels * sg.kh * sg.kw;
            assert_eq!(input.len(), sg.channels * sg.h * sg.w, "stem input");
            assert!(
                d.cout == g.channels && sg.ho == g.h && sg.wo == g.w && d.isa == self.isa,
                "stem shape"
            );
            assert!(
                d.weights.len() >= (block + 1) * taps * lanes
                    && d.bias.len() >= (block + 1) * lanes,
                "stem packed weights"
            );
            let kh = sg.kh;
            StemRows {
                image: input.as_ptr(),
                sg: *sg,
                rows: vec![0.0; sg.channels * kh * wp],
                offsets: (0..sg.channels)
                    .flat_map(|c| {
                        (0..kh)
                            .flat_map(move |ky| (0..sg.kw).map(move |kx| (c * kh + ky) * wp + kx))
                    })
                    .collect(),
                // SAFETY (both): block `block` is inside the packed buffers (checked above).
                weights: unsafe { d.weights.as_ptr().add(block * taps * lanes) },
                bias: unsafe { d.bias.as_ptr().add(block * lanes) },
                lo: d.lo,
                hi: d.hi,
                grid: d.grid,
                in_clip: d.in_clip,
            }
        });
        let cn = match &self.expand {
            _ if stem.is_some() => lanes.min(g.channels.saturating_sub(block * lanes)),
            Some(e) => {
                assert_eq!(input.len(), e.cin * in_plane, "expand input");
                assert!(
                    e.weights.len() >= (block + 1) * e.cin * lanes
                        && e.bias.len() >= (block + 1) * lanes,
                    "expand packed weights"
                );
                lanes.min(g.channels.saturating_sub(block * lanes))
            }
            None => input.len() / in_plane,
        };
        assert!(
            (1..=lanes).contains(&cn),
            "depthwise block of {cn} channels"
        );
        assert!(
            self.weights.len() >= (block + 1) * taps * lanes,
            "depthwise packed weights"
        );
        assert!(
            self.bias.len() >= (block + 1) * lanes,
            "depthwise packed bias"
        );
        let (hp, wp) = g.padded();
        let weights = &self.weights[block * taps * lanes..(block + 1) * taps * lanes];
        let bias = &self.bias[block * lanes..(block + 1) * lanes];
        let expand = self.expand.map(|e| ExpandRows {
            cin: e.cin,
            // SAFETY (both): block `block` is inside the packed buffers (checked above).
            weights: unsafe { e.weights.as_ptr().add(block * e.cin * lanes) },
            bias: unsafe { e.bias.as_ptr().add(block * lanes) },
            lo: e.lo,
            hi: e.hi,
        });
        if expand.is_some() || stem.is_some() || by_rows(g, lanes) {
            if scratch.laid_out != Some((*g, lanes, true)) {
                for (v, len) in [
                    (&mut scratch.ring, g.kh * wp * lanes),
                    (&mut scratch.tile, lanes * lanes),
                ] {
                    v.clear();
                    v.resize(len + ALIGN_FLOATS, 0.0);
                }
                scratch.offsets = vec![0; taps];
                scratch.laid_out = Some((*g, lanes, true));
            }
            let job = RowsJob {
                g,
                input,
                expand,
                stem,
                cn,
                rows,
                weights,
                bias,
                lo: self.lo,
                hi: self.hi,
                grid: self.grid,
                ring: aligned(&mut scratch.ring, g.kh * wp * lanes),
                offsets: &mut scratch.offsets,
                tile: aligned(&mut scratch.tile, lanes * lanes),
                output,
            };
            // SAFETY: `RowsJob::run` writes ring row `r % kh` (`wp × lanes` floats) at columns
            // `pad_left + x < wp`, reads it at `offset + ox·sw·lanes` with `ox·sw + kx < wp`,
            // writes `tile` (`lanes` vectors) and the `cn` planes of `input` and `output` (with
            // an expand: reads its `cin` planes of `input` and the block's packed weights),
            // whose lengths are checked above; the ISA is one this CPU runs.
            unsafe { dispatch(self.isa, job) };
            return;
        }
        // The padded input, then one vector of trash for the input positions no output reads.
        let trash = hp * wp * lanes;
        if scratch.laid_out != Some((*g, lanes, false)) {
            for (v, len) in [
                (&mut scratch.padded, trash + lanes),
                (&mut scratch.tile, lanes * lanes),
            ] {
                v.clear();
                v.resize(len + ALIGN_FLOATS, 0.0);
            }
            scratch.slots = (0..in_plane)
                .map(|q| {
                    let (y, x) = (q / g.w + g.pad_top, q % g.w + g.pad_left);
                    if y < hp && x < wp {
                        (y * wp + x) * lanes
                    } else {
                        trash
                    }
                })
                .collect();
            scratch.offsets = (0..g.kh)
                .flat_map(|ky| (0..g.kw).map(move |kx| (ky * wp + kx) * lanes))
                .collect();
            scratch.bases = (0..g.ho * g.wo)
                .map(|q| ((q / g.wo) * g.sh * wp + (q % g.wo) * g.sw) * lanes)
                .collect();
            scratch.laid_out = Some((*g, lanes, false));
        }
        let job = Job {
            g,
            input,
            cn,
            rows,
            weights,
            bias,
            lo: self.lo,
            hi: self.hi,
            grid: self.grid,
            padded: aligned(&mut scratch.padded, trash + lanes),
            slots: &scratch.slots,
            offsets: &scratch.offsets,
            bases: &scratch.bases,
            tile: aligned(&mut scratch.tile, lanes * lanes),
            output,
        };
        // SAFETY: `Job::run` writes `padded` at the slots (each `< trash`, or `trash`, with
        // `lanes` floats after it), reads it at `base(q) + offsets[t]` (the last output's last
        // tap reads row `hp − 1`, column `wp − 1`), writes `tile` (`lanes` vectors) and the
        // `cn` planes of `input` and `output`, whose lengths are checked above; the ISA is one
        // this CPU runs.
        unsafe { dispatch(self.isa, job) }
    }
}

struct Job<'a> {
    g: &'a Geometry,
    input: &'a [f32],
    cn: usize,
    rows: Range<usize>,
    weights: &'a [f32],
    bias: &'a [f32],
    lo: f32,
    hi: f32,
    grid: Option<Grid>,
    padded: &'a mut [f32],
    slots: &'a [usize],
    offsets: &'a [usize],
    /// Each output's first input in `padded` (`ho × wo` of them).
    bases: &'a [usize],
    tile: &'a mut [f32],
    output: *mut f32,
}

impl Work for Job<'_> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        let g = self.g;
        let n = L::N;
        let (in_plane, out_plane) = (g.h * g.w, g.ho * g.wo);
        let (src, pad, slots) = (self.input.as_ptr(), self.padded.as_mut_ptr(), self.slots);
        // 1. Interleave the block's planes into the padded scratch, `N` positions × `N`
        // channels at a time (what is left over, and a block of fewer channels, a float at a
        // time): input position q goes to its slot.
        // SAFETY: see `Blocked::run`.
        // Only the input rows that output rows `rows` read.
        let first = (self.rows.start * g.sh).saturating_sub(g.pad_top).min(g.h);
        let end = ((self.rows.end.max(1) - 1) * g.sh + g.kh)
            .saturating_sub(g.pad_top)
            .min(g.h)
            .max(first);
        let (q_end, mut q) = (end * g.w, first * g.w);
        unsafe {
            if self.cn == n {
                while q + n <= q_end {
                    L::transpose(src.add(q), in_plane, |k| {
                        pad.add(*slots.get_unchecked(q + k))
                    });
                    q += n;
                }
            }
            for (q, &slot) in slots[..q_end].iter().enumerate().skip(q) {
                let d = pad.add(slot);
                for c in 0..self.cn {
                    *d.add(c) = *src.add(c * in_plane + q);
                }
            }
        }
        // 2. Convolve `N` output positions at a time into the tile, eight (eight accumulator
        // chains) at a time, then 3. transpose the tile into the block's output planes.
        let bases = self.bases;
        assert_eq!(bases.len(), g.ho * g.wo, "depthwise output offsets");
        // SAFETY: `q < ho × wo` (below: `q0 + i < q_end ≤ ho × wo`).
        let base = |q: usize| unsafe { *bases.get_unchecked(q) };
        let (tile, out) = (self.tile.as_mut_ptr(), self.output);
        let k = Taps {
            src: pad,
            offsets: self.offsets,
            weights: self.weights.as_ptr(),
            taps: g.kh * g.kw,
            kw: g.kw,
            sw: g.sw,
            bias: self.bias.as_ptr(),
            lo: self.lo,
            hi: self.hi,
            grid: self.grid,
            dst: tile,
        };
        let (mut q0, q_end) = (self.rows.start * g.wo, self.rows.end * g.wo);
        // SAFETY: see `Blocked::run`; tile row `r` is `tile[r·n ..][..n]`, `r < count ≤ n`.
        unsafe {
            while q0 < q_end {
                let count = n.min(q_end - q0);
                k.positions::<L, true>(count, |i| base(q0 + i), self.cn, out.add(q0), out_plane);
                q0 += count;
            }
        }
    }
}

/// Whether a block runs row by row ([`RowsJob`]): where the whole padded block (`hp·wp·N`
/// floats) is at least [`ROWS_FROM_BYTES`], twice a core's L1 data cache or more, so that
/// interleaving it all before the taps read it would send it to L2 and back; a ring of `kh`
/// rows, each interleaved just before it is read, stays in L1. On Lite0 with 16 lanes: the
/// 112×112 and 56×56 maps (215–830 KB; measured 1.2–1.25× on the 112×112 maps, and 0.20 →
/// 0.15 ms on the 56×56 → 28×28 stride-2 convolution), not the 28×28 (54–64 KB; measured no
/// gain with 5×5 taps and 0.06 → 0.08 ms with 3×3, stride 2).
pub(crate) fn by_rows(g: &Geometry, lanes: usize) -> bool {
    let (hp, wp) = g.padded();
    lanes > 1 && hp * wp * lanes * std::mem::size_of::<f32>() >= ROWS_FROM_BYTES
}

/// The smallest padded block (bytes) [`by_rows`] takes row by row.
const ROWS_FROM_BYTES: usize = 96 * 1024;

/// One block of a wide map, row by row: the padded rows an output row reads are interleaved
/// into a ring of `kh` rows as it reaches them (each input row once), then the output row is
/// convolved `N` positions at a time and transposed out.
struct RowsJob<'a> {
    g: &'a Geometry,
    input: &'a [f32],
    /// With it, `input` is the expand's input, and the ring's rows are computed from it.
    expand: Option<ExpandRows>,
    /// Or the stem's, from the image.
    stem: Option<StemRows>,
    cn: usize,
    rows: Range<usize>,
    weights: &'a [f32],
    bias: &'a [f32],
    lo: f32,
    hi: f32,
    grid: Option<Grid>,
    ring: &'a mut [f32],
    offsets: &'a mut [usize],
    tile: &'a mut [f32],
    output: *mut f32,
}

impl Work for RowsJob<'_> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        let g = self.g;
        let n = L::N;
        let (_, wp) = g.padded();
        let (in_plane, out_plane) = (g.h * g.w, g.ho * g.wo);
        let row_len = wp * n;
        let cols = g.w.min(wp.saturating_sub(g.pad_left));
        let (src, ring) = (self.input.as_ptr(), self.ring.as_mut_ptr());
        let (tile, out) = (self.tile.as_mut_ptr(), self.output);
        let mut stem = self.stem;
        // Padded rows `..filled` have been laid into the ring.
        let mut filled = self.rows.start * g.sh;
        // SAFETY: see `Blocked::run`.
        unsafe {
            for oy in self.rows.clone() {
                while filled < oy * g.sh + g.kh {
                    let slot = ring.add((filled % g.kh) * row_len);
                    match filled.checked_sub(g.pad_top).filter(|&y| y < g.h) {
                        Some(y) => {
                            // Columns outside `pad_left..pad_left + cols` stay zero: nothing
                            // else is ever written there.
                            let row = src.add(y * g.w);
                            let dst = slot.add(g.pad_left * n);
                            if let Some(e) = &self.expand {
                                e.row::<L>(row, in_plane, cols, dst);
                                filled += 1;
                                continue;
                            }
                            if let Some(d) = &mut stem {
                                d.row::<L>(y, cols, dst);
                                filled += 1;
                                continue;
                            }
                            let mut x = 0;
                            if self.cn == n {
                                while x + n <= cols {
                                    L::transpose(row.add(x), in_plane, |k| dst.add((x + k) * n));
                                    x += n;
                                }
                            }
                            for x in x..cols {
                                for c in 0..self.cn {
                                    *dst.add(x * n + c) = *row.add(c * in_plane + x);
                                }
                            }
                        }
                        // A row of the padding above or below the input.
                        None => std::ptr::write_bytes(slot, 0, row_len),
                    }
                    filled += 1;
                }
                for ky in 0..g.kh {
                    let base = ((oy * g.sh + ky) % g.kh) * row_len;
                    for kx in 0..g.kw {
                        self.offsets[ky * g.kw + kx] = base + kx * n;
                    }
                }
                let k = Taps {
                    src: ring,
                    offsets: self.offsets,
                    weights: self.weights.as_ptr(),
                    taps: g.kh * g.kw,
                    kw: g.kw,
                    sw: g.sw,
                    bias: self.bias.as_ptr(),
                    lo: self.lo,
                    hi: self.hi,
                    grid: self.grid,
                    dst: tile,
                };
                let base = |ox: usize| ox * g.sw * n;
                let mut x0 = 0;
                while x0 < g.wo {
                    let count = n.min(g.wo - x0);
                    let o = out.add(oy * g.wo + x0);
                    k.positions::<L, false>(count, |i| base(x0 + i), self.cn, o, out_plane);
                    x0 += count;
                }
            }
        }
    }
}

/// The end of every output vector of a block: the bias, the clamp, and in a QDQ graph the
/// grid of the fake quantisation that follows (`clamp(round_even(y / s), −zp, 255 − zp) · s`,
/// [`Grid::one`]'s operations on a vector: the same values for finite sums).
#[derive(Clone, Copy)]
struct Finish<L> {
    bias: L,
    lo: L,
    hi: L,
    grid: Option<[L; 4]>,
}

impl<L: Lanes> Finish<L> {
    /// # Safety
    /// `bias` points at one vector; the CPU runs `L`.
    #[inline(always)]
    unsafe fn new(bias: *const f32, lo: f32, hi: f32, grid: Option<Grid>) -> Self {
        unsafe {
            Finish {
                bias: L::load(bias),
                lo: L::splat(lo),
                hi: L::splat(hi),
                grid: grid.map(|g| {
                    [
                        L::splat(g.inv),
                        L::splat(g.scale),
                        L::splat(-(g.zero_point as f32)),
                        L::splat(255.0 - g.zero_point as f32),
                    ]
                }),
            }
        }
    }

    /// # Safety
    /// The CPU runs `L`.
    #[inline(always)]
    unsafe fn apply(&self, a: L) -> L {
        unsafe {
            let y = L::add(a, self.bias).clamp(self.lo, self.hi);
            match self.grid {
                Some([inv, scale, lo, hi]) => {
                    L::mul(L::mul(y, inv).round_even().clamp(lo, hi), scale)
                }
                None => y,
            }
        }
    }
}

/// What every group of outputs of a block shares.
struct Taps<'a> {
    src: *const f32,
    /// Scratch offset of each tap from an output's first input, row-major like the weights.
    offsets: &'a [usize],
    /// The block's `[tap][lane]` weights.
    weights: *const f32,
    taps: usize,
    /// Taps per row (`offsets[ky·kw + kx] = offsets[ky·kw] + kx·N`) and the horizontal
    /// stride.
    kw: usize,
    sw: usize,
    bias: *const f32,
    lo: f32,
    hi: f32,
    grid: Option<Grid>,
    dst: *mut f32,
}

impl Taps<'_> {
    /// `count ≤ N` output positions, the `i`-th reading its first input at `base(i)`: computed
    /// into the tile eight at a time (eight accumulator chains; with `SPLIT`, eight that cross
    /// a row as two runs, [`Taps::group_split`]), then 4, 2, 1, and written to
    /// the block's `cn` output planes, `plane` apart from `out` on.
    #[inline(always)]
    unsafe fn positions<L: Lanes, const SPLIT: bool>(
        &self,
        count: usize,
        base: impl Fn(usize) -> usize,
        cn: usize,
        out: *mut f32,
        plane: usize,
    ) {
        let (n, tile) = (L::N, self.dst);
        let mut r = 0;
        unsafe {
            while r + 8 <= count {
                let bases = std::array::from_fn(|i| base(r + i));
                if SPLIT {
                    self.group_split::<L>(r, bases);
                } else {
                    self.group::<L, 8>(r, bases);
                }
                r += 8;
            }
            if r + 4 <= count {
                self.group::<L, 4>(r, std::array::from_fn(|i| base(r + i)));
                r += 4;
            }
            if r + 2 <= count {
                self.group::<L, 2>(r, std::array::from_fn(|i| base(r + i)));
                r += 2;
            }
            if r < count {
                self.group::<L, 1>(r, [base(r)]);
            }
            if count == n && cn == n {
                L::transpose(tile, n, |c| out.add(c * plane));
            } else {
                for c in 0..cn {
                    for i in 0..count {
                        *out.add(c * plane + i) = *tile.add(i * n + c);
                    }
                }
            }
        }
    }

    /// `R` output positions from `q` on, whose first inputs lie at `bases`: along one row by
    /// [`Taps::row`] where it has a kernel for these taps and the registers hold what it
    /// keeps, else tap by tap ([`Taps::run`]).
    #[inline(always)]
    unsafe fn group<L: Lanes, const R: usize>(&self, q: usize, bases: [usize; R]) {
        let step = self.sw * L::N;
        // Within an output row the bases are `step` apart; across rows they jump further.
        let one_row = bases[R - 1] - bases[0] == (R - 1) * step;
        // 32 vector registers (AVX-512) hold every group's inputs; 16 (AVX2) spill on stride 2
        // (measured 0.130 -> 0.135 ms on 56×56, 5×5) and on groups under 8 (7×7 maps: 3–7%).
        let fits = L::N >= 16 || (R == 8 && self.sw == 1);
        unsafe {
            match (one_row && fits, self.kw, self.sw) {
                (true, 3, 1) => self.row::<L, R, 3, 1>(q, bases[0]),
                (true, 5, 1) => self.row::<L, R, 5, 1>(q, bases[0]),
                (true, 3, 2) => self.row::<L, R, 3, 2>(q, bases[0]),
                (true, 5, 2) => self.row::<L, R, 5, 2>(q, bases[0]),
                _ => self.run::<L, R>(q, bases),
            }
        }
    }

    /// Eight outputs from `q` on, whose first inputs lie at `bases`: as [`Taps::group`], and
    /// where they cross from one output row to the next (the 7×7 and 14×14 maps' groups do),
    /// with 5-wide rows of taps and 32 registers, as the rows' two runs, each sharing its loads
    /// ([`Taps::two_rows`]). Only the whole-block layout calls it: the rows of the ring layout
    /// never cross, and keeping this out of that path keeps its code as it was (measured: the
    /// extra arms in the shared path cost 12–16% on the 3×3 ring convolutions).
    #[inline(always)]
    unsafe fn group_split<L: Lanes>(&self, q: usize, bases: [usize; 8]) {
        let step = self.sw * L::N;
        unsafe {
            if L::N >= 16 && self.kw == 5 && self.sw == 1 && bases[7] - bases[0] != 7 * step {
                let a = (1..8)
                    .find(|&i| bases[i] - bases[i - 1] != step)
                    .unwrap_or(8);
                if a < 8 && bases[7] - bases[a] == (7 - a) * step {
                    return self.two_rows::<L>(q, a, bases[0], bases[a]);
                }
            }
            self.group::<L, 8>(q, bases)
        }
    }

    /// Eight outputs from `q` on: the first `a` along one row from `base_a`, the other
    /// `8 − a` along the next from `base_b` ([`Taps::split`] for this `a` and these taps).
    #[inline(always)]
    unsafe fn two_rows<L: Lanes>(&self, q: usize, a: usize, base_a: usize, base_b: usize) {
        macro_rules! by_a {
            ($kw:literal, $sw:literal) => {
                match a {
                    1 => self.split::<L, 1, $kw, $sw>(q, base_a, base_b),
                    2 => self.split::<L, 2, $kw, $sw>(q, base_a, base_b),
                    3 => self.split::<L, 3, $kw, $sw>(q, base_a, base_b),
                    4 => self.split::<L, 4, $kw, $sw>(q, base_a, base_b),
                    5 => self.split::<L, 5, $kw, $sw>(q, base_a, base_b),
                    6 => self.split::<L, 6, $kw, $sw>(q, base_a, base_b),
                    _ => self.split::<L, 7, $kw, $sw>(q, base_a, base_b),
                }
            };
        }
        unsafe {
            match (self.kw, self.sw) {
                (5, 1) => by_a!(5, 1),
                _ => self.run::<L, 8>(
                    q,
                    std::array::from_fn(|i| {
                        if i < a {
                            base_a + i * self.sw * L::N
                        } else {
                            base_b + (i - a) * self.sw * L::N
                        }
                    }),
                ),
            }
        }
    }

    /// Eight outputs from `q` on, `A` along one row from `base_a` and `8 − A` along another
    /// from `base_b`: [`Taps::row`] for both runs at once, so that every tap's weights are
    /// loaded once for all eight and there are still eight accumulator chains. The same sums in
    /// the same order as [`Taps::run`].
    #[inline(always)]
    unsafe fn split<L: Lanes, const A: usize, const KW: usize, const SW: usize>(
        &self,
        q: usize,
        base_a: usize,
        base_b: usize,
    ) {
        const MOST: usize = 6 * 2 + 5;
        unsafe {
            let n = L::N;
            let mut acc = [L::splat(0.0); 8];
            for ky in 0..self.taps / KW {
                let off = *self.offsets.get_unchecked(ky * KW);
                let (at_a, at_b) = (self.src.add(off + base_a), self.src.add(off + base_b));
                let mut xa = [L::splat(0.0); MOST];
                let mut xb = [L::splat(0.0); MOST];
                for (j, x) in xa.iter_mut().enumerate().take((A - 1) * SW + KW) {
                    *x = L::load(at_a.add(j * n));
                }
                for (j, x) in xb.iter_mut().enumerate().take((8 - A - 1) * SW + KW) {
                    *x = L::load(at_b.add(j * n));
                }
                for kx in 0..KW {
                    let w = L::load(self.weights.add((ky * KW + kx) * n));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let x = if i < A {
                            xa[i * SW + kx]
                        } else {
                            xb[(i - A) * SW + kx]
                        };
                        *acc = L::mul_add(x, w, *acc);
                    }
                }
            }
            let fin = Finish::<L>::new(self.bias, self.lo, self.hi, self.grid);
            for (r, a) in acc.iter().enumerate() {
                fin.apply(*a).store(self.dst.add((q + r) * n));
            }
        }
    }

    /// `R` neighbouring outputs of one row from `q` on, the first reading its first input at
    /// `base`: per row of taps, the `(R − 1)·SW + KW` input vectors they read are loaded once
    /// each and every tap's FMAs take them from registers (tap by tap, each output loads its
    /// own: 8 loads for 8 FMAs, where the load ports, not the FMAs, set the pace). The same
    /// sums in the same order as [`Taps::run`].
    #[inline(always)]
    unsafe fn row<L: Lanes, const R: usize, const KW: usize, const SW: usize>(
        &self,
        q: usize,
        base: usize,
    ) {
        // The most input vectors one row of taps reads (R = 8, SW = 2, KW = 5).
        const MOST: usize = 7 * 2 + 5;
        unsafe {
            let n = L::N;
            let mut acc = [L::splat(0.0); R];
            for ky in 0..self.taps / KW {
                let at = self.src.add(*self.offsets.get_unchecked(ky * KW) + base);
                let mut xs = [L::splat(0.0); MOST];
                for (j, x) in xs.iter_mut().enumerate().take((R - 1) * SW + KW) {
                    *x = L::load(at.add(j * n));
                }
                for kx in 0..KW {
                    let w = L::load(self.weights.add((ky * KW + kx) * n));
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = L::mul_add(xs[i * SW + kx], w, *a);
                    }
                }
            }
            let fin = Finish::<L>::new(self.bias, self.lo, self.hi, self.grid);
            for (r, a) in acc.iter().enumerate() {
                fin.apply(*a).store(self.dst.add((q + r) * n));
            }
        }
    }

    /// `R` output positions from `q` on, whose first inputs lie at `bases`.
    #[inline(always)]
    unsafe fn run<L: Lanes, const R: usize>(&self, q: usize, bases: [usize; R]) {
        unsafe {
            let n = L::N;
            // The bias is added after the taps, as tract's and the planes' kernels do: on the
            // QDQ `int8` graph a different rounding order flips enough requantised values to
            // move the embedding (cosine to onnxruntime 0.9991 -> 0.9990 on a fixture).
            let mut acc = [L::splat(0.0); R];
            for t in 0..self.taps {
                let w = L::load(self.weights.add(t * n));
                let p = self.src.add(*self.offsets.get_unchecked(t));
                for (a, b) in acc.iter_mut().zip(&bases) {
                    *a = L::mul_add(L::load(p.add(*b)), w, *a);
                }
            }
            let fin = Finish::<L>::new(self.bias, self.lo, self.hi, self.grid);
            for (r, a) in acc.iter().enumerate() {
                fin.apply(*a).store(self.dst.add((q + r) * n));
            }
        }
    }
}

/// A dense convolution over few input channels (a network's stem: 3 → 32 channels, 3×3,
/// stride 2) with its *output* channels side by side: each output position of a block of `N`
/// output channels is the bias plus `cin × kh × kw` fused multiply-adds of the tap's `N` weights
/// (from [`pack`] over `[cout][cin·kh·kw]`) by one input value broadcast, eight positions at a
/// time; a row of results is transposed into the output planes. The input is read where it
/// lies, from one zero-padded copy per image ([`DenseBlocked::pad`]), whatever the stride.
#[derive(Debug, Clone, Copy)]
pub struct DenseBlocked<'a> {
    /// The convolution's shape, `channels` counting its input channels.
    pub geo: &'a Geometry,
    /// Output channels.
    pub cout: usize,
    /// Weights from [`pack`] (`cout` channels of `channels × kh × kw` taps) with this ISA's
    /// lanes.
    pub weights: &'a [f32],
    /// Biases from [`pack`].
    pub bias: &'a [f32],
    /// Which compiled kernel runs it.
    pub isa: Isa,
    /// Outputs are clamped to `[lo, hi]` (±∞: no clip).
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
    /// Then put on a quantisation grid (a QDQ graph's fake quantisation, folded in).
    pub grid: Option<Grid>,
    /// The input clamped to this range as it is padded (a clip before the convolution).
    pub in_clip: Option<(f32, f32)>,
}

impl DenseBlocked<'_> {
    /// Copies one image (`[channels][h][w]`) into `padded`, `[channel][hp][wp]` with zeros
    /// around it, sized to what the outputs read.
    ///
    /// # Panics
    /// If `image` has the wrong length.
    pub fn pad(&self, image: &[f32], padded: &mut Vec<f32>) {
        let g = self.geo;
        assert_eq!(
            image.len(),
            g.channels * g.h * g.w,
            "dense convolution input"
        );
        let (hp, wp) = g.padded();
        let rows = g.h.min(hp.saturating_sub(g.pad_top));
        let cols = g.w.min(wp.saturating_sub(g.pad_left));
        padded.clear();
        padded.resize(g.channels * hp * wp, 0.0);
        for c in 0..g.channels {
            for y in 0..rows {
                let src = &image[(c * g.h + y) * g.w..][..cols];
                let at = (c * hp + y + g.pad_top) * wp + g.pad_left;
                let dst = &mut padded[at..at + cols];
                match self.in_clip {
                    // `max` then `min`, as the clip's nodes.
                    Some((lo, hi)) => {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v.max(lo).min(hi);
                        }
                    }
                    None => dst.copy_from_slice(src),
                }
            }
        }
    }

    /// Computes output rows `rows` of every output channel from [`DenseBlocked::pad`]'s
    /// `padded` into `output`, one image's `[cout][ho][wo]`. `row` is working memory.
    ///
    /// # Safety
    /// `output` must hold `cout × ho × wo` floats, and no one else may write these rows of it
    /// meanwhile.
    ///
    /// # Panics
    /// If `padded` or the packed weights have the wrong length, or `rows` passes `ho`.
    pub unsafe fn run_rows(
        &self,
        padded: &[f32],
        rows: std::ops::Range<usize>,
        output: *mut f32,
        row: &mut Vec<f32>,
    ) {
        let g = self.geo;
        let lanes = self.isa.lanes();
        let (hp, wp) = g.padded();
        let taps = g.channels * g.kh * g.kw;
        assert_eq!(
            padded.len(),
            g.channels * hp * wp,
            "dense convolution scratch"
        );
        let blocks = self.cout.div_ceil(lanes);
        assert!(
            self.weights.len() >= blocks * taps * lanes,
            "dense packed weights"
        );
        assert!(self.bias.len() >= blocks * lanes, "dense packed bias");
        assert!(rows.end <= g.ho, "dense convolution rows");
        // Room for two blocks' rows (`DenseJob::run` computes two blocks at once).
        row.clear();
        row.resize(2 * g.wo * lanes + ALIGN_FLOATS, 0.0);
        let offsets: Vec<usize> = (0..g.channels)
            .flat_map(|c| {
                (0..g.kh).flat_map(move |ky| (0..g.kw).map(move |kx| (c * hp + ky) * wp + kx))
            })
            .collect();
        let job = DenseJob {
            d: *self,
            padded: padded.as_ptr(),
            offsets: &offsets,
            rows,
            output,
            row: aligned(row, 2 * g.wo * lanes).as_mut_ptr(),
        };
        // SAFETY: every read of `padded` is at `base + offset` with base ≤ `(ho − 1)·sh·wp +
        // (wo − 1)·sw` and offset ≤ `(c·hp + kh − 1)·wp + kw − 1`: inside `channels × hp ×
        // wp`; `row` holds `wo` vectors; the output rows are the caller's to write; the ISA is
        // one this CPU runs.
        unsafe { dispatch(self.isa, job) }
    }
}

struct DenseJob<'a> {
    d: DenseBlocked<'a>,
    padded: *const f32,
    offsets: &'a [usize],
    rows: std::ops::Range<usize>,
    output: *mut f32,
    row: *mut f32,
}

impl Work for DenseJob<'_> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        let (d, g, n) = (self.d, self.d.geo, L::N);
        let (_, wp) = g.padded();
        let taps = self.offsets.len();
        let plane = g.ho * g.wo;
        let blocks = d.cout.div_ceil(n);
        let block = |cb: usize, dst: *mut f32| Broadcasts {
            src: self.padded,
            offsets: self.offsets,
            // SAFETY (both): block `cb` is inside the packed buffers (checked by `run_rows`).
            weights: unsafe { d.weights.as_ptr().add(cb * taps * n) },
            bias: unsafe { d.bias.as_ptr().add(cb * n) },
            lo: d.lo,
            hi: d.hi,
            grid: d.grid,
            dst,
        };
        // SAFETY: `row` holds two blocks' rows of `wo` vectors (`run_rows`).
        let second = unsafe { self.row.add(g.wo * n) };
        for oy in self.rows.clone() {
            let base = |ox: usize| oy * g.sh * wp + ox * g.sw;
            let mut cb = 0;
            while cb < blocks {
                // Two blocks at once where 32 vector registers hold both accumulators (16 of
                // them): each broadcast input then feeds two FMAs, and per tap 10 loads
                // serve 16 FMAs instead of 9 serving 8.
                let k = block(cb, self.row);
                let pair = (n >= 16 && cb + 1 < blocks).then(|| block(cb + 1, second));
                // SAFETY: see `run_rows`; output `ox` of block `cb + j`'s row goes to
                // `row[(j·wo + ox)·n ..][..n]`.
                unsafe {
                    let mut ox = 0;
                    if let Some(k2) = &pair {
                        while ox + 8 <= g.wo {
                            k.pair::<L, 8>(k2, ox, std::array::from_fn(|i| base(ox + i)));
                            ox += 8;
                        }
                        if ox + 4 <= g.wo {
                            k.pair::<L, 4>(k2, ox, std::array::from_fn(|i| base(ox + i)));
                            ox += 4;
                        }
                        if ox + 2 <= g.wo {
                            k.pair::<L, 2>(k2, ox, std::array::from_fn(|i| base(ox + i)));
                            ox += 2;
                        }
                        if ox < g.wo {
                            k.pair::<L, 1>(k2, ox, [base(ox)]);
                        }
                    } else {
                        while ox + 8 <= g.wo {
                            k.run::<L, 8>(ox, std::array::from_fn(|i| base(ox + i)));
                            ox += 8;
                        }
                        if ox + 4 <= g.wo {
                            k.run::<L, 4>(ox, std::array::from_fn(|i| base(ox + i)));
                            ox += 4;
                        }
                        if ox + 2 <= g.wo {
                            k.run::<L, 2>(ox, std::array::from_fn(|i| base(ox + i)));
                            ox += 2;
                        }
                        if ox < g.wo {
                            k.run::<L, 1>(ox, [base(ox)]);
                        }
                    }
                    for (j, row) in [self.row, second]
                        .into_iter()
                        .enumerate()
                        .take(1 + pair.is_some() as usize)
                    {
                        let cb = cb + j;
                        let cn = n.min(d.cout - cb * n);
                        let out = self.output.add(cb * n * plane + oy * g.wo);
                        let mut x0 = 0;
                        if cn == n {
                            while x0 + n <= g.wo {
                                L::transpose(row.add(x0 * n), n, |c| out.add(c * plane + x0));
                                x0 += n;
                            }
                        }
                        for c in 0..cn {
                            for x in x0..g.wo {
                                *out.add(c * plane + x) = *row.add(x * n + c);
                            }
                        }
                    }
                }
                cb += 1 + pair.is_some() as usize;
            }
        }
    }
}

/// What every group of outputs of a dense row shares.
struct Broadcasts<'a> {
    src: *const f32,
    /// Offset of each tap `(ci, ky, kx)` from an output's first input, in the weights' order.
    offsets: &'a [usize],
    /// The block's `[tap][lane]` weights.
    weights: *const f32,
    bias: *const f32,
    lo: f32,
    hi: f32,
    grid: Option<Grid>,
    dst: *mut f32,
}

impl Broadcasts<'_> {
    /// As [`Broadcasts::run`] for this block and `other` (the same input, another block of
    /// output channels) at once: each input value is broadcast once for both.
    #[inline(always)]
    unsafe fn pair<L: Lanes, const R: usize>(&self, other: &Self, ox: usize, bases: [usize; R]) {
        unsafe {
            let n = L::N;
            let mut acc = [[L::splat(0.0); R]; 2];
            for (t, &o) in self.offsets.iter().enumerate() {
                let w = [
                    L::load(self.weights.add(t * n)),
                    L::load(other.weights.add(t * n)),
                ];
                let p = self.src.add(o);
                for (i, b) in bases.iter().enumerate() {
                    let x = L::splat_at(p.add(*b));
                    acc[0][i] = L::mul_add(x, w[0], acc[0][i]);
                    acc[1][i] = L::mul_add(x, w[1], acc[1][i]);
                }
            }
            for (k, acc) in [self, other].into_iter().zip(&acc) {
                let fin = Finish::<L>::new(k.bias, k.lo, k.hi, k.grid);
                for (r, a) in acc.iter().enumerate() {
                    fin.apply(*a).store(k.dst.add((ox + r) * n));
                }
            }
        }
    }

    /// `R` output positions from `ox` on, whose first inputs lie at `bases`.
    #[inline(always)]
    unsafe fn run<L: Lanes, const R: usize>(&self, ox: usize, bases: [usize; R]) {
        unsafe {
            let n = L::N;
            // The bias last, as in `Taps::run`.
            let mut acc = [L::splat(0.0); R];
            for (t, &o) in self.offsets.iter().enumerate() {
                let w = L::load(self.weights.add(t * n));
                let p = self.src.add(o);
                for (a, b) in acc.iter_mut().zip(&bases) {
                    *a = L::mul_add(L::splat_at(p.add(*b)), w, *a);
                }
            }
            let fin = Finish::<L>::new(self.bias, self.lo, self.hi, self.grid);
            for (r, a) in acc.iter().enumerate() {
                fin.apply(*a).store(self.dst.add((ox + r) * n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::naive;
    use super::*;
    use crate::backbone::quant::check_grid;

    #[test]
    fn every_isa_matches_the_six_loop_convolution() {
        let mut seed = 11;
        // (channels, h, w, k, s, pad_top, pad_left, extra bottom/right padding); channel
        // counts that are not multiples of any vector width.
        let cases = [
            (21, 7, 7, 5, 1, 2, 2, 2),
            (19, 14, 14, 3, 2, 0, 0, 1),
            (5, 9, 13, 3, 2, 1, 0, 0),
            (33, 5, 6, 5, 2, 2, 1, 3),
            (3, 1, 1, 3, 1, 1, 1, 1),
            (17, 17, 3, 5, 1, 0, 4, 0),
            (16, 8, 8, 3, 3, 1, 1, 0),
            (18, 9, 40, 5, 1, 2, 2, 2),
            (16, 33, 33, 3, 1, 1, 1, 1),
            // Padded blocks of 96 KiB or more (`by_rows`): the ring of rows, with 16 lanes
            // (the first two) and with 8 too.
            (3, 34, 70, 3, 2, 1, 0, 1),
            (18, 40, 40, 5, 1, 2, 2, 2),
            (16, 66, 66, 3, 1, 1, 1, 1),
        ];
        for (c, h, w, k, s, pt, pl, extra) in cases {
            let ho = (h + pt + extra - k) / s + 1;
            let wo = (w + pl + extra - k) / s + 1;
            let g = Geometry {
                batch: 2,
                channels: c,
                h,
                w,
                kh: k,
                kw: k,
                sh: s,
                sw: s,
                pad_top: pt,
                pad_left: pl,
                ho,
                wo,
            };
            let input = crate::backbone::simd::seeded_uniform(&mut seed, 2 * c * h * w, 1.0);
            let weights = crate::backbone::simd::seeded_uniform(&mut seed, c * k * k, 1.0);
            let bias = crate::backbone::simd::seeded_uniform(&mut seed, c, 1.0);
            let want = naive(&g, &input, &weights, &bias, -0.5, 1.5);
            for isa in Isa::available() {
                let lanes = block_channels(isa);
                let (pw, pb) = pack(&weights, &bias, c, k * k, lanes);
                let op = Blocked {
                    geo: &g,
                    weights: &pw,
                    bias: &pb,
                    isa,
                    lo: -0.5,
                    hi: 1.5,
                    grid: None,
                    expand: None,
                    stem: None,
                };
                // Whole planes, then bands of 3 rows (one scratch throughout, as a thread's
                // is across the blocks and bands it takes).
                for band in [ho, 3] {
                    let mut got = vec![f32::NAN; want.len()];
                    let mut scratch = BlockScratch::default();
                    for n in 0..2 {
                        for b in 0..c.div_ceil(lanes) {
                            let (c0, cn) = (b * lanes, lanes.min(c - b * lanes));
                            let i = (n * c + c0) * h * w;
                            let o = (n * c + c0) * ho * wo;
                            let x = &input[i..i + cn * h * w];
                            let y = &mut got[o..o + cn * ho * wo];
                            if band == ho {
                                op.run(x, b, y, &mut scratch);
                                continue;
                            }
                            for r in (0..ho).step_by(band) {
                                let rows = r..(r + band).min(ho);
                                // SAFETY: `y` is the block's output planes.
                                unsafe { op.run_rows(x, b, rows, y.as_mut_ptr(), &mut scratch) };
                            }
                        }
                    }
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5,
                            "{isa:?} {g:?} band {band} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// With an [`Expand`], a block computes its channels of the 1×1 convolution itself, row
    /// by row into the ring: the very numbers of that convolution (one fused multiply-add per
    /// input channel, in order, then the clip) written out and convolved without it.
    #[test]
    fn an_expand_run_inside_gives_the_very_numbers_of_the_two_convolutions() {
        let mut seed = 23;
        // (cin, channels, h, w, k, s, pad_top, pad_left, extra bottom/right padding): small
        // maps too (an expand forces the ring), channel counts off every vector width.
        let cases = [
            (5, 21, 9, 13, 3, 2, 1, 0, 0),
            (16, 19, 14, 14, 5, 1, 2, 2, 2),
            (3, 33, 34, 70, 3, 2, 1, 0, 1),
            (7, 18, 40, 40, 5, 1, 2, 2, 2),
            (1, 16, 3, 5, 3, 1, 1, 1, 1),
            // A ring with 8 lanes too.
            (2, 9, 60, 60, 3, 1, 1, 1, 1),
        ];
        for (cin, c, h, w, k, s, pt, pl, extra) in cases {
            let ho = (h + pt + extra - k) / s + 1;
            let wo = (w + pl + extra - k) / s + 1;
            let g = Geometry {
                batch: 2,
                channels: c,
                h,
                w,
                kh: k,
                kw: k,
                sh: s,
                sw: s,
                pad_top: pt,
                pad_left: pl,
                ho,
                wo,
            };
            let uniform = crate::backbone::simd::seeded_uniform;
            let input = uniform(&mut seed, 2 * cin * h * w, 1.0);
            let ew = uniform(&mut seed, c * cin, 1.0);
            let eb = uniform(&mut seed, c, 1.0);
            let weights = uniform(&mut seed, c * k * k, 1.0);
            let bias = uniform(&mut seed, c, 1.0);
            // The 1×1 convolution as its kernel computes it.
            let (elo, ehi) = (0.0, 1.25);
            let mut expanded = vec![0.0; 2 * c * h * w];
            for n in 0..2 {
                for co in 0..c {
                    for q in 0..h * w {
                        let mut a = eb[co];
                        for ci in 0..cin {
                            a = input[(n * cin + ci) * h * w + q].mul_add(ew[co * cin + ci], a);
                        }
                        expanded[(n * c + co) * h * w + q] = a.clamp(elo, ehi);
                    }
                }
            }
            let near = naive(&g, &expanded, &weights, &bias, -0.5, 1.5);
            for isa in Isa::available() {
                let lanes = block_channels(isa);
                let (pw, pb) = pack(&weights, &bias, c, k * k, lanes);
                let (xw, xb) = pack(&ew, &eb, c, cin, lanes);
                let plain = Blocked {
                    geo: &g,
                    weights: &pw,
                    bias: &pb,
                    isa,
                    lo: -0.5,
                    hi: 1.5,
                    grid: None,
                    expand: None,
                    stem: None,
                };
                let fused = Blocked {
                    expand: Some(Expand {
                        cin,
                        weights: &xw,
                        bias: &xb,
                        lo: elo,
                        hi: ehi,
                    }),
                    ..plain
                };
                let mut want = vec![f32::NAN; near.len()];
                let mut got = [vec![f32::NAN; near.len()], vec![f32::NAN; near.len()]];
                let mut scratch = BlockScratch::default();
                for n in 0..2 {
                    for b in 0..c.div_ceil(lanes) {
                        let (c0, cn) = (b * lanes, lanes.min(c - b * lanes));
                        let i = (n * c + c0) * h * w;
                        let o = (n * c + c0) * ho * wo;
                        plain.run(
                            &expanded[i..i + cn * h * w],
                            b,
                            &mut want[o..o + cn * ho * wo],
                            &mut scratch,
                        );
                        let image = &input[n * cin * h * w..(n + 1) * cin * h * w];
                        // Whole, and in bands of 2 rows (as two threads' shares cut a block).
                        for (band, got) in [ho, 2].into_iter().zip(&mut got) {
                            for r in (0..ho).step_by(band) {
                                let rows = r..(r + band).min(ho);
                                // SAFETY: `got[o..]` holds the block's output planes.
                                unsafe {
                                    fused.run_rows(
                                        image,
                                        b,
                                        rows,
                                        got[o..].as_mut_ptr(),
                                        &mut scratch,
                                    )
                                };
                            }
                        }
                    }
                }
                // Bit for bit where the plain convolution takes the ring too (as every one
                // `fuse_expand` folds into does); elsewhere its layout sums the taps in
                // another order.
                let ring = by_rows(&g, lanes);
                for got in &got {
                    for (i, ((a, b), t)) in got.iter().zip(&want).zip(&near).enumerate() {
                        if ring {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{isa:?} {g:?} at {i}: {a} vs {b}"
                            );
                        }
                        assert!((a - b).abs() <= 1e-5, "{isa:?} {g:?} at {i}: {a} vs {b}");
                        assert!((a - t).abs() <= 1e-4, "{isa:?} {g:?} at {i}: {a} vs {t}");
                    }
                }
            }
        }
    }

    /// With a stem ([`Blocked::stem`]), a block computes its channels of the stem itself, row
    /// by row into the ring, from the image rows it gathers and pads: the stem's very numbers
    /// (from the image padded whole), convolved.
    #[test]
    fn a_stem_run_inside_gives_the_very_numbers_of_the_two_convolutions() {
        let mut seed = 29;
        // (stem input channels, h, w, stem stride, stem pads, stem extra; channels; depthwise
        // k, pads, extra): the second and third with a ring wide enough for 8 and 16 lanes.
        let cases = [
            (3, 20, 26, 2, 0, 1, 21, 3, 1, 1),
            (3, 224, 224, 2, 0, 1, 32, 3, 1, 1),
            (2, 70, 66, 1, 1, 1, 19, 5, 2, 2),
        ];
        for (cs, h, w, ss, sp, se, c, k, dp, de) in cases {
            let (hs, ws) = ((h + sp + se - 3) / ss + 1, (w + sp + se - 3) / ss + 1);
            let sg = Geometry {
                batch: 1,
                channels: cs,
                h,
                w,
                kh: 3,
                kw: 3,
                sh: ss,
                sw: ss,
                pad_top: sp,
                pad_left: sp,
                ho: hs,
                wo: ws,
            };
            let (ho, wo) = ((hs + dp + de - k) + 1, (ws + dp + de - k) + 1);
            let g = Geometry {
                batch: 1,
                channels: c,
                h: hs,
                w: ws,
                kh: k,
                kw: k,
                sh: 1,
                sw: 1,
                pad_top: dp,
                pad_left: dp,
                ho,
                wo,
            };
            let uniform = crate::backbone::simd::seeded_uniform;
            let image = uniform(&mut seed, cs * h * w, 1.0);
            let sw_ = uniform(&mut seed, c * cs * 9, 1.0);
            let sb = uniform(&mut seed, c, 1.0);
            let weights = uniform(&mut seed, c * k * k, 1.0);
            let bias = uniform(&mut seed, c, 1.0);
            // Plain, and as in a QDQ graph: each convolution's output on a grid.
            let grids = [(None, None), (Some(check_grid(0)), Some(check_grid(1)))];
            for (isa, (stem_grid, grid)) in Isa::available()
                .into_iter()
                .flat_map(|i| grids.map(|g| (i, g)))
            {
                let lanes = block_channels(isa);
                let (spw, spb) = pack(&sw_, &sb, c, cs * 9, lanes);
                let stem = DenseBlocked {
                    geo: &sg,
                    cout: c,
                    weights: &spw,
                    bias: &spb,
                    isa,
                    lo: 0.0,
                    hi: 6.0,
                    grid: stem_grid,
                    // (With the grids, the image clipped too.)
                    in_clip: stem_grid.map(|_| (-0.5, 0.75)),
                };
                let mut padded = Vec::new();
                stem.pad(&image, &mut padded);
                let mut stemmed = vec![f32::NAN; c * hs * ws];
                let mut row = Vec::new();
                // SAFETY: `stemmed` holds the stem's `c × hs × ws` outputs.
                unsafe { stem.run_rows(&padded, 0..hs, stemmed.as_mut_ptr(), &mut row) };
                let (pw, pb) = pack(&weights, &bias, c, k * k, lanes);
                let plain = Blocked {
                    geo: &g,
                    weights: &pw,
                    bias: &pb,
                    isa,
                    lo: -0.5,
                    hi: 1.5,
                    grid,
                    expand: None,
                    stem: None,
                };
                let fused = Blocked {
                    stem: Some(stem),
                    ..plain
                };
                let near = naive(&g, &stemmed, &weights, &bias, -0.5, 1.5);
                let mut want = vec![f32::NAN; near.len()];
                let mut got = vec![f32::NAN; near.len()];
                let mut scratch = BlockScratch::default();
                for b in 0..c.div_ceil(lanes) {
                    let (c0, cn) = (b * lanes, lanes.min(c - b * lanes));
                    let (i, o) = (c0 * hs * ws, c0 * ho * wo);
                    plain.run(
                        &stemmed[i..i + cn * hs * ws],
                        b,
                        &mut want[o..o + cn * ho * wo],
                        &mut scratch,
                    );
                    // In bands of 3 rows, as threads' shares cut a block.
                    for r in (0..ho).step_by(3) {
                        // SAFETY: `got[o..]` holds the block's output planes.
                        unsafe {
                            fused.run_rows(
                                &image,
                                b,
                                r..(r + 3).min(ho),
                                got[o..].as_mut_ptr(),
                                &mut scratch,
                            )
                        };
                    }
                }
                let ring = by_rows(&g, lanes);
                for (i, ((a, b), t)) in got.iter().zip(&want).zip(&near).enumerate() {
                    if ring {
                        assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} {g:?} at {i}: {a} vs {b}");
                    }
                    assert!((a - b).abs() <= 1e-5, "{isa:?} {g:?} at {i}: {a} vs {b}");
                    // (On a grid a value may round to the next step.)
                    if grid.is_none() {
                        assert!((a - t).abs() <= 1e-4, "{isa:?} {g:?} at {i}: {a} vs {t}");
                    }
                }
            }
        }
    }
}
