//! FlashBias, exact: a bias that is a sum of `r` products of a query-side term and a
//! key-side term, `bias_ij = Σ_t u_t(b,h,i) · w_t(b,h,j)`, becomes `r` extra channels of
//! the score's dot, so the score matmul computes it.
//!
//! - Purpose: ALiBi's `-slope[h]·(p - j)` costs a convert, a subtract and a multiply per
//!   pair; as channels `u = [-slope·p, slope]`, `w = [1, j]` it costs two more multiply-adds
//!   in the matmul, which runs at the machine's full vector width.
//! - Method: the e-graph ([`crate::egraph`]) finds the cheapest equal form of the bias under
//!   [`crate::egraph::SepCost`]; [`crate::separable::sum_of_products`] reads the terms off
//!   it. A term whose key factor is 1 is the same for every key of a row and would cancel
//!   under a plain softmax, but it is kept: when it is ±inf or NaN for a row (a `-inf` bias
//!   row is fully masked) dropping it would change that row, and keeping it costs one
//!   channel and no precision (the key term carries the same magnitude).
//! - Preconditions: one branch (two branches share one key panel); its score folds to a
//!   bare dot ([`crate::fold::fold_score`], which moves the scale into the query operand).
//! - Postcondition: the branch has no bias; its score is one dot over `len + r` channels:
//!   `Σ_c select(c < len, a, U(c - len)) · select(c < len, b, W(c - len))`. Equal to the
//!   original up to rounding.
//! - Applied only when the cost model says it is cheaper: `r · RANK_COST` below the per-pair
//!   cost of the bias as written.
//! - Limits: rounding. The products `u·w` are summed in f32 inside the dot, so a term as
//!   large as `slope·j` carries an absolute error of about `|slope·j|·2^-24` into the
//!   logit (6e-5 at j = 1000, slope 1). Biases whose terms are only bounded given a shape
//!   (the one-hot expansion of `|row(i) - row(j)|` on a grid has a rank that grows with N)
//!   are not rewritten; dense and table biases take the approximate (SVD) form instead
//!   ([`crate::approx`], opt-in with an error budget).

use crate::egraph::{best_separable, written_cost, RANK_COST};
use crate::fold::fold_score;
use crate::interval::{eval, Iv, LoadOracle};
use crate::separable::{sum_of_products, Dot};
use crate::Applied;
use attnc_ir::{BinOp, Expr, Kernel, RedOp};

/// `select(x == 0, t0, select(x == 1, t1, … t_{n-1}))`, with `x = r - len` written as
/// `r == len + n`.
fn chain(terms: &[Expr], r: &str, len: &Expr) -> Expr {
    let last = terms.len() - 1;
    let mut acc = terms[last].clone();
    for n in (0..last).rev() {
        let at = Expr::bin(BinOp::Add, len.clone(), Expr::Int(n as i64));
        let cond = Expr::bin(BinOp::Eq, Expr::var(r), at);
        acc = Expr::select(cond, terms[n].clone(), acc);
    }
    acc
}

/// The score's dot extended by `extra` channels: channel `c < len` is the dot's own,
/// channel `len + t` is `extra_a · extra_b` at `t = c - len` (both written in the dot's
/// channel variable).
fn extend_dot(dot: &Dot, extra_a: Expr, extra_b: Expr, extra: Expr) -> Expr {
    let inside = Expr::bin(BinOp::Lt, Expr::var(&dot.r), dot.len.clone());
    Expr::Reduce {
        op: RedOp::Sum,
        var: dot.r.clone(),
        lo: Box::new(Expr::Int(0)),
        hi: Box::new(Expr::bin(BinOp::Add, dot.len.clone(), extra)),
        body: Box::new(Expr::bin(BinOp::Mul, Expr::select(inside.clone(), dot.a.clone(), extra_a), Expr::select(inside, dot.b.clone(), extra_b))),
    }
}

/// A bias that is itself a separable dot `Σ_c u(i, c) · w(j, c)` (the factors of
/// [`crate::approx`]) joins the score's dot as it is: `len + C` channels.
fn absorb_dot(k: &Kernel, bias: &Expr) -> Option<(Kernel, Vec<Applied>)> {
    let d2 = crate::separable::as_dot(bias)?;
    let dot = fold_score(k, &k.branches[0].score, true)?;
    let shifted = |e: &Expr| e.subst(&d2.r, &Expr::bin(BinOp::Sub, Expr::var(&dot.r), dot.len.clone()));
    let mut out = k.clone();
    let nb = &mut out.branches[0];
    nb.bias = None;
    nb.score = extend_dot(&dot, shifted(&d2.a), shifted(&d2.b), d2.len.clone());
    let what = format!("bias `{}` is a dot of query and key factors: {} extra dot channels", attnc_ir::pretty::infix(bias), attnc_ir::pretty::infix(&d2.len));
    Some((out, vec![Applied { pass: "lowrank", what, cost: None }]))
}

/// The terms `u_t(b,h,i) · w_t(b,h,j)` the pass would write the bias of `k` as, with the
/// e-graph's rank and stop reason, when it rewrites it (the decision of [`run`]).
fn factors(k: &Kernel) -> Option<(Vec<crate::separable::Term>, u32, String)> {
    let [br] = k.branches.as_slice() else { return None };
    let bias = br.bias.as_ref()?;
    let (best, cost, stop) = best_separable(bias, k);
    let rank = cost.rank?;
    let terms = sum_of_products(&best)?;
    let written = written_cost(bias, k);
    let r = terms.len();
    if r == 0 || RANK_COST * r as f64 >= written.eval {
        return None;
    }
    fold_score(k, &br.score, true)?;
    Some((terms, rank, stop.to_string()))
}

/// Largest magnitude of an abstract value (`None`: unknown).
fn magnitude(v: Iv) -> Option<f64> {
    match v {
        Iv::Float { lo, hi, nan: false } if lo <= hi => Some(lo.abs().max(hi.abs())),
        Iv::Int(lo, hi) => Some((lo as f64).abs().max((hi as f64).abs())),
        _ => None,
    }
}

/// The most the low-rank terms may sum to, relative to the bias as written, before the
/// rewrite is refused for an input.
pub const MAX_TERM_RATIO: f64 = 64.0;
/// The most a term may reach (f32 overflows at 3.4e38; a margin for the dot's sum).
pub const MAX_TERM: f64 = 1e30;

/// Whether the low-rank form of `k`'s bias is as exact as the bias as written, for the
/// inputs `data` knows at `dims` (the terms' magnitudes are known before the kernel runs:
/// ALiBi's slopes). The f32 dot sums the products `u_t·w_t`, which carries an error of
/// about `Σ|u_t·w_t|·2⁻²⁴`, where the bias as written carries `|bias|·2⁻²⁴`; refused (with
/// the reason) when a term can overflow f32 or the terms sum to more than
/// [`MAX_TERM_RATIO`] times the largest bias. `Ok` when the pass does not rewrite `k`.
pub fn check_inputs(k: &Kernel, dims: &attnc_ir::Bindings, data: &dyn LoadOracle) -> Result<(), String> {
    let Some((terms, _, _)) = factors(k) else { return Ok(()) };
    let it = &k.iter;
    let range = |e: &attnc_ir::Extent| Iv::Int(0, dims.extent(e) - 1);
    let side = |j: bool| -> Vec<(String, Iv)> {
        vec![("b".into(), range(&it.b)), ("h".into(), range(&it.h)), (if j { "j" } else { "i" }.into(), range(if j { &it.j } else { &it.i }))]
    };
    let mut sum = 0.0f64;
    for t in &terms {
        let (Some(u), Some(w)) = (magnitude(eval(&t.u, &mut side(false), &dims.dims, data)), magnitude(eval(&t.w, &mut side(true), &dims.dims, data))) else {
            return Ok(()); // Not bounded before the run: nothing to judge.
        };
        if u > MAX_TERM || w > MAX_TERM || u * w > MAX_TERM {
            return Err(format!(
                "the bias term ({})·({}) reaches {:.3e}, beyond what the f32 dot holds exactly",
                attnc_ir::pretty::infix(&t.u),
                attnc_ir::pretty::infix(&t.w),
                u * w
            ));
        }
        sum += u * w;
    }
    let mut pair = side(false);
    pair.push(("j".into(), range(&it.j)));
    let bias = k.branches[0].bias.as_ref().expect("factors: a bias");
    if let Some(b) = magnitude(eval(bias, &mut pair, &dims.dims, data)) {
        if sum > MAX_TERM_RATIO * b.max(1.0) {
            return Err(format!(
                "its terms sum to {sum:.3e}, {:.0}× the largest bias ({b:.3e}): the f32 dot would round them far more than the bias as written",
                sum / b.max(1.0)
            ));
        }
    }
    Ok(())
}

/// Whether the score reads a bf16 or f16 tensor: its dot runs on tensor cores (the PTX
/// backend), whose operands are the half-precision tensors themselves. Extra channels
/// would be computed f32 features rounded to the half type (ALiBi's `slope·i` to 8 bits of
/// mantissa) or keep the dot off the tensor cores; the bias as written costs a few
/// operations per element there. Such kernels keep their bias.
fn half_precision_dot(k: &Kernel, score: &Expr) -> bool {
    let mut half = false;
    score.walk(&mut |x| {
        if let Expr::Load(t, _) = x {
            half |= k.tensor(t).is_some_and(|d| matches!(d.dtype, attnc_ir::DType::BF16 | attnc_ir::DType::F16));
        }
    });
    half
}

pub fn run(k: &Kernel) -> Option<(Kernel, Vec<Applied>)> {
    let [br] = k.branches.as_slice() else { return None };
    let bias = br.bias.as_ref()?;
    if half_precision_dot(k, &br.score) {
        return None;
    }
    if let Some(done) = absorb_dot(k, bias) {
        return Some(done);
    }
    let (terms, rank, stop) = factors(k)?;
    let written = written_cost(bias, k);
    let r = terms.len();
    let dot = fold_score(k, &br.score, true)?;
    let mut out = k.clone();
    let nb = &mut out.branches[0];
    nb.bias = None;
    let what = format!(
        "bias `{}` = {} (e-graph: rank {rank}, {stop}): {r} extra dot channel{}",
        attnc_ir::pretty::infix(bias),
        terms.iter().map(|t| format!("({})·({})", attnc_ir::pretty::infix(&t.u), attnc_ir::pretty::infix(&t.w))).collect::<Vec<_>>().join(" + "),
        if r == 1 { "" } else { "s" },
    );
    let us: Vec<Expr> = terms.iter().map(|t| t.u.clone()).collect();
    let ws: Vec<Expr> = terms.iter().map(|t| t.w.clone()).collect();
    nb.score = extend_dot(&dot, chain(&us, &dot.r, &dot.len), chain(&ws, &dot.r, &dot.len), Expr::Int(r as i64));
    Some((out, vec![Applied { pass: "lowrank", what, cost: Some((written.eval, RANK_COST * r as f64)) }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alibi() -> Kernel {
        attnc_ir::parse_kernel(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (input slope f32 [H]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e)
               (branch (score (/ (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0))) (sqrt (float $D))))
                 (bias (* (neg (load slope h)) (float (- (+ i (- $M $N)) j))))
                 (mask (<= j (+ i (- $M $N)))) (norm (softmax))))",
        )
        .expect("kernel")
    }

    #[test]
    fn alibi_is_rank_two() {
        let k = alibi();
        let bias = k.branches[0].bias.clone().unwrap();
        let (best, cost, stop) = best_separable(&bias, &k);
        assert_eq!(cost.rank, Some(2), "{} ({stop})", attnc_ir::pretty::infix(&best));
        let (out, log) = run(&k).expect("rewritten");
        assert!(out.branches[0].bias.is_none());
        assert!(log[0].what.contains("2 extra dot channels"), "{}", log[0].what);
    }
}
