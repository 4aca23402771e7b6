//! `graft train DATASET --out HEAD`: embed an image folder, fit a head, write it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Args;

use super::{embed_dataset, parse_choice, print_train_summary, summary, CacheArgs, FinetuneArgs};
use crate::Global;
use graft::head::{HeadParams, DEFAULT_POWER};
use graft::store::dataset::ImageFolder;
use graft::store::headfile;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Image folder: DATASET/<label>/*.jpg (sub-folders searched recursively).
    dataset: PathBuf,
    /// Where to write the head file (e.g. kiosk.graft).
    #[arg(long)]
    out: PathBuf,
    /// Head type: auto (chosen by cross-validation), logistic, centroid, knn, bayes, or
    /// finetune (fine-tunes the backbone's top block; needs a model cut before it, e.g.
    /// `--model efficientnet-lite0:top`, where auto tries it too).
    #[arg(long, default_value = "auto")]
    head: String,
    /// Feature transform: every embedding value to this power before L2 normalisation, in
    /// (0, 1] (1: none; stored in the head, applied by every front end and by exports).
    #[arg(long, default_value_t = DEFAULT_POWER)]
    power: f32,
    /// Seed for the cross-validation folds.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    finetune: FinetuneArgs,
    #[command(flatten)]
    cache: CacheArgs,
}

pub fn train(g: &Global, a: TrainArgs) -> anyhow::Result<()> {
    let choice = parse_choice(&a.head)?;
    let params = a.finetune.apply(HeadParams {
        power: a.power,
        ..HeadParams::default()
    });
    // Before any embedding: the one place a head's parameters are checked.
    params.validate()?;
    let ds = ImageFolder::scan(&a.dataset)?;
    if ds.labels.len() < 2 {
        bail!(
            "{}: found only the class {:?}; a head needs at least 2 class folders",
            a.dataset.display(),
            ds.labels
        );
    }
    let bb = crate::load_backbone(g)?;
    if choice == Some(graft::head::HeadKind::Finetune) && bb.top_block().is_none() {
        bail!(
            "--head finetune trains the backbone's top block: add :top to the model, e.g. --model {}:top",
            bb.id().name
        );
    }
    let params = HeadParams {
        top: bb.top_block().cloned().map(std::sync::Arc::new),
        ..params
    };
    let mut cache = a.cache.open(&bb)?;
    let (set, hits, embed_seconds) = embed_dataset(&bb, &ds, cache.as_mut())?;
    let start = Instant::now();
    let (file, trained) = set.fit(bb.id(), choice, &params, a.seed)?;
    let fit_seconds = start.elapsed().as_secs_f64();
    headfile::write(&a.out, &file)?;
    print_train_summary(
        g,
        &summary(
            &a.out,
            &file,
            &trained,
            &bb,
            ds.items.len() - hits,
            hits,
            embed_seconds,
            fit_seconds,
        ),
    )
}
