use std::path::PathBuf;

/// Everything that can go wrong between a model manifest, an image file and an embedding.
///
/// Every variant names the file, model or node involved so the message alone tells a user what
/// to fix. Errors from tract and the image decoders are kept as `source()` but their types do
/// not leak out of this module.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not an image this build can decode (or it is damaged).
    #[error("{} is not a readable image: {reason}", path.display())]
    Decode {
        /// The file or folder.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A picture could not be encoded (e.g. larger than JPEG allows).
    #[error("cannot encode {what} as {format}: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The format.
        format: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The image decoded to zero pixels in one direction.
    #[error("{} is an empty image ({width}x{height})", path.display())]
    EmptyImage {
        /// The file or folder.
        path: PathBuf,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The picture is larger than graft decodes ([`super::preprocess::MAX_SIDE`] a side,
    /// [`super::preprocess::MAX_DECODED_BYTES`] decoded): refused from its header, before the
    /// pixels are allocated.
    #[error("{} is too large to decode: {reason}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What it claims, and the limit.
        reason: String,
    },
    /// A manifest is missing, malformed or inconsistent.
    #[error("model manifest {manifest}: {reason}")]
    Manifest {
        /// The manifest (a path or `bundled:NAME`).
        manifest: String,
        /// What was wrong.
        reason: String,
    },
    /// `--model` named neither an existing manifest file nor a bundled model.
    #[error("unknown model {name:?}: not a manifest file, and not a bundled model ({known})")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The model file is not the one the manifest describes.
    #[error(
        "model file {} does not match manifest {manifest}: sha256 is {actual}, manifest says {expected}",
        file.display()
    )]
    Sha256Mismatch {
        /// The manifest (a path or `bundled:NAME`).
        manifest: String,
        /// The file.
        file: PathBuf,
        /// The sha256 the manifest gives.
        expected: String,
        /// The file's sha256.
        actual: String,
    },
    /// tract could not parse, type or optimise the ONNX graph.
    #[error("model {model}: cannot load ONNX graph: {reason}")]
    Load {
        /// The model.
        model: String,
        /// What was wrong.
        reason: String,
    },
    /// The manifest names an output node the graph does not have.
    #[error(
        "model {model}: the graph has no node or output named {node:?} (manifest field {field})"
    )]
    MissingNode {
        /// The model.
        model: String,
        /// The node.
        node: String,
        /// The manifest field.
        field: &'static str,
    },
    /// The graph does not look like an image model of the declared input size.
    #[error("model {model}: not an image model as the manifest describes it: {reason}")]
    NotImageModel {
        /// The model.
        model: String,
        /// What was wrong.
        reason: String,
    },
    /// Building an export (backbone + head in one ONNX file) failed.
    #[error("model {model}: cannot export: {reason}")]
    Export {
        /// The model.
        model: String,
        /// What was wrong.
        reason: String,
    },
    /// Running the plan failed.
    #[error("model {model}: inference failed: {reason}")]
    Inference {
        /// The model.
        model: String,
        /// What was wrong.
        reason: String,
    },
    /// The plugged-in accelerator (the GPU executor) failed.
    #[error("model {model}: inference failed: {source}")]
    Accelerator {
        /// The model.
        model: String,
        /// The underlying error.
        #[source]
        source: super::AcceleratorError,
    },
    /// A field of a model manifest or of an export's graft metadata is outside what graft can
    /// use (see [`super::manifest::Manifest::validate`], [`super::exported::ExportMeta::validate`]).
    #[error("{origin}: {source}")]
    Field {
        /// The file: `model manifest PATH` or `exported model PATH`.
        origin: String,
        /// Which field, its value and the rule it breaks.
        #[source]
        source: FieldError,
    },
    /// A head, example or export file was made with another backbone than the one loaded.
    #[error(
        "{}: trained on backbone {} (sha256 {}…, {}-d, {}) but {} (sha256 {}…, {}-d, {}) is loaded; load the backbone it was trained on, or retrain",
        file.display(),
        theirs.name, short(&theirs.sha256), theirs.dim, theirs.preprocess,
        ours.name, short(&ours.sha256), ours.dim, ours.preprocess
    )]
    OtherBackbone {
        /// The file.
        file: PathBuf,
        /// The backbone the file was made with.
        theirs: Box<super::BackboneId>,
        /// The backbone that is loaded.
        ours: Box<super::BackboneId>,
    },
}

/// A value outside what graft can use: which field, its value as read, and the rule it breaks.
///
/// The one vocabulary of graft's validation — manifests and exports' metadata here, head files
/// and thresholds in [`crate::head`] — so every refusal reads the same way
/// (`input.std = [0.0, 128.0, 128.0]: must be finite and positive`). The error that carries it
/// names the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value}: {rule}")]
pub struct FieldError {
    /// The field, spelled as the file spells it (`input.std`, `graft.threshold`, `temperature`).
    pub field: String,
    /// Its value, as read (`Debug` form: `NaN`, `inf`, `"NHWC"`).
    pub value: String,
    /// What it must be.
    pub rule: String,
}

impl FieldError {
    /// `field` holds `value`, which breaks `rule`.
    pub fn new(
        field: impl Into<String>,
        value: impl std::fmt::Debug,
        rule: impl Into<String>,
    ) -> FieldError {
        FieldError {
            field: field.into(),
            value: format!("{value:?}"),
            rule: rule.into(),
        }
    }

    /// The same error for a field nested under `prefix` (`input` and `std` → `input.std`).
    pub fn within(mut self, prefix: &str) -> FieldError {
        self.field = format!("{prefix}.{}", self.field);
        self
    }

    /// The rule of every probability graft reads back (a head's threshold, an export's): a
    /// number in [0, 1]. NaN is not, so it can never be compared its way past a score.
    pub fn check_probability(field: &str, value: f32) -> Result<f32, FieldError> {
        if (0.0..=1.0).contains(&value) {
            Ok(value)
        } else {
            Err(FieldError::new(field, value, "must be a number in [0, 1]"))
        }
    }
}

/// The first 12 hex digits of a sha256 (all of it, if shorter or not ASCII).
fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

impl BackboneError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BackboneError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Flattens a tract (anyhow-based) error chain into one line.
pub(crate) fn chain(e: &dyn std::fmt::Display) -> String {
    format!("{e:#}").replace('\n', " ")
}
