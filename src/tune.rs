//! `attnc tune` and the use of tuned winners by `run`, `bench` and the Python package.

use crate::dsl::Checked;
use crate::ir::reference::Tensor;
use crate::ir::Bindings;
use anyhow::{anyhow, Result};
use attnc_autotune::cache::{CacheEntry, TrialRecord, TuneCache, CACHE_VERSION};
use attnc_autotune::space::{prune, Candidate, OptionsOf, SearchSpace};
use attnc_autotune::tuner::{self, Outcome, Protocol};
use attnc_autotune::TuneKey;
use attnc_codegen::host::Storage;
use attnc_codegen::{Backend, Compiled};
use attnc_passes::tiles::DataOracle;
use attnc_passes::PassConfig;
use std::collections::BTreeMap;
use std::path::Path;

fn oracle<'a>(c: &Checked, inputs: &'a BTreeMap<String, Tensor>) -> DataOracle<'a> {
    DataOracle::new(
        inputs.iter().map(|(n, t)| (n.clone(), (t.shape.as_slice(), t.data.as_slice(), c.kernel.tensor(n).is_some_and(|d| d.dtype.is_int())))).collect(),
        1 << 14,
    )
}

/// Every candidate (for the key's checksum) and the cost model's order.
fn candidates<S: SearchSpace>(space: &S, c: &Checked, dims: &Bindings, inputs: &BTreeMap<String, Tensor>) -> Vec<Candidate<OptionsOf<S>>> {
    space.candidates(&c.kernel, dims, &oracle(c, inputs))
}

/// The cache key: over the names of the whole candidate set (not only those measured).
fn key<S: SearchSpace>(space: &S, c: &Checked, dims: &Bindings) -> TuneKey {
    TuneKey::new(space.backend(), &c.kernel, dims, &space.names(&c.kernel))
}

/// What `run` and `bench` compile: the options, the passes to switch off on top of the
/// caller's configuration (a tuned winner may run the spec without `lowrank`), and where the
/// choice came from.
pub struct Chosen<O> {
    pub options: O,
    pub passes_off: Vec<String>,
    pub from: String,
}

impl<O> Chosen<O> {
    /// The kernel to compile: `oc` (the spec optimized under `cfg`), or, when the winner
    /// switches passes off, `spec` optimized without them.
    pub fn kernel(&self, spec: &Checked, cfg: &PassConfig, oc: &Checked) -> Result<Checked> {
        if self.passes_off.is_empty() {
            return Ok(oc.clone());
        }
        let mut cfg = cfg.clone();
        for p in &self.passes_off {
            cfg.set(p, false).map_err(|e| anyhow!("cached winner: {e}"))?;
        }
        Ok(crate::optimize(spec, &cfg).map_err(|e| anyhow!("{e}"))?.0)
    }
}

/// The options `run` and `bench` use: the cached winner for this spec (as optimized, `c`),
/// shape bucket and device when there is one, else the cost model's first choice.
pub fn chosen_options<S: SearchSpace>(space: &S, c: &Checked, dims: &Bindings, inputs: &BTreeMap<String, Tensor>) -> Chosen<OptionsOf<S>> {
    let t = std::time::Instant::now();
    match TuneCache::open_default().get::<OptionsOf<S>>(&key(space, c, dims)) {
        Ok(Some(e)) if space.backend().check_options(&e.options).is_err() => {
            let why = space.backend().check_options(&e.options).unwrap_err();
            eprintln!("warning: ignoring the tuned winner `{}` in the cache: {why}", e.winner);
        }
        Ok(Some(e)) => {
            let off = if e.passes_off.is_empty() { String::new() } else { format!("; without {}", e.passes_off.join(", ")) };
            let from = format!("tuned ({}{off}; cache read in {:.2} ms)", e.winner, t.elapsed().as_secs_f64() * 1e3);
            return Chosen { options: space.adjust(e.options), passes_off: e.passes_off, from };
        }
        Ok(None) => {}
        Err(warning) => eprintln!("warning: {warning}"),
    }
    let (options, from) = first_choice(space, &candidates(space, c, dims, inputs));
    Chosen { options, passes_off: vec![], from }
}

/// The cost model's first choice without inputs (data-dependent masks count as partial).
pub fn cost_model_options<S: SearchSpace>(space: &S, c: &Checked, dims: &Bindings) -> (OptionsOf<S>, String) {
    first_choice(space, &space.candidates(&c.kernel, dims, &attnc_passes::interval::NoData))
}

/// The cheapest candidate by the cost model (the list is sorted), and where it came from.
fn first_choice<S: SearchSpace>(space: &S, all: &[Candidate<OptionsOf<S>>]) -> (OptionsOf<S>, String) {
    match all.first() {
        Some(best) => (best.options.clone(), format!("cost model ({}; not tuned: `attnc tune` measures)", best.name)),
        None => (space.default_options(), "default".into()),
    }
}

/// Dims for the correctness gate: the query and key lengths cut to at most 70, so the
/// reference is quick; the other dims as given.
fn small_dims(c: &Checked, given: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let mut d = given.clone();
    for e in [&c.kernel.iter.i, &c.kernel.iter.j] {
        if let crate::ir::Extent::Dim(name) = e {
            if let Some(v) = d.get_mut(name) {
                *v = (*v).min(70);
            }
        }
    }
    d
}

/// The gate: `got` within the backend's tolerance of the reference.
fn within_tolerance(tol: attnc_codegen::Tolerance, got: &[f32], want: &[f64]) -> Result<(), String> {
    let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    tol.check(&got, want).map_err(|(n, g, w)| format!("element {n} is {g}, the reference {w}"))
}

pub struct TuneArgs<'a> {
    /// The spec as written and the pass configuration `c` was optimized under (for the
    /// candidates without the low-rank bias).
    pub spec: &'a Checked,
    pub passes: &'a PassConfig,
    pub given: &'a BTreeMap<String, i64>,
    pub top_k: usize,
    pub samples: usize,
    pub report: Option<&'a Path>,
    pub seed: u64,
}

pub fn tune<S: SearchSpace>(space: &S, c: &Checked, a: TuneArgs) -> Result<String> {
    use std::fmt::Write;
    let mut text = String::new();
    let backend = space.backend();
    let dims = crate::bind_dims(c, a.given).map_err(|e| anyhow!(e))?;
    let inputs = crate::inputs::random_inputs(&c.kernel, &dims, &c.ranges, a.seed).map_err(|e| anyhow!(e))?;
    let all = candidates(space, c, &dims, &inputs);
    // The untuned configuration: the default options on the spec as optimized (a
    // `lowrank-off` candidate can carry the same options and is not it).
    let default = space.default_options();
    let is_default = |x: &Candidate<OptionsOf<S>>| x.options == default && x.passes_off.is_empty();
    let mut pruned = prune(all.clone(), a.top_k);
    // Variants of the best the cost model cannot rank (the backend's twins).
    let twins = space.twins(&pruned);
    // The spec without the exact low-rank bias, when that pass rewrote it: its best two.
    let without_lowrank = if a.passes.enabled("lowrank") {
        let mut cfg = a.passes.clone();
        cfg.set("lowrank", false).map_err(|e| anyhow!(e))?;
        let (off, _) = crate::optimize(a.spec, &cfg).map_err(|e| anyhow!("{e}"))?;
        (off.kernel != c.kernel).then_some(off)
    } else {
        None
    };
    if let Some(off) = &without_lowrank {
        let off_dims = crate::bind_dims(off, a.given).map_err(|e| anyhow!(e))?;
        pruned.extend(attnc_autotune::space::lowrank_off(&candidates(space, off, &off_dims, &inputs), 2));
    }
    pruned.extend(twins);
    // The default configuration is always measured too, as the baseline: a winner is then
    // never slower than what an untuned run would use, whatever the cost model ranked.
    if let Some(d) = all.iter().find(|x| is_default(x)) {
        if !pruned.iter().any(is_default) {
            pruned.push(d.clone());
        }
    }
    let work = crate::bench::useful_work(c, &dims, &inputs).map_err(|e| anyhow!(e))?;
    // The gate: a small input and its reference output, computed once.
    let small_given = small_dims(c, a.given);
    let small = crate::bind_dims(c, &small_given).map_err(|e| anyhow!("the correctness gate's small shape does not bind: {e}"))?;
    let small_inputs = crate::inputs::random_inputs(&c.kernel, &small, &c.ranges, a.seed + 1).map_err(|e| anyhow!(e))?;
    let want = crate::ir::reference::run(&c.kernel, &c.info, &small_inputs, &BTreeMap::new())?;
    // The kernel a candidate runs, with its storage for the small and the full inputs.
    let kernels: Vec<(&Checked, Storage, Storage)> = std::iter::once(c)
        .chain(without_lowrank.as_ref())
        .map(|k| (k, Storage::from_f64(&k.kernel, &small_inputs), Storage::from_f64(&k.kernel, &inputs)))
        .collect();
    let last = kernels.len() - 1;
    let pick = move |cand: &Candidate<OptionsOf<S>>| if cand.passes_off.is_empty() { 0 } else { last };
    let bar = indicatif::ProgressBar::new(pruned.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("tuning {bar:30} {pos}/{len} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let t0 = std::time::Instant::now();
    let mut gate = |cand: &Candidate<OptionsOf<S>>| -> Result<(), String> {
        bar.set_message(format!("checking {}", cand.name));
        let (kc, small_storage, _) = &kernels[pick(cand)];
        let k = backend.compile(&kc.kernel, &kc.info, &cand.options).map_err(|e| e.to_string())?.checking(&a.spec.kernel);
        let (_, got) = k.run_storage(small_storage, &BTreeMap::new()).map_err(|e| e.to_string())?;
        within_tolerance(backend.tolerance(), &got, &want.data)
    };
    let mut build = |cand: &Candidate<OptionsOf<S>>| -> Result<tuner::Run, String> {
        bar.set_message(format!("timing {}", cand.name));
        let (kc, _, storage) = &kernels[pick(cand)];
        let k = backend.compile(&kc.kernel, &kc.info, &cand.options).map_err(|e| e.to_string())?.checking(&a.spec.kernel);
        let st = storage.clone();
        Ok(Box::new(move || k.run_storage(&st, &BTreeMap::new()).map(|_| ()).map_err(|e| e.to_string())))
    };
    let protocol = Protocol { samples: a.samples.max(1), ..Protocol::default() };
    let default_name = all.iter().find(|x| is_default(x)).map(|x| x.name.clone());
    let trials = tuner::tune(&pruned, protocol, default_name.as_deref(), &mut gate, &mut build, &mut |t| {
        if !matches!(t.outcome, Outcome::Disqualified(_)) {
            bar.inc(1);
        }
    });
    bar.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    let Some(win) = tuner::winner(&trials) else {
        return Err(anyhow!("no candidate passed the correctness gate and ran; see the table"));
    };
    let default_best = trials.iter().find_map(|t| match t.outcome.best() {
        Some(best) if is_default(&t.candidate) => Some((best, t.candidate.name.clone())),
        _ => None,
    });
    let records: Vec<TrialRecord<OptionsOf<S>>> = trials.iter().map(TrialRecord::from_trial).collect();
    writeln!(text, "{}  {}  ({} of {} candidates after pruning; {:.1} s)", c.kernel.name, given_text(a.given), pruned.len(), all.len(), elapsed).unwrap();
    writeln!(text, "  {:<26} {:>12} {:>11} {:>9} {:>9}  status", "candidate", "predicted ms", "median ms", "best ms", "GFLOP/s").unwrap();
    for r in &records {
        let (med, best, gf) = match (r.median_s, r.best_s) {
            (Some(m), Some(b)) => (format!("{:.3}", m * 1e3), format!("{:.3}", b * 1e3), format!("{:.1}", work.flops / b / 1e9)),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let mark = if r.name == win.candidate.name { "*" } else { " " };
        writeln!(text, "{mark} {:<26} {:>12.3} {:>11} {:>9} {:>9}  {}", r.name, r.predicted_s * 1e3, med, best, gf, r.status).unwrap();
    }
    if let (Some((d, name)), Some(best)) = (default_best, win.outcome.best()) {
        writeln!(text, "  winner {} is {:.2}x the default ({name}), best samples", win.candidate.name, d / best).unwrap();
    }
    let k = key(space, c, &dims);
    let entry = CacheEntry {
        version: CACHE_VERSION,
        key: format!("{k:?}"),
        winner: win.candidate.name.clone(),
        options: win.candidate.options.clone(),
        passes_off: win.candidate.passes_off.clone(),
        trials: records.clone(),
    };
    let cache = TuneCache::open_default();
    let path = cache
        .put(&k, &entry)
        .map_err(|e| anyhow!("cannot write the tuning cache in {}: {e} (set ATTNC_CACHE_DIR to a writable directory)", cache.dir.display()))?;
    writeln!(text, "  cached in {}", path.display()).unwrap();
    if let Some(dir) = a.report {
        attnc_autotune::report::write(dir, &format!("{} {}", c.kernel.name, given_text(a.given)), &records).map_err(|e| anyhow!("report: {e}"))?;
        writeln!(text, "  report written to {}/tune.{{csv,json,svg}}", dir.display()).unwrap();
    }
    Ok(text)
}

fn given_text(given: &BTreeMap<String, i64>) -> String {
    given.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A winner cached without `lowrank` compiles the spec optimized without it: ALiBi keeps
    /// its per-pair bias instead of the two extra dot channels.
    #[test]
    fn a_winner_without_lowrank_gets_the_kernel_without_it() {
        let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/alibi.attn")).expect("example");
        let spec = crate::dsl::compile(&src).expect("compiles");
        let cfg = PassConfig::all();
        let (oc, _) = crate::optimize(&spec, &cfg).expect("optimizes");
        assert!(oc.kernel.branches[0].bias.is_none(), "lowrank folds ALiBi into the dot");
        let chosen = |off: &[&str]| Chosen { options: (), passes_off: off.iter().map(|s| s.to_string()).collect(), from: String::new() };
        assert_eq!(chosen(&[]).kernel(&spec, &cfg, &oc).expect("kernel").kernel, oc.kernel);
        let k = chosen(&["lowrank"]).kernel(&spec, &cfg, &oc).expect("kernel");
        assert!(k.kernel.branches[0].bias.is_some(), "the bias stays per pair");
        assert!(chosen(&["no-such-pass"]).kernel(&spec, &cfg, &oc).is_err());
    }
}
