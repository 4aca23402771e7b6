//! [`Examples`]: the labelled vectors every fit, cross-validation and evaluation works on.

use super::HeadError;

/// A labelled set of feature vectors (usually unit-length embeddings) with the object each
/// shows.
///
/// `groups[i]` names the object example `i` shows: photos of one object (a burst of camera
/// frames, `owl_0.jpg` and `owl_1.jpg`) share a group, and every split that holds examples out
/// holds a whole group out, so a held-out photo's twin is never in the training set.
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    /// Feature vectors, all of one length.
    pub x: Vec<Vec<f32>>,
    /// Class id per vector (index into `labels`).
    pub y: Vec<usize>,
    /// Object id per vector (dense ids; see [`group_ids`]).
    pub groups: Vec<usize>,
    /// Class names.
    pub labels: Vec<String>,
}

impl Examples {
    /// Checks that the parts fit together: one class id and one group per vector, class ids
    /// within `labels`, and vectors of one length.
    pub fn new(
        x: Vec<Vec<f32>>,
        y: Vec<usize>,
        groups: Vec<usize>,
        labels: Vec<String>,
    ) -> Result<Examples, HeadError> {
        let n = x.len();
        if y.len() != n || groups.len() != n {
            return Err(HeadError::NotEnoughData(format!(
                "{n} vectors but {} class ids and {} group ids",
                y.len(),
                groups.len()
            )));
        }
        if let Some(bad) = y.iter().find(|c| **c >= labels.len()) {
            return Err(HeadError::NotEnoughData(format!(
                "class id {bad} but only {} labels",
                labels.len()
            )));
        }
        if let Some(first) = x.first() {
            if let Some(v) = x.iter().find(|v| v.len() != first.len()) {
                return Err(HeadError::Dimension {
                    got: v.len(),
                    want: first.len(),
                });
            }
        }
        Ok(Examples {
            x,
            y,
            groups,
            labels,
        })
    }

    /// The same examples with other features (e.g. raw pixels for a from-scratch baseline).
    pub fn with_features(&self, x: Vec<Vec<f32>>) -> Result<Examples, HeadError> {
        Examples::new(x, self.y.clone(), self.groups.clone(), self.labels.clone())
    }

    /// How many examples.
    pub fn len(&self) -> usize {
        self.x.len()
    }

    /// No examples at all.
    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    /// Number of classes (labels), with or without examples.
    pub fn classes(&self) -> usize {
        self.labels.len()
    }

    /// Class ids that have at least one example.
    pub fn present_classes(&self) -> Vec<usize> {
        (0..self.classes()).filter(|c| self.y.contains(c)).collect()
    }

    /// The examples at `idx`, in that order (labels kept whole, so class ids stay valid).
    pub fn subset(&self, idx: &[usize]) -> Examples {
        Examples {
            x: idx.iter().map(|i| self.x[*i].clone()).collect(),
            y: idx.iter().map(|i| self.y[*i]).collect(),
            groups: idx.iter().map(|i| self.groups[*i]).collect(),
            labels: self.labels.clone(),
        }
    }

    /// The distinct groups of class `c`, sorted.
    pub(crate) fn groups_of(&self, c: usize) -> Vec<usize> {
        distinct_groups(&self.y, &self.groups, c)
    }
}

/// The distinct groups of class `c` among examples with class ids `y` and groups `groups`,
/// sorted.
pub(crate) fn distinct_groups(y: &[usize], groups: &[usize], c: usize) -> Vec<usize> {
    let mut g: Vec<usize> = (0..y.len())
        .filter(|i| y[*i] == c)
        .map(|i| groups[i])
        .collect();
    g.sort_unstable();
    g.dedup();
    g
}

/// Dense ids for group names (equal names, equal ids, numbered in order of first appearance).
pub fn group_ids<S: AsRef<str>>(keys: &[S]) -> Vec<usize> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    keys.iter()
        .map(|k| {
            let n = seen.len();
            *seen.entry(k.as_ref()).or_insert(n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_are_dense_and_stable() {
        assert_eq!(group_ids(&["a", "b", "a", "c", "b"]), vec![0, 1, 0, 2, 1]);
    }

    #[test]
    fn parts_that_do_not_fit_are_refused() {
        let labels = vec!["a".to_string(), "b".to_string()];
        assert!(Examples::new(vec![vec![1.0]], vec![0, 1], vec![0], labels.clone()).is_err());
        assert!(Examples::new(vec![vec![1.0]], vec![2], vec![0], labels.clone()).is_err());
        assert!(Examples::new(
            vec![vec![1.0], vec![1.0, 2.0]],
            vec![0, 1],
            vec![0, 1],
            labels.clone()
        )
        .is_err());
        let e = Examples::new(vec![vec![1.0], vec![2.0]], vec![1, 1], vec![0, 1], labels).unwrap();
        assert_eq!(e.present_classes(), vec![1]);
        assert_eq!(e.subset(&[1]).x, vec![vec![2.0]]);
    }
}
