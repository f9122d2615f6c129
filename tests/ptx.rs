//! The PTX backend's modules: every example's PTX parses in the interpreter (snapshots
//! committed), and, where `ptxas` is installed (CI installs it from the `nvidia-cuda-nvcc`
//! wheel and sets `ATTNC_PTXAS`), assembles for sm_80 and sm_90 with no register spills;
//! so does every example with bf16 inputs (the tensor-core kernel where it applies; its
//! snapshots for three examples, each module is about 110 KB).

use attnc::passes::PassConfig;
use attnc_codegen::ptx::{PtxOptions, PtxSimBackend};
use attnc_codegen::Backend;
use std::process::Command;
mod common;
use common::{examples, examples_as};

/// Every example's module for `arch`, with the spec's float inputs as `dtype` when given.
fn modules(arch: &str, dtype: Option<&str>) -> Vec<(String, String)> {
    let be = PtxSimBackend;
    let o = PtxOptions { arch: arch.into(), ..PtxOptions::default() };
    dtype
        .map(examples_as)
        .unwrap_or_else(examples)
        .into_iter()
        .map(|(name, c)| {
            let (oc, _) = attnc::optimize(&c, &PassConfig::all()).expect("passes");
            let s = be.plan(&oc.kernel, &oc.info, &o).unwrap_or_else(|e| panic!("{name}: {e}"));
            let a = be.emit(&oc.kernel, &oc.info, &s, &o).unwrap_or_else(|e| panic!("{name}: {e}"));
            be.validate(&a).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, a.source)
        })
        .collect()
}

#[test]
fn every_example_emits_ptx_that_the_interpreter_parses() {
    let ms = modules("sm_80", None);
    assert!(ms.len() >= 31);
    for (name, src) in ms {
        insta::assert_snapshot!(format!("{name}.ptx"), src);
    }
    let tc: Vec<(String, String)> = modules("sm_80", Some("bf16")).into_iter().filter(|(_, src)| src.contains(".entry attend_tc(")).collect();
    assert!(tc.len() >= 19, "{} bf16 examples take the tensor-core kernel", tc.len());
    for (name, src) in tc.into_iter().filter(|(n, _)| matches!(n.as_str(), "sdpa_causal" | "alibi" | "sliding_window_sink")) {
        insta::assert_snapshot!(format!("{name}.bf16.ptx"), src);
    }
}

/// `ptxas` from `ATTNC_PTXAS`, else on `PATH`.
fn ptxas() -> Option<String> {
    if let Ok(p) = std::env::var("ATTNC_PTXAS") {
        return Some(p);
    }
    Command::new("ptxas").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "ptxas".to_string())
}

#[test]
fn ptxas_assembles_every_example_for_sm80_and_sm90_without_spills() {
    let Some(ptxas) = ptxas() else {
        let required = std::env::var("ATTNC_REQUIRE_BACKENDS").unwrap_or_default();
        assert!(!required.split(',').any(|b| b.trim() == "ptxas"), "ptxas is required here (ATTNC_REQUIRE_BACKENDS) but not found: set ATTNC_PTXAS");
        eprintln!("skipping: no ptxas (set ATTNC_PTXAS or put it on PATH)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("attnc-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut report = Vec::new();
    for (arch, dtype) in [("sm_80", None), ("sm_90", None), ("sm_80", Some("bf16")), ("sm_90", Some("bf16"))] {
        for (name, src) in modules(arch, dtype) {
            let name = format!("{name}{}", dtype.map(|d| format!(".{d}")).unwrap_or_default());
            let ptx = dir.join(format!("{name}.{arch}.ptx"));
            std::fs::write(&ptx, &src).expect("write");
            let out = Command::new(&ptxas)
                .args([&format!("-arch={arch}"), "-v", "-o"])
                .arg(dir.join(format!("{name}.{arch}.cubin")))
                .arg(&ptx)
                .output()
                .expect("ptxas runs");
            let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "ptxas -arch={arch} refuses {name}:\n{text}");
            // `Used N registers` per entry, and `N bytes spill stores` before it.
            let regs: Vec<u32> = text.lines().filter_map(|l| l.split("Used ").nth(1)?.split(' ').next()?.parse().ok()).collect();
            let spills: u32 = text.lines().filter_map(|l| l.split(" bytes spill stores").next()?.rsplit(' ').next()?.parse::<u32>().ok()).sum();
            assert_eq!(spills, 0, "{name} on {arch} spills:\n{text}");
            let smem: Vec<u32> = text.lines().filter_map(|l| l.split(" bytes smem").next()?.rsplit(' ').next()?.parse().ok()).collect();
            report.push(format!(
                "{arch} {name}: {} entries, at most {} registers, 0 spills{}",
                regs.len(),
                regs.iter().max().copied().unwrap_or(0),
                smem.iter().max().map(|b| format!(", {b} bytes shared")).unwrap_or_default()
            ));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("{}", report.join("\n"));
}
