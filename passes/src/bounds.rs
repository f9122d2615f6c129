//! Index bounds: every tensor element a kernel reads where the reference interpreter reads
//! it lies inside its tensor.
//!
//! - Purpose: the reference refuses an out-of-range index; compiled kernels clamp indices
//!   (so no spec can make them read outside a buffer), which would otherwise be a silently
//!   different answer. A backend runs [`check`] before launching (host-side, cheap next to
//!   attention) and refuses what the reference would refuse.
//! - What is checked, as the reference evaluates it: the mask at every pair; score, bias,
//!   decay, post-map and pointwise map at the pairs the mask keeps; sink logits and branch
//!   weights at rows with a kept key; values where some branch keeps the pair; the gate at
//!   rows with a kept key; derived tensors at every element. A `select` arm is checked where
//!   its condition holds.
//! - Method: interval analysis ([`crate::interval`]) of each index over the whole iteration
//!   box, with the index tensors' data when it reads any (segment ids, permutations, block
//!   lists). An index whose interval lies inside its axis is done. Otherwise the box is
//!   bisected along its widest variable; boxes where the guard (mask, `select` condition) is
//!   false are dropped; at single points the index is exact, and a point where the guard
//!   holds and the index is outside is the [`Violation`] reported (with the data element it
//!   came from). Work is proportional to the boundary between in-range and out-of-range
//!   regions; [`BUDGET`] boxes per access at most.
//! - Limits: a guard that depends on a float computed from scores (`select(s > 0, ...)` in
//!   a map) is unknown before the kernel runs; an index out of range under such a guard is
//!   reported as possibly out of range.

use crate::interval::{eval, Iv, LoadOracle};
use attnc_ir::{BinOp, Bindings, Expr, Kernel, Norm, TensorKind};
use std::collections::BTreeMap;

/// Boxes examined per access before giving up (a few seconds at most).
pub const BUDGET: usize = 1 << 21;

/// An access the reference would refuse.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    /// Where: `branch 0 bias`, `value`, `tensor L`.
    pub context: String,
    pub tensor: String,
    pub axis: usize,
    /// The index expression, infix.
    pub index: String,
    pub len: i64,
    /// The offending value and the point it occurs at (iteration variables).
    pub value: i64,
    pub at: Vec<(String, i64)>,
    /// When the index reads data: the element it read, `perm[0, 3] = 100000000`.
    pub from_data: Option<String>,
    /// The guard could not be decided before the kernel runs (it depends on scores).
    pub only_maybe: bool,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at: Vec<String> = self.at.iter().map(|(v, x)| format!("{v}={x}")).collect();
        write!(
            f,
            "{}: index `{}` of axis {} of `{}` is {} at ({}), outside 0..{}",
            self.context,
            self.index,
            self.axis,
            self.tensor,
            self.value,
            at.join(", "),
            self.len
        )?;
        if let Some(d) = &self.from_data {
            write!(f, " (read from {d})")?;
        }
        if self.only_maybe {
            write!(f, " where its condition may hold (it depends on the scores)")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BoundsError {
    #[error("{0}; the reference refuses this index, so attnc does not run the kernel")]
    OutOfRange(Box<Violation>),
    #[error(
        "{context}: cannot prove that `{tensor}` is indexed in range within {BUDGET} index boxes; the reference interpreter (`--backend reference`) evaluates it exactly"
    )]
    Unverified { context: String, tensor: String },
}

/// One place the kernel evaluates expressions: the variables it runs over (with their
/// ranges) and the condition under which it is evaluated.
struct Site<'k> {
    context: String,
    roots: Vec<&'k Expr>,
    vars: Vec<(String, Iv)>,
    guard: Option<Expr>,
}

/// One tensor access inside a site, with the `select` conditions and reductions around it.
struct Access<'k> {
    tensor: &'k str,
    index: &'k [Expr],
    guards: Vec<Expr>,
    reductions: Vec<(&'k str, &'k Expr, &'k Expr)>,
}

fn accesses<'k>(e: &'k Expr, guards: &mut Vec<Expr>, reds: &mut Vec<(&'k str, &'k Expr, &'k Expr)>, out: &mut Vec<Access<'k>>) {
    match e {
        Expr::Load(t, idx) => {
            out.push(Access { tensor: t, index: idx, guards: guards.clone(), reductions: reds.clone() });
            idx.iter().for_each(|x| accesses(x, guards, reds, out));
        }
        Expr::Select(c, a, b) => {
            accesses(c, guards, reds, out);
            guards.push((**c).clone());
            accesses(a, guards, reds, out);
            guards.pop();
            guards.push(Expr::un(attnc_ir::UnOp::Not, (**c).clone()));
            accesses(b, guards, reds, out);
            guards.pop();
        }
        Expr::Reduce { var, lo, hi, body, .. } => {
            accesses(lo, guards, reds, out);
            accesses(hi, guards, reds, out);
            reds.push((var, lo, hi));
            accesses(body, guards, reds, out);
            reds.pop();
        }
        _ => e.children().into_iter().for_each(|c| accesses(c, guards, reds, out)),
    }
}

fn any_of(masks: Vec<Option<&Expr>>) -> Option<Expr> {
    // No mask in some branch: every pair is kept there.
    let masks: Option<Vec<&Expr>> = masks.into_iter().collect();
    masks?.into_iter().cloned().reduce(|a, b| Expr::bin(BinOp::Or, a, b))
}

/// The sites of the attention part of `k` (every expression but derived tensors').
fn attention_sites<'k>(k: &'k Kernel, dims: &Bindings) -> Vec<Site<'k>> {
    let range = |e: &attnc_ir::Extent| Iv::Int(0, dims.extent(e) - 1);
    let it = &k.iter;
    let v = |n: &str, e: &attnc_ir::Extent| (n.to_string(), range(e));
    let pair = || vec![v("b", &it.b), v("h", &it.h), v("i", &it.i), v("j", &it.j)];
    let any_float = Iv::Float { lo: f64::NEG_INFINITY, hi: f64::INFINITY, nan: true };
    let mut sites = Vec::new();
    for (n, br) in k.branches.iter().enumerate() {
        let ctx = |what: &str| if k.branches.len() > 1 { format!("branch {n} {what}") } else { what.to_string() };
        let mask = br.mask.clone();
        if let Some(m) = &br.mask {
            sites.push(Site { context: ctx("mask"), roots: vec![m], vars: pair(), guard: None });
        }
        let mut kept: Vec<(&str, &Expr)> = vec![("score", &br.score)];
        kept.extend(br.bias.iter().map(|e| ("bias", e)));
        kept.extend(br.decay.iter().map(|e| ("decay", e)));
        // Per row (with j in the box for the guard): evaluated when the row keeps a key.
        kept.extend(br.weight.iter().map(|e| ("weight", e)));
        for (what, e) in kept {
            sites.push(Site { context: ctx(what), roots: vec![e], vars: pair(), guard: mask.clone() });
        }
        match &br.norm {
            Norm::Softmax { sink, post } => {
                if let Some(s) = sink {
                    sites.push(Site { context: ctx("sink"), roots: vec![s], vars: pair(), guard: mask.clone() });
                }
                if let Some(p) = post {
                    let mut vars = pair();
                    vars.push(("w".into(), Iv::Float { lo: 0.0, hi: 1.0, nan: true }));
                    sites.push(Site { context: ctx("post-map"), roots: vec![p], vars, guard: mask.clone() });
                }
            }
            Norm::Map(f) => {
                let mut vars = pair();
                vars.push(("s".into(), any_float));
                sites.push(Site { context: ctx("normalization"), roots: vec![f], vars, guard: mask.clone() });
            }
            Norm::Linear { .. } => {}
        }
    }
    let masks = || any_of(k.branches.iter().map(|b| b.mask.as_ref()).collect());
    let mut full = pair();
    full.push(v("e", &it.e));
    sites.push(Site { context: "value".into(), roots: vec![&k.value], vars: full.clone(), guard: masks() });
    if let Some(g) = &k.gate {
        sites.push(Site { context: "gate".into(), roots: vec![g], vars: full, guard: masks() });
    }
    sites
}

/// The site of derived tensor `name`: every element.
fn tensor_site<'k>(k: &'k Kernel, name: &str, dims: &Bindings) -> Option<Site<'k>> {
    let t = k.tensor(name)?;
    let TensorKind::Derived { vars, def } = &t.kind else { return None };
    let body = match def {
        attnc_ir::TensorDef::Map(e) => e,
        attnc_ir::TensorDef::Cumsum { body, .. } => body,
    };
    let shape = dims.shape(t);
    let vars = vars.iter().zip(&shape).map(|(v, n)| (v.clone(), Iv::Int(0, *n as i64 - 1))).collect();
    Some(Site { context: format!("tensor {name}"), roots: vec![body], vars, guard: None })
}

/// Checks the accesses of derived tensor `name` (before it is computed: `data` knows the
/// tensors it reads).
pub fn check_tensor(k: &Kernel, name: &str, dims: &Bindings, data: &dyn LoadOracle) -> Result<(), BoundsError> {
    match tensor_site(k, name, dims) {
        Some(s) => check_site(k, &s, dims, data),
        None => Ok(()),
    }
}

/// Checks every access of the attention part (after the derived tensors are computed).
pub fn check_attention(k: &Kernel, dims: &Bindings, data: &dyn LoadOracle) -> Result<(), BoundsError> {
    attention_sites(k, dims).iter().try_for_each(|s| check_site(k, s, dims, data))
}

/// Checks everything: derived tensors, then the attention part.
pub fn check(k: &Kernel, dims: &Bindings, data: &dyn LoadOracle) -> Result<(), BoundsError> {
    for t in k.derived() {
        check_tensor(k, &t.name, dims, data)?;
    }
    check_attention(k, dims, data)
}

/// The tensors whose data the check reads: those loaded inside an index, a `select`
/// condition or a mask. None: the check depends on the dims only.
pub fn data_tensors(k: &Kernel) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (_, e) in k.exprs() {
        let mut acc = Vec::new();
        accesses(e, &mut Vec::new(), &mut Vec::new(), &mut acc);
        for a in &acc {
            a.index.iter().chain(&a.guards).for_each(|x| out.extend(x.loads()));
        }
    }
    for b in &k.branches {
        out.extend(b.mask.iter().flat_map(|m| m.loads()));
    }
    out
}

/// Whether the check depends on tensor data (see [`data_tensors`]).
pub fn reads_data(k: &Kernel) -> bool {
    !data_tensors(k).is_empty()
}

fn check_site(k: &Kernel, site: &Site, dims: &Bindings, data: &dyn LoadOracle) -> Result<(), BoundsError> {
    let mut acc = Vec::new();
    for r in &site.roots {
        accesses(r, &mut Vec::new(), &mut Vec::new(), &mut acc);
    }
    for a in &acc {
        let Some(decl) = k.tensor(a.tensor) else { continue };
        let shape = dims.shape(decl);
        for (axis, x) in a.index.iter().enumerate() {
            check_index(site, a, axis, x, shape[axis] as i64, dims, data)?;
        }
    }
    Ok(())
}

fn check_index(site: &Site, a: &Access, axis: usize, x: &Expr, len: i64, dims: &Bindings, data: &dyn LoadOracle) -> Result<(), BoundsError> {
    let d = &dims.dims;
    let mut guards: Vec<&Expr> = site.guard.iter().collect();
    guards.extend(a.guards.iter());
    let nsite = site.vars.len();
    // Only the variables the index, the guards or a reduction's range read are worth
    // splitting (the others do not change the outcome).
    let mut relevant = x.free_vars();
    guards.iter().for_each(|g| relevant.extend(g.free_vars()));
    for (_, lo, hi) in &a.reductions {
        relevant.extend(lo.free_vars());
        relevant.extend(hi.free_vars());
    }
    // A box: the site's variables, then the reductions' (clipped to their ranges there).
    let mut stack: Vec<Vec<(String, Iv)>> = vec![site.vars.clone()];
    let mut budget = BUDGET;
    while let Some(mut vars) = stack.pop() {
        if budget == 0 {
            return Err(BoundsError::Unverified { context: site.context.clone(), tensor: a.tensor.to_string() });
        }
        budget -= 1;
        // Reduction variables: their range in this box (each given, or from lo..hi).
        let mut empty = false;
        for (var, lo, hi) in &a.reductions {
            if vars.iter().any(|(n, _)| n == var) {
                continue;
            }
            match (eval(lo, &mut vars, d, data), eval(hi, &mut vars, d, data)) {
                (Iv::Int(l, _), Iv::Int(_, h)) if l < h => vars.push((var.to_string(), Iv::Int(l, h - 1))),
                (Iv::Int(l, _), Iv::Int(_, h)) if l >= h => empty = true,
                _ => vars.push((var.to_string(), Iv::Unknown)),
            }
        }
        // Where the guards hold: narrow the variables they bound (`r0 < D` of a low-rank
        // channel select, `j <= p` of a causal mask); an empty range means they never hold.
        for g in &guards {
            empty |= !narrow(g, true, &mut vars, d, data);
        }
        if empty {
            continue;
        }
        let mut guard = Iv::bool(true);
        for g in &guards {
            let v = eval(g, &mut vars, d, data);
            guard = match (guard, v) {
                (Iv::Bool { f, t }, Iv::Bool { f: f2, t: t2 }) => Iv::Bool { f: f || f2, t: t && t2 },
                _ => Iv::Bool { f: true, t: true },
            };
        }
        if guard.known_bool() == Some(false) {
            continue;
        }
        let ix = eval(x, &mut vars, d, data);
        if let Iv::Int(lo, hi) = ix {
            if lo >= 0 && hi < len {
                continue;
            }
        }
        // Split the widest integer variable; at a point, decide.
        let widest = vars
            .iter()
            .enumerate()
            .filter_map(|(n, (name, v))| match v {
                Iv::Int(l, h) if h > l && relevant.contains(name) => Some((n, (*h as i128) - (*l as i128))),
                _ => None,
            })
            .max_by_key(|(_, w)| *w);
        match widest {
            Some((n, _)) => {
                let Iv::Int(l, h) = vars[n].1 else { unreachable!("an integer range") };
                let mid = l + (h - l) / 2;
                // The lower half is examined first (a report names the first offending point).
                for part in [Iv::Int(mid + 1, h), Iv::Int(l, mid)] {
                    let mut b = vars.clone();
                    b[n].1 = part;
                    // Splitting a site variable: the reductions' ranges are recomputed from
                    // the smaller box (they may depend on it).
                    if n < nsite {
                        b.truncate(nsite);
                    }
                    stack.push(b);
                }
            }
            None => {
                let Iv::Int(value, _) = ix else {
                    // The index is unknown at a point: it reads data the oracle does not have,
                    // or a float; nothing to report with certainty.
                    return Err(BoundsError::Unverified { context: site.context.clone(), tensor: a.tensor.to_string() });
                };
                let at = vars.iter().filter_map(|(n, v)| if let Iv::Int(p, _) = v { Some((n.clone(), *p)) } else { None }).collect();
                let from_data = match x {
                    Expr::Load(t, idx) => {
                        let pos: Vec<String> = idx
                            .iter()
                            .map(|e| match eval(e, &mut vars, d, data) {
                                Iv::Int(p, q) if p == q => p.to_string(),
                                _ => "?".to_string(),
                            })
                            .collect();
                        Some(format!("`{t}[{}]` = {value}", pos.join(", ")))
                    }
                    _ => None,
                };
                return Err(BoundsError::OutOfRange(Box::new(Violation {
                    context: site.context.clone(),
                    tensor: a.tensor.to_string(),
                    axis,
                    index: attnc_ir::pretty::infix(x),
                    len,
                    value,
                    at,
                    from_data,
                    only_maybe: guard.known_bool() != Some(true),
                })));
            }
        }
    }
    Ok(())
}

/// Narrows the integer ranges in `vars` to where `g` is `want`, for guards made of `and`,
/// `not` and comparisons of a variable with an expression free of it. Returns false when
/// no value in the box satisfies it. Sound: every point where `g == want` stays in the box.
fn narrow(g: &Expr, want: bool, vars: &mut Vec<(String, Iv)>, dims: &BTreeMap<String, i64>, data: &dyn LoadOracle) -> bool {
    match g {
        Expr::Unary(attnc_ir::UnOp::Not, a) => narrow(a, !want, vars, dims, data),
        Expr::Binary(BinOp::And, a, b) if want => narrow(a, true, vars, dims, data) && narrow(b, true, vars, dims, data),
        Expr::Binary(BinOp::Or, a, b) if !want => narrow(a, false, vars, dims, data) && narrow(b, false, vars, dims, data),
        Expr::Binary(op, a, b) if op.is_comparison() => {
            // `v op e`, or `e op v` as `v op' e`.
            let (v, e, op) = match (&**a, &**b) {
                (Expr::Var(v), e) if !e.free_vars().contains(v) => (v, e, *op),
                (e, Expr::Var(v)) if !e.free_vars().contains(v) => (
                    v,
                    e,
                    match op {
                        BinOp::Lt => BinOp::Gt,
                        BinOp::Le => BinOp::Ge,
                        BinOp::Gt => BinOp::Lt,
                        BinOp::Ge => BinOp::Le,
                        other => *other,
                    },
                ),
                _ => return true,
            };
            let op = if want {
                op
            } else {
                match op {
                    BinOp::Lt => BinOp::Ge,
                    BinOp::Le => BinOp::Gt,
                    BinOp::Gt => BinOp::Le,
                    BinOp::Ge => BinOp::Lt,
                    BinOp::Eq => BinOp::Ne,
                    _ => BinOp::Eq,
                }
            };
            let Iv::Int(el, eh) = eval(e, vars, dims, data) else { return true };
            let Some(slot) = vars.iter().rposition(|(n, _)| n == v) else { return true };
            let Iv::Int(lo, hi) = vars[slot].1 else { return true };
            let (lo, hi) = match op {
                BinOp::Lt => (lo, hi.min(eh.saturating_sub(1))),
                BinOp::Le => (lo, hi.min(eh)),
                BinOp::Gt => (lo.max(el.saturating_add(1)), hi),
                BinOp::Ge => (lo.max(el), hi),
                BinOp::Eq => (lo.max(el), hi.min(eh)),
                _ => (lo, hi),
            };
            if lo > hi {
                return false;
            }
            vars[slot].1 = Iv::Int(lo, hi);
            true
        }
        _ => true,
    }
}

/// Exact bounds of data for any box: the elements of small boxes (`inner`), else the
/// tensor's global minimum and maximum (computed once).
pub struct Bounded<'a> {
    pub inner: crate::tiles::DataOracle<'a>,
    global: BTreeMap<String, Iv>,
}

impl<'a> Bounded<'a> {
    pub fn new(inner: crate::tiles::DataOracle<'a>) -> Bounded<'a> {
        let global = inner
            .tensors
            .iter()
            .map(|(n, (_, data, int))| {
                let iv = data.iter().fold(None, |acc: Option<Iv>, &x| {
                    let v = if *int { Iv::point(x as i64) } else { Iv::fpoint(x) };
                    Some(acc.map_or(v, |a| a.join(v)))
                });
                (n.clone(), iv.unwrap_or(Iv::Unknown))
            })
            .collect();
        Bounded { inner, global }
    }
}

impl LoadOracle for Bounded<'_> {
    fn load(&self, tensor: &str, index: &[Iv]) -> Iv {
        match self.inner.load(tensor, index) {
            Iv::Unknown => self.global.get(tensor).copied().unwrap_or(Iv::Unknown),
            v => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interval::NoData;

    fn kernel(value: &str, extra: &str) -> Kernel {
        attnc_ir::parse_kernel(&format!(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D) (dim W)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (input v f32 [B H M D]) (input t f32 [H W]) (input perm i32 [M])
               (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value {value}) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))) {extra} (norm (softmax))))"
        ))
        .expect("kernel")
    }

    fn dims() -> Bindings {
        Bindings { dims: [("B", 1), ("H", 2), ("N", 8), ("M", 8), ("D", 4), ("W", 3)].iter().map(|(a, b)| (a.to_string(), *b)).collect() }
    }

    #[test]
    fn in_range_accesses_pass_at_once() {
        assert_eq!(check(&kernel("(load v b h j e)", ""), &dims(), &NoData), Ok(()));
    }

    #[test]
    fn an_index_past_the_axis_is_refused_with_where() {
        let Err(BoundsError::OutOfRange(v)) = check(&kernel("(load v b h j $M)", ""), &dims(), &NoData) else { panic!("refused") };
        assert_eq!((v.context.as_str(), v.tensor.as_str(), v.axis, v.value, v.len), ("value", "v", 3, 8, 4));
        assert!(!v.only_maybe);
        let shown = v.to_string();
        assert!(shown.contains("index `M` of axis 3 of `v` is 8"), "{shown}");
    }

    /// A relative-position table read only under a window mask: out of range outside the
    /// window, where the reference does not read it.
    #[test]
    fn a_guarded_access_is_checked_where_the_guard_holds() {
        let windowed = "(bias (load t h (+ (- i j) 1))) (mask (and (<= (- i j) 1) (<= (- j i) 1)))";
        assert_eq!(check(&kernel("(load v b h j e)", windowed), &dims(), &NoData), Ok(()));
        // A window of 2 on each side reads index 3 of a 3-wide table.
        let wide = "(bias (load t h (+ (- i j) 1))) (mask (and (<= (- i j) 2) (<= (- j i) 1)))";
        let Err(BoundsError::OutOfRange(v)) = check(&kernel("(load v b h j e)", wide), &dims(), &NoData) else { panic!("refused") };
        assert_eq!((v.context.as_str(), v.value), ("bias", 3));
        // A select arm is checked where its condition holds.
        let sel = "(bias (select (< j 3) (load t h j) 0.0))";
        assert_eq!(check(&kernel("(load v b h j e)", sel), &dims(), &NoData), Ok(()));
    }

    #[test]
    fn an_index_read_from_data_names_the_element() {
        let k = kernel("(load v b h (load perm j) e)", "");
        let perm: Vec<f64> = vec![0.0, 1.0, 2.0, 100000000.0, 4.0, 5.0, 6.0, 7.0];
        let shape = [8usize];
        let data = Bounded::new(crate::tiles::DataOracle::new([("perm".to_string(), (&shape[..], &perm[..], true))].into(), 1 << 14));
        let Err(BoundsError::OutOfRange(v)) = check(&k, &dims(), &data) else { panic!("refused") };
        assert_eq!((v.value, v.from_data.as_deref()), (100000000, Some("`perm[3]` = 100000000")));
        let ok: Vec<f64> = (0..8).rev().map(|x| x as f64).collect();
        let data = Bounded::new(crate::tiles::DataOracle::new([("perm".to_string(), (&shape[..], &ok[..], true))].into(), 1 << 14));
        assert_eq!(check(&k, &dims(), &data), Ok(()));
        assert!(reads_data(&k) && !reads_data(&kernel("(load v b h j e)", "")));
    }
}
