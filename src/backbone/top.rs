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

/// Suffix of a model name cut one block deeper, before the last inverted-residual block that
/// feeds the top block (`efficientnet-lite0:deep`): fine-tuning trains both (see [`Mbconv`]).
pub const DEEP_SUFFIX: &str = ":deep";

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
    /// For a model cut one block deeper (`NAME:deep`): the block that computes this one's input
    /// from the cut. `None` for `NAME:top`.
    pub pre: Option<Box<Mbconv>>,
}

/// The last inverted-residual (MBConv) block before the top block, as plain numbers (for
/// EfficientNet-Lite0: block 15, 192 → 1152 → 320 channels on the 7×7 map, no residual):
///
/// ```text
/// x (cin × P) ─ 1×1 expand ─ clip ─ k×k depthwise (stride 1, pad k/2) ─ clip ─ 1×1 project ─▶ the top block's input
/// ```
///
/// Every convolution's bias is its own (batch normalisation is folded in the graph); the
/// project convolution has no activation in the float graph (the w8 graph clips it to its
/// quantisation range: `project_clip`).
#[derive(Debug, Clone, PartialEq)]
pub struct Mbconv {
    /// The expand convolution's node, for messages.
    pub node: String,
    /// Input channels (at the cut).
    pub cin: usize,
    /// Channels inside the block (expand's output, the depthwise's channels).
    pub hidden: usize,
    /// Output channels: the top block's `cin`.
    pub cout: usize,
    /// The map is `side × side` (the top block's `positions` is its square).
    pub side: usize,
    /// The depthwise kernel's side (3 or 5).
    pub kernel: usize,
    /// `hidden × cin`, row-major.
    pub expand_w: Vec<f32>,
    /// `hidden` biases.
    pub expand_b: Vec<f32>,
    /// The activation after the expand convolution (as [`TopBlock::clip`]).
    pub expand_clip: (f32, f32),
    /// `hidden × kernel × kernel`, row-major (ONNX's `[hidden, 1, k, k]`).
    pub depthwise_w: Vec<f32>,
    /// `hidden` biases.
    pub depthwise_b: Vec<f32>,
    /// The activation after the depthwise convolution.
    pub depthwise_clip: (f32, f32),
    /// `cout × hidden`, row-major.
    pub project_w: Vec<f32>,
    /// `cout` biases.
    pub project_b: Vec<f32>,
    /// A clip after the project convolution (`±∞`: none, as in the float graph; the w8
    /// graph's activation range where its quantisation was).
    pub project_clip: (f32, f32),
    /// The tensor each convolution reads in the graph: expand (the cut), depthwise, project,
    /// then the top block's convolution. An export finds the convolutions by them.
    pub reads: [String; 4],
}

impl Mbconv {
    /// Checks shapes and that every number is finite.
    pub fn validate(&self, positions: usize) -> Result<(), String> {
        let name = &self.node;
        if self.cin == 0 || self.hidden == 0 || self.cout == 0 || self.kernel == 0 {
            return Err(format!("block {name}: a size is 0"));
        }
        if self.kernel.is_multiple_of(2) || self.kernel > 7 {
            return Err(format!(
                "block {name}: depthwise kernel {} (must be odd, at most 7)",
                self.kernel
            ));
        }
        if self.side.checked_mul(self.side) != Some(positions) {
            return Err(format!(
                "block {name}: a {0}×{0} map is not {positions} positions",
                self.side
            ));
        }
        let k2 = self.kernel * self.kernel;
        let sizes = [
            (self.expand_w.len(), self.hidden.checked_mul(self.cin)),
            (self.expand_b.len(), Some(self.hidden)),
            (self.depthwise_w.len(), self.hidden.checked_mul(k2)),
            (self.depthwise_b.len(), Some(self.hidden)),
            (self.project_w.len(), self.cout.checked_mul(self.hidden)),
            (self.project_b.len(), Some(self.cout)),
        ];
        if sizes.iter().any(|(got, want)| Some(*got) != *want) {
            return Err(format!(
                "block {name}: weights do not match {} → {} → {} channels and a {}×{} kernel",
                self.cin, self.hidden, self.cout, self.kernel, self.kernel
            ));
        }
        if self
            .expand_w
            .iter()
            .chain(&self.expand_b)
            .chain(&self.depthwise_w)
            .chain(&self.depthwise_b)
            .chain(&self.project_w)
            .chain(&self.project_b)
            .any(|v| !v.is_finite())
        {
            return Err(format!("block {name}: a weight is not finite"));
        }
        // The ReLUs' lower ends are finite numbers; the project clip's ends may be unbounded
        // outward only (a head file stores an unbounded end as null).
        let (plo, phi) = self.project_clip;
        let ranges_ok = [self.expand_clip, self.depthwise_clip]
            .iter()
            .all(|(lo, hi)| lo.is_finite() && !hi.is_nan() && lo <= hi)
            && !plo.is_nan()
            && !phi.is_nan()
            && plo < f32::INFINITY
            && phi > f32::NEG_INFINITY
            && plo <= phi;
        if !ranges_ok {
            return Err(format!(
                "block {name}: activation ranges {:?}, {:?}, {:?}",
                self.expand_clip, self.depthwise_clip, self.project_clip
            ));
        }
        Ok(())
    }

    /// How many numbers the block holds (weights and biases of its three convolutions).
    pub fn values(&self) -> usize {
        self.expand_w.len()
            + self.expand_b.len()
            + self.depthwise_w.len()
            + self.depthwise_b.len()
            + self.project_w.len()
            + self.project_b.len()
    }
}

impl TopBlock {
    /// Channels at the cut: the top block's own, or the deeper block's.
    pub fn input_channels(&self) -> usize {
        self.pre.as_ref().map_or(self.cin, |p| p.cin)
    }

    /// Values per image at the cut: `channels × positions`.
    pub fn input_size(&self) -> usize {
        self.input_channels() * self.positions
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
        // The lower end is finite (a head file stores it as a number; ∞ has no JSON form).
        if !lo.is_finite() || hi.is_nan() || lo > hi || lo < 0.0 {
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
        if let Some(pre) = &self.pre {
            if pre.cout != self.cin {
                return Err(format!(
                    "block {} gives {} channels, the top block {} takes {}",
                    pre.node, pre.cout, self.node, self.cin
                ));
            }
            pre.validate(self.positions)?;
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
                    pre: None,
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

/// A convolution read from the graph: weight dims, weights, bias, and the tensor it reads.
type ConvParts = (Vec<usize>, Vec<f32>, Vec<f32>, String);

/// Finds the inverted-residual block computing `top_input` (the top block's input) in `graph`:
/// a 1×1 project convolution (through any `Clip`), its input from a depthwise convolution through
/// `Clip`/`Relu`, that one's from a 1×1 expand convolution through `Clip`/`Relu`. `side` is
/// filled in by the caller once the cut's shape is known (0 here). Returns the block and the
/// name of its input tensor (the new cut). A residual `Add`, a strided or dilated depthwise, or
/// anything else between is refused with the node that did not fit.
pub(crate) fn find_pre(graph: &Graph, top_input: &str) -> Result<(Mbconv, String), BackboneError> {
    let refuse = |reason: String| BackboneError::NotImageModel {
        model: graph.model.clone(),
        reason: format!("no block before the top block to fine-tune: {reason}"),
    };
    let producer = |t: &str| {
        graph
            .nodes
            .iter()
            .find(|n| n.outputs.iter().any(|o| o == t))
            .ok_or_else(|| refuse(format!("nothing computes {t:?}")))
    };
    // A convolution with constant weights (dims) and bias; stride and dilation 1.
    let conv = |n: &Node| -> Result<ConvParts, BackboneError> {
        if n.op != "Conv" {
            return Err(refuse(format!(
                "{} where a convolution was expected (a residual block is not supported)",
                n.describe()
            )));
        }
        let w = n
            .input(1)
            .and_then(|w| graph.constants.get(w))
            .ok_or_else(|| refuse(format!("{} has no constant weights", n.describe())))?;
        let ones = |a: &str| n.ints(a).is_none_or(|v| v.iter().all(|x| *x == 1));
        if !ones("strides") || !ones("dilations") || w.dims.len() != 4 {
            return Err(refuse(format!(
                "{} is strided, dilated or not 2-D",
                n.describe()
            )));
        }
        let bias = match n.input(2) {
            Some(b) => graph
                .constants
                .get(b)
                .map(|c| c.values.clone())
                .ok_or_else(|| refuse(format!("{} has no constant bias", n.describe())))?,
            None => vec![0.0; w.dims[0]],
        };
        let input = n
            .input(0)
            .ok_or_else(|| refuse(format!("{} has no input", n.describe())))?
            .to_string();
        Ok((w.dims.clone(), w.values.clone(), bias, input))
    };
    let pointwise = |n: &Node| -> Result<ConvParts, BackboneError> {
        let c = conv(n)?;
        let zeros = n.ints("pads").is_none_or(|v| v.iter().all(|x| *x == 0));
        if c.0[2..] != [1, 1] || n.int("group", 1) != 1 || !zeros {
            return Err(refuse(format!(
                "{} is not a 1×1, unpadded, ungrouped convolution",
                n.describe()
            )));
        }
        Ok(c)
    };
    // Clip / Relu nodes back from `t` to the convolution before them: that node and the range.
    let through_activation = |mut t: String| -> Result<(&Node, (f32, f32)), BackboneError> {
        let mut clip = (f32::NEG_INFINITY, f32::INFINITY);
        for _ in 0..4 {
            let n = producer(&t)?;
            let scalar = |ix: usize| {
                n.input(ix)
                    .and_then(|name| graph.constants.get(name))
                    .and_then(|c| c.scalar())
            };
            match n.op.as_str() {
                "Relu" => clip.0 = clip.0.max(0.0),
                "Clip" => {
                    let lo = scalar(1).unwrap_or(n.float("min", f32::NEG_INFINITY));
                    let hi = scalar(2).unwrap_or(n.float("max", f32::INFINITY));
                    clip = (clip.0.max(lo), clip.1.min(hi));
                }
                _ => return Ok((n, clip)),
            }
            t = n
                .input(0)
                .ok_or_else(|| refuse(format!("{} has no input", n.describe())))?
                .to_string();
        }
        Err(refuse(format!("too many activations before {t:?}")))
    };
    let (project_node, project_clip) = through_activation(top_input.to_string())?;
    let (pdims, project_w, project_b, project_in) = pointwise(project_node)?;
    let (dw_node, depthwise_clip) = through_activation(project_in.clone())?;
    let (ddims, depthwise_w, depthwise_b, dw_in) = conv(dw_node)?;
    let hidden = pdims[1];
    let kernel = ddims[2];
    let pads = dw_node
        .ints("pads")
        .map(<[i64]>::to_vec)
        .unwrap_or_default();
    let half = (kernel / 2) as i64;
    if ddims != [hidden, 1, kernel, kernel]
        || dw_node.int("group", 1) != hidden as i64
        || kernel.is_multiple_of(2)
        || pads != [half; 4]
    {
        return Err(refuse(format!(
            "{} is not a {hidden}-channel depthwise convolution with an odd square kernel padded to keep the map",
            dw_node.describe()
        )));
    }
    let (ex_node, expand_clip) = through_activation(dw_in.clone())?;
    let (edims, expand_w, expand_b, cut) = pointwise(ex_node)?;
    if edims[0] != hidden {
        return Err(refuse(format!(
            "{} gives {} channels, the depthwise takes {hidden}",
            ex_node.describe(),
            edims[0]
        )));
    }
    if expand_clip.0 < 0.0 || depthwise_clip.0 < 0.0 {
        return Err(refuse(format!(
            "the activations inside {} are not ReLUs",
            ex_node.describe()
        )));
    }
    let block = Mbconv {
        node: ex_node.describe(),
        cin: edims[1],
        hidden,
        cout: pdims[0],
        side: 0,
        kernel,
        expand_w,
        expand_b,
        expand_clip,
        depthwise_w,
        depthwise_b,
        depthwise_clip,
        project_w,
        project_b,
        project_clip,
        reads: [cut.clone(), dw_in, project_in, top_input.to_string()],
    };
    Ok((block, cut))
}
