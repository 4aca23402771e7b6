//! Minimal reproducer of the largest gap between tract and onnxruntime on the bundled model:
//! single-node depthwise convolutions of EfficientNet-Lite0's shapes (`graft bench --profile`
//! puts DepthWiseConv at ~58% of the fp32 pass). The ONNX files and onnxruntime's side come from
//! `benches/depthwise_repro.py`, which runs this bench and prints the ratios:
//!
//! ```sh
//! .venv/bin/python benches/depthwise_repro.py
//! ```
//!
//! It talks to tract directly, not through graft's backbone module, on purpose: it is meant to
//! be handed upstream as it is. Prints one line per model: `name median_ms`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tract_onnx::prelude::*;

fn time_model(path: &Path, runs: usize) -> TractResult<f64> {
    let model = tract_onnx::onnx()
        .model_for_path(path)?
        .into_optimized()?
        .into_runnable()?;
    let fact = model.model().input_fact(0)?.clone();
    let shape: Vec<usize> = fact
        .shape
        .as_concrete()
        .ok_or_else(|| anyhow::anyhow!("input shape of {} is not concrete", path.display()))?
        .to_vec();
    let n: usize = shape.iter().product();
    let input = Tensor::from_shape(&shape, &vec![0.5f32; n])?;
    model.run(tvec!(input.clone().into()))?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        model.run(tvec!(input.clone().into()))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
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
    for f in files {
        let ms = time_model(&f, 50)?;
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        println!("{name} {ms:.4}");
    }
    Ok(())
}
