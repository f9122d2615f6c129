//! `pack(frame, b, h, kt, vb)`: a head group's key panels (each distinct key factor of the
//! branches' dots, transposed in panels of `BK` keys, one after the other) and value rows,
//! zero-padded to whole key tiles.

use super::super::gen::Gen;
use crate::schedule::TiledSchedule;
use cranelift::prelude::*;

impl Gen<'_, '_> {
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
        for dot in &plan.panels {
            if !inner.contains(&dot.r) {
                inner.push(dot.r.clone());
            }
            roots.push(&dot.b);
        }
        let hoisted = self.hoist(&roots, &inner);
        // Every panel has the tile's channels (`channels_all`); a shorter dot's are zero-padded.
        // A kernel whose scores have no dot product has no panel.
        let all = plan.channels_all().unwrap_or(attnc_ir::Expr::Int(0));
        let dlen = self.expr(&all);
        for (n, dot) in plan.panels.iter().enumerate() {
            let padded = dot.len != all;
            let own = if padded { self.expr(&dot.len) } else { dlen };
            // Panel n starts after n panels of ceil(M / BK) · BK keys × D channels.
            let kt = match n {
                0 => kt,
                _ => {
                    let size = self.b.ins().imul(mpad, dlen);
                    let base = self.b.ins().imul_imm_s(size, n as i64);
                    self.ptr_off(kt, base)
                }
            };
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
                    g.for_range(z, own, &mut |g, r| {
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
                match g.contiguous_row(&dot.b, &dot.r, own) {
                    Some((src, ok)) => {
                        let fast = g.b.ins().band(ok, inside);
                        g.if_else(
                            fast,
                            &mut |g| {
                                g.copy_row(src, own, None, &mut |g, x, v| {
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
                if padded {
                    g.for_range(own, dlen, &mut |g, r| {
                        let off = g.b.ins().imul_imm_s(r, bk);
                        let off = g.b.ins().iadd(off, col);
                        g.store_f32(kt, off, zf);
                    });
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
}
