//! Separable structure of pair expressions: channel reductions that are dots of a query
//! feature and a key feature, and sums of (query term) × (key term) products.
//!
//! Both the tiled CPU kernel (which runs the dot as a matmul) and the rewrites (which move
//! low-rank biases and per-row factors into the dot) read these shapes.

use crate::interval::{eval, Iv, NoData};
use attnc_ir::{BinOp, Expr, Kernel, RedOp, UnOp};
use std::collections::BTreeMap;

/// A separable channel reduction `Σ_{r < len} a · b`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dot {
    /// Query-side factor, a function of `b h i` and `r`.
    pub a: Expr,
    /// Key-side factor, a function of `b h j` and `r`.
    pub b: Expr,
    pub r: String,
    /// Channel count (a dim expression).
    pub len: Expr,
}

impl Dot {
    pub fn to_expr(&self) -> Expr {
        Expr::Reduce {
            op: RedOp::Sum,
            var: self.r.clone(),
            lo: Box::new(Expr::Int(0)),
            hi: Box::new(self.len.clone()),
            body: Box::new(Expr::bin(BinOp::Mul, self.a.clone(), self.b.clone())),
        }
    }
}

/// Which of the query index `i` and the key index `j` an expression reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Neither (a per-head or per-batch value, a constant).
    Uniform,
    /// `i`, not `j`: evaluated once per query row.
    Query,
    /// `j`, not `i`: evaluated once per key.
    Key,
    /// Both: per-pair work.
    Pair,
}

pub fn side(e: &Expr) -> Side {
    let fv = e.free_vars();
    match (fv.contains("i"), fv.contains("j")) {
        (false, false) => Side::Uniform,
        (true, false) => Side::Query,
        (false, true) => Side::Key,
        (true, true) => Side::Pair,
    }
}

/// Whether `e` reads no free variable but the iteration indices `b h i j`.
pub fn only_pair_indices(e: &Expr) -> bool {
    e.free_vars().iter().all(|v| matches!(v.as_str(), "b" | "h" | "i" | "j"))
}

/// Whether `e` contains a reduction.
pub fn has_reduction(e: &Expr) -> bool {
    let mut found = false;
    e.walk(&mut |x| found |= matches!(x, Expr::Reduce { .. }));
    found
}

/// The placeholder for the extracted dot in the rest of a score.
pub const DOT: &str = attnc_ir::DOT_VAR;

fn no(e: &Expr, v: &str) -> bool {
    !e.free_vars().contains(v)
}

/// `Σ_{r<len} A·B` with `A` free of `j` and `B` free of `i`.
pub fn as_dot(e: &Expr) -> Option<Dot> {
    let Expr::Reduce { op: RedOp::Sum, var, lo, hi, body } = e else { return None };
    if **lo != Expr::Int(0) || !hi.free_vars().is_empty() || !hi.loads().is_empty() {
        return None;
    }
    let Expr::Binary(BinOp::Mul, a, b) = &**body else { return None };
    let (a, b) = if no(a, "j") && no(b, "i") {
        (a, b)
    } else if no(b, "j") && no(a, "i") {
        (b, a)
    } else {
        return None;
    };
    if no(a, var) || no(b, var) {
        return None;
    }
    Some(Dot { a: (**a).clone(), b: (**b).clone(), r: var.clone(), len: (**hi).clone() })
}

/// Replaces the first separable reduction in `e` (outermost first) by [`DOT`].
pub fn extract(e: &Expr, found: &mut Option<Dot>) -> Expr {
    if found.is_none() {
        if let Some(d) = as_dot(e) {
            *found = Some(d);
            return Expr::var(DOT);
        }
    }
    if let Expr::Reduce { .. } = e {
        return e.clone();
    }
    e.map_children(&mut |c| extract(c, found))
}

/// One product of a sum of products: `u(b, h, i) · w(b, h, j)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub u: Expr,
    pub w: Expr,
}

/// At most this many products before merging (expansion of products of sums is quadratic).
const MAX_TERMS: usize = 64;

/// Splits `e` into a sum of [`Term`]s, or `None` when some product has a factor that
/// depends on both `i` and `j` (or on `s`, `w`, a reduction variable). Products of sums
/// that depend on both are expanded; terms with equal key factors (or equal query factors)
/// are merged, so the result's length is the rank it needs. `e` must be float-typed.
pub fn sum_of_products(e: &Expr) -> Option<Vec<Term>> {
    let terms = expand(e)?;
    let mut out: Vec<Term> = Vec::new();
    for (neg, factors) in terms {
        let (mut u, mut w) = (Vec::new(), Vec::new());
        for f in factors {
            if !only_pair_indices(&f) {
                return None;
            }
            match side(&f) {
                Side::Pair => return None,
                Side::Key => w.push(f),
                Side::Query | Side::Uniform => u.push(f),
            }
        }
        let mul = |fs: Vec<Expr>| fs.into_iter().reduce(|a, b| Expr::bin(BinOp::Mul, a, b)).unwrap_or(Expr::float(1.0));
        let mut u = mul(u);
        if neg {
            u = Expr::un(UnOp::Neg, u);
        }
        let w = mul(w);
        if let Some(t) = out.iter_mut().find(|t| t.w == w) {
            t.u = Expr::bin(BinOp::Add, t.u.clone(), u);
        } else if let Some(t) = out.iter_mut().find(|t| t.u == u) {
            t.w = Expr::bin(BinOp::Add, t.w.clone(), w);
        } else {
            out.push(Term { u, w });
        }
    }
    Some(out)
}

fn pair(e: &Expr) -> bool {
    let fv = e.free_vars();
    fv.contains("i") && fv.contains("j")
}

type Products = Vec<(bool, Vec<Expr>)>;

/// `e` as a signed sum of products of factors; sums inside pair-dependent products are
/// distributed. `None` past [`MAX_TERMS`].
fn expand(e: &Expr) -> Option<Products> {
    let negate = |v: Products| -> Products { v.into_iter().map(|(n, f)| (!n, f)).collect() };
    let out: Products = match e {
        _ if !pair(e) => vec![(false, vec![e.clone()])],
        Expr::Binary(BinOp::Add, a, b) => [expand(a)?, expand(b)?].concat(),
        Expr::Binary(BinOp::Sub, a, b) => [expand(a)?, negate(expand(b)?)].concat(),
        Expr::Unary(UnOp::Neg, a) => negate(expand(a)?),
        Expr::Binary(BinOp::Mul, a, b) => {
            let (ta, tb) = (expand(a)?, expand(b)?);
            if ta.len() * tb.len() > MAX_TERMS {
                return None;
            }
            let mut v = Vec::new();
            for (na, fa) in &ta {
                for (nb, fb) in &tb {
                    v.push((na != nb, [fa.clone(), fb.clone()].concat()));
                }
            }
            v
        }
        Expr::Binary(BinOp::Div, a, c) if !pair(c) => {
            let inv = Expr::bin(BinOp::Div, Expr::float(1.0), (**c).clone());
            let mut v = expand(a)?;
            v.iter_mut().for_each(|(_, f)| f.push(inv.clone()));
            v
        }
        other => vec![(false, vec![other.clone()])],
    };
    (out.len() <= MAX_TERMS).then_some(out)
}

/// Factors of a product (and the sign of its negations); `x / c` is `x · (1/c)`.
pub(crate) fn flatten_product(e: &Expr, neg: &mut bool, out: &mut Vec<Expr>) {
    match e {
        Expr::Binary(BinOp::Mul, a, b) => {
            flatten_product(a, neg, out);
            flatten_product(b, neg, out);
        }
        Expr::Unary(UnOp::Neg, a) => {
            *neg = !*neg;
            flatten_product(a, neg, out);
        }
        Expr::Binary(BinOp::Div, a, c) => {
            flatten_product(a, neg, out);
            // x / (f·g) = x · (1/f) · (1/g): each divisor factor inverted on its own, so a
            // query factor and a key factor of the divisor separate.
            let mut divs = Vec::new();
            flatten_product(c, neg, &mut divs);
            out.extend(divs.into_iter().map(|f| Expr::bin(BinOp::Div, Expr::float(1.0), f)));
        }
        other => out.push(other.clone()),
    }
}

/// `rest` (a score with its dot replaced by [`DOT`]) as `DOT · f`: `Some(f)` when the rest is
/// the dot times or divided by factors free of `j` (`f = 1.0` for the dot alone).
pub fn row_factor(rest: &Expr) -> Option<Expr> {
    let d = Expr::var(DOT);
    if *rest == d {
        return Some(Expr::float(1.0));
    }
    let free = |c: &Expr| !c.free_vars().contains("j") && !c.free_vars().contains(DOT);
    match rest {
        Expr::Binary(BinOp::Mul, a, c) if **a == d && free(c) => Some((**c).clone()),
        Expr::Binary(BinOp::Mul, c, a) if **a == d && free(c) => Some((**c).clone()),
        Expr::Binary(BinOp::Div, a, c) if **a == d && free(c) => Some(Expr::bin(BinOp::Div, Expr::float(1.0), (**c).clone())),
        _ => None,
    }
}

/// Whether a factor `f` of a score `Σ_r x·y · f` can move into the dot's operand `x`
/// (`Σ_r (x·f)·y`) without changing the result beyond rounding, infinities and NaN
/// included: true when `f` is finite and nonzero for every shape and index (interval
/// analysis with dims in `[1, 2^48]`: a scale `1/sqrt(D)`), or when `f` is `1/‖x‖`, the
/// reciprocal of a hoisted norm of `x` itself (a zero norm comes with a zero `x` and an
/// infinite one with an infinite `x`, so both forms are NaN there). An infinite factor
/// would turn `0·f` into NaN where `dot·f` is an infinity (`dot / sqrt(hk)` with `hk = 0`),
/// a zero one would hide an infinite dot.
pub fn fold_exact(k: &Kernel, f: &Expr, operand: &Expr, r: &str) -> bool {
    if is_norm_reciprocal(k, f, operand, r) {
        return true;
    }
    let big = 1i64 << 48;
    let mut vars: Vec<(String, Iv)> = k.dims.iter().map(|d| (format!("${}", d.name), Iv::Int(1, big))).collect();
    vars.extend(["b", "h", "i", "j", "e"].map(|v| (v.to_string(), Iv::Int(0, big))));
    let dims_as_vars = subst_dims(f);
    match eval(&dims_as_vars, &mut vars, &BTreeMap::new(), &NoData) {
        Iv::Float { lo, hi, nan: false } => lo.is_finite() && hi.is_finite() && (lo > 0.0 || hi < 0.0),
        Iv::Int(lo, hi) => lo > 0 || hi < 0,
        _ => false,
    }
}

/// `e` with every dim `D` read as the variable `$D`.
fn subst_dims(e: &Expr) -> Expr {
    match e {
        Expr::Dim(d) => Expr::var(&format!("${d}")),
        _ => e.map_children(&mut subst_dims),
    }
}

/// `f` is `1 / T[idx]` where derived tensor `T[v…] = sqrt(Σ_s x'·x')` and `x'` at `v… = idx`,
/// `s = r` is `operand`.
fn is_norm_reciprocal(k: &Kernel, f: &Expr, operand: &Expr, r: &str) -> bool {
    let Expr::Binary(BinOp::Div, one, t) = f else { return false };
    if **one != Expr::float(1.0) {
        return false;
    }
    let Expr::Load(name, idx) = &**t else { return false };
    let Some(decl) = k.tensor(name) else { return false };
    let attnc_ir::TensorKind::Derived { vars, def: attnc_ir::TensorDef::Map(body) } = &decl.kind else { return false };
    let Expr::Unary(UnOp::Sqrt, sum) = body else { return false };
    let Expr::Reduce { op: RedOp::Sum, var, body: sq, .. } = &**sum else { return false };
    let Expr::Binary(BinOp::Mul, x1, x2) = &**sq else { return false };
    if x1 != x2 || vars.len() != idx.len() {
        return false;
    }
    let mut x = (**x1).clone();
    // Rename the tensor's variables through fresh names first (the index may reuse them).
    for (n, v) in vars.iter().enumerate() {
        x = x.subst(v, &Expr::var(&format!("#{n}")));
    }
    for (n, e) in idx.iter().enumerate() {
        x = x.subst(&format!("#{n}"), e);
    }
    x.subst(var, &Expr::var(r)) == *operand
}

/// A score's factors around its dot (the dot itself stands for [`DOT`]): query-side and
/// uniform ones, key-side ones, and those that depend on both.
pub struct ScoreFactors {
    pub dot: Dot,
    pub neg: bool,
    pub rows: Vec<Expr>,
    pub cols: Vec<Expr>,
    pub pairs: Vec<Expr>,
}

/// `score` as `±dot · Π factors`, each factor classified by the side it depends on; `None`
/// without exactly one dot, or with a factor that holds a reduction or an index other than
/// the pair's.
pub fn score_factors(score: &Expr) -> Option<ScoreFactors> {
    let mut found = None;
    let rest = extract(score, &mut found);
    let dot = found?;
    let (mut neg, mut factors) = (false, Vec::new());
    flatten_product(&rest, &mut neg, &mut factors);
    let (mut rows, mut cols, mut pairs, mut dots) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for f in factors {
        if f == Expr::var(DOT) {
            dots += 1;
            continue;
        }
        if has_reduction(&f) || !only_pair_indices(&f) {
            return None;
        }
        match side(&f) {
            Side::Pair => pairs.push(f),
            Side::Key => cols.push(f),
            Side::Query | Side::Uniform => rows.push(f),
        }
    }
    (dots == 1).then_some(ScoreFactors { dot, neg, rows, cols, pairs })
}
