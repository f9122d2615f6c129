//! attnc-autotune: choosing tile sizes and code paths per shape and device.
//!
//! Split as in CubeCL: the *key* (this file: what makes two tuning problems the same), the
//! *search space* pruned by a cost model ([`space`]), the *measurement protocol* with its
//! correctness gate ([`tuner`]), the persistent *cache* ([`cache`]) and the *report*
//! ([`report`]). A key is the kernel's stable structural hash, the shape bucket (dims that
//! change code generation exact, sequence lengths rounded up to powers of two), the dtypes,
//! the backend, the device fingerprint (the backend's: CPU ISA flags, GPU and driver), the
//! compiler version and a checksum of the candidate set, so a change to any of them misses
//! the cache instead of reusing a stale winner. Everything here is generic over the
//! backend ([`attnc_codegen::Backend`]); a backend's search space implements
//! [`space::SearchSpace`] ([`space::cpu`] for the CPU).

pub mod cache;
pub mod report;
pub mod space;
pub mod tuner;

use attnc_ir::{stable_hash, Bindings, Kernel};
use sha2::{Digest, Sha256};

/// Rounds a length up to a power of two (at least 16): lengths in one bucket share a winner.
pub fn bucket_length(n: i64) -> i64 {
    (n.max(16) as u64).next_power_of_two() as i64
}

/// The dims of a bound kernel as a bucket: the query and key lengths (the extents of `i`
/// and `j`) are rounded to powers of two; every other dim (heads, head dims, batch) is exact.
pub fn shape_bucket(k: &Kernel, dims: &Bindings) -> Vec<(String, i64)> {
    let lengths: Vec<&str> = [&k.iter.i, &k.iter.j]
        .into_iter()
        .filter_map(|e| match e {
            attnc_ir::Extent::Dim(d) => Some(d.as_str()),
            attnc_ir::Extent::Fixed(_) => None,
        })
        .collect();
    dims.dims.iter().map(|(d, v)| (d.clone(), if lengths.contains(&d.as_str()) { bucket_length(*v) } else { *v })).collect()
}

/// Everything a tuned winner depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TuneKey {
    pub kernel_hash: String,
    pub bucket: Vec<(String, i64)>,
    pub dtypes: Vec<(String, String)>,
    pub backend: String,
    pub device: String,
    pub compiler: String,
    pub candidates: String,
}

impl TuneKey {
    /// The key for a kernel bound to `dims` on backend `B`'s device, for the named candidate
    /// list.
    pub fn new<B: attnc_codegen::Backend>(backend: &B, k: &Kernel, dims: &Bindings, candidates: &[String]) -> TuneKey {
        TuneKey {
            kernel_hash: stable_hash(k),
            bucket: shape_bucket(k, dims),
            dtypes: k.tensors.iter().map(|t| (t.name.clone(), t.dtype.to_string())).collect(),
            backend: B::NAME.into(),
            device: backend.device(),
            compiler: concat!("attnc ", env!("CARGO_PKG_VERSION")).into(),
            candidates: checksum(candidates),
        }
    }

    /// A stable identifier (hex SHA-256 of the key's canonical text): the same across runs,
    /// processes and machines with the same facts.
    pub fn id(&self) -> String {
        hex(&Sha256::digest(self.canonical().as_bytes()))
    }

    fn canonical(&self) -> String {
        let list = |v: &[(String, String)]| v.iter().map(|(a, b)| format!("{a}={b}")).collect::<Vec<_>>().join(",");
        let bucket: Vec<(String, String)> = self.bucket.iter().map(|(a, b)| (a.clone(), b.to_string())).collect();
        format!(
            "v1\nkernel {}\nbucket {}\ndtypes {}\nbackend {}\ndevice {}\ncompiler {}\ncandidates {}\n",
            self.kernel_hash,
            list(&bucket),
            list(&self.dtypes),
            self.backend,
            self.device,
            self.compiler,
            self.candidates
        )
    }
}

/// Checksum of a candidate list (names in order).
pub fn checksum(candidates: &[String]) -> String {
    hex(&Sha256::digest(candidates.join("\n").as_bytes()))[..16].to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_codegen::cpu::CpuBackend;

    fn kernel() -> Kernel {
        attnc_ir::parse_kernel(
            "(kernel t (dim B) (dim H) (dim N) (dim M) (dim D)
               (input q f32 [B H N D]) (input k f32 [B H M D]) (output o f32 [B H N D])
               (iter (b B) (h H) (i N) (j M) (e D)) (value (load k b h j e)) (out b h i e)
               (branch (score (reduce sum r0 0 $D (* (load q b h i r0) (load k b h j r0)))) (norm (softmax))))",
        )
        .expect("kernel parses")
    }

    fn dims(n: i64, d: i64) -> Bindings {
        Bindings { dims: [("B", 1), ("H", 8), ("N", n), ("M", n), ("D", d)].iter().map(|(a, b)| (a.to_string(), *b)).collect() }
    }

    #[test]
    fn lengths_bucket_to_powers_of_two_and_head_dims_stay_exact() {
        assert_eq!([1, 16, 17, 1000, 1024, 1025].map(bucket_length), [16, 16, 32, 1024, 1024, 2048]);
        let k = kernel();
        let a = TuneKey::new(&CpuBackend::default(), &k, &dims(1000, 64), &["x".into()]);
        let b = TuneKey::new(&CpuBackend::default(), &k, &dims(1024, 64), &["x".into()]);
        assert_eq!(a.id(), b.id(), "N = 1000 and 1024 share a bucket");
        let c = TuneKey::new(&CpuBackend::default(), &k, &dims(1024, 128), &["x".into()]);
        assert_ne!(a.id(), c.id(), "the head dim is exact");
    }

    #[test]
    fn key_is_stable_and_sees_every_part() {
        let k = kernel();
        let base = TuneKey::new(&CpuBackend::default(), &k, &dims(512, 64), &["a".into(), "b".into()]);
        assert_eq!(base.id(), TuneKey::new(&CpuBackend::default(), &k, &dims(512, 64), &["a".into(), "b".into()]).id());
        assert_eq!(base.id().len(), 64);
        // Pinned: a key with fixed facts has this id in every run, process and machine (no
        // DefaultHasher, no addresses); a change here invalidates every cache entry.
        let fixed = TuneKey { device: "cpu:x86_64+avx+avx2+fma".into(), compiler: "attnc 0.1.0".into(), ..base.clone() };
        assert_eq!(fixed.id(), "96f547be83deafd32ab55ac55cdcf84631c29903dbfe13c0f9bc8245d2b1e5e4");
        let mut other = base.clone();
        other.candidates = checksum(&["a".into()]);
        assert_ne!(base.id(), other.id(), "the candidate set is part of the key");
        let mut dev = base.clone();
        dev.device = "cpu:x86_64+avx512f".into();
        assert_ne!(base.id(), dev.id(), "the device is part of the key");
        let mut renamed = k.clone();
        renamed.name = "other".into();
        assert_eq!(TuneKey::new(&CpuBackend::default(), &renamed, &dims(512, 64), &["a".into(), "b".into()]).id(), base.id(), "the kernel's name is not");
    }
}
