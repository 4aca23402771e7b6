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
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not an image this build can decode (or it is damaged).
    #[error("{} is not a readable image: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    /// A picture could not be encoded (e.g. larger than JPEG allows).
    #[error("cannot encode {what} as {format}: {reason}")]
    Encode {
        what: String,
        format: &'static str,
        reason: String,
    },
    /// The image decoded to zero pixels in one direction.
    #[error("{} is an empty image ({width}x{height})", path.display())]
    EmptyImage {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    /// A manifest is missing, malformed or inconsistent.
    #[error("model manifest {manifest}: {reason}")]
    Manifest { manifest: String, reason: String },
    /// `--model` named neither an existing manifest file nor a bundled model.
    #[error("unknown model {name:?}: not a manifest file, and not a bundled model ({known})")]
    UnknownModel { name: String, known: String },
    /// The model file is not the one the manifest describes.
    #[error(
        "model file {} does not match manifest {manifest}: sha256 is {actual}, manifest says {expected}",
        file.display()
    )]
    Sha256Mismatch {
        manifest: String,
        file: PathBuf,
        expected: String,
        actual: String,
    },
    /// tract could not parse, type or optimise the ONNX graph.
    #[error("model {model}: cannot load ONNX graph: {reason}")]
    Load { model: String, reason: String },
    /// The manifest names an output node the graph does not have.
    #[error(
        "model {model}: the graph has no node or output named {node:?} (manifest field {field})"
    )]
    MissingNode {
        model: String,
        node: String,
        field: &'static str,
    },
    /// The graph does not look like an image model of the declared input size.
    #[error("model {model}: not an image model as the manifest describes it: {reason}")]
    NotImageModel { model: String, reason: String },
    /// Building an export (backbone + head in one ONNX file) failed.
    #[error("model {model}: cannot export: {reason}")]
    Export { model: String, reason: String },
    /// Running the plan failed.
    #[error("model {model}: inference failed: {reason}")]
    Inference { model: String, reason: String },
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
