//! Snapshots of every example's syntax tree and IR, and the IR's round trip and hash.

use attnc::ir;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).expect("example is readable")
}

#[test]
fn ast_snapshots() {
    insta::glob!("../examples", "*.attn", |path| {
        let spec = attnc::dsl::parse(&read(path)).expect("example parses");
        insta::assert_snapshot!(spec.to_string());
    });
}

#[test]
fn ir_snapshots() {
    insta::glob!("../examples", "*.attn", |path| {
        let c = attnc::dsl::compile(&read(path)).expect("example checks");
        insta::assert_snapshot!(c.kernel.to_string());
    });
}

/// Pass snapshots: every example's IR after the whole pipeline, with the rewrites applied
/// (text in → text out, like lit tests). The optimized IR round-trips too.
#[test]
fn optimized_ir_snapshots() {
    insta::glob!("../examples", "*.attn", |path| {
        let c = attnc::dsl::compile(&read(path)).expect("example checks");
        let (o, log) = attnc::optimize(&c, &attnc::passes::PassConfig::all()).expect("passes run");
        let text = o.kernel.to_string();
        assert_eq!(ir::parse_kernel(&text).expect("optimized IR parses"), o.kernel, "round trip");
        let applied: Vec<String> = log.iter().map(|a| format!("; {}: {}", a.pass, a.what)).collect();
        insta::assert_snapshot!(format!("{}\n{text}", applied.join("\n")));
    });
}

/// print → parse gives the same kernel, and it verifies; the hash is pinned per example
/// (a change in it means every cache entry is invalidated: it must be deliberate).
#[test]
fn ir_round_trip_and_hash() {
    let mut hashes = String::new();
    let mut paths: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "attn"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 28, "every Tier A and B example is present");
    for p in &paths {
        let c = attnc::dsl::compile(&read(p)).expect("example checks");
        let text = c.kernel.to_string();
        let back = ir::parse_kernel(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", p.display()));
        assert_eq!(back, c.kernel, "{}: round trip changed the kernel", p.display());
        ir::verify(&back).expect("reparsed kernel verifies");
        let h = ir::stable_hash(&c.kernel);
        // Renaming the kernel does not change the hash; changing a constant does.
        let mut renamed = c.kernel.clone();
        renamed.name = "other".into();
        assert_eq!(ir::stable_hash(&renamed), h);
        hashes.push_str(&format!("{} {}\n", p.file_name().unwrap().to_string_lossy(), h));
    }
    insta::assert_snapshot!(hashes);
}

#[test]
fn hash_sees_structure() {
    let base = attnc::dsl::compile(&read(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sliding_window_sink.attn")))).unwrap();
    let tweaked_src =
        read(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sliding_window_sink.attn"))).replace("const W = 256", "const W = 255");
    let tweaked = attnc::dsl::compile(&tweaked_src).unwrap();
    assert_ne!(ir::stable_hash(&base.kernel), ir::stable_hash(&tweaked.kernel));
    // Spelling a reduction variable differently does not.
    let a = attnc::dsl::compile(
        "attention t { dims B, H, N, D\n input q: f32[B,H,N,D]\n output o: f32[B,H,N,D]\n score = sum(d < D: q[b,h,i,d] * q[b,h,j,d])\n value = q[b,h,j,e] }",
    )
    .unwrap();
    let b = attnc::dsl::compile(
        "attention u { dims B, H, N, D\n input q: f32[B,H,N,D]\n output o: f32[B,H,N,D]\n score = sum(c < D: q[b,h,i,c] * q[b,h,j,c])\n value = q[b,h,j,e] }",
    )
    .unwrap();
    assert_eq!(ir::stable_hash(&a.kernel), ir::stable_hash(&b.kernel));
}
