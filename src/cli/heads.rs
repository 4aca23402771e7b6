//! `graft train | predict | add | eval | curve`: few-shot heads on backbone embeddings.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::{output, Global};
use graft::backbone::{preprocess, Backbone};
use graft::head::metrics::{ClassMetrics, Confusion};
use graft::head::{self, HeadKind, HeadParams};
use graft::store::cache::{self, Cache};
use graft::store::dataset::{embed_cached, group_ids, group_key, ImageFolder};
use graft::store::files::collect_images;
use graft::store::headfile::{self, Example, HeadFile};

/// `--head` for training: a kind or `auto`.
fn parse_choice(s: &str) -> anyhow::Result<Option<HeadKind>> {
    if s.eq_ignore_ascii_case("auto") {
        Ok(None)
    } else {
        Ok(Some(s.parse()?))
    }
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Embedding cache folder [default: $GRAFT_CACHE, $XDG_CACHE_HOME/graft or ~/.cache/graft].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Do not read or write the embedding cache.
    #[arg(long)]
    no_cache: bool,
}

impl CacheArgs {
    fn open(&self, bb: &Backbone) -> anyhow::Result<Option<Cache>> {
        if self.no_cache {
            return Ok(None);
        }
        let dir = self.cache.clone().unwrap_or_else(cache::default_dir);
        Ok(Some(Cache::open(&dir, bb.id())?))
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Image folder: DATASET/<label>/*.jpg (sub-folders searched recursively).
    dataset: PathBuf,
    /// Where to write the head file (e.g. kiosk.graft).
    #[arg(long)]
    out: PathBuf,
    /// Head type: auto (chosen by cross-validation), logistic, centroid, knn or bayes.
    #[arg(long, default_value = "auto")]
    head: String,
    /// Seed for the cross-validation folds.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Head file written by `graft train` (or give `--model EXPORTED.onnx` instead).
    #[arg(long)]
    head: Option<PathBuf>,
    /// Images or folders of images.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Scores below this are `unknown` [default: the head's calibrated threshold].
    #[arg(long)]
    threshold: Option<f32>,
    /// Classes listed per image.
    #[arg(long, default_value_t = 3)]
    top: usize,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Head file to extend (rewritten atomically).
    #[arg(long)]
    head: PathBuf,
    /// Class of the new examples (a new name adds a class).
    #[arg(long)]
    label: String,
    /// Images or folders of images.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

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

/// Embeds a folder's images through the cache, with a progress bar.
fn embed_folder(
    bb: &Backbone,
    paths: &[PathBuf],
    cache: Option<&mut Cache>,
) -> anyhow::Result<(Vec<graft::store::dataset::Embedded>, usize, f64)> {
    let start = Instant::now();
    let bar = output::progress(paths.len(), "embedding");
    let (e, hits) = embed_cached(bb, paths, cache, |d| bar.set_position(d as u64))?;
    bar.finish_and_clear();
    Ok((e, hits, start.elapsed().as_secs_f64()))
}

#[derive(Serialize)]
struct Candidate {
    head: HeadKind,
    cv_accuracy: f64,
    method: String,
}

#[derive(Serialize)]
struct TrainSummary<'a> {
    out: &'a Path,
    head: HeadKind,
    labels: &'a [String],
    counts: Vec<usize>,
    examples: usize,
    cv_method: String,
    cv_accuracy: f64,
    candidates: Vec<Candidate>,
    temperature: f32,
    threshold: f32,
    calibration: &'static str,
    known_accepted: Option<f32>,
    novel_rejected: Option<f32>,
    model: &'a str,
    embedded: usize,
    cached: usize,
    embed_seconds: f64,
    fit_seconds: f64,
}

fn print_train_summary(g: &Global, s: &TrainSummary) -> anyhow::Result<()> {
    if g.json {
        return output::json_line(s);
    }
    println!(
        "trained {} head on {} examples of {} classes ({}) -> {}",
        s.head,
        s.examples,
        s.labels.len(),
        s.labels
            .iter()
            .zip(&s.counts)
            .map(|(l, c)| format!("{l}:{c}"))
            .collect::<Vec<_>>()
            .join(" "),
        s.out.display()
    );
    if !s.candidates.is_empty() {
        println!(
            "  auto: chose {} by {} cross-validation:",
            s.head, s.cv_method
        );
        for c in &s.candidates {
            println!(
                "    {:<9} {:>6.1}%{}",
                c.head.to_string(),
                c.cv_accuracy * 100.0,
                if c.head == s.head { "  <- chosen" } else { "" }
            );
        }
    } else {
        println!(
            "  {} cross-validation accuracy {:.1}%",
            s.cv_method,
            s.cv_accuracy * 100.0
        );
    }
    println!(
        "  threshold {:.3} (scores below are `unknown`), temperature {:.3}",
        s.threshold, s.temperature
    );
    if let (Some(k), Some(n)) = (s.known_accepted, s.novel_rejected) {
        println!(
            "  {}: on training data it accepts {:.0}% of known objects and rejects {:.0}% of left-out classes",
            s.calibration,
            k * 100.0,
            n * 100.0
        );
    }
    println!(
        "  embedding {:.2}s ({} new, {} from cache), fitting {:.2}s",
        s.embed_seconds, s.embedded, s.cached, s.fit_seconds
    );
    Ok(())
}

fn fit_and_write(
    out: &Path,
    bb: &Backbone,
    choice: Option<HeadKind>,
    labels: &[String],
    examples: Vec<Example>,
    seed: u64,
) -> anyhow::Result<(HeadFile, head::Trained, f64)> {
    let start = Instant::now();
    let (file, trained) = headfile::fit(bb.id(), choice, labels, examples, seed)?;
    let fit_seconds = start.elapsed().as_secs_f64();
    headfile::write(out, &file)?;
    Ok((file, trained, fit_seconds))
}

fn candidates(t: &head::Trained) -> Vec<Candidate> {
    t.candidates
        .iter()
        .map(|r| Candidate {
            head: r.kind,
            cv_accuracy: r.accuracy,
            method: r.method.clone(),
        })
        .collect()
}

pub fn train(g: &Global, a: TrainArgs) -> anyhow::Result<()> {
    let choice = parse_choice(&a.head)?;
    let ds = ImageFolder::scan(&a.dataset)?;
    if ds.labels.len() < 2 {
        bail!(
            "{}: found only the class {:?}; a head needs at least 2 class folders",
            a.dataset.display(),
            ds.labels
        );
    }
    let bb = super::load_backbone(g)?;
    let mut cache = a.cache.open(&bb)?;
    let paths: Vec<PathBuf> = ds.items.iter().map(|(p, _)| p.clone()).collect();
    let (embedded, hits, embed_seconds) = embed_folder(&bb, &paths, cache.as_mut())?;
    let examples: Vec<Example> = ds
        .items
        .iter()
        .zip(embedded)
        .map(|((path, label), e)| Example {
            label: *label,
            path: path.clone(),
            sha256: e.sha256,
            embedding: e.embedding,
        })
        .collect();
    let (file, trained, fit_seconds) =
        fit_and_write(&a.out, &bb, choice, &ds.labels, examples, a.seed)?;
    print_train_summary(
        g,
        &summary(
            &a.out,
            &file,
            &trained,
            &bb,
            paths.len() - hits,
            hits,
            embed_seconds,
            fit_seconds,
        ),
    )
}

#[allow(clippy::too_many_arguments)]
fn summary<'a>(
    out: &'a Path,
    file: &'a HeadFile,
    trained: &head::Trained,
    bb: &'a Backbone,
    embedded: usize,
    cached: usize,
    embed_seconds: f64,
    fit_seconds: f64,
) -> TrainSummary<'a> {
    TrainSummary {
        out,
        head: file.head.kind,
        labels: &file.head.labels,
        counts: file.counts(),
        examples: file.examples.len(),
        cv_method: trained.report.method.clone(),
        cv_accuracy: trained.report.accuracy,
        candidates: candidates(trained),
        temperature: file.head.temperature,
        threshold: file.head.threshold,
        calibration: trained.calibration.method,
        known_accepted: trained.calibration.known_accepted,
        novel_rejected: trained.calibration.novel_rejected,
        model: &bb.id().name,
        embedded,
        cached,
        embed_seconds,
        fit_seconds,
    }
}

/// Loads a head file and the backbone it was trained with (or `--model`, if compatible).
pub fn load_head(g: &Global, path: &Path) -> anyhow::Result<(HeadFile, Backbone)> {
    let file = headfile::read(path)?;
    let bb = super::load_backbone_or(g, &file.backbone.name)?;
    if !bb.id().compatible(&file.backbone) {
        bail!(
            "{}: head was trained on backbone {} (sha256 {}…, {}-d) but {} (sha256 {}…) is loaded; \
             use --model {} or retrain",
            path.display(),
            file.backbone.name,
            &file.backbone.sha256[..12.min(file.backbone.sha256.len())],
            file.backbone.dim,
            bb.id().name,
            &bb.id().sha256[..12],
            file.backbone.name
        );
    }
    Ok((file, bb))
}

#[derive(Serialize)]
struct PredictLine<'a> {
    path: &'a Path,
    #[serde(flatten)]
    prediction: &'a head::Prediction,
}

pub fn predict(g: &Global, a: PredictArgs) -> anyhow::Result<()> {
    if let Some(t) = a.threshold {
        if !(0.0..=1.0).contains(&t) {
            bail!("--threshold {t} is outside [0, 1]");
        }
    }
    let images = collect_images(&a.paths)?;
    let Some(head_path) = &a.head else {
        return predict_exported(g, &a, &images);
    };
    let (file, bb) = load_head(g, head_path)?;
    for path in &images {
        let e = bb
            .embed_file(path)
            .with_context(|| format!("predicting {}", path.display()))?;
        let p = file.head.predict(&e.vector, a.threshold, a.top)?;
        print_prediction(g, path, &p)?;
    }
    Ok(())
}

fn print_prediction(g: &Global, path: &Path, p: &head::Prediction) -> anyhow::Result<()> {
    if g.json {
        return output::json_line(&PredictLine {
            path,
            prediction: p,
        });
    }
    let guess = if p.unknown {
        format!(" (best guess {} {:.3})", p.best, p.score)
    } else {
        String::new()
    };
    let top: Vec<String> = p
        .top
        .iter()
        .map(|t| format!("{} {:.3}", t.label, t.score))
        .collect();
    println!(
        "{}: {} {:.3}{}  [{}]",
        path.display(),
        p.label,
        p.score,
        guess,
        top.join(", ")
    );
    Ok(())
}

/// `predict --model EXPORTED.onnx`: the exported file's output is the head's scores; labels and
/// threshold come from its metadata.
fn predict_exported(g: &Global, a: &PredictArgs, images: &[PathBuf]) -> anyhow::Result<()> {
    let model = g.model.as_deref().unwrap_or_default();
    if !model.ends_with(".onnx") {
        bail!("predict needs --head HEAD.graft, or --model EXPORTED.onnx (a file written by `graft export`)");
    }
    let bb = super::load_backbone(g)?;
    let meta = bb
        .exported()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{model}: not a graft export"))?;
    for path in images {
        let out = bb
            .embed_file(path)
            .with_context(|| format!("predicting {}", path.display()))?;
        let probs = if meta.output == "logits" {
            graft::backbone::softmax(&out.vector)
        } else {
            out.vector
        };
        let p = head::Prediction::from_scores(
            &meta.labels,
            &probs,
            a.threshold.unwrap_or(meta.threshold),
            a.top,
        );
        print_prediction(g, path, &p)?;
    }
    Ok(())
}

pub fn add(g: &Global, a: AddArgs) -> anyhow::Result<()> {
    let label = a.label.trim();
    if label.is_empty() || label.eq_ignore_ascii_case(head::UNKNOWN) {
        bail!("--label {:?} is not a usable class name", a.label);
    }
    let (mut file, bb) = load_head(g, &a.head)?;
    let images = collect_images(&a.paths)?;
    let mut cache = a.cache.open(&bb)?;
    let (embedded, hits, embed_seconds) = embed_folder(&bb, &images, cache.as_mut())?;
    let mut labels = file.head.labels.clone();
    let added = headfile::add_examples(
        &mut labels,
        &mut file.examples,
        label,
        images
            .iter()
            .zip(embedded)
            .map(|(path, e)| (path.clone(), e.sha256, e.embedding)),
    );
    let kind = file.head.kind;
    let (file, trained, fit_seconds) =
        fit_and_write(&a.head, &bb, Some(kind), &labels, file.examples, 0)?;
    if !g.json {
        println!(
            "added {added} examples of {label:?} ({} skipped as duplicates)",
            images.len() - added
        );
    }
    print_train_summary(
        g,
        &summary(
            &a.head,
            &file,
            &trained,
            &bb,
            images.len() - hits,
            hits,
            embed_seconds,
            fit_seconds,
        ),
    )
}

/// A labelled set of unit vectors with groups, ready for splitting.
struct Data {
    labels: Vec<String>,
    x: Vec<Vec<f32>>,
    y: Vec<usize>,
    groups: Vec<String>,
}

fn load_dataset(
    g: &Global,
    dataset: &Path,
    cache: &CacheArgs,
) -> anyhow::Result<(Data, ImageFolder, Backbone)> {
    let ds = ImageFolder::scan(dataset)?;
    if ds.labels.len() < 2 {
        bail!("{}: need at least 2 class folders", dataset.display());
    }
    let bb = super::load_backbone(g)?;
    let mut c = cache.open(&bb)?;
    let paths: Vec<PathBuf> = ds.items.iter().map(|(p, _)| p.clone()).collect();
    let (embedded, _, _) = embed_folder(&bb, &paths, c.as_mut())?;
    let data = Data {
        labels: ds.labels.clone(),
        x: embedded
            .iter()
            .map(|e| head::normalize(&e.embedding))
            .collect(),
        y: ds.items.iter().map(|(_, l)| *l).collect(),
        groups: ds
            .items
            .iter()
            .map(|(p, l)| format!("{l}/{}", group_key(p)))
            .collect(),
    };
    Ok((data, ds, bb))
}

/// Few-shot split: `shots` examples per class for training, the rest for testing, minus test
/// images of a group (the same object) that is in the training set.
fn few_shot_split(
    d: &Data,
    shots: usize,
    rng: &mut rand::rngs::StdRng,
) -> Option<(Vec<usize>, Vec<usize>)> {
    let mut train = Vec::new();
    for c in 0..d.labels.len() {
        let mut idx: Vec<usize> = (0..d.y.len()).filter(|i| d.y[*i] == c).collect();
        if idx.len() <= shots {
            return None;
        }
        idx.shuffle(rng);
        train.extend_from_slice(&idx[..shots]);
    }
    let used: std::collections::HashSet<&str> =
        train.iter().map(|i| d.groups[*i].as_str()).collect();
    let test: Vec<usize> = (0..d.y.len())
        .filter(|i| !train.contains(i) && !used.contains(d.groups[*i].as_str()))
        .collect();
    if test.is_empty() {
        return None;
    }
    Some((train, test))
}

/// Group-aware stratified folds.
fn kfold_splits(d: &Data, k: usize, seed: u64) -> Vec<(Vec<usize>, Vec<usize>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut fold_of = vec![0usize; d.y.len()];
    for c in 0..d.labels.len() {
        let mut groups: Vec<&str> = (0..d.y.len())
            .filter(|i| d.y[*i] == c)
            .map(|i| d.groups[i].as_str())
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups.shuffle(&mut rng);
        for (j, gname) in groups.iter().enumerate() {
            for (fold, group) in fold_of.iter_mut().zip(&d.groups) {
                if group == gname {
                    *fold = j % k;
                }
            }
        }
    }
    (0..k)
        .map(|f| {
            let train = (0..d.y.len()).filter(|i| fold_of[*i] != f).collect();
            let test = (0..d.y.len()).filter(|i| fold_of[*i] == f).collect();
            (train, test)
        })
        .filter(|(tr, te): &(Vec<usize>, Vec<usize>)| !tr.is_empty() && !te.is_empty())
        .collect()
}

/// Fits on `train` and returns (predicted class per test item, head kind, fit seconds).
fn run_split(
    x: &[Vec<f32>],
    d: &Data,
    choice: Option<HeadKind>,
    train: &[usize],
    test: &[usize],
    seed: u64,
) -> anyhow::Result<(Vec<usize>, HeadKind, f64)> {
    let tx: Vec<Vec<f32>> = train.iter().map(|i| x[*i].clone()).collect();
    let ty: Vec<usize> = train.iter().map(|i| d.y[*i]).collect();
    let start = Instant::now();
    let (model, kind) = match choice {
        Some(k) => (
            head::fit(k, &tx, &ty, d.labels.len(), &HeadParams::default())?,
            k,
        ),
        None => {
            let keys: Vec<&str> = train.iter().map(|i| d.groups[*i].as_str()).collect();
            let groups = group_ids(&keys);
            let t = head::train(
                None,
                &tx,
                &ty,
                &groups,
                &d.labels,
                &HeadParams::default(),
                seed,
            )?;
            let k = t.head.kind;
            (t.head.model, k)
        }
    };
    let fit_seconds = start.elapsed().as_secs_f64();
    let preds = test
        .iter()
        .map(|i| {
            let l = model.logits(&x[*i]);
            (0..l.len())
                .max_by(|a, b| l[*a].total_cmp(&l[*b]))
                .unwrap_or(0)
        })
        .collect();
    Ok((preds, kind, fit_seconds))
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
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
    let (d, _, _) = load_dataset(g, &a.dataset, &a.cache)?;
    let splits: Vec<(Vec<usize>, Vec<usize>)>;
    let mode;
    if let Some(shots) = a.shots {
        if shots == 0 {
            bail!("--shots must be at least 1");
        }
        let mut s = Vec::new();
        for t in 0..a.trials {
            let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed.wrapping_add(t as u64));
            match few_shot_split(&d, shots, &mut rng) {
                Some(split) => s.push(split),
                None => bail!(
                    "{}: every class needs more than {shots} images for a {shots}-shot split",
                    a.dataset.display()
                ),
            }
        }
        splits = s;
        mode = format!("{shots}-shot x {} trials", a.trials);
    } else {
        let k = a.folds.unwrap_or(5);
        if k < 2 {
            bail!("--folds must be at least 2");
        }
        splits = kfold_splits(&d, k, a.seed);
        mode = format!("{k}-fold (grouped, stratified)");
    }
    let mut confusion = Confusion::new(d.labels.clone());
    let mut accs = Vec::new();
    let mut chosen = Vec::new();
    let mut fit_seconds = Vec::new();
    let bar = output::progress(splits.len(), "evaluating");
    for (i, (train, test)) in splits.iter().enumerate() {
        let (preds, kind, secs) =
            run_split(&d.x, &d, choice, train, test, a.seed.wrapping_add(i as u64))?;
        fit_seconds.push(secs);
        let mut right = 0;
        for (t, p) in test.iter().zip(&preds) {
            confusion.add(d.y[*t], Some(*p));
            right += usize::from(d.y[*t] == *p);
        }
        accs.push(right as f64 / test.len() as f64);
        chosen.push(kind);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (m, s) = mean_std(&accs);
    let title = format!(
        "graft eval: {} head, {mode}, closed-set accuracy {:.1}%",
        a.head,
        m * 100.0
    );
    if let Some(p) = &a.plot {
        graft::plot::confusion_svg(p, &confusion, &title)?;
    }
    let report = EvalReport {
        dataset: &a.dataset,
        head: a.head.clone(),
        mode,
        splits: accs.len(),
        accuracy: m,
        accuracy_std: s,
        split_accuracies: accs,
        fit_seconds_mean: mean_std(&fit_seconds).0,
        chosen_heads: chosen,
        per_class: confusion.per_class(),
        confusion: &confusion,
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
    print!("{}", confusion.to_text());
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
    let (d, ds, _) = load_dataset(g, &a.dataset, &a.cache)?;
    // The from-scratch baseline: the same heads on raw downscaled pixels.
    let pixels: Vec<Vec<f32>> = ds
        .items
        .iter()
        .map(|(p, _)| preprocess::decode_file(p).map(|f| preprocess::pixel_features(&f, 32)))
        .collect::<Result<_, _>>()?;
    let mut points = Vec::new();
    let bar = output::progress(a.shots.len() * kinds.len() * 2, "learning curve");
    for &shots in &a.shots {
        for features in ["backbone", "pixels"] {
            let x = if features == "backbone" {
                &d.x
            } else {
                &pixels
            };
            for &kind in &kinds {
                let mut accs = Vec::new();
                for t in 0..a.trials {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed.wrapping_add(t as u64));
                    let Some((train, test)) = few_shot_split(&d, shots, &mut rng) else {
                        break;
                    };
                    let (preds, _, _) = run_split(x, &d, Some(kind), &train, &test, a.seed)?;
                    let right = test
                        .iter()
                        .zip(&preds)
                        .filter(|(t, p)| d.y[**t] == **p)
                        .count();
                    accs.push(right as f64 / test.len() as f64);
                }
                bar.inc(1);
                if accs.is_empty() {
                    continue; // not enough images for this many shots
                }
                let (m, s) = mean_std(&accs);
                points.push(CurvePoint {
                    features,
                    head: kind,
                    shots,
                    accuracy: m,
                    std: s,
                    trials: accs.len(),
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
    let chance = 1.0 / d.labels.len() as f64;
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
            d.labels.len()
        );
        graft::plot::curve_svg(p, &series, &title, chance)?;
    }
    let report = CurveReport {
        dataset: &a.dataset,
        classes: d.labels.len(),
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
