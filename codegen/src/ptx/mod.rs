//! The NVIDIA backend: PTX for sm_80 and later, run on a GPU through cudarc ([`cuda`],
//! `--backend ptx`) or by an interpreter on the CPU ([`sim`], the `attnc-ptxsim` crate,
//! `--backend ptx-sim`), so every example's PTX is checked against the reference without a
//! GPU (`attnc compile --target ptx` prints it).
//!
//! A module holds the derived tensors' passes, the **exact f32 row kernel** `attend` (every
//! spec: a thread per query row and slice of output channels, the reference's semantics)
//! and, when the schedule is tiled and the spec's queries, keys and values are bf16/f16 rows
//! ([`TcPlan`]), the **tensor-core tiled kernel** `attend_tc` ([`tensor`]); each call takes
//! `attend_tc` when its shapes fit ([`PtxArtifact::tensor_cores_fit`]). An f32 spec runs the
//! row kernel unless [`Precision`] lowers its queries, keys and values. Under the chunked
//! schedule (the linear and decay family) the module has the **chunked kernel**
//! `attend_chunked` ([`chunked`]), linear in the keys, taken when the features fit its state
//! ([`crate::schedule::gpu_chunk::MAX_FEATURES`]). Not written yet: tile classes computed on
//! the device, autotuning.
//!
//! Layout ([`Call`]): three parameters, the global addresses of the argument table (the
//! backend-neutral [`crate::host::ArgLayout`] as i32, plus the tile-class table's offset),
//! the inputs (16-byte aligned; f16 and bf16 at 2 bytes per element, everything else at 4;
//! the tile classes after them) and the work buffer (derived tensors, the output).

pub mod chunked;
pub mod cuda;
pub mod emit;
pub mod tensor;
pub use attnc_ptxsim as sim;
pub use cuda::PtxBackend;
pub use tensor::TcPlan;

use crate::host::{ArgLayout, BoundsCheck, Inputs, RunError, RunStart};
use crate::schedule::classes::{TileClassifier, TileGrid};
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
    /// The precision of the queries, keys and values on the device (see [`Precision`]).
    pub precision: Precision,
}

/// What an f32 spec's queries, keys and values are on the device. `Exact` keeps the spec's
/// types (an f32 spec runs the exact row kernel); `Bf16` and `F16` round its f32 queries,
/// keys and values to that type when they are copied to the device, so the tensor-core
/// kernel takes the spec, within [`tensor::lowered_tolerance`] of the f32 reference.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Exact,
    Bf16,
    F16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Precision, String> {
        match s {
            "exact" | "f32" => Ok(Precision::Exact),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            _ => Err(format!("precision `{s}`: exact (the spec's types), bf16 or f16")),
        }
    }
    pub fn dtype(self) -> Option<attnc_ir::DType> {
        match self {
            Precision::Exact => None,
            Precision::Bf16 => Some(attnc_ir::DType::BF16),
            Precision::F16 => Some(attnc_ir::DType::F16),
        }
    }
}

/// `k` with the f32 queries, keys and values declared `dtype` (what the device then holds:
/// the runtime rounds them when it copies them), when its one branch's dot and its value
/// read rows of input tensors (the tensor-core kernel's shape); else `k` unchanged, exact.
/// Lowered before the passes, a spec keeps its bias (the low-rank pass leaves a
/// half-precision dot alone).
pub fn lower_precision(k: &Kernel, dtype: attnc_ir::DType) -> Kernel {
    use attnc_ir::Expr;
    let [br] = k.branches.as_slice() else { return k.clone() };
    let mut found = None;
    crate::schedule::tiled::extract(&br.score, &mut found);
    let (Some(d), Expr::Load(vt, _)) = (found, &k.value) else { return k.clone() };
    let (Expr::Load(qt, _), Expr::Load(kt, _)) = (&d.a, &d.b) else { return k.clone() };
    let names = [qt, kt, vt];
    let mut out = k.clone();
    for t in out.tensors.iter_mut() {
        if t.kind == TensorKind::Input && t.dtype == attnc_ir::DType::F32 && names.contains(&&t.name) {
            t.dtype = dtype;
        }
    }
    out
}

impl Default for PtxOptions {
    fn default() -> Self {
        PtxOptions {
            schedule: ScheduleOptions { tiled: true, chunk: crate::schedule::gpu_chunk::MAX_CHUNK, block_q: tensor::BLOCK_Q, block_k: 32, permute: true },
            arch: "sm_80".into(),
            threads: 128,
            channels: 8,
            precision: Precision::Exact,
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
        let tiles = match (self.schedule.tiled, self.precision) {
            (false, _) => String::new(),
            (true, Precision::Exact) => {
                format!("tensor-core tiles of {}x{} where the spec has bf16/f16 q, k, v, else ", tensor::BLOCK_Q, self.schedule.block_k)
            }
            (true, p) => {
                format!("q, k, v rounded to {} for tensor-core tiles of {}x{}, else ", format!("{p:?}").to_lowercase(), tensor::BLOCK_Q, self.schedule.block_k)
            }
        };
        let chunked = match self.schedule.chunk {
            0 => String::new(),
            c => format!("chunked ({c} keys) for linear attention, "),
        };
        format!("{} {chunked}{tiles}exact f32 row kernel ({} threads per block, {} channels per thread)", self.arch, self.threads, self.channels)
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
    /// `attend_chunked`: the chunked linear form, a CTA per `(b, h)` and value slice; taken
    /// when the call's features fit its state ([`PtxArtifact::chunked_fit`]), else `attend`.
    AttendChunked,
}

impl Entry {
    /// The entry point's name in the module.
    pub fn name(&self) -> String {
        match self {
            Entry::Derive { name, .. } => name.clone(),
            Entry::Attend => "attend".into(),
            Entry::AttendTensor => "attend_tc".into(),
            Entry::AttendChunked => "attend_chunked".into(),
        }
    }
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
    /// [`tensor::MAX_CHANNELS`], the dot's and the output's channels and the rows of
    /// queries, keys and values whole 16-byte chunks (multiples of 8 halves). `Err` says why
    /// `attend` runs instead.
    pub fn tensor_cores_fit(&self, dims: &attnc_ir::Bindings) -> Result<&TcPlan, String> {
        let p = self.tensor.as_ref().map_err(|e| e.clone())?;
        let d = attnc_ir::bind::eval_dims(&p.len, &dims.dims)?;
        if d > tensor::MAX_CHANNELS as i64 {
            return Err(format!("the dot has {d} channels, over the tensor-core kernel's {}", tensor::MAX_CHANNELS));
        }
        let e = dims.extent(&self.kernel.iter.e);
        if d % 8 != 0 || e % 8 != 0 {
            return Err(format!("the dot's {d} channels or the {e} output channels are not a multiple of 8 (16-byte chunks)"));
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

    /// Whether this call runs the chunked kernel: the schedule is chunked and the features
    /// fit its state. `Err` says why `attend` runs instead.
    pub fn chunked_fit(&self, dims: &attnc_ir::Bindings) -> Result<(), String> {
        let cs = self.schedule.chunked().ok_or("the schedule is not chunked")?;
        let dk = attnc_ir::bind::eval_dims(&cs.form.channels.to_expr(), &dims.dims)?;
        let most = crate::schedule::gpu_chunk::MAX_FEATURES;
        if dk > most {
            return Err(format!("{dk} feature channels, over the chunked kernel's state of {most}"));
        }
        Ok(())
    }

    /// The bound the tensor-core kernel states (P rounded; with a lowered precision, the
    /// inputs too); `None` when the module has only the exact row kernel.
    pub fn stated_tolerance(&self) -> Option<Tolerance> {
        let p = self.tensor.as_ref().ok()?;
        Some(if self.options.precision == Precision::Exact { tensor::tolerance(p.dtype) } else { tensor::lowered_tolerance(p.dtype) })
    }

    /// The kernel that runs at `dims`, in words.
    pub fn form(&self, dims: &attnc_ir::Bindings) -> String {
        if let Some(cs) = self.schedule.chunked() {
            return match self.chunked_fit(dims) {
                Ok(()) => format!("chunked linear kernel ({} keys per chunk, exact f32)", cs.chunk),
                Err(why) => format!("exact f32 row kernel ({why})"),
            };
        }
        match self.tensor_cores_fit(dims) {
            Ok(p) => format!(
                "tensor-core tiled kernel ({} mma.sync m16n8k16, {}x{} tiles; the row kernel if a value is NaN or infinite)",
                p.dtype,
                tensor::BLOCK_Q,
                p.block_k
            ),
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
    let lowered;
    let k = match o.precision.dtype() {
        Some(d) => {
            lowered = lower_precision(k, d);
            &lowered
        }
        None => k,
    };
    let tensor = match &s.algorithm {
        Algorithm::Rows => Err("the schedule runs rows (tiled = false, or no separable dot)".to_string()),
        Algorithm::Tiled(ts) => TcPlan::new(k, ts),
        Algorithm::Chunked(_) => Err("the schedule is chunked (linear attention)".to_string()),
    };
    let layout = ArgLayout::new(k);
    // The header names the kernels the module holds (the chunked one only under a chunked
    // schedule).
    let mut shown = o.clone();
    if s.chunked().is_none() {
        shown.schedule.chunk = 0;
    }
    let mut source = format!("// attnc: kernel `{}`, PTX, {}.\n.version 8.0\n.target {}\n.address_size 64\n\n", k.name, shown.describe(), o.arch);
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
    if let Algorithm::Chunked(cs) = &s.algorithm {
        source.push('\n');
        source.push_str(&chunked::attend(k, &layout, cs, o.threads)?);
        entries.push(Entry::AttendChunked);
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
    let most = crate::schedule::gpu_chunk::MAX_CHUNK;
    if o.schedule.chunk > most {
        return Err(format!("the chunked PTX kernel takes at most {most} keys per chunk (got {})", o.schedule.chunk));
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
        Ok(PtxSimKernel { art: a, program, state: CallState::default() })
    }

    fn describe(&self, s: &Schedule, o: &PtxOptions) -> String {
        format!("{s}, {} (interpreted)", o.describe())
    }
}

/// A module loaded into the interpreter.
pub struct PtxSimKernel {
    pub art: PtxArtifact,
    program: sim::Program,
    state: CallState,
}

/// What a loaded module keeps between calls, whatever runs it: the bounds checks, the
/// spec they check, the tile classifier (static masks' classes per shape).
#[derive(Default)]
pub struct CallState {
    pub bounds: BoundsCheck,
    pub bounds_source: Option<Kernel>,
    pub classifier: TileClassifier,
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
        self.state.bounds_source = Some(spec);
    }
    fn stated_tolerance(&self) -> Option<Tolerance> {
        self.art.stated_tolerance()
    }

    fn run_into(&self, st: &Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32]) -> Result<(), RunError> {
        let mut dev = SimDevice { program: &self.program, args: Vec::new(), inp: Vec::new(), buf: Vec::new() };
        run_on(&self.art, &self.state, st, explicit, out, &mut dev)
    }
}

/// Where a module's entries run: the interpreter or a GPU.
pub trait PtxDevice {
    /// Puts the argument table and the inputs on the device, and a zeroed work buffer of
    /// `buf` bytes.
    fn upload(&mut self, args: &[u8], inp: &[u8], buf: usize) -> Result<(), RunError>;
    /// Runs entry `name` on `blocks` blocks of `threads` threads, in order after the last.
    fn launch(&mut self, name: &str, blocks: u32, threads: u32) -> Result<(), RunError>;
    /// `len` bytes of the work buffer from byte `at` (waiting for the launches).
    fn read(&mut self, at: usize, len: usize) -> Result<Vec<u8>, RunError>;
}

/// The interpreter as a device.
struct SimDevice<'p> {
    program: &'p sim::Program,
    args: Vec<u8>,
    inp: Vec<u8>,
    buf: Vec<u8>,
}

impl PtxDevice for SimDevice<'_> {
    fn upload(&mut self, args: &[u8], inp: &[u8], buf: usize) -> Result<(), RunError> {
        (self.args, self.inp, self.buf) = (args.to_vec(), inp.to_vec(), vec![0; buf]);
        Ok(())
    }
    fn launch(&mut self, name: &str, blocks: u32, threads: u32) -> Result<(), RunError> {
        let f = self.program.function(name).map_err(|e| RunError::Device(e.to_string()))?;
        let params = [sim::Memory::address(0), sim::Memory::address(1), sim::Memory::address(2)];
        let mut mem = sim::Memory { buffers: vec![self.args.as_mut_slice(), self.inp.as_mut_slice(), self.buf.as_mut_slice()] };
        f.launch(blocks, threads, &params, &mut mem).map_err(|e| RunError::Device(format!("ptx-sim: {e}")))?;
        Ok(())
    }
    fn read(&mut self, at: usize, len: usize) -> Result<Vec<u8>, RunError> {
        Ok(self.buf[at..at + len].to_vec())
    }
}

/// One launch of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub name: String,
    pub blocks: u32,
    pub threads: u32,
}

/// One call of a module, laid out: the argument table (i32), the inputs (16-byte aligned,
/// halves at 2 bytes), the work buffer's size, and the launches in order (the derive
/// passes, then `attend_tc` where the call's shapes fit it, else `attend`).
pub struct Call {
    pub args: Vec<u8>,
    pub inp: Vec<u8>,
    pub buf: usize,
    pub derives: Vec<Launch>,
    pub attend: Launch,
    /// The output's byte offset in the work buffer.
    pub out_at: usize,
    dims: attnc_ir::Bindings,
    offsets: BTreeMap<String, usize>,
    per_call_bounds: bool,
}

impl Call {
    pub fn new(art: &PtxArtifact, state: &CallState, st: &Inputs, explicit: &BTreeMap<String, i64>, out_len: usize) -> Result<Call, RunError> {
        let k = &art.kernel;
        let (bounds, classifier) = (&state.bounds, &state.classifier);
        let source = state.bounds_source.as_ref().unwrap_or(k);
        let RunStart { dims, per_call_bounds, .. } = RunStart::new(k, &art.schedule, st, explicit, out_len, bounds, source)?;
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
        let table = art.layout.fill(k, &dims, &mut |t| offsets[&t.name] as i64);
        let table: Vec<u32> = table
            .iter()
            .map(|&v| i32::try_from(v).map(|x| x as u32))
            .collect::<Result<_, _>>()
            .map_err(|_| RunError::Device("a size or offset does not fit PTX's 32-bit integers at this shape".into()))?;
        let mut table = table;
        // A NaN or infinite value at a masked key (the tensor cores multiply it by a zero
        // weight) runs the row kernel: see [`crate::host::masks_pairs`].
        let check = crate::host::masks_pairs(k);
        let tc = art.tensor_cores_fit(&dims).ok().filter(|p| !check || crate::host::values_finite(std::slice::from_ref(&p.v.tensor), &st.bufs));
        // The tensor-core kernel's tile classes (one byte per tile, `[slot][query tile][key
        // tile]`) follow the inputs; the table's extra slot holds their byte offset.
        let classes = match tc {
            Some(p) if p.classes => {
                let g = crate::schedule::Grid::of(k, &dims);
                let grid = TileGrid { block_q: tensor::BLOCK_Q as i64, block_k: p.block_k as i64, queries: g.queries, keys: g.keys };
                crate::host::tile_classes(classifier, k, &grid, g.batches, g.heads, &dims, &st.bufs).device_bytes(g.batches, g.heads)
            }
            _ => Vec::new(),
        };
        let cls_at = n_inp.div_ceil(16) * 16;
        table.push(
            u32::try_from(cls_at)
                .ok()
                .filter(|&x| x <= i32::MAX as u32)
                .ok_or_else(|| RunError::Device("the inputs do not fit PTX's 32-bit offsets".into()))?,
        );
        let args = words_to_bytes(&table);
        let mut inp = vec![0u8; if classes.is_empty() { n_inp } else { cls_at + classes.len() }];
        if !classes.is_empty() {
            inp[cls_at..].copy_from_slice(&classes);
        }
        for t in k.inputs() {
            let data = st.bufs[&t.name];
            let half = crate::host::half_width(t);
            let bytes = if half { crate::host::pack_halves(t.dtype, data).iter().flat_map(|x| x.to_le_bytes()).collect() } else { words_to_bytes(data) };
            let size = if half { 2 } else { 4 };
            let at = offsets[&t.name] * size;
            let n = dims.shape(t).iter().product::<usize>() * size;
            inp[at..at + n].copy_from_slice(&bytes[..n]);
        }
        let threads = art.options.threads;
        let grid = |count: usize| u32::try_from(count).map_err(|_| RunError::Device("the grid is too large".into()));
        let mut derives = Vec::new();
        for e in &art.entries {
            if let Entry::Derive { name, tensor, lines_axis } = e {
                let shape = dims.shape(k.tensor(tensor).expect("derived tensor"));
                let count = crate::host::derive_lines(&shape, *lines_axis) as usize;
                derives.push(Launch { name: name.clone(), blocks: grid(count.div_ceil(threads as usize))?, threads });
            }
        }
        let g = &dims;
        let attend = if art.chunked_fit(g).is_ok() {
            let heads = [&k.iter.b, &k.iter.h].iter().map(|x| g.extent(x) as usize).product::<usize>();
            let slices = crate::schedule::gpu_chunk::slices(g.extent(&k.iter.e)) as usize;
            Launch { name: "attend_chunked".into(), blocks: grid(heads * slices)?, threads }
        } else if tc.is_some() {
            let ctas = [&k.iter.b, &k.iter.h].iter().map(|x| g.extent(x) as usize).product::<usize>()
                * (g.extent(&k.iter.i) as usize).div_ceil(tensor::BLOCK_Q)
                * (g.extent(&k.iter.e) as usize).div_ceil(tensor::VALUES);
            Launch { name: "attend_tc".into(), blocks: grid(ctas)?, threads: 32 * tensor::WARPS as u32 }
        } else {
            let rows = [&k.iter.b, &k.iter.h, &k.iter.i].iter().map(|x| g.extent(x) as usize).product::<usize>();
            let slices = (g.extent(&k.iter.e) as usize).div_ceil(art.options.channels as usize);
            Launch { name: "attend".into(), blocks: grid((rows * slices).div_ceil(threads as usize))?, threads }
        };
        let out_at = 4 * offsets[&k.output().name];
        Ok(Call { args, inp, buf: 4 * n_buf, derives, attend, out_at, dims, offsets, per_call_bounds })
    }

    /// After the derive passes: the bounds that depend on derived data (read back from the
    /// device), when the kernel has any.
    pub fn check_bounds(&self, k: &Kernel, state: &CallState, st: &Inputs, dev: &mut dyn PtxDevice) -> Result<(), RunError> {
        let source = state.bounds_source.as_ref().unwrap_or(k);
        if !self.per_call_bounds {
            return Ok(());
        }
        let bytes = dev.read(0, self.buf)?;
        let words: Vec<u32> = bytes.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut bufs: BTreeMap<String, &[u32]> = st.bufs.clone();
        for t in k.derived() {
            let n: usize = self.dims.shape(t).iter().product();
            let at = self.offsets[&t.name];
            bufs.insert(t.name.clone(), &words[at..at + n]);
        }
        BoundsCheck::with_data(source, &self.dims, &bufs)?;
        Ok(())
    }
}

/// Runs a module on `dev`: the call's layout, the derive passes, the data-dependent
/// bounds, the attention entry, the output read back.
pub fn run_on(
    art: &PtxArtifact,
    state: &CallState,
    st: &Inputs,
    explicit: &BTreeMap<String, i64>,
    out: &mut [f32],
    dev: &mut dyn PtxDevice,
) -> Result<(), RunError> {
    let call = Call::new(art, state, st, explicit, out.len())?;
    dev.upload(&call.args, &call.inp, call.buf)?;
    for l in &call.derives {
        dev.launch(&l.name, l.blocks, l.threads)?;
    }
    call.check_bounds(&art.kernel, state, st, dev)?;
    dev.launch(&call.attend.name, call.attend.blocks, call.attend.threads)?;
    let bytes = dev.read(call.out_at, 4 * out.len())?;
    for (x, c) in out.iter_mut().zip(bytes.chunks(4)) {
        *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}
