//! `graft export`: the grafted model leaves the device — one ONNX file (backbone + head) or the
//! head alone as JSON.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{output, Global};
use graft::backbone::export::{ExportHead, HeadOps};
use graft::store::{headfile, write_atomic};

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

/// The JSON form of a head (`graft export --format json`), documented in docs/export.md.
#[derive(Serialize)]
struct JsonHead<'a> {
    graft_head_json: u32,
    kind: String,
    labels: &'a [String],
    temperature: f32,
    threshold: f32,
    backbone: &'a graft::backbone::BackboneId,
    preprocess: &'a graft::backbone::manifest::InputSpec,
    /// The power transform, when there is one: x ← sign(x)·|x|^power before x̂ = x/‖x‖.
    #[serde(skip_serializing_if = "Option::is_none")]
    power: Option<f32>,
    /// Linear heads: `classes × dim` row-major; scores = softmax(T · (W·x̂ + b)), x̂ = x/‖x‖.
    #[serde(skip_serializing_if = "Option::is_none")]
    weights: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bias: Option<&'a [f32]>,
    /// k-NN: unit examples and their class ids; logits_c = Σ over the k most similar examples of
    /// class c of (1 + cosine) / k.
    #[serde(skip_serializing_if = "Option::is_none")]
    k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    examples: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    example_labels: Option<&'a [usize]>,
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
    crate::refuse_unless_regular(&a.head)?;
    let file = headfile::read(&a.head)?;
    let bb = super::load_backbone_or(g, &file.backbone.name)?;
    if bb.id().sha256 != file.backbone.sha256 {
        bail!(
            "{}: head was trained on backbone {} (sha256 {}…) but {} is loaded; export needs the very same backbone file",
            a.head.display(),
            file.backbone.name,
            &file.backbone.sha256[..12.min(file.backbone.sha256.len())],
            bb.id().name
        );
    }
    let h = &file.head;
    let ops = h.export_ops()?;
    let bytes = match a.format {
        Format::Onnx => bb.export_with_head(&ExportHead {
            ops,
            labels: h.labels.clone(),
            temperature: h.temperature,
            threshold: h.threshold,
            kind: h.kind.to_string(),
            probabilities: a.probabilities || !a.logits,
            power: h.params.power,
        })?,
        Format::Json => {
            let dim = bb.id().dim;
            let rows = |v: &[f32]| v.chunks_exact(dim).map(<[f32]>::to_vec).collect::<Vec<_>>();
            let mut j = JsonHead {
                graft_head_json: 1,
                kind: h.kind.to_string(),
                labels: &h.labels,
                temperature: h.temperature,
                threshold: h.threshold,
                backbone: bb.id(),
                preprocess: &bb.manifest().input,
                power: (h.params.power != 1.0).then_some(h.params.power),
                weights: None,
                bias: None,
                k: None,
                examples: None,
                example_labels: None,
            };
            let bias_store;
            let labels_store;
            match &ops {
                HeadOps::Linear { weights, bias } => {
                    j.weights = Some(rows(weights));
                    bias_store = bias.clone();
                    j.bias = Some(&bias_store);
                }
                HeadOps::Knn {
                    k,
                    examples,
                    labels,
                } => {
                    j.k = Some(*k);
                    j.examples = Some(rows(examples));
                    labels_store = labels.clone();
                    j.example_labels = Some(&labels_store);
                }
            }
            serde_json::to_vec_pretty(&j)?
        }
    };
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
