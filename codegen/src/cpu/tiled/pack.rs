//! `pack(frame, b, h, kt, vb)`: a head group's key panels (each distinct key factor of the
//! branches' dots, transposed in panels of `BK` keys, one after the other) and value rows,
//! zero-padded to whole key tiles. Values that are a plain row-major load (`v[b, hk, j, e]`)
//! are not copied: `tile` reads them in place (`Gen::value_rows`).

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
        // Keys `tile` reads in place (a few query rows) need no panel.
        match self.direct_keys(plan, mj) {
            Some((_, _, direct)) => {
                let packed = self.b.ins().bxor_imm_u(direct, 1);
                self.if_then(packed, &mut |g| g.pack_panels(plan, kt, mj, mpad, dlen, bk));
            }
            None => self.pack_panels(plan, kt, mj, mpad, dlen, bk),
        }
        // Values `tile` reads in place need no copy.
        let packed = match self.value_rows(mj, ev) {
            Some((_, _, in_place)) => self.b.ins().bxor_imm_u(in_place, 1),
            None => self.b.ins().iconst(types::I8, 1),
        };
        self.if_then(packed, &mut |g| g.pack_values(vb, mj, ev, mpad));
        self.unhoist(hoisted);
        self.unbind(2);
        self.b.ins().return_(&[]);
    }

    /// The key panels: each distinct key factor transposed in panels of `bk` keys.
    fn pack_panels(&mut self, plan: &crate::schedule::tiled::TiledPlan, kt: Value, mj: Value, mpad: Value, dlen: Value, bk: i64) {
        let (zero, zf, bkv) = (self.iconst(0), self.fconst(0.0), self.iconst(bk));
        let all = plan.channels_all().unwrap_or(attnc_ir::Expr::Int(0));
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
            // One key's panel column: its channels (a contiguous row by vector loads and one
            // store per lane, else element by element), zeros past its own channels, and
            // zeros for a key past the end.
            let one_key = |g: &mut Self, j: Value| {
                let inside = g.b.ins().icmp(IntCC::SignedLessThan, j, mj);
                let jc = clamp_key(g, j, mj);
                g.bind("j", jc);
                let col = panel_column(g, j, bkv, dlen, bk);
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
            };
            // Keys four at a time (a tile holds whole groups of four): four contiguous rows
            // inside the keys are transposed in registers, four channels at a time (four
            // loads, eight shuffles, four stores where one store per element was).
            let groups = self.b.ins().sshr_imm_u(mpad, 2);
            self.for_range(zero, groups, &mut |g, j4| {
                let j = g.b.ins().imul_imm_s(j4, 4);
                let last = g.b.ins().iadd_imm_s(j, 3);
                let all_in = g.b.ins().icmp(IntCC::SignedLessThan, last, mj);
                let mut rows = Vec::new();
                let mut ok = all_in;
                for t in 0..4 {
                    let jt = g.b.ins().iadd_imm_s(j, t);
                    // Clamped: the rows' addresses are computed for every group.
                    let jc = clamp_key(g, jt, mj);
                    g.bind("j", jc);
                    let row = g.contiguous_row(&dot.b, &dot.r, own);
                    g.unbind(1);
                    match row {
                        Some((src, o)) => {
                            ok = g.b.ins().band(ok, o);
                            rows.push(src);
                        }
                        None => break,
                    }
                }
                if rows.len() < 4 {
                    for t in 0..4 {
                        let jt = g.b.ins().iadd_imm_s(j, t);
                        one_key(g, jt);
                    }
                    return;
                }
                g.if_else(
                    ok,
                    &mut |g| {
                        let col = panel_column(g, j, bkv, dlen, bk);
                        let dst = g.ptr_off(kt, col);
                        let nvec = g.b.ins().sshr_imm_u(own, 2);
                        let z = g.iconst(0);
                        g.for_range(z, nvec, &mut |g, x4| {
                            let x = g.b.ins().imul_imm_s(x4, 4);
                            let v: Vec<Value> = rows.iter().map(|&src| g.load_at(src, x, types::F32X4)).collect();
                            let w = transpose4(g, [v[0], v[1], v[2], v[3]]);
                            for (n, wn) in w.into_iter().enumerate() {
                                // Channel x + n of the four keys: offset (x + n)·bk.
                                let r = g.b.ins().iadd_imm_s(x, n as i64);
                                let off = g.b.ins().imul_imm_s(r, bk);
                                g.store_at(dst, off, wn);
                            }
                        });
                        // The channels past the last group of four, element by element.
                        let tail = g.b.ins().imul_imm_s(nvec, 4);
                        g.for_range(tail, own, &mut |g, r| {
                            let off = g.b.ins().imul_imm_s(r, bk);
                            for (t, &src) in rows.iter().enumerate() {
                                let v = g.load_at(src, r, types::F32);
                                let o = g.b.ins().iadd_imm_s(off, t as i64);
                                g.store_at(dst, o, v);
                            }
                        });
                        if padded {
                            g.for_range(own, dlen, &mut |g, r| {
                                let off = g.b.ins().imul_imm_s(r, bk);
                                let z4 = g.fconst4(0.0);
                                g.store_at(dst, off, z4);
                            });
                        }
                    },
                    &mut |g| {
                        for t in 0..4 {
                            let jt = g.b.ins().iadd_imm_s(j, t);
                            one_key(g, jt);
                        }
                    },
                );
            });
        }
    }

    /// The value rows `vb[j][e]`, zero rows past the last key.
    fn pack_values(&mut self, vb: Value, mj: Value, ev: Value, mpad: Value) {
        let k = self.kernel;
        let (zero, zf) = (self.iconst(0), self.fconst(0.0));
        self.for_range(zero, mpad, &mut |g, j| {
            let inside = g.b.ins().icmp(IntCC::SignedLessThan, j, mj);
            let jc = clamp_key(g, j, mj);
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
    }
}

/// Key `j` clamped into `[0, M)` (`j ≥ 0`): a padding key reads the last key's values, which
/// the pack then replaces with zeros.
fn clamp_key(g: &mut Gen, j: Value, mj: Value) -> Value {
    let last = g.b.ins().iadd_imm_s(mj, -1);
    g.b.ins().smin(j, last)
}

/// Where key `j`'s column starts in a panel of `ceil(M / bk)` tiles of `dlen × bk` floats:
/// tile `j / bk`, column `j % bk` (channel `r` is `r · bk` further).
fn panel_column(g: &mut Gen, j: Value, bkv: Value, dlen: Value, bk: i64) -> Value {
    let (tile, _) = g.floor_div(j, bkv);
    let c = g.b.ins().srem(j, bkv);
    let panel = g.b.ins().imul(tile, dlen);
    let panel = g.b.ins().imul_imm_s(panel, bk);
    g.b.ins().iadd(panel, c)
}

/// The 4 × 4 transpose of four f32x4 rows: `out[c][t] = rows[t][c]` (unpack low/high, then
/// move the halves together).
fn transpose4(g: &mut Gen, rows: [Value; 4]) -> [Value; 4] {
    let bytes = |lanes: [u8; 4]| -> [u8; 16] {
        let mut m = [0u8; 16];
        for (n, &l) in lanes.iter().enumerate() {
            for b in 0..4 {
                m[4 * n + b] = 4 * l + b as u8;
            }
        }
        m
    };
    // Lanes 0–3 name the first operand's, 4–7 the second's.
    let shuf = |g: &mut Gen, a: Value, b: Value, lanes: [u8; 4]| -> Value {
        let m = g.b.func.dfg.immediates.push(cranelift::codegen::ir::ConstantData::from(bytes(lanes).as_ref()));
        let ai = g.b.ins().bitcast(types::I8X16, super::vector::little(), a);
        let bi = g.b.ins().bitcast(types::I8X16, super::vector::little(), b);
        let r = g.b.ins().shuffle(ai, bi, m);
        g.b.ins().bitcast(types::F32X4, super::vector::little(), r)
    };
    let [v0, v1, v2, v3] = rows;
    let t0 = shuf(g, v0, v1, [0, 4, 1, 5]);
    let t1 = shuf(g, v2, v3, [0, 4, 1, 5]);
    let t2 = shuf(g, v0, v1, [2, 6, 3, 7]);
    let t3 = shuf(g, v2, v3, [2, 6, 3, 7]);
    [shuf(g, t0, t1, [0, 1, 4, 5]), shuf(g, t0, t1, [2, 3, 6, 7]), shuf(g, t2, t3, [0, 1, 4, 5]), shuf(g, t2, t3, [2, 3, 6, 7])]
}
