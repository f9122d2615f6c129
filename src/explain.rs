//! `attnc explain`: a spec in readable form, the rewrites the passes applied with their
//! costs, and at a shape the schedule a backend would run (without compiling anything).

use crate::{ir, tune};
use anyhow::Result;
use attnc_autotune::space::cpu::CpuSpace;
use attnc_codegen::cpu::CpuBackend;

/// The whole explanation.
pub fn explain(
    c: &crate::dsl::Checked,
    oc: &crate::dsl::Checked,
    log: &[crate::passes::Applied],
    cfg: &crate::passes::PassConfig,
    shape: Option<&ir::Bindings>,
) -> Result<String> {
    use ir::pretty::infix;
    use std::fmt::Write;
    let k = &c.kernel;
    let mut s = String::new();
    writeln!(s, "kernel {}  (hash {})", k.name, &ir::stable_hash(k)[..16]).unwrap();
    let dims: Vec<String> = k.dims.iter().map(|d| d.def.as_ref().map_or(d.name.clone(), |e| format!("{} = {}", d.name, infix(e)))).collect();
    writeln!(s, "  dims      {}", dims.join(", ")).unwrap();
    for r in &k.requires {
        writeln!(s, "  require   {}", infix(r)).unwrap();
    }
    for t in &k.tensors {
        let shape: Vec<String> = t.shape.iter().map(|e| e.to_string()).collect();
        let kind = match &t.kind {
            ir::TensorKind::Input => "input ",
            ir::TensorKind::Output => "output",
            ir::TensorKind::Derived { .. } => "tensor",
        };
        writeln!(s, "  {kind}    {}: {}[{}]", t.name, t.dtype, shape.join(", ")).unwrap();
    }
    let it = &k.iter;
    writeln!(s, "  indices   b < {}, h < {}, i < {} (queries), j < {} (keys), e < {} (channels)", it.b, it.h, it.i, it.j, it.e).unwrap();
    for (n, br) in k.branches.iter().enumerate() {
        if k.branches.len() > 1 {
            writeln!(s, "  branch {n}").unwrap();
        }
        writeln!(s, "  score     {}", infix(&br.score)).unwrap();
        if let Some(e) = &br.bias {
            writeln!(s, "  bias      {}", infix(e)).unwrap();
        }
        if let Some(e) = &br.mask {
            writeln!(s, "  mask      {}", infix(e)).unwrap();
        }
        let norm = match &br.norm {
            ir::Norm::Softmax { sink, post } => {
                let mut t = "softmax over j".to_string();
                if let Some(e) = sink {
                    write!(t, ", sink logit {}", infix(e)).unwrap();
                }
                if let Some(e) = post {
                    write!(t, ", then w -> {}", infix(e)).unwrap();
                }
                t
            }
            ir::Norm::Map(e) => format!("pointwise s -> {}", infix(e)),
            ir::Norm::Linear { eps } => format!("s / (sum over j of s + {:?})", eps.0),
        };
        writeln!(s, "  normalize {norm}").unwrap();
        if let Some(e) = &br.decay {
            writeln!(s, "  decay     {}", infix(e)).unwrap();
        }
        if let Some(e) = &br.weight {
            writeln!(s, "  weight    {}", infix(e)).unwrap();
        }
    }
    writeln!(s, "  value     {}", infix(&k.value)).unwrap();
    writeln!(s, "  out       {}[{}]", k.output().name, k.out.join(", ")).unwrap();
    if let Some(g) = &k.gate {
        writeln!(s, "  gate      {}", infix(g)).unwrap();
    }
    writeln!(s, "\nrewrites (passes: {})", cfg.describe()).unwrap();
    for crate::passes::Pass { name, what, .. } in crate::passes::PASSES {
        let on = if cfg.enabled(name) { "on " } else { "off" };
        let applied: Vec<&crate::passes::Applied> = log.iter().filter(|a| a.pass == *name).collect();
        if !cfg.enabled(name) {
            writeln!(s, "  {name:<9}{on}  switched off  ({what})").unwrap();
        } else if applied.is_empty() {
            writeln!(s, "  {name:<9}{on}  nothing to do  ({what})").unwrap();
        }
        for a in applied {
            writeln!(s, "  {name:<9}{on}  {}", a.what).unwrap();
            if let Some((before, after)) = a.cost {
                writeln!(s, "                 per-pair cost {before:.2} -> {after:.2} scalar ops").unwrap();
            }
        }
    }
    if let Some(b) = shape {
        let dims_text: Vec<String> = b.dims.iter().filter(|(d, _)| c.info.free_dims.contains(d)).map(|(d, v)| format!("{d}={v}")).collect();
        writeln!(s, "\nat {}", dims_text.join(",")).unwrap();
        let (opts, from) = tune::cost_model_options(&CpuSpace::new(0), oc, b);
        write!(s, "{}", explain_schedule(&CpuBackend::default(), oc, b, &opts, &from)?).unwrap();
    }
    writeln!(s, "\noptimized IR:\n{}", oc.kernel).unwrap();
    Ok(s)
}

/// The schedule a backend runs at a shape, without compiling it: the algorithm, the tiles
/// and their classes per branch, the head groups and the workspace.
pub fn explain_schedule<B: attnc_codegen::Backend>(backend: &B, oc: &crate::dsl::Checked, dims: &ir::Bindings, o: &B::Options, from: &str) -> Result<String> {
    use attnc_codegen::schedule::{classes, BoundAlgorithm};
    use std::fmt::Write;
    let k = &oc.kernel;
    let mut s = String::new();
    let sched = backend.plan(k, &oc.info, o)?;
    writeln!(s, "  backend   {} ({})", B::NAME, backend.device()).unwrap();
    writeln!(s, "  algorithm {} ({from})", backend.describe(&sched, o)).unwrap();
    let bound = sched.bind(k, dims)?;
    let g = bound.grid;
    writeln!(s, "  grid      {} batches × {} heads × {} queries × {} keys, {} output channels", g.batches, g.heads, g.queries, g.keys, g.values).unwrap();
    match &bound.algorithm {
        BoundAlgorithm::Tiled(t) => {
            let ts = sched.tiled().expect("tiled");
            let grid = t.tiles;
            writeln!(
                s,
                "  tiles     {}x{}: {} query tiles × {} key tiles per head, {} channels in the dot",
                grid.block_q,
                grid.block_k,
                grid.query_tiles(),
                grid.key_tiles(),
                t.channels
            )
            .unwrap();
            for (n, br) in k.branches.iter().enumerate() {
                let c = classes::count_tiles(br.mask.as_ref(), 0, 0, &grid, &dims.dims, &crate::passes::interval::NoData, i64::MAX);
                writeln!(
                    s,
                    "  classes   branch {n}: {} empty (skipped), {} full (no mask work), {} partial; {:.1}% live (batch 0, head 0; data-dependent masks count as partial here)",
                    c.empty,
                    c.full,
                    c.partial,
                    100.0 * c.live() / c.total().max(1.0)
                )
                .unwrap();
                if let Some(sm) = &ts.plan.branches[n].softmax {
                    let passes = if sm.passes.len() == 2 { "two passes (post-map)" } else { "one pass, online" };
                    let cap = sm.tanh_cap.map_or(String::new(), |c| format!("; capped score {c}·tanh, capped per tile on the CPU"));
                    writeln!(s, "  softmax   branch {n}: {passes}; log2 e folded into the queries: {}; plain dot scores: {}{cap}", sm.log2e_folded, sm.plain)
                        .unwrap();
                }
            }
            // The CPU runs a mask with class equalities over tokens sorted by class.
            let permuted = attnc_codegen::schedule::permute::rewrite(k).filter(|_| B::NAME == "cpu" && attnc_codegen::BackendOptions::schedule(o).permute);
            if let Some(p) = permuted {
                match p.orders(&dims.dims, g.queries as usize, g.keys as usize) {
                    Some(ord) => {
                        // Classified as the CPU runtime does, from the order inputs.
                        let inputs = ord.inputs();
                        let bufs = inputs.iter().map(|(name, v)| (name.to_string(), v.as_slice())).collect();
                        let classifier = classes::TileClassifier::default();
                        let table = attnc_codegen::host::tile_classes(&classifier, &p.kernel, &grid, 1, 1, dims, &bufs);
                        let c = table.counts(0, 0, 0);
                        let count = ord.cq.iter().chain(&ord.ck).max().map_or(0, |x| x + 1);
                        writeln!(
                            s,
                            "  sorted    queries and keys sorted by the mask's {count} classes (what runs): {} empty, {} full, {} partial; {:.1}% live",
                            c.empty,
                            c.full,
                            c.partial,
                            100.0 * c.live() / c.total().max(1.0)
                        )
                        .unwrap();
                    }
                    None => writeln!(s, "  sorted    no: the positions are in class order already").unwrap(),
                }
            }
            let shared = t.groups.iter().filter(|gr| gr.heads.len() > 1).count();
            writeln!(s, "  packs     {} key/value packs for {} heads ({} shared by several heads)", t.groups.len(), g.batches * g.heads, shared).unwrap();
            let (kt, vb) = ts.workspace.pack_floats(g.keys, t.channels, g.values);
            writeln!(
                s,
                "  workspace {} bytes per task (limit {}), {} bytes per pack",
                ts.workspace.task_bytes(t.channels, g.values),
                sched.limits.task_workspace_bytes,
                4 * (kt + vb)
            )
            .unwrap();
        }
        BoundAlgorithm::Chunked(p) => {
            writeln!(s, "  chunks    {} keys per chunk, {} × {} state per head", p.chunk, p.dk, p.dv).unwrap();
        }
        BoundAlgorithm::Rows => {}
    }
    Ok(s)
}
