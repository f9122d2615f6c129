//! The tiled form of a kernel: what the tile loop computes with a matmul and what it
//! evaluates per pair, and how each branch normalizes. Pure IR analysis: every backend's
//! tile kernel (CPU microkernels, GPU tensor cores or workgroup tiles) reads it.

use attnc_ir::{BinOp, Expr, Kernel, Norm};

pub use attnc_passes::separable::{extract, Dot, DOT};

/// The tiled form of a kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct TiledPlan {
    /// Per branch: the separable dot (if any) and what the score does with it.
    pub branches: Vec<BranchPlan>,
    /// The distinct key factors of the branches' dots, one key panel each (differential
    /// attention has two; branches that read the same keys share one). All have one
    /// channel count, so one query tile `A` and one panel size serve every branch.
    pub panels: Vec<Dot>,
}

/// One branch of the tiled form.
#[derive(Clone, Debug, PartialEq)]
pub struct BranchPlan {
    /// The separable channel reduction of the score, run as the tile's `Q·Kᵀ` matmul: the
    /// branch's own query features `dot.a` against its key panel.
    pub dot: Option<Dot>,
    /// The index of the dot's key panel in [`TiledPlan::panels`].
    pub panel: Option<usize>,
    /// A per-row factor of the score (`dot · c` or `dot / c`, `c` free of `j`) folded into
    /// the branch's packed query features, so the tile loop does not multiply by it. A
    /// softmax branch folds `log2(e)` the same way ([`SoftmaxPlan::log2e_folded`]).
    pub fold: Option<Expr>,
    /// The score with the dot replaced by the variable [`DOT`] (just `DOT` when the score
    /// is the dot, or its folded row factor times it).
    pub rest: Expr,
    /// How a softmax branch runs; `None` for the other normalizations (one pass, each
    /// weight a pointwise function of its score, plus the row sum for `linear`).
    pub softmax: Option<SoftmaxPlan>,
    /// A normalization map that reads a second separable dot (the backward kernels' `dP =
    /// dO·Vᵀ`): run as a second matmul per tile.
    pub map_dot: Option<MapDot>,
    /// A normalization map that reads its plain dot score only through `exp(s − t)`, `t` a
    /// statistic of the row or of the key (the backward kernels' `P = exp(s − lse)`).
    pub exp_stat: Option<ExpStat>,
}

/// `exp(s − t)` in a normalization map over plain dot scores, `t` per row (free of `j`) or
/// per key (free of `i`): a target may fold `log2 e` into the packed queries and compute
/// the tile's `2^(s − t·log2 e)` in place in one routine (as a softmax's weights), then
/// evaluate [`ExpStat::rest`], the map (or its [`MapDot::rest`]) with `exp(s − t)`
/// replaced by `s`. A target that ignores it evaluates the map as written.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpStat {
    pub stat: Expr,
    /// `t` reads the key (`j`), not the row.
    pub per_key: bool,
    pub rest: Expr,
}

impl ExpStat {
    /// The `exp(s − t)` of map `f` (which reads `s` nowhere else), over the score variable
    /// `s`; `t` free of `s`, of reductions and of one of `i` and `j`.
    pub fn find(f: &Expr) -> Option<ExpStat> {
        use attnc_ir::{BinOp, UnOp};
        let mut found: Option<Expr> = None;
        f.walk(&mut |x| {
            if let Expr::Unary(UnOp::Exp, a) = x {
                if let Expr::Binary(BinOp::Sub, l, t) = &**a {
                    if **l == Expr::var("s") && found.is_none() {
                        found = Some((**t).clone());
                    }
                }
            }
        });
        let stat = found?;
        let vars = stat.free_vars();
        let mut reduces = false;
        stat.walk(&mut |x| reduces |= matches!(x, Expr::Reduce { .. }));
        if vars.contains("s") || reduces || (vars.contains("i") && vars.contains("j")) {
            return None;
        }
        let p = Expr::un(attnc_ir::UnOp::Exp, Expr::bin(attnc_ir::BinOp::Sub, Expr::var("s"), stat.clone()));
        let marker = "__exp_stat";
        fn replace(e: &Expr, what: &Expr, with: &Expr) -> Expr {
            if e == what {
                with.clone()
            } else {
                e.map_children(&mut |c| replace(c, what, with))
            }
        }
        let rest = replace(f, &p, &Expr::var(marker));
        if rest.free_vars().contains("s") {
            return None;
        }
        Some(ExpStat { per_key: vars.contains("j"), stat, rest: rest.subst(marker, &Expr::var("s")) })
    }
}

/// The second dot of a normalization map: its query features against its own key panel,
/// the map with the dot replaced by the variable [`DOT2`].
#[derive(Clone, Debug, PartialEq)]
pub struct MapDot {
    pub dot: Dot,
    pub panel: usize,
    pub rest: Expr,
}

/// The variable a normalization map's second dot becomes ([`MapDot::rest`]).
pub const DOT2: &str = attnc_ir::DOT2_VAR;

/// The softmax plan of a branch. Softmax runs in base 2 (`2^(s·log2 e − m)`), online over
/// the key tiles: a running maximum `m`, denominator `l` and rescale factor per row.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxPlan {
    /// `log2 e` is folded into the packed query features with the row factor, so the
    /// matmul's output is already in base 2.
    pub log2e_folded: bool,
    /// The score is the bare (folded) dot with no bias: on a full tile the matmul's output
    /// is the base-2 logit itself, and nothing but the softmax step runs per element.
    pub plain: bool,
    /// The passes over the key tiles: one; or two when a post-map follows the softmax (the
    /// first finds each row's final maximum and denominator, the second maps the weights).
    pub passes: Vec<SoftmaxPass>,
    /// A capped score `c · tanh(dot · a)` (softcapping, Gemma 2): `a` is the branch's
    /// [`BranchPlan::fold`] (in the packed queries, without `log2 e`) and [`BranchPlan::rest`]
    /// is `c · tanh(DOT)`; a target may cap a whole tile of dot products in one routine,
    /// after which its scores are plain (base 2 with `c · log2 e`). A target that ignores it
    /// evaluates `rest` per element.
    pub tanh_cap: Option<f64>,
}

/// `c · tanh(DOT · a)`, `c` a positive constant and `a` free of the key: `(c, a)`.
fn tanh_cap(rest: &Expr) -> Option<(f64, Expr)> {
    use attnc_ir::UnOp;
    let (c, t) = match rest {
        Expr::Binary(BinOp::Mul, c, t) | Expr::Binary(BinOp::Mul, t, c) if matches!(**t, Expr::Unary(UnOp::Tanh, _)) => (c, t),
        _ => return None,
    };
    let (Expr::Float(c), Expr::Unary(UnOp::Tanh, inner)) = (&**c, &**t) else { return None };
    let c = c.0;
    if !(c > 0.0 && c.is_finite()) {
        return None;
    }
    Some((c, dot_factor(inner)?))
}

/// `a` when `e` is `DOT` times factors free of the key and of `DOT` (`DOT / sqrt(D) / 50`).
fn dot_factor(e: &Expr) -> Option<Expr> {
    let free = |c: &Expr| !c.free_vars().contains("j") && !c.free_vars().contains(DOT);
    match e {
        Expr::Var(v) if v == DOT => Some(Expr::float(1.0)),
        Expr::Binary(BinOp::Mul, x, f) | Expr::Binary(BinOp::Mul, f, x) if free(f) && !free(x) => Some(Expr::bin(BinOp::Mul, dot_factor(x)?, (**f).clone())),
        Expr::Binary(BinOp::Div, x, f) if free(f) => Some(Expr::bin(BinOp::Div, dot_factor(x)?, (**f).clone())),
        _ => None,
    }
}

/// One pass of a softmax branch over its live key tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftmaxPass {
    /// The pass multiplies the weights with the values (`O = O·corr + P·V`); the first of
    /// two passes only updates the row state.
    pub accumulate: bool,
    /// The online step (row maximum, rescale factor, weights in place, denominator) can run
    /// over the whole tile of scores as one routine: nothing sits between the weights and
    /// `P·V` (no post-map, no decay) in this pass.
    pub fused_step: bool,
    /// The second of two passes: the final maximum and denominator are known, the weights
    /// are `2^(s − m) / l`, then the post-map.
    pub final_weights: bool,
}

impl TiledPlan {
    /// The tiled form, or `None` when a branch's score has no separable structure that a
    /// tile kernel can use (the row kernel handles it).
    pub fn new(k: &Kernel) -> Option<TiledPlan> {
        let mut parts = Vec::new();
        let mut panels: Vec<Dot> = Vec::new();
        for br in &k.branches {
            let mut found = None;
            let rest = extract(&br.score, &mut found);
            // A pair reduction left in the score (not separable) costs O(D) per pair
            // lane by lane: the row kernel is no worse, keep it simple.
            let mut pair_reduction = false;
            rest.walk(&mut |x| {
                if let Expr::Reduce { .. } = x {
                    if x.free_vars().contains("j") && x.free_vars().contains("i") {
                        pair_reduction = true;
                    }
                }
            });
            if pair_reduction {
                return None;
            }
            let mut panel = None;
            if let Some(d) = &found {
                // Dots of different channel counts would need query tiles and panels of
                // different sizes: the row kernel runs them.
                if panels.first().is_some_and(|p| p.len != d.len) {
                    return None;
                }
                panel = Some(match panels.iter().position(|p| p.b == d.b && p.r == d.r) {
                    Some(n) => n,
                    None => {
                        panels.push(d.clone());
                        panels.len() - 1
                    }
                });
            }
            // A map that reads a separable dot (its channels may differ from the score's: the
            // shorter is zero-padded, see `channels_all`).
            let mut map_dot = None;
            if let (Norm::Map(f), Some(_)) = (&br.norm, &found) {
                let mut second = None;
                let rest = extract(f, &mut second).subst(DOT, &Expr::var(DOT2));
                if let Some(d2) = second {
                    let n = match panels.iter().position(|p| p.b == d2.b && p.r == d2.r) {
                        Some(n) => n,
                        None => {
                            panels.push(d2.clone());
                            panels.len() - 1
                        }
                    };
                    map_dot = Some(MapDot { dot: d2, panel: n, rest });
                }
            }
            parts.push((found, panel, rest, map_dot));
        }
        let branches = parts
            .into_iter()
            .zip(&k.branches)
            .map(|((dot, panel, mut rest, map_dot), br)| {
                // Only a factor that folds exactly (finite and nonzero, or the operand's norm).
                let exact = |f: &Expr| dot.as_ref().is_some_and(|d| attnc_passes::separable::fold_exact(k, f, &d.a, &d.r));
                let mut fold = dot.as_ref().and_then(|_| attnc_passes::separable::row_factor(&rest).filter(|f| exact(f)));
                if fold.is_some() {
                    rest = Expr::var(DOT);
                }
                // A capped score of a one-pass softmax with no bias: the inner factor folds.
                let mut cap = None;
                if let (None, Some(_), Norm::Softmax { post: None, .. }, None, None) = (&fold, &dot, &br.norm, &br.bias, &br.decay) {
                    if let Some((c, a)) = tanh_cap(&rest).filter(|(_, a)| exact(a)) {
                        fold = Some(a);
                        rest = Expr::bin(BinOp::Mul, Expr::float(c), Expr::Unary(attnc_ir::UnOp::Tanh, Box::new(Expr::var(DOT))));
                        cap = Some(c);
                    }
                }
                let log2e_folded = fold.is_some() && cap.is_none() && matches!(br.norm, Norm::Softmax { .. });
                let softmax = match &br.norm {
                    Norm::Softmax { post, .. } => {
                        let plain = log2e_folded && rest == Expr::var(DOT) && br.bias.is_none();
                        let passes = if post.is_some() {
                            vec![
                                SoftmaxPass { accumulate: false, fused_step: true, final_weights: false },
                                SoftmaxPass { accumulate: true, fused_step: false, final_weights: true },
                            ]
                        } else {
                            vec![SoftmaxPass { accumulate: true, fused_step: br.decay.is_none(), final_weights: false }]
                        };
                        Some(SoftmaxPlan { log2e_folded, plain, passes, tanh_cap: cap })
                    }
                    _ => None,
                };
                // exp(s − t) of a map over plain dot scores (the folded dot, no bias, no decay).
                let exp_stat = match &br.norm {
                    Norm::Map(f) if fold.is_some() && rest == Expr::var(DOT) && br.bias.is_none() && br.decay.is_none() => {
                        ExpStat::find(map_dot.as_ref().map_or(f, |m| &m.rest))
                    }
                    _ => None,
                };
                BranchPlan { dot, panel, fold, rest, softmax, map_dot, exp_stat }
            })
            .collect();
        Some(TiledPlan { branches, panels })
    }

    /// The score dots' channel count (`None`: no branch has a dot).
    pub fn channels(&self) -> Option<&Expr> {
        self.panels.first().map(|d| &d.len)
    }

    /// The channels of every packed query tile and key panel: the score dots' count, or the
    /// largest with a normalization map's dot of another count (the shorter ones are
    /// zero-padded, which leaves their dot products exact).
    pub fn channels_all(&self) -> Option<Expr> {
        let first = self.panels.first()?.len.clone();
        Some(self.panels.iter().skip(1).fold(first, |acc, d| if d.len == acc { acc } else { Expr::bin(attnc_ir::BinOp::Max, acc, d.len.clone()) }))
    }

    /// Some branch runs softmax in two passes over plain dot scores: its first pass's
    /// weights of full tiles can be kept for the second instead of computed again
    /// ([`crate::schedule::BoundTiled::keep_weights`]).
    pub fn two_pass_plain(&self) -> bool {
        self.branches.iter().any(|b| b.softmax.as_ref().is_some_and(|s| s.plain && s.passes.len() == 2))
    }
}

impl BranchPlan {
    /// Whether `log2 e` is folded into the branch's packed queries (a softmax branch whose
    /// row factor is folded).
    pub fn log2e_folded(&self) -> bool {
        self.softmax.as_ref().is_some_and(|s| s.log2e_folded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(branch: &str) -> Kernel {
        attnc_ir::parse_kernel(&format!(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (input s f32 [H]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e) {branch})"
        ))
        .expect("kernel")
    }
    const DOT_SCORE: &str = "(score (* (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0))) 0.125))";

    #[test]
    fn a_scaled_dot_folds_its_factor_and_log2e() {
        let p = TiledPlan::new(&kernel(&format!("(branch {DOT_SCORE} (norm (softmax)))"))).expect("tiled");
        assert!(p.branches[0].fold.is_some() && p.branches[0].log2e_folded());
        let s = p.branches[0].softmax.as_ref().expect("softmax");
        assert!(s.plain);
        assert_eq!(s.passes, vec![SoftmaxPass { accumulate: true, fused_step: true, final_weights: false }]);
    }

    #[test]
    fn a_bias_or_a_decay_or_a_post_map_changes_the_plan() {
        let biased = TiledPlan::new(&kernel(&format!("(branch {DOT_SCORE} (bias (load s h)) (norm (softmax)))"))).expect("tiled");
        assert!(!biased.branches[0].softmax.as_ref().unwrap().plain, "a bias is per-pair work");
        let decayed = TiledPlan::new(&kernel(&format!("(branch {DOT_SCORE} (norm (softmax)) (decay (load s h)))"))).expect("tiled");
        assert!(!decayed.branches[0].softmax.as_ref().unwrap().passes[0].fused_step, "a decay sits between the weights and P·V");
        let post = TiledPlan::new(&kernel(&format!("(branch {DOT_SCORE} (norm (softmax (post (* w 2.0)))))"))).expect("tiled");
        let passes = &post.branches[0].softmax.as_ref().unwrap().passes;
        assert_eq!(passes.len(), 2);
        assert!(passes[0].fused_step && !passes[0].accumulate);
        assert!(passes[1].final_weights && passes[1].accumulate && !passes[1].fused_step);
        let map = TiledPlan::new(&kernel(&format!("(branch {DOT_SCORE} (norm (map (sigmoid s))))"))).expect("tiled");
        assert!(map.branches[0].softmax.is_none() && !map.branches[0].log2e_folded());
    }

    #[test]
    fn a_capped_score_folds_its_inner_factor_without_log2e() {
        let dot = "(reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))";
        let capped = |c: &str, extra: &str| kernel(&format!("(branch (score (* {c} (tanh (/ (/ {dot} (sqrt (float $D))) 50.0)))) {extra} (norm (softmax)))"));
        let p = TiledPlan::new(&capped("50.0", "")).expect("tiled");
        let b = &p.branches[0];
        let s = b.softmax.as_ref().expect("softmax");
        assert_eq!(s.tanh_cap, Some(50.0));
        assert!(b.fold.is_some() && !b.log2e_folded() && !s.plain, "the cap is nonlinear: log2 e stays out of the queries");
        assert_eq!(b.rest, Expr::bin(BinOp::Mul, Expr::float(50.0), Expr::Unary(attnc_ir::UnOp::Tanh, Box::new(Expr::var(DOT)))));
        // A negative cap, a bias or a key-dependent factor: evaluated as written.
        assert_eq!(TiledPlan::new(&capped("-50.0", "")).unwrap().branches[0].softmax.as_ref().unwrap().tanh_cap, None);
        assert_eq!(TiledPlan::new(&capped("50.0", "(bias (load s h))")).unwrap().branches[0].softmax.as_ref().unwrap().tanh_cap, None);
        let keyed = kernel(&format!("(branch (score (* 50.0 (tanh (* {dot} (float j))))) (norm (softmax)))"));
        assert_eq!(TiledPlan::new(&keyed).unwrap().branches[0].softmax.as_ref().unwrap().tanh_cap, None);
    }

    #[test]
    fn branches_with_their_own_dots_get_a_panel_per_key_factor() {
        let two = |qa: &str, kb: &str, len: &str| {
            kernel(&format!(
                "(branch {DOT_SCORE} (norm (softmax))) (branch (score (* (reduce sum r0 0 {len} (* (load {qa} b h i r0) (load {kb} b h j r0))) 0.125)) (norm (softmax)))"
            ))
        };
        // Differential attention's shape: other queries and other keys, two panels.
        let p = TiledPlan::new(&two("k", "q", "$D")).expect("tiled");
        assert_eq!(p.panels.len(), 2);
        assert_eq!((p.branches[0].panel, p.branches[1].panel), (Some(0), Some(1)));
        // Other queries against the same keys: one panel, each branch its own queries.
        let p = TiledPlan::new(&two("k", "k", "$D")).expect("tiled");
        assert_eq!(p.panels.len(), 1);
        assert_eq!((p.branches[0].panel, p.branches[1].panel), (Some(0), Some(0)));
        assert_ne!(p.branches[0].dot.as_ref().unwrap().a, p.branches[1].dot.as_ref().unwrap().a);
        // Both fold their own scale.
        assert!(p.branches.iter().all(|b| b.fold.is_some() && b.log2e_folded()));
        // Dots of different lengths: no common query tile.
        assert!(TiledPlan::new(&two("k", "q", "4")).is_none());
    }

    #[test]
    fn a_maps_exp_of_a_row_or_key_statistic_is_found() {
        let map = |f: &str| TiledPlan::new(&kernel(&format!("(branch {DOT_SCORE} (norm (map {f})))"))).expect("tiled").branches.remove(0);
        // The backward's P over the keys: a statistic of the key, the map reads P only.
        let dv = map("(exp (- s (load s j)))");
        let es = dv.exp_stat.expect("found");
        assert!(es.per_key);
        assert_eq!(es.rest, Expr::var("s"));
        // dS over the rows: P times a row term.
        let dq = map("(* (exp (- s (load s i))) (- 2.0 (load s i)))").exp_stat.expect("found");
        assert!(!dq.per_key);
        assert_eq!(
            dq.rest,
            Expr::bin(attnc_ir::BinOp::Mul, Expr::var("s"), Expr::bin(attnc_ir::BinOp::Sub, Expr::float(2.0), Expr::Load("s".into(), vec![Expr::var("i")])))
        );
        // The map reads s elsewhere, the statistic reads both i and j, or no exp of s − t.
        for f in ["(* (exp (- s (load s i))) s)", "(exp (- s (load s (+ i j))))", "(sigmoid s)", "(exp (- 1.0 s))"] {
            assert!(map(f).exp_stat.is_none(), "{f}");
        }
        // A bias: the tile's scores are not the whole score.
        let biased = TiledPlan::new(&kernel(&format!("(branch {DOT_SCORE} (bias (load s h)) (norm (map (exp (- s (load s i))))))"))).expect("tiled");
        assert!(biased.branches[0].exp_stat.is_none());
    }

    #[test]
    fn a_pair_reduction_outside_the_dot_is_not_tiled() {
        let gla =
            "(branch (score (reduce sum r0 0 $D (* (* (load q b h i r0) (load k b h j r0)) (exp (- (load q b h i r0) (load k b h j r0)))))) (norm (softmax)))";
        assert!(TiledPlan::new(&kernel(gla)).is_none());
    }

    #[test]
    fn a_normalization_map_reading_a_second_dot_gets_its_own_panel() {
        let k = attnc_ir::parse_kernel(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D) (dim Dv)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (input g f32 [B H N Dv]) (input v f32 [B H M Dv])
               (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0))))
                 (norm (map (* s (reduce sum r1 0 $Dv (* (load g b h i r1) (load v b h j r1))))))))",
        )
        .expect("kernel");
        let p = TiledPlan::new(&k).expect("tiled");
        let md = p.branches[0].map_dot.as_ref().expect("the map's dot is found");
        assert_eq!(md.panel, 1);
        assert_eq!(md.rest, Expr::bin(attnc_ir::BinOp::Mul, Expr::var("s"), Expr::var(DOT2)));
        assert_eq!(p.channels(), Some(&Expr::dim("D")), "the score's dot");
        assert_eq!(p.channels_all(), Some(Expr::bin(attnc_ir::BinOp::Max, Expr::dim("D"), Expr::dim("Dv"))), "the tile holds the longer");
    }
}
