//! attnc-passes: analyses and rewrites of kernels.
//!
//! It owns what can be proven about a kernel without running it, and the rewrites that turn
//! a kernel into an equal, cheaper one:
//!
//! - analyses: interval analysis of expressions ([`interval`]), the block-sparsity
//!   classification built on it ([`tiles`]), separable structure ([`separable`]), index
//!   bounds where the reference reads ([`bounds`]);
//! - the e-graph ([`egraph`], the only user of egg) with its rules and cost functions;
//! - the passes, each `run(&Kernel) -> Option<(Kernel, what it did)>`, in the order of
//!   [`PASSES`]: [`simplify`], [`hoist`], [`fold`], [`lowrank`], [`linear`], [`relpos`].
//!
//! Every rewrite is checked against the reference interpreter in the tests: the optimized
//! kernel must compute what the original computes. It knows nothing of the surface language
//! or of code generation.

pub mod approx;
pub mod bounds;
pub mod egraph;
pub mod fold;
pub mod hoist;
/// Interval analysis lives in the IR crate (the checker uses it too); re-exported here.
pub use attnc_ir::interval;
pub mod linear;
pub mod lowrank;
pub mod relpos;
pub mod separable;
pub mod simplify;
pub mod tiles;

use attnc_ir::{verify, Kernel};
use std::collections::BTreeSet;

/// The pipeline: the passes in order, with what each does ([`optimize`] runs this list).
/// Ordering constraints:
/// - `simplify` first, so the others match folded constants and canonical forms;
/// - `hoist` before `fold`: folding a factor into the dot's operands evaluates it once per
///   channel, which is only cheap once per-row reductions (cosine norms) are tensors;
/// - `fold` before `lowrank`: a bias joins the dot only when the score is a bare dot;
/// - `linear` after those: it reads the folded dot and materializes the chunked form's operands;
/// - `relpos` last: a bias the low-rank pass turned into dot channels is cheaper still, and
///   it leaves the linear family's branches (a decay) alone.
pub const PASSES: &[Pass] = &[
    Pass { name: "simplify", what: "constant folding and algebraic identities (e-graph, smallest form)", run: simplify::run },
    Pass { name: "hoist", what: "per-row and per-key reductions in the score (cosine norms) become tensors computed once", run: hoist::run },
    Pass { name: "fold", what: "query- and key-only factors of the score move into the dot's operands (scale, norms)", run: fold::run },
    Pass { name: "lowrank", what: "FlashBias: a bias that is a sum of query-term × key-term products becomes extra dot channels", run: lowrank::run },
    Pass { name: "linear", what: "linear and decay attention in the normal form of the chunked algorithm (retnet, gla, cosine, linear_elu)", run: linear::run },
    Pass { name: "relpos", what: "a costly bias of the offset i − j alone (T5's buckets) becomes a table over the offsets, computed once", run: relpos::run },
];

/// One pass of the pipeline: its name (`--opt NAME=off`), what it does, and the pass.
pub struct Pass {
    pub name: &'static str,
    pub what: &'static str,
    pub run: PassFn,
}

/// A pass: the rewritten kernel and what was applied, or `None` when it has nothing to do.
pub type PassFn = fn(&Kernel) -> Option<(Kernel, Vec<Applied>)>;

/// Which passes run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PassConfig {
    /// Names of passes switched off.
    pub off: BTreeSet<String>,
}

impl PassConfig {
    /// Every pass on.
    pub fn all() -> PassConfig {
        PassConfig::default()
    }
    /// Every pass off (`--no-opt`).
    pub fn none() -> PassConfig {
        PassConfig { off: PASSES.iter().map(|p| p.name.to_string()).collect() }
    }
    pub fn enabled(&self, pass: &str) -> bool {
        !self.off.contains(pass)
    }
    /// Switches a pass on or off by name; an unknown name is an error naming the known ones.
    pub fn set(&mut self, pass: &str, on: bool) -> Result<(), String> {
        if !PASSES.iter().any(|p| p.name == pass) {
            let names: Vec<&str> = PASSES.iter().map(|p| p.name).collect();
            return Err(format!("no pass named `{pass}` (the passes: {})", names.join(", ")));
        }
        if on {
            self.off.remove(pass);
        } else {
            self.off.insert(pass.to_string());
        }
        Ok(())
    }
    /// A short stable description (`all`, `none`, `off=lowrank,linear`) for reports and keys.
    pub fn describe(&self) -> String {
        if self.off.is_empty() {
            "all".into()
        } else if self.off.len() == PASSES.len() {
            "none".into()
        } else {
            format!("off={}", self.off.iter().cloned().collect::<Vec<_>>().join(","))
        }
    }
}

/// One rewrite a pass applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    pub pass: &'static str,
    /// What was rewritten, in words.
    pub what: String,
    /// Estimated per-pair cost (scalar-op units, [`egraph::SepCost`]) before and after, where
    /// the pass changes per-pair work.
    pub cost: Option<(f64, f64)>,
}

/// A kernel after the pipeline, its verified facts, and what was done to it.
#[derive(Clone, Debug)]
pub struct Optimized {
    pub kernel: Kernel,
    pub info: attnc_ir::KernelInfo,
    pub log: Vec<Applied>,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the `{pass}` pass produced an invalid kernel (a bug in attnc): {why}")]
    Invalid { pass: &'static str, why: String },
}

/// Runs the enabled passes in order, verifying the kernel after each.
pub fn optimize(k: &Kernel, cfg: &PassConfig) -> Result<Optimized, PassError> {
    let mut cur = k.clone();
    let mut info = verify(k).map_err(|e| PassError::Invalid { pass: "input", why: e.to_string() })?;
    let mut log = Vec::new();
    for pass in PASSES {
        if !cfg.enabled(pass.name) {
            continue;
        }
        if let Some((next, applied)) = (pass.run)(&cur) {
            info = verify(&next).map_err(|e| PassError::Invalid { pass: pass.name, why: e.to_string() })?;
            cur = next;
            log.extend(applied);
        }
    }
    Ok(Optimized { kernel: cur, info, log })
}

/// A tensor name not yet used in `k`, starting from `base`.
pub(crate) fn fresh_tensor(k: &Kernel, base: &str) -> String {
    fresh(base, |n| k.tensor(n).is_some())
}

/// A dim name not yet declared in `k`, starting from `base`.
pub(crate) fn fresh_dim(k: &Kernel, base: &str) -> String {
    fresh(base, |n| k.dims.iter().any(|d| d.name == n))
}

/// `base`, or `base_1`, `base_2`, … : the first that is not `taken`.
fn fresh(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (1..).map(|n| format!("{base}_{n}")).find(|n| !taken(n)).expect("a free name")
}

/// Appends a derived tensor (derived tensors are computed in declaration order, so it may
/// read every tensor declared before it).
pub(crate) fn add_derived(k: &mut Kernel, t: attnc_ir::TensorDecl) {
    k.tensors.push(t);
}
