//! A head leaving the device: one ONNX model (backbone cut at its features + the head as ONNX
//! operators) or the head alone as JSON (docs/export.md). `graft export` and the kiosk's web
//! page both call [`export`].

use std::path::Path;

use serde::Serialize;

use super::headfile::HeadFile;
use crate::backbone::export::{ExportHead, HeadOps};
use crate::backbone::manifest::InputSpec;
use crate::backbone::{Backbone, BackboneError, BackboneId};
use crate::head::HeadError;

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One ONNX model: backbone + head.
    Onnx,
    /// The head alone (labels, weights or examples, temperature, threshold) as JSON.
    Json,
}

/// Export failures.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The head was trained on another backbone file.
    #[error("{}: head was trained on backbone {trained} (sha256 {sha}…) but {loaded} is loaded; export needs the very same backbone file", path.display())]
    OtherBackbone {
        /// The head file.
        path: std::path::PathBuf,
        /// The backbone it names.
        trained: String,
        /// The start of that backbone's sha256.
        sha: String,
        /// The backbone loaded.
        loaded: String,
    },
    /// Writing the ONNX model failed.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// The head cannot be written as operators.
    #[error(transparent)]
    Head(#[from] HeadError),
    /// Serialising the JSON failed.
    #[error("writing the head as JSON: {0}")]
    Json(String),
}

/// The JSON form of a head (`graft export --format json`), documented in docs/export.md.
#[derive(Serialize)]
struct JsonHead<'a> {
    graft_head_json: u32,
    kind: String,
    labels: &'a [String],
    temperature: f32,
    threshold: f32,
    backbone: &'a BackboneId,
    preprocess: &'a InputSpec,
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

/// The bytes of `file`'s head exported on `bb` (which must be the backbone file it was
/// trained on); `path` names the head in errors. `probabilities`: the ONNX model outputs
/// scores (else temperature-scaled logits).
pub fn export(
    bb: &Backbone,
    file: &HeadFile,
    path: &Path,
    format: Format,
    probabilities: bool,
) -> Result<Vec<u8>, ExportError> {
    if bb.id().sha256 != file.backbone.sha256 {
        return Err(ExportError::OtherBackbone {
            path: path.to_path_buf(),
            trained: file.backbone.name.clone(),
            sha: file.backbone.sha256.chars().take(12).collect(),
            loaded: bb.id().name.clone(),
        });
    }
    let h = &file.head;
    let ops = h.export_ops()?;
    let top = h.model.top_block().map(|(b, _)| b.clone());
    Ok(match format {
        Format::Onnx => bb.export_with_head(&ExportHead {
            ops,
            labels: h.labels.clone(),
            temperature: h.temperature,
            threshold: h.threshold,
            kind: h.kind.to_string(),
            probabilities,
            power: h.params.power,
            top,
        })?,
        Format::Json if top.is_some() => {
            return Err(ExportError::Head(crate::head::HeadError::NotEnoughData(format!(
                "a {} head runs the backbone's top block before its classifier: export it as ONNX (--format onnx), which carries the block",
                h.kind
            ))))
        }
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
            match &ops {
                HeadOps::Linear { weights, bias } => {
                    j.weights = Some(rows(weights));
                    j.bias = Some(bias);
                }
                HeadOps::Knn {
                    k,
                    examples,
                    labels,
                } => {
                    j.k = Some(*k);
                    j.examples = Some(rows(examples));
                    j.example_labels = Some(labels);
                }
            }
            serde_json::to_vec_pretty(&j).map_err(|e| ExportError::Json(e.to_string()))?
        }
    })
}
