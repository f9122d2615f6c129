//! The attnc command line. Exit codes: 0 ok, 1 user error (a diagnostic, a bad input file,
//! shapes that do not bind), 2 usage error, anything else is a bug.

use anyhow::{anyhow, Context, Result};
use attnc::{ir, load_spec, parse_dims, Loaded};
use attnc_autotune::space::cpu::CpuSpace;
use attnc_autotune::space::wgsl::WgslSpace;
use attnc_codegen::cpu::{CpuBackend, CpuOptions};
use attnc_codegen::ptx::{Precision, PtxBackend, PtxOptions, PtxSimBackend};
use attnc_codegen::schedule::ScheduleOptions;
use attnc_codegen::wgsl::{WgslBackend, WgslOptions};
use attnc_codegen::{Backend as _, Compiled as _};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// `println!`/`print!` that exit quietly when stdout is closed early (`attnc check … | head`).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe { std::process::exit(0) }
        }
    }};
}
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe { std::process::exit(0) }
        }
    }};
}

use attnc::{bench, tune};

/// Counts heap bytes in use and their peak, for `attnc bench`'s memory report.
struct Tracking;
static IN_USE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        let p = unsafe { std::alloc::System.alloc(l) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(p, l) };
        IN_USE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

#[derive(Parser)]
#[command(
    name = "attnc",
    version,
    about = "A compiler for attention kernels",
    long_about = "attnc compiles attention variants written as declarative .attn specs: it checks them \
with clear diagnostics, lowers them to an IR whose meaning is fixed by an f64 reference interpreter, and runs them.\n\n\
Start with `attnc check examples/alibi.attn`, then `attnc run examples/alibi.attn --random --dims B=1,H=4,G=4,N=128,M=128,D=64,Dv=64 -o out.safetensors`."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// The most memory a run may use, e.g. 8G or 512M (default: what the machine has
    /// available). A run that would need more is refused before anything is allocated.
    #[arg(long, global = true, value_name = "SIZE")]
    max_memory: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Emit {
    /// The checked kernel IR in canonical text form (round-trips through the IR parser).
    Ir,
    /// The syntax tree with byte spans.
    Ast,
    /// Cranelift IR of the generated CPU functions (host ISA).
    Clif,
    /// Machine code of the generated CPU functions for this host (Cranelift's disassembly).
    Asm,
    /// The kernel IR after the optimization passes (what the backends compile).
    OptIr,
    /// The WGSL module of the WebGPU backend (validated by naga).
    Wgsl,
    /// The PTX module of the NVIDIA backend (the exact f32 row kernel; parsed by the PTX
    /// interpreter; assemble it with `ptxas -arch=sm_80`).
    Ptx,
}

/// Which optimization passes run (every one by default).
#[derive(clap::Args, Clone, Debug, Default)]
struct OptArgs {
    /// Run no optimization pass: compile the kernel as written.
    #[arg(long)]
    no_opt: bool,
    /// Switch one pass on or off, e.g. `--opt lowrank=off` (repeatable). Passes: simplify,
    /// hoist, fold, lowrank, linear (see `attnc explain`).
    #[arg(long = "opt", value_name = "PASS=on|off")]
    opt: Vec<String>,
}

impl OptArgs {
    fn config(&self) -> Result<attnc::passes::PassConfig> {
        let mut cfg = if self.no_opt { attnc::passes::PassConfig::none() } else { attnc::passes::PassConfig::all() };
        for o in &self.opt {
            let (name, v) = o.split_once('=').ok_or_else(|| anyhow!("--opt {o}: expected PASS=on or PASS=off"))?;
            let on = match v {
                "on" => true,
                "off" => false,
                _ => return Err(anyhow!("--opt {o}: the value is `on` or `off`")),
            };
            cfg.set(name, on).map_err(|e| anyhow!("--opt {o}: {e}"))?;
        }
        Ok(cfg)
    }
}

/// Where a command's inputs come from: a safetensors file or seeded random tensors.
#[derive(clap::Args, Clone, Debug)]
struct InputSource {
    /// Input tensors (safetensors); dims are bound from their shapes.
    #[arg(short, long, required_unless_present = "random", conflicts_with = "random")]
    input: Option<PathBuf>,
    /// Run on seeded random inputs instead of a file (needs --dims).
    #[arg(long, requires = "dims")]
    random: bool,
    /// Seed for --random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dim sizes, e.g. B=1,H=8,N=2048,M=2048,D=64 (needed for --random; with --input,
    /// only dims that no input carries).
    #[arg(long)]
    dims: Option<String>,
}

impl InputSource {
    /// The given dims and the inputs, refused before the work when what the command holds at
    /// the bound dims (`memory`, the inputs first) does not fit: before generating random
    /// inputs, after reading a file (its inputs then counted at their storage size only).
    fn load(
        &self,
        c: &attnc::dsl::Checked,
        memory: &dyn Fn(&ir::Bindings) -> Vec<(&'static str, u128)>,
    ) -> Result<(BTreeMap<String, i64>, BTreeMap<String, ir::reference::Tensor>)> {
        let given = dims_arg(&self.dims)?;
        if self.random {
            let b = bind_given(c, &given)?;
            attnc_codegen::host::check_memory(&memory(&b))?;
            let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, self.seed).map_err(|e| anyhow!(e))?;
            return Ok((given, ins));
        }
        let ins = attnc::io::read_inputs(self.input.as_ref().expect("clap: --input or --random"), &c.kernel)?;
        let shapes = ins.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
        let b = ir::bind(&c.kernel, &shapes, &given)?;
        let mut parts = memory(&b);
        parts[0].1 /= 3; // the inputs are already read (as f64); their storage form remains
        attnc_codegen::host::check_memory(&parts)?;
        Ok((given, ins))
    }
}

/// The spec with its bias factored within `budget` (FlashBias, approximate); prints
/// the rank and the error admitted.
fn approximated(c: &attnc::dsl::Checked, inputs: &mut BTreeMap<String, ir::reference::Tensor>, budget: f64) -> Result<attnc::dsl::Checked> {
    let t = Instant::now();
    let (a, r) = attnc::approximate_bias(c, inputs, budget).map_err(|e| anyhow!(e))?;
    eprintln!(
        "{}: approximate low-rank bias: {} at rank {} (max |error| {:.3e}, budget {:.3e}; factored in {:.2} s)",
        c.kernel.name,
        r.tensor,
        r.rank,
        r.max_error,
        r.budget,
        t.elapsed().as_secs_f64()
    );
    Ok(a)
}

/// The spec after the passes `o` selects, for these inputs: the exact low-rank bias is
/// switched off (and the user told why) when it would round these values worse than the
/// bias as written.
fn optimized_for(
    c: &attnc::dsl::Checked,
    o: &OptArgs,
    inputs: &BTreeMap<String, ir::reference::Tensor>,
    given: &BTreeMap<String, i64>,
) -> Result<attnc::dsl::Checked> {
    let (oc, _, off) = attnc::optimize_for(c, &o.config()?, inputs, given).map_err(|e| anyhow!("{e}"))?;
    if let Some(why) = off {
        eprintln!("{}: the exact low-rank bias is off for these inputs: {why}", c.kernel.name);
    }
    Ok(oc)
}

/// A thread count the CPU backend takes (checked before inputs are made).
fn check_threads(threads: usize) -> Result<()> {
    use attnc_codegen::Backend as _;
    CpuBackend::default().check_options(&CpuOptions { threads, ..CpuOptions::default() }).map_err(|e| anyhow!("--threads: {e}"))
}

/// Whether two paths name one existing file.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// An output path must not be a directory (checked before the work, not after).
fn check_output_path(p: &std::path::Path) -> Result<()> {
    if p.is_dir() {
        return Err(anyhow!("-o {} is a directory: give a file name, e.g. {}", p.display(), p.join("out.safetensors").display()));
    }
    match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(anyhow!("-o {}: the directory {} does not exist", p.display(), dir.display())),
        _ => Ok(()),
    }
}

/// The spec after the passes `o` selects; a pass that produces an invalid kernel is a bug,
/// reported as such.
/// [`optimized_for`] at a PTX precision: a lowered one applies to the spec before the passes
/// (so a bias stays a bias for the tensor cores).
fn optimized_at(
    c: &attnc::dsl::Checked,
    precision: Precision,
    o: &OptArgs,
    inputs: &BTreeMap<String, ir::reference::Tensor>,
    given: &BTreeMap<String, i64>,
) -> Result<attnc::dsl::Checked> {
    optimized_for(&attnc::at_precision(c, precision), o, inputs, given)
}

fn optimized(c: &attnc::dsl::Checked, o: &OptArgs) -> Result<(attnc::dsl::Checked, Vec<attnc::passes::Applied>)> {
    attnc::optimize(c, &o.config()?).map_err(|e| anyhow!("{e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// JIT-compiled machine code for this CPU (Cranelift).
    Cpu,
    /// The f64 reference interpreter: the meaning of a spec; slow, exact.
    Reference,
    /// WebGPU: WGSL run by wgpu on the best adapter here (a discrete GPU first, lavapipe on
    /// a machine without one; `ATTNC_WGPU_ADAPTER=<name part>` picks one). Tiled kernel
    /// (row kernel where the spec does not tile), chunked form for linear attention.
    Wgsl,
    /// The PTX the NVIDIA backend emits, run by attnc's PTX interpreter on the CPU: checks a
    /// kernel without a GPU. Slow (small shapes); `run` only.
    #[value(name = "ptx-sim")]
    PtxSim,
    /// NVIDIA GPU: the same PTX, JIT-compiled by the driver and run through cudarc on device
    /// 0 (the tensor-core kernel for bf16/f16 specs, the exact f32 row kernel otherwise).
    /// Without an NVIDIA driver or GPU: an error saying so.
    Ptx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// This machine's CPU, through Cranelift.
    Cpu,
    /// WebGPU: the WGSL module (validated by naga; no adapter needed).
    Wgsl,
    /// NVIDIA: the PTX module (`--arch`-independent text for sm_80; no GPU needed).
    Ptx,
}

#[derive(Subcommand)]
enum Cmd {
    /// Parse and check specs; print diagnostics with codes and spans.
    Check {
        /// One or more .attn files.
        #[arg(required = true)]
        specs: Vec<PathBuf>,
    },
    /// Compile a spec and print (or write) an intermediate form.
    Compile {
        /// The .attn spec file.
        spec: PathBuf,
        /// What to emit (default: ir; wgsl with --target wgsl, ptx with --target ptx).
        #[arg(long, value_enum)]
        emit: Option<Emit>,
        /// Code generation target: cpu (--emit clif and asm), wgsl (--emit wgsl) or ptx
        /// (--emit ptx).
        #[arg(long, value_enum, default_value = "cpu")]
        target: Target,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Run a spec on inputs from a safetensors file (tensors named as in the spec) and write
    /// its output tensor by name.
    Run {
        /// The .attn spec file.
        spec: PathBuf,
        #[command(flatten)]
        source: InputSource,
        /// Output file (safetensors).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// Also run the f64 reference interpreter and report the largest difference.
        #[arg(long)]
        check: bool,
        /// FlashBias, approximate (opt-in): replace the bias (a dense input, or a table
        /// gather such as Swin's) by a low-rank factorization whose largest absolute error (in logit units) is at most this
        /// budget; reports the rank and the error admitted, refuses when rank 64 cannot meet
        /// the budget. The output then differs from the exact one by the bias error.
        #[arg(long, value_name = "BUDGET")]
        approx_bias: Option<f64>,
        /// PTX backends: what an f32 spec's queries, keys and values are on the device.
        /// `exact` (default) keeps the spec's types (the exact f32 row kernel); `bf16` or
        /// `f16` rounds them, so the tensor-core kernel runs, within the tolerance it states.
        #[arg(long, default_value = "exact", value_parser = parse_precision)]
        precision: Precision,
        /// Also write what a backward pass needs from this forward, as the tensor
        /// `<output>.stats` of shape [B, H, N, branches]: each row's softmax log-sum-exp
        /// (natural log, the sink included; −inf for a row with no live key), or its linear
        /// denominator (Σ s + eps; 0 for a row with no live key); 0 for other normalizations.
        /// CPU and reference backends.
        #[arg(long)]
        save_stats: bool,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Gradients of a spec's output with respect to every float input (queries, keys,
    /// values, slopes, tables, biases, gates, decay rates, sink logits, branch weights),
    /// derived from the spec: the gradient of `Σ cotangent · output`, written by input name.
    /// Runs the reference backward (f64, exact, slow: small shapes); integer inputs and masks
    /// have no gradient, a row with no live key has gradient zero, NaN propagates.
    Grad {
        /// The .attn spec file.
        spec: PathBuf,
        #[command(flatten)]
        source: InputSource,
        /// The output's cotangent: a safetensors file with a tensor named as the spec's
        /// output, of its shape (default: ones, the gradient of the output's sum).
        #[arg(long, value_name = "DO")]
        cotangent: Option<PathBuf>,
        /// Output file (safetensors): one gradient per float input, named as the input.
        #[arg(short, long)]
        output: PathBuf,
        /// Also compare each input's gradient with central finite differences of the
        /// reference forward on sampled elements (chosen by --seed); a disagreement writes
        /// nothing, exit 1.
        #[arg(long)]
        check: bool,
        /// Elements per input that --check compares.
        #[arg(long, default_value_t = 16)]
        check_samples: usize,
        /// `cpu`: compiled backward kernels (f32; every example but gla, whose per-channel
        /// decay sits inside the dot: what is refused and why in `docs/backward.md`);
        /// `reference`: the f64 reference backward (every spec, slow); `auto` (default): cpu
        /// where it applies, else reference.
        #[arg(long, value_enum, default_value = "auto")]
        backend: GradBackend,
    },
    /// Write seeded random inputs for a spec (value ranges from its `in lo..hi` clauses).
    Inputs {
        /// The .attn spec file.
        spec: PathBuf,
        /// Dim sizes, e.g. B=1,H=8,G=2,N=512,M=512,D=64,Dv=64.
        #[arg(long)]
        dims: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output file (safetensors).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Time a spec on seeded random inputs: median time, GFLOP/s of useful work (masked
    /// pairs are not counted), compile time and peak memory beyond inputs and outputs.
    Bench {
        /// The .attn spec file.
        spec: PathBuf,
        /// Dim sizes, e.g. B=1,H=8,N=2048,M=2048,D=64,Dv=64 (seeded random inputs); with
        /// --input, only dims that no input carries.
        #[arg(long, required_unless_present = "input")]
        dims: Option<String>,
        /// Time on these inputs (safetensors, tensors named as in the spec) instead of
        /// random ones: real segment ids, block lists or a low-rank bias change the work.
        #[arg(short, long)]
        input: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// Timed runs (after one warm-up run); the median is reported.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        runs: u32,
        /// Worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Use the row-at-a-time kernel instead of the tiled one (CPU and wgsl).
        #[arg(long)]
        no_tiled: bool,
        /// Run the tile matmuls in generated f32x4 code instead of the std::arch microkernel.
        #[arg(long)]
        no_microkernel: bool,
        /// Keep queries and keys in their positions' order (CPU): a mask with class
        /// equalities (Swin's windows, NATTEN's dilation groups) is otherwise run over tokens
        /// sorted by class, where that reorders them.
        #[arg(long)]
        no_permute: bool,
        /// The CPU microkernels' instruction set: avx512, avx2 or portable (default: the
        /// widest this CPU has), to compare them on one machine.
        #[arg(long)]
        isa: Option<attnc_codegen::cpu::microkernel::Isa>,
        /// Query rows per tile (default 64 on the CPU, 16 on wgsl; the wgsl row kernel's
        /// rows per row of tile classes).
        #[arg(long)]
        block_q: Option<usize>,
        /// Keys per tile, a multiple of 16 (default 64 on the CPU, 16 on wgsl).
        #[arg(long)]
        block_k: Option<usize>,
        /// wgsl: invocations per workgroup, a power of two from 8 to 256 (default 256; the
        /// tiled kernel runs workgroup / block_q of them per query row).
        #[arg(long)]
        workgroup: Option<u32>,
        /// wgsl: output channels each invocation accumulates, 1 to 32 (default 8).
        #[arg(long)]
        channels: Option<u32>,
        /// Keys per chunk for linear and decay attention in chunked form (0: the quadratic
        /// kernels; default 64 on the CPU and ptx, 0 on wgsl; a GPU chunk holds at most 64).
        #[arg(long)]
        chunk: Option<usize>,
        /// FlashBias, approximate: time the spec with its bias factored to the rank that
        /// meets this max-error budget (see `run --help`).
        #[arg(long, value_name = "BUDGET")]
        approx_bias: Option<f64>,
        /// PTX backend: an f32 spec's queries, keys and values on the device (see `run
        /// --help`): exact, bf16 or f16.
        #[arg(long, default_value = "exact", value_parser = parse_precision)]
        precision: Precision,
        /// Use the built-in defaults, not the tuned winner from the cache (nor the cost
        /// model's pick when untuned). Any explicit option above implies it.
        #[arg(long)]
        untuned: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Time the forward and the compiled backward together (CPU; what a training step
        /// runs: the forward with its saved statistics, then the backward kernels, for a
        /// seeded random cotangent), with the peak memory beyond inputs, output, cotangent
        /// and gradients. Useful work counts the backward as 2.5× the forward (FA2's count).
        #[arg(long)]
        backward: bool,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Tune a spec for this machine at a shape: try the cost model's best candidates (CPU:
    /// tile sizes, microkernel on/off, kernel kind; WGSL: workgroup size, channels per
    /// invocation, rows per tile class), check each against the reference on a small input,
    /// time the survivors, and cache the winner for `run` and `bench` (keyed by the CPU's
    /// features or the adapter and its driver).
    Tune {
        /// The .attn spec file.
        spec: PathBuf,
        /// Dim sizes, e.g. B=1,H=8,N=2048,M=2048,D=64,Dv=64.
        #[arg(long)]
        dims: String,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// How many candidates (of the cost model's ranking) to measure.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        top_k: u32,
        /// Timed samples per candidate (after a warm-up run); the median counts.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        samples: u32,
        /// Worker threads (0: one per core); part of every candidate.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Write the table (CSV, JSON) and a plot (SVG) of the candidates to this directory.
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Explain a spec: each axis of the kernel in readable form, every rewrite the passes
    /// applied with its estimated cost before and after, the optimized IR, and with --dims
    /// the tile classes of the mask and the algorithm chosen for that shape.
    Explain {
        /// The .attn spec file.
        spec: PathBuf,
        /// A shape, e.g. B=1,H=8,N=2048,M=2048,D=64,Dv=64: also report tile classes and the
        /// algorithm and options chosen for it.
        #[arg(long)]
        dims: Option<String>,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Measure this CPU's FMA peak (GFLOP/s) at its widest vector width (AVX-512, AVX2+FMA
    /// or portable, detected at run time): register-only fused multiply-adds on every
    /// thread, best of three runs. The ceiling `bench` figures are read against.
    Peak {
        /// Threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// About how long to measure, in seconds.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// List the diagnostic codes.
    Codes,
}

/// An error already reported to the user (diagnostics printed): exit 1 without more output.
#[derive(Debug)]
struct Reported;
impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported")
    }
}
impl std::error::Error for Reported {}

fn load(path: &std::path::Path) -> Result<(Loaded, attnc::dsl::Checked)> {
    let l = load_spec(path).with_context(|| format!("cannot read spec {}", path.display()))?;
    match &l.result {
        Ok(c) => {
            let c = c.clone();
            Ok((l, c))
        }
        Err(_) => {
            eprint!("{}", l.rendered_error().expect("an error"));
            Err(Reported.into())
        }
    }
}

/// The saved statistics are laid out by branch: the compiled kernel (after the passes) must
/// have the spec's branches with the same normalizations.
fn same_branches(spec: &ir::Kernel, compiled: &ir::Kernel) -> Result<()> {
    if !ir::reference::same_stats_layout(spec, compiled) {
        return Err(anyhow!("--save-stats: the optimized kernel's branches differ from the spec's; run with --no-opt"));
    }
    Ok(())
}

fn dims_arg(s: &Option<String>) -> Result<BTreeMap<String, i64>> {
    match s {
        Some(s) => parse_dims(s).map_err(|e| anyhow!("--dims: {e}")),
        None => Ok(BTreeMap::new()),
    }
}

fn bind_given(c: &attnc::dsl::Checked, given: &BTreeMap<String, i64>) -> Result<ir::Bindings> {
    attnc::bind_dims(c, given).map_err(|e| anyhow!(e))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Check { specs } => {
            let mut failed = 0;
            for s in &specs {
                let l = load_spec(s).with_context(|| format!("cannot read spec {}", s.display()))?;
                match &l.result {
                    Ok(c) => {
                        let ins: Vec<&str> = c.kernel.inputs().map(|t| t.name.as_str()).collect();
                        outln!("ok: {} ({}; inputs {})", l.path, c.kernel.name, ins.join(", "));
                    }
                    Err(_) => {
                        eprint!("{}", l.rendered_error().expect("an error"));
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                if specs.len() > 1 {
                    eprintln!("{failed} of {} specs failed to check", specs.len());
                }
                return Err(Reported.into());
            }
        }
        Cmd::Compile { spec, emit, target, output, opt } => {
            let emit = emit.unwrap_or(match target {
                Target::Wgsl => Emit::Wgsl,
                Target::Ptx => Emit::Ptx,
                Target::Cpu => Emit::Ir,
            });
            if target != Target::Cpu && matches!(emit, Emit::Clif | Emit::Asm) {
                let t = if target == Target::Wgsl { "wgsl" } else { "ptx" };
                return Err(anyhow!("--emit clif and asm are the cpu target's forms; the {t} target emits {t}"));
            }
            let (l, c) = load(&spec)?;
            let (oc, _) = optimized(&c, &opt)?;
            let text = match emit {
                Emit::Ir => c.kernel.to_string(),
                Emit::OptIr => oc.kernel.to_string(),
                Emit::Clif => match target {
                    Target::Wgsl | Target::Ptx => return Err(anyhow!("--emit clif and asm are the cpu target's forms")),
                    Target::Cpu => {
                        let cpu = CpuBackend::default();
                        let o = CpuOptions::default();
                        let s = cpu.plan(&oc.kernel, &oc.info, &o)?;
                        let artifact = cpu.emit(&oc.kernel, &oc.info, &s, &o)?;
                        cpu.validate(&artifact)?;
                        artifact.to_string()
                    }
                },
                Emit::Asm => match target {
                    Target::Wgsl | Target::Ptx => return Err(anyhow!("--emit clif and asm are the cpu target's forms")),
                    Target::Cpu => {
                        let (_, asm) = attnc_codegen::cpu::emit_host(&oc.kernel, &oc.info, &CpuOptions::default())?;
                        asm.iter().map(|(f, code)| format!("; {f}\n{code}\n")).collect()
                    }
                },
                Emit::Wgsl => {
                    let (be, o) = (WgslBackend, WgslOptions::default());
                    let s = be.plan(&oc.kernel, &oc.info, &o)?;
                    let artifact = be.emit(&oc.kernel, &oc.info, &s, &o)?;
                    be.validate(&artifact)?;
                    artifact.to_string()
                }
                Emit::Ptx => {
                    let (be, o) = (PtxSimBackend, PtxOptions::default());
                    let s = be.plan(&oc.kernel, &oc.info, &o)?;
                    let artifact = be.emit(&oc.kernel, &oc.info, &s, &o)?;
                    be.validate(&artifact)?;
                    artifact.to_string()
                }
                Emit::Ast => attnc::dsl::parse(&l.src).map_err(|_| anyhow!("unreachable: the spec parsed before"))?.to_string(),
            };
            match output {
                Some(p) => std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?,
                None => out!("{text}"),
            }
        }
        Cmd::Inputs { spec, dims, seed, output } => {
            let (_, c) = load(&spec)?;
            let given = parse_dims(&dims).map_err(|e| anyhow!("--dims: {e}"))?;
            let b = bind_given(&c, &given)?;
            let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, seed).map_err(|e| anyhow!(e))?;
            let list: Vec<(String, ir::DType, &ir::reference::Tensor)> = c.kernel.inputs().map(|t| (t.name.clone(), t.dtype, &ins[&t.name])).collect();
            attnc::io::write(&output, &list)?;
            eprintln!("wrote {} input tensors to {}", list.len(), output.display());
        }
        Cmd::Run { spec, source, output, backend, check, approx_bias, precision, save_stats, opt } => {
            if precision != Precision::Exact && !matches!(backend, Backend::Ptx | Backend::PtxSim) {
                return Err(anyhow!("--precision is an option of the PTX backends (ptx, ptx-sim)"));
            }
            if save_stats && !matches!(backend, Backend::Cpu | Backend::Reference) {
                return Err(anyhow!("--save-stats: the {backend:?} backend does not save the forward's statistics yet (the cpu and reference backends do)"));
            }
            let ptx_options = PtxOptions { precision, ..PtxOptions::default() };
            let (_, c) = load(&spec)?;
            if let Some(inp) = &source.input {
                if same_file(inp, &output) {
                    return Err(anyhow!("-o {} is the input file: choose another output path (the input would be replaced)", output.display()));
                }
            }
            check_output_path(&output)?;
            let reference = check || backend == Backend::Reference;
            let (given, inputs) = source.load(&c, &|b| attnc::memory_parts(&c, b, reference))?;
            // The check runs the spec as written, on the inputs as given (kept only when
            // --approx-bias adds its factors to them).
            let exact_inputs = (approx_bias.is_some() && check).then(|| inputs.clone());
            let mut inputs = inputs;
            let spec_c = match approx_bias {
                Some(budget) => approximated(&c, &mut inputs, budget)?,
                None => c.clone(),
            };
            // The check still runs the spec as written.
            let oc = optimized_at(&spec_c, precision, &opt, &inputs, &given)?;
            let start = Instant::now();
            // A looser bound a kernel states (reduced-precision arithmetic), for --check.
            let mut stated: Option<attnc_codegen::Tolerance> = None;
            let mut stats: Option<ir::reference::Tensor> = None;
            let out = match backend {
                Backend::Reference if save_stats => {
                    let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
                    let b = ir::bind(&oc.kernel, &shapes, &given)?;
                    let (out, st) = ir::reference::run_with_stats(&oc.kernel, &b, &inputs)?;
                    stats = Some(st);
                    out
                }
                Backend::Reference => ir::reference::run(&oc.kernel, &oc.info, &inputs, &given)?,
                Backend::Cpu => {
                    let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
                    let b = ir::bind(&oc.kernel, &shapes, &given)?;
                    let chosen = tune::chosen_options(&CpuSpace::new(0), &oc, &b, &inputs);
                    let kc = chosen.kernel(&spec_c, &opt.config()?, &oc)?;
                    let kern = CpuBackend::default().compile(&kc.kernel, &kc.info, &chosen.options)?.checking(&spec_c.kernel);
                    eprintln!("{}: {} (options from {})", c.kernel.name, kern.describe(), chosen.from);
                    if save_stats {
                        same_branches(&spec_c.kernel, &kc.kernel)?;
                        let (out, st) = kern.run_with_stats(&inputs, &given)?;
                        stats = Some(st);
                        out
                    } else {
                        kern.run(&inputs, &given)?
                    }
                }
                Backend::Wgsl => {
                    let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
                    let b = ir::bind(&oc.kernel, &shapes, &given)?;
                    let chosen = tune::chosen_options(&WgslSpace::new(), &oc, &b, &inputs);
                    let kc = chosen.kernel(&spec_c, &opt.config()?, &oc)?;
                    let kern = WgslBackend.compile(&kc.kernel, &kc.info, &chosen.options)?.checking(&spec_c.kernel);
                    eprintln!("{}: {} (options from {})", c.kernel.name, kern.describe(), chosen.from);
                    kern.run(&inputs, &given)?
                }
                Backend::Ptx => {
                    PtxBackend.available().map_err(|e| anyhow!("{e}"))?;
                    let kern = PtxBackend.compile(&oc.kernel, &oc.info, &ptx_options)?.checking(&spec_c.kernel);
                    eprintln!("{}: {} on {}", c.kernel.name, kern.describe(), PtxBackend.device());
                    let shapes: BTreeMap<String, Vec<usize>> = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
                    if let Ok(dims) = ir::bind(&kern.art.kernel, &shapes, &given) {
                        eprintln!("{}: runs the {}", c.kernel.name, kern.art.form(&dims));
                    }
                    stated = kern.stated_tolerance();
                    kern.run(&inputs, &given)?
                }
                Backend::PtxSim => {
                    let kern = PtxSimBackend.compile(&oc.kernel, &oc.info, &ptx_options)?.checking(&spec_c.kernel);
                    eprintln!("{}: {} (the PTX interpreter)", c.kernel.name, kern.describe());
                    let shapes: BTreeMap<String, Vec<usize>> = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
                    if let Ok(dims) = ir::bind(&kern.art.kernel, &shapes, &given) {
                        eprintln!("{}: runs the {}", c.kernel.name, kern.art.form(&dims));
                    }
                    stated = kern.stated_tolerance();
                    kern.run(&inputs, &given)?
                }
            };
            let secs = start.elapsed().as_secs_f64();
            let o = c.kernel.output();
            eprintln!("{}: ran on {:?} in {:.3} s", c.kernel.name, backend, secs);
            // A failed check writes nothing: the output path keeps what it had.
            if check {
                let t = Instant::now();
                let want = ir::reference::run(&c.kernel, &c.info, exact_inputs.as_ref().unwrap_or(&inputs), &given)?;
                let (mut worst, mut scale, mut nan_mismatch) = (0f64, 0f64, 0usize);
                for (a, b) in out.data.iter().zip(&want.data) {
                    if a.is_nan() || b.is_nan() {
                        nan_mismatch += (a.is_nan() != b.is_nan()) as usize;
                    } else {
                        worst = worst.max((a - b).abs());
                        scale = scale.max(b.abs());
                    }
                }
                eprintln!(
                    "check: reference (f64) in {:.3} s; max |difference| {worst:.3e} (largest |value| {scale:.3e}); {nan_mismatch} NaN mismatches",
                    t.elapsed().as_secs_f64()
                );
                if approx_bias.is_some() {
                    eprintln!("check: the reference runs the exact bias; the difference includes what the approximate bias admits");
                } else if let Some(t) = stated {
                    if let Err((n, g, w)) = t.check(&out.data, &want.data) {
                        return Err(anyhow!(
                            "the {backend:?} output differs from the reference beyond the kernel's stated tolerance (atol {:.0e}·rms, rtol {:.0e}): element {n} is {g}, reference {w}; {} was not written",
                            t.atol,
                            t.rtol,
                            output.display()
                        ));
                    }
                    eprintln!(
                        "check: within the kernel's stated tolerance (atol {:.0e}·rms, rtol {:.0e}: bf16/f16 arithmetic on tensor cores)",
                        t.atol, t.rtol
                    );
                } else if nan_mismatch > 0 || worst > 1e-3 * scale.max(1.0) {
                    return Err(anyhow!("the {backend:?} output differs from the reference beyond f32 tolerance; {} was not written", output.display()));
                }
                if let Some(st) = &stats {
                    let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
                    let b = ir::bind(&c.kernel, &shapes, &given)?;
                    let (_, want) = ir::reference::run_with_stats(&c.kernel, &b, exact_inputs.as_ref().unwrap_or(&inputs))?;
                    let (mut worst, mut mismatched) = (0f64, 0usize);
                    for (g, w) in st.data.iter().zip(&want.data) {
                        if w.is_finite() && g.is_finite() {
                            worst = worst.max((g - w).abs() / w.abs().max(1.0));
                        } else {
                            mismatched += (g != w && !(g.is_nan() && w.is_nan())) as usize;
                        }
                    }
                    eprintln!("check: statistics: max relative difference {worst:.3e}; {mismatched} non-finite mismatches");
                    if approx_bias.is_none() && (mismatched > 0 || worst > 1e-3) {
                        return Err(anyhow!("the {backend:?} statistics differ from the reference's; {} was not written", output.display()));
                    }
                }
            }
            let stats_name = format!("{}.stats", o.name);
            let mut list = vec![(o.name.clone(), o.dtype, &out)];
            if let Some(st) = &stats {
                list.push((stats_name.clone(), ir::DType::F32, st));
            }
            attnc::io::write(&output, &list)?;
            eprintln!("{}: wrote `{}` {:?} to {}", c.kernel.name, o.name, out.shape, output.display());
            if let Some(st) = &stats {
                eprintln!("{}: wrote `{stats_name}` {:?} (the forward's statistics) to {}", c.kernel.name, st.shape, output.display());
            }
        }
        Cmd::Grad { spec, source, cotangent, output, check, check_samples, backend } => {
            let (_, c) = load(&spec)?;
            ir::grad::differentiable(&c.kernel).map_err(|e| anyhow!("{}: {e}", c.kernel.name))?;
            for p in [source.input.as_ref(), cotangent.as_ref()].into_iter().flatten() {
                if same_file(p, &output) {
                    return Err(anyhow!("-o {} is an input file: choose another output path", output.display()));
                }
            }
            check_output_path(&output)?;
            let (given, inputs) = source.load(&c, &|b| {
                let mut parts = attnc::memory_parts(&c, b, true);
                parts.push(("for the gradients", parts[0].1 * 2 / 3));
                parts
            })?;
            let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
            let b = ir::bind(&c.kernel, &shapes, &given)?;
            let o = c.kernel.output();
            let dout = match &cotangent {
                Some(p) => attnc::io::read_float(p, &o.name, &b.shape(o))?,
                None => {
                    eprintln!("{}: no --cotangent: the gradient of the sum of `{}`", c.kernel.name, o.name);
                    attnc::grad::ones_like_output(&c.kernel, &b)
                }
            };
            let compiled = match (backend, attnc::grad::compiled_applies(&c.kernel, &b)) {
                (GradBackend::Reference, _) => false,
                (_, Ok(_)) => true,
                (GradBackend::Cpu, Err(e)) => return Err(anyhow!("{}: {e} (--backend reference runs every spec)", c.kernel.name)),
                (GradBackend::Auto, Err(e)) => {
                    eprintln!("{}: {e}; running the reference backward", c.kernel.name);
                    false
                }
            };
            let t = Instant::now();
            let grads = if compiled {
                let g = attnc::grad::compiled(&c.kernel, &b, &inputs, &dout, &attnc_codegen::cpu::CpuOptions::default())
                    .map_err(|e| anyhow!("{}: {e}", c.kernel.name))?;
                eprintln!("{}: compiled backward (CPU, f32) in {:.3} s", c.kernel.name, t.elapsed().as_secs_f64());
                g
            } else {
                let g = ir::grad::grad(&c.kernel, &b, &inputs, &dout)?;
                eprintln!("{}: reference backward (f64) in {:.3} s", c.kernel.name, t.elapsed().as_secs_f64());
                g
            };
            if check && compiled {
                // The compiled gradients against the reference backward, element by element.
                let t = Instant::now();
                let want = ir::grad::grad(&c.kernel, &b, &inputs, &dout)?;
                let mut failed = None;
                for (name, w) in &want {
                    let g = &grads[name];
                    let scale = w.data.iter().fold(1f64, |a, x| a.max(x.abs()));
                    let nan = g.data.iter().zip(&w.data).filter(|(x, y)| x.is_nan() != y.is_nan()).count();
                    let worst = g.data.iter().zip(&w.data).filter(|(x, y)| !x.is_nan() && !y.is_nan()).fold(0f64, |a, (x, y)| a.max((x - y).abs()));
                    eprintln!(
                        "check: `{name}`: max |difference| {worst:.2e} from the reference backward (largest |gradient| {scale:.2e}); {nan} NaN mismatches"
                    );
                    if nan > 0 || worst > 1e-4 * scale {
                        failed = failed.or(Some(format!("`{name}` differs by {worst:.2e} (largest |gradient| {scale:.2e}), {nan} NaN mismatches")));
                    }
                }
                eprintln!("check: reference backward (f64) in {:.3} s", t.elapsed().as_secs_f64());
                if let Some(f) = failed {
                    return Err(anyhow!("the compiled gradient differs from the reference backward: {f}; {} was not written", output.display()));
                }
            } else if check {
                let t = Instant::now();
                let rows = attnc::grad::finite_differences(&c.kernel, &b, &inputs, &dout, &grads, check_samples, source.seed).map_err(|e| anyhow!(e))?;
                let mut failed = None;
                for r in &rows {
                    eprintln!(
                        "check: `{}`: {} elements match central differences (max |difference| {:.2e}, largest |gradient| {:.2e}){}",
                        r.input,
                        r.checked,
                        r.worst,
                        r.scale,
                        if r.kinks > 0 { format!("; {} skipped at kinks", r.kinks) } else { String::new() }
                    );
                    failed = failed.or(r.failure.clone());
                }
                eprintln!("check: finite differences in {:.3} s", t.elapsed().as_secs_f64());
                if let Some(f) = failed {
                    return Err(anyhow!("the gradient differs from finite differences: {f}; {} was not written", output.display()));
                }
            }
            let list: Vec<(String, ir::DType, &ir::reference::Tensor)> =
                c.kernel.inputs().filter(|t| !t.dtype.is_int()).map(|t| (t.name.clone(), t.dtype, &grads[&t.name])).collect();
            if list.is_empty() {
                return Err(anyhow!("{} has no float input: there is nothing to differentiate", c.kernel.name));
            }
            attnc::io::write(&output, &list)?;
            let names: Vec<&str> = list.iter().map(|(n, _, _)| n.as_str()).collect();
            eprintln!("{}: wrote the gradients of {} to {}", c.kernel.name, names.join(", "), output.display());
        }
        Cmd::Bench {
            spec,
            dims,
            input,
            backend,
            runs,
            threads,
            no_tiled,
            no_microkernel,
            no_permute,
            isa,
            block_q,
            block_k,
            workgroup,
            channels,
            chunk,
            approx_bias,
            untuned,
            seed,
            precision,
            backward,
            opt,
        } => {
            if backward && backend != Backend::Cpu {
                return Err(anyhow!("--backward runs the compiled backward, on the CPU backend only"));
            }
            if precision != Precision::Exact && backend != Backend::Ptx {
                return Err(anyhow!("--precision is an option of the PTX backend"));
            }
            if backend == Backend::PtxSim {
                return Err(anyhow!("ptx-sim is an interpreter, not something to time: check a kernel with `attnc run --backend ptx-sim --check`, time it on a GPU with `--backend ptx`"));
            }
            if backend == Backend::Ptx {
                PtxBackend.available().map_err(|e| anyhow!("{e}"))?;
            }
            let (_, c) = load(&spec)?;
            check_threads(threads)?;
            if backend == Backend::Wgsl && (threads != 0 || no_microkernel) {
                return Err(anyhow!("--threads and --no-microkernel are CPU options"));
            }
            if backend != Backend::Wgsl && (workgroup.is_some() || channels.is_some()) {
                return Err(anyhow!("--workgroup and --channels are options of the wgsl backend"));
            }
            if isa.is_some() && backend != Backend::Cpu {
                return Err(anyhow!("--isa is an option of the CPU backend"));
            }
            attnc_codegen::cpu::microkernel::Isa::resolve(isa).map_err(|e| anyhow!("--isa: {e}"))?;
            let runs = runs as usize;
            let (given, inputs) = match &input {
                Some(path) => {
                    let ins = attnc::io::read_inputs(path, &c.kernel)?;
                    let shapes = ins.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
                    let bound = ir::bind(&c.kernel, &shapes, &dims_arg(&dims)?)?;
                    let given: BTreeMap<String, i64> = bound.dims.into_iter().filter(|(d, _)| c.info.free_dims.contains(d)).collect();
                    (given, ins)
                }
                None => {
                    let given = parse_dims(dims.as_deref().unwrap_or_default()).map_err(|e| anyhow!("--dims: {e}"))?;
                    let b = bind_given(&c, &given)?;
                    attnc_codegen::host::check_memory(&attnc::memory_parts(&c, &b, backend == Backend::Reference))?;
                    let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, seed).map_err(|e| anyhow!(e))?;
                    (given, ins)
                }
            };
            let b = bind_given(&c, &given)?;
            // Useful work is the spec's, whatever form the passes give it.
            let work = bench::useful_work(&c, &b, &inputs).map_err(|e| anyhow!(e))?;
            let mut inputs = inputs;
            let spec_c = match approx_bias {
                Some(budget) => approximated(&c, &mut inputs, budget)?,
                None => c,
            };
            let c = optimized_at(&spec_c, precision, &opt, &inputs, &given)?;
            let b = bind_given(&c, &given)?;
            let explicit =
                untuned || no_tiled || no_microkernel || block_q.is_some() || block_k.is_some() || chunk.is_some() || workgroup.is_some() || channels.is_some();
            // The WGSL options: the given ones (the defaults for those not given), else the
            // tuned winner for this adapter, else the cost model's choice.
            let wgsl = match backend {
                Backend::Wgsl if explicit => {
                    let d = WgslOptions::default();
                    let mut o = WgslOptions { workgroup: workgroup.unwrap_or(d.workgroup), channels: channels.unwrap_or(d.channels), ..d };
                    o.schedule.tiled = !no_tiled;
                    o.schedule.block_q = block_q.unwrap_or(o.schedule.block_q);
                    o.schedule.block_k = block_k.unwrap_or(o.schedule.block_k);
                    o.schedule.chunk = chunk.unwrap_or(o.schedule.chunk);
                    WgslBackend.check_options(&o).map_err(|e| anyhow!("wgsl options: {e}"))?;
                    let given = no_tiled || block_q.is_some() || block_k.is_some() || chunk.is_some() || workgroup.is_some() || channels.is_some();
                    let from = if given { "given options" } else { "the WGSL defaults (--untuned)" };
                    Some(tune::Chosen { options: o, passes_off: vec![], from: from.to_string() })
                }
                Backend::Wgsl => Some(tune::chosen_options(&WgslSpace::new(), &c, &b, &inputs)),
                _ => None,
            };
            let chosen = if explicit || wgsl.is_some() {
                let d = ScheduleOptions::default();
                let schedule = ScheduleOptions {
                    tiled: !no_tiled,
                    block_q: block_q.unwrap_or(d.block_q),
                    block_k: block_k.unwrap_or(d.block_k),
                    chunk: chunk.unwrap_or(d.chunk),
                    permute: d.permute,
                };
                let o = CpuOptions { schedule, microkernel: !no_microkernel, threads, ..CpuOptions::default() };
                tune::Chosen { options: o, passes_off: vec![], from: "given options".to_string() }
            } else {
                tune::chosen_options(&CpuSpace::new(threads), &c, &b, &inputs)
            };
            let mut chosen = chosen;
            chosen.options.schedule.permute &= !no_permute;
            chosen.options.isa = isa.or(chosen.options.isa);
            // A tuned winner may run the spec without a pass (the low-rank bias).
            let c = match &wgsl {
                Some(w) => w.kernel(&spec_c, &opt.config()?, &c)?,
                None => chosen.kernel(&spec_c, &opt.config()?, &c)?,
            };
            let (opts, from) = match &wgsl {
                Some(w) => (chosen.options, format!("{} ({})", attnc_codegen::BackendOptions::describe(&w.options), w.from)),
                None => (chosen.options, chosen.from),
            };
            let dims_text = given.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            let mut times = Vec::new();
            let (compile_ms, peak_extra, label) = match backend {
                Backend::Cpu if backward => {
                    let k = &spec_c.kernel;
                    attnc::grad::backward_plan(k).map_err(|e| anyhow!("{}: {e}", k.name))?;
                    let st = attnc_codegen::host::Storage::from_f64(k, &inputs);
                    drop(inputs);
                    let shape = b.shape(k.output());
                    let dout = attnc::inputs::random_cotangent(shape.iter().product(), seed);
                    let (mut peak_extra, mut compile_ms) = (0usize, 0.0);
                    for n in 0..=runs {
                        let base = IN_USE.load(std::sync::atomic::Ordering::Relaxed);
                        PEAK.store(base, std::sync::atomic::Ordering::Relaxed);
                        let t = Instant::now();
                        let g = attnc::grad::compiled_f32(k, &b, &st.view(), &dout, &opts).map_err(|e| anyhow!("{}: {e}", k.name))?;
                        let dt = t.elapsed().as_secs_f64();
                        let grad_bytes: usize = g.values().map(|x| x.data.len() * 4).sum();
                        let peak = PEAK.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(base).saturating_sub(grad_bytes);
                        peak_extra = peak_extra.max(peak);
                        drop(g);
                        match n {
                            0 => compile_ms = dt * 1e3,
                            _ => times.push(dt),
                        }
                    }
                    let label =
                        format!("cpu, forward + compiled backward, {}; {}", attnc_codegen::BackendOptions::describe(&opts), CpuBackend::default().device());
                    (compile_ms, peak_extra, label)
                }
                Backend::Cpu => {
                    let t0 = Instant::now();
                    let kern = CpuBackend::default().compile(&c.kernel, &c.info, &opts)?.checking(&spec_c.kernel);
                    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
                    let st = attnc_codegen::host::Storage::from_f64(&c.kernel, &inputs);
                    drop(inputs);
                    let mut peak_extra = 0usize;
                    for n in 0..=runs {
                        let base = IN_USE.load(std::sync::atomic::Ordering::Relaxed);
                        PEAK.store(base, std::sync::atomic::Ordering::Relaxed);
                        let t = Instant::now();
                        let (shape, out) = kern.run_storage(&st, &BTreeMap::new())?;
                        let dt = t.elapsed().as_secs_f64();
                        let out_bytes = shape.iter().product::<usize>() * 4;
                        let peak = PEAK.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(base).saturating_sub(out_bytes);
                        peak_extra = peak_extra.max(peak);
                        drop(out);
                        if n > 0 {
                            times.push(dt);
                        }
                    }
                    (compile_ms, peak_extra, format!("cpu, {}; {}", kern.describe(), CpuBackend::default().device()))
                }
                Backend::Wgsl => {
                    let t0 = Instant::now();
                    let o = wgsl.as_ref().map(|w| w.options.clone()).unwrap_or_default();
                    let kern = WgslBackend.compile(&c.kernel, &c.info, &o)?.checking(&spec_c.kernel);
                    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
                    let st = attnc_codegen::host::Storage::from_f64(&c.kernel, &inputs);
                    drop(inputs);
                    for n in 0..=runs {
                        let t = Instant::now();
                        kern.run_storage(&st, &BTreeMap::new())?;
                        if n > 0 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    (compile_ms, 0, format!("wgsl, {}; {}", kern.describe(), WgslBackend.device()))
                }
                Backend::Ptx => {
                    let t0 = Instant::now();
                    let mut o = PtxOptions { precision, ..PtxOptions::default() };
                    o.schedule.chunk = chunk.unwrap_or(o.schedule.chunk);
                    let kern = PtxBackend.compile(&c.kernel, &c.info, &o)?.checking(&spec_c.kernel);
                    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
                    let st = attnc_codegen::host::Storage::from_f64(&c.kernel, &inputs);
                    let form = kern.art.form(&b.complete(&kern.art.kernel));
                    drop(inputs);
                    // Device time between CUDA events, the inputs already on the GPU.
                    times = kern.time(&st.view(), runs)?;
                    (compile_ms, 0, format!("ptx, {form}, device time (CUDA events); {}", PtxBackend.device()))
                }
                Backend::PtxSim => unreachable!("refused above"),
                Backend::Reference => {
                    for n in 0..=runs.min(1) {
                        let t = Instant::now();
                        ir::reference::run(&c.kernel, &c.info, &inputs, &BTreeMap::new())?;
                        if n > 0 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    (0.0, 0, format!("reference interpreter (f64); {}", CpuBackend::default().device()))
                }
            };
            times.sort_by(|a, b| a.total_cmp(b));
            let med = times[times.len() / 2];
            outln!("{}  {dims_text}  [{label}]", c.kernel.name);
            outln!("  options  {from}");
            if backward {
                outln!("  compile  {compile_ms:.1} ms (the forward and backward kernels, with the first run)");
            } else {
                outln!("  compile  {compile_ms:.1} ms");
            }
            outln!("  time     median {:.3} ms (min {:.3}, max {:.3}; {} runs)", med * 1e3, times[0] * 1e3, times[times.len() - 1] * 1e3, times.len());
            // The backward's useful work: FA2's count, 2.5 forwards (5 matmuls to 2).
            let flops = if backward { work.flops * 3.5 } else { work.flops };
            outln!(
                "  useful   {:.3} GFLOP{} ({:.1}% of pairs live) -> {:.1} GFLOP/s",
                flops / 1e9,
                if backward { ", forward + backward" } else { "" },
                100.0 * work.pairs as f64 / work.total_pairs.max(1) as f64,
                flops / med / 1e9
            );
            if matches!(backend, Backend::Wgsl | Backend::Ptx) {
                outln!("  memory   on the device: inputs, derived tensors and the output, nothing more");
            } else {
                let beyond = if backward { "inputs, output, cotangent and gradients" } else { "inputs and outputs" };
                outln!("  memory   peak {:.2} MiB beyond {beyond}", peak_extra as f64 / (1024.0 * 1024.0));
            }
        }
        Cmd::Tune { spec, dims, backend, top_k, samples, threads, report, seed, opt } => {
            if matches!(backend, Backend::Reference | Backend::PtxSim) {
                return Err(anyhow!(
                    "the {} has nothing to tune: choose --backend cpu or wgsl",
                    if backend == Backend::Reference { "reference interpreter" } else { "PTX interpreter" }
                ));
            }
            if backend == Backend::Ptx {
                return Err(anyhow!(
                    "autotuning is not written for the PTX backend yet: `attnc bench --backend ptx` runs its defaults (64x32 tensor-core tiles)"
                ));
            }
            if backend == Backend::Wgsl && threads != 0 {
                return Err(anyhow!("--threads is a CPU option; the wgsl backend tunes its workgroup shape"));
            }
            let (_, spec_c) = load(&spec)?;
            check_threads(threads)?;
            if backend == Backend::Wgsl {
                WgslBackend.available().map_err(|e| anyhow!("{e}"))?;
            }
            let (c, _) = optimized(&spec_c, &opt)?;
            let given = parse_dims(&dims).map_err(|e| anyhow!("--dims: {e}"))?;
            let b = bind_given(&c, &given)?;
            attnc_codegen::host::check_memory(&attnc::memory_parts(&c, &b, false))?;
            let args = tune::TuneArgs {
                spec: &spec_c,
                passes: &opt.config()?,
                given: &given,
                top_k: top_k as usize,
                samples: samples as usize,
                report: report.as_deref(),
                seed,
            };
            let text = match backend {
                Backend::Wgsl => tune::tune(&WgslSpace::new(), &c, args)?,
                _ => tune::tune(&CpuSpace::new(threads), &c, args)?,
            };
            out!("{text}");
        }
        Cmd::Explain { spec, dims, opt } => {
            let (_, c) = load(&spec)?;
            let (oc, log) = optimized(&c, &opt)?;
            let shape = match &dims {
                Some(d) => Some(bind_given(&c, &parse_dims(d).map_err(|e| anyhow!("--dims: {e}"))?)?),
                None => None,
            };
            out!("{}", attnc::explain::explain(&c, &oc, &log, &opt.config()?, shape.as_ref())?);
        }
        Cmd::Peak { threads, seconds } => {
            if !(seconds > 0.0 && seconds <= 600.0) {
                return Err(anyhow!("--seconds must be in (0, 600]"));
            }
            let p = attnc_codegen::cpu::peak::fma_peak(threads, seconds);
            outln!("fma peak {:.1} GFLOP/s ({:?}, {} threads; {})", p.gflops, p.isa, p.threads, CpuBackend::default().device());
        }
        Cmd::Codes => {
            for (code, what) in attnc::dsl::CODES {
                outln!("{code}  {what}");
            }
        }
    }
    Ok(())
}

/// Which backward `attnc grad` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum GradBackend {
    Auto,
    Cpu,
    Reference,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The Vulkan loader's window-system probe (the wgsl backend) prints an error line per
    // probe when there is no runtime directory, as in containers and CI; give it a private
    // one. Set before any thread starts.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && matches!(cli.cmd, Cmd::Run { backend: Backend::Wgsl, .. } | Cmd::Bench { backend: Backend::Wgsl, .. } | Cmd::Tune { backend: Backend::Wgsl, .. })
    {
        let dir = std::env::temp_dir().join(format!("attnc-xdg-{}", std::env::var("USER").unwrap_or_else(|_| "user".into())));
        if std::fs::create_dir_all(&dir).is_ok() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            }
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
    if let Some(m) = &cli.max_memory {
        if let Err(e) = attnc_codegen::host::parse_bytes(m) {
            eprintln!("error: --max-memory: {e}");
            return ExitCode::from(2);
        }
        // Read by every backend's runtime (`attnc_codegen::host::memory_limit`); set before
        // any thread starts.
        std::env::set_var("ATTNC_MAX_MEMORY", m);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<Reported>().is_none() {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}
