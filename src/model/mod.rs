//! The model side: `config.json`, finding and loading checkpoints (local directory, GGUF
//! file or hub; safetensors, PyTorch or GGUF weights), the tokenizer, and one forward
//! pass with neuron access per architecture ([`bert`], [`llama`], [`gpt2`], behind
//! [`LanguageModel`]), built from the shared blocks of [`nn`].

pub mod bert;
pub mod config;
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod language_model;
pub mod llama;
pub mod load;
pub mod neurons;
pub mod nn;
pub mod random;
pub mod tokenizer;

pub use bert::{BertMaskedLm, FfnHook};
pub use config::{Architecture, Config};
pub use language_model::LanguageModel;
pub use load::{LoadedModel, ModelFiles, ModelSource, TokenizerFiles, WeightsFile};
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
            Self::Auto => {
                if cfg!(feature = "cuda") {
                    Ok(Device::cuda_if_available(0)?)
                } else {
                    Ok(Device::Cpu)
                }
            }
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Device(format!(
                        "--device cuda:{n}: this kn was built without CUDA support; \
                         rebuild with `cargo build --release --features cuda`"
                    )));
                }
                Device::new_cuda(n)
                    .map_err(|e| Error::Device(format!("cannot open CUDA device {n}: {e}")))
            }
        }
    }
}
