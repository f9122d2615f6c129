//! The command line contract: exit codes, messages naming tensors and shapes, file round trips.

use std::process::Command;

fn attnc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attnc")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn tmp(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("attnc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name).display().to_string()
}

#[test]
fn check_accepts_examples_and_rejects_errors() {
    let (code, out, _) = attnc(&["check", "examples/alibi.attn", "examples/gla.attn"]);
    assert_eq!(code, 0);
    assert!(out.contains("ok: examples/alibi.attn"));
    let bad = tmp("bad.attn");
    std::fs::write(&bad, "attention x { dims B\n input q: f33[B]\n }").unwrap();
    let (code, _, err) = attnc(&["check", &bad]);
    assert_eq!(code, 1, "a diagnostic is a user error");
    assert!(err.contains("error[E0004]") && err.contains("did you mean `f32`?"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(attnc(&["frobnicate"]).0, 2);
    assert_eq!(attnc(&["run", "examples/sdpa.attn"]).0, 2, "run needs --input or --random and --output");
}

#[test]
fn inputs_then_run_round_trip() {
    let ins = tmp("in.safetensors");
    let out = tmp("out.safetensors");
    let (code, _, err) = attnc(&["inputs", "examples/alibi.attn", "--dims", "B=1,H=2,G=1,N=9,M=12,D=8,Dv=4", "-o", &ins]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--input", &ins, "-o", &out, "--backend", "reference"]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("o").unwrap().shape(), &[1, 2, 9, 4]);
    // --random with the same seed gives the same output as the saved inputs.
    let out2 = tmp("out2.safetensors");
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--random", "--dims", "B=1,H=2,G=1,N=9,M=12,D=8,Dv=4", "-o", &out2, "--backend", "reference"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&out2).unwrap(), bytes);
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let ins = tmp("gqa.safetensors");
    let (code, _, err) = attnc(&["inputs", "examples/sdpa.attn", "--dims", "B=1,H=2,N=4,M=4,D=8,Dv=8", "-o", &ins]);
    assert_eq!(code, 0, "{err}");
    // alibi needs `slope`, which the sdpa inputs do not have.
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--input", &ins, "-o", &tmp("x.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("`slope`") && err.contains("[H]"), "{err}");
    // gqa_causal binds G from k (2 heads) but H = 2 from q: fine; mla_decode wants 576 channels.
    let (code, _, err) = attnc(&["run", "examples/mla_decode.attn", "--input", &ins, "-o", &tmp("y.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("`q`") && err.contains("576"), "{err}");
}

#[test]
fn requirements_are_checked_with_values() {
    let (code, _, err) = attnc(&["run", "examples/gqa_causal.attn", "--random", "--dims", "B=1,H=6,G=4,N=4,M=4,D=8,Dv=8", "-o", &tmp("z.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("H % G == 0") && err.contains("H = 6") && err.contains("G = 4"), "{err}");
    let (code, _, err) = attnc(&["run", "examples/gqa_causal.attn", "--random", "--dims", "B=1,H=2,N=4", "-o", &tmp("w.safetensors")]);
    assert_eq!(code, 1);
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn compile_emits_ir_that_parses() {
    let (code, out, _) = attnc(&["compile", "examples/swin_window.attn", "--emit", "ir"]);
    assert_eq!(code, 0);
    attnc::ir::parse_kernel(&out).expect("emitted IR parses");
    let (code, out, _) = attnc(&["explain", "examples/alibi.attn"]);
    assert_eq!(code, 0);
    assert!(out.contains("bias      -slope[h] * float(i + (M - N) - j)"), "{out}");
}

#[test]
fn tune_caches_a_winner_that_run_and_bench_use() {
    let cache = tmp("tune-cache");
    let report = tmp("tune-report");
    let run = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_attnc")).args(args).env("ATTNC_CACHE_DIR", &cache).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("runs");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let dims = "B=1,H=2,G=1,N=96,M=96,D=16,Dv=16";
    let (code, out, err) = run(&["tune", "examples/alibi.attn", "--dims", dims, "--top-k", "3", "--samples", "2", "--report", &report]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cached in") && out.contains('*'), "{out}");
    // The default configuration is always measured (the baseline the winner is held to),
    // whatever the cost model ranked; whether it is timed to the end or stopped early as 3×
    // slower than the best depends on the machine's load, so only its row is required.
    // (Its row exactly: not a twin such as "tiled 64x64 lowrank-off", which has the same options.)
    let is_default_row = |l: &str| {
        let w: Vec<&str> = l.trim_start_matches(['*', ' ']).split_whitespace().take(3).collect();
        w.len() == 3 && w[..2] == ["tiled", "64x64"] && w[2].parse::<f64>().is_ok()
    };
    assert!(out.lines().any(is_default_row), "{out}");
    for f in ["tune.csv", "tune.json", "tune.svg"] {
        assert!(std::path::Path::new(&report).join(f).exists(), "{f} written");
    }
    let (code, _, err) = run(&["run", "examples/alibi.attn", "--random", "--dims", dims, "-o", &tmp("tuned.safetensors"), "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("options from tuned"), "{err}");
    // ALiBi's bias is rewritten by `lowrank`: the spec without it is in the search too.
    assert!(out.lines().any(|l| l.contains(" lowrank-off ")), "{out}");
    // A cached winner without the low-rank bias runs the spec optimized without it.
    for e in std::fs::read_dir(&cache).unwrap() {
        let path = e.unwrap().path();
        let mut entry: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        entry["winner"] = "tiled 64x64 lowrank-off".into();
        entry["passes_off"] = serde_json::json!(["lowrank"]);
        std::fs::write(&path, entry.to_string()).unwrap();
    }
    let (code, _, err) = run(&["run", "examples/alibi.attn", "--random", "--dims", dims, "-o", &tmp("tuned-off.safetensors"), "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("without lowrank"), "{err}");
    let (code, out, err) = run(&["bench", "examples/alibi.attn", "--dims", dims, "--runs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("without lowrank"), "{out}");
    // A corrupt cache file is ignored with a warning, not an error.
    for e in std::fs::read_dir(&cache).unwrap() {
        std::fs::write(e.unwrap().path(), "{ corrupt").unwrap();
    }
    let (code, _, err) = run(&["run", "examples/alibi.attn", "--random", "--dims", dims, "-o", &tmp("untuned.safetensors")]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: ignoring the corrupt tuning cache entry") && err.contains("cost model"), "{err}");
}

#[test]
fn passes_are_shown_and_switchable() {
    // The optimized IR has the ALiBi bias folded into the dot; --no-opt keeps it.
    let (code, out, err) = attnc(&["compile", "examples/alibi.attn", "--emit", "opt-ir"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(+ $D 2)") && !out.contains("(bias"), "{out}");
    let (code, out, _) = attnc(&["compile", "examples/alibi.attn", "--emit", "opt-ir", "--no-opt"]);
    assert_eq!(code, 0);
    assert!(out.contains("(bias"), "{out}");
    let (code, out, _) = attnc(&["compile", "examples/alibi.attn", "--emit", "opt-ir", "--opt", "lowrank=off"]);
    assert_eq!(code, 0);
    assert!(out.contains("(bias"), "{out}");
    // explain: the rewrite, its cost before and after, tile classes and the algorithm.
    let (code, out, err) = attnc(&["explain", "examples/alibi.attn", "--dims", "B=1,H=2,G=1,N=256,M=256,D=64,Dv=64"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("lowrank  on   bias") && out.contains("2 extra dot channels") && out.contains("per-pair cost 3.00 -> 0.50"), "{out}");
    assert!(out.contains("algorithm tiled") && out.contains("empty (skipped)"), "{out}");
    // The schedule, without compiling: tiles, packs and the workspace in bytes.
    assert!(out.contains("tiles     64x64: 4 query tiles × 4 key tiles per head, 66 channels in the dot"), "{out}");
    assert!(out.contains("packs     1 key/value packs for 2 heads (1 shared by several heads)"), "{out}");
    assert!(out.contains("workspace 67584 bytes per task"), "{out}");
    let (code, out, err) = attnc(&["explain", "examples/retnet.attn", "--dims", "B=1,H=2,G=1,N=4096,M=4096,D=64,Dv=64"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("algorithm chunked linear attention"), "{out}");
    // A bad pass name is a user error naming the passes.
    let (code, _, err) = attnc(&["compile", "examples/alibi.attn", "--opt", "fastmath=on"]);
    assert_eq!(code, 1);
    assert!(err.contains("no pass named `fastmath`") && err.contains("lowrank"), "{err}");
    let (code, _, err) = attnc(&["compile", "examples/alibi.attn", "--opt", "lowrank"]);
    assert_eq!(code, 1);
    assert!(err.contains("PASS=on or PASS=off"), "{err}");
    // run --check through the chunked kernel and with the passes off.
    let out = tmp("gla.safetensors");
    for extra in [&[][..], &["--no-opt"][..]] {
        let mut args = vec!["run", "examples/gla.attn", "--random", "--dims", "B=1,H=2,N=150,M=150,D=16,Dv=8", "-o", out.as_str(), "--check"];
        args.extend_from_slice(extra);
        let (code, _, err) = attnc(&args);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("max |difference|"), "{err}");
    }
}

#[test]
fn bench_runs_on_given_inputs() {
    let ins = tmp("bench-in.safetensors");
    let (code, _, err) = attnc(&["inputs", "examples/document_mask.attn", "--dims", "B=1,H=2,G=1,N=80,M=80,D=8,Dv=8", "-o", &ins]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = attnc(&["bench", "examples/document_mask.attn", "--input", &ins, "--runs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("N=80") && out.contains("useful"), "{out}");
    // Neither --dims nor --input: a usage error.
    assert_eq!(attnc(&["bench", "examples/document_mask.attn"]).0, 2);
}

/// `bench` says when tokens run sorted by the mask's classes, and `--no-permute` turns it off.
#[test]
fn bench_names_the_sorted_tokens_and_no_permute_keeps_the_order() {
    let dims = "B=1,H=2,G=1,N=64,M=64,D=8,Dv=8";
    let (code, out, err) = attnc(&["bench", "examples/swin_window.attn", "--dims", dims, "--runs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sorted by the mask's classes"), "{out}");
    let (code, out, err) = attnc(&["bench", "examples/swin_window.attn", "--dims", dims, "--runs", "1", "--no-permute"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("sorted") && out.contains("useful"), "{out}");
    // `explain` gives the classes of the sorted problem (swin's 9 window classes, every live
    // tile full at 64×64 on 2048 tokens), or says the order is already sorted.
    let (code, out, err) = attnc(&["explain", "examples/swin_window.attn", "--dims", "B=1,H=2,G=1,N=2048,M=2048,D=8,Dv=8"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sorted by the mask's 9 classes (what runs): 880 empty, 144 full, 0 partial; 14.1% live"), "{out}");
    let (code, out, err) = attnc(&["explain", "examples/axial_rows.attn", "--dims", dims]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("in class order already"), "{out}");
}

/// `bench --isa` runs the microkernels of the instruction set asked for (and says so), refuses
/// one this CPU lacks (exit 1, naming what it has) and an unknown name (usage error), and is
/// an option of the CPU backend only.
#[test]
fn bench_isa_picks_the_microkernels_and_refuses_what_the_cpu_lacks() {
    use attnc_codegen::cpu::microkernel::Isa;
    let dims = "B=1,H=2,N=64,M=64,D=16,Dv=16";
    let (code, out, err) = attnc(&["bench", "examples/sdpa_causal.attn", "--dims", dims, "--runs", "1", "--isa", "portable"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Portable microkernel"), "{out}");
    for isa in [Isa::Avx512, Isa::Avx2] {
        let (code, out, err) = attnc(&["bench", "examples/sdpa_causal.attn", "--dims", dims, "--runs", "1", "--isa", &isa.to_string()]);
        if Isa::available().contains(&isa) {
            assert_eq!(code, 0, "{err}");
            assert!(out.contains(&format!("{isa:?} microkernel")), "{out}");
        } else {
            assert_eq!(code, 1, "{out}");
            assert!(err.contains(&format!("cannot run the {isa} microkernels")) && err.contains("portable"), "{err}");
        }
    }
    let (code, _, err) = attnc(&["bench", "examples/sdpa_causal.attn", "--dims", dims, "--isa", "sse9"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("avx512, avx2 or portable"), "{err}");
    let (code, _, err) = attnc(&["bench", "examples/sdpa_causal.attn", "--dims", dims, "--isa", "avx2", "--backend", "wgsl"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--isa is an option of the CPU backend"), "{err}");
}

/// The WGSL backend from the command line: the module without an adapter, a run checked
/// against the reference where an adapter is, and without one a message naming what to
/// install (exit 1, no crash).
#[test]
fn wgsl_compiles_runs_and_explains_a_missing_adapter() {
    let (code, out, err) = attnc(&["compile", "examples/sliding_window_sink.attn", "--emit", "wgsl"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fn attend(") && out.contains("workgroupBarrier()"), "{out}");
    let (code, same, err) = attnc(&["compile", "examples/sliding_window_sink.attn", "--target", "wgsl"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(same, out, "--target wgsl emits the WGSL module");
    let (code, _, err) = attnc(&["compile", "examples/sliding_window_sink.attn", "--target", "wgsl", "--emit", "clif"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cpu target"), "{err}");
    let run = |env: &[(&str, &str)]| {
        let o = tmp("wgsl.safetensors");
        let args = ["run", "examples/document_mask.attn", "--random", "--dims", "B=2,H=2,G=2,N=33,M=33,D=8,Dv=8", "-o", &o, "--backend", "wgsl", "--check"];
        let out =
            Command::new(env!("CARGO_BIN_EXE_attnc")).args(args).envs(env.iter().copied()).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("runs");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
    };
    if attnc_codegen::Backend::available(&attnc_codegen::wgsl::WgslBackend).is_ok() {
        let (code, err) = run(&[]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("check: reference") && err.contains("0 NaN mismatches"), "{err}");
    }
    let (code, err) = run(&[("VK_ICD_FILENAMES", "/nonexistent.json"), ("VK_DRIVER_FILES", "/nonexistent.json")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no WebGPU adapter") && err.contains("mesa-vulkan-drivers"), "{err}");
}

/// `tune --backend wgsl` gates each workgroup shape on the reference, times the survivors
/// and caches the winner under the adapter, which `bench --backend wgsl` then uses.
#[test]
fn wgsl_tunes_and_bench_uses_the_winner() {
    if attnc_codegen::Backend::available(&attnc_codegen::wgsl::WgslBackend).is_err() {
        assert!(!std::env::var("ATTNC_REQUIRE_BACKENDS").unwrap_or_default().contains("wgsl"), "wgsl is required here but has no adapter");
        return;
    }
    let cache = tmp("wgsl-cache");
    let dims = "B=1,H=2,N=40,M=40,D=8,Dv=8";
    let env = [("ATTNC_CACHE_DIR", cache.as_str())];
    let cmd = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_attnc")).args(args).envs(env).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("runs");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, out, err) = cmd(&["tune", "examples/sdpa_causal.attn", "--dims", dims, "--backend", "wgsl", "--top-k", "3", "--samples", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tiled 16x16 wg256 ch8") && out.contains("cached in"), "the default is the baseline: {out}");
    let (code, out, err) = cmd(&["bench", "examples/sdpa_causal.attn", "--dims", dims, "--backend", "wgsl", "--runs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("options  ") && out.contains("(tuned ("), "{out}");
    // Given options win over the tuned ones: the tiled kernel's shape, or the row kernel.
    let (code, out, err) = cmd(&[
        "bench",
        "examples/sdpa_causal.attn",
        "--dims",
        dims,
        "--backend",
        "wgsl",
        "--runs",
        "1",
        "--block-k",
        "32",
        "--workgroup",
        "64",
        "--channels",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("options  tiled 16x32 where the spec tiles (else rows), workgroup 64, 4 channels per invocation (given options)"), "{out}");
    let (code, out, err) = cmd(&["bench", "examples/sdpa_causal.attn", "--dims", dims, "--backend", "wgsl", "--runs", "1", "--no-tiled", "--workgroup", "32"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("options  row kernel, workgroup 32"), "{out}");
    for (args, msg) in [
        (&["--backend", "wgsl", "--workgroup", "64", "--block-q", "3"][..], "must be a multiple of block_q"),
        (&["--backend", "wgsl", "--threads", "1"][..], "CPU options"),
        (&["--backend", "wgsl", "--chunk", "65"][..], "at most 64 keys per chunk"),
        (&["--workgroup", "64"][..], "options of the wgsl backend"),
    ] {
        let mut a = vec!["bench", "examples/sdpa_causal.attn", "--dims", dims, "--runs", "1"];
        a.extend_from_slice(args);
        let (code, _, err) = cmd(&a);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    // Linear attention: the chunked kernel competes, and the cost model ranks it first.
    let (code, out, err) =
        cmd(&["tune", "examples/retnet.attn", "--dims", "B=1,H=2,G=2,N=300,M=300,D=8,Dv=8", "--backend", "wgsl", "--top-k", "2", "--samples", "1"]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().nth(2).unwrap_or_default();
    assert!(first.contains("chunked"), "{out}");
    let (code, _, err) = cmd(&["tune", "examples/sdpa_causal.attn", "--dims", dims, "--backend", "wgsl", "--threads", "2"]);
    assert_eq!(code, 1);
    assert!(err.contains("--threads is a CPU option"), "{err}");
}

/// Dims with defaults (`dims B, H, G = H, N, M = N, D, Dv = D` in alibi): `--dims` may leave
/// them out, may override them, and still refuses a dim the spec does not have.
#[test]
fn dims_with_defaults_may_be_left_out() {
    let o = tmp("defaults.safetensors");
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--random", "--dims", "B=1,H=4,N=20,D=8", "-o", &o, "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("[1, 4, 20, 8]") && err.contains("0 NaN mismatches"), "G = H, M = N and Dv = D: {err}");
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--random", "--dims", "B=1,H=4,G=2,N=20,M=30,D=8,Dv=4", "-o", &o, "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("[1, 4, 20, 4]"), "given dims win over defaults: {err}");
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--random", "--dims", "B=1,H=4,N=20,D=8,X=3", "-o", &o]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the spec has no dim `X`"), "{err}");
    let (code, _, err) = attnc(&["run", "examples/alibi.attn", "--random", "--dims", "B=1,N=20,D=8", "-o", &o]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--dims is missing H"), "a default needs its own dims: {err}");
}

/// The PTX target: `compile --target ptx` prints the module (`--emit ptx` the same), `run
/// --backend ptx-sim --check` runs it in the PTX interpreter and matches the reference, and
/// what the interpreter cannot do (time or tune a kernel) is refused with the reason.
#[test]
fn ptx_compiles_and_runs_in_the_interpreter() {
    let (code, out, err) = attnc(&["compile", "examples/softcap.attn", "--target", "ptx"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(".target sm_80") && out.contains(".visible .entry attend("), "{out}");
    let (code, same, err) = attnc(&["compile", "examples/softcap.attn", "--emit", "ptx"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(same, out);
    let (code, _, err) = attnc(&["compile", "examples/softcap.attn", "--target", "ptx", "--emit", "asm"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cpu target"), "{err}");
    let o = tmp("ptx.safetensors");
    let (code, _, err) =
        attnc(&["run", "examples/document_mask.attn", "--random", "--dims", "B=2,H=2,G=1,N=21,M=21,D=8,Dv=8", "-o", &o, "--backend", "ptx-sim", "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ran on PtxSim") && err.contains("0 NaN mismatches"), "{err}");
    let (code, _, err) = attnc(&["bench", "examples/sdpa.attn", "--dims", "B=1,H=1,N=8,M=8,D=8,Dv=8", "--backend", "ptx-sim"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("interpreter"), "{err}");
    let (code, _, err) = attnc(&["tune", "examples/sdpa.attn", "--dims", "B=1,H=1,N=8,M=8,D=8,Dv=8", "--backend", "ptx-sim"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing to tune"), "{err}");
}

/// The PTX options on the command line: `--precision bf16` puts an f32 spec on the tensor
/// cores (said, and checked within the bound the kernel states); other backends refuse it;
/// `--backend ptx` without an NVIDIA driver says so and exits 1; PTX autotuning is refused.
#[test]
fn ptx_precision_and_gpu_backend_errors() {
    let o = tmp("ptx-bf16.safetensors");
    let dims = "B=1,H=2,N=70,M=70,D=32,Dv=32";
    let (code, _, err) =
        attnc(&["run", "examples/sdpa_causal.attn", "--random", "--dims", dims, "-o", &o, "--backend", "ptx-sim", "--precision", "bf16", "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("runs the tensor-core tiled kernel (bf16") && err.contains("within the kernel's stated tolerance"), "{err}");
    let (code, _, err) = attnc(&["run", "examples/sdpa_causal.attn", "--random", "--dims", dims, "-o", &o, "--precision", "bf16"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--precision is an option of the PTX backends"), "{err}");
    let (code, _, err) = attnc(&["run", "examples/sdpa_causal.attn", "--random", "--dims", dims, "-o", &o, "--backend", "ptx-sim", "--precision", "tf32"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exact (the spec's types), bf16 or f16"), "{err}");
    let (code, _, err) = attnc(&["tune", "examples/sdpa.attn", "--dims", "B=1,H=1,N=8,M=8,D=8,Dv=8", "--backend", "ptx"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("autotuning is not written for the PTX backend"), "{err}");
    if let Err(why) = attnc_codegen::Backend::available(&attnc_codegen::ptx::PtxBackend) {
        for cmd in [
            &["run", "examples/sdpa.attn", "--random", "--dims", "B=1,H=1,N=8,M=8,D=8,Dv=8", "-o", &o, "--backend", "ptx"][..],
            &["bench", "examples/sdpa.attn", "--dims", "B=1,H=1,N=8,M=8,D=8,Dv=8", "--backend", "ptx"][..],
        ] {
            let (code, _, err) = attnc(cmd);
            assert_eq!(code, 1, "{err}");
            assert!(err.contains(&why), "{err}");
        }
    }
}

/// `--dims` names a spec's own dims only: attnc's internal ones (the key count `__keys` of
/// `range j < …`) are neither listed nor accepted.
#[test]
fn dims_errors_list_the_specs_own_dims() {
    let o = tmp("paged.safetensors");
    let (code, _, err) = attnc(&["run", "examples/paged_decode.attn", "--random", "--dims", "B=1,H=2,N=1,D=8,P=5,MP=3,__keys=48", "-o", &o]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no dim `__keys` (its dims: B, H, G, N, D, Dv, P, MP)"), "{err}");
}

#[test]
fn grad_writes_a_gradient_per_float_input_and_checks_it() {
    let dims = "B=1,H=2,G=1,N=6,M=9,D=4,Dv=3";
    let ins = tmp("grad_in.safetensors");
    let out = tmp("grad_out.safetensors");
    let grads = tmp("grads.safetensors");
    assert_eq!(attnc(&["inputs", "examples/alibi.attn", "--dims", dims, "-o", &ins]).0, 0);
    // The forward's own output serves as a cotangent of the right name and shape.
    assert_eq!(attnc(&["run", "examples/alibi.attn", "--input", &ins, "-o", &out, "--backend", "reference"]).0, 0);
    let (code, _, err) = attnc(&["grad", "examples/alibi.attn", "--input", &ins, "--cotangent", &out, "-o", &grads, "--check", "--backend", "reference"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("check: `slope`: 2 elements match central differences"), "{err}");
    // The default runs the compiled backward where it applies; --check then compares it
    // with the reference backward.
    let compiled = tmp("grads_compiled.safetensors");
    let (code, _, err) = attnc(&["grad", "examples/alibi.attn", "--input", &ins, "--cotangent", &out, "-o", &compiled, "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("compiled backward (CPU, f32)") && err.contains("check: `slope`: max |difference|"), "{err}");
    // A spec it does not cover: refused with the reason under --backend cpu.
    let (code, _, err) =
        attnc(&["grad", "examples/gla.attn", "--random", "--dims", "B=1,H=1,N=4,M=4,D=4,Dv=4", "-o", &tmp("g_gla.safetensors"), "--backend", "cpu"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no compiled backward for this spec yet: the partial for `q` reads the row, the key and the channel in one factor"), "{err}");
    // A flattened pair index folds into one head per element: compiled at small dims,
    // refused past `MAX_FOLDED_HEADS` (by name under --backend cpu; `auto` runs the reference).
    let flat = tmp("flat_pair_bias.attn");
    std::fs::write(
        &flat,
        "attention flat_pair_bias {
           dims B, H, N, M, D, P
           input q: f32[B, H, N, D]
           input k: f32[B, H, M, D]
           input v: f32[B, H, M, D]
           input bt: f32[H, P]
           output o: f32[B, H, N, D]
           require P == N * M
           score = dot(q[b, h, i, :], k[b, h, j, :])
           bias = bt[h, i * M + j]
           value = v[b, h, j, e]
         }",
    )
    .unwrap();
    let (code, _, err) =
        attnc(&["grad", &flat, "--random", "--dims", "B=1,H=2,N=5,M=7,D=4,P=35", "-o", &tmp("g_flat.safetensors"), "--backend", "cpu", "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("compiled backward (CPU, f32)") && err.contains("check: `bt`"), "{err}");
    let big = ["grad", &flat, "--random", "--dims", "B=1,H=1,N=70,M=70,D=4,P=4900", "-o", &tmp("g_flat_big.safetensors")];
    let (code, _, err) = attnc(&[&big[..], &["--backend", "cpu"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`bt`'s gradient is scattered over 4900 table elements per head (at most 4096"), "{err}");
    let (code, _, err) = attnc(&big);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("running the reference backward") && err.contains("reference backward (f64)"), "{err}");
    // A table read per pair (T5's buckets): compiled, and checked.
    let (code, _, err) =
        attnc(&["grad", "examples/t5_bias.attn", "--random", "--dims", "B=1,H=2,N=20,D=4", "-o", &tmp("g_t5.safetensors"), "--backend", "cpu", "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("compiled backward (CPU, f32)") && err.contains("check: `rel`"), "{err}");
    let bytes = std::fs::read(&grads).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names, ["k", "q", "slope", "v"]);
    assert_eq!(st.tensor("q").unwrap().shape(), &[1, 2, 6, 4]);
    assert_eq!(st.tensor("k").unwrap().shape(), &[1, 1, 9, 4]);
    // A cotangent of another shape is refused by name and shape; nothing is written.
    let other = tmp("grad_other.safetensors");
    assert_eq!(attnc(&["run", "examples/alibi.attn", "--random", "--dims", "B=1,H=2,G=1,N=5,M=9,D=4,Dv=3", "-o", &other, "--backend", "reference"]).0, 0);
    let fresh = tmp("grads_fresh.safetensors");
    let (code, _, err) = attnc(&["grad", "examples/alibi.attn", "--input", &ins, "--cotangent", &other, "-o", &fresh]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`o`") && err.contains("[1, 2, 5, 3]") && err.contains("[1, 2, 6, 3]"), "{err}");
    assert!(!std::path::Path::new(&fresh).exists());
}

#[test]
fn bench_times_the_forward_and_the_compiled_backward() {
    let (code, out, err) = attnc(&["bench", "examples/sdpa_causal.attn", "--dims", "B=1,H=2,N=40,M=40,D=8,Dv=8", "--backward", "--runs", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("forward + compiled backward") && out.contains("GFLOP, forward + backward"), "{out}");
    assert!(out.contains("MiB beyond inputs, output, cotangent and gradients"), "{out}");
    // Refused: a spec the compiled backward does not cover, another backend.
    let (code, _, err) = attnc(&["bench", "examples/gla.attn", "--dims", "B=1,H=1,N=8,M=8,D=4,Dv=4", "--backward"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no compiled backward for this spec yet"), "{err}");
    let (code, _, err) = attnc(&["bench", "examples/sdpa.attn", "--dims", "B=1,H=1,N=8,M=8,D=4,Dv=4", "--backward", "--backend", "reference"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--backward runs the compiled backward, on the CPU backend only"), "{err}");
}

#[test]
fn run_saves_the_forward_statistics_and_checks_them() {
    let dims = "B=1,H=2,G=2,N=9,M=7,D=4,Dv=3";
    let (cpu, reference) = (tmp("stats_cpu.safetensors"), tmp("stats_ref.safetensors"));
    // gpsa blends two softmax branches: one statistic per branch; N > M leaves no row dead here
    // (no mask), so every statistic is a finite log-sum-exp.
    let (code, _, err) = attnc(&["run", "examples/gpsa.attn", "--random", "--dims", dims, "-o", &cpu, "--save-stats", "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("check: statistics: max relative difference") && err.contains("wrote `o.stats` [1, 2, 9, 2]"), "{err}");
    assert_eq!(attnc(&["run", "examples/gpsa.attn", "--random", "--dims", dims, "-o", &reference, "--save-stats", "--backend", "reference"]).0, 0);
    let read = |path: &str| -> Vec<f32> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("o.stats").unwrap();
        assert_eq!(t.shape(), &[1, 2, 9, 2]);
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (a, b) = (read(&cpu), read(&reference));
    assert!(a.iter().zip(&b).all(|(x, y)| x.is_finite() && (x - y).abs() <= 1e-4 * y.abs().max(1.0)), "{a:?} vs {b:?}");
    // Backends that do not save statistics say so before running; nothing is written.
    let none = tmp("stats_none.safetensors");
    let (code, _, err) = attnc(&["run", "examples/gpsa.attn", "--random", "--dims", dims, "-o", &none, "--save-stats", "--backend", "ptx-sim"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--save-stats: the PtxSim backend does not save"), "{err}");
    assert!(!std::path::Path::new(&none).exists());
}
