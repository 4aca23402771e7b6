//! What the plain-`main` benches share (`mod common;` in each): a median timer.

use std::time::Instant;

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
