//! Fitting each head type with linfa, and the logits of each fitted model.

use linfa::prelude::*;
use linfa_bayes::{GaussianNb, NaiveBayes};
use linfa_logistic::MultiLogisticRegression;
use linfa_nn::distance::L2Dist;
use linfa_nn::{CommonNearestNeighbour, NearestNeighbour};
use ndarray::{Array1, Array2, ArrayView2};

use super::{dot, finetune, normalize, HeadError, HeadKind, HeadParams, Model};
use crate::backbone::TopBlock;

/// Logit given to a class the fit never saw (it can never win).
pub(crate) const ABSENT: f32 = -1.0e4;

#[derive(Debug, Clone)]
pub(crate) enum Inner {
    Linear {
        weights: Vec<f32>,
        bias: Vec<f32>,
        dim: usize,
    },
    Centroid {
        centroids: Vec<f32>,
        dim: usize,
    },
    Knn {
        k: usize,
        examples: Vec<f32>,
        labels: Vec<usize>,
        dim: usize,
        classes: usize,
    },
    Bayes {
        model: Box<GaussianNb<f64, usize>>,
        dim: usize,
        classes: usize,
    },
    /// A head behind the backbone's top block (`--model NAME:top`): its input is the block's
    /// input; the block (fine-tuned, or as pretrained for the fixed-feature kinds) pools it to
    /// features, which go through the power transform and L2 into `inner`.
    Trunk {
        block: Box<TopBlock>,
        power: f32,
        inner: Box<Inner>,
    },
}

impl Inner {
    pub(crate) fn dim(&self) -> usize {
        match self {
            Inner::Linear { dim, .. }
            | Inner::Centroid { dim, .. }
            | Inner::Knn { dim, .. }
            | Inner::Bayes { dim, .. } => *dim,
            Inner::Trunk { block, .. } => block.input_size(),
        }
    }

    pub(crate) fn logits(&self, x: &[f32]) -> Vec<f32> {
        match self {
            Inner::Linear { weights, bias, dim } => weights
                .chunks_exact(*dim)
                .zip(bias)
                .map(|(w, b)| dot(w, x) + b)
                .collect(),
            Inner::Centroid { centroids, dim } => centroids
                .chunks_exact(*dim)
                .map(|c| {
                    if c.iter().all(|v| *v == 0.0) {
                        ABSENT
                    } else {
                        dot(c, x)
                    }
                })
                .collect(),
            Inner::Knn {
                k,
                examples,
                labels,
                dim,
                classes,
            } => knn_logits(*k, examples, labels, *dim, *classes, x),
            Inner::Bayes {
                model,
                dim,
                classes,
            } => {
                let row: Vec<f64> = x.iter().map(|v| *v as f64).collect();
                let view = ArrayView2::from_shape((1, *dim), &row).expect("row has dim values");
                let jll = model.joint_log_likelihood(view);
                (0..*classes)
                    .map(|c| jll.get(&c).map(|a| a[0] as f32).unwrap_or(ABSENT * 1e6))
                    .collect()
            }
            Inner::Trunk {
                block,
                power,
                inner,
            } => inner.logits(&finetune::transform(*power, &finetune::features(block, x))),
        }
    }
}

/// Soft vote of the `k` nearest stored examples: for each class, the sum of `(1 + cosine)` over
/// its examples among the neighbours, divided by `k` (0 for classes with no neighbour).
pub(crate) fn knn_logits(
    k: usize,
    examples: &[f32],
    labels: &[usize],
    dim: usize,
    classes: usize,
    x: &[f32],
) -> Vec<f32> {
    let n = labels.len();
    let mut logits = vec![0f32; classes];
    if n == 0 {
        return logits;
    }
    let data = ArrayView2::from_shape((n, dim), examples).expect("examples are n x dim");
    let k = k.min(n).max(1);
    let neighbours: Vec<usize> =
        match CommonNearestNeighbour::LinearSearch.from_batch(&data, L2Dist) {
            Ok(index) => {
                let q = ndarray::ArrayView1::from(x);
                match index.k_nearest(q, k) {
                    Ok(found) => found.into_iter().map(|(_, i)| i).collect(),
                    Err(_) => Vec::new(),
                }
            }
            Err(_) => Vec::new(),
        };
    for i in neighbours {
        let s = dot(&examples[i * dim..(i + 1) * dim], x);
        logits[labels[i]] += (1.0 + s) / k as f32;
    }
    logits
}

/// Fits a head of `kind` on unit vectors `x` with class ids `y` in `0..classes`.
///
/// With `params.top` set, `x` holds the top block's inputs (`--model NAME:top`) instead: a
/// `finetune` head trains the block (see [`crate::head`], "Fine-tuning") for
/// `params.finetune_epochs` epochs (its own choice is [`super::train`]'s, by
/// cross-validation); the other kinds fit on the pretrained block's features and keep the
/// block in front of them.
pub fn fit(
    kind: HeadKind,
    x: &[Vec<f32>],
    y: &[usize],
    classes: usize,
    params: &HeadParams,
) -> Result<Model, HeadError> {
    let Some(block) = &params.top else {
        if kind == HeadKind::Finetune {
            return Err(HeadError::NotEnoughData(NEEDS_TOP.into()));
        }
        return Ok(Model(fit_plain(kind, x, y, classes, params)?));
    };
    check_examples(x, y, classes)?;
    if x[0].len() != block.input_size() {
        return Err(HeadError::Dimension {
            got: x[0].len(),
            want: block.input_size(),
        });
    }
    if kind == HeadKind::Finetune {
        let epochs = params.finetune_epochs.unwrap_or(if block.pre.is_some() {
            super::deep::DEEP_EPOCHS
        } else {
            DEFAULT_EPOCHS
        });
        return Ok(Model(finetune::fit(block, x, y, classes, params, epochs)?));
    }
    let features = finetune::transformed_features(block, params.power, x);
    Ok(Model(Inner::Trunk {
        block: Box::new((**block).clone()),
        power: params.power,
        inner: Box::new(fit_plain(kind, &features, y, classes, params)?),
    }))
}

/// Why a `finetune` head cannot be fitted on ordinary embeddings.
pub(crate) const NEEDS_TOP: &str = "a finetune head trains the backbone's top block, so its \
     examples must be cut before it: use a model named NAME:top (e.g. --model \
     efficientnet-lite0:top), or NAME:deep to train the block before it too";

/// Epochs of a `finetune` fit whose params do not say (a library user's own fit; `train`
/// chooses by cross-validation).
pub const DEFAULT_EPOCHS: usize = 10;

fn check_examples(x: &[Vec<f32>], y: &[usize], classes: usize) -> Result<(), HeadError> {
    if x.is_empty() || x.len() != y.len() {
        return Err(HeadError::NotEnoughData(format!(
            "cannot fit on {} examples with {} labels",
            x.len(),
            y.len()
        )));
    }
    let dim = x[0].len();
    if dim == 0 {
        return Err(HeadError::NotEnoughData(
            "cannot fit on embeddings of 0 values".into(),
        ));
    }
    if let Some(bad) = x.iter().find(|v| v.len() != dim) {
        return Err(HeadError::Dimension {
            got: bad.len(),
            want: dim,
        });
    }
    if let Some(c) = y.iter().find(|c| **c >= classes) {
        return Err(HeadError::NotEnoughData(format!(
            "class id {c} of {classes} classes"
        )));
    }
    // Every fit goes through here (training, cross-validation, rebuilding a head from its
    // file), so a non-finite value from anywhere stops here rather than in linfa or as NaN
    // scores.
    for (i, v) in x.iter().enumerate() {
        super::validate_values(&format!("examples[{i}]"), v)?;
    }
    Ok(())
}

/// [`fit`] on unit vectors, whatever `params.top` says.
pub(crate) fn fit_plain(
    kind: HeadKind,
    x: &[Vec<f32>],
    y: &[usize],
    classes: usize,
    params: &HeadParams,
) -> Result<Inner, HeadError> {
    check_examples(x, y, classes)?;
    let dim = x[0].len();
    let inner = match kind {
        HeadKind::Centroid => {
            let mut sums = vec![0f32; classes * dim];
            for (v, c) in x.iter().zip(y) {
                for (s, e) in sums[c * dim..(c + 1) * dim].iter_mut().zip(v) {
                    *s += e;
                }
            }
            let centroids = sums.chunks_exact(dim).flat_map(normalize).collect();
            Inner::Centroid { centroids, dim }
        }
        HeadKind::Knn => Inner::Knn {
            k: params.knn_k.max(1),
            examples: x.iter().flatten().copied().collect(),
            labels: y.to_vec(),
            dim,
            classes,
        },
        HeadKind::Logistic => fit_logistic(x, y, classes, dim, params)?,
        HeadKind::Bayes => {
            let (records, targets) = to_arrays(x, y, dim);
            let ds = DatasetView::new(records.view(), targets.view());
            let model = GaussianNb::params()
                .var_smoothing(params.bayes_var_smoothing)
                .fit(&ds)
                .map_err(|e| HeadError::Fit {
                    kind,
                    reason: e.to_string(),
                })?;
            Inner::Bayes {
                model: Box::new(model),
                dim,
                classes,
            }
        }
        HeadKind::Finetune => return Err(HeadError::NotEnoughData(NEEDS_TOP.into())),
    };
    Ok(inner)
}

fn to_arrays(x: &[Vec<f32>], y: &[usize], dim: usize) -> (Array2<f64>, Array1<usize>) {
    let flat: Vec<f64> = x.iter().flatten().map(|v| *v as f64).collect();
    let records = Array2::from_shape_vec((x.len(), dim), flat).expect("rows have dim values");
    (records, Array1::from(y.to_vec()))
}

fn fit_logistic(
    x: &[Vec<f32>],
    y: &[usize],
    classes: usize,
    dim: usize,
    params: &HeadParams,
) -> Result<Inner, HeadError> {
    let mut present: Vec<usize> = y.to_vec();
    present.sort_unstable();
    present.dedup();
    let mut weights = vec![0f32; classes * dim];
    let mut bias = vec![ABSENT; classes];
    if present.len() == 1 {
        // One class seen: it always wins; nothing to learn.
        bias[present[0]] = 0.0;
        return Ok(Inner::Linear { weights, bias, dim });
    }
    // f32, as the embeddings are: half the memory traffic of f64 in every L-BFGS step, and the
    // optimum is the same to well within the tolerance (the fit is strongly convex).
    let flat: Vec<f32> = x.iter().flatten().copied().collect();
    let records = Array2::from_shape_vec((x.len(), dim), flat).expect("rows have dim values");
    let ds = Dataset::new(records, Array1::from(y.to_vec()));
    let fitted = MultiLogisticRegression::<f32>::default()
        .alpha(params.logistic_alpha as f32)
        .max_iterations(params.logistic_max_iter)
        .fit(&ds)
        .map_err(|e| HeadError::Fit {
            kind: HeadKind::Logistic,
            reason: e.to_string(),
        })?;
    // params() is dim x fitted-classes; classes() maps its columns to our class ids.
    let w = fitted.params();
    let b = fitted.intercept();
    for (col, class) in fitted.classes().iter().enumerate() {
        for d in 0..dim {
            weights[class * dim + d] = w[[d, col]];
        }
        bias[*class] = b[col];
    }
    Ok(Inner::Linear { weights, bias, dim })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Three well separated clusters on the unit sphere in 16-d.
    fn blobs(per_class: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for c in 0..3 {
            for _ in 0..per_class {
                let mut v: Vec<f32> = (0..16).map(|_| rng.gen_range(-0.3..0.3)).collect();
                v[c * 5] += 2.0;
                x.push(normalize(&v));
                y.push(c);
            }
        }
        (x, y)
    }

    #[test]
    fn every_head_separates_clear_clusters() {
        let (x, y) = blobs(6, 1);
        let (tx, ty) = blobs(5, 2);
        for kind in HeadKind::ALL {
            let m = fit(kind, &x, &y, 3, &HeadParams::default()).unwrap();
            for (v, c) in tx.iter().zip(&ty) {
                let l = m.logits(v);
                let best = (0..3).max_by(|a, b| l[*a].total_cmp(&l[*b])).unwrap();
                assert_eq!(best, *c, "{kind}: {l:?}");
            }
        }
    }

    #[test]
    fn a_class_missing_from_the_fit_never_wins() {
        let (x, y) = blobs(4, 3);
        let keep: Vec<usize> = (0..x.len()).filter(|i| y[*i] != 1).collect();
        let xs: Vec<_> = keep.iter().map(|i| x[*i].clone()).collect();
        let ys: Vec<_> = keep.iter().map(|i| y[*i]).collect();
        for kind in HeadKind::ALL {
            let m = fit(kind, &xs, &ys, 3, &HeadParams::default()).unwrap();
            let p = m.probabilities(&x[4], 1.0); // an example of class 1
            assert!(p[1] < 0.5, "{kind}: {p:?}");
        }
    }
}
