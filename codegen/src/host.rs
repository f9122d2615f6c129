//! Host-side pieces every backend's runtime needs: inputs in storage form ([`Storage`]),
//! the argument layout of a kernel (dims, tensor extents and strides: [`ArgLayout`]), the
//! checks made before a launch ([`check_divisors`]), the split of a derived tensor into
//! parallel tasks ([`derive_split`]) and the data a run-time tile classifier reads
//! ([`TensorData`]), and the index-bounds check a runtime makes before it launches
//! ([`BoundsCheck`]). Addresses are the backend's own (a CPU pointer, a GPU binding).

use attnc_ir::reference::Tensor;
use attnc_ir::{Bindings, Kernel, TensorDecl, TensorDef, TensorKind};
use std::collections::BTreeMap;

/// Inputs in storage form: f32 bits for float tensors, i32 for integer ones.
#[derive(Clone, Debug)]
pub struct Storage {
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub bufs: BTreeMap<String, Vec<u32>>,
}

impl Storage {
    /// Rounds f64 values to the storage type of each declared input.
    pub fn from_f64(k: &Kernel, inputs: &BTreeMap<String, Tensor>) -> Storage {
        let mut st = Storage { shapes: BTreeMap::new(), bufs: BTreeMap::new() };
        for (name, t) in inputs {
            let int = k.tensor(name).is_some_and(|d| d.dtype.is_int());
            let data = if int { t.data.iter().map(|x| (*x as i32) as u32).collect() } else { t.data.iter().map(|x| (*x as f32).to_bits()).collect() };
            st.shapes.insert(name.clone(), t.shape.clone());
            st.bufs.insert(name.clone(), data);
        }
        st
    }
}

impl Storage {
    /// The buffers borrowed.
    pub fn view(&self) -> Inputs<'_> {
        Inputs { shapes: self.shapes.clone(), bufs: self.bufs.iter().map(|(n, b)| (n.clone(), b.as_slice())).collect() }
    }
}

/// Inputs in storage form (f32 bits, i32), borrowed: a caller's arrays, read in place.
#[derive(Clone, Debug, Default)]
pub struct Inputs<'a> {
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub bufs: BTreeMap<String, &'a [u32]>,
}

impl Inputs<'_> {
    /// Every declared input has a buffer holding exactly its elements (so the kernels never
    /// read past one).
    pub fn check(&self, k: &Kernel, dims: &Bindings) -> Result<(), RunError> {
        for t in k.inputs() {
            let want: usize = dims.shape(t).iter().product();
            match self.bufs.get(&t.name) {
                None => return Err(RunError::Input { name: t.name.clone(), why: "no data given".into() }),
                Some(b) if b.len() != want => {
                    return Err(RunError::Input { name: t.name.clone(), why: format!("{} values for a shape of {want}", b.len()) });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] attnc_ir::BindError),
    #[error("input `{name}`: {why}")]
    Input { name: String, why: String },
    #[error("{0}")]
    Divisor(String),
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
    #[error(transparent)]
    Bounds(#[from] attnc_passes::bounds::BoundsError),
    /// The device (a GPU adapter) refused or cannot hold the run.
    #[error("{0}")]
    Device(String),
    #[error("cannot build the thread pool: {0}")]
    Threads(String),
    #[error("this run needs about {} ({what}), more than the {} {limit_from}", bytes(*needed), bytes(*limit))]
    Memory { needed: u128, what: String, limit: u128, limit_from: String },
    /// What this backend or this kernel does not do (yet).
    #[error("{0}")]
    Unsupported(String),
}

/// `1.5 GiB`.
pub fn bytes(n: u128) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

/// Parses `8G`, `512M`, `64K` or a number of bytes (binary units).
pub fn parse_bytes(s: &str) -> Result<u128, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => {
            let unit = match c.to_ascii_uppercase() {
                'K' => 1u128 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("`{s}`: the unit is K, M, G or T")),
            };
            (&t[..at], unit)
        }
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 8G, 512M, 1000000)"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("`{s}` is not a positive size"));
    }
    Ok((n * mul as f64) as u128)
}

/// How much memory a run may use: `$ATTNC_MAX_MEMORY` (`8G`, `512M`, bytes; what the CLI's
/// `--max-memory` sets), else the memory the system has available (`MemAvailable` on
/// Linux); `None` where neither is known. With where it came from.
pub fn memory_limit() -> Option<(u128, String)> {
    if let Ok(v) = std::env::var("ATTNC_MAX_MEMORY") {
        if let Ok(n) = parse_bytes(&v) {
            return Some((n, format!("allowed by ATTNC_MAX_MEMORY / --max-memory ({v})")));
        }
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u128 = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some((kib * 1024, "available on this machine".to_string()))
}

/// Whether some branch masks pairs: only then does a matmul over whole key tiles multiply a
/// value by a weight the reference leaves out (a masked pair's zero). Without a mask every
/// pair's product is in the reference's sum too, so a NaN or an infinity among the values
/// reaches the same rows either way, and [`values_finite`] need not run (a decode step skips
/// a pass over its values).
pub fn masks_pairs(k: &Kernel) -> bool {
    k.branches.iter().any(|b| b.mask.is_some())
}

/// The value tensors whose finiteness a matmul over whole key tiles depends on
/// ([`values_finite`]): those of [`value_tensors`] where [`masks_pairs`], else none.
pub fn masked_value_tensors(k: &Kernel) -> Vec<String> {
    if masks_pairs(k) {
        value_tensors(k)
    } else {
        Vec::new()
    }
}

/// The float tensors the value expression reads (inputs or derived).
pub fn value_tensors(k: &Kernel) -> Vec<String> {
    let mut names = Vec::new();
    k.value.walk(&mut |e| {
        if let attnc_ir::Expr::Load(t, _) = e {
            if !names.contains(t) && k.tensor(t).is_some_and(|d| !d.dtype.is_int()) {
                names.push(t.clone());
            }
        }
    });
    names
}

/// How many shapes a per-shape cache keeps (the tile classes of static masks, the sorted
/// token orders): a call at another shape when this many are kept starts the cache over, so
/// a run over many sequence lengths does not pile them up.
pub const SHAPES_KEPT: usize = 8;

/// The entry for `key` in a per-shape cache of at most [`SHAPES_KEPT`] keys, made (from
/// `V::default()`) after clearing the cache when it is full and `key` is not in it.
pub fn shape_entry<K: Ord, V: Default>(cache: &mut BTreeMap<K, V>, key: K) -> &mut V {
    if cache.len() >= SHAPES_KEPT && !cache.contains_key(&key) {
        cache.clear();
    }
    cache.entry(key).or_default()
}

/// Whether every value the kernel aggregates is finite. A tiled kernel multiplies every value
/// of a key tile by its weight, zero for a masked pair, so a NaN or an infinity at a masked
/// key would reach rows the reference keeps it from (0 · NaN is NaN); a call where this is
/// false runs the row kernel, which skips masked pairs. (The chunked forms sum only the
/// pairs their masks keep, within a chunk and across chunks, and need no such check.)
/// The values are scanned in parallel, in blocks without an early exit (so the test
/// vectorizes): a small share of a call even when attention itself is sparse.
pub fn values_finite(names: &[String], bufs: &BTreeMap<String, &[u32]>) -> bool {
    use rayon::prelude::*;
    names.iter().all(|n| bufs.get(n).is_none_or(|b| b.par_chunks(1 << 16).all(finite_bits)))
}

/// Whether no f32 (as bits) in `w` is a NaN or an infinity (all exponent bits set): the
/// largest magnitude's bits are below infinity's. With AVX2 where the host has it (the
/// build's baseline x86-64 has no unsigned 32-bit max: SSE2 takes four instructions per
/// four values, AVX2 two per eight).
fn finite_bits(w: &[u32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the host has AVX2.
        return unsafe { finite_bits_avx2(w) };
    }
    finite_bits_any(w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn finite_bits_avx2(w: &[u32]) -> bool {
    finite_bits_any(w)
}

#[inline(always)]
fn finite_bits_any(w: &[u32]) -> bool {
    w.iter().fold(0u32, |m, x| m.max(x & 0x7fff_ffff)) < 0x7f80_0000
}

/// Refuses a run whose estimate (`parts`: what and bytes) exceeds [`memory_limit`].
pub fn check_memory(parts: &[(&str, u128)]) -> Result<(), RunError> {
    let needed: u128 = parts.iter().map(|p| p.1).sum();
    // Small runs skip reading the system's figures (a decode step's call stays cheap).
    if needed < 64 << 20 && std::env::var_os("ATTNC_MAX_MEMORY").is_none() {
        return Ok(());
    }
    let Some((limit, limit_from)) = memory_limit() else { return Ok(()) };
    if needed <= limit {
        return Ok(());
    }
    let mut big: Vec<&(&str, u128)> = parts.iter().filter(|p| p.1 > 0).collect();
    big.sort_by_key(|p| std::cmp::Reverse(p.1));
    let what = big.iter().take(3).map(|(w, n)| format!("{w} {}", bytes(*n))).collect::<Vec<_>>().join(", ");
    Err(RunError::Memory { needed, what, limit, limit_from })
}

/// Slots of a kernel's argument table: every dim's value, and for every tensor its base
/// address, extents and strides (in elements, row-major). The CPU passes the table as an
/// `i64` array (the `frame`); a GPU backend puts the same values in a uniform buffer and
/// the addresses in its bindings.
#[derive(Clone, Debug)]
pub struct ArgLayout {
    pub dims: BTreeMap<String, usize>,
    pub tensors: BTreeMap<String, TensorSlots>,
    /// The slot of the saved statistics' address (`[B, H, N, branches]` f32, contiguous; 0:
    /// not saved), when the backend writes them ([`ArgLayout::with_stats`]).
    pub stats: Option<usize>,
    /// The slot of a flag (nonzero: yes) telling the tiled CPU kernel that each task's
    /// workspace is followed by room to keep first-pass softmax weights
    /// ([`crate::schedule::BoundTiled::keep_weights`]), when the backend reads one.
    pub kept: Option<usize>,
    pub len: usize,
}

#[derive(Clone, Debug)]
pub struct TensorSlots {
    pub base: usize,
    pub ext: Vec<usize>,
    pub stride: Vec<usize>,
    pub is_int: bool,
}

impl ArgLayout {
    pub fn new(k: &Kernel) -> ArgLayout {
        let mut n = 0;
        let mut next = || {
            n += 1;
            n - 1
        };
        let dims = k.dims.iter().map(|d| (d.name.clone(), next())).collect();
        let mut tensors = BTreeMap::new();
        for t in &k.tensors {
            let base = next();
            let ext = t.shape.iter().map(|_| next()).collect();
            let stride = t.shape.iter().map(|_| next()).collect();
            tensors.insert(t.name.clone(), TensorSlots { base, ext, stride, is_int: t.dtype.is_int() });
        }
        ArgLayout { dims, tensors, stats: None, kept: None, len: n }
    }

    /// The layout with one more slot: the saved statistics' address (0 in [`ArgLayout::fill`]'s
    /// table: the kernel saves nothing unless the caller sets it).
    pub fn with_stats(mut self) -> ArgLayout {
        self.stats = Some(self.len);
        self.len += 1;
        self
    }

    /// The layout with one more slot: the kept-weights flag (0 in [`ArgLayout::fill`]'s table).
    pub fn with_kept(mut self) -> ArgLayout {
        self.kept = Some(self.len);
        self.len += 1;
        self
    }

    /// The table at bound dims, each tensor's base slot holding `base(tensor)`.
    pub fn fill(&self, k: &Kernel, dims: &Bindings, base: &mut dyn FnMut(&TensorDecl) -> i64) -> Vec<i64> {
        let mut table = vec![0i64; self.len];
        for (d, slot) in &self.dims {
            table[*slot] = dims.dims[d];
        }
        for t in &k.tensors {
            let slots = &self.tensors[&t.name];
            let shape = dims.shape(t);
            table[slots.base] = base(t);
            let mut stride = 1i64;
            for a in (0..shape.len()).rev() {
                table[slots.ext[a]] = shape[a] as i64;
                table[slots.stride[a]] = stride;
                stride *= shape[a] as i64;
            }
        }
        table
    }
}

/// What every runtime establishes before it launches anything: the dims bound from the
/// inputs' shapes (each input holding exactly its elements, the output buffer its size), no
/// zero divisor, the schedule at those dims, and the index bounds checked (`per_call_bounds`:
/// the check still needs the data of the index tensors).
pub struct RunStart {
    pub dims: Bindings,
    pub bound: crate::schedule::Bound,
    pub per_call_bounds: bool,
}

impl RunStart {
    /// `source`: the kernel the bounds are checked on (the spec as written, else `k`).
    pub fn new(
        k: &Kernel,
        s: &crate::schedule::Schedule,
        st: &Inputs,
        explicit: &BTreeMap<String, i64>,
        out_len: usize,
        bounds: &BoundsCheck,
        source: &Kernel,
    ) -> Result<RunStart, RunError> {
        let dims = attnc_ir::bind(k, &st.shapes, explicit)?;
        st.check(k, &dims)?;
        let want: usize = dims.shape(k.output()).iter().product();
        if out_len != want {
            return Err(RunError::Input { name: k.output().name.clone(), why: format!("the output buffer holds {out_len} values, the output has {want}") });
        }
        check_divisors(k, &dims)?;
        let bound = s.bind(k, &dims)?;
        let per_call_bounds = bounds.before(source, &dims)?;
        Ok(RunStart { dims, bound, per_call_bounds })
    }
}

/// Integer divisors are dim expressions (E0008); a zero one would be a run-time fault.
pub fn check_divisors(k: &Kernel, dims: &Bindings) -> Result<(), RunError> {
    let mut err = None;
    for (label, e) in k.exprs() {
        e.walk(&mut |x| {
            if let attnc_ir::Expr::Binary(attnc_ir::BinOp::FloorDiv | attnc_ir::BinOp::Mod, _, d) = x {
                if d.free_vars().is_empty() && d.loads().is_empty() {
                    if let Ok(0) = attnc_ir::bind::eval_dims(d, &dims.dims) {
                        err.get_or_insert(format!("{label}: the divisor `{}` is 0 for these dims", attnc_ir::pretty::infix(d)));
                    }
                }
            }
        });
    }
    match err {
        Some(e) => Err(RunError::Divisor(e)),
        None => Ok(()),
    }
}

/// How a derived tensor's computation splits into parallel tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeriveSplit {
    /// One task (a scalar, or a prefix sum along the first axis).
    Whole,
    /// Ranges of the first axis.
    FirstAxis,
    /// Ranges of the first two axes flattened (`x0 · ext1 + x1`; rank ≥ 2, no prefix sum
    /// along either), so a tensor whose first axis is short (B = 1) still splits.
    FirstTwo,
}

/// The split of derived tensor `t`.
pub fn derive_split(t: &TensorDecl) -> DeriveSplit {
    match &t.kind {
        TensorKind::Derived { def: TensorDef::Cumsum { axis: 0, .. }, .. } => DeriveSplit::Whole,
        TensorKind::Derived { vars, .. } if vars.is_empty() => DeriveSplit::Whole,
        TensorKind::Derived { vars, def } if vars.len() >= 2 && !matches!(def, TensorDef::Cumsum { axis: 1, .. }) => DeriveSplit::FirstTwo,
        _ => DeriveSplit::FirstAxis,
    }
}

/// The tasks of derived tensor `t` at `shape`: half-open ranges over the split's index
/// space (about 64 of them).
pub fn derive_tasks(t: &TensorDecl, shape: &[usize]) -> Vec<(i64, i64)> {
    let first = shape.first().copied().unwrap_or(1) as i64;
    let n = match derive_split(t) {
        DeriveSplit::Whole => return vec![(0, first)],
        DeriveSplit::FirstAxis => first,
        DeriveSplit::FirstTwo => first * shape[1] as i64,
    };
    let step = (n / 64).max(1);
    (0..(n + step - 1) / step).map(|c| (c * step, ((c + 1) * step).min(n))).collect()
}

/// Tensors as f64, for the run-time analyses: the masks' tensors for the tile classifier
/// ([`tile_classes`]), the index tensors for the bounds check ([`BoundsCheck::with_data`]).
pub struct TensorData {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f64>, bool)>,
}

impl TensorData {
    /// The named tensors from storage-form buffers (f32 or i32 bits), those `bufs` holds.
    pub fn new<'n>(k: &Kernel, dims: &Bindings, bufs: &BTreeMap<String, &[u32]>, names: impl IntoIterator<Item = &'n String>) -> TensorData {
        let mut tensors = BTreeMap::new();
        for name in names {
            // A tensor without a buffer here (a derived tensor that lives on a device) is
            // left out: the analyses then know nothing of its values.
            let (Some(t), Some(buf)) = (k.tensor(name), bufs.get(name)) else { continue };
            let vals: Vec<f64> =
                if t.dtype.is_int() { buf.iter().map(|x| *x as i32 as f64).collect() } else { buf.iter().map(|x| f32::from_bits(*x) as f64).collect() };
            tensors.insert(t.name.clone(), (dims.shape(t), vals, t.dtype.is_int()));
        }
        TensorData { tensors }
    }

    /// The classifier's view (boxes of up to 2^14 elements are read exactly).
    pub fn oracle(&self) -> attnc_passes::tiles::DataOracle<'_> {
        attnc_passes::tiles::DataOracle::new(self.tensors.iter().map(|(n, (s, v, i))| (n.clone(), (s.as_slice(), v.as_slice(), *i))).collect(), 1 << 14)
    }
}

/// The tile classes of kernel `k` at `grid` (`nb` batches, `nh` heads) as every runtime gets
/// them: from the masks alone (kept per shape), or from the tensors the masks read, here in
/// `bufs` (the last table is reused while those tensors hold the same values).
pub fn tile_classes(
    classifier: &crate::schedule::classes::TileClassifier,
    k: &Kernel,
    grid: &crate::schedule::classes::TileGrid,
    nb: i64,
    nh: i64,
    dims: &Bindings,
    bufs: &BTreeMap<String, &[u32]>,
) -> crate::schedule::classes::TileClassTable {
    let names: std::collections::BTreeSet<String> = k.branches.iter().flat_map(|b| b.mask.iter().flat_map(|m| m.loads())).collect();
    if names.is_empty() {
        return classifier.table(k, grid, nb, nh, &dims.dims, &attnc_passes::interval::NoData);
    }
    let data: Vec<(&str, &[u32])> = names.iter().filter_map(|n| bufs.get(n).map(|b| (n.as_str(), *b))).collect();
    classifier.with_data(grid, nb, nh, &dims.dims, &data, &mut |c| {
        let data = TensorData::new(k, dims, bufs, &names);
        c.table(k, grid, nb, nh, &dims.dims, &data.oracle())
    })
}

/// The bounds check of `attnc_passes::bounds` as a runtime runs it, on the kernel whose
/// meaning counts: the spec as written when the runtime was given it
/// ([`crate::Compiled::checking`]; a pass may evaluate a hoisted reduction at rows the spec
/// never reads, which the kernels clamp harmlessly), else the compiled kernel. Once per shape
/// when no index reads data; else at every call, once the derived tensors are computed and
/// before the attention part runs (nothing is written before it passes).
#[derive(Default)]
pub struct BoundsCheck {
    passed: std::sync::Mutex<std::collections::BTreeSet<BTreeMap<String, i64>>>,
}

impl BoundsCheck {
    /// Before anything runs: the whole check when it needs no data (cached per shape).
    /// Returns whether the per-call check ([`BoundsCheck::with_data`]) is still needed.
    pub fn before(&self, k: &Kernel, dims: &Bindings) -> Result<bool, RunError> {
        if attnc_passes::bounds::reads_data(k) {
            return Ok(true);
        }
        if self.passed.lock().expect("bounds lock").contains(&dims.dims) {
            return Ok(false);
        }
        attnc_passes::bounds::check(k, dims, &attnc_passes::interval::NoData)?;
        self.passed.lock().expect("bounds lock").insert(dims.dims.clone());
        Ok(false)
    }

    /// The check with the data of the tensors its indices read (`bufs`: inputs and the
    /// derived tensors, computed).
    pub fn with_data(k: &Kernel, dims: &Bindings, bufs: &BTreeMap<String, &[u32]>) -> Result<(), RunError> {
        let names: std::collections::BTreeSet<String> = attnc_passes::bounds::data_tensors(k).into_iter().filter(|n| bufs.contains_key(n)).collect();
        let data = TensorData::new(k, dims, bufs, &names);
        Ok(attnc_passes::bounds::check(k, dims, &attnc_passes::bounds::Bounded::new(data.oracle()))?)
    }
}

/// An input a GPU backend keeps at 2 bytes per element (f16, bf16): [`pack_halves`] lays it
/// out.
pub fn half_width(t: &TensorDecl) -> bool {
    t.kind == TensorKind::Input && matches!(t.dtype, attnc_ir::DType::F16 | attnc_ir::DType::BF16)
}

/// Threads (or invocations) a derive pass of a tensor of `shape` needs: one per element, or
/// one per line along the axis a prefix sum walks.
pub fn derive_lines(shape: &[usize], lines_axis: Option<usize>) -> u64 {
    shape.iter().enumerate().filter(|(a, _)| Some(*a) != lines_axis).map(|(_, &x)| x as u64).product()
}

/// f32 bits of an f16 or bf16 input (exact: its values are of that type) as halves, two to
/// a word, the even element in the low half: the device layout of half-width inputs (a
/// little-endian array of 16-bit elements).
pub fn pack_halves(dtype: attnc_ir::DType, data: &[u32]) -> Vec<u32> {
    let half = |w: u32| -> u32 {
        let x = f32::from_bits(w);
        match dtype {
            attnc_ir::DType::BF16 => half::bf16::from_f32(x).to_bits() as u32,
            _ => half::f16::from_f32(x).to_bits() as u32,
        }
    };
    data.chunks(2).map(|p| half(p[0]) | p.get(1).map_or(0, |&w| half(w) << 16)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_tensors_split_as_before() {
        let k = attnc_ir::parse_kernel(
            "(kernel t (dim B) (dim H) (dim N) (dim D)
               (input q f32 [B H N D]) (input a f32 [B H N])
               (tensor L f32 [B H N] (x y t) (cumsum 2 (load a x y t)))
               (tensor C f32 [B H N] (x y t) (cumsum 0 (load a x y t)))
               (tensor R f32 [B] (x) (map (load a x 0 0)))
               (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j N) (e D)) (value (load q b h j e)) (out b h i e)
               (branch (score (load L b h i)) (norm (softmax))))",
        )
        .expect("kernel");
        let t = |n: &str| k.tensor(n).unwrap().clone();
        assert_eq!(derive_split(&t("L")), DeriveSplit::FirstTwo);
        assert_eq!(derive_split(&t("C")), DeriveSplit::Whole);
        assert_eq!(derive_split(&t("R")), DeriveSplit::FirstAxis);
        assert_eq!(derive_tasks(&t("L"), &[1, 8, 100]), (0..8).map(|h| (h, h + 1)).collect::<Vec<_>>());
        assert_eq!(derive_tasks(&t("C"), &[3, 8, 100]), vec![(0, 3)]);
        let r = derive_tasks(&t("R"), &[200]);
        assert_eq!((r.len(), r[0], *r.last().unwrap()), (67, (0, 3), (198, 200)));
    }

    #[test]
    fn values_finite_finds_any_nan_or_infinity() {
        // Longer than a parallel block (2^16) and not a multiple of it.
        let n = (1 << 17) + 37;
        let finite: Vec<u32> = (0..n).map(|x| (x as f32 * 1e30 - 3e35).to_bits()).collect();
        let names = vec!["v".to_string(), "w".to_string()];
        let ok = BTreeMap::from([("v".to_string(), finite.as_slice())]);
        assert!(values_finite(&names, &ok), "finite values (and a tensor without a buffer)");
        for at in [0, 1023, 1024, 1 << 16, n - 1] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                let mut v = finite.clone();
                v[at] = bad.to_bits();
                let b = BTreeMap::from([("v".to_string(), finite.as_slice()), ("w".to_string(), v.as_slice())]);
                assert!(!values_finite(&names, &b), "{bad} at {at}");
            }
        }
        let edge: Vec<u32> = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 0.0, -0.0, 1e-45].iter().map(|x| x.to_bits()).collect();
        assert!(values_finite(&names, &BTreeMap::from([("v".to_string(), edge.as_slice())])));
    }
}
