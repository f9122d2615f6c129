//! Search spaces: the candidates a backend's tuner tries, each with the cost model's
//! estimate, and the variants of the best ones worth timing too.
//!
//! [`SearchSpace`] is what a backend implements ([`cpu::CpuSpace`] for the CPU,
//! [`wgsl::WgslSpace`] for WebGPU). The parts
//! every backend shares live here: the [`Candidate`], pruning, the candidates of the spec
//! without the exact low-rank bias, and the live-tile count the cost models start from.

pub mod cpu;
pub mod wgsl;

use attnc_codegen::schedule::classes::{count_tiles, TileCounts, TileGrid};
use attnc_codegen::Backend;
use attnc_ir::{Bindings, Kernel};
use attnc_passes::interval::LoadOracle;

/// One configuration to try.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<O> {
    pub name: String,
    pub options: O,
    /// The cost model's estimate, in seconds (only its order matters).
    pub predicted: f64,
    /// Passes switched off for this candidate on top of the caller's configuration (the
    /// kernel it runs is the spec optimized without them): `["lowrank"]` or none.
    pub passes_off: Vec<String>,
}

/// The options of backend `S::Backend`.
pub type OptionsOf<S> = <<S as SearchSpace>::Backend as Backend>::Options;

/// A backend's search space and cost model.
pub trait SearchSpace {
    type Backend: Backend;
    fn backend(&self) -> &Self::Backend;
    /// Every candidate for a kernel bound to `dims`, with its predicted cost, cheapest first.
    fn candidates(&self, k: &Kernel, dims: &Bindings, data: &dyn LoadOracle) -> Vec<Candidate<OptionsOf<Self>>>;
    /// The names of every candidate the tuner may time (what the cache key's checksum covers).
    fn names(&self, k: &Kernel) -> Vec<String>;
    /// Variants of the best candidates (after pruning) that the cost model cannot rank, to
    /// be timed as well (CPU: Cranelift's optimizer on, fewer threads).
    fn twins(&self, pruned: &[Candidate<OptionsOf<Self>>]) -> Vec<Candidate<OptionsOf<Self>>>;
    /// The untuned configuration.
    fn default_options(&self) -> OptionsOf<Self>;
    /// A cached winner under the caller's request (CPU: a thread count given on the command
    /// line wins over the tuned one).
    fn adjust(&self, cached: OptionsOf<Self>) -> OptionsOf<Self>;
}

/// Live tiles of the first masked branch at the given tile size, counted over one head (the
/// mask is classified at b = h = 0; on large problems a sample of query-tile rows, so the
/// estimate stays cheap: it runs on every untuned `attnc run`).
pub fn live_tiles(k: &Kernel, dims: &Bindings, bq: i64, bk: i64, data: &dyn LoadOracle) -> TileCounts {
    let grid = TileGrid { block_q: bq, block_k: bk, queries: dims.extent(&k.iter.i), keys: dims.extent(&k.iter.j) };
    let mask = k.branches.iter().find_map(|b| b.mask.as_ref());
    count_tiles(mask, 0, 0, &grid, &dims.dims, data, 2048)
}

/// Suffix of a candidate that runs the spec optimized without the exact low-rank bias.
pub const LOWRANK_OFF: &str = " lowrank-off";

/// The candidates of the kernel optimized without `lowrank` (the first `n` of its own
/// ranking), renamed and marked: FlashBias's extra dot channels against the per-pair bias
/// as written. Which wins depends on the machine (ALiBi on an AVX2 host: 0.89–1.25×), so
/// the tuner measures both.
pub fn lowrank_off<O: Clone>(ranked: &[Candidate<O>], n: usize) -> Vec<Candidate<O>> {
    ranked.iter().take(n).map(|c| Candidate { name: format!("{}{LOWRANK_OFF}", c.name), passes_off: vec!["lowrank".into()], ..c.clone() }).collect()
}

/// The `top_k` cheapest candidates by the cost model.
pub fn prune<O>(mut all: Vec<Candidate<O>>, top_k: usize) -> Vec<Candidate<O>> {
    all.truncate(top_k.max(1));
    all
}
