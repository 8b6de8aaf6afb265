//! The model side: `config.json`, finding and loading checkpoints (local directory, GGUF
//! file or hub; safetensors, PyTorch or GGUF weights), the tokenizer, and one forward
//! pass with neuron access per architecture ([`bert`], [`llama`], [`gpt2`], behind
//! [`LanguageModel`]), built from the shared blocks of [`nn`].

pub mod bert;
pub mod config;
pub mod files;
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod language_model;
pub mod llama;
pub mod load;
pub mod neurons;
pub mod nn;
pub mod random;
pub mod rope;
pub mod tokenizer;

pub use bert::{BertMaskedLm, FfnHook};
pub use config::{Architecture, Config};
pub use files::{ModelFiles, ModelSource, TokenizerFiles, WeightsFile};
pub use language_model::LanguageModel;
pub use load::LoadedModel;
pub use neurons::{ActivationCapture, Neuron, NeuronOp, NeuronPatch};
pub use tokenizer::{EncodedPrompt, MaskTokenizer};

use candle_core::Device;

use crate::error::{Error, Result};

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// CUDA device 0 when this build has CUDA and one is present, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (cpu, cuda, cuda:N or auto)")),
        }
    }
}

impl DeviceChoice {
    /// The candle device, or an error naming the `cuda` feature when this build has none.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            // candle's `cuda_if_available` only asks whether the build has CUDA; a CUDA
            // build on a host without a GPU falls back to the CPU here.
            Self::Auto => Ok(if cfg!(feature = "cuda") {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Device(format!(
                        "--device cuda:{n}: this kn was built without CUDA support; \
                         rebuild with `cargo build --release --features cuda`"
                    )));
                }
                Device::new_cuda(n).map_err(|e| {
                    // candle appends a backtrace when RUST_BACKTRACE is set: the cause is
                    // what the user needs, not candle's stack.
                    let cause = match &e {
                        candle_core::Error::WithBacktrace { inner, .. } => inner.as_ref(),
                        other => other,
                    };
                    let text = cause.to_string();
                    let why = explain_cuda_error(&text)
                        .map(|why| format!(": {why}"))
                        .unwrap_or_default();
                    Error::Device(format!("cannot open CUDA device {n} ({text}){why}"))
                })
            }
        }
    }
}

/// What a CUDA error code means for someone running kn, when kn knows: the driver
/// library is the link-time stub, there is no GPU, the driver is too old, the kernels
/// were built for another GPU generation.
pub fn explain_cuda_error(message: &str) -> Option<&'static str> {
    const KNOWN: &[(&str, &str)] = &[
        (
            "CUDA_ERROR_STUB_LIBRARY",
            "the libcuda.so.1 loaded is the link-time stub, not an NVIDIA driver: this host \
             has no NVIDIA driver (kn's CUDA build needs one for CUDA 13, version 580 or \
             newer), or a stub directory is on LD_LIBRARY_PATH ahead of the driver's",
        ),
        (
            "CUDA_ERROR_NO_DEVICE",
            "the NVIDIA driver sees no GPU (see nvidia-smi, and CUDA_VISIBLE_DEVICES)",
        ),
        (
            "CUDA_ERROR_INVALID_DEVICE",
            "there is no CUDA device of that number (nvidia-smi -L lists them)",
        ),
        (
            "CUDA_ERROR_INSUFFICIENT_DRIVER",
            "the NVIDIA driver is older than CUDA 13 needs (version 580 or newer)",
        ),
        (
            "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
            "the NVIDIA driver is older than CUDA 13 needs (version 580 or newer)",
        ),
        (
            "CUDA_ERROR_NO_BINARY_FOR_GPU",
            "this kn's kernels were compiled for another GPU generation: rebuild with \
             CUDA_COMPUTE_CAP set to this GPU's (nvidia-smi --query-gpu=compute_cap)",
        ),
    ];
    KNOWN
        .iter()
        .find(|(code, _)| message.contains(code))
        .map(|&(_, why)| why)
}
