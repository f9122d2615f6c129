//! The WGSL backend's emitted modules: a snapshot of every example's module (the kernel after
//! the passes, as `run --backend wgsl` compiles it), each one validated by naga here.

use attnc::passes::PassConfig;
use attnc_codegen::wgsl::{validate, WgslBackend, WgslOptions};
use attnc_codegen::Backend;

fn examples() -> Vec<(String, attnc::dsl::Checked)> {
    let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "attn"))
        .collect();
    files.sort();
    files.iter().map(|p| (p.file_stem().unwrap().to_string_lossy().to_string(), attnc::dsl::compile(&std::fs::read_to_string(p).unwrap()).unwrap())).collect()
}

#[test]
fn every_example_emits_wgsl_that_naga_validates() {
    let be = WgslBackend;
    let o = WgslOptions::default();
    for (name, c) in examples() {
        let (oc, _) = attnc::optimize(&c, &PassConfig::all()).expect("passes");
        let s = be.plan(&oc.kernel, &oc.info, &o).expect("plans");
        let a = be.emit(&oc.kernel, &oc.info, &s, &o).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Err(e) = validate(&a.source) {
            panic!("{name}: {e}\n{}", a.source);
        }
        insta::assert_snapshot!(format!("{name}.wgsl"), a.source);
    }
}

/// The chunked kernel of every example in the linear normal form (16-key chunks).
#[test]
fn linear_examples_emit_chunked_wgsl_that_naga_validates() {
    let be = WgslBackend;
    let mut o = WgslOptions::default();
    o.schedule.chunk = 16;
    let mut chunked = Vec::new();
    for (name, c) in examples() {
        let (oc, _) = attnc::optimize(&c, &PassConfig::all()).expect("passes");
        let s = be.plan(&oc.kernel, &oc.info, &o).expect("plans");
        if s.chunked().is_none() {
            continue;
        }
        let a = be.emit(&oc.kernel, &oc.info, &s, &o).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Err(e) = validate(&a.source) {
            panic!("{name}: {e}\n{}", a.source);
        }
        insta::assert_snapshot!(format!("{name}.chunked.wgsl"), a.source);
        chunked.push(name);
    }
    assert_eq!(chunked, ["cosformer", "cosine", "gla", "linear_elu", "retnet"]);
}
