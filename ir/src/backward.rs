//! The backward pass as ordinary attnc kernels: from a kernel, the kernels whose outputs
//! are the gradients of its float inputs (FlashAttention-2's equations, derived from the
//! spec), so that every backend that runs a forward kernel runs the backward too.
//!
//! For a softmax branch, with `P_ij = exp(s_ij − lse_i)` (the forward's saved log-sum-exp),
//! `dP_ij = Σ_e dO_ie · value(j, e)` and `D_i = Σ_e dO_ie · O_ie`:
//!
//! - the value's leaves: `Σ_i P_ij · dO_ie · ∂value/∂leaf`: a kernel whose rows are the keys
//!   (`i` and `j` exchanged), normalization `exp(s − lse)`, value `dO · ∂value`;
//! - each leaf of the score or bias (`s = score + bias`): `Σ_j dS_ij · ∂s/∂leaf` with
//!   `dS_ij = P_ij (dP_ij − D_i)`: a kernel over the rows when the leaf's index reads the
//!   query (`q[b, h, i, r]`, a per-head slope), over the keys when it reads the key
//!   (`k[b, hk, j, r]`); the leaf's reduction (the dot's channel) becomes the output channel.
//!
//! Each kernel writes `[B, H, rows, E]`; the host adds each element into the gradient at
//! the leaf's index ([`GradKernel::idx`]), which sums grouped heads and repeated reads. A
//! sink logit's leaves get `−exp(sink − lse_i) · D_i` per row, on the host.
//! The kernels read the forward's inputs and three more: `__lse` and `__dd` (`[B, H, N]`:
//! the log-sum-exp and `D`) and `__do` (the cotangent, shaped as the output).
//!
//! A normalization map `p = f(s)` (sigmoid, relu²) has `P = f(s)` and `dS = dP · f'(s)`.
//! A gate is the host's: it runs these kernels on the ungated kernel with `dO ∘ gate` as the
//! cotangent, and gives the gate's leaves `dO · O_ungated · ∂gate`.
//!
//! A softmax post-map `p = post(w)` has `dw = dP · post'(w)`, `dS = w (dw − D)` with `D =
//! Σ_j w dw`, computed by a first row kernel (its target [`DD`]: the host reads it as `D`).
//!
//! A score nonlinear in its one dot `R` (softcap's `c·tanh(R/c)`) is `F(R)`: the kernels'
//! score is `R` with no bias, their maps read `F(s) + bias` where the forward's read `s`, and
//! the dot's leaves are weighted by `dS · F'(s)` (the bias's by `dS`).
//!
//! Leaves `F` reads outside the dot (channel attention's temperature and norms) are weighted
//! by `dS · ∂F/∂leaf`, a function of `s`.
//!
//! Several branches each get their kernels (their own `lse`, and `D = Σ_j P · dnorm` from a
//! row kernel of their own); a branch weight makes the normalization's cotangent `dnorm =
//! dP · weight`, and its leaves are weighted by `P · dP`. Derived tensors are computed by each
//! kernel as by the forward; a leaf that reads one gets a gradient the host passes on to the
//! inputs ([`crate::grad::derived_grads`]).
//!
//! A decay multiplies the weights after the normalization as a branch weight does: `dnorm =
//! dP · decay · weight`, the decay's leaves weighted by `P · dP · weight` (quadratic kernels:
//! the chunked form of the backward is not derived yet).
//!
//! A linear normalization `P = s / den` (the saved denominator) has `dS = (dnorm − D) / den`,
//! `D` as for softmax.
//!
//! A leaf whose index reads both the query and the key (a relative-position table, a dense
//! bias) has a gradient scattered by the pair: its table elements fold into the kernel's
//! heads ([`PairFold`]), each head summing `dS` over the pairs of its element.
//!
//! What this derivation does not cover yet is refused by name ([`Unsupported`]): a sink logit
//! with a reduction or in one of several branches, a per-pair read inside a reduction, a score
//! nonlinear in several reductions (cosine's norms).

use crate::diff::{partials, Target};
use crate::expr::{BinOp, Expr, RedOp, UnOp};
use crate::kernel::*;

/// Names of the extra inputs of the backward kernels.
pub const LSE: &str = "__lse";
pub const DD: &str = "__dd";
pub const DO: &str = "__do";
/// The backward kernels' output.
pub const GRAD: &str = "__grad";

/// One backward kernel: its output, added element by element into the gradient of
/// `target` at `idx` (expressions of `b`, `h`, `i` (the kernel's row) and `e`; a table read
/// per pair has its elements folded into the kernel's heads, `h` there is the folded head,
/// see [`PairFold`]; along `e`, an index past the table's end stands for no key and is
/// skipped: a dense bias's last key block).
#[derive(Clone, Debug)]
pub struct GradKernel {
    pub kernel: Kernel,
    pub target: String,
    pub idx: Vec<Expr>,
    /// What it computes, for messages: `dq (rows)`, `dk (keys)`, `dv (keys)`.
    pub what: String,
    /// A factor of the partial that reads the row and the channel but not the column (a
    /// feature map's derivative, `elu'(q[b, h, i, e])`): the host multiplies each output
    /// element by it (an expression of `b`, `h`, `i`, `e`) before adding it.
    pub scale: Option<Expr>,
    /// Scalars of the same weight riding along as the output's last channels, one each
    /// (ALiBi's slope: `Σ_j dS_ij (j − p) = Σ_j dS_ij j − p Σ_j dS_ij`, two channels of the
    /// `dq` kernel instead of a kernel of its own).
    pub extras: Vec<Extra>,
}

/// One extra output channel of a backward kernel: `Σ_j weight_ij · c(j)` per row, which the
/// host multiplies by `factor` (of `b`, `h`, `i`) and adds into `target` at `idx`.
#[derive(Clone, Debug)]
pub struct Extra {
    pub target: String,
    pub idx: Vec<Expr>,
    pub factor: Expr,
}

/// Why a kernel has no compiled backward yet.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("no compiled backward for this spec yet: {0}")]
pub struct Unsupported(pub String);

fn no<T>(why: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(why.into()))
}

/// Exchanges the query and key variables.
fn swap(e: &Expr) -> Expr {
    e.subst("i", &Expr::var("__swap")).subst("j", &Expr::var("i")).subst("__swap", &Expr::var("j"))
}

fn extent_of(e: &Expr) -> Option<Extent> {
    match e {
        Expr::Dim(d) => Some(Extent::Dim(d.clone())),
        Expr::Int(n) => Some(Extent::Fixed(*n)),
        _ => None,
    }
}

fn has_reduce(e: &Expr) -> bool {
    let mut r = false;
    e.walk(&mut |x| r |= matches!(x, Expr::Reduce { .. }));
    r
}

/// The backward kernels of `k` (see the module's documentation).
pub fn backward_kernels(k: &Kernel) -> Result<Vec<GradKernel>, Unsupported> {
    let several = k.branches.len() > 1;
    for br in &k.branches {
        match &br.norm {
            Norm::Softmax { sink: Some(s), .. } => {
                if several {
                    return no("a sink logit in one of several branches");
                }
                // The sink's own gradient is per row, `−exp(sink − lse) · D` (the host adds
                // it): a sink of tensor elements and indices, no reduction.
                for t in partials(k, s).map_err(|e| Unsupported(e.to_string()))? {
                    if !t.binders.is_empty() || !matches!(t.target, Target::Load { .. }) {
                        return no("a sink logit with a reduction");
                    }
                }
            }
            Norm::Softmax { .. } | Norm::Map(_) | Norm::Linear { .. } => {}
        }
    }
    if let Some(t) = k.tensors.iter().find(|t| [LSE, DD, DO, GRAD].contains(&t.name.as_str())) {
        return no(format!("the spec declares `{}`, a name the backward kernels use", t.name));
    }
    let out = k.output();
    let mut inputs: Vec<TensorDecl> = k.inputs().cloned().collect();
    let rows_shape = vec![k.iter.b.clone(), k.iter.h.clone(), k.iter.i.clone()];
    // The saved statistics, [B, H, N, branches] as the forward writes them.
    let mut lse_shape = rows_shape.clone();
    lse_shape.push(Extent::Fixed(k.branches.len() as i64));
    inputs.push(TensorDecl { name: LSE.into(), dtype: DType::F32, shape: lse_shape, kind: TensorKind::Input });
    inputs.push(TensorDecl { name: DD.into(), dtype: DType::F32, shape: rows_shape, kind: TensorKind::Input });
    inputs.push(TensorDecl { name: DO.into(), dtype: DType::F32, shape: out.shape.clone(), kind: TensorKind::Input });
    // Derived tensors: each kernel computes them as the forward does; a leaf that reads
    // one gets its gradient, which the host passes on to the inputs.
    inputs.extend(k.derived().cloned());
    let mut kernels = Vec::new();
    for (n, br) in k.branches.iter().enumerate() {
        branch_kernels(k, n, br, &inputs, &mut kernels)?;
    }
    Ok(kernels)
}

/// The backward kernels of branch `n` of `k` (the host adds every branch's into the same
/// gradients). Its output's share is `Σ_j norm_ij · weight_ij · value(j, e)`: the
/// normalization's cotangent is `dP · weight`.
fn branch_kernels(k: &Kernel, n: usize, br: &Branch, inputs: &[TensorDecl], kernels: &mut Vec<GradKernel>) -> Result<(), Unsupported> {
    let float = |name: &str| k.tensor(name).is_some_and(|t| !t.dtype.is_int());
    let several = k.branches.len() > 1;
    let tag = if several { format!(", branch {n}") } else { String::new() };
    let suffix = if several { format!("_b{n}") } else { String::new() };
    // The cotangent at (row `i`, channel `ch`), the output's axes in its order.
    let d_o = |ch: &Expr| Expr::Load(DO.into(), k.out.iter().map(|v| if v == "e" { ch.clone() } else { Expr::var(v) }).collect());
    let row = || vec![Expr::var("b"), Expr::var("h"), Expr::var("i")];
    let lse = Expr::Load(LSE.into(), [row(), vec![Expr::Int(n as i64)]].concat());
    let dd = Expr::Load(DD.into(), row());
    // A score nonlinear in its one dot `R` (softcap's `c·tanh(R/c)`): the kernels' score is
    // `R` with no bias, and their maps read the whole score `F(s) + bias` where the forward's
    // read `s`; the score's leaves (all in `R`) are weighted by `dS · F'(s)`.
    let nonlinear = nonlinear_score(k, &br.score)?;
    let s = match &nonlinear {
        Some(nl) => match &br.bias {
            Some(b) => Expr::bin(BinOp::Add, nl.f.clone(), b.clone()),
            None => nl.f.clone(),
        },
        None => Expr::var("s"),
    };
    let ev = "__e";
    let d_p = Expr::Reduce {
        op: RedOp::Sum,
        var: ev.into(),
        lo: Box::new(Expr::Int(0)),
        hi: Box::new(k.iter.e.to_expr()),
        body: Box::new(Expr::bin(BinOp::Mul, d_o(&Expr::var(ev)), k.value.subst("e", &Expr::var(ev)))),
    };
    // The normalization's cotangent: dP times the pair's factors after it, the decay and
    // the branch weight (`p = norm · decay · weight`).
    let times = |x: Expr, f: &Option<Expr>| match f {
        Some(f) => Expr::bin(BinOp::Mul, x, f.clone()),
        None => x,
    };
    let weighted = |x: Expr| times(times(x, &br.decay), &br.weight);
    let d_norm = weighted(d_p.clone());
    // Softmax: P = exp(s − lse_i) and dS = P (dnorm − D_i), D_i = Σ_j P dnorm (`Σ_e dO ∘ O`
    // when the branch is the output, computed by the host; else a row kernel of its own).
    // A map p = f(s): P = f(s) and dS = dnorm · f'(s) (none when f does not read s).
    // A post-map `p = post(w)`: `dw = dnorm · post'(w)`, `dS = w (dw − D)` with `D = Σ_j w dw`.
    // The branch's `D` is `Σ_e dO ∘ O` only when the branch alone, unweighted, is the output.
    let not_the_output = several || br.weight.is_some() || br.decay.is_some();
    let mut own_d = None;
    let (p, d_s) = match &br.norm {
        Norm::Map(f) => {
            let df = crate::diff::derivative_by_var(k, f, "s").map_err(|e| Unsupported(e.to_string()))?;
            (f.subst("s", &s), df.map(|df| Expr::bin(BinOp::Mul, d_norm.clone(), df.subst("s", &s))))
        }
        // Linear: P = s / den_i (the saved denominator `Σ_j s + eps`), dS = (dnorm − D_i) / den_i
        // with D_i = Σ_j P dnorm as for softmax (`Σ_e dO ∘ O` too when the branch is the output).
        Norm::Linear { .. } => {
            let den = lse;
            let p = Expr::bin(BinOp::Div, s, den.clone());
            if not_the_output {
                own_d = Some(Expr::bin(BinOp::Mul, p.clone(), d_norm.clone()));
            }
            (p, Some(Expr::bin(BinOp::Div, Expr::bin(BinOp::Sub, d_norm.clone(), dd), den)))
        }
        Norm::Softmax { post: None, .. } => {
            let p = Expr::un(UnOp::Exp, Expr::bin(BinOp::Sub, s, lse));
            if not_the_output {
                own_d = Some(Expr::bin(BinOp::Mul, p.clone(), d_norm.clone()));
            }
            let d_s = Expr::bin(BinOp::Mul, p.clone(), Expr::bin(BinOp::Sub, d_norm.clone(), dd));
            (p, Some(d_s))
        }
        Norm::Softmax { post: Some(post), .. } => {
            let w = Expr::un(UnOp::Exp, Expr::bin(BinOp::Sub, s, lse));
            let dpost = crate::diff::derivative_by_var(k, post, "w").map_err(|e| Unsupported(e.to_string()))?.unwrap_or(Expr::float(0.0));
            let dw = Expr::bin(BinOp::Mul, d_norm.clone(), dpost.subst("w", &w));
            own_d = Some(Expr::bin(BinOp::Mul, w.clone(), dw.clone()));
            (post.subst("w", &w), Some(Expr::bin(BinOp::Mul, w, Expr::bin(BinOp::Sub, dw, dd))))
        }
    };

    // A kernel over the rows (`keys: false`) or the keys, in the forward's frame: the
    // normalization map `norm`, the value `value` (of `e` over `width`).
    let make = |what: &str, norm: &Expr, value: &Expr, width: Extent, keys: bool, more_dims: &[DimDecl]| -> Kernel {
        let f = |e: &Expr| if keys { swap(e) } else { e.clone() };
        let rows = if keys { k.iter.j.clone() } else { k.iter.i.clone() };
        let cols = if keys { k.iter.i.clone() } else { k.iter.j.clone() };
        let mut tensors = inputs.to_vec();
        tensors.push(TensorDecl {
            name: GRAD.into(),
            dtype: DType::F32,
            shape: vec![k.iter.b.clone(), k.iter.h.clone(), rows.clone(), width.clone()],
            kind: TensorKind::Output,
        });
        let norm = Norm::Map(f(norm));
        Kernel {
            name: format!("{}_{what}{suffix}", k.name),
            dims: [k.dims.as_slice(), more_dims].concat(),
            tensors,
            requires: k.requires.clone(),
            iter: Iter { b: k.iter.b.clone(), h: k.iter.h.clone(), i: rows, j: cols, e: width },
            value: f(value),
            out: ["b", "h", "i", "e"].map(String::from).to_vec(),
            branches: vec![match &nonlinear {
                Some(nl) => Branch { score: f(&nl.dot), bias: None, mask: br.mask.as_ref().map(f), norm, decay: None, weight: None },
                None => Branch { score: f(&br.score), bias: br.bias.as_ref().map(f), mask: br.mask.as_ref().map(f), norm, decay: None, weight: None },
            }],
            gate: None,
        }
    };

    // The branch's `D` first: a row kernel of width 1 (the host reads it as `__dd`).
    if let Some(wdw) = &own_d {
        kernels.push(GradKernel {
            kernel: make("dd", wdw, &Expr::float(1.0), Extent::Fixed(1), false, &[]),
            idx: vec![],
            what: format!("D (rows{tag})"),
            target: DD.into(),
            scale: None,
            extras: vec![],
        });
    }
    // The value's leaves: over the keys, weight P (times the branch weight), value
    // dO_ie · ∂value/∂leaf.
    let p_weighted = weighted(p.clone());
    for t in partials(k, &k.value).map_err(|e| Unsupported(e.to_string()))? {
        let Target::Load { tensor, idx } = t.target else { return no("a value that reads a float variable") };
        if !t.binders.is_empty() {
            return no(format!("a value that sums over `{tensor}`"));
        }
        if t.adj.free_vars().contains("j") {
            return no(format!("a value whose partial for `{tensor}` reads the key"));
        }
        let value = Expr::bin(BinOp::Mul, d_o(&Expr::var("e")), t.adj);
        kernels.push(GradKernel {
            kernel: make(&format!("d{tensor}"), &p_weighted, &value, k.iter.e.clone(), true, &[]),
            idx: idx.iter().map(swap).collect(),
            what: format!("d{tensor} (keys{tag})"),
            target: tensor,
            scale: None,
            extras: vec![],
        });
    }
    // Each leaf with its pair weight: the score's (dS, times `F'(s)` for a nonlinear score,
    // whose leaves are the dot's), the bias's (dS), the branch weight's (P · dP).
    let mut terms = Vec::new();
    if let Some(d_s) = &d_s {
        let score_ds = match &nonlinear {
            Some(nl) => nl.df.as_ref().map(|df| Expr::bin(BinOp::Mul, d_s.clone(), df.clone())),
            None => Some(d_s.clone()),
        };
        if let Some(w) = score_ds {
            let leaves = partials(k, nonlinear.as_ref().map_or(&br.score, |nl| &nl.dot)).map_err(|e| Unsupported(e.to_string()))?;
            terms.extend(leaves.into_iter().map(|t| (t, w.clone())));
        }
        if let Some(b) = &br.bias {
            terms.extend(partials(k, b).map_err(|e| Unsupported(e.to_string()))?.into_iter().map(|t| (t, d_s.clone())));
        }
        if let Some(nl) = &nonlinear {
            terms.extend(nl.outer.iter().map(|t| (t.clone(), d_s.clone())));
        }
    }
    // The decay's and the weight's leaves: P · dP times the other factor.
    let pd = Expr::bin(BinOp::Mul, p, d_p);
    for (f, other) in [(&br.decay, &br.weight), (&br.weight, &br.decay)] {
        if let Some(f) = f {
            let w = times(pd.clone(), other);
            terms.extend(partials(k, f).map_err(|e| Unsupported(e.to_string()))?.into_iter().map(|t| (t, w.clone())));
        }
    }
    let mut jobs: Vec<Job> = Vec::new();
    for (t, d_s) in terms {
        let Target::Load { tensor, idx } = t.target else { return no("a score that reads a float variable") };
        if !float(&tensor) {
            return no(format!("a score that reads `{tensor}`"));
        }
        if has_reduce(&t.adj) {
            return no(format!("a score nonlinear in its dot product (the partial for `{tensor}` holds a reduction)"));
        }
        let (mut idx, mut adj, width) = match t.binders.as_slice() {
            [] => (idx, t.adj, Extent::Fixed(1)),
            [bd] if bd.lo == Expr::Int(0) => {
                let Some(w) = extent_of(&bd.hi) else { return no(format!("a reduction over `{tensor}` of extent {:?}", bd.hi)) };
                let e = Expr::var("e");
                (idx.iter().map(|x| x.subst(&bd.var, &e)).collect(), t.adj.subst(&bd.var, &e), w)
            }
            _ => return no(format!("nested reductions over `{tensor}`")),
        };
        let vars: std::collections::BTreeSet<String> = idx.iter().flat_map(|x| x.free_vars()).collect();
        let (reads_i, reads_j) = (vars.contains("i"), vars.contains("j"));
        // A table read per pair: its elements folded into the kernel's heads (`pair_fold`).
        let mut fold = None;
        let keys = match (reads_i, reads_j) {
            (true, true) => {
                if width != Extent::Fixed(1) {
                    return no(format!("`{tensor}` is read per pair inside a reduction"));
                }
                let f = pair_fold(k, &tensor, &idx);
                idx = f.idx.clone();
                fold = Some(f);
                false
            }
            (false, true) => true,
            (_, false) => false,
        };
        if keys {
            idx = idx.iter().map(swap).collect();
        }
        if k.ty_of(&adj) == crate::Ty::Int {
            adj = Expr::un(UnOp::ToFloat, adj);
        }
        let side = if keys { "keys" } else { "rows" };
        // A value reads the key and the channel, not the row: a partial without a channel
        // (a slope's `j − i`) goes into the weight, with the value 1.
        // A partial that reads the row and the channel (a feature map's derivative): its
        // factors that read the row go to the host, the others stay the value.
        let (row_var, col_var) = if keys { ("j", "i") } else { ("i", "j") };
        let mut scale = None;
        // A scalar over the rows whose partial is a sum of row terms times key terms may ride
        // along a wider kernel of the same weight (below).
        let low_rank = if width == Extent::Fixed(1) && !keys && fold.is_none() { low_rank_terms(&adj, row_var, col_var) } else { None };
        let (norm, value) = if let Some(f) = &fold {
            (Expr::bin(BinOp::Mul, d_s.clone(), adj), f.value.clone())
        } else if width == Extent::Fixed(1) {
            (Expr::bin(BinOp::Mul, d_s.clone(), adj), Expr::float(1.0))
        } else if adj.free_vars().contains(row_var) {
            let Some((a, c, w)) = split_sides(&adj, row_var, col_var) else {
                return no(format!("the partial for `{tensor}` reads the row, the key and the channel in one factor"));
            };
            scale = Some(if keys { swap(&a) } else { a });
            (Expr::bin(BinOp::Mul, d_s.clone(), w), c)
        } else {
            (d_s.clone(), adj)
        };
        let (side, width) = match &fold {
            Some(f) => ("pairs", Extent::Fixed(f.width)),
            None => (side, width),
        };
        jobs.push(Job { what: format!("d{tensor} ({side}{tag})"), tensor, idx, norm, value, width, keys, scale, weight: d_s, low_rank, extras: vec![], fold });
    }
    // Scalars that ride along: into the first wide rows kernel of the same weight (whose own
    // channels need no host factor).
    let mut n = 0;
    while n < jobs.len() {
        let host = jobs.iter().position(|h| {
            !h.keys && h.width != Extent::Fixed(1) && h.scale.is_none() && h.low_rank.is_none() && h.fold.is_none() && h.weight == jobs[n].weight
        });
        match (host, jobs[n].low_rank.is_some()) {
            (Some(h), true) if h != n => {
                let job = jobs.remove(n);
                let h = if h > n { h - 1 } else { h };
                for (a, c) in job.low_rank.expect("checked") {
                    jobs[h].extras.push((c, Extra { target: job.tensor.clone(), idx: job.idx.clone(), factor: a }));
                }
                jobs[h].what = format!("{} + {}", jobs[h].what, job.what);
            }
            _ => n += 1,
        }
    }
    for job in jobs {
        let (width, value, dims) = if job.extras.is_empty() {
            (job.width, job.value, vec![])
        } else {
            // The value's channels, then one per extra: `select(e < W, value, c_0, c_1, ...)`.
            let base = job.width.to_expr();
            let name = "__EX".to_string();
            let def = Expr::bin(BinOp::Add, base.clone(), Expr::Int(job.extras.len() as i64));
            let mut value = Expr::float(0.0);
            for (r, (c, _)) in job.extras.iter().enumerate().rev() {
                let at = Expr::bin(BinOp::Add, base.clone(), Expr::Int(r as i64));
                value = Expr::Select(Box::new(Expr::bin(BinOp::Eq, Expr::var("e"), at)), Box::new(c.clone()), Box::new(value));
            }
            let value = Expr::Select(Box::new(Expr::bin(BinOp::Lt, Expr::var("e"), base)), Box::new(job.value), Box::new(value));
            (Extent::Dim(name.clone()), value, vec![DimDecl { name, def: Some(def) }])
        };
        let kernel = make(job.what.split(' ').next().unwrap_or("d"), &job.norm, &value, width, job.keys, &dims);
        kernels.push(GradKernel {
            kernel: match &job.fold {
                Some(f) => fold_heads(kernel, k, f),
                None => kernel,
            },
            idx: job.idx,
            what: job.what,
            target: job.tensor,
            scale: job.scale,
            extras: job.extras.into_iter().map(|(_, x)| x).collect(),
        });
    }
    Ok(())
}

/// A leaf's backward kernel before it is built (see the merge in [`branch_kernels`]).
struct Job {
    tensor: String,
    idx: Vec<Expr>,
    norm: Expr,
    value: Expr,
    width: Extent,
    keys: bool,
    scale: Option<Expr>,
    what: String,
    /// The pair weight the partial multiplies (`dS`).
    weight: Expr,
    /// For a scalar over the rows: its partial as `Σ A_r(row) · C_r(key)`.
    low_rank: Option<Vec<(Expr, Expr)>>,
    extras: Vec<(Expr, Extra)>,
    /// A table read per pair: how its elements fold into the heads.
    fold: Option<PairFold>,
}

/// The fold of a table read per pair (`rel[h, bucket(i − j)]`, `bias[b, h, i, j]`) into the
/// heads of its backward kernel. The gradient `Σ_ij dS_ij · ∂ · [idx(i, j) = x]` is a scatter
/// by the pair's table element; no kernel output is indexed by the pair, so each table element
/// `x` along the axes that read the key (`c`, flattened, `E` of them) gets a head of its own:
/// head `h' = h · T + t` keeps the pairs whose element is `t` (its mask gains `c == t`, which
/// the tile classes resolve per head: a head's work is the tiles where its element occurs)
/// and sums `dS · ∂` over their keys into one channel (`T = E`). A key axis that is the key
/// itself (a dense bias) folds by blocks of `W = 64` keys instead (`c // W == t`, value
/// `[c % W == e]`: one live key tile per query tile and head, `W` channels), so the work is
/// that of one `dQ` kernel rather than `M` times it.
#[derive(Clone, Debug)]
struct PairFold {
    /// The gradient's index, of `b`, the folded `h`, `i` and `e` (`h // T` where the leaf read
    /// `h`, the element `(h % T) · W + e` unflattened along the key axes).
    idx: Vec<Expr>,
    /// `T`, the folded heads per head (an expression of the dims).
    per_head: Expr,
    /// Whether the pair is in folded head `h` (of `h`, `i`, `j`; the leaf's own `h` already
    /// replaced by `h // T`).
    sel: Expr,
    /// The kernel's value (`1`, or `[c % W == e]`) and its channels `W`.
    value: Expr,
    width: i64,
}

/// The dim of a per-pair table's kernel's heads (`H · T`, see [`PairFold`]).
pub const FOLDED_HEADS: &str = "__HT";

/// Key blocks of a dense bias's fold (see [`PairFold`]).
const FOLD_KEYS: i64 = 64;

fn pair_fold(k: &Kernel, tensor: &str, idx: &[Expr]) -> PairFold {
    let shape = &k.tensor(tensor).expect("a leaf is a declared tensor").shape;
    let key_axes: Vec<usize> = (0..idx.len()).filter(|a| idx[*a].free_vars().contains("j")).collect();
    let (int, var, dim) = (Expr::Int, Expr::var, |a: usize| shape[a].to_expr());
    let mul = |a: Expr, b: Expr| Expr::bin(BinOp::Mul, a, b);
    let add = |a: Expr, b: Expr| Expr::bin(BinOp::Add, a, b);
    let div = |a: Expr, b: Expr| Expr::bin(BinOp::FloorDiv, a, b);
    let rem = |a: Expr, b: Expr| Expr::bin(BinOp::Mod, a, b);
    let eq = |a: Expr, b: Expr| Expr::bin(BinOp::Eq, a, b);
    // The key axes' element, flattened row-major, and how many there are.
    let (first, rest) = key_axes.split_first().expect("a leaf read per pair reads the key");
    let flat = rest.iter().fold(idx[*first].clone(), |acc, a| add(mul(acc, dim(*a)), idx[*a].clone()));
    let elements = rest.iter().fold(dim(*first), |acc, a| mul(acc, dim(*a)));
    let blocked = matches!(key_axes.as_slice(), [a] if idx[*a] == var("j"));
    let width = if blocked { FOLD_KEYS } else { 1 };
    let per_head = if blocked { div(add(elements, int(width - 1)), int(width)) } else { elements };
    let (t, outer_h) = (rem(var("h"), per_head.clone()), div(var("h"), per_head.clone()));
    // The pair's element (the leaf's `h` is the folded head's `h // T`) against this head's.
    let flat = flat.subst("h", &outer_h);
    let sel = if blocked { eq(div(flat, int(width)), t.clone()) } else { eq(flat, t.clone()) };
    let value = if blocked { Expr::select(eq(rem(var("j"), int(width)), var("e")), Expr::float(1.0), Expr::float(0.0)) } else { Expr::float(1.0) };
    // The gradient's index: the element `(h % T) · W + e` along the key axes.
    let element = if blocked { add(mul(t, int(width)), var("e")) } else { t };
    let mut out: Vec<Expr> = idx.iter().map(|x| x.subst("h", &outer_h)).collect();
    if let [a] = key_axes.as_slice() {
        out[*a] = element;
    } else {
        for (n, a) in key_axes.iter().enumerate() {
            // The element's digit on this axis: over the axes after it, modulo its own.
            let inner = key_axes[n + 1..].iter().map(|b| dim(*b)).reduce(mul);
            out[*a] = rem(inner.map_or(element.clone(), |d| div(element.clone(), d)), dim(*a));
        }
    }
    PairFold { idx: out, per_head, sel, value, width }
}

/// A pair leaf's kernel with its heads folded (see [`PairFold`]): `h` becomes `h // T` in
/// everything it read, its heads `H · T`, its mask gains the fold's selection.
fn fold_heads(mut kern: Kernel, k: &Kernel, f: &PairFold) -> Kernel {
    let outer = Expr::bin(BinOp::FloorDiv, Expr::var("h"), f.per_head.clone());
    let hh = |e: &Expr| e.subst("h", &outer);
    kern.dims.push(DimDecl { name: FOLDED_HEADS.into(), def: Some(Expr::bin(BinOp::Mul, k.iter.h.to_expr(), f.per_head.clone())) });
    kern.iter.h = Extent::Dim(FOLDED_HEADS.into());
    if let Some(t) = kern.tensors.iter_mut().find(|t| t.kind == TensorKind::Output) {
        t.shape[1] = Extent::Dim(FOLDED_HEADS.into());
    }
    kern.value = hh(&kern.value);
    for br in &mut kern.branches {
        br.score = hh(&br.score);
        br.bias = br.bias.as_ref().map(hh);
        br.norm = match &br.norm {
            Norm::Map(m) => Norm::Map(hh(m)),
            other => other.clone(),
        };
        br.mask = Some(match br.mask.as_ref().map(hh) {
            Some(m) => Expr::bin(BinOp::And, f.sel.clone(), m),
            None => f.sel.clone(),
        });
    }
    kern
}

/// `e` (free of the channel) as a sum of products `A_r · C_r`, `A_r` free of `col` and
/// `C_r` free of `row` (ALiBi's `−float(p − j)` is `−float(p) · 1 + 1 · float(j)`); at most
/// four terms.
fn low_rank_terms(e: &Expr, row: &str, col: &str) -> Option<Vec<(Expr, Expr)>> {
    fn terms(e: &Expr, sign: bool, out: &mut Vec<(bool, Expr)>) {
        match e {
            Expr::Binary(BinOp::Add, a, b) => {
                terms(a, sign, out);
                terms(b, sign, out);
            }
            Expr::Binary(BinOp::Sub, a, b) => {
                terms(a, sign, out);
                terms(b, !sign, out);
            }
            Expr::Unary(UnOp::Neg, a) => terms(a, !sign, out),
            // An integer sum converts term by term (exact below 2^24).
            Expr::Unary(UnOp::ToFloat, a) if matches!(**a, Expr::Binary(BinOp::Add | BinOp::Sub, ..) | Expr::Unary(UnOp::Neg, _)) => {
                let mut inner = Vec::new();
                terms(a, sign, &mut inner);
                out.extend(inner.into_iter().map(|(s, t)| (s, Expr::un(UnOp::ToFloat, t))));
            }
            _ => out.push((sign, e.clone())),
        }
    }
    if e.free_vars().contains("e") {
        return None;
    }
    let mut ts = Vec::new();
    terms(e, true, &mut ts);
    if ts.len() > 4 {
        return None;
    }
    ts.into_iter()
        .map(|(sign, t)| {
            let (a, c, w) = split_sides_of(&t, row, col)?;
            let a = Expr::bin(BinOp::Mul, a, w);
            Some((if sign { a } else { Expr::un(UnOp::Neg, a) }, c))
        })
        .collect()
}

/// A partial (of a leaf read at row and channel `e`) as `A · C · W` from its product and
/// quotient factors: `A` reads the row and the channel (the host's), `C` the channel and not
/// the row (the kernel's value), `W` no channel (into the kernel's weight); `None` when a
/// factor reads the row, the column and the channel.
fn split_sides(e: &Expr, row: &str, col: &str) -> Option<(Expr, Expr, Expr)> {
    let one = || Expr::float(1.0);
    match e {
        Expr::Binary(op @ (BinOp::Mul | BinOp::Div), x, y) => {
            let ((ax, cx, wx), (ay, cy, wy)) = (split_sides(x, row, col)?, split_sides(y, row, col)?);
            Some((Expr::bin(*op, ax, ay), Expr::bin(*op, cx, cy), Expr::bin(*op, wx, wy)))
        }
        Expr::Unary(UnOp::Neg, x) => {
            let (a, c, w) = split_sides(x, row, col)?;
            Some((Expr::un(UnOp::Neg, a), c, w))
        }
        // A piecewise factor of the row (`relu'(q)`): `select(c, x, 0) = select(c, 1, 0) · x`.
        Expr::Select(c, x, z) if **z == Expr::float(0.0) && !c.free_vars().contains(col) => {
            let (a, cx, w) = split_sides(x, row, col)?;
            Some((Expr::bin(BinOp::Mul, Expr::Select(c.clone(), Box::new(one()), Box::new(Expr::float(0.0))), a), cx, w))
        }
        _ => {
            let vars = e.free_vars();
            match (vars.contains("e"), vars.contains(row), vars.contains(col)) {
                (false, _, _) => Some((one(), one(), e.clone())),
                (true, true, true) => None,
                (true, true, false) => Some((e.clone(), one(), one())),
                (true, false, _) => Some((one(), e.clone(), one())),
            }
        }
    }
}

/// A product (free of the channel) as `A · C · 1`, `A` free of `col` and `C` free of `row`
/// (`None` when a factor reads both).
fn split_sides_of(e: &Expr, row: &str, col: &str) -> Option<(Expr, Expr, Expr)> {
    match e {
        Expr::Binary(op @ (BinOp::Mul | BinOp::Div), x, y) => {
            let ((ax, cx, _), (ay, cy, _)) = (split_sides_of(x, row, col)?, split_sides_of(y, row, col)?);
            Some((Expr::bin(*op, ax, ay), Expr::bin(*op, cx, cy), Expr::float(1.0)))
        }
        Expr::Unary(UnOp::Neg, x) => {
            let (a, c, w) = split_sides_of(x, row, col)?;
            Some((Expr::un(UnOp::Neg, a), c, w))
        }
        _ => {
            let vars = e.free_vars();
            match (vars.contains(row), vars.contains(col)) {
                (true, true) => None,
                (false, true) => Some((Expr::float(1.0), e.clone(), Expr::float(1.0))),
                _ => Some((e.clone(), Expr::float(1.0), Expr::float(1.0))),
            }
        }
    }
}

/// A score `F(R)` nonlinear in its one dot `R`: `R`, `F` over the variable `s` (`F(s)`),
/// and `F'(s)` (`None` when `F` does not depend on `R`).
struct Nonlinear {
    dot: Expr,
    f: Expr,
    df: Option<Expr>,
    /// The leaves `F` reads outside the dot (a temperature, a norm), partials over `s`.
    outer: Vec<crate::diff::Term>,
}

/// `Some` when the score's partials hold a reduction (it is not linear in its dot): then it
/// must read exactly one reduction.
fn nonlinear_score(k: &Kernel, score: &Expr) -> Result<Option<Nonlinear>, Unsupported> {
    let terms = partials(k, score).map_err(|e| Unsupported(e.to_string()))?;
    if !terms.iter().any(|t| has_reduce(&t.adj)) {
        return Ok(None);
    }
    let mut dots = Vec::new();
    fn outer(e: &Expr, out: &mut Vec<Expr>) {
        match e {
            Expr::Reduce { .. } => out.push(e.clone()),
            _ => e.children().into_iter().for_each(|c| outer(c, out)),
        }
    }
    outer(score, &mut dots);
    let [dot] = dots.as_slice() else { return no(format!("a score nonlinear in {} reductions", dots.len())) };
    fn replace(e: &Expr, what: &Expr, with: &Expr) -> Expr {
        if e == what {
            with.clone()
        } else {
            e.map_children(&mut |c| replace(c, what, with))
        }
    }
    let x = Expr::var(crate::DOT_VAR);
    let f = replace(score, dot, &x);
    let s = Expr::var("s");
    let outer = partials(k, &f)
        .map_err(|e| Unsupported(e.to_string()))?
        .into_iter()
        .filter(|t| matches!(t.target, Target::Load { .. }))
        .map(|t| crate::diff::Term { adj: t.adj.subst(crate::DOT_VAR, &s), ..t })
        .collect();
    let df = crate::diff::derivative_by_var(k, &f, crate::DOT_VAR).map_err(|e| Unsupported(e.to_string()))?;
    Ok(Some(Nonlinear { dot: dot.clone(), f: f.subst(crate::DOT_VAR, &s), df: df.map(|d| d.subst(crate::DOT_VAR, &s)), outer }))
}
