//! `derive_T(frame, lo, hi)`: a derived tensor computed element by element (a prefix sum
//! reads the element before), over a range of its first axis or of its first two flattened.

use super::*;
use attnc_ir::{Expr, TensorDef, TensorKind};
use cranelift::prelude::*;

impl Gen<'_, '_> {
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
            let (mut l, h) = if axis == 0 { (lo, hi) } else { (g.iconst(0), tv.ext[axis]) };
            // The innermost axis of a float map, 4 elements at a time (the tiled kernel's
            // f32x4 code; `elu`, `exp`, `sqrt` on 4 lanes, not a call per element); the last
            // `len % 4` elements go through the scalar loop below.
            if axis + 1 == rank && scan.is_none() && !is_int {
                l = g.derive_vectors(l, h, tv, &vars[axis], idx, body);
            }
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

    /// `t[.., x] = body` for `x` in `[l, l + 4·⌊(h − l)/4⌋)` on f32x4 lanes, `x` bound as the
    /// key variable `j` so that a load contiguous in it is one vector load; `idx` holds the
    /// outer indices. Returns where the scalar tail starts.
    fn derive_vectors(&mut self, l: Value, h: Value, tv: &TVals, var: &str, idx: &[Value], body: &Expr) -> Value {
        const LANE: &str = "j";
        let body = body.subst(var, &Expr::var(LANE));
        let vecs = [LANE.to_string()];
        let n = self.b.ins().isub(h, l);
        let n4 = self.b.ins().sshr_imm_u(n, 2);
        let outer = idx.len();
        let mut base = self.iconst(0);
        for (a, x) in idx.iter().enumerate() {
            let p = self.b.ins().imul(*x, tv.stride[a]);
            base = self.b.ins().iadd(base, p);
        }
        let iota = self.iota4();
        let hoisted = self.hoist(&[&body], &vecs);
        let zero = self.iconst(0);
        self.for_range(zero, n4, &mut |g, c| {
            let four = g.b.ins().ishl_imm_u(c, 2);
            let x = g.b.ins().iadd(l, four);
            let x32 = g.b.ins().ireduce(types::I32, x);
            let lanes = g.b.ins().splat(types::I32X4, x32);
            let lanes = g.b.ins().iadd(lanes, iota);
            g.bind(LANE, lanes);
            let v = g.vexpr_f(&body, &vecs);
            g.unbind(1);
            let p = g.b.ins().imul(x, tv.stride[outer]);
            let off = g.b.ins().iadd(base, p);
            let bytes = g.b.ins().ishl_imm_u(off, 2);
            let addr = g.b.ins().iadd(tv.base, bytes);
            g.b.ins().store(flags(), v, addr, 0);
        });
        self.unhoist(hoisted);
        let done = self.b.ins().ishl_imm_u(n4, 2);
        self.b.ins().iadd(l, done)
    }
}
