//! Graph rewrites: changes to the ONNX graph made before tract sees it, chosen by the
//! manifest's `[graph]` section. Each one is a standard-op rewrite of the file's protobuf, so the
//! rewritten graph is itself a valid ONNX model: it is what runs, what `graft export` writes and
//! what the backbone's identity hashes. (Not to be confused with preparing a *picture* for the
//! network, which is [`super::preprocess`].)
//!
//! `activation_qdq = "clip"` — why it exists: in a static QDQ int8 model every activation passes
//! through a `QuantizeLinear → DequantizeLinear` pair. onnxruntime fuses those pairs with the
//! convolutions into int8 kernels; tract 0.23 does not: it runs the convolutions in float and
//! pays for the two element-wise passes on every activation, 52% of the int8 forward pass on
//! x86 (`graft bench --profile`, docs/performance.md). This rewrite replaces each pair by the
//! `Clip` its quantisation range implies (`[(qmin − zp)·s, (qmax − zp)·s]`, which is also where
//! the model's ReLU6 went when it was quantised), so the graph keeps its int8 weights (folded to
//! float constants at load, as tract does anyway) and the saturation of every activation, and
//! drops only the rounding of activations to 256 levels. It is then as fast as the fp32 graph
//! and closer to it than the fully quantised one (checked in tests/integration/backbone.rs).

use prost::Message;
use serde::{Deserialize, Serialize};
use tract_onnx::pb;

use super::BackboneError;

/// What to do with activation `QuantizeLinear → DequantizeLinear` pairs (manifest `[graph]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationQdq {
    /// Run the graph as the file has it.
    #[default]
    Keep,
    /// Replace each pair by the `Clip` of its quantisation range.
    Clip,
}

/// The manifest's `[graph]` section: rewrites applied before tract loads the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSpec {
    /// Activation quantise/dequantise pairs: `keep` (default) or `clip`.
    #[serde(default)]
    pub activation_qdq: ActivationQdq,
    /// Drop the file's intermediate shape annotations (`value_info`) and the spatial sizes of
    /// its input, so the graph runs at the manifest's `[input] size` instead of the one it was
    /// exported at (a fully convolutional network, e.g. EfficientNet-Lite0 at 320 px).
    #[serde(default)]
    pub free_shapes: bool,
    /// Generalised-mean (GeM) pooling of the features output with this exponent `p`:
    /// `(mean(x^p))^(1/p)` over each channel's map instead of its mean, a branch of its own
    /// beside the average pool, which still feeds the ImageNet classifier (`logits` are the
    /// file's). Larger `p` leans toward the map's strongest responses, so a small object on a
    /// busy background is less diluted by the background around it (Radenović et al. 2018;
    /// docs/few-shot.md measures it). Absent: the file's own pooled features. 2 to 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gem_power: Option<u8>,
    /// Run the graph in half precision (f16) except its depthwise convolutions, which stay
    /// f32: for CPUs with FP16 arithmetic (ARMv8.2 `asimdhp`: the Pi 5's Cortex-A76, Jetson
    /// Orin), where tract has f16 matrix-multiply kernels. Not a rewrite of the ONNX graph but of
    /// tract's plan (its float-precision translator), so `graft export` writes the f32 graph.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub half: bool,
}

impl GraphSpec {
    /// True when the file runs as it is.
    pub fn is_identity(&self) -> bool {
        *self == GraphSpec::default()
    }

    /// A short description for `graft info`.
    pub fn describe(&self) -> String {
        let qdq = match self.activation_qdq {
            ActivationQdq::Keep => "as in the file",
            ActivationQdq::Clip => "int8 weights, float activations (activation Q/DQ pairs → Clip)",
        };
        let mut d = qdq.to_string();
        if self.free_shapes {
            d.push_str("; shapes re-inferred for the manifest's input size");
        }
        if let Some(p) = self.gem_power {
            d.push_str(&format!("; features by GeM pooling, p = {p}"));
        }
        if self.half {
            d.push_str("; f16 arithmetic except the depthwise convolutions");
        }
        d
    }
}

/// What the `[graph]` rewrites changed in a graph (see [`GraphSpec`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrites {
    /// Activation Q/DQ pairs replaced by a `Clip`.
    pub qdq_pairs_clipped: usize,
    /// Constant `DequantizeLinear`s (weights, biases) folded into float initializers.
    pub weights_dequantized: usize,
    /// Intermediate shape annotations dropped (`free_shapes`).
    pub shapes_freed: usize,
    /// Nodes added for GeM pooling (`gem_power`).
    pub gem_nodes: usize,
}

/// The recipe's name in identities: bump it whenever a rewrite's output changes, so embeddings
/// made by an older rewrite are never mixed with a newer one's.
const RECIPE: &str = "graft-prepare-1";

/// The identity of a rewritten graph: sha256 of the file's sha256 and the recipe. (Hashing the
/// re-encoded protobuf would tie it to the encoder; this ties it to what was asked.)
pub fn rewritten_sha256(file_sha256: &str, spec: &GraphSpec) -> String {
    let mut recipe = format!(
        "{RECIPE}\n{file_sha256}\nactivation_qdq={:?}\n",
        spec.activation_qdq
    );
    // Only when set, so every identity made before the option existed stays the same.
    if spec.free_shapes {
        recipe.push_str("free_shapes\n");
    }
    if let Some(p) = spec.gem_power {
        recipe.push_str(&format!("gem_power={p}\n"));
    }
    if spec.half {
        recipe.push_str("half\n");
    }
    super::sha256_hex(recipe.as_bytes())
}

/// Applies `spec` to a decoded ONNX model in place; `features` is the manifest's features
/// output (the tensor GeM pooling replaces).
pub(crate) fn apply(
    proto: &mut pb::ModelProto,
    spec: &GraphSpec,
    features: &str,
    model: &str,
) -> Result<Rewrites, BackboneError> {
    let mut done = Rewrites::default();
    // `half` is applied to tract's plan, not to the graph.
    if (GraphSpec {
        half: false,
        ..*spec
    })
    .is_identity()
    {
        return Ok(done);
    }
    let bad = |reason: String| BackboneError::Load {
        model: model.to_string(),
        reason,
    };
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| bad("the ONNX file has no graph".into()))?;
    if spec.free_shapes {
        done.shapes_freed = graph.value_info.len();
        graph.value_info.clear();
        for input in &mut graph.input {
            let dims = input
                .r#type
                .as_mut()
                .and_then(|t| t.value.as_mut())
                .and_then(|v| match v {
                    pb::type_proto::Value::TensorType(t) => t.shape.as_mut(),
                });
            // [N, C, H, W]: the batch and the spatial sizes come from the manifest at load.
            if let Some(shape) = dims {
                for (i, d) in shape.dim.iter_mut().enumerate() {
                    if i != 1 {
                        d.value = None;
                    }
                }
            }
        }
    }
    if spec.activation_qdq == ActivationQdq::Clip {
        done.qdq_pairs_clipped = clip_activation_qdq(graph).map_err(bad)?;
        if done.qdq_pairs_clipped == 0 {
            return Err(bad(
                "[graph] activation_qdq = \"clip\", but the graph has no activation \
                 QuantizeLinear → DequantizeLinear pair (is it a QDQ model?)"
                    .into(),
            ));
        }
        // With the activations in float, what is left quantised is constants: folding them here
        // gives tract a plain float graph, which it optimises in a fraction of the time it
        // takes to fold them itself (load 445 → 139 ms, release, docs/performance.md).
        done.weights_dequantized = fold_constant_dequantize(graph).map_err(bad)?;
    }
    if let Some(p) = spec.gem_power {
        done.gem_nodes = gem_pool(graph, features, p).map_err(bad)?;
    }
    Ok(done)
}

/// Ops that may sit between the average pool and the features output: each passes one tensor
/// on (reshaped, or through an activation's saturation or quantisation).
const PASS_THROUGH: [&str; 6] = [
    "Flatten",
    "Reshape",
    "Squeeze",
    "Clip",
    "QuantizeLinear",
    "DequantizeLinear",
];

/// GeM pooling of `features`: finds the `GlobalAveragePool` that `features` is computed from
/// (through at most 6 [`PASS_THROUGH`] nodes), renames the old `features` tensor (its
/// consumers, e.g. the classifier, keep it) and adds `Pow(x, p) → GlobalAveragePool →
/// Pow(1/p) → Flatten → features` on the pool's input right after the old producer, so the
/// node order stays topological. The pool's input is a post-activation map (ReLU6 for
/// EfficientNet-Lite), so `x ≥ 0`; a negative input is clamped to 0 first, as GeM does.
/// Returns the number of nodes added.
fn gem_pool(graph: &mut pb::GraphProto, features: &str, p: u8) -> Result<usize, String> {
    let producer = |name: &str| {
        graph
            .node
            .iter()
            .position(|n| n.output.iter().any(|o| o == name))
    };
    let at = producer(features).ok_or_else(|| {
        format!("[graph] gem_power: no node computes the features output {features:?}")
    })?;
    let mut pool = at;
    let mut hops = 0;
    while graph.node[pool].op_type != "GlobalAveragePool" {
        let n = &graph.node[pool];
        let upstream = n.input.first().and_then(|i| producer(i));
        match upstream {
            Some(up) if PASS_THROUGH.contains(&n.op_type.as_str()) && hops < 6 => {
                pool = up;
                hops += 1;
            }
            _ => {
                return Err(format!(
                    "[graph] gem_power: the features output {features:?} is not computed by a \
                     GlobalAveragePool (found {} {:?} on the way)",
                    n.op_type, n.name
                ))
            }
        }
    }
    let map = graph.node[pool].input[0].clone();
    let kept = format!("{features}/graft_avg");
    for n in &mut graph.node {
        for o in n.output.iter_mut().chain(n.input.iter_mut()) {
            if o == features {
                *o = kept.clone();
            }
        }
    }
    let name = |s: &str| format!("graft_gem/{s}");
    let float = |n: &str, v: f32| pb::TensorProto {
        name: name(n),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: vec![v],
        ..Default::default()
    };
    graph.initializer.extend([
        float("zero", 0.0),
        float("p", f32::from(p)),
        float("inv_p", 1.0 / f32::from(p)),
    ]);
    let node = |op: &str, n: &str, inputs: &[String], output: String| pb::NodeProto {
        op_type: op.into(),
        name: name(n),
        input: inputs.to_vec(),
        output: vec![output],
        ..Default::default()
    };
    let mut flatten = node("Flatten", "flatten", &[name("root")], features.to_string());
    flatten.attribute.push(pb::AttributeProto {
        name: "axis".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    });
    let added = [
        node("Max", "clamp", &[map, name("zero")], name("clamped")),
        node("Pow", "pow", &[name("clamped"), name("p")], name("powered")),
        node(
            "GlobalAveragePool",
            "pool",
            &[name("powered")],
            name("mean"),
        ),
        node("Pow", "root", &[name("mean"), name("inv_p")], name("root")),
        flatten,
    ];
    let count = added.len();
    graph.node.splice(at + 1..at + 1, added);
    Ok(count)
}

/// Decodes ONNX bytes (for rewriting and export).
pub(crate) fn decode(onnx: &[u8], model: &str) -> Result<pb::ModelProto, BackboneError> {
    pb::ModelProto::decode(onnx).map_err(|e| BackboneError::Load {
        model: model.to_string(),
        reason: format!("not an ONNX file: {e}"),
    })
}

/// A per-tensor quantisation: scale, zero point and the integer range of its type.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Quant {
    scale: f32,
    zero_point: i32,
    qmin: i32,
    qmax: i32,
}

impl Quant {
    /// The float range a quantise/dequantise round trip saturates to.
    fn range(&self) -> (f32, f32) {
        (
            (self.qmin - self.zero_point) as f32 * self.scale,
            (self.qmax - self.zero_point) as f32 * self.scale,
        )
    }
}

/// Reads a one-element initializer's value (float, or int8 / uint8 / int32) as f64.
fn scalar(t: &pb::TensorProto) -> Option<f64> {
    if t.dims.iter().product::<i64>() != 1 {
        return None;
    }
    match float_values(t) {
        Some(v) => v.first().map(|x| f64::from(*x)),
        None => int_values(t)?.first().map(|x| f64::from(*x)),
    }
}

fn quant_of(
    node: &pb::NodeProto,
    inits: &std::collections::HashMap<&str, &pb::TensorProto>,
) -> Option<Quant> {
    use pb::tensor_proto::DataType;
    let scale = scalar(inits.get(node.input.get(1)?.as_str())?)? as f32;
    // No zero point means 0 of type uint8 (the ONNX default).
    let (zero_point, ty) = match node.input.get(2).filter(|n| !n.is_empty()) {
        Some(name) => {
            let t = inits.get(name.as_str())?;
            (scalar(t)? as i32, DataType::try_from(t.data_type).ok()?)
        }
        None => (0, DataType::Uint8),
    };
    let (qmin, qmax) = match ty {
        DataType::Uint8 => (0, 255),
        DataType::Int8 => (-128, 127),
        _ => return None,
    };
    (scale > 0.0 && scale.is_finite()).then_some(Quant {
        scale,
        zero_point,
        qmin,
        qmax,
    })
}

/// Replaces every `QuantizeLinear` whose consumers are all per-tensor `DequantizeLinear`s with
/// the same quantisation by one `Clip` per consumer. Returns how many pairs were replaced.
fn clip_activation_qdq(graph: &mut pb::GraphProto) -> Result<usize, String> {
    use std::collections::{HashMap, HashSet};
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let inits: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            consumers.entry(input.as_str()).or_default().push(i);
        }
    }
    // (quantize node, its dequantize consumers, the clip range)
    let mut pairs: Vec<(usize, Vec<usize>, (f32, f32))> = Vec::new();
    for (qi, q) in graph.node.iter().enumerate() {
        if q.op_type != "QuantizeLinear" || !q.domain.is_empty() || q.output.len() != 1 {
            continue;
        }
        let Some(quant) = quant_of(q, &inits) else {
            continue; // per-channel or unreadable: leave it alone
        };
        let out = q.output[0].as_str();
        let users = consumers.get(out).cloned().unwrap_or_default();
        let all_matching_dq = !users.is_empty()
            && !outputs.contains(out)
            && users.iter().all(|&u| {
                let d = &graph.node[u];
                d.op_type == "DequantizeLinear"
                    && d.domain.is_empty()
                    && d.input.first().map(String::as_str) == Some(out)
                    && quant_of(d, &inits) == Some(quant)
            });
        if all_matching_dq {
            pairs.push((qi, users, quant.range()));
        }
    }
    let count = pairs.len();
    let mut remove: HashSet<usize> = HashSet::new();
    let mut clips: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut new_inits = Vec::new();
    for (qi, dqs, (lo, hi)) in pairs {
        let q = &graph.node[qi];
        let source = q.input[0].clone();
        let base = if q.name.is_empty() {
            q.output[0].clone()
        } else {
            q.name.clone()
        };
        let (min_name, max_name) = (
            format!("{base}/graft_clip_min"),
            format!("{base}/graft_clip_max"),
        );
        for (name, v) in [(&min_name, lo), (&max_name, hi)] {
            new_inits.push(pb::TensorProto {
                name: name.clone(),
                data_type: pb::tensor_proto::DataType::Float as i32,
                float_data: vec![v],
                ..Default::default()
            });
        }
        remove.insert(qi);
        for (k, dq) in dqs.into_iter().enumerate() {
            remove.insert(dq);
            // The Clip takes the Dequantize's place (and output name) in the node order, so
            // the topological order of the graph is kept.
            clips.insert(
                dq,
                pb::NodeProto {
                    op_type: "Clip".into(),
                    name: format!("{base}/graft_clip{k}"),
                    input: vec![source.clone(), min_name.clone(), max_name.clone()],
                    output: graph.node[dq].output.clone(),
                    ..Default::default()
                },
            );
        }
    }
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| match clips.remove(&i) {
            Some(clip) => Some(clip),
            None => (!remove.contains(&i)).then_some(n),
        })
        .collect();
    graph.initializer.extend(new_inits);
    Ok(count)
}

/// The values of an integer initializer (int8, uint8, int32) as i32.
pub(super) fn int_values(t: &pb::TensorProto) -> Option<Vec<i32>> {
    use pb::tensor_proto::DataType;
    let n = t.dims.iter().product::<i64>().max(0) as usize;
    let raw = &t.raw_data;
    let v: Vec<i32> = match DataType::try_from(t.data_type).ok()? {
        DataType::Int8 if !raw.is_empty() => raw.iter().map(|b| *b as i8 as i32).collect(),
        DataType::Uint8 if !raw.is_empty() => raw.iter().map(|b| *b as i32).collect(),
        DataType::Int32 if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DataType::Int8 | DataType::Uint8 | DataType::Int32 => t.int32_data.clone(),
        _ => return None,
    };
    (v.len() == n).then_some(v)
}

/// The values of a float initializer.
pub(super) fn float_values(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != pb::tensor_proto::DataType::Float as i32 {
        return None;
    }
    if t.raw_data.is_empty() {
        Some(t.float_data.clone())
    } else {
        Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

/// Folds every `DequantizeLinear` of a constant (an initializer: weights, biases) into a float
/// initializer, per tensor or per axis as the node says, then drops initializers nothing uses.
pub(super) fn fold_constant_dequantize(graph: &mut pb::GraphProto) -> Result<usize, String> {
    use std::collections::{HashMap, HashSet};
    let inits: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut folded: HashSet<usize> = HashSet::new();
    let mut new_inits = Vec::new();
    for (ni, n) in graph.node.iter().enumerate() {
        if n.op_type != "DequantizeLinear" || !n.domain.is_empty() || n.output.len() != 1 {
            continue;
        }
        let get = |k: usize| {
            n.input
                .get(k)
                .filter(|s| !s.is_empty())
                .and_then(|s| inits.get(s))
                .map(|&i| &graph.initializer[i])
        };
        let (Some(x), Some(scale)) = (get(0), get(1)) else {
            continue; // an activation, not a constant
        };
        let what = |m: &str| format!("DequantizeLinear {:?}: {m}", n.name);
        let q = int_values(x).ok_or_else(|| what("input is not int8/uint8/int32"))?;
        let scale = float_values(scale).ok_or_else(|| what("scale is not float"))?;
        let zp = match get(2) {
            Some(z) => int_values(z).ok_or_else(|| what("zero point is not an integer"))?,
            None => vec![0; scale.len()],
        };
        if scale.is_empty() || zp.len() != scale.len() {
            return Err(what("scale and zero point differ in length"));
        }
        // Per-axis when the scale is a vector: the channel of element i along `axis`.
        let rank = x.dims.len() as i64;
        let axis = n
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(1, |a| a.i);
        let axis = if axis < 0 { axis + rank } else { axis };
        let (len, inner) = if scale.len() == 1 {
            (1usize, 1usize)
        } else {
            if !(0..rank).contains(&axis) || x.dims[axis as usize] as usize != scale.len() {
                return Err(what("per-axis scale does not match the tensor"));
            }
            let inner: i64 = x.dims[axis as usize + 1..].iter().product();
            (scale.len(), inner.max(1) as usize)
        };
        let values: Vec<u8> = q
            .iter()
            .enumerate()
            .flat_map(|(i, v)| {
                let c = (i / inner) % len;
                (((*v - zp[c]) as f32) * scale[c]).to_le_bytes()
            })
            .collect();
        new_inits.push(pb::TensorProto {
            name: n.output[0].clone(),
            dims: x.dims.clone(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: values,
            ..Default::default()
        });
        folded.insert(ni);
    }
    let count = folded.len();
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !folded.contains(i))
        .map(|(_, n)| n)
        .collect();
    graph.initializer.extend(new_inits);
    let used: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    graph.initializer.retain(|t| used.contains(&t.name));
    Ok(count)
}

#[cfg(test)]
mod tests {
    #[test]
    fn identities_of_existing_recipes_never_change() {
        // Pinned: a new option must not move the identity of graphs made without it (heads and
        // caches of w8 models would stop matching).
        let w8 = GraphSpec {
            activation_qdq: ActivationQdq::Clip,
            ..GraphSpec::default()
        };
        assert_eq!(
            rewritten_sha256("abc", &w8),
            "5810272386f4608f39a30161481fbb4445bd2256d32eae29e693c49af38b14c2"
        );
        let free = GraphSpec {
            free_shapes: true,
            ..GraphSpec::default()
        };
        assert_eq!(
            rewritten_sha256("abc", &free),
            "150403765a7aefc1cc1a5543fa47cf106ab2c2a6467abeb1c2b6ebe07db2a187"
        );
    }

    #[test]
    fn half_precision_has_an_identity_of_its_own() {
        let gem = GraphSpec {
            gem_power: Some(3),
            ..GraphSpec::default()
        };
        let half = GraphSpec { half: true, ..gem };
        assert!(!half.is_identity());
        assert_ne!(
            rewritten_sha256("abc", &gem),
            rewritten_sha256("abc", &half)
        );
        assert!(half.describe().contains("f16"));
        // It changes tract's plan, not the ONNX graph: nothing to rewrite in the file.
        let mut m = pb::ModelProto::default();
        let done = apply(
            &mut m,
            &GraphSpec {
                half: true,
                ..GraphSpec::default()
            },
            "f",
            "m",
        );
        assert_eq!(done.unwrap(), Rewrites::default());
    }

    use super::*;

    fn init_f32(name: &str, v: f32) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn init_u8(name: &str, v: u8) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: pb::tensor_proto::DataType::Uint8 as i32,
            raw_data: vec![v],
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            name: output.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    /// x → Q(s, zp) → DQ → Relu → y, plus a Q whose output is also a graph output (kept).
    fn graph(zp: u8) -> pb::ModelProto {
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: vec![
                    node("QuantizeLinear", &["x", "s", "zp"], "xq"),
                    node("DequantizeLinear", &["xq", "s", "zp"], "xd"),
                    node("Relu", &["xd"], "r"),
                    node("QuantizeLinear", &["r", "s", "zp"], "rq"),
                ],
                initializer: vec![init_f32("s", 0.5), init_u8("zp", zp)],
                output: vec![pb::ValueInfoProto {
                    name: "rq".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pair_becomes_the_clip_of_its_range_in_place() {
        let cases = [(0u8, (0.0f32, 127.5f32)), (128, (-64.0, 63.5))];
        for (zp, (lo, hi)) in cases {
            let mut m = graph(zp);
            let spec = GraphSpec {
                activation_qdq: ActivationQdq::Clip,
                ..GraphSpec::default()
            };
            let done = apply(&mut m, &spec, "f", "m").unwrap();
            assert_eq!(done.qdq_pairs_clipped, 1);
            let g = m.graph.unwrap();
            let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["Clip", "Relu", "QuantizeLinear"], "zp {zp}");
            assert_eq!(g.node[0].input[0], "x");
            assert_eq!(g.node[0].output[0], "xd");
            let value = |name: &str| {
                g.initializer
                    .iter()
                    .find(|t| t.name == name)
                    .map(|t| t.float_data[0])
                    .unwrap()
            };
            assert_eq!(value(&g.node[0].input[1]), lo);
            assert_eq!(value(&g.node[0].input[2]), hi);
        }
    }

    #[test]
    fn keep_leaves_the_file_alone_and_a_graph_without_pairs_is_refused() {
        let mut same = graph(0);
        let done = apply(&mut same, &GraphSpec::default(), "f", "m").unwrap();
        assert_eq!(done, Rewrites::default());
        assert_eq!(same, graph(0));
        let mut none = graph(0);
        none.graph.as_mut().unwrap().node.drain(..2);
        let spec = GraphSpec {
            activation_qdq: ActivationQdq::Clip,
            ..GraphSpec::default()
        };
        let err = apply(&mut none, &spec, "f", "m").unwrap_err();
        assert!(err.to_string().contains("no activation"), "{err}");
        assert!(decode(b"not onnx", "m").is_err());
    }

    #[test]
    fn gem_adds_a_pooling_branch_and_the_classifier_keeps_the_average() {
        // map → GAP → Q → DQ → Flatten = "f" → Gemm (the classifier), as in the int8 file.
        let mut m = pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: vec![
                    node("Clip", &["x", "lo", "hi"], "map"),
                    node("GlobalAveragePool", &["map"], "avg"),
                    node("QuantizeLinear", &["avg", "s", "zp"], "avgq"),
                    node("DequantizeLinear", &["avgq", "s", "zp"], "avgd"),
                    node("Flatten", &["avgd"], "f"),
                    node("Gemm", &["f", "w", "b"], "logits"),
                ],
                output: vec![pb::ValueInfoProto {
                    name: "logits".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = GraphSpec {
            gem_power: Some(3),
            ..GraphSpec::default()
        };
        let done = apply(&mut m, &spec, "f", "m").unwrap();
        assert_eq!(done.gem_nodes, 5);
        let g = m.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Clip",
                "GlobalAveragePool",
                "QuantizeLinear",
                "DequantizeLinear",
                "Flatten",
                "Max",
                "Pow",
                "GlobalAveragePool",
                "Pow",
                "Flatten",
                "Gemm"
            ]
        );
        // The classifier reads the renamed average; "f" is now the GeM branch's.
        assert_eq!(g.node[4].output[0], "f/graft_avg");
        assert_eq!(g.node[10].input[0], "f/graft_avg");
        assert_eq!(g.node[5].input[0], "map");
        assert_eq!(g.node[9].output[0], "f");
        let value = |name: &str| {
            let t = g.initializer.iter().find(|t| t.name == name).unwrap();
            t.float_data[0]
        };
        assert_eq!(value(&g.node[6].input[1]), 3.0);
        assert_eq!(value(&g.node[8].input[1]), 1.0 / 3.0);
        // Its identity is new; the others' are pinned above.
        assert_ne!(
            rewritten_sha256("abc", &spec),
            rewritten_sha256("abc", &GraphSpec::default())
        );

        // Features not computed by an average pool: refused, naming what was found.
        let mut other = graph(0);
        let err = apply(&mut other, &spec, "r", "m").unwrap_err();
        assert!(
            err.to_string()
                .contains("not computed by a GlobalAveragePool"),
            "{err}"
        );
        let err = apply(&mut graph(0), &spec, "nothing", "m").unwrap_err();
        assert!(err.to_string().contains("no node computes"), "{err}");
    }

    #[test]
    fn constant_dequantize_folds_per_axis_and_per_tensor() {
        // w: int8 [2, 3] per-axis along 0 (scales 0.5, 2; zero points 1, -1); b: int32 scalar scale.
        let w = pb::TensorProto {
            name: "w".into(),
            dims: vec![2, 3],
            data_type: pb::tensor_proto::DataType::Int8 as i32,
            raw_data: [1i8, 3, -1, 0, 1, 2].iter().map(|v| *v as u8).collect(),
            ..Default::default()
        };
        let ws = pb::TensorProto {
            name: "ws".into(),
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: vec![0.5, 2.0],
            ..Default::default()
        };
        let wz = pb::TensorProto {
            name: "wz".into(),
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::Int8 as i32,
            int32_data: vec![1, -1],
            ..Default::default()
        };
        let b = pb::TensorProto {
            name: "b".into(),
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::Int32 as i32,
            int32_data: vec![4, -6],
            ..Default::default()
        };
        let mut dqw = node("DequantizeLinear", &["w", "ws", "wz"], "wf");
        dqw.attribute.push(pb::AttributeProto {
            name: "axis".into(),
            i: 0,
            ..Default::default()
        });
        let mut g = pb::GraphProto {
            node: vec![
                dqw,
                node("DequantizeLinear", &["b", "s"], "bf"),
                node("DequantizeLinear", &["x", "s", "zp"], "xf"),
                node("Conv", &["xf", "wf", "bf"], "y"),
            ],
            initializer: vec![w, ws, wz, b, init_f32("s", 0.25), init_u8("zp", 0)],
            ..Default::default()
        };
        assert_eq!(fold_constant_dequantize(&mut g).unwrap(), 2);
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            ["DequantizeLinear", "Conv"],
            "the activation one stays"
        );
        let f = |name: &str| float_values(g.initializer.iter().find(|t| t.name == name).unwrap());
        assert_eq!(f("wf").unwrap(), [0.0, 1.0, -1.0, 2.0, 4.0, 6.0]);
        assert_eq!(f("bf").unwrap(), [1.0, -1.5]);
        let names: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        assert!(!names.contains(&"w") && !names.contains(&"ws"), "{names:?}");
    }
}
