//! The tensor-core tiled kernel (`attend_tc`): the schedule's tiled form of a single-branch
//! softmax spec whose queries, keys and values are bf16 (or f16) tensors, on
//! `mma.sync.aligned.m16n8k16` with f32 accumulation.
//!
//! A CTA of [`WARPS`] warps takes `(b, h)`, [`BLOCK_Q`] query rows (16 per warp) and
//! [`VALUES`] output channels. The query tile is staged once through shared memory with
//! `cp.async` and kept in registers as `ldmatrix` A fragments (up to [`MAX_CHANNELS`]
//! channels, 16 per k-step). Key and value tiles of `block_k` keys are double-buffered in
//! shared memory: the tile after the current one is in flight (`cp.async.cg`, rows past
//! the last key and channels past the last zero-filled) while the current one is used.
//! Per tile: `S = Q·Kᵀ` (K fragments by `ldmatrix`), the score's other terms, bias and mask
//! per element of the accumulators (keys past the last are masked), an online softmax in
//! base 2 (`ex2.approx`, the row maximum and sum over the four lanes of a row by
//! `shfl.sync.bfly`, `max.NaN` so NaN propagates), then `O = O·corr + P·V` with P packed
//! from two accumulator tiles into one A fragment (`cvt.rn.bf16x2.f32`) and V's B fragments
//! by `ldmatrix.trans`. Rows padded to `MAX_CHANNELS + 8` halves keep `ldmatrix` free of
//! bank conflicts. A row with no live key (or all at −inf) gives zeros; a sink logit joins
//! the denominator at the end; the gate multiplies at the store. With a mask, the walk
//! reads the schedule's tile classes for its query tile (a byte per key tile, after the
//! inputs): empty tiles are never loaded nor computed, full ones skip the mask.
//!
//! Precision: the products of bf16 inputs are exact and accumulate in f32; P is rounded to
//! the inputs' half type before `P·V` (relative 2^-9 for bf16, 2^-11 for f16), so the
//! output is within [`tolerance`] of the reference. An f32 spec takes this kernel only when
//! asked (`PtxOptions::precision`, its inputs rounded on the device: [`lowered_tolerance`]).
//! Specs that do not fit (several branches, another normalization, a post-map or decay, a
//! computed query, key or value) run the exact f32 row kernel; so does a call whose dot has
//! more than [`MAX_CHANNELS`] channels or channel counts that are not multiples of 8
//! (16-byte rows for `cp.async`).

use super::emit::{flit, Func, RegTy};
use crate::host::ArgLayout;
use crate::schedule::TiledSchedule;
use crate::{CodegenError, Tolerance};
use attnc_ir::{DType, Expr, Kernel, Norm, TensorKind};
use attnc_passes::separable::{extract, DOT};

/// Warps per CTA, each 16 query rows.
pub const WARPS: usize = 4;
/// Query rows per CTA.
pub const BLOCK_Q: usize = 16 * WARPS;
/// The most channels the dot may have (Q fragments in registers: 8 k-steps).
pub const MAX_CHANNELS: usize = 128;
/// Output channels per CTA (wider values take several CTAs per query tile).
pub const VALUES: usize = 128;
/// Bytes of one staged row: `MAX_CHANNELS` halves and 16 bytes of padding.
const ROW: usize = (MAX_CHANNELS + 8) * 2;
/// Static shared memory a CTA may declare.
const SHARED_LIMIT: usize = 48 << 10;

/// The error bound the tensor-core kernel meets against the f64 reference, for inputs in
/// the examples' ranges (values within ±1): P rounded to bf16 moves each weight by at most
/// 2^-9 of itself, the output by at most 2^-9 of `Σ p|v|`; `ex2.approx` adds 2^-22.
pub fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F16 => Tolerance { atol: 2e-3, rtol: 5e-3 },
        _ => Tolerance { atol: 8e-3, rtol: 1e-2 },
    }
}

/// The bound an f32 spec meets when its queries, keys and values are rounded to `dtype` on
/// the device (`PtxOptions::precision`). Rounding q and k moves each logit by up to 2^-8
/// (bf16; 2^-11 for f16) of `Σ_c |q_c·k_c|`, and a weight by as much relatively: the error
/// grows with the logits' scale, so this bound is the one measured on the examples' inputs
/// (logits of a few units, values within ±3: at most 2.8e-2 for bf16, 1.9e-3 for f16, on
/// T5's unscaled dot), with a margin; larger logits move further.
pub fn lowered_tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F16 => Tolerance { atol: 5e-3, rtol: 1e-2 },
        _ => Tolerance { atol: 8e-2, rtol: 5e-2 },
    }
}

/// A load `t[…, var]` whose last index is the channel variable.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    pub tensor: String,
    pub idx: Vec<Expr>,
}

/// What the tensor-core kernel needs of a spec.
#[derive(Clone, Debug, PartialEq)]
pub struct TcPlan {
    pub dtype: DType,
    pub q: Rows,
    pub k: Rows,
    pub v: Rows,
    /// The dot's channel variable and count.
    pub r: String,
    pub len: Expr,
    /// The score with the dot as the variable [`DOT`].
    pub rest: Expr,
    pub block_k: usize,
    /// The mask's tile classes are read (empty key tiles skipped): always with a mask.
    pub classes: bool,
}

/// `t[…, ch]` with `ch` only in the last index and the other indices free of `not`.
fn rows(k: &Kernel, e: &Expr, ch: &str, not: &[&str]) -> Result<Rows, String> {
    let Expr::Load(t, idx) = e else { return Err(format!("`{}` is computed, not a tensor's row", e)) };
    let decl = k.tensor(t).ok_or("unknown tensor")?;
    if decl.kind != TensorKind::Input || !matches!(decl.dtype, DType::BF16 | DType::F16) {
        return Err(format!("`{t}` is not a bf16 or f16 input"));
    }
    let (last, rest) = idx.split_last().ok_or("a scalar")?;
    if *last != Expr::var(ch) {
        return Err(format!("`{t}`'s last index is not the channel `{ch}`"));
    }
    for x in rest {
        let fv = x.free_vars();
        if fv.contains(ch) || not.iter().any(|v| fv.contains(*v)) {
            return Err(format!("an index of `{t}` depends on {}", if fv.contains(ch) { ch } else { "the other side" }));
        }
    }
    Ok(Rows { tensor: t.clone(), idx: idx.clone() })
}

impl TcPlan {
    /// The plan, or why the spec runs the row kernel instead.
    pub fn new(k: &Kernel, ts: &TiledSchedule) -> Result<TcPlan, String> {
        let [br] = k.branches.as_slice() else { return Err("several branches".into()) };
        match &br.norm {
            Norm::Softmax { post: None, .. } => {}
            Norm::Softmax { .. } => return Err("a post-softmax map".into()),
            _ => return Err("not a softmax".into()),
        }
        if br.decay.is_some() || br.weight.is_some() {
            return Err("a decay or branch weight".into());
        }
        let mut found = None;
        let rest = extract(&br.score, &mut found);
        let dot = found.ok_or("no separable dot in the score")?;
        let q = rows(k, &dot.a, &dot.r, &["j"])?;
        let kk = rows(k, &dot.b, &dot.r, &["i"])?;
        let v = rows(k, &k.value, "e", &["i"])?;
        let dtype = k.tensor(&q.tensor).expect("an input").dtype;
        if [&kk, &v].iter().any(|x| k.tensor(&x.tensor).expect("an input").dtype != dtype) {
            return Err("queries, keys and values of different types".into());
        }
        // Two stages of key and value tiles in the static shared memory.
        let fit = (SHARED_LIMIT / (4 * ROW)) / 16 * 16;
        let block_k = ts.block_k.min(fit).max(16) / 16 * 16;
        Ok(TcPlan { dtype, q, k: kk, v, r: dot.r, len: dot.len, rest, block_k, classes: br.mask.is_some() })
    }

    /// Shared bytes per CTA: two stages of a key and a value tile.
    pub fn shared_bytes(&self) -> usize {
        4 * self.block_k * ROW
    }

    fn half(&self) -> &'static str {
        if self.dtype == DType::F16 {
            "f16"
        } else {
            "bf16"
        }
    }
}

/// `cp.async` of `nrows` rows of `src` (`row_var` = `row0 + n`, the channel variable
/// `ch0 + 8c`) into shared rows at `dst`: thread `t` copies chunk `t % 16` of rows
/// `t / 16 + 8u`. Chunks `≥ write` are not copied (never read); rows `≥ rows_live` and
/// chunks `≥ live` are zero-filled.
#[allow(clippy::too_many_arguments)]
fn stage(
    f: &mut Func,
    src: &Rows,
    row_var: &str,
    ch_var: &str,
    row0: &str,
    nrows: usize,
    rows_live: &str,
    ch0: &str,
    live: &str,
    write: &str,
    dst: &str,
    tid: &str,
) -> Result<(), CodegenError> {
    let threads = 32 * WARPS;
    let (c, r) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("and.b32 {c}, {tid}, 15;"));
    f.ins(&format!("shr.u32 {r}, {tid}, 4;"));
    let skip = f.label();
    let w = f.reg(RegTy::Pred);
    f.ins(&format!("setp.ge.s32 {w}, {c}, {write};"));
    f.ins(&format!("@{w} bra {skip};"));
    let ch = f.reg(RegTy::S32);
    f.ins(&format!("mad.lo.s32 {ch}, {c}, 8, {ch0};"));
    let chunk_live = f.reg(RegTy::Pred);
    f.ins(&format!("setp.lt.s32 {chunk_live}, {c}, {live};"));
    // A chunk past the last channel reads nothing, but its address stays an aligned one:
    // the row's first chunk.
    f.ins(&format!("selp.s32 {ch}, {ch}, {ch0}, {chunk_live};"));
    for u in 0..nrows * 16 / threads {
        let row = f.reg(RegTy::S32);
        f.ins(&format!("add.s32 {row}, {r}, {};", u * threads / 16));
        let at = f.reg(RegTy::S32);
        f.ins(&format!("add.s32 {at}, {row}, {row0};"));
        f.bind(row_var, &at);
        f.bind(ch_var, &ch);
        let idx = src.idx.iter().map(|x| f.expr(x)).collect::<Result<Vec<_>, _>>()?;
        f.unbind(2);
        let off = f.offset(&src.tensor, &idx);
        let a = f.address(&src.tensor, &off);
        let ok = f.reg(RegTy::Pred);
        f.ins(&format!("setp.lt.s32 {ok}, {at}, {rows_live};"));
        f.ins(&format!("and.pred {ok}, {ok}, {chunk_live};"));
        let n = f.reg(RegTy::S32);
        f.ins(&format!("selp.s32 {n}, 16, 0, {ok};"));
        let d = f.reg(RegTy::S32);
        f.ins(&format!("mad.lo.s32 {d}, {row}, {ROW}, {dst};"));
        f.ins(&format!("mad.lo.s32 {d}, {c}, 16, {d};"));
        f.ins(&format!("cp.async.cg.shared.global [{d}], [{a}], 16, {n};"));
    }
    f.place(&skip);
    Ok(())
}

/// `d = a·b + d` for one m16n8k16 tile.
fn mma(f: &mut Func, half: &str, d: &[String], a: &[String], b: &[String]) {
    f.ins(&format!(
        "mma.sync.aligned.m16n8k16.row.col.f32.{half}.{half}.f32 {{{}}}, {{{}}}, {{{}}}, {{{}}};",
        d.join(", "),
        a.join(", "),
        b.join(", "),
        d.join(", ")
    ));
}

/// `x = op(x, shfl.bfly(x, 1))`, then with lane 2: the four lanes of a row agree.
fn quad(f: &mut Func, x: &str, op: &str) {
    for lane in [1, 2] {
        let t = f.reg(RegTy::F32);
        f.ins(&format!("shfl.sync.bfly.b32 {t}, {x}, {lane}, 31, -1;"));
        f.ins(&format!("{op} {x}, {x}, {t};"));
    }
}

/// The class byte of key tile `t` (`at`: the address of this query tile's row of classes).
fn tile_class(f: &mut Func, at: &str, t: &str) -> String {
    let (w, a, c) = (f.reg(RegTy::U64), f.reg(RegTy::U64), f.reg(RegTy::S32));
    f.ins(&format!("cvt.s64.s32 {w}, {t};"));
    f.ins(&format!("add.s64 {a}, {at}, {w};"));
    f.ins(&format!("ld.global.u8 {c}, [{a}];"));
    c
}

/// Row `r`'s output accumulators (elements `2r`, `2r + 1` of every tile) times `corr`.
fn rescale(f: &mut Func, o: &[Vec<String>], r: usize, corr: &str) {
    for acc in o {
        for x in &acc[2 * r..2 * r + 2] {
            f.ins(&format!("mul.rn.f32 {x}, {x}, {corr};"));
        }
    }
}

/// Four fresh registers of type `t`.
fn four(f: &mut Func, t: RegTy) -> Vec<String> {
    (0..4).map(|_| f.reg(t)).collect()
}

/// `attend_tc`: the tensor-core tiled kernel of `p`.
pub fn attend(k: &Kernel, layout: &ArgLayout, p: &TcPlan) -> Result<String, CodegenError> {
    let mut f = Func::new(k, layout, "attend_tc");
    let br = &k.branches[0];
    let bk = p.block_k;
    let half = p.half();
    let smem = f.shared_array("tiles", p.shared_bytes());
    let [nb, nh, ni, nj, ne] = [&k.iter.b, &k.iter.h, &k.iter.i, &k.iter.j, &k.iter.e].map(|x| x.to_expr());
    let (_nb, nh, ni, nj, ne) = (f.expr(&nb)?, f.expr(&nh)?, f.expr(&ni)?, f.expr(&nj)?, f.expr(&ne)?);
    let d = f.expr(&p.len)?;
    // CTA → (b, h, query tile, value slice), the slice fastest.
    let (qtiles, slices) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("add.s32 {qtiles}, {ni}, {};", BLOCK_Q - 1));
    f.ins(&format!("div.s32 {qtiles}, {qtiles}, {BLOCK_Q};"));
    f.ins(&format!("add.s32 {slices}, {ne}, {};", VALUES - 1));
    f.ins(&format!("div.s32 {slices}, {slices}, {VALUES};"));
    let cta = f.reg(RegTy::S32);
    f.ins(&format!("mov.u32 {cta}, %ctaid.x;"));
    let [slice, qt, h, b, t] = [0; 5].map(|_| f.reg(RegTy::S32));
    f.ins(&format!("rem.s32 {slice}, {cta}, {slices};"));
    f.ins(&format!("div.s32 {t}, {cta}, {slices};"));
    f.ins(&format!("rem.s32 {qt}, {t}, {qtiles};"));
    f.ins(&format!("div.s32 {t}, {t}, {qtiles};"));
    f.ins(&format!("rem.s32 {h}, {t}, {nh};"));
    f.ins(&format!("div.s32 {b}, {t}, {nh};"));
    f.bind("b", &b);
    f.bind("h", &h);
    let [tid, warp, lane, g, q2] = [0; 5].map(|_| f.reg(RegTy::S32));
    f.ins(&format!("mov.u32 {tid}, %tid.x;"));
    f.ins(&format!("shr.u32 {warp}, {tid}, 5;"));
    f.ins(&format!("and.b32 {lane}, {tid}, 31;"));
    f.ins(&format!("shr.u32 {g}, {lane}, 2;"));
    f.ins(&format!("and.b32 {q2}, {lane}, 3;"));
    f.ins(&format!("shl.b32 {q2}, {q2}, 1;"));
    let (i0, e0) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("mul.lo.s32 {i0}, {qt}, {BLOCK_Q};"));
    f.ins(&format!("mul.lo.s32 {e0}, {slice}, {VALUES};"));
    // k-steps of 16 channels; the value channels of this slice, 16 at a time.
    let [ksteps, kchunks, kwrite, width, vsteps, vchunks, vwrite] = [0; 7].map(|_| f.reg(RegTy::S32));
    f.ins(&format!("add.s32 {ksteps}, {d}, 15;"));
    f.ins(&format!("shr.s32 {ksteps}, {ksteps}, 4;"));
    f.ins(&format!("shr.s32 {kchunks}, {d}, 3;"));
    f.ins(&format!("shl.b32 {kwrite}, {ksteps}, 1;"));
    f.ins(&format!("sub.s32 {width}, {ne}, {e0};"));
    f.ins(&format!("min.s32 {width}, {width}, {VALUES};"));
    f.ins(&format!("add.s32 {vsteps}, {width}, 15;"));
    f.ins(&format!("shr.s32 {vsteps}, {vsteps}, 4;"));
    f.ins(&format!("shr.s32 {vchunks}, {width}, 3;"));
    f.ins(&format!("shl.b32 {vwrite}, {vsteps}, 1;"));
    let zero = f.int(0)?;

    // The query tile through shared memory into A fragments.
    stage(&mut f, &p.q, "i", &p.r, &i0, BLOCK_Q, &ni, &zero, &kchunks, &kwrite, &smem, &tid)?;
    f.ins("cp.async.wait_all;");
    f.ins("bar.sync 0;");
    // Lane l reads row 16·warp + l % 16, channels 16·ks + 8·(l / 16).
    let qaddr = f.reg(RegTy::S32);
    {
        let (r, c) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
        f.ins(&format!("and.b32 {r}, {lane}, 15;"));
        f.ins(&format!("shl.b32 {c}, {warp}, 4;"));
        f.ins(&format!("add.s32 {r}, {r}, {c};"));
        f.ins(&format!("shr.u32 {c}, {lane}, 4;"));
        f.ins(&format!("shl.b32 {c}, {c}, 4;"));
        f.ins(&format!("mad.lo.s32 {qaddr}, {r}, {ROW}, {c};"));
        f.ins(&format!("add.s32 {qaddr}, {qaddr}, {smem};"));
    }
    let ksmax = MAX_CHANNELS / 16;
    let qa: Vec<Vec<String>> = (0..ksmax).map(|_| four(&mut f, RegTy::B32)).collect();
    let qdone = f.label();
    for (ks, a) in qa.iter().enumerate() {
        let pk = f.reg(RegTy::Pred);
        f.ins(&format!("setp.le.s32 {pk}, {ksteps}, {ks};"));
        f.ins(&format!("@{pk} bra.uni {qdone};"));
        f.ins(&format!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{qaddr}+{}];", a.join(", "), 32 * ks));
    }
    f.place(&qdone);
    f.ins("bar.sync 0;");

    // Row state: two rows per thread (g and g + 8 of its warp's 16).
    let ninf = flit(f32::NEG_INFINITY);
    let m: Vec<String> = (0..2).map(|_| f.float(f32::NEG_INFINITY)).collect();
    let l: Vec<String> = (0..2).map(|_| f.float(0.0)).collect();
    let o: Vec<Vec<String>> = (0..VALUES / 8).map(|_| (0..4).map(|_| f.float(0.0)).collect()).collect();
    let rows_of: Vec<String> = (0..2)
        .map(|r| {
            let x = f.reg(RegTy::S32);
            f.ins(&format!("shl.b32 {x}, {warp}, 4;"));
            f.ins(&format!("add.s32 {x}, {x}, {g};"));
            f.ins(&format!("add.s32 {x}, {x}, {};", 8 * r));
            f.ins(&format!("add.s32 {x}, {x}, {i0};"));
            x
        })
        .collect();

    let ntiles = f.reg(RegTy::S32);
    f.ins(&format!("add.s32 {ntiles}, {nj}, {};", bk - 1));
    f.ins(&format!("div.s32 {ntiles}, {ntiles}, {bk};"));
    let stage_bytes = 2 * bk * ROW;
    let issue = |f: &mut Func, tile: &str, at: &str| -> Result<(), CodegenError> {
        let j0 = f.reg(RegTy::S32);
        f.ins(&format!("mul.lo.s32 {j0}, {tile}, {bk};"));
        let vdst = f.reg(RegTy::S32);
        f.ins(&format!("add.s32 {vdst}, {at}, {};", bk * ROW));
        stage(f, &p.k, "j", &p.r, &j0, bk, &nj, &zero, &kchunks, &kwrite, at, &tid)?;
        stage(f, &p.v, "j", "e", &j0, bk, &nj, &e0, &vchunks, &vwrite, &vdst, &tid)?;
        f.ins("cp.async.commit_group;");
        Ok(())
    };
    // The key tiles this query tile walks: with a mask, those the class table (bytes
    // `[slot][query tile][key tile]` after the inputs, its offset in the table's extra
    // slot) does not mark empty; else all.
    let classes = match (&br.mask, p.classes) {
        (Some(_), true) => {
            let deps = crate::schedule::classes::table_deps(k);
            let off = f.slot(layout.len);
            let slot = f.reg(RegTy::S32);
            match (deps.b, deps.h) {
                (true, true) => f.ins(&format!("mad.lo.s32 {slot}, {b}, {nh}, {h};")),
                (true, false) => f.ins(&format!("mov.s32 {slot}, {b};")),
                (false, true) => f.ins(&format!("mov.s32 {slot}, {h};")),
                (false, false) => f.ins(&format!("mov.s32 {slot}, 0;")),
            }
            let row = f.reg(RegTy::S32);
            f.ins(&format!("mad.lo.s32 {row}, {slot}, {qtiles}, {qt};"));
            f.ins(&format!("mul.lo.s32 {row}, {row}, {ntiles};"));
            f.ins(&format!("add.s32 {row}, {row}, {off};"));
            let wide = f.reg(RegTy::U64);
            f.ins(&format!("cvt.s64.s32 {wide}, {row};"));
            let at = f.reg(RegTy::U64);
            f.ins(&format!("add.s64 {at}, {}, {wide};", f.inp));
            Some(at)
        }
        _ => None,
    };
    // `t` moved to the first live tile at or after it (the bound `ntiles` when none).
    let first_live = |f: &mut Func, t: &str| {
        let Some(at) = &classes else { return };
        let (top, end) = (f.label(), f.label());
        f.place(&top);
        let p = f.reg(RegTy::Pred);
        f.ins(&format!("setp.ge.s32 {p}, {t}, {ntiles};"));
        f.ins(&format!("@{p} bra.uni {end};"));
        let c = tile_class(f, at, t);
        f.ins(&format!("setp.ne.s32 {p}, {c}, 0;"));
        f.ins(&format!("@{p} bra.uni {end};"));
        f.ins(&format!("add.s32 {t}, {t}, 1;"));
        f.ins(&format!("bra.uni {top};"));
        f.place(&end);
    };
    let none = f.label();
    let (tile, cur) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("mov.s32 {tile}, 0;"));
    f.ins(&format!("mov.s32 {cur}, 0;"));
    first_live(&mut f, &tile);
    {
        let p0 = f.reg(RegTy::Pred);
        f.ins(&format!("setp.ge.s32 {p0}, {tile}, {ntiles};"));
        f.ins(&format!("@{p0} bra.uni {none};"));
    }
    issue(&mut f, &tile, &smem)?;
    // Lane addresses for the K (non-transposed) and V (transposed) fragments: matrix
    // `l / 8`, row `l % 8` of it.
    let (mat, mrow) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
    f.ins(&format!("shr.u32 {mat}, {lane}, 3;"));
    f.ins(&format!("and.b32 {mrow}, {lane}, 7;"));
    let (koff, voff) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
    {
        // K: key (mat / 2)·8 + row, bytes (mat % 2)·16.  V: key (mat % 2)·8 + row, bytes (mat / 2)·16.
        let (hi, lo) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
        f.ins(&format!("shr.u32 {hi}, {mat}, 1;"));
        f.ins(&format!("and.b32 {lo}, {mat}, 1;"));
        let x = f.reg(RegTy::S32);
        f.ins(&format!("mad.lo.s32 {x}, {hi}, 8, {mrow};"));
        f.ins(&format!("mul.lo.s32 {koff}, {x}, {ROW};"));
        f.ins(&format!("mad.lo.s32 {koff}, {lo}, 16, {koff};"));
        f.ins(&format!("mad.lo.s32 {x}, {lo}, 8, {mrow};"));
        f.ins(&format!("mul.lo.s32 {voff}, {x}, {ROW};"));
        f.ins(&format!("mad.lo.s32 {voff}, {hi}, 16, {voff};"));
    }
    let log2e = flit(std::f32::consts::LOG2_E);
    let top = f.label();
    f.place(&top);
    {
        let f = &mut f;
        let (next, kb) = (f.reg(RegTy::S32), f.reg(RegTy::S32));
        f.ins(&format!("add.s32 {next}, {tile}, 1;"));
        first_live(f, &next);
        f.ins(&format!("mad.lo.s32 {kb}, {cur}, {stage_bytes}, {smem};"));
        let last = f.reg(RegTy::Pred);
        f.ins(&format!("setp.ge.s32 {last}, {next}, {ntiles};"));
        let (waited, prefetch) = (f.label(), f.label());
        f.ins(&format!("@!{last} bra.uni {prefetch};"));
        f.ins("cp.async.wait_group 0;");
        f.ins(&format!("bra.uni {waited};"));
        f.place(&prefetch);
        let nb = f.reg(RegTy::S32);
        f.ins(&format!("xor.b32 {nb}, {cur}, 1;"));
        f.ins(&format!("mad.lo.s32 {nb}, {nb}, {stage_bytes}, {smem};"));
        issue(f, &next, &nb)?;
        f.ins("cp.async.wait_group 1;");
        f.place(&waited);
        f.ins("bar.sync 0;");
        let j0 = f.reg(RegTy::S32);
        f.ins(&format!("mul.lo.s32 {j0}, {tile}, {bk};"));

        // S = Q·Kᵀ: bk / 8 accumulator tiles of 16 rows × 8 keys.
        let s: Vec<Vec<String>> = (0..bk / 8).map(|_| (0..4).map(|_| f.float(0.0)).collect()).collect();
        let kaddr = f.reg(RegTy::S32);
        f.ins(&format!("add.s32 {kaddr}, {kb}, {koff};"));
        let sdone = f.label();
        for (ks, a) in qa.iter().enumerate() {
            let pk = f.reg(RegTy::Pred);
            f.ins(&format!("setp.le.s32 {pk}, {ksteps}, {ks};"));
            f.ins(&format!("@{pk} bra.uni {sdone};"));
            for pair in 0..bk / 16 {
                let bf = four(f, RegTy::B32);
                f.ins(&format!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{kaddr}+{}];", bf.join(", "), 16 * pair * ROW + 32 * ks));
                mma(f, half, &s[2 * pair], a, &bf[..2]);
                mma(f, half, &s[2 * pair + 1], a, &bf[2..]);
            }
        }
        f.place(&sdone);

        // Scores in base 2, masked to −inf: element c of tile nt is row g + 8·(c / 2),
        // key j0 + 8·nt + 2q + c % 2. A tile its class marks full skips the mask (keys past
        // the last are masked either way).
        let scores = |f: &mut Func, masked: bool| -> Result<(), CodegenError> {
            for (nt, tile_s) in s.iter().enumerate() {
                for (c, x) in tile_s.iter().enumerate() {
                    let j = f.reg(RegTy::S32);
                    f.ins(&format!("add.s32 {j}, {j0}, {q2};"));
                    f.ins(&format!("add.s32 {j}, {j}, {};", 8 * nt + c % 2));
                    f.bind("i", &rows_of[c / 2]);
                    f.bind("j", &j);
                    f.bind(DOT, x);
                    let mut sc = f.expr(&p.rest)?;
                    if let Some(bias) = &br.bias {
                        let bv = f.expr(bias)?;
                        let r = f.reg(RegTy::F32);
                        f.ins(&format!("add.rn.f32 {r}, {sc}, {bv};"));
                        sc = r;
                    }
                    let keep = f.reg(RegTy::Pred);
                    f.ins(&format!("setp.lt.s32 {keep}, {j}, {nj};"));
                    if let (Some(mask), true) = (&br.mask, masked) {
                        let pm = f.expr(mask)?;
                        f.ins(&format!("and.pred {keep}, {keep}, {pm};"));
                    }
                    f.unbind(3);
                    let r = f.reg(RegTy::F32);
                    f.ins(&format!("mul.rn.f32 {r}, {sc}, {log2e};"));
                    f.ins(&format!("selp.f32 {x}, {r}, {ninf}, {keep};"));
                }
            }
            Ok(())
        };
        match &classes {
            Some(at) => {
                let c = tile_class(f, at, &tile);
                let full = f.reg(RegTy::Pred);
                f.ins(&format!("setp.eq.s32 {full}, {c}, {};", crate::schedule::classes::TileClass::Full as u8));
                let (unmasked, done) = (f.label(), f.label());
                f.ins(&format!("@{full} bra.uni {unmasked};"));
                scores(f, true)?;
                f.ins(&format!("bra.uni {done};"));
                f.place(&unmasked);
                scores(f, false)?;
                f.place(&done);
            }
            None => scores(f, true)?,
        }
        // Online softmax per row: the maximum over the row's four lanes, the rescale of
        // what came before, the weights in place.
        for r in 0..2 {
            let mx = f.float(f32::NEG_INFINITY);
            for tile_s in &s {
                for x in &tile_s[2 * r..2 * r + 2] {
                    f.ins(&format!("max.NaN.f32 {mx}, {mx}, {x};"));
                }
            }
            quad(f, &mx, "max.NaN.f32");
            let mn = f.reg(RegTy::F32);
            f.ins(&format!("max.NaN.f32 {mn}, {}, {mx};", m[r]));
            let dead = f.reg(RegTy::Pred);
            f.ins(&format!("setp.eq.f32 {dead}, {mn}, {ninf};"));
            let mu = f.reg(RegTy::F32);
            f.ins(&format!("selp.f32 {mu}, {}, {mn}, {dead};", flit(0.0)));
            let corr = f.reg(RegTy::F32);
            f.ins(&format!("sub.rn.f32 {corr}, {}, {mu};", m[r]));
            f.ins(&format!("ex2.approx.ftz.f32 {corr}, {corr};"));
            f.ins(&format!("mov.f32 {}, {mn};", m[r]));
            let sum = f.float(0.0);
            for tile_s in &s {
                for x in &tile_s[2 * r..2 * r + 2] {
                    f.ins(&format!("sub.rn.f32 {x}, {x}, {mu};"));
                    f.ins(&format!("ex2.approx.ftz.f32 {x}, {x};"));
                    f.ins(&format!("add.rn.f32 {sum}, {sum}, {x};"));
                }
            }
            f.ins(&format!("fma.rn.f32 {}, {}, {corr}, {sum};", l[r], l[r]));
            rescale(f, &o, r, &corr);
        }
        // O += P·V, 16 keys per k-step; P's A fragment from two accumulator tiles.
        let vaddr = f.reg(RegTy::S32);
        f.ins(&format!("add.s32 {vaddr}, {kb}, {};", bk * ROW));
        f.ins(&format!("add.s32 {vaddr}, {vaddr}, {voff};"));
        for kk in 0..bk / 16 {
            let pa = four(f, RegTy::B32);
            for (n, (tile_s, hi)) in [(&s[2 * kk], 0), (&s[2 * kk], 2), (&s[2 * kk + 1], 0), (&s[2 * kk + 1], 2)].into_iter().enumerate() {
                f.ins(&format!("cvt.rn.{half}x2.f32 {}, {}, {};", pa[n], tile_s[hi + 1], tile_s[hi]));
            }
            let vdone = f.label();
            for vp in 0..VALUES / 16 {
                let pv = f.reg(RegTy::Pred);
                f.ins(&format!("setp.le.s32 {pv}, {vsteps}, {vp};"));
                f.ins(&format!("@{pv} bra.uni {vdone};"));
                let bf = four(f, RegTy::B32);
                f.ins(&format!("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{}}}, [{vaddr}+{}];", bf.join(", "), 16 * kk * ROW + 32 * vp));
                mma(f, half, &o[2 * vp], &pa, &bf[..2]);
                mma(f, half, &o[2 * vp + 1], &pa, &bf[2..]);
            }
            f.place(&vdone);
        }
        // Every warp is done with this stage before the next iteration refills it.
        f.ins("bar.sync 0;");
        f.ins(&format!("mov.s32 {tile}, {next};"));
        f.ins(&format!("xor.b32 {cur}, {cur}, 1;"));
        let more = f.reg(RegTy::Pred);
        f.ins(&format!("setp.lt.s32 {more}, {tile}, {ntiles};"));
        f.ins(&format!("@{more} bra.uni {top};"));
    }
    f.place(&none);

    // The denominators over the row's lanes, the sink, and the store.
    let out_name = k.output().name.clone();
    for r in 0..2 {
        quad(&mut f, &l[r], "add.rn.f32");
        let dead = f.reg(RegTy::Pred);
        f.ins(&format!("setp.eq.f32 {dead}, {}, {ninf};", m[r]));
        f.bind("i", &rows_of[r]);
        if let Norm::Softmax { sink: Some(sk), .. } = &br.norm {
            let x = f.expr(sk)?;
            let s2 = f.reg(RegTy::F32);
            f.ins(&format!("mul.rn.f32 {s2}, {x}, {log2e};"));
            let mn = f.reg(RegTy::F32);
            f.ins(&format!("max.NaN.f32 {mn}, {}, {s2};", m[r]));
            let (corr, es) = (f.reg(RegTy::F32), f.reg(RegTy::F32));
            f.ins(&format!("sub.rn.f32 {corr}, {}, {mn};", m[r]));
            f.ins(&format!("ex2.approx.ftz.f32 {corr}, {corr};"));
            f.ins(&format!("sub.rn.f32 {es}, {s2}, {mn};"));
            f.ins(&format!("ex2.approx.ftz.f32 {es}, {es};"));
            f.ins(&format!("fma.rn.f32 {}, {}, {corr}, {es};", l[r], l[r]));
            rescale(&mut f, &o, r, &corr);
        }
        let in_rows = f.reg(RegTy::Pred);
        f.ins(&format!("setp.lt.s32 {in_rows}, {}, {ni};", rows_of[r]));
        let skip = f.label();
        f.ins(&format!("@!{in_rows} bra {skip};"));
        for (vt, acc) in o.iter().enumerate() {
            for (c, x) in acc[2 * r..2 * r + 2].iter().enumerate() {
                let e = f.reg(RegTy::S32);
                f.ins(&format!("add.s32 {e}, {e0}, {q2};"));
                f.ins(&format!("add.s32 {e}, {e}, {};", 8 * vt + c));
                let inside = f.reg(RegTy::Pred);
                f.ins(&format!("setp.lt.s32 {inside}, {e}, {ne};"));
                let lr = l[r].clone();
                f.if_(&inside, false, &mut |f| {
                    f.bind("e", &e);
                    let v = f.reg(RegTy::F32);
                    f.ins(&format!("div.rn.f32 {v}, {x}, {lr};"));
                    if let Some(gate) = &f.k.gate.clone() {
                        let gv = f.expr(gate)?;
                        f.ins(&format!("mul.rn.f32 {v}, {v}, {gv};"));
                    }
                    // A row with no live key gives zeros, whatever the gate.
                    f.ins(&format!("selp.f32 {v}, {}, {v}, {dead};", flit(0.0)));
                    let idx: Vec<String> = f.k.out.clone().iter().map(|x| f.var(x)).collect::<Result<_, _>>()?;
                    let off = f.offset(&out_name, &idx);
                    f.store(&out_name, &off, &v);
                    f.unbind(1);
                    Ok(())
                })?;
            }
        }
        f.place(&skip);
        f.unbind(1);
    }
    Ok(f.finish())
}
