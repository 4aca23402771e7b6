//! The scion: small classifiers trained on the device from a few embeddings per class.
//!
//! This is the only module that touches linfa. Every head works on L2-normalised embeddings and
//! produces *logits* (one per class); the score a user sees is `softmax(T · logits)` with a
//! temperature `T` fitted by cross-validation on the training set, so scores are probabilities
//! in [0, 1] for every head type. A prediction whose best score is below the head's threshold
//! (calibrated from held-out training scores, or set by the user) is reported as `unknown`.
//!
//! | head | logits | fit | incremental |
//! |---|---|---|---|
//! | `logistic` | `W·x + b` (linfa-logistic, multinomial, L2 `alpha`) | L-BFGS | refit from stored embeddings |
//! | `centroid` | cosine to each class mean (weight imprinting) | means | exact |
//! | `knn` | soft vote of the `k` nearest examples by cosine (linfa-nn) | none | exact |
//! | `bayes` | Gaussian naive Bayes joint log-likelihood (linfa-bayes) | means / variances | exact refit |
//! | `finetune` | the backbone's top block, fine-tuned, then `W·x + b` ([`finetune`](self#fine-tuning)) | Adam, early stopping by grouped CV | refit from stored block inputs |
//!
//! # Fine-tuning
//!
//! A `finetune` head's examples are the backbone's top-block inputs (`--model NAME:top`, see
//! [`crate::backbone::top`]); training updates the block's 1×1 convolution by a low-rank,
//! L2-SP-regularised change beside a linear classifier that starts from the logistic head
//! (details in the `finetune` module). One block deeper (`--model NAME:deep`) the examples are
//! the input of the block before it ([`crate::backbone::Mbconv`]), and training updates both
//! blocks' four convolutions in full (the `deep` module). The fixed-feature kinds work on such
//! examples too: they run the pretrained blocks first (`HeadParams::top`), so `--head auto`
//! compares them all on the same folds and held-out examples.
//!
//! Whatever a head comes from — a head file, a refit, a library user's own — it is held to
//! [`Head::validate`] before use, and a threshold from anywhere (a flag, a kiosk setting) to
//! [`validate_threshold`]; a refusal is a [`FieldError`] naming the field. Behind that check,
//! [`Prediction::from_scores`] never turns a non-finite score into a known label.

mod cv;
mod deep;
pub mod eval;
mod examples;
mod finetune;
mod fit;
mod label;
pub mod metrics;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::backbone::FieldError;
pub use cv::{
    auto_select, calibrate, cross_validate, Calibration, CvReport, Selection, TemperatureRange,
    AUTO_MIN_Z, AUTO_PRIOR, AUTO_PRIOR_DEEP, FALLBACK_THRESHOLD, K_FOLDS, LOO_MAX_SHOTS,
    MAX_KNOWN_REJECTION, TEMPERATURE_DECADES, THRESHOLD_QUANTILE,
};
pub use deep::{DEEP_EPOCHS, DEEP_LR};
pub use examples::{group_ids, Examples};
pub use finetune::EPOCH_CHECKPOINTS;
pub use fit::{fit, DEFAULT_EPOCHS};
pub use label::{Label, LabelError, MAX_LABEL_BYTES};

/// Errors of the heads module.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Not enough data to fit or validate.
    #[error("{0}")]
    NotEnoughData(String),
    /// The underlying linfa fit failed.
    #[error("fitting the {kind} head failed: {reason}")]
    Fit {
        /// The head type.
        kind: HeadKind,
        /// What was wrong.
        reason: String,
    },
    /// An embedding of the wrong size.
    #[error("embedding has {got} values, the head expects {want}")]
    Dimension {
        /// Values given.
        got: usize,
        /// Values expected.
        want: usize,
    },
    /// This head type has no ONNX form yet.
    #[error("a {0} head cannot be exported yet (retrain it as a logistic, centroid or knn head)")]
    NotExportable(HeadKind),
    /// A value outside what a head can use: a hyper-parameter (see [`HeadParams`]), the
    /// temperature or threshold, a weight or an embedding value (see [`Head::validate`]).
    #[error(transparent)]
    Field(#[from] FieldError),
    /// Unknown head name.
    #[error("unknown head type {0:?} (choose auto, logistic, centroid, knn, bayes or finetune)")]
    UnknownKind(String),
}

/// The kinds of head graft can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// Multinomial logistic regression.
    Logistic,
    /// Nearest class mean by cosine (weight imprinting).
    Centroid,
    /// k nearest neighbours by cosine.
    Knn,
    /// Gaussian naive Bayes.
    Bayes,
    /// The backbone's top block (and with `--model NAME:deep` the block before it) fine-tuned
    /// with a linear classifier (examples cut before the blocks: `--model NAME:top` or
    /// `NAME:deep`).
    Finetune,
}

impl HeadKind {
    /// The fixed-feature kinds, in the order `auto` tries them (ties go to the earlier one);
    /// `auto` adds [`HeadKind::Finetune`] when the examples are top-block inputs.
    pub const ALL: [HeadKind; 4] = [
        HeadKind::Logistic,
        HeadKind::Centroid,
        HeadKind::Knn,
        HeadKind::Bayes,
    ];

    /// Every kind, the fixed-feature ones first.
    pub const EVERY: [HeadKind; 5] = [
        HeadKind::Logistic,
        HeadKind::Centroid,
        HeadKind::Knn,
        HeadKind::Bayes,
        HeadKind::Finetune,
    ];
}

impl fmt::Display for HeadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeadKind::Logistic => "logistic",
            HeadKind::Centroid => "centroid",
            HeadKind::Knn => "knn",
            HeadKind::Bayes => "bayes",
            HeadKind::Finetune => "finetune",
        })
    }
}

impl FromStr for HeadKind {
    type Err = HeadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HeadKind::EVERY
            .into_iter()
            .find(|k| k.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| HeadError::UnknownKind(s.to_string()))
    }
}

/// Hyper-parameters, with defaults chosen for a few shots on 1280-d unit vectors.
///
/// | name | default | range | meaning |
/// |---|---|---|---|
/// | `logistic_alpha` | 0.05 | > 0 | L2 penalty on the weights (sum of losses, not mean; scikit-learn's C = 1/alpha) |
/// | `logistic_max_iter` | 200 | >= 1 | L-BFGS iterations |
/// | `knn_k` | 5 | >= 1 | neighbours (capped at the number of examples) |
/// | `bayes_var_smoothing` | 1e-3 | > 0 | added variance, relative to the largest |
/// | `power` | [`DEFAULT_POWER`] | (0, 1] | the feature transform: each raw embedding value `v` becomes `sign(v)·|v|^power` before L2 normalisation; 1 is none (every head file without the field) |
/// | `finetune_rank` | 16 | 1–256 | rank of the fine-tuned change to the top block's weights |
/// | `finetune_l2sp` | 0.01 | >= 0 | L2-SP: penalty on the squared distance of the block from its pretrained weights |
/// | `finetune_lr` | 0.005 | > 0 | Adam's step size (the top block alone, `NAME:top`) |
/// | `finetune_deep_lr` | [`DEEP_LR`] | > 0 | Adam's step size one block deeper (`NAME:deep`: full-rank updates of four convolutions) |
/// | `finetune_epochs` | none | 0–1000 | epochs of fine-tuning; none: chosen by grouped CV among [`EPOCH_CHECKPOINTS`] (a trained head records its choice); one block deeper, [`DEEP_EPOCHS`] |
///
/// `top` is not a hyper-parameter and is never stored: it is the backbone's pretrained top
/// block, set when the examples are top-block inputs (`--model NAME:top`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadParams {
    /// L2 penalty of the logistic head.
    pub logistic_alpha: f64,
    /// Iteration cap of the logistic head.
    pub logistic_max_iter: u64,
    /// Neighbours of the k-NN head.
    pub knn_k: usize,
    /// Variance smoothing of the Bayes head.
    pub bayes_var_smoothing: f64,
    /// Exponent of the power transform applied to raw embeddings (see [`HeadParams::input`]).
    #[serde(default = "no_power")]
    pub power: f32,
    /// Rank of the fine-tuned change to the top block.
    #[serde(default = "default_rank")]
    pub finetune_rank: usize,
    /// L2-SP penalty of fine-tuning.
    #[serde(default = "default_l2sp")]
    pub finetune_l2sp: f64,
    /// Adam's step size in fine-tuning.
    #[serde(default = "default_lr")]
    pub finetune_lr: f64,
    /// Adam's step size one block deeper.
    #[serde(default = "default_deep_lr")]
    pub finetune_deep_lr: f64,
    /// Epochs of fine-tuning (`None`: chosen by cross-validation).
    #[serde(default)]
    pub finetune_epochs: Option<usize>,
    /// The backbone's pretrained top block when the examples are its inputs.
    #[serde(skip)]
    pub top: Option<std::sync::Arc<crate::backbone::TopBlock>>,
}

fn default_rank() -> usize {
    16
}

fn default_l2sp() -> f64 {
    0.01
}

fn default_lr() -> f64 {
    0.005
}

fn default_deep_lr() -> f64 {
    DEEP_LR
}

/// The power transform of new heads (`power` in [`HeadParams`]). 0.75: on the default
/// GeM-pooled features it was the best power on average over four photo sets at 2 and 5 shots,
/// and within 0.3 points of the best at 1 and 10 (0.5 was best on the plain average-pooled
/// features; docs/few-shot.md).
pub const DEFAULT_POWER: f32 = 0.75;

fn no_power() -> f32 {
    1.0
}

impl Default for HeadParams {
    fn default() -> Self {
        HeadParams {
            logistic_alpha: 0.05,
            logistic_max_iter: 200,
            knn_k: 5,
            bayes_var_smoothing: 1e-3,
            power: DEFAULT_POWER,
            finetune_rank: default_rank(),
            finetune_l2sp: default_l2sp(),
            finetune_lr: default_lr(),
            finetune_deep_lr: default_deep_lr(),
            finetune_epochs: None,
            top: None,
        }
    }
}

impl HeadParams {
    /// A raw embedding as the head sees it: the power transform (`sign(v)·|v|^power`, skipped
    /// at 1), then L2 normalisation. Training vectors and every prediction go through this one
    /// function; exports write the same arithmetic as ONNX operators.
    pub fn input(&self, raw: &[f32]) -> Vec<f32> {
        power_l2(self.power, raw)
    }

    /// Checks the ranges in the table above (fields named `params.*`, as head files store
    /// them).
    pub fn validate(&self) -> Result<(), HeadError> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(FieldError::new(field, v, "must be finite and > 0"))
            }
        };
        positive("params.logistic_alpha", self.logistic_alpha)?;
        positive("params.bayes_var_smoothing", self.bayes_var_smoothing)?;
        if self.logistic_max_iter < 1 {
            return Err(FieldError::new(
                "params.logistic_max_iter",
                self.logistic_max_iter,
                "must be >= 1",
            )
            .into());
        }
        if self.knn_k < 1 {
            return Err(FieldError::new("params.knn_k", self.knn_k, "must be >= 1").into());
        }
        if !(self.power > 0.0 && self.power <= 1.0) {
            return Err(FieldError::new("params.power", self.power, "must be in (0, 1]").into());
        }
        if !(1..=256).contains(&self.finetune_rank) {
            return Err(FieldError::new(
                "params.finetune_rank",
                self.finetune_rank,
                "must be in 1..=256",
            )
            .into());
        }
        if !(self.finetune_l2sp.is_finite() && self.finetune_l2sp >= 0.0) {
            return Err(FieldError::new(
                "params.finetune_l2sp",
                self.finetune_l2sp,
                "must be finite and >= 0",
            )
            .into());
        }
        positive("params.finetune_lr", self.finetune_lr)?;
        positive("params.finetune_deep_lr", self.finetune_deep_lr)?;
        if let Some(e) = self.finetune_epochs.filter(|e| *e > 1000) {
            return Err(
                FieldError::new("params.finetune_epochs", e, "must be at most 1000").into(),
            );
        }
        Ok(())
    }
}

/// The largest temperature a head may carry: a hundred times anything calibration has ever
/// written (its grid ended at 1e4), and small enough that `temperature · logit` stays finite.
pub const MAX_TEMPERATURE: f32 = 1e6;

/// The largest magnitude of any number a head is built from (weights, biases, raw embedding
/// values). Fitted heads are far below it (logistic weights are L2-penalised, centroids and
/// examples are unit vectors, backbone features are O(1–100)); the bound keeps every dot
/// product and norm of a 1280-d vector finite in f32, where a crafted 1e38 would overflow.
pub const MAX_ABS_VALUE: f32 = 1e6;

/// **The** check of a rejection threshold, wherever it comes from (a head file, `--threshold`,
/// an export's metadata, a kiosk setting): a number in [0, 1]. Returns it, so a reader can
/// write `validate_threshold(t)?`. NaN is refused: it would compare its way past every score.
///
/// ```
/// assert!(graft::head::validate_threshold(0.4).is_ok());
/// let err = graft::head::validate_threshold(5.0).unwrap_err();
/// assert_eq!(err.to_string(), "threshold = 5.0: must be a number in [0, 1]");
/// ```
pub fn validate_threshold(threshold: f32) -> Result<f32, HeadError> {
    Ok(FieldError::check_probability("threshold", threshold)?)
}

/// The check of a softmax temperature read back: finite, positive and at most
/// [`MAX_TEMPERATURE`]. A negative one would rank classes backwards, zero makes every score
/// `1 / classes`. Training is stricter ([`TemperatureRange`]); this only refuses what cannot
/// rank, so heads an earlier release calibrated to 1e-4 still load and predict as they did.
pub fn validate_temperature(temperature: f32) -> Result<f32, HeadError> {
    if temperature > 0.0 && temperature <= MAX_TEMPERATURE {
        Ok(temperature)
    } else {
        Err(FieldError::new(
            "temperature",
            temperature,
            format!("must be in (0, {MAX_TEMPERATURE:e}]"),
        )
        .into())
    }
}

/// Checks that every number of `values` is finite and at most [`MAX_ABS_VALUE`] in
/// magnitude; the error names `field` and the first value that is not.
pub(crate) fn validate_values(field: &str, values: &[f32]) -> Result<(), HeadError> {
    match values
        .iter()
        .position(|v| !v.is_finite() || v.abs() > MAX_ABS_VALUE)
    {
        None => Ok(()),
        Some(i) => Err(FieldError::new(
            format!("{field}[{i}]"),
            values[i],
            format!("must be finite, at most {MAX_ABS_VALUE:e} in magnitude"),
        )
        .into()),
    }
}

/// True when a best score of `score` is accepted as a known label under `threshold`: the one
/// comparison, used by [`Prediction::from_scores`] and the live smoother. A score or threshold
/// that is not a number, or a score that is not finite, is never accepted.
pub fn passes(score: f32, threshold: f32) -> bool {
    score.is_finite() && score >= threshold
}

/// A fitted model: the part of a head that turns a unit vector into logits. Opaque: the linfa
/// types inside stay in this module.
#[derive(Debug, Clone)]
pub struct Model(pub(crate) fit::Inner);

impl PartialEq for Model {
    fn eq(&self, other: &Self) -> bool {
        self.linear() == other.linear() && self.dim() == other.dim()
    }
}

impl Model {
    /// Input size.
    pub fn dim(&self) -> usize {
        self.0.dim()
    }

    /// Raw logits for one unit vector.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        self.0.logits(x)
    }

    /// Probabilities `softmax(temperature · logits)`.
    pub fn probabilities(&self, x: &[f32], temperature: f32) -> Vec<f32> {
        let l: Vec<f32> = self
            .logits(x)
            .into_iter()
            .map(|v| v * temperature)
            .collect();
        softmax(&l)
    }

    /// For linear heads, the weights (`classes × dim`, row-major) and biases; these are what a
    /// head file stores, since a refit is not bit-exact. Other heads are rebuilt exactly from
    /// the stored examples.
    pub fn linear(&self) -> Option<(&[f32], &[f32])> {
        match &self.0 {
            fit::Inner::Linear { weights, bias, .. } => Some((weights, bias)),
            fit::Inner::Trunk { inner, .. } => match &**inner {
                fit::Inner::Linear { weights, bias, .. } => Some((weights, bias)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Checks the model's numbers against its `classes` and its size: every weight, bias,
    /// centroid and stored example finite and within [`MAX_ABS_VALUE`] (named as head files
    /// store them: `linear_weights`, `linear_bias`), and as many of each as classes × size.
    pub fn validate(&self, classes: usize) -> Result<(), HeadError> {
        if let fit::Inner::Trunk { block, inner, .. } = &self.0 {
            block
                .validate()
                .map_err(|reason| FieldError::new("top_block", &block.node, reason))?;
            if inner.dim() != block.cout {
                return Err(FieldError::new(
                    "dim",
                    inner.dim(),
                    format!("the top block makes {} features", block.cout),
                )
                .into());
            }
            return Model((**inner).clone()).validate(classes);
        }
        let dim = self.dim();
        if dim == 0 {
            return Err(
                FieldError::new("dim", dim, "a head needs embeddings of 1 value or more").into(),
            );
        }
        let count = |field: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(FieldError::new(
                    field,
                    got,
                    format!("must hold {want} values ({classes} classes of {dim})"),
                ))
            }
        };
        match &self.0 {
            fit::Inner::Linear { weights, bias, .. } => {
                count("linear_weights.len", weights.len(), classes * dim)?;
                count("linear_bias.len", bias.len(), classes)?;
                validate_values("linear_weights", weights)?;
                validate_values("linear_bias", bias)?;
            }
            fit::Inner::Centroid { centroids, .. } => {
                count("centroids.len", centroids.len(), classes * dim)?;
                validate_values("centroids", centroids)?;
            }
            fit::Inner::Knn {
                examples,
                labels,
                classes: c,
                ..
            } => {
                count("classes", *c, classes)?;
                count("knn examples.len", examples.len(), labels.len() * dim)?;
                if let Some(l) = labels.iter().find(|l| **l >= classes) {
                    return Err(FieldError::new(
                        "knn labels",
                        l,
                        format!("must be below {classes}"),
                    )
                    .into());
                }
                validate_values("knn examples", examples)?;
            }
            fit::Inner::Bayes { classes: c, .. } => count("classes", *c, classes)?,
            fit::Inner::Trunk { .. } => {}
        }
        Ok(())
    }

    /// For a head behind the backbone's top block (examples cut with `NAME:top`): the block it
    /// runs (fine-tuned or pretrained) and the power transform after its pool.
    pub fn top_block(&self) -> Option<(&crate::backbone::TopBlock, f32)> {
        match &self.0 {
            fit::Inner::Trunk { block, power, .. } => Some((block, *power)),
            _ => None,
        }
    }

    /// The model after the top block (the model itself when there is none).
    pub fn after_top(&self) -> Model {
        match &self.0 {
            fit::Inner::Trunk { inner, .. } => Model((**inner).clone()),
            other => Model(other.clone()),
        }
    }

    /// Puts `block` (with the power transform after its pool) in front of a model fitted on
    /// its features: how a head file rebuilds a head behind the top block.
    pub fn behind(block: crate::backbone::TopBlock, power: f32, model: Model) -> Model {
        Model(fit::Inner::Trunk {
            block: Box::new(block),
            power,
            inner: Box::new(model.0),
        })
    }

    /// A linear model from stored weights.
    pub fn from_linear(weights: Vec<f32>, bias: Vec<f32>) -> Result<Model, HeadError> {
        if bias.is_empty() || !weights.len().is_multiple_of(bias.len()) {
            return Err(HeadError::NotEnoughData(format!(
                "linear weights of length {} do not match {} classes",
                weights.len(),
                bias.len()
            )));
        }
        let dim = weights.len() / bias.len();
        Ok(Model(fit::Inner::Linear { weights, bias, dim }))
    }
}

/// A ready-to-use head: model, class names, temperature and rejection threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Which algorithm.
    pub kind: HeadKind,
    /// Class names, index = class id.
    pub labels: Vec<String>,
    /// The fitted model.
    pub model: Model,
    /// Softmax temperature fitted by cross-validation.
    pub temperature: f32,
    /// Best scores below this are `unknown`.
    pub threshold: f32,
    /// Hyper-parameters used.
    pub params: HeadParams,
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    /// Class name.
    pub label: String,
    /// Probability in [0, 1].
    pub score: f32,
}

/// What a head says about one embedding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The best class, or `unknown` when its score is below the threshold.
    pub label: String,
    /// The best class's score.
    pub score: f32,
    /// True when the best score is below the threshold.
    pub unknown: bool,
    /// The best class whatever the threshold.
    pub best: String,
    /// The top classes, best first.
    pub top: Vec<LabelScore>,
}

impl Prediction {
    /// Builds a prediction from per-class probabilities (`labels.len()` of them).
    ///
    /// The one place scores become a label: if any score is not finite (a damaged export, an
    /// overflow) the answer is `unknown` whatever the threshold, and the best is [`passes`]ed
    /// against the threshold, so NaN never gets through a comparison.
    pub fn from_scores(labels: &[String], probs: &[f32], threshold: f32, top: usize) -> Prediction {
        let n = probs.len().min(labels.len());
        let mut idx: Vec<usize> = (0..n).collect();
        // Non-finite scores rank last, so `best` is a number whenever there is one.
        let rank = |i: usize| Some(probs[i]).filter(|p| p.is_finite());
        idx.sort_by(|a, b| {
            rank(*b)
                .partial_cmp(&rank(*a))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let best = idx.first().copied().unwrap_or(0);
        let score = probs.get(best).copied().unwrap_or(0.0);
        let name = labels
            .get(best)
            .cloned()
            .unwrap_or_else(|| UNKNOWN.to_string());
        let sound = probs[..n].iter().all(|p| p.is_finite());
        let unknown = !(sound && passes(score, threshold));
        Prediction {
            label: if unknown {
                UNKNOWN.to_string()
            } else {
                name.clone()
            },
            score,
            unknown,
            best: name,
            top: idx
                .into_iter()
                .take(top.max(1))
                .map(|i| LabelScore {
                    label: labels[i].clone(),
                    score: probs[i],
                })
                .collect(),
        }
    }
}

/// What `unknown` predictions are called.
pub const UNKNOWN: &str = "unknown";

impl Head {
    /// **The** check of a head, however it came in (a head file, a refit, a library user's own
    /// head): at least one class, hyper-parameters in range ([`HeadParams::validate`]), a
    /// temperature that can rank ([`validate_temperature`]), a threshold in [0, 1]
    /// ([`validate_threshold`]), and a model whose numbers are finite and fit its classes
    /// ([`Model::validate`]). `store::headfile` runs it on every read and before every write.
    pub fn validate(&self) -> Result<(), HeadError> {
        if self.labels.is_empty() {
            return Err(
                FieldError::new("labels", &self.labels, "a head needs at least one class").into(),
            );
        }
        self.params.validate()?;
        validate_temperature(self.temperature)?;
        validate_threshold(self.threshold)?;
        self.model.validate(self.labels.len())
    }

    /// The head as plain matrices for [`crate::backbone::export`]: linear heads (logistic,
    /// centroid) as `W·x + b`, k-NN as its stored examples.
    pub fn export_ops(&self) -> Result<crate::backbone::export::HeadOps, HeadError> {
        use crate::backbone::export::HeadOps;
        // Behind the top block: the classifier's ops (the block goes into the backbone's
        // graph, see `ExportHead::top`).
        let model = match &self.model.0 {
            fit::Inner::Trunk { inner, .. } => &**inner,
            other => other,
        };
        match model {
            fit::Inner::Linear { weights, bias, .. } => Ok(HeadOps::Linear {
                weights: weights.clone(),
                bias: bias.clone(),
            }),
            fit::Inner::Centroid { centroids, dim } => Ok(HeadOps::Linear {
                weights: centroids.clone(),
                // A class without examples has a zero centroid and must never win.
                bias: centroids
                    .chunks_exact(*dim)
                    .map(|c| {
                        if c.iter().all(|v| *v == 0.0) {
                            fit::ABSENT
                        } else {
                            0.0
                        }
                    })
                    .collect(),
            }),
            fit::Inner::Knn {
                k,
                examples,
                labels,
                ..
            } => Ok(HeadOps::Knn {
                k: *k,
                examples: examples.clone(),
                labels: labels.clone(),
            }),
            fit::Inner::Bayes { .. } | fit::Inner::Trunk { .. } => {
                Err(HeadError::NotExportable(self.kind))
            }
        }
    }

    /// Per-class probabilities for a raw (not yet normalised) embedding.
    pub fn scores(&self, embedding: &[f32]) -> Result<Vec<f32>, HeadError> {
        let want = self.model.dim();
        if embedding.len() != want {
            return Err(HeadError::Dimension {
                got: embedding.len(),
                want,
            });
        }
        Ok(self
            .model
            .probabilities(&self.input(embedding), self.temperature))
    }

    /// A raw embedding as this head's model takes it: through the power transform and L2
    /// ([`HeadParams::input`]), or as it is for a head behind the top block, whose model
    /// pools and transforms after the block.
    pub fn input(&self, raw: &[f32]) -> Vec<f32> {
        match self.model.top_block() {
            Some(_) => raw.to_vec(),
            None => self.params.input(raw),
        }
    }

    /// Predicts from a raw (not yet normalised) embedding; `threshold` overrides the head's own.
    pub fn predict(
        &self,
        embedding: &[f32],
        threshold: Option<f32>,
        top: usize,
    ) -> Result<Prediction, HeadError> {
        let probs = self.scores(embedding)?;
        Ok(Prediction::from_scores(
            &self.labels,
            &probs,
            threshold.unwrap_or(self.threshold),
            top,
        ))
    }
}

/// The pooled features a top block (`crate::backbone::TopBlock`, pretrained or
/// fine-tuned) makes of one example cut before it (`--model NAME:top`): `cout` values, what the
/// uncut backbone's features output gives for the pretrained block.
pub fn top_features(block: &crate::backbone::TopBlock, raw: &[f32]) -> Result<Vec<f32>, HeadError> {
    if raw.len() != block.input_size() {
        return Err(HeadError::Dimension {
            got: raw.len(),
            want: block.input_size(),
        });
    }
    Ok(finetune::features(block, raw))
}

/// `sign(v)·|v|^power` (skipped at 1), then unit length: [`HeadParams::input`], and what a head
/// behind the top block does to the block's pooled features.
pub(crate) fn power_l2(power: f32, raw: &[f32]) -> Vec<f32> {
    if power == 1.0 {
        return normalize(raw);
    }
    let powered: Vec<f32> = raw
        .iter()
        .map(|v| v.signum() * v.abs().powf(power))
        .collect();
    normalize(&powered)
}

/// A unit-length copy of `v` (zero stays zero).
pub fn normalize(v: &[f32]) -> Vec<f32> {
    crate::backbone::l2_normalized(v)
}

/// Separable synthetic examples for timing heads: `classes` random centres on the positive
/// orthant of the `dim`-sphere, `shots` unit vectors jittered around each (seeded, so every run
/// times the same problem). The cost of fitting depends on n, d and classes, not on what the
/// pictures showed, so `graft bench` and `benches/heads.rs` time heads on these. Every example
/// is its own object (as photos without `<object>_<n>` names); classes are named `c0, c1, ...`.
pub fn synthetic(classes: usize, shots: usize, dim: usize, seed: u64) -> Examples {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| {
            normalize(
                &(0..dim)
                    .map(|_| rng.gen_range(0.0f32..1.0))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut x = Vec::with_capacity(classes * shots);
    let mut y = Vec::with_capacity(classes * shots);
    for (c, centre) in centres.iter().enumerate() {
        for _ in 0..shots {
            let v: Vec<f32> = centre
                .iter()
                .map(|m| m + rng.gen_range(-0.02f32..0.02))
                .collect();
            x.push(normalize(&v));
            y.push(c);
        }
    }
    let n = x.len();
    Examples {
        x,
        y,
        groups: (0..n).collect(),
        labels: (0..classes).map(|c| format!("c{c}")).collect(),
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) use crate::backbone::softmax;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_case_insensitively_and_round_trip() {
        for k in HeadKind::EVERY {
            assert_eq!(k.to_string().to_uppercase().parse::<HeadKind>().unwrap(), k);
        }
        assert!("svm".parse::<HeadKind>().is_err());
    }

    #[test]
    fn predict_reports_unknown_below_threshold_with_best_guess() {
        let head = Head {
            kind: HeadKind::Centroid,
            labels: vec!["a".into(), "b".into()],
            model: Model(fit::Inner::Centroid {
                centroids: vec![1.0, 0.0, 0.0, 1.0],
                dim: 2,
            }),
            temperature: 10.0,
            threshold: 0.9,
            params: HeadParams::default(),
        };
        let p = head.predict(&[3.0, 0.1], None, 3).unwrap();
        assert_eq!((p.label.as_str(), p.unknown), ("a", false));
        let p = head.predict(&[1.0, 0.9], None, 3).unwrap();
        assert_eq!(
            (p.label.as_str(), p.best.as_str(), p.unknown),
            (UNKNOWN, "a", true)
        );
        let p = head.predict(&[1.0, 0.9], Some(0.0), 1).unwrap();
        assert_eq!((p.label.as_str(), p.top.len()), ("a", 1));
        assert!(head.predict(&[1.0], None, 1).is_err());
    }

    /// Regression (issue 9): a NaN score compared false with `score < threshold`, so it passed
    /// as a known label. Whatever the head or export produced, a non-finite score (or threshold)
    /// is `unknown` at the one place scores become a label.
    #[test]
    fn non_finite_scores_never_pass_the_threshold() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let cases: &[(&str, [f32; 2], f32)] = &[
            ("all NaN", [nan, nan], 0.5),
            ("one NaN", [0.9, nan], 0.5),
            ("NaN first", [nan, 0.9], 0.5),
            ("infinite", [inf, 0.0], 0.5),
            ("NaN threshold", [0.9, 0.1], nan),
            ("zero threshold, NaN scores", [nan, nan], 0.0),
        ];
        for (name, probs, threshold) in cases {
            let p = Prediction::from_scores(&labels, probs, *threshold, 2);
            assert!(p.unknown, "{name}: {p:?}");
            assert_eq!(p.label, UNKNOWN, "{name}");
        }
        let p = Prediction::from_scores(&labels, &[0.9, 0.1], 0.5, 2);
        assert_eq!((p.label.as_str(), p.unknown), ("a", false));
        // A head built in code, past every file check, with weights that overflow f32.
        let head = Head {
            kind: HeadKind::Logistic,
            labels,
            model: Model::from_linear(vec![3e38, 3e38, -3e38, -3e38], vec![0.0, 0.0]).unwrap(),
            temperature: 1.0,
            threshold: 0.5,
            params: HeadParams::default(),
        };
        let p = head.predict(&[1.0, 1.0], None, 2).unwrap();
        assert!(p.unknown, "{p:?}");
    }
}

/// The outcome of [`train`]: the head and how it was chosen and validated.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The fitted, calibrated head.
    pub head: Head,
    /// Cross-validation of the chosen kind (its held-out accuracy and method).
    pub report: CvReport,
    /// For `--head auto`: every candidate's report.
    pub candidates: Vec<CvReport>,
    /// For `--head auto`: why this kind, and how sure.
    pub reason: Option<String>,
    /// How temperature and threshold were set.
    pub calibration: Calibration,
}

/// Trains a head on unit vectors: cross-validates (choosing the kind when `kind` is `None`;
/// photos of one object are held out together, see [`cross_validate`]), fits temperature and
/// threshold from held-out scores, then fits on everything.
pub fn train(
    kind: Option<HeadKind>,
    ex: &Examples,
    params: &HeadParams,
    seed: u64,
) -> Result<Trained, HeadError> {
    let present = ex.present_classes().len();
    if present < 2 {
        return Err(HeadError::NotEnoughData(format!(
            "need examples of at least 2 classes to train, got {present} ({})",
            ex.labels.join(", ")
        )));
    }
    if let Some(block) = params.top.clone() {
        return train_top(kind, ex, params, &block, seed);
    }
    if kind == Some(HeadKind::Finetune) {
        return Err(HeadError::NotEnoughData(fit::NEEDS_TOP.into()));
    }
    let (chosen, report, candidates, reason) = match kind {
        Some(k) => {
            let r = cross_validate(k, ex, params, seed)?;
            (k, r, Vec::new(), None)
        }
        None => {
            let sel = auto_select(ex, params, seed)?;
            let r = sel
                .reports
                .iter()
                .find(|r| r.kind == sel.chosen)
                .cloned()
                .ok_or_else(|| HeadError::NotEnoughData("no candidate head".into()))?;
            (sel.chosen, r, sel.reports, Some(sel.reason))
        }
    };
    let calibration = calibrate(&report, ex, params)?;
    let model = fit(chosen, &ex.x, &ex.y, ex.classes(), params)?;
    Ok(Trained {
        head: Head {
            kind: chosen,
            labels: ex.labels.clone(),
            model,
            temperature: calibration.temperature,
            threshold: calibration.threshold,
            params: params.clone(),
        },
        report,
        candidates,
        reason,
        calibration,
    })
}

/// [`train`] on top-block inputs (`params.top` set): the fixed-feature kinds are
/// cross-validated on the pretrained block's features (computed once) and put behind the
/// block; `finetune` chooses its epochs by grouped cross-validation (early stopping, see
/// [`finetune_cv`]); `auto` compares all five on the same held-out examples, against
/// logistic regression ([`cv::AUTO_PRIOR`]) or, one block deeper, fine-tuning
/// ([`cv::AUTO_PRIOR_DEEP`]).
fn train_top(
    kind: Option<HeadKind>,
    ex: &Examples,
    params: &HeadParams,
    block: &crate::backbone::TopBlock,
    seed: u64,
) -> Result<Trained, HeadError> {
    if let Some(bad) = ex.x.iter().find(|x| x.len() != block.input_size()) {
        return Err(HeadError::Dimension {
            got: bad.len(),
            want: block.input_size(),
        });
    }
    let plain = HeadParams {
        top: None,
        ..params.clone()
    };
    let features = Examples {
        x: finetune::transformed_features(block, params.power, &ex.x),
        ..ex.clone()
    };
    let behind = |mut t: Trained| {
        t.head.model = Model::behind(block.clone(), params.power, t.head.model);
        t.head.params = plain.clone();
        t
    };
    match kind {
        Some(HeadKind::Finetune) => {
            let (report, epochs) = finetune_cv(ex, params, seed)?;
            finish_finetune(ex, params, report, epochs, Vec::new(), None)
        }
        Some(k) => Ok(behind(train(Some(k), &features, &plain, seed)?)),
        None => {
            // Every candidate on the folds fine-tuning is scored on: the paired comparison
            // then sets heads trained on the same photos against each other (the fixed heads'
            // own leave-one-object-out trains on more of them than fine-tuning's few folds,
            // which favoured them).
            let (tuned, epochs) = finetune_cv(ex, params, seed)?;
            let plan = cv::finetune_folds(ex, block.pre.is_some(), seed);
            let mut reports = HeadKind::ALL
                .into_iter()
                .map(|k| cv::cross_validate_on(k, &features, &plain, &plan))
                .collect::<Result<Vec<_>, _>>()?;
            reports.push(tuned);
            let prior = if block.pre.is_some() {
                cv::AUTO_PRIOR_DEEP
            } else {
                cv::AUTO_PRIOR
            };
            let sel = cv::choose_among(&features, reports, prior)?;
            if sel.chosen == HeadKind::Finetune {
                let report = sel
                    .reports
                    .iter()
                    .find(|r| r.kind == HeadKind::Finetune)
                    .cloned()
                    .ok_or_else(|| HeadError::NotEnoughData("no finetune report".into()))?;
                finish_finetune(ex, params, report, epochs, sel.reports, Some(sel.reason))
            } else {
                let mut t = behind(train(Some(sel.chosen), &features, &plain, seed)?);
                t.candidates = sel.reports;
                t.reason = Some(sel.reason);
                Ok(t)
            }
        }
    }
}

/// Early stopping for `finetune` by grouped cross-validation: the held-out report at the
/// chosen number of epochs, and that number ([`EPOCH_CHECKPOINTS`]; 0 keeps the pretrained
/// block under the linear probe). With `params.finetune_epochs` set, that count is the only
/// one tried.
pub fn finetune_cv(
    ex: &Examples,
    params: &HeadParams,
    seed: u64,
) -> Result<(CvReport, usize), HeadError> {
    let block = params
        .top
        .as_ref()
        .ok_or_else(|| HeadError::NotEnoughData(fit::NEEDS_TOP.into()))?;
    let plan = cv::finetune_folds(ex, block.pre.is_some(), seed);
    let per = finetune::checkpoint_logits(block, &ex.x, &ex.y, ex.classes(), &plan, params)?;
    let (c, epochs, _) = finetune::choose_epochs(block, &per, &ex.y, params);
    let (held_out, novel) = per.into_iter().nth(c).unwrap_or_default();
    let method = format!("{} (early stopping: {epochs} epochs)", plan.method);
    Ok((
        cv::report(HeadKind::Finetune, method, &ex.y, held_out, novel),
        epochs,
    ))
}

fn finish_finetune(
    ex: &Examples,
    params: &HeadParams,
    report: CvReport,
    epochs: usize,
    candidates: Vec<CvReport>,
    reason: Option<String>,
) -> Result<Trained, HeadError> {
    let tuned = HeadParams {
        finetune_epochs: Some(epochs),
        ..params.clone()
    };
    let calibration = calibrate(&report, ex, &tuned)?;
    let model = fit(HeadKind::Finetune, &ex.x, &ex.y, ex.classes(), &tuned)?;
    Ok(Trained {
        head: Head {
            kind: HeadKind::Finetune,
            labels: ex.labels.clone(),
            model,
            temperature: calibration.temperature,
            threshold: calibration.threshold,
            params: HeadParams { top: None, ..tuned },
        },
        report,
        candidates,
        reason,
        calibration,
    })
}
