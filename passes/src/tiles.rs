//! Block sparsity: classifying (query tile × key tile) boxes by their mask.
//!
//! A tile is `Empty` when the mask is false for every pair in it (it costs nothing),
//! `Full` when it is true for every pair (no per-element mask work) and `Partial`
//! otherwise. Classification is [`crate::interval`] analysis of the mask over the box,
//! so it is sound: an `Empty` tile has no live pair and a `Full` tile no masked one.
//! With a data oracle (see [`DataOracle`]) data-dependent masks (segment ids, block
//! lists) are classified from the actual values: the run-time pre-pass.

use crate::interval::{eval, Iv, LoadOracle};
use attnc_ir::Expr;
use std::collections::BTreeMap;

/// A tile's class. The discriminants are the bytes generated code reads (a backend's
/// class table is a `[TileClass]` passed as bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TileClass {
    Empty = 0,
    Full = 1,
    Partial = 2,
}

/// The query-row and key ranges of one tile (half-open) and the fixed batch and head.
#[derive(Clone, Copy, Debug)]
pub struct TileBox {
    pub b: i64,
    pub h: i64,
    pub i: (i64, i64),
    pub j: (i64, i64),
}

/// Classifies a tile; `mask = None` (no mask) is always `Full`.
pub fn classify(mask: Option<&Expr>, bx: TileBox, dims: &BTreeMap<String, i64>, data: &dyn LoadOracle) -> TileClass {
    let Some(mask) = mask else {
        return TileClass::Full;
    };
    if bx.i.0 >= bx.i.1 || bx.j.0 >= bx.j.1 {
        return TileClass::Empty;
    }
    let mut vars = vec![
        ("b".to_string(), Iv::point(bx.b)),
        ("h".to_string(), Iv::point(bx.h)),
        ("i".to_string(), Iv::Int(bx.i.0, bx.i.1 - 1)),
        ("j".to_string(), Iv::Int(bx.j.0, bx.j.1 - 1)),
    ];
    match eval(mask, &mut vars, dims, data) {
        Iv::Bool { t: false, .. } => TileClass::Empty,
        Iv::Bool { f: false, t: true } => TileClass::Full,
        _ => TileClass::Partial,
    }
}

/// The classes of one query tile's key tiles: key tile `t` holds keys
/// `[t·bk, min((t+1)·bk, nj))`. By bisection: a run of key tiles whose union classifies
/// `Empty` (or `Full`) gives that class to every tile in it — sound, since the union's
/// classification holds for every pair in it — and only `Partial` runs are split, down to
/// single tiles (classified as [`classify`] would). A row that is mostly empty (windows,
/// blocks, causal) costs O(live tiles · log) classifications instead of O(tiles).
#[allow(clippy::too_many_arguments)]
pub fn classify_row(
    mask: Option<&Expr>,
    b: i64,
    h: i64,
    i: (i64, i64),
    nj: i64,
    bk: i64,
    dims: &BTreeMap<String, i64>,
    data: &dyn LoadOracle,
) -> Vec<TileClass> {
    let ntiles = ((nj + bk - 1) / bk).max(0) as usize;
    let mut out = vec![TileClass::Full; ntiles];
    if mask.is_none() {
        return out;
    }
    fn go(out: &mut [TileClass], t0: usize, t1: usize, cx: &dyn Fn(i64, i64) -> TileClass, bk: i64, nj: i64) {
        let c = cx(t0 as i64 * bk, (t1 as i64 * bk).min(nj));
        if c != TileClass::Partial || t1 - t0 == 1 {
            out[t0..t1].iter_mut().for_each(|x| *x = c);
            return;
        }
        let mid = (t0 + t1) / 2;
        go(out, t0, mid, cx, bk, nj);
        go(out, mid, t1, cx, bk, nj);
    }
    if ntiles > 0 {
        let cx = |j0: i64, j1: i64| classify(mask, TileBox { b, h, i, j: (j0, j1) }, dims, data);
        go(&mut out, 0, ntiles, &cx, bk, nj);
    }
    out
}

/// Exact bounds of tensor elements over index boxes, read from the data (boxes of up to
/// `limit` elements; larger boxes are unknown).
pub struct DataOracle<'a> {
    /// name -> (shape, values as f64, is_int)
    pub tensors: BTreeMap<String, (&'a [usize], &'a [f64], bool)>,
    pub limit: usize,
}

impl LoadOracle for DataOracle<'_> {
    fn load(&self, tensor: &str, index: &[Iv]) -> Iv {
        let Some((shape, data, is_int)) = self.tensors.get(tensor) else {
            return Iv::Unknown;
        };
        let mut ranges = Vec::with_capacity(index.len());
        let mut count = 1usize;
        for (ix, &len) in index.iter().zip(shape.iter()) {
            let Iv::Int(lo, hi) = *ix else {
                return Iv::Unknown;
            };
            // Out-of-range indices: the kernel would clamp, the reference would fail; either
            // way nothing is known.
            if lo < 0 || hi >= len as i64 {
                return Iv::Unknown;
            }
            count = count.saturating_mul((hi - lo + 1) as usize);
            ranges.push((lo as usize, hi as usize));
        }
        if count > self.limit || ranges.len() != shape.len() {
            return Iv::Unknown;
        }
        let mut acc: Option<Iv> = None;
        let mut idx: Vec<usize> = ranges.iter().map(|r| r.0).collect();
        loop {
            let flat = idx.iter().zip(shape.iter()).fold(0usize, |f, (i, n)| f * n + i);
            let x = data[flat];
            let v = if *is_int { Iv::point(x as i64) } else { Iv::fpoint(x) };
            acc = Some(acc.map_or(v, |a| a.join(v)));
            // Next index in the box, row-major.
            let mut a = idx.len();
            loop {
                if a == 0 {
                    return acc.unwrap_or(Iv::Unknown);
                }
                a -= 1;
                if idx[a] < ranges[a].1 {
                    idx[a] += 1;
                    break;
                }
                idx[a] = ranges[a].0;
            }
            if idx.is_empty() {
                return acc.unwrap_or(Iv::Unknown);
            }
        }
    }
}
