//! Soundness of every e-graph rule: random instances of its left-hand side, the rule applied
//! by egg (guard included), and both sides evaluated by the reference interpreter's
//! expression evaluator at random indices on random data. Equal within f64 rounding.

use attnc_ir::reference::{ExprEval, Scalar, Tensor};
use attnc_ir::{Bindings, Expr, Kernel, Ty};
use attnc_passes::egraph::rules::{RuleTy, RULES};
use attnc_passes::egraph::{deps_of, raise, FactsAnalysis, Graph, Ix};
use egg::{Id, RecExpr};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// A fixed seed, as the root crate's property tests (`tests/common/mod.rs`): CI runs what
/// the submission ran; `ATTNC_FUZZ_CASES` scales the cases, `ATTNC_FUZZ_SEED` explores.
fn config(default_cases: u32) -> ProptestConfig {
    let scale: f64 = std::env::var("ATTNC_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let seed = std::env::var("ATTNC_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_a77c);
    let cases = ((default_cases as f64 * scale) as u32).max(1);
    ProptestConfig { cases, rng_seed: proptest::test_runner::RngSeed::Fixed(seed), failure_persistence: None, ..ProptestConfig::default() }
}

fn kernel() -> Kernel {
    attnc_ir::parse_kernel(
        "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
           (input q f32 [B H N D]) (input k f32 [B H M D]) (input slope f32 [H]) (input ids i32 [N]) (output o f32 [B H N D])
           (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e)
           (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))) (norm (softmax))))",
    )
    .expect("kernel")
}

/// The opaque leaves the instances may use: `#0` = slope[h] (float), `#1` = ids[i] (int).
fn opaque() -> Vec<(Expr, Ty, u8)> {
    let slope = Expr::Load("slope".into(), vec![Expr::var("h")]);
    let ids = Expr::Load("ids".into(), vec![Expr::var("i")]);
    vec![(slope.clone(), Ty::Float, deps_of(&slope)), (ids.clone(), Ty::Int, deps_of(&ids))]
}

const INTS: &[&str] = &["i", "j", "h", "$N", "3", "-2", "(- i j)", "(* 2 j)", "(+ i $M)", "#1", "(- #1 j)"];
const FLOATS: &[&str] = &[
    "(float i)",
    "(float j)",
    "0.5",
    "-1.25",
    "#0",
    "(* #0 (float (- i j)))",
    "(- (float j) 2.25)",
    "(+ (float i) (float j))",
    "(* (neg #0) (float i))",
    "(/ (float j) 3.0)",
];

fn instance(pattern: &str, pool: &[&str], pick: &[usize]) -> String {
    let mut s = pattern.to_string();
    for (n, v) in ["?a", "?b", "?c"].iter().enumerate() {
        s = s.replace(v, pool[pick[n] % pool.len()]);
    }
    s
}

fn eval(ev: &ExprEval, e: &Expr, i: i64, j: i64, h: i64) -> Scalar {
    ev.eval(e, &[("b", Scalar::Int(0)), ("h", Scalar::Int(h)), ("i", Scalar::Int(i)), ("j", Scalar::Int(j))]).expect("evaluates")
}

fn close(a: &Scalar, b: &Scalar) -> bool {
    match (a, b) {
        (Scalar::Int(x), Scalar::Int(y)) => x == y,
        (Scalar::Float(x), Scalar::Float(y)) => x == y || (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-9 * (1.0 + x.abs().max(y.abs())),
        _ => false,
    }
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn every_rule_preserves_values(pick in proptest::collection::vec(0usize..64, 3), pts in proptest::collection::vec((0i64..9, 0i64..11, 0i64..3), 6), seed in 0u64..1000) {
        let k = kernel();
        let dims = Bindings { dims: [("B", 1), ("H", 3), ("N", 9), ("M", 11), ("D", 2)].iter().map(|(a, b)| (a.to_string(), *b)).collect() };
        let mut inputs = BTreeMap::new();
        let r = |n: u64| (seed.wrapping_mul(6364136223846793005).wrapping_add(n.wrapping_mul(1442695040888963407)) >> 33) as f64 / (1u64 << 31) as f64;
        inputs.insert("slope".to_string(), Tensor::new(vec![3], (0..3).map(|n| r(n) * 2.0 - 1.0).collect()));
        inputs.insert("ids".to_string(), Tensor::new(vec![9], (0..9).map(|n| (r(10 + n) * 7.0).floor() - 3.0).collect()));
        inputs.insert("q".to_string(), Tensor::new(vec![1, 3, 9, 2], vec![0.0; 54]));
        inputs.insert("k".to_string(), Tensor::new(vec![1, 3, 11, 2], vec![0.0; 66]));
        let ev = ExprEval::new(&k, &dims, &inputs).unwrap_or_else(|e| panic!("evaluator: {e}"));
        for rule in RULES {
            let pool = if rule.ty == RuleTy::Int { INTS } else { FLOATS };
            let lhs: RecExpr<Ix> = instance(rule.lhs, pool, &pick).parse().expect("lhs instance parses");
            let rhs: RecExpr<Ix> = instance(rule.rhs, pool, &pick).parse().expect("rhs instance parses");
            let mut g = Graph::new(FactsAnalysis { opaque: opaque() });
            let root = g.add_expr(&lhs);
            g.rebuild();
            let rw = rule.rewrite();
            let matches = rw.search(&g);
            rw.apply(&mut g, &matches);
            g.rebuild();
            let applied = g.lookup_expr(&rhs).is_some_and(|id| g.find(id) == g.find(root));
            if !applied {
                continue; // the guard refused this instance
            }
            let (le, re) = (raise(&lhs, Id::from(lhs.as_ref().len() - 1), &opaque()), raise(&rhs, Id::from(rhs.as_ref().len() - 1), &opaque()));
            for &(i, j, h) in &pts {
                let (a, b) = (eval(&ev, &le, i, j, h), eval(&ev, &re, i, j, h));
                prop_assert!(close(&a, &b), "rule {}: {} = {:?} but {} = {:?} at i={i} j={j} h={h}", rule.name, lhs, a, rhs, b);
            }
        }
    }
}

/// Every rule fires on some instance of the pools (so the property above tests each one).
#[test]
fn every_rule_applies_somewhere() {
    for rule in RULES {
        let pool = if rule.ty == RuleTy::Int { INTS } else { FLOATS };
        let mut fired = false;
        'search: for a in 0..pool.len() {
            for b in 0..pool.len() {
                for c in [0, 5, 6] {
                    let lhs: RecExpr<Ix> = instance(rule.lhs, pool, &[a, b, c]).parse().unwrap();
                    let mut g = Graph::new(FactsAnalysis { opaque: opaque() });
                    g.add_expr(&lhs);
                    g.rebuild();
                    let rw = rule.rewrite();
                    let m = rw.search(&g);
                    if !rw.apply(&mut g, &m).is_empty() {
                        fired = true;
                        break 'search;
                    }
                }
            }
        }
        assert!(fired, "rule {} never fires on the test pools", rule.name);
    }
}
