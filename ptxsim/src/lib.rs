//! An interpreter for the PTX attnc emits, so a kernel's semantics can be checked without a
//! GPU (`attnc run --backend ptx-sim`; no PTX emulator can be installed here and ptxas only
//! checks syntax).
//!
//! It parses a module's `.entry` functions (register declarations, labels, predicated
//! instructions), decodes every instruction once, and runs a grid thread by thread. It
//! reports, as errors naming the thread and the instruction: a read of a register never
//! written, a load or store outside the buffers, an integer division by zero, an
//! instruction it does not know.
//!
//! What it implements: integer, float and predicate arithmetic, comparisons, conversions,
//! global loads and stores, branches (what the exact f32 row kernel and the derive passes
//! use), and the block-level machinery a tiled kernel needs: `.shared` arrays with
//! `ld.shared`/`st.shared`, `bar.sync`, `shfl.sync` (`up`, `down`, `bfly`, `idx`, with the
//! ISA's clamp and segment mask), and the tensor-core instructions with the PTX ISA's
//! fragment layouts: `ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16`,
//! `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32` (exact products summed
//! in f64, rounded once), `cp.async.{ca,cg}.shared.global` with a source size (zero-filled
//! tails), `commit_group`, `wait_group`, `wait_all`, and `cvt.rn.{bf16x2,f16x2}.f32`.
//!
//! A block runs its threads each to its next synchronization point, then executes each
//! warp's warp-wide instruction (`shfl.sync`: every lane of its mask must be there;
//! `ldmatrix`, `mma`: all 32 lanes) or the barrier (every thread still running must be
//! there; exited threads take no part). Shared memory is checked byte by byte: reading a
//! byte never written (shared memory starts undefined), two threads touching a byte between
//! the same two barriers with one writing (a race), touching the destination of a `cp.async`
//! not yet waited for, or exiting with copies in flight, are errors. A `cp.async` counts as a
//! write from its issue (it may land any time until its group is waited for) and lands, as a
//! write by its thread, when the thread waits for its group. Approximate instructions
//! (`ex2.approx`, `lg2.approx`, `sin.approx`, `cos.approx`) are computed in f64 and rounded
//! once: within the bounds the PTX ISA states for them.

use std::collections::BTreeMap;

/// A simulated global buffer's base address: buffer `n` lives at `(n + 1) << 40`.
const BUF_SHIFT: u32 = 40;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SimError(pub String);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    S32,
    U32,
    B32,
    F32,
    S64,
    U64,
    U16,
    U8,
    F16,
    Pred,
    Bf16x2,
    F16x2,
}

#[derive(Clone, Debug)]
enum Opd {
    Reg(usize),
    Imm(u64),
    Special(Special),
    Param(usize),
    /// `[reg + off]`.
    Addr(usize, i64),
    /// `[param]`.
    ParamAddr(usize),
    Label(usize),
    /// `{%r1, %r2, …}`: a vector of registers (the fragments of `ldmatrix` and `mma`).
    Vec(Vec<usize>),
}

#[derive(Clone, Copy, Debug)]
enum Special {
    Tid,
    Ntid,
    Ctaid,
    LaneId,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// Unordered or not equal / greater; either operand NaN.
    Neu,
    Gtu,
    Nan,
}

/// An instruction, decoded once.
#[derive(Clone, Copy, Debug, PartialEq)]
enum K {
    Ret,
    Bra,
    LdParam,
    Ld8,
    Ld16,
    Ld32,
    St32,
    Mov,
    Selp,
    NotP,
    AndP,
    OrP,
    XorP,
    XorB,
    AndB,
    OrB,
    Shl,
    /// `shr.u32` (logical) and `shr.s32` (arithmetic).
    ShrU,
    ShrS,
    SetpF(Cmp),
    SetpI(Cmp),
    CvtF32S32,
    CvtS32F32,
    Floor,
    Ceil,
    RoundEven,
    Trunc,
    CvtU16,
    /// `cvt.s64.s32`: sign extension.
    CvtS64S32,
    CvtF32F16,
    FAdd,
    FSub,
    FMul,
    FDiv,
    Fma,
    FNeg,
    FAbs,
    FSqrt,
    FMin,
    FMax,
    FMinNaN,
    FMaxNaN,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Add64,
    MulWide,
    IAdd,
    ISub,
    IMul,
    IMad,
    IDiv,
    IRem,
    INeg,
    IAbs,
    IMin,
    IMax,
    LdShared32,
    StShared32,
    /// `bar.sync`: every thread of the block that has not exited waits here.
    Bar,
    /// `shfl.sync.MODE.b32 d, a, b, c, membermask`: the whole warp exchanges registers.
    Shfl(ShflMode),
    /// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16 {d…}, [a]`: the warp loads `n`
    /// 8×8 matrices of halves from shared memory into fragments.
    Ldmatrix {
        n: u8,
        trans: bool,
    },
    /// `mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 {d×4}, {a×4}, {b×2}, {c×4}` with
    /// `T` bf16 (`bf16: true`) or f16.
    Mma {
        bf16: bool,
    },
    /// `cp.async.(ca|cg).shared.global [d], [s], size[, src_size]`: an asynchronous copy
    /// from global to shared memory, zero-filled past `src_size`.
    CpAsync {
        cg: bool,
    },
    /// `cp.async.commit_group`: closes the thread's open group of copies.
    CpCommit,
    /// `cp.async.wait_group n` (`wait_all`: commit, then 0): completes all but the `n`
    /// most recent groups.
    CpWait,
    CpWaitAll,
    /// `cvt.rn.(bf16x2|f16x2).f32 d, a, b`: `a` rounded to the upper half, `b` the lower.
    CvtPack {
        bf16: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Debug)]
struct Ins {
    /// `@p` / `@!p`.
    guard: Option<(usize, bool)>,
    kind: K,
    opds: Vec<Opd>,
    line: usize,
    text: String,
}

/// Decodes an instruction from its opcode's parts; `None` for what the interpreter does not
/// run.
fn decode(op: &str, mods: &[String], ty: Ty) -> Option<K> {
    let m = |s: &str| mods.iter().any(|x| x == s);
    let cmp = || {
        Some(match mods.first()?.as_str() {
            "eq" => Cmp::Eq,
            "ne" => Cmp::Ne,
            "lt" => Cmp::Lt,
            "le" => Cmp::Le,
            "gt" => Cmp::Gt,
            "ge" => Cmp::Ge,
            "neu" => Cmp::Neu,
            "gtu" => Cmp::Gtu,
            "nan" => Cmp::Nan,
            _ => return None,
        })
    };
    let float = ty == Ty::F32;
    let int = matches!(ty, Ty::S32 | Ty::U32 | Ty::B32);
    Some(match op {
        "ret" => K::Ret,
        "bra" => K::Bra,
        "ld" if m("param") => K::LdParam,
        "ld" if m("shared") && (int || float) => K::LdShared32,
        "st" if m("shared") && (int || float) => K::StShared32,
        "bar" if m("sync") => K::Bar,
        "ldmatrix" if m("sync") && m("aligned") && m("m8n8") && m("shared") && m("b16") => K::Ldmatrix {
            n: match () {
                _ if m("x1") => 1,
                _ if m("x2") => 2,
                _ if m("x4") => 4,
                _ => return None,
            },
            trans: m("trans"),
        },
        "mma" if m("sync") && m("aligned") && m("m16n8k16") && m("row") && m("col") => {
            let ts: Vec<&str> = mods.iter().map(String::as_str).filter(|x| matches!(*x, "f32" | "bf16" | "f16")).collect();
            match ts.as_slice() {
                ["f32", "bf16", "bf16", "f32"] => K::Mma { bf16: true },
                ["f32", "f16", "f16", "f32"] => K::Mma { bf16: false },
                _ => return None,
            }
        }
        "cp" if mods.first().map(String::as_str) == Some("async") => match mods.get(1).map(String::as_str) {
            Some(c @ ("ca" | "cg")) if m("shared") && m("global") => K::CpAsync { cg: c == "cg" },
            Some("commit_group") => K::CpCommit,
            Some("wait_group") => K::CpWait,
            Some("wait_all") => K::CpWaitAll,
            _ => return None,
        },
        "shfl" if m("sync") && int => K::Shfl(match mods.get(1)?.as_str() {
            "up" => ShflMode::Up,
            "down" => ShflMode::Down,
            "bfly" => ShflMode::Bfly,
            "idx" => ShflMode::Idx,
            _ => return None,
        }),
        "ld" if m("global") && ty == Ty::U16 => K::Ld16,
        "ld" if m("global") && ty == Ty::U8 => K::Ld8,
        "ld" if m("global") && (int || float) => K::Ld32,
        "st" if m("global") && (int || float) => K::St32,
        "cvta" | "mov" => K::Mov,
        "selp" => K::Selp,
        "not" if ty == Ty::Pred => K::NotP,
        "and" if ty == Ty::Pred => K::AndP,
        "or" if ty == Ty::Pred => K::OrP,
        "xor" if ty == Ty::Pred => K::XorP,
        "xor" if int => K::XorB,
        "and" if int => K::AndB,
        "or" if int => K::OrB,
        "shl" if int => K::Shl,
        "shr" if ty == Ty::S32 => K::ShrS,
        "shr" if int => K::ShrU,
        "setp" if float => K::SetpF(cmp()?),
        "setp" if int => match cmp()? {
            c @ (Cmp::Eq | Cmp::Ne | Cmp::Lt | Cmp::Le | Cmp::Gt | Cmp::Ge) => K::SetpI(c),
            _ => return None,
        },
        "cvt" => {
            let ts: Vec<Ty> = mods.iter().filter_map(|x| ty_of(x)).collect();
            let rnd = mods.first().map(String::as_str).unwrap_or("");
            match (ts.first()?, ts.get(1)?) {
                (Ty::F32, Ty::S32) => K::CvtF32S32,
                (Ty::S32, Ty::F32) if rnd == "rzi" => K::CvtS32F32,
                (Ty::F32, Ty::F32) => match rnd {
                    "rmi" => K::Floor,
                    "rpi" => K::Ceil,
                    "rni" => K::RoundEven,
                    "rzi" => K::Trunc,
                    _ => return None,
                },
                (Ty::U16, Ty::U32) => K::CvtU16,
                (Ty::S64, Ty::S32) => K::CvtS64S32,
                (Ty::Bf16x2, Ty::F32) if rnd == "rn" => K::CvtPack { bf16: true },
                (Ty::F16x2, Ty::F32) if rnd == "rn" => K::CvtPack { bf16: false },
                (Ty::F32, Ty::F16 | Ty::U16) => K::CvtF32F16,
                _ => return None,
            }
        }
        "add" if float => K::FAdd,
        "sub" if float => K::FSub,
        "mul" if float => K::FMul,
        "div" if float => K::FDiv,
        "fma" if float => K::Fma,
        "neg" if float => K::FNeg,
        "abs" if float => K::FAbs,
        "sqrt" if float => K::FSqrt,
        "min" if float && m("NaN") => K::FMinNaN,
        "max" if float && m("NaN") => K::FMaxNaN,
        "min" if float => K::FMin,
        "max" if float => K::FMax,
        "ex2" if float => K::Ex2,
        "lg2" if float => K::Lg2,
        "sin" if float => K::Sin,
        "cos" if float => K::Cos,
        "add" if matches!(ty, Ty::S64 | Ty::U64) => K::Add64,
        "mul" if m("wide") && int => K::MulWide,
        "add" if int => K::IAdd,
        "sub" if int => K::ISub,
        "mul" if m("lo") && int => K::IMul,
        "mad" if m("lo") && int => K::IMad,
        "div" if int => K::IDiv,
        "rem" if int => K::IRem,
        "neg" if int => K::INeg,
        "abs" if int => K::IAbs,
        "min" if int => K::IMin,
        "max" if int => K::IMax,
        _ => return None,
    })
}

/// One `.entry` function, decoded.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    params: Vec<String>,
    nregs: usize,
    code: Vec<Ins>,
    /// Bytes of `.shared` memory a block has (its arrays at the offsets their names stand
    /// for: a shared address is an offset into the block's window).
    shared: usize,
}

/// A parsed module.
#[derive(Clone, Debug)]
pub struct Program {
    pub functions: Vec<Function>,
}

/// The operands of an instruction: split at commas outside `{…}` vectors.
fn split_operands(args: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (n, c) in args.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(args[start..n].trim());
                start = n + 1;
            }
            _ => {}
        }
    }
    out.push(args[start..].trim());
    out
}

fn err<T>(line: usize, msg: impl std::fmt::Display) -> Result<T, SimError> {
    Err(SimError(format!("line {line}: {msg}")))
}

fn ty_of(s: &str) -> Option<Ty> {
    Some(match s {
        "s32" => Ty::S32,
        "u32" => Ty::U32,
        "b32" => Ty::B32,
        "f32" => Ty::F32,
        "s64" => Ty::S64,
        "u64" => Ty::U64,
        "u16" | "b16" => Ty::U16,
        "u8" => Ty::U8,
        "f16" => Ty::F16,
        "pred" => Ty::Pred,
        "bf16x2" => Ty::Bf16x2,
        "f16x2" => Ty::F16x2,
        _ => return None,
    })
}

impl Program {
    /// Parses the module text; refuses instructions the interpreter does not run.
    pub fn parse(src: &str) -> Result<Program, SimError> {
        let mut functions = Vec::new();
        let lines: Vec<&str> = src.lines().collect();
        let mut n = 0;
        while n < lines.len() {
            let l = lines[n].trim();
            if let Some(rest) = l.strip_prefix(".visible .entry ").or_else(|| l.strip_prefix(".entry ")) {
                let name = rest.trim_end_matches('(').trim().to_string();
                let mut params = Vec::new();
                n += 1;
                while n < lines.len() && !lines[n].trim().starts_with(')') {
                    let p = lines[n].trim().trim_end_matches(',');
                    let Some(pn) = p.strip_prefix(".param .u64 ") else { return err(n + 1, format!("unsupported parameter `{p}`")) };
                    params.push(pn.trim().to_string());
                    n += 1;
                }
                n += 1;
                if lines.get(n).map(|l| l.trim()) != Some("{") {
                    return err(n + 1, "expected `{` after the parameters");
                }
                n += 1;
                let start = n;
                while n < lines.len() && lines[n].trim() != "}" {
                    n += 1;
                }
                functions.push(Function::parse(name, params, &lines[start..n], start)?);
            }
            n += 1;
        }
        Ok(Program { functions })
    }

    pub fn function(&self, name: &str) -> Result<&Function, SimError> {
        self.functions.iter().find(|f| f.name == name).ok_or_else(|| SimError(format!("no entry `{name}` in the module")))
    }
}

impl Function {
    fn parse(name: String, params: Vec<String>, lines: &[&str], first: usize) -> Result<Function, SimError> {
        // Register names → slots, from `.reg .TYPE %x<N>;` (declaring %x0 … %x(N-1)).
        let mut regs: BTreeMap<String, (usize, Ty)> = BTreeMap::new();
        let mut labels: BTreeMap<String, usize> = BTreeMap::new();
        let mut nregs = 0;
        let mut count = 0;
        let mut shared = 0usize;
        let mut symbols: BTreeMap<String, usize> = BTreeMap::new();
        for (k, l) in lines.iter().enumerate() {
            let l = l.trim();
            if let Some(d) = l.strip_prefix(".shared ") {
                // `.shared .align A .b8 NAME[SIZE];`
                let words: Vec<&str> = d.trim_end_matches(';').split_whitespace().collect();
                let (align, decl) = match words.as_slice() {
                    [".align", a, ".b8", decl] => (a.parse::<usize>().unwrap_or(0), *decl),
                    _ => return err(first + k + 1, format!("unsupported shared declaration `{l}` (write `.shared .align A .b8 NAME[SIZE];`)")),
                };
                let Some((name, size)) = decl.strip_suffix(']').and_then(|x| x.split_once('[')) else { return err(first + k + 1, "expected NAME[SIZE]") };
                let size: usize = size.parse().map_err(|_| SimError(format!("line {}: bad shared size", first + k + 1)))?;
                if align == 0 || !align.is_power_of_two() {
                    return err(first + k + 1, "the alignment must be a power of two");
                }
                shared = shared.div_ceil(align) * align;
                symbols.insert(name.to_string(), shared);
                shared += size;
            } else if let Some(d) = l.strip_prefix(".reg .") {
                let (t, rest) = d.split_once(' ').unwrap_or((d, ""));
                let Some(ty) = ty_of(t) else { return err(first + k + 1, format!("unknown register type `{t}`")) };
                let rest = rest.trim().trim_end_matches(';');
                let Some((prefix, num)) = rest.split_once('<') else { return err(first + k + 1, "expected `%x<N>`") };
                let num: usize = num.trim_end_matches('>').parse().map_err(|_| SimError(format!("line {}: bad register count", first + k + 1)))?;
                for i in 0..num {
                    regs.insert(format!("{prefix}{i}"), (nregs, ty));
                    nregs += 1;
                }
            } else if let Some(lb) = l.strip_suffix(':') {
                labels.insert(lb.to_string(), count);
            } else if !l.is_empty() {
                count += 1;
            }
        }
        let mut code = Vec::new();
        for (k, l) in lines.iter().enumerate() {
            let l = l.trim();
            let line = first + k + 1;
            if l.is_empty() || l.starts_with(".reg") || l.starts_with(".shared") || l.ends_with(':') {
                continue;
            }
            let Some(body) = l.strip_suffix(';') else { return err(line, format!("expected `;` at the end of `{l}`")) };
            let (guard, body) = match body.strip_prefix('@') {
                Some(g) => {
                    let (p, rest) = g.split_once(' ').unwrap_or((g, ""));
                    let (neg, p) = match p.strip_prefix('!') {
                        Some(p) => (true, p),
                        None => (false, p),
                    };
                    let Some(&(r, Ty::Pred)) = regs.get(p) else { return err(line, format!("`{p}` is not a declared predicate")) };
                    (Some((r, neg)), rest.trim())
                }
                None => (None, body),
            };
            let (opcode, args) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
            let mut parts = opcode.split('.');
            let op = parts.next().unwrap_or("").to_string();
            let mods: Vec<String> = parts.map(str::to_string).collect();
            let ty = mods.iter().rev().find_map(|m| ty_of(m)).unwrap_or(Ty::B32);
            let Some(kind) = decode(&op, &mods, ty) else { return err(line, format!("`{opcode}` is not an instruction this interpreter runs")) };
            let mut opds = Vec::new();
            for a in split_operands(args).into_iter().filter(|a| !a.is_empty()) {
                if let Some(inner) = a.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                    let mut v = Vec::new();
                    for r in inner.split(',').map(str::trim) {
                        match regs.get(r) {
                            Some(&(n, _)) => v.push(n),
                            None => return err(line, format!("`{r}` in `{a}` is not a declared register")),
                        }
                    }
                    opds.push(Opd::Vec(v));
                    continue;
                }
                match symbols.get(a) {
                    Some(&off) => opds.push(Opd::Imm(off as u64)),
                    None => opds.push(Self::operand(a, &regs, &labels, &params, line)?),
                }
            }
            code.push(Ins { guard, kind, opds, line, text: l.to_string() });
        }
        Ok(Function { name, params, nregs, code, shared })
    }

    fn operand(a: &str, regs: &BTreeMap<String, (usize, Ty)>, labels: &BTreeMap<String, usize>, params: &[String], line: usize) -> Result<Opd, SimError> {
        if let Some(inner) = a.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
            if let Some(p) = params.iter().position(|p| p == inner) {
                return Ok(Opd::ParamAddr(p));
            }
            let (r, off) = match inner.split_once('+') {
                Some((r, o)) => (r, o.parse::<i64>().map_err(|_| SimError(format!("line {line}: bad offset in `{a}`")))?),
                None => (inner, 0),
            };
            return match regs.get(r) {
                Some(&(n, _)) => Ok(Opd::Addr(n, off)),
                None => err(line, format!("`{r}` is not a declared register")),
            };
        }
        if let Some(&(n, _)) = regs.get(a) {
            return Ok(Opd::Reg(n));
        }
        match a {
            "%tid.x" => return Ok(Opd::Special(Special::Tid)),
            "%ntid.x" => return Ok(Opd::Special(Special::Ntid)),
            "%ctaid.x" => return Ok(Opd::Special(Special::Ctaid)),
            "%laneid" => return Ok(Opd::Special(Special::LaneId)),
            _ => {}
        }
        if let Some(&l) = labels.get(a) {
            return Ok(Opd::Label(l));
        }
        if let Some(p) = params.iter().position(|p| p == a) {
            return Ok(Opd::Param(p));
        }
        if let Some(h) = a.strip_prefix("0f") {
            return u32::from_str_radix(h, 16).map(|b| Opd::Imm(b as u64)).map_err(|_| SimError(format!("line {line}: bad float literal `{a}`")));
        }
        if let Ok(v) = a.parse::<i64>() {
            return Ok(Opd::Imm(v as u64));
        }
        if a.starts_with('%') {
            return err(line, format!("`{a}` is not a declared register"));
        }
        err(line, format!("cannot read operand `{a}`"))
    }
}

/// Global memory: the buffers a launch passes, at their simulated addresses.
pub struct Memory<'a> {
    pub buffers: Vec<&'a mut [u8]>,
}

impl Memory<'_> {
    /// The simulated address of buffer `n`.
    pub fn address(n: usize) -> u64 {
        ((n as u64) + 1) << BUF_SHIFT
    }

    fn span(&mut self, addr: u64, len: usize) -> Result<&mut [u8], String> {
        let n = (addr >> BUF_SHIFT) as usize;
        let off = (addr & ((1 << BUF_SHIFT) - 1)) as usize;
        let buf = n.checked_sub(1).and_then(|n| self.buffers.get_mut(n)).ok_or_else(|| format!("address {addr:#x} is in no buffer"))?;
        let blen = buf.len();
        if off + len > blen {
            return Err(format!("{len}-byte access at byte {off} of buffer {} ({blen} bytes): out of bounds", n - 1));
        }
        Ok(&mut buf[off..off + len])
    }
}

fn f(x: u64) -> f32 {
    f32::from_bits(x as u32)
}
fn fb(x: f32) -> u64 {
    x.to_bits() as u64
}
fn i(x: u64) -> i32 {
    x as u32 as i32
}
fn ib(x: i32) -> u64 {
    x as u32 as u64
}

struct Thread<'f> {
    f: &'f Function,
    regs: Vec<Option<u64>>,
    tid: u32,
    ntid: u32,
    ctaid: u32,
    params: &'f [u64],
    pc: usize,
    state: State,
    /// `cp.async` copies issued and not yet committed, then the committed groups, oldest
    /// first.
    open: Vec<AsyncCopy>,
    groups: std::collections::VecDeque<Vec<AsyncCopy>>,
}

/// A `cp.async` in flight: the bytes it read from global memory when issued (zero-filled
/// past its source size) and where in shared memory they land when its group completes.
struct AsyncCopy {
    dst: u64,
    data: Vec<u8>,
}

/// Where a thread stands between two steps of its block.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Running,
    /// At a `bar.sync` (not yet executed).
    AtBar,
    /// At a warp-wide instruction (`shfl.sync`, `ldmatrix`, `mma`), not yet executed.
    AtWarp,
    Exited,
}

/// A block's shared memory, with who last wrote and read each byte in which barrier epoch:
/// two threads touching a byte between the same two barriers, one of them writing, is a
/// race.
struct Shared {
    bytes: Vec<u8>,
    /// `(thread + 1, epoch)` of the last write and read of each byte (0: none).
    wrote: Vec<(u32, u32)>,
    read: Vec<(u32, u32)>,
    epoch: u32,
    /// `thread + 1` of the `cp.async` in flight that writes each byte (0: none).
    busy: Vec<u32>,
}

impl Shared {
    fn new(n: usize) -> Shared {
        Shared { bytes: vec![0; n], wrote: vec![(0, 0); n], read: vec![(0, 0); n], epoch: 1, busy: vec![0; n] }
    }

    fn access(&mut self, off: u64, len: usize, tid: u32, write: bool) -> Result<std::ops::Range<usize>, String> {
        let off = usize::try_from(off).map_err(|_| "shared address out of range".to_string())?;
        if off + len > self.bytes.len() {
            return Err(format!("{len}-byte shared access at byte {off} of {}: out of bounds", self.bytes.len()));
        }
        let me = tid + 1;
        for b in off..off + len {
            if self.busy[b] != 0 {
                return Err(format!(
                    "shared byte {b} is written by a cp.async of thread {} still in flight (complete it with cp.async.wait_group first)",
                    self.busy[b] - 1
                ));
            }
            let (w, we) = self.wrote[b];
            if we == self.epoch && w != me && w != 0 {
                return Err(format!("race on shared byte {b}: thread {} wrote it since the last barrier", w - 1));
            }
            if write {
                let (r, re) = self.read[b];
                if re == self.epoch && r != me && r != 0 {
                    return Err(format!("race on shared byte {b}: thread {} read it since the last barrier", r - 1));
                }
                self.wrote[b] = (me, self.epoch);
            } else {
                if w == 0 {
                    return Err(format!("reads shared byte {b}, never written (shared memory starts undefined)"));
                }
                self.read[b] = (me, self.epoch);
            }
        }
        Ok(off..off + len)
    }
}

impl Shared {
    /// Issues a `cp.async` of `len` bytes to `off`: the copy may land at any time until its
    /// group is waited for, so it counts as a write now (a race with another thread's
    /// access since the last barrier) and its bytes are off limits until it lands.
    fn issue(&mut self, off: u64, len: usize, tid: u32) -> Result<(), String> {
        let r = self.access(off, len, tid, true)?;
        for b in r {
            self.busy[b] = tid + 1;
        }
        Ok(())
    }

    /// A `cp.async` lands: its bytes are written (a write by the thread, at this epoch).
    fn land(&mut self, c: &AsyncCopy, tid: u32) -> Result<(), String> {
        let off = c.dst as usize;
        self.busy[off..off + c.data.len()].fill(0);
        let r = self.access(c.dst, c.data.len(), tid, true)?;
        self.bytes[r].copy_from_slice(&c.data);
        Ok(())
    }
}

impl Thread<'_> {
    /// Completes the committed groups of `cp.async` but the `keep` most recent.
    fn wait_groups(&mut self, sh: &mut Shared, keep: usize) -> Result<(), String> {
        while self.groups.len() > keep {
            for c in self.groups.pop_front().expect("a group") {
                sh.land(&c, self.tid)?;
            }
        }
        Ok(())
    }

    fn get(&self, o: &Opd, ins: &Ins) -> Result<u64, String> {
        Ok(match o {
            Opd::Reg(r) => self.regs[*r].ok_or_else(|| format!("reads a register never written ({})", ins.text))?,
            Opd::Imm(v) => *v,
            Opd::Special(Special::Tid) => self.tid as u64,
            Opd::Special(Special::Ntid) => self.ntid as u64,
            Opd::Special(Special::Ctaid) => self.ctaid as u64,
            Opd::Special(Special::LaneId) => (self.tid % 32) as u64,
            Opd::Param(p) => self.params[*p],
            _ => return Err(format!("operand cannot be read as a value ({})", ins.text)),
        })
    }

    fn addr(&self, o: &Opd, ins: &Ins) -> Result<u64, String> {
        match o {
            Opd::Addr(r, off) => Ok(self.regs[*r].ok_or_else(|| format!("address register never written ({})", ins.text))?.wrapping_add(*off as u64)),
            _ => Err(format!("expected an address ({})", ins.text)),
        }
    }

    fn set(&mut self, o: &Opd, v: u64) -> Result<(), String> {
        match o {
            Opd::Reg(r) => {
                self.regs[*r] = Some(v);
                Ok(())
            }
            _ => Err("the destination is not a register".into()),
        }
    }

    /// Runs the thread until it exits or reaches a `bar.sync` or `shfl.sync` (which its block
    /// then executes for all its threads).
    fn run(&mut self, mem: &mut Memory, sh: &mut Shared, budget: &mut u64) -> Result<(), String> {
        let code = &self.f.code;
        let mut pc = self.pc;
        self.state = State::Exited;
        while pc < code.len() {
            let ins = &code[pc];
            if matches!(ins.kind, K::Bar | K::Shfl(_) | K::Ldmatrix { .. } | K::Mma { .. }) {
                self.pc = pc;
                self.state = if ins.kind == K::Bar { State::AtBar } else { State::AtWarp };
                // A guarded-off synchronization is skipped like any instruction.
                if let Some((p, neg)) = ins.guard {
                    let v = self.regs[p].ok_or_else(|| format!("guard predicate never written ({})", ins.text))? != 0;
                    if v == neg {
                        pc += 1;
                        self.state = State::Exited;
                        continue;
                    }
                }
                return Ok(());
            }
            pc += 1;
            if *budget == 0 {
                return Err("instruction budget exhausted (a loop that does not end?)".into());
            }
            *budget -= 1;
            if let Some((p, neg)) = ins.guard {
                let v = self.regs[p].ok_or_else(|| format!("guard predicate never written ({})", ins.text))? != 0;
                if v == neg {
                    continue;
                }
            }
            let o = &ins.opds;
            let a = |t: &Thread, n: usize| -> Result<u64, String> {
                match o.get(n) {
                    Some(Opd::Reg(r)) => t.regs[*r].ok_or_else(|| format!("reads a register never written ({})", ins.text)),
                    Some(Opd::Imm(v)) => Ok(*v),
                    Some(x) => t.get(x, ins),
                    None => Err(format!("missing operand ({})", ins.text)),
                }
            };
            let fa = |t: &Thread, n: usize| a(t, n).map(f);
            let ia = |t: &Thread, n: usize| a(t, n).map(i);
            let fcmp = |c: Cmp, x: f32, y: f32| {
                let un = x.is_nan() || y.is_nan();
                match c {
                    Cmp::Eq => x == y,
                    Cmp::Ne => !un && x != y,
                    Cmp::Lt => x < y,
                    Cmp::Le => x <= y,
                    Cmp::Gt => x > y,
                    Cmp::Ge => x >= y,
                    Cmp::Neu => x != y,
                    Cmp::Gtu => un || x > y,
                    Cmp::Nan => un,
                }
            };
            let r = match ins.kind {
                K::Ret => {
                    self.state = State::Exited;
                    return Ok(());
                }
                K::Bar | K::Shfl(_) | K::Ldmatrix { .. } | K::Mma { .. } => unreachable!("handled before"),
                K::CpAsync { cg } => {
                    let (dst, src) = (self.addr(&o[0], ins)?, self.addr(&o[1], ins)?);
                    let size = a(self, 2)? as usize;
                    let src_size = if o.len() > 3 { a(self, 3)? as usize } else { size };
                    if !matches!(size, 4 | 8 | 16) || (cg && size != 16) {
                        return Err(format!("cp.async copies 4, 8 or 16 bytes (cg: 16), not {size} ({})", ins.text));
                    }
                    if src_size > size {
                        return Err(format!("cp.async source size {src_size} exceeds its copy size {size} ({})", ins.text));
                    }
                    if dst % size as u64 != 0 || src % size as u64 != 0 {
                        return Err(format!("cp.async of {size} bytes from {src:#x} to shared {dst}: addresses not aligned to the size ({})", ins.text));
                    }
                    let mut data = vec![0u8; size];
                    if src_size > 0 {
                        data[..src_size].copy_from_slice(mem.span(src, src_size)?);
                    }
                    sh.issue(dst, size, self.tid)?;
                    self.open.push(AsyncCopy { dst, data });
                    continue;
                }
                K::CpCommit => {
                    let g = std::mem::take(&mut self.open);
                    self.groups.push_back(g);
                    continue;
                }
                K::CpWait => {
                    let keep = a(self, 0)? as usize;
                    self.wait_groups(sh, keep)?;
                    continue;
                }
                K::CpWaitAll => {
                    let g = std::mem::take(&mut self.open);
                    self.groups.push_back(g);
                    self.wait_groups(sh, 0)?;
                    continue;
                }
                K::CvtPack { bf16 } => {
                    let (hi, lo) = (fa(self, 1)?, fa(self, 2)?);
                    let h = |x: f32| if bf16 { half::bf16::from_f32(x).to_bits() } else { half::f16::from_f32(x).to_bits() } as u64;
                    h(lo) | h(hi) << 16
                }
                K::LdShared32 => {
                    let r = sh.access(self.addr(&o[1], ins)?, 4, self.tid, false)?;
                    let b = &sh.bytes[r];
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
                }
                K::StShared32 => {
                    let v = a(self, 1)? as u32;
                    let r = sh.access(self.addr(&o[0], ins)?, 4, self.tid, true)?;
                    sh.bytes[r].copy_from_slice(&v.to_le_bytes());
                    continue;
                }
                K::Bra => {
                    let Some(Opd::Label(l)) = o.first() else { return Err(format!("bad branch ({})", ins.text)) };
                    pc = *l;
                    continue;
                }
                K::LdParam => {
                    let Some(Opd::ParamAddr(p)) = o.get(1) else { return Err(format!("bad ld.param ({})", ins.text)) };
                    self.params[*p]
                }
                K::Ld8 => mem.span(self.addr(&o[1], ins)?, 1)?[0] as u64,
                K::Ld16 => {
                    let s = mem.span(self.addr(&o[1], ins)?, 2)?;
                    u16::from_le_bytes([s[0], s[1]]) as u64
                }
                K::Ld32 => {
                    let s = mem.span(self.addr(&o[1], ins)?, 4)?;
                    u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64
                }
                K::St32 => {
                    let v = a(self, 1)? as u32;
                    mem.span(self.addr(&o[0], ins)?, 4)?.copy_from_slice(&v.to_le_bytes());
                    continue;
                }
                K::Mov => a(self, 1)?,
                K::Selp => {
                    if a(self, 3)? != 0 {
                        a(self, 1)?
                    } else {
                        a(self, 2)?
                    }
                }
                K::NotP => (a(self, 1)? == 0) as u64,
                K::AndP => (a(self, 1)? != 0 && a(self, 2)? != 0) as u64,
                K::OrP => (a(self, 1)? != 0 || a(self, 2)? != 0) as u64,
                K::XorP => ((a(self, 1)? != 0) != (a(self, 2)? != 0)) as u64,
                K::XorB => (a(self, 1)? ^ a(self, 2)?) & 0xffff_ffff,
                K::AndB => a(self, 1)? & a(self, 2)? & 0xffff_ffff,
                K::OrB => (a(self, 1)? | a(self, 2)?) & 0xffff_ffff,
                // PTX clamps shift amounts above 31 (to 0 bits left, or all sign bits).
                K::Shl => (a(self, 1)? as u32).checked_shl(a(self, 2)? as u32).unwrap_or(0) as u64,
                K::ShrU => (a(self, 1)? as u32).checked_shr(a(self, 2)? as u32).unwrap_or(0) as u64,
                K::ShrS => ib(ia(self, 1)? >> (a(self, 2)? as u32).min(31)),
                K::SetpF(c) => fcmp(c, fa(self, 1)?, fa(self, 2)?) as u64,
                K::SetpI(c) => {
                    let (x, y) = (ia(self, 1)?, ia(self, 2)?);
                    (match c {
                        Cmp::Eq => x == y,
                        Cmp::Ne => x != y,
                        Cmp::Lt => x < y,
                        Cmp::Le => x <= y,
                        Cmp::Gt => x > y,
                        _ => x >= y,
                    }) as u64
                }
                // PTX's cvt.rzi.s32.f32 saturates and gives 0 for NaN, as Rust's `as`.
                K::CvtS32F32 => ib(fa(self, 1)?.trunc() as i32),
                K::CvtF32S32 => fb(ia(self, 1)? as f32),
                K::Floor => fb(fa(self, 1)?.floor()),
                K::Ceil => fb(fa(self, 1)?.ceil()),
                K::RoundEven => fb(fa(self, 1)?.round_ties_even()),
                K::Trunc => fb(fa(self, 1)?.trunc()),
                K::CvtU16 => a(self, 1)? & 0xffff,
                K::CvtS64S32 => ia(self, 1)? as i64 as u64,
                K::CvtF32F16 => fb(half::f16::from_bits(a(self, 1)? as u16).to_f32()),
                K::FAdd => fb(fa(self, 1)? + fa(self, 2)?),
                K::FSub => fb(fa(self, 1)? - fa(self, 2)?),
                K::FMul => fb(fa(self, 1)? * fa(self, 2)?),
                K::FDiv => fb(fa(self, 1)? / fa(self, 2)?),
                K::Fma => fb(fa(self, 1)?.mul_add(fa(self, 2)?, fa(self, 3)?)),
                K::FNeg => fb(-fa(self, 1)?),
                K::FAbs => fb(fa(self, 1)?.abs()),
                K::FSqrt => fb(fa(self, 1)?.sqrt()),
                K::FMin => fb(fa(self, 1)?.min(fa(self, 2)?)),
                K::FMax => fb(fa(self, 1)?.max(fa(self, 2)?)),
                K::FMinNaN | K::FMaxNaN => {
                    let (x, y) = (fa(self, 1)?, fa(self, 2)?);
                    fb(if x.is_nan() || y.is_nan() {
                        f32::NAN
                    } else if ins.kind == K::FMinNaN {
                        x.min(y)
                    } else {
                        x.max(y)
                    })
                }
                K::Ex2 => fb((fa(self, 1)? as f64).exp2() as f32),
                K::Lg2 => fb((fa(self, 1)? as f64).log2() as f32),
                K::Sin => fb((fa(self, 1)? as f64).sin() as f32),
                K::Cos => fb((fa(self, 1)? as f64).cos() as f32),
                K::Add64 => a(self, 1)?.wrapping_add(a(self, 2)?),
                K::MulWide => (ia(self, 1)? as i64).wrapping_mul(ia(self, 2)? as i64) as u64,
                K::IAdd => ib(ia(self, 1)?.wrapping_add(ia(self, 2)?)),
                K::ISub => ib(ia(self, 1)?.wrapping_sub(ia(self, 2)?)),
                K::IMul => ib(ia(self, 1)?.wrapping_mul(ia(self, 2)?)),
                K::IMad => ib(ia(self, 1)?.wrapping_mul(ia(self, 2)?).wrapping_add(ia(self, 3)?)),
                K::IDiv | K::IRem => {
                    let (x, y) = (ia(self, 1)?, ia(self, 2)?);
                    if y == 0 {
                        return Err(format!("integer division by zero ({})", ins.text));
                    }
                    ib(if ins.kind == K::IDiv { x.wrapping_div(y) } else { x.wrapping_rem(y) })
                }
                K::INeg => ib(ia(self, 1)?.wrapping_neg()),
                K::IAbs => ib(ia(self, 1)?.wrapping_abs()),
                K::IMin => ib(ia(self, 1)?.min(ia(self, 2)?)),
                K::IMax => ib(ia(self, 1)?.max(ia(self, 2)?)),
            };
            let dst = o.first().ok_or_else(|| format!("no destination ({})", ins.text))?;
            self.set(dst, r)?;
        }
        Ok(())
    }
}

/// Instructions one thread may run before the interpreter calls it a hang.
pub const THREAD_BUDGET: u64 = 1 << 32;

impl Function {
    /// Runs a one-dimensional grid of `blocks × threads` on `mem`; `params` are the entry's
    /// parameters (buffer addresses). The first error stops the run, naming the thread and
    /// the instruction's line.
    pub fn launch(&self, blocks: u32, threads: u32, params: &[u64], mem: &mut Memory) -> Result<u64, SimError> {
        if params.len() != self.params.len() {
            return Err(SimError(format!("`{}` takes {} parameters, {} given", self.name, self.params.len(), params.len())));
        }
        let mut executed = 0u64;
        for ctaid in 0..blocks {
            executed += self.block(ctaid, threads, params, mem).map_err(|e| SimError(format!("`{}`, block {ctaid}, {e}", self.name)))?;
        }
        Ok(executed)
    }

    /// One block: every thread runs to its next synchronization point; then the block
    /// executes the `shfl.sync` of each warp whose threads all reached one, or, when every
    /// thread still running waits at a `bar.sync`, the barrier (a new race epoch). Threads
    /// that exited do not take part. Anything else cannot make progress: an error.
    fn block(&self, ctaid: u32, threads: u32, params: &[u64], mem: &mut Memory) -> Result<u64, String> {
        let mut ts: Vec<Thread> = (0..threads)
            .map(|tid| Thread {
                f: self,
                regs: vec![None; self.nregs],
                tid,
                ntid: threads,
                ctaid,
                params,
                pc: 0,
                state: State::Running,
                open: Vec::new(),
                groups: Default::default(),
            })
            .collect();
        let mut sh = Shared::new(self.shared);
        let mut budget = THREAD_BUDGET;
        loop {
            for t in ts.iter_mut().filter(|t| t.state == State::Running) {
                let tid = t.tid;
                t.run(mem, &mut sh, &mut budget).map_err(|e| format!("thread {tid}: {e}"))?;
                if t.state == State::Exited && (!t.open.is_empty() || t.groups.iter().any(|g| !g.is_empty())) {
                    return Err(format!("thread {tid}: exits with cp.async copies it never waited for"));
                }
            }
            if ts.iter().all(|t| t.state == State::Exited) {
                return Ok(THREAD_BUDGET - budget);
            }
            let mut progress = false;
            for w in 0..threads.div_ceil(32) as usize {
                let lanes = w * 32..((w + 1) * 32).min(threads as usize);
                let warp = &ts[lanes.clone()];
                let live: Vec<&Thread> = warp.iter().filter(|t| t.state != State::Exited).collect();
                if live.is_empty() || !live.iter().all(|t| t.state == State::AtWarp) {
                    continue;
                }
                let pc = live[0].pc;
                if live.iter().any(|t| t.pc != pc) {
                    return Err(format!(
                        "warp {w}: its threads wait at different warp-wide instructions (lines {} and {})",
                        self.code[pc].line,
                        self.code[live.iter().find(|t| t.pc != pc).expect("one").pc].line
                    ));
                }
                match self.code[pc].kind {
                    K::Shfl(_) => self.shuffle(&mut ts[lanes], pc)?,
                    kind => {
                        if live.len() != 32 {
                            return Err(format!("warp {w}: `{}` needs all 32 lanes of the warp, {} reached it", self.code[pc].text, live.len()));
                        }
                        let warp = &mut ts[lanes];
                        match kind {
                            K::Ldmatrix { n, trans } => self.ldmatrix(warp, pc, &mut sh, n as usize, trans)?,
                            K::Mma { bf16 } => self.mma(warp, pc, bf16)?,
                            _ => unreachable!("a warp-wide instruction"),
                        }
                        for t in warp.iter_mut() {
                            t.pc = pc + 1;
                            t.state = State::Running;
                        }
                    }
                }
                progress = true;
            }
            if progress {
                continue;
            }
            if ts.iter().all(|t| matches!(t.state, State::AtBar | State::Exited)) {
                sh.epoch += 1;
                for t in ts.iter_mut().filter(|t| t.state == State::AtBar) {
                    t.pc += 1;
                    t.state = State::Running;
                }
                continue;
            }
            let at = |s: State| ts.iter().filter(|t| t.state == s).map(|t| t.tid.to_string()).collect::<Vec<_>>().join(", ");
            return Err(format!(
                "deadlock: threads [{}] wait at bar.sync while threads [{}] wait at a warp-wide instruction with part of their warp elsewhere",
                at(State::AtBar),
                at(State::AtWarp)
            ));
        }
    }

    /// `shfl.sync.MODE.b32 d, a, b, c, mask` for one warp, all of it at instruction `pc`
    /// (the PTX ISA's definition: `c` holds the clamp in bits 0–4 and the segment mask in
    /// bits 8–12; a source lane out of range reads the thread's own `a`).
    fn shuffle(&self, warp: &mut [Thread], pc: usize) -> Result<(), String> {
        let ins = &self.code[pc];
        let K::Shfl(mode) = ins.kind else { unreachable!("a shfl") };
        let text = &ins.text;
        let val = |t: &Thread, n: usize| -> Result<u64, String> {
            match ins.opds.get(n) {
                Some(Opd::Reg(r)) => t.regs[*r].ok_or_else(|| format!("thread {}: reads a register never written ({text})", t.tid)),
                Some(Opd::Imm(v)) => Ok(*v),
                _ => Err(format!("bad shfl operand ({text})")),
            }
        };
        let mask = val(&warp[0], 4)? as u32;
        let present: u32 = warp.iter().filter(|t| t.state == State::AtWarp).fold(0, |m, t| m | 1 << (t.tid % 32));
        if mask & !present != 0 {
            return Err(format!("shfl.sync names lanes {:#x} in its mask, but only lanes {present:#x} reached it ({text})", mask));
        }
        let src: Vec<Option<u64>> = warp.iter().map(|t| if t.state == State::AtWarp { val(t, 1).ok() } else { None }).collect();
        let mut out = Vec::with_capacity(warp.len());
        for t in warp.iter() {
            if t.state != State::AtWarp {
                out.push(None);
                continue;
            }
            let lane = (t.tid % 32) as i32;
            let (b, c) = (val(t, 2)? as i32 & 0x1f, val(t, 3)? as i32);
            let (cval, segmask) = (c & 0x1f, (c >> 8) & 0x1f);
            let max_lane = (lane & segmask) | (cval & !segmask);
            let min_lane = lane & segmask;
            let (j, ok) = match mode {
                ShflMode::Up => (lane - b, lane - b >= max_lane),
                ShflMode::Down => (lane + b, lane + b <= max_lane),
                ShflMode::Bfly => (lane ^ b, (lane ^ b) <= max_lane),
                ShflMode::Idx => (min_lane | (b & !segmask), (min_lane | (b & !segmask)) <= max_lane),
            };
            let j = if ok { j } else { lane };
            let v = src
                .get(j as usize)
                .copied()
                .flatten()
                .ok_or_else(|| format!("thread {}: lane {j} has not reached this shfl.sync or has no value ({text})", t.tid))?;
            out.push(Some(v));
        }
        for (t, v) in warp.iter_mut().zip(out) {
            if let Some(v) = v {
                t.set(&ins.opds[0], v)?;
                t.pc = pc + 1;
                t.state = State::Running;
            }
        }
        Ok(())
    }

    /// The registers of vector operand `n` of `ins`.
    fn vector(ins: &Ins, n: usize, len: usize) -> Result<&[usize], String> {
        match ins.opds.get(n) {
            Some(Opd::Vec(v)) if v.len() == len => Ok(v),
            _ => Err(format!("operand {} must be a vector of {len} registers ({})", n + 1, ins.text)),
        }
    }

    /// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16` for a whole warp (the PTX ISA's
    /// layout): lanes `8m … 8m + 7` give the shared addresses of matrix `m`'s 8 rows (16
    /// bytes each, 16-byte aligned); lane `l` receives in register `m` the halves at row
    /// `l / 4`, columns `2(l % 4)` (low half) and `2(l % 4) + 1` (high half), or with
    /// `.trans` the halves at rows `2(l % 4)`, `2(l % 4) + 1` of column `l / 4`.
    fn ldmatrix(&self, warp: &mut [Thread], pc: usize, sh: &mut Shared, n: usize, trans: bool) -> Result<(), String> {
        let ins = &self.code[pc];
        let dst = Self::vector(ins, 0, n)?;
        let mut rows = vec![[0u16; 8]; 8 * n];
        for (r, row) in rows.iter_mut().enumerate() {
            let t = &warp[r];
            let at = t.addr(&ins.opds[1], ins).map_err(|e| format!("thread {}: {e}", t.tid))?;
            if at % 16 != 0 {
                return Err(format!("thread {}: ldmatrix row address {at} is not 16-byte aligned ({})", t.tid, ins.text));
            }
            let range = sh.access(at, 16, t.tid, false).map_err(|e| format!("thread {}: {e}", t.tid))?;
            for (c, h) in sh.bytes[range].chunks(2).enumerate() {
                row[c] = u16::from_le_bytes([h[0], h[1]]);
            }
        }
        for (l, t) in warp.iter_mut().enumerate() {
            let (g, q) = (l / 4, l % 4);
            for (m, &d) in dst.iter().enumerate() {
                let mat = &rows[8 * m..8 * m + 8];
                let (lo, hi) = if trans { (mat[2 * q][g], mat[2 * q + 1][g]) } else { (mat[g][2 * q], mat[g][2 * q + 1]) };
                t.regs[d] = Some(lo as u64 | (hi as u64) << 16);
            }
        }
        Ok(())
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 d, a, b, c` for a whole warp, with
    /// the PTX ISA's fragment layouts (lane `l`, `g = l / 4`, `q = l % 4`; the low half of
    /// a register is the first element): A's registers hold rows `g`, `g + 8`, `g`, `g + 8`
    /// at columns `2q, 2q + 1` (`+ 8` in the last two); B's hold rows `2q, 2q + 1` (`+ 8`
    /// in the second) of column `g`; C and D hold rows `g`, `g`, `g + 8`, `g + 8` at
    /// columns `2q`, `2q + 1`. The products are exact and summed in f64, rounded once.
    fn mma(&self, warp: &mut [Thread], pc: usize, bf16: bool) -> Result<(), String> {
        let ins = &self.code[pc];
        let (dr, ar, br, cr) = (Self::vector(ins, 0, 4)?, Self::vector(ins, 1, 4)?, Self::vector(ins, 2, 2)?, Self::vector(ins, 3, 4)?);
        let half = |x: u64| if bf16 { half::bf16::from_bits(x as u16).to_f64() } else { half::f16::from_bits(x as u16).to_f64() };
        let (mut a, mut b, mut c) = ([[0f64; 16]; 16], [[0f64; 8]; 16], [[0f64; 8]; 16]);
        for (l, t) in warp.iter().enumerate() {
            let get = |r: usize| t.regs[r].ok_or_else(|| format!("thread {}: reads a register never written ({})", t.tid, ins.text));
            let (g, q) = (l / 4, 2 * (l % 4));
            for (n, &r) in ar.iter().enumerate() {
                let v = get(r)?;
                let (row, col) = (g + 8 * (n % 2), q + 8 * (n / 2));
                a[row][col] = half(v & 0xffff);
                a[row][col + 1] = half(v >> 16);
            }
            for (n, &r) in br.iter().enumerate() {
                let v = get(r)?;
                b[q + 8 * n][g] = half(v & 0xffff);
                b[q + 8 * n + 1][g] = half(v >> 16);
            }
            for (n, &r) in cr.iter().enumerate() {
                c[g + 8 * (n / 2)][q + n % 2] = f(get(r)?) as f64;
            }
        }
        for (l, t) in warp.iter_mut().enumerate() {
            let (g, q) = (l / 4, 2 * (l % 4));
            for (n, &r) in dr.iter().enumerate() {
                let (row, col) = (g + 8 * (n / 2), q + n % 2);
                let d: f64 = (0..16).map(|k| a[row][k] * b[k][col]).sum::<f64>() + c[row][col];
                t.regs[r] = Some(fb(d as f32));
            }
        }
        Ok(())
    }

    /// The line of each instruction (for reports).
    pub fn lines(&self) -> Vec<usize> {
        self.code.iter().map(|c| c.line).collect()
    }
}
