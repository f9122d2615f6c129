//! The CPU backend: Cranelift JIT for the host (x86-64 or aarch64).
//!
//! [`CpuKernel::compile`] generates and JIT-compiles one `attend` function per kernel plus
//! one `derive_T` per derived tensor (see [`gen`] for what they compute); [`CpuKernel::run`]
//! binds dims from the input shapes, converts inputs to f32/i32, computes derived tensors,
//! and runs `attend` over (batch, head, query tile) on rayon's thread pool.
//!
//! Known limits of this version: the key loop is scalar (one key at a time, no f32x4
//! tiles, no matmul microkernel, no block skipping), so it is correct for every spec but
//! far from peak speed; see the README's status section.

mod gen;

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

/// Code-generation choices for the CPU (part of the autotune key).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CpuOptions {
    /// Use the FMA extension when the host has it (x86-64). Off: lane-wise `fmaf` calls.
    pub fma: bool,
    /// Query rows per parallel task.
    pub rows_per_task: usize,
    /// Worker threads (0: rayon's default, one per core).
    pub threads: usize,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            fma: true,
            rows_per_task: 16,
            threads: 0,
        }
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
        flags.push("neon");
        HostFeatures {
            arch: std::env::consts::ARCH,
            flags,
        }
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
    let set = |b: &mut settings::Builder, k: &str, v: &str| {
        b.set(k, v)
            .map_err(|e| CodegenError::Emit(format!("cranelift setting {k}: {e}")))
    };
    set(&mut shared, "opt_level", "speed")?;
    set(&mut shared, "is_pic", "false")?;
    set(&mut shared, "use_colocated_libcalls", "false")?;
    let mut ib = cranelift_native::builder()
        .map_err(|e| CodegenError::Unsupported(format!("host ISA: {e}")))?;
    if !o.fma && cfg!(target_arch = "x86_64") {
        ib.set("has_fma", "false")
            .map_err(|e| CodegenError::Emit(format!("has_fma: {e}")))?;
    }
    ib.finish(settings::Flags::new(shared))
        .map_err(|e| CodegenError::Emit(format!("ISA: {e}")))
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

/// Which function a [`FuncSpec`] generates.
enum FuncKind {
    Derive(String),
    Attend,
}

fn signature(module: &JITModule, kind: &FuncKind) -> Signature {
    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(ptr));
    let ints = match kind {
        FuncKind::Derive(_) => 2,
        FuncKind::Attend => 4,
    };
    for _ in 0..ints {
        sig.params.push(AbiParam::new(types::I64));
    }
    if let FuncKind::Attend = kind {
        sig.params.push(AbiParam::new(ptr));
    }
    sig
}

/// Generates one function's CLIF into `ctx.func`.
fn build(
    module: &mut JITModule,
    ctx: &mut Context,
    fctx: &mut FunctionBuilderContext,
    k: &Kernel,
    layout: &Layout,
    kind: &FuncKind,
    libs: &BTreeMap<&'static str, FuncId>,
) {
    let b = FunctionBuilder::new(&mut ctx.func, fctx);
    let refs = libs
        .iter()
        .map(|(n, id)| (*n, module.declare_func_in_func(*id, b.func)))
        .collect();
    let (mut g, params) = Gen::new(b, k, layout, refs);
    match kind {
        FuncKind::Derive(t) => g.derive(t, params[1], params[2]),
        FuncKind::Attend => g.attend(params[1], params[2], params[3], params[4], params[5]),
    }
    g.finish(module.target_config());
}

type AttendFn = unsafe extern "C" fn(*const i64, i64, i64, i64, i64, *mut f32);
type DeriveFn = unsafe extern "C" fn(*const i64, i64, i64);

/// A JIT-compiled kernel, ready to run.
pub struct CpuKernel {
    kernel: Kernel,
    layout: Layout,
    attend: AttendFn,
    derives: Vec<(String, DeriveFn)>,
    options: CpuOptions,
    /// Owns the machine code the function pointers point into.
    _module: JITModule,
    pub clif: ClifArtifact,
}

// The JIT module is only kept alive, never mutated after `finalize_definitions`; the
// functions are pure code reading their arguments, so they can be called from any thread.
unsafe impl Send for CpuKernel {}
unsafe impl Sync for CpuKernel {}

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
    pub fn compile(
        k: &Kernel,
        _info: &KernelInfo,
        o: &CpuOptions,
    ) -> Result<CpuKernel, CodegenError> {
        let isa = host_isa(o)?;
        let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
        let lib_list = gen::libcalls();
        for (name, _, addr) in &lib_list {
            jb.symbol(*name, *addr);
        }
        let mut module = JITModule::new(jb);
        let mut libs = BTreeMap::new();
        for (name, arity, _) in &lib_list {
            let mut sig = module.make_signature();
            for _ in 0..*arity {
                sig.params.push(AbiParam::new(types::F32));
            }
            sig.returns.push(AbiParam::new(types::F32));
            let id = module
                .declare_function(name, Linkage::Import, &sig)
                .map_err(|e| CodegenError::Emit(e.to_string()))?;
            libs.insert(*name, id);
        }
        let layout = Layout::new(k);
        let mut kinds: Vec<FuncKind> = k
            .derived()
            .map(|t| FuncKind::Derive(t.name.clone()))
            .collect();
        kinds.push(FuncKind::Attend);
        let mut ctx = module.make_context();
        let mut fctx = FunctionBuilderContext::new();
        let mut ids = Vec::new();
        let mut clif = Vec::new();
        for kind in &kinds {
            let name = match kind {
                FuncKind::Derive(t) => format!("derive_{t}"),
                FuncKind::Attend => "attend".to_string(),
            };
            let sig = signature(&module, kind);
            let id = module
                .declare_function(&name, Linkage::Local, &sig)
                .map_err(|e| CodegenError::Emit(e.to_string()))?;
            ctx.func.signature = sig;
            ctx.func.name = UserFuncName::user(0, id.as_u32());
            build(&mut module, &mut ctx, &mut fctx, k, &layout, kind, &libs);
            cranelift::codegen::verify_function(&ctx.func, module.isa().flags())
                .map_err(|e| CodegenError::Invalid(format!("{name}: {e}")))?;
            clif.push((name.clone(), ctx.func.display().to_string()));
            module
                .define_function(id, &mut ctx)
                .map_err(|e| CodegenError::Emit(format!("{name}: {e:?}")))?;
            module.clear_context(&mut ctx);
            ids.push((kind, id));
        }
        module
            .finalize_definitions()
            .map_err(|e| CodegenError::Emit(e.to_string()))?;
        let mut derives = Vec::new();
        let mut attend: Option<AttendFn> = None;
        for (kind, id) in ids {
            let p = module.get_finalized_function(id);
            // SAFETY: each function was generated with exactly this signature (`signature`).
            match kind {
                FuncKind::Derive(t) => derives.push((t.clone(), unsafe {
                    std::mem::transmute::<*const u8, DeriveFn>(p)
                })),
                FuncKind::Attend => {
                    attend = Some(unsafe { std::mem::transmute::<*const u8, AttendFn>(p) })
                }
            }
        }
        Ok(CpuKernel {
            kernel: k.clone(),
            layout,
            attend: attend.expect("attend is generated"),
            derives,
            options: o.clone(),
            _module: module,
            clif: ClifArtifact { functions: clif },
        })
    }

    /// Runs on named inputs (f64 values, rounded to the tensors' storage types).
    pub fn run(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        explicit: &BTreeMap<String, i64>,
    ) -> Result<Tensor, RunError> {
        let shapes = inputs
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        let dims = bind(&self.kernel, &shapes, explicit)?;
        self.check_divisors(&dims)?;
        let k = &self.kernel;
        // Storage: every tensor as a flat f32 or i32 buffer (4 bytes per element).
        let mut bufs: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for t in &k.tensors {
            let n: usize = dims.shape(t).iter().product();
            let data = match &t.kind {
                TensorKind::Input => {
                    let src = &inputs[&t.name];
                    if t.dtype.is_int() {
                        src.data.iter().map(|x| (*x as i32) as u32).collect()
                    } else {
                        src.data.iter().map(|x| (*x as f32).to_bits()).collect()
                    }
                }
                _ => vec![0u32; n.max(1)],
            };
            bufs.insert(t.name.clone(), data);
        }
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
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.options.threads)
            .build()
            .map_err(|e| RunError::Threads(e.to_string()))?;
        let fp = FramePtr(frame.as_ptr());
        pool.install(|| {
            use rayon::prelude::*;
            for (name, f) in &self.derives {
                let t = k.tensor(name).expect("derived tensor");
                let shape = dims.shape(t);
                let first = shape.first().copied().unwrap_or(1) as i64;
                let scan_first = matches!(
                    &t.kind,
                    TensorKind::Derived {
                        def: attnc_ir::TensorDef::Cumsum { axis: 0, .. },
                        ..
                    }
                );
                let f = *f;
                if scan_first || shape.is_empty() {
                    // SAFETY: the frame describes live buffers of the bound shapes.
                    unsafe { f(fp.get(), 0, first) };
                } else {
                    (0..first)
                        .into_par_iter()
                        .for_each(|x| unsafe { f(fp.get(), x, x + 1) });
                }
            }
            let (nb, nh, ni) = (
                dims.extent(&k.iter.b),
                dims.extent(&k.iter.h),
                dims.extent(&k.iter.i),
            );
            let ev = dims.extent(&k.iter.e) as usize;
            let step = self.options.rows_per_task.max(1) as i64;
            let tasks: Vec<(i64, i64, i64)> = (0..nb)
                .flat_map(|b| {
                    (0..nh)
                        .flat_map(move |h| (0..ni).step_by(step as usize).map(move |i| (b, h, i)))
                })
                .collect();
            let attend = self.attend;
            tasks.par_iter().for_each_init(
                || vec![0f32; 2 * ev.max(1)],
                |ws, &(b, h, i)| {
                    // SAFETY: tasks write disjoint output rows; ws holds 2·Ev floats.
                    unsafe { attend(fp.get(), b, h, i, (i + step).min(ni), ws.as_mut_ptr()) };
                },
            );
        });
        let out = k.output();
        let data = bufs[&out.name]
            .iter()
            .map(|b| f32::from_bits(*b) as f64)
            .collect();
        Ok(Tensor::new(dims.shape(out), data))
    }

    /// Integer divisors are dim expressions (E0008); a zero one would be a run-time fault.
    fn check_divisors(&self, dims: &Bindings) -> Result<(), RunError> {
        let mut err = None;
        for (label, e) in self.kernel.exprs() {
            e.walk(&mut |x| {
                if let attnc_ir::Expr::Binary(
                    attnc_ir::BinOp::FloorDiv | attnc_ir::BinOp::Mod,
                    _,
                    d,
                ) = x
                {
                    if d.free_vars().is_empty() && d.loads().is_empty() {
                        if let Ok(0) = attnc_ir::bind::eval_dims(d, &dims.dims) {
                            err.get_or_insert(format!(
                                "{label}: the divisor `{}` is 0 for these dims",
                                attnc_ir::pretty::infix(d)
                            ));
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
    fn emit(
        &self,
        k: &Kernel,
        info: &KernelInfo,
        o: &CpuOptions,
    ) -> Result<ClifArtifact, CodegenError> {
        Ok(CpuKernel::compile(k, info, o)?.clif)
    }
    fn validate(&self, _a: &ClifArtifact) -> Result<(), CodegenError> {
        // Every function is run through Cranelift's verifier as it is emitted.
        Ok(())
    }
}
