//! `graft info`: what backbone is loaded, its identity, what the CPU offers, the GPU adapters
//! seen and which device runs the forward pass.

use serde::Serialize;

use super::{output, Global};
use graft::backbone::Backbone;

#[derive(Serialize)]
struct Info<'a> {
    graft_version: &'a str,
    model: &'a str,
    origin: String,
    description: &'a str,
    precision: &'a str,
    sha256: &'a str,
    /// Rewrites applied before loading (manifest `[graph]`).
    graph: String,
    model_bytes: usize,
    input: &'a graft::backbone::manifest::InputSpec,
    embedding_size: usize,
    feature_node: &'a str,
    logits_node: Option<&'a str>,
    classes: Option<usize>,
    preprocess: &'a str,
    target_arch: &'a str,
    cpu_features: Vec<String>,
    /// Whose kernels run the depthwise convolutions on the CPU (`--cpu-kernels`), and what
    /// graft's took over.
    cpu_kernels: String,
    threads: usize,
    load_ms: f64,
    provenance: Option<&'a toml::Table>,
    board: Option<graft::board::Board>,
    board_source: Option<String>,
    #[serde(flatten)]
    device: super::device::Report,
}

pub fn run(g: &Global) -> anyhow::Result<()> {
    let (bb, gpu) = super::load_backbone_with_gpu(g)?;
    let board = g.board()?;
    let m = bb.manifest();
    let info = Info {
        graft_version: env!("CARGO_PKG_VERSION"),
        model: &bb.id().name,
        origin: bb.origin(),
        description: &m.description,
        precision: &m.precision,
        sha256: &bb.id().sha256,
        graph: graph_line(&bb),
        model_bytes: bb.model_bytes(),
        input: &m.input,
        embedding_size: bb.id().dim,
        feature_node: bb.feature_node(),
        logits_node: bb.logits_node(),
        classes: m.output.classes.filter(|_| bb.logits_node().is_some()),
        preprocess: &bb.id().preprocess,
        target_arch: std::env::consts::ARCH,
        cpu_features: Backbone::cpu_features(),
        cpu_kernels: bb.cpu_kernels_line(),
        threads: bb.threads(),
        load_ms: bb.load_time().as_secs_f64() * 1e3,
        provenance: m.provenance.as_ref(),
        board_source: board.as_ref().map(|(_, s)| s.to_string()),
        board: board.map(|(b, _)| b),
        device: super::device::Report::new(&bb, gpu.as_ref(), true),
    };
    if g.json {
        return output::json_line(&info);
    }
    match (&info.board, &info.board_source) {
        (Some(b), Some(src)) => {
            println!("board          {} ({}; from {src})", b.name, b.title);
            println!(
                "               {}, {} cores, target {}, threads {}, model {}",
                b.cpu,
                if b.cores == 0 {
                    "all".to_string()
                } else {
                    b.cores.to_string()
                },
                b.target,
                b.threads(),
                b.model
            );
            println!(
                "               camera {} {} {}x{}@{}, serial {}, GPU {} ({})",
                b.camera.device,
                b.camera.format,
                b.camera.width,
                b.camera.height,
                b.camera.fps,
                b.serial.device,
                if b.gpu.capable { "capable" } else { "no" },
                b.gpu.reason
            );
        }
        _ => println!("board          none matched (give --board NAME; see boards/README.md)"),
    }
    println!("model          {} ({})", info.model, info.origin);
    if !info.description.is_empty() {
        println!("description    {}", info.description);
    }
    println!("precision      {}", info.precision);
    println!("sha256         {}", info.sha256);
    println!("graph          {}", info.graph);
    println!("model size     {:.1} MB", info.model_bytes as f64 / 1e6);
    println!(
        "input          {} {}x{}x{} {}, shorter side -> {} ({}), centre crop, mean {:?}, std {:?}",
        m.input.name,
        3,
        m.input.size,
        m.input.size,
        m.input.layout,
        m.input.resize_shorter,
        m.input.resize_filter,
        m.input.mean,
        m.input.std
    );
    println!(
        "embedding      {} values at node {}",
        info.embedding_size, info.feature_node
    );
    if let (Some(l), Some(c)) = (info.logits_node, info.classes) {
        println!("classifier     {c} classes at node {l}");
    }
    println!(
        "cpu            {} [{}]",
        info.target_arch,
        info.cpu_features.join(" ")
    );
    println!("cpu kernels    {}", info.cpu_kernels);
    println!("threads        {}", info.threads);
    info.device.print();
    println!("load time      {:.0} ms", info.load_ms);
    Ok(())
}

/// The manifest's graph preparation and what it changed, in one line.
fn graph_line(bb: &Backbone) -> String {
    let spec = bb.manifest().graph;
    let done = bb.rewrites();
    if spec.is_identity() {
        return spec.describe();
    }
    format!(
        "{}: {} activation pairs clipped, {} constants dequantised at load",
        spec.describe(),
        done.qdq_pairs_clipped,
        done.weights_dequantized
    )
}
