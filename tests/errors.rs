//! Every file in `tests/errors/` is a small spec with exactly one mistake. Its first line
//! says which diagnostic it must produce: `# expect: E00NN what is wrong`. The rendered
//! diagnostic is snapshot, so a change of message, span or hint shows up in review.

use std::collections::BTreeSet;
use std::path::Path;

/// The code named on the first line, `# expect: E00NN ...`.
fn expected_code(path: &Path, src: &str) -> String {
    let first = src.lines().next().unwrap_or_default();
    let rest = first.strip_prefix("# expect:").unwrap_or_else(|| panic!("{}: first line must be `# expect: E00NN ...`", path.display()));
    let code = rest.split_whitespace().next().unwrap_or_default();
    assert!(code.len() == 5 && code.starts_with('E'), "{}: bad expected code `{code}`", path.display());
    code.to_string()
}

#[test]
fn error_specs() {
    insta::glob!("errors/*.attn", |path| {
        let src = std::fs::read_to_string(path).expect("readable error spec");
        let want = expected_code(path, &src);
        let name = path.file_name().expect("file name").to_string_lossy();
        let diag = match attnc::dsl::compile(&src) {
            Ok(_) => panic!("{name}: compiled, but it should fail with {want}"),
            Err(d) => d,
        };
        let rendered = diag.render(&name, &src);
        assert_ne!(diag.code, "E0999", "{name}: internal error\n{rendered}");
        assert_eq!(diag.code, want, "{name}: expected {want}, got {}\n{rendered}", diag.code);
        insta::assert_snapshot!(rendered);
    });
}

#[test]
fn every_code_is_covered() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors");
    let mut covered = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("tests/errors exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "attn") {
            let src = std::fs::read_to_string(&path).expect("readable error spec");
            covered.insert(expected_code(&path, &src));
        }
    }
    let missing: Vec<&str> = attnc::dsl::CODES.iter().map(|(c, _)| *c).filter(|c| *c != "E0999" && !covered.contains(*c)).collect();
    assert!(missing.is_empty(), "codes without an error spec: {missing:?}");
    assert!(!covered.contains("E0999"), "no spec may expect an internal error");
}
