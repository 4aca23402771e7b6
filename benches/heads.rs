//! Head fit and predict time per head type, against shots and classes. Uses synthetic unit
//! vectors of the backbone's size (1280) in separable clusters: the cost of fitting does not
//! depend on what the pixels showed, only on n, d and classes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use graft::head::{self, Examples, HeadKind, HeadParams};

fn data(classes: usize, shots: usize) -> Examples {
    head::synthetic(classes, shots, 1280, 42)
}

fn bench(c: &mut Criterion) {
    let params = HeadParams::default();
    let mut g = c.benchmark_group("fit");
    g.sample_size(10);
    for kind in HeadKind::ALL {
        for (classes, shots) in [(5, 1), (5, 5), (5, 20), (20, 5), (10, 20)] {
            let ex = data(classes, shots);
            let (x, y) = (ex.x, ex.y);
            g.bench_with_input(
                BenchmarkId::new(kind.to_string(), format!("{classes}c x {shots}s")),
                &(x, y),
                |b, (x, y)| b.iter(|| head::fit(kind, x, y, classes, &params).unwrap()),
            );
        }
    }
    g.finish();

    let mut g = c.benchmark_group("train_with_cv");
    g.sample_size(10);
    for (classes, shots) in [(5, 5), (5, 20)] {
        let ex = data(classes, shots);
        g.bench_function(
            BenchmarkId::new("auto", format!("{classes}c x {shots}s")),
            |b| b.iter(|| head::train(None, &ex, &params, 0).unwrap()),
        );
    }
    g.finish();

    let mut g = c.benchmark_group("predict");
    for kind in HeadKind::ALL {
        let ex = data(5, 10);
        let t = head::train(Some(kind), &ex, &params, 0).unwrap();
        g.bench_function(BenchmarkId::new(kind.to_string(), "5c x 10s"), |b| {
            b.iter(|| t.head.predict(&ex.x[3], None, 3).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
