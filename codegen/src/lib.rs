//! attnc-codegen: from a verified kernel to code that runs.
//!
//! It owns the backends. A backend turns `(Kernel, KernelInfo)` (so only verified IR can
//! be emitted) into an artifact that prints as its source text ([`Backend`]), validates it,
//! and runs it. The CPU backend ([`cpu`]) JIT-compiles Cranelift IR for the host.
//! This is the only crate that knows Cranelift; it knows nothing of the surface language.

pub mod cpu;

use attnc_ir::{Kernel, KernelInfo};

/// A code generator for one target.
pub trait Backend {
    /// `"cpu"`, `"ptx"`, `"wgsl"`: also the name in cache keys and on the command line.
    const NAME: &'static str;
    /// Choices that change the generated code (part of the autotune cache key).
    type Options: Clone + std::hash::Hash + std::fmt::Debug;
    /// The generated program; `Display` prints its source (CLIF, PTX, WGSL).
    type Artifact: std::fmt::Display;
    fn emit(&self, k: &Kernel, info: &KernelInfo, o: &Self::Options) -> Result<Self::Artifact, CodegenError>;
    fn validate(&self, a: &Self::Artifact) -> Result<(), CodegenError>;
}

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("the target is not supported here: {0}")]
    Unsupported(String),
    #[error("code generation failed: {0}")]
    Emit(String),
    #[error("generated code is invalid (a bug in attnc): {0}")]
    Invalid(String),
}
