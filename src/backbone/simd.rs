//! The vector types graft's own CPU kernels (`depthwise`, `pointwise`) are written against: one
//! small trait ([`Lanes`]) implemented with `std::arch` intrinsics for AVX-512F (16 lanes),
//! AVX2+FMA (8) and aarch64 NEON (4), with inline assembly for armv7 NEON (2: its intrinsics
//! are unstable), and a scalar reference; [`Isa`] says which one this CPU runs. A kernel is one
//! generic body compiled once per instruction set.

/// The instruction set a kernel is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// One float at a time, multiply then add: the reference.
    Scalar,
    /// x86-64 AVX-512F, 16 lanes, FMA.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// x86-64 AVX2 with FMA, 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// aarch64 Advanced SIMD (NEON), 4 lanes, FMA; on armv7, NEON on 64-bit `d` registers,
    /// 2 lanes, multiply then add as tract's armv7 kernels do ([`arm7`]).
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    Neon,
}

impl Isa {
    /// The best this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2Fma;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            return Isa::Neon;
        }
        #[cfg(target_arch = "arm")]
        if arm7::detected() {
            return Isa::Neon;
        }
        #[allow(unreachable_code)]
        Isa::Scalar
    }

    /// The best vector instruction set this CPU runs, if graft has a kernel for one. Without
    /// one (an armv7 CPU without NEON) the plan keeps tract's depthwise: the scalar
    /// reference computes the flat layout's extra columns and is no faster than tract's own
    /// scalar code.
    pub fn vectorised() -> Option<Isa> {
        Some(Isa::detect()).filter(|i| *i != Isa::Scalar)
    }

    /// Every instruction set this CPU runs, the reference first.
    pub fn available() -> Vec<Isa> {
        // x86-64 and ARM add to it.
        #[allow(unused_mut)]
        let mut all = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                all.push(Isa::Avx2Fma);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        all.push(Isa::Neon);
        #[cfg(target_arch = "arm")]
        if arm7::detected() {
            all.push(Isa::Neon);
        }
        all
    }

    /// Short name, for profiles and `graft info`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => "avx2+fma",
            #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
            Isa::Neon => "neon",
        }
    }

    /// Floats per vector.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Isa::Scalar => 1,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 16,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => 8,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => 4,
            #[cfg(target_arch = "arm")]
            Isa::Neon => 2,
        }
    }
}

/// What graft's generic kernels need of a vector type.
pub(crate) trait Lanes: Copy {
    const N: usize;
    unsafe fn splat(x: f32) -> Self;
    /// [`Lanes::splat`] of the float at `p` (x86 and aarch64 fold the load into the broadcast
    /// anyway; armv7 loads it straight into every lane, not through a core register).
    #[inline(always)]
    unsafe fn splat_at(p: *const f32) -> Self {
        unsafe { Self::splat(*p) }
    }
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a · b + c`.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// Rounds each lane to the nearest integer, ties to even.
    unsafe fn round_even(self) -> Self;
    /// Loads `n < N` floats, the other lanes zero.
    unsafe fn load_tail(p: *const f32, n: usize) -> Self;
    /// Stores the first `n < N` lanes.
    unsafe fn store_tail(self, p: *mut f32, n: usize);
    /// Asks for the cache line at `p` ahead of its use (a no-op where not implemented; `p` need
    /// not be inside any buffer).
    #[inline(always)]
    unsafe fn prefetch(_p: *const f32) {}
    /// Copies `n < N` floats (the tail of [`Lanes::copy`]).
    unsafe fn copy_tail(src: *const f32, dst: *mut f32, n: usize);
    /// Lane `i` takes lane `idx[i]` of `a`, or for `idx[i] ≥ N` lane `idx[i] − N` of `b`
    /// (`i < N`). Lane by lane here; AVX-512 overrides it with one `vpermt2ps`.
    #[inline(always)]
    unsafe fn permute2(a: Self, b: Self, idx: &[u32; 16]) -> Self {
        let (mut x, mut y, mut out) = ([0f32; 32], [0f32; 32], [0f32; 32]);
        unsafe {
            a.store(x.as_mut_ptr());
            b.store(y.as_mut_ptr());
            for (o, &k) in out.iter_mut().zip(idx).take(Self::N) {
                let k = k as usize;
                *o = if k < Self::N { x[k] } else { y[k - Self::N] };
            }
            Self::load(out.as_ptr())
        }
    }
    /// The four floats at `p` over the lanes: lane `i` is `p[i % 4]`. Lane by lane here;
    /// AVX-512 overrides it with one broadcast load.
    #[inline(always)]
    unsafe fn repeat4(p: *const f32) -> Self {
        let mut out = [0f32; 32];
        unsafe {
            for (i, o) in out.iter_mut().enumerate().take(Self::N) {
                *o = *p.add(i % 4);
            }
            Self::load(out.as_ptr())
        }
    }
    /// Copies `n` floats with vector loads and stores, inline (a `memcpy` call costs more than
    /// the copy on the short rows of the last stages).
    #[inline(always)]
    unsafe fn copy(src: *const f32, dst: *mut f32, n: usize) {
        unsafe {
            let mut i = 0;
            while i + Self::N <= n {
                Self::load(src.add(i)).store(dst.add(i));
                i += Self::N;
            }
            if i < n {
                Self::copy_tail(src.add(i), dst.add(i), n - i);
            }
        }
    }
    /// Transposes an `N × N` block: row `i` of the source (`N` floats at `src + i·src_stride`)
    /// becomes column `i` of the destination, whose row `j` is `N` floats at `dst(j)`. This
    /// one moves a float at a time; x86 overrides it with in-register shuffles.
    #[inline(always)]
    unsafe fn transpose(src: *const f32, src_stride: usize, dst: impl Fn(usize) -> *mut f32) {
        for j in 0..Self::N {
            let row = dst(j);
            for i in 0..Self::N {
                unsafe { *row.add(i) = *src.add(i * src_stride + j) };
            }
        }
    }
}

/// The reference: one float, multiply then add.
#[derive(Clone, Copy)]
pub(crate) struct Scalar(f32);

impl Lanes for Scalar {
    const N: usize = 1;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Scalar(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Scalar(unsafe { *p })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { *p = self.0 }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Scalar(a.0 * b.0 + c.0)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Scalar(a.0 + b.0)
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        // max then min, as ONNX's Clip and tract's Max/Min chain do (NaN propagates the same).
        Scalar(self.0.max(lo.0).min(hi.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Scalar(a.0 * b.0)
    }
    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        Scalar(self.0.round_ties_even())
    }
    #[inline(always)]
    unsafe fn load_tail(_: *const f32, _: usize) -> Self {
        // N = 1: there is never a tail.
        Scalar(0.0)
    }
    #[inline(always)]
    unsafe fn store_tail(self, _: *mut f32, _: usize) {}
    #[inline(always)]
    unsafe fn copy_tail(_: *const f32, _: *mut f32, _: usize) {}
}

/// Threads a parallel loop here would share: the run's [`Team`](super::team::Team)'s, 1 inside
/// one of its parts, else the backbone's executor's (tract's).
pub(crate) fn threads() -> usize {
    use super::team::{here, Here};
    match here() {
        Here::Team(team) => return team.threads(),
        Here::Inline => return 1,
        Here::None => {}
    }
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

/// Runs `f` over `0..items` cut in as many equal, contiguous parts as [`threads`], a part per
/// thread (inline below `macs` = 32768, tract's own threshold): on the run's
/// [`Team`](super::team::Team) where it has one, else on the backbone's executor (tract's).
/// tract's `par_chunks_mut` cuts `4 × threads` chunks of a rounded-up size instead: 42 items
/// make 7 chunks of 6, four on one thread and three on the other.
pub(crate) fn par_parts(items: usize, macs: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    use super::team::{here, Here};
    use tract_linalg::multithread::{current_tract_executor, Executor};
    match here() {
        Here::Team(team) if team.threads() > 1 && items > 1 && macs >= 32768 => {
            let t = team.threads().min(items);
            return team.run(t, &|i| f(i * items / t..(i + 1) * items / t));
        }
        Here::Team(_) | Here::Inline => return f(0..items),
        Here::None => {}
    }
    match current_tract_executor() {
        Executor::MultiThread(pool)
            if pool.current_num_threads() > 1 && items > 1 && macs >= 32768 =>
        {
            let t = pool.current_num_threads().min(items);
            pool.install(|| spin_parts(t, |i| f(i * items / t..(i + 1) * items / t)));
        }
        _ => f(0..items),
    }
}

/// Runs `f(0)` .. `f(t - 1)`, part 0 on this thread and the others as jobs for the pool's
/// other threads, and waits for them spinning, never asleep. rayon's own join puts a thread
/// that waits for a stolen job to sleep after 32 rounds of `sched_yield` (a few µs), and
/// waking it cost 15–30 µs on a 2-vCPU VM: measured with a part 6 µs longer than the other,
/// one parallel loop took 42 µs instead of 24. A frame runs ~50 such loops. While it waits,
/// this thread also runs any part no other thread has taken (`yield_now`), so it finishes
/// alone when the others are busy or asleep.
fn spin_parts(t: usize, f: impl Fn(usize) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// Counts a part as finished when it ends, returning or unwinding, so a panicking part
    /// cannot leave the wait below spinning (the scope then carries its panic on).
    struct Finished<'a>(&'a AtomicUsize);
    impl Drop for Finished<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Release);
        }
    }
    let finished = AtomicUsize::new(0);
    rayon::in_place_scope(|s| {
        for i in 1..t {
            let (f, finished) = (&f, &finished);
            s.spawn(move |_| {
                let _done = Finished(finished);
                f(i)
            });
        }
        f(0);
        while finished.load(Ordering::Acquire) < t - 1 {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::hint::spin_loop();
            }
        }
    });
}

/// An output pointer shared by the threads of one operator, each writing its own disjoint
/// part of the buffer (the operator's `eval` says which).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the threads write disjoint parts, and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that a closure captures the whole `Sync` wrapper, not the
    /// bare pointer field).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// A read-only pointer handed to an operator's threads.
#[derive(Clone, Copy)]
pub(crate) struct SharedPtr(pub(crate) *const f32);
// SAFETY: only read, and the buffer outlives the threads.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

/// Whether two float slices hold the same bits (the kernels' ops compare their constants so).
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// `n` seeded values in `[-half_width, half_width)`, for the kernels' checks and tests.
pub(crate) fn seeded_uniform(seed: &mut u64, n: usize, half_width: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 * half_width - half_width
        })
        .collect()
}

/// A kernel body generic over the vector type: [`dispatch`] runs it compiled for an
/// instruction set.
pub(crate) trait Work {
    /// # Safety
    /// The CPU must run `L`'s instructions, and the body's own contract must hold.
    unsafe fn run<L: Lanes>(self);
}

/// Runs `work` compiled for `isa`.
///
/// # Safety
/// `isa` must be one this CPU runs ([`Isa::detect`] / [`Isa::available`]), and `work`'s own
/// contract must hold.
pub(crate) unsafe fn dispatch<W: Work>(isa: Isa, work: W) {
    unsafe {
        match isa {
            Isa::Scalar => work.run::<Scalar>(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512(work),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => x86::avx2(work),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => work.run::<arm::Neon>(),
            #[cfg(target_arch = "arm")]
            Isa::Neon => work.run::<arm7::Neon2>(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(crate) struct F32x16(__m512);

    impl Lanes for F32x16 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            F32x16(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            F32x16(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            F32x16(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            F32x16(unsafe { _mm512_add_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
            F32x16(unsafe { _mm512_min_ps(_mm512_max_ps(self.0, lo.0), hi.0) })
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            F32x16(unsafe { _mm512_mul_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn round_even(self) -> Self {
            F32x16(unsafe {
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
            })
        }
        #[inline(always)]
        unsafe fn load_tail(p: *const f32, n: usize) -> Self {
            let mask: __mmask16 = (1u16 << n) - 1;
            F32x16(unsafe { _mm512_maskz_loadu_ps(mask, p) })
        }
        #[inline(always)]
        unsafe fn store_tail(self, p: *mut f32, n: usize) {
            let mask: __mmask16 = (1u16 << n) - 1;
            unsafe { _mm512_mask_storeu_ps(p, mask, self.0) }
        }
        #[inline(always)]
        unsafe fn copy_tail(src: *const f32, dst: *mut f32, n: usize) {
            let mask: __mmask16 = (1u16 << n) - 1;
            unsafe { _mm512_mask_storeu_ps(dst, mask, _mm512_maskz_loadu_ps(mask, src)) }
        }
        #[inline(always)]
        unsafe fn permute2(a: Self, b: Self, idx: &[u32; 16]) -> Self {
            unsafe {
                let idx = _mm512_loadu_si512(idx.as_ptr().cast());
                F32x16(_mm512_permutex2var_ps(a.0, idx, b.0))
            }
        }
        #[inline(always)]
        unsafe fn repeat4(p: *const f32) -> Self {
            F32x16(unsafe { _mm512_broadcast_f32x4(_mm_loadu_ps(p)) })
        }
        /// The classic four rounds: interleave pairs of rows (floats, then float pairs), then
        /// gather 128-bit lanes twice.
        #[inline(always)]
        unsafe fn transpose(src: *const f32, ss: usize, dst: impl Fn(usize) -> *mut f32) {
            unsafe {
                let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ss)));
                let mut t = [_mm512_setzero_ps(); 16];
                for k in (0..16).step_by(2) {
                    t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
                    t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
                }
                // Row group g (rows 4g..4g+3): u[4g + b], 128-bit lane l, is column 4l + b.
                let mut u = [_mm512_setzero_ps(); 16];
                for g in 0..4 {
                    let (a, b) = (_mm512_castps_pd(t[4 * g]), _mm512_castps_pd(t[4 * g + 2]));
                    let (c, d) = (
                        _mm512_castps_pd(t[4 * g + 1]),
                        _mm512_castps_pd(t[4 * g + 3]),
                    );
                    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
                    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
                }
                for h in [0, 8] {
                    for k in 0..4 {
                        let (a, b) = (u[h + k], u[h + k + 4]);
                        t[h + k] = _mm512_shuffle_f32x4::<0x88>(a, b);
                        t[h + k + 4] = _mm512_shuffle_f32x4::<0xdd>(a, b);
                    }
                }
                for k in 0..8 {
                    let (a, b) = (t[k], t[k + 8]);
                    _mm512_storeu_ps(dst(k), _mm512_shuffle_f32x4::<0x88>(a, b));
                    _mm512_storeu_ps(dst(k + 8), _mm512_shuffle_f32x4::<0xdd>(a, b));
                }
            }
        }
    }

    #[derive(Clone, Copy)]
    pub(crate) struct F32x8(__m256);

    impl Lanes for F32x8 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            F32x8(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            F32x8(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            F32x8(unsafe { _mm256_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            F32x8(unsafe { _mm256_add_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
            F32x8(unsafe { _mm256_min_ps(_mm256_max_ps(self.0, lo.0), hi.0) })
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            F32x8(unsafe { _mm256_mul_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn round_even(self) -> Self {
            F32x8(unsafe {
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
            })
        }
        #[inline(always)]
        unsafe fn load_tail(p: *const f32, n: usize) -> Self {
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
                F32x8(_mm256_maskload_ps(p, mask))
            }
        }
        #[inline(always)]
        unsafe fn store_tail(self, p: *mut f32, n: usize) {
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
                _mm256_maskstore_ps(p, mask, self.0)
            }
        }
        #[inline(always)]
        unsafe fn copy_tail(src: *const f32, dst: *mut f32, n: usize) {
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
                _mm256_maskstore_ps(dst, mask, _mm256_maskload_ps(src, mask));
            }
        }
        /// Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        #[inline(always)]
        unsafe fn transpose(src: *const f32, ss: usize, dst: impl Fn(usize) -> *mut f32) {
            unsafe {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
                let mut t = [_mm256_setzero_ps(); 8];
                for k in (0..8).step_by(2) {
                    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
                    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
                }
                // Rows 4g..4g+3: u[4g + b], 128-bit half l, is column 4l + b.
                let mut u = [_mm256_setzero_ps(); 8];
                for g in 0..2 {
                    let (a, b, c, d) = (t[4 * g], t[4 * g + 2], t[4 * g + 1], t[4 * g + 3]);
                    u[4 * g] = _mm256_shuffle_ps::<0x44>(a, b);
                    u[4 * g + 1] = _mm256_shuffle_ps::<0xee>(a, b);
                    u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(c, d);
                    u[4 * g + 3] = _mm256_shuffle_ps::<0xee>(c, d);
                }
                for k in 0..4 {
                    let (a, b) = (u[k], u[k + 4]);
                    _mm256_storeu_ps(dst(k), _mm256_permute2f128_ps::<0x20>(a, b));
                    _mm256_storeu_ps(dst(k + 4), _mm256_permute2f128_ps::<0x31>(a, b));
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<W: super::Work>(work: W) {
        unsafe { work.run::<F32x16>() }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<W: super::Work>(work: W) {
        unsafe { work.run::<F32x8>() }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod arm {
    use super::Lanes;
    use std::arch::aarch64::*;

    /// NEON is part of every aarch64 CPU: no detection, no target_feature wrapper.
    #[derive(Clone, Copy)]
    pub(crate) struct Neon(float32x4_t);

    impl Lanes for Neon {
        const N: usize = 4;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Neon(unsafe { vdupq_n_f32(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Neon(unsafe { vld1q_f32(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { vst1q_f32(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            Neon(unsafe { vfmaq_f32(c.0, a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Neon(unsafe { vaddq_f32(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
            Neon(unsafe { vminq_f32(vmaxq_f32(self.0, lo.0), hi.0) })
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Neon(unsafe { vmulq_f32(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn round_even(self) -> Self {
            Neon(unsafe { vrndnq_f32(self.0) })
        }
        /// n ≤ 3, lane by lane: written as a loop over a stack array, the compiler made it a
        /// `memcpy` call, and a tile whose last vector is short then saved and reloaded all
        /// its accumulators around that call on every input channel (`benches/hot_loops.py`).
        #[inline(always)]
        unsafe fn load_tail(p: *const f32, n: usize) -> Self {
            unsafe {
                let mut v = vdupq_n_f32(0.0);
                if n > 0 {
                    v = vld1q_lane_f32::<0>(p, v);
                }
                if n > 1 {
                    v = vld1q_lane_f32::<1>(p.add(1), v);
                }
                if n > 2 {
                    v = vld1q_lane_f32::<2>(p.add(2), v);
                }
                Neon(v)
            }
        }
        /// n ≤ 3, lane by lane, as [`Lanes::load_tail`].
        #[inline(always)]
        unsafe fn store_tail(self, p: *mut f32, n: usize) {
            unsafe {
                if n > 0 {
                    vst1q_lane_f32::<0>(p, self.0);
                }
                if n > 1 {
                    vst1q_lane_f32::<1>(p.add(1), self.0);
                }
                if n > 2 {
                    vst1q_lane_f32::<2>(p.add(2), self.0);
                }
            }
        }
        #[inline(always)]
        unsafe fn copy_tail(src: *const f32, dst: *mut f32, n: usize) {
            // n ≤ 3, spelled out so it is not turned into a `memcpy` call.
            unsafe {
                if n > 0 {
                    *dst = *src;
                }
                if n > 1 {
                    *dst.add(1) = *src.add(1);
                }
                if n > 2 {
                    *dst.add(2) = *src.add(2);
                }
            }
        }
    }
}

/// armv7 NEON through inline assembly: `core::arch::arm`'s intrinsics and vector types, the
/// `neon` target feature and ARM feature detection are all unstable in Rust 1.95, while `asm!`
/// is stable. A vector is two floats in one 64-bit `d` register, carried as the bits of an
/// `f64` (the `dreg` operand class takes `f64`; its 128-bit `q` class takes only SIMD types,
/// which cannot be named on stable). That halves the floats per instruction, not the rate, on
/// the cores of the Pi 2, 3 and Zero 2 (Cortex-A7, A53: 64-bit NEON datapaths, a `q` operation
/// issues as two halves); and 32 `d` registers hold the same tiles of accumulators as
/// aarch64's 32 `q` ones. Each operation is one instruction, each block pure, so the compiler
/// allocates the registers and schedules the loads around them. `mul_add` is `vmla`, multiply
/// then add, not VFPv4's fused `vfma`: tract's armv7 kernels (NEON `vmla`, and VFP's where it
/// finds no NEON) round the product too, and over the 1152 terms of Lite0's last projections
/// the fused sums drifted 6e-5 from theirs, past the kernels' check (1e-5 of the largest
/// output). NEON on armv7 also flushes subnormal floats to zero.
#[cfg(target_arch = "arm")]
pub(crate) mod arm7 {
    use super::Lanes;
    use std::arch::asm;

    /// Whether this CPU has NEON (every armv7 Raspberry Pi: the Pi 2's Cortex-A7, the Pi 3's
    /// and Zero 2's A53, the Pi 4's A72 in 32-bit mode), from the kernel's hardware
    /// capabilities.
    pub(crate) fn detected() -> bool {
        /// `HWCAP_NEON` of Linux's `arch/arm/include/uapi/asm/hwcap.h`.
        const HWCAP_NEON: libc::c_ulong = 1 << 12;
        // SAFETY: getauxval only reads the auxiliary vector.
        let caps = unsafe { libc::getauxval(libc::AT_HWCAP) };
        caps & HWCAP_NEON != 0
    }

    /// One NEON instruction on `d` registers; the `.fpu` line lets the assembler take NEON
    /// instructions, which the target's default features leave out.
    macro_rules! neon {
        ($($t:tt)*) => {
            asm!(".fpu neon", $($t)*)
        };
    }

    /// `INSN d, a, b` for a two-operand NEON instruction on `Neon2`s.
    macro_rules! two {
        ($insn:literal, $a:expr, $b:expr) => {{
            let v: f64;
            neon!(concat!($insn, " {v}, {a}, {b}"), v = lateout(dreg) v, a = in(dreg) $a.0,
                b = in(dreg) $b.0, options(pure, nomem, nostack, preserves_flags));
            Neon2(v)
        }};
    }

    /// Two floats, lane 0 in the low half.
    #[derive(Clone, Copy)]
    pub(crate) struct Neon2(f64);

    impl Neon2 {
        #[inline(always)]
        fn from_lanes(lo: f32, hi: f32) -> Self {
            Neon2(f64::from_bits(
                lo.to_bits() as u64 | (hi.to_bits() as u64) << 32,
            ))
        }
        #[inline(always)]
        fn lanes(self) -> (f32, f32) {
            let b = self.0.to_bits();
            (f32::from_bits(b as u32), f32::from_bits((b >> 32) as u32))
        }
    }

    impl Lanes for Neon2 {
        const N: usize = 2;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            let v: f64;
            unsafe {
                neon!("vdup.32 {v}, {x}", v = out(dreg) v, x = in(reg) x.to_bits(),
                    options(pure, nomem, nostack, preserves_flags));
            }
            Neon2(v)
        }
        #[inline(always)]
        unsafe fn splat_at(p: *const f32) -> Self {
            let v: f64;
            unsafe {
                neon!("vld1.32 {{{v}[]}}, [{p}]", v = out(dreg) v, p = in(reg) p,
                    options(pure, readonly, nostack, preserves_flags));
            }
            Neon2(v)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            let v: f64;
            unsafe {
                neon!("vld1.32 {{{v}}}, [{p}]", v = out(dreg) v, p = in(reg) p,
                    options(pure, readonly, nostack, preserves_flags));
            }
            Neon2(v)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe {
                neon!("vst1.32 {{{v}}}, [{p}]", v = in(dreg) self.0, p = in(reg) p,
                    options(nostack, preserves_flags));
            }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            let mut acc = c.0;
            unsafe {
                neon!("vmla.f32 {acc}, {a}, {b}", acc = inout(dreg) acc, a = in(dreg) a.0,
                    b = in(dreg) b.0, options(pure, nomem, nostack, preserves_flags));
            }
            Neon2(acc)
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { two!("vadd.f32", a, b) }
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
            let mut v = self.0;
            unsafe {
                neon!("vmax.f32 {v}, {v}, {lo}", "vmin.f32 {v}, {v}, {hi}", v = inout(dreg) v,
                    lo = in(dreg) lo.0, hi = in(dreg) hi.0,
                    options(pure, nomem, nostack, preserves_flags));
            }
            Neon2(v)
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { two!("vmul.f32", a, b) }
        }
        #[inline(always)]
        unsafe fn round_even(self) -> Self {
            // armv7 NEON has no rounding instruction (`vrintn` is Armv8): a lane at a time.
            let (lo, hi) = self.lanes();
            Neon2::from_lanes(lo.round_ties_even(), hi.round_ties_even())
        }
        #[inline(always)]
        unsafe fn load_tail(p: *const f32, n: usize) -> Self {
            // n ≤ 1.
            Neon2::from_lanes(if n > 0 { unsafe { *p } } else { 0.0 }, 0.0)
        }
        #[inline(always)]
        unsafe fn store_tail(self, p: *mut f32, n: usize) {
            if n > 0 {
                unsafe { *p = self.lanes().0 };
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            unsafe {
                asm!("pld [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly));
            }
        }
        #[inline(always)]
        unsafe fn copy_tail(src: *const f32, dst: *mut f32, n: usize) {
            if n > 0 {
                unsafe { *dst = *src };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Transpose<'a> {
        src: &'a [f32],
        dst: &'a mut [f32],
    }

    impl Work for Transpose<'_> {
        unsafe fn run<L: Lanes>(self) {
            // An N × N block out of rows 2N + 3 long, into rows N + 5 long.
            let dst = self.dst.as_mut_ptr();
            unsafe { L::transpose(self.src.as_ptr(), 2 * L::N + 3, |j| dst.add(j * (L::N + 5))) }
        }
    }

    /// Every part runs once, on a pool whose other threads are asleep (no spinner: this thread
    /// then runs the parts nobody took) and from inside a part of an outer run.
    #[test]
    fn spin_parts_runs_every_part_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for t in 1..=5 {
            let runs: Vec<AtomicUsize> = (0..t).map(|_| AtomicUsize::new(0)).collect();
            pool.install(|| {
                spin_parts(t, |i| {
                    runs[i].fetch_add(1, Ordering::Relaxed);
                })
            });
            assert!(
                runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                "{t} parts"
            );
        }
        let inner = AtomicUsize::new(0);
        pool.install(|| {
            spin_parts(3, |_| {
                spin_parts(4, |_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                })
            })
        });
        assert_eq!(inner.load(Ordering::Relaxed), 12);
    }

    /// A part that panics ends the run with its panic; the wait does not spin for ever.
    #[test]
    fn a_panicking_part_is_carried_on() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for bad in 0..3 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| spin_parts(3, |i| assert_ne!(i, bad, "part {i}")))
            }));
            assert!(r.is_err(), "part {bad}'s panic was lost");
        }
    }

    #[test]
    fn every_isa_transposes_a_block() {
        for isa in Isa::available() {
            let n = isa.lanes();
            let src: Vec<f32> = (0..n * (2 * n + 3)).map(|i| i as f32).collect();
            let mut dst = vec![-1.0; n * (n + 5)];
            // SAFETY: both buffers hold N rows of their strides.
            unsafe {
                dispatch(
                    isa,
                    Transpose {
                        src: &src,
                        dst: &mut dst,
                    },
                )
            };
            for j in 0..n {
                for i in 0..n {
                    assert_eq!(
                        dst[j * (n + 5) + i],
                        src[i * (2 * n + 3) + j],
                        "{isa:?} ({i}, {j})"
                    );
                }
                assert!(dst[j * (n + 5) + n..(j + 1) * (n + 5)]
                    .iter()
                    .all(|&v| v == -1.0));
            }
        }
    }
}
