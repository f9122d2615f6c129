//! The NVIDIA backend's first stage: PTX for sm_80 and later, and an interpreter that runs
//! it on the CPU ([`sim`], the `attnc-ptxsim` crate), so every example's PTX is checked against the reference
//! without a GPU (`attnc run --backend ptx-sim`, `attnc compile --target ptx`).
//!
//! What it emits today is the **exact f32 row kernel** (the schedule's [`Algorithm::Rows`]):
//! a thread per query row and slice of output channels, the normalization's state and the
//! accumulators in registers, the reference's semantics (fully masked rows give zeros, NaN
//! propagates, the maximum is subtracted); derived tensors are passes of their own before
//! it. It is the path an f32 spec runs on by default. Not written yet, and refused with that
//! reason: the tensor-core tiled kernel (`mma.sync`, `ldmatrix`, `cp.async`), the chunked
//! form, tile classes on the device, and the cudarc runtime that launches on a GPU.
//!
//! Layout: three parameters, the global addresses of the argument table (the
//! backend-neutral [`crate::host::ArgLayout`] as i32), the inputs (f16 and bf16 at 2 bytes
//! per element, everything else at 4) and the work buffer (derived tensors, the output).

pub mod emit;
pub mod tensor;
pub use attnc_ptxsim as sim;
pub use tensor::TcPlan;

use crate::host::{ArgLayout, BoundsCheck, Inputs, RunError, RunStart};
use crate::schedule::{Algorithm, Limits, Schedule, ScheduleOptions};
use crate::{Backend, BackendOptions, CodegenError, Compiled, Tolerance};
use attnc_ir::{Kernel, KernelInfo, TensorKind};
use std::collections::BTreeMap;

/// Architectures the emitted PTX targets.
pub const ARCHS: [&str; 3] = ["sm_80", "sm_90", "sm_90a"];

/// The PTX backend's options: the schedule's, the target architecture and the launch shape.
#[derive(Clone, Debug, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PtxOptions {
    #[serde(flatten)]
    pub schedule: ScheduleOptions,
    /// `sm_80`, `sm_90` or `sm_90a` (the `.target` line).
    pub arch: String,
    /// Threads per block (a multiple of 32, at most 1024).
    pub threads: u32,
    /// Output channels each thread accumulates (1 to 32).
    pub channels: u32,
}

impl Default for PtxOptions {
    fn default() -> Self {
        PtxOptions {
            schedule: ScheduleOptions { tiled: true, chunk: 0, block_q: tensor::BLOCK_Q, block_k: 32 },
            arch: "sm_80".into(),
            threads: 128,
            channels: 8,
        }
    }
}

impl BackendOptions for PtxOptions {
    fn schedule(&self) -> &ScheduleOptions {
        &self.schedule
    }
    fn schedule_mut(&mut self) -> &mut ScheduleOptions {
        &mut self.schedule
    }
    fn describe(&self) -> String {
        let tiles = if self.schedule.tiled {
            format!("tensor-core tiles of {}x{} where the spec has bf16/f16 q, k, v, else ", tensor::BLOCK_Q, self.schedule.block_k)
        } else {
            String::new()
        };
        format!("{} {tiles}exact f32 row kernel ({} threads per block, {} channels per thread)", self.arch, self.threads, self.channels)
    }
}

/// An entry point of the module, in launch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `derive_<n>`: derived tensor `tensor`, a thread per element (per line of a prefix sum).
    Derive { name: String, tensor: String, lines_axis: Option<usize> },
    /// `attend`: a thread per query row and channel slice.
    Attend,
    /// `attend_tc`: the tensor-core tiled kernel, a CTA per `(b, h)`, query tile and value
    /// slice; taken when the call's shapes fit it ([`PtxArtifact::tensor_cores_fit`]), else
    /// `attend` runs.
    AttendTensor,
}

/// A kernel's PTX module and what a runtime needs to launch it.
#[derive(Clone, Debug)]
pub struct PtxArtifact {
    pub source: String,
    pub entries: Vec<Entry>,
    pub kernel: Kernel,
    pub schedule: Schedule,
    pub options: PtxOptions,
    pub layout: ArgLayout,
    /// The tensor-core kernel's plan, or why the spec runs the row kernel only.
    pub tensor: Result<TcPlan, String>,
}

impl PtxArtifact {
    /// Whether this call's shapes fit the tensor-core kernel: the dot's channels at most
    /// [`tensor::MAX_CHANNELS`], and the rows of queries, keys and values whole 16-byte
    /// chunks (a multiple of 8 halves). `Err` says why `attend` runs instead.
    pub fn tensor_cores_fit(&self, dims: &attnc_ir::Bindings) -> Result<&TcPlan, String> {
        let p = self.tensor.as_ref().map_err(|e| e.clone())?;
        let d = attnc_ir::bind::eval_dims(&p.len, &dims.dims)?;
        if d > tensor::MAX_CHANNELS as i64 {
            return Err(format!("the dot has {d} channels, over the tensor-core kernel's {}", tensor::MAX_CHANNELS));
        }
        for r in [&p.q, &p.k, &p.v] {
            let t = self.kernel.tensor(&r.tensor).expect("an input");
            let row = dims.extent(t.shape.last().expect("a row"));
            if row % 8 != 0 {
                return Err(format!("`{}` has rows of {row} halves, not whole 16-byte chunks", t.name));
            }
        }
        Ok(p)
    }

    /// The kernel that runs at `dims`, in words.
    pub fn form(&self, dims: &attnc_ir::Bindings) -> String {
        match self.tensor_cores_fit(dims) {
            Ok(p) => format!("tensor-core tiled kernel ({} mma.sync m16n8k16, {}x{} tiles)", p.dtype, tensor::BLOCK_Q, p.block_k),
            Err(why) => format!("exact f32 row kernel ({why})"),
        }
    }
}

impl std::fmt::Display for PtxArtifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// Writes the module for `k` under `s` (the row kernel).
pub fn emit_module(k: &Kernel, s: &Schedule, o: &PtxOptions) -> Result<PtxArtifact, CodegenError> {
    let tensor = match &s.algorithm {
        Algorithm::Rows => Err("the schedule runs rows (tiled = false, or no separable dot)".to_string()),
        Algorithm::Tiled(ts) => TcPlan::new(k, ts),
        Algorithm::Chunked(_) => {
            return Err(CodegenError::Unsupported(format!(
                "the PTX backend has no chunked form yet; the schedule asks for {s} (use chunk = 0: the row kernel runs)"
            )))
        }
    };
    let layout = ArgLayout::new(k);
    let mut source = format!("// attnc: kernel `{}`, PTX, {}.\n.version 8.0\n.target {}\n.address_size 64\n\n", k.name, o.describe(), o.arch);
    let mut entries = Vec::new();
    for (n, t) in k.derived().enumerate() {
        let name = format!("derive_{n}");
        let lines_axis = match &t.kind {
            TensorKind::Derived { def: attnc_ir::TensorDef::Cumsum { axis, .. }, .. } => Some(*axis),
            _ => None,
        };
        source.push_str(&emit::derive(k, &layout, &name, &t.name)?);
        source.push('\n');
        entries.push(Entry::Derive { name, tensor: t.name.clone(), lines_axis });
    }
    source.push_str(&emit::attend(k, &layout, o.channels as usize)?);
    entries.push(Entry::Attend);
    if let Ok(p) = &tensor {
        source.push('\n');
        source.push_str(&tensor::attend(k, &layout, p)?);
        entries.push(Entry::AttendTensor);
    }
    Ok(PtxArtifact { source, entries, kernel: k.clone(), schedule: s.clone(), options: o.clone(), layout, tensor })
}

fn check_options(o: &PtxOptions) -> Result<(), String> {
    if !ARCHS.contains(&o.arch.as_str()) {
        return Err(format!("the PTX target must be one of {} (got {})", ARCHS.join(", "), o.arch));
    }
    if o.threads == 0 || o.threads > 1024 || !o.threads.is_multiple_of(32) {
        return Err(format!("threads per block must be a multiple of 32 up to 1024 (got {})", o.threads));
    }
    if !(1..=32).contains(&o.channels) {
        return Err(format!("channels per thread must be 1 to 32 (got {})", o.channels));
    }
    if o.schedule.chunk > 0 {
        return Err("the PTX backend has no chunked form yet (chunk = 0)".into());
    }
    Ok(())
}

/// The PTX backend run by the interpreter ([`sim`]): slow, for small shapes; it checks the
/// emitted PTX's semantics on any machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct PtxSimBackend;

/// Shared memory per block on sm_80 and later (what a tiled kernel may stage).
pub const SHARED_BYTES: usize = 160 << 10;

impl Backend for PtxSimBackend {
    const NAME: &'static str = "ptx-sim";
    type Options = PtxOptions;
    type Artifact = PtxArtifact;
    type Kernel = PtxSimKernel;

    fn available(&self) -> Result<(), String> {
        Ok(())
    }

    fn device(&self) -> String {
        "ptx-sim:interpreter".into()
    }

    fn limits(&self) -> Limits {
        Limits { task_workspace_bytes: SHARED_BYTES, staged_tiles: true }
    }

    /// `ex2.approx` and `lg2.approx` carry a relative error near 2^-22 on a GPU; the
    /// interpreter rounds them once. The WGSL bound covers both.
    fn tolerance(&self) -> Tolerance {
        Tolerance { atol: 5e-4, rtol: 5e-3 }
    }

    fn check_options(&self, o: &PtxOptions) -> Result<(), String> {
        check_options(o)
    }

    fn emit(&self, k: &Kernel, _info: &KernelInfo, s: &Schedule, o: &PtxOptions) -> Result<PtxArtifact, CodegenError> {
        emit_module(k, s, o)
    }

    fn validate(&self, a: &PtxArtifact) -> Result<(), CodegenError> {
        sim::Program::parse(&a.source).map(|_| ()).map_err(|e| CodegenError::Invalid(format!("the emitted PTX does not parse: {e}")))
    }

    fn load(&self, a: PtxArtifact) -> Result<PtxSimKernel, CodegenError> {
        let program = sim::Program::parse(&a.source).map_err(|e| CodegenError::Invalid(format!("the emitted PTX does not parse: {e}")))?;
        Ok(PtxSimKernel { art: a, program, bounds: BoundsCheck::default(), bounds_source: None })
    }

    fn describe(&self, s: &Schedule, o: &PtxOptions) -> String {
        format!("{s}, {} (interpreted)", o.describe())
    }
}

/// A module loaded into the interpreter.
pub struct PtxSimKernel {
    pub art: PtxArtifact,
    program: sim::Program,
    bounds: BoundsCheck,
    bounds_source: Option<Kernel>,
}

fn words_to_bytes(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Compiled for PtxSimKernel {
    fn kernel(&self) -> &Kernel {
        &self.art.kernel
    }
    fn schedule(&self) -> &Schedule {
        &self.art.schedule
    }
    fn describe(&self) -> String {
        format!("{} ({})", self.art.options.describe(), "interpreted")
    }
    fn set_bounds_source(&mut self, spec: Kernel) {
        self.bounds_source = Some(spec);
    }
    fn stated_tolerance(&self) -> Option<Tolerance> {
        self.art.tensor.as_ref().ok().map(|p| tensor::tolerance(p.dtype))
    }

    fn run_into(&self, st: &Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32]) -> Result<(), RunError> {
        let k = &self.art.kernel;
        let source = self.bounds_source.as_ref().unwrap_or(k);
        let RunStart { dims, per_call_bounds, .. } = RunStart::new(k, &self.art.schedule, st, explicit, out.len(), &self.bounds, source)?;
        // Offsets in elements; the inputs' buffer in bytes (halves take 2).
        let mut offsets: BTreeMap<String, usize> = BTreeMap::new();
        let (mut n_inp, mut n_buf) = (0usize, 0usize);
        for t in &k.tensors {
            let n: usize = dims.shape(t).iter().product();
            if t.kind == TensorKind::Input {
                let size = if crate::host::half_width(t) { 2 } else { 4 };
                // 16-byte aligned: the tensor-core kernel copies rows in 16-byte chunks.
                n_inp = n_inp.div_ceil(16) * 16;
                offsets.insert(t.name.clone(), n_inp / size);
                n_inp += n * size;
            } else {
                offsets.insert(t.name.clone(), n_buf);
                n_buf += n;
            }
        }
        let table = self.art.layout.fill(k, &dims, &mut |t| offsets[&t.name] as i64);
        let table: Vec<u32> = table
            .iter()
            .map(|&v| i32::try_from(v).map(|x| x as u32))
            .collect::<Result<_, _>>()
            .map_err(|_| RunError::Device("a size or offset does not fit PTX's 32-bit integers at this shape".into()))?;
        let mut args = words_to_bytes(&table);
        let mut inp = vec![0u8; n_inp];
        for t in k.inputs() {
            let data = st.bufs[&t.name];
            let bytes = if crate::host::half_width(t) {
                crate::host::pack_halves(t.dtype, data).iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                words_to_bytes(data)
            };
            let at = offsets[&t.name] * if crate::host::half_width(t) { 2 } else { 4 };
            let n = dims.shape(t).iter().product::<usize>() * if crate::host::half_width(t) { 2 } else { 4 };
            inp[at..at + n].copy_from_slice(&bytes[..n]);
        }
        let mut buf = vec![0u8; 4 * n_buf];
        let params = [sim::Memory::address(0), sim::Memory::address(1), sim::Memory::address(2)];
        let threads = self.art.options.threads;
        let launch = |name: &str, count: usize, args: &mut Vec<u8>, inp: &mut Vec<u8>, buf: &mut Vec<u8>| -> Result<(), RunError> {
            let f = self.program.function(name).map_err(|e| RunError::Device(e.to_string()))?;
            // `attend_tc` counts CTAs of its own size; the others count threads.
            let (blocks, threads) = if name == "attend_tc" { (count, 32 * tensor::WARPS as u32) } else { (count.div_ceil(threads as usize), threads) };
            let blocks = u32::try_from(blocks).map_err(|_| RunError::Device("the grid is too large".into()))?;
            let mut mem = sim::Memory { buffers: vec![args.as_mut_slice(), inp.as_mut_slice(), buf.as_mut_slice()] };
            f.launch(blocks, threads, &params, &mut mem).map_err(|e| RunError::Device(format!("ptx-sim: {e}")))?;
            Ok(())
        };
        for e in &self.art.entries {
            if let Entry::Derive { name, tensor, lines_axis } = e {
                let shape = dims.shape(k.tensor(tensor).expect("derived tensor"));
                let count = crate::host::derive_lines(&shape, *lines_axis) as usize;
                launch(name, count, &mut args, &mut inp, &mut buf)?;
            }
        }
        if per_call_bounds {
            let words: Vec<u32> = buf.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let mut bufs: BTreeMap<String, &[u32]> = st.bufs.clone();
            for t in k.derived() {
                let n: usize = dims.shape(t).iter().product();
                let at = offsets[&t.name];
                bufs.insert(t.name.clone(), &words[at..at + n]);
            }
            BoundsCheck::with_data(source, &dims, &bufs)?;
        }
        let g = &dims;
        if self.art.tensor_cores_fit(g).is_ok() {
            let ctas = [&k.iter.b, &k.iter.h].iter().map(|x| g.extent(x) as usize).product::<usize>()
                * (g.extent(&k.iter.i) as usize).div_ceil(tensor::BLOCK_Q)
                * (g.extent(&k.iter.e) as usize).div_ceil(tensor::VALUES);
            launch("attend_tc", ctas, &mut args, &mut inp, &mut buf)?;
        } else {
            let rows = [&k.iter.b, &k.iter.h, &k.iter.i].iter().map(|x| g.extent(x) as usize).product::<usize>();
            let slices = (g.extent(&k.iter.e) as usize).div_ceil(self.art.options.channels as usize);
            launch("attend", rows * slices, &mut args, &mut inp, &mut buf)?;
        }
        let at = 4 * offsets[&k.output().name];
        for (o, c) in out.iter_mut().zip(buf[at..].chunks(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}
