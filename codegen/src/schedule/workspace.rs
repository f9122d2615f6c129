//! The tiled kernel's workspace: one layout, read by the schedule (for its size and budget)
//! and by each backend's emitter (for the offsets of its regions).
//!
//! Two layouts of a task's memory:
//! - [`TASK`], for a target that packs whole head groups once (the CPU): per task (a query tile: a CPU worker's scratch memory, a GPU workgroup's shared
//!   memory): the packed query features `A`, the scores `S`, the branch and output
//!   accumulators `O`, `OUT`, and six per-row vectors of the normalization state;
//!   per head group (heads sharing one key/value pack) the key panels `KT`, transposed in
//!   panels of `BK` keys, and the value rows `VB`, both zero-padded to whole key tiles
//!   ([`PACK`]);
//! - [`STAGED`], for a target whose task memory is a GPU workgroup's shared memory, too small
//!   for whole rows of features (WebGPU guarantees 16 KiB): the query features, a key tile's
//!   features and its values are staged [`STAGE_CHANNELS`] channels at a time, the scores
//!   and weights of the tile pair are shared, and the accumulators and the normalization
//!   state live in each invocation's registers. Its size does not depend on the dims.
//!
//! Sizes are in f32 elements; a region is `rows × cols` with the columns a function of the
//! dims (channels of the dot, output channels).

/// How many columns a region has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cols {
    /// The dot's channels (`Dk` plus any low-rank bias channels).
    Channels,
    /// The keys of a tile (`BK`).
    Keys,
    /// Output channels (`Dv`).
    Values,
    /// One per row.
    One,
    /// [`STAGE_CHANNELS`] channels of a staged operand.
    Stage,
}

/// Channels of the query features, key features and values staged at once ([`STAGED`]).
pub const STAGE_CHANNELS: usize = 16;

/// How many rows a region has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// The query rows of a tile (`BQ`).
    QueryTile,
    /// The keys padded to whole tiles (`ceil(M / BK) · BK`).
    PaddedKeys,
    /// The keys of one tile (`BK`).
    KeyTile,
    /// The query rows of a tile when some branch's normalization map has its own dot
    /// ([`crate::schedule::tiled::MapDot`]), else none.
    MapTile,
    /// One row when some branch's normalization map takes `exp(s − t)` of a per-key
    /// statistic `t` ([`crate::schedule::tiled::ExpStat`]), else none.
    KeyStat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub name: &'static str,
    pub what: &'static str,
    pub rows: Rows,
    pub cols: Cols,
}

const fn region(name: &'static str, what: &'static str, rows: Rows, cols: Cols) -> Region {
    Region { name, what, rows, cols }
}

/// The regions of a task's workspace, in order (each starts where the previous ends).
pub const TASK: [Region; 13] = [
    region("A", "packed query features", Rows::QueryTile, Cols::Channels),
    region("S", "scores, then weights", Rows::QueryTile, Cols::Keys),
    region("O", "the branch's accumulator", Rows::QueryTile, Cols::Values),
    region("OUT", "the output rows' accumulator", Rows::QueryTile, Cols::Values),
    region("m", "running maximum (base 2)", Rows::QueryTile, Cols::One),
    region("l", "denominator", Rows::QueryTile, Cols::One),
    region("corr", "rescale factor of the last tile", Rows::QueryTile, Cols::One),
    region("live", "the row has a live key in some branch", Rows::QueryTile, Cols::One),
    region("blive", "the row has a live key in this branch", Rows::QueryTile, Cols::One),
    region("tmax", "row maxima of a tile's scores, from the matmul", Rows::QueryTile, Cols::One),
    region("A2", "packed query features of a normalization map's dot", Rows::MapTile, Cols::Channels),
    region("S2", "a normalization map's dot, per pair", Rows::MapTile, Cols::Keys),
    region("kstat", "a per-key statistic of the key tile (base 2), for a map's exp(s − t)", Rows::KeyStat, Cols::Keys),
];

/// Indices into [`TASK`].
pub mod task {
    pub const A: usize = 0;
    pub const S: usize = 1;
    pub const O: usize = 2;
    pub const OUT: usize = 3;
    pub const M: usize = 4;
    pub const L: usize = 5;
    pub const CORR: usize = 6;
    pub const LIVE: usize = 7;
    pub const BLIVE: usize = 8;
    pub const TMAX: usize = 9;
    pub const A2: usize = 10;
    pub const S2: usize = 11;
    pub const KSTAT: usize = 12;
}

/// The regions of a GPU workgroup's shared memory when the tile kernel stages its operands.
pub const STAGED: [Region; 7] = [
    region("A", "query features, one channel chunk", Rows::QueryTile, Cols::Stage),
    region("K", "a key tile's features, one channel chunk", Rows::KeyTile, Cols::Stage),
    region("V", "a key tile's values, one channel chunk", Rows::KeyTile, Cols::Stage),
    region("S", "scores of the tile pair", Rows::QueryTile, Cols::Keys),
    region("P", "softmax numerators (or scores) of the tile pair, for the denominator", Rows::QueryTile, Cols::Keys),
    region("W", "weights of the tile pair, for the values", Rows::QueryTile, Cols::Keys),
    region("live", "which pairs of the tile pair are live", Rows::QueryTile, Cols::Keys),
];

/// Indices into [`STAGED`].
pub mod staged {
    pub const A: usize = 0;
    pub const K: usize = 1;
    pub const V: usize = 2;
    pub const S: usize = 3;
    pub const P: usize = 4;
    pub const W: usize = 5;
    pub const LIVE: usize = 6;
}

/// The regions of a head group's pack.
pub const PACK: [Region; 2] = [
    region("KT", "key features, transposed in panels of BK keys", Rows::PaddedKeys, Cols::Channels),
    region("VB", "value rows", Rows::PaddedKeys, Cols::Values),
];

/// The workspace of a tiled schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileWorkspace {
    pub block_q: usize,
    pub block_k: usize,
    /// The task's layout is [`STAGED`] (else [`TASK`]).
    pub staged: bool,
    /// Key panels a head group's pack holds (one per distinct key factor of the branches'
    /// dots, at least 1).
    pub panels: usize,
    /// Some branch's normalization map has its own dot (the `A2` and `S2` regions).
    pub map_dot: bool,
    /// Some branch's normalization map takes `exp(s − t)` of a per-key statistic (the
    /// `kstat` region).
    pub key_stat: bool,
}

impl TileWorkspace {
    /// Rows of a region for `keys` keys.
    pub fn rows(&self, r: Rows, keys: i64) -> u128 {
        match r {
            Rows::QueryTile => self.block_q as u128,
            Rows::PaddedKeys => (keys.max(0) as u128).div_ceil(self.block_k as u128) * self.block_k as u128,
            Rows::KeyTile => self.block_k as u128,
            Rows::MapTile => {
                if self.map_dot {
                    self.block_q as u128
                } else {
                    0
                }
            }
            Rows::KeyStat => self.key_stat as u128,
        }
    }

    /// Columns of a region (`A` and `KT` have none when the kernel has no dot).
    pub fn cols(&self, c: Cols, channels: i64, values: i64) -> u128 {
        match c {
            Cols::Channels => channels.max(0) as u128,
            Cols::Keys => self.block_k as u128,
            Cols::Values => values.max(0) as u128,
            Cols::One => 1,
            Cols::Stage => STAGE_CHANNELS as u128,
        }
    }

    fn floats(&self, regions: &[Region], keys: i64, channels: i64, values: i64) -> u128 {
        regions.iter().map(|r| self.rows(r.rows, keys) * self.cols(r.cols, channels, values)).sum()
    }

    /// The regions of one task's workspace.
    pub fn task_regions(&self) -> &'static [Region] {
        if self.staged {
            &STAGED
        } else {
            &TASK
        }
    }

    /// f32 elements (or 32-bit words) of one task's workspace.
    pub fn task_floats(&self, channels: i64, values: i64) -> u128 {
        self.floats(self.task_regions(), 0, channels, values)
    }

    /// Elements of region `n` of the task's layout, and where it starts.
    pub fn task_region(&self, n: usize, channels: i64, values: i64) -> (u128, u128) {
        let regions = self.task_regions();
        let at = self.floats(&regions[..n], 0, channels, values);
        (at, self.floats(&regions[n..n + 1], 0, channels, values))
    }

    /// Bytes of one task's workspace.
    pub fn task_bytes(&self, channels: i64, values: i64) -> u128 {
        4 * self.task_floats(channels, values)
    }

    /// f32 elements of the key panels (all of them) and of the value rows of one head group.
    pub fn pack_floats(&self, keys: i64, channels: i64, values: i64) -> (u128, u128) {
        (self.panels as u128 * self.panel_floats(keys, channels), self.floats(&PACK[1..], keys, channels, values))
    }

    /// f32 elements of one key panel.
    pub fn panel_floats(&self, keys: i64, channels: i64) -> u128 {
        self.floats(&PACK[..1], keys, channels, 0)
    }

    /// f32 elements a task keeps between the two passes of a softmax with a post-map (after
    /// its workspace, when [`crate::schedule::BoundTiled::keep_weights`]): per key tile, the
    /// query tile's first-pass weights (`BQ × BK`, relative to the row maximum at that tile)
    /// and that maximum per row (`BQ`).
    pub fn kept_floats(&self, keys: i64) -> u128 {
        let tiles = (keys.max(0) as u128).div_ceil(self.block_k as u128);
        tiles * self.block_q as u128 * (self.block_k as u128 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_up_region_by_region() {
        let w = TileWorkspace { block_q: 64, block_k: 32, staged: false, panels: 1, map_dot: false, key_stat: false };
        // A 64×16, S 64×32, O and OUT 64×8, six vectors of 64.
        assert_eq!(w.task_floats(16, 8), 64 * 16 + 64 * 32 + 2 * 64 * 8 + 6 * 64);
        assert_eq!(w.task_bytes(0, 8), 4 * (64 * 32 + 2 * 64 * 8 + 6 * 64), "no dot: no A");
        // A normalization map's dot: A2 and S2 as A and S.
        assert_eq!(TileWorkspace { map_dot: true, ..w }.task_floats(16, 8), 2 * (64 * 16 + 64 * 32) + 2 * 64 * 8 + 6 * 64);
        // A per-key statistic: one row of keys.
        assert_eq!(TileWorkspace { key_stat: true, ..w }.task_floats(16, 8), w.task_floats(16, 8) + 32);
        // 70 keys pad to 96.
        assert_eq!(w.pack_floats(70, 16, 8), (96 * 16, 96 * 8));
        assert_eq!(TileWorkspace { panels: 2, ..w }.pack_floats(70, 16, 8), (2 * 96 * 16, 96 * 8), "a panel per key factor");
        assert_eq!(TASK[task::TMAX].name, "tmax");
        assert_eq!(TASK[task::S].cols, Cols::Keys);
        // Staged: A 16×16, K and V 32×16, S, P, W and live 16×32, whatever the dims.
        let g = TileWorkspace { block_q: 16, block_k: 32, staged: true, panels: 1, map_dot: false, key_stat: false };
        assert_eq!(g.task_floats(128, 256), 16 * 16 + 2 * 32 * 16 + 4 * 16 * 32);
        assert_eq!(g.task_floats(1, 1), g.task_floats(4096, 4096));
        assert_eq!(g.task_region(staged::S, 0, 0), (16 * 16 + 2 * 32 * 16, 16 * 32));
        assert_eq!(g.task_region(staged::LIVE, 0, 0).0, 16 * 16 + 2 * 32 * 16 + 3 * 16 * 32);
    }
}
