//! graft's depthwise convolution kernel: plain slices in, plain slices out, no tract types.
//!
//! One channel plane at a time. The plane is copied into a zero-padded scratch split into
//! `stride_h × stride_w` phase planes (for stride 1, one plane: the padded image), so that every
//! kernel tap reads its inputs with unit stride, whatever the convolution's stride:
//! output `(oy, ox)` and tap `(ky, kx)` read phase `(ky % sh, kx % sw)` at row `oy + ky / sh`,
//! column `ox + kx / sw`. With rows of the phase planes laid end to end (row length `wq`), output
//! `oy·wq + ox` of one flat vector is the sum over taps of `w[tap] · scratch[offset[tap] + oy·wq +
//! ox]`: a one-dimensional convolution with a fixed offset per tap, vectorised straight across
//! rows. The `wq − wo` columns at the end of each row are computed and thrown away, which on the
//! 7×7 maps of the last stage wastes far less than vectorising within one row of 7.
//!
//! The inner loop keeps four vectors of outputs in registers, broadcasts each tap's weight once
//! and accumulates with fused multiply-adds; bias and the following clip (ReLU6, or `w8`'s
//! quantisation range) are applied before the store. The same generic body is compiled once per
//! instruction set ([`Isa`]); the scalar one is the reference the others are tested against.

pub use crate::backbone::simd::Isa;
use crate::backbone::simd::{dispatch, Lanes, Work};

/// Shape of one depthwise convolution (NCHW, one filter per channel, dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Images per batch.
    pub batch: usize,
    /// Channels (in = out).
    pub channels: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical stride (≥ 1).
    pub sh: usize,
    /// Horizontal stride (≥ 1).
    pub sw: usize,
    /// Zero rows above the input (the padding below follows from the output size).
    pub pad_top: usize,
    /// Zero columns left of the input (the padding right follows from the output size).
    pub pad_left: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

impl Geometry {
    /// Phase-plane rows and columns.
    fn hq(&self) -> usize {
        self.ho + (self.kh - 1) / self.sh
    }
    fn wq(&self) -> usize {
        self.wo + (self.kw - 1) / self.sw
    }
    fn phase_len(&self) -> usize {
        self.hq() * self.wq()
    }
    /// Outputs computed per plane, garbage columns included: `(ho − 1)·wq + wo`.
    fn flat_outputs(&self) -> usize {
        (self.ho - 1) * self.wq() + self.wo
    }
    /// Multiply-adds of one pass (all planes).
    pub fn macs(&self) -> usize {
        self.batch * self.channels * self.ho * self.wo * self.kh * self.kw
    }
    /// Whether the kernel can run it: every size ≥ 1 (any padding is fine: what lies outside
    /// the input reads as zero).
    pub fn is_valid(&self) -> bool {
        let all = [
            self.batch,
            self.channels,
            self.h,
            self.w,
            self.kh,
            self.kw,
            self.sh,
            self.sw,
            self.ho,
            self.wo,
        ];
        all.iter().all(|&v| v >= 1)
    }
    /// Scratch offsets of each tap, row-major over `(ky, kx)` like the weights.
    pub fn tap_offsets(&self) -> Vec<usize> {
        let (wq, plane) = (self.wq(), self.phase_len());
        let mut offsets = Vec::with_capacity(self.kh * self.kw);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let phase = (ky % self.sh) * self.sw + kx % self.sw;
                offsets.push(phase * plane + (ky / self.sh) * wq + kx / self.sw);
            }
        }
        offsets
    }
}

/// Per-thread working memory of [`Plane::run`], reused across channels.
#[derive(Debug, Default)]
pub struct Scratch {
    input: Vec<f32>,
    output: Vec<f32>,
    row: Vec<f32>,
    /// What `input` and `row` are laid out for: their zeros (the padding) are written once
    /// per geometry, and each plane only overwrites the input's own positions.
    laid_out: Option<(Geometry, usize)>,
}

/// One convolution, ready to run plane by plane.
#[derive(Debug, Clone)]
pub struct Plane<'a> {
    /// The convolution's shape.
    pub geo: &'a Geometry,
    /// [`Geometry::tap_offsets`].
    pub offsets: &'a [usize],
    /// Which compiled kernel runs it.
    pub isa: Isa,
    /// Outputs are clamped to `[lo, hi]` (±∞: no clip).
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
}

impl Plane<'_> {
    /// Convolves one `h × w` channel plane with its `kh × kw` weights, adds `bias`, clamps to
    /// `[lo, hi]` and writes the `ho × wo` result.
    ///
    /// # Panics
    /// If a slice has the wrong length (a programming error: the tract op checks shapes first).
    pub fn run(
        &self,
        input: &[f32],
        weights: &[f32],
        bias: f32,
        output: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let g = self.geo;
        assert_eq!(input.len(), g.h * g.w, "depthwise input plane");
        assert_eq!(weights.len(), g.kh * g.kw, "depthwise weights");
        assert_eq!(self.offsets.len(), g.kh * g.kw, "depthwise taps");
        assert_eq!(output.len(), g.ho * g.wo, "depthwise output plane");
        let lanes = self.isa.lanes();
        let flat = g.flat_outputs();
        let vectors = flat.div_ceil(lanes);
        let planes = g.sh * g.sw * g.phase_len();
        // Reads reach at most `planes + lanes - 2` (see the module notes): a zero tail of one
        // vector keeps every load inside the buffer.
        if scratch.laid_out != Some((*g, lanes)) {
            scratch.input.clear();
            scratch.input.resize(planes + lanes, 0.0);
            scratch.row.clear();
            scratch.row.resize(g.wq() * g.sw, 0.0);
            scratch.laid_out = Some((*g, lanes));
        }
        if scratch.output.len() < vectors * lanes {
            scratch.output.resize(vectors * lanes, 0.0);
        }
        let max_offset = self.offsets.iter().copied().max().unwrap_or(0);
        assert!(max_offset + vectors * lanes <= scratch.input.len());
        let job = Job {
            g,
            input,
            phases: &mut scratch.input,
            row: &mut scratch.row,
            flat: &mut scratch.output[..vectors * lanes],
            output,
            offsets: self.offsets,
            weights,
            bias,
            lo: self.lo,
            hi: self.hi,
        };
        // SAFETY: every load of the convolution stays inside `phases` (checked just above), its
        // stores inside `flat` (one slot per lane of `vectors`), and each ISA's function is only
        // chosen when the CPU has it (`Isa::detect` / `Isa::available`).
        unsafe { dispatch(self.isa, job) }
    }
}

/// One plane's work, handed to the kernel compiled for an ISA.
struct Job<'a> {
    g: &'a Geometry,
    input: &'a [f32],
    phases: &'a mut [f32],
    row: &'a mut [f32],
    flat: &'a mut [f32],
    output: &'a mut [f32],
    offsets: &'a [usize],
    weights: &'a [f32],
    bias: f32,
    lo: f32,
    hi: f32,
}

impl Work for Job<'_> {
    /// Fills the phase planes, convolves, copies the `wo` valid outputs of each row out.
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        let g = self.g;
        let planes = g.sh * g.sw * g.phase_len();
        fill_phases::<L>(g, self.input, &mut self.phases[..planes], self.row);
        let convolve = Convolve {
            g,
            phases: self.phases,
            offsets: self.offsets,
            weights: self.weights,
            bias: self.bias,
            lo: self.lo,
            hi: self.hi,
            flat: self.flat,
            output: self.output,
        };
        unsafe { convolve.run::<L>() }
    }
}

/// The widest vector of any instruction set: the zero tail after each input channel of a dense
/// convolution's scratch, which keeps every load of the last vector inside the buffer.
const MAX_LANES: usize = 16;

impl Geometry {
    /// Floats per input channel in a dense convolution's scratch.
    fn dense_stride(&self) -> usize {
        self.sh * self.sw * self.phase_len() + MAX_LANES
    }

    /// Floats of a dense convolution's scratch: every input channel's phase planes, end to end.
    pub fn dense_scratch_len(&self) -> usize {
        self.channels * self.dense_stride()
    }

    /// Scratch offsets of every (input channel, tap) of a dense convolution, in the order of one
    /// output channel's OIHW weights, `[ci][ky][kx]`.
    pub fn dense_offsets(&self) -> Vec<usize> {
        let taps = self.tap_offsets();
        let stride = self.dense_stride();
        (0..self.channels)
            .flat_map(|c| taps.iter().map(move |t| c * stride + t))
            .collect()
    }
}

/// A dense convolution (each output channel reads every input channel) over few input channels,
/// a network's stem (3 → 32 channels, 3×3, stride 2), runs on the same plane with `geo.channels`
/// counting the *input* channels and `offsets` from [`Geometry::dense_offsets`]:
/// [`Plane::fill_dense`] lays an image's channels out as phase planes once, end to end, and
/// [`Plane::run_dense`] computes one output channel as a single flat convolution with `channels ×
/// kh × kw` taps over them: the depthwise inner loop, with more taps.
impl Plane<'_> {
    /// Lays one image (`[channels][h][w]`) out in `phases` for a dense convolution, which it
    /// sizes to [`Geometry::dense_scratch_len`] (zero wherever no input value goes).
    ///
    /// # Panics
    /// If `image` has the wrong length.
    pub fn fill_dense(&self, image: &[f32], phases: &mut Vec<f32>) {
        let g = self.geo;
        assert_eq!(
            image.len(),
            g.channels * g.h * g.w,
            "dense convolution input"
        );
        phases.clear();
        phases.resize(g.dense_scratch_len(), 0.0);
        let mut row = vec![0.0; g.wq() * g.sw];
        let fill = DenseFill {
            g,
            image,
            phases,
            row: &mut row,
        };
        // SAFETY: `fill_phases` only writes inside the slices it is given, and the ISA is one
        // this CPU runs (`Isa::detect` / `Isa::available`).
        unsafe { dispatch(self.isa, fill) }
    }

    /// Computes one output channel's `ho × wo` plane from [`Plane::fill_dense`]'s `phases`, its
    /// `channels × kh × kw` weights and bias, clamped to `[lo, hi]`. `flat` is working memory.
    ///
    /// # Panics
    /// If a slice has the wrong length.
    pub fn run_dense(
        &self,
        phases: &[f32],
        weights: &[f32],
        bias: f32,
        output: &mut [f32],
        flat: &mut Vec<f32>,
    ) {
        let g = self.geo;
        assert_eq!(
            phases.len(),
            g.dense_scratch_len(),
            "dense convolution scratch"
        );
        assert_eq!(
            weights.len(),
            g.channels * g.kh * g.kw,
            "dense convolution weights"
        );
        assert_eq!(self.offsets.len(), weights.len(), "dense convolution taps");
        assert_eq!(output.len(), g.ho * g.wo, "dense convolution output plane");
        let lanes = self.isa.lanes();
        let vectors = g.flat_outputs().div_ceil(lanes);
        if flat.len() < vectors * lanes {
            flat.resize(vectors * lanes, 0.0);
        }
        let max_offset = self.offsets.iter().copied().max().unwrap_or(0);
        assert!(max_offset + vectors * lanes <= phases.len());
        let job = Convolve {
            g,
            phases,
            offsets: self.offsets,
            weights,
            bias,
            lo: self.lo,
            hi: self.hi,
            flat: &mut flat[..vectors * lanes],
            output,
        };
        // SAFETY: every load stays inside `phases` (checked just above), every store inside
        // `flat`, and the ISA is one this CPU runs.
        unsafe { dispatch(self.isa, job) }
    }
}

struct DenseFill<'a> {
    g: &'a Geometry,
    image: &'a [f32],
    phases: &'a mut [f32],
    row: &'a mut [f32],
}

impl Work for DenseFill<'_> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        let g = self.g;
        let (plane, stride) = (g.h * g.w, g.dense_stride());
        let planes = g.sh * g.sw * g.phase_len();
        for c in 0..g.channels {
            fill_phases::<L>(
                g,
                &self.image[c * plane..(c + 1) * plane],
                &mut self.phases[c * stride..c * stride + planes],
                self.row,
            );
        }
    }
}

/// One output plane from laid-out phase planes: the flat convolution, then the `wo` valid
/// outputs of each row copied out.
struct Convolve<'a> {
    g: &'a Geometry,
    phases: &'a [f32],
    offsets: &'a [usize],
    weights: &'a [f32],
    bias: f32,
    lo: f32,
    hi: f32,
    flat: &'a mut [f32],
    output: &'a mut [f32],
}

impl Work for Convolve<'_> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(self) {
        let g = self.g;
        let vectors = self.flat.len() / L::N;
        unsafe {
            flat_conv::<L>(
                self.phases.as_ptr(),
                self.offsets,
                self.weights,
                self.bias,
                self.lo,
                self.hi,
                self.flat.as_mut_ptr(),
                vectors,
            );
            let wq = g.wq();
            for oy in 0..g.ho {
                let src = &self.flat[oy * wq..oy * wq + g.wo];
                let dst = &mut self.output[oy * g.wo..(oy + 1) * g.wo];
                L::copy(src.as_ptr(), dst.as_mut_ptr(), g.wo);
            }
        }
    }
}

/// Copies one input plane into its phase planes. Only the positions that hold input values are
/// written: the padding around them is zero since [`Plane::run`] laid the scratch out, and stays
/// so. `row` (one padded input row, `wq · sw` long, zero outside the input) is working memory.
#[inline(always)]
fn fill_phases<L: Lanes>(g: &Geometry, input: &[f32], phases: &mut [f32], row: &mut [f32]) {
    let (hq, wq) = (g.hq(), g.wq());
    // Column j of a padded row holds input column j − pad_left.
    let first = g.pad_left.min(row.len());
    let n = g.w.min(row.len() - first);
    for a in 0..g.sh {
        for i in 0..hq {
            let Some(y) = (i * g.sh + a).checked_sub(g.pad_top).filter(|&y| y < g.h) else {
                continue;
            };
            let src = &input[y * g.w..y * g.w + n];
            let dst = |b: usize| (a * g.sw + b) * hq * wq + i * wq;
            // SAFETY (both copies): `src` has `n` values, and so has each destination slice.
            if g.sw == 1 {
                let to = &mut phases[dst(0) + first..dst(0) + first + n];
                unsafe { L::copy(src.as_ptr(), to.as_mut_ptr(), n) };
                continue;
            }
            let to = &mut row[first..first + n];
            unsafe { L::copy(src.as_ptr(), to.as_mut_ptr(), n) };
            if g.sw == 2 {
                let (d0, d1) = (dst(0), dst(1));
                let (even, odd) = phases[d0..d1 + wq].split_at_mut(d1 - d0);
                for ((pair, e), o) in row.chunks_exact(2).zip(&mut even[..wq]).zip(&mut odd[..wq]) {
                    *e = pair[0];
                    *o = pair[1];
                }
            } else {
                for b in 0..g.sw {
                    let out = &mut phases[dst(b)..dst(b) + wq];
                    for (v, x) in out.iter_mut().zip(row[b..].iter().step_by(g.sw)) {
                        *v = *x;
                    }
                }
            }
        }
    }
}

/// `vectors` vectors of outputs: each the bias plus the sum over taps of weight × the scratch
/// at the tap's offset, clamped to `[lo, hi]`. Blocks of 8 vectors, then a tail of 4, 2, 1.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn flat_conv<L: Lanes>(
    src: *const f32,
    offsets: &[usize],
    weights: &[f32],
    bias: f32,
    lo: f32,
    hi: f32,
    dst: *mut f32,
    vectors: usize,
) {
    unsafe {
        let taps = offsets.len().min(weights.len());
        let k = Block {
            src,
            offsets,
            weights,
            taps,
            bias,
            lo,
            hi,
            dst,
        };
        let mut v = 0;
        while v + 8 <= vectors {
            k.run::<L, 8, 1>(v);
            v += 8;
        }
        if v + 4 <= vectors {
            k.run::<L, 4, 2>(v);
            v += 4;
        }
        if v + 2 <= vectors {
            k.run::<L, 2, 4>(v);
            v += 2;
        }
        if v < vectors {
            k.run::<L, 1, 4>(v);
        }
    }
}

/// What every block of [`flat_conv`] shares.
struct Block<'a> {
    src: *const f32,
    offsets: &'a [usize],
    weights: &'a [f32],
    taps: usize,
    bias: f32,
    lo: f32,
    hi: f32,
    dst: *mut f32,
}

impl Block<'_> {
    /// `R` vectors from vector `v` on, the taps dealt round-robin to `S` sets of accumulators
    /// (summed at the end) so that at least 4 independent FMA chains are in flight even for the
    /// short tail blocks.
    #[inline(always)]
    unsafe fn run<L: Lanes, const R: usize, const S: usize>(&self, v: usize) {
        unsafe {
            let n = L::N;
            let base = self.src.add(v * n);
            let zero = L::splat(0.0);
            let mut acc = [[zero; R]; S];
            let full = self.taps / S * S;
            let mut t = 0;
            while t < full {
                for (s, set) in acc.iter_mut().enumerate() {
                    let w = L::splat_at(self.weights.as_ptr().add(t + s));
                    let p = base.add(*self.offsets.get_unchecked(t + s));
                    for (r, a) in set.iter_mut().enumerate() {
                        *a = L::mul_add(L::load(p.add(r * n)), w, *a);
                    }
                }
                t += S;
            }
            for t in full..self.taps {
                let w = L::splat_at(self.weights.as_ptr().add(t));
                let p = base.add(*self.offsets.get_unchecked(t));
                for (r, a) in acc[0].iter_mut().enumerate() {
                    *a = L::mul_add(L::load(p.add(r * n)), w, *a);
                }
            }
            let (b, lo, hi) = (L::splat(self.bias), L::splat(self.lo), L::splat(self.hi));
            let out = self.dst.add(v * n);
            for r in 0..R {
                let mut sum = L::add(acc[0][r], b);
                for set in &acc[1..] {
                    sum = L::add(sum, set[r]);
                }
                sum.clamp(lo, hi).store(out.add(r * n));
            }
        }
    }
}

/// The convolution done the obvious way (six nested loops), for tests.
#[cfg(test)]
pub(crate) fn naive(
    g: &Geometry,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    lo: f32,
    hi: f32,
) -> Vec<f32> {
    let mut out = vec![0.0; g.batch * g.channels * g.ho * g.wo];
    for n in 0..g.batch {
        for c in 0..g.channels {
            let plane = n * g.channels + c;
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let mut acc = bias[c] as f64;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let y = (oy * g.sh + ky) as isize - g.pad_top as isize;
                            let x = (ox * g.sw + kx) as isize - g.pad_left as isize;
                            if y < 0 || x < 0 || y >= g.h as isize || x >= g.w as isize {
                                continue;
                            }
                            let v = input[plane * g.h * g.w + y as usize * g.w + x as usize];
                            acc += v as f64 * weights[c * g.kh * g.kw + ky * g.kw + kx] as f64;
                        }
                    }
                    out[plane * g.ho * g.wo + oy * g.wo + ox] = (acc as f32).max(lo).min(hi);
                }
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

    fn run_all(
        g: &Geometry,
        isa: Isa,
        input: &[f32],
        w: &[f32],
        b: &[f32],
        lo: f32,
        hi: f32,
    ) -> Vec<f32> {
        let offsets = g.tap_offsets();
        let plane = Plane {
            geo: g,
            offsets: &offsets,
            isa,
            lo,
            hi,
        };
        let mut out = vec![f32::NAN; g.batch * g.channels * g.ho * g.wo];
        let mut scratch = Scratch::default();
        for (p, o) in out.chunks_exact_mut(g.ho * g.wo).enumerate() {
            let c = p % g.channels;
            plane.run(
                &input[p * g.h * g.w..(p + 1) * g.h * g.w],
                &w[c * g.kh * g.kw..(c + 1) * g.kh * g.kw],
                b[c],
                o,
                &mut scratch,
            );
        }
        out
    }

    #[test]
    fn every_isa_matches_the_six_loop_convolution() {
        let mut seed = 7;
        // (h, w, k, s, pad_top, pad_left, extra bottom/right padding)
        let cases = [
            (7, 7, 5, 1, 2, 2, 2),
            (14, 14, 3, 2, 0, 0, 1),
            (9, 13, 3, 2, 1, 0, 0),
            (5, 6, 5, 2, 2, 1, 3),
            (1, 1, 3, 1, 1, 1, 1),
            (17, 3, 5, 1, 0, 4, 0),
        ];
        for (h, w, k, s, pt, pl, extra) in cases {
            let ho = (h + pt + extra - k) / s + 1;
            let wo = (w + pl + extra - k) / s + 1;
            let g = Geometry {
                batch: 2,
                channels: 3,
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
            assert!(g.is_valid());
            let input = random(&mut seed, 2 * 3 * h * w);
            let weights = random(&mut seed, 3 * k * k);
            let bias = random(&mut seed, 3);
            let want = naive(&g, &input, &weights, &bias, -0.5, 1.5);
            for isa in Isa::available() {
                let got = run_all(&g, isa, &input, &weights, &bias, -0.5, 1.5);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5, "{isa:?} {g:?} at {i}: {a} vs {b}");
                }
            }
        }
    }
}
