//! The WebGPU backend: WGSL compute shaders, validated by naga, run by wgpu.
//!
//! It runs the schedule's **tiled kernel** ([`Algorithm::Tiled`], see `emit/tiled.rs`): a
//! workgroup per query tile, the separable dot as a matmul over operands staged in
//! workgroup memory a channel chunk at a time (the schedule's
//! [`crate::schedule::workspace::STAGED`] layout), the normalization state in registers;
//! and the **row kernel** ([`Algorithm::Rows`]), the form every spec has, for the specs
//! without a separable dot and when `tiled` is off: a workgroup per query row `(b, h, i)`; per key tile of `workgroup` keys each
//! invocation evaluates one key's mask, score, bias and decay into workgroup memory, the
//! workgroup then folds the tile into the branch's normalization state (online softmax with
//! the reference's semantics: fully masked rows give zeros, NaN propagates, the maximum is
//! subtracted so logits of 1e4 do not overflow), and every invocation accumulates its own
//! output channels. A masked branch reads its key tiles' classes from the schedule's
//! [`crate::schedule::classes`] (per `block_q` query rows × `workgroup` keys, computed on the
//! host: once per shape for static masks, per call from the inputs for masks that read them,
//! all partial for masks that read derived tensors): an empty tile is skipped, a full one
//! runs no mask. Derived tensors are compute passes before it (a prefix sum walks its axis
//! per line). Both kernels read tile classes per `block_q` rows (the tiled kernel's key tiles
//! are `block_k` keys, the row kernel's `workgroup`). The chunked form, classes computed on
//! the device, f16 storage and subgroups are not written yet: [`WgslBackend::check_options`]
//! refuses a schedule that asks for the chunked form, with that reason.
//!
//! Layout (no pointers, no i64 in WGSL): dims, extents and strides in a uniform buffer (the
//! backend-neutral [`crate::host::ArgLayout`], as i32), inputs in one read-only storage
//! buffer, derived tensors and the output in one read-write storage buffer, each tensor at an
//! offset the uniform holds. Integer arithmetic is 32-bit (the runtime refuses shapes whose
//! sizes or offsets do not fit); tensor indices are clamped into range as on the CPU.

mod emit;
mod runtime;

use crate::schedule::{Algorithm, Limits, Schedule, ScheduleOptions};
use crate::{Backend, BackendOptions, CodegenError, Tolerance};
use attnc_ir::{Kernel, KernelInfo};

pub use emit::{chunked_slices, emit, tiled_slices, tiled_values, Entry, WgslArtifact, MAX_CHUNKED_FEATURES, MAX_WGSL_CHUNK};

/// The WGSL backend's options: the schedule's and the workgroup shape.
#[derive(Clone, Debug, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WgslOptions {
    #[serde(flatten)]
    pub schedule: ScheduleOptions,
    /// Invocations per workgroup (a power of two, 8 to 256). The tiled kernel runs
    /// `workgroup / block_q` of them per query row; the row kernel's key tiles have
    /// `workgroup` keys, and its `block_q` is the number of query rows that share one row of
    /// tile classes (fewer: finer classes, more host work per shape).
    pub workgroup: u32,
    /// Output channels each invocation accumulates: the row kernel holds
    /// `workgroup × channels` channels (Dv) at most, the tiled kernel
    /// `channels × block_q × 16 / workgroup` ([`tiled_values`]).
    pub channels: u32,
}

impl Default for WgslOptions {
    fn default() -> Self {
        WgslOptions { schedule: ScheduleOptions { tiled: true, chunk: 0, block_q: 16, block_k: 16, permute: true }, workgroup: 256, channels: 8 }
    }
}

impl BackendOptions for WgslOptions {
    fn schedule(&self) -> &ScheduleOptions {
        &self.schedule
    }
    fn schedule_mut(&mut self) -> &mut ScheduleOptions {
        &mut self.schedule
    }
    fn describe(&self) -> String {
        let s = &self.schedule;
        let chunked = if s.chunk > 0 { format!("chunked ({} keys) for linear attention, else ", s.chunk) } else { String::new() };
        if s.tiled {
            format!(
                "{chunked}tiled {}x{} where the spec tiles (else rows), workgroup {}, {} channels per invocation",
                s.block_q, s.block_k, self.workgroup, self.channels
            )
        } else {
            format!("{chunked}row kernel, workgroup {}, {} channels per invocation, tile classes per {} rows", self.workgroup, self.channels, s.block_q)
        }
    }
}

/// The WebGPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct WgslBackend;

impl WgslBackend {
    /// Invocations per workgroup the adapter takes (256, WebGPU's minimum, without one).
    pub fn max_invocations(&self) -> u32 {
        runtime::gpu().map_or(256, |g| g.limits.max_compute_invocations_per_workgroup.min(g.limits.max_compute_workgroup_size_x))
    }
}

/// Workgroup memory WebGPU guarantees every adapter has.
pub const WORKGROUP_BYTES: usize = 16 << 10;

impl Backend for WgslBackend {
    const NAME: &'static str = "wgsl";
    type Options = WgslOptions;
    type Artifact = WgslArtifact;
    type Kernel = runtime::WgslKernel;

    fn available(&self) -> Result<(), String> {
        runtime::gpu().map(|_| ())
    }

    fn device(&self) -> String {
        match runtime::gpu() {
            Ok(g) => g.fingerprint(),
            Err(_) => "wgsl:no-adapter".into(),
        }
    }

    fn limits(&self) -> Limits {
        Limits { task_workspace_bytes: WORKGROUP_BYTES, staged_tiles: true }
    }

    /// WGSL's `exp` is within `3 + 2|x|` ULP and its `pow` is `exp2(y·log2 x)`: a little
    /// looser than the CPU's libm.
    fn tolerance(&self) -> Tolerance {
        Tolerance { atol: 5e-4, rtol: 5e-3 }
    }

    fn check_options(&self, o: &WgslOptions) -> Result<(), String> {
        if !(8..=256).contains(&o.workgroup) || !o.workgroup.is_power_of_two() {
            return Err(format!("the workgroup size must be a power of two from 8 to 256 (got {})", o.workgroup));
        }
        if !(1..=32).contains(&o.channels) {
            return Err(format!("channels per invocation must be 1 to 32 (got {})", o.channels));
        }
        if o.schedule.chunk > MAX_WGSL_CHUNK {
            return Err(format!("the chunked WGSL kernel takes at most {MAX_WGSL_CHUNK} keys per chunk (got {})", o.schedule.chunk));
        }
        if o.schedule.tiled {
            emit::check_tiled(o)?;
        }
        Ok(())
    }

    fn emit(&self, k: &Kernel, _info: &KernelInfo, s: &Schedule, o: &WgslOptions) -> Result<WgslArtifact, CodegenError> {
        match s.algorithm {
            Algorithm::Rows | Algorithm::Tiled(_) | Algorithm::Chunked(_) => emit::emit(k, s, o),
        }
    }

    fn validate(&self, a: &WgslArtifact) -> Result<(), CodegenError> {
        validate(&a.source).map(|_| ())
    }

    fn load(&self, a: WgslArtifact) -> Result<Self::Kernel, CodegenError> {
        runtime::WgslKernel::load(a)
    }

    fn describe(&self, s: &Schedule, o: &WgslOptions) -> String {
        format!("{s}, workgroup {}", o.workgroup)
    }
}

/// naga's parser and validator on WGSL source; errors carry the source span, rendered.
pub fn validate(src: &str) -> Result<naga::Module, CodegenError> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| CodegenError::Invalid(format!("WGSL does not parse:\n{}", e.emit_to_string(src))))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .map_err(|e| CodegenError::Invalid(format!("WGSL does not validate:\n{}", e.emit_to_string(src))))?;
    Ok(module)
}
