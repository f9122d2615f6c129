//! The canonical text form of a [`Kernel`]: S-expressions, one statement per line.
//!
//! `parse(&print(k)) == k` for every kernel (a property test checks it). Dims are written
//! `$N`, variables bare, floats in Rust's shortest round-trip form (`0.1`, `1e-6`, `NaN`,
//! `inf`), so printing loses nothing. `;` starts a comment.

use crate::expr::{BinOp, Expr, RedOp, UnOp, F64};
use crate::kernel::*;
use std::fmt::{self, Write};

// ---------------------------------------------------------------- printing

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Int(n) => write!(f, "{n}"),
            Expr::Float(F64(x)) => write!(f, "{x:?}"),
            Expr::Bool(b) => write!(f, "{b}"),
            Expr::Var(v) => f.write_str(v),
            Expr::Dim(d) => write!(f, "${d}"),
            Expr::Load(t, idx) => {
                write!(f, "(load {t}")?;
                for i in idx {
                    write!(f, " {i}")?;
                }
                f.write_str(")")
            }
            Expr::Unary(op, a) => write!(f, "({op} {a})"),
            Expr::Binary(op, a, b) => write!(f, "({op} {a} {b})"),
            Expr::Select(c, a, b) => write!(f, "(select {c} {a} {b})"),
            Expr::Reduce { op, var, lo, hi, body } => write!(f, "(reduce {op} {var} {lo} {hi} {body})"),
        }
    }
}

fn shape_text(shape: &[Extent]) -> String {
    let parts: Vec<String> = shape.iter().map(|e| e.to_string()).collect();
    format!("[{}]", parts.join(" "))
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        writeln!(s, "(kernel {}", self.name)?;
        for d in &self.dims {
            match &d.def {
                None => writeln!(s, "  (dim {})", d.name)?,
                Some(e) => writeln!(s, "  (dim {} {e})", d.name)?,
            }
        }
        for r in &self.requires {
            writeln!(s, "  (require {r})")?;
        }
        for t in &self.tensors {
            let head = format!("{} {} {}", t.name, t.dtype, shape_text(&t.shape));
            match &t.kind {
                TensorKind::Input => writeln!(s, "  (input {head})")?,
                TensorKind::Output => writeln!(s, "  (output {head})")?,
                TensorKind::Derived { vars, def } => {
                    let def = match def {
                        TensorDef::Map(e) => format!("(map {e})"),
                        TensorDef::Cumsum { axis, body } => format!("(cumsum {axis} {body})"),
                    };
                    writeln!(s, "  (tensor {head} ({}) {def})", vars.join(" "))?;
                }
            }
        }
        let it = &self.iter;
        writeln!(s, "  (iter (b {}) (h {}) (i {}) (j {}) (e {}))", it.b, it.h, it.i, it.j, it.e)?;
        writeln!(s, "  (value {})", self.value)?;
        writeln!(s, "  (out {})", self.out.join(" "))?;
        for br in &self.branches {
            writeln!(s, "  (branch")?;
            writeln!(s, "    (score {})", br.score)?;
            if let Some(e) = &br.bias {
                writeln!(s, "    (bias {e})")?;
            }
            if let Some(e) = &br.mask {
                writeln!(s, "    (mask {e})")?;
            }
            let norm = match &br.norm {
                Norm::Softmax { sink, post } => {
                    let mut n = "(softmax".to_string();
                    if let Some(e) = sink {
                        write!(n, " (sink {e})")?;
                    }
                    if let Some(e) = post {
                        write!(n, " (post {e})")?;
                    }
                    n + ")"
                }
                Norm::Map(e) => format!("(map {e})"),
                Norm::Linear { eps } => format!("(linear {:?})", eps.0),
            };
            writeln!(s, "    (norm {norm})")?;
            if let Some(e) = &br.decay {
                writeln!(s, "    (decay {e})")?;
            }
            if let Some(e) = &br.weight {
                writeln!(s, "    (weight {e})")?;
            }
            s.pop();
            s.push_str(")\n");
        }
        if let Some(g) = &self.gate {
            writeln!(s, "  (gate {g})")?;
        }
        s.pop();
        s.push_str(")\n");
        f.write_str(&s)
    }
}

// ---------------------------------------------------------------- parsing

/// A syntax error in IR text, at a byte offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("IR text, byte {pos}: {message}")]
pub struct ParseError {
    pub pos: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Sx {
    Atom(String, usize),
    List(Vec<Sx>, usize, char),
}

impl Sx {
    fn pos(&self) -> usize {
        match self {
            Sx::Atom(_, p) | Sx::List(_, p, _) => *p,
        }
    }
}

fn err<T>(pos: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError { pos, message: message.into() })
}

fn read_sx(src: &str) -> Result<Vec<Sx>, ParseError> {
    let bytes = src.as_bytes();
    let mut stack: Vec<(Vec<Sx>, usize, char)> = vec![(Vec::new(), 0, ' ')];
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        match c {
            ';' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            c if c.is_ascii_whitespace() => {}
            '(' | '[' => stack.push((Vec::new(), i, c)),
            ')' | ']' => {
                let want = if c == ')' { '(' } else { '[' };
                let (items, start, open) = stack.pop().filter(|_| !stack.is_empty()).ok_or(ParseError { pos: i, message: format!("unmatched `{c}`") })?;
                if open != want {
                    return err(i, format!("`{c}` closes `{open}` opened at byte {start}"));
                }
                stack.last_mut().expect("stack keeps its root").0.push(Sx::List(items, start, open));
            }
            _ => {
                let start = i;
                while i < bytes.len() && !b"()[]; \t\r\n".contains(&bytes[i]) {
                    i += 1;
                }
                stack.last_mut().expect("stack keeps its root").0.push(Sx::Atom(src[start..i].to_string(), start));
                continue;
            }
        }
        i += 1;
    }
    if stack.len() != 1 {
        let (_, start, open) = stack.pop().expect("non-empty");
        return err(start, format!("`{open}` is never closed"));
    }
    Ok(stack.pop().expect("root").0)
}

fn atom(sx: &Sx) -> Result<&str, ParseError> {
    match sx {
        Sx::Atom(a, _) => Ok(a),
        Sx::List(_, p, _) => err(*p, "expected a name or number, found a list"),
    }
}

fn list(sx: &Sx) -> Result<&[Sx], ParseError> {
    match sx {
        Sx::List(items, _, '(') => Ok(items),
        _ => err(sx.pos(), "expected `(`"),
    }
}

/// A list whose first element is the atom `head`.
fn tagged<'a>(sx: &'a Sx, head: &str) -> Result<&'a [Sx], ParseError> {
    let items = list(sx)?;
    match items.first() {
        Some(Sx::Atom(a, _)) if a == head => Ok(&items[1..]),
        _ => err(sx.pos(), format!("expected `({head} ...)`")),
    }
}

fn head(sx: &Sx) -> Option<&str> {
    match sx {
        Sx::List(items, _, '(') => match items.first() {
            Some(Sx::Atom(a, _)) => Some(a),
            _ => None,
        },
        _ => None,
    }
}

fn arity(items: &[Sx], n: usize, pos: usize, what: &str) -> Result<(), ParseError> {
    if items.len() != n {
        return err(pos, format!("`{what}` takes {n} operand(s), found {}", items.len()));
    }
    Ok(())
}

fn is_name(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !matches!(s, "true" | "false" | "inf" | "NaN")
}

fn parse_number(a: &str, pos: usize) -> Result<Expr, ParseError> {
    let floaty = a.contains(['.', 'e', 'E']) || a.contains("inf") || a.contains("NaN");
    if floaty {
        a.parse::<f64>().map(Expr::float).or_else(|_| err(pos, format!("bad float `{a}`")))
    } else {
        a.parse::<i64>().map(Expr::Int).or_else(|_| err(pos, format!("bad integer `{a}`")))
    }
}

fn parse_expr_sx(sx: &Sx) -> Result<Expr, ParseError> {
    match sx {
        Sx::Atom(a, pos) => {
            let pos = *pos;
            if a == "true" || a == "false" {
                Ok(Expr::Bool(a == "true"))
            } else if let Some(d) = a.strip_prefix('$') {
                if !is_name(d) {
                    return err(pos, format!("bad dim name `{a}`"));
                }
                Ok(Expr::Dim(d.to_string()))
            } else if is_name(a) {
                Ok(Expr::Var(a.clone()))
            } else {
                parse_number(a, pos)
            }
        }
        Sx::List(items, pos, '(') => {
            let pos = *pos;
            let op = items.first().map(atom).transpose()?.ok_or(ParseError { pos, message: "empty list".into() })?;
            let args = &items[1..];
            match op {
                "load" => {
                    let t = args.first().map(atom).transpose()?.ok_or(ParseError { pos, message: "`load` needs a tensor".into() })?;
                    let idx = args[1..].iter().map(parse_expr_sx).collect::<Result<_, _>>()?;
                    Ok(Expr::Load(t.to_string(), idx))
                }
                "select" => {
                    arity(args, 3, pos, op)?;
                    Ok(Expr::select(parse_expr_sx(&args[0])?, parse_expr_sx(&args[1])?, parse_expr_sx(&args[2])?))
                }
                "reduce" => {
                    arity(args, 5, pos, op)?;
                    let rop = RedOp::from_text(atom(&args[0])?).ok_or(ParseError { pos, message: "unknown reduction".into() })?;
                    let var = atom(&args[1])?;
                    if !is_name(var) {
                        return err(args[1].pos(), format!("bad variable name `{var}`"));
                    }
                    Ok(Expr::Reduce {
                        op: rop,
                        var: var.to_string(),
                        lo: Box::new(parse_expr_sx(&args[2])?),
                        hi: Box::new(parse_expr_sx(&args[3])?),
                        body: Box::new(parse_expr_sx(&args[4])?),
                    })
                }
                _ => {
                    if let Some(u) = UnOp::from_text(op) {
                        arity(args, 1, pos, op)?;
                        Ok(Expr::un(u, parse_expr_sx(&args[0])?))
                    } else if let Some(b) = BinOp::from_text(op) {
                        arity(args, 2, pos, op)?;
                        Ok(Expr::bin(b, parse_expr_sx(&args[0])?, parse_expr_sx(&args[1])?))
                    } else {
                        err(pos, format!("unknown operator `{op}`"))
                    }
                }
            }
        }
        Sx::List(_, pos, _) => err(*pos, "`[` is not an expression"),
    }
}

fn parse_extent(sx: &Sx) -> Result<Extent, ParseError> {
    let a = atom(sx)?;
    if is_name(a) {
        Ok(Extent::Dim(a.to_string()))
    } else {
        a.parse::<i64>().map(Extent::Fixed).or_else(|_| err(sx.pos(), format!("bad extent `{a}`")))
    }
}

fn parse_tensor_head(args: &[Sx], pos: usize) -> Result<(String, DType, Vec<Extent>), ParseError> {
    if args.len() < 3 {
        return err(pos, "expected `NAME DTYPE [EXTENTS]`");
    }
    let name = atom(&args[0])?.to_string();
    let dt = atom(&args[1])?;
    let dtype = DType::from_name(dt).ok_or(ParseError { pos: args[1].pos(), message: format!("unknown dtype `{dt}`") })?;
    let shape = match &args[2] {
        Sx::List(items, _, '[') => items.iter().map(parse_extent).collect::<Result<_, _>>()?,
        other => return err(other.pos(), "expected `[EXTENTS]`"),
    };
    Ok((name, dtype, shape))
}

fn parse_one(args: &[Sx], pos: usize, what: &str) -> Result<Expr, ParseError> {
    arity(args, 1, pos, what)?;
    parse_expr_sx(&args[0])
}

fn parse_branch(items: &[Sx], pos: usize) -> Result<Branch, ParseError> {
    let (mut score, mut bias, mut mask, mut norm, mut decay, mut weight) = (None, None, None, None, None, None);
    for it in items {
        let h = head(it).ok_or(ParseError { pos: it.pos(), message: "expected a branch clause".into() })?;
        let args = &list(it)?[1..];
        let p = it.pos();
        let slot = match h {
            "score" => &mut score,
            "bias" => &mut bias,
            "mask" => &mut mask,
            "decay" => &mut decay,
            "weight" => &mut weight,
            "norm" => {
                arity(args, 1, p, "norm")?;
                let n = &args[0];
                let nargs = &list(n)?[1..];
                norm = Some(match head(n) {
                    Some("softmax") => {
                        let (mut sink, mut post) = (None, None);
                        for a in nargs {
                            match head(a) {
                                Some("sink") => sink = Some(parse_one(&list(a)?[1..], a.pos(), "sink")?),
                                Some("post") => post = Some(parse_one(&list(a)?[1..], a.pos(), "post")?),
                                _ => return err(a.pos(), "expected `(sink E)` or `(post E)`"),
                            }
                        }
                        Norm::Softmax { sink, post }
                    }
                    Some("map") => Norm::Map(parse_one(nargs, n.pos(), "map")?),
                    Some("linear") => match parse_one(nargs, n.pos(), "linear")? {
                        Expr::Float(eps) => Norm::Linear { eps },
                        _ => return err(n.pos(), "`linear` takes a float epsilon"),
                    },
                    _ => return err(n.pos(), "expected `(softmax ...)`, `(map E)` or `(linear EPS)`"),
                });
                continue;
            }
            _ => return err(p, format!("unknown branch clause `{h}`")),
        };
        if slot.is_some() {
            return err(p, format!("`{h}` given twice"));
        }
        *slot = Some(parse_one(args, p, h)?);
    }
    Ok(Branch {
        score: score.ok_or(ParseError { pos, message: "branch has no `score`".into() })?,
        bias,
        mask,
        norm: norm.ok_or(ParseError { pos, message: "branch has no `norm`".into() })?,
        decay,
        weight,
    })
}

/// Parses the text form produced by `Kernel`'s `Display`.
pub fn parse_kernel(src: &str) -> Result<Kernel, ParseError> {
    let top = read_sx(src)?;
    let [root] = top.as_slice() else {
        return err(top.get(1).map_or(0, Sx::pos), "expected exactly one `(kernel ...)`");
    };
    let items = tagged(root, "kernel")?;
    let name = items.first().map(atom).transpose()?.ok_or(ParseError { pos: root.pos(), message: "kernel needs a name".into() })?;
    let mut k = Kernel {
        name: name.to_string(),
        dims: vec![],
        tensors: vec![],
        requires: vec![],
        iter: Iter { b: Extent::Fixed(1), h: Extent::Fixed(1), i: Extent::Fixed(1), j: Extent::Fixed(1), e: Extent::Fixed(1) },
        value: Expr::float(0.0),
        out: vec![],
        branches: vec![],
        gate: None,
    };
    let (mut saw_iter, mut saw_value, mut saw_out) = (false, false, false);
    for it in &items[1..] {
        let h = head(it).ok_or(ParseError { pos: it.pos(), message: "expected a kernel clause".into() })?;
        let args = &list(it)?[1..];
        let p = it.pos();
        match h {
            "dim" => {
                let n = args.first().map(atom).transpose()?.ok_or(ParseError { pos: p, message: "`dim` needs a name".into() })?;
                let def = match args.len() {
                    1 => None,
                    2 => Some(parse_expr_sx(&args[1])?),
                    _ => return err(p, "`dim` takes a name and an optional definition"),
                };
                k.dims.push(DimDecl { name: n.to_string(), def });
            }
            "require" => k.requires.push(parse_one(args, p, h)?),
            "input" | "output" => {
                arity(args, 3, p, h)?;
                let (name, dtype, shape) = parse_tensor_head(args, p)?;
                let kind = if h == "input" { TensorKind::Input } else { TensorKind::Output };
                k.tensors.push(TensorDecl { name, dtype, shape, kind });
            }
            "tensor" => {
                arity(args, 5, p, h)?;
                let (name, dtype, shape) = parse_tensor_head(args, p)?;
                let vars = list(&args[3])?.iter().map(|v| atom(v).map(str::to_string)).collect::<Result<_, _>>()?;
                let d = &args[4];
                let dargs = &list(d)?[1..];
                let def = match head(d) {
                    Some("map") => TensorDef::Map(parse_one(dargs, d.pos(), "map")?),
                    Some("cumsum") => {
                        arity(dargs, 2, d.pos(), "cumsum")?;
                        let axis = atom(&dargs[0])?.parse::<usize>().or_else(|_| err(dargs[0].pos(), "bad axis"))?;
                        TensorDef::Cumsum { axis, body: parse_expr_sx(&dargs[1])? }
                    }
                    _ => return err(d.pos(), "expected `(map E)` or `(cumsum AXIS E)`"),
                };
                k.tensors.push(TensorDecl { name, dtype, shape, kind: TensorKind::Derived { vars, def } });
            }
            "iter" => {
                arity(args, 5, p, h)?;
                let mut ext = Vec::new();
                for (a, want) in args.iter().zip(crate::kernel::ITER_VARS) {
                    let pair = tagged(a, want)?;
                    arity(pair, 1, a.pos(), want)?;
                    ext.push(parse_extent(&pair[0])?);
                }
                let [b, hh, i, j, e]: [Extent; 5] = ext.try_into().expect("five extents");
                k.iter = Iter { b, h: hh, i, j, e };
                saw_iter = true;
            }
            "value" => {
                k.value = parse_one(args, p, h)?;
                saw_value = true;
            }
            "out" => {
                k.out = args.iter().map(|v| atom(v).map(str::to_string)).collect::<Result<_, _>>()?;
                saw_out = true;
            }
            "branch" => k.branches.push(parse_branch(args, p)?),
            "gate" => k.gate = Some(parse_one(args, p, h)?),
            _ => return err(p, format!("unknown kernel clause `{h}`")),
        }
    }
    for (saw, what) in [(saw_iter, "iter"), (saw_value, "value"), (saw_out, "out")] {
        if !saw {
            return err(root.pos(), format!("kernel has no `{what}` clause"));
        }
    }
    Ok(k)
}

/// Parses one expression in text form.
pub fn parse_expr(src: &str) -> Result<Expr, ParseError> {
    let top = read_sx(src)?;
    match top.as_slice() {
        [one] => parse_expr_sx(one),
        _ => err(0, "expected exactly one expression"),
    }
}
