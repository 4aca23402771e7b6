//! What the plain-`main` benches share (`mod common;` in each): a median timer and the
//! instruction set a bench runs.

// Each bench compiles this module on its own and uses part of it.
#![allow(dead_code)]

use graft::backbone::depthwise::Isa;
use std::time::Instant;

/// The instruction set `GRAFT_BENCH_ISA` names (`avx512`, `avx2+fma`, `neon`, ...), else the
/// widest this CPU has; `None`, said on stderr, when this CPU has no kernel of that name.
pub fn isa(bench: &str) -> Option<Isa> {
    match std::env::var("GRAFT_BENCH_ISA") {
        Ok(name) => {
            let found = Isa::available().into_iter().find(|i| i.name() == name);
            if found.is_none() {
                let names: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
                eprintln!(
                    "{bench}: this CPU has no {name} kernel (it has {})",
                    names.join(", ")
                );
            }
            found
        }
        Err(_) => Some(Isa::detect()),
    }
}

/// Median seconds of one call of `f`, over 25 batches of 10 after 10 warm-up calls.
pub fn median(mut f: impl FnMut()) -> f64 {
    for _ in 0..10 {
        f();
    }
    let mut times: Vec<f64> = (0..25)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..10 {
                f();
            }
            t.elapsed().as_secs_f64() / 10.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
