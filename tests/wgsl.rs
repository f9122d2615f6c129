//! The WGSL backend's emitted modules: a snapshot of every example's module (the kernel after
//! the passes, as `run --backend wgsl` compiles it), each one validated by naga here.

use attnc::passes::PassConfig;
use attnc_codegen::wgsl::{validate, WgslBackend, WgslOptions};
use attnc_codegen::Backend;
mod common;
use common::examples;

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
