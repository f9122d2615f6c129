//! Useful work of a kernel instance: the live (unmasked) pairs and the FLOPs they cost, so
//! benchmarks report GFLOP/s of useful work (masked pairs are not counted).

use crate::dsl::Checked;
use crate::ir::reference::{ExprEval, Scalar, Tensor};
use crate::ir::Bindings;
use attnc_passes::tiles::{classify, DataOracle, TileBox, TileClass};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Per branch: live pairs, and FLOPs per live pair (2·Dk for the dot when the score has
/// one, plus 2·Dv for the aggregation).
pub struct Work {
    pub pairs: u64,
    pub total_pairs: u64,
    pub flops: f64,
}

pub fn useful_work(c: &Checked, dims: &Bindings, inputs: &BTreeMap<String, Tensor>) -> Result<Work, String> {
    let k = &c.kernel;
    let ext = |e: &crate::ir::Extent| dims.extent(e);
    let (nb, nh, ni, nj, ne) = (ext(&k.iter.b), ext(&k.iter.h), ext(&k.iter.i), ext(&k.iter.j), ext(&k.iter.e));
    let eval = ExprEval::new(k, dims, inputs).map_err(|e| e.to_string())?;
    let oracle = DataOracle::new(
        inputs.iter().map(|(n, t)| (n.clone(), (t.shape.as_slice(), t.data.as_slice(), k.tensor(n).is_some_and(|d| d.dtype.is_int())))).collect(),
        1 << 14,
    );
    let (mut pairs, mut flops) = (0u64, 0f64);
    for br in &k.branches {
        // Channels of the score's reduction(s): the size of the first sum's range.
        let mut dk = 0i64;
        br.score.walk(&mut |x| {
            if let crate::ir::Expr::Reduce { hi, .. } = x {
                if dk == 0 {
                    dk = crate::ir::bind::eval_dims(hi, &dims.dims).unwrap_or(0);
                }
            }
        });
        let deps = br.mask.as_ref().map(crate::ir::Deps::of).unwrap_or_default();
        // The mask compiled once, evaluated per pair of the partial tiles.
        let prepared = br.mask.as_ref().map(|m| eval.prepare(m, &["b", "h", "i", "j"]));
        let (bs, hs) = (if deps.b { nb } else { 1 }, if deps.h { nh } else { 1 });
        // 64 × 64 tiles in parallel: classified, and the partial ones counted pair by pair.
        let t = 64;
        let tiles: Vec<TileBox> = (0..bs)
            .flat_map(|b| (0..hs).map(move |h| (b, h)))
            .flat_map(|(b, h)| (0..ni).step_by(t as usize).map(move |i0| (b, h, i0)))
            .flat_map(|(b, h, i0)| (0..nj).step_by(t as usize).map(move |j0| TileBox { b, h, i: (i0, (i0 + t).min(ni)), j: (j0, (j0 + t).min(nj)) }))
            .collect();
        let live: u64 = tiles
            .par_iter()
            .map(|bx| -> Result<u64, String> {
                let n = ((bx.i.1 - bx.i.0) * (bx.j.1 - bx.j.0)) as u64;
                Ok(match classify(br.mask.as_ref(), *bx, &dims.dims, &oracle) {
                    TileClass::Empty => 0,
                    TileClass::Full => n,
                    TileClass::Partial => {
                        let mask = prepared.as_ref().expect("partial tiles have a mask");
                        let mut live = 0;
                        for i in bx.i.0..bx.i.1 {
                            for j in bx.j.0..bx.j.1 {
                                let v = mask.eval(&[Scalar::Int(bx.b), Scalar::Int(bx.h), Scalar::Int(i), Scalar::Int(j)]).map_err(|e| e.to_string())?;
                                live += (v == Scalar::Bool(true)) as u64;
                            }
                        }
                        live
                    }
                })
            })
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        let scale = ((nb * nh) / (bs * hs)) as u64;
        pairs += live * scale;
        flops += (live * scale) as f64 * (2 * dk + 2 * ne) as f64;
    }
    Ok(Work { pairs, total_pairs: (nb * nh * ni * nj) as u64 * k.branches.len() as u64, flops })
}
