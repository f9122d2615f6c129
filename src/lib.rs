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
