//! One attention kernel: declarations plus the six axes (score, bias, mask, normalization,
//! decay, gate) and the aggregation, each an [`Expr`] over the iteration indices.
//!
//! Iteration indices are the variables `b` (batch), `h` (head), `i` (query row), `j` (key),
//! `e` (output channel). For every `(b, h, i)` the kernel computes, per branch,
//! `p_ij = norm_j(score + bias | mask) * decay * weight` and `o[.., e] = gate * Σ_j p_ij value(j, e)`
//! (the exact contract is [`crate::reference`]).

use crate::expr::{Expr, F64};
use std::fmt;

/// Element type of a tensor in memory. Arithmetic is f64 in the reference and f32 in kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::I32];
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }
    pub fn is_int(self) -> bool {
        self == DType::I32
    }
    /// The scalar type a load of this dtype produces.
    pub fn value_ty(self) -> crate::Ty {
        if self.is_int() {
            crate::Ty::Int
        } else {
            crate::Ty::Float
        }
    }
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The length of one tensor axis: a named dimension or a fixed number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Extent {
    Dim(String),
    Fixed(i64),
}

impl Extent {
    pub fn to_expr(&self) -> Expr {
        match self {
            Extent::Dim(d) => Expr::Dim(d.clone()),
            Extent::Fixed(n) => Expr::Int(*n),
        }
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Extent::Dim(d) => f.write_str(d),
            Extent::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// A named dimension: free (bound from input shapes at run time) or defined from earlier dims.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DimDecl {
    pub name: String,
    pub def: Option<Expr>,
}

/// How a derived tensor is computed from inputs and earlier derived tensors, once, before
/// the attention itself. Index variables are the tensor's `vars`, one per axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TensorDef {
    /// `t[vars] = body`.
    Map(Expr),
    /// `t[.., x_axis, ..] = Σ_{u <= x_axis} body[x_axis := u]`: an inclusive prefix sum.
    Cumsum { axis: usize, body: Expr },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TensorKind {
    Input,
    Output,
    Derived { vars: Vec<String>, def: TensorDef },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorDecl {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Extent>,
    pub kind: TensorKind,
}

/// The extents of the iteration indices.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Iter {
    pub b: Extent,
    pub h: Extent,
    pub i: Extent,
    pub j: Extent,
    pub e: Extent,
}

impl Iter {
    pub fn get(&self, var: &str) -> Option<&Extent> {
        match var {
            "b" => Some(&self.b),
            "h" => Some(&self.h),
            "i" => Some(&self.i),
            "j" => Some(&self.j),
            "e" => Some(&self.e),
            _ => None,
        }
    }
}

/// The iteration index names, in the order the IR text prints them.
pub const ITER_VARS: [&str; 5] = ["b", "h", "i", "j", "e"];

/// Normalization of the scores of one query row over its unmasked keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Norm {
    /// `exp(s_j - m) / (Σ exp(s - m) + [exp(sink - m)])`, then optionally `post` applied to
    /// each weight (variable `w`): clipped softmax and other post-softmax maps.
    Softmax { sink: Option<Expr>, post: Option<Expr> },
    /// Pointwise `p_j = f(s_j)` (variable `s`): sigmoid, relu, relu², none (linear attention).
    Map(Expr),
    /// `p_j = s_j / (Σ s + eps)`: the linear-attention denominator.
    Linear { eps: F64 },
}

/// One normalized attention map; kernels with several (ConViT GPSA) add them up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Branch {
    pub score: Expr,
    pub bias: Option<Expr>,
    pub mask: Option<Expr>,
    pub norm: Norm,
    pub decay: Option<Expr>,
    /// Blend factor of this branch, a function of `(b, h, i)`.
    pub weight: Option<Expr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub name: String,
    pub dims: Vec<DimDecl>,
    /// Inputs, derived tensors and the one output, in declaration order.
    pub tensors: Vec<TensorDecl>,
    /// Run-time conditions on the dims (`N == M`, `H % G == 0`), checked when shapes bind.
    pub requires: Vec<Expr>,
    pub iter: Iter,
    /// The value aggregated for key `j` and output channel `e`.
    pub value: Expr,
    /// The output's axes as iteration variables: a permutation of `b h i e`.
    pub out: Vec<String>,
    pub branches: Vec<Branch>,
    /// Output gate, a function of `(b, h, i, e)`; multiplies the aggregated row.
    pub gate: Option<Expr>,
}

impl Kernel {
    pub fn tensor(&self, name: &str) -> Option<&TensorDecl> {
        self.tensors.iter().find(|t| t.name == name)
    }
    pub fn inputs(&self) -> impl Iterator<Item = &TensorDecl> {
        self.tensors.iter().filter(|t| t.kind == TensorKind::Input)
    }
    pub fn derived(&self) -> impl Iterator<Item = &TensorDecl> {
        self.tensors.iter().filter(|t| matches!(t.kind, TensorKind::Derived { .. }))
    }
    /// The output tensor (verify guarantees there is exactly one).
    pub fn output(&self) -> &TensorDecl {
        self.tensors.iter().find(|t| t.kind == TensorKind::Output).expect("kernel has an output (checked by verify)")
    }

    /// Static type of an expression of this kernel (for a verified kernel this cannot fail:
    /// iteration and reduction variables are ints, `s` and `w` floats).
    pub fn ty_of(&self, e: &Expr) -> crate::Ty {
        use crate::{BinOp, Ty, UnOp};
        match e {
            Expr::Int(_) | Expr::Dim(_) => Ty::Int,
            Expr::Float(_) => Ty::Float,
            Expr::Bool(_) => Ty::Bool,
            Expr::Var(v) => {
                if v == "s" || v == "w" || v == crate::DOT_VAR || v == crate::DOT2_VAR {
                    Ty::Float
                } else {
                    Ty::Int
                }
            }
            Expr::Load(t, _) => self.tensor(t).map_or(Ty::Float, |t| t.dtype.value_ty()),
            Expr::Unary(op, a) => match op {
                UnOp::Not => Ty::Bool,
                UnOp::Neg | UnOp::Abs => self.ty_of(a),
                UnOp::ToInt => Ty::Int,
                _ => Ty::Float,
            },
            Expr::Binary(op, a, _) => {
                if op.is_comparison() || matches!(op, BinOp::And | BinOp::Or) {
                    Ty::Bool
                } else {
                    self.ty_of(a)
                }
            }
            Expr::Select(_, a, _) => self.ty_of(a),
            Expr::Reduce { body, .. } => self.ty_of(body),
        }
    }

    /// Every expression of the kernel with a label, for analyses that look at all of them.
    pub fn exprs(&self) -> Vec<(String, &Expr)> {
        let mut v: Vec<(String, &Expr)> = Vec::new();
        for d in &self.dims {
            if let Some(e) = &d.def {
                v.push((format!("dim {}", d.name), e));
            }
        }
        for (n, r) in self.requires.iter().enumerate() {
            v.push((format!("require #{n}"), r));
        }
        for t in &self.tensors {
            if let TensorKind::Derived { def, .. } = &t.kind {
                let body = match def {
                    TensorDef::Map(e) => e,
                    TensorDef::Cumsum { body, .. } => body,
                };
                v.push((format!("tensor {}", t.name), body));
            }
        }
        v.push(("value".into(), &self.value));
        for (n, br) in self.branches.iter().enumerate() {
            v.push((format!("branch {n} score"), &br.score));
            let opts = [("bias", &br.bias), ("mask", &br.mask), ("decay", &br.decay), ("weight", &br.weight)];
            for (label, e) in opts {
                if let Some(e) = e {
                    v.push((format!("branch {n} {label}"), e));
                }
            }
            match &br.norm {
                Norm::Softmax { sink, post } => {
                    if let Some(e) = sink {
                        v.push((format!("branch {n} sink"), e));
                    }
                    if let Some(e) = post {
                        v.push((format!("branch {n} post"), e));
                    }
                }
                Norm::Map(e) => v.push((format!("branch {n} map"), e)),
                Norm::Linear { .. } => {}
            }
        }
        if let Some(g) = &self.gate {
            v.push(("gate".into(), g));
        }
        v
    }
}
