//! Infix rendering of expressions for people (`attnc explain`, error messages). The
//! S-expression form in [`crate::text`] stays the canonical, parseable one.

use crate::expr::{BinOp, Expr, F64};

fn prec(op: BinOp) -> u8 {
    match op {
        BinOp::Or => 1,
        BinOp::And => 2,
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 3,
        BinOp::Add | BinOp::Sub => 4,
        BinOp::Mul | BinOp::Div | BinOp::FloorDiv | BinOp::Mod => 5,
        BinOp::Pow => 7,
        BinOp::Min | BinOp::Max => 9,
    }
}

fn go(e: &Expr, out: &mut String, parent: u8) {
    use std::fmt::Write;
    match e {
        Expr::Int(n) => write!(out, "{n}").unwrap(),
        Expr::Float(F64(x)) => write!(out, "{x:?}").unwrap(),
        Expr::Bool(b) => write!(out, "{b}").unwrap(),
        Expr::Var(v) | Expr::Dim(v) => out.push_str(v),
        Expr::Load(t, idx) => {
            out.push_str(t);
            out.push('[');
            for (n, x) in idx.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                go(x, out, 0);
            }
            out.push(']');
        }
        Expr::Unary(op, a) => {
            let name = match op {
                crate::UnOp::Neg => {
                    out.push('-');
                    go(a, out, 6);
                    return;
                }
                crate::UnOp::Not => {
                    out.push('!');
                    go(a, out, 6);
                    return;
                }
                other => other.text(),
            };
            write!(out, "{name}(").unwrap();
            go(a, out, 0);
            out.push(')');
        }
        Expr::Binary(op @ (BinOp::Min | BinOp::Max), a, b) => {
            write!(out, "{}(", op.text()).unwrap();
            go(a, out, 0);
            out.push_str(", ");
            go(b, out, 0);
            out.push(')');
        }
        Expr::Binary(op, a, b) => {
            let p = prec(*op);
            let sym = match op {
                BinOp::Pow => "**",
                BinOp::And => "&&",
                BinOp::Or => "||",
                o => o.text(),
            };
            if p < parent {
                out.push('(');
            }
            // Left-associative operators: the right operand binds tighter; `**` is right-assoc.
            let (lp, rp) = if *op == BinOp::Pow { (p + 1, p) } else { (p, p + 1) };
            go(a, out, lp);
            write!(out, " {sym} ").unwrap();
            go(b, out, rp);
            if p < parent {
                out.push(')');
            }
        }
        Expr::Select(c, a, b) => {
            out.push_str("select(");
            go(c, out, 0);
            out.push_str(", ");
            go(a, out, 0);
            out.push_str(", ");
            go(b, out, 0);
            out.push(')');
        }
        Expr::Reduce { op, var, lo, hi, body } => {
            write!(out, "{op}({var} in ").unwrap();
            go(lo, out, 0);
            out.push_str("..");
            go(hi, out, 0);
            out.push_str(": ");
            go(body, out, 0);
            out.push(')');
        }
    }
}

/// `h // (H // G)`, `j <= i + (M - N)`, `sum(r0 in 0..D: q[b, h, i, r0] * ...)`.
pub fn infix(e: &Expr) -> String {
    let mut s = String::new();
    go(e, &mut s, 0);
    s
}
