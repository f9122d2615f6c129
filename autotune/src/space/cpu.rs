//! The CPU search space and the cost model that prunes it ([`CpuSpace`]).
//!
//! Candidates: for the tiled kernel, query × key tile sizes with the `std::arch` microkernel
//! on or off; for the row kernel, the rows per task; for kernels in the normal form of
//! linear attention (`attnc_passes::linear`), the chunked algorithm's chunk size, against
//! the quadratic kernels (which the model prices by their live pairs, so short sequences
//! stay quadratic and long ones go chunked). The cost model is a roofline-style
//! estimate per candidate: the live tiles at that tile size (from the block-sparsity
//! classifier, so masked work is not counted) times the tile's matmul FLOPs at the path's
//! throughput, plus a fixed cost per tile and per row of a tile (the per-row softmax
//! bookkeeping), plus packing. It only ranks candidates; the tuner measures the top ones.

use super::{live_tiles, Candidate, SearchSpace, LOWRANK_OFF};
use attnc_codegen::cpu::{CpuBackend, CpuOptions};
use attnc_codegen::schedule::{tiles_apply, ScheduleOptions};
use attnc_ir::{Bindings, Kernel};
use attnc_passes::interval::LoadOracle;

/// The CPU search space for a caller's thread count (0: every core, and then fewer threads
/// are tried too).
pub struct CpuSpace {
    pub backend: CpuBackend,
    pub threads: usize,
    /// Cores of the host (for the thread twins).
    pub cores: usize,
}

impl CpuSpace {
    pub fn new(threads: usize) -> CpuSpace {
        CpuSpace { backend: CpuBackend::default(), threads, cores: std::thread::available_parallelism().map_or(1, |n| n.get()) }
    }
}

impl SearchSpace for CpuSpace {
    type Backend = CpuBackend;
    fn backend(&self) -> &CpuBackend {
        &self.backend
    }
    fn candidates(&self, k: &Kernel, dims: &Bindings, data: &dyn LoadOracle) -> Vec<Candidate<CpuOptions>> {
        cpu_candidates(k, dims, self.threads, data)
    }
    fn names(&self, k: &Kernel) -> Vec<String> {
        cpu_candidate_names(k)
    }
    /// Cranelift's optimizer helps some kernels and hurts others: the best two are measured
    /// with it on as well; with every core asked for, the best two also run on fewer threads.
    fn twins(&self, pruned: &[Candidate<CpuOptions>]) -> Vec<Candidate<CpuOptions>> {
        let mut twins = clif_opt_twins(pruned, 2);
        if self.threads == 0 {
            twins.extend(thread_twins(pruned, 2, self.cores));
        }
        twins
    }
    fn default_options(&self) -> CpuOptions {
        CpuOptions { threads: self.threads, ..CpuOptions::default() }
    }
    /// The caller's thread count wins when given; 0 (all cores) takes the tuned one.
    fn adjust(&self, cached: CpuOptions) -> CpuOptions {
        let threads = if self.threads == 0 { cached.threads } else { self.threads };
        CpuOptions { threads, ..cached }
    }
}

/// Constants of the model, fitted to `attnc tune` tables on an AVX2 machine (Zen 3,
/// sdpa_causal at N = 2048: a 16×64 tile costs ~1.4× a 64×64 one, 128×64 ~1.25×): matmul
/// throughput per core, a fixed cost per tile (calls, packing of the query tile, row
/// bookkeeping) and per row of a tile, per-pair elementwise work, and a slowdown for tiles
/// whose working set (A, S and the key panel) spills L1.
const MICROKERNEL_FLOPS: f64 = 55e9;
const GENERATED_FLOPS: f64 = 15e9;
const TILE_OVERHEAD_S: f64 = 3e-6;
const ROW_OVERHEAD_S: f64 = 2.5e-8;
const PAIR_OVERHEAD_S: f64 = 1.2e-9;
const L1_BYTES: f64 = 32.0 * 1024.0;
const SPILL_SLOWDOWN: f64 = 1.3;
/// Seconds per scalar operation of per-pair work (the e-graph's `SepCost` of the bias and
/// decay) in the generated f32x4 code: fitted to retnet's `exp(λq − λk)` decay (21 ops in
/// the cost function: a gather and an `exp` per lane) at N = 512 and 8192 on Zen 3.
const PAIR_OP_S: f64 = 0.6e-9;
/// The chunked algorithm's loops (auto-vectorized Rust, 256-bit on AVX2) and its `exp`s,
/// fitted to retnet and gla at N = 512–16384 on Zen 3 (one core).
const CHUNKED_FLOPS: f64 = 24e9;
const EXP_S: f64 = 5e-9;
/// Tile sizes tried. Query tiles include multiples of 6, the microkernels' row block.
const QUERY_TILES: [usize; 6] = [16, 32, 48, 64, 96, 128];
const KEY_TILES: [usize; 4] = [16, 32, 64, 128];
/// Chunk sizes tried for linear attention.
const CHUNKS: [usize; 3] = [32, 64, 128];

/// Every CPU candidate for a kernel bound to `dims`, with its predicted cost, cheapest
/// first. `threads` is fixed (the caller's choice, part of every candidate).
pub fn cpu_candidates(k: &Kernel, dims: &Bindings, threads: usize, data: &dyn LoadOracle) -> Vec<Candidate<CpuOptions>> {
    let dims = &dims.complete(k);
    let ext = |e: &attnc_ir::Extent| dims.extent(e) as f64;
    let (nb, nh, ni, nj, ne) = (ext(&k.iter.b), ext(&k.iter.h), ext(&k.iter.i), ext(&k.iter.j), ext(&k.iter.e));
    let heads = nb * nh;
    let dk = 64.0_f64.max(ne);
    let mut out = Vec::new();
    let tiled = tiles_apply(k);
    // Quadratic candidates of a kernel in linear normal form must switch the chunked
    // algorithm off; for any other kernel the option has no effect and stays the default
    // (so the default configuration is one of the candidates).
    let linear = attnc_passes::linear::LinearForm::of(k);
    let quadratic_chunk = if linear.is_some() { 0 } else { ScheduleOptions::default().chunk };
    // Per-pair work beyond the matmuls: bias and decay as written (each kernel's own
    // arithmetic, priced by the passes' cost function).
    let pair_ops: f64 =
        k.branches.iter().map(|b| [&b.bias, &b.decay].into_iter().flatten().map(|e| attnc_passes::egraph::written_cost(e, k).eval).sum::<f64>()).sum();
    if tiled {
        for bq in QUERY_TILES {
            for bk in KEY_TILES {
                let counts = live_tiles(k, dims, bq as i64, bk as i64, data);
                let (live, partial) = (counts.live(), counts.partial);
                // A tile holds at most the problem's rows (one query row when decoding): the
                // microkernels run the rows a tile has, not the tile's height.
                let rows = (bq as f64).min(ni);
                let pairs = live * rows * bk as f64;
                for microkernel in [true, false] {
                    let flops = pairs * 2.0 * (dk + ne);
                    let rate = if microkernel { MICROKERNEL_FLOPS } else { GENERATED_FLOPS };
                    let working_set = 4.0 * (bq as f64 * dk + bq as f64 * bk as f64 + dk * bk as f64);
                    let rate = if working_set > 1.5 * L1_BYTES { rate / SPILL_SLOWDOWN } else { rate };
                    let per_head = flops / rate
                        // (the tile's state and accumulator are cleared for its height)
                        + live * (TILE_OVERHEAD_S + bq as f64 * ROW_OVERHEAD_S)
                        + pairs * PAIR_OVERHEAD_S * (1.0 + partial / live.max(1.0))
                        + pairs * pair_ops * PAIR_OP_S
                        + (ni + nj) * dk * 2e-10;
                    let name = format!("tiled {bq}x{bk}{}", if microkernel { "" } else { " generated-mm" });
                    let schedule = ScheduleOptions { tiled: true, block_q: bq, block_k: bk, chunk: quadratic_chunk, permute: true };
                    let options = CpuOptions { schedule, microkernel, threads, ..CpuOptions::default() };
                    out.push(Candidate { name, options, predicted: per_head * heads / threads.max(1) as f64, passes_off: vec![] });
                }
            }
        }
    }
    // The row kernel: scalar work per live pair; fewer rows per task, more scheduling.
    let live = live_tiles(k, dims, 64, 64, data).live();
    let pairs = (live * 4096.0).min(ni * nj);
    for rows in [4usize, 16, 64] {
        let per_head = pairs * (dk + ne) * 2.0 / 2e9 + (ni / rows as f64) * 2e-6;
        let schedule = ScheduleOptions { tiled: false, chunk: quadratic_chunk, ..ScheduleOptions::default() };
        let options = CpuOptions { schedule, rows_per_task: rows, threads, ..CpuOptions::default() };
        out.push(Candidate { name: format!("rows {rows}"), options, predicted: per_head * heads / threads.max(1) as f64, passes_off: vec![] });
    }
    if let Some(form) = linear {
        let dk = dims.extent(&form.channels) as f64;
        for chunk in CHUNKS {
            let c = chunk as f64;
            // Dense part within chunks (half of it masked when causal), the state's
            // product with each row and its update per key; exps per position and channel.
            let intra = if form.causal.is_some() { ni * c.min(nj) * (dk + ne) } else { 0.0 };
            let flops = 2.0 * (intra + 2.0 * (ni + nj) * dk * ne);
            let exps = match form.decay {
                attnc_passes::linear::Decay::None => 0.0,
                _ => 3.0 * (ni + nj) * dk,
            };
            let per_head = flops / CHUNKED_FLOPS + exps * EXP_S + (nj / c) * 1e-6;
            let options = CpuOptions { schedule: ScheduleOptions { chunk, ..ScheduleOptions::default() }, threads, ..CpuOptions::default() };
            out.push(Candidate { name: format!("chunked {chunk}"), options, predicted: per_head * heads / threads.max(1) as f64, passes_off: vec![] });
        }
    }
    out.sort_by(|a, b| a.predicted.total_cmp(&b.predicted).then_with(|| a.name.cmp(&b.name)));
    out
}

/// The names of every candidate (what the cache key's checksum covers), without costs.
pub fn cpu_candidate_names(k: &Kernel) -> Vec<String> {
    let mut names = Vec::new();
    if tiles_apply(k) {
        for bq in QUERY_TILES {
            for bk in KEY_TILES {
                for microkernel in [true, false] {
                    names.push(format!("tiled {bq}x{bk}{}", if microkernel { "" } else { " generated-mm" }));
                }
            }
        }
    }
    names.extend([4usize, 16, 64].map(|r| format!("rows {r}")));
    let mut twins: Vec<String> = names.iter().map(|n| format!("{n}{CLIF_OPT}")).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    twins.extend(names.iter().flat_map(|n| fewer_threads(cores).into_iter().map(move |t| format!("{n}{}", threads_suffix(t)))));
    twins.extend(names.iter().map(|n| format!("{n}{LOWRANK_OFF}")));
    names.extend(twins);
    if attnc_passes::linear::LinearForm::of(k).is_some() {
        names.extend(CHUNKS.map(|c| format!("chunked {c}")));
    }
    names.sort();
    names
}

/// Suffix of a candidate compiled with Cranelift's optimizer on.
pub const CLIF_OPT: &str = " clif-opt";

/// Twins of the first `n` generated-code candidates (tiled or row; the chunked algorithm is
/// Rust) with Cranelift's optimizer on (`opt_level=speed`). It wins on integer-heavy masks
/// and gathers (swin_window at N = 2048: 1.4×) and loses elsewhere (softcap's `tanh`:
/// 0.85×, hoisted invariants re-elaborated inside loops), which the cost model cannot
/// tell apart, so the tuner measures both.
pub fn clif_opt_twins(pruned: &[Candidate<CpuOptions>], n: usize) -> Vec<Candidate<CpuOptions>> {
    pruned
        .iter()
        .filter(|c| !c.options.clif_opt && !c.name.starts_with("chunked"))
        .take(n)
        .map(|c| Candidate { name: format!("{}{CLIF_OPT}", c.name), options: CpuOptions { clif_opt: true, ..c.options.clone() }, ..c.clone() })
        .collect()
}

/// Thread counts tried besides all cores (`threads = 0`) on a host with `cores` cores: one
/// and half of them. Fewer threads win where the work is too small to share (decode, short
/// sequences), which the cost model does not price.
pub fn fewer_threads(cores: usize) -> Vec<usize> {
    let mut t: Vec<usize> = [1, cores / 2].into_iter().filter(|&n| n >= 1 && n < cores).collect();
    t.dedup();
    t
}

/// Twins of the first `n` candidates that use every core, with each of [`fewer_threads`].
pub fn thread_twins(pruned: &[Candidate<CpuOptions>], n: usize, cores: usize) -> Vec<Candidate<CpuOptions>> {
    pruned
        .iter()
        .filter(|c| c.options.threads == 0 && !c.options.clif_opt)
        .take(n)
        .flat_map(|c| {
            fewer_threads(cores).into_iter().map(move |t| Candidate {
                name: format!("{}{}", c.name, threads_suffix(t)),
                options: CpuOptions { threads: t, ..c.options.clone() },
                ..c.clone()
            })
        })
        .collect()
}

/// Name suffix of a candidate on `t` threads.
fn threads_suffix(t: usize) -> String {
    format!(" {t} thread{}", if t == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::prune;
    use attnc_passes::interval::NoData;

    fn bound(n: i64) -> (Kernel, Bindings) {
        let k = attnc_ir::parse_kernel(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))) (mask (<= j i)) (norm (softmax))))",
        )
        .expect("kernel");
        let dims = Bindings { dims: [("B", 1), ("H", 8), ("N", n), ("M", n), ("D", 64)].iter().map(|(a, b)| (a.to_string(), *b)).collect() };
        (k, dims)
    }

    #[test]
    fn pruning_keeps_the_cheapest_and_prefers_the_microkernel() {
        let (k, dims) = bound(2048);
        let all = cpu_candidates(&k, &dims, 2, &NoData);
        assert!(all.len() > 30, "tile sizes × paths × row variants");
        assert!(all.windows(2).all(|w| w[0].predicted <= w[1].predicted), "sorted by cost");
        let top = prune(all.clone(), 6);
        assert_eq!(top.len(), 6);
        assert_eq!(top, all[..6].to_vec());
        assert!(top.iter().all(|c| c.options.schedule.tiled && c.options.microkernel), "{top:?}");
        // Causal: the model sees that tiles above the diagonal are empty, so it predicts
        // about half the time of the same spec without a mask would take.
        assert!(all.iter().any(|c| c.name == "tiled 64x64"));
        // Optimized twins of the best two, named in the candidate set.
        let twins = clif_opt_twins(&top, 2);
        assert_eq!(twins.len(), 2);
        assert!(twins.iter().zip(&top).all(|(t, c)| t.options.clif_opt && t.name == format!("{}{CLIF_OPT}", c.name)));
        let names = cpu_candidate_names(&k);
        assert!(twins.iter().all(|t| names.contains(&t.name)), "{twins:?}");
        // Fewer threads: one and half the cores, never all of them again.
        assert_eq!(fewer_threads(1), Vec::<usize>::new());
        assert_eq!(fewer_threads(2), vec![1]);
        assert_eq!(fewer_threads(16), vec![1, 8]);
        assert!(thread_twins(&top, 2, 16).is_empty(), "a caller's fixed thread count (2 here) is kept");
        let all_cores = prune(cpu_candidates(&k, &dims, 0, &NoData), 6);
        let on_16 = thread_twins(&all_cores, 1, 16);
        assert_eq!(on_16.iter().map(|c| c.options.threads).collect::<Vec<_>>(), vec![1, 8]);
        assert_eq!(on_16[0].name, format!("{} 1 thread", all_cores[0].name));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(thread_twins(&all_cores, 2, cores).iter().all(|t| names.contains(&t.name)));
    }

    /// A decode step (one query row against many keys) runs tiled: the model counts the
    /// rows a tile holds, not its height (it once priced 16 padding rows per tile and chose
    /// the row kernel, 5× slower at M = 4096).
    #[test]
    fn a_decode_step_runs_tiled() {
        let (k, mut dims) = bound(4096);
        dims.dims.insert("N".into(), 1);
        let k = attnc_ir::Kernel { branches: k.branches.iter().map(|b| attnc_ir::Branch { mask: None, ..b.clone() }).collect(), ..k };
        let all = cpu_candidates(&k, &dims, 2, &NoData);
        assert!(all[0].options.schedule.tiled && all[0].options.microkernel, "{:?}", all[0]);
        assert_eq!(all[0].options.schedule.block_q, 16, "the shortest tile: {:?}", all[0]);
    }

    /// Linear attention in the passes' normal form: the chunked candidates join the space,
    /// and the model prefers them on long sequences and the quadratic kernel on short ones.
    #[test]
    fn chunked_candidates_for_linear_attention() {
        let k = attnc_ir::parse_kernel(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (input gamma f32 [H]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))) (mask (<= j i))
                 (norm (map s)) (decay (pow (load gamma h) (float (- i j))))))",
        )
        .expect("kernel");
        let k = attnc_passes::optimize(&k, &attnc_passes::PassConfig::all()).expect("passes").kernel;
        assert!(cpu_candidate_names(&k).contains(&"chunked 64".to_string()));
        let at = |n: i64| Bindings { dims: [("B", 1), ("H", 8), ("N", n), ("M", n), ("D", 64)].iter().map(|(a, b)| (a.to_string(), *b)).collect() };
        let long = cpu_candidates(&k, &at(8192), 2, &NoData);
        assert!(long[0].name.starts_with("chunked"), "{:?}", long[0]);
        assert!(long[0].options.schedule.chunk > 0);
        let short = cpu_candidates(&k, &at(32), 2, &NoData);
        assert!(!short[0].name.starts_with("chunked"), "{:?}", short[0]);
        assert_eq!(short[0].options.schedule.chunk, 0, "quadratic candidates run quadratic");
    }
}
