//! attnc-dsl: the `.attn` language.
//!
//! It owns the pest grammar (`grammar.pest`), the syntax tree with byte spans ([`ast`]),
//! diagnostics with codes rendered rustc-style ([`diag`]), and the checker that lowers a
//! spec to a verified [`attnc_ir::Kernel`] ([`check`]). It is the only crate that knows
//! pest; it knows nothing of rewrites, code generation or tuning.

pub mod ast;
pub mod check;
pub mod diag;
pub mod parse;

pub use check::{check, Checked};
pub use diag::{Diagnostic, CODES};
pub use parse::parse;

/// Parses and checks a `.attn` source.
pub fn compile(src: &str) -> Result<Checked, Diagnostic> {
    check(&parse(src)?)
}
