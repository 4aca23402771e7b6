//! graft's 1×1 convolution kernel: plain pointers in, plain pointers out, no tract types.
//!
//! In NCHW a 1×1 convolution is `out[co][p] = bias[co] + Σ_ci w[co][ci] · x[ci][p]` over the
//! `hw` positions `p` of each channel plane, and every input row `x[ci][..]` is already
//! contiguous. So the kernel vectorises along positions and, on ARM and on the widest maps,
//! reads the input where it lies; on x86 a block of positions that eight or more blocks of
//! channels read is first copied into an aligned panel (`pack_panel`). A tile is `R` output
//! channels ([`ROWS`], or [`WIDE_ROWS`] on small maps) × `V` vectors of positions held in
//! registers; per input channel it loads `V` vectors of that channel's row, broadcasts the `R`
//! weights once each and issues `R × V` fused multiply-adds. The weights are packed once, at
//! load, so that a tile reads them as one stream (`[block][ci][R]`, zero rows past the last
//! channel). Before the store the tile is clamped (the ReLU6 or `w8` range that
//! follows the convolution) and, for the convolutions that end a residual block, the block's
//! input is added: the passes tract would make over memory for both are gone.
//!
//! tract 0.23.9 runs these as matrix products with the activations as the packed operand, and
//! on the early, wide, few-channel maps of EfficientNet-Lite0 (16→96 channels over 112×112) it
//! picks an `80x2` tile whose 16-long reductions spend most of their time packing and storing:
//! 6 GMAC/s against 35–40 on the later layers (`docs/performance.md`).

use std::ops::Range;

use crate::backbone::simd::{dispatch, Isa, Lanes, Work};

/// Output channels per tile.
pub const ROWS: usize = 6;

/// Output channels per tile on maps of at most [`WIDE_UP_TO`] positions with 16-lane vectors
/// ([`Shape::rows`]): 12 rows × 2 vectors, each input vector then feeding 12 FMAs, not 6.
/// A 7×7 map's 49 positions are 3 vectors and one position whichever the tile, so the wider
/// tile reads its input (1152 channels: 225 KB, from L2) half as often per FMA. Measured on
/// Lite0's ten 7×7 1×1 convolutions, one thread: 0.005–0.014 ms faster each (0.085 ms a
/// frame); on the 14×14 maps no change, on the 56×56 and 112×112 ones 10–30% slower.
pub const WIDE_ROWS: usize = 12;

/// The largest map (positions) that runs [`WIDE_ROWS`] tiles.
pub const WIDE_UP_TO: usize = 64;

/// The fewest output channels whose tiles go channel block by channel block
/// ([`Shape::channel_major`]).
const CHANNEL_MAJOR_FROM: usize = 64;

/// How many input channels ahead a tile prefetches its packed weights.
const PREFETCH_AHEAD: usize = 32;

/// Blocks of [`ROWS`] output channels whose last 4 positions one tile computes together
/// ([`Shape::grouped_tail`]).
const TAIL_BLOCKS: usize = 4;

/// Zero floats after the packed weights: the grouped tail loads 16 floats from each block's
/// 6 weights of an input channel on ([`Job::grouped_tail`]), past the last one's end.
const PACK_PAD: usize = 16;

/// Shape of one 1×1 convolution over `batch` images of `hw` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Positions per channel plane (`h × w`).
    pub hw: usize,
}

impl Shape {
    /// One image's convolution over a `side × side` map.
    pub fn square(cin: usize, cout: usize, side: usize) -> Shape {
        Shape {
            batch: 1,
            cin,
            cout,
            hw: side * side,
        }
    }

    /// Multiply-adds of one pass.
    pub fn macs(&self) -> usize {
        self.batch * self.cin * self.cout * self.hw
    }

    /// Output channels per tile on `isa`: [`WIDE_ROWS`] on small maps with 16-lane vectors
    /// (where the extra position of a 7×7 map still fits one vector of rows), else [`ROWS`].
    pub fn rows(&self, isa: Isa) -> usize {
        if isa.lanes() > WIDE_ROWS && self.hw <= WIDE_UP_TO {
            WIDE_ROWS
        } else {
            ROWS
        }
    }

    /// Blocks of [`Shape::rows`] output channels.
    fn blocks(&self, isa: Isa) -> usize {
        self.cout.div_ceil(self.rows(isa))
    }

    /// Positions per tile on `isa`.
    fn tile_positions(&self, isa: Isa) -> usize {
        vectors_per_tile(isa, self.rows(isa)) * isa.lanes()
    }

    /// Whether consecutive tiles walk the positions of one block of channels (else the
    /// channel blocks of one run of positions). Threads take runs of consecutive tiles, so
    /// with many output channels each thread streams only its share of the weights, from
    /// L1, and writes a few long output rows; with few, each thread reads only its share of
    /// the (then larger) input. Measured on Lite0 with 2 threads (x86, `docs/performance.md`):
    /// channel-major saves 0.02–0.04 ms on each convolution of 80 or more output channels
    /// and costs 0.02–0.14 ms on those of 16–40.
    fn channel_major(&self) -> bool {
        self.cout >= CHANNEL_MAJOR_FROM
    }

    /// Whether the map's last block of positions, 4 of them (a 14×14 map's 196 are three
    /// blocks of 64 and 4), runs four blocks of channels to a tile (`Job::grouped_tail`) on
    /// `isa`: AVX-512 with [`ROWS`]-row tiles. One block's tile of 4 positions holds 6
    /// accumulators of one quarter-filled vector, and each waits on its own last fused
    /// multiply-add, so it took a third of a whole tile's time for a sixteenth of its work: a
    /// 14×14 map's 1×1 convolutions ran 10–13% longer than over 192 positions.
    pub fn grouped_tail(&self, isa: Isa) -> bool {
        let per_tile = self.tile_positions(isa);
        isa.lanes() == 16 && self.rows(isa) == ROWS && self.hw > per_tile && self.hw % per_tile == 4
    }

    /// Tiles of one pass on `isa`: every (image, block of positions, block of channels).
    pub fn tiles(&self, isa: Isa) -> usize {
        self.batch * self.hw.div_ceil(self.tile_positions(isa)) * self.blocks(isa)
    }
}

/// Vectors of positions per tile of `rows` output channels: as many accumulators as the
/// registers hold beside the input vectors and one broadcast weight (32 registers on AVX-512
/// and NEON: 24 + 4 + 1; 16 on AVX2: 12 + 2 + 1).
fn vectors_per_tile(isa: Isa, rows: usize) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => 2,
        _ if rows == WIDE_ROWS => 2,
        _ => 4,
    }
}

/// `[cout][cin]` weights and `[cout]` biases laid out for tiles of `rows` output channels
/// ([`Shape::rows`]): `[block][ci][rows]` and `[block][rows]`, zero past the last channel
/// (and 16 zeros after the weights, which the grouped tail reads past the last channel).
pub fn pack(
    weights: &[f32],
    bias: &[f32],
    cin: usize,
    cout: usize,
    rows: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(weights.len(), cin * cout, "1x1 convolution weights");
    assert_eq!(bias.len(), cout, "1x1 convolution bias");
    assert!(rows == ROWS || rows == WIDE_ROWS, "1x1 tile rows");
    let blocks = cout.div_ceil(rows);
    let mut packed = vec![0.0; blocks * cin * rows + PACK_PAD];
    let mut padded = vec![0.0; blocks * rows];
    for co in 0..cout {
        let (b, r) = (co / rows, co % rows);
        for ci in 0..cin {
            packed[(b * cin + ci) * rows + r] = weights[co * cin + ci];
        }
        padded[co] = bias[co];
    }
    (packed, padded)
}

/// One convolution, ready to run tile by tile.
#[derive(Debug, Clone, Copy)]
pub struct Pointwise<'a> {
    /// The convolution's shape.
    pub shape: Shape,
    /// Weights from [`pack`].
    pub weights: &'a [f32],
    /// Biases from [`pack`].
    pub bias: &'a [f32],
    /// Outputs are clamped to `[lo, hi]` (±∞: no clip) before the residual is added.
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
    /// With a residual, the sum clamped to `[lo, hi]` (a QDQ graph's range of the sum, which
    /// the `w8` rewrite makes a clip); `None`: not clamped.
    pub post: Option<&'a [f32; 2]>,
    /// Which compiled kernel runs it.
    pub isa: Isa,
}

impl Pointwise<'_> {
    /// Runs the whole convolution on this thread: `input` is `[batch][cin][hw]`, `residual`
    /// and `output` `[batch][cout][hw]`.
    ///
    /// # Panics
    /// If a slice has the wrong length.
    pub fn run(&self, input: &[f32], residual: Option<&[f32]>, output: &mut [f32]) {
        let s = self.shape;
        assert_eq!(input.len(), s.batch * s.cin * s.hw, "1x1 convolution input");
        assert_eq!(
            output.len(),
            s.batch * s.cout * s.hw,
            "1x1 convolution output"
        );
        if let Some(r) = residual {
            assert_eq!(r.len(), output.len(), "1x1 convolution residual");
        }
        // SAFETY: the lengths are checked above, and one caller holds the whole output.
        unsafe {
            self.run_tiles(
                input.as_ptr(),
                residual.map(|r| r.as_ptr()),
                output.as_mut_ptr(),
                0..s.tiles(self.isa),
            )
        }
    }

    /// Runs tiles `range` of [`Shape::tiles`].
    ///
    /// # Safety
    /// `input` must hold `batch × cin × hw` floats, `output` (and `residual`, if any)
    /// `batch × cout × hw`; `weights` and `bias` must come from [`pack`] for this shape; no one
    /// else may write the output positions of these tiles meanwhile (tiles never overlap).
    pub unsafe fn run_tiles(
        &self,
        input: *const f32,
        residual: Option<*const f32>,
        output: *mut f32,
        range: Range<usize>,
    ) {
        let s = self.shape;
        let rows = s.rows(self.isa);
        assert!(self.weights.len() >= s.blocks(self.isa) * s.cin * rows);
        assert!(self.bias.len() >= s.blocks(self.isa) * rows);
        assert!(range.end <= s.tiles(self.isa));
        let job = Job {
            p: *self,
            input,
            residual,
            output,
            range,
        };
        // SAFETY: the caller's contract, and each ISA's function is only chosen when the CPU
        // has it (`Isa::detect` / `Isa::available`).
        unsafe { dispatch(self.isa, job) }
    }
}

struct Job<'a> {
    p: Pointwise<'a>,
    input: *const f32,
    residual: Option<*const f32>,
    output: *mut f32,
    range: Range<usize>,
}

/// What every tile of a job shares.
#[derive(Clone, Copy)]
struct Tile {
    /// First input value of the tile: `x[0][p0]` of its image, or of its panel.
    x: *const f32,
    /// Floats from one input channel's positions to the next's: `hw`, or a panel's stride.
    xs: usize,
    /// The tile's first packed weight and bias.
    w: *const f32,
    b: *const f32,
    /// First output value: `out[co0][p0]`, and the residual's (null: none).
    out: *mut f32,
    res: *const f32,
    /// The sum's clip, `[lo, hi]` (null: none); read where it is used, see [`Tile::run`].
    post: *const f32,
    hw: usize,
    cin: usize,
    /// The first input of positions this tile asks for as it goes (null: none): the next block
    /// of positions of the same image, which its tiles read next, where they read the input
    /// where it lies. The rows a block reads are `hw` apart, more rows than the hardware's
    /// prefetcher follows (Lite0's wide maps: 32–144 rows, 12 KB to 50 KB apart), so without
    /// it every block began with its input's misses. Measured (AVX-512, `w8`, one thread):
    /// Lite0's three wide-map projections 0.05–0.11, 0.02–0.04 and 0.01–0.03 ms faster each,
    /// the frame 1% (`docs/performance.md`).
    ahead: *const f32,
    /// Valid output channels (≤ the tile's rows).
    rows: usize,
    lo: f32,
    hi: f32,
}

impl Work for Job<'_> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        // As many rows and vectors per tile as `Shape::rows` and `vectors_per_tile` say for
        // this vector width.
        unsafe {
            if L::N == 8 {
                self.tiles::<L, ROWS, 2>()
            } else if L::N > WIDE_ROWS && self.p.shape.rows(self.p.isa) == WIDE_ROWS {
                self.tiles::<L, WIDE_ROWS, 2>()
            } else {
                self.tiles::<L, ROWS, 4>()
            }
        }
    }
}

impl Job<'_> {
    /// Without a clip nothing is clamped (a clamp to ±∞ would turn a NaN into −∞); the choice
    /// is made once, outside the tiles' loops.
    #[inline(always)]
    unsafe fn tiles<L: Lanes, const R: usize, const V: usize>(self) {
        let clip = self.p.lo > f32::NEG_INFINITY || self.p.hi < f32::INFINITY;
        unsafe {
            if clip {
                self.tiles_of::<L, R, V, true>()
            } else {
                self.tiles_of::<L, R, V, false>()
            }
        }
    }

    #[inline(always)]
    unsafe fn tiles_of<L: Lanes, const R: usize, const V: usize, const CLIP: bool>(self) {
        let s = self.p.shape;
        let per_tile = s.tile_positions(self.p.isa);
        let pblocks = s.hw.div_ceil(per_tile);
        let blocks = s.blocks(self.p.isa);
        let channel_major = s.channel_major();
        let Range { start, end } = self.range;
        // With panels, by (image, block of positions), then by block of channels, whichever
        // order `channel_major` numbers them in: every block of channels of one block of
        // positions reads the same input, so it is copied once into an aligned panel
        // (`pack_panel`) and read from there. Its rows are whole vectors, so that each starts
        // on a cache line. Without, in their numbering order, reading the input where it lies.
        let panels = L::N >= PACK_MIN_LANES && s.hw <= PACK_UP_TO && blocks >= PACK_FROM_BLOCKS;
        let stride = per_tile.next_multiple_of(L::N);
        let panel = if panels {
            panel(s.cin * stride)
        } else {
            std::ptr::null_mut()
        };
        // `o` runs over (image, block of positions) and `i` over blocks of channels, or `o`
        // over (image, block of channels) and `i` over blocks of positions. One loop, one call
        // of `tile`: written twice, the 7×7 maps' tiles ran 15% slower.
        let by_positions = panels || !channel_major;
        // The last 4 positions of every four blocks of channels in one tile, where they run so.
        let grouped = L::N == 16
            && R == ROWS
            && s.grouped_tail(self.p.isa)
            && self.p.weights.len() >= blocks * s.cin * R + PACK_PAD;
        let (outer, inner) = if by_positions {
            (s.batch * pblocks, blocks)
        } else {
            (s.batch * blocks, pblocks)
        };
        for o in 0..outer {
            // The tile of `i` is number `first + i × step`.
            let (first, step) = match (by_positions, channel_major) {
                (true, true) => ((o / pblocks * blocks) * pblocks + o % pblocks, pblocks),
                (true, false) => (o * blocks, 1),
                (false, _) => (o * pblocks, 1),
            };
            let from = start.saturating_sub(first).div_ceil(step);
            let to = end.saturating_sub(first).div_ceil(step).min(inner);
            if from >= to {
                continue;
            }
            let (mut x, mut xs) = (std::ptr::null(), 0);
            if panels && to - from >= PACK_FROM_BLOCKS {
                let (n, p0) = (o / pblocks, o % pblocks * per_tile);
                // SAFETY: the panel holds `cin × stride` floats; the positions are inside the
                // input (the caller's contract on lengths) and at most `stride`.
                unsafe {
                    pack_panel::<L>(
                        self.input.add(n * s.cin * s.hw + p0),
                        s.hw,
                        s.cin,
                        (s.hw - p0).min(per_tile),
                        panel,
                        stride,
                    )
                };
                (x, xs) = (panel.cast_const(), stride);
            }
            for i in from..to {
                let (g, block) = if by_positions {
                    (o, i)
                } else {
                    (o / blocks * pblocks + i, o % blocks)
                };
                if grouped && g % pblocks + 1 == pblocks {
                    // The first tile of each four runs all four ([`Job::grouped_tail`]); the
                    // others nothing.
                    if block.is_multiple_of(TAIL_BLOCKS) {
                        unsafe { self.grouped_tail::<L, CLIP>(g / pblocks, block, x, xs) };
                    }
                    continue;
                }
                // Without a panel, the first tile of a block of positions asks for the next
                // block's input ([`Tile::ahead`]; x86 only, as the panels: measured there).
                let ahead = if L::N >= PACK_MIN_LANES
                    && by_positions
                    && x.is_null()
                    && i == from
                    && o % pblocks + 1 < pblocks
                {
                    let (n, p1) = (o / pblocks, (o % pblocks + 1) * per_tile);
                    self.input.wrapping_add(n * s.cin * s.hw + p1)
                } else {
                    std::ptr::null()
                };
                unsafe { self.tile::<L, R, V, CLIP>(g, block, x, xs, ahead) };
            }
        }
    }

    /// The last 4 positions of image `n` for the [`TAIL_BLOCKS`] blocks of [`ROWS`] output
    /// channels from `block` on (those that exist), reading the input from `x`, channels `xs`
    /// floats apart, or (null) from the input. A vector holds 4 rows × the 4 positions: per
    /// input channel, each block's 6 packed weights are loaded once and spread over 6 such
    /// vectors by two-source permutes, the 4 inputs repeated over the lanes, and 6 fused
    /// multiply-adds go into 6 chains (where one block's tile had 6 chains of 6 sums each).
    /// Each output still starts at its bias and takes the input channels in order, then the
    /// clip, residual and sum's clip as [`Tile::run`]: the same values.
    #[inline(always)]
    unsafe fn grouped_tail<L: Lanes, const CLIP: bool>(
        &self,
        n: usize,
        block: usize,
        x: *const f32,
        xs: usize,
    ) {
        // Vector k, lane i: row 4k + i / 4 of the group, position i % 4; rows 6b.. are block
        // b's. An index below 16 picks a lane of the first source, 16 + j lane j of the second.
        const ROWS_0_3: [u32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];
        const ROWS_4_5_0_1: [u32; 16] = [4, 4, 4, 4, 5, 5, 5, 5, 16, 16, 16, 16, 17, 17, 17, 17];
        const ROWS_2_5: [u32; 16] = [2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5];
        const IDX: [[u32; 16]; 6] = [
            ROWS_0_3,
            ROWS_4_5_0_1,
            ROWS_2_5,
            ROWS_0_3,
            ROWS_4_5_0_1,
            ROWS_2_5,
        ];
        // Which blocks' weights each vector takes its lanes from (`IDX`'s first and second).
        const SOURCES: [(usize, usize); 6] = [(0, 0), (0, 1), (1, 1), (2, 2), (2, 3), (3, 3)];
        const ROWS4: usize = TAIL_BLOCKS * ROWS;
        let s = self.p.shape;
        let blocks = s.blocks(self.p.isa);
        let have = (blocks - block).min(TAIL_BLOCKS);
        let co0 = block * ROWS;
        let rows = (s.cout - co0).min(ROWS4);
        let p0 = s.hw - 4;
        unsafe {
            let (x, xs) = if x.is_null() {
                (self.input.add(n * s.cin * s.hw + p0), s.hw)
            } else {
                (x, xs)
            };
            // Blocks past the last read the last one's weights; their sums are not stored.
            let w: [*const f32; TAIL_BLOCKS] = std::array::from_fn(|b| {
                self.p
                    .weights
                    .as_ptr()
                    .add((block + b.min(have - 1)) * s.cin * ROWS)
            });
            let mut init = [0f32; ROWS4 * 4];
            for (i, v) in init.iter_mut().enumerate() {
                let r = i / 4;
                if r < rows {
                    *v = *self.p.bias.as_ptr().add(co0 + r);
                }
            }
            let mut acc: [L; 6] = std::array::from_fn(|k| L::load(init.as_ptr().add(k * 16)));
            for ci in 0..s.cin {
                let a: [L; TAIL_BLOCKS] = std::array::from_fn(|b| L::load(w[b].add(ci * ROWS)));
                for wb in &w {
                    L::prefetch(wb.wrapping_add((ci + PREFETCH_AHEAD) * ROWS));
                }
                let xv = L::repeat4(x.add(ci * xs));
                for (k, acc) in acc.iter_mut().enumerate() {
                    let (first, second) = SOURCES[k];
                    let wv = L::permute2(a[first], a[second], &IDX[k]);
                    *acc = L::mul_add(xv, wv, *acc);
                }
            }
            let (lo, hi) = (L::splat(self.p.lo), L::splat(self.p.hi));
            let mut sums = [0f32; ROWS4 * 4];
            for (k, a) in acc.iter().enumerate() {
                let y = if CLIP { a.clamp(lo, hi) } else { *a };
                y.store(sums.as_mut_ptr().add(k * 16));
            }
            let post = self.p.post.filter(|_| self.residual.is_some());
            for r in 0..rows {
                let at = (n * s.cout + co0 + r) * s.hw + p0;
                for p in 0..4 {
                    let mut y = sums[r * 4 + p];
                    if let Some(res) = self.residual {
                        y += *res.add(at + p);
                    }
                    if let Some([plo, phi]) = post {
                        // `max` then `min`, as `Lanes::clamp`.
                        y = y.max(*plo).min(*phi);
                    }
                    *self.output.add(at + p) = y;
                }
            }
        }
    }

    /// Tile (`g`: image × blocks of positions + block of positions; `block` of channels),
    /// reading its input from `x`, channels `xs` floats apart, or (null) from the input;
    /// asking for the input from `ahead` on (null: nothing) as it goes.
    #[inline(always)]
    unsafe fn tile<L: Lanes, const R: usize, const V: usize, const CLIP: bool>(
        &self,
        g: usize,
        block: usize,
        x: *const f32,
        xs: usize,
        ahead: *const f32,
    ) {
        let s = self.p.shape;
        let per_tile = s.tile_positions(self.p.isa);
        let pblocks = s.hw.div_ceil(per_tile);
        let (n, pb) = (g / pblocks, g % pblocks);
        let p0 = pb * per_tile;
        let co0 = block * R;
        let out_at = (n * s.cout + co0) * s.hw + p0;
        // SAFETY: every offset is inside its buffer (the caller's contract on lengths).
        unsafe {
            let (x, xs) = if x.is_null() {
                (self.input.add(n * s.cin * s.hw + p0), s.hw)
            } else {
                (x, xs)
            };
            Tile {
                x,
                xs,
                w: self.p.weights.as_ptr().add(block * s.cin * R),
                b: self.p.bias.as_ptr().add(co0),
                out: self.output.add(out_at),
                res: self.residual.map_or(std::ptr::null(), |r| r.add(out_at)),
                post: self.p.post.map_or(std::ptr::null(), |p| p.as_ptr()),
                hw: s.hw,
                cin: s.cin,
                ahead,
                rows: (s.cout - co0).min(R),
                lo: self.p.lo,
                hi: self.p.hi,
            }
            .run_positions::<L, R, V, CLIP>((s.hw - p0).min(per_tile))
        }
    }
}

/// The fewest lanes whose kernels read their input from an aligned panel: measured on x86
/// (below). On ARM it is not measured, so NEON reads the input where it lies, as before.
const PACK_MIN_LANES: usize = 8;

/// The largest map (positions) whose input is copied into panels: on wider maps (Lite0's
/// 16 → 96 over 112×112) a block of positions' tiles write 64 positions of every output
/// channel, rows 50 KB apart, and ran 26% slower than walking one block of channels along
/// its rows (`cargo bench --bench pointwise_tiles`).
const PACK_UP_TO: usize = 56 * 56;

/// The fewest blocks of channels that share a block of positions for the positions to be
/// copied into a panel first: the copy costs about one tile's reading of the input. From 4,
/// Lite0's 28×28 projections (7 blocks) lost 0.01 ms each in one profile; whole frames could
/// not tell 4 from 8 apart (`docs/performance.md`).
const PACK_FROM_BLOCKS: usize = 8;

/// 64 bytes, aligned as a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// Each thread's panel of input positions (`pack_panel`), kept between convolutions.
    static PANEL: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's panel, grown to at least `floats`, 64-byte aligned. The pointer stays valid
/// until the next call on this thread (no kernel calls another).
fn panel(floats: usize) -> *mut f32 {
    PANEL.with_borrow_mut(|p| {
        let lines = floats.div_ceil(16);
        if p.len() < lines {
            p.resize(lines, Line([0.0; 16]));
        }
        p.as_mut_ptr().cast()
    })
}

/// Copies `positions` floats of each of `cin` rows `hw` apart from `x` into `panel`, rows
/// `stride` apart. A row of a 14×14 or 7×7 map starts 784 or 196 bytes after the one before,
/// so most of the tiles' vector loads of the input crossed a cache line; from the panel none
/// do. Measured on x86 (AVX-512, one thread, `cargo bench --bench pointwise_tiles`): the
/// same loop over 64-byte-aligned rows ran 82–88 GMAC/s, over rows 16 bytes off 73–79.
///
/// # Safety
/// `x` must hold the rows, `panel` `cin × stride` floats, and `positions ≤ stride`.
#[inline(always)]
unsafe fn pack_panel<L: Lanes>(
    x: *const f32,
    hw: usize,
    cin: usize,
    positions: usize,
    panel: *mut f32,
    stride: usize,
) {
    let n = L::N;
    let (whole, rest) = (positions / n, positions % n);
    for ci in 0..cin {
        unsafe {
            let (src, dst) = (x.add(ci * hw), panel.add(ci * stride));
            for v in 0..whole {
                L::load(src.add(v * n)).store(dst.add(v * n));
            }
            if rest > 0 {
                L::load_tail(src.add(whole * n), rest).store_tail(dst.add(whole * n), rest);
            }
        }
    }
}

impl Tile {
    /// The tile over its `positions` (a whole tile's, or fewer at the end of a map).
    #[inline(always)]
    unsafe fn run_positions<L: Lanes, const R: usize, const V: usize, const CLIP: bool>(
        self,
        positions: usize,
    ) {
        let per_tile = V * L::N;
        unsafe {
            if positions == per_tile {
                self.run::<L, R, V, false, CLIP, false>(L::N);
                return;
            }
            let vectors = positions.div_ceil(L::N);
            let last = positions - (vectors - 1) * L::N;
            // At most `V` vectors: the arms for more are left out at compile time (`V > k`),
            // so no tile wider than the registers hold is ever built (`benches/hot_loops.py`
            // found 12-row tiles of 3 and 4 vectors, never run, their sums on the stack).
            // One position past whole vectors (a 7×7 map's 49th): a vector of the tile's
            // rows for it, rather than a 16-lane vector holding one.
            if last == 1 && vectors >= 2 && L::N > R {
                match vectors - 1 {
                    3 if V > 3 => self.run::<L, R, 3, false, CLIP, true>(L::N),
                    2 if V > 2 => self.run::<L, R, 2, false, CLIP, true>(L::N),
                    _ => self.run::<L, R, 1, false, CLIP, true>(L::N),
                }
                return;
            }
            match (vectors, last == L::N) {
                (4, true) if V >= 4 => self.run::<L, R, 4, false, CLIP, false>(last),
                (4, false) if V >= 4 => self.run::<L, R, 4, true, CLIP, false>(last),
                (3, true) if V >= 3 => self.run::<L, R, 3, false, CLIP, false>(last),
                (3, false) if V >= 3 => self.run::<L, R, 3, true, CLIP, false>(last),
                (2, true) => self.run::<L, R, 2, false, CLIP, false>(last),
                (2, false) => self.run::<L, R, 2, true, CLIP, false>(last),
                (_, true) => self.run::<L, R, 1, false, CLIP, false>(last),
                (_, false) => self.run::<L, R, 1, true, CLIP, false>(last),
            }
        }
    }

    /// `R × V` vectors of outputs (`R` rows: [`ROWS`] or [`WIDE_ROWS`]); with `TAIL`, the last
    /// vector has only `last` lanes. With `EXTRA` (vectors wider than `R` only), one more
    /// position after the `V` vectors, its `R` outputs held in the lanes of one more vector:
    /// per input channel one load of the channel's `R` packed weights, one broadcast of its
    /// input, one FMA.
    #[inline(always)]
    unsafe fn run<
        L: Lanes,
        const R: usize,
        const V: usize,
        const TAIL: bool,
        const CLIP: bool,
        const EXTRA: bool,
    >(
        self,
        last: usize,
    ) {
        unsafe {
            let n = L::N;
            let mut acc = [[L::splat(0.0); V]; R];
            for (r, row) in acc.iter_mut().enumerate() {
                *row = [L::splat_at(self.b.add(r)); V];
            }
            // Lane r: row r at position `V·n` (lanes past R: zero weights, unused).
            let mut extra = if EXTRA {
                L::load_tail(self.b, R)
            } else {
                L::splat(0.0)
            };
            let zero = L::splat(0.0);
            for ci in 0..self.cin {
                let xp = self.x.add(ci * self.xs);
                let mut xv = [zero; V];
                for (v, x) in xv.iter_mut().enumerate() {
                    *x = if TAIL && v == V - 1 {
                        L::load_tail(xp.add(v * n), last)
                    } else {
                        L::load(xp.add(v * n))
                    };
                }
                let wp = self.w.add(ci * R);
                if EXTRA {
                    let x = L::splat_at(xp.add(V * n));
                    extra = L::mul_add(x, L::load_tail(wp, R), extra);
                }
                // The weights stream from L3 (a frame's 13 MB do not stay in L2): asked for
                // 32 input channels ahead, the 7×7 stage's products ran 12% faster.
                L::prefetch(wp.wrapping_add(PREFETCH_AHEAD * R));
                if !self.ahead.is_null() {
                    // Each cache line of this channel's row of the next block, once.
                    let p = self.ahead.wrapping_add(ci * self.hw);
                    for v in (0..V * n).step_by(16) {
                        L::prefetch(p.wrapping_add(v));
                    }
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = L::splat_at(wp.add(r));
                    for (a, x) in row.iter_mut().zip(&xv) {
                        *a = L::mul_add(*x, w, *a);
                    }
                }
            }
            let (lo, hi) = (L::splat(self.lo), L::splat(self.hi));
            // Row by row with every index a constant: written as a loop (`take(rows)`, or
            // `R` rounds), the compiler did not always unroll it, so the accumulators had to
            // live in memory and were stored there on every input channel (12-row tiles at
            // half speed).
            macro_rules! store_rows {
                ($($r:literal)*) => {$(
                    if let Some(row) = acc.get($r) {
                        if $r < self.rows {
                            self.store_row::<L, V, TAIL, CLIP>($r, row, lo, hi, last);
                        }
                    }
                )*};
            }
            const { assert!(R <= 12, "store_rows names rows 0 to 11") };
            store_rows!(0 1 2 3 4 5 6 7 8 9 10 11);
            if EXTRA {
                // Clamped as the vectors are, then the residual added and stored per row.
                let y = if CLIP { extra.clamp(lo, hi) } else { extra };
                let mut lanes = [0f32; 16];
                y.store_tail(lanes.as_mut_ptr(), R);
                for (r, v) in lanes.iter().enumerate().take(self.rows) {
                    let at = r * self.hw + V * n;
                    let mut y = *v;
                    if !self.res.is_null() {
                        y += *self.res.add(at);
                    }
                    *self.out.add(at) = y;
                }
            }
            if !self.res.is_null() && !self.post.is_null() {
                // The sum's clip, as a second sweep over the tile just stored (in L1): done
                // on the accumulators before their stores, it made the compiler keep them in
                // memory instead of registers (the tile ran 2–3× slower, with or without a
                // residual).
                let (plo, phi) = (*self.post, *self.post.add(1));
                let (plo_v, phi_v) = (L::splat(plo), L::splat(phi));
                for r in 0..self.rows {
                    let out = self.out.add(r * self.hw);
                    for v in 0..V {
                        let p = out.add(v * n);
                        if TAIL && v == V - 1 {
                            L::load_tail(p, last)
                                .clamp(plo_v, phi_v)
                                .store_tail(p, last);
                        } else {
                            L::load(p).clamp(plo_v, phi_v).store(p);
                        }
                    }
                    if EXTRA {
                        // `max` then `min`, as `Lanes::clamp`.
                        let p = out.add(V * n);
                        *p = (*p).max(plo).min(phi);
                    }
                }
            }
        }
    }

    /// Stores row `r` of a tile: clamped to `[lo, hi]` with `CLIP`, plus the residual's row
    /// if there is one; with `TAIL` the last vector's first `last` lanes only.
    #[inline(always)]
    unsafe fn store_row<L: Lanes, const V: usize, const TAIL: bool, const CLIP: bool>(
        &self,
        r: usize,
        row: &[L; V],
        lo: L,
        hi: L,
        last: usize,
    ) {
        let n = L::N;
        unsafe {
            let out = self.out.add(r * self.hw);
            for (v, a) in row.iter().enumerate() {
                let tail = TAIL && v == V - 1;
                let mut y = if CLIP { a.clamp(lo, hi) } else { *a };
                if !self.res.is_null() {
                    let rp = self.res.add(r * self.hw + v * n);
                    let rv = if tail {
                        L::load_tail(rp, last)
                    } else {
                        L::load(rp)
                    };
                    y = L::add(y, rv);
                }
                if tail {
                    y.store_tail(out.add(v * n), last);
                } else {
                    y.store(out.add(v * n));
                }
            }
        }
    }
}

/// Outputs per block of a matrix–vector product.
pub const GEMV_BLOCK: usize = 64;

/// `[n][k]` weights laid out for [`Gemv`]: `[block][k][GEMV_BLOCK]`, zero past the last output.
pub fn pack_gemv(weights: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(weights.len(), n * k, "matrix-vector weights");
    let blocks = n.div_ceil(GEMV_BLOCK);
    let mut packed = vec![0.0; blocks * k * GEMV_BLOCK];
    for o in 0..n {
        let (b, r) = (o / GEMV_BLOCK, o % GEMV_BLOCK);
        for i in 0..k {
            packed[(b * k + i) * GEMV_BLOCK + r] = weights[o * k + i];
        }
    }
    packed
}

/// A matrix–vector product, `out[o] = bias[o] + Σ_i w[o][i] · x[i]` (a classifier over pooled
/// features): blocks of [`GEMV_BLOCK`] outputs in registers, each input broadcast once per
/// block, the packed weights read as one stream. Memory-bound (the weights are read once per
/// call), so its gain is that blocks split over threads.
#[derive(Debug, Clone, Copy)]
pub struct Gemv<'a> {
    /// Outputs.
    pub n: usize,
    /// Inputs.
    pub k: usize,
    /// Weights from [`pack_gemv`].
    pub weights: &'a [f32],
    /// `n` biases.
    pub bias: &'a [f32],
    /// Which compiled kernel runs it.
    pub isa: Isa,
}

impl Gemv<'_> {
    /// Blocks of one product.
    pub fn blocks(&self) -> usize {
        self.n.div_ceil(GEMV_BLOCK)
    }

    /// Computes outputs `blocks × GEMV_BLOCK` (those that exist) into `out` (all `n`).
    ///
    /// # Safety
    /// `x` must hold `k` floats and `out` `n`; no one else may write these blocks' outputs
    /// meanwhile.
    pub unsafe fn run_blocks(&self, x: *const f32, out: *mut f32, blocks: Range<usize>) {
        assert!(self.weights.len() >= self.blocks() * self.k * GEMV_BLOCK);
        assert!(self.bias.len() >= self.n);
        assert!(blocks.end <= self.blocks());
        let job = GemvJob {
            g: *self,
            x,
            out,
            blocks,
        };
        // SAFETY: the caller's contract; the ISA is one this CPU runs.
        unsafe { dispatch(self.isa, job) }
    }

    /// The whole product on this thread.
    ///
    /// # Panics
    /// If a slice has the wrong length.
    pub fn run(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.k, "matrix-vector input");
        assert_eq!(out.len(), self.n, "matrix-vector output");
        // SAFETY: lengths checked; one caller holds the whole output.
        unsafe { self.run_blocks(x.as_ptr(), out.as_mut_ptr(), 0..self.blocks()) }
    }
}

struct GemvJob<'a> {
    g: Gemv<'a>,
    x: *const f32,
    out: *mut f32,
    blocks: Range<usize>,
}

impl Work for GemvJob<'_> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        unsafe {
            match L::N {
                16 => self.blocks_of::<L, 4>(),
                8 => self.blocks_of::<L, 8>(),
                4 => self.blocks_of::<L, 16>(),
                _ => self.blocks_of::<L, 64>(),
            }
        }
    }
}

impl GemvJob<'_> {
    /// `V` vectors of `L` make one block.
    #[inline(always)]
    unsafe fn blocks_of<L: Lanes, const V: usize>(self) {
        debug_assert_eq!(V * L::N, GEMV_BLOCK);
        let g = self.g;
        for b in self.blocks.clone() {
            let o0 = b * GEMV_BLOCK;
            let valid = (g.n - o0).min(GEMV_BLOCK);
            unsafe {
                let mut acc = [L::splat(0.0); V];
                let w = g.weights.as_ptr().add(b * g.k * GEMV_BLOCK);
                for i in 0..g.k {
                    let x = L::splat_at(self.x.add(i));
                    let wi = w.add(i * GEMV_BLOCK);
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = L::mul_add(L::load(wi.add(v * L::N)), x, *a);
                    }
                }
                for (v, a) in acc.iter().enumerate() {
                    let at = v * L::N;
                    if at >= valid {
                        break;
                    }
                    let lanes = (valid - at).min(L::N);
                    let out = self.out.add(o0 + at);
                    let bias = g.bias.as_ptr().add(o0 + at);
                    if lanes == L::N {
                        L::add(*a, L::load(bias)).store(out);
                    } else {
                        L::add(*a, L::load_tail(bias, lanes)).store_tail(out, lanes);
                    }
                }
            }
        }
    }
}

/// The convolution done the obvious way, in f64, for tests.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn naive(
    s: &Shape,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    lo: f32,
    hi: f32,
    residual: Option<&[f32]>,
    post: Option<[f32; 2]>,
) -> Vec<f32> {
    let mut out = vec![0.0; s.batch * s.cout * s.hw];
    for n in 0..s.batch {
        for co in 0..s.cout {
            for p in 0..s.hw {
                let mut acc = bias[co] as f64;
                for ci in 0..s.cin {
                    acc +=
                        weights[co * s.cin + ci] as f64 * input[(n * s.cin + ci) * s.hw + p] as f64;
                }
                let at = (n * s.cout + co) * s.hw + p;
                let mut y = (acc as f32).max(lo).min(hi);
                if let Some(r) = residual {
                    y += r[at];
                    if let Some([plo, phi]) = post {
                        y = y.max(plo).min(phi);
                    }
                }
                out[at] = y;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(seed: &mut u64, n: usize) -> Vec<f32> {
        crate::backbone::simd::seeded_uniform(seed, n, 1.0)
    }

    /// A shape with seeded random input, `[cout][cin]` weights and biases.
    fn random_case(
        seed: &mut u64,
        batch: usize,
        cin: usize,
        cout: usize,
        hw: usize,
    ) -> (Shape, Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = Shape {
            batch,
            cin,
            cout,
            hw,
        };
        let input = random(seed, batch * cin * hw);
        let weights = random(seed, cout * cin);
        let bias = random(seed, cout);
        (s, input, weights, bias)
    }

    /// Without a clip a NaN input stays NaN, as in tract's plan (a clamp to ±∞ made it −∞).
    #[test]
    fn a_nan_passes_through_when_nothing_clips() {
        let s = Shape {
            batch: 1,
            cin: 2,
            cout: 3,
            hw: 20,
        };
        let mut input = vec![0.5; 2 * 20];
        input[7] = f32::NAN;
        for isa in Isa::available() {
            let (w, b) = pack(&[1.0; 6], &[0.0; 3], 2, 3, s.rows(isa));
            let p = Pointwise {
                shape: s,
                weights: &w,
                bias: &b,
                lo: f32::NEG_INFINITY,
                hi: f32::INFINITY,
                post: None,
                isa,
            };
            let mut out = vec![0.0; 3 * 20];
            p.run(&input, None, &mut out);
            for (i, v) in out.iter().enumerate() {
                assert_eq!(v.is_nan(), i % 20 == 7, "{isa:?} at {i}: {v}");
            }
        }
    }

    #[test]
    fn every_isa_computes_matrix_vector_products() {
        let mut seed = 5;
        for (n, k) in [(1000, 1280), (1, 1), (65, 3), (64, 17), (130, 40)] {
            let w = random(&mut seed, n * k);
            let x = random(&mut seed, k);
            let bias = random(&mut seed, n);
            let packed = pack_gemv(&w, n, k);
            let want: Vec<f32> = (0..n)
                .map(|o| {
                    let dot: f64 = (0..k).map(|i| w[o * k + i] as f64 * x[i] as f64).sum();
                    (dot + bias[o] as f64) as f32
                })
                .collect();
            for isa in Isa::available() {
                let g = Gemv {
                    n,
                    k,
                    weights: &packed,
                    bias: &bias,
                    isa,
                };
                let mut got = vec![f32::NAN; n];
                g.run(&x, &mut got);
                for (o, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-4, "{isa:?} {n}x{k} at {o}: {a} vs {b}");
                }
            }
        }
    }

    /// Each case whole, and cut in runs of tiles that start and end anywhere, as threads take
    /// them: each run, taken block of positions by block of positions (copied into a panel
    /// where enough blocks of channels share it) or in its numbering order, computes its tiles
    /// once and no others.
    #[test]
    fn every_isa_matches_the_plain_loops() {
        let mut seed = 11;
        // (batch, cin, cout, hw): channel counts around the tiles' 6 and 12 rows, positions
        // around every vector width and tile size (up to 64 positions AVX-512 runs 12 rows);
        // then channel-major with panels (cout ≥ 64), position-major with panels (8 or more
        // blocks of channels), without (fewer blocks; a map too wide), and 12-row tiles with
        // panels, each with a part-filled last block of positions; last, maps whose last 4
        // positions run four blocks of channels to a tile on AVX-512 (`Shape::grouped_tail`;
        // 196 above too, 9 blocks: the last group has one): channel-major, and 12 blocks.
        let cases = [
            (2, 20, 70, 200),
            (1, 33, 50, 196),
            (2, 7, 30, 100),
            (1, 5, 64, 3200),
            (2, 24, 100, 49),
            (1, 16, 96, 300),
            (2, 5, 7, 49),
            (1, 40, 25, 49),
            (2, 17, 12, 33),
            (1, 9, 13, 64),
            (1, 1, 1, 1),
            (3, 9, 13, 17),
            (1, 24, 6, 64),
            (1, 3, 12, 65),
            (2, 40, 11, 15),
            (1, 70, 112, 196),
            (2, 24, 70, 68),
        ];
        for (batch, cin, cout, hw) in cases {
            let (s, input, weights, bias) = random_case(&mut seed, batch, cin, cout, hw);
            let res = random(&mut seed, batch * cout * hw);
            // The sum's clip cuts into the sums' range (|sum| reaches a few units here).
            let post = [-0.4, 0.3];
            for (lo, hi, residual, post) in [
                (-0.5, 0.75, None, None),
                (f32::NEG_INFINITY, f32::INFINITY, Some(&res[..]), None),
                (-0.5, 0.75, Some(&res[..]), Some(&post)),
                (
                    f32::NEG_INFINITY,
                    f32::INFINITY,
                    Some(&res[..]),
                    Some(&post),
                ),
            ] {
                let want = naive(&s, &input, &weights, &bias, lo, hi, residual, post.copied());
                if post.is_some() && s.cout * s.hw > 16 {
                    // Not a clip that cannot fail: both bounds are reached.
                    assert!(want.contains(&-0.4) && want.contains(&0.3), "{s:?}");
                }
                for isa in Isa::available() {
                    if isa.lanes() == 16 && [196, 68].contains(&hw) {
                        assert!(s.grouped_tail(isa), "{s:?}");
                    }
                    let (packed, padded) = pack(&weights, &bias, cin, cout, s.rows(isa));
                    let p = Pointwise {
                        shape: s,
                        weights: &packed,
                        bias: &padded,
                        lo,
                        hi,
                        post,
                        isa,
                    };
                    let mut got = vec![f32::NAN; want.len()];
                    p.run(&input, residual, &mut got);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!((a - b).abs() <= 1e-5, "{isa:?} {s:?} at {i}: {a} vs {b}");
                    }
                    let tiles = s.tiles(isa);
                    for parts in [2, 3, 7] {
                        let mut cut = vec![f32::NAN; want.len()];
                        for part in 0..parts {
                            let range = part * tiles / parts..(part + 1) * tiles / parts;
                            // SAFETY: lengths as the kernel asks; the runs do not overlap.
                            unsafe {
                                p.run_tiles(
                                    input.as_ptr(),
                                    residual.map(|r| r.as_ptr()),
                                    cut.as_mut_ptr(),
                                    range,
                                )
                            };
                        }
                        assert!(
                            cut.iter()
                                .zip(&got)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} {s:?} in {parts} parts"
                        );
                    }
                }
            }
        }
    }
}
