//! Snapshots of the generated code: CLIF and machine code on a fixed x86-64 ISA (explicit
//! SSE4.1/AVX/AVX2/FMA flags, never host detection), for a representative set of specs.
//! The machine code is disassembled VCode (Cranelift's own printer), so it needs no
//! external disassembler.

use attnc_codegen::cpu::{emit_fixed_x86, CpuOptions};

const SPECS: [&str; 5] = ["sdpa", "sdpa_causal", "alibi", "sliding_window_sink", "gla"];

#[test]
fn clif_and_machine_code_snapshots() {
    for name in SPECS {
        let src = std::fs::read_to_string(format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let c = attnc::dsl::compile(&src).unwrap();
        let (clif, asm) = emit_fixed_x86(&c.kernel, &c.info, &CpuOptions::default()).unwrap();
        insta::assert_snapshot!(format!("{name}.clif"), clif.to_string());
        let asm: String = asm.iter().map(|(f, code)| format!("; {f}\n{code}\n")).collect();
        insta::assert_snapshot!(format!("{name}.asm"), asm);
    }
}

/// The vector code generates a repeated lane-varying subexpression once: GPSA's score uses
/// `dc` and `dr` three times each, and its code has exactly the vector divisions of a score
/// that uses each once (each division estimates its quotient with one `floor`).
#[test]
fn repeated_subexpressions_are_generated_once() {
    let src = std::fs::read_to_string(format!("{}/examples/gpsa.attn", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let full = "score = vpos[h, 0] * dc + vpos[h, 1] * dr + vpos[h, 2] * (dc * dc + dr * dr)";
    assert!(src.contains(full), "gpsa's positional score changed: update this test");
    let once = src.replace(full, "score = vpos[h, 0] * dc + vpos[h, 1] * dr");
    let floors = |src: &str| {
        let c = attnc::dsl::compile(src).unwrap();
        let (clif, _) = emit_fixed_x86(&c.kernel, &c.info, &CpuOptions::default()).unwrap();
        let text = clif.to_string();
        let tile = &text[text.find("; tile").expect("a tile function")..];
        tile.matches("floor").count()
    };
    let (repeated, single) = (floors(&src), floors(&once));
    assert!(single > 0, "gpsa's divisions are no longer vector code: update this test");
    assert_eq!(repeated, single, "repeated dc/dr generated again");
}
