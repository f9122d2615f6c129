//! The measurement protocol.
//!
//! For each candidate, in the cost model's order: (1) build it; a build failure is a value,
//! not a panic; (2) run it once on a small input and compare with the reference: a
//! mismatch disqualifies it, it is never timed or chosen; (3) warm up, then take samples
//! and report the median; a candidate whose sample is more than `stop_factor` times the
//! best median so far is stopped early. A single surviving candidate is not timed at all.
//! (4) The `finalists` fastest (and the baseline, when named) are built again and timed in
//! alternation, one sample of each
//! per round, and their medians from those rounds decide: on a shared machine the speed
//! drifts over seconds (1.5× within a minute has been seen), and candidates timed one
//! after the other would be compared across that drift.
//!
//! The winner has the fastest *best* sample: interference from other work on the machine
//! only ever adds time, so the minimum is the estimate least disturbed by it (the median
//! is reported beside it).

use crate::space::Candidate;
use std::time::Instant;

/// What happened to one candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Median and all samples, in seconds.
    Timed { median: f64, samples: Vec<f64> },
    /// The small-input run differed from the reference (or failed).
    Disqualified(String),
    /// It could not be built or run.
    Failed(String),
    /// Stopped early: a sample took this long, over `stop_factor` × the best.
    Stopped(f64),
    /// The only candidate left: chosen without timing.
    Untimed,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Trial<O> {
    pub candidate: Candidate<O>,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug)]
pub struct Protocol {
    pub warmup: usize,
    pub samples: usize,
    pub stop_factor: f64,
    /// How many of the fastest are timed again in alternation (fewer than 2: none).
    pub finalists: usize,
    /// A candidate whose samples have taken `budget_s` seconds stops after `min_samples`
    /// (a spec at 0.5 s a run is then tuned in under a minute).
    pub min_samples: usize,
    pub budget_s: f64,
}

impl Default for Protocol {
    fn default() -> Self {
        Protocol { warmup: 1, samples: 5, stop_factor: 3.0, finalists: 3, min_samples: 3, budget_s: 1.0 }
    }
}

/// A built candidate: one call runs it on the full input.
pub type Run = Box<dyn FnMut() -> Result<(), String>>;

/// Runs the protocol. `gate` checks a candidate on the small input against the reference;
/// `build` prepares it for timing on the full input; `progress` sees each finished trial.
pub fn tune<O: Clone>(
    candidates: &[Candidate<O>],
    p: Protocol,
    baseline: Option<&str>,
    gate: &mut dyn FnMut(&Candidate<O>) -> Result<(), String>,
    build: &mut dyn FnMut(&Candidate<O>) -> Result<Run, String>,
    progress: &mut dyn FnMut(&Trial<O>),
) -> Vec<Trial<O>> {
    let mut trials = Vec::new();
    let mut best = f64::INFINITY;
    // Correctness first, for every candidate, so the count of survivors is known.
    let mut ok = Vec::new();
    for c in candidates {
        match gate(c) {
            Ok(()) => ok.push(c.clone()),
            Err(why) => {
                let t = Trial { candidate: c.clone(), outcome: Outcome::Disqualified(why) };
                progress(&t);
                trials.push(t);
            }
        }
    }
    if ok.len() == 1 {
        let t = Trial { candidate: ok[0].clone(), outcome: Outcome::Untimed };
        progress(&t);
        trials.push(t);
        return trials;
    }
    for c in ok {
        let outcome = (|| {
            let mut run = match build(&c) {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(e),
            };
            for _ in 0..p.warmup {
                if let Err(e) = run() {
                    return Outcome::Failed(e);
                }
            }
            let mut samples = Vec::new();
            for _ in 0..p.samples.max(1) {
                let t = Instant::now();
                if let Err(e) = run() {
                    return Outcome::Failed(e);
                }
                let dt = t.elapsed().as_secs_f64();
                if dt > p.stop_factor * best {
                    return Outcome::Stopped(dt);
                }
                samples.push(dt);
                if samples.len() >= p.min_samples && samples.iter().sum::<f64>() > p.budget_s {
                    break;
                }
            }
            let mut sorted = samples.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            Outcome::Timed { median: sorted[sorted.len() / 2], samples }
        })();
        if let Outcome::Timed { median, .. } = outcome {
            best = best.min(median);
        }
        let t = Trial { candidate: c, outcome };
        progress(&t);
        trials.push(t);
    }
    alternate_finalists(&mut trials, p, baseline, build);
    trials
}

/// Step (4): the fastest `p.finalists` and the baseline timed again in alternation; a
/// finalist that fails now keeps its first median.
fn alternate_finalists<O>(trials: &mut [Trial<O>], p: Protocol, baseline: Option<&str>, build: &mut dyn FnMut(&Candidate<O>) -> Result<Run, String>) {
    let best = |t: &Trial<O>| t.outcome.best().unwrap_or(f64::INFINITY);
    let mut timed: Vec<usize> = (0..trials.len()).filter(|&i| trials[i].outcome.best().is_some()).collect();
    timed.sort_by(|&a, &b| best(&trials[a]).total_cmp(&best(&trials[b])));
    let base = timed.iter().position(|&i| Some(trials[i].candidate.name.as_str()) == baseline);
    let base = base.filter(|&b| b >= p.finalists).map(|b| timed[b]);
    timed.truncate(p.finalists);
    timed.extend(base);
    if timed.len() < 2 {
        return;
    }
    let mut runs: Vec<(usize, Run, Vec<f64>)> = Vec::new();
    for &i in &timed {
        if let Ok(mut run) = build(&trials[i].candidate) {
            if (0..p.warmup).all(|_| run().is_ok()) {
                runs.push((i, run, Vec::new()));
            }
        }
    }
    let t0 = Instant::now();
    let mut rounds = 0;
    while rounds < p.samples.max(1) {
        for (_, run, samples) in runs.iter_mut() {
            let t = Instant::now();
            if run().is_ok() {
                samples.push(t.elapsed().as_secs_f64());
            }
        }
        rounds += 1;
        if rounds >= p.min_samples && t0.elapsed().as_secs_f64() > p.budget_s * runs.len() as f64 {
            break;
        }
    }
    for (i, _, samples) in runs {
        if samples.len() == rounds {
            let mut sorted = samples.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            trials[i].outcome = Outcome::Timed { median: sorted[sorted.len() / 2], samples };
        }
    }
}

/// The winner: the fastest timed candidate, or the untimed survivor.
pub fn winner<O>(trials: &[Trial<O>]) -> Option<&Trial<O>> {
    trials.iter().filter(|t| matches!(t.outcome, Outcome::Timed { .. } | Outcome::Untimed)).min_by(|a, b| {
        let m = |t: &Trial<O>| t.outcome.best().unwrap_or(0.0);
        m(a).total_cmp(&m(b))
    })
}

impl Outcome {
    /// The fastest sample of a timed candidate.
    pub fn best(&self) -> Option<f64> {
        match self {
            Outcome::Timed { samples, .. } => samples.iter().copied().reduce(f64::min),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_codegen::cpu::CpuOptions;

    type Candidate = crate::space::Candidate<CpuOptions>;

    fn cand(name: &str) -> Candidate {
        Candidate { name: name.into(), options: CpuOptions::default(), predicted: 0.0, passes_off: vec![] }
    }

    #[test]
    fn a_wrong_candidate_is_disqualified_never_chosen_and_slow_ones_stop_early() {
        let cands = [cand("fast-but-wrong"), cand("right"), cand("slow"), cand("broken")];
        let mut gate = |c: &Candidate| if c.name == "fast-but-wrong" { Err("element 3 is 1.5, reference 0.5".to_string()) } else { Ok(()) };
        let mut build = |c: &Candidate| -> Result<Run, String> {
            match c.name.as_str() {
                "broken" => Err("compile failed".into()),
                "slow" => Ok(Box::new(|| {
                    std::thread::sleep(std::time::Duration::from_millis(40));
                    Ok(())
                })),
                _ => Ok(Box::new(|| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    Ok(())
                })),
            }
        };
        let mut seen = 0;
        let trials = tune(&cands, Protocol::default(), None, &mut gate, &mut build, &mut |_| seen += 1);
        assert_eq!(seen, 4);
        let by = |n: &str| trials.iter().find(|t| t.candidate.name == n).expect("trial").outcome.clone();
        assert!(matches!(by("fast-but-wrong"), Outcome::Disqualified(_)));
        assert!(matches!(by("right"), Outcome::Timed { .. }));
        assert!(matches!(by("slow"), Outcome::Stopped(t) if t > 0.03), "stopped after one sample");
        assert_eq!(by("broken"), Outcome::Failed("compile failed".into()));
        assert_eq!(winner(&trials).expect("a winner").candidate.name, "right");
    }

    /// A candidate timed during a slow spell of the machine (its first samples) is timed
    /// again beside the others and wins on its alternating samples.
    #[test]
    fn finalists_are_timed_again_in_alternation() {
        let cands = [cand("steady"), cand("unlucky")];
        let mut gate = |_: &Candidate| Ok(());
        let calls = std::cell::Cell::new(0);
        let mut build = |c: &Candidate| -> Result<Run, String> {
            let ms = if c.name == "steady" { 6 } else { 2 };
            // The first build of `unlucky` runs through a slow spell: 5x its own time.
            let slow = c.name == "unlucky" && calls.get() == 1;
            calls.set(calls.get() + 1);
            Ok(Box::new(move || {
                std::thread::sleep(std::time::Duration::from_millis(if slow { 5 * ms } else { ms }));
                Ok(())
            }))
        };
        let trials = tune(&cands, Protocol::default(), None, &mut gate, &mut build, &mut |_| {});
        assert_eq!(winner(&trials).expect("a winner").candidate.name, "unlucky");
        let median = |n: &str| match trials.iter().find(|t| t.candidate.name == n).expect("trial").outcome {
            Outcome::Timed { median, .. } => median,
            ref o => panic!("{n}: {o:?}"),
        };
        assert!(median("unlucky") < 0.005 && median("steady") > 0.005, "medians from the alternating rounds");
        // One finalist plus the named baseline: both timed again, five more samples each.
        let one = tune(&cands, Protocol { finalists: 1, ..Protocol::default() }, Some("steady"), &mut gate, &mut build, &mut |_| {});
        assert!(one.iter().all(|t| matches!(t.outcome, Outcome::Timed { .. })));
        let before = calls.get();
        let _ = tune(&cands, Protocol { finalists: 1, ..Protocol::default() }, None, &mut gate, &mut build, &mut |_| {});
        assert_eq!(calls.get() - before, 2, "without a baseline a single finalist is not built again");
    }

    /// Slow candidates stop sampling after `min_samples` once they have used the budget.
    #[test]
    fn slow_candidates_take_fewer_samples() {
        let cands = [cand("a"), cand("b")];
        let mut gate = |_: &Candidate| Ok(());
        let mut build = |_: &Candidate| -> Result<Run, String> {
            Ok(Box::new(|| {
                std::thread::sleep(std::time::Duration::from_millis(4));
                Ok(())
            }))
        };
        let mut count = |p: Protocol| {
            let trials = tune(&cands, p, None, &mut gate, &mut build, &mut |_| {});
            trials.iter().map(|t| if let Outcome::Timed { samples, .. } = &t.outcome { samples.len() } else { 0 }).collect::<Vec<_>>()
        };
        assert_eq!(count(Protocol { budget_s: 0.001, ..Protocol::default() }), vec![3, 3]);
        assert_eq!(count(Protocol::default()), vec![5, 5]);
    }

    /// Interference only adds time: the fastest sample decides, not the median.
    #[test]
    fn the_best_sample_decides() {
        let timed = |name: &str, samples: &[f64]| {
            let mut sorted = samples.to_vec();
            sorted.sort_by(|a, b| a.total_cmp(b));
            Trial { candidate: cand(name), outcome: Outcome::Timed { median: sorted[sorted.len() / 2], samples: samples.to_vec() } }
        };
        let trials = [timed("disturbed", &[0.009, 0.003, 0.008]), timed("flat", &[0.004, 0.004, 0.004])];
        assert_eq!(trials[0].outcome.best(), Some(0.003));
        assert_eq!(winner(&trials).expect("winner").candidate.name, "disturbed");
    }

    #[test]
    fn a_single_survivor_is_not_timed() {
        let cands = [cand("a"), cand("b")];
        let trials = tune(
            &cands,
            Protocol::default(),
            None,
            &mut |c| if c.name == "a" { Err("wrong".into()) } else { Ok(()) },
            &mut |_| Err("must not build".into()),
            &mut |_| {},
        );
        assert_eq!(winner(&trials).expect("winner").outcome, Outcome::Untimed);
    }
}
