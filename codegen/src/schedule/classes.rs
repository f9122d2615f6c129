//! Tile classes at run time: for every branch and every (query tile, key tile) of a head,
//! whether the mask leaves it empty (skipped), full (no per-element mask work) or partial,
//! from the block-sparsity analysis of `attnc_passes::tiles`.
//!
//! A mask that reads no tensor has the same classes at every call with the same dims: they
//! are computed once per shape and kept for the last few shapes ([`TileClassifier`]'s
//! cache, the compile-time classification). A mask that reads data (segment ids, block lists) is classified from the
//! data; the last such table is kept with a copy of the data it was classified from, and a
//! call whose mask tensors hold the same values (a model's per-head window flags, a batch's
//! document layout reused across layers) reuses it ([`TileClassifier::with_data`]). A mask
//! that does not depend on the batch (or the head) is classified for one and shared by all.
//!
//! Generated code reads classes as bytes: [`TileClass`] is `repr(u8)` (0 empty, 1 full,
//! 2 partial), and [`TileClassTable::head`] lays a head's classes out as
//! `[query tile][branch][key tile]`.

pub use attnc_passes::tiles::TileClass;

use attnc_ir::{Deps, Kernel};
use attnc_passes::interval::LoadOracle;
use attnc_passes::tiles::classify_row;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Tile sizes over a (query rows × keys) problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileGrid {
    pub block_q: i64,
    pub block_k: i64,
    pub queries: i64,
    pub keys: i64,
}

impl TileGrid {
    pub fn query_tiles(&self) -> i64 {
        (self.queries + self.block_q - 1) / self.block_q
    }
    pub fn key_tiles(&self) -> i64 {
        (self.keys + self.block_k - 1) / self.block_k
    }
    /// The query rows of tile `qb` (half-open).
    pub fn rows(&self, qb: i64) -> (i64, i64) {
        (qb * self.block_q, ((qb + 1) * self.block_q).min(self.queries))
    }
}

/// How many tiles of each class.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TileCounts {
    pub empty: f64,
    pub full: f64,
    pub partial: f64,
}

impl TileCounts {
    pub fn live(&self) -> f64 {
        self.full + self.partial
    }
    pub fn total(&self) -> f64 {
        self.empty + self.full + self.partial
    }
    fn add(&mut self, c: TileClass, weight: f64) {
        match c {
            TileClass::Empty => self.empty += weight,
            TileClass::Full => self.full += weight,
            TileClass::Partial => self.partial += weight,
        }
    }
}

/// The classes of one head's query tiles against its key tiles, `[qb][kt]`, query tiles in
/// parallel.
pub fn classify_head(
    mask: Option<&attnc_ir::Expr>,
    b: i64,
    h: i64,
    grid: &TileGrid,
    dims: &BTreeMap<String, i64>,
    data: &(dyn LoadOracle + Sync),
) -> Vec<TileClass> {
    use rayon::prelude::*;
    let rows: Vec<Vec<TileClass>> =
        (0..grid.query_tiles()).into_par_iter().map(|qb| classify_row(mask, b, h, grid.rows(qb), grid.keys, grid.block_k, dims, data)).collect();
    rows.concat()
}

/// Counts the classes of one head's tiles, classifying about `budget` tiles at most: on a
/// larger grid every `stride`-th row of query tiles is classified and counted `stride`
/// times (the cost model's estimate stays cheap on long sequences).
pub fn count_tiles(
    mask: Option<&attnc_ir::Expr>,
    b: i64,
    h: i64,
    grid: &TileGrid,
    dims: &BTreeMap<String, i64>,
    data: &dyn LoadOracle,
    budget: i64,
) -> TileCounts {
    let tiles = grid.query_tiles() * grid.key_tiles();
    let stride = (tiles / budget.max(1)).max(1);
    let mut counts = TileCounts::default();
    for qb in (0..grid.query_tiles()).step_by(stride as usize) {
        for c in classify_row(mask, b, h, grid.rows(qb), grid.keys, grid.block_k, dims, data) {
            counts.add(c, stride as f64);
        }
    }
    counts
}

/// Per branch: which of `b` and `h` its mask depends on, and the classes per distinct
/// (b, h) it depends on.
#[derive(Clone, Debug)]
struct BranchClasses {
    deps: Deps,
    by_head: BTreeMap<(i64, i64), Arc<Vec<TileClass>>>,
}

/// The tile classes of every branch of a kernel at one shape (and, for masks that read
/// data, one input).
#[derive(Clone, Debug)]
pub struct TileClassTable {
    pub grid: TileGrid,
    branches: Vec<BranchClasses>,
}

impl TileClassTable {
    /// Branch `br`'s classes for head `(b, h)`, `[qb][kt]`.
    pub fn of(&self, br: usize, b: i64, h: i64) -> &[TileClass] {
        let c = &self.branches[br];
        &c.by_head[&(if c.deps.b { b } else { 0 }, if c.deps.h { h } else { 0 })]
    }

    /// The classes of head `(b, h)` laid out `[qb][branch][kt]` (what the tiled kernel reads
    /// per query tile: every branch's key tiles, contiguous).
    pub fn head(&self, b: i64, h: i64) -> Vec<TileClass> {
        let nt = self.grid.key_tiles() as usize;
        let mut out = Vec::with_capacity(self.grid.query_tiles() as usize * self.branches.len() * nt);
        for qb in 0..self.grid.query_tiles() as usize {
            for br in 0..self.branches.len() {
                out.extend_from_slice(&self.of(br, b, h)[qb * nt..(qb + 1) * nt]);
            }
        }
        out
    }

    /// The whole table as a device reads it: one byte per tile, laid out
    /// `[b][h][qb][branch][kt]` over the batches and heads that any mask depends on
    /// ([`table_deps`]; a mask that depends on neither has one head's classes).
    pub fn device_bytes(&self, nb: i64, nh: i64) -> Vec<u8> {
        let deps = self.branches.iter().map(|c| c.deps).fold(Deps::default(), batch_or_head);
        let mut out = Vec::new();
        for b in if deps.b { 0..nb } else { 0..1 } {
            for h in if deps.h { 0..nh } else { 0..1 } {
                out.extend(self.head(b, h).iter().map(|c| *c as u8));
            }
        }
        out
    }

    pub fn counts(&self, br: usize, b: i64, h: i64) -> TileCounts {
        let mut c = TileCounts::default();
        self.of(br, b, h).iter().for_each(|x| c.add(*x, 1.0));
        c
    }
}

/// Which of the batch and the head any branch's mask depends on: the axes of
/// [`TileClassTable::device_bytes`].
pub fn table_deps(k: &Kernel) -> Deps {
    k.branches.iter().filter_map(|b| b.mask.as_ref()).map(Deps::of).fold(Deps::default(), batch_or_head)
}

/// The batch and head dependences of `a` or `d`.
fn batch_or_head(a: Deps, d: Deps) -> Deps {
    Deps { b: a.b || d.b, h: a.h || d.h, ..a }
}

/// A shape: the tile grid and the dims. Per shape, the classes by (branch, batch, head);
/// the last [`crate::host::SHAPES_KEPT`] shapes are kept.
type ShapeKey = (TileGrid, BTreeMap<String, i64>);
type ShapeClasses = BTreeMap<(usize, i64, i64), Arc<Vec<TileClass>>>;

/// Mask data larger than this (in 32-bit words, all mask tensors together) is not copied
/// to key the data cache: comparing it would cost more than it saves.
const DATA_KEY_LIMIT: usize = 1 << 22;

/// The last table classified from data, and what it was classified from.
struct DataTable {
    grid: TileGrid,
    nb: i64,
    nh: i64,
    dims: BTreeMap<String, i64>,
    data: Vec<(String, Vec<u32>)>,
    table: TileClassTable,
}

impl DataTable {
    fn matches(&self, grid: &TileGrid, nb: i64, nh: i64, dims: &BTreeMap<String, i64>, data: &[(&str, &[u32])]) -> bool {
        self.grid == *grid
            && (self.nb, self.nh) == (nb, nh)
            && self.dims == *dims
            && self.data.len() == data.len()
            && self.data.iter().zip(data).all(|((n, v), (m, w))| n == m && v.as_slice() == *w)
    }
}

/// Classifies a kernel's tiles, keeping the classes of static masks per shape and the last
/// table of masks that read data.
#[derive(Default)]
pub struct TileClassifier {
    cache: Mutex<BTreeMap<ShapeKey, ShapeClasses>>,
    last_data: Mutex<Option<DataTable>>,
}

impl TileClassifier {
    /// The table of masks that read tensors: `data` holds the storage-form values (f32 or
    /// i32 bits) of every tensor the masks read, by name; `classify` computes the table
    /// (with [`Self::table`]) when the last one was classified from other data or dims.
    pub fn with_data(
        &self,
        grid: &TileGrid,
        nb: i64,
        nh: i64,
        dims: &BTreeMap<String, i64>,
        data: &[(&str, &[u32])],
        classify: &mut dyn FnMut(&Self) -> TileClassTable,
    ) -> TileClassTable {
        if let Some(last) = self.last_data.lock().expect("classes lock").as_ref().filter(|l| l.matches(grid, nb, nh, dims, data)) {
            return last.table.clone();
        }
        let table = classify(self);
        if data.iter().map(|d| d.1.len()).sum::<usize>() <= DATA_KEY_LIMIT {
            let kept = DataTable {
                grid: *grid,
                nb,
                nh,
                dims: dims.clone(),
                data: data.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect(),
                table: table.clone(),
            };
            *self.last_data.lock().expect("classes lock") = Some(kept);
        }
        table
    }

    /// The classes of every branch at `grid`, for the batches and heads each mask depends
    /// on; `data` answers the loads of masks that read tensors.
    pub fn table(&self, k: &Kernel, grid: &TileGrid, nb: i64, nh: i64, dims: &BTreeMap<String, i64>, data: &(dyn LoadOracle + Sync)) -> TileClassTable {
        let mut branches = Vec::new();
        for (br, branch) in k.branches.iter().enumerate() {
            let mask = branch.mask.as_ref();
            let deps = mask.map(Deps::of).unwrap_or_default();
            let static_mask = mask.is_none_or(|m| m.loads().is_empty());
            let mut by_head = BTreeMap::new();
            for b in if deps.b { 0..nb } else { 0..1 } {
                for h in if deps.h { 0..nh } else { 0..1 } {
                    let shape = (*grid, dims.clone());
                    let cached =
                        if static_mask { self.cache.lock().expect("classes lock").get(&shape).and_then(|c| c.get(&(br, b, h))).cloned() } else { None };
                    let classes = cached.unwrap_or_else(|| {
                        let c = Arc::new(classify_head(mask, b, h, grid, dims, data));
                        if static_mask {
                            let mut kept = self.cache.lock().expect("classes lock");
                            crate::host::shape_entry(&mut kept, shape).insert((br, b, h), c.clone());
                        }
                        c
                    });
                    by_head.insert((b, h), classes);
                }
            }
            branches.push(BranchClasses { deps, by_head });
        }
        TileClassTable { grid: *grid, branches }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_passes::interval::NoData;

    fn kernel(mask: &str) -> Kernel {
        let dot = crate::schedule::TEST_DOT;
        crate::schedule::test_kernel(&format!("(branch (score {dot}) {mask} (norm (softmax))) (branch (score {dot}) (norm (softmax)))"))
    }

    #[test]
    fn causal_classes_by_head_and_branch() {
        let k = kernel("(mask (<= j i))");
        let grid = TileGrid { block_q: 16, block_k: 16, queries: 40, keys: 40 };
        let dims = BTreeMap::new();
        let c = TileClassifier::default();
        let t = c.table(&k, &grid, 2, 3, &dims, &NoData);
        use TileClass::*;
        assert_eq!(t.of(0, 1, 2), &[Partial, Empty, Empty, Full, Partial, Empty, Full, Full, Partial]);
        assert_eq!(t.of(1, 0, 0), &[Full; 9], "no mask: every tile full");
        let head = t.head(1, 2);
        assert_eq!(&head[..6], &[Partial, Empty, Empty, Full, Full, Full], "query tile 0: branch 0 then branch 1");
        assert_eq!(t.counts(0, 0, 0), TileCounts { empty: 3.0, full: 3.0, partial: 3.0 });
        // The causal mask depends on neither b nor h: the device table is one head's.
        assert_eq!(table_deps(&k), Deps::default());
        assert_eq!(t.device_bytes(2, 3), head.iter().map(|c| *c as u8).collect::<Vec<_>>());
        // The bytes generated code reads.
        assert_eq!([Empty as u8, Full as u8, Partial as u8], [0, 1, 2]);
        // Counting every row, or every other one (counted twice) on a budget.
        let all = count_tiles(k.branches[0].mask.as_ref(), 0, 0, &grid, &dims, &NoData, i64::MAX);
        assert_eq!(all, t.counts(0, 0, 0));
        let sampled = count_tiles(k.branches[0].mask.as_ref(), 0, 0, &grid, &dims, &NoData, 4);
        assert_eq!(sampled.total(), 12.0, "query tiles 0 and 2, each counted twice");
    }

    #[test]
    fn static_classes_are_kept_for_a_few_shapes() {
        let k = kernel("(mask (<= j i))");
        let c = TileClassifier::default();
        let shapes = |c: &TileClassifier| c.cache.lock().expect("lock").len();
        for n in 1..=3 * crate::host::SHAPES_KEPT as i64 {
            let grid = TileGrid { block_q: 16, block_k: 16, queries: n, keys: n };
            let dims = BTreeMap::from([("N".to_string(), n)]);
            let t = c.table(&k, &grid, 1, 2, &dims, &NoData);
            assert_eq!(t.counts(0, 0, 0).total(), (grid.query_tiles() * grid.key_tiles()) as f64);
            assert!(shapes(&c) <= crate::host::SHAPES_KEPT, "{} shapes kept after {n}", shapes(&c));
        }
        // The latest shape is served from the cache: the same table object.
        let grid = TileGrid { block_q: 16, block_k: 16, queries: 24, keys: 24 };
        let dims = BTreeMap::from([("N".to_string(), 24)]);
        let (a, b) = (c.table(&k, &grid, 1, 2, &dims, &NoData), c.table(&k, &grid, 1, 2, &dims, &NoData));
        assert!(Arc::ptr_eq(&a.branches[0].by_head[&(0, 0)], &b.branches[0].by_head[&(0, 0)]));
    }

    #[test]
    fn a_table_from_data_is_reused_while_the_data_is_the_same() {
        let k = kernel("(mask (<= j i))");
        let grid = TileGrid { block_q: 16, block_k: 16, queries: 40, keys: 40 };
        let dims = BTreeMap::from([("N".to_string(), 40)]);
        let c = TileClassifier::default();
        let calls = std::cell::Cell::new(0);
        let mut classify = |c: &TileClassifier| {
            calls.set(calls.get() + 1);
            c.table(&k, &grid, 1, 2, &dims, &NoData)
        };
        let (seg, other) = (vec![0u32, 0, 1, 1], vec![0u32, 1, 1, 1]);
        let t = c.with_data(&grid, 1, 2, &dims, &[("seg", &seg)], &mut classify);
        assert_eq!(calls.get(), 1);
        assert_eq!(t.of(0, 0, 1), c.table(&k, &grid, 1, 2, &dims, &NoData).of(0, 0, 1));
        c.with_data(&grid, 1, 2, &dims, &[("seg", &seg.clone())], &mut classify);
        assert_eq!(calls.get(), 1, "same values, another buffer: reused");
        c.with_data(&grid, 1, 2, &dims, &[("seg", &other)], &mut classify);
        assert_eq!(calls.get(), 2, "other values");
        c.with_data(&grid, 1, 2, &dims, &[("seg", &other), ("blocks", &seg)], &mut classify);
        assert_eq!(calls.get(), 3, "another tensor");
        c.with_data(&grid, 1, 3, &dims, &[("seg", &other), ("blocks", &seg)], &mut classify);
        assert_eq!(calls.get(), 4, "another head count");
        let dims2 = BTreeMap::from([("N".to_string(), 41)]);
        c.with_data(&grid, 1, 3, &dims2, &[("seg", &other), ("blocks", &seg)], &mut classify);
        assert_eq!(calls.get(), 5, "other dims");
        let grid2 = TileGrid { block_q: 32, ..grid };
        c.with_data(&grid2, 1, 3, &dims2, &[("seg", &other), ("blocks", &seg)], &mut classify);
        assert_eq!(calls.get(), 6, "another grid");
        c.with_data(&grid2, 1, 3, &dims2, &[("seg", &other), ("blocks", &seg)], &mut classify);
        assert_eq!(calls.get(), 6, "the last table again");
    }
}
