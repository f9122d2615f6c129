//! The CPU backend: Cranelift JIT for the host (x86-64 or aarch64).
//!
//! [`CpuBackend`] implements [`Backend`]: it emits one Cranelift function per entry point of
//! the kernel's [`Schedule`] (`emit`), verifies them, and loads them as machine code
//! ([`CpuKernel`]). [`CpuKernel::run_storage`] binds dims from the input shapes, computes
//! derived tensors, and runs the schedule's algorithm on rayon's thread pool:
//!
//! - the tiled kernel (`tiled`: microkernel matmuls and softmax step, generated f32x4 code
//!   for everything variant-specific, empty tiles skipped) over (head group, query tile);
//! - the row-at-a-time kernel (`gen`: every spec, e.g. GLA's per-channel decay inside the
//!   dot when run quadratically) over (batch, head, rows);
//! - the chunked algorithm (`chunked`) for kernels in the linear-attention normal form of
//!   `attnc_passes::linear`, over (batch, head).
//!
//! What is decided here is only what is CPU-specific: the ISA and its features, the
//! microkernels, Cranelift's optimizer, threads and the rows of a row-kernel task.

mod chunked;
mod emit;
mod gen;
pub mod microkernel;
pub mod peak;
mod tiled;

pub use emit::CpuArtifact;

use crate::host::{derive_tasks, ArgLayout, BoundsCheck, Inputs, RunError, RunStart, Storage};
use crate::schedule::{BoundAlgorithm, Limits, Schedule, ScheduleOptions};
use crate::{Backend, BackendOptions, CodegenError, Compiled, Tolerance};
use attnc_ir::{Bindings, Kernel, KernelInfo, TensorKind};
use cranelift::codegen::{isa, settings};
use cranelift::prelude::*;
use cranelift_jit::JITModule;
use emit::{AttendFn, DeriveFn, PackFn, TileFn};
use std::collections::BTreeMap;

/// Code-generation choices for the CPU (part of the autotune key): the schedule's, and the
/// CPU's own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CpuOptions {
    #[serde(flatten)]
    pub schedule: ScheduleOptions,
    /// Use the FMA extension when the host has it (x86-64). Off: lane-wise `fmaf` calls.
    pub fma: bool,
    /// In the tiled kernel, run the tile matmuls in the `std::arch` microkernel (AVX-512,
    /// AVX2 or portable, detected at run time); off: generated f32x4 loops.
    pub microkernel: bool,
    /// Query rows per parallel task (row kernel).
    pub rows_per_task: usize,
    /// Worker threads (0: rayon's default, one per core).
    pub threads: usize,
    /// Run Cranelift's e-graph optimizer (`opt_level=speed`). Off by default: the generated
    /// code is already hoisted and folded where it matters, and the optimizer was measured to
    /// re-elaborate hoisted loop invariants (a square root and a division) inside the key
    /// loop, which made kernels slower, not faster.
    pub clif_opt: bool,
    /// A softmax with a post-map (two passes) keeps its first pass's weights of full tiles
    /// for the second when the schedule allows ([`crate::schedule::BoundTiled::keep_weights`]);
    /// off: the second pass computes the scores again.
    pub keep_weights: bool,
    /// The microkernels' instruction set (None: the widest the host has); one the host
    /// lacks is refused at compile time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isa: Option<microkernel::Isa>,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            schedule: ScheduleOptions::default(),
            fma: true,
            microkernel: true,
            rows_per_task: 16,
            threads: 0,
            clif_opt: false,
            keep_weights: true,
            isa: None,
        }
    }
}

impl CpuOptions {
    /// The defaults with these schedule options.
    pub fn with_schedule(schedule: ScheduleOptions) -> CpuOptions {
        CpuOptions { schedule, ..CpuOptions::default() }
    }
}

impl BackendOptions for CpuOptions {
    fn schedule(&self) -> &ScheduleOptions {
        &self.schedule
    }
    fn schedule_mut(&mut self) -> &mut ScheduleOptions {
        &mut self.schedule
    }
    fn describe(&self) -> String {
        let s = &self.schedule;
        let sorted = if s.permute { "" } else { ", permute=false" };
        let isa = self.isa.map(|i| format!(", isa={i}")).unwrap_or_default();
        format!("tiled={}, microkernel={}, fma={}, tiles={}x{}, chunk={}{sorted}{isa}", s.tiled, self.microkernel, self.fma, s.block_q, s.block_k, s.chunk)
    }
}

/// The host's vector features, as detected at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFeatures {
    pub arch: &'static str,
    pub flags: Vec<&'static str>,
}

impl HostFeatures {
    pub fn detect() -> HostFeatures {
        #[allow(unused_mut)]
        let mut flags = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            for (f, on) in [
                ("sse4.1", std::arch::is_x86_feature_detected!("sse4.1")),
                ("avx", std::arch::is_x86_feature_detected!("avx")),
                ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                ("fma", std::arch::is_x86_feature_detected!("fma")),
                ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ] {
                if on {
                    flags.push(f);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        flags.extend(["neon"]);
        HostFeatures { arch: std::env::consts::ARCH, flags }
    }
    pub fn has(&self, f: &str) -> bool {
        self.flags.contains(&f)
    }
    /// `cpu:x86_64+avx+avx2+fma`: the device fingerprint for cache keys.
    pub fn fingerprint(&self) -> String {
        format!("cpu:{}+{}", self.arch, self.flags.join("+"))
    }
}

/// Builds the host ISA (features detected by Cranelift) with the options applied.
pub fn host_isa(o: &CpuOptions) -> Result<isa::OwnedTargetIsa, CodegenError> {
    let mut shared = settings::builder();
    let set = |b: &mut settings::Builder, k: &str, v: &str| b.set(k, v).map_err(|e| CodegenError::Emit(format!("cranelift setting {k}: {e}")));
    set(&mut shared, "opt_level", if o.clif_opt { "speed" } else { "none" })?;
    set(&mut shared, "is_pic", "false")?;
    set(&mut shared, "use_colocated_libcalls", "false")?;
    let mut ib = cranelift_native::builder().map_err(|e| CodegenError::Unsupported(format!("host ISA: {e}")))?;
    if !o.fma && cfg!(target_arch = "x86_64") {
        ib.set("has_fma", "false").map_err(|e| CodegenError::Emit(format!("has_fma: {e}")))?;
    }
    ib.finish(settings::Flags::new(shared)).map_err(|e| CodegenError::Emit(format!("ISA: {e}")))
}

/// The x86-64 ISA used for machine-code snapshots: fixed flags (SSE4.1, AVX, AVX2 and, with
/// `o.fma`, FMA), never host detection, so snapshots are the same on every machine.
pub fn fixed_x86_isa(o: &CpuOptions) -> Result<isa::OwnedTargetIsa, CodegenError> {
    let mut shared = settings::builder();
    for (k, v) in [("opt_level", if o.clif_opt { "speed" } else { "none" }), ("is_pic", "false"), ("use_colocated_libcalls", "false")] {
        shared.set(k, v).map_err(|e| CodegenError::Emit(format!("{k}: {e}")))?;
    }
    let mut ib = isa::lookup_by_name("x86_64").map_err(|e| CodegenError::Unsupported(format!("x86_64 backend: {e}")))?;
    let mut flags = vec!["has_sse3", "has_ssse3", "has_sse41", "has_sse42", "has_avx", "has_avx2", "has_popcnt"];
    if o.fma {
        flags.push("has_fma");
    }
    for f in flags {
        ib.enable(f).map_err(|e| CodegenError::Emit(format!("{f}: {e}")))?;
    }
    ib.finish(settings::Flags::new(shared)).map_err(|e| CodegenError::Emit(format!("ISA: {e}")))
}

/// Which ISA the backend compiles for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetIsa {
    /// The host, with the features Cranelift detects.
    Host,
    /// [`fixed_x86_isa`]: for machine-code snapshots, the same on every machine.
    FixedX86,
}

/// The CPU backend as a [`Backend`]: emits, verifies and JIT-loads Cranelift functions.
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    pub isa: TargetIsa,
    /// Keep each function's disassembled machine code ([`CpuKernel::asm`]).
    pub disasm: bool,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend { isa: TargetIsa::Host, disasm: false }
    }
}

/// The host's cores.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most worker threads a kernel may use: 4 × the cores, or 64 on small machines.
pub fn max_threads() -> usize {
    (4 * cores()).max(64)
}

/// Bytes of tile workspace one worker may use (a tile of 1024 × 1024 at 128 channels needs
/// under 6 MiB; larger tiles only waste memory).
pub const TASK_WORKSPACE_BYTES: usize = 256 << 20;

impl Backend for CpuBackend {
    const NAME: &'static str = "cpu";
    type Options = CpuOptions;
    type Artifact = CpuArtifact;
    type Kernel = CpuKernel;

    fn available(&self) -> Result<(), String> {
        Ok(())
    }
    fn device(&self) -> String {
        HostFeatures::detect().fingerprint()
    }
    fn limits(&self) -> Limits {
        Limits { task_workspace_bytes: TASK_WORKSPACE_BYTES, staged_tiles: false }
    }
    fn tolerance(&self) -> Tolerance {
        Tolerance::F32
    }
    fn check_options(&self, o: &CpuOptions) -> Result<(), String> {
        let most = max_threads();
        if o.threads > most {
            return Err(format!("{} threads: at most {most} here (4 × the {} cores, or 64); more threads than cores only add switching", o.threads, cores()));
        }
        if o.rows_per_task == 0 || o.rows_per_task > 1 << 20 {
            return Err(format!("rows per task must be 1 to {} (got {})", 1 << 20, o.rows_per_task));
        }
        Ok(())
    }
    fn emit(&self, k: &Kernel, _info: &KernelInfo, s: &Schedule, o: &CpuOptions) -> Result<CpuArtifact, CodegenError> {
        let isa = match self.isa {
            TargetIsa::Host => host_isa(o)?,
            TargetIsa::FixedX86 => fixed_x86_isa(o)?,
        };
        emit::emit(k, s, o, isa)
    }
    fn validate(&self, a: &CpuArtifact) -> Result<(), CodegenError> {
        emit::validate(a)
    }
    fn load(&self, a: CpuArtifact) -> Result<CpuKernel, CodegenError> {
        emit::load(a, self.disasm)
    }
    fn describe(&self, s: &Schedule, o: &CpuOptions) -> String {
        describe(s, o)
    }

    /// Plans, emits, validates and loads; a tiled kernel whose mask has class equalities
    /// also gets its sorted form ([`crate::schedule::permute`]), compiled alike.
    fn compile(&self, k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<CpuKernel, CodegenError> {
        let s = self.plan(k, info, o)?;
        let a = self.emit(k, info, &s, o)?;
        self.validate(&a)?;
        let mut kern = self.load(a)?;
        if s.tiled().is_some() && o.schedule.permute {
            if let Some(p) = crate::schedule::permute::rewrite(k) {
                let info = attnc_ir::verify(&p.kernel).map_err(|e| CodegenError::Unsupported(format!("the sorted form of the kernel: {e}")))?;
                let sorted = self.plan(&p.kernel, &info, o)?;
                if sorted.tiled().is_some() {
                    let a = self.emit(&p.kernel, &info, &sorted, o)?;
                    self.validate(&a)?;
                    let mut inner = self.load(a)?;
                    inner.bounds_source = Some(k.clone());
                    kern.permuted = Some(Box::new(Permuted { permutation: p, kernel: inner, orders: Default::default() }));
                }
            }
        }
        Ok(kern)
    }
}

/// A kernel's sorted form ([`crate::schedule::permute`]) and the orders of the shapes it
/// ran at.
struct Permuted {
    permutation: crate::schedule::permute::Permutation,
    kernel: CpuKernel,
    /// Per dims: the four order inputs, or none where nothing reorders.
    orders: std::sync::Mutex<BTreeMap<BTreeMap<String, i64>, Option<OrderInputs>>>,
}

/// The four order inputs of one shape ([`crate::schedule::permute::Orders::inputs`]).
type OrderInputs = std::sync::Arc<[(&'static str, Vec<u32>); 4]>;

impl Permuted {
    /// The orders at these dims (computed once per shape; the last few shapes are kept).
    fn orders(&self, dims: &Bindings, n: usize, m: usize) -> Option<OrderInputs> {
        if let Some(o) = self.orders.lock().unwrap_or_else(|e| e.into_inner()).get(&dims.dims) {
            return o.clone();
        }
        let made = self.permutation.orders(&dims.dims, n, m).map(|o| std::sync::Arc::new(o.inputs()));
        let mut kept = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        *crate::host::shape_entry(&mut kept, dims.dims.clone()) = made.clone();
        made
    }

    /// Runs the sorted kernel on `st` and the orders, and puts the output rows (and the
    /// saved statistics) back in the queries' order.
    fn run(
        &self,
        st: &Inputs,
        explicit: &BTreeMap<String, i64>,
        out: &mut [f32],
        stats: Option<&mut [f32]>,
        dims: &Bindings,
        orders: &[(&'static str, Vec<u32>); 4],
    ) -> Result<(), RunError> {
        use crate::schedule::permute::scatter_rows;
        let mut ins = Inputs { shapes: st.shapes.clone(), bufs: st.bufs.clone() };
        for (name, v) in orders {
            ins.shapes.insert(name.to_string(), vec![v.len()]);
            ins.bufs.insert(name.to_string(), v.as_slice());
        }
        let mut sorted = vec![0f32; out.len()];
        let mut sorted_stats = stats.as_ref().map(|s| vec![0f32; s.len()]);
        self.kernel.run_inner(&ins, explicit, &mut sorted, sorted_stats.as_deref_mut())?;
        let pq = &orders[0].1;
        let k = &self.kernel.kernel;
        let shape = dims.shape(k.output());
        let axis = k.out.iter().position(|v| v == "i").expect("the output has a query axis");
        let (outer, inner) = (shape[..axis].iter().product(), shape[axis + 1..].iter().product());
        scatter_rows(&sorted, out, outer, shape[axis], inner, pq);
        if let (Some(s), Some(sorted)) = (stats, sorted_stats) {
            // Statistics are [B, H, N, branches].
            let sshape = attnc_ir::reference::stats_shape(k, dims);
            scatter_rows(&sorted, s, sshape[0] * sshape[1], sshape[2], sshape[3], pq);
        }
        Ok(())
    }
}

/// CLIF and disassembled machine code (VCode) of every generated function for this host.
pub fn emit_host(k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<(String, Vec<(String, String)>), CodegenError> {
    let kern = CpuBackend { isa: TargetIsa::Host, disasm: true }.compile(k, info, o)?;
    Ok((kern.clif_text(), kern.asm))
}

/// CLIF and disassembled machine code of every generated function, on [`fixed_x86_isa`].
pub fn emit_fixed_x86(k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<(String, Vec<(String, String)>), CodegenError> {
    let kern = CpuBackend { isa: TargetIsa::FixedX86, disasm: true }.compile(k, info, o)?;
    Ok((kern.clif_text(), kern.asm))
}

/// The loaded entry points of a kernel's algorithm.
enum Path {
    Rows(AttendFn),
    Tiled { pack: PackFn, tile: TileFn },
    Chunked,
}

/// A JIT-compiled kernel, ready to run.
pub struct CpuKernel {
    kernel: Kernel,
    schedule: Schedule,
    layout: ArgLayout,
    path: Path,
    derives: Vec<(String, DeriveFn)>,
    options: CpuOptions,
    /// A pool of `options.threads` workers (none: rayon's global pool).
    pool: Option<rayon::ThreadPool>,
    /// Tile classes of static masks, computed once per shape.
    classifier: crate::schedule::classes::TileClassifier,
    /// Index bounds, checked once per shape when no index reads data.
    bounds: BoundsCheck,
    /// The kernel the bounds are checked on (the spec as written), when given.
    bounds_source: Option<Kernel>,
    /// The float tensors the values read where a mask hides pairs from the tiled kernel's
    /// matmuls ([`crate::host::masked_value_tensors`]).
    value_tensors: Vec<String>,
    /// The row kernel of the same spec, compiled on the first call whose values hold a NaN or
    /// an infinity (the tiled kernel would spread it to masked pairs).
    row_fallback: std::sync::OnceLock<Result<Box<CpuKernel>, CodegenError>>,
    /// The derived tensors' buffers of the last call, by tensor, reused by the next (fresh
    /// pages cost a fault each: a quarter of a chunked call's time at N = 8192). The derive
    /// functions write every element, so a reused buffer is not cleared.
    derived_pool: std::sync::Mutex<BTreeMap<String, Vec<u32>>>,
    /// The tiled kernel's key/value packs and task workspaces, kept from call to call: a
    /// fresh one is cleared, and at a decode step's shapes (one query row, many keys) the
    /// clearing and page faults of a 2 MiB pack per head group took a third of the call.
    scratch: Scratch,
    /// The kernel over queries and keys sorted by the mask's classes, run at the shapes
    /// where that reorders them ([`crate::schedule::permute`]).
    permuted: Option<Box<Permuted>>,
    /// Owns the machine code the function pointers point into.
    _module: JITModule,
    /// Each function's CLIF, as emitted.
    pub clif: Vec<(String, String)>,
    /// Each function's disassembled machine code, when the backend kept it.
    pub asm: Vec<(String, String)>,
}

// The JIT module is only kept alive, never mutated after `finalize_definitions`; the
// functions are pure code reading their arguments, so they can be called from any thread.
unsafe impl Send for CpuKernel {}
unsafe impl Sync for CpuKernel {}

impl CpuKernel {
    /// Compiles for the host (the CPU backend's plan, emit, validate and load).
    pub fn compile(k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<CpuKernel, CodegenError> {
        CpuBackend::default().compile(k, info, o)
    }

    /// The CLIF of every function, as the artifact prints it.
    pub fn clif_text(&self) -> String {
        self.clif.iter().map(|(name, text)| format!("; {name}\n{text}\n")).collect()
    }

    /// Runs on named inputs (f64 values, rounded to the tensors' storage types).
    pub fn run(
        &self,
        inputs: &BTreeMap<String, attnc_ir::reference::Tensor>,
        explicit: &BTreeMap<String, i64>,
    ) -> Result<attnc_ir::reference::Tensor, RunError> {
        Compiled::run(self, inputs, explicit)
    }

    /// Runs on inputs already in storage form (what benchmarks time); returns the output's
    /// shape and f32 values.
    pub fn run_storage(&self, st: &Storage, explicit: &BTreeMap<String, i64>) -> Result<(Vec<usize>, Vec<f32>), RunError> {
        Compiled::run_storage(self, st, explicit)
    }

    /// Which algorithm runs, in words (for `bench` and `explain`).
    pub fn describe(&self) -> String {
        Compiled::describe(self)
    }
}

impl Compiled for CpuKernel {
    fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    fn set_bounds_source(&mut self, spec: Kernel) {
        if let Some(p) = &mut self.permuted {
            p.kernel.bounds_source = Some(spec.clone());
        }
        self.bounds_source = Some(spec);
    }

    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn describe(&self) -> String {
        let sorted = if self.permuted.is_some() { ", tokens sorted by the mask's classes where that reorders them" } else { "" };
        format!("{}{sorted}", describe(&self.schedule, &self.options))
    }

    fn run_into(&self, st: &Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32]) -> Result<(), RunError> {
        self.run_inner(st, explicit, out, None)
    }

    fn run_stats_into(&self, st: &Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32], stats: &mut [f32]) -> Result<(), RunError> {
        self.run_inner(st, explicit, out, Some(stats))
    }
}

impl CpuKernel {
    /// [`Compiled::run_into`], writing the saved statistics into `stats` when given.
    fn run_inner(&self, st: &Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32], mut stats: Option<&mut [f32]>) -> Result<(), RunError> {
        let k = &self.kernel;
        let source = self.bounds_source.as_ref().unwrap_or(k);
        let RunStart { dims, bound, per_call_bounds } = RunStart::new(k, &self.schedule, st, explicit, out.len(), &self.bounds, source)?;
        if let Some(sb) = stats.as_deref() {
            let want: usize = attnc_ir::reference::stats_shape(k, &dims).iter().product();
            if sb.len() != want {
                return Err(RunError::Input {
                    name: "stats".into(),
                    why: format!("the statistics buffer holds {} values, the statistics have {want}", sb.len()),
                });
            }
        }
        if let Some(p) = &self.permuted {
            let g = bound.grid;
            if let Some(o) = p.orders(&dims, g.queries as usize, g.keys as usize) {
                return p.run(st, explicit, out, stats, &dims, &o);
            }
        }
        self.check_memory(&dims, &bound)?;
        // Derived tensors get the last call's buffers (or fresh ones); inputs are read in
        // place, the output written in place (the kernels write through the frame's addresses).
        let mut owned: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut pool = std::mem::take(&mut *self.derived_pool.lock().unwrap_or_else(|e| e.into_inner()));
        for t in k.derived() {
            let n: usize = dims.shape(t).iter().product::<usize>().max(1);
            let mut b = pool.remove(&t.name).unwrap_or_default();
            if b.len() < n {
                b.resize(n, 0);
            } else {
                b.truncate(n);
            }
            owned.insert(t.name.clone(), b);
        }
        drop(pool);
        // SAFETY: f32 and u32 have one size and alignment; the kernels write every element.
        let out_bits: &[u32] = unsafe { std::slice::from_raw_parts(out.as_mut_ptr() as *const u32, out.len()) };
        let bufs: BTreeMap<String, &[u32]> = k
            .tensors
            .iter()
            .map(|t| {
                let b = match t.kind {
                    TensorKind::Input => st.bufs[&t.name],
                    TensorKind::Output => out_bits,
                    TensorKind::Derived { .. } => owned[&t.name].as_slice(),
                };
                (t.name.clone(), b)
            })
            .collect();
        let mut frame = self.layout.fill(k, &dims, &mut |t| bufs[&t.name].as_ptr() as i64);
        let stats_ptr = stats.as_deref_mut().map(|s| SendPtr(s.as_mut_ptr() as *const f32));
        if let (Some(slot), Some(p)) = (self.layout.stats, stats_ptr) {
            frame[slot] = p.get() as i64;
        }
        if let (Some(slot), BoundAlgorithm::Tiled(t)) = (self.layout.kept, &bound.algorithm) {
            frame[slot] = self.keeps_weights(t) as i64;
        }
        let fp = FramePtr(frame.as_ptr());
        let work = || -> Result<bool, RunError> {
            use rayon::prelude::*;
            for (name, f) in &self.derives {
                let t = k.tensor(name).expect("derived tensor");
                let f = *f;
                let tasks = derive_tasks(t, &dims.shape(t));
                // SAFETY: the frame describes live buffers of the bound shapes; tasks write
                // disjoint ranges (a prefix sum along the first axis is one task).
                tasks.par_iter().for_each(|&(lo, hi)| unsafe { f(fp.get(), lo, hi) });
            }
            if per_call_bounds {
                BoundsCheck::with_data(source, &dims, &bufs)?;
            }
            if matches!(self.path, Path::Tiled { .. }) && !crate::host::values_finite(&self.value_tensors, &bufs) {
                return Ok(false);
            }
            match (&self.path, &bound.algorithm) {
                (Path::Rows(attend), BoundAlgorithm::Rows) => {
                    let g = bound.grid;
                    let step = self.options.rows_per_task.max(1) as i64;
                    let tasks: Vec<(i64, i64, i64)> =
                        (0..g.batches).flat_map(|b| (0..g.heads).flat_map(move |h| (0..g.queries).step_by(step as usize).map(move |i| (b, h, i)))).collect();
                    let (attend, ni, ev) = (*attend, g.queries, g.values as usize);
                    tasks.par_iter().for_each_init(
                        || vec![0f32; 2 * ev.max(1)],
                        |ws, &(b, h, i)| {
                            // SAFETY: tasks write disjoint output rows; ws holds 2·Ev floats.
                            unsafe { attend(fp.get(), b, h, i, (i + step).min(ni), ws.as_mut_ptr()) };
                        },
                    );
                }
                (Path::Tiled { pack, tile }, BoundAlgorithm::Tiled(t)) => self.run_tiled(*pack, *tile, t, &dims, &bufs, fp),
                (Path::Chunked, BoundAlgorithm::Chunked(plan)) => {
                    let out = bufs[&k.output().name].as_ptr() as *mut f32;
                    self.run_chunked(plan, &bound.grid, &bufs, out, stats_ptr)
                }
                _ => unreachable!("the loaded entry points follow the schedule"),
            }
            Ok(true)
        };
        let done = match &self.pool {
            Some(p) => p.install(work),
            None => work(),
        };
        drop(bufs);
        // The buffers go back for the next call (a concurrent call may have left its own:
        // keep one set).
        let mut pool = self.derived_pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.is_empty() {
            *pool = owned;
        }
        drop(pool);
        let done = done?;
        if done {
            return Ok(());
        }
        self.row_fallback()?.run_inner(st, explicit, out, stats)
    }
}

/// `tiled 64x64, Avx2 microkernel`, `row kernel`, `chunked linear attention, …`.
fn describe(s: &Schedule, o: &CpuOptions) -> String {
    match s.tiled() {
        Some(_) => {
            let isa = microkernel::Isa::resolve(o.isa).unwrap_or(microkernel::Isa::Portable);
            let mk = if o.microkernel { format!("{isa:?} microkernel") } else { "generated f32x4 matmuls".into() };
            format!("{s}, {mk}")
        }
        None => s.to_string(),
    }
}

impl CpuKernel {
    /// Whether a call has run on the row kernel instead of the tiled one (values that are not
    /// all finite where a mask hides pairs: [`crate::host::masked_value_tensors`]).
    pub fn has_fallen_back_to_rows(&self) -> bool {
        self.row_fallback.get().is_some()
    }

    /// The row kernel of this spec (compiled once, on first use): it skips masked pairs, so
    /// a NaN or an infinity among the values reaches only the rows that keep its key.
    fn row_fallback(&self) -> Result<&CpuKernel, RunError> {
        let made = self.row_fallback.get_or_init(|| {
            let s = Schedule { algorithm: crate::schedule::Algorithm::Rows, limits: self.schedule.limits };
            let a = emit::emit(&self.kernel, &s, &self.options, host_isa(&self.options)?)?;
            emit::validate(&a)?;
            let mut rows = emit::load(a, false)?;
            rows.bounds_source = self.bounds_source.clone();
            Ok(Box::new(rows))
        });
        made.as_deref().map_err(|e| RunError::Device(format!("the row kernel (for values that are not all finite): {e}")))
    }

    /// Whether the tiled kernel keeps a two-pass softmax's first-pass weights at these dims.
    fn keeps_weights(&self, t: &crate::schedule::BoundTiled) -> bool {
        t.keep_weights && self.options.keep_weights
    }

    /// Refuses a run that would need more memory than the host has (or `ATTNC_MAX_MEMORY`
    /// allows), before allocating: derived tensors and the output, and the tiled kernel's
    /// per-worker workspaces and per-group packs.
    fn check_memory(&self, dims: &Bindings, bound: &crate::schedule::Bound) -> Result<(), RunError> {
        let k = &self.kernel;
        let elems = |t: &attnc_ir::TensorDecl| dims.shape(t).iter().map(|&n| n as u128).product::<u128>();
        let derived: u128 = k.derived().map(|t| 4 * elems(t)).sum();
        let output = 4 * elems(k.output());
        let threads = self.pool.as_ref().map_or_else(rayon::current_num_threads, |p| p.current_num_threads()) as u128;
        let (mut work, mut packs) = (0u128, 0u128);
        if let (crate::schedule::BoundAlgorithm::Tiled(t), Some(ts)) = (&bound.algorithm, self.schedule.tiled()) {
            let kept = if self.keeps_weights(t) { 4 * ts.workspace.kept_floats(bound.grid.keys) } else { 0 };
            work = threads * (ts.workspace.task_bytes(t.channels, bound.grid.values) + kept);
            let (kt, vb) = ts.workspace.pack_floats(bound.grid.keys, t.channels, bound.grid.values);
            packs = 4 * (kt + vb) * threads.min(t.groups.len() as u128);
        }
        crate::host::check_memory(&[
            ("for the output", output),
            ("for derived tensors", derived),
            ("for tile workspaces", work),
            ("for key/value packs", packs),
        ])
    }

    /// Runs the chunked algorithm over every (batch, head) in parallel, reading the
    /// materialized operands and writing the output through `out`.
    fn run_chunked(&self, plan: &chunked::Plan, g: &crate::schedule::Grid, bufs: &BTreeMap<String, &[u32]>, out: *mut f32, stats: Option<SendPtr<f32>>) {
        use attnc_passes::linear::{Decay, FK, FQ, GATE, LK, LQ, VAL};
        use rayon::prelude::*;
        let form = &self.schedule.chunked().expect("a chunked schedule").form;
        let (nb, nh) = (g.batches as usize, g.heads as usize);
        let (n, m, dk, dv) = (plan.n, plan.m, plan.dk, plan.dv);
        let f32s = |name: &str| -> &[f32] {
            let b = bufs[name];
            // SAFETY: derived tensors are f32 buffers stored as their bits.
            unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len()) }
        };
        let (fq, fk, v) = (f32s(FQ), f32s(FK), f32s(VAL));
        let (lq, lk): (&[f32], &[f32]) = if form.decay == Decay::None { (&[], &[]) } else { (f32s(LQ), f32s(LK)) };
        let gate = form.gate.then(|| f32s(GATE));
        let lw = if form.decay == Decay::Channel { dk } else { 1 };
        let out = SendPtr(out as *const f32);
        let heads: Vec<(usize, usize)> = (0..nb).flat_map(|b| (0..nh).map(move |h| (b, h))).collect();
        heads.par_iter().for_each(|&(b, h)| {
            let bh = b * nh + h;
            let head = chunked::Head {
                fq: &fq[bh * n * dk..(bh + 1) * n * dk],
                fk: &fk[bh * m * dk..(bh + 1) * m * dk],
                lq: if lq.is_empty() { lq } else { &lq[bh * n * lw..(bh + 1) * n * lw] },
                lk: if lk.is_empty() { lk } else { &lk[bh * m * lw..(bh + 1) * m * lw] },
                v: &v[bh * m * dv..(bh + 1) * m * dv],
                gate: gate.map(|g| &g[bh * n * dv..(bh + 1) * n * dv]),
            };
            // SAFETY: each (b, h) writes its own N × Dv block of the output (order b h i e).
            let rows = unsafe { std::slice::from_raw_parts_mut((out.get() as *mut f32).add(bh * n * dv), n * dv) };
            // SAFETY: the same for its N statistics (one branch: order b h i).
            let st = stats.map(|p| unsafe { std::slice::from_raw_parts_mut((p.get() as *mut f32).add(bh * n), n) });
            chunked::run_head(plan, &head, rows, st);
        });
    }

    /// Runs the tiled kernel: classify the tiles by the mask (once per shape for static
    /// masks), then per head group pack the key panels and values, and run the group's
    /// (head, query tile) tasks in parallel.
    fn run_tiled(&self, pack: PackFn, tile: TileFn, t: &crate::schedule::BoundTiled, dims: &Bindings, bufs: &BTreeMap<String, &[u32]>, fp: FramePtr) {
        use rayon::prelude::*;
        let k = &self.kernel;
        let ts = self.schedule.tiled().expect("a tiled schedule");
        let grid = t.tiles;
        let (nqb, ntiles, nbr) = (grid.query_tiles(), grid.key_tiles(), k.branches.len() as i64);
        let g = crate::schedule::Grid::of(k, dims);
        let table = crate::host::tile_classes(&self.classifier, k, &grid, g.batches, g.heads, dims, bufs);
        // The task's workspace, then the room a two-pass softmax keeps its weights in.
        let kept = if self.keeps_weights(t) { ts.workspace.kept_floats(g.keys) } else { 0 };
        let ws_len = (ts.workspace.task_floats(t.channels, g.values) + kept) as usize;
        let (kt_len, vb_len) = ts.workspace.pack_floats(g.keys, t.channels, g.values);
        // Query tiles per task: small tiles (block-diagonal masks run 16-row tiles with one live
        // key tile each) are grouped so that a task holds about 64 rows of work.
        let per_task = (64 / grid.block_q).max(1) as usize;
        // The panels are reused from group to group within a worker's run of groups: `pack`
        // writes every element a tile reads, and the zero padding stays where it was.
        t.groups.par_iter().for_each_init(
            || (self.scratch.take(kt_len as usize), self.scratch.take(vb_len as usize)),
            |(kt, vb), group| {
                let (b, heads) = (group.batch, &group.heads);
                // SAFETY: kt and vb hold the padded panels `pack` writes.
                unsafe { pack(fp.get(), b, heads[0], kt.as_mut_ptr(), vb.as_mut_ptr()) };
                // Per head: its classes, [query tile][branch][key tile].
                let per_head = (nqb * nbr * ntiles) as usize;
                let mut cls = Vec::with_capacity(per_head * heads.len());
                for &h in heads {
                    cls.extend_from_slice(&table.head(b, h));
                }
                let (ktp, vbp) = (SendPtr(kt.as_ptr()), SendPtr(vb.as_ptr()));
                let clsp = SendPtr(cls.as_ptr() as *const u8);
                let tasks: Vec<(usize, i64)> = (0..heads.len()).flat_map(|n| (0..nqb).map(move |qb| (n, qb))).collect();
                tasks.par_chunks(per_task).for_each_init(
                    || self.scratch.take(ws_len),
                    |ws, chunk| {
                        for &(n, qb) in chunk {
                            // SAFETY: the classes are `repr(u8)` bytes, laid out as `tile` reads them.
                            let c = unsafe { clsp.get().add(n * per_head + (qb * nbr * ntiles) as usize) };
                            // SAFETY: tiles write disjoint output rows; ws holds the tile workspace.
                            unsafe { tile(fp.get(), b, heads[n], qb * grid.block_q, ktp.get(), vbp.get(), ws.as_mut_ptr(), c) };
                        }
                    },
                );
            },
        );
    }
}

/// Float buffers lent to the tiled kernel's workers and given back when a worker's run
/// ends, for the next run or call: no allocation and no clearing once the pool holds as
/// many as run at once. The generated code writes every element it reads (a buffer is
/// already reused from group to group and task to task within a run), so a lent buffer
/// keeps what its last user left; a new one starts cleared.
#[derive(Default)]
struct Scratch(std::sync::Mutex<Vec<Vec<f32>>>);

impl Scratch {
    /// A buffer of at least `len` floats.
    fn take(&self, len: usize) -> Lent<'_> {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest kept buffer that is long enough, else the longest (packs and
        // workspaces share the pool).
        let fits = (0..pool.len()).filter(|&n| pool[n].len() >= len).min_by_key(|&n| pool[n].len());
        let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&n| pool[n].len()));
        let mut buf = pick.map(|n| pool.swap_remove(n)).unwrap_or_default();
        drop(pool);
        if buf.len() < len {
            // A fresh zeroed allocation rather than growing the old one (its contents are
            // scratch): the allocator's fresh pages are zero already, so a buffer that a call
            // never touches (the key panel of a decode step, which reads its keys in place)
            // costs neither the clearing nor resident memory.
            buf = vec![0.0; len];
        }
        Lent { pool: self, buf }
    }
}

/// A buffer of a [`Scratch`], given back when dropped.
struct Lent<'a> {
    pool: &'a Scratch,
    buf: Vec<f32>,
}

impl Lent<'_> {
    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.buf.as_mut_ptr()
    }

    fn as_ptr(&self) -> *const f32 {
        self.buf.as_ptr()
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool.0.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
    }
}

#[derive(Clone, Copy)]
struct FramePtr(*const i64);
// The frame and the buffers it points to outlive the parallel section; tasks write
// disjoint rows.
unsafe impl Send for FramePtr {}
unsafe impl Sync for FramePtr {}
impl FramePtr {
    fn get(self) -> *const i64 {
        self.0
    }
}

/// A read-only pointer shared by parallel tasks.
#[derive(Clone, Copy)]
struct SendPtr<T>(*const T);
// The pointee outlives the parallel section and is not written while tasks read it.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *const T {
        self.0
    }
}
