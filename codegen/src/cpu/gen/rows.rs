//! The row kernel, `attend(frame, b, h, i_lo, i_hi, ws)`: every query row walks its keys
//! with the normalization's state in registers; what every spec can run on.

use super::*;
use attnc_ir::{Expr, Norm};
use cranelift::prelude::*;

impl Gen<'_, '_> {
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
            for (bn, br) in k.branches.iter().enumerate() {
                g.branch(bn, br, mj, ev, ws, out_acc, any_live);
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
    #[allow(clippy::too_many_arguments)]
    pub(super) fn branch(&mut self, bn: usize, br: &attnc_ir::Branch, mj: Value, ev: Value, acc: Value, out_acc: Value, any_live: Variable) {
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
        // The saved statistic (`run_with_stats`' contract): log-sum-exp, or the linear
        // denominator; −inf and 0 for a row with no live key.
        let i = self.expr(&Expr::var("i"));
        self.save_stat(bn, i, &mut |g| match (&br.norm, softmax) {
            (_, true) => {
                let (mv, lv) = (g.b.use_var(m), g.b.use_var(l));
                let ln = g.call("attnc_logf", &[lv]);
                let lse = g.b.ins().fadd(mv, ln);
                g.b.ins().select(live, lse, neg_inf)
            }
            (Norm::Linear { eps }, _) => {
                let lv = g.b.use_var(l);
                let e = g.fconst(eps.0 as f32);
                let d = g.b.ins().fadd(lv, e);
                g.b.ins().select(live, d, zero_f)
            }
            _ => zero_f,
        });
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
}
