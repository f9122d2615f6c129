//! The reference backward: gradients of a kernel's output, against a cotangent, with
//! respect to every float input, in f64. It fixes what a backward kernel must compute, as
//! [`crate::reference`] fixes the forward.
//!
//! For each `(b, h, i)` it recomputes the forward row (the live keys, each branch's weights)
//! and runs it backwards:
//!
//! 1. `o[e] = acc[e] · gate(e)`: `dacc[e] = do[e] · gate(e)`, and `gate`'s leaves receive
//!    `do[e] · acc[e]`; a row with no live key (all zeros, gate not applied) has no gradient;
//! 2. `acc[e] = Σ_j q_j · value(j, e)` with `q_j = p_j · weight · decay_j`: `value`'s leaves
//!    receive `q_j · dacc[e]`, `dq_j = Σ_e dacc[e] · value(j, e)`, and `weight`, `decay` and
//!    `p_j` their shares of `dq_j`;
//! 3. the normalization's Jacobian: softmax `ds_j = w_j (dw_j − Σ_k w_k dw_k)` with
//!    `dw_j = dp_j · post'(w_j)`, the sink logit `−w_sink Σ_k w_k dw_k`; a map
//!    `ds_j = dp_j · f'(s_j)`; linear `ds_j = dp_j / den − Σ_k dp_k s_k / den²`;
//! 4. `s_j = score + bias`: both receive `ds_j`.
//!
//! A leaf's share is scattered through the symbolic partials of [`crate::diff`]. Derived
//! tensors pass their gradient on last, in reverse declaration order (a `cumsum` as a
//! reverse running sum). Masks, integers and indices have no gradient. NaN propagates as in
//! the forward: a NaN score makes its row's gradients NaN.

use crate::bind::Bindings;
use crate::diff::{partials, DiffError, Target};
use crate::expr::{BinOp, Expr};
use crate::kernel::*;
use crate::reference::{branch_row, machine, BranchNodes, BranchRow, Machine, Node, RefError, Tensor, FIXED, V};
use rayon::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GradError {
    #[error(transparent)]
    Ref(#[from] RefError),
    #[error(transparent)]
    Diff(#[from] DiffError),
    #[error("the cotangent `{name}` has shape {got:?}; the output has shape {want:?}")]
    Cotangent { name: String, got: Vec<usize>, want: Vec<usize> },
}

/// One leaf's partial, compiled: `g[tensor][idx] += seed · adj` for every value of the binders.
struct Scatter {
    tensor: usize,
    idx: Vec<Node>,
    /// `(lo, hi, slot)` of each enclosing reduction, outermost first.
    binders: Vec<(Node, Node, usize)>,
    adj: Node,
}

/// An expression's derivative: what it scatters to tensor elements, and its derivative by
/// its float variable (`s` of a map, `w` of a post).
struct Diffed {
    loads: Vec<Scatter>,
    by_var: Option<Node>,
}

/// The derivative of `e`, compiled with the variables `base` in scope; `var` is the float
/// variable it may read (any other is refused).
fn diffed(m: &Machine, k: &Kernel, e: &Expr, base: &[String], var: Option<&str>, what: &str) -> Result<Diffed, GradError> {
    let mut loads = Vec::new();
    let mut by: Option<Expr> = None;
    for t in partials(k, e)? {
        match &t.target {
            Target::Load { tensor, idx } => {
                let mut scope = base.to_vec();
                let mut binders = Vec::new();
                for b in &t.binders {
                    let lo = m.compile(&b.lo, &mut scope);
                    let hi = m.compile(&b.hi, &mut scope);
                    scope.push(b.var.clone());
                    binders.push((lo, hi, scope.len() - 1));
                }
                let idx = idx.iter().map(|x| m.compile(x, &mut scope)).collect();
                let adj = m.compile(&t.adj, &mut scope);
                loads.push(Scatter { tensor: m.names[tensor], idx, binders, adj });
            }
            Target::Var(v) if Some(v.as_str()) == var && t.binders.is_empty() => {
                by = Some(match by {
                    None => t.adj,
                    Some(a) => Expr::bin(BinOp::Add, a, t.adj),
                });
            }
            Target::Var(v) => return Err(DiffError::Unsupported(format!("`{v}` where it is read in {what}")).into()),
        }
    }
    let by_var = by.map(|e| m.compile(&e, &mut base.to_vec()));
    Ok(Diffed { loads, by_var })
}

fn diffed_opt(m: &Machine, k: &Kernel, e: &Option<Expr>, base: &[String], var: Option<&str>, what: &str) -> Result<Option<Diffed>, GradError> {
    e.as_ref().map(|e| diffed(m, k, e, base, var, what)).transpose()
}

/// Adds `seed · ∂/∂leaf` to each leaf `terms` read, at the variables `env` holds.
fn scatter(m: &Machine, terms: &[Scatter], env: &mut Vec<V>, seed: f64, g: &mut [Vec<f64>], cx: &str) -> Result<(), RefError> {
    fn walk(m: &Machine, t: &Scatter, level: usize, env: &mut Vec<V>, seed: f64, g: &mut [Vec<f64>], cx: &str) -> Result<(), RefError> {
        if level == t.binders.len() {
            let a = m.eval(&t.adj, env, cx)?.f();
            let st = &m.tensors[t.tensor];
            let mut flat = 0usize;
            for (axis, (x, &len)) in t.idx.iter().zip(&st.shape).enumerate() {
                let i = m.eval(x, env, cx)?.i();
                if i < 0 || i as usize >= len {
                    return Err(RefError::OutOfBounds { context: cx.to_string(), tensor: st.name.clone(), axis, index: i, len });
                }
                flat = flat * len + i as usize;
            }
            g[t.tensor][flat] += seed * a;
            return Ok(());
        }
        let (lo, hi, slot) = &t.binders[level];
        let (lo, hi) = (m.eval(lo, env, cx)?.i(), m.eval(hi, env, cx)?.i());
        if env.len() <= *slot {
            env.resize(*slot + 1, V::I(0));
        }
        for x in lo..hi {
            env[*slot] = V::I(x);
            walk(m, t, level + 1, env, seed, g, cx)?;
        }
        Ok(())
    }
    for t in terms {
        walk(m, t, 0, env, seed, g, cx)?;
    }
    Ok(())
}

/// Gradients of `Σ dout · o` with respect to every float input of `k` (by name, shaped as
/// the input), at `inputs`; `dims` bound as for [`crate::reference::run_bound`].
pub fn grad(k: &Kernel, dims: &Bindings, inputs: &BTreeMap<String, Tensor>, dout: &Tensor) -> Result<BTreeMap<String, Tensor>, GradError> {
    let m = machine(k, dims, inputs)?;
    let want = dims.shape(k.output());
    if dout.shape != want {
        return Err(GradError::Cotangent { name: k.output().name.clone(), got: dout.shape.clone(), want });
    }
    let mut g = zero_grads(&m);
    attend_backward(k, &m, dout, &mut g)?;
    derived_backward(k, &m, &mut g)?;
    Ok(input_grads(k, &m, g))
}

/// A zero gradient per float tensor of the machine (none for integer ones).
fn zero_grads(m: &Machine) -> Vec<Vec<f64>> {
    m.tensors.iter().map(|t| vec![0.0; if t.is_int { 0 } else { t.data.len() }]).collect()
}

/// The float inputs' gradients, by name and shaped as the inputs.
fn input_grads(k: &Kernel, m: &Machine, mut g: Vec<Vec<f64>>) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for t in k.inputs().filter(|t| !t.dtype.is_int()) {
        let n = m.names[&t.name];
        out.insert(t.name.clone(), Tensor::new(m.tensors[n].shape.clone(), std::mem::take(&mut g[n])));
    }
    out
}

/// The gradients of the float inputs of `k` given only `seeds`, gradients of some of its
/// derived tensors (by name): each derived tensor passes its gradient on to what its body
/// reads, last tensor first (what a compiled backward that stops at derived tensors adds).
pub fn derived_grads(
    k: &Kernel,
    dims: &Bindings,
    inputs: &BTreeMap<String, Tensor>,
    seeds: &BTreeMap<String, Vec<f64>>,
) -> Result<BTreeMap<String, Tensor>, GradError> {
    let m = machine(k, dims, inputs)?;
    let mut g = zero_grads(&m);
    for (name, seed) in seeds {
        if let Some(&n) = m.names.get(name).filter(|&&n| g[n].len() == seed.len()) {
            g[n].clone_from(seed);
        }
    }
    derived_backward(k, &m, &mut g)?;
    Ok(input_grads(k, &m, g))
}

/// Whether attnc derives the gradient of every expression of `k` (a float `max`/`min`
/// reduction is the one construct it refuses).
pub fn differentiable(k: &Kernel) -> Result<(), DiffError> {
    for (_, e) in k.exprs() {
        partials(k, e)?;
    }
    Ok(())
}

struct BranchD {
    score: Diffed,
    bias: Option<Diffed>,
    decay: Option<Diffed>,
    weight: Option<Diffed>,
    sink: Option<Diffed>,
    post: Option<Diffed>,
    map: Option<Diffed>,
    /// The forward's nodes of the same branch.
    f: BranchNodes,
}

fn attend_backward(k: &Kernel, m: &Machine, dout: &Tensor, g: &mut [Vec<f64>]) -> Result<(), GradError> {
    let d = m.dims;
    let (nb, nh, ni, nj, ne) = (d.extent(&k.iter.b), d.extent(&k.iter.h), d.extent(&k.iter.i), d.extent(&k.iter.j), d.extent(&k.iter.e));
    let shape = &dout.shape;
    let strides: Vec<usize> = (0..shape.len()).map(|a| shape[a + 1..].iter().product()).collect();
    let axis_of = |v: &str| k.out.iter().position(|x| x == v).expect("verified: out lists b h i e");
    let (sb, sh, si, se) = (strides[axis_of("b")], strides[axis_of("h")], strides[axis_of("i")], strides[axis_of("e")]);

    let base: Vec<String> = FIXED.iter().map(|s| s.to_string()).collect();
    let fc = |e: &Expr| m.compile(e, &mut base.clone());
    let fo = |e: &Option<Expr>| e.as_ref().map(|e| m.compile(e, &mut base.clone()));
    let mut branches = Vec::new();
    for (n, br) in k.branches.iter().enumerate() {
        let w = |part: &str| format!("branch {n}'s {part}");
        let (sink, post, map) = match &br.norm {
            Norm::Softmax { sink, post } => (sink.clone(), post.clone(), None),
            Norm::Map(e) => (None, None, Some(e.clone())),
            Norm::Linear { .. } => (None, None, None),
        };
        branches.push(BranchD {
            score: diffed(m, k, &br.score, &base, None, &w("score"))?,
            bias: diffed_opt(m, k, &br.bias, &base, None, &w("bias"))?,
            decay: diffed_opt(m, k, &br.decay, &base, None, &w("decay"))?,
            weight: diffed_opt(m, k, &br.weight, &base, None, &w("weight"))?,
            sink: diffed_opt(m, k, &sink, &base, None, &w("sink"))?,
            post: diffed_opt(m, k, &post, &base, Some("w"), &w("post"))?,
            map: diffed_opt(m, k, &map, &base, Some("s"), &w("map"))?,
            f: BranchNodes::compile(m, br),
        });
    }
    let value_d = diffed(m, k, &k.value, &base, None, "the value")?;
    let gate_d = diffed_opt(m, k, &k.gate, &base, None, "the gate")?;
    let f_value = fc(&k.value);
    let f_gate = fo(&k.gate);

    let (sb_, sh_, si_, sj_, se_, ss_, sw_) = (0, 1, 2, 3, 4, 5, 6);
    let ne = ne as usize;
    /// One branch's forward row (as the reference computes it), with its decay per key and
    /// its branch weight.
    #[derive(Default)]
    struct Row {
        on: bool,
        r: BranchRow,
        decay: Vec<f64>,
        weight: f64,
    }
    // One head's rows, into `g`.
    let head = |b: i64, h: i64, g: &mut [Vec<f64>]| -> Result<(), GradError> {
        let mut env = vec![V::I(0); FIXED.len()];
        let mut acc = vec![0.0f64; ne];
        let mut dacc = vec![0.0f64; ne];
        let mut rows: Vec<Row> = branches.iter().map(|_| Row::default()).collect();
        {
            for i in 0..ni {
                env[sb_] = V::I(b);
                env[sh_] = V::I(h);
                env[si_] = V::I(i);
                let cx = format!("backward at (b={b}, h={h}, i={i})");
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut any_live = false;
                // The forward row, as the reference computes it.
                for (br, row) in branches.iter().zip(rows.iter_mut()) {
                    row.on = branch_row(m, &br.f, nj, &mut env, &mut row.r, &cx)?;
                    if !row.on {
                        continue;
                    }
                    any_live = true;
                    row.weight = match &br.f.weight {
                        Some(w) => m.eval(w, &mut env, &cx)?.f(),
                        None => 1.0,
                    };
                    row.decay.clear();
                    for (&j, &p) in row.r.keys.iter().zip(&row.r.p) {
                        env[sj_] = V::I(j);
                        let dec = match &br.f.decay {
                            Some(dn) => m.eval(dn, &mut env, &cx)?.f(),
                            None => 1.0,
                        };
                        row.decay.push(dec);
                        let q = p * row.weight * dec;
                        for (e, a) in acc.iter_mut().enumerate() {
                            env[se_] = V::I(e as i64);
                            *a += q * m.eval(&f_value, &mut env, &cx)?.f();
                        }
                    }
                }
                if !any_live {
                    continue; // the row is zeros whatever the inputs: no gradient
                }
                // 1. The gate.
                let base_o = b as usize * sb + h as usize * sh + i as usize * si;
                for e in 0..ne {
                    let dov = dout.data[base_o + e * se];
                    env[se_] = V::I(e as i64);
                    let gv = match &f_gate {
                        Some(gn) => m.eval(gn, &mut env, "gate")?.f(),
                        None => 1.0,
                    };
                    dacc[e] = dov * gv;
                    if let Some(gd) = &gate_d {
                        scatter(m, &gd.loads, &mut env, dov * acc[e], g, &cx)?;
                    }
                }
                for (br, row) in branches.iter().zip(rows.iter()) {
                    if !row.on {
                        continue;
                    }
                    let (r, weight, decay) = (&row.r, row.weight, &row.decay);
                    // 2. The aggregation: value, decay, weight, and dp_j.
                    let mut dp = vec![0.0f64; r.keys.len()];
                    let mut dweight = 0.0;
                    for (n, &j) in r.keys.iter().enumerate() {
                        env[sj_] = V::I(j);
                        let q = r.p[n] * weight * decay[n];
                        let mut dq = 0.0;
                        for (e, &da) in dacc.iter().enumerate() {
                            env[se_] = V::I(e as i64);
                            dq += da * m.eval(&f_value, &mut env, &cx)?.f();
                            scatter(m, &value_d.loads, &mut env, q * da, g, &cx)?;
                        }
                        dweight += dq * r.p[n] * decay[n];
                        if let Some(dd) = &br.decay {
                            scatter(m, &dd.loads, &mut env, dq * r.p[n] * weight, g, &cx)?;
                        }
                        dp[n] = dq * weight * decay[n];
                    }
                    if let Some(wd) = &br.weight {
                        scatter(m, &wd.loads, &mut env, dweight, g, &cx)?;
                    }
                    // 3. The normalization: dp_j becomes ds_j.
                    let ds: Vec<f64> = if let Some(md) = &br.map {
                        let mut ds = Vec::with_capacity(dp.len());
                        for (n, &j) in r.keys.iter().enumerate() {
                            env[sj_] = V::I(j);
                            env[ss_] = V::F(r.s[n]);
                            scatter(m, &md.loads, &mut env, dp[n], g, &cx)?;
                            let f1 = match &md.by_var {
                                Some(dn) => m.eval(dn, &mut env, &cx)?.f(),
                                None => 0.0,
                            };
                            ds.push(dp[n] * f1);
                        }
                        ds
                    } else if br.f.eps.is_some() {
                        let cross: f64 = dp.iter().zip(&r.s).map(|(d, s)| d * s).sum::<f64>() / (r.den * r.den);
                        dp.iter().map(|d| d / r.den - cross).collect()
                    } else {
                        let mut dw = dp.clone();
                        if let Some(pd) = &br.post {
                            for (n, &j) in r.keys.iter().enumerate() {
                                env[sj_] = V::I(j);
                                env[sw_] = V::F(r.w[n]);
                                scatter(m, &pd.loads, &mut env, dp[n], g, &cx)?;
                                dw[n] = dp[n]
                                    * match &pd.by_var {
                                        Some(dn) => m.eval(dn, &mut env, &cx)?.f(),
                                        None => 0.0,
                                    };
                            }
                        }
                        let sigma: f64 = r.w.iter().zip(&dw).map(|(w, d)| w * d).sum();
                        if let Some(sd) = &br.sink {
                            scatter(m, &sd.loads, &mut env, -r.w_sink * sigma, g, &cx)?;
                        }
                        r.w.iter().zip(&dw).map(|(w, d)| w * (d - sigma)).collect()
                    };
                    // 4. The score and the bias.
                    for (n, &j) in r.keys.iter().enumerate() {
                        env[sj_] = V::I(j);
                        scatter(m, &br.score.loads, &mut env, ds[n], g, &cx)?;
                        if let Some(bd) = &br.bias {
                            scatter(m, &bd.loads, &mut env, ds[n], g, &cx)?;
                        }
                    }
                }
            }
        }
        Ok(())
    };
    // Heads in a fixed number of parts, in parallel; each part sums into its own buffers and
    // the parts are added in order, so the result does not depend on the threads.
    const PARTS: usize = 4;
    let heads: Vec<(i64, i64)> = (0..nb).flat_map(|b| (0..nh).map(move |h| (b, h))).collect();
    let per = heads.len().div_ceil(PARTS).max(1);
    let sizes: Vec<usize> = g.iter().map(Vec::len).collect();
    let parts: Vec<Result<Vec<Vec<f64>>, GradError>> = heads
        .par_chunks(per)
        .map(|chunk| {
            let mut part: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            for &(b, h) in chunk {
                head(b, h, &mut part)?;
            }
            Ok(part)
        })
        .collect();
    for part in parts {
        for (into, from) in g.iter_mut().zip(part?) {
            into.iter_mut().zip(from).for_each(|(x, y)| *x += y);
        }
    }
    Ok(())
}

/// Passes each derived tensor's gradient to what its body reads, last tensor first.
fn derived_backward(k: &Kernel, m: &Machine, g: &mut [Vec<f64>]) -> Result<(), GradError> {
    for t in k.derived().collect::<Vec<_>>().into_iter().rev() {
        let TensorKind::Derived { vars, def } = &t.kind else { unreachable!("derived") };
        let n = m.names[&t.name];
        if m.tensors[n].is_int {
            continue;
        }
        let shape = m.tensors[n].shape.clone();
        let strides: Vec<usize> = (0..shape.len()).map(|a| shape[a + 1..].iter().product()).collect();
        let mut seed = std::mem::take(&mut g[n]);
        let body = match def {
            TensorDef::Map(e) => e,
            TensorDef::Cumsum { axis, body } => {
                // t[x] = Σ_{u ≤ x} body[u]: body[u] receives Σ_{x ≥ u} dt[x].
                for flat in (0..seed.len()).rev() {
                    if (flat / strides[*axis]) % shape[*axis] != shape[*axis] - 1 {
                        seed[flat] += seed[flat + strides[*axis]];
                    }
                }
                body
            }
        };
        let d = diffed(m, k, body, vars, None, &format!("tensor `{}`", t.name))?;
        let cx = format!("backward of tensor `{}`", t.name);
        let mut env = vec![V::I(0); vars.len()];
        for (flat, &s) in seed.iter().enumerate() {
            // A zero cotangent contributes nothing (not `0 · NaN`: moba_route's routing scores
            // get none, and a NaN query must not reach every key of its block through them).
            if s == 0.0 {
                continue;
            }
            let mut rem = flat;
            for (a, st) in strides.iter().enumerate() {
                env[a] = V::I((rem / st) as i64);
                rem %= st;
            }
            scatter(m, &d.loads, &mut env, s, g, &cx)?;
        }
    }
    Ok(())
}
