//! Cross-validation on the training set: choosing a head (`--head auto`), fitting the softmax
//! temperature, and calibrating the `unknown` threshold — all from held-out scores, so the head
//! never grades itself on examples it was fitted on.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::{fit, softmax, HeadError, HeadKind, HeadParams};

/// Below this many examples in the smallest class, CV is leave-one-out; above, stratified k-fold.
pub const LOO_MAX_SHOTS: usize = 10;
/// Folds of k-fold CV.
pub const K_FOLDS: usize = 5;
/// Share of correctly classified held-out training examples the default threshold rejects.
pub const THRESHOLD_QUANTILE: f32 = 0.05;
/// Threshold used when there is nothing held out to calibrate on (one example per class).
pub const FALLBACK_THRESHOLD: f32 = 0.5;

/// Held-out results of one head type.
#[derive(Debug, Clone, Serialize)]
pub struct CvReport {
    /// Which head.
    pub kind: HeadKind,
    /// `loo` or `kfold-K`.
    pub method: String,
    /// Held-out accuracy over the examples whose class was present in their training fold.
    pub accuracy: f64,
    /// How many examples were scored.
    pub scored: usize,
    /// Per example (in input order): the held-out logits, when the class was in the fold.
    #[serde(skip)]
    pub held_out: Vec<Option<Vec<f32>>>,
}

/// The result of `--head auto`.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    /// The head chosen.
    pub chosen: HeadKind,
    /// Why: every candidate's CV accuracy.
    pub reports: Vec<CvReport>,
}

/// Runs leave-one-out (few shots) or stratified k-fold CV of one head type.
pub fn cross_validate(
    kind: HeadKind,
    x: &[Vec<f32>],
    y: &[usize],
    classes: usize,
    params: &HeadParams,
    seed: u64,
) -> Result<CvReport, HeadError> {
    let n = x.len();
    let min_shots = (0..classes)
        .map(|c| y.iter().filter(|v| **v == c).count())
        .filter(|c| *c > 0)
        .min()
        .unwrap_or(0);
    let folds = if min_shots <= LOO_MAX_SHOTS || n <= K_FOLDS {
        (0..n).collect::<Vec<usize>>()
    } else {
        stratified_folds(y, classes, K_FOLDS, seed)
    };
    let k = folds.iter().max().map(|m| m + 1).unwrap_or(0);
    let method = if k == n {
        "loo".to_string()
    } else {
        format!("kfold-{k}")
    };
    let mut held_out = vec![None; n];
    for f in 0..k {
        let train: Vec<usize> = (0..n).filter(|i| folds[*i] != f).collect();
        let test: Vec<usize> = (0..n).filter(|i| folds[*i] == f).collect();
        if train.is_empty() {
            continue;
        }
        let tx: Vec<Vec<f32>> = train.iter().map(|i| x[*i].clone()).collect();
        let ty: Vec<usize> = train.iter().map(|i| y[*i]).collect();
        let model = fit(kind, &tx, &ty, classes, params)?;
        for i in test {
            if ty.contains(&y[i]) {
                held_out[i] = Some(model.logits(&x[i]));
            }
        }
    }
    let mut scored = 0;
    let mut correct = 0;
    for (l, t) in held_out.iter().zip(y) {
        if let Some(l) = l {
            scored += 1;
            if argmax(l) == *t {
                correct += 1;
            }
        }
    }
    Ok(CvReport {
        kind,
        method,
        accuracy: if scored > 0 { correct as f64 / scored as f64 } else { 0.0 },
        scored,
        held_out,
    })
}

/// Tries every kind and picks the best held-out accuracy (ties: the earlier in
/// [`HeadKind::ALL`], i.e. the simpler-to-explain head). With one example per class nothing can
/// be held out, and the centroid head (weight imprinting) is chosen.
pub fn auto_select(
    x: &[Vec<f32>],
    y: &[usize],
    classes: usize,
    params: &HeadParams,
    seed: u64,
) -> Result<Selection, HeadError> {
    let mut reports = Vec::new();
    for kind in HeadKind::ALL {
        reports.push(cross_validate(kind, x, y, classes, params, seed)?);
    }
    let chosen = if reports.iter().all(|r| r.scored == 0) {
        HeadKind::Centroid
    } else {
        let mut best = &reports[0];
        for r in &reports[1..] {
            if r.accuracy > best.accuracy + 1e-9 {
                best = r;
            }
        }
        best.kind
    };
    Ok(Selection { chosen, reports })
}

/// Fits the softmax temperature (minimum held-out negative log-likelihood over a log grid) and
/// the `unknown` threshold (the [`THRESHOLD_QUANTILE`] of the best scores of correctly classified
/// held-out examples). Returns `(temperature, threshold)`.
pub fn calibrate(report: &CvReport, y: &[usize], classes: usize) -> (f32, f32) {
    let scored: Vec<(&Vec<f32>, usize)> = report
        .held_out
        .iter()
        .zip(y)
        .filter_map(|(l, t)| l.as_ref().map(|l| (l, *t)))
        .collect();
    if scored.is_empty() {
        let t = match report.kind {
            HeadKind::Logistic | HeadKind::Bayes => 1.0,
            HeadKind::Centroid | HeadKind::Knn => 20.0,
        };
        return (t, FALLBACK_THRESHOLD.max(1.0 / classes.max(1) as f32));
    }
    let mut best_t = 1.0f32;
    let mut best_nll = f64::INFINITY;
    for step in -40..=40 {
        let t = 10f32.powf(step as f32 / 10.0); // 1e-4 .. 1e4
        let nll: f64 = scored
            .iter()
            .map(|(l, c)| {
                let p = softmax(&l.iter().map(|v| v * t).collect::<Vec<_>>());
                -(p[*c].max(1e-12) as f64).ln()
            })
            .sum();
        if nll < best_nll - 1e-9 {
            best_nll = nll;
            best_t = t;
        }
    }
    let mut correct_scores: Vec<f32> = scored
        .iter()
        .filter(|(l, c)| argmax(l) == *c)
        .map(|(l, _)| {
            let p = softmax(&l.iter().map(|v| v * best_t).collect::<Vec<_>>());
            p.into_iter().fold(0f32, f32::max)
        })
        .collect();
    correct_scores.sort_by(f32::total_cmp);
    let threshold = if correct_scores.is_empty() {
        FALLBACK_THRESHOLD
    } else {
        let i = ((correct_scores.len() as f32 * THRESHOLD_QUANTILE).floor() as usize)
            .min(correct_scores.len() - 1);
        correct_scores[i]
    };
    (best_t, threshold)
}

fn stratified_folds(y: &[usize], classes: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut folds = vec![0; y.len()];
    let mut offset = 0;
    for c in 0..classes {
        let mut idx: Vec<usize> = (0..y.len()).filter(|i| y[*i] == c).collect();
        idx.shuffle(&mut rng);
        for (j, i) in idx.iter().enumerate() {
            folds[*i] = (j + offset) % k;
        }
        offset += idx.len();
    }
    folds
}

pub(crate) fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_folds_balance_every_class() {
        let y: Vec<usize> = (0..30).map(|i| i % 3).collect();
        let f = stratified_folds(&y, 3, 5, 7);
        for fold in 0..5 {
            for c in 0..3 {
                let n = (0..30).filter(|i| f[*i] == fold && y[*i] == c).count();
                assert_eq!(n, 2, "fold {fold} class {c}");
            }
        }
    }

    #[test]
    fn calibration_prefers_sharp_temperatures_for_separable_logits() {
        let report = CvReport {
            kind: HeadKind::Centroid,
            method: "loo".into(),
            accuracy: 1.0,
            scored: 4,
            held_out: vec![
                Some(vec![0.9, 0.1]),
                Some(vec![0.8, 0.2]),
                Some(vec![0.1, 0.9]),
                Some(vec![0.3, 0.7]),
            ],
        };
        let (t, thr) = calibrate(&report, &[0, 0, 1, 1], 2);
        assert!(t > 10.0, "{t}");
        assert!(thr > 0.9 && thr <= 1.0, "{thr}");
    }
}
