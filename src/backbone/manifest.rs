//! Model manifests: the TOML file beside every ONNX backbone that says how to feed it and where
//! to cut it. Bundled manifests (and their model files) are compiled into the binary so that a
//! board needs nothing but `graft` itself.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::exported::{self, ExportMeta};
pub use super::preprocess::InputSpec;
use super::rewrite::GraphSpec;
use super::{BackboneError, FieldError};

/// The manifest format this build reads. Newer formats are refused with a clear error.
pub const MANIFEST_FORMAT: u32 = 1;

/// A parsed model manifest (`models/*.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Unique model name, e.g. `efficientnet-lite0-int8`.
    pub name: String,
    /// The architecture family; models of one family share preprocessing and labels.
    #[serde(default)]
    pub family: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// `fp32`, `int8`, ...
    pub precision: String,
    /// The ONNX file, relative to the manifest.
    pub file: String,
    /// sha256 of the ONNX file, lowercase hex.
    pub sha256: String,
    /// Class names, one per line in logit order, relative to the manifest. Optional for
    /// feature-only backbones.
    #[serde(default)]
    pub labels: Option<String>,
    /// sha256 of the labels file.
    #[serde(default)]
    pub labels_sha256: Option<String>,
    /// How images become the input tensor.
    pub input: InputSpec,
    /// Which graph outputs mean what.
    pub output: OutputSpec,
    /// Rewrites of the graph made before it is loaded (see `backbone::prepare`).
    #[serde(default, skip_serializing_if = "GraphSpec::is_identity")]
    pub graph: GraphSpec,
    /// Where the weights came from.
    #[serde(default)]
    pub provenance: Option<toml::Table>,
}

/// Named outputs of the graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The classifier logits (for `classify`); optional for feature-only backbones.
    #[serde(default)]
    pub logits: Option<String>,
    /// The node at which the graph is cut for embeddings.
    pub features: String,
    /// Number of values in one embedding.
    pub features_size: usize,
    /// Number of classes of the logits output.
    #[serde(default)]
    pub classes: Option<usize>,
}

/// Where the bytes of a model come from: compiled in, or files on disk.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    Bundled {
        onnx: &'static [u8],
        labels: Option<&'static str>,
    },
    Disk {
        manifest_path: PathBuf,
    },
}

/// A manifest together with where to find its files.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The parsed manifest.
    pub manifest: Manifest,
    pub(crate) source: Source,
    /// Set when the model is a graft export (backbone + head in one ONNX file): its output is
    /// the head's scores, described here.
    pub exported: Option<ExportMeta>,
    /// Cut before the top block (`NAME:top`, see [`super::top`]): the features are the top
    /// block's input, for fine-tuning heads.
    pub top: bool,
    /// Cut one block deeper (`NAME:deep`, with `top`): the features are the input of the
    /// block before the top block ([`super::top::Mbconv`]).
    pub deep: bool,
}

struct BundledModel {
    name: &'static str,
    manifest: &'static str,
    onnx: &'static [u8],
}

/// The int8 file, shared by the `int8` (as quantised) and `w8` (int8 weights, float
/// activations) manifests: compiled in once.
const LITE0_INT8: &[u8] = include_bytes!("../../models/efficientnet-lite0/int8.onnx");
const LITE0_FP32: &[u8] = include_bytes!("../../models/efficientnet-lite0/fp32.onnx");
const LITE0_LABELS: &str = include_str!("../../models/efficientnet-lite0/labels.txt");

const BUNDLED: &[BundledModel] = &[
    BundledModel {
        name: "efficientnet-lite0-fp32",
        manifest: include_str!("../../models/efficientnet-lite0-fp32.toml"),
        onnx: LITE0_FP32,
    },
    BundledModel {
        name: "efficientnet-lite0-int8",
        manifest: include_str!("../../models/efficientnet-lite0-int8.toml"),
        onnx: LITE0_INT8,
    },
    BundledModel {
        name: "efficientnet-lite0-w8",
        manifest: include_str!("../../models/efficientnet-lite0-w8.toml"),
        onnx: LITE0_INT8,
    },
    BundledModel {
        name: "efficientnet-lite0-fp32-gem",
        manifest: include_str!("../../models/efficientnet-lite0-fp32-gem.toml"),
        onnx: LITE0_FP32,
    },
    BundledModel {
        name: "efficientnet-lite0-f16-gem",
        manifest: include_str!("../../models/efficientnet-lite0-f16-gem.toml"),
        onnx: LITE0_FP32,
    },
    BundledModel {
        name: "efficientnet-lite0-w8-gem",
        manifest: include_str!("../../models/efficientnet-lite0-w8-gem.toml"),
        onnx: LITE0_INT8,
    },
];

/// The name `--model` defaults to.
pub const DEFAULT_MODEL: &str = "efficientnet-lite0";

/// The precision the family alias `efficientnet-lite0` resolves to on this target (always
/// with GeM-pooled features, `-gem`: the better features for few-shot heads, docs/few-shot.md;
/// heads made before record the plain model's name and keep loading it).
///
/// tract 0.23 runs the int8 (QDQ) graph's convolutions in float and spends half of the pass on
/// quantising and dequantising activations, on every architecture (docs/performance.md), so the
/// quantised graph is never the fast one. `w8` (the int8 file with float activations) runs as
/// fast as fp32, loads as fast, and ships 5 MB of weights instead of 18.5 MB: the ARM boards'
/// choice. x86_64 keeps the fp32 reference, which is as fast there and exact.
pub const fn default_precision() -> &'static str {
    if cfg!(any(target_arch = "aarch64", target_arch = "arm")) {
        "w8"
    } else {
        "fp32"
    }
}

/// Names accepted by `--model` besides manifest paths.
pub fn bundled_names() -> Vec<String> {
    let mut names = vec![DEFAULT_MODEL.to_string()];
    names.extend(BUNDLED.iter().map(|b| b.name.to_string()));
    names
}

impl ModelSpec {
    /// Resolves `--model`: an existing manifest path, or a bundled name (`efficientnet-lite0`
    /// picks the precision for this target).
    pub fn resolve(name: &str) -> Result<ModelSpec, BackboneError> {
        let cut = [
            (super::top::TOP_SUFFIX, false),
            (super::top::DEEP_SUFFIX, true),
        ]
        .into_iter()
        .find_map(|(suffix, deep)| Some((name.strip_suffix(suffix)?, deep)));
        if let Some((base, deep)) = cut {
            let spec = ModelSpec::resolve(base)?;
            if spec.exported.is_some() || spec.top {
                return Err(BackboneError::NotImageModel {
                    model: name.to_string(),
                    reason: "an export ends in its head, and a cut model is cut: neither has a top block to cut before".into(),
                });
            }
            return Ok(ModelSpec {
                top: true,
                deep,
                ..spec
            });
        }
        let path = Path::new(name);
        if name.ends_with(".onnx") {
            return ModelSpec::from_export(path);
        }
        if path.is_file() || name.ends_with(".toml") {
            return ModelSpec::from_path(path);
        }
        let wanted = if name == DEFAULT_MODEL {
            format!("{DEFAULT_MODEL}-{}-gem", default_precision())
        } else {
            name.to_string()
        };
        let bundled = BUNDLED.iter().find(|b| b.name == wanted).ok_or_else(|| {
            BackboneError::UnknownModel {
                name: name.to_string(),
                known: bundled_names().join(", "),
            }
        })?;
        let manifest = Manifest::parse(bundled.manifest, &format!("bundled:{}", bundled.name))?;
        Ok(ModelSpec {
            manifest,
            source: Source::Bundled {
                onnx: bundled.onnx,
                labels: Some(LITE0_LABELS),
            },
            exported: None,
            top: false,
            deep: false,
        })
    }

    /// Reads a manifest from disk; its files are resolved relative to it.
    pub fn from_path(path: &Path) -> Result<ModelSpec, BackboneError> {
        let text = crate::userfile::read_to_string(path).map_err(|e| BackboneError::io(path, e))?;
        let manifest = Manifest::parse(&text, &path.display().to_string())?;
        Ok(ModelSpec {
            manifest,
            source: Source::Disk {
                manifest_path: path.to_path_buf(),
            },
            exported: None,
            top: false,
            deep: false,
        })
    }

    /// Reads a model written by `graft export`: the manifest comes from its metadata.
    pub fn from_export(path: &Path) -> Result<ModelSpec, BackboneError> {
        let origin = path.display().to_string();
        let bytes = crate::userfile::read(path).map_err(|e| BackboneError::io(path, e))?;
        let meta = exported::read_meta(&bytes, &origin)?.ok_or_else(|| BackboneError::Manifest {
            manifest: origin.clone(),
            reason: "this ONNX file has no graft metadata; give a manifest (.toml) for a plain backbone".into(),
        })?;
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: path
                .file_stem()
                .and_then(|n| n.to_str())
                .unwrap_or("export")
                .to_string(),
            family: String::new(),
            description: format!("graft export: {} head on {}", meta.head, meta.backbone),
            precision: "export".into(),
            file,
            sha256: super::sha256_hex(&bytes),
            labels: None,
            labels_sha256: None,
            input: meta.preprocess.clone(),
            output: OutputSpec {
                logits: None,
                features: exported::OUTPUT.into(),
                features_size: meta.labels.len(),
                classes: None,
            },
            graph: GraphSpec::default(),
            provenance: None,
        };
        let spec = ModelSpec {
            manifest,
            source: Source::Disk {
                manifest_path: path.to_path_buf(),
            },
            exported: Some(meta),
            top: false,
            deep: false,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The one check of a model, however it came in: its manifest's values
    /// ([`Manifest::validate`]) and, for an export, its graft metadata
    /// ([`ExportMeta::validate`]). Run when a spec is made from a file and again by
    /// [`Backbone::load`](super::Backbone::load), so a spec built in code is held to it too.
    pub fn validate(&self) -> Result<(), BackboneError> {
        let (what, checked) = match &self.exported {
            Some(meta) => (
                "exported model",
                meta.validate().and_then(|()| self.manifest.validate()),
            ),
            None => ("model manifest", self.manifest.validate()),
        };
        checked.map_err(|source| BackboneError::Field {
            origin: format!("{what} {}", self.origin()),
            source,
        })
    }

    /// Where this model came from, for messages: `bundled:NAME` or the manifest path.
    pub fn origin(&self) -> String {
        match &self.source {
            Source::Bundled { .. } => format!("bundled:{}", self.manifest.name),
            Source::Disk { manifest_path } => manifest_path.display().to_string(),
        }
    }

    /// The ONNX file's path on disk, if it has one.
    pub fn onnx_path(&self) -> Option<PathBuf> {
        match &self.source {
            Source::Bundled { .. } => None,
            Source::Disk { manifest_path } => Some(relative_to(manifest_path, &self.manifest.file)),
        }
    }

    pub(crate) fn read_onnx(&self) -> Result<std::borrow::Cow<'static, [u8]>, BackboneError> {
        match &self.source {
            Source::Bundled { onnx, .. } => Ok(std::borrow::Cow::Borrowed(onnx)),
            Source::Disk { manifest_path } => {
                let p = relative_to(manifest_path, &self.manifest.file);
                crate::userfile::read(&p)
                    .map(std::borrow::Cow::Owned)
                    .map_err(|e| BackboneError::io(p, e))
            }
        }
    }

    pub(crate) fn read_labels(&self) -> Result<Option<Vec<String>>, BackboneError> {
        let text = match (&self.source, &self.manifest.labels) {
            (_, None) => return Ok(None),
            (Source::Bundled { labels, .. }, Some(_)) => labels.map(str::to_string),
            (Source::Disk { manifest_path }, Some(file)) => {
                let p = relative_to(manifest_path, file);
                let text =
                    crate::userfile::read_to_string(&p).map_err(|e| BackboneError::io(&p, e))?;
                if let Some(expected) = &self.manifest.labels_sha256 {
                    let actual = super::sha256_hex(text.as_bytes());
                    if &actual != expected {
                        return Err(BackboneError::Sha256Mismatch {
                            manifest: self.origin(),
                            file: p,
                            expected: expected.clone(),
                            actual,
                        });
                    }
                }
                Some(text)
            }
        };
        Ok(text.map(|t| t.lines().map(str::to_string).collect()))
    }
}

fn relative_to(manifest: &Path, file: &str) -> PathBuf {
    manifest.parent().unwrap_or(Path::new(".")).join(file)
}

impl Manifest {
    /// Parses a manifest's TOML text and runs [`Manifest::validate`]; `origin` (a path or
    /// `bundled:NAME`) names it in errors. The one manifest reader (bundled and on disk): any
    /// text gives a manifest or an error, never a panic (`fuzz/`, target `manifest`).
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, BackboneError> {
        let bad = |reason: String| BackboneError::Manifest {
            manifest: origin.to_string(),
            reason,
        };
        let m: Manifest = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        if m.format > MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {} is newer than this graft understands ({MANIFEST_FORMAT}); upgrade graft",
                m.format
            )));
        }
        m.validate().map_err(|source| BackboneError::Field {
            origin: format!("model manifest {origin}"),
            source,
        })?;
        Ok(m)
    }

    /// The one check of a manifest's values, whether it was read from TOML or made from an
    /// export's metadata ([`ModelSpec::from_export`]); [`Backbone::load`](super::Backbone::load)
    /// runs it again on whatever spec it is given. The preprocessing is
    /// [`InputSpec::validate`].
    pub fn validate(&self) -> Result<(), FieldError> {
        self.input.validate().map_err(|e| e.within("input"))?;
        if self.output.features_size == 0 {
            return Err(FieldError::new(
                "output.features_size",
                self.output.features_size,
                "must be positive",
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FieldError::new(
                "sha256",
                &self.sha256,
                "must be 64 hex digits",
            ));
        }
        if let Some(p) = self.graph.gem_power.filter(|p| !(2..=8).contains(p)) {
            return Err(FieldError::new("graph.gem_power", p, "must be 2 to 8"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_manifests_parse_and_alias_resolves() {
        for name in bundled_names() {
            let spec = ModelSpec::resolve(&name).unwrap();
            assert_eq!(spec.manifest.output.features_size, 1280, "{name}");
        }
        let alias = ModelSpec::resolve(DEFAULT_MODEL).unwrap();
        let wanted = format!("{DEFAULT_MODEL}-{}-gem", default_precision());
        assert_eq!(alias.manifest.name, wanted);
        assert_eq!(alias.manifest.graph.gem_power, Some(3));
    }

    #[test]
    fn unknown_model_lists_the_bundled_ones() {
        let err = ModelSpec::resolve("resnet-9000").unwrap_err().to_string();
        assert!(err.contains("efficientnet-lite0-int8"), "{err}");
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let good = BUNDLED[0].manifest;
        let cases: &[(&str, &str, &str)] = &[
            ("format = 1", "format = 99", "newer than this graft"),
            ("layout = \"NCHW\"", "layout = \"NHWC\"", "only NCHW"),
            ("size = 224", "size = 0", "0 < size"),
            // Regression (issue 9): an infinite mean was accepted.
            (
                "mean = [127.0, 127.0, 127.0]",
                "mean = [inf, 127.0, 127.0]",
                "input.mean",
            ),
            (
                "std = [128.0, 128.0, 128.0]",
                "std = [128.0, -128.0, 128.0]",
                "input.std",
            ),
            (
                "resize_shorter = 256",
                "resize_shorter = 4000000000",
                "input.resize_shorter",
            ),
            (
                "resize_filter = \"bilinear\"",
                "resize_filter = \"nearest\"",
                "input.resize_filter",
            ),
            (
                "features_size = 1280",
                "features_size = 0",
                "output.features_size",
            ),
        ];
        for (from, to, expect) in cases {
            assert!(good.contains(from), "fixture lacks {from}");
            let text = good.replacen(from, to, 1);
            let err = Manifest::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(expect), "{to}: {err}");
        }
        let err = Manifest::parse("name = 3", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("model manifest t.toml:"), "{err}");
    }
}
