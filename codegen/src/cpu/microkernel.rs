//! Tile matmul microkernels called from the generated code.
//!
//! Cranelift lowers only 128-bit vectors on x86-64, a half (AVX2) or a quarter (AVX-512) of
//! the FMA peak, so the two matmuls of a tile run here, in Rust with `std::arch`, chosen
//! at run time by feature detection: AVX-512F, else AVX2+FMA, else portable code. The
//! generated code keeps everything variant-specific (scores, masks, normalization).
//!
//! - `qk`: `s[r][c] = Σ_x a[r][x] · kt[x][c]` for `r < rows`, `c < bk` (the key panel `kt`
//!   is packed transposed, `bk` keys wide, so the inner loop broadcasts `a` and loads `kt`);
//! - `pv`: `o[r][e] = o[r][e] · corr[r] + Σ_{c < nk} p[r][c] · v[c][e]` (`corr` may be null).

/// Which implementation the host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
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
    use super::pv_tail;
    use std::arch::x86_64::*;

    /// `R` rows × 16 columns of `s` from `a` and the key panel: `2R` accumulators that
    /// stay in registers because `R` is a constant.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn qk_block_avx2<const R: usize>(a: *const f32, lda: usize, kt: *const f32, s: *mut f32, d: usize, bk: usize, c: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for x in 0..d {
            let k0 = _mm256_loadu_ps(kt.add(x * bk + c));
            let k1 = _mm256_loadu_ps(kt.add(x * bk + c + 8));
            for (rr, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(rr * lda + x));
                acc_r[0] = _mm256_fmadd_ps(av, k0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(av, k1, acc_r[1]);
            }
        }
        for (rr, acc_r) in acc.iter().enumerate() {
            let sp = s.add(rr * bk + c);
            _mm256_storeu_ps(sp, acc_r[0]);
            _mm256_storeu_ps(sp.add(8), acc_r[1]);
        }
    }

    /// AVX2: blocks of 6 rows × 16 columns (12 ymm accumulators), broadcasting `a`.
    /// # Safety
    /// As [`super::qk_portable`]; `bk` is a multiple of 16; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe extern "C" fn qk_avx2(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64) {
        let (lda, rows, d, bk) = (lda as usize, rows as usize, d as usize, bk as usize);
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(6);
            let (ar, sr) = (a.add(r * lda), s.add(r * bk));
            let mut c = 0;
            while c < bk {
                match nr {
                    6 => qk_block_avx2::<6>(ar, lda, kt, sr, d, bk, c),
                    5 => qk_block_avx2::<5>(ar, lda, kt, sr, d, bk, c),
                    4 => qk_block_avx2::<4>(ar, lda, kt, sr, d, bk, c),
                    3 => qk_block_avx2::<3>(ar, lda, kt, sr, d, bk, c),
                    2 => qk_block_avx2::<2>(ar, lda, kt, sr, d, bk, c),
                    _ => qk_block_avx2::<1>(ar, lda, kt, sr, d, bk, c),
                }
                c += 16;
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
        for c in 0..nk {
            let v0 = _mm256_loadu_ps(v.add(c * ldv + e));
            let v1 = _mm256_loadu_ps(v.add(c * ldv + e + 8));
            for (rr, acc_r) in acc.iter_mut().enumerate() {
                let pv = _mm256_broadcast_ss(&*p.add(rr * ldp + c));
                acc_r[0] = _mm256_fmadd_ps(pv, v0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(pv, v1, acc_r[1]);
            }
        }
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
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(6);
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

    /// AVX-512F: 6 rows × 32 columns (12 zmm) when `bk` allows, else 16 columns.
    /// # Safety
    /// As [`super::qk_portable`]; `bk` is a multiple of 16; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn qk_avx512(a: *const f32, lda: i64, kt: *const f32, s: *mut f32, rows: i64, d: i64, bk: i64) {
        let (lda, rows, d, bk) = (lda as usize, rows as usize, d as usize, bk as usize);
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(6);
            let mut c = 0;
            while c < bk {
                let wide = c + 32 <= bk;
                let mut acc = [[_mm512_setzero_ps(); 2]; 6];
                let ap = a.add(r * lda);
                for x in 0..d {
                    let k0 = _mm512_loadu_ps(kt.add(x * bk + c));
                    let k1 = if wide { _mm512_loadu_ps(kt.add(x * bk + c + 16)) } else { _mm512_setzero_ps() };
                    for (rr, acc_r) in acc.iter_mut().enumerate().take(nr) {
                        let av = _mm512_set1_ps(*ap.add(rr * lda + x));
                        acc_r[0] = _mm512_fmadd_ps(av, k0, acc_r[0]);
                        if wide {
                            acc_r[1] = _mm512_fmadd_ps(av, k1, acc_r[1]);
                        }
                    }
                }
                for (rr, acc_r) in acc.iter().enumerate().take(nr) {
                    let sp = s.add((r + rr) * bk + c);
                    _mm512_storeu_ps(sp, acc_r[0]);
                    if wide {
                        _mm512_storeu_ps(sp.add(16), acc_r[1]);
                    }
                }
                c += if wide { 32 } else { 16 };
            }
            r += nr;
        }
    }

    /// AVX-512F: 4 rows × 32 output channels per block (16-wide and scalar tails).
    /// # Safety
    /// As [`super::pv_portable`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn pv_avx512(p: *const f32, ldp: i64, v: *const f32, ldv: i64, o: *mut f32, ldo: i64, corr: *const f32, rows: i64, nk: i64, dv: i64) {
        let (ldp, ldv, ldo, rows, nk, dv) = (ldp as usize, ldv as usize, ldo as usize, rows as usize, nk as usize, dv as usize);
        let mut r = 0;
        while r < rows {
            let nr = (rows - r).min(4);
            let mut e = 0;
            while e + 16 <= dv {
                let wide = e + 32 <= dv;
                let mut acc = [[_mm512_setzero_ps(); 2]; 4];
                for (rr, acc_r) in acc.iter_mut().enumerate().take(nr) {
                    let op = o.add((r + rr) * ldo + e);
                    let cv = _mm512_set1_ps(if corr.is_null() { 1.0 } else { *corr.add(r + rr) });
                    acc_r[0] = _mm512_mul_ps(_mm512_loadu_ps(op), cv);
                    if wide {
                        acc_r[1] = _mm512_mul_ps(_mm512_loadu_ps(op.add(16)), cv);
                    }
                }
                for c in 0..nk {
                    let v0 = _mm512_loadu_ps(v.add(c * ldv + e));
                    let v1 = if wide { _mm512_loadu_ps(v.add(c * ldv + e + 16)) } else { _mm512_setzero_ps() };
                    for (rr, acc_r) in acc.iter_mut().enumerate().take(nr) {
                        let pv = _mm512_set1_ps(*p.add((r + rr) * ldp + c));
                        acc_r[0] = _mm512_fmadd_ps(pv, v0, acc_r[0]);
                        if wide {
                            acc_r[1] = _mm512_fmadd_ps(pv, v1, acc_r[1]);
                        }
                    }
                }
                for (rr, acc_r) in acc.iter().enumerate().take(nr) {
                    let op = o.add((r + rr) * ldo + e);
                    _mm512_storeu_ps(op, acc_r[0]);
                    if wide {
                        _mm512_storeu_ps(op.add(16), acc_r[1]);
                    }
                }
                e += if wide { 32 } else { 16 };
            }
            pv_tail(p, ldp, v, ldv, o, ldo, corr, r, nr, nk, e, dv);
            r += nr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(isa: Isa) {
        let (qk, pv) = kernels(isa);
        let (rows, d, bk, dv, lda) = (13usize, 19usize, 32usize, 21usize, 24usize);
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
