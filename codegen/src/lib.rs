//! attnc-codegen: from a verified kernel to code that runs.
//!
//! - [`schedule`]: how a kernel runs, decided once for every backend (algorithm, tiles,
//!   tile classes, head groups, softmax plan, workspace);
//! - [`host`]: what every backend's runtime needs on the host (inputs in storage form, the
//!   argument layout, launch checks);
//! - [`Backend`]: a target. It emits an artifact that prints as its source text from
//!   `(Kernel, KernelInfo, Schedule, Options)` (so only verified IR can be emitted),
//!   validates it, and loads it as a [`Compiled`] kernel that runs on [`host::Storage`];
//! - [`cpu`]: the CPU backend (Cranelift JIT for the host);
//! - [`wgsl`]: the WebGPU backend (WGSL, naga, wgpu);
//! - [`ptx`]: PTX for NVIDIA GPUs and its interpreter (`ptx-sim`).
//!
//! This is the only crate that knows Cranelift; it knows nothing of the surface language.
//! `docs/backends.md` says what a new backend writes.

pub mod cpu;
pub mod host;
pub mod ptx;
pub mod schedule;
pub mod wgsl;

use attnc_ir::reference::Tensor;
use attnc_ir::{Kernel, KernelInfo};
use host::{RunError, Storage};
use schedule::{Limits, Schedule, ScheduleOptions};
use std::collections::BTreeMap;

/// A backend's options: the schedule's (shared by every backend) and its own. They are part
/// of the autotune key and of cache entries, hence serde.
pub trait BackendOptions:
    Clone + std::hash::Hash + std::fmt::Debug + PartialEq + Default + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static
{
    fn schedule(&self) -> &ScheduleOptions;
    fn schedule_mut(&mut self) -> &mut ScheduleOptions;
    /// The options in a few words (test names, reports).
    fn describe(&self) -> String;
}

/// How far a backend's f32 output may be from the f64 reference: `|got − want| ≤ atol·rms +
/// rtol·|want|`, with `rms` the root mean square of the reference output's nonzero finite
/// values (at least 1e-3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// f32 arithmetic with libm-grade `exp` (the CPU).
    pub const F32: Tolerance = Tolerance { atol: 2e-4, rtol: 2e-3 };

    /// Whether `got` (f32 values) is within tolerance of `want`; else the first offending
    /// element. NaN must meet NaN and infinities must be equal.
    pub fn check(&self, got: &[f64], want: &[f64]) -> Result<(), (usize, f64, f64)> {
        // The output's typical magnitude: rows with no live key are exact zeros and do not
        // make it smaller.
        let finite: Vec<f64> = want.iter().copied().filter(|x| x.is_finite() && *x != 0.0).collect();
        let rms = (finite.iter().map(|x| x * x).sum::<f64>() / finite.len().max(1) as f64).sqrt();
        let atol = self.atol * rms.max(1e-3);
        let mut worst: Option<(usize, f64, f64)> = None;
        for (n, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = if w.is_nan() || g.is_nan() {
                w.is_nan() && g.is_nan()
            } else if w.is_infinite() {
                g == w
            } else {
                (g - w).abs() <= atol + self.rtol * w.abs()
            };
            if !ok && worst.is_none_or(|(_, wg, ww)| (g - w).abs() > (wg - ww).abs() || g.is_nan()) {
                worst = Some((n, g, w));
            }
        }
        match worst {
            None => Ok(()),
            Some(w) => Err(w),
        }
    }
}

/// A code generator and runtime for one target, in the manner of naga's `back::*::Writer`
/// and CubeCL's `Compiler`/`Runtime`.
pub trait Backend: Sync {
    /// `"cpu"`, `"ptx"`, `"wgsl"`: the name on the command line and in cache keys.
    const NAME: &'static str;
    type Options: BackendOptions;
    /// The generated program; `Display` prints its source (CLIF, PTX, WGSL).
    type Artifact: std::fmt::Display;
    /// A loaded kernel.
    type Kernel: Compiled + 'static;

    /// `Ok` when the backend can run here, else why not (a missing driver, no device).
    fn available(&self) -> Result<(), String>;
    /// The device fingerprint in cache keys: `cpu:x86_64+avx+avx2+fma`, `sm_90/driver 12.4`,
    /// an adapter's name, backend and driver.
    fn device(&self) -> String;
    /// What the target can hold (the schedule refuses more).
    fn limits(&self) -> Limits;
    /// How close to the reference this backend's results are.
    fn tolerance(&self) -> Tolerance;
    /// Generates the program for `k` run as `s`.
    fn emit(&self, k: &Kernel, info: &KernelInfo, s: &Schedule, o: &Self::Options) -> Result<Self::Artifact, CodegenError>;
    /// Checks the program (Cranelift's verifier, naga's validator, ptxas).
    fn validate(&self, a: &Self::Artifact) -> Result<(), CodegenError>;
    /// Makes the program runnable (JIT, module load, pipeline creation).
    fn load(&self, a: Self::Artifact) -> Result<Self::Kernel, CodegenError>;

    /// The schedule with this backend's options, in words (`tiled 64x64, Avx2 microkernel`).
    fn describe(&self, s: &Schedule, _o: &Self::Options) -> String {
        s.to_string()
    }

    /// Plans, emits, validates and loads.
    fn compile(&self, k: &Kernel, info: &KernelInfo, o: &Self::Options) -> Result<Self::Kernel, CodegenError> {
        let s = self.plan(k, info, o)?;
        let a = self.emit(k, info, &s, o)?;
        self.validate(&a)?;
        self.load(a)
    }

    /// Whether this backend takes these options (a thread count, a workgroup size within
    /// what makes sense); the schedule's own are checked by [`schedule::plan`].
    fn check_options(&self, _o: &Self::Options) -> Result<(), String> {
        Ok(())
    }

    /// The schedule `o` asks for on this target.
    fn plan(&self, k: &Kernel, info: &KernelInfo, o: &Self::Options) -> Result<Schedule, CodegenError> {
        self.check_options(o).map_err(CodegenError::Options)?;
        Ok(schedule::plan(k, info, o.schedule(), &self.limits())?)
    }
}

/// A loaded kernel: runs on inputs in storage form.
pub trait Compiled: Send + Sync {
    fn kernel(&self) -> &Kernel;
    fn schedule(&self) -> &Schedule;
    /// Which algorithm runs, in words (for `run`, `bench` and `explain`).
    fn describe(&self) -> String;
    /// Runs on borrowed inputs in storage form, writing the output into `out` (as many f32
    /// values as the output has; zero-initialized).
    fn run_into(&self, inputs: &host::Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32]) -> Result<(), RunError>;

    /// [`Compiled::run_into`], also writing the statistics a backward pass needs into
    /// `stats` (laid out as [`attnc_ir::reference::stats_shape`]; what each branch saves is
    /// [`attnc_ir::reference::run_with_stats`]'s contract).
    fn run_stats_into(&self, _inputs: &host::Inputs, _explicit: &BTreeMap<String, i64>, _out: &mut [f32], _stats: &mut [f32]) -> Result<(), RunError> {
        Err(RunError::Unsupported("this backend does not save the forward's statistics yet (the CPU backend and the reference do)".into()))
    }

    /// Runs on named inputs; returns the output and the saved statistics
    /// ([`Compiled::run_stats_into`]).
    fn run_with_stats(&self, inputs: &BTreeMap<String, Tensor>, explicit: &BTreeMap<String, i64>) -> Result<(Tensor, Tensor), RunError> {
        let st = Storage::from_f64(self.kernel(), inputs);
        let dims = attnc_ir::bind(self.kernel(), &st.shapes, explicit)?;
        let shape = dims.shape(self.kernel().output());
        let sshape = attnc_ir::reference::stats_shape(self.kernel(), &dims);
        let mut out = vec![0f32; shape.iter().product()];
        let mut stats = vec![0f32; sshape.iter().product()];
        self.run_stats_into(&st.view(), explicit, &mut out, &mut stats)?;
        let f64s = |v: Vec<f32>| v.into_iter().map(|x| x as f64).collect();
        Ok((Tensor::new(shape, f64s(out)), Tensor::new(sshape, f64s(stats))))
    }

    /// The bound this kernel states when it rounds more than f32 arithmetic does (the PTX
    /// tensor-core kernel's bf16 weights); `None`: the backend's [`Backend::tolerance`].
    fn stated_tolerance(&self) -> Option<Tolerance> {
        None
    }

    /// The output's shape for inputs of these shapes.
    fn output_shape(&self, shapes: &BTreeMap<String, Vec<usize>>, explicit: &BTreeMap<String, i64>) -> Result<Vec<usize>, RunError> {
        let dims = attnc_ir::bind(self.kernel(), shapes, explicit)?;
        Ok(dims.shape(self.kernel().output()))
    }

    /// Runs on inputs in storage form; returns the output's shape and f32 values.
    fn run_storage(&self, st: &Storage, explicit: &BTreeMap<String, i64>) -> Result<(Vec<usize>, Vec<f32>), RunError> {
        let shape = self.output_shape(&st.shapes, explicit)?;
        let mut out = vec![0f32; shape.iter().product()];
        self.run_into(&st.view(), explicit, &mut out)?;
        Ok((shape, out))
    }
    /// Checks index bounds on `spec`, the kernel as written (whose meaning the reference
    /// fixes), instead of on the compiled kernel (see [`host::BoundsCheck`]).
    fn set_bounds_source(&mut self, spec: Kernel);

    /// [`Compiled::set_bounds_source`], by value.
    fn checking(mut self, spec: &Kernel) -> Self
    where
        Self: Sized,
    {
        self.set_bounds_source(spec.clone());
        self
    }

    /// Runs on named inputs (f64 values, rounded to the tensors' storage types).
    fn run(&self, inputs: &BTreeMap<String, Tensor>, explicit: &BTreeMap<String, i64>) -> Result<Tensor, RunError> {
        let (shape, data) = self.run_storage(&Storage::from_f64(self.kernel(), inputs), explicit)?;
        Ok(Tensor::new(shape, data.iter().map(|x| *x as f64).collect()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("the target is not supported here: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Schedule(#[from] schedule::ScheduleError),
    #[error("{0}")]
    Options(String),
    #[error("code generation failed: {0}")]
    Emit(String),
    #[error("generated code is invalid (a bug in attnc): {0}")]
    Invalid(String),
}
