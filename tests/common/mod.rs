//! What several test files share: the example specs and the property tests' configuration.
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

/// The property tests' configuration: `default_cases` cases from a fixed seed, so that a CI
/// run tests exactly what the submission was tested with (a random seed once failed CI on a
/// case unrelated to the change). To explore, scale the cases and change the seed:
/// `ATTNC_FUZZ_CASES=50 ATTNC_FUZZ_SEED=7 cargo test --test tiles`. Cases saved in a
/// `*.proptest-regressions` file still run first.
pub fn proptest_config(default_cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngSeed};
    let scale: f64 = std::env::var("ATTNC_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let seed = std::env::var("ATTNC_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_a77c);
    Config { cases: ((default_cases as f64 * scale) as u32).max(1), rng_seed: RngSeed::Fixed(seed), ..Config::default() }
}
