//! Random inputs for a spec: what `attnc inputs`, the tests and the benchmarks run on.
//!
//! Float inputs are standard normal unless the spec gives a range (`in lo..hi`, uniform);
//! integer inputs are uniform in `[lo, hi)`, by default `[0, 2)`. Seeded, so a seed always
//! gives the same tensors.

use attnc_ir::reference::Tensor;
use attnc_ir::{Bindings, Expr, Kernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::BTreeMap;

/// A value-range bound evaluated with the bound dims.
fn bound(e: &Expr, dims: &Bindings) -> Result<f64, String> {
    match e {
        Expr::Float(x) => Ok(x.0),
        Expr::Unary(attnc_ir::UnOp::ToFloat, a) => bound(a, dims),
        other => attnc_ir::bind::eval_dims(other, &dims.dims).map(|v| v as f64),
    }
}

pub fn random_inputs(kernel: &Kernel, dims: &Bindings, ranges: &BTreeMap<String, (Expr, Expr)>, seed: u64) -> Result<BTreeMap<String, Tensor>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for t in kernel.inputs() {
        let shape = dims.shape(t);
        let n: usize = shape.iter().product();
        let range = match ranges.get(&t.name) {
            Some((lo, hi)) => Some((bound(lo, dims)?, bound(hi, dims)?)),
            None => None,
        };
        let data: Vec<f64> = if t.dtype.is_int() {
            let (lo, hi) = range.unwrap_or((0.0, 2.0));
            let (lo, hi) = (lo as i64, hi as i64);
            if lo >= hi {
                return Err(format!("the value range of `{}` is empty for these dims ({lo}..{hi})", t.name));
            }
            (0..n).map(|_| rng.random_range(lo..hi) as f64).collect()
        } else {
            match range {
                Some((lo, hi)) if lo < hi => (0..n).map(|_| rng.random_range(lo..hi)).collect(),
                Some((lo, hi)) => return Err(format!("the value range of `{}` is empty ({lo}..{hi})", t.name)),
                None => (0..n).map(|_| StandardNormal.sample(&mut rng)).collect(),
            }
        };
        // Inputs stored in a narrow dtype are rounded now, so every consumer sees the same values.
        let data = match t.dtype {
            attnc_ir::DType::F32 => data.iter().map(|x| *x as f32 as f64).collect(),
            attnc_ir::DType::F16 => data.iter().map(|x| half::f16::from_f64(*x).to_f64()).collect(),
            attnc_ir::DType::BF16 => data.iter().map(|x| half::bf16::from_f64(*x).to_f64()).collect(),
            attnc_ir::DType::I32 => data,
        };
        out.insert(t.name.clone(), Tensor::new(shape, data));
    }
    Ok(out)
}

/// A seeded standard-normal cotangent of `n` elements (f32), for timing a backward pass.
pub fn random_cotangent(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x636f_7461_6e67_656e);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}
