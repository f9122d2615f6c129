//! Token permutation: a mask that is a conjunction with equalities of a query-only and a
//! key-only function (`rr(p) // 8 == rr(j) // 8` in Swin's shifted windows, the dilation
//! group of NATTEN's neighbourhoods) leaves a key visible only to queries of its class. In
//! the positions' order the classes interleave (a window is 8 runs of 8 tokens), so every
//! tile holds a few live pairs; with queries and keys sorted by class each class is a
//! contiguous block, and its tiles are full (or, with other conditions, denser).
//!
//! The permutation is a rewrite of the kernel, not a backend feature: [`rewrite`] returns a
//! kernel over the sorted problem, which reads four more i32 inputs of the dims' lengths —
//! the sorted order of the queries and of the keys ([`PQ`], [`PK`]: position `t` of the
//! sorted problem is query `pq[t]`) and their classes ([`CQ`], [`CK`], non-decreasing) —
//! and whose mask is `cq[i] == ck[j]` and the remaining conditions at `(pq[i], pk[j])`.
//! Its output and saved statistics come out in the sorted query order; a runtime scatters
//! them back ([`scatter_rows`]). Classes are computed per shape ([`Permutation::orders`]);
//! a shape where both orders are already sorted (axial rows, a chunked causal mask) runs
//! the kernel as written.
//!
//! Only masks whose class functions read no tensor and do not depend on the batch or head
//! are permuted (one order per shape, computed once).

use attnc_ir::interval::{eval, Iv, NoData};
use attnc_ir::{BinOp, DType, Expr, Kernel, Norm, TensorDecl, TensorKind, Ty};
use std::collections::BTreeMap;

/// The sorted problem's query order: `pq[t]` is the query at position `t`.
pub const PQ: &str = "__perm_q";
/// The sorted problem's key order.
pub const PK: &str = "__perm_k";
/// The class of each sorted query (non-decreasing).
pub const CQ: &str = "__class_q";
/// The class of each sorted key (non-decreasing).
pub const CK: &str = "__class_k";

/// A kernel rewritten over queries and keys sorted by the classes of its mask.
#[derive(Clone, Debug)]
pub struct Permutation {
    /// The sorted problem's kernel (see the module's documentation).
    pub kernel: Kernel,
    /// The class of query `i`: a tuple of query-only expressions (free variable `i`).
    query_class: Vec<Expr>,
    /// The class of key `j`, compared with the query's component by component.
    key_class: Vec<Expr>,
}

/// The orders and classes of one shape ([`Permutation::orders`]), as the four i32 inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Orders {
    pub pq: Vec<i32>,
    pub pk: Vec<i32>,
    pub cq: Vec<i32>,
    pub ck: Vec<i32>,
}

impl Orders {
    /// The four inputs by name in storage form (i32 bits), as the sorted kernel reads them.
    pub fn inputs(&self) -> [(&'static str, Vec<u32>); 4] {
        let bits = |v: &[i32]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
        [(PQ, bits(&self.pq)), (PK, bits(&self.pk)), (CQ, bits(&self.cq)), (CK, bits(&self.ck))]
    }
}

/// The conjuncts of `e` (`a && b && c`).
fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::Binary(BinOp::And, a, b) => {
            let mut v = conjuncts(a);
            v.extend(conjuncts(b));
            v
        }
        _ => vec![e],
    }
}

/// Whether `e`'s only free variable is `var` and it reads no tensor (dims and constants
/// allowed): a function of one position, the same for every batch and head.
fn of_only(e: &Expr, var: &str) -> bool {
    let fv = e.free_vars();
    fv.len() == 1 && fv.contains(var) && e.loads().is_empty()
}

/// The kernel over the sorted problem, when the mask of its one branch has class
/// equalities.
pub fn rewrite(k: &Kernel) -> Option<Permutation> {
    let [br] = k.branches.as_slice() else { return None };
    let mask = br.mask.as_ref()?;
    let (mut query_class, mut key_class, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for c in conjuncts(mask) {
        if let Expr::Binary(BinOp::Eq, a, b) = c {
            let typed = matches!(k.ty_of(a), Ty::Int | Ty::Bool);
            if typed && of_only(a, "i") && of_only(b, "j") {
                query_class.push((**a).clone());
                key_class.push((**b).clone());
                continue;
            }
            if typed && of_only(a, "j") && of_only(b, "i") {
                query_class.push((**b).clone());
                key_class.push((**a).clone());
                continue;
            }
        }
        rest.push(c.clone());
    }
    if query_class.is_empty() {
        return None;
    }
    let at = |v: &str, t: &str| Expr::Load(t.to_string(), vec![Expr::var(v)]);
    let sorted = |e: &Expr| e.subst("i", &at("i", PQ)).subst("j", &at("j", PK));
    let classes = Expr::Binary(BinOp::Eq, Box::new(at("i", CQ)), Box::new(at("j", CK)));
    let mask = rest.iter().fold(classes, |acc, c| Expr::Binary(BinOp::And, Box::new(acc), Box::new(sorted(c))));
    let mut kernel = k.clone();
    let b = &mut kernel.branches[0];
    b.score = sorted(&b.score);
    b.bias = b.bias.as_ref().map(sorted);
    b.mask = Some(mask);
    b.decay = b.decay.as_ref().map(sorted);
    b.weight = b.weight.as_ref().map(sorted);
    b.norm = match &b.norm {
        Norm::Softmax { sink, post } => Norm::Softmax { sink: sink.as_ref().map(sorted), post: post.as_ref().map(sorted) },
        Norm::Map(f) => Norm::Map(sorted(f)),
        n @ Norm::Linear { .. } => n.clone(),
    };
    kernel.value = sorted(&kernel.value);
    kernel.gate = kernel.gate.as_ref().map(sorted);
    let out = kernel.tensors.iter().position(|t| t.kind == TensorKind::Output).expect("an output");
    for (name, extent) in [(PQ, &k.iter.i), (PK, &k.iter.j), (CQ, &k.iter.i), (CK, &k.iter.j)] {
        kernel.tensors.insert(out, TensorDecl { name: name.into(), dtype: DType::I32, shape: vec![extent.clone()], kind: TensorKind::Input });
    }
    Some(Permutation { kernel, query_class, key_class })
}

/// The integer value of `e` at `var = x` (a boolean as 0 or 1).
fn value_at(e: &Expr, var: &str, x: i64, dims: &BTreeMap<String, i64>, vars: &mut Vec<(String, Iv)>) -> Option<i64> {
    vars.clear();
    vars.push((var.to_string(), Iv::point(x)));
    match eval(e, vars, dims, &NoData) {
        Iv::Int(a, b) if a == b => Some(a),
        v => v.known_bool().map(i64::from),
    }
}

impl Permutation {
    /// The orders of `n` queries and `m` keys at these dims; `None` when both are already
    /// sorted (nothing to gain) or a class could not be evaluated.
    pub fn orders(&self, dims: &BTreeMap<String, i64>, n: usize, m: usize) -> Option<Orders> {
        let mut vars = Vec::new();
        let mut classes = |exprs: &[Expr], var: &str, len: usize| -> Option<Vec<Vec<i64>>> {
            (0..len).map(|x| exprs.iter().map(|e| value_at(e, var, x as i64, dims, &mut vars)).collect()).collect()
        };
        let (q, k) = (classes(&self.query_class, "i", n)?, classes(&self.key_class, "j", m)?);
        // Class ids: the rank of each tuple among all of them (a query and a key of one
        // tuple share an id).
        let mut all: Vec<&Vec<i64>> = q.iter().chain(&k).collect();
        all.sort();
        all.dedup();
        let id = |t: &Vec<i64>| all.binary_search(&t).expect("a listed tuple") as i32;
        let order = |tuples: &[Vec<i64>]| -> (Vec<i32>, Vec<i32>) {
            let ids: Vec<i32> = tuples.iter().map(id).collect();
            let mut pos: Vec<i32> = (0..tuples.len() as i32).collect();
            pos.sort_by_key(|&x| ids[x as usize]);
            let cls = pos.iter().map(|&x| ids[x as usize]).collect();
            (pos, cls)
        };
        let ((pq, cq), (pk, ck)) = (order(&q), order(&k));
        let sorted = |p: &[i32]| p.iter().enumerate().all(|(t, &x)| t as i32 == x);
        if sorted(&pq) && sorted(&pk) {
            return None;
        }
        Some(Orders { pq, pk, cq, ck })
    }
}

/// Moves the rows of `sorted` (laid out with `outer` blocks of `rows` rows of `inner`
/// values, the rows in the sorted order) to their places in `out`: row `t` of each block
/// goes to row `order[t]` (the [`PQ`] input, as stored).
pub fn scatter_rows(sorted: &[f32], out: &mut [f32], outer: usize, rows: usize, inner: usize, order: &[u32]) {
    debug_assert_eq!(sorted.len(), outer * rows * inner);
    for o in 0..outer {
        let base = o * rows * inner;
        for (t, &x) in order.iter().enumerate() {
            let (src, dst) = (base + t * inner, base + x as usize * inner);
            out[dst..dst + inner].copy_from_slice(&sorted[src..src + inner]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(mask: &str) -> Kernel {
        crate::schedule::test_kernel(&format!("(branch (score {}) (mask {mask}) (norm (softmax)))", crate::schedule::TEST_DOT))
    }

    #[test]
    fn class_equalities_sort_queries_and_keys_by_class() {
        // Class: parity of the position; also causal.
        let k = kernel("(and (== (% i 2) (% j 2)) (<= j i))");
        let p = rewrite(&k).expect("a class equality");
        attnc_ir::verify(&p.kernel).expect("the sorted kernel verifies");
        let dims = BTreeMap::from([("N".to_string(), 5), ("M".to_string(), 5)]);
        let o = p.orders(&dims, 5, 5).expect("interleaved classes");
        assert_eq!(o.pq, vec![0, 2, 4, 1, 3]);
        assert_eq!(o.cq, vec![0, 0, 0, 1, 1]);
        assert_eq!((&o.pk, &o.ck), (&o.pq, &o.cq));
        // The remaining condition reads the positions through the orders.
        let mask = format!("{:?}", p.kernel.branches[0].mask);
        assert!(mask.contains(PQ) && mask.contains(PK) && mask.contains(CQ), "{mask}");
        // Already sorted (blocks of 2): nothing to permute.
        let blocks = rewrite(&kernel("(== (// i 2) (// j 2))")).expect("a class equality");
        assert_eq!(blocks.orders(&dims, 5, 5), None);
        // No class equality, or one that reads the head: not permuted.
        assert!(rewrite(&kernel("(<= j i)")).is_none());
        assert!(rewrite(&kernel("(== (% i 2) (% (+ j h) 2))")).is_none());
    }

    #[test]
    fn rows_go_back_to_their_places() {
        let sorted = [10.0, 11.0, 20.0, 21.0, 30.0, 31.0, 40.0, 41.0, 50.0, 51.0, 60.0, 61.0];
        let mut out = [0f32; 12];
        scatter_rows(&sorted, &mut out, 2, 3, 2, &[2, 0, 1]);
        assert_eq!(out, [20.0, 21.0, 30.0, 31.0, 10.0, 11.0, 50.0, 51.0, 60.0, 61.0, 40.0, 41.0]);
    }
}
