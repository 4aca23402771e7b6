//! The GPU path against tract on the same machine, in one run: batch-1 latency and batch-64
//! throughput of the bundled fp32 model (`cargo bench --features gpu --bench gpu`).
//!
//! Criterion reports time per batch; divide by the batch for per-image figures, or use
//! `benches/compare_gpu.sh`, which prints the ratios. `GRAFT_GPU_ADAPTER` picks the adapter;
//! by default the best one (a software renderer only when there is nothing else). On a
//! software renderer batch 64 takes tens of seconds per sample: set `GRAFT_BENCH_GPU_BATCH`
//! to time a smaller batch there.

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use graft::backbone::{preprocess, Backbone};
use graft::gpu::{DeviceChoice, GpuBackbone, GpuOptions};

const PHOTO: &str = "tests/fixtures/images/chelsea.jpg";

fn bench(c: &mut Criterion) {
    let frame = preprocess::decode_file(Path::new(PHOTO)).expect("fixture photo");
    let cpu = Backbone::load_named("efficientnet-lite0-fp32").expect("bundled model");
    let mut gpu = Backbone::load_named("efficientnet-lite0-fp32").expect("bundled model");
    let exec = GpuBackbone::open(&gpu, DeviceChoice::Gpu, &GpuOptions::default())
        .expect("a GPU adapter")
        .expect("gpu");
    eprintln!("gpu: {} ({:?})", exec.adapter().name, exec.summary());
    gpu.set_accelerator(Some(Arc::new(exec)));
    let big: usize = std::env::var("GRAFT_BENCH_GPU_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let p = cpu.prepare_frame(&frame);
    let mut g = c.benchmark_group("gpu_vs_cpu");
    g.sample_size(10);
    for batch in [1, big] {
        let inputs = vec![p.clone(); batch];
        g.throughput(Throughput::Elements(batch as u64));
        for (name, bb) in [("cpu", &cpu), ("gpu", &gpu)] {
            bb.embed(&inputs).unwrap(); // plans, pipelines, first-use costs outside the timing
            g.bench_with_input(BenchmarkId::new(name, batch), &inputs, |b, inputs| {
                b.iter(|| bb.embed(inputs).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
