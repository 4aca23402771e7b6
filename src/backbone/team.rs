//! The threads that share a frame's operators with the thread that runs the plan.
//!
//! With graft's own kernels, every parallel loop of a frame goes through
//! [`super::simd::par_parts`]. Run on rayon (tract's executor), the frame was handed to a pool
//! thread (`install`) while the caller slept, and woke the caller at its end: three threads
//! for two cores, a hop in and a hop out (4 and 15 µs on a 2-vCPU VM), and a partner that could
//! not keep spinning between frames without taking the core the caller needed to wake on.
//! Here the caller is one of the threads: a [`Team`] of `threads − 1` workers joins it for each
//! loop. A loop posts its parts; each thread claims parts until none is left (so a worker still
//! waking never holds the caller up); the caller waits, spinning, for the parts others took.
//! Workers spin for [`LINGER`] after their last part, so frames back to back find them awake,
//! then park until the next loop posts.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a worker spins for the next loop before it parks: longer than the serial stretches
/// between a frame's parallel loops and than the gap between frames back to back (bench,
/// bulk), short beside a camera's frame interval (33 ms at 30 fps).
pub(crate) const LINGER: Duration = Duration::from_millis(2);

/// One parallel loop: `parts` calls of `f`. Each thread claims the part of its own index
/// first (the caller 0, worker `i` part `i`), then any part left, lowest first: with as many
/// parts as threads, a part then runs on the same thread loop after loop while all are
/// awake, and graft's kernels cut each operator so that a part reads what the same part of
/// the operator before wrote, in that core's cache.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    /// Parts claimed, a bit each, of the first 64.
    claimed: AtomicU64,
    /// Past the first 64: the next part to claim.
    next: AtomicUsize,
    /// Parts finished, returned or unwound.
    done: AtomicUsize,
    /// The first panic of a part a worker ran, carried on by the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// Parts a job claims by its bit mask.
const MASKED: usize = 64;

impl Job<'_> {
    /// A part for the thread of index `me` to run, if one is left.
    fn claim(&self, me: usize) -> Option<usize> {
        let masked = self.parts.min(MASKED);
        let all = if masked == MASKED {
            u64::MAX
        } else {
            (1u64 << masked) - 1
        };
        if me < masked && self.claimed.fetch_or(1 << me, Ordering::AcqRel) & (1 << me) == 0 {
            return Some(me);
        }
        loop {
            let free = !self.claimed.load(Ordering::Acquire) & all;
            if free == 0 {
                break;
            }
            let part = free.trailing_zeros() as usize;
            if self.claimed.fetch_or(1 << part, Ordering::AcqRel) & (1 << part) == 0 {
                return Some(part);
            }
        }
        let part = MASKED + self.next.fetch_add(1, Ordering::AcqRel);
        (part < self.parts).then_some(part)
    }

    /// Lets no thread claim another part.
    fn close(&self) {
        self.claimed.store(u64::MAX, Ordering::Release);
        self.next.fetch_max(self.parts, Ordering::AcqRel);
    }

    /// Claims and runs parts until none is left, as the thread of index `me`; a panic is
    /// caught and kept (on a worker).
    fn work(&self, me: usize, catch: bool) {
        while let Some(part) = self.claim(me) {
            if catch {
                if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| (self.f)(part))) {
                    let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(p);
                }
                self.done.fetch_add(1, Ordering::AcqRel);
            } else {
                /// Counts the part finished however it ends.
                struct Done<'a>(&'a AtomicUsize);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::AcqRel);
                    }
                }
                let _done = Done(&self.done);
                (self.f)(part);
            }
        }
    }
}

/// What the caller and the workers share.
struct Shared {
    /// Bumped each time a loop is posted.
    posted: AtomicU64,
    /// The loop now running (null between loops). Points into the caller's stack: the caller
    /// nulls it and waits for `inside` to reach 0 before its frame goes.
    job: AtomicPtr<Job<'static>>,
    /// Workers between reading `job` and leaving the loop.
    inside: AtomicUsize,
    /// Workers parked or about to park.
    parked: AtomicUsize,
    stop: AtomicBool,
}

/// `threads − 1` worker threads that run parts of the loops the thread inside
/// [`Team::enter`] posts.
pub(crate) struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// The team of the run on this thread ([`Team::enter`]), null outside one.
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Set while this thread runs a part (and always on a worker): a loop inside it runs
    /// inline.
    static IN_PART: Cell<bool> = const { Cell::new(false) };
}

/// Where a parallel loop posted on this thread goes.
pub(crate) enum Here<'a> {
    /// To this team.
    Team(&'a Team),
    /// Inside a part: run it all here.
    Inline,
    /// No team on this thread (tract's executor decides).
    None,
}

/// Where a loop posted on this thread goes.
pub(crate) fn here<'a>() -> Here<'a> {
    if IN_PART.with(Cell::get) {
        return Here::Inline;
    }
    let team = CURRENT.with(Cell::get);
    if team.is_null() {
        Here::None
    } else {
        // SAFETY: set by `Team::enter`, which outlives the run and resets it on the way out.
        Here::Team(unsafe { &*team })
    }
}

impl Team {
    /// A team for `threads` threads in all (the caller and `threads − 1` workers).
    pub(crate) fn new(threads: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            posted: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            inside: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let mut team = Team {
            shared,
            workers: Vec::new(),
        };
        for i in 1..threads.max(1) {
            let shared = Arc::clone(&team.shared);
            // On failure `team` drops, stopping the workers already started.
            let handle = std::thread::Builder::new()
                .name(format!("graft-cpu-{i}"))
                .spawn(move || worker(&shared, i))?;
            team.workers.push(handle);
        }
        Ok(team)
    }

    /// Threads in all, the caller's included.
    pub(crate) fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f` on this thread with this team taking part in its parallel loops. Wakes
    /// parked workers first, so they wake while `f` starts. One thread at a time may be inside.
    pub(crate) fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        self.unpark();
        /// Resets the thread's team however `f` ends.
        struct Leave(*const Team);
        impl Drop for Leave {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _leave = Leave(CURRENT.with(|c| c.replace(self)));
        f()
    }

    fn unpark(&self) {
        if self.shared.parked.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread().unpark();
            }
        }
    }

    /// Runs `f(0)` .. `f(parts − 1)` on this thread and the workers, each part once; returns
    /// when all have finished, carrying on a part's panic.
    pub(crate) fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if parts == 0 {
            return;
        }
        let job = Job {
            f,
            parts,
            claimed: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        /// Takes the loop down however this thread's parts end: no more claims, and no worker
        /// left inside it, before the job (on this stack) goes.
        struct Close<'a>(&'a Shared, &'a Job<'a>);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                let (shared, job) = (self.0, self.1);
                job.close();
                shared.job.store(std::ptr::null_mut(), Ordering::SeqCst);
                while shared.inside.load(Ordering::SeqCst) != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let shared = &*self.shared;
        // The workers see the job only through `shared.job`, and only until `Close` has
        // nulled it and seen them all leave: the lifetime is erased for that span alone.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        shared.job.store(ptr, Ordering::SeqCst);
        shared.posted.fetch_add(1, Ordering::SeqCst);
        self.unpark();
        {
            let _close = Close(shared, &job);
            let outer = IN_PART.with(|p| p.replace(true));
            /// Resets `IN_PART` however this thread's parts end.
            struct Out(bool);
            impl Drop for Out {
                fn drop(&mut self) {
                    IN_PART.with(|p| p.set(self.0));
                }
            }
            let _out = Out(outer);
            job.work(0, false);
            while job.done.load(Ordering::Acquire) < parts {
                std::hint::spin_loop();
            }
        }
        if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            panic::resume_unwind(p);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            // A worker's parts catch their panics: it returns.
            let _ = w.join();
        }
    }
}

/// Worker `me` (from 1): runs parts of each loop posted, spins [`LINGER`] for the next, then
/// parks.
fn worker(shared: &Shared, me: usize) {
    IN_PART.with(|p| p.set(true));
    // Nothing posted yet when the team was made; a loop posted before this thread got here
    // is still to be seen.
    let mut seen = 0;
    let mut idle: Option<Instant> = None;
    while !shared.stop.load(Ordering::Acquire) {
        let posted = shared.posted.load(Ordering::Acquire);
        if posted != seen {
            seen = posted;
            idle = None;
            shared.inside.fetch_add(1, Ordering::SeqCst);
            let job = shared.job.load(Ordering::SeqCst);
            if !job.is_null() {
                // SAFETY: the caller keeps the job alive until `inside` is back to 0
                // (`Team::run`'s `Close`), and it was not yet nulled when read after entering.
                unsafe { (*job).work(me, true) };
            }
            shared.inside.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        if idle.get_or_insert_with(Instant::now).elapsed() < LINGER {
            std::hint::spin_loop();
            continue;
        }
        // Park until a loop is posted: counted first, then the post checked, so a caller
        // posting meanwhile either is seen here or sees this worker counted and unparks it.
        shared.parked.fetch_add(1, Ordering::SeqCst);
        while shared.posted.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst) {
            std::thread::park();
        }
        shared.parked.fetch_sub(1, Ordering::SeqCst);
        idle = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Every part runs exactly once, with workers awake, parked, or more parts than threads.
    #[test]
    fn every_part_runs_once() {
        for threads in 1..=4 {
            let team = Team::new(threads).unwrap();
            assert_eq!(team.threads(), threads);
            for parts in [1, 2, 3, 7, 64] {
                let runs: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                team.enter(|| {
                    team.run(parts, &|i| {
                        runs[i].fetch_add(1, Ordering::Relaxed);
                    })
                });
                assert!(
                    runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                    "{threads} threads, {parts} parts"
                );
            }
            // Past the linger: the workers park, and the next loop wakes them.
            std::thread::sleep(LINGER * 3);
            let sum = AtomicUsize::new(0);
            team.run(5, &|i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 10);
        }
    }

    /// The workers take parts: with parts that wait for each other, a loop of as many parts as
    /// threads finishes only if every thread runs one at the same time. And each thread takes
    /// the part of its own index, loop after loop (the caller part 0), whichever wakes first.
    #[test]
    fn the_workers_run_parts_alongside() {
        let team = Team::new(4).unwrap();
        let mut first: Option<Vec<std::thread::ThreadId>> = None;
        for round in 0..20 {
            if round % 5 == 4 {
                // Some loops find the workers parked.
                std::thread::sleep(LINGER * 2);
            }
            let arrived = AtomicUsize::new(0);
            let ran: Vec<Mutex<Option<std::thread::ThreadId>>> =
                (0..4).map(|_| Mutex::new(None)).collect();
            team.run(4, &|part| {
                *ran[part].lock().unwrap() = Some(std::thread::current().id());
                arrived.fetch_add(1, Ordering::AcqRel);
                let start = Instant::now();
                while arrived.load(Ordering::Acquire) < 4 {
                    assert!(start.elapsed() < Duration::from_secs(30), "no partner came");
                    std::hint::spin_loop();
                }
            });
            let ran: Vec<_> = ran
                .into_iter()
                .map(|r| r.into_inner().unwrap().unwrap())
                .collect();
            assert_eq!(ran[0], std::thread::current().id(), "the caller ran part 0");
            match &first {
                None => first = Some(ran),
                Some(f) => assert_eq!(f, &ran, "round {round}: parts moved between threads"),
            }
        }
    }

    /// A loop inside a part runs inline; `here` says where a loop goes.
    #[test]
    fn a_loop_inside_a_part_runs_inline() {
        let team = Team::new(2).unwrap();
        assert!(matches!(here(), Here::None));
        let inner = AtomicUsize::new(0);
        team.enter(|| {
            assert!(matches!(here(), Here::Team(_)));
            team.run(4, &|_| match here() {
                Here::Inline => (0..3).for_each(|_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                }),
                _ => panic!("a part's loop would not run inline"),
            });
            assert!(matches!(here(), Here::Team(_)));
        });
        assert!(matches!(here(), Here::None));
        assert_eq!(inner.load(Ordering::Relaxed), 12);
    }

    /// A part that panics, on the caller or on a worker, ends the loop with its panic, and the
    /// team runs the next loop.
    #[test]
    fn a_panicking_part_is_carried_on() {
        let team = Team::new(2).unwrap();
        for bad in 0..4 {
            let r = panic::catch_unwind(AssertUnwindSafe(|| {
                team.run(4, &|i| {
                    // Slow parts, so that both threads take some.
                    std::thread::sleep(Duration::from_millis(2));
                    assert_ne!(i, bad, "part {i}");
                })
            }));
            assert!(r.is_err(), "part {bad}'s panic was lost");
            let ok = AtomicUsize::new(0);
            team.run(4, &|_| {
                ok.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(ok.load(Ordering::Relaxed), 4);
        }
    }
}
