//! `config.json` of a Hugging Face BERT checkpoint.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// FFN activation function named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` with the error function (`"gelu"`): BERT's.
    GeluErf,
    /// Tanh approximation of GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    /// `max(0, x)`.
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" | "gelu_python" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

/// The fields of `config.json` that the forward pass needs. Unknown fields are ignored;
/// fields real checkpoints sometimes omit take `transformers`' defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Number of transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// FFN width: the number of neurons per layer.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// FFN activation name, e.g. `"gelu"`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest input, in tokens, that the position embeddings cover.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Number of segment (token type) embeddings.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only `"absolute"` is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    /// `model_type`, for messages.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_hidden_size() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_intermediate() -> usize {
    3072
}
fn default_act() -> String {
    "gelu".into()
}
fn default_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Config = serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("not a valid BERT config.json: {e}")))?;
        config
            .validate()
            .map_err(|reason| Error::model(path, reason))?;
        Ok(config)
    }

    /// The FFN activation, checked by [`Config::validate`].
    pub fn activation(&self) -> Activation {
        Activation::parse(&self.hidden_act).unwrap_or(Activation::GeluErf)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks what the forward pass relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(t) = &self.model_type {
            // RoBERTa and friends offset their positions and name their weights
            // differently: refuse them here rather than compute wrong numbers.
            if t != "bert" {
                return Err(format!(
                    "model_type {t:?} is not supported (kn reads BERT checkpoints, model_type \"bert\")"
                ));
            }
        }
        if Activation::parse(&self.hidden_act).is_none() {
            return Err(format!(
                "hidden_act {:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}
