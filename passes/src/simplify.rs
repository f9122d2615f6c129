//! Simplification: constant folding and algebraic identities.
//!
//! - Purpose: fold what is known at compile time (`2 * 0.5`, `float(3)`, `x * 1.0`, `x + 0`)
//!   so later passes and code generation see the smallest form.
//! - Precondition: a verified kernel.
//! - Postcondition: every score, bias, mask, decay, gate and value expression is replaced by
//!   the smallest equal form the e-graph finds ([`crate::egraph::simplest`]), and only when
//!   it is strictly smaller; nothing else changes.
//! - Limits: folding follows f64 arithmetic (kernels then round the constant to f32 once,
//!   which is at least as accurate as computing it in f32); expressions under reductions,
//!   loads and transcendental functions are opaque to the e-graph and left as they are.

use crate::egraph::simplest;
use crate::Applied;
use attnc_ir::{Expr, Kernel};

fn shrink(e: &mut Expr, k: &Kernel, label: &str, log: &mut Vec<Applied>) {
    let s = simplest(e, k);
    if s.size() < e.size() {
        log.push(Applied { pass: "simplify", what: format!("{label}: {} → {}", attnc_ir::pretty::infix(e), attnc_ir::pretty::infix(&s)), cost: None });
        *e = s;
    }
}

pub fn run(k: &Kernel) -> Option<(Kernel, Vec<Applied>)> {
    let mut out = k.clone();
    let mut log = Vec::new();
    shrink(&mut out.value, k, "value", &mut log);
    if let Some(g) = out.gate.as_mut() {
        shrink(g, k, "gate", &mut log);
    }
    for (n, br) in out.branches.iter_mut().enumerate() {
        shrink(&mut br.score, k, &format!("branch {n} score"), &mut log);
        for (label, e) in [("bias", &mut br.bias), ("mask", &mut br.mask), ("decay", &mut br.decay), ("weight", &mut br.weight)] {
            if let Some(e) = e.as_mut() {
                shrink(e, k, &format!("branch {n} {label}"), &mut log);
            }
        }
    }
    (!log.is_empty()).then_some((out, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_constants_and_identities() {
        let k = attnc_ir::parse_kernel(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (* (load k b h j e) 1.0)) (out b h i e)
               (branch (score (* (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0))) (* 2.0 0.25)))
                 (bias (float (+ (- j i) 0))) (norm (softmax))))",
        )
        .expect("kernel");
        let (out, log) = run(&k).expect("simplified");
        assert_eq!(attnc_ir::pretty::infix(&out.value), "k[b, h, j, e]");
        assert_eq!(attnc_ir::pretty::infix(&out.branches[0].score), "sum(r0 in 0..D: q[b, h, i, r0] * k[b, h, j, r0]) * 0.5");
        assert_eq!(attnc_ir::pretty::infix(out.branches[0].bias.as_ref().unwrap()), "float(j - i)");
        assert_eq!(log.len(), 3, "{log:?}");
        // Already minimal: nothing to do.
        assert!(run(&out).is_none());
    }
}
