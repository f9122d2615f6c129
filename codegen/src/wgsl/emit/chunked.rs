//! The chunked kernel (`attend` under [`Algorithm::Chunked`]): linear and decay attention in
//! the normal form of `attnc_passes::linear` (features `__fq`, `__fk`, log-decays `__lq`,
//! `__lk`, values `__v`, gate `__gate`, all derived tensors the derive passes computed),
//! linear in the number of keys. The same algorithm as the CPU's `cpu::chunked`:
//!
//! A workgroup per `(b, h, slice of VS output channels)` walks the keys in chunks of `C`
//! with a `Dk × VS` state `S = Σ_{j < c0} exp(λk_{c0-1} − λk_j) ⊙ fk_j ⊗ v_j` (and its
//! column of ones `Z` for the linear normalization) in workgroup memory. Per chunk
//! `[c0, c1)`, the rows whose last visible key falls in it (a contiguous range: the last key
//! `min(i + off, M − 1)` does not decrease in `i`), `RB` at a time, get
//! `(fq_i ⊙ exp(λq_i − λk_{c0−1}))·S` plus the exact pairs of the chunk
//! `Σ_{c0 ≤ j ≤ last(i)} (Σ_d fq_id fk_jd exp(λq_id − λk_jd)) v_j`; then
//! `S ← exp(λk_{c1−1} − λk_{c0−1}) ⊙ S + Σ_{j ∈ chunk} exp(λk_{c1−1} − λk_j) ⊙ fk_j ⊗ v_j`.
//! A non-causal kernel is the state alone, then every row.
//!
//! Every split factor is checked as it is formed: when an exponent exceeds [`MAX_EXP`] (a
//! log-decay that increases along the keys) the workgroup computes its head again in the
//! exact pairwise form, so the result never depends on the data being well behaved, only
//! the speed does. Rows with no visible key are written as zeros.

use super::Writer;
use crate::schedule::ChunkedSchedule;
use crate::wgsl::WgslOptions;
use crate::CodegenError;
use attnc_passes::linear::{Decay, FK, FQ, GATE, LK, LQ, VAL};
use std::fmt::Write as _;

pub use crate::schedule::gpu_chunk::{slices, MAX_CHUNK, MAX_FEATURES};
use crate::schedule::gpu_chunk::{MAX_SPLIT_EXP as MAX_EXP, ROW_BLOCK as RB, SLICE as VS};

impl Writer<'_> {
    pub(super) fn attend_chunked(&mut self, o: &WgslOptions, cs: &ChunkedSchedule) -> Result<(), CodegenError> {
        let k = self.k;
        let form = &cs.form;
        let (wg, c) = (o.workgroup, cs.chunk as u32);
        let dkmax = MAX_FEATURES as u32;
        let _ = writeln!(
            self.head,
            "\n// Workgroup memory of the chunked kernel: the state, its column of ones, a row block's\n\
             // decayed query features and scores against the chunk's keys.\n\
             var<workgroup> st: array<f32, {}>;\nvar<workgroup> sz: array<f32, {dkmax}>;\n\
             var<workgroup> qf: array<f32, {}>;\nvar<workgroup> sp: array<f32, {}>;\n\
             var<workgroup> bad: atomic<u32>;\nvar<workgroup> bad_u: u32;",
            dkmax * VS,
            RB * dkmax,
            RB * c
        );
        self.entry_head("attend", wg);
        let [nb, nh, ni, nj, ne] = [&k.iter.b, &k.iter.h, &k.iter.i, &k.iter.j, &k.iter.e].map(|x| x.to_expr());
        let (nb, nh, ni) = (self.expr(&nb)?, self.expr(&nh)?, self.expr(&ni)?);
        let (mj, ev) = (self.expr(&nj)?, self.expr(&ne)?);
        let dk = self.expr(&form.channels.to_expr())?;
        for t in [FQ, FK, LQ, LK, VAL, GATE] {
            if k.tensor(t).is_some() {
                self.loader(t);
            }
        }
        self.line(&format!("let slices = ({ev} + {VS}i - 1i) / {VS}i;"));
        self.line("let gid = i32(wid.x + wid.y * nwg.x);");
        self.line(&format!("let heads = {nb} * {nh};"));
        self.line("let valid = gid / slices < heads;");
        self.line("let hd = min(gid / slices, heads - 1i);");
        self.line(&format!("let vh = hd % {nh};"));
        self.line(&format!("let vb = hd / {nh};"));
        self.line(&format!("let e_lo = (gid % slices) * {VS}i;"));
        self.line(&format!("let e_hi = min({ev}, e_lo + {VS}i);"));
        self.line("let t = i32(lid);");
        self.line(&format!("let dk = {dk};"));
        match &form.causal {
            Some(off) => {
                let off = self.expr(off)?;
                self.line(&format!("let off = {off};"));
                self.line("let causal = true;");
            }
            None => {
                self.line(&format!("let off = {mj};"));
                self.line("let causal = false;");
            }
        }
        let names = Names::new(form.decay);
        let decayed = form.decay != Decay::None;
        // `fac(x)`: e^x for a split factor, flagging the workgroup when x is too large.
        if decayed {
            let _ = writeln!(self.head, "fn fac(x: f32) -> f32 {{ if (x > {MAX_EXP:?}f) {{ atomicStore(&bad, 1u); }} return exp(x); }}");
        }
        // The exact score of row `i` and key `j`.
        let pair_decay = match form.decay {
            Decay::Channel => format!(" * exp({} - {})", names.lq("i", "d"), names.lk("j", "d")),
            _ => String::new(),
        };
        let scalar_decay = if form.decay == Decay::Scalar { format!(" * exp({} - {})", names.lq("i", "0i"), names.lk("j", "0i")) } else { String::new() };
        let _ = writeln!(
            self.head,
            "fn pair_score(vb: i32, vh: i32, i: i32, j: i32, dk: i32) -> f32 {{\n  var s = 0.0f;\n  for (var d: i32 = 0i; d < dk; d++) {{ s = s + {} * {}{pair_decay}; }}\n  return s{scalar_decay};\n}}",
            names.ld(FQ, "i", "d"),
            names.ld(FK, "j", "d"),
        );
        let out = OutRow {
            eps: form.eps.map(Self::float_lit),
            gate: form.gate.then(|| format!("{}(vb, vh, i, e)", super::ident("ld", GATE))),
            name: k.output().name.clone(),
        };
        let sh = ChunkShape { mj: &mj, chunk: c, wg, decayed };
        // Rows with no visible key: zeros.
        self.open("if (valid && causal)");
        self.open(&format!("for (var x: i32 = t; x < clamp(-off, 0i, {ni}) * {VS}i; x += {wg}i)"));
        self.line(&format!("let i = x / {VS}i;"));
        self.line(&format!("let e = e_lo + x % {VS}i;"));
        self.open("if (e < e_hi)");
        out.zero(self);
        self.close();
        self.close();
        self.close();
        self.line(&format!("for (var x: i32 = t; x < {}i; x += {wg}i) {{ st[x] = 0.0f; }}", dkmax * VS));
        self.line(&format!("for (var x: i32 = t; x < {dkmax}i; x += {wg}i) {{ sz[x] = 0.0f; }}"));
        self.line("if (t == 0i) { atomicStore(&bad, 0u); }");
        self.line("workgroupBarrier();");
        // The chunks: a causal kernel's rows whose last key falls in the chunk, then the
        // state update.
        self.open(&format!("for (var c0: i32 = 0i; c0 < {mj}; c0 += {c}i)"));
        self.line(&format!("let c1 = min(c0 + {c}i, {mj});"));
        self.open("if (causal)");
        self.line(&format!("let r0 = clamp(c0 - off, 0i, {ni});"));
        self.line(&format!("let r1 = select(clamp(c1 - off, 0i, {ni}), {ni}, c1 == {mj});"));
        self.rows_block(&names, &sh, &out);
        self.close();
        self.open(&format!("for (var x: i32 = t; x < dk * {}i; x += {wg}i)", VS + 1));
        self.line(&format!("let d = x / {}i;", VS + 1));
        self.line(&format!("let ee = x % {}i;", VS + 1));
        self.line("let e = e_lo + ee;");
        self.line(&format!("let ones = ee == {VS}i;"));
        self.open("if (ones || e < e_hi)");
        self.line(&format!("var s = select(st[d * {VS}i + ee], sz[d], ones);"));
        if decayed {
            self.line(&format!("if (c0 > 0i) {{ s = s * fac({} - {}); }}", names.lk("c1 - 1i", "d"), names.lk("c0 - 1i", "d")));
        }
        self.open("for (var j: i32 = c0; j < c1; j++)");
        let kf = names.ld(FK, "j", "d");
        let kf = if decayed { format!("{kf} * fac({} - {})", names.lk("c1 - 1i", "d"), names.lk("j", "d")) } else { kf };
        self.line(&format!("s = s + {kf} * select({}(vb, vh, j, e), 1.0f, ones);", super::ident("ld", VAL)));
        self.close();
        self.line(&format!("if (ones) {{ sz[d] = s; }} else {{ st[d * {VS}i + ee] = s; }}"));
        self.close();
        self.close();
        self.line("workgroupBarrier();");
        self.close();
        // A non-causal kernel: every row from the whole state (no decay: the pass keeps
        // decays causal).
        self.open("if (!causal)");
        self.line(&format!("let c0 = {mj};"));
        self.line(&format!("let c1 = {mj};"));
        self.line("let r0 = 0i;");
        self.line(&format!("let r1 = {ni};"));
        self.rows_block(&names, &sh, &out);
        self.close();
        // The fallback: the exact pairwise form over every row when a factor overflowed.
        if decayed {
            self.line("workgroupBarrier();");
            self.line("if (t == 0i) { bad_u = atomicLoad(&bad); }");
            self.open("if (workgroupUniformLoad(&bad_u) != 0u)");
            self.open(&format!("for (var x: i32 = t; x < {ni} * {VS}i; x += {wg}i)"));
            self.line(&format!("let i = x / {VS}i;"));
            self.line(&format!("let e = e_lo + x % {VS}i;"));
            self.line(&format!("let last = min(i + off, {mj} - 1i);"));
            self.open("if (valid && e < e_hi && last >= 0i)");
            self.line("var acc = 0.0f;");
            self.line("var den = 0.0f;");
            self.open("for (var j: i32 = 0i; j <= last; j++)");
            self.line("let p = pair_score(vb, vh, i, j, dk);");
            self.line(&format!("acc = acc + p * {}(vb, vh, j, e);", super::ident("ld", VAL)));
            self.line("den = den + p;");
            self.close();
            out.store(self);
            self.close();
            self.close();
            self.close();
        }
        self.close();
        Ok(())
    }

    /// Rows `[r0, r1)` against the state (decayed from key `c0 - 1`) and the exact pairs of
    /// keys `[c0, c1)` they see, `RB` rows at a time.
    fn rows_block(&mut self, names: &Names, sh: &ChunkShape, out: &OutRow) {
        let (dkmax, c, wg, mj) = (MAX_FEATURES as u32, sh.chunk, sh.wg, sh.mj);
        self.open(&format!("for (var ra: i32 = r0; ra < r1; ra += {RB}i)"));
        self.line(&format!("let rn = min({RB}i, r1 - ra);"));
        // The row block's query features, decayed to key c0 - 1 (the state's reference).
        self.open(&format!("for (var x: i32 = t; x < rn * {dkmax}i; x += {wg}i)"));
        self.line(&format!("let i = ra + x / {dkmax}i;"));
        self.line(&format!("let d = x % {dkmax}i;"));
        self.line("var f = 0.0f;");
        self.open("if (d < dk && c0 > 0i)");
        let q = names.ld(FQ, "i", "d");
        if sh.decayed {
            self.line(&format!("f = {q} * fac({} - {});", names.lq("i", "d"), names.lk("c0 - 1i", "d")));
        } else {
            self.line(&format!("f = {q};"));
        }
        self.close();
        self.line("qf[x] = f;");
        self.close();
        // The exact scores against the chunk's keys each row sees.
        self.open(&format!("for (var x: i32 = t; x < rn * {c}i; x += {wg}i)"));
        self.line(&format!("let i = ra + x / {c}i;"));
        self.line(&format!("let j = c0 + x % {c}i;"));
        self.line("var s = 0.0f;");
        self.line(&format!("if (j < c1 && j <= min(i + off, {mj} - 1i)) {{ s = pair_score(vb, vh, i, j, dk); }}"));
        self.line("sp[x] = s;");
        self.close();
        self.line("workgroupBarrier();");
        // Each (row, channel): the state's part and the chunk's.
        self.open(&format!("for (var x: i32 = t; x < rn * {VS}i; x += {wg}i)"));
        self.line(&format!("let r = x / {VS}i;"));
        self.line("let i = ra + r;");
        self.line(&format!("let e = e_lo + x % {VS}i;"));
        self.open("if (valid && e < e_hi)");
        self.line("var acc = 0.0f;");
        self.line("var den = 0.0f;");
        self.open("for (var d: i32 = 0i; d < dk; d++)");
        self.line(&format!("let qd = qf[r * {dkmax}i + d];"));
        self.line(&format!("acc = acc + qd * st[d * {VS}i + (e - e_lo)];"));
        self.line("den = den + qd * sz[d];");
        self.close();
        self.open("for (var u: i32 = 0i; u < c1 - c0; u++)");
        self.line(&format!("let p = sp[r * {c}i + u];"));
        self.line(&format!("acc = acc + p * {}(vb, vh, c0 + u, e);", super::ident("ld", VAL)));
        self.line("den = den + p;");
        self.close();
        out.store(self);
        self.close();
        self.close();
        self.line("workgroupBarrier();");
        self.close();
    }
}

/// WGSL calls of the normal form's tensors for this head (`vb`, `vh`).
struct Names {
    scalar: bool,
}

impl Names {
    fn new(decay: Decay) -> Names {
        Names { scalar: decay == Decay::Scalar }
    }
    fn ld(&self, t: &str, x: &str, d: &str) -> String {
        format!("{}(vb, vh, {x}, {d})", super::ident("ld", t))
    }
    fn lq(&self, x: &str, d: &str) -> String {
        if self.scalar {
            format!("{}(vb, vh, {x})", super::ident("ld", LQ))
        } else {
            self.ld(LQ, x, d)
        }
    }
    fn lk(&self, x: &str, d: &str) -> String {
        if self.scalar {
            format!("{}(vb, vh, {x})", super::ident("ld", LK))
        } else {
            self.ld(LK, x, d)
        }
    }
}

struct ChunkShape<'a> {
    mj: &'a str,
    chunk: u32,
    wg: u32,
    decayed: bool,
}

/// How an output element is written: `acc` (and `den` for the linear normalization), gated.
struct OutRow {
    eps: Option<String>,
    gate: Option<String>,
    name: String,
}

impl OutRow {
    fn store(&self, w: &mut Writer) {
        let mut v = "acc".to_string();
        if let Some(eps) = &self.eps {
            v = format!("({v} / (den + {eps}))");
        }
        if let Some(g) = &self.gate {
            v = format!("({v} * {g})");
        }
        w.store(&self.name, &["vb".into(), "vh".into(), "i".into(), "e".into()], &v, false);
    }
    fn zero(&self, w: &mut Writer) {
        w.store(&self.name, &["vb".into(), "vh".into(), "i".into(), "e".into()], "0.0f", false);
    }
}
