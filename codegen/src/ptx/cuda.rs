//! The PTX backend on an NVIDIA GPU, through cudarc (the driver API, loaded at run time):
//! the module the emitter writes is JIT-compiled by the driver (`cuModuleLoadData`) and its
//! entries launched in order on one stream, with the same buffers and argument table as
//! the interpreter ([`super::run_on`]).
//!
//! Without libcuda (no NVIDIA driver) or without a device, [`PtxBackend::available`] says
//! so and nothing calls into the driver (cudarc panics when libcuda is missing, so its
//! presence is probed first).

use super::{run_on, CallState, PtxArtifact, PtxDevice, PtxOptions};
use crate::host::{Inputs, RunError};
use crate::schedule::{Limits, Schedule};
use crate::{Backend, BackendOptions, CodegenError, Compiled, Tolerance};
use attnc_ir::{Kernel, KernelInfo};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The NVIDIA GPU backend (`--backend ptx`).
#[derive(Clone, Copy, Debug, Default)]
pub struct PtxBackend;

/// Device 0's context, or why there is none: probed once per process (`available`,
/// `device` and `load` all ask).
pub fn context() -> Result<Arc<CudaContext>, String> {
    static CONTEXT: std::sync::OnceLock<Result<Arc<CudaContext>, String>> = std::sync::OnceLock::new();
    CONTEXT
        .get_or_init(|| {
            // SAFETY: only probes for the library; no driver call is made.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("no NVIDIA driver on this machine (libcuda.so was not found): `--backend ptx` needs an NVIDIA GPU; `--backend ptx-sim` runs the same PTX in attnc's interpreter".into());
            }
            CudaContext::new(0).map_err(|e| format!("the NVIDIA driver is present but device 0 cannot be opened: {e}"))
        })
        .clone()
}

impl Backend for PtxBackend {
    const NAME: &'static str = "ptx";
    type Options = PtxOptions;
    type Artifact = PtxArtifact;
    type Kernel = CudaKernel;

    fn available(&self) -> Result<(), String> {
        context().map(|_| ())
    }

    fn device(&self) -> String {
        match context() {
            Ok(ctx) => {
                let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
                let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
                format!("cuda:{name} sm_{major}{minor}")
            }
            Err(_) => "cuda:none".into(),
        }
    }

    fn limits(&self) -> Limits {
        Limits { task_workspace_bytes: super::SHARED_BYTES, staged_tiles: true }
    }

    /// `ex2.approx` and `lg2.approx` (relative 2^-22): the interpreter's bound.
    fn tolerance(&self) -> Tolerance {
        super::PtxSimBackend.tolerance()
    }

    fn check_options(&self, o: &PtxOptions) -> Result<(), String> {
        super::PtxSimBackend.check_options(o)
    }

    fn emit(&self, k: &Kernel, info: &KernelInfo, s: &Schedule, o: &PtxOptions) -> Result<PtxArtifact, CodegenError> {
        super::PtxSimBackend.emit(k, info, s, o)
    }

    /// The interpreter's parser (instructions attnc knows); the driver's JIT checks the rest
    /// at load.
    fn validate(&self, a: &PtxArtifact) -> Result<(), CodegenError> {
        super::PtxSimBackend.validate(a)
    }

    fn load(&self, a: PtxArtifact) -> Result<CudaKernel, CodegenError> {
        let ctx = context().map_err(CodegenError::Unsupported)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(a.source.clone()))
            .map_err(|e| CodegenError::Invalid(format!("the driver refuses the PTX module: {e}")))?;
        let mut functions = BTreeMap::new();
        for name in a.entries.iter().map(|e| e.name()) {
            let f = module.load_function(&name).map_err(|e| CodegenError::Invalid(format!("entry `{name}`: {e}")))?;
            functions.insert(name, f);
        }
        let stream = ctx.default_stream();
        Ok(CudaKernel { art: a, _module: module, functions, stream, state: CallState::default() })
    }

    fn describe(&self, s: &Schedule, o: &PtxOptions) -> String {
        format!("{s}, {}", o.describe())
    }
}

/// A module loaded on the GPU.
pub struct CudaKernel {
    pub art: PtxArtifact,
    _module: Arc<CudaModule>,
    functions: BTreeMap<String, CudaFunction>,
    stream: Arc<CudaStream>,
    state: CallState,
}

/// One call's buffers on the GPU.
struct GpuDevice<'k> {
    k: &'k CudaKernel,
    bufs: Option<[CudaSlice<u8>; 3]>,
}

fn driver(e: cudarc::driver::DriverError) -> RunError {
    RunError::Device(format!("CUDA: {e}"))
}

impl PtxDevice for GpuDevice<'_> {
    fn upload(&mut self, args: &[u8], inp: &[u8], buf: usize) -> Result<(), RunError> {
        let s = &self.k.stream;
        // Empty buffers still get a byte, so every parameter is a valid address.
        let pad = |b: &[u8]| if b.is_empty() { vec![0u8] } else { b.to_vec() };
        self.bufs =
            Some([s.clone_htod(&pad(args)).map_err(driver)?, s.clone_htod(&pad(inp)).map_err(driver)?, s.alloc_zeros::<u8>(buf.max(1)).map_err(driver)?]);
        Ok(())
    }
    fn launch(&mut self, name: &str, blocks: u32, threads: u32) -> Result<(), RunError> {
        let f = self.k.functions.get(name).ok_or_else(|| RunError::Device(format!("no entry `{name}` in the module")))?;
        let [args, inp, buf] = self.bufs.as_mut().expect("uploaded first");
        let mut l = self.k.stream.launch_builder(f);
        l.arg(&*args).arg(&*inp).arg(buf);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the entry takes the three buffers' addresses, as `run_on` laid them out;
        // every index is clamped into its tensor by the emitted code.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        Ok(())
    }
    fn read(&mut self, at: usize, len: usize) -> Result<Vec<u8>, RunError> {
        let [_, _, buf] = self.bufs.as_ref().expect("uploaded first");
        if len == 0 {
            return Ok(Vec::new());
        }
        self.k.stream.clone_dtoh(&buf.slice(at..at + len)).map_err(driver)
    }
}

impl CudaKernel {
    /// Times `runs` calls on inputs already on the GPU (after one untimed call): each the
    /// derive passes and the attention entry between two CUDA events, in seconds.
    pub fn time(&self, st: &Inputs, runs: usize) -> Result<Vec<f64>, RunError> {
        let k = &self.art.kernel;
        let out_len = attnc_ir::bind(k, &st.shapes, &BTreeMap::new())?.shape(k.output()).iter().product();
        let call = super::Call::new(&self.art, &self.state, st, &BTreeMap::new(), out_len)?;
        let mut dev = GpuDevice { k: self, bufs: None };
        dev.upload(&call.args, &call.inp, call.buf)?;
        let mut times = Vec::new();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        for n in 0..=runs {
            let start = self.stream.record_event(timing).map_err(driver)?;
            for l in call.derives.iter().chain([&call.attend]) {
                dev.launch(&l.name, l.blocks, l.threads)?;
            }
            let end = self.stream.record_event(timing).map_err(driver)?;
            let ms = start.elapsed_ms(&end).map_err(driver)?;
            if n == 0 {
                call.check_bounds(k, &self.state, st, &mut dev)?;
            } else {
                times.push(ms as f64 / 1e3);
            }
        }
        Ok(times)
    }
}

impl Compiled for CudaKernel {
    fn kernel(&self) -> &Kernel {
        &self.art.kernel
    }
    fn schedule(&self) -> &Schedule {
        &self.art.schedule
    }
    fn describe(&self) -> String {
        self.art.options.describe()
    }
    fn set_bounds_source(&mut self, spec: Kernel) {
        self.state.bounds_source = Some(spec);
    }
    fn stated_tolerance(&self) -> Option<Tolerance> {
        self.art.stated_tolerance()
    }
    fn run_into(&self, st: &Inputs, explicit: &BTreeMap<String, i64>, out: &mut [f32]) -> Result<(), RunError> {
        let mut dev = GpuDevice { k: self, bufs: None };
        run_on(&self.art, &self.state, st, explicit, out, &mut dev)
    }
}
