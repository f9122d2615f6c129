//! Text → [`Spec`]: the pest grammar (`grammar.pest`) and the walk that builds the AST.
//! Syntax errors become an `E0001` diagnostic at the failing position.

use crate::ast::*;
use crate::diag::Diagnostic;
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser;

#[derive(pest_derive::Parser)]
#[grammar = "grammar.pest"]
struct AttnParser;

fn span(p: &Pair<Rule>) -> Span {
    Span::new(p.as_span().start(), p.as_span().end())
}

fn ident(p: Pair<Rule>) -> Ident {
    Ident { name: p.as_str().to_string(), span: span(&p) }
}

/// Friendly names for the grammar's rules in "expected ..." messages.
fn rule_name(r: &Rule) -> String {
    match r {
        Rule::ident => "a name".into(),
        Rule::float | Rule::int => "a number".into(),
        Rule::expr | Rule::sum_expr | Rule::primary | Rule::power => "an expression".into(),
        Rule::stmt
        | Rule::assign
        | Rule::dims_decl
        | Rule::dim_default
        | Rule::dim_def
        | Rule::const_def
        | Rule::input_decl
        | Rule::output_decl
        | Rule::tensor_def
        | Rule::fn_def
        | Rule::let_def
        | Rule::require_stmt
        | Rule::range_decl
        | Rule::branch_block => "a statement".into(),
        Rule::tensor_type => "a tensor type like `f32[B, H, N, D]`".into(),
        Rule::EOI => "end of file".into(),
        Rule::or | Rule::and | Rule::eq | Rule::ne | Rule::le | Rule::ge | Rule::lt | Rule::gt => "an operator".into(),
        Rule::add | Rule::sub | Rule::mul | Rule::floordiv | Rule::div | Rule::modulo => "an operator".into(),
        Rule::index | Rule::slice => "an index".into(),
        Rule::arg => "an argument".into(),
        Rule::value_range => "`in LO..HI`".into(),
        Rule::kw_in => "`in`".into(),
        other => format!("{other:?}"),
    }
}

fn syntax_error(e: pest::error::Error<Rule>, src: &str) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let (start, end) = match e.location {
        InputLocation::Pos(p) => (p, p),
        InputLocation::Span((s, e)) => (s, e),
    };
    let start = start.min(src.len());
    // Point at the offending token (or the end of input) rather than an empty range.
    let tok_end = if end > start {
        end.min(src.len())
    } else {
        let rest = &src[start..];
        let n = rest.chars().next().map_or(0, |c| {
            if c.is_alphanumeric() || c == '_' {
                rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len())
            } else {
                c.len_utf8()
            }
        });
        start + n
    };
    let tok = &src[start..tok_end];
    let found = if tok.is_empty() { "end of file".to_string() } else { format!("`{tok}`") };
    let msg = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            let mut names: Vec<String> = positives.iter().map(rule_name).collect();
            names.sort();
            names.dedup();
            // A statement may start with a name; listing both only confuses.
            if names.iter().any(|n| n == "a statement") {
                names.retain(|n| n != "a name");
            }
            match names.len() {
                0 => format!("unexpected {found}"),
                1 => format!("expected {}, found {found}", names[0]),
                _ => {
                    let last = names.pop().unwrap_or_default();
                    format!("expected {} or {last}, found {found}", names.join(", "))
                }
            }
        }
        ErrorVariant::CustomError { message } => message.clone(),
    };
    let label = if tok.is_empty() { "the spec ends here".to_string() } else { "unexpected here".to_string() };
    let mut d = Diagnostic::new("E0001", format!("syntax error: {msg}"), Span::new(start, tok_end), label);
    let open = open_brackets(src, start);
    let innermost = open.last().copied();
    let closer = |c: char| match c {
        '(' => ')',
        '[' => ']',
        _ => '}',
    };
    let rest = &src[start..];
    // The next statement begins here (`name =`, not `name ==`).
    let starts_statement = |at: usize| {
        let r = &src[at..];
        let n = r.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(r.len());
        let after = r[n..].trim_start_matches([' ', '\t']);
        n > 0 && after.starts_with('=') && !after.starts_with("==")
    };
    let at_line_start = |at: usize| src[..at].trim_end_matches([' ', '\t']).ends_with('\n');
    // `name =` right before the error: the name a statement would start with.
    let name_before = {
        let before = src[..start].trim_end_matches([' ', '\t']);
        let n = before.len() - before.trim_end_matches(|c: char| c.is_alphanumeric() || c == '_').len();
        (n > 0 && rest.starts_with('=') && !rest.starts_with("==")).then(|| before.len() - n)
    };
    if tok.is_empty() {
        return match innermost {
            Some((c, at)) => d.with_secondary(Span::new(at, at + 1), format!("this `{c}` is never closed")).hint(format!("add the missing `{}`", closer(c))),
            None => d.hint("a spec is `attention NAME { statements }`; see the language reference in README.md"),
        };
    }
    if let Some(c @ (')' | ']' | '}')) = tok.chars().next() {
        let opener = match c {
            ')' => '(',
            ']' => '[',
            _ => '{',
        };
        if innermost.map(|(o, _)| o) != Some(opener) {
            d.label = format!("this `{c}` has no matching `{opener}`");
            return d.hint(format!("remove it, or add the `{opener}` it closes"));
        }
    }
    // Operators spelled as in other languages.
    for (typo, good) in [("=<", "<="), ("=>", ">="), ("=!", "!="), ("<>", "!=")] {
        if rest.starts_with(typo) {
            d.span = Span::new(start, start + typo.len());
            d.label = format!("`{typo}` is not an operator");
            return d.hint(format!("did you mean `{good}`?"));
        }
    }
    for (typo, good, what) in [('&', "&&", "`&&` joins two conditions"), ('|', "||", "`||` joins two conditions"), ('^', "**", "`**` raises to a power")] {
        if rest.starts_with(typo) && !rest.starts_with(good) {
            d.label = format!("`{typo}` is not an operator");
            return d.hint(format!("did you mean `{good}`? {what}"));
        }
    }
    // A statement whose expression stops early swallows the name of the next statement.
    if let Some(name_at) = name_before.filter(|at| at_line_start(*at)) {
        if let Some((op_at, op)) = dangling_operator(src, name_at) {
            let name = &src[name_at..start].trim_end();
            return d
                .with_secondary(Span::new(op_at, op_at + op.len_utf8()), format!("the statement above ends with `{op}`"))
                .hint(format!("`{name}` was read as the operand of `{op}`; finish the expression above"));
        }
    }
    let new_statement = name_before.is_some_and(at_line_start) || (at_line_start(start) && starts_statement(start));
    if let Some((c @ ('(' | '['), at)) = innermost {
        if new_statement {
            return d
                .with_secondary(Span::new(at, at + 1), format!("this `{c}` is never closed"))
                .hint(format!("add the missing `{}` before the next statement", closer(c)));
        }
    }
    if rest.starts_with('=') && !rest.starts_with("==") {
        d.label = "`=` in an expression".into();
        return d.hint("`=` gives a statement its value; to compare, write `==`");
    }
    if KEYWORDS.contains(&tok) && msg.contains("a name") {
        return d.hint(format!("`{tok}` is a keyword of the language; pick another name"));
    }
    d.hint("a spec is `attention NAME { statements }`; see the language reference in README.md")
}

/// Words the grammar reserves (`keyword` in grammar.pest).
const KEYWORDS: [&str; 14] = ["attention", "dims", "dim", "const", "input", "output", "tensor", "fn", "let", "require", "branch", "true", "false", "in"];

/// The brackets still open at `pos`, outermost first, with their positions; `#` comments
/// are skipped. A closer that does not match the innermost opener closes it anyway.
fn open_brackets(src: &str, pos: usize) -> Vec<(char, usize)> {
    let mut open = Vec::new();
    let mut comment = false;
    for (at, c) in src[..pos].char_indices() {
        match c {
            '\n' => comment = false,
            _ if comment => {}
            '#' => comment = true,
            '(' | '[' | '{' => open.push((c, at)),
            ')' | ']' | '}' => {
                open.pop();
            }
            _ => {}
        }
    }
    open
}

/// The operator (or `(`, `[`, `,`) that ends the last code line before `at`, if any: the
/// sign of an expression that was cut off at a line break.
fn dangling_operator(src: &str, at: usize) -> Option<(usize, char)> {
    let mut end = src[..at].rfind('\n')?;
    loop {
        let line_start = src[..end].rfind('\n').map_or(0, |n| n + 1);
        let line = &src[line_start..end];
        let code = line.split('#').next().unwrap_or_default().trim_end();
        if let Some(c) = code.chars().last() {
            let op_at = line_start + code.len() - c.len_utf8();
            return "+-*/%<>=!&|([,".contains(c).then_some((op_at, c));
        }
        if line_start == 0 {
            return None;
        }
        end = line_start - 1;
    }
}

fn pratt() -> PrattParser<Rule> {
    PrattParser::new()
        .op(Op::infix(Rule::or, Assoc::Left))
        .op(Op::infix(Rule::and, Assoc::Left))
        .op(Op::infix(Rule::eq, Assoc::Left)
            | Op::infix(Rule::ne, Assoc::Left)
            | Op::infix(Rule::lt, Assoc::Left)
            | Op::infix(Rule::le, Assoc::Left)
            | Op::infix(Rule::gt, Assoc::Left)
            | Op::infix(Rule::ge, Assoc::Left))
        .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
        .op(Op::infix(Rule::mul, Assoc::Left)
            | Op::infix(Rule::div, Assoc::Left)
            | Op::infix(Rule::floordiv, Assoc::Left)
            | Op::infix(Rule::modulo, Assoc::Left))
        .op(Op::prefix(Rule::neg) | Op::prefix(Rule::not))
}

struct Walker {
    pratt: PrattParser<Rule>,
}

type R<T> = Result<T, Diagnostic>;

impl Walker {
    fn expr(&self, p: Pair<Rule>) -> R<Expr> {
        // `expr` and `sum_expr` are flat sequences of prefix ops, powers and infix ops.
        self.pratt
            .map_primary(|x| self.power(x))
            .map_prefix(|op, rhs| {
                let rhs = rhs?;
                let s = span(&op).to(rhs.span);
                let u = if op.as_rule() == Rule::neg { UnaryOp::Neg } else { UnaryOp::Not };
                // Fold `-literal` so `-1` is a literal (needed in shapes and ranges).
                Ok(match (u, &rhs.kind) {
                    (UnaryOp::Neg, ExprKind::Int(n)) => Expr { kind: ExprKind::Int(-n), span: s },
                    (UnaryOp::Neg, ExprKind::Float(x)) => Expr { kind: ExprKind::Float(-x), span: s },
                    _ => Expr { kind: ExprKind::Unary(u, Box::new(rhs)), span: s },
                })
            })
            .map_infix(|lhs, op, rhs| {
                let (lhs, rhs) = (lhs?, rhs?);
                let o = match op.as_rule() {
                    Rule::or => BinaryOp::Or,
                    Rule::and => BinaryOp::And,
                    Rule::eq => BinaryOp::Eq,
                    Rule::ne => BinaryOp::Ne,
                    Rule::lt => BinaryOp::Lt,
                    Rule::le => BinaryOp::Le,
                    Rule::gt => BinaryOp::Gt,
                    Rule::ge => BinaryOp::Ge,
                    Rule::add => BinaryOp::Add,
                    Rule::sub => BinaryOp::Sub,
                    Rule::mul => BinaryOp::Mul,
                    Rule::div => BinaryOp::Div,
                    Rule::floordiv => BinaryOp::FloorDiv,
                    Rule::modulo => BinaryOp::Mod,
                    other => unreachable!("grammar: infix {other:?}"),
                };
                let s = lhs.span.to(rhs.span);
                Ok(Expr { kind: ExprKind::Binary(o, Box::new(lhs), Box::new(rhs)), span: s })
            })
            .parse(p.into_inner())
            .map(balance)
            .and_then(check_depth)
    }

    fn power(&self, p: Pair<Rule>) -> R<Expr> {
        debug_assert_eq!(p.as_rule(), Rule::power);
        let mut inner = p.into_inner();
        let base = self.primary(inner.next().expect("grammar: power has a primary"))?;
        // The exponent: prefix ops then a power.
        let rest: Vec<Pair<Rule>> = inner.collect();
        if rest.is_empty() {
            return Ok(base);
        }
        let mut exp = self.power(rest.last().expect("non-empty").clone())?;
        for op in rest[..rest.len() - 1].iter().rev() {
            let u = if op.as_rule() == Rule::neg { UnaryOp::Neg } else { UnaryOp::Not };
            let sp = span(op).to(exp.span);
            exp = match (u, &exp.kind) {
                (UnaryOp::Neg, ExprKind::Int(n)) => Expr { kind: ExprKind::Int(-n), span: sp },
                (UnaryOp::Neg, ExprKind::Float(x)) => Expr { kind: ExprKind::Float(-x), span: sp },
                _ => Expr { kind: ExprKind::Unary(u, Box::new(exp)), span: sp },
            };
        }
        // Not the pair's span: pest's implicit whitespace can leave trailing blanks in it.
        let s = base.span.to(exp.span);
        Ok(Expr { kind: ExprKind::Binary(BinaryOp::Pow, Box::new(base), Box::new(exp)), span: s })
    }

    fn primary(&self, p: Pair<Rule>) -> R<Expr> {
        let s = span(&p);
        let kind = match p.as_rule() {
            Rule::int => ExprKind::Int(
                p.as_str()
                    .parse()
                    .map_err(|_| Diagnostic::new("E0001", "integer literal is too large", s, "does not fit in 64 bits").hint("integers are 64-bit signed"))?,
            ),
            Rule::float => ExprKind::Float(p.as_str().parse().map_err(|_| Diagnostic::new("E0001", "bad float literal", s, "not a number"))?),
            Rule::boolean => ExprKind::Bool(p.as_str() == "true"),
            Rule::ident => ExprKind::Name(p.as_str().to_string()),
            Rule::expr => return self.expr(p),
            Rule::call => {
                let mut inner = p.into_inner();
                let func = ident(inner.next().expect("grammar: call name"));
                let mut args = Vec::new();
                for a in inner {
                    let mut ai = a.into_inner();
                    let first = ai.next().expect("grammar: arg");
                    if first.as_rule() == Rule::ident {
                        let value = self.expr(ai.next().expect("grammar: named arg value"))?;
                        args.push(Arg { name: Some(ident(first)), value });
                    } else {
                        args.push(Arg { name: None, value: self.expr(first)? });
                    }
                }
                ExprKind::Call { func, args }
            }
            Rule::access => {
                let mut inner = p.into_inner();
                let tensor = ident(inner.next().expect("grammar: access name"));
                let mut indices = Vec::new();
                for ix in inner {
                    let x = ix.into_inner().next().expect("grammar: index");
                    indices.push(if x.as_rule() == Rule::slice { Index::Slice(span(&x)) } else { Index::Expr(self.expr(x)?) });
                }
                ExprKind::Access { tensor, indices }
            }
            Rule::reduction => {
                let mut inner = p.into_inner();
                let op_pair = inner.next().expect("grammar: reduction op");
                let op = attnc_ir::RedOp::from_text(op_pair.as_str()).expect("grammar: reduction names match RedOp");
                let var = ident(inner.next().expect("grammar: reduction var"));
                let range = inner.next().expect("grammar: reduction range");
                let (lo, hi) = match range.as_rule() {
                    Rule::red_lt => (None, self.expr(range.into_inner().next().expect("grammar: bound"))?),
                    _ => {
                        let mut r = range.into_inner().filter(|p| p.as_rule() != Rule::kw_in);
                        let lo = self.expr(r.next().expect("grammar: lo"))?;
                        (Some(Box::new(lo)), self.expr(r.next().expect("grammar: hi"))?)
                    }
                };
                let body = self.expr(inner.next().expect("grammar: reduction body"))?;
                ExprKind::Reduce { op, var, lo, hi: Box::new(hi), body: Box::new(body) }
            }
            other => unreachable!("grammar: primary {other:?}"),
        };
        Ok(Expr { kind, span: s })
    }

    fn tensor_type(&self, p: Pair<Rule>) -> R<TensorType> {
        let s = span(&p);
        let mut inner = p.into_inner();
        let dtype = ident(inner.next().expect("grammar: dtype"));
        let shape = inner.map(|e| self.expr(e)).collect::<R<_>>()?;
        Ok(TensorType { dtype, shape, span: s })
    }

    fn assign(&self, p: Pair<Rule>) -> R<Assign> {
        let s = span(&p);
        let mut inner = p.into_inner();
        let target = ident(inner.next().expect("grammar: target"));
        let value = self.expr(inner.next().expect("grammar: value"))?;
        Ok(Assign { target, value, span: s })
    }

    fn idents(p: Pair<Rule>) -> Vec<Ident> {
        p.into_inner().map(ident).collect()
    }

    fn item(&self, p: Pair<Rule>) -> R<Item> {
        let s = span(&p);
        let rule = p.as_rule();
        let mut inner = p.into_inner();
        let mut next = || inner.next().expect("grammar: statement part");
        Ok(match rule {
            Rule::dims_decl => {
                let (mut names, mut defaults) = (Vec::new(), Vec::new());
                for d in std::iter::once(next()).chain(inner) {
                    if d.as_rule() == Rule::dim_default {
                        let mut di = d.into_inner();
                        names.push(ident(di.next().expect("grammar: dim name")));
                        defaults.push(Some(self.expr(di.next().expect("grammar: default"))?));
                    } else {
                        names.push(ident(d));
                        defaults.push(None);
                    }
                }
                Item::Dims { names, defaults, span: s }
            }
            Rule::dim_def => Item::Dim { name: ident(next()), value: self.expr(next())?, span: s },
            Rule::const_def => Item::Const { name: ident(next()), value: self.expr(next())?, span: s },
            Rule::input_decl => {
                let name = ident(next());
                let ty = self.tensor_type(next())?;
                let range = match inner.next() {
                    Some(r) => {
                        let mut ri = r.into_inner().filter(|p| p.as_rule() != Rule::kw_in);
                        Some((self.expr(ri.next().expect("grammar: lo"))?, self.expr(ri.next().expect("grammar: hi"))?))
                    }
                    None => None,
                };
                Item::Input { name, ty, range, span: s }
            }
            Rule::output_decl => Item::Output { name: ident(next()), ty: self.tensor_type(next())?, span: s },
            Rule::tensor_def => {
                let name = ident(next());
                let vars = Self::idents(next());
                let ty = self.tensor_type(next())?;
                Item::Tensor { name, vars, ty, body: self.expr(next())?, span: s }
            }
            Rule::fn_def => {
                let name = ident(next());
                let rest: Vec<Pair<Rule>> = inner.collect();
                let (params, body) = match rest.as_slice() {
                    [ps, b] => (Self::idents(ps.clone()), b.clone()),
                    [b] => (vec![], b.clone()),
                    _ => unreachable!("grammar: fn parts"),
                };
                Item::Fn { name, params, body: self.expr(body)?, span: s }
            }
            Rule::let_def => Item::Let { name: ident(next()), value: self.expr(next())?, span: s },
            Rule::require_stmt => Item::Require { cond: self.expr(next())?, span: s },
            Rule::range_decl => Item::Range { var: ident(next()), extent: self.expr(next())?, span: s },
            Rule::branch_block => {
                let name = ident(next());
                let assigns = inner.map(|a| self.assign(a)).collect::<R<_>>()?;
                Item::Branch { name, assigns, span: s }
            }
            Rule::assign => {
                let target = ident(next());
                let value = self.expr(next())?;
                Item::Assign(Assign { target, value, span: s })
            }
            other => unreachable!("grammar: statement {other:?}"),
        })
    }
}

/// How deep brackets may nest (`(`, `[`); deeper input is refused before parsing.
pub const MAX_NESTING: usize = 256;
/// How deep an expression's tree may be (after long chains are balanced).
pub const MAX_DEPTH: usize = 512;
/// Chains of one associative operator at least this long are rebuilt as balanced trees.
const BALANCE_FROM: usize = 16;

/// Refuses brackets nested deeper than [`MAX_NESTING`] (comments skipped).
fn check_nesting(src: &str) -> Result<(), Diagnostic> {
    let (mut depth, mut comment) = (0usize, false);
    for (at, c) in src.char_indices() {
        match c {
            '#' => comment = true,
            '\n' => comment = false,
            '(' | '[' if !comment => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Diagnostic::new("E0030", format!("brackets nest more than {MAX_NESTING} deep"), Span::new(at, at + 1), "too deep here")
                        .hint("name inner parts with `let`, or generate flatter expressions"));
                }
            }
            ')' | ']' if !comment => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A long left-nested chain of one associative kind (`a + b - c + …`, `a * b / c * …`,
/// `a && b && …`, `a || b || …`, as the parser builds them) rebuilt as a balanced tree of the
/// same operands in the same order: equal in exact arithmetic, and its depth grows with the
/// logarithm of its length, so generated specs with thousands of terms stay shallow for
/// every later stage. Shorter chains stay as written.
fn balance(e: Expr) -> Expr {
    use BinaryOp as B;
    fn class(op: BinaryOp) -> Option<u8> {
        match op {
            BinaryOp::Add | BinaryOp::Sub => Some(0),
            BinaryOp::Mul | BinaryOp::Div => Some(1),
            BinaryOp::And => Some(2),
            BinaryOp::Or => Some(3),
            _ => None,
        }
    }
    let Some(cl) = (match &e.kind {
        ExprKind::Binary(op, ..) => class(*op),
        _ => None,
    }) else {
        return e;
    };
    // Flatten the left spine: terms[0] and (op, term) after it.
    let mut rest: Vec<(BinaryOp, Expr)> = Vec::new();
    let mut cur = e;
    loop {
        match cur.kind {
            ExprKind::Binary(op, a, b) if class(op) == Some(cl) => {
                rest.push((op, *b));
                cur = *a;
            }
            kind => {
                cur = Expr { kind, span: cur.span };
                break;
            }
        }
    }
    rest.reverse();
    if rest.len() + 1 < BALANCE_FROM {
        // Rebuild as written.
        return rest.into_iter().fold(cur, |acc, (op, b)| {
            let s = acc.span.to(b.span);
            Expr { kind: ExprKind::Binary(op, Box::new(acc), Box::new(b)), span: s }
        });
    }
    // Every term with the operator that applies it (the first: the identity's).
    let first_op = match cl {
        0 => B::Add,
        1 => B::Mul,
        2 => B::And,
        _ => B::Or,
    };
    let terms: Vec<(BinaryOp, Expr)> = std::iter::once((first_op, balance(cur))).chain(rest.into_iter().map(|(op, t)| (op, balance(t)))).collect();
    fn inverse(op: BinaryOp) -> BinaryOp {
        match op {
            BinaryOp::Add => BinaryOp::Sub,
            BinaryOp::Sub => BinaryOp::Add,
            BinaryOp::Mul => BinaryOp::Div,
            BinaryOp::Div => BinaryOp::Mul,
            other => other,
        }
    }
    // `build` makes `t0 op1 t1 op2 t2 …` for terms whose first operator is the identity's
    // (`+`, `*`, `&&`, `||`); a right half that starts with `-` or `/` is applied inverted:
    // `l - (t_k ∓ …)` with the half's operators flipped.
    fn build(mut terms: Vec<(BinaryOp, Expr)>) -> Expr {
        if terms.len() == 1 {
            return terms.pop().expect("one").1;
        }
        let right = terms.split_off(terms.len() / 2);
        let left = build(terms);
        let op = right[0].0;
        let inv = matches!(op, BinaryOp::Sub | BinaryOp::Div);
        let right: Vec<(BinaryOp, Expr)> = right
            .into_iter()
            .enumerate()
            .map(|(n, (o, t))| {
                let o = match (n, inv) {
                    (0, _) => identity(o),
                    (_, true) => inverse(o),
                    (_, false) => o,
                };
                (o, t)
            })
            .collect();
        let r = build(right);
        let s = left.span.to(r.span);
        Expr { kind: ExprKind::Binary(op, Box::new(left), Box::new(r)), span: s }
    }
    fn identity(op: BinaryOp) -> BinaryOp {
        match op {
            BinaryOp::Sub => BinaryOp::Add,
            BinaryOp::Div => BinaryOp::Mul,
            other => other,
        }
    }
    build(terms)
}

/// Refuses an expression deeper than [`MAX_DEPTH`] (measured without recursion).
fn check_depth(e: Expr) -> Result<Expr, Diagnostic> {
    let mut stack = vec![(&e, 1usize)];
    while let Some((x, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(Diagnostic::new("E0030", format!("an expression nests more than {MAX_DEPTH} deep"), x.span, "too deep here")
                .hint("name inner parts with `let`, or write a long sum with `sum(t < T: ...)`"));
        }
        match &x.kind {
            ExprKind::Unary(_, a) => stack.push((a, depth + 1)),
            ExprKind::Binary(_, a, b) => stack.extend([(&**a, depth + 1), (&**b, depth + 1)]),
            ExprKind::Call { args, .. } => stack.extend(args.iter().map(|a| (&a.value, depth + 1))),
            ExprKind::Access { indices, .. } => stack.extend(indices.iter().filter_map(|i| match i {
                Index::Expr(x) => Some((x, depth + 1)),
                Index::Slice(_) => None,
            })),
            ExprKind::Reduce { lo, hi, body, .. } => {
                stack.extend(lo.iter().map(|l| (&**l, depth + 1)));
                stack.extend([(&**hi, depth + 1), (&**body, depth + 1)]);
            }
            ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Bool(_) | ExprKind::Name(_) => {}
        }
    }
    Ok(e)
}

/// Parses a `.attn` source into its syntax tree. A UTF-8 byte order mark at the start is
/// skipped (spans still count its bytes, so they index the text as given).
pub fn parse(src: &str) -> Result<Spec, Diagnostic> {
    check_nesting(src)?;
    let mut pairs = AttnParser::parse(Rule::spec, src).map_err(|e| syntax_error(e, src))?;
    let spec = pairs.next().expect("grammar: spec");
    let s = span(&spec);
    let w = Walker { pratt: pratt() };
    let mut inner = spec.into_inner();
    let name = ident(inner.next().expect("grammar: spec name"));
    let mut items = Vec::new();
    for p in inner {
        if p.as_rule() == Rule::EOI {
            break;
        }
        items.push(w.item(p)?);
    }
    Ok(Spec { name, items, span: s })
}
