//! `graft export`: the grafted model leaves the device — one ONNX file (backbone + head) or the
//! head alone as JSON.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{output, Global};
use graft::store::{export, headfile, write_atomic};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// One ONNX model: backbone cut at its feature node + the head as ONNX operators.
    Onnx,
    /// The head alone (labels, weights or examples, temperature, threshold) as JSON.
    Json,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Head file to export.
    #[arg(long)]
    head: PathBuf,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value = "onnx")]
    format: Format,
    /// Output temperature-scaled logits instead of probabilities (softmax of them = the scores).
    #[arg(long)]
    logits: bool,
    /// Output probabilities (the default).
    #[arg(long, conflicts_with = "logits")]
    probabilities: bool,
}

#[derive(Serialize)]
struct Summary<'a> {
    out: &'a Path,
    format: &'static str,
    head: String,
    classes: usize,
    bytes: usize,
    backbone: &'a str,
}

pub fn run(g: &Global, a: ExportArgs) -> anyhow::Result<()> {
    let file = headfile::read(&a.head)?;
    let bb = super::load_backbone_or(g, &file.backbone.name)?;
    let h = &file.head;
    let format = match a.format {
        Format::Onnx => export::Format::Onnx,
        Format::Json => export::Format::Json,
    };
    let bytes = export::export(&bb, &file, &a.head, format, a.probabilities || !a.logits)?;
    write_atomic(&a.out, |w| w.write_all(&bytes))?;
    let s = Summary {
        out: &a.out,
        format: match a.format {
            Format::Onnx => "onnx",
            Format::Json => "json",
        },
        head: h.kind.to_string(),
        classes: h.labels.len(),
        bytes: bytes.len(),
        backbone: &bb.id().name,
    };
    if g.json {
        output::json_line(&s)?;
    } else {
        println!(
            "exported {} head ({} classes) on {} to {} ({}, {:.1} MB)",
            s.head,
            s.classes,
            s.backbone,
            s.out.display(),
            s.format,
            s.bytes as f64 / 1e6
        );
    }
    Ok(())
}
