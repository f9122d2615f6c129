//! The rewrite rules, each directional, with the identity it states and its side
//! conditions. Every rule is checked by evaluating both sides on random inputs with the
//! reference interpreter (`tests/rules.rs`).
//!
//! The rules separate pair terms (those that depend on both the query `i` and the key `j`)
//! into sums of products; they are guarded to pair terms, so they do not grow expressions
//! that have nothing to separate.

use super::{FactsAnalysis, Graph, Ix};
use attnc_ir::Ty;
use egg::{rewrite, Id, Rewrite, Subst, Var};

/// `?x` depends on both the query index `i` and the key index `j`.
fn is_pair(x: &'static str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let v: Var = x.parse().expect("pattern variable");
    move |g, _, s| g[s[v]].data.pair()
}

/// The matched class (the left-hand side) is a pair term.
fn lhs_is_pair(g: &mut Graph, id: Id, _: &Subst) -> bool {
    g[id].data.pair()
}

/// `?x` does not depend on the key index `j` and the query index `i` together.
fn not_pair(x: &'static str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let v: Var = x.parse().expect("pattern variable");
    move |g, _, s| !g[s[v]].data.pair()
}

/// `?x` is an integer (so `float` of it is exact while |x| < 2^24 in f32, 2^53 in f64:
/// positions and lengths in attention are far below that).
fn is_int(x: &'static str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let v: Var = x.parse().expect("pattern variable");
    move |g, _, s| g[s[v]].data.ty == Ty::Int
}

fn is_float(x: &'static str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let v: Var = x.parse().expect("pattern variable");
    move |g, _, s| g[s[v]].data.ty == Ty::Float
}

/// Every rule, in a fixed order (reproducible runs).
pub fn all() -> Vec<Rewrite<Ix, FactsAnalysis>> {
    vec![
        // a - b = a + (-b): exact in floats and (wrapping) ints. Pair terms only.
        rewrite!("sub-to-add-neg"; "(- ?a ?b)" => "(+ ?a (neg ?b))" if lhs_is_pair),
        // (a + b)·c = a·c + b·c: exact in ints; in floats equal up to rounding (one rounding
        // per product instead of one per sum). Pair terms only: it is how a product of a
        // per-head factor and a distance separates into query and key terms.
        rewrite!("distribute-right"; "(* (+ ?a ?b) ?c)" => "(+ (* ?a ?c) (* ?b ?c))" if lhs_is_pair),
        // c·(a + b) = c·a + c·b: as above, with the sum on the right.
        rewrite!("distribute-left"; "(* ?c (+ ?a ?b))" => "(+ (* ?c ?a) (* ?c ?b))" if lhs_is_pair),
        // (-a)·b = -(a·b): exact (sign symmetry of IEEE multiplication).
        rewrite!("neg-out-of-mul-left"; "(* (neg ?a) ?b)" => "(neg (* ?a ?b))"),
        // a·(-b) = -(a·b): exact.
        rewrite!("neg-out-of-mul-right"; "(* ?a (neg ?b))" => "(neg (* ?a ?b))"),
        // -(a + b) = (-a) + (-b): exact. Pair terms only.
        rewrite!("neg-over-add"; "(neg (+ ?a ?b))" => "(+ (neg ?a) (neg ?b))" if is_pair("?a")),
        // -(-a) = a: exact.
        rewrite!("neg-neg"; "(neg (neg ?a))" => "?a"),
        // float(a + b) = float(a) + float(b) for integers: exact while |a|, |b|, |a + b| stay
        // below 2^24 (f32) — positions and lengths do.
        rewrite!("float-over-add"; "(float (+ ?a ?b))" => "(+ (float ?a) (float ?b))" if is_int("?a")),
        // float(-a) = -float(a): exact.
        rewrite!("float-over-neg"; "(float (neg ?a))" => "(neg (float ?a))"),
        // float(a·b) = float(a)·float(b) for integers: exact under the same bound.
        rewrite!("float-over-mul"; "(float (* ?a ?b))" => "(* (float ?a) (float ?b))" if is_int("?a")),
        // a / c = a · (1/c) when c is not a pair term (a row or column factor, computed once
        // per row or key): equal up to one rounding.
        rewrite!("div-to-mul-recip"; "(/ ?a ?c)" => "(* ?a (/ 1.0 ?c))" if not_pair("?c") if is_float("?c") if is_pair("?a")),
        // a + 0 = a (ints).
        rewrite!("add-zero-int"; "(+ ?a 0)" => "?a"),
        // a + 0.0 = a (floats; -0.0 + 0.0 = +0.0 differs only in the sign of zero).
        rewrite!("add-zero-float"; "(+ ?a 0.0)" => "?a"),
        // a·1 = a (ints).
        rewrite!("mul-one-int"; "(* ?a 1)" => "?a"),
        // a·1.0 = a (floats, exact).
        rewrite!("mul-one-float"; "(* ?a 1.0)" => "?a"),
        // a - 0 = a.
        rewrite!("sub-zero-int"; "(- ?a 0)" => "?a"),
        rewrite!("sub-zero-float"; "(- ?a 0.0)" => "?a"),
        // a / 1.0 = a: exact.
        rewrite!("div-one"; "(/ ?a 1.0)" => "?a"),
    ]
}

/// Rule names (for reports and the soundness tests).
pub fn names() -> Vec<String> {
    all().iter().map(|r| r.name.to_string()).collect()
}
