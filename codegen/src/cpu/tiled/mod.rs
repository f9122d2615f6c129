//! The tiled CPU kernel: query tiles × key tiles, matmuls in microkernels, everything
//! variant-specific generated as f32x4 code. It lowers the schedule's tiled plan
//! (`crate::schedule::tiled`: the separable dot `Σ_r A(b,h,i,r)·B(b,h,j,r)`, the branches'
//! softmax plans) and workspace layout (`crate::schedule::workspace`); it decides nothing
//! they decide. Per head group:
//!
//! - `pack(frame, b, h, kt, vb)` writes `B` transposed in panels of `BK` keys
//!   (`kt[tile][r][c]`) and the value rows `vb[j][e]`, zero-padded to whole tiles (values
//!   that are a plain row-major load stay where they are and `P·V` reads them there);
//! - `tile(frame, b, h, i0, kt, vb, ws, classes)` computes query rows `[i0, i0 + BQ)`: packs
//!   `A`, then for each live key tile (empty ones skipped eight class bytes at a time)
//!   calls `qk` (S = A·Bᵀ), evaluates the rest of the
//!   score, bias, mask (only on partial tiles and the last tile), the normalization with
//!   its state per row (online softmax: running max, denominator, rescale factor; in the
//!   microkernel's `softmax` step when no post-map or decay follows it, and then a full
//!   tile of plain dot products needs no generated pass at all), decay, and calls `pv`
//!   (O = O·corr + P·V); at the end it scales by the denominator and branch weight, applies
//!   the gate and stores the rows.
//!
//! `classes[branch][tile]` (`TileClass` bytes: 0 empty, 1 full, 2 partial) comes from the
//! schedule's run-time classifier (`crate::schedule::classes`); empty tiles cost nothing.
//!
//! Files: [`kernel`] the `tile` function in its parts, [`pack`] the key/value pack,
//! [`vector`] the f32x4 lowering of expressions, [`memory`] row copies and fills,
//! [`matmul`] the generated fallback matmuls.

mod kernel;
mod matmul;
mod memory;
mod pack;
mod vector;

pub(crate) use matmul::{gen_pv, gen_qk};

pub(crate) use super::microkernel::EXP2_POLY;
pub(crate) use vector::{TANH_CLAMP, TANH_DEN, TANH_NUM};

/// The functions a tile calls: `qk`, `pv` and, with the microkernel, its softmax helpers.
pub(crate) type Matmuls<F> = (F, F, Option<SoftmaxKernels<F>>);

/// The microkernel's softmax helpers: the online step, the `qk` that also writes the row
/// maxima, and the weights of a second pass (final maximum and denominator).
#[derive(Clone, Copy)]
pub(crate) struct SoftmaxKernels<F> {
    pub step: F,
    pub qk_max: F,
    pub weights: F,
    /// `2^(s − t[c])` of a per-key statistic ([`crate::schedule::tiled::ExpStat`]), where a
    /// map has one.
    pub exp_cols: Option<F>,
    /// A capped score `c · tanh(s)` in place ([`crate::schedule::tiled::SoftmaxPlan::tanh_cap`]),
    /// where a branch has one.
    pub tanh_scale: Option<F>,
    /// `qk` against the key rows in place ([`crate::cpu::microkernel::qk_direct_portable`]),
    /// where [`direct_keys_apply`]: `pack` then transposes no key panel and a tile of at most
    /// [`crate::cpu::microkernel::DIRECT_ROWS`] query rows reads the keys where they are.
    pub qk_direct: Option<F>,
}

/// Whether a plan can read its keys in place: one key panel, no normalization map with a dot
/// of its own. (The run-time condition, rows along the channels and few query rows, is
/// [`super::gen::Gen::direct_keys`].)
pub(crate) fn direct_keys_apply(plan: &crate::schedule::tiled::TiledPlan) -> bool {
    plan.panels.len() == 1 && plan.branches.iter().all(|b| b.map_dot.is_none())
}
