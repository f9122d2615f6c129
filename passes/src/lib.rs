//! attnc-passes: analyses and rewrites of kernels.
//!
//! It owns what can be proven about a kernel without running it: interval analysis of
//! expressions ([`interval`]) and the block-sparsity classification built on it
//! ([`tiles`]). Every result is checked against the reference interpreter in the tests.
//! It knows nothing of the surface language or of code generation.

pub mod interval;
pub mod tiles;
