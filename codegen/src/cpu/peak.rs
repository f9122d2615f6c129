//! The host's FMA peak: what the matmul microkernels are measured against.
//!
//! Each thread runs a loop of independent fused multiply-adds on registers only (12
//! accumulators, more than the FMA latency times the FMA ports of any x86 core we have met:
//! Zen 2/3 4 × 2, Zen 5 and Xeon 4 × 2), at the widest vector width the host offers
//! (AVX-512: 16 lanes, AVX2+FMA: 8, else scalar `mul_add` on 4 lanes the compiler may
//! vectorize). No memory traffic, so it is an upper bound no attention kernel reaches.

use super::microkernel::Isa;
use std::time::Instant;

/// The measured peak.
#[derive(Clone, Copy, Debug)]
pub struct FmaPeak {
    pub gflops: f64,
    pub isa: Isa,
    pub threads: usize,
}

const CHAINS: usize = 12;

/// FLOPs of one iteration of the loop at `lanes` lanes (an FMA is 2).
fn flops_per_iter(lanes: usize) -> f64 {
    (CHAINS * lanes * 2) as f64
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: u64, seed: f32) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for r in acc {
            s = _mm512_add_ps(s, r);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: u64, seed: f32) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(seed); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for r in acc {
            s = _mm256_add_ps(s, r);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

fn portable(iters: u64, seed: f32) -> f32 {
    let mut acc = [[seed; 4]; CHAINS];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            for x in r.iter_mut() {
                *x = x.mul_add(0.999_999, 1e-7);
            }
        }
    }
    acc.iter().flatten().sum()
}

/// Runs the loop for `iters` iterations on the host's widest ISA; returns the lanes.
fn run(isa: Isa, iters: u64, seed: f32) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa::detect` saw the features these functions enable.
        Isa::Avx512 => return (16, unsafe { x86::avx512(iters, seed) }),
        Isa::Avx2 => return (8, unsafe { x86::avx2(iters, seed) }),
        Isa::Portable => {}
    }
    let _ = isa;
    (4, portable(iters, seed))
}

/// Measures the FMA peak on `threads` threads (0: one per core) for about `seconds`: the best
/// of three timed runs after a warm-up, each thread running the same iteration count.
pub fn fma_peak(threads: usize, seconds: f64) -> FmaPeak {
    let isa = Isa::detect();
    let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    // Calibrate on one thread: iterations for a third of the time.
    let probe = 1u64 << 16;
    let t = Instant::now();
    let (lanes, sink) = run(isa, probe, 1.0);
    std::hint::black_box(sink);
    let per_iter = t.elapsed().as_secs_f64() / probe as f64;
    let iters = ((seconds / 3.0 / per_iter.max(1e-12)) as u64).max(probe);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for n in 0..threads {
                s.spawn(move || std::hint::black_box(run(isa, iters, 1.0 + n as f32)));
            }
        });
        let secs = t.elapsed().as_secs_f64();
        best = best.max(flops_per_iter(lanes) * iters as f64 * threads as f64 / secs / 1e9);
    }
    FmaPeak { gflops: best, isa, threads }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_computes_what_it_claims() {
        // x ← 0.999999·x + 1e-7 from 1.0, 3 times: the same on every ISA (no loop dropped).
        let want: f32 = {
            let mut x = 1.0f32;
            for _ in 0..3 {
                x = x.mul_add(0.999_999, 1e-7);
            }
            x
        };
        let isa = Isa::detect();
        let (lanes, s) = run(isa, 3, 1.0);
        assert!((s - want * (CHAINS * lanes) as f32).abs() < 1e-3, "{s} vs {}", want * (CHAINS * lanes) as f32);
        assert!(fma_peak(1, 0.05).gflops > 0.0);
    }
}
