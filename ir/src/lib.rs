//! attnc-ir: the kernel IR every other crate speaks.
//!
//! It owns the data structure of one attention kernel ([`Kernel`]), its canonical text form
//! (`Display` + [`parse_kernel`], round-tripping), the verifier that turns a kernel into the
//! facts backends need ([`verify`] → [`KernelInfo`]), shape binding ([`bind()`]), the stable
//! structural hash for cache keys ([`stable_hash`]), the f64 reference interpreter whose
//! behaviour *is* the meaning of a kernel ([`reference`]), and the expression facts code
//! generators share ([`analysis`]: invariance, contiguous rows).
//!
//! It knows nothing of the surface language (attnc-dsl), of rewrites (attnc-passes) or of
//! code generation (attnc-codegen).

pub mod analysis;
pub mod backward;
pub mod bind;
pub mod diff;
pub mod expr;
pub mod grad;
pub mod hash;
pub mod interval;
pub mod kernel;
pub mod pretty;
pub mod reference;
pub mod text;
pub mod verify;

pub use bind::{bind, BindError, Bindings};
pub use expr::{floor_div, floor_mod, BinOp, Expr, RedOp, Ty, UnOp, F64};
pub use hash::{canonicalize, stable_hash};
pub use kernel::*;
pub use text::{parse_expr, parse_kernel, ParseError};
pub use verify::{verify, Deps, KernelInfo, VerifyError};

/// The variable a tiled kernel binds to a score's separable dot (a float), in the rest of
/// the score once the dot is extracted (`attnc_passes::separable::DOT`).
pub const DOT_VAR: &str = "__dot";
/// The variable a normalization map's second separable dot becomes (the tiled kernel's
/// second matmul per tile), a float like [`DOT_VAR`].
pub const DOT2_VAR: &str = "__dot2";
