//! Lowering: a backbone [`Graph`] → a [`Plan`] of GPU kernels, before any GPU is touched.
//!
//! Each ONNX operator becomes one of four kernels (`Kernel`): a direct convolution (any kernel
//! size, stride, padding, dilation and group count, depthwise included), a tiled matrix multiply
//! (1×1 convolutions and `Gemm`/`MatMul`), a global average pool, or an element-wise pass.
//! Element-wise followers are fused into their producer's *epilogue* where the graph allows:
//! bias → `Clip`/`Relu` → a `QuantizeLinear → DequantizeLinear` pair → the residual `Add` →
//! a second clip → a second Q/DQ pair, in that order. Reshapes (`Flatten`, `Reshape`, `Identity`) move no data.
//! Values that live at the same time get different buffers; the rest share (`Plan::slots`).
//!
//! Shapes here are per image: the batch is a run-time parameter of every kernel.

use std::collections::HashMap;

use crate::backbone::graph::{Attr, DataType, Graph, Node};

use super::GpuError;

/// Index of a value in [`Plan::values`].
pub(crate) type ValueId = usize;

/// A tensor the plan materialises (or a reshaped view of one).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Value {
    pub name: String,
    /// Shape of one image's slice, without the batch axis.
    pub shape: Vec<usize>,
    /// The value whose buffer this one is (itself unless it is a reshape of another).
    pub root: ValueId,
    /// The buffer slot ([`Plan::slots`]); set for roots by the slot planner.
    pub slot: usize,
}

impl Value {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// `y = (clamp(round(x / scale) + zero_point, qmin, qmax) − dq_zero_point) · dq_scale`: an
/// activation `QuantizeLinear` and the `DequantizeLinear` reading it, in float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FakeQuant {
    pub scale: f32,
    pub zero_point: f32,
    pub dq_scale: f32,
    pub dq_zero_point: f32,
    pub qmin: f32,
    pub qmax: f32,
}

/// What a kernel does to each value it writes, in this order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Epilogue {
    /// Offset of a per-output-channel bias in the weights buffer.
    pub bias: Option<usize>,
    pub clip: Option<(f32, f32)>,
    pub q1: Option<FakeQuant>,
    /// A value of the output's shape added element-wise.
    pub residual: Option<ValueId>,
    pub clip2: Option<(f32, f32)>,
    pub q2: Option<FakeQuant>,
}

impl Epilogue {
    /// The last stage in use: 0 none/bias, 1 clip, 2 q1, 3 residual, 4 clip2, 5 q2.
    fn stage(&self) -> u8 {
        if self.q2.is_some() {
            5
        } else if self.clip2.is_some() {
            4
        } else if self.residual.is_some() {
            3
        } else if self.q1.is_some() {
            2
        } else if self.clip.is_some() {
            1
        } else {
            0
        }
    }
}

/// Geometry of a convolution on one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ConvGeom {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub oh: usize,
    pub ow: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub dh: usize,
    pub dw: usize,
    pub groups: usize,
}

/// One kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Direct convolution, one output value per thread (grouped and depthwise too).
    Conv(ConvGeom),
    /// `out[m, p] = Σ_k W[m, k] · x[k, p]` per image: 1×1 convolutions (`p` = pixels) and
    /// fully connected layers (`p` = 1), in workgroup-shared tiles.
    MatMul { m: usize, k: usize, p: usize },
    /// Mean over `hw` values per channel; with `power` k > 1 the generalised mean
    /// `(mean(max(x, 0)^k))^(1/k)` (GeM pooling, a manifest's `[graph] gem_power`).
    Pool { c: usize, hw: usize, power: u8 },
    /// The epilogue alone, over `len` values per image.
    Eltwise { len: usize },
}

impl Kernel {
    /// Short name for profiles.
    pub fn name(&self) -> &'static str {
        match self {
            Kernel::Conv(g) if g.groups == g.c_in && g.groups == g.c_out => "conv depthwise",
            Kernel::Conv(_) => "conv direct",
            Kernel::MatMul { p: 1, .. } => "matmul (fc)",
            Kernel::MatMul { .. } => "matmul (1x1 conv)",
            Kernel::Pool { power: 0 | 1, .. } => "global avg pool",
            Kernel::Pool { .. } => "global GeM pool",
            Kernel::Eltwise { .. } => "element-wise",
        }
    }
}

/// One dispatch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    /// The ONNX nodes this step computes (producer first, then fused followers).
    pub nodes: Vec<String>,
    pub kernel: Kernel,
    pub input: ValueId,
    pub output: ValueId,
    /// Offset of the weights in [`Plan::weights`].
    pub weights: usize,
    pub epilogue: Epilogue,
}

impl Step {
    /// Multiply-accumulates (or adds, for pools and element-wise steps) per image.
    pub fn macs(&self) -> u64 {
        (match self.kernel {
            Kernel::Conv(g) => g.c_out * g.oh * g.ow * (g.c_in / g.groups) * g.kh * g.kw,
            Kernel::MatMul { m, k, p } => m * k * p,
            Kernel::Pool { c, hw, .. } => c * hw,
            Kernel::Eltwise { len } => len,
        }) as u64
    }
}

/// A lowered graph: kernels in order, values, the weights in one buffer, and buffer slots.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    pub values: Vec<Value>,
    pub input: ValueId,
    pub outputs: Vec<ValueId>,
    pub steps: Vec<Step>,
    pub weights: Vec<f32>,
    /// Size of each buffer slot per image, in f32.
    pub slots: Vec<usize>,
}

impl Plan {
    /// ONNX nodes fused into an earlier kernel's epilogue.
    pub fn fused(&self) -> usize {
        self.steps.iter().map(|s| s.nodes.len() - 1).sum()
    }

    /// Multiply-accumulates per image over all steps.
    pub fn macs(&self) -> u64 {
        self.steps.iter().map(Step::macs).sum()
    }
}

/// Lowers `graph`; an operator (or a form of one) the kernels do not cover is an error naming
/// the node.
pub(crate) fn lower(graph: &Graph) -> Result<Plan, GpuError> {
    Lowering::new(graph).run()
}

struct Lowering<'g> {
    graph: &'g Graph,
    plan: Plan,
    /// Value name → value id, for values the plan has.
    ids: HashMap<String, ValueId>,
    /// Value name → nodes (indices) that read it.
    readers: HashMap<&'g str, Vec<usize>>,
    done: Vec<bool>,
}

impl<'g> Lowering<'g> {
    fn new(graph: &'g Graph) -> Self {
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.nodes.iter().enumerate() {
            for x in n.inputs.iter().filter(|s| !s.is_empty()) {
                readers.entry(x.as_str()).or_default().push(i);
            }
        }
        Lowering {
            graph,
            plan: Plan::default(),
            ids: HashMap::new(),
            readers,
            done: vec![false; graph.nodes.len()],
        }
    }

    fn run(mut self) -> Result<Plan, GpuError> {
        let g = self.graph;
        self.plan.input = self.value(&g.input, g.input_chw.to_vec(), None);
        for i in 0..g.nodes.len() {
            if !self.done[i] {
                self.node(i)?;
            }
        }
        for o in &g.outputs {
            let id = *self.ids.get(o).ok_or_else(|| GpuError::Lower {
                model: g.model.clone(),
                reason: format!("the graph output {o:?} is not computed"),
            })?;
            self.plan.outputs.push(id);
        }
        plan_slots(&mut self.plan);
        Ok(self.plan)
    }

    fn value(&mut self, name: &str, shape: Vec<usize>, alias_of: Option<ValueId>) -> ValueId {
        let id = self.plan.values.len();
        let root = alias_of.map_or(id, |a| self.plan.values[a].root);
        self.plan.values.push(Value {
            name: name.to_string(),
            shape,
            root,
            slot: 0,
        });
        self.ids.insert(name.to_string(), id);
        id
    }

    fn unsupported(&self, n: &Node, why: &str) -> GpuError {
        GpuError::Unsupported {
            model: self.graph.model.clone(),
            node: n.describe(),
            reason: why.to_string(),
        }
    }

    /// An activation input: a value the plan already has.
    fn activation(&self, n: &Node, ix: usize) -> Result<ValueId, GpuError> {
        let name = n
            .input(ix)
            .ok_or_else(|| self.unsupported(n, &format!("input {ix} is missing")))?;
        self.ids.get(name).copied().ok_or_else(|| {
            let what = if self.graph.constants.contains_key(name) {
                "is a constant where the executor expects an activation"
            } else {
                "is computed by nothing the executor ran"
            };
            self.unsupported(n, &format!("input {name:?} {what}"))
        })
    }

    fn constant(
        &self,
        n: &Node,
        ix: usize,
    ) -> Result<&'g crate::backbone::graph::Constant, GpuError> {
        let name = n
            .input(ix)
            .ok_or_else(|| self.unsupported(n, &format!("input {ix} is missing")))?;
        self.graph.constants.get(name).ok_or_else(|| {
            self.unsupported(
                n,
                &format!("input {name:?} is computed at run time; the executor needs a constant"),
            )
        })
    }

    fn scalar(&self, n: &Node, ix: usize) -> Result<Option<f32>, GpuError> {
        if n.input(ix).is_none() {
            return Ok(None);
        }
        let c = self.constant(n, ix)?;
        c.scalar()
            .map(Some)
            .ok_or_else(|| self.unsupported(n, &format!("input {ix} is not a scalar")))
    }

    fn node(&mut self, i: usize) -> Result<(), GpuError> {
        let g = self.graph;
        let n = &g.nodes[i];
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            return Err(self.unsupported(n, &format!("domain {:?} is not ONNX's", n.domain)));
        }
        let out = n
            .outputs
            .first()
            .ok_or_else(|| self.unsupported(n, "no output"))?
            .clone();
        match n.op.as_str() {
            "Flatten" | "Reshape" | "Identity" | "Dropout" => {
                let x = self.activation(n, 0)?;
                let len = self.plan.values[x].len();
                let shape = match n.op.as_str() {
                    "Flatten" => {
                        if n.int("axis", 1) != 1 {
                            return Err(self.unsupported(n, "only axis 1 (keep the batch)"));
                        }
                        vec![len]
                    }
                    "Reshape" => self.reshape(n, len)?,
                    _ => self.plan.values[x].shape.clone(),
                };
                self.value(&out, shape, Some(x));
                self.done[i] = true;
                Ok(())
            }
            "Conv" => self.conv(i),
            "Gemm" | "MatMul" => self.gemm(i),
            "GlobalAveragePool" | "ReduceMean" => self.pool(i),
            "Max" => self.gem_pool(i),
            "Clip" | "Relu" | "Add" | "QuantizeLinear" => {
                let x = self.activation(n, 0)?;
                let len = self.plan.values[x].len();
                let shape = self.plan.values[x].shape.clone();
                let step = Step {
                    nodes: vec![],
                    kernel: Kernel::Eltwise { len },
                    input: x,
                    output: 0,
                    weights: 0,
                    epilogue: Epilogue::default(),
                };
                // The node itself is the first "follower" of an identity producer.
                self.emit(step, i, shape, true)
            }
            op => Err(self.unsupported(
                n,
                &format!(
                    "the GPU executor does not implement {op} (it runs Conv, Gemm, MatMul, \
                     Clip, Relu, Add, GlobalAveragePool, ReduceMean, Flatten, Reshape, \
                     activation QuantizeLinear→DequantizeLinear pairs and GeM pooling)"
                ),
            )),
        }
    }

    fn reshape(&self, n: &Node, len: usize) -> Result<Vec<usize>, GpuError> {
        let c = self.constant(n, 1)?;
        let dims: Vec<i64> = c.values.iter().map(|v| *v as i64).collect();
        let Some((first, rest)) = dims.split_first() else {
            return Err(self.unsupported(n, "empty shape"));
        };
        if !matches!(first, 0 | -1) && rest.contains(&-1) {
            return Err(self.unsupported(n, "the batch axis must stay first"));
        }
        let known: i64 = rest.iter().filter(|d| **d > 0).product();
        let shape: Vec<usize> = rest
            .iter()
            .map(|d| match d {
                -1 if known > 0 => len / known as usize,
                d => (*d).max(0) as usize,
            })
            .collect();
        if shape.iter().product::<usize>() != len {
            return Err(self.unsupported(
                n,
                &format!("shape {dims:?} does not hold {len} values per image"),
            ));
        }
        Ok(shape)
    }

    fn add_weights(&mut self, w: impl IntoIterator<Item = f32>) -> usize {
        let at = self.plan.weights.len();
        self.plan.weights.extend(w);
        at
    }

    fn conv(&mut self, i: usize) -> Result<(), GpuError> {
        let n = &self.graph.nodes[i];
        let x = self.activation(n, 0)?;
        let xs = self.plan.values[x].shape.clone();
        let [c_in, h, w] = xs[..] else {
            return Err(self.unsupported(n, &format!("input shape {xs:?} is not C×H×W")));
        };
        let wt = self.constant(n, 1)?;
        let [c_out, cpg, kh, kw] = wt.dims[..] else {
            return Err(self.unsupported(n, "only 2-D convolutions (weights O×I×kH×kW)"));
        };
        if kh == 0 || kw == 0 || c_out == 0 {
            return Err(self.unsupported(n, &format!("empty weights {:?}", wt.dims)));
        }
        let groups = n.int("group", 1).max(1) as usize;
        if cpg * groups != c_in || c_out % groups != 0 {
            return Err(self.unsupported(
                n,
                &format!(
                    "weights {:?} do not fit {c_in} input channels in {groups} groups",
                    wt.dims
                ),
            ));
        }
        let pair = |name: &str, default: usize| -> Result<(usize, usize), GpuError> {
            match n.ints(name) {
                None => Ok((default, default)),
                Some([a, b]) if *a >= 0 && *b >= 0 => Ok((*a as usize, *b as usize)),
                Some(v) => Err(self.unsupported(n, &format!("{name} {v:?}"))),
            }
        };
        let (sh, sw) = pair("strides", 1)?;
        let (dh, dw) = pair("dilations", 1)?;
        if sh == 0 || sw == 0 || dh == 0 || dw == 0 {
            return Err(self.unsupported(n, "zero stride or dilation"));
        }
        let ekh = dh * (kh - 1) + 1;
        let ekw = dw * (kw - 1) + 1;
        let auto_pad = match n.attrs.get("auto_pad") {
            Some(Attr::Text(s)) => s.as_str(),
            _ => "NOTSET",
        };
        let (pt, pl, pb, pr) = match auto_pad {
            "NOTSET" => match n.ints("pads") {
                None => (0, 0, 0, 0),
                Some([t, l, b, r]) if [*t, *l, *b, *r].iter().all(|p| *p >= 0) => {
                    (*t as usize, *l as usize, *b as usize, *r as usize)
                }
                Some(v) => return Err(self.unsupported(n, &format!("pads {v:?}"))),
            },
            "VALID" => (0, 0, 0, 0),
            "SAME_UPPER" | "SAME_LOWER" => {
                let same = |size: usize, s: usize, k: usize| {
                    let out = size.div_ceil(s);
                    ((out - 1) * s + k).saturating_sub(size)
                };
                let (ph, pw) = (same(h, sh, ekh), same(w, sw, ekw));
                let upper = auto_pad == "SAME_UPPER";
                let (t, l) = if upper {
                    (ph / 2, pw / 2)
                } else {
                    (ph - ph / 2, pw - pw / 2)
                };
                (t, l, ph - t, pw - l)
            }
            other => return Err(self.unsupported(n, &format!("auto_pad {other}"))),
        };
        if h + pt + pb < ekh || w + pl + pr < ekw {
            return Err(self.unsupported(n, "the kernel is larger than the padded input"));
        }
        let geom = ConvGeom {
            c_in,
            h,
            w,
            c_out,
            oh: (h + pt + pb - ekh) / sh + 1,
            ow: (w + pl + pr - ekw) / sw + 1,
            kh,
            kw,
            sh,
            sw,
            pt,
            pl,
            dh,
            dw,
            groups,
        };
        let weights = self.add_weights(wt.values.iter().copied());
        let mut epilogue = Epilogue::default();
        if n.input(2).is_some() {
            let b = self.constant(n, 2)?;
            if b.values.len() != c_out {
                return Err(self.unsupported(n, "bias length is not the output channels"));
            }
            epilogue.bias = Some(self.add_weights(b.values.iter().copied()));
        }
        let pointwise = kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt + pl + pb + pr == 0;
        let kernel = if pointwise && groups == 1 {
            Kernel::MatMul {
                m: c_out,
                k: c_in,
                p: h * w,
            }
        } else {
            Kernel::Conv(geom)
        };
        let step = Step {
            nodes: vec![n.describe()],
            kernel,
            input: x,
            output: 0,
            weights,
            epilogue,
        };
        self.done[i] = true;
        self.emit(step, i, vec![c_out, geom.oh, geom.ow], false)
    }

    fn gemm(&mut self, i: usize) -> Result<(), GpuError> {
        let n = &self.graph.nodes[i];
        let x = self.activation(n, 0)?;
        let xs = self.plan.values[x].shape.clone();
        let [k] = xs[..] else {
            return Err(self.unsupported(
                n,
                &format!(
                    "input per image is {xs:?}; the executor multiplies vectors (flatten first)"
                ),
            ));
        };
        let gemm = n.op == "Gemm";
        if gemm && n.int("transA", 0) != 0 {
            return Err(self.unsupported(n, "transA = 1 (the batch must stay the first axis)"));
        }
        let b = self.constant(n, 1)?;
        let trans_b = gemm && n.int("transB", 0) != 0;
        let (alpha, beta) = if gemm {
            (n.float("alpha", 1.0), n.float("beta", 1.0))
        } else {
            (1.0, 1.0)
        };
        let (rows, cols) = match b.dims[..] {
            [r, c] => (r, c),
            _ => return Err(self.unsupported(n, &format!("B has shape {:?}", b.dims))),
        };
        let (m, bk) = if trans_b { (rows, cols) } else { (cols, rows) };
        if bk != k {
            return Err(
                self.unsupported(n, &format!("B {:?} does not multiply a {k}-vector", b.dims))
            );
        }
        // W[m, k] row-major, alpha folded in.
        let w: Vec<f32> = (0..m)
            .flat_map(|mi| (0..k).map(move |ki| (mi, ki)))
            .map(|(mi, ki)| {
                let v = if trans_b {
                    b.values[mi * k + ki]
                } else {
                    b.values[ki * m + mi]
                };
                alpha * v
            })
            .collect();
        let weights = self.add_weights(w);
        let mut epilogue = Epilogue::default();
        if gemm && n.input(2).is_some() {
            let c = self.constant(n, 2)?;
            let bias: Vec<f32> = match c.values.len() {
                1 => vec![beta * c.values[0]; m],
                len if len == m => c.values.iter().map(|v| beta * v).collect(),
                _ => {
                    return Err(self.unsupported(n, &format!("C {:?} is not a row of {m}", c.dims)))
                }
            };
            epilogue.bias = Some(self.add_weights(bias));
        }
        let step = Step {
            nodes: vec![n.describe()],
            kernel: Kernel::MatMul { m, k, p: 1 },
            input: x,
            output: 0,
            weights,
            epilogue,
        };
        self.done[i] = true;
        self.emit(step, i, vec![m], false)
    }

    fn pool(&mut self, i: usize) -> Result<(), GpuError> {
        let n = &self.graph.nodes[i];
        let x = self.activation(n, 0)?;
        let xs = self.plan.values[x].shape.clone();
        let [c, h, w] = xs[..] else {
            return Err(self.unsupported(n, &format!("input shape {xs:?} is not C×H×W")));
        };
        let keep = if n.op == "ReduceMean" {
            let mut axes: Vec<i64> = n.ints("axes").map(<[i64]>::to_vec).unwrap_or_default();
            if axes.is_empty() && n.input(1).is_some() {
                axes = self
                    .constant(n, 1)?
                    .values
                    .iter()
                    .map(|v| *v as i64)
                    .collect();
            }
            let mut axes: Vec<i64> = axes
                .iter()
                .map(|a| if *a < 0 { a + 4 } else { *a })
                .collect();
            axes.sort_unstable();
            if axes != [2, 3] {
                return Err(self.unsupported(n, "only the mean over H and W (axes 2, 3)"));
            }
            n.int("keepdims", 1) != 0
        } else {
            true
        };
        let step = Step {
            nodes: vec![n.describe()],
            kernel: Kernel::Pool {
                c,
                hw: h * w,
                power: 1,
            },
            input: x,
            output: 0,
            weights: 0,
            epilogue: Epilogue::default(),
        };
        self.done[i] = true;
        self.emit(step, i, if keep { vec![c, 1, 1] } else { vec![c] }, false)
    }

    /// GeM pooling as `[graph] gem_power` writes it: `Max(x, 0) → Pow(k) →
    /// GlobalAveragePool → Pow(1/k)`, starting at the `Max` (node `i`), one pool kernel.
    fn gem_pool(&mut self, i: usize) -> Result<(), GpuError> {
        let g = self.graph;
        let n = &g.nodes[i];
        let form = "only GeM pooling: Max(x, 0) → Pow(k) → GlobalAveragePool → Pow(1/k), \
                    k an integer from 2 to 8";
        let x = self.activation(n, 0)?;
        if self.scalar(n, 1)? != Some(0.0) {
            return Err(self.unsupported(n, form));
        }
        let next = |j: usize, op: &str| -> Option<usize> {
            let readers = self.readers.get(g.nodes[j].outputs.first()?.as_str())?;
            let k = *readers.first()?;
            (readers.len() == 1
                && g.nodes[k].op == op
                && !g.outputs.contains(&g.nodes[j].outputs[0]))
            .then_some(k)
        };
        let chain = next(i, "Pow").and_then(|pw| {
            let pool = next(pw, "GlobalAveragePool")?;
            let root = next(pool, "Pow")?;
            Some((pw, pool, root))
        });
        let Some((pw, pool, root)) = chain else {
            return Err(self.unsupported(n, form));
        };
        let k = self.scalar(&g.nodes[pw], 1)?.unwrap_or(0.0);
        let inv = self.scalar(&g.nodes[root], 1)?.unwrap_or(0.0);
        if !(2.0..=8.0).contains(&k) || k.fract() != 0.0 || (k * inv - 1.0).abs() > 1e-5 {
            return Err(self.unsupported(n, form));
        }
        let xs = self.plan.values[x].shape.clone();
        let [c, h, w] = xs[..] else {
            return Err(self.unsupported(n, &format!("input shape {xs:?} is not C×H×W")));
        };
        let step = Step {
            nodes: [i, pw, pool, root]
                .iter()
                .map(|j| g.nodes[*j].describe())
                .collect(),
            kernel: Kernel::Pool {
                c,
                hw: h * w,
                power: k as u8,
            },
            input: x,
            output: 0,
            weights: 0,
            epilogue: Epilogue::default(),
        };
        for j in [i, pw, pool, root] {
            self.done[j] = true;
        }
        self.emit(step, root, vec![c, 1, 1], false)
    }

    /// Fuses the followers of node `i` into `step`'s epilogue, then adds the step. With
    /// `include_self`, node `i` itself is the first follower (an element-wise node whose
    /// producer is not a kernel).
    fn emit(
        &mut self,
        mut step: Step,
        i: usize,
        shape: Vec<usize>,
        include_self: bool,
    ) -> Result<(), GpuError> {
        let g = self.graph;
        let mut cur = if include_self {
            let n = &g.nodes[i];
            self.fuse(&mut step, i, None, &shape)?.ok_or_else(|| {
                self.unsupported(
                    n,
                    "this form of it is not supported (Add of two activations of one shape; \
                     QuantizeLinear read by one DequantizeLinear)",
                )
            })?
        } else {
            g.nodes[i].outputs[0].clone()
        };
        loop {
            let readers = self.readers.get(cur.as_str()).cloned().unwrap_or_default();
            if readers.len() != 1 || g.outputs.contains(&cur) {
                break;
            }
            let j = readers[0];
            match self.fuse(&mut step, j, Some(&cur), &shape)? {
                Some(end) => cur = end,
                None => break,
            }
        }
        let output = self.value(&cur, shape, None);
        step.output = output;
        self.plan.steps.push(step);
        Ok(())
    }

    /// Tries to put node `j` (reading the step's current output) into the epilogue. Returns
    /// the name of the value the step now ends with, or `None` when `j` does not fit.
    fn fuse(
        &mut self,
        step: &mut Step,
        j: usize,
        cur: Option<&str>,
        shape: &[usize],
    ) -> Result<Option<String>, GpuError> {
        let g = self.graph;
        let n = &g.nodes[j];
        if !n.domain.is_empty() {
            return Ok(None);
        }
        let stage = step.epilogue.stage();
        match n.op.as_str() {
            "Relu" | "Clip" if stage < 4 => {
                let (lo, hi) = if n.op == "Relu" {
                    (0.0, f32::MAX)
                } else {
                    let lo = self.scalar(n, 1)?.unwrap_or(n.float("min", f32::MIN));
                    let hi = self.scalar(n, 2)?.unwrap_or(n.float("max", f32::MAX));
                    (lo, hi)
                };
                if stage < 1 {
                    step.epilogue.clip = Some((lo, hi));
                } else {
                    step.epilogue.clip2 = Some((lo, hi));
                }
            }
            "QuantizeLinear" if stage < 5 => {
                let Some(fq) = self.fake_quant(j)? else {
                    return Ok(None);
                };
                if stage < 2 {
                    step.epilogue.q1 = Some(fq.0);
                } else {
                    step.epilogue.q2 = Some(fq.0);
                }
                step.nodes.push(n.describe());
                step.nodes.push(g.nodes[fq.1].describe());
                self.done[j] = true;
                self.done[fq.1] = true;
                return Ok(Some(g.nodes[fq.1].outputs[0].clone()));
            }
            "Add" if stage < 3 => {
                // The operand that is not the step's running value (the step's input when the
                // Add is the step's own node).
                let ins = (
                    n.input(0).unwrap_or_default(),
                    n.input(1).unwrap_or_default(),
                );
                let other = match cur {
                    None => ins.1,
                    Some(c) if ins.0 == c && ins.1 != c => ins.1,
                    Some(c) if ins.1 == c && ins.0 != c => ins.0,
                    Some(_) => return Ok(None),
                };
                let Some(&r) = self.ids.get(other) else {
                    return Ok(None); // a constant, or computed later: not fusable here
                };
                if self.plan.values[r].len() != shape.iter().product::<usize>() {
                    return Ok(None);
                }
                step.epilogue.residual = Some(r);
            }
            _ => return Ok(None),
        }
        step.nodes.push(n.describe());
        self.done[j] = true;
        Ok(Some(n.outputs[0].clone()))
    }

    /// Node `j` is a `QuantizeLinear` read only by one `DequantizeLinear`: their fake-quant
    /// parameters and the DQ node's index.
    fn fake_quant(&self, j: usize) -> Result<Option<(FakeQuant, usize)>, GpuError> {
        let g = self.graph;
        let q = &g.nodes[j];
        let readers = self
            .readers
            .get(q.outputs[0].as_str())
            .cloned()
            .unwrap_or_default();
        let [d] = readers[..] else {
            return Ok(None);
        };
        let dq = &g.nodes[d];
        if dq.op != "DequantizeLinear" || g.outputs.contains(&q.outputs[0]) {
            return Ok(None);
        }
        let scale = |n: &Node| -> Result<f32, GpuError> {
            self.scalar(n, 1)?
                .ok_or_else(|| self.unsupported(n, "a scale is required"))
        };
        let zp = |n: &Node| -> Result<(f32, DataType), GpuError> {
            if n.input(2).is_none() {
                return Ok((0.0, DataType::U8));
            }
            let c = self.constant(n, 2)?;
            let v = c
                .scalar()
                .ok_or_else(|| self.unsupported(n, "per-axis activation quantisation"))?;
            Ok((v, c.dtype))
        };
        let (zero_point, dtype) = zp(q)?;
        let (dq_zero_point, _) = zp(dq)?;
        let (qmin, qmax) = match dtype {
            DataType::U8 => (0.0, 255.0),
            DataType::I8 => (-128.0, 127.0),
            other => {
                return Err(self.unsupported(q, &format!("zero point type {other:?} (u8/i8 only)")))
            }
        };
        Ok(Some((
            FakeQuant {
                scale: scale(q)?,
                zero_point,
                dq_scale: scale(dq)?,
                dq_zero_point,
                qmin,
                qmax,
            },
            d,
        )))
    }
}

/// Gives every root value a buffer slot: a value's slot is free again after its last reader,
/// graph outputs are never overwritten, and a step never writes a slot it reads.
fn plan_slots(plan: &mut Plan) {
    let roots = plan.values.len();
    let mut last_use = vec![0usize; roots];
    for (si, s) in plan.steps.iter().enumerate() {
        for v in [Some(s.input), s.epilogue.residual].into_iter().flatten() {
            let r = plan.values[v].root;
            last_use[r] = last_use[r].max(si);
        }
    }
    for o in &plan.outputs {
        last_use[plan.values[*o].root] = usize::MAX;
    }
    // Slot → (size, busy until step).
    let mut slots: Vec<(usize, usize)> = Vec::new();
    let assign = |len: usize, def: Option<usize>, until: usize, slots: &mut Vec<(usize, usize)>| {
        let free = |(_, busy): &(usize, usize)| def.is_some_and(|d| *busy < d);
        // Best fit among free slots, else the largest free one grown, else a new one.
        let pick = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| free(s) && s.0 >= len)
            .min_by_key(|(_, s)| s.0)
            .or_else(|| {
                slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| free(s))
                    .max_by_key(|(_, s)| s.0)
            })
            .map(|(i, _)| i);
        let i = pick.unwrap_or_else(|| {
            slots.push((0, 0));
            slots.len() - 1
        });
        slots[i] = (slots[i].0.max(len), until);
        i
    };
    let input = plan.input;
    let len = plan.values[input].len();
    plan.values[input].slot = assign(len, None, last_use[input], &mut slots);
    for si in 0..plan.steps.len() {
        let out = plan.steps[si].output;
        let len = plan.values[out].len();
        let until = last_use[out].max(si);
        plan.values[out].slot = assign(len, Some(si), until, &mut slots);
    }
    for v in 0..plan.values.len() {
        let r = plan.values[v].root;
        plan.values[v].slot = plan.values[r].slot;
    }
    plan.slots = slots.into_iter().map(|(len, _)| len).collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::graph::Constant;

    fn conv(name: &str, x: &str, w: &str, b: Option<&str>, out: &str, group: i64) -> Node {
        let mut inputs = vec![x, w];
        inputs.extend(b);
        Node::new("Conv", name, &inputs, &[out])
            .with("group", Attr::Int(group))
            .with("pads", Attr::Ints(vec![1, 1, 1, 1]))
    }

    /// A small residual block: conv3x3 → Clip → depthwise → Add(input) → Flatten/GAP.
    fn block() -> Graph {
        let mut g = Graph {
            model: "test".into(),
            input: "x".into(),
            input_chw: [4, 6, 5],
            outputs: vec!["f".into()],
            ..Graph::default()
        };
        g.constants
            .insert("w1".into(), Constant::f32(&[4, 4, 3, 3], vec![0.1; 144]));
        g.constants
            .insert("b1".into(), Constant::f32(&[4], vec![0.0; 4]));
        g.constants
            .insert("w2".into(), Constant::f32(&[4, 1, 3, 3], vec![0.2; 36]));
        g.constants
            .insert("lo".into(), Constant::f32(&[], vec![0.0]));
        g.constants
            .insert("hi".into(), Constant::f32(&[], vec![6.0]));
        g.nodes = vec![
            conv("c1", "x", "w1", Some("b1"), "y1", 1),
            Node::new("Clip", "clip", &["y1", "lo", "hi"], &["y2"]),
            conv("c2", "y2", "w2", None, "y3", 4),
            Node::new("Add", "add", &["y3", "x"], &["y4"]),
            Node::new("GlobalAveragePool", "gap", &["y4"], &["y5"]),
            Node::new("Flatten", "flat", &["y5"], &["f"]).with("axis", Attr::Int(1)),
        ];
        g
    }

    #[test]
    fn followers_fuse_into_epilogues_and_slots_never_alias_a_live_value() {
        let plan = lower(&block()).unwrap();
        assert_eq!(plan.steps.len(), 3, "{:#?}", plan.steps);
        assert_eq!(plan.fused(), 2); // Clip into c1, Add into c2
        assert_eq!(plan.steps[0].epilogue.clip, Some((0.0, 6.0)));
        assert!(plan.steps[0].epilogue.bias.is_some());
        assert_eq!(plan.steps[1].epilogue.residual, Some(plan.input));
        assert!(matches!(plan.steps[1].kernel, Kernel::Conv(g) if g.groups == 4));
        for s in &plan.steps {
            let out = plan.values[s.output].slot;
            assert_ne!(out, plan.values[s.input].slot);
            if let Some(r) = s.epilogue.residual {
                assert_ne!(out, plan.values[r].slot);
            }
        }
        // The flattened output is a view of the pool's buffer.
        let f = plan.outputs[0];
        assert_eq!(plan.values[f].shape, vec![4]);
        assert_eq!(plan.values[f].slot, plan.values[plan.steps[2].output].slot);
    }

    #[test]
    fn an_operator_without_a_kernel_is_an_error_naming_it() {
        let mut g = block();
        g.nodes[1] = Node::new("Sigmoid", "/_blocks.0/Sigmoid", &["y1"], &["y2"]);
        let e = lower(&g).unwrap_err().to_string();
        assert!(e.contains("Sigmoid \"/_blocks.0/Sigmoid\""), "{e}");
        assert!(e.contains("does not implement Sigmoid"), "{e}");
    }

    #[test]
    fn conv_geometry_follows_onnx_padding_rules() {
        type Case<'a> = (&'a [i64], Option<&'a str>, [usize; 2], [usize; 2]);
        let cases: &[Case] = &[
            // pads, auto_pad, strides → (oh, ow) for a 6×5 input, 3×3 kernel
            (&[1, 1, 1, 1], None, [1, 1], [6, 5]),
            (&[0, 0, 1, 1], None, [2, 2], [3, 2]),
            (&[0, 0, 0, 0], Some("VALID"), [1, 1], [4, 3]),
            (&[0, 0, 0, 0], Some("SAME_UPPER"), [2, 2], [3, 3]),
        ];
        for (pads, auto, strides, want) in cases {
            let mut g = block();
            g.nodes.truncate(1);
            g.outputs = vec!["y1".into()];
            let mut n = g.nodes[0]
                .clone()
                .with("pads", Attr::Ints(pads.to_vec()))
                .with(
                    "strides",
                    Attr::Ints(strides.iter().map(|s| *s as i64).collect()),
                );
            if let Some(a) = auto {
                n = n.with("auto_pad", Attr::Text(a.to_string()));
            }
            g.nodes[0] = n;
            let plan = lower(&g).unwrap();
            let Kernel::Conv(geom) = plan.steps[0].kernel else {
                panic!()
            };
            assert_eq!([geom.oh, geom.ow], *want, "{pads:?} {auto:?} {strides:?}");
        }
    }
}
