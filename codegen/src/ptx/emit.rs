//! The PTX writer: typed virtual registers (declared per function, `.reg .f32 %f3;`),
//! labels, and the lowering of kernel expressions to PTX instructions.
//!
//! Every function is an `.entry` with three parameters, the global addresses of the
//! argument table (`i32` slots of [`ArgLayout`], +inf's bits in the last), the inputs and the
//! work buffer (derived tensors and the output); tensor bases in the table count elements
//! (halves for f16 and bf16 inputs, 2 bytes each; 4 bytes for everything else). Integer
//! arithmetic is 32-bit, as WGSL's (the runtime refuses shapes whose sizes or offsets do not
//! fit); indices are clamped into their axes, as on the CPU and WGSL.
//!
//! Floats follow the reference's NaN rules explicitly: `max.NaN`/`min.NaN` propagate NaN,
//! `!=` is the unordered `neu`, `relu` and `elu` keep NaN; `exp` and `log` are `ex2.approx`
//! and `lg2.approx` with the argument scaled (relative error near 2^-22), `tanh`, `sigmoid`
//! and `silu` are written from `exp` (`tanh.approx` is only good to 2^-11), `cos` and `sin`
//! reduce their argument to [-π, π] first (where `cos.approx` and `sin.approx` are accurate).

use crate::host::ArgLayout;
use crate::CodegenError;
use attnc_ir::{BinOp, DType, Expr, Kernel, RedOp, TensorDef, TensorKind, Ty, UnOp};
use std::fmt::Write as _;

/// A register's PTX type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegTy {
    S32,
    F32,
    U64,
    Pred,
    U16,
    /// Untyped 32 bits: packed halves, `ldmatrix` and `mma` fragments.
    B32,
}

impl RegTy {
    fn decl(self) -> &'static str {
        match self {
            RegTy::S32 => ".s32",
            RegTy::F32 => ".f32",
            RegTy::U64 => ".u64",
            RegTy::Pred => ".pred",
            RegTy::U16 => ".b16",
            RegTy::B32 => ".b32",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            RegTy::S32 => "%r",
            RegTy::F32 => "%f",
            RegTy::U64 => "%rd",
            RegTy::Pred => "%p",
            RegTy::U16 => "%h",
            RegTy::B32 => "%x",
        }
    }
    fn of(t: Ty) -> RegTy {
        match t {
            Ty::Int => RegTy::S32,
            Ty::Float => RegTy::F32,
            Ty::Bool => RegTy::Pred,
        }
    }
}

/// `log2(e)` and `ln(2)`, as f32 literals.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

/// A PTX float literal (exact bits: infinities and NaN included).
pub fn flit(x: f32) -> String {
    format!("0f{:08X}", x.to_bits())
}

/// One `.entry` function being written.
pub struct Func<'k> {
    pub k: &'k Kernel,
    layout: &'k ArgLayout,
    name: String,
    regs: Vec<RegTy>,
    counts: [usize; 6],
    labels: usize,
    /// The parameter loads, then the table slots and last indices read once (so they
    /// dominate every use), then the body.
    head: String,
    /// `.shared` declarations.
    shared: String,
    slot_lines: String,
    body: String,
    /// IR variable → register, innermost last.
    env: Vec<(String, String)>,
    /// The three buffer addresses (global space).
    pub args: String,
    pub inp: String,
    pub buf: String,
    /// Dims and table slots already read, by slot.
    slots: std::collections::BTreeMap<usize, String>,
    /// `extent − 1` registers, by slot.
    tops: std::collections::BTreeMap<usize, String>,
}

impl<'k> Func<'k> {
    pub fn new(k: &'k Kernel, layout: &'k ArgLayout, name: &str) -> Func<'k> {
        let mut f = Func {
            k,
            layout,
            name: name.to_string(),
            regs: Vec::new(),
            counts: [0; 6],
            labels: 0,
            head: String::new(),
            shared: String::new(),
            slot_lines: String::new(),
            body: String::new(),
            env: Vec::new(),
            args: String::new(),
            inp: String::new(),
            buf: String::new(),
            slots: Default::default(),
            tops: Default::default(),
        };
        for (n, p) in ["args", "inp", "buf"].iter().enumerate() {
            let raw = f.reg(RegTy::U64);
            let g = f.reg(RegTy::U64);
            let _ = writeln!(f.head, "\tld.param.u64 {raw}, [p_{p}];\n\tcvta.to.global.u64 {g}, {raw};");
            match n {
                0 => f.args = g,
                1 => f.inp = g,
                _ => f.buf = g,
            }
        }
        f
    }

    /// A fresh register of type `t`.
    pub fn reg(&mut self, t: RegTy) -> String {
        let i = t as usize;
        self.counts[i] += 1;
        self.regs.push(t);
        format!("{}{}", t.prefix(), self.counts[i])
    }

    pub fn ins(&mut self, s: &str) {
        let _ = writeln!(self.body, "\t{s}");
    }

    pub fn label(&mut self) -> String {
        self.labels += 1;
        format!("$L{}", self.labels)
    }

    pub fn place(&mut self, l: &str) {
        let _ = writeln!(self.body, "{l}:");
    }

    /// Declares a `.shared` array of `bytes` bytes aligned to 16, and returns a register
    /// holding its address in the shared window.
    pub fn shared_array(&mut self, name: &str, bytes: usize) -> String {
        let _ = writeln!(self.shared, "\t.shared .align 16 .b8 {name}[{bytes}];");
        let r = self.reg(RegTy::S32);
        let _ = writeln!(self.head, "\tmov.u32 {r}, {name};");
        r
    }

    pub fn bind(&mut self, var: &str, reg: &str) {
        self.env.push((var.to_string(), reg.to_string()));
    }

    pub fn unbind(&mut self, n: usize) {
        self.env.truncate(self.env.len() - n);
    }

    /// A register holding the constant `n`.
    pub fn int(&mut self, n: i64) -> Result<String, CodegenError> {
        let n = i32::try_from(n).map_err(|_| CodegenError::Emit(format!("the integer {n} does not fit PTX's 32-bit integers")))?;
        let r = self.reg(RegTy::S32);
        self.ins(&format!("mov.s32 {r}, {n};"));
        Ok(r)
    }

    /// A predicate register holding `b`.
    pub fn pred(&mut self, b: bool) -> String {
        let z = self.reg(RegTy::S32);
        self.ins(&format!("mov.s32 {z}, 0;"));
        let r = self.reg(RegTy::Pred);
        self.ins(&format!("setp.{}.s32 {r}, {z}, 0;", if b { "eq" } else { "ne" }));
        r
    }

    pub fn float(&mut self, x: f32) -> String {
        let r = self.reg(RegTy::F32);
        self.ins(&format!("mov.f32 {r}, {};", flit(x)));
        r
    }

    /// Table slot `n`, read once per function at its start (before the body, so the load
    /// dominates every use).
    pub fn slot(&mut self, n: usize) -> String {
        if let Some(r) = self.slots.get(&n) {
            return r.clone();
        }
        let r = self.reg(RegTy::S32);
        let _ = writeln!(self.slot_lines, "\tld.global.s32 {r}, [{}+{}];", self.args, 4 * n);
        self.slots.insert(n, r.clone());
        r
    }

    /// `extent − 1` of table slot `n` (an axis's last index), computed once at the start,
    /// after the slot's load.
    fn last_index(&mut self, n: usize) -> String {
        if let Some(r) = self.tops.get(&n) {
            return r.clone();
        }
        let ext = self.slot(n);
        let r = self.reg(RegTy::S32);
        let _ = writeln!(self.slot_lines, "\tadd.s32 {r}, {ext}, -1;");
        self.tops.insert(n, r.clone());
        r
    }

    pub fn dim(&mut self, d: &str) -> String {
        let n = self.layout.dims[d];
        self.slot(n)
    }

    /// `if (p) { f }` (with `negate`: `if (!p)`).
    pub fn if_(&mut self, p: &str, negate: bool, f: &mut dyn FnMut(&mut Self) -> Result<(), CodegenError>) -> Result<(), CodegenError> {
        let end = self.label();
        let bang = if negate { "" } else { "!" };
        self.ins(&format!("@{bang}{p} bra {end};"));
        f(self)?;
        self.place(&end);
        Ok(())
    }

    /// `for (v = lo; v < hi; v++) { f(v) }`.
    pub fn for_range(&mut self, lo: &str, hi: &str, f: &mut dyn FnMut(&mut Self, &str) -> Result<(), CodegenError>) -> Result<(), CodegenError> {
        self.for_step(lo, hi, "1", f)
    }

    /// `for (v = lo; v < hi; v += step) { f(v) }` (`step` a register or a literal).
    pub fn for_step(&mut self, lo: &str, hi: &str, step: &str, f: &mut dyn FnMut(&mut Self, &str) -> Result<(), CodegenError>) -> Result<(), CodegenError> {
        let v = self.reg(RegTy::S32);
        self.ins(&format!("mov.s32 {v}, {lo};"));
        let (top, end) = (self.label(), self.label());
        let p = self.reg(RegTy::Pred);
        self.place(&top);
        self.ins(&format!("setp.ge.s32 {p}, {v}, {hi};"));
        self.ins(&format!("@{p} bra {end};"));
        f(self, &v)?;
        self.ins(&format!("add.s32 {v}, {v}, {step};"));
        self.ins(&format!("bra.uni {top};"));
        self.place(&end);
        Ok(())
    }

    /// The global address of element `off` of tensor `t` (its base added).
    pub fn address(&mut self, t: &str, off: &str) -> String {
        let decl = self.k.tensor(t).expect("verified: a declared tensor");
        let half = crate::host::half_width(decl);
        let heap = if decl.kind == TensorKind::Input { self.inp.clone() } else { self.buf.clone() };
        let wide = self.reg(RegTy::U64);
        self.ins(&format!("mul.wide.s32 {wide}, {off}, {};", if half { 2 } else { 4 }));
        let a = self.reg(RegTy::U64);
        self.ins(&format!("add.s64 {a}, {heap}, {wide};"));
        a
    }

    /// The element offset (base included) of `t[idx]`, each index clamped into its axis.
    pub fn offset(&mut self, t: &str, idx: &[String]) -> String {
        let slots = self.layout.tensors[t].clone();
        let mut off = self.slot(slots.base);
        for (a, x) in idx.iter().enumerate() {
            let top = self.last_index(slots.ext[a]);
            let stride = self.slot(slots.stride[a]);
            let c = self.reg(RegTy::S32);
            self.ins(&format!("max.s32 {c}, {x}, 0;"));
            self.ins(&format!("min.s32 {c}, {c}, {top};"));
            let o = self.reg(RegTy::S32);
            self.ins(&format!("mad.lo.s32 {o}, {c}, {stride}, {off};"));
            off = o;
        }
        off
    }

    /// Loads `t[idx]` as its value type (f32 for floats, s32 for ints).
    pub fn load(&mut self, t: &str, idx: &[String]) -> String {
        let decl = self.k.tensor(t).expect("verified: a declared tensor").clone();
        let off = self.offset(t, idx);
        let a = self.address(t, &off);
        match decl.dtype {
            d if d.is_int() => {
                let r = self.reg(RegTy::S32);
                self.ins(&format!("ld.global.s32 {r}, [{a}];"));
                r
            }
            DType::F16 if decl.kind == TensorKind::Input => {
                let h = self.reg(RegTy::S32);
                self.ins(&format!("ld.global.u16 {h}, [{a}];"));
                // The half's bits in a 16-bit register, converted exactly.
                let hh = self.reg(RegTy::U16);
                self.ins(&format!("cvt.u16.u32 {hh}, {h};"));
                let r = self.reg(RegTy::F32);
                self.ins(&format!("cvt.f32.f16 {r}, {hh};"));
                r
            }
            DType::BF16 if decl.kind == TensorKind::Input => {
                let h = self.reg(RegTy::S32);
                self.ins(&format!("ld.global.u16 {h}, [{a}];"));
                self.ins(&format!("shl.b32 {h}, {h}, 16;"));
                let r = self.reg(RegTy::F32);
                self.ins(&format!("mov.b32 {r}, {h};"));
                r
            }
            _ => {
                let r = self.reg(RegTy::F32);
                self.ins(&format!("ld.global.f32 {r}, [{a}];"));
                r
            }
        }
    }

    /// Stores float `v` at element `off` of tensor `t` (derived or output: 4 bytes).
    pub fn store(&mut self, t: &str, off: &str, v: &str) {
        let a = self.address(t, off);
        self.ins(&format!("st.global.f32 [{a}], {v};"));
    }

    pub fn var(&self, v: &str) -> Result<String, CodegenError> {
        self.env.iter().rev().find(|(n, _)| n == v).map(|(_, r)| r.clone()).ok_or_else(|| CodegenError::Emit(format!("variable `{v}` is not bound")))
    }

    /// `exp(x)` = `2^(x·log2 e)`.
    pub fn exp(&mut self, x: &str) -> String {
        let t = self.reg(RegTy::F32);
        self.ins(&format!("mul.rn.f32 {t}, {x}, {};", flit(LOG2E)));
        let r = self.reg(RegTy::F32);
        self.ins(&format!("ex2.approx.f32 {r}, {t};"));
        r
    }

    fn is_nan(&mut self, x: &str) -> String {
        let p = self.reg(RegTy::Pred);
        self.ins(&format!("setp.nan.f32 {p}, {x}, {x};"));
        p
    }

    fn selp_f(&mut self, a: &str, b: &str, p: &str) -> String {
        let r = self.reg(RegTy::F32);
        self.ins(&format!("selp.f32 {r}, {a}, {b}, {p};"));
        r
    }

    fn unary(&mut self, op: UnOp, ty: Ty, x: &str) -> String {
        let f = |s: &mut Self, ins: &str| {
            let r = s.reg(RegTy::F32);
            s.ins(&format!("{ins} {r}, {x};"));
            r
        };
        match op {
            UnOp::Neg if ty == Ty::Int => {
                let r = self.reg(RegTy::S32);
                self.ins(&format!("neg.s32 {r}, {x};"));
                r
            }
            UnOp::Abs if ty == Ty::Int => {
                let r = self.reg(RegTy::S32);
                self.ins(&format!("abs.s32 {r}, {x};"));
                r
            }
            UnOp::Not => {
                let r = self.reg(RegTy::Pred);
                self.ins(&format!("not.pred {r}, {x};"));
                r
            }
            UnOp::Neg => f(self, "neg.f32"),
            UnOp::Abs => f(self, "abs.f32"),
            UnOp::Sqrt => f(self, "sqrt.rn.f32"),
            UnOp::Floor => f(self, "cvt.rmi.f32.f32"),
            UnOp::Ceil => f(self, "cvt.rpi.f32.f32"),
            UnOp::Round => f(self, "cvt.rni.f32.f32"),
            UnOp::ToFloat => {
                let r = self.reg(RegTy::F32);
                self.ins(&format!("cvt.rn.f32.s32 {r}, {x};"));
                r
            }
            UnOp::ToInt => {
                let lim = attnc_ir::reference::INT_LIMIT as f32;
                let c = self.reg(RegTy::F32);
                self.ins(&format!("max.f32 {c}, {x}, {};", flit(-lim)));
                self.ins(&format!("min.f32 {c}, {c}, {};", flit(lim)));
                let r = self.reg(RegTy::S32);
                self.ins(&format!("cvt.rzi.s32.f32 {r}, {c};"));
                r
            }
            UnOp::Exp => self.exp(x),
            UnOp::Log => {
                let t = f(self, "lg2.approx.f32");
                let r = self.reg(RegTy::F32);
                self.ins(&format!("mul.rn.f32 {r}, {t}, {};", flit(LN2)));
                r
            }
            UnOp::Sigmoid | UnOp::Silu => {
                let n = f(self, "neg.f32");
                let e = self.exp(&n);
                let d = self.reg(RegTy::F32);
                self.ins(&format!("add.rn.f32 {d}, {e}, {};", flit(1.0)));
                let r = self.reg(RegTy::F32);
                let num = if op == UnOp::Sigmoid { flit(1.0) } else { x.to_string() };
                self.ins(&format!("div.rn.f32 {r}, {num}, {d};"));
                r
            }
            UnOp::Tanh => {
                // sign(x)·(1 − e)/(1 + e), e = exp(−2·min(|x|, 20)); a series below 0.125
                // (where 1 − e would cancel); NaN passes through.
                let a = f(self, "abs.f32");
                let m = self.reg(RegTy::F32);
                self.ins(&format!("min.f32 {m}, {a}, {};", flit(20.0)));
                let t = self.reg(RegTy::F32);
                self.ins(&format!("mul.rn.f32 {t}, {m}, {};", flit(-2.0)));
                let e = self.exp(&t);
                let (num, den) = (self.reg(RegTy::F32), self.reg(RegTy::F32));
                self.ins(&format!("sub.rn.f32 {num}, {}, {e};", flit(1.0)));
                self.ins(&format!("add.rn.f32 {den}, {}, {e};", flit(1.0)));
                let big = self.reg(RegTy::F32);
                self.ins(&format!("div.rn.f32 {big}, {num}, {den};"));
                let x2 = self.reg(RegTy::F32);
                self.ins(&format!("mul.rn.f32 {x2}, {x}, {x};"));
                let s = self.reg(RegTy::F32);
                self.ins(&format!("fma.rn.f32 {s}, {x2}, {}, {};", flit(-0.053968254), flit(0.13333333)));
                self.ins(&format!("fma.rn.f32 {s}, {x2}, {s}, {};", flit(-0.33333333)));
                self.ins(&format!("fma.rn.f32 {s}, {x2}, {s}, {};", flit(1.0)));
                self.ins(&format!("mul.rn.f32 {s}, {s}, {a};"));
                let small = self.reg(RegTy::Pred);
                self.ins(&format!("setp.lt.f32 {small}, {a}, {};", flit(0.125)));
                let mag = self.selp_f(&s, &big, &small);
                let neg = self.reg(RegTy::Pred);
                self.ins(&format!("setp.lt.f32 {neg}, {x}, {};", flit(0.0)));
                let nm = self.reg(RegTy::F32);
                self.ins(&format!("neg.f32 {nm}, {mag};"));
                let r = self.selp_f(&nm, &mag, &neg);
                let nan = self.is_nan(x);
                self.selp_f(x, &r, &nan)
            }
            UnOp::Relu | UnOp::Elu => {
                let keep = self.reg(RegTy::Pred);
                self.ins(&format!("setp.gtu.f32 {keep}, {x}, {};", flit(0.0)));
                let other = if op == UnOp::Relu {
                    self.float(0.0)
                } else {
                    let e = self.exp(x);
                    let r = self.reg(RegTy::F32);
                    self.ins(&format!("sub.rn.f32 {r}, {e}, {};", flit(1.0)));
                    r
                };
                self.selp_f(x, &other, &keep)
            }
            UnOp::Cos | UnOp::Sin => {
                // x − 2π·round(x / 2π) is in [−π, π]; a non-finite x gives NaN.
                let q = self.reg(RegTy::F32);
                self.ins(&format!("mul.rn.f32 {q}, {x}, {};", flit(0.159_154_94)));
                self.ins(&format!("cvt.rni.f32.f32 {q}, {q};"));
                let red = self.reg(RegTy::F32);
                self.ins(&format!("fma.rn.f32 {red}, {q}, {}, {x};", flit(-std::f32::consts::TAU)));
                let r = self.reg(RegTy::F32);
                self.ins(&format!("{}.approx.f32 {r}, {red};", if op == UnOp::Cos { "cos" } else { "sin" }));
                let a = f(self, "abs.f32");
                let finite = self.reg(RegTy::Pred);
                self.ins(&format!("setp.lt.f32 {finite}, {a}, {};", flit(f32::INFINITY)));
                let nan = self.float(f32::NAN);
                self.selp_f(&r, &nan, &finite)
            }
        }
    }

    /// `floor(a / b)` for s32 (`b = 0` gives `a`: the runtime refuses zero divisors).
    fn floor_div(&mut self, a: &str, b: &str) -> String {
        let z = self.reg(RegTy::Pred);
        self.ins(&format!("setp.eq.s32 {z}, {b}, 0;"));
        let d = self.reg(RegTy::S32);
        self.ins(&format!("selp.s32 {d}, 1, {b}, {z};"));
        let q = self.reg(RegTy::S32);
        self.ins(&format!("div.s32 {q}, {a}, {d};"));
        // q − 1 when the division was inexact and the signs differ.
        let back = self.reg(RegTy::S32);
        self.ins(&format!("mul.lo.s32 {back}, {q}, {d};"));
        let inexact = self.reg(RegTy::Pred);
        self.ins(&format!("setp.ne.s32 {inexact}, {back}, {a};"));
        let x = self.reg(RegTy::S32);
        self.ins(&format!("xor.b32 {x}, {a}, {d};"));
        let differ = self.reg(RegTy::Pred);
        self.ins(&format!("setp.lt.s32 {differ}, {x}, 0;"));
        self.ins(&format!("and.pred {inexact}, {inexact}, {differ};"));
        let m = self.reg(RegTy::S32);
        self.ins(&format!("selp.s32 {m}, 1, 0, {inexact};"));
        self.ins(&format!("sub.s32 {q}, {q}, {m};"));
        let r = self.reg(RegTy::S32);
        self.ins(&format!("selp.s32 {r}, {a}, {q}, {z};"));
        r
    }

    /// `x ** y` with the reference's special cases (`powf`).
    fn pow(&mut self, x: &str, y: &str) -> String {
        let ax = self.reg(RegTy::F32);
        self.ins(&format!("abs.f32 {ax}, {x};"));
        let l = self.reg(RegTy::F32);
        self.ins(&format!("lg2.approx.f32 {l}, {ax};"));
        self.ins(&format!("mul.rn.f32 {l}, {l}, {y};"));
        let r = self.reg(RegTy::F32);
        self.ins(&format!("ex2.approx.f32 {r}, {l};"));
        // x < 0: NaN for a fractional y, −r for an odd one.
        let fy = self.reg(RegTy::F32);
        self.ins(&format!("cvt.rzi.f32.f32 {fy}, {y};"));
        let frac = self.reg(RegTy::Pred);
        self.ins(&format!("setp.neu.f32 {frac}, {fy}, {y};"));
        let h = self.reg(RegTy::F32);
        self.ins(&format!("mul.rn.f32 {h}, {y}, {};", flit(0.5)));
        let fh = self.reg(RegTy::F32);
        self.ins(&format!("cvt.rzi.f32.f32 {fh}, {h};"));
        let odd = self.reg(RegTy::Pred);
        self.ins(&format!("setp.neu.f32 {odd}, {fh}, {h};"));
        let nr = self.reg(RegTy::F32);
        self.ins(&format!("neg.f32 {nr}, {r};"));
        let signed = self.selp_f(&nr, &r, &odd);
        let nan = self.float(f32::NAN);
        let neg = self.selp_f(&nan, &signed, &frac);
        let isneg = self.reg(RegTy::Pred);
        self.ins(&format!("setp.lt.f32 {isneg}, {x}, {};", flit(0.0)));
        let v = self.selp_f(&neg, &r, &isneg);
        // x = 0: +inf for y < 0, else 0.
        let zero = self.reg(RegTy::Pred);
        self.ins(&format!("setp.eq.f32 {zero}, {x}, {};", flit(0.0)));
        let yneg = self.reg(RegTy::Pred);
        self.ins(&format!("setp.lt.f32 {yneg}, {y}, {};", flit(0.0)));
        let (inf, z) = (self.float(f32::INFINITY), self.float(0.0));
        let atzero = self.selp_f(&inf, &z, &yneg);
        let v = self.selp_f(&atzero, &v, &zero);
        // NaN in, NaN out; then y = 0 or x = 1 give 1 (even with a NaN on the other side).
        let sum = self.reg(RegTy::F32);
        self.ins(&format!("add.rn.f32 {sum}, {x}, {y};"));
        let anynan = self.reg(RegTy::Pred);
        self.ins(&format!("setp.nan.f32 {anynan}, {x}, {y};"));
        let v = self.selp_f(&sum, &v, &anynan);
        let one = self.reg(RegTy::Pred);
        self.ins(&format!("setp.eq.f32 {one}, {y}, {};", flit(0.0)));
        let xone = self.reg(RegTy::Pred);
        self.ins(&format!("setp.eq.f32 {xone}, {x}, {};", flit(1.0)));
        self.ins(&format!("or.pred {one}, {one}, {xone};"));
        let onef = self.float(1.0);
        self.selp_f(&onef, &v, &one)
    }

    fn binary(&mut self, op: BinOp, ty: Ty, x: &str, y: &str) -> String {
        let cmp = |op: BinOp, float: bool| match op {
            BinOp::Eq => "eq",
            BinOp::Ne if float => "neu",
            BinOp::Ne => "ne",
            BinOp::Lt => "lt",
            BinOp::Le => "le",
            BinOp::Gt => "gt",
            _ => "ge",
        };
        if op.is_comparison() {
            let r = self.reg(RegTy::Pred);
            match ty {
                Ty::Bool => {
                    self.ins(&format!("xor.pred {r}, {x}, {y};"));
                    if op == BinOp::Eq {
                        self.ins(&format!("not.pred {r}, {r};"));
                    }
                }
                Ty::Int => self.ins(&format!("setp.{}.s32 {r}, {x}, {y};", cmp(op, false))),
                Ty::Float => self.ins(&format!("setp.{}.f32 {r}, {x}, {y};", cmp(op, true))),
            }
            return r;
        }
        match (op, ty) {
            (BinOp::And | BinOp::Or, _) => {
                let r = self.reg(RegTy::Pred);
                self.ins(&format!("{}.pred {r}, {x}, {y};", if op == BinOp::And { "and" } else { "or" }));
                r
            }
            (BinOp::FloorDiv, _) => self.floor_div(x, y),
            (BinOp::Mod, _) => {
                let q = self.floor_div(x, y);
                let r = self.reg(RegTy::S32);
                // a − b·floor(a / b); b = 0 gives a − 0 = a.
                self.ins(&format!("mul.lo.s32 {r}, {q}, {y};"));
                self.ins(&format!("sub.s32 {r}, {x}, {r};"));
                r
            }
            (BinOp::Pow, _) => self.pow(x, y),
            (_, Ty::Int) => {
                let r = self.reg(RegTy::S32);
                let ins = match op {
                    BinOp::Add => "add.s32",
                    BinOp::Sub => "sub.s32",
                    BinOp::Mul => "mul.lo.s32",
                    BinOp::Min => "min.s32",
                    _ => "max.s32",
                };
                self.ins(&format!("{ins} {r}, {x}, {y};"));
                r
            }
            _ => {
                let r = self.reg(RegTy::F32);
                let ins = match op {
                    BinOp::Add => "add.rn.f32",
                    BinOp::Sub => "sub.rn.f32",
                    BinOp::Mul => "mul.rn.f32",
                    BinOp::Div => "div.rn.f32",
                    BinOp::Min => "min.NaN.f32",
                    _ => "max.NaN.f32",
                };
                self.ins(&format!("{ins} {r}, {x}, {y};"));
                r
            }
        }
    }

    /// Lowers `e` into instructions; the register holding its value.
    pub fn expr(&mut self, e: &Expr) -> Result<String, CodegenError> {
        let ty = self.k.ty_of(e);
        Ok(match e {
            Expr::Int(n) => self.int(*n)?,
            Expr::Float(x) => self.float(x.0 as f32),
            Expr::Bool(b) => self.pred(*b),
            Expr::Var(v) => self.var(v)?,
            Expr::Dim(d) => self.dim(d),
            Expr::Load(t, idx) => {
                let ix = idx.iter().map(|x| self.expr(x)).collect::<Result<Vec<_>, _>>()?;
                self.load(t, &ix)
            }
            Expr::Unary(op, a) => {
                let at = self.k.ty_of(a);
                let x = self.expr(a)?;
                self.unary(*op, at, &x)
            }
            Expr::Binary(op, a, b) => {
                let at = self.k.ty_of(a);
                let (x, y) = (self.expr(a)?, self.expr(b)?);
                self.binary(*op, at, &x, &y)
            }
            Expr::Select(c, a, b) => {
                let (p, x, y) = (self.expr(c)?, self.expr(a)?, self.expr(b)?);
                match ty {
                    Ty::Bool => {
                        let (t, f, r) = (self.reg(RegTy::Pred), self.reg(RegTy::Pred), self.reg(RegTy::Pred));
                        self.ins(&format!("and.pred {t}, {p}, {x};"));
                        self.ins(&format!("not.pred {f}, {p};"));
                        self.ins(&format!("and.pred {f}, {f}, {y};"));
                        self.ins(&format!("or.pred {r}, {t}, {f};"));
                        r
                    }
                    _ => {
                        let r = self.reg(RegTy::of(ty));
                        self.ins(&format!("selp.{} {r}, {x}, {y}, {p};", if ty == Ty::Int { "s32" } else { "f32" }));
                        r
                    }
                }
            }
            Expr::Reduce { op, var, lo, hi, body } => {
                let (l, h) = (self.expr(lo)?, self.expr(hi)?);
                let bt = self.k.ty_of(body);
                let acc = self.reg(RegTy::of(bt));
                match (op, bt) {
                    (RedOp::Any | RedOp::All, _) => {
                        let v = self.pred(*op == RedOp::All);
                        self.ins(&format!("mov.pred {acc}, {v};"));
                    }
                    (RedOp::Sum, Ty::Int) => self.ins(&format!("mov.s32 {acc}, 0;")),
                    (RedOp::Max, Ty::Int) => self.ins(&format!("mov.s32 {acc}, {};", i32::MIN)),
                    (RedOp::Min, Ty::Int) => self.ins(&format!("mov.s32 {acc}, {};", i32::MAX)),
                    (RedOp::Sum, _) => self.ins(&format!("mov.f32 {acc}, {};", flit(0.0))),
                    (RedOp::Max, _) => self.ins(&format!("mov.f32 {acc}, {};", flit(f32::NEG_INFINITY))),
                    (RedOp::Min, _) => self.ins(&format!("mov.f32 {acc}, {};", flit(f32::INFINITY))),
                }
                let (op, var, body) = (*op, var.clone(), (**body).clone());
                self.for_range(&l, &h, &mut |f, v| {
                    f.bind(&var, v);
                    let x = f.expr(&body)?;
                    f.unbind(1);
                    let bop = match op {
                        RedOp::Sum => BinOp::Add,
                        RedOp::Max => BinOp::Max,
                        RedOp::Min => BinOp::Min,
                        RedOp::Any => BinOp::Or,
                        RedOp::All => BinOp::And,
                    };
                    let r = f.binary(bop, bt, &acc, &x);
                    let t = if bt == Ty::Bool {
                        "pred"
                    } else if bt == Ty::Int {
                        "s32"
                    } else {
                        "f32"
                    };
                    f.ins(&format!("mov.{t} {acc}, {r};"));
                    Ok(())
                })?;
                acc
            }
        })
    }

    /// The function's text: `.entry`, parameters, register declarations, body.
    pub fn finish(self) -> String {
        let mut s = format!(".visible .entry {}(\n\t.param .u64 p_args,\n\t.param .u64 p_inp,\n\t.param .u64 p_buf\n)\n{{\n", self.name);
        s.push_str(&self.shared);
        for t in [RegTy::Pred, RegTy::U16, RegTy::S32, RegTy::B32, RegTy::F32, RegTy::U64] {
            let n = self.counts[t as usize];
            if n > 0 {
                // `%r<n>` declares %r0 … %r(n-1); registers are numbered from 1.
                let _ = writeln!(s, "\t.reg {} {}<{}>;", t.decl(), t.prefix(), n + 1);
            }
        }
        s.push_str(&self.head);
        s.push_str(&self.slot_lines);
        s.push_str(&self.body);
        s.push_str("\tret;\n}\n");
        s
    }
}

/// `tid = ctaid.x · ntid.x + tid.x` (the thread's global index), and the predicate
/// `tid >= n`.
pub fn global_thread(f: &mut Func, n: &str) -> (String, String) {
    let (a, b, c) = (f.reg(RegTy::S32), f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("mov.u32 {a}, %ctaid.x;"));
    f.ins(&format!("mov.u32 {b}, %ntid.x;"));
    f.ins(&format!("mov.u32 {c}, %tid.x;"));
    let t = f.reg(RegTy::S32);
    f.ins(&format!("mad.lo.s32 {t}, {a}, {b}, {c};"));
    let out = f.reg(RegTy::Pred);
    f.ins(&format!("setp.ge.s32 {out}, {t}, {n};"));
    (t, out)
}

/// `derive_<n>`: derived tensor `name`, a thread per element (a prefix sum: per line along
/// its axis, adding as it walks).
pub fn derive(k: &Kernel, layout: &ArgLayout, entry: &str, name: &str) -> Result<String, CodegenError> {
    let t = k.tensor(name).expect("derived tensor").clone();
    let TensorKind::Derived { vars, def } = &t.kind else { return Err(CodegenError::Emit(format!("`{name}` is not derived"))) };
    let mut f = Func::new(k, layout, entry);
    let exts: Vec<String> = t.shape.iter().map(|e| f.expr(&e.to_expr())).collect::<Result<_, _>>()?;
    let (body, scan) = match def {
        TensorDef::Map(e) => (e, None),
        TensorDef::Cumsum { axis, body } => (body, Some(*axis)),
    };
    // Elements (or lines) in row-major order over the axes other than the scan's.
    let mut count = f.int(1)?;
    for (a, x) in exts.iter().enumerate() {
        if Some(a) != scan {
            let r = f.reg(RegTy::S32);
            f.ins(&format!("mul.lo.s32 {r}, {count}, {x};"));
            count = r;
        }
    }
    let (tid, out) = global_thread(&mut f, &count);
    let done = f.label();
    f.ins(&format!("@{out} bra {done};"));
    let mut rem = tid;
    let mut idx = vec![String::new(); exts.len()];
    for a in (0..exts.len()).rev() {
        if Some(a) == scan {
            continue;
        }
        let (q, r) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
        f.ins(&format!("rem.s32 {r}, {rem}, {};", exts[a]));
        f.ins(&format!("div.s32 {q}, {rem}, {};", exts[a]));
        idx[a] = r;
        rem = q;
    }
    // Float tensors hold f32 (an integer body converted); integer ones s32.
    let is_int = t.dtype.is_int();
    if is_int && (scan.is_some() || k.ty_of(body) != Ty::Int) {
        return Err(CodegenError::Emit(format!("integer tensor `{name}` must be an integer map")));
    }
    let value = |f: &mut Func, idx: &[String]| -> Result<String, CodegenError> {
        for (v, r) in vars.iter().zip(idx) {
            f.bind(v, r);
        }
        let x = f.expr(body)?;
        f.unbind(vars.len());
        Ok(if !is_int && f.k.ty_of(body) == Ty::Int {
            let c = f.reg(RegTy::F32);
            f.ins(&format!("cvt.rn.f32.s32 {c}, {x};"));
            c
        } else {
            x
        })
    };
    match scan {
        None => {
            let v = value(&mut f, &idx)?;
            let off = f.offset(name, &idx);
            if is_int {
                let a = f.address(name, &off);
                f.ins(&format!("st.global.s32 [{a}], {v};"));
            } else {
                f.store(name, &off, &v);
            }
        }
        Some(axis) => {
            let acc = f.float(0.0);
            let zero = f.int(0)?;
            let ext = exts[axis].clone();
            f.for_range(&zero, &ext, &mut |f, x| {
                let mut ix = idx.clone();
                ix[axis] = x.to_string();
                let v = value(f, &ix)?;
                f.ins(&format!("add.rn.f32 {acc}, {acc}, {v};"));
                let off = f.offset(name, &ix);
                f.store(name, &off, &acc);
                Ok(())
            })?;
        }
    }
    f.place(&done);
    Ok(f.finish())
}

/// `attend`: the exact f32 row kernel. A thread per query row `(b, h, i)` and slice of
/// `channels` output channels (its accumulators in registers); per branch it walks the keys
/// twice for a softmax (the running maximum and denominator, then the weights) or a linear
/// normalization (the sum, then the weights) and once for a pointwise one, with the
/// reference's semantics: a row whose keys are all masked (or all at −inf) gives zeros, NaN
/// propagates, the maximum is subtracted.
pub fn attend(k: &Kernel, layout: &ArgLayout, channels: usize) -> Result<String, CodegenError> {
    let mut f = Func::new(k, layout, "attend");
    let [nb, nh, ni, nj, ne] = [&k.iter.b, &k.iter.h, &k.iter.i, &k.iter.j, &k.iter.e].map(|x| x.to_expr());
    let (nb, nh, ni, nj, ne) = (f.expr(&nb)?, f.expr(&nh)?, f.expr(&ni)?, f.expr(&nj)?, f.expr(&ne)?);
    let c = channels as i64;
    let rows = f.reg(RegTy::S32);
    f.ins(&format!("mul.lo.s32 {rows}, {nb}, {nh};"));
    f.ins(&format!("mul.lo.s32 {rows}, {rows}, {ni};"));
    let slices = f.reg(RegTy::S32);
    f.ins(&format!("add.s32 {slices}, {ne}, {};", c - 1));
    f.ins(&format!("div.s32 {slices}, {slices}, {c};"));
    let total = f.reg(RegTy::S32);
    f.ins(&format!("mul.lo.s32 {total}, {rows}, {slices};"));
    let (tid, out) = global_thread(&mut f, &total);
    let done = f.label();
    f.ins(&format!("@{out} bra {done};"));
    let (row, slice) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("div.s32 {row}, {tid}, {slices};"));
    f.ins(&format!("rem.s32 {slice}, {tid}, {slices};"));
    let (b, h, i, t) = (f.reg(RegTy::S32), f.reg(RegTy::S32), f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("rem.s32 {i}, {row}, {ni};"));
    f.ins(&format!("div.s32 {t}, {row}, {ni};"));
    f.ins(&format!("rem.s32 {h}, {t}, {nh};"));
    f.ins(&format!("div.s32 {b}, {t}, {nh};"));
    f.bind("b", &b);
    f.bind("h", &h);
    f.bind("i", &i);
    let e0 = f.reg(RegTy::S32);
    f.ins(&format!("mul.lo.s32 {e0}, {slice}, {c};"));
    let acc: Vec<String> = (0..channels).map(|_| f.float(0.0)).collect();
    let any = f.pred(false);
    let zero = f.int(0)?;
    let ninf = flit(f32::NEG_INFINITY);
    for br in &k.branches {
        let skip = f.label();
        // The pair's score when the mask keeps it: `then(s)` runs with `s` (score + bias).
        let kept = |f: &mut Func, then: &mut dyn FnMut(&mut Func, &str) -> Result<(), CodegenError>| -> Result<(), CodegenError> {
            let mut body = |f: &mut Func| -> Result<(), CodegenError> {
                let mut s = f.expr(&br.score)?;
                if let Some(bias) = &br.bias {
                    let bv = f.expr(bias)?;
                    let r = f.reg(RegTy::F32);
                    f.ins(&format!("add.rn.f32 {r}, {s}, {bv};"));
                    s = r;
                }
                then(f, &s)
            };
            match &br.mask {
                Some(m) => {
                    let p = f.expr(m)?;
                    f.if_(&p, false, &mut body)
                }
                None => body(f),
            }
        };
        let live = f.pred(false);
        // First walk: the state the weights need.
        let (m, d) = (f.float(f32::NEG_INFINITY), f.float(0.0));
        let fold_max = |f: &mut Func, x: &str| {
            // m' = max(m, x); d = d·exp(m − m') + exp(x − m') unless m' = −inf (then nothing
            // has weight yet).
            let mn = f.reg(RegTy::F32);
            f.ins(&format!("max.NaN.f32 {mn}, {m}, {x};"));
            let still = f.reg(RegTy::Pred);
            f.ins(&format!("setp.eq.f32 {still}, {mn}, {ninf};"));
            let mut upd = |f: &mut Func| -> Result<(), CodegenError> {
                let (a, bb) = (f.reg(RegTy::F32), f.reg(RegTy::F32));
                f.ins(&format!("sub.rn.f32 {a}, {m}, {mn};"));
                f.ins(&format!("sub.rn.f32 {bb}, {x}, {mn};"));
                let (ea, eb) = (f.exp(&a), f.exp(&bb));
                f.ins(&format!("fma.rn.f32 {d}, {d}, {ea}, {eb};"));
                f.ins(&format!("mov.f32 {m}, {mn};"));
                Ok(())
            };
            f.if_(&still, true, &mut upd)
        };
        let softmax = matches!(br.norm, attnc_ir::Norm::Softmax { .. });
        let linear = matches!(br.norm, attnc_ir::Norm::Linear { .. });
        if softmax || linear {
            f.for_range(&zero, &nj, &mut |f, j| {
                f.bind("j", j);
                kept(f, &mut |f, s| {
                    let t = f.pred(true);
                    f.ins(&format!("mov.pred {live}, {t};"));
                    if softmax {
                        fold_max(f, s)
                    } else {
                        f.ins(&format!("add.rn.f32 {d}, {d}, {s};"));
                        Ok(())
                    }
                })?;
                f.unbind(1);
                Ok(())
            })?;
            f.ins(&format!("@!{live} bra {skip};"));
            match &br.norm {
                attnc_ir::Norm::Softmax { sink: Some(sk), .. } => {
                    let x = f.expr(sk)?;
                    fold_max(&mut f, &x)?;
                }
                attnc_ir::Norm::Linear { eps } => {
                    f.ins(&format!("add.rn.f32 {d}, {d}, {};", flit(eps.0 as f32)));
                }
                _ => {}
            }
            if softmax {
                let dead = f.reg(RegTy::Pred);
                f.ins(&format!("setp.eq.f32 {dead}, {m}, {ninf};"));
                f.ins(&format!("@{dead} bra {skip};"));
            }
        }
        let weight = match &br.weight {
            Some(w) => Some(f.expr(w)?),
            None => None,
        };
        // Second walk (the only one for a pointwise map): weights, accumulated.
        f.for_range(&zero, &nj, &mut |f, j| {
            f.bind("j", j);
            kept(f, &mut |f, s| {
                let mut p = match &br.norm {
                    attnc_ir::Norm::Softmax { post, .. } => {
                        let x = f.reg(RegTy::F32);
                        f.ins(&format!("sub.rn.f32 {x}, {s}, {m};"));
                        let ex = f.exp(&x);
                        let p = f.reg(RegTy::F32);
                        f.ins(&format!("div.rn.f32 {p}, {ex}, {d};"));
                        match post {
                            Some(post) => {
                                f.bind("w", &p);
                                let q = f.expr(post)?;
                                f.unbind(1);
                                q
                            }
                            None => p,
                        }
                    }
                    attnc_ir::Norm::Linear { .. } => {
                        let p = f.reg(RegTy::F32);
                        f.ins(&format!("div.rn.f32 {p}, {s}, {d};"));
                        p
                    }
                    attnc_ir::Norm::Map(map) => {
                        let t = f.pred(true);
                        f.ins(&format!("mov.pred {live}, {t};"));
                        f.bind("s", s);
                        let q = f.expr(map)?;
                        f.unbind(1);
                        q
                    }
                };
                if let Some(w) = &weight {
                    let r = f.reg(RegTy::F32);
                    f.ins(&format!("mul.rn.f32 {r}, {p}, {w};"));
                    p = r;
                }
                if let Some(dc) = &br.decay {
                    let x = f.expr(dc)?;
                    let r = f.reg(RegTy::F32);
                    f.ins(&format!("mul.rn.f32 {r}, {p}, {x};"));
                    p = r;
                }
                for (n, a) in acc.iter().enumerate() {
                    let e = f.reg(RegTy::S32);
                    f.ins(&format!("add.s32 {e}, {e0}, {n};"));
                    let inside = f.reg(RegTy::Pred);
                    f.ins(&format!("setp.lt.s32 {inside}, {e}, {ne};"));
                    f.if_(&inside, false, &mut |f| {
                        f.bind("e", &e);
                        let v = f.expr(&f.k.value.clone())?;
                        f.unbind(1);
                        f.ins(&format!("fma.rn.f32 {a}, {p}, {v}, {a};"));
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
            f.unbind(1);
            Ok(())
        })?;
        f.ins(&format!("or.pred {any}, {any}, {live};"));
        f.place(&skip);
    }
    // Store: zeros when no key was live in any branch, else the gated values.
    let out_name = k.output().name.clone();
    for (n, a) in acc.iter().enumerate() {
        let e = f.reg(RegTy::S32);
        f.ins(&format!("add.s32 {e}, {e0}, {n};"));
        let inside = f.reg(RegTy::Pred);
        f.ins(&format!("setp.lt.s32 {inside}, {e}, {ne};"));
        f.if_(&inside, false, &mut |f| {
            f.bind("e", &e);
            let mut v = a.clone();
            if let Some(g) = &k.gate {
                let gv = f.expr(g)?;
                let r = f.reg(RegTy::F32);
                f.ins(&format!("mul.rn.f32 {r}, {v}, {gv};"));
                v = r;
            }
            let z = f.float(0.0);
            let r = f.reg(RegTy::F32);
            f.ins(&format!("selp.f32 {r}, {v}, {z}, {any};"));
            let idx: Vec<String> = k.out.iter().map(|x| f.var(x)).collect::<Result<_, _>>()?;
            let off = f.offset(&out_name, &idx);
            f.store(&out_name, &off, &r);
            f.unbind(1);
            Ok(())
        })?;
    }
    f.place(&done);
    Ok(f.finish())
}
