//! Models written by `graft export`, read back: their metadata (labels, threshold,
//! preprocessing, the backbone they were cut from) and their answer for a picture, class scores,
//! which has its own type ([`ClassScores`]) rather than travelling as an embedding.
//! Writing them is [`super::export`]; this module only reads, so the manifest (which opens an
//! exported file as a model) and the writer both depend on it and not on each other.

use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};
use tract_onnx::pb;

use super::preprocess::InputSpec;
use super::{softmax, Backbone, BackboneError, FieldError};

/// Metadata key prefix of graft exports.
pub const META_PREFIX: &str = "graft.";
/// Name of the exported output.
pub const OUTPUT: &str = "scores";

/// What a graft export says about itself (read back from `metadata_props`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportMeta {
    /// Class names, in output order.
    pub labels: Vec<String>,
    /// Threshold under which the best score means `unknown` (on probabilities).
    pub threshold: f32,
    /// `probabilities` or `logits`.
    pub output: String,
    /// Head type.
    pub head: String,
    /// Preprocessing the backbone expects.
    pub preprocess: InputSpec,
    /// The backbone's manifest name and sha256.
    pub backbone: String,
    /// sha256 of the backbone ONNX file the head was trained on.
    pub backbone_sha256: String,
}

impl ExportMeta {
    /// The one check of an export's metadata (field names as stored, `graft.*`): at least one
    /// label, a threshold in [0, 1], an output of `probabilities` or `logits`, and the
    /// preprocessing a manifest would need ([`InputSpec::validate`]). [`read_meta`] runs it, and
    /// the writer runs it before writing, so an export graft writes is one graft reads.
    pub fn validate(&self) -> Result<(), FieldError> {
        let field = |k: &str| format!("{META_PREFIX}{k}");
        if self.labels.is_empty() {
            return Err(FieldError::new(
                field("labels"),
                &self.labels,
                "must name at least one class",
            ));
        }
        FieldError::check_probability(&field("threshold"), self.threshold)?;
        if !matches!(self.output.as_str(), "probabilities" | "logits") {
            return Err(FieldError::new(
                field("output"),
                &self.output,
                "must be probabilities or logits",
            ));
        }
        self.preprocess
            .validate()
            .map_err(|e| e.within(&field("preprocess")))
    }
}

fn bad(model: &str, reason: impl Into<String>) -> BackboneError {
    BackboneError::Load {
        model: model.to_string(),
        reason: reason.into(),
    }
}

/// Reads graft's metadata from an exported ONNX file's bytes; `None` if it is not a graft
/// export. The protobuf is decoded here; the metadata is [`ExportMeta::from_metadata`].
pub fn read_meta(onnx: &[u8], origin: &str) -> Result<Option<ExportMeta>, BackboneError> {
    let model =
        pb::ModelProto::decode(onnx).map_err(|e| bad(origin, format!("not an ONNX file: {e}")))?;
    let props: Vec<(&str, &str)> = model
        .metadata_props
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str()))
        .collect();
    ExportMeta::from_metadata(&props, origin)
}

impl ExportMeta {
    /// The metadata entries (`graft.*` key, value) an export carries: what
    /// [`ExportMeta::from_metadata`] reads back into the same `ExportMeta`. The one writer,
    /// used by [`super::export`].
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        let entries = [
            ("format", "1".to_string()),
            (
                "labels",
                serde_json::to_string(&self.labels).unwrap_or_default(),
            ),
            ("threshold", self.threshold.to_string()),
            ("output", self.output.clone()),
            ("head", self.head.clone()),
            (
                "preprocess",
                serde_json::to_string(&self.preprocess).unwrap_or_default(),
            ),
            ("backbone", self.backbone.clone()),
            ("backbone_sha256", self.backbone_sha256.clone()),
            (
                "preprocess_doc",
                format!(
                    "decode to RGB honouring EXIF orientation; resize shorter side to {} (bilinear, antialiased as Pillow); centre crop {}; (x - mean) / std per channel with mean {:?}, std {:?}; NCHW float32",
                    self.preprocess.resize_shorter, self.preprocess.size, self.preprocess.mean, self.preprocess.std
                ),
            ),
        ];
        entries
            .into_iter()
            .map(|(k, v)| (format!("{META_PREFIX}{k}"), v))
            .collect()
    }

    /// Reads graft's metadata from an export's `metadata_props` (key, value; the first of a
    /// repeated key counts) and runs [`ExportMeta::validate`]; `None` without `graft.labels`
    /// (not a graft export). `origin` names the file in errors. Any strings give metadata or an
    /// error, never a panic (`fuzz/`, target `export_meta`).
    pub fn from_metadata(
        props: &[(&str, &str)],
        origin: &str,
    ) -> Result<Option<ExportMeta>, BackboneError> {
        let get = |k: &str| {
            props
                .iter()
                .find(|(key, _)| key.strip_prefix(META_PREFIX) == Some(k))
                .map(|(_, value)| value.to_string())
        };
        let Some(labels) = get("labels") else {
            return Ok(None);
        };
        let field = |k: &str| {
            get(k).ok_or_else(|| bad(origin, format!("graft metadata lacks {META_PREFIX}{k}")))
        };
        let parse_err = |k: &str, e: &dyn std::fmt::Display| {
            bad(origin, format!("graft metadata {META_PREFIX}{k}: {e}"))
        };
        let meta = ExportMeta {
            labels: serde_json::from_str(&labels).map_err(|e| parse_err("labels", &e))?,
            threshold: field("threshold")?
                .parse()
                .map_err(|e| parse_err("threshold", &e))?,
            output: field("output")?,
            head: field("head")?,
            preprocess: serde_json::from_str(&field("preprocess")?)
                .map_err(|e| parse_err("preprocess", &e))?,
            backbone: field("backbone")?,
            backbone_sha256: field("backbone_sha256")?,
        };
        meta.validate().map_err(|source| BackboneError::Field {
            origin: format!("exported model {origin}"),
            source,
        })?;
        Ok(Some(meta))
    }
}

/// An exported model's answer for one picture: one probability per class, in
/// [`ExportMeta::labels`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassScores {
    /// Probabilities (softmax applied when the export outputs logits).
    pub probabilities: Vec<f32>,
}

impl Backbone {
    /// Scores one image file with an exported model (backbone and head in one ONNX file).
    pub fn score_file(&self, path: &Path) -> Result<ClassScores, BackboneError> {
        let meta = self.exported().ok_or_else(|| BackboneError::Manifest {
            manifest: self.origin(),
            reason: "not a graft export: it has no class scores (use a head file)".into(),
        })?;
        let out = self.embed_file(path)?.vector;
        let probabilities = if meta.output == "logits" {
            softmax(&out)
        } else {
            out
        };
        Ok(ClassScores { probabilities })
    }
}
