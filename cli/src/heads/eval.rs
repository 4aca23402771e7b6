//! `graft eval` and `graft curve`: the library's evaluation (`graft::head::eval`) on an image
//! folder, printed and drawn. The splits, fits and scores are the library's; this file embeds
//! the folder, reports and plots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use super::{embed_dataset, parse_choice, CacheArgs, FinetuneArgs};
use crate::{output, Global};
use graft::backbone::preprocess;
use graft::head::eval::{self, Split};
use graft::head::metrics::{ClassMetrics, Confusion};
use graft::head::{Examples, HeadKind, HeadParams, DEFAULT_POWER};
use graft::store::dataset::ImageFolder;
use graft::store::learn::ExampleSet;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Labelled image folder.
    dataset: PathBuf,
    /// Head type: auto, logistic, centroid, knn, bayes or finetune (with a `NAME:top` model).
    #[arg(long, default_value = "logistic")]
    head: String,
    /// k-fold cross-validation with K folds (the default mode, K=5).
    #[arg(long, conflicts_with = "shots")]
    folds: Option<usize>,
    /// Few-shot mode: train on N examples per class, test on the rest.
    #[arg(long)]
    shots: Option<usize>,
    /// Few-shot trials (different random draws).
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Open set: in each trial some classes are never taught; measures how well the head's
    /// score separates them from known objects (AUROC) and what its threshold keeps and
    /// rejects, against what training estimated. Needs --shots.
    #[arg(long, requires = "shots")]
    open_set: bool,
    /// With --open-set: classes never taught per trial [default: a quarter, at least 1].
    #[arg(long, requires = "open_set")]
    novel: Option<usize>,
    /// Feature transform of the heads: embedding values to this power before L2 (1: none).
    #[arg(long, default_value_t = DEFAULT_POWER)]
    power: f32,
    /// Seed of the splits.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the confusion matrix as an SVG picture.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    finetune: FinetuneArgs,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Debug, Args)]
pub struct CurveArgs {
    /// Labelled image folder.
    dataset: PathBuf,
    /// Examples per class to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,5,10,20")]
    shots: Vec<usize>,
    /// Trials per point.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Head types, comma-separated (`auto` too: chosen by cross-validation in every draw;
    /// `finetune` with a `NAME:top` model, e.g. `--model efficientnet-lite0:top --heads
    /// logistic,finetune` compares fixed features with fine-tuned ones on the same draws).
    #[arg(long, value_delimiter = ',', default_value = "logistic,centroid")]
    heads: Vec<String>,
    /// Feature transforms to compare, comma-separated powers (1: the plain pipeline).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    powers: Vec<f32>,
    /// Also draw another backbone's features at power 1, on the same draws: e.g.
    /// `efficientnet-lite0-fp32` (average-pooled features, the pipeline before GeM pooling)
    /// against the default model at `--powers 0.5`.
    #[arg(long)]
    baseline: Option<String>,
    /// Seed of the splits.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the learning curve as an SVG picture.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    finetune: FinetuneArgs,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Embeds a labelled folder (through the cache): its examples, the folder and the backbone's
/// name.
fn load_dataset(
    g: &Global,
    dataset: &Path,
    cache: &CacheArgs,
) -> anyhow::Result<(ExampleSet, ImageFolder, String, Top)> {
    let ds = ImageFolder::scan(dataset)?;
    if ds.labels.len() < 2 {
        bail!("{}: need at least 2 class folders", dataset.display());
    }
    let bb = crate::load_backbone(g)?;
    let mut c = cache.open(&bb)?;
    let (set, _, _) = embed_dataset(&bb, &ds, c.as_mut())?;
    let top = bb.top_block().cloned().map(Arc::new);
    Ok((set, ds, bb.id().name.clone(), top))
}

/// The backbone's top block, when the examples are its inputs (`--model NAME:top`).
type Top = Option<Arc<graft::backbone::TopBlock>>;

#[derive(Serialize)]
struct EvalReport<'a> {
    dataset: &'a Path,
    head: String,
    power: f32,
    mode: String,
    splits: usize,
    accuracy: f64,
    accuracy_std: f64,
    split_accuracies: Vec<f64>,
    fit_seconds_mean: f64,
    chosen_heads: Vec<HeadKind>,
    per_class: Vec<ClassMetrics>,
    confusion: &'a Confusion,
    plot: Option<&'a Path>,
}

pub fn eval(g: &Global, a: EvalArgs) -> anyhow::Result<()> {
    let choice = parse_choice(&a.head)?;
    if a.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let params = HeadParams {
        power: a.power,
        ..HeadParams::default()
    };
    let params = a.finetune.apply(params);
    params.validate()?;
    let (set, _, _, top) = load_dataset(g, &a.dataset, &a.cache)?;
    let params = HeadParams { top, ..params };
    let ex = set.training_examples(&params);
    if a.open_set {
        return open_set(g, &a, choice, &ex, &params);
    }
    let (splits, mode): (Vec<Split>, String) = if let Some(shots) = a.shots {
        if shots == 0 {
            bail!("--shots must be at least 1");
        }
        let Some(s) = eval::few_shot_splits(&ex, shots, a.trials, a.seed) else {
            bail!(
                "{}: every class needs more than {shots} images for a {shots}-shot split",
                a.dataset.display()
            );
        };
        (s, format!("{shots}-shot x {} trials", a.trials))
    } else {
        let k = a.folds.unwrap_or(5);
        if k < 2 {
            bail!("--folds must be at least 2");
        }
        (
            eval::kfold_splits(&ex, k, a.seed),
            format!("{k}-fold (grouped, stratified)"),
        )
    };
    let bar = output::progress(splits.len(), "evaluating");
    let e = eval::evaluate(&ex, choice, &splits, &params, a.seed, || bar.inc(1))?;
    bar.finish_and_clear();
    let (m, s) = e.accuracy();
    let title = format!(
        "graft eval: {} head, {mode}, power {}, closed-set accuracy {:.1}%",
        a.head,
        a.power,
        m * 100.0
    );
    if let Some(p) = &a.plot {
        graft::plot::confusion_svg(p, &e.confusion, &title)?;
    }
    let report = EvalReport {
        dataset: &a.dataset,
        head: a.head.clone(),
        power: a.power,
        mode,
        splits: e.splits.len(),
        accuracy: m,
        accuracy_std: s,
        split_accuracies: e.accuracies(),
        fit_seconds_mean: e.mean_fit_seconds(),
        chosen_heads: e.splits.iter().map(|o| o.kind).collect(),
        per_class: e.confusion.per_class(),
        confusion: &e.confusion,
        plot: a.plot.as_deref(),
    };
    if g.json {
        return output::json_line(&report);
    }
    println!("{title}");
    println!(
        "accuracy {:.1}% ± {:.1}% over {} splits",
        m * 100.0,
        s * 100.0,
        report.splits
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>8}",
        "class", "precision", "recall", "f1", "support"
    );
    for c in &report.per_class {
        println!(
            "{:<14} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            c.label, c.precision, c.recall, c.f1, c.support
        );
    }
    print!("{}", e.confusion.to_text());
    if let Some(p) = &a.plot {
        println!("confusion matrix drawn to {}", p.display());
    }
    Ok(())
}

#[derive(Serialize)]
struct OpenSetReport<'a> {
    dataset: &'a Path,
    head: &'a str,
    power: f32,
    shots: usize,
    novel_classes: usize,
    trials: usize,
    accuracy: (f64, f64),
    auroc: (f64, f64),
    auroc_nearest_example: (f64, f64),
    auroc_mahalanobis: (f64, f64),
    /// Cosine to the nearest class mean, centred on the untaught photos' mean.
    auroc_centred: (f64, f64),
    known_kept: (f64, f64),
    novel_rejected: (f64, f64),
    estimated_known_kept: Option<(f64, f64)>,
    estimated_novel_rejected: Option<(f64, f64)>,
    splits: Vec<eval::OpenSetOutcome>,
}

/// `eval --open-set`: whole classes held out, the head's own threshold judged on them.
fn open_set(
    g: &Global,
    a: &EvalArgs,
    choice: Option<HeadKind>,
    ex: &Examples,
    params: &HeadParams,
) -> anyhow::Result<()> {
    let shots = a.shots.unwrap_or(5);
    let novel = a.novel.unwrap_or((ex.classes() / 4).max(1));
    let Some(splits) = eval::open_set_splits(ex, shots, novel, a.trials, a.seed) else {
        bail!(
            "{}: an open-set split needs {} classes ({novel} never taught + 2 known) with more than {shots} images each",
            a.dataset.display(),
            novel + 2
        );
    };
    let bar = output::progress(splits.len(), "open-set evaluation");
    let o = eval::evaluate_open_set(ex, choice, &splits, params, a.seed, || bar.inc(1))?;
    bar.finish_and_clear();
    let ms = |f: &dyn Fn(&eval::OpenSetOutcome) -> f64| {
        eval::mean_std(&o.iter().map(f).collect::<Vec<_>>())
    };
    let est = |f: &dyn Fn(&eval::OpenSetOutcome) -> Option<f64>| {
        let v: Vec<f64> = o.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| eval::mean_std(&v))
    };
    let r = OpenSetReport {
        dataset: &a.dataset,
        head: &a.head,
        power: params.power,
        shots,
        novel_classes: novel,
        trials: o.len(),
        accuracy: ms(&|s| s.accuracy),
        auroc: ms(&|s| s.auroc),
        auroc_nearest_example: ms(&|s| s.auroc_nearest),
        auroc_mahalanobis: ms(&|s| s.auroc_mahalanobis),
        auroc_centred: ms(&|s| s.auroc_centred),
        known_kept: ms(&|s| s.known_kept),
        novel_rejected: ms(&|s| s.novel_rejected),
        estimated_known_kept: est(&|s| s.estimated_known_kept),
        estimated_novel_rejected: est(&|s| s.estimated_novel_rejected),
        splits: o,
    };
    if g.json {
        return output::json_line(&r);
    }
    let pct = |(m, s): (f64, f64)| format!("{:5.1}% ± {:4.1}", m * 100.0, s * 100.0);
    let opt = |v: Option<(f64, f64)>| v.map_or("(not estimated)".to_string(), pct);
    println!(
        "graft eval --open-set: {} head, power {}, {shots}-shot, {novel} of {} classes never taught, {} trials",
        a.head,
        params.power,
        ex.classes(),
        r.trials
    );
    println!("closed-set accuracy (known)      {}", pct(r.accuracy));
    println!(
        "AUROC known vs never-taught      {:.3} ± {:.3} head score, {:.3} ± {:.3} nearest example, {:.3} ± {:.3} Mahalanobis",
        r.auroc.0,
        r.auroc.1,
        r.auroc_nearest_example.0,
        r.auroc_nearest_example.1,
        r.auroc_mahalanobis.0,
        r.auroc_mahalanobis.1
    );
    println!(
        "                                 {:.3} ± {:.3} class mean after centring on the untaught photos (unlabelled stream)",
        r.auroc_centred.0, r.auroc_centred.1
    );
    println!(
        "at the head's threshold          keeps {} of known, rejects {} of never-taught",
        pct(r.known_kept),
        pct(r.novel_rejected)
    );
    println!(
        "what train estimated             keeps {} of known, rejects {} of never-taught",
        opt(r.estimated_known_kept),
        opt(r.estimated_novel_rejected)
    );
    Ok(())
}

#[derive(Serialize)]
struct CurvePoint {
    /// `backbone` (`--model`), `pixels`, or the `--baseline` model's name.
    features: String,
    /// The power transform (backbone features; 1 for raw pixels).
    power: f32,
    head: String,
    shots: usize,
    accuracy: f64,
    std: f64,
    trials: usize,
}

#[derive(Serialize)]
struct CurveReport<'a> {
    dataset: &'a Path,
    classes: usize,
    chance: f64,
    points: Vec<CurvePoint>,
    plot: Option<&'a Path>,
}

pub fn curve(g: &Global, a: CurveArgs) -> anyhow::Result<()> {
    let kinds: Vec<(String, Option<HeadKind>)> = a
        .heads
        .iter()
        .map(|h| Ok((h.to_ascii_lowercase(), parse_choice(h)?)))
        .collect::<anyhow::Result<_>>()?;
    if a.trials == 0 || a.shots.is_empty() || a.shots.contains(&0) {
        bail!("--trials and every --shots value must be at least 1");
    }
    for p in &a.powers {
        HeadParams {
            power: *p,
            ..HeadParams::default()
        }
        .validate()?;
    }
    let (set, ds, model, top) = load_dataset(g, &a.dataset, &a.cache)?;
    // The from-scratch baseline: the same heads on raw downscaled pixels.
    let plain = set.training_examples(&HeadParams {
        power: 1.0,
        ..HeadParams::default()
    });
    let pixels = plain.with_features(
        ds.items
            .iter()
            .map(|(p, _)| preprocess::decode_file(p).map(|f| preprocess::pixel_features(&f, 32)))
            .collect::<Result<_, _>>()?,
    )?;
    // Each feature set: name, power, examples.
    let mut sets: Vec<(String, f32, Examples)> = a
        .powers
        .iter()
        .map(|&power| {
            let params = HeadParams {
                power,
                top: top.clone(),
                ..HeadParams::default()
            };
            (
                "backbone".to_string(),
                power,
                set.training_examples(&params),
            )
        })
        .collect();
    if let Some(name) = &a.baseline {
        let (bb, _gpu) = crate::load_model(g, name)?;
        let mut c = a.cache.open(&bb)?;
        let (base, _, _) = super::embed_dataset(&bb, &ds, c.as_mut())?;
        let examples = base.training_examples(&HeadParams {
            power: 1.0,
            ..HeadParams::default()
        });
        if examples.y != plain.y {
            bail!("{name}: the dataset's examples came out in another order");
        }
        sets.push((bb.id().name.clone(), 1.0, examples));
    }
    sets.push(("pixels".to_string(), 1.0, pixels));
    let mut points = Vec::new();
    let bar = output::progress(a.shots.len() * kinds.len() * sets.len(), "learning curve");
    for &shots in &a.shots {
        // The same draws for every head and every feature set.
        let splits = eval::few_shot_splits(&plain, shots, a.trials, a.seed);
        for (features, power, data) in &sets {
            let params = a.finetune.apply(HeadParams {
                power: *power,
                // The backbone's examples are top-block inputs with a `NAME:top` model.
                top: top.clone().filter(|_| features == "backbone"),
                ..HeadParams::default()
            });
            for (name, kind) in &kinds {
                bar.inc(1);
                let Some(splits) = &splits else {
                    continue; // not enough images for this many shots
                };
                if *kind == Some(HeadKind::Finetune) && params.top.is_none() {
                    continue; // raw pixels, a baseline: no top block to fine-tune
                }
                let e = eval::evaluate(data, *kind, splits, &params, a.seed, || {})?;
                let (m, s) = e.accuracy();
                points.push(CurvePoint {
                    features: features.clone(),
                    power: *power,
                    head: name.clone(),
                    shots,
                    accuracy: m,
                    std: s,
                    trials: splits.len(),
                });
            }
        }
    }
    bar.finish_and_clear();
    if points.is_empty() {
        bail!(
            "{}: not enough images per class for any of the requested shots",
            a.dataset.display()
        );
    }
    let chance = 1.0 / plain.classes() as f64;
    if let Some(p) = &a.plot {
        let mut series = Vec::new();
        for (features, power, _) in &sets {
            for (kind, _) in &kinds {
                let pts: Vec<(f64, f64, f64)> = points
                    .iter()
                    .filter(|q| q.features == *features && q.power == *power && q.head == *kind)
                    .map(|q| (q.shots as f64, q.accuracy, q.std))
                    .collect();
                let name = match (features.as_str(), *power) {
                    ("pixels", _) => format!("{kind} on raw pixels (32x32)"),
                    ("backbone", 1.0) => format!("{kind} on {model} features"),
                    ("backbone", p) => format!("{kind} on {model} features^{p}"),
                    (model, _) => format!("{kind} on {model} features"),
                };
                series.push(graft::plot::Series {
                    name,
                    points: pts,
                    dashed: features != "backbone",
                });
            }
        }
        let title = format!(
            "graft: accuracy vs examples per class ({} classes)",
            plain.classes()
        );
        graft::plot::curve_svg(p, &series, &title, chance)?;
    }
    let report = CurveReport {
        dataset: &a.dataset,
        classes: plain.classes(),
        chance,
        points,
        plot: a.plot.as_deref(),
    };
    if g.json {
        return output::json_line(&report);
    }
    let fw = report
        .points
        .iter()
        .map(|q| q.features.len())
        .max()
        .unwrap_or(0)
        .max(9);
    println!(
        "{:<fw$} {:>5} {:<9} {:>6} {:>9} {:>7}",
        "features", "power", "head", "shots", "accuracy", "std"
    );
    for q in &report.points {
        println!(
            "{:<fw$} {:>5} {:<9} {:>6} {:>8.1}% {:>6.1}%",
            q.features,
            q.power,
            q.head,
            q.shots,
            q.accuracy * 100.0,
            q.std * 100.0
        );
    }
    println!("chance {:.1}%", chance * 100.0);
    if let Some(p) = &a.plot {
        println!("learning curve drawn to {}", p.display());
    }
    Ok(())
}
