//! Vector code: expressions over the 4 lanes of key vectors (f32x4 and i32x4), the
//! polynomial `exp`, lane-varying loads, and what a loop over key vectors hoists.

use super::super::gen::{costly, flags, ro_flags, ty_of, Gen};
use super::*;
use attnc_ir::{BinOp, Expr, Ty, UnOp};
use cranelift::codegen::ir::{Endianness, MemFlagsData};
use cranelift::prelude::*;

/// Lane-wise value of the vector code: a scalar shared by the 4 lanes, or a vector.
#[derive(Clone, Copy)]
pub(super) enum VV {
    U(Value),
    V(Value),
}

pub(super) fn little() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

/// `tanh`'s numerator coefficients (odd powers, from x^13 down to x^1, in x²).
pub(crate) const TANH_NUM: [f32; 7] = [-2.760_768_5e-16, 2.000_188e-13, -8.604_672e-11, 5.122_297e-8, 1.485_722_4e-5, 6.372_619_3e-4, 4.893_524_6e-3];
/// Where `tanh`'s rational form is clamped (±1 in f32 beyond).
pub(crate) const TANH_CLAMP: f32 = 7.905_311;
/// `tanh`'s denominator coefficients (even powers, from x^6 down to x^0, in x²).
pub(crate) const TANH_DEN: [f32; 4] = [1.198_258_4e-6, 1.185_347_1e-4, 2.268_434_6e-3, 4.893_525e-3];

impl Gen<'_, '_> {
    pub(super) fn varying(&self, e: &Expr, vecs: &[String]) -> bool {
        attnc_ir::analysis::varies(e, vecs)
    }

    /// The lane numbers `[0, 1, 2, 3]` as i32x4.
    pub(crate) fn iota4(&mut self) -> Value {
        let c = self.b.func.dfg.constants.insert(cranelift::codegen::ir::ConstantData::from([0u8, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0].as_ref()));
        self.b.ins().vconst(types::I32X4, c)
    }

    /// The float constant `v` on 4 lanes.
    pub(crate) fn fconst4(&mut self, v: f32) -> Value {
        let s = self.fconst(v);
        self.b.ins().splat(types::F32X4, s)
    }

    /// A uniform value as a vector of 4 lanes (ints as i32, conditions as lane masks).
    pub(super) fn splat(&mut self, v: Value) -> Value {
        if let Some(&(_, s)) = self.splats.iter().rev().find(|(x, _)| *x == v) {
            return s;
        }
        self.splat_now(v)
    }

    /// [`Self::splat`] generated here.
    fn splat_now(&mut self, v: Value) -> Value {
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

    pub(super) fn vec(&mut self, v: VV) -> Value {
        match v {
            VV::U(x) => self.splat(x),
            VV::V(x) => x,
        }
    }

    /// Evaluates `e` for each lane with scalar code (the fallback for anything without a
    /// vector form: gathers, integer division, reductions, libm calls).
    pub(super) fn lanewise(&mut self, e: &Expr) -> Value {
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
        // Clamp with compare-and-select (NaN is restored at the end, so the clamps need not
        // propagate it).
        let hi = self.fconst4(88.376_26);
        let lo = self.fconst4(-87.336_54);
        let too_hi = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let xc = self.fselect(too_hi, hi, x);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let xc = self.fselect(under, lo, xc);
        // n = round(x·log2 e) with the 1.5·2^23 trick: adding it leaves n in the low
        // mantissa bits, so 2^n is those bits shifted into the exponent.
        let log2e = self.fconst4(std::f32::consts::LOG2_E);
        let magic = self.fconst4(12_582_912.0);
        let t = self.b.ins().fma(xc, log2e, magic);
        let n = self.b.ins().fsub(t, magic);
        let ln2_hi = self.fconst4(0.693_359_4);
        let ln2_lo = self.fconst4(-2.121_944_4e-4);
        let r = self.b.ins().fmul(n, ln2_hi);
        let r = self.b.ins().fsub(xc, r);
        let r2 = self.b.ins().fmul(n, ln2_lo);
        let r = self.b.ins().fsub(r, r2);
        let coeffs = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
        let mut p = self.fconst4(coeffs[0]);
        for k in &coeffs[1..] {
            let kv = self.fconst4(*k);
            p = self.b.ins().fma(p, r, kv);
        }
        let rr = self.b.ins().fmul(r, r);
        p = self.b.ins().fma(p, rr, r);
        let one = self.fconst4(1.0);
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
        let zero = self.fconst4(0.0);
        let y = self.fselect(under, zero, y);
        let inf = self.fconst4(f32::INFINITY);
        let over_lim = self.fconst4(88.722_84);
        let over = self.b.ins().fcmp(FloatCC::GreaterThan, x, over_lim);
        let y = self.fselect(over, inf, y);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        self.fselect(nan, x, y)
    }

    /// `2^x` on 4 lanes for `x <= 0` (softmax weights `exp2(s - max)`): no overflow is
    /// possible, and below 2^-126 it is 0 (no subnormal weights: see the microkernels'
    /// `exp2_nonpos`); NaN stays NaN.
    /// Round-to-nearest by the 1.5·2^23 trick, a degree-5 minimax polynomial for 2^f on
    /// [-1/2, 1/2] (relative error < 3e-7), and the exponent built in the bits.
    pub(crate) fn vexp2_nonpos(&mut self, x: Value) -> Value {
        let lo = self.fconst4(-126.0);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let x = self.fselect(under, lo, x);
        let magic = self.fconst4(12_582_912.0);
        let t = self.b.ins().fadd(x, magic);
        let n = self.b.ins().fsub(t, magic);
        let f = self.b.ins().fsub(x, n);
        let coeffs = EXP2_POLY;
        let mut p = self.fconst4(coeffs[0]);
        for k in &coeffs[1..] {
            let kv = self.fconst4(*k);
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
        let y = self.b.ins().fmul(p, scale);
        let zero = self.fconst4(0.0);
        self.fselect(under, zero, y)
    }

    /// `2^x` of a scalar `x <= 0` by [`Self::vexp2_nonpos`] on one lane (a softmax's rescale
    /// factor, once per row and key tile: no libm call).
    pub(crate) fn exp2_nonpos(&mut self, x: Value) -> Value {
        let v = self.b.ins().splat(types::F32X4, x);
        let y = self.vexp2_nonpos(v);
        self.b.ins().extractlane(y, 0)
    }

    /// Lane select on floats by an i32x4 mask.
    pub(crate) fn fselect(&mut self, mask: Value, a: Value, b: Value) -> Value {
        let m = if self.b.func.dfg.value_type(mask) == types::F32X4 { mask } else { self.b.ins().bitcast(types::F32X4, little(), mask) };
        self.b.ins().bitselect(m, a, b)
    }

    /// `tanh` on 4 lanes: the odd/even rational minimax approximation `x·P(x²)/Q(x²)` on
    /// `|x| ≤ 7.9053` (Eigen's fast tanh; relative error ≤ 2.6e-7 in exact arithmetic, a few
    /// ulp in f32), the clamp giving ±1 beyond. 13 operations and one division, no `exp`;
    /// relative accuracy holds near 0 too, where `1 − 2/(e^{2x} + 1)` cancels. NaN stays NaN
    /// (the clamps compare false and the arithmetic carries it).
    pub(crate) fn vtanh(&mut self, x: Value) -> Value {
        let hi = self.fconst4(TANH_CLAMP);
        let lo = self.fconst4(-TANH_CLAMP);
        let over = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let xc = self.fselect(over, hi, x);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let xc = self.fselect(under, lo, xc);
        let x2 = self.b.ins().fmul(xc, xc);
        let poly = |g: &mut Self, coeffs: &[f32]| {
            let mut p = g.fconst4(coeffs[0]);
            for k in &coeffs[1..] {
                let kv = g.fconst4(*k);
                p = g.b.ins().fma(x2, p, kv);
            }
            p
        };
        let p = poly(self, &TANH_NUM);
        let p = self.b.ins().fmul(xc, p);
        let q = poly(self, &TANH_DEN);
        self.b.ins().fdiv(p, q)
    }

    /// `ln` on 4 lanes (Cephes `logf`, ~1 ulp): `x = m · 2^k` with `m ∈ [√½, √2)` from the
    /// bits (subnormals scaled by 2^23 first), `ln m = f − f²/2 + f³·P(f)` for `f = m − 1`,
    /// plus `k · ln 2` in two parts, so `ln(2^k)` is `k · ln 2` rounded once (T5's buckets
    /// compare such values with integers). `ln 0 = −inf`, `ln(x < 0) = NaN`, `ln inf = inf`,
    /// NaN stays NaN.
    pub(crate) fn vlog(&mut self, x: Value) -> Value {
        let tiny = self.fconst4(f32::MIN_POSITIVE);
        let sub = self.b.ins().fcmp(FloatCC::LessThan, x, tiny);
        let two23 = self.fconst4(8_388_608.0);
        let scaled = self.b.ins().fmul(x, two23);
        let xs = self.fselect(sub, scaled, x);
        let bits = self.b.ins().bitcast(types::I32X4, little(), xs);
        let exp = self.b.ins().ushr_imm_u(bits, 23);
        let bias = self.b.ins().iconst(types::I32, 127);
        let bias = self.b.ins().splat(types::I32X4, bias);
        let k = self.b.ins().isub(exp, bias);
        let mask = self.b.ins().iconst(types::I32, 0x007f_ffff);
        let mask = self.b.ins().splat(types::I32X4, mask);
        let one_bits = self.b.ins().iconst(types::I32, 0x3f80_0000);
        let one_bits = self.b.ins().splat(types::I32X4, one_bits);
        let mb = self.b.ins().band(bits, mask);
        let mb = self.b.ins().bor(mb, one_bits);
        let m = self.b.ins().bitcast(types::F32X4, little(), mb);
        // m ∈ [1, 2): above √2, halve it and count one more power of two.
        let sqrt2 = self.fconst4(std::f32::consts::SQRT_2);
        let big = self.b.ins().fcmp(FloatCC::GreaterThan, m, sqrt2);
        let half = self.fconst4(0.5);
        let mh = self.b.ins().fmul(m, half);
        let m = self.fselect(big, mh, m);
        let k = self.b.ins().isub(k, big); // a lane mask: −1 where set
        let z23 = self.b.ins().iconst(types::I32, 23);
        let z23 = self.b.ins().splat(types::I32X4, z23);
        let zero_i = self.b.ins().iconst(types::I32, 0);
        let zero_i = self.b.ins().splat(types::I32X4, zero_i);
        let adj = self.b.ins().bitselect(sub, z23, zero_i);
        let k = self.b.ins().isub(k, adj);
        let kf = self.b.ins().fcvt_from_sint(types::F32X4, k);
        let one = self.fconst4(1.0);
        let f = self.b.ins().fsub(m, one);
        let z = self.b.ins().fmul(f, f);
        let coeffs =
            [7.037_683_6e-2, -1.151_461e-1, 1.167_699_9e-1, -1.242_014_1e-1, 1.424_932_3e-1, -1.666_805_8e-1, 2.000_071_4e-1, -2.499_999_4e-1, 3.333_333e-1];
        let mut p = self.fconst4(coeffs[0]);
        for c in &coeffs[1..] {
            let cv = self.fconst4(*c);
            p = self.b.ins().fma(p, f, cv);
        }
        let fz = self.b.ins().fmul(f, z);
        let y = self.b.ins().fmul(p, fz);
        let ln2_lo = self.fconst4(-2.121_944_4e-4);
        let y = self.b.ins().fma(kf, ln2_lo, y);
        let mhalf = self.fconst4(-0.5);
        let y = self.b.ins().fma(z, mhalf, y);
        let r = self.b.ins().fadd(f, y);
        let ln2_hi = self.fconst4(0.693_359_4);
        let r = self.b.ins().fma(kf, ln2_hi, r);
        // The special values: 0 → −inf, negative → NaN, +inf → +inf, NaN → NaN.
        let zero = self.fconst4(0.0);
        let is0 = self.b.ins().fcmp(FloatCC::Equal, x, zero);
        let ninf = self.fconst4(f32::NEG_INFINITY);
        let r = self.fselect(is0, ninf, r);
        let neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let nan = self.fconst4(f32::NAN);
        let r = self.fselect(neg, nan, r);
        let inf = self.fconst4(f32::INFINITY);
        let isinf = self.b.ins().fcmp(FloatCC::Equal, x, inf);
        let r = self.fselect(isinf, inf, r);
        let unord = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        self.fselect(unord, x, r)
    }

    pub(super) fn vsigmoid(&mut self, x: Value) -> Value {
        let nx = self.b.ins().fneg(x);
        let e = self.vexp(nx);
        let one = self.fconst(1.0);
        let one = self.b.ins().splat(types::F32X4, one);
        let d = self.b.ins().fadd(one, e);
        self.b.ins().fdiv(one, d)
    }

    /// Vector code for `e` over the 4 lanes of the vector variables in scope.
    pub(super) fn vexpr(&mut self, e: &Expr, vecs: &[String]) -> VV {
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
    pub(super) fn vexpr_new(&mut self, e: &Expr, vecs: &[String]) -> VV {
        match e {
            Expr::Var(v) => VV::V(self.env.iter().rev().find(|(n, _)| n == v).expect("bound").1),
            Expr::Unary(op, a) => {
                let x = self.vexpr(a, vecs);
                let x = self.vec(x);
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
                    UnOp::Tanh => self.vtanh(x),
                    UnOp::Relu | UnOp::Elu => {
                        let zero = self.fconst4(0.0);
                        let pos = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                        let keep = self.b.ins().bor(pos, nan);
                        let other = if *op == UnOp::Relu {
                            zero
                        } else {
                            // expm1: `exp(x) − 1` cancels near 0 (6e-4 relative at
                            // x = −1e-4), so |x| < 1/2 takes the Taylor series to x⁷
                            // (truncation below 1e-7 relative there).
                            let ex = self.vexp(x);
                            let one = self.fconst4(1.0);
                            let far = self.b.ins().fsub(ex, one);
                            let mut p = self.fconst4(1.0 / 5040.0);
                            for k in [720.0f32, 120.0, 24.0, 6.0, 2.0, 1.0] {
                                let c = self.fconst4(1.0 / k);
                                p = self.b.ins().fma(p, x, c);
                            }
                            let near = self.b.ins().fmul(p, x);
                            let ax = self.b.ins().fabs(x);
                            let half = self.fconst4(0.5);
                            let small = self.b.ins().fcmp(FloatCC::LessThan, ax, half);
                            self.fselect(small, near, far)
                        };
                        self.fselect(keep, x, other)
                    }
                    UnOp::Floor => self.b.ins().floor(x),
                    UnOp::Ceil => self.b.ins().ceil(x),
                    UnOp::Round => self.b.ins().nearest(x),
                    UnOp::ToInt => {
                        let (lo, hi) = (self.fconst4(-attnc_ir::reference::INT_LIMIT as f32), self.fconst4(attnc_ir::reference::INT_LIMIT as f32));
                        let x = self.b.ins().fmax(x, lo);
                        let x = self.b.ins().fmin(x, hi);
                        self.b.ins().fcvt_to_sint_sat(types::I32X4, x)
                    }
                    UnOp::Log => self.vlog(x),
                    UnOp::Cos | UnOp::Sin => return VV::V(self.lanewise(e)),
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
    pub(super) fn vload(&mut self, t: &str, idx: &[Expr], vecs: &[String]) -> Value {
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
    pub(super) fn uniform_offset(&mut self, t: &str, idx: &[Expr], vecs: &[String]) -> Value {
        let key = offset_key(t, idx);
        if let Some((_, v)) = self.cache.iter().rev().find(|(x, _)| *x == key) {
            return *v;
        }
        let tv = self.tens[t].clone();
        let uniform: Vec<(usize, &Expr)> = idx.iter().enumerate().filter(|(_, x)| !self.varying(x, vecs)).collect();
        self.clamped_offset(&tv, uniform)
    }

    /// Floor division or modulo by a constant `d` in `2..2^20` on 4 lanes (GPSA's `j // 14`):
    /// the quotient estimated in f32 as `floor(x · (1/d))`, which is off by at most one while
    /// `|x| < 2^23` (relative error below 2^-23 on a quotient below 2^22), then corrected
    /// once each way through the remainder. Lanes outside that range take the scalar path.
    pub(super) fn vdiv_const(&mut self, op: BinOp, a: &Expr, d: i64, vecs: &[String], e: &Expr) -> Value {
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
    pub(super) fn vshort_circuit(&mut self, op: BinOp, a: &Expr, b: &Expr, vecs: &[String]) -> Value {
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
    pub(super) fn vpow(&mut self, a: &Expr, b: &Expr, vecs: &[String], e: &Expr) -> Value {
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
            self.keep_hoisted(key, v);
        }
        // The constants and uniform variables the lanes read (`W` in `p − j < W`, `i`).
        for leaf in uniform_leaves(exprs, vecs) {
            if !self.cache.iter().any(|(x, _)| x == leaf) {
                let v = self.expr(leaf);
                self.keep_hoisted(leaf.clone(), v);
            }
        }
        self.cache.len() - before
    }

    /// Caches a hoisted value with its 4-lane form (`splats`).
    fn keep_hoisted(&mut self, key: Expr, v: Value) {
        let lanes = self.splat_now(v);
        self.cache.push((key, v));
        self.splats.push((v, lanes));
    }

    pub(crate) fn unhoist(&mut self, n: usize) {
        let len = self.cache.len();
        self.cache.truncate(len - n);
        self.splats.truncate(len - n);
    }

    pub(crate) fn vexpr_f(&mut self, e: &Expr, vecs: &[String]) -> Value {
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
}

/// The leaves of `exprs` (constants, dims, variables) that do not vary with `vecs` but are
/// operands of an expression that does: vector code splats each of them.
fn uniform_leaves<'e>(exprs: &[&'e Expr], vecs: &[String]) -> Vec<&'e Expr> {
    fn go<'e>(e: &'e Expr, vecs: &[String], out: &mut Vec<&'e Expr>) {
        if !attnc_ir::analysis::varies(e, vecs) {
            let leaf = matches!(e, Expr::Int(_) | Expr::Float(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Dim(_));
            if leaf && !out.contains(&e) {
                out.push(e);
            }
            return;
        }
        match e {
            Expr::Reduce { lo, hi, .. } => {
                go(lo, vecs, out);
                go(hi, vecs, out);
            }
            _ => e.children().into_iter().for_each(|c| go(c, vecs, out)),
        }
    }
    let mut out = Vec::new();
    for e in exprs {
        go(e, vecs, &mut out);
    }
    out
}

/// The cache key of a load's hoisted uniform offset (`#` cannot occur in a tensor name).
pub(super) fn offset_key(t: &str, idx: &[Expr]) -> Expr {
    Expr::Load(format!("{t}#offset"), idx.to_vec())
}

/// Whether `e` is the key index `j` (whose lanes are consecutive) plus or minus terms that
/// are the same for every lane.
pub(super) fn is_key_plus_uniform(e: &Expr, vecs: &[String]) -> bool {
    let uniform = |x: &Expr| !vecs.iter().any(|v| x.free_vars().contains(v));
    match e {
        Expr::Var(v) => v == "j",
        Expr::Binary(BinOp::Add, a, b) => (is_key_plus_uniform(a, vecs) && uniform(b)) || (uniform(a) && is_key_plus_uniform(b, vecs)),
        Expr::Binary(BinOp::Sub, a, b) => is_key_plus_uniform(a, vecs) && uniform(b),
        _ => false,
    }
}

/// `1.0 / d`, the key under which a hoisted reciprocal is cached.
pub(super) fn reciprocal(d: &Expr) -> Expr {
    Expr::bin(BinOp::Div, Expr::float(1.0), d.clone())
}
