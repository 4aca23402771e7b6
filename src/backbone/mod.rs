//! The rootstock: a frozen, pretrained ONNX image model run with tract.
//!
//! This is the only module that touches `tract`; it hands out graft's own types ([`Embedding`],
//! [`ClassScore`], [`BackboneId`]). A [`Backbone`] is loaded once from a [`ModelSpec`]: the graph
//! is parsed, its input shape fixed, cut at the manifest's feature node (the logits kept as a
//! second output where the plan runs the classifier), optimised, and the runnable plan kept.
//! [`Backbone::embed`] runs the plan that stops at the embedding (for few-shot heads: every
//! kiosk frame, every training image); [`Backbone::run`] the one that also yields the
//! ImageNet logits (for `classify`).
//!
//! Plans are built per batch size (and with or without the logits) on first use and cached;
//! bulk work ([`Backbone::embed_files`])
//! runs several batch-1 plans on worker threads, which on small boards scales better than
//! splitting one matrix product across cores.
//!
//! Another engine can take over the forward pass: [`Backbone::graph`] hands out the rewritten
//! graph as plain data ([`graph::Graph`]), an executor built from it (graft's `gpu` module)
//! implements [`Accelerator`], and [`Backbone::set_accelerator`] plugs it in. Every caller of
//! [`Backbone::run`] and [`Backbone::embed_files`] then uses it; tract stays the reference.

pub mod depthwise;
mod error;
pub mod export;
pub mod exported;
pub mod graph;
pub mod manifest;
pub mod pointwise;
pub mod pool;
pub mod preprocess;
mod profile;
pub mod quant;
mod rewrite;
mod simd;
mod team;
pub mod top;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

pub use depthwise::Substituted;
pub use error::{BackboneError, FieldError};
pub use manifest::{Manifest, ModelSpec, DEFAULT_MODEL};
pub use preprocess::{Prepared, RgbFrame};
pub use profile::{NodeTime, OpTime, Profile};
pub use rewrite::{rewritten_sha256, ActivationQdq, GraphSpec, Rewrites};
pub use top::{Mbconv, TopBlock};

type Plan = Arc<TypedRunnableModel>;

/// What [`check_cpu_kernels`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelCheck {
    /// The instruction set graft's kernels run on here (`avx512`, `neon`, ...).
    pub isa: &'static str,
    /// Depthwise convolutions compared: EfficientNet-Lite0's 16 shapes and its stem (a dense
    /// convolution over 3 channels), and 30 random ones (every fifth dense).
    pub convolutions: usize,
    /// 1×1 convolutions and matrix–vector products compared: EfficientNet-Lite0's 19 shapes
    /// and its classifier, 30 + 5 random ones.
    pub pointwise: usize,
    /// Largest difference to tract, relative to the largest output value.
    pub max_rel_error: f32,
    /// The integer kernel checked, e.g. `avx512-vnni` (the scalar reference where this CPU
    /// has none and the plan keeps the float kernel).
    pub int8_isa: &'static str,
    /// int8 cases compared: 30 activation quantise/dequantise pairs (exactly), EfficientNet-
    /// Lite0's 19 1×1 shapes and 30 random ones over quantised inputs.
    pub int8: usize,
    /// The matrix unit the 1×1 convolutions run on where the CPU has one (`amx-bf16`).
    pub matrix_unit: Option<&'static str>,
    /// 1×1 convolutions compared on it: Lite0's 19 shapes and 30 random ones (0 without
    /// one).
    pub matrix: usize,
    /// Its largest difference to tract, relative to the largest output value: each product
    /// of its bfloat16 halves keeps 16 bits (`pointwise::amx`), so this is larger than the
    /// vector kernels' and is not in `max_rel_error`.
    pub matrix_max_rel_error: f32,
}

/// Runs graft's depthwise and 1×1 convolution kernels, on the instruction set this CPU would
/// use (the scalar reference where graft has no vectorised kernel and the plan keeps tract's),
/// and tract's own operators on the same convolutions (EfficientNet-Lite0's shapes and 30
/// seeded random ones of each kind, with the clips and residual adds graft folds in), and
/// errors if any output differs by more than a relative 1e-5. `graft doctor` runs it, so a new
/// board checks the kernels it will really use.
pub fn check_cpu_kernels() -> Result<KernelCheck, BackboneError> {
    let isa = depthwise::Isa::detect();
    let fail = |what: &str, e: TractError| BackboneError::Inference {
        model: format!("graft's {what} kernel ({})", isa.name()),
        reason: error::chain(&e),
    };
    let depth =
        depthwise::check_against_tract(isa, 2026, 30, true).map_err(|e| fail("depthwise", e))?;
    let point = pointwise::check_against_tract(isa, 2026, 30, true)
        .map_err(|e| fail("1x1 convolution", e))?;
    let matrix = pointwise::check_matrix_against_tract(2026, 30, true)
        .transpose()
        .map_err(|e| BackboneError::Inference {
            model: "graft's 1x1 convolution kernel (matrix unit)".into(),
            reason: error::chain(&e),
        })?
        .unwrap_or_default();
    let isa8 = quant::Isa8::vectorised().unwrap_or(quant::Isa8::Scalar);
    let int8 = quant::check_against_tract(isa8, 2026, 30, true).map_err(|e| {
        let e: TractError = e;
        BackboneError::Inference {
            model: format!("graft's int8 1x1 convolution kernel ({})", isa8.name()),
            reason: error::chain(&e),
        }
    })?;
    let worst = depth
        .iter()
        .map(|c| c.max_rel_error)
        .chain(point.iter().map(|c| c.max_rel_error))
        .chain(int8.iter().map(|c| c.max_rel_error))
        .fold(0.0, f32::max);
    Ok(KernelCheck {
        isa: isa.name(),
        convolutions: depth.len(),
        pointwise: point.len(),
        max_rel_error: worst,
        int8_isa: isa8.name(),
        int8: int8.len(),
        matrix_unit: pointwise::matrix_unit(),
        matrix: matrix.len(),
        matrix_max_rel_error: matrix.iter().map(|c| c.max_rel_error).fold(0.0, f32::max),
    })
}

/// Lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What identifies the backbone that made an embedding. Heads and embedding files carry it, and
/// refuse to mix with a different backbone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneId {
    /// Manifest name, e.g. `efficientnet-lite0-int8`.
    pub name: String,
    /// sha256 of the ONNX graph that runs: the file's, or for a manifest with a `[graph]`
    /// section, that of the prepared graph (so its embeddings never mix with the file's).
    pub sha256: String,
    /// Values per embedding.
    pub dim: usize,
    /// Preprocessing, as a short canonical string.
    pub preprocess: String,
}

impl BackboneId {
    /// True if embeddings from `other` can be mixed with ours.
    pub fn compatible(&self, other: &BackboneId) -> bool {
        self.sha256 == other.sha256 && self.dim == other.dim && self.preprocess == other.preprocess
    }

    /// The one compatibility check of a file against the loaded backbone (`self`): `theirs` is
    /// the backbone the head, example or export `file` was made with. Every front end that
    /// reads such a file calls this, so the rule and its message are the same everywhere.
    pub fn check_file(&self, theirs: &BackboneId, file: &Path) -> Result<(), BackboneError> {
        if self.compatible(theirs) {
            return Ok(());
        }
        Err(BackboneError::OtherBackbone {
            file: file.to_path_buf(),
            theirs: Box::new(theirs.clone()),
            ours: Box::new(self.clone()),
        })
    }
}

/// One image's embedding: the raw pooled feature vector of the backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// The values (not normalised; see [`Embedding::normalized`]).
    pub vector: Vec<f32>,
}

impl Embedding {
    /// L2 norm.
    pub fn norm(&self) -> f32 {
        self.vector.iter().map(|v| v * v).sum::<f32>().sqrt()
    }
    /// A unit-length copy (an all-zero vector stays zero).
    pub fn normalized(&self) -> Vec<f32> {
        l2_normalized(&self.vector)
    }
    /// Cosine similarity with another vector of the same length.
    pub fn cosine(&self, other: &[f32]) -> f32 {
        cosine(&self.vector, other)
    }
}

/// A unit-length copy of `v` (an all-zero vector stays zero).
pub fn l2_normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter().map(|x| x / n).collect()
    } else {
        v.to_vec()
    }
}

/// Cosine similarity of two equal-length vectors (0 if either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += (*x as f64) * (*y as f64);
        aa += (*x as f64) * (*x as f64);
        bb += (*y as f64) * (*y as f64);
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (ab / (aa.sqrt() * bb.sqrt())) as f32
    }
}

/// One class of the backbone's own classifier (ImageNet for the bundled model).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    /// Index in the logits.
    pub index: usize,
    /// Class name from the labels file.
    pub label: String,
    /// Softmax probability.
    pub probability: f32,
}

/// What one forward pass gives for one image.
#[derive(Debug, Clone)]
pub struct Output {
    /// The feature vector.
    pub embedding: Embedding,
    /// Logits, if the model has a classifier output.
    pub logits: Option<Vec<f32>>,
}

/// Options for loading a backbone.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads: `1` runs single-threaded; more lets tract split matrix products and lets bulk
    /// embedding run that many images at once.
    pub threads: usize,
    /// Whose CPU kernels run the operators graft has its own for (`--cpu-kernels`).
    pub cpu_kernels: CpuKernels,
    /// Build the plan that also runs the built-in classifier ([`Backbone::run`],
    /// [`Backbone::classify_file`]) at load, rather than the one that stops at the features
    /// ([`Backbone::embed`], every few-shot path): the other is built on its first use.
    pub logits: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: 1,
            cpu_kernels: CpuKernels::Graft,
            logits: false,
        }
    }
}

/// Whose kernels run the convolutions graft has its own for on the CPU (`--cpu-kernels`):
/// graft's depthwise ([`depthwise`]) and 1×1 ([`pointwise`]) kernels, graft's depthwise alone,
/// or tract's for every operator (the A/B switches; all compute the same function, to
/// rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuKernels {
    /// graft's depthwise, stem and 1×1 kernels on the best instruction set this CPU has, the
    /// wide maps' expand 1×1 convolutions run inside the depthwise ones after them.
    #[default]
    Graft,
    /// The same kernels, each operator on its own (the A/B of that fusion).
    Unfused,
    /// graft's depthwise kernel alone, tract's 1×1 and stem convolutions (the A/B of graft's
    /// 1×1 and stem kernels).
    Depthwise,
    /// tract's plan as tract builds it.
    Tract,
    /// As `graft`, but the 1×1 convolutions on the vector units even where the CPU has a
    /// matrix unit (AMX; the A/B of that kernel).
    Vector,
}

impl CpuKernels {
    /// As written on a command line.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernels::Graft => "graft",
            CpuKernels::Unfused => "unfused",
            CpuKernels::Depthwise => "depthwise",
            CpuKernels::Tract => "tract",
            CpuKernels::Vector => "vector",
        }
    }
}

impl std::fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel choice that is not one of [`CpuKernels`]'.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a kernel choice (graft, unfused, depthwise, tract or vector)")]
pub struct ParseCpuKernelsError(pub String);

impl std::str::FromStr for CpuKernels {
    type Err = ParseCpuKernelsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            CpuKernels::Graft,
            CpuKernels::Unfused,
            CpuKernels::Depthwise,
            CpuKernels::Tract,
            CpuKernels::Vector,
        ]
        .into_iter()
        .find(|k| k.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| ParseCpuKernelsError(s.to_string()))
    }
}

/// An [`Accelerator`]'s own error (e.g. `graft::gpu::GpuError`), kept as the `source()` of
/// [`BackboneError::Accelerator`].
pub type AcceleratorError = Box<dyn std::error::Error + Send + Sync>;

/// Where the forward pass runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// A hardware GPU faster than the CPU when there is one (with the `gpu` feature), else
    /// the CPU.
    #[default]
    Auto,
    /// tract on the CPU.
    Cpu,
    /// The best GPU adapter there is, software ones included; an error if there is none.
    Gpu,
}

impl DeviceChoice {
    /// Every choice, in the order `--help` lists them.
    pub const ALL: [DeviceChoice; 3] = [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Gpu];

    /// As written on a command line or in a config file.
    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A device name that is not `auto`, `cpu` or `gpu`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a device (auto, cpu or gpu)")]
pub struct ParseDeviceError(pub String);

impl std::str::FromStr for DeviceChoice {
    type Err = ParseDeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceChoice::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseDeviceError(s.to_string()))
    }
}

/// Another engine for the forward pass, built from [`Backbone::graph`] (graft's GPU executor).
///
/// It runs the same graph as tract with the same outputs: features, then logits when the
/// manifest has them.
pub trait Accelerator: Send + Sync {
    /// Runs `batch` prepared images (`[batch, C, H, W]`, row-major) and returns each output of
    /// the graph, `batch` rows each, row-major.
    fn run(&self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, AcceleratorError>;
    /// What it is, for logs and `graft info`, e.g. `gpu: NVIDIA H100 (Vulkan)`.
    fn describe(&self) -> String;
    /// The batch size bulk work should hand it.
    fn preferred_batch(&self) -> usize;
}

/// How long a pool thread spinning through a run finds nothing to do before it gives up
/// (`Backbone::in_pool`): longer than the serial stretches between a run's parallel nodes
/// (at most ~0.3 ms at batch 1 here), short as a stall.
const SPIN_IDLE: Duration = Duration::from_millis(2);

thread_local! {
    /// Set on the threads of [`Backbone::embed_files`]' worker pool, which run one image each,
    /// single-threaded inside tract.
    static BULK_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What graft's own kernels took over in a plan.
type Substitutions = (depthwise::Substituted, pointwise::Substituted);

/// A loaded, optimised backbone, ready to embed and classify.
pub struct Backbone {
    spec: ModelSpec,
    id: BackboneId,
    onnx: std::borrow::Cow<'static, [u8]>,
    labels: Option<Vec<String>>,
    threads: usize,
    cpu_kernels: CpuKernels,
    substituted: Substitutions,
    executor: Executor,
    /// With graft's 1×1 kernels on several threads: the workers that share each run's parallel
    /// loops with the thread that runs it ([`team`]); tract's executor then serves only
    /// operators of tract's left in the plan.
    team: Option<team::Team>,
    /// One run at a time on the pool: a run's spinning threads would otherwise take up another
    /// run's spinner while waiting inside it, each then spinning until the other ends.
    pool_turn: Mutex<()>,
    /// By (batch, with the classifier's logits).
    plans: Mutex<HashMap<(usize, bool), Plan>>,
    load_time: Duration,
    load_stages: LoadStages,
    rewrites: rewrite::Rewrites,
    accelerator: Option<Arc<dyn Accelerator>>,
    /// For a model cut before its top block (`NAME:top`): the block and the tensor the cut
    /// outputs instead of the features.
    top: Option<(TopBlock, String)>,
}

/// Where [`Backbone::load`] spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadStages {
    /// Reading the model file and checking its sha256 against the manifest.
    pub verify: Duration,
    /// Decoding the ONNX protobuf, applying the manifest's `[graph]` rewrites, and tract's
    /// parse of the result.
    pub parse: Duration,
    /// Typing, decluttering and optimising the graph into a runnable plan (batch 1).
    pub optimize: Duration,
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone").field("id", &self.id).finish()
    }
}

impl Backbone {
    /// Loads `--model` (a manifest path or a bundled name) with default options.
    pub fn load_named(name: &str) -> Result<Backbone, BackboneError> {
        Backbone::load(ModelSpec::resolve(name)?, &LoadOptions::default())
    }

    /// Verifies the model file against its manifest, then parses, cuts and optimises it.
    pub fn load(spec: ModelSpec, options: &LoadOptions) -> Result<Backbone, BackboneError> {
        let start = Instant::now();
        spec.validate()?;
        // Not a FIFO or a device: reading one would wait (or run) for ever.
        if let Some(p) = spec.onnx_path() {
            crate::userfile::check(&p).map_err(|e| BackboneError::io(p, e))?;
        }
        let onnx = spec.read_onnx()?;
        let actual = sha256_hex(&onnx);
        if actual != spec.manifest.sha256 {
            return Err(BackboneError::Sha256Mismatch {
                manifest: spec.origin(),
                file: spec
                    .onnx_path()
                    .unwrap_or_else(|| PathBuf::from(&spec.manifest.file)),
                expected: spec.manifest.sha256.clone(),
                actual,
            });
        }
        // Graph preparation (manifest `[graph]`): the prepared graph is what runs and is
        // exported, and its identity is not the file's.
        let actual = if spec.manifest.graph.is_identity() {
            actual
        } else {
            rewrite::rewritten_sha256(&actual, &spec.manifest.graph)
        };
        let verify = start.elapsed();
        let labels = spec.read_labels()?;
        if let (Some(labels), Some(classes)) = (&labels, spec.manifest.output.classes) {
            if labels.len() != classes {
                return Err(BackboneError::Manifest {
                    manifest: spec.origin(),
                    reason: format!(
                        "labels file has {} lines but output.classes is {classes}",
                        labels.len()
                    ),
                });
            }
        }
        let threads = options.threads.max(1);
        // This backbone's own pool for tract's matrix products, used in a scope around each
        // run: loading a backbone never changes tract's process-wide executor, so two backbones
        // (or a library user's own tract) keep their own thread counts.
        let executor = if threads > 1 {
            Executor::multithread_with_name(threads, "graft-tract")
        } else {
            Executor::SingleThread
        };
        let i = &spec.manifest.input;
        let id = BackboneId {
            name: if spec.deep {
                format!("{}{}", spec.manifest.name, top::DEEP_SUFFIX)
            } else if spec.top {
                format!("{}{}", spec.manifest.name, top::TOP_SUFFIX)
            } else {
                spec.manifest.name.clone()
            },
            sha256: actual,
            // At the top block's input: known once the plan says how big the cut is.
            dim: if spec.top {
                0
            } else {
                spec.manifest.output.features_size
            },
            preprocess: format!(
                "rgb,shorter{},bilinear,center{},mean{:?},std{:?},nchw",
                i.resize_shorter, i.size, i.mean, i.std
            ),
        };
        let mut backbone = Backbone {
            spec,
            id,
            onnx,
            labels,
            threads,
            cpu_kernels: options.cpu_kernels,
            substituted: Default::default(),
            executor,
            team: None,
            pool_turn: Mutex::new(()),
            plans: Mutex::new(HashMap::new()),
            load_time: Duration::ZERO,
            load_stages: LoadStages::default(),
            rewrites: rewrite::Rewrites::default(),
            accelerator: None,
            top: None,
        };
        if backbone.spec.top {
            let g = backbone.graph()?;
            let (mut block, mut cut) = top::find(&g, &backbone.spec.manifest.output.features)?;
            if backbone.spec.deep {
                let (pre, deeper) = top::find_pre(&g, &cut)?;
                block.pre = Some(Box::new(pre));
                cut = deeper;
            }
            backbone.top = Some((block, cut));
        }
        // Build the batch-1 plan now: it validates the graph and is what most calls use.
        let (plan, stages, rewrites, substituted, per_image) =
            backbone.build_plan(1, options.logits)?;
        if let Some((block, _)) = &mut backbone.top {
            block.positions = per_image / block.input_channels();
            if let Some(pre) = &mut block.pre {
                pre.side = (block.positions as f64).sqrt().round() as usize;
            }
            block
                .validate()
                .map_err(|reason| BackboneError::NotImageModel {
                    model: backbone.id.name.clone(),
                    reason,
                })?;
            backbone.id.dim = per_image;
        }
        backbone
            .plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((1, options.logits), plan);
        // Where graft's kernels run the 1×1 convolutions (most of a frame), the thread that
        // runs the plan is one of its threads ([`team`]).
        if threads > 1 && substituted.1.convolutions > 0 {
            let team = team::Team::new(threads).map_err(|e| BackboneError::Load {
                model: backbone.id.name.clone(),
                reason: format!("cannot start {} worker threads: {e}", threads - 1),
            })?;
            backbone.team = Some(team);
        }
        Ok(Backbone {
            load_time: start.elapsed(),
            load_stages: LoadStages { verify, ..stages },
            rewrites,
            substituted,
            ..backbone
        })
    }

    /// The node the embeddings are read at: the manifest's features, or the top block's input
    /// for a model cut before it.
    pub fn feature_node(&self) -> &str {
        match &self.top {
            Some((_, cut)) => cut,
            None => &self.spec.manifest.output.features,
        }
    }

    /// The node of the built-in classifier's logits, when this cut runs it (not `NAME:top`).
    pub fn logits_node(&self) -> Option<&str> {
        match &self.top {
            Some(_) => None,
            None => self.spec.manifest.output.logits.as_deref(),
        }
    }

    /// The top block, for a model cut before it (`NAME:top`); `None` otherwise.
    pub fn top_block(&self) -> Option<&TopBlock> {
        self.top.as_ref().map(|(b, _)| b)
    }

    /// The prepared graph as plain data, cut at the manifest's outputs (features, then logits),
    /// constant dequantisation folded: what another executor lowers.
    pub fn graph(&self) -> Result<graph::Graph, BackboneError> {
        let (proto, prepared) = self.graph_proto()?;
        let m = &self.spec.manifest;
        let size = m.input.size as usize;
        let outputs = match &self.top {
            Some((_, cut)) => vec![cut.clone()],
            None => std::iter::once(m.output.features.clone())
                .chain(m.output.logits.clone())
                .collect(),
        };
        let mut g = graph::Graph::from_proto(proto, &self.model_name(), [3, size, size], outputs)?;
        // Constants the manifest's preparation already folded (w8) were dequantised too.
        g.weights_dequantized += prepared.weights_dequantized;
        Ok(g)
    }

    /// Runs the forward pass on `accelerator` from now on (`None`: back to tract).
    pub fn set_accelerator(&mut self, accelerator: Option<Arc<dyn Accelerator>>) {
        self.accelerator = accelerator;
    }

    /// What runs the forward pass: `cpu (tract)` or the accelerator's description.
    pub fn engine(&self) -> String {
        match &self.accelerator {
            Some(a) => a.describe(),
            None => "cpu (tract)".into(),
        }
    }

    /// Runs `f` (a tract plan run) with this backbone's threads: on this thread with its
    /// [`team::Team`] where graft's 1×1 kernels run (most of the frame), else on tract's pool;
    /// single-threaded on a bulk-embedding worker (whose parallelism is across images).
    pub(crate) fn in_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if BULK_WORKER.with(|b| b.get()) {
            return f();
        }
        let executor = self.executor.clone();
        if let Some(team) = &self.team {
            if let team::Here::None = team::here() {
                let _turn = self.pool_turn.lock().unwrap_or_else(|e| e.into_inner());
                return team.enter(|| multithread_tract_scope(executor, f));
            }
            // A run inside a run (or inside one of its parts): as it is.
            return multithread_tract_scope(executor, f);
        }
        match &self.executor {
            // Already on this pool (a run inside a run): as it is.
            Executor::MultiThread(pool) if pool.current_thread_index().is_some() => {
                multithread_tract_scope(executor, f)
            }
            // The whole run on one of the pool's own threads: each node's parallel loop then
            // shares its chunks with the pool's other threads by work stealing. (Run from the
            // caller's thread, every node was handed to the pool while the caller slept on a
            // latch and woke at its end: two thread wake-ups per node, 70 nodes.) And the
            // pool's other threads spin, stealing work, until the run ends: a sleeping thread
            // woken for each node starts its share late (a halted virtual CPU takes tens of
            // microseconds to wake). Measured (2 vCPUs, fp32, batch 1): 2 threads 1.25× faster
            // than 1 before, 1.5× after (benches/compare_onnxruntime.py).
            Executor::MultiThread(pool) => {
                let _turn = self.pool_turn.lock().unwrap_or_else(|e| e.into_inner());
                pool.install(move || {
                    let done = Arc::new(AtomicBool::new(false));
                    let runner = rayon::current_thread_index();
                    let flag = Arc::clone(&done);
                    rayon::spawn_broadcast(move |ctx| {
                        if Some(ctx.index()) == runner {
                            return;
                        }
                        // A thread may also take this job up while it waits inside a piece of
                        // this very run, which cannot finish beneath it (seen once in ~2,000
                        // runs: the runner asleep on that piece, this thread spinning for ever).
                        // So it also gives up after finding nothing to do for a while.
                        let mut idle: Option<Instant> = None;
                        while !flag.load(Ordering::Acquire) {
                            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                                idle = None;
                            } else if idle.get_or_insert_with(Instant::now).elapsed() > SPIN_IDLE {
                                return;
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                    });
                    let r = multithread_tract_scope(executor, f);
                    done.store(true, Ordering::Release);
                    r
                })
            }
            _ => multithread_tract_scope(executor, f),
        }
    }

    /// Runs the graph on tract even when an accelerator is plugged in (the reference): the
    /// features and the logits, as [`Backbone::run`].
    pub fn run_on_cpu(&self, images: &[Prepared]) -> Result<Vec<Output>, BackboneError> {
        self.run_cpu(images, true)
    }

    /// On tract: the features, and with `logits` the classifier's logits (a plan that stops
    /// at the features skips the classifier: on Lite0 a 1280 × 1000 matrix–vector product,
    /// 4–5% of an `int8` frame).
    fn run_cpu(&self, images: &[Prepared], logits: bool) -> Result<Vec<Output>, BackboneError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let batch = images.len();
        let plan = self.plan(batch, logits)?;
        let fail = |e: TractError| BackboneError::Inference {
            model: self.model_name(),
            reason: error::chain(&e),
        };
        // The input tensor is filled on the pool's threads: its first operator then reads it
        // from their cores' caches, not from the caller's core.
        let outputs = self.in_pool(|| {
            let input = self.input_tensor(&plan, images)?;
            let out = plan.run(tvec!(input.into())).map_err(fail)?;
            Ok::<_, BackboneError>(out.into_iter().map(|v| v.into_tensor()).collect::<Vec<_>>())
        })?;
        let flat = outputs
            .iter()
            .map(|o| {
                // A half-precision plan (`[graph] half`) gives f16.
                let o = o.cast_to::<f32>().map_err(fail)?;
                let view = o.to_plain_array_view::<f32>().map_err(fail)?;
                Ok(view.iter().copied().collect())
            })
            .collect::<Result<Vec<Vec<f32>>, BackboneError>>()?;
        Ok(split_outputs(flat, batch))
    }

    /// The identity embeddings from this backbone carry.
    pub fn id(&self) -> &BackboneId {
        &self.id
    }

    /// For a graft export: its labels, threshold and output kind.
    pub fn exported(&self) -> Option<&exported::ExportMeta> {
        self.spec.exported.as_ref()
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.spec.manifest
    }

    /// Where it was loaded from (`bundled:NAME` or the manifest path).
    pub fn origin(&self) -> String {
        self.spec.origin()
    }

    /// Class names of the built-in classifier, if any.
    pub fn labels(&self) -> Option<&[String]> {
        self.labels.as_deref()
    }

    /// Threads this backbone was loaded with.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Wall time spent verifying, parsing and optimising in [`Backbone::load`].
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// The stages of [`Backbone::load_time`].
    pub fn load_stages(&self) -> LoadStages {
        self.load_stages
    }

    /// What the graph rewrites changed (nothing unless the manifest has a `[graph]` section).
    pub fn rewrites(&self) -> Rewrites {
        self.rewrites
    }

    /// Whose kernels run the depthwise convolutions, and what graft's took over.
    pub fn cpu_kernels(&self) -> (CpuKernels, depthwise::Substituted) {
        (self.cpu_kernels, self.substituted.0)
    }

    /// The 1×1 convolutions graft's kernel took over (none with `--cpu-kernels tract`).
    pub fn pointwise_kernels(&self) -> pointwise::Substituted {
        self.substituted.1
    }

    /// [`Backbone::cpu_kernels`] in one line, e.g. `graft depthwise (avx512): 16 convolutions,
    /// 16 clips folded` or `tract (--cpu-kernels tract)`.
    pub fn cpu_kernels_line(&self) -> String {
        match (self.cpu_kernels, self.substituted.0) {
            (CpuKernels::Tract, _) => "tract (--cpu-kernels tract)".into(),
            (_, _) if depthwise::Isa::vectorised().is_none() => {
                "tract (graft has no vectorised depthwise kernel for this CPU)".into()
            }
            (_, d) if d.convolutions + d.dense == 0 && self.substituted.1.convolutions == 0 => {
                "tract (no convolution graft runs in this graph)".into()
            }
            (_, d) => {
                let p = self.substituted.1;
                format!(
                    "graft depthwise ({}): {} convolutions and {} dense (stem), {} clips folded{}; graft 1x1: {} convolutions{}{}, {} clips and {} residual adds folded; {}{}{}",
                    depthwise::Isa::detect().name(),
                    d.convolutions,
                    d.dense,
                    d.clips,
                    match d.expands {
                        0 => String::new(),
                        n => format!(", {n} with the expand 1x1 or stem before run inside"),
                    },
                    p.convolutions,
                    match (p.integer, quant::Isa8::vectorised()) {
                        (0, _) | (_, None) => String::new(),
                        (n, Some(i)) => format!(" ({n} in int8, {})", i.name()),
                    },
                    match (p.matrix, pointwise::matrix_unit()) {
                        (0, _) | (_, None) => String::new(),
                        (n, Some(unit)) => format!(" ({n} on the matrix unit, {unit})"),
                    },
                    p.clips,
                    p.residuals,
                    match p.products {
                        // Loaded to embed: the classifier is in the plan that classifies.
                        0 if self.logits_node().is_some() => {
                            "the classifier runs only when classifying".to_string()
                        }
                        n => format!("{n} matrix-vector products"),
                    },
                    match p.fake_quant_pairs {
                        0 => String::new(),
                        n => format!(
                            "; {n} activation quantise/dequantise pairs in one pass each, {} of them folded into the convolution before",
                            p.fake_quant_fused
                        ),
                    },
                    match p.pools {
                        0 => String::new(),
                        _ => "; the pooling's powers and sum in one pass".to_string(),
                    }
                )
            }
        }
    }

    /// Size in bytes of the ONNX file.
    pub fn model_bytes(&self) -> usize {
        self.onnx.len()
    }

    /// Instruction-set features tract detected and will pick kernels for.
    pub fn cpu_features() -> Vec<String> {
        tract_linalg::isa::native()
            .iter()
            .map(|i| i.name().to_string())
            .collect()
    }

    fn model_name(&self) -> String {
        self.spec.manifest.name.clone()
    }

    /// The plan for `batch` images, with or without the classifier's logits (built on first
    /// use, then kept).
    fn plan(&self, batch: usize, logits: bool) -> Result<Plan, BackboneError> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = plans.get(&(batch, logits)) {
            return Ok(p.clone());
        }
        let (plan, ..) = self.build_plan(batch, logits)?;
        plans.insert((batch, logits), plan.clone());
        Ok(plan)
    }

    /// The ONNX model as it runs: the file, with the manifest's `[graph]` rewrites applied.
    pub(crate) fn graph_proto(
        &self,
    ) -> Result<(tract_onnx::pb::ModelProto, rewrite::Rewrites), BackboneError> {
        let model = self.model_name();
        let mut proto = rewrite::decode(&self.onnx, &model)?;
        let m = &self.spec.manifest;
        let done = rewrite::apply(&mut proto, &m.graph, &m.output.features, &model)?;
        Ok((proto, done))
    }

    fn build_plan(
        &self,
        batch: usize,
        logits: bool,
    ) -> Result<(Plan, LoadStages, rewrite::Rewrites, Substitutions, usize), BackboneError> {
        let start = Instant::now();
        let m = &self.spec.manifest;
        let model = self.model_name();
        let load = |e: TractError| BackboneError::Load {
            model: model.clone(),
            reason: error::chain(&e),
        };
        let (proto, prepared) = self.graph_proto()?;
        let mut graph = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(load)?;
        drop(proto);
        let parse = start.elapsed();
        if graph.inputs.len() != 1 {
            return Err(BackboneError::NotImageModel {
                model,
                reason: format!("it has {} inputs, an image model has 1", graph.inputs.len()),
            });
        }
        let mut wanted: Vec<(&'static str, &str)> = match &self.top {
            Some((_, cut)) => vec![("the top block's input", cut)],
            None => vec![("output.features", &m.output.features)],
        };
        // The logits node is checked whichever plan this is: a manifest that names a missing
        // one is refused at load, not at the first `classify`.
        let logits_node = match (&m.output.logits, &self.top) {
            (Some(node), None) => Some(node.as_str()),
            _ => None,
        };
        for (field, node) in wanted
            .iter()
            .copied()
            .chain(logits_node.map(|n| ("output.logits", n)))
        {
            if !has_outlet(&graph, node) {
                return Err(BackboneError::MissingNode {
                    model,
                    node: node.to_string(),
                    field,
                });
            }
        }
        if let Some(node) = logits_node.filter(|_| logits) {
            wanted.push(("output.logits", node));
        }
        let size = m.input.size as usize;
        graph
            .set_input_fact(0, f32::fact([batch, 3, size, size]).into())
            .map_err(load)?;
        graph
            .select_outputs_by_name(wanted.iter().map(|(_, n)| *n))
            .map_err(load)?;
        let not_image = |e: TractError| BackboneError::NotImageModel {
            model: model.clone(),
            reason: format!(
                "it does not accept a [{batch},3,{size},{size}] float image: {}",
                error::chain(&e)
            ),
        };
        // graft's kernels read NCHW: with them on, tract's declutter keeps the convolutions
        // channels-first (on aarch64 it would move them channel-last).
        let channels_first =
            self.cpu_kernels != CpuKernels::Tract && depthwise::Isa::vectorised().is_some();
        let mut typed = graph
            .into_typed()
            .and_then(|mut m| {
                if channels_first {
                    depthwise::declutter_channels_first(&mut m)?;
                } else {
                    m.declutter()?;
                }
                Ok(m)
            })
            .map_err(not_image)?;
        // graft's own kernels go in between tract's declutter and its codegen.
        let substituted = match (self.cpu_kernels, depthwise::Isa::vectorised()) {
            (CpuKernels::Tract, _) | (_, None) => Default::default(),
            (kernels, Some(isa)) => {
                let all = matches!(
                    kernels,
                    CpuKernels::Graft | CpuKernels::Unfused | CpuKernels::Vector
                );
                let (pairs, pools) = if all && !m.graph.half {
                    quant::fold_constants(&mut typed).map_err(load)?;
                    quant::integer_powers(&mut typed).map_err(load)?;
                    let pools = pool::fuse_pow_sums(&mut typed).map_err(load)?;
                    (quant::fake_quant_pairs(&mut typed).map_err(load)?, pools)
                } else {
                    (0, 0)
                };
                let d = depthwise::substitute(&mut typed, isa, all).map_err(load)?;
                // In f16 the 1×1 convolutions are what tract's f16 products are for.
                let p = if m.graph.half || !all {
                    pointwise::Substituted::default()
                } else {
                    let int8 = quant::Isa8::vectorised();
                    pointwise::substitute_with(&mut typed, isa, int8, pointwise::MIN_POSITIONS)
                        .map_err(load)?
                };
                let fused = if pairs > 0 {
                    let fused = quant::fuse_fake_quant(&mut typed).map_err(load)?
                        + quant::fuse_residual_sums(&mut typed).map_err(load)?;
                    quant::align_packing(&mut typed).map_err(load)?;
                    fused
                } else {
                    0
                };
                let p = pointwise::Substituted {
                    fake_quant_pairs: pairs,
                    fake_quant_fused: fused,
                    pools,
                    ..p
                };
                // Then the wide maps' expand 1×1s and the stem into the depthwise convolutions
                // they feed.
                let expands =
                    if m.graph.half || !matches!(kernels, CpuKernels::Graft | CpuKernels::Vector) {
                        0
                    } else {
                        depthwise::fuse_expand(&mut typed).map_err(load)?
                    };
                // And a clip of the image into the stem that reads it.
                let input_clips = if m.graph.half {
                    0
                } else {
                    depthwise::fuse_input_clip(&mut typed).map_err(load)?
                };
                // Then what is left of the 1×1s onto the CPU's matrix unit, if it has one.
                let matrix = if m.graph.half
                    || !matches!(kernels, CpuKernels::Graft | CpuKernels::Unfused)
                {
                    0
                } else {
                    pointwise::use_matrix_unit(&mut typed).map_err(load)?
                };
                let p = pointwise::Substituted { matrix, ..p };
                let d = depthwise::Substituted {
                    clips: d.clips + input_clips,
                    ..d
                };
                (depthwise::Substituted { expands, ..d }, p)
            }
        };
        if m.graph.half {
            // Everything but the depthwise convolutions (graft's, or tract's where graft has no
            // kernel: tract's f16 depthwise is not vectorised) in f16; tract casts at the
            // boundaries. The input and outputs become f16 too: `input_tensor` and `run_on_cpu`
            // convert.
            use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
            use tract_onnx::tract_core::transform::ModelTransform;
            FloatPrecisionTranslator::with_filter(f32::datum_type(), f16::datum_type(), |node| {
                !depthwise::is_depthwise(node)
            })
            .transform(&mut typed)
            .map_err(load)?;
        }
        let typed = typed.into_optimized().map_err(not_image)?;
        // The cut must really be a `features_size` vector per image (at the top block's input:
        // a multiple of its channels, the size once known).
        let check = |ix: usize, field: &str, want: usize| -> Result<usize, BackboneError> {
            let fact = typed.output_fact(ix).map_err(load)?;
            let shape = fact.shape.as_concrete().map(|s| s.to_vec());
            let per_image = shape
                .as_ref()
                .map(|s| s.iter().product::<usize>() / batch.max(1));
            let fits = match (&self.top, ix) {
                (Some((block, _)), 0) if self.id.dim == 0 || want == 0 => {
                    per_image.is_some_and(|n| n > 0 && n % block.input_channels() == 0)
                }
                _ => per_image == Some(want),
            };
            if !fits || shape.as_ref().map(|s| s[0]) != Some(batch) {
                return Err(BackboneError::NotImageModel {
                    model: model.clone(),
                    reason: format!(
                        "{field} {:?} has shape {:?}, expected {want} values per image",
                        wanted[ix].1, shape
                    ),
                });
            }
            Ok(per_image.unwrap_or(0))
        };
        let per_image = match &self.top {
            Some(_) => check(0, "the top block's input", self.id.dim)?,
            None => check(0, "output.features", m.output.features_size)?,
        };
        if let Some(classes) = m.output.classes.filter(|_| wanted.len() > 1) {
            check(1, "output.logits", classes)?;
        }
        let plan = typed.into_runnable().map_err(load)?;
        let stages = LoadStages {
            verify: Duration::ZERO,
            parse,
            optimize: start.elapsed() - parse,
        };
        Ok((plan, stages, prepared, substituted, per_image))
    }

    /// Runs the graph on a batch of prepared images (on the accelerator when one is plugged
    /// in, else tract).
    pub fn run(&self, images: &[Prepared]) -> Result<Vec<Output>, BackboneError> {
        self.run_with(images, true)
    }

    /// The embeddings of a batch of prepared images (on the accelerator when one is plugged
    /// in, else tract): [`Backbone::run`] without the built-in classifier, which tract then
    /// does not run.
    pub fn embed(&self, images: &[Prepared]) -> Result<Vec<Embedding>, BackboneError> {
        Ok(self
            .run_with(images, false)?
            .into_iter()
            .map(|o| o.embedding)
            .collect())
    }

    fn run_with(&self, images: &[Prepared], logits: bool) -> Result<Vec<Output>, BackboneError> {
        let Some(acc) = &self.accelerator else {
            return self.run_cpu(images, logits);
        };
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let batch = images.len();
        let mut data = Vec::with_capacity(batch * images[0].data.len());
        for p in images {
            data.extend_from_slice(&p.data);
        }
        let flat = acc
            .run(&data, batch)
            .map_err(|source| BackboneError::Accelerator {
                model: format!("{} on {}", self.model_name(), acc.describe()),
                source,
            })?;
        Ok(split_outputs(flat, batch))
    }

    /// The `[batch, 3, size, size]` input tensor of some prepared images, in the type `plan`
    /// takes (f16 for a half-precision plan, `[graph] half`).
    fn input_tensor(&self, plan: &Plan, images: &[Prepared]) -> Result<Tensor, BackboneError> {
        let fail = |e: TractError| BackboneError::Inference {
            model: self.model_name(),
            reason: error::chain(&e),
        };
        let size = self.spec.manifest.input.size as usize;
        let per = 3 * size * size;
        if let Some(p) = images.iter().find(|p| p.data.len() != per) {
            return Err(BackboneError::Inference {
                model: self.model_name(),
                reason: format!(
                    "a prepared image has {} values, the input takes 3×{size}×{size}",
                    p.data.len()
                ),
            });
        }
        // The images straight into the tensor's own storage (one copy, not two).
        // SAFETY: every value is written below (the lengths were checked above).
        let mut input = unsafe { Tensor::uninitialized::<f32>(&[images.len(), 3, size, size]) }
            .map_err(fail)?;
        {
            let mut view = input.try_as_plain_ram_mut().map_err(fail)?;
            let dst = view.as_slice_mut::<f32>().map_err(fail)?;
            // By the backbone's threads (this runs on its pool), each a band of rows of every
            // plane: the band the stem's threads then read (`depthwise`, the stem cut in bands
            // of rows), each from its own core's cache. (Copied whole by the thread that runs
            // the plan, the other thread's band of the stem ran 9% longer than this one's.)
            // That holds where the other thread is awake: the team's workers linger between
            // frames back to back ([`team::LINGER`]); after a longer pause they wake 20–40 µs
            // into the run, and this thread copies both bands meanwhile (the team's parts
            // are claimed; `docs/performance.md`, ninth and tenth sessions).
            let parts = simd::threads().min(size);
            let out = simd::SharedOut(dst.as_mut_ptr());
            simd::par_parts(parts, dst.len(), |range| {
                for part in range {
                    let rows = part * size / parts..(part + 1) * size / parts;
                    for (n, image) in images.iter().enumerate() {
                        for c in 0..3 {
                            let at = (c * size + rows.start) * size;
                            let from = &image.data[at..at + rows.len() * size];
                            // SAFETY: `dst` holds `images.len()` images of `per` values
                            // (checked above); the bands never overlap.
                            unsafe {
                                let to = out.ptr().add(n * per + at);
                                std::ptr::copy_nonoverlapping(from.as_ptr(), to, from.len());
                            }
                        }
                    }
                }
            });
        }
        let dt = plan.model().input_fact(0).map_err(fail)?.datum_type;
        if dt == f32::datum_type() {
            return Ok(input);
        }
        Ok(input.cast_to_dt(dt).map_err(fail)?.into_owned())
    }

    /// Decodes and prepares one image file.
    pub fn prepare_file(&self, path: &Path) -> Result<Prepared, BackboneError> {
        preprocess::prepare_file(path, &self.spec.manifest.input)
    }

    /// Prepares a decoded frame.
    pub fn prepare_frame(&self, frame: &RgbFrame) -> Prepared {
        preprocess::prepare(frame, &self.spec.manifest.input)
    }

    /// Embeds one image file.
    pub fn embed_file(&self, path: &Path) -> Result<Embedding, BackboneError> {
        let p = self.prepare_file(path)?;
        Ok(self.embed(std::slice::from_ref(&p))?.remove(0))
    }

    /// The top `k` classes of the built-in classifier for some logits.
    pub fn top_k(&self, logits: &[f32], k: usize) -> Vec<ClassScore> {
        let probs = softmax(logits);
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
        idx.into_iter()
            .take(k)
            .map(|index| ClassScore {
                index,
                label: self
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(index).cloned())
                    .unwrap_or_else(|| format!("class {index}")),
                probability: probs[index],
            })
            .collect()
    }

    /// Classifies one image file with the backbone's own classifier.
    pub fn classify_file(&self, path: &Path, k: usize) -> Result<Vec<ClassScore>, BackboneError> {
        let p = self.prepare_file(path)?;
        let out = self.run(std::slice::from_ref(&p))?.remove(0);
        let logits = out.logits.ok_or_else(|| BackboneError::Manifest {
            manifest: self.origin(),
            reason: if self.top.is_some() {
                format!(
                    "{} is cut before its top block, so it does not run the classifier: classify with {}",
                    self.id.name, self.spec.manifest.name
                )
            } else {
                "this model has no output.logits, so it cannot classify directly".into()
            },
        })?;
        Ok(self.top_k(&logits, k))
    }

    /// Embeds many files, `threads` at a time, calling `progress` after each one. Results come
    /// back in input order; the first failure (naming its file) stops the work.
    pub fn embed_files<F>(
        &self,
        paths: &[PathBuf],
        progress: F,
    ) -> Result<Vec<Embedding>, BackboneError>
    where
        F: Fn(&Path) + Sync,
    {
        if let Some(acc) = &self.accelerator {
            return self.embed_files_batched(acc.as_ref(), paths, progress);
        }
        let workers = self.threads.min(paths.len()).max(1);
        if workers == 1 {
            return paths
                .iter()
                .map(|p| {
                    let e = self.embed_file(p);
                    progress(p);
                    e
                })
                .collect();
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<Embedding, BackboneError>>>> =
            Mutex::new((0..paths.len()).map(|_| None).collect());
        // Each worker is single-threaded inside tract; the parallelism is across images.
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    BULK_WORKER.with(|b| b.set(true));
                    multithread_tract_scope(Executor::SingleThread, || loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= paths.len() {
                            break;
                        }
                        let r = self.embed_file(&paths[i]);
                        let failed = r.is_err();
                        progress(&paths[i]);
                        results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                        if failed {
                            next.store(paths.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(paths.len());
        for r in results {
            match r {
                Some(Ok(e)) => out.push(e),
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        Ok(out)
    }
}

/// Splits flat per-output data (features, then logits) into one [`Output`] per image.
fn split_outputs(flat: Vec<Vec<f32>>, batch: usize) -> Vec<Output> {
    let mut outs = flat.into_iter();
    let rows = |v: Vec<f32>| -> Vec<Vec<f32>> {
        let per = (v.len() / batch).max(1);
        v.chunks(per).map(<[f32]>::to_vec).collect()
    };
    let features = rows(outs.next().unwrap_or_default());
    let logits: Vec<Option<Vec<f32>>> = match outs.next() {
        Some(l) => rows(l).into_iter().map(Some).collect(),
        None => vec![None; batch],
    };
    features
        .into_iter()
        .zip(logits)
        .map(|(vector, logits)| Output {
            embedding: Embedding { vector },
            logits,
        })
        .collect()
}

impl Backbone {
    /// [`Backbone::embed_files`] on an accelerator: batches of its preferred size, the next
    /// batch decoded and prepared on every core while the accelerator runs the current one.
    fn embed_files_batched<F>(
        &self,
        acc: &dyn Accelerator,
        paths: &[PathBuf],
        progress: F,
    ) -> Result<Vec<Embedding>, BackboneError>
    where
        F: Fn(&Path) + Sync,
    {
        let chunk = acc.preferred_batch().max(1);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Prepared>, BackboneError>>(1);
        let mut out = Vec::with_capacity(paths.len());
        std::thread::scope(|s| -> Result<(), BackboneError> {
            // Owned here, so an early error return drops it and a producer blocked on a full
            // channel wakes up (send fails) instead of keeping the scope from ending.
            let rx = rx;
            s.spawn(move || {
                for part in paths.chunks(chunk) {
                    let prepared = prepare_parallel(part, workers, |p| self.prepare_file(p));
                    let failed = prepared.is_err();
                    if tx.send(prepared).is_err() || failed {
                        break;
                    }
                }
            });
            for part in paths.chunks(chunk) {
                let prepared = rx.recv().map_err(|_| BackboneError::Inference {
                    model: self.model_name(),
                    reason: "the image preparation thread stopped".into(),
                })??;
                out.extend(self.embed(&prepared)?);
                part.iter().for_each(|p| progress(p));
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// Runs `f` on every path, `workers` at a time; results in input order, the first error wins.
fn prepare_parallel<F>(
    paths: &[PathBuf],
    workers: usize,
    f: F,
) -> Result<Vec<Prepared>, BackboneError>
where
    F: Fn(&Path) -> Result<Prepared, BackboneError> + Sync,
{
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<Prepared, BackboneError>>>> =
        paths.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers.min(paths.len()).max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= paths.len() {
                    break;
                }
                let r = f(&paths[i]);
                *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    slots
        .into_iter()
        .filter_map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

fn has_outlet(graph: &InferenceModel, name: &str) -> bool {
    graph.outlet_labels.values().any(|l| l == name) || graph.nodes().iter().any(|n| n.name == name)
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, 2.0, -1000.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[1] > p[2] && p[2] > p[0] && p[3] >= 0.0);
    }

    #[test]
    fn cosine_cases() {
        let cases: &[(&[f32], &[f32], f32)] = &[
            (&[1.0, 0.0], &[1.0, 0.0], 1.0),
            (&[1.0, 0.0], &[0.0, 2.0], 0.0),
            (&[1.0, 1.0], &[-1.0, -1.0], -1.0),
            (&[0.0, 0.0], &[1.0, 1.0], 0.0),
        ];
        for (a, b, want) in cases {
            assert!((cosine(a, b) - want).abs() < 1e-6, "{a:?} {b:?}");
        }
    }

    #[test]
    fn compatibility_is_one_rule_with_one_message() {
        let ours = BackboneId {
            name: "a".into(),
            sha256: "0123456789abcdef".into(),
            dim: 4,
            preprocess: "p".into(),
        };
        assert!(ours.check_file(&ours.clone(), Path::new("h.graft")).is_ok());
        // A crafted file with a short or non-ASCII sha256 must not panic the message.
        for (sha, dim, pre) in [
            ("é", 4, "p"),
            ("0123456789abcdef", 5, "p"),
            ("0123456789abcdef", 4, "q"),
        ] {
            let theirs = BackboneId {
                name: "b".into(),
                sha256: sha.into(),
                dim,
                preprocess: pre.into(),
            };
            let e = ours
                .check_file(&theirs, Path::new("h.graft"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("h.graft: trained on backbone b"), "{e}");
            assert!(
                e.contains("but a (sha256 0123456789ab…, 4-d, p) is loaded"),
                "{e}"
            );
        }
    }

    #[test]
    fn sha256_of_empty_input() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
