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
