//! The model: a native Llama-family decoder on tch ops, its Hugging Face
//! checkpoint loader, and device / dtype selection.

mod cpu_attention;
mod cpu_decode;
mod cpu_matmul;
mod cpu_ops;
mod embedding;
mod hf_config;
mod int8;
pub(crate) mod kv_element;
mod llama;
mod projection;
pub mod quality;
mod quantization;
mod rope;
mod upload;
mod vec_exp;
mod weights;

pub use hf_config::{GenerationConfig, HfConfig};
pub use llama::{Llama, LoadOptions};
pub use projection::Projection;
pub use quantization::Quantization;
pub use upload::upload;

use tch::{Device, Kind};

/// Whether `t` is a contiguous float32 CPU tensor, whose elements are one
/// plain slice (what the CPU decode step and the fused CPU ops read).
pub(crate) fn is_cpu_f32(t: &tch::Tensor) -> bool {
    is_cpu_of(t, Kind::Float)
}

/// Whether `t` is a contiguous CPU tensor of `kind`, whose elements are one
/// plain slice of that dtype's Rust type.
pub(crate) fn is_cpu_of(t: &tch::Tensor, kind: Kind) -> bool {
    t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous()
}

/// A contiguous float32 CPU tensor's elements, where it is one.
pub(crate) fn floats(t: &tch::Tensor) -> Option<&[f32]> {
    is_cpu_f32(t).then(|| {
        // SAFETY: a contiguous float32 CPU tensor of numel elements,
        // borrowed for as long as the tensor.
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) }
    })
}

/// Bytes a tensor's elements take.
fn tensor_bytes(t: &tch::Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Where a model runs, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when available, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got {other:?}")),
        }
    }

    /// Whether the model runs on the CPU (`cpu`, or `auto` without CUDA).
    pub fn is_cpu(self, cuda_available: bool) -> bool {
        self == Self::Cpu || (self == Self::Auto && !cuda_available)
    }

    /// The tch device, checking that CUDA devices exist.
    pub fn resolve(self) -> Result<Device, String> {
        match self {
            Self::Auto if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Self::Auto | Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                let count = tch::Cuda::device_count() as usize;
                if n < count {
                    Ok(Device::Cuda(n))
                } else {
                    Err(format!(
                        "cuda:{n} requested but {count} CUDA device(s) are available"
                    ))
                }
            }
        }
    }
}

/// Parses a dtype name as used in Hugging Face configs.
pub fn parse_dtype(s: &str) -> Result<Kind, String> {
    match s {
        "float32" | "f32" | "fp32" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "f16" | "fp16" | "half" => Ok(Kind::Half),
        other => Err(format!(
            "expected float32, bfloat16 or float16, got {other:?}"
        )),
    }
}

/// The dtype a KV cache stores its elements in, for a `kv_cache_dtype`
/// setting and the model's dtype: `auto` is the model's.
pub fn kv_cache_kind(setting: &str, model: Kind) -> Result<Kind, String> {
    match setting {
        "auto" => Ok(model),
        other => parse_dtype(other)
            .map_err(|_| format!("expected auto, float32, float16 or bfloat16, got {other:?}")),
    }
}

/// The name of a dtype, as reported by ListModels.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "other",
    }
}

/// The name of a device, as reported by ListModels.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}

/// Makes CUDA visible to libtorch. The linker drops `libtorch_cuda.so` from
/// the binary's dependencies (nothing references it directly), so without
/// loading it by hand `tch::Cuda::is_available()` is false even on a GPU
/// machine. Skipped where no NVIDIA driver is present; failure just means CPU.
pub fn load_cuda_runtime() -> bool {
    if !std::path::Path::new("/proc/driver/nvidia").exists()
        && !std::path::Path::new("/dev/nvidiactl").exists()
    {
        return false;
    }
    // SAFETY: dlopen with a NUL-terminated constant name; the handle is
    // intentionally leaked so the library stays loaded for the process.
    let handle = unsafe {
        libc::dlopen(
            c"libtorch_cuda.so".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_GLOBAL,
        )
    };
    !handle.is_null()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_parses() {
        assert_eq!(DeviceChoice::parse("cuda:1"), Ok(DeviceChoice::Cuda(1)));
        assert_eq!(DeviceChoice::parse("cuda"), Ok(DeviceChoice::Cuda(0)));
        assert!(DeviceChoice::parse("tpu").unwrap_err().contains("tpu"));
    }

    #[test]
    fn dtype_parses() {
        assert_eq!(parse_dtype("bf16"), Ok(Kind::BFloat16));
        assert!(parse_dtype("int8").is_err());
        assert_eq!(kv_cache_kind("auto", Kind::BFloat16), Ok(Kind::BFloat16));
        assert_eq!(kv_cache_kind("float16", Kind::Float), Ok(Kind::Half));
        let err = kv_cache_kind("fp8", Kind::Float).unwrap_err();
        assert!(err.contains("auto") && err.contains("\"fp8\""), "{err}");
    }
}
