//! The syntax tree of a `.attn` file. Every node carries the byte span it came from, so the
//! checker can point at the exact text of a mistake.

use std::fmt;

/// Byte offsets `[start, end)` into the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start: start as u32, end: end as u32 }
    }
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
    pub fn to(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub name: Ident,
    pub items: Vec<Item>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorType {
    pub dtype: Ident,
    pub shape: Vec<Expr>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Assign {
    pub target: Ident,
    pub value: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// `dims B, H, G = H`: free dims, each with an optional default (`defaults[n]` for
    /// `names[n]`).
    Dims {
        names: Vec<Ident>,
        defaults: Vec<Option<Expr>>,
        span: Span,
    },
    Dim {
        name: Ident,
        value: Expr,
        span: Span,
    },
    Const {
        name: Ident,
        value: Expr,
        span: Span,
    },
    Input {
        name: Ident,
        ty: TensorType,
        range: Option<(Expr, Expr)>,
        span: Span,
    },
    Output {
        name: Ident,
        ty: TensorType,
        span: Span,
    },
    Tensor {
        name: Ident,
        vars: Vec<Ident>,
        ty: TensorType,
        body: Expr,
        span: Span,
    },
    Fn {
        name: Ident,
        params: Vec<Ident>,
        body: Expr,
        span: Span,
    },
    Let {
        name: Ident,
        value: Expr,
        span: Span,
    },
    Require {
        cond: Expr,
        span: Span,
    },
    /// `range j < extent`: the keys' count when no tensor is indexed by `j` itself.
    Range {
        var: Ident,
        extent: Expr,
        span: Span,
    },
    Branch {
        name: Ident,
        assigns: Vec<Assign>,
        span: Span,
    },
    Assign(Assign),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Dims { span, .. }
            | Item::Dim { span, .. }
            | Item::Const { span, .. }
            | Item::Input { span, .. }
            | Item::Output { span, .. }
            | Item::Tensor { span, .. }
            | Item::Fn { span, .. }
            | Item::Let { span, .. }
            | Item::Require { span, .. }
            | Item::Range { span, .. }
            | Item::Branch { span, .. } => *span,
            Item::Assign(a) => a.span,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Mod,
    Pow,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Or => "||",
            BinaryOp::And => "&&",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::FloorDiv => "//",
            BinaryOp::Mod => "%",
            BinaryOp::Pow => "**",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Index {
    /// `:`: the whole axis, making the access a vector.
    Slice(Span),
    Expr(Expr),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Name(String),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Call {
        func: Ident,
        args: Vec<Arg>,
    },
    Access {
        tensor: Ident,
        indices: Vec<Index>,
    },
    /// `op(var < hi: body)` (lo = 0) or `op(var in lo..hi: body)`.
    Reduce {
        op: attnc_ir::RedOp,
        var: Ident,
        lo: Option<Box<Expr>>,
        hi: Box<Expr>,
        body: Box<Expr>,
    },
}

// ------------------------------------------------------------ text form (for snapshots)

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Int(n) => write!(f, "{n}"),
            ExprKind::Float(x) => write!(f, "{x:?}"),
            ExprKind::Bool(b) => write!(f, "{b}"),
            ExprKind::Name(n) => f.write_str(n),
            ExprKind::Unary(UnaryOp::Neg, a) => write!(f, "(neg {a})"),
            ExprKind::Unary(UnaryOp::Not, a) => write!(f, "(not {a})"),
            ExprKind::Binary(op, a, b) => write!(f, "({} {a} {b})", op.symbol()),
            ExprKind::Call { func, args } => {
                write!(f, "(call {}", func.name)?;
                for a in args {
                    match &a.name {
                        Some(n) => write!(f, " {}={}", n.name, a.value)?,
                        None => write!(f, " {}", a.value)?,
                    }
                }
                f.write_str(")")
            }
            ExprKind::Access { tensor, indices } => {
                write!(f, "(at {}", tensor.name)?;
                for i in indices {
                    match i {
                        Index::Slice(_) => f.write_str(" :")?,
                        Index::Expr(e) => write!(f, " {e}")?,
                    }
                }
                f.write_str(")")
            }
            ExprKind::Reduce { op, var, lo, hi, body } => match lo {
                Some(lo) => write!(f, "({op} {} {lo} {hi} {body})", var.name),
                None => write!(f, "({op} {} 0 {hi} {body})", var.name),
            },
        }
    }
}

fn shape_text(t: &TensorType) -> String {
    let dims: Vec<String> = t.shape.iter().map(|e| e.to_string()).collect();
    format!("{}[{}]", t.dtype.name, dims.join(", "))
}

impl fmt::Display for Spec {
    /// One line per item: its span, its kind and its parts in S-expression form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "spec {} @{}", self.name.name, self.span)?;
        for it in &self.items {
            let sp = it.span();
            match it {
                Item::Dims { names, defaults, .. } => {
                    let n: Vec<String> = names
                        .iter()
                        .zip(defaults)
                        .map(|(n, d)| match d {
                            Some(d) => format!("{}={d}", n.name),
                            None => n.name.clone(),
                        })
                        .collect();
                    writeln!(f, "  @{sp} dims {}", n.join(" "))?
                }
                Item::Dim { name, value, .. } => writeln!(f, "  @{sp} dim {} = {value}", name.name)?,
                Item::Const { name, value, .. } => writeln!(f, "  @{sp} const {} = {value}", name.name)?,
                Item::Input { name, ty, range, .. } => match range {
                    Some((lo, hi)) => writeln!(f, "  @{sp} input {}: {} in {lo}..{hi}", name.name, shape_text(ty))?,
                    None => writeln!(f, "  @{sp} input {}: {}", name.name, shape_text(ty))?,
                },
                Item::Output { name, ty, .. } => writeln!(f, "  @{sp} output {}: {}", name.name, shape_text(ty))?,
                Item::Tensor { name, vars, ty, body, .. } => {
                    let v: Vec<&str> = vars.iter().map(|n| n.name.as_str()).collect();
                    writeln!(f, "  @{sp} tensor {}[{}]: {} = {body}", name.name, v.join(", "), shape_text(ty))?
                }
                Item::Fn { name, params, body, .. } => {
                    let p: Vec<&str> = params.iter().map(|n| n.name.as_str()).collect();
                    writeln!(f, "  @{sp} fn {}({}) = {body}", name.name, p.join(", "))?
                }
                Item::Let { name, value, .. } => writeln!(f, "  @{sp} let {} = {value}", name.name)?,
                Item::Require { cond, .. } => writeln!(f, "  @{sp} require {cond}")?,
                Item::Range { var, extent, .. } => writeln!(f, "  @{sp} range {} < {extent}", var.name)?,
                Item::Branch { name, assigns, .. } => {
                    writeln!(f, "  @{sp} branch {}", name.name)?;
                    for a in assigns {
                        writeln!(f, "    @{} {} = {}", a.span, a.target.name, a.value)?;
                    }
                }
                Item::Assign(a) => writeln!(f, "  @{sp} {} = {}", a.target.name, a.value)?,
            }
        }
        Ok(())
    }
}
