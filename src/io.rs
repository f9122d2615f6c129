//! Tensors in and out of safetensors files, by the names the spec declares.

use anyhow::{bail, Context, Result};
use attnc_ir::reference::Tensor;
use attnc_ir::{DType, Kernel};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

/// Reads every input the kernel declares from a safetensors file. Float inputs accept
/// f32, f16, bf16 or f64 data (values are kept exactly); integer inputs accept i32 or i64.
/// Extra tensors in the file are ignored.
pub fn read_inputs(path: &Path, kernel: &Kernel) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for t in kernel.inputs() {
        let Ok(view) = st.tensor(&t.name) else {
            let shape: Vec<String> = t.shape.iter().map(|e| e.to_string()).collect();
            let mut have: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
            have.sort();
            bail!(
                "input tensor `{}` is missing from {} (expected {} with shape [{}]; the file has: {})",
                t.name,
                path.display(),
                t.dtype,
                shape.join(", "),
                if have.is_empty() { "nothing".to_string() } else { have.join(", ") }
            );
        };
        let data = decode(&view, t.dtype).with_context(|| format!("input `{}`", t.name))?;
        out.insert(t.name.clone(), Tensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Reads the float tensor `name` of shape `shape` from a safetensors file (f32, f16, bf16 or
/// f64 data), e.g. the cotangent of a spec's output.
pub fn read_float(path: &Path, name: &str, shape: &[usize]) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let Ok(view) = st.tensor(name) else {
        let mut have: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        have.sort();
        bail!(
            "tensor `{name}` is missing from {} (expected shape {shape:?}; the file has: {})",
            path.display(),
            if have.is_empty() { "nothing".to_string() } else { have.join(", ") }
        );
    };
    if view.shape() != shape {
        bail!("`{name}` in {} has shape {:?}; expected {shape:?}", path.display(), view.shape());
    }
    let data = decode(&view, DType::F32).with_context(|| format!("`{name}` in {}", path.display()))?;
    Ok(Tensor::new(shape.to_vec(), data))
}

fn decode(view: &TensorView, want: DType) -> Result<Vec<f64>> {
    let b = view.data();
    let d = view.dtype();
    let chunks = |n: usize| b.chunks_exact(n);
    Ok(match (want.is_int(), d) {
        (false, Dtype::F32) => chunks(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64).collect(),
        (false, Dtype::F64) => chunks(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        (false, Dtype::F16) => chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        (false, Dtype::BF16) => chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        (true, Dtype::I32) => chunks(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64).collect(),
        (true, Dtype::I64) => {
            // Integer tensors are i32 in kernels: a value outside that range is refused, not wrapped.
            let mut out = Vec::with_capacity(b.len() / 8);
            for (n, c) in chunks(8).enumerate() {
                let x = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                if i32::try_from(x).is_err() {
                    bail!("element {n} is {x}, outside the i32 range kernels compute in");
                }
                out.push(x as f64);
            }
            out
        }
        (int, other) => {
            bail!("has dtype {} but the spec declares {} (accepted: {})", dtype_name(other), want, if int { "i32, i64" } else { "f32, f16, bf16, f64" })
        }
    })
}

/// Encodes f64 values as the given dtype (round to nearest).
pub fn encode(data: &[f64], dtype: DType) -> (Dtype, Vec<u8>) {
    match dtype {
        DType::F32 => (Dtype::F32, data.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect()),
        DType::F16 => (Dtype::F16, data.iter().flat_map(|x| half::f16::from_f64(*x).to_le_bytes()).collect()),
        DType::BF16 => (Dtype::BF16, data.iter().flat_map(|x| half::bf16::from_f64(*x).to_le_bytes()).collect()),
        DType::I32 => (Dtype::I32, data.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect()),
    }
}

/// Writes named tensors, each in the given dtype.
pub fn write(path: &Path, tensors: &[(String, DType, &Tensor)]) -> Result<()> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, t)| {
            let (dt, bytes) = encode(&t.data, *d);
            (n.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, dt, shape, bytes)| Ok((n.clone(), TensorView::new(*dt, shape.clone(), bytes)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    if path.is_dir() {
        bail!("cannot write {}: it is a directory", path.display());
    }
    // Written next to the target under a hidden name, then renamed: a reader never sees half
    // a file, and a failure leaves the target as it was and no temporary file behind.
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = safetensors::tensor::serialize_to_file(views, None, &tmp)
        .map_err(|e| root_cause(&e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if let Err(why) = result {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {why}", path.display());
    }
    Ok(())
}

/// The innermost cause of an error (the OS error, said once).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
