//! Where a forward pass spends its time: every node of the optimised tract plan is timed as it
//! runs, and the times are summed per operator kind. This is what `graft bench --profile` prints
//! and what docs/performance.md's findings come from; a user can post it in an issue.
//!
//! The plan is the very one [`Backbone::run`] uses (same batch size, same threads), run through
//! tract's per-node evaluation hook, so the figures are those of real inference plus the cost of
//! reading a clock twice per node (about 100 nodes: a few microseconds in all).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{eval, SimpleState};

use super::{error, Backbone, BackboneError, Prepared};

/// Time spent in one kind of operator (tract's name for it after optimisation).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpTime {
    /// Operator kind, e.g. `Conv`, `OptMatMul`, `DepthWise`, `Add`.
    pub op: String,
    /// Nodes of that kind in the plan.
    pub nodes: usize,
    /// Mean milliseconds per forward pass, summed over those nodes.
    pub ms: f64,
    /// Share of the summed node time (0..1).
    pub share: f64,
}

/// Time spent in one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeTime {
    /// Node name in the optimised plan (derived from the ONNX node's name).
    pub node: String,
    /// Operator kind.
    pub op: String,
    /// tract's one-line description of the operator (shapes, kernel choice).
    pub info: String,
    /// Mean milliseconds per forward pass.
    pub ms: f64,
}

/// A per-operator profile of one plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// Batch size of the profiled plan.
    pub batch: usize,
    /// Timed passes (after one untimed warm-up).
    pub runs: usize,
    /// Mean wall milliseconds of a whole pass.
    pub total_ms: f64,
    /// Sum of the per-node means (the rest of `total_ms` is tract's scheduling).
    pub nodes_ms: f64,
    /// Operator kinds, slowest first.
    pub by_op: Vec<OpTime>,
    /// Every node that ran, slowest first.
    pub nodes: Vec<NodeTime>,
}

impl Backbone {
    /// Runs `images` (one batch) `runs` times through the plan that embeds them (no
    /// classifier) with every node timed.
    pub fn profile(&self, images: &[Prepared], runs: usize) -> Result<Profile, BackboneError> {
        let batch = images.len().max(1);
        let plan = self.plan(batch, false)?;
        let input = self.input_tensor(&plan, images)?;
        let fail = |e: TractError| BackboneError::Inference {
            model: self.model_name(),
            reason: error::chain(&e),
        };
        let nodes = plan.model().nodes.len();
        let runs = runs.max(1);
        // All passes on the backbone's pool, as a real run goes (the plan's state stays on the
        // thread that made it).
        let (per_node, total) = self
            .in_pool(|| {
                let mut state = SimpleState::new(&plan)?;
                let mut per_node = vec![Duration::ZERO; nodes];
                let mut total = Duration::ZERO;
                for pass in 0..=runs {
                    let timed = pass > 0; // the first pass warms caches and allocates
                    let start = Instant::now();
                    state.run_plan_with_eval(
                        tvec!(input.clone().into()),
                        |ctx, op_state, node, inputs| {
                            let t = Instant::now();
                            let out = eval(ctx, op_state, node, inputs);
                            if timed {
                                per_node[node.id] += t.elapsed();
                            }
                            out
                        },
                    )?;
                    if timed {
                        total += start.elapsed();
                    }
                }
                Ok::<_, TractError>((per_node, total))
            })
            .map_err(fail)?;
        let per_run = |d: Duration| d.as_secs_f64() * 1e3 / runs as f64;
        let model = plan.model();
        let mut kinds: HashMap<String, (usize, f64)> = HashMap::new();
        let mut slowest = Vec::new();
        for node in model.nodes() {
            // Constants are computed once at plan time, not per pass; they would only add noise.
            if node.op_is::<tract_onnx::tract_core::ops::konst::Const>()
                || node.op_is::<tract_onnx::tract_core::ops::source::TypedSource>()
            {
                continue;
            }
            let ms = per_run(per_node[node.id]);
            let op = node.op().name().to_string();
            let e = kinds.entry(op.clone()).or_default();
            e.0 += 1;
            e.1 += ms;
            slowest.push(NodeTime {
                node: node.name.clone(),
                op,
                info: node.op().info().unwrap_or_default().join("; "),
                ms,
            });
        }
        let nodes_ms: f64 = kinds.values().map(|(_, ms)| ms).sum();
        let mut by_op: Vec<OpTime> = kinds
            .into_iter()
            .map(|(op, (nodes, ms))| OpTime {
                op,
                nodes,
                ms,
                share: if nodes_ms > 0.0 { ms / nodes_ms } else { 0.0 },
            })
            .collect();
        by_op.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.op.cmp(&b.op)));
        slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(Profile {
            batch,
            runs,
            total_ms: per_run(total),
            nodes_ms,
            by_op,
            nodes: slowest,
        })
    }
}
