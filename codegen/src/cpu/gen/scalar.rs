//! Scalar lowering: expressions on `i64` integers, `f32` floats and `i8` conditions, with
//! clamped tensor loads, reductions as loops, and the host math calls.

use super::*;
use attnc_ir::{BinOp, Expr, RedOp, Ty, UnOp};
use cranelift::prelude::*;

impl Gen<'_, '_> {
    /// Whether `v` holds floats (a scalar f32 or an f32x4 vector).
    pub(super) fn is_float(&self, v: Value) -> bool {
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
    pub(super) fn dot_rows(&mut self, a: Value, b: Value, lo: Value, hi: Value) -> Value {
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
    pub(super) fn reduce_loop(&mut self, op: RedOp, var: &str, lo: Value, hi: Value, body: &Expr, ty: Ty) -> Value {
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

    pub(super) fn sigmoid(&mut self, x: Value) -> Value {
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
            UnOp::Cos => self.call("attnc_cosf", &[x]),
            UnOp::Sin => self.call("attnc_sinf", &[x]),
            UnOp::Floor => self.b.ins().floor(x),
            UnOp::Ceil => self.b.ins().ceil(x),
            UnOp::Round => self.b.ins().nearest(x),
            // Toward zero, saturating at ±2^24 (the checker rules out NaN).
            UnOp::ToInt => {
                let (lo, hi) = (self.fconst(-attnc_ir::reference::INT_LIMIT as f32), self.fconst(attnc_ir::reference::INT_LIMIT as f32));
                let x = self.b.ins().fmax(x, lo);
                let x = self.b.ins().fmin(x, hi);
                let n = self.b.ins().fcvt_to_sint_sat(types::I32, x);
                self.b.ins().sextend(types::I64, n)
            }
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
}
