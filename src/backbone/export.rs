//! Export: the backbone's own ONNX graph, cut at its feature node, with a trained head appended
//! as standard ONNX operators — one file that onnxruntime, tract or any ONNX runtime can run
//! without graft. Class names, threshold and preprocessing travel in `metadata_props`.
//!
//! Appended after the feature tensor `F` (`[N, D]`):
//!
//! ```text
//! F = Sign(F) * Pow(Abs(F), p)                                  power transform (p ≠ 1 only)
//! x = F / max(sqrt(ReduceSum(F * F, axis 1)), 1e-12)          L2 normalisation
//! linear:  logits = Gemm(x, W, b, transB=1)                      W: [C, D]
//! knn:     s = MatMul(x, Eᵀ); (v, i) = TopK(s, k)                E: [n, D] unit examples
//!          logits = ReduceSum(Gather(onehot, i) * Unsqueeze((1 + v) / k), axis 1)
//! scores = Softmax(T * logits)        (or T * logits with --logits)
//! ```

use prost::Message;
use tract_onnx::pb;

use super::exported::{ExportMeta, META_PREFIX, OUTPUT};
use super::{Backbone, BackboneError, TopBlock};

/// The head, as plain matrices.
#[derive(Debug, Clone)]
pub enum HeadOps {
    /// `logits = W·x + b`, `weights` is `classes × dim` row-major.
    Linear {
        /// `classes × dim` weights, row-major.
        weights: Vec<f32>,
        /// One bias per class.
        bias: Vec<f32>,
    },
    /// Soft vote of the `k` nearest stored unit vectors (`n × dim`), with their class ids.
    Knn {
        /// Neighbours that vote.
        k: usize,
        /// Unit vectors, `n × dim`, row-major.
        examples: Vec<f32>,
        /// Class id per example.
        labels: Vec<usize>,
    },
}

/// What to append to the backbone.
#[derive(Debug, Clone)]
pub struct ExportHead {
    /// The operators.
    pub ops: HeadOps,
    /// Class names.
    pub labels: Vec<String>,
    /// Softmax temperature.
    pub temperature: f32,
    /// The head's `unknown` threshold (stored in the metadata).
    pub threshold: f32,
    /// Head type name (stored in the metadata).
    pub kind: String,
    /// Output probabilities (true) or temperature-scaled logits (false).
    pub probabilities: bool,
    /// The head's power transform: features become `sign(F)·|F|^power` before L2 (1: none,
    /// and no operator is written).
    pub power: f32,
    /// For a head behind the backbone's top block (exported from a `NAME:top` or `NAME:deep`
    /// backbone): the block (and the block before it) as the head runs them (fine-tuned),
    /// whose weights are written in place of the file's.
    pub top: Option<TopBlock>,
}

fn export_err(model: &str, reason: impl Into<String>) -> BackboneError {
    BackboneError::Export {
        model: model.to_string(),
        reason: reason.into(),
    }
}

fn tensor(name: &str, dims: &[i64], data: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

fn tensor_i64(name: &str, dims: &[i64], data: Vec<i64>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: data,
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.to_string(),
        name: format!("graft_head/{name}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_string(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

impl Backbone {
    /// Builds the exported model: this backbone's file (verified by sha256 at load) cut at its
    /// feature node, then `head`. Returns the ONNX bytes.
    pub fn export_with_head(&self, head: &ExportHead) -> Result<Vec<u8>, BackboneError> {
        let model_name = self.model_name();
        // The graph as it runs here (with the manifest's `[graph]` rewrites), so onnxruntime
        // computes what graft does.
        let (mut model, _) = self
            .graph_proto()
            .map_err(|e| export_err(&model_name, format!("cannot read the backbone graph: {e}")))?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .unwrap_or(0);
        if opset < 13 {
            return Err(export_err(
                &model_name,
                format!("export needs opset >= 13, the backbone has {opset}"),
            ));
        }
        let features = self.spec.manifest.output.features.clone();
        let classes = head.labels.len() as i64;
        let mut graph = model
            .graph
            .take()
            .ok_or_else(|| export_err(&model_name, "ONNX file has no graph"))?;
        // Behind the top block the head's input is the block's pooled features, whatever the
        // cut; a fine-tuned block replaces the file's weights.
        let dim = match (&self.top, &head.top) {
            (Some((block, cut)), Some(top)) => {
                let same = top.cin == block.cin
                    && top.cout == block.cout
                    && top.weights.len() == block.weights.len()
                    && match (&top.pre, &block.pre) {
                        (None, None) => true,
                        (Some(a), Some(b)) => {
                            (a.cin, a.hidden, a.cout, a.kernel)
                                == (b.cin, b.hidden, b.cout, b.kernel)
                        }
                        _ => false,
                    };
                if !same {
                    return Err(export_err(
                        &model_name,
                        "the head's top block does not match the backbone's",
                    ));
                }
                // Each convolution the head tuned, found by the tensor it reads (the backbone's
                // block knows them), gets the head's weights as new initializers.
                let (cout, cin) = (block.cout as i64, block.cin as i64);
                // (the tensor it reads, a name for the initializers, weight dims, weights, bias)
                type Conv<'a> = (&'a str, &'a str, Vec<i64>, &'a [f32], &'a [f32]);
                let mut convs: Vec<Conv> = Vec::new();
                match (&block.pre, &top.pre) {
                    (Some(b), Some(t)) => {
                        let (h, k) = (t.hidden as i64, t.kernel as i64);
                        convs.push((&b.reads[0], "expand", vec![h, t.cin as i64, 1, 1], &t.expand_w, &t.expand_b));
                        convs.push((&b.reads[1], "depthwise", vec![h, 1, k, k], &t.depthwise_w, &t.depthwise_b));
                        convs.push((&b.reads[2], "project", vec![t.cout as i64, h, 1, 1], &t.project_w, &t.project_b));
                        convs.push((&b.reads[3], "top", vec![cout, cin, 1, 1], &top.weights, &top.bias));
                    }
                    _ => convs.push((cut, "top", vec![cout, cin, 1, 1], &top.weights, &top.bias)),
                }
                for (reads, name, dims, weights, bias) in convs {
                    let conv = graph
                        .node
                        .iter_mut()
                        .find(|n| n.op_type == "Conv" && n.input.first().map(String::as_str) == Some(reads))
                        .ok_or_else(|| {
                            export_err(&model_name, format!("no convolution reads {reads:?}"))
                        })?;
                    let (w, b) = (format!("graft_head/{name}_W"), format!("graft_head/{name}_b"));
                    conv.input.truncate(1);
                    conv.input.extend([w.clone(), b.clone()]);
                    graph.initializer.push(tensor(&w, &dims, weights.to_vec()));
                    graph
                        .initializer
                        .push(tensor(&b, &[dims[0]], bias.to_vec()));
                }
                cout
            }
            (None, None) => self.id.dim as i64,
            (Some(_), None) => {
                return Err(export_err(
                    &model_name,
                    "this backbone is cut before its top block; the head does not run one",
                ))
            }
            (None, Some(_)) => {
                return Err(export_err(
                    &model_name,
                    "the head runs the top block: export it with the NAME:top or NAME:deep backbone it was trained on",
                ))
            }
        };

        // Keep only what computes the features.
        let mut needed: std::collections::HashSet<String> = [features.clone()].into();
        let mut keep = vec![false; graph.node.len()];
        for (i, n) in graph.node.iter().enumerate().rev() {
            if n.output.iter().any(|o| needed.contains(o)) {
                keep[i] = true;
                needed.extend(n.input.iter().cloned());
            }
        }
        if !keep.iter().any(|k| *k) {
            return Err(BackboneError::MissingNode {
                model: model_name,
                node: features,
                field: "output.features",
            });
        }
        let mut kept = keep.iter();
        graph.node.retain(|_| *kept.next().unwrap_or(&false));
        graph.initializer.retain(|t| needed.contains(&t.name));
        graph.value_info.retain(|v| needed.contains(&v.name));

        let p = "graft_head";
        let n = |s: &str| format!("{p}/{s}");
        // The power transform, F ← Sign(F) · Pow(Abs(F), power), as `HeadParams::input`.
        let features = if head.power == 1.0 {
            features
        } else {
            let (sign, abs, exp, pow, powered) =
                (n("sign"), n("abs"), n("power"), n("pow"), n("powered"));
            graph.initializer.push(tensor(&exp, &[], vec![head.power]));
            graph
                .node
                .push(node("Sign", "sign", &[&features], &[&sign], vec![]));
            graph
                .node
                .push(node("Abs", "abs", &[&features], &[&abs], vec![]));
            graph
                .node
                .push(node("Pow", "pow", &[&abs, &exp], &[&pow], vec![]));
            graph
                .node
                .push(node("Mul", "powered", &[&sign, &pow], &[&powered], vec![]));
            powered
        };
        let (sq, ss, axes1, norm, eps, normc, x) = (
            n("sq"),
            n("ss"),
            n("axes1"),
            n("norm"),
            n("eps"),
            n("norm_clamped"),
            n("x"),
        );
        graph.initializer.push(tensor_i64(&axes1, &[1], vec![1]));
        graph.initializer.push(tensor(&eps, &[], vec![1e-12]));
        graph
            .node
            .push(node("Mul", "sq", &[&features, &features], &[&sq], vec![]));
        graph.node.push(node(
            "ReduceSum",
            "ss",
            &[&sq, &axes1],
            &[&ss],
            vec![attr_int("keepdims", 1)],
        ));
        graph
            .node
            .push(node("Sqrt", "norm", &[&ss], &[&norm], vec![]));
        graph.node.push(node(
            "Max",
            "norm_clamped",
            &[&norm, &eps],
            &[&normc],
            vec![],
        ));
        graph
            .node
            .push(node("Div", "x", &[&features, &normc], &[&x], vec![]));
        let logits = n("logits");
        match &head.ops {
            HeadOps::Linear { weights, bias } => {
                if weights.len() as i64 != classes * dim || bias.len() as i64 != classes {
                    return Err(export_err(
                        &model_name,
                        "head weights do not match labels and embedding size",
                    ));
                }
                let (w, b) = (n("W"), n("b"));
                graph
                    .initializer
                    .push(tensor(&w, &[classes, dim], weights.clone()));
                graph.initializer.push(tensor(&b, &[classes], bias.clone()));
                graph.node.push(node(
                    "Gemm",
                    "gemm",
                    &[&x, &w, &b],
                    &[&logits],
                    vec![attr_int("transB", 1)],
                ));
            }
            HeadOps::Knn {
                k,
                examples,
                labels,
            } => {
                let count = labels.len() as i64;
                if examples.len() as i64 != count * dim || count == 0 {
                    return Err(export_err(
                        &model_name,
                        "k-NN examples do not match the embedding size",
                    ));
                }
                let k = (*k as i64).clamp(1, count);
                // Eᵀ as [dim, n] so that MatMul(x, Eᵀ) gives cosines.
                let mut et = vec![0f32; examples.len()];
                for i in 0..count as usize {
                    for d in 0..dim as usize {
                        et[d * count as usize + i] = examples[i * dim as usize + d];
                    }
                }
                let mut onehot = vec![0f32; (count * classes) as usize];
                for (i, l) in labels.iter().enumerate() {
                    onehot[i * classes as usize + l] = 1.0;
                }
                let names = [
                    "Et", "sims", "k", "topv", "topi", "onehot", "votes_c", "one", "v1", "kf", "w",
                    "axes2", "w3", "votes",
                ]
                .map(n);
                let [et_n, sims, kk, topv, topi, oh, votes_c, one, v1, kf, w, axes2, w3, votes] =
                    names.each_ref().map(String::as_str);
                graph.initializer.push(tensor(et_n, &[dim, count], et));
                graph.initializer.push(tensor_i64(kk, &[1], vec![k]));
                graph
                    .initializer
                    .push(tensor(oh, &[count, classes], onehot));
                graph.initializer.push(tensor(one, &[], vec![1.0]));
                graph.initializer.push(tensor(kf, &[], vec![k as f32]));
                graph.initializer.push(tensor_i64(axes2, &[1], vec![2]));
                graph
                    .node
                    .push(node("MatMul", "sims", &[&x, et_n], &[sims], vec![]));
                graph.node.push(node(
                    "TopK",
                    "topk",
                    &[sims, kk],
                    &[topv, topi],
                    vec![attr_int("axis", 1)],
                ));
                graph.node.push(node(
                    "Gather",
                    "gather",
                    &[oh, topi],
                    &[votes_c],
                    vec![attr_int("axis", 0)],
                ));
                graph
                    .node
                    .push(node("Add", "v1", &[topv, one], &[v1], vec![]));
                graph.node.push(node("Div", "w", &[v1, kf], &[w], vec![]));
                graph
                    .node
                    .push(node("Unsqueeze", "w3", &[w, axes2], &[w3], vec![]));
                graph
                    .node
                    .push(node("Mul", "votes", &[votes_c, w3], &[votes], vec![]));
                graph.node.push(node(
                    "ReduceSum",
                    "logits",
                    &[votes, &axes1],
                    &[&logits],
                    vec![attr_int("keepdims", 0)],
                ));
            }
        }
        let (t, scaled) = (n("T"), n("scaled"));
        graph
            .initializer
            .push(tensor(&t, &[], vec![head.temperature]));
        let out_name = OUTPUT;
        if head.probabilities {
            graph
                .node
                .push(node("Mul", "scale", &[&logits, &t], &[&scaled], vec![]));
            graph.node.push(node(
                "Softmax",
                "softmax",
                &[&scaled],
                &[out_name],
                vec![attr_int("axis", 1)],
            ));
        } else {
            graph
                .node
                .push(node("Mul", "scale", &[&logits, &t], &[out_name], vec![]));
        }
        let batch = graph
            .input
            .first()
            .and_then(|i| i.r#type.as_ref())
            .and_then(|t| match &t.value {
                Some(pb::type_proto::Value::TensorType(tt)) => {
                    tt.shape.as_ref().and_then(|s| s.dim.first().cloned())
                }
                _ => None,
            });
        let dims = vec![
            batch.unwrap_or_default(),
            pb::tensor_shape_proto::Dimension {
                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(classes)),
                ..Default::default()
            },
        ];
        graph.output = vec![pb::ValueInfoProto {
            name: out_name.to_string(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto { dim: dims }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }];
        graph.name = format!("{}+graft-{}-head", graph.name, head.kind);
        model.graph = Some(graph);
        model.producer_name = "graft".into();
        model.producer_version = env!("CARGO_PKG_VERSION").into();
        let meta = ExportMeta {
            labels: head.labels.clone(),
            threshold: head.threshold,
            output: if head.probabilities {
                "probabilities"
            } else {
                "logits"
            }
            .into(),
            head: head.kind.clone(),
            preprocess: self.spec.manifest.input.clone(),
            backbone: self.id.name.clone(),
            backbone_sha256: self.id.sha256.clone(),
        };
        meta.validate()
            .map_err(|e| export_err(&model_name, e.to_string()))?;
        model
            .metadata_props
            .retain(|p| !p.key.starts_with(META_PREFIX));
        for (key, value) in meta.to_metadata() {
            model
                .metadata_props
                .push(pb::StringStringEntryProto { key, value });
        }
        Ok(model.encode_to_vec())
    }
}
