//! The shape of the GPU chunked kernels (WGSL's `attend` and PTX's `attend_chunked` under
//! [`super::Algorithm::Chunked`]): one algorithm, so one set of sizes.
//!
//! A workgroup (CTA) per `(b, h, slice of SLICE output channels)` walks the keys in chunks
//! with a `Dk × SLICE` state in shared memory (and its column of ones for the linear
//! normalization); the rows whose last visible key falls in a chunk, `ROW_BLOCK` at a time,
//! get the state's part and the chunk's exact pairs. A split decay factor above
//! `e^MAX_SPLIT_EXP` (a log-decay that increases along the keys) makes the workgroup compute
//! its head again in the exact pairwise form.

/// Output channels per workgroup (a slice of the output's).
pub const SLICE: u32 = 16;
/// Feature channels the state holds at most (`Dk × SLICE` words of shared memory).
pub const MAX_FEATURES: i64 = 128;
/// Rows computed at once.
pub const ROW_BLOCK: u32 = 8;
/// Keys per chunk at most (a row block's scores against a chunk sit in shared memory).
pub const MAX_CHUNK: usize = 64;
/// Largest exponent a split factor may reach before the pairwise form is used (two factors
/// multiply: e^60 stays well inside f32).
pub const MAX_SPLIT_EXP: f32 = 30.0;

/// Workgroups per (batch, head): slices of [`SLICE`] output channels.
pub fn slices(values: i64) -> i64 {
    (values.max(1) + SLICE as i64 - 1) / SLICE as i64
}
