//! Hostile but fair inputs: each gets exit 0 with the right answer, or exit 1 (2 for usage)
//! with a message naming the problem; never a panic, an abort or a silently wrong answer.

use attnc::ir::reference::Tensor;
use std::collections::BTreeMap;
use std::process::Command;

fn attnc_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_attnc"));
    c.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn attnc(args: &[&str]) -> (i32, String, String) {
    attnc_env(args, &[])
}

fn tmp(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("attnc-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name).display().to_string()
}

fn spec_file(name: &str, text: &str) -> String {
    let p = tmp(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Random inputs of `spec` at `dims`, with `edit` applied, written to a file.
fn inputs_with(spec: &str, dims: &str, file: &str, edit: &dyn Fn(&mut BTreeMap<String, Tensor>)) -> String {
    let c = attnc::dsl::compile(&std::fs::read_to_string(spec).unwrap_or_else(|_| spec.to_string())).expect("spec");
    let b = attnc::bind_dims(&c, &attnc::parse_dims(dims).unwrap()).expect("dims");
    let mut ins = attnc::inputs::random_inputs(&c.kernel, &b, &c.ranges, 1).unwrap();
    edit(&mut ins);
    let list: Vec<(String, attnc::ir::DType, &Tensor)> = c.kernel.inputs().map(|t| (t.name.clone(), t.dtype, &ins[&t.name])).collect();
    let path = tmp(file);
    attnc::io::write(std::path::Path::new(&path), &list).unwrap();
    path
}

const SMALL: &str = "B=1,H=2,G=2,N=16,M=16,D=8,Dv=8";

#[test]
fn out_of_range_indices_are_refused_not_clamped() {
    // Depends on the dims (H ≤ 10^8): refused when they bind, before the kernel runs.
    let shifted = spec_file("shifted.attn", &example("alibi").replace("k[b, hk, j, :]", "k[b, hk - 100000000, j, :]"));
    let (code, _, err) = attnc(&["run", &shifted, "--random", "--dims", SMALL, "-o", &tmp("o1.safetensors")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("index `h // (H // G) - 100000000` of axis 1 of `k` is -100000000 at (b=0, h=0") && err.contains("the reference refuses"), "{err}");
    // From data: a permutation with one entry past the end names the element.
    let perm = spec_file(
        "perm.attn",
        "attention perm {\n dims B, H, N, M, D\n input q: f32[B, H, N, D]\n input k: f32[B, H, M, D]\n input v: f32[B, H, M, D]\n input perm: i32[M] in 0..M\n output o: f32[B, H, N, D]\n score = dot(q[b, h, i, :], k[b, h, perm[j], :]) / sqrt(D)\n value = v[b, h, j, e]\n}\n",
    );
    let ins = inputs_with(&perm, "B=1,H=2,N=16,M=16,D=8", "perm-in.safetensors", &|ins| ins.get_mut("perm").unwrap().data[3] = 1e8);
    let (code, _, err) = attnc(&["run", &perm, "--input", &ins, "-o", &tmp("o2.safetensors")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("read from `perm[3]` = 100000000"), "{err}");
    let ok = inputs_with(&perm, "B=1,H=2,N=16,M=16,D=8", "perm-ok.safetensors", &|_| {});
    let (code, _, err) = attnc(&["run", &perm, "--input", &ok, "-o", &tmp("o3.safetensors"), "--check"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn sizes_that_do_not_fit_are_errors_naming_them() {
    let (code, _, err) =
        attnc(&["run", "examples/sdpa.attn", "--random", "--dims", "B=1,H=1,N=4,M=4,D=4611686018427387905,Dv=4", "-o", &tmp("s1.safetensors")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`q` would have") && err.contains("more than attnc handles"), "{err}");
    let (code, _, err) = attnc(&[
        "run",
        "examples/sdpa.attn",
        "--random",
        "--dims",
        "B=4611686018427387905,H=1,N=4,M=4,D=4,Dv=4",
        "-o",
        &tmp("s2.safetensors"),
        "--backend",
        "reference",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("more than attnc handles"), "{err}");
    let big = spec_file(
        "big.attn",
        &example("alibi").replace("output o:", "tensor Z[x, y]: f32[4294967296, 4294967296] = 1.0\n  output o:").replace("bias = ", "bias = Z[0, 0] * "),
    );
    let (code, _, err) = attnc(&["run", &big, "--random", "--dims", SMALL, "-o", &tmp("s3.safetensors"), "--check"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`Z` would have 18446744073709551616 elements"), "{err}");
}

#[test]
fn the_low_rank_bias_steps_aside_for_inputs_it_would_round_badly() {
    let ins = inputs_with("examples/alibi.attn", "B=1,H=2,G=2,N=64,M=64,D=16,Dv=16", "slope.safetensors", &|ins| ins.get_mut("slope").unwrap().data[0] = 1e38);
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--input", &ins, "-o", &tmp("l.safetensors"), "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the exact low-rank bias is off for these inputs") && err.contains("beyond what the f32 dot holds"), "{err}");
}

#[test]
fn deep_and_long_specs_get_diagnostics_or_compile() {
    let base = example("sdpa");
    let deep = spec_file("deep.attn", &base.replace("value =", &format!("let unused = {}1.0{}\n  value =", "(".repeat(3000), ")".repeat(3000))));
    let (code, _, err) = attnc(&["check", &deep]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("E0030") && err.contains("brackets nest more than 256 deep"), "{err}");
    let chain: String = (1..3000).map(|n| format!("  let y{n} = y{} + 1.0\n", n - 1)).collect();
    let lets = spec_file("lets.attn", &base.replace("value =", &format!("let y0 = float(j)\n{chain}  bias = y2999 * 0.0\n  value =")));
    let (code, _, err) = attnc(&["check", &lets]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("E0030") && err.contains("expanded more than 128 deep"), "{err}");
    let doubling: String = (1..40).map(|n| format!("  let x{n} = x{} * x{}\n", n - 1, n - 1)).collect();
    let dbl = spec_file("double.attn", &base.replace("value =", &format!("let x0 = float(j)\n{doubling}  bias = x39 * 0.0\n  value =")));
    let (code, _, err) = attnc(&["check", &dbl]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("E0030") && err.contains("copies"), "{err}");
    // A generated flat sum of 5000 terms is a real use: it checks, optimizes and compiles, on
    // a test thread's small stack.
    let flat: String = (0..5000).map(|n| format!("float(j) * {n}.0")).collect::<Vec<_>>().join(" + ");
    let src = base.replace("value =", &format!("bias = ({flat}) * 0.0\n  value ="));
    let c = attnc::dsl::compile(&src).expect("a flat sum checks");
    let (oc, _) = attnc::optimize(&c, &attnc::passes::PassConfig::all()).expect("optimizes");
    use attnc_codegen::Backend;
    attnc_codegen::cpu::CpuBackend::default().compile(&oc.kernel, &oc.info, &attnc_codegen::cpu::CpuOptions::default()).expect("compiles");
    // A byte order mark is a blank.
    let bom = spec_file("bom.attn", &format!("\u{feff}{base}"));
    assert_eq!(attnc(&["check", &bom]).0, 0);
}

#[test]
fn memory_tiles_threads_and_runs_are_bounded() {
    let (code, _, err) = attnc(&["run", "examples/sdpa.attn", "--random", "--dims", "B=1,H=8,N=100000000,M=100000000,D=64,Dv=64", "-o", &tmp("m.safetensors")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("this run needs about") && err.contains("TiB"), "{err}");
    let (code, _, err) =
        attnc(&["run", "examples/sdpa.attn", "--random", "--dims", "B=1,H=2,N=512,M=512,D=64,Dv=64", "-o", &tmp("m2.safetensors"), "--max-memory", "1M"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("allowed by ATTNC_MAX_MEMORY / --max-memory (1M)"), "{err}");
    let dims = "B=1,H=1,N=64,M=64,D=4,Dv=4";
    let (code, _, err) = attnc(&["bench", "examples/sdpa.attn", "--dims", dims, "--block-k", "1099511627776"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("at most 4096"), "{err}");
    let (code, _, err) = attnc(&["bench", "examples/sdpa.attn", "--dims", dims, "--threads", "100000"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--threads: 100000 threads: at most"), "{err}");
    assert_eq!(attnc(&["bench", "examples/sdpa.attn", "--dims", dims, "--runs", "0"]).0, 2);
    // A cache entry asking for 100000 threads is ignored with a warning.
    let cache = tmp("cache");
    let env = [("ATTNC_CACHE_DIR", cache.as_str())];
    let (code, out, err) = attnc_env(&["tune", "examples/sdpa.attn", "--dims", dims, "--top-k", "2", "--samples", "1"], &env);
    assert_eq!(code, 0, "{out}{err}");
    for e in std::fs::read_dir(&cache).unwrap() {
        let path = e.unwrap().path();
        let mut entry: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        entry["options"]["threads"] = 100000.into();
        std::fs::write(&path, entry.to_string()).unwrap();
    }
    let (code, _, err) = attnc_env(&["run", "examples/sdpa.attn", "--random", "--dims", dims, "-o", &tmp("t.safetensors")], &env);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: ignoring the tuned winner") && err.contains("100000 threads"), "{err}");
    // An unwritable cache directory is named.
    let (code, _, err) =
        attnc_env(&["tune", "examples/sdpa.attn", "--dims", dims, "--top-k", "1", "--samples", "1"], &[("ATTNC_CACHE_DIR", "/proc/attnc-cache")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot write the tuning cache in /proc/attnc-cache"), "{err}");
}

#[test]
fn shapes_dims_and_files_get_precise_messages() {
    let dims = "B=1,H=2,N=16,M=16,D=8,Dv=8";
    let ins = inputs_with("examples/sdpa.attn", dims, "sdpa-in.safetensors", &|_| {});
    let rank3 = inputs_with("examples/sdpa.attn", dims, "rank3.safetensors", &|ins| ins.get_mut("q").unwrap().shape = vec![2, 16, 8]);
    let (code, _, err) = attnc(&["run", "examples/sdpa.attn", "--input", &rank3, "-o", &tmp("r.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("input `q` has 3 axes [2, 16, 8] but the spec declares 4 axes"), "{err}");
    let d15 = inputs_with("examples/sdpa.attn", dims, "d15.safetensors", &|ins| {
        ins.insert("q".into(), Tensor::new(vec![1, 2, 16, 15], vec![0.5; 2 * 16 * 15]));
    });
    let (code, _, err) = attnc(&["run", "examples/sdpa.attn", "--input", &d15, "-o", &tmp("r.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("inputs disagree on dim `D`: `q` has 15") && err.contains("`k` has 8"), "{err}");
    let (code, _, err) = attnc(&["run", "examples/sdpa.attn", "--random", "--dims", "B=1,B=2,H=1,N=4,M=4,D=4,Dv=4", "-o", &tmp("r.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("`B` is given twice"), "{err}");
    // -o a directory, -o in a missing directory: refused up front, nothing left behind.
    let dir = tmp("outdir");
    std::fs::create_dir_all(&dir).unwrap();
    let (code, _, err) = attnc(&["run", "examples/sdpa.attn", "--input", &ins, "-o", &dir]);
    assert_eq!(code, 1);
    assert!(err.contains("is a directory"), "{err}");
    let (code, _, err) = attnc(&["run", "examples/sdpa.attn", "--input", &ins, "-o", &format!("{dir}/missing/x.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist") && !err.contains(".tmp"), "{err}");
    let stray: Vec<_> = std::fs::read_dir(std::path::Path::new(&dir).parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "no temporary files left: {stray:?}");
    // -o the input file: refused, the input kept.
    let before = std::fs::read(&ins).unwrap();
    let (code, _, err) = attnc(&["run", "examples/sdpa.attn", "--input", &ins, "-o", &ins]);
    assert_eq!(code, 1);
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(std::fs::read(&ins).unwrap(), before);
    // A failed --check writes nothing: a bias that cancels in f32 (`j + 1e8 - 1e8`) but not
    // in f64, compiled as written.
    let cancel = spec_file("cancel.attn", &example("sdpa").replace("/ sqrt(D)\n", "/ sqrt(D)\n  bias = (float(j) + 100000000.0 - 100000000.0) * 10.0\n"));
    let out = tmp("kept.safetensors");
    std::fs::write(&out, b"earlier").unwrap();
    let (code, _, err) = attnc(&["run", &cancel, "--random", "--dims", dims, "-o", &out, "--check", "--no-opt"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was not written"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"earlier");
}
