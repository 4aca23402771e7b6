//! `graft bench`: the numbers a user posts in an issue — load, preprocess and embed latency of
//! the backbone on this machine (median of `--runs`).

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::{output, Global};
use graft::backbone::{preprocess, Backbone};

#[derive(Serialize)]
struct Report {
    model: String,
    precision: String,
    target_arch: &'static str,
    cpu_features: Vec<String>,
    threads: usize,
    runs: usize,
    image: PathBuf,
    load_ms: f64,
    decode_ms: f64,
    preprocess_ms: f64,
    embed_batch1_ms: f64,
    embed_batch8_ms_per_image: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn time<T>(runs: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    f()?; // warm-up (builds plans, fills caches)
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

pub fn run(g: &Global, image: Option<PathBuf>, runs: usize) -> anyhow::Result<()> {
    let image = image.unwrap_or_else(|| PathBuf::from("tests/fixtures/images/chelsea.jpg"));
    let runs = runs.max(1);
    let bb = super::load_backbone(g)?;
    let frame = preprocess::decode_file(&image)?;
    let decode_ms = time(runs, || Ok(preprocess::decode_file(&image)?))?;
    let preprocess_ms = time(runs, || Ok(bb.prepare_frame(&frame)))?;
    let p = bb.prepare_frame(&frame);
    let one = vec![p.clone()];
    let embed_batch1_ms = time(runs, || Ok(bb.run(&one)?))?;
    let eight = vec![p; 8];
    let embed_batch8_ms_per_image = time(runs.div_ceil(4), || Ok(bb.run(&eight)?))? / 8.0;
    let report = Report {
        model: bb.id().name.clone(),
        precision: bb.manifest().precision.clone(),
        target_arch: std::env::consts::ARCH,
        cpu_features: Backbone::cpu_features(),
        threads: bb.threads(),
        runs,
        image,
        load_ms: bb.load_time().as_secs_f64() * 1e3,
        decode_ms,
        preprocess_ms,
        embed_batch1_ms,
        embed_batch8_ms_per_image,
    };
    if g.json {
        return output::json_line(&report);
    }
    println!(
        "model        {} ({}, {} thread(s), {})",
        report.model, report.precision, report.threads, report.target_arch
    );
    println!("load         {:>8.1} ms", report.load_ms);
    println!(
        "decode       {:>8.2} ms   ({})",
        report.decode_ms,
        report.image.display()
    );
    println!("preprocess   {:>8.2} ms", report.preprocess_ms);
    println!("embed b=1    {:>8.2} ms", report.embed_batch1_ms);
    println!(
        "embed b=8    {:>8.2} ms per image",
        report.embed_batch8_ms_per_image
    );
    println!("(median of {} runs)", report.runs);
    Ok(())
}
