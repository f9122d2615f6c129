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
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

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
    classify_in(mask, &mut box_vars(bx.b, bx.h, bx.i), bx.j, dims, data)
}

/// The variables of a box of query rows `i` (half-open) of head `(b, h)`; `j` is set by
/// [`classify_in`].
fn box_vars(b: i64, h: i64, i: (i64, i64)) -> Vec<(String, Iv)> {
    vec![("b".to_string(), Iv::point(b)), ("h".to_string(), Iv::point(h)), ("i".to_string(), Iv::Int(i.0, i.1 - 1)), ("j".to_string(), Iv::Unknown)]
}

/// [`classify`] with the box's variables made once ([`box_vars`]) and keys `j` (half-open).
fn classify_in(mask: Option<&Expr>, vars: &mut Vec<(String, Iv)>, j: (i64, i64), dims: &BTreeMap<String, i64>, data: &dyn LoadOracle) -> TileClass {
    let Some(mask) = mask else {
        return TileClass::Full;
    };
    let Iv::Int(i0, i1) = vars[2].1 else { unreachable!("box_vars sets the rows") };
    if i0 > i1 || j.0 >= j.1 {
        return TileClass::Empty;
    }
    vars[3].1 = Iv::Int(j.0, j.1 - 1);
    match eval(mask, vars, dims, data) {
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
    fn go(out: &mut [TileClass], t0: usize, t1: usize, cx: &mut dyn FnMut(i64, i64) -> TileClass, bk: i64, nj: i64) {
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
        let mut vars = box_vars(b, h, i);
        let mut cx = |j0: i64, j1: i64| classify_in(mask, &mut vars, (j0, j1), dims, data);
        go(&mut out, 0, ntiles, &mut cx, bk, nj);
    }
    out
}

/// Boxes of up to this many elements are scanned at every request (not kept).
const SMALL_BOX: usize = 64;
/// Ranks up to this are indexed without allocating.
const SMALL_RANK: usize = 8;

/// `n` elements on the stack (`n ≤ SMALL_RANK`) or in `heap`: an index per axis without
/// allocating for the usual ranks.
fn small_slice<'a, T: Copy + Default>(stack: &'a mut [T; SMALL_RANK], heap: &'a mut Vec<T>, n: usize) -> &'a mut [T] {
    if n <= SMALL_RANK {
        &mut stack[..n]
    } else {
        heap.resize(n, T::default());
        heap
    }
}

/// A tensor and an index box (inclusive ranges per axis).
type BoxKey = (String, Vec<(usize, usize)>);

/// Exact bounds of tensor elements over index boxes, read from the data (boxes of up to
/// `limit` elements; larger boxes are unknown). Each box is scanned once: the classifier asks
/// for the same key ranges on every row of query tiles (`seg[b, j0..j1]`), so results are
/// kept for the oracle's lifetime (one call's data).
pub struct DataOracle<'a> {
    /// name -> (shape, values as f64, is_int)
    pub tensors: BTreeMap<String, (&'a [usize], &'a [f64], bool)>,
    pub limit: usize,
    memo: Mutex<HashMap<BoxKey, Iv>>,
}

impl<'a> DataOracle<'a> {
    pub fn new(tensors: BTreeMap<String, (&'a [usize], &'a [f64], bool)>, limit: usize) -> DataOracle<'a> {
        DataOracle { tensors, limit, memo: Mutex::new(HashMap::new()) }
    }
}

/// The bounds of `data` over the row-major box `ranges` (inclusive) of a tensor of `shape`.
fn scan_box(shape: &[usize], data: &[f64], ranges: &[(usize, usize)], is_int: bool) -> Iv {
    let (mut lo, mut hi, mut nan) = (f64::INFINITY, f64::NEG_INFINITY, false);
    let last = ranges.len() - 1;
    let (mut stack, mut heap) = ([0usize; SMALL_RANK], Vec::new());
    let idx = small_slice(&mut stack, &mut heap, ranges.len());
    idx.iter_mut().zip(ranges).for_each(|(x, r)| *x = r.0);
    loop {
        // The innermost axis is contiguous: one slice.
        let flat = idx.iter().zip(shape.iter()).fold(0usize, |f, (i, n)| f * n + i);
        for &x in &data[flat..=flat + (ranges[last].1 - ranges[last].0)] {
            if x.is_nan() {
                nan = true;
            } else {
                lo = lo.min(x);
                hi = hi.max(x);
            }
        }
        // Next row of the box, row-major over the outer axes.
        let mut a = last;
        loop {
            if a == 0 {
                return if is_int { Iv::Int(lo as i64, hi as i64) } else { Iv::Float { lo, hi, nan } };
            }
            a -= 1;
            if idx[a] < ranges[a].1 {
                idx[a] += 1;
                break;
            }
            idx[a] = ranges[a].0;
        }
    }
}

impl LoadOracle for DataOracle<'_> {
    fn load(&self, tensor: &str, index: &[Iv]) -> Iv {
        let Some((shape, data, is_int)) = self.tensors.get(tensor) else {
            return Iv::Unknown;
        };
        if index.len() != shape.len() {
            return Iv::Unknown;
        }
        let (mut stack, mut heap) = ([(0usize, 0usize); SMALL_RANK], Vec::new());
        let ranges = small_slice(&mut stack, &mut heap, index.len());
        let mut count = 1usize;
        for (r, (ix, &len)) in ranges.iter_mut().zip(index.iter().zip(shape.iter())) {
            let Iv::Int(lo, hi) = *ix else {
                return Iv::Unknown;
            };
            // Out-of-range indices: the kernel would clamp, the reference would fail; either
            // way nothing is known.
            if lo < 0 || hi >= len as i64 {
                return Iv::Unknown;
            }
            count = count.saturating_mul((hi - lo + 1) as usize);
            *r = (lo as usize, hi as usize);
        }
        if count > self.limit {
            return Iv::Unknown;
        }
        if index.is_empty() {
            let x = data[0];
            return if *is_int { Iv::point(x as i64) } else { Iv::fpoint(x) };
        }
        // A small box (a point of a block list) is read again rather than kept: cheaper than
        // the memo's key.
        if count <= SMALL_BOX {
            return scan_box(shape, data, ranges, *is_int);
        }
        let key = (tensor.to_string(), ranges.to_vec());
        if let Some(v) = self.memo.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return *v;
        }
        let v = scan_box(shape, data, &key.1, *is_int);
        self.memo.lock().unwrap_or_else(|e| e.into_inner()).insert(key, v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounds of a box, the slow way: every element joined.
    fn joined(shape: &[usize], data: &[f64], ranges: &[(usize, usize)], is_int: bool) -> Iv {
        let mut acc: Option<Iv> = None;
        for (flat, &x) in data.iter().enumerate() {
            let mut rem = flat;
            let mut inside = true;
            for (a, &(lo, hi)) in ranges.iter().enumerate() {
                let stride: usize = shape[a + 1..].iter().product();
                let i = rem / stride;
                rem %= stride;
                inside &= lo <= i && i <= hi;
            }
            if inside {
                let v = if is_int { Iv::point(x as i64) } else { Iv::fpoint(x) };
                acc = Some(acc.map_or(v, |a| a.join(v)));
            }
        }
        acc.expect("a box holds an element")
    }

    #[test]
    fn data_oracle_bounds_match_every_element_joined_and_repeat() {
        let shape = [3usize, 5, 7];
        let ints: Vec<f64> = (0..105).map(|x| ((x * 37 + 11) % 23) as f64 - 9.0).collect();
        let mut floats: Vec<f64> = (0..105).map(|x| ((x * 53 + 7) % 29) as f64 * 0.25 - 3.0).collect();
        floats[40] = f64::NAN;
        for (data, is_int) in [(&ints, true), (&floats, false)] {
            let o = DataOracle::new([("t".to_string(), (&shape[..], &data[..], is_int))].into(), 1 << 10);
            for ranges in [[(0, 2), (0, 4), (0, 6)], [(1, 1), (2, 3), (5, 6)], [(0, 1), (1, 1), (0, 0)], [(2, 2), (4, 4), (6, 6)]] {
                let index: Vec<Iv> = ranges.iter().map(|&(lo, hi)| Iv::Int(lo as i64, hi as i64)).collect();
                let want = joined(&shape, data, &ranges, is_int);
                assert_eq!(o.load("t", &index), want, "{ranges:?}");
                assert_eq!(o.load("t", &index), want, "{ranges:?} again (kept)");
            }
            // Out of range or past the limit: unknown.
            assert_eq!(o.load("t", &[Iv::Int(0, 3), Iv::Int(0, 0), Iv::Int(0, 0)]), Iv::Unknown);
            let small = DataOracle::new([("t".to_string(), (&shape[..], &data[..], is_int))].into(), 10);
            assert_eq!(small.load("t", &[Iv::Int(0, 2), Iv::Int(0, 4), Iv::Int(0, 0)]), Iv::Unknown);
        }
        // A rank past the small-index path: [3, 5, 7] with six unit axes in front.
        let tall = [1usize, 1, 1, 1, 1, 1, 3, 5, 7];
        let o = DataOracle::new([("t".to_string(), (&tall[..], &ints[..], true))].into(), 1 << 10);
        for ranges in [[(0, 2), (0, 4), (0, 6)], [(1, 1), (2, 3), (5, 6)]] {
            let index: Vec<Iv> = [Iv::point(0); 6].into_iter().chain(ranges.iter().map(|&(lo, hi)| Iv::Int(lo as i64, hi as i64))).collect();
            assert_eq!(o.load("t", &index), joined(&shape, &ints, &ranges, true), "rank 9, {ranges:?}");
        }
    }
}
