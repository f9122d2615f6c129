//! Criterion benchmarks of the CPU backend on a few variants at a small shape (the full
//! comparison against PyTorch is `bench/compare_torch.py`). Throughput is in useful
//! elements: unmasked (query, key) pairs.

use attnc_codegen::cpu::{CpuBackend, CpuOptions};
use attnc_codegen::host::Storage;
use attnc_codegen::Backend;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::BTreeMap;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    for (name, dims) in [
        ("sdpa", "B=1,H=4,N=512,M=512,D=64,Dv=64"),
        ("sdpa_causal", "B=1,H=4,N=512,M=512,D=64,Dv=64"),
        ("alibi", "B=1,H=4,G=4,N=512,M=512,D=64,Dv=64"),
        ("sliding_window_sink", "B=1,H=4,G=4,N=512,M=512,D=64,Dv=64"),
    ] {
        let src = std::fs::read_to_string(format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let checked = attnc::dsl::compile(&src).unwrap();
        let dims = attnc::parse_dims(dims).unwrap();
        let bound = attnc::bind_dims(&checked, &dims).unwrap();
        let inputs = attnc::inputs::random_inputs(&checked.kernel, &bound, &checked.ranges, 0).unwrap();
        let storage = Storage::from_f64(&checked.kernel, &inputs);
        let pairs = 4 * 512 * 512 / if name == "sdpa" { 1 } else { 2 };
        g.throughput(Throughput::Elements(pairs));
        for (path, opts) in [("tiled", CpuOptions::default()), ("generated-matmul", CpuOptions { microkernel: false, ..CpuOptions::default() })] {
            let k = CpuBackend::default().compile(&checked.kernel, &checked.info, &opts).unwrap();
            g.bench_function(format!("{name}/{path}"), |b| b.iter(|| std::hint::black_box(k.run_storage(&storage, &BTreeMap::new()).unwrap())));
        }
    }
    g.finish();
}

/// The tile microkernels alone on one 64 × 64 tile with D = Dv = 64 (hot in cache): the
/// matmuls in FLOP, the softmax step in scores. Against the FMA peak of the host, these say
/// how much of a tiled kernel's time is the matmuls' own inefficiency.
fn microkernels(c: &mut Criterion) {
    use attnc_codegen::cpu::microkernel::{kernels, qk_max_kernel, softmax_kernel, Isa};
    let isa = Isa::detect();
    let (qk, pv) = kernels(isa);
    let (qk_max, softmax) = (qk_max_kernel(isa), softmax_kernel(isa));
    let (bq, bk, d) = (64usize, 64usize, 64usize);
    let a: Vec<f32> = (0..bq * d).map(|i| (i % 7) as f32 * 0.01).collect();
    let kt: Vec<f32> = (0..bk * d).map(|i| (i % 5) as f32 * 0.01).collect();
    let v: Vec<f32> = (0..bk * d).map(|i| (i % 3) as f32 * 0.01).collect();
    let (mut s, mut o) = (vec![0f32; bq * bk], vec![0f32; bq * d]);
    let (mut m, mut l, mut corr, mut rowmax) = (vec![f32::NEG_INFINITY; bq], vec![0f32; bq], vec![1f32; bq], vec![0f32; bq]);
    let mut g = c.benchmark_group(format!("microkernel-{isa:?}"));
    g.throughput(Throughput::Elements((2 * bq * bk * d) as u64));
    // SAFETY (all four): the buffers hold the rows and columns each kernel reads and writes.
    g.bench_function("qk 64x64x64 (FLOP)", |b| b.iter(|| unsafe { qk(a.as_ptr(), d as i64, kt.as_ptr(), s.as_mut_ptr(), bq as i64, d as i64, bk as i64) }));
    g.bench_function("qk_max 64x64x64 (FLOP)", |b| {
        b.iter(|| unsafe { qk_max(a.as_ptr(), d as i64, kt.as_ptr(), s.as_mut_ptr(), bq as i64, d as i64, bk as i64, rowmax.as_mut_ptr()) })
    });
    g.bench_function("pv 64x64x64 (FLOP)", |b| {
        b.iter(|| unsafe { pv(s.as_ptr(), bk as i64, v.as_ptr(), d as i64, o.as_mut_ptr(), d as i64, corr.as_ptr(), bq as i64, bk as i64, d as i64) })
    });
    g.throughput(Throughput::Elements((bq * bk) as u64));
    g.bench_function("softmax 64x64 (scores)", |b| {
        b.iter(|| unsafe { softmax(s.as_mut_ptr(), bk as i64, bq as i64, bk as i64, m.as_mut_ptr(), l.as_mut_ptr(), corr.as_mut_ptr(), std::ptr::null()) })
    });
    g.finish();
}

criterion_group!(benches, bench, microkernels);
criterion_main!(benches);
