//! Live classification: a frame through the backbone and a head, timed per stage, and the
//! temporal smoothing + debounce that turn a stream of per-frame guesses into stable reports.
//!
//! Pure code over [`crate::backbone`], [`crate::head`] and
//! [`crate::capture`]; used by `graft watch` and by `graft serve`'s `STREAM`.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backbone::{Backbone, BackboneError};
use crate::capture::Frame;
use crate::head::{Head, HeadError, Prediction};

/// Where the time of one frame went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stages {
    /// Getting the frame: driver wait or file read, plus pixel conversion (ms).
    pub capture_ms: f64,
    /// Resize, crop, normalise (ms).
    pub preprocess_ms: f64,
    /// The backbone's forward pass (ms).
    pub embed_ms: f64,
    /// The head (ms).
    pub head_ms: f64,
}

impl Stages {
    /// Frame to label, all stages (ms).
    pub fn total_ms(&self) -> f64 {
        self.capture_ms + self.preprocess_ms + self.embed_ms + self.head_ms
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Errors of the live path.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The backbone failed.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// The head failed.
    #[error(transparent)]
    Head(#[from] HeadError),
}

/// One classified frame.
#[derive(Debug, Clone)]
pub struct Classified {
    /// The head's per-class probabilities.
    pub probs: Vec<f32>,
    /// The per-frame prediction (threshold applied).
    pub prediction: Prediction,
    /// The raw embedding (for learning from this frame).
    pub embedding: Vec<f32>,
    /// Timings.
    pub stages: Stages,
}

/// Runs one frame through the backbone and a head.
pub fn classify(
    backbone: &Backbone,
    head: &Head,
    frame: &Frame,
    threshold: Option<f32>,
) -> Result<Classified, LiveError> {
    let t0 = Instant::now();
    let prepared = backbone.prepare_frame(&frame.image);
    let t1 = Instant::now();
    let embedding = backbone
        .embed(std::slice::from_ref(&prepared))?
        .remove(0)
        .vector;
    let t2 = Instant::now();
    // One pass through the head: the smoother wants every class's score, the report the top 3.
    let probs = head.scores(&embedding)?;
    let prediction =
        Prediction::from_scores(&head.labels, &probs, threshold.unwrap_or(head.threshold), 3);
    let t3 = Instant::now();
    Ok(Classified {
        probs,
        prediction,
        embedding,
        stages: Stages {
            capture_ms: ms(frame.capture_time),
            preprocess_ms: ms(t1 - t0),
            embed_ms: ms(t2 - t1),
            head_ms: ms(t3 - t2),
        },
    })
}

/// How per-frame scores are smoothed over time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Smoothing {
    /// None: every frame stands alone.
    Off,
    /// Exponential moving average of the probabilities: `s = a·p + (1 − a)·s`.
    Ema {
        /// Weight of the newest frame, in (0, 1].
        alpha: f32,
    },
    /// Majority vote of the last `window` per-frame labels (`unknown` votes too).
    Vote {
        /// Frames voting.
        window: usize,
    },
}

impl fmt::Display for Smoothing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Smoothing::Off => f.write_str("off"),
            Smoothing::Ema { alpha } => write!(f, "ema:{alpha}"),
            Smoothing::Vote { window } => write!(f, "vote:{window}"),
        }
    }
}

/// A smoothing spec that is not `off`, `ema[:ALPHA]` or `vote[:FRAMES]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad smoothing {0:?}: use off, ema[:ALPHA in (0,1]] or vote[:FRAMES]")]
pub struct ParseSmoothingError(pub String);

impl FromStr for Smoothing {
    type Err = ParseSmoothingError;

    /// `off`, `ema`, `ema:0.3`, `vote`, `vote:7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let (kind, arg) = s.split_once(':').unwrap_or((s.as_str(), ""));
        let bad = || ParseSmoothingError(s.clone());
        match kind {
            "off" | "none" if arg.is_empty() => Ok(Smoothing::Off),
            "ema" => {
                let alpha = if arg.is_empty() {
                    0.4
                } else {
                    arg.parse().map_err(|_| bad())?
                };
                if alpha > 0.0 && alpha <= 1.0 {
                    Ok(Smoothing::Ema { alpha })
                } else {
                    Err(bad())
                }
            }
            "vote" => {
                let window = if arg.is_empty() {
                    5
                } else {
                    arg.parse().map_err(|_| bad())?
                };
                if window >= 1 {
                    Ok(Smoothing::Vote { window })
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }
}

/// The smoothed state after a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Smoothed {
    /// Class id, or `None` for unknown.
    pub label: Option<usize>,
    /// Smoothed score of the best class (for a vote: the share of votes).
    pub score: f32,
}

/// Smoothing plus debounce: a label is reported once, when it has been the smoothed answer for
/// `stable` frames in a row and differs from the last one reported.
#[derive(Debug, Clone)]
pub struct Smoother {
    smoothing: Smoothing,
    threshold: f32,
    stable: usize,
    ema: Vec<f32>,
    votes: VecDeque<Option<usize>>,
    candidate: Option<Option<usize>>,
    run: usize,
    reported: Option<Option<usize>>,
}

impl Smoother {
    /// `threshold`: smoothed best scores below it are unknown. `stable` ≥ 1.
    pub fn new(smoothing: Smoothing, threshold: f32, stable: usize) -> Smoother {
        Smoother {
            smoothing,
            threshold,
            stable: stable.max(1),
            ema: Vec::new(),
            votes: VecDeque::new(),
            candidate: None,
            run: 0,
            reported: None,
        }
    }

    /// Forgets the history (e.g. after the head changed).
    pub fn reset(&mut self) {
        *self = Smoother::new(self.smoothing, self.threshold, self.stable);
    }

    fn best(&self, p: &[f32]) -> Smoothed {
        let (i, s) = p
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0));
        Smoothed {
            label: crate::head::passes(s, self.threshold).then_some(i),
            score: s,
        }
    }

    /// Adds a frame's probabilities; returns the smoothed state and, if this frame makes a new
    /// stable label, that label to report.
    pub fn push(&mut self, probs: &[f32]) -> (Smoothed, Option<Smoothed>) {
        let now = match self.smoothing {
            Smoothing::Off => self.best(probs),
            // A frame whose scores are not all numbers carries no evidence: it is unknown, and
            // is kept out of the average, which it would otherwise poison for good.
            Smoothing::Ema { .. } if !probs.iter().all(|p| p.is_finite()) => self.best(probs),
            Smoothing::Ema { alpha } => {
                if self.ema.len() != probs.len() {
                    self.ema = probs.to_vec();
                } else {
                    for (s, p) in self.ema.iter_mut().zip(probs) {
                        *s = alpha * p + (1.0 - alpha) * *s;
                    }
                }
                self.best(&self.ema.clone())
            }
            Smoothing::Vote { window } => {
                let frame = self.best(probs).label;
                self.votes.push_back(frame);
                while self.votes.len() > window {
                    self.votes.pop_front();
                }
                let mut tally: Vec<(Option<usize>, usize)> = Vec::new();
                for v in &self.votes {
                    match tally.iter_mut().find(|(l, _)| l == v) {
                        Some((_, n)) => *n += 1,
                        None => tally.push((*v, 1)),
                    }
                }
                // Ties go to the most recent frame's label.
                let last = self.votes.back().copied().flatten();
                let (label, n) = tally
                    .into_iter()
                    .max_by_key(|(l, n)| (*n, *l == last))
                    .unwrap_or((None, 0));
                Smoothed {
                    label,
                    score: n as f32 / self.votes.len().max(1) as f32,
                }
            }
        };
        if self.candidate == Some(now.label) {
            self.run += 1;
        } else {
            self.candidate = Some(now.label);
            self.run = 1;
        }
        let report = (self.run >= self.stable && self.reported != Some(now.label)).then(|| {
            self.reported = Some(now.label);
            now
        });
        (now, report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [f32; 2] = [0.9, 0.1];
    const B: [f32; 2] = [0.1, 0.9];
    const FLAT: [f32; 2] = [0.5, 0.5];

    fn reports(s: &mut Smoother, frames: &[[f32; 2]]) -> Vec<Option<usize>> {
        frames
            .iter()
            .filter_map(|p| s.push(p).1.map(|r| r.label))
            .collect()
    }

    #[test]
    fn debounce_reports_each_stable_change_once() {
        let mut s = Smoother::new(Smoothing::Off, 0.6, 2);
        // One stray B frame is not reported; A twice is; A again is not repeated.
        let got = reports(&mut s, &[A, B, A, A, A, B, B, FLAT, FLAT, B]);
        assert_eq!(got, vec![Some(0), Some(1), None]);
        // The last B (after unknown) becomes a change once it holds for a second frame.
        assert_eq!(reports(&mut s, &[B]), vec![Some(1)]);
    }

    #[test]
    fn ema_bridges_a_flicker() {
        let mut s = Smoother::new(Smoothing::Ema { alpha: 0.3 }, 0.6, 1);
        let got = reports(&mut s, &[A, A, A, B, A, A]);
        assert_eq!(got, vec![Some(0)], "a single B frame must not flip an EMA");
        let mut s = Smoother::new(Smoothing::Ema { alpha: 0.3 }, 0.6, 1);
        let got = reports(&mut s, &[A, B, B, B, B, B]);
        assert_eq!(got.first(), Some(&Some(0)));
        assert_eq!(got.last(), Some(&Some(1)), "a lasting change comes through");
    }

    /// A frame of NaN scores (from a head no check caught) is unknown under every smoothing,
    /// and the next good frame counts again: the EMA does not stay NaN for good.
    #[test]
    fn frames_without_numbers_are_unknown_and_do_not_poison_the_average() {
        const NAN: [f32; 2] = [f32::NAN, f32::NAN];
        for smoothing in [
            Smoothing::Off,
            Smoothing::Ema { alpha: 0.5 },
            Smoothing::Vote { window: 1 },
        ] {
            let mut s = Smoother::new(smoothing, 0.6, 1);
            assert_eq!(s.push(&A).0.label, Some(0), "{smoothing}");
            assert_eq!(s.push(&NAN).0.label, None, "{smoothing}");
            assert_eq!(s.push(&A).0.label, Some(0), "{smoothing}: recovers");
        }
    }

    #[test]
    fn vote_takes_the_majority() {
        let mut s = Smoother::new(Smoothing::Vote { window: 3 }, 0.6, 1);
        let (now, _) = s.push(&A);
        assert_eq!(now.label, Some(0));
        s.push(&B);
        let (now, _) = s.push(&A);
        assert_eq!(
            now,
            Smoothed {
                label: Some(0),
                score: 2.0 / 3.0
            }
        );
        s.push(&FLAT);
        let (now, _) = s.push(&FLAT);
        assert_eq!(now.label, None, "two unknown votes of three");
    }

    #[test]
    fn smoothing_parses() {
        assert_eq!("off".parse::<Smoothing>(), Ok(Smoothing::Off));
        assert_eq!(
            "ema".parse::<Smoothing>(),
            Ok(Smoothing::Ema { alpha: 0.4 })
        );
        assert_eq!(
            "vote:7".parse::<Smoothing>(),
            Ok(Smoothing::Vote { window: 7 })
        );
        assert!("ema:0".parse::<Smoothing>().is_err());
        assert!("vote:0".parse::<Smoothing>().is_err());
        assert!("median".parse::<Smoothing>().is_err());
    }
}
