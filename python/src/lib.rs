//! `attnc._attnc`: the native half of the Python package (the Python half, `attnc/`, takes
//! NumPy arrays and torch tensors, converts what must be converted, and calls this).
//!
//! A [`Kernel`] holds one checked spec, optimized once. A call takes the inputs as Python
//! buffers (the buffer protocol) of `float32` or `int32`, C-contiguous, read in place; binds
//! the dims from their shapes; picks the options for the shape (given, tuned in the cache
//! `attnc tune` fills, or the cost model's choice), compiles once per options and runs
//! without the GIL, writing into the caller's `float32` output buffer.

use attnc::dsl::Checked;
use attnc::ir::{self, reference::Tensor, Bindings};
use attnc::passes::PassConfig;
use attnc::Prepared;
use attnc_autotune::space::cpu::CpuSpace;
use attnc_autotune::space::wgsl::WgslSpace;
use attnc_codegen::cpu::{CpuBackend, CpuOptions};
use attnc_codegen::host::{Inputs, RunError};
use attnc_codegen::ptx::{Precision, PtxBackend, PtxOptions, PtxSimBackend};
use attnc_codegen::schedule::ScheduleOptions;
use attnc_codegen::wgsl::{WgslBackend, WgslOptions};
use attnc_codegen::{Backend, Compiled};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

pyo3::create_exception!(
    _attnc,
    SpecError,
    pyo3::exceptions::PyException,
    "A spec that does not check: `code`, `message`, `rendered` (the diagnostic with its span)."
);

fn runtime(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// A run error as the Python exception a user expects: wrong shapes, dtypes, indices and
/// sizes are `ValueError`, too little memory `MemoryError`, anything else `RuntimeError`.
fn run_error(e: RunError) -> PyErr {
    match e {
        RunError::Memory { .. } => PyMemoryError::new_err(e.to_string()),
        RunError::Threads(_) => runtime(e),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// The options of one of the backends the package runs.
#[derive(Clone, Debug)]
enum Opts {
    Cpu(CpuOptions),
    Wgsl(WgslOptions),
    /// The PTX backend: on the GPU (`sim: false`) or in the interpreter.
    Ptx {
        options: PtxOptions,
        sim: bool,
    },
}

/// What a kernel compiles to for one choice of options and passes.
struct Variant {
    kernel: Box<dyn Compiled>,
    describe: String,
}

/// Where the last call read and wrote (for tests that check no input was copied).
#[derive(Clone, Default)]
struct LastRun {
    inputs: BTreeMap<String, usize>,
    output: usize,
    options: String,
    /// The bound the kernel states against the f32 reference, when it rounds (`(atol, rtol)`:
    /// atol a fraction of the rms of the nonzero outputs).
    tolerance: Option<(f64, f64)>,
}

#[pyclass(module = "attnc._attnc", frozen)]
struct Kernel {
    name: String,
    spec: Checked,
    passes: PassConfig,
    prepared: Prepared,
    /// `"cpu"`, `"wgsl"`, `"ptx"` or `"ptx-sim"`.
    backend: &'static str,
    /// Options fixed by the caller (else chosen per shape).
    fixed: Option<Opts>,
    /// The PTX backends' precision of the queries, keys and values.
    precision: Precision,
    threads: usize,
    variants: Mutex<HashMap<String, Arc<Variant>>>,
    /// Per shape: the options chosen and the passes they switch off.
    choices: Mutex<HashMap<Vec<(String, i64)>, Choice>>,
    last: Mutex<LastRun>,
}

/// A float32 or int32 input buffer.
enum Buf {
    F32(PyBuffer<f32>),
    I32(PyBuffer<i32>),
}

impl Buf {
    fn ptr(&self) -> *const u32 {
        match self {
            Buf::F32(b) => b.buf_ptr() as *const u32,
            Buf::I32(b) => b.buf_ptr() as *const u32,
        }
    }
    fn len(&self) -> usize {
        match self {
            Buf::F32(b) => b.item_count(),
            Buf::I32(b) => b.item_count(),
        }
    }
    fn shape(&self) -> Vec<usize> {
        match self {
            Buf::F32(b) => b.shape().to_vec(),
            Buf::I32(b) => b.shape().to_vec(),
        }
    }
    fn contiguous(&self) -> bool {
        match self {
            Buf::F32(b) => b.is_c_contiguous(),
            Buf::I32(b) => b.is_c_contiguous(),
        }
    }
    /// The items as u32 bits (f32 bits or i32).
    fn bits(&self) -> &[u32] {
        // SAFETY: a contiguous buffer of `len` 4-byte items, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len()) }
    }
}

/// The options chosen for a shape, the passes they switch off, and where they came from.
type Choice = (Opts, Vec<String>, String);

/// A random input: name, dtype, shape and little-endian bytes.
type RawTensor = (String, String, Vec<usize>, Vec<u8>);
/// A gradient: name, shape, little-endian bytes and their dtype (`float32` from the compiled
/// backward, `float64` from the reference).
type RawGrad = (String, Vec<usize>, Vec<u8>, &'static str);

/// Buffers of the declared inputs (float32 or int32, C-contiguous) with their shapes.
struct Buffers {
    bufs: Vec<(String, Buf, Vec<usize>)>,
}

fn input_buffers(spec: &Checked, arrays: &Bound<'_, PyDict>) -> PyResult<Buffers> {
    let k = &spec.kernel;
    for key in arrays.keys() {
        let name: String = key.extract()?;
        if k.tensor(&name).is_none_or(|t| t.kind != ir::TensorKind::Input) {
            let names: Vec<&str> = k.inputs().map(|t| t.name.as_str()).collect();
            return Err(PyValueError::new_err(format!("`{name}` is not an input of {} (its inputs: {})", k.name, names.join(", "))));
        }
    }
    let mut bufs = Vec::new();
    for t in k.inputs() {
        let shape_text = t.shape.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ");
        let Some(obj) = arrays.get_item(&t.name)? else {
            return Err(PyValueError::new_err(format!("missing input `{}` (expected {}[{shape_text}])", t.name, t.dtype)));
        };
        // The Python side converts to float32 / int32 before it calls.
        let b = if t.dtype.is_int() { PyBuffer::<i32>::get(&obj).map(Buf::I32) } else { PyBuffer::<f32>::get(&obj).map(Buf::F32) };
        let b = b.map_err(|_| PyValueError::new_err(format!("input `{}` must be a {} buffer", t.name, if t.dtype.is_int() { "int32" } else { "float32" })))?;
        if !b.contiguous() {
            return Err(PyValueError::new_err(format!("input `{}` is not C-contiguous", t.name)));
        }
        let shape = b.shape();
        bufs.push((t.name.clone(), b, shape));
    }
    Ok(Buffers { bufs })
}

impl Kernel {
    /// The options and passes for these dims (cached per shape).
    fn choose(&self, dims: &Bindings, data: &dyn Fn() -> BTreeMap<String, Tensor>) -> Choice {
        if let Some(o) = &self.fixed {
            return (o.clone(), vec![], "given options".into());
        }
        let key: Vec<(String, i64)> = dims.dims.iter().map(|(d, v)| (d.clone(), *v)).collect();
        if let Some(c) = self.choices.lock().expect("choices").get(&key) {
            return c.clone();
        }
        let oc = &self.prepared.optimized;
        let c = if self.backend == PtxBackend::NAME || self.backend == PtxSimBackend::NAME {
            // No PTX autotuning yet: the defaults (tensor cores for bf16/f16 specs).
            let options = PtxOptions { precision: self.precision, ..PtxOptions::default() };
            (Opts::Ptx { options, sim: self.backend == PtxSimBackend::NAME }, vec![], "PTX defaults (not tuned)".into())
        } else if self.backend == WgslBackend::NAME {
            let chosen = attnc::tune::chosen_options(&WgslSpace::new(), oc, dims, &data());
            (Opts::Wgsl(chosen.options), chosen.passes_off, chosen.from)
        } else {
            let chosen = attnc::tune::chosen_options(&CpuSpace::new(self.threads), oc, dims, &data());
            (Opts::Cpu(chosen.options), chosen.passes_off, chosen.from)
        };
        self.choices.lock().expect("choices").insert(key, c.clone());
        c
    }

    /// The compiled variant for a kernel and options (compiled once).
    fn variant(&self, kc: &Checked, options: &Opts, label: &str) -> PyResult<Arc<Variant>> {
        let key = format!("{label}|{options:?}");
        if let Some(v) = self.variants.lock().expect("variants").get(&key) {
            return Ok(v.clone());
        }
        let err = |e: attnc_codegen::CodegenError| PyValueError::new_err(e.to_string());
        let kernel: Box<dyn Compiled> = match options {
            Opts::Cpu(o) => Box::new(CpuBackend::default().compile(&kc.kernel, &kc.info, o).map_err(err)?.checking(&self.spec.kernel)),
            Opts::Wgsl(o) => Box::new(WgslBackend.compile(&kc.kernel, &kc.info, o).map_err(err)?.checking(&self.spec.kernel)),
            Opts::Ptx { options, sim: true } => Box::new(PtxSimBackend.compile(&kc.kernel, &kc.info, options).map_err(err)?.checking(&self.spec.kernel)),
            Opts::Ptx { options, sim: false } => Box::new(PtxBackend.compile(&kc.kernel, &kc.info, options).map_err(err)?.checking(&self.spec.kernel)),
        };
        let describe = kernel.describe();
        let v = Arc::new(Variant { kernel, describe });
        self.variants.lock().expect("variants").insert(key, v.clone());
        Ok(v)
    }

    /// f64 copies of the named buffers (the small tensors the cost model and the low-rank
    /// guard read).
    fn tensors(&self, b: &Buffers, names: &dyn Fn(&str) -> bool) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, buf, shape) in &b.bufs {
            if !names(name) {
                continue;
            }
            let int = self.spec.kernel.tensor(name).is_some_and(|t| t.dtype.is_int());
            let data = buf.bits().iter().map(|x| if int { *x as i32 as f64 } else { f32::from_bits(*x) as f64 }).collect();
            out.insert(name.clone(), Tensor::new(shape.clone(), data));
        }
        out
    }

    fn bind(&self, b: &Buffers, dims: &BTreeMap<String, i64>) -> PyResult<Bindings> {
        let shapes = b.bufs.iter().map(|(n, _, s)| (n.clone(), s.clone())).collect();
        ir::bind(&self.spec.kernel, &shapes, dims).map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

#[pymethods]
impl Kernel {
    /// The spec's name.
    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// The backend it runs on: `"cpu"`, `"wgsl"`, `"ptx"` or `"ptx-sim"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// `[(name, dtype, [axis, ...])]` of the declared inputs.
    fn inputs(&self) -> Vec<(String, String, Vec<String>)> {
        self.spec.kernel.inputs().map(|t| (t.name.clone(), t.dtype.to_string(), t.shape.iter().map(|e| e.to_string()).collect())).collect()
    }

    /// `(name, dtype)` of the output.
    fn output(&self) -> (String, String) {
        let o = self.spec.kernel.output();
        (o.name.clone(), o.dtype.to_string())
    }

    /// The free dims (bound from the input shapes, or given).
    fn dims(&self) -> Vec<String> {
        self.spec.info.free_dims.clone()
    }

    /// The output's shape for inputs of these shapes (`{name: shape}`).
    #[pyo3(signature = (shapes, dims=None))]
    fn output_shape(&self, shapes: BTreeMap<String, Vec<usize>>, dims: Option<BTreeMap<String, i64>>) -> PyResult<Vec<usize>> {
        let b = ir::bind(&self.spec.kernel, &shapes, &dims.unwrap_or_default()).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(b.shape(self.spec.kernel.output()))
    }

    /// The saved statistics' shape (`[B, H, N, branches]`) for inputs of these shapes.
    #[pyo3(signature = (shapes, dims=None))]
    fn stats_shape(&self, shapes: BTreeMap<String, Vec<usize>>, dims: Option<BTreeMap<String, i64>>) -> PyResult<Vec<usize>> {
        let b = ir::bind(&self.spec.kernel, &shapes, &dims.unwrap_or_default()).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(ir::reference::stats_shape(&self.spec.kernel, &b))
    }

    /// Runs on `arrays` (`{name: float32 or int32 C-contiguous buffer}`), writing the output
    /// into `out` (a float32 buffer of the output's shape) and, when given, the forward's
    /// saved statistics into `stats` (a float32 buffer of `stats_shape`). The GIL is
    /// released while the kernel runs.
    #[pyo3(signature = (arrays, out, dims=None, stats=None))]
    fn run(
        &self,
        py: Python<'_>,
        arrays: &Bound<'_, PyDict>,
        out: &Bound<'_, PyAny>,
        dims: Option<BTreeMap<String, i64>>,
        stats: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let explicit = dims.unwrap_or_default();
        let b = input_buffers(&self.spec, arrays)?;
        let bound = self.bind(&b, &explicit)?;
        let writable = |x: &Bound<'_, PyAny>, what: &str, want: &[usize]| -> PyResult<PyBuffer<f32>> {
            let buf = PyBuffer::<f32>::get(x).map_err(|_| PyValueError::new_err(format!("the {what} must be a writable C-contiguous float32 buffer")))?;
            if buf.readonly() || !buf.is_c_contiguous() {
                return Err(PyValueError::new_err(format!("the {what} must be a writable C-contiguous float32 buffer")));
            }
            if buf.shape() != want {
                return Err(PyValueError::new_err(format!("the {what} buffer has shape {:?}, the {what} is {want:?}", buf.shape())));
            }
            Ok(buf)
        };
        let out_buf = writable(out, "output", &bound.shape(self.spec.kernel.output()))?;
        let stats_buf = match stats {
            Some(s) => Some(writable(s, "statistics", &ir::reference::stats_shape(&self.spec.kernel, &bound))?),
            None => None,
        };
        // The kernel for these inputs: the low-rank guard reads only the bias's tensors.
        let small = self.tensors(&b, &|n| self.prepared.bias_reads.contains(n));
        let (oc, _, off) = self.prepared.pick_in(&self.spec.kernel, &bound, &small);
        let (options, passes_off, _) = self.choose(&bound, &|| self.tensors(&b, &|_| true));
        let (kc, label) = if passes_off.is_empty() && off.is_none() {
            (oc.clone(), "optimized".to_string())
        } else {
            let mut cfg = self.passes.clone();
            for p in &passes_off {
                cfg.set(p, false).map_err(runtime)?;
            }
            if off.is_some() {
                cfg.set("lowrank", false).map_err(runtime)?;
            }
            (attnc::optimize(&self.spec, &cfg).map_err(runtime)?.0, cfg.describe())
        };
        let v = self.variant(&kc, &options, &label)?;
        let shapes = b.bufs.iter().map(|(n, _, s)| (n.clone(), s.clone())).collect();
        let mut addresses = BTreeMap::new();
        let bufs = b
            .bufs
            .iter()
            .map(|(n, buf, _)| {
                addresses.insert(n.clone(), buf.ptr() as usize);
                (n.clone(), buf.bits())
            })
            .collect();
        let inputs = Inputs { shapes, bufs };
        // SAFETY: a writable contiguous float32 buffer of `item_count` items; the caller does
        // not read it while the kernel writes (it was just allocated for this call).
        let out_slice = unsafe { std::slice::from_raw_parts_mut(out_buf.buf_ptr() as *mut f32, out_buf.item_count()) };
        let out_addr = out_slice.as_ptr() as usize;
        let kernel = &v.kernel;
        match &stats_buf {
            Some(sb) => {
                // The statistics are laid out by branch: the kernel that runs must have the spec's.
                if !ir::reference::same_stats_layout(kernel.kernel(), &self.spec.kernel) {
                    return Err(PyValueError::new_err("the optimized kernel's branches differ from the spec's: compile with passes_off to save statistics"));
                }
                // SAFETY: as for the output, a fresh writable contiguous float32 buffer.
                let st = unsafe { std::slice::from_raw_parts_mut(sb.buf_ptr() as *mut f32, sb.item_count()) };
                py.detach(|| kernel.run_stats_into(&inputs, &explicit, out_slice, st)).map_err(run_error)?;
            }
            None => py.detach(|| kernel.run_into(&inputs, &explicit, out_slice)).map_err(run_error)?,
        }
        *self.last.lock().expect("last") =
            LastRun { inputs: addresses, output: out_addr, options: v.describe.clone(), tolerance: v.kernel.stated_tolerance().map(|t| (t.atol, t.rtol)) };
        Ok(())
    }

    /// The f64 reference interpreter on `arrays`, written into `out` (a float64 buffer).
    #[pyo3(signature = (arrays, out, dims=None))]
    fn reference(&self, py: Python<'_>, arrays: &Bound<'_, PyDict>, out: &Bound<'_, PyAny>, dims: Option<BTreeMap<String, i64>>) -> PyResult<()> {
        let explicit = dims.unwrap_or_default();
        let b = input_buffers(&self.spec, arrays)?;
        let data = self.tensors(&b, &|_| true);
        let out_buf = PyBuffer::<f64>::get(out).map_err(|_| PyValueError::new_err("the output must be a writable C-contiguous float64 buffer"))?;
        let spec = &self.spec;
        let got = py.detach(|| ir::reference::run(&spec.kernel, &spec.info, &data, &explicit)).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if out_buf.item_count() != got.data.len() {
            return Err(PyValueError::new_err(format!("the output buffer holds {} values, the output has {}", out_buf.item_count(), got.data.len())));
        }
        out_buf.copy_from_slice(py, &got.data)?;
        Ok(())
    }

    /// Gradients of `Σ cotangent · output` with respect to every float input, derived from
    /// the spec: `[(name, shape, bytes, dtype)]`, little-endian float32 from the compiled
    /// backward (which reads the input buffers in place), float64 from the reference.
    /// `cotangent` is a C-contiguous float32 or float64 buffer of the output's shape. `backend`: `cpu` (the compiled
    /// backward kernels, f32), `reference` (the f64 reference backward, every spec), `auto`
    /// (cpu where the compiled backward covers the spec and the kernel runs on the CPU).
    #[pyo3(signature = (arrays, cotangent, dims=None, backend="auto"))]
    fn grad(
        &self,
        py: Python<'_>,
        arrays: &Bound<'_, PyDict>,
        cotangent: &Bound<'_, PyAny>,
        dims: Option<BTreeMap<String, i64>>,
        backend: &str,
    ) -> PyResult<Vec<RawGrad>> {
        if !["auto", "cpu", "reference"].contains(&backend) {
            return Err(PyValueError::new_err(format!("backend must be \"auto\", \"cpu\" or \"reference\" (got {backend:?})")));
        }
        let explicit = dims.unwrap_or_default();
        let b = input_buffers(&self.spec, arrays)?;
        let bound = self.bind(&b, &explicit)?;
        let covered = attnc::grad::compiled_applies(&self.spec.kernel, &bound);
        let compiled = match (backend, &covered) {
            ("reference", _) => false,
            ("cpu", Err(e)) => return Err(PyValueError::new_err(format!("{e} (backend=\"reference\" runs every spec)"))),
            ("cpu", Ok(_)) => true,
            (_, c) => c.is_ok() && self.backend == CpuBackend::NAME,
        };
        let mut parts = attnc::memory_parts(&self.spec, &bound, true);
        parts.push(("for the gradients", parts[0].1 * 2 / 3));
        attnc_codegen::host::check_memory(&parts).map_err(run_error)?;
        let o = self.spec.kernel.output();
        let want = bound.shape(o);
        let bad = || PyValueError::new_err("the cotangent must be a C-contiguous float32 or float64 buffer");
        let (shape, d64): (Vec<usize>, Vec<f64>) = match PyBuffer::<f32>::get(cotangent) {
            Ok(cb) if cb.is_c_contiguous() => (cb.shape().to_vec(), cb.to_vec(py)?.into_iter().map(f64::from).collect()),
            Ok(_) => return Err(bad()),
            Err(_) => {
                let cb = PyBuffer::<f64>::get(cotangent).map_err(|_| bad())?;
                if !cb.is_c_contiguous() {
                    return Err(bad());
                }
                (cb.shape().to_vec(), cb.to_vec(py)?)
            }
        };
        if shape != want {
            return Err(PyValueError::new_err(format!("the cotangent of `{}` has shape {shape:?}; the output has shape {want:?}", o.name)));
        }
        let spec = &self.spec;
        if compiled {
            // The caller's buffers in place, f32 throughout.
            let inputs = Inputs {
                shapes: b.bufs.iter().map(|(n, _, s)| (n.clone(), s.clone())).collect(),
                bufs: b.bufs.iter().map(|(n, buf, _)| (n.clone(), buf.bits())).collect(),
            };
            let d32: Vec<f32> = d64.iter().map(|x| *x as f32).collect();
            let options = CpuOptions { threads: self.threads, ..CpuOptions::default() };
            let g = py.detach(|| attnc::grad::compiled_f32(&spec.kernel, &bound, &inputs, &d32, &options)).map_err(|e| PyValueError::new_err(e.to_string()))?;
            return Ok(g.into_iter().map(|(n, t)| (n, t.shape, t.data.iter().flat_map(|x| x.to_le_bytes()).collect(), "float32")).collect());
        }
        let data = self.tensors(&b, &|_| true);
        let dout = Tensor::new(want, d64);
        let g = py.detach(|| ir::grad::grad(&spec.kernel, &bound, &data, &dout)).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(g.into_iter().map(|(n, t)| (n, t.shape, t.data.iter().flat_map(|x| x.to_le_bytes()).collect(), "float64")).collect())
    }

    /// Seeded random inputs at these dims (value ranges from the spec's `in lo..hi`), as
    /// `[(name, dtype, shape, bytes)]` of little-endian float32 / int32 data.
    #[pyo3(signature = (dims, seed=0))]
    fn random_inputs(&self, dims: BTreeMap<String, i64>, seed: u64) -> PyResult<Vec<RawTensor>> {
        let b = attnc::bind_dims(&self.spec, &dims).map_err(PyValueError::new_err)?;
        attnc_codegen::host::check_memory(&attnc::memory_parts(&self.spec, &b, false)).map_err(run_error)?;
        let ins = attnc::inputs::random_inputs(&self.spec.kernel, &b, &self.spec.ranges, seed).map_err(PyValueError::new_err)?;
        Ok(self
            .spec
            .kernel
            .inputs()
            .map(|t| {
                let x = &ins[&t.name];
                let bytes = if t.dtype.is_int() {
                    x.data.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect()
                } else {
                    x.data.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect()
                };
                (t.name.clone(), if t.dtype.is_int() { "int32".to_string() } else { "float32".to_string() }, x.shape.clone(), bytes)
            })
            .collect())
    }

    /// What the last call read and wrote: `{"inputs": {name: address}, "output": address,
    /// "kernel": "tiled 64x64, Avx2 microkernel", "tolerance": None}` (`tolerance`: the
    /// `(atol, rtol)` a rounding kernel states against the f32 reference, atol a fraction
    /// of the rms of the nonzero outputs; `None` for exact f32 kernels).
    fn last_run(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let l = self.last.lock().expect("last").clone();
        let d = PyDict::new(py);
        d.set_item("inputs", l.inputs)?;
        d.set_item("output", l.output)?;
        d.set_item("kernel", l.options)?;
        d.set_item("tolerance", l.tolerance)?;
        Ok(d.unbind())
    }

    /// `attnc explain` at these dims: the rewrites and the schedule, as text.
    fn explain(&self, dims: BTreeMap<String, i64>) -> PyResult<String> {
        let b = attnc::bind_dims(&self.spec, &dims).map_err(PyValueError::new_err)?;
        attnc::explain::explain(&self.spec, &self.prepared.optimized, &self.prepared.log, &self.passes, Some(&b)).map_err(runtime)
    }

    /// `attnc tune` at these dims (the same cache as the command line); returns the table.
    #[pyo3(signature = (dims, top_k=8, samples=5, seed=0))]
    fn tune(&self, py: Python<'_>, dims: BTreeMap<String, i64>, top_k: usize, samples: usize, seed: u64) -> PyResult<String> {
        let args =
            attnc::tune::TuneArgs { spec: &self.spec, passes: &self.passes, given: &dims, top_k: top_k.max(1), samples: samples.max(1), report: None, seed };
        let oc = &self.prepared.optimized;
        if self.backend == PtxBackend::NAME || self.backend == PtxSimBackend::NAME {
            return Err(PyValueError::new_err("autotuning is not written for the PTX backend yet"));
        }
        let text = if self.backend == WgslBackend::NAME {
            let space = WgslSpace::new();
            py.detach(|| attnc::tune::tune(&space, oc, args)).map_err(runtime)?
        } else {
            let space = CpuSpace::new(self.threads);
            py.detach(|| attnc::tune::tune(&space, oc, args)).map_err(runtime)?
        };
        // The next call picks the new winner.
        self.choices.lock().expect("choices").clear();
        Ok(text)
    }
}

/// The options a caller fixed for `backend`, checked (names of the other backend's options
/// are refused by name).
fn given_options(backend: &str, o: &BTreeMap<String, i64>, threads: usize) -> PyResult<Opts> {
    let d = ScheduleOptions::default();
    let get = |k: &str, dflt: usize| o.get(k).map_or(dflt, |v| *v as usize);
    let only = |allowed: &[&str]| -> PyResult<()> {
        match o.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(PyValueError::new_err(format!("`{k}` is not an option of the {backend} backend (its options: {})", allowed.join(", ")))),
            None => Ok(()),
        }
    };
    if backend == PtxBackend::NAME || backend == PtxSimBackend::NAME {
        only(&["tiled", "threads", "channels", "chunk"])?;
        let mut c = PtxOptions::default();
        c.schedule.tiled = get("tiled", 1) != 0;
        c.schedule.chunk = get("chunk", c.schedule.chunk);
        c.threads = get("threads", c.threads as usize) as u32;
        c.channels = get("channels", c.channels as usize) as u32;
        PtxSimBackend.check_options(&c).map_err(PyValueError::new_err)?;
        return Ok(Opts::Ptx { options: c, sim: backend == PtxSimBackend::NAME });
    }
    if backend == WgslBackend::NAME {
        only(&["tiled", "workgroup", "channels", "block_q", "block_k", "chunk"])?;
        let w = WgslOptions::default();
        let mut c = WgslOptions { workgroup: get("workgroup", w.workgroup as usize) as u32, channels: get("channels", w.channels as usize) as u32, ..w };
        c.schedule.tiled = get("tiled", 1) != 0;
        c.schedule.block_q = get("block_q", c.schedule.block_q);
        c.schedule.block_k = get("block_k", c.schedule.block_k);
        c.schedule.chunk = get("chunk", c.schedule.chunk);
        WgslBackend.check_options(&c).map_err(PyValueError::new_err)?;
        return Ok(Opts::Wgsl(c));
    }
    only(&["tiled", "microkernel", "block_q", "block_k", "chunk"])?;
    let schedule = ScheduleOptions {
        tiled: get("tiled", 1) != 0,
        block_q: get("block_q", d.block_q),
        block_k: get("block_k", d.block_k),
        chunk: get("chunk", d.chunk),
        permute: d.permute,
    };
    let c = CpuOptions { schedule, microkernel: get("microkernel", 1) != 0, threads, ..CpuOptions::default() };
    CpuBackend::default().check_options(&c).map_err(PyValueError::new_err)?;
    Ok(Opts::Cpu(c))
}

/// Checks and optimizes a spec: `source` is its text; options fix the schedule (else it
/// is chosen per shape); `backend` is `"cpu"`, `"wgsl"` (WebGPU, on the adapter wgpu
/// finds: refused with the reason when there is none), `"ptx"` (an NVIDIA GPU, likewise) or
/// `"ptx-sim"` (the same PTX in attnc's interpreter: slow, for checking). `precision`
/// (PTX backends): `"exact"` keeps the spec's types; `"bf16"` or `"f16"` rounds an f32
/// spec's queries, keys and values on the device so the tensor cores take it.
#[pyfunction]
#[pyo3(signature = (source, path="<string>", options=None, passes_off=vec![], threads=0, backend="cpu", precision="exact"))]
fn compile(
    source: &str,
    path: &str,
    options: Option<BTreeMap<String, i64>>,
    passes_off: Vec<String>,
    threads: usize,
    backend: &str,
    precision: &str,
) -> PyResult<Kernel> {
    let precision = Precision::parse(precision).map_err(PyValueError::new_err)?;
    if precision != Precision::Exact && !matches!(backend, "ptx" | "ptx-sim") {
        return Err(PyValueError::new_err(format!("`precision` is an option of the ptx and ptx-sim backends (the {backend} backend computes in f32)")));
    }
    let backend = match backend {
        "cpu" => CpuBackend::NAME,
        "wgsl" => {
            WgslBackend.available().map_err(runtime)?;
            if threads != 0 {
                return Err(PyValueError::new_err("`threads` is an option of the cpu backend"));
            }
            WgslBackend::NAME
        }
        "ptx" | "ptx-sim" => {
            if backend == "ptx" {
                PtxBackend.available().map_err(runtime)?;
            }
            if threads != 0 {
                return Err(PyValueError::new_err("`threads` is an option of the cpu backend"));
            }
            if backend == "ptx" {
                PtxBackend::NAME
            } else {
                PtxSimBackend::NAME
            }
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "backend `{other}`: the package runs `cpu`, `wgsl`, `ptx` (an NVIDIA GPU) and `ptx-sim` (the PTX interpreter)"
            )))
        }
    };
    let spec = attnc::dsl::compile(source).map_err(|d| {
        let rendered = d.render(path, source);
        Python::attach(|py| {
            let err = SpecError::new_err(rendered.clone());
            let v = err.value(py);
            let _ = v.setattr("code", d.code);
            let _ = v.setattr("message", d.message.clone());
            let _ = v.setattr("rendered", rendered);
            let _ = v.setattr("span", (d.span.start, d.span.end));
            err
        })
    })?;
    let mut passes = PassConfig::all();
    for p in &passes_off {
        passes.set(p, false).map_err(PyValueError::new_err)?;
    }
    let mut fixed = options.map(|o| given_options(backend, &o, threads)).transpose()?;
    if let Some(Opts::Ptx { options, .. }) = &mut fixed {
        options.precision = precision;
    }
    if threads > attnc_codegen::cpu::max_threads() {
        CpuBackend::default().check_options(&CpuOptions { threads, ..CpuOptions::default() }).map_err(PyValueError::new_err)?;
    }
    // A lowered precision applies to the spec before the passes, as `attnc run --precision`.
    let prepared = Prepared::new(&attnc::at_precision(&spec, precision), &passes).map_err(runtime)?;
    Ok(Kernel {
        name: spec.kernel.name.clone(),
        spec,
        passes,
        prepared,
        backend,
        fixed,
        precision,
        threads,
        variants: Mutex::new(HashMap::new()),
        choices: Mutex::new(HashMap::new()),
        last: Mutex::new(LastRun::default()),
    })
}

/// The device a backend runs on, as tuning keys name it: the host's CPU features
/// (`cpu:x86_64+avx+avx2+fma`), or the WebGPU adapter and its driver.
#[pyfunction]
#[pyo3(signature = (backend="cpu"))]
fn device(backend: &str) -> PyResult<String> {
    match backend {
        "cpu" => Ok(CpuBackend::default().device()),
        "wgsl" => Ok(WgslBackend.device()),
        "ptx" => Ok(PtxBackend.device()),
        "ptx-sim" => Ok(PtxSimBackend.device()),
        other => Err(PyValueError::new_err(format!("backend `{other}`: the package runs `cpu`, `wgsl`, `ptx` and `ptx-sim`"))),
    }
}

#[pymodule]
fn _attnc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Kernel>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(device, m)?)?;
    m.add("SpecError", m.py().get_type::<SpecError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
