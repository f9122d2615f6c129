//! The chunked kernel `attend_chunked` (under [`crate::schedule::Algorithm::Chunked`]):
//! linear and decay attention in the normal form of `attnc_passes::linear` (features
//! `__fq`, `__fk`, log-decays `__lq`, `__lk`, values `__v`, gate `__gate`, derived tensors
//! the derive passes computed), linear in the number of keys. The algorithm and its sizes
//! are the WGSL chunked kernel's ([`crate::schedule::gpu_chunk`]), in exact f32:
//!
//! A CTA per `(b, h, slice of SLICE output channels)` walks the keys in chunks of `C` with a
//! `Dk × SLICE` state `S = Σ_{j < c0} exp(λk_{c0-1} − λk_j) ⊙ fk_j ⊗ v_j` (and its column of
//! ones `Z` for the linear normalization) in shared memory. Per chunk `[c0, c1)`, the rows
//! whose last visible key falls in it (a contiguous range: the last key `min(i + off, M − 1)`
//! does not decrease in `i`), `ROW_BLOCK` at a time, get `(fq_i ⊙ exp(λq_i − λk_{c0−1}))·S`
//! plus the exact pairs `Σ_{c0 ≤ j ≤ last(i)} (Σ_d fq_id fk_jd exp(λq_id − λk_jd)) v_j`;
//! then `S ← exp(λk_{c1−1} − λk_{c0−1}) ⊙ S + Σ_{j ∈ chunk} exp(λk_{c1−1} − λk_j) ⊙ fk_j ⊗ v_j`.
//! A non-causal kernel builds the state, then every row reads it.
//!
//! Every split factor is checked as it is formed: when an exponent exceeds
//! [`MAX_SPLIT_EXP`] (a log-decay that increases along the keys) the thread flags it, and the
//! CTA computes its head again in the exact pairwise form, so the result never depends on the
//! data being well behaved, only the speed does. Rows with no visible key are zeros. Only
//! pairs the mask keeps are summed (a NaN at a masked key reaches no row).

use super::emit::{flit, Func, RegTy};
use crate::host::ArgLayout;
use crate::schedule::gpu_chunk::{MAX_FEATURES, MAX_SPLIT_EXP, ROW_BLOCK, SLICE};
use crate::schedule::ChunkedSchedule;
use crate::CodegenError;
use attnc_ir::Kernel;
use attnc_passes::linear::{Decay, FK, FQ, GATE, LK, LQ, VAL};

type Emit = Result<(), CodegenError>;

/// What the pieces of the kernel share: the form, the CTA's registers, the shared arrays.
struct Ctx {
    decay: Decay,
    eps: Option<f32>,
    gate: bool,
    out: String,
    /// Threads per CTA (the stride of every cooperative loop) and keys per chunk.
    wg: String,
    chunk: i64,
    vb: String,
    vh: String,
    t: String,
    dk: String,
    off: String,
    nj: String,
    e_lo: String,
    e_hi: String,
    /// Set when a split factor's exponent passed [`MAX_SPLIT_EXP`].
    bad: String,
    st: String,
    sz: String,
    qf: String,
    sp: String,
}

fn int_op(f: &mut Func, op: &str, a: &str, b: &str) -> String {
    let r = f.reg(RegTy::S32);
    let op = if op == "mul" { "mul.lo" } else { op };
    f.ins(&format!("{op}.s32 {r}, {a}, {b};"));
    r
}

fn float_op(f: &mut Func, op: &str, a: &str, b: &str) -> String {
    let r = f.reg(RegTy::F32);
    f.ins(&format!("{op}.rn.f32 {r}, {a}, {b};"));
    r
}

fn pred(f: &mut Func, cmp: &str, a: &str, b: &str) -> String {
    let p = f.reg(RegTy::Pred);
    f.ins(&format!("setp.{cmp}.s32 {p}, {a}, {b};"));
    p
}

/// `min(max(x, 0), hi)`.
fn clamp0(f: &mut Func, x: &str, hi: &str) -> String {
    let a = int_op(f, "max", x, "0");
    int_op(f, "min", &a, hi)
}

/// The shared address of word `idx` of the array at `base`.
fn word(f: &mut Func, base: &str, idx: &str) -> String {
    let r = f.reg(RegTy::S32);
    f.ins(&format!("mad.lo.s32 {r}, {idx}, 4, {base};"));
    r
}

fn ld_shared(f: &mut Func, addr: &str) -> String {
    let r = f.reg(RegTy::F32);
    f.ins(&format!("ld.shared.f32 {r}, [{addr}];"));
    r
}

impl Ctx {
    /// `t[vb, vh, x, d]` (a scalar log-decay: `t[vb, vh, x]`).
    fn ld(&self, f: &mut Func, t: &str, x: &str, d: &str) -> String {
        let scalar = matches!(t, LQ | LK) && self.decay == Decay::Scalar;
        let mut idx = vec![self.vb.clone(), self.vh.clone(), x.to_string()];
        if !scalar {
            idx.push(d.to_string());
        }
        f.load(t, &idx)
    }

    /// `e^x` for a split factor, flagging the CTA when `x` is too large.
    fn fac(&self, f: &mut Func, x: &str) -> String {
        let p = f.reg(RegTy::Pred);
        f.ins(&format!("setp.gt.f32 {p}, {x}, {};", flit(MAX_SPLIT_EXP)));
        f.ins(&format!("or.pred {0}, {0}, {p};", self.bad));
        f.exp(x)
    }

    /// `e^(λ(x) − λk(y))` at channel `d`, split (flagged) or exact.
    fn decay_factor(&self, f: &mut Func, lx: &str, x: &str, y: &str, d: &str, split: bool) -> String {
        let a = self.ld(f, lx, x, d);
        let b = self.ld(f, LK, y, d);
        let z = float_op(f, "sub", &a, &b);
        if split {
            self.fac(f, &z)
        } else {
            f.exp(&z)
        }
    }

    /// The exact score of row `i` and key `j`.
    fn pair_score(&self, f: &mut Func, i: &str, j: &str) -> Result<String, CodegenError> {
        let s = f.float(0.0);
        f.for_range("0", &self.dk.clone(), &mut |f, d| {
            let q = self.ld(f, FQ, i, d);
            let k = self.ld(f, FK, j, d);
            let mut p = float_op(f, "mul", &q, &k);
            if self.decay == Decay::Channel {
                let e = self.decay_factor(f, LQ, i, j, d, false);
                p = float_op(f, "mul", &p, &e);
            }
            f.ins(&format!("add.rn.f32 {s}, {s}, {p};"));
            Ok(())
        })?;
        if self.decay == Decay::Scalar {
            let e = self.decay_factor(f, LQ, i, j, "0", false);
            f.ins(&format!("mul.rn.f32 {s}, {s}, {e};"));
        }
        Ok(s)
    }

    /// Writes output element `(i, e)`: `acc` (over `den + eps` for the linear
    /// normalization), gated.
    fn store(&self, f: &mut Func, i: &str, e: &str, acc: &str, den: &str) {
        let mut v = acc.to_string();
        if let Some(eps) = self.eps {
            let d = float_op(f, "add", den, &flit(eps));
            v = float_op(f, "div", &v, &d);
        }
        if self.gate {
            let g = self.ld(f, GATE, i, e);
            v = float_op(f, "mul", &v, &g);
        }
        let off = f.offset(&self.out, &[self.vb.clone(), self.vh.clone(), i.to_string(), e.to_string()]);
        f.store(&self.out, &off, &v);
    }

    /// `for (x = t; x < n; x += threads)`, and the slice's channel `e = e_lo + x % SLICE`
    /// with its row `x / SLICE` when `e < e_hi`.
    fn per_channel(&self, f: &mut Func, n: &str, body: &mut dyn FnMut(&mut Func, &str, &str) -> Emit) -> Emit {
        f.for_step(&self.t.clone(), n, &self.wg.clone(), &mut |f, x| {
            let r = int_op(f, "div", x, &SLICE.to_string());
            let ee = int_op(f, "rem", x, &SLICE.to_string());
            let e = int_op(f, "add", &self.e_lo, &ee);
            let inside = pred(f, "lt", &e, &self.e_hi);
            f.if_(&inside, false, &mut |f| body(f, &r, &e))
        })
    }

    /// Rows `[r0, r1)` against the state (decayed from key `c0 − 1`) and the exact pairs of
    /// keys `[c0, c1)` they see, `ROW_BLOCK` rows at a time.
    fn rows_block(&self, f: &mut Func, c0: &str, c1: &str, r0: &str, r1: &str) -> Emit {
        let dkmax = MAX_FEATURES.to_string();
        let c = self.chunk.to_string();
        f.for_step(r0, r1, &ROW_BLOCK.to_string(), &mut |f, ra| {
            let left = int_op(f, "sub", r1, ra);
            let rn = int_op(f, "min", &left, &ROW_BLOCK.to_string());
            // The row block's query features, decayed to key c0 − 1 (the state's reference).
            let n = int_op(f, "mul", &rn, &dkmax);
            f.for_step(&self.t.clone(), &n, &self.wg.clone(), &mut |f, x| {
                let r = int_op(f, "div", x, &dkmax);
                let i = int_op(f, "add", ra, &r);
                let d = int_op(f, "rem", x, &dkmax);
                let v = f.float(0.0);
                let (inside, past) = (pred(f, "lt", &d, &self.dk), pred(f, "gt", c0, "0"));
                f.ins(&format!("and.pred {inside}, {inside}, {past};"));
                f.if_(&inside, false, &mut |f| {
                    let q = self.ld(f, FQ, &i, &d);
                    if self.decay == Decay::None {
                        f.ins(&format!("mov.f32 {v}, {q};"));
                    } else {
                        let before = int_op(f, "add", c0, "-1");
                        let e = self.decay_factor(f, LQ, &i, &before, &d, true);
                        f.ins(&format!("mul.rn.f32 {v}, {q}, {e};"));
                    }
                    Ok(())
                })?;
                let a = word(f, &self.qf, x);
                f.ins(&format!("st.shared.f32 [{a}], {v};"));
                Ok(())
            })?;
            // The exact scores against the chunk's keys each row sees.
            let n = int_op(f, "mul", &rn, &c);
            f.for_step(&self.t.clone(), &n, &self.wg.clone(), &mut |f, x| {
                let r = int_op(f, "div", x, &c);
                let i = int_op(f, "add", ra, &r);
                let u = int_op(f, "rem", x, &c);
                let j = int_op(f, "add", c0, &u);
                let s = f.float(0.0);
                let reach = int_op(f, "add", &i, &self.off);
                let top = int_op(f, "add", &self.nj, "-1");
                let last = int_op(f, "min", &reach, &top);
                let (a, b) = (pred(f, "lt", &j, c1), pred(f, "le", &j, &last));
                f.ins(&format!("and.pred {a}, {a}, {b};"));
                f.if_(&a, false, &mut |f| {
                    let p = self.pair_score(f, &i, &j)?;
                    f.ins(&format!("mov.f32 {s}, {p};"));
                    Ok(())
                })?;
                let w = word(f, &self.sp, x);
                f.ins(&format!("st.shared.f32 [{w}], {s};"));
                Ok(())
            })?;
            f.ins("bar.sync 0;");
            // Each (row, channel): the state's part and the chunk's.
            let n = int_op(f, "mul", &rn, &SLICE.to_string());
            self.per_channel(f, &n, &mut |f, r, e| {
                let i = int_op(f, "add", ra, r);
                let (acc, den) = (f.float(0.0), f.float(0.0));
                let col = int_op(f, "sub", e, &self.e_lo);
                f.for_range("0", &self.dk.clone(), &mut |f, d| {
                    let qi = int_op(f, "mul", r, &dkmax);
                    let qi = int_op(f, "add", &qi, d);
                    let qa = word(f, &self.qf, &qi);
                    let qd = ld_shared(f, &qa);
                    let si = int_op(f, "mul", d, &SLICE.to_string());
                    let si = int_op(f, "add", &si, &col);
                    let sa = word(f, &self.st, &si);
                    let sv = ld_shared(f, &sa);
                    f.ins(&format!("fma.rn.f32 {acc}, {qd}, {sv}, {acc};"));
                    if self.eps.is_some() {
                        let za = word(f, &self.sz, d);
                        let zv = ld_shared(f, &za);
                        f.ins(&format!("fma.rn.f32 {den}, {qd}, {zv}, {den};"));
                    }
                    Ok(())
                })?;
                let width = int_op(f, "sub", c1, c0);
                f.for_range("0", &width, &mut |f, u| {
                    let pi = int_op(f, "mul", r, &c);
                    let pi = int_op(f, "add", &pi, u);
                    let pa = word(f, &self.sp, &pi);
                    let p = ld_shared(f, &pa);
                    let j = int_op(f, "add", c0, u);
                    let v = self.ld(f, VAL, &j, e);
                    f.ins(&format!("fma.rn.f32 {acc}, {p}, {v}, {acc};"));
                    f.ins(&format!("add.rn.f32 {den}, {den}, {p};"));
                    Ok(())
                })?;
                self.store(f, &i, e, &acc, &den);
                Ok(())
            })?;
            f.ins("bar.sync 0;");
            Ok(())
        })
    }

    /// The state after keys `[c0, c1)`: decayed to key `c1 − 1`, their terms added. A thread
    /// per (feature, column); the last column the ones (the normalization's `Z`).
    fn update(&self, f: &mut Func, c0: &str, c1: &str) -> Emit {
        let cols = SLICE as i64 + i64::from(self.eps.is_some());
        let n = int_op(f, "mul", &self.dk, &cols.to_string());
        let decayed = self.decay != Decay::None;
        f.for_step(&self.t.clone(), &n, &self.wg.clone(), &mut |f, x| {
            let d = int_op(f, "div", x, &cols.to_string());
            let ee = int_op(f, "rem", x, &cols.to_string());
            let e = int_op(f, "add", &self.e_lo, &ee);
            let ones = pred(f, "eq", &ee, &SLICE.to_string());
            let live = pred(f, "lt", &e, &self.e_hi);
            f.ins(&format!("or.pred {live}, {live}, {ones};"));
            f.if_(&live, false, &mut |f| {
                let si = int_op(f, "mul", &d, &SLICE.to_string());
                let si = int_op(f, "add", &si, &ee);
                let mut addr = word(f, &self.st, &si);
                if self.eps.is_some() {
                    let za = word(f, &self.sz, &d);
                    let a = f.reg(RegTy::S32);
                    f.ins(&format!("selp.s32 {a}, {za}, {addr}, {ones};"));
                    addr = a;
                }
                let s = ld_shared(f, &addr);
                let last = int_op(f, "add", c1, "-1");
                // λk at the chunk's last key: the reference of the state after the update.
                let lk_last = if decayed { Some(self.ld(f, LK, &last, &d)) } else { None };
                if let Some(top) = &lk_last {
                    let past = pred(f, "gt", c0, "0");
                    f.if_(&past, false, &mut |f| {
                        let before = int_op(f, "add", c0, "-1");
                        let b = self.ld(f, LK, &before, &d);
                        let z = float_op(f, "sub", top, &b);
                        let g = self.fac(f, &z);
                        f.ins(&format!("mul.rn.f32 {s}, {s}, {g};"));
                        Ok(())
                    })?;
                }
                f.for_range(c0, c1, &mut |f, j| {
                    let mut kf = self.ld(f, FK, j, &d);
                    if let Some(top) = &lk_last {
                        let l = self.ld(f, LK, j, &d);
                        let z = float_op(f, "sub", top, &l);
                        let g = self.fac(f, &z);
                        kf = float_op(f, "mul", &kf, &g);
                    }
                    let mut v = self.ld(f, VAL, j, &e);
                    if self.eps.is_some() {
                        let w = f.reg(RegTy::F32);
                        f.ins(&format!("selp.f32 {w}, {}, {v}, {ones};", flit(1.0)));
                        v = w;
                    }
                    f.ins(&format!("fma.rn.f32 {s}, {kf}, {v}, {s};"));
                    Ok(())
                })?;
                f.ins(&format!("st.shared.f32 [{addr}], {s};"));
                Ok(())
            })
        })
    }
}

/// `attend_chunked`: a CTA of `threads` threads per (batch, head, slice of output channels).
pub fn attend(k: &Kernel, layout: &ArgLayout, cs: &ChunkedSchedule, threads: u32) -> Result<String, CodegenError> {
    let form = &cs.form;
    let mut f = Func::new(k, layout, "attend_chunked");
    let dkmax = MAX_FEATURES as usize;
    let chunk = cs.chunk as i64;
    let st = f.shared_array("ch_state", 4 * dkmax * SLICE as usize);
    let sz = if form.eps.is_some() { f.shared_array("ch_ones", 4 * dkmax) } else { String::new() };
    let qf = f.shared_array("ch_query", 4 * dkmax * ROW_BLOCK as usize);
    let sp = f.shared_array("ch_scores", 4 * ROW_BLOCK as usize * cs.chunk);
    let decayed = form.decay != Decay::None;
    let flags = if decayed { f.shared_array("ch_flags", 4 * threads as usize) } else { String::new() };
    let [nb, nh, ni, nj, ne] = [&k.iter.b, &k.iter.h, &k.iter.i, &k.iter.j, &k.iter.e].map(|x| x.to_expr());
    let (_nb, nh, ni, nj, ne) = (f.expr(&nb)?, f.expr(&nh)?, f.expr(&ni)?, f.expr(&nj)?, f.expr(&ne)?);
    let dk = f.expr(&form.channels.to_expr())?;
    // CTA → (b, h, slice), the slice fastest.
    let sl = int_op(&mut f, "add", &ne, &(SLICE - 1).to_string());
    let slices = int_op(&mut f, "div", &sl, &SLICE.to_string());
    let cta = f.reg(RegTy::S32);
    f.ins(&format!("mov.u32 {cta}, %ctaid.x;"));
    let hd = int_op(&mut f, "div", &cta, &slices);
    let vh = int_op(&mut f, "rem", &hd, &nh);
    let vb = int_op(&mut f, "div", &hd, &nh);
    let s = int_op(&mut f, "rem", &cta, &slices);
    let e_lo = int_op(&mut f, "mul", &s, &SLICE.to_string());
    let top = int_op(&mut f, "add", &e_lo, &SLICE.to_string());
    let e_hi = int_op(&mut f, "min", &ne, &top);
    let t = f.reg(RegTy::S32);
    f.ins(&format!("mov.u32 {t}, %tid.x;"));
    let off = match &form.causal {
        Some(o) => f.expr(o)?,
        None => nj.clone(),
    };
    let bad = f.pred(false);
    let cx = Ctx {
        decay: form.decay,
        eps: form.eps.map(|e| e as f32),
        gate: form.gate,
        out: k.output().name.clone(),
        wg: threads.to_string(),
        chunk,
        vb,
        vh,
        t: t.clone(),
        dk,
        off: off.clone(),
        nj: nj.clone(),
        e_lo,
        e_hi,
        bad: bad.clone(),
        st: st.clone(),
        sz: sz.clone(),
        qf,
        sp,
    };
    let wg = threads.to_string();
    if form.causal.is_some() {
        // Rows with no visible key (i + off < 0): zeros.
        let neg = f.reg(RegTy::S32);
        f.ins(&format!("neg.s32 {neg}, {off};"));
        let empty = clamp0(&mut f, &neg, &ni);
        let n = int_op(&mut f, "mul", &empty, &SLICE.to_string());
        cx.per_channel(&mut f, &n, &mut |f, i, e| {
            let z = f.float(0.0);
            let at = f.offset(&cx.out, &[cx.vb.clone(), cx.vh.clone(), i.to_string(), e.to_string()]);
            f.store(&cx.out, &at, &z);
            Ok(())
        })?;
    }
    // The state and its column of ones start at zero.
    let zero = f.float(0.0);
    f.for_step(&t, &(dkmax * SLICE as usize).to_string(), &wg, &mut |f, x| {
        let a = word(f, &st, x);
        f.ins(&format!("st.shared.f32 [{a}], {zero};"));
        if form.eps.is_some() {
            let inside = pred(f, "lt", x, &dkmax.to_string());
            f.if_(&inside, false, &mut |f| {
                let a = word(f, &sz, x);
                f.ins(&format!("st.shared.f32 [{a}], {zero};"));
                Ok(())
            })?;
        }
        Ok(())
    })?;
    f.ins("bar.sync 0;");
    // The chunks: a causal kernel's rows whose last key falls in the chunk, then the state.
    f.for_step("0", &nj, &chunk.to_string(), &mut |f, c0| {
        let end = int_op(f, "add", c0, &chunk.to_string());
        let c1 = int_op(f, "min", &end, &nj);
        if form.causal.is_some() {
            let a = int_op(f, "sub", c0, &off);
            let r0 = clamp0(f, &a, &ni);
            let b = int_op(f, "sub", &c1, &off);
            let b = clamp0(f, &b, &ni);
            let at_end = pred(f, "eq", &c1, &nj);
            let r1 = f.reg(RegTy::S32);
            f.ins(&format!("selp.s32 {r1}, {ni}, {b}, {at_end};"));
            cx.rows_block(f, c0, &c1, &r0, &r1)?;
        }
        cx.update(f, c0, &c1)?;
        f.ins("bar.sync 0;");
        Ok(())
    })?;
    if form.causal.is_none() {
        // Every row from the whole state (the pass keeps decays causal).
        cx.rows_block(&mut f, &nj, &nj, "0", &ni)?;
    }
    if decayed {
        // Any thread's flag: the CTA computes its head again, pair by pair.
        let mine = f.reg(RegTy::S32);
        f.ins(&format!("selp.s32 {mine}, 1, 0, {bad};"));
        let a = word(&mut f, &flags, &t);
        f.ins(&format!("st.shared.u32 [{a}], {mine};"));
        f.ins("bar.sync 0;");
        let any = f.int(0)?;
        f.for_range("0", &wg, &mut |f, u| {
            let a = word(f, &flags, u);
            let v = f.reg(RegTy::S32);
            f.ins(&format!("ld.shared.u32 {v}, [{a}];"));
            f.ins(&format!("or.b32 {any}, {any}, {v};"));
            Ok(())
        })?;
        let redo = pred(&mut f, "ne", &any, "0");
        f.if_(&redo, false, &mut |f| {
            let n = int_op(f, "mul", &ni, &SLICE.to_string());
            cx.per_channel(f, &n, &mut |f, i, e| {
                let reach = int_op(f, "add", i, &off);
                let top = int_op(f, "add", &nj, "-1");
                let last = int_op(f, "min", &reach, &top);
                let seen = pred(f, "ge", &last, "0");
                f.if_(&seen, false, &mut |f| {
                    let (acc, den) = (f.float(0.0), f.float(0.0));
                    let hi = int_op(f, "add", &last, "1");
                    f.for_range("0", &hi, &mut |f, j| {
                        let p = cx.pair_score(f, i, j)?;
                        let v = cx.ld(f, VAL, j, e);
                        f.ins(&format!("fma.rn.f32 {acc}, {p}, {v}, {acc};"));
                        f.ins(&format!("add.rn.f32 {den}, {den}, {p};"));
                        Ok(())
                    })?;
                    cx.store(f, i, e, &acc, &den);
                    Ok(())
                })
            })
        })?;
    }
    Ok(f.finish())
}
