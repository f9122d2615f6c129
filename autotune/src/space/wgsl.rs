//! The WGSL search space ([`WgslSpace`]): for kernels whose score tiles, the tiled kernel's
//! tile shape (`block_q × block_k`, invocations per query row) and the output channels each
//! invocation holds; and the row kernel's workgroup size (keys per tile), channels and, for
//! masked kernels, how many query rows share one row of tile classes.
//!
//! The cost model is coarse on purpose (GPUs differ too much for fitted constants to carry
//! over; lavapipe is a CPU). Per live tile a workgroup runs its barriers (a fixed cost
//! each) and a serial part every invocation walks, `LANES` invocations at a time:
//! - row kernel, per (query row, key tile of `workgroup` keys): three barriers, the tile's
//!   keys for the maximum and the sum, and its keys × channels for the values;
//! - tiled kernel, per (query tile, key tile) and slice of the output channels: two
//!   barriers per staged chunk of the dot and of the values and three more; its keys ×
//!   the dot's channels, the tile's keys twice (maximum, sum) and keys × its channels for
//!   the values, plus its share of the staging.
//!
//! - chunked kernel (linear and decay attention in the normal form, at most 128 feature
//!   channels), per (batch, head) and slice of 16 output channels: per chunk of `C` keys,
//!   its barriers (two per block of 8 rows, one for the state), the rows' exact pairs
//!   (`C · Dk` each), their state part (`Dk · 16`) and the state update (`Dk · 17 · C`),
//!   spread over the workgroup.
//!
//! It ranks the candidates; the tuner measures them, within the adapter's invocation
//! limit and the workgroup memory every WebGPU adapter has.

use super::{live_tiles, Candidate, SearchSpace};
use attnc_codegen::schedule::tiled::TiledPlan;
use attnc_codegen::schedule::workspace::{TileWorkspace, STAGE_CHANNELS};
use attnc_codegen::wgsl::{chunked_slices, tiled_slices, WgslBackend, WgslOptions, MAX_CHUNKED_FEATURES, WORKGROUP_BYTES};
use attnc_ir::{Bindings, Kernel};
use attnc_passes::interval::LoadOracle;
use attnc_passes::linear::LinearForm;

/// Workgroup sizes tried by the row kernel (each a power of two the backend takes).
const WORKGROUPS: [u32; 4] = [32, 64, 128, 256];
/// Query rows per row of tile classes tried for masked kernels (row kernel).
const CLASS_ROWS: [usize; 2] = [16, 64];
/// Chunked kernel: keys per chunk and workgroup sizes.
const CHUNKS: [usize; 3] = [16, 32, 64];
const CHUNK_WORKGROUPS: [u32; 2] = [64, 256];
/// Tiled kernel: query rows and keys per tile, and invocations per query row.
const TILE_Q: [usize; 3] = [8, 16, 32];
const TILE_K: [usize; 2] = [16, 32];
const ROW_LANES: [u32; 3] = [4, 8, 16];
/// Seconds per live key tile of one row of the row kernel (barriers, bookkeeping).
const TILE_S: f64 = 2e-6;
/// Seconds per workgroup barrier of the tiled kernel.
const BARRIER_S: f64 = 0.7e-6;
/// Invocations an adapter runs at once (a SIMD group; lavapipe's is 8).
const LANES: f64 = 8.0;
/// Seconds per serial step of an invocation (a key of the max/sum loops, a key × channel of
/// the value loop, a multiply-add of the dot).
const STEP_S: f64 = 2e-9;

/// The WGSL search space on the adapter the backend chose.
pub struct WgslSpace {
    pub backend: WgslBackend,
    /// The adapter's invocations per workgroup (workgroups above it are not tried).
    pub max_invocations: u32,
}

impl WgslSpace {
    pub fn new() -> WgslSpace {
        WgslSpace { backend: WgslBackend, max_invocations: WgslBackend.max_invocations() }
    }
}

impl Default for WgslSpace {
    fn default() -> Self {
        WgslSpace::new()
    }
}

/// The fewest channels per invocation that hold `dv` output channels on `workgroup`
/// invocations of the row kernel, when the backend takes that many.
fn channels_for(dv: i64, workgroup: u32) -> Option<u32> {
    let c = (dv.max(1) as u64).div_ceil(workgroup as u64);
    (c <= 32).then_some(c as u32)
}

/// The tiled kernel's channels per invocation for `dv` outputs at `lanes` invocations per
/// row: enough for all of them in one workgroup, else the most it takes (32, in whole
/// shares of a staged chunk), the rest in slices over more workgroups.
fn tiled_channels(dv: i64, lanes: u32) -> u32 {
    let share = STAGE_CHANNELS as u32 / lanes;
    let chunks = (dv.max(1) as u64).div_ceil(STAGE_CHANNELS as u64) as u32;
    share * chunks.min(32 / share)
}

/// The tiled tile shapes within the adapter's invocation limit and WebGPU's workgroup
/// memory, as options (channels left at the default).
fn tiled_shapes(max_invocations: u32) -> Vec<WgslOptions> {
    let mut out = Vec::new();
    for bq in TILE_Q {
        for bk in TILE_K {
            for lanes in ROW_LANES {
                let wg = bq as u32 * lanes;
                let bytes = TileWorkspace { block_q: bq, block_k: bk, staged: true, panels: 1, map_dot: false, key_stat: false }.task_bytes(0, 0);
                if wg < 32 || wg > max_invocations || !(bk as u32).is_multiple_of(lanes) || bytes > WORKGROUP_BYTES as u128 {
                    continue;
                }
                let mut o = WgslOptions { workgroup: wg, ..WgslOptions::default() };
                o.schedule.tiled = true;
                o.schedule.block_q = bq;
                o.schedule.block_k = bk;
                out.push(o);
            }
        }
    }
    out
}

/// The chunked kernel's options (the schedule's other fields at the default).
fn chunked_options(chunk: usize, workgroup: u32) -> WgslOptions {
    let mut o = WgslOptions { workgroup, ..WgslOptions::default() };
    o.schedule.chunk = chunk;
    o
}

fn name(o: &WgslOptions, masked: bool) -> String {
    let s = &o.schedule;
    if s.chunk > 0 {
        format!("chunked {} wg{}", s.chunk, o.workgroup)
    } else if s.tiled {
        format!("tiled {}x{} wg{} ch{}", s.block_q, s.block_k, o.workgroup, o.channels)
    } else if masked {
        format!("rows wg{} ch{} classes/{}", o.workgroup, o.channels, s.block_q)
    } else {
        format!("rows wg{} ch{}", o.workgroup, o.channels)
    }
}

/// The row kernel's options: tiles off, `workgroup` keys per tile, class rows `rows`.
fn row_options(workgroup: u32, channels: u32, rows: usize) -> WgslOptions {
    let mut o = WgslOptions { workgroup, channels, ..WgslOptions::default() };
    o.schedule.tiled = false;
    o.schedule.block_q = rows;
    o
}

impl SearchSpace for WgslSpace {
    type Backend = WgslBackend;
    fn backend(&self) -> &WgslBackend {
        &self.backend
    }

    fn candidates(&self, k: &Kernel, dims: &Bindings, data: &dyn LoadOracle) -> Vec<Candidate<WgslOptions>> {
        let dims = &dims.complete(k);
        let ext = |e: &attnc_ir::Extent| dims.extent(e);
        let (nb, nh, ni, nj, dv) = (ext(&k.iter.b), ext(&k.iter.h), ext(&k.iter.i), ext(&k.iter.j), ext(&k.iter.e));
        let masked = k.branches.iter().any(|b| b.mask.is_some());
        let passes =
            k.branches.len() as f64 * if k.branches.iter().any(|b| matches!(&b.norm, attnc_ir::Norm::Softmax { post: Some(_), .. })) { 2.0 } else { 1.0 };
        let plan = TiledPlan::new(k);
        let default = WgslOptions::default();
        let mut configs: Vec<WgslOptions> = Vec::new();
        let linear = LinearForm::of(k).map(|f| dims.extent(&f.channels)).filter(|&dk| dk <= MAX_CHUNKED_FEATURES);
        if linear.is_some() {
            for c in CHUNKS {
                for wg in CHUNK_WORKGROUPS.into_iter().filter(|&w| w <= self.max_invocations) {
                    configs.push(chunked_options(c, wg));
                }
            }
        }
        if plan.is_some() {
            for mut o in tiled_shapes(self.max_invocations) {
                o.channels = tiled_channels(dv, o.workgroup / o.schedule.block_q as u32);
                configs.push(o);
            }
        }
        for wg in WORKGROUPS.into_iter().filter(|&w| w <= self.max_invocations) {
            let Some(ch) = channels_for(dv, wg) else { continue };
            for rows in if masked { &CLASS_ROWS[..] } else { &CLASS_ROWS[..1] } {
                configs.push(row_options(wg, ch, *rows));
            }
        }
        // The untuned configuration is always a candidate (the tuner's baseline) when it
        // holds this many channels (the tiled kernel holds any number).
        let default_fits = if plan.is_some() { true } else { (default.workgroup * default.channels) as i64 >= dv };
        if default.workgroup <= self.max_invocations && default_fits && !configs.contains(&default) {
            configs.push(default);
        }
        let dot = plan.as_ref().and_then(|p| p.channels()).map_or(0, |d| attnc_ir::bind::eval_dims(d, &dims.dims).unwrap_or(0).max(0));
        let mut out: Vec<Candidate<WgslOptions>> = configs
            .into_iter()
            .map(|o| {
                let wg = o.workgroup as i64;
                let predicted = if let (true, Some(dk)) = (o.schedule.chunk > 0, linear) {
                    let c = o.schedule.chunk as i64;
                    let chunks = (nj + c - 1) / c;
                    let barriers = chunks * (2 * ((ni / chunks.max(1) + 7) / 8).max(1) + 1);
                    let steps = (ni * (c * dk + dk * 16) + nj * dk * 17) / wg;
                    let per_head = BARRIER_S * barriers as f64 + STEP_S * steps as f64 * wg as f64 / LANES;
                    (nb * nh * chunked_slices(dv)) as f64 * per_head
                } else if o.schedule.tiled && plan.is_some() {
                    let (bq, bk) = (o.schedule.block_q as i64, o.schedule.block_k as i64);
                    let tiles = if masked { live_tiles(k, dims, bq, bk, data).live() } else { ((ni + bq - 1) / bq * ((nj + bk - 1) / bk)) as f64 };
                    let lanes = wg / bq;
                    let (keys, share) = (bk / lanes, STAGE_CHANNELS as i64 / lanes);
                    let slices = tiled_slices(&o, dv);
                    let chunks = |n: i64| (n.max(0) + STAGE_CHANNELS as i64 - 1) / STAGE_CHANNELS as i64;
                    let slice_chunks = (chunks(dv) + slices - 1) / slices;
                    let barriers = 2 * chunks(dot) + 2 * slice_chunks + 3;
                    let stage = ((bq + bk) * chunks(dot) + bk * slice_chunks) * STAGE_CHANNELS as i64 / wg;
                    let steps = keys * dot + 2 * bk + bk * share * slice_chunks + stage;
                    let per_tile = BARRIER_S * barriers as f64 + STEP_S * steps as f64 * wg as f64 / LANES;
                    (nb * nh) as f64 * tiles * slices as f64 * per_tile * passes
                } else {
                    let counts = live_tiles(k, dims, o.schedule.block_q as i64, wg, data);
                    // Live (row, key tile) pairs of one head: the classifier's tiles span
                    // `block_q` rows (all of them when nothing is masked).
                    let tiles = if masked { counts.live() * o.schedule.block_q as f64 } else { ni as f64 * (nj as f64 / wg as f64).ceil() };
                    // Every invocation walks the tile's keys (max, sum, values × channels),
                    // and an adapter runs `LANES` invocations at a time (lavapipe: 8): the
                    // serial part grows with the square of the workgroup. Measured on
                    // lavapipe (sliding_window_sink, N = 512, Dv = 32): wg64 ch8 4.5 s,
                    // wg256 ch1 7.9 s.
                    let per_tile = TILE_S + STEP_S * (wg * wg) as f64 / LANES * (2.0 + o.channels as f64);
                    (nb * nh) as f64 * tiles * per_tile * passes
                };
                Candidate { name: name(&o, masked), predicted, options: o, passes_off: vec![] }
            })
            .collect();
        out.sort_by(|a, b| a.predicted.total_cmp(&b.predicted).then_with(|| a.name.cmp(&b.name)));
        out
    }

    fn names(&self, k: &Kernel) -> Vec<String> {
        let masked = k.branches.iter().any(|b| b.mask.is_some());
        let mut names = Vec::new();
        if TiledPlan::new(k).is_some() {
            for o in tiled_shapes(self.max_invocations) {
                for ch in 1..=32 {
                    names.push(name(&WgslOptions { channels: ch, ..o.clone() }, masked));
                }
            }
        }
        for wg in WORKGROUPS.into_iter().filter(|&w| w <= self.max_invocations) {
            for ch in 1..=32 {
                for rows in if masked { &CLASS_ROWS[..] } else { &CLASS_ROWS[..1] } {
                    names.push(name(&row_options(wg, ch, *rows), masked));
                }
            }
        }
        let d = WgslOptions::default();
        if d.workgroup <= self.max_invocations {
            names.push(name(&d, masked));
        }
        if LinearForm::of(k).is_some() {
            for c in CHUNKS {
                for wg in CHUNK_WORKGROUPS.into_iter().filter(|&w| w <= self.max_invocations) {
                    names.push(name(&chunked_options(c, wg), masked));
                }
            }
        }
        let off: Vec<String> = names.iter().map(|n| format!("{n}{}", super::LOWRANK_OFF)).collect();
        names.extend(off);
        names.sort();
        names.dedup();
        names
    }

    /// Nothing the model cannot rank: every candidate is a workgroup shape.
    fn twins(&self, _pruned: &[Candidate<WgslOptions>]) -> Vec<Candidate<WgslOptions>> {
        Vec::new()
    }

    fn default_options(&self) -> WgslOptions {
        WgslOptions::default()
    }

    fn adjust(&self, cached: WgslOptions) -> WgslOptions {
        cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_codegen::Backend;
    use attnc_passes::interval::NoData;

    fn kernel(mask: &str) -> Kernel {
        attnc_ir::parse_kernel(&format!(
            "(kernel t (dim B) (dim H) (dim N) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H N D]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j N) (e D)) (value (load k b h j e)) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))) {mask} (norm (softmax))))"
        ))
        .expect("kernel")
    }

    fn dims(n: i64, d: i64) -> Bindings {
        Bindings { dims: [("B", 1), ("H", 2), ("N", n), ("D", d)].iter().map(|(a, b)| (a.to_string(), *b)).collect() }
    }

    #[test]
    fn candidates_hold_every_channel_within_the_limit_and_include_the_default() {
        let space = WgslSpace { backend: WgslBackend, max_invocations: 128 };
        let k = kernel("(mask (<= j i))");
        let all = space.candidates(&k, &dims(500, 64), &NoData);
        assert!(all.iter().all(|c| c.options.workgroup <= 128));
        assert!(all.iter().filter(|c| !c.options.schedule.tiled).all(|c| c.options.workgroup * c.options.channels >= 64), "a row kernel holds every channel");
        assert!(all.iter().all(|c| WgslBackend.check_options(&c.options).is_ok()), "the backend takes every candidate");
        assert!(all.iter().any(|c| c.options.schedule.tiled) && all.iter().any(|c| !c.options.schedule.tiled), "both kernels compete");
        assert!(all.windows(2).all(|w| w[0].predicted <= w[1].predicted), "cheapest first");
        let names = space.names(&k);
        assert!(all.iter().all(|c| names.contains(&c.name)), "the key's checksum covers every candidate");
        // The default (256 invocations) is the baseline where the adapter takes it.
        let wide = WgslSpace { backend: WgslBackend, max_invocations: 256 };
        let all = wide.candidates(&k, &dims(500, 64), &NoData);
        assert!(all.iter().any(|c| c.options == WgslOptions::default()), "the default is the baseline");
        assert!(all.iter().all(|c| wide.names(&k).contains(&c.name)));
        // Dv = 8192 fits no row kernel of 128 invocations at 32 channels: only the tiled
        // kernel, in slices of the channels.
        let big = space.candidates(&k, &dims(64, 8192), &NoData);
        assert!(!big.is_empty() && big.iter().all(|c| c.options.schedule.tiled && attnc_codegen::wgsl::tiled_slices(&c.options, 8192) > 1));
        // Unmasked kernels do not vary the class rows.
        let plain = space.candidates(&kernel(""), &dims(500, 64), &NoData);
        assert!(plain.iter().filter(|c| !c.options.schedule.tiled).all(|c| c.options.schedule.block_q == 16));
        // The tiled shapes fit WebGPU's 16 KiB of workgroup memory.
        assert!(tiled_shapes(256).iter().all(|o| TileWorkspace {
            block_q: o.schedule.block_q,
            block_k: o.schedule.block_k,
            staged: true,
            panels: 1,
            map_dot: false,
            key_stat: false
        }
        .task_bytes(0, 0)
            <= WORKGROUP_BYTES as u128));
    }

    #[test]
    fn the_model_prices_masked_tiles_out() {
        let space = WgslSpace { backend: WgslBackend, max_invocations: 256 };
        let causal = space.candidates(&kernel("(mask (<= j i))"), &dims(2048, 64), &NoData);
        let full = space.candidates(&kernel(""), &dims(2048, 64), &NoData);
        let rows = |v: &[Candidate<WgslOptions>], wg: u32| {
            v.iter().find(|c| !c.options.schedule.tiled && c.options.workgroup == wg && c.options.schedule.block_q == 16).expect("candidate").predicted
        };
        let r = rows(&causal, 64) / rows(&full, 64);
        assert!((0.45..0.6).contains(&r), "causal costs about half: {r}");
        let tiled = |v: &[Candidate<WgslOptions>]| {
            v.iter()
                .find(|c| c.options.schedule.tiled && c.options.schedule.block_q == 16 && c.options.schedule.block_k == 16 && c.options.workgroup == 64)
                .expect("candidate")
                .predicted
        };
        let r = tiled(&causal) / tiled(&full);
        assert!((0.45..0.6).contains(&r), "causal costs about half on the tiled kernel too: {r}");
    }
}
