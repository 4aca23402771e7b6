//! The per-frame pipeline of `graft watch`, capture excluded: raw camera frames replayed from
//! memory through the capture seam (pixel conversion), preprocess, embed, head. Compared with the
//! embed step alone; the goal is frame → label within 1.2x of embed.
//! `cargo bench --bench live` (prints the side-by-side ratio at the end).

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use graft::backbone::{preprocess, Backbone, RgbFrame};
use graft::capture::{FrameSource, MemorySource, PixelFormat, RawFrame};
use graft::head::HeadKind;
use graft::live;
use graft::store::headfile::Example;
use graft::store::learn::ExampleSet;

const PHOTO: &str = "tests/fixtures/images/dog.jpg"; // 512x384, close to a 640x480 webcam frame

/// BT.601 limited-range RGB → YUYV (what a UVC webcam sends).
fn to_yuyv(f: &RgbFrame) -> Vec<u8> {
    let (w, h) = (f.width() as usize & !1, f.height() as usize);
    let px = |x: usize, y: usize| {
        let i = (y * f.width() as usize + x) * 3;
        let p = &f.as_raw()[i..i + 3];
        (f32::from(p[0]), f32::from(p[1]), f32::from(p[2]))
    };
    let mut out = Vec::with_capacity(w * h * 2);
    for y in 0..h {
        for x in (0..w).step_by(2) {
            let (r, g, b) = px(x, y);
            let (r2, g2, b2) = px(x + 1, y);
            let luma =
                |r: f32, g: f32, b: f32| 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0;
            let (r, g, b) = ((r + r2) / 2.0, (g + g2) / 2.0, (b + b2) / 2.0);
            let u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0;
            let v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0;
            let (y0, y1) = (luma(px(x, y).0, px(x, y).1, px(x, y).2), luma(r2, g2, b2));
            out.extend([y0, u, y1, v].map(|c| c.round().clamp(0.0, 255.0) as u8));
        }
    }
    out
}

fn raw_frames(photo: &RgbFrame) -> Vec<(&'static str, RawFrame)> {
    vec![
        (
            "yuyv",
            RawFrame {
                format: PixelFormat::Yuyv,
                width: photo.width() & !1,
                height: photo.height(),
                data: to_yuyv(photo),
            },
        ),
        (
            "mjpeg",
            RawFrame {
                format: PixelFormat::Mjpeg,
                width: photo.width(),
                height: photo.height(),
                data: photo.to_jpeg(85, "bench").unwrap(),
            },
        ),
    ]
}

/// A two-class head on fixture photos: the head's cost is what matters, not its accuracy.
fn head(bb: &Backbone) -> graft::head::Head {
    let dir = Path::new("tests/fixtures/images");
    let examples: Vec<Example> = ["chelsea.jpg", "coffee.jpg", "dog.jpg", "eagle.jpg"]
        .iter()
        .enumerate()
        .map(|(i, f)| Example {
            label: i % 2,
            path: dir.join(f),
            sha256: f.to_string(),
            embedding: bb.embed_file(&dir.join(f)).unwrap().vector,
        })
        .collect();
    let set = ExampleSet {
        labels: vec!["a".to_string(), "b".to_string()],
        examples,
    };
    set.fit(
        bb.id(),
        Some(HeadKind::Logistic),
        &graft::head::HeadParams::default(),
        0,
    )
    .unwrap()
    .0
    .head
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    let photo = preprocess::decode_file(Path::new(PHOTO)).expect("fixture photo");
    let bb = Backbone::load_named("efficientnet-lite0").unwrap();
    let head = head(&bb);
    let prepared = bb.prepare_frame(&photo);
    bb.run(std::slice::from_ref(&prepared)).unwrap();

    let mut g = c.benchmark_group("live");
    g.sample_size(20);
    g.bench_function("embed_only", |b| {
        b.iter(|| bb.run(std::slice::from_ref(&prepared)).unwrap())
    });
    for (name, raw) in raw_frames(&photo) {
        let mut src = MemorySource::new(vec![raw], true);
        g.bench_function(format!("convert_{name}"), |b| {
            b.iter(|| src.next_frame().unwrap().unwrap())
        });
        g.bench_function(format!("frame_to_label_{name}"), |b| {
            b.iter(|| {
                let f = src.next_frame().unwrap().unwrap();
                live::classify(&bb, &head, &f, None).unwrap()
            })
        });
    }
    g.finish();

    // Side by side, interleaved, so the ratio is not skewed by the machine's load drifting.
    for (name, raw) in raw_frames(&photo) {
        let mut src = MemorySource::new(vec![raw], true);
        let (mut embed, mut full) = (Vec::new(), Vec::new());
        for _ in 0..30 {
            let t = Instant::now();
            bb.run(std::slice::from_ref(&prepared)).unwrap();
            embed.push(t.elapsed());
            let t = Instant::now();
            let f = src.next_frame().unwrap().unwrap();
            live::classify(&bb, &head, &f, None).unwrap();
            full.push(t.elapsed());
        }
        let (e, f) = (median(embed), median(full));
        println!(
            "live/{name}: frame→label {:.2} ms vs embed alone {:.2} ms: {:.3}x (goal ≤ 1.2x), {}x{} frame",
            f.as_secs_f64() * 1e3,
            e.as_secs_f64() * 1e3,
            f.as_secs_f64() / e.as_secs_f64(),
            photo.width(),
            photo.height()
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
