//! Running a [`Plan`] with wgpu: pipelines, buffers and bind groups made once; per call, the
//! input uploaded, every step dispatched in one compute pass, the outputs copied to staging
//! buffers and read back. Batches larger than the buffers hold run in chunks, and chunk k's
//! readback overlaps chunk k+1's compute (two sets of staging buffers).

use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::lower::{FakeQuant, Kernel, Plan, Step};
use super::GpuError;

/// Bytes of one step's parameters in the uniform buffer (the WGSL `Params`: 40 words).
/// Bytes of one step's `Params` (a uniform block: a multiple of 16).
const PARAMS_BYTES: u64 = std::mem::size_of::<Params>() as u64;
const _: () = assert!(PARAMS_BYTES == 160 && PARAMS_BYTES.is_multiple_of(16));
/// Threads per workgroup of the one-thread-per-output kernels.
const WG: u64 = 256;
/// Columns per matmul workgroup (the WGSL `TN`; `TM` is the same).
const TILE: u64 = 64;

pub(crate) struct Executor {
    device: wgpu::Device,
    queue: wgpu::Queue,
    plan: Plan,
    pipelines: Pipelines,
    slots: Vec<wgpu::Buffer>,
    params: wgpu::Buffer,
    params_stride: u64,
    bind_groups: Vec<wgpu::BindGroup>,
    staging: [Vec<wgpu::Buffer>; 2],
    max_batch: usize,
    max_dim: u32,
    /// Errors wgpu reported outside a call (validation, device lost).
    errors: Arc<Mutex<Vec<String>>>,
    /// The batch size the uniform buffer holds parameters for.
    params_batch: Mutex<usize>,
}

struct Pipelines {
    conv: wgpu::ComputePipeline,
    matmul: wgpu::ComputePipeline,
    pool: wgpu::ComputePipeline,
    eltwise: wgpu::ComputePipeline,
}

/// Time spent in one kind of kernel, from [`GpuBackbone::profile`](super::GpuBackbone::profile).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// `conv depthwise`, `matmul (1x1 conv)`, ...
    pub kernel: String,
    /// Steps of this kind.
    pub steps: usize,
    /// Milliseconds per batch.
    pub ms: f64,
    /// Multiply-accumulates per batch, in billions.
    pub gmac: f64,
}

impl Executor {
    /// Builds pipelines and buffers for `plan` on `device`, with room for `want_batch` images
    /// per dispatch (fewer when the adapter's buffer or dispatch limits say so).
    pub fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        plan: Plan,
        want_batch: usize,
        what: &str,
        tiled: bool,
    ) -> Result<Executor, GpuError> {
        let limits = device.limits();
        let fail = |reason: String| GpuError::Device {
            adapter: what.to_string(),
            reason,
        };
        let max_dim = limits.max_compute_workgroups_per_dimension;
        let max_batch = max_batch(&plan, &limits).min(want_batch.max(1));
        if max_batch == 0 {
            return Err(fail(format!(
                "one image needs larger buffers than the adapter allows ({} bytes per binding)",
                limits.max_storage_buffer_binding_size
            )));
        }
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        {
            let seen = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                log::error!("gpu: {e}");
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(e.to_string());
            }));
            let lost = errors.clone();
            device.set_device_lost_callback(move |_, msg| {
                lost.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("device lost: {msg}"));
            });
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("graft kernels"),
            source: wgpu::ShaderSource::Wgsl(include_str!("kernels.wgsl").into()),
        });
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("graft step"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: wgpu::BufferSize::new(PARAMS_BYTES),
                    },
                    count: None,
                },
                storage(1, true),
                storage(2, true),
                storage(3, false),
                storage(4, true),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("graft"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = |entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let pipelines = Pipelines {
            conv: pipeline("conv"),
            matmul: pipeline(if tiled { "matmul" } else { "matmul_flat" }),
            pool: pipeline("pool"),
            eltwise: pipeline("eltwise"),
        };
        let buffer = |label: &str, size: u64, usage: wgpu::BufferUsages| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size.max(16).next_multiple_of(4),
                usage,
                mapped_at_creation: false,
            })
        };
        let store = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let weights = buffer("weights", plan.weights.len() as u64 * 4, store);
        if !plan.weights.is_empty() {
            queue.write_buffer(&weights, 0, bytemuck::cast_slice(&plan.weights));
        }
        let slots: Vec<wgpu::Buffer> = plan
            .slots
            .iter()
            .enumerate()
            .map(|(i, len)| buffer(&format!("slot {i}"), (len * max_batch * 4) as u64, store))
            .collect();
        let dummy = buffer("unused", 16, wgpu::BufferUsages::STORAGE);
        let params_stride =
            PARAMS_BYTES.next_multiple_of(limits.min_uniform_buffer_offset_alignment as u64);
        let params = buffer(
            "params",
            params_stride * plan.steps.len().max(1) as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let slot_of = |v: usize| &slots[plan.values[v].slot];
        let bind_groups = plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: s.nodes.first().map(String::as_str),
                    layout: &layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: &params,
                                offset: i as u64 * params_stride,
                                size: wgpu::BufferSize::new(PARAMS_BYTES),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: slot_of(s.input).as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: weights.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 3,
                            resource: slot_of(s.output).as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 4,
                            resource: s
                                .epilogue
                                .residual
                                .map_or(&dummy, slot_of)
                                .as_entire_binding(),
                        },
                    ],
                })
            })
            .collect();
        let staging_set = |k: usize| -> Vec<wgpu::Buffer> {
            plan.outputs
                .iter()
                .map(|o| {
                    buffer(
                        &format!("readback {k}"),
                        (plan.values[*o].len() * max_batch * 4) as u64,
                        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    )
                })
                .collect()
        };
        let staging = [staging_set(0), staging_set(1)];
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(GpuError::OutOfMemory {
                adapter: what.to_string(),
                batch: max_batch,
                reason: e.to_string(),
            });
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(fail(format!("building the kernels failed: {e}")));
        }
        Ok(Executor {
            device,
            queue,
            plan,
            pipelines,
            slots,
            params,
            params_stride,
            bind_groups,
            staging,
            max_batch,
            max_dim,
            errors,
            params_batch: Mutex::new(0),
        })
    }

    /// The largest batch one dispatch takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Runs `batch` images (`[batch, C, H, W]`) and returns each output, row-major.
    pub fn run(&self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, GpuError> {
        let per_image = self.plan.values[self.plan.input].len();
        if input.len() != batch * per_image {
            return Err(GpuError::Run(format!(
                "{} input values for {batch} images of {per_image}",
                input.len()
            )));
        }
        let mut outputs: Vec<Vec<f32>> = self
            .plan
            .outputs
            .iter()
            .map(|o| Vec::with_capacity(batch * self.plan.values[*o].len()))
            .collect();
        let mut params_batch = self.params_batch.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending: Option<Pending> = None;
        let mut start = 0;
        let mut k = 0;
        while start < batch {
            let b = self.max_batch.min(batch - start);
            if *params_batch != b {
                self.write_params(b);
                *params_batch = b;
            }
            let chunk = &input[start * per_image..(start + b) * per_image];
            self.queue.write_buffer(
                &self.slots[self.plan.values[self.plan.input].slot],
                0,
                bytemuck::cast_slice(chunk),
            );
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("graft forward"),
                    timestamp_writes: None,
                });
                for (i, s) in self.plan.steps.iter().enumerate() {
                    self.dispatch(&mut pass, i, s, b);
                }
            }
            let staging = &self.staging[k % 2];
            for (o, buf) in self.plan.outputs.iter().zip(staging) {
                let bytes = (self.plan.values[*o].len() * b * 4) as u64;
                enc.copy_buffer_to_buffer(&self.slots[self.plan.values[*o].slot], 0, buf, 0, bytes);
            }
            let index = self.queue.submit([enc.finish()]);
            let mapped = self.map(staging, b);
            if let Some(p) = pending.take() {
                self.read(p, &mut outputs)?;
            }
            pending = Some(Pending {
                set: k % 2,
                batch: b,
                index,
                mapped,
            });
            start += b;
            k += 1;
        }
        if let Some(p) = pending {
            self.read(p, &mut outputs)?;
        }
        self.check()?;
        Ok(outputs)
    }

    /// Runs `batch` random-free images (zeros) once per step, each step its own submission,
    /// and times them: where the GPU's time goes, by kernel kind.
    pub fn profile(&self, batch: usize, runs: usize) -> Result<Vec<KernelTime>, GpuError> {
        let b = batch.min(self.max_batch).max(1);
        let mut params_batch = self.params_batch.lock().unwrap_or_else(|p| p.into_inner());
        self.write_params(b);
        *params_batch = b;
        let mut by: Vec<KernelTime> = Vec::new();
        for (i, s) in self.plan.steps.iter().enumerate() {
            let mut times = Vec::with_capacity(runs.max(1));
            for _ in 0..runs.max(1) + 1 {
                let mut enc = self
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: None,
                    });
                    self.dispatch(&mut pass, i, s, b);
                }
                let t = Instant::now();
                let index = self.queue.submit([enc.finish()]);
                self.wait(index)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.remove(0); // the first run pays for lazy pipeline work
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            let kernel = s.kernel.name().to_string();
            let gmac = s.macs() as f64 * b as f64 / 1e9;
            match by.iter_mut().find(|k| k.kernel == kernel) {
                Some(k) => {
                    k.steps += 1;
                    k.ms += ms;
                    k.gmac += gmac;
                }
                None => by.push(KernelTime {
                    kernel,
                    steps: 1,
                    ms,
                    gmac,
                }),
            }
        }
        self.check()?;
        by.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(by)
    }

    fn write_params(&self, batch: usize) {
        let mut bytes = vec![0u8; self.params_stride as usize * self.plan.steps.len()];
        for (i, s) in self.plan.steps.iter().enumerate() {
            let at = i * self.params_stride as usize;
            bytes[at..at + PARAMS_BYTES as usize]
                .copy_from_slice(bytemuck::bytes_of(&params(s, batch)));
        }
        self.queue.write_buffer(&self.params, 0, &bytes);
    }

    fn dispatch(&self, pass: &mut wgpu::ComputePass<'_>, i: usize, s: &Step, batch: usize) {
        let p = &self.pipelines;
        let (pipeline, total) = match s.kernel {
            Kernel::Conv(g) => (&p.conv, batch * g.c_out * g.oh * g.ow),
            Kernel::Pool { c, .. } => (&p.pool, batch * c),
            Kernel::Eltwise { len } => (&p.eltwise, batch * len),
            Kernel::MatMul { m, p: q, .. } => {
                pass.set_pipeline(&p.matmul);
                pass.set_bind_group(0, &self.bind_groups[i], &[]);
                let x = ((batch * q) as u64).div_ceil(TILE) as u32;
                let y = (m as u64).div_ceil(TILE) as u32;
                pass.dispatch_workgroups(x, y, 1);
                return;
            }
        };
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &self.bind_groups[i], &[]);
        let (x, y) = grid(total as u64, self.max_dim);
        pass.dispatch_workgroups(x, y, 1);
    }

    fn map(
        &self,
        staging: &[wgpu::Buffer],
        batch: usize,
    ) -> Vec<mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>> {
        self.plan
            .outputs
            .iter()
            .zip(staging)
            .map(|(o, buf)| {
                let (tx, rx) = mpsc::channel();
                let bytes = (self.plan.values[*o].len() * batch * 4) as u64;
                buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
                    let _ = tx.send(r);
                });
                rx
            })
            .collect()
    }

    fn wait(&self, index: wgpu::SubmissionIndex) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map_err(|e| GpuError::Run(e.to_string()))?;
        self.check()
    }

    fn read(&self, p: Pending, outputs: &mut [Vec<f32>]) -> Result<(), GpuError> {
        self.wait(p.index)?;
        for ((rx, buf), (o, out)) in p
            .mapped
            .into_iter()
            .zip(&self.staging[p.set])
            .zip(self.plan.outputs.iter().zip(outputs.iter_mut()))
        {
            let status = self.mapped(&rx)?;
            status.map_err(|e| GpuError::Run(format!("reading results back: {e}")))?;
            let bytes = (self.plan.values[*o].len() * p.batch * 4) as u64;
            {
                let view = buf
                    .get_mapped_range(0..bytes)
                    .map_err(|e| GpuError::Run(format!("reading results back: {e}")))?;
                out.extend_from_slice(bytemuck::cast_slice(&view));
            }
            buf.unmap();
        }
        Ok(())
    }

    /// The result of a `map_async`, polling the device until its callback has run.
    fn mapped(
        &self,
        rx: &mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
    ) -> Result<Result<(), wgpu::BufferAsyncError>, GpuError> {
        for _ in 0..100 {
            match rx.try_recv() {
                Ok(r) => return Ok(r),
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    self.device
                        .poll(wgpu::PollType::Wait {
                            submission_index: None,
                            timeout: Some(std::time::Duration::from_secs(10)),
                        })
                        .map_err(|e| GpuError::Run(e.to_string()))?;
                    self.check()?;
                }
            }
        }
        Err(GpuError::Run("a readback buffer was never mapped".into()))
    }

    fn check(&self) -> Result<(), GpuError> {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(GpuError::Run(std::mem::take(&mut *errors).join("; ")))
        }
    }
}

struct Pending {
    set: usize,
    batch: usize,
    index: wgpu::SubmissionIndex,
    mapped: Vec<mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>>,
}

/// A 2-D grid of 256-thread workgroups covering `total` threads.
fn grid(total: u64, max_dim: u32) -> (u32, u32) {
    let groups = total.div_ceil(WG).max(1);
    let x = groups.min(max_dim as u64);
    (x as u32, groups.div_ceil(x) as u32)
}

/// The largest batch whose buffers and dispatches fit the adapter's limits.
fn max_batch(plan: &Plan, limits: &wgpu::Limits) -> usize {
    let binding = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    let largest = plan.slots.iter().copied().max().unwrap_or(1).max(1) as u64 * 4;
    let mut batch = (binding / largest) as usize;
    let dim = limits.max_compute_workgroups_per_dimension as u64;
    for s in &plan.steps {
        let per_image = match s.kernel {
            // Columns of all images, 64 per workgroup, on one axis. (The other kernels use a
            // 2-D grid of up to dim² workgroups, never the bound.)
            Kernel::MatMul { p, .. } => p as u64,
            _ => 0,
        };
        if let Some(most) = (dim * TILE).checked_div(per_image) {
            batch = batch.min(most as usize);
        }
    }
    // Indices are u32 in the kernels.
    let values = plan.slots.iter().copied().max().unwrap_or(1).max(1);
    batch.min(u32::MAX as usize / values)
}

/// One step's uniform block: `struct Params` in `kernels.wgsl`, field for field and in the
/// same order (every field 4 bytes, so `#[repr(C)]` has no padding; bytemuck's derive checks).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c_in: u32,
    h: u32,
    w: u32,
    c_out: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    pt: u32,
    pl: u32,
    dh: u32,
    dw: u32,
    group_in: u32,
    group_out: u32,
    w_off: u32,
    b_off: u32,
    flags: u32,
    clip_lo: f32,
    clip_hi: f32,
    total: u32,
    len: u32,
    q1: QParams,
    q2: QParams,
    clip2_lo: f32,
    clip2_hi: f32,
    /// The pool's generalised-mean exponent (0 or 1: the plain mean).
    power: u32,
    pad1: u32,
}

/// A quantise/dequantise stage in `Params` (`q1_s, q1_zp, q1_ds, q1_dzp, q1_min, q1_max`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct QParams {
    s: f32,
    zp: f32,
    ds: f32,
    dzp: f32,
    min: f32,
    max: f32,
}

/// `Params::flags` bits: the `const`s of the same names in `kernels.wgsl`.
mod flag {
    pub const BIAS: u32 = 1;
    pub const CLIP: u32 = 2;
    pub const Q1: u32 = 4;
    pub const RESIDUAL: u32 = 8;
    pub const Q2: u32 = 16;
    pub const CLIP2: u32 = 32;
}

impl From<FakeQuant> for QParams {
    fn from(q: FakeQuant) -> QParams {
        QParams {
            s: q.scale,
            zp: q.zero_point,
            ds: q.dq_scale,
            dzp: q.dq_zero_point,
            min: q.qmin,
            max: q.qmax,
        }
    }
}

/// One step's WGSL `Params` for `batch` images.
fn params(s: &Step, batch: usize) -> Params {
    let u = |v: usize| v as u32;
    let mut p = Params {
        n: u(batch),
        w_off: u(s.weights),
        ..Params::default()
    };
    match s.kernel {
        Kernel::Conv(g) => {
            p.c_in = u(g.c_in);
            p.h = u(g.h);
            p.w = u(g.w);
            p.c_out = u(g.c_out);
            p.oh = u(g.oh);
            p.ow = u(g.ow);
            p.kh = u(g.kh);
            p.kw = u(g.kw);
            p.sh = u(g.sh);
            p.sw = u(g.sw);
            p.pt = u(g.pt);
            p.pl = u(g.pl);
            p.dh = u(g.dh);
            p.dw = u(g.dw);
            p.group_in = u(g.c_in / g.groups);
            p.group_out = u(g.c_out / g.groups);
            p.total = u(batch * g.c_out * g.oh * g.ow);
        }
        Kernel::MatMul { m, k, p: cols } => {
            // The matmul kernel reads k as c_in, m as c_out, the columns as oh (ow = 1).
            p.c_in = u(k);
            p.c_out = u(m);
            p.oh = u(cols);
            p.ow = 1;
            p.total = u(batch * m * cols);
        }
        Kernel::Pool { c, hw, power } => {
            p.power = u32::from(power);
            p.c_out = u(c);
            p.total = u(batch * c);
            p.len = u(hw);
        }
        Kernel::Eltwise { len } => {
            p.total = u(batch * len);
            p.len = u(len);
        }
    }
    let e = &s.epilogue;
    if let Some(b) = e.bias {
        p.b_off = u(b);
        p.flags |= flag::BIAS;
    }
    if let Some((lo, hi)) = e.clip {
        p.flags |= flag::CLIP;
        (p.clip_lo, p.clip_hi) = (lo, hi);
    }
    if let Some(q) = e.q1 {
        p.flags |= flag::Q1;
        p.q1 = q.into();
    }
    if e.residual.is_some() {
        p.flags |= flag::RESIDUAL;
    }
    if let Some((lo, hi)) = e.clip2 {
        p.flags |= flag::CLIP2;
        (p.clip2_lo, p.clip2_hi) = (lo, hi);
    }
    if let Some(q) = e.q2 {
        p.flags |= flag::Q2;
        p.q2 = q.into();
    }
    p
}

#[cfg(test)]
mod params_layout {
    use super::*;
    use std::mem::offset_of;

    /// The Rust block and `struct Params` in `kernels.wgsl` must agree field by field: every
    /// WGSL field (all 4 bytes) sits at 4 × its index, and so must the Rust field of that name.
    #[test]
    fn rust_params_mirror_the_wgsl_struct() {
        let wgsl = include_str!("kernels.wgsl");
        let body = wgsl
            .split("struct Params {")
            .nth(1)
            .and_then(|b| b.split('}').next())
            .expect("struct Params in kernels.wgsl");
        let fields: Vec<&str> = body
            .split(',')
            .filter_map(|f| f.split(':').next())
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(fields.len() as u64 * 4, PARAMS_BYTES, "{fields:?}");
        let q = |base: usize, part: &str| {
            base + match part {
                "s" => offset_of!(QParams, s),
                "zp" => offset_of!(QParams, zp),
                "ds" => offset_of!(QParams, ds),
                "dzp" => offset_of!(QParams, dzp),
                "min" => offset_of!(QParams, min),
                "max" => offset_of!(QParams, max),
                other => panic!("unknown Q/DQ field {other}"),
            }
        };
        for (i, name) in fields.iter().enumerate() {
            let at = match *name {
                "n" => offset_of!(Params, n),
                "c_in" => offset_of!(Params, c_in),
                "h" => offset_of!(Params, h),
                "w" => offset_of!(Params, w),
                "c_out" => offset_of!(Params, c_out),
                "oh" => offset_of!(Params, oh),
                "ow" => offset_of!(Params, ow),
                "kh" => offset_of!(Params, kh),
                "kw" => offset_of!(Params, kw),
                "sh" => offset_of!(Params, sh),
                "sw" => offset_of!(Params, sw),
                "pt" => offset_of!(Params, pt),
                "pl" => offset_of!(Params, pl),
                "dh" => offset_of!(Params, dh),
                "dw" => offset_of!(Params, dw),
                "group_in" => offset_of!(Params, group_in),
                "group_out" => offset_of!(Params, group_out),
                "w_off" => offset_of!(Params, w_off),
                "b_off" => offset_of!(Params, b_off),
                "flags" => offset_of!(Params, flags),
                "clip_lo" => offset_of!(Params, clip_lo),
                "clip_hi" => offset_of!(Params, clip_hi),
                "total" => offset_of!(Params, total),
                "len" => offset_of!(Params, len),
                "clip2_lo" => offset_of!(Params, clip2_lo),
                "clip2_hi" => offset_of!(Params, clip2_hi),
                "power" => offset_of!(Params, power),
                "pad1" => offset_of!(Params, pad1),
                n if n.starts_with("q1_") => q(offset_of!(Params, q1), &n[3..]),
                n if n.starts_with("q2_") => q(offset_of!(Params, q2), &n[3..]),
                other => panic!("WGSL field {other} has no Rust twin"),
            };
            assert_eq!(at, i * 4, "field {name}");
        }
        // And the flag bits.
        for (name, bit) in [
            ("BIAS", flag::BIAS),
            ("CLIP", flag::CLIP),
            ("Q1", flag::Q1),
            ("RESIDUAL", flag::RESIDUAL),
            ("Q2", flag::Q2),
            ("CLIP2", flag::CLIP2),
        ] {
            assert!(
                wgsl.contains(&format!("const {name}: u32 = {bit}u;")),
                "flag {name} = {bit} differs from kernels.wgsl"
            );
        }
    }
}
