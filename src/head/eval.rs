//! Measuring heads on a labelled set: few-shot draws and grouped, stratified k-fold splits, a
//! head fitted per split, and the held-out predictions gathered into accuracies and a
//! confusion matrix. `graft eval` and `graft curve` (and the README's figures) are this module.
//!
//! Every split keeps the photos of one object ([`Examples::groups`]) on one side, so a score is
//! always for objects the head has not seen.

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::cv::{argmax, stratified_folds};
use super::metrics::Confusion;
use super::{fit, train, Examples, HeadError, HeadKind, HeadParams};

/// Examples used for fitting and examples scored, as indices into an [`Examples`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Fitted on.
    pub train: Vec<usize>,
    /// Scored.
    pub test: Vec<usize>,
}

/// A few-shot split: `shots` examples per class drawn at random (seeded) for training, the rest
/// for testing, minus every test example of an object that is in the training set. `None` when
/// a class has no more than `shots` examples or nothing is left to test.
pub fn few_shot_split(ex: &Examples, shots: usize, seed: u64) -> Option<Split> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut train = Vec::new();
    for c in 0..ex.classes() {
        let mut idx: Vec<usize> = (0..ex.len()).filter(|i| ex.y[*i] == c).collect();
        if idx.len() <= shots {
            return None;
        }
        idx.shuffle(&mut rng);
        train.extend_from_slice(&idx[..shots]);
    }
    let used: std::collections::HashSet<usize> = train.iter().map(|i| ex.groups[*i]).collect();
    let test: Vec<usize> = (0..ex.len())
        .filter(|i| !train.contains(i) && !used.contains(&ex.groups[*i]))
        .collect();
    if test.is_empty() {
        return None;
    }
    Some(Split { train, test })
}

/// `trials` few-shot splits, seeded `seed`, `seed + 1`, …; `None` if any cannot be drawn.
pub fn few_shot_splits(
    ex: &Examples,
    shots: usize,
    trials: usize,
    seed: u64,
) -> Option<Vec<Split>> {
    (0..trials)
        .map(|t| few_shot_split(ex, shots, seed.wrapping_add(t as u64)))
        .collect()
}

/// Grouped, stratified k-fold: per class its objects are shuffled (seeded) and dealt into `k`
/// folds, the same way the heads' own cross-validation does. Folds that would leave nothing to
/// fit or nothing to score are dropped.
pub fn kfold_splits(ex: &Examples, k: usize, seed: u64) -> Vec<Split> {
    let folds = stratified_folds(&ex.y, &ex.groups, ex.classes(), k, seed);
    (0..k)
        .map(|f| Split {
            train: (0..ex.len()).filter(|i| folds[*i] != f).collect(),
            test: (0..ex.len()).filter(|i| folds[*i] == f).collect(),
        })
        .filter(|s| !s.train.is_empty() && !s.test.is_empty())
        .collect()
}

/// What one split gave.
#[derive(Debug, Clone, Serialize)]
pub struct SplitOutcome {
    /// The head fitted (the one `auto` chose, when choosing).
    pub kind: HeadKind,
    /// Predicted class per test example, in [`Split::test`] order (closed set: the best class,
    /// even where the head would answer `unknown`).
    pub predicted: Vec<usize>,
    /// Share of test examples predicted right.
    pub accuracy: f64,
    /// Seconds spent fitting (and, for `auto`, choosing).
    pub fit_seconds: f64,
}

/// Fits a head on `split.train` (the kind given, or chosen by cross-validation as `graft train`
/// does when `None`) and predicts `split.test`.
pub fn run_split(
    ex: &Examples,
    choice: Option<HeadKind>,
    split: &Split,
    params: &HeadParams,
    seed: u64,
) -> Result<SplitOutcome, HeadError> {
    let tr = ex.subset(&split.train);
    let start = Instant::now();
    let (model, kind) = match choice {
        // What `train` does: epochs chosen by grouped CV on the training split, then the fit
        // (without the calibration, which accuracy does not see). One block deeper the
        // epochs are fixed: no choice to make.
        Some(HeadKind::Finetune)
            if params.finetune_epochs.is_none()
                && params.top.as_ref().is_some_and(|b| b.pre.is_none()) =>
        {
            let (_, epochs) = super::finetune_cv(&tr, params, seed)?;
            let tuned = HeadParams {
                finetune_epochs: Some(epochs),
                ..params.clone()
            };
            let m = fit(HeadKind::Finetune, &tr.x, &tr.y, tr.classes(), &tuned)?;
            (m, HeadKind::Finetune)
        }
        Some(k) => (fit(k, &tr.x, &tr.y, tr.classes(), params)?, k),
        None => {
            let t = train(None, &tr, params, seed)?;
            let k = t.head.kind;
            (t.head.model, k)
        }
    };
    let fit_seconds = start.elapsed().as_secs_f64();
    let predicted: Vec<usize> = split
        .test
        .iter()
        .map(|i| argmax(&model.logits(&ex.x[*i])))
        .collect();
    let right = split
        .test
        .iter()
        .zip(&predicted)
        .filter(|(t, p)| ex.y[**t] == **p)
        .count();
    Ok(SplitOutcome {
        kind,
        accuracy: right as f64 / split.test.len().max(1) as f64,
        predicted,
        fit_seconds,
    })
}

/// Every split's outcome and the confusion matrix over all of them.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Per split, in order.
    pub splits: Vec<SplitOutcome>,
    /// Held-out predictions of every split, summed.
    pub confusion: Confusion,
}

impl Evaluation {
    /// Per-split accuracies.
    pub fn accuracies(&self) -> Vec<f64> {
        self.splits.iter().map(|s| s.accuracy).collect()
    }

    /// Mean and standard deviation of the per-split accuracies.
    pub fn accuracy(&self) -> (f64, f64) {
        mean_std(&self.accuracies())
    }

    /// Mean fitting time per split, seconds.
    pub fn mean_fit_seconds(&self) -> f64 {
        mean_std(
            &self
                .splits
                .iter()
                .map(|s| s.fit_seconds)
                .collect::<Vec<_>>(),
        )
        .0
    }
}

/// Runs every split (split `i` seeded `seed + i`, for `auto`'s own cross-validation), calling
/// `progress` after each.
pub fn evaluate(
    ex: &Examples,
    choice: Option<HeadKind>,
    splits: &[Split],
    params: &HeadParams,
    seed: u64,
    mut progress: impl FnMut(),
) -> Result<Evaluation, HeadError> {
    // A fixed-feature kind on top-block inputs: the pretrained block's features once, not
    // once per split (the same numbers: the kind fits behind the pretrained block).
    if let (Some(block), Some(kind)) = (&params.top, choice) {
        if kind != HeadKind::Finetune {
            let features = Examples {
                x: super::finetune::transformed_features(block, params.power, &ex.x),
                ..ex.clone()
            };
            let plain = HeadParams {
                top: None,
                ..params.clone()
            };
            return evaluate(&features, choice, splits, &plain, seed, progress);
        }
    }
    let mut confusion = Confusion::new(ex.labels.clone());
    let mut outcomes = Vec::with_capacity(splits.len());
    for (i, split) in splits.iter().enumerate() {
        let o = run_split(ex, choice, split, params, seed.wrapping_add(i as u64))?;
        for (t, p) in split.test.iter().zip(&o.predicted) {
            confusion.add(ex.y[*t], Some(*p));
        }
        outcomes.push(o);
        progress();
    }
    Ok(Evaluation {
        splits: outcomes,
        confusion,
    })
}

/// An open-set split: some classes are never taught; the head is fitted on `shots` examples of
/// each other class and scored on held-out objects of both kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSetSplit {
    /// Classes the head is taught.
    pub known: Vec<usize>,
    /// Classes it never sees (their photos should come out `unknown`).
    pub novel: Vec<usize>,
    /// Fitted on (known classes only).
    pub train: Vec<usize>,
    /// Held-out objects of known classes.
    pub known_test: Vec<usize>,
    /// Every photo of the novel classes.
    pub novel_test: Vec<usize>,
}

/// `trials` open-set splits: in each, `novel` classes drawn at random (seeded `seed + t`) are
/// never taught, and a few-shot split of `shots` per class is drawn from the others. `None`
/// when there are fewer than `novel + 2` classes or a few-shot split cannot be drawn.
pub fn open_set_splits(
    ex: &Examples,
    shots: usize,
    novel: usize,
    trials: usize,
    seed: u64,
) -> Option<Vec<OpenSetSplit>> {
    let present = ex.present_classes();
    if novel == 0 || present.len() < novel + 2 {
        return None;
    }
    (0..trials)
        .map(|t| {
            let seed = seed.wrapping_add(t as u64);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6f70_656e);
            let mut classes = present.clone();
            classes.shuffle(&mut rng);
            let (novel_c, known_c) = classes.split_at(novel);
            let (mut novel_c, mut known_c) = (novel_c.to_vec(), known_c.to_vec());
            novel_c.sort_unstable();
            known_c.sort_unstable();
            let keep: Vec<usize> = (0..ex.len())
                .filter(|i| known_c.contains(&ex.y[*i]))
                .collect();
            let sub = ex.subset(&keep);
            let mut sub_y = sub.clone();
            // few_shot_split wants every class to have examples: renumber the known ones.
            sub_y.y = sub
                .y
                .iter()
                .map(|c| known_c.iter().position(|k| k == c).unwrap_or(0))
                .collect();
            sub_y.labels = known_c.iter().map(|c| ex.labels[*c].clone()).collect();
            let split = few_shot_split(&sub_y, shots, seed)?;
            Some(OpenSetSplit {
                train: split.train.iter().map(|i| keep[*i]).collect(),
                known_test: split.test.iter().map(|i| keep[*i]).collect(),
                novel_test: (0..ex.len())
                    .filter(|i| novel_c.contains(&ex.y[*i]))
                    .collect(),
                known: known_c,
                novel: novel_c,
            })
        })
        .collect()
}

/// What one open-set split gave, at the threshold the head calibrated for itself.
#[derive(Debug, Clone, Serialize)]
pub struct OpenSetOutcome {
    /// The head fitted.
    pub kind: HeadKind,
    /// Closed-set accuracy on the known classes' held-out objects.
    pub accuracy: f64,
    /// Area under the ROC curve of the head's best score, known (positive) vs never-taught.
    pub auroc: f64,
    /// The same for a feature-space score: cosine similarity to the nearest training example.
    pub auroc_nearest: f64,
    /// The same for minus the Mahalanobis distance to the nearest class mean, one shared
    /// covariance shrunk halfway to a multiple of the identity ([`Mahalanobis`]).
    pub auroc_mahalanobis: f64,
    /// The same for the cosine similarity to the nearest class mean after centring on the mean
    /// of every photo not taught ([`CentredCosine`]): the statistics a kiosk could gather from
    /// the unlabelled frames of its own scene.
    pub auroc_centred: f64,
    /// The head's calibrated threshold.
    pub threshold: f32,
    /// Share of known held-out photos the threshold keeps (answers with a label).
    pub known_kept: f64,
    /// Share of never-taught photos the threshold rejects (`unknown`).
    pub novel_rejected: f64,
    /// What training estimated for the latter (leave-one-class-out on the training set), if it
    /// could.
    pub estimated_novel_rejected: Option<f64>,
    /// What training estimated for known kept.
    pub estimated_known_kept: Option<f64>,
}

/// Fits a head per open-set split on its known classes (the kind given, or `auto`) exactly as
/// `graft train` would, and measures it on held-out known objects and never-taught classes.
pub fn evaluate_open_set(
    ex: &Examples,
    choice: Option<HeadKind>,
    splits: &[OpenSetSplit],
    params: &HeadParams,
    seed: u64,
    mut progress: impl FnMut(),
) -> Result<Vec<OpenSetOutcome>, HeadError> {
    let mut out = Vec::with_capacity(splits.len());
    for (i, s) in splits.iter().enumerate() {
        let remap = |c: usize| s.known.iter().position(|k| *k == c);
        let mut tr = ex.subset(&s.train);
        tr.y = tr.y.iter().map(|c| remap(*c).unwrap_or(0)).collect();
        tr.labels = s.known.iter().map(|c| ex.labels[*c].clone()).collect();
        let t = train(choice, &tr, params, seed.wrapping_add(i as u64))?;
        let score = |j: usize| -> (f32, usize, f32) {
            let p = t.head.model.probabilities(&ex.x[j], t.head.temperature);
            let best = argmax(&p);
            let nearest =
                tr.x.iter()
                    .map(|v| super::dot(v, &ex.x[j]))
                    .fold(f32::NEG_INFINITY, f32::max);
            (p[best], best, nearest)
        };
        let known: Vec<(f32, usize, f32)> = s.known_test.iter().map(|j| score(*j)).collect();
        let novel: Vec<(f32, usize, f32)> = s.novel_test.iter().map(|j| score(*j)).collect();
        let maha = Mahalanobis::fit(&tr, 0.5);
        let m = |idx: &[usize]| -> Vec<f32> {
            idx.iter()
                .map(|j| maha.as_ref().map_or(0.0, |m| -m.nearest(&ex.x[*j]) as f32))
                .collect()
        };
        let taught: std::collections::HashSet<usize> = s.train.iter().copied().collect();
        let unlabelled = (0..ex.len())
            .filter(|j| !taught.contains(j))
            .map(|j| ex.x[j].as_slice());
        let dim = ex.x.first().map_or(0, Vec::len);
        let centred = CentredCosine::fit(&tr, mean(unlabelled, dim));
        let c =
            |idx: &[usize]| -> Vec<f32> { idx.iter().map(|j| centred.score(&ex.x[*j])).collect() };
        let right = s
            .known_test
            .iter()
            .zip(&known)
            .filter(|(j, k)| remap(ex.y[**j]) == Some(k.1))
            .count();
        let th = t.head.threshold;
        let share = |v: &[(f32, usize, f32)], keep: bool| {
            v.iter().filter(|k| (k.0 >= th) == keep).count() as f64 / v.len().max(1) as f64
        };
        out.push(OpenSetOutcome {
            kind: t.head.kind,
            accuracy: right as f64 / known.len().max(1) as f64,
            auroc: auroc(
                &known.iter().map(|k| k.0).collect::<Vec<_>>(),
                &novel.iter().map(|k| k.0).collect::<Vec<_>>(),
            ),
            auroc_nearest: auroc(
                &known.iter().map(|k| k.2).collect::<Vec<_>>(),
                &novel.iter().map(|k| k.2).collect::<Vec<_>>(),
            ),
            auroc_mahalanobis: auroc(&m(&s.known_test), &m(&s.novel_test)),
            auroc_centred: auroc(&c(&s.known_test), &c(&s.novel_test)),
            threshold: th,
            known_kept: share(&known, true),
            novel_rejected: share(&novel, false),
            estimated_novel_rejected: t.calibration.novel_rejected.map(f64::from),
            estimated_known_kept: t.calibration.known_accepted.map(f64::from),
        });
        progress();
    }
    Ok(out)
}

/// Cosine similarity to the nearest class mean, every vector first moved by minus `centre` and
/// scaled back to unit length (the centring of SimpleShot, Wang et al. 2019, here with the mean
/// of unlabelled photos). Centring removes what all photos share, such as a kiosk's own scene,
/// so that what is left is the object.
#[derive(Debug, Clone)]
pub struct CentredCosine {
    centre: Vec<f32>,
    means: Vec<Vec<f32>>,
}

impl CentredCosine {
    /// Class means of the centred training vectors (classes without examples are left out).
    pub fn fit(train: &Examples, centre: Vec<f32>) -> CentredCosine {
        let means = train
            .present_classes()
            .into_iter()
            .map(|c| {
                let members = (0..train.len()).filter(|i| train.y[*i] == c);
                let centred: Vec<Vec<f32>> =
                    members.map(|i| centre_on(&train.x[i], &centre)).collect();
                super::normalize(&mean(centred.iter().map(Vec::as_slice), centre.len()))
            })
            .collect();
        CentredCosine { centre, means }
    }

    /// The similarity of `x` to the nearest class mean, in [-1, 1] (-1 with no classes).
    pub fn score(&self, x: &[f32]) -> f32 {
        let v = centre_on(x, &self.centre);
        self.means
            .iter()
            .map(|m| super::dot(m, &v))
            .fold(-1.0, f32::max)
    }
}

/// `x - centre`, scaled to unit length.
fn centre_on(x: &[f32], centre: &[f32]) -> Vec<f32> {
    let d: Vec<f32> = x.iter().zip(centre).map(|(a, b)| a - b).collect();
    super::normalize(&d)
}

/// The mean of `dim`-long vectors (zeros when there are none).
pub fn mean<'a>(vectors: impl Iterator<Item = &'a [f32]>, dim: usize) -> Vec<f32> {
    let mut sum = vec![0.0f64; dim];
    let mut n = 0usize;
    for v in vectors {
        for (s, x) in sum.iter_mut().zip(v) {
            *s += f64::from(*x);
        }
        n += 1;
    }
    sum.iter().map(|s| (s / n.max(1) as f64) as f32).collect()
}

/// Squared Mahalanobis distance to the nearest class mean with one covariance shared by all
/// classes and shrunk toward a multiple of the identity:
/// `Σ = (1 − λ)·RᵀR/n + λ·(tr(RᵀR/n)/d)·I`, `R` the examples minus their class means. With
/// a few shots `n ≪ d`, so the inverse goes through the Woodbury identity: one `n × n`
/// Cholesky factor, no `d × d` matrix.
#[derive(Debug, Clone)]
pub struct Mahalanobis {
    means: Vec<Vec<f64>>,
    residuals: Vec<Vec<f64>>,
    a: f64,
    b: f64,
    chol: Vec<Vec<f64>>,
}

impl Mahalanobis {
    /// Fits the class means and the shrunk shared covariance (`shrink` = λ in (0, 1]); `None`
    /// without examples.
    pub fn fit(ex: &Examples, shrink: f64) -> Option<Mahalanobis> {
        let n = ex.len();
        let d = ex.x.first()?.len();
        let classes = ex.present_classes();
        let mut means = vec![vec![0f64; d]; ex.classes()];
        for c in &classes {
            let members: Vec<&Vec<f32>> = (0..n)
                .filter(|i| ex.y[*i] == *c)
                .map(|i| &ex.x[i])
                .collect();
            for v in &members {
                for (m, x) in means[*c].iter_mut().zip(v.iter()) {
                    *m += f64::from(*x) / members.len() as f64;
                }
            }
        }
        let residuals: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                ex.x[i]
                    .iter()
                    .zip(&means[ex.y[i]])
                    .map(|(x, m)| f64::from(*x) - m)
                    .collect()
            })
            .collect();
        let trace: f64 = residuals.iter().flatten().map(|r| r * r).sum::<f64>() / n as f64;
        let lambda = shrink.clamp(1e-6, 1.0);
        let a = (lambda * trace / d as f64).max(1e-12);
        let b = (1.0 - lambda) / n as f64;
        // G = a·I + b·R·Rᵀ (n × n), factored G = L·Lᵀ.
        let mut g = vec![vec![0f64; n]; n];
        for i in 0..n {
            for j in 0..=i {
                let dotp: f64 = residuals[i]
                    .iter()
                    .zip(&residuals[j])
                    .map(|(p, q)| p * q)
                    .sum();
                g[i][j] = b * dotp + if i == j { a } else { 0.0 };
                g[j][i] = g[i][j];
            }
        }
        let chol = cholesky(&g)?;
        Some(Mahalanobis {
            means: classes.iter().map(|c| means[*c].clone()).collect(),
            residuals,
            a,
            b,
            chol,
        })
    }

    /// The smallest squared distance from `x` to a class mean.
    pub fn nearest(&self, x: &[f32]) -> f64 {
        self.means
            .iter()
            .map(|m| {
                let v: Vec<f64> = x.iter().zip(m).map(|(x, m)| f64::from(*x) - m).collect();
                let rv: Vec<f64> = self
                    .residuals
                    .iter()
                    .map(|r| r.iter().zip(&v).map(|(p, q)| p * q).sum())
                    .collect();
                let z = solve_cholesky(&self.chol, &rv);
                let vv: f64 = v.iter().map(|t| t * t).sum();
                let corr: f64 = rv.iter().zip(&z).map(|(p, q)| p * q).sum();
                (vv - self.b * corr) / self.a
            })
            .fold(f64::INFINITY, f64::min)
    }
}

/// Lower Cholesky factor of a symmetric positive-definite matrix; `None` if it is not.
fn cholesky(g: &[Vec<f64>]) -> Option<Vec<Vec<f64>>> {
    let n = g.len();
    let mut l = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let v = g[i][i] - s;
                if v <= 0.0 {
                    return None;
                }
                l[i][j] = v.sqrt();
            } else {
                l[i][j] = (g[i][j] - s) / l[j][j];
            }
        }
    }
    Some(l)
}

/// Solves `L·Lᵀ·z = y`.
fn solve_cholesky(l: &[Vec<f64>], y: &[f64]) -> Vec<f64> {
    let n = l.len();
    let mut w = vec![0f64; n];
    for i in 0..n {
        w[i] = (y[i] - (0..i).map(|k| l[i][k] * w[k]).sum::<f64>()) / l[i][i];
    }
    let mut z = vec![0f64; n];
    for i in (0..n).rev() {
        z[i] = (w[i] - (i + 1..n).map(|k| l[k][i] * z[k]).sum::<f64>()) / l[i][i];
    }
    z
}

/// Area under the ROC curve: the chance that a random `positive` scores above a random
/// `negative` (ties count half). 0.5 is no separation, 1 perfect.
pub fn auroc(positive: &[f32], negative: &[f32]) -> f64 {
    if positive.is_empty() || negative.is_empty() {
        return 0.5;
    }
    let mut neg = negative.to_vec();
    neg.sort_by(f32::total_cmp);
    let mut wins = 0f64;
    for p in positive {
        let below = neg.partition_point(|n| n < p);
        let not_above = neg.partition_point(|n| n <= p);
        wins += below as f64 + 0.5 * (not_above - below) as f64;
    }
    wins / (positive.len() as f64 * neg.len() as f64)
}

/// Mean and (population) standard deviation; `(0, 0)` for nothing.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `classes` classes × `objects` objects × `shots` photos; class c's vectors point along
    /// axis c, objects differ a little.
    fn set(classes: usize, objects: usize, shots: usize) -> Examples {
        let (mut x, mut y, mut groups) = (Vec::new(), Vec::new(), Vec::new());
        for c in 0..classes {
            for o in 0..objects {
                for s in 0..shots {
                    let mut v = vec![0.05f32; classes + 1];
                    v[c] = 1.0;
                    v[classes] = 0.01 * (o * shots + s) as f32;
                    x.push(crate::head::normalize(&v));
                    y.push(c);
                    groups.push(c * 1000 + o);
                }
            }
        }
        let ids =
            super::super::group_ids(&groups.iter().map(|g| g.to_string()).collect::<Vec<_>>());
        Examples::new(x, y, ids, (0..classes).map(|c| format!("c{c}")).collect()).unwrap()
    }

    #[test]
    fn few_shot_splits_keep_objects_apart_and_are_seeded() {
        let ex = set(3, 6, 2);
        let s = few_shot_split(&ex, 2, 5).unwrap();
        assert_eq!(s.train.len(), 6);
        for c in 0..3 {
            assert_eq!(s.train.iter().filter(|i| ex.y[**i] == c).count(), 2);
        }
        for t in &s.test {
            assert!(!s.train.contains(t));
            assert!(
                s.train.iter().all(|i| ex.groups[*i] != ex.groups[*t]),
                "a test photo's object is in training"
            );
        }
        assert_eq!(few_shot_split(&ex, 2, 5), Some(s.clone()));
        assert_ne!(few_shot_split(&ex, 2, 6), Some(s));
        // 12 photos per class: 12 shots leave nothing to test.
        assert!(few_shot_split(&ex, 12, 0).is_none());
        assert!(few_shot_splits(&ex, 12, 3, 0).is_none());
        assert_eq!(few_shot_splits(&ex, 1, 3, 0).unwrap().len(), 3);
    }

    #[test]
    fn kfold_splits_are_balanced_grouped_and_cover_everything_once() {
        // 3 classes × 5 objects × 2 photos: 5 folds hold one object of each class.
        let ex = set(3, 5, 2);
        let splits = kfold_splits(&ex, 5, 7);
        assert_eq!(splits.len(), 5);
        let mut seen = vec![0; ex.len()];
        for s in &splits {
            for c in 0..3 {
                assert_eq!(s.test.iter().filter(|i| ex.y[**i] == c).count(), 2);
            }
            for t in &s.test {
                seen[*t] += 1;
                assert!(s.train.iter().all(|i| ex.groups[*i] != ex.groups[*t]));
            }
        }
        assert!(seen.iter().all(|n| *n == 1), "{seen:?}");
    }

    #[test]
    fn evaluation_scores_held_out_objects() {
        let ex = set(3, 4, 3);
        let splits = kfold_splits(&ex, 4, 0);
        let mut calls = 0;
        let e = evaluate(
            &ex,
            Some(HeadKind::Centroid),
            &splits,
            &HeadParams::default(),
            0,
            || calls += 1,
        )
        .unwrap();
        assert_eq!(calls, splits.len());
        assert_eq!(e.accuracy(), (1.0, 0.0));
        assert_eq!(e.confusion.accuracy(), 1.0);
        let auto = evaluate(&ex, None, &splits[..1], &HeadParams::default(), 0, || {}).unwrap();
        assert_eq!(auto.splits[0].accuracy, 1.0);
    }

    #[test]
    fn mahalanobis_through_woodbury_matches_the_direct_inverse() {
        // 2-d, small enough to invert Σ directly.
        let ex = Examples::new(
            vec![
                vec![1.0, 0.2],
                vec![1.2, -0.1],
                vec![-1.0, 0.4],
                vec![-0.8, 0.0],
            ],
            vec![0, 0, 1, 1],
            vec![0, 1, 2, 3],
            vec!["a".into(), "b".into()],
        )
        .unwrap();
        let m = Mahalanobis::fit(&ex, 0.3).unwrap();
        // Direct: Σ = 0.7·RᵀR/4 + 0.3·(tr/2)·I.
        let r = [[-0.1f64, 0.15], [0.1, -0.15], [-0.1, 0.2], [0.1, -0.2]];
        let mut s = [[0f64; 2]; 2];
        for v in &r {
            for i in 0..2 {
                for j in 0..2 {
                    s[i][j] += v[i] * v[j] / 4.0;
                }
            }
        }
        let tr = s[0][0] + s[1][1];
        for (i, row) in s.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = 0.7 * *v + if i == j { 0.3 * tr / 2.0 } else { 0.0 };
            }
        }
        let det = s[0][0] * s[1][1] - s[0][1] * s[1][0];
        let inv = [
            [s[1][1] / det, -s[0][1] / det],
            [-s[1][0] / det, s[0][0] / det],
        ];
        let x = [0.5f32, 0.5];
        let direct = [[1.1f64, 0.05], [-0.9, 0.2]]
            .iter()
            .map(|mu| {
                let v = [f64::from(x[0]) - mu[0], f64::from(x[1]) - mu[1]];
                v[0] * (inv[0][0] * v[0] + inv[0][1] * v[1])
                    + v[1] * (inv[1][0] * v[0] + inv[1][1] * v[1])
            })
            .fold(f64::INFINITY, f64::min);
        let via = m.nearest(&x);
        assert!(
            (via - direct).abs() < 1e-6 * direct.max(1.0),
            "{via} vs {direct}"
        );
    }

    #[test]
    fn centring_on_unlabelled_photos_removes_the_scene_all_photos_share() {
        // Every photo is 3·scene + its class's direction (+ a little noise): 3 classes taught,
        // 2 never taught. Without centring, everything looks like everything (cosine ≥ 0.9);
        // centred on the mean of the photos, never-taught ones point away from every class.
        let dim = 8;
        let unit = |i: usize| (0..dim).map(|d| f32::from(d == i)).collect::<Vec<f32>>();
        let scene = unit(7);
        let mut noise = 1u32;
        let mut photo = |c: usize| -> Vec<f32> {
            let v: Vec<f32> = (0..dim)
                .map(|d| {
                    noise = noise.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    3.0 * scene[d] + unit(c)[d] + (noise >> 8) as f32 / (1 << 24) as f32 * 0.02
                })
                .collect();
            crate::head::normalize(&v)
        };
        let taught: Vec<Vec<f32>> = (0..3).flat_map(|c| [photo(c), photo(c)]).collect();
        let ex = Examples::new(
            taught,
            vec![0, 0, 1, 1, 2, 2],
            vec![0, 1, 2, 3, 4, 5],
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        let known: Vec<Vec<f32>> = (0..3).map(&mut photo).collect();
        let novel: Vec<Vec<f32>> = (3..5).map(&mut photo).collect();
        let all = known.iter().chain(&novel).map(Vec::as_slice);
        let centred = CentredCosine::fit(&ex, mean(all, dim));
        let plain = CentredCosine::fit(&ex, vec![0.0; dim]);
        let gap = |m: &CentredCosine| {
            let k = known.iter().map(|x| m.score(x)).fold(1.0, f32::min);
            let n = novel.iter().map(|x| m.score(x)).fold(-1.0, f32::max);
            k - n
        };
        assert!(gap(&plain) > 0.0 && gap(&plain) < 0.2, "{}", gap(&plain));
        assert!(gap(&centred) > 0.9, "{}", gap(&centred));
        // Known photos still match their own class almost exactly.
        assert!(known.iter().all(|x| centred.score(x) > 0.95));
        assert_eq!(mean(std::iter::empty(), 2), vec![0.0, 0.0]);
    }

    #[test]
    fn auroc_cases() {
        assert_eq!(auroc(&[0.9, 0.8], &[0.1, 0.2]), 1.0);
        assert_eq!(auroc(&[0.1, 0.2], &[0.9, 0.8]), 0.0);
        assert_eq!(auroc(&[0.5], &[0.5]), 0.5);
        assert_eq!(auroc(&[0.3, 0.7], &[0.5]), 0.5);
        assert_eq!(auroc(&[], &[0.5]), 0.5);
    }

    #[test]
    fn open_set_splits_never_teach_the_novel_classes() {
        let ex = set(5, 6, 2);
        let splits = open_set_splits(&ex, 2, 2, 4, 3).unwrap();
        assert_eq!(splits.len(), 4);
        for s in &splits {
            assert_eq!((s.known.len(), s.novel.len()), (3, 2));
            assert!(s.train.iter().all(|i| s.known.contains(&ex.y[*i])));
            assert_eq!(s.train.len(), 6);
            assert!(s.novel_test.iter().all(|i| s.novel.contains(&ex.y[*i])));
            assert_eq!(s.novel_test.len(), 2 * 12);
            assert!(s
                .known_test
                .iter()
                .all(|t| s.train.iter().all(|i| ex.groups[*i] != ex.groups[*t])));
        }
        assert!(
            open_set_splits(&ex, 2, 4, 1, 0).is_none(),
            "needs 2 known classes"
        );
        // Well-separated classes: known objects score above never-taught ones.
        let o = evaluate_open_set(
            &ex,
            Some(HeadKind::Centroid),
            &splits,
            &HeadParams::default(),
            0,
            || {},
        )
        .unwrap();
        assert_eq!(o.len(), 4);
        for r in &o {
            assert_eq!(r.accuracy, 1.0);
            assert!(r.auroc_nearest > 0.9, "{r:?}");
            assert!((0.0..=1.0).contains(&r.auroc) && (0.0..=1.0).contains(&r.known_kept));
        }
    }

    #[test]
    fn mean_and_spread() {
        assert_eq!(mean_std(&[]), (0.0, 0.0));
        assert_eq!(mean_std(&[0.5, 0.5]), (0.5, 0.0));
        let (m, s) = mean_std(&[0.0, 1.0]);
        assert!((m - 0.5).abs() < 1e-12 && (s - 0.5).abs() < 1e-12);
    }
}
