//! The chunked algorithm for linear and decay attention on the CPU.
//!
//! Runs a kernel in the normal form of [`attnc_passes::linear`]: every variant-specific
//! part (feature maps, scale, cosine norms, log-decays, values, gate) was computed by the
//! generated `derive_*` functions into tensors; this file is the algorithm over them, the
//! same for every variant, like the matmul microkernels.
//!
//! Per (batch, head), keys in chunks of `C`:
//!
//! - a `D × Dv` state `S = Σ_{j < c0} exp(λk_{c0-1} − λk_j) ⊙ fk_j ⊗ v_j` carries every
//!   earlier chunk, decayed to the chunk's first key (all exponents ≤ 0 when the log-decay
//!   does not increase along the keys: stable);
//! - a row whose last visible key falls in the chunk gets `(fq_i ⊙ exp(λq_i − λk_{c0-1}))·S`
//!   plus the dense part over the chunk's keys, `Σ_j (fq̃_i · fk̃_j) v_j` with the decay split
//!   at the chunk's first key (`fq̃ = fq ⊙ exp(λq − λk_{c0})`, `fk̃ = fk ⊙ exp(λk_{c0} − λk)`);
//! - then `S ← exp(λk_{c1-1} − λk_{c0-1}) ⊙ S + Σ_{j ∈ chunk} exp(λk_{c1-1} − λk_j) ⊙ fk_j ⊗ v_j`.
//!
//! A non-causal kernel is the state alone (`φ(Q)(φ(K)ᵀV)`). The linear normalization adds
//! a column of ones to the values (the denominator is the same sum). Exponents are checked
//! as they are formed: when a factor would exceed e^60 (a log-decay that increases along
//! the keys, or falls by more than 60 within one chunk) the head is computed in the exact
//! pairwise form `exp(λq_i − λk_j)` instead, so the result never depends on the data being
//! well behaved, only the speed does.

use attnc_passes::linear::Decay;

/// Largest exponent a split factor may reach before the exact pairwise form is used.
const MAX_EXP: f32 = 60.0;

/// One (batch, head): row-major slices of the materialized operands.
pub(crate) struct Head<'a> {
    pub fq: &'a [f32],
    pub fk: &'a [f32],
    pub lq: &'a [f32],
    pub lk: &'a [f32],
    pub v: &'a [f32],
    pub gate: Option<&'a [f32]>,
}

/// The shape of the problem and the algorithm's choices (the schedule's, at bound dims).
pub(crate) use crate::schedule::ChunkPlan as Plan;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Computes one head's output rows (`out`: N × Dv, zero on entry) and, when asked, each
/// row's saved statistic (`stats`: N; the linear denominator, 0 without one or for a row
/// with no key).
pub(crate) fn run_head(p: &Plan, h: &Head, out: &mut [f32], stats: Option<&mut [f32]>) {
    if p.m == 0 || p.n == 0 {
        if let Some(st) = stats {
            st.fill(0.0);
        }
        return; // no keys: every row is fully masked and stays zero
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected just above.
            return unsafe { run_head_avx2(p, h, out, stats) };
        }
    }
    run_head_body(p, h, out, stats)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_head_avx2(p: &Plan, h: &Head, out: &mut [f32], stats: Option<&mut [f32]>) {
    run_head_body(p, h, out, stats)
}

/// Values with a column of ones appended when the normalization needs the row sums.
fn values<'v>(p: &Plan, v: &'v [f32]) -> (std::borrow::Cow<'v, [f32]>, usize) {
    match p.eps {
        None => (std::borrow::Cow::Borrowed(v), p.dv),
        Some(_) => {
            let w = p.dv + 1;
            let mut x = vec![1f32; p.m * w];
            for j in 0..p.m {
                x[j * w..j * w + p.dv].copy_from_slice(&v[j * p.dv..(j + 1) * p.dv]);
            }
            (std::borrow::Cow::Owned(x), w)
        }
    }
}

#[inline(always)]
fn run_head_body(p: &Plan, h: &Head, out: &mut [f32], stats: Option<&mut [f32]>) {
    let (v, w) = values(p, h.v);
    let mut acc = vec![0f32; p.n * w];
    let ok = match p.causal {
        None => {
            non_causal(p, h, &v, w, &mut acc);
            true
        }
        Some(_) => causal(p, h, &v, w, &mut acc),
    };
    if !ok {
        acc.iter_mut().for_each(|x| *x = 0.0);
        pairwise(p, h, &v, w, &mut acc, 0, p.m);
    }
    finish(p, h, &acc, w, out);
    if let Some(st) = stats {
        for (i, x) in st.iter_mut().enumerate() {
            *x = match (p.eps, p.last_key(i)) {
                (Some(eps), Some(_)) => acc[i * w + p.dv] + eps,
                _ => 0.0,
            };
        }
    }
}

/// Normalization, gate, and zeros for rows with no visible key.
#[inline(always)]
fn finish(p: &Plan, h: &Head, acc: &[f32], w: usize, out: &mut [f32]) {
    for i in 0..p.n {
        if p.last_key(i).is_none() {
            continue;
        }
        let row = &acc[i * w..(i + 1) * w];
        let o = &mut out[i * p.dv..(i + 1) * p.dv];
        let inv = match p.eps {
            Some(eps) => 1.0 / (row[p.dv] + eps),
            None => 1.0,
        };
        for e in 0..p.dv {
            o[e] = row[e] * inv;
        }
        if let Some(g) = h.gate {
            for (x, gv) in o.iter_mut().zip(&g[i * p.dv..(i + 1) * p.dv]) {
                *x *= gv;
            }
        }
    }
}

/// `acc_i = fq_i · (Σ_j fk_j ⊗ v_j)` for every row: the associativity form.
#[inline(always)]
fn non_causal(p: &Plan, h: &Head, v: &[f32], w: usize, acc: &mut [f32]) {
    let mut s = vec![0f32; p.dk * w];
    for j in 0..p.m {
        let vj = &v[j * w..(j + 1) * w];
        for d in 0..p.dk {
            axpy(&mut s[d * w..(d + 1) * w], h.fk[j * p.dk + d], vj);
        }
    }
    for i in 0..p.n {
        let row = &mut acc[i * w..(i + 1) * w];
        for d in 0..p.dk {
            axpy(row, h.fq[i * p.dk + d], &s[d * w..(d + 1) * w]);
        }
    }
}

/// The exact pairwise form over keys `[k0, k1)` for every row: `Σ_d fq fk exp(λq − λk)`.
#[inline(always)]
fn pairwise(p: &Plan, h: &Head, v: &[f32], w: usize, acc: &mut [f32], k0: usize, k1: usize) {
    let mut qrow = vec![0f32; p.dk];
    for i in 0..p.n {
        let Some(last) = p.last_key(i) else { continue };
        let row = &mut acc[i * w..(i + 1) * w];
        for j in k0..k1.min(last + 1) {
            let s = match p.decay {
                Decay::None => dot(&h.fq[i * p.dk..(i + 1) * p.dk], &h.fk[j * p.dk..(j + 1) * p.dk]),
                Decay::Scalar => dot(&h.fq[i * p.dk..(i + 1) * p.dk], &h.fk[j * p.dk..(j + 1) * p.dk]) * (h.lq[i] - h.lk[j]).exp(),
                Decay::Channel => {
                    let (fq, lq, lk) = (&h.fq[i * p.dk..(i + 1) * p.dk], &h.lq[i * p.dk..(i + 1) * p.dk], &h.lk[j * p.dk..(j + 1) * p.dk]);
                    for (((o, q), a), b) in qrow.iter_mut().zip(fq).zip(lq).zip(lk) {
                        *o = q * (a - b).exp();
                    }
                    dot(&qrow, &h.fk[j * p.dk..(j + 1) * p.dk])
                }
            };
            axpy(row, s, &v[j * w..(j + 1) * w]);
        }
    }
}

/// `dst[d] = src[d] · exp(λa_d − λb_d)` with `λa` row `a` of `la` and `λb` row `b` of `lb`
/// (one factor per row for a scalar decay, one per channel for a per-channel one); `false`
/// when an exponent exceeds [`MAX_EXP`]. NaN propagates, as in the pairwise form.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn decayed(p: &Plan, dst: &mut [f32], src: &[f32], la: &[f32], a: usize, lb: &[f32], b: usize) -> bool {
    match p.decay {
        Decay::None => dst.copy_from_slice(src),
        Decay::Scalar => {
            let x = la[a] - lb[b];
            if x > MAX_EXP {
                return false;
            }
            let f = x.exp();
            dst.iter_mut().zip(src).for_each(|(y, s)| *y = s * f);
        }
        Decay::Channel => {
            let dk = p.dk;
            let (ra, rb) = (&la[a * dk..(a + 1) * dk], &lb[b * dk..(b + 1) * dk]);
            for d in 0..dk {
                let x = ra[d] - rb[d];
                if x > MAX_EXP {
                    return false;
                }
                dst[d] = src[d] * x.exp();
            }
        }
    }
    true
}

/// The chunked form; `false` when a split factor would exceed e^[`MAX_EXP`]: the caller
/// then computes the whole head pairwise.
#[inline(always)]
fn causal(p: &Plan, h: &Head, v: &[f32], w: usize, acc: &mut [f32]) -> bool {
    let (dk, c) = (p.dk, p.chunk.max(1));
    let mut s = vec![0f32; dk * w];
    let mut kt = vec![0f32; c * dk];
    let mut scores = vec![0f32; c];
    let mut qs = vec![0f32; dk];
    let ones = vec![1f32; dk];
    let mut f = vec![0f32; dk];
    let fq = |i: usize| &h.fq[i * dk..(i + 1) * dk];
    let fk = |j: usize| &h.fk[j * dk..(j + 1) * dk];
    // Rows in order of their last key, min(i + off, M - 1), which does not decrease in i.
    let mut row = 0usize;
    while row < p.n && p.last_key(row).is_none() {
        row += 1;
    }
    let mut c0 = 0usize;
    while c0 < p.m && row < p.n {
        let c1 = (c0 + c).min(p.m);
        let r0 = row;
        while row < p.n && p.last_key(row).is_some_and(|l| l < c1) {
            row += 1;
        }
        let rows = r0..row;
        // Inter-chunk: the state (decayed to key c0 - 1), decayed on to each row.
        if c0 > 0 {
            for i in rows.clone() {
                if !decayed(p, &mut qs, fq(i), h.lq, i, h.lk, c0 - 1) {
                    return false;
                }
                let out = &mut acc[i * w..(i + 1) * w];
                for d in 0..dk {
                    axpy(out, qs[d], &s[d * w..(d + 1) * w]);
                }
            }
        }
        // Intra-chunk: dense over the chunk's keys, the decay split at key c0.
        if !rows.is_empty() {
            for j in c0..c1 {
                let t = j - c0;
                if !decayed(p, &mut kt[t * dk..(t + 1) * dk], fk(j), h.lk, c0, h.lk, j) {
                    return false;
                }
            }
            for i in rows {
                if !decayed(p, &mut qs, fq(i), h.lq, i, h.lk, c0) {
                    return false;
                }
                let nvis = p.last_key(i).expect("row has keys") + 1 - c0;
                for t in 0..nvis {
                    scores[t] = dot(&qs, &kt[t * dk..(t + 1) * dk]);
                }
                let out = &mut acc[i * w..(i + 1) * w];
                for t in 0..nvis {
                    axpy(out, scores[t], &v[(c0 + t) * w..(c0 + t + 1) * w]);
                }
            }
        }
        // State update: decay from key c0 - 1 to key c1 - 1, add the chunk's keys.
        if row < p.n {
            if c0 > 0 {
                if !decayed(p, &mut f, &ones, h.lk, c1 - 1, h.lk, c0 - 1) {
                    return false;
                }
                for d in 0..dk {
                    let fd = f[d];
                    s[d * w..(d + 1) * w].iter_mut().for_each(|y| *y *= fd);
                }
            }
            for j in c0..c1 {
                if !decayed(p, &mut f, fk(j), h.lk, c1 - 1, h.lk, j) {
                    return false;
                }
                let vj = &v[j * w..(j + 1) * w];
                for d in 0..dk {
                    axpy(&mut s[d * w..(d + 1) * w], f[d], vj);
                }
            }
        }
        c0 = c1;
    }
    true
}
