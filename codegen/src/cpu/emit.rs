//! Emission: from a kernel and its [`Schedule`] to Cranelift functions ([`CpuArtifact`]),
//! and loading them as machine code ([`CpuKernel`]).
//!
//! The functions of a kernel: one `derive_T` per derived tensor, and per algorithm `attend`
//! (row kernel), `pack` and `tile` (tiled kernel; with `mm_qk`/`mm_pv` when the matmuls are
//! generated instead of imported from the microkernels), or nothing more (chunked: the
//! algorithm is Rust, [`super::chunked`]). Each entry point's Cranelift signature is derived
//! from its Rust function type ([`Abi`]), so the two cannot disagree.

use super::gen::{self, Gen};
use super::{microkernel, tiled, CpuKernel, CpuOptions, Path};
use crate::host::ArgLayout;
use crate::schedule::{Algorithm, Schedule};
use crate::CodegenError;
use attnc_ir::Kernel;
use cranelift::codegen::ir::{Function, UserFuncName};
use cranelift::codegen::{isa, Context};
use cranelift::prelude::*;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use std::collections::BTreeMap;

/// `attend(frame, b, h, i_lo, i_hi, ws)`.
pub(crate) type AttendFn = unsafe extern "C" fn(*const i64, i64, i64, i64, i64, *mut f32);
/// `derive_T(frame, lo, hi)`.
pub(crate) type DeriveFn = unsafe extern "C" fn(*const i64, i64, i64);
/// `pack(frame, b, h, kt, vb)`.
pub(crate) type PackFn = unsafe extern "C" fn(*const i64, i64, i64, *mut f32, *mut f32);
/// `tile(frame, b, h, i0, kt, vb, ws, classes)`.
pub(crate) type TileFn = unsafe extern "C" fn(*const i64, i64, i64, i64, *const f32, *const f32, *mut f32, *const u8);

/// A Rust `extern "C"` function type whose parameters are pointers and `i64`s: its
/// Cranelift signature.
pub(crate) trait Abi {
    /// Per parameter: a pointer (else an `i64`).
    fn pointers() -> Vec<bool>;
}

pub(crate) trait AbiArg {
    const POINTER: bool;
}
impl AbiArg for i64 {
    const POINTER: bool = false;
}
impl<T> AbiArg for *const T {
    const POINTER: bool = true;
}
impl<T> AbiArg for *mut T {
    const POINTER: bool = true;
}

macro_rules! abi_fn {
    ($($a:ident),*) => {
        impl<$($a: AbiArg),*> Abi for unsafe extern "C" fn($($a),*) {
            fn pointers() -> Vec<bool> {
                vec![$($a::POINTER),*]
            }
        }
    };
}
abi_fn!(A, B, C);
abi_fn!(A, B, C, D, E);
abi_fn!(A, B, C, D, E, F);
abi_fn!(A, B, C, D, E, F, G);
abi_fn!(A, B, C, D, E, F, G, H);
abi_fn!(A, B, C, D, E, F, G, H, I, J);

/// The functions generated (or imported) for a kernel.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum FuncKind {
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
    /// The microkernel's weights of a per-key statistic (imported, never generated).
    ExpCols,
    /// The microkernel's capped scores (imported, never generated).
    TanhScale,
    /// The microkernel's `qk` against key rows in place (imported, never generated).
    QkDirect,
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
            FuncKind::ExpCols => "exp_cols".into(),
            FuncKind::TanhScale => "tanh_scale".into(),
            FuncKind::QkDirect => "qk_direct".into(),
        }
    }

    /// Per parameter, whether it is a pointer (from the function's Rust type).
    fn pointers(&self) -> Vec<bool> {
        match self {
            FuncKind::Derive(_) => DeriveFn::pointers(),
            FuncKind::Attend => AttendFn::pointers(),
            FuncKind::Pack => PackFn::pointers(),
            FuncKind::Tile => TileFn::pointers(),
            FuncKind::MmQk => microkernel::QkFn::pointers(),
            FuncKind::MmPv => microkernel::PvFn::pointers(),
            FuncKind::Softmax => microkernel::SoftmaxFn::pointers(),
            FuncKind::QkMax => microkernel::QkMaxFn::pointers(),
            FuncKind::Weights => microkernel::WeightsFn::pointers(),
            FuncKind::ExpCols => microkernel::ExpColsFn::pointers(),
            FuncKind::TanhScale => microkernel::TanhScaleFn::pointers(),
            FuncKind::QkDirect => microkernel::QkDirectFn::pointers(),
        }
    }
}

fn signature(module: &JITModule, kind: &FuncKind) -> Signature {
    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    for p in kind.pointers() {
        sig.params.push(AbiParam::new(if p { ptr } else { types::I64 }));
    }
    sig
}

/// What generating any one function needs.
struct Ctx<'a> {
    k: &'a Kernel,
    schedule: &'a Schedule,
    layout: &'a ArgLayout,
    libs: &'a BTreeMap<&'static str, FuncId>,
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
                exp_cols: m.exp_cols.map(|x| module.declare_func_in_func(x, b.func)),
                tanh_scale: m.tanh_scale.map(|x| module.declare_func_in_func(x, b.func)),
                qk_direct: m.qk_direct.map(|x| module.declare_func_in_func(x, b.func)),
            }),
        )
    });
    let framed = !matches!(kind, FuncKind::MmQk | FuncKind::MmPv);
    let (mut g, p) = Gen::new(b, cx.k, if framed { Some(cx.layout) } else { None }, refs);
    g.optimized = cx.o.clif_opt;
    g.direct = cx.mm.is_some_and(|(_, _, s)| s.is_some_and(|s| s.qk_direct.is_some()));
    let tiled = || cx.schedule.tiled().expect("a tiled schedule");
    match kind {
        FuncKind::Derive(t) => g.derive(t, p[1], p[2]),
        FuncKind::Attend => g.attend(p[1], p[2], p[3], p[4], p[5]),
        FuncKind::Pack => g.pack(tiled(), p[1], p[2], p[3], p[4]),
        FuncKind::Tile => g.tile(tiled(), [p[1], p[2], p[3], p[4], p[5], p[6], p[7]], mm.expect("matmuls declared")),
        FuncKind::MmQk => tiled::gen_qk(&mut g, &p),
        FuncKind::MmPv => tiled::gen_pv(&mut g, &p),
        FuncKind::Softmax | FuncKind::QkMax | FuncKind::Weights | FuncKind::ExpCols | FuncKind::TanhScale | FuncKind::QkDirect => {
            unreachable!("the softmax helpers are imported, not generated")
        }
    }
    g.finish(module.target_config());
}

/// One emitted function.
struct Emitted {
    kind: FuncKind,
    name: String,
    id: FuncId,
    func: Function,
}

/// The generated functions of a kernel as Cranelift IR, in a module that has declared them
/// and their imports: the CPU backend's artifact. `Display` prints the CLIF.
pub struct CpuArtifact {
    kernel: Kernel,
    schedule: Schedule,
    options: CpuOptions,
    layout: ArgLayout,
    module: JITModule,
    functions: Vec<Emitted>,
}

impl std::fmt::Display for CpuArtifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.functions {
            writeln!(f, "; {}", e.name)?;
            writeln!(f, "{}", e.func.display())?;
        }
        Ok(())
    }
}

/// Emits the functions of `k` under `s` for `isa`.
pub(crate) fn emit(k: &Kernel, s: &Schedule, o: &CpuOptions, isa: isa::OwnedTargetIsa) -> Result<CpuArtifact, CodegenError> {
    let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
    let lib_list = gen::libcalls();
    for (name, _, addr) in &lib_list {
        jb.symbol(*name, *addr);
    }
    let mk = microkernel::Isa::resolve(o.isa).map_err(CodegenError::Unsupported)?;
    let (mk_qk, mk_pv) = microkernel::kernels(mk);
    jb.symbol("attnc_mk_qk", mk_qk as *const u8);
    jb.symbol("attnc_mk_pv", mk_pv as *const u8);
    jb.symbol("attnc_mk_softmax", microkernel::softmax_kernel(mk) as *const u8);
    jb.symbol("attnc_mk_qk_max", microkernel::qk_max_kernel(mk) as *const u8);
    jb.symbol("attnc_mk_weights", microkernel::weights_kernel(mk) as *const u8);
    jb.symbol("attnc_mk_exp_cols", microkernel::exp_cols_kernel(mk) as *const u8);
    jb.symbol("attnc_mk_tanh_scale", microkernel::tanh_scale_kernel(mk) as *const u8);
    jb.symbol("attnc_mk_qk_direct", microkernel::qk_direct_kernel(mk) as *const u8);
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
    let layout = ArgLayout::new(k).with_stats().with_kept();
    let mut kinds: Vec<FuncKind> = k.derived().map(|t| FuncKind::Derive(t.name.clone())).collect();
    let mut mm = None;
    match &s.algorithm {
        Algorithm::Tiled(t) => {
            kinds.push(FuncKind::Pack);
            // The per-key weights routine only where a map takes `exp(s − t)` of a key statistic.
            let key_stat = t.workspace.key_stat;
            let mut import = |name: &str, kind: FuncKind| module.declare_function(name, Linkage::Import, &signature(&module, &kind)).map_err(err);
            mm = Some(if o.microkernel {
                let q = import("attnc_mk_qk", FuncKind::MmQk)?;
                let p = import("attnc_mk_pv", FuncKind::MmPv)?;
                let s = import("attnc_mk_softmax", FuncKind::Softmax)?;
                let m = import("attnc_mk_qk_max", FuncKind::QkMax)?;
                let w = import("attnc_mk_weights", FuncKind::Weights)?;
                let x = if key_stat { Some(import("attnc_mk_exp_cols", FuncKind::ExpCols)?) } else { None };
                // The capped-score routine only where a softmax branch has a tanh cap.
                let capped = t.plan.branches.iter().any(|b| b.softmax.as_ref().is_some_and(|s| s.tanh_cap.is_some()));
                let c = if capped { Some(import("attnc_mk_tanh_scale", FuncKind::TanhScale)?) } else { None };
                // The keys in place for a few query rows where the plan has one key panel.
                let d = if tiled::direct_keys_apply(&t.plan) { Some(import("attnc_mk_qk_direct", FuncKind::QkDirect)?) } else { None };
                (q, p, Some(tiled::SoftmaxKernels { step: s, qk_max: m, weights: w, exp_cols: x, tanh_scale: c, qk_direct: d }))
            } else {
                kinds.push(FuncKind::MmQk);
                kinds.push(FuncKind::MmPv);
                let q = module.declare_function("mm_qk", Linkage::Local, &signature(&module, &FuncKind::MmQk)).map_err(err)?;
                let p = module.declare_function("mm_pv", Linkage::Local, &signature(&module, &FuncKind::MmPv)).map_err(err)?;
                (q, p, None)
            });
            kinds.push(FuncKind::Tile);
        }
        Algorithm::Rows => kinds.push(FuncKind::Attend),
        Algorithm::Chunked(_) => {}
    }
    let cx = Ctx { k, schedule: s, layout: &layout, libs: &libs, mm, o };
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut functions = Vec::new();
    for kind in kinds {
        let name = kind.name();
        let sig = signature(&module, &kind);
        let id = match (&kind, mm) {
            (FuncKind::MmQk, Some((q, _, _))) => q,
            (FuncKind::MmPv, Some((_, p, _))) => p,
            _ => module.declare_function(&name, Linkage::Local, &sig).map_err(err)?,
        };
        ctx.func.signature = sig;
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        build(&mut module, &mut ctx, &mut fctx, &cx, &kind);
        functions.push(Emitted { kind, name, id, func: ctx.func.clone() });
        module.clear_context(&mut ctx);
    }
    Ok(CpuArtifact { kernel: k.clone(), schedule: s.clone(), options: o.clone(), layout, module, functions })
}

/// Runs Cranelift's verifier on every function.
pub(crate) fn validate(a: &CpuArtifact) -> Result<(), CodegenError> {
    for e in &a.functions {
        cranelift::codegen::verify_function(&e.func, a.module.isa().flags()).map_err(|err| CodegenError::Invalid(format!("{}: {err}", e.name)))?;
    }
    Ok(())
}

/// Compiles every function to machine code (with its disassembly when `disasm`) and makes
/// the kernel callable.
pub(crate) fn load(a: CpuArtifact, disasm: bool) -> Result<CpuKernel, CodegenError> {
    let CpuArtifact { kernel, schedule, options, layout, mut module, functions } = a;
    let clif = functions.iter().map(|e| (e.name.clone(), e.func.display().to_string())).collect();
    let mut ctx = module.make_context();
    let mut asm = Vec::new();
    for e in &functions {
        ctx.func = e.func.clone();
        ctx.set_disasm(disasm);
        module.define_function(e.id, &mut ctx).map_err(|err| CodegenError::Emit(format!("{}: {err:?}", e.name)))?;
        if disasm {
            asm.push((e.name.clone(), ctx.compiled_code().and_then(|c| c.vcode.clone()).unwrap_or_default()));
        }
        module.clear_context(&mut ctx);
    }
    module.finalize_definitions().map_err(|e| CodegenError::Emit(e.to_string()))?;
    let mut derives = Vec::new();
    let (mut attend, mut pack, mut tile) = (None, None, None);
    for e in functions {
        let p = module.get_finalized_function(e.id);
        // SAFETY: each function was generated with the signature of exactly this type
        // (`FuncKind::pointers` reads it off the type).
        unsafe {
            match e.kind {
                FuncKind::Derive(t) => derives.push((t, std::mem::transmute::<*const u8, DeriveFn>(p))),
                FuncKind::Attend => attend = Some(std::mem::transmute::<*const u8, AttendFn>(p)),
                FuncKind::Pack => pack = Some(std::mem::transmute::<*const u8, PackFn>(p)),
                FuncKind::Tile => tile = Some(std::mem::transmute::<*const u8, TileFn>(p)),
                FuncKind::MmQk
                | FuncKind::MmPv
                | FuncKind::Softmax
                | FuncKind::QkMax
                | FuncKind::Weights
                | FuncKind::ExpCols
                | FuncKind::TanhScale
                | FuncKind::QkDirect => {}
            }
        }
    }
    let path = match &schedule.algorithm {
        Algorithm::Chunked(_) => Path::Chunked,
        Algorithm::Tiled(_) => Path::Tiled { pack: pack.expect("generated"), tile: tile.expect("generated") },
        Algorithm::Rows => Path::Rows(attend.expect("generated")),
    };
    let pool = match options.threads {
        0 => None,
        n => Some(rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| CodegenError::Unsupported(format!("thread pool: {e}")))?),
    };
    let value_tensors = crate::host::masked_value_tensors(&kernel);
    Ok(CpuKernel {
        kernel,
        schedule,
        layout,
        path,
        derives,
        options,
        pool,
        classifier: Default::default(),
        bounds: Default::default(),
        bounds_source: None,
        value_tensors,
        row_fallback: Default::default(),
        permuted: None,
        derived_pool: Default::default(),
        scratch: Default::default(),
        _module: module,
        clif,
        asm,
    })
}
