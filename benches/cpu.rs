//! Criterion benchmarks of the CPU backend on a few variants at a small shape (the full
//! comparison against PyTorch is `bench/compare_torch.py`). Throughput is in useful
//! elements: unmasked (query, key) pairs.

use attnc_codegen::cpu::{CpuKernel, CpuOptions, Storage};
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
            let k = CpuKernel::compile(&checked.kernel, &checked.info, &opts).unwrap();
            g.bench_function(format!("{name}/{path}"), |b| b.iter(|| std::hint::black_box(k.run_storage(&storage, &BTreeMap::new()).unwrap())));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
