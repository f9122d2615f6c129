//! Gradients of a spec (`attnc grad`): the reference backward ([`attnc_ir::grad`]) and its
//! check against central finite differences of the f64 reference forward, and the compiled
//! backward ([`compiled`]: the kernels of [`attnc_ir::backward`] on the CPU).

use attnc_ir::reference::{run_bound, Tensor};
use attnc_ir::{Bindings, Kernel};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// `Σ dout · o` at these inputs: the scalar whose gradient [`attnc_ir::grad::grad`] gives.
pub fn loss(k: &Kernel, dims: &Bindings, inputs: &BTreeMap<String, Tensor>, dout: &Tensor) -> Result<f64, String> {
    let o = run_bound(k, dims, inputs).map_err(|e| e.to_string())?;
    Ok(o.data.iter().zip(&dout.data).map(|(a, b)| a * b).sum())
}

/// One input's finite-difference check.
#[derive(Clone, Debug)]
pub struct FdRow {
    pub input: String,
    /// Elements compared.
    pub checked: usize,
    /// Elements skipped because the loss is not smooth there (a mask or a `relu` flips within
    /// the step: the two step sizes disagree).
    pub kinks: usize,
    /// Largest |analytic − finite difference| over the compared elements.
    pub worst: f64,
    /// Largest |finite difference|.
    pub scale: f64,
    /// The first element that disagrees, if any.
    pub failure: Option<String>,
}

/// Compares `grads` with central differences `(L(x + h) − L(x − h)) / 2h`, `h = 1e-5·max(1, |x|)`,
/// on up to `per_input` seeded elements of each float input. An element passes when the two
/// agree within `1e-5·max(1, |fd|)`; where they do not, the difference is taken again at
/// `h / 4`, and a finite difference that moves with the step marks a kink (skipped, counted),
/// one that does not a failure.
pub fn finite_differences(
    k: &Kernel,
    dims: &Bindings,
    inputs: &BTreeMap<String, Tensor>,
    dout: &Tensor,
    grads: &BTreeMap<String, Tensor>,
    per_input: usize,
    seed: u64,
) -> Result<Vec<FdRow>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rows = Vec::new();
    let mut work = inputs.clone();
    for (name, g) in grads {
        let n = g.data.len();
        let picks: Vec<usize> = if n <= per_input { (0..n).collect() } else { sample(&mut rng, n, per_input).into_vec() };
        let mut row = FdRow { input: name.clone(), checked: 0, kinks: 0, worst: 0.0, scale: 0.0, failure: None };
        for idx in picks {
            let x = inputs[name].data[idx];
            if !x.is_finite() {
                continue;
            }
            let mut fd = |h: f64| -> Result<f64, String> {
                work.get_mut(name).expect("input").data[idx] = x + h;
                let up = loss(k, dims, &work, dout)?;
                work.get_mut(name).expect("input").data[idx] = x - h;
                let down = loss(k, dims, &work, dout)?;
                work.get_mut(name).expect("input").data[idx] = x;
                Ok((up - down) / (2.0 * h))
            };
            let h = 1e-5 * x.abs().max(1.0);
            let d = fd(h)?;
            let a = g.data[idx];
            let tol = |v: f64| 1e-5 * v.abs().max(1.0);
            if (a - d).abs() > tol(d) && !(a.is_nan() && d.is_nan()) {
                let d4 = fd(h / 4.0)?;
                if (d4 - d).abs() > tol(d) / 4.0 || !d.is_finite() {
                    row.kinks += 1;
                    continue;
                }
                if row.failure.is_none() {
                    row.failure = Some(format!(
                        "element {idx} of `{name}`: gradient {a:.9e}, finite difference {d:.9e} (step {h:.0e}; {d4:.9e} at step {:.1e})",
                        h / 4.0
                    ));
                }
            }
            row.checked += 1;
            row.worst = row.worst.max((a - d).abs());
            row.scale = row.scale.max(d.abs());
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The all-ones cotangent: gradients of the output's sum.
pub fn ones_like_output(k: &Kernel, dims: &Bindings) -> Tensor {
    let shape = dims.shape(k.output());
    let n = shape.iter().product();
    Tensor::new(shape, vec![1.0; n])
}

/// Why a compiled backward could not run.
#[derive(Debug, thiserror::Error)]
pub enum CompiledGradError {
    #[error(transparent)]
    Unsupported(#[from] attnc_ir::backward::Unsupported),
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> CompiledGradError {
    CompiledGradError::Other(e.to_string())
}

/// A scalar as f64.
fn num(s: attnc_ir::reference::Scalar) -> f64 {
    use attnc_ir::reference::Scalar;
    match s {
        Scalar::Float(x) => x,
        Scalar::Int(x) => x as f64,
        Scalar::Bool(x) => x as i64 as f64,
    }
}

/// The flat (row-major) position in a tensor of `shape` (named `tensor`) of the index
/// `idx` evaluates to at `vals`.
fn flat_index(shape: &[usize], tensor: &str, idx: &[attnc_ir::reference::Prepared], vals: &[attnc_ir::reference::Scalar]) -> Result<usize, CompiledGradError> {
    let (mut flat, mut stride) = (0usize, 1usize);
    for a in (0..idx.len()).rev() {
        let attnc_ir::reference::Scalar::Int(v) = idx[a].eval(vals).map_err(other)? else { return Err(other("an index that is not an integer")) };
        if v < 0 || v as usize >= shape[a] {
            return Err(other(format!("`{tensor}` index {v} on axis {a} is out of bounds")));
        }
        flat += v as usize * stride;
        stride *= shape[a];
    }
    Ok(flat)
}

/// The float leaves of `e` with their index and partial prepared at `vars`; a leaf under a
/// reduction is refused.
#[allow(clippy::type_complexity)]
fn leaves<'e, 'a>(
    k: &Kernel,
    e: &attnc_ir::Expr,
    what: &str,
    vars: &[&str],
    eval: &'e attnc_ir::reference::ExprEval<'a>,
) -> Result<Vec<(String, Vec<attnc_ir::reference::Prepared<'e, 'a>>, attnc_ir::reference::Prepared<'e, 'a>)>, CompiledGradError> {
    let mut out = Vec::new();
    for t in attnc_ir::diff::partials(k, e).map_err(other)? {
        let attnc_ir::diff::Target::Load { tensor, idx } = &t.target else { return Err(other(format!("{what} that reads a float variable"))) };
        if !t.binders.is_empty() {
            return Err(CompiledGradError::Unsupported(attnc_ir::backward::Unsupported(format!("{what} that sums over `{tensor}`"))));
        }
        out.push((tensor.clone(), idx.iter().map(|x| eval.prepare(x, vars)).collect(), eval.prepare(&t.adj, vars)));
    }
    Ok(out)
}

/// The kernel the compiled backward differentiates and its backward kernels: the spec's,
/// or, when that is refused, the spec with its per-row and per-key reductions hoisted into
/// derived tensors (cosine's norms: the score becomes linear in one dot), whose gradients
/// the host passes on to the inputs.
pub fn backward_plan(k: &Kernel) -> Result<(Kernel, Vec<attnc_ir::backward::GradKernel>), attnc_ir::backward::Unsupported> {
    let first = match attnc_ir::backward::backward_kernels(k) {
        Ok(g) => return Ok((k.clone(), g)),
        Err(e) => e,
    };
    let mut cfg = crate::passes::PassConfig::none();
    cfg.set("hoist", true).expect("a pass");
    match crate::passes::optimize(k, &cfg) {
        Ok(o) if o.kernel != *k => attnc_ir::backward::backward_kernels(&o.kernel).map(|g| (o.kernel, g)).map_err(|_| first),
        _ => Err(first),
    }
}

/// Table elements per head past which the compiled backward refuses a table read per pair:
/// it folds each element into a head of its own (`attnc_ir::backward`'s `PairFold`), and a
/// flattened pair index (`t[h, i * M + j]`) would make N·M of them. The reference backward
/// computes such gradients.
pub const MAX_FOLDED_HEADS: i64 = 1 << 12;

/// Whether the compiled backward covers `k` at these dims: [`backward_plan`], and no table
/// read per pair with more than [`MAX_FOLDED_HEADS`] elements per head.
pub fn compiled_applies(k: &Kernel, dims: &Bindings) -> Result<(), String> {
    let (_, kernels) = backward_plan(k).map_err(|e| e.to_string())?;
    check_folds(k, &kernels, dims)
}

fn check_folds(k: &Kernel, kernels: &[attnc_ir::backward::GradKernel], dims: &Bindings) -> Result<(), String> {
    let folded = attnc_ir::Extent::Dim(attnc_ir::backward::FOLDED_HEADS.into());
    for gk in kernels.iter().filter(|g| g.kernel.iter.h == folded) {
        let all = dims.complete(&gk.kernel);
        let per_head = all.extent(&folded) / all.extent(&k.iter.h).max(1);
        if per_head > MAX_FOLDED_HEADS {
            return Err(format!(
                "no compiled backward at these dims: `{}`'s gradient is scattered over {per_head} table elements per head (at most {MAX_FOLDED_HEADS}: the compiled backward folds each into a head of its own)",
                gk.target
            ));
        }
    }
    Ok(())
}

/// f64 copies of the inputs `k` declares, from storage form.
fn f64_inputs(k: &Kernel, inputs: &attnc_codegen::host::Inputs<'_>) -> Result<BTreeMap<String, Tensor>, CompiledGradError> {
    k.inputs()
        .map(|t| {
            let bits = inputs.bufs.get(&t.name).ok_or_else(|| other(format!("no data for `{}`", t.name)))?;
            let data = bits.iter().map(|x| if t.dtype.is_int() { *x as i32 as f64 } else { f32::from_bits(*x) as f64 }).collect();
            Ok((t.name.clone(), Tensor::new(inputs.shapes[&t.name].clone(), data)))
        })
        .collect()
}

/// A gradient from the compiled backward: f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Grad32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A gradient while the kernels' shares are added into it: f64, so that a per-head
/// parameter summed over every row and head does not lose the f32 kernels' precision.
struct Acc {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// Adds `x` to `g` (the gradient of `tensor`) at the index `idx` evaluates to at `vals`.
fn add_at(g: &mut Acc, tensor: &str, idx: &[attnc_ir::reference::Prepared], vals: &[attnc_ir::reference::Scalar], x: f64) -> Result<(), CompiledGradError> {
    let n = flat_index(&g.shape, tensor, idx, vals)?;
    g.data[n] += x;
    Ok(())
}

/// The gradients of `Σ dout · o` with respect to every float input, by compiled kernels on
/// the CPU ([`compiled_f32`]), from and to f64 tensors.
pub fn compiled(
    k: &Kernel,
    dims: &Bindings,
    inputs: &BTreeMap<String, Tensor>,
    dout: &Tensor,
    options: &attnc_codegen::cpu::CpuOptions,
) -> Result<BTreeMap<String, Tensor>, CompiledGradError> {
    let declared: BTreeMap<String, Tensor> = k.inputs().filter_map(|t| inputs.get(&t.name).map(|x| (t.name.clone(), x.clone()))).collect();
    let storage = attnc_codegen::host::Storage::from_f64(k, &declared);
    if dout.shape != dims.shape(k.output()) {
        return Err(other(format!("the cotangent `{}` has shape {:?}; the output has shape {:?}", k.output().name, dout.shape, dims.shape(k.output()))));
    }
    let d32: Vec<f32> = dout.data.iter().map(|x| *x as f32).collect();
    let g = compiled_f32(k, dims, &storage.view(), &d32, options)?;
    Ok(g.into_iter().map(|(n, g)| (n, Tensor::new(g.shape, g.data.into_iter().map(f64::from).collect()))).collect())
}

/// The gradients of `Σ dout · o` with respect to every float input, by compiled kernels on
/// the CPU, reading the caller's f32/i32 buffers in place: the forward with its saved
/// log-sum-exp, `D = Σ_e dO ∘ O` per row, then the backward kernels of
/// [`attnc_ir::backward`], each added into its input's gradient at the leaf's index (grouped
/// heads and repeated reads summed). f32 arithmetic; the same contract as
/// [`attnc_ir::grad::grad`] (a row with no live key contributes nothing).
pub fn compiled_f32(
    k: &Kernel,
    dims: &Bindings,
    inputs: &attnc_codegen::host::Inputs<'_>,
    dout: &[f32],
    options: &attnc_codegen::cpu::CpuOptions,
) -> Result<BTreeMap<String, Grad32>, CompiledGradError> {
    use attnc_codegen::cpu::CpuBackend;
    use attnc_codegen::{Backend, Compiled};
    use attnc_ir::backward::{DD, DO, LSE};
    use attnc_ir::reference::{ExprEval, Scalar};
    let (kb, kernels) = backward_plan(k)?;
    check_folds(&kb, &kernels, dims).map_err(other)?;
    let k = &kb;
    // Each kernel optimized by the passes once (the low-rank bias makes ALiBi's scores plain
    // dot products) and compiled once per options (a training loop calls this every step).
    type Prep = Vec<(Kernel, std::sync::Arc<crate::Prepared>)>;
    type Cache = Vec<((Kernel, attnc_codegen::cpu::CpuOptions), std::sync::Arc<attnc_codegen::cpu::CpuKernel>)>;
    static PREPARED: std::sync::Mutex<Prep> = std::sync::Mutex::new(Vec::new());
    static CACHE: std::sync::Mutex<Cache> = std::sync::Mutex::new(Vec::new());
    fn remember<K: PartialEq + Clone, V: Clone>(
        cache: &std::sync::Mutex<Vec<(K, V)>>,
        key: &K,
        make: impl FnOnce() -> Result<V, CompiledGradError>,
    ) -> Result<V, CompiledGradError> {
        if let Some((_, v)) = cache.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(k, _)| k == key) {
            return Ok(v.clone());
        }
        let v = make()?;
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= 64 {
            c.remove(0);
        }
        c.push((key.clone(), v.clone()));
        Ok(v)
    }
    let compile = |kern: &Kernel| -> Result<std::sync::Arc<attnc_codegen::cpu::CpuKernel>, CompiledGradError> {
        let prep = remember(&PREPARED, kern, || {
            let info = attnc_ir::verify(kern).map_err(|e| other(format!("the backward kernel {} does not verify (a bug in attnc): {e}", kern.name)))?;
            let c = attnc_dsl::Checked { kernel: kern.clone(), info, ranges: BTreeMap::new(), defaults: vec![] };
            Ok(std::sync::Arc::new(crate::Prepared::new(&c, &crate::passes::PassConfig::default()).map_err(other)?))
        })?;
        // The low-rank bias only where these inputs round as well with it as without.
        let bias = Kernel { tensors: kern.inputs().filter(|t| prep.bias_reads.contains(&t.name)).cloned().collect(), ..kern.clone() };
        let (chosen, _, _) = prep.pick_in(kern, dims, &f64_inputs(&bias, inputs)?);
        // The forward's statistics are laid out by the spec's branches: a rewrite that
        // changed them runs the kernel as written.
        let chosen = if attnc_ir::reference::same_stats_layout(&chosen.kernel, kern) { &chosen.kernel } else { kern };
        remember(&CACHE, &(chosen.clone(), options.clone()), || {
            let info = attnc_ir::verify(chosen).map_err(other)?;
            Ok(std::sync::Arc::new(CpuBackend::default().compile(chosen, &info, options).map_err(other)?))
        })
    };
    let explicit = dims.dims.clone();
    let want = dims.shape(k.output());
    if dout.len() != want.iter().product::<usize>() {
        return Err(other(format!("the cotangent `{}` has {} values; the output has shape {want:?}", k.output().name, dout.len())));
    }
    // The forward without its gate (the kernels differentiate the ungated output; the gate
    // is applied here), with its statistics.
    let ungated = Kernel { gate: None, ..k.clone() };
    let mut acc = vec![0f32; dout.len()];
    let stats_shape = attnc_ir::reference::stats_shape(k, dims);
    let mut stats = vec![0f32; stats_shape.iter().product()];
    compile(&ungated)?.run_stats_into(inputs, &explicit, &mut acc, &mut stats).map_err(other)?;
    let (nb, nh, ni) = (stats_shape[0], stats_shape[1], stats_shape[2]);
    let axis = |v: &str| k.out.iter().position(|x| x == v).expect("verified: out lists b h i e");
    let strides: Vec<usize> = (0..want.len()).map(|a| want[a + 1..].iter().product()).collect();
    let (sb, sh, si, se, ne) = (strides[axis("b")], strides[axis("h")], strides[axis("i")], strides[axis("e")], want[axis("e")]);
    // The host evaluates indices, the gate and the sink: f64 copies of the tensors those
    // read (most read none), in a kernel that declares only them.
    let gate_sink = k.gate.iter().chain(match &k.branches[0].norm {
        attnc_ir::Norm::Softmax { sink: Some(s), .. } => Some(s),
        _ => None,
    });
    let read: std::collections::BTreeSet<String> = gate_sink
        .chain(kernels.iter().flat_map(|g| g.idx.iter().chain(&g.scale).chain(g.extras.iter().flat_map(|x| x.idx.iter().chain([&x.factor])))))
        .flat_map(|e| e.loads())
        .collect();
    let slim = Kernel { tensors: k.tensors.iter().filter(|t| t.kind == attnc_ir::TensorKind::Input && read.contains(&t.name)).cloned().collect(), ..k.clone() };
    let host = f64_inputs(&slim, inputs)?;
    let eval = ExprEval::new(&slim, dims, &host).map_err(other)?;
    // Float inputs, and derived tensors (their gradients are passed on to the inputs last).
    let mut grads: BTreeMap<String, Acc> = k
        .tensors
        .iter()
        .filter(|t| !t.dtype.is_int() && t.kind != attnc_ir::TensorKind::Output)
        .map(|t| {
            let shape = inputs.shapes.get(&t.name).cloned().unwrap_or_else(|| dims.shape(t));
            (t.name.clone(), Acc { data: vec![0.0; shape.iter().product()], shape })
        })
        .collect();
    // A gate: the kernels' cotangent is `dO ∘ gate`; the gate's leaves get `dO · acc · ∂gate`.
    let mut d_eff = dout.to_vec();
    if let Some(gate) = &k.gate {
        let vars = ["b", "h", "i", "e"];
        let gv = eval.prepare(gate, &vars);
        let leaves = leaves(k, gate, "a gate", &vars, &eval)?;
        for b in 0..nb {
            for h in 0..nh {
                for i in 0..ni {
                    for e in 0..ne {
                        let n = b * sb + h * sh + i * si + e * se;
                        let vals = [Scalar::Int(b as i64), Scalar::Int(h as i64), Scalar::Int(i as i64), Scalar::Int(e as i64)];
                        d_eff[n] = (dout[n] as f64 * num(gv.eval(&vals).map_err(other)?)) as f32;
                        let up = dout[n] as f64 * acc[n] as f64;
                        for (tensor, idx, adj) in &leaves {
                            let g = grads.get_mut(tensor).ok_or_else(|| other(format!("`{tensor}` is not a float input")))?;
                            add_at(g, tensor, idx, &vals, up * num(adj.eval(&vals).map_err(other)?))?;
                        }
                    }
                }
            }
        }
    }
    // D per row (b, h, i): Σ_e dO ∘ O, the output's axes in its order.
    let mut dd = vec![0f32; nb * nh * ni];
    for b in 0..nb {
        for h in 0..nh {
            for i in 0..ni {
                let base = b * sb + h * sh + i * si;
                dd[(b * nh + h) * ni + i] = (0..ne).map(|e| d_eff[base + e * se] as f64 * acc[base + e * se] as f64).sum::<f64>() as f32;
            }
        }
    }
    // The kernels read the caller's inputs in place and three more.
    let bits = |x: &[f32]| -> Vec<u32> { x.iter().map(|v| v.to_bits()).collect() };
    let (lse_bits, do_bits) = (bits(&stats), bits(&d_eff));
    let mut dd_bits = bits(&dd);
    for gk in &kernels {
        let mut view = inputs.clone();
        for (name, shape) in [(LSE, stats_shape.clone()), (DD, vec![nb, nh, ni]), (DO, want.clone())] {
            view.shapes.insert(name.into(), shape);
        }
        view.bufs.insert(LSE.into(), &lse_bits);
        view.bufs.insert(DD.into(), &dd_bits);
        view.bufs.insert(DO.into(), &do_bits);
        let pshape = dims.complete(&gk.kernel).shape(gk.kernel.output());
        let mut part = vec![0f32; pshape.iter().product()];
        compile(&gk.kernel)?.run_into(&view, &explicit, &mut part).map_err(|e| other(format!("{}: {e}", gk.what)))?;
        // A post-map's `D` (the first kernel, one value per row) replaces `Σ dO ∘ O`.
        if gk.target == DD {
            dd_bits = bits(&part);
            dd = part;
            continue;
        }
        let [pb, ph, pr, width] = pshape[..] else { return Err(other("a backward kernel's output is not [B, H, rows, E]")) };
        // The extras' channels come last: `Σ_j weight · c(j)` per row, times the factor.
        let pe = width - gk.extras.len();
        for (n, x) in gk.extras.iter().enumerate() {
            let rows = ["b", "h", "i"];
            let (idx, factor): (Vec<_>, _) = (x.idx.iter().map(|e| eval.prepare(e, &rows)).collect(), eval.prepare(&x.factor, &rows));
            let t = grads.get_mut(&x.target).ok_or_else(|| other(format!("`{}` is not a float input", x.target)))?;
            for (row, y) in part.chunks(width).enumerate() {
                let (b, h, r) = (row / (ph * pr), row / pr % ph, row % pr);
                let vals = [Scalar::Int(b as i64), Scalar::Int(h as i64), Scalar::Int(r as i64)];
                add_at(t, &x.target, &idx, &vals, y[pe + n] as f64 * num(factor.eval(&vals).map_err(other)?))?;
            }
        }
        let g = grads.get_mut(&gk.target).ok_or_else(|| other(format!("`{}` is not a float input", gk.target)))?;
        // The channel moves one axis of the index (`q[b, h, i, e]`, a folded dense bias's
        // `bias[b, h, i, t · 64 + e]`): one evaluation per row, the channels a fixed distance
        // apart, up to the axis's end; otherwise one evaluation per element.
        let along = {
            let e = attnc_ir::Expr::var("e");
            let reads: Vec<usize> = (0..gk.idx.len()).filter(|a| gk.idx[*a].free_vars().contains("e")).collect();
            match reads[..] {
                [a] => match &gk.idx[a] {
                    x if *x == e => Some(a),
                    attnc_ir::Expr::Binary(attnc_ir::BinOp::Add, x, y) if **y == e && !x.free_vars().contains("e") => Some(a),
                    _ => None,
                },
                _ => None,
            }
        };
        let prepared: Vec<_> = gk.idx.iter().map(|x| eval.prepare(x, &["b", "h", "i", "e"])).collect();
        let shape = g.shape.clone();
        let at = |vals: &[Scalar]| flat_index(&shape, &gk.target, &prepared, vals);
        // The host's factor of the partial, per element.
        let scale = gk.scale.as_ref().map(|x| eval.prepare(x, &["b", "h", "i", "e"]));
        let factor = |vals: &[Scalar]| -> Result<f64, CompiledGradError> {
            match &scale {
                Some(sc) => Ok(num(sc.eval(vals).map_err(other)?)),
                None => Ok(1.0),
            }
        };
        // And the row one axis (`i` itself, no other index reading it): then one evaluation per
        // (b, h), the rows a fixed distance apart.
        let row_axis = {
            let reads: Vec<usize> = (0..gk.idx.len()).filter(|a| gk.idx[*a].free_vars().contains("i")).collect();
            match reads[..] {
                [a] if gk.idx[a] == attnc_ir::Expr::var("i") && pr <= shape[a] => Some(a),
                _ => None,
            }
        };
        let stride_of = |a: usize| shape[a + 1..].iter().product::<usize>();
        for b in 0..pb {
            for h in 0..ph {
                // Row 0's start and channel count, for the rows after it.
                let mut first: Option<(usize, usize)> = None;
                for r in 0..pr {
                    let row = &part[((b * ph + h) * pr + r) * width..][..pe];
                    let v = |e: usize| [Scalar::Int(b as i64), Scalar::Int(h as i64), Scalar::Int(r as i64), Scalar::Int(e as i64)];
                    if let (Some(a), None) = (along, &scale) {
                        let (base, count) = match (row_axis, first) {
                            (Some(ra), Some((base, count))) => (base + r * stride_of(ra), count),
                            _ => {
                                let attnc_ir::reference::Scalar::Int(c0) = prepared[a].eval(&v(0)).map_err(other)? else {
                                    return Err(other("an index that is not an integer"));
                                };
                                // Channels past the axis's end (a folded dense bias's last key
                                // block) stand for no key: zero, or NaN where the row's weights are.
                                let count = pe.min(shape[a].saturating_sub(c0.max(0) as usize));
                                let base = if count == 0 { 0 } else { at(&v(0))? };
                                first = Some((base, count));
                                (base, count)
                            }
                        };
                        let stride = stride_of(a);
                        for (e, x) in row[..count].iter().enumerate() {
                            g.data[base + e * stride] += *x as f64;
                        }
                    } else {
                        // Without a host factor (which may be infinite), a zero adds nothing:
                        // a folded table's head is zero on most rows.
                        for (e, x) in row.iter().enumerate().filter(|(_, x)| **x != 0.0 || scale.is_some()) {
                            let n = at(&v(e))?;
                            g.data[n] += *x as f64 * factor(&v(e))?;
                        }
                    }
                }
            }
        }
    }
    // The sink logit's share, per live row: `−exp(sink − lse) · D` times each leaf's partial.
    if let attnc_ir::Norm::Softmax { sink: Some(se), .. } = &k.branches[0].norm {
        let rows = ["b", "h", "i"];
        let sink = eval.prepare(se, &rows);
        let prepared = leaves(k, se, "a sink", &rows, &eval)?;
        for b in 0..nb {
            for h in 0..nh {
                for i in 0..ni {
                    let r = (b * nh + h) * ni + i;
                    if stats[r] == f32::NEG_INFINITY {
                        continue; // no live key: no gradient
                    }
                    let vals = [Scalar::Int(b as i64), Scalar::Int(h as i64), Scalar::Int(i as i64)];
                    let ds = -(num(sink.eval(&vals).map_err(other)?) - stats[r] as f64).exp() * dd[r] as f64;
                    for (tensor, idx, adj) in &prepared {
                        let g = grads.get_mut(tensor).ok_or_else(|| other(format!("`{tensor}` is not a float input")))?;
                        add_at(g, tensor, idx, &vals, num(adj.eval(&vals).map_err(other)?) * ds)?;
                    }
                }
            }
        }
    }
    // Derived tensors' gradients on to the inputs (f64, by the reference's rules).
    let mut seeds: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for t in k.derived() {
        if let Some(g) = grads.remove(&t.name).filter(|g| g.data.iter().any(|x| *x != 0.0)) {
            seeds.insert(t.name.clone(), g.data);
        }
    }
    if !seeds.is_empty() {
        let all = f64_inputs(k, inputs)?;
        for (n, g) in attnc_ir::grad::derived_grads(k, dims, &all, &seeds).map_err(other)? {
            if let Some(acc) = grads.get_mut(&n) {
                acc.data.iter_mut().zip(&g.data).for_each(|(a, x)| *a += x);
            }
        }
    }
    Ok(grads.into_iter().map(|(n, g)| (n, Grad32 { shape: g.shape, data: g.data.into_iter().map(|x| x as f32).collect() })).collect())
}
