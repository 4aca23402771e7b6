//! The head file (`*.graft`): one self-describing file holding a trained head *and* the
//! embeddings it was trained on, so adding examples, switching head type or re-evaluating never
//! re-runs the backbone on old images.
//!
//! Layout (all little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 11 | magic `GRAFT-HEAD\n` |
//! | 4 | `u32` length H of the header |
//! | H | JSON header: format, backbone identity, labels, head type, params, temperature, threshold, linear weights, CV summary, and per example its label, source path and image sha256 |
//! | 4·n·dim | the raw training embeddings, `f32`, one row per example in header order |
//! | 4·(cout·cin + cout) | formats 3 and 4: the top block's weights, then its biases (`f32`) |
//! | 4·(block values) | format 4 only: the block before it, expand weights and biases, depthwise weights and biases, project weights and biases (`f32`) |
//! | 32 | sha256 of every byte above — a truncated or damaged file is refused |
//!
//! Files are written atomically ([`super::write_atomic`]). Format 1 is the first. Format 2 adds
//! the power transform (`params.power`): a head with `power ≠ 1` is written as format 2, so a
//! graft that predates the transform refuses it instead of predicting without it; a head
//! without one is still written as format 1. Format 3 is a head behind the backbone's top
//! block (`--model NAME:top`, a `finetune` head or a fixed-feature head on such examples): the
//! header's `top_block` gives the block's shape, its numbers follow the embeddings. Format 4
//! is a head one block deeper (`--model NAME:deep`): `top_block.pre` gives the shape of the
//! block before the top block, its numbers follow the top block's. A newer format is refused
//! with a message saying so.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::files::group_key;
use super::{write_atomic, StoreError};
use crate::backbone::{BackboneId, TopBlock};
use crate::head::{self, Examples, FieldError, Head, HeadError, HeadKind, HeadParams, Model};

const MAGIC: &[u8] = b"GRAFT-HEAD\n";
/// Format version written for heads with a power transform.
pub const FORMAT: u32 = 2;
/// The format of heads that need nothing format 2 added (readable by every release).
const FORMAT_PLAIN: u32 = 1;
/// The format of heads behind the backbone's top block (fine-tuned, `--model NAME:top`).
pub const FORMAT_TOP: u32 = 3;
/// The format of heads behind the top block and the block before it (`--model NAME:deep`).
pub const FORMAT_DEEP: u32 = 4;

/// One training example: where it came from and its embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Class id (index into the labels).
    pub label: usize,
    /// The image path it was made from (as given when it was added).
    pub path: PathBuf,
    /// sha256 of the image bytes.
    pub sha256: String,
    /// The raw embedding.
    pub embedding: Vec<f32>,
}

/// Everything a head file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadFile {
    /// The backbone the embeddings come from.
    pub backbone: BackboneId,
    /// The trained head.
    pub head: Head,
    /// The training set.
    pub examples: Vec<Example>,
    /// Held-out accuracy measured when the head was trained, if any.
    pub cv_accuracy: Option<f64>,
    /// How the CV was run (`loo`, `kfold-5`).
    pub cv_method: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ExampleMeta {
    label: usize,
    path: PathBuf,
    sha256: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    backbone: BackboneId,
    labels: Vec<String>,
    kind: HeadKind,
    params: HeadParams,
    temperature: f32,
    threshold: f32,
    #[serde(default)]
    linear_weights: Option<Vec<f32>>,
    #[serde(default)]
    linear_bias: Option<Vec<f32>>,
    #[serde(default)]
    cv_accuracy: Option<f64>,
    #[serde(default)]
    cv_method: Option<String>,
    examples: Vec<ExampleMeta>,
    /// A head behind the backbone's top block (format 3): the block's shape; its weights
    /// (`cout × cin`, then `cout` biases) follow the embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_block: Option<TopMeta>,
}

#[derive(Serialize, Deserialize)]
struct TopMeta {
    node: String,
    cin: usize,
    cout: usize,
    positions: usize,
    clip_lo: f32,
    /// `None`: no upper bound (a plain ReLU).
    clip_hi: Option<f32>,
    gem_power: Option<f32>,
    /// The power transform after the pool.
    power: f32,
    /// Format 4: the block before the top block (`NAME:deep`); its numbers follow the top
    /// block's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pre: Option<PreMeta>,
}

/// The shape of a [`crate::backbone::Mbconv`]; its numbers (expand weights and biases,
/// depthwise weights and biases, project weights and biases) follow the top block's.
#[derive(Serialize, Deserialize)]
struct PreMeta {
    node: String,
    cin: usize,
    hidden: usize,
    cout: usize,
    side: usize,
    kernel: usize,
    expand_clip: (f32, Option<f32>),
    depthwise_clip: (f32, Option<f32>),
    /// `None` for an unbounded end.
    project_clip: (Option<f32>, Option<f32>),
    reads: [String; 4],
}

impl PreMeta {
    /// How many numbers the block holds, or `None` past [`MAX_MODEL_VALUES`].
    fn values(&self) -> Option<usize> {
        let k2 = self.kernel.checked_mul(self.kernel)?;
        let parts = [
            self.hidden.checked_mul(self.cin)?,
            self.hidden,
            self.hidden.checked_mul(k2)?,
            self.hidden,
            self.cout.checked_mul(self.hidden)?,
            self.cout,
        ];
        parts
            .iter()
            .try_fold(0usize, |a, b| a.checked_add(*b))
            .filter(|v| *v <= MAX_MODEL_VALUES)
    }
}

fn finite(hi: f32) -> Option<f32> {
    Some(hi).filter(|v| v.is_finite())
}

/// The training form of stored examples: their raw embeddings through the head's input
/// transform ([`HeadParams::input`]: power, then unit length), class ids, and one group per
/// object (`<object>_<n>.jpg` names, see [`group_key`]) within its class. The one conversion
/// from stored examples to what the heads fit on.
pub fn training_examples(labels: &[String], examples: &[Example], params: &HeadParams) -> Examples {
    let keys: Vec<String> = examples
        .iter()
        .map(|e| format!("{}/{}", e.label, group_key(&e.path)))
        .collect();
    Examples {
        // Top-block inputs go to the heads as they are: the block pools and transforms.
        x: examples
            .iter()
            .map(|e| match params.top {
                Some(_) => e.embedding.clone(),
                None => params.input(&e.embedding),
            })
            .collect(),
        y: examples.iter().map(|e| e.label).collect(),
        groups: head::group_ids(&keys),
        labels: labels.to_vec(),
    }
}

/// The largest embedding size a head file may declare: far above any backbone's (1280 for
/// the bundled one); a crafted size is refused before any arithmetic or allocation uses it.
pub const MAX_DIM: usize = 1 << 20;

/// The most numbers a head's model may hold, classes × embedding size: 2^26 `f32` (256 MB),
/// over 50 000 classes of the bundled backbone's 1280 values. Reading a centroid head rebuilds
/// one row per class, so a file must not be able to list classes it has no room for: a 180 KB
/// file naming 20 000 classes of 30 000 values asked for 2.4 GB (found while writing the
/// `headfile` fuzz target, whose inputs stayed too small to reach it; its binary confirmed it).
pub const MAX_MODEL_VALUES: usize = 1 << 26;

/// The examples' part of [`HeadFile::validate`], on its own so that [`read`] can run it before
/// rebuilding a model from them: the embedding size in `1..=MAX_DIM`, at most
/// [`MAX_MODEL_VALUES`] for all classes together, every label a class, every embedding of that
/// size with finite values in range.
fn validate_examples(dim: usize, classes: usize, examples: &[Example]) -> Result<(), HeadError> {
    if !(1..=MAX_DIM).contains(&dim) {
        return Err(
            FieldError::new("backbone.dim", dim, format!("must be in 1..={MAX_DIM}")).into(),
        );
    }
    if classes
        .checked_mul(dim)
        .is_none_or(|values| values > MAX_MODEL_VALUES)
    {
        return Err(FieldError::new(
            "labels.len",
            classes,
            format!(
                "{classes} classes of {dim} values are more than a head may hold ({MAX_MODEL_VALUES})"
            ),
        )
        .into());
    }
    for (i, e) in examples.iter().enumerate() {
        if e.label >= classes {
            return Err(FieldError::new(
                format!("examples[{i}].label"),
                e.label,
                format!("must be one of the {classes} classes"),
            )
            .into());
        }
        if e.embedding.len() != dim {
            return Err(FieldError::new(
                format!("examples[{i}].embedding.len"),
                e.embedding.len(),
                format!("must be backbone.dim ({dim})"),
            )
            .into());
        }
        head::validate_values(&format!("examples[{i}]"), &e.embedding)?;
    }
    Ok(())
}

impl HeadFile {
    /// **The** check of a head file's content, run by [`read`] on every file and by [`write()`]
    /// before every write (so nothing graft writes is refused when read back): the examples
    /// (size, labels, finite values) and the head itself ([`Head::validate`]: classes,
    /// temperature, threshold, hyper-parameters, weights), which must be as wide as the
    /// backbone's embeddings.
    pub fn validate(&self) -> Result<(), HeadError> {
        let dim = self.backbone.dim;
        validate_examples(dim, self.head.labels.len(), &self.examples)?;
        self.head.validate()?;
        if self.head.model.dim() != dim {
            return Err(FieldError::new(
                "backbone.dim",
                dim,
                format!("must match the head's {} values", self.head.model.dim()),
            )
            .into());
        }
        Ok(())
    }

    /// Examples per class, in label order.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.head.labels.len()];
        for e in &self.examples {
            c[e.label] += 1;
        }
        c
    }
}

/// Writes a head file atomically, after [`HeadFile::validate`]: the bytes of [`to_bytes`].
pub fn write(path: &Path, file: &HeadFile) -> Result<(), StoreError> {
    let bytes = to_bytes(file, path)?;
    write_atomic(path, |w| w.write_all(&bytes))
}

/// A head file's bytes, after [`HeadFile::validate`] (what [`write()`] puts on disk and
/// [`from_bytes`] reads back); `path` only names the file in errors.
pub fn to_bytes(file: &HeadFile, path: &Path) -> Result<Vec<u8>, StoreError> {
    file.validate().map_err(|e| StoreError::invalid(path, e))?;
    let h = &file.head;
    let linear = h.model.linear();
    let top = h.model.top_block();
    let header = Header {
        format: if top.is_some_and(|(b, _)| b.pre.is_some()) {
            FORMAT_DEEP
        } else if top.is_some() {
            FORMAT_TOP
        } else if h.params.power == 1.0 {
            FORMAT_PLAIN
        } else {
            FORMAT
        },
        top_block: top.map(|(b, power)| TopMeta {
            node: b.node.clone(),
            cin: b.cin,
            cout: b.cout,
            positions: b.positions,
            clip_lo: b.clip.0,
            clip_hi: Some(b.clip.1).filter(|v| v.is_finite()),
            gem_power: b.gem_power,
            power,
            pre: b.pre.as_ref().map(|p| PreMeta {
                node: p.node.clone(),
                cin: p.cin,
                hidden: p.hidden,
                cout: p.cout,
                side: p.side,
                kernel: p.kernel,
                expand_clip: (p.expand_clip.0, finite(p.expand_clip.1)),
                depthwise_clip: (p.depthwise_clip.0, finite(p.depthwise_clip.1)),
                project_clip: (finite(p.project_clip.0), finite(p.project_clip.1)),
                reads: p.reads.clone(),
            }),
        }),
        backbone: file.backbone.clone(),
        labels: h.labels.clone(),
        kind: h.kind,
        params: h.params.clone(),
        temperature: h.temperature,
        threshold: h.threshold,
        linear_weights: linear.map(|(w, _)| w.to_vec()),
        linear_bias: linear.map(|(_, b)| b.to_vec()),
        cv_accuracy: file.cv_accuracy,
        cv_method: file.cv_method.clone(),
        examples: file
            .examples
            .iter()
            .map(|e| ExampleMeta {
                label: e.label,
                path: e.path.clone(),
                sha256: e.sha256.clone(),
            })
            .collect(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| StoreError::format(path, e.to_string()))?;
    let mut bytes = Vec::with_capacity(
        MAGIC.len() + 4 + json.len() + file.examples.len() * file.backbone.dim * 4 + 32,
    );
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&json);
    for e in &file.examples {
        for v in &e.embedding {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    if let Some((b, _)) = top {
        for v in b.weights.iter().chain(&b.bias) {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        if let Some(p) = &b.pre {
            for v in p
                .expand_w
                .iter()
                .chain(&p.expand_b)
                .chain(&p.depthwise_w)
                .chain(&p.depthwise_b)
                .chain(&p.project_w)
                .chain(&p.project_b)
            {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    Ok(bytes)
}

/// Reads and verifies a head file, rebuilding the model (exactly, from the stored examples, for
/// every head type but logistic, whose stored weights are used as they are): [`from_bytes`] on
/// the file's content.
pub fn read(path: &Path) -> Result<HeadFile, StoreError> {
    let bytes = crate::userfile::read(path).map_err(|e| StoreError::io(path, e))?;
    from_bytes(&bytes, path)
}

/// Verifies and decodes a head file's bytes (see [`read`]); `path` only names the file in
/// errors. Any bytes give a head file or a [`StoreError`], never a panic (`fuzz/`, target
/// `headfile`).
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<HeadFile, StoreError> {
    let bad = |reason: String| StoreError::format(path, reason);
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a graft head file (bad magic)".into()));
    }
    if bytes.len() < MAGIC.len() + 4 + 32 {
        return Err(bad("head file is truncated".into()));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(bad(
            "head file is damaged or truncated (checksum mismatch)".into()
        ));
    }
    let len_at = MAGIC.len();
    let hlen = u32::from_le_bytes([
        body[len_at],
        body[len_at + 1],
        body[len_at + 2],
        body[len_at + 3],
    ]) as usize;
    let json = body
        .get(len_at + 4..len_at + 4 + hlen)
        .ok_or_else(|| bad("header length points past the end of the file".into()))?;
    // Peek at the format first, so a newer file gets the right message, not a parse error.
    let format = serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("format").and_then(|f| f.as_u64()))
        .ok_or_else(|| bad("header is not valid JSON with a format field".into()))?;
    if format > FORMAT_DEEP as u64 {
        return Err(bad(format!(
            "head file format {format} is newer than this graft reads ({FORMAT_DEEP}); upgrade graft"
        )));
    }
    let header: Header =
        serde_json::from_slice(json).map_err(|e| bad(format!("bad header: {e}")))?;
    // What rebuilding the model needs is checked first (a model is fitted from the examples
    // below); the rest with the whole file, by `HeadFile::validate`.
    let invalid = |e: HeadError| StoreError::invalid(path, e);
    let classes = header.labels.len();
    if classes == 0 {
        return Err(invalid(
            FieldError::new("labels", &header.labels, "a head needs at least one class").into(),
        ));
    }
    header.params.validate().map_err(invalid)?;
    let dim = header.backbone.dim;
    validate_examples(dim, classes, &[]).map_err(invalid)?;
    let data = &body[len_at + 4 + hlen..];
    let n = header.examples.len();
    let top_values = match &header.top_block {
        Some(t) => t
            .cout
            .checked_mul(t.cin)
            .and_then(|w| w.checked_add(t.cout))
            .filter(|v| *v <= MAX_MODEL_VALUES)
            .ok_or_else(|| bad(format!("a top block of {} × {} is too big", t.cout, t.cin)))?
            .checked_add(match &t.pre {
                Some(p) => p.values().ok_or_else(|| {
                    bad(format!(
                        "a block of {} → {} → {} channels is too big",
                        p.cin, p.hidden, p.cout
                    ))
                })?,
                None => 0,
            })
            .ok_or_else(|| bad("the blocks are too big".into()))?,
        None => 0,
    };
    let need = n
        .checked_mul(dim * 4)
        .and_then(|e| e.checked_add(top_values * 4));
    if need != Some(data.len()) {
        return Err(bad(format!(
            "embedding block has {} bytes, {n} examples of {dim} values need {}",
            data.len(),
            need.map_or("more than memory holds".into(), |b| b.to_string())
        )));
    }
    let mut examples = Vec::with_capacity(n);
    for (i, meta) in header.examples.into_iter().enumerate() {
        let row = &data[i * dim * 4..(i + 1) * dim * 4];
        let embedding = row
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        examples.push(Example {
            label: meta.label,
            path: meta.path,
            sha256: meta.sha256,
            embedding,
        });
    }
    validate_examples(dim, classes, &examples).map_err(invalid)?;
    let mut params = header.params.clone();
    let top = match &header.top_block {
        Some(t) => {
            let values: Vec<f32> = data[n * dim * 4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let (weights, rest) = values.split_at(t.cout * t.cin);
            let (bias, rest) = rest.split_at(t.cout);
            let pre = t.pre.as_ref().map(|p| {
                let k2 = p.kernel * p.kernel;
                let (expand_w, rest) = rest.split_at(p.hidden * p.cin);
                let (expand_b, rest) = rest.split_at(p.hidden);
                let (depthwise_w, rest) = rest.split_at(p.hidden * k2);
                let (depthwise_b, rest) = rest.split_at(p.hidden);
                let (project_w, project_b) = rest.split_at(p.cout * p.hidden);
                let hi = |v: Option<f32>| v.unwrap_or(f32::INFINITY);
                Box::new(crate::backbone::Mbconv {
                    node: p.node.clone(),
                    cin: p.cin,
                    hidden: p.hidden,
                    cout: p.cout,
                    side: p.side,
                    kernel: p.kernel,
                    expand_w: expand_w.to_vec(),
                    expand_b: expand_b.to_vec(),
                    expand_clip: (p.expand_clip.0, hi(p.expand_clip.1)),
                    depthwise_w: depthwise_w.to_vec(),
                    depthwise_b: depthwise_b.to_vec(),
                    depthwise_clip: (p.depthwise_clip.0, hi(p.depthwise_clip.1)),
                    project_w: project_w.to_vec(),
                    project_b: project_b.to_vec(),
                    project_clip: (
                        p.project_clip.0.unwrap_or(f32::NEG_INFINITY),
                        hi(p.project_clip.1),
                    ),
                    reads: p.reads.clone(),
                })
            });
            let block = TopBlock {
                node: t.node.clone(),
                cin: t.cin,
                cout: t.cout,
                positions: t.positions,
                weights: weights.to_vec(),
                bias: bias.to_vec(),
                clip: (t.clip_lo, t.clip_hi.unwrap_or(f32::INFINITY)),
                gem_power: t.gem_power,
                pre,
            };
            block.validate().map_err(bad)?;
            if block.input_size() != dim {
                return Err(bad(format!(
                    "the top block takes {} values, the examples have {dim}",
                    block.input_size()
                )));
            }
            if t.power != params.power {
                return Err(bad("the top block's power is not the head's".into()));
            }
            params.top = Some(std::sync::Arc::new(block.clone()));
            Some(block)
        }
        None => None,
    };
    // Linear heads keep their stored weights (a refit is not bit-exact); a fine-tuned block is
    // its own (stored); the others are rebuilt from the examples, behind the stored block.
    let width = top.as_ref().map_or(dim, |b| b.cout);
    let model = match (header.kind, header.linear_weights, header.linear_bias) {
        (HeadKind::Logistic | HeadKind::Finetune, Some(w), Some(b)) => {
            if b.len() != classes || w.len() != classes * width {
                return Err(bad(format!(
                    "{} weights do not match the labels and embedding size",
                    header.kind
                )));
            }
            let linear = Model::from_linear(w, b).map_err(|e| bad(e.to_string()))?;
            match (&top, header.kind) {
                (Some(block), _) => Model::behind(block.clone(), params.power, linear),
                (None, HeadKind::Finetune) => {
                    return Err(bad("a finetune head without its top block".into()))
                }
                (None, _) => linear,
            }
        }
        (HeadKind::Logistic | HeadKind::Finetune, _, _) => {
            return Err(bad(format!("{} head without weights", header.kind)))
        }
        (kind, _, _) => {
            let t = training_examples(&header.labels, &examples, &params);
            head::fit(kind, &t.x, &t.y, classes, &params).map_err(|e| bad(e.to_string()))?
        }
    };
    let file = HeadFile {
        backbone: header.backbone,
        head: Head {
            kind: header.kind,
            labels: header.labels,
            model,
            temperature: header.temperature,
            threshold: header.threshold,
            params: header.params,
        },
        examples,
        cv_accuracy: header.cv_accuracy,
        cv_method: header.cv_method,
    };
    file.validate().map_err(invalid)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: HeadKind) -> HeadFile {
        let backbone = BackboneId {
            name: "m".into(),
            sha256: "ab".repeat(32),
            dim: 4,
            preprocess: "p".into(),
        };
        let vecs = [
            [1.0, 0.1, 0.0, 0.0],
            [0.9, 0.0, 0.2, 0.0],
            [0.0, 1.0, 0.0, 0.1],
            [0.1, 0.8, 0.0, 0.0],
        ];
        let examples: Vec<Example> = vecs
            .iter()
            .enumerate()
            .map(|(i, v)| Example {
                label: i / 2,
                path: format!("img{i}.jpg").into(),
                sha256: format!("{i:064}"),
                embedding: v.to_vec(),
            })
            .collect();
        let labels = vec!["a".to_string(), "b".to_string()];
        let t = training_examples(&labels, &examples, &HeadParams::default());
        let params = HeadParams::default();
        let model = head::fit(kind, &t.x, &t.y, 2, &params).unwrap();
        HeadFile {
            backbone,
            head: Head {
                kind,
                labels: vec!["a".into(), "b".into()],
                model,
                temperature: 3.0,
                threshold: 0.6,
                params,
            },
            examples,
            cv_accuracy: Some(1.0),
            cv_method: Some("loo".into()),
        }
    }

    /// A head behind a small top block (2 inputs × 4 positions → 3 features), trained on 8
    /// examples of 2 classes: `finetune`, or a fixed kind behind the pretrained block.
    fn behind_top(kind: HeadKind) -> HeadFile {
        behind(kind, false)
    }

    /// [`behind_top`], or with `deep` one block deeper: a 2 → 3 → 2-channel block with a 3×3
    /// depthwise on the 2×2 map in front of the top block (the examples keep their size).
    fn behind(kind: HeadKind, deep: bool) -> HeadFile {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let pre = deep.then(|| {
            let mut r =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect() };
            Box::new(crate::backbone::Mbconv {
                node: "Conv \"expand\"".into(),
                cin: 2,
                hidden: 3,
                cout: 2,
                side: 2,
                kernel: 3,
                expand_w: r(6),
                expand_b: vec![0.2; 3],
                expand_clip: (0.0, 6.0),
                depthwise_w: r(27),
                depthwise_b: vec![0.1; 3],
                depthwise_clip: (0.0, 6.0),
                project_w: r(6),
                project_b: vec![0.3, 0.2],
                project_clip: (f32::NEG_INFINITY, f32::INFINITY),
                reads: ["a".into(), "b".into(), "c".into(), "d".into()],
            })
        });
        let block = TopBlock {
            node: "Conv \"top\"".into(),
            cin: 2,
            cout: 3,
            positions: 4,
            weights: vec![0.5, -0.2, 0.1, 0.4, -0.3, 0.6],
            bias: vec![0.1, 0.0, 0.2],
            clip: (0.0, 6.0),
            gem_power: Some(3.0),
            pre,
        };
        let examples: Vec<Example> = (0..8)
            .map(|i| Example {
                label: i % 2,
                path: format!("obj{i}_0.jpg").into(),
                sha256: format!("{i:064}"),
                embedding: (0..8)
                    .map(|j| rng.gen_range(0.0..1.0) + if j % 2 == i % 2 { 1.0 } else { 0.0 })
                    .collect(),
            })
            .collect();
        let labels = vec!["a".to_string(), "b".to_string()];
        let params = HeadParams {
            top: Some(std::sync::Arc::new(block)),
            finetune_epochs: Some(5),
            ..HeadParams::default()
        };
        let t = training_examples(&labels, &examples, &params);
        let trained = head::train(Some(kind), &t, &params, 0).unwrap();
        HeadFile {
            backbone: BackboneId {
                name: "m:top".into(),
                sha256: "cd".repeat(32),
                dim: 8,
                preprocess: "p".into(),
            },
            head: trained.head,
            examples,
            cv_accuracy: None,
            cv_method: None,
        }
    }

    #[test]
    fn heads_behind_the_top_block_round_trip_as_format_3_or_4() {
        for (kind, deep) in [
            (HeadKind::Finetune, false),
            (HeadKind::Logistic, false),
            (HeadKind::Centroid, false),
            (HeadKind::Finetune, true),
            (HeadKind::Knn, true),
        ] {
            let file = behind(kind, deep);
            assert_eq!(
                file.head.model.top_block().map(|(b, _)| b.pre.is_some()),
                Some(deep)
            );
            assert!(file.head.model.top_block().is_some(), "{kind}");
            let bytes = to_bytes(&file, Path::new("t.graft")).unwrap();
            let back = from_bytes(&bytes, Path::new("t.graft")).unwrap();
            assert_eq!(back.head.kind, kind);
            assert_eq!(back.head.model.top_block(), file.head.model.top_block());
            assert_eq!(
                back.head.params.top, None,
                "the block is never a stored param"
            );
            for e in &file.examples {
                let (a, b) = (
                    file.head.predict(&e.embedding, None, 2).unwrap(),
                    back.head.predict(&e.embedding, None, 2).unwrap(),
                );
                assert_eq!(a.label, b.label, "{kind}");
                assert!((a.score - b.score).abs() < 1e-5, "{kind}: {a:?} {b:?}");
            }
            let header_at = MAGIC.len() + 4;
            assert!(
                String::from_utf8_lossy(&bytes[header_at..header_at + 20]).contains(if deep {
                    "\"format\":4"
                } else {
                    "\"format\":3"
                }),
                "{kind}"
            );
            if deep && kind == HeadKind::Finetune {
                // Training moved the deeper block, and the file keeps the moved numbers.
                let (tuned, _) = back.head.model.top_block().unwrap();
                let pretrained = behind(HeadKind::Knn, true);
                let (orig, _) = pretrained.head.model.top_block().unwrap();
                assert_ne!(
                    tuned.pre.as_ref().unwrap().expand_w,
                    orig.pre.as_ref().unwrap().expand_w
                );
            }
            // A file cut short in the block is refused (checksum), never read past.
            let cut = &bytes[..bytes.len() - 40];
            assert!(from_bytes(cut, Path::new("t.graft")).is_err());
        }
        // A clip whose lower end is beyond f32 (serde reads 1e39 as ∞) is refused: it has no
        // JSON form, so the file it made could not be written and read back the same (before,
        // it was read, and written with `null` there, which no graft reads).
        for deep in [false, true] {
            let bytes = to_bytes(&behind(HeadKind::Centroid, deep), Path::new("t.graft")).unwrap();
            let n = u32::from_le_bytes(bytes[11..15].try_into().unwrap()) as usize;
            let json = String::from_utf8(bytes[15..15 + n].to_vec()).unwrap();
            // An unbounded upper end (a plain ReLU) is what let it through: ∞ ≤ ∞.
            let (key, to) = if deep {
                ("\"expand_clip\":[0.0,6.0]", "\"expand_clip\":[1e39,null]")
            } else {
                (
                    "\"clip_lo\":0.0,\"clip_hi\":6.0",
                    "\"clip_lo\":1e39,\"clip_hi\":null",
                )
            };
            assert!(json.contains(key), "{json}");
            let bad = json.replacen(key, to, 1);
            let mut body = MAGIC.to_vec();
            body.extend_from_slice(&(bad.len() as u32).to_le_bytes());
            body.extend_from_slice(bad.as_bytes());
            body.extend_from_slice(&bytes[15 + n..bytes.len() - 32]);
            let digest = Sha256::digest(&body);
            body.extend_from_slice(&digest);
            let err = from_bytes(&body, Path::new("t.graft")).unwrap_err();
            assert!(err.to_string().contains("activation range"), "{err}");
        }
        // A fine-tuned block is the head's own: a finetune head needs its top block.
        let mut file = behind_top(HeadKind::Finetune);
        file.head.model = file.head.model.after_top();
        assert!(to_bytes(&file, Path::new("t.graft")).is_err());
    }

    #[test]
    fn every_kind_round_trips_and_predicts_the_same() {
        let dir = tempfile::tempdir().unwrap();
        for kind in HeadKind::ALL {
            let p = dir.path().join(format!("{kind}.graft"));
            let f = sample(kind);
            write(&p, &f).unwrap();
            let g = read(&p).unwrap();
            assert_eq!(g.examples, f.examples);
            for e in &f.examples {
                let a = f.head.predict(&e.embedding, None, 2).unwrap();
                let b = g.head.predict(&e.embedding, None, 2).unwrap();
                assert_eq!(a, b, "{kind}");
            }
        }
    }

    #[test]
    fn a_power_transform_makes_format_2_and_survives_the_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for (power, format) in [(1.0f32, 1), (0.5, 2)] {
            let mut f = sample(HeadKind::Centroid);
            f.head.params.power = power;
            let t = training_examples(&f.head.labels, &f.examples, &f.head.params);
            f.head.model = head::fit(HeadKind::Centroid, &t.x, &t.y, 2, &f.head.params).unwrap();
            let p = dir.path().join(format!("p{power}.graft"));
            write(&p, &f).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                text.contains(&format!("\"format\":{format},")),
                "power {power}"
            );
            let g = read(&p).unwrap();
            assert_eq!(g.head.params.power, power);
            for e in &f.examples {
                assert_eq!(
                    f.head.predict(&e.embedding, None, 2).unwrap(),
                    g.head.predict(&e.embedding, None, 2).unwrap()
                );
            }
        }
        // The transform is applied: sign(v)·|v|^0.5, then unit length.
        let p = HeadParams {
            power: 0.5,
            ..HeadParams::default()
        };
        let x = p.input(&[4.0, -9.0, 0.0]);
        let n = 13f32.sqrt();
        assert!((x[0] - 2.0 / n).abs() < 1e-6 && (x[1] + 3.0 / n).abs() < 1e-6 && x[2] == 0.0);
        // Out of range (a crafted header): refused by the validation `read` runs.
        for power in [0.0, -1.0, 1.5, f32::NAN] {
            let bad = HeadParams {
                power,
                ..HeadParams::default()
            };
            assert!(bad.validate().is_err(), "{power}");
        }
    }

    /// Regression (the `headfile` fuzz binary's out-of-memory): a 180 KB file listing 20 000 classes with one
    /// example of 30 000 values made the reader rebuild a 20 000 × 30 000 centroid model,
    /// 2.4 GB, before any check looked at the class count. It is refused, before any fit.
    #[test]
    fn a_small_file_listing_many_classes_is_refused_before_the_model_is_rebuilt() {
        let (classes, dim) = (20_000, 30_000);
        let header = serde_json::json!({
            "format": 1,
            "backbone": {"name": "m", "sha256": "ab".repeat(32), "dim": dim, "preprocess": "p"},
            "labels": vec![""; classes],
            "kind": "centroid",
            "params": HeadParams::default(),
            "temperature": 1.0,
            "threshold": 0.5,
            "examples": [{"label": 0, "path": "a.jpg", "sha256": "0".repeat(64)}],
        });
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        bytes.extend(std::iter::repeat_n(1f32.to_le_bytes(), dim).flatten());
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        assert!(bytes.len() < 200_000);
        let err = from_bytes(&bytes, Path::new("many.graft"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("labels.len = 20000") && err.contains("more than a head may hold"),
            "{err}"
        );
        // The rule `HeadFile::validate` (so every write) runs, at its edge.
        let most = MAX_MODEL_VALUES / 1280;
        assert!(validate_examples(1280, most, &[]).is_ok());
        assert!(validate_examples(1280, most + 1, &[]).is_err());
        assert!(validate_examples(MAX_DIM, usize::MAX, &[]).is_err());
    }

    #[test]
    fn damaged_truncated_foreign_and_newer_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.graft");
        write(&p, &sample(HeadKind::Centroid)).unwrap();
        let good = std::fs::read(&p).unwrap();
        let mut flipped = good.clone();
        flipped[40] ^= 1;
        let newer = {
            // The version digit, byte for byte (a lossy text round trip would mangle the
            // binary length and embeddings around it).
            let mut b = good.clone();
            let at = b
                .windows(10)
                .position(|w| w.starts_with(b"\"format\":"))
                .expect("a format field");
            b[at + 9] = b'7';
            // Re-seal so only the version differs.
            b.truncate(b.len() - 32);
            let d = Sha256::digest(&b);
            b.extend_from_slice(&d);
            b
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "bad magic"),
            ("jpeg", vec![0xFF, 0xD8, 0xFF], "bad magic"),
            (
                "truncated",
                good[..good.len() / 2].to_vec(),
                "damaged or truncated",
            ),
            ("flipped bit", flipped, "damaged or truncated"),
            ("newer", newer, "newer than this graft"),
        ];
        for (name, bytes, want) in cases {
            std::fs::write(&p, bytes).unwrap();
            let err = read(&p).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
    }
}
