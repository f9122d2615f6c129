//! FlashBias, approximate: a pair bias (a dense input `t[b, h, i, j]`, or a table gather)
//! replaced by a rank-`r` factorization `Σ_r U[b,h,i,r] · W[b,h,j,r]`, opt-in, with a user-given error
//! budget.
//!
//! - Purpose: a pair bias read from memory costs a load per pair (N·M floats per head); as
//!   `r` extra dot channels ([`crate::lowrank`] absorbs the factored form) it costs `r`
//!   multiply-adds in the matmul and `(N + M)·r` floats.
//! - Method: per (batch, head) slice, a randomized SVD (Halko, Martinsson and Tropp 2011:
//!   Gaussian sketch, two power iterations, QR, SVD of the small projection; nalgebra does
//!   the linear algebra, in f64), truncated to the smallest rank whose **largest absolute
//!   error over every element of every slice** is within the budget (doubling, then
//!   bisection; the exact error is measured, not estimated).
//! - It depends on the data, so it runs when the inputs are known ([`approximate`] on the
//!   slices, [`rewrite`] on the kernel), and it refuses — an error, never a silent
//!   approximation — when no rank up to the cap meets the budget.
//! - Sources: a dense input `t[b, h, i, j]` (slices read directly) or any other bias of
//!   `b h i j` (Swin's `rpb` table gather: slices evaluated, one per head when it does not
//!   depend on the batch).
//! - Limits: one branch; the factors are computed per call (the table of a fixed model
//!   could be factored once and cached; not done).

use attnc_ir::{BinOp, DType, Expr, Extent, Kernel, RedOp, TensorDecl, TensorKind};
use nalgebra::DMatrix;

/// The factor inputs the rewritten kernel reads.
pub const BIAS_U: &str = "__bias_u";
pub const BIAS_W: &str = "__bias_w";

/// Where a factorable bias comes from, and how its slices are indexed: the bias of batch
/// `b`, head `h` is slice `(bx, hx)` of `[bdim, hdim]` slices.
#[derive(Clone, Debug, PartialEq)]
pub struct BiasSource {
    /// `Some(t)`: the bias is the input `t[bx, hx, i, j]` (its slices are read directly);
    /// `None`: any other expression of `b h i j` (a table gather like Swin's `rpb`), whose
    /// slices are evaluated.
    pub tensor: Option<String>,
    pub bx: Expr,
    pub hx: Expr,
    pub bdim: Extent,
    pub hdim: Extent,
}

/// The bias of a one-branch kernel, when it depends on both `i` and `j` and on nothing but
/// `b h i j`.
pub fn source(k: &Kernel) -> Option<BiasSource> {
    let [br] = k.branches.as_slice() else { return None };
    let bias = br.bias.as_ref()?;
    let fv = bias.free_vars();
    if !fv.contains("i") || !fv.contains("j") || fv.iter().any(|v| !matches!(v.as_str(), "b" | "h" | "i" | "j")) {
        return None;
    }
    if let Expr::Load(t, idx) = bias {
        let decl = k.tensor(t)?;
        let free = |e: &Expr| !e.free_vars().contains("i") && !e.free_vars().contains("j");
        if decl.kind == TensorKind::Input
            && !decl.dtype.is_int()
            && idx.len() == 4
            && idx[2] == Expr::var("i")
            && idx[3] == Expr::var("j")
            && free(&idx[0])
            && free(&idx[1])
        {
            return Some(BiasSource {
                tensor: Some(t.clone()),
                bx: idx[0].clone(),
                hx: idx[1].clone(),
                bdim: decl.shape[0].clone(),
                hdim: decl.shape[1].clone(),
            });
        }
    }
    let axis = |v: &str, ext: &Extent| if fv.contains(v) { (Expr::var(v), ext.clone()) } else { (Expr::Int(0), Extent::Fixed(1)) };
    let (bx, bdim) = axis("b", &k.iter.b);
    let (hx, hdim) = axis("h", &k.iter.h);
    Some(BiasSource { tensor: None, bx, hx, bdim, hdim })
}

/// The kernel with its bias read from rank-`rank` factors: new inputs [`BIAS_U`]
/// `[bdim, hdim, N, rank]` and [`BIAS_W`] `[bdim, hdim, M, rank]`, bias
/// `Σ_{r < rank} U[bx, hx, i, r] · W[bx, hx, j, r]`.
pub fn rewrite(k: &Kernel, src: &BiasSource, rank: usize) -> Kernel {
    let mut out = k.clone();
    let decl = |name: &str, len: Extent| TensorDecl {
        name: name.into(),
        dtype: DType::F32,
        shape: vec![src.bdim.clone(), src.hdim.clone(), len, Extent::Fixed(rank as i64)],
        kind: TensorKind::Input,
    };
    out.tensors.insert(0, decl(BIAS_W, k.iter.j.clone()));
    out.tensors.insert(0, decl(BIAS_U, k.iter.i.clone()));
    let ld = |name: &str, pos: &str| Expr::Load(name.into(), vec![src.bx.clone(), src.hx.clone(), Expr::var(pos), Expr::var("rb")]);
    out.branches[0].bias = Some(Expr::Reduce {
        op: RedOp::Sum,
        var: "rb".into(),
        lo: Box::new(Expr::Int(0)),
        hi: Box::new(Expr::Int(rank as i64)),
        body: Box::new(Expr::bin(BinOp::Mul, ld(BIAS_U, "i"), ld(BIAS_W, "j"))),
    });
    out
}

/// Factors of every slice at one rank, and the largest absolute error they admit.
#[derive(Clone, Debug)]
pub struct Factors {
    pub rank: usize,
    pub max_error: f64,
    /// Per slice: `U` (N × rank) and `W` (M × rank), row-major.
    pub slices: Vec<(Vec<f64>, Vec<f64>)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApproxError {
    #[error("the bias needs a rank above {cap} to stay within a max error of {budget:e} (at rank {cap} the max error is {at_cap:.3e}); raise the budget or run exactly")]
    BudgetNotMet { budget: f64, cap: usize, at_cap: f64 },
    #[error("the error budget must be a positive number (got {0})")]
    BadBudget(f64),
    #[error("the bias has a non-finite value (NaN or infinity) at flat index {0}: it cannot be approximated")]
    NonFinite(usize),
}

/// [`approximate`] on a row-major `[B', H', N, M]` tensor, one slice per `(b', h')`.
pub fn approximate_tensor(data: &[f64], shape: [usize; 4], budget: f64, cap: usize) -> Result<Factors, ApproxError> {
    if let Some(at) = data.iter().position(|x| !x.is_finite()) {
        return Err(ApproxError::NonFinite(at));
    }
    let [b, h, n, m] = shape;
    let slices: Vec<DMatrix<f64>> = (0..b * h).map(|s| DMatrix::from_fn(n, m, |i, j| data[(s * n + i) * m + j])).collect();
    approximate(&slices, budget, cap)
}

/// A slice's randomized range and SVD, truncatable to any rank up to its size.
struct Sketch {
    /// `Q · U_b · Σ` (N × l) and `V_b` (M × l), columns by decreasing singular value.
    us: DMatrix<f64>,
    v: DMatrix<f64>,
}

/// SplitMix64 and Box–Muller: reproducible Gaussian sketches without another dependency.
fn gaussian(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    DMatrix::from_fn(rows, cols, |_, _| {
        let (u1, u2) = (next().max(1e-300), next());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    })
}

fn sketch(a: &DMatrix<f64>, l: usize, seed: u64) -> Sketch {
    let omega = gaussian(a.ncols(), l, seed);
    let mut y = a * omega;
    for _ in 0..2 {
        let q = y.qr().q();
        let z = a.transpose() * q;
        let qz = z.qr().q();
        y = a * qz;
    }
    let q = y.qr().q();
    let b = q.transpose() * a;
    let svd = b.svd(true, true);
    let (ub, s, vt) = (svd.u.expect("u"), svd.singular_values, svd.v_t.expect("v_t"));
    // nalgebra's `svd` sorts singular values in decreasing order.
    let us = q * ub * DMatrix::from_diagonal(&s);
    Sketch { us, v: vt.transpose() }
}

fn max_error(a: &DMatrix<f64>, sk: &Sketch, r: usize) -> f64 {
    let approx = sk.us.columns(0, r) * sk.v.columns(0, r).transpose();
    (a - approx).amax()
}

/// The smallest rank `r ≤ cap` whose factors keep `max |A − U Wᵀ| ≤ budget` on every slice.
pub fn approximate(slices: &[DMatrix<f64>], budget: f64, cap: usize) -> Result<Factors, ApproxError> {
    if budget.is_nan() || budget <= 0.0 || budget.is_infinite() {
        return Err(ApproxError::BadBudget(budget));
    }
    let full = slices.iter().map(|a| a.nrows().min(a.ncols())).min().unwrap_or(0);
    let cap = cap.min(full).max(1);
    let sketches: Vec<Sketch> = slices.iter().enumerate().map(|(n, a)| sketch(a, (cap + 8).min(a.nrows().min(a.ncols())), n as u64)).collect();
    // Each rank's error costs O(N·M·r) per slice: measured once, remembered.
    let mut measured = std::collections::BTreeMap::new();
    let mut err =
        |r: usize| *measured.entry(r).or_insert_with(|| slices.iter().zip(&sketches).map(|(a, s)| max_error(a, s, r.min(s.us.ncols()))).fold(0.0, f64::max));
    // Doubling, then bisection between the last rank that failed and the first that met it.
    let (mut lo, mut hi) = (0usize, 1usize);
    while err(hi) > budget {
        if hi >= cap {
            return Err(ApproxError::BudgetNotMet { budget, cap, at_cap: err(cap) });
        }
        lo = hi;
        hi = (hi * 2).min(cap);
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if err(mid) <= budget {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let rank = hi;
    let out = sketches
        .iter()
        .map(|s| {
            let r = rank.min(s.us.ncols());
            let (mut u, mut w) = (vec![0.0; s.us.nrows() * rank], vec![0.0; s.v.nrows() * rank]);
            for c in 0..r {
                for i in 0..s.us.nrows() {
                    u[i * rank + c] = s.us[(i, c)];
                }
                for j in 0..s.v.nrows() {
                    w[j * rank + c] = s.v[(j, c)];
                }
            }
            (u, w)
        })
        .collect();
    Ok(Factors { rank, max_error: err(rank), slices: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank-3 matrix plus noise of 1e-6: rank 3 meets a 1e-4 budget, rank 2 does not.
    #[test]
    fn finds_the_smallest_rank_within_budget() {
        let (n, m) = (70, 50);
        let g = gaussian(n + m, 3, 7);
        let noise = gaussian(n, m, 9) * 1e-6;
        let a = DMatrix::from_fn(n, m, |i, j| (0..3).map(|r| g[(i, r)] * g[(n + j, r)]).sum::<f64>()) + noise;
        let f = approximate(std::slice::from_ref(&a), 1e-4, 16).expect("meets the budget");
        assert_eq!(f.rank, 3);
        assert!(f.max_error <= 1e-4);
        let (u, w) = &f.slices[0];
        let worst = (0..n)
            .flat_map(|i| (0..m).map(move |j| (i, j)))
            .map(|(i, j)| ((0..3).map(|r| u[i * 3 + r] * w[j * 3 + r]).sum::<f64>() - a[(i, j)]).abs())
            .fold(0.0, f64::max);
        assert!((worst - f.max_error).abs() < 1e-12, "reported error is the measured one");
        // A budget below the noise floor cannot be met at a small cap: refused, not approximated.
        assert!(matches!(approximate(std::slice::from_ref(&a), 1e-9, 4), Err(ApproxError::BudgetNotMet { cap: 4, .. })));
        assert_eq!(approximate(std::slice::from_ref(&a), 0.0, 4).unwrap_err(), ApproxError::BadBudget(0.0));
    }
}
