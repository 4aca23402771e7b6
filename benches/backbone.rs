//! Backbone stages: preprocess, embed (fp32 and int8, batch 1 and 8), classify.
//! `cargo bench --bench backbone`; compare with onnxruntime using benches/compare_onnxruntime.py.

use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use graft::backbone::{preprocess, Backbone, LoadOptions, ModelSpec};

const PHOTO: &str = "tests/fixtures/images/chelsea.jpg";

fn bench(c: &mut Criterion) {
    let path = Path::new(PHOTO);
    let frame = preprocess::decode_file(path).expect("fixture photo");
    let spec = ModelSpec::resolve("efficientnet-lite0-fp32").expect("bundled model");
    let input = spec.manifest.input.clone();

    let mut g = c.benchmark_group("preprocess");
    g.bench_function("decode_jpeg", |b| {
        b.iter(|| preprocess::decode_file(path).unwrap())
    });
    g.bench_function("resize_crop_normalise", |b| {
        b.iter(|| preprocess::prepare(&frame, &input))
    });
    g.finish();

    let mut g = c.benchmark_group("embed");
    g.sample_size(10);
    for model in ["efficientnet-lite0-fp32", "efficientnet-lite0-int8"] {
        let bb =
            Backbone::load(ModelSpec::resolve(model).unwrap(), &LoadOptions::default()).unwrap();
        let p = bb.prepare_frame(&frame);
        for batch in [1usize, 8] {
            let inputs = vec![p.clone(); batch];
            bb.embed(&inputs).unwrap(); // build the plan outside the timing
            g.bench_with_input(BenchmarkId::new(model, batch), &inputs, |b, inputs| {
                b.iter(|| bb.embed(inputs).unwrap())
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("classify");
    g.sample_size(10);
    let bb = Backbone::load_named("efficientnet-lite0").unwrap();
    g.bench_function("file_top5", |b| {
        b.iter(|| bb.classify_file(path, 5).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
