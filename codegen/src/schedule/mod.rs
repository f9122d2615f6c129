//! The schedule: every decision about *how* a kernel runs that is not about one target's
//! instructions, made once, backend-neutral, from the optimized kernel.
//!
//! [`plan`] chooses the algorithm (the chunked form of linear attention, the tiled kernel,
//! or the row-at-a-time kernel), the tile sizes and, for the tiled kernel, its
//! [`tiled::TiledPlan`] (the separable dot, the branches' softmax plans). [`Schedule::bind`]
//! then fixes what depends on the dims: the grid of query and key tiles, the heads that
//! share one key/value pack ([`groups`]), the workspace a task needs ([`workspace`], checked
//! against the target's [`Limits`]) and, for the chunked form, its [`ChunkPlan`]. Tile
//! classes (empty, full, partial) are computed at run time by [`classes`] (once per shape
//! for static masks; for masks that read data, again when that data changes). A mask with
//! class equalities may run over tokens sorted by class ([`permute`]).
//!
//! It is pure data: no Cranelift, no PTX, no WGSL. A backend's emitter reads a
//! [`Schedule`]; it decides nothing the schedule already decides (see `docs/backends.md`).

pub mod classes;
pub mod gpu_chunk;
pub mod groups;
pub mod permute;
pub mod tiled;
pub mod workspace;

use attnc_ir::{Bindings, Kernel, KernelInfo};
use attnc_passes::linear::{Decay, LinearForm};
use tiled::TiledPlan;
use workspace::TileWorkspace;

/// The backend-neutral choices of a schedule (part of every backend's options, and so of
/// the autotune key).
#[derive(Clone, Debug, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ScheduleOptions {
    /// Use the tiled kernel when the spec allows it (else the row-at-a-time kernel).
    pub tiled: bool,
    /// Query rows per tile (tiled kernel).
    pub block_q: usize,
    /// Keys per tile (tiled kernel; a multiple of [`KEY_TILE_MULTIPLE`]).
    pub block_k: usize,
    /// Keys per chunk of the chunked algorithm, for kernels in the normal form of
    /// `attnc_passes::linear` (linear and decay attention); 0: the quadratic kernels.
    pub chunk: usize,
    /// Sort queries and keys by the classes of a mask with class equalities (Swin's
    /// windows, NATTEN's dilation groups), where that reorders them ([`permute`]).
    pub permute: bool,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions { tiled: true, block_q: 64, block_k: 64, chunk: 64, permute: true }
    }
}

/// Key tiles are whole vectors of every backend's widest lane count (16 f32 lanes).
pub const KEY_TILE_MULTIPLE: usize = 16;
/// The largest tile edge (rows or keys) and chunk: beyond it a tile only wastes memory.
pub const MAX_TILE: usize = 4096;
/// The largest chunk of the chunked algorithm.
pub const MAX_CHUNK: usize = 1 << 16;

/// What a target can hold (capability constants, in the manner of tinygrad's): the schedule
/// refuses a configuration that exceeds them instead of letting an allocation fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of workspace one task may use: a CPU worker's tile workspace, a GPU
    /// workgroup's shared memory (WebGPU guarantees 16 KiB; an H100 has 228 KiB).
    pub task_workspace_bytes: usize,
    /// The task's memory is a GPU workgroup's: the tiled kernel stages its operands a
    /// channel chunk at a time ([`workspace::STAGED`]) instead of packing whole head groups.
    pub staged_tiles: bool,
}

/// The algorithm a kernel runs with.
#[derive(Clone, Debug, PartialEq)]
pub enum Algorithm {
    /// Every query row walks its keys with the normalization's state in registers: the
    /// form every spec has (GLA's per-channel decay inside the score when quadratic).
    Rows,
    /// Query tiles against key tiles: the separable dot as two matmuls per tile.
    Tiled(TiledSchedule),
    /// Linear and decay attention in chunks with a carried state.
    Chunked(ChunkedSchedule),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TiledSchedule {
    pub plan: TiledPlan,
    pub block_q: usize,
    pub block_k: usize,
    pub workspace: TileWorkspace,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChunkedSchedule {
    pub form: LinearForm,
    pub chunk: usize,
}

/// A kernel's schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub algorithm: Algorithm,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("tile sizes must be positive, at most {MAX_TILE}, and block_k a multiple of {KEY_TILE_MULTIPLE} (got {block_q}×{block_k})")]
    Tiles { block_q: usize, block_k: usize },
    #[error("a chunk holds at most {MAX_CHUNK} keys (got {0})")]
    Chunk(usize),
    #[error(
        "the tile workspace needs {needed} bytes per task ({block_q}×{block_k} tiles, {channels} channels, {values} values), over this target's {budget} bytes: use smaller tiles"
    )]
    Workspace { needed: u128, budget: usize, block_q: usize, block_k: usize, channels: i64, values: i64 },
}

/// Chooses how `k` runs under `o` on a target with `limits`.
pub fn plan(k: &Kernel, _info: &KernelInfo, o: &ScheduleOptions, limits: &Limits) -> Result<Schedule, ScheduleError> {
    if o.block_k == 0 || !o.block_k.is_multiple_of(KEY_TILE_MULTIPLE) || o.block_q == 0 || o.block_q > MAX_TILE || o.block_k > MAX_TILE {
        return Err(ScheduleError::Tiles { block_q: o.block_q, block_k: o.block_k });
    }
    if o.chunk > MAX_CHUNK {
        return Err(ScheduleError::Chunk(o.chunk));
    }
    let linear = if o.chunk > 0 { LinearForm::of(k) } else { None };
    let algorithm = match linear {
        Some(form) => Algorithm::Chunked(ChunkedSchedule { form, chunk: o.chunk }),
        None => match TiledPlan::new(k).filter(|_| o.tiled) {
            Some(plan) => Algorithm::Tiled(TiledSchedule {
                workspace: TileWorkspace {
                    block_q: o.block_q,
                    block_k: o.block_k,
                    staged: limits.staged_tiles,
                    panels: plan.panels.len().max(1),
                    map_dot: plan.branches.iter().any(|b| b.map_dot.is_some()),
                    key_stat: plan.branches.iter().any(|b| b.exp_stat.as_ref().is_some_and(|e| e.per_key)),
                },
                plan,
                block_q: o.block_q,
                block_k: o.block_k,
            }),
            None => Algorithm::Rows,
        },
    };
    Ok(Schedule { algorithm, limits: *limits })
}

/// Whether the tiled kernel can run this kernel (else only the row kernel can).
pub fn tiles_apply(k: &Kernel) -> bool {
    TiledPlan::new(k).is_some()
}

impl Schedule {
    pub fn tiled(&self) -> Option<&TiledSchedule> {
        match &self.algorithm {
            Algorithm::Tiled(t) => Some(t),
            _ => None,
        }
    }

    pub fn chunked(&self) -> Option<&ChunkedSchedule> {
        match &self.algorithm {
            Algorithm::Chunked(c) => Some(c),
            _ => None,
        }
    }

    /// What depends on the dims: the grid, and per algorithm the tile counts, head groups
    /// and workspace (checked against the limits) or the chunked plan.
    pub fn bind(&self, k: &Kernel, dims: &Bindings) -> Result<Bound, ScheduleError> {
        let dims = &dims.complete(k);
        let grid = Grid::of(k, dims);
        let algorithm = match &self.algorithm {
            Algorithm::Rows => BoundAlgorithm::Rows,
            Algorithm::Tiled(t) => {
                let channels = t.plan.channels_all().map_or(0, |d| attnc_ir::bind::eval_dims(&d, &dims.dims).unwrap_or(0).max(0));
                let tiles = classes::TileGrid { block_q: t.block_q as i64, block_k: t.block_k as i64, queries: grid.queries, keys: grid.keys };
                let needed = t.workspace.task_bytes(channels, grid.values);
                if needed > self.limits.task_workspace_bytes as u128 {
                    return Err(ScheduleError::Workspace {
                        needed,
                        budget: self.limits.task_workspace_bytes,
                        block_q: t.block_q,
                        block_k: t.block_k,
                        channels,
                        values: grid.values,
                    });
                }
                let groups = groups::head_groups(k, &t.plan, dims, grid.batches, grid.heads);
                // Keeping a query tile's first-pass weights saves the second pass its score
                // matmuls: where the task's memory is the host's, and up to a budget.
                let keep_weights = t.plan.two_pass_plain() && !self.limits.staged_tiles && 4 * t.workspace.kept_floats(grid.keys) <= KEPT_WEIGHTS_BYTES as u128;
                BoundAlgorithm::Tiled(BoundTiled { channels, tiles, groups, keep_weights })
            }
            Algorithm::Chunked(c) => {
                let form = &c.form;
                let causal = form.causal.as_ref().map(|off| attnc_ir::bind::eval_dims(off, &dims.dims).expect("a dim expression (checked by the pass)"));
                BoundAlgorithm::Chunked(ChunkPlan {
                    n: grid.queries as usize,
                    m: grid.keys as usize,
                    dk: dims.extent(&form.channels) as usize,
                    dv: grid.values as usize,
                    causal,
                    eps: form.eps.map(|e| e as f32),
                    decay: form.decay,
                    chunk: c.chunk,
                })
            }
        };
        Ok(Bound { grid, algorithm })
    }
}

impl std::fmt::Display for Schedule {
    /// `tiled 64x64`, `row kernel`, `chunked linear attention, 64 keys per chunk, Scalar decay`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.algorithm {
            Algorithm::Rows => write!(f, "row kernel"),
            Algorithm::Tiled(t) => write!(f, "tiled {}x{}", t.block_q, t.block_k),
            Algorithm::Chunked(c) => write!(f, "chunked linear attention, {} keys per chunk, {:?} decay", c.chunk, c.form.decay),
        }
    }
}

/// The iteration space at bound dims: batches, heads, query rows, keys and output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub batches: i64,
    pub heads: i64,
    pub queries: i64,
    pub keys: i64,
    pub values: i64,
}

impl Grid {
    pub fn of(k: &Kernel, dims: &Bindings) -> Grid {
        let it = &k.iter;
        Grid { batches: dims.extent(&it.b), heads: dims.extent(&it.h), queries: dims.extent(&it.i), keys: dims.extent(&it.j), values: dims.extent(&it.e) }
    }
}

/// A schedule at bound dims.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    pub grid: Grid,
    pub algorithm: BoundAlgorithm,
}

#[derive(Clone, Debug, PartialEq)]
pub enum BoundAlgorithm {
    Rows,
    Tiled(BoundTiled),
    Chunked(ChunkPlan),
}

/// The tiled kernel at bound dims.
#[derive(Clone, Debug, PartialEq)]
pub struct BoundTiled {
    /// Channels of the shared dot (0 without one).
    pub channels: i64,
    pub tiles: classes::TileGrid,
    /// Heads that read one key/value pack, per batch.
    pub groups: Vec<groups::HeadGroup>,
    /// A two-pass softmax keeps its first pass's weights of full tiles for the second pass
    /// (which then rescales them instead of recomputing the scores), in
    /// [`workspace::TileWorkspace::kept_floats`] more floats per task.
    pub keep_weights: bool,
}

/// The most a task keeps between a softmax's two passes (64 query rows × 128K keys).
pub const KEPT_WEIGHTS_BYTES: usize = 32 << 20;

/// The chunked algorithm at bound dims: the shape of one (batch, head) and its choices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkPlan {
    pub n: usize,
    pub m: usize,
    pub dk: usize,
    pub dv: usize,
    /// `Some(off)`: row `i` sees keys `j <= i + off`.
    pub causal: Option<i64>,
    pub eps: Option<f32>,
    pub decay: Decay,
    pub chunk: usize,
}

impl ChunkPlan {
    /// The last key row `i` sees, or `None` when it sees none.
    pub fn last_key(&self, i: usize) -> Option<usize> {
        match self.causal {
            None => Some(self.m - 1),
            Some(off) => {
                let p = i as i64 + off;
                (p >= 0).then(|| (p as usize).min(self.m - 1))
            }
        }
    }
}

/// A test kernel over `q` and `k` (`[B, H, N|M, D]`, the values `k`) with these branches;
/// [`TEST_DOT`] is its dot product.
#[cfg(test)]
pub(crate) fn test_kernel(branches: &str) -> Kernel {
    attnc_ir::parse_kernel(&format!(
        "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
           (input q f32 [B H N D]) (input k f32 [B H M D]) (output o f32 [B H N D])
           (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e) {branches})"
    ))
    .expect("kernel")
}

/// The dot product of [`test_kernel`]'s queries and keys.
#[cfg(test)]
pub(crate) const TEST_DOT: &str = "(reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))";

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(score: &str, norm: &str) -> (Kernel, KernelInfo) {
        let k = attnc_ir::parse_kernel(&format!(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e)
               (branch (score {score}) (mask (<= j i)) (norm {norm})))"
        ))
        .expect("kernel");
        let info = attnc_ir::verify(&k).expect("verifies");
        (k, info)
    }
    const DOT: &str = "(reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))";
    const CPU: Limits = Limits { task_workspace_bytes: 1 << 28, staged_tiles: false };

    fn dims(n: i64, d: i64) -> Bindings {
        Bindings { dims: [("B", 2), ("H", 3), ("N", n), ("M", n), ("D", d)].iter().map(|(a, b)| (a.to_string(), *b)).collect() }
    }

    #[test]
    fn the_algorithm_follows_the_kernel_and_the_options() {
        let (k, info) = kernel(DOT, "(softmax)");
        let s = plan(&k, &info, &ScheduleOptions::default(), &CPU).expect("plans");
        assert_eq!(s.to_string(), "tiled 64x64");
        let rows = plan(&k, &info, &ScheduleOptions { tiled: false, ..Default::default() }, &CPU).expect("plans");
        assert_eq!(rows.algorithm, Algorithm::Rows);
        // The linear normal form (materialized operands) goes chunked unless chunk = 0.
        let (k, info) = kernel(DOT, "(map s)");
        let k = attnc_passes::optimize(&k, &attnc_passes::PassConfig::all()).expect("passes").kernel;
        assert!(matches!(plan(&k, &info, &ScheduleOptions::default(), &CPU).unwrap().algorithm, Algorithm::Chunked(_)));
        assert!(matches!(plan(&k, &info, &ScheduleOptions { chunk: 0, ..Default::default() }, &CPU).unwrap().algorithm, Algorithm::Tiled(_)));
        for (bq, bk) in [(0, 64), (64, 0), (64, 40), (8192, 64), (64, 1 << 40)] {
            let e = plan(&k, &info, &ScheduleOptions { block_q: bq, block_k: bk, ..Default::default() }, &CPU).unwrap_err();
            assert_eq!(e, ScheduleError::Tiles { block_q: bq, block_k: bk });
        }
    }

    #[test]
    fn binding_sizes_the_grid_and_checks_the_workspace() {
        let (k, info) = kernel(DOT, "(softmax)");
        let s = plan(&k, &info, &ScheduleOptions { block_q: 32, block_k: 48, ..Default::default() }, &CPU).expect("plans");
        let b = s.bind(&k, &dims(100, 16)).expect("binds");
        assert_eq!(b.grid, Grid { batches: 2, heads: 3, queries: 100, keys: 100, values: 16 });
        let BoundAlgorithm::Tiled(t) = &b.algorithm else { panic!("tiled") };
        assert_eq!((t.channels, t.tiles.query_tiles(), t.tiles.key_tiles()), (16, 4, 3));
        assert_eq!(t.groups.len(), 6, "every (batch, head) reads its own keys");
        // A 16 KiB budget (WebGPU's minimum) refuses 64×64 tiles at 64 channels (67 KB), and
        // takes 16×16 ones (13.7 KB).
        let small = Limits { task_workspace_bytes: 16 << 10, staged_tiles: false };
        let s = plan(&k, &info, &ScheduleOptions::default(), &small).expect("plans");
        assert!(matches!(s.bind(&k, &dims(100, 64)), Err(ScheduleError::Workspace { needed: 67072, .. })));
        let s = plan(&k, &info, &ScheduleOptions { block_q: 16, block_k: 16, ..Default::default() }, &small).expect("plans");
        assert!(s.bind(&k, &dims(100, 64)).is_ok());
        // Staged (a GPU workgroup), 16×16 tiles fit at any channel count; 64×64 ones do not
        // (A, K and V 64×16, S, P, W and live 64×64: 19,456 words).
        let gpu = Limits { task_workspace_bytes: 16 << 10, staged_tiles: true };
        let s = plan(&k, &info, &ScheduleOptions { block_q: 16, block_k: 16, ..Default::default() }, &gpu).expect("plans");
        assert!(s.bind(&k, &dims(100, 1024)).is_ok());
        let s = plan(&k, &info, &ScheduleOptions::default(), &gpu).expect("plans");
        assert!(matches!(s.bind(&k, &dims(100, 16)), Err(ScheduleError::Workspace { needed: 77824, .. })));
    }

    #[test]
    fn a_chunk_plan_sees_the_causal_offset() {
        let p = ChunkPlan { n: 4, m: 6, dk: 1, dv: 1, causal: Some(2), eps: None, decay: Decay::None, chunk: 2 };
        assert_eq!((0..4).map(|i| p.last_key(i)).collect::<Vec<_>>(), vec![Some(2), Some(3), Some(4), Some(5)]);
        let p = ChunkPlan { causal: Some(-2), ..p };
        assert_eq!((0..4).map(|i| p.last_key(i)).collect::<Vec<_>>(), vec![None, None, Some(0), Some(1)]);
    }
}
