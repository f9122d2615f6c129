//! The backward pass: every example's gradients (the reference backward derived from the
//! spec) against central finite differences of the f64 reference forward, on small awkward
//! shapes; the softmax family against the FlashAttention-2 formulas; masked rows and NaN.

use attnc::dsl::Checked;
use attnc::ir::reference::Tensor;
use attnc::ir::Bindings;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::BTreeMap;
mod common;
use common::examples;

/// Small shapes: square, cross attention with grouped heads and two batches, decode, and
/// more queries than keys (rows with no live key under a causal mask).
const PROFILES: &[(&str, &[(&str, i64)])] = &[
    ("basic", &[("B", 1), ("H", 2), ("G", 2), ("N", 13), ("M", 13), ("D", 4), ("Dv", 4), ("K", 2), ("P", 5), ("MP", 3)]),
    ("cross_gqa_b2", &[("B", 2), ("H", 4), ("G", 2), ("N", 7), ("M", 19), ("D", 4), ("Dv", 6), ("K", 3), ("P", 5), ("MP", 3)]),
    ("decode", &[("B", 1), ("H", 2), ("G", 2), ("N", 1), ("M", 17), ("D", 4), ("Dv", 4), ("K", 1), ("P", 5), ("MP", 3)]),
    ("masked_rows", &[("B", 1), ("H", 1), ("G", 1), ("N", 20), ("M", 10), ("D", 4), ("Dv", 4), ("K", 1), ("P", 5), ("MP", 3)]),
];

fn setup(c: &Checked, dims: &[(&str, i64)], seed: u64) -> Option<(Bindings, BTreeMap<String, Tensor>, Tensor)> {
    let given: BTreeMap<String, i64> = dims.iter().filter(|(d, _)| c.info.free_dims.iter().any(|f| f == d)).map(|(d, v)| (d.to_string(), *v)).collect();
    let b = attnc::bind_dims(c, &given).ok()?;
    let ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, seed).ok()?;
    let shape = b.shape(c.kernel.output());
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1000);
    let n = shape.iter().product();
    let dout = Tensor::new(shape, (0..n).map(|_| StandardNormal.sample(&mut rng)).collect());
    Some((b, ins, dout))
}

#[test]
fn every_example_matches_finite_differences() {
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (name, c) in examples() {
        let mut ran = 0;
        for (profile, dims) in PROFILES {
            let Some((b, ins, dout)) = setup(&c, dims, 11) else { continue };
            let grads = match attnc::ir::grad::grad(&c.kernel, &b, &ins, &dout) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{name} [{profile}]: {e}"));
                    continue;
                }
            };
            ran += 1;
            let rows = attnc::grad::finite_differences(&c.kernel, &b, &ins, &dout, &grads, 12, 5).expect("forward runs");
            for r in rows {
                if let Some(f) = &r.failure {
                    failures.push(format!("{name} [{profile}]: {f}"));
                }
                // A kink now and then (a mask flipping within the step); not most elements.
                if r.kinks * 4 > r.checked + r.kinks {
                    failures.push(format!("{name} [{profile}]: `{}`: {} of {} elements at kinks", r.input, r.kinks, r.checked + r.kinks));
                }
                report.push(format!("{name} [{profile}] {}: {} checked, {} kinks, max |diff| {:.1e}", r.input, r.checked, r.kinks, r.worst));
            }
        }
        if ran == 0 {
            failures.push(format!("{name}: no profile fits"));
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(report.len() >= 100, "only {} input gradients were checked", report.len());
}

/// sdpa_causal's gradients by the FlashAttention-2 formulas, written out independently:
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`, `dQ = c·dS·K`, `dK = c·dSᵀ·Q`.
#[test]
fn causal_softmax_matches_the_flash_attention_2_formulas() {
    let c = examples().into_iter().find(|(n, _)| n == "sdpa_causal").expect("sdpa_causal").1;
    for (profile, dims) in PROFILES {
        let Some((b, ins, dout)) = setup(&c, dims, 3) else { continue };
        let (nb, nh, n, m, d, dv) =
            (b.dims["B"] as usize, b.dims["H"] as usize, b.dims["N"] as usize, b.dims["M"] as usize, b.dims["D"] as usize, b.dims["Dv"] as usize);
        let scale = 1.0 / (d as f64).sqrt();
        let (q, k, v) = (&ins["q"].data, &ins["k"].data, &ins["v"].data);
        let got = attnc::ir::grad::grad(&c.kernel, &b, &ins, &dout).expect("grad");
        let (mut dq, mut dk, mut dvv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        for bh in 0..nb * nh {
            let (qo, ko, vo, oo) = (bh * n * d, bh * m * d, bh * m * dv, bh * n * dv);
            for i in 0..n {
                let live: Vec<usize> = (0..m).filter(|&j| j + n <= i + m).collect();
                if live.is_empty() {
                    continue;
                }
                let s: Vec<f64> = live.iter().map(|&j| scale * (0..d).map(|r| q[qo + i * d + r] * k[ko + j * d + r]).sum::<f64>()).collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - mx).exp() / z).collect();
                let o: Vec<f64> = (0..dv).map(|e| live.iter().zip(&p).map(|(&j, pj)| pj * v[vo + j * dv + e]).sum()).collect();
                let di: f64 = (0..dv).map(|e| dout.data[oo + i * dv + e] * o[e]).sum();
                for (t, &j) in live.iter().enumerate() {
                    let dp: f64 = (0..dv).map(|e| dout.data[oo + i * dv + e] * v[vo + j * dv + e]).sum();
                    let ds = p[t] * (dp - di);
                    for e in 0..dv {
                        dvv[vo + j * dv + e] += p[t] * dout.data[oo + i * dv + e];
                    }
                    for r in 0..d {
                        dq[qo + i * d + r] += scale * ds * k[ko + j * d + r];
                        dk[ko + j * d + r] += scale * ds * q[qo + i * d + r];
                    }
                }
            }
        }
        for (name, want) in [("q", dq), ("k", dk), ("v", dvv)] {
            for (x, (a, w)) in got[name].data.iter().zip(&want).enumerate() {
                assert!((a - w).abs() <= 1e-12 * w.abs().max(1.0), "[{profile}] d{name}[{x}]: {a} vs the FA2 formula's {w}");
            }
        }
    }
}

/// A row with no live key outputs zeros whatever the inputs, so its query gets no gradient;
/// keys no row sees get none either.
#[test]
fn rows_without_live_keys_have_zero_gradients() {
    let c = examples().into_iter().find(|(n, _)| n == "sdpa_causal").expect("sdpa_causal").1;
    // N = 20 queries over M = 10 keys, causal aligned at the end: rows 0..10 see no key.
    let (b, ins, dout) = setup(&c, PROFILES[3].1, 4).expect("fits");
    let g = attnc::ir::grad::grad(&c.kernel, &b, &ins, &dout).expect("grad");
    let d = b.dims["D"] as usize;
    assert!(g["q"].data[..10 * d].iter().all(|x| *x == 0.0), "masked rows have gradient 0");
    assert!(g["q"].data[10 * d..].iter().any(|x| *x != 0.0), "live rows have a gradient");
}

/// A NaN query makes its row's output NaN: its row's gradients and every key and value that
/// row reads become NaN; rows that never read it stay finite.
#[test]
fn nan_propagates_through_the_backward() {
    let c = examples().into_iter().find(|(n, _)| n == "sdpa_causal").expect("sdpa_causal").1;
    let (b, mut ins, dout) = setup(&c, PROFILES[0].1, 6).expect("fits");
    let d = b.dims["D"] as usize;
    let row = 5;
    ins.get_mut("q").expect("q").data[row * d] = f64::NAN;
    let g = attnc::ir::grad::grad(&c.kernel, &b, &ins, &dout).expect("grad");
    assert!(g["q"].data[row * d..(row + 1) * d].iter().all(|x| x.is_nan()), "the NaN row's query gradient is NaN");
    assert!(g["q"].data[..row * d].iter().all(|x| x.is_finite()), "earlier rows stay finite");
    // Keys 0..=row are read by the NaN row (causal): NaN; later keys are not: finite.
    assert!(g["k"].data[..d].iter().all(|x| x.is_nan()));
    assert!(g["k"].data[(row + 1) * d..13 * d].iter().all(|x| x.is_finite()));
    // The compiled backward: NaN exactly where the reference has it.
    let cg = attnc::grad::compiled(&c.kernel, &b, &ins, &dout, &attnc::codegen::cpu::CpuOptions::default()).expect("compiled grad");
    for (name, w) in &g {
        let nan = |t: &attnc::ir::reference::Tensor| t.data.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
        assert_eq!(nan(&cg[name]), nan(w), "`{name}`: NaN where the reference has it");
    }
}

/// On every example the compiled backward covers: a NaN in the first float input (the
/// queries, mostly) makes the compiled gradients NaN exactly where the reference's are.
#[test]
fn compiled_backward_nan_pattern_matches_the_reference_on_every_covered_example() {
    let (mut failures, mut checked) = (Vec::new(), 0);
    for (name, c) in examples() {
        if attnc::grad::backward_plan(&c.kernel).is_err() {
            continue;
        }
        let Some((b, mut ins, dout)) = setup(&c, PROFILES[0].1, 8) else { continue };
        let first = c.kernel.inputs().find(|t| !t.dtype.is_int()).expect("a float input").name.clone();
        let x = ins.get_mut(&first).expect("input");
        let at = x.data.len() / 3;
        x.data[at] = f64::NAN;
        let want = attnc::ir::grad::grad(&c.kernel, &b, &ins, &dout).expect("reference backward");
        let got = match attnc::grad::compiled(&c.kernel, &b, &ins, &dout, &attnc::codegen::cpu::CpuOptions::default()) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        checked += 1;
        for (input, w) in &want {
            let nan = |t: &attnc::ir::reference::Tensor| t.data.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
            let (g, w) = (nan(&got[input]), nan(w));
            if g != w {
                let n = g.iter().zip(&w).filter(|(a, b)| a != b).count();
                let first = g.iter().zip(&w).position(|(a, b)| a != b).expect("a difference");
                failures.push(format!(
                    "{name}: `{input}` NaN in {n} elements where the reference differs ({} NaN there, {} here; first at {first}: reference NaN {})",
                    w.iter().filter(|x| **x).count(),
                    g.iter().filter(|x| **x).count(),
                    w[first]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(checked >= 25, "only {checked} examples checked");
}

/// The forward's saved statistics (what a backward reads: each row's softmax log-sum-exp, or
/// its linear denominator) from every CPU algorithm (tiled with the default and with small
/// tiles, the row kernel, chunked) against the reference's, on every example and profile;
/// plus a NaN among the values, which sends the tiled kernel to its row fallback.
#[test]
fn saved_statistics_match_the_reference_on_every_cpu_algorithm() {
    use attnc::codegen::cpu::{CpuBackend, CpuOptions};
    use attnc::codegen::schedule::ScheduleOptions;
    use attnc::codegen::{Backend, Compiled};
    let schedules = [
        ("default", ScheduleOptions::default()),
        ("small tiles", ScheduleOptions { block_q: 16, block_k: 32, chunk: 0, ..Default::default() }),
        ("rows", ScheduleOptions { tiled: false, chunk: 0, ..Default::default() }),
        ("chunk 7", ScheduleOptions { chunk: 7, ..Default::default() }),
    ];
    let (mut failures, mut compared, mut finite, mut dead) = (Vec::new(), 0usize, 0usize, 0usize);
    for (name, c) in examples() {
        for (profile, dims) in PROFILES {
            let Some((b, mut ins, _)) = setup(&c, dims, 5) else { continue };
            if *profile == "decode" {
                // A NaN value: the tiled kernel reruns on its row kernel, which saves the statistics too.
                if let Some(t) = attnc::codegen::host::value_tensors(&c.kernel).first().and_then(|v| ins.get_mut(v)) {
                    t.data[0] = f64::NAN;
                }
            }
            let (_, want) = attnc::ir::reference::run_with_stats(&c.kernel, &b, &ins).expect("the reference runs");
            for (sname, s) in &schedules {
                let kern = match CpuBackend::default().compile(&c.kernel, &c.info, &CpuOptions::with_schedule(s.clone())) {
                    Ok(k) => k,
                    Err(e) => {
                        failures.push(format!("{name} [{profile}, {sname}]: {e}"));
                        continue;
                    }
                };
                let (_, got) = match kern.run_with_stats(&ins, &b.dims) {
                    Ok(x) => x,
                    Err(e) => {
                        failures.push(format!("{name} [{profile}, {sname}]: {e}"));
                        continue;
                    }
                };
                assert_eq!(got.shape, want.shape, "{name} [{profile}, {sname}]");
                for (n, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
                    compared += 1;
                    let ok = if w.is_finite() {
                        finite += 1;
                        (g - w).abs() <= 2e-4 * w.abs().max(1.0)
                    } else {
                        dead += 1;
                        g == w
                    };
                    if !ok {
                        failures.push(format!("{name} [{profile}, {sname}] ({}): statistic {n} is {g}, reference {w}", kern.describe()));
                        break;
                    }
                }
            }
        }
    }
    eprintln!("{compared} statistics compared ({finite} finite, {dead} of rows with no live key)");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(finite > 10_000 && dead > 100, "too few statistics compared: {finite} finite, {dead} −inf");
}

/// The compiled backward (the backward kernels of `attnc_ir::backward` on the CPU, tiled and
/// on the row kernel) against the reference backward, on every example it covers and every
/// profile; the others are refused with a reason.
#[test]
fn compiled_backward_matches_the_reference_backward() {
    use attnc::codegen::cpu::CpuOptions;
    use attnc::codegen::schedule::ScheduleOptions;
    // Tiled with the microkernel (a map's exp(s − lse) in the weights routines), tiled in
    // generated code (the same exp in the rows), 16×32 tiles (key tiles wider than query
    // tiles, a tail on every shape), and the row kernel.
    let schedules = [
        ("default", CpuOptions::default()),
        ("generated", CpuOptions { microkernel: false, ..CpuOptions::default() }),
        ("16x32", CpuOptions::with_schedule(ScheduleOptions { block_q: 16, block_k: 32, ..Default::default() })),
        ("rows", CpuOptions::with_schedule(ScheduleOptions { tiled: false, chunk: 0, ..Default::default() })),
    ];
    let (mut failures, mut covered, mut refused, mut compared) = (Vec::new(), Vec::new(), Vec::new(), 0usize);
    // Beyond the examples: a score nonlinear in its dot under a bias (which the backward
    // kernels move into their maps), with a pointwise map and with a softmax post-map.
    let softcapped = |norm: &str| {
        format!(
            "attention softcap_alibi {{
               dims B, H, N, M, D, Dv
               input q: f32[B, H, N, D]
               input k: f32[B, H, M, D]
               input v: f32[B, H, M, Dv]
               input slope: f32[H]
               output o: f32[B, H, N, Dv]
               score = 5.0 * tanh(dot(q[b, h, i, :], k[b, h, j, :]) / sqrt(D) / 5.0)
               bias = -slope[h] * (p - j)
               mask = j <= p
               normalize = {norm}
               value = v[b, h, j, e]
             }}"
        )
    };
    // And a table read per pair along two axes (the fold's element unflattened over both).
    let rel2d = "attention rel2d {
                   dims B, H, G, N, M, D, Dv
                   input q: f32[B, H, N, D]
                   input k: f32[B, G, M, D]
                   input v: f32[B, G, M, Dv]
                   input rpb: f32[H, 7, 5]
                   output o: f32[B, H, N, Dv]
                   require H % G == 0
                   score = dot(q[b, h, i, :], k[b, h // (H // G), j, :])
                   bias = rpb[h, (p // 4 - j // 4) % 7, (p % 4 - j % 4) % 5]
                   value = v[b, h // (H // G), j, e]
                 }"
    .to_string();
    let extra = [
        ("softcap_alibi_sigmoid", softcapped("sigmoid")),
        ("softcap_alibi_clipped", softcapped("softmax(post = clamp(1.003 * w - 0.003, 0.0, 1.0))")),
        ("rel2d", rel2d),
    ]
    .map(|(n, src)| (n.to_string(), attnc::dsl::compile(&src).unwrap_or_else(|d| panic!("{n}: {}", d.message))));
    for (name, c) in examples().into_iter().chain(extra) {
        if let Err(why) = attnc::grad::backward_plan(&c.kernel) {
            refused.push(format!("{name}: {why}"));
            continue;
        }
        covered.push(name.clone());
        for (profile, dims) in PROFILES {
            let Some((b, ins, dout)) = setup(&c, dims, 21) else { continue };
            let want = attnc::ir::grad::grad(&c.kernel, &b, &ins, &dout).expect("reference backward");
            for (sname, o) in &schedules {
                let got = match attnc::grad::compiled(&c.kernel, &b, &ins, &dout, o) {
                    Ok(g) => g,
                    Err(e) => {
                        failures.push(format!("{name} [{profile}, {sname}]: {e}"));
                        continue;
                    }
                };
                for (input, w) in &want {
                    let g = &got[input];
                    // gpsa's positional logits reach |vpos|·2·13² ≈ 300 on its 14×14 grid, where
                    // f32 holds them to ~2e-5, and `vpos`'s gradient sums terms ~10² times its
                    // size (the partials are grid distances): f32 gives ~1e-3 of it (the row
                    // kernel as much as the tiled one).
                    let rel = if (name.as_str(), input.as_str()) == ("gpsa", "vpos") { 5e-3 } else { 1e-4 };
                    let scale = w.data.iter().fold(1f64, |a, x| a.max(x.abs()));
                    compared += w.data.len();
                    if let Some((n, (x, y))) =
                        g.data.iter().zip(&w.data).enumerate().find(|(_, (x, y))| !((*x - *y).abs() <= rel * scale || (x.is_nan() && y.is_nan())))
                    {
                        failures.push(format!("{name} [{profile}, {sname}] `{input}` element {n}: compiled {x}, reference {y} (scale {scale:.2e})"));
                    }
                }
            }
        }
    }
    eprintln!("covered ({}): {}\nrefused:\n{}\n{compared} gradient elements compared", covered.len(), covered.join(", "), refused.join("\n"));
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(covered.len() >= 23, "only {} specs have a compiled backward", covered.len());
}
