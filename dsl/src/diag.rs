//! Diagnostics: every user error has a code, a primary span with a label, and a hint;
//! one rendering path (codespan-reporting), plain text so it can be snapshot.

use crate::ast::Span;
use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term;

/// Every error code the checker can give, with a one-line description (`attnc explain-code`).
pub const CODES: &[(&str, &str)] = &[
    ("E0001", "syntax error"),
    ("E0002", "unknown name"),
    ("E0003", "name defined twice"),
    ("E0004", "unknown dtype"),
    ("E0005", "wrong number of indices for a tensor"),
    ("E0006", "type mismatch"),
    ("E0007", "index is not an integer"),
    ("E0008", "integer division or modulo by something that is not a constant or a dim"),
    ("E0009", "division by zero"),
    ("E0010", "variable not available in this part of the spec"),
    ("E0011", "index range does not match the tensor axis"),
    ("E0012", "unknown statement"),
    ("E0013", "statement given twice"),
    ("E0014", "missing statement or declaration"),
    ("E0015", "invalid normalization"),
    ("E0016", "unknown function or wrong arguments"),
    ("E0017", "vector (`:`) used where a scalar is needed, or misused"),
    ("E0018", "vectors of different lengths"),
    ("E0019", "invalid use of the output tensor"),
    ("E0020", "construct outside the attention model (unsupported)"),
    ("E0021", "recursive definition"),
    ("E0022", "invalid shape"),
    ("E0023", "constant is not a compile-time number"),
    ("E0024", "misplaced branch statement"),
    ("E0025", "cannot infer the range of an index"),
    ("E0026", "reserved name"),
    ("E0027", "invalid value range"),
    ("E0028", "invalid tensor definition"),
    ("E0029", "index out of range for every shape"),
    ("E0030", "expression nested too deeply"),
    ("E0031", "invalid dim default"),
    ("E0032", "invalid index range"),
    ("E0033", "`int` of a value that may be NaN"),
    ("E0999", "internal compiler error (a bug in attnc)"),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub code: &'static str,
    pub message: String,
    pub span: Span,
    pub label: String,
    pub secondary: Vec<(Span, String)>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn new(code: &'static str, message: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
        debug_assert!(CODES.iter().any(|(c, _)| *c == code), "unregistered code {code}");
        Diagnostic { code, message: message.into(), span, label: label.into(), secondary: vec![], notes: vec![] }
    }
    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }
    pub fn with_secondary(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.secondary.push((span, label.into()));
        self
    }
    pub fn hint(self, hint: impl Into<String>) -> Diagnostic {
        let h = hint.into();
        self.with_note(format!("help: {h}"))
    }

    /// Renders rustc-style, without colour.
    pub fn render(&self, file_name: &str, src: &str) -> String {
        let file = SimpleFile::new(file_name, src);
        let clamp = |s: Span| {
            let end = (s.end as usize).min(src.len());
            (s.start as usize).min(end)..end
        };
        let mut labels = vec![Label::primary((), clamp(self.span)).with_message(self.label.clone())];
        for (s, l) in &self.secondary {
            labels.push(Label::secondary((), clamp(*s)).with_message(l.clone()));
        }
        let d = CsDiagnostic::error().with_code(self.code).with_message(&self.message).with_labels(labels).with_notes(self.notes.clone());
        let config = term::Config::default();
        term::emit_into_string(&config, &file, &d).unwrap_or_else(|e| format!("error[{}]: {} (rendering failed: {e})\n", self.code, self.message))
    }
}

/// Edit distance (Levenshtein, with a swap of two neighbouring letters counting as one
/// edit), for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    distance(a, b, 1)
}

/// Edit distance where replacing a letter costs `sub` (a swap of neighbours costs 1).
fn distance(a: &str, b: &str, sub: usize) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rows: the one before the previous (for swaps), the previous and the current.
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let mut v = (prev[j] + if ca == cb { 0 } else { sub }).min(prev[j + 1] + 1).min(cur[j] + 1);
            if i > 0 && j > 0 && *ca == b[j - 1] && a[i - 1] == *cb {
                v = v.min(prev2[j - 1] + 1);
            }
            cur.push(v);
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

/// The closest candidate within a small distance. Among equally close ones, a letter
/// dropped or added (`Dk` → `D`) beats a letter replaced (`Dk` → `Dv`), then the nearest
/// length wins.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let len = name.chars().count();
    candidates
        .into_iter()
        .map(|c| {
            let d = edit_distance(name, c);
            (d, distance(name, c, 2), len.abs_diff(c.chars().count()), c)
        })
        .filter(|(d, _, _, c)| *d <= 2.max(len / 3) && *d < len.max(c.chars().count()))
        .min()
        .map(|(_, _, _, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_count_once() {
        assert_eq!(edit_distance("f23", "f32"), 1);
        assert_eq!(edit_distance("kh", "hk"), 1);
        assert_eq!(edit_distance("scroe", "score"), 1);
        assert_eq!(edit_distance("softmx", "softmax"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn suggestions_prefer_the_same_length() {
        assert_eq!(suggest("f23", ["f16", "f32", "bf16", "i32"]), Some("f32"));
        assert_eq!(suggest("kh", ["h", "hk", "k"]), Some("hk"));
        assert_eq!(suggest("Dk", ["D", "Dv", "M"]), Some("D"));
        assert_eq!(suggest("int32", ["f32", "i32", "bf16"]), Some("i32"));
        assert_eq!(suggest("zzzz", ["score", "mask"]), None);
    }
}
