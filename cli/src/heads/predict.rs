//! `graft predict --head HEAD PATH...` (or `--model EXPORTED.onnx`): a label per image.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::load_head;
use crate::{output, Global};
use graft::head;
use graft::store::files::collect_images;

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

#[derive(Serialize)]
struct PredictLine<'a> {
    path: &'a Path,
    #[serde(flatten)]
    prediction: &'a head::Prediction,
}

pub fn predict(g: &Global, a: PredictArgs) -> anyhow::Result<()> {
    if let Some(t) = a.threshold {
        head::validate_threshold(t).context("--threshold")?;
    }
    let images = collect_images(&a.paths)?;
    let Some(head_path) = &a.head else {
        return predict_exported(g, &a, &images);
    };
    let (file, bb) = load_head(g, head_path)?;
    each_image(&images, |path| {
        let e = bb
            .embed_file(path)
            .with_context(|| format!("predicting {}", path.display()))?;
        let p = file.head.predict(&e.vector, a.threshold, a.top)?;
        print_prediction(g, path, &p)
    })
}

/// Runs `one` on every image. A picture that fails is reported on stderr (one line naming it)
/// and the others are still predicted, as ripgrep goes on past an unreadable file; if any
/// failed, the result is an error saying how many, so the exit code is not 0.
fn each_image(
    images: &[PathBuf],
    mut one: impl FnMut(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut failed = 0;
    for path in images {
        if let Err(e) = one(path) {
            failed += 1;
            eprintln!("graft: error: {}", crate::one_line(&e));
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be predicted (see above)",
            images.len()
        );
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
        output::path_text(path),
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
    let bb = crate::load_backbone(g)?;
    let meta = bb
        .exported()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{model}: not a graft export"))?;
    each_image(images, |path| {
        let s = bb
            .score_file(path)
            .with_context(|| format!("predicting {}", path.display()))?;
        let p = head::Prediction::from_scores(
            &meta.labels,
            &s.probabilities,
            a.threshold.unwrap_or(meta.threshold),
            a.top,
        );
        print_prediction(g, path, &p)
    })
}
