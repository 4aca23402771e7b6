//! Running a [`Plan`] with wgpu: pipelines, buffers and bind groups made once; per call, the
//! input uploaded, every step dispatched in one compute pass, the outputs copied to staging
//! buffers and read back. Batches larger than the buffers hold run in chunks, and chunk k's
//! readback overlaps chunk k+1's compute (two sets of staging buffers).

use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::lower::{FakeQuant, Kernel, Plan, Step};
use super::GpuError;

/// Bytes of one step's parameters in the uniform buffer (the WGSL `Params`: 40 words).
const PARAMS_BYTES: u64 = 160;
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
            let words = params(s, batch);
            let at = i * self.params_stride as usize;
            bytes[at..at + PARAMS_BYTES as usize].copy_from_slice(bytemuck::cast_slice(&words));
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

impl FakeQuant {
    /// The six `Params` words of a Q/DQ stage, in the WGSL order.
    fn words(&self) -> [u32; 6] {
        [
            self.scale,
            self.zero_point,
            self.dq_scale,
            self.dq_zero_point,
            self.qmin,
            self.qmax,
        ]
        .map(f32::to_bits)
    }
}

/// One step's WGSL `Params` for `batch` images.
fn params(s: &Step, batch: usize) -> [u32; 40] {
    let mut w = [0u32; 40];
    let f = |v: f32| v.to_bits();
    let u = |v: usize| v as u32;
    w[0] = u(batch);
    match s.kernel {
        Kernel::Conv(g) => {
            let geom = [
                g.c_in,
                g.h,
                g.w,
                g.c_out,
                g.oh,
                g.ow,
                g.kh,
                g.kw,
                g.sh,
                g.sw,
                g.pt,
                g.pl,
                g.dh,
                g.dw,
                g.c_in / g.groups,
                g.c_out / g.groups,
            ];
            for (i, v) in geom.into_iter().enumerate() {
                w[1 + i] = u(v);
            }
            w[22] = u(batch * g.c_out * g.oh * g.ow);
        }
        Kernel::MatMul { m, k, p } => {
            w[1] = u(k);
            w[4] = u(m);
            w[5] = u(p);
            w[6] = 1;
            w[22] = u(batch * m * p);
        }
        Kernel::Pool { c, hw } => {
            w[4] = u(c);
            w[22] = u(batch * c);
            w[23] = u(hw);
        }
        Kernel::Eltwise { len } => {
            w[22] = u(batch * len);
            w[23] = u(len);
        }
    }
    let e = &s.epilogue;
    w[17] = u(s.weights);
    let mut flags = 0;
    if let Some(b) = e.bias {
        w[18] = u(b);
        flags |= 1;
    }
    if let Some((lo, hi)) = e.clip {
        flags |= 2;
        w[20] = f(lo);
        w[21] = f(hi);
    }
    if let Some(q) = e.q1 {
        flags |= 4;
        w[24..30].copy_from_slice(&q.words());
    }
    if e.residual.is_some() {
        flags |= 8;
    }
    if let Some((lo, hi)) = e.clip2 {
        flags |= 32;
        w[36] = f(lo);
        w[37] = f(hi);
    }
    if let Some(q) = e.q2 {
        flags |= 16;
        w[30..36].copy_from_slice(&q.words());
    }
    w[19] = flags;
    w
}
