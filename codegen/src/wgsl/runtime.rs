//! The WGSL runtime on wgpu: the adapter (chosen once per process), pipelines, buffers,
//! dispatch and readback. Every wgpu call that can fail runs inside an error scope, so a
//! failure is an error value, never wgpu's panic.

use super::emit::{Entry, WgslArtifact, DERIVE_WORKGROUP};
use crate::host::{bytes, BoundsCheck, Inputs, RunError, RunStart};
use crate::schedule::classes::{TileClassifier, TileGrid};
use crate::schedule::Schedule;
use crate::{CodegenError, Compiled};
use attnc_ir::{Kernel, TensorKind};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The adapter and device every WGSL kernel of the process runs on.
pub struct Gpu {
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    device: wgpu::Device,
    queue: wgpu::Queue,
}

impl Gpu {
    /// `wgsl:<adapter>/<backend>/<driver> <driver info>`: the tuning cache's device key.
    pub fn fingerprint(&self) -> String {
        let i = &self.info;
        format!("wgsl:{}/{:?}/{} {}", i.name, i.backend, i.driver, i.driver_info)
    }

    /// `llvmpipe (LLVM 15.0.6, 256 bits), Vulkan, Cpu`.
    pub fn describe(&self) -> String {
        let i = &self.info;
        format!("{}, {:?}, {:?}", i.name, i.backend, i.device_type)
    }
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// The process's adapter: `$ATTNC_WGPU_ADAPTER` (part of its name) when set, else a discrete
/// GPU first, then an integrated or virtual one, then a CPU adapter such as lavapipe; native
/// APIs (Vulkan, Metal, DX12) before GL. `WGPU_BACKEND` narrows the APIs tried.
pub fn gpu() -> Result<&'static Gpu, String> {
    GPU.get_or_init(open).as_ref().map_err(|e| e.clone())
}

const INSTALL: &str = "install a Vulkan driver (on Debian or Ubuntu `apt-get install mesa-vulkan-drivers libvulkan1` gives lavapipe, which runs on the CPU) or run where a GPU is";

fn open() -> Result<Gpu, String> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let mut adapters: Vec<wgpu::Adapter> = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .filter(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS))
        .collect();
    if adapters.is_empty() {
        return Err(format!("no WebGPU adapter with compute shaders was found: {INSTALL}"));
    }
    if let Ok(want) = std::env::var("ATTNC_WGPU_ADAPTER") {
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&want.to_lowercase()));
        if adapters.is_empty() {
            return Err(format!("ATTNC_WGPU_ADAPTER={want} matches none of the adapters here: {}", names.join(", ")));
        }
    }
    let rank = |a: &wgpu::Adapter| {
        let i = a.get_info();
        let ty = match i.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        let api = match i.backend {
            wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
            _ => 1,
        };
        (ty, api)
    };
    adapters.sort_by_key(rank);
    let adapter = adapters.swap_remove(0);
    let info = adapter.get_info();
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("attnc"),
        required_features: wgpu::Features::empty(),
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|e| format!("the adapter {} refused a device: {e}", info.name))?;
    // Errors outside a scope are reported, never a panic (every call that can fail has a scope).
    device.on_uncaptured_error(std::sync::Arc::new(|e: wgpu::Error| eprintln!("attnc: wgpu error outside an error scope: {e}")));
    Ok(Gpu { info, limits, device, queue })
}

/// A loaded WGSL kernel: its pipelines, in dispatch order.
pub struct WgslKernel {
    art: WgslArtifact,
    gpu: &'static Gpu,
    layout: wgpu::BindGroupLayout,
    /// The `classify` pass's layout: binding 4 (the class table, read-write) instead of 3.
    classify_layout: wgpu::BindGroupLayout,
    pipelines: Vec<wgpu::ComputePipeline>,
    bounds: BoundsCheck,
    bounds_source: Option<Kernel>,
    classifier: TileClassifier,
}

/// Runs `f` in validation and out-of-memory error scopes; the first error they caught.
fn scoped<T>(d: &wgpu::Device, f: impl FnOnce() -> T) -> (T, Option<wgpu::Error>) {
    let oom = d.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let val = d.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let e1 = pollster::block_on(val.pop());
    let e2 = pollster::block_on(oom.pop());
    (out, e1.or(e2))
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Storage { read_only }, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    }
}

impl WgslKernel {
    pub fn load(art: WgslArtifact) -> Result<WgslKernel, CodegenError> {
        let gpu = gpu().map_err(CodegenError::Unsupported)?;
        let d = &gpu.device;
        let ((layout, classify_layout, pipelines), err) = scoped(d, || {
            let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&art.kernel.name),
                source: wgpu::ShaderSource::Wgsl(art.source.as_str().into()),
            });
            let uniform = wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: false, min_binding_size: None },
                count: None,
            };
            let layout = d.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("attnc"),
                entries: &[uniform, storage(1, true), storage(2, false), storage(3, true)],
            });
            let classify_layout = d.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("attnc classify"),
                entries: &[uniform, storage(1, true), storage(2, false), storage(4, false)],
            });
            let pl =
                d.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor { label: Some("attnc"), bind_group_layouts: &[Some(&layout)], immediate_size: 0 });
            let pl_classify = d.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("attnc classify"),
                bind_group_layouts: &[Some(&classify_layout)],
                immediate_size: 0,
            });
            let pipelines = art
                .entries
                .iter()
                .map(|e| {
                    d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(e.name()),
                        layout: Some(if matches!(e, Entry::Classify { .. }) { &pl_classify } else { &pl }),
                        module: &module,
                        entry_point: Some(e.name()),
                        compilation_options: Default::default(),
                        cache: None,
                    })
                })
                .collect();
            (layout, classify_layout, pipelines)
        });
        if let Some(e) = err {
            return Err(CodegenError::Invalid(format!("wgpu refused the WGSL of `{}`: {e}", art.kernel.name)));
        }
        Ok(WgslKernel {
            art,
            gpu,
            layout,
            classify_layout,
            pipelines,
            bounds: BoundsCheck::default(),
            bounds_source: None,
            classifier: TileClassifier::default(),
        })
    }

    /// The WGSL source.
    pub fn source(&self) -> &str {
        &self.art.source
    }

    /// The adapter it runs on, in words.
    pub fn adapter(&self) -> String {
        self.gpu.describe()
    }
}

fn device_err(what: &str, e: impl std::fmt::Display) -> RunError {
    RunError::Device(format!("{what}: {e}"))
}

/// `n` workgroups as an (x, y) grid within the per-dimension limit.
fn grid(n: u64, most: u32) -> Result<(u32, u32), RunError> {
    let x = n.min(most as u64).max(1);
    let y = n.div_ceil(x);
    if y > most as u64 {
        return Err(RunError::Device(format!("{n} workgroups are more than this adapter dispatches ({most} × {most})")));
    }
    Ok((x as u32, y as u32))
}

impl Compiled for WgslKernel {
    fn kernel(&self) -> &Kernel {
        &self.art.kernel
    }

    fn schedule(&self) -> &Schedule {
        &self.art.schedule
    }

    fn describe(&self) -> String {
        format!("{}, workgroup {} on {}", self.art.schedule, self.art.options.workgroup, self.gpu.describe())
    }

    fn set_bounds_source(&mut self, spec: Kernel) {
        self.bounds_source = Some(spec);
    }

    fn run_into(&self, st: &Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32]) -> Result<(), RunError> {
        let k = &self.art.kernel;
        let source = self.bounds_source.as_ref().unwrap_or(k);
        let RunStart { dims, bound, per_call_bounds } = RunStart::new(k, &self.art.schedule, st, explicit, out.len(), &self.bounds, source)?;
        let out_len = out.len();
        let g = bound.grid;
        let o = &self.art.options;
        // The tiled kernel splits wide outputs over workgroups; the row kernel holds a row's
        // channels in one.
        let most_channels = (o.workgroup * o.channels) as i64;
        if self.art.schedule.tiled().is_none() && g.values > most_channels {
            return Err(RunError::Device(format!(
                "{} output channels: this WGSL row kernel holds at most {most_channels} (workgroup {} × {} channels per invocation; raise `channels`)",
                g.values, o.workgroup, o.channels
            )));
        }
        if let crate::schedule::BoundAlgorithm::Chunked(p) = &bound.algorithm {
            if p.dk as i64 > super::MAX_CHUNKED_FEATURES {
                return Err(RunError::Device(format!(
                    "{} feature channels: the chunked WGSL kernel's state holds at most {} (run it with chunk 0: the quadratic kernels)",
                    p.dk,
                    super::MAX_CHUNKED_FEATURES
                )));
            }
        }
        // Offsets (in 4-byte words): inputs in `inp`, derived tensors and the output in `buf`;
        // f16 and bf16 inputs take half a word per element (their table offset counts halves).
        let mut offsets: BTreeMap<String, u64> = BTreeMap::new();
        let (mut n_inp, mut n_buf) = (0u64, 0u64);
        for t in &k.tensors {
            let n = dims.shape(t).iter().map(|&x| x as u64).product::<u64>();
            let at = if t.kind == TensorKind::Input { &mut n_inp } else { &mut n_buf };
            offsets.insert(t.name.clone(), *at);
            *at += if crate::host::half_width(t) { n.div_ceil(2) } else { n };
        }
        let lim = &self.gpu.limits;
        let most = lim.max_storage_buffer_binding_size.min(lim.max_buffer_size);
        for (what, n) in [("the inputs", n_inp), ("the derived tensors and the output", n_buf)] {
            if 4 * n > most {
                return Err(RunError::Device(format!(
                    "{what} need {}, over this adapter's storage buffer limit of {}",
                    bytes(4 * n as u128),
                    bytes(most as u128)
                )));
            }
        }
        let classes = self.classes(st, &dims, &g)?;
        let mut table = self.art.layout.fill(k, &dims, &mut |t| offsets[&t.name] as i64 * if crate::host::half_width(t) { 2 } else { 1 });
        table.resize(self.art.table_len(), 0);
        table[self.art.inf_slot] = f32::INFINITY.to_bits() as i64;
        let table: Vec<i32> = table
            .iter()
            .map(|&v| i32::try_from(v).or_else(|_| u32::try_from(v).map(|u| u as i32)))
            .collect::<Result<_, _>>()
            .map_err(|_| RunError::Device("a size or offset does not fit WGSL's 32-bit integers at this shape".into()))?;

        let d = &self.gpu.device;
        let q = &self.gpu.queue;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let ((args, inp, buf, cls, readback), err) = scoped(d, || {
            let mk = |label, size: u64, usage| {
                d.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: (4 * size).max(4), usage, mapped_at_creation: false })
            };
            let args = mk("args", table.len() as u64, wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST);
            let inp = mk("inputs", n_inp, usage);
            let buf = mk("work", n_buf, usage);
            let cls = mk("tile classes", classes.len() as u64, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST);
            if !classes.is_empty() {
                q.write_buffer(&cls, 0, bytemuck::cast_slice(&classes));
            }
            let readback = mk("readback", out_len as u64, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
            q.write_buffer(&args, 0, bytemuck::cast_slice(&table));
            for t in k.inputs() {
                let data = st.bufs[&t.name];
                if data.is_empty() {
                    continue;
                }
                if crate::host::half_width(t) {
                    let words = crate::host::pack_halves(t.dtype, data);
                    q.write_buffer(&inp, 4 * offsets[&t.name], bytemuck::cast_slice(&words));
                } else {
                    q.write_buffer(&inp, 4 * offsets[&t.name], bytemuck::cast_slice(data));
                }
            }
            (args, inp, buf, cls, readback)
        });
        if let Some(e) = err {
            return Err(device_err("cannot allocate the buffers", e));
        }
        // The class table is binding 3 (read-only) for the attention pass, 4 (read-write)
        // for `classify`.
        let bind = |label, layout: &wgpu::BindGroupLayout, cls_binding: u32| {
            d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: args.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: inp.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: buf.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: cls_binding, resource: cls.as_entire_binding() },
                ],
            })
        };
        let group = bind("attnc", &self.layout, 3);
        let classify_group = bind("attnc classify", &self.classify_layout, 4);
        let most_groups = lim.max_compute_workgroups_per_dimension;
        let dispatch = |enc: &mut wgpu::CommandEncoder, n: usize| -> Result<(), RunError> {
            let (entry, pipe) = (&self.art.entries[n], &self.pipelines[n]);
            let groups = match entry {
                Entry::Derive { tensor, lines_axis, .. } => {
                    let shape = dims.shape(k.tensor(tensor).expect("derived tensor"));
                    let count = crate::host::derive_lines(&shape, *lines_axis);
                    count.div_ceil(DERIVE_WORKGROUP as u64)
                }
                Entry::Classify { .. } => (4 * classes.len() as u64).div_ceil(DERIVE_WORKGROUP as u64),
                Entry::Attend { .. } => match self.art.schedule.tiled() {
                    Some(ts) => (g.batches * g.heads) as u64 * (g.queries as u64).div_ceil(ts.block_q as u64) * super::tiled_slices(o, g.values) as u64,
                    None if self.art.schedule.chunked().is_some() => (g.batches * g.heads * super::chunked_slices(g.values)) as u64,
                    None => (g.batches * g.heads * g.queries) as u64,
                },
            };
            if groups == 0 {
                return Ok(());
            }
            let (x, y) = grid(groups, most_groups)?;
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(entry.name()), timestamp_writes: None });
            pass.set_pipeline(pipe);
            pass.set_bind_group(0, if matches!(entry, Entry::Classify { .. }) { &classify_group } else { &group }, &[]);
            pass.dispatch_workgroups(x, y, 1);
            Ok(())
        };
        let derives = self.art.entries.iter().filter(|e| matches!(e, Entry::Derive { .. })).count();
        let mut enc = d.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("attnc") });
        for n in 0..derives {
            dispatch(&mut enc, n)?;
        }
        if per_call_bounds {
            // The check reads the index tensors' data: inputs from the caller, derived ones
            // from the device once computed, before the attention pass runs.
            let wanted: Vec<String> = attnc_passes::bounds::data_tensors(source)
                .into_iter()
                .filter(|n| k.tensor(n).is_some_and(|t| matches!(t.kind, TensorKind::Derived { .. })))
                .collect();
            let mut derived: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            if !wanted.is_empty() {
                let spans: Vec<(String, u64, u64)> =
                    wanted.iter().map(|n| (n.clone(), offsets[n], dims.shape(k.tensor(n).expect("derived")).iter().map(|&x| x as u64).product())).collect();
                let words = self.submit_read(enc, &buf, &spans)?;
                derived = spans.iter().map(|s| s.0.clone()).zip(words).collect();
                enc = d.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("attnc") });
            }
            let mut bufs: BTreeMap<String, &[u32]> = st.bufs.clone();
            for (n, w) in &derived {
                bufs.insert(n.clone(), w.as_slice());
            }
            BoundsCheck::with_data(source, &dims, &bufs)?;
        }
        // The device's tile classes (masks that read tensors), then the attention pass.
        for n in derives..self.art.entries.len() {
            if matches!(self.art.entries[n], Entry::Classify { .. }) {
                enc.clear_buffer(&cls, 0, None);
            }
            dispatch(&mut enc, n)?;
        }
        let out_at = offsets[&k.output().name];
        let words = self.submit_read_into(enc, &buf, &readback, out_at, out_len as u64)?;
        for (o, w) in out.iter_mut().zip(words) {
            *o = f32::from_bits(w);
        }
        Ok(())
    }
}

impl WgslKernel {
    /// The tile classes the masked branches read, one byte per (row block, key tile) packed
    /// four to a word (empty when no branch has a mask). Static masks are classified on the
    /// host once per shape; a kernel with a mask that reads a tensor (an input or a derived
    /// tensor) has its table computed on the device by `classify` at every call, so here it
    /// is only zeros of the table's size.
    fn classes(&self, st: &Inputs, dims: &attnc_ir::Bindings, g: &crate::schedule::Grid) -> Result<Vec<u32>, RunError> {
        let k = &self.art.kernel;
        if k.branches.iter().all(|b| b.mask.is_none()) {
            return Ok(Vec::new());
        }
        let o = &self.art.options;
        // The tiled kernel's key tiles are `block_k` keys, the row kernel's `workgroup`.
        let block_k = match self.art.schedule.tiled() {
            Some(ts) => ts.block_k as i64,
            None => o.workgroup as i64,
        };
        let grid = TileGrid { block_q: o.schedule.block_q as i64, block_k, queries: g.queries, keys: g.keys };
        if super::emit::device_classes(k, &self.art.schedule, o).is_some() {
            // Computed on the device by `classify`: only the table's size here.
            let deps = crate::schedule::classes::table_deps(k);
            let slots = if deps.b { g.batches } else { 1 } * if deps.h { g.heads } else { 1 };
            let len = slots as u128 * grid.query_tiles() as u128 * k.branches.len() as u128 * grid.key_tiles() as u128;
            if len > i32::MAX as u128 {
                return Err(RunError::Device(format!("{len} tile classes do not fit WGSL's 32-bit indices (raise block_q)")));
            }
            return Ok(vec![0; (len as usize).div_ceil(4)]);
        }
        let table = crate::host::tile_classes(&self.classifier, k, &grid, g.batches, g.heads, dims, &st.bufs);
        let bytes = table.device_bytes(g.batches, g.heads);
        if bytes.len() > i32::MAX as usize {
            return Err(RunError::Device(format!("{} tile classes do not fit WGSL's 32-bit indices (raise block_q)", bytes.len())));
        }
        Ok(bytes.chunks(4).map(|c| c.iter().enumerate().fold(0u32, |w, (n, &x)| w | (x as u32) << (8 * n))).collect())
    }

    /// Submits `enc` after copying `len` words at `at` of `src` into `readback`; waits, and
    /// returns them.
    fn submit_read_into(&self, mut enc: wgpu::CommandEncoder, src: &wgpu::Buffer, readback: &wgpu::Buffer, at: u64, len: u64) -> Result<Vec<u32>, RunError> {
        let d = &self.gpu.device;
        let (res, err) = scoped(d, || {
            if len > 0 {
                enc.copy_buffer_to_buffer(src, 4 * at, readback, 0, 4 * len);
            }
            self.gpu.queue.submit([enc.finish()]);
            if len == 0 {
                return Ok(Vec::new());
            }
            let slice = readback.slice(..4 * len);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            d.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| device_err("waiting for the device", e))?;
            rx.recv().map_err(|e| device_err("reading back", e))?.map_err(|e| device_err("reading back", e))?;
            let words: Vec<u32> = {
                let view = slice.get_mapped_range().map_err(|e| device_err("reading back", e))?;
                bytemuck::cast_slice(&view).to_vec()
            };
            readback.unmap();
            Ok(words)
        });
        if let Some(e) = err {
            return Err(device_err("the device refused the run", e));
        }
        res
    }

    /// Submits `enc` and reads back the spans `(name, at, len)` of `src`.
    fn submit_read(&self, enc: wgpu::CommandEncoder, src: &wgpu::Buffer, spans: &[(String, u64, u64)]) -> Result<Vec<Vec<u32>>, RunError> {
        let lo = spans.iter().map(|s| s.1).min().unwrap_or(0);
        let hi = spans.iter().map(|s| s.1 + s.2).max().unwrap_or(0);
        let readback = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("index data"),
            size: (4 * (hi - lo)).max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let words = self.submit_read_into(enc, src, &readback, lo, hi - lo)?;
        Ok(spans.iter().map(|s| words[(s.1 - lo) as usize..(s.1 - lo + s.2) as usize].to_vec()).collect())
    }
}
