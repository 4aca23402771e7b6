//! Minimal reproducer of the largest gap between tract and onnxruntime on the bundled model:
//! single-node depthwise convolutions of EfficientNet-Lite0's shapes (`graft bench --profile`
//! puts DepthWiseConv at ~58% of the fp32 pass). The ONNX files and onnxruntime's side come from
//! `benches/depthwise_repro.py`, which runs this bench and prints the ratios:
//!
//! ```sh
//! .venv/bin/python benches/depthwise_repro.py
//! ```
//!
//! The tract column talks to tract directly, not through graft's backbone module, on purpose: it
//! is meant to be handed upstream as it is. The graft column is the same file with graft's
//! depthwise operator substituted (`graft::backbone::depthwise`), timed alternately with tract's
//! plan in the same process. Prints one line per model: `name tract_median_ms graft_median_ms`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

fn plans(path: &Path) -> TractResult<(Plan, Plan)> {
    let tract = tract_onnx::onnx()
        .model_for_path(path)?
        .into_optimized()?
        .into_runnable()?;
    let mut typed = tract_onnx::onnx()
        .model_for_path(path)?
        .into_typed()?
        .into_decluttered()?;
    graft::backbone::depthwise::substitute(
        &mut typed,
        graft::backbone::depthwise::Isa::detect(),
        false,
    )?;
    let graft = typed.into_optimized()?.into_runnable()?;
    Ok((tract, graft))
}

/// Median ms of `runs` runs of each plan, the two alternating run by run.
fn time_plans(plans: &[&Plan], runs: usize) -> TractResult<Vec<f64>> {
    let model = plans[0];
    let fact = model.model().input_fact(0)?.clone();
    let shape: Vec<usize> = fact
        .shape
        .as_concrete()
        .ok_or_else(|| anyhow::anyhow!("input shape of a model is not concrete"))?
        .to_vec();
    let n: usize = shape.iter().product();
    // One input value shared by every run (cloning a TValue shares it), so a run times the
    // convolution and not a copy of its input.
    let input = Tensor::from_shape(&shape, &vec![0.5f32; n])?.into_tvalue();
    let mut times = vec![Vec::with_capacity(runs); plans.len()];
    for p in plans {
        p.run(tvec!(input.clone()))?;
    }
    for _ in 0..runs {
        for (p, t) in plans.iter().zip(&mut times) {
            let start = Instant::now();
            p.run(tvec!(input.clone()))?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

fn main() -> TractResult<()> {
    let dir = std::env::var_os("GRAFT_DEPTHWISE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/depthwise"));
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .collect(),
        Err(_) => Vec::new(),
    };
    if files.is_empty() {
        eprintln!(
            "depthwise: no models in {} (make them with benches/depthwise_repro.py)",
            dir.display()
        );
        return Ok(());
    }
    files.sort();
    let runs = std::env::var("GRAFT_DEPTHWISE_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    for f in files {
        let (tract, graft) = plans(&f)?;
        let ms = time_plans(&[&tract, &graft], runs)?;
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        println!("{name} {:.4} {:.4}", ms[0], ms[1]);
    }
    Ok(())
}
