//! `tile(frame, b, h, i0, kt, vb, ws, classes)`: one query tile against its live key tiles,
//! in the parts the schedule's tiled plan names (query pack, branch state, key-tile passes,
//! rows, fold, store).

use super::super::gen::{flags, Gen};
use super::*;
use attnc_ir::{BinOp, Expr, Norm};
use cranelift::codegen::ir::FuncRef;
use cranelift::prelude::*;

use crate::schedule::tiled::{Dot, ExpStat, MapDot, SoftmaxPass, DOT, DOT2};
use crate::schedule::workspace::{Cols, TileWorkspace, TASK};
use crate::schedule::TiledSchedule;
use attnc_ir::Branch;

/// The values every part of a `tile` function reads: its arguments, the dims, the tile
/// sizes, the workspace regions and a few constants.
#[derive(Clone, Copy)]
struct TileFrame {
    i0: Value,
    kt: Value,
    vb: Value,
    /// Key 0's value row, the keys' row distance and whether the values are read there
    /// instead of from `vb` ([`Gen::value_rows`]).
    values: Option<(Value, Value, Value)>,
    /// Key 0's row of the key factor, the keys' row distance and whether `qk` reads the
    /// keys there instead of from the packed panel ([`Gen::direct_keys`]).
    keys: Option<(Value, Value, Value)>,
    classes: Value,
    ni: Value,
    mj: Value,
    ev: Value,
    dlen: Value,
    nq: Value,
    bqv: Value,
    bkv: Value,
    ntiles: Value,
    bq_dv: Value,
    a_ws: Value,
    s_ws: Value,
    o_ws: Value,
    out_ws: Value,
    m_ws: Value,
    l_ws: Value,
    corr_ws: Value,
    live_ws: Value,
    blive_ws: Value,
    tmax_ws: Value,
    a2_ws: Value,
    s2_ws: Value,
    kstat_ws: Value,
    zero: Value,
    zf: Value,
    one_f: Value,
    ninf: Value,
    bk: i64,
}

/// One pass of one branch over its live key tiles (see `SoftmaxPass`).
#[derive(Clone, Copy)]
struct PassFrame<'a> {
    bn: usize,
    br: &'a Branch,
    score_rest: &'a Expr,
    post: &'a Option<Expr>,
    softmax: bool,
    linear_eps: Option<f64>,
    plain_scores: bool,
    accumulate: bool,
    two_pass_second: bool,
    helper: Option<FuncRef>,
    weights: Option<FuncRef>,
    qk: FuncRef,
    pv: FuncRef,
    softmax_mk: Option<SoftmaxKernels<FuncRef>>,
    iota: Value,
    /// The branch's key panel (its dot's), and whether its packed queries carry `log2 e`.
    panel: Option<usize>,
    folds_log2e: bool,
    /// Where a two-pass softmax over plain scores keeps its first pass's weights.
    kept: Option<Kept>,
    /// The normalization map's own dot (into `S2`).
    map_dot: Option<&'a MapDot>,
    /// The map's `exp(s − t)`, and whether the microkernel computes it on the tile (else
    /// the rows do, from the base-2 scores).
    exp_stat: Option<&'a ExpStat>,
    exp_in_tile: bool,
    /// A capped score's `c · log2 e` as f32 bits, when the microkernel caps the tile's dot
    /// products in place (the scores are then plain, see `SoftmaxPlan::tanh_cap`).
    capped: Option<i64>,
}

/// The kept first-pass weights of a two-pass softmax (`BoundTiled::keep_weights`), after the
/// task's workspace: `on` (the host made room), the weights `kw[tile][row][key]` and the
/// row maximum they are relative to, `km[tile][row]`.
#[derive(Clone, Copy)]
struct Kept {
    on: Value,
    kw: Value,
    km: Value,
}

impl Gen<'_, '_> {
    /// The addresses of the task workspace's regions, in [`TASK`]'s order, for a tile of
    /// `bq × bk` with `dlen` channels and `ev` values; and the size of a `Values` region
    /// (`bq · ev`, which the fills reuse). Each column kind's size is generated once.
    pub(super) fn workspace(&mut self, ws: Value, w: &TileWorkspace, dlen: Value, ev: Value) -> ([Value; TASK.len()], Value, Value) {
        let (bq, bk) = (w.block_q as i64, w.block_k as i64);
        let mut sizes: Vec<(Cols, Value)> = Vec::new();
        let mut at = [ws; TASK.len()];
        let mut ptr = ws;
        for (n, region) in TASK.iter().enumerate() {
            at[n] = ptr;
            // The regions of a normalization map's dot, when the kernel has none, hold nothing.
            if w.rows(region.rows, 0) == 0 {
                continue;
            }
            let size = match sizes.iter().find(|(c, _)| *c == region.cols) {
                Some((_, v)) => *v,
                None => {
                    let v = match region.cols {
                        Cols::Channels => self.b.ins().imul_imm_s(dlen, bq),
                        Cols::Keys => self.iconst(bq * bk),
                        Cols::Values => self.b.ins().imul_imm_s(ev, bq),
                        Cols::One => self.iconst(bq),
                        Cols::Stage => self.iconst(bq * crate::schedule::workspace::STAGE_CHANNELS as i64),
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
        (at, values, ptr)
    }

    /// Body of `tile(frame, b, h, i0, kt, vb, ws, classes)`. `mm` holds the tile matmuls
    /// `(qk, pv)` and, with the microkernel, its softmax helpers (used as the schedule's
    /// softmax plan allows).
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
        let dlen = match plan.channels_all() {
            Some(d) => self.expr(&d),
            None => self.iconst(0),
        };
        let rest = self.b.ins().isub(ni, i0);
        let bqv = self.iconst(bq);
        let nq = self.b.ins().smin(rest, bqv);
        let bkv = self.iconst(bk);
        let t = self.b.ins().iadd_imm_s(mj, bk - 1);
        let (ntiles, _) = self.floor_div(t, bkv);
        // The task workspace (`schedule::workspace::TASK`): A, S, O, OUT, then the row state.
        let (regions, bq_dv, end) = self.workspace(ws, &ts.workspace, dlen, ev);
        use crate::schedule::workspace::task;
        let [a_ws, s_ws, o_ws, out_ws, m_ws, l_ws, corr_ws, live_ws, blive_ws, tmax_ws, a2_ws, s2_ws, kstat_ws] =
            [task::A, task::S, task::O, task::OUT, task::M, task::L, task::CORR, task::LIVE, task::BLIVE, task::TMAX, task::A2, task::S2, task::KSTAT]
                .map(|r| regions[r]);
        let zero = self.iconst(0);
        let zf = self.fconst(0.0);
        let one_f = self.fconst(1.0);
        let ninf = self.fconst(f32::NEG_INFINITY);
        // Values read in place where `pack` left them (see `value_rows`), and keys where a
        // few query rows read them in place (`direct_keys`).
        let values = self.value_rows(mj, ev);
        let keys = self.direct_keys(plan, mj);
        let f = TileFrame {
            values,
            keys,
            i0,
            kt,
            vb,
            classes,
            ni,
            mj,
            ev,
            dlen,
            nq,
            bqv,
            bkv,
            ntiles,
            bq_dv,
            a_ws,
            s_ws,
            o_ws,
            out_ws,
            m_ws,
            l_ws,
            corr_ws,
            live_ws,
            blive_ws,
            tmax_ws,
            a2_ws,
            s2_ws,
            kstat_ws,
            zero,
            zf,
            one_f,
            ninf,
            bk,
        };
        // One branch, no gate and output rows along `e`: the branch folds straight into the
        // output when its rows are contiguous (no OUT to clear, add to and copy out).
        let direct = k.branches.len() == 1 && k.gate.is_none() && attnc_ir::analysis::output_rows_along(k, "e");

        let iota = self.iota4();
        // Room for the kept weights follows the workspace.
        let kept = match self.kept {
            Some((frame, slot)) if ts.plan.two_pass_plain() && softmax_mk.is_some() => {
                let flag = self.b.ins().load(types::I64, flags(), frame, (slot * 8) as i32);
                let on = self.b.ins().icmp_imm_s(IntCC::NotEqual, flag, 0);
                let kw = end;
                let span = self.b.ins().imul_imm_s(ntiles, bq * bk);
                let km = self.ptr_off(kw, span);
                Some(Kept { on, kw, km })
            }
            _ => None,
        };

        let dot_var = Expr::var(DOT);
        for (bn, (br, bp)) in k.branches.iter().zip(&plan.branches).enumerate() {
            // A capped score with the microkernel: the tile's dot products capped in place
            // (`c · log2 e · tanh`), after which the score is the plain base-2 logit.
            let capped = bp
                .softmax
                .as_ref()
                .and_then(|s| s.tanh_cap)
                .filter(|_| softmax_mk.is_some_and(|m| m.tanh_scale.is_some()))
                .map(|c| ((c * std::f64::consts::LOG2_E) as f32).to_bits() as i64);
            let score_rest = if capped.is_some() { &dot_var } else { &bp.rest };
            // The score is the bare dot in base 2, no bias (see `SoftmaxPlan::plain`).
            let plain_scores = bp.softmax.as_ref().is_some_and(|s| s.plain) || capped.is_some();
            let (softmax, sink, post) = match &br.norm {
                Norm::Softmax { sink, post } => (true, sink.clone(), post.clone()),
                _ => (false, None, None),
            };
            let linear_eps = match &br.norm {
                Norm::Linear { eps } => Some(eps.0),
                _ => None,
            };

            // The branch's queries A (its dot's query factor, its row factor folded; zero
            // rows past the end), and its state.
            let padded = |d: &Dot| plan.channels_all().as_ref() != Some(&d.len);
            // A map's `exp(s − t)` runs in base 2 as a softmax does.
            let exp_stat = bp.exp_stat.as_ref();
            let packs_log2e = bp.log2e_folded() || exp_stat.is_some();
            if let Some(dot) = &bp.dot {
                self.pack_queries(dot, bp.fold.as_ref(), packs_log2e, f.a_ws, padded(dot), &f);
            }
            // The scores the rows read are in base 2 already.
            let folds_log2e = packs_log2e || capped.is_some();
            // A normalization map's dot: its query features into A2.
            if let Some(md) = &bp.map_dot {
                self.pack_queries(&md.dot, None, false, f.a2_ws, padded(&md.dot), &f);
            }
            self.branch_state(&f, &sink);
            if let Some(es) = exp_stat.filter(|e| !e.per_key) {
                self.row_stats(&f, &es.stat);
            }
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
                let p = PassFrame {
                    bn,
                    br,
                    score_rest,
                    post: &post,
                    softmax,
                    linear_eps,
                    plain_scores,
                    accumulate,
                    two_pass_second,
                    helper,
                    weights,
                    qk,
                    pv,
                    softmax_mk,
                    iota,
                    panel: bp.panel,
                    folds_log2e,
                    kept: kept.filter(|_| plain_scores && passes.len() == 2),
                    map_dot: bp.map_dot.as_ref(),
                    exp_stat,
                    exp_in_tile: softmax_mk.is_some(),
                    capped,
                };
                self.key_tiles(&f, &p);
            }
            // Fold the branch into OUT (cleared before the first): O · weight / denominator,
            // for live rows; or, `direct`, into the output rows.
            let mut through_out = |g: &mut Self| {
                if bn == 0 {
                    g.zero_fill(out_ws, bq_dv);
                    g.zero_fill(live_ws, bqv);
                }
                g.fold_branch(&f, bn, br, softmax, &post, linear_eps, false);
                if direct {
                    g.store_tile(&f);
                }
            };
            if direct {
                let out = self.tens[&k.output().name].clone();
                let unit = self.b.ins().icmp_imm_s(IntCC::Equal, out.stride[k.out.len() - 1], 1);
                self.if_else(unit, &mut |g| g.fold_branch(&f, bn, br, softmax, &post, linear_eps, true), &mut through_out);
            } else {
                through_out(self);
            }
        }
        // Gate and store: f32x4 stores when the output rows are contiguous along `e` and
        // there is no gate, else element by element.
        if !direct {
            self.store_tile(&f);
        }
        self.unbind(2);
        self.b.ins().return_(&[]);
    }

    /// Packs the query tile's features `A` of a branch's dot (the folded row factor applied,
    /// and `log2 e` when `folds_log2e`), zero rows past the end.
    #[allow(clippy::too_many_arguments)]
    fn pack_queries(&mut self, dot: &Dot, fold: Option<&Expr>, folds_log2e: bool, a_ws: Value, padded: bool, f: &TileFrame) {
        let TileFrame { i0, ni, dlen, nq, bqv, zero, zf, .. } = *f;
        // The dot's own channels, when the tile has more (`padded`: `TiledPlan::channels_all`
        // is another count).
        let own = if padded { self.expr(&dot.len) } else { dlen };
        {
            self.for_range(zero, bqv, &mut |g, r| {
                let inside = g.b.ins().icmp(IntCC::SignedLessThan, r, nq);
                let i = g.b.ins().iadd(i0, r);
                let il = g.b.ins().iadd_imm_s(ni, -1);
                let i = g.b.ins().smin(i, il);
                g.bind("i", i);
                let row = g.b.ins().imul(r, dlen);
                // The folded row factor (and log2 e for a softmax), once per row.
                let factor = fold.map(|f| {
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
                    g.for_range(z, own, &mut |g, x| {
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
                match g.contiguous_row(&dot.a, &dot.r, own) {
                    Some((src, ok)) => {
                        let fast = g.b.ins().band(ok, inside);
                        g.if_else(fast, &mut |g| g.copy_row(src, own, factor, &mut |g, x, v| g.store_row(a_ws, row, x, v)), &mut generic);
                    }
                    None => generic(g),
                }
                // A dot shorter than the tile's channels: zeros after its own.
                if padded {
                    g.for_range(own, dlen, &mut |g, x| {
                        let off = g.b.ins().iadd(row, x);
                        g.store_f32(a_ws, off, zf);
                    });
                }
                g.unbind(1);
            });
        }
    }

    /// Clears a branch's accumulator and sets each row's state (the sink logit, if any).
    fn branch_state(&mut self, f: &TileFrame, sink: &Option<Expr>) {
        let TileFrame { i0, ni, bqv, bq_dv, o_ws, m_ws, l_ws, blive_ws, zero, zf, ninf, .. } = *f;
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
    }

    /// A map's statistic `t` in base 2 at `var = first + n` for `n < count` (clamped below
    /// `limit`: rows or keys past the end read the last) into `dst[n]`, and 1 into `ones[n]`
    /// when given.
    #[allow(clippy::too_many_arguments)]
    fn stats_base2(&mut self, stat: &Expr, var: &str, first: Value, count: Value, limit: Value, dst: Value, ones: Option<Value>) {
        let (zero, one_f) = (self.iconst(0), self.fconst(1.0));
        self.for_range(zero, count, &mut |g, n| {
            let x = g.b.ins().iadd(first, n);
            let last = g.b.ins().iadd_imm_s(limit, -1);
            let x = g.b.ins().smin(x, last);
            g.bind(var, x);
            let t = g.expr(stat);
            g.unbind(1);
            let l2e = g.fconst(std::f32::consts::LOG2_E);
            let t = g.b.ins().fmul(t, l2e);
            g.store_f32(dst, n, t);
            if let Some(o) = ones {
                g.store_f32(o, n, one_f);
            }
        });
    }

    /// A map's per-row statistic into `m` and 1 into `corr`: the second-pass weights routine
    /// then computes `2^(s − t·log2 e)`.
    fn row_stats(&mut self, f: &TileFrame, stat: &Expr) {
        self.stats_base2(stat, "i", f.i0, f.bqv, f.ni, f.m_ws, Some(f.corr_ws));
    }

    /// A map's per-key statistic of key tile `j0` into `kstat`.
    fn key_stats(&mut self, f: &TileFrame, stat: &Expr, j0: Value) {
        self.stats_base2(stat, "j", j0, f.bkv, f.mj, f.kstat_ws, None);
    }

    /// One pass over the live key tiles: the scores' matmul, the rows, the softmax step and `P·V`.
    fn key_tiles(&mut self, f: &TileFrame, p: &PassFrame) {
        let TileFrame {
            kt, vb, classes, mj, ev, dlen, nq, bqv, bkv, ntiles, a_ws, s_ws, o_ws, m_ws, l_ws, corr_ws, blive_ws, tmax_ws, zero, one_f, bk, ..
        } = *f;
        let PassFrame {
            bn,
            softmax,
            plain_scores,
            accumulate,
            two_pass_second,
            helper,
            weights,
            qk,
            pv,
            softmax_mk,
            iota,
            panel,
            kept,
            map_dot,
            exp_stat,
            capped,
            ..
        } = *p;
        let (a2_ws, s2_ws) = (f.a2_ws, f.s2_ws);
        if weights.is_some() {
            self.for_range(zero, bqv, &mut |g, r| {
                let l = g.load_f32(l_ws, r);
                let inv = g.b.ins().fdiv(one_f, l);
                g.store_f32(corr_ws, r, inv);
            });
        }
        let class_base = self.b.ins().imul_imm_s(ntiles, bn as i64);
        let row = self.b.ins().iadd(classes, class_base);
        self.for_tiles_skipping_empty(row, ntiles, &mut |g, kb| {
            let caddr = g.b.ins().iadd(row, kb);
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
                // A full tile (generated only where read: by the second-pass weights and the
                // kept weights).
                let full = if weights.is_some() || kept.is_some() { g.b.ins().bxor_imm_u(check, 1) } else { check };
                // The second pass over a full tile whose first-pass weights were kept rescales
                // them (`2^(m_tile − m) / l` per row) instead of computing the scores again.
                let restore = kept.filter(|_| two_pass_second && weights.is_some()).map(|k| (k, g.b.ins().band(k.on, full)));
                // The first of two passes computes a full tile's scores, then its weights, in
                // the kept region's slot of the tile (kept with the maxima after the step).
                let keep = kept.filter(|_| !accumulate && helper.is_some()).map(|k| (k, g.b.ins().band(k.on, full)));
                let s_tile = match keep {
                    Some((k, keep)) => {
                        let off = g.b.ins().imul(kb, bqv);
                        let off = g.b.ins().imul_imm_s(off, bk);
                        let slot = g.ptr_off(k.kw, off);
                        g.b.ins().select(keep, slot, s_ws)
                    }
                    None => s_ws,
                };
                let mut scores = |g: &mut Self| {
                    if let Some(pn) = panel {
                        // Key tile kb of panel pn: the panels hold ntiles tiles of BK × D each.
                        let t = match pn {
                            0 => kb,
                            _ => {
                                let before = g.b.ins().imul_imm_s(ntiles, pn as i64);
                                g.b.ins().iadd(before, kb)
                            }
                        };
                        let off = g.b.ins().imul(t, dlen);
                        let off = g.b.ins().imul_imm_s(off, bk);
                        let ktp = g.ptr_off(kt, off);
                        // `Q·Kᵀ` into `s`, with the row maxima into `tmax` when given: from the
                        // packed panel, or from the key rows in place for a few query rows.
                        let product = |g: &mut Self, s: Value, tmax: Option<Value>| {
                            let mut packed = |g: &mut Self| {
                                match (tmax, softmax_mk) {
                                    (Some(m), Some(mk)) => g.b.ins().call(mk.qk_max, &[a_ws, dlen, ktp, s, nq, dlen, bkv, m]),
                                    _ => g.b.ins().call(qk, &[a_ws, dlen, ktp, s, nq, dlen, bkv]),
                                };
                            };
                            match (f.keys, softmax_mk.and_then(|m| m.qk_direct)) {
                                (Some((k0, ldk, direct)), Some(qd)) => g.if_else(
                                    direct,
                                    &mut |g| {
                                        let off = g.b.ins().imul(j0, ldk);
                                        let kp = g.ptr_off(k0, off);
                                        let m = tmax.unwrap_or_else(|| g.iconst(0));
                                        g.b.ins().call(qd, &[a_ws, dlen, kp, ldk, s, bkv, nq, dlen, nk, m]);
                                    },
                                    &mut packed,
                                ),
                                _ => packed(g),
                            }
                        };
                        match softmax_mk.filter(|_| plain) {
                            // Capped scores: the dot products, then the cap on the whole tile
                            // (the step finds the row maxima).
                            Some(SoftmaxKernels { tanh_scale: Some(cap), .. }) if capped.is_some() => {
                                product(g, s_ws, None);
                                let c = g.iconst(capped.expect("capped"));
                                g.b.ins().call(cap, &[s_ws, bkv, nq, bkv, c]);
                            }
                            // A full tile of plain dot products: the row maxima come with the scores.
                            Some(_) => g.if_else(check, &mut |g| product(g, s_ws, None), &mut |g| product(g, s_tile, Some(tmax_ws))),
                            None => product(g, s_ws, None),
                        }
                    }
                    if let Some(w) = weights {
                        g.if_then(full, &mut |g| {
                            g.b.ins().call(w, &[s_ws, bkv, nq, bkv, m_ws, corr_ws]);
                        });
                    }
                };
                match restore {
                    Some((k, from_kept)) => g.if_else(from_kept, &mut |g| g.restore_weights(f, k, kb), &mut scores),
                    None => scores(g),
                }
                // The normalization map's dot: its panel against the packed A2.
                if let Some(md) = map_dot {
                    let before = g.b.ins().imul_imm_s(ntiles, md.panel as i64);
                    let t = g.b.ins().iadd(before, kb);
                    let off = g.b.ins().imul(t, dlen);
                    let off = g.b.ins().imul_imm_s(off, bk);
                    let ktp = g.ptr_off(kt, off);
                    g.b.ins().call(qk, &[a2_ws, dlen, ktp, s2_ws, nq, dlen, bkv]);
                }
                // A map's exp(s − t): the tile's weights in place, by the microkernel.
                if let (Some(es), Some(mk)) = (exp_stat, softmax_mk) {
                    if es.per_key {
                        g.key_stats(f, &es.stat, j0);
                        let exp_cols = mk.exp_cols.expect("the schedule's key_stat imports exp_cols");
                        g.b.ins().call(exp_cols, &[s_ws, bkv, nq, bkv, f.kstat_ws]);
                    } else {
                        g.b.ins().call(mk.weights, &[s_ws, bkv, nq, bkv, m_ws, corr_ws]);
                    }
                }
                let j0v = g.b.ins().ireduce(types::I32, j0);
                let j0v = g.b.ins().splat(types::I32X4, j0v);
                let jbase = g.b.ins().iadd(j0v, iota);
                let mjv = g.b.ins().ireduce(types::I32, mj);
                let mjv = g.b.ins().splat(types::I32X4, mjv);
                // The rows of the tile: scores, mask and the per-row state (none for a `plain` tile).
                let mut rows = |g: &mut Self| g.tile_rows(f, p, check, jbase, mjv);
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
                    let tmax = if plain && capped.is_none() { g.b.ins().select(check, null, tmax_ws) } else { null };
                    g.b.ins().call(step, &[s_tile, bkv, nq, bkv, m_ws, l_ws, corr_ws, tmax]);
                }
                if let Some((k, keep)) = keep {
                    g.if_then(keep, &mut |g| g.keep_maxima(f, k, kb));
                }
                if accumulate {
                    let corr_arg = if softmax && !two_pass_second { corr_ws } else { g.iconst(0) };
                    let packed = vb_tile(g, vb, j0, ev);
                    let (vt, ldv) = match f.values {
                        Some((v0, ldv, in_place)) => {
                            let off = g.b.ins().imul(j0, ldv);
                            let at = g.ptr_off(v0, off);
                            (g.b.ins().select(in_place, at, packed), g.b.ins().select(in_place, ldv, ev))
                        }
                        None => (packed, ev),
                    };
                    g.b.ins().call(pv, &[s_ws, bkv, vt, ldv, o_ws, ev, corr_arg, nq, nk, ev]);
                }
            });
        });
    }

    /// The key-only parts of a tile's row expressions worth computing once per key tile
    /// rather than once per row (`(j // 16 − 4) % 16`, `seg[b, j]`: divisions, selects and
    /// gathers on the lanes): each is evaluated for the tile's `bk` keys (lanes past the
    /// last key read the last, as the rows do) into a stack slot. Returns the slot's address
    /// and each expression with its lane type; [`Self::load_key_invariants`] reads them.
    fn key_invariants(&mut self, exprs: &[&Expr], jbase: Value, mjv: Value, bk: i64) -> KeyInvariants {
        use attnc_ir::analysis::{invariants, Invariant};
        let per_row = ["i".to_string(), DOT.to_string(), DOT2.to_string(), "s".to_string(), "w".to_string()];
        let mut picked: Vec<Expr> = Vec::new();
        for inv in invariants(exprs, &per_row) {
            if let Invariant::Value(e) = inv {
                if self.varying(e, &["j".to_string()]) && worth_keeping(e) && !picked.contains(e) && picked.len() < MAX_KEY_INVARIANTS {
                    picked.push(e.clone());
                }
            }
        }
        if picked.is_empty() {
            return KeyInvariants::default();
        }
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (picked.len() as i64 * bk * 4) as u32, 4));
        let base = self.b.ins().stack_addr(types::I64, slot, 0);
        let tys = std::cell::RefCell::new(vec![types::F32X4; picked.len()]);
        let z = self.iconst(0);
        let nvec = self.iconst(bk / 4);
        self.for_range(z, nvec, &mut |g, cv| {
            let c4 = g.b.ins().imul_imm_s(cv, 4);
            let (_, jcl) = key_lanes(g, jbase, c4, mjv);
            g.bind("j", jcl);
            for (n, e) in picked.iter().enumerate() {
                let v = g.vexpr_f(e, &["j".to_string()]);
                tys.borrow_mut()[n] = g.b.func.dfg.value_type(v);
                let at = g.b.ins().iadd_imm_s(c4, n as i64 * bk);
                let addr = g.ptr_off(base, at);
                g.b.ins().store(flags(), v, addr, 0);
            }
            g.unbind(1);
        });
        KeyInvariants { base: Some(base), bk, exprs: picked.into_iter().zip(tys.into_inner()).collect() }
    }

    /// Makes the key vector at `c4`'s values of the tile's key invariants known to the
    /// vector code (`j` must be bound to that vector's keys).
    fn load_key_invariants(&mut self, k: &KeyInvariants, c4: Value) {
        let Some(base) = k.base else { return };
        for (n, (e, ty)) in k.exprs.iter().enumerate() {
            let at = self.b.ins().iadd_imm_s(c4, n as i64 * k.bk);
            let addr = self.ptr_off(base, at);
            let v = self.b.ins().load(*ty, flags(), addr, 0);
            self.memo_put(e, &[], v, true);
        }
    }

    /// The rows of one key tile: scores, mask and the per-row state (none for a `plain` tile).
    fn tile_rows(&mut self, f: &TileFrame, p: &PassFrame, check: Value, jbase: Value, mjv: Value) {
        let g = self;
        let _k = g.kernel;
        let TileFrame { i0, nq, s_ws, m_ws, l_ws, corr_ws, blive_ws, zf, one_f, ninf, bk, .. } = *f;
        let PassFrame {
            br,
            score_rest,
            post,
            softmax,
            linear_eps,
            plain_scores,
            accumulate,
            two_pass_second,
            helper,
            weights,
            folds_log2e,
            map_dot,
            exp_stat,
            exp_in_tile,
            ..
        } = *p;
        let s2_ws = f.s2_ws;
        let mut row_exprs: Vec<&Expr> = vec![score_rest];
        row_exprs.extend(br.bias.iter());
        row_exprs.extend(br.mask.iter());
        row_exprs.extend(br.decay.iter());
        row_exprs.extend(post.iter());
        match (&br.norm, map_dot, exp_stat) {
            (_, _, Some(es)) => {
                row_exprs.push(&es.rest);
                row_exprs.push(&es.stat);
            }
            (_, Some(md), None) => row_exprs.push(&md.rest),
            (Norm::Map(f), None, None) => row_exprs.push(f),
            _ => {}
        }
        let keyed = g.key_invariants(&row_exprs, jbase, mjv, bk);
        let z = g.iconst(0);
        g.for_range(z, nq, &mut |g, r| {
            let i = g.b.ins().iadd(i0, r);
            g.bind("i", i);
            let hoisted = g.hoist(&row_exprs, &["j".to_string(), DOT.to_string(), DOT2.to_string(), "s".to_string(), "w".to_string()]);
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
                    g.load_key_invariants(&keyed, c4);
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
                        // A map's exp(s − t): the tile holds 2^(s − t·log2 e) when the
                        // microkernel computed it, else it is computed here from the
                        // base-2 score; the map reads it as `s`.
                        let s = match exp_stat {
                            Some(_) if exp_in_tile => s,
                            Some(es) => {
                                let t = g.vexpr_f(&es.stat, &vecs);
                                let t = g.b.ins().fmul(t, l2e);
                                let d = g.b.ins().fsub(s, t);
                                g.vexp2_nonpos(d)
                            }
                            None => s,
                        };
                        let pw = match (&br.norm, map_dot) {
                            (_, Some(md)) => {
                                // The map's own dot, from S2.
                                let addr = g.ptr_off(s2_ws, off);
                                let d2 = g.b.ins().load(types::F32X4, flags(), addr, 0);
                                g.bind(DOT2, d2);
                                g.bind("s", s);
                                let vecs2 = vec!["j".to_string(), DOT.to_string(), DOT2.to_string(), "s".to_string()];
                                let p = g.vexpr_f(exp_stat.map_or(&md.rest, |e| &e.rest), &vecs2);
                                g.unbind(2);
                                p
                            }
                            (Norm::Map(f), None) => {
                                g.bind("s", s);
                                let vecs2 = vec!["j".to_string(), DOT.to_string(), "s".to_string()];
                                let p = g.vexpr_f(exp_stat.map_or(f, |e| &e.rest), &vecs2);
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
                let corr = g.exp2_nonpos(dm);
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
    }

    /// Keeps each row's maximum after a full tile of the first pass (its weights, in the
    /// kept slot, are relative to it).
    fn keep_maxima(&mut self, f: &TileFrame, k: Kept, kb: Value) {
        let TileFrame { nq, m_ws, zero, bqv, .. } = *f;
        let first = self.b.ins().imul(kb, bqv);
        self.for_range(zero, nq, &mut |g, r| {
            let row = g.b.ins().iadd(first, r);
            let m = g.load_f32(m_ws, r);
            g.store_f32(k.km, row, m);
        });
    }

    /// The second pass's weights of a full tile from the kept ones: `w · 2^(m_tile − m) / l`
    /// into `S` (`corr` holds `1 / l`; a row whose maximum was still −inf has weight 0).
    fn restore_weights(&mut self, f: &TileFrame, k: Kept, kb: Value) {
        let TileFrame { nq, s_ws, m_ws, corr_ws, zero, zf, ninf, bk, .. } = *f;
        let bq = f.bqv;
        let first = self.b.ins().imul(kb, bq);
        self.for_range(zero, nq, &mut |g, r| {
            let row = g.b.ins().iadd(first, r);
            let mt = g.load_f32(k.km, row);
            let m = g.load_f32(m_ws, r);
            let d = g.b.ins().fsub(mt, m);
            let e = g.exp2_nonpos(d);
            let inv = g.load_f32(corr_ws, r);
            let factor = g.b.ins().fmul(e, inv);
            let dead = g.b.ins().fcmp(FloatCC::Equal, mt, ninf);
            let factor = g.b.ins().select(dead, zf, factor);
            let src = g.b.ins().imul_imm_s(row, bk);
            let src = g.ptr_off(k.kw, src);
            let dst = g.b.ins().imul_imm_s(r, bk);
            let n = g.iconst(bk);
            g.copy_row(src, n, Some(factor), &mut |g, x, v| g.store_row(s_ws, dst, x, v));
        });
    }

    /// Adds the branch to OUT: O · weight / denominator, for live rows.
    /// `direct`: the kernel's only branch, written into its output rows (contiguous along
    /// `e`; zeros for rows with no live key) instead of added to OUT.
    #[allow(clippy::too_many_arguments)]
    fn fold_branch(&mut self, f: &TileFrame, bn: usize, br: &Branch, softmax: bool, post: &Option<Expr>, linear_eps: Option<f64>, direct: bool) {
        let TileFrame { i0, ev, nq, o_ws, out_ws, m_ws, l_ws, live_ws, blive_ws, zero, zf, one_f, ninf, .. } = *f;
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
            // The saved statistic (`run_with_stats`' contract): the log-sum-exp from the base-2
            // state (`m·ln 2 + ln l`), or the linear denominator; −inf and 0 for a dead row.
            g.save_stat(bn, i, &mut |g| {
                if softmax {
                    let mrow = g.load_f32(m_ws, r);
                    let ln2 = g.fconst(std::f32::consts::LN_2);
                    let m = g.b.ins().fmul(mrow, ln2);
                    let ln = g.call("attnc_logf", &[lrow]);
                    let lse = g.b.ins().fadd(m, ln);
                    g.b.ins().select(live, lse, ninf)
                } else if let Some(eps) = linear_eps {
                    let e = g.fconst(eps as f32);
                    let d = g.b.ins().fadd(lrow, e);
                    g.b.ins().select(live, d, zf)
                } else {
                    zf
                }
            });
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
            if direct {
                let dst = g.output_row();
                g.unbind(1);
                let row = g.b.ins().imul(r, ev);
                let o_row = g.ptr_off(o_ws, row);
                g.if_else(
                    live,
                    &mut |g| {
                        g.for_lanes(ev, &mut |g, e, ty| {
                            let o = g.load_at(o_row, e, ty);
                            let fl = g.lanes_of(factor, ty);
                            let o = g.b.ins().fmul(o, fl);
                            g.store_at(dst, e, o);
                        })
                    },
                    &mut |g| g.zero_fill(dst, ev),
                );
                return;
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

    /// The address of the output row at the bound `b`, `h` and `i` (its element `e = 0`;
    /// the output's rows run along `e`).
    fn output_row(&mut self) -> Value {
        let k = self.kernel;
        let out = self.tens[&k.output().name].clone();
        let mut off = self.iconst(0);
        for (axis, var) in k.out[..k.out.len() - 1].iter().enumerate() {
            let x = self.expr(&Expr::var(var));
            let p = self.b.ins().imul(x, out.stride[axis]);
            off = self.b.ins().iadd(off, p);
        }
        self.ptr_off(out.base, off)
    }

    /// Applies the gate and stores the tile's output rows (zeros for rows with no live key).
    fn store_tile(&mut self, f: &TileFrame) {
        let k = self.kernel;
        let TileFrame { i0, ev, nq, out_ws, live_ws, zf, .. } = *f;
        // there is no gate, else element by element.
        let out = self.tens[&k.output().name].clone();
        let rows_contiguous = k.gate.is_none() && attnc_ir::analysis::output_rows_along(k, "e");
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
                    let dst = g.output_row();
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
    }
}

/// The 4 key indices of the vector at offset `c4` in the tile (`jbase` holds `j0 + lane`),
/// and the same clamped into `[0, M)`: lanes past the last key read key `M - 1` (finite
/// values) and are masked off.
pub(super) fn key_lanes(g: &mut Gen, jbase: Value, c4: Value, mjv: Value) -> (Value, Value) {
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

pub(super) fn vb_tile(g: &mut Gen, vb: Value, j0: Value, ev: Value) -> Value {
    let off = g.b.ins().imul(j0, ev);
    g.ptr_off(vb, off)
}

/// At most this many key-only expressions are kept per key tile.
const MAX_KEY_INVARIANTS: usize = 8;

/// The key-only expressions of a key tile, computed once ([`Gen::key_invariants`]):
/// expression `n` for key vector `c4` is at `base + 4·(n·bk + c4)` bytes.
#[derive(Default)]
struct KeyInvariants {
    base: Option<Value>,
    bk: i64,
    exprs: Vec<(Expr, Type)>,
}

/// Whether a key-only expression costs more on the lanes than a load: what
/// [`costly`](super::super::gen::costly) names (a gather, a reduction, a power), a division or
/// modulo, a select, or three operations or more.
fn worth_keeping(e: &Expr) -> bool {
    let (mut ops, mut dear) = (0, super::super::gen::costly(e));
    e.walk(&mut |x| match x {
        Expr::Select(..) | Expr::Binary(BinOp::FloorDiv | BinOp::Mod | BinOp::Div, ..) => dear = true,
        Expr::Unary(..) | Expr::Binary(..) => ops += 1,
        _ => {}
    });
    dear || ops >= 3
}
