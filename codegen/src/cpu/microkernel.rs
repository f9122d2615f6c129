//! Tile matmul microkernels called from the generated code.
//!
//! Cranelift lowers only 128-bit vectors on x86-64, a half (AVX2) or a quarter (AVX-512) of
//! the FMA peak, so the two matmuls of a tile run here, in Rust with `std::arch`, chosen
//! at run time by feature detection: AVX-512F, else AVX2+FMA, else portable code. The
//! generated code keeps everything variant-specific (scores, masks, normalization).
//!
//! - `qk`: `s[r][c] = Σ_x a[r][x] · kt[x][c]` for `r < rows`, `c < bk` (the key panel `kt`
//!   is packed transposed, `bk` keys wide, so the inner loop broadcasts `a` and loads `kt`);
//! - `pv`: `o[r][e] = o[r][e] · corr[r] + Σ_{c < nk} p[r][c] · v[c][e]` (`corr` may be null);
//! - `softmax`: the online-softmax step of a tile of base-2 scores (the normalization every
//!   softmax variant shares; what makes the scores is generated): per row, the new running
//!   max, the rescale factor of the old state, the weights `2^(s − max)` in place and the
//!   running denominator;
//! - `qk_max`: `qk` that also writes each row's maximum (taken from the accumulators), so
//!   that a full tile of plain dot products needs no max pass in `softmax`.
//!
//! On AVX2 the 6 × 16 inner loop that both matmuls share is assembly (`x86::fma_6x16`):
//! all 16 ymm registers, no address arithmetic in the loop. On AVX-512 they share a 6 × 64
//! block (`x86::fma_zmm`: 24 of the 32 zmm registers accumulate; an assembly twin of it
//! measured no faster). Each matmul prefetches the next key tile's panel into L2, which
//! long sequences need. The element-wise routines (weights, capped scores) are written once
//! over `x86::Lanes`, for 8 and 16 lanes. The instruction set is the widest the host has
//! unless [`crate::cpu::CpuOptions::isa`] names a narrower one.

/// Which implementation the microkernels run: the widest the host has by default
/// ([`Isa::detect`]), or one chosen ([`crate::cpu::CpuOptions::isa`]) among those the host
/// runs ([`Isa::available`]), to compare them or test each on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Isa, String> {
        match s {
            "avx512" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            "portable" => Ok(Isa::Portable),
            _ => Err(format!("unknown instruction set `{s}` (avx512, avx2 or portable)")),
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        })
    }
}

impl Isa {
    /// Every implementation this host runs, widest first.
    pub fn available() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
            Isa::Portable => vec![Isa::Portable],
        }
    }

    /// `chosen`, or the widest the host has; an error names what the host lacks.
    pub fn resolve(chosen: Option<Isa>) -> Result<Isa, String> {
        match chosen {
            None => Ok(Isa::detect()),
            Some(i) if Isa::available().contains(&i) => Ok(i),
            Some(i) => Err(format!(
                "this CPU cannot run the {i} microkernels (it has: {})",
                Isa::available().iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// The widest implementation the host has: AVX-512F, else AVX2 with FMA, else portable.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

pub type QkFn = unsafe extern "C" fn(*const f32, i64, *const f32, *mut f32, i64, i64, i64);
pub type PvFn = unsafe extern "C" fn(*const f32, i64, *const f32, i64, *mut f32, i64, *const f32, i64, i64, i64);

pub type SoftmaxFn = unsafe extern "C" fn(*mut f32, i64, i64, i64, *mut f32, *mut f32, *mut f32, *const f32);
pub type QkMaxFn = unsafe extern "C" fn(*const f32, i64, *const f32, *mut f32, i64, i64, i64, *mut f32);
/// `qk` against key rows in place (not a transposed panel): see [`qk_direct_portable`].
pub type QkDirectFn = unsafe extern "C" fn(*const f32, i64, *const f32, i64, *mut f32, i64, i64, i64, i64, *mut f32);

/// At most this many query rows (the problem's, not a tile's) run `qk` against the keys in
/// place ([`qk_direct_portable`]): a decode step's or a short speculative block's rows would
/// otherwise pay a transposed copy of every key (a third of the call at 8 rows) for a few
/// products each.
pub const DIRECT_ROWS: i64 = 16;

/// Whether the AVX2+FMA helpers serve `isa` on this host (every AVX-512 host has AVX2+FMA).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn avx2_fma(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa != Isa::Portable && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Whether the AVX-512F routines serve `isa` on this host.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn avx512(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// The softmax step for an ISA (its weights on 16 lanes with AVX-512F, else on 8 with
/// AVX2+FMA when the host has it).
pub fn softmax_kernel(isa: Isa) -> SoftmaxFn {
    #[cfg(target_arch = "x86_64")]
    if avx512(isa) {
        return x86::softmax_avx512;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma(isa) {
        return x86::softmax_avx2;
    }
    let _ = isa;
    softmax_portable
}

/// Minimax coefficients of 2^f on [-1/2, 1/2], highest degree first (relative error < 3e-7);
/// the generated code uses the same ones.
pub const EXP2_POLY: [f32; 6] = [1.326_697e-3, 9.675_46e-3, 5.550_742_6e-2, 0.240_221_22, 0.693_146_95, 1.000_000_1];

/// 1.5·2^23: adding it rounds to an integer kept in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `2^x` for `x <= 0` (softmax weights): 0 below 2^-126 (a masked score's −inf among
/// them), so that no weight is subnormal (Intel cores take a microcode assist, ~100 cycles,
/// for each subnormal a multiply meets: a sparse mask's partial tiles ran 5× slower there
/// when masked weights were clamped at 2^-126); NaN stays NaN. The portable twin of the
/// vector code (same steps, same constants).
#[inline]
fn exp2_nonpos(x: f32) -> f32 {
    if x < -126.0 {
        return 0.0;
    }
    let t = x + ROUND_MAGIC;
    let f = x - (t - ROUND_MAGIC);
    let p = EXP2_POLY[1..].iter().fold(EXP2_POLY[0], |p, k| p * f + k);
    let e = (t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()).wrapping_add(127)) << 23;
    p * f32::from_bits(e)
}

/// The row state after a tile's maximum: `(m_new, corr)` where `m_new = max(m, tmax)` (NaN
/// when either is), and `corr = 2^(m − m_new)` rescales the old denominator and output (0
/// on the first live tile, where `m = −inf`). A row whose scores are all `−inf` subtracts 0.
#[inline]
fn row_step(m: f32, tmax: f32, nan: bool) -> (f32, f32, f32) {
    let m_new = if nan || m.is_nan() || tmax.is_nan() { f32::NAN } else { m.max(tmax) };
    let m_use = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
    // 2^d for d <= 0 by the weights' polynomial (a libm call per row cost ~1% of sdpa); below
    // 2^-126 the old state counts for nothing.
    (m_new, m_use, exp2_nonpos(m - m_use))
}

/// # Safety
/// `s` holds `rows` rows of `ld` floats (at least `n` used); `m`, `l` and `corr` hold `rows`
/// floats each; `tmax` is null or holds each row's maximum of its `n` scores (from
/// [`qk_max_portable`]; a NaN score may be left out of it).
pub unsafe extern "C" fn softmax_portable(s: *mut f32, ld: i64, rows: i64, n: i64, m: *mut f32, l: *mut f32, corr: *mut f32, tmax: *const f32) {
    let (ld, rows, n) = (ld as usize, rows as usize, n as usize);
    for r in 0..rows {
        let row = std::slice::from_raw_parts_mut(s.add(r * ld), n);
        let tmax = if tmax.is_null() { row.iter().fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a }) } else { *tmax.add(r) };
        let nan = row.iter().any(|x| x.is_nan());
        let (m_new, m_use, c) = row_step(*m.add(r), tmax, nan);
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = exp2_nonpos(*x - m_use);
            sum += *x;
        }
        *l.add(r) = *l.add(r) * c + sum;
        *m.add(r) = m_new;
        *corr.add(r) = c;
    }
}

/// The weights of a second softmax pass, whose maximum and denominator are final:
/// `s[r][c] = 2^(s[r][c] − m[r]) · scale[r]` in place for `c < n` (`m[r] = −inf`, a row
/// with no live key so far, subtracts 0).
/// # Safety
/// `s` holds `rows` rows of `ld` floats (at least `n` used); `m` and `scale` hold `rows`
/// floats each.
pub unsafe extern "C" fn weights_portable(s: *mut f32, ld: i64, rows: i64, n: i64, m: *const f32, scale: *const f32) {
    let (ld, rows, n) = (ld as usize, rows as usize, n as usize);
    for r in 0..rows {
        let (mr, k) = (*m.add(r), *scale.add(r));
        let mu = if mr == f32::NEG_INFINITY { 0.0 } else { mr };
        for x in std::slice::from_raw_parts_mut(s.add(r * ld), n) {
            *x = exp2_nonpos(*x - mu) * k;
        }
    }
}

pub type WeightsFn = unsafe extern "C" fn(*mut f32, i64, i64, i64, *const f32, *const f32);

/// The weights `exp(s − t)` of a statistic `t` per key (the backward kernels' `P = exp(s −
/// lse)` over the keys): `s[r][c] = 2^(s[r][c] − t[c])` in place for `c < n`, all in base 2
/// (`t[c] = −inf`, a query row with no live key, subtracts 0: its pairs are masked).
/// # Safety
/// `s` holds `rows` rows of `ld` floats (at least `n` used); `t` holds `n` floats.
pub unsafe extern "C" fn exp_cols_portable(s: *mut f32, ld: i64, rows: i64, n: i64, t: *const f32) {
    let (ld, rows, n) = (ld as usize, rows as usize, n as usize);
    let t = std::slice::from_raw_parts(t, n);
    for r in 0..rows {
        for (x, &tc) in std::slice::from_raw_parts_mut(s.add(r * ld), n).iter_mut().zip(t) {
            *x = exp2_nonpos(*x - if tc == f32::NEG_INFINITY { 0.0 } else { tc });
        }
    }
}

pub type ExpColsFn = unsafe extern "C" fn(*mut f32, i64, i64, i64, *const f32);

/// `c · tanh(x)` by the vector paths' rational form (see the generated `vtanh`: Eigen's fast
/// tanh, clamped at ±7.905311; NaN stays NaN).
fn tanh_rational(x: f32) -> f32 {
    use crate::cpu::tiled::{TANH_CLAMP, TANH_DEN, TANH_NUM};
    // NaN stays NaN (as `clamp` leaves it).
    let xc = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let x2 = xc * xc;
    let p = TANH_NUM[1..].iter().fold(TANH_NUM[0], |p, &k| x2.mul_add(p, k));
    let q = TANH_DEN[1..].iter().fold(TANH_DEN[0], |p, &k| x2.mul_add(p, k));
    xc * p / q
}

/// A capped score in place (softcapping, `c · tanh(s)` with the cap and `log2 e` in `c`,
/// passed as its f32 bits): `s[r][x] = c · tanh(s[r][x])` for `x < n`.
/// # Safety
/// `s` holds `rows` rows of `ld` floats (at least `n` used).
pub unsafe extern "C" fn tanh_scale_portable(s: *mut f32, ld: i64, rows: i64, n: i64, c: i64) {
    let (ld, rows, n, c) = (ld as usize, rows as usize, n as usize, f32::from_bits(c as u32));
    for r in 0..rows {
        for x in std::slice::from_raw_parts_mut(s.add(r * ld), n) {
            *x = c * tanh_rational(*x);
        }
    }
}

pub type TanhScaleFn = unsafe extern "C" fn(*mut f32, i64, i64, i64, i64);

/// The capped scores (AVX-512F, else AVX2+FMA, when the host has it).
pub fn tanh_scale_kernel(isa: Isa) -> TanhScaleFn {
    #[cfg(target_arch = "x86_64")]
    if avx512(isa) {
        return x86::tanh_scale_avx512;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma(isa) {
        return x86::tanh_scale_avx2;
    }
    let _ = isa;
    tanh_scale_portable
}

/// The per-key weights (AVX-512F, else AVX2+FMA, when the host has it).
pub fn exp_cols_kernel(isa: Isa) -> ExpColsFn {
    #[cfg(target_arch = "x86_64")]
    if avx512(isa) {
        return x86::exp_cols_avx512;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma(isa) {
        return x86::exp_cols_avx2;
    }
    let _ = isa;
    exp_cols_portable
}

/// The second-pass weights (AVX-512F, else AVX2+FMA, when the host has it).
pub fn weights_kernel(isa: Isa) -> WeightsFn {
    #[cfg(target_arch = "x86_64")]
    if avx512(isa) {
        return x86::weights_avx512;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma(isa) {
        return x86::weights_avx2;
    }
    let _ = isa;
    weights_portable
}

/// `qk` that also writes each row's maximum over the `bk` columns to `rowmax`.
/// # Safety
/// As [`qk_portable`]; `rowmax` holds `rows` floats.
pub unsafe extern "C" fn qk_max_portable(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64, rowmax: *mut f32) {
    qk_portable(a, lda, kt, s, rows, d, bk);
    for r in 0..rows as usize {
        let row = std::slice::from_raw_parts(s.add(r * bk as usize), bk as usize);
        *rowmax.add(r) = row.iter().fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    }
}

/// `s[r][c] = Σ_x a[r][x] · k[c][x]` for `r < rows`, `c < n`, with the keys' rows in place
/// (`ldk` floats apart) instead of a transposed panel; columns `[n, lds)` of each row of `s`
/// are set to 0 (a tail tile's padding, as the packed panel's zero keys give), and each
/// row's maximum over its `n` scores goes to `rowmax` when it is not null (NaN ignored, as
/// [`qk_max_portable`] does).
/// # Safety
/// `a` holds `rows` rows of `lda` floats (at least `d` used), `k` holds `n` rows of `ldk`
/// floats (at least `d` used), `s` holds `rows` rows of `lds ≥ n` floats, `rowmax` is null
/// or holds `rows` floats.
pub unsafe extern "C" fn qk_direct_portable(
    a: *const f32,
    lda: i64,
    k: *const f32,
    ldk: i64,
    s: *mut f32,
    lds: i64,
    rows: i64,
    d: i64,
    n: i64,
    rowmax: *mut f32,
) {
    let (lda, ldk, lds, rows, d, n) = (lda as usize, ldk as usize, lds as usize, rows as usize, d as usize, n as usize);
    for r in 0..rows {
        let ar = std::slice::from_raw_parts(a.add(r * lda), d);
        let sr = std::slice::from_raw_parts_mut(s.add(r * lds), lds);
        let mut mx = f32::NEG_INFINITY;
        for (c, out) in sr[..n].iter_mut().enumerate() {
            let kc = std::slice::from_raw_parts(k.add(c * ldk), d);
            let v = ar.iter().zip(kc).fold(0.0f32, |acc, (x, y)| x.mul_add(*y, acc));
            *out = v;
            if v > mx {
                mx = v;
            }
        }
        sr[n..].iter_mut().for_each(|x| *x = 0.0);
        if !rowmax.is_null() {
            *rowmax.add(r) = mx;
        }
    }
}

/// [`qk_direct_portable`] for an ISA.
pub fn qk_direct_kernel(isa: Isa) -> QkDirectFn {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512(isa) {
            return x86::qk_direct_avx512;
        }
        if avx2_fma(isa) {
            return x86::qk_direct_avx2;
        }
    }
    let _ = isa;
    qk_direct_portable
}

/// `qk` with the row maxima, for the softmax step, taken from the accumulators.
pub fn qk_max_kernel(isa: Isa) -> QkMaxFn {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512(isa) {
            return x86::qk_max_avx512;
        }
        if avx2_fma(isa) {
            return x86::qk_max_avx2;
        }
    }
    let _ = isa;
    qk_max_portable
}

/// The `(qk, pv)` pair for an ISA.
pub fn kernels(isa: Isa) -> (QkFn, PvFn) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (x86::qk_avx512, x86::pv_avx512),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (x86::qk_avx2, x86::pv_avx2),
        _ => (qk_portable, pv_portable),
    }
}

/// # Safety
/// `a` holds `rows` rows of `lda` floats (at least `d` used), `kt` holds `d` rows of `bk`
/// floats, `s` holds `rows` rows of `bk` floats.
pub unsafe extern "C" fn qk_portable(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64) {
    let (lda, rows, d, bk) = (lda as usize, rows as usize, d as usize, bk as usize);
    let a = std::slice::from_raw_parts(a, rows.saturating_sub(1) * lda + d);
    let kt = std::slice::from_raw_parts(kt, d * bk);
    let s = std::slice::from_raw_parts_mut(s, rows * bk);
    for r in 0..rows {
        let row = &mut s[r * bk..(r + 1) * bk];
        row.iter_mut().for_each(|x| *x = 0.0);
        for x in 0..d {
            let av = a[r * lda + x];
            for (o, k) in row.iter_mut().zip(&kt[x * bk..(x + 1) * bk]) {
                *o += av * k;
            }
        }
    }
}

/// # Safety
/// `p` holds `rows` rows of `ldp` floats, `v` holds `nk` rows of `ldv` floats (at least `dv`
/// used), `o` holds `rows` rows of `ldo` floats, `corr` is null or holds `rows` floats.
pub unsafe extern "C" fn pv_portable(p: *const f32, ldp: i64, v: *const f32, ldv: i64, o: *mut f32, ldo: i64, corr: *const f32, rows: i64, nk: i64, dv: i64) {
    let (ldp, ldv, ldo, rows, nk, dv) = (ldp as usize, ldv as usize, ldo as usize, rows as usize, nk as usize, dv as usize);
    for r in 0..rows {
        let orow = std::slice::from_raw_parts_mut(o.add(r * ldo), dv);
        if !corr.is_null() {
            let c = *corr.add(r);
            orow.iter_mut().for_each(|x| *x *= c);
        }
        for c in 0..nk {
            let pv = *p.add(r * ldp + c);
            let vrow = std::slice::from_raw_parts(v.add(c * ldv), dv);
            for (x, y) in orow.iter_mut().zip(vrow) {
                *x += pv * y;
            }
        }
    }
}

/// Channels `[e, dv)` of rows `[r, r + nr)` of `pv`, in scalar code (the vector kernels'
/// tail).
/// # Safety
/// As [`pv_portable`].
#[allow(clippy::too_many_arguments, dead_code)]
unsafe fn pv_tail(
    p: *const f32,
    ldp: usize,
    v: *const f32,
    ldv: usize,
    o: *mut f32,
    ldo: usize,
    corr: *const f32,
    r: usize,
    nr: usize,
    nk: usize,
    e: usize,
    dv: usize,
) {
    for rr in 0..nr {
        let c0 = if corr.is_null() { 1.0 } else { *corr.add(r + rr) };
        for ee in e..dv {
            let mut x = *o.add((r + rr) * ldo + ee) * c0;
            for c in 0..nk {
                x = (*p.add((r + rr) * ldp + c)).mul_add(*v.add(c * ldv + ee), x);
            }
            *o.add((r + rr) * ldo + ee) = x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{exp2_nonpos, pv_tail, EXP2_POLY, ROUND_MAGIC};
    use crate::cpu::tiled::{TANH_CLAMP, TANH_DEN, TANH_NUM};
    use std::arch::x86_64::*;

    /// `2^x` on 8 lanes for `x <= 0`, as [`super::exp2_nonpos`] (`max(lo, x)` returns `x`
    /// when it is NaN, and NaN compares false).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn exp2_nonpos8(x: __m256) -> __m256 {
        let magic = _mm256_set1_ps(ROUND_MAGIC);
        let lo = _mm256_set1_ps(-126.0);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let x = _mm256_max_ps(lo, x);
        let t = _mm256_add_ps(x, magic);
        let f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
        let mut p = _mm256_set1_ps(EXP2_POLY[0]);
        for k in &EXP2_POLY[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*k));
        }
        // t's low mantissa bits hold n = round(x) (two's complement), so `t << 23` is n in
        // the exponent field, and adding it to p's bits scales by 2^n: p ∈ [2^-½, 2^½] and
        // n ≥ -126 (n ≥ -125 when p < 1) keep the result normal (the same value as p · 2^n).
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(t));
        _mm256_andnot_ps(under, _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e)))
    }

    /// `2^x` on 16 lanes for `x <= 0`, as [`exp2_nonpos8`] (the same steps and constants).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp2_nonpos16(x: __m512) -> __m512 {
        let magic = _mm512_set1_ps(ROUND_MAGIC);
        let lo = _mm512_set1_ps(-126.0);
        // Not below −126, or unordered (NaN stays).
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, lo);
        let x = _mm512_max_ps(lo, x);
        let t = _mm512_add_ps(x, magic);
        let f = _mm512_sub_ps(x, _mm512_sub_ps(t, magic));
        let mut p = _mm512_set1_ps(EXP2_POLY[0]);
        for k in &EXP2_POLY[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*k));
        }
        let e = _mm512_slli_epi32::<23>(_mm512_castps_si512(t));
        _mm512_maskz_mov_ps(keep, _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e)))
    }

    /// The sum of a vector's two halves, as 8 lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn halves(v: __m512) -> __m256 {
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))))
    }

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }

    /// Horizontal max of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }

    /// Prefetches share `part` of `parts` of the cache lines of `bytes` bytes at `base` into
    /// L2: the matmuls spread the next key tile's panel over their row blocks, so that a
    /// long sequence's keys and values (beyond L2) arrive before they are needed.
    /// Prefetching never faults, so the panel past the last tile may be named.
    #[inline]
    unsafe fn prefetch_share(base: *const f32, bytes: usize, part: usize, parts: usize) {
        let lines = bytes.div_ceil(64);
        let per = lines.div_ceil(parts.max(1));
        let base = base as *const i8;
        for line in part * per..((part + 1) * per).min(lines) {
            _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(line * 64));
        }
    }

    /// The weights of `R` rows (`2^(s − mu[r])` in place over the first `n8` columns, a
    /// multiple of 8), `V::N` lanes at a time (on 16 lanes, a last block of 8 on 8),
    /// interleaved so that their dependency chains overlap; returns each row's sum on 8
    /// lanes.
    #[inline(always)]
    unsafe fn exp_rows<V: Lanes, const R: usize>(s: *mut f32, ld: usize, n8: usize, mu: &[f32]) -> [__m256; R] {
        let muv: [V; R] = std::array::from_fn(|r| V::splat(mu[r]));
        let mut sum = [V::splat(0.0); R];
        let mut c = 0;
        while c + V::N <= n8 {
            for r in 0..R {
                let at = s.add(r * ld + c);
                let p = V::load(at).sub(muv[r]).exp2_nonpos();
                p.store(at);
                sum[r] = sum[r].add(p);
            }
            c += V::N;
        }
        let mut sum8: [__m256; R] = std::array::from_fn(|r| sum[r].fold8());
        if c < n8 {
            for (r, sum_r) in sum8.iter_mut().enumerate() {
                let at = s.add(r * ld + c);
                let p = __m256::load(at).sub(__m256::splat(mu[r])).exp2_nonpos();
                p.store(at);
                *sum_r = sum_r.add(p);
            }
        }
        sum8
    }

    /// The horizontal sums of 8 vectors, as one vector (lane `i` sums `v[i]`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum8(v: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(v[4], v[5]);
        let t3 = _mm256_hadd_ps(v[6], v[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
    }

    /// Up to 8 rows (`g`) of the softmax step, their state (`[m, l, corr]`: maximum,
    /// denominator, rescale factor) 8 rows to a vector. A NaN score is not tracked in the
    /// max pass: its weight is NaN, so is the row's sum, and the row's state becomes NaN from
    /// there (the weights of other lanes stay finite, the row's output is NaN all the same).
    /// The weights on `V`'s lanes (the caller has its target features, and AVX2+FMA).
    #[inline(always)]
    unsafe fn softmax_group<V: Lanes>(s: *mut f32, ld: usize, g: usize, n: usize, [m, l, corr]: [*mut f32; 3], given: *const f32) {
        let n8 = n - n % 8;
        // Each row's maximum over the tile: given, or one pass over its scores.
        let mut tmax = [f32::NEG_INFINITY; 8];
        for (r, t) in tmax.iter_mut().enumerate().take(g) {
            let row = s.add(r * ld);
            if given.is_null() {
                let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut c = 0;
                while c < n8 {
                    mx = _mm256_max_ps(_mm256_loadu_ps(row.add(c)), mx);
                    c += 8;
                }
                *t = hmax(mx);
                for c in n8..n {
                    let x = *row.add(c);
                    *t = if x > *t { x } else { *t };
                }
            } else {
                *t = *given.add(r);
            }
        }
        // The row step on 8 lanes (as `row_step`): m_new = max(m, tmax) (NaN if either
        // is), m_use = m_new or 0 when it is −inf, corr = 2^(m − m_use), 0 below 2^-126.
        let mut m_old = [f32::NEG_INFINITY; 8];
        let mut l_old = [0f32; 8];
        m_old[..g].copy_from_slice(std::slice::from_raw_parts(m, g));
        l_old[..g].copy_from_slice(std::slice::from_raw_parts(l, g));
        let (mv, tv) = (_mm256_loadu_ps(m_old.as_ptr()), _mm256_loadu_ps(tmax.as_ptr()));
        let nan = _mm256_set1_ps(f32::NAN);
        let m_new = _mm256_blendv_ps(_mm256_max_ps(mv, tv), nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(mv, tv));
        let m_use = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_EQ_OQ>(m_new, _mm256_set1_ps(f32::NEG_INFINITY)));
        let d = _mm256_sub_ps(mv, m_use);
        let cr = exp2_nonpos8(d);
        let mut mu = [0f32; 8];
        _mm256_storeu_ps(mu.as_mut_ptr(), m_use);
        // The weights, 4 rows at a time.
        let mut sums = [_mm256_setzero_ps(); 8];
        let mut r = 0;
        while r < g {
            let sr = s.add(r * ld);
            let k = (g - r).min(4);
            match k {
                4 => sums[r..r + 4].copy_from_slice(&exp_rows::<V, 4>(sr, ld, n8, &mu[r..])),
                3 => sums[r..r + 3].copy_from_slice(&exp_rows::<V, 3>(sr, ld, n8, &mu[r..])),
                2 => sums[r..r + 2].copy_from_slice(&exp_rows::<V, 2>(sr, ld, n8, &mu[r..])),
                _ => sums[r..r + 1].copy_from_slice(&exp_rows::<V, 1>(sr, ld, n8, &mu[r..])),
            }
            r += k;
        }
        let mut total = [0f32; 8];
        _mm256_storeu_ps(total.as_mut_ptr(), hsum8(&sums));
        for (r, t) in total.iter_mut().enumerate().take(g) {
            let row = s.add(r * ld);
            for c in n8..n {
                let p = exp2_nonpos(*row.add(c) - mu[r]);
                *row.add(c) = p;
                *t += p;
            }
        }
        let tv = _mm256_loadu_ps(total.as_ptr());
        let l_new = _mm256_fmadd_ps(_mm256_loadu_ps(l_old.as_ptr()), cr, tv);
        let m_new = _mm256_blendv_ps(m_new, nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(tv, tv));
        let (mut mo, mut lo, mut co) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(mo.as_mut_ptr(), m_new);
        _mm256_storeu_ps(lo.as_mut_ptr(), l_new);
        _mm256_storeu_ps(co.as_mut_ptr(), cr);
        std::ptr::copy_nonoverlapping(mo.as_ptr(), m, g);
        std::ptr::copy_nonoverlapping(lo.as_ptr(), l, g);
        std::ptr::copy_nonoverlapping(co.as_ptr(), corr, g);
    }

    /// [`super::softmax_portable`], rows in groups of 8, the weights on `V`'s lanes.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn softmax_on<V: Lanes>(s: *mut f32, ld: i64, rows: i64, n: i64, m: *mut f32, l: *mut f32, corr: *mut f32, tmax: *const f32) {
        let (ld, rows, n) = (ld as usize, rows as usize, n as usize);
        let mut r = 0;
        while r < rows {
            let g = (rows - r).min(8);
            let tr = if tmax.is_null() { tmax } else { tmax.add(r) };
            softmax_group::<V>(s.add(r * ld), ld, g, n, [m.add(r), l.add(r), corr.add(r)], tr);
            r += g;
        }
    }

    /// AVX2+FMA: [`super::softmax_portable`] 8 lanes at a time (scalar tail).
    /// # Safety
    /// As [`super::softmax_portable`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn softmax_avx2(s: *mut f32, ld: i64, rows: i64, n: i64, m: *mut f32, l: *mut f32, corr: *mut f32, tmax: *const f32) {
        softmax_on::<__m256>(s, ld, rows, n, m, l, corr, tmax)
    }

    /// AVX-512F: [`softmax_avx2`] with the weights 16 lanes at a time.
    /// # Safety
    /// As [`super::softmax_portable`]; the CPU has AVX-512F (and so AVX2 and FMA).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe extern "C" fn softmax_avx512(s: *mut f32, ld: i64, rows: i64, n: i64, m: *mut f32, l: *mut f32, corr: *mut f32, tmax: *const f32) {
        softmax_on::<__m512>(s, ld, rows, n, m, l, corr, tmax)
    }

    /// The element-wise routines' vector operations at one width: 8 lanes (AVX2+FMA) or 16
    /// (AVX-512F). The generic routines below are `inline(always)` and called only from
    /// functions with that width's target features, into which these inline.
    trait Lanes: Copy {
        const N: usize;
        unsafe fn splat(x: f32) -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn store(self, p: *mut f32);
        unsafe fn sub(self, b: Self) -> Self;
        unsafe fn mul(self, b: Self) -> Self;
        unsafe fn add(self, b: Self) -> Self;
        /// The lanes summed down to 8 (the 8-lane vector itself).
        unsafe fn fold8(self) -> __m256;
        unsafe fn exp2_nonpos(self) -> Self;
        /// 0 in the lanes that hold −inf.
        unsafe fn ninf_to_zero(self) -> Self;
        unsafe fn div(self, b: Self) -> Self;
        /// `self · b + c`.
        unsafe fn fmadd(self, b: Self, c: Self) -> Self;
        /// Clamped into `[lo, hi]` (NaN stays).
        unsafe fn clamp(self, lo: f32, hi: f32) -> Self;

        /// `c · tanh(self)` by the rational form, clamped at ±[`TANH_CLAMP`] (NaN stays).
        #[inline(always)]
        unsafe fn tanh_times(self, c: Self) -> Self {
            let v = self.clamp(-TANH_CLAMP, TANH_CLAMP);
            let x2 = v.mul(v);
            let p = TANH_NUM[1..].iter().fold(Self::splat(TANH_NUM[0]), |p, &k| x2.fmadd(p, Self::splat(k)));
            let q = TANH_DEN[1..].iter().fold(Self::splat(TANH_DEN[0]), |q, &k| x2.fmadd(q, Self::splat(k)));
            c.mul(v.mul(p).div(q))
        }
    }

    impl Lanes for __m256 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            _mm256_sub_ps(self, b)
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            _mm256_mul_ps(self, b)
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            _mm256_add_ps(self, b)
        }
        #[inline(always)]
        unsafe fn fold8(self) -> __m256 {
            self
        }
        #[inline(always)]
        unsafe fn exp2_nonpos(self) -> Self {
            exp2_nonpos8(self)
        }
        #[inline(always)]
        unsafe fn ninf_to_zero(self) -> Self {
            _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(self, _mm256_set1_ps(f32::NEG_INFINITY)), self)
        }
        #[inline(always)]
        unsafe fn div(self, b: Self) -> Self {
            _mm256_div_ps(self, b)
        }
        #[inline(always)]
        unsafe fn fmadd(self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: f32, hi: f32) -> Self {
            let (hi, lo) = (_mm256_set1_ps(hi), _mm256_set1_ps(lo));
            // Compare-and-select (NaN compares false and stays).
            let v = _mm256_blendv_ps(self, hi, _mm256_cmp_ps::<_CMP_GT_OQ>(self, hi));
            _mm256_blendv_ps(v, lo, _mm256_cmp_ps::<_CMP_LT_OQ>(v, lo))
        }
    }

    impl Lanes for __m512 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            _mm512_sub_ps(self, b)
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            _mm512_mul_ps(self, b)
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            _mm512_add_ps(self, b)
        }
        #[inline(always)]
        unsafe fn fold8(self) -> __m256 {
            halves(self)
        }
        #[inline(always)]
        unsafe fn exp2_nonpos(self) -> Self {
            exp2_nonpos16(self)
        }
        #[inline(always)]
        unsafe fn ninf_to_zero(self) -> Self {
            _mm512_mask_mov_ps(self, _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self, _mm512_set1_ps(f32::NEG_INFINITY)), _mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn div(self, b: Self) -> Self {
            _mm512_div_ps(self, b)
        }
        #[inline(always)]
        unsafe fn fmadd(self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: f32, hi: f32) -> Self {
            let (hi, lo) = (_mm512_set1_ps(hi), _mm512_set1_ps(lo));
            // Masked moves (NaN compares false and stays).
            let v = _mm512_mask_mov_ps(self, _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self, hi), hi);
            _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, lo), lo)
        }
    }

    /// Per row `r`: `p = init(r)` (what the row's elements share), then `f(p, c, at)` on its
    /// first `n − n % V::N` elements, `V::N` lanes at a time, and `tail(p, c, at)` on the rest.
    #[inline(always)]
    unsafe fn each_row<V: Lanes, P: Copy>(
        s: *mut f32,
        ld: i64,
        rows: i64,
        n: i64,
        mut init: impl FnMut(usize) -> P,
        mut f: impl FnMut(P, usize, *mut f32),
        mut tail: impl FnMut(P, usize, *mut f32),
    ) {
        let (ld, rows, n) = (ld as usize, rows as usize, n as usize);
        let nv = n - n % V::N;
        for r in 0..rows {
            let (row, p) = (s.add(r * ld), init(r));
            let mut c = 0;
            while c < nv {
                f(p, c, row.add(c));
                c += V::N;
            }
            for c in nv..n {
                tail(p, c, row.add(c));
            }
        }
    }

    /// [`super::weights_portable`] on `V`'s lanes (scalar tail).
    #[inline(always)]
    unsafe fn weights_on<V: Lanes>(s: *mut f32, ld: i64, rows: i64, n: i64, m: *const f32, scale: *const f32) {
        each_row::<V, (f32, f32)>(
            s,
            ld,
            rows,
            n,
            // A row with no live key so far (m = −inf) subtracts 0.
            |r| (if *m.add(r) == f32::NEG_INFINITY { 0.0 } else { *m.add(r) }, *scale.add(r)),
            |(mu, k), _, at| V::load(at).sub(V::splat(mu)).exp2_nonpos().mul(V::splat(k)).store(at),
            |(mu, k), _, at| *at = exp2_nonpos(*at - mu) * k,
        );
    }

    /// [`super::exp_cols_portable`] on `V`'s lanes (scalar tail; a −inf statistic subtracts 0).
    #[inline(always)]
    unsafe fn exp_cols_on<V: Lanes>(s: *mut f32, ld: i64, rows: i64, n: i64, t: *const f32) {
        each_row::<V, ()>(
            s,
            ld,
            rows,
            n,
            |_| (),
            |_, c, at| V::load(at).sub(V::load(t.add(c)).ninf_to_zero()).exp2_nonpos().store(at),
            |_, c, at| {
                let tc = *t.add(c);
                *at = exp2_nonpos(*at - if tc == f32::NEG_INFINITY { 0.0 } else { tc });
            },
        );
    }

    /// [`super::tanh_scale_portable`] on `V`'s lanes (scalar tail).
    #[inline(always)]
    unsafe fn tanh_scale_on<V: Lanes>(s: *mut f32, ld: i64, rows: i64, n: i64, c: i64) {
        let cs = f32::from_bits(c as u32);
        each_row::<V, ()>(s, ld, rows, n, |_| (), |_, _, at| V::load(at).tanh_times(V::splat(cs)).store(at), |_, _, at| *at = cs * super::tanh_rational(*at));
    }

    /// AVX2+FMA: [`super::weights_portable`] 8 lanes at a time.
    /// # Safety
    /// As [`super::weights_portable`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn weights_avx2(s: *mut f32, ld: i64, rows: i64, n: i64, m: *const f32, scale: *const f32) {
        weights_on::<__m256>(s, ld, rows, n, m, scale)
    }

    /// AVX-512F: [`super::weights_portable`] 16 lanes at a time.
    /// # Safety
    /// As [`super::weights_portable`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn weights_avx512(s: *mut f32, ld: i64, rows: i64, n: i64, m: *const f32, scale: *const f32) {
        weights_on::<__m512>(s, ld, rows, n, m, scale)
    }

    /// AVX2+FMA: [`super::exp_cols_portable`] 8 lanes at a time.
    /// # Safety
    /// As [`super::exp_cols_portable`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn exp_cols_avx2(s: *mut f32, ld: i64, rows: i64, n: i64, t: *const f32) {
        exp_cols_on::<__m256>(s, ld, rows, n, t)
    }

    /// AVX-512F: [`super::exp_cols_portable`] 16 lanes at a time.
    /// # Safety
    /// As [`super::exp_cols_portable`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn exp_cols_avx512(s: *mut f32, ld: i64, rows: i64, n: i64, t: *const f32) {
        exp_cols_on::<__m512>(s, ld, rows, n, t)
    }

    /// AVX2+FMA: [`super::tanh_scale_portable`] 8 lanes at a time.
    /// # Safety
    /// As [`super::tanh_scale_portable`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn tanh_scale_avx2(s: *mut f32, ld: i64, rows: i64, n: i64, c: i64) {
        tanh_scale_on::<__m256>(s, ld, rows, n, c)
    }

    /// AVX-512F: [`super::tanh_scale_portable`] 16 lanes at a time.
    /// # Safety
    /// As [`super::tanh_scale_portable`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn tanh_scale_avx512(s: *mut f32, ld: i64, rows: i64, n: i64, c: i64) {
        tanh_scale_on::<__m512>(s, ld, rows, n, c)
    }

    /// The 6 × 16 inner loop both tile matmuls share, in assembly so that the 12
    /// accumulators, the two panel vectors and two broadcasts use all 16 ymm registers and
    /// no address arithmetic sits in the loop (the compiler's version chained the row
    /// addresses and reloaded the loop bound from the stack):
    /// `acc[r] += rows[r · ld + x] · panel[x · step .. + 16]` for `r < 6`, `x < n`, with
    /// `ld` and `step` in bytes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma_6x16(acc: &mut [[__m256; 2]; 6], rows: *const f32, ld: usize, panel: *const f32, step: usize, n: usize) {
        if n == 0 {
            return;
        }
        let r3 = (rows as *const u8).add(3 * ld);
        let [[mut a0, mut a1], [mut a2, mut a3], [mut a4, mut a5], [mut a6, mut a7], [mut a8, mut a9], [mut a10, mut a11]] = *acc;
        std::arch::asm!(
            "2:",
            "vmovups ymm12, [{k}]",
            "vmovups ymm13, [{k} + 32]",
            "vbroadcastss ymm14, [{r0}]",
            "vbroadcastss ymm15, [{r0} + {ld}]",
            "vfmadd231ps ymm0, ymm14, ymm12",
            "vfmadd231ps ymm1, ymm14, ymm13",
            "vfmadd231ps ymm2, ymm15, ymm12",
            "vfmadd231ps ymm3, ymm15, ymm13",
            "vbroadcastss ymm14, [{r0} + {ld} * 2]",
            "vbroadcastss ymm15, [{r3}]",
            "vfmadd231ps ymm4, ymm14, ymm12",
            "vfmadd231ps ymm5, ymm14, ymm13",
            "vfmadd231ps ymm6, ymm15, ymm12",
            "vfmadd231ps ymm7, ymm15, ymm13",
            "vbroadcastss ymm14, [{r3} + {ld}]",
            "vbroadcastss ymm15, [{r3} + {ld} * 2]",
            "vfmadd231ps ymm8, ymm14, ymm12",
            "vfmadd231ps ymm9, ymm14, ymm13",
            "vfmadd231ps ymm10, ymm15, ymm12",
            "vfmadd231ps ymm11, ymm15, ymm13",
            "add {r0}, 4",
            "add {r3}, 4",
            "add {k}, {step}",
            "dec {n}",
            "jnz 2b",
            r0 = inout(reg) rows => _,
            r3 = inout(reg) r3 => _,
            ld = in(reg) ld,
            k = inout(reg) panel => _,
            step = in(reg) step,
            n = inout(reg) n => _,
            inout("ymm0") a0,
            inout("ymm1") a1,
            inout("ymm2") a2,
            inout("ymm3") a3,
            inout("ymm4") a4,
            inout("ymm5") a5,
            inout("ymm6") a6,
            inout("ymm7") a7,
            inout("ymm8") a8,
            inout("ymm9") a9,
            inout("ymm10") a10,
            inout("ymm11") a11,
            out("ymm12") _,
            out("ymm13") _,
            out("ymm14") _,
            out("ymm15") _,
            options(nostack, readonly),
        );
        *acc = [[a0, a1], [a2, a3], [a4, a5], [a6, a7], [a8, a9], [a10, a11]];
    }

    /// `acc[r] += rows[r][x] · panel[x][..16]` (`ld`, `step` in floats): [`fma_6x16`] for 6
    /// rows, intrinsics for fewer.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma_rows<const R: usize>(acc: &mut [[__m256; 2]; R], rows: *const f32, ld: usize, panel: *const f32, step: usize, n: usize) {
        if R == 6 {
            // SAFETY: R == 6, so the two array types are the same.
            let acc6 = &mut *(acc as *mut [[__m256; 2]; R] as *mut [[__m256; 2]; 6]);
            return fma_6x16(acc6, rows, ld * 4, panel, step * 4, n);
        }
        let mut kp = panel;
        for x in 0..n {
            let k0 = _mm256_loadu_ps(kp);
            let k1 = _mm256_loadu_ps(kp.add(8));
            for (rr, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*rows.add(rr * ld + x));
                acc_r[0] = _mm256_fmadd_ps(av, k0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(av, k1, acc_r[1]);
            }
            kp = kp.add(step);
        }
    }

    /// `R` rows × 16 columns of `s` from `a` and the key panel: `2R` accumulators that
    /// stay in registers because `R` is a constant. Returns each row's 8-lane maximum of
    /// the 16 scores (dropped by the compiler where unused).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn qk_block_avx2<const R: usize>(a: *const f32, lda: usize, kt: *const f32, s: *mut f32, d: usize, bk: usize, c: usize) -> [__m256; R] {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        fma_rows::<R>(&mut acc, a, lda, kt.add(c), bk, d);
        let mut mx = [_mm256_setzero_ps(); R];
        for (rr, acc_r) in acc.iter().enumerate() {
            let sp = s.add(rr * bk + c);
            _mm256_storeu_ps(sp, acc_r[0]);
            _mm256_storeu_ps(sp.add(8), acc_r[1]);
            mx[rr] = _mm256_max_ps(acc_r[0], acc_r[1]);
        }
        mx
    }

    /// `R` rows of `s`, all `bk` columns; with `rowmax` non-null, also each row's maximum
    /// (a NaN score may be left out of it).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn qk_rows_avx2<const R: usize>(a: *const f32, lda: usize, kt: *const f32, s: *mut f32, d: usize, bk: usize, rowmax: *mut f32) {
        let mut mx = [_mm256_set1_ps(f32::NEG_INFINITY); R];
        let mut c = 0;
        while c < bk {
            let m = qk_block_avx2::<R>(a, lda, kt, s, d, bk, c);
            if !rowmax.is_null() {
                for (mx, m) in mx.iter_mut().zip(m) {
                    *mx = _mm256_max_ps(m, *mx);
                }
            }
            c += 16;
        }
        if !rowmax.is_null() {
            for (rr, mx) in mx.iter().enumerate() {
                *rowmax.add(rr) = hmax(*mx);
            }
        }
    }

    /// AVX2+FMA: [`super::qk_direct_portable`], 8 channels at a time, one key row per step.
    /// # Safety
    /// As [`super::qk_direct_portable`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn qk_direct_avx2(
        a: *const f32,
        lda: i64,
        k: *const f32,
        ldk: i64,
        s: *mut f32,
        lds: i64,
        rows: i64,
        d: i64,
        n: i64,
        rowmax: *mut f32,
    ) {
        qk_direct_on::<__m256>(a, lda, k, ldk, s, lds, rows, d, n, rowmax)
    }

    /// AVX-512F: [`super::qk_direct_portable`], 16 channels at a time, one key row per step.
    /// # Safety
    /// As [`super::qk_direct_portable`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe extern "C" fn qk_direct_avx512(
        a: *const f32,
        lda: i64,
        k: *const f32,
        ldk: i64,
        s: *mut f32,
        lds: i64,
        rows: i64,
        d: i64,
        n: i64,
        rowmax: *mut f32,
    ) {
        qk_direct_on::<__m512>(a, lda, k, ldk, s, lds, rows, d, n, rowmax)
    }

    /// [`super::qk_direct_portable`] at one vector width. Eight keys at a time, and for them
    /// each query row of a block of [`super::DIRECT_ROWS`] (the eight key rows stay in L1
    /// across the rows): eight vectors of partial dot products over the channels (eight
    /// independent chains, the query row loaded once per step), summed across their lanes
    /// together ([`hsum8`]: one vector of eight scores), plus a scalar tail of channels. The
    /// keys past the last eight one at a time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn qk_direct_on<V: Lanes>(a: *const f32, lda: i64, k: *const f32, ldk: i64, s: *mut f32, lds: i64, rows: i64, d: i64, n: i64, rowmax: *mut f32) {
        const R: usize = super::DIRECT_ROWS as usize;
        let (lda, ldk, lds, rows, d, n) = (lda as usize, ldk as usize, lds as usize, rows as usize, d as usize, n as usize);
        let full = d - d % V::N;
        let n8 = n - n % 8;
        let dot_tail = |ar: *const f32, kc: *const f32, v: f32| (full..d).fold(v, |v, y| (*ar.add(y)).mul_add(*kc.add(y), v));
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(R);
            // NaN scores stay out of the maxima: `max_ps` returns its second operand when
            // either is NaN, and a running maximum is never NaN.
            let mut vmx = [_mm256_set1_ps(f32::NEG_INFINITY); R];
            let mut c = 0;
            while c < n8 {
                let kc = k.add(c * ldk);
                for (rr, vmx) in vmx[..nr].iter_mut().enumerate() {
                    let ar = a.add((r0 + rr) * lda);
                    let mut acc = [V::splat(0.0); 8];
                    let mut x = 0;
                    while x < full {
                        let av = V::load(ar.add(x));
                        for (t, acc) in acc.iter_mut().enumerate() {
                            *acc = av.fmadd(V::load(kc.add(t * ldk + x)), *acc);
                        }
                        x += V::N;
                    }
                    let mut folded = [_mm256_setzero_ps(); 8];
                    for (f, acc) in folded.iter_mut().zip(acc) {
                        *f = acc.fold8();
                    }
                    let mut sums = hsum8(&folded);
                    if full < d {
                        let mut tail = [0f32; 8];
                        for (t, v) in tail.iter_mut().enumerate() {
                            *v = dot_tail(ar, kc.add(t * ldk), 0.0);
                        }
                        sums = _mm256_add_ps(sums, _mm256_loadu_ps(tail.as_ptr()));
                    }
                    _mm256_storeu_ps(s.add((r0 + rr) * lds + c), sums);
                    *vmx = _mm256_max_ps(sums, *vmx);
                }
                c += 8;
            }
            for (rr, vmx) in vmx[..nr].iter().enumerate() {
                let (ar, sr) = (a.add((r0 + rr) * lda), s.add((r0 + rr) * lds));
                let mut mx = hmax(*vmx);
                for c in n8..n {
                    let kc = k.add(c * ldk);
                    let mut acc = V::splat(0.0);
                    let mut x = 0;
                    while x < full {
                        acc = V::load(ar.add(x)).fmadd(V::load(kc.add(x)), acc);
                        x += V::N;
                    }
                    let v = dot_tail(ar, kc, hsum(acc.fold8()));
                    *sr.add(c) = v;
                    if v > mx {
                        mx = v;
                    }
                }
                for c in n..lds {
                    *sr.add(c) = 0.0;
                }
                if !rowmax.is_null() {
                    *rowmax.add(r0 + rr) = mx;
                }
            }
            r0 += nr;
        }
    }

    /// AVX2: blocks of 6 rows × 16 columns (12 ymm accumulators), broadcasting `a`.
    /// # Safety
    /// As [`super::qk_portable`]; `bk` is a multiple of 16; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn qk_avx2(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64) {
        qk_max_avx2(a, lda, kt, s, rows, d, bk, std::ptr::null_mut())
    }

    /// [`qk_avx2`] that also writes each row's maximum score to `rowmax` (when not null).
    /// # Safety
    /// As [`super::qk_max_portable`]; `bk` is a multiple of 16; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn qk_max_avx2(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64, rowmax: *mut f32) {
        let (lda, rows, d, bk) = (lda as usize, rows as usize, d as usize, bk as usize);
        let next = kt.wrapping_add(d * bk);
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(6);
            prefetch_share(next, d * bk * 4, r / 6, rows.div_ceil(6));
            let (ar, sr) = (a.add(r * lda), s.add(r * bk));
            let mr = if rowmax.is_null() { rowmax } else { rowmax.add(r) };
            match nr {
                6 => qk_rows_avx2::<6>(ar, lda, kt, sr, d, bk, mr),
                5 => qk_rows_avx2::<5>(ar, lda, kt, sr, d, bk, mr),
                4 => qk_rows_avx2::<4>(ar, lda, kt, sr, d, bk, mr),
                3 => qk_rows_avx2::<3>(ar, lda, kt, sr, d, bk, mr),
                2 => qk_rows_avx2::<2>(ar, lda, kt, sr, d, bk, mr),
                _ => qk_rows_avx2::<1>(ar, lda, kt, sr, d, bk, mr),
            }
            r += nr;
        }
    }

    /// `R` rows × 16 channels of `o`: scale by `corr`, then add `p·v` over `nk` keys.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_block_avx2<const R: usize>(
        p: *const f32,
        ldp: usize,
        v: *const f32,
        ldv: usize,
        o: *mut f32,
        ldo: usize,
        corr: *const f32,
        nk: usize,
        e: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (rr, acc_r) in acc.iter_mut().enumerate() {
            let op = o.add(rr * ldo + e);
            let mut x0 = _mm256_loadu_ps(op);
            let mut x1 = _mm256_loadu_ps(op.add(8));
            if !corr.is_null() {
                let cv = _mm256_set1_ps(*corr.add(rr));
                x0 = _mm256_mul_ps(x0, cv);
                x1 = _mm256_mul_ps(x1, cv);
            }
            *acc_r = [x0, x1];
        }
        fma_rows::<R>(&mut acc, p, ldp, v.add(e), ldv, nk);
        for (rr, acc_r) in acc.iter().enumerate() {
            let op = o.add(rr * ldo + e);
            _mm256_storeu_ps(op, acc_r[0]);
            _mm256_storeu_ps(op.add(8), acc_r[1]);
        }
    }

    /// AVX2: blocks of 6 rows × 16 output channels, broadcasting `p`; scalar channel tail.
    /// # Safety
    /// As [`super::pv_portable`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn pv_avx2(p: *const f32, ldp: i64, v: *const f32, ldv: i64, o: *mut f32, ldo: i64, corr: *const f32, rows: i64, nk: i64, dv: i64) {
        let (ldp, ldv, ldo, rows, nk, dv) = (ldp as usize, ldv as usize, ldo as usize, rows as usize, nk as usize, dv as usize);
        let next = v.wrapping_add(nk * ldv);
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(6);
            prefetch_share(next, nk * ldv * 4, r / 6, rows.div_ceil(6));
            let (pr, or) = (p.add(r * ldp), o.add(r * ldo));
            let cr = if corr.is_null() { corr } else { corr.add(r) };
            let mut e = 0;
            while e + 16 <= dv {
                match nr {
                    6 => pv_block_avx2::<6>(pr, ldp, v, ldv, or, ldo, cr, nk, e),
                    5 => pv_block_avx2::<5>(pr, ldp, v, ldv, or, ldo, cr, nk, e),
                    4 => pv_block_avx2::<4>(pr, ldp, v, ldv, or, ldo, cr, nk, e),
                    3 => pv_block_avx2::<3>(pr, ldp, v, ldv, or, ldo, cr, nk, e),
                    2 => pv_block_avx2::<2>(pr, ldp, v, ldv, or, ldo, cr, nk, e),
                    _ => pv_block_avx2::<1>(pr, ldp, v, ldv, or, ldo, cr, nk, e),
                }
                e += 16;
            }
            // Channel tail: scalar.
            pv_tail(p, ldp, v, ldv, o, ldo, corr, r, nr, nk, e, dv);
            r += nr;
        }
    }

    /// `acc[r][w] += rows[r · ld + x] · panel[x · step + 16w ..][..16]` for `r < R`, `w < W`,
    /// `x < n` (`ld`, `step` in floats): the inner loop both AVX-512 matmuls share. With
    /// `R = 6`, `W = 4` its 24 accumulators, 4 panel vectors and a broadcast fit the 32 zmm
    /// registers: per step 4 loads and 6 broadcasts feed 24 FMAs.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn fma_zmm<const R: usize, const W: usize>(acc: &mut [[__m512; W]; R], rows: *const f32, ld: usize, panel: *const f32, step: usize, n: usize) {
        let mut kp = panel;
        for x in 0..n {
            let k: [__m512; W] = std::array::from_fn(|w| _mm512_loadu_ps(kp.add(16 * w)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*rows.add(r * ld + x));
                for (a, kw) in acc_r.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(av, *kw, *a);
                }
            }
            kp = kp.add(step);
        }
    }

    /// `R` rows × `16W` columns of `s` from `a` and the key panel; returns each row's
    /// 16-lane maximum of them (a NaN score left out).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn qk_block_avx512<const R: usize, const W: usize>(
        a: *const f32,
        lda: usize,
        kt: *const f32,
        s: *mut f32,
        d: usize,
        bk: usize,
        c: usize,
        mx: &mut [__m512; R],
    ) {
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        fma_zmm::<R, W>(&mut acc, a, lda, kt.add(c), bk, d);
        for (r, acc_r) in acc.iter().enumerate() {
            for (w, x) in acc_r.iter().enumerate() {
                _mm512_storeu_ps(s.add(r * bk + c + 16 * w), *x);
                // `max(x, m)` returns `m` where `x` is NaN.
                mx[r] = _mm512_max_ps(*x, mx[r]);
            }
        }
    }

    /// `R` rows of `s`, all `bk` columns (64 at a time, then the remaining 16s); with
    /// `rowmax` non-null, also each row's maximum.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn qk_rows_avx512<const R: usize>(a: *const f32, lda: usize, kt: *const f32, s: *mut f32, d: usize, bk: usize, rowmax: *mut f32) {
        let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); R];
        let mut c = 0;
        while c < bk {
            let w = ((bk - c) / 16).min(4);
            match w {
                4 => qk_block_avx512::<R, 4>(a, lda, kt, s, d, bk, c, &mut mx),
                3 => qk_block_avx512::<R, 3>(a, lda, kt, s, d, bk, c, &mut mx),
                2 => qk_block_avx512::<R, 2>(a, lda, kt, s, d, bk, c, &mut mx),
                _ => qk_block_avx512::<R, 1>(a, lda, kt, s, d, bk, c, &mut mx),
            }
            c += 16 * w.max(1);
        }
        if !rowmax.is_null() {
            for (r, m) in mx.iter().enumerate() {
                *rowmax.add(r) = _mm512_reduce_max_ps(*m);
            }
        }
    }

    /// AVX-512F: blocks of 6 rows × 64 columns (24 zmm accumulators), broadcasting `a`.
    /// # Safety
    /// As [`super::qk_portable`]; `bk` is a multiple of 16; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn qk_avx512(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64) {
        qk_max_avx512(a, lda, kt, s, rows, d, bk, std::ptr::null_mut())
    }

    /// [`qk_avx512`] that also writes each row's maximum score to `rowmax` (when not null),
    /// taken from the accumulators.
    /// # Safety
    /// As [`super::qk_max_portable`]; `bk` is a multiple of 16; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn qk_max_avx512(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64, rowmax: *mut f32) {
        let (lda, rows, d, bk) = (lda as usize, rows as usize, d as usize, bk as usize);
        let next = kt.wrapping_add(d * bk);
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(6);
            prefetch_share(next, d * bk * 4, r / 6, rows.div_ceil(6));
            let (ar, sr) = (a.add(r * lda), s.add(r * bk));
            let mr = if rowmax.is_null() { rowmax } else { rowmax.add(r) };
            match nr {
                6 => qk_rows_avx512::<6>(ar, lda, kt, sr, d, bk, mr),
                5 => qk_rows_avx512::<5>(ar, lda, kt, sr, d, bk, mr),
                4 => qk_rows_avx512::<4>(ar, lda, kt, sr, d, bk, mr),
                3 => qk_rows_avx512::<3>(ar, lda, kt, sr, d, bk, mr),
                2 => qk_rows_avx512::<2>(ar, lda, kt, sr, d, bk, mr),
                _ => qk_rows_avx512::<1>(ar, lda, kt, sr, d, bk, mr),
            }
            r += nr;
        }
    }

    /// `R` rows × `16W` channels of `o` from channel `e`: scale by `corr`, then add `p·v`
    /// over `nk` keys.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_block_avx512<const R: usize, const W: usize>(
        p: *const f32,
        ldp: usize,
        v: *const f32,
        ldv: usize,
        o: *mut f32,
        ldo: usize,
        corr: *const f32,
        nk: usize,
        e: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let op = o.add(r * ldo + e);
            for (w, x) in acc_r.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(op.add(16 * w));
                if !corr.is_null() {
                    *x = _mm512_mul_ps(*x, _mm512_set1_ps(*corr.add(r)));
                }
            }
        }
        fma_zmm::<R, W>(&mut acc, p, ldp, v.add(e), ldv, nk);
        for (r, acc_r) in acc.iter().enumerate() {
            for (w, x) in acc_r.iter().enumerate() {
                _mm512_storeu_ps(o.add(r * ldo + e + 16 * w), *x);
            }
        }
    }

    /// `R` rows of `o`: 64 channels at a time, then the remaining 16s, then a scalar tail.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_rows_avx512<const R: usize>(
        p: *const f32,
        ldp: usize,
        v: *const f32,
        ldv: usize,
        o: *mut f32,
        ldo: usize,
        corr: *const f32,
        nk: usize,
        dv: usize,
    ) {
        let mut e = 0;
        while e + 16 <= dv {
            let w = ((dv - e) / 16).min(4);
            match w {
                4 => pv_block_avx512::<R, 4>(p, ldp, v, ldv, o, ldo, corr, nk, e),
                3 => pv_block_avx512::<R, 3>(p, ldp, v, ldv, o, ldo, corr, nk, e),
                2 => pv_block_avx512::<R, 2>(p, ldp, v, ldv, o, ldo, corr, nk, e),
                _ => pv_block_avx512::<R, 1>(p, ldp, v, ldv, o, ldo, corr, nk, e),
            }
            e += 16 * w;
        }
        pv_tail(p, ldp, v, ldv, o, ldo, corr, 0, R, nk, e, dv);
    }

    /// AVX-512F: blocks of 6 rows × 64 output channels (24 zmm accumulators), broadcasting
    /// `p`; scalar channel tail.
    /// # Safety
    /// As [`super::pv_portable`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn pv_avx512(p: *const f32, ldp: i64, v: *const f32, ldv: i64, o: *mut f32, ldo: i64, corr: *const f32, rows: i64, nk: i64, dv: i64) {
        let (ldp, ldv, ldo, rows, nk, dv) = (ldp as usize, ldv as usize, ldo as usize, rows as usize, nk as usize, dv as usize);
        let next = v.wrapping_add(nk * ldv);
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(6);
            prefetch_share(next, nk * ldv * 4, r / 6, rows.div_ceil(6));
            let (pr, or) = (p.add(r * ldp), o.add(r * ldo));
            let cr = if corr.is_null() { corr } else { corr.add(r) };
            match nr {
                6 => pv_rows_avx512::<6>(pr, ldp, v, ldv, or, ldo, cr, nk, dv),
                5 => pv_rows_avx512::<5>(pr, ldp, v, ldv, or, ldo, cr, nk, dv),
                4 => pv_rows_avx512::<4>(pr, ldp, v, ldv, or, ldo, cr, nk, dv),
                3 => pv_rows_avx512::<3>(pr, ldp, v, ldv, or, ldo, cr, nk, dv),
                2 => pv_rows_avx512::<2>(pr, ldp, v, ldv, or, ldo, cr, nk, dv),
                _ => pv_rows_avx512::<1>(pr, ldp, v, ldv, or, ldo, cr, nk, dv),
            }
            r += nr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each shape exercises other blocks: row tails (13, 7), a tile of 64 (AVX-512's 6 × 64
    /// block), 48 and 80 columns or channels (blocks of 3 and 4 + 1 vectors), channel tails.
    fn check(isa: Isa) {
        for (rows, d, bk, dv, lda) in [(13usize, 19usize, 32usize, 21usize, 24usize), (64, 64, 64, 64, 64), (7, 5, 48, 70, 9), (6, 8, 80, 37, 8)] {
            check_shape(isa, rows, d, bk, dv, lda);
        }
    }

    fn check_shape(isa: Isa, rows: usize, d: usize, bk: usize, dv: usize, lda: usize) {
        let (qk, pv) = kernels(isa);
        let a: Vec<f32> = (0..rows * lda).map(|x| ((x * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let kt: Vec<f32> = (0..d * bk).map(|x| ((x * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let mut s = vec![0f32; rows * bk];
        unsafe { qk(a.as_ptr(), lda as i64, kt.as_ptr(), s.as_mut_ptr(), rows as i64, d as i64, bk as i64) };
        for r in 0..rows {
            for c in 0..bk {
                let want: f32 = (0..d).map(|x| a[r * lda + x] * kt[x * bk + c]).sum();
                assert!((s[r * bk + c] - want).abs() < 1e-4, "{isa:?} qk ({r},{c}): {} vs {want}", s[r * bk + c]);
            }
        }
        // The same scores with each row's maximum.
        let mut s2 = vec![0f32; rows * bk];
        let mut rowmax = vec![0f32; rows];
        unsafe { qk_max_kernel(isa)(a.as_ptr(), lda as i64, kt.as_ptr(), s2.as_mut_ptr(), rows as i64, d as i64, bk as i64, rowmax.as_mut_ptr()) };
        for r in 0..rows {
            let row = &s2[r * bk..(r + 1) * bk];
            assert!(row.iter().zip(&s[r * bk..(r + 1) * bk]).all(|(x, y)| (x - y).abs() < 1e-4), "{isa:?} qk_max row {r} scores");
            assert_eq!(rowmax[r], row.iter().cloned().fold(f32::NEG_INFINITY, f32::max), "{isa:?} qk_max row {r} maximum");
        }
        // The same scores from the key rows in place (`kt` transposed into rows of `ldk`
        // floats), on the first `n` columns; the rest of each row zeroed.
        let ldk = d + 3;
        let krows: Vec<f32> = (0..bk * ldk).map(|x| if x % ldk < d { kt[(x % ldk) * bk + x / ldk] } else { f32::NAN }).collect();
        for n in [bk, bk - 5] {
            let mut s3 = vec![f32::NAN; rows * bk];
            let mut rowmax = vec![0f32; rows];
            let f = qk_direct_kernel(isa);
            unsafe { f(a.as_ptr(), lda as i64, krows.as_ptr(), ldk as i64, s3.as_mut_ptr(), bk as i64, rows as i64, d as i64, n as i64, rowmax.as_mut_ptr()) };
            for r in 0..rows {
                let (got, want) = (&s3[r * bk..(r + 1) * bk], &s[r * bk..(r + 1) * bk]);
                assert!(got[..n].iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-4), "{isa:?} qk_direct row {r}, {n} keys");
                assert!(got[n..].iter().all(|&x| x == 0.0), "{isa:?} qk_direct row {r}: columns past {n} are 0");
                assert_eq!(rowmax[r], got[..n].iter().cloned().fold(f32::NEG_INFINITY, f32::max), "{isa:?} qk_direct row {r} maximum");
            }
        }
        // A NaN key (one of a block of eight, and the last, one at a time): its scores are
        // NaN and stay out of each row's maximum.
        let mut knan = krows.clone();
        let n = bk - 1;
        knan[2 * ldk] = f32::NAN;
        knan[(n - 1) * ldk] = f32::NAN;
        let mut s4 = vec![0f32; rows * bk];
        let mut rowmax = vec![0f32; rows];
        unsafe {
            qk_direct_kernel(isa)(
                a.as_ptr(),
                lda as i64,
                knan.as_ptr(),
                ldk as i64,
                s4.as_mut_ptr(),
                bk as i64,
                rows as i64,
                d as i64,
                n as i64,
                rowmax.as_mut_ptr(),
            )
        };
        for r in 0..rows {
            let got = &s4[r * bk..r * bk + n];
            assert!(got[2].is_nan() && got[n - 1].is_nan(), "{isa:?} qk_direct row {r}: NaN keys' scores");
            assert_eq!(
                rowmax[r],
                got.iter().cloned().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max),
                "{isa:?} qk_direct row {r}: NaN left out of the maximum"
            );
        }
        let nk = 27;
        let v: Vec<f32> = (0..nk * dv).map(|x| ((x * 3 % 7) as f32 - 3.0) / 2.0).collect();
        let corr: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 / 10.0).collect();
        let o0: Vec<f32> = (0..rows * dv).map(|x| (x % 5) as f32).collect();
        for use_corr in [false, true] {
            let mut o = o0.clone();
            let cp = if use_corr { corr.as_ptr() } else { std::ptr::null() };
            unsafe { pv(s.as_ptr(), bk as i64, v.as_ptr(), dv as i64, o.as_mut_ptr(), dv as i64, cp, rows as i64, nk as i64, dv as i64) };
            for r in 0..rows {
                for e in 0..dv {
                    let c = if use_corr { corr[r] } else { 1.0 };
                    let want = o0[r * dv + e] * c + (0..nk).map(|x| s[r * bk + x] * v[x * dv + e]).sum::<f32>();
                    assert!((o[r * dv + e] - want).abs() < 1e-3 * (1.0 + want.abs()), "{isa:?} pv ({r},{e}): {} vs {want}", o[r * dv + e]);
                }
            }
        }
    }

    /// The softmax step against f64 on rows with a first tile (m = −inf), a running state,
    /// all-masked rows, a NaN, large logits and a column tail.
    /// With `given`, the row maxima come from the caller (as `qk_max` computes them, NaN
    /// left out) instead of a pass over the scores.
    fn check_softmax(isa: Isa, given: bool) {
        let step = softmax_kernel(isa);
        let (rows, n, ld) = (11usize, 21usize, 24usize);
        let mut s: Vec<f32> = (0..rows * ld).map(|x| ((x * 37 % 29) as f32 - 14.0) / 3.0).collect();
        for c in 0..n {
            s[2 * ld + c] = f32::NEG_INFINITY; // fully masked row, first tile
            s[3 * ld + c] = f32::NEG_INFINITY; // fully masked in this tile, live before
            s[5 * ld + c] *= 3000.0; // large logits
        }
        s[4 * ld + 17] = f32::NAN;
        s[6 * ld + 3] = f32::NEG_INFINITY;
        s[9 * ld + 2] = f32::NAN; // a NaN in the second group of rows
        let m0 = [f32::NEG_INFINITY, 1.5, f32::NEG_INFINITY, 0.25, 2.0, f32::NEG_INFINITY, 9.0, -3.0, 40.0, 1.0, f32::NEG_INFINITY];
        let l0 = [0.0, 3.0, 0.0, 2.0, 1.0, 0.0, 4.0, 0.5, 7.0, 2.0, 0.0];
        let (mut m, mut l, mut corr) = (m0, l0, [0f32; 11]);
        let before = s.clone();
        let tmax: Vec<f32> = (0..rows).map(|r| s[r * ld..r * ld + n].iter().cloned().fold(f32::NEG_INFINITY, f32::max)).collect();
        let tp = if given { tmax.as_ptr() } else { std::ptr::null() };
        unsafe { step(s.as_mut_ptr(), ld as i64, rows as i64, n as i64, m.as_mut_ptr(), l.as_mut_ptr(), corr.as_mut_ptr(), tp) };
        for r in 0..rows {
            let row: Vec<f64> = (0..n).map(|c| before[r * ld + c] as f64).collect();
            if row.iter().any(|x| x.is_nan()) {
                // The row's state is NaN from here on (so is its output: a NaN weight meets
                // every value channel).
                assert!(m[r].is_nan() && l[r].is_nan() && s[r * ld..r * ld + n].iter().any(|x| x.is_nan()), "{isa:?} row {r}: NaN must propagate");
                continue;
            }
            let mx = row.iter().cloned().fold(m0[r] as f64, f64::max);
            assert_eq!(m[r] as f64, mx, "{isa:?} row {r} max");
            let mu = if mx == f64::NEG_INFINITY { 0.0 } else { mx };
            let c = (m0[r] as f64 - mu).exp2();
            assert!((corr[r] as f64 - c).abs() <= 1e-6 * c.max(1.0), "{isa:?} row {r} corr {} vs {c}", corr[r]);
            let mut sum = 0.0;
            for (cc, x) in row.iter().enumerate() {
                let want = flush((x - mu).exp2());
                let got = s[r * ld + cc] as f64;
                // Masked lanes and weights below 2^-126 get 0.
                assert!((got - want).abs() <= 1e-6 * want, "{isa:?} ({r},{cc}): {got} vs {want}");
                sum += got;
            }
            let lw = l0[r] as f64 * c + sum;
            assert!((l[r] as f64 - lw).abs() <= 1e-5 * lw.max(1e-30), "{isa:?} row {r} l {} vs {lw}", l[r]);
            assert_eq!(&s[r * ld + n..(r + 1) * ld], &before[r * ld + n..(r + 1) * ld], "{isa:?} row {r}: past n untouched");
        }
    }

    /// A weight below 2^-126 is 0 (no subnormal weights).
    fn flush(w: f64) -> f64 {
        if w < 2f64.powi(-126) {
            0.0
        } else {
            w
        }
    }

    /// The second-pass weights against f64: a running row, a row with no live key (m = −inf),
    /// a large logit, a column tail.
    #[test]
    fn second_pass_weights_match_f64() {
        for isa in Isa::available() {
            let (rows, n, ld) = (3usize, 19usize, 20usize);
            let before: Vec<f32> = (0..rows * ld).map(|x| -((x * 13 % 17) as f32) / 2.0).collect();
            let (m, scale) = ([0.5f32, f32::NEG_INFINITY, 3000.0], [0.25f32, 1.0, 2.0]);
            let mut s = before.clone();
            unsafe { weights_kernel(isa)(s.as_mut_ptr(), ld as i64, rows as i64, n as i64, m.as_ptr(), scale.as_ptr()) };
            for r in 0..rows {
                let mu = if m[r] == f32::NEG_INFINITY { 0.0 } else { m[r] as f64 };
                for c in 0..n {
                    let want = flush((before[r * ld + c] as f64 - mu).exp2()) * scale[r] as f64;
                    let got = s[r * ld + c] as f64;
                    assert!((got - want).abs() <= 1e-6 * want, "{isa:?} ({r},{c}): {got} vs {want}");
                }
                assert_eq!(s[r * ld + n], before[r * ld + n], "{isa:?} row {r}: past n untouched");
            }
        }
    }

    /// The per-key weights against f64: a dead column (t = −inf), a large statistic, a
    /// column tail, a score slightly above its statistic.
    #[test]
    fn per_key_weights_match_f64() {
        for isa in Isa::available() {
            let (rows, n, ld) = (3usize, 19usize, 20usize);
            let before: Vec<f32> = (0..rows * ld).map(|x| -((x * 13 % 17) as f32) / 2.0 + 0.25).collect();
            let t: Vec<f32> = (0..n)
                .map(|c| {
                    if c == 3 {
                        f32::NEG_INFINITY
                    } else if c == 7 {
                        3000.0
                    } else {
                        c as f32 / 4.0
                    }
                })
                .collect();
            let mut s = before.clone();
            unsafe { exp_cols_kernel(isa)(s.as_mut_ptr(), ld as i64, rows as i64, n as i64, t.as_ptr()) };
            for r in 0..rows {
                for c in 0..n {
                    let tc = if t[c] == f32::NEG_INFINITY { 0.0 } else { t[c] as f64 };
                    let want = flush((before[r * ld + c] as f64 - tc).exp2());
                    let got = s[r * ld + c] as f64;
                    assert!((got - want).abs() <= 1e-6 * want, "{isa:?} ({r},{c}): {got} vs {want}");
                }
                assert_eq!(s[r * ld + n], before[r * ld + n], "{isa:?} row {r}: past n untouched");
            }
        }
    }

    /// The capped scores against f64 `c · tanh(x)`: both signs, 0, tiny and huge values, the
    /// clamp, NaN and infinities, a column tail.
    #[test]
    fn capped_scores_match_f64() {
        for isa in Isa::available() {
            let (rows, n, ld) = (3usize, 19usize, 20usize);
            let mut before: Vec<f32> = (0..rows * ld).map(|x| (x as f32 - 30.0) * 0.37).collect();
            before[2] = 0.0;
            before[3] = 1e-30;
            before[4] = -7.9;
            before[5] = 8.0;
            before[6] = f32::INFINITY;
            before[7] = f32::NEG_INFINITY;
            before[21] = f32::NAN;
            before[22] = 1e30;
            let c = 50.0 * std::f32::consts::LOG2_E;
            let mut s = before.clone();
            unsafe { tanh_scale_kernel(isa)(s.as_mut_ptr(), ld as i64, rows as i64, n as i64, c.to_bits() as i64) };
            for r in 0..rows {
                for x in 0..n {
                    let v = before[r * ld + x] as f64;
                    let got = s[r * ld + x] as f64;
                    if v.is_nan() {
                        assert!(got.is_nan(), "{isa:?} ({r},{x}): NaN stays");
                        continue;
                    }
                    let want = c as f64 * v.tanh();
                    assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-30), "{isa:?} ({r},{x}) of {v}: {got} vs {want}");
                }
                assert_eq!(s[r * ld + n].to_bits(), before[r * ld + n].to_bits(), "{isa:?} row {r}: past n untouched");
            }
        }
    }

    #[test]
    fn softmax_step_matches_f64() {
        for given in [false, true] {
            for isa in Isa::available() {
                check_softmax(isa, given);
            }
        }
    }

    #[test]
    fn every_available_isa_matches_plain_loops() {
        check(Isa::Portable);
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                check(Isa::Avx2);
            } else {
                eprintln!("skipping AVX2 microkernels: the CPU lacks AVX2+FMA");
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                check(Isa::Avx512);
            } else {
                eprintln!("skipping AVX-512 microkernels: the CPU lacks AVX-512F");
            }
        }
    }
}
