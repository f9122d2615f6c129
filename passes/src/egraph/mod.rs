//! The e-graph over a kernel's pair expressions (score, bias, decay): a small language,
//! an analysis of facts, cost functions, and the runner.
//!
//! Purpose: find equal forms of an expression that are cheaper to compute, the main one
//! being a bias written as a sum of products of a query-side term and a key-side term
//! (FlashBias: such a bias is computed by the score matmul, see [`crate::lowrank`]).
//!
//! - **Language** ([`Ix`]): `+ - * / neg float`, literals and leaves. A leaf is an index
//!   variable (`i`, `j`, `b`, …), a dim (`$D`), or an *opaque* subexpression (`#3`: a load,
//!   a reduction, `exp`, a select…) kept whole in a side table; the rewrites never look
//!   inside opaque leaves, only at their facts.
//! - **Analysis** ([`Facts`]): the type, which of the query index `i` and the key index `j`
//!   the class depends on, and its constant value. `merge` is a lattice join: dependence
//!   sets intersect (each is sound, the smaller is more precise), constants must agree.
//!   Constants are folded into the class (egg's `ConstantFold` pattern).
//! - **Rules** ([`rules`]): directional, each with a comment stating the identity and its
//!   side conditions; no blanket commutativity or associativity.
//! - **Costs**: [`SepCost`] prices per-pair work and what a sum of row × column products
//!   costs once folded into the matmul; [`SizeCost`] is plain size for simplification.
//!
//! Runs are reproducible: egg's `deterministic` feature, explicit iteration and node limits,
//! no time limit, and cost ties broken by size.

pub mod rules;

use attnc_ir::{BinOp, Expr, Kernel, Ty, UnOp, F64};
use egg::{define_language, Analysis, CostFunction, DidMerge, EGraph, Extractor, Id, Language, RecExpr, Runner, StopReason, Symbol};
use std::fmt;
use std::str::FromStr;

/// A literal: an integer or a float (compared and hashed by its bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lit {
    I(i64),
    F(u64),
}

impl Lit {
    pub fn float(x: f64) -> Lit {
        Lit::F(x.to_bits())
    }
    fn to_expr(self) -> Expr {
        match self {
            Lit::I(n) => Expr::Int(n),
            Lit::F(b) => Expr::Float(F64(f64::from_bits(b))),
        }
    }
    pub fn as_f64(self) -> f64 {
        match self {
            Lit::I(n) => n as f64,
            Lit::F(b) => f64::from_bits(b),
        }
    }
}

impl fmt::Display for Lit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lit::I(n) => write!(f, "{n}"),
            // `{:?}` always prints a `.` or an exponent, so the text parses back as a float.
            Lit::F(b) => write!(f, "{:?}", f64::from_bits(*b)),
        }
    }
}

impl FromStr for Lit {
    type Err = String;
    fn from_str(s: &str) -> Result<Lit, String> {
        if let Ok(n) = s.parse::<i64>() {
            return Ok(Lit::I(n));
        }
        let looks_float = s.contains(['.', 'e', 'E']) || matches!(s, "inf" | "-inf" | "NaN");
        match s.parse::<f64>() {
            Ok(x) if looks_float => Ok(Lit::float(x)),
            _ => Err(format!("`{s}` is not a literal")),
        }
    }
}

define_language! {
    /// Arithmetic over pair expressions; anything else is an opaque leaf.
    pub enum Ix {
        "+" = Add([Id; 2]),
        "-" = Sub([Id; 2]),
        "*" = Mul([Id; 2]),
        "/" = Div([Id; 2]),
        "neg" = Neg(Id),
        "float" = ToFloat(Id),
        "cos" = Cos(Id),
        "sin" = Sin(Id),
        Lit(Lit),
        Leaf(Symbol),
    }
}

/// Depends on the query index `i`.
pub const ROW: u8 = 1;
/// Depends on the key index `j`.
pub const COL: u8 = 2;
/// Depends on another bound variable (`s`, `w`, a reduction variable): not a pair term.
pub const OTHER: u8 = 4;

/// What is known of an e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    pub ty: Ty,
    /// `ROW | COL | OTHER` bits: the variables the value may depend on.
    pub deps: u8,
    pub konst: Option<Lit>,
}

impl Facts {
    /// Depends on both the query and the key: per-pair work.
    pub fn pair(&self) -> bool {
        self.deps & (ROW | COL) == ROW | COL
    }
}

/// The analysis: facts per class, and the table of opaque leaves.
#[derive(Default)]
pub struct FactsAnalysis {
    /// `#n` stands for `opaque[n]`: the expression, its type and dependence bits.
    pub opaque: Vec<(Expr, Ty, u8)>,
}

pub type Graph = EGraph<Ix, FactsAnalysis>;

fn var_bits(v: &str) -> u8 {
    match v {
        "i" => ROW,
        "j" => COL,
        "b" | "h" | "e" => 0,
        _ => OTHER,
    }
}

/// Dependence bits of an IR expression.
pub fn deps_of(e: &Expr) -> u8 {
    e.free_vars().iter().fold(0, |acc, v| acc | var_bits(v))
}

fn fold(op: &Ix, a: Option<Lit>, b: Option<Lit>) -> Option<Lit> {
    use Lit::{F, I};
    let f = |x: u64| f64::from_bits(x);
    Some(match (op, a?, b) {
        (Ix::Neg(_), I(x), _) => I(x.wrapping_neg()),
        (Ix::Neg(_), F(x), _) => Lit::float(-f(x)),
        (Ix::ToFloat(_), I(x), _) => Lit::float(x as f64),
        (Ix::Cos(_), F(x), _) => Lit::float(f(x).cos()),
        (Ix::Sin(_), F(x), _) => Lit::float(f(x).sin()),
        (Ix::Add(_), I(x), Some(I(y))) => I(x.wrapping_add(y)),
        (Ix::Sub(_), I(x), Some(I(y))) => I(x.wrapping_sub(y)),
        (Ix::Mul(_), I(x), Some(I(y))) => I(x.wrapping_mul(y)),
        (Ix::Add(_), F(x), Some(F(y))) => Lit::float(f(x) + f(y)),
        (Ix::Sub(_), F(x), Some(F(y))) => Lit::float(f(x) - f(y)),
        (Ix::Mul(_), F(x), Some(F(y))) => Lit::float(f(x) * f(y)),
        (Ix::Div(_), F(x), Some(F(y))) => Lit::float(f(x) / f(y)),
        _ => return None,
    })
}

impl Analysis<Ix> for FactsAnalysis {
    type Data = Facts;

    fn make(egraph: &mut Graph, enode: &Ix, _id: Id) -> Facts {
        let d = |i: &Id| egraph[*i].data.clone();
        match enode {
            Ix::Lit(l) => Facts { ty: if matches!(l, Lit::I(_)) { Ty::Int } else { Ty::Float }, deps: 0, konst: Some(*l) },
            Ix::Leaf(s) => {
                let s = s.as_str();
                if let Some(n) = s.strip_prefix('#') {
                    let (_, ty, deps) = &egraph.analysis.opaque[n.parse::<usize>().expect("opaque leaf index")];
                    Facts { ty: *ty, deps: *deps, konst: None }
                } else if s.starts_with('$') {
                    Facts { ty: Ty::Int, deps: 0, konst: None }
                } else {
                    let ty = if s == "s" || s == "w" { Ty::Float } else { Ty::Int };
                    Facts { ty, deps: var_bits(s), konst: None }
                }
            }
            Ix::Neg(a) => {
                let a = d(a);
                Facts { ty: a.ty, deps: a.deps, konst: fold(enode, a.konst, None) }
            }
            Ix::ToFloat(a) | Ix::Cos(a) | Ix::Sin(a) => {
                let a = d(a);
                Facts { ty: Ty::Float, deps: a.deps, konst: fold(enode, a.konst, None) }
            }
            Ix::Add([a, b]) | Ix::Sub([a, b]) | Ix::Mul([a, b]) | Ix::Div([a, b]) => {
                let (a, b) = (d(a), d(b));
                Facts { ty: a.ty, deps: a.deps | b.deps, konst: fold(enode, a.konst, b.konst) }
            }
        }
    }

    fn merge(&mut self, to: &mut Facts, from: Facts) -> DidMerge {
        assert_eq!(to.ty, from.ty, "an e-class holds values of two types: a rule is unsound");
        let deps = to.deps & from.deps;
        let konst = to.konst.or(from.konst);
        let changed_to = deps != to.deps || konst != to.konst;
        let changed_from = deps != from.deps || konst != from.konst;
        to.deps = deps;
        to.konst = konst;
        DidMerge(changed_to, changed_from)
    }

    fn modify(egraph: &mut Graph, id: Id) {
        if let Some(l) = egraph[id].data.konst {
            // Only finite constants become literals: folding must not invent NaN or inf.
            if l.as_f64().is_finite() {
                let lit = egraph.add(Ix::Lit(l));
                egraph.union(id, lit);
            }
        }
    }
}

/// An IR expression in e-graph form, with its opaque leaves.
pub struct Lowered {
    pub expr: RecExpr<Ix>,
    pub analysis: FactsAnalysis,
}

/// Converts an IR expression of `k` to e-graph form.
pub fn lower(e: &Expr, k: &Kernel) -> Lowered {
    fn go(e: &Expr, k: &Kernel, out: &mut RecExpr<Ix>, an: &mut FactsAnalysis) -> Id {
        let bin = |op: fn([Id; 2]) -> Ix, a: &Expr, b: &Expr, out: &mut RecExpr<Ix>, an: &mut FactsAnalysis| {
            let a = go(a, k, out, an);
            let b = go(b, k, out, an);
            out.add(op([a, b]))
        };
        match e {
            Expr::Int(n) => out.add(Ix::Lit(Lit::I(*n))),
            Expr::Float(x) if x.0.is_finite() => out.add(Ix::Lit(Lit::float(x.0))),
            Expr::Var(v) => out.add(Ix::Leaf(Symbol::from(v.as_str()))),
            Expr::Dim(d) => out.add(Ix::Leaf(Symbol::from(format!("${d}")))),
            Expr::Binary(BinOp::Add, a, b) => bin(Ix::Add, a, b, out, an),
            Expr::Binary(BinOp::Sub, a, b) => bin(Ix::Sub, a, b, out, an),
            Expr::Binary(BinOp::Mul, a, b) => bin(Ix::Mul, a, b, out, an),
            Expr::Binary(BinOp::Div, a, b) => bin(Ix::Div, a, b, out, an),
            Expr::Unary(UnOp::Neg, a) => {
                let a = go(a, k, out, an);
                out.add(Ix::Neg(a))
            }
            Expr::Unary(op @ (UnOp::ToFloat | UnOp::Cos | UnOp::Sin), a) => {
                let a = go(a, k, out, an);
                out.add(match op {
                    UnOp::ToFloat => Ix::ToFloat(a),
                    UnOp::Cos => Ix::Cos(a),
                    _ => Ix::Sin(a),
                })
            }
            other => {
                let n = match an.opaque.iter().position(|(x, _, _)| x == other) {
                    Some(n) => n,
                    None => {
                        an.opaque.push((other.clone(), k.ty_of(other), deps_of(other)));
                        an.opaque.len() - 1
                    }
                };
                out.add(Ix::Leaf(Symbol::from(format!("#{n}"))))
            }
        }
    }
    let mut expr = RecExpr::default();
    let mut analysis = FactsAnalysis::default();
    go(e, k, &mut expr, &mut analysis);
    Lowered { expr, analysis }
}

/// Converts the subtree of `rec` rooted at `id` back to an IR expression.
pub fn raise(rec: &RecExpr<Ix>, id: Id, opaque: &[(Expr, Ty, u8)]) -> Expr {
    let r = |i: &Id| raise(rec, *i, opaque);
    match &rec[id] {
        Ix::Add([a, b]) => Expr::bin(BinOp::Add, r(a), r(b)),
        Ix::Sub([a, b]) => Expr::bin(BinOp::Sub, r(a), r(b)),
        Ix::Mul([a, b]) => Expr::bin(BinOp::Mul, r(a), r(b)),
        Ix::Div([a, b]) => Expr::bin(BinOp::Div, r(a), r(b)),
        Ix::Neg(a) => Expr::un(UnOp::Neg, r(a)),
        Ix::ToFloat(a) => Expr::un(UnOp::ToFloat, r(a)),
        Ix::Cos(a) => Expr::un(UnOp::Cos, r(a)),
        Ix::Sin(a) => Expr::un(UnOp::Sin, r(a)),
        Ix::Lit(l) => l.to_expr(),
        Ix::Leaf(s) => {
            let s = s.as_str();
            if let Some(n) = s.strip_prefix('#') {
                opaque[n.parse::<usize>().expect("opaque leaf index")].0.clone()
            } else if let Some(d) = s.strip_prefix('$') {
                Expr::dim(d)
            } else {
                Expr::var(s)
            }
        }
    }
}

/// Limits of one run: reproducible (no time limit), small enough for any spec.
pub const ITER_LIMIT: usize = 12;
pub const NODE_LIMIT: usize = 5_000;

/// The outcome of saturating one expression.
pub struct Saturated {
    pub runner: Runner<Ix, FactsAnalysis>,
    pub root: Id,
}

impl Saturated {
    pub fn stop_reason(&self) -> String {
        match &self.runner.stop_reason {
            Some(StopReason::Saturated) => "saturated".into(),
            Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
            Some(StopReason::NodeLimit(n)) => format!("node limit ({n})"),
            Some(other) => format!("{other:?}"),
            None => "not run".into(),
        }
    }
    pub fn opaque(&self) -> &[(Expr, Ty, u8)] {
        &self.runner.egraph.analysis.opaque
    }
}

/// Adds `e` to a fresh e-graph and applies [`rules::all`] until saturation or the limits.
pub fn saturate(e: &Expr, k: &Kernel) -> Saturated {
    let low = lower(e, k);
    let runner = Runner::new(low.analysis).with_iter_limit(ITER_LIMIT).with_node_limit(NODE_LIMIT).with_expr(&low.expr).run(&rules::all());
    let root = runner.roots[0];
    Saturated { runner, root }
}

/// The cost of one subterm per (query, key) pair, in units of one scalar operation on the
/// pair; a sum of `rank` products of a query-side and a key-side term can instead be
/// computed by the score matmul at [`RANK_COST`] per product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SepCost {
    /// Per-pair operations to evaluate it directly (0 for terms that depend on at most
    /// one of `i`, `j`: those are evaluated once per row or per key).
    pub eval: f64,
    /// `Some(r)`: it is a sum of `r` (query term) × (key term) products.
    pub rank: Option<u32>,
    /// Node count, the tie-breaker.
    pub size: u32,
}

/// Per-pair cost of one extra channel in the score matmul, relative to one scalar operation
/// of the generated per-pair code: the microkernels run 8–16 fused multiply-adds per cycle,
/// the generated code 4 lanes, so a channel costs about a quarter of an operation.
pub const RANK_COST: f64 = 0.25;

impl SepCost {
    /// The cheaper of evaluating it per pair and folding it into the matmul.
    pub fn total(&self) -> f64 {
        match self.rank {
            Some(r) => self.eval.min(RANK_COST * r as f64),
            None => self.eval,
        }
    }
}

impl PartialOrd for SepCost {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.total().total_cmp(&o.total()).then(self.size.cmp(&o.size)))
    }
}

/// Per-pair operation counts of the opaque leaves and operators (scalar-op units).
fn opaque_eval(e: &Expr) -> f64 {
    let mut n = 0.0;
    e.walk(&mut |x| {
        n += match x {
            Expr::Unary(UnOp::Exp | UnOp::Log | UnOp::Tanh | UnOp::Sigmoid | UnOp::Silu | UnOp::Elu | UnOp::Cos | UnOp::Sin, _) => 12.0,
            Expr::Binary(BinOp::Pow, _, _) => 25.0,
            Expr::Binary(BinOp::FloorDiv | BinOp::Mod | BinOp::Div, _, _) => 4.0,
            // A gather: one scalar load per lane.
            Expr::Load(..) => 4.0,
            Expr::Reduce { .. } => 16.0,
            Expr::Int(_) | Expr::Float(_) | Expr::Var(_) | Expr::Dim(_) => 0.0,
            _ => 1.0,
        }
    });
    n
}

/// [`SepCost`] over an e-graph (reads the classes' facts).
pub struct SepCostFn<'g> {
    pub egraph: &'g Graph,
}

impl CostFunction<Ix> for SepCostFn<'_> {
    type Cost = SepCost;
    fn cost<C: FnMut(Id) -> SepCost>(&mut self, enode: &Ix, mut costs: C) -> SepCost {
        let g = self.egraph;
        let deps = match enode {
            Ix::Leaf(s) => {
                let s = s.as_str();
                if let Some(n) = s.strip_prefix('#') {
                    g.analysis.opaque[n.parse::<usize>().expect("opaque")].2
                } else if s.starts_with('$') {
                    0
                } else {
                    var_bits(s)
                }
            }
            Ix::Lit(_) => 0,
            _ => enode.children().iter().fold(0, |acc, c| acc | g[*c].data.deps),
        };
        let size = enode.fold(1u32, |acc, c| acc.saturating_add(costs(c).size));
        if deps & (ROW | COL) != ROW | COL {
            // Evaluated once per query row or per key (or once): no per-pair work; as a
            // bias term it is one product (term × 1 or 1 × term).
            let rank = if deps & OTHER != 0 { None } else { Some(1) };
            return SepCost { eval: 0.0, rank, size };
        }
        let own = |op: f64, kids: &[Id], costs: &mut C| kids.iter().fold(op, |acc, c| acc + costs(*c).eval);
        let (eval, rank) = match enode {
            Ix::Add([a, b]) | Ix::Sub([a, b]) => {
                let (ca, cb) = (costs(*a), costs(*b));
                (1.0 + ca.eval + cb.eval, ca.rank.zip(cb.rank).map(|(x, y)| x + y))
            }
            Ix::Mul([a, b]) => {
                let (ca, cb) = (costs(*a), costs(*b));
                (1.0 + ca.eval + cb.eval, ca.rank.zip(cb.rank).map(|(x, y)| x * y))
            }
            Ix::Neg(a) => {
                let ca = costs(*a);
                (1.0 + ca.eval, ca.rank)
            }
            Ix::Div([a, b]) => {
                let (ca, cb) = (costs(*a), costs(*b));
                let key_free = !g[*b].data.pair();
                (4.0 + ca.eval + cb.eval, if key_free { ca.rank } else { None })
            }
            Ix::ToFloat(a) => (own(1.0, &[*a], &mut costs), None),
            Ix::Cos(a) | Ix::Sin(a) => (own(12.0, &[*a], &mut costs), None),
            Ix::Leaf(s) => {
                let n: usize = s.as_str().strip_prefix('#').and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
                (g.analysis.opaque.get(n).map_or(1.0, |(e, _, _)| opaque_eval(e).max(1.0)), None)
            }
            Ix::Lit(_) => (0.0, Some(1)),
        };
        SepCost { eval, rank, size }
    }
}

/// Plain size, for simplification: the smallest equal expression.
pub struct SizeCost;

impl CostFunction<Ix> for SizeCost {
    type Cost = usize;
    fn cost<C: FnMut(Id) -> usize>(&mut self, enode: &Ix, mut costs: C) -> usize {
        enode.fold(1, |acc, c| acc.saturating_add(costs(c)))
    }
}

/// The per-pair cost of `e` as written (no rewrites), for reports.
pub fn written_cost(e: &Expr, k: &Kernel) -> SepCost {
    let low = lower(e, k);
    let mut g = Graph::new(low.analysis);
    let root = g.add_expr(&low.expr);
    g.rebuild();
    let ex = Extractor::new(&g, SepCostFn { egraph: &g });
    ex.find_best_cost(root)
}

/// The cheapest equal form of `e` under [`SepCost`], with its cost and the run's stop reason.
pub fn best_separable(e: &Expr, k: &Kernel) -> (Expr, SepCost, String) {
    let sat = saturate(e, k);
    let ex = Extractor::new(&sat.runner.egraph, SepCostFn { egraph: &sat.runner.egraph });
    let (cost, best) = ex.find_best(sat.root);
    let root = Id::from(best.as_ref().len() - 1);
    (raise(&best, root, sat.opaque()), cost, sat.stop_reason())
}

/// The smallest equal form of `e` (constant folding and the identities of [`rules`]).
pub fn simplest(e: &Expr, k: &Kernel) -> Expr {
    let sat = saturate(e, k);
    let ex = Extractor::new(&sat.runner.egraph, SizeCost);
    let (_, best) = ex.find_best(sat.root);
    let root = Id::from(best.as_ref().len() - 1);
    raise(&best, root, sat.opaque())
}
