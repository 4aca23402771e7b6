//! `graft eval` and `graft curve`: the library's evaluation (`graft::head::eval`) on an image
//! folder, printed and drawn. The splits, fits and scores are the library's; this file embeds
//! the folder, reports and plots.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use super::{embed_dataset, parse_choice, CacheArgs};
use crate::{output, Global};
use graft::backbone::preprocess;
use graft::head::eval::{self, Split};
use graft::head::metrics::{ClassMetrics, Confusion};
use graft::head::{Examples, HeadKind, HeadParams};
use graft::store::dataset::ImageFolder;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Labelled image folder.
    dataset: PathBuf,
    /// Head type: auto, logistic, centroid, knn or bayes.
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
    /// Seed of the splits.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the confusion matrix as an SVG picture.
    #[arg(long)]
    plot: Option<PathBuf>,
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
    /// Head types, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "logistic,centroid")]
    heads: Vec<String>,
    /// Seed of the splits.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the learning curve as an SVG picture.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Embeds a labelled folder (through the cache) into the library's training form.
fn load_dataset(
    g: &Global,
    dataset: &Path,
    cache: &CacheArgs,
) -> anyhow::Result<(Examples, ImageFolder)> {
    let ds = ImageFolder::scan(dataset)?;
    if ds.labels.len() < 2 {
        bail!("{}: need at least 2 class folders", dataset.display());
    }
    let bb = crate::load_backbone(g)?;
    let mut c = cache.open(&bb)?;
    let (set, _, _) = embed_dataset(&bb, &ds, c.as_mut())?;
    Ok((set.training_examples(), ds))
}

#[derive(Serialize)]
struct EvalReport<'a> {
    dataset: &'a Path,
    head: String,
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
    let (ex, _) = load_dataset(g, &a.dataset, &a.cache)?;
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
    let e = eval::evaluate(&ex, choice, &splits, &HeadParams::default(), a.seed, || {
        bar.inc(1)
    })?;
    bar.finish_and_clear();
    let (m, s) = e.accuracy();
    let title = format!(
        "graft eval: {} head, {mode}, closed-set accuracy {:.1}%",
        a.head,
        m * 100.0
    );
    if let Some(p) = &a.plot {
        graft::plot::confusion_svg(p, &e.confusion, &title)?;
    }
    let report = EvalReport {
        dataset: &a.dataset,
        head: a.head.clone(),
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
struct CurvePoint {
    features: &'static str,
    head: HeadKind,
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
    let kinds: Vec<HeadKind> = a
        .heads
        .iter()
        .map(|h| h.parse())
        .collect::<Result<_, _>>()?;
    if a.trials == 0 || a.shots.is_empty() || a.shots.contains(&0) {
        bail!("--trials and every --shots value must be at least 1");
    }
    let (ex, ds) = load_dataset(g, &a.dataset, &a.cache)?;
    // The from-scratch baseline: the same heads on raw downscaled pixels.
    let pixels = ex.with_features(
        ds.items
            .iter()
            .map(|(p, _)| preprocess::decode_file(p).map(|f| preprocess::pixel_features(&f, 32)))
            .collect::<Result<_, _>>()?,
    )?;
    let mut points = Vec::new();
    let bar = output::progress(a.shots.len() * kinds.len() * 2, "learning curve");
    for &shots in &a.shots {
        // The same draws for every head and both feature sets.
        let splits = eval::few_shot_splits(&ex, shots, a.trials, a.seed);
        for (features, data) in [("backbone", &ex), ("pixels", &pixels)] {
            for &kind in &kinds {
                bar.inc(1);
                let Some(splits) = &splits else {
                    continue; // not enough images for this many shots
                };
                let e = eval::evaluate(
                    data,
                    Some(kind),
                    splits,
                    &HeadParams::default(),
                    a.seed,
                    || {},
                )?;
                let (m, s) = e.accuracy();
                points.push(CurvePoint {
                    features,
                    head: kind,
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
    let chance = 1.0 / ex.classes() as f64;
    if let Some(p) = &a.plot {
        let mut series = Vec::new();
        for features in ["backbone", "pixels"] {
            for &kind in &kinds {
                let pts: Vec<(f64, f64, f64)> = points
                    .iter()
                    .filter(|q| q.features == features && q.head == kind)
                    .map(|q| (q.shots as f64, q.accuracy, q.std))
                    .collect();
                series.push(graft::plot::Series {
                    name: format!(
                        "{kind} on {}",
                        if features == "backbone" {
                            "backbone features"
                        } else {
                            "raw pixels (32x32)"
                        }
                    ),
                    points: pts,
                    dashed: features == "pixels",
                });
            }
        }
        let title = format!(
            "graft: accuracy vs examples per class ({} classes)",
            ex.classes()
        );
        graft::plot::curve_svg(p, &series, &title, chance)?;
    }
    let report = CurveReport {
        dataset: &a.dataset,
        classes: ex.classes(),
        chance,
        points,
        plot: a.plot.as_deref(),
    };
    if g.json {
        return output::json_line(&report);
    }
    println!(
        "{:<9} {:<9} {:>6} {:>9} {:>7}",
        "features", "head", "shots", "accuracy", "std"
    );
    for q in &report.points {
        println!(
            "{:<9} {:<9} {:>6} {:>8.1}% {:>6.1}%",
            q.features,
            q.head.to_string(),
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
