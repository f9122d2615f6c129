//! Heads that share one key/value pack (GQA and MQA: every query head of a kv head), so
//! decode does not re-pack `K` and `V` per query head, and a GPU backend can load a kv
//! head's tiles once for all its query heads.

use super::tiled::TiledPlan;
use attnc_ir::{Bindings, Expr, Kernel};

/// The query heads of one batch that read the same key panel and values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadGroup {
    pub batch: i64,
    pub heads: Vec<i64>,
}

/// Groups the heads of each batch by the key panel and values they read: `B(b, h, j, r)` and
/// `value(b, h, j, e)` see `h` only through index subexpressions free of `j r e` (like
/// `h // (H // G)`); heads on which all of those agree read the same data. When `h` is used
/// any other way, every head is its own group.
pub fn head_groups(k: &Kernel, plan: &TiledPlan, dims: &Bindings, nb: i64, nh: i64) -> Vec<HeadGroup> {
    let mut roots: Vec<&Expr> = vec![&k.value];
    for d in &plan.panels {
        roots.push(&d.b);
    }
    // Maximal subexpressions that mention h and nothing that varies inside the pack.
    fn collect(e: &Expr, out: &mut Vec<Expr>) -> bool {
        let fv = e.free_vars();
        if !fv.contains("h") {
            return true;
        }
        if fv.iter().all(|v| v == "h" || v == "b") && e.loads().is_empty() {
            out.push(e.clone());
            return true;
        }
        match e {
            Expr::Var(_) => false,
            Expr::Reduce { .. } => false,
            _ => e.children().into_iter().all(|c| collect(c, out)),
        }
    }
    let mut terms = Vec::new();
    let shareable = roots.iter().all(|r| collect(r, &mut terms));
    let mut groups = Vec::new();
    for b in 0..nb {
        // (shared?, key) -> heads; a head whose terms do not evaluate gets a key of its own.
        type Key = (bool, Vec<i64>);
        let mut by_key: Vec<(Key, Vec<i64>)> = Vec::new();
        for h in 0..nh {
            let at = |t: &Expr| attnc_ir::bind::eval_dims(&t.subst("h", &Expr::Int(h)).subst("b", &Expr::Int(b)), &dims.dims).ok();
            let key = match shareable.then(|| terms.iter().map(at).collect::<Option<Vec<i64>>>()).flatten() {
                Some(values) => (true, values),
                None => (false, vec![h]),
            };
            match by_key.iter_mut().find(|(k2, _)| *k2 == key) {
                Some(g) => g.1.push(h),
                None => by_key.push((key, vec![h])),
            }
        }
        groups.extend(by_key.into_iter().map(|(_, heads)| HeadGroup { batch: b, heads }));
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(kv_head: &str) -> Kernel {
        attnc_ir::parse_kernel(&format!(
            "(kernel t (dim B) (dim H) (dim G) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B G M D]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b {kv_head} j e)) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b {kv_head} j r0)))) (norm (softmax))))"
        ))
        .expect("kernel")
    }

    fn groups(k: &Kernel, dims: &Bindings, nb: i64, nh: i64) -> Vec<(i64, Vec<i64>)> {
        let plan = TiledPlan::new(k).expect("tiled");
        head_groups(k, &plan, dims, nb, nh).into_iter().map(|g| (g.batch, g.heads)).collect()
    }

    #[test]
    fn heads_sharing_a_kv_head_share_one_pack() {
        let dims = Bindings { dims: [("B", 2), ("H", 8), ("G", 2), ("N", 4), ("M", 4), ("D", 4)].iter().map(|(a, b)| (a.to_string(), *b)).collect() };
        let gqa = kernel("(// h (// $H $G))");
        assert_eq!(groups(&gqa, &dims, 2, 8), vec![(0, vec![0, 1, 2, 3]), (0, vec![4, 5, 6, 7]), (1, vec![0, 1, 2, 3]), (1, vec![4, 5, 6, 7])]);
        assert_eq!(groups(&kernel("0"), &dims, 1, 8), vec![(0, (0..8).collect())]);
        assert_eq!(groups(&kernel("h"), &dims, 1, 3), vec![(0, vec![0]), (0, vec![1]), (0, vec![2])]);
    }
}
