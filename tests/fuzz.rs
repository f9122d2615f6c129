//! Fuzz targets, run for a fixed budget in CI (proptest with a fixed seed, so a run is
//! reproducible; `ATTNC_FUZZ_CASES` scales the budget, `ATTNC_FUZZ_SEED` picks another seed,
//! and proptest shrinks a failure to a small case):
//!
//! 1. `checker_never_fails_badly`: random mutations of every example spec (literals,
//!    operators and names replaced, tokens deleted or repeated) through parse and check:
//!    `Ok`, or a diagnostic with a user-facing code; never a panic, a stack overflow or an
//!    internal error.
//! 2. `cpu_agrees_with_the_reference`: mutated specs that check, on tiny random shapes and
//!    inputs (with NaN, infinities, large logits, out-of-range integers), on the CPU backend
//!    with random options, against the f64 reference: the CPU refuses exactly when the
//!    reference refuses, else its output is within tolerance (with large logits, where f32
//!    and f64 legitimately part, refusals only). A case whose own answer moves
//!    beyond the tolerance when the inputs move by 1e-6 (a problem f32 cannot solve better
//!    than its conditioning) is compared for refusals only.

use attnc::ir::reference::Tensor;
use attnc::passes::PassConfig;
use attnc_codegen::cpu::{CpuBackend, CpuOptions};
use attnc_codegen::schedule::ScheduleOptions;
use attnc_codegen::{Backend, Compiled, Tolerance};
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::collections::BTreeMap;
mod common;
use common::example_sources as examples;

fn config(default_cases: u32) -> Config {
    Config { failure_persistence: None, ..common::proptest_config(default_cases) }
}

/// Tokens of a spec: names, numbers, operators, punctuation, blanks and comments, so that
/// concatenating them gives the text back.
fn tokens(src: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let cs: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        let start = i;
        if c.is_alphanumeric() || c == '_' || (c == '.' && i + 1 < cs.len() && cs[i + 1].is_ascii_digit()) {
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_' || cs[i] == '.') {
                // `0..1`: a range, not a float.
                if cs[i] == '.' && i + 1 < cs.len() && cs[i + 1] == '.' {
                    break;
                }
                i += 1;
            }
        } else if c == '#' {
            while i < cs.len() && cs[i] != '\n' {
                i += 1;
            }
        } else if "<>=!&|/*.".contains(c) && i + 1 < cs.len() && "=&|/*.".contains(cs[i + 1]) {
            i += 2;
        } else {
            i += 1;
        }
        out.push(cs[start..i].iter().collect());
    }
    out
}

const INTS: [&str; 10] = ["0", "1", "2", "3", "-1", "-3", "5", "7", "100", "1000"];
const FLOATS: [&str; 7] = ["0.0", "1.0", "0.5", "2.0", "-1.0", "0.25", "3.0"];
const OPS: [&str; 13] = ["+", "-", "*", "/", "//", "%", "<", "<=", "==", "!=", "&&", "||", ">"];
const NAMES: [&str; 12] = ["b", "h", "i", "j", "p", "e", "N", "M", "D", "hk", "q", "k"];

/// Applies one mutation `(kind, at, pick)` to the token list.
fn mutate(toks: &mut Vec<String>, (kind, at, pick): (u8, usize, usize)) {
    let real: Vec<usize> = (0..toks.len()).filter(|&n| !toks[n].trim().is_empty() && !toks[n].starts_with('#')).collect();
    if real.is_empty() {
        return;
    }
    let n = real[at % real.len()];
    let t = toks[n].clone();
    let is_int = t.chars().all(|c| c.is_ascii_digit());
    let is_float = !is_int && t.parse::<f64>().is_ok();
    match kind % 5 {
        0 if is_int => toks[n] = INTS[pick % INTS.len()].into(),
        0 if is_float => toks[n] = FLOATS[pick % FLOATS.len()].into(),
        0 | 1 if OPS.contains(&t.as_str()) => toks[n] = OPS[pick % OPS.len()].into(),
        1 | 2 if t.chars().next().is_some_and(|c| c.is_alphabetic()) => toks[n] = NAMES[pick % NAMES.len()].into(),
        3 => {
            toks.remove(n);
        }
        _ => toks.insert(n, t),
    }
}

fn mutated(src: &str, muts: &[(u8, usize, usize)]) -> String {
    let mut toks = tokens(src);
    for m in muts {
        mutate(&mut toks, *m);
    }
    toks.concat()
}

/// The spec with every float literal moved by the factor `1 + rel` (what f32 does to the
/// constants it rounds): a result that moves with it is ill-conditioned in the spec itself
/// (`cos` at an odd multiple of π/2), which moving the inputs does not show.
fn literals_moved(src: &str, rel: f64) -> String {
    tokens(src)
        .into_iter()
        .map(|t| {
            let float = t.starts_with(|c: char| c.is_ascii_digit() || c == '.') && !t.chars().all(|c| c.is_ascii_digit());
            match t.parse::<f64>() {
                Ok(x) if float => {
                    let m = (x * (1.0 + rel)).to_string();
                    if m.contains('.') {
                        m
                    } else {
                        format!("{m}.0")
                    }
                }
                _ => t,
            }
        })
        .collect()
}

fn mutations() -> impl Strategy<Value = Vec<(u8, usize, usize)>> {
    prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..4)
}

#[test]
fn tokens_give_the_text_back() {
    for src in examples() {
        assert_eq!(tokens(&src).concat(), src);
    }
}

#[test]
fn literals_move_and_still_check() {
    let mut moved = 0;
    for src in examples() {
        assert_eq!(literals_moved(&src, 0.0), src, "moving by nothing gives the text back");
        let m = literals_moved(&src, 1e-6);
        attnc::dsl::compile(&m).unwrap_or_else(|d| panic!("{}", d.render("moved.attn", &m)));
        moved += (m != src) as usize;
    }
    assert!(moved >= 5, "{moved} examples have float literals");
}

proptest! {
    #![proptest_config(config(6000))]

    #[test]
    fn checker_never_fails_badly(which in any::<usize>(), muts in mutations()) {
        let ex = examples();
        let src = mutated(&ex[which % ex.len()], &muts);
        if let Err(d) = attnc::dsl::compile(&src) {
            prop_assert_ne!(d.code, "E0999", "internal error on:\n{}\n{}", src, d.render("fuzz.attn", &src));
            // The rendering path works for every diagnostic (spans inside the text).
            let _ = d.render("fuzz.attn", &src);
        }
    }
}

/// Tiny dims for whichever of these a spec has.
fn tiny_dims(c: &attnc::dsl::Checked, pick: &[i64; 5]) -> BTreeMap<String, i64> {
    let (n, m, d, h) = (pick[0], pick[1], pick[2], pick[3]);
    let vals: [(&str, i64); 8] = [("B", 1 + pick[4] % 2), ("H", 2 * h), ("G", h), ("N", n), ("M", m), ("D", d), ("Dv", d + 1), ("K", 2)];
    vals.iter().filter(|(x, _)| c.info.free_dims.iter().any(|f| f == x)).map(|(x, v)| (x.to_string(), *v)).collect()
}

/// What a run gives: the output, or a refusal.
fn outcome<E: std::fmt::Display>(r: Result<Tensor, E>) -> Result<Tensor, String> {
    r.map_err(|e| e.to_string())
}

#[test]
fn cpu_agrees_with_the_reference() {
    let strategy = (
        any::<usize>(),
        // Replacements only (literals, operators, names): more of them still check.
        prop::collection::vec((0u8..3, any::<usize>(), any::<usize>()), 0..3),
        (1i64..10, 1i64..10, 1i64..9, 1i64..3, 0i64..2),
        any::<u64>(),
        (any::<bool>(), any::<bool>(), 0usize..3, 0usize..2, 0usize..3, any::<bool>(), any::<bool>()),
        0u8..6,
    );
    let mut runner = proptest::test_runner::TestRunner::new(config(1500));
    let result = runner.run(&strategy, |(which, muts, pick, seed, opts, tweak)| {
        let ex = examples();
        let src = mutated(&ex[which % ex.len()], &muts);
        let Ok(c) = attnc::dsl::compile(&src) else {
            STATS[3].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        };
        let dims = tiny_dims(&c, &[pick.0, pick.1, pick.2, pick.3, pick.4]);
        let Ok(b) = attnc::bind_dims(&c, &dims) else {
            STATS[4].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        };
        // Tiny problems only (a mutated constant can make a tensor or a reduction large).
        let elems = |t: &attnc::ir::TensorDecl| b.shape(t).iter().product::<usize>();
        if c.kernel.tensors.iter().any(|t| elems(t) > 1 << 14) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let Ok(mut ins) = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, seed) else { return Ok(()) };
        // Awkward values where the reference and the kernels must agree: in q (a NaN, an
        // infinity, logits of ~1e3) unless the values read q; an out-of-range integer; a
        // NaN or an infinity among the values (a masked key's must reach no row the
        // reference keeps it from).
        let value_reads_q = c.kernel.value.loads().contains("q");
        match tweak {
            1..=3 if !value_reads_q => {
                if let Some(q) = ins.get_mut("q") {
                    let n = q.data.len();
                    match tweak {
                        1 => q.data[(seed as usize) % n] = f64::NAN,
                        2 => q.data[(seed as usize) % n] = f64::INFINITY,
                        _ => q.data.iter_mut().for_each(|x| *x = ((*x * 300.0) as f32) as f64),
                    }
                }
            }
            5 => {
                let loads = c.kernel.value.loads();
                if let Some(t) = c.kernel.inputs().find(|t| !t.dtype.is_int() && loads.contains(t.name.as_str())) {
                    let x = ins.get_mut(&t.name).expect("input");
                    let n = x.data.len();
                    x.data[(seed as usize) % n] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][(seed / 7 % 3) as usize];
                }
            }
            4 => {
                if let Some(t) = c.kernel.inputs().find(|t| t.dtype.is_int()) {
                    let x = ins.get_mut(&t.name).expect("input");
                    let n = x.data.len();
                    x.data[(seed as usize) % n] = if seed % 2 == 0 { 1000.0 } else { -1.0 };
                }
            }
            _ => {}
        }
        let (tiled, microkernel, bq, bk, chunk, clif_opt, passes) = opts;
        let schedule = ScheduleOptions { tiled, block_q: [16, 32, 64][bq], block_k: [16, 32][bk], chunk: [0, 16, 64][chunk], permute: true };
        let o = CpuOptions { schedule, microkernel, clif_opt, ..CpuOptions::default() };
        let cfg = if passes { PassConfig::all() } else { PassConfig::none() };
        let want = outcome(attnc::ir::reference::run(&c.kernel, &c.info, &ins, &BTreeMap::new()));
        let got = (|| -> Result<Tensor, String> {
            let (oc, _, _) = attnc::optimize_for(&c, &cfg, &ins, &BTreeMap::new()).map_err(|e| e.to_string())?;
            let k = CpuBackend::default().compile(&oc.kernel, &oc.info, &o).map_err(|e| e.to_string())?.checking(&c.kernel);
            outcome(k.run(&ins, &BTreeMap::new()))
        })();
        if started.elapsed().as_secs_f64() > 2.0 {
            eprintln!("slow case ({:.1} s):\n{src}", started.elapsed().as_secs_f64());
        }
        STATS[match (&want, &got) {
            (Ok(_), Ok(_)) => 0,
            (Err(_), Err(_)) => 1,
            _ => 2,
        }]
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match (&want, &got) {
            (Err(_), Err(_)) => {}
            (Ok(_), Err(e)) => prop_assert!(false, "the CPU refused what the reference runs: {e}\n{src}"),
            (Err(e), Ok(_)) => prop_assert!(false, "the CPU ran what the reference refuses ({e}): a silently different answer\n{src}"),
            // Logits of ~1e3: f32 loses what f64 keeps (cancellation in `elu(x) + 1` at
            // x = -300, `relu(s)²` past the f32 range); conformance's large-logit profile
            // covers them with its tolerance. Here they are checked for refusals and panics.
            (Ok(_), Ok(_)) if tweak == 3 => {}
            (Ok(w), Ok(g)) => {
                // An infinity among the values: where the reference's output is infinite, a
                // weight that is tiny in f64 may be 0 in f32, and 0 · inf is NaN (GPSA's
                // positional softmax). Non-finite either way; a NaN or an infinity where the
                // reference is finite still fails.
                let accepted;
                let g = if tweak == 5 {
                    let data = g.data.iter().zip(&w.data).map(|(&x, &y)| if x.is_nan() && y.is_infinite() { y } else { x }).collect();
                    accepted = Tensor::new(g.shape.clone(), data);
                    &accepted
                } else {
                    g
                };
                let tol = Tolerance { atol: 1e-3, rtol: 1e-2 };
                if tol.check(&g.data, &w.data).is_err() {
                    // Ill-conditioned? The reference on inputs moved by 1e-6.
                    let mut moved = ins.clone();
                    for (name, t) in moved.iter_mut() {
                        if !c.kernel.tensor(name).is_some_and(|d| d.dtype.is_int()) {
                            t.data.iter_mut().enumerate().for_each(|(n, x)| *x *= 1.0 + 1e-6 * if n % 2 == 0 { 1.0 } else { -1.0 });
                        }
                    }
                    let w2 = attnc::ir::reference::run(&c.kernel, &c.info, &moved, &BTreeMap::new()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    // Or the spec's own constants moved by 1e-6 (a spec that no longer checks
                    // leaves the question to the inputs). A literal in an exact comparison
                    // (`float(x) == 2.0 ** t`) moves the result too, so a disagreement on such
                    // a spec passes as ill-conditioned: a blind spot, taken for the noise of
                    // f32-limited specs this removes.
                    let w3 = attnc::dsl::compile(&literals_moved(&src, 1e-6))
                        .ok()
                        .and_then(|c3| attnc::ir::reference::run(&c3.kernel, &c3.info, &ins, &BTreeMap::new()).ok());
                    // An output near f32's largest (1e30 and up) had intermediates past it; so
                    // had a row whose scores reach it (its log-sum-exp, the saved statistic).
                    let big = |t: &Tensor| t.data.iter().any(|x| x.is_finite() && x.abs() >= 1e30);
                    let in_f32_range = !big(w) && !attnc::ir::reference::run_with_stats(&c.kernel, &b, &ins).is_ok_and(|(_, stats)| big(&stats));
                    if tol.check(&w2.data, &w.data).is_ok() && w3.is_none_or(|w3| tol.check(&w3.data, &w.data).is_ok()) && in_f32_range {
                        let (n, gv, wv) = tol.check(&g.data, &w.data).unwrap_err();
                        prop_assert!(false, "element {n}: CPU {gv}, reference {wv} ({o:?})\n{src}");
                    }
                }
            }
        }
        Ok(())
    });
    let n = |i: usize| STATS[i].load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("cpu vs reference: {} ran on both, {} refused by both, {} did not check, {} did not bind at a tiny shape", n(0), n(1), n(3), n(4));
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Cases by what happened: both ran, both refused, disagreed, did not check, did not bind.
static STATS: [std::sync::atomic::AtomicUsize; 5] = [const { std::sync::atomic::AtomicUsize::new(0) }; 5];
