//! Property tests: the IR text form round-trips for random expressions, and the parser and
//! checker never panic, whatever the input.

use attnc::ir::{self, BinOp, Expr, RedOp, UnOp};
use proptest::prelude::*;
mod common;

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        any::<i32>().prop_map(|n| Expr::Int(n as i64)),
        prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e-300)].prop_map(Expr::float),
        any::<bool>().prop_map(Expr::Bool),
        prop::sample::select(vec!["b", "h", "i", "j", "e", "r0", "x1"]).prop_map(Expr::var),
        prop::sample::select(vec!["N", "M", "D", "Dv"]).prop_map(Expr::dim),
    ]
}

fn expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(5, 48, 4, |inner| {
        prop_oneof![
            (prop::sample::select(UnOp::ALL.to_vec()), inner.clone()).prop_map(|(op, a)| Expr::un(op, a)),
            (prop::sample::select(BinOp::ALL.to_vec()), inner.clone(), inner.clone()).prop_map(|(op, a, b)| Expr::bin(op, a, b)),
            (inner.clone(), inner.clone(), inner.clone()).prop_map(|(c, a, b)| Expr::select(c, a, b)),
            (prop::sample::select(vec!["q", "k", "rank"]), prop::collection::vec(inner.clone(), 0..4)).prop_map(|(t, idx)| Expr::Load(t.to_string(), idx)),
            (prop::sample::select(RedOp::ALL.to_vec()), inner.clone(), inner.clone(), inner).prop_map(|(op, lo, hi, body)| Expr::Reduce {
                op,
                var: "r1".into(),
                lo: Box::new(lo),
                hi: Box::new(hi),
                body: Box::new(body)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(common::proptest_config(512))]

    #[test]
    fn expr_text_round_trips(e in expr()) {
        let text = e.to_string();
        let back = ir::parse_expr(&text).map_err(|err| TestCaseError::fail(format!("{err}: {text}")))?;
        prop_assert_eq!(back, e);
    }

    /// A whole kernel with random expressions in every slot round-trips too.
    #[test]
    fn kernel_text_round_trips(score in expr(), mask in expr(), gate in expr(), eps in 0.0f64..1.0) {
        let mut k = attnc::dsl::compile(include_str!("../examples/sink_softmax.attn")).expect("example").kernel;
        k.branches[0].score = score;
        k.branches[0].mask = Some(mask);
        k.branches.push(ir::Branch { score: Expr::Int(1), bias: None, mask: None, norm: ir::Norm::Linear { eps: ir::F64(eps) }, decay: None, weight: None });
        k.gate = Some(gate);
        let text = k.to_string();
        let back = ir::parse_kernel(&text).map_err(|err| TestCaseError::fail(format!("{err}: {text}")))?;
        prop_assert_eq!(back, k);
    }

    /// Arbitrary bytes: the parser and checker return, never panic.
    #[test]
    fn compile_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let src = String::from_utf8_lossy(&bytes);
        let _ = attnc::dsl::compile(&src);
    }

    /// Random token soup inside a spec body: the checker sees syntactically plausible input.
    #[test]
    fn compile_never_panics_on_tokens(toks in prop::collection::vec(prop::sample::select(vec![
        "dims", "B", "H", "N", "M", "D", ",", "input", "output", "q", "k", "v", "o", ":", "f32", "i32", "[", "]",
        "score", "mask", "bias", "value", "out", "gate", "normalize", "=", "dot", "(", ")", "b", "h", "i", "j", "e", "p",
        "+", "-", "*", "/", "//", "%", "**", "<=", "==", "&&", "||", "!", "1", "0", "2.5", "softmax", "sum", "<", "in", "..",
        "let", "fn", "x", "tensor", "require", "range", "j", "branch", "{", "}", "weight", "sqrt", "exp", "select", "s", "w", "map", "cumsum", "\n",
    ]), 0..60)) {
        let body = toks.join(" ");
        let _ = attnc::dsl::compile(&format!("attention t {{ {body} }}"));
        let spec = format!("attention t {{ dims B, H, N, M, D\n input q: f32[B, H, N, D]\n input k: f32[B, H, M, D]\n input v: f32[B, H, M, D]\n output o: f32[B, H, N, D]\n {body} }}");
        let _ = attnc::dsl::compile(&spec);
    }

    /// Mutations of real examples (a token deleted or duplicated) never panic either.
    #[test]
    fn compile_never_panics_on_mutated_examples(which in 0usize..64, at in any::<prop::sample::Index>(), dup in any::<bool>()) {
        let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let src = std::fs::read_to_string(&files[which % files.len()]).unwrap();
        let toks: Vec<&str> = src.split_inclusive(|c: char| !c.is_alphanumeric() && c != '_').collect();
        let n = at.index(toks.len());
        let mut out: Vec<&str> = toks.clone();
        if dup { out.insert(n, toks[n]); } else { out.remove(n); }
        let _ = attnc::dsl::compile(&out.concat());
    }
}
