//! `graft train | predict | add | eval | curve`: few-shot heads on backbone embeddings, one
//! file per command; what they share (the cache flags, embedding a list of images with a
//! progress bar, loading a head with its backbone, the training summary) is here.

mod add;
mod eval;
mod predict;
mod train;

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::{output, Global};
use graft::backbone::Backbone;
use graft::head::{self, HeadKind, HeadParams};
use graft::store::cache::Cache;
use graft::store::dataset::{embed_cached, Embedded, ImageFolder};
use graft::store::headfile::{self, HeadFile};
use graft::store::learn::ExampleSet;

pub use add::{add, AddArgs};
pub use eval::{curve, eval, CurveArgs, EvalArgs};
pub use predict::{predict, PredictArgs};
pub use train::{train, TrainArgs};

/// `--head` for training: a kind or `auto`.
fn parse_choice(s: &str) -> anyhow::Result<Option<HeadKind>> {
    if s.eq_ignore_ascii_case("auto") {
        Ok(None)
    } else {
        Ok(Some(s.parse()?))
    }
}

/// Fine-tuning's hyper-parameters (`--head finetune`, and `auto` on a `NAME:top` model).
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// Fine-tuning: rank of the change to the top block's weights (1-256).
    #[arg(long, default_value_t = HeadParams::default().finetune_rank)]
    finetune_rank: usize,
    /// Fine-tuning: L2-SP penalty on the block's distance from its pretrained weights.
    #[arg(long, default_value_t = HeadParams::default().finetune_l2sp)]
    finetune_l2sp: f64,
    /// Fine-tuning: Adam's step size (the top block alone, NAME:top).
    #[arg(long, default_value_t = HeadParams::default().finetune_lr)]
    finetune_lr: f64,
    /// Fine-tuning one block deeper (NAME:deep): Adam's step size.
    #[arg(long, default_value_t = HeadParams::default().finetune_deep_lr)]
    finetune_deep_lr: f64,
    /// Fine-tuning: epochs [default: chosen by grouped cross-validation among 0, 5, 10, 20,
    /// 30; one block deeper (NAME:deep), 10].
    #[arg(long)]
    finetune_epochs: Option<usize>,
}

impl FinetuneArgs {
    /// `params` with these set.
    fn apply(&self, params: HeadParams) -> HeadParams {
        HeadParams {
            finetune_rank: self.finetune_rank,
            finetune_l2sp: self.finetune_l2sp,
            finetune_lr: self.finetune_lr,
            finetune_deep_lr: self.finetune_deep_lr,
            finetune_epochs: self.finetune_epochs,
            ..params
        }
    }
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Embedding cache folder [default: $XDG_CACHE_HOME/graft or ~/.cache/graft].
    #[arg(long, env = "GRAFT_CACHE")]
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
        let dir = self.cache.clone().unwrap_or_else(default_cache_dir);
        Ok(Some(Cache::open(&dir, bb.id())?))
    }
}

/// `$XDG_CACHE_HOME/graft`, else `~/.cache/graft`, else `.graft-cache`.
fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("graft");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".cache").join("graft");
    }
    PathBuf::from(".graft-cache")
}

/// Embeds a labelled folder into examples through the cache, with a progress bar: (examples,
/// cache hits, seconds).
fn embed_dataset(
    bb: &Backbone,
    ds: &ImageFolder,
    cache: Option<&mut Cache>,
) -> anyhow::Result<(ExampleSet, usize, f64)> {
    let start = Instant::now();
    let bar = output::progress(ds.items.len(), "embedding");
    let (set, hits) = ds.embed(bb, cache, |d| bar.set_position(d as u64))?;
    bar.finish_and_clear();
    Ok((set, hits, start.elapsed().as_secs_f64()))
}

/// Embeds a list of images through the cache, with a progress bar.
fn embed_folder(
    bb: &Backbone,
    paths: &[PathBuf],
    cache: Option<&mut Cache>,
) -> anyhow::Result<(Vec<Embedded>, usize, f64)> {
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
    /// `--head auto`: why the head was chosen and how sure.
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_reason: Option<String>,
    /// The feature transform (power) the head applies.
    power: f32,
    temperature: f32,
    /// Why the temperature is the head kind's default rather than fitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature_fallback: Option<String>,
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
        // The comparison's folds: the candidates' (on a cut model, fine-tuning's folds for
        // all), which the chosen head's own report need not share.
        let method = s
            .candidates
            .iter()
            .find(|c| c.head == s.head)
            .map_or(s.cv_method.as_str(), |c| c.method.as_str());
        println!("  auto: chose {} by {method} cross-validation:", s.head);
        if let Some(r) = &s.auto_reason {
            println!("    {r}");
        }
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
    if let Some(why) = &s.temperature_fallback {
        println!("  temperature not fitted: {why}");
    }
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
        auto_reason: trained.reason.clone(),
        power: file.head.params.power,
        temperature: file.head.temperature,
        temperature_fallback: trained.calibration.temperature_fallback.clone(),
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
    if let Err(e) = bb.id().check_file(&file.backbone, path) {
        anyhow::bail!("{e} (--model {})", file.backbone.name);
    }
    Ok((file, bb))
}
