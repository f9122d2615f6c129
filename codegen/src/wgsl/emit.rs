//! The WGSL writer: one module per kernel with an entry point per derived tensor
//! (`derive_<n>`) and the row kernel (`attend`), all sharing one bind group:
//! `@binding(0)` the argument table (uniform), `@binding(1)` the inputs (read-only storage),
//! `@binding(2)` the derived tensors and the output (read-write storage).
//!
//! Expressions are written as `let` statements in evaluation order (a reduction is a loop, a
//! costly right side of `and`/`or` runs only when the left does not decide), memoized within
//! the block that computed them. Floats are f32 with the reference's NaN rules made explicit
//! (`max`/`min` propagate NaN, `relu`/`elu` keep it, `log` of a negative is NaN), since WGSL
//! leaves them to the implementation; infinities come from the argument table, as WGSL has
//! no infinite literals.

mod chunked;
mod tiled;

pub use chunked::{slices as chunked_slices, MAX_CHUNK as MAX_WGSL_CHUNK, MAX_FEATURES as MAX_CHUNKED_FEATURES};
pub use tiled::{check as check_tiled, most_values as tiled_values, slices as tiled_slices};

use super::WgslOptions;
use crate::host::ArgLayout;
use crate::schedule::{Algorithm, Schedule};
use crate::CodegenError;
use attnc_ir::{BinOp, Expr, Kernel, Norm, RedOp, TensorDef, TensorKind, Ty, UnOp};
use std::fmt::Write as _;

/// A compute entry point of the module, in the order the runtime dispatches them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `derive_<n>`: derived tensor `tensor`, one invocation per element (or per line of a
    /// prefix sum), 64 per workgroup.
    Derive { name: String, tensor: String, lines_axis: Option<usize> },
    /// `classify`: the tile class table of masks that read tensors, computed on the device
    /// (one invocation per table entry, 64 per workgroup, every pair of its tile evaluated),
    /// written through binding 4 (the table, read-write) before `attend` reads it.
    Classify { name: String, block_q: i64, block_k: i64 },
    /// `attend`: the attention pass (see the kernels' docs for its grid).
    Attend { name: String },
}

impl Entry {
    pub fn name(&self) -> &str {
        match self {
            Entry::Derive { name, .. } | Entry::Classify { name, .. } | Entry::Attend { name } => name,
        }
    }
}

/// A kernel's WGSL module and what the runtime needs to launch it.
#[derive(Clone, Debug)]
pub struct WgslArtifact {
    pub source: String,
    pub entries: Vec<Entry>,
    pub kernel: Kernel,
    pub schedule: Schedule,
    pub options: WgslOptions,
    /// The argument table's layout; slot [`WgslArtifact::inf_slot`] holds `+inf`'s bits.
    pub layout: ArgLayout,
    pub inf_slot: usize,
}

impl WgslArtifact {
    /// Slots in the uniform table (a whole number of `vec4<i32>`).
    pub fn table_len(&self) -> usize {
        (self.inf_slot + 1).div_ceil(4) * 4
    }
}

impl std::fmt::Display for WgslArtifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// Invocations per workgroup of the derive passes.
pub const DERIVE_WORKGROUP: u32 = 64;

/// Writes the module for `k` under the row-kernel schedule `s`.
pub fn emit(k: &Kernel, s: &Schedule, o: &WgslOptions) -> Result<WgslArtifact, CodegenError> {
    let layout = ArgLayout::new(k);
    let inf_slot = layout.len;
    let mut w = Writer::new(k, &layout, inf_slot);
    w.prelude(&s.to_string());
    let mut entries = Vec::new();
    for (n, t) in k.derived().enumerate() {
        let name = format!("derive_{n}");
        let lines_axis = match &t.kind {
            TensorKind::Derived { def: TensorDef::Cumsum { axis, .. }, .. } => Some(*axis),
            _ => None,
        };
        w.derive(&name, &t.name)?;
        entries.push(Entry::Derive { name, tensor: t.name.clone(), lines_axis });
    }
    // Masks that read tensors are classified on the device, per call, after the derived
    // tensors they may read; static masks on the host, once per shape.
    if let Some((block_q, block_k)) = device_classes(k, s, o) {
        w.classify(block_q, block_k)?;
        entries.push(Entry::Classify { name: "classify".into(), block_q, block_k });
    }
    match &s.algorithm {
        Algorithm::Rows => w.attend(o)?,
        Algorithm::Tiled(ts) => w.attend_tiled(o, ts)?,
        Algorithm::Chunked(cs) => w.attend_chunked(o, cs)?,
    }
    entries.push(Entry::Attend { name: "attend".into() });
    let source = w.finish();
    Ok(WgslArtifact { source, entries, kernel: k.clone(), schedule: s.clone(), options: o.clone(), layout, inf_slot })
}

/// The tile grid `(block_q, block_k)` of the class table when the device computes it: a
/// kernel that reads classes (tiled or rows) with a mask that reads a tensor.
pub fn device_classes(k: &Kernel, s: &Schedule, o: &WgslOptions) -> Option<(i64, i64)> {
    let data_mask = k.branches.iter().any(|b| b.mask.as_ref().is_some_and(|m| !m.loads().is_empty()));
    let block_k = match &s.algorithm {
        Algorithm::Tiled(ts) => ts.block_k as i64,
        Algorithm::Rows => o.workgroup as i64,
        Algorithm::Chunked(_) => return None,
    };
    data_mask.then_some((o.schedule.block_q as i64, block_k))
}

struct Writer<'k> {
    k: &'k Kernel,
    layout: &'k ArgLayout,
    inf_slot: usize,
    /// Module-scope declarations and helper functions.
    head: String,
    /// The function being written.
    body: String,
    indent: usize,
    tmp: usize,
    /// IR variable → WGSL name, innermost last.
    env: Vec<(String, String)>,
    /// Expressions already computed in an enclosing block, with their names; `scopes`
    /// holds the memo's length at each open block.
    memo: Vec<(Expr, String)>,
    scopes: Vec<(usize, usize)>,
    /// Tensors whose load helper is written, and helper functions written (`fn cosf`).
    loaders: std::collections::BTreeSet<String>,
}

/// A WGSL identifier for an IR name.
fn ident(prefix: &str, name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("{prefix}_{clean}")
}

fn wty(t: Ty) -> &'static str {
    match t {
        Ty::Int => "i32",
        Ty::Float => "f32",
        Ty::Bool => "bool",
    }
}

fn costly(e: &Expr) -> bool {
    let mut c = false;
    e.walk(&mut |x| c |= matches!(x, Expr::Load(..) | Expr::Reduce { .. }));
    c
}

impl<'k> Writer<'k> {
    fn new(k: &'k Kernel, layout: &'k ArgLayout, inf_slot: usize) -> Writer<'k> {
        Writer {
            k,
            layout,
            inf_slot,
            head: String::new(),
            body: String::new(),
            indent: 0,
            tmp: 0,
            env: Vec::new(),
            memo: Vec::new(),
            scopes: Vec::new(),
            loaders: Default::default(),
        }
    }

    /// `args.a[n / 4].x` for slot `n`.
    fn slot(&self, n: usize) -> String {
        format!("args.a[{}].{}", n / 4, ["x", "y", "z", "w"][n % 4])
    }

    fn prelude(&mut self, form: &str) {
        let vecs = (self.inf_slot + 1).div_ceil(4);
        let inf = self.slot(self.inf_slot);
        let _ = write!(
            self.head,
            "// attnc: kernel `{name}`, WGSL {form}.
struct Args {{ a: array<vec4<i32>, {vecs}> }}
@group(0) @binding(0) var<uniform> args: Args;
@group(0) @binding(1) var<storage, read> inp: array<u32>;
@group(0) @binding(2) var<storage, read_write> buf: array<u32>;

fn pinf() -> f32 {{ return bitcast<f32>({inf}); }}
fn isnan_(x: f32) -> bool {{ return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }}
fn fmaxf(a: f32, b: f32) -> f32 {{ if (isnan_(a) || isnan_(b)) {{ return a + b; }} return max(a, b); }}
fn fminf(a: f32, b: f32) -> f32 {{ if (isnan_(a) || isnan_(b)) {{ return a + b; }} return min(a, b); }}
fn fdiv(a: i32, b: i32) -> i32 {{
  if (b == 0) {{ return a; }}
  let q = a / b;
  if (q * b != a && ((a < 0) != (b < 0))) {{ return q - 1; }}
  return q;
}}
fn fmodi(a: i32, b: i32) -> i32 {{ return a - b * fdiv(a, b); }}
fn logf(x: f32) -> f32 {{
  if (isnan_(x)) {{ return x; }}
  if (x < 0.0) {{ return pinf() - pinf(); }}
  if (x == 0.0) {{ return -pinf(); }}
  return log(x);
}}
fn tanhf(x: f32) -> f32 {{
  if (isnan_(x)) {{ return x; }}
  let a = abs(x);
  if (a < 0.125) {{
    let x2 = x * x;
    return x * (1.0 + x2 * (-0.33333333 + x2 * (0.13333333 + x2 * -0.053968254)));
  }}
  let e = exp(-2.0 * min(a, 20.0));
  let t = (1.0 - e) / (1.0 + e);
  return select(t, -t, x < 0.0);
}}
// An f16's bits as f32 (integer ops only: `unpack2x16float` needs a capability not every
// adapter has).
fn f16_bits(h: u32) -> f32 {{
  let s = (h >> 15u) << 31u;
  let e = (h >> 10u) & 0x1fu;
  let m = h & 0x3ffu;
  if (e == 0u) {{ return select(1.0, -1.0, s != 0u) * f32(m) * 5.9604645e-8; }}
  if (e == 31u) {{ return bitcast<f32>(s | 0x7f800000u | (m << 13u)); }}
  return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}}
fn powf(x: f32, y: f32) -> f32 {{
  if (y == 0.0 || x == 1.0) {{ return 1.0; }}
  if (isnan_(x) || isnan_(y)) {{ return x + y; }}
  if (x == 0.0) {{ return select(pinf(), 0.0, y > 0.0); }}
  let r = exp2(y * log2(abs(x)));
  if (x > 0.0) {{ return r; }}
  if (fract(y) != 0.0) {{ return pinf() - pinf(); }}
  return select(r, -r, fract(y * 0.5) != 0.0);
}}
",
            name = self.k.name,
            form = form
        );
    }

    fn finish(self) -> String {
        format!("{}{}", self.head, self.body)
    }

    // ---- statements and blocks --------------------------------------------------------

    fn line(&mut self, s: &str) {
        for _ in 0..self.indent {
            self.body.push_str("  ");
        }
        self.body.push_str(s);
        self.body.push('\n');
    }

    /// Opens a block (`head {`): bindings and memo entries made inside end with it.
    fn open(&mut self, head: &str) {
        self.line(&if head.is_empty() { "{".to_string() } else { format!("{head} {{") });
        self.indent += 1;
        self.scopes.push((self.memo.len(), self.env.len()));
    }

    fn close(&mut self) {
        let (m, e) = self.scopes.pop().expect("an open block");
        self.memo.truncate(m);
        self.env.truncate(e);
        self.indent -= 1;
        self.line("}");
    }

    fn fresh(&mut self) -> String {
        self.tmp += 1;
        format!("t{}", self.tmp)
    }

    /// `let <fresh>: ty = value;`, memoized as `e`.
    fn bind_tmp(&mut self, e: &Expr, ty: Ty, value: String) -> String {
        let n = self.fresh();
        self.line(&format!("let {n}: {} = {value};", wty(ty)));
        self.memo.push((e.clone(), n.clone()));
        n
    }

    /// Binds IR variable `var` to a WGSL value with a `let`.
    fn bind_var(&mut self, var: &str, value: &str) -> String {
        let n = ident("v", var);
        let n = if self.env.iter().any(|(_, x)| *x == n) { format!("{n}_{}", self.fresh()) } else { n };
        self.line(&format!("let {n}: i32 = {value};"));
        self.env.push((var.to_string(), n.clone()));
        n
    }

    fn bind_float(&mut self, var: &str, value: &str) {
        let n = format!("{}_{}", ident("v", var), self.fresh());
        self.line(&format!("let {n}: f32 = {value};"));
        self.env.push((var.to_string(), n));
    }

    fn dim(&self, d: &str) -> String {
        ident("d", d)
    }

    /// Every dim as a `let` at the top of an entry point.
    fn dims_prologue(&mut self) {
        let dims: Vec<(String, usize)> = self.layout.dims.iter().map(|(d, s)| (d.clone(), *s)).collect();
        for (d, s) in dims {
            let l = format!("let {}: i32 = {};", self.dim(&d), self.slot(s));
            self.line(&l);
        }
    }

    // ---- expressions ------------------------------------------------------------------

    fn float_lit(x: f64) -> String {
        let f = x as f32;
        if f.is_nan() {
            "(pinf() - pinf())".into()
        } else if f == f32::INFINITY {
            "pinf()".into()
        } else if f == f32::NEG_INFINITY {
            "(-pinf())".into()
        } else {
            let s = format!("{f:?}");
            if s.contains('.') || s.contains('e') {
                format!("{s}f")
            } else {
                format!("{s}.0f")
            }
        }
    }

    fn int_lit(n: i64) -> Result<String, CodegenError> {
        if n == i32::MIN as i64 {
            Ok("bitcast<i32>(0x80000000u)".into())
        } else if n < 0 && n > i32::MIN as i64 {
            Ok(format!("({n}i)"))
        } else if n >= 0 && n <= i32::MAX as i64 {
            Ok(format!("{n}i"))
        } else {
            Err(CodegenError::Unsupported(format!("the integer {n} does not fit WGSL's 32-bit integers")))
        }
    }

    /// The value of `e` as a WGSL operand (a name or literal), its statements written.
    fn expr(&mut self, e: &Expr) -> Result<String, CodegenError> {
        if let Some((_, n)) = self.memo.iter().rev().find(|(x, _)| x == e) {
            return Ok(n.clone());
        }
        let ty = self.k.ty_of(e);
        Ok(match e {
            Expr::Int(n) => Self::int_lit(*n)?,
            Expr::Float(x) => Self::float_lit(x.0),
            Expr::Bool(b) => b.to_string(),
            Expr::Var(v) => {
                self.env.iter().rev().find(|(n, _)| n == v).map(|(_, w)| w.clone()).ok_or_else(|| CodegenError::Emit(format!("variable `{v}` is not bound")))?
            }
            Expr::Dim(d) => self.dim(d),
            Expr::Load(t, idx) => {
                let args = idx.iter().map(|x| self.expr(x)).collect::<Result<Vec<_>, _>>()?;
                self.loader(t);
                let call = format!("{}({})", ident("ld", t), args.join(", "));
                self.bind_tmp(e, ty, call)
            }
            Expr::Unary(op, a) => {
                let x = self.expr(a)?;
                let v = match op {
                    UnOp::Neg => format!("(-{x})"),
                    UnOp::Not => format!("(!{x})"),
                    UnOp::Abs => format!("abs({x})"),
                    UnOp::Exp => format!("exp({x})"),
                    UnOp::Log => format!("logf({x})"),
                    UnOp::Sqrt => format!("sqrt({x})"),
                    UnOp::Tanh => format!("tanhf({x})"),
                    UnOp::Sigmoid => format!("(1.0 / (1.0 + exp(-{x})))"),
                    UnOp::Silu => format!("({x} / (1.0 + exp(-{x})))"),
                    UnOp::Relu => format!("select(0.0, {x}, {x} > 0.0 || isnan_({x}))"),
                    UnOp::Elu => format!("select(exp({x}) - 1.0, {x}, {x} > 0.0 || isnan_({x}))"),
                    UnOp::ToFloat => format!("f32({x})"),
                    UnOp::Cos | UnOp::Sin => {
                        let name = if *op == UnOp::Cos { "cosf" } else { "sinf" };
                        self.trig(name);
                        format!("{name}({x})")
                    }
                    UnOp::Floor => format!("floor({x})"),
                    UnOp::Ceil => format!("ceil({x})"),
                    // WGSL's `round` rounds half to even, as the reference.
                    UnOp::Round => format!("round({x})"),
                    // Toward zero, saturating at ±2^24 (`reference::INT_LIMIT`); the checker
                    // rules out NaN.
                    UnOp::ToInt => format!("i32(clamp({x}, -16777216.0, 16777216.0))"),
                };
                self.bind_tmp(e, ty, v)
            }
            Expr::Binary(op @ (BinOp::And | BinOp::Or), a, b) if costly(b) => {
                // Short-circuit: the right side runs only when the left does not decide.
                let x = self.expr(a)?;
                let n = self.fresh();
                self.line(&format!("var {n}: bool = {x};"));
                self.open(&format!("if ({}{n})", if *op == BinOp::And { "" } else { "!" }));
                let y = self.expr(b)?;
                self.line(&format!("{n} = {y};"));
                self.close();
                self.bind_tmp(e, ty, n.clone())
            }
            Expr::Binary(op, a, b) => {
                let (x, y) = (self.expr(a)?, self.expr(b)?);
                let float = self.k.ty_of(a) == Ty::Float;
                let v = match op {
                    BinOp::Add => format!("({x} + {y})"),
                    BinOp::Sub => format!("({x} - {y})"),
                    BinOp::Mul => format!("({x} * {y})"),
                    BinOp::Div => format!("({x} / {y})"),
                    BinOp::FloorDiv => format!("fdiv({x}, {y})"),
                    BinOp::Mod => format!("fmodi({x}, {y})"),
                    BinOp::Pow => format!("powf({x}, {y})"),
                    BinOp::Min if float => format!("fminf({x}, {y})"),
                    BinOp::Max if float => format!("fmaxf({x}, {y})"),
                    BinOp::Min => format!("min({x}, {y})"),
                    BinOp::Max => format!("max({x}, {y})"),
                    BinOp::Ne if float => format!("(!({x} == {y}))"),
                    BinOp::Eq => format!("({x} == {y})"),
                    BinOp::Ne => format!("({x} != {y})"),
                    BinOp::Lt => format!("({x} < {y})"),
                    BinOp::Le => format!("({x} <= {y})"),
                    BinOp::Gt => format!("({x} > {y})"),
                    BinOp::Ge => format!("({x} >= {y})"),
                    BinOp::And => format!("({x} && {y})"),
                    BinOp::Or => format!("({x} || {y})"),
                };
                self.bind_tmp(e, ty, v)
            }
            Expr::Select(c, a, b) => {
                let (c, x, y) = (self.expr(c)?, self.expr(a)?, self.expr(b)?);
                self.bind_tmp(e, ty, format!("select({y}, {x}, {c})"))
            }
            Expr::Reduce { op, var, lo, hi, body } => {
                let (lo, hi) = (self.expr(lo)?, self.expr(hi)?);
                let bty = self.k.ty_of(body);
                let init = match (op, bty) {
                    (RedOp::Any, _) => "false".to_string(),
                    (RedOp::All, _) => "true".to_string(),
                    (RedOp::Sum, Ty::Int) => "0i".to_string(),
                    (RedOp::Sum, _) => "0.0f".to_string(),
                    (RedOp::Max, Ty::Int) => "bitcast<i32>(0x80000000u)".to_string(),
                    (RedOp::Max, _) => "(-pinf())".to_string(),
                    (RedOp::Min, Ty::Int) => "2147483647i".to_string(),
                    (RedOp::Min, _) => "pinf()".to_string(),
                };
                let acc = self.fresh();
                let ctr = self.fresh();
                self.line(&format!("var {acc}: {} = {init};", wty(bty)));
                self.open(&format!("for (var {ctr}: i32 = {lo}; {ctr} < {hi}; {ctr}++)"));
                self.bind_var(var, &ctr);
                let v = self.expr(body)?;
                let step = match (op, bty) {
                    (RedOp::Any, _) => format!("{acc} || {v}"),
                    (RedOp::All, _) => format!("{acc} && {v}"),
                    (RedOp::Sum, _) => format!("{acc} + {v}"),
                    (RedOp::Max, Ty::Float) => format!("fmaxf({acc}, {v})"),
                    (RedOp::Min, Ty::Float) => format!("fminf({acc}, {v})"),
                    (RedOp::Max, _) => format!("max({acc}, {v})"),
                    (RedOp::Min, _) => format!("min({acc}, {v})"),
                };
                self.line(&format!("{acc} = {step};"));
                self.close();
                self.bind_tmp(e, ty, acc)
            }
        })
    }

    /// `ld_<t>(x0, …)`: element of tensor `t`, each index clamped into its axis.
    /// `cosf` / `sinf`: WGSL bounds the error of `cos` and `sin` only on [-π, π] and leaves
    /// NaN and infinities to the implementation, so the argument is reduced first and a
    /// non-finite one gives NaN (the reference's answer).
    fn trig(&mut self, name: &str) {
        if !self.loaders.insert(format!("fn {name}")) {
            return;
        }
        let f = &name[..3];
        let _ = write!(
            self.head,
            "fn {name}(x: f32) -> f32 {{
  if (!(abs(x) < pinf())) {{ return pinf() - pinf(); }}
  return {f}(x - 6.2831855 * round(x * 0.15915494));
}}
"
        );
    }

    fn loader(&mut self, t: &str) {
        if !self.loaders.insert(t.to_string()) {
            return;
        }
        let decl = self.k.tensor(t).expect("verified: a declared tensor");
        let slots = &self.layout.tensors[t];
        let heap = if decl.kind == TensorKind::Input { "inp" } else { "buf" };
        let params: Vec<String> = (0..slots.ext.len()).map(|a| format!("x{a}: i32")).collect();
        let mut off = self.slot(slots.base);
        for a in 0..slots.ext.len() {
            let _ = write!(off, " + clamp(x{a}, 0i, {} - 1i) * {}", self.slot(slots.ext[a]), self.slot(slots.stride[a]));
        }
        // f16 and bf16 inputs stay half width on the device, two to a word (the element at
        // an even offset in the low half): the offsets of such a tensor count halves.
        let (ret, read) = match decl.dtype {
            _ if decl.dtype.is_int() => ("i32", format!("bitcast<i32>({heap}[u32({off})])")),
            attnc_ir::DType::F16 if decl.kind == TensorKind::Input => {
                ("f32", format!("f16_bits(({heap}[u32({off}) / 2u] >> (16u * (u32({off}) % 2u))) & 0xffffu)"))
            }
            attnc_ir::DType::BF16 if decl.kind == TensorKind::Input => {
                ("f32", format!("bitcast<f32>((({heap}[u32({off}) / 2u] >> (16u * (u32({off}) % 2u))) & 0xffffu) << 16u)"))
            }
            _ => ("f32", format!("bitcast<f32>({heap}[u32({off})])")),
        };
        let _ = writeln!(self.head, "fn {}({}) -> {ret} {{ return {read}; }}", ident("ld", t), params.join(", "));
    }

    /// `buf[offset(tensor, vars)] = value`.
    fn store(&mut self, t: &str, idx: &[String], value: &str, int: bool) {
        let slots = &self.layout.tensors[t];
        let mut off = self.slot(slots.base);
        for (a, x) in idx.iter().enumerate() {
            let _ = write!(off, " + {x} * {}", self.slot(slots.stride[a]));
        }
        let v = if int { format!("bitcast<u32>(i32({value}))") } else { format!("bitcast<u32>({value})") };
        self.line(&format!("buf[u32({off})] = {v};"));
    }

    // ---- entry points -----------------------------------------------------------------

    fn entry_head(&mut self, name: &str, workgroup: u32) {
        self.body.push('\n');
        self.line(&format!("@compute @workgroup_size({workgroup})"));
        self.open(&format!(
            "fn {name}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32)"
        ));
        self.dims_prologue();
    }

    /// A derived tensor: one invocation per element, or per line along a prefix sum's axis.
    fn derive(&mut self, name: &str, tensor: &str) -> Result<(), CodegenError> {
        let t = self.k.tensor(tensor).expect("derived tensor").clone();
        let TensorKind::Derived { vars, def } = &t.kind else { unreachable!("a derived tensor") };
        let (body, scan) = match def {
            TensorDef::Map(e) => (e, None),
            TensorDef::Cumsum { axis, body } => (body, Some(*axis)),
        };
        let int = t.dtype.is_int();
        self.entry_head(name, super::emit::DERIVE_WORKGROUP);
        let slots = self.layout.tensors[tensor].clone();
        let ext: Vec<String> = slots.ext.iter().map(|s| self.slot(*s)).collect();
        let lanes: Vec<usize> = (0..vars.len()).filter(|a| Some(*a) != scan).collect();
        let count = if lanes.is_empty() { "1i".to_string() } else { lanes.iter().map(|a| ext[*a].clone()).collect::<Vec<_>>().join(" * ") };
        self.line(&format!("let idx = i32((wid.x + wid.y * nwg.x) * {}u + lid);", DERIVE_WORKGROUP));
        self.open(&format!("if (idx < {count})"));
        self.line("var rem = idx;");
        let mut names = vec![String::new(); vars.len()];
        for &a in lanes.iter().rev() {
            names[a] = self.bind_var(&vars[a], &format!("rem % {}", ext[a]));
            self.line(&format!("rem = rem / {};", ext[a]));
        }
        match scan {
            None => {
                let v = self.expr(body)?;
                self.store(tensor, &names, &v, int);
            }
            Some(a) => {
                let acc = self.fresh();
                self.line(&format!("var {acc}: {} = {};", if int { "i32" } else { "f32" }, if int { "0i" } else { "0.0f" }));
                let ctr = self.fresh();
                self.open(&format!("for (var {ctr}: i32 = 0i; {ctr} < {}; {ctr}++)", ext[a]));
                names[a] = self.bind_var(&vars[a], &ctr);
                let v = self.expr(body)?;
                self.line(&format!("{acc} = {acc} + {v};"));
                self.store(tensor, &names, &acc, int);
                self.close();
            }
        }
        self.close();
        self.close();
        Ok(())
    }

    /// The row kernel: a workgroup per `(b, h, i)`; see the module docs of `super`.
    fn attend(&mut self, o: &WgslOptions) -> Result<(), CodegenError> {
        let k = self.k;
        let (wg, ch) = (o.workgroup, o.channels);
        let _ = writeln!(self.head, "\nvar<workgroup> sh_s: array<f32, {wg}>;\nvar<workgroup> sh_p: array<f32, {wg}>;\nvar<workgroup> sh_q: array<f32, {wg}>;\nvar<workgroup> sh_d: array<f32, {wg}>;\nvar<workgroup> sh_l: array<u32, {wg}>;");
        self.entry_head("attend", wg);
        let [nb, nh, ni, nj, ne] = [&k.iter.b, &k.iter.h, &k.iter.i, &k.iter.j, &k.iter.e].map(|x| x.to_expr());
        let (nb, nh, ni) = (self.expr(&nb)?, self.expr(&nh)?, self.expr(&ni)?);
        let (mj, ev) = (self.expr(&nj)?, self.expr(&ne)?);
        self.line(&format!("let rows = {nb} * {nh} * {ni};"));
        self.line("let row = min(i32(wid.x + wid.y * nwg.x), rows - 1i);");
        self.line("let valid = i32(wid.x + wid.y * nwg.x) < rows;");
        self.line("let t = i32(lid);");
        self.bind_var("i", &format!("row % {ni}"));
        self.bind_var("h", &format!("(row / {ni}) % {nh}"));
        self.bind_var("b", &format!("row / ({ni} * {nh})"));
        if k.branches.iter().any(|b| b.mask.is_some()) {
            // This row's tile classes: `[b][h][query tile][branch][key tile]` over the axes
            // the masks depend on (see `schedule::classes::TileClassTable::device_bytes`).
            let deps = crate::schedule::classes::table_deps(k);
            let (vb, vh, vi) = (self.expr(&Expr::var("b"))?, self.expr(&Expr::var("h"))?, self.expr(&Expr::var("i"))?);
            let bq = o.schedule.block_q;
            let head = match (deps.b, deps.h) {
                (true, true) => format!("{vb} * {nh} + {vh}"),
                (true, false) => vb,
                (false, true) => vh,
                (false, false) => "0i".into(),
            };
            self.line(&format!("let kt_n = ({mj} + {wg}i - 1i) / {wg}i;"));
            self.line(&format!("let qt_n = ({ni} + {bq}i - 1i) / {bq}i;"));
            self.line(&format!("let cls_row = (({head}) * qt_n + {vi} / {bq}i) * {}i * kt_n;", k.branches.len()));
            self.class_reader();
        }
        self.line(&format!("var oacc: array<f32, {ch}>;"));
        self.line(&format!("var bacc: array<f32, {ch}>;"));
        self.line("var any_live = false;");
        for (n, br) in k.branches.iter().enumerate() {
            self.line(&format!("// branch {n}"));
            self.open("");
            self.branch(n, br, &mj, &ev, wg, ch)?;
            self.close();
        }
        // Store: zeros when no key was live in any branch, else the gated values.
        self.open(&format!("for (var c: i32 = 0i; c < {ch}i; c++)"));
        self.bind_var("e", &format!("t + c * {wg}i"));
        let e = self.expr(&Expr::var("e"))?;
        self.open(&format!("if (valid && {e} < {ev})"));
        self.store_output("c")?;
        self.close();
        self.close();
        self.close();
        Ok(())
    }

    /// `classify`: one invocation per entry `[b][h][query tile][branch][key tile]` of the
    /// table (over the batch and head axes the masks depend on) walks its tile's pairs until
    /// it has seen a kept and a masked one: empty (0), full (1) or partial (2), or'd into
    /// its byte of the table.
    fn classify(&mut self, bq: i64, bk: i64) -> Result<(), CodegenError> {
        let k = self.k;
        let _ = writeln!(self.head, "@group(0) @binding(4) var<storage, read_write> clsw: array<atomic<u32>>;");
        self.entry_head("classify", DERIVE_WORKGROUP);
        let [nb, nh, ni, nj] = [&k.iter.b, &k.iter.h, &k.iter.i, &k.iter.j].map(|x| x.to_expr());
        let (nb, nh, ni, mj) = (self.expr(&nb)?, self.expr(&nh)?, self.expr(&ni)?, self.expr(&nj)?);
        let deps = crate::schedule::classes::table_deps(k);
        let nbr = k.branches.len();
        self.line(&format!("let n = i32((wid.x + wid.y * nwg.x) * {DERIVE_WORKGROUP}u + lid);"));
        self.line(&format!("let qt_n = ({ni} + {bq}i - 1i) / {bq}i;"));
        self.line(&format!("let kt_n = ({mj} + {bk}i - 1i) / {bk}i;"));
        let slots = match (deps.b, deps.h) {
            (true, true) => format!("{nb} * {nh}"),
            (true, false) => nb.clone(),
            (false, true) => nh.clone(),
            (false, false) => "1i".into(),
        };
        self.open(&format!("if (n < {slots} * qt_n * {nbr}i * kt_n)"));
        self.line("let kt = n % kt_n;");
        self.line(&format!("let br = (n / kt_n) % {nbr}i;"));
        self.line(&format!("let qt = (n / (kt_n * {nbr}i)) % qt_n;"));
        self.line(&format!("let slot = n / (kt_n * {nbr}i * qt_n);"));
        let (b, h) = match (deps.b, deps.h) {
            (true, true) => (format!("slot / {nh}"), format!("slot % {nh}")),
            (true, false) => ("slot".to_string(), "0i".to_string()),
            (false, true) => ("0i".to_string(), "slot".to_string()),
            (false, false) => ("0i".to_string(), "0i".to_string()),
        };
        self.bind_var("b", &b);
        self.bind_var("h", &h);
        self.line("var kept = false;");
        self.line("var masked = false;");
        for (n, br) in k.branches.iter().enumerate() {
            let Some(m) = &br.mask else {
                self.line(&format!("if (br == {n}i) {{ kept = true; }}"));
                continue;
            };
            self.open(&format!("if (br == {n}i)"));
            self.open(&format!("for (var qi: i32 = qt * {bq}i; qi < min({ni}, (qt + 1i) * {bq}i); qi++)"));
            self.bind_var("i", "qi");
            self.open(&format!("for (var kj: i32 = kt * {bk}i; kj < min({mj}, (kt + 1i) * {bk}i); kj++)"));
            self.bind_var("j", "kj");
            let c = self.expr(m)?;
            self.line(&format!("if ({c}) {{ kept = true; }} else {{ masked = true; }}"));
            self.line("if (kept && masked) { break; }");
            self.close();
            self.line("if (kept && masked) { break; }");
            self.close();
            self.close();
        }
        self.line("let code = select(select(1u, 2u, masked), 0u, !kept);");
        self.line("atomicOr(&clsw[u32(n) / 4u], code << (8u * (u32(n) % 4u)));");
        self.close();
        self.close();
        Ok(())
    }

    /// The tile class table's binding and `tile_class(n)`, its `n`-th byte.
    fn class_reader(&mut self) {
        let _ = writeln!(
            self.head,
            "@group(0) @binding(3) var<storage, read> cls: array<u32>;\n\
             fn tile_class(n: i32) -> u32 {{ return (cls[u32(n) / 4u] >> (8u * (u32(n) % 4u))) & 0xffu; }}"
        );
    }

    /// Phase A of a key tile: the invocation's key `j0 + t`; `live` when it passes the mask,
    /// then `on_live` with the score (score + bias) written.
    fn key_phase(&mut self, br: &attnc_ir::Branch, mj: &str, on_live: &mut dyn FnMut(&mut Self, &str) -> Result<(), CodegenError>) -> Result<(), CodegenError> {
        self.open("");
        let j = self.bind_var("j", "j0 + t");
        self.line("var live = false;");
        self.open(&format!("if ({j} < {mj})"));
        let mut inner = |w: &mut Self| -> Result<(), CodegenError> {
            let mut s = w.expr(&br.score)?;
            if let Some(b) = &br.bias {
                let bv = w.expr(b)?;
                s = format!("({s} + {bv})");
            }
            w.line("live = true;");
            on_live(w, &s)
        };
        self.if_kept(br, &mut inner)?;
        self.close();
        self.line("sh_l[t] = select(0u, 1u, live);");
        self.close();
        Ok(())
    }

    /// Runs `f` for a pair the branch's mask keeps (the bound `i`, `j`): a full tile's keys
    /// all pass, so the mask runs on partial tiles only (`full` is the tile's class).
    fn if_kept(&mut self, br: &attnc_ir::Branch, f: &mut dyn FnMut(&mut Self) -> Result<(), CodegenError>) -> Result<(), CodegenError> {
        let Some(m) = &br.mask else { return f(self) };
        self.line("var keep = full;");
        self.open("if (!keep)");
        let c = self.expr(m)?;
        self.line(&format!("keep = {c};"));
        self.close();
        self.open("if (keep)");
        f(self)?;
        self.close();
        Ok(())
    }

    /// Phase D: every invocation adds `sh_q[u] · value(j0 + u, e)` of the tile's live keys
    /// to its channels (`corr` rescales first).
    fn accumulate(&mut self, wg: u32, ch: u32, ev: &str, count: bool) -> Result<(), CodegenError> {
        self.open("for (var u: i32 = 0i; u < nt; u++)");
        self.open("if (sh_l[u] != 0u)");
        if count {
            self.line("cnt = cnt + 1i;");
        }
        self.bind_var("j", "j0 + u");
        self.line("let pd = sh_q[u];");
        self.open(&format!("for (var c: i32 = 0i; c < {ch}i; c++)"));
        let e = self.bind_var("e", &format!("t + c * {wg}i"));
        self.open(&format!("if ({e} < {ev})"));
        let v = self.expr(&self.k.value)?;
        self.line(&format!("bacc[c] = bacc[c] + pd * {v};"));
        self.close();
        self.close();
        self.close();
        self.close();
        Ok(())
    }

    fn decay_of(&mut self, br: &attnc_ir::Branch) -> Result<String, CodegenError> {
        match &br.decay {
            Some(d) => self.expr(d),
            None => Ok("1.0f".into()),
        }
    }

    /// Opens the loop over key tiles of branch `br` (number `n`). A masked branch reads the
    /// tile's class: an empty tile is skipped, a full one (`full`) needs no mask work.
    fn tile_loop(&mut self, mj: &str, wg: u32, n: usize, br: &attnc_ir::Branch) {
        self.open(&format!("for (var j0: i32 = 0i; j0 < {mj}; j0 += {wg}i)"));
        self.line(&format!("let nt = min({wg}i, {mj} - j0);"));
        if br.mask.is_some() {
            self.line(&format!("let cl = tile_class(cls_row + {n}i * kt_n + j0 / {wg}i);"));
            self.line("if (cl == 0u) { continue; }");
            self.line("let full = cl == 1u;");
        }
    }

    /// One branch of the row: walks the key tiles, then adds its normalized contribution.
    fn branch(&mut self, n: usize, br: &attnc_ir::Branch, mj: &str, ev: &str, wg: u32, ch: u32) -> Result<(), CodegenError> {
        self.line(&format!("for (var c: i32 = 0i; c < {ch}i; c++) {{ bacc[c] = 0.0f; }}"));
        self.line("var cnt: i32 = 0i;");
        match &br.norm {
            Norm::Softmax { sink, .. } => match sink {
                Some(se) => {
                    let sk = self.expr(se)?;
                    self.line(&format!("var m: f32 = {sk};"));
                    self.line(&format!("var l: f32 = select(exp({sk} - {sk}), 0.0f, {sk} == -pinf());"));
                }
                None => {
                    self.line("var m: f32 = -pinf();");
                    self.line("var l: f32 = 0.0f;");
                }
            },
            _ => self.line("var l: f32 = 0.0f;"),
        }
        let mut factor: Option<String> = None;
        match &br.norm {
            Norm::Softmax { post, .. } => {
                let one_pass = post.is_none();
                // Pass 1 (the only pass without `post`): the tile's maximum, the rescale, the
                // denominator and (one pass) the weighted values.
                self.tile_loop(mj, wg, n, br);
                self.line("sh_s[t] = 0.0f;");
                self.line("sh_d[t] = 1.0f;");
                self.key_phase(br, mj, &mut |w, s| {
                    w.line(&format!("sh_s[t] = {s};"));
                    if one_pass && br.decay.is_some() {
                        let d = w.decay_of(br)?;
                        w.line(&format!("sh_d[t] = {d};"));
                    }
                    Ok(())
                })?;
                self.line("workgroupBarrier();");
                self.line("var mt = -pinf();");
                self.line("for (var u: i32 = 0i; u < nt; u++) { if (sh_l[u] != 0u) { cnt = cnt + 1i; mt = fmaxf(mt, sh_s[u]); } }");
                self.line("let mn = fmaxf(m, mt);");
                self.line("let ok = !(mn == -pinf());");
                self.line("let corr = select(1.0f, exp(m - mn), ok);");
                self.line("var p = 0.0f;");
                self.line("if (ok && sh_l[t] != 0u) { p = exp(sh_s[t] - mn); }");
                self.line("sh_p[t] = p;");
                self.line("sh_q[t] = p * sh_d[t];");
                self.line("workgroupBarrier();");
                self.open("if (ok)");
                self.line("var ls = 0.0f;");
                self.line("for (var u: i32 = 0i; u < nt; u++) { ls = ls + sh_p[u]; }");
                self.line("l = l * corr + ls;");
                self.line("m = mn;");
                if one_pass {
                    self.line(&format!("for (var c: i32 = 0i; c < {ch}i; c++) {{ bacc[c] = bacc[c] * corr; }}"));
                    self.accumulate(wg, ch, ev, false)?;
                }
                self.close();
                self.line("workgroupBarrier();");
                self.close();
                match post {
                    None => factor = Some("(1.0f / l)".into()),
                    Some(post) => {
                        // Pass 2: the final weights through `post`, decayed.
                        self.tile_loop(mj, wg, n, br);
                        self.line("sh_q[t] = 0.0f;");
                        self.key_phase(br, mj, &mut |w, s| {
                            w.bind_float("w", &format!("exp({s} - m) / l"));
                            let pw = w.expr(post)?;
                            let d = w.decay_of(br)?;
                            w.line(&format!("sh_q[t] = {pw} * {d};"));
                            Ok(())
                        })?;
                        self.line("workgroupBarrier();");
                        self.accumulate(wg, ch, ev, false)?;
                        self.line("workgroupBarrier();");
                        self.close();
                    }
                }
            }
            Norm::Map(f) => {
                self.tile_loop(mj, wg, n, br);
                self.line("sh_q[t] = 0.0f;");
                self.key_phase(br, mj, &mut |w, s| {
                    w.bind_float("s", s);
                    let p = w.expr(f)?;
                    let d = w.decay_of(br)?;
                    w.line(&format!("sh_q[t] = {p} * {d};"));
                    Ok(())
                })?;
                self.line("workgroupBarrier();");
                self.accumulate(wg, ch, ev, true)?;
                self.line("workgroupBarrier();");
                self.close();
            }
            Norm::Linear { eps } => {
                self.tile_loop(mj, wg, n, br);
                self.line("sh_q[t] = 0.0f;");
                self.line("sh_p[t] = 0.0f;");
                self.key_phase(br, mj, &mut |w, s| {
                    let d = w.decay_of(br)?;
                    w.line(&format!("sh_p[t] = {s};"));
                    w.line(&format!("sh_q[t] = {s} * {d};"));
                    Ok(())
                })?;
                self.line("workgroupBarrier();");
                self.line("for (var u: i32 = 0i; u < nt; u++) { l = l + sh_p[u]; }");
                self.accumulate(wg, ch, ev, true)?;
                self.line("workgroupBarrier();");
                self.close();
                factor = Some(format!("(1.0f / (l + {}))", Self::float_lit(eps.0)));
            }
        }
        self.fold_branch(br, factor, ch, None)
    }

    /// The end of a branch: when a key was live (and, for softmax, the row's maximum is
    /// finite), `oacc += bacc · factor · weight` over `acc` accumulators; `row` binds `i`
    /// first (the tiled kernel's query row).
    fn fold_branch(&mut self, br: &attnc_ir::Branch, factor: Option<String>, acc: u32, row: Option<&str>) -> Result<(), CodegenError> {
        let live = if matches!(br.norm, Norm::Softmax { .. }) { "cnt > 0i && !(m == -pinf())" } else { "cnt > 0i" };
        self.open(&format!("if ({live})"));
        self.line("any_live = true;");
        if let Some(r) = row {
            self.bind_var("i", r);
        }
        let mut f = factor;
        if let Some(wexpr) = &br.weight {
            let wv = self.expr(wexpr)?;
            f = Some(match f {
                Some(x) => format!("{x} * {wv}"),
                None => wv,
            });
        }
        let f = f.unwrap_or_else(|| "1.0f".into());
        self.line(&format!("let f = {f};"));
        self.line(&format!("for (var a: i32 = 0i; a < {acc}i; a++) {{ oacc[a] = oacc[a] + bacc[a] * f; }}"));
        self.close();
        Ok(())
    }

    /// Stores accumulator `oacc[a]` as the output element at the bound `(b, h, i, e)`,
    /// gated; zero for a row where no key was live in any branch.
    fn store_output(&mut self, a: &str) -> Result<(), CodegenError> {
        let k = self.k;
        let gated = match &k.gate {
            Some(g) => {
                let g = self.expr(g)?;
                format!("oacc[{a}] * {g}")
            }
            None => format!("oacc[{a}]"),
        };
        let out = k.output().name.clone();
        let idx = k.out.iter().map(|v| self.expr(&Expr::var(v))).collect::<Result<Vec<_>, _>>()?;
        self.store(&out, &idx, &format!("select(0.0f, {gated}, any_live)"), false);
        Ok(())
    }
}
