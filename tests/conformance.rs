//! The conformance suite: every example, on every awkward shape, on every backend, against
//! the f64 reference interpreter. Written once; a backend joins with one `conformance!`
//! line per configuration (its `Backend` implementation does the rest, including its
//! tolerance). A backend that is not available here skips with a printed reason.

use attnc::dsl::Checked;
use attnc::ir::reference::Tensor;
use attnc::ir::DType;
use attnc::passes::PassConfig;
use attnc_codegen::cpu::microkernel::Isa;
use attnc_codegen::cpu::{CpuBackend, CpuOptions};
use attnc_codegen::ptx::{Precision, PtxBackend, PtxOptions, PtxSimBackend};
use attnc_codegen::schedule::{Algorithm, ScheduleOptions};
use attnc_codegen::wgsl::{WgslBackend, WgslOptions};
use attnc_codegen::{Backend, BackendOptions, Compiled, Tolerance};
use std::collections::BTreeMap;
mod common;
use common::examples;

/// What the suite runs: compile a checked spec and run it on inputs.
trait Runner: Sync {
    fn name(&self) -> String;
    /// `Err(reason)` when the backend cannot run here (not a failure).
    fn available(&self) -> Result<(), String>;
    fn tolerance(&self) -> Tolerance;
    fn run(&self, c: &Checked, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, String>;
}

/// A backend with its options, on the kernel after the passes `passes` selects.
struct On<B: Backend> {
    backend: B,
    options: B::Options,
    passes: PassConfig,
}

impl<B: Backend> On<B> {
    fn all(backend: B, options: B::Options) -> On<B> {
        On { backend, options, passes: PassConfig::all() }
    }
}

impl<B: Backend> Runner for On<B> {
    fn name(&self) -> String {
        format!("{}({}, passes {})", B::NAME, self.options.describe(), self.passes.describe())
    }
    fn available(&self) -> Result<(), String> {
        self.backend.available()
    }
    fn tolerance(&self) -> Tolerance {
        self.backend.tolerance()
    }
    fn run(&self, c: &Checked, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, String> {
        let (oc, _) = attnc::optimize(c, &self.passes).map_err(|e| e.to_string())?;
        let k = self.backend.compile(&oc.kernel, &oc.info, &self.options).map_err(|e| e.to_string())?.checking(&c.kernel);
        k.run(inputs, &BTreeMap::new()).map_err(|e| e.to_string())
    }
}

/// The CPU backend on the host.
fn cpu(o: CpuOptions) -> On<CpuBackend> {
    On::all(CpuBackend::default(), o)
}

/// The CPU with these schedule options.
fn cpu_schedule(s: ScheduleOptions) -> On<CpuBackend> {
    cpu(CpuOptions::with_schedule(s))
}

/// The optimized kernel under the reference interpreter: the passes' soundness, with no
/// backend in the way.
struct OptimizedReference(PassConfig);

impl Runner for OptimizedReference {
    fn name(&self) -> String {
        format!("reference(passes {})", self.0.describe())
    }
    fn available(&self) -> Result<(), String> {
        Ok(())
    }
    fn tolerance(&self) -> Tolerance {
        Tolerance::F32
    }
    fn run(&self, c: &Checked, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, String> {
        let (oc, _) = attnc::optimize(c, &self.0).map_err(|e| e.to_string())?;
        attnc::ir::reference::run(&oc.kernel, &oc.info, inputs, &BTreeMap::new()).map_err(|e| e.to_string())
    }
}

/// One conformance test: `conformance!(test_name, runner, profile filter)`; the runner is
/// any [`Runner`] (for a backend, `On::all(backend, options)`), the filter picks the
/// profiles by name. Every example runs on every profile that fits it.
macro_rules! conformance {
    ($(#[$m:meta])* $name:ident, $runner:expr, $profiles:expr) => {
        $(#[$m])*
        #[test]
        fn $name() {
            let filter: &dyn Fn(&str) -> bool = &$profiles;
            check_backend(&$runner, filter);
        }
    };
}

/// A shape profile: values for whichever of these dims a spec has, plus input tweaks.
#[derive(Clone, Copy, Debug)]
enum Tweak {
    None,
    /// Scale `q` so logits reach ~1e4.
    LargeLogits,
    /// Put a NaN in one element of `q`.
    Nan,
}

struct Profile {
    name: &'static str,
    dims: &'static [(&'static str, i64)],
    tweak: Tweak,
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "basic",
        dims: &[("B", 1), ("H", 2), ("G", 2), ("N", 37), ("M", 37), ("D", 16), ("Dv", 16), ("K", 2), ("P", 5), ("MP", 3)],
        tweak: Tweak::None,
    },
    Profile {
        name: "cross_gqa_b2",
        dims: &[("B", 2), ("H", 4), ("G", 2), ("N", 29), ("M", 70), ("D", 8), ("Dv", 12), ("K", 3), ("P", 5), ("MP", 3)],
        tweak: Tweak::None,
    },
    Profile {
        name: "mqa_n70",
        dims: &[("B", 2), ("H", 4), ("G", 1), ("N", 70), ("M", 70), ("D", 32), ("Dv", 8), ("K", 2), ("P", 5), ("MP", 3)],
        tweak: Tweak::None,
    },
    Profile {
        name: "decode",
        dims: &[("B", 1), ("H", 2), ("G", 2), ("N", 1), ("M", 65), ("D", 16), ("Dv", 16), ("K", 1), ("P", 5), ("MP", 3)],
        tweak: Tweak::None,
    },
    // A few query rows (a speculative block): the CPU's tiled kernel reads the keys in
    // place (`qk_direct`) for up to 16; channel tails on every vector width.
    Profile {
        name: "few_rows",
        dims: &[("B", 1), ("H", 4), ("G", 2), ("N", 11), ("M", 70), ("D", 20), ("Dv", 12), ("K", 2), ("P", 5), ("MP", 3)],
        tweak: Tweak::None,
    },
    Profile {
        name: "masked_rows",
        dims: &[("B", 1), ("H", 1), ("G", 1), ("N", 40), ("M", 20), ("D", 16), ("Dv", 16), ("K", 1), ("P", 5), ("MP", 3)],
        tweak: Tweak::None,
    },
    Profile {
        name: "grid256",
        dims: &[("B", 1), ("H", 1), ("G", 1), ("N", 256), ("M", 256), ("D", 8), ("Dv", 8), ("K", 2), ("P", 5), ("MP", 3)],
        tweak: Tweak::None,
    },
    Profile {
        name: "large_logits",
        dims: &[("B", 1), ("H", 2), ("G", 2), ("N", 37), ("M", 37), ("D", 16), ("Dv", 16), ("K", 2), ("P", 5), ("MP", 3)],
        tweak: Tweak::LargeLogits,
    },
    Profile {
        name: "nan",
        dims: &[("B", 1), ("H", 2), ("G", 2), ("N", 37), ("M", 37), ("D", 16), ("Dv", 16), ("K", 2), ("P", 5), ("MP", 3)],
        tweak: Tweak::Nan,
    },
];

/// Inputs for a spec under a profile, or `None` when the profile does not fit the spec
/// (its requirements fail, e.g. N ≠ M for a spec that needs N == M).
fn inputs_for(c: &Checked, p: &Profile, seed: u64) -> Option<BTreeMap<String, Tensor>> {
    let dims: BTreeMap<String, i64> = p.dims.iter().filter(|(d, _)| c.info.free_dims.iter().any(|f| f == d)).map(|(d, v)| (d.to_string(), *v)).collect();
    let b = attnc::bind_dims(c, &dims).ok()?;
    let mut ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, seed).ok()?;
    match p.tweak {
        Tweak::None => {}
        Tweak::LargeLogits => {
            // Rounded to q's type, so the reference and the backend read the same numbers.
            let round: fn(f64) -> f64 = match c.kernel.tensor("q")?.dtype {
                DType::BF16 => |x| half::bf16::from_f64(x).to_f64(),
                DType::F16 => |x| half::f16::from_f64(x).to_f64(),
                _ => |x| (x as f32) as f64,
            };
            let q = ins.get_mut("q")?;
            q.data.iter_mut().for_each(|x| *x = round(*x * 2500.0));
        }
        Tweak::Nan => {
            let q = ins.get_mut("q")?;
            let n = q.data.len();
            q.data[n / 3] = f64::NAN;
        }
    }
    Some(ins)
}

/// Max error allowed: the backend's tolerance, relative to the output's scale (looser for
/// logits of 1e4, whose f32 rounding error of ~1e-3 reaches the exponent).
fn compare(name: &str, got: &Tensor, want: &Tensor, tweak: Tweak, tol: Tolerance) -> Result<(), String> {
    if got.shape != want.shape {
        return Err(format!("{name}: shape {:?}, reference {:?}", got.shape, want.shape));
    }
    let tol = match tweak {
        Tweak::LargeLogits => Tolerance { atol: tol.atol.max(2e-2), rtol: tol.rtol.max(2e-2) },
        _ => tol,
    };
    tol.check(&got.data, &want.data)
        .map_err(|(n, g, w)| format!("{name}: element {n} is {g}, reference {w} (atol {:.0e}·rms, rtol {:.0e})", tol.atol, tol.rtol))
}

fn check_backend(r: &dyn Runner, filter: &dyn Fn(&str) -> bool) {
    check_examples(r, &|_| true, filter, 28);
}

/// Runs `r` on the examples `pick` selects, on the profiles `filter` selects; at least
/// `min_cases` cases must run.
fn check_examples(r: &dyn Runner, pick: &dyn Fn(&str) -> bool, filter: &dyn Fn(&str) -> bool, min_cases: usize) {
    check_cases(r, examples().into_iter().filter(|(n, _)| pick(n)).collect(), filter, min_cases);
}

/// Runs `r` on `cases` (name and spec), on the profiles `filter` selects.
fn check_cases(r: &dyn Runner, cases: Vec<(String, Checked)>, filter: &dyn Fn(&str) -> bool, min_cases: usize) {
    if let Err(why) = r.available() {
        // CI sets ATTNC_REQUIRE_BACKENDS (e.g. `wgsl`) where it installed a backend's driver,
        // so a missing one fails instead of skipping.
        let required = std::env::var("ATTNC_REQUIRE_BACKENDS").unwrap_or_default();
        assert!(!required.split(',').any(|b| !b.is_empty() && r.name().starts_with(b.trim())), "{} is required here but unavailable: {why}", r.name());
        eprintln!("skipping {}: {why}", r.name());
        return;
    }
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, c) in cases {
        for p in PROFILES.iter().filter(|p| filter(p.name)) {
            let Some(ins) = inputs_for(&c, p, 7) else {
                continue;
            };
            let label = format!("{} {name} [{}]", r.name(), p.name);
            let want = match attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()) {
                Ok(w) => w,
                Err(e) => panic!("{label}: reference failed: {e}"),
            };
            ran += 1;
            match r.run(&c, &ins) {
                Ok(got) => {
                    if let Err(e) = compare(&label, &got, &want, p.tweak, r.tolerance()) {
                        failures.push(e);
                    }
                }
                Err(e) => failures.push(format!("{label}: {e}")),
            }
        }
    }
    eprintln!("{}: {ran} cases, {} failed", r.name(), failures.len());
    assert!(ran >= min_cases, "{ran} cases ran, expected at least {min_cases}");
    assert!(failures.is_empty(), "{} of {ran} cases differ from the reference:\n{}", failures.len(), failures.join("\n"));
}

conformance!(cpu_matches_reference_on_every_example_and_shape, cpu(CpuOptions::default()), |_| true);
conformance!(cpu_row_kernel_matches_reference, cpu_schedule(ScheduleOptions { tiled: false, chunk: 0, ..Default::default() }), |p| p != "grid256");
conformance!(
    cpu_generated_matmuls_match_reference,
    cpu(CpuOptions { microkernel: false, ..CpuOptions::with_schedule(ScheduleOptions { block_q: 16, block_k: 32, ..Default::default() }) }),
    |_| true
);
conformance!(
    /// Masks with class equalities (swin_window, neighborhood_2d) in the positions' order,
    /// as they run with `permute` off (the default sorts tokens by class).
    cpu_in_position_order_matches_reference,
    cpu_schedule(ScheduleOptions { permute: false, ..Default::default() }),
    |p| matches!(p, "basic" | "cross_gqa_b2" | "grid256")
);
/// The microkernels of every instruction set this host runs besides its widest (which
/// every other CPU test uses): AVX2 and the portable routines on an AVX-512 host, the
/// portable ones on an AVX2 host.
#[test]
fn cpu_narrower_microkernels_match_reference() {
    let narrower = Isa::available().into_iter().skip(1).collect::<Vec<_>>();
    if narrower.is_empty() {
        eprintln!("skipping: this host runs only the portable microkernels, which the other tests cover");
    }
    for isa in narrower {
        check_backend(&cpu(CpuOptions { isa: Some(isa), ..CpuOptions::default() }), &|p| {
            matches!(p, "basic" | "mqa_n70" | "few_rows" | "masked_rows" | "large_logits" | "nan")
        });
    }
}

conformance!(cpu_without_fma_matches_reference, cpu(CpuOptions { fma: false, ..CpuOptions::default() }), |p| matches!(p, "basic" | "cross_gqa_b2" | "nan"));
conformance!(cpu_without_fma_or_microkernel_matches_reference, cpu(CpuOptions { fma: false, microkernel: false, ..CpuOptions::default() }), |p| matches!(
    p,
    "basic" | "masked_rows"
));
conformance!(
    /// The WebGPU backend (lavapipe in CI) as it runs untuned: the tiled kernel (16×16
    /// tiles, 16 invocations per query row) on every example whose score tiles, the row
    /// kernel on the others (GLA), on every shape (but `few_rows`, a CPU path's shape: a
    /// lavapipe run costs CI time).
    wgsl_matches_reference_on_every_example_and_shape,
    On::all(WgslBackend, WgslOptions::default()),
    |p| p != "few_rows"
);
/// The PTX backend's exact f32 row kernel, run by the PTX interpreter (no GPU needed):
/// every example on the small shapes, including N ≠ M with GQA, decode, rows with no key,
/// logits of 1e4 and NaN; MLA (576-channel keys, 512-channel values: a minute per shape in
/// the interpreter) on the decode shape it is written for.
#[test]
fn ptx_sim_matches_reference_on_every_example() {
    let on = On::all(PtxSimBackend, PtxOptions::default());
    check_examples(&on, &|n| n != "mla_decode", &|p| matches!(p, "basic" | "cross_gqa_b2" | "decode" | "masked_rows" | "large_logits" | "nan"), 150);
    check_examples(&on, &|n| n == "mla_decode", &|p| p == "decode", 1);
}
/// The PTX backend on an NVIDIA GPU (device 0, through cudarc): every example, every
/// shape, as f32 (the row kernel) and as bf16 (the tensor-core kernel where it fits).
/// Skipped where there is no NVIDIA driver, unless `ATTNC_REQUIRE_BACKENDS` names `ptx`.
#[test]
fn ptx_gpu_matches_reference_on_every_example() {
    let on = On::all(PtxBackend, PtxOptions::default());
    check_examples(&on, &|_| true, &|_| true, 150);
    if on.available().is_ok() {
        check_cases(&PtxTensorCores(DType::BF16, true), common::examples_as("bf16"), &|_| true, 150);
    }
}

/// A NaN or an infinity in the values at a key that the mask hides from most rows reaches
/// only the rows that keep it (the reference skips masked pairs; a matmul would multiply it
/// by their zero weights). The PTX backend runs such a call on its row kernel; so does the
/// CPU's tiled kernel.
#[test]
fn non_finite_values_at_masked_keys_reach_only_the_rows_that_keep_them() {
    let read = |name: &str| std::fs::read_to_string(format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"))).expect("example");
    let bf16 = |src: &str| -> String {
        src.lines()
            .map(|l| if l.trim_start().starts_with("input ") { l.replacen(": f32[", ": bf16[", 1) } else { l.to_string() })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (causal, retnet) = (read("sdpa_causal"), read("retnet"));
    let tiled = ScheduleOptions::default();
    let runners: Vec<(Box<dyn Runner>, String)> = vec![
        (Box::new(PtxTensorCores(DType::BF16, false)), bf16(&causal)),
        (Box::new(On::all(PtxSimBackend, PtxOptions::default())), causal.clone()),
        (Box::new(cpu_schedule(ScheduleOptions { tiled: false, chunk: 0, ..Default::default() })), causal.clone()),
        (Box::new(cpu_schedule(ScheduleOptions { tiled: true, chunk: 0, ..tiled.clone() })), causal.clone()),
        (Box::new(cpu_schedule(ScheduleOptions { tiled: true, chunk: 0, ..tiled.clone() })), retnet.clone()),
        (Box::new(cpu_schedule(ScheduleOptions { chunk: 8, ..tiled.clone() })), retnet.clone()),
        (Box::new(On::all(WgslBackend, WgslOptions::default())), causal.clone()),
        (Box::new(On::all(WgslBackend, WgslOptions::default())), retnet.clone()),
    ];
    for (r, text) in runners {
        if r.available().is_err() {
            continue;
        }
        let c = attnc::dsl::compile(&text).expect("spec");
        let all = [("B", 1), ("H", 1), ("G", 1), ("N", 40), ("M", 40), ("D", 16), ("Dv", 16)];
        let dims: BTreeMap<String, i64> = all.iter().filter(|(d, _)| c.kernel.dims.iter().any(|x| x.name == *d)).map(|(d, v)| (d.to_string(), *v)).collect();
        let b = attnc::bind_dims(&c, &dims).expect("dims");
        // Key 39 is kept by row 39 only: a bad value there reaches one element of the
        // reference's output, a bad key one row.
        for (input, bad, reached) in [("v", f64::NAN, 1), ("v", f64::INFINITY, 1), ("k", f64::NAN, 16), ("k", f64::INFINITY, 16)] {
            let mut ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 1).expect("inputs");
            let t = ins.get_mut(input).expect("input");
            let last = t.data.len() - 16;
            t.data[last] = bad; // key 39, channel 0
            let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
            let got = r.run(&c, &ins).expect("runs");
            let non_finite = |t: &Tensor| t.data.iter().filter(|x| !x.is_finite()).count();
            let what = format!("{} on {}, {bad} at {input}[key 39]", r.name(), c.kernel.name);
            assert_eq!(non_finite(&want), reached, "the reference: row 39 ({what})");
            assert_eq!(non_finite(&got), reached, "{what}: it leaks past the rows that keep the key");
            compare(&what, &got, &want, Tweak::None, r.tolerance()).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Without a mask every pair is in the reference's sum, so a NaN or an infinity among the
/// values reaches every row either way: the tiled kernel runs such a call itself (no pass
/// over the values to find it, no row kernel), and matches; so does the PTX tensor-core
/// kernel (bf16, in the interpreter).
#[test]
fn non_finite_values_without_a_mask_run_tiled_and_reach_every_row() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sdpa.attn")).expect("example");
    let c = attnc::dsl::compile(&src).expect("spec");
    let bf16 = attnc::dsl::compile(&src.replace(": f32[", ": bf16[").replace("output o: bf16[", "output o: f32[")).expect("bf16 spec");
    let ptx = PtxTensorCores(DType::BF16, false);
    // A prefill and a decode step (one query row: keys read in place).
    for rows in [40, 1] {
        let dims: BTreeMap<String, i64> =
            [("B", 1), ("H", 2), ("N", rows), ("M", 70), ("D", 16), ("Dv", 16)].iter().map(|(d, v)| (d.to_string(), *v)).collect();
        let b = attnc::bind_dims(&c, &dims).expect("dims");
        let schedule = ScheduleOptions { tiled: true, chunk: 0, ..Default::default() };
        let k = CpuBackend::default().compile(&c.kernel, &c.info, &CpuOptions::with_schedule(schedule)).expect("compiles");
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 3).expect("inputs");
            let v = ins.get_mut("v").expect("v");
            v.data[69 * 16 + 5] = bad; // batch 0, head 0, the last key (a tail of its tile), channel 5
            let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
            let got = k.run(&ins, &BTreeMap::new()).expect("runs");
            let non_finite = |t: &Tensor| t.data.iter().filter(|x| !x.is_finite()).count();
            let what = format!("sdpa, {rows} query rows, {bad} at v[key 69]");
            assert_eq!(non_finite(&want), rows as usize, "the reference: channel 5 of head 0's rows ({what})");
            assert_eq!(non_finite(&got), non_finite(&want), "{what}");
            compare(&what, &got, &want, Tweak::None, Tolerance::F32).unwrap_or_else(|e| panic!("{e}"));
            // The same inputs rounded to bf16 (what the kernel reads) on the tensor cores.
            let mut hins = ins.clone();
            for t in hins.values_mut() {
                t.data.iter_mut().for_each(|x| *x = half::bf16::from_f64(*x).to_f64());
            }
            let want = attnc::ir::reference::run(&bf16.kernel, &bf16.info, &hins, &BTreeMap::new()).expect("reference");
            let got = ptx.run(&bf16, &hins).expect("runs");
            assert_eq!(non_finite(&got), non_finite(&want), "{} ({what})", ptx.name());
            compare(&format!("{} ({what})", ptx.name()), &got, &want, Tweak::None, ptx.tolerance()).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(!k.has_fallen_back_to_rows(), "{rows} query rows: the tiled kernel ran every call");
    }
}

/// Two branches whose dots read other queries against the same keys (differential
/// attention with one key tensor): one key panel, each branch its own packed queries (the
/// tiled kernels once used the first branch's queries for both).
#[test]
fn branches_with_their_own_queries_over_shared_keys_match_reference() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diff_attn.attn")).expect("example");
    let shared = src.replace("k2[b, h, j, :]", "k1[b, h, j, :]").replace("  input k2: f32[B, H, M, D]\n", "");
    assert_ne!(shared, src);
    let c = attnc::dsl::compile(&shared).expect("spec");
    let cases = || vec![("diff_attn_shared_keys".to_string(), c.clone())];
    let profiles = |p: &str| matches!(p, "basic" | "cross_gqa_b2" | "decode" | "masked_rows" | "nan");
    check_cases(&cpu_schedule(ScheduleOptions::default()), cases(), &profiles, 4);
    check_cases(&cpu_schedule(ScheduleOptions { block_q: 16, block_k: 16, ..Default::default() }), cases(), &profiles, 4);
    check_cases(&On::all(WgslBackend, WgslOptions::default()), cases(), &profiles, 4);
}

/// A score with no dot product (a positional softmax alone, as gpsa's second branch):
/// the tiled kernels have no key panel (the CPU's pack once panicked on it).
#[test]
fn a_score_without_a_dot_product_matches_reference() {
    let src = "attention nodot {
      dims B, H, N, M, Dv
      input v: f32[B, H, M, Dv]
      input slope: f32[H]
      input g: f32[B, H, N]
      output o: f32[B, H, N, Dv]
      score = -slope[h] * float(p - j) + 0.25 * float((p + 3 * j) % 5)
      mask = j <= p
      normalize = softmax
      value = v[b, h, j, e]
      gate = sigmoid(g[b, h, i])
    }";
    let c = attnc::dsl::compile(src).expect("spec");
    let cases = || vec![("nodot".to_string(), c.clone())];
    let profiles = |p: &str| matches!(p, "basic" | "cross_gqa_b2" | "decode" | "masked_rows");
    check_cases(&cpu_schedule(ScheduleOptions::default()), cases(), &profiles, 4);
    check_cases(
        &cpu(CpuOptions { microkernel: false, ..CpuOptions::with_schedule(ScheduleOptions { block_q: 16, block_k: 32, ..Default::default() }) }),
        cases(),
        &profiles,
        4,
    );
    check_cases(&cpu_schedule(ScheduleOptions { tiled: false, chunk: 0, ..Default::default() }), cases(), &profiles, 4);
    check_cases(&On::all(WgslBackend, WgslOptions::default()), cases(), &profiles, 4);
    check_cases(&On::all(PtxSimBackend, PtxOptions::default()), cases(), &profiles, 4);
}

/// Floor division and modulo by negative constants (−1, −3, −4) and a positive one, in a
/// bias and a mask, of terms that mix the query and the key (a row-only term would cancel in
/// the softmax): `x % −1` once came out as `2x` on the CPU (the fuzz test's find).
#[test]
fn floor_division_by_negative_constants_matches_reference() {
    let src = biased_softmax(
        "negdiv",
        "float(abs((p - j) % -1)) * 0.5 + float(abs((p + j) // -3)) * 0.1 + float((7 * p + j) % -4) * 0.2 + float((p - j) // -1 % 5)",
        "((p + j) % -3) != -1",
    );
    let c = attnc::dsl::compile(&src).expect("spec");
    let cases = || vec![("negdiv".to_string(), c.clone())];
    let profiles = |p: &str| matches!(p, "basic" | "cross_gqa_b2" | "decode");
    check_cases(&cpu_schedule(ScheduleOptions::default()), cases(), &profiles, 2);
    check_cases(&cpu_schedule(ScheduleOptions { tiled: false, chunk: 0, ..Default::default() }), cases(), &profiles, 2);
    check_cases(&On::all(WgslBackend, WgslOptions::default()), cases(), &profiles, 2);
    check_cases(&On::all(PtxSimBackend, PtxOptions::default()), cases(), &profiles, 2);
}

/// f32 specs with `precision = bf16` (or f16) on the PTX interpreter: queries, keys and
/// values rounded on the device, the tensor-core kernel wherever it applies, against the
/// f32 reference within [`ptx::tensor::lowered_tolerance`].
struct PtxLowered(DType, Precision);

impl Runner for PtxLowered {
    fn name(&self) -> String {
        format!("ptx-sim, f32 specs at {:?}", self.1)
    }
    fn available(&self) -> Result<(), String> {
        Ok(())
    }
    fn tolerance(&self) -> Tolerance {
        attnc_codegen::ptx::tensor::lowered_tolerance(self.0)
    }
    fn run(&self, c: &Checked, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, String> {
        // Lowered before the passes, as `attnc run --precision` does.
        let lowered = attnc::at_precision(c, self.1);
        let (oc, _) = attnc::optimize(&lowered, &PassConfig::all()).map_err(|e| e.to_string())?;
        let o = PtxOptions { precision: self.1, ..PtxOptions::default() };
        let k = PtxSimBackend.compile(&oc.kernel, &oc.info, &o).map_err(|e| e.to_string())?.checking(&c.kernel);
        k.run(inputs, &BTreeMap::new()).map_err(|e| e.to_string())
    }
}

#[test]
fn ptx_sim_f32_specs_at_lowered_precision_match_reference() {
    let cases = || examples().into_iter().filter(|(n, _)| n != "mla_decode").collect::<Vec<_>>();
    check_cases(&PtxLowered(DType::BF16, Precision::Bf16), cases(), &|p| matches!(p, "basic" | "cross_gqa_b2" | "masked_rows" | "nan"), 40);
    check_cases(&PtxLowered(DType::F16, Precision::F16), cases(), &|p| p == "basic", 20);
}

/// The PTX tensor-core kernel under [`ptx::tensor::tolerance`], with the row kernel where a
/// spec or shape does not fit it; on the interpreter, or (`true`) on the GPU.
struct PtxTensorCores(DType, bool);

impl Runner for PtxTensorCores {
    fn name(&self) -> String {
        format!("{} tensor cores ({})", if self.1 { "ptx" } else { "ptx-sim" }, self.0)
    }
    fn available(&self) -> Result<(), String> {
        if self.1 {
            PtxBackend.available()
        } else {
            Ok(())
        }
    }
    fn tolerance(&self) -> Tolerance {
        attnc_codegen::ptx::tensor::tolerance(self.0)
    }
    fn run(&self, c: &Checked, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, String> {
        if self.1 {
            On::all(PtxBackend, PtxOptions::default()).run(c, inputs)
        } else {
            On::all(PtxSimBackend, PtxOptions::default()).run(c, inputs)
        }
    }
}

/// Every example with bf16 (and, on fewer shapes, f16) queries, keys and values, on the
/// PTX interpreter: the tensor-core kernel (`mma.sync`, `ldmatrix`, `cp.async`) wherever the
/// spec fits it, on shapes with partial query and key tiles, GQA, decode, rows with no key,
/// logits of 1e4 and NaN. The softmax examples the issue names must take the tensor-core
/// path.
#[test]
fn ptx_sim_tensor_cores_match_reference_on_every_example() {
    for (dtype, ty, profiles) in [
        (DType::BF16, "bf16", &["basic", "cross_gqa_b2", "mqa_n70", "decode", "masked_rows", "large_logits", "nan"][..]),
        (DType::F16, "f16", &["basic", "masked_rows"][..]),
    ] {
        let cases: Vec<(String, Checked)> = common::examples_as(ty).into_iter().filter(|(n, _)| n != "mla_decode").collect();
        let mut tensor = Vec::new();
        for (name, c) in &cases {
            let (oc, _) = attnc::optimize(c, &PassConfig::all()).expect("passes");
            let art = PtxSimBackend.compile(&oc.kernel, &oc.info, &PtxOptions::default()).expect("compiles");
            if art.art.tensor.is_ok() {
                tensor.push(name.clone());
            }
        }
        eprintln!("{ty}: the tensor-core kernel runs {} examples: {}", tensor.len(), tensor.join(", "));
        for want in ["sdpa", "sdpa_causal", "alibi", "sliding_window_sink", "document_mask", "softcap"] {
            assert!(tensor.iter().any(|n| n == want), "{want} does not take the tensor-core path as {ty}");
        }
        check_cases(&PtxTensorCores(dtype, false), cases, &|p| profiles.contains(&p), 40);
    }
}

conformance!(
    /// The tiled kernel with 4 invocations per row, 8 keys each of a 32-key tile, and 4
    /// channels per invocation: a workgroup holds 16 output channels, so wider outputs run
    /// in slices over several workgroups.
    wgsl_tiled_narrow_rows_and_value_slices_match_reference,
    On::all(WgslBackend, WgslOptions { workgroup: 64, channels: 4, schedule: ScheduleOptions { block_q: 16, block_k: 32, ..WgslOptions::default().schedule } }),
    |p| matches!(p, "basic" | "cross_gqa_b2" | "mqa_n70" | "decode" | "masked_rows" | "nan")
);
conformance!(
    /// The row kernel with small workgroups: several key tiles per row, channels spread
    /// over more slots, and tile classes per 3 query rows (row blocks that divide no shape).
    wgsl_row_kernel_small_workgroups_match_reference,
    On::all(WgslBackend, WgslOptions { workgroup: 16, channels: 32, schedule: ScheduleOptions { tiled: false, block_q: 3, ..WgslOptions::default().schedule } }),
    |p| matches!(p, "basic" | "cross_gqa_b2" | "decode" | "masked_rows" | "nan")
);
conformance!(
    /// Every pass preserves every example's values under the reference interpreter.
    passes_preserve_every_example_under_the_reference,
    OptimizedReference(PassConfig::all()),
    |p| matches!(p, "basic" | "cross_gqa_b2" | "decode" | "masked_rows" | "nan")
);

/// The examples a pass rewrites (with every pass on).
fn rewritten_by(pass: &str) -> Vec<String> {
    examples().into_iter().filter(|(_, c)| attnc::optimize(c, &PassConfig::all()).expect("passes").1.iter().any(|a| a.pass == pass)).map(|(n, _)| n).collect()
}

/// With each pass off in turn, the CPU backend still matches on the examples that pass
/// rewrites (the others do not change); and with none, on all of them.
#[test]
fn cpu_matches_reference_with_each_pass_off() {
    for attnc::passes::Pass { name: pass, .. } in attnc::passes::PASSES {
        let names = rewritten_by(pass);
        let mut cfg = PassConfig::all();
        cfg.set(pass, false).expect("a pass");
        let on = On { passes: cfg, ..cpu(CpuOptions::default()) };
        check_examples(&on, &|n| names.iter().any(|x| x == n), &|p| matches!(p, "basic" | "cross_gqa_b2" | "decode"), names.len());
    }
    check_backend(&On { passes: PassConfig::none(), ..cpu(CpuOptions::default()) }, &|p| matches!(p, "basic" | "cross_gqa_b2" | "masked_rows" | "nan"));
}

/// The passes rewrite what they should: low-rank bias on the ALiBi family, hoisting and
/// folding on cosine, the linear normal form on the linear and decay examples (cosFormer
/// once its cosine splits into query and key terms).
#[test]
fn passes_apply_where_expected() {
    assert_eq!(rewritten_by("lowrank"), ["alibi", "sigmoid_alibi"]);
    assert_eq!(rewritten_by("hoist"), ["cosine"]);
    assert_eq!(rewritten_by("linear"), ["cosformer", "cosine", "gla", "linear_elu", "retnet"]);
    assert_eq!(rewritten_by("relpos"), ["t5_bias"]);
}

/// The tiled CPU kernel's vector `log` (`vlog`) value by value against Rust's `ln` of the
/// same f32 (one key per row, so each output is one log): zeros, negatives, infinities and
/// NaN give what `ln` gives, powers of two exactly `k · ln 2` rounded once (T5's buckets
/// compare such values with integers), every other value within 2 ulp.
#[test]
fn the_vector_log_matches_ln_value_by_value() {
    let src = "attention logs {
      dims B, H, N, M, Dv
      input x: f32[B, H, N, M]
      input v: f32[B, H, M, Dv]
      output o: f32[B, H, N, Dv]
      score = log(x[b, h, i, j])
      normalize = none
      value = v[b, h, j, e]
    }";
    let c = attnc::dsl::compile(src).unwrap_or_else(|d| panic!("{}", d.render("logs.attn", src)));
    let mut xs: Vec<f32> = vec![0.0, -0.0, -1.0, -1e-30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.0, f32::MIN_POSITIVE, 1e-45, 2f32.powi(-130), f32::MAX];
    xs.extend((-149..=127).map(|k| 2f32.powi(k)));
    // Around the reduction's edges (√2, √½, 1) and a few others.
    let (r2, r12) = (std::f32::consts::SQRT_2.to_bits(), std::f32::consts::FRAC_1_SQRT_2.to_bits());
    xs.extend([r2 - 1, r2, r2 + 1, r12 - 1, r12, r12 + 1, 0x3f7f_ffff, 0x3f80_0001].map(f32::from_bits));
    xs.extend([3.0, 10.0, 1e10, 1e-10]);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..700 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Uniform exponents over the normal range, uniform mantissas.
        xs.push(f32::from_bits(((state >> 40) as u32 % (254 << 23)) + (1 << 23)));
    }
    let n = xs.len();
    let x = Tensor::new(vec![1, 1, n, 1], xs.iter().map(|v| *v as f64).collect());
    let v = Tensor::new(vec![1, 1, 1, 1], vec![1.0]);
    let ins: BTreeMap<String, Tensor> = [("x".to_string(), x), ("v".to_string(), v)].into_iter().collect();
    // The tiled kernel (the cost model would take the row kernel's scalar `ln` for one key).
    let tiled = CpuOptions::with_schedule(ScheduleOptions::default());
    for r in [cpu(tiled.clone()), cpu(CpuOptions { microkernel: false, ..tiled })] {
        let got = r.run(&c, &ins).unwrap_or_else(|e| panic!("{}: {e}", r.name()));
        for (n, (x, g)) in xs.iter().zip(&got.data).enumerate() {
            let (want, g) = (x.ln(), *g as f32);
            let ok = if want.is_nan() || want.is_infinite() {
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan())
            } else if x.to_bits() & 0x007f_ffff == 0 && x.is_normal() || *x == 2f32.powi(-149) {
                // A power of two: k · ln 2 rounded once.
                let k = if x.is_normal() { ((x.to_bits() >> 23) as i32) - 127 } else { -149 };
                g == (k as f64 * std::f64::consts::LN_2) as f32
            } else {
                (g.to_bits() as i64 - want.to_bits() as i64).abs() <= 2 || (g - want).abs() <= 2.0 * f32::EPSILON * want.abs().max(f32::MIN_POSITIVE)
            };
            assert!(ok, "{}: log({x:e}) (element {n}) = {g:e}, ln gives {want:e}", r.name());
        }
    }
}

/// Biases of the offset `p − j` alone become tables over the offsets (the `relpos` pass):
/// a relative-position table read only where the mask keeps the pair (its index is outside
/// the table at the masked offsets: the table clamps them), T5's decoder buckets (causal,
/// one direction) with N ≠ M, and a log distance under a sigmoid; on the CPU schedules, WGSL
/// and the PTX interpreter, each with the pass on and off.
#[test]
fn biases_of_the_offset_alone_match_reference() {
    let spec = |name: &str, bias: &str, mask: &str, norm: &str| {
        let src = format!(
            "attention {name} {{
               dims B, H, G, N, M, D, Dv
               input q: f32[B, H, N, D]
               input k: f32[B, G, M, D]
               input v: f32[B, G, M, Dv]
               input rel: f32[H, 32]
               output o: f32[B, H, N, Dv]
               require H % G == 0
               score = dot(q[b, h, i, :], k[b, h // (H // G), j, :]) / sqrt(D)
               bias = {bias}
               {mask}
               normalize = {norm}
               value = v[b, h // (H // G), j, e]
             }}"
        );
        let c = attnc::dsl::compile(&src).unwrap_or_else(|d| panic!("{name}: {}", d.message));
        assert!(attnc::optimize(&c, &PassConfig::all()).expect("passes").1.iter().any(|a| a.pass == "relpos"), "{name}: no table");
        (name.to_string(), c)
    };
    let cases = || {
        vec![
            spec("window_table", "rel[h, p - j]", "mask = j <= p && p - j < 32", "softmax"),
            spec(
                "t5_decoder",
                "rel[h, select(p - j < 16, p - j, min(31, 16 + int(log(float(abs(p - j)) / 16.0) / log(8.0) * 16.0)))]",
                "mask = j <= p",
                "softmax",
            ),
            spec("log_distance", "-rel[h, 0] * log(1.0 + float(abs(p - j)))", "", "sigmoid"),
        ]
    };
    let profiles = |p: &str| matches!(p, "basic" | "cross_gqa_b2" | "decode" | "masked_rows" | "few_rows");
    let mut off = PassConfig::all();
    off.set("relpos", false).expect("a pass");
    for passes in [PassConfig::all(), off] {
        check_cases(&On { passes: passes.clone(), ..cpu_schedule(ScheduleOptions::default()) }, cases(), &profiles, 6);
        check_cases(&On { passes: passes.clone(), ..cpu_schedule(ScheduleOptions { tiled: false, chunk: 0, ..Default::default() }) }, cases(), &profiles, 6);
        check_cases(&On { passes: passes.clone(), ..On::all(WgslBackend, WgslOptions::default()) }, cases(), &profiles, 6);
        check_cases(&On { passes, ..On::all(PtxSimBackend, PtxOptions::default()) }, cases(), &profiles, 6);
    }
}

/// The chunked algorithm with several chunks (state carried between them), and the
/// quadratic kernels on the same normal form.
#[test]
fn chunked_and_quadratic_linear_attention_match_reference() {
    let names = rewritten_by("linear");
    let linear = |n: &str| names.iter().any(|x| x == n);
    for chunk in [16, 0] {
        check_examples(&cpu_schedule(ScheduleOptions { chunk, ..Default::default() }), &linear, &|_| true, 4);
    }
    check_examples(&cpu_schedule(ScheduleOptions { chunk: 7, ..Default::default() }), &linear, &|p| matches!(p, "cross_gqa_b2" | "decode" | "masked_rows"), 4);
}

/// The WGSL chunked kernel on the linear and decay examples: several chunks (state carried
/// between them, 16 and 7 keys), value slices (Dv > 16), N ≠ M, decode, rows with no key.
#[test]
fn wgsl_chunked_linear_attention_matches_reference() {
    let names = rewritten_by("linear");
    let linear = |n: &str| names.iter().any(|x| x == n);
    for (chunk, workgroup) in [(16, 64), (7, 32)] {
        let o = WgslOptions { workgroup, schedule: ScheduleOptions { chunk, ..WgslOptions::default().schedule }, ..WgslOptions::default() };
        check_examples(&On::all(WgslBackend, o), &linear, &|p| matches!(p, "basic" | "cross_gqa_b2" | "mqa_n70" | "decode" | "masked_rows" | "nan"), 4);
    }
}

/// The PTX chunked kernel on the interpreter, as the WGSL one above: several chunks (16 and
/// 7 keys), value slices, N ≠ M, decode, rows with no key, NaN.
#[test]
fn ptx_sim_chunked_linear_attention_matches_reference() {
    let names = rewritten_by("linear");
    let linear = |n: &str| names.iter().any(|x| x == n);
    for (chunk, threads) in [(16, 64), (7, 32)] {
        let o = PtxOptions { threads, schedule: ScheduleOptions { chunk, ..PtxOptions::default().schedule }, ..PtxOptions::default() };
        check_examples(&On::all(PtxSimBackend, o), &linear, &|p| matches!(p, "basic" | "cross_gqa_b2" | "mqa_n70" | "decode" | "masked_rows" | "nan"), 4);
    }
}

/// A log-decay that jumps up by 35 within a chunk (GLA's gate positive at one position):
/// the WGSL and PTX chunked kernels' split factors pass their e^30 limit, so they compute
/// the head again in the exact pairwise form (the CPU's limit is e^60: it keeps the split
/// form); all match the reference.
#[test]
fn chunked_forms_fall_back_when_the_log_decay_increases() {
    let (_, c) = examples().into_iter().find(|(n, _)| n == "gla").expect("gla example");
    let p = PROFILES.iter().find(|p| p.name == "basic").expect("profile");
    let mut ins = inputs_for(&c, p, 5).expect("inputs");
    let a = ins.get_mut("a").expect("log gate");
    let [_, _, n, d]: [usize; 4] = a.shape.clone().try_into().unwrap();
    for (x, v) in a.data.iter_mut().enumerate() {
        *v = if (x / d) % n == 20 { 35.0 } else { -0.01 };
    }
    let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
    let schedule = ScheduleOptions { chunk: 16, ..Default::default() };
    let wgsl = On::all(WgslBackend, WgslOptions { schedule: ScheduleOptions { chunk: 16, ..WgslOptions::default().schedule }, ..WgslOptions::default() });
    let ptx = On::all(PtxSimBackend, PtxOptions { schedule: ScheduleOptions { chunk: 16, ..PtxOptions::default().schedule }, ..PtxOptions::default() });
    let runners: Vec<Box<dyn Runner>> = vec![Box::new(cpu_schedule(schedule)), Box::new(wgsl), Box::new(ptx)];
    for r in runners {
        if r.available().is_err() {
            continue;
        }
        let got = r.run(&c, &ins).expect("runs");
        compare(&format!("gla (increasing log-decay) on {}", r.name()), &got, &want, Tweak::None, r.tolerance()).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// f16 and bf16 inputs (a spec that declares them): half width on the device, decoded
/// exactly; odd and even element counts.
fn check_half_width_inputs(on: &dyn Runner) {
    let src = "attention halves {
      dims B, H, N, M, D, Dv
      input q: f16[B, H, N, D]
      input k: bf16[B, H, M, D]
      input v: f16[B, H, M, Dv]
      input slope: bf16[H] in 0.0..1.0
      output o: f32[B, H, N, Dv]
      score = dot(q[b, h, i, :], k[b, h, j, :]) / sqrt(D)
      bias = -slope[h] * float(p - j) + float(v[b, h, j, 0])
      mask = j <= p
      normalize = softmax
      value = v[b, h, j, e]
    }";
    let c = attnc::dsl::compile(src).expect("spec compiles");
    if on.available().is_err() {
        return;
    }
    for (n, m, d, dv) in [(7, 9, 5, 3), (33, 33, 16, 16)] {
        let dims: BTreeMap<String, i64> = [("B", 2), ("H", 3), ("N", n), ("M", m), ("D", d), ("Dv", dv)].iter().map(|(x, v)| (x.to_string(), *v)).collect();
        let b = attnc::bind_dims(&c, &dims).expect("dims bind");
        let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 11).expect("inputs");
        let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
        let got = on.run(&c, &ins).expect("runs");
        compare(&format!("halves N={n} M={m} D={d} Dv={dv} on {}", on.name()), &got, &want, Tweak::None, on.tolerance()).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// WGSL: two halves to a word, decoded with integer operations; tiled and row kernels.
#[test]
fn wgsl_half_width_inputs_match_reference() {
    check_half_width_inputs(&On::all(WgslBackend, WgslOptions::default()));
    check_half_width_inputs(&On::all(
        WgslBackend,
        WgslOptions { schedule: ScheduleOptions { tiled: false, ..WgslOptions::default().schedule }, ..WgslOptions::default() },
    ));
}

/// PTX: 2 bytes per element (`ld.global.u16`, then `cvt.f32.f16` or a shift), on the
/// interpreter.
#[test]
fn ptx_half_width_inputs_match_reference() {
    check_half_width_inputs(&On::all(PtxSimBackend, PtxOptions::default()));
}

/// Scalar data at a neighbouring key is plain indexing, not a convolution over scores: a
/// mask that also lets every query see the first token of each earlier document reads
/// `seg[b, j - 1]` (guarded by `select(j > 0, …)`), checks, and matches the reference on the CPU
/// (tiled and rows) and on WGSL.
#[test]
fn a_mask_may_read_data_at_a_neighbouring_key() {
    let src = "attention doc_starts {
      dims B, H, N, D
      input q: f32[B, H, N, D]
      input k: f32[B, H, N, D]
      input v: f32[B, H, N, D]
      input seg: i32[B, N] in 0..3
      output o: f32[B, H, N, D]
      score = dot(q[b, h, i, :], k[b, h, j, :]) / sqrt(D)
      mask = j <= i && (seg[b, i] == seg[b, j] || select(j > 0, seg[b, j - 1] != seg[b, j], true))
      normalize = softmax
      value = v[b, h, j, e]
    }";
    let c = attnc::dsl::compile(src).unwrap_or_else(|d| panic!("{}", d.render("doc_starts.attn", src)));
    let dims: BTreeMap<String, i64> = [("B", 2), ("H", 2), ("N", 45), ("D", 16)].iter().map(|(x, v)| (x.to_string(), *v)).collect();
    let b = attnc::bind_dims(&c, &dims).expect("dims bind");
    let mut ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 9).expect("inputs");
    // Sorted segment ids: contiguous documents.
    ins.get_mut("seg").expect("seg").data.iter_mut().enumerate().for_each(|(x, s)| *s = ((x % 45) / 10) as f64);
    let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
    let runners: Vec<Box<dyn Runner>> = vec![
        Box::new(cpu(CpuOptions::default())),
        Box::new(cpu_schedule(ScheduleOptions { tiled: false, ..Default::default() })),
        Box::new(On::all(WgslBackend, WgslOptions::default())),
        Box::new(On::all(PtxSimBackend, PtxOptions::default())),
    ];
    for r in runners {
        if r.available().is_err() {
            continue;
        }
        let got = r.run(&c, &ins).unwrap_or_else(|e| panic!("{}: {e}", r.name()));
        compare(&format!("doc_starts on {}", r.name()), &got, &want, Tweak::None, r.tolerance()).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The CPU sorts tokens by the classes of a mask with class equalities (and says so), and
/// the sorted kernel gives the reference's rows in their places, saved statistics included.
#[test]
fn masks_with_class_equalities_run_over_sorted_tokens() {
    let cases = examples();
    let by_name = |n: &str| cases.iter().find(|(x, _)| x == n).expect("example").1.clone();
    for (name, sorted) in [("swin_window", true), ("neighborhood_2d", true), ("axial_rows", true), ("sdpa_causal", false), ("document_mask", false)] {
        let c = by_name(name);
        let k = CpuBackend::default().compile(&c.kernel, &c.info, &CpuOptions::default()).expect("compiles");
        assert_eq!(k.describe().contains("sorted by the mask's classes"), sorted, "{name}: {}", k.describe());
    }
    let c = by_name("swin_window");
    let dims: BTreeMap<String, i64> =
        [("B", 2), ("H", 2), ("G", 1), ("N", 300), ("M", 300), ("D", 8), ("Dv", 8)].iter().map(|(x, v)| (x.to_string(), *v)).collect();
    let b = attnc::bind_dims(&c, &dims).expect("dims bind");
    let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 5).expect("inputs");
    let (want, want_stats) = attnc::ir::reference::run_with_stats(&c.kernel, &b, &ins).expect("reference");
    for permute in [true, false] {
        let o = CpuOptions::with_schedule(ScheduleOptions { permute, ..Default::default() });
        let k = CpuBackend::default().compile(&c.kernel, &c.info, &o).expect("compiles").checking(&c.kernel);
        let (got, stats) = k.run_with_stats(&ins, &BTreeMap::new()).expect("runs");
        compare(&format!("swin_window, permute {permute}"), &got, &want, Tweak::None, Tolerance::F32).unwrap_or_else(|e| panic!("{e}"));
        compare(&format!("swin_window's statistics, permute {permute}"), &stats, &want_stats, Tweak::None, Tolerance::F32).unwrap_or_else(|e| panic!("{e}"));
    }
    // A NaN or an infinity among the values: the sorted problem takes its row kernel, and the
    // bad key reaches only the rows of its class, put back in their places.
    let k = CpuBackend::default().compile(&c.kernel, &c.info, &CpuOptions::default()).expect("compiles").checking(&c.kernel);
    for bad in [f64::NAN, f64::INFINITY] {
        let mut bad_ins = ins.clone();
        let v = bad_ins.get_mut("v").expect("v");
        let at = 8 * 137; // batch 0, key 137, channel 0
        v.data[at] = bad;
        let want = attnc::ir::reference::run(&c.kernel, &c.info, &bad_ins, &BTreeMap::new()).expect("reference");
        let got = k.run(&bad_ins, &BTreeMap::new()).expect("runs");
        let non_finite = |t: &Tensor| t.data.iter().filter(|x| !x.is_finite()).count();
        assert!(non_finite(&want) > 0 && non_finite(&want) < want.data.len() / 4, "the reference keeps the bad key to its class");
        assert_eq!(non_finite(&got), non_finite(&want), "{bad}: reaches the rows the reference does");
        compare(&format!("swin_window, {bad} in v"), &got, &want, Tweak::None, Tolerance::F32).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// One compiled kernel, called with other mask data, then with the first again: the tile
/// classes (kept with the data they came from) follow the data.
#[test]
fn a_compiled_kernel_follows_its_mask_data_from_call_to_call() {
    let src = std::fs::read_to_string("examples/document_mask.attn").expect("spec");
    let c = attnc::dsl::compile(&src).unwrap_or_else(|d| panic!("{}", d.render("document_mask.attn", &src)));
    let dims: BTreeMap<String, i64> =
        [("B", 2), ("H", 2), ("G", 1), ("N", 200), ("M", 200), ("D", 8), ("Dv", 8)].iter().map(|(x, v)| (x.to_string(), *v)).collect();
    let b = attnc::bind_dims(&c, &dims).expect("dims bind");
    let base = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 11).expect("inputs");
    // Four documents per row (whole key tiles empty), then one; then the four again (the
    // first table's data).
    let four = |x: usize| ((x % 200) / 50) as f64;
    let layouts: [&dyn Fn(usize) -> f64; 3] = [&four, &|_| 0.0, &four];
    let on: Vec<(&str, Box<dyn Compiled>)> = {
        let (oc, _) = attnc::optimize(&c, &PassConfig::all()).expect("passes");
        let mut v: Vec<(&str, Box<dyn Compiled>)> = Vec::new();
        v.push(("cpu", Box::new(CpuBackend::default().compile(&oc.kernel, &oc.info, &CpuOptions::default()).expect("cpu").checking(&c.kernel))));
        if WgslBackend.available().is_ok() {
            v.push(("wgsl", Box::new(WgslBackend.compile(&oc.kernel, &oc.info, &WgslOptions::default()).expect("wgsl").checking(&c.kernel))));
        }
        v
    };
    for (n, layout) in layouts.iter().enumerate() {
        let mut ins = base.clone();
        ins.get_mut("seg").expect("seg").data.iter_mut().enumerate().for_each(|(x, s)| *s = layout(x));
        let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
        for (name, k) in &on {
            let got = k.run(&ins, &BTreeMap::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
            compare(&format!("document_mask, layout {n}, on {name}"), &got, &want, Tweak::None, Tolerance::F32).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// `floor`, `ceil`, `round` (half to even, on exact halves), `cos`, `sin` and `int` (of
/// `log(0) = -inf`, saturated and then scaled and offset: it must not wrap on one backend
/// and not on another) in a bias, on the CPU (vector and scalar code) and WGSL (tiled and
/// rows).
#[test]
fn rounding_trigonometry_and_int_match_reference() {
    let src = "attention rounding {
      dims B, H, N, M, D
      input q: f32[B, H, N, D]
      input k: f32[B, H, M, D]
      input v: f32[B, H, M, D]
      input rel: f32[H, 64]
      output o: f32[B, H, N, D]
      let d = abs(p - j)
      score = dot(q[b, h, i, :], k[b, h, j, :]) / sqrt(D)
      bias = rel[h, clamp(int(log(float(d) / 8.0) * 4.0) + 3, 0, 63)] + 1e-8 * float(int(log(float(d))) * 100 + 5)
        + 0.25 * round(float(p - j) / 2.0) + 0.1 * floor(float(j) / 3.0 - 0.5) - 0.1 * ceil(float(p) / 4.0)
        + cos(0.3 * float(j)) * sin(0.7 * float(p))
      mask = j <= p
      normalize = softmax
      value = v[b, h, j, e]
    }";
    let c = attnc::dsl::compile(src).unwrap_or_else(|d| panic!("{}", d.render("rounding.attn", src)));
    let dims: BTreeMap<String, i64> = [("B", 1), ("H", 2), ("N", 37), ("M", 53), ("D", 16)].iter().map(|(x, v)| (x.to_string(), *v)).collect();
    let b = attnc::bind_dims(&c, &dims).expect("dims bind");
    let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 3).expect("inputs");
    let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
    let runners: Vec<Box<dyn Runner>> = vec![
        Box::new(cpu(CpuOptions::default())),
        Box::new(cpu_schedule(ScheduleOptions { tiled: false, ..Default::default() })),
        Box::new(On::all(WgslBackend, WgslOptions::default())),
        Box::new(On::all(WgslBackend, WgslOptions { schedule: ScheduleOptions { tiled: false, ..WgslOptions::default().schedule }, ..WgslOptions::default() })),
        Box::new(On::all(PtxSimBackend, PtxOptions::default())),
    ];
    for r in runners {
        if r.available().is_err() {
            continue;
        }
        let got = r.run(&c, &ins).unwrap_or_else(|e| panic!("{}: {e}", r.name()));
        compare(&format!("rounding on {}", r.name()), &got, &want, Tweak::None, r.tolerance()).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The tiled kernel takes every example whose score has a separable dot (all but GLA's
/// per-channel decay inside the sum), so the suite above tests it, not only the row kernel.
#[test]
fn tiled_kernel_covers_the_examples() {
    let cpu = CpuBackend::default();
    let mut row = Vec::new();
    for (name, c) in examples() {
        let s = cpu.plan(&c.kernel, &c.info, &CpuOptions::default()).expect("plans");
        if !matches!(s.algorithm, Algorithm::Tiled(_)) {
            row.push(name.clone());
        }
        // After the passes, the linear family runs chunked and everything else stays tiled.
        let (oc, _) = attnc::optimize(&c, &PassConfig::all()).expect("passes");
        let s = cpu.plan(&oc.kernel, &oc.info, &CpuOptions::default()).expect("plans");
        let linear = ["cosformer", "cosine", "gla", "linear_elu", "retnet"].contains(&name.as_str());
        assert_eq!(matches!(s.algorithm, Algorithm::Chunked(_)), linear, "{name}: {s}");
        assert_eq!(matches!(s.algorithm, Algorithm::Tiled(_)), !linear, "{name}: {s}");
    }
    assert_eq!(row, vec!["gla".to_string()], "examples on the row kernel");
}

/// FlashBias, approximate: an ALiBi-like dense bias (rank 2 per slice, plus 1e-5 noise) is
/// factored within a 1e-3 budget at rank ≤ 3, the factors become dot channels, and the CPU
/// output matches the exact reference; a full-rank bias with a tiny budget is refused.
#[test]
fn approximate_low_rank_bias_meets_its_budget() {
    let (_, c) = examples().into_iter().find(|(n, _)| n == "dense_bias").expect("dense_bias example");
    let p = PROFILES.iter().find(|p| p.name == "cross_gqa_b2").expect("profile");
    let mut ins = inputs_for(&c, p, 3).expect("inputs");
    let bias = ins.get_mut("bias").expect("bias input");
    let [_, nh, n, m]: [usize; 4] = bias.shape.clone().try_into().unwrap();
    for (x, v) in bias.data.iter_mut().enumerate() {
        let (j, i, h) = (x % m, (x / m) % n, (x / (m * n)) % nh);
        *v = -(0.1 * (h + 1) as f64) * (i as f64 - j as f64) + 1e-5 * *v;
    }
    let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
    let mut with_factors = ins.clone();
    let (ac, rep) = attnc::approximate_bias(&c, &mut with_factors, 1e-3).expect("within budget");
    assert!(rep.rank <= 3 && rep.max_error <= 1e-3, "{rep:?}");
    let (oc, log) = attnc::optimize(&ac, &PassConfig::all()).expect("passes");
    assert!(oc.kernel.branches[0].bias.is_none(), "factors absorbed into the dot: {log:?}");
    let got = cpu(CpuOptions::default()).run(&ac, &with_factors).expect("runs");
    compare("dense_bias (approximate low rank)", &got, &want, Tweak::None, Tolerance::F32).expect("matches the exact reference");
    // Full rank (random), a budget no rank up to 64 can meet at N = M = 70: refused.
    let p70 = PROFILES.iter().find(|p| p.name == "mqa_n70").expect("profile");
    let mut full = inputs_for(&c, p70, 3).expect("inputs");
    let err = attnc::approximate_bias(&c, &mut full, 1e-9).expect_err("refused");
    assert!(err.contains("needs a rank above 64"), "{err}");
    // A spec whose bias does not depend on both query and key has nothing to approximate.
    let (_, sdpa) = examples().into_iter().find(|(n, _)| n == "sdpa_causal").expect("sdpa_causal");
    let mut si = inputs_for(&sdpa, p, 3).expect("inputs");
    assert!(attnc::approximate_bias(&sdpa, &mut si, 1e-3).expect_err("nothing to approximate").contains("nothing to approximate"));
    // A table bias (Swin's rpb gathered per pair; random here, so far from low rank) is
    // evaluated per head on the live pairs and factored within a loose budget; the CPU then
    // runs the factored spec as the reference does.
    let (_, swin) = examples().into_iter().find(|(n, _)| n == "swin_window").expect("swin_window");
    let grid = PROFILES.iter().find(|p| p.name == "grid256").expect("profile");
    let ins = inputs_for(&swin, grid, 3).expect("inputs");
    let mut with_factors = ins.clone();
    let (ac, rep) = attnc::approximate_bias(&swin, &mut with_factors, 3.0).expect("within budget");
    assert!(rep.rank <= 64 && rep.max_error <= 3.0, "{rep:?}");
    assert_eq!(with_factors["__bias_u"].shape[..2], [1, 1], "one slice per head; H = 1 here, and rpb does not depend on b");
    let got = cpu(CpuOptions::default()).run(&ac, &with_factors).expect("runs");
    let want = attnc::ir::reference::run(&ac.kernel, &ac.info, &with_factors, &BTreeMap::new()).expect("reference of the factored spec");
    compare("swin_window (approximate low rank)", &got, &want, Tweak::None, Tolerance::F32).expect("the CPU runs the factored spec exactly");
}

/// A scaled-dot softmax spec with this bias and mask (integer arithmetic tests).
fn biased_softmax(name: &str, bias: &str, mask: &str) -> String {
    format!(
        "attention {name} {{
      dims B, H, N, M, D, Dv
      input q: f32[B, H, N, D]
      input k: f32[B, H, M, D]
      input v: f32[B, H, M, Dv]
      output o: f32[B, H, N, Dv]
      score = dot(q[b, h, i, :], k[b, h, j, :]) / sqrt(D)
      bias = {bias}
      mask = {mask}
      normalize = softmax
      value = v[b, h, j, e]
    }}"
    )
}

/// Integer floor division and modulo in masks and biases, on the tiled kernel's vector path:
/// negative numerators, divisors that are and are not powers of two, numerators near -2^23
/// where the f32 quotient estimate is one too low (`(j - 7340100) // 7` passes -7340025, whose
/// estimate needs the correction), and numerators beyond 2^23 (the scalar path).
#[test]
fn integer_division_on_lanes_matches_reference() {
    let src = biased_softmax(
        "intdiv",
        "float((j - 37) // 7 - (p - 37) // 7) * 0.1 + float((j - 41) % 5) * 0.05 + float((j * 4000000 - 9) // 3 % 11) * 0.02 + float((j - 60) % 16) * 0.01 + float((j - 7340100) // 7 + 1048586) * 0.03 + float((j - 7340100) % 7) * 0.04",
        "(j - 50) // 9 <= (p - 50) // 9",
    );
    let c = attnc::dsl::compile(&src).expect("spec compiles");
    for (n, m) in [(37, 37), (70, 130), (1, 300)] {
        let dims: BTreeMap<String, i64> = [("B", 1), ("H", 2), ("N", n), ("M", m), ("D", 8), ("Dv", 8)].iter().map(|(d, v)| (d.to_string(), *v)).collect();
        let b = attnc::bind_dims(&c, &dims).expect("dims bind");
        let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 7).expect("inputs");
        let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
        // Without passes the bias stays per pair (lowrank would fold its separable terms into
        // the dot, computed in the pack's scalar code).
        for (clif_opt, passes) in [(false, PassConfig::none()), (true, PassConfig::none()), (false, PassConfig::all())] {
            let on = On { passes, ..cpu(CpuOptions { clif_opt, ..CpuOptions::default() }) };
            let got = on.run(&c, &ins).expect("cpu runs");
            compare(&format!("intdiv N={n} M={m} {}", on.name()), &got, &want, Tweak::None, on.tolerance()).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Float functions on the CPU's vector paths, element by element: with one-hot values each
/// output is one `f(x)`, over [-12, 12] and near 0, within 1e-6 relative of the f64
/// reference. `f(dot)` runs in the tiled kernel's vector pass; `dot(f(q), k)` in a derived
/// tensor's vector loop (the linear form). `tanh` once lost 5e-5 near 0 to cancellation in
/// `1 − 2/(e^{2x} + 1)`, and `elu` 6e-4 in `exp(x) − 1`.
#[test]
fn float_functions_on_the_vector_paths_are_accurate_over_their_range() {
    let (n, m) = (512usize, 16usize);
    let q: Vec<f64> = (0..n).map(|i| if i < 32 { (i as f64 - 16.0) * 1e-4 } else { -12.0 + 24.0 * i as f64 / n as f64 } as f32 as f64).collect();
    for f in ["tanh", "elu"] {
        let one_hot: Vec<f64> = (0..m * m).map(|x| if x / m == x % m { 1.0 } else { 0.0 }).collect();
        // Tiled: D = 1, o[i, e] = f(q_i · k_e). Derived: D = M = 16 and one-hot keys,
        // o[i, e] = f(q[i, e]) (the derived tensor's rows are 16 long: the 4-lane loop).
        for (form, score, k, qshape, kshape) in [
            (
                "tiled pass",
                format!("{f}(dot(q[b, h, i, :], k[b, h, j, :]))"),
                (0..m).map(|j| (1.0 + 0.037 * j as f64) as f32 as f64).collect::<Vec<f64>>(),
                vec![1, 1, n, 1],
                vec![1, 1, m, 1],
            ),
            ("derived tensor", format!("dot({f}(q[b, h, i, :]), k[b, h, j, :])"), one_hot.clone(), vec![1, 1, n / m, m], vec![1, 1, m, m]),
        ] {
            let src = format!(
                "attention t {{\n  dims B, H, N, M, D, Dv\n  input q: f32[B, H, N, D]\n  input k: f32[B, H, M, D]\n  input v: f32[B, H, M, Dv]\n  output o: f32[B, H, N, Dv]\n  score = {score}\n  normalize = none\n  value = v[b, h, j, e]\n}}\n"
            );
            let c = attnc::dsl::compile(&src).expect("spec");
            let ins: BTreeMap<String, Tensor> = [("q", (q.clone(), qshape)), ("k", (k, kshape)), ("v", (one_hot.clone(), vec![1, 1, m, m]))]
                .into_iter()
                .map(|(name, (d, s))| (name.to_string(), Tensor::new(s, d)))
                .collect();
            let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
            let got = cpu(CpuOptions::default()).run(&c, &ins).expect("cpu");
            let mut worst = 0f64;
            for (g, w) in got.data.iter().zip(&want.data) {
                assert!((g - w).abs() <= 1e-6 * w.abs() + 1e-30, "{f} ({form}): {g} vs {w}");
                worst = worst.max((g - w).abs() / w.abs().max(1e-30));
            }
            eprintln!("{f} ({form}): max relative error {worst:.2e}");
        }
    }
}

/// A softmax with a post-map runs in two passes; the second rescales the first pass's kept
/// weights of full tiles (`keep_weights`) or computes the scores again. Both, with full and
/// partial tiles (a causal mask, tails), a post-map that is not 0 at 0, and large logits
/// rising along the keys (weights kept relative to an early maximum, then rescaled by a far
/// smaller factor).
#[test]
fn two_pass_softmax_keeps_or_recomputes_its_weights_alike() {
    let post = |mask: &str, post: &str| {
        format!(
            "attention post {{
          dims B, H, N, M, D, Dv
          input q: f32[B, H, N, D]
          input k: f32[B, H, M, D]
          input v: f32[B, H, M, Dv]
          output o: f32[B, H, N, Dv]
          score = dot(q[b, h, i, :], k[b, h, j, :]) / sqrt(D)
          {mask}
          normalize = softmax(post = {post})
          value = v[b, h, j, e]
        }}"
        )
    };
    let clipped = "clamp(1.003 * w - 0.003, 0.0, 1.0)";
    let specs = [post("", clipped), post("mask = j <= p", clipped), post("mask = j <= p", "w * w + 0.01")];
    for src in &specs {
        let c = attnc::dsl::compile(src).expect("spec compiles");
        for (n, m, scale) in [(37, 37, 1.0), (70, 130, 1.0), (1, 300, 1.0), (64, 256, 40.0)] {
            let dims: BTreeMap<String, i64> = [("B", 1), ("H", 2), ("N", n), ("M", m), ("D", 8), ("Dv", 8)].iter().map(|(d, v)| (d.to_string(), *v)).collect();
            let b = attnc::bind_dims(&c, &dims).expect("dims bind");
            let mut ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 9).expect("inputs");
            // Large logits, rising along the keys: each tile's maximum exceeds the last.
            let q = ins.get_mut("q").expect("q");
            q.data.iter_mut().for_each(|x| *x *= scale);
            if scale > 1.0 {
                let k = ins.get_mut("k").expect("k");
                let d = 8;
                for (n, x) in k.data.iter_mut().enumerate() {
                    *x += (n / d % m as usize) as f64 * 0.01;
                }
            }
            let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
            for keep_weights in [true, false] {
                for (bq, bk) in [(64, 64), (16, 32)] {
                    let o = CpuOptions { keep_weights, ..CpuOptions::with_schedule(ScheduleOptions { block_q: bq, block_k: bk, ..Default::default() }) };
                    let on = cpu(o);
                    let got = on.run(&c, &ins).expect("cpu runs");
                    let label = format!("two-pass N={n} M={m} scale={scale} keep={keep_weights} {bq}x{bk}: {src}");
                    compare(&label, &got, &want, Tweak::None, on.tolerance()).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
}

/// Sparse rows of tiles: live key tiles separated by runs of empty ones (eight or more, fewer,
/// at the row's end), which the tiled kernel skips eight class bytes at a time; and values
/// read in place (`v[b, hk, j, e]`) against values the pack must compute (`2 · v`).
#[test]
fn sparse_tile_rows_and_values_in_place_match_reference() {
    let spec = |value: &str| {
        format!(
            "attention sparse_rows {{
  dims B, H, G, N, M, D, Dv
  input q: f32[B, H, N, D]
  input k: f32[B, G, M, D]
  input v: f32[B, G, M, Dv]
  output o: f32[B, H, N, Dv]
  let hk = h // (H // G)
  score = dot(q[b, h, i, :], k[b, hk, j, :]) / sqrt(D)
  mask = (j // 16) % 11 == (p // 16) % 3 || j == p || j >= M - 5
  normalize = softmax
  value = {value}
}}"
        )
    };
    for value in ["v[b, hk, j, e]", "2.0 * v[b, hk, j, e]"] {
        let src = spec(value);
        let c = attnc::dsl::compile(&src).unwrap_or_else(|d| panic!("{}", d.render("sparse_rows.attn", &src)));
        for (n, m) in [(403, 403), (37, 421)] {
            let dims: BTreeMap<String, i64> =
                [("B", 1), ("H", 2), ("G", 1), ("N", n), ("M", m), ("D", 8), ("Dv", 12)].iter().map(|(x, v)| (x.to_string(), *v)).collect();
            let b = attnc::bind_dims(&c, &dims).expect("dims bind");
            let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 11).expect("inputs");
            let want = attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()).expect("reference");
            for microkernel in [true, false] {
                let o = CpuOptions { microkernel, ..CpuOptions::with_schedule(ScheduleOptions { block_q: 16, block_k: 16, ..Default::default() }) };
                let k = CpuBackend::default().compile(&c.kernel, &c.info, &o).expect("compiles").checking(&c.kernel);
                let got = k.run(&ins, &BTreeMap::new()).expect("runs");
                compare(&format!("{value}, N={n} M={m}, microkernel {microkernel}"), &got, &want, Tweak::None, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}
