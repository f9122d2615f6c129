//! The reference interpreter: the meaning of a kernel, in f64, with straightforward loops.
//!
//! Every backend and every rewrite is tested against this file, so it favours being
//! obviously right over being fast. For each `(b, h, i)`:
//!
//! 1. per branch, the live keys are the `j` whose mask holds; their scores are
//!    `s_j = score + bias`;
//! 2. the branch's weights `p_j` are `norm(s)` over the live keys (softmax with the max
//!    subtracted and an optional sink logit in the denominator, then an optional `post` map;
//!    or a pointwise map; or `s_j / (Σ s + eps)`), times `decay`, times the branch `weight`;
//! 3. `acc[e] = Σ_branches Σ_j p_j · value(j, e)`;
//! 4. a row with no live key in any branch outputs zeros (the gate is not applied); any
//!    other row outputs `acc[e] · gate(e)`.
//!
//! NaN propagates: `max`/`min` return NaN when either side is NaN, so a NaN score makes its
//! softmax row NaN. Index arithmetic is checked: a read outside a tensor, or an integer
//! division by zero, is an error naming the tensor, never a silent clamp.

use crate::bind::{bind, BindError, Bindings};
use crate::expr::{floor_div, floor_mod, BinOp, Expr, RedOp, UnOp};
use crate::kernel::*;
use crate::verify::KernelInfo;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// A dense row-major tensor of f64 values (integers are stored exactly).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match its shape");
        Tensor { shape, data }
    }
    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor { shape, data: vec![0.0; n] }
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RefError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("{context}: index {index} is out of bounds for axis {axis} of `{tensor}` (length {len})")]
    OutOfBounds { context: String, tensor: String, axis: usize, index: i64, len: usize },
    #[error("{context}: integer division by zero")]
    DivByZero { context: String },
    /// `int` of NaN: the checker refuses an `int` whose operand may be NaN, so only a kernel
    /// built without it can get here.
    #[error("{context}: `int` of NaN")]
    IntOfNan { context: String },
}

/// The bound `int(x)` saturates at: ±2^24, where f32 still holds every integer. Sums of a
/// few saturated values stay far inside i32, the backends' integers (`int(log(0.0))` plus a
/// bucket offset must not wrap around on one backend and not on another).
pub const INT_LIMIT: f64 = 16_777_216.0;

/// `int(x)`: toward zero, saturating at ±[`INT_LIMIT`]; NaN is `None`.
pub fn to_int(x: f64) -> Option<i64> {
    (!x.is_nan()).then(|| x.trunc().clamp(-INT_LIMIT, INT_LIMIT) as i64)
}

/// Same-type scalar values. Types were checked by `verify`; a mismatch here is a bug.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum V {
    I(i64),
    F(f64),
    B(bool),
}

impl V {
    pub(crate) fn i(self) -> i64 {
        match self {
            V::I(x) => x,
            other => unreachable!("verified kernel: expected int, got {other:?}"),
        }
    }
    pub(crate) fn f(self) -> f64 {
        match self {
            V::F(x) => x,
            other => unreachable!("verified kernel: expected float, got {other:?}"),
        }
    }
    pub(crate) fn b(self) -> bool {
        match self {
            V::B(x) => x,
            other => unreachable!("verified kernel: expected bool, got {other:?}"),
        }
    }
}

/// NaN-propagating max and min (f64::max ignores NaN; the contract says NaN propagates).
pub fn fmax(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}
pub fn fmin(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

/// The reference definitions of the float functions.
pub fn unary_f64(op: UnOp, x: f64) -> f64 {
    match op {
        UnOp::Neg => -x,
        UnOp::Abs => x.abs(),
        UnOp::Exp => x.exp(),
        UnOp::Log => x.ln(),
        UnOp::Sqrt => x.sqrt(),
        UnOp::Tanh => x.tanh(),
        UnOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnOp::Silu => x / (1.0 + (-x).exp()),
        UnOp::Relu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                0.0
            }
        }
        UnOp::Elu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                x.exp_m1()
            }
        }
        UnOp::Cos => x.cos(),
        UnOp::Sin => x.sin(),
        UnOp::Floor => x.floor(),
        UnOp::Ceil => x.ceil(),
        UnOp::Round => x.round_ties_even(),
        UnOp::Not | UnOp::ToFloat | UnOp::ToInt => unreachable!("not a float function"),
    }
}

/// An expression with variables resolved to slots and dims to numbers.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Const(V),
    Slot(usize),
    Load { t: usize, idx: Vec<Node> },
    Un(UnOp, Box<Node>),
    Bin(BinOp, Box<Node>, Box<Node>),
    Sel(Box<Node>, Box<Node>, Box<Node>),
    Red { op: RedOp, slot: usize, lo: Box<Node>, hi: Box<Node>, body: Box<Node> },
}

pub(crate) struct Store {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<f64>,
    pub(crate) is_int: bool,
}

pub(crate) struct Machine<'a> {
    pub(crate) dims: &'a Bindings,
    pub(crate) tensors: Vec<Store>,
    pub(crate) names: BTreeMap<String, usize>,
}

/// Slots 0..7 hold `b h i j e s w`; reductions and tensor variables take slots after those.
pub(crate) const FIXED: [&str; 7] = ["b", "h", "i", "j", "e", "s", "w"];

impl Machine<'_> {
    pub(crate) fn compile(&self, e: &Expr, scope: &mut Vec<String>) -> Node {
        match e {
            Expr::Int(n) => Node::Const(V::I(*n)),
            Expr::Float(x) => Node::Const(V::F(x.0)),
            Expr::Bool(b) => Node::Const(V::B(*b)),
            Expr::Dim(d) => Node::Const(V::I(self.dims.dims[d])),
            Expr::Var(v) => Node::Slot(scope.iter().rposition(|s| s == v).expect("verified: variable in scope")),
            Expr::Load(t, idx) => Node::Load { t: self.names[t], idx: idx.iter().map(|x| self.compile(x, scope)).collect() },
            Expr::Unary(op, a) => Node::Un(*op, Box::new(self.compile(a, scope))),
            Expr::Binary(op, a, b) => Node::Bin(*op, Box::new(self.compile(a, scope)), Box::new(self.compile(b, scope))),
            Expr::Select(c, a, b) => Node::Sel(Box::new(self.compile(c, scope)), Box::new(self.compile(a, scope)), Box::new(self.compile(b, scope))),
            Expr::Reduce { op, var, lo, hi, body } => {
                let lo = Box::new(self.compile(lo, scope));
                let hi = Box::new(self.compile(hi, scope));
                scope.push(var.clone());
                let slot = scope.len() - 1;
                let body = Box::new(self.compile(body, scope));
                scope.pop();
                Node::Red { op: *op, slot, lo, hi, body }
            }
        }
    }

    pub(crate) fn eval(&self, n: &Node, env: &mut Vec<V>, cx: &str) -> Result<V, RefError> {
        Ok(match n {
            Node::Const(v) => *v,
            Node::Slot(s) => env[*s],
            Node::Load { t, idx } => {
                let st = &self.tensors[*t];
                let mut flat = 0usize;
                for (axis, (x, &len)) in idx.iter().zip(&st.shape).enumerate() {
                    let i = self.eval(x, env, cx)?.i();
                    if i < 0 || i as usize >= len {
                        return Err(RefError::OutOfBounds { context: cx.to_string(), tensor: st.name.clone(), axis, index: i, len });
                    }
                    flat = flat * len + i as usize;
                }
                let x = st.data[flat];
                if st.is_int {
                    V::I(x as i64)
                } else {
                    V::F(x)
                }
            }
            Node::Un(op, a) => {
                let a = self.eval(a, env, cx)?;
                match (op, a) {
                    (UnOp::Not, V::B(x)) => V::B(!x),
                    (UnOp::Neg, V::I(x)) => V::I(x.wrapping_neg()),
                    (UnOp::Abs, V::I(x)) => V::I(x.wrapping_abs()),
                    (UnOp::ToFloat, V::I(x)) => V::F(x as f64),
                    (UnOp::ToInt, V::F(x)) => V::I(to_int(x).ok_or_else(|| RefError::IntOfNan { context: cx.to_string() })?),
                    (op, V::F(x)) => V::F(unary_f64(*op, x)),
                    (op, v) => unreachable!("verified kernel: `{op}` on {v:?}"),
                }
            }
            Node::Bin(op, a, b) => {
                let (a, b) = (self.eval(a, env, cx)?, self.eval(b, env, cx)?);
                match (a, b) {
                    (V::I(x), V::I(y)) => match op {
                        BinOp::Add => V::I(x.wrapping_add(y)),
                        BinOp::Sub => V::I(x.wrapping_sub(y)),
                        BinOp::Mul => V::I(x.wrapping_mul(y)),
                        BinOp::FloorDiv | BinOp::Mod if y == 0 => return Err(RefError::DivByZero { context: cx.to_string() }),
                        BinOp::FloorDiv => V::I(floor_div(x, y)),
                        BinOp::Mod => V::I(floor_mod(x, y)),
                        BinOp::Min => V::I(x.min(y)),
                        BinOp::Max => V::I(x.max(y)),
                        cmp => V::B(compare(*cmp, x.cmp(&y))),
                    },
                    (V::F(x), V::F(y)) => match op {
                        BinOp::Add => V::F(x + y),
                        BinOp::Sub => V::F(x - y),
                        BinOp::Mul => V::F(x * y),
                        BinOp::Div => V::F(x / y),
                        BinOp::Pow => V::F(x.powf(y)),
                        BinOp::Min => V::F(fmin(x, y)),
                        BinOp::Max => V::F(fmax(x, y)),
                        BinOp::Eq => V::B(x == y),
                        BinOp::Ne => V::B(x != y),
                        BinOp::Lt => V::B(x < y),
                        BinOp::Le => V::B(x <= y),
                        BinOp::Gt => V::B(x > y),
                        BinOp::Ge => V::B(x >= y),
                        other => unreachable!("verified kernel: `{other}` on floats"),
                    },
                    (V::B(x), V::B(y)) => match op {
                        BinOp::And => V::B(x && y),
                        BinOp::Or => V::B(x || y),
                        BinOp::Eq => V::B(x == y),
                        BinOp::Ne => V::B(x != y),
                        other => unreachable!("verified kernel: `{other}` on bools"),
                    },
                    (a, b) => unreachable!("verified kernel: `{op}` on {a:?} and {b:?}"),
                }
            }
            Node::Sel(c, a, b) => {
                if self.eval(c, env, cx)?.b() {
                    self.eval(a, env, cx)?
                } else {
                    self.eval(b, env, cx)?
                }
            }
            Node::Red { op, slot, lo, hi, body } => {
                let (lo, hi) = (self.eval(lo, env, cx)?.i(), self.eval(hi, env, cx)?.i());
                if env.len() <= *slot {
                    env.resize(*slot + 1, V::I(0));
                }
                let mut acc: Option<V> = None;
                for x in lo..hi {
                    env[*slot] = V::I(x);
                    let v = self.eval(body, env, cx)?;
                    acc = Some(match acc {
                        None => v,
                        Some(a) => match (op, a, v) {
                            (RedOp::Sum, V::I(a), V::I(v)) => V::I(a.wrapping_add(v)),
                            (RedOp::Sum, V::F(a), V::F(v)) => V::F(a + v),
                            (RedOp::Max, V::I(a), V::I(v)) => V::I(a.max(v)),
                            (RedOp::Max, V::F(a), V::F(v)) => V::F(fmax(a, v)),
                            (RedOp::Min, V::I(a), V::I(v)) => V::I(a.min(v)),
                            (RedOp::Min, V::F(a), V::F(v)) => V::F(fmin(a, v)),
                            (RedOp::Any, V::B(a), V::B(v)) => V::B(a || v),
                            (RedOp::All, V::B(a), V::B(v)) => V::B(a && v),
                            other => unreachable!("verified kernel: reduction {other:?}"),
                        },
                    });
                }
                match acc {
                    Some(v) => v,
                    None => identity(*op, body_is_int(body, &self.tensors)),
                }
            }
        })
    }
}

fn compare(op: BinOp, o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        BinOp::Eq => o == Equal,
        BinOp::Ne => o != Equal,
        BinOp::Lt => o == Less,
        BinOp::Le => o != Greater,
        BinOp::Gt => o == Greater,
        BinOp::Ge => o != Less,
        other => unreachable!("verified kernel: `{other}` on ints"),
    }
}

/// Whether a numeric reduction body is integer-typed, for the identity of an empty range.
fn body_is_int(n: &Node, tensors: &[Store]) -> bool {
    match n {
        Node::Const(V::I(_)) | Node::Slot(_) => true,
        Node::Const(_) => false,
        Node::Load { t, .. } => tensors[*t].is_int,
        Node::Un(op, a) => match op {
            UnOp::Neg | UnOp::Abs => body_is_int(a, tensors),
            _ => false,
        },
        Node::Bin(_, a, _) => body_is_int(a, tensors),
        Node::Sel(_, a, _) => body_is_int(a, tensors),
        Node::Red { body, .. } => body_is_int(body, tensors),
    }
}

fn identity(op: RedOp, int: bool) -> V {
    match (op, int) {
        (RedOp::Any, _) => V::B(false),
        (RedOp::All, _) => V::B(true),
        (RedOp::Sum, true) => V::I(0),
        (RedOp::Sum, false) => V::F(0.0),
        (RedOp::Max, true) => V::I(i64::MIN),
        (RedOp::Max, false) => V::F(f64::NEG_INFINITY),
        (RedOp::Min, true) => V::I(i64::MAX),
        (RedOp::Min, false) => V::F(f64::INFINITY),
    }
}

fn scope_fixed() -> Vec<String> {
    FIXED.iter().map(|s| s.to_string()).collect()
}

/// Runs a verified kernel on named inputs. Shapes bind the dims; `explicit` may give dims
/// that no input carries.
pub fn run(k: &Kernel, _info: &KernelInfo, inputs: &BTreeMap<String, Tensor>, explicit: &BTreeMap<String, i64>) -> Result<Tensor, RefError> {
    let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
    let dims = bind(k, &shapes, explicit)?;
    run_bound(k, &dims, inputs)
}

/// Runs a verified kernel whose dims are already bound (shapes checked by [`bind`]).
pub fn run_bound(k: &Kernel, dims: &Bindings, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, RefError> {
    let m = machine(k, dims, inputs)?;
    attend(k, &m, None)
}

/// The shape of a kernel's saved statistics at bound dims: `[B, H, N, branches]`.
pub fn stats_shape(k: &Kernel, dims: &Bindings) -> Vec<usize> {
    let d = |e: &crate::Extent| dims.extent(e) as usize;
    vec![d(&k.iter.b), d(&k.iter.h), d(&k.iter.i), k.branches.len()]
}

/// The statistic a branch saves, by its normalization: `softmax` its row's log-sum-exp
/// (natural log, the sink included), a linear denominator `Σ s + eps`; other
/// normalizations save nothing (their weights need no row state).
pub fn saves_stats(br: &Branch) -> bool {
    matches!(br.norm, Norm::Softmax { .. } | Norm::Linear { .. })
}

/// Whether two kernels save the same statistics in the same places (a compiled kernel
/// after the passes against its spec): one branch each, saving alike.
pub fn same_stats_layout(a: &Kernel, b: &Kernel) -> bool {
    a.branches.len() == b.branches.len() && a.branches.iter().zip(&b.branches).all(|(x, y)| saves_stats(x) == saves_stats(y))
}

/// [`run_bound`], and the statistics a backward pass needs from the forward, laid out as
/// [`stats_shape`]: per row `(b, h, i)` and branch, the softmax log-sum-exp (−inf for a row
/// with no live key), the linear denominator (0 for a row with no live key), and 0 for a
/// branch that saves nothing ([`saves_stats`]).
pub fn run_with_stats(k: &Kernel, dims: &Bindings, inputs: &BTreeMap<String, Tensor>) -> Result<(Tensor, Tensor), RefError> {
    let m = machine(k, dims, inputs)?;
    let mut stats = Tensor::zeros(stats_shape(k, dims));
    let out = attend(k, &m, Some(&mut stats))?;
    Ok((out, stats))
}

/// Inputs plus every derived tensor, materialized.
pub(crate) fn machine<'a>(k: &Kernel, dims: &'a Bindings, inputs: &BTreeMap<String, Tensor>) -> Result<Machine<'a>, RefError> {
    let mut m = Machine { dims, tensors: Vec::new(), names: BTreeMap::new() };
    for t in &k.tensors {
        match &t.kind {
            TensorKind::Input => {
                let src = &inputs[&t.name];
                m.names.insert(t.name.clone(), m.tensors.len());
                m.tensors.push(Store { name: t.name.clone(), shape: src.shape.clone(), data: src.data.clone(), is_int: t.dtype.is_int() });
            }
            TensorKind::Derived { vars, def } => {
                let shape = dims.shape(t);
                let data = derive(&m, &t.name, vars, def, &shape)?;
                m.names.insert(t.name.clone(), m.tensors.len());
                m.tensors.push(Store { name: t.name.clone(), shape, data, is_int: t.dtype.is_int() });
            }
            TensorKind::Output => {}
        }
    }
    Ok(m)
}

/// A scalar result of [`eval_expr`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// Evaluates expressions of a kernel at concrete values of their free variables, with the
/// kernel's tensors (inputs and derived, materialized once) in scope: the oracle for
/// analyses and rewrites.
pub struct ExprEval<'a> {
    m: Machine<'a>,
}

impl<'a> ExprEval<'a> {
    pub fn new(k: &Kernel, dims: &'a Bindings, inputs: &BTreeMap<String, Tensor>) -> Result<ExprEval<'a>, RefError> {
        Ok(ExprEval { m: machine(k, dims, inputs)? })
    }

    pub fn eval(&self, e: &Expr, vars: &[(&str, Scalar)]) -> Result<Scalar, RefError> {
        let names: Vec<&str> = vars.iter().map(|(n, _)| *n).collect();
        let values: Vec<Scalar> = vars.iter().map(|(_, v)| *v).collect();
        self.prepare(e, &names).eval(&values)
    }

    /// `e` compiled once for variables `names`, to evaluate at many values (a mask over
    /// every pair of a tile).
    pub fn prepare(&self, e: &Expr, names: &[&str]) -> Prepared<'_, 'a> {
        let mut scope: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        Prepared { ev: self, node: self.m.compile(e, &mut scope) }
    }
}

/// An expression compiled by [`ExprEval::prepare`].
pub struct Prepared<'e, 'a> {
    ev: &'e ExprEval<'a>,
    node: Node,
}

impl Prepared<'_, '_> {
    /// The value at `values` (in the order of the names it was prepared with).
    pub fn eval(&self, values: &[Scalar]) -> Result<Scalar, RefError> {
        let mut env: Vec<V> = values
            .iter()
            .map(|v| match v {
                Scalar::Int(x) => V::I(*x),
                Scalar::Float(x) => V::F(*x),
                Scalar::Bool(x) => V::B(*x),
            })
            .collect();
        Ok(match self.ev.m.eval(&self.node, &mut env, "expression")? {
            V::I(x) => Scalar::Int(x),
            V::F(x) => Scalar::Float(x),
            V::B(x) => Scalar::Bool(x),
        })
    }
}

/// One-off [`ExprEval::eval`].
pub fn eval_expr(k: &Kernel, dims: &Bindings, inputs: &BTreeMap<String, Tensor>, e: &Expr, vars: &[(&str, Scalar)]) -> Result<Scalar, RefError> {
    ExprEval::new(k, dims, inputs)?.eval(e, vars)
}

/// Materializes a derived tensor in row-major order.
fn derive(m: &Machine, name: &str, vars: &[String], def: &TensorDef, shape: &[usize]) -> Result<Vec<f64>, RefError> {
    let mut scope: Vec<String> = vars.to_vec();
    let (body, scan) = match def {
        TensorDef::Map(e) => (e, None),
        TensorDef::Cumsum { axis, body } => (body, Some(*axis)),
    };
    let node = m.compile(body, &mut scope);
    let total: usize = shape.iter().product();
    let mut data = vec![0.0; total];
    let cx = format!("tensor `{name}`");
    let strides: Vec<usize> = (0..shape.len()).map(|a| shape[a + 1..].iter().product()).collect();
    // The body at every element, in parallel chunks (each element is independent); a scan
    // then adds along its axis.
    const CHUNK: usize = 4096;
    data.par_chunks_mut(CHUNK).enumerate().try_for_each(|(c, out)| {
        let mut env = vec![V::I(0); vars.len()];
        for (n, slot) in out.iter_mut().enumerate() {
            let mut rem = c * CHUNK + n;
            for (a, st) in strides.iter().enumerate() {
                env[a] = V::I((rem / st) as i64);
                rem %= st;
            }
            *slot = match m.eval(&node, &mut env, &cx)? {
                V::I(x) => x as f64,
                V::F(x) => x,
                V::B(_) => unreachable!("verified: tensor bodies are numeric"),
            };
        }
        Ok::<(), RefError>(())
    })?;
    if let Some(axis) = scan {
        for flat in 0..total {
            if !(flat / strides[axis]).is_multiple_of(shape[axis]) {
                data[flat] += data[flat - strides[axis]];
            }
        }
    }
    Ok(data)
}

/// One branch's expressions compiled with the fixed slots `b h i j e s w` in scope.
pub(crate) struct BranchNodes {
    pub(crate) score: Node,
    pub(crate) bias: Option<Node>,
    pub(crate) mask: Option<Node>,
    pub(crate) decay: Option<Node>,
    pub(crate) weight: Option<Node>,
    pub(crate) sink: Option<Node>,
    pub(crate) post: Option<Node>,
    pub(crate) map: Option<Node>,
    pub(crate) eps: Option<f64>,
}

impl BranchNodes {
    pub(crate) fn compile(m: &Machine, br: &Branch) -> BranchNodes {
        let mut sc = scope_fixed();
        let mut c = |e: &Option<Expr>| e.as_ref().map(|e| m.compile(e, &mut sc));
        let (sink, post, map, eps) = match &br.norm {
            Norm::Softmax { sink, post } => (c(sink), c(post), None, None),
            Norm::Map(e) => (None, None, c(&Some(e.clone())), None),
            Norm::Linear { eps } => (None, None, None, Some(eps.0)),
        };
        BranchNodes {
            score: m.compile(&br.score, &mut scope_fixed()),
            bias: c(&br.bias),
            mask: c(&br.mask),
            decay: c(&br.decay),
            weight: c(&br.weight),
            sink,
            post,
            map,
            eps,
        }
    }
}

/// One branch's normalized row at `(b, h, i)` (steps 1 and 2 of the module's contract,
/// before decay and branch weight).
#[derive(Default)]
pub(crate) struct BranchRow {
    /// The live keys and their scores `score + bias`.
    pub(crate) keys: Vec<i64>,
    pub(crate) s: Vec<f64>,
    /// Softmax: the weights before `post`; empty for other normalizations.
    pub(crate) w: Vec<f64>,
    /// The normalized weights `p_j`.
    pub(crate) p: Vec<f64>,
    /// Softmax: the sink's weight `exp(sink − max) / z` (0 without a sink).
    pub(crate) w_sink: f64,
    /// Linear: the denominator `Σ s + eps`.
    pub(crate) den: f64,
    /// Softmax: the log of its denominator, `max + ln Σ exp(s − max)` (sink included).
    pub(crate) lse: f64,
}

/// Fills `row` for the branch at the `(b, h, i)` that `env` holds; `false` when the branch
/// has no live key (none unmasked, or every softmax logit and the sink −inf).
pub(crate) fn branch_row(m: &Machine, br: &BranchNodes, nj: i64, env: &mut Vec<V>, row: &mut BranchRow, cx: &str) -> Result<bool, RefError> {
    let (sj_, ss_, sw_) = (3, 5, 6);
    row.keys.clear();
    row.s.clear();
    row.w.clear();
    row.p.clear();
    for j in 0..nj {
        env[sj_] = V::I(j);
        if let Some(mask) = &br.mask {
            if !m.eval(mask, env, cx)?.b() {
                continue;
            }
        }
        let mut s = m.eval(&br.score, env, cx)?.f();
        if let Some(bias) = &br.bias {
            s += m.eval(bias, env, cx)?.f();
        }
        row.keys.push(j);
        row.s.push(s);
    }
    if row.keys.is_empty() {
        return Ok(false);
    }
    if let Some(map) = &br.map {
        for (&j, &s) in row.keys.iter().zip(&row.s) {
            env[sj_] = V::I(j);
            env[ss_] = V::F(s);
            row.p.push(m.eval(map, env, cx)?.f());
        }
    } else if let Some(eps) = br.eps {
        row.den = row.s.iter().sum::<f64>() + eps;
        row.p.extend(row.s.iter().map(|s| s / row.den));
    } else {
        let sink = match &br.sink {
            Some(n) => Some(m.eval(n, env, cx)?.f()),
            None => None,
        };
        let mut mx = row.s.iter().fold(f64::NEG_INFINITY, |a, s| fmax(a, *s));
        if let Some(sk) = sink {
            mx = fmax(mx, sk);
        }
        // Every score (and the sink) is -inf: a score of -inf is a masked key, so the
        // branch has no live key (and exp(-inf - -inf) would be NaN).
        if mx == f64::NEG_INFINITY {
            return Ok(false);
        }
        let mut z: f64 = row.s.iter().map(|s| (s - mx).exp()).sum();
        if let Some(sk) = sink {
            z += (sk - mx).exp();
        }
        row.w_sink = sink.map_or(0.0, |sk| (sk - mx).exp() / z);
        row.lse = mx + z.ln();
        for n in 0..row.keys.len() {
            let w = (row.s[n] - mx).exp() / z;
            row.w.push(w);
            let mut p = w;
            if let Some(post) = &br.post {
                env[sj_] = V::I(row.keys[n]);
                env[sw_] = V::F(w);
                p = m.eval(post, env, cx)?.f();
            }
            row.p.push(p);
        }
    }
    Ok(true)
}

fn attend(k: &Kernel, m: &Machine, mut stats: Option<&mut Tensor>) -> Result<Tensor, RefError> {
    let d = m.dims;
    let (nb, nh, ni, nj, ne) = (d.extent(&k.iter.b), d.extent(&k.iter.h), d.extent(&k.iter.i), d.extent(&k.iter.j), d.extent(&k.iter.e));
    let out_decl = k.output();
    let out_shape = d.shape(out_decl);
    let mut out = Tensor::zeros(out_shape.clone());
    let strides: Vec<usize> = (0..out_shape.len()).map(|a| out_shape[a + 1..].iter().product()).collect();
    let axis_of = |v: &str| k.out.iter().position(|x| x == v).expect("verified: out lists b h i e");
    let (sb, sh, si, se) = (strides[axis_of("b")], strides[axis_of("h")], strides[axis_of("i")], strides[axis_of("e")]);

    let branches: Vec<BranchNodes> = k.branches.iter().map(|br| BranchNodes::compile(m, br)).collect();
    let mut sc = scope_fixed();
    let value = m.compile(&k.value, &mut sc);
    let gate = k.gate.as_ref().map(|g| m.compile(g, &mut sc));

    let mut env = vec![V::I(0); FIXED.len()];
    let (sb_, sh_, si_, sj_, se_) = (0, 1, 2, 3, 4);
    let mut acc = vec![0.0f64; ne as usize];
    let mut row = BranchRow::default();
    for b in 0..nb {
        for h in 0..nh {
            for i in 0..ni {
                env[sb_] = V::I(b);
                env[sh_] = V::I(h);
                env[si_] = V::I(i);
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut any_live = false;
                for (n, br) in branches.iter().enumerate() {
                    let cx = format!("branch {n} at (b={b}, h={h}, i={i})");
                    let live = branch_row(m, br, nj, &mut env, &mut row, &cx)?;
                    if let Some(st) = stats.as_deref_mut() {
                        let at = ((b * nh + h) * ni + i) as usize * branches.len() + n;
                        st.data[at] = match (br.eps, br.map.is_some(), live) {
                            (_, true, _) => 0.0,
                            (Some(_), _, live) => {
                                if live {
                                    row.den
                                } else {
                                    0.0
                                }
                            }
                            (None, _, live) => {
                                if live {
                                    row.lse
                                } else {
                                    f64::NEG_INFINITY
                                }
                            }
                        };
                    }
                    if !live {
                        continue;
                    }
                    any_live = true;
                    let weight = match &br.weight {
                        Some(w) => m.eval(w, &mut env, &cx)?.f(),
                        None => 1.0,
                    };
                    for (&j, &p) in row.keys.iter().zip(&row.p) {
                        env[sj_] = V::I(j);
                        let mut p = p * weight;
                        if let Some(decay) = &br.decay {
                            p *= m.eval(decay, &mut env, &cx)?.f();
                        }
                        for (e, a) in acc.iter_mut().enumerate() {
                            env[se_] = V::I(e as i64);
                            *a += p * m.eval(&value, &mut env, &cx)?.f();
                        }
                    }
                }
                let base = b as usize * sb + h as usize * sh + i as usize * si;
                if !any_live {
                    continue; // zeros
                }
                for (e, a) in acc.iter().enumerate() {
                    let g = match &gate {
                        Some(g) => {
                            env[se_] = V::I(e as i64);
                            m.eval(g, &mut env, "gate")?.f()
                        }
                        None => 1.0,
                    };
                    out.data[base + e * se] = a * g;
                }
            }
        }
    }
    Ok(out)
}
