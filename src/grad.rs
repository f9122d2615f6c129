//! Gradients of a spec (`attnc grad`): the reference backward ([`attnc_ir::grad`]) and its
//! check against central finite differences of the f64 reference forward.

use attnc_ir::reference::{run_bound, Tensor};
use attnc_ir::{Bindings, Kernel};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// `Σ dout · o` at these inputs: the scalar whose gradient [`attnc_ir::grad::grad`] gives.
pub fn loss(k: &Kernel, dims: &Bindings, inputs: &BTreeMap<String, Tensor>, dout: &Tensor) -> Result<f64, String> {
    let o = run_bound(k, dims, inputs).map_err(|e| e.to_string())?;
    Ok(o.data.iter().zip(&dout.data).map(|(a, b)| a * b).sum())
}

/// One input's finite-difference check.
#[derive(Clone, Debug)]
pub struct FdRow {
    pub input: String,
    /// Elements compared.
    pub checked: usize,
    /// Elements skipped because the loss is not smooth there (a mask or a `relu` flips within
    /// the step: the two step sizes disagree).
    pub kinks: usize,
    /// Largest |analytic − finite difference| over the compared elements.
    pub worst: f64,
    /// Largest |finite difference|.
    pub scale: f64,
    /// The first element that disagrees, if any.
    pub failure: Option<String>,
}

/// Compares `grads` with central differences `(L(x + h) − L(x − h)) / 2h`, `h = 1e-5·max(1, |x|)`,
/// on up to `per_input` seeded elements of each float input. An element passes when the two
/// agree within `1e-5·max(1, |fd|)`; where they do not, the difference is taken again at
/// `h / 4`, and a finite difference that moves with the step marks a kink (skipped, counted),
/// one that does not a failure.
pub fn finite_differences(
    k: &Kernel,
    dims: &Bindings,
    inputs: &BTreeMap<String, Tensor>,
    dout: &Tensor,
    grads: &BTreeMap<String, Tensor>,
    per_input: usize,
    seed: u64,
) -> Result<Vec<FdRow>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rows = Vec::new();
    let mut work = inputs.clone();
    for (name, g) in grads {
        let n = g.data.len();
        let picks: Vec<usize> = if n <= per_input { (0..n).collect() } else { sample(&mut rng, n, per_input).into_vec() };
        let mut row = FdRow { input: name.clone(), checked: 0, kinks: 0, worst: 0.0, scale: 0.0, failure: None };
        for idx in picks {
            let x = inputs[name].data[idx];
            if !x.is_finite() {
                continue;
            }
            let mut fd = |h: f64| -> Result<f64, String> {
                work.get_mut(name).expect("input").data[idx] = x + h;
                let up = loss(k, dims, &work, dout)?;
                work.get_mut(name).expect("input").data[idx] = x - h;
                let down = loss(k, dims, &work, dout)?;
                work.get_mut(name).expect("input").data[idx] = x;
                Ok((up - down) / (2.0 * h))
            };
            let h = 1e-5 * x.abs().max(1.0);
            let d = fd(h)?;
            let a = g.data[idx];
            let tol = |v: f64| 1e-5 * v.abs().max(1.0);
            if (a - d).abs() > tol(d) && !(a.is_nan() && d.is_nan()) {
                let d4 = fd(h / 4.0)?;
                if (d4 - d).abs() > tol(d) / 4.0 || !d.is_finite() {
                    row.kinks += 1;
                    continue;
                }
                if row.failure.is_none() {
                    row.failure = Some(format!(
                        "element {idx} of `{name}`: gradient {a:.9e}, finite difference {d:.9e} (step {h:.0e}; {d4:.9e} at step {:.1e})",
                        h / 4.0
                    ));
                }
            }
            row.checked += 1;
            row.worst = row.worst.max((a - d).abs());
            row.scale = row.scale.max(d.abs());
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The all-ones cotangent: gradients of the output's sum.
pub fn ones_like_output(k: &Kernel, dims: &Bindings) -> Tensor {
    let shape = dims.shape(k.output());
    let n = shape.iter().product();
    Tensor::new(shape, vec![1.0; n])
}
