//! Facts about expressions that code generators need, whatever the target: what varies
//! with a loop's variables (on a GPU: across a workgroup's threads), what can be computed
//! once before that loop, and which loads read contiguous rows (vector loads on a CPU,
//! coalesced loads on a GPU).

use crate::{BinOp, Expr, Kernel};

/// Whether `e` reads any of `vars` (else it is the same for every iteration of a loop over
/// them: uniform across SIMD lanes or threads).
pub fn varies(e: &Expr, vars: &[String]) -> bool {
    let fv = e.free_vars();
    vars.iter().any(|v| fv.contains(v))
}

/// Something a loop over some variables can compute once, before it starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Invariant<'e> {
    /// A maximal subexpression that does not vary (and is not a leaf).
    Value(&'e Expr),
    /// The divisor of a varying float division: its reciprocal is invariant (`x / d` becomes
    /// `x · (1/d)`).
    Divisor(&'e Expr),
    /// A varying load's uniform part: the offset of its invariant indices.
    LoadOffset { tensor: &'e str, index: &'e [Expr] },
}

/// What a loop over `vars` can hoist out of `exprs`, in the order a code generator meets it
/// walking each expression from the root (an item may repeat; keep the first). Reduction
/// bodies are not searched: their variable is bound inside.
pub fn invariants<'e>(exprs: &[&'e Expr], vars: &[String]) -> Vec<Invariant<'e>> {
    fn go<'e>(e: &'e Expr, vars: &[String], out: &mut Vec<Invariant<'e>>) {
        if !varies(e, vars) {
            if !matches!(e, Expr::Int(_) | Expr::Float(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Dim(_)) {
                out.push(Invariant::Value(e));
            }
            return;
        }
        if let Expr::Binary(BinOp::Div, _, d) = e {
            if !varies(d, vars) {
                out.push(Invariant::Divisor(d));
            }
        }
        if let Expr::Load(t, idx) = e {
            out.push(Invariant::LoadOffset { tensor: t, index: idx });
        }
        match e {
            Expr::Reduce { lo, hi, .. } => {
                go(lo, vars, out);
                go(hi, vars, out);
            }
            _ => e.children().into_iter().for_each(|c| go(c, vars, out)),
        }
    }
    let mut out = Vec::new();
    for e in exprs {
        go(e, vars, &mut out);
    }
    out
}

/// A load that reads a row along one variable: `t[prefix…, var]` with `var` only in the
/// last index.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowAccess<'e> {
    pub tensor: &'e str,
    /// The other indices (free of the variable).
    pub prefix: &'e [Expr],
}

/// When `e` loads f32s whose last index is exactly `var` (and no other index uses it): the
/// row it reads as `var` runs. It is contiguous in memory when the tensor's last axis has
/// unit stride and holds the whole range, which only the runtime knows.
pub fn row_access<'e>(k: &Kernel, e: &'e Expr, var: &str) -> Option<RowAccess<'e>> {
    let Expr::Load(t, idx) = e else { return None };
    let (last, rest) = idx.split_last()?;
    if *last != Expr::var(var) || rest.iter().any(|x| x.free_vars().contains(var)) {
        return None;
    }
    let float = k.tensor(t).is_some_and(|d| !d.dtype.is_int());
    float.then_some(RowAccess { tensor: t, prefix: rest })
}

/// Whether the output's last index is `var` and no other index uses it: a row of the output
/// along `var` is contiguous when that axis has unit stride (row-major outputs always do).
pub fn output_rows_along(k: &Kernel, var: &str) -> bool {
    k.out.last().is_some_and(|v| v == var) && !k.out[..k.out.len() - 1].iter().any(|v| v == var)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_expr;

    fn vars(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn what_varies_and_what_hoists() {
        let e = parse_expr("(+ (/ (load b0 h j) (sqrt (float $D))) (* (load s (// h (// $H $G))) (float j)))").expect("expr");
        assert!(varies(&e, &vars(&["j"])) && !varies(&e, &vars(&["e"])));
        let inv = invariants(&[&e], &vars(&["j"]));
        let shown: Vec<String> = inv
            .iter()
            .map(|x| match x {
                Invariant::Value(v) => format!("value {v}"),
                Invariant::Divisor(d) => format!("divisor {d}"),
                Invariant::LoadOffset { tensor, index } => format!("offset {tensor}[{}]", index.len()),
            })
            .collect();
        assert_eq!(
            shown,
            vec!["divisor (sqrt (float $D))".to_string(), "offset b0[2]".into(), "value (sqrt (float $D))".into(), "value (load s (// h (// $H $G)))".into(),]
        );
    }

    #[test]
    fn a_reduction_body_is_not_searched() {
        let e = parse_expr("(reduce sum r 0 (* j 2) (* (load q r) (float $D)))").expect("expr");
        assert_eq!(invariants(&[&e], &vars(&["j"])), vec![]);
    }
}
