//! Kernel IR → Cranelift IR: the function builder with its bindings, loops and memo
//! (this file), scalar lowering ([`scalar`]), derived tensors ([`derive`]) and the row kernel
//! ([`rows`]); the tiled kernel's vector code is in `super::tiled`.
//!
//! Two kinds of function are generated here:
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

mod derive;
mod rows;
mod scalar;

use attnc_ir::{BinOp, Expr, Kernel, Ty};
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
    pub extern "C" fn cos(x: f32) -> f32 {
        x.cos()
    }
    pub extern "C" fn sin(x: f32) -> f32 {
        x.sin()
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
        ("attnc_cosf", 1, libm::cos as *const u8),
        ("attnc_sinf", 1, libm::sin as *const u8),
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
    /// The 4-lane form of each `cache` entry, made where it was hoisted (one to one with
    /// the entries a `hoist` pushed): vector code splats a uniform value once per loop,
    /// not once per vector (the generated code runs without Cranelift's optimizer, so
    /// nothing else moves a splat out of a loop).
    pub(crate) splats: Vec<(Value, Value)>,
    /// The tile reads its keys in place for a few query rows (the microkernel's `qk_direct`
    /// is imported): `pack` and `tile` then ask `direct_keys` alike.
    pub(crate) direct: bool,
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
    /// The frame (the first parameter) and the slot of the saved statistics' address, when
    /// the layout has one ([`Gen::save_stat`]).
    pub(crate) stats: Option<(Value, usize)>,
    /// The frame and the slot of the kept-weights flag, when the layout has one.
    pub(crate) kept: Option<(Value, usize)>,
}

/// A generated vector value: valid while the arm it was made in is open and every variable
/// it reads is bound to the same value as then.
pub(crate) struct Memo {
    pub expr: Expr,
    /// The vector variables it was generated under; empty: any list (a key-only value
    /// loaded per key vector, which is a vector under every list that holds `j`).
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
        // A function without a frame (the generated matmuls) loads no dims and no tensors.
        let (dims, tens, stats, kept) = match layout {
            None => (BTreeMap::new(), BTreeMap::new(), None, None),
            Some(layout) => {
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
                (dims, tens, layout.stats.map(|slot| (frame, slot)), layout.kept.map(|slot| (frame, slot)))
            }
        };
        let g = Gen {
            b,
            kernel,
            dims,
            tens,
            libs,
            env: vec![],
            writing: None,
            cache: vec![],
            splats: vec![],
            direct: false,
            optimized: false,
            memo: vec![],
            arms: vec![],
            stats,
            kept,
        };
        (g, params)
    }

    /// Stores branch `bn`'s statistic of row `i` (`b` and `h` bound), generated by `value`, at
    /// `((b·H + h)·N + i)·branches + bn` of the saved statistics, when the caller asked for
    /// them (a nonzero address in the frame); generates nothing when the layout has no such
    /// slot.
    pub(crate) fn save_stat(&mut self, bn: usize, i: Value, value: &mut dyn FnMut(&mut Self) -> Value) {
        let Some((frame, slot)) = self.stats else { return };
        let base = self.b.ins().load(types::I64, flags(), frame, (slot * 8) as i32);
        let wanted = self.b.ins().icmp_imm_s(IntCC::NotEqual, base, 0);
        self.if_then(wanted, &mut |g| {
            let k = g.kernel;
            let (b, h) = (g.expr(&Expr::var("b")), g.expr(&Expr::var("h")));
            let (nh, ni) = (g.expr(&k.iter.h.to_expr()), g.expr(&k.iter.i.to_expr()));
            let row = g.b.ins().imul(b, nh);
            let row = g.b.ins().iadd(row, h);
            let row = g.b.ins().imul(row, ni);
            let row = g.b.ins().iadd(row, i);
            let at = g.b.ins().imul_imm_s(row, k.branches.len() as i64);
            let at = g.b.ins().iadd_imm_s(at, bn as i64);
            let v = value(g);
            g.store_f32(base, at, v);
        });
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
        let m = self.memo.iter().rev().find(|m| m.expr == *e && (m.vecs == vecs || m.vecs.is_empty()))?;
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

    /// `for kb in 0..n { body(kb) }` over the tiles of a row of class bytes at `classes`
    /// (`TileClass`: 0 empty), skipping empty tiles eight at a time: where eight bytes from
    /// `kb` are all 0 the loop moves past them, else to the first non-zero one. `body` sees
    /// every tile that is not skipped this way (empty ones too, near the row's end).
    pub(crate) fn for_tiles_skipping_empty(&mut self, classes: Value, n: Value, body: &mut dyn FnMut(&mut Self, Value)) {
        let iv = self.b.declare_var(types::I64);
        let zero = self.iconst(0);
        self.b.def_var(iv, zero);
        let (header, scan, word, one, exit) =
            (self.b.create_block(), self.b.create_block(), self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let kb = self.b.use_var(iv);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, kb, n);
        self.b.ins().brif(more, scan, &[], exit, &[]);
        self.b.switch_to_block(scan);
        let kb8 = self.b.ins().iadd_imm_s(kb, 8);
        let room = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, kb8, n);
        self.b.ins().brif(room, word, &[], one, &[]);
        self.b.switch_to_block(word);
        // Eight class bytes as one little-endian word: the lowest non-zero byte is the
        // first live tile.
        let addr = self.b.ins().iadd(classes, kb);
        let w = self.b.ins().load(types::I64, MemFlagsData::new().with_notrap().with_endianness(cranelift::codegen::ir::Endianness::Little), addr, 0);
        let empty = self.b.ins().icmp_imm_s(IntCC::Equal, w, 0);
        let skip = self.b.create_block();
        let land = self.b.create_block();
        self.b.ins().brif(empty, skip, &[], land, &[]);
        self.b.switch_to_block(skip);
        self.b.def_var(iv, kb8);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(land);
        let bits = self.b.ins().ctz(w);
        let bytes = self.b.ins().ushr_imm_u(bits, 3);
        let first = self.b.ins().iadd(kb, bytes);
        self.b.def_var(iv, first);
        self.b.ins().jump(one, &[]);
        self.b.switch_to_block(one);
        let t = self.b.use_var(iv);
        self.arm(&mut |g| body(g, t));
        let next = self.b.ins().iadd_imm_s(t, 1);
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

    /// `a // d` (Python's floor division), and the divisor a floor modulo multiplies the
    /// quotient by (`a % d = a − q·m`).
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
        // The divisor modulo multiplies back: −1 itself (`a − (−a)·(−1) = 0`); 1 for a zero
        // divisor (the bounds check refuses it before a kernel runs).
        let md = self.b.ins().select(z, one, d);
        (q, md)
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

    pub fn finish(self, cfg: cranelift::codegen::isa::TargetFrontendConfig) {
        let mut b = self.b;
        b.seal_all_blocks();
        b.finalize(cfg);
    }
}
