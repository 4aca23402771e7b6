//! graft's 1×1 convolution on the AMX tile unit of recent Intel Xeons (x86-64 with AMX-TILE,
//! AMX-BF16 and AVX-512): `out[co][p] = bias[co] + Σ_ci w[co][ci] · x[ci][p]` as products of
//! bfloat16 tiles, `TDPBF16PS`, which sums pairs of products into `f32`.
//!
//! One `TDPBF16PS` is 16 × 16 × 32 = 8192 multiply-adds: measured on the x86 VM of
//! `docs/performance.md`, 1277 G a second on one core, against 110 G for AVX-512's `f32` FMA.
//! A bfloat16 keeps 8 bits of a float's 24, so each input value is split in two, `hi = bf16(v)`
//! and `lo = bf16(v − hi)` (16 bits together, each rounded to nearest even). Float weights are
//! split alike and each product is `x_hi·w_hi + x_lo·w_hi + x_hi·w_lo`, three tile products,
//! the `lo·lo` term (2⁻¹⁸ of the product) left out. `w8`'s weights are integers times a scale
//! per output channel ([`recover_weights`]): the tiles hold the integers, exact in bfloat16,
//! each product is `x_hi·q + x_lo·q` and the scale multiplies the sum. So every product is
//! within about 2⁻¹⁶ of the float one, and the sums are `f32` in another order than the vector
//! kernel's: outputs differ from it by up to ~1e-4 of the largest (tested against the plain
//! loops here; `check_matrix_against_tract`, which `graft doctor` runs, bounds each output by
//! 2⁻¹⁶ of its `Σ|w·x|`). The vector kernel stays the reference everywhere else.
//!
//! Layout. A tile is 16 rows of 64 bytes. The weights, packed once at load: per block of 16
//! output channels, per half (`hi`, `lo`; the integers alone for `w8`), per block of 32 input
//! channels, the 16 × 32 tile `A[m][k] = w[16b + m][32kb + k]`. The input, packed by the thread
//! that runs it, per unit of 32 positions: per 16 positions, per half, per block of 32 channels,
//! the tile of 16 pairs of channels `B[r][2n + j] = x[32kb + 2r + j][p0 + n]`. Four accumulator
//! tiles (32 output channels × 32 positions), two of weights and two of input are the 8 tile
//! registers. Rows and positions past the convolution's are zero in the packed operands, and
//! never stored.
//!
//! Rust has no stable AMX intrinsics: the tile instructions are `asm!`, each naming its tile
//! registers (the compiler allocates none); the packing and the epilogue (bias, clip, residual,
//! the sum's clip, as the vector kernel's `Tile::run`) use AVX-512.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::backbone::quant::recover_weights;

/// Output channels (rows) and positions (columns) of an accumulator tile.
const TILE: usize = 16;

/// Input channels per tile product (bfloat16 values in a 64-byte row).
const K_BLOCK: usize = 32;

/// Positions per unit: two accumulator tiles' columns.
pub const UNIT: usize = 2 * TILE;

/// Output channels per pass over a unit: two accumulator tiles' rows.
const PAIR: usize = 2 * TILE;

/// One tile's bytes, aligned as a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Tile([u16; TILE * K_BLOCK]);

const ZERO: Tile = Tile([0; TILE * K_BLOCK]);

/// Whether this CPU and OS run the kernel: AVX-512 (F, BW, BF16), AMX-TILE and AMX-BF16, the tile
/// state enabled in XCR0, and (Linux) the process granted the tile data by `arch_prctl`.
/// Asked once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

fn detect() -> bool {
    if !is_x86_feature_detected!("avx512f")
        || !is_x86_feature_detected!("avx512bw")
        || !is_x86_feature_detected!("avx512bf16")
        || !is_x86_feature_detected!("xsave")
    {
        return false;
    }
    // CPUID leaf 7 exists on every CPU with AVX-512.
    let leaf7 = __cpuid_count(7, 0);
    let (bf16, tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
    if !(bf16 && tile) {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 is defined where the OS set CR4.OSXSAVE, which
    // `is_x86_feature_detected!("xsave")` checks (it reads OSXSAVE too).
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack));
    }
    // Bits 17 (XTILECFG) and 18 (XTILEDATA).
    if (lo >> 17) & 3 != 3 {
        return false;
    }
    request_tile_data()
}

/// Linux hands the tile data state only to processes that ask for it.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: u64 = 158;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) reads no memory and only
    // grants this process the feature; the syscall clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as i64 => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// `v` rounded to the nearest bfloat16 (ties to even), as its 16 bits; a NaN stays a NaN.
fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b | 0x0040_0000) >> 16) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` as `hi + lo`, two bfloat16s.
fn split(v: f32) -> (u16, u16) {
    let hi = bf16(v);
    (hi, bf16(v - f32::from_bits(u32::from(hi) << 16)))
}

/// A convolution's weights and bias packed for the tiles.
#[derive(Debug)]
pub struct Weights {
    tiles: Vec<Tile>,
    bias: Vec<f32>,
    /// Per output channel, the scale of its integer weights (`None`: the tiles are halves).
    scales: Option<Vec<f32>>,
    cin: usize,
    cout: usize,
}

impl std::fmt::Debug for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tile")
    }
}

impl Weights {
    /// `[cout][cin]` weights and `[cout]` biases. Where every output channel's weights are
    /// an `s8` matrix times a scale (`w8`, [`recover_weights`]), the tiles hold the integers,
    /// exact in bfloat16, and the scale multiplies the sums: a product of two halves, not
    /// three, over half the bytes.
    pub fn pack(weights: &[f32], bias: &[f32], cin: usize, cout: usize) -> Weights {
        assert_eq!(weights.len(), cin * cout, "1x1 convolution weights");
        assert_eq!(bias.len(), cout, "1x1 convolution bias");
        let kblocks = cin.div_ceil(K_BLOCK);
        let blocks = cout.div_ceil(PAIR) * 2;
        let recovered = recover_weights(weights, cin, cout);
        let halves = if recovered.is_some() { 1 } else { 2 };
        let mut tiles = vec![ZERO; blocks * halves * kblocks];
        for co in 0..cout {
            let (b, m) = (co / TILE, co % TILE);
            for ci in 0..cin {
                let (kb, k) = (ci / K_BLOCK, ci % K_BLOCK);
                let (hi, lo) = match &recovered {
                    Some((q, _)) => (bf16(f32::from(q[co * cin + ci])), 0),
                    None => split(weights[co * cin + ci]),
                };
                tiles[(b * halves) * kblocks + kb].0[m * K_BLOCK + k] = hi;
                if halves == 2 {
                    tiles[(b * 2 + 1) * kblocks + kb].0[m * K_BLOCK + k] = lo;
                }
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(blocks * TILE, 0.0);
        let scales = recovered.map(|(_, mut s)| {
            s.resize(blocks * TILE, 0.0);
            s
        });
        Weights {
            tiles,
            bias: padded,
            scales,
            cin,
            cout,
        }
    }

    /// Tiles of weights per block of 16 output channels and block of 32 input channels: the
    /// `hi` and `lo` halves, or the integers alone.
    fn halves(&self) -> usize {
        if self.scales.is_some() {
            1
        } else {
            2
        }
    }
}

/// One convolution over `batch` images of `hw` positions, ready to run unit by unit.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    /// From [`Weights::pack`].
    pub weights: &'a Weights,
    /// Images.
    pub batch: usize,
    /// Positions per channel plane.
    pub hw: usize,
    /// Outputs are clamped to `[lo, hi]` (±∞: no clip) before the residual is added.
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
    /// With a residual, the sum clamped to `[lo, hi]`.
    pub post: Option<&'a [f32; 2]>,
    /// Threads that share the items ([`Matrix::items`] depends on it).
    pub threads: usize,
}

thread_local! {
    /// Each thread's packed input of one chunk, kept between convolutions.
    static PANEL: std::cell::RefCell<Vec<Tile>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's partial sums of [`Matrix::run_share`]: a slot per part, of a
    /// [`Sums`] per (unit, pair of channel blocks), kept between convolutions.
    static PARTIALS: std::cell::RefCell<Vec<Sums>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The most parts a convolution's input channels are cut in ([`Matrix::k_parts`]): on more
/// threads, the others sit the projection out (at batch 1 a part of Lite0's largest, 1152
/// channels, would be 36 / 8 blocks of 32).
const MAX_PARTS: usize = 8;

/// What the threads running one convolution cut by input channels ([`Matrix::run_share`])
/// share: which parts are claimed and how many summed, where each left its sums, which runs
/// of the output are claimed and how many written, and whether a thread died holding one.
/// On the stack, no allocation: Lite0's 11 such convolutions a frame.
pub struct Reduction {
    parts: usize,
    claimed: [AtomicBool; MAX_PARTS],
    arrived: AtomicUsize,
    partials: [AtomicPtr<Sums>; MAX_PARTS],
    taken: [AtomicBool; MAX_PARTS],
    reduced: AtomicUsize,
    failed: AtomicBool,
}

impl Reduction {
    /// For `parts` parts ([`Matrix::k_parts`]).
    ///
    /// # Panics
    /// If `parts` is 0 or over [`Matrix::k_parts`]' most.
    pub fn new(parts: usize) -> Reduction {
        assert!((1..=MAX_PARTS).contains(&parts), "{parts} parts");
        Reduction {
            parts,
            claimed: [const { AtomicBool::new(false) }; MAX_PARTS],
            arrived: AtomicUsize::new(0),
            partials: [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_PARTS],
            taken: [const { AtomicBool::new(false) }; MAX_PARTS],
            reduced: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// Spins until `count` reaches the parts. Panics if a thread sharing the convolution
    /// panicked holding a part or a run ([`Unwinding`]), which would never be counted: its
    /// panic then reaches the caller through this one, not a thread spinning for ever.
    fn wait_for(&self, count: &AtomicUsize) {
        while count.load(Ordering::Acquire) < self.parts {
            assert!(
                !self.failed.load(Ordering::Acquire),
                "a thread sharing this 1x1 convolution panicked"
            );
            std::hint::spin_loop();
        }
    }
}

/// Marks a [`Reduction`] failed if its thread unwinds while this lives (from claiming a part
/// until the share's end).
struct Unwinding<'a>(&'a Reduction);

impl Drop for Unwinding<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::Release);
        }
    }
}

/// The tile configuration: palette 1, all 8 tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    const fn full() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = TILE as u8;
            t += 1;
        }
        Config(c)
    }
}

static CONFIG: Config = Config::full();

impl Matrix<'_> {
    /// Units of [`UNIT`] positions of one image.
    fn units(&self) -> usize {
        self.batch * self.hw.div_ceil(UNIT)
    }

    /// Units per chunk, and chunks: the units split evenly into as few chunks as the panel
    /// holds ([`group`]), and for a projection (more input channels than output) not cut by
    /// input channels ([`Matrix::k_parts`]), into at least one per thread. Threads share a
    /// chunk's pairs of channel blocks, each packing the whole chunk: right where the input
    /// is small (expansions: each thread streams half the weights and writes one contiguous
    /// half of the output; the 28×28 expansions, cut by positions, were 8–21% slower on two
    /// threads), wrong where the packing is most of the work (the 28×28 projection with two
    /// pairs, 40 channels, would pack its 144 channels twice).
    fn chunks(&self) -> (usize, usize) {
        let (units, w) = (self.units(), self.weights);
        let mut count = units.div_ceil(group(w.cin.div_ceil(K_BLOCK)));
        if w.cin > w.cout && w.cout <= self.hw {
            count = count.max(units.min(self.threads));
        }
        let per = units.div_ceil(count);
        (per, units.div_ceil(per))
    }

    /// Items of work, what threads share: each (chunk of units, pair of blocks of 16 output
    /// channels), pairs inner. A thread packs each chunk it has items of, then runs them: a
    /// 7×7 map's one chunk is packed by both threads, and each streams half the weights.
    pub fn items(&self) -> usize {
        self.chunks().1 * self.weights.cout.div_ceil(PAIR)
    }

    /// Runs the whole convolution on this thread: `input` is `[batch][cin][hw]`, `residual`
    /// and `output` `[batch][cout][hw]`.
    ///
    /// # Panics
    /// If a slice has the wrong length, or the CPU has no AMX ([`available`]).
    pub fn run(&self, input: &[f32], residual: Option<&[f32]>, output: &mut [f32]) {
        let w = self.weights;
        assert_eq!(input.len(), self.batch * w.cin * self.hw, "1x1 input");
        assert_eq!(output.len(), self.batch * w.cout * self.hw, "1x1 output");
        if let Some(r) = residual {
            assert_eq!(r.len(), output.len(), "1x1 residual");
        }
        // SAFETY: lengths checked above; one caller holds the whole output.
        unsafe {
            self.run_items(
                input.as_ptr(),
                residual.map(|r| r.as_ptr()),
                output.as_mut_ptr(),
                0..self.items(),
            )
        }
    }

    /// Runs items `range` of [`Matrix::items`].
    ///
    /// # Safety
    /// `input` must hold `batch × cin × hw` floats, `output` (and `residual`)
    /// `batch × cout × hw`; no one else may write these items' outputs meanwhile.
    ///
    /// # Panics
    /// If the CPU has no AMX ([`available`]).
    pub unsafe fn run_items(
        &self,
        input: *const f32,
        residual: Option<*const f32>,
        output: *mut f32,
        range: Range<usize>,
    ) {
        assert!(available(), "the AMX 1x1 kernel needs AMX-BF16");
        assert!(range.end <= self.items(), "1x1 items");
        let kblocks = self.weights.cin.div_ceil(K_BLOCK);
        let tiles = self.chunks().0 * 4 * kblocks;
        PANEL.with_borrow_mut(|panel| {
            if panel.len() < tiles {
                panel.resize(tiles, ZERO);
            }
            // SAFETY: the caller's contract; AVX-512 (F, BW, BF16) and AMX are there
            // (`available`).
            unsafe { self.items_avx512(input, residual, output, range, panel.as_mut_ptr()) }
        })
    }

    /// In how many parts the input channels are cut, a part per thread, each summing its
    /// channels' products for every output into its own partial sums, which the threads then
    /// add up, each a contiguous run of output channels ([`Matrix::run_share`]); 1: not cut
    /// ([`Matrix::run_items`]). Cut where the input has at least three times the channels of
    /// the partial sums (output channels rounded up to pairs of blocks): Lite0's projections
    /// but the 28×28 one of 40 channels and the 14×14 one of 80 from 240. Each thread then
    /// packs and reads only the input channels it wrote itself (the depthwise convolution
    /// before splits its channels over the threads in the same order) and streams its share
    /// of the weights, once. (Cut by positions instead, the 14×14 projections' packing read
    /// half its input from the other core's cache: on two threads they ran no faster than on
    /// one; cut by input channels, 1.3–1.8× faster. Of the two left out, the 28×28 one ran 30%
    /// slower cut, the other no faster.)
    pub fn k_parts(&self) -> usize {
        let w = self.weights;
        if self.threads > 1 && 3 * w.cout.div_ceil(PAIR) * PAIR <= w.cin {
            self.threads.min(w.cin.div_ceil(K_BLOCK)).min(MAX_PARTS)
        } else {
            1
        }
    }

    /// This thread's share of a convolution cut by input channels ([`Matrix::k_parts`]):
    /// parts of the input channels, each summing its channels' products for every unit and
    /// pair of channel blocks into this thread's partial sums; then, once every part has its
    /// sums, runs of the output (of its pairs of channel blocks, or where those are too few,
    /// of its units): the parts' sums added, then bias, clip, residual and the sum's clip.
    /// Part and run `first` first (a thread's index: each thread then reads the input
    /// channels it wrote and writes the output run it will read), then any no other thread
    /// has claimed. So no thread waits for a part no thread has
    /// started, however many threads run (one runs them all); a thread that summed a part
    /// returns only once every run is written, as the others read its sums until then.
    ///
    /// # Safety
    /// As [`Matrix::run_items`]; every thread must share one `shared`; no one else may write
    /// the output meanwhile.
    ///
    /// # Panics
    /// If the CPU has no AMX ([`available`]).
    pub unsafe fn run_share(
        &self,
        input: *const f32,
        residual: Option<*const f32>,
        output: *mut f32,
        first: usize,
        shared: &Reduction,
    ) {
        assert!(available(), "the AMX 1x1 kernel needs AMX-BF16");
        let parts = shared.parts;
        let _unwinding = Unwinding(shared);
        let order = || std::iter::once(first % parts).chain(0..parts);
        let pairs = self.weights.cout.div_ceil(PAIR);
        let items = self.units() * pairs;
        let kblocks = self.weights.cin.div_ceil(K_BLOCK);
        let mut summed = false;
        for part in order() {
            if shared.claimed[part].swap(true, Ordering::AcqRel) {
                continue;
            }
            let (k0, k1) = (part * kblocks / parts, (part + 1) * kblocks / parts);
            let tiles = group(k1 - k0).min(self.units()) * 4 * (k1 - k0);
            let sums = PANEL.with_borrow_mut(|panel| {
                if panel.len() < tiles {
                    panel.resize(tiles, ZERO);
                }
                PARTIALS.with_borrow_mut(|partials| {
                    // Room for every part at once, so that a second part summed by this
                    // thread never moves the first's sums, which other threads may read.
                    if partials.len() < parts * items {
                        *partials = (0..parts * items)
                            .map(|_| Sums([0.0; PAIR * UNIT]))
                            .collect();
                    }
                    let sums = partials[part * items..].as_mut_ptr();
                    // SAFETY: the caller's contract; AVX-512 (F, BW, BF16) and AMX are there
                    // (`available`); the slot holds `items` sums.
                    unsafe { self.part_avx512(input, k0..k1, sums, panel.as_mut_ptr()) };
                    sums
                })
            });
            shared.partials[part].store(sums, Ordering::Release);
            shared.arrived.fetch_add(1, Ordering::AcqRel);
            summed = true;
        }
        // Every part is claimed now, each by a thread that sums it without waiting on
        // anything.
        shared.wait_for(&shared.arrived);
        let partials = shared
            .partials
            .each_ref()
            .map(|p| p.load(Ordering::Acquire).cast_const());
        let partials = &partials[..parts];
        for run in order() {
            if shared.taken[run].swap(true, Ordering::AcqRel) {
                continue;
            }
            // Runs of pairs, every unit; with no more pairs than runs, runs of units, every
            // pair (Lite0's 28×28 projection to 40 channels: cut in pairs, 32 and 8 channels,
            // it took 0.060 ms on two threads; cut in units, 0.055; its 14×14 ones to 80,
            // cut in units, 5–8% longer than in pairs).
            let units = self.units();
            let (pair_run, unit_run) = if pairs > parts {
                (run * pairs / parts..(run + 1) * pairs / parts, 0..units)
            } else {
                (0..pairs, run * units / parts..(run + 1) * units / parts)
            };
            // SAFETY: every part's sums are written (`arrived`), and stay until every run is
            // (`reduced`); this run is this thread's alone (`taken`); the caller's contract
            // for the rest.
            unsafe { self.reduce_avx512(pair_run, unit_run, partials, residual, output) };
            shared.reduced.fetch_add(1, Ordering::AcqRel);
        }
        if summed {
            shared.wait_for(&shared.reduced);
        }
    }

    /// The sums of input channel blocks `ks` of every unit and pair of channel blocks, into
    /// `sums`, a [`Sums`] per (unit, pair), pairs inner.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn part_avx512(
        &self,
        input: *const f32,
        ks: Range<usize>,
        sums: *mut Sums,
        panel: *mut Tile,
    ) {
        let w = self.weights;
        let (cin, hw) = (w.cin, self.hw);
        let kblocks = cin.div_ceil(K_BLOCK);
        let nk = ks.len();
        let c0 = ks.start * K_BLOCK;
        let per_image = hw.div_ceil(UNIT);
        let pairs = w.cout.div_ceil(PAIR);
        let (halves, per_unit, units) = (w.halves(), 4 * nk, self.units());
        // SAFETY (the whole body): offsets stay inside the buffers (the caller's contract,
        // the packing's sizes); the CPU runs AVX-512 and AMX.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
            let per_chunk = group(nk);
            let mut first = 0;
            while first < units {
                let chunk = first..(first + per_chunk).min(units);
                for (i, u) in chunk.clone().enumerate() {
                    let (n, p0) = (u / per_image, u % per_image * UNIT);
                    let x = input.add((n * cin + c0) * hw + p0);
                    let positions = (hw - p0).min(UNIT);
                    let channels = (cin - c0).min(nk * K_BLOCK);
                    pack_input(x, hw, channels, positions, panel.add(i * per_unit), nk);
                }
                for pair in 0..pairs {
                    let a = w.tiles.as_ptr().add(pair * 2 * halves * kblocks + ks.start);
                    for (i, u) in chunk.clone().enumerate() {
                        product(a, kblocks, halves, panel.add(i * per_unit), nk);
                        store_accumulators(sums.add(u * pairs + pair));
                    }
                }
                first = chunk.end;
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Pairs `pair_run` of units `unit_run` (of every image's) of the output, pair by pair:
    /// the parts' partial sums added, in part order, then [`Matrix::store`]d.
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce_avx512(
        &self,
        pair_run: Range<usize>,
        unit_run: Range<usize>,
        partials: &[*const Sums],
        residual: Option<*const f32>,
        output: *mut f32,
    ) {
        let (cout, hw) = (self.weights.cout, self.hw);
        let pairs = cout.div_ceil(PAIR);
        let per_image = hw.div_ceil(UNIT);
        let mut sums = Sums([0.0; PAIR * UNIT]);
        // SAFETY: each partial holds `units × pairs` sums; the output (and residual) rows of
        // these pairs and units are inside `batch × cout × hw` (the caller's contract).
        unsafe {
            for (pair, unit) in pair_run.flat_map(|p| unit_run.clone().map(move |u| (p, u))) {
                let (n, p0) = (unit / per_image, unit % per_image * UNIT);
                let co0 = pair * PAIR;
                let rows = (cout - co0).min(PAIR);
                for v in (0..rows * UNIT).step_by(TILE) {
                    let mut acc =
                        _mm512_load_ps((*partials[0].add(unit * pairs + pair)).0.as_ptr().add(v));
                    for p in &partials[1..] {
                        let s = (*p.add(unit * pairs + pair)).0.as_ptr().add(v);
                        acc = _mm512_add_ps(acc, _mm512_load_ps(s));
                    }
                    _mm512_store_ps(sums.0.as_mut_ptr().add(v), acc);
                }
                let at = (n * cout + co0) * hw + p0;
                self.store(&sums, co0, p0, output.add(at), residual.map(|r| r.add(at)));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn items_avx512(
        &self,
        input: *const f32,
        residual: Option<*const f32>,
        output: *mut f32,
        range: Range<usize>,
        panel: *mut Tile,
    ) {
        let w = self.weights;
        let (cin, cout, hw) = (w.cin, w.cout, self.hw);
        let kblocks = cin.div_ceil(K_BLOCK);
        let per_image = hw.div_ceil(UNIT);
        let pairs = cout.div_ceil(PAIR);
        let mut sums = Sums([0.0; PAIR * UNIT]);
        // SAFETY (the whole body): offsets stay inside the buffers (the caller's contract,
        // the packing's sizes); the CPU runs AVX-512 and AMX.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
            let (halves, per_unit) = (w.halves(), 4 * kblocks);
            let (per_chunk, _) = self.chunks();
            let units = self.units();
            let mut packed = None;
            for item in range {
                let (chunk, pair) = (item / pairs, item % pairs);
                let first = chunk * per_chunk;
                let chunk_units = first..(first + per_chunk).min(units);
                if packed != Some(chunk) {
                    for (i, u) in chunk_units.clone().enumerate() {
                        let (n, p0) = (u / per_image, u % per_image * UNIT);
                        let x = input.add(n * cin * hw + p0);
                        let positions = (hw - p0).min(UNIT);
                        pack_input(x, hw, cin, positions, panel.add(i * per_unit), kblocks);
                    }
                    packed = Some(chunk);
                }
                let a = w.tiles.as_ptr().add(pair * 2 * halves * kblocks);
                for (i, u) in chunk_units.clone().enumerate() {
                    let (n, p0) = (u / per_image, u % per_image * UNIT);
                    product(a, kblocks, halves, panel.add(i * per_unit), kblocks);
                    store_accumulators(&mut sums);
                    let co0 = pair * PAIR;
                    let at = (n * cout + co0) * hw + p0;
                    self.store(&sums, co0, p0, output.add(at), residual.map(|r| r.add(at)));
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Bias, clip, residual and the sum's clip of the sums of output channels `co0..` and
    /// positions `p0..` (as many as there are, up to a pass's), into the output rows at `out`
    /// (`hw` apart), as the vector kernel's `Tile::run`.
    #[target_feature(enable = "avx512f")]
    unsafe fn store(
        &self,
        sums: &Sums,
        co0: usize,
        p0: usize,
        out: *mut f32,
        res: Option<*const f32>,
    ) {
        let w = self.weights;
        let (rows, positions) = ((w.cout - co0).min(PAIR), (self.hw - p0).min(UNIT));
        // SAFETY: `co0 + rows` channels are inside the padded bias and scales.
        let (bias, scales) = unsafe {
            (
                w.bias.as_ptr().add(co0),
                w.scales.as_ref().map(|s| s.as_ptr().add(co0)),
            )
        };
        let clip = self.lo > f32::NEG_INFINITY || self.hi < f32::INFINITY;
        let (lo, hi) = (_mm512_set1_ps(self.lo), _mm512_set1_ps(self.hi));
        let post = self.post.filter(|_| res.is_some()).copied();
        let (plo, phi) = match post {
            Some([a, b]) => (_mm512_set1_ps(a), _mm512_set1_ps(b)),
            None => (lo, hi),
        };
        // SAFETY: `rows` rows of `positions` outputs (and residuals) from `out`, `hw` apart.
        unsafe {
            for r in 0..rows {
                let b = _mm512_set1_ps(*bias.add(r));
                let scale = _mm512_set1_ps(scales.map_or(1.0, |s| *s.add(r)));
                for half in 0..2 {
                    let first = half * TILE;
                    if first >= positions {
                        break;
                    }
                    let mask: __mmask16 = ((1u32 << (positions - first).min(TILE)) - 1) as u16;
                    let s = _mm512_loadu_ps(sums.0.as_ptr().add(r * UNIT + first));
                    let mut y = if scales.is_some() {
                        _mm512_fmadd_ps(s, scale, b)
                    } else {
                        _mm512_add_ps(s, b)
                    };
                    if clip {
                        y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
                    }
                    let at = r * self.hw + first;
                    if let Some(res) = res {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, res.add(at)));
                        if post.is_some() {
                            y = _mm512_min_ps(_mm512_max_ps(y, plo), phi);
                        }
                    }
                    _mm512_mask_storeu_ps(out.add(at), mask, y);
                }
            }
        }
    }
}

/// The most input tiles a thread packs before the weights' pass over them: 512 KB, a
/// quarter of a core's L2 on the VM measured. Each pass over the units packed reads the
/// weights once (from L3: a frame's do not stay in L2), so the units of a small map are all
/// packed first: on a 7×7 map's two units, the weights were read twice.
const PANEL_TILES: usize = 512;

/// Units packed at a time for `kblocks` blocks of input channels.
fn group(kblocks: usize) -> usize {
    (PANEL_TILES / (4 * kblocks)).max(1)
}

/// The accumulator tiles of one pass, stored: 32 rows of [`UNIT`] sums.
#[repr(C, align(64))]
struct Sums([f32; PAIR * UNIT]);

/// Packs `positions ≤ UNIT` positions of `cin` rows `hw` apart from `x` into the panel: per 16
/// positions `t`, per half `h`, per block `kb` of 32 channels, one tile, number
/// `(t·2 + h)·kblocks + kb`, zero past the positions and channels. Each pair of rows is rounded to bfloat16 by
/// one `VCVTNE2PS2BF16` (to nearest even, a NaN kept a NaN), the rounded values widened back
/// to floats for the `lo` halves, and each half's two rows interleaved by one `VPERMW`: 13
/// operations a pair, where the same rounding in integer operations took 45 and made the
/// packing most of a small map's time.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_input(
    x: *const f32,
    hw: usize,
    cin: usize,
    positions: usize,
    panel: *mut Tile,
    kblocks: usize,
) {
    // Lane 2n of a row takes lane n of the first row (the low 256 bits), 2n + 1 lane n of the
    // second (the high 256 bits).
    const INTERLEAVE: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut n = 0;
        while n < 16 {
            idx[2 * n] = n as u16;
            idx[2 * n + 1] = 16 + n as u16;
            n += 1;
        }
        idx
    };
    let zero = _mm512_setzero_ps();
    // SAFETY: rows `ci < cin` of `positions` floats from `x`; the panel holds 4·kblocks tiles.
    unsafe {
        let interleave = _mm512_loadu_si512(INTERLEAVE.as_ptr().cast());
        let widen = |half: __m256i| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        };
        for t in 0..2 {
            let first = t * TILE;
            let valid = positions.saturating_sub(first).min(TILE);
            let mask: __mmask16 = ((1u32 << valid) - 1) as u16;
            for kb in 0..kblocks {
                let hi_tile = (*panel.add(t * 2 * kblocks + kb)).0.as_mut_ptr();
                let lo_tile = (*panel.add((t * 2 + 1) * kblocks + kb)).0.as_mut_ptr();
                for r in 0..TILE {
                    let (ca, cb) = (kb * K_BLOCK + 2 * r, kb * K_BLOCK + 2 * r + 1);
                    let a = if ca < cin && valid > 0 {
                        _mm512_maskz_loadu_ps(mask, x.add(ca * hw + first))
                    } else {
                        zero
                    };
                    let b = if cb < cin && valid > 0 {
                        _mm512_maskz_loadu_ps(mask, x.add(cb * hw + first))
                    } else {
                        zero
                    };
                    let hi: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                    let a_lo = _mm512_sub_ps(a, widen(_mm512_castsi512_si256(hi)));
                    let b_lo = _mm512_sub_ps(b, widen(_mm512_extracti64x4_epi64::<1>(hi)));
                    let lo: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b_lo, a_lo));
                    let hi_row = _mm512_permutexvar_epi16(interleave, hi);
                    let lo_row = _mm512_permutexvar_epi16(interleave, lo);
                    _mm512_store_si512(hi_tile.add(r * K_BLOCK).cast(), hi_row);
                    _mm512_store_si512(lo_tile.add(r * K_BLOCK).cast(), lo_row);
                }
            }
        }
    }
}

/// Stores the accumulator tiles of [`product`] into `sums`: tiles 0 and 1 the first 16 rows
/// (positions 0–15 and 16–31), tiles 2 and 3 the next 16.
///
/// # Safety
/// `sums` must be valid for writes; the tiles configured ([`CONFIG`]).
#[inline(always)]
unsafe fn store_accumulators(sums: *mut Sums) {
    let c = sums.cast::<f32>();
    // SAFETY: the caller's contract; four 16 × 16 tiles fill the 32 × 32 sums.
    unsafe {
        asm!(
            "tilestored [{c} + {s}], tmm0",
            "tilestored [{c1} + {s}], tmm1",
            "tilestored [{c2} + {s}], tmm2",
            "tilestored [{c3} + {s}], tmm3",
            c = in(reg) c,
            c1 = in(reg) c.add(TILE),
            c2 = in(reg) c.add(TILE * UNIT),
            c3 = in(reg) c.add(TILE * UNIT + TILE),
            s = in(reg) UNIT * 4,
            options(nostack)
        );
    }
}

/// The four accumulator tiles of one pair of weight blocks and one unit: zeroed, then for
/// each of `(w_hi, x_hi)`, `(w_hi, x_lo)`, `(w_lo, x_hi)` (with integer weights, `halves` 1,
/// the first two) and each of `kblocks` blocks of 32 input channels, four tile products.
///
/// # Safety
/// `w` must hold the pair's `2·halves` runs of weight tiles, `wstride` apart, `kblocks` each;
/// `x` the unit's `4·kblocks` input tiles; the tiles configured by [`CONFIG`].
#[inline(always)]
unsafe fn product(w: *const Tile, wstride: usize, halves: usize, x: *const Tile, kblocks: usize) {
    // A tile's rows are 64 bytes apart.
    const STRIDE: usize = 2 * K_BLOCK;
    // SAFETY: the caller's contract.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for &(wh, xh) in &[(0, 0), (0, 1), (1, 0)][..halves + 1] {
            for kb in 0..kblocks {
                // Weight block 0 and 1 of the pair (`[block][half][kb]`), input positions
                // 0–15 and 16–31 (`[t][half][kb]`).
                let a0 = w.add(wh * wstride + kb);
                let a1 = w.add((halves + wh) * wstride + kb);
                let b0 = x.add(xh * kblocks + kb);
                let b1 = x.add((2 + xh) * kblocks + kb);
                asm!(
                    "tileloadd tmm4, [{a0} + {s}]",
                    "tileloadd tmm5, [{a1} + {s}]",
                    "tileloadd tmm6, [{b0} + {s}]",
                    "tileloadd tmm7, [{b1} + {s}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    s = in(reg) STRIDE,
                    options(nostack, readonly)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::pointwise::kernel::{naive, Shape};

    /// A pointer the test's threads share.
    #[derive(Clone, Copy)]
    struct SendPtr(*const f32);
    // SAFETY: the parts write disjoint outputs and read what no one writes.
    unsafe impl Send for SendPtr {}
    unsafe impl Sync for SendPtr {}

    fn random(seed: &mut u64, n: usize) -> Vec<f32> {
        crate::backbone::simd::seeded_uniform(seed, n, 1.0)
    }

    #[test]
    fn splits_keep_sixteen_bits() {
        for v in [1.0f32, -3.25, 0.1, 1e-3, 6.0, 123.456, -0.0] {
            let (hi, lo) = split(v);
            let back = f32::from_bits(u32::from(hi) << 16) + f32::from_bits(u32::from(lo) << 16);
            assert!(
                (back - v).abs() <= v.abs() * 2f32.powi(-16),
                "{v} -> {back}"
            );
        }
        assert!(f32::from_bits(u32::from(bf16(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn matches_the_plain_loops() {
        if !available() {
            eprintln!("no AMX-BF16 here: nothing to check");
            return;
        }
        let mut seed = 17u64;
        // (batch, cin, cout, hw): Lite0's shapes' remainders (49, 196 positions; 24, 40
        // channels), channel counts that are no multiple of 32, a second image.
        for (batch, cin, cout, hw) in [
            (1, 1152, 192, 49),
            (1, 672, 112, 196),
            (2, 240, 40, 100),
            (1, 100, 20, 37),
            (1, 144, 40, 784),
            (2, 40, 24, 70),
            (1, 3, 5, 1),
            (1, 33, 47, 33),
        ] {
            let x = random(&mut seed, batch * cin * hw);
            let b = random(&mut seed, cout);
            let res = random(&mut seed, batch * cout * hw);
            // Float weights (two halves each), then `w8`'s: integers times a scale per
            // output channel, the largest |integer| 127 (the tiles hold the integers).
            let float = random(&mut seed, cout * cin);
            let scales = random(&mut seed, cout);
            let integer: Vec<f32> = float
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let q = if i % cin == 0 {
                        127.0
                    } else {
                        (v * 127.0).round()
                    };
                    q * (scales[i / cin].abs() + 0.01) / 100.0
                })
                .collect();
            for (w, halves) in [(&float, 2), (&integer, 1)] {
                let packed = Weights::pack(w, &b, cin, cout);
                assert_eq!(packed.halves(), halves, "{cin}->{cout}");
                for (lo, hi, residual, post) in [
                    (f32::NEG_INFINITY, f32::INFINITY, false, None),
                    (0.0, 6.0, false, None),
                    (-1.0, 1.5, true, Some([-0.5f32, 2.0])),
                ] {
                    let m = Matrix {
                        weights: &packed,
                        batch,
                        hw,
                        lo,
                        hi,
                        post: post.as_ref(),
                        threads: 1,
                    };
                    let mut got = vec![f32::NAN; batch * cout * hw];
                    m.run(&x, residual.then_some(&res[..]), &mut got);
                    // Chunked for two threads (the input cut by positions where it outweighs
                    // the weights), as two threads share them: the items in two runs.
                    let m = Matrix { threads: 2, ..m };
                    let mut split = vec![f32::NAN; batch * cout * hw];
                    let cut = m.items() / 2 + 1;
                    for items in [0..cut.min(m.items()), cut.min(m.items())..m.items()] {
                        // SAFETY: the lengths are the convolution's; the runs do not overlap.
                        unsafe {
                            m.run_items(
                                x.as_ptr(),
                                residual.then_some(res.as_ptr()),
                                split.as_mut_ptr(),
                                items,
                            )
                        };
                    }
                    assert!(
                        crate::backbone::simd::same_bits(&got, &split),
                        "{cin}->{cout}x{hw}"
                    );
                    // Cut by input channels (`k_parts`), all the shares run on this thread
                    // (the first claims every part and run), and at once on as many threads:
                    // the same numbers, which differ from one thread's by the sums' order.
                    for threads in [2, 3] {
                        let m = Matrix { threads, ..m };
                        let parts = m.k_parts();
                        if 3 * cout.div_ceil(PAIR) * PAIR > cin {
                            assert_eq!(parts, 1, "{cin}->{cout}");
                            continue;
                        }
                        assert_eq!(parts, threads.min(cin.div_ceil(K_BLOCK)));
                        let run = |out: &mut Vec<f32>, together: bool| {
                            let shared = Reduction::new(parts);
                            let (x, res) = (SendPtr(x.as_ptr()), SendPtr(res.as_ptr()));
                            let o = SendPtr(out.as_mut_ptr().cast_const());
                            let part = |p: usize| {
                                let (x, res, o) = (x, res, o);
                                // SAFETY: the lengths are the convolution's; every part runs
                                // once with `shared`.
                                unsafe {
                                    m.run_share(
                                        x.0,
                                        residual.then_some(res.0),
                                        o.0.cast_mut(),
                                        p,
                                        &shared,
                                    )
                                }
                            };
                            if together {
                                std::thread::scope(|s| {
                                    for p in 1..parts {
                                        s.spawn(move || part(p));
                                    }
                                    part(0);
                                });
                            } else {
                                (0..parts).for_each(part);
                            }
                        };
                        let mut one = vec![f32::NAN; batch * cout * hw];
                        let mut together = vec![f32::NAN; batch * cout * hw];
                        run(&mut one, false);
                        run(&mut together, true);
                        assert!(
                            crate::backbone::simd::same_bits(&one, &together),
                            "{cin}->{cout}x{hw}, {threads} threads"
                        );
                        for (i, (a, b)) in one.iter().zip(&got).enumerate() {
                            // Sums of `cin` products in another order: their roundings.
                            let tol = 2e-6 * (cin as f32).sqrt() + 1e-6 * b.abs();
                            assert!(
                                (a - b).abs() <= tol,
                                "{cin}->{cout}x{hw} at {i}, {threads} parts: {a} vs {b}"
                            );
                        }
                    }
                    let shape = Shape {
                        batch,
                        cin,
                        cout,
                        hw,
                    };
                    let want = naive(
                        &shape,
                        &x,
                        w,
                        &b,
                        lo,
                        hi,
                        residual.then_some(&res[..]),
                        post,
                    );
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        // Sums of `cin` products of values in [-1, 1]: the split leaves 2⁻¹⁶ of
                        // each, the f32 sums their rounding.
                        let tol = 1e-5 * (cin as f32).sqrt().max(1.0) + 1e-6 * e.abs();
                        assert!(
                            (g - e).abs() <= tol,
                            "{batch}x{cin}->{cout}x{hw} at {i}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// A thread that panics holding a part of a convolution cut by input channels makes the
    /// others sharing it panic too, instead of spinning for ever on sums that never come
    /// (before `Reduction::failed`, this test timed out).
    #[test]
    fn a_share_that_panics_stops_the_others() {
        if !available() {
            eprintln!("no AMX-BF16 here: nothing to check");
            return;
        }
        let mut seed = 5u64;
        let (cin, cout, hw) = (240, 40, 49);
        // Leaked: a thread that never stops (without the fix) may still hold them.
        let weights: &'static Weights = Box::leak(Box::new(Weights::pack(
            &random(&mut seed, cout * cin),
            &random(&mut seed, cout),
            cin,
            cout,
        )));
        let x: &'static [f32] = random(&mut seed, cin * hw).leak();
        let out: &'static mut [f32] = vec![0.0; cout * hw].leak();
        let shared: &'static Reduction = Box::leak(Box::new(Reduction::new(2)));
        let m = Matrix {
            weights,
            batch: 1,
            hw,
            lo: f32::NEG_INFINITY,
            hi: f32::INFINITY,
            post: None,
            threads: 2,
        };
        assert_eq!(m.k_parts(), 2);
        // One thread claims part 1 and dies before its sums arrive.
        let dead = std::thread::spawn(move || {
            let _unwinding = Unwinding(shared);
            shared.claimed[1].store(true, Ordering::Release);
            panic!("a share's thread dies holding part 1 (this test's doing)");
        });
        assert!(dead.join().is_err());
        // The other runs its share: it sums part 0, then waits for part 1's sums.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| {
                // SAFETY: the lengths are the convolution's; no one else writes `out`.
                unsafe { m.run_share(x.as_ptr(), None, out.as_mut_ptr(), 0, shared) }
            });
            let _ = tx.send(std::panic::catch_unwind(run).is_err());
        });
        let panicked = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the other thread still waits for the dead one's sums after 30 s");
        assert!(panicked, "the other thread returned without part 1's sums");
    }
}
