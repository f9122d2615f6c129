//! attnc: a compiler for attention kernels. This facade ties the crates together for the
//! CLI and for users embedding attnc: [`load_spec`] reads and checks a `.attn` file,
//! [`io`] moves tensors through safetensors files, [`inputs`] makes random inputs.

pub mod bench;
pub mod explain;
pub mod grad;
pub mod inputs;
pub mod io;
pub mod tune;

pub use attnc_dsl as dsl;
pub use attnc_ir as ir;
pub use attnc_passes as passes;

use std::path::Path;

/// A spec read from disk: its source (for diagnostics) and, when it checks, the kernel.
pub struct Loaded {
    pub path: String,
    pub src: String,
    pub result: Result<dsl::Checked, dsl::Diagnostic>,
}

impl Loaded {
    /// The rendered diagnostic, when the spec does not check.
    pub fn rendered_error(&self) -> Option<String> {
        self.result.as_ref().err().map(|d| d.render(&self.path, &self.src))
    }
}

pub fn load_spec(path: &Path) -> std::io::Result<Loaded> {
    let src = std::fs::read_to_string(path)?;
    let result = dsl::compile(&src);
    Ok(Loaded { path: path.display().to_string(), src, result })
}

/// Parses `B=1,H=8,N=2048` into dim bindings.
pub fn parse_dims(s: &str) -> Result<std::collections::BTreeMap<String, i64>, String> {
    let mut m = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("`{part}` is not NAME=VALUE"))?;
        let v: i64 = v.trim().parse().map_err(|_| format!("`{v}` in `{part}` is not an integer (at most {})", i64::MAX))?;
        if v < 1 {
            return Err(format!("`{part}`: dims must be at least 1"));
        }
        if let Some(old) = m.insert(k.trim().to_string(), v) {
            return Err(format!("`{}` is given twice ({old} and {v})", k.trim()));
        }
    }
    Ok(m)
}

/// Binds a spec's dims from explicit sizes alone (for making inputs): every free dim must
/// be given, derived dims are computed, requirements are checked.
pub fn bind_dims(c: &dsl::Checked, given: &std::collections::BTreeMap<String, i64>) -> Result<ir::Bindings, String> {
    // Dims named `__…` are attnc's own (the key count of `range j < …`), not the user's.
    let own: Vec<&str> = c.kernel.dims.iter().map(|d| d.name.as_str()).filter(|n| !n.starts_with("__")).collect();
    for k in given.keys() {
        if !own.contains(&k.as_str()) {
            let all = &own;
            return Err(format!("--dims: the spec has no dim `{k}` (its dims: {})", all.join(", ")));
        }
    }
    // A dim not given takes its default (`dims G = H`) when the dims it uses are known.
    let mut given = given.clone();
    for (d, e) in &c.defaults {
        if !given.contains_key(d) {
            if let Ok(v) = ir::bind::eval_dims(e, &given) {
                given.insert(d.clone(), v);
            }
        }
    }
    let given = &given;
    let missing: Vec<&str> = c.info.free_dims.iter().filter(|d| !given.contains_key(*d)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(format!("--dims is missing {} (the spec's free dims are {})", missing.join(", "), c.info.free_dims.join(", ")));
    }
    if let Some(d) = c.info.derived_dims.iter().find(|d| given.contains_key(*d)) {
        return Err(format!("--dims: `{d}` is computed by the spec and cannot be given"));
    }
    let mut k = c.kernel.clone();
    k.tensors.retain(|t| t.kind != ir::TensorKind::Input);
    let b = ir::bind(&k, &Default::default(), given).map_err(|e| e.to_string())?;
    ir::bind::check_sizes(&c.kernel, &b).map_err(|e| e.to_string())?;
    Ok(b)
}

/// The spec as the PTX backend runs it at `precision`, before the passes (so a bias stays a
/// bias for the tensor cores): an f32 spec's queries, keys and values declared bf16/f16 at
/// a lowered precision ([`codegen::ptx::lower_precision`]), else the spec itself.
pub fn at_precision(c: &dsl::Checked, precision: codegen::ptx::Precision) -> std::borrow::Cow<'_, dsl::Checked> {
    match precision.dtype() {
        Some(d) => std::borrow::Cow::Owned(dsl::Checked { kernel: codegen::ptx::lower_precision(&c.kernel, d), ..c.clone() }),
        None => std::borrow::Cow::Borrowed(c),
    }
}

/// A checked spec after the optimization passes: the same inputs and output, an equal
/// kernel (same values up to rounding), and the rewrites applied.
pub fn optimize(c: &dsl::Checked, cfg: &passes::PassConfig) -> Result<(dsl::Checked, Vec<passes::Applied>), passes::PassError> {
    let o = passes::optimize(&c.kernel, cfg)?;
    Ok((dsl::Checked { kernel: o.kernel, info: o.info, ranges: c.ranges.clone(), defaults: c.defaults.clone() }, o.log))
}

/// What the command line holds for a run at these dims besides the backend's own buffers:
/// the inputs as f64 (read or generated) and in storage form (f32/i32), and the output as
/// f64 to write; with `reference` (`--check`, `--backend reference`) the reference
/// interpreter's f64 derived tensors and output too. For [`codegen::host::check_memory`]
/// before anything is allocated.
pub fn memory_parts(c: &dsl::Checked, dims: &ir::Bindings, reference: bool) -> Vec<(&'static str, u128)> {
    let elems = |t: &ir::TensorDecl| dims.shape(t).iter().map(|&n| n as u128).product::<u128>();
    let inputs: u128 = c.kernel.inputs().map(elems).sum();
    let derived: u128 = c.kernel.derived().map(elems).sum();
    let out = elems(c.kernel.output());
    let mut parts = vec![("for the inputs", 12 * inputs), ("for the output", 8 * out)];
    if reference {
        parts.push(("for the reference interpreter", 8 * (derived + out)));
    }
    parts
}

pub use attnc_codegen as codegen;

/// A spec optimized once and ready to meet its inputs: the optimized kernel, and when the
/// exact low-rank rewrite applied, the kernel without it for inputs it would round much worse
/// than the bias as written (`passes::lowrank::check_inputs`: ALiBi with a slope of 1e38).
pub struct Prepared {
    pub optimized: dsl::Checked,
    pub log: Vec<passes::Applied>,
    /// The spec optimized without `lowrank`, when that pass rewrote it.
    pub without_lowrank: Option<(dsl::Checked, Vec<passes::Applied>)>,
    /// The tensors the bias reads (what [`Prepared::pick`] needs of the inputs).
    pub bias_reads: std::collections::BTreeSet<String>,
}

impl Prepared {
    pub fn new(c: &dsl::Checked, cfg: &passes::PassConfig) -> Result<Prepared, passes::PassError> {
        let (optimized, log) = optimize(c, cfg)?;
        let mut without_lowrank = None;
        let mut bias_reads = std::collections::BTreeSet::new();
        if log.iter().any(|a| a.pass == "lowrank") {
            let mut off = cfg.clone();
            off.set("lowrank", false).expect("a pass");
            let (k0, log0) = optimize(c, &off)?;
            bias_reads = k0.kernel.branches.first().and_then(|b| b.bias.as_ref()).map(|b| b.loads()).unwrap_or_default();
            without_lowrank = Some((k0, log0));
        }
        Ok(Prepared { optimized, log, without_lowrank, bias_reads })
    }

    /// The kernel to run at `dims` for inputs `data` knows (it needs the tensors in
    /// [`Prepared::bias_reads`]), with the log of its rewrites and, when the low-rank bias is
    /// off for these inputs, why.
    pub fn pick(&self, dims: &ir::Bindings, data: &dyn passes::interval::LoadOracle) -> (&dsl::Checked, &[passes::Applied], Option<String>) {
        if let Some((k0, log0)) = &self.without_lowrank {
            if let Err(why) = passes::lowrank::check_inputs(&k0.kernel, dims, data) {
                return (k0, log0, Some(why));
            }
        }
        (&self.optimized, &self.log, None)
    }

    /// [`Prepared::pick`] with the bias's tensors read from `tensors` (f64; only those in
    /// [`Prepared::bias_reads`] are looked at), `k` the kernel that declares them.
    pub fn pick_in(
        &self,
        k: &ir::Kernel,
        dims: &ir::Bindings,
        tensors: &std::collections::BTreeMap<String, ir::reference::Tensor>,
    ) -> (&dsl::Checked, &[passes::Applied], Option<String>) {
        let oracle = passes::tiles::DataOracle::new(
            tensors
                .iter()
                .filter(|(n, _)| self.bias_reads.contains(*n))
                .map(|(n, t)| (n.clone(), (t.shape.as_slice(), t.data.as_slice(), k.tensor(n).is_some_and(|d| d.dtype.is_int()))))
                .collect(),
            1 << 14,
        );
        self.pick(dims, &passes::bounds::Bounded::new(oracle))
    }
}

/// [`optimize`] for these inputs ([`Prepared::pick`]): the third value says why the exact
/// low-rank bias was switched off, when it was.
pub fn optimize_for(
    c: &dsl::Checked,
    cfg: &passes::PassConfig,
    inputs: &std::collections::BTreeMap<String, ir::reference::Tensor>,
    given: &std::collections::BTreeMap<String, i64>,
) -> Result<(dsl::Checked, Vec<passes::Applied>, Option<String>), passes::PassError> {
    let p = Prepared::new(c, cfg)?;
    if p.without_lowrank.is_none() {
        return Ok((p.optimized, p.log, None));
    }
    let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
    let Ok(dims) = ir::bind(&c.kernel, &shapes, given) else { return Ok((p.optimized, p.log, None)) };
    let (k, log, why) = p.pick_in(&c.kernel, &dims, inputs);
    Ok((k.clone(), log.to_vec(), why))
}

/// What the approximate low-rank bias admitted (see [`approximate_bias`]).
#[derive(Clone, Debug)]
pub struct ApproxBias {
    /// What was factored: the input tensor's name or the bias expression.
    pub tensor: String,
    pub rank: usize,
    pub max_error: f64,
    pub budget: f64,
}

/// The largest rank [`approximate_bias`] tries.
pub const APPROX_RANK_CAP: usize = 64;

/// FlashBias, approximate (opt-in): factors the spec's bias (a dense input, or any bias of
/// `b h i j` such as a table gather), per (batch, head) slice, to the smallest rank whose
/// largest absolute error is within `budget`, adds the factors to `inputs`, and returns the
/// spec rewritten to read them (the `lowrank` pass then makes them extra dot channels).
/// Refuses, with the reason, when the bias does not depend on both the query and the key or
/// when no rank up to [`APPROX_RANK_CAP`] meets the budget.
pub fn approximate_bias(
    c: &dsl::Checked,
    inputs: &mut std::collections::BTreeMap<String, ir::reference::Tensor>,
    budget: f64,
) -> Result<(dsl::Checked, ApproxBias), String> {
    use passes::approx;
    let k = &c.kernel;
    let src = approx::source(k)
        .ok_or_else(|| format!("--approx-bias: `{}` has no bias that depends on both the query and the key; nothing to approximate", k.name))?;
    let shapes: std::collections::BTreeMap<String, Vec<usize>> = inputs.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
    let dims = ir::bind(k, &shapes, &Default::default()).map_err(|e| format!("--approx-bias: {e}"))?;
    let (nb, nh, n, m) = [&src.bdim, &src.hdim, &k.iter.i, &k.iter.j].map(|e| dims.extent(e) as usize).into();
    // The slices, row-major [nb, nh, n, m]: read from the dense input, or evaluated.
    let (data, what) = match &src.tensor {
        Some(t) if inputs[t].shape == [nb, nh, n, m] => (inputs[t].data.clone(), format!("`{t}`")),
        _ => {
            let ev = ir::reference::ExprEval::new(k, &dims, inputs).map_err(|e| format!("--approx-bias: {e}"))?;
            let bias = k.branches[0].bias.as_ref().expect("a source has a bias");
            // Masked pairs are zeroed only when the mask varies with b and h no more than the
            // bias does (else one slice serves pairs that other batches or heads keep).
            let bias_fv = bias.free_vars();
            let mask = k.branches[0].mask.as_ref().filter(|m| m.free_vars().iter().all(|v| !matches!(v.as_str(), "b" | "h") || bias_fv.contains(v)));
            let mut d = Vec::with_capacity(nb * nh * n * m);
            for b in 0..nb as i64 {
                for h in 0..nh as i64 {
                    for i in 0..n as i64 {
                        for j in 0..m as i64 {
                            let vars = [
                                ("b", ir::reference::Scalar::Int(b)),
                                ("h", ir::reference::Scalar::Int(h)),
                                ("i", ir::reference::Scalar::Int(i)),
                                ("j", ir::reference::Scalar::Int(j)),
                            ];
                            // A masked pair's bias never counts (and may not even index its
                            // table): 0 there, so the budget holds on every live pair.
                            if let Some(m) = mask {
                                if ev.eval(m, &vars).map_err(|e| format!("--approx-bias: the mask: {e}"))? == ir::reference::Scalar::Bool(false) {
                                    d.push(0.0);
                                    continue;
                                }
                            }
                            match ev.eval(bias, &vars).map_err(|e| format!("--approx-bias: {e}"))? {
                                ir::reference::Scalar::Float(x) => d.push(x),
                                other => return Err(format!("--approx-bias: the bias evaluated to {other:?}, not a float")),
                            }
                        }
                    }
                }
            }
            (d, format!("`{}`", ir::pretty::infix(bias)))
        }
    };
    let f = approx::approximate_tensor(&data, [nb, nh, n, m], budget, APPROX_RANK_CAP).map_err(|e| format!("--approx-bias: {e}"))?;
    let r = f.rank;
    let (mut u, mut w) = (Vec::with_capacity(nb * nh * n * r), Vec::with_capacity(nb * nh * m * r));
    for (su, sw) in &f.slices {
        u.extend_from_slice(su);
        w.extend_from_slice(sw);
    }
    inputs.insert(approx::BIAS_U.into(), ir::reference::Tensor::new(vec![nb, nh, n, r], u));
    inputs.insert(approx::BIAS_W.into(), ir::reference::Tensor::new(vec![nb, nh, m, r], w));
    let kernel = approx::rewrite(k, &src, r);
    let info = ir::verify(&kernel).map_err(|e| format!("--approx-bias produced an invalid kernel (a bug in attnc): {e}"))?;
    Ok((
        dsl::Checked { kernel, info, ranges: c.ranges.clone(), defaults: c.defaults.clone() },
        ApproxBias { tensor: what, rank: r, max_error: f.max_error, budget },
    ))
}
