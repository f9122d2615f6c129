//! Kernel IR → Cranelift IR.
//!
//! Two kinds of function are generated per kernel:
//! - `derive_T(frame, lo, hi)` computes derived tensor `T` for first-axis indices in
//!   `[lo, hi)` (a cumsum runs along its axis, reading the element before);
//! - `attend(frame, b, h, i_lo, i_hi, ws)` computes output rows `[i_lo, i_hi)` of one
//!   `(b, h)`: for each row, each branch walks the keys with an online softmax (or a
//!   pointwise / linear normalization) whose state lives in registers, accumulates the value
//!   rows in `ws` (O(Dv) memory), and the gated result is stored in the output.
//!
//! `frame` is an `i64` table laid out by [`Layout`]: every dim's value, and for every tensor
//! its base address, extents and strides. Integer expressions are `i64`, floats `f32`,
//! conditions `i8`. Tensor indices are clamped into range, so no access leaves its buffer
//! whatever the spec computes (the reference reports such indices as errors; the
//! conformance suite compares the two). Integer division by zero divides by one instead of
//! trapping; the runtime rejects zero divisors before launching.

use attnc_ir::{BinOp, Expr, Kernel, Norm, RedOp, TensorDef, TensorKind, Ty, UnOp};
use cranelift::codegen::ir::{FuncRef, MemFlagsData};
use cranelift::prelude::*;
use std::collections::BTreeMap;

/// The `frame` table's layout (the backend-neutral argument layout).
pub(crate) use crate::host::ArgLayout as Layout;

/// Host math the generated code calls (Cranelift has no transcendental instructions).
pub(crate) mod libm {
    pub extern "C" fn exp(x: f32) -> f32 {
        x.exp()
    }
    pub extern "C" fn ln(x: f32) -> f32 {
        x.ln()
    }
    pub extern "C" fn tanh(x: f32) -> f32 {
        x.tanh()
    }
    pub extern "C" fn expm1(x: f32) -> f32 {
        x.exp_m1()
    }
    pub extern "C" fn pow(x: f32, y: f32) -> f32 {
        x.powf(y)
    }
    pub extern "C" fn fma(x: f32, y: f32, z: f32) -> f32 {
        x.mul_add(y, z)
    }
}

/// `(symbol, arity, address)` of every host function the generated code may import.
pub(crate) fn libcalls() -> Vec<(&'static str, usize, *const u8)> {
    vec![
        ("attnc_expf", 1, libm::exp as *const u8),
        ("attnc_logf", 1, libm::ln as *const u8),
        ("attnc_tanhf", 1, libm::tanh as *const u8),
        ("attnc_expm1f", 1, libm::expm1 as *const u8),
        ("attnc_powf", 2, libm::pow as *const u8),
        // Cranelift lowers `fma` without the FMA extension to a call to `fmaf`.
        ("fmaf", 3, libm::fma as *const u8),
    ]
}

/// The condition code of a float comparison (ordered, as Rust's operators: false on NaN,
/// except `!=`).
pub(crate) fn float_cc(op: BinOp) -> FloatCC {
    match op {
        BinOp::Eq => FloatCC::Equal,
        BinOp::Ne => FloatCC::NotEqual,
        BinOp::Lt => FloatCC::LessThan,
        BinOp::Le => FloatCC::LessThanOrEqual,
        BinOp::Gt => FloatCC::GreaterThan,
        _ => FloatCC::GreaterThanOrEqual,
    }
}

/// The condition code of a signed integer comparison.
pub(crate) fn int_cc(op: BinOp) -> IntCC {
    match op {
        BinOp::Eq => IntCC::Equal,
        BinOp::Ne => IntCC::NotEqual,
        BinOp::Lt => IntCC::SignedLessThan,
        BinOp::Le => IntCC::SignedLessThanOrEqual,
        BinOp::Gt => IntCC::SignedGreaterThan,
        _ => IntCC::SignedGreaterThanOrEqual,
    }
}

/// Workspace and output accesses.
pub(crate) fn flags() -> MemFlagsData {
    MemFlagsData::trusted()
}

/// Reads of inputs, derived tensors (once computed) and the frame: never written while the
/// function runs and always in bounds, so the optimizer may hoist them out of loops.
pub(crate) fn ro_flags() -> MemFlagsData {
    MemFlagsData::trusted().with_readonly().with_can_move()
}

#[derive(Clone)]
pub(crate) struct TVals {
    pub(crate) base: Value,
    pub(crate) ext: Vec<Value>,
    pub(crate) stride: Vec<Value>,
    pub(crate) is_int: bool,
}

/// Worth a branch to skip (the right side of `&&`/`||`): reductions, powers and gathers,
/// which run lane by lane in vector code and call or loop in scalar code.
pub(crate) fn costly(e: &Expr) -> bool {
    let mut c = false;
    e.walk(&mut |x| c |= matches!(x, Expr::Reduce { .. } | Expr::Binary(BinOp::Pow, ..) | Expr::Load(..)));
    c
}

/// Static type of an expression (the kernel is verified, so this cannot fail).
pub(crate) fn ty_of(e: &Expr, k: &Kernel) -> Ty {
    k.ty_of(e)
}

pub(crate) struct Gen<'f, 'k> {
    pub b: FunctionBuilder<'f>,
    pub(crate) kernel: &'k Kernel,
    pub(crate) dims: BTreeMap<String, Value>,
    pub(crate) tens: BTreeMap<String, TVals>,
    pub(crate) libs: BTreeMap<&'static str, FuncRef>,
    pub(crate) env: Vec<(String, Value)>,
    /// The tensor a `derive` function writes (its reads are not read-only).
    pub(crate) writing: Option<String>,
    /// Values of expressions computed ahead of a loop (manual loop-invariant hoisting):
    /// `expr` returns them instead of generating the code again.
    pub(crate) cache: Vec<(Expr, Value)>,
    /// Cranelift's optimizer will run on this function (`CpuOptions::clif_opt`): it turns
    /// scalar division by a constant into multiplications and shares repeated scalar
    /// subexpressions, which some lowerings rely on instead of their own vector forms.
    pub(crate) optimized: bool,
    /// Lane-varying values already generated (common subexpressions of the vector code:
    /// GPSA's `dr` and `dc` appear three times in its score); see [`Memo`].
    pub(crate) memo: Vec<Memo>,
    /// The memo's length at the start of each control-flow arm being generated: a value
    /// made inside an arm does not dominate the code after it, so it is forgotten there.
    pub(crate) arms: Vec<usize>,
}

/// A generated vector value: valid while the arm it was made in is open and every variable
/// it reads is bound to the same value as then.
pub(crate) struct Memo {
    pub expr: Expr,
    pub vecs: Vec<String>,
    pub binds: Vec<Option<Value>>,
    pub value: Value,
    pub vector: bool,
}

impl<'f, 'k> Gen<'f, 'k> {
    /// Starts a function: the entry block loads every dim and tensor descriptor from
    /// `frame` (the first parameter), so the values dominate the whole body.
    pub fn new(mut b: FunctionBuilder<'f>, kernel: &'k Kernel, layout: Option<&Layout>, libs: BTreeMap<&'static str, FuncRef>) -> (Self, Vec<Value>) {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params = b.block_params(entry).to_vec();
        // Functions without a frame (the generated matmuls) load nothing.
        let Some(layout) = layout else {
            return (
                Gen {
                    b,
                    kernel,
                    dims: BTreeMap::new(),
                    tens: BTreeMap::new(),
                    libs,
                    env: vec![],
                    writing: None,
                    cache: vec![],
                    optimized: false,
                    memo: vec![],
                    arms: vec![],
                },
                params,
            );
        };
        let frame = params[0];
        let load = |b: &mut FunctionBuilder, slot: usize| b.ins().load(types::I64, flags(), frame, (slot * 8) as i32);
        let dims = layout.dims.iter().map(|(n, s)| (n.clone(), load(&mut b, *s))).collect();
        let tens = layout
            .tensors
            .iter()
            .map(|(n, t)| {
                let base = load(&mut b, t.base);
                let ext = t.ext.iter().map(|s| load(&mut b, *s)).collect();
                let stride = t.stride.iter().map(|s| load(&mut b, *s)).collect();
                (n.clone(), TVals { base, ext, stride, is_int: t.is_int })
            })
            .collect();
        (Gen { b, kernel, dims, tens, libs, env: vec![], writing: None, cache: vec![], optimized: false, memo: vec![], arms: vec![] }, params)
    }

    pub(crate) fn iconst(&mut self, n: i64) -> Value {
        self.b.ins().iconst(types::I64, n)
    }
    pub(crate) fn fconst(&mut self, x: f32) -> Value {
        self.b.ins().f32const(x)
    }
    pub(crate) fn call(&mut self, name: &str, args: &[Value]) -> Value {
        let f = self.libs[name];
        let c = self.b.ins().call(f, args);
        self.b.inst_results(c)[0]
    }

    pub fn bind(&mut self, name: &str, v: Value) {
        self.env.push((name.to_string(), v));
    }
    pub fn unbind(&mut self, n: usize) {
        let len = self.env.len();
        self.env.truncate(len - n);
    }

    /// The current bindings of `e`'s free variables.
    fn binds_of(&self, e: &Expr) -> Vec<Option<Value>> {
        e.free_vars().iter().map(|v| self.env.iter().rev().find(|(n, _)| n == v).map(|b| b.1)).collect()
    }

    /// A memoized vector value of `e` (see [`Memo`]): `(value, is_vector)`.
    pub(crate) fn memo_get(&self, e: &Expr, vecs: &[String]) -> Option<(Value, bool)> {
        let m = self.memo.iter().rev().find(|m| m.expr == *e && m.vecs == vecs)?;
        (m.binds == self.binds_of(e)).then_some((m.value, m.vector))
    }

    pub(crate) fn memo_put(&mut self, e: &Expr, vecs: &[String], value: Value, vector: bool) {
        let binds = self.binds_of(e);
        self.memo.push(Memo { expr: e.clone(), vecs: vecs.to_vec(), binds, value, vector });
    }

    /// Generates one control-flow arm: what the memo learns inside it is forgotten after.
    pub(crate) fn arm<T>(&mut self, body: &mut dyn FnMut(&mut Self) -> T) -> T {
        self.arms.push(self.memo.len());
        let r = body(self);
        let n = self.arms.pop().expect("arm");
        self.memo.truncate(n);
        r
    }

    /// `for iv in lo..hi { body(iv) }`, leaving the builder after the loop.
    pub fn for_range(&mut self, lo: Value, hi: Value, body: &mut dyn FnMut(&mut Self, Value)) {
        let iv = self.b.declare_var(types::I64);
        self.b.def_var(iv, lo);
        let (header, blk, exit) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(iv);
        let c = self.b.ins().icmp(IntCC::SignedLessThan, i, hi);
        self.b.ins().brif(c, blk, &[], exit, &[]);
        self.b.switch_to_block(blk);
        self.arm(&mut |g| body(g, i));
        let next = self.b.ins().iadd_imm_s(i, 1);
        self.b.def_var(iv, next);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
    }

    /// `if cond { then() } else { other() }`.
    pub fn if_else(&mut self, cond: Value, then: &mut dyn FnMut(&mut Self), other: &mut dyn FnMut(&mut Self)) {
        let (t, e, merge) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, t, &[], e, &[]);
        self.b.switch_to_block(t);
        self.arm(then);
        self.b.ins().jump(merge, &[]);
        self.b.switch_to_block(e);
        self.arm(other);
        self.b.ins().jump(merge, &[]);
        self.b.switch_to_block(merge);
    }

    /// `if cond { then() }`.
    pub fn if_then(&mut self, cond: Value, then: &mut dyn FnMut(&mut Self)) {
        let (t, merge) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, t, &[], merge, &[]);
        self.b.switch_to_block(t);
        self.arm(then);
        self.b.ins().jump(merge, &[]);
        self.b.switch_to_block(merge);
    }

    pub(crate) fn floor_div(&mut self, a: Value, d: Value) -> (Value, Value) {
        // A constant divisor other than 0 and −1 needs no guard; a power of two is a shift.
        if let Some(n) = self.const_int(d) {
            if n > 0 && (n as u64).is_power_of_two() {
                return (self.b.ins().sshr_imm_u(a, n.trailing_zeros() as i64), d);
            }
            if n > 0 {
                let q = self.b.ins().sdiv(a, d);
                let r = self.b.ins().srem(a, d);
                let rneg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, r, 0);
                let adj = self.b.ins().uextend(types::I64, rneg);
                return (self.b.ins().isub(q, adj), d);
            }
        }
        let m1 = self.b.ins().icmp_imm_s(IntCC::Equal, d, -1);
        let z = self.b.ins().icmp_imm_s(IntCC::Equal, d, 0);
        let bad = self.b.ins().bor(m1, z);
        let one = self.iconst(1);
        let sd = self.b.ins().select(bad, one, d);
        let q = self.b.ins().sdiv(a, sd);
        let r = self.b.ins().srem(a, sd);
        let rnz = self.b.ins().icmp_imm_s(IntCC::NotEqual, r, 0);
        let rneg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, r, 0);
        let dneg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, sd, 0);
        let signs = self.b.ins().icmp(IntCC::NotEqual, rneg, dneg);
        let adj = self.b.ins().band(rnz, signs);
        let adj = self.b.ins().uextend(types::I64, adj);
        let q = self.b.ins().isub(q, adj);
        let na = self.b.ins().ineg(a);
        let q = self.b.ins().select(m1, na, q);
        (q, sd)
    }

    /// The value of `v` when it is an integer constant.
    pub(crate) fn const_int(&self, v: Value) -> Option<i64> {
        let cranelift::codegen::ir::ValueDef::Result(inst, _) = self.b.func.dfg.value_def(v) else { return None };
        match self.b.func.dfg.insts[inst] {
            cranelift::codegen::ir::InstructionData::UnaryImm { opcode: cranelift::codegen::ir::Opcode::Iconst, imm } => Some(imm.bits()),
            _ => None,
        }
    }

    /// The element offset of the indices `idx` (axis, index) into `tv`, each index clamped
    /// into its axis (compiled kernels never read out of bounds).
    pub(crate) fn clamped_offset<'e>(&mut self, tv: &TVals, idx: impl IntoIterator<Item = (usize, &'e Expr)>) -> Value {
        let mut off = self.iconst(0);
        for (axis, x) in idx {
            let x = self.expr(x);
            let zero = self.iconst(0);
            let x = self.b.ins().smax(x, zero);
            let last = self.b.ins().iadd_imm_s(tv.ext[axis], -1);
            let x = self.b.ins().smin(x, last);
            let p = self.b.ins().imul(x, tv.stride[axis]);
            off = self.b.ins().iadd(off, p);
        }
        off
    }

    /// Whether `v` holds floats (a scalar f32 or an f32x4 vector).
    fn is_float(&self, v: Value) -> bool {
        self.b.func.dfg.value_type(v).lane_type() == types::F32
    }

    /// Lowers a scalar expression in the current environment.
    pub fn expr(&mut self, e: &Expr) -> Value {
        if let Some((_, v)) = self.cache.iter().rev().find(|(x, _)| x == e) {
            return *v;
        }
        match e {
            Expr::Int(n) => self.iconst(*n),
            Expr::Float(x) => self.fconst(x.0 as f32),
            Expr::Bool(v) => self.b.ins().iconst(types::I8, *v as i64),
            Expr::Var(v) => self.env.iter().rev().find(|(n, _)| n == v).unwrap_or_else(|| panic!("verified kernel: variable `{v}` bound")).1,
            Expr::Dim(d) => self.dims[d],
            Expr::Load(t, idx) => {
                let tv = self.tens[t].clone();
                let off = self.clamped_offset(&tv, idx.iter().enumerate());
                let bytes = self.b.ins().ishl_imm_u(off, 2);
                let addr = self.b.ins().iadd(tv.base, bytes);
                let fl = if self.writing.as_deref() == Some(t.as_str()) { flags() } else { ro_flags() };
                if tv.is_int {
                    let v = self.b.ins().load(types::I32, fl, addr, 0);
                    self.b.ins().sextend(types::I64, v)
                } else {
                    self.b.ins().load(types::F32, fl, addr, 0)
                }
            }
            Expr::Unary(op, a) => {
                let x = self.expr(a);
                self.unary(*op, x)
            }
            Expr::Binary(op @ (BinOp::And | BinOp::Or), a, b) if costly(b) => {
                // Short-circuit: the right side runs only when the left does not decide.
                let x = self.expr(a);
                let (rhs, done) = (self.b.create_block(), self.b.create_block());
                self.b.append_block_param(done, types::I8);
                let arg = [cranelift::codegen::ir::BlockArg::Value(x)];
                match op {
                    BinOp::Or => self.b.ins().brif(x, done, &arg, rhs, &[]),
                    _ => self.b.ins().brif(x, rhs, &[], done, &arg),
                };
                self.b.switch_to_block(rhs);
                let y = self.arm(&mut |g| g.expr(b));
                self.b.ins().jump(done, &[cranelift::codegen::ir::BlockArg::Value(y)]);
                self.b.switch_to_block(done);
                self.b.block_params(done)[0]
            }
            Expr::Binary(op, a, b) => {
                let (x, y) = (self.expr(a), self.expr(b));
                self.binary(*op, x, y)
            }
            Expr::Select(c, a, b) => {
                let c = self.expr(c);
                let (x, y) = (self.expr(a), self.expr(b));
                self.b.ins().select(c, x, y)
            }
            Expr::Reduce { op, var, lo, hi, body } => {
                let ty = ty_of(body, self.kernel);
                let (lo, hi) = (self.expr(lo), self.expr(hi));
                if let (RedOp::Sum, Expr::Binary(BinOp::Mul, x, y)) = (op, body.as_ref()) {
                    // A dot of two rows contiguous along `var` (a derived tensor's `dot`, the
                    // row kernel's scores): f32x4 products when the rows are in bounds.
                    if let (Some((pa, oka)), Some((pb, okb))) = (self.contiguous_row(x, var, hi), self.contiguous_row(y, var, hi)) {
                        let from_zero = self.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, lo, 0);
                        let ok = self.b.ins().band(oka, okb);
                        let ok = self.b.ins().band(ok, from_zero);
                        return self.either(ok, types::F32, &mut |g| g.dot_rows(pa, pb, lo, hi), &mut |g| g.reduce_loop(*op, var, lo, hi, body, ty));
                    }
                }
                self.reduce_loop(*op, var, lo, hi, body, ty)
            }
        }
    }

    /// `Σ_{x in lo..hi} a[x] · b[x]` over two float rows at byte addresses `a` and `b`
    /// (their elements at `x = 0`): f32x4 products, then a scalar tail.
    fn dot_rows(&mut self, a: Value, b: Value, lo: Value, hi: Value) -> Value {
        let (a, b) = (self.ptr_off(a, lo), self.ptr_off(b, lo));
        let len = self.b.ins().isub(hi, lo);
        let z = self.iconst(0);
        let len = self.b.ins().smax(len, z);
        let zero = self.fconst(0.0);
        let zv = self.b.ins().splat(types::F32X4, zero);
        let (acc, sacc) = (self.b.declare_var(types::F32X4), self.b.declare_var(types::F32));
        self.b.def_var(acc, zv);
        self.b.def_var(sacc, zero);
        self.for_lanes(len, &mut |g, x, ty| {
            let (va, vb) = (g.load_at(a, x, ty), g.load_at(b, x, ty));
            let p = g.b.ins().fmul(va, vb);
            let var = if ty == types::F32X4 { acc } else { sacc };
            let s = g.b.use_var(var);
            let s = g.b.ins().fadd(s, p);
            g.b.def_var(var, s);
        });
        let v = self.b.use_var(acc);
        let lanes = self.hreduce(v, false);
        let tail = self.b.use_var(sacc);
        self.b.ins().fadd(lanes, tail)
    }

    /// The generic loop of a reduction: `op` over `body` for `var in lo..hi`.
    fn reduce_loop(&mut self, op: RedOp, var: &str, lo: Value, hi: Value, body: &Expr, ty: Ty) -> Value {
        let clty = match ty {
            Ty::Int => types::I64,
            Ty::Float => types::F32,
            Ty::Bool => types::I8,
        };
        let acc = self.b.declare_var(clty);
        let init = match (op, ty) {
            (RedOp::Any, _) => self.b.ins().iconst(types::I8, 0),
            (RedOp::All, _) => self.b.ins().iconst(types::I8, 1),
            (RedOp::Sum, Ty::Int) => self.iconst(0),
            (RedOp::Sum, _) => self.fconst(0.0),
            (RedOp::Max, Ty::Int) => self.iconst(i64::MIN),
            (RedOp::Max, _) => self.fconst(f32::NEG_INFINITY),
            (RedOp::Min, Ty::Int) => self.iconst(i64::MAX),
            (RedOp::Min, _) => self.fconst(f32::INFINITY),
        };
        self.b.def_var(acc, init);
        let var = var.to_string();
        self.for_range(lo, hi, &mut |g, iv| {
            g.bind(&var, iv);
            let v = g.expr(body);
            g.unbind(1);
            let a = g.b.use_var(acc);
            let n = match (op, ty) {
                (RedOp::Any, _) => g.b.ins().bor(a, v),
                (RedOp::All, _) => g.b.ins().band(a, v),
                (RedOp::Sum, Ty::Int) => g.b.ins().iadd(a, v),
                (RedOp::Sum, _) => g.b.ins().fadd(a, v),
                (RedOp::Max, Ty::Int) => g.b.ins().smax(a, v),
                (RedOp::Max, _) => g.b.ins().fmax(a, v),
                (RedOp::Min, Ty::Int) => g.b.ins().smin(a, v),
                (RedOp::Min, _) => g.b.ins().fmin(a, v),
            };
            g.b.def_var(acc, n);
        });
        self.b.use_var(acc)
    }

    fn sigmoid(&mut self, x: Value) -> Value {
        let nx = self.b.ins().fneg(x);
        let e = self.call("attnc_expf", &[nx]);
        let one = self.fconst(1.0);
        let d = self.b.ins().fadd(one, e);
        self.b.ins().fdiv(one, d)
    }

    pub(crate) fn unary(&mut self, op: UnOp, x: Value) -> Value {
        let float = self.is_float(x);
        match op {
            UnOp::Neg if float => self.b.ins().fneg(x),
            UnOp::Neg => self.b.ins().ineg(x),
            UnOp::Not => self.b.ins().bxor_imm_u(x, 1),
            UnOp::Abs if float => self.b.ins().fabs(x),
            UnOp::Abs => {
                let n = self.b.ins().ineg(x);
                self.b.ins().smax(x, n)
            }
            UnOp::ToFloat => self.b.ins().fcvt_from_sint(types::F32, x),
            UnOp::Exp => self.call("attnc_expf", &[x]),
            UnOp::Log => self.call("attnc_logf", &[x]),
            UnOp::Tanh => self.call("attnc_tanhf", &[x]),
            UnOp::Sqrt => self.b.ins().sqrt(x),
            UnOp::Sigmoid => self.sigmoid(x),
            UnOp::Silu => {
                let s = self.sigmoid(x);
                self.b.ins().fmul(x, s)
            }
            UnOp::Relu | UnOp::Elu => {
                let zero = self.fconst(0.0);
                let pos = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                let keep = self.b.ins().bor(pos, nan);
                let other = if op == UnOp::Relu { zero } else { self.call("attnc_expm1f", &[x]) };
                self.b.ins().select(keep, x, other)
            }
        }
    }

    pub(crate) fn binary(&mut self, op: BinOp, x: Value, y: Value) -> Value {
        let float = self.is_float(x);
        // Floor modulo by 2^k is a mask (exact for negative numbers too).
        let pow2_divisor = self.const_int(y).filter(|n| *n > 0 && (*n as u64).is_power_of_two());
        let ins = self.b.ins();
        match op {
            BinOp::Add if float => ins.fadd(x, y),
            BinOp::Add => ins.iadd(x, y),
            BinOp::Sub if float => ins.fsub(x, y),
            BinOp::Sub => ins.isub(x, y),
            BinOp::Mul if float => ins.fmul(x, y),
            BinOp::Mul => ins.imul(x, y),
            BinOp::Div => ins.fdiv(x, y),
            BinOp::Pow => self.call("attnc_powf", &[x, y]),
            BinOp::FloorDiv => self.floor_div(x, y).0,
            BinOp::Mod if pow2_divisor.is_some() => {
                let n = pow2_divisor.expect("checked");
                self.b.ins().band_imm_u(x, n - 1)
            }
            BinOp::Mod => {
                let (q, sd) = self.floor_div(x, y);
                let p = self.b.ins().imul(q, sd);
                self.b.ins().isub(x, p)
            }
            BinOp::Min if float => ins.fmin(x, y),
            BinOp::Min => ins.smin(x, y),
            BinOp::Max if float => ins.fmax(x, y),
            BinOp::Max => ins.smax(x, y),
            BinOp::And => ins.band(x, y),
            BinOp::Or => ins.bor(x, y),
            cmp => {
                if float {
                    ins.fcmp(float_cc(cmp), x, y)
                } else {
                    ins.icmp(int_cc(cmp), x, y)
                }
            }
        }
    }

    pub(crate) fn store_f32(&mut self, base: Value, idx: Value, v: Value) {
        let bytes = self.b.ins().ishl_imm_u(idx, 2);
        let addr = self.b.ins().iadd(base, bytes);
        self.b.ins().store(flags(), v, addr, 0);
    }
    pub(crate) fn load_f32(&mut self, base: Value, idx: Value) -> Value {
        let bytes = self.b.ins().ishl_imm_u(idx, 2);
        let addr = self.b.ins().iadd(base, bytes);
        self.b.ins().load(types::F32, flags(), addr, 0)
    }

    /// Body of `derive_T(frame, lo, hi)`.
    pub fn derive(&mut self, name: &str, lo: Value, hi: Value) {
        let t = self.kernel.tensor(name).expect("derived tensor").clone();
        let TensorKind::Derived { vars, def } = &t.kind else { unreachable!("derive of a non-derived tensor") };
        let (body, scan) = match def {
            TensorDef::Map(e) => (e, None),
            TensorDef::Cumsum { axis, body } => (body, Some(*axis)),
        };
        let tv = self.tens[name].clone();
        self.writing = Some(name.to_string());
        let rank = vars.len();
        let flat = crate::host::derive_split(&t) == crate::host::DeriveSplit::FirstTwo;
        // Nested loops over all axes; the first runs over [lo, hi) — or, when `flat`, the first
        // two flattened (`x0 · ext1 + x1` in [lo, hi)), so a tensor whose first axis is short
        // (B = 1) still splits into many parallel tasks.
        #[allow(clippy::too_many_arguments)]
        fn nest(
            g: &mut Gen,
            axis: usize,
            rank: usize,
            lo: Value,
            hi: Value,
            tv: &TVals,
            vars: &[String],
            idx: &mut Vec<Value>,
            body: &Expr,
            scan: Option<usize>,
            is_int: bool,
            flat: bool,
        ) {
            if axis == rank {
                let mut off = g.iconst(0);
                for (a, x) in idx.iter().enumerate() {
                    let p = g.b.ins().imul(*x, tv.stride[a]);
                    off = g.b.ins().iadd(off, p);
                }
                let mut v = g.expr(body);
                if let Some(sa) = scan {
                    let pos = g.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, idx[sa], 0);
                    let prev_off = g.b.ins().isub(off, tv.stride[sa]);
                    let zero = g.iconst(0);
                    let prev_off = g.b.ins().smax(prev_off, zero);
                    let bytes = g.b.ins().ishl_imm_u(prev_off, 2);
                    let addr = g.b.ins().iadd(tv.base, bytes);
                    let prev = if is_int {
                        let p = g.b.ins().load(types::I32, flags(), addr, 0);
                        g.b.ins().sextend(types::I64, p)
                    } else {
                        g.b.ins().load(types::F32, flags(), addr, 0)
                    };
                    let sum = if is_int { g.b.ins().iadd(v, prev) } else { g.b.ins().fadd(v, prev) };
                    v = g.b.ins().select(pos, sum, v);
                }
                let bytes = g.b.ins().ishl_imm_u(off, 2);
                let addr = g.b.ins().iadd(tv.base, bytes);
                let v = if is_int { g.b.ins().ireduce(types::I32, v) } else { v };
                g.b.ins().store(flags(), v, addr, 0);
                return;
            }
            if axis == 0 && flat {
                g.for_range(lo, hi, &mut |g, f| {
                    let (x0, _) = g.floor_div(f, tv.ext[1]);
                    let p = g.b.ins().imul(x0, tv.ext[1]);
                    let x1 = g.b.ins().isub(f, p);
                    g.bind(&vars[0], x0);
                    g.bind(&vars[1], x1);
                    idx.push(x0);
                    idx.push(x1);
                    nest(g, 2, rank, lo, hi, tv, vars, idx, body, scan, is_int, flat);
                    idx.truncate(idx.len() - 2);
                    g.unbind(2);
                });
                return;
            }
            let (l, h) = if axis == 0 { (lo, hi) } else { (g.iconst(0), tv.ext[axis]) };
            // Before the innermost loop, what does not vary along it is computed once
            // (`h // (H // G)` in a kv-head index: two integer divisions per element otherwise).
            let hoisted = if axis + 1 == rank && scan.is_none() { g.hoist(&[body], std::slice::from_ref(&vars[axis])) } else { 0 };
            g.for_range(l, h, &mut |g, x| {
                g.bind(&vars[axis], x);
                idx.push(x);
                nest(g, axis + 1, rank, lo, hi, tv, vars, idx, body, scan, is_int, flat);
                idx.pop();
                g.unbind(1);
            });
            g.unhoist(hoisted);
        }
        if rank == 0 {
            let v = self.expr(body);
            let v = if tv.is_int { self.b.ins().ireduce(types::I32, v) } else { v };
            self.b.ins().store(flags(), v, tv.base, 0);
        } else {
            nest(self, 0, rank, lo, hi, &tv, vars, &mut Vec::new(), body, scan, tv.is_int, flat);
        }
        self.b.ins().return_(&[]);
    }

    /// Body of `attend(frame, b, h, i_lo, i_hi, ws)`.
    pub fn attend(&mut self, b: Value, h: Value, i_lo: Value, i_hi: Value, ws: Value) {
        let k = self.kernel;
        self.bind("b", b);
        self.bind("h", h);
        let ev = self.expr(&k.iter.e.to_expr());
        let mj = self.expr(&k.iter.j.to_expr());
        let out = self.tens[&k.output().name].clone();
        let ev_bytes = self.b.ins().ishl_imm_u(ev, 2);
        let out_acc = self.b.ins().iadd(ws, ev_bytes);
        self.for_range(i_lo, i_hi, &mut |g, i| {
            g.bind("i", i);
            let any_live = g.b.declare_var(types::I8);
            let f = g.b.ins().iconst(types::I8, 0);
            g.b.def_var(any_live, f);
            let zero_i = g.iconst(0);
            g.for_range(zero_i, ev, &mut |g, e| {
                let z = g.fconst(0.0);
                g.store_f32(out_acc, e, z);
            });
            for br in &k.branches {
                g.branch(br, mj, ev, ws, out_acc, any_live);
            }
            // Store the row: zeros when no key was live in any branch, else gated values.
            let live = g.b.use_var(any_live);
            let zero_i = g.iconst(0);
            g.for_range(zero_i, ev, &mut |g, e| {
                g.bind("e", e);
                let acc = g.load_f32(out_acc, e);
                g.store_output(&out, acc, live);
                g.unbind(1);
            });
            g.unbind(1);
        });
        self.unbind(2);
        self.b.ins().return_(&[]);
    }

    /// Stores one output element (`b h i e` bound): `acc · gate` for a live row, else 0.
    pub(crate) fn store_output(&mut self, out: &TVals, acc: Value, live: Value) {
        let k = self.kernel;
        let gated = match &k.gate {
            Some(ge) => {
                let gv = self.expr(ge);
                self.b.ins().fmul(acc, gv)
            }
            None => acc,
        };
        let z = self.fconst(0.0);
        let v = self.b.ins().select(live, gated, z);
        let mut off = self.iconst(0);
        for (axis, var) in k.out.iter().enumerate() {
            let x = self.expr(&Expr::var(var));
            let p = self.b.ins().imul(x, out.stride[axis]);
            off = self.b.ins().iadd(off, p);
        }
        self.store_f32(out.base, off, v);
    }

    /// One branch of one row: walks the keys, then adds its normalized contribution.
    fn branch(&mut self, br: &attnc_ir::Branch, mj: Value, ev: Value, acc: Value, out_acc: Value, any_live: Variable) {
        let zero_i = self.iconst(0);
        self.for_range(zero_i, ev, &mut |g, e| {
            let z = g.fconst(0.0);
            g.store_f32(acc, e, z);
        });
        let m = self.b.declare_var(types::F32);
        let l = self.b.declare_var(types::F32);
        let cnt = self.b.declare_var(types::I64);
        let neg_inf = self.fconst(f32::NEG_INFINITY);
        let zero_f = self.fconst(0.0);
        let zero_i = self.iconst(0);
        self.b.def_var(cnt, zero_i);
        let (softmax, sink, post) = match &br.norm {
            Norm::Softmax { sink, post } => (true, sink.as_ref(), post.as_ref()),
            _ => (false, None, None),
        };
        match sink {
            Some(se) => {
                let sk = self.expr(se);
                let is_ninf = self.b.ins().fcmp(FloatCC::Equal, sk, neg_inf);
                let d = self.b.ins().fsub(sk, sk);
                let one = self.call("attnc_expf", &[d]);
                let l0 = self.b.ins().select(is_ninf, zero_f, one);
                self.b.def_var(m, sk);
                self.b.def_var(l, l0);
            }
            None => {
                self.b.def_var(m, neg_inf);
                self.b.def_var(l, zero_f);
            }
        }
        // Evaluates `body(s)` for every live key j (mask true), with `j` bound.
        let keys = |g: &mut Self, body: &mut dyn FnMut(&mut Self, Value, Value)| {
            let zero = g.iconst(0);
            g.for_range(zero, mj, &mut |g, j| {
                g.bind("j", j);
                let mut live = |g: &mut Self| {
                    let mut s = g.expr(&br.score);
                    if let Some(bias) = &br.bias {
                        let bv = g.expr(bias);
                        s = g.b.ins().fadd(s, bv);
                    }
                    body(g, j, s);
                };
                match &br.mask {
                    Some(me) => {
                        let c = g.expr(me);
                        g.if_then(c, &mut live);
                    }
                    None => live(g),
                }
                g.unbind(1);
            });
        };
        // acc[e] = acc[e] * corr + p * value(j, e)
        let accumulate = |g: &mut Self, corr: Option<Value>, p: Value| {
            let zero = g.iconst(0);
            g.for_range(zero, ev, &mut |g, e| {
                g.bind("e", e);
                let v = g.expr(&g.kernel.value);
                g.unbind(1);
                let a = g.load_f32(acc, e);
                let a = match corr {
                    Some(c) => g.b.ins().fmul(a, c),
                    None => a,
                };
                let pv = g.b.ins().fmul(p, v);
                let n = g.b.ins().fadd(a, pv);
                g.store_f32(acc, e, n);
            });
        };
        let decayed = |g: &mut Self, p: Value| match &br.decay {
            Some(d) => {
                let dv = g.expr(d);
                g.b.ins().fmul(p, dv)
            }
            None => p,
        };
        let mut factor: Option<Value> = None;
        if softmax {
            let one_pass = post.is_none();
            // Pass 1 (the only pass without `post`): online max and denominator.
            keys(self, &mut |g, _j, s| {
                let c = g.b.use_var(cnt);
                let c = g.b.ins().iadd_imm_s(c, 1);
                g.b.def_var(cnt, c);
                let m_old = g.b.use_var(m);
                let m_new = g.b.ins().fmax(m_old, s);
                let ninf = g.fconst(f32::NEG_INFINITY);
                let finite = g.b.ins().fcmp(FloatCC::NotEqual, m_new, ninf);
                g.if_then(finite, &mut |g| {
                    let dm = g.b.ins().fsub(m_old, m_new);
                    let corr = g.call("attnc_expf", &[dm]);
                    let ds = g.b.ins().fsub(s, m_new);
                    let p = g.call("attnc_expf", &[ds]);
                    let lv = g.b.use_var(l);
                    let lv = g.b.ins().fmul(lv, corr);
                    let lv = g.b.ins().fadd(lv, p);
                    g.b.def_var(l, lv);
                    g.b.def_var(m, m_new);
                    if one_pass {
                        let p = decayed(g, p);
                        accumulate(g, Some(corr), p);
                    }
                });
            });
            if let Some(post) = post {
                let mv = self.b.use_var(m);
                let lv = self.b.use_var(l);
                keys(self, &mut |g, _j, s| {
                    let ds = g.b.ins().fsub(s, mv);
                    let p = g.call("attnc_expf", &[ds]);
                    let p = g.b.ins().fdiv(p, lv);
                    g.bind("w", p);
                    let p = g.expr(post);
                    g.unbind(1);
                    let p = decayed(g, p);
                    accumulate(g, None, p);
                });
            } else {
                let lv = self.b.use_var(l);
                let one = self.fconst(1.0);
                factor = Some(self.b.ins().fdiv(one, lv));
            }
        } else {
            let linear = match &br.norm {
                Norm::Linear { eps } => Some(eps.0),
                _ => None,
            };
            keys(self, &mut |g, _j, s| {
                let c = g.b.use_var(cnt);
                let c = g.b.ins().iadd_imm_s(c, 1);
                g.b.def_var(cnt, c);
                let p = match (&br.norm, linear) {
                    (Norm::Map(f), _) => {
                        g.bind("s", s);
                        let p = g.expr(f);
                        g.unbind(1);
                        p
                    }
                    (_, Some(_)) => {
                        let lv = g.b.use_var(l);
                        let lv = g.b.ins().fadd(lv, s);
                        g.b.def_var(l, lv);
                        s
                    }
                    _ => unreachable!("softmax handled above"),
                };
                let p = decayed(g, p);
                accumulate(g, None, p);
            });
            if let Some(eps) = linear {
                let lv = self.b.use_var(l);
                let e = self.fconst(eps as f32);
                let d = self.b.ins().fadd(lv, e);
                let one = self.fconst(1.0);
                factor = Some(self.b.ins().fdiv(one, d));
            }
        }
        // The branch is live when a key passed the mask (and, for softmax, some score was
        // not -inf: a -inf score is a masked key).
        let c = self.b.use_var(cnt);
        let mut live = self.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, c, 0);
        if softmax {
            let mv = self.b.use_var(m);
            let ninf = self.fconst(f32::NEG_INFINITY);
            let fin = self.b.ins().fcmp(FloatCC::NotEqual, mv, ninf);
            live = self.b.ins().band(live, fin);
        }
        self.if_then(live, &mut |g| {
            let t = g.b.ins().iconst(types::I8, 1);
            g.b.def_var(any_live, t);
            let mut f = factor;
            if let Some(w) = &br.weight {
                let wv = g.expr(w);
                f = Some(match f {
                    Some(x) => g.b.ins().fmul(x, wv),
                    None => wv,
                });
            }
            let zero = g.iconst(0);
            g.for_range(zero, ev, &mut |g, e| {
                let a = g.load_f32(acc, e);
                let a = match f {
                    Some(x) => g.b.ins().fmul(a, x),
                    None => a,
                };
                let o = g.load_f32(out_acc, e);
                let n = g.b.ins().fadd(o, a);
                g.store_f32(out_acc, e, n);
            });
        });
    }

    pub fn finish(self, cfg: cranelift::codegen::isa::TargetFrontendConfig) {
        let mut b = self.b;
        b.seal_all_blocks();
        b.finalize(cfg);
    }
}
