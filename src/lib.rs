//! attnc: a compiler for attention kernels. This facade ties the crates together for the
//! CLI and for users embedding attnc: [`load_spec`] reads and checks a `.attn` file,
//! [`io`] moves tensors through safetensors files, [`inputs`] makes random inputs.

pub mod inputs;
pub mod io;

pub use attnc_dsl as dsl;
pub use attnc_ir as ir;

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
        self.result
            .as_ref()
            .err()
            .map(|d| d.render(&self.path, &self.src))
    }
}

pub fn load_spec(path: &Path) -> std::io::Result<Loaded> {
    let src = std::fs::read_to_string(path)?;
    let result = dsl::compile(&src);
    Ok(Loaded {
        path: path.display().to_string(),
        src,
        result,
    })
}

/// Parses `B=1,H=8,N=2048` into dim bindings.
pub fn parse_dims(s: &str) -> Result<std::collections::BTreeMap<String, i64>, String> {
    let mut m = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not NAME=VALUE"))?;
        let v: i64 = v
            .trim()
            .parse()
            .map_err(|_| format!("`{v}` in `{part}` is not an integer"))?;
        if v < 1 {
            return Err(format!("`{part}`: dims must be at least 1"));
        }
        m.insert(k.trim().to_string(), v);
    }
    Ok(m)
}
