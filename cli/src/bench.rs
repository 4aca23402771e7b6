//! `graft bench`: the numbers a user posts in an issue — on this board, with this build: load
//! time (and its stages), decode, preprocess, embed at batch 1 and at the best batch size, head
//! fit and predict, peak memory; `--profile` adds where a forward pass spends its time, per
//! operator. Medians of `--runs`; with no `--image` the photo compiled into the binary is used,
//! so the command needs nothing but the binary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::{output, Global};
use graft::backbone::{preprocess, Backbone, Profile};
use graft::head::{self, HeadKind, HeadParams};

/// The photo timed when no `--image` is given (scikit-image's `chelsea`, see
/// tests/fixtures/images/LICENSES.md): 451×300 JPEG, a typical small camera frame.
const BUILTIN_PHOTO: &[u8] = include_bytes!("../assets/bench.jpg");
const BUILTIN_NAME: &str = "builtin:chelsea.jpg";

/// The head problem timed: the issue tracker's yardstick, 10 classes × 20 shots.
const HEAD_CLASSES: usize = 10;
const HEAD_SHOTS: usize = 20;

#[derive(Serialize)]
struct Report {
    graft_version: &'static str,
    model: String,
    precision: String,
    target_arch: &'static str,
    cpu_features: Vec<String>,
    threads: usize,
    /// What ran the forward pass: `cpu (tract)` or the GPU adapter.
    device: String,
    runs: usize,
    image: String,
    load_ms: f64,
    load_verify_ms: f64,
    load_parse_ms: f64,
    load_optimize_ms: f64,
    decode_ms: f64,
    preprocess_ms: f64,
    embed_batch1_ms: f64,
    /// Per-image latency at each batch size tried.
    batches: Vec<BatchTime>,
    best_batch: usize,
    best_batch_ms_per_image: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    head: Option<HeadTimes>,
    /// Peak resident memory of this process so far (Linux `VmHWM`), MiB.
    peak_rss_mib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Profile>,
    /// Per-kernel GPU times at the largest batch (`--profile` on a GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_profile: Option<super::device::GpuProfile>,
}

#[derive(Serialize)]
struct BatchTime {
    batch: usize,
    ms_per_image: f64,
}

#[derive(Serialize)]
struct HeadTimes {
    classes: usize,
    shots: usize,
    fit_logistic_ms: f64,
    fit_centroid_ms: f64,
    /// `graft train --head auto`: cross-validation of every head kind, calibration, final fit.
    train_auto_ms: f64,
    predict_us: f64,
    /// With a `NAME:top` or `NAME:deep` model: `graft train --head finetune` (its
    /// cross-validation: early stopping by 5 folds for `:top`, 3 folds at fixed epochs for
    /// `:deep`, each fold leaving a class out for the threshold; final fit) on as many examples
    /// of the cut's inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    train_finetune_ms: Option<f64>,
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

/// Peak resident set size of this process in MiB, from `/proc/self/status` (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// What `graft bench` was asked to do.
pub struct Options {
    pub image: Option<PathBuf>,
    pub runs: usize,
    pub max_batch: usize,
    pub profile: bool,
    pub skip_heads: bool,
}

pub fn run(g: &Global, o: Options) -> anyhow::Result<()> {
    let runs = o.runs.max(1);
    // Peak memory is read at the end, so the model is loaded and used first: the figure covers
    // a whole predict-like session (load, decode, embed, head).
    let (bb, gpu) = super::load_backbone_with_gpu(g)?;
    let (bytes, name) = match &o.image {
        Some(p) => (
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
            p.display().to_string(),
        ),
        None => (BUILTIN_PHOTO.to_vec(), BUILTIN_NAME.to_string()),
    };
    let path = Path::new(&name);
    let frame = preprocess::decode_bytes(&bytes, path)?;
    let decode_ms = time(runs, || Ok(preprocess::decode_bytes(&bytes, path)?))?;
    let preprocess_ms = time(runs, || Ok(bb.prepare_frame(&frame)))?;
    let p = bb.prepare_frame(&frame);

    let embed_batch1_ms = time(runs, || Ok(bb.embed(std::slice::from_ref(&p))?))?;
    let mut batches = vec![BatchTime {
        batch: 1,
        ms_per_image: embed_batch1_ms,
    }];
    let mut batch = 2;
    while batch <= o.max_batch {
        let images = vec![p.clone(); batch];
        // Fewer runs for bigger batches: each is `batch` images' worth of work.
        let ms = time(runs.div_ceil(batch).max(3), || Ok(bb.embed(&images)?))?;
        batches.push(BatchTime {
            batch,
            ms_per_image: ms / batch as f64,
        });
        batch *= 2;
    }
    let best = batches
        .iter()
        .min_by(|a, b| a.ms_per_image.total_cmp(&b.ms_per_image))
        .map(|b| (b.batch, b.ms_per_image))
        .unwrap_or((1, embed_batch1_ms));

    let head = if o.skip_heads {
        None
    } else {
        // Behind a top block the fixed heads see its pooled features.
        let dim = bb.top_block().map_or(bb.id().dim, |b| b.cout);
        let mut times = time_heads(dim, runs)?;
        if let Some(block) = bb.top_block() {
            times.train_finetune_ms = Some(time_finetune(block)?);
        }
        Some(times)
    };
    // The operator profile is tract's (the CPU reference); on a GPU, its kernels are timed too.
    let profile = if o.profile {
        Some(bb.profile(std::slice::from_ref(&p), runs)?)
    } else {
        None
    };
    let gpu_profile = if o.profile {
        super::device::gpu_profile(gpu.as_ref(), o.max_batch, runs)?
    } else {
        None
    };
    let stages = bb.load_stages();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let report = Report {
        graft_version: env!("CARGO_PKG_VERSION"),
        model: bb.id().name.clone(),
        precision: bb.manifest().precision.clone(),
        target_arch: std::env::consts::ARCH,
        cpu_features: Backbone::cpu_features(),
        threads: bb.threads(),
        device: bb.engine(),
        runs,
        image: name,
        load_ms: ms(bb.load_time()),
        load_verify_ms: ms(stages.verify),
        load_parse_ms: ms(stages.parse),
        load_optimize_ms: ms(stages.optimize),
        decode_ms,
        preprocess_ms,
        embed_batch1_ms,
        batches,
        best_batch: best.0,
        best_batch_ms_per_image: best.1,
        head,
        peak_rss_mib: peak_rss_mib(),
        profile,
        gpu_profile,
    };
    if g.json {
        return output::json_line(&report);
    }
    print_report(&report);
    Ok(())
}

/// One `train --head finetune` on synthetic top-block inputs (10 classes × 20): the cost
/// depends on the sizes, not on what the pictures showed. Values of the order of the real
/// activations (unit vectors scaled by √dim). Timed once: it takes seconds.
fn time_finetune(block: &graft::backbone::TopBlock) -> anyhow::Result<f64> {
    let mut ex = head::synthetic(HEAD_CLASSES, HEAD_SHOTS, block.input_size(), 42);
    let scale = (block.input_size() as f32).sqrt();
    for x in &mut ex.x {
        x.iter_mut().for_each(|v| *v *= scale);
    }
    let params = HeadParams {
        top: Some(std::sync::Arc::new(block.clone())),
        ..HeadParams::default()
    };
    let start = std::time::Instant::now();
    head::train(Some(HeadKind::Finetune), &ex, &params, 0)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn time_heads(dim: usize, runs: usize) -> anyhow::Result<HeadTimes> {
    let ex = head::synthetic(HEAD_CLASSES, HEAD_SHOTS, dim, 42);
    let params = HeadParams::default();
    let fit = |kind| {
        time(runs, || {
            Ok(head::fit(kind, &ex.x, &ex.y, HEAD_CLASSES, &params)?)
        })
    };
    let fit_logistic_ms = fit(HeadKind::Logistic)?;
    let fit_centroid_ms = fit(HeadKind::Centroid)?;
    let train = || Ok(head::train(None, &ex, &params, 0)?);
    let train_auto_ms = time(runs.min(3), train)?;
    let trained = head::train(Some(HeadKind::Logistic), &ex, &params, 0)?;
    // One predict is microseconds: time a block of them.
    const BLOCK: usize = 100;
    let predict_block_ms = time(runs, || {
        for v in ex.x.iter().cycle().take(BLOCK) {
            trained.head.predict(v, None, 3)?;
        }
        Ok(())
    })?;
    Ok(HeadTimes {
        classes: HEAD_CLASSES,
        shots: HEAD_SHOTS,
        fit_logistic_ms,
        fit_centroid_ms,
        train_auto_ms,
        predict_us: predict_block_ms * 1e3 / BLOCK as f64,
        train_finetune_ms: None,
    })
}

fn print_report(r: &Report) {
    println!(
        "graft {}  model {} ({}), {} thread(s), {} [{}]",
        r.graft_version,
        r.model,
        r.precision,
        r.threads,
        r.target_arch,
        r.cpu_features.join(" ")
    );
    println!("device        {}", r.device);
    println!(
        "load          {:>9.1} ms   (verify {:.1}, parse {:.1}, optimise {:.1})",
        r.load_ms, r.load_verify_ms, r.load_parse_ms, r.load_optimize_ms
    );
    println!("decode        {:>9.2} ms   ({})", r.decode_ms, r.image);
    println!("preprocess    {:>9.2} ms", r.preprocess_ms);
    for b in &r.batches {
        let best = if b.batch == r.best_batch {
            "  best"
        } else {
            ""
        };
        println!(
            "embed b={:<4}  {:>9.2} ms per image{best}",
            b.batch, b.ms_per_image
        );
    }
    if let Some(h) = &r.head {
        let shape = format!("{} classes x {} shots", h.classes, h.shots);
        println!("fit logistic  {:>9.2} ms   ({shape})", h.fit_logistic_ms);
        println!("fit centroid  {:>9.2} ms   ({shape})", h.fit_centroid_ms);
        println!(
            "train auto    {:>9.1} ms   ({shape}: CV of every head, calibration, fit)",
            h.train_auto_ms
        );
        println!("predict       {:>9.1} µs   (logistic head)", h.predict_us);
        if let Some(ms) = h.train_finetune_ms {
            println!(
                "train finetune {:>8.1} ms   ({shape}: CV, calibration, fit)",
                ms
            );
        }
    }
    match r.peak_rss_mib {
        Some(m) => println!("peak memory   {m:>9.1} MiB (resident, whole run)"),
        None => println!("peak memory         n/a   (no /proc/self/status)"),
    }
    println!("(median of {} runs)", r.runs);
    if let Some(p) = &r.profile {
        print_profile(p);
    }
    if let Some(p) = &r.gpu_profile {
        p.print();
    }
}

fn print_profile(p: &Profile) {
    println!();
    println!(
        "profile: batch {}, mean of {} passes: {:.2} ms per pass, {:.2} ms inside operators",
        p.batch, p.runs, p.total_ms, p.nodes_ms
    );
    println!(
        "{:<28} {:>5} {:>9} {:>7}",
        "operator", "nodes", "ms", "share"
    );
    for o in &p.by_op {
        println!(
            "{:<28} {:>5} {:>9.3} {:>6.1}%",
            o.op,
            o.nodes,
            o.ms,
            o.share * 100.0
        );
    }
    println!();
    println!("slowest nodes:");
    for n in p.nodes.iter().take(15) {
        println!("{:>8.3} ms  {:<18} {}  [{}]", n.ms, n.op, n.node, n.info);
    }
}
