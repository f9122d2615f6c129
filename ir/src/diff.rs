//! Symbolic differentiation of kernel expressions: the partial derivative of an expression
//! with respect to every float leaf it reads, as expressions of the same IR.
//!
//! Reverse mode over the expression tree: each node passes its adjoint (the derivative of the
//! root with respect to the node, an [`Expr`]) to its children, multiplied by the local
//! derivative. A leaf that carries a float value is a [`Target`]: a load of a float tensor
//! (the gradient is *scattered* to the element it reads) or a float variable (`s` in a
//! normalization map, `w` in a softmax `post`). Integer and boolean subexpressions are
//! constants for the derivative (an index, a mask, `float(i - j)`), and so are `floor`,
//! `ceil` and `round` (derivative 0 almost everywhere).
//!
//! A leaf inside a `sum` reduction is read once per value of the reduction variable: its
//! [`Term`] lists the enclosing reductions as [`Binder`]s, and whoever evaluates the term
//! runs over their ranges. Reduction variables are renamed to fresh names (`__d0`, …) on the
//! way down, so an adjoint built from an outer subexpression never captures an inner name.
//!
//! Where a function has a kink (`relu`, `abs`, `min`, `max`, a `select`) the derivative is
//! one side's: `relu'(0) = 0`, `abs'(0) = 0`, and `min`/`max` pass the gradient to the first
//! operand on a tie, as the reference's `min`/`max` would return it.

use crate::expr::{BinOp, Expr, RedOp, UnOp};
use crate::kernel::Kernel;
use crate::Ty;

/// What a partial derivative is taken with respect to.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// The element `tensor[idx]` of a float tensor (input or derived).
    Load { tensor: String, idx: Vec<Expr> },
    /// A float variable: `s` (a normalization map's score) or `w` (a softmax weight in `post`).
    Var(String),
}

/// A reduction enclosing a leaf: the term holds for every `var` in `[lo, hi)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Binder {
    pub var: String,
    pub lo: Expr,
    pub hi: Expr,
}

/// One occurrence of a float leaf and the partial derivative of the root expression with
/// respect to it (`adj`, free in the root's variables and the binders' variables).
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub target: Target,
    pub binders: Vec<Binder>,
    pub adj: Expr,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DiffError {
    /// A construct whose derivative attnc does not derive.
    #[error("the gradient of {0} is not supported")]
    Unsupported(String),
}

/// The partial derivatives of `e` (an expression of kernel `k`) with respect to each float
/// leaf occurrence. An expression that is not float has none.
pub fn partials(k: &Kernel, e: &Expr) -> Result<Vec<Term>, DiffError> {
    let mut d = Diff { k, out: Vec::new(), binders: Vec::new(), fresh: 0 };
    if k.ty_of(e) == Ty::Float {
        d.go(e, Expr::float(1.0))?;
    }
    Ok(d.out)
}

/// The derivative of `e` with respect to the float variable `var` (the sum of its
/// occurrences' partials); `None` when `e` does not read it.
pub fn derivative_by_var(k: &Kernel, e: &Expr, var: &str) -> Result<Option<Expr>, DiffError> {
    let mut acc: Option<Expr> = None;
    for t in partials(k, e)? {
        if t.target == Target::Var(var.to_string()) {
            acc = Some(match acc {
                None => t.adj,
                Some(a) => add(a, t.adj),
            });
        }
    }
    Ok(acc)
}

struct Diff<'k> {
    k: &'k Kernel,
    out: Vec<Term>,
    binders: Vec<Binder>,
    fresh: usize,
}

fn is_one(e: &Expr) -> bool {
    matches!(e, Expr::Float(x) if x.0 == 1.0)
}

/// `a * b`, without multiplying by a literal one.
fn mul(a: Expr, b: Expr) -> Expr {
    if is_one(&a) {
        b
    } else if is_one(&b) {
        a
    } else {
        Expr::bin(BinOp::Mul, a, b)
    }
}

fn add(a: Expr, b: Expr) -> Expr {
    Expr::bin(BinOp::Add, a, b)
}

fn neg(a: Expr) -> Expr {
    Expr::un(UnOp::Neg, a)
}

fn f(x: f64) -> Expr {
    Expr::float(x)
}

/// `cond ? adj : 0`.
fn gated(cond: Expr, adj: Expr) -> Expr {
    Expr::select(cond, adj, f(0.0))
}

impl Diff<'_> {
    fn float(&self, e: &Expr) -> bool {
        self.k.ty_of(e) == Ty::Float
    }

    /// Whether `e` reads a float leaf (otherwise its derivative is 0 and nothing is emitted).
    fn varies(&self, e: &Expr) -> bool {
        let mut any = false;
        e.walk(&mut |n| match n {
            Expr::Load(t, _) => any |= self.k.tensor(t).is_some_and(|t| !t.dtype.is_int()),
            Expr::Var(v) => any |= self.k.ty_of(&Expr::Var(v.clone())) == Ty::Float,
            _ => {}
        });
        any
    }

    fn go(&mut self, e: &Expr, adj: Expr) -> Result<(), DiffError> {
        if !self.float(e) || !self.varies(e) {
            return Ok(());
        }
        match e {
            Expr::Int(_) | Expr::Float(_) | Expr::Bool(_) | Expr::Dim(_) => Ok(()),
            Expr::Var(v) => {
                self.out.push(Term { target: Target::Var(v.clone()), binders: self.binders.clone(), adj });
                Ok(())
            }
            Expr::Load(t, idx) => {
                self.out.push(Term { target: Target::Load { tensor: t.clone(), idx: idx.clone() }, binders: self.binders.clone(), adj });
                Ok(())
            }
            Expr::Unary(op, a) => {
                let x = (**a).clone();
                let local = match op {
                    UnOp::Neg => return self.go(a, neg(adj)),
                    UnOp::Abs => Expr::select(Expr::bin(BinOp::Gt, x.clone(), f(0.0)), f(1.0), Expr::select(Expr::bin(BinOp::Lt, x, f(0.0)), f(-1.0), f(0.0))),
                    UnOp::Exp => e.clone(),
                    UnOp::Log => Expr::bin(BinOp::Div, f(1.0), x),
                    UnOp::Sqrt => Expr::bin(BinOp::Div, f(0.5), e.clone()),
                    UnOp::Tanh => Expr::bin(BinOp::Sub, f(1.0), Expr::bin(BinOp::Mul, e.clone(), e.clone())),
                    UnOp::Sigmoid => Expr::bin(BinOp::Mul, e.clone(), Expr::bin(BinOp::Sub, f(1.0), e.clone())),
                    UnOp::Silu => {
                        // silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
                        let sg = Expr::un(UnOp::Sigmoid, x.clone());
                        Expr::bin(BinOp::Mul, sg.clone(), add(f(1.0), Expr::bin(BinOp::Mul, x, Expr::bin(BinOp::Sub, f(1.0), sg))))
                    }
                    UnOp::Relu => return self.go(a, gated(Expr::bin(BinOp::Gt, x, f(0.0)), adj)),
                    UnOp::Elu => Expr::select(Expr::bin(BinOp::Gt, x.clone(), f(0.0)), f(1.0), Expr::un(UnOp::Exp, x)),
                    UnOp::Cos => neg(Expr::un(UnOp::Sin, x)),
                    UnOp::Sin => Expr::un(UnOp::Cos, x),
                    // Piecewise constant: derivative 0 almost everywhere.
                    UnOp::Floor | UnOp::Ceil | UnOp::Round => return Ok(()),
                    // Their operands are not float: nothing flows through.
                    UnOp::Not | UnOp::ToFloat | UnOp::ToInt => return Ok(()),
                };
                self.go(a, mul(adj, local))
            }
            Expr::Binary(op, a, b) => {
                let (x, y) = ((**a).clone(), (**b).clone());
                match op {
                    BinOp::Add => {
                        self.go(a, adj.clone())?;
                        self.go(b, adj)
                    }
                    BinOp::Sub => {
                        self.go(a, adj.clone())?;
                        self.go(b, neg(adj))
                    }
                    BinOp::Mul => {
                        self.go(a, mul(adj.clone(), y))?;
                        self.go(b, mul(adj, x))
                    }
                    BinOp::Div => {
                        self.go(a, Expr::bin(BinOp::Div, adj.clone(), y.clone()))?;
                        // d(x/y)/dy = −x / y²
                        let dy = neg(Expr::bin(BinOp::Div, x, Expr::bin(BinOp::Mul, y.clone(), y)));
                        self.go(b, mul(adj, dy))
                    }
                    BinOp::Pow => {
                        // d(x^y)/dx = y·x^(y−1); d(x^y)/dy = x^y·ln x (only when y varies).
                        let dx = Expr::bin(BinOp::Mul, y.clone(), Expr::bin(BinOp::Pow, x.clone(), Expr::bin(BinOp::Sub, y, f(1.0))));
                        self.go(a, mul(adj.clone(), dx))?;
                        if self.varies(b) {
                            self.go(b, mul(adj, Expr::bin(BinOp::Mul, e.clone(), Expr::un(UnOp::Log, x))))?;
                        }
                        Ok(())
                    }
                    BinOp::Min | BinOp::Max => {
                        let first = Expr::bin(if *op == BinOp::Min { BinOp::Le } else { BinOp::Ge }, x, y);
                        self.go(a, gated(first.clone(), adj.clone()))?;
                        self.go(b, Expr::select(first, f(0.0), adj))
                    }
                    // Comparisons, logic and integer operators are not float.
                    _ => Ok(()),
                }
            }
            Expr::Select(c, a, b) => {
                self.go(a, gated((**c).clone(), adj.clone()))?;
                self.go(b, Expr::select((**c).clone(), f(0.0), adj))
            }
            Expr::Reduce { op, var, lo, hi, body } => {
                if *op != RedOp::Sum {
                    return Err(DiffError::Unsupported(format!("a float `{}` reduction (over `{var}`)", op.text())));
                }
                let fresh = format!("__d{}", self.fresh);
                self.fresh += 1;
                let body = body.subst(var, &Expr::Var(fresh.clone()));
                self.binders.push(Binder { var: fresh, lo: (**lo).clone(), hi: (**hi).clone() });
                let r = self.go(&body, adj);
                self.binders.pop();
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::parse_kernel;

    fn kernel() -> Kernel {
        parse_kernel(
            "(kernel t
  (dim B) (dim H) (dim N) (dim M) (dim D)
  (input q f32 [B H N D])
  (input k f32 [B H M D])
  (input v f32 [B H M D])
  (input g f32 [H])
  (output o f32 [B H N D])
  (iter (b B) (h H) (i N) (j M) (e D))
  (value (load v b h j e))
  (out b h i e)
  (branch
    (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0))))
    (norm (map (sigmoid s)))))",
        )
        .expect("parses")
    }

    #[test]
    fn a_dot_product_has_one_term_per_factor_under_its_reduction() {
        let k = kernel();
        let t = partials(&k, &k.branches[0].score).expect("differentiable");
        assert_eq!(t.len(), 2);
        for term in &t {
            assert_eq!(term.binders.len(), 1);
            assert_eq!(term.binders[0].hi, Expr::dim("D"));
        }
        // ∂(q·k)/∂q[r] = k[r], under the renamed binder.
        let r = Expr::var(&t[0].binders[0].var);
        assert_eq!(t[0].target, Target::Load { tensor: "q".into(), idx: vec![Expr::var("b"), Expr::var("h"), Expr::var("i"), r.clone()] });
        assert_eq!(t[0].adj, Expr::Load("k".into(), vec![Expr::var("b"), Expr::var("h"), Expr::var("j"), r]));
    }

    #[test]
    fn integer_parts_and_piecewise_constants_have_no_terms() {
        let k = kernel();
        let e = crate::text::parse_expr("(+ (float (- i j)) (floor (load g h)))").expect("parses");
        assert!(partials(&k, &e).expect("ok").is_empty());
        let m = crate::text::parse_expr("(sigmoid s)").expect("parses");
        let d = derivative_by_var(&k, &m, "s").expect("ok").expect("reads s");
        assert!(d.size() > 1);
    }

    #[test]
    fn a_float_max_reduction_is_refused_by_name() {
        let k = kernel();
        let e = crate::text::parse_expr("(reduce max r0 0 $D (load q b h i r0))").expect("parses");
        let err = partials(&k, &e).unwrap_err();
        assert!(err.to_string().contains("`max` reduction"), "{err}");
    }
}
