//! Accuracy, per-class precision / recall / F1 and the confusion matrix.

use serde::Serialize;

/// Per-class figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassMetrics {
    /// Class name.
    pub label: String,
    /// Of the predictions of this class, the share that was right.
    pub precision: f64,
    /// Of the examples of this class, the share found.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
    /// Examples of this class.
    pub support: usize,
}

/// A confusion matrix: `counts[true][predicted]`; the extra last column counts `unknown`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Confusion {
    /// Class names (rows and the first columns).
    pub labels: Vec<String>,
    /// `labels.len()` rows of `labels.len() + 1` counts (last = predicted unknown).
    pub counts: Vec<Vec<usize>>,
}

impl Confusion {
    /// An empty matrix.
    pub fn new(labels: Vec<String>) -> Confusion {
        let n = labels.len();
        Confusion {
            labels,
            counts: vec![vec![0; n + 1]; n],
        }
    }

    /// Adds one example; `predicted = None` is `unknown`.
    pub fn add(&mut self, truth: usize, predicted: Option<usize>) {
        let n = self.labels.len();
        self.counts[truth][predicted.unwrap_or(n)] += 1;
    }

    /// Share of examples predicted as their true class.
    pub fn accuracy(&self) -> f64 {
        let total: usize = self.counts.iter().flatten().sum();
        let right: usize = (0..self.labels.len()).map(|i| self.counts[i][i]).sum();
        if total == 0 {
            0.0
        } else {
            right as f64 / total as f64
        }
    }

    /// Precision, recall, F1 per class.
    pub fn per_class(&self) -> Vec<ClassMetrics> {
        let n = self.labels.len();
        (0..n)
            .map(|c| {
                let tp = self.counts[c][c] as f64;
                let support: usize = self.counts[c].iter().sum();
                let predicted: usize = (0..n).map(|r| self.counts[r][c]).sum();
                let precision = if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                };
                let recall = if support > 0 {
                    tp / support as f64
                } else {
                    0.0
                };
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassMetrics {
                    label: self.labels[c].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect()
    }

    /// The matrix as aligned text.
    pub fn to_text(&self) -> String {
        let w = self
            .labels
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(4)
            .max(7);
        let mut s = format!("{:>w$} |", "true\\pred");
        for l in &self.labels {
            s += &format!(" {:>w$}", l);
        }
        s += &format!(" {:>w$}\n", "unknown");
        for (l, row) in self.labels.iter().zip(&self.counts) {
            s += &format!("{:>w$} |", l);
            for c in row {
                s += &format!(" {:>w$}", c);
            }
            s += "\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_a_small_matrix() {
        let mut c = Confusion::new(vec!["a".into(), "b".into()]);
        for (t, p) in [
            (0, Some(0)),
            (0, Some(0)),
            (0, Some(1)),
            (1, Some(1)),
            (1, None),
        ] {
            c.add(t, p);
        }
        assert!((c.accuracy() - 0.6).abs() < 1e-12);
        let m = c.per_class();
        assert!((m[0].precision - 1.0).abs() < 1e-12);
        assert!((m[0].recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m[1].precision - 0.5).abs() < 1e-12);
        assert!((m[1].recall - 0.5).abs() < 1e-12);
        assert!(c.to_text().contains("unknown"));
    }
}
