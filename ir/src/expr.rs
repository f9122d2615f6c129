//! Scalar expressions: the one expression language every axis of a kernel is written in.
//!
//! Expressions are explicitly typed: the lowering inserts `ToFloat` where an integer meets a
//! float, so every operator here has operands of one type (see [`Expr::ty`] in `verify`).
//! Integer division and modulo are *floor* operations (Python semantics), so
//! `(-1) // 16 == -1` and `(-1) % 16 == 15`: rolled grid coordinates need exactly that.

use std::fmt;

/// A value type. Integers are i64 everywhere (tensors of i32 are widened on load).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ty {
    Int,
    Float,
    Bool,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::Int => "int",
            Ty::Float => "float",
            Ty::Bool => "bool",
        })
    }
}

/// A float literal compared and hashed by its bits, so `Expr` can be `Eq + Hash`.
#[derive(Clone, Copy, Debug)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for F64 {}
impl std::hash::Hash for F64 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

macro_rules! ops {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            /// The operator's spelling in the IR text form.
            pub fn text(self) -> &'static str { match self { $($name::$variant => $text),* } }
            pub fn from_text(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)* _ => None }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.text()) }
        }
    };
}

ops!(
    /// Unary operators. `ToFloat` converts an int to a float and `ToInt` a float to an int
    /// (toward zero, saturating at ±2^24, `reference::INT_LIMIT`; its operand must not be NaN,
    /// which the checker proves); every other float function takes and returns a float; `Neg` and
    /// `Abs` keep their operand's type. `Round` rounds half to even (IEEE 754
    /// `roundTiesToEven`, as WGSL's `round`, PTX's `cvt.rni` and Cranelift's `nearest`).
    UnOp {
        Neg = "neg",
        Not = "not",
        Abs = "abs",
        Exp = "exp",
        Log = "log",
        Sqrt = "sqrt",
        Tanh = "tanh",
        Sigmoid = "sigmoid",
        Silu = "silu",
        Relu = "relu",
        Elu = "elu",
        Cos = "cos",
        Sin = "sin",
        Floor = "floor",
        Ceil = "ceil",
        Round = "round",
        ToFloat = "float",
        ToInt = "int",
    }
);

ops!(
    /// Binary operators. Arithmetic keeps the operand type (`Div` and `Pow` are float only,
    /// `FloorDiv` and `Mod` int only); comparisons give bool; `And`/`Or` take bools.
    BinOp {
        Add = "+",
        Sub = "-",
        Mul = "*",
        Div = "/",
        FloorDiv = "//",
        Mod = "%",
        Pow = "pow",
        Min = "min",
        Max = "max",
        Eq = "==",
        Ne = "!=",
        Lt = "<",
        Le = "<=",
        Gt = ">",
        Ge = ">=",
        And = "and",
        Or = "or",
    }
);

ops!(
    /// Reductions over an integer range `[lo, hi)`.
    RedOp {
        Sum = "sum",
        Max = "max",
        Min = "min",
        Any = "any",
        All = "all",
    }
);

impl BinOp {
    pub fn is_comparison(self) -> bool {
        matches!(self, BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge)
    }
}

/// A scalar expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    Int(i64),
    Float(F64),
    Bool(bool),
    /// A bound variable: an iteration index (`b h i j e`), the score `s` or weight `w` inside
    /// a normalization, a reduction variable, or a derived tensor's index variable.
    Var(String),
    /// The run-time length of a named dimension.
    Dim(String),
    /// Element of a tensor (input or derived); one integer index per axis.
    Load(String, Vec<Expr>),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `select(cond, then, else)`: both arms have one type.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `op` over `var` in `[lo, hi)`; empty ranges give the identity (0, -inf, +inf, false, true).
    Reduce {
        op: RedOp,
        var: String,
        lo: Box<Expr>,
        hi: Box<Expr>,
        body: Box<Expr>,
    },
}

impl Expr {
    pub fn float(x: f64) -> Expr {
        Expr::Float(F64(x))
    }
    pub fn var(name: &str) -> Expr {
        Expr::Var(name.to_string())
    }
    pub fn dim(name: &str) -> Expr {
        Expr::Dim(name.to_string())
    }
    pub fn un(op: UnOp, a: Expr) -> Expr {
        Expr::Unary(op, Box::new(a))
    }
    pub fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }
    pub fn select(c: Expr, a: Expr, b: Expr) -> Expr {
        Expr::Select(Box::new(c), Box::new(a), Box::new(b))
    }

    /// Immediate children, in order.
    pub fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::Int(_) | Expr::Float(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Dim(_) => vec![],
            Expr::Load(_, idx) => idx.iter().collect(),
            Expr::Unary(_, a) => vec![a],
            Expr::Binary(_, a, b) => vec![a, b],
            Expr::Select(c, a, b) => vec![c, a, b],
            Expr::Reduce { lo, hi, body, .. } => vec![lo, hi, body],
        }
    }

    /// Visits every node, parents before children.
    pub fn walk(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        for c in self.children() {
            c.walk(f);
        }
    }

    /// Free variables (variables not bound by a reduction inside the expression).
    pub fn free_vars(&self) -> std::collections::BTreeSet<String> {
        fn go(e: &Expr, bound: &mut Vec<String>, out: &mut std::collections::BTreeSet<String>) {
            match e {
                Expr::Var(v) => {
                    if !bound.contains(v) {
                        out.insert(v.clone());
                    }
                }
                Expr::Reduce { var, lo, hi, body, .. } => {
                    go(lo, bound, out);
                    go(hi, bound, out);
                    bound.push(var.clone());
                    go(body, bound, out);
                    bound.pop();
                }
                _ => {
                    for c in e.children() {
                        go(c, bound, out);
                    }
                }
            }
        }
        let mut out = std::collections::BTreeSet::new();
        go(self, &mut Vec::new(), &mut out);
        out
    }

    /// Names of the tensors this expression reads.
    pub fn loads(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        self.walk(&mut |e| {
            if let Expr::Load(t, _) = e {
                out.insert(t.clone());
            }
        });
        out
    }

    /// Number of nodes (a size measure for tests and cost estimates).
    pub fn size(&self) -> usize {
        let mut n = 0;
        self.walk(&mut |_| n += 1);
        n
    }

    /// Replaces free occurrences of variable `name` with `with`.
    pub fn subst(&self, name: &str, with: &Expr) -> Expr {
        match self {
            Expr::Var(v) if v == name => with.clone(),
            Expr::Reduce { op, var, lo, hi, body } => Expr::Reduce {
                op: *op,
                var: var.clone(),
                lo: Box::new(lo.subst(name, with)),
                hi: Box::new(hi.subst(name, with)),
                body: if var == name { body.clone() } else { Box::new(body.subst(name, with)) },
            },
            _ => self.map_children(&mut |c| c.subst(name, with)),
        }
    }

    /// Rebuilds this node with `f` applied to each child.
    pub fn map_children(&self, f: &mut dyn FnMut(&Expr) -> Expr) -> Expr {
        match self {
            Expr::Int(_) | Expr::Float(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Dim(_) => self.clone(),
            Expr::Load(t, idx) => Expr::Load(t.clone(), idx.iter().map(&mut *f).collect()),
            Expr::Unary(op, a) => Expr::Unary(*op, Box::new(f(a))),
            Expr::Binary(op, a, b) => Expr::Binary(*op, Box::new(f(a)), Box::new(f(b))),
            Expr::Select(c, a, b) => Expr::Select(Box::new(f(c)), Box::new(f(a)), Box::new(f(b))),
            Expr::Reduce { op, var, lo, hi, body } => {
                Expr::Reduce { op: *op, var: var.clone(), lo: Box::new(f(lo)), hi: Box::new(f(hi)), body: Box::new(f(body)) }
            }
        }
    }
}

/// Integer floor division (Python `//`). `b != 0` is the caller's obligation.
pub fn floor_div(a: i64, b: i64) -> i64 {
    let q = a.wrapping_div(b);
    if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    }
}

/// Integer floor modulo (Python `%`): the result has the divisor's sign.
pub fn floor_mod(a: i64, b: i64) -> i64 {
    a.wrapping_sub(b.wrapping_mul(floor_div(a, b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_ops_follow_python() {
        for (a, b, q, r) in [(7, 2, 3, 1), (-7, 2, -4, 1), (7, -2, -4, -1), (-7, -2, 3, -1), (-1, 16, -1, 15), (0, 5, 0, 0)] {
            assert_eq!(floor_div(a, b), q, "{a} // {b}");
            assert_eq!(floor_mod(a, b), r, "{a} % {b}");
        }
    }

    #[test]
    fn subst_respects_binders() {
        let e = Expr::Reduce {
            op: RedOp::Sum,
            var: "r".into(),
            lo: Box::new(Expr::var("r")),
            hi: Box::new(Expr::Int(3)),
            body: Box::new(Expr::bin(BinOp::Add, Expr::var("r"), Expr::var("x"))),
        };
        let s = e.subst("r", &Expr::Int(1));
        // The bound `r` in the body is untouched; the free `r` in `lo` is replaced.
        match s {
            Expr::Reduce { lo, body, .. } => {
                assert_eq!(*lo, Expr::Int(1));
                assert_eq!(*body, Expr::bin(BinOp::Add, Expr::var("r"), Expr::var("x")));
            }
            _ => unreachable!(),
        }
        assert_eq!(e.free_vars().into_iter().collect::<Vec<_>>(), vec!["r".to_string(), "x".to_string()]);
    }
}
