//! Binding a kernel's named dims to run-time sizes, from the shapes of its input tensors.
//!
//! Every backend binds the same way, so a missing or mis-shaped tensor gives the same error
//! everywhere: it names the tensor and the shape the spec expects, with the sizes known so far.

use crate::expr::{floor_div, floor_mod, BinOp, Expr, UnOp};
use crate::kernel::*;
use std::collections::BTreeMap;

/// Sizes of every dim (free and derived) of one kernel instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bindings {
    pub dims: BTreeMap<String, i64>,
}

impl Bindings {
    pub fn get(&self, d: &str) -> Option<i64> {
        self.dims.get(d).copied()
    }
    pub fn extent(&self, e: &Extent) -> i64 {
        match e {
            Extent::Fixed(n) => *n,
            Extent::Dim(d) => self.dims[d],
        }
    }
    /// These bindings with the computed dims of `k` that they lack: a pass may add computed
    /// dims (the linear pass's `__fc`) to a kernel whose dims were bound from the spec.
    /// Free dims are never invented: one that is missing stays missing.
    pub fn complete(&self, k: &Kernel) -> Bindings {
        let mut out = self.clone();
        for d in &k.dims {
            if let (Some(def), None) = (&d.def, out.dims.get(&d.name)) {
                if let Ok(v) = eval_dims(def, &out.dims) {
                    out.dims.insert(d.name.clone(), v);
                }
            }
        }
        out
    }
    /// Concrete shape of a tensor.
    pub fn shape(&self, t: &TensorDecl) -> Vec<usize> {
        t.shape.iter().map(|e| self.extent(e) as usize).collect()
    }
    /// `[B=2, H=4, N=?, 64]`: a declared shape with the sizes known so far.
    pub fn describe(&self, t: &TensorDecl) -> String {
        let parts: Vec<String> = t
            .shape
            .iter()
            .map(|e| match e {
                Extent::Fixed(n) => n.to_string(),
                Extent::Dim(d) => match self.dims.get(d) {
                    Some(v) => format!("{d}={v}"),
                    None => format!("{d}=?"),
                },
            })
            .collect();
        format!("[{}]", parts.join(", "))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("missing input tensor `{name}` (expected {dtype} with shape {expected})")]
    Missing { name: String, dtype: DType, expected: String },
    #[error("input `{name}` has shape {found:?} but the spec expects {expected}")]
    Shape { name: String, found: Vec<usize>, expected: String },
    #[error("dim `{dim}` has no value: no input tensor has it in its shape; give it explicitly (e.g. --dims {dim}=64)")]
    Unbound { dim: String },
    #[error("dim `{dim}` = {value} but must be at least 1")]
    NonPositive { dim: String, value: i64 },
    #[error("dim `{dim}` is given as {given}, but input `{tensor}` says {found}")]
    Conflict { dim: String, given: i64, tensor: String, found: i64 },
    #[error("input `{name}` has {found} axes {shape:?} but the spec declares {expected} axes: {decl}")]
    Rank { name: String, found: usize, shape: Vec<usize>, expected: usize, decl: String },
    #[error("inputs disagree on dim `{dim}`: `{first}` has {first_value} (axis {first_axis}) but `{second}` has {second_value} (axis {second_axis})")]
    Disagree { dim: String, first: String, first_axis: usize, first_value: i64, second: String, second_axis: usize, second_value: i64 },
    #[error("`{tensor}` would have {count} elements ({shape}), more than attnc handles ({MAX_ELEMENTS} = 2^48)")]
    TooLarge { tensor: String, shape: String, count: String },
    #[error("requirement `{text}` does not hold for {values}")]
    Require { text: String, values: String },
    #[error("cannot evaluate `{text}`: {why}")]
    Eval { text: String, why: String },
}

/// The most elements a tensor may have (so that sizes in bytes fit every integer type that
/// holds them; no machine has memory for more).
pub const MAX_ELEMENTS: u128 = 1 << 48;

/// Element count of a tensor at bound dims, refused when it exceeds [`MAX_ELEMENTS`].
pub fn checked_len(t: &TensorDecl, b: &Bindings) -> Result<usize, BindError> {
    let mut n: u128 = 1;
    for e in &t.shape {
        n = n.saturating_mul(b.extent(e).max(0) as u128);
    }
    if n > MAX_ELEMENTS {
        let count = if n == u128::MAX { "more than 2^128".to_string() } else { n.to_string() };
        return Err(BindError::TooLarge { tensor: t.name.clone(), shape: b.describe(t), count });
    }
    Ok(n as usize)
}

/// Checks that every tensor of `k` (inputs, derived, output) fits at these dims.
pub fn check_sizes(k: &Kernel, b: &Bindings) -> Result<(), BindError> {
    k.tensors.iter().try_for_each(|t| checked_len(t, b).map(|_| ()))
}

/// Evaluates an integer or boolean expression over dims only (dim definitions, requirements).
/// Arithmetic that overflows `i64` is an error, not a wrapped value.
pub fn eval_dims(e: &Expr, dims: &BTreeMap<String, i64>) -> Result<i64, String> {
    let rec = |x: &Expr| eval_dims(x, dims);
    Ok(match e {
        Expr::Int(n) => *n,
        Expr::Bool(b) => *b as i64,
        Expr::Dim(d) => *dims.get(d).ok_or_else(|| format!("dim `{d}` is not bound"))?,
        Expr::Unary(UnOp::Neg, a) => rec(a)?.checked_neg().ok_or("integer overflow")?,
        Expr::Unary(UnOp::Abs, a) => rec(a)?.checked_abs().ok_or("integer overflow")?,
        Expr::Unary(UnOp::Not, a) => (rec(a)? == 0) as i64,
        Expr::Select(c, a, b) => {
            if rec(c)? != 0 {
                rec(a)?
            } else {
                rec(b)?
            }
        }
        Expr::Binary(op, a, b) => {
            let (x, y) = (rec(a)?, rec(b)?);
            match op {
                BinOp::Add => x.checked_add(y).ok_or_else(|| format!("integer overflow in {x} + {y}"))?,
                BinOp::Sub => x.checked_sub(y).ok_or_else(|| format!("integer overflow in {x} - {y}"))?,
                BinOp::Mul => x.checked_mul(y).ok_or_else(|| format!("integer overflow in {x} × {y}"))?,
                BinOp::FloorDiv | BinOp::Mod if y == 0 => return Err("division by zero".into()),
                BinOp::FloorDiv => floor_div(x, y),
                BinOp::Mod => floor_mod(x, y),
                BinOp::Min => x.min(y),
                BinOp::Max => x.max(y),
                BinOp::Eq => (x == y) as i64,
                BinOp::Ne => (x != y) as i64,
                BinOp::Lt => (x < y) as i64,
                BinOp::Le => (x <= y) as i64,
                BinOp::Gt => (x > y) as i64,
                BinOp::Ge => (x >= y) as i64,
                BinOp::And => (x != 0 && y != 0) as i64,
                BinOp::Or => (x != 0 || y != 0) as i64,
                BinOp::Div | BinOp::Pow => return Err(format!("`{op}` is not an integer operation")),
            }
        }
        other => return Err(format!("`{other}` is not a dim expression")),
    })
}

/// Binds dims from input shapes (and explicit values, e.g. from `--dims`), evaluates derived
/// dims and checks the kernel's requirements.
pub fn bind(k: &Kernel, shapes: &BTreeMap<String, Vec<usize>>, explicit: &BTreeMap<String, i64>) -> Result<Bindings, BindError> {
    let mut b = Bindings::default();
    let free: Vec<&DimDecl> = k.dims.iter().filter(|d| d.def.is_none()).collect();
    for d in &free {
        if let Some(&v) = explicit.get(&d.name) {
            b.dims.insert(d.name.clone(), v);
        }
    }
    // A tensor of the wrong rank is named before anything else (its axes bind nothing).
    for t in k.inputs() {
        if let Some(found) = shapes.get(&t.name) {
            if found.len() != t.shape.len() {
                let decl = format!("{}[{}]", t.dtype, t.shape.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "));
                return Err(BindError::Rank { name: t.name.clone(), found: found.len(), shape: found.clone(), expected: t.shape.len(), decl });
            }
        }
    }
    // Two passes: the first binds free dims from every input, the second (after derived dims
    // are known) checks every axis, so errors show as many known sizes as possible.
    let mut from: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for t in k.inputs() {
        let Some(found) = shapes.get(&t.name) else {
            continue;
        };
        for (axis, (ext, &n)) in t.shape.iter().zip(found).enumerate() {
            if let Extent::Dim(d) = ext {
                if free.iter().any(|f| &f.name == d) {
                    let n = i64::try_from(n).unwrap_or(i64::MAX);
                    match b.dims.get(d) {
                        None => {
                            b.dims.insert(d.clone(), n);
                            from.insert(d.clone(), (t.name.clone(), axis));
                        }
                        Some(&given) if explicit.contains_key(d) && given != n => {
                            return Err(BindError::Conflict { dim: d.clone(), given, tensor: t.name.clone(), found: n });
                        }
                        Some(&first) if first != n => {
                            let (first_t, first_axis) = from[d].clone();
                            return Err(BindError::Disagree {
                                dim: d.clone(),
                                first: first_t,
                                first_axis,
                                first_value: first,
                                second: t.name.clone(),
                                second_axis: axis,
                                second_value: n,
                            });
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
    for d in &k.dims {
        match &d.def {
            None => {
                if !b.dims.contains_key(&d.name) {
                    // A dim that only appears in the output (or nowhere) must be given.
                    if let Some(t) = k.inputs().find(|t| !shapes.contains_key(&t.name) && t.shape.contains(&Extent::Dim(d.name.clone()))) {
                        return Err(BindError::Missing { name: t.name.clone(), dtype: t.dtype, expected: b.describe(t) });
                    }
                    return Err(BindError::Unbound { dim: d.name.clone() });
                }
            }
            Some(e) => {
                let v = eval_dims(e, &b.dims).map_err(|why| BindError::Eval { text: e.to_string(), why })?;
                b.dims.insert(d.name.clone(), v);
            }
        }
        let v = b.dims[&d.name];
        if v < 1 {
            return Err(BindError::NonPositive { dim: d.name.clone(), value: v });
        }
    }
    check_sizes(k, &b)?;
    for t in k.inputs() {
        let expected = b.describe(t);
        let Some(found) = shapes.get(&t.name) else {
            return Err(BindError::Missing { name: t.name.clone(), dtype: t.dtype, expected });
        };
        let want = b.shape(t);
        if *found != want {
            return Err(BindError::Shape { name: t.name.clone(), found: found.clone(), expected });
        }
    }
    for r in &k.requires {
        let ok = eval_dims(r, &b.dims).map_err(|why| BindError::Eval { text: r.to_string(), why })?;
        if ok == 0 {
            let mut used = Vec::new();
            r.walk(&mut |x| {
                if let Expr::Dim(d) = x {
                    let s = format!("{d} = {}", b.dims[d]);
                    if !used.contains(&s) {
                        used.push(s);
                    }
                }
            });
            return Err(BindError::Require { text: crate::pretty::infix(r), values: used.join(", ") });
        }
    }
    Ok(b)
}
