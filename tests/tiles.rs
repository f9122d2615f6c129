//! Soundness of the interval analysis and of block-sparsity classification, against the
//! reference interpreter: an `Empty` tile has no pair whose mask holds, a `Full` tile no
//! pair whose mask fails, for every example's mask on random tiles and random data, and
//! for random integer expressions.

use attnc::ir::reference::{eval_expr, ExprEval, Scalar, Tensor};
use attnc::ir::{self, BinOp, Expr};
use attnc_passes::interval::{eval, Iv, NoData};
use attnc_passes::tiles::{classify, classify_row, DataOracle, TileBox, TileClass};
use proptest::prelude::*;
use std::collections::BTreeMap;
mod common;

fn example(name: &str) -> attnc::dsl::Checked {
    let src = std::fs::read_to_string(format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"))).unwrap();
    attnc::dsl::compile(&src).unwrap()
}

fn oracle<'a>(inputs: &'a BTreeMap<String, Tensor>, k: &ir::Kernel) -> DataOracle<'a> {
    DataOracle::new(
        inputs.iter().map(|(n, t)| (n.clone(), (t.shape.as_slice(), t.data.as_slice(), k.tensor(n).is_some_and(|d| d.dtype.is_int())))).collect(),
        4096,
    )
}

#[test]
fn tile_classes_are_sound_for_every_example_mask() {
    let mut counts = BTreeMap::new();
    for name in [
        "sdpa_causal",
        "sliding_window_sink",
        "document_mask",
        "prefix_lm",
        "swin_window",
        "neighborhood_2d",
        "power_attention",
        "block_sparse",
        "axial_rows",
        "alibi",
    ] {
        let c = example(name);
        let mask = c.kernel.branches[0].mask.clone().expect("masked example");
        let (n, m) = if matches!(name, "swin_window" | "neighborhood_2d" | "axial_rows") { (256, 256) } else { (150, 150) };
        let mut dims: BTreeMap<String, i64> =
            [("B", 2), ("H", 2), ("G", 1), ("N", n), ("M", m), ("D", 2), ("Dv", 2), ("K", 2)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
        dims.retain(|k, _| c.info.free_dims.contains(k));
        let bind = attnc::bind_dims(&c, &dims).unwrap();
        let mut inputs = attnc::inputs::random_inputs(&c.kernel, &bind, &c.ranges, 3).unwrap();
        if name == "document_mask" {
            // Packed documents: sorted ids, so whole tiles fall inside or outside a document.
            let seg = inputs.get_mut("seg").unwrap();
            for (x, v) in seg.data.iter_mut().enumerate() {
                *v = ((x % n as usize) / 40) as f64;
            }
        }
        let data = oracle(&inputs, &c.kernel);
        let ev = ExprEval::new(&c.kernel, &bind, &inputs).unwrap();
        let mut rows = BTreeMap::new();
        for (tq, tk) in [(16i64, 16i64), (32, 64), (64, 32)] {
            for b in 0..2 {
                for h in 0..2 {
                    for i0 in (0..n).step_by(tq as usize) {
                        rows.insert((b, h, tq, tk, i0), classify_row(Some(&mask), b, h, (i0, (i0 + tq).min(n)), m, tk, &bind.dims, &data));
                    }
                }
            }
        }
        for (tq, tk) in [(16i64, 16i64), (32, 64), (64, 32)] {
            for b in 0..2 {
                for h in 0..2 {
                    for i0 in (0..n).step_by(tq as usize) {
                        for j0 in (0..m).step_by(tk as usize) {
                            let bx = TileBox { b, h, i: (i0, (i0 + tq).min(n)), j: (j0, (j0 + tk).min(m)) };
                            let direct = classify(Some(&mask), bx, &bind.dims, &data);
                            // The bisecting row classifier: never less precise than the
                            // direct one, and checked for soundness below.
                            let class = rows[&(b, h, tq, tk, i0)][(j0 / tk) as usize];
                            assert!(direct == TileClass::Partial || class == direct, "{name}: {bx:?} row {class:?}, direct {direct:?}");
                            *counts.entry((name, class_name(class))).or_insert(0) += 1;
                            if class == TileClass::Partial {
                                continue;
                            }
                            for i in bx.i.0..bx.i.1 {
                                for j in bx.j.0..bx.j.1 {
                                    let vars = [("b", Scalar::Int(b)), ("h", Scalar::Int(h)), ("i", Scalar::Int(i)), ("j", Scalar::Int(j))];
                                    let v = ev.eval(&mask, &vars).unwrap();
                                    assert_eq!(
                                        v,
                                        Scalar::Bool(class == TileClass::Full),
                                        "{name}: tile {bx:?} is {class:?} but the mask at ({i}, {j}) is {v:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // The analysis is useful, not only sound: the structured masks have empty and full tiles.
    for name in ["sdpa_causal", "sliding_window_sink", "document_mask", "power_attention", "axial_rows", "block_sparse"] {
        assert!(counts.get(&(name, "empty")).copied().unwrap_or(0) > 0, "{name} has no empty tile: {counts:?}");
        assert!(counts.get(&(name, "full")).copied().unwrap_or(0) > 0, "{name} has no full tile: {counts:?}");
    }
}

fn class_name(c: TileClass) -> &'static str {
    match c {
        TileClass::Empty => "empty",
        TileClass::Full => "full",
        TileClass::Partial => "partial",
    }
}

fn int_expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![(-20i64..20).prop_map(Expr::Int), Just(Expr::var("i")), Just(Expr::var("j")), Just(Expr::dim("N"))];
    leaf.prop_recursive(4, 24, 2, |inner| {
        prop_oneof![
            (prop::sample::select(vec![BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Min, BinOp::Max]), inner.clone(), inner.clone())
                .prop_map(|(op, a, b)| Expr::bin(op, a, b)),
            (prop::sample::select(vec![BinOp::FloorDiv, BinOp::Mod]), inner.clone(), prop::sample::select(vec![-7i64, -2, 2, 3, 16, 64]))
                .prop_map(|(op, a, d)| Expr::bin(op, a, Expr::Int(d))),
            inner.clone().prop_map(|a| Expr::un(ir::UnOp::Abs, a)),
        ]
    })
}

fn bool_expr() -> impl Strategy<Value = Expr> {
    let cmp = (prop::sample::select(vec![BinOp::Eq, BinOp::Ne, BinOp::Lt, BinOp::Le, BinOp::Gt, BinOp::Ge]), int_expr(), int_expr())
        .prop_map(|(op, a, b)| Expr::bin(op, a, b));
    cmp.prop_recursive(2, 8, 2, |inner| (prop::sample::select(vec![BinOp::And, BinOp::Or]), inner.clone(), inner).prop_map(|(op, a, b)| Expr::bin(op, a, b)))
}

/// Float expressions over the integer ones, with the functions whose intervals have rules:
/// `floor`, `ceil`, `round`, `log`, `sqrt`, `cos`, `sin`, `exp`, `tanh`, and `int` back to an
/// integer (of operands that cannot be NaN, as the checker requires).
fn float_expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        int_expr().prop_map(|e| Expr::un(ir::UnOp::ToFloat, e)),
        prop::sample::select(vec![-2.5f64, -0.5, 0.0, 0.5, 1.5, 3.0, 1e6]).prop_map(Expr::float),
    ];
    leaf.prop_recursive(3, 16, 2, |inner| {
        use ir::UnOp as U;
        prop_oneof![
            (prop::sample::select(vec![BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Min, BinOp::Max]), inner.clone(), inner.clone())
                .prop_map(|(op, a, b)| Expr::bin(op, a, b)),
            (prop::sample::select(vec![U::Floor, U::Ceil, U::Round, U::Log, U::Sqrt, U::Cos, U::Sin, U::Exp, U::Tanh, U::Neg, U::Abs]), inner.clone())
                .prop_map(|(op, a)| Expr::un(op, a)),
        ]
    })
}

/// An sdpa kernel with only its output (no tensor to read) and its dims, in which the
/// property tests evaluate expressions of `i` and `j`.
fn pair_box() -> (ir::Kernel, BTreeMap<String, i64>, ir::Bindings) {
    let k = example("sdpa").kernel;
    let dims: BTreeMap<String, i64> = [("B", 1), ("H", 1), ("N", 37), ("M", 37), ("D", 1), ("Dv", 1)].iter().map(|(a, b)| (a.to_string(), *b)).collect();
    let bind = ir::Bindings { dims: dims.clone() };
    (ir::Kernel { tensors: k.tensors.into_iter().filter(|t| t.kind == ir::TensorKind::Output).collect(), ..k }, dims, bind)
}

proptest! {
    #![proptest_config(common::proptest_config(256))]

    /// Float intervals are sound too, NaN included: a value outside the interval, or NaN
    /// where the interval rules it out, fails; `int` of an operand the analysis proves a
    /// number stays inside its integer interval.
    #[test]
    fn float_interval_bounds_are_sound(e in float_expr(), i0 in -10i64..40, w in 1i64..6, j0 in -10i64..40, v in 1i64..6) {
        let (k, dims, bind) = pair_box();
        let inputs = BTreeMap::new();
        let mut vars = vec![("i".to_string(), Iv::Int(i0, i0 + w - 1)), ("j".to_string(), Iv::Int(j0, j0 + v - 1))];
        let fe = eval(&e, &mut vars, &dims, &NoData);
        let as_int = Expr::un(ir::UnOp::ToInt, e.clone());
        let ie = matches!(fe, Iv::Float { nan: false, .. }).then(|| eval(&as_int, &mut vars, &dims, &NoData));
        for i in i0..i0 + w {
            for j in j0..j0 + v {
                let at = [("i", Scalar::Int(i)), ("j", Scalar::Int(j))];
                let Scalar::Float(x) = eval_expr(&k, &bind, &inputs, &e, &at).unwrap() else { unreachable!() };
                match fe {
                    Iv::Float { lo, hi, nan } => prop_assert!(
                        if x.is_nan() { nan } else { lo <= x && x <= hi },
                        "{} = {x} at ({i}, {j}) outside {fe:?}", ir::pretty::infix(&e)
                    ),
                    Iv::Unknown => {}
                    other => prop_assert!(false, "float expression gave {other:?}"),
                }
                if let Some(ie) = ie {
                    let Scalar::Int(n) = eval_expr(&k, &bind, &inputs, &as_int, &at).unwrap() else { unreachable!() };
                    match ie {
                        Iv::Int(lo, hi) => prop_assert!(lo <= n && n <= hi, "int({}) = {n} at ({i}, {j}) outside [{lo}, {hi}]", ir::pretty::infix(&e)),
                        other => prop_assert!(false, "int of a number gave {other:?}"),
                    }
                }
            }
        }
    }

    /// Every concrete value inside the box lies in the interval.
    #[test]
    fn interval_bounds_are_sound(e in int_expr(), c in bool_expr(), i0 in -10i64..40, w in 1i64..12, j0 in -10i64..40, v in 1i64..12) {
        let (k, dims, bind) = pair_box();
        let inputs = BTreeMap::new();
        let mut vars = vec![("i".to_string(), Iv::Int(i0, i0 + w - 1)), ("j".to_string(), Iv::Int(j0, j0 + v - 1))];
        let ie = eval(&e, &mut vars, &dims, &NoData);
        let ic = eval(&c, &mut vars, &dims, &NoData);
        for i in i0..i0 + w {
            for j in j0..j0 + v {
                let at = [("i", Scalar::Int(i)), ("j", Scalar::Int(j))];
                let Scalar::Int(x) = eval_expr(&k, &bind, &inputs, &e, &at).unwrap() else { unreachable!() };
                match ie {
                    Iv::Int(lo, hi) => prop_assert!(lo <= x && x <= hi, "{} = {x} at ({i}, {j}) outside [{lo}, {hi}]", ir::pretty::infix(&e)),
                    Iv::Unknown => {}
                    other => prop_assert!(false, "int expression gave {other:?}"),
                }
                let Scalar::Bool(y) = eval_expr(&k, &bind, &inputs, &c, &at).unwrap() else { unreachable!() };
                match ic {
                    Iv::Bool { f, t } => prop_assert!(if y { t } else { f }, "{} = {y} at ({i}, {j}) but the interval says {ic:?}", ir::pretty::infix(&c)),
                    Iv::Unknown => {}
                    other => prop_assert!(false, "bool expression gave {other:?}"),
                }
            }
        }
    }
}
