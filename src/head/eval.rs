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
    let folds = stratified_folds(ex, k, seed);
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
    fn mean_and_spread() {
        assert_eq!(mean_std(&[]), (0.0, 0.0));
        assert_eq!(mean_std(&[0.5, 0.5]), (0.5, 0.0));
        let (m, s) = mean_std(&[0.0, 1.0]);
        assert!((m - 0.5).abs() < 1e-12 && (s - 0.5).abs() < 1e-12);
    }
}
