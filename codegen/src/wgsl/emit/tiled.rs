//! The tiled kernel (`attend` under [`Algorithm::Tiled`]): a workgroup per
//! `(b, h, query tile)` of `BQ` rows, `L = workgroup / BQ` invocations per row.
//!
//! Per live key tile of `BK` keys (the schedule's tile classes: an empty tile is skipped, a
//! full one runs no mask), and per pass of the branch's normalization:
//! 1. the separable dot as a matmul: the query features `A` and the key tile's features `K`
//!    are staged [`STAGE_CHANNELS`] channels at a time in workgroup memory (the schedule's
//!    [`STAGED`] layout); invocation `(r, c)` sums the dots of row `r` with keys
//!    `c, c + L, …` in registers;
//! 2. per pair, the mask (partial tiles only), the rest of the score, the bias and the
//!    decay; the scores `S` and liveness go to workgroup memory;
//! 3. each invocation reads its row of `S` for the online softmax step (row maximum,
//!    rescale, numerators `P` and weights `W` of its keys);
//! 4. the weighted values: the tile's values are staged `STAGE_CHANNELS` channels at a time
//!    and invocation `(r, c)` accumulates channels `c, c + L, …` of each chunk.
//!
//! The normalization state (`m`, `l`, live count) and the accumulators live in registers,
//! replicated over a row's invocations (each computes the same values from `S`). The
//! semantics are the row kernel's: fully masked rows give zeros, NaN propagates, the
//! maximum is subtracted before `exp`.

use super::Writer;
use crate::schedule::tiled::{TiledPlan, DOT};
use crate::schedule::workspace::{staged, STAGED, STAGE_CHANNELS};
use crate::schedule::TiledSchedule;
use crate::wgsl::WgslOptions;
use crate::CodegenError;
use attnc_ir::{Branch, Expr, Norm};
use std::fmt::Write as _;

/// The extents every part of the kernel reads, as WGSL operands.
struct Frame {
    ni: String,
    mj: String,
    /// The dot's channels.
    dlen: Option<String>,
}

/// The shape of a tiled workgroup.
#[derive(Clone, Copy)]
struct Shape {
    bq: u32,
    bk: u32,
    wg: u32,
    /// Invocations per row.
    lanes: u32,
    /// Keys per invocation per tile.
    keys: u32,
    /// Channels per invocation per staged chunk of values.
    cx: u32,
    /// Accumulators per invocation.
    acc: u32,
}

/// The invocation counts a tiled workgroup can have for `block_q × block_k` tiles: the
/// lanes per row (`workgroup / block_q`) a power of two of at most [`STAGE_CHANNELS`], and
/// enough accumulators per invocation for its share of one staged chunk of values.
pub fn check(o: &WgslOptions) -> Result<(), String> {
    let (bq, bk, wg) = (o.schedule.block_q as u32, o.schedule.block_k as u32, o.workgroup);
    if bq == 0 || !wg.is_multiple_of(bq) {
        return Err(format!(
            "the tiled WGSL kernel runs workgroup / block_q invocations per query row: the workgroup ({wg}) must be a multiple of block_q ({bq})"
        ));
    }
    let lanes = wg / bq;
    if !lanes.is_power_of_two() || lanes as usize > STAGE_CHANNELS || !bk.is_multiple_of(lanes) {
        return Err(format!(
            "the tiled WGSL kernel needs workgroup / block_q ({wg} / {bq} = {lanes}) invocations per row: a power of two, at most {STAGE_CHANNELS}, dividing block_k ({bk})"
        ));
    }
    let cx = STAGE_CHANNELS as u32 / lanes;
    if o.channels < cx {
        return Err(format!(
            "the tiled WGSL kernel with {lanes} invocations per row needs at least {cx} channels per invocation (got {}): each holds {cx} of every {STAGE_CHANNELS} output channels",
            o.channels
        ));
    }
    Ok(())
}

/// Output channels one workgroup of the tiled kernel holds under `o` (each invocation
/// `channels` accumulators, `STAGE_CHANNELS / lanes` of every chunk of `STAGE_CHANNELS`
/// channels): a slice of the output's channels. Wider outputs run `slices` workgroups per
/// query tile, each with its own slice of the channels (the scores are computed again in
/// each: no channel count is refused).
pub fn most_values(o: &WgslOptions) -> i64 {
    let lanes = (o.workgroup / o.schedule.block_q.max(1) as u32).max(1);
    let cx = (STAGE_CHANNELS as u32 / lanes).max(1);
    (o.channels / cx).max(1) as i64 * STAGE_CHANNELS as i64
}

/// Workgroups per query tile for `values` output channels: slices of [`most_values`].
pub fn slices(o: &WgslOptions, values: i64) -> i64 {
    (values.max(1) as u64).div_ceil(most_values(o) as u64) as i64
}

impl Writer<'_> {
    pub(super) fn attend_tiled(&mut self, o: &WgslOptions, ts: &TiledSchedule) -> Result<(), CodegenError> {
        let k = self.k;
        let plan = &ts.plan;
        let (bq, bk, wg) = (ts.block_q as u32, ts.block_k as u32, o.workgroup);
        let lanes = wg / bq;
        let dc = STAGE_CHANNELS as u32;
        let sh = Shape { bq, bk, wg, lanes, keys: bk / lanes, cx: dc / lanes, acc: o.channels };
        // Workgroup memory: the schedule's staged layout, region by region.
        let _ = writeln!(self.head, "\n// Workgroup memory (schedule::workspace::STAGED, {bq}×{bk} tiles):");
        for (n, name) in
            [(staged::A, "ta"), (staged::K, "tk"), (staged::V, "tv"), (staged::S, "ts"), (staged::P, "tp"), (staged::W, "tw"), (staged::LIVE, "tl")]
        {
            let (_, len) = ts.workspace.task_region(n, 0, 0);
            let ty = if n == staged::LIVE { "u32" } else { "f32" };
            let _ = writeln!(self.head, "var<workgroup> {name}: array<{ty}, {len}>; // {}", STAGED[n].what);
        }
        self.entry_head("attend", wg);
        let [nb, nh, ni, nj, ne] = [&k.iter.b, &k.iter.h, &k.iter.i, &k.iter.j, &k.iter.e].map(|x| x.to_expr());
        let (nb, nh, ni) = (self.expr(&nb)?, self.expr(&nh)?, self.expr(&ni)?);
        let (mj, ev) = (self.expr(&nj)?, self.expr(&ne)?);
        let dlen = match plan.channels() {
            Some(d) => Some(self.expr(d)?),
            None => None,
        };
        // Workgroup `(tile, slice)`: the query tile, and its slice of the output channels.
        let most = most_values(o);
        self.line(&format!("let qt_n = ({ni} + {bq}i - 1i) / {bq}i;"));
        self.line(&format!("let tiles = {nb} * {nh} * qt_n;"));
        self.line(&format!("let slices = max(({ev} + {most}i - 1i) / {most}i, 1i);"));
        self.line("let gid = i32(wid.x + wid.y * nwg.x);");
        self.line("let tile = min(gid / slices, tiles - 1i);");
        self.line("let valid = gid / slices < tiles;");
        self.line(&format!("let e_lo = (gid % slices) * {most}i;"));
        self.line(&format!("let e_hi = min({ev}, e_lo + {most}i);"));
        self.line("let t = i32(lid);");
        self.line(&format!("let r = t / {lanes}i;"));
        self.line(&format!("let c = t % {lanes}i;"));
        self.line("let qt = tile % qt_n;");
        self.bind_var("h", &format!("(tile / qt_n) % {nh}"));
        self.bind_var("b", &format!("tile / (qt_n * {nh})"));
        self.line(&format!("let i0 = qt * {bq}i;"));
        self.line(&format!("let row_ok = valid && i0 + r < {ni};"));
        self.line(&format!("let qi = min(i0 + r, {ni} - 1i);"));
        if k.branches.iter().any(|b| b.mask.is_some()) {
            // This query tile's classes: `[b][h][query tile][branch][key tile]`.
            let deps = crate::schedule::classes::table_deps(k);
            let (vb, vh) = (self.expr(&Expr::var("b"))?, self.expr(&Expr::var("h"))?);
            let head = match (deps.b, deps.h) {
                (true, true) => format!("{vb} * {nh} + {vh}"),
                (true, false) => vb,
                (false, true) => vh,
                (false, false) => "0i".into(),
            };
            self.line(&format!("let kt_n = ({mj} + {bk}i - 1i) / {bk}i;"));
            self.line(&format!("let cls_row = (({head}) * qt_n + qt) * {}i * kt_n;", k.branches.len()));
            self.class_reader();
        }
        self.line(&format!("var oacc: array<f32, {}>;", sh.acc));
        self.line(&format!("var bacc: array<f32, {}>;", sh.acc));
        self.line("var any_live = false;");
        let fr = Frame { ni: ni.clone(), mj: mj.clone(), dlen };
        for (n, br) in k.branches.iter().enumerate() {
            self.line(&format!("// branch {n}"));
            self.open("");
            self.tiled_branch(n, br, plan, sh, &fr)?;
            self.close();
        }
        // Store: invocation (r, c) holds channels `e_lo + chunk · STAGE_CHANNELS + c + L · x`
        // of its slice.
        self.open(&format!("for (var a: i32 = 0i; a < {}i; a++)", sh.acc));
        self.open("");
        self.bind_var("i", "qi");
        self.bind_var("e", &format!("e_lo + (a / {cx}i) * {dc}i + c + {lanes}i * (a % {cx}i)", cx = sh.cx));
        let e = self.expr(&Expr::var("e"))?;
        self.open(&format!("if (row_ok && {e} < e_hi)"));
        self.store_output("a")?;
        self.close();
        self.close();
        self.close();
        self.close();
        Ok(())
    }

    /// Runs `f` in a block where `i` is this invocation's query row.
    fn with_row(&mut self, f: &mut dyn FnMut(&mut Self) -> Result<(), CodegenError>) -> Result<(), CodegenError> {
        self.open("");
        self.bind_var("i", "qi");
        f(self)?;
        self.close();
        Ok(())
    }

    /// Stages `rows × STAGE_CHANNELS` elements of `dst`: element `(x, cc)` is `value` with
    /// `var` bound to `row0 + x` (clamped below `extent`) and `chan` to `c0 + cc`; zero past
    /// `extent` rows or `len` channels.
    #[allow(clippy::too_many_arguments)]
    fn stage(&mut self, dst: &str, rows: u32, wg: u32, var: &str, row0: &str, extent: &str, chan: &str, len: &str, value: &Expr) -> Result<(), CodegenError> {
        let dc = STAGE_CHANNELS as u32;
        self.open(&format!("for (var x: i32 = t; x < {}i; x += {wg}i)", rows * dc));
        self.line(&format!("let xr = x / {dc}i;"));
        self.line(&format!("let xc = c0 + x % {dc}i;"));
        self.line("var v = 0.0f;");
        self.open(&format!("if ({row0} + xr < {extent} && xc < {len})"));
        self.bind_var(var, &format!("{row0} + xr"));
        self.bind_var(chan, "xc");
        let v = self.expr(value)?;
        self.line(&format!("v = {v};"));
        self.close();
        self.line(&format!("{dst}[x] = v;"));
        self.close();
        Ok(())
    }

    /// One branch over its live key tiles, then its normalized contribution to `oacc`.
    fn tiled_branch(&mut self, n: usize, br: &Branch, plan: &TiledPlan, sh: Shape, fr: &Frame) -> Result<(), CodegenError> {
        self.line(&format!("for (var a: i32 = 0i; a < {}i; a++) {{ bacc[a] = 0.0f; }}", sh.acc));
        self.line("var cnt: i32 = 0i;");
        self.line("var m: f32 = -pinf();");
        self.line("var l: f32 = 0.0f;");
        if let Norm::Softmax { sink: Some(se), .. } = &br.norm {
            self.with_row(&mut |w| {
                let sk = w.expr(se)?;
                w.line(&format!("m = {sk};"));
                w.line(&format!("l = select(exp({sk} - {sk}), 0.0f, {sk} == -pinf());"));
                Ok(())
            })?;
        }
        let mut factor: Option<String> = None;
        match &br.norm {
            Norm::Softmax { post, .. } => match post {
                None => {
                    self.tile_pass(n, br, plan, sh, fr, Pass::Softmax { accumulate: true })?;
                    factor = Some("(1.0f / l)".into());
                }
                Some(post) => {
                    self.tile_pass(n, br, plan, sh, fr, Pass::Softmax { accumulate: false })?;
                    self.tile_pass(n, br, plan, sh, fr, Pass::Post(post))?;
                }
            },
            Norm::Map(f) => self.tile_pass(n, br, plan, sh, fr, Pass::Map(f))?,
            Norm::Linear { eps } => {
                self.tile_pass(n, br, plan, sh, fr, Pass::Linear)?;
                factor = Some(format!("(1.0f / (l + {}))", Self::float_lit(eps.0)));
            }
        }
        self.fold_branch(br, factor, sh.acc, Some("qi"))
    }

    /// One pass over the branch's key tiles.
    fn tile_pass(&mut self, n: usize, br: &Branch, plan: &TiledPlan, sh: Shape, fr: &Frame, pass: Pass) -> Result<(), CodegenError> {
        let Shape { bk, wg, lanes, keys, .. } = sh;
        let (mj, k) = (fr.mj.as_str(), self.k);
        let dc = STAGE_CHANNELS as u32;
        let bp = &plan.branches[n];
        self.open(&format!("for (var j0: i32 = 0i; j0 < {mj}; j0 += {bk}i)"));
        if br.mask.is_some() {
            self.line(&format!("let cl = tile_class(cls_row + {n}i * kt_n + j0 / {bk}i);"));
            self.line("if (cl == 0u) { continue; }");
            self.line("let full = cl == 1u;");
        }
        // 1. The dot, staged a channel chunk at a time.
        self.line(&format!("var dacc: array<f32, {keys}>;"));
        if let (Some(dot), Some(dlen)) = (&bp.dot, fr.dlen.as_deref()) {
            let a = match &bp.fold {
                Some(f) => Expr::bin(attnc_ir::BinOp::Mul, dot.a.clone(), f.clone()),
                None => dot.a.clone(),
            };
            self.open(&format!("for (var c0: i32 = 0i; c0 < {dlen}; c0 += {dc}i)"));
            self.line("workgroupBarrier();");
            self.stage("ta", sh.bq, wg, "i", "i0", &fr.ni, &dot.r, dlen, &a)?;
            self.stage("tk", bk, wg, "j", "j0", mj, &dot.r, dlen, &dot.b)?;
            self.line("workgroupBarrier();");
            self.open(&format!("for (var x: i32 = 0i; x < {keys}i; x++)"));
            self.line(&format!("let u = c + {lanes}i * x;"));
            self.line("var s = dacc[x];");
            self.line(&format!("for (var y: i32 = 0i; y < {dc}i; y++) {{ s = s + ta[r * {dc}i + y] * tk[u * {dc}i + y]; }}"));
            self.line("dacc[x] = s;");
            self.close();
            self.close();
        }
        // 2. Per pair: mask, score, bias, decay; scores and liveness shared.
        self.line(&format!("var sx: array<f32, {keys}>;"));
        self.line(&format!("var dx: array<f32, {keys}>;"));
        self.line(&format!("var lx: array<bool, {keys}>;"));
        self.open(&format!("for (var x: i32 = 0i; x < {keys}i; x++)"));
        self.line(&format!("let u = c + {lanes}i * x;"));
        self.line("var live = false;");
        self.line("var sc = 0.0f;");
        self.line("var dd = 1.0f;");
        self.open(&format!("if (row_ok && j0 + u < {mj})"));
        self.bind_var("i", "qi");
        self.bind_var("j", "j0 + u");
        let mut pair = |w: &mut Self| -> Result<(), CodegenError> {
            w.bind_float(DOT, "dacc[x]");
            let mut s = w.expr(&bp.rest)?;
            if let Some(b) = &br.bias {
                let bv = w.expr(b)?;
                s = format!("({s} + {bv})");
            }
            w.line("live = true;");
            match pass {
                Pass::Softmax { accumulate } => {
                    w.line(&format!("sc = {s};"));
                    if accumulate {
                        if let Some(d) = &br.decay {
                            let d = w.expr(d)?;
                            w.line(&format!("dd = {d};"));
                        }
                    }
                }
                Pass::Post(post) => {
                    w.bind_float("w", &format!("exp({s} - m) / l"));
                    let pw = w.expr(post)?;
                    let d = w.decay_of(br)?;
                    w.line(&format!("sc = {pw} * {d};"));
                }
                Pass::Map(f) => {
                    w.bind_float("s", &s);
                    let p = w.expr(f)?;
                    let d = w.decay_of(br)?;
                    w.line(&format!("sc = {p} * {d};"));
                }
                Pass::Linear => {
                    w.line(&format!("sc = {s};"));
                    let d = w.decay_of(br)?;
                    w.line(&format!("dd = {d};"));
                }
            }
            Ok(())
        };
        self.if_kept(br, &mut pair)?;
        self.close();
        self.line("sx[x] = sc;");
        self.line("dx[x] = dd;");
        self.line("lx[x] = live;");
        self.line(&format!("ts[r * {bk}i + u] = sc;"));
        self.line(&format!("tl[r * {bk}i + u] = select(0u, 1u, live);"));
        self.close();
        self.line("workgroupBarrier();");
        // 3. The row's normalization step; weights to `tw`.
        let count = matches!(pass, Pass::Softmax { .. } | Pass::Map(_) | Pass::Linear);
        let accumulate = !matches!(pass, Pass::Softmax { accumulate: false });
        let mut guard = "true";
        match pass {
            Pass::Softmax { accumulate } => {
                self.line("var mt = -pinf();");
                self.line(&format!(
                    "for (var u: i32 = 0i; u < {bk}i; u++) {{ if (tl[r * {bk}i + u] != 0u) {{ cnt = cnt + 1i; mt = fmaxf(mt, ts[r * {bk}i + u]); }} }}"
                ));
                self.line("let mn = fmaxf(m, mt);");
                self.line("let ok = !(mn == -pinf());");
                self.line("let corr = select(1.0f, exp(m - mn), ok);");
                self.open(&format!("for (var x: i32 = 0i; x < {keys}i; x++)"));
                self.line(&format!("let u = c + {lanes}i * x;"));
                self.line("var p = 0.0f;");
                self.line("if (ok && lx[x]) { p = exp(sx[x] - mn); }");
                self.line(&format!("tp[r * {bk}i + u] = p;"));
                self.line(&format!("tw[r * {bk}i + u] = p * dx[x];"));
                self.close();
                self.line("workgroupBarrier();");
                self.open("if (ok)");
                self.line("var ls = 0.0f;");
                self.line(&format!("for (var u: i32 = 0i; u < {bk}i; u++) {{ ls = ls + tp[r * {bk}i + u]; }}"));
                self.line("l = l * corr + ls;");
                self.line("m = mn;");
                if accumulate {
                    self.line(&format!("for (var a: i32 = 0i; a < {}i; a++) {{ bacc[a] = bacc[a] * corr; }}", sh.acc));
                }
                self.close();
                guard = "ok";
            }
            Pass::Linear => {
                self.open(&format!("for (var x: i32 = 0i; x < {keys}i; x++)"));
                self.line(&format!("let u = c + {lanes}i * x;"));
                self.line(&format!("tw[r * {bk}i + u] = sx[x] * dx[x];"));
                self.close();
                self.line("workgroupBarrier();");
                self.line(&format!(
                    "for (var u: i32 = 0i; u < {bk}i; u++) {{ if (tl[r * {bk}i + u] != 0u) {{ cnt = cnt + 1i; l = l + ts[r * {bk}i + u]; }} }}"
                ));
            }
            Pass::Post(_) | Pass::Map(_) => {
                // The pair phase wrote the weights into `ts`.
                if count {
                    self.line(&format!("for (var u: i32 = 0i; u < {bk}i; u++) {{ if (tl[r * {bk}i + u] != 0u) {{ cnt = cnt + 1i; }} }}"));
                }
            }
        }
        // 4. The weighted values, staged a channel chunk at a time.
        if accumulate {
            let wsrc = if matches!(pass, Pass::Post(_) | Pass::Map(_)) { "ts" } else { "tw" };
            self.line(&format!("let acc_ok = {guard};"));
            self.open(&format!("for (var c0: i32 = e_lo; c0 < e_hi; c0 += {dc}i)"));
            self.line("workgroupBarrier();");
            self.stage("tv", bk, wg, "j", "j0", mj, "e", "e_hi", &k.value)?;
            self.line("workgroupBarrier();");
            self.open("if (acc_ok)");
            self.line(&format!("let base = ((c0 - e_lo) / {dc}i) * {}i;", sh.cx));
            self.open(&format!("for (var u: i32 = 0i; u < {bk}i; u++)"));
            self.open(&format!("if (tl[r * {bk}i + u] != 0u)"));
            self.line(&format!("let wv = {wsrc}[r * {bk}i + u];"));
            self.line(&format!("for (var y: i32 = 0i; y < {}i; y++) {{ bacc[base + y] = bacc[base + y] + wv * tv[u * {dc}i + c + {lanes}i * y]; }}", sh.cx));
            self.close();
            self.close();
            self.close();
            self.close();
        }
        self.line("workgroupBarrier();");
        self.close();
        Ok(())
    }
}

/// What one pass over the key tiles computes per pair.
#[derive(Clone, Copy)]
enum Pass<'a> {
    /// The online softmax step (`accumulate`: also the weighted values).
    Softmax { accumulate: bool },
    /// The second softmax pass: final weights through the post-map, decayed.
    Post(&'a Expr),
    /// A pointwise map of the score, decayed.
    Map(&'a Expr),
    /// Linear: the score is the weight, decayed; the row sums the scores.
    Linear,
}
