//! attnc: a compiler for attention kernels. This facade ties the crates together for the
//! CLI and for users embedding attnc: [`load_spec`] reads and checks a `.attn` file,
//! [`io`] moves tensors through safetensors files, [`inputs`] makes random inputs.

pub mod inputs;
pub mod io;

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
        let v: i64 = v.trim().parse().map_err(|_| format!("`{v}` in `{part}` is not an integer"))?;
        if v < 1 {
            return Err(format!("`{part}`: dims must be at least 1"));
        }
        m.insert(k.trim().to_string(), v);
    }
    Ok(m)
}

/// Binds a spec's dims from explicit sizes alone (for making inputs): every free dim must
/// be given, derived dims are computed, requirements are checked.
pub fn bind_dims(c: &dsl::Checked, given: &std::collections::BTreeMap<String, i64>) -> Result<ir::Bindings, String> {
    for k in given.keys() {
        if !c.kernel.dims.iter().any(|d| &d.name == k) {
            let all: Vec<&str> = c.kernel.dims.iter().map(|d| d.name.as_str()).collect();
            return Err(format!("--dims: the spec has no dim `{k}` (its dims: {})", all.join(", ")));
        }
    }
    let missing: Vec<&str> = c.info.free_dims.iter().filter(|d| !given.contains_key(*d)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(format!("--dims is missing {} (the spec's free dims are {})", missing.join(", "), c.info.free_dims.join(", ")));
    }
    if let Some(d) = c.info.derived_dims.iter().find(|d| given.contains_key(*d)) {
        return Err(format!("--dims: `{d}` is computed by the spec and cannot be given"));
    }
    let mut k = c.kernel.clone();
    k.tensors.retain(|t| t.kind != ir::TensorKind::Input);
    ir::bind(&k, &Default::default(), given).map_err(|e| e.to_string())
}

/// A checked spec after the optimization passes: the same inputs and output, an equal
/// kernel (same values up to rounding), and the rewrites applied.
pub fn optimize(c: &dsl::Checked, cfg: &passes::PassConfig) -> Result<(dsl::Checked, Vec<passes::Applied>), passes::PassError> {
    let o = passes::optimize(&c.kernel, cfg)?;
    let info = ir::verify(&o.kernel).map_err(|e| passes::PassError::Invalid { pass: "pipeline", why: e.to_string() })?;
    Ok((dsl::Checked { kernel: o.kernel, info, ranges: c.ranges.clone() }, o.log))
}

/// What the approximate low-rank bias admitted (see [`approximate_bias`]).
#[derive(Clone, Debug)]
pub struct ApproxBias {
    pub tensor: String,
    pub rank: usize,
    pub max_error: f64,
    pub budget: f64,
}

/// The largest rank [`approximate_bias`] tries.
pub const APPROX_RANK_CAP: usize = 64;

/// FlashBias, approximate (opt-in): factors the spec's dense bias input, per (batch, head)
/// slice, to the smallest rank whose largest absolute error is within `budget`, adds the
/// factors to `inputs`, and returns the spec rewritten to read them (the `lowrank` pass then
/// makes them extra dot channels). Refuses, with the reason, when the spec's bias is not one
/// input tensor indexed `[.., .., i, j]` or when no rank up to [`APPROX_RANK_CAP`] meets the
/// budget.
pub fn approximate_bias(
    c: &dsl::Checked,
    inputs: &mut std::collections::BTreeMap<String, ir::reference::Tensor>,
    budget: f64,
) -> Result<(dsl::Checked, ApproxBias), String> {
    use passes::approx;
    let src = approx::source(&c.kernel).ok_or_else(|| {
        format!(
            "--approx-bias: `{}` has no bias read from one input tensor indexed [.., .., i, j] (as dense_bias.attn has); nothing to approximate",
            c.kernel.name
        )
    })?;
    let t = inputs.get(&src.tensor).ok_or_else(|| format!("--approx-bias: input `{}` is missing", src.tensor))?;
    let [b0, h0, n, m]: [usize; 4] = t.shape.clone().try_into().map_err(|_| format!("--approx-bias: `{}` is not 4-dimensional", src.tensor))?;
    let f = approx::approximate_tensor(&t.data, [b0, h0, n, m], budget, APPROX_RANK_CAP).map_err(|e| format!("--approx-bias: {e}"))?;
    let r = f.rank;
    let (mut u, mut w) = (Vec::with_capacity(b0 * h0 * n * r), Vec::with_capacity(b0 * h0 * m * r));
    for (su, sw) in &f.slices {
        u.extend_from_slice(su);
        w.extend_from_slice(sw);
    }
    inputs.insert(approx::BIAS_U.into(), ir::reference::Tensor::new(vec![b0, h0, n, r], u));
    inputs.insert(approx::BIAS_W.into(), ir::reference::Tensor::new(vec![b0, h0, m, r], w));
    let kernel = approx::rewrite(&c.kernel, &src, r);
    let info = ir::verify(&kernel).map_err(|e| format!("--approx-bias produced an invalid kernel (a bug in attnc): {e}"))?;
    Ok((dsl::Checked { kernel, info, ranges: c.ranges.clone() }, ApproxBias { tensor: src.tensor, rank: r, max_error: f.max_error, budget }))
}
