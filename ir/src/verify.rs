//! The IR verifier. `verify` checks every invariant a backend relies on and returns the
//! facts it needs ([`KernelInfo`]), so an unverified kernel cannot reach an emitter.
//!
//! Invariants: names are unique; dims are defined before use; every expression is well
//! typed with operands of one type; each axis uses only the variables its contract allows
//! (value has no `i`, gate no `j`, ...); loads name declared inputs or earlier derived
//! tensors (never the output) with one integer index per axis; `out` is a permutation of
//! `b h i e` matching the output's shape and the `iter` extents.

use crate::expr::{BinOp, Expr, RedOp, Ty, UnOp};
use crate::kernel::*;
use std::collections::{BTreeMap, BTreeSet};

/// What verification found wrong, with the part of the kernel it is in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid kernel `{kernel}`, {context}: {message}")]
pub struct VerifyError {
    pub kernel: String,
    pub context: String,
    pub message: String,
}

/// Which iteration indices an expression reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Deps {
    pub b: bool,
    pub h: bool,
    pub i: bool,
    pub j: bool,
    pub e: bool,
}

impl Deps {
    pub fn of(e: &Expr) -> Deps {
        let fv = e.free_vars();
        Deps { b: fv.contains("b"), h: fv.contains("h"), i: fv.contains("i"), j: fv.contains("j"), e: fv.contains("e") }
    }
}

/// Facts about a verified kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// Dims bound from input shapes at run time, in declaration order.
    pub free_dims: Vec<String>,
    /// Dims defined from other dims, in declaration (= evaluation) order.
    pub derived_dims: Vec<String>,
    /// Axis of the output that each of `b h i e` indexes.
    pub out_axis: BTreeMap<String, usize>,
    /// Per branch: what the score, bias, mask and decay depend on.
    pub branch_deps: Vec<BranchDeps>,
    /// True when some branch has a mask.
    pub masked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchDeps {
    pub score: Deps,
    pub bias: Option<Deps>,
    pub mask: Option<Deps>,
    pub decay: Option<Deps>,
}

struct Ctx<'k> {
    kernel: &'k Kernel,
    dims: BTreeSet<String>,
    /// Tensors readable at this point: name -> (dtype, rank).
    readable: BTreeMap<String, (DType, usize)>,
}

impl Ctx<'_> {
    fn fail<T>(&self, context: &str, message: impl Into<String>) -> Result<T, VerifyError> {
        Err(VerifyError { kernel: self.kernel.name.clone(), context: context.to_string(), message: message.into() })
    }

    /// Type of `e` where `vars` are the variables in scope (with their types).
    fn ty(&self, e: &Expr, vars: &mut Vec<(String, Ty)>, cx: &str) -> Result<Ty, VerifyError> {
        Ok(match e {
            Expr::Int(_) => Ty::Int,
            Expr::Float(_) => Ty::Float,
            Expr::Bool(_) => Ty::Bool,
            Expr::Var(v) => match vars.iter().rev().find(|(n, _)| n == v) {
                Some((_, t)) => *t,
                None => return self.fail(cx, format!("variable `{v}` is not in scope here")),
            },
            Expr::Dim(d) => {
                if !self.dims.contains(d) {
                    return self.fail(cx, format!("dim `{d}` is not declared before this use"));
                }
                Ty::Int
            }
            Expr::Load(t, idx) => {
                let Some(&(dtype, rank)) = self.readable.get(t) else {
                    let why = if self.kernel.tensor(t).is_some() { "cannot be read here" } else { "is not declared" };
                    return self.fail(cx, format!("tensor `{t}` {why}"));
                };
                if idx.len() != rank {
                    return self.fail(cx, format!("`{t}` has {rank} axes but is indexed with {}", idx.len()));
                }
                for (n, x) in idx.iter().enumerate() {
                    let it = self.ty(x, vars, cx)?;
                    if it != Ty::Int {
                        return self.fail(cx, format!("index {n} of `{t}` is {it}, not int"));
                    }
                }
                dtype.value_ty()
            }
            Expr::Unary(op, a) => {
                let t = self.ty(a, vars, cx)?;
                let (want, out) = match op {
                    UnOp::Not => (vec![Ty::Bool], Ty::Bool),
                    UnOp::Neg | UnOp::Abs => (vec![Ty::Int, Ty::Float], t),
                    UnOp::ToFloat => (vec![Ty::Int], Ty::Float),
                    UnOp::ToInt => (vec![Ty::Float], Ty::Int),
                    _ => (vec![Ty::Float], Ty::Float),
                };
                if !want.contains(&t) {
                    return self.fail(cx, format!("`{op}` does not take {t}"));
                }
                out
            }
            Expr::Binary(op, a, b) => {
                let (ta, tb) = (self.ty(a, vars, cx)?, self.ty(b, vars, cx)?);
                if ta != tb {
                    return self.fail(cx, format!("`{op}` has operands of two types, {ta} and {tb}"));
                }
                let ok = match op {
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Min | BinOp::Max => ta != Ty::Bool,
                    BinOp::Div | BinOp::Pow => ta == Ty::Float,
                    BinOp::FloorDiv | BinOp::Mod => ta == Ty::Int,
                    BinOp::Eq | BinOp::Ne => true,
                    BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => ta != Ty::Bool,
                    BinOp::And | BinOp::Or => ta == Ty::Bool,
                };
                if !ok {
                    return self.fail(cx, format!("`{op}` does not take {ta}"));
                }
                if op.is_comparison() {
                    Ty::Bool
                } else {
                    ta
                }
            }
            Expr::Select(c, a, b) => {
                if self.ty(c, vars, cx)? != Ty::Bool {
                    return self.fail(cx, "`select` condition is not bool");
                }
                let (ta, tb) = (self.ty(a, vars, cx)?, self.ty(b, vars, cx)?);
                if ta != tb {
                    return self.fail(cx, format!("`select` arms have two types, {ta} and {tb}"));
                }
                ta
            }
            Expr::Reduce { op, var, lo, hi, body } => {
                for bound in [lo, hi] {
                    if self.ty(bound, vars, cx)? != Ty::Int {
                        return self.fail(cx, format!("bound of reduction over `{var}` is not int"));
                    }
                }
                if crate::kernel::ITER_VARS.contains(&var.as_str()) || vars.iter().any(|(n, _)| n == var) {
                    return self.fail(cx, format!("reduction variable `{var}` shadows a variable in scope"));
                }
                vars.push((var.clone(), Ty::Int));
                let t = self.ty(body, vars, cx);
                vars.pop();
                let t = t?;
                let ok = match op {
                    RedOp::Sum | RedOp::Max | RedOp::Min => t != Ty::Bool,
                    RedOp::Any | RedOp::All => t == Ty::Bool,
                };
                if !ok {
                    return self.fail(cx, format!("`{op}` reduction does not take {t}"));
                }
                t
            }
        })
    }

    fn expect(&self, e: &Expr, vars: &[(&str, Ty)], want: Ty, cx: &str) -> Result<(), VerifyError> {
        let mut scope: Vec<(String, Ty)> = vars.iter().map(|(n, t)| (n.to_string(), *t)).collect();
        let t = self.ty(e, &mut scope, cx)?;
        if t != want {
            return self.fail(cx, format!("expected {want}, found {t}"));
        }
        Ok(())
    }
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic() || x == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

const I: Ty = Ty::Int;
const F: Ty = Ty::Float;

/// Checks a kernel and returns the facts backends need.
pub fn verify(k: &Kernel) -> Result<KernelInfo, VerifyError> {
    let mut cx = Ctx { kernel: k, dims: BTreeSet::new(), readable: BTreeMap::new() };
    let mut free_dims = Vec::new();
    let mut derived_dims = Vec::new();
    if !is_ident(&k.name) {
        return cx.fail("name", format!("`{}` is not an identifier", k.name));
    }
    for d in &k.dims {
        if !is_ident(&d.name) || cx.dims.contains(&d.name) {
            return cx.fail("dims", format!("dim `{}` is declared twice or is not an identifier", d.name));
        }
        match &d.def {
            None => free_dims.push(d.name.clone()),
            Some(e) => {
                cx.expect(e, &[], I, &format!("dim {}", d.name))?;
                derived_dims.push(d.name.clone());
            }
        }
        cx.dims.insert(d.name.clone());
    }
    for r in &k.requires {
        cx.expect(r, &[], Ty::Bool, "require")?;
    }
    let check_extent = |cx: &Ctx, ext: &Extent, what: &str| -> Result<(), VerifyError> {
        match ext {
            Extent::Dim(d) if !cx.dims.contains(d) => cx.fail(what, format!("extent `{d}` is not a declared dim")),
            Extent::Fixed(n) if *n < 1 => cx.fail(what, format!("fixed extent {n} is not positive")),
            _ => Ok(()),
        }
    };
    let mut names = BTreeSet::new();
    let mut outputs = 0;
    for t in &k.tensors {
        let what = format!("tensor {}", t.name);
        if !is_ident(&t.name) || !names.insert(t.name.clone()) {
            return cx.fail(&what, "declared twice or not an identifier");
        }
        for ext in &t.shape {
            check_extent(&cx, ext, &what)?;
        }
        match &t.kind {
            TensorKind::Input => {}
            TensorKind::Output => {
                outputs += 1;
                if t.dtype.is_int() {
                    return cx.fail(&what, "the output must be a float tensor");
                }
            }
            TensorKind::Derived { vars, def } => {
                if vars.len() != t.shape.len() {
                    return cx.fail(&what, format!("{} index variables for {} axes", vars.len(), t.shape.len()));
                }
                let uniq: BTreeSet<_> = vars.iter().collect();
                if uniq.len() != vars.len() || vars.iter().any(|v| !is_ident(v)) {
                    return cx.fail(&what, "index variables must be distinct identifiers");
                }
                if !matches!(t.dtype, DType::F32 | DType::I32) {
                    return cx.fail(&what, "derived tensors are f32 or i32");
                }
                let scope: Vec<(&str, Ty)> = vars.iter().map(|v| (v.as_str(), I)).collect();
                let body = match def {
                    TensorDef::Map(e) => e,
                    TensorDef::Cumsum { axis, body } => {
                        if *axis >= vars.len() {
                            return cx.fail(&what, format!("cumsum axis {axis} is out of range"));
                        }
                        body
                    }
                };
                cx.expect(body, &scope, t.dtype.value_ty(), &what)?;
            }
        }
        if t.kind != TensorKind::Output {
            cx.readable.insert(t.name.clone(), (t.dtype, t.shape.len()));
        }
    }
    if outputs != 1 {
        return cx.fail("tensors", format!("a kernel has exactly one output, found {outputs}"));
    }
    let out_t = k.output();
    for v in ITER_VARS {
        check_extent(&cx, k.iter.get(v).expect("iter var"), "iter")?;
    }
    // The output is indexed by a permutation of b h i e whose extents match `iter`.
    let mut out_axis = BTreeMap::new();
    if k.out.len() != out_t.shape.len() {
        return cx.fail("out", format!("`out` lists {} indices for {} axes of `{}`", k.out.len(), out_t.shape.len(), out_t.name));
    }
    for (axis, v) in k.out.iter().enumerate() {
        if !["b", "h", "i", "e"].contains(&v.as_str()) || out_axis.insert(v.clone(), axis).is_some() {
            return cx.fail("out", format!("`{v}` is not one of b h i e, or appears twice"));
        }
        if k.iter.get(v) != Some(&out_t.shape[axis]) {
            return cx
                .fail("out", format!("axis {axis} of `{}` is {} but `{v}` ranges over {}", out_t.name, out_t.shape[axis], k.iter.get(v).expect("iter var")));
        }
    }
    if out_axis.len() != 4 {
        return cx.fail("out", "`out` must use each of b h i e once");
    }
    cx.expect(&k.value, &[("b", I), ("h", I), ("j", I), ("e", I)], F, "value")?;
    if k.branches.is_empty() {
        return cx.fail("branches", "a kernel has at least one branch");
    }
    let pair: [(&str, Ty); 4] = [("b", I), ("h", I), ("i", I), ("j", I)];
    let row: [(&str, Ty); 3] = [("b", I), ("h", I), ("i", I)];
    let mut branch_deps = Vec::new();
    for (n, br) in k.branches.iter().enumerate() {
        let c = |s: &str| format!("branch {n} {s}");
        cx.expect(&br.score, &pair, F, &c("score"))?;
        if let Some(e) = &br.bias {
            cx.expect(e, &pair, F, &c("bias"))?;
        }
        if let Some(e) = &br.mask {
            cx.expect(e, &pair, Ty::Bool, &c("mask"))?;
        }
        if let Some(e) = &br.decay {
            cx.expect(e, &pair, F, &c("decay"))?;
        }
        if let Some(e) = &br.weight {
            cx.expect(e, &row, F, &c("weight"))?;
        }
        match &br.norm {
            Norm::Softmax { sink, post } => {
                if let Some(e) = sink {
                    cx.expect(e, &row, F, &c("sink"))?;
                }
                if let Some(e) = post {
                    let mut scope = pair.to_vec();
                    scope.push(("w", F));
                    cx.expect(e, &scope, F, &c("post"))?;
                }
            }
            Norm::Map(e) => {
                let mut scope = pair.to_vec();
                scope.push(("s", F));
                cx.expect(e, &scope, F, &c("map"))?;
            }
            Norm::Linear { eps } => {
                if eps.0.is_nan() || eps.0 < 0.0 {
                    return cx.fail(&c("norm"), "linear epsilon must be >= 0");
                }
            }
        }
        branch_deps.push(BranchDeps {
            score: Deps::of(&br.score),
            bias: br.bias.as_ref().map(Deps::of),
            mask: br.mask.as_ref().map(Deps::of),
            decay: br.decay.as_ref().map(Deps::of),
        });
    }
    if let Some(g) = &k.gate {
        cx.expect(g, &[("b", I), ("h", I), ("i", I), ("e", I)], F, "gate")?;
    }
    let masked = k.branches.iter().any(|b| b.mask.is_some());
    Ok(KernelInfo { free_dims, derived_dims, out_axis, branch_deps, masked })
}
