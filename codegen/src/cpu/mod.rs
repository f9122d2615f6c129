//! The CPU backend: Cranelift JIT for the host (x86-64 or aarch64).
//!
//! [`CpuKernel::compile`] generates and JIT-compiles one `attend` function per kernel plus
//! one `derive_T` per derived tensor (see [`gen`] for what they compute); [`CpuKernel::run`]
//! binds dims from the input shapes, converts inputs to f32/i32, computes derived tensors,
//! and runs `attend` over (batch, head, query tile) on rayon's thread pool.
//!
//! Three paths: the tiled kernel ([`tiled`]: microkernel matmuls and softmax step, generated
//! f32x4 code for everything variant-specific, empty tiles skipped), the row-at-a-time kernel ([`gen`]:
//! every spec, e.g. GLA's per-channel decay inside the dot when run quadratically), and the
//! chunked algorithm ([`chunked`]) for kernels in the linear-attention normal form of
//! `attnc_passes::linear`, chosen by `CpuOptions::chunk`.

mod chunked;
mod gen;
pub mod microkernel;
mod tiled;

use crate::{Backend, CodegenError};
use attnc_ir::reference::Tensor;
use attnc_ir::{bind, Bindings, Kernel, KernelInfo, TensorKind};
use cranelift::codegen::ir::UserFuncName;
use cranelift::codegen::{isa, settings, Context};
use cranelift::prelude::*;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use gen::{Gen, Layout};
use std::collections::BTreeMap;
use tiled::TiledPlan;

/// Code-generation choices for the CPU (part of the autotune key).
#[derive(Clone, Debug, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CpuOptions {
    /// Use the FMA extension when the host has it (x86-64). Off: lane-wise `fmaf` calls.
    pub fma: bool,
    /// Use the tiled kernel when the spec allows it (else the row-at-a-time kernel).
    pub tiled: bool,
    /// In the tiled kernel, run the tile matmuls in the `std::arch` microkernel (AVX-512,
    /// AVX2 or portable, detected at run time); off: generated f32x4 loops.
    pub microkernel: bool,
    /// Query rows per tile (tiled kernel).
    pub block_q: usize,
    /// Keys per tile (tiled kernel; a multiple of 16).
    pub block_k: usize,
    /// Query rows per parallel task (row kernel).
    pub rows_per_task: usize,
    /// Worker threads (0: rayon's default, one per core).
    pub threads: usize,
    /// Run Cranelift's e-graph optimizer (`opt_level=speed`). Off by default: the generated
    /// code is already hoisted and folded where it matters, and the optimizer was measured to
    /// re-elaborate hoisted loop invariants (a square root and a division) inside the key
    /// loop, which made kernels slower, not faster.
    pub clif_opt: bool,
    /// Keys per chunk of the chunked algorithm, for kernels in the normal form of
    /// `attnc_passes::linear` (linear and decay attention); 0: the quadratic kernels.
    pub chunk: usize,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions { fma: true, tiled: true, microkernel: true, block_q: 64, block_k: 64, rows_per_task: 16, threads: 0, clif_opt: false, chunk: 64 }
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

/// CLIF and disassembled machine code (VCode) of every generated function for this host.
pub fn emit_host(k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<(ClifArtifact, Vec<(String, String)>), CodegenError> {
    let mut disasm = Some(Vec::new());
    let kern = CpuKernel::compile_for(k, info, o, host_isa(o)?, &mut disasm)?;
    Ok((kern.clif.clone(), disasm.unwrap_or_default()))
}

/// CLIF and disassembled machine code of every generated function, on [`fixed_x86_isa`].
pub fn emit_fixed_x86(k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<(ClifArtifact, Vec<(String, String)>), CodegenError> {
    let mut disasm = Some(Vec::new());
    let kern = CpuKernel::compile_for(k, info, o, fixed_x86_isa(o)?, &mut disasm)?;
    Ok((kern.clif.clone(), disasm.unwrap_or_default()))
}

/// The generated functions as CLIF text (the artifact of [`CpuBackend`]).
#[derive(Clone, Debug)]
pub struct ClifArtifact {
    pub functions: Vec<(String, String)>,
}

impl std::fmt::Display for ClifArtifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, text) in &self.functions {
            writeln!(f, "; {name}")?;
            writeln!(f, "{text}")?;
        }
        Ok(())
    }
}

/// The functions generated for a kernel.
#[derive(Clone, Debug, PartialEq)]
enum FuncKind {
    Derive(String),
    Attend,
    Pack,
    Tile,
    MmQk,
    MmPv,
    /// The microkernel's softmax step (imported, never generated).
    Softmax,
    /// The microkernel's `qk` that also writes the row maxima for the softmax step
    /// (imported, never generated).
    QkMax,
    /// The microkernel's second-pass softmax weights (imported, never generated).
    Weights,
}

impl FuncKind {
    fn name(&self) -> String {
        match self {
            FuncKind::Derive(t) => format!("derive_{t}"),
            FuncKind::Attend => "attend".into(),
            FuncKind::Pack => "pack".into(),
            FuncKind::Tile => "tile".into(),
            FuncKind::MmQk => "mm_qk".into(),
            FuncKind::MmPv => "mm_pv".into(),
            FuncKind::Softmax => "softmax_step".into(),
            FuncKind::QkMax => "qk_max".into(),
            FuncKind::Weights => "softmax_weights".into(),
        }
    }
}

/// Parameters in order: `p` a pointer, `i` an i64.
fn signature(module: &JITModule, kind: &FuncKind) -> Signature {
    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    let params = match kind {
        FuncKind::Derive(_) => "pii",
        FuncKind::Attend => "piiiip",
        FuncKind::Pack => "piipp",
        FuncKind::Tile => "piiipppp",
        FuncKind::MmQk => "pippiii",
        FuncKind::MmPv => "pipipipiii",
        FuncKind::Softmax => "piiipppp",
        FuncKind::QkMax => "pippiiip",
        FuncKind::Weights => "piiipp",
    };
    for c in params.chars() {
        sig.params.push(AbiParam::new(if c == 'p' { ptr } else { types::I64 }));
    }
    sig
}

/// What generating any one function needs.
struct Ctx<'a> {
    k: &'a Kernel,
    layout: &'a Layout,
    libs: &'a BTreeMap<&'static str, FuncId>,
    plan: Option<&'a TiledPlan>,
    mm: Option<tiled::Matmuls<FuncId>>,
    o: &'a CpuOptions,
}

/// Generates one function's CLIF into `ctx.func`.
fn build(module: &mut JITModule, ctx: &mut Context, fctx: &mut FunctionBuilderContext, cx: &Ctx, kind: &FuncKind) {
    let b = FunctionBuilder::new(&mut ctx.func, fctx);
    let refs = cx.libs.iter().map(|(n, id)| (*n, module.declare_func_in_func(*id, b.func))).collect();
    let mm = cx.mm.map(|(q, p, s)| {
        (
            module.declare_func_in_func(q, b.func),
            module.declare_func_in_func(p, b.func),
            s.map(|m| tiled::SoftmaxKernels {
                step: module.declare_func_in_func(m.step, b.func),
                qk_max: module.declare_func_in_func(m.qk_max, b.func),
                weights: module.declare_func_in_func(m.weights, b.func),
            }),
        )
    });
    let framed = !matches!(kind, FuncKind::MmQk | FuncKind::MmPv);
    let (mut g, p) = Gen::new(b, cx.k, if framed { Some(cx.layout) } else { None }, refs);
    g.optimized = cx.o.clif_opt;
    match kind {
        FuncKind::Derive(t) => g.derive(t, p[1], p[2]),
        FuncKind::Attend => g.attend(p[1], p[2], p[3], p[4], p[5]),
        FuncKind::Pack => g.pack(cx.plan.expect("tiled"), cx.o.block_k as i64, p[1], p[2], p[3], p[4]),
        FuncKind::Tile => {
            g.tile(cx.plan.expect("tiled"), cx.o.block_q as i64, cx.o.block_k as i64, [p[1], p[2], p[3], p[4], p[5], p[6], p[7]], mm.expect("matmuls declared"))
        }
        FuncKind::MmQk => tiled::gen_qk(&mut g, &p),
        FuncKind::MmPv => tiled::gen_pv(&mut g, &p),
        FuncKind::Softmax | FuncKind::QkMax | FuncKind::Weights => unreachable!("the softmax helpers are imported, not generated"),
    }
    g.finish(module.target_config());
}

type AttendFn = unsafe extern "C" fn(*const i64, i64, i64, i64, i64, *mut f32);
type DeriveFn = unsafe extern "C" fn(*const i64, i64, i64);
type PackFn = unsafe extern "C" fn(*const i64, i64, i64, *mut f32, *mut f32);
type TileFn = unsafe extern "C" fn(*const i64, i64, i64, i64, *const f32, *const f32, *mut f32, *const u8);

/// The compiled form: row-at-a-time, tiled, or chunked (linear attention).
enum Path {
    Rows(AttendFn),
    Tiled { pack: PackFn, tile: TileFn, plan: Box<TiledPlan> },
    Chunked(attnc_passes::linear::LinearForm),
}

type TileClassCache = BTreeMap<(usize, i64, i64, i64, i64, BTreeMap<String, i64>), std::sync::Arc<Vec<u8>>>;

/// A JIT-compiled kernel, ready to run.
pub struct CpuKernel {
    kernel: Kernel,
    layout: Layout,
    path: Path,
    derives: Vec<(String, DeriveFn)>,
    options: CpuOptions,
    /// A pool of `options.threads` workers (none: rayon's global pool).
    pool: Option<rayon::ThreadPool>,
    /// Tile classes of static masks per (branch, b, h, tile sizes, dims): a shape's
    /// classification is done once.
    classes: std::sync::Mutex<TileClassCache>,
    /// Owns the machine code the function pointers point into.
    _module: JITModule,
    pub clif: ClifArtifact,
}

// The JIT module is only kept alive, never mutated after `finalize_definitions`; the
// functions are pure code reading their arguments, so they can be called from any thread.
unsafe impl Send for CpuKernel {}
unsafe impl Sync for CpuKernel {}

/// Inputs in storage form: f32 bits for float tensors, i32 for integer ones.
#[derive(Clone, Debug)]
pub struct Storage {
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub bufs: BTreeMap<String, Vec<u32>>,
}

impl Storage {
    /// Rounds f64 values to the storage type of each declared input.
    pub fn from_f64(k: &Kernel, inputs: &BTreeMap<String, Tensor>) -> Storage {
        let mut st = Storage { shapes: BTreeMap::new(), bufs: BTreeMap::new() };
        for (name, t) in inputs {
            let int = k.tensor(name).is_some_and(|d| d.dtype.is_int());
            let data = if int { t.data.iter().map(|x| (*x as i32) as u32).collect() } else { t.data.iter().map(|x| (*x as f32).to_bits()).collect() };
            st.shapes.insert(name.clone(), t.shape.clone());
            st.bufs.insert(name.clone(), data);
        }
        st
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] attnc_ir::BindError),
    #[error("input `{name}`: {why}")]
    Input { name: String, why: String },
    #[error("{0}")]
    Divisor(String),
    #[error("cannot build the thread pool: {0}")]
    Threads(String),
}

impl CpuKernel {
    pub fn compile(k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<CpuKernel, CodegenError> {
        Self::compile_for(k, info, o, host_isa(o)?, &mut None)
    }

    /// Compiles for `isa`; with `disasm = Some(..)` also collects each function's machine
    /// code as text (VCode), for snapshots on a fixed ISA.
    fn compile_for(
        k: &Kernel,
        _info: &KernelInfo,
        o: &CpuOptions,
        isa: isa::OwnedTargetIsa,
        disasm: &mut Option<Vec<(String, String)>>,
    ) -> Result<CpuKernel, CodegenError> {
        if o.block_k == 0 || !o.block_k.is_multiple_of(16) || o.block_q == 0 {
            return Err(CodegenError::Unsupported(format!("tile sizes must be positive and block_k a multiple of 16 (got {}×{})", o.block_q, o.block_k)));
        }
        let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
        let lib_list = gen::libcalls();
        for (name, _, addr) in &lib_list {
            jb.symbol(*name, *addr);
        }
        let linear = if o.chunk > 0 { attnc_passes::linear::LinearForm::of(k) } else { None };
        let plan = if o.tiled && linear.is_none() { TiledPlan::new(k) } else { None };
        let (mk_qk, mk_pv) = microkernel::kernels(microkernel::Isa::detect());
        jb.symbol("attnc_mk_qk", mk_qk as *const u8);
        jb.symbol("attnc_mk_pv", mk_pv as *const u8);
        jb.symbol("attnc_mk_softmax", microkernel::softmax_kernel(microkernel::Isa::detect()) as *const u8);
        jb.symbol("attnc_mk_qk_max", microkernel::qk_max_kernel(microkernel::Isa::detect()) as *const u8);
        jb.symbol("attnc_mk_weights", microkernel::weights_kernel(microkernel::Isa::detect()) as *const u8);
        let mut module = JITModule::new(jb);
        let err = |e: cranelift_module::ModuleError| CodegenError::Emit(e.to_string());
        let mut libs = BTreeMap::new();
        for (name, arity, _) in &lib_list {
            let mut sig = module.make_signature();
            for _ in 0..*arity {
                sig.params.push(AbiParam::new(types::F32));
            }
            sig.returns.push(AbiParam::new(types::F32));
            libs.insert(*name, module.declare_function(name, Linkage::Import, &sig).map_err(err)?);
        }
        let layout = Layout::new(k);
        let mut kinds: Vec<FuncKind> = k.derived().map(|t| FuncKind::Derive(t.name.clone())).collect();
        let mut mm = None;
        if plan.is_some() {
            kinds.push(FuncKind::Pack);
            mm = Some(if o.microkernel {
                let q = module.declare_function("attnc_mk_qk", Linkage::Import, &signature(&module, &FuncKind::MmQk)).map_err(err)?;
                let p = module.declare_function("attnc_mk_pv", Linkage::Import, &signature(&module, &FuncKind::MmPv)).map_err(err)?;
                let s = module.declare_function("attnc_mk_softmax", Linkage::Import, &signature(&module, &FuncKind::Softmax)).map_err(err)?;
                let m = module.declare_function("attnc_mk_qk_max", Linkage::Import, &signature(&module, &FuncKind::QkMax)).map_err(err)?;
                let w = module.declare_function("attnc_mk_weights", Linkage::Import, &signature(&module, &FuncKind::Weights)).map_err(err)?;
                (q, p, Some(tiled::SoftmaxKernels { step: s, qk_max: m, weights: w }))
            } else {
                kinds.push(FuncKind::MmQk);
                kinds.push(FuncKind::MmPv);
                let q = module.declare_function("mm_qk", Linkage::Local, &signature(&module, &FuncKind::MmQk)).map_err(err)?;
                let p = module.declare_function("mm_pv", Linkage::Local, &signature(&module, &FuncKind::MmPv)).map_err(err)?;
                (q, p, None)
            });
            kinds.push(FuncKind::Tile);
        } else if linear.is_none() {
            kinds.push(FuncKind::Attend);
        }
        let cx = Ctx { k, layout: &layout, libs: &libs, plan: plan.as_ref(), mm, o };
        let mut ctx = module.make_context();
        let mut fctx = FunctionBuilderContext::new();
        let mut ids = Vec::new();
        let mut clif = Vec::new();
        for kind in &kinds {
            let name = kind.name();
            let sig = signature(&module, kind);
            let id = match (kind, mm) {
                (FuncKind::MmQk, Some((q, _, _))) => q,
                (FuncKind::MmPv, Some((_, p, _))) => p,
                _ => module.declare_function(&name, Linkage::Local, &sig).map_err(err)?,
            };
            ctx.func.signature = sig;
            ctx.func.name = UserFuncName::user(0, id.as_u32());
            build(&mut module, &mut ctx, &mut fctx, &cx, kind);
            cranelift::codegen::verify_function(&ctx.func, module.isa().flags()).map_err(|e| CodegenError::Invalid(format!("{name}: {e}")))?;
            clif.push((name.clone(), ctx.func.display().to_string()));
            ctx.set_disasm(disasm.is_some());
            module.define_function(id, &mut ctx).map_err(|e| CodegenError::Emit(format!("{name}: {e:?}")))?;
            if let Some(d) = disasm.as_mut() {
                d.push((name.clone(), ctx.compiled_code().and_then(|c| c.vcode.clone()).unwrap_or_default()));
            }
            module.clear_context(&mut ctx);
            ids.push((kind.clone(), id));
        }
        module.finalize_definitions().map_err(|e| CodegenError::Emit(e.to_string()))?;
        let mut derives = Vec::new();
        let (mut attend, mut pack, mut tile) = (None, None, None);
        for (kind, id) in ids {
            let p = module.get_finalized_function(id);
            // SAFETY: each function was generated with exactly this signature (`signature`).
            unsafe {
                match kind {
                    FuncKind::Derive(t) => derives.push((t, std::mem::transmute::<*const u8, DeriveFn>(p))),
                    FuncKind::Attend => attend = Some(std::mem::transmute::<*const u8, AttendFn>(p)),
                    FuncKind::Pack => pack = Some(std::mem::transmute::<*const u8, PackFn>(p)),
                    FuncKind::Tile => tile = Some(std::mem::transmute::<*const u8, TileFn>(p)),
                    FuncKind::MmQk | FuncKind::MmPv | FuncKind::Softmax | FuncKind::QkMax | FuncKind::Weights => {}
                }
            }
        }
        let path = match (plan, linear) {
            (_, Some(form)) => Path::Chunked(form),
            (Some(plan), None) => Path::Tiled { pack: pack.expect("generated"), tile: tile.expect("generated"), plan: Box::new(plan) },
            (None, None) => Path::Rows(attend.expect("generated")),
        };
        let pool = match o.threads {
            0 => None,
            n => Some(rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| CodegenError::Unsupported(format!("thread pool: {e}")))?),
        };
        Ok(CpuKernel {
            kernel: k.clone(),
            layout,
            path,
            derives,
            options: o.clone(),
            pool,
            classes: Default::default(),
            _module: module,
            clif: ClifArtifact { functions: clif },
        })
    }

    /// True when the tiled kernel runs this spec (else the row-at-a-time or chunked kernel).
    pub fn is_tiled(&self) -> bool {
        matches!(self.path, Path::Tiled { .. })
    }

    /// True when the chunked algorithm runs this spec.
    pub fn is_chunked(&self) -> bool {
        matches!(self.path, Path::Chunked(_))
    }

    /// Which algorithm runs, in words (for `bench` and `explain`).
    pub fn describe(&self) -> String {
        let o = &self.options;
        match &self.path {
            Path::Rows(_) => "row kernel".into(),
            Path::Tiled { .. } => {
                let mk = if o.microkernel { format!("{:?} microkernel", microkernel::Isa::detect()) } else { "generated f32x4 matmuls".into() };
                format!("tiled {}x{}, {mk}", o.block_q, o.block_k)
            }
            Path::Chunked(f) => format!("chunked linear attention, {} keys per chunk, {:?} decay", o.chunk, f.decay),
        }
    }

    /// Runs the chunked algorithm over every (batch, head) in parallel, reading the
    /// materialized operands and writing the output through `out`.
    fn run_chunked(&self, form: &attnc_passes::linear::LinearForm, dims: &Bindings, bufs: &BTreeMap<String, &[u32]>, out: *mut f32) {
        use attnc_passes::linear::{Decay, FK, FQ, GATE, LK, LQ, VAL};
        use rayon::prelude::*;
        let k = &self.kernel;
        let (nb, nh, n, m, dv) = (dims.extent(&k.iter.b), dims.extent(&k.iter.h), dims.extent(&k.iter.i), dims.extent(&k.iter.j), dims.extent(&k.iter.e));
        let dk = dims.extent(&form.channels) as usize;
        let (n, m, dv) = (n as usize, m as usize, dv as usize);
        let f32s = |name: &str| -> &[f32] {
            let b = bufs[name];
            // SAFETY: derived tensors are f32 buffers stored as their bits.
            unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len()) }
        };
        let causal = form.causal.as_ref().map(|off| attnc_ir::bind::eval_dims(off, &dims.dims).expect("a dim expression (checked by the pass)"));
        let plan = chunked::Plan { n, m, dk, dv, causal, eps: form.eps.map(|e| e as f32), decay: form.decay, chunk: self.options.chunk };
        let (fq, fk, v) = (f32s(FQ), f32s(FK), f32s(VAL));
        let (lq, lk): (&[f32], &[f32]) = if form.decay == Decay::None { (&[], &[]) } else { (f32s(LQ), f32s(LK)) };
        let gate = form.gate.then(|| f32s(GATE));
        let lw = if form.decay == Decay::Channel { dk } else { 1 };
        let out = SendPtr(out as *const f32);
        let heads: Vec<(usize, usize)> = (0..nb as usize).flat_map(|b| (0..nh as usize).map(move |h| (b, h))).collect();
        heads.par_iter().for_each(|&(b, h)| {
            let bh = b * nh as usize + h;
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
            chunked::run_head(&plan, &head, rows);
        });
    }

    /// Runs the tiled kernel: per (b, h), pack the key panels and values, classify the
    /// tiles by the mask (cached when the mask does not depend on b or h), then run the
    /// query tiles in parallel.
    #[allow(clippy::too_many_arguments)]
    fn run_tiled(&self, pack: PackFn, tile: TileFn, plan: &TiledPlan, dims: &Bindings, bufs: &BTreeMap<String, &[u32]>, fp: FramePtr) {
        use rayon::prelude::*;
        let k = &self.kernel;
        let (bq, bk) = (self.options.block_q as i64, self.options.block_k as i64);
        let (nb, nh, ni, mj) = (dims.extent(&k.iter.b), dims.extent(&k.iter.h), dims.extent(&k.iter.i), dims.extent(&k.iter.j));
        let ev = dims.extent(&k.iter.e);
        let dk = plan.dot.as_ref().map_or(0, |d| attnc_ir::bind::eval_dims(&d.len, &dims.dims).unwrap_or(0).max(0));
        let ntiles = (mj + bk - 1) / bk;
        let nqb = (ni + bq - 1) / bq;
        let nbr = k.branches.len();
        // The data the mask can read, as f64, for the run-time classifier.
        let mut data: BTreeMap<String, (Vec<usize>, Vec<f64>, bool)> = BTreeMap::new();
        for t in &k.tensors {
            let used = k.branches.iter().any(|b| b.mask.as_ref().is_some_and(|m| m.loads().contains(&t.name)));
            if !used {
                continue;
            }
            let shape = dims.shape(t);
            let vals: Vec<f64> = if t.dtype.is_int() {
                bufs[&t.name].iter().map(|x| *x as i32 as f64).collect()
            } else {
                bufs[&t.name].iter().map(|x| f32::from_bits(*x) as f64).collect()
            };
            data.insert(t.name.clone(), (shape, vals, t.dtype.is_int()));
        }
        let oracle = attnc_passes::tiles::DataOracle {
            tensors: data.iter().map(|(n, (s, v, i))| (n.clone(), (s.as_slice(), v.as_slice(), *i))).collect(),
            limit: 1 << 14,
        };
        // Classes per branch for each distinct (b, h) the mask depends on: [qb][tile], query
        // tiles in parallel. A mask that reads no tensor has the same classes at every call
        // with these dims: they are computed once per shape and kept (compile-time
        // classification); masks that read data are classified at every call.
        let classify = |br: usize, b: i64, h: i64| -> std::sync::Arc<Vec<u8>> {
            let mask = k.branches[br].mask.as_ref();
            let static_mask = mask.is_none_or(|m| m.loads().is_empty());
            let key = (br, b, h, bq, bk, dims.dims.clone());
            if static_mask {
                if let Some(c) = self.classes.lock().expect("classes lock").get(&key) {
                    return c.clone();
                }
            }
            let rows: Vec<Vec<u8>> = (0..nqb)
                .into_par_iter()
                .map(|qb| {
                    let i = (qb * bq, ((qb + 1) * bq).min(ni));
                    attnc_passes::tiles::classify_row(mask, b, h, i, mj, bk, &dims.dims, &oracle)
                        .into_iter()
                        .map(|c| match c {
                            attnc_passes::tiles::TileClass::Empty => 0,
                            attnc_passes::tiles::TileClass::Full => 1,
                            attnc_passes::tiles::TileClass::Partial => 2,
                        })
                        .collect()
                })
                .collect();
            let out = std::sync::Arc::new(rows.concat());
            if static_mask {
                self.classes.lock().expect("classes lock").insert(key, out.clone());
            }
            out
        };
        let keys: Vec<(usize, i64, i64)> = (0..nbr)
            .flat_map(|br| {
                let deps = k.branches[br].mask.as_ref().map(attnc_ir::Deps::of).unwrap_or_default();
                let bs: Vec<i64> = if deps.b { (0..nb).collect() } else { vec![0] };
                let hs: Vec<i64> = if deps.h { (0..nh).collect() } else { vec![0] };
                bs.into_iter().flat_map(move |b| hs.clone().into_iter().map(move |h| (br, b, h)))
            })
            .collect();
        let classes: BTreeMap<(usize, i64, i64), std::sync::Arc<Vec<u8>>> = keys.iter().map(|&(br, b, h)| ((br, b, h), classify(br, b, h))).collect();
        let lookup = |br: usize, b: i64, h: i64| {
            let deps = k.branches[br].mask.as_ref().map(attnc_ir::Deps::of).unwrap_or_default();
            &classes[&(br, if deps.b { b } else { 0 }, if deps.h { h } else { 0 })]
        };
        let ws_len = (bq * dk.max(1) + bq * bk + 2 * bq * ev + 6 * bq) as usize;
        // Heads that read the same key panel and values share one pack (GQA/MQA: every
        // query head of a kv head), so decode does not re-pack K and V per query head.
        let groups = pack_groups(k, plan, dims, nb, nh);
        groups.par_iter().for_each(|(b, heads)| {
            let (b, h0) = (*b, heads[0]);
            let mut kt = vec![0f32; (ntiles * bk * dk.max(1)) as usize];
            let mut vb = vec![0f32; (ntiles * bk * ev) as usize];
            // SAFETY: kt and vb hold the padded panels `pack` writes.
            unsafe { pack(fp.get(), b, h0, kt.as_mut_ptr(), vb.as_mut_ptr()) };
            // Per head and query tile: the classes of every branch, contiguous.
            let per_head = (nqb * nbr as i64 * ntiles) as usize;
            let mut cls = vec![0u8; per_head * heads.len()];
            for (n, &h) in heads.iter().enumerate() {
                for qb in 0..nqb {
                    for br in 0..nbr {
                        let src = &lookup(br, b, h)[(qb * ntiles) as usize..((qb + 1) * ntiles) as usize];
                        let at = n * per_head + ((qb * nbr as i64 + br as i64) * ntiles) as usize;
                        cls[at..at + ntiles as usize].copy_from_slice(src);
                    }
                }
            }
            let (ktp, vbp) = (SendPtr(kt.as_ptr()), SendPtr(vb.as_ptr()));
            let clsp = SendPtr(cls.as_ptr());
            let tasks: Vec<(usize, i64)> = (0..heads.len()).flat_map(|n| (0..nqb).map(move |qb| (n, qb))).collect();
            tasks.par_iter().for_each_init(
                || vec![0f32; ws_len],
                |ws, &(n, qb)| {
                    let c = unsafe { clsp.get().add(n * per_head + (qb * nbr as i64 * ntiles) as usize) };
                    // SAFETY: tiles write disjoint output rows; ws holds the tile workspace.
                    unsafe { tile(fp.get(), b, heads[n], qb * bq, ktp.get(), vbp.get(), ws.as_mut_ptr(), c) };
                },
            );
        });
    }

    /// Runs on named inputs (f64 values, rounded to the tensors' storage types).
    pub fn run(&self, inputs: &BTreeMap<String, Tensor>, explicit: &BTreeMap<String, i64>) -> Result<Tensor, RunError> {
        let (shape, data) = self.run_storage(&Storage::from_f64(&self.kernel, inputs), explicit)?;
        Ok(Tensor::new(shape, data.iter().map(|x| *x as f64).collect()))
    }

    /// Runs on inputs already in storage form (what benchmarks time); returns the output's
    /// shape and f32 values.
    pub fn run_storage(&self, st: &Storage, explicit: &BTreeMap<String, i64>) -> Result<(Vec<usize>, Vec<f32>), RunError> {
        let dims = bind(&self.kernel, &st.shapes, explicit)?;
        self.check_divisors(&dims)?;
        let k = &self.kernel;
        // Derived tensors and the output get fresh buffers; inputs are read in place.
        let mut owned: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for t in &k.tensors {
            if t.kind != TensorKind::Input {
                let n: usize = dims.shape(t).iter().product();
                owned.insert(t.name.clone(), vec![0u32; n.max(1)]);
            }
        }
        let bufs: BTreeMap<String, &[u32]> = k
            .tensors
            .iter()
            .map(|t| (t.name.clone(), if t.kind == TensorKind::Input { st.bufs[&t.name].as_slice() } else { owned[&t.name].as_slice() }))
            .collect();
        let mut frame = vec![0i64; self.layout.len];
        for (d, slot) in &self.layout.dims {
            frame[*slot] = dims.dims[d];
        }
        for t in &k.tensors {
            let slots = &self.layout.tensors[&t.name];
            let shape = dims.shape(t);
            frame[slots.base] = bufs[&t.name].as_ptr() as i64;
            let mut stride = 1i64;
            for a in (0..shape.len()).rev() {
                frame[slots.ext[a]] = shape[a] as i64;
                frame[slots.stride[a]] = stride;
                stride *= shape[a] as i64;
            }
        }
        let fp = FramePtr(frame.as_ptr());
        let work = || {
            use rayon::prelude::*;
            for (name, f) in &self.derives {
                let t = k.tensor(name).expect("derived tensor");
                let shape = dims.shape(t);
                let first = shape.first().copied().unwrap_or(1) as i64;
                let scan_first = matches!(&t.kind, TensorKind::Derived { def: attnc_ir::TensorDef::Cumsum { axis: 0, .. }, .. });
                let f = *f;
                if scan_first || shape.is_empty() {
                    // SAFETY: the frame describes live buffers of the bound shapes.
                    unsafe { f(fp.get(), 0, first) };
                } else {
                    // The range is over the first axis, or the first two flattened.
                    let n = if gen::derive_flattens(t) { first * shape[1] as i64 } else { first };
                    let step = (n / 64).max(1);
                    (0..(n + step - 1) / step).into_par_iter().for_each(|c| unsafe { f(fp.get(), c * step, ((c + 1) * step).min(n)) });
                }
            }
            match &self.path {
                Path::Rows(attend) => {
                    let (nb, nh, ni) = (dims.extent(&k.iter.b), dims.extent(&k.iter.h), dims.extent(&k.iter.i));
                    let ev = dims.extent(&k.iter.e) as usize;
                    let step = self.options.rows_per_task.max(1) as i64;
                    let tasks: Vec<(i64, i64, i64)> =
                        (0..nb).flat_map(|b| (0..nh).flat_map(move |h| (0..ni).step_by(step as usize).map(move |i| (b, h, i)))).collect();
                    let attend = *attend;
                    tasks.par_iter().for_each_init(
                        || vec![0f32; 2 * ev.max(1)],
                        |ws, &(b, h, i)| {
                            // SAFETY: tasks write disjoint output rows; ws holds 2·Ev floats.
                            unsafe { attend(fp.get(), b, h, i, (i + step).min(ni), ws.as_mut_ptr()) };
                        },
                    );
                }
                Path::Tiled { pack, tile, plan } => self.run_tiled(*pack, *tile, plan, &dims, &bufs, fp),
                Path::Chunked(form) => {
                    let out = bufs[&k.output().name].as_ptr() as *mut f32;
                    self.run_chunked(form, &dims, &bufs, out)
                }
            }
        };
        match &self.pool {
            Some(p) => p.install(work),
            None => work(),
        }
        let out = k.output();
        let data = owned.remove(&out.name).expect("output buffer").into_iter().map(f32::from_bits).collect();
        Ok((dims.shape(out), data))
    }

    /// Integer divisors are dim expressions (E0008); a zero one would be a run-time fault.
    fn check_divisors(&self, dims: &Bindings) -> Result<(), RunError> {
        let mut err = None;
        for (label, e) in self.kernel.exprs() {
            e.walk(&mut |x| {
                if let attnc_ir::Expr::Binary(attnc_ir::BinOp::FloorDiv | attnc_ir::BinOp::Mod, _, d) = x {
                    if d.free_vars().is_empty() && d.loads().is_empty() {
                        if let Ok(0) = attnc_ir::bind::eval_dims(d, &dims.dims) {
                            err.get_or_insert(format!("{label}: the divisor `{}` is 0 for these dims", attnc_ir::pretty::infix(d)));
                        }
                    }
                }
            });
        }
        match err {
            Some(e) => Err(RunError::Divisor(e)),
            None => Ok(()),
        }
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

/// The CPU backend as a [`Backend`]: emits and verifies CLIF.
pub struct CpuBackend;

impl Backend for CpuBackend {
    const NAME: &'static str = "cpu";
    type Options = CpuOptions;
    type Artifact = ClifArtifact;
    fn emit(&self, k: &Kernel, info: &KernelInfo, o: &CpuOptions) -> Result<ClifArtifact, CodegenError> {
        Ok(CpuKernel::compile(k, info, o)?.clif)
    }
    fn validate(&self, _a: &ClifArtifact) -> Result<(), CodegenError> {
        // Every function is run through Cranelift's verifier as it is emitted.
        Ok(())
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

/// Groups the heads of each batch by the key panel and values they read: `B(b, h, j, r)` and
/// `value(b, h, j, e)` see `h` only through index subexpressions free of `j r e` (like
/// `h // (H // G)`); heads on which all of those agree read the same data. When `h` is used
/// any other way, every head is its own group.
fn pack_groups(k: &Kernel, plan: &TiledPlan, dims: &Bindings, nb: i64, nh: i64) -> Vec<(i64, Vec<i64>)> {
    use attnc_ir::Expr;
    let mut roots: Vec<&Expr> = vec![&k.value];
    if let Some(d) = &plan.dot {
        roots.push(&d.b);
    }
    // Maximal subexpressions that mention h and nothing that varies inside the pack.
    fn collect(e: &Expr, out: &mut Vec<Expr>) -> bool {
        let fv = e.free_vars();
        if !fv.contains("h") {
            return true;
        }
        if fv.iter().all(|v| v == "h" || v == "b") && e.loads().is_empty() {
            out.push(e.clone());
            return true;
        }
        match e {
            Expr::Var(_) => false,
            Expr::Reduce { .. } => false,
            _ => e.children().into_iter().all(|c| collect(c, out)),
        }
    }
    let mut terms = Vec::new();
    let shareable = roots.iter().all(|r| collect(r, &mut terms));
    let mut groups: Vec<(i64, Vec<i64>)> = Vec::new();
    for b in 0..nb {
        // (shared?, key) -> heads; a head whose terms do not evaluate gets a key of its own.
        type Key = (bool, Vec<i64>);
        let mut by_key: Vec<(Key, Vec<i64>)> = Vec::new();
        for h in 0..nh {
            let at = |t: &Expr| attnc_ir::bind::eval_dims(&t.subst("h", &Expr::Int(h)).subst("b", &Expr::Int(b)), &dims.dims).ok();
            let key = match shareable.then(|| terms.iter().map(at).collect::<Option<Vec<i64>>>()).flatten() {
                Some(values) => (true, values),
                None => (false, vec![h]),
            };
            match by_key.iter_mut().find(|(k2, _)| *k2 == key) {
                Some(g) => g.1.push(h),
                None => by_key.push((key, vec![h])),
            }
        }
        groups.extend(by_key.into_iter().map(|(_, hs)| (b, hs)));
    }
    groups
}

/// Whether the tiled kernel can run this kernel (else only the row kernel can).
pub fn tiles_apply(k: &Kernel) -> bool {
    TiledPlan::new(k).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(kv_head: &str) -> Kernel {
        attnc_ir::parse_kernel(&format!(
            "(kernel t (dim B) (dim H) (dim G) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B G M D]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b {kv_head} j e)) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b {kv_head} j r0)))) (norm (softmax))))"
        ))
        .expect("kernel")
    }

    #[test]
    fn heads_sharing_a_kv_head_share_one_pack() {
        let dims = Bindings { dims: [("B", 2), ("H", 8), ("G", 2), ("N", 4), ("M", 4), ("D", 4)].iter().map(|(a, b)| (a.to_string(), *b)).collect() };
        let gqa = kernel("(// h (// $H $G))");
        let plan = TiledPlan::new(&gqa).expect("tiled");
        let groups = pack_groups(&gqa, &plan, &dims, 2, 8);
        assert_eq!(groups, vec![(0, vec![0, 1, 2, 3]), (0, vec![4, 5, 6, 7]), (1, vec![0, 1, 2, 3]), (1, vec![4, 5, 6, 7])]);
        let mqa = kernel("0");
        let plan = TiledPlan::new(&mqa).expect("tiled");
        assert_eq!(pack_groups(&mqa, &plan, &dims, 1, 8), vec![(0, (0..8).collect())]);
        let mha = kernel("h");
        let plan = TiledPlan::new(&mha).expect("tiled");
        assert_eq!(pack_groups(&mha, &plan, &dims, 1, 3), vec![(0, vec![0]), (0, vec![1]), (0, vec![2])]);
    }
}
