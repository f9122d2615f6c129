//! Linear and decay attention in the normal form of the chunked algorithm.
//!
//! A kernel with no softmax (`normalize = none` or `linear(eps)`), a causal mask or none,
//! and a score that is a dot of a query feature and a key feature, optionally with a decay
//! that factors as `exp(λq(i) - λk(j))` — a per-head scalar (RetNet's `γ^(p - j)`) or per
//! channel inside the dot (GLA's `exp(L_id - L_jd)`) — computes
//!
//! ```text
//! o_i = Σ_{j ≤ i + off} Σ_d fq_id · fk_jd · exp(λq_id - λk_jd) · v_j      (÷ (Σ s_ij + eps))
//! ```
//!
//! which associativity turns into a `D × Dv` state carried along the keys: the chunked form
//! (dense within a chunk of keys, the state between chunks) costs O(N·C·D + N·D·Dv) instead
//! of O(N·M·D); non-causal kernels need only the state (`φ(Q)(φ(K)ᵀV)`), and a decode step
//! (N = 1) is the recurrent form: the state over all earlier keys, then one row.
//!
//! - Purpose: make the operands of that algorithm explicit. The pass materializes them as
//!   derived tensors, computed once in O(N·D): [`FQ`] and [`FK`] (features with every query
//!   and key factor folded in: scale, cosine norms, feature maps), [`LQ`] and [`LK`] (the
//!   log-decay, per position or per position and channel), [`VAL`] (values) and [`GATE`].
//! - Precondition: a verified kernel with one branch, no bias and no branch weight, output
//!   in `b h i e` order, none of the names above in use; a decay base must be positive
//!   (`γ ∈ (0, 1)`): the log-decay takes its logarithm.
//! - Postcondition: the kernel reads its score, decay, value and gate from those tensors in
//!   the shapes [`LinearForm::of`] recognizes; the reference interpreter gives the same
//!   values (up to rounding). Whether a backend then runs the chunked algorithm or the
//!   quadratic one is a schedule choice (the CPU's `chunk` option, the autotuner).
//! - Limits: the tensors are per query head (GQA kv heads are duplicated); a kernel with both
//!   a per-channel and a scalar decay, or a decay without a causal mask, is left quadratic.

use crate::egraph::best_separable;
use crate::fold::fold_score;
use crate::hoist::rename;
use crate::separable::{flatten_product, fold_exact, score_factors, side, sum_of_products, Dot, ScoreFactors, Side};
use crate::Applied;
use attnc_ir::{BinOp, DType, DimDecl, Expr, Extent, Kernel, Norm, RedOp, TensorDecl, TensorDef, TensorKind, UnOp};

pub const FQ: &str = "__fq";
pub const FK: &str = "__fk";
pub const LQ: &str = "__lq";
pub const LK: &str = "__lk";
pub const VAL: &str = "__v";
pub const GATE: &str = "__gate";
/// The computed dim of the features' channels when a pair factor of the score split into
/// terms ([`split_pair_factor`]): terms × the dot's channels.
pub const CHANNELS: &str = "__fc";
const NAMES: [&str; 6] = [FQ, FK, LQ, LK, VAL, GATE];

/// The most terms a pair factor may split into: each multiplies the state's rows.
pub const MAX_TERMS: usize = 4;

/// `dot · Π f` where the factors that depend on the query and the key together split (by
/// the e-graph: cosFormer's `cos(c·(p − j))` = `cos(c·p)·cos(c·j) + sin(c·p)·sin(c·j)`)
/// into `Σ_t u_t(i)·w_t(j)`, `t < T ≤` [`MAX_TERMS`]: the dot over `T·len` channels,
/// channel `c` holding term `c // len` of channel `c % len`. Query and key factors fold in
/// as in [`fold_score`]. Returns the dot and `T`.
fn split_pair_factor(k: &Kernel, score: &Expr) -> Option<(Dot, usize)> {
    let ScoreFactors { dot, neg, rows, cols, pairs } = score_factors(score)?;
    let pair = pairs.into_iter().reduce(|x, y| Expr::bin(BinOp::Mul, x, y))?;
    if !rows.iter().all(|f| fold_exact(k, f, &dot.a, &dot.r)) || !cols.iter().all(|f| fold_exact(k, f, &dot.b, &dot.r)) {
        return None;
    }
    let (best, _, _) = best_separable(&pair, k);
    let terms = sum_of_products(&best)?;
    if terms.is_empty() || terms.len() > MAX_TERMS {
        return None;
    }
    let n = terms.len();
    let r = Expr::var(&dot.r);
    let term = Expr::bin(BinOp::FloorDiv, r.clone(), dot.len.clone());
    let chan = Expr::bin(BinOp::Mod, r, dot.len.clone());
    // select(t == 0, x0, select(t == 1, x1, … x_{n-1})).
    let chain = |xs: Vec<Expr>| {
        let mut it = xs.into_iter().rev();
        let last = it.next().expect("a term");
        it.enumerate().fold(last, |acc, (m, x)| Expr::select(Expr::bin(BinOp::Eq, term.clone(), Expr::Int((n - 2 - m) as i64)), x, acc))
    };
    let side_of = |x: &Expr, fs: Vec<Expr>, ts: Vec<Expr>| {
        let x = x.subst(&dot.r, &chan);
        let x = fs.into_iter().fold(x, |a, f| Expr::bin(BinOp::Mul, a, f));
        Expr::bin(BinOp::Mul, x, chain(ts))
    };
    let mut a = side_of(&dot.a, rows, terms.iter().map(|t| t.u.clone()).collect());
    if neg {
        a = Expr::un(UnOp::Neg, a);
    }
    let b = side_of(&dot.b, cols, terms.iter().map(|t| t.w.clone()).collect());
    let len = Expr::bin(BinOp::Mul, Expr::Int(n as i64), dot.len.clone());
    Some((Dot { a, b, len, ..dot }, n))
}

/// How the decay enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    None,
    /// `exp(LQ[b,h,i] - LK[b,h,j])` multiplies the weight.
    Scalar,
    /// `exp(LQ[b,h,i,r] - LK[b,h,j,r])` multiplies each channel inside the dot.
    Channel,
}

/// A kernel in the normal form, as a backend reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearForm {
    /// `Some(off)`: key `j` is visible to row `i` iff `j <= i + off` (a dim expression);
    /// `None`: every key is.
    pub causal: Option<Expr>,
    /// `Some(eps)`: the linear normalization `s / (Σ s + eps)`.
    pub eps: Option<f64>,
    pub decay: Decay,
    pub gate: bool,
    /// The feature (channel) count.
    pub channels: Extent,
}

fn load(t: &str, idx: &[&str]) -> Expr {
    Expr::Load(t.to_string(), idx.iter().map(|v| Expr::var(v)).collect())
}

fn score_expr(decay: Decay, channels: &Extent) -> Expr {
    let mut body = Expr::bin(BinOp::Mul, load(FQ, &["b", "h", "i", "r0"]), load(FK, &["b", "h", "j", "r0"]));
    if decay == Decay::Channel {
        let x = Expr::bin(BinOp::Sub, load(LQ, &["b", "h", "i", "r0"]), load(LK, &["b", "h", "j", "r0"]));
        body = Expr::bin(BinOp::Mul, body, Expr::un(UnOp::Exp, x));
    }
    Expr::Reduce { op: RedOp::Sum, var: "r0".into(), lo: Box::new(Expr::Int(0)), hi: Box::new(channels.to_expr()), body: Box::new(body) }
}

fn scalar_decay_expr() -> Expr {
    Expr::un(UnOp::Exp, Expr::bin(BinOp::Sub, load(LQ, &["b", "h", "i"]), load(LK, &["b", "h", "j"])))
}

/// `j <= i + off`: `Some(off)`.
fn causal_offset(mask: &Expr) -> Option<Expr> {
    let Expr::Binary(BinOp::Le, j, x) = mask else { return None };
    if **j != Expr::var("j") {
        return None;
    }
    match &**x {
        Expr::Var(v) if v == "i" => Some(Expr::Int(0)),
        Expr::Binary(BinOp::Add, i, off) if **i == Expr::var("i") && off.free_vars().is_empty() && off.loads().is_empty() => Some((**off).clone()),
        _ => None,
    }
}

fn norm_eps(n: &Norm) -> Option<Option<f64>> {
    match n {
        Norm::Map(Expr::Var(s)) if s == "s" => Some(None),
        Norm::Linear { eps } => Some(Some(eps.0)),
        _ => None,
    }
}

impl LinearForm {
    /// Recognizes the normal form this pass produces.
    pub fn of(k: &Kernel) -> Option<LinearForm> {
        let [br] = k.branches.as_slice() else { return None };
        if br.bias.is_some() || br.weight.is_some() || k.out != ["b", "h", "i", "e"] {
            return None;
        }
        let derived = |n: &str| k.tensor(n).is_some_and(|t| matches!(t.kind, TensorKind::Derived { .. }));
        if !derived(FQ) || !derived(FK) || !derived(VAL) {
            return None;
        }
        let channels = k.tensor(FQ)?.shape.get(3)?.clone();
        let eps = norm_eps(&br.norm)?;
        let causal = match &br.mask {
            None => None,
            Some(m) => Some(causal_offset(m)?),
        };
        let decay = if br.score == score_expr(Decay::Channel, &channels) && derived(LQ) && derived(LK) {
            Decay::Channel
        } else if br.score == score_expr(Decay::None, &channels) {
            match &br.decay {
                None => Decay::None,
                Some(d) if *d == scalar_decay_expr() && derived(LQ) && derived(LK) => Decay::Scalar,
                Some(_) => return None,
            }
        } else {
            return None;
        };
        if decay == Decay::Channel && br.decay.is_some() {
            return None;
        }
        if decay != Decay::None && causal.is_none() {
            return None;
        }
        if k.value != load(VAL, &["b", "h", "j", "e"]) {
            return None;
        }
        let gate = match &k.gate {
            None => false,
            Some(g) if *g == load(GATE, &["b", "h", "i", "e"]) && derived(GATE) => true,
            Some(_) => return None,
        };
        Some(LinearForm { causal, eps, decay, gate, channels })
    }
}

/// `exp(X - Y)` with X free of `j` and Y free of `i`.
fn split_exp(e: &Expr) -> Option<(Expr, Expr)> {
    let Expr::Unary(UnOp::Exp, x) = e else { return None };
    let Expr::Binary(BinOp::Sub, a, b) = &**x else { return None };
    let (fa, fb) = (a.free_vars(), b.free_vars());
    (!fa.contains("j") && !fb.contains("i")).then(|| ((**a).clone(), (**b).clone()))
}

/// The decay as `exp(λq(i) - λk(j))`: `γ ** float(P - Q)` (γ free of i, j) or `exp(X - Y)`.
fn split_decay(d: &Expr) -> Option<(Expr, Expr)> {
    if let Some(x) = split_exp(d) {
        return Some(x);
    }
    let Expr::Binary(BinOp::Pow, base, ex) = d else { return None };
    let bf = base.free_vars();
    if bf.contains("i") || bf.contains("j") {
        return None;
    }
    // `float(P - Q)` for integer positions, `P - Q` for float ones.
    let (inner, conv) = match &**ex {
        Expr::Unary(UnOp::ToFloat, x) => ((**x).clone(), true),
        other => (other.clone(), false),
    };
    let Expr::Binary(BinOp::Sub, p, q) = inner else { return None };
    if p.free_vars().contains("j") || q.free_vars().contains("i") {
        return None;
    }
    let (p, q) = (*p, *q);
    let lg = Expr::un(UnOp::Log, (**base).clone());
    let f = |x: Expr| if conv { Expr::un(UnOp::ToFloat, x) } else { x };
    Some((Expr::bin(BinOp::Mul, f(p), lg.clone()), Expr::bin(BinOp::Mul, f(q), lg)))
}

fn extent_of(e: &Expr) -> Option<Extent> {
    match e {
        Expr::Dim(d) => Some(Extent::Dim(d.clone())),
        Expr::Int(n) => Some(Extent::Fixed(*n)),
        _ => None,
    }
}

fn derived(name: &str, shape: Vec<Extent>, idx: &[&str], body: &Expr) -> TensorDecl {
    let vars: Vec<String> = (0..idx.len()).map(|n| format!("x{n}")).collect();
    let map: Vec<(&str, &str)> = idx.iter().zip(&vars).map(|(a, b)| (*a, b.as_str())).collect();
    let def = TensorDef::Map(rename(body, &map));
    TensorDecl { name: name.into(), dtype: DType::F32, shape, kind: TensorKind::Derived { vars, def } }
}

pub fn run(k: &Kernel) -> Option<(Kernel, Vec<Applied>)> {
    let [br] = k.branches.as_slice() else { return None };
    if br.bias.is_some() || br.weight.is_some() || k.out != ["b", "h", "i", "e"] || NAMES.iter().any(|n| k.tensor(n).is_some()) {
        return None;
    }
    let eps = norm_eps(&br.norm)?;
    let causal = match &br.mask {
        None => None,
        Some(m) => Some(causal_offset(m)?),
    };
    // The score: a dot whose body may carry a per-channel decay factor exp(X_i - Y_j), or
    // times a pair factor that splits into terms.
    let mut terms = 1;
    let (a, b, r, len, channel) = match fold_score(k, &br.score, true) {
        Some(d) => (d.a, d.b, d.r, d.len, None),
        None if split_pair_factor(k, &br.score).is_some() => {
            let (d, n) = split_pair_factor(k, &br.score).expect("just split");
            terms = n;
            (d.a, d.b, d.r, d.len, None)
        }
        None => {
            // `Σ_r body` alone, times or divided by a per-row factor.
            let row_only = |f: &Expr| f.free_vars().iter().all(|v| matches!(v.as_str(), "b" | "h" | "i"));
            let (red, rowf) = match &br.score {
                Expr::Binary(BinOp::Div, red, f) if row_only(f) => (&**red, Expr::bin(BinOp::Div, Expr::float(1.0), (**f).clone())),
                Expr::Binary(BinOp::Mul, red, f) if row_only(f) => (&**red, (**f).clone()),
                other => (other, Expr::float(1.0)),
            };
            let Expr::Reduce { op: RedOp::Sum, var, lo, hi, body } = red else { return None };
            if **lo != Expr::Int(0) {
                return None;
            }
            let mut neg = false;
            let mut fs = Vec::new();
            flatten_product(body, &mut neg, &mut fs);
            let (mut qa, mut kb, mut ch) = (Vec::new(), Vec::new(), None);
            for x in fs {
                match side(&x) {
                    Side::Pair => {
                        // At most one per-channel decay factor exp(X_i - Y_j).
                        if ch.replace(split_exp(&x)?).is_some() {
                            return None;
                        }
                    }
                    Side::Key => kb.push(x),
                    Side::Query | Side::Uniform => qa.push(x),
                }
            }
            let mul = |fs: Vec<Expr>| fs.into_iter().reduce(|x, y| Expr::bin(BinOp::Mul, x, y)).unwrap_or(Expr::float(1.0));
            let mut a = Expr::bin(BinOp::Mul, mul(qa), rowf);
            if neg {
                a = Expr::un(UnOp::Neg, a);
            }
            (a, mul(kb), var.clone(), (**hi).clone(), Some(ch?))
        }
    };
    if k.dims.iter().any(|d| d.name == CHANNELS) {
        return None;
    }
    let channels = if terms > 1 { Extent::Dim(CHANNELS.into()) } else { extent_of(&len)? };
    let scalar = match &br.decay {
        None => None,
        Some(d) => Some(split_decay(d)?),
    };
    let decay = match (&channel, &scalar) {
        (Some(_), Some(_)) => return None,
        (Some(_), None) => Decay::Channel,
        (None, Some(_)) => Decay::Scalar,
        (None, None) => Decay::None,
    };
    if decay != Decay::None && causal.is_none() {
        return None;
    }
    let (ib, ih, ii, ij, ie) = (k.iter.b.clone(), k.iter.h.clone(), k.iter.i.clone(), k.iter.j.clone(), k.iter.e.clone());
    let mut out = k.clone();
    if terms > 1 {
        out.dims.push(DimDecl { name: CHANNELS.into(), def: Some(len.clone()) });
    }
    let q_shape = vec![ib.clone(), ih.clone(), ii.clone(), channels.clone()];
    let k_shape = vec![ib.clone(), ih.clone(), ij.clone(), channels.clone()];
    let mut add = |t: TensorDecl| crate::add_derived(&mut out, t);
    add(derived(FQ, q_shape.clone(), &["b", "h", "i", &r], &a));
    add(derived(FK, k_shape.clone(), &["b", "h", "j", &r], &b));
    match (&channel, &scalar) {
        (Some((x, y)), _) => {
            add(derived(LQ, q_shape, &["b", "h", "i", &r], x));
            add(derived(LK, k_shape, &["b", "h", "j", &r], y));
        }
        (_, Some((x, y))) => {
            add(derived(LQ, vec![ib.clone(), ih.clone(), ii.clone()], &["b", "h", "i"], x));
            add(derived(LK, vec![ib.clone(), ih.clone(), ij.clone()], &["b", "h", "j"], y));
        }
        _ => {}
    }
    add(derived(VAL, vec![ib.clone(), ih.clone(), ij, ie.clone()], &["b", "h", "j", "e"], &k.value));
    if let Some(g) = &k.gate {
        add(derived(GATE, vec![ib, ih, ii, ie], &["b", "h", "i", "e"], g));
    }
    out.value = load(VAL, &["b", "h", "j", "e"]);
    if k.gate.is_some() {
        out.gate = Some(load(GATE, &["b", "h", "i", "e"]));
    }
    let nb = &mut out.branches[0];
    nb.score = score_expr(decay, &channels);
    nb.decay = (decay == Decay::Scalar).then(scalar_decay_expr);
    let what = format!(
        "{}{} {} attention{}: features, log-decays, values{} materialized for the chunked form (state {}×{})",
        if terms > 1 {
            format!("a pair factor split into {terms} query × key terms (features of {} channels); ", attnc_ir::pretty::infix(&len))
        } else {
            String::new()
        },
        if causal.is_some() { "causal" } else { "non-causal" },
        if eps.is_some() { "normalized linear" } else { "unnormalized linear" },
        match decay {
            Decay::None => String::new(),
            Decay::Scalar => " with a per-position decay exp(λq(i) − λk(j))".into(),
            Decay::Channel => " with a per-channel decay inside the dot".into(),
        },
        if k.gate.is_some() { " and gate" } else { "" },
        if terms > 1 { attnc_ir::pretty::infix(&len) } else { channels.to_string() },
        k.iter.e,
    );
    Some((out, vec![Applied { pass: "linear", what, cost: None }]))
}
