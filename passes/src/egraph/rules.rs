//! The rewrite rules, each directional, with the identity it states and its side
//! conditions. Every rule is checked by evaluating both sides on random inputs with the
//! reference interpreter (`tests/rules.rs`).
//!
//! The rules separate pair terms (those that depend on both the query `i` and the key `j`)
//! into sums of products; they are guarded to pair terms, so they do not grow expressions
//! that have nothing to separate.

use super::{FactsAnalysis, Graph, Ix};
use attnc_ir::Ty;
use egg::{ConditionalApplier, Id, Pattern, Rewrite, Subst, Var};

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

/// A guard on a match: named condition factories above, composed with [`and`].
pub type Guard = fn(&mut Graph, Id, &Subst) -> bool;

/// The type of values a rule rewrites (what the soundness tests instantiate it with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleTy {
    Int,
    Float,
}

/// One rule: name, left-hand side, right-hand side (egg pattern text), guard, and the value
/// type its pattern variables stand for.
pub struct Rule {
    pub name: &'static str,
    pub lhs: &'static str,
    pub rhs: &'static str,
    pub guard: Option<Guard>,
    pub ty: RuleTy,
}

fn pair_a(g: &mut Graph, id: Id, s: &Subst) -> bool {
    is_pair("?a")(g, id, s)
}
fn int_a(g: &mut Graph, id: Id, s: &Subst) -> bool {
    is_int("?a")(g, id, s)
}
fn recip_ok(g: &mut Graph, id: Id, s: &Subst) -> bool {
    not_pair("?c")(g, id, s) && is_float("?c")(g, id, s) && is_pair("?a")(g, id, s)
}

/// The rules, in a fixed order (reproducible runs). Each comment states the identity and
/// its side conditions.
pub const RULES: &[Rule] = &[
    // a - b = a + (-b): exact in floats and (wrapping) ints. Pair terms only.
    Rule { name: "sub-to-add-neg", lhs: "(- ?a ?b)", rhs: "(+ ?a (neg ?b))", guard: Some(lhs_is_pair), ty: RuleTy::Float },
    // (a + b)·c = a·c + b·c: exact in ints; in floats equal up to rounding (one rounding
    // per product instead of one per sum). Pair terms only: it is how a product of a
    // per-head factor and a distance separates into query and key terms.
    Rule { name: "distribute-right", lhs: "(* (+ ?a ?b) ?c)", rhs: "(+ (* ?a ?c) (* ?b ?c))", guard: Some(lhs_is_pair), ty: RuleTy::Float },
    // c·(a + b) = c·a + c·b: as above, with the sum on the right.
    Rule { name: "distribute-left", lhs: "(* ?c (+ ?a ?b))", rhs: "(+ (* ?c ?a) (* ?c ?b))", guard: Some(lhs_is_pair), ty: RuleTy::Float },
    // (-a)·b = -(a·b): exact (sign symmetry of IEEE multiplication).
    Rule { name: "neg-out-of-mul-left", lhs: "(* (neg ?a) ?b)", rhs: "(neg (* ?a ?b))", guard: None, ty: RuleTy::Float },
    // a·(-b) = -(a·b): exact.
    Rule { name: "neg-out-of-mul-right", lhs: "(* ?a (neg ?b))", rhs: "(neg (* ?a ?b))", guard: None, ty: RuleTy::Float },
    // -(a + b) = (-a) + (-b): exact. Pair terms only.
    Rule { name: "neg-over-add", lhs: "(neg (+ ?a ?b))", rhs: "(+ (neg ?a) (neg ?b))", guard: Some(pair_a), ty: RuleTy::Float },
    // -(-a) = a: exact.
    Rule { name: "neg-neg", lhs: "(neg (neg ?a))", rhs: "?a", guard: None, ty: RuleTy::Float },
    // float(a + b) = float(a) + float(b) for integers: exact while |a|, |b|, |a + b| stay
    // below 2^24 (f32) — positions and lengths do.
    Rule { name: "float-over-add", lhs: "(float (+ ?a ?b))", rhs: "(+ (float ?a) (float ?b))", guard: Some(int_a), ty: RuleTy::Int },
    // float(-a) = -float(a): exact.
    Rule { name: "float-over-neg", lhs: "(float (neg ?a))", rhs: "(neg (float ?a))", guard: None, ty: RuleTy::Int },
    // float(a·b) = float(a)·float(b) for integers: exact under the same bound.
    Rule { name: "float-over-mul", lhs: "(float (* ?a ?b))", rhs: "(* (float ?a) (float ?b))", guard: Some(int_a), ty: RuleTy::Int },
    // a / c = a · (1/c) when c is not a pair term (a row or column factor, computed once
    // per row or key): equal up to one rounding.
    Rule { name: "div-to-mul-recip", lhs: "(/ ?a ?c)", rhs: "(* ?a (/ 1.0 ?c))", guard: Some(recip_ok), ty: RuleTy::Float },
    // cos(a + b) = cos a·cos b − sin a·sin b, sin(a + b) = sin a·cos b + cos a·sin b: equal
    // up to a few roundings (each factor within an ulp). Pair terms only: a phase that
    // depends on the query and the key (cosFormer's cos(π/2·(i − j)/M), rotary-style
    // biases) becomes rank 2, a query term times a key term.
    Rule { name: "cos-of-sum", lhs: "(cos (+ ?a ?b))", rhs: "(- (* (cos ?a) (cos ?b)) (* (sin ?a) (sin ?b)))", guard: Some(lhs_is_pair), ty: RuleTy::Float },
    Rule { name: "sin-of-sum", lhs: "(sin (+ ?a ?b))", rhs: "(+ (* (sin ?a) (cos ?b)) (* (cos ?a) (sin ?b)))", guard: Some(lhs_is_pair), ty: RuleTy::Float },
    // cos(−a) = cos a, sin(−a) = −sin a: exact (the functions are even and odd).
    Rule { name: "cos-neg", lhs: "(cos (neg ?a))", rhs: "(cos ?a)", guard: None, ty: RuleTy::Float },
    Rule { name: "sin-neg", lhs: "(sin (neg ?a))", rhs: "(neg (sin ?a))", guard: None, ty: RuleTy::Float },
    // a + 0 = a (ints).
    Rule { name: "add-zero-int", lhs: "(+ ?a 0)", rhs: "?a", guard: None, ty: RuleTy::Int },
    // a + 0.0 = a (floats; -0.0 + 0.0 = +0.0 differs only in the sign of zero).
    Rule { name: "add-zero-float", lhs: "(+ ?a 0.0)", rhs: "?a", guard: None, ty: RuleTy::Float },
    // a·1 = a (ints).
    Rule { name: "mul-one-int", lhs: "(* ?a 1)", rhs: "?a", guard: None, ty: RuleTy::Int },
    // a·1.0 = a (floats, exact).
    Rule { name: "mul-one-float", lhs: "(* ?a 1.0)", rhs: "?a", guard: None, ty: RuleTy::Float },
    // a - 0 = a (ints), a - 0.0 = a (floats): exact.
    Rule { name: "sub-zero-int", lhs: "(- ?a 0)", rhs: "?a", guard: None, ty: RuleTy::Int },
    Rule { name: "sub-zero-float", lhs: "(- ?a 0.0)", rhs: "?a", guard: None, ty: RuleTy::Float },
    // a / 1.0 = a: exact.
    Rule { name: "div-one", lhs: "(/ ?a 1.0)", rhs: "?a", guard: None, ty: RuleTy::Float },
];

impl Rule {
    /// The egg rewrite.
    pub fn rewrite(&self) -> Rewrite<Ix, FactsAnalysis> {
        let lhs: Pattern<Ix> = self.lhs.parse().expect("rule left-hand side parses");
        let rhs: Pattern<Ix> = self.rhs.parse().expect("rule right-hand side parses");
        match self.guard {
            Some(g) => Rewrite::new(self.name, lhs, ConditionalApplier { condition: g, applier: rhs }),
            None => Rewrite::new(self.name, lhs, rhs),
        }
        .expect("a well-formed rule")
    }
}

/// Every rule as an egg rewrite, in table order.
pub fn all() -> Vec<Rewrite<Ix, FactsAnalysis>> {
    RULES.iter().map(Rule::rewrite).collect()
}
