//! Hoisting: reductions in a score that depend on the query row only (or on the key only)
//! become derived tensors, computed once per row (per key) instead of once per pair.
//!
//! - Purpose: cosine attention divides by `norm(q_i) · norm(k_j)`; each norm is a reduction
//!   over the head dim. As tensors `[B, H, N]` and `[B, H, M]` they cost O(N·D) once.
//! - Precondition: a verified kernel.
//! - Postcondition: no maximal subexpression of a branch score that contains a reduction,
//!   depends on exactly one of `i`, `j` (plus `b`, `h`) and reads no other variable is left
//!   in the score; each became a load of a new derived tensor with the same values.
//! - Limits: only scores (bias, decay and masks are classified or evaluated per tile);
//!   the tensors are per query head (GQA kv heads are not deduplicated).

use crate::separable::{has_reduction, only_pair_indices, side, Side};
use crate::{add_derived, fresh_tensor, Applied};
use attnc_ir::{DType, Expr, Kernel, TensorDecl, TensorDef, TensorKind};

/// A subexpression to hoist: depends on `b h` and exactly one of `i`/`j`, contains a reduction.
fn hoistable(e: &Expr) -> Option<&'static str> {
    if !only_pair_indices(e) || !has_reduction(e) {
        return None;
    }
    match side(e) {
        Side::Query => Some("i"),
        Side::Key => Some("j"),
        Side::Uniform | Side::Pair => None,
    }
}

struct Hoister<'k> {
    k: Kernel,
    orig: &'k Kernel,
    log: Vec<Applied>,
}

impl Hoister<'_> {
    fn visit(&mut self, e: &Expr) -> Expr {
        if let Some(axis) = hoistable(e) {
            let name = fresh_tensor(&self.k, if axis == "i" { "__row" } else { "__key" });
            let ext = if axis == "i" { self.orig.iter.i.clone() } else { self.orig.iter.j.clone() };
            let vars = vec!["x0".to_string(), "x1".to_string(), "x2".to_string()];
            let body = rename(e, &[("b", "x0"), ("h", "x1"), (axis, "x2")]);
            let decl = TensorDecl {
                name: name.clone(),
                dtype: DType::F32,
                shape: vec![self.orig.iter.b.clone(), self.orig.iter.h.clone(), ext],
                kind: TensorKind::Derived { vars, def: TensorDef::Map(body) },
            };
            add_derived(&mut self.k, decl);
            self.log.push(Applied {
                pass: "hoist",
                what: format!("`{}` (per {}) is computed once into `{name}`", attnc_ir::pretty::infix(e), if axis == "i" { "query row" } else { "key" }),
                cost: None,
            });
            return Expr::Load(name, vec![Expr::var("b"), Expr::var("h"), Expr::var(axis)]);
        }
        if let Expr::Reduce { .. } = e {
            return e.clone();
        }
        e.map_children(&mut |c| self.visit(c))
    }
}

/// Renames free variables (targets are fresh: `x0 x1 x2` are not used by lowered specs
/// outside derived tensors, and reduction variables are `r0, r1, …`).
pub(crate) fn rename(e: &Expr, map: &[(&str, &str)]) -> Expr {
    // Two steps through placeholders, so a swap like b→x0, x0→… cannot capture.
    let mut out = e.clone();
    for (n, (from, _)) in map.iter().enumerate() {
        out = out.subst(from, &Expr::var(&format!("__tmp{n}")));
    }
    for (n, (_, to)) in map.iter().enumerate() {
        out = out.subst(&format!("__tmp{n}"), &Expr::var(to));
    }
    out
}

pub fn run(k: &Kernel) -> Option<(Kernel, Vec<Applied>)> {
    let mut h = Hoister { k: k.clone(), orig: k, log: Vec::new() };
    for n in 0..k.branches.len() {
        let s = h.visit(&k.branches[n].score);
        h.k.branches[n].score = s;
    }
    (!h.log.is_empty()).then_some((h.k, h.log))
}
