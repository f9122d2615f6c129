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
    attend(k, &m)
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

fn attend(k: &Kernel, m: &Machine) -> Result<Tensor, RefError> {
    let d = m.dims;
    let (nb, nh, ni, nj, ne) = (d.extent(&k.iter.b), d.extent(&k.iter.h), d.extent(&k.iter.i), d.extent(&k.iter.j), d.extent(&k.iter.e));
    let out_decl = k.output();
    let out_shape = d.shape(out_decl);
    let mut out = Tensor::zeros(out_shape.clone());
    let strides: Vec<usize> = (0..out_shape.len()).map(|a| out_shape[a + 1..].iter().product()).collect();
    let axis_of = |v: &str| k.out.iter().position(|x| x == v).expect("verified: out lists b h i e");
    let (sb, sh, si, se) = (strides[axis_of("b")], strides[axis_of("h")], strides[axis_of("i")], strides[axis_of("e")]);

    struct B {
        score: Node,
        bias: Option<Node>,
        mask: Option<Node>,
        decay: Option<Node>,
        weight: Option<Node>,
        sink: Option<Node>,
        post: Option<Node>,
        map: Option<Node>,
        eps: Option<f64>,
    }
    let mut sc = scope_fixed();
    let c = |e: &Option<Expr>, sc: &mut Vec<String>| e.as_ref().map(|e| m.compile(e, sc));
    let branches: Vec<B> = k
        .branches
        .iter()
        .map(|br| {
            let (sink, post, map, eps) = match &br.norm {
                Norm::Softmax { sink, post } => (c(sink, &mut sc), c(post, &mut sc), None, None),
                Norm::Map(e) => (None, None, Some(m.compile(e, &mut sc)), None),
                Norm::Linear { eps } => (None, None, None, Some(eps.0)),
            };
            B {
                score: m.compile(&br.score, &mut sc),
                bias: c(&br.bias, &mut sc),
                mask: c(&br.mask, &mut sc),
                decay: c(&br.decay, &mut sc),
                weight: c(&br.weight, &mut sc),
                sink,
                post,
                map,
                eps,
            }
        })
        .collect();
    let value = m.compile(&k.value, &mut sc);
    let gate = c(&k.gate, &mut sc);

    let mut env = vec![V::I(0); FIXED.len()];
    let (sb_, sh_, si_, sj_, se_, ss_, sw_) = (0, 1, 2, 3, 4, 5, 6);
    let mut acc = vec![0.0f64; ne as usize];
    let mut live: Vec<(i64, f64)> = Vec::with_capacity(nj as usize);
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
                    live.clear();
                    for j in 0..nj {
                        env[sj_] = V::I(j);
                        if let Some(mask) = &br.mask {
                            if !m.eval(mask, &mut env, &cx)?.b() {
                                continue;
                            }
                        }
                        let mut s = m.eval(&br.score, &mut env, &cx)?.f();
                        if let Some(bias) = &br.bias {
                            s += m.eval(bias, &mut env, &cx)?.f();
                        }
                        live.push((j, s));
                    }
                    if live.is_empty() {
                        continue;
                    }
                    // Normalize in place: live[n].1 becomes p_j.
                    if let Some(map) = &br.map {
                        for (j, s) in live.iter_mut() {
                            env[sj_] = V::I(*j);
                            env[ss_] = V::F(*s);
                            *s = m.eval(map, &mut env, &cx)?.f();
                        }
                    } else if let Some(eps) = br.eps {
                        let den: f64 = live.iter().map(|(_, s)| s).sum::<f64>() + eps;
                        live.iter_mut().for_each(|(_, s)| *s /= den);
                    } else {
                        let sink = match &br.sink {
                            Some(n) => Some(m.eval(n, &mut env, &cx)?.f()),
                            None => None,
                        };
                        let mut mx = live.iter().fold(f64::NEG_INFINITY, |a, (_, s)| fmax(a, *s));
                        if let Some(sk) = sink {
                            mx = fmax(mx, sk);
                        }
                        // Every score (and the sink) is -inf: a score of -inf is a masked key,
                        // so the branch has no live key (and exp(-inf - -inf) would be NaN).
                        if mx == f64::NEG_INFINITY {
                            continue;
                        }
                        let mut z: f64 = live.iter().map(|(_, s)| (s - mx).exp()).sum();
                        if let Some(sk) = sink {
                            z += (sk - mx).exp();
                        }
                        for (j, s) in live.iter_mut() {
                            let mut p = (*s - mx).exp() / z;
                            if let Some(post) = &br.post {
                                env[sj_] = V::I(*j);
                                env[sw_] = V::F(p);
                                p = m.eval(post, &mut env, &cx)?.f();
                            }
                            *s = p;
                        }
                    }
                    any_live = true;
                    let weight = match &br.weight {
                        Some(w) => m.eval(w, &mut env, &cx)?.f(),
                        None => 1.0,
                    };
                    for &(j, p) in live.iter() {
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
