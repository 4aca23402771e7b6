//! Head fit and predict time per head type, against shots and classes. Uses synthetic unit
//! vectors of the backbone's size (1280) in separable clusters: the cost of fitting does not
//! depend on what the pixels showed, only on n, d and classes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use graft::head::{self, HeadKind, HeadParams};
use rand::{Rng, SeedableRng};

fn data(classes: usize, shots: usize) -> (Vec<Vec<f32>>, Vec<usize>, Vec<String>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| {
            head::normalize(
                &(0..1280)
                    .map(|_| rng.gen_range(0.0f32..1.0))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (c, centre) in centres.iter().enumerate() {
        for _ in 0..shots {
            let v: Vec<f32> = centre
                .iter()
                .map(|m| m + rng.gen_range(-0.02f32..0.02))
                .collect();
            x.push(head::normalize(&v));
            y.push(c);
        }
    }
    (x, y, (0..classes).map(|c| format!("c{c}")).collect())
}

fn bench(c: &mut Criterion) {
    let params = HeadParams::default();
    let mut g = c.benchmark_group("fit");
    g.sample_size(10);
    for kind in HeadKind::ALL {
        for (classes, shots) in [(5, 1), (5, 5), (5, 20), (20, 5)] {
            let (x, y, _) = data(classes, shots);
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
        let (x, y, labels) = data(classes, shots);
        g.bench_function(
            BenchmarkId::new("auto", format!("{classes}c x {shots}s")),
            |b| {
                let groups: Vec<usize> = (0..x.len()).collect();
                b.iter(|| head::train(None, &x, &y, &groups, &labels, &params, 0).unwrap())
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("predict");
    for kind in HeadKind::ALL {
        let (x, y, labels) = data(5, 10);
        let groups: Vec<usize> = (0..x.len()).collect();
        let t = head::train(Some(kind), &x, &y, &groups, &labels, &params, 0).unwrap();
        g.bench_function(BenchmarkId::new(kind.to_string(), "5c x 10s"), |b| {
            b.iter(|| t.head.predict(&x[3], None, 3).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
