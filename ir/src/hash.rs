//! Canonical form and the stable structural hash used in cache keys.
//!
//! The hash is SHA-256 of the canonical text with the kernel's name left out: the same
//! kernel under two names, or with its bound variables spelled differently, hashes the
//! same; any change of meaning-bearing structure changes it. It never depends on the
//! process, the platform or Rust's `DefaultHasher`.

use crate::expr::Expr;
use crate::kernel::*;
use sha2::{Digest, Sha256};

/// Renames bound variables canonically: reduction variables become `r<depth>` (depth of
/// nesting among reductions) and a derived tensor's index variables `x0 x1 ...`.
pub fn canonicalize(k: &Kernel) -> Kernel {
    fn reds(e: &Expr, depth: usize) -> Expr {
        match e {
            Expr::Reduce { op, var, lo, hi, body } => {
                let name = format!("r{depth}");
                let body = body.subst(var, &Expr::Var(name.clone()));
                Expr::Reduce { op: *op, var: name, lo: Box::new(reds(lo, depth)), hi: Box::new(reds(hi, depth)), body: Box::new(reds(&body, depth + 1)) }
            }
            other => other.map_children(&mut |c| reds(c, depth)),
        }
    }
    let r = |e: &Expr| reds(e, 0);
    let ro = |e: &Option<Expr>| e.as_ref().map(r);
    let mut k = k.clone();
    for d in &mut k.dims {
        d.def = ro(&d.def);
    }
    k.requires = k.requires.iter().map(r).collect();
    for t in &mut k.tensors {
        if let TensorKind::Derived { vars, def } = &mut t.kind {
            let rename = |e: &Expr| {
                // Substitute through fresh temporaries first so `x1 -> x0` cannot capture.
                let mut e = e.clone();
                for (n, v) in vars.iter().enumerate() {
                    e = e.subst(v, &Expr::Var(format!("__tmp{n}")));
                }
                for n in 0..vars.len() {
                    e = e.subst(&format!("__tmp{n}"), &Expr::Var(format!("x{n}")));
                }
                r(&e)
            };
            *def = match def {
                TensorDef::Map(e) => TensorDef::Map(rename(e)),
                TensorDef::Cumsum { axis, body } => TensorDef::Cumsum { axis: *axis, body: rename(body) },
            };
            *vars = (0..vars.len()).map(|n| format!("x{n}")).collect();
        }
    }
    k.value = r(&k.value);
    for b in &mut k.branches {
        b.score = r(&b.score);
        b.bias = ro(&b.bias);
        b.mask = ro(&b.mask);
        b.decay = ro(&b.decay);
        b.weight = ro(&b.weight);
        b.norm = match &b.norm {
            Norm::Softmax { sink, post } => Norm::Softmax { sink: ro(sink), post: ro(post) },
            Norm::Map(e) => Norm::Map(r(e)),
            Norm::Linear { eps } => Norm::Linear { eps: *eps },
        };
    }
    k.gate = ro(&k.gate);
    k
}

/// Hex SHA-256 of the canonical text, name excluded.
pub fn stable_hash(k: &Kernel) -> String {
    let mut c = canonicalize(k);
    c.name = "_".into();
    let digest = Sha256::digest(c.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
