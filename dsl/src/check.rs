//! Checking and lowering: [`Spec`] → verified [`attnc_ir::Kernel`], or a [`Diagnostic`].
//!
//! Lowering resolves names (dims, consts, tensors, helpers, lets, the index variables),
//! expands helpers and lets in place, types every expression (ints meet floats through an
//! explicit `float`), turns `dot`/`norm` over `:` slices into channel reductions, works out
//! what each index ranges over (b, h, i, e from the output, j from `value`) and checks every
//! tensor axis an index variable addresses against that range. Constructs outside the
//! attention model (scores that read other scores, other keys or other queries) are refused
//! with E0020. The kernel that comes out is canonicalized and verified.

use crate::ast::{self, BinaryOp, ExprKind, Ident, Index, Item, Span, Spec, UnaryOp};
use crate::diag::{suggest, Diagnostic};
use attnc_ir as ir;
use attnc_ir::{BinOp, DType, Extent, RedOp, Ty, UnOp};
use std::collections::{BTreeMap, BTreeSet};

/// A checked spec: the verified kernel plus what tools need to make inputs for it.
#[derive(Clone, Debug)]
pub struct Checked {
    pub kernel: ir::Kernel,
    pub info: ir::KernelInfo,
    /// Value ranges declared for inputs (`in lo..hi`), as dim expressions.
    pub ranges: BTreeMap<String, (ir::Expr, ir::Expr)>,
    /// Defaults of free dims (`dims G = H`), each a dim expression over other free dims, in
    /// an order where every default's dims come before it: what a caller that does not
    /// give the dim (`--dims`, Python's `random_inputs`) binds it to.
    pub defaults: Vec<(String, ir::Expr)>,
}

type R<T> = Result<T, Diagnostic>;

/// The computed dim that holds a key range stated as an expression (`range j < MP * PS`).
pub const KEY_RANGE_DIM: &str = "__keys";

/// Index variables and where each is available.
const ITER: [&str; 6] = ["b", "h", "i", "j", "e", "p"];
const RESERVED: [&str; 8] = ["b", "h", "i", "j", "e", "p", "s", "w"];

/// Builtin float functions of one argument.
const UNARY_FNS: [(&str, UnOp); 14] = [
    ("exp", UnOp::Exp),
    ("log", UnOp::Log),
    ("sqrt", UnOp::Sqrt),
    ("tanh", UnOp::Tanh),
    ("sigmoid", UnOp::Sigmoid),
    ("silu", UnOp::Silu),
    ("relu", UnOp::Relu),
    ("elu", UnOp::Elu),
    ("abs", UnOp::Abs),
    ("cos", UnOp::Cos),
    ("sin", UnOp::Sin),
    ("floor", UnOp::Floor),
    ("ceil", UnOp::Ceil),
    ("round", UnOp::Round),
];
const OTHER_FNS: [&str; 9] = ["min", "max", "clamp", "select", "float", "int", "dot", "norm", "cumsum"];
const NORMS: [&str; 7] = ["softmax", "sigmoid", "relu", "relu2", "none", "map", "linear"];

/// Names that users reach for to express what the attention model cannot, with the reason.
const UNSUPPORTED_FNS: [(&str, &str); 9] = [
    ("conv", "a convolution over the score matrix (Multi-Token Attention) mixes the scores of neighbouring (i, j) pairs"),
    ("conv1d", "a convolution over the score matrix (Multi-Token Attention) mixes the scores of neighbouring (i, j) pairs"),
    ("conv2d", "a convolution over the score matrix (Multi-Token Attention) mixes the scores of neighbouring (i, j) pairs"),
    ("fft", "FFT / circulant attention computes all scores at once through a transform of the whole sequence"),
    ("ifft", "FFT / circulant attention computes all scores at once through a transform of the whole sequence"),
    ("rfft", "FFT / circulant attention computes all scores at once through a transform of the whole sequence"),
    ("circulant", "circulant attention builds the score matrix from shifted copies of one row"),
    ("roll", "rolling the score matrix mixes the scores of different (i, j) pairs"),
    ("trilinear", "3-way attention multiplies a query with two keys at once"),
];
const MODEL: &str = "attnc expresses attention as score(i, j) → bias → mask → normalize over j → decay → aggregate → gate, where each score depends only on its own (query, key) pair";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cx {
    /// Dim definitions, constants, requirements, shapes, value ranges.
    Static,
    /// The body of a derived tensor: only its own index variables.
    Tensor,
    Pair,
    Row,
    Post,
    Map,
    Value,
    Gate,
}

impl Cx {
    fn vars(self) -> &'static [&'static str] {
        match self {
            Cx::Static | Cx::Tensor => &[],
            Cx::Pair => &["b", "h", "i", "j", "p"],
            Cx::Row => &["b", "h", "i", "p"],
            Cx::Post => &["b", "h", "i", "j", "p", "w"],
            Cx::Map => &["b", "h", "i", "j", "p", "s"],
            Cx::Value => &["b", "h", "j", "e"],
            Cx::Gate => &["b", "h", "i", "p", "e"],
        }
    }
    fn why(self, what: &str) -> String {
        match self {
            Cx::Static => format!("{what} is evaluated from dims and constants alone, before any index exists"),
            Cx::Tensor => "a tensor definition sees only its own index variables (name them in `tensor T[...]`)".into(),
            Cx::Pair => format!("{what} is evaluated per (b, h, i, j)"),
            Cx::Row => format!("{what} is evaluated once per query row (b, h, i)"),
            Cx::Post => "`post` maps each weight `w` of (b, h, i, j)".into(),
            Cx::Map => "`map` maps each score `s` of (b, h, i, j)".into(),
            Cx::Value => "`value` is the vector of key j, read per (b, h, j, e); it cannot depend on the query".into(),
            Cx::Gate => "the gate multiplies each output element (b, h, i, e); it cannot depend on a key".into(),
        }
    }
}

/// A lowered value: a scalar, or a vector along one axis (from a `:` slice).
#[derive(Clone, Debug)]
enum Val {
    S(ir::Expr, Ty),
    V { body: ir::Expr, ty: Ty, ext: Extent, var: String, span: Span },
}

#[derive(Clone, Debug)]
enum Local {
    /// An integer variable; `ext` is its range when it is a tensor index variable.
    Var {
        ir: String,
        ext: Option<Extent>,
    },
    Param(Val),
}

struct Scope {
    cx: Cx,
    what: &'static str,
    locals: Vec<(String, Local)>,
}

struct FnDef<'a> {
    params: &'a [Ident],
    body: &'a ast::Expr,
    span: Span,
}

struct Checker<'a> {
    dims: BTreeMap<String, (Span, bool)>,
    consts: BTreeMap<String, (Span, ir::Expr, Ty)>,
    tensors: BTreeMap<String, (Span, ir::TensorDecl)>,
    output: Option<String>,
    fns: BTreeMap<String, FnDef<'a>>,
    lets: BTreeMap<String, (Span, &'a ast::Expr)>,
    /// Union-find over extents known equal (`require N == M`).
    equal: Vec<(Extent, Extent)>,
    iter: BTreeMap<&'static str, (Extent, String)>,
    expanding: Vec<String>,
    /// Lets and helpers expanded so far (each use is a copy of the definition).
    expansions: usize,
    fresh: usize,
}

/// How deep lets and helpers may be expanded inside one another.
pub const MAX_EXPANSION_DEPTH: usize = 128;
/// How many copies of lets and helpers one spec may expand to (each use copies its
/// definition: a chain of `let x2 = x1 * x1` doubles at every step).
pub const MAX_EXPANSIONS: usize = 200_000;

fn d(code: &'static str, msg: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
    Diagnostic::new(code, msg, span, label)
}

impl<'a> Checker<'a> {
    fn fresh(&mut self, base: &str) -> String {
        self.fresh += 1;
        format!("{base}{}", self.fresh)
    }

    fn same_extent(&self, a: &Extent, b: &Extent) -> bool {
        if a == b {
            return true;
        }
        // Transitive closure over the `require` equalities (few, so a simple search).
        let mut seen = vec![a.clone()];
        let mut k = 0;
        while k < seen.len() {
            let cur = seen[k].clone();
            for (x, y) in &self.equal {
                for (p, q) in [(x, y), (y, x)] {
                    if *p == cur && !seen.contains(q) {
                        seen.push(q.clone());
                    }
                }
            }
            k += 1;
        }
        seen.contains(b)
    }

    fn all_names(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        v.extend(self.dims.keys().cloned());
        v.extend(self.consts.keys().cloned());
        v.extend(self.tensors.keys().cloned());
        v.extend(self.fns.keys().cloned());
        v.extend(self.lets.keys().cloned());
        v.extend(ITER.iter().map(|s| s.to_string()));
        v
    }

    fn unknown(&self, name: &str, span: Span, scope: &Scope) -> Diagnostic {
        let mut cands = self.all_names();
        cands.extend(scope.locals.iter().map(|(n, _)| n.clone()));
        let mut diag = d("E0002", format!("unknown name `{name}`"), span, "not declared");
        if let Some(s) = suggest(name, cands.iter().map(String::as_str)) {
            diag = diag.hint(format!("did you mean `{s}`?"));
        } else {
            diag = diag.hint("declare it first: `dims`, `const`, `input`, `tensor`, `let` or `fn`");
        }
        diag
    }

    // ---------------------------------------------------------------- expressions

    fn scalar(&mut self, e: &ast::Expr, scope: &mut Scope) -> R<(ir::Expr, Ty)> {
        match self.lower(e, scope)? {
            Val::S(x, t) => Ok((x, t)),
            Val::V { ext, span, .. } => Err(d("E0017", format!("a vector over `{ext}` is used where a single number is needed"), e.span, "this is a vector")
                .with_secondary(span, "the `:` makes it a vector")
                .hint("reduce it with `dot(x, y)` or `norm(x)`, or index that axis")),
        }
    }

    fn typed(&mut self, e: &ast::Expr, scope: &mut Scope, want: Ty, what: &str) -> R<ir::Expr> {
        let (x, t) = self.scalar(e, scope)?;
        match (t, want) {
            (a, b) if a == b => Ok(x),
            (Ty::Int, Ty::Float) => Ok(ir::Expr::un(UnOp::ToFloat, x)),
            (t, want) => {
                let hint = match want {
                    Ty::Bool => "write a condition, e.g. `j <= p`",
                    Ty::Int => "indices and integer math use ints; `//` is integer division, `/` is float division",
                    Ty::Float => "use `select(cond, 1.0, 0.0)` to turn a condition into a number",
                };
                Err(d("E0006", format!("{what} must be {want}, found {t}"), e.span, format!("this is {t}")).hint(hint))
            }
        }
    }

    /// The defaults of free dims, checked (dim expressions over free dims, no cycle) and
    /// ordered so that every default's dims come first.
    fn dim_defaults(&mut self, pending: &[(&Ident, &ast::Expr)]) -> R<Vec<(String, ir::Expr)>> {
        let mut lowered: Vec<(&Ident, ir::Expr, Vec<String>)> = Vec::new();
        for (name, e) in pending {
            let v = self.static_int(e, "a dim default")?;
            let mut uses = Vec::new();
            v.walk(&mut |x| {
                if let ir::Expr::Dim(u) = x {
                    uses.push(u.clone());
                }
            });
            if let Some(u) = uses.iter().find(|u| self.dims.get(*u).is_some_and(|(_, computed)| *computed)) {
                return Err(d("E0031", format!("the default of `{}` uses `{u}`, a computed dim", name.name), e.span, "computed by the spec")
                    .hint("a default may use the dims declared with `dims` (and consts); write the computation out"));
            }
            lowered.push((name, v, uses));
        }
        // Order by dependency; a default that waits on itself through others is a cycle.
        let mut done: Vec<(String, ir::Expr)> = Vec::new();
        let mut left = lowered;
        while !left.is_empty() {
            let ready = left.iter().position(|(_, _, uses)| uses.iter().all(|u| !left.iter().any(|(n, _, _)| &n.name == u)));
            let Some(at) = ready else {
                let (first, _, _) = &left[0];
                let chain: Vec<&str> = left.iter().map(|(n, _, _)| n.name.as_str()).collect();
                let mut diag = d(
                    "E0031",
                    format!("the defaults of {} depend on each other", chain.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")),
                    first.span,
                    "in a cycle",
                );
                for (n, _, _) in &left[1..] {
                    diag = diag.with_secondary(n.span, "in the same cycle");
                }
                return Err(diag.hint("give at least one of them without a default (it then comes from the inputs' shapes or the caller)"));
            };
            let (n, v, _) = left.remove(at);
            done.push((n.name.clone(), v));
        }
        Ok(done)
    }

    fn static_int(&mut self, e: &ast::Expr, what: &str) -> R<ir::Expr> {
        let mut sc = Scope { cx: Cx::Static, what: "a dim expression", locals: vec![] };
        self.typed(e, &mut sc, Ty::Int, what)
    }

    fn var(&mut self, name: &str, span: Span, scope: &mut Scope) -> R<Val> {
        if let Some((_, l)) = scope.locals.iter().rev().find(|(n, _)| n == name) {
            return Ok(match l {
                Local::Var { ir, .. } => Val::S(ir::Expr::Var(ir.clone()), Ty::Int),
                Local::Param(v) => v.clone(),
            });
        }
        if matches!(name, "s" | "w") {
            let allowed = (name == "s" && scope.cx == Cx::Map) || (name == "w" && scope.cx == Cx::Post);
            if allowed {
                return Ok(Val::S(ir::Expr::var(name), Ty::Float));
            }
            if matches!(scope.cx, Cx::Pair | Cx::Row) {
                return Err(d("E0020", format!("{} cannot read the score `{name}`", scope.what), span, "scores cannot depend on scores")
                    .with_note(format!("note: {MODEL}; convolutions over the score matrix fall outside it"))
                    .hint("`s` is available inside `normalize = map(...)`, `w` inside `softmax(post = ...)`"));
            }
            return Err(d("E0010", format!("`{name}` is not available in {}", scope.what), span, "not available here")
                .hint("`s` is the score inside `normalize = map(...)`; `w` is the weight inside `softmax(post = ...)`"));
        }
        if ITER.contains(&name) {
            if !scope.cx.vars().contains(&name) {
                let avail: Vec<&str> = scope.cx.vars().iter().copied().filter(|v| ITER.contains(v)).collect();
                let hint = match (name, scope.cx) {
                    ("i" | "p", Cx::Value) => "the key's vector is read with `j`, e.g. `v[b, h, j, e]`".to_string(),
                    ("j", Cx::Gate) => "a per-key quantity belongs in `value`; the gate reads the query row with `i`".to_string(),
                    _ if avail.is_empty() => "no index variables exist here; use dims, constants and the variables you name".to_string(),
                    _ => format!("the indices available here are {}", avail.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ")),
                };
                return Err(d("E0010", format!("index `{name}` is not available in {}", scope.what), span, "not available here")
                    .with_note(format!("note: {}", scope.cx.why(scope.what)))
                    .hint(hint));
            }
            if name == "p" {
                return Ok(Val::S(self.query_position(), Ty::Int));
            }
            return Ok(Val::S(ir::Expr::var(name), Ty::Int));
        }
        if self.dims.contains_key(name) {
            return Ok(Val::S(ir::Expr::Dim(name.to_string()), Ty::Int));
        }
        if let Some((_, v, t)) = self.consts.get(name) {
            return Ok(Val::S(v.clone(), *t));
        }
        if let Some((sp, body)) = self.lets.get(name).map(|(s, b)| (*s, *b)) {
            if self.expanding.iter().any(|n| n == name) {
                let from = self.expanding.iter().position(|n| n == name).expect("checked");
                let cycle: Vec<&str> = self.expanding[from..].iter().map(String::as_str).chain([name]).collect();
                let label = if cycle.len() == 2 {
                    "used inside its own definition".to_string()
                } else {
                    format!("used inside the definition of `{}`", cycle[cycle.len() - 2])
                };
                return Err(d("E0021", format!("`{name}` is defined in terms of itself: {}", cycle.join(" → ")), span, label)
                    .with_secondary(sp, "defined here")
                    .hint("lets and helpers are expanded in place, so they cannot recurse"));
            }
            self.expanding_push(name, span)?;
            let r = self.lower_closed(body, scope);
            self.expanding_pop();
            return r;
        }
        if self.tensors.contains_key(name) {
            let rank = self.tensors[name].1.shape.len();
            return Err(d(
                "E0005",
                format!("tensor `{name}` is used without indices"),
                span,
                format!("`{name}` has {rank} {}", if rank == 1 { "axis" } else { "axes" }),
            )
            .hint(format!("index it, e.g. `{name}[{}]`", vec!["..."; rank].join(", "))));
        }
        if self.fns.contains_key(name) {
            return Err(
                d("E0016", format!("helper `{name}` is used without arguments"), span, "a helper must be called").hint(format!("call it: `{name}(...)`"))
            );
        }
        if NORMS.contains(&name) && !UNARY_FNS.iter().any(|(n, _)| *n == name) {
            return Err(d("E0015", format!("`{name}` is a normalization, not a value"), span, "only valid after `normalize =`")
                .hint(format!("write `normalize = {name}`")));
        }
        Err(self.unknown(name, span, scope))
    }

    /// `p`, the position of query row `i` in the key sequence: `i + (M - N)`.
    fn query_position(&self) -> ir::Expr {
        let (ei, _) = self.iter.get("i").cloned().expect("iteration extents are known before pair expressions");
        let (ej, _) = self.iter.get("j").cloned().expect("iteration extents are known before pair expressions");
        if self.same_extent(&ei, &ej) {
            return ir::Expr::var("i");
        }
        let off = ir::Expr::bin(BinOp::Sub, ej.to_expr(), ei.to_expr());
        ir::Expr::bin(BinOp::Add, ir::Expr::var("i"), off)
    }

    // Lets and helpers are expanded where used; the expansion stack catches cycles.
    fn expanding_push(&mut self, n: &str, span: Span) -> R<()> {
        self.expansions += 1;
        if self.expanding.len() >= MAX_EXPANSION_DEPTH {
            return Err(d("E0030", format!("lets and helpers are expanded more than {MAX_EXPANSION_DEPTH} deep"), span, format!("`{n}` here"))
                .with_note(format!("note: the chain starts with {}", self.expanding.iter().take(3).map(|x| format!("`{x}`")).collect::<Vec<_>>().join(", ")))
                .hint("write the expression with a reduction (`sum(t < T: ...)`) or a tensor definition instead of a long chain of lets"));
        }
        if self.expansions > MAX_EXPANSIONS {
            return Err(d("E0030", format!("expanding lets and helpers makes more than {MAX_EXPANSIONS} copies of them"), span, format!("`{n}` here"))
                .with_note(format!(
                    "note: each use of a let or helper is a copy of its definition, so definitions that use earlier ones twice grow exponentially (here while expanding {})",
                    self.expanding.iter().take(3).map(|x| format!("`{x}`")).collect::<Vec<_>>().join(" → ")
                ))
                .hint("compute the shared part once as a `tensor`, or write the expression with a reduction"));
        }
        self.expanding.push(n.to_string());
        Ok(())
    }
    fn expanding_pop(&mut self) {
        self.expanding.pop();
    }

    /// Lowers a let body in the user's context but without the user's local variables.
    fn lower_closed(&mut self, body: &ast::Expr, scope: &mut Scope) -> R<Val> {
        let saved = std::mem::take(&mut scope.locals);
        let r = self.lower(body, scope);
        scope.locals = saved;
        r
    }

    fn unify_vec(&self, a: &Val, b: &Val, span: Span) -> R<Option<(Extent, String)>> {
        match (a, b) {
            (Val::V { ext: e1, var: v1, .. }, Val::V { ext: e2, span: s2, .. }) => {
                if !self.same_extent(e1, e2) {
                    return Err(d("E0018", format!("vectors over `{e1}` and `{e2}` are combined"), span, "lengths differ")
                        .with_secondary(*s2, format!("this is over `{e2}`"))
                        .hint(format!("both sides must run over the same axis length; add `require {e1} == {e2}` if they are equal")));
                }
                Ok(Some((e1.clone(), v1.clone())))
            }
            (Val::V { ext, var, .. }, _) | (_, Val::V { ext, var, .. }) => Ok(Some((ext.clone(), var.clone()))),
            _ => Ok(None),
        }
    }

    /// Why float expression `x` may be NaN at some point of its domain, by interval analysis
    /// ([`ir::interval`]) with the iteration indices and free dims non-negative and nothing
    /// known about tensor data or other variables; `None` when it cannot be. The reason
    /// names the smallest subexpression that may be NaN.
    fn may_be_nan(&self, x: &ir::Expr) -> Option<String> {
        use ir::interval::{eval, Iv, NoData};
        let big = Iv::Int(0, i32::MAX as i64);
        let mut vars: Vec<(String, Iv)> = ITER.iter().map(|v| (v.to_string(), big)).collect();
        for (name, (_, computed)) in &self.dims {
            if !computed {
                vars.push((format!("dim:{name}"), big));
            }
        }
        fn dims_as_vars(e: &ir::Expr) -> ir::Expr {
            match e {
                ir::Expr::Dim(n) => ir::Expr::var(&format!("dim:{n}")),
                _ => e.map_children(&mut dims_as_vars),
            }
        }
        let free = |e: &ir::Expr, vars: &mut Vec<(String, Iv)>| matches!(eval(&dims_as_vars(e), vars, &BTreeMap::new(), &NoData), Iv::Float { nan: false, .. });
        if free(x, &mut vars) {
            return None;
        }
        // The smallest culprit: a float subexpression that may be NaN whose float operands
        // cannot be.
        let mut culprit = x.clone();
        loop {
            let next = culprit.children().into_iter().find(|c| self.kernel_ty(c) == Some(Ty::Float) && !free(c, &mut vars)).cloned();
            match next {
                Some(c) => culprit = c,
                None => break,
            }
        }
        let what = match &culprit {
            ir::Expr::Load(t, _) => format!("`{t}` is float data, which may hold NaN: bucket an integer input (`i32`) instead"),
            ir::Expr::Var(v) => format!("`{v}` may be NaN"),
            ir::Expr::Unary(op @ (UnOp::Log | UnOp::Sqrt), a) => {
                format!("`{op}` is NaN below 0, and `{}` may be negative for some indices", ir::pretty::infix(a))
            }
            e => format!("`{}` may be NaN for some indices (an infinity times 0, or minus another, is NaN)", ir::pretty::infix(e)),
        };
        Some(what)
    }

    /// Whether a lowered expression is a float (`None` for ints and conditions).
    fn kernel_ty(&self, e: &ir::Expr) -> Option<Ty> {
        use ir::Expr as X;
        let float = match e {
            X::Float(_) => true,
            X::Int(_) | X::Dim(_) | X::Bool(_) => false,
            X::Var(v) => v == "s" || v == "w",
            X::Load(t, _) => self.tensors.get(t).is_some_and(|(_, d)| !d.dtype.is_int()),
            X::Unary(UnOp::Not | UnOp::ToInt, _) => false,
            X::Unary(UnOp::Neg | UnOp::Abs, a) => self.kernel_ty(a).is_some(),
            X::Unary(..) => true,
            X::Binary(op, a, _) => !op.is_comparison() && !matches!(op, BinOp::And | BinOp::Or) && self.kernel_ty(a).is_some(),
            X::Select(_, a, _) => self.kernel_ty(a).is_some(),
            X::Reduce { body, .. } => self.kernel_ty(body).is_some(),
        };
        float.then_some(Ty::Float)
    }

    /// Splits a value into (expr, type), renaming a vector's variable to `to`.
    fn parts(v: Val, to: Option<&str>) -> (ir::Expr, Ty) {
        match v {
            Val::S(x, t) => (x, t),
            Val::V { body, ty, var, .. } => match to {
                Some(t) if t != var => (body.subst(&var, &ir::Expr::var(t)), ty),
                _ => (body, ty),
            },
        }
    }

    fn rebuild(x: ir::Expr, t: Ty, vecinfo: &Option<(Extent, String)>, span: Span) -> Val {
        match vecinfo {
            None => Val::S(x, t),
            Some((ext, var)) => Val::V { body: x, ty: t, ext: ext.clone(), var: var.clone(), span },
        }
    }

    fn promote(x: ir::Expr, from: Ty, to: Ty) -> ir::Expr {
        if from == Ty::Int && to == Ty::Float {
            ir::Expr::un(UnOp::ToFloat, x)
        } else {
            x
        }
    }

    fn binary(&mut self, op: BinaryOp, a: &ast::Expr, b: &ast::Expr, span: Span, scope: &mut Scope) -> R<Val> {
        let (va, vb) = (self.lower(a, scope)?, self.lower(b, scope)?);
        let vi = self.unify_vec(&va, &vb, span)?;
        let var = vi.as_ref().map(|(_, v)| v.clone());
        let (xa, ta) = Self::parts(va, var.as_deref());
        let (xb, tb) = Self::parts(vb, var.as_deref());
        let numeric = |t: Ty| t != Ty::Bool;
        let mismatch = |what: &str| {
            d("E0006", format!("`{}` {what}, found {ta} and {tb}", op.symbol()), span, format!("{ta} {} {tb}", op.symbol())).hint(match op {
                BinaryOp::And | BinaryOp::Or => "combine conditions with && and ||, e.g. `j <= p && p - j < W`",
                _ => "numbers and conditions do not mix; `select(cond, a, b)` picks a number by a condition",
            })
        };
        let (x, t) = match op {
            BinaryOp::And | BinaryOp::Or => {
                if ta != Ty::Bool || tb != Ty::Bool {
                    return Err(mismatch("needs two conditions"));
                }
                (ir::Expr::bin(if op == BinaryOp::And { BinOp::And } else { BinOp::Or }, xa, xb), Ty::Bool)
            }
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                let bop = match op {
                    BinaryOp::Eq => BinOp::Eq,
                    BinaryOp::Ne => BinOp::Ne,
                    BinaryOp::Lt => BinOp::Lt,
                    BinaryOp::Le => BinOp::Le,
                    BinaryOp::Gt => BinOp::Gt,
                    _ => BinOp::Ge,
                };
                let eq_op = matches!(op, BinaryOp::Eq | BinaryOp::Ne);
                if (ta == Ty::Bool) != (tb == Ty::Bool) || (ta == Ty::Bool && !eq_op) {
                    return Err(mismatch("compares two numbers (or two conditions with == and !=)"));
                }
                let t = if ta == Ty::Float || tb == Ty::Float { Ty::Float } else { ta };
                (ir::Expr::bin(bop, Self::promote(xa, ta, t), Self::promote(xb, tb, t)), Ty::Bool)
            }
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul => {
                if !numeric(ta) || !numeric(tb) {
                    return Err(mismatch("needs two numbers"));
                }
                let t = if ta == Ty::Float || tb == Ty::Float { Ty::Float } else { Ty::Int };
                let bop = match op {
                    BinaryOp::Add => BinOp::Add,
                    BinaryOp::Sub => BinOp::Sub,
                    _ => BinOp::Mul,
                };
                (ir::Expr::bin(bop, Self::promote(xa, ta, t), Self::promote(xb, tb, t)), t)
            }
            BinaryOp::Div | BinaryOp::Pow => {
                if !numeric(ta) || !numeric(tb) {
                    return Err(mismatch("needs two numbers"));
                }
                let bop = if op == BinaryOp::Div { BinOp::Div } else { BinOp::Pow };
                (ir::Expr::bin(bop, Self::promote(xa, ta, Ty::Float), Self::promote(xb, tb, Ty::Float)), Ty::Float)
            }
            BinaryOp::FloorDiv | BinaryOp::Mod => {
                if ta != Ty::Int || tb != Ty::Int {
                    let bad = if ta != Ty::Int { a.span } else { b.span };
                    return Err(d("E0006", format!("`{}` is integer arithmetic, found {ta} and {tb}", op.symbol()), bad, "not an integer")
                        .hint("use `/` for float division"));
                }
                // The divisor must be fixed for the whole kernel, so division is never by an
                // index or by data (a zero there would be a run-time fault).
                if !xb.free_vars().is_empty() || !xb.loads().is_empty() {
                    return Err(d(
                        "E0008",
                        format!("the divisor of `{}` must be a constant or a dim expression", op.symbol()),
                        b.span,
                        match xb.free_vars().into_iter().find(|v| ITER.contains(&v.as_str())) {
                            Some(v) => format!("depends on the index `{v}`"),
                            None if !xb.loads().is_empty() => "depends on tensor data".to_string(),
                            None => "depends on a reduction or tensor index variable".to_string(),
                        },
                    )
                    .hint("divide by a `const`, a dim or an expression of them (e.g. `h // (H // G)`)"));
                }
                if let Ok(0) = ir::bind::eval_dims(&xb, &BTreeMap::new()) {
                    let mut diag = d("E0009", "division by zero", b.span, "this is 0");
                    if let ExprKind::Name(n) = &b.kind {
                        if let Some((sp, _, _)) = self.consts.get(n) {
                            diag = diag.with_secondary(*sp, format!("`{n}` is defined here"));
                        }
                    }
                    return Err(diag.hint("the divisor of `//` and `%` must not be zero"));
                }
                let bop = if op == BinaryOp::FloorDiv { BinOp::FloorDiv } else { BinOp::Mod };
                (ir::Expr::bin(bop, xa, xb), Ty::Int)
            }
        };
        Ok(Self::rebuild(x, t, &vi, span))
    }

    fn args_exact(&self, func: &Ident, args: &[ast::Arg], n: usize, usage: &str) -> R<()> {
        if let Some(a) = args.iter().find(|a| a.name.is_some()) {
            let nm = a.name.as_ref().expect("named");
            return Err(d("E0016", format!("`{}` takes no named arguments", func.name), nm.span, "named argument").hint(format!("usage: {usage}")));
        }
        if args.len() != n {
            return Err(d("E0016", format!("`{}` takes {n} argument(s), found {}", func.name, args.len()), func.span, "wrong number of arguments")
                .hint(format!("usage: {usage}")));
        }
        Ok(())
    }

    fn call(&mut self, func: &Ident, args: &[ast::Arg], span: Span, scope: &mut Scope) -> R<Val> {
        let name = func.name.as_str();
        if let Some((_, why)) = UNSUPPORTED_FNS.iter().find(|(n, _)| *n == name) {
            return Err(d("E0020", format!("`{name}` is not expressible in attnc"), func.span, "unsupported construct")
                .with_note(format!("note: {why}"))
                .with_note(format!("note: {MODEL}"))
                .hint("this variant cannot be compiled by attnc; write each score from its own query and key (plus per-pair bias and mask)"));
        }
        if let Some(&(_, op)) = UNARY_FNS.iter().find(|(n, _)| *n == name) {
            self.args_exact(func, args, 1, &format!("{name}(x)"))?;
            let v = self.lower(&args[0].value, scope)?;
            let vi = self.unify_vec(&v, &v, span)?;
            let (x, t) = Self::parts(v, None);
            if t == Ty::Bool {
                return Err(d("E0006", format!("`{name}` takes a number, found bool"), args[0].value.span, "a condition").hint("use `select(cond, 1.0, 0.0)`"));
            }
            let (x, t) = if op == UnOp::Abs { (x, t) } else { (Self::promote(x, t, Ty::Float), Ty::Float) };
            return Ok(Self::rebuild(ir::Expr::un(op, x), t, &vi, span));
        }
        match name {
            "min" | "max" => {
                self.args_exact(func, args, 2, &format!("{name}(a, b)"))?;
                let fake = ast::Expr { kind: ExprKind::Int(0), span };
                let _ = fake;
                let (va, vb) = (self.lower(&args[0].value, scope)?, self.lower(&args[1].value, scope)?);
                let vi = self.unify_vec(&va, &vb, span)?;
                let var = vi.as_ref().map(|(_, v)| v.clone());
                let (xa, ta) = Self::parts(va, var.as_deref());
                let (xb, tb) = Self::parts(vb, var.as_deref());
                if ta == Ty::Bool || tb == Ty::Bool {
                    return Err(d("E0006", format!("`{name}` takes numbers"), span, "a condition is not a number"));
                }
                let t = if ta == Ty::Float || tb == Ty::Float { Ty::Float } else { Ty::Int };
                let op = if name == "min" { BinOp::Min } else { BinOp::Max };
                Ok(Self::rebuild(ir::Expr::bin(op, Self::promote(xa, ta, t), Self::promote(xb, tb, t)), t, &vi, span))
            }
            "clamp" => {
                self.args_exact(func, args, 3, "clamp(x, lo, hi)")?;
                let vs: Vec<Val> = args.iter().map(|a| self.lower(&a.value, scope)).collect::<R<_>>()?;
                let vi = match (self.unify_vec(&vs[0], &vs[1], span)?, self.unify_vec(&vs[0], &vs[2], span)?) {
                    (Some(a), _) => Some(a),
                    (None, b) => b,
                };
                let var = vi.as_ref().map(|(_, v)| v.clone());
                let ps: Vec<(ir::Expr, Ty)> = vs.into_iter().map(|v| Self::parts(v, var.as_deref())).collect();
                if ps.iter().any(|(_, t)| *t == Ty::Bool) {
                    return Err(d("E0006", "`clamp` takes numbers", span, "a condition is not a number"));
                }
                let t = if ps.iter().any(|(_, t)| *t == Ty::Float) { Ty::Float } else { Ty::Int };
                let mut it = ps.into_iter().map(|(x, tt)| Self::promote(x, tt, t));
                let (x, lo, hi) = (it.next().expect("3"), it.next().expect("3"), it.next().expect("3"));
                Ok(Self::rebuild(ir::Expr::bin(BinOp::Min, ir::Expr::bin(BinOp::Max, x, lo), hi), t, &vi, span))
            }
            "select" => {
                self.args_exact(func, args, 3, "select(cond, a, b)")?;
                let c = self.typed(&args[0].value, scope, Ty::Bool, "the condition of `select`")?;
                let (va, vb) = (self.lower(&args[1].value, scope)?, self.lower(&args[2].value, scope)?);
                let vi = self.unify_vec(&va, &vb, span)?;
                let var = vi.as_ref().map(|(_, v)| v.clone());
                let (xa, ta) = Self::parts(va, var.as_deref());
                let (xb, tb) = Self::parts(vb, var.as_deref());
                let t = match (ta, tb) {
                    (a, b) if a == b => a,
                    (Ty::Bool, _) | (_, Ty::Bool) => {
                        return Err(d("E0006", format!("`select` arms must have one type, found {ta} and {tb}"), span, "arms differ"))
                    }
                    _ => Ty::Float,
                };
                Ok(Self::rebuild(ir::Expr::select(c, Self::promote(xa, ta, t), Self::promote(xb, tb, t)), t, &vi, span))
            }
            "float" => {
                self.args_exact(func, args, 1, "float(x)")?;
                let x = self.typed(&args[0].value, scope, Ty::Float, "the argument of `float`")?;
                Ok(Val::S(x, Ty::Float))
            }
            "int" => {
                self.args_exact(func, args, 1, "int(x)")?;
                let v = self.lower(&args[0].value, scope)?;
                let vi = self.unify_vec(&v, &v, span)?;
                let (x, t) = Self::parts(v, None);
                match t {
                    Ty::Bool => Err(d("E0006", "`int` takes a number, found bool", args[0].value.span, "a condition").hint("use `select(cond, 1, 0)`")),
                    Ty::Int => Ok(Self::rebuild(x, Ty::Int, &vi, span)),
                    Ty::Float => {
                        if let Some(why) = self.may_be_nan(&x) {
                            return Err(d("E0033", "`int` of a value that may be NaN", args[0].value.span, "may be NaN")
                                .with_note(format!("note: {why}"))
                                .with_note("note: `int(x)` rounds toward zero and saturates at ±2^24; NaN has no integer, so its operand must be provably a number")
                                .hint("compute it from integers and constants, e.g. `int(log(float(abs(i - j)) / 16.0) * 8.0)` (`log` of a non-negative value, divisors that are never zero)"));
                        }
                        Ok(Self::rebuild(ir::Expr::un(UnOp::ToInt, x), Ty::Int, &vi, span))
                    }
                }
            }
            "dot" | "norm" => {
                let n = if name == "dot" { 2 } else { 1 };
                self.args_exact(func, args, n, if n == 2 { "dot(x[..., :], y[..., :])" } else { "norm(x[..., :])" })?;
                let vs: Vec<Val> = args.iter().map(|a| self.lower(&a.value, scope)).collect::<R<_>>()?;
                for (v, a) in vs.iter().zip(args) {
                    if let Val::S(..) = v {
                        return Err(d("E0017", format!("`{name}` takes vectors, found a number"), a.value.span, "not a vector")
                            .hint("make it a vector with `:` on one axis, e.g. `q[b, h, i, :]`"));
                    }
                }
                let (a, b) = (&vs[0], vs.last().expect("1 or 2"));
                let vi = self.unify_vec(a, b, span)?.expect("vectors");
                let (ext, _) = vi;
                let r = self.fresh("r");
                let (xa, ta) = Self::parts(vs[0].clone(), Some(&r));
                let (xb, tb) = Self::parts(vs.last().expect("1 or 2").clone(), Some(&r));
                if ta == Ty::Bool || tb == Ty::Bool {
                    return Err(d("E0006", format!("`{name}` takes numeric vectors"), span, "a vector of conditions"));
                }
                let prod = ir::Expr::bin(BinOp::Mul, Self::promote(xa, ta, Ty::Float), Self::promote(xb, tb, Ty::Float));
                let sum = ir::Expr::Reduce { op: RedOp::Sum, var: r, lo: Box::new(ir::Expr::Int(0)), hi: Box::new(ext.to_expr()), body: Box::new(prod) };
                Ok(Val::S(if n == 1 { ir::Expr::un(UnOp::Sqrt, sum) } else { sum }, Ty::Float))
            }
            "cumsum" => Err(d("E0028", "`cumsum` is only valid as the whole definition of a tensor", func.span, "not allowed here")
                .hint("write `tensor L[b, h, t, d]: f32[B, H, N, D] = cumsum(t, a[b, h, t, d])`")),
            _ => {
                if let Some(f) = self.fns.get(name) {
                    let (params, body, fspan) = (f.params, f.body, f.span);
                    if let Some(a) = args.iter().find(|a| a.name.is_some()) {
                        return Err(d("E0016", format!("helper `{name}` takes positional arguments"), a.name.as_ref().expect("named").span, "named argument"));
                    }
                    if params.len() != args.len() {
                        return Err(d(
                            "E0016",
                            format!("helper `{name}` takes {} argument(s), found {}", params.len(), args.len()),
                            span,
                            "wrong number of arguments",
                        )
                        .with_secondary(fspan, "defined here"));
                    }
                    if self.expanding.iter().any(|n| n == name) {
                        return Err(d("E0021", format!("helper `{name}` calls itself"), span, "recursive call")
                            .with_secondary(fspan, "defined here")
                            .hint("helpers are expanded in place, so they cannot recurse"));
                    }
                    let vals: Vec<Val> = args.iter().map(|a| self.lower(&a.value, scope)).collect::<R<_>>()?;
                    let saved = std::mem::take(&mut scope.locals);
                    for (p, v) in params.iter().zip(vals) {
                        scope.locals.push((p.name.clone(), Local::Param(v)));
                    }
                    if let Err(e) = self.expanding_push(name, span) {
                        scope.locals = saved;
                        return Err(e);
                    }
                    let r = self.lower(body, scope);
                    self.expanding_pop();
                    scope.locals = saved;
                    return r;
                }
                if NORMS.contains(&name) {
                    return Err(d("E0015", format!("`{name}` is a normalization, not a function"), func.span, "only valid after `normalize =`")
                        .hint(format!("give the raw logits as `score` and write `normalize = {name}`")));
                }
                let mut cands: Vec<&str> = UNARY_FNS.iter().map(|(n, _)| *n).collect();
                cands.extend(OTHER_FNS);
                cands.extend(self.fns.keys().map(String::as_str));
                let mut diag = d("E0016", format!("unknown function `{name}`"), func.span, "not a builtin or helper");
                diag = match suggest(name, cands.iter().copied()) {
                    Some(s) => diag.hint(format!("did you mean `{s}`?")),
                    None => diag.hint(format!("builtins: {}; define helpers with `fn`", cands.join(", "))),
                };
                Err(diag)
            }
        }
    }

    fn access(&mut self, tensor: &Ident, indices: &[Index], span: Span, scope: &mut Scope) -> R<Val> {
        let name = tensor.name.as_str();
        let Some((_, decl)) = self.tensors.get(name).cloned() else {
            if self.output.as_deref() == Some(name) {
                return Err(d("E0019", format!("the output `{name}` cannot be read"), tensor.span, "the output")
                    .hint("the output is what the kernel computes, so nothing in the spec can read it; compute intermediate values with `tensor` or `let`"));
            }
            return Err(self.unknown(name, tensor.span, scope));
        };
        if scope.cx == Cx::Static {
            return Err(d("E0010", format!("tensor `{name}` cannot be read in {}", scope.what), tensor.span, "tensor data is not available here")
                .with_note(format!("note: {}", scope.cx.why(scope.what)))
                .hint("these are settled from input shapes before any tensor is read: use dims and constants (a size that varies is a dim in `dims`)"));
        }
        if decl.shape.len() != indices.len() {
            return Err(d(
                "E0005",
                format!("`{name}` has {} axes but is indexed with {}", decl.shape.len(), indices.len()),
                span,
                format!("{} indices", indices.len()),
            )
            .hint(format!("`{name}` is declared as {}[{}]", decl.dtype, decl.shape.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "))));
        }
        let mut idx = Vec::new();
        let mut vec: Option<(Extent, String, Span)> = None;
        let mut shifted_checks: Vec<(ir::Expr, usize, Span)> = Vec::new();
        for (axis, ix) in indices.iter().enumerate() {
            match ix {
                Index::Slice(s) => {
                    if let Some((_, _, first)) = &vec {
                        return Err(d("E0017", format!("`{name}` is sliced on two axes"), *s, "second `:`")
                            .with_secondary(*first, "first `:`")
                            .hint("a vector runs along one axis; index the others"));
                    }
                    let v = self.fresh("__vec");
                    idx.push(ir::Expr::Var(v.clone()));
                    vec = Some((decl.shape[axis].clone(), v, *s));
                }
                Index::Expr(e) => {
                    let (x, t) = self.scalar(e, scope)?;
                    if t != Ty::Int {
                        return Err(d("E0007", format!("index {axis} of `{name}` is {t}, not an integer"), e.span, format!("this is {t}"))
                            .hint("indices are integers; `//` is integer division"));
                    }
                    self.check_axis(&x, &decl, axis, e.span, scope)?;
                    check_static_bound(&x, &decl, axis, e.span)?;
                    shifted_checks.push((x.clone(), axis, e.span));
                    idx.push(x);
                }
            }
        }
        // A feature vector (sliced with `:`, or indexed by a reduction variable) at a
        // neighbouring key or query is a neighbouring pair's score in the making.
        let reduction_vars: Vec<&str> = scope
            .locals
            .iter()
            .filter_map(|(_, l)| match l {
                Local::Var { ir, ext: None } => Some(ir.as_str()),
                _ => None,
            })
            .collect();
        let feature = vec.is_some() || idx.iter().any(|x| x.free_vars().iter().any(|v| reduction_vars.contains(&v.as_str())));
        if feature {
            for (x, axis, s) in &shifted_checks {
                self.check_own_pair(x, &decl, *axis, *s, scope)?;
            }
        }
        let load = ir::Expr::Load(name.to_string(), idx);
        let ty = decl.dtype.value_ty();
        Ok(match vec {
            None => Val::S(load, ty),
            Some((ext, var, s)) => Val::V { body: load, ty, ext, var, span: s },
        })
    }

    /// An index that is exactly an index variable must address an axis of its range.
    fn check_axis(&self, x: &ir::Expr, decl: &ir::TensorDecl, axis: usize, span: Span, scope: &Scope) -> R<()> {
        let ir::Expr::Var(v) = x else { return Ok(()) };
        let (range, from) = if let Some((e, from)) = ITER.iter().find(|n| **n == v).and_then(|n| self.iter.get(n)) {
            (e.clone(), from.clone())
        } else if let Some(ext) = scope.locals.iter().rev().find_map(|(n, l)| match l {
            Local::Var { ir, ext: Some(e) } if ir == v => Some((e.clone(), format!("the index variable `{n}`"))),
            _ => None,
        }) {
            ext
        } else {
            return Ok(());
        };
        let have = &decl.shape[axis];
        if !self.same_extent(&range, have) {
            return Err(d(
                "E0011",
                format!("`{v}` runs over `{range}` but axis {axis} of `{}` has length `{have}`", decl.name),
                span,
                format!("`{v}` < {range}"),
            )
            .with_note(format!("note: the range of `{v}` comes from {from}"))
            .hint(format!("if they are always equal, state it with `require {range} == {have}`")));
        }
        Ok(())
    }

    /// A per-pair expression does not read a feature vector (a sliced or channel-reduced
    /// access) at a shifted key (`j + 1`, `j - u`) or a shifted query (`i - 1`): that is a
    /// neighbouring pair's score, and mixing them is a convolution over the score matrix.
    /// Scalar data at a neighbouring position (`seg[b, j - 1]` in a mask) is plain indexing
    /// (bounds-checked like any other); expressions of both (a relative position `p - j`)
    /// and other functions of one (`j // BS`) are fine. (The caller decides "feature".)
    fn check_own_pair(&self, x: &ir::Expr, decl: &ir::TensorDecl, axis: usize, span: Span, scope: &Scope) -> R<()> {
        if !matches!(scope.cx, Cx::Pair | Cx::Post | Cx::Map) {
            return Ok(());
        }
        let pair_free = |e: &ir::Expr| {
            let vs = e.free_vars();
            !vs.contains("i") && !vs.contains("j")
        };
        for (iv, one, many) in [("j", "key", "keys"), ("i", "query", "queries")] {
            let Some((ext, _)) = self.iter.get(iv) else {
                continue;
            };
            let v = ir::Expr::var(iv);
            let shifted = match x {
                ir::Expr::Binary(BinOp::Add, a, b) => (**a == v && pair_free(b)) || (**b == v && pair_free(a)),
                ir::Expr::Binary(BinOp::Sub, a, b) => **a == v && pair_free(b),
                _ => false,
            };
            let own = iv == "i" && *x == self.query_position();
            if !shifted || own || !self.same_extent(ext, &decl.shape[axis]) {
                continue;
            }
            let what = scope.what;
            return Err(d(
                "E0020",
                format!("{what} reads another {one} than its own: axis {axis} of `{}` is indexed by a shifted `{iv}`", decl.name),
                span,
                format!("not `{iv}`: a neighbouring {one}"),
            )
            .with_note(format!("note: a term of pair (i, j) that reads neighbouring {many} mixes neighbouring pairs, as a convolution over the score matrix (Multi-Token Attention) does; {MODEL}"))
            .hint(format!("index the {one} axis of `{}` with `{iv}` itself; a relative position such as `p - j` is fine", decl.name)));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn reduce(&mut self, e: &ast::Expr, op: RedOp, var: &Ident, lo: &Option<Box<ast::Expr>>, hi: &ast::Expr, body: &ast::Expr, scope: &mut Scope) -> R<Val> {
        if RESERVED.contains(&var.name.as_str()) {
            return Err(d("E0026", format!("`{}` is a reserved index name", var.name), var.span, "reserved")
                .hint("pick another name for the reduction variable, e.g. `t` or `d`"));
        }
        let lo = match lo {
            Some(l) => self.typed(l, scope, Ty::Int, "a reduction bound")?,
            None => ir::Expr::Int(0),
        };
        let hi = self.typed(hi, scope, Ty::Int, "a reduction bound")?;
        let r = self.fresh("r");
        scope.locals.push((var.name.clone(), Local::Var { ir: r.clone(), ext: None }));
        let b = self.scalar(body, scope);
        scope.locals.pop();
        let (b, t) = b?;
        let ok = match op {
            RedOp::Any | RedOp::All => t == Ty::Bool,
            _ => t != Ty::Bool,
        };
        if !ok {
            let want = if matches!(op, RedOp::Any | RedOp::All) { "a condition" } else { "a number" };
            return Err(d("E0006", format!("the body of `{op}` must be {want}, found {t}"), body.span, format!("this is {t}")));
        }
        // A per-pair expression that sums over the key (or query) axis reads other keys:
        // that is 3-way attention or a convolution over scores, not one (i, j) pair.
        if matches!(scope.cx, Cx::Pair | Cx::Row | Cx::Post | Cx::Map | Cx::Gate) {
            let mut bad: Option<(String, &'static str)> = None;
            b.walk(&mut |n| {
                if let ir::Expr::Load(t, idx) = n {
                    let Some((_, decl)) = self.tensors.get(t) else {
                        return;
                    };
                    for (axis, x) in idx.iter().enumerate() {
                        let vars = x.free_vars();
                        if !vars.contains(&r) || bad.is_some() {
                            continue;
                        }
                        // When N == M an axis could be either: an index that also moves
                        // with `i` (or `j`) says which.
                        let mut kinds = [("j", "keys"), ("i", "queries")];
                        if vars.contains("i") {
                            kinds.reverse();
                        }
                        for (iv, which) in kinds {
                            if let Some((ext, _)) = self.iter.get(iv) {
                                if self.same_extent(ext, &decl.shape[axis]) && bad.is_none() {
                                    bad = Some((t.clone(), which));
                                }
                            }
                        }
                    }
                }
            });
            if let Some((t, which)) = bad {
                let construct = if which == "keys" && matches!(scope.cx, Cx::Pair | Cx::Post | Cx::Map) {
                    "a score that combines its key with every other key is 3-way (trilinear) attention"
                } else if which == "keys" {
                    "a row value that sums over every key is a second attention over the keys"
                } else {
                    "a value that sums over every query mixes the rows of the score matrix (a convolution over queries)"
                };
                return Err(d(
                    "E0020",
                    format!("{} reads other {which}: `{}` runs over the {which} axis of `{t}`", scope.what, var.name),
                    e.span,
                    format!("a {op} over all {which}"),
                )
                .with_note(format!("note: {construct}; {MODEL}"))
                .hint(format!("if the {op} does not depend on this (i, j) pair, compute it once in a `tensor` definition and read that here")));
            }
        }
        Ok(Val::S(ir::Expr::Reduce { op, var: r, lo: Box::new(lo), hi: Box::new(hi), body: Box::new(b) }, t))
    }

    fn lower(&mut self, e: &ast::Expr, scope: &mut Scope) -> R<Val> {
        match &e.kind {
            ExprKind::Int(n) => Ok(Val::S(ir::Expr::Int(*n), Ty::Int)),
            ExprKind::Float(x) => Ok(Val::S(ir::Expr::float(*x), Ty::Float)),
            ExprKind::Bool(b) => Ok(Val::S(ir::Expr::Bool(*b), Ty::Bool)),
            ExprKind::Name(n) => self.var(n, e.span, scope),
            ExprKind::Unary(op, a) => {
                let v = self.lower(a, scope)?;
                let vi = self.unify_vec(&v, &v, e.span)?;
                let (x, t) = Self::parts(v, None);
                match (op, t) {
                    (UnaryOp::Neg, Ty::Int | Ty::Float) => Ok(Self::rebuild(ir::Expr::un(UnOp::Neg, x), t, &vi, e.span)),
                    (UnaryOp::Not, Ty::Bool) => Ok(Self::rebuild(ir::Expr::un(UnOp::Not, x), t, &vi, e.span)),
                    (UnaryOp::Neg, _) => Err(d("E0006", "`-` needs a number, found bool", e.span, "a condition").hint("use `!` to negate a condition")),
                    (UnaryOp::Not, _) => Err(d("E0006", format!("`!` needs a condition, found {t}"), e.span, "a number").hint("use `-` to negate a number")),
                }
            }
            ExprKind::Binary(op, a, b) => self.binary(*op, a, b, e.span, scope),
            ExprKind::Call { func, args } => self.call(func, args, e.span, scope),
            ExprKind::Access { tensor, indices } => self.access(tensor, indices, e.span, scope),
            ExprKind::Reduce { op, var, lo, hi, body } => self.reduce(e, *op, var, lo, hi, body, scope),
        }
    }

    fn pair(&mut self, e: &ast::Expr, cx: Cx, what: &'static str, want: Ty) -> R<ir::Expr> {
        let mut sc = Scope { cx, what, locals: vec![] };
        self.typed(e, &mut sc, want, what)
    }

    // ---------------------------------------------------------------- declarations

    fn declare_name(&self, id: &Ident, seen: &BTreeMap<String, Span>) -> R<()> {
        if RESERVED.contains(&id.name.as_str()) {
            return Err(d("E0026", format!("`{}` is a reserved name", id.name), id.span, "reserved")
                .hint("b h i j e p are the index variables, s and w the score and weight in normalizations; pick another name"));
        }
        let builtin = UNARY_FNS.iter().any(|(n, _)| *n == id.name) || OTHER_FNS.contains(&id.name.as_str());
        if builtin {
            return Err(d("E0026", format!("`{}` is the name of a builtin function", id.name), id.span, "reserved").hint("pick another name"));
        }
        if let Some(prev) = seen.get(&id.name) {
            return Err(d("E0003", format!("`{}` is defined twice", id.name), id.span, "second definition")
                .with_secondary(*prev, "first defined here")
                .hint("every dim, constant, tensor, helper and let needs its own name"));
        }
        Ok(())
    }

    fn const_value(&mut self, e: &ast::Expr) -> R<(ir::Expr, Ty)> {
        let mut sc = Scope { cx: Cx::Static, what: "a constant", locals: vec![] };
        let (x, t) = self.scalar(e, &mut sc)?;
        let folded = fold_const(&x);
        match folded {
            Some(v) if t != Ty::Bool => Ok((v, t)),
            _ => Err(d("E0023", "a constant must be a number known at compile time", e.span, "not a compile-time number")
                .hint("constants are built from numbers and other constants; dims are only known at run time (use `dim X = ...` for sizes)")),
        }
    }

    fn extent(&mut self, e: &ast::Expr) -> R<Extent> {
        match &e.kind {
            ExprKind::Int(n) if *n >= 1 => Ok(Extent::Fixed(*n)),
            ExprKind::Int(n) => Err(d("E0022", format!("an axis of length {n} is empty"), e.span, "not a positive length").hint("axis lengths are at least 1")),
            ExprKind::Name(n) if self.dims.contains_key(n) => Ok(Extent::Dim(n.clone())),
            ExprKind::Name(n) if self.consts.contains_key(n) => match &self.consts[n] {
                (_, ir::Expr::Int(v), _) if *v >= 1 => Ok(Extent::Fixed(*v)),
                (sp, v, _) => Err(d("E0022", format!("constant `{n}` is not a positive integer"), e.span, format!("`{n}` is {v}"))
                    .with_secondary(*sp, "defined here")
                    .hint("axis lengths are dims, or integer constants of at least 1")),
            },
            ExprKind::Name(n) => {
                let mut diag = d("E0022", format!("`{n}` is not a declared dim"), e.span, "unknown axis length");
                diag = match suggest(n, self.dims.keys().map(String::as_str)) {
                    Some(s) => diag.hint(format!("did you mean `{s}`? Otherwise add it to `dims`")),
                    None => diag.hint(format!("declare it with `dims {n}` (bound from input shapes) or `const {n} = ...`")),
                };
                Err(diag)
            }
            _ => Err(d("E0022", "axis lengths are dim names, constants or positive integers", e.span, "not a valid length")
                .hint("define a computed size with `dim NB = (N + 63) // 64` and use `NB`")),
        }
    }

    fn tensor_decl(&mut self, name: &Ident, ty: &ast::TensorType, kind: ir::TensorKind) -> R<ir::TensorDecl> {
        let Some(dtype) = DType::from_name(&ty.dtype.name) else {
            let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            let mut diag = d("E0004", format!("unknown dtype `{}`", ty.dtype.name), ty.dtype.span, "not a dtype");
            diag = match suggest(&ty.dtype.name, names.iter().copied()) {
                Some(s) => diag.hint(format!("did you mean `{s}`?")),
                None => diag.hint(format!("dtypes are {}", names.join(", "))),
            };
            return Err(diag);
        };
        if ty.shape.is_empty() {
            return Err(d("E0022", format!("`{}` has no axes", name.name), ty.span, "a tensor of no axes").hint(format!(
                "a tensor has at least one axis: declare a single number as `{}[1]` and read it as `{}[0]`, or use a `const`",
                ty.dtype.name, name.name
            )));
        }
        let shape = ty.shape.iter().map(|e| self.extent(e)).collect::<R<Vec<_>>>()?;
        Ok(ir::TensorDecl { name: name.name.clone(), dtype, shape, kind })
    }
}

/// Folds a constant expression (no dims, no variables, no loads) to a literal.
fn fold_const(e: &ir::Expr) -> Option<ir::Expr> {
    use ir::Expr as X;
    Some(match e {
        X::Int(_) | X::Float(_) => e.clone(),
        X::Unary(UnOp::ToFloat, a) => match fold_const(a)? {
            X::Int(n) => X::float(n as f64),
            _ => return None,
        },
        X::Unary(UnOp::Neg, a) => match fold_const(a)? {
            X::Int(n) => X::Int(n.checked_neg()?),
            X::Float(x) => X::float(-x.0),
            _ => return None,
        },
        X::Unary(UnOp::ToInt, a) => match fold_const(a)? {
            X::Float(x) => X::Int(ir::reference::to_int(x.0)?),
            _ => return None,
        },
        X::Unary(op, a) => match fold_const(a)? {
            X::Float(x) => X::float(ir::reference::unary_f64(*op, x.0)),
            X::Int(n) if *op == UnOp::Abs => X::Int(n.checked_abs()?),
            _ => return None,
        },
        X::Binary(op, a, b) => match (fold_const(a)?, fold_const(b)?) {
            (X::Int(x), X::Int(y)) => {
                let mut m = BTreeMap::new();
                m.insert(String::new(), 0);
                X::Int(ir::bind::eval_dims(&X::bin(*op, X::Int(x), X::Int(y)), &m).ok()?)
            }
            (X::Float(x), X::Float(y)) => X::float(match op {
                BinOp::Add => x.0 + y.0,
                BinOp::Sub => x.0 - y.0,
                BinOp::Mul => x.0 * y.0,
                BinOp::Div => x.0 / y.0,
                BinOp::Pow => x.0.powf(y.0),
                BinOp::Min => ir::reference::fmin(x.0, y.0),
                BinOp::Max => ir::reference::fmax(x.0, y.0),
                _ => return None,
            }),
            _ => return None,
        },
        _ => return None,
    })
}

const TOP_TARGETS: [&str; 8] = ["score", "bias", "mask", "normalize", "decay", "gate", "value", "out"];
const BRANCH_TARGETS: [&str; 6] = ["score", "bias", "mask", "normalize", "decay", "weight"];

struct BranchAst<'a> {
    span: Span,
    stmts: BTreeMap<&'static str, &'a ast::Assign>,
}

fn collect_assigns<'a>(assigns: impl Iterator<Item = &'a ast::Assign>, allowed: &[&'static str], where_: &str) -> R<BTreeMap<&'static str, &'a ast::Assign>> {
    let mut m: BTreeMap<&'static str, &ast::Assign> = BTreeMap::new();
    for a in assigns {
        let name = a.target.name.as_str();
        let Some(&key) = allowed.iter().find(|t| **t == name) else {
            if name == "weight" {
                return Err(d("E0024", "`weight` belongs inside a `branch`", a.target.span, "outside a branch")
                    .hint("blend several attention maps with `branch NAME { ... weight = ... }`"));
            }
            if matches!(name, "gate" | "value" | "out") {
                return Err(d("E0024", format!("`{name}` is shared by all branches and belongs outside them"), a.target.span, "inside a branch")
                    .hint(format!("move `{name} = ...` after the branches")));
            }
            let mut diag = d("E0012", format!("unknown statement `{name} = ...`{where_}"), a.target.span, "not a statement");
            diag = match suggest(name, allowed.iter().copied()) {
                Some(s) => diag.hint(format!("did you mean `{s}`?")),
                None => diag.hint(format!("statements are {}", allowed.join(", "))),
            };
            return Err(diag);
        };
        if let Some(prev) = m.get(key) {
            return Err(d("E0013", format!("`{key}` is given twice"), a.target.span, "second time")
                .with_secondary(prev.target.span, "first given here")
                .hint("each axis of the kernel has one definition; combine them in one expression"));
        }
        m.insert(key, a);
    }
    Ok(m)
}

impl<'a> Checker<'a> {
    fn norm(&mut self, a: &ast::Assign) -> R<ir::Norm> {
        let e = &a.value;
        let opts = "softmax, softmax(sink = ..., post = ...), sigmoid, relu, relu2, none, map(EXPR of s), linear(eps = ...)";
        let bad = |msg: String, span: Span, label: &str| d("E0015", msg, span, label.to_string()).hint(format!("normalizations: {opts}"));
        let map = |body: ir::Expr| ir::Norm::Map(body);
        let s = || ir::Expr::var("s");
        let (name, span, args): (&str, Span, &[ast::Arg]) = match &e.kind {
            ExprKind::Name(n) => (n, e.span, &[]),
            ExprKind::Call { func, args } => (&func.name, func.span, args),
            _ => return Err(bad("`normalize` takes a normalization".into(), e.span, "not a normalization")),
        };
        let no_args = |args: &[ast::Arg]| -> R<()> {
            if args.is_empty() {
                Ok(())
            } else {
                Err(bad(format!("`{name}` takes no arguments"), e.span, "unexpected arguments"))
            }
        };
        Ok(match name {
            "softmax" => {
                let (mut sink, mut post) = (None, None);
                for arg in args {
                    let Some(n) = &arg.name else {
                        return Err(bad("`softmax` takes named arguments".into(), arg.value.span, "positional argument"));
                    };
                    match n.name.as_str() {
                        "sink" => sink = Some(self.pair(&arg.value, Cx::Row, "the softmax sink", Ty::Float)?),
                        "post" => post = Some(self.pair(&arg.value, Cx::Post, "the softmax post-map", Ty::Float)?),
                        other => return Err(d("E0015", format!("`softmax` has no argument `{other}`"), n.span, "unknown argument").hint("`softmax` takes `sink = LOGIT` (adds exp(LOGIT) to the denominator) and `post = f(w)` (maps each weight); scale the score for a temperature")),
                    }
                }
                ir::Norm::Softmax { sink, post }
            }
            "sigmoid" => {
                no_args(args)?;
                map(ir::Expr::un(UnOp::Sigmoid, s()))
            }
            "relu" => {
                no_args(args)?;
                map(ir::Expr::un(UnOp::Relu, s()))
            }
            "relu2" => {
                no_args(args)?;
                let r = ir::Expr::un(UnOp::Relu, s());
                map(ir::Expr::bin(BinOp::Mul, r.clone(), r))
            }
            "none" => {
                no_args(args)?;
                map(s())
            }
            "map" => {
                if args.len() != 1 || args[0].name.is_some() {
                    return Err(bad("`map` takes one expression of `s`".into(), e.span, "e.g. map(relu(s) ** 2 / M)"));
                }
                map(self.pair(&args[0].value, Cx::Map, "the normalization map", Ty::Float)?)
            }
            "linear" => {
                let mut eps = 0.0;
                for arg in args {
                    match &arg.name {
                        Some(n) if n.name == "eps" => {
                            let (v, _) = self.const_value(&arg.value)?;
                            eps = match v {
                                ir::Expr::Int(n) => n as f64,
                                ir::Expr::Float(x) => x.0,
                                _ => unreachable!("const_value gives numbers"),
                            };
                            if eps.is_nan() || eps < 0.0 {
                                return Err(bad("`eps` must be a number >= 0".into(), arg.value.span, "negative or NaN"));
                            }
                            // The kernels compute in f32 (GPUs may flush subnormals to zero):
                            // a smaller eps would be 0 there, and 0 / (0 + eps) would be NaN
                            // on the device where the reference gives 0.
                            if eps > 0.0 && eps < f32::MIN_POSITIVE as f64 {
                                return Err(bad(
                                    format!("`eps` = {eps:e} is below f32's smallest normal number ({:e}); the kernels compute in f32, where it would be 0: write 0 or a larger eps", f32::MIN_POSITIVE),
                                    arg.value.span,
                                    "too small for f32",
                                ));
                            }
                        }
                        _ => return Err(bad("`linear` takes one named argument, `eps`".into(), arg.value.span, "unexpected argument")),
                    }
                }
                ir::Norm::Linear { eps: ir::F64(eps) }
            }
            other => {
                let mut diag = d("E0015", format!("unknown normalization `{other}`"), span, "not a normalization");
                diag = match suggest(other, NORMS) {
                    Some(s) => diag.hint(format!("did you mean `{s}`?")),
                    None => diag.hint(format!("normalizations: {opts}")),
                };
                return Err(diag);
            }
        })
    }

    fn branch(&mut self, b: &BranchAst) -> R<ir::Branch> {
        let Some(score) = b.stmts.get("score") else {
            return Err(d("E0014", "no `score` is given", b.span, "needs a score").hint("e.g. `score = dot(q[b, h, i, :], k[b, h, j, :]) / sqrt(D)`"));
        };
        let score = self.pair(&score.value, Cx::Pair, "`score`", Ty::Float)?;
        let opt = |me: &mut Self, key: &str, cx: Cx, what: &'static str, t: Ty| -> R<Option<ir::Expr>> {
            match b.stmts.get(key) {
                Some(a) => Ok(Some(me.pair(&a.value, cx, what, t)?)),
                None => Ok(None),
            }
        };
        let bias = opt(self, "bias", Cx::Pair, "`bias`", Ty::Float)?;
        let mask = opt(self, "mask", Cx::Pair, "`mask`", Ty::Bool)?;
        let decay = opt(self, "decay", Cx::Pair, "`decay`", Ty::Float)?;
        let weight = opt(self, "weight", Cx::Row, "`weight`", Ty::Float)?;
        let norm = match b.stmts.get("normalize") {
            Some(a) => self.norm(a)?,
            None => ir::Norm::Softmax { sink: None, post: None },
        };
        Ok(ir::Branch { score, bias, mask, norm, decay, weight })
    }
}

/// Checks a parsed spec and lowers it to a verified kernel.
pub fn check(spec: &Spec) -> R<Checked> {
    let mut c = Checker {
        dims: BTreeMap::new(),
        consts: BTreeMap::new(),
        tensors: BTreeMap::new(),
        output: None,
        fns: BTreeMap::new(),
        lets: BTreeMap::new(),
        equal: vec![],
        iter: BTreeMap::new(),
        expanding: vec![],
        expansions: 0,
        fresh: 0,
    };
    let mut seen: BTreeMap<String, Span> = BTreeMap::new();
    let mut kernel_dims: Vec<ir::DimDecl> = Vec::new();
    let mut tensors: Vec<ir::TensorDecl> = Vec::new();
    let mut requires: Vec<ir::Expr> = Vec::new();
    let mut ranges = BTreeMap::new();
    let mut out_decl: Option<(Span, ir::TensorDecl)> = None;
    let mut top: Vec<&ast::Assign> = Vec::new();
    let mut branches: Vec<(Ident, Span, &[ast::Assign])> = Vec::new();
    let mut pending_defaults: Vec<(&Ident, &ast::Expr)> = Vec::new();
    let mut key_range: Option<(&Ident, &ast::Expr, Span)> = None;

    // Declarations are processed in order: a name is visible after its declaration.
    // Helpers and lets are expanded where they are used, so they may mention anything.
    for it in &spec.items {
        match it {
            Item::Fn { name, params, body, .. } => {
                c.declare_name(name, &seen)?;
                let mut ps = BTreeMap::new();
                for p in params {
                    if let Some(prev) = ps.insert(p.name.clone(), p.span) {
                        return Err(d("E0003", format!("parameter `{}` appears twice", p.name), p.span, "second time").with_secondary(prev, "first here"));
                    }
                    if RESERVED.contains(&p.name.as_str()) {
                        return Err(d("E0026", format!("`{}` is a reserved name", p.name), p.span, "reserved")
                            .hint("b h i j e p are index variables; name the parameter differently"));
                    }
                }
                seen.insert(name.name.clone(), name.span);
                c.fns.insert(name.name.clone(), FnDef { params, body, span: name.span });
            }
            Item::Let { name, value, .. } => {
                c.declare_name(name, &seen)?;
                seen.insert(name.name.clone(), name.span);
                c.lets.insert(name.name.clone(), (name.span, value));
            }
            _ => {}
        }
    }
    for it in &spec.items {
        match it {
            Item::Dims { names, defaults, .. } => {
                for (n, dflt) in names.iter().zip(defaults) {
                    c.declare_name(n, &seen)?;
                    seen.insert(n.name.clone(), n.span);
                    c.dims.insert(n.name.clone(), (n.span, false));
                    kernel_dims.push(ir::DimDecl { name: n.name.clone(), def: None });
                    if let Some(e) = dflt {
                        pending_defaults.push((n, e));
                    }
                }
            }
            Item::Dim { name, value, .. } => {
                c.declare_name(name, &seen)?;
                let v = c.static_int(value, "a dim definition")?;
                seen.insert(name.name.clone(), name.span);
                c.dims.insert(name.name.clone(), (name.span, true));
                kernel_dims.push(ir::DimDecl { name: name.name.clone(), def: Some(v) });
            }
            Item::Const { name, value, .. } => {
                c.declare_name(name, &seen)?;
                let (v, t) = c.const_value(value)?;
                seen.insert(name.name.clone(), name.span);
                c.consts.insert(name.name.clone(), (name.span, v, t));
            }
            Item::Input { name, ty, range, .. } => {
                c.declare_name(name, &seen)?;
                let decl = c.tensor_decl(name, ty, ir::TensorKind::Input)?;
                if let Some((lo, hi)) = range {
                    let want = decl.dtype.value_ty();
                    let mut sc = Scope { cx: Cx::Static, what: "a value range", locals: vec![] };
                    let range_err = |e: Diagnostic| {
                        if e.code != "E0006" {
                            return Diagnostic { code: "E0027", ..e };
                        }
                        let example = if want == Ty::Int { "0..4" } else { "-1.0..1.0" };
                        d("E0027", format!("the value range of `{}` must be {want}, as `{}` is {}", name.name, name.name, decl.dtype), e.span, e.label)
                            .hint(format!("write {want} bounds, e.g. `in {example}`"))
                    };
                    let l = c.typed(lo, &mut sc, want, "a value range bound").map_err(range_err)?;
                    let h = c.typed(hi, &mut sc, want, "a value range bound").map_err(range_err)?;
                    if let (Some(a), Some(b)) = (fold_const(&l), fold_const(&h)) {
                        let (a, b) = (num(&a), num(&b));
                        if a.partial_cmp(&b) != Some(std::cmp::Ordering::Less) {
                            return Err(d("E0027", "empty value range", lo.span.to(hi.span), format!("{a} .. {b} is empty"))
                                .hint("write `in LO..HI` with LO < HI (HI is exclusive for integers)"));
                        }
                    }
                    ranges.insert(name.name.clone(), (l, h));
                }
                seen.insert(name.name.clone(), name.span);
                c.tensors.insert(name.name.clone(), (name.span, decl.clone()));
                tensors.push(decl);
            }
            Item::Output { name, ty, span } => {
                c.declare_name(name, &seen)?;
                if let Some((prev, _)) = &out_decl {
                    return Err(d("E0019", "a spec has one output", name.span, "second output")
                        .with_secondary(*prev, "first output")
                        .hint("a kernel computes one tensor; write a second spec for another output"));
                }
                let decl = c.tensor_decl(name, ty, ir::TensorKind::Output)?;
                if decl.dtype.is_int() {
                    return Err(d("E0019", "the output must be a float tensor", ty.dtype.span, "integer output").hint("use f32, f16 or bf16"));
                }
                seen.insert(name.name.clone(), name.span);
                c.output = Some(name.name.clone());
                out_decl = Some((*span, decl));
            }
            Item::Tensor { name, vars, ty, body, .. } => {
                c.declare_name(name, &seen)?;
                let probe = c.tensor_decl(name, ty, ir::TensorKind::Input)?;
                if !matches!(probe.dtype, DType::F32 | DType::I32) {
                    return Err(d("E0028", "derived tensors are f32 or i32", ty.dtype.span, "not f32 or i32")
                        .hint("computed values are kept at f32 (or i32) precision"));
                }
                if vars.len() != probe.shape.len() {
                    return Err(d(
                        "E0028",
                        format!("`{}` names {} index variables for {} axes", name.name, vars.len(), probe.shape.len()),
                        name.span.to(ty.span),
                        "count differs",
                    )
                    .hint("name one index variable per axis: `tensor T[x, y]: f32[X, Y] = ...`"));
                }
                let mut sc = Scope { cx: Cx::Tensor, what: "a tensor definition", locals: vec![] };
                let mut names = BTreeSet::new();
                let irv: Vec<String> = (0..vars.len()).map(|n| format!("x{n}")).collect();
                for (n, v) in vars.iter().enumerate() {
                    if !names.insert(v.name.clone()) {
                        return Err(d("E0003", format!("index variable `{}` appears twice", v.name), v.span, "second time"));
                    }
                    sc.locals.push((v.name.clone(), Local::Var { ir: irv[n].clone(), ext: Some(probe.shape[n].clone()) }));
                }
                let want = probe.dtype.value_ty();
                let def = match &body.kind {
                    ExprKind::Call { func, args } if func.name == "cumsum" => {
                        let [var_arg, inner] = args.as_slice() else {
                            return Err(d("E0028", "`cumsum` takes an index variable and an expression", body.span, "e.g. cumsum(t, a[b, h, t, d])"));
                        };
                        let axis = match &var_arg.value.kind {
                            ExprKind::Name(n) => vars.iter().position(|v| &v.name == n),
                            _ => None,
                        };
                        let Some(axis) = axis else {
                            return Err(d(
                                "E0028",
                                "the first argument of `cumsum` must be one of the tensor's index variables",
                                var_arg.value.span,
                                "not an index variable of this tensor",
                            )
                            .hint("the sum runs along that variable's axis, from 0 to its value"));
                        };
                        ir::TensorDef::Cumsum { axis, body: c.typed(&inner.value, &mut sc, want, "a tensor element")? }
                    }
                    _ => ir::TensorDef::Map(c.typed(body, &mut sc, want, "a tensor element")?),
                };
                let decl = ir::TensorDecl { kind: ir::TensorKind::Derived { vars: irv, def }, ..probe };
                seen.insert(name.name.clone(), name.span);
                c.tensors.insert(name.name.clone(), (name.span, decl.clone()));
                tensors.push(decl);
            }
            Item::Range { var, extent, span } => {
                if var.name != "j" {
                    return Err(d("E0032", format!("`range {}` is not a key range", var.name), var.span, "only `j` takes a range")
                        .hint("the other indices' ranges come from the output's axes; `range j < …` states how many keys there are"));
                }
                if let Some((_, _, first)) = key_range {
                    return Err(d("E0032", "the key range is stated twice", *span, "second `range j`").with_secondary(first, "first here"));
                }
                key_range = Some((var, extent, *span));
            }
            Item::Require { cond, .. } => {
                let mut sc = Scope { cx: Cx::Static, what: "a requirement", locals: vec![] };
                let r = c.typed(cond, &mut sc, Ty::Bool, "a requirement")?;
                if let ir::Expr::Binary(BinOp::Eq, a, b) = &r {
                    let ext = |x: &ir::Expr| match x {
                        ir::Expr::Dim(n) => Some(Extent::Dim(n.clone())),
                        ir::Expr::Int(n) => Some(Extent::Fixed(*n)),
                        _ => None,
                    };
                    if let (Some(x), Some(y)) = (ext(a), ext(b)) {
                        c.equal.push((x, y));
                    }
                }
                requires.push(r);
            }
            Item::Branch { name, assigns, span } => branches.push((name.clone(), *span, assigns)),
            Item::Assign(a) => top.push(a),
            Item::Fn { .. } | Item::Let { .. } => {}
        }
    }
    let defaults = c.dim_defaults(&pending_defaults)?;

    let top_map = collect_assigns(top.iter().copied(), &TOP_TARGETS, "")?;
    // Branches: explicit blocks, or the top-level statements as the one branch.
    let top_branch_keys = ["score", "bias", "mask", "normalize", "decay"];
    let mut asts: Vec<BranchAst> = Vec::new();
    if branches.is_empty() {
        let stmts: BTreeMap<&'static str, &ast::Assign> = top_map.iter().filter(|(k, _)| top_branch_keys.contains(k)).map(|(k, v)| (*k, *v)).collect();
        asts.push(BranchAst { span: spec.name.span, stmts });
    } else {
        if let Some(k) = top_branch_keys.iter().find(|k| top_map.contains_key(**k)) {
            let a = top_map[k];
            return Err(d("E0024", format!("`{k}` is given outside the branches"), a.target.span, "outside every branch")
                .with_secondary(branches[0].0.span, "the spec has branches")
                .hint(format!("with branches, each branch gives its own `{k}`; move it inside")));
        }
        let mut names: BTreeMap<String, Span> = BTreeMap::new();
        for (name, span, assigns) in &branches {
            if let Some(prev) = names.insert(name.name.clone(), name.span) {
                return Err(d("E0003", format!("branch `{}` is defined twice", name.name), name.span, "second definition")
                    .with_secondary(prev, "first here")
                    .hint("give each branch its own name"));
            }
            let stmts = collect_assigns(assigns.iter(), &BRANCH_TARGETS, " in a branch")?;
            asts.push(BranchAst { span: *span, stmts });
        }
    }
    let Some((out_span, out_t)) = out_decl else {
        return Err(d("E0014", "the spec declares no output", spec.name.span, "no `output`").hint("declare it, e.g. `output o: f32[B, H, N, D]`"));
    };
    // Output indices: `out = o[b, h, i, e]`, by default for a rank-4 output.
    let out_vars: Vec<String> = match top_map.get("out") {
        Some(a) => {
            let ExprKind::Access { tensor, indices } = &a.value.kind else {
                return Err(d("E0019", "`out` must index the output, e.g. `out = o[b, h, i, e]`", a.value.span, "not an indexed output"));
            };
            if tensor.name != out_t.name {
                return Err(d("E0019", format!("`out` must index the output `{}`", out_t.name), tensor.span, "not the output"));
            }
            let mut vs = Vec::new();
            for ix in indices {
                let (name, sp) = match ix {
                    Index::Expr(ast::Expr { kind: ExprKind::Name(n), span }) => (n.clone(), *span),
                    Index::Expr(e) => return Err(d("E0019", "`out` indices are the variables b, h, i, e", e.span, "not a plain index variable")),
                    Index::Slice(sp) => return Err(d("E0019", "`out` indices are the variables b, h, i, e", *sp, "`:` is not allowed here")),
                };
                if !["b", "h", "i", "e"].contains(&name.as_str()) || vs.contains(&name) {
                    return Err(d("E0019", "`out` indices must be b, h, i and e, each once", sp, "not b, h, i or e, or repeated"));
                }
                vs.push(name);
            }
            if vs.len() != out_t.shape.len() || vs.len() != 4 {
                return Err(d(
                    "E0019",
                    format!("`out` must list b, h, i and e for the {} axes of `{}`", out_t.shape.len(), out_t.name),
                    a.value.span,
                    "wrong number of indices",
                )
                .hint("the output has one axis each for batch, head, query and channel"));
            }
            vs
        }
        None => {
            if out_t.shape.len() != 4 {
                return Err(d("E0014", format!("output `{}` has {} axes; say how to index it", out_t.name, out_t.shape.len()), out_span, "no `out` statement")
                    .hint("write `out = o[b, h, i, e]` with the index variables in axis order"));
            }
            ["b", "h", "i", "e"].iter().map(|s| s.to_string()).collect()
        }
    };
    for (axis, v) in out_vars.iter().enumerate() {
        let key: &'static str = ITER.iter().find(|n| **n == v).expect("checked");
        c.iter.insert(key, (out_t.shape[axis].clone(), format!("axis {axis} of the output `{}`", out_t.name)));
    }
    // The key range comes from the tensor `value` indexes with `j`.
    let Some(value_a) = top_map.get("value") else {
        return Err(
            d("E0014", "no `value` is given", spec.name.span, "needs a value").hint("say which vector each key contributes, e.g. `value = v[b, h, j, e]`")
        );
    };
    let value = {
        let mut sc = Scope { cx: Cx::Value, what: "`value`", locals: vec![] };
        // j's range is unknown until we see which axis it indexes: probe without it.
        let probe = {
            let mut tmp = c.shallow();
            tmp.iter.remove("j");
            tmp.typed(&value_a.value, &mut sc, Ty::Float, "`value`")
        };
        let probe = probe?;
        let mut jext: Option<(Extent, String)> = None;
        probe.walk(&mut |n| {
            if let ir::Expr::Load(t, idx) = n {
                for (axis, x) in idx.iter().enumerate() {
                    if *x == ir::Expr::var("j") && jext.is_none() {
                        let decl = &c.tensors[t].1;
                        jext = Some((decl.shape[axis].clone(), format!("axis {axis} of `{t}` in `value`")));
                    }
                }
            }
        });
        // A stated range (`range j < MP * PS`) wins; it must agree with an axis that `value`
        // indexes with `j` itself.
        let jext = match (key_range, jext) {
            (Some((_, e, span)), found) => {
                let v = c.static_int(e, "a key range")?;
                let ext = match &v {
                    ir::Expr::Dim(n) => Extent::Dim(n.clone()),
                    ir::Expr::Int(n) if *n >= 0 => Extent::Fixed(*n),
                    _ => {
                        // A computed dim holds the expression.
                        c.dims.insert(KEY_RANGE_DIM.to_string(), (span, true));
                        kernel_dims.push(ir::DimDecl { name: KEY_RANGE_DIM.to_string(), def: Some(v.clone()) });
                        Extent::Dim(KEY_RANGE_DIM.to_string())
                    }
                };
                if let Some((have, from)) = found {
                    if !c.same_extent(&ext, &have) {
                        return Err(d("E0032", format!("the key range `{e}` contradicts {from}, of length `{have}`"), e.span, "the stated range")
                            .hint(format!("drop the `range` (the keys' count comes from {from}), or state `require` that the two are equal")));
                    }
                }
                (ext, "the `range j` statement".to_string())
            }
            (None, Some(found)) => found,
            (None, None) => {
                return Err(d("E0025", "cannot tell how many keys there are", value_a.value.span, "no tensor is indexed by `j` here")
                    .hint("`value` must read a tensor with `j` as one index, e.g. `v[b, h, j, e]`, or state the count: `range j < MP * PS`"));
            }
        };
        c.iter.insert("j", jext);
        let mut sc = Scope { cx: Cx::Value, what: "`value`", locals: vec![] };
        c.typed(&value_a.value, &mut sc, Ty::Float, "`value`")?
    };

    let mut ir_branches = Vec::new();
    for b in &asts {
        ir_branches.push(c.branch(b)?);
    }
    let gate = match top_map.get("gate") {
        Some(a) => {
            let mut sc = Scope { cx: Cx::Gate, what: "`gate`", locals: vec![] };
            Some(c.typed(&a.value, &mut sc, Ty::Float, "`gate`")?)
        }
        None => None,
    };
    let get = |k: &str| c.iter[k].0.clone();
    tensors.push(out_t);
    let kernel = ir::Kernel {
        name: spec.name.name.clone(),
        dims: kernel_dims,
        tensors,
        requires,
        iter: ir::Iter { b: get("b"), h: get("h"), i: get("i"), j: get("j"), e: get("e") },
        value,
        out: out_vars,
        branches: ir_branches,
        gate,
    };
    let kernel = ir::canonicalize(&kernel);
    let info = ir::verify(&kernel).map_err(|e| {
        d("E0999", "internal compiler error: the checker produced an invalid kernel", spec.name.span, "while compiling this spec")
            .with_note(format!("note: {e}"))
            .hint("this is a bug in attnc; please report it with the spec")
    })?;
    Ok(Checked { kernel, info, ranges, defaults })
}

fn num(e: &ir::Expr) -> f64 {
    match e {
        ir::Expr::Int(n) => *n as f64,
        ir::Expr::Float(x) => x.0,
        _ => f64::NAN,
    }
}

impl<'a> Checker<'a> {
    /// A checker sharing declarations (for a probe lowering that must not disturb state).
    fn shallow(&self) -> Checker<'a> {
        Checker {
            dims: self.dims.clone(),
            consts: self.consts.clone(),
            tensors: self.tensors.clone(),
            output: self.output.clone(),
            fns: self.fns.iter().map(|(k, f)| (k.clone(), FnDef { params: f.params, body: f.body, span: f.span })).collect(),
            lets: self.lets.clone(),
            equal: self.equal.clone(),
            iter: self.iter.clone(),
            expanding: vec![],
            expansions: 0,
            fresh: self.fresh,
        }
    }
}

/// An index that no dims can bring into range: a negative constant, a constant at or past a
/// fixed axis length, or the axis's own length plus a non-negative constant (`v[b, h, j, Dv]`
/// on an axis of length `Dv`). Indices in range only for some dims are checked when the
/// dims are known, before a kernel runs (`attnc_passes::bounds`).
fn check_static_bound(x: &ir::Expr, decl: &ir::TensorDecl, axis: usize, span: Span) -> R<()> {
    use ir::Expr as E;
    let have = &decl.shape[axis];
    let past_end = |c: i64| c >= 0;
    let why = match (x, have) {
        (E::Int(n), _) if *n < 0 => Some(format!("it is {n}, and indices start at 0")),
        (E::Int(n), ir::Extent::Fixed(len)) if *n >= *len => Some(format!("it is {n}, past the last index {}", len - 1)),
        (E::Dim(d), ir::Extent::Dim(len)) if d == len => Some(format!("it is `{d}`, the length of the axis itself; the last index is `{d} - 1`")),
        (E::Binary(BinOp::Add, a, b), ir::Extent::Dim(len)) => match (&**a, &**b) {
            (E::Dim(d), E::Int(c)) | (E::Int(c), E::Dim(d)) if d == len && past_end(*c) => Some(format!("it is `{d} + {c}`, past the last index `{d} - 1`")),
            _ => None,
        },
        _ => None,
    };
    match why {
        Some(why) => {
            Err(d("E0029", format!("index {axis} of `{}` is out of range for every shape", decl.name), span, format!("axis {axis} has length `{have}`"))
                .with_note(format!("note: {why}"))
                .hint(format!("indices of axis {axis} run from 0 to `{have} - 1`")))
        }
        None => Ok(()),
    }
}
