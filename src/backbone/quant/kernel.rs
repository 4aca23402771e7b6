//! graft's int8 kernels: plain pointers in, plain pointers out, no tract types.
//!
//! **A 1×1 convolution in integers.** In a static QDQ graph a 1×1 convolution reads
//! `x = (q − zp) · s`, a `u8` activation `q` dequantised, and weights `w = qw · sw[co]`, per
//! output channel `s8`. Its sum is then `s · sw[co] · (Σ q · qw − zp · Σ qw)`, with the integer
//! sum exact in `i32`. [`Quantized`] computes it so: the input is quantised back to `u8` as it
//! is packed (exactly the `QuantizeLinear` that precedes it in the graph), the products are
//! summed four at a time by AVX-512 VNNI's `vpdpbusd` (`u8 × s8`, 64 multiply-adds per
//! instruction against a float FMA's 16), and the epilogue subtracts `zp · Σ qw`, scales,
//! adds the bias, clamps and adds the residual as graft's float kernel does.
//!
//! Layouts. `vpdpbusd` multiplies the four bytes of each 32-bit lane of one operand by the four
//! bytes of the same lane of the other and adds them to the lane's `i32`. A lane holds one
//! position, so its four bytes are four consecutive input channels of that position: the input
//! is packed as `[image][group of 4 channels][block of TILE positions][TILE][4]` bytes, and
//! the weights as `[block of ROWS output channels][group][ROWS]` words, each four channels of
//! one output channel, broadcast to every lane. A tile is [`ROWS`] output channels × [`TILE`]
//! positions, 16 accumulators.
//!
//! **Fake quantisation.** [`fake_quant`] is a `QuantizeLinear → DequantizeLinear` pair in
//! floats: `clamp(round_even(x / s), −zp, 255 − zp) · s`, vectorised; the same values as
//! tract's two passes (which round, convert to `u8`, then convert back), in one pass, in place.

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::backbone::pointwise::kernel::Shape;

/// Output channels per tile.
pub const ROWS: usize = 8;

/// Positions per vector (`i32` lanes of a 512-bit register).
pub const LANES: usize = 16;

/// Positions per tile: two vectors.
pub const TILE: usize = 2 * LANES;

/// Input channels summed per byte group (per `vpdpbusd` lane).
pub const GROUP: usize = 4;

/// The fewest output channels whose tiles go channel block by channel block.
const CHANNEL_MAJOR_FROM: usize = 64;

/// Which compiled integer kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa8 {
    /// Plain integer loops: the reference, and what the checks run on any CPU.
    Scalar,
    /// x86-64 AVX-512 with VNNI (`vpdpbusd`, 16 lanes).
    #[cfg(target_arch = "x86_64")]
    Vnni512,
    /// x86-64 AVX2 with AVX-VNNI (the same instruction on 8 lanes, VEX-encoded: Intel's
    /// Alder Lake and later, the N100-class boards included, which lack AVX-512).
    #[cfg(target_arch = "x86_64")]
    Vnni256,
    /// aarch64 with Armv8.2's dot product (`sdot`, signed bytes, 4 lanes: the Pi 5's
    /// Cortex-A76 and Jetson Orin's A78AE; not the Pi 4's A72). Signed, so the input is
    /// packed as `q − 128` ([`zp_correction`]).
    #[cfg(target_arch = "aarch64")]
    Sdot,
}

impl Isa8 {
    /// The vectorised integer kernel this CPU runs, if any. Without one graft keeps its float
    /// kernel for the convolution (the same values within float rounding, and faster than a
    /// scalar integer loop).
    pub fn vectorised() -> Option<Isa8> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Some(Isa8::Vnni512);
            }
            if avx_vnni() {
                return Some(Isa8::Vnni256);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Some(Isa8::Sdot);
        }
        None
    }

    /// Every integer kernel this CPU runs (the scalar reference first).
    pub fn available() -> Vec<Isa8> {
        #[allow(unused_mut)]
        let mut all = vec![Isa8::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if avx_vnni() {
                all.push(Isa8::Vnni256);
            }
            if Isa8::vectorised() == Some(Isa8::Vnni512) {
                all.push(Isa8::Vnni512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if Isa8::vectorised() == Some(Isa8::Sdot) {
            all.push(Isa8::Sdot);
        }
        all
    }

    /// Short name, e.g. `avx512-vnni`.
    pub fn name(self) -> &'static str {
        match self {
            Isa8::Scalar => "scalar-i32",
            #[cfg(target_arch = "x86_64")]
            Isa8::Vnni512 => "avx512-vnni",
            #[cfg(target_arch = "x86_64")]
            Isa8::Vnni256 => "avx-vnni",
            #[cfg(target_arch = "aarch64")]
            Isa8::Sdot => "neon-sdot",
        }
    }
}

/// The entry of [`Quantized::zp_sums`] for an output channel whose `s8` weights sum to `sum`,
/// its input's zero point `zp`, on `isa`: what the kernel subtracts from its integer sum. The
/// `u8 × s8` kernels sum `Σ q · qw` and subtract `zp · Σ qw`; `Isa8::Sdot` (aarch64) multiplies signed
/// bytes, so it packs each `q` as `q − 128`, sums `Σ q · qw − 128 · Σ qw`, and subtracts
/// `(zp − 128) · Σ qw`: the same integer in the end, so the same floats.
pub fn zp_correction(isa: Isa8, zp: i32, sum: i32) -> i32 {
    match isa {
        #[cfg(target_arch = "aarch64")]
        Isa8::Sdot => (zp - 128) * sum,
        _ => zp * sum,
    }
}

/// Whether this CPU runs the AVX-VNNI kernel (AVX2, FMA and AVX-VNNI).
#[cfg(target_arch = "x86_64")]
fn avx_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("avxvnni")
}

/// Groups of [`GROUP`] input channels.
pub fn groups(cin: usize) -> usize {
    cin.div_ceil(GROUP)
}

/// Blocks of [`ROWS`] output channels.
fn blocks(cout: usize) -> usize {
    cout.div_ceil(ROWS)
}

/// Blocks of [`TILE`] positions.
fn position_blocks(hw: usize) -> usize {
    hw.div_ceil(TILE)
}

/// `u32` words of the packed input of a pass.
pub fn packed_input_words(s: &Shape) -> usize {
    s.batch * groups(s.cin) * position_blocks(s.hw) * TILE
}

/// Quantises one value as tract's `QuantizeLinearU8` does: `round_even(v · inv) + zp`,
/// saturated to `0..=255` (a NaN gives `zp`, as tract's float-to-integer conversion does).
#[inline(always)]
pub fn quantize(v: f32, inv: f32, zp: i32) -> u8 {
    ((v * inv).round_ties_even().clamp(-512.0, 512.0) as i32 + zp).clamp(0, 255) as u8
}

/// `[cout][cin]` `s8` weights laid out for the kernel, `[block][group][ROWS]` words (four
/// channels' bytes each, zero past the last channel), and each output channel's `Σ qw`
/// (`[block][ROWS]`, zero past the last).
pub fn pack_weights(q: &[i8], cin: usize, cout: usize) -> (Vec<i32>, Vec<i32>) {
    assert_eq!(q.len(), cin * cout, "int8 1x1 convolution weights");
    let (g, b) = (groups(cin), blocks(cout));
    let mut packed = vec![0i32; b * g * ROWS];
    let mut sums = vec![0i32; b * ROWS];
    for co in 0..cout {
        let (blk, r) = (co / ROWS, co % ROWS);
        for gi in 0..g {
            let mut bytes = [0u8; 4];
            for (j, byte) in bytes.iter_mut().enumerate() {
                let ci = gi * GROUP + j;
                if ci < cin {
                    *byte = q[co * cin + ci] as u8;
                }
            }
            packed[(blk * g + gi) * ROWS + r] = i32::from_le_bytes(bytes);
        }
        sums[co] = q[co * cin..(co + 1) * cin].iter().map(|&w| w as i32).sum();
    }
    (packed, sums)
}

/// One int8 1×1 convolution, ready to run: [`Quantized::pack_input`] over every unit, then
/// [`Quantized::run_tiles`] over every tile.
#[derive(Debug, Clone, Copy)]
pub struct Quantized<'a> {
    /// The convolution's shape.
    pub shape: Shape,
    /// Weights from [`pack_weights`].
    pub weights: &'a [i32],
    /// `zp · Σ qw` per output channel (`[block][ROWS]`), as [`zp_correction`] gives it for
    /// `isa`.
    pub zp_sums: &'a [i32],
    /// `s · sw[co]` per output channel (`[block][ROWS]`).
    pub scales: &'a [f32],
    /// Bias per output channel (`[block][ROWS]`).
    pub bias: &'a [f32],
    /// Outputs are clamped to `[lo, hi]` before the residual is added.
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
    /// The input's quantisation: `1 / s` as tract's `QuantizeLinearU8` holds it, and `zp`.
    pub inv: f32,
    /// See `inv`.
    pub zero_point: u8,
    /// The fake quantisation that follows, folded in (after the clip and residual).
    pub grid: Option<Grid>,
    /// With a residual: the residual added after `grid` instead of before, and the sum put on
    /// this grid (a QDQ graph's residual `Add` and the quantisation pair after it), in a
    /// sweep over each tile once stored, while it is in L1.
    pub sum: Option<Grid>,
    /// Which compiled kernel runs it.
    pub isa: Isa8,
    /// [`Quantized::pack_input`]'s units are (image, block of [`TILE`] positions), every
    /// group of each, instead of (image, group of input channels), every position of each:
    /// where the input was written by threads that each took a range of positions (the 1×1
    /// convolution before, below 64 output channels), each thread then quantises what it wrote.
    pub pack_positions: bool,
}

impl Quantized<'_> {
    /// Units of [`Quantized::pack_input`]: every (image, group of input channels), or with
    /// `pack_positions` every (image, block of positions).
    pub fn units(&self) -> usize {
        let s = &self.shape;
        s.batch
            * if self.pack_positions {
                position_blocks(s.hw)
            } else {
                groups(s.cin)
            }
    }

    /// Whether consecutive tiles walk the positions of one block of output channels (else
    /// the channel blocks of one block of positions, whose input then stays in L1). As in
    /// graft's float kernel: with many output channels, position-inner order writes a few
    /// long output rows at a time instead of every channel's row at once (on Lite0's
    /// 16 → 96 over 112×112: 0.48 → 0.2x ms).
    pub(crate) fn channel_major(&self) -> bool {
        self.shape.cout >= CHANNEL_MAJOR_FROM
    }

    /// Tiles of [`Quantized::run_tiles`]: every (image, block of positions, block of output
    /// channels); from 64 output channels, the positions of one channel block first (as the
    /// float kernel), else the channel blocks of one block of positions first.
    pub fn tiles(&self) -> usize {
        let s = &self.shape;
        s.batch * position_blocks(s.hw) * blocks(s.cout)
    }

    fn check(&self) {
        let s = &self.shape;
        let b = blocks(s.cout) * ROWS;
        assert_eq!(self.weights.len(), b / ROWS * groups(s.cin) * ROWS);
        assert!(self.zp_sums.len() == b && self.scales.len() == b && self.bias.len() == b);
    }

    /// Runs the whole convolution on this thread: `input` is `[batch][cin][hw]`, `residual`
    /// and `output` `[batch][cout][hw]`.
    ///
    /// # Panics
    /// If a slice has the wrong length.
    pub fn run(&self, input: &[f32], residual: Option<&[f32]>, output: &mut [f32]) {
        let s = &self.shape;
        self.check();
        assert_eq!(input.len(), s.batch * s.cin * s.hw);
        assert_eq!(output.len(), s.batch * s.cout * s.hw);
        if let Some(r) = residual {
            assert_eq!(r.len(), output.len());
        }
        let mut packed = vec![0u32; packed_input_words(s)];
        // SAFETY: lengths checked above; one thread runs every unit and tile.
        unsafe {
            self.pack_input(input.as_ptr(), packed.as_mut_ptr(), 0..self.units());
            self.run_tiles(
                packed.as_ptr(),
                residual.map(|r| r.as_ptr()),
                output.as_mut_ptr(),
                0..self.tiles(),
            );
        }
    }

    /// Quantises and packs `units` of the input (`[batch][cin][hw]` floats) into `packed`
    /// ([`packed_input_words`]).
    ///
    /// # Safety
    /// `input` and `packed` must have their full lengths, the CPU must run `self.isa`, and no
    /// other thread may write the same units.
    pub unsafe fn pack_input(&self, input: *const f32, packed: *mut u32, units: Range<usize>) {
        let s = &self.shape;
        let (g, pb) = (groups(s.cin), position_blocks(s.hw));
        if self.pack_positions {
            // Each image's run of blocks in `units`: every group's positions there, one
            // stream per channel row.
            let mut u = units.start;
            while u < units.end {
                let (image, first) = (u / pb, u % pb);
                let last = units.end.min((image + 1) * pb) - image * pb;
                let (p0, n) = (first * TILE, s.hw.min(last * TILE) - first * TILE);
                for gi in 0..g {
                    // SAFETY: as below, from position `p0` on; `n` positions of `[image][gi]`
                    // from block `first` on are in bounds of `packed`.
                    unsafe {
                        self.pack_rows(
                            input,
                            image,
                            gi,
                            p0,
                            n,
                            packed.add(((image * g + gi) * pb + first) * TILE),
                        )
                    };
                }
                u = image * pb + last;
            }
            return;
        }
        for unit in units {
            let (image, gi) = (unit / g, unit % g);
            // SAFETY: `[image][gi]`'s blocks are in bounds of `packed`.
            unsafe {
                self.pack_rows(
                    input,
                    image,
                    gi,
                    0,
                    s.hw,
                    packed.add((image * g + gi) * pb * TILE),
                )
            };
        }
    }

    /// Packs positions `p0..p0 + n` of group `gi` of image `image` into `out`.
    ///
    /// # Safety
    /// As [`Quantized::pack_input`]; `out` holds `position_blocks(n)` blocks.
    #[inline]
    unsafe fn pack_rows(
        &self,
        input: *const f32,
        image: usize,
        gi: usize,
        p0: usize,
        n: usize,
        out: *mut u32,
    ) {
        let s = &self.shape;
        // The four channel rows of this group (fewer past `cin`).
        let rows: [Option<*const f32>; GROUP] = std::array::from_fn(|j| {
            let c = gi * GROUP + j;
            // SAFETY: in bounds of `input` when `c < cin`.
            (c < s.cin).then(|| unsafe { input.add((image * s.cin + c) * s.hw + p0) })
        });
        unsafe {
            match self.isa {
                Isa8::Scalar => pack_scalar(rows, n, self.inv, self.zero_point, out),
                #[cfg(target_arch = "x86_64")]
                Isa8::Vnni512 => x86::pack(rows, n, self.inv, self.zero_point, out),
                #[cfg(target_arch = "x86_64")]
                Isa8::Vnni256 => x86::pack256(rows, n, self.inv, self.zero_point, out),
                #[cfg(target_arch = "aarch64")]
                Isa8::Sdot => arm::pack(rows, n, self.inv, self.zero_point, out),
            }
        }
    }

    /// The units of [`Quantized::pack_input`] that `tiles` read (a range of units that may
    /// hold a few more): their images' groups, or their blocks of positions.
    fn units_of_tiles(&self, tiles: Range<usize>) -> Range<usize> {
        let s = &self.shape;
        let (pb, cb) = (position_blocks(s.hw), blocks(s.cout));
        let (first, last) = (tiles.start, tiles.end - 1);
        let (i0, i1) = (first / (pb * cb), last / (pb * cb));
        if !self.pack_positions {
            let g = groups(s.cin);
            return i0 * g..(i1 + 1) * g;
        }
        if !self.channel_major() {
            // Tiles go (image, block of positions, block of channels): a unit's tiles are
            // consecutive.
            return first / cb..last / cb + 1;
        }
        // (image, block of channels, block of positions): all of each image's positions
        // unless the tiles stay within one block of channels.
        if first / pb == last / pb {
            let base = i0 * pb;
            base + first % pb..base + last % pb + 1
        } else {
            i0 * pb..(i1 + 1) * pb
        }
    }

    /// Part `part` of `parts` of the whole convolution, the parts run at the same time by as
    /// many threads (or one after another by fewer): packs an equal share of the units, then
    /// runs an equal share of the tiles. The tiles wait only for the units they read; a unit
    /// no thread has taken yet is packed by the first thread that needs it, so a thread that
    /// starts late finds its share done rather than holding the others up. One meeting of the
    /// threads per convolution instead of one for the packing and one for the tiles.
    ///
    /// # Safety
    /// As [`Quantized::pack_input`] and [`Quantized::run_tiles`]; `claims` holds
    /// [`Quantized::units`] values, all [`Claims::FREE`] before the first part starts, shared
    /// by every part of this run, and `packed` by them too.
    pub unsafe fn run_part(
        &self,
        io: (*const f32, *mut u32, Option<*const f32>, *mut f32),
        part: usize,
        parts: usize,
        claims: &Claims,
    ) {
        let (input, packed, residual, output) = io;
        let (units, tiles) = (self.units(), self.tiles());
        // SAFETY: the caller's.
        unsafe {
            claims.ensure(part * units / parts..(part + 1) * units / parts, |r| {
                self.pack_input(input, packed, r)
            });
        }
        let mine = part * tiles / parts..(part + 1) * tiles / parts;
        if mine.is_empty() {
            return;
        }
        // SAFETY: the caller's.
        unsafe {
            claims.ensure(self.units_of_tiles(mine.clone()), |r| {
                self.pack_input(input, packed, r)
            });
            self.run_tiles(packed, residual, output, mine);
        }
    }

    /// Runs `tiles`, reading [`Quantized::pack_input`]'s output.
    ///
    /// # Safety
    /// `packed` must hold the packed input, `residual` (if any) and `output` their full
    /// lengths, the CPU must run `self.isa`, and no other thread may write the same tiles.
    pub unsafe fn run_tiles(
        &self,
        packed: *const u32,
        residual: Option<*const f32>,
        output: *mut f32,
        tiles: Range<usize>,
    ) {
        let s = &self.shape;
        let (g, pb, cb) = (groups(s.cin), position_blocks(s.hw), blocks(s.cout));
        for t in tiles {
            let image = t / (pb * cb);
            let (p, b) = if self.channel_major() {
                (t % pb, (t / pb) % cb)
            } else {
                ((t / cb) % pb, t % cb)
            };
            let tile = Tile {
                // SAFETY: the offsets below stay within the buffers' lengths.
                packed: unsafe { packed.add((image * g * pb + p) * TILE) },
                weights: unsafe { self.weights.as_ptr().add(b * g * ROWS) },
                stride: pb * TILE,
                groups: g,
                first_channel: b * ROWS,
                first_position: p * TILE,
                image_out: unsafe { output.add(image * s.cout * s.hw) },
                // With `sum`, the residual is added by the sweep below.
                image_residual: residual
                    .filter(|_| self.sum.is_none())
                    .map(|r| unsafe { r.add(image * s.cout * s.hw) }),
            };
            unsafe {
                match self.isa {
                    Isa8::Scalar => tile_scalar(self, &tile),
                    #[cfg(target_arch = "x86_64")]
                    Isa8::Vnni512 => x86::tile(self, &tile),
                    #[cfg(target_arch = "x86_64")]
                    Isa8::Vnni256 => {
                        // Four quarters of the tile: 16 accumulators and the operands do not
                        // fit AVX2's 16 registers otherwise.
                        for rows in [0, ROWS / 2] {
                            for half in [0, LANES] {
                                x86::quarter256(self, &tile, rows, half);
                            }
                        }
                    }
                    #[cfg(target_arch = "aarch64")]
                    Isa8::Sdot => arm::tile(self, &tile),
                }
            }
            if let (Some(g), Some(res)) = (self.sum, residual) {
                let (p0, c0) = (p * TILE, b * ROWS);
                let n = (s.hw - p0).min(TILE);
                let rows = (s.cout - c0).min(ROWS);
                let at = (image * s.cout + c0) * s.hw + p0;
                // SAFETY: this tile's `rows` channels of `n` positions, in bounds.
                unsafe { self.sum_on_grid(output.add(at), res.add(at), rows, n, g) };
            }
        }
    }

    /// `out[i] = g.one(out[i] + res[i])` for the first `n` values of `rows` rows `hw` apart:
    /// the residual `Add` and the quantisation pair after it, the values tract's three
    /// passes give.
    ///
    /// # Safety
    /// `out` and `res` must hold those rows; the CPU must run `self.isa`.
    #[inline]
    unsafe fn sum_on_grid(&self, out: *mut f32, res: *const f32, rows: usize, n: usize, g: Grid) {
        let hw = self.shape.hw;
        #[cfg(target_arch = "x86_64")]
        if matches!(self.isa, Isa8::Vnni512) {
            // SAFETY: the caller's.
            unsafe { x86::sum_on_grid(out, res, hw, rows, n, g) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(self.isa, Isa8::Sdot) {
            // SAFETY: the caller's; aarch64 always has NEON.
            unsafe { arm::sum_on_grid(out, res, hw, rows, n, g) };
            return;
        }
        for r in 0..rows {
            for i in r * hw..r * hw + n {
                // SAFETY: the caller's.
                unsafe { *out.add(i) = g.one(*out.add(i) + *res.add(i)) };
            }
        }
    }
}

/// Who packs which unit of one [`Quantized`] run: each unit free, taken by a thread that is
/// packing it, or packed.
pub struct Claims(Vec<AtomicU8>);

impl Claims {
    /// Not taken.
    pub const FREE: u8 = 0;
    const BUSY: u8 = 1;
    const DONE: u8 = 2;

    /// `units` free units.
    pub fn new(units: usize) -> Claims {
        Claims((0..units).map(|_| AtomicU8::new(Self::FREE)).collect())
    }

    /// Returns once every unit of `r` is packed: takes each run of free units and packs it
    /// with `pack` (in one call, so a thread's whole share streams its rows once), and waits
    /// for those another thread is packing (which wait for nothing: no deadlock, whatever
    /// the number of threads).
    fn ensure(&self, r: Range<usize>, pack: impl Fn(Range<usize>)) {
        let c = &self.0;
        let mut u = r.start;
        while u < r.end {
            let mut e = u;
            // A load first: a failed compare-exchange still takes the line from the other
            // core's cache.
            while e < r.end
                && c[e].load(Ordering::Relaxed) == Self::FREE
                && c[e]
                    .compare_exchange(Self::FREE, Self::BUSY, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                e += 1;
            }
            if e > u {
                pack(u..e);
                for claim in &c[u..e] {
                    claim.store(Self::DONE, Ordering::Release);
                }
                u = e;
                continue;
            }
            while c[u].load(Ordering::Acquire) != Self::DONE {
                std::hint::spin_loop();
            }
            u += 1;
        }
    }
}

/// Where one tile reads and writes.
struct Tile {
    /// The tile's first group: `TILE` words, the next group `stride` words further.
    packed: *const u32,
    stride: usize,
    groups: usize,
    /// The channel block's weights, `[group][ROWS]`.
    weights: *const i32,
    first_channel: usize,
    first_position: usize,
    /// The image's output (and residual), `[cout][hw]`.
    image_out: *mut f32,
    image_residual: Option<*const f32>,
}

/// # Safety
/// `rows` point at `hw` floats each, `out` at `position_blocks(hw) * TILE` words.
unsafe fn pack_scalar(
    rows: [Option<*const f32>; GROUP],
    hw: usize,
    inv: f32,
    zp: u8,
    out: *mut u32,
) {
    let words = position_blocks(hw) * TILE;
    for p in 0..words {
        let mut word = 0u32;
        for (j, row) in rows.iter().enumerate() {
            // Past the last position or channel: any byte does (a zero weight, or an output
            // never stored); zero.
            if let (Some(row), true) = (row, p < hw) {
                word |= (quantize(unsafe { *row.add(p) }, inv, zp as i32) as u32) << (8 * j);
            }
        }
        unsafe { *out.add(p) = word };
    }
}

/// # Safety
/// As [`Quantized::run_tiles`].
unsafe fn tile_scalar(q: &Quantized, t: &Tile) {
    let s = &q.shape;
    for r in 0..ROWS {
        let co = t.first_channel + r;
        if co >= s.cout {
            break;
        }
        for l in 0..TILE {
            let p = t.first_position + l;
            if p >= s.hw {
                break;
            }
            let mut acc = 0i32;
            for gi in 0..t.groups {
                let x = unsafe { *t.packed.add(gi * t.stride + l) }.to_le_bytes();
                let w = unsafe { *t.weights.add(gi * ROWS + r) }.to_le_bytes();
                for j in 0..GROUP {
                    acc += x[j] as i32 * (w[j] as i8) as i32;
                }
            }
            let v = (acc - q.zp_sums[co]) as f32;
            let mut y = v.mul_add(q.scales[co], q.bias[co]);
            if q.lo > f32::NEG_INFINITY || q.hi < f32::INFINITY {
                y = y.max(q.lo).min(q.hi);
            }
            if let Some(res) = t.image_residual {
                y += unsafe { *res.add(co * s.hw + p) };
            }
            if let Some(g) = q.grid {
                y = g.one(y);
            }
            unsafe { *t.image_out.add(co * s.hw + p) = y };
        }
    }
}

/// The aarch64 builds: NEON (every aarch64 CPU) for the packing and the fake quantisation,
/// and the dot-product extension's `sdot` for the tiles.
#[cfg(target_arch = "aarch64")]
mod arm {
    use super::*;
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// `$acc += $x · $w[$lane]`: each 32-bit lane of `$acc` gains the dot product of that
    /// lane's four signed bytes of `$x` with the four of lane `$lane` of `$w` (`sdot`, by
    /// element). Its intrinsic (`vdotq_laneq_s32`) is unstable in Rust 1.95
    /// (`stdarch_neon_dotprod`); the instruction is not, in a function that enables
    /// `dotprod`.
    macro_rules! sdot {
        ($acc:expr, $x:expr, $w:expr, $lane:literal) => {
            asm!(
                concat!("sdot {a:v}.4s, {x:v}.16b, {w:v}.4b[", $lane, "]"),
                a = inout(vreg) $acc,
                x = in(vreg) $x,
                w = in(vreg) $w,
                options(pure, nomem, nostack, preserves_flags)
            )
        };
    }

    /// As [`super::pack_scalar`], four positions per vector, each byte stored as `q − 128`
    /// (`q ^ 0x80`: a signed byte for `sdot`).
    ///
    /// # Safety
    /// As [`super::pack_scalar`].
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn pack(
        rows: [Option<*const f32>; GROUP],
        hw: usize,
        inv: f32,
        zp: u8,
        out: *mut u32,
    ) {
        let (vinv, vzp) = (vdupq_n_f32(inv), vdupq_n_s32(zp as i32));
        let (lo, hi) = (vdupq_n_f32(-512.0), vdupq_n_f32(512.0));
        let (zero, max) = (vdupq_n_s32(0), vdupq_n_s32(255));
        let flip = vdupq_n_u32(0x8080_8080);
        let words = position_blocks(hw) * TILE;
        let mut p = 0;
        while p + 4 <= hw {
            let mut word = vdupq_n_u32(0);
            for (j, row) in rows.iter().enumerate() {
                let Some(row) = row else { continue };
                // SAFETY: positions `p..p + 4` are in bounds.
                let v = unsafe { vld1q_f32(row.add(p)) };
                // A NaN stays NaN through max and min, converts to 0 and becomes `zp`, as
                // in `quantize`.
                let t = vminq_f32(vmaxq_f32(vmulq_f32(v, vinv), lo), hi);
                let q = vcvtnq_s32_f32(t);
                let q = vminq_s32(vmaxq_s32(vaddq_s32(q, vzp), zero), max);
                let q = vshlq_u32(vreinterpretq_u32_s32(q), vdupq_n_s32(8 * j as i32));
                word = vorrq_u32(word, q);
            }
            // SAFETY: `p + 4 <= words`.
            unsafe { vst1q_u32(out.add(p), veorq_u32(word, flip)) };
            p += 4;
        }
        while p < words {
            let mut word = 0u32;
            if p < hw {
                for (j, row) in rows.iter().enumerate() {
                    if let Some(row) = row {
                        let q = quantize(unsafe { *row.add(p) }, inv, zp as i32);
                        word |= (q as u32) << (8 * j);
                    }
                }
            }
            unsafe { *out.add(p) = word ^ 0x8080_8080 };
            p += 1;
        }
    }

    /// [`super::Grid::one`] of 4 values.
    #[inline]
    #[target_feature(enable = "neon")]
    fn on_grid(
        v: float32x4_t,
        inv: float32x4_t,
        scale: float32x4_t,
        lo: float32x4_t,
        hi: float32x4_t,
    ) -> float32x4_t {
        let t = vrndnq_f32(vmulq_f32(v, inv));
        let number = vceqq_f32(t, t);
        let t = vminq_f32(vmaxq_f32(t, lo), hi);
        // A NaN becomes 0, as tract's conversion.
        let t = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(t), number));
        vmulq_f32(t, scale)
    }

    /// The whole vectors of [`super::fake_quant`]: returns how many values it did.
    ///
    /// # Safety
    /// `x` holds `n` floats.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn fake_quant(x: *mut f32, n: usize, inv: f32, scale: f32, zp: u8) -> usize {
        let (vinv, vs) = (vdupq_n_f32(inv), vdupq_n_f32(scale));
        let lo = vdupq_n_f32(-(zp as f32));
        let hi = vdupq_n_f32(255.0 - zp as f32);
        let mut i = 0;
        while i + 4 <= n {
            // SAFETY: `i + 4 <= n`.
            unsafe {
                let p = x.add(i);
                vst1q_f32(p, on_grid(vld1q_f32(p), vinv, vs, lo, hi));
            }
            i += 4;
        }
        i
    }

    /// [`Quantized::sum_on_grid`] four values at a time.
    ///
    /// # Safety
    /// As [`Quantized::sum_on_grid`].
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn sum_on_grid(
        out: *mut f32,
        res: *const f32,
        hw: usize,
        rows: usize,
        n: usize,
        g: Grid,
    ) {
        let (vinv, vs) = (vdupq_n_f32(g.inv), vdupq_n_f32(g.scale));
        let lo = vdupq_n_f32(-(g.zero_point as f32));
        let hi = vdupq_n_f32(255.0 - g.zero_point as f32);
        for row in 0..rows {
            let mut i = 0;
            // SAFETY: the first `n` values of each row are in bounds.
            unsafe {
                while i + 4 <= n {
                    let (p, r) = (out.add(row * hw + i), res.add(row * hw + i));
                    let v = vaddq_f32(vld1q_f32(p), vld1q_f32(r));
                    vst1q_f32(p, on_grid(v, vinv, vs, lo, hi));
                    i += 4;
                }
                for at in row * hw + i..row * hw + n {
                    *out.add(at) = g.one(*out.add(at) + *res.add(at));
                }
            }
        }
    }

    /// One tile in four runs of 8 positions (two vectors) × [`ROWS`] output channels: 16
    /// accumulators, and per group two loads of inputs, two of weights and 16 `sdot`s.
    ///
    /// # Safety
    /// As [`Quantized::run_tiles`], the input packed by [`pack`], and the CPU runs `dotprod`.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn tile(q: &Quantized, t: &Tile) {
        let s = &q.shape;
        for run in 0..TILE / 8 {
            let p0 = t.first_position + run * 8;
            if p0 >= s.hw {
                break;
            }
            let mut acc = [[vdupq_n_s32(0); 2]; ROWS];
            for gi in 0..t.groups {
                // SAFETY: the group's 8 words of this run and its ROWS weights are in bounds.
                unsafe {
                    let x = t.packed.add(gi * t.stride + run * 8) as *const i8;
                    let (x0, x1) = (vld1q_s8(x), vld1q_s8(x.add(16)));
                    let w = t.weights.add(gi * ROWS) as *const i8;
                    let (w0, w1) = (vld1q_s8(w), vld1q_s8(w.add(16)));
                    sdot!(acc[0][0], x0, w0, 0);
                    sdot!(acc[0][1], x1, w0, 0);
                    sdot!(acc[1][0], x0, w0, 1);
                    sdot!(acc[1][1], x1, w0, 1);
                    sdot!(acc[2][0], x0, w0, 2);
                    sdot!(acc[2][1], x1, w0, 2);
                    sdot!(acc[3][0], x0, w0, 3);
                    sdot!(acc[3][1], x1, w0, 3);
                    sdot!(acc[4][0], x0, w1, 0);
                    sdot!(acc[4][1], x1, w1, 0);
                    sdot!(acc[5][0], x0, w1, 1);
                    sdot!(acc[5][1], x1, w1, 1);
                    sdot!(acc[6][0], x0, w1, 2);
                    sdot!(acc[6][1], x1, w1, 2);
                    sdot!(acc[7][0], x0, w1, 3);
                    sdot!(acc[7][1], x1, w1, 3);
                }
            }
            // SAFETY: the caller's.
            unsafe { finish(q, t, &acc, p0) };
        }
    }

    /// The epilogue of [`tile`]'s run at position `p0`: as [`super::tile_scalar`]'s, four
    /// positions at a time.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn finish(q: &Quantized, t: &Tile, acc: &[[int32x4_t; 2]; ROWS], p0: usize) {
        let s = &q.shape;
        let clip = q.lo > f32::NEG_INFINITY || q.hi < f32::INFINITY;
        let (lo, hi) = (vdupq_n_f32(q.lo), vdupq_n_f32(q.hi));
        let grid = q.grid.map(|g| {
            (
                vdupq_n_f32(g.inv),
                vdupq_n_f32(g.scale),
                vdupq_n_f32(-(g.zero_point as f32)),
                vdupq_n_f32(255.0 - g.zero_point as f32),
            )
        });
        for (r, a) in acc.iter().enumerate() {
            let co = t.first_channel + r;
            if co >= s.cout {
                break;
            }
            let corr = vdupq_n_s32(q.zp_sums[co]);
            let (scale, bias) = (vdupq_n_f32(q.scales[co]), vdupq_n_f32(q.bias[co]));
            for (v, &sum) in a.iter().enumerate() {
                let p = p0 + 4 * v;
                if p >= s.hw {
                    break;
                }
                let n = (s.hw - p).min(4);
                let at = co * s.hw + p;
                let mut y = vfmaq_f32(bias, vcvtq_f32_s32(vsubq_s32(sum, corr)), scale);
                if clip {
                    // `f32::max`/`min`: a NaN gives the bound (none arises: the sum is finite).
                    y = vminnmq_f32(vmaxnmq_f32(y, lo), hi);
                }
                if let Some(res) = t.image_residual {
                    let mut r = [0f32; 4];
                    // SAFETY: the first `n` residuals of this row are in bounds.
                    unsafe { std::ptr::copy_nonoverlapping(res.add(at), r.as_mut_ptr(), n) };
                    y = vaddq_f32(y, unsafe { vld1q_f32(r.as_ptr()) });
                }
                if let Some((inv, gs, glo, ghi)) = grid {
                    y = on_grid(y, inv, gs, glo, ghi);
                }
                // SAFETY: the first `n` outputs of this row are in bounds.
                unsafe {
                    if n == 4 {
                        vst1q_f32(t.image_out.add(at), y);
                    } else {
                        let mut o = [0f32; 4];
                        vst1q_f32(o.as_mut_ptr(), y);
                        std::ptr::copy_nonoverlapping(o.as_ptr(), t.image_out.add(at), n);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// As [`super::pack_scalar`], and the CPU runs AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack(
        rows: [Option<*const f32>; GROUP],
        hw: usize,
        inv: f32,
        zp: u8,
        out: *mut u32,
    ) {
        let (vinv, vzp) = (_mm512_set1_ps(inv), _mm512_set1_epi32(zp as i32));
        let (lo, hi) = (_mm512_set1_ps(-512.0), _mm512_set1_ps(512.0));
        let (zero, max) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
        let words = position_blocks(hw) * TILE;
        let mut p = 0;
        while p < words {
            let n = hw.saturating_sub(p).min(LANES);
            let mask: __mmask16 = if n == LANES { 0xffff } else { (1u16 << n) - 1 };
            let mut word = zero;
            for (j, row) in rows.iter().enumerate() {
                let Some(row) = row else { continue };
                if n == 0 {
                    break;
                }
                // SAFETY: only the first `n` positions (in bounds) are read.
                let v = unsafe { _mm512_maskz_loadu_ps(mask, row.add(p)) };
                let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, vinv), lo), hi);
                let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    t,
                );
                let q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, vzp), zero), max);
                word = _mm512_or_si512(word, _mm512_sllv_epi32(q, _mm512_set1_epi32(8 * j as i32)));
            }
            unsafe { _mm512_storeu_si512(out.add(p) as *mut __m512i, word) };
            p += LANES;
        }
    }

    /// # Safety
    /// As [`Quantized::run_tiles`], and the CPU runs AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(q: &Quantized, t: &Tile) {
        let mut acc = [[_mm512_setzero_si512(); 2]; ROWS];
        for gi in 0..t.groups {
            // SAFETY: the group's two vectors and ROWS weights are in bounds.
            let x = unsafe { t.packed.add(gi * t.stride) };
            let x0 = unsafe { _mm512_loadu_si512(x as *const __m512i) };
            let x1 = unsafe { _mm512_loadu_si512(x.add(LANES) as *const __m512i) };
            let w = unsafe { t.weights.add(gi * ROWS) };
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_epi32(unsafe { *w.add(r) });
                a[0] = _mm512_dpbusd_epi32(a[0], x0, wv);
                a[1] = _mm512_dpbusd_epi32(a[1], x1, wv);
            }
        }
        let s = &q.shape;
        let (lo, hi) = (_mm512_set1_ps(q.lo), _mm512_set1_ps(q.hi));
        let clip = q.lo > f32::NEG_INFINITY || q.hi < f32::INFINITY;
        let grid = q.grid.map(|g| {
            (
                _mm512_set1_ps(g.inv),
                _mm512_set1_ps(g.scale),
                _mm512_set1_ps(-(g.zero_point as f32)),
                _mm512_set1_ps(255.0 - g.zero_point as f32),
            )
        });
        for (r, a) in acc.iter().enumerate() {
            let co = t.first_channel + r;
            if co >= s.cout {
                break;
            }
            let corr = _mm512_set1_epi32(q.zp_sums[co]);
            let (scale, bias) = (_mm512_set1_ps(q.scales[co]), _mm512_set1_ps(q.bias[co]));
            for (j, &v) in a.iter().enumerate() {
                let p = t.first_position + j * LANES;
                if p >= s.hw {
                    break;
                }
                let n = (s.hw - p).min(LANES);
                let mask: __mmask16 = if n == LANES { 0xffff } else { (1u16 << n) - 1 };
                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(v, corr));
                let mut y = _mm512_fmadd_ps(v, scale, bias);
                if clip {
                    y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
                }
                let at = co * s.hw + p;
                if let Some(res) = t.image_residual {
                    y = _mm512_add_ps(y, unsafe { _mm512_maskz_loadu_ps(mask, res.add(at)) });
                }
                if let Some((inv, scale, glo, ghi)) = grid {
                    // Without a residual the sum is finite: no NaN to map to 0.
                    y = if t.image_residual.is_some() {
                        on_grid(y, inv, scale, glo, ghi)
                    } else {
                        on_grid_finite(y, inv, scale, glo, ghi)
                    };
                }
                unsafe { _mm512_mask_storeu_ps(t.image_out.add(at), mask, y) };
            }
        }
    }

    /// [`super::Grid::one`] of 16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn on_grid(v: __m512, inv: __m512, scale: __m512, lo: __m512, hi: __m512) -> __m512 {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v, inv),
        );
        // max/min return their second operand for a NaN first: 0, as tract's conversion.
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(t, t);
        let t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
        _mm512_mul_ps(_mm512_mask_blend_ps(nan, t, _mm512_setzero_ps()), scale)
    }

    /// [`super::Grid::one`] of 8 values.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn on_grid256(v: __m256, inv: __m256, scale: __m256, lo: __m256, hi: __m256) -> __m256 {
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(v, inv),
        );
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(t, t);
        let t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
        _mm256_mul_ps(_mm256_blendv_ps(t, _mm256_setzero_ps(), nan), scale)
    }

    /// The whole vectors of [`super::fake_quant`] on AVX2: returns how many values it did
    /// (the rest is the caller's).
    ///
    /// # Safety
    /// `x` holds `n` floats; the CPU runs AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fake_quant256(
        x: *mut f32,
        n: usize,
        inv: f32,
        scale: f32,
        lo: f32,
        hi: f32,
    ) -> usize {
        let (vinv, vs) = (_mm256_set1_ps(inv), _mm256_set1_ps(scale));
        let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let mut i = 0;
        while i + 8 <= n {
            let p = unsafe { x.add(i) };
            let v = unsafe { _mm256_loadu_ps(p) };
            unsafe { _mm256_storeu_ps(p, on_grid256(v, vinv, vs, vlo, vhi)) };
            i += 8;
        }
        i
    }

    /// As [`pack`] on AVX2: 8 positions per vector, the tail a value at a time.
    ///
    /// # Safety
    /// As [`super::pack_scalar`], and the CPU runs AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack256(
        rows: [Option<*const f32>; GROUP],
        hw: usize,
        inv: f32,
        zp: u8,
        out: *mut u32,
    ) {
        let (vinv, vzp) = (_mm256_set1_ps(inv), _mm256_set1_epi32(zp as i32));
        let (lo, hi) = (_mm256_set1_ps(-512.0), _mm256_set1_ps(512.0));
        let (zero, max) = (_mm256_setzero_si256(), _mm256_set1_epi32(255));
        let words = position_blocks(hw) * TILE;
        let mut p = 0;
        while p + 8 <= hw {
            let mut word = zero;
            for (j, row) in rows.iter().enumerate() {
                let Some(row) = row else { continue };
                // SAFETY: positions `p..p + 8` are in bounds.
                let v = unsafe { _mm256_loadu_ps(row.add(p)) };
                let t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, vinv), lo), hi);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
                let q = _mm256_add_epi32(_mm256_cvtps_epi32(t), vzp);
                let q = _mm256_min_epi32(_mm256_max_epi32(q, zero), max);
                word = _mm256_or_si256(word, _mm256_sllv_epi32(q, _mm256_set1_epi32(8 * j as i32)));
            }
            unsafe { _mm256_storeu_si256(out.add(p) as *mut __m256i, word) };
            p += 8;
        }
        for p in p..words {
            let mut word = 0u32;
            for (j, row) in rows.iter().enumerate() {
                if let (Some(row), true) = (row, p < hw) {
                    word |= (quantize(unsafe { *row.add(p) }, inv, zp as i32) as u32) << (8 * j);
                }
            }
            unsafe { *out.add(p) = word };
        }
    }

    /// A quarter of a tile on AVX-VNNI: output channels `rows..rows + ROWS / 2`, positions
    /// `half..half + LANES` of the tile (two vectors of 8).
    ///
    /// # Safety
    /// As [`Quantized::run_tiles`], and the CPU runs AVX2, FMA and AVX-VNNI.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn quarter256(q: &Quantized, t: &Tile, rows: usize, half: usize) {
        const R: usize = ROWS / 2;
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for gi in 0..t.groups {
            // SAFETY: the group's two vectors and its weights are in bounds.
            let x = unsafe { t.packed.add(gi * t.stride + half) };
            let x0 = unsafe { _mm256_loadu_si256(x as *const __m256i) };
            let x1 = unsafe { _mm256_loadu_si256(x.add(8) as *const __m256i) };
            let w = unsafe { t.weights.add(gi * ROWS + rows) };
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_epi32(unsafe { *w.add(r) });
                a[0] = _mm256_dpbusd_avx_epi32(a[0], x0, wv);
                a[1] = _mm256_dpbusd_avx_epi32(a[1], x1, wv);
            }
        }
        let s = &q.shape;
        let (lo, hi) = (_mm256_set1_ps(q.lo), _mm256_set1_ps(q.hi));
        let clip = q.lo > f32::NEG_INFINITY || q.hi < f32::INFINITY;
        let grid = q.grid.map(|g| {
            (
                _mm256_set1_ps(g.inv),
                _mm256_set1_ps(g.scale),
                _mm256_set1_ps(-(g.zero_point as f32)),
                _mm256_set1_ps(255.0 - g.zero_point as f32),
            )
        });
        for (r, a) in acc.iter().enumerate() {
            let co = t.first_channel + rows + r;
            if co >= s.cout {
                break;
            }
            let corr = _mm256_set1_epi32(q.zp_sums[co]);
            let (scale, bias) = (_mm256_set1_ps(q.scales[co]), _mm256_set1_ps(q.bias[co]));
            for (j, &v) in a.iter().enumerate() {
                let p = t.first_position + half + j * 8;
                if p >= s.hw {
                    break;
                }
                let n = (s.hw - p).min(8);
                let at = co * s.hw + p;
                let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, corr));
                let mut y = _mm256_fmadd_ps(v, scale, bias);
                if clip {
                    y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
                }
                let mut buf = [0f32; 8];
                if let Some(res) = t.image_residual {
                    let r = if n == 8 {
                        unsafe { _mm256_loadu_ps(res.add(at)) }
                    } else {
                        // SAFETY: the first `n` residual values are in bounds.
                        unsafe { std::ptr::copy_nonoverlapping(res.add(at), buf.as_mut_ptr(), n) };
                        unsafe { _mm256_loadu_ps(buf.as_ptr()) }
                    };
                    y = _mm256_add_ps(y, r);
                }
                if let Some((inv, scale, glo, ghi)) = grid {
                    y = on_grid256(y, inv, scale, glo, ghi);
                }
                if n == 8 {
                    unsafe { _mm256_storeu_ps(t.image_out.add(at), y) };
                } else {
                    unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), y) };
                    // SAFETY: the first `n` outputs are in bounds.
                    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), t.image_out.add(at), n) };
                }
            }
        }
    }

    /// [`on_grid`] for values that are not NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn on_grid_finite(v: __m512, inv: __m512, scale: __m512, lo: __m512, hi: __m512) -> __m512 {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v, inv),
        );
        _mm512_mul_ps(_mm512_min_ps(_mm512_max_ps(t, lo), hi), scale)
    }

    /// # Safety
    /// `out` and `res` hold `n` floats, and the CPU runs AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_on_grid(
        out: *mut f32,
        res: *const f32,
        hw: usize,
        rows: usize,
        n: usize,
        g: super::Grid,
    ) {
        let (vinv, vs) = (_mm512_set1_ps(g.inv), _mm512_set1_ps(g.scale));
        let vlo = _mm512_set1_ps(-(g.zero_point as f32));
        let vhi = _mm512_set1_ps(255.0 - g.zero_point as f32);
        for row in 0..rows {
            let mut i = 0;
            while i < n {
                let m = (n - i).min(LANES);
                let mask: __mmask16 = if m == LANES { 0xffff } else { (1u16 << m) - 1 };
                let at = row * hw + i;
                let (p, r) = unsafe { (out.add(at), res.add(at)) };
                let v = unsafe {
                    _mm512_add_ps(
                        _mm512_maskz_loadu_ps(mask, p),
                        _mm512_maskz_loadu_ps(mask, r),
                    )
                };
                unsafe { _mm512_mask_storeu_ps(p, mask, on_grid(v, vinv, vs, vlo, vhi)) };
                i += LANES;
            }
        }
    }

    /// # Safety
    /// `x` holds `n` floats; the CPU runs AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fake_quant(x: *mut f32, n: usize, inv: f32, scale: f32, lo: f32, hi: f32) {
        let (vinv, vs) = (_mm512_set1_ps(inv), _mm512_set1_ps(scale));
        let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        let mut i = 0;
        while i < n {
            let m = (n - i).min(LANES);
            let mask: __mmask16 = if m == LANES { 0xffff } else { (1u16 << m) - 1 };
            let p = unsafe { x.add(i) };
            let v = unsafe { _mm512_maskz_loadu_ps(mask, p) };
            unsafe { _mm512_mask_storeu_ps(p, mask, on_grid(v, vinv, vs, vlo, vhi)) };
            i += LANES;
        }
    }
}

/// The grid of a `u8` quantisation, `(q − zp) · scale` for `q` in `0..=255`: where a fake
/// quantisation puts each value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    /// `1 / scale`, as tract's `QuantizeLinearU8` holds it.
    pub inv: f32,
    /// `scale`.
    pub scale: f32,
    /// `zp`.
    pub zero_point: u8,
}

impl Grid {
    /// For an operator's info, e.g. `then on the grid of scale 0.0235 zero point 0`.
    pub fn describe(&self) -> String {
        format!(
            "then on the grid of scale {} zero point {}",
            self.scale, self.zero_point
        )
    }

    /// [`fake_quant`] with this grid.
    pub fn apply(&self, x: &mut [f32]) {
        fake_quant(x, self.inv, self.scale, self.zero_point);
    }

    /// [`Grid::apply`] of one value.
    #[inline(always)]
    pub fn one(&self, v: f32) -> f32 {
        let (lo, hi) = (-(self.zero_point as f32), 255.0 - self.zero_point as f32);
        let t = (v * self.inv).round_ties_even();
        let t = if t.is_nan() { 0.0 } else { t.max(lo).min(hi) };
        t * self.scale
    }
}

/// A `QuantizeLinear → DequantizeLinear` pair in floats, in place: each value becomes
/// `clamp(round_even(x · inv), −zp, 255 − zp) · scale`, the value tract's two passes give (a
/// NaN gives 0, as there).
pub fn fake_quant(x: &mut [f32], inv: f32, scale: f32, zero_point: u8) {
    #[cfg(target_arch = "x86_64")]
    let (lo, hi) = (-(zero_point as f32), 255.0 - zero_point as f32);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the slice's length, and the CPU runs AVX-512 F.
        unsafe { x86::fake_quant(x.as_mut_ptr(), x.len(), inv, scale, lo, hi) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: the slice's length; aarch64 always has NEON. The tail is left to the loop.
    let x = {
        let done = unsafe { arm::fake_quant(x.as_mut_ptr(), x.len(), inv, scale, zero_point) };
        &mut x[done..]
    };
    #[cfg(target_arch = "x86_64")]
    let x = if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the slice's length, and the CPU runs AVX2; the tail is left to the loop.
        let done = unsafe { x86::fake_quant256(x.as_mut_ptr(), x.len(), inv, scale, lo, hi) };
        &mut x[done..]
    } else {
        x
    };
    let g = Grid {
        inv,
        scale,
        zero_point,
    };
    for v in x {
        *v = g.one(*v);
    }
}
