//! The reference interpreter against independent, hand-written formulas.
//!
//! Every example spec in `examples/` is run through `attnc::ir::reference::run` and compared
//! with a direct f64 implementation of the variant written from `shared/variants.md` (not
//! from the interpreter): the full score matrix of each `(b, h)` row by row, bias, mask,
//! a plain two-pass softmax (or the variant's normalizer), decay, aggregation and gate.
//! Linear, GLA, RetNet and channel attention are also checked in a different evaluation
//! order (associative / recurrent / transposed), which is a genuinely independent route.
//!
//! Shapes are the awkward ones of variants.md: lengths that are not multiples of 64, decode
//! (N = 1), N ≠ M, N > M (rows that see no key), B = 2, G < H, one D = 64 case, the full
//! grids, logits of magnitude 1e4 and NaN inputs.
#![allow(clippy::needless_range_loop, clippy::type_complexity)] // index loops mirror the math

use attnc::ir::reference::Tensor;
use std::collections::BTreeMap;
use std::time::Instant;

type Inputs = BTreeMap<String, Tensor>;

// ------------------------------------------------------------------------------------------
// Shapes, cases and the driver
// ------------------------------------------------------------------------------------------

/// The sizes of one case. `g`, `m`, `d` and `dv` are re-read from the generated inputs (so
/// specs without a `G` dim, or with fixed head dims, need no special handling).
#[derive(Clone, Copy, Debug)]
struct Sh {
    b: usize,
    h: usize,
    g: usize,
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
}

#[allow(clippy::too_many_arguments)]
const fn sh(b: usize, h: usize, g: usize, n: usize, m: usize, d: usize, dv: usize) -> Sh {
    Sh { b, h, g, n, m, d, dv }
}

impl Sh {
    /// Bottom-right aligned position of query row `i` in the key sequence.
    fn p(&self, i: usize) -> i64 {
        i as i64 + self.m as i64 - self.n as i64
    }
    /// The kv head of query head `h`.
    fn hk(&self, h: usize) -> usize {
        h / (self.h / self.g)
    }
    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
}

enum Tweak {
    /// Multiply a whole input by a factor.
    Scale(&'static str, f64),
    /// Put a NaN at one element of an input.
    Nan(&'static str, Vec<usize>),
    /// Any other change of the inputs.
    Set(Box<dyn Fn(&Sh, &mut Inputs)>),
}

type Where = Box<dyn Fn(usize, usize, usize, usize) -> bool>;

enum Expect {
    /// Every output element is finite.
    Finite,
    /// Finite, and at least one output row is all zeros (a row that sees no key).
    FiniteWithEmptyRows,
    /// The output is NaN exactly where the predicate `(b, h, n, e)` holds.
    NanWhere(Where),
    /// Some but not all outputs are NaN (the exact pattern is compared element by element).
    SomeNan,
}

struct Case {
    label: String,
    sh: Sh,
    extra: Vec<(&'static str, i64)>,
    tweaks: Vec<Tweak>,
    expect: Expect,
}

fn case(label: &str, sh: Sh) -> Case {
    Case { label: label.to_string(), sh, extra: Vec::new(), tweaks: Vec::new(), expect: Expect::Finite }
}

impl Case {
    fn dim(mut self, name: &'static str, v: i64) -> Case {
        self.extra.push((name, v));
        self
    }
    fn scale(mut self, input: &'static str, f: f64) -> Case {
        self.tweaks.push(Tweak::Scale(input, f));
        self
    }
    fn nan(mut self, input: &'static str, idx: &[usize]) -> Case {
        self.tweaks.push(Tweak::Nan(input, idx.to_vec()));
        self
    }
    fn set(mut self, f: impl Fn(&Sh, &mut Inputs) + 'static) -> Case {
        self.tweaks.push(Tweak::Set(Box::new(f)));
        self
    }
    fn expect(mut self, e: Expect) -> Case {
        self.expect = e;
        self
    }
    fn empty_rows(self) -> Case {
        self.expect(Expect::FiniteWithEmptyRows)
    }
    fn nan_where(self, f: impl Fn(usize, usize, usize, usize) -> bool + 'static) -> Case {
        self.expect(Expect::NanWhere(Box::new(f)))
    }
    /// Exactly the output row `(b, h, i)` is NaN.
    fn nan_row(self, b: usize, h: usize, i: usize) -> Case {
        self.nan_where(move |bb, hh, ii, _| (bb, hh, ii) == (b, h, i))
    }
}

type Formula = fn(&Sh, &Inputs) -> Tensor;

fn load(name: &str) -> attnc::dsl::Checked {
    let path = format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).unwrap();
    attnc::dsl::compile(&src).unwrap_or_else(|d| panic!("{}", d.render(&path, &src)))
}

fn dims_for(c: &attnc::dsl::Checked, sh: &Sh, extra: &[(&str, i64)]) -> BTreeMap<String, i64> {
    let mut dims = BTreeMap::new();
    for d in &c.info.free_dims {
        let v = match d.as_str() {
            "B" => sh.b,
            "H" => sh.h,
            "G" => sh.g,
            "N" => sh.n,
            "M" => sh.m,
            "D" => sh.d,
            "Dv" => sh.dv,
            other => match extra.iter().find(|(k, _)| *k == other) {
                Some((_, v)) => *v as usize,
                None => panic!("no size given for the free dim `{other}`"),
            },
        };
        dims.insert(d.clone(), v as i64);
    }
    dims
}

fn flat(t: &Tensor, idx: &[usize]) -> usize {
    assert_eq!(idx.len(), t.shape.len(), "index rank for shape {:?}", t.shape);
    let mut off = 0;
    for (k, &ix) in idx.iter().enumerate() {
        assert!(ix < t.shape[k], "index {idx:?} outside shape {:?}", t.shape);
        off = off * t.shape[k] + ix;
    }
    off
}

fn close(ours: f64, refr: f64) -> bool {
    (ours.is_nan() && refr.is_nan()) || ours == refr || (ours - refr).abs() <= 1e-9 * (1.0 + ours.abs())
}

fn unflat(shape: &[usize], mut f: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        idx[k] = f % shape[k];
        f /= shape[k];
    }
    idx
}

/// Element-wise comparison; NaN equals NaN.
fn compare(what: &str, ours: &Tensor, refr: &Tensor) {
    assert_eq!(ours.shape, refr.shape, "{what}: output shapes differ");
    let bad: Vec<usize> = (0..ours.data.len()).filter(|&f| !close(ours.data[f], refr.data[f])).collect();
    if !bad.is_empty() {
        let mut msg = format!("{what}: {} of {} outputs differ from the formula; first ones (index: formula vs reference):", bad.len(), ours.data.len());
        for &f in bad.iter().take(8) {
            msg += &format!("\n  {:?}: {:e} vs {:e}", unflat(&ours.shape, f), ours.data[f], refr.data[f]);
        }
        panic!("{msg}");
    }
}

fn check_expect(what: &str, out: &Tensor, expect: &Expect, who: &str) {
    let n_nan = out.data.iter().filter(|x| x.is_nan()).count();
    match expect {
        Expect::Finite | Expect::FiniteWithEmptyRows => {
            assert!(out.data.iter().all(|x| x.is_finite()), "{what}: the {who} output has {n_nan} NaN / some infinite values");
            if let Expect::FiniteWithEmptyRows = expect {
                let dv = *out.shape.last().unwrap();
                let empty = out.data.chunks(dv).filter(|r| r.iter().all(|&x| x == 0.0));
                assert!(empty.count() > 0, "{what}: the {who} output has no all-zero row");
            }
        }
        Expect::NanWhere(f) => {
            assert!(n_nan > 0, "{what}: the {who} output has no NaN");
            for (k, x) in out.data.iter().enumerate() {
                let ix = unflat(&out.shape, k);
                let want = f(ix[0], ix[1], ix[2], ix[3]);
                assert_eq!(x.is_nan(), want, "{what}: the {who} output at {ix:?} is {x}, expected {}", if want { "NaN" } else { "not NaN" });
                assert!(x.is_nan() || x.is_finite(), "{what}: {who} {ix:?} is {x}");
            }
        }
        Expect::SomeNan => {
            assert!(n_nan > 0 && n_nan < out.data.len(), "{what}: the {who} output has {n_nan} NaN of {}", out.data.len());
        }
    }
}

/// Runs every case of one spec through the reference interpreter and the formula.
fn check(name: &str, cases: Vec<Case>, formula: Formula) {
    let c = load(name);
    for (ci, case) in cases.into_iter().enumerate() {
        let what = format!("{name} [{}]", case.label);
        let dims = dims_for(&c, &case.sh, &case.extra);
        let bind = attnc::bind_dims(&c, &dims).unwrap_or_else(|e| panic!("{what}: {e}"));
        let seed = 1000 + ci as u64;
        let mut x = attnc::inputs::random_inputs(&c.kernel, &bind, &c.ranges, seed).unwrap_or_else(|e| panic!("{what}: {e}"));
        // The sizes the formulas use come from the tensors themselves.
        let mut s = case.sh;
        s.m = x["k"].shape[2];
        s.g = x["k"].shape[1];
        s.d = x["q"].shape[3];
        s.dv = x["v"].shape[3];
        assert_eq!(x["q"].shape[..3], [s.b, s.h, s.n], "{what}: q shape");
        assert_eq!(s.h % s.g, 0, "{what}: G must divide H");
        for t in &case.tweaks {
            match t {
                Tweak::Scale(input, f) => {
                    let t = x.get_mut(*input).unwrap();
                    t.data.iter_mut().for_each(|v| *v *= f);
                }
                Tweak::Nan(input, idx) => {
                    let t = x.get_mut(*input).unwrap();
                    let f = flat(t, idx);
                    t.data[f] = f64::NAN;
                }
                Tweak::Set(f) => f(&s, &mut x),
            }
        }
        let t0 = Instant::now();
        let refr =
            attnc::ir::reference::run(&c.kernel, &c.info, &x, &BTreeMap::new()).unwrap_or_else(|e| panic!("{what}: the reference interpreter failed: {e}"));
        let t_ref = t0.elapsed();
        let ours = formula(&s, &x);
        check_expect(&what, &ours, &case.expect, "formula");
        compare(&what, &ours, &refr);
        check_expect(&what, &refr, &case.expect, "reference");
        eprintln!("{what}: ok (reference {t_ref:.2?})");
    }
}

// ------------------------------------------------------------------------------------------
// Shared pieces of the formulas
// ------------------------------------------------------------------------------------------

fn get(t: &Tensor, idx: &[usize]) -> f64 {
    t.data[flat(t, idx)]
}

/// The last-axis vector `t[lead.., :]`.
fn vecat<'a>(t: &'a Tensor, lead: &[usize]) -> &'a [f64] {
    assert_eq!(lead.len() + 1, t.shape.len());
    let last = *t.shape.last().unwrap();
    let mut off = 0;
    for (k, &ix) in lead.iter().enumerate() {
        assert!(ix < t.shape[k], "index {lead:?} outside shape {:?}", t.shape);
        off = off * t.shape[k] + ix;
    }
    &t.data[off * last..(off + 1) * last]
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// max that propagates NaN.
fn nmax(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

/// relu that propagates NaN.
fn relu(x: f64) -> f64 {
    if x.is_nan() {
        x
    } else {
        x.max(0.0)
    }
}

fn elu(x: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        x.exp() - 1.0
    }
}

/// `q[b,h,i,:] · k[b,hk,j,:]`, unscaled.
fn qk(x: &Inputs, s: &Sh, b: usize, h: usize, i: usize, j: usize) -> f64 {
    dot(vecat(&x["q"], &[b, h, i]), vecat(&x["k"], &[b, s.hk(h), j]))
}

/// The default score `scale · q_i·k_j`.
fn score(x: &Inputs, s: &Sh, b: usize, h: usize, i: usize, j: usize) -> f64 {
    qk(x, s, b, h, i, j) * s.scale()
}

/// Plain two-pass softmax over the live entries (`None` = masked), the max subtracted;
/// `sink` adds `exp(sink)` to the denominator. All masked gives all `None`.
fn softmax(s: &[Option<f64>], sink: Option<f64>) -> Vec<Option<f64>> {
    let live: Vec<f64> = s.iter().flatten().copied().collect();
    if live.is_empty() {
        return vec![None; s.len()];
    }
    let mut mx = live.iter().fold(f64::NEG_INFINITY, |a, &b| nmax(a, b));
    if let Some(z) = sink {
        mx = nmax(mx, z);
    }
    let mut den: f64 = live.iter().map(|&v| (v - mx).exp()).sum();
    if let Some(z) = sink {
        den += (z - mx).exp();
    }
    s.iter().map(|v| v.map(|v| (v - mx).exp() / den)).collect()
}

/// The row-wise attention every variant but GLA / linear / channel reduces to:
/// `o[b,h,i,:] = gate(b,h,i,e) · Σ_j w_j · v[b,hk,j,:]` over the live keys (`Some` weights);
/// a row with no live key is all zeros (the gate is not applied).
fn attend(s: &Sh, x: &Inputs, weights: impl Fn(usize, usize, usize) -> Vec<Option<f64>>, gate: impl Fn(usize, usize, usize, usize) -> f64) -> Tensor {
    let v = &x["v"];
    let mut o = Tensor::zeros(vec![s.b, s.h, s.n, s.dv]);
    for b in 0..s.b {
        for h in 0..s.h {
            for i in 0..s.n {
                let w = weights(b, h, i);
                assert_eq!(w.len(), s.m);
                if w.iter().all(Option::is_none) {
                    continue;
                }
                for e in 0..s.dv {
                    let mut acc = 0.0;
                    for (j, wj) in w.iter().enumerate() {
                        if let Some(wj) = wj {
                            acc += wj * get(v, &[b, s.hk(h), j, e]);
                        }
                    }
                    let f = flat(&o, &[b, h, i, e]);
                    o.data[f] = acc * gate(b, h, i, e);
                }
            }
        }
    }
    o
}

fn no_gate(_: usize, _: usize, _: usize, _: usize) -> f64 {
    1.0
}

/// Per key: `Some(f(j))` where `live(j)`, else `None`.
fn row(m: usize, live: impl Fn(usize) -> bool, f: impl Fn(usize) -> f64) -> Vec<Option<f64>> {
    (0..m).map(|j| live(j).then(|| f(j))).collect()
}

fn causal(s: &Sh, i: usize, j: usize) -> bool {
    j as i64 <= s.p(i)
}

/// Grid helpers: row-major flattening of a `? × gw` grid.
fn manhattan(a: i64, c: i64, gw: i64) -> i64 {
    (a / gw - c / gw).abs() + (a % gw - c % gw).abs()
}

// ------------------------------------------------------------------------------------------
// The formulas, one per example (written from shared/variants.md)
// ------------------------------------------------------------------------------------------

mod f {
    use super::*;

    /// `softmax_j(s_ij)`, no mask.
    pub fn sdpa(s: &Sh, x: &Inputs) -> Tensor {
        attend(s, x, |b, h, i| softmax(&row(s.m, |_| true, |j| score(x, s, b, h, i, j)), None), no_gate)
    }

    /// `softmax_j(s_ij)` over `j <= p_i` (also gqa_causal: the kv head is `h / (H/G)`).
    pub fn sdpa_causal(s: &Sh, x: &Inputs) -> Tensor {
        attend(s, x, |b, h, i| softmax(&row(s.m, |j| causal(s, i, j), |j| score(x, s, b, h, i, j)), None), no_gate)
    }

    /// Causal; streaming heads keep `p_i - j < 256 || j < 4`.
    pub fn sliding_window_sink(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let streaming = get(&x["streaming"], &[h]) != 0.0;
                let p = s.p(i);
                let live = |j: usize| {
                    let j = j as i64;
                    j <= p && (!streaming || p - j < 256 || j < 4)
                };
                softmax(&row(s.m, live, |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }

    /// Causal, `s_ij - slope[h]·(p_i - j)`.
    pub fn alibi(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let slope = get(&x["slope"], &[h]);
                let p = s.p(i);
                softmax(&row(s.m, |j| causal(s, i, j), |j| score(x, s, b, h, i, j) - slope * (p - j as i64) as f64), None)
            },
            no_gate,
        )
    }

    /// Causal and `seg[b,i] == seg[b,j]` (N = M).
    pub fn document_mask(s: &Sh, x: &Inputs) -> Tensor {
        assert_eq!(s.n, s.m);
        attend(
            s,
            x,
            |b, h, i| {
                let seg = |t: usize| get(&x["seg"], &[b, t]) as i64;
                softmax(&row(s.m, |j| j <= i && seg(i) == seg(j), |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }

    /// Key visible iff `j <= i` or `j < prefix[b]` (N = M).
    pub fn prefix_lm(s: &Sh, x: &Inputs) -> Tensor {
        assert_eq!(s.n, s.m);
        attend(
            s,
            x,
            |b, h, i| {
                let prefix = get(&x["prefix"], &[b]) as i64;
                softmax(&row(s.m, |j| j <= i || (j as i64) < prefix, |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }

    /// `softmax(s_ij + bias[b,h,i,j])`, no mask.
    pub fn dense_bias(s: &Sh, x: &Inputs) -> Tensor {
        attend(s, x, |b, h, i| softmax(&row(s.m, |_| true, |j| score(x, s, b, h, i, j) + get(&x["bias"], &[b, h, i, j])), None), no_gate)
    }

    /// Causal, score `50·tanh(s_ij/50)`.
    pub fn softcap(s: &Sh, x: &Inputs) -> Tensor {
        attend(s, x, |b, h, i| softmax(&row(s.m, |j| causal(s, i, j), |j| 50.0 * (score(x, s, b, h, i, j) / 50.0).tanh()), None), no_gate)
    }

    /// Causal, `exp(s_ij) / (exp(sink[h]) + Σ_j exp(s_ij))`.
    pub fn sink_softmax(s: &Sh, x: &Inputs) -> Tensor {
        attend(s, x, |b, h, i| softmax(&row(s.m, |j| causal(s, i, j), |j| score(x, s, b, h, i, j)), Some(get(&x["sink"], &[h]))), no_gate)
    }

    /// `clamp(1.003·softmax(s) - 0.003, 0, 1)`, no mask, `o_i *= sigmoid(gate[b,h,i])`.
    pub fn clipped_softmax(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                softmax(&row(s.m, |_| true, |j| score(x, s, b, h, i, j)), None)
                    .into_iter()
                    .map(|w| {
                        w.map(|w| {
                            let c = 1.003 * w - 0.003;
                            if c.is_nan() {
                                c
                            } else {
                                c.clamp(0.0, 1.0)
                            }
                        })
                    })
                    .collect()
            },
            |b, h, i, _| sigmoid(get(&x["gate"], &[b, h, i])),
        )
    }

    /// Softmax with `scale = 1/sqrt(192)`, one kv head, D = 576, Dv = 512, no mask.
    pub fn mla_decode(s: &Sh, x: &Inputs) -> Tensor {
        assert_eq!((s.d, s.dv, s.g), (576, 512, 1));
        attend(s, x, |b, h, i| softmax(&row(s.m, |_| true, |j| qk(x, s, b, h, i, j) / 192f64.sqrt()), None), no_gate)
    }

    /// Swin shifted windows on a 16×16 grid, window 8, shift 4, relative position bias.
    pub fn swin_window(s: &Sh, x: &Inputs) -> Tensor {
        // torch.roll by -4: the pixel at (r, c) moves to ((r - 4) mod 16, (c - 4) mod 16).
        let rolled = |t: i64| ((t / 16 - 4).rem_euclid(16), (t % 16 - 4).rem_euclid(16));
        // Swin's shifted-window mask regions of the rolled image: [0,8), [8,12), [12,16).
        let region = |a: i64| {
            if a < 8 {
                0
            } else if a < 12 {
                1
            } else {
                2
            }
        };
        let same = |a: i64, c: i64| a / 8 == c / 8 && region(a) == region(c);
        attend(
            s,
            x,
            |b, h, i| {
                let (ri, ci) = rolled(s.p(i));
                let live = |j: usize| {
                    let (rj, cj) = rolled(j as i64);
                    same(ri, rj) && same(ci, cj)
                };
                let biased = |j: usize| {
                    let (rj, cj) = rolled(j as i64);
                    let idx = (ri - rj + 7) * 15 + (ci - cj + 7);
                    score(x, s, b, h, i, j) + get(&x["rpb"], &[h, idx as usize])
                };
                softmax(&row(s.m, live, biased), None)
            },
            no_gate,
        )
    }

    /// NATTEN neighbourhood along one axis of length `l`: kernel 7, dilation 2.
    fn natten_near(xq: i64, y: i64, l: i64) -> bool {
        let g = xq % 2;
        let lg = (l - g + 1) / 2;
        let start = (xq / 2 - 3).max(0).min(lg - 7);
        y % 2 == g && start <= y / 2 && y / 2 < start + 7
    }

    /// 2-D dilated neighbourhood attention on a 32×32 grid.
    pub fn neighborhood_2d(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let p = s.p(i);
                let live = |j: usize| {
                    let j = j as i64;
                    natten_near(p / 32, j / 32, 32) && natten_near(p % 32, j % 32, 32)
                };
                softmax(&row(s.m, live, |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }

    /// Causal; block `i/64` sees block `j/64` iff equal or the gap is a power of two.
    pub fn power_attention(s: &Sh, x: &Inputs) -> Tensor {
        assert_eq!(s.n, s.m);
        attend(
            s,
            x,
            |b, h, i| {
                let live = |j: usize| {
                    let gap = i / 64 - j.min(i) / 64;
                    j <= i && (gap == 0 || gap.is_power_of_two())
                };
                softmax(&row(s.m, live, |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }

    /// Causal; block `i/64` sees its own block and the (non-negative) listed blocks.
    pub fn block_sparse(s: &Sh, x: &Inputs) -> Tensor {
        assert_eq!(s.n, s.m);
        let blocks = &x["blocks"];
        attend(
            s,
            x,
            |b, h, i| {
                let listed: Vec<i64> = vecat(blocks, &[b, h, i / 64]).iter().map(|&c| c as i64).filter(|&c| c >= 0).collect();
                let live = |j: usize| j <= i && (j / 64 == i / 64 || listed.contains(&((j / 64) as i64)));
                softmax(&row(s.m, live, |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }

    /// Softmax over the keys in the query's grid row (16 wide).
    pub fn axial_rows(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let p = s.p(i);
                softmax(&row(s.m, |j| p / 16 == j as i64 / 16, |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }

    /// `o_i = Σ_{j≤p_i} gamma[h]^(p_i-j) s_ij v_j`, no normalization.
    pub fn retnet(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let gamma = get(&x["gamma"], &[h]);
                let p = s.p(i);
                row(s.m, |j| causal(s, i, j), |j| gamma.powi((p - j as i64) as i32) * score(x, s, b, h, i, j))
            },
            no_gate,
        )
    }

    /// RetNet again, by the recurrence `S_t = γ S_{t-1} + k_t v_tᵀ`, `o_i = scale · q_iᵀ S_{p_i}`.
    pub fn retnet_recurrent(s: &Sh, x: &Inputs) -> Tensor {
        let mut o = Tensor::zeros(vec![s.b, s.h, s.n, s.dv]);
        for b in 0..s.b {
            for h in 0..s.h {
                let gamma = get(&x["gamma"], &[h]);
                let mut st = vec![vec![0.0; s.dv]; s.d];
                let mut states = Vec::new();
                for t in 0..s.m {
                    let k = vecat(&x["k"], &[b, s.hk(h), t]);
                    let v = vecat(&x["v"], &[b, s.hk(h), t]);
                    for (dd, srow) in st.iter_mut().enumerate() {
                        for (e, se) in srow.iter_mut().enumerate() {
                            *se = gamma * *se + k[dd] * v[e];
                        }
                    }
                    states.push(st.clone());
                }
                for i in 0..s.n {
                    let p = s.p(i);
                    if p < 0 {
                        continue;
                    }
                    let q = vecat(&x["q"], &[b, h, i]);
                    let st = &states[p as usize];
                    for e in 0..s.dv {
                        let acc: f64 = (0..s.d).map(|dd| q[dd] * st[dd][e]).sum();
                        let f = flat(&o, &[b, h, i, e]);
                        o.data[f] = acc * s.scale();
                    }
                }
            }
        }
        o
    }

    /// GLA: `L = cumsum_t a`; `o_i = Σ_{j≤i} (Σ_d q_id k_jd exp(L_id - L_jd)) · scale · v_j`;
    /// `o_i *= silu(g_i)`.
    pub fn gla(s: &Sh, x: &Inputs) -> Tensor {
        assert_eq!((s.n, s.m, s.g), (s.m, s.n, s.h));
        let mut o = Tensor::zeros(vec![s.b, s.h, s.n, s.dv]);
        for b in 0..s.b {
            for h in 0..s.h {
                let mut l = vec![vec![0.0; s.d]; s.n];
                for t in 0..s.n {
                    for dd in 0..s.d {
                        let prev = if t == 0 { 0.0 } else { l[t - 1][dd] };
                        l[t][dd] = prev + get(&x["a"], &[b, h, t, dd]);
                    }
                }
                for i in 0..s.n {
                    let q = vecat(&x["q"], &[b, h, i]);
                    let mut acc = vec![0.0; s.dv];
                    for j in 0..=i {
                        let k = vecat(&x["k"], &[b, h, j]);
                        let sij: f64 = (0..s.d).map(|dd| q[dd] * k[dd] * (l[i][dd] - l[j][dd]).exp()).sum::<f64>() * s.scale();
                        let v = vecat(&x["v"], &[b, h, j]);
                        for e in 0..s.dv {
                            acc[e] += sij * v[e];
                        }
                    }
                    for (e, a) in acc.iter().enumerate() {
                        let f = flat(&o, &[b, h, i, e]);
                        o.data[f] = a * silu(get(&x["g"], &[b, h, i, e]));
                    }
                }
            }
        }
        o
    }

    /// GLA again, by the recurrence `S_t = diag(exp(a_t)) S_{t-1} + k_t v_tᵀ`,
    /// `o_t = scale · q_tᵀ S_t · silu(g_t)`.
    pub fn gla_recurrent(s: &Sh, x: &Inputs) -> Tensor {
        let mut o = Tensor::zeros(vec![s.b, s.h, s.n, s.dv]);
        for b in 0..s.b {
            for h in 0..s.h {
                let mut st = vec![vec![0.0; s.dv]; s.d];
                for t in 0..s.n {
                    let a = vecat(&x["a"], &[b, h, t]);
                    let k = vecat(&x["k"], &[b, h, t]);
                    let v = vecat(&x["v"], &[b, h, t]);
                    for (dd, srow) in st.iter_mut().enumerate() {
                        for (e, se) in srow.iter_mut().enumerate() {
                            *se = a[dd].exp() * *se + k[dd] * v[e];
                        }
                    }
                    let q = vecat(&x["q"], &[b, h, t]);
                    for e in 0..s.dv {
                        let acc: f64 = (0..s.d).map(|dd| q[dd] * st[dd][e]).sum();
                        let f = flat(&o, &[b, h, t, e]);
                        o.data[f] = acc * s.scale() * silu(get(&x["g"], &[b, h, t, e]));
                    }
                }
            }
        }
        o
    }

    /// Kernelized, non-causal, in the associative order:
    /// `o_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)·Σ_j φ(k_j) + 1e-6)`, `φ = elu + 1`.
    pub fn linear_elu(s: &Sh, x: &Inputs) -> Tensor {
        let phi = |v: &[f64]| v.iter().map(|&t| elu(t) + 1.0).collect::<Vec<f64>>();
        let mut o = Tensor::zeros(vec![s.b, s.h, s.n, s.dv]);
        for b in 0..s.b {
            for g in 0..s.g {
                // kv = Σ_j φ(k_j) v_jᵀ  [D × Dv],  z = Σ_j φ(k_j)  [D]
                let mut kv = vec![vec![0.0; s.dv]; s.d];
                let mut z = vec![0.0; s.d];
                for j in 0..s.m {
                    let pk = phi(vecat(&x["k"], &[b, g, j]));
                    let v = vecat(&x["v"], &[b, g, j]);
                    for dd in 0..s.d {
                        z[dd] += pk[dd];
                        for e in 0..s.dv {
                            kv[dd][e] += pk[dd] * v[e];
                        }
                    }
                }
                for h in (0..s.h).filter(|&h| s.hk(h) == g) {
                    for i in 0..s.n {
                        let pq = phi(vecat(&x["q"], &[b, h, i]));
                        let den = dot(&pq, &z) + 1e-6;
                        for e in 0..s.dv {
                            let num: f64 = (0..s.d).map(|dd| pq[dd] * kv[dd][e]).sum();
                            let f = flat(&o, &[b, h, i, e]);
                            o.data[f] = num / den;
                        }
                    }
                }
            }
        }
        o
    }

    /// Causal, `s_ij = (q_i/‖q_i‖)·(k_j/‖k_j‖)`, no scale, no normalization.
    pub fn cosine(s: &Sh, x: &Inputs) -> Tensor {
        let unit = |v: &[f64]| {
            let n = dot(v, v).sqrt();
            v.iter().map(|t| t / n).collect::<Vec<f64>>()
        };
        attend(
            s,
            x,
            |b, h, i| {
                let q = unit(vecat(&x["q"], &[b, h, i]));
                row(s.m, |j| causal(s, i, j), |j| dot(&q, &unit(vecat(&x["k"], &[b, s.hk(h), j]))))
            },
            no_gate,
        )
    }

    /// Non-causal, `p_ij = relu(s_ij)² / M`, `o_i *= silu(g_i)`.
    pub fn relu2_gau(s: &Sh, x: &Inputs) -> Tensor {
        attend(s, x, |b, h, i| row(s.m, |_| true, |j| relu(score(x, s, b, h, i, j)).powi(2) / s.m as f64), |b, h, i, e| silu(get(&x["g"], &[b, h, i, e])))
    }

    /// cosFormer, causal: `w_ij = relu(q_i)·relu(k_j) · cos(π/2 · (p_i − j)/M)` for `j ≤ p_i`,
    /// `o_i = Σ_j w_ij v_j / (Σ_j w_ij + 1e-6)` (the quadratic form, cosine as written).
    pub fn cosformer(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let rq: Vec<f64> = vecat(&x["q"], &[b, h, i]).iter().map(|&t| relu(t)).collect();
                let p = s.p(i);
                let w = row(
                    s.m,
                    |j| causal(s, i, j),
                    |j| {
                        let rk: Vec<f64> = vecat(&x["k"], &[b, s.hk(h), j]).iter().map(|&t| relu(t)).collect();
                        dot(&rq, &rk) * (std::f64::consts::FRAC_PI_2 * (p - j as i64) as f64 / s.m as f64).cos()
                    },
                );
                let den: f64 = w.iter().flatten().sum::<f64>() + 1e-6;
                w.into_iter().map(|v| v.map(|v| v / den)).collect()
            },
            no_gate,
        )
    }

    /// T5's bidirectional relative position bucket (32 buckets, 8 exact, log-spaced up to
    /// 128), as in Mesh TensorFlow's `_relative_position_bucket`: `rel = j − p_i`; half the
    /// buckets for keys after the query; `|rel| < 8` exact, else
    /// `min(15, 8 + ⌊ln(|rel|/8) / ln(16) · 8⌋)`. `softmax_j(q_i·k_j + rel[h, bucket])`, no scale.
    pub fn t5_bias(s: &Sh, x: &Inputs) -> Tensor {
        let bucket = |rel: i64| -> usize {
            let n = rel.unsigned_abs() as usize;
            let side = if rel > 0 { 16 } else { 0 };
            let inner = if n < 8 { n } else { 15.min(8 + ((n as f64 / 8.0).ln() / 16f64.ln() * 8.0).floor() as usize) };
            side + inner
        };
        attend(
            s,
            x,
            |b, h, i| {
                let p = s.p(i);
                softmax(&row(s.m, |_| true, |j| qk(x, s, b, h, i, j) + get(&x["rel"], &[h, bucket(j as i64 - p)])), None)
            },
            no_gate,
        )
    }

    /// Causal, `p_ij = sigmoid(s_ij - slope[h]·(p_i-j) - log(M))`.
    pub fn sigmoid_alibi(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let slope = get(&x["slope"], &[h]);
                let p = s.p(i);
                row(s.m, |j| causal(s, i, j), |j| sigmoid(score(x, s, b, h, i, j) - slope * (p - j as i64) as f64 - (s.m as f64).ln()))
            },
            no_gate,
        )
    }

    /// `softmax_j(s_ij + manhattan(p_i, j)·log(gamma[h]))` on a 16-wide grid, sigmoid gate.
    pub fn retention_2d(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let lg = get(&x["gamma"], &[h]).ln();
                let p = s.p(i);
                softmax(&row(s.m, |_| true, |j| score(x, s, b, h, i, j) + manhattan(p, j as i64, 16) as f64 * lg), None)
            },
            |b, h, i, e| sigmoid(get(&x["g"], &[b, h, i, e])),
        )
    }

    /// `p_ij = sigmoid(s_ij - slope[h]·man) · gamma[h]^man`, `man = manhattan(p_i, j)` (16 wide).
    pub fn swat_decay(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let slope = get(&x["slope"], &[h]);
                let gamma = get(&x["gamma"], &[h]);
                let p = s.p(i);
                row(
                    s.m,
                    |_| true,
                    |j| {
                        let man = manhattan(p, j as i64, 16);
                        sigmoid(score(x, s, b, h, i, j) - slope * man as f64) * gamma.powi(man as i32)
                    },
                )
            },
            no_gate,
        )
    }

    /// ConViT GPSA on a 14-wide grid:
    /// `p = (1-σ(λ))·softmax(s) + σ(λ)·softmax(vpos·(dc, dr, dc²+dr²))`.
    pub fn gpsa(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let lam = sigmoid(get(&x["lambda"], &[h]));
                let vp = vecat(&x["vpos"], &[h]);
                let p = s.p(i);
                let content = softmax(&row(s.m, |_| true, |j| score(x, s, b, h, i, j)), None);
                let position = softmax(
                    &row(
                        s.m,
                        |_| true,
                        |j| {
                            let dr = (j as i64 / 14 - p / 14) as f64;
                            let dc = (j as i64 % 14 - p % 14) as f64;
                            vp[0] * dc + vp[1] * dr + vp[2] * (dc * dc + dr * dr)
                        },
                    ),
                    None,
                );
                content.iter().zip(&position).map(|(c, q)| Some((1.0 - lam) * c.unwrap() + lam * q.unwrap())).collect()
            },
            no_gate,
        )
    }

    /// Transposed attention: `q̂, k̂` L2-normalized along positions,
    /// `A[d,e] = softmax_e(temp[h] · Σ_n q̂[n,d] k̂[n,e])`, `o[n,d] = Σ_e A[d,e] v[n,e]`.
    pub fn channel_attention(s: &Sh, x: &Inputs) -> Tensor {
        assert_eq!((s.n, s.m, s.d, s.dv), (s.m, s.n, s.dv, s.d));
        let (n, dd) = (s.n, s.d);
        let mut o = Tensor::zeros(vec![s.b, s.h, n, dd]);
        for b in 0..s.b {
            for h in 0..s.h {
                let temp = get(&x["temp"], &[h]);
                let normalized = |name: &str| {
                    let t = &x[name];
                    let mut out = vec![vec![0.0; dd]; n];
                    for c in 0..dd {
                        let norm = (0..n).map(|t2| get(t, &[b, h, t2, c]).powi(2)).sum::<f64>().sqrt();
                        for (t2, r) in out.iter_mut().enumerate() {
                            r[c] = get(t, &[b, h, t2, c]) / norm;
                        }
                    }
                    out
                };
                let qh = normalized("q");
                let kh = normalized("k");
                for c in 0..dd {
                    let logits: Vec<Option<f64>> = (0..dd).map(|e| Some(temp * (0..n).map(|t| qh[t][c] * kh[t][e]).sum::<f64>())).collect();
                    let a = softmax(&logits, None);
                    for t in 0..n {
                        let v = vecat(&x["v"], &[b, h, t]);
                        let acc: f64 = (0..dd).map(|e| a[e].unwrap() * v[e]).sum();
                        let f = flat(&o, &[b, h, t, c]);
                        o.data[f] = acc;
                    }
                }
            }
        }
        o
    }

    /// MoBA: mean-pool keys per 64-block, route score `q_i·kpool_c`, keep the own block of
    /// `p_i` and the top-3 earlier blocks (ties to the lower block), causal softmax.
    pub fn moba_route(s: &Sh, x: &Inputs) -> Tensor {
        attend(
            s,
            x,
            |b, h, i| {
                let p = s.p(i);
                if p < 0 {
                    return vec![None; s.m];
                }
                let own = p as usize / 64;
                let q = vecat(&x["q"], &[b, h, i]);
                let mut ranked: Vec<(usize, f64)> = (0..own)
                    .map(|c| {
                        let keys = c * 64..(c * 64 + 64).min(s.m);
                        let cnt = keys.len() as f64;
                        let mut pool = vec![0.0; s.d];
                        for j in keys {
                            for (dd, t) in vecat(&x["k"], &[b, s.hk(h), j]).iter().enumerate() {
                                pool[dd] += t;
                            }
                        }
                        let pool: Vec<f64> = pool.iter().map(|t| t / cnt).collect();
                        (c, dot(q, &pool))
                    })
                    .collect();
                // Stable sort by descending score: equal scores keep the lower block first. A NaN
                // score (from a NaN key or query) ranks first, as torch.topk does, so the NaN is
                // seen by the attention, never silently routed around.
                ranked.sort_by(|a, c| match (a.1.is_nan(), c.1.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Less,
                    (false, true) => std::cmp::Ordering::Greater,
                    (false, false) => c.1.partial_cmp(&a.1).unwrap(),
                });
                let chosen: Vec<usize> = ranked.iter().take(3).map(|r| r.0).collect();
                let live = |j: usize| j as i64 <= p && (j / 64 == own || chosen.contains(&(j / 64)));
                softmax(&row(s.m, live, |j| score(x, s, b, h, i, j)), None)
            },
            no_gate,
        )
    }
}

// ------------------------------------------------------------------------------------------
// Case lists
// ------------------------------------------------------------------------------------------

/// Cases for the specs with `G` and no `N == M` requirement. `causal` says whether rows with
/// `p_i < 0` see no key.
fn generic_cases(causal: bool) -> Vec<Case> {
    let mut v = vec![
        case("B2 H4 G2 N37 M53 D16 Dv8", sh(2, 4, 2, 37, 53, 16, 8)),
        case("decode N1 M70", sh(1, 2, 1, 1, 70, 8, 16)),
        case("self N=M=70", sh(1, 3, 1, 70, 70, 8, 8)),
        case("D64 N=M=20", sh(1, 1, 1, 20, 20, 64, 64)),
        case("MQA H4 G1 N13 M29", sh(2, 4, 1, 13, 29, 16, 16)),
    ];
    let n_gt_m = case("N53 > M37", sh(1, 2, 2, 53, 37, 8, 8));
    v.push(if causal { n_gt_m.empty_rows() } else { n_gt_m });
    v
}

/// Cases for the specs that require `N == M` (and have `G`).
fn square_cases() -> Vec<Case> {
    vec![
        case("B2 H4 G2 N=M=70 D16 Dv8", sh(2, 4, 2, 70, 70, 16, 8)),
        case("N=M=37 Dv16", sh(1, 2, 1, 37, 37, 8, 16)),
        case("D64 N=M=20", sh(1, 1, 1, 20, 20, 64, 64)),
        case("N=M=1", sh(2, 2, 1, 1, 1, 8, 8)),
    ]
}

/// The specs without a `G` dim use G = H (the driver reads it back from the inputs).
fn mha(mut cases: Vec<Case>) -> Vec<Case> {
    for c in &mut cases {
        c.sh.g = c.sh.h;
    }
    cases
}

/// A small valid shape per spec, for the cross-cutting awkward tests below.
fn small_case(name: &str, label: &str) -> Case {
    let s = match name {
        "sdpa" | "sdpa_causal" | "gla" | "channel_attention" => sh(2, 2, 2, 37, 37, 8, 8),
        "document_mask" | "prefix_lm" | "power_attention" => sh(2, 4, 2, 70, 70, 8, 8),
        "block_sparse" => sh(2, 2, 1, 130, 130, 8, 8),
        "mla_decode" => sh(2, 2, 1, 3, 20, 576, 512),
        "moba_route" => sh(1, 2, 1, 70, 300, 8, 8),
        "swin_window" | "axial_rows" | "retention_2d" | "swat_decay" | "neighborhood_2d" => sh(1, 2, 1, 100, 100, 8, 8),
        "gpsa" => sh(1, 2, 1, 50, 50, 8, 8),
        _ => sh(2, 4, 2, 37, 53, 8, 8),
    };
    let c = case(label, s);
    if name == "block_sparse" {
        c.dim("K", 2)
    } else {
        c
    }
}

const ALL: [(&str, Formula); 30] = [
    ("sdpa", f::sdpa),
    ("sdpa_causal", f::sdpa_causal),
    ("gqa_causal", f::sdpa_causal),
    ("sliding_window_sink", f::sliding_window_sink),
    ("alibi", f::alibi),
    ("document_mask", f::document_mask),
    ("prefix_lm", f::prefix_lm),
    ("dense_bias", f::dense_bias),
    ("softcap", f::softcap),
    ("sink_softmax", f::sink_softmax),
    ("clipped_softmax", f::clipped_softmax),
    ("mla_decode", f::mla_decode),
    ("swin_window", f::swin_window),
    ("neighborhood_2d", f::neighborhood_2d),
    ("power_attention", f::power_attention),
    ("block_sparse", f::block_sparse),
    ("axial_rows", f::axial_rows),
    ("retnet", f::retnet),
    ("gla", f::gla),
    ("linear_elu", f::linear_elu),
    ("cosine", f::cosine),
    ("relu2_gau", f::relu2_gau),
    ("sigmoid_alibi", f::sigmoid_alibi),
    ("retention_2d", f::retention_2d),
    ("swat_decay", f::swat_decay),
    ("gpsa", f::gpsa),
    ("channel_attention", f::channel_attention),
    ("moba_route", f::moba_route),
    ("cosformer", f::cosformer),
    ("t5_bias", f::t5_bias),
];

// ------------------------------------------------------------------------------------------
// One test per example
// ------------------------------------------------------------------------------------------

#[test]
fn sdpa() {
    check("sdpa", mha(generic_cases(false)), f::sdpa);
}

#[test]
fn sdpa_causal() {
    let mut cases = mha(generic_cases(true));
    // A NaN in one value row reaches exactly the rows that see that key, in that channel.
    cases.push(
        case("NaN in v[0,1,10,2], N=M=37", sh(1, 2, 2, 37, 37, 8, 8)).nan("v", &[0, 1, 10, 2]).nan_where(|b, h, i, e| b == 0 && h == 1 && i >= 10 && e == 2),
    );
    check("sdpa_causal", cases, f::sdpa_causal);
}

#[test]
fn gqa_causal() {
    let mut cases = generic_cases(true);
    cases.push(case("H8 G2 N45 M45", sh(1, 8, 2, 45, 45, 8, 8)));
    check("gqa_causal", cases, f::sdpa_causal);
}

#[test]
fn sliding_window_sink() {
    let streaming = |flags: &'static [f64]| {
        move |_: &Sh, x: &mut Inputs| {
            x.get_mut("streaming").unwrap().data = flags.to_vec();
        }
    };
    let mut cases = generic_cases(true);
    cases.extend([
        case("window in play N=M=290", sh(1, 2, 1, 290, 290, 4, 4)).set(streaming(&[1.0, 0.0])),
        case("decode N1 M300", sh(2, 2, 2, 1, 300, 8, 8)).set(streaming(&[0.0, 1.0])),
        case("N37 M300 G<H", sh(1, 4, 2, 37, 300, 8, 8)).set(streaming(&[1.0, 0.0, 1.0, 1.0])),
    ]);
    check("sliding_window_sink", cases, f::sliding_window_sink);
}

#[test]
fn alibi() {
    check("alibi", generic_cases(true), f::alibi);
}

#[test]
fn document_mask() {
    let mut cases = square_cases();
    cases.extend([
        // Sorted ids: three packed documents per sequence, different cuts per batch.
        case("sorted segments B2 N=M=70", sh(2, 2, 1, 70, 70, 8, 8)).set(|s, x| {
            let seg = x.get_mut("seg").unwrap();
            for b in 0..s.b {
                for i in 0..s.n {
                    seg.data[b * s.n + i] = ((i + 11 * b) * 3 / (s.n + 11 * b)) as f64;
                }
            }
        }),
        // Every position its own document: each row sees only its own key.
        case("one document per token", sh(1, 2, 2, 37, 37, 8, 8)).set(|s, x| {
            let seg = x.get_mut("seg").unwrap();
            for i in 0..s.n {
                seg.data[i] = i as f64;
            }
        }),
    ]);
    check("document_mask", cases, f::document_mask);
}

#[test]
fn prefix_lm() {
    let prefix = |vals: &'static [f64]| {
        move |_: &Sh, x: &mut Inputs| {
            x.get_mut("prefix").unwrap().data = vals.to_vec();
        }
    };
    let mut cases = square_cases();
    cases.extend([
        case("prefix 0 and N (causal / bidirectional)", sh(2, 2, 1, 53, 53, 8, 8)).set(prefix(&[0.0, 53.0])),
        case("prefix 1 and 52", sh(2, 2, 2, 53, 53, 8, 8)).set(prefix(&[1.0, 52.0])),
    ]);
    check("prefix_lm", cases, f::prefix_lm);
}

#[test]
fn dense_bias() {
    check("dense_bias", generic_cases(false), f::dense_bias);
}

#[test]
fn softcap() {
    check("softcap", generic_cases(true), f::softcap);
}

#[test]
fn sink_softmax() {
    let mut cases = generic_cases(true);
    cases.push(case("dominant sink", sh(1, 2, 1, 20, 30, 8, 8)).set(|_, x| x.get_mut("sink").unwrap().data = vec![30.0, -30.0]));
    check("sink_softmax", cases, f::sink_softmax);
}

#[test]
fn clipped_softmax() {
    let mut cases = generic_cases(false);
    cases.push(case("M2 (weights above the clip)", sh(2, 2, 1, 5, 2, 8, 8)));
    check("clipped_softmax", cases, f::clipped_softmax);
}

#[test]
fn mla_decode() {
    check(
        "mla_decode",
        vec![case("N1 M20 H2", sh(1, 2, 1, 1, 20, 576, 512)), case("B2 N3 M20 H2", sh(2, 2, 1, 3, 20, 576, 512)), case("N3 M1", sh(1, 2, 1, 3, 1, 576, 512))],
        f::mla_decode,
    );
}

#[test]
fn swin_window() {
    check(
        "swin_window",
        vec![
            case("full grid 256", sh(1, 2, 1, 256, 256, 8, 8)),
            case("N=M=100 B2 G<H", sh(2, 4, 2, 100, 100, 4, 4)),
            case("decode N1 M256", sh(1, 2, 2, 1, 256, 8, 16)),
            case("N53 M256", sh(1, 2, 1, 53, 256, 8, 8)),
        ],
        f::swin_window,
    );
}

#[test]
fn neighborhood_2d() {
    check(
        "neighborhood_2d",
        vec![
            case("full grid 1024", sh(1, 1, 1, 1024, 1024, 4, 4)),
            case("N37 M100 B2 G<H", sh(2, 4, 2, 37, 100, 8, 8)),
            case("decode N1 M1024", sh(1, 2, 1, 1, 1024, 8, 8)),
        ],
        f::neighborhood_2d,
    );
}

#[test]
fn power_attention() {
    let mut cases = square_cases();
    cases.push(case("six blocks N=M=330", sh(1, 2, 1, 330, 330, 4, 4)));
    check("power_attention", cases, f::power_attention);
}

#[test]
fn block_sparse() {
    // N = M = 130: three blocks (the last has 2 rows).
    let crafted = |_: &Sh, x: &mut Inputs| {
        let t = x.get_mut("blocks").unwrap();
        assert_eq!(t.shape, vec![2, 2, 3, 2]);
        #[rustfmt::skip]
        let lists = [
            // b0 h0: block 1 lists 0; block 2 lists 0 and a future block (masked by causality)
            [-1.0, -1.0], [0.0, -1.0], [0.0, 2.0],
            // b0 h1: nothing but the own block
            [-1.0, -7.0], [-1.0, -1.0], [-1.0, -1.0],
            // b1 h0: block 0 lists future blocks; block 2 lists 1 twice
            [1.0, 2.0], [-1.0, 0.0], [1.0, 1.0],
            // b1 h1: block 2 sees everything, block 1 only itself listed
            [0.0, 0.0], [1.0, -1.0], [0.0, 1.0],
        ];
        t.data = lists.concat();
    };
    check(
        "block_sparse",
        vec![
            case("crafted lists N=M=130 K2", sh(2, 2, 1, 130, 130, 8, 8)).dim("K", 2).set(crafted),
            case("random lists N=M=130 K3 G<H", sh(1, 4, 2, 130, 130, 8, 8)).dim("K", 3),
            case("N=M=70 K1 B2", sh(2, 2, 2, 70, 70, 16, 8)).dim("K", 1),
            case("N=M=1", sh(1, 2, 1, 1, 1, 8, 8)).dim("K", 2),
            case("D64 N=M=20", sh(1, 1, 1, 20, 20, 64, 64)).dim("K", 1),
        ],
        f::block_sparse,
    );
}

#[test]
fn axial_rows() {
    check(
        "axial_rows",
        vec![
            case("full grid 256", sh(1, 2, 1, 256, 256, 8, 8)),
            case("N53 M70 B2 G<H", sh(2, 4, 2, 53, 70, 8, 8)),
            case("decode N1 M256", sh(1, 2, 1, 1, 256, 8, 8)),
        ],
        f::axial_rows,
    );
}

#[test]
fn retnet() {
    check("retnet", generic_cases(true), f::retnet);
}

#[test]
fn retnet_recurrent_form() {
    check("retnet", generic_cases(true), f::retnet_recurrent);
}

fn gla_cases() -> Vec<Case> {
    vec![
        case("B2 H2 N=M=37 D8 Dv16", sh(2, 2, 2, 37, 37, 8, 16)),
        case("N=M=70 D16 Dv8", sh(1, 1, 1, 70, 70, 16, 8)),
        case("N=M=1", sh(1, 2, 2, 1, 1, 8, 8)),
        case("D64 N=M=20", sh(1, 1, 1, 20, 20, 64, 64)),
        // Strong forgetting: L falls to about -700, so exp(L_i) and exp(-L_j) alone would
        // under/overflow; only exp(L_i - L_j) is representable.
        case("log gates ~ -20 (L down to -700)", sh(1, 2, 2, 53, 53, 8, 8)).scale("a", 40.0),
    ]
}

#[test]
fn gla() {
    check("gla", gla_cases(), f::gla);
}

#[test]
fn gla_recurrent_form() {
    check("gla", gla_cases(), f::gla_recurrent);
}

#[test]
fn linear_elu() {
    check("linear_elu", generic_cases(false), f::linear_elu);
}

#[test]
fn cosformer() {
    check("cosformer", generic_cases(true), f::cosformer);
}

/// Distances up to 299 reach every bucket on both sides, the log-spaced ones and the last.
#[test]
fn t5_bias() {
    let mut cases = generic_cases(false);
    cases.push(case("N=M=300: every bucket", sh(1, 2, 1, 300, 300, 8, 8)));
    check("t5_bias", cases, f::t5_bias);
}

#[test]
fn cosine() {
    check("cosine", generic_cases(true), f::cosine);
}

#[test]
fn relu2_gau() {
    check("relu2_gau", generic_cases(false), f::relu2_gau);
}

#[test]
fn sigmoid_alibi() {
    check("sigmoid_alibi", generic_cases(true), f::sigmoid_alibi);
}

fn grid16_cases() -> Vec<Case> {
    vec![
        case("full grid 256", sh(1, 2, 1, 256, 256, 8, 8)),
        case("decode N1 M256", sh(1, 2, 2, 1, 256, 8, 8)),
        case("N=M=37 B2 G<H", sh(2, 4, 2, 37, 37, 8, 16)),
        case("N29 M53", sh(1, 2, 1, 29, 53, 16, 8)),
    ]
}

#[test]
fn retention_2d() {
    check("retention_2d", grid16_cases(), f::retention_2d);
}

#[test]
fn swat_decay() {
    check("swat_decay", grid16_cases(), f::swat_decay);
}

#[test]
fn gpsa() {
    check(
        "gpsa",
        vec![
            case("full grid 196", sh(1, 2, 1, 196, 196, 8, 8)),
            case("N=M=50 B2 G<H", sh(2, 4, 2, 50, 50, 8, 8)),
            case("decode N1 M196", sh(1, 2, 1, 1, 196, 8, 16)),
            case("N37 M60", sh(1, 2, 2, 37, 60, 16, 8)),
            // Positional logits up to ~3e6: the position softmax must subtract its max.
            case("vpos x 1e4", sh(1, 2, 1, 196, 196, 4, 4)).scale("vpos", 1e4),
        ],
        f::gpsa,
    );
}

#[test]
fn channel_attention() {
    check(
        "channel_attention",
        vec![
            case("B2 H2 N37 D8", sh(2, 2, 2, 37, 37, 8, 8)),
            case("N70 D16", sh(1, 3, 3, 70, 70, 16, 16)),
            case("N1 D8", sh(1, 2, 2, 1, 1, 8, 8)),
            case("D64 N20", sh(1, 1, 1, 20, 20, 64, 64)),
        ],
        f::channel_attention,
    );
}

#[test]
fn moba_route() {
    let mut cases = generic_cases(true);
    cases.extend([
        case("ranking in play N=M=330", sh(1, 2, 1, 330, 330, 4, 4)),
        case("N70 M330", sh(1, 2, 1, 70, 330, 8, 8)),
        case("decode N1 M330 B2", sh(2, 2, 2, 1, 330, 8, 8)),
        // Blocks 0..3 hold the same keys: equal routing scores, ties go to the lower block.
        case("tied routes N=M=330", sh(1, 2, 1, 330, 330, 4, 4)).set(|s, x| {
            let k = x.get_mut("k").unwrap();
            for g in 0..s.g {
                for j in 64..256 {
                    for dd in 0..s.d {
                        let src = flat(k, &[0, g, j % 64, dd]);
                        let dst = flat(k, &[0, g, j, dd]);
                        k.data[dst] = k.data[src];
                    }
                }
            }
        }),
    ]);
    check("moba_route", cases, f::moba_route);
}

// ------------------------------------------------------------------------------------------
// The awkward cases, across every example
// ------------------------------------------------------------------------------------------

/// Logits of magnitude ~1e4 (q scaled by 1e4; channel attention scales its temperature):
/// softmax must subtract the max, nothing may overflow.
#[test]
fn awkward_large_logits() {
    for (name, formula) in ALL {
        let c = small_case(name, "logits ~1e4");
        let c = if name == "channel_attention" { c.scale("temp", 1e4) } else { c.scale("q", 1e4) };
        check(name, vec![c], formula);
    }
}

/// A NaN in one q element poisons exactly the outputs that read it: the last query row
/// (which always sees at least one key), or for channel attention that channel's column.
#[test]
fn awkward_nan_in_q() {
    for (name, formula) in ALL {
        let c = small_case(name, "NaN in q");
        let (b, h, i, d) = (c.sh.b - 1, c.sh.h - 1, c.sh.n - 1, 3);
        let c = c.nan("q", &[b, h, i, d]);
        let c = if name == "channel_attention" { c.nan_where(move |bb, hh, _, e| (bb, hh, e) == (b, h, d)) } else { c.nan_row(b, h, i) };
        check(name, vec![c], formula);
    }
}

/// A NaN in one key: the formula decides which outputs see it; both must agree exactly.
#[test]
fn awkward_nan_in_k() {
    for (name, formula) in ALL {
        let mut c = small_case(name, "NaN in k (B = 2: batch 1 stays clean)");
        c.sh.b = 2;
        // For moba_route this key sits in block 0, so its routing score is NaN too.
        let j = c.sh.m.min(c.sh.n) / 2;
        let c = c.nan("k", &[0, 0, j, 1]).expect(Expect::SomeNan);
        check(name, vec![c], formula);
    }
}

const CAUSAL_NM: [&str; 11] =
    ["sdpa_causal", "gqa_causal", "alibi", "softcap", "sink_softmax", "cosine", "retnet", "sigmoid_alibi", "sliding_window_sink", "moba_route", "cosformer"];

/// N > M with a causal mask: rows with `p_i < 0` see no key and must be exact zeros, even
/// when their q row is NaN or huge.
#[test]
fn awkward_fully_masked_rows() {
    for name in CAUSAL_NM {
        let formula = ALL.iter().find(|(n, _)| *n == name).unwrap().1;
        let (n, m) = (45, 30);
        let s = if name == "sdpa_causal" { sh(2, 2, 2, n, m, 8, 8) } else { sh(2, 4, 2, n, m, 8, 8) };
        let cases = vec![
            case("N45 > M30", s).empty_rows(),
            // Row 3 has p = -12: NaN there must not leak (only row 44 turns NaN).
            case("N45 > M30, NaN in masked and live rows", s).nan("q", &[1, 1, 3, 0]).nan("q", &[1, 1, 44, 0]).nan_row(1, 1, 44),
        ];
        check(name, cases, formula);
        // Independently of the formula: the reference's rows with p < 0 are exact zeros.
        let c = load(name);
        let dims = dims_for(&c, &s, &[]);
        let bind = attnc::bind_dims(&c, &dims).unwrap();
        let x = attnc::inputs::random_inputs(&c.kernel, &bind, &c.ranges, 7).unwrap();
        let out = attnc::ir::reference::run(&c.kernel, &c.info, &x, &BTreeMap::new()).unwrap();
        let dv = out.shape[3];
        for (r, chunk) in out.data.chunks(dv).enumerate() {
            let i = r % n;
            let p = i as i64 + m as i64 - n as i64;
            if p < 0 {
                assert!(chunk.iter().all(|&v| v == 0.0), "{name}: row {r} (p = {p}) is not zero");
            } else if name != "cosformer" {
                // (cosFormer's ReLU features are all zero for a query with no positive
                // channel: such a live row is legitimately zero.)
                assert!(chunk.iter().any(|&v| v != 0.0), "{name}: row {r} (p = {p}) is zero");
            }
        }
    }
}

/// Decode against a paged KV cache: key `j` is slot `j % 16` of page `table[b, j / 16]`,
/// row `i` sits at position `len[b] - N + i` and sees the keys up to it; softmax over them.
/// Written from the variant's definition, against the reference on random page tables
/// (pages shared between sequences, repeated within one) and lengths from N to MP·16.
#[test]
fn paged_decode() {
    let c = load("paged_decode");
    for (ci, (b_, h_, g_, n_, d_, dv_, p_, mp_)) in [(2, 4, 2, 3, 8, 8, 5, 3), (1, 2, 1, 1, 16, 16, 2, 4), (3, 2, 2, 17, 8, 4, 9, 2)].into_iter().enumerate() {
        let dims: BTreeMap<String, i64> = [("B", b_), ("H", h_), ("G", g_), ("N", n_), ("D", d_), ("Dv", dv_), ("P", p_), ("MP", mp_)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v as i64))
            .collect();
        let bind = attnc::bind_dims(&c, &dims).unwrap();
        let x = attnc::inputs::random_inputs(&c.kernel, &bind, &c.ranges, 50 + ci as u64).unwrap();
        let want = attnc::ir::reference::run(&c.kernel, &c.info, &x, &BTreeMap::new()).unwrap();
        let (q, kc, vc, table, len) = (&x["q"], &x["kc"], &x["vc"], &x["table"], &x["len"]);
        let mut got = Tensor::zeros(vec![b_, h_, n_, dv_]);
        for b in 0..b_ {
            let l = get(len, &[b]) as usize;
            assert!((n_..=mp_ * 16).contains(&l), "len[{b}] = {l}");
            for h in 0..h_ {
                let hk = h / (h_ / g_);
                for i in 0..n_ {
                    let last = l - n_ + i;
                    let slot = |j: usize| (get(table, &[b, j / 16]) as usize, j % 16);
                    let s: Vec<f64> = (0..=last)
                        .map(|j| {
                            let (pg, sl) = slot(j);
                            (0..d_).map(|d| get(q, &[b, h, i, d]) * get(kc, &[pg, sl, hk, d])).sum::<f64>() / (d_ as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for e in 0..dv_ {
                        let acc: f64 = w.iter().enumerate().map(|(j, wj)| wj * get(vc, &[slot(j).0, slot(j).1, hk, e])).sum();
                        let f = flat(&got, &[b, h, i, e]);
                        got.data[f] = acc / z;
                    }
                }
            }
        }
        for (n, (a, w)) in got.data.iter().zip(&want.data).enumerate() {
            assert!((a - w).abs() <= 1e-12 * w.abs().max(1.0), "paged_decode case {ci}: element {n}: formula {a}, reference {w}");
        }
    }
}

/// Differential attention (Ye et al., 2024), causal: `o = softmax(s¹)·v − lam[h]·softmax(s²)·v`
/// with `sᶜ_ij = q^c_i·k^c_j / √D`, from the definition, against the reference: N < M,
/// decode, N > M (rows with no key are zeros), a NaN in `q2` (exactly its row turns NaN) and
/// logits of ~1e4 in one branch only.
#[test]
fn diff_attn() {
    let c = load("diff_attn");
    let cases: Vec<(&str, Sh, Option<[usize; 4]>, f64)> = vec![
        ("B2 H3 N37 M53 D16 Dv8", sh(2, 3, 3, 37, 53, 16, 8), None, 1.0),
        ("decode N1 M70", sh(1, 2, 2, 1, 70, 8, 16), None, 1.0),
        ("N45 > M30: empty rows", sh(2, 2, 2, 45, 30, 8, 8), None, 1.0),
        ("NaN in q2", sh(2, 2, 2, 20, 20, 8, 8), Some([1, 1, 19, 3]), 1.0),
        ("q1 logits ~1e4", sh(1, 2, 2, 30, 30, 8, 8), None, 1e4),
    ];
    for (ci, (label, s, nan, big)) in cases.into_iter().enumerate() {
        let what = format!("diff_attn [{label}]");
        let dims: BTreeMap<String, i64> =
            [("B", s.b), ("H", s.h), ("N", s.n), ("M", s.m), ("D", s.d), ("Dv", s.dv)].iter().map(|(k, v)| (k.to_string(), *v as i64)).collect();
        let bind = attnc::bind_dims(&c, &dims).unwrap();
        let mut x = attnc::inputs::random_inputs(&c.kernel, &bind, &c.ranges, 70 + ci as u64).unwrap();
        x.get_mut("q1").unwrap().data.iter_mut().for_each(|v| *v *= big);
        if let Some(idx) = nan {
            let t = x.get_mut("q2").unwrap();
            let f = flat(t, &idx);
            t.data[f] = f64::NAN;
        }
        let want = attnc::ir::reference::run(&c.kernel, &c.info, &x, &BTreeMap::new()).unwrap();
        let branch = |qn: &str, kn: &str, b: usize, h: usize, i: usize| {
            let q = vecat(&x[qn], &[b, h, i]);
            softmax(&row(s.m, |j| causal(&s, i, j), |j| dot(q, vecat(&x[kn], &[b, h, j])) * s.scale()), None)
        };
        let got = attend(
            &s,
            &x,
            |b, h, i| {
                let lam = get(&x["lam"], &[h]);
                let (one, two) = (branch("q1", "k1", b, h, i), branch("q2", "k2", b, h, i));
                one.iter().zip(&two).map(|(p, r)| p.zip(*r).map(|(p, r)| p - lam * r)).collect()
            },
            no_gate,
        );
        if s.n > s.m {
            assert!(want.data[..s.dv].iter().all(|&v| v == 0.0), "{what}: row 0 sees no key");
        }
        if let Some([b, h, i, _]) = nan {
            let nans: Vec<usize> = (0..want.data.len()).filter(|&f| want.data[f].is_nan()).collect();
            assert_eq!(nans.len(), s.dv, "{what}: exactly row {i} is NaN");
            assert!(nans.iter().all(|&f| unflat(&want.shape, f)[..3] == [b, h, i]), "{what}: the NaN row");
        }
        compare(&what, &got, &want);
    }
}
