//! `--device auto|cpu|gpu`: where the backbone's forward pass runs. With the `gpu` feature the
//! GPU executor is built and plugged into the backbone; without it, `gpu` is an error that says
//! how to get it and `auto` is the CPU.

#[cfg(not(feature = "gpu"))]
use graft::backbone::DeviceChoice;

use crate::Global;

/// The GPU executor plugged into a backbone, kept for `info` and `bench`.
#[cfg(feature = "gpu")]
pub type Gpu = std::sync::Arc<graft::gpu::GpuBackbone>;
/// Without the `gpu` feature there never is one.
#[cfg(not(feature = "gpu"))]
pub type Gpu = std::convert::Infallible;

/// Plugs the device `--device` chooses into `bb`; `None` when the CPU runs it.
#[cfg(feature = "gpu")]
pub fn attach(g: &Global, bb: &mut graft::backbone::Backbone) -> anyhow::Result<Option<Gpu>> {
    use graft::gpu::{GpuBackbone, GpuError, GpuOptions};
    let options = GpuOptions {
        max_batch: g.gpu_batch as usize,
        adapter: g.gpu_adapter.clone(),
        ..GpuOptions::default()
    };
    let gpu = match GpuBackbone::open(bb, g.device, &options) {
        Ok(Some(gpu)) => gpu,
        Ok(None) => return Ok(None),
        // Say where the name came from: the library only knows the name.
        Err(GpuError::NoAdapter {
            wanted: Some(w),
            seen,
        }) => anyhow::bail!(
            "no GPU adapter found named like GRAFT_GPU_ADAPTER={w:?} (or --gpu-adapter; seen: {seen:?})"
        ),
        Err(e) => return Err(e.into()),
    };
    let gpu = std::sync::Arc::new(gpu);
    bb.set_accelerator(Some(gpu.clone()));
    log::debug!("forward pass on {}", bb.engine());
    Ok(Some(gpu))
}

/// Plugs the device `--device` chooses into `bb`; `None` when the CPU runs it.
#[cfg(not(feature = "gpu"))]
pub fn attach(g: &Global, _bb: &mut graft::backbone::Backbone) -> anyhow::Result<Option<Gpu>> {
    if g.device == DeviceChoice::Gpu {
        anyhow::bail!(
            "--device gpu: this graft was built without the `gpu` feature \
             (cargo build --release --features gpu)"
        );
    }
    Ok(None)
}

/// What `info` and `bench` say about the device.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// What runs the forward pass: `cpu (tract)` or `gpu: NAME (BACKEND, TYPE)`.
    pub device: String,
    /// Whether this graft was built with the `gpu` feature.
    pub gpu_feature: bool,
    /// The adapters wgpu sees (empty without the feature).
    pub adapters: Vec<serde_json::Value>,
    /// The GPU plan's size, when the GPU runs it.
    pub gpu_plan: Option<serde_json::Value>,
}

impl Report {
    /// Describes the device of `bb` (and lists the adapters when `list` is set).
    pub fn new(bb: &graft::backbone::Backbone, gpu: Option<&Gpu>, list: bool) -> Report {
        #[cfg(feature = "gpu")]
        {
            let adapters = if list {
                graft::gpu::adapters()
                    .into_iter()
                    .filter_map(|a| serde_json::to_value(a).ok())
                    .collect()
            } else {
                Vec::new()
            };
            let plan = gpu.and_then(|g| serde_json::to_value(g.summary()).ok());
            Report {
                device: bb.engine(),
                gpu_feature: true,
                adapters,
                gpu_plan: plan,
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = (gpu, list);
            Report {
                device: bb.engine(),
                gpu_feature: false,
                adapters: Vec::new(),
                gpu_plan: None,
            }
        }
    }

    /// The `info` lines.
    pub fn print(&self) {
        println!("device         {}", self.device);
        if !self.gpu_feature {
            println!("adapters       (this graft is built without the `gpu` feature)");
        }
        for (i, a) in self.adapters.iter().enumerate() {
            let s = |k: &str| a.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            let note = match a.get("auto_skips").and_then(|v| v.as_str()) {
                Some(why) => format!("auto skips it: {why}"),
                None => "auto may use it".into(),
            };
            let head = if i == 0 { "adapters" } else { "" };
            println!(
                "{head:<14} {} ({}, {}; {}) - {note}",
                s("name"),
                s("backend"),
                s("device_type"),
                s("driver")
            );
        }
        if self.gpu_feature && self.adapters.is_empty() {
            println!("adapters       none found (no Vulkan driver?)");
        }
        if let Some(p) = &self.gpu_plan {
            let n = |k: &str| p.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
            let dq = n("weights_dequantized");
            let weights = if dq > 0.0 {
                format!(
                    "{:.1} MiB f32 weights (int8 weights dequantised to f32 at load: {dq} tensors)",
                    n("weights_mib")
                )
            } else {
                format!("{:.1} MiB f32 weights", n("weights_mib"))
            };
            println!(
                "gpu plan       {} kernels ({} nodes fused), {:.0} MMAC per image, {weights}, \
                 batch up to {}, {} activation buffers ({:.0} MiB)",
                n("kernels"),
                n("fused_nodes"),
                n("mmac_per_image"),
                n("max_batch"),
                n("buffers"),
                n("buffers_mib")
            );
        }
    }
}

/// Per-kernel GPU times for `bench --profile` (each kernel submitted alone and waited for, so
/// the sum is above a real pass, which has no waits between kernels).
#[derive(Debug, serde::Serialize)]
pub struct GpuProfile {
    /// Images per dispatch.
    pub batch: usize,
    /// Kernel kinds, slowest first.
    pub kernels: Vec<GpuKernel>,
}

/// One kind of kernel in a [`GpuProfile`].
#[derive(Debug, serde::Serialize)]
pub struct GpuKernel {
    pub kernel: String,
    pub steps: usize,
    pub ms: f64,
    /// Billion multiply-accumulates per second: how close the kernel is to the device's peak.
    pub gmac_per_s: f64,
}

/// Profiles the GPU executor at `batch`, if one runs the backbone.
pub fn gpu_profile(
    gpu: Option<&Gpu>,
    batch: usize,
    runs: usize,
) -> anyhow::Result<Option<GpuProfile>> {
    #[cfg(feature = "gpu")]
    {
        let Some(g) = gpu else { return Ok(None) };
        let batch = batch.min(g.summary().max_batch).max(1);
        let kernels = g
            .profile(batch, runs)?
            .into_iter()
            .map(|k| GpuKernel {
                gmac_per_s: if k.ms > 0.0 {
                    k.gmac / (k.ms / 1e3)
                } else {
                    0.0
                },
                kernel: k.kernel,
                steps: k.steps,
                ms: k.ms,
            })
            .collect();
        Ok(Some(GpuProfile { batch, kernels }))
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (gpu, batch, runs);
        Ok(None)
    }
}

impl GpuProfile {
    /// The `bench --profile` table.
    pub fn print(&self) {
        let total: f64 = self.kernels.iter().map(|k| k.ms).sum();
        println!();
        println!(
            "gpu profile: batch {}, each kernel alone: {:.2} ms per batch ({:.2} ms per image)",
            self.batch,
            total,
            total / self.batch as f64
        );
        println!(
            "{:<20} {:>5} {:>9} {:>7} {:>9}",
            "kernel", "steps", "ms", "share", "GMAC/s"
        );
        for k in &self.kernels {
            println!(
                "{:<20} {:>5} {:>9.3} {:>6.1}% {:>9.1}",
                k.kernel,
                k.steps,
                k.ms,
                k.ms / total.max(1e-9) * 100.0,
                k.gmac_per_s
            );
        }
    }
}
