//! What several test files share: the example specs.
#![allow(dead_code)] // each test binary uses its part

use std::path::PathBuf;

/// The `.attn` files of `examples/`, sorted by name.
pub fn example_paths() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "attn"))
        .collect();
    files.sort();
    files
}

/// Every example's source text.
pub fn example_sources() -> Vec<String> {
    example_paths().iter().map(|p| std::fs::read_to_string(p).expect("example")).collect()
}

/// Every example: its name and the checked spec.
pub fn examples() -> Vec<(String, attnc::dsl::Checked)> {
    example_paths()
        .iter()
        .map(|p| {
            let name = p.file_stem().expect("a file name").to_string_lossy().to_string();
            let c = attnc::dsl::compile(&std::fs::read_to_string(p).expect("example")).unwrap_or_else(|d| panic!("{name}: {}", d.message));
            (name, c)
        })
        .collect()
}

/// Every example with its float inputs declared `dtype` (`bf16`, `f16`) instead of `f32`:
/// what the tensor-core paths run. Names as in [`examples`].
pub fn examples_as(dtype: &str) -> Vec<(String, attnc::dsl::Checked)> {
    example_paths()
        .iter()
        .map(|p| {
            let name = p.file_stem().expect("a file name").to_string_lossy().to_string();
            let src: String = std::fs::read_to_string(p)
                .expect("example")
                .lines()
                .map(|l| if l.trim_start().starts_with("input ") { l.replacen(": f32[", &format!(": {dtype}["), 1) } else { l.to_string() })
                .collect::<Vec<_>>()
                .join("\n");
            let c = attnc::dsl::compile(&src).unwrap_or_else(|d| panic!("{name} as {dtype}: {}", d.message));
            (name, c)
        })
        .collect()
}
