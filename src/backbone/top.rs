//! The backbone's **top block**: its last 1×1 convolution and what follows it up to the pooled
//! features (for EfficientNet-Lite0: `_conv_head`, 320 → 1280 channels on the 7×7 map, ReLU6,
//! then the average or GeM pool). Fine-tuning (`head::finetune`) cuts the backbone before it
//! (`--model NAME:top`: the features are the block's input, 320×7×7 per image) and trains the
//! block's weights beside the classifier, starting from these.
//!
//! The block is read from the prepared graph as plain data ([`TopBlock`]), walking back from
//! the features output: `Flatten`/`Reshape`/`Squeeze`, an optional `Pow(1/p)`, the
//! `GlobalAveragePool` (or `ReduceMean` over the map), an optional `Pow(p)` and `Max(x, 0)`
//! (graft's GeM), any `Clip`/`Relu`, then a 1×1, stride-1, ungrouped `Conv` with constant
//! weights. Anything else is refused with the node that did not fit: the arithmetic
//! `head::finetune` runs must be exactly the graph's.

use super::graph::{Graph, Node};
use super::BackboneError;

/// Suffix of a model name cut before its top block (`efficientnet-lite0-w8-gem:top`).
pub const TOP_SUFFIX: &str = ":top";

/// The top block as plain numbers: `features = pool(clip(W · x + b))` per image, where `x` is
/// the block's input (`cin × positions`, channel-major as the graph lays it out).
#[derive(Debug, Clone, PartialEq)]
pub struct TopBlock {
    /// The convolution's node name, for messages.
    pub node: String,
    /// Input channels.
    pub cin: usize,
    /// Output channels (the features' size).
    pub cout: usize,
    /// Spatial positions of the map (7 × 7 = 49 at 224 px).
    pub positions: usize,
    /// `cout × cin`, row-major.
    pub weights: Vec<f32>,
    /// `cout` biases.
    pub bias: Vec<f32>,
    /// The activation after the convolution: every value clamped to `[lo, hi]` (ReLU6: 0, 6;
    /// `f32::INFINITY` for a plain ReLU).
    pub clip: (f32, f32),
    /// GeM pooling's exponent, or `None` for the plain average.
    pub gem_power: Option<f32>,
}

impl TopBlock {
    /// Values per image at the cut: `cin × positions`.
    pub fn input_size(&self) -> usize {
        self.cin * self.positions
    }

    /// Checks the shapes and that every number is finite (a block read back from a head file
    /// goes through this too).
    pub fn validate(&self) -> Result<(), String> {
        if self.cin == 0 || self.cout == 0 || self.positions == 0 {
            return Err(format!(
                "top block of {}: {} inputs, {} outputs, {} positions: none may be 0",
                self.node, self.cin, self.cout, self.positions
            ));
        }
        if self.weights.len() != self.cin * self.cout || self.bias.len() != self.cout {
            return Err(format!(
                "top block of {}: {} weights and {} biases for {}×{}",
                self.node,
                self.weights.len(),
                self.bias.len(),
                self.cout,
                self.cin
            ));
        }
        if self
            .weights
            .iter()
            .chain(&self.bias)
            .any(|v| !v.is_finite())
        {
            return Err(format!(
                "top block of {}: a weight is not finite",
                self.node
            ));
        }
        let (lo, hi) = self.clip;
        if lo.is_nan() || hi.is_nan() || lo > hi || lo < 0.0 {
            return Err(format!(
                "top block of {}: activation range [{lo}, {hi}] (must be within [0, ∞))",
                self.node
            ));
        }
        if let Some(p) = self.gem_power {
            if !(p.is_finite() && p >= 1.0) {
                return Err(format!("top block of {}: GeM power {p}", self.node));
            }
        }
        Ok(())
    }
}

/// Finds the top block feeding `features` in `graph`; `positions` is filled in by the caller
/// once the cut's shape is known (0 here). Returns the block and the name of its input tensor.
pub(crate) fn find(graph: &Graph, features: &str) -> Result<(TopBlock, String), BackboneError> {
    let refuse = |reason: String| BackboneError::NotImageModel {
        model: graph.model.clone(),
        reason: format!("no top block to fine-tune: {reason}"),
    };
    let producer = |t: &str| {
        graph
            .nodes
            .iter()
            .find(|n| n.outputs.iter().any(|o| o == t))
    };
    let scalar = |n: &Node, ix: usize| -> Option<f32> {
        n.input(ix)
            .and_then(|name| graph.constants.get(name))
            .and_then(|c| c.scalar())
    };
    let mut t = features.to_string();
    let mut pooled = false;
    let mut gem: Option<f32> = None;
    let mut root: Option<f32> = None;
    let mut clip = (f32::NEG_INFINITY, f32::INFINITY);
    for _ in 0..16 {
        let n = producer(&t).ok_or_else(|| refuse(format!("nothing computes {t:?}")))?;
        let data = n
            .input(0)
            .ok_or_else(|| refuse(format!("{} has no input", n.describe())))?
            .to_string();
        match (n.op.as_str(), pooled) {
            ("Flatten" | "Reshape" | "Squeeze", false) => {}
            ("Pow", false) if root.is_none() => {
                // GeM's 1/p, checked against the p below.
                root =
                    Some(scalar(n, 1).ok_or_else(|| {
                        refuse(format!("{} has no constant exponent", n.describe()))
                    })?);
            }
            ("GlobalAveragePool" | "ReduceMean", false) => pooled = true,
            ("Pow", true) if gem.is_none() => {
                let p = scalar(n, 1)
                    .ok_or_else(|| refuse(format!("{} has no constant exponent", n.describe())))?;
                gem = Some(p);
            }
            ("Max", true) => {
                // Max(x, 0): a ReLU (GeM's clamp); any other constant is not one.
                let other = n.inputs.iter().skip(1).find(|s| !s.is_empty());
                let zero = other
                    .and_then(|s| graph.constants.get(s))
                    .and_then(|c| c.scalar())
                    == Some(0.0);
                if !zero {
                    return Err(refuse(format!("{} is not Max(x, 0)", n.describe())));
                }
                clip.0 = clip.0.max(0.0);
            }
            ("Relu", true) => clip.0 = clip.0.max(0.0),
            ("Clip", true) => {
                let lo = scalar(n, 1).unwrap_or(n.float("min", f32::NEG_INFINITY));
                let hi = scalar(n, 2).unwrap_or(n.float("max", f32::INFINITY));
                clip = (clip.0.max(lo), clip.1.min(hi));
            }
            ("Conv", true) => {
                let weights = n
                    .input(1)
                    .and_then(|w| graph.constants.get(w))
                    .ok_or_else(|| refuse(format!("{} has no constant weights", n.describe())))?;
                let [cout, cin, kh, kw] = weights.dims[..] else {
                    return Err(refuse(format!(
                        "{} weights {:?}",
                        n.describe(),
                        weights.dims
                    )));
                };
                let ones = |a: &str| n.ints(a).is_none_or(|v| v.iter().all(|x| *x == 1));
                let zeros = n.ints("pads").is_none_or(|v| v.iter().all(|x| *x == 0));
                if (kh, kw) != (1, 1)
                    || n.int("group", 1) != 1
                    || !ones("strides")
                    || !ones("dilations")
                    || !zeros
                {
                    return Err(refuse(format!(
                        "{} is not a 1×1, stride-1, unpadded, ungrouped convolution",
                        n.describe()
                    )));
                }
                let bias = match n.input(2) {
                    Some(b) => graph
                        .constants
                        .get(b)
                        .map(|c| c.values.clone())
                        .ok_or_else(|| refuse(format!("{} has no constant bias", n.describe())))?,
                    None => vec![0.0; cout],
                };
                match (gem, root) {
                    (None, None) => {}
                    (Some(p), Some(r)) if p >= 1.0 && (p * r - 1.0).abs() < 1e-5 => {}
                    _ => {
                        return Err(refuse(format!(
                        "powers {gem:?} before and {root:?} after the pool are not GeM's p and 1/p"
                    )))
                    }
                }
                let block = TopBlock {
                    node: n.describe(),
                    cin,
                    cout,
                    positions: 0,
                    weights: weights.values.clone(),
                    bias,
                    clip: (clip.0.max(0.0), clip.1),
                    gem_power: gem,
                };
                if clip.0 < 0.0 {
                    return Err(refuse(format!(
                        "the activation after {} is not a ReLU",
                        n.describe()
                    )));
                }
                return Ok((block, data));
            }
            _ => {
                return Err(refuse(format!(
                    "{} between the features and the last convolution",
                    n.describe()
                )))
            }
        }
        t = data;
    }
    Err(refuse(
        "the features are too far from any convolution".into(),
    ))
}
