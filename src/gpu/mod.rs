//! The optional GPU path (cargo feature `gpu`): the backbone's forward pass on a GPU through
//! wgpu (Vulkan, Metal or DX12), by graft's own small WGSL executor.
//!
//! This is the only module that touches wgpu. It takes the backbone's graph as plain data
//! ([`Backbone::graph`]: the prepared ONNX graph, int8 weights already dequantised to f32),
//! lowers it to four kernels with fused epilogues (`lower.rs`, no GPU needed), builds the
//! pipelines and buffers once (`exec.rs`, shaders in `kernels.wgsl`) and plugs itself into the
//! backbone as its [`Accelerator`]: every command that embeds then runs on the GPU. tract stays
//! the reference: the tests compare the two on the bundled models and on one-operator graphs.
//!
//! Choosing the device ([`GpuBackbone::open`]): `cpu` never touches wgpu; `gpu` takes the best adapter there
//! is (software renderers too, which is how CI tests this path on Mesa's lavapipe) and fails
//! with a clear error when there is none or the graph has an operator the executor lacks;
//! `auto` (the default) takes only a hardware GPU not known to be slower than the CPU for this
//! work (software renderers, the Raspberry Pi's V3D) and otherwise stays on the CPU, saying why
//! in a log line.

mod exec;
mod lower;

use crate::backbone::graph::Graph;
use crate::backbone::{Accelerator, Backbone};

pub use exec::KernelTime;

/// Images per dispatch unless [`GpuOptions::max_batch`] says otherwise.
pub const DEFAULT_BATCH: usize = 64;

pub use crate::backbone::DeviceChoice;

/// Everything that can go wrong on the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No adapter to run on.
    #[error(
        "no GPU adapter found{} (install the GPU's Vulkan driver; Mesa's lavapipe, Debian package mesa-vulkan-drivers, is a software one for testing)",
        no_adapter_detail(wanted.as_deref(), seen)
    )]
    NoAdapter {
        /// The name asked for ([`GpuOptions::adapter`]), if any.
        wanted: Option<String>,
        /// The adapters there are.
        seen: Vec<String>,
    },
    /// The graph has an operator (or a form of one) the executor does not run.
    #[error("model {model}: the GPU executor cannot run node {node}: {reason}")]
    Unsupported {
        /// The model.
        model: String,
        /// The node.
        node: String,
        /// What was wrong.
        reason: String,
    },
    /// The graph is not one the executor can plan.
    #[error("model {model}: cannot plan the graph for the GPU: {reason}")]
    Lower {
        /// The model.
        model: String,
        /// What was wrong.
        reason: String,
    },
    /// The adapter refused a device, a buffer or a kernel.
    #[error("GPU {adapter}: {reason}")]
    Device {
        /// The adapter.
        adapter: String,
        /// What was wrong.
        reason: String,
    },
    /// The adapter could not hold the buffers for this many images per dispatch.
    #[error("GPU {adapter}: out of memory for {batch} images per dispatch: {reason}")]
    OutOfMemory {
        /// The adapter.
        adapter: String,
        /// Images per dispatch.
        batch: usize,
        /// What was wrong.
        reason: String,
    },
    /// A run failed on the device.
    #[error("GPU run failed: {0}")]
    Run(String),
}

fn no_adapter_detail(wanted: Option<&str>, seen: &[String]) -> String {
    match wanted {
        Some(w) => format!(" named like {w:?} (seen: {seen:?})"),
        None if seen.is_empty() => String::new(),
        None => format!(" that is faster than the CPU (seen: {seen:?})"),
    }
}

/// An adapter wgpu found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterSummary {
    /// The adapter's name, e.g. `NVIDIA H100 80GB HBM3` or `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// `Vulkan`, `Metal`, `Dx12`.
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` (a software renderer), `Other`.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Why `--device auto` does not use it, if it does not.
    pub auto_skips: Option<String>,
    rank: u8,
}

/// Every adapter wgpu can see, best first.
pub fn adapters() -> Vec<AdapterSummary> {
    let mut found: Vec<AdapterSummary> = enumerate().into_iter().map(|(_, s)| s).collect();
    found.sort_by_key(|s| s.rank);
    found
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn enumerate() -> Vec<(wgpu::Adapter, AdapterSummary)> {
    let adapters = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
    adapters
        .into_iter()
        .map(|a| {
            let s = summarize(&a.get_info());
            (a, s)
        })
        .collect()
}

fn summarize(info: &wgpu::AdapterInfo) -> AdapterSummary {
    let name = info.name.to_lowercase();
    let software = [
        "llvmpipe",
        "lavapipe",
        "softpipe",
        "swiftshader",
        "microsoft basic render",
    ];
    let auto_skips =
        if info.device_type == wgpu::DeviceType::Cpu || software.iter().any(|s| name.contains(s)) {
            Some("a software renderer: it runs on the CPU, slower than tract".to_string())
        } else if name.contains("v3d") || name.contains("videocore") {
            Some("Raspberry Pi V3D: slower than the board's CPU for this network".to_string())
        } else if info.device_type == wgpu::DeviceType::Other {
            Some("an adapter of unknown kind".to_string())
        } else {
            None
        };
    let rank = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    } + if auto_skips.is_some() { 5 } else { 0 };
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        auto_skips,
        rank,
    }
}

/// The adapter `choice` allows (`wanted` narrows it by name); `None` for `cpu`, or for `auto`
/// without one worth using.
fn pick(
    choice: DeviceChoice,
    wanted: Option<&str>,
) -> Result<Option<(wgpu::Adapter, AdapterSummary)>, GpuError> {
    if choice == DeviceChoice::Cpu {
        return Ok(None);
    }
    let auto = choice == DeviceChoice::Auto;
    let wanted = wanted.filter(|s| !s.is_empty());
    let mut found = enumerate();
    found.sort_by_key(|(_, s)| s.rank);
    let names: Vec<String> = found.iter().map(|(_, s)| s.name.clone()).collect();
    let pick = found.into_iter().find(|(_, s)| match &wanted {
        Some(w) => s.name.to_lowercase().contains(&w.to_lowercase()),
        None => !auto || s.auto_skips.is_none(),
    });
    match pick {
        Some(p) => Ok(Some(p)),
        None => {
            if auto {
                // Every command on such a machine would say it: `info` and `-v` tell.
                log::debug!(
                    "no GPU adapter{}; running on the CPU",
                    no_adapter_detail(wanted, &names)
                );
                return Ok(None);
            }
            Err(GpuError::NoAdapter {
                wanted: wanted.map(str::to_string),
                seen: names,
            })
        }
    }
}

/// The backbone's forward pass on a GPU: an [`Accelerator`] for [`Backbone::set_accelerator`].
pub struct GpuBackbone {
    exec: exec::Executor,
    adapter: AdapterSummary,
    weights_dequantized: usize,
}

impl std::fmt::Debug for GpuBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackbone")
            .field("adapter", &self.adapter.name)
            .finish()
    }
}

/// How to build the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuOptions {
    /// The most images per dispatch (fewer when the adapter's limits say so).
    pub max_batch: usize,
    /// Matrix products in workgroup-shared tiles (`true`) or straight from the buffers
    /// (`false`); `None`: tiles on hardware GPUs, straight on software renderers, where
    /// barriers are expensive.
    pub tiled_matmul: Option<bool>,
    /// Take the adapter whose name contains this text (case-insensitive), whatever its type.
    pub adapter: Option<String>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            max_batch: DEFAULT_BATCH,
            tiled_matmul: None,
            adapter: None,
        }
    }
}

/// What [`GpuBackbone::summary`] says of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanSummary {
    /// Kernel dispatches per forward pass.
    pub kernels: usize,
    /// ONNX nodes fused into an earlier kernel.
    pub fused_nodes: usize,
    /// Multiply-accumulates per image, in millions.
    pub mmac_per_image: f64,
    /// Weights and biases on the GPU, in MiB (f32).
    pub weights_mib: f64,
    /// Constant `DequantizeLinear`s folded into f32 weights (int8 weights dequantised at load).
    pub weights_dequantized: usize,
    /// Images per dispatch.
    pub max_batch: usize,
    /// Activation buffers (values share them when their lifetimes do not overlap).
    pub buffers: usize,
    /// Activation buffers, in MiB at that batch.
    pub buffers_mib: f64,
}

impl GpuBackbone {
    /// Lowers `backbone`'s graph and builds it on the adapter `choice` (and
    /// [`GpuOptions::adapter`]) allows, with up to [`GpuOptions::max_batch`] images per
    /// dispatch.
    ///
    /// `Ok(None)`: `cpu`; or `auto` found no adapter worth using, or the graph needs an
    /// operator the executor lacks: the reason is logged and the caller stays on the CPU.
    pub fn open(
        backbone: &Backbone,
        choice: DeviceChoice,
        options: &GpuOptions,
    ) -> Result<Option<GpuBackbone>, GpuError> {
        // The adapter first: with none worth using, `auto` costs no graph work.
        let Some(adapter) = pick(choice, options.adapter.as_deref())? else {
            return Ok(None);
        };
        let graph = backbone.graph().map_err(|e| GpuError::Lower {
            model: backbone.id().name.clone(),
            reason: e.to_string(),
        })?;
        Self::on(adapter, &graph, choice, options)
    }

    /// [`GpuBackbone::open`] for any graph (one made by hand, for instance).
    pub fn from_graph(
        graph: &Graph,
        choice: DeviceChoice,
        options: &GpuOptions,
    ) -> Result<Option<GpuBackbone>, GpuError> {
        let Some(adapter) = pick(choice, options.adapter.as_deref())? else {
            return Ok(None);
        };
        Self::on(adapter, graph, choice, options)
    }

    fn on(
        (adapter, summary): (wgpu::Adapter, AdapterSummary),
        graph: &Graph,
        choice: DeviceChoice,
        options: &GpuOptions,
    ) -> Result<Option<GpuBackbone>, GpuError> {
        let auto = choice == DeviceChoice::Auto;
        let plan = match lower::lower(graph) {
            Ok(p) => p,
            Err(e) if auto => {
                log::warn!("{e}; running on the CPU");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if let Some(why) = &summary.auto_skips {
            log::warn!("GPU {}: {why}", summary.name);
        }
        match Self::build(adapter, summary, plan, graph.weights_dequantized, options) {
            Ok(g) => Ok(Some(g)),
            Err(e) if auto => {
                log::warn!("{e}; running on the CPU");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn build(
        adapter: wgpu::Adapter,
        summary: AdapterSummary,
        plan: lower::Plan,
        weights_dequantized: usize,
        options: &GpuOptions,
    ) -> Result<GpuBackbone, GpuError> {
        let what = format!("{} ({})", summary.name, summary.backend);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("graft"),
            required_features: wgpu::Features::empty(),
            // All the adapter offers: large activation buffers need more than the defaults.
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::Device {
            adapter: what.clone(),
            reason: e.to_string(),
        })?;
        let tiled = options.tiled_matmul.unwrap_or(summary.device_type != "Cpu");
        // A GPU with little memory (a Jetson's shared RAM) gets fewer images per dispatch.
        let mut batch = options.max_batch.max(1);
        let exec = loop {
            let built = exec::Executor::new(
                device.clone(),
                queue.clone(),
                plan.clone(),
                batch,
                &what,
                tiled,
            );
            match built {
                Err(GpuError::OutOfMemory { .. }) if batch > 1 => {
                    log::warn!(
                        "GPU {what}: out of memory at {batch} images per dispatch; trying {}",
                        batch / 2
                    );
                    batch /= 2;
                }
                other => break other?,
            }
        };
        log::debug!(
            "GPU {what}: {} kernels, batch up to {}",
            exec.plan().steps.len(),
            exec.max_batch()
        );
        Ok(GpuBackbone {
            exec,
            adapter: summary,
            weights_dequantized,
        })
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    /// The plan's size.
    pub fn summary(&self) -> PlanSummary {
        let plan = self.exec.plan();
        let mib = |floats: usize| floats as f64 * 4.0 / (1024.0 * 1024.0);
        PlanSummary {
            kernels: plan.steps.len(),
            fused_nodes: plan.fused(),
            mmac_per_image: plan.macs() as f64 / 1e6,
            weights_mib: mib(plan.weights.len()),
            weights_dequantized: self.weights_dequantized,
            max_batch: self.exec.max_batch(),
            buffers: plan.slots.len(),
            buffers_mib: mib(plan.slots.iter().sum::<usize>() * self.exec.max_batch()),
        }
    }

    /// Runs `batch` images (`[batch, C, H, W]`): each output, row-major.
    pub fn run(&self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, GpuError> {
        self.exec.run(input, batch)
    }

    /// Times every kernel on `batch` images (median of `runs`), summed by kernel kind.
    pub fn profile(&self, batch: usize, runs: usize) -> Result<Vec<KernelTime>, GpuError> {
        self.exec.profile(batch, runs)
    }
}

impl Accelerator for GpuBackbone {
    fn run(
        &self,
        input: &[f32],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>, crate::backbone::AcceleratorError> {
        Ok(self.exec.run(input, batch)?)
    }

    fn describe(&self) -> String {
        format!(
            "gpu: {} ({}, {})",
            self.adapter.name, self.adapter.backend, self.adapter.device_type
        )
    }

    fn preferred_batch(&self) -> usize {
        self.exec.max_batch()
    }
}

#[cfg(test)]
mod tests;
