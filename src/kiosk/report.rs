//! The pictures `graft eval` and `graft curve` draw, for a kiosk's own examples: the confusion
//! matrix of grouped k-fold cross-validation with the head in use, and accuracy against
//! examples per class. A front end takes a snapshot on the request queue
//! ([`Op::Evaluation`](super::Op::Evaluation)) and draws from it on its own thread, so the
//! fits these take never hold up the kiosk.

use crate::head::eval;
use crate::head::{Examples, HeadKind, HeadParams};
use crate::plot::{self, Series};
use crate::store::headfile;

use super::state::{Kiosk, KioskError};

/// Seed of the pictures' splits (the same pictures for the same examples).
const SEED: u64 = 7;
/// Folds of the confusion matrix's cross-validation.
const FOLDS: usize = 5;
/// Draws per point of the learning curve.
const TRIALS: usize = 5;
/// The learning curve's points, in examples per class.
const SHOTS: [usize; 7] = [1, 2, 3, 5, 10, 20, 50];

/// What the pictures are drawn from: the examples under the head's transform, its kind.
#[derive(Debug, Clone)]
pub struct EvalData {
    examples: Examples,
    params: HeadParams,
    kind: HeadKind,
    model: String,
}

impl Kiosk {
    /// A snapshot to draw the pictures from; `None` without a head.
    pub fn evaluation_data(&self) -> Option<EvalData> {
        let h = self.head()?;
        let params = HeadParams {
            top: self
                .backbone()
                .top_block()
                .cloned()
                .map(std::sync::Arc::new),
            ..h.head.params.clone()
        };
        Some(EvalData {
            examples: headfile::training_examples(&h.head.labels, &h.examples, &params),
            params,
            kind: h.head.kind,
            model: self.backbone().id().name.clone(),
        })
    }
}

impl EvalData {
    /// The head's kind fitted and scored on every split.
    fn evaluate(&self, splits: &[eval::Split]) -> Result<eval::Evaluation, KioskError> {
        Ok(eval::evaluate(
            &self.examples,
            Some(self.kind),
            splits,
            &self.params,
            SEED,
            || {},
        )?)
    }

    /// The confusion matrix (SVG) of grouped, stratified k-fold cross-validation.
    pub fn confusion_svg(&self) -> Result<String, KioskError> {
        let splits = eval::kfold_splits(&self.examples, FOLDS, SEED);
        if splits.is_empty() {
            return Err(KioskError::NoHead { have: 1 });
        }
        let e = self.evaluate(&splits)?;
        let (m, s) = e.accuracy();
        let title = format!(
            "{} head, {}-fold by object: {:.1}% ± {:.1}",
            self.kind,
            splits.len(),
            m * 100.0,
            s * 100.0
        );
        Ok(plot::confusion_svg_string(&e.confusion, &title)?)
    }

    /// Accuracy against examples per class (SVG), as far as the examples allow.
    pub fn curve_svg(&self) -> Result<String, KioskError> {
        let mut points = Vec::new();
        for shots in SHOTS {
            let Some(splits) = eval::few_shot_splits(&self.examples, shots, TRIALS, SEED) else {
                break;
            };
            let e = self.evaluate(&splits)?;
            let (m, s) = e.accuracy();
            points.push((shots as f64, m, s));
        }
        let classes = self.examples.classes();
        let series = [Series {
            name: format!("{} head on {} features", self.kind, self.model),
            points,
            dashed: false,
        }];
        let title = format!("accuracy vs examples per class ({classes} classes)");
        Ok(plot::curve_svg_string(
            &series,
            &title,
            1.0 / classes.max(1) as f64,
        )?)
    }
}
