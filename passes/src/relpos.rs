//! Relative positions: a costly bias that reads the pair only through its offset `i − j`
//! (T5's logarithmic buckets, a clipped relative-position table, a log-distance bias) becomes
//! a derived table over the offsets, computed once per call, and each pair loads its entry.
//!
//! - Purpose: t5_bias's bias takes a `log`, three `select`s, integer conversions and a gather
//!   per pair (its forward ran at a quarter of sdpa's speed, `logf` alone 16% of its forward
//!   and backward); a table has `I + J − 1` entries per head, and the pairs of a row read
//!   consecutive entries (`j + (I − 1 − i)`: one vector load per four keys).
//! - Precondition: a verified kernel.
//! - Postcondition: the bias of a softmax or pointwise-map branch without a decay that reads
//!   no variable but `b h i j`, reads `i` and `j` only in integer linear subexpressions with
//!   opposite coefficients (`p − j`, `abs(i + (M − N) − j)`, `j > p`), and does costly work
//!   per pair (a function other than `neg`, `abs` and `float`, a `select`, a division or
//!   power, a gather by the offset) is a load of a new derived tensor. Equal at every kept
//!   pair: the table's loads have their offset-dependent indices clamped to the tensor,
//!   because the reference reads a bias only at the pairs the mask keeps and an offset that
//!   no kept pair has may index outside; its entry is read only by masked pairs.
//! - Limits: biases only (masks are classified per tile from their expression); a bias with
//!   a reduction, or an integer division or modulo by an expression of the offset (which may
//!   be zero at an offset no kept pair has), is left alone; branches with a decay belong to
//!   the linear family's forms.

use crate::separable::{has_reduction, only_pair_indices, side, Side};
use crate::{add_derived, fresh_dim, fresh_tensor, Applied};
use attnc_ir::{BinOp, DType, DimDecl, Expr, Extent, Kernel, Norm, TensorDecl, TensorDef, TensorKind, Ty, UnOp};

/// The offset `i − j` in an expression of the offset.
const OFF: &str = "__off";

/// Coefficients of `i` and `j` in an integer expression linear in them (integer literal
/// coefficients), `None` otherwise; `(0, 0)` when it reads neither.
fn linear(e: &Expr) -> Option<(i64, i64)> {
    let fv = e.free_vars();
    if !fv.contains("i") && !fv.contains("j") {
        return Some((0, 0));
    }
    let scale = |(a, b): (i64, i64), c: i64| Some((a.checked_mul(c)?, b.checked_mul(c)?));
    match e {
        Expr::Var(v) if v == "i" => Some((1, 0)),
        Expr::Var(v) if v == "j" => Some((0, 1)),
        Expr::Binary(op @ (BinOp::Add | BinOp::Sub), a, b) => {
            let (x, y) = (linear(a)?, linear(b)?);
            let s = if *op == BinOp::Add { 1 } else { -1 };
            Some((x.0.checked_add(s * y.0)?, x.1.checked_add(s * y.1)?))
        }
        Expr::Unary(UnOp::Neg, a) => scale(linear(a)?, -1),
        Expr::Binary(BinOp::Mul, a, b) => match (&**a, &**b) {
            (Expr::Int(c), x) | (x, Expr::Int(c)) => scale(linear(x)?, *c),
            _ => None,
        },
        _ => None,
    }
}

/// `e` as an expression of the offset ([`OFF`] for `i − j`) with no `i` or `j`, or `None`
/// when it reads them otherwise.
fn offset_form(k: &Kernel, e: &Expr) -> Option<Expr> {
    let fv = e.free_vars();
    if !fv.contains("i") && !fv.contains("j") {
        return Some(e.clone());
    }
    // `c·i − c·j + r` is `c·(i − j) + r`: at i = 0, j = −off.
    let at_offset = |x: &Expr| x.subst("i", &Expr::Int(0)).subst("j", &Expr::un(UnOp::Neg, Expr::var(OFF)));
    match e {
        Expr::Reduce { .. } => return None,
        _ if k.ty_of(e) == Ty::Int => {
            if let Some((ci, cj)) = linear(e) {
                return (ci == -cj).then(|| at_offset(e));
            }
        }
        // `a < b` is `a − b < 0`.
        Expr::Binary(op, a, b) if op.is_comparison() && k.ty_of(a) == Ty::Int => {
            let diff = Expr::bin(BinOp::Sub, (**a).clone(), (**b).clone());
            if let Some((ci, cj)) = linear(&diff) {
                if ci == -cj {
                    return Some(Expr::bin(*op, at_offset(&diff), Expr::Int(0)));
                }
            }
        }
        _ => {}
    }
    let mut ok = true;
    let out = e.map_children(&mut |c| {
        offset_form(k, c).unwrap_or_else(|| {
            ok = false;
            c.clone()
        })
    });
    ok.then_some(out)
}

/// Whether an expression of the offset does per-pair work worth a table (see the module's
/// documentation), and whether it divides by the offset in integers (refused).
fn costly_and_safe(e: &Expr) -> (bool, bool) {
    let reads = |x: &Expr| x.free_vars().contains(OFF);
    let (mut costly, mut safe) = (false, true);
    e.walk(&mut |x| {
        if !reads(x) {
            return;
        }
        match x {
            Expr::Unary(op, _) => costly |= !matches!(op, UnOp::Neg | UnOp::Abs | UnOp::ToFloat),
            Expr::Select(..) => costly = true,
            Expr::Binary(BinOp::FloorDiv | BinOp::Mod, _, d) => {
                costly = true;
                safe &= !reads(d);
            }
            Expr::Binary(BinOp::Div | BinOp::Pow, ..) => costly = true,
            Expr::Load(_, idx) => costly |= idx.iter().any(reads),
            _ => {}
        }
    });
    (costly, safe)
}

/// Clamps every index that reads the table's offset variable `x` into its axis.
fn clamp_loads(k: &Kernel, e: &Expr, x: &str) -> Expr {
    let e = e.map_children(&mut |c| clamp_loads(k, c, x));
    match e {
        Expr::Load(t, idx) => {
            let shape = k.tensor(&t).map(|d| d.shape.clone()).unwrap_or_default();
            let idx = idx
                .into_iter()
                .enumerate()
                .map(|(a, ix)| match shape.get(a) {
                    Some(ext) if ix.free_vars().contains(x) => {
                        let last = Expr::bin(BinOp::Sub, ext.to_expr(), Expr::Int(1));
                        Expr::bin(BinOp::Max, Expr::Int(0), Expr::bin(BinOp::Min, ix, last))
                    }
                    _ => ix,
                })
                .collect();
            Expr::Load(t, idx)
        }
        other => other,
    }
}

pub fn run(k: &Kernel) -> Option<(Kernel, Vec<Applied>)> {
    let mut out = k.clone();
    let mut log = Vec::new();
    for n in 0..k.branches.len() {
        let br = &k.branches[n];
        if br.decay.is_some() || !matches!(br.norm, Norm::Softmax { .. } | Norm::Map(_)) {
            continue;
        }
        let Some(bias) = &br.bias else { continue };
        if side(bias) != Side::Pair || !only_pair_indices(bias) || has_reduction(bias) {
            continue;
        }
        let Some(f) = offset_form(k, bias) else { continue };
        if f.free_vars().contains("i") || f.free_vars().contains("j") || !matches!(costly_and_safe(&f), (true, true)) {
            continue;
        }
        // The table: [B?, H?, I + J − 1], entry `u` for the offset `(I − 1) − u`, so that a row's
        // keys read consecutive entries `j + (I − 1 − i)`.
        let fv = f.free_vars();
        let (rows, cols) = (k.iter.i.to_expr(), k.iter.j.to_expr());
        let last_row = Expr::bin(BinOp::Sub, rows.clone(), Expr::Int(1));
        let dim = fresh_dim(&out, "__RELPOS");
        out.dims.push(DimDecl { name: dim.clone(), def: Some(Expr::bin(BinOp::Sub, Expr::bin(BinOp::Add, rows, cols), Expr::Int(1))) });
        let mut vars = Vec::new();
        let mut shape = Vec::new();
        let mut at = Vec::new();
        for (v, x, ext) in [("b", "x0", &k.iter.b), ("h", "x1", &k.iter.h)] {
            if fv.contains(v) {
                vars.push(x.to_string());
                shape.push(ext.clone());
                at.push(Expr::var(v));
            }
        }
        vars.push("x2".into());
        shape.push(Extent::Dim(dim));
        at.push(Expr::bin(BinOp::Add, Expr::var("j"), Expr::bin(BinOp::Sub, last_row.clone(), Expr::var("i"))));
        let body = crate::hoist::rename(&f, &[("b", "x0"), ("h", "x1")]).subst(OFF, &Expr::bin(BinOp::Sub, last_row, Expr::var("x2")));
        let body = clamp_loads(k, &body, "x2");
        let name = fresh_tensor(&out, "__relpos");
        add_derived(&mut out, TensorDecl { name: name.clone(), dtype: DType::F32, shape, kind: TensorKind::Derived { vars, def: TensorDef::Map(body) } });
        log.push(Applied {
            pass: "relpos",
            what: format!(
                "branch {n}: the bias reads the pair only through its offset i − j: `{name}` holds it for every offset ({}), computed once; each pair loads its entry",
                if fv.contains("h") { "per head" } else { "shared by the heads" }
            ),
            cost: None,
        });
        out.branches[n].bias = Some(Expr::Load(name, at));
    }
    (!log.is_empty()).then_some((out, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(src: &str) -> Kernel {
        attnc_dsl::compile(src).map(|c| c.kernel).unwrap_or_else(|d| panic!("{}", d.message))
    }

    fn spec(bias: &str, mask: &str) -> String {
        format!(
            "attention t {{
               dims B, H, N, M, D, Dv
               input q: f32[B, H, N, D]
               input k: f32[B, H, M, D]
               input v: f32[B, H, M, Dv]
               input rel: f32[H, 32]
               output o: f32[B, H, N, Dv]
               score = dot(q[b, h, i, :], k[b, h, j, :])
               bias = {bias}
               {mask}
               value = v[b, h, j, e]
             }}"
        )
    }

    #[test]
    fn offsets_are_recognized_and_others_are_not() {
        let k = kernel(&spec("rel[h, clamp(p - j, -15, 16) + 15]", ""));
        let b = k.branches[0].bias.clone().expect("a bias");
        assert!(offset_form(&k, &b).is_some_and(|f| !f.free_vars().contains("i") && !f.free_vars().contains("j")));
        for (bias, why) in [
            ("rel[h, clamp(p - 2 * j, -15, 16) + 15]", "coefficients that do not cancel"),
            ("rel[h, clamp(p * j, 0, 31)]", "a product of the two"),
            ("log(float(abs(p - j) + 1)) * float(j)", "a factor of the key alone"),
        ] {
            let k = kernel(&spec(bias, ""));
            let b = k.branches[0].bias.clone().expect("a bias");
            assert!(offset_form(&k, &b).is_none(), "{bias}: {why}");
        }
    }

    #[test]
    fn a_cheap_bias_or_a_division_by_the_offset_stays() {
        // `-|p − j|` costs less per pair than a table load; ALiBi is the low-rank pass's.
        assert!(run(&kernel(&spec("-float(abs(p - j))", ""))).is_none());
        // At offset 0 (masked out), 64 // (p − j) would divide by zero (the language only
        // divides by constants; the IR may).
        let mut k = kernel(&spec("rel[h, (p - j) % 32]", "mask = j < p"));
        let Some(Expr::Load(t, idx)) = k.branches[0].bias.clone() else { panic!("a load") };
        let Expr::Binary(BinOp::Mod, off, m) = idx[1].clone() else { panic!("a modulo") };
        let div = Expr::bin(BinOp::Mod, Expr::bin(BinOp::FloorDiv, Expr::Int(64), *off), *m);
        k.branches[0].bias = Some(Expr::Load(t, vec![idx[0].clone(), div]));
        assert!(run(&k).is_none());
        assert!(run(&kernel(&spec("rel[h, (p - j) % 32]", "mask = j < p"))).is_some());
        let (k, log) = run(&kernel(&spec("rel[h, clamp(p - j, -15, 16) + 15]", "mask = j <= p"))).expect("a table");
        assert_eq!(log.len(), 1);
        let t = k.derived().next().expect("the table");
        assert_eq!(t.shape, vec![Extent::Dim("H".into()), Extent::Dim("__RELPOS".into())]);
    }
}
