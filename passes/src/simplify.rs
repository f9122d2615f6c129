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
        log.push(Applied {
            pass: "simplify",
            what: format!("{label}: {} → {}", attnc_ir::pretty::infix(e), attnc_ir::pretty::infix(&s)),
            cost: None,
        });
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
