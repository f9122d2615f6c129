//! The WGSL search space ([`WgslSpace`]): the row kernel's workgroup size (keys per tile),
//! the output channels each invocation holds, and, for masked kernels, how many query rows
//! share one row of tile classes.
//!
//! The cost model is coarse on purpose (GPUs differ too much for fitted constants to carry
//! over; lavapipe is a CPU): per live key tile a workgroup runs a fixed part (three
//! barriers and the tile's bookkeeping) and a serial part every invocation walks (the
//! tile's keys for the maximum and the sum, and its keys × channels for the values),
//! `LANES` invocations at a time. It
//! ranks the candidates; the tuner measures them, within the adapter's invocation limit.

use super::{live_tiles, Candidate, SearchSpace};
use attnc_codegen::wgsl::{WgslBackend, WgslOptions};
use attnc_ir::{Bindings, Kernel};
use attnc_passes::interval::LoadOracle;

/// Workgroup sizes tried (each a power of two the backend takes).
const WORKGROUPS: [u32; 4] = [32, 64, 128, 256];
/// Query rows per row of tile classes tried for masked kernels.
const CLASS_ROWS: [usize; 2] = [16, 64];
/// Seconds per live key tile of one row (barriers, the tile's bookkeeping).
const TILE_S: f64 = 2e-6;
/// Invocations an adapter runs at once (a SIMD group; lavapipe's is 8).
const LANES: f64 = 8.0;
/// Seconds per serial step of an invocation (a key of the max/sum loops, a key × channel of
/// the value loop).
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
/// invocations, when the backend takes that many.
fn channels_for(dv: i64, workgroup: u32) -> Option<u32> {
    let c = (dv.max(1) as u64).div_ceil(workgroup as u64);
    (c <= 32).then_some(c as u32)
}

fn name(o: &WgslOptions, masked: bool) -> String {
    if masked {
        format!("rows wg{} ch{} classes/{}", o.workgroup, o.channels, o.schedule.block_q)
    } else {
        format!("rows wg{} ch{}", o.workgroup, o.channels)
    }
}

impl SearchSpace for WgslSpace {
    type Backend = WgslBackend;
    fn backend(&self) -> &WgslBackend {
        &self.backend
    }

    fn candidates(&self, k: &Kernel, dims: &Bindings, data: &dyn LoadOracle) -> Vec<Candidate<WgslOptions>> {
        let ext = |e: &attnc_ir::Extent| dims.extent(e);
        let (nb, nh, ni, nj, dv) = (ext(&k.iter.b), ext(&k.iter.h), ext(&k.iter.i), ext(&k.iter.j), ext(&k.iter.e));
        let masked = k.branches.iter().any(|b| b.mask.is_some());
        let passes =
            k.branches.len() as f64 * if k.branches.iter().any(|b| matches!(&b.norm, attnc_ir::Norm::Softmax { post: Some(_), .. })) { 2.0 } else { 1.0 };
        let default = WgslOptions::default();
        let mut configs: Vec<WgslOptions> = Vec::new();
        for wg in WORKGROUPS.into_iter().filter(|&w| w <= self.max_invocations) {
            let Some(ch) = channels_for(dv, wg) else { continue };
            for rows in if masked { &CLASS_ROWS[..] } else { &CLASS_ROWS[..1] } {
                let mut o = default.clone();
                o.workgroup = wg;
                o.channels = ch;
                o.schedule.block_q = *rows;
                configs.push(o);
            }
        }
        // The untuned configuration is always a candidate (the tuner's baseline) when it
        // holds this many channels.
        if default.workgroup <= self.max_invocations && (default.workgroup * default.channels) as i64 >= dv && !configs.contains(&default) {
            configs.push(default);
        }
        let mut out: Vec<Candidate<WgslOptions>> = configs
            .into_iter()
            .map(|o| {
                let wg = o.workgroup as i64;
                let counts = live_tiles(k, dims, o.schedule.block_q as i64, wg, data);
                // Live (row, key tile) pairs of one head: the classifier's tiles span
                // `block_q` rows (all of them when nothing is masked).
                let tiles = if masked { counts.live() * o.schedule.block_q as f64 } else { ni as f64 * (nj as f64 / wg as f64).ceil() };
                // Every invocation walks the tile's keys (max, sum, values × channels), and
                // an adapter runs `LANES` invocations at a time (lavapipe: 8): the serial
                // part grows with the square of the workgroup. Measured on lavapipe
                // (sliding_window_sink, N = 512, Dv = 32): wg64 ch8 4.5 s, wg256 ch1 7.9 s.
                let per_tile = TILE_S + STEP_S * (wg * wg) as f64 / LANES * (2.0 + o.channels as f64);
                Candidate { name: name(&o, masked), predicted: (nb * nh) as f64 * tiles * per_tile * passes, options: o, passes_off: vec![] }
            })
            .collect();
        out.sort_by(|a, b| a.predicted.total_cmp(&b.predicted).then_with(|| a.name.cmp(&b.name)));
        out
    }

    fn names(&self, k: &Kernel) -> Vec<String> {
        let masked = k.branches.iter().any(|b| b.mask.is_some());
        let mut names = Vec::new();
        for wg in WORKGROUPS.into_iter().filter(|&w| w <= self.max_invocations) {
            for ch in 1..=32 {
                for rows in if masked { &CLASS_ROWS[..] } else { &CLASS_ROWS[..1] } {
                    let mut o = WgslOptions { workgroup: wg, channels: ch, ..WgslOptions::default() };
                    o.schedule.block_q = *rows;
                    names.push(name(&o, masked));
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
        assert!(all.iter().all(|c| c.options.workgroup <= 128 && (c.options.workgroup * c.options.channels) >= 64));
        assert!(all.iter().any(|c| c.options == WgslOptions::default()), "the default is the baseline");
        assert!(all.windows(2).all(|w| w[0].predicted <= w[1].predicted), "cheapest first");
        let names = space.names(&k);
        assert!(all.iter().all(|c| names.contains(&c.name)), "the key's checksum covers every candidate");
        // Dv = 4096 fits no workgroup of 128 at 32 channels: no candidate, not a wrong one.
        assert!(space.candidates(&k, &dims(64, 8192), &NoData).is_empty());
        // Unmasked kernels do not vary the class rows.
        let plain = space.candidates(&kernel(""), &dims(500, 64), &NoData);
        assert!(plain.iter().all(|c| c.options.schedule.block_q == 16));
    }

    #[test]
    fn the_model_prices_masked_tiles_out() {
        let space = WgslSpace { backend: WgslBackend, max_invocations: 256 };
        let causal = space.candidates(&kernel("(mask (<= j i))"), &dims(2048, 64), &NoData);
        let full = space.candidates(&kernel(""), &dims(2048, 64), &NoData);
        let at = |v: &[Candidate<WgslOptions>], wg: u32| {
            v.iter().find(|c| c.options.workgroup == wg && c.options.schedule.block_q == 16).expect("candidate").predicted
        };
        let r = at(&causal, 64) / at(&full, 64);
        assert!((0.45..0.6).contains(&r), "causal costs about half: {r}");
    }
}
