//! Interval analysis of expressions: for every variable given as a range, a sound bound on
//! what the expression can evaluate to.
//!
//! Purpose: block sparsity. Evaluating a mask over a (query tile × key tile) box says
//! whether the tile is empty (the mask is false everywhere), full (true everywhere) or
//! partial. Soundness is the contract: every concrete evaluation inside the box lies inside
//! the computed interval (a property test checks it against the reference interpreter).
//! Precision is best effort: anything not understood widens to `Unknown`.
//!
//! Tensor reads go through a [`LoadOracle`], which may return exact bounds from the data
//! (the run-time pre-pass for segment ids and block lists) or `Unknown` (compile time).

use crate::{floor_div, floor_mod, BinOp, Expr, RedOp, UnOp};
use std::collections::BTreeMap;

/// An abstract value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Iv {
    /// Every integer in `[lo, hi]`.
    Int(i64, i64),
    /// Every float in `[lo, hi]`, and NaN too when `nan`.
    Float { lo: f64, hi: f64, nan: bool },
    /// A condition that may be false / may be true.
    Bool { f: bool, t: bool },
    /// Nothing is known.
    Unknown,
}

impl Iv {
    pub fn point(n: i64) -> Iv {
        Iv::Int(n, n)
    }
    pub fn fpoint(x: f64) -> Iv {
        if x.is_nan() {
            Iv::Float { lo: f64::INFINITY, hi: f64::NEG_INFINITY, nan: true }
        } else {
            Iv::Float { lo: x, hi: x, nan: false }
        }
    }
    pub fn bool(b: bool) -> Iv {
        Iv::Bool { f: !b, t: b }
    }
    const ANY_BOOL: Iv = Iv::Bool { f: true, t: true };
    const ANY_FLOAT: Iv = Iv::Float { lo: f64::NEG_INFINITY, hi: f64::INFINITY, nan: true };

    /// The least interval containing both.
    pub fn join(self, o: Iv) -> Iv {
        match (self, o) {
            (Iv::Int(a, b), Iv::Int(c, d)) => Iv::Int(a.min(c), b.max(d)),
            (Iv::Float { lo, hi, nan }, Iv::Float { lo: l2, hi: h2, nan: n2 }) => Iv::Float { lo: lo.min(l2), hi: hi.max(h2), nan: nan || n2 },
            (Iv::Bool { f, t }, Iv::Bool { f: f2, t: t2 }) => Iv::Bool { f: f || f2, t: t || t2 },
            _ => Iv::Unknown,
        }
    }
    /// `Some(b)` when a condition is known to be `b`.
    pub fn known_bool(self) -> Option<bool> {
        match self {
            Iv::Bool { f: false, t: true } => Some(true),
            Iv::Bool { f: true, t: false } => Some(false),
            _ => None,
        }
    }
}

/// Bounds on tensor elements for a box of indices.
pub trait LoadOracle {
    fn load(&self, tensor: &str, index: &[Iv]) -> Iv;
}

/// Knows nothing about tensor data (compile-time analysis).
pub struct NoData;
impl LoadOracle for NoData {
    fn load(&self, _: &str, _: &[Iv]) -> Iv {
        Iv::Unknown
    }
}

/// Largest concrete range a reduction is unrolled over.
const UNROLL: i64 = 64;

fn sat(x: i128) -> i64 {
    x.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Whether `x op y` may be true / may be false for some `x ∈ [a, b]`, `y ∈ [c, d]`.
fn relation<T: PartialOrd + Copy>(op: BinOp, (a, b): (T, T), (c, d): (T, T)) -> (bool, bool) {
    match op {
        BinOp::Eq => (a <= d && c <= b, !(a == b && c == d && a == c)),
        BinOp::Ne => (!(a == b && c == d && a == c), a <= d && c <= b),
        BinOp::Lt => (a < d, b >= c),
        BinOp::Le => (a <= d, b > c),
        BinOp::Gt => (b > c, a <= d),
        _ => (b >= c, a < d),
    }
}

fn int_bin(op: BinOp, (a, b): (i64, i64), (c, d): (i64, i64)) -> Iv {
    let (a, b, c, d) = (a as i128, b as i128, c as i128, d as i128);
    match op {
        BinOp::Add => Iv::Int(sat(a + c), sat(b + d)),
        BinOp::Sub => Iv::Int(sat(a - d), sat(b - c)),
        BinOp::Mul => {
            let p = [a * c, a * d, b * c, b * d];
            Iv::Int(sat(*p.iter().min().expect("4")), sat(*p.iter().max().expect("4")))
        }
        BinOp::Min => Iv::Int(sat(a.min(c)), sat(b.min(d))),
        BinOp::Max => Iv::Int(sat(a.max(c)), sat(b.max(d))),
        BinOp::FloorDiv | BinOp::Mod if c == d && c != 0 => {
            let (x, y, k) = (a as i64, b as i64, c as i64);
            if op == BinOp::FloorDiv {
                let (p, q) = (floor_div(x, k), floor_div(y, k));
                Iv::Int(p.min(q), p.max(q))
            } else if floor_div(x, k) == floor_div(y, k) {
                let (p, q) = (floor_mod(x, k), floor_mod(y, k));
                Iv::Int(p.min(q), p.max(q))
            } else if k > 0 {
                Iv::Int(0, k - 1)
            } else {
                Iv::Int(k + 1, 0)
            }
        }
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            // May the relation be true / false for some pair in the boxes?
            let (t, f) = relation(op, (a, b), (c, d));
            Iv::Bool { f, t }
        }
        _ => Iv::Unknown,
    }
}

fn float_bin(op: BinOp, x: (f64, f64, bool), y: (f64, f64, bool)) -> Iv {
    let ((a, b, n1), (c, d, n2)) = (x, y);
    let nan = n1 || n2;
    let empty = a > b || c > d;
    let mk = |lo: f64, hi: f64, extra_nan: bool| {
        if lo.is_nan() || hi.is_nan() {
            Iv::ANY_FLOAT
        } else {
            Iv::Float { lo, hi, nan: nan || extra_nan }
        }
    };
    if empty && !matches!(op, BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge) {
        return Iv::ANY_FLOAT;
    }
    match op {
        // inf - inf and 0 * inf are NaN: widen to "may be NaN" when infinities are in range.
        BinOp::Add => mk(a + c, b + d, a.is_infinite() || b.is_infinite() || c.is_infinite() || d.is_infinite()),
        BinOp::Sub => mk(a - d, b - c, a.is_infinite() || b.is_infinite() || c.is_infinite() || d.is_infinite()),
        BinOp::Mul => {
            let p = [a * c, a * d, b * c, b * d];
            if p.iter().any(|v| v.is_nan()) {
                return Iv::ANY_FLOAT;
            }
            // The corners miss a zero inside one range times an infinity of the other.
            let inf_times_zero = |(a, b): (f64, f64), (c, d): (f64, f64)| (a.is_infinite() || b.is_infinite()) && c <= 0.0 && 0.0 <= d;
            let extra = inf_times_zero((a, b), (c, d)) || inf_times_zero((c, d), (a, b));
            mk(p.iter().cloned().fold(f64::INFINITY, f64::min), p.iter().cloned().fold(f64::NEG_INFINITY, f64::max), extra)
        }
        BinOp::Div if c > 0.0 || d < 0.0 => {
            let p = [a / c, a / d, b / c, b / d];
            if p.iter().any(|v| v.is_nan()) {
                return Iv::ANY_FLOAT;
            }
            mk(p.iter().cloned().fold(f64::INFINITY, f64::min), p.iter().cloned().fold(f64::NEG_INFINITY, f64::max), false)
        }
        BinOp::Pow if a == b && c == d && !nan => Iv::fpoint(a.powf(c)),
        BinOp::Min => mk(a.min(c), b.min(d), false),
        BinOp::Max => mk(a.max(c), b.max(d), false),
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            if empty {
                // Only NaN is possible on one side: every ordered comparison is false.
                return Iv::bool(op == BinOp::Ne);
            }
            let (t, f) = relation(op, (a, b), (c, d));
            // NaN makes every comparison false except `!=`.
            if op == BinOp::Ne {
                Iv::Bool { f, t: t || nan }
            } else {
                Iv::Bool { f: f || nan, t }
            }
        }
        _ => Iv::ANY_FLOAT,
    }
}

fn float_parts(v: Iv) -> Option<(f64, f64, bool)> {
    match v {
        Iv::Float { lo, hi, nan } => Some((lo, hi, nan)),
        _ => None,
    }
}

/// Evaluates `e` abstractly. `vars` gives a range for each free variable; `dims` the sizes.
pub fn eval(e: &Expr, vars: &mut Vec<(String, Iv)>, dims: &BTreeMap<String, i64>, data: &dyn LoadOracle) -> Iv {
    let rec = |x: &Expr, vars: &mut Vec<(String, Iv)>| eval(x, vars, dims, data);
    match e {
        Expr::Int(n) => Iv::point(*n),
        Expr::Float(x) => Iv::fpoint(x.0),
        Expr::Bool(b) => Iv::bool(*b),
        Expr::Var(v) => vars.iter().rev().find(|(n, _)| n == v).map_or(Iv::Unknown, |(_, iv)| *iv),
        Expr::Dim(d) => dims.get(d).map_or(Iv::Unknown, |v| Iv::point(*v)),
        Expr::Load(t, idx) if idx.len() <= 8 => {
            let mut ix = [Iv::Unknown; 8];
            for (slot, x) in ix.iter_mut().zip(idx) {
                *slot = rec(x, vars);
            }
            data.load(t, &ix[..idx.len()])
        }
        Expr::Load(t, idx) => {
            let ix: Vec<Iv> = idx.iter().map(|x| rec(x, vars)).collect();
            data.load(t, &ix)
        }
        Expr::Unary(op, a) => {
            let v = rec(a, vars);
            match (op, v) {
                (UnOp::Not, Iv::Bool { f, t }) => Iv::Bool { f: t, t: f },
                (UnOp::Neg, Iv::Int(a, b)) => Iv::Int(sat(-(b as i128)), sat(-(a as i128))),
                (UnOp::Neg, Iv::Float { lo, hi, nan }) => Iv::Float { lo: -hi, hi: -lo, nan },
                (UnOp::Abs, Iv::Int(a, b)) => {
                    if a >= 0 {
                        Iv::Int(a, b)
                    } else if b <= 0 {
                        Iv::Int(sat(-(b as i128)), sat(-(a as i128)))
                    } else {
                        Iv::Int(0, sat((-(a as i128)).max(b as i128)))
                    }
                }
                (UnOp::ToFloat, Iv::Int(a, b)) => Iv::Float { lo: a as f64, hi: b as f64, nan: false },
                // An integer converts to a finite float, whatever it is.
                (UnOp::ToFloat, _) => Iv::Float { lo: i64::MIN as f64, hi: i64::MAX as f64, nan: false },
                // Toward zero, saturating at the i32 range (NaN: see `reference::to_int`).
                (UnOp::ToInt, Iv::Float { lo, hi, nan: false }) if lo <= hi => {
                    let t = |x: f64| crate::reference::to_int(x).expect("not NaN");
                    Iv::Int(t(lo), t(hi))
                }
                // Monotone non-decreasing, NaN to NaN.
                (UnOp::Floor | UnOp::Ceil | UnOp::Round | UnOp::Log, Iv::Float { lo, hi, nan }) if lo <= hi => {
                    let f = crate::reference::unary_f64;
                    if *op == UnOp::Log && lo < 0.0 {
                        Iv::Float { lo: f64::NEG_INFINITY, hi: if hi < 0.0 { f64::NEG_INFINITY } else { hi.ln() }, nan: true }
                    } else {
                        Iv::Float { lo: f(*op, lo), hi: f(*op, hi), nan }
                    }
                }
                // In [-1, 1]; NaN at infinities.
                (UnOp::Cos | UnOp::Sin, Iv::Float { lo, hi, nan }) => Iv::Float { lo: -1.0, hi: 1.0, nan: nan || lo.is_infinite() || hi.is_infinite() },
                // Monotone on [0, inf): sqrt of a non-negative range.
                (UnOp::Sqrt, Iv::Float { lo, hi, nan }) if lo <= hi && lo >= 0.0 => Iv::Float { lo: lo.sqrt(), hi: hi.sqrt(), nan },
                (UnOp::Exp | UnOp::Tanh | UnOp::Sigmoid, Iv::Float { lo, hi, nan }) if lo <= hi => {
                    let f = crate::reference::unary_f64;
                    Iv::Float { lo: f(*op, lo), hi: f(*op, hi), nan }
                }
                (_, Iv::Float { .. }) => Iv::ANY_FLOAT,
                _ => Iv::Unknown,
            }
        }
        Expr::Binary(op, a, b) => {
            let (x, y) = (rec(a, vars), rec(b, vars));
            match (x, y) {
                (Iv::Int(a, b), Iv::Int(c, d)) => int_bin(*op, (a, b), (c, d)),
                (Iv::Bool { f, t }, Iv::Bool { f: f2, t: t2 }) => match op {
                    BinOp::And => Iv::Bool { f: f || f2, t: t && t2 },
                    BinOp::Or => Iv::Bool { f: f && f2, t: t || t2 },
                    BinOp::Eq | BinOp::Ne => match (x.known_bool(), y.known_bool()) {
                        (Some(p), Some(q)) => Iv::bool((p == q) == (*op == BinOp::Eq)),
                        _ => Iv::ANY_BOOL,
                    },
                    _ => Iv::Unknown,
                },
                (Iv::Float { .. }, Iv::Float { .. }) => float_bin(*op, float_parts(x).expect("float"), float_parts(y).expect("float")),
                // Short-circuit facts survive one unknown side.
                (Iv::Bool { f: false, t: true }, _) | (_, Iv::Bool { f: false, t: true }) if *op == BinOp::Or => Iv::bool(true),
                (Iv::Bool { f: true, t: false }, _) | (_, Iv::Bool { f: true, t: false }) if *op == BinOp::And => Iv::bool(false),
                _ if op.is_comparison() || matches!(op, BinOp::And | BinOp::Or) => Iv::ANY_BOOL,
                _ => Iv::Unknown,
            }
        }
        Expr::Select(c, a, b) => match rec(c, vars) {
            Iv::Bool { f: false, t: true } => rec(a, vars),
            Iv::Bool { f: true, t: false } => rec(b, vars),
            _ => {
                let (x, y) = (rec(a, vars), rec(b, vars));
                x.join(y)
            }
        },
        Expr::Reduce { op, var, lo, hi, body } => {
            let (l, h) = (rec(lo, vars), rec(hi, vars));
            let (Iv::Int(l0, l1), Iv::Int(h0, h1)) = (l, h) else {
                return Iv::Unknown;
            };
            let ident = |op: RedOp| match op {
                RedOp::Any => Iv::bool(false),
                RedOp::All => Iv::bool(true),
                _ => Iv::Unknown,
            };
            // Exact bounds: unroll a short concrete range.
            if l0 == l1 && h0 == h1 && h0 - l0 <= UNROLL {
                let mut acc: Option<Iv> = None;
                vars.push((var.clone(), Iv::Unknown));
                for x in l0..h0 {
                    vars.last_mut().expect("pushed").1 = Iv::point(x);
                    let v = rec(body, vars);
                    acc = Some(match acc {
                        None => v,
                        Some(a) => match (op, a, v) {
                            (RedOp::Any, Iv::Bool { f, t }, Iv::Bool { f: f2, t: t2 }) => Iv::Bool { f: f && f2, t: t || t2 },
                            (RedOp::All, Iv::Bool { f, t }, Iv::Bool { f: f2, t: t2 }) => Iv::Bool { f: f || f2, t: t && t2 },
                            (RedOp::Sum, Iv::Int(a, b), Iv::Int(c, d)) => int_bin(BinOp::Add, (a, b), (c, d)),
                            (RedOp::Sum, Iv::Float { .. }, Iv::Float { .. }) => float_bin(BinOp::Add, float_parts(a).expect("f"), float_parts(v).expect("f")),
                            (RedOp::Max | RedOp::Min, a, v) => a.join(v),
                            _ => Iv::Unknown,
                        },
                    });
                }
                vars.pop();
                return acc.unwrap_or_else(|| ident(*op));
            }
            // Any / All over a range: what the body can be anywhere in it.
            if matches!(op, RedOp::Any | RedOp::All) {
                let maybe_empty = l1 >= h0;
                let never_empty = l1 < h0;
                if h1 <= l0 {
                    return ident(*op);
                }
                vars.push((var.clone(), Iv::Int(l0, h1 - 1)));
                let v = rec(body, vars);
                vars.pop();
                return match (op, v) {
                    (RedOp::Any, Iv::Bool { f, t }) => Iv::Bool { f: f || maybe_empty || !never_empty, t },
                    (RedOp::All, Iv::Bool { f, t }) => Iv::Bool { f, t: t || maybe_empty },
                    _ => Iv::ANY_BOOL,
                };
            }
            Iv::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `-inf * 0` is NaN: a product whose one range holds an infinity and whose other holds
    /// zero (inside, not only at a corner) may be NaN (found by `tests/tiles.rs`'s property
    /// test: `log(0.0) * log(float(abs(i + j + i)))` at `i = 0, j = 1`).
    #[test]
    fn an_infinity_times_a_range_through_zero_may_be_nan() {
        let iv = |lo, hi| (lo, hi, false);
        let nan = |v: Iv| matches!(v, Iv::Float { nan: true, .. });
        assert!(nan(float_bin(BinOp::Mul, iv(f64::NEG_INFINITY, f64::NEG_INFINITY), iv(f64::NEG_INFINITY, 2f64.ln()))));
        assert!(nan(float_bin(BinOp::Mul, iv(-1.0, 3.0), iv(1.0, f64::INFINITY))));
        assert!(!nan(float_bin(BinOp::Mul, iv(1.0, 3.0), iv(1.0, f64::INFINITY))));
        assert!(!nan(float_bin(BinOp::Mul, iv(-1.0, 3.0), iv(1.0, 2.0))));
    }
}
