//! Folding: factors of a score that depend on the query only or on the key only move into
//! the operands of its dot, `(Σ_r a·b) · f(i) · g(j) = Σ_r (a·f(i)) · (b·g(j))`.
//!
//! - Purpose: a key factor (cosine's `1/‖k_j‖`) otherwise costs a load and a multiply per
//!   pair; in the operand it costs one multiply per packed key channel. The scale
//!   `1/sqrt(D)` folds the same way when a later pass needs a bare dot (low-rank bias).
//! - Precondition: a verified kernel; per-row reductions already hoisted ([`crate::hoist`]),
//!   since a folded factor is evaluated once per channel.
//! - Postcondition: a branch score of the form `dot · Π f` (factors free of `j` or of `i`,
//!   without reductions) with at least one key factor is a bare dot. Equal up to rounding
//!   (products are reassociated).
//! - Limits: one dot per score; scores with other structure around the dot (softcap's
//!   `tanh`) are left alone, and so are factors that may be infinite or zero (a division by
//!   a value that can be 0), which would not fold exactly.

use crate::separable::{fold_exact, score_factors, Dot, ScoreFactors};
use crate::Applied;
use attnc_ir::{BinOp, Expr, Kernel, UnOp};

/// The score as a bare dot with every query/key factor folded in, or `None` when it has
/// another shape, a factor that does not fold exactly ([`crate::separable::fold_exact`]), or
/// (unless `force`) no key factor to fold.
pub fn fold_score(k: &Kernel, score: &Expr, force: bool) -> Option<Dot> {
    let ScoreFactors { dot, neg, rows, cols, pairs } = score_factors(score)?;
    if !pairs.is_empty() || (cols.is_empty() && !force) {
        return None;
    }
    if !rows.iter().all(|f| fold_exact(k, f, &dot.a, &dot.r)) || !cols.iter().all(|f| fold_exact(k, f, &dot.b, &dot.r)) {
        return None;
    }
    let mul = |x: Expr, fs: Vec<Expr>| fs.into_iter().fold(x, |a, f| Expr::bin(BinOp::Mul, a, f));
    let mut a = mul(dot.a.clone(), rows);
    if neg {
        a = Expr::un(UnOp::Neg, a);
    }
    let b = mul(dot.b.clone(), cols);
    Some(Dot { a, b, ..dot })
}

pub fn run(k: &Kernel) -> Option<(Kernel, Vec<Applied>)> {
    let mut out = k.clone();
    let mut log = Vec::new();
    for (n, br) in out.branches.iter_mut().enumerate() {
        if let Some(d) = fold_score(k, &br.score, false) {
            let score = d.to_expr();
            log.push(Applied {
                pass: "fold",
                what: format!("branch {n}: score factors folded into the dot's operands: {}", attnc_ir::pretty::infix(&score)),
                cost: None,
            });
            br.score = score;
        }
    }
    (!log.is_empty()).then_some((out, log))
}
