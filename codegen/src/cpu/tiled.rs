//! The tiled CPU kernel: query tiles × key tiles, matmuls in microkernels, everything
//! variant-specific generated as f32x4 code.
//!
//! Applies when every branch's score has at most one *separable* channel reduction
//! `Σ_r A(b,h,i,r)·B(b,h,j,r)` (the dot of queries and keys, whatever feature maps or
//! layouts `A` and `B` apply); other scores (GLA's `exp(L_i − L_j)` inside the sum) use the
//! row-at-a-time kernel of [`super::gen`]. Per `(b, h)`:
//!
//! - `pack(frame, b, h, kt, vb)` writes `B` transposed in panels of `BK` keys
//!   (`kt[tile][r][c]`) and the value rows `vb[j][e]`, zero-padded to whole tiles;
//! - `tile(frame, b, h, i0, kt, vb, ws, classes)` computes query rows `[i0, i0 + BQ)`: packs
//!   `A`, then for each live key tile calls `qk` (S = A·Bᵀ), evaluates the rest of the
//!   score, bias, mask (only on partial tiles and the last tile), the normalization with
//!   its state per row (online softmax: running max, denominator, rescale factor; in the
//!   microkernel's `softmax` step when no post-map or decay follows it, and then a full
//!   tile of plain dot products needs no generated pass at all), decay, and calls `pv`
//!   (O = O·corr + P·V); at the end it scales by the denominator and branch weight, applies
//!   the gate and stores the rows.
//!
//! `classes[branch][tile]` (0 empty, 1 full, 2 partial) comes from the block-sparsity
//! analysis (attnc-passes); empty tiles cost nothing.

use super::gen::{costly, flags, ro_flags, ty_of, Gen};
use attnc_ir::{BinOp, Expr, Norm, Ty, UnOp};
use cranelift::codegen::ir::{Endianness, FuncRef, MemFlagsData};
use cranelift::prelude::*;

use crate::schedule::tiled::SoftmaxPass;
use crate::schedule::tiled::DOT;
use crate::schedule::workspace::{Cols, TASK};
use crate::schedule::TiledSchedule;

pub(crate) use super::microkernel::EXP2_POLY;

/// The functions a tile calls: `qk`, `pv` and, with the microkernel, its softmax helpers.
pub(crate) type Matmuls<F> = (F, F, Option<SoftmaxKernels<F>>);

/// The microkernel's softmax helpers: the online step, the `qk` that also writes the row
/// maxima, and the weights of a second pass (final maximum and denominator).
#[derive(Clone, Copy)]
pub(crate) struct SoftmaxKernels<F> {
    pub step: F,
    pub qk_max: F,
    pub weights: F,
}

/// Lane-wise value of the vector code: a scalar shared by the 4 lanes, or a vector.
#[derive(Clone, Copy)]
enum VV {
    U(Value),
    V(Value),
}

fn little() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

impl Gen<'_, '_> {
    fn varying(&self, e: &Expr, vecs: &[String]) -> bool {
        attnc_ir::analysis::varies(e, vecs)
    }

    /// A uniform value as a vector of 4 lanes (ints as i32, conditions as lane masks).
    fn splat(&mut self, v: Value) -> Value {
        let ty = self.b.func.dfg.value_type(v);
        if ty == types::F32 {
            self.b.ins().splat(types::F32X4, v)
        } else if ty == types::I64 {
            let n = self.b.ins().ireduce(types::I32, v);
            self.b.ins().splat(types::I32X4, n)
        } else if ty == types::I8 {
            let m1 = self.b.ins().iconst(types::I32, -1);
            let z = self.b.ins().iconst(types::I32, 0);
            let m = self.b.ins().select(v, m1, z);
            self.b.ins().splat(types::I32X4, m)
        } else {
            v
        }
    }

    fn vec(&mut self, v: VV) -> Value {
        match v {
            VV::U(x) => self.splat(x),
            VV::V(x) => x,
        }
    }

    /// Evaluates `e` for each lane with scalar code (the fallback for anything without a
    /// vector form: gathers, integer division, reductions, libm calls).
    fn lanewise(&mut self, e: &Expr) -> Value {
        let vecs: Vec<(String, Value)> = self.env.iter().filter(|(_, v)| self.b.func.dfg.value_type(*v).is_vector()).cloned().collect();
        let ty = ty_of(e, self.kernel);
        let (vty, zero) = match ty {
            Ty::Float => (types::F32X4, self.fconst(0.0)),
            _ => (types::I32X4, self.b.ins().iconst(types::I32, 0)),
        };
        let mut acc = self.b.ins().splat(vty, zero);
        for lane in 0..4u8 {
            for (n, v) in &vecs {
                let x = self.b.ins().extractlane(*v, lane);
                let x = if self.b.func.dfg.value_type(x) == types::I32 { self.b.ins().sextend(types::I64, x) } else { x };
                self.bind(n, x);
            }
            let s = self.expr(e);
            self.unbind(vecs.len());
            let s = match ty {
                Ty::Float => s,
                Ty::Int => self.b.ins().ireduce(types::I32, s),
                Ty::Bool => {
                    let m1 = self.b.ins().iconst(types::I32, -1);
                    let z = self.b.ins().iconst(types::I32, 0);
                    self.b.ins().select(s, m1, z)
                }
            };
            acc = self.b.ins().insertlane(acc, s, lane);
        }
        acc
    }

    /// `exp` on 4 lanes: range reduction to `r ∈ [-ln2/2, ln2/2]`, a degree-6 polynomial
    /// (Cephes `expf`, ~1 ulp), and `2^n` built in the exponent bits. exp(-inf) = 0,
    /// exp(+large) = inf, NaN stays NaN.
    pub(crate) fn vexp(&mut self, x: Value) -> Value {
        let c = |g: &mut Self, v: f32| {
            let s = g.fconst(v);
            g.b.ins().splat(types::F32X4, s)
        };
        // Clamp with compare-and-select (NaN is restored at the end, so the clamps need not
        // propagate it).
        let hi = c(self, 88.376_26);
        let lo = c(self, -87.336_54);
        let too_hi = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let xc = self.fselect(too_hi, hi, x);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let xc = self.fselect(under, lo, xc);
        // n = round(x·log2 e) with the 1.5·2^23 trick: adding it leaves n in the low
        // mantissa bits, so 2^n is those bits shifted into the exponent.
        let log2e = c(self, std::f32::consts::LOG2_E);
        let magic = c(self, 12_582_912.0);
        let t = self.b.ins().fma(xc, log2e, magic);
        let n = self.b.ins().fsub(t, magic);
        let ln2_hi = c(self, 0.693_359_4);
        let ln2_lo = c(self, -2.121_944_4e-4);
        let r = self.b.ins().fmul(n, ln2_hi);
        let r = self.b.ins().fsub(xc, r);
        let r2 = self.b.ins().fmul(n, ln2_lo);
        let r = self.b.ins().fsub(r, r2);
        let coeffs = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
        let mut p = c(self, coeffs[0]);
        for k in &coeffs[1..] {
            let kv = c(self, *k);
            p = self.b.ins().fma(p, r, kv);
        }
        let rr = self.b.ins().fmul(r, r);
        p = self.b.ins().fma(p, rr, r);
        let one = c(self, 1.0);
        p = self.b.ins().fadd(p, one);
        let tb = self.b.ins().bitcast(types::I32X4, little(), t);
        let mb = self.b.ins().bitcast(types::I32X4, little(), magic);
        let ni = self.b.ins().isub(tb, mb);
        let bias = self.b.ins().iconst(types::I32, 127);
        let bias = self.b.ins().splat(types::I32X4, bias);
        let e = self.b.ins().iadd(ni, bias);
        let e = self.b.ins().ishl_imm_u(e, 23);
        let scale = self.b.ins().bitcast(types::F32X4, little(), e);
        let y = self.b.ins().fmul(p, scale);
        // Out of range: underflow to 0, overflow to inf; NaN passes through.
        let zero = c(self, 0.0);
        let y = self.fselect(under, zero, y);
        let inf = c(self, f32::INFINITY);
        let over_lim = c(self, 88.722_84);
        let over = self.b.ins().fcmp(FloatCC::GreaterThan, x, over_lim);
        let y = self.fselect(over, inf, y);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        self.fselect(nan, x, y)
    }

    /// `2^x` on 4 lanes for `x <= 0` (softmax weights `exp2(s - max)`): no overflow is
    /// possible, so only underflow is clamped (at 2^-126, a weight of ~1e-38); NaN stays NaN.
    /// Round-to-nearest by the 1.5·2^23 trick, a degree-5 minimax polynomial for 2^f on
    /// [-1/2, 1/2] (relative error < 3e-7), and the exponent built in the bits.
    pub(crate) fn vexp2_nonpos(&mut self, x: Value) -> Value {
        let c = |g: &mut Self, v: f32| {
            let s = g.fconst(v);
            g.b.ins().splat(types::F32X4, s)
        };
        let lo = c(self, -126.0);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let x = self.fselect(under, lo, x);
        let magic = c(self, 12_582_912.0);
        let t = self.b.ins().fadd(x, magic);
        let n = self.b.ins().fsub(t, magic);
        let f = self.b.ins().fsub(x, n);
        let coeffs = EXP2_POLY;
        let mut p = c(self, coeffs[0]);
        for k in &coeffs[1..] {
            let kv = c(self, *k);
            p = self.b.ins().fma(p, f, kv);
        }
        let tb = self.b.ins().bitcast(types::I32X4, little(), t);
        let mb = self.b.ins().bitcast(types::I32X4, little(), magic);
        let ni = self.b.ins().isub(tb, mb);
        let e = self.b.ins().iconst(types::I32, 127);
        let e = self.b.ins().splat(types::I32X4, e);
        let e = self.b.ins().iadd(ni, e);
        let e = self.b.ins().ishl_imm_u(e, 23);
        let scale = self.b.ins().bitcast(types::F32X4, little(), e);
        self.b.ins().fmul(p, scale)
    }

    /// Lane select on floats by an i32x4 mask.
    pub(crate) fn fselect(&mut self, mask: Value, a: Value, b: Value) -> Value {
        let m = if self.b.func.dfg.value_type(mask) == types::F32X4 { mask } else { self.b.ins().bitcast(types::F32X4, little(), mask) };
        self.b.ins().bitselect(m, a, b)
    }

    fn vsigmoid(&mut self, x: Value) -> Value {
        let nx = self.b.ins().fneg(x);
        let e = self.vexp(nx);
        let one = self.fconst(1.0);
        let one = self.b.ins().splat(types::F32X4, one);
        let d = self.b.ins().fadd(one, e);
        self.b.ins().fdiv(one, d)
    }

    /// Vector code for `e` over the 4 lanes of the vector variables in scope.
    fn vexpr(&mut self, e: &Expr, vecs: &[String]) -> VV {
        if !self.varying(e, vecs) {
            return VV::U(self.expr(e));
        }
        if matches!(e, Expr::Var(_)) {
            return self.vexpr_new(e, vecs);
        }
        if let Some((v, vector)) = self.memo_get(e, vecs) {
            return if vector { VV::V(v) } else { VV::U(v) };
        }
        let r = self.vexpr_new(e, vecs);
        let (v, vector) = match r {
            VV::V(v) => (v, true),
            VV::U(v) => (v, false),
        };
        self.memo_put(e, vecs, v, vector);
        r
    }

    /// [`Self::vexpr`] without the memo.
    fn vexpr_new(&mut self, e: &Expr, vecs: &[String]) -> VV {
        match e {
            Expr::Var(v) => VV::V(self.env.iter().rev().find(|(n, _)| n == v).expect("bound").1),
            Expr::Unary(op, a) => {
                let x = self.vexpr(a, vecs);
                let x = self.vec(x);
                let f = |g: &mut Self, v: f32| {
                    let s = g.fconst(v);
                    g.b.ins().splat(types::F32X4, s)
                };
                VV::V(match op {
                    UnOp::Neg if self.b.func.dfg.value_type(x) == types::F32X4 => self.b.ins().fneg(x),
                    UnOp::Neg => self.b.ins().ineg(x),
                    UnOp::Not => self.b.ins().bnot(x),
                    UnOp::Abs if self.b.func.dfg.value_type(x) == types::F32X4 => self.b.ins().fabs(x),
                    UnOp::Abs => self.b.ins().iabs(x),
                    UnOp::ToFloat => self.b.ins().fcvt_from_sint(types::F32X4, x),
                    UnOp::Sqrt => self.b.ins().sqrt(x),
                    UnOp::Exp => self.vexp(x),
                    UnOp::Sigmoid => self.vsigmoid(x),
                    UnOp::Silu => {
                        let s = self.vsigmoid(x);
                        self.b.ins().fmul(x, s)
                    }
                    UnOp::Tanh => {
                        // tanh(x) = sign(x)·(1 − 2/(exp(2|x|) + 1))
                        let ax = self.b.ins().fabs(x);
                        let two = f(self, 2.0);
                        let t = self.b.ins().fmul(ax, two);
                        let ex = self.vexp(t);
                        let one = f(self, 1.0);
                        let d = self.b.ins().fadd(ex, one);
                        let q = self.b.ins().fdiv(two, d);
                        let r = self.b.ins().fsub(one, q);
                        let neg = self.b.ins().fneg(r);
                        let zero = f(self, 0.0);
                        let isneg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
                        let r = self.fselect(isneg, neg, r);
                        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                        self.fselect(nan, x, r)
                    }
                    UnOp::Relu | UnOp::Elu => {
                        let zero = f(self, 0.0);
                        let pos = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                        let keep = self.b.ins().bor(pos, nan);
                        let other = if *op == UnOp::Relu {
                            zero
                        } else {
                            let ex = self.vexp(x);
                            let one = f(self, 1.0);
                            self.b.ins().fsub(ex, one)
                        };
                        self.fselect(keep, x, other)
                    }
                    UnOp::Log => return VV::V(self.lanewise(e)),
                })
            }
            Expr::Binary(op, a, b) => {
                let pow2 = |d: &Expr| match d {
                    Expr::Int(n) if *n > 0 && (*n as u64).is_power_of_two() => Some(n.trailing_zeros()),
                    _ => None,
                };
                // x / c with c the same for all lanes: one reciprocal (hoisted), then multiplies.
                if *op == BinOp::Div && !self.varying(b, vecs) {
                    let x = self.vexpr(a, vecs);
                    let x = self.vec(x);
                    let r = self.expr(&reciprocal(b));
                    let r = self.b.ins().splat(types::F32X4, r);
                    return VV::V(self.b.ins().fmul(x, r));
                }
                if matches!(op, BinOp::And | BinOp::Or) && costly(b) {
                    return VV::V(self.vshort_circuit(*op, a, b, vecs));
                }
                match op {
                    BinOp::Pow => return VV::V(self.vpow(a, b, vecs, e)),
                    BinOp::FloorDiv | BinOp::Mod if pow2(b).is_none() => {
                        return VV::V(match &**b {
                            // Cranelift's optimizer divides scalars by constants with
                            // multiplications and shares the repeated ones (GPSA's `j // 14`
                            // in four places): faster than the vector form, which it cannot
                            // share across the form's branches (gpsa N=512: 15 vs 22 ms).
                            Expr::Int(n) if *n > 1 && *n < (1 << 20) && !self.optimized => self.vdiv_const(*op, a, *n, vecs, e),
                            _ => self.lanewise(e),
                        });
                    }
                    _ => {}
                }
                let (x, y) = (self.vexpr(a, vecs), self.vexpr(b, vecs));
                let (x, y) = (self.vec(x), self.vec(y));
                VV::V(match op {
                    // Floor division and modulo by 2^k: arithmetic shift and mask are exact
                    // floor operations for negative numbers too.
                    BinOp::FloorDiv => {
                        let k = pow2(b).expect("checked");
                        self.b.ins().sshr_imm_u(x, k as i64)
                    }
                    BinOp::Mod => {
                        let n = match &**b {
                            Expr::Int(n) => *n,
                            _ => unreachable!("checked"),
                        };
                        let m = self.b.ins().iconst(types::I32, n - 1);
                        let m = self.b.ins().splat(types::I32X4, m);
                        self.b.ins().band(x, m)
                    }
                    // Everything else is the scalar instruction on vectors (comparisons give
                    // lane masks).
                    _ => self.binary(*op, x, y),
                })
            }
            Expr::Select(c, a, b) => {
                let cm = self.vexpr(c, vecs);
                let cm = self.vec(cm);
                let (x, y) = (self.vexpr(a, vecs), self.vexpr(b, vecs));
                let (x, y) = (self.vec(x), self.vec(y));
                VV::V(if self.b.func.dfg.value_type(x) == types::F32X4 { self.fselect(cm, x, y) } else { self.b.ins().bitselect(cm, x, y) })
            }
            Expr::Load(t, idx) => VV::V(self.vload(t, idx, vecs)),
            _ => VV::V(self.lanewise(e)),
        }
    }

    /// A load whose indices vary across the lanes. Indices are computed on 4 lanes and
    /// clamped into the tensor as the scalar load does; then, when the only varying index is
    /// the last one, it is the key `j` (plus a uniform offset) and no lane was clamped, one
    /// vector load (a dense bias row); otherwise 4 scalar loads at the lanes' offsets.
    fn vload(&mut self, t: &str, idx: &[Expr], vecs: &[String]) -> Value {
        let tv = self.tens[t].clone();
        let fl = if self.writing.as_deref() == Some(t) { flags() } else { ro_flags() };
        let off = self.uniform_offset(t, idx, vecs);
        let mut lanes = Vec::new();
        for (axis, x) in idx.iter().enumerate() {
            if self.varying(x, vecs) {
                let v = self.vexpr(x, vecs);
                let v = self.vec(v);
                let z = self.b.ins().iconst(types::I32, 0);
                let z = self.b.ins().splat(types::I32X4, z);
                let last = self.b.ins().iadd_imm_s(tv.ext[axis], -1);
                let last = self.b.ins().ireduce(types::I32, last);
                let last = self.b.ins().splat(types::I32X4, last);
                let v = self.b.ins().smax(v, z);
                lanes.push((axis, self.b.ins().smin(v, last)));
            }
        }
        let (ety, vty) = if tv.is_int { (types::I32, types::I32X4) } else { (types::F32, types::F32X4) };
        let gather = |g: &mut Self| {
            let zero = if tv.is_int { g.b.ins().iconst(types::I32, 0) } else { g.fconst(0.0) };
            let mut acc = g.b.ins().splat(vty, zero);
            for lane in 0..4u8 {
                let mut o = off;
                for (axis, v) in &lanes {
                    let x = g.b.ins().extractlane(*v, lane);
                    let x = g.b.ins().sextend(types::I64, x);
                    let p = g.b.ins().imul(x, tv.stride[*axis]);
                    o = g.b.ins().iadd(o, p);
                }
                let bytes = g.b.ins().ishl_imm_u(o, 2);
                let addr = g.b.ins().iadd(tv.base, bytes);
                let x = g.b.ins().load(ety, fl, addr, 0);
                acc = g.b.ins().insertlane(acc, x, lane);
            }
            acc
        };
        let key_row = match (lanes.as_slice(), idx.last()) {
            ([(axis, _)], Some(x)) => *axis + 1 == idx.len() && is_key_plus_uniform(x, vecs),
            _ => false,
        };
        if !key_row {
            return gather(self);
        }
        // Consecutive lanes (none clamped) and a unit stride: one vector load.
        let (axis, v) = lanes[0];
        let v0 = self.b.ins().extractlane(v, 0);
        let v3 = self.b.ins().extractlane(v, 3);
        let span = self.b.ins().isub(v3, v0);
        let whole = self.b.ins().icmp_imm_s(IntCC::Equal, span, 3);
        let unit = self.b.ins().icmp_imm_s(IntCC::Equal, tv.stride[axis], 1);
        let fast = self.b.ins().band(whole, unit);
        let mut vector = |g: &mut Self| {
            let x = g.b.ins().sextend(types::I64, v0);
            let o = g.b.ins().iadd(off, x);
            let bytes = g.b.ins().ishl_imm_u(o, 2);
            let addr = g.b.ins().iadd(tv.base, bytes);
            g.b.ins().load(vty, little().with_notrap().with_readonly(), addr, 0)
        };
        self.either(fast, vty, &mut vector, &mut |g| gather(g))
    }

    /// The offset (in elements) of a lane-varying load's uniform indices, clamped as the
    /// scalar load clamps them; hoisted out of the key loop by [`Self::hoist`].
    fn uniform_offset(&mut self, t: &str, idx: &[Expr], vecs: &[String]) -> Value {
        let key = offset_key(t, idx);
        if let Some((_, v)) = self.cache.iter().rev().find(|(x, _)| *x == key) {
            return *v;
        }
        let tv = self.tens[t].clone();
        let uniform: Vec<(usize, &Expr)> = idx.iter().enumerate().filter(|(_, x)| !self.varying(x, vecs)).collect();
        self.clamped_offset(&tv, uniform)
    }

    /// When `e` reads a row of f32s along `var` ([`attnc_ir::analysis::row_access`]), the
    /// address of its element at `var = 0` and a run-time flag: the last axis is contiguous
    /// and holds at least `len` elements, so `var in 0..len` reads `len` consecutive floats
    /// (the packs then copy rows with vector loads).
    pub(crate) fn contiguous_row(&mut self, e: &Expr, var: &str, len: Value) -> Option<(Value, Value)> {
        let row = attnc_ir::analysis::row_access(self.kernel, e, var)?;
        let tv = self.tens[row.tensor].clone();
        let off = self.clamped_offset(&tv, row.prefix.iter().enumerate());
        let bytes = self.b.ins().ishl_imm_u(off, 2);
        let addr = self.b.ins().iadd(tv.base, bytes);
        let axis = row.prefix.len();
        let covers = self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, tv.ext[axis], len);
        let unit = self.b.ins().icmp_imm_s(IntCC::Equal, tv.stride[axis], 1);
        Some((addr, self.b.ins().band(covers, unit)))
    }

    /// Copies `len` floats from `src` to `dst` (byte addresses), times `factor` when given:
    /// f32x4 loads and stores, then a scalar tail. `store` writes one value: a vector at a
    /// float offset, or (`transpose`) each lane on its own.
    fn copy_row(&mut self, src: Value, len: Value, factor: Option<Value>, store: &mut dyn FnMut(&mut Self, Value, Value)) {
        let fv = factor.map(|f| self.b.ins().splat(types::F32X4, f));
        self.for_lanes(len, &mut |g, x, ty| {
            let v = g.load_at(src, x, ty);
            let f = if ty == types::F32X4 { fv } else { factor };
            let v = match f {
                Some(f) => g.b.ins().fmul(v, f),
                None => v,
            };
            store(g, x, v);
        });
    }

    /// `body(x, ty)` for `x in 0..len`: f32x4 steps (`ty` F32X4, `x` a multiple of 4), then
    /// a scalar tail (`ty` F32).
    pub(crate) fn for_lanes(&mut self, len: Value, body: &mut dyn FnMut(&mut Self, Value, Type)) {
        let nvec = self.b.ins().sshr_imm_u(len, 2);
        let zero = self.iconst(0);
        self.for_range(zero, nvec, &mut |g, x4| {
            let x = g.b.ins().imul_imm_s(x4, 4);
            body(g, x, types::F32X4);
        });
        let tail = self.b.ins().imul_imm_s(nvec, 4);
        self.for_range(tail, len, &mut |g, x| body(g, x, types::F32));
    }

    /// A value of type `ty` (F32 or F32X4) at float offset `x` of the byte address `base`
    /// (unaligned).
    pub(crate) fn load_at(&mut self, base: Value, x: Value, ty: Type) -> Value {
        let bytes = self.b.ins().ishl_imm_u(x, 2);
        let a = self.b.ins().iadd(base, bytes);
        self.b.ins().load(ty, MemFlagsData::new().with_notrap(), a, 0)
    }

    /// A scalar `v` as a value of type `ty` (F32 or F32X4).
    fn lanes_of(&mut self, v: Value, ty: Type) -> Value {
        if ty == types::F32X4 {
            self.b.ins().splat(types::F32X4, v)
        } else {
            v
        }
    }

    /// `len` zeros at `base` (a float workspace).
    fn zero_fill(&mut self, base: Value, len: Value) {
        self.for_lanes(len, &mut |g, x, ty| {
            let z = g.fconst(0.0);
            let z = g.lanes_of(z, ty);
            g.store_at(base, x, z);
        });
    }

    /// Stores a value of [`Self::copy_row`] into a row of floats at `base + row` (vector or
    /// scalar, unaligned).
    fn store_row(&mut self, base: Value, row: Value, x: Value, v: Value) {
        let off = self.b.ins().iadd(row, x);
        self.store_at(base, off, v);
    }

    /// Stores `v` (F32 or F32X4) at float offset `x` of the byte address `base` (unaligned).
    fn store_at(&mut self, base: Value, x: Value, v: Value) {
        let bytes = self.b.ins().ishl_imm_u(x, 2);
        let a = self.b.ins().iadd(base, bytes);
        self.b.ins().store(MemFlagsData::new().with_notrap(), v, a, 0);
    }

    /// Floor division or modulo by a constant `d` in `2..2^20` on 4 lanes (GPSA's `j // 14`):
    /// the quotient estimated in f32 as `floor(x · (1/d))`, which is off by at most one while
    /// `|x| < 2^23` (relative error below 2^-23 on a quotient below 2^22), then corrected
    /// once each way through the remainder. Lanes outside that range take the scalar path.
    fn vdiv_const(&mut self, op: BinOp, a: &Expr, d: i64, vecs: &[String], e: &Expr) -> Value {
        let x = self.vexpr(a, vecs);
        let x = self.vec(x);
        let c = |g: &mut Self, v: i64| {
            let k = g.b.ins().iconst(types::I32, v);
            g.b.ins().splat(types::I32X4, k)
        };
        let (hi, lo) = (c(self, 1 << 23), c(self, -(1 << 23)));
        let below = self.b.ins().icmp(IntCC::SignedLessThan, x, hi);
        let above = self.b.ins().icmp(IntCC::SignedGreaterThan, x, lo);
        let inside = self.b.ins().band(below, above);
        let fits = self.b.ins().vall_true(inside);
        let mut fast = |g: &mut Self| {
            let xf = g.b.ins().fcvt_from_sint(types::F32X4, x);
            let inv = g.fconst(1.0 / d as f32);
            let inv = g.b.ins().splat(types::F32X4, inv);
            let qf = g.b.ins().fmul(xf, inv);
            let qf = g.b.ins().floor(qf);
            let q = g.b.ins().fcvt_to_sint_sat(types::I32X4, qf);
            let dv = c(g, d);
            let qd = g.b.ins().imul(q, dv);
            let r = g.b.ins().isub(x, qd);
            // r < 0: the estimate was one too high; r >= d: one too low (masks are -1 per lane).
            let zero = c(g, 0);
            let neg = g.b.ins().icmp(IntCC::SignedLessThan, r, zero);
            let q = g.b.ins().iadd(q, neg);
            let fix = g.b.ins().band(neg, dv);
            let r = g.b.ins().iadd(r, fix);
            let big = g.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, r, dv);
            let q = g.b.ins().isub(q, big);
            let fix = g.b.ins().band(big, dv);
            let r = g.b.ins().isub(r, fix);
            if op == BinOp::FloorDiv {
                q
            } else {
                r
            }
        };
        self.either(fits, types::I32X4, &mut fast, &mut |g| g.lanewise(e))
    }

    /// `a && b` / `a || b` on 4 lanes, skipping `b` when `a` already decides every lane (all
    /// false / all true): a mask like PowerAttention's `gap == 0 || pow2(gap)` then never
    /// runs its lane-by-lane reduction on the diagonal tiles.
    fn vshort_circuit(&mut self, op: BinOp, a: &Expr, b: &Expr, vecs: &[String]) -> Value {
        let x = self.vexpr(a, vecs);
        let x = self.vec(x);
        let decided = match op {
            BinOp::Or => self.b.ins().vall_true(x),
            _ => {
                let nx = self.b.ins().bnot(x);
                self.b.ins().vall_true(nx)
            }
        };
        let ty = self.b.func.dfg.value_type(x);
        let (rhs, done) = (self.b.create_block(), self.b.create_block());
        self.b.append_block_param(done, ty);
        self.b.ins().brif(decided, done, &[cranelift::codegen::ir::BlockArg::Value(x)], rhs, &[]);
        self.b.switch_to_block(rhs);
        let r = self.arm(&mut |g| {
            let y = g.vexpr_f(b, vecs);
            g.binary(op, x, y)
        });
        self.b.ins().jump(done, &[cranelift::codegen::ir::BlockArg::Value(r)]);
        self.b.switch_to_block(done);
        self.b.block_params(done)[0]
    }

    /// `base ** y`: with a uniform positive base, `exp(y · ln base)` on 4 lanes (RetNet's
    /// `γ^(p−j)`); otherwise lane by lane.
    fn vpow(&mut self, a: &Expr, b: &Expr, vecs: &[String], e: &Expr) -> Value {
        if self.varying(a, vecs) {
            return self.lanewise(e);
        }
        let base = self.expr(a);
        let zero = self.fconst(0.0);
        let pos = self.b.ins().fcmp(FloatCC::GreaterThan, base, zero);
        self.either(
            pos,
            types::F32X4,
            &mut |g| {
                let lb = g.call("attnc_logf", &[base]);
                let lbv = g.b.ins().splat(types::F32X4, lb);
                let y = g.vexpr(b, vecs);
                let y = g.vec(y);
                let t = g.b.ins().fmul(y, lbv);
                g.vexp(t)
            },
            &mut |g| g.lanewise(e),
        )
    }

    /// The value of `then` where `cond` holds, else of `other` (each generated in its own
    /// block, joined by a block parameter of type `ty`).
    pub(crate) fn either(&mut self, cond: Value, ty: Type, then: &mut dyn FnMut(&mut Self) -> Value, other: &mut dyn FnMut(&mut Self) -> Value) -> Value {
        let done = self.b.create_block();
        self.b.append_block_param(done, ty);
        let (yes, no) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, yes, &[], no, &[]);
        self.b.switch_to_block(yes);
        let v = self.arm(then);
        self.b.ins().jump(done, &[cranelift::codegen::ir::BlockArg::Value(v)]);
        self.b.switch_to_block(no);
        let v = self.arm(other);
        self.b.ins().jump(done, &[cranelift::codegen::ir::BlockArg::Value(v)]);
        self.b.switch_to_block(done);
        self.b.block_params(done)[0]
    }

    /// Computes the lane-uniform parts of `exprs` now (before a loop over key vectors, see
    /// [`attnc_ir::analysis::invariants`]) and caches them; returns how many entries to pop
    /// afterwards.
    pub(crate) fn hoist(&mut self, exprs: &[&Expr], vecs: &[String]) -> usize {
        use attnc_ir::analysis::{invariants, Invariant};
        let before = self.cache.len();
        for inv in invariants(exprs, vecs) {
            let (key, value) = match inv {
                Invariant::Value(e) => (e.clone(), None),
                Invariant::Divisor(d) => (reciprocal(d), None),
                Invariant::LoadOffset { tensor, index } => (offset_key(tensor, index), Some((tensor, index))),
            };
            if self.cache.iter().any(|(x, _)| *x == key) {
                continue;
            }
            let v = match value {
                Some((t, idx)) => self.uniform_offset(t, idx, vecs),
                None => self.expr(&key),
            };
            self.cache.push((key, v));
        }
        self.cache.len() - before
    }

    pub(crate) fn unhoist(&mut self, n: usize) {
        let len = self.cache.len();
        self.cache.truncate(len - n);
    }

    fn vexpr_f(&mut self, e: &Expr, vecs: &[String]) -> Value {
        let v = self.vexpr(e, vecs);
        self.vec(v)
    }

    pub(crate) fn hreduce(&mut self, v: Value, max: bool) -> Value {
        let mut acc = self.b.ins().extractlane(v, 0);
        for lane in 1..4u8 {
            let x = self.b.ins().extractlane(v, lane);
            acc = if max { self.b.ins().fmax(acc, x) } else { self.b.ins().fadd(acc, x) };
        }
        acc
    }

    pub(crate) fn ptr_off(&mut self, base: Value, floats: Value) -> Value {
        let bytes = self.b.ins().ishl_imm_u(floats, 2);
        self.b.ins().iadd(base, bytes)
    }

    /// The addresses of the task workspace's regions, in [`TASK`]'s order, for a tile of
    /// `bq × bk` with `dlen` channels and `ev` values; and the size of a `Values` region
    /// (`bq · ev`, which the fills reuse). Each column kind's size is generated once.
    fn workspace(&mut self, ws: Value, bq: i64, bk: i64, dlen: Value, ev: Value) -> ([Value; TASK.len()], Value) {
        let mut sizes: Vec<(Cols, Value)> = Vec::new();
        let mut at = [ws; TASK.len()];
        let mut ptr = ws;
        for (n, region) in TASK.iter().enumerate() {
            at[n] = ptr;
            if n + 1 == TASK.len() {
                break;
            }
            let size = match sizes.iter().find(|(c, _)| *c == region.cols) {
                Some((_, v)) => *v,
                None => {
                    let v = match region.cols {
                        Cols::Channels => self.b.ins().imul_imm_s(dlen, bq),
                        Cols::Keys => self.iconst(bq * bk),
                        Cols::Values => self.b.ins().imul_imm_s(ev, bq),
                        Cols::One => self.iconst(bq),
                    };
                    sizes.push((region.cols, v));
                    v
                }
            };
            ptr = self.ptr_off(ptr, size);
        }
        let values = match sizes.iter().find(|(c, _)| *c == Cols::Values) {
            Some((_, v)) => *v,
            None => self.b.ins().imul_imm_s(ev, bq),
        };
        (at, values)
    }

    /// Body of `pack(frame, b, h, kt, vb)`.
    pub fn pack(&mut self, ts: &TiledSchedule, b: Value, h: Value, kt: Value, vb: Value) {
        let (plan, bk) = (&ts.plan, ts.block_k as i64);
        let k = self.kernel;
        self.bind("b", b);
        self.bind("h", h);
        let mj = self.expr(&k.iter.j.to_expr());
        let ev = self.expr(&k.iter.e.to_expr());
        // Keys padded to whole tiles: ceil(M / BK) · BK.
        let t = self.b.ins().iadd_imm_s(mj, bk - 1);
        let bkv = self.iconst(bk);
        let (ntiles, _) = self.floor_div(t, bkv);
        let mpad = self.b.ins().imul_imm_s(ntiles, bk);
        let zero = self.iconst(0);
        let zf = self.fconst(0.0);
        // What does not vary along keys, channels and values (`h // (H // G)`: two integer
        // divisions) is computed once per pack, not per element.
        let mut inner = vec!["j".to_string(), "e".to_string()];
        let mut roots = vec![&k.value];
        if let Some(dot) = &plan.dot {
            inner.push(dot.r.clone());
            roots.push(&dot.b);
        }
        let hoisted = self.hoist(&roots, &inner);
        if let Some(dot) = &plan.dot {
            let dlen = self.expr(&dot.len);
            self.for_range(zero, mpad, &mut |g, j| {
                let inside = g.b.ins().icmp(IntCC::SignedLessThan, j, mj);
                let jc = g.b.ins().iadd_imm_s(mj, -1);
                let jc = g.b.ins().smin(j, jc);
                g.bind("j", jc);
                let (tile, _) = g.floor_div(j, bkv);
                let c = g.b.ins().srem(j, bkv);
                let panel = g.b.ins().imul(tile, dlen);
                let panel = g.b.ins().imul_imm_s(panel, bk);
                let col = g.b.ins().iadd(panel, c);
                let mut generic = |g: &mut Self| {
                    let z = g.iconst(0);
                    g.for_range(z, dlen, &mut |g, r| {
                        g.bind(&dot.r, r);
                        let v = g.expr(&dot.b);
                        g.unbind(1);
                        let v = g.b.ins().select(inside, v, zf);
                        let off = g.b.ins().imul_imm_s(r, bk);
                        let off = g.b.ins().iadd(off, col);
                        g.store_f32(kt, off, v);
                    });
                };
                // A key row read from a contiguous tensor: vector loads, one store per lane.
                match g.contiguous_row(&dot.b, &dot.r, dlen) {
                    Some((src, ok)) => {
                        let fast = g.b.ins().band(ok, inside);
                        g.if_else(
                            fast,
                            &mut |g| {
                                g.copy_row(src, dlen, None, &mut |g, x, v| {
                                    let lanes = if g.b.func.dfg.value_type(v).is_vector() { 4 } else { 1 };
                                    for lane in 0..lanes {
                                        let s = if lanes == 4 { g.b.ins().extractlane(v, lane as u8) } else { v };
                                        let r = g.b.ins().iadd_imm_s(x, lane);
                                        let off = g.b.ins().imul_imm_s(r, bk);
                                        let off = g.b.ins().iadd(off, col);
                                        g.store_f32(kt, off, s);
                                    }
                                })
                            },
                            &mut generic,
                        );
                    }
                    None => generic(g),
                }
                g.unbind(1);
            });
        }
        self.for_range(zero, mpad, &mut |g, j| {
            let inside = g.b.ins().icmp(IntCC::SignedLessThan, j, mj);
            let jc = g.b.ins().iadd_imm_s(mj, -1);
            let jc = g.b.ins().smin(j, jc);
            g.bind("j", jc);
            let row = g.b.ins().imul(j, ev);
            let mut generic = |g: &mut Self| {
                let z = g.iconst(0);
                g.for_range(z, ev, &mut |g, e| {
                    g.bind("e", e);
                    let v = g.expr(&k.value);
                    g.unbind(1);
                    let v = g.b.ins().select(inside, v, zf);
                    let off = g.b.ins().iadd(row, e);
                    g.store_f32(vb, off, v);
                });
            };
            match g.contiguous_row(&k.value, "e", ev) {
                Some((src, ok)) => {
                    let fast = g.b.ins().band(ok, inside);
                    g.if_else(fast, &mut |g| g.copy_row(src, ev, None, &mut |g, x, v| g.store_row(vb, row, x, v)), &mut generic);
                }
                None => generic(g),
            }
            g.unbind(1);
        });
        self.unhoist(hoisted);
        self.unbind(2);
        self.b.ins().return_(&[]);
    }

    /// Body of `tile(frame, b, h, i0, kt, vb, ws, classes)`. `mm` holds the tile matmuls
    /// `(qk, pv)` and, with the microkernel, its softmax step (used by softmax branches with
    /// neither a post-map nor a decay after the weights, and by the first of two passes).
    pub fn tile(&mut self, ts: &TiledSchedule, args: [Value; 7], mm: Matmuls<FuncRef>) {
        let (plan, bq, bk) = (&ts.plan, ts.block_q as i64, ts.block_k as i64);
        let (qk, pv, softmax_mk) = mm;
        let softmax_step = softmax_mk.map(|m| m.step);
        let [b, h, i0, kt, vb, ws, classes] = args;
        let k = self.kernel;
        self.bind("b", b);
        self.bind("h", h);
        let ni = self.expr(&k.iter.i.to_expr());
        let mj = self.expr(&k.iter.j.to_expr());
        let ev = self.expr(&k.iter.e.to_expr());
        let dlen = match &plan.dot {
            Some(d) => self.expr(&d.len),
            None => self.iconst(0),
        };
        let folds_log2e = plan.log2e_folded();
        let rest = self.b.ins().isub(ni, i0);
        let bqv = self.iconst(bq);
        let nq = self.b.ins().smin(rest, bqv);
        let bkv = self.iconst(bk);
        let t = self.b.ins().iadd_imm_s(mj, bk - 1);
        let (ntiles, _) = self.floor_div(t, bkv);
        // The task workspace (`schedule::workspace::TASK`): A, S, O, OUT, then the row state.
        let (regions, bq_dv) = self.workspace(ws, bq, bk, dlen, ev);
        use crate::schedule::workspace::task;
        let [a_ws, s_ws, o_ws, out_ws, m_ws, l_ws, corr_ws, live_ws, blive_ws, tmax_ws] =
            [task::A, task::S, task::O, task::OUT, task::M, task::L, task::CORR, task::LIVE, task::BLIVE, task::TMAX].map(|r| regions[r]);
        let zero = self.iconst(0);
        let zf = self.fconst(0.0);
        let one_f = self.fconst(1.0);
        let ninf = self.fconst(f32::NEG_INFINITY);

        // Pack A (zero rows past the end), clear OUT and the live flags.
        if let Some(dot) = &plan.dot {
            self.for_range(zero, bqv, &mut |g, r| {
                let inside = g.b.ins().icmp(IntCC::SignedLessThan, r, nq);
                let i = g.b.ins().iadd(i0, r);
                let il = g.b.ins().iadd_imm_s(ni, -1);
                let i = g.b.ins().smin(i, il);
                g.bind("i", i);
                let row = g.b.ins().imul(r, dlen);
                // The folded row factor (and log2 e for a softmax), once per row.
                let factor = plan.fold.as_ref().map(|f| {
                    let v = g.expr(f);
                    if folds_log2e {
                        let l2e = g.fconst(std::f32::consts::LOG2_E);
                        g.b.ins().fmul(v, l2e)
                    } else {
                        v
                    }
                });
                let mut generic = |g: &mut Self| {
                    let z = g.iconst(0);
                    g.for_range(z, dlen, &mut |g, x| {
                        g.bind(&dot.r, x);
                        let v = g.expr(&dot.a);
                        g.unbind(1);
                        let v = match factor {
                            Some(f) => g.b.ins().fmul(v, f),
                            None => v,
                        };
                        let v = g.b.ins().select(inside, v, zf);
                        let off = g.b.ins().iadd(row, x);
                        g.store_f32(a_ws, off, v);
                    });
                };
                match g.contiguous_row(&dot.a, &dot.r, dlen) {
                    Some((src, ok)) => {
                        let fast = g.b.ins().band(ok, inside);
                        g.if_else(fast, &mut |g| g.copy_row(src, dlen, factor, &mut |g, x, v| g.store_row(a_ws, row, x, v)), &mut generic);
                    }
                    None => generic(g),
                }
                g.unbind(1);
            });
        }
        self.zero_fill(out_ws, bq_dv);
        self.zero_fill(live_ws, bqv);

        let iota = {
            let c = self.b.func.dfg.constants.insert(cranelift::codegen::ir::ConstantData::from([0u8, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0].as_ref()));
            self.b.ins().vconst(types::I32X4, c)
        };

        for (bn, (br, bp)) in k.branches.iter().zip(&plan.branches).enumerate() {
            let score_rest = &bp.rest;
            // The score is the bare dot in base 2, no bias (see `SoftmaxPlan::plain`).
            let plain_scores = bp.softmax.as_ref().is_some_and(|s| s.plain);
            let (softmax, sink, post) = match &br.norm {
                Norm::Softmax { sink, post } => (true, sink.clone(), post.clone()),
                _ => (false, None, None),
            };
            let linear_eps = match &br.norm {
                Norm::Linear { eps } => Some(eps.0),
                _ => None,
            };

            // Branch state.
            self.zero_fill(o_ws, bq_dv);
            self.for_range(zero, bqv, &mut |g, r| {
                let i = g.b.ins().iadd(i0, r);
                let il = g.b.ins().iadd_imm_s(ni, -1);
                let i = g.b.ins().smin(i, il);
                g.bind("i", i);
                let (m0, l0) = match &sink {
                    Some(se) => {
                        let sk = g.expr(se);
                        let is_ninf = g.b.ins().fcmp(FloatCC::Equal, sk, ninf);
                        let d = g.b.ins().fsub(sk, sk);
                        let one = g.call("attnc_expf", &[d]);
                        let l2e = g.fconst(std::f32::consts::LOG2_E);
                        let sk2 = g.b.ins().fmul(sk, l2e);
                        (sk2, g.b.ins().select(is_ninf, zf, one))
                    }
                    None => (ninf, zf),
                };
                g.unbind(1);
                g.store_f32(m_ws, r, m0);
                g.store_f32(l_ws, r, l0);
                g.store_f32(blive_ws, r, zf);
            });
            let one_pass = [SoftmaxPass { accumulate: true, fused_step: false, final_weights: false }];
            let passes: &[SoftmaxPass] = bp.softmax.as_ref().map_or(&one_pass, |s| &s.passes);
            for &pass in passes {
                let (accumulate, two_pass_second) = (pass.accumulate, pass.final_weights);
                // The softmax step runs in the microkernel when the schedule fuses it (nothing
                // sits between the weights and P·V, or, first of two passes, only the max and
                // denominator count); the generated pass then only writes the scores (masked
                // lanes −inf).
                let helper = softmax_step.filter(|_| pass.fused_step);
                // The second of two passes over plain dot products: on full tiles the weights
                // `2^(s − m) / l` come from the microkernel, and the generated pass only applies
                // the post-map (and decay). The reciprocal denominators go where the rescale
                // factors were (a second pass rescales nothing).
                let weights = softmax_mk.map(|m| m.weights).filter(|_| pass.final_weights && plain_scores);
                if weights.is_some() {
                    self.for_range(zero, bqv, &mut |g, r| {
                        let l = g.load_f32(l_ws, r);
                        let inv = g.b.ins().fdiv(one_f, l);
                        g.store_f32(corr_ws, r, inv);
                    });
                }
                let class_base = self.b.ins().imul_imm_s(ntiles, bn as i64);
                self.for_range(zero, ntiles, &mut |g, kb| {
                    let coff = g.b.ins().iadd(class_base, kb);
                    let caddr = g.b.ins().iadd(classes, coff);
                    let class = g.b.ins().load(types::I8, flags(), caddr, 0);
                    let live_tile = g.b.ins().icmp_imm_s(IntCC::NotEqual, class, 0);
                    g.if_then(live_tile, &mut |g| {
                        let j0 = g.b.ins().imul_imm_s(kb, bk);
                        let left = g.b.ins().isub(mj, j0);
                        let nk = g.b.ins().smin(left, bkv);
                        let partial = g.b.ins().icmp_imm_s(IntCC::Equal, class, 2);
                        let tail = g.b.ins().icmp(IntCC::SignedLessThan, nk, bkv);
                        let check = g.b.ins().bor(partial, tail);
                        // A full tile of plain dot products whose softmax step runs in the
                        // microkernel has no per-row work but marking its rows live.
                        let plain = helper.is_some() && plain_scores;
                        if plan.dot.is_some() {
                            let panel = g.b.ins().imul(kb, dlen);
                            let panel = g.b.ins().imul_imm_s(panel, bk);
                            let ktp = g.ptr_off(kt, panel);
                            match softmax_mk.filter(|_| plain) {
                                // A full tile of plain dot products: the row maxima come with the scores.
                                Some(SoftmaxKernels { qk_max, .. }) => g.if_else(
                                    check,
                                    &mut |g| {
                                        g.b.ins().call(qk, &[a_ws, dlen, ktp, s_ws, nq, dlen, bkv]);
                                    },
                                    &mut |g| {
                                        g.b.ins().call(qk_max, &[a_ws, dlen, ktp, s_ws, nq, dlen, bkv, tmax_ws]);
                                    },
                                ),
                                None => {
                                    g.b.ins().call(qk, &[a_ws, dlen, ktp, s_ws, nq, dlen, bkv]);
                                }
                            }
                        }
                        if let Some(w) = weights {
                            let full = g.b.ins().bxor_imm_u(check, 1);
                            g.if_then(full, &mut |g| {
                                g.b.ins().call(w, &[s_ws, bkv, nq, bkv, m_ws, corr_ws]);
                            });
                        }
                        let j0v = g.b.ins().ireduce(types::I32, j0);
                        let j0v = g.b.ins().splat(types::I32X4, j0v);
                        let jbase = g.b.ins().iadd(j0v, iota);
                        let mjv = g.b.ins().ireduce(types::I32, mj);
                        let mjv = g.b.ins().splat(types::I32X4, mjv);
                        // The rows of the tile: scores, mask and the per-row state (none for a `plain` tile).
                        let mut rows = |g: &mut Self| {
                            let z = g.iconst(0);
                            g.for_range(z, nq, &mut |g, r| {
                                let i = g.b.ins().iadd(i0, r);
                                g.bind("i", i);
                                let mut row_exprs: Vec<&Expr> = vec![score_rest];
                                row_exprs.extend(br.bias.iter());
                                row_exprs.extend(br.mask.iter());
                                row_exprs.extend(br.decay.iter());
                                row_exprs.extend(post.iter());
                                if let Norm::Map(f) = &br.norm {
                                    row_exprs.push(f);
                                }
                                let hoisted = g.hoist(&row_exprs, &["j".to_string(), DOT.to_string(), "s".to_string(), "w".to_string()]);
                                let srow = g.b.ins().imul_imm_s(r, bk);
                                let ninf_v = g.b.ins().splat(types::F32X4, ninf);
                                let zero_v = g.b.ins().splat(types::F32X4, zf);
                                let rowmax = g.b.declare_var(types::F32X4);
                                g.b.def_var(rowmax, ninf_v);
                                let rowsum = g.b.declare_var(types::F32X4);
                                g.b.def_var(rowsum, zero_v);
                                let rownan = g.b.declare_var(types::I32X4);
                                let anylive = g.b.declare_var(types::I32X4);
                                let zi = g.b.ins().iconst(types::I32, 0);
                                let zi = g.b.ins().splat(types::I32X4, zi);
                                g.b.def_var(anylive, zi);
                                g.b.def_var(rownan, zi);
                                let (mrow, lrow) = (g.load_f32(m_ws, r), g.load_f32(l_ws, r));
                                // The second of two passes divides by the final denominator: one
                                // reciprocal per row.
                                let linv = if two_pass_second { g.b.ins().fdiv(one_f, lrow) } else { lrow };
                                let nvec = g.iconst(bk / 4);
                                // Pass over the tile: scores, mask, then the weights in place. Tiles
                                // that are full and not the last take the path without mask work.
                                let pass = |g: &mut Self, masked: bool| {
                                    let z = g.iconst(0);
                                    g.for_range(z, nvec, &mut |g, cv| {
                                        let c4 = g.b.ins().imul_imm_s(cv, 4);
                                        let off = g.b.ins().iadd(srow, c4);
                                        let (jv, jcl) = key_lanes(g, jbase, c4, mjv);
                                        let addr = g.ptr_off(s_ws, off);
                                        let dotv = g.b.ins().load(types::F32X4, flags(), addr, 0);
                                        g.bind("j", jcl);
                                        g.bind(DOT, dotv);
                                        let vecs = vec!["j".to_string(), DOT.to_string()];
                                        // Softmax runs in base 2: s·log2(e), then exp2 (the factor is in
                                        // the packed queries when folded, so only the bias needs it).
                                        let l2e = g.fconst(std::f32::consts::LOG2_E);
                                        let l2e = g.b.ins().splat(types::F32X4, l2e);
                                        let mut s = g.vexpr_f(score_rest, &vecs);
                                        if softmax && !folds_log2e {
                                            s = g.b.ins().fmul(s, l2e);
                                        }
                                        if let Some(bias) = &br.bias {
                                            let bv = g.vexpr_f(bias, &vecs);
                                            let bv = if softmax { g.b.ins().fmul(bv, l2e) } else { bv };
                                            s = g.b.ins().fadd(s, bv);
                                        }
                                        // When nothing changed the tile's values, the store is skipped.
                                        let unchanged = plain_scores && !masked && !two_pass_second;
                                        // The lane mask (masked tiles only): j < M and the spec's mask.
                                        let lanes = if masked {
                                            let mut m = g.b.ins().icmp(IntCC::SignedLessThan, jv, mjv);
                                            if let Some(me) = &br.mask {
                                                let mv = g.vexpr_f(me, &vecs);
                                                m = g.b.ins().band(m, mv);
                                            }
                                            let al = g.b.use_var(anylive);
                                            let al = g.b.ins().bor(al, m);
                                            g.b.def_var(anylive, al);
                                            Some(m)
                                        } else {
                                            None
                                        };
                                        let sel = |g: &mut Self, x: Value, other: Value| match lanes {
                                            Some(m) => g.fselect(m, x, other),
                                            None => x,
                                        };
                                        let p = if softmax && helper.is_some() {
                                            sel(g, s, ninf_v)
                                        } else if softmax && !two_pass_second {
                                            let s = sel(g, s, ninf_v);
                                            // Max by compare-and-select (2 instructions, not the NaN-
                                            // propagating sequence); NaN is tracked on the side.
                                            let rm = g.b.use_var(rowmax);
                                            let gt = g.b.ins().fcmp(FloatCC::GreaterThan, s, rm);
                                            let rm = g.fselect(gt, s, rm);
                                            g.b.def_var(rowmax, rm);
                                            let isnan = g.b.ins().fcmp(FloatCC::Unordered, s, s);
                                            let rn = g.b.use_var(rownan);
                                            let rn = g.b.ins().bor(rn, isnan);
                                            g.b.def_var(rownan, rn);
                                            s
                                        } else if softmax {
                                            // Second pass: the final max and denominator are known
                                            // (on a full tile with `weights`, the tile holds the
                                            // weights already).
                                            let w = if weights.is_some() && !masked {
                                                s
                                            } else {
                                                let mv = g.b.ins().splat(types::F32X4, mrow);
                                                let d = g.b.ins().fsub(s, mv);
                                                let pe = g.vexp2_nonpos(d);
                                                let lv = g.b.ins().splat(types::F32X4, linv);
                                                g.b.ins().fmul(pe, lv)
                                            };
                                            g.bind("w", w);
                                            let vecs2 = vec!["j".to_string(), DOT.to_string(), "w".to_string()];
                                            let pw = g.vexpr_f(post.as_ref().expect("post"), &vecs2);
                                            g.unbind(1);
                                            let pw = match &br.decay {
                                                Some(de) => {
                                                    let dv = g.vexpr_f(de, &vecs);
                                                    g.b.ins().fmul(pw, dv)
                                                }
                                                None => pw,
                                            };
                                            sel(g, pw, zero_v)
                                        } else {
                                            let pw = match &br.norm {
                                                Norm::Map(f) => {
                                                    g.bind("s", s);
                                                    let vecs2 = vec!["j".to_string(), DOT.to_string(), "s".to_string()];
                                                    let p = g.vexpr_f(f, &vecs2);
                                                    g.unbind(1);
                                                    p
                                                }
                                                _ => s,
                                            };
                                            let pw = sel(g, pw, zero_v);
                                            if linear_eps.is_some() {
                                                let rs = g.b.use_var(rowsum);
                                                let rs = g.b.ins().fadd(rs, pw);
                                                g.b.def_var(rowsum, rs);
                                            }
                                            match &br.decay {
                                                Some(de) => {
                                                    let dv = g.vexpr_f(de, &vecs);
                                                    g.b.ins().fmul(pw, dv)
                                                }
                                                None => pw,
                                            }
                                        };
                                        g.unbind(2);
                                        if !unchanged {
                                            g.b.ins().store(flags(), p, addr, 0);
                                        }
                                    });
                                };
                                g.if_else(check, &mut |g| pass(g, true), &mut |g| {
                                    // A full tile has at least one key, all live.
                                    let ones = g.b.ins().iconst(types::I32, -1);
                                    let ones = g.b.ins().splat(types::I32X4, ones);
                                    g.b.def_var(anylive, ones);
                                    // A plain full tile never gets here (see `plain`).
                                    pass(g, false)
                                });
                                // Row bookkeeping.
                                let al = g.b.use_var(anylive);
                                let any = g.b.ins().vany_true(al);
                                g.if_then(any, &mut |g| {
                                    let one = g.fconst(1.0);
                                    g.store_f32(blive_ws, r, one);
                                });
                                if helper.is_some() {
                                    // The step runs on the whole tile below.
                                } else if softmax && !two_pass_second {
                                    let rm = g.b.use_var(rowmax);
                                    let tmax = g.hreduce(rm, true);
                                    let rn = g.b.use_var(rownan);
                                    let any_nan = g.b.ins().vany_true(rn);
                                    let nan = g.fconst(f32::NAN);
                                    let tmax = g.b.ins().select(any_nan, nan, tmax);
                                    let m_new = g.b.ins().fmax(mrow, tmax);
                                    let is_ninf = g.b.ins().fcmp(FloatCC::Equal, m_new, ninf);
                                    let m_use = g.b.ins().select(is_ninf, zf, m_new);
                                    let dm = g.b.ins().fsub(mrow, m_use);
                                    let ln2 = g.fconst(std::f32::consts::LN_2);
                                    let dm = g.b.ins().fmul(dm, ln2);
                                    let corr = g.call("attnc_expf", &[dm]);
                                    let mu = g.b.ins().splat(types::F32X4, m_use);
                                    let sum = g.b.declare_var(types::F32X4);
                                    g.b.def_var(sum, zero_v);
                                    let z = g.iconst(0);
                                    g.for_range(z, nvec, &mut |g, cv| {
                                        let c4 = g.b.ins().imul_imm_s(cv, 4);
                                        let off = g.b.ins().iadd(srow, c4);
                                        let addr = g.ptr_off(s_ws, off);
                                        let s = g.b.ins().load(types::F32X4, flags(), addr, 0);
                                        let d = g.b.ins().fsub(s, mu);
                                        let p = g.vexp2_nonpos(d);
                                        let acc = g.b.use_var(sum);
                                        let acc = g.b.ins().fadd(acc, p);
                                        g.b.def_var(sum, acc);
                                        // Without accumulation (first of two passes) only the sum counts.
                                        if accumulate {
                                            let p = match &br.decay {
                                                Some(de) => {
                                                    let (_, jcl) = key_lanes(g, jbase, c4, mjv);
                                                    g.bind("j", jcl);
                                                    let dv = g.vexpr_f(de, &["j".to_string()]);
                                                    g.unbind(1);
                                                    g.b.ins().fmul(p, dv)
                                                }
                                                None => p,
                                            };
                                            g.b.ins().store(flags(), p, addr, 0);
                                        }
                                    });
                                    let sv = g.b.use_var(sum);
                                    let tsum = g.hreduce(sv, false);
                                    let l_new = g.b.ins().fmul(lrow, corr);
                                    let l_new = g.b.ins().fadd(l_new, tsum);
                                    g.store_f32(l_ws, r, l_new);
                                    g.store_f32(m_ws, r, m_new);
                                    g.store_f32(corr_ws, r, corr);
                                } else if linear_eps.is_some() {
                                    let sv = g.b.use_var(rowsum);
                                    let tsum = g.hreduce(sv, false);
                                    let l_new = g.b.ins().fadd(lrow, tsum);
                                    g.store_f32(l_ws, r, l_new);
                                }
                                g.unhoist(hoisted);
                                g.unbind(1);
                            });
                        };
                        if plain {
                            g.if_else(check, &mut rows, &mut |g| {
                                let z = g.iconst(0);
                                g.for_range(z, nq, &mut |g, r| {
                                    let one = g.fconst(1.0);
                                    g.store_f32(blive_ws, r, one);
                                });
                            });
                        } else {
                            rows(g);
                        }
                        if let Some(step) = helper {
                            let null = g.iconst(0);
                            let tmax = if plain { g.b.ins().select(check, null, tmax_ws) } else { null };
                            g.b.ins().call(step, &[s_ws, bkv, nq, bkv, m_ws, l_ws, corr_ws, tmax]);
                        }
                        if accumulate {
                            let corr_arg = if softmax && !two_pass_second { corr_ws } else { g.iconst(0) };
                            let vt = vb_tile(g, vb, j0, ev);
                            g.b.ins().call(pv, &[s_ws, bkv, vt, ev, o_ws, ev, corr_arg, nq, nk, ev]);
                        }
                    });
                });
            }
            // Fold the branch into OUT: O · weight / denominator, for live rows.
            self.for_range(zero, nq, &mut |g, r| {
                let i = g.b.ins().iadd(i0, r);
                g.bind("i", i);
                let bl = g.load_f32(blive_ws, r);
                let mut live = g.b.ins().fcmp(FloatCC::NotEqual, bl, zf);
                let lrow = g.load_f32(l_ws, r);
                if softmax {
                    let mrow = g.load_f32(m_ws, r);
                    let fin = g.b.ins().fcmp(FloatCC::NotEqual, mrow, ninf);
                    live = g.b.ins().band(live, fin);
                }
                let mut factor = match (softmax && post.is_none(), linear_eps) {
                    (true, _) => g.b.ins().fdiv(one_f, lrow),
                    (_, Some(eps)) => {
                        let e = g.fconst(eps as f32);
                        let d = g.b.ins().fadd(lrow, e);
                        g.b.ins().fdiv(one_f, d)
                    }
                    _ => one_f,
                };
                if let Some(w) = &br.weight {
                    let wv = g.expr(w);
                    factor = g.b.ins().fmul(factor, wv);
                }
                g.unbind(1);
                g.if_then(live, &mut |g| {
                    let one = g.fconst(1.0);
                    g.store_f32(live_ws, r, one);
                    let row = g.b.ins().imul(r, ev);
                    let (o_row, out_row) = (g.ptr_off(o_ws, row), g.ptr_off(out_ws, row));
                    g.for_lanes(ev, &mut |g, e, ty| {
                        let o = g.load_at(o_row, e, ty);
                        let f = g.lanes_of(factor, ty);
                        let o = g.b.ins().fmul(o, f);
                        let acc = g.load_at(out_row, e, ty);
                        let acc = g.b.ins().fadd(acc, o);
                        g.store_at(out_row, e, acc);
                    });
                });
            });
        }
        // Gate and store: f32x4 stores when the output rows are contiguous along `e` and
        // there is no gate, else element by element.
        let out = self.tens[&k.output().name].clone();
        let rows_contiguous = k.gate.is_none() && k.out.last().is_some_and(|v| v == "e") && !k.out[..k.out.len() - 1].iter().any(|v| v == "e");
        let store_rows = |g: &mut Self, vector: bool| {
            let z = g.iconst(0);
            g.for_range(z, nq, &mut |g, r| {
                let i = g.b.ins().iadd(i0, r);
                g.bind("i", i);
                let lv = g.load_f32(live_ws, r);
                let live = g.b.ins().fcmp(FloatCC::NotEqual, lv, zf);
                let row = g.b.ins().imul(r, ev);
                if vector {
                    let out_row = g.ptr_off(out_ws, row);
                    let mut off = g.iconst(0);
                    for (axis, var) in k.out[..k.out.len() - 1].iter().enumerate() {
                        let x = g.expr(&Expr::var(var));
                        let p = g.b.ins().imul(x, out.stride[axis]);
                        off = g.b.ins().iadd(off, p);
                    }
                    let dst = g.ptr_off(out.base, off);
                    g.if_else(live, &mut |g| g.copy_row(out_row, ev, None, &mut |g, e, v| g.store_at(dst, e, v)), &mut |g| g.zero_fill(dst, ev));
                } else {
                    let z = g.iconst(0);
                    g.for_range(z, ev, &mut |g, e| {
                        g.bind("e", e);
                        let off = g.b.ins().iadd(row, e);
                        let acc = g.load_f32(out_ws, off);
                        g.store_output(&out, acc, live);
                        g.unbind(1);
                    });
                }
                g.unbind(1);
            });
        };
        if rows_contiguous {
            let unit = self.b.ins().icmp_imm_s(IntCC::Equal, out.stride[k.out.len() - 1], 1);
            self.if_else(unit, &mut |g| store_rows(g, true), &mut |g| store_rows(g, false));
        } else {
            store_rows(self, false);
        }
        self.unbind(2);
        self.b.ins().return_(&[]);
    }
}

/// The cache key of a load's hoisted uniform offset (`#` cannot occur in a tensor name).
fn offset_key(t: &str, idx: &[Expr]) -> Expr {
    Expr::Load(format!("{t}#offset"), idx.to_vec())
}

/// Whether `e` is the key index `j` (whose lanes are consecutive) plus or minus terms that
/// are the same for every lane.
fn is_key_plus_uniform(e: &Expr, vecs: &[String]) -> bool {
    let uniform = |x: &Expr| !vecs.iter().any(|v| x.free_vars().contains(v));
    match e {
        Expr::Var(v) => v == "j",
        Expr::Binary(BinOp::Add, a, b) => (is_key_plus_uniform(a, vecs) && uniform(b)) || (uniform(a) && is_key_plus_uniform(b, vecs)),
        Expr::Binary(BinOp::Sub, a, b) => is_key_plus_uniform(a, vecs) && uniform(b),
        _ => false,
    }
}

/// The 4 key indices of the vector at offset `c4` in the tile (`jbase` holds `j0 + lane`),
/// and the same clamped into `[0, M)`: lanes past the last key read key `M - 1` (finite
/// values) and are masked off.
fn key_lanes(g: &mut Gen, jbase: Value, c4: Value, mjv: Value) -> (Value, Value) {
    let c4i = g.b.ins().ireduce(types::I32, c4);
    let c4i = g.b.ins().splat(types::I32X4, c4i);
    let jv = g.b.ins().iadd(jbase, c4i);
    let last = g.b.ins().iconst(types::I32, -1);
    let last = g.b.ins().splat(types::I32X4, last);
    let mlast = g.b.ins().iadd(mjv, last);
    let zero = g.b.ins().iconst(types::I32, 0);
    let zero = g.b.ins().splat(types::I32X4, zero);
    let jcl = g.b.ins().smin(jv, mlast);
    (jv, g.b.ins().smax(jcl, zero))
}

/// `1.0 / d`, the key under which a hoisted reciprocal is cached.
fn reciprocal(d: &Expr) -> Expr {
    Expr::bin(BinOp::Div, Expr::float(1.0), d.clone())
}

fn vb_tile(g: &mut Gen, vb: Value, j0: Value, ev: Value) -> Value {
    let off = g.b.ins().imul(j0, ev);
    g.ptr_off(vb, off)
}

/// Generated matmuls with the microkernels' contract (f32x4 FMA), for when the
/// microkernel is off: `mm_qk(a, lda, kt, s, rows, d, bk)`.
pub(crate) fn gen_qk(g: &mut Gen, p: &[Value]) {
    let [a, lda, kt, s, rows, d, bk] = p.try_into().expect("7 params");
    let zero = g.iconst(0);
    g.for_range(zero, rows, &mut |g, r| {
        let arow = g.b.ins().imul(r, lda);
        let nc = g.b.ins().sshr_imm_u(bk, 3);
        let z = g.iconst(0);
        g.for_range(z, nc, &mut |g, cb| {
            let c = g.b.ins().ishl_imm_u(cb, 3);
            let zf = g.fconst(0.0);
            let zv = g.b.ins().splat(types::F32X4, zf);
            let acc0 = g.b.declare_var(types::F32X4);
            let acc1 = g.b.declare_var(types::F32X4);
            g.b.def_var(acc0, zv);
            g.b.def_var(acc1, zv);
            let z = g.iconst(0);
            g.for_range(z, d, &mut |g, x| {
                let ai = g.b.ins().iadd(arow, x);
                let av = g.load_f32(a, ai);
                let av = g.b.ins().splat(types::F32X4, av);
                let ko = g.b.ins().imul(x, bk);
                let ko = g.b.ins().iadd(ko, c);
                let kaddr = g.ptr_off(kt, ko);
                let k0 = g.b.ins().load(types::F32X4, flags(), kaddr, 0);
                let k1 = g.b.ins().load(types::F32X4, flags(), kaddr, 16);
                let a0 = g.b.use_var(acc0);
                let a1 = g.b.use_var(acc1);
                let a0 = g.b.ins().fma(av, k0, a0);
                let a1 = g.b.ins().fma(av, k1, a1);
                g.b.def_var(acc0, a0);
                g.b.def_var(acc1, a1);
            });
            let so = g.b.ins().imul(r, bk);
            let so = g.b.ins().iadd(so, c);
            let saddr = g.ptr_off(s, so);
            let a0 = g.b.use_var(acc0);
            let a1 = g.b.use_var(acc1);
            g.b.ins().store(flags(), a0, saddr, 0);
            g.b.ins().store(flags(), a1, saddr, 16);
        });
    });
    g.b.ins().return_(&[]);
}

/// `mm_pv(p, ldp, v, ldv, o, ldo, corr, rows, nk, dv)` in f32x4 (scalar channel tail).
pub(crate) fn gen_pv(g: &mut Gen, prm: &[Value]) {
    let [p, ldp, v, ldv, o, ldo, corr, rows, nk, dv] = prm.try_into().expect("10 params");
    let zero = g.iconst(0);
    g.for_range(zero, rows, &mut |g, r| {
        let has_corr = g.b.ins().icmp_imm_s(IntCC::NotEqual, corr, 0);
        let r4 = g.b.ins().ishl_imm_u(r, 2);
        let caddr = g.b.ins().iadd(corr, r4);
        let one = g.fconst(1.0);
        // Read corr[r] only when corr is not null (branch, not select: null is unmapped).
        let cvar = g.b.declare_var(types::F32);
        g.b.def_var(cvar, one);
        g.if_then(has_corr, &mut |g| {
            let c = g.b.ins().load(types::F32, flags(), caddr, 0);
            g.b.def_var(cvar, c);
        });
        let c = g.b.use_var(cvar);
        let cv = g.b.ins().splat(types::F32X4, c);
        let orow = g.b.ins().imul(r, ldo);
        let prow = g.b.ins().imul(r, ldp);
        let n4 = g.b.ins().sshr_imm_u(dv, 2);
        let z = g.iconst(0);
        g.for_range(z, n4, &mut |g, eb| {
            let e = g.b.ins().ishl_imm_u(eb, 2);
            let oo = g.b.ins().iadd(orow, e);
            let oaddr = g.ptr_off(o, oo);
            let acc = g.b.declare_var(types::F32X4);
            let x = g.b.ins().load(types::F32X4, flags(), oaddr, 0);
            let x = g.b.ins().fmul(x, cv);
            g.b.def_var(acc, x);
            let z = g.iconst(0);
            g.for_range(z, nk, &mut |g, c| {
                let pi = g.b.ins().iadd(prow, c);
                let pv = g.load_f32(p, pi);
                let pv = g.b.ins().splat(types::F32X4, pv);
                let vo = g.b.ins().imul(c, ldv);
                let vo = g.b.ins().iadd(vo, e);
                let vaddr = g.ptr_off(v, vo);
                let vv = g.b.ins().load(types::F32X4, flags(), vaddr, 0);
                let a = g.b.use_var(acc);
                let a = g.b.ins().fma(pv, vv, a);
                g.b.def_var(acc, a);
            });
            let a = g.b.use_var(acc);
            g.b.ins().store(flags(), a, oaddr, 0);
        });
        let e0 = g.b.ins().ishl_imm_u(n4, 2);
        g.for_range(e0, dv, &mut |g, e| {
            let oo = g.b.ins().iadd(orow, e);
            let x = g.load_f32(o, oo);
            let x = g.b.ins().fmul(x, c);
            let acc = g.b.declare_var(types::F32);
            g.b.def_var(acc, x);
            let z = g.iconst(0);
            g.for_range(z, nk, &mut |g, cc| {
                let pi = g.b.ins().iadd(prow, cc);
                let pv = g.load_f32(p, pi);
                let vo = g.b.ins().imul(cc, ldv);
                let vo = g.b.ins().iadd(vo, e);
                let vv = g.load_f32(v, vo);
                let a = g.b.use_var(acc);
                let a = g.b.ins().fma(pv, vv, a);
                g.b.def_var(acc, a);
            });
            let a = g.b.use_var(acc);
            g.store_f32(o, oo, a);
        });
    });
    g.b.ins().return_(&[]);
}
