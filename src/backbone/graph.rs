//! The backbone's graph as plain data, for executors other than tract (graft's `gpu` module).
//!
//! [`Graph`] is the prepared ONNX graph (manifest `[graph]` rewrites applied) cut at the
//! backbone's outputs, with every constant decoded and every constant `DequantizeLinear`
//! folded, so int8 weights arrive as float: an executor sees ONNX operators with their standard
//! semantics and plain `f32` data, never a protobuf or a tract type.
//!
//! [`Graph::run_on_cpu`] runs any such graph through tract. It is the reference other
//! executors are tested against, on the whole backbone and on one-operator graphs built by
//! hand (random shapes, strides, pads, groups).

use std::collections::{BTreeMap, HashMap, HashSet};

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::{error, rewrite, BackboneError};

/// An ONNX graph as plain data: nodes in topological order and their constants.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// The model's name, for messages.
    pub model: String,
    /// The name of the image input.
    pub input: String,
    /// The input's shape without the batch axis (channels, height, width).
    pub input_chw: [usize; 3],
    /// The outputs, in order (for a backbone: features, then logits if any).
    pub outputs: Vec<String>,
    /// The operators, each after the ones it reads.
    pub nodes: Vec<Node>,
    /// Constants (initializers and `Constant` nodes) by name.
    pub constants: HashMap<String, Constant>,
    /// Constant `DequantizeLinear`s (int8 weights, int32 biases) folded into float constants,
    /// by the manifest's preparation or when the graph was read.
    pub weights_dequantized: usize,
}

/// An output of [`Graph::run_on_cpu`]: its shape (batch first) and values, row-major.
pub type ShapedValues = (Vec<usize>, Vec<f32>);

/// One operator.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    /// The node's name in the file (may be empty).
    pub name: String,
    /// The ONNX operator, e.g. `Conv`.
    pub op: String,
    /// Its domain (empty for the standard operators).
    pub domain: String,
    /// Input value names (an empty name is an omitted optional input).
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
    /// Attributes by name.
    pub attrs: BTreeMap<String, Attr>,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// An integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A float.
    Float(f32),
    /// A list of floats.
    Floats(Vec<f32>),
    /// A string.
    Text(String),
    /// Anything else (tensors, graphs): kept by name only.
    Other,
}

/// The element type a constant had in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// 32-bit float.
    F32,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// 32-bit integer.
    I32,
    /// 64-bit integer (shapes, axes).
    I64,
}

/// A constant tensor; its values as `f32` (exact for 8-bit and small integers).
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    /// Its shape.
    pub dims: Vec<usize>,
    /// Its element type in the file.
    pub dtype: DataType,
    /// Its values, row-major.
    pub values: Vec<f32>,
}

impl Constant {
    /// A float constant.
    pub fn f32(dims: &[usize], values: Vec<f32>) -> Constant {
        Constant {
            dims: dims.to_vec(),
            dtype: DataType::F32,
            values,
        }
    }

    /// The single value of a scalar (or one-element) constant.
    pub fn scalar(&self) -> Option<f32> {
        (self.values.len() == 1).then(|| self.values[0])
    }
}

impl Node {
    /// A standard operator with no attributes.
    pub fn new(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            ..Node::default()
        }
    }

    /// Adds an attribute (builder style, for graphs made by hand).
    pub fn with(mut self, name: &str, value: Attr) -> Node {
        self.attrs.insert(name.into(), value);
        self
    }

    /// An integer attribute, or `default`.
    pub fn int(&self, name: &str, default: i64) -> i64 {
        match self.attrs.get(name) {
            Some(Attr::Int(v)) => *v,
            _ => default,
        }
    }

    /// A float attribute, or `default`.
    pub fn float(&self, name: &str, default: f32) -> f32 {
        match self.attrs.get(name) {
            Some(Attr::Float(v)) => *v,
            _ => default,
        }
    }

    /// An integer-list attribute.
    pub fn ints(&self, name: &str) -> Option<&[i64]> {
        match self.attrs.get(name) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }

    /// The input at `ix`, if given (ONNX marks omitted optional inputs with an empty name).
    pub fn input(&self, ix: usize) -> Option<&str> {
        self.inputs
            .get(ix)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// How messages name this node: `Conv "/_blocks.0/Conv"`.
    pub fn describe(&self) -> String {
        let name = if self.name.is_empty() {
            self.outputs.first().cloned().unwrap_or_default()
        } else {
            self.name.clone()
        };
        format!("{} {:?}", self.op, name)
    }
}

impl Graph {
    /// Builds the plain graph of a prepared model, cut at `outputs`.
    pub(crate) fn from_proto(
        mut proto: pb::ModelProto,
        model: &str,
        input_chw: [usize; 3],
        outputs: Vec<String>,
    ) -> Result<Graph, BackboneError> {
        let bad = |reason: String| BackboneError::Load {
            model: model.to_string(),
            reason,
        };
        let g = proto
            .graph
            .as_mut()
            .ok_or_else(|| bad("the ONNX file has no graph".into()))?;
        let weights_dequantized = rewrite::fold_constant_dequantize(g).map_err(bad)?;
        let mut constants = HashMap::new();
        for t in &g.initializer {
            constants.insert(t.name.clone(), constant(t).map_err(bad)?);
        }
        let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        let input = g
            .input
            .iter()
            .map(|i| i.name.clone())
            .find(|n| !inits.contains(n.as_str()))
            .ok_or_else(|| bad("the graph has no input".into()))?;
        let mut nodes = Vec::new();
        for n in &g.node {
            if n.op_type == "Constant" && n.domain.is_empty() {
                let value = n
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| bad(format!("Constant {:?} has no tensor value", n.name)))?;
                let c = constant(value).map_err(|e| bad(format!("Constant {:?}: {e}", n.name)))?;
                for o in &n.output {
                    constants.insert(o.clone(), c.clone());
                }
                continue;
            }
            nodes.push(Node {
                name: n.name.clone(),
                op: n.op_type.clone(),
                domain: n.domain.clone(),
                inputs: n.input.clone(),
                outputs: n.output.clone(),
                attrs: n
                    .attribute
                    .iter()
                    .map(|a| (a.name.clone(), attr(a)))
                    .collect(),
            });
        }
        // Keep only what the outputs need.
        let mut needed: HashSet<String> = outputs.iter().cloned().collect();
        let mut keep = vec![false; nodes.len()];
        for (i, n) in nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| needed.contains(o)) {
                keep[i] = true;
                needed.extend(n.inputs.iter().filter(|s| !s.is_empty()).cloned());
            }
        }
        let nodes: Vec<Node> = nodes
            .into_iter()
            .zip(keep)
            .filter_map(|(n, k)| k.then_some(n))
            .collect();
        constants.retain(|k, _| needed.contains(k));
        for o in &outputs {
            let made = nodes.iter().any(|n| n.outputs.contains(o)) || *o == input;
            if !made {
                return Err(bad(format!("no node computes the output {o:?}")));
            }
        }
        Ok(Graph {
            model: model.to_string(),
            input,
            input_chw,
            outputs,
            nodes,
            constants,
            weights_dequantized,
        })
    }

    /// The graph as an ONNX model (opset 13) with a `[batch, C, H, W]` float input.
    pub(crate) fn to_proto(&self, batch: usize) -> pb::ModelProto {
        let value = |name: &str, dims: Option<Vec<i64>>| pb::ValueInfoProto {
            name: name.to_string(),
            r#type: dims.map(|dims| pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .into_iter()
                            .map(|d| pb::tensor_shape_proto::Dimension {
                                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let [c, h, w] = self.input_chw;
        let mut names: Vec<&String> = self.constants.keys().collect();
        names.sort();
        let graph = pb::GraphProto {
            name: "graft".into(),
            node: self
                .nodes
                .iter()
                .map(|n| pb::NodeProto {
                    name: n.name.clone(),
                    op_type: n.op.clone(),
                    domain: n.domain.clone(),
                    input: n.inputs.clone(),
                    output: n.outputs.clone(),
                    attribute: n
                        .attrs
                        .iter()
                        .filter_map(|(k, v)| attr_proto(k, v))
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            initializer: names
                .into_iter()
                .map(|n| tensor_proto(n, &self.constants[n]))
                .collect(),
            input: vec![value(
                &self.input,
                Some(vec![batch as i64, c as i64, h as i64, w as i64]),
            )],
            output: self.outputs.iter().map(|o| value(o, None)).collect(),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    /// Runs the graph through tract on `batch` images (`input`: `[batch, C, H, W]`, row-major)
    /// and returns each output, row-major, with its shape. The reference for other executors.
    pub fn run_on_cpu(
        &self,
        input: &[f32],
        batch: usize,
    ) -> Result<Vec<ShapedValues>, BackboneError> {
        let fail = |e: TractError| BackboneError::Inference {
            model: self.model.clone(),
            reason: error::chain(&e),
        };
        let [c, h, w] = self.input_chw;
        let mut model = tract_onnx::onnx()
            .model_for_proto_model(&self.to_proto(batch))
            .map_err(fail)?;
        model
            .set_input_fact(0, f32::fact([batch, c, h, w]).into())
            .map_err(fail)?;
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(fail)?;
        let x = Tensor::from_shape(&[batch, c, h, w], input).map_err(fail)?;
        let out = plan.run(tvec!(x.into())).map_err(fail)?;
        out.iter()
            .map(|t| {
                let v = t.to_plain_array_view::<f32>().map_err(fail)?;
                Ok((v.shape().to_vec(), v.iter().copied().collect()))
            })
            .collect()
    }
}

fn attr(a: &pb::AttributeProto) -> Attr {
    use pb::attribute_proto::AttributeType as T;
    match T::try_from(a.r#type) {
        Ok(T::Int) => Attr::Int(a.i),
        Ok(T::Ints) => Attr::Ints(a.ints.clone()),
        Ok(T::Float) => Attr::Float(a.f),
        Ok(T::Floats) => Attr::Floats(a.floats.clone()),
        Ok(T::String) => Attr::Text(String::from_utf8_lossy(&a.s).into_owned()),
        _ => Attr::Other,
    }
}

fn attr_proto(name: &str, v: &Attr) -> Option<pb::AttributeProto> {
    use pb::attribute_proto::AttributeType as T;
    let mut a = pb::AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match v {
        Attr::Int(i) => (a.r#type, a.i) = (T::Int as i32, *i),
        Attr::Ints(v) => (a.r#type, a.ints) = (T::Ints as i32, v.clone()),
        Attr::Float(f) => (a.r#type, a.f) = (T::Float as i32, *f),
        Attr::Floats(v) => (a.r#type, a.floats) = (T::Floats as i32, v.clone()),
        Attr::Text(s) => (a.r#type, a.s) = (T::String as i32, s.as_bytes().to_vec()),
        Attr::Other => return None,
    }
    Some(a)
}

fn constant(t: &pb::TensorProto) -> Result<Constant, String> {
    use pb::tensor_proto::DataType as D;
    let dims: Vec<usize> = t.dims.iter().map(|d| (*d).max(0) as usize).collect();
    let n: usize = dims.iter().product();
    let raw = &t.raw_data;
    let (dtype, values): (DataType, Vec<f32>) = match D::try_from(t.data_type) {
        Ok(D::Float) => (
            DataType::F32,
            rewrite::float_values(t).ok_or("float tensor without data")?,
        ),
        Ok(D::Int8) | Ok(D::Uint8) | Ok(D::Int32) => {
            let v = rewrite::int_values(t).ok_or("integer tensor without data")?;
            let dtype = match D::try_from(t.data_type) {
                Ok(D::Int8) => DataType::I8,
                Ok(D::Uint8) => DataType::U8,
                _ => DataType::I32,
            };
            (dtype, v.into_iter().map(|x| x as f32).collect())
        }
        Ok(D::Int64) => {
            let v: Vec<i64> = if raw.is_empty() {
                t.int64_data.clone()
            } else {
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect()
            };
            (DataType::I64, v.into_iter().map(|x| x as f32).collect())
        }
        _ => {
            return Err(format!(
                "constant {:?} has element type {} (graft reads float, int8, uint8, int32, int64)",
                t.name, t.data_type
            ))
        }
    };
    if values.len() != n {
        return Err(format!(
            "constant {:?} has {} values for shape {dims:?}",
            t.name,
            values.len()
        ));
    }
    Ok(Constant {
        dims,
        dtype,
        values,
    })
}

fn tensor_proto(name: &str, c: &Constant) -> pb::TensorProto {
    use pb::tensor_proto::DataType as D;
    let (data_type, raw_data): (D, Vec<u8>) = match c.dtype {
        DataType::F32 => (
            D::Float,
            c.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DataType::I8 => (D::Int8, c.values.iter().map(|v| *v as i8 as u8).collect()),
        DataType::U8 => (D::Uint8, c.values.iter().map(|v| *v as u8).collect()),
        DataType::I32 => (
            D::Int32,
            c.values
                .iter()
                .flat_map(|v| (*v as i32).to_le_bytes())
                .collect(),
        ),
        DataType::I64 => (
            D::Int64,
            c.values
                .iter()
                .flat_map(|v| (*v as i64).to_le_bytes())
                .collect(),
        ),
    };
    pb::TensorProto {
        name: name.to_string(),
        dims: c.dims.iter().map(|d| *d as i64).collect(),
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    }
}
