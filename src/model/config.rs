//! `config.json` of a Hugging Face checkpoint (BERT, Llama family, GPT-2), read into one
//! [`Config`] whose fields every architecture shares, with each architecture's own
//! defaults and field names (GPT-2's `n_embd`, Llama's `rms_norm_eps`, …).

use std::path::Path;

use serde::Deserialize;

use super::rope::RopeScaling;
use crate::error::{Error, Result};

/// The model families kn reads, chosen from `model_type` (or a GGUF file's
/// `general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT masked language models (`BertForMaskedLM`): the paper's.
    #[default]
    Bert,
    /// Llama-family decoders (Llama 2/3, Mistral, SmolLM; Qwen2 with q/k/v biases):
    /// RMSNorm, rotary positions, grouped-query attention, SwiGLU FFN.
    Llama,
    /// GPT-2 decoders: LayerNorm, learned positions, `gelu_new` FFN, Conv1D weights.
    Gpt2,
}

impl Architecture {
    /// The architecture of a `model_type`, or `None` for one kn does not read.
    pub fn of_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "bert" => Some(Self::Bert),
            "llama" | "mistral" | "qwen2" => Some(Self::Llama),
            "gpt2" => Some(Self::Gpt2),
            _ => None,
        }
    }

    /// Whether the model predicts the next token (its prompts end with `[MASK]`).
    pub fn is_causal(self) -> bool {
        self != Self::Bert
    }

    /// The name used in output records and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Llama => "llama",
            Self::Gpt2 => "gpt2",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// FFN activation function named by `hidden_act` (GPT-2: `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` with the error function (`"gelu"`): BERT's.
    GeluErf,
    /// Tanh approximation of GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`): GPT-2's.
    GeluTanh,
    /// `max(0, x)`.
    Relu,
    /// `x·σ(x)` (`"silu"`, `"swish"`): the gate of Llama's SwiGLU.
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" | "gelu_python" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }
}

/// What the forward passes need from `config.json`, for every architecture. Fields real
/// checkpoints omit take `transformers`' defaults for that architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The model family.
    pub architecture: Architecture,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream (GPT-2: `n_embd`).
    pub hidden_size: usize,
    /// Number of transformer layers (GPT-2: `n_layer`).
    pub num_hidden_layers: usize,
    /// Attention (query) heads per layer (GPT-2: `n_head`).
    pub num_attention_heads: usize,
    /// FFN width: the number of neurons per layer (GPT-2: `n_inner`, default 4·n_embd).
    pub intermediate_size: usize,
    /// FFN activation name, e.g. `"gelu"` (GPT-2: `activation_function`).
    pub hidden_act: String,
    /// Longest input, in tokens, that the positions cover (GPT-2: `n_positions`).
    pub max_position_embeddings: usize,
    /// Number of segment (token type) embeddings (BERT).
    pub type_vocab_size: usize,
    /// Epsilon of the norms: BERT `layer_norm_eps`, GPT-2 `layer_norm_epsilon`, Llama
    /// `rms_norm_eps`.
    pub layer_norm_eps: f64,
    /// Only `"absolute"` is supported (BERT).
    pub position_embedding_type: String,
    /// `model_type` as written, for messages and records.
    pub model_type: Option<String>,
    /// Key/value heads (grouped-query attention; Llama). Equal to the query heads elsewhere.
    pub num_key_value_heads: usize,
    /// Width of one attention head (Llama's `head_dim`; else hidden / heads).
    pub head_dim: usize,
    /// Base of the rotary position frequencies (Llama).
    pub rope_theta: f64,
    /// `rope_scaling` (Llama 3.1+, Qwen2 long context, …): how the rotary frequencies
    /// are stretched; `None` for plain rotary positions (and every other architecture).
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention span in tokens (Mistral's `sliding_window`; Qwen2's
    /// when `use_sliding_window`): prompts no longer than it are exact, longer ones are
    /// refused ([`Config::check_prompt_tokens`]).
    pub sliding_window: Option<usize>,
    /// Whether the output head is the input embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub attention_bias: bool,
    /// Beginning-of-sequence token id, when the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, when the config names one.
    pub eos_token_id: Option<u32>,
}

impl Default for Config {
    /// bert-base's configuration.
    fn default() -> Self {
        Self {
            architecture: Architecture::Bert,
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
            model_type: Some("bert".into()),
            num_key_value_heads: 12,
            head_dim: 64,
            rope_theta: 10000.0,
            rope_scaling: None,
            sliding_window: None,
            tie_word_embeddings: true,
            attention_bias: true,
            bos_token_id: None,
            eos_token_id: None,
        }
    }
}

/// Every field any architecture's `config.json` may carry, all optional: the
/// architecture decides the names it reads and the defaults.
#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    position_embedding_type: Option<String>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rms_norm_eps: Option<f64>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    // GPT-2's names.
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_inner: Option<usize>,
    n_positions: Option<usize>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f64>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    reorder_and_upcast_attn: Option<bool>,
    scale_attn_weights: Option<bool>,
}

/// A token id field: a number, or the first of a list (Llama 3 lists several EOS ids).
fn token_id(value: &Option<serde_json::Value>) -> Option<u32> {
    match value.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        serde_json::Value::Array(a) => a.first()?.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

/// The sliding attention window of a Llama-family `config.json`, as transformers 4.57
/// reads it. Mistral: `sliding_window`, 4096 when absent, none when null. Qwen2: only
/// with `use_sliding_window` true, and only if some layer slides (`layer_types` has a
/// `"sliding_attention"`, or without `layer_types` there are more layers than
/// `max_window_layers`, default 28); the window is `sliding_window`, default 4096.
/// Llama: none.
fn sliding_window(
    value: &serde_json::Value,
    layers: usize,
) -> std::result::Result<Option<usize>, String> {
    let window = match value.get("model_type").and_then(|t| t.as_str()) {
        Some("mistral") => value.get("sliding_window"),
        Some("qwen2") => {
            if value.get("use_sliding_window") != Some(&serde_json::Value::Bool(true)) {
                return Ok(None);
            }
            let slides = match value.get("layer_types").and_then(|t| t.as_array()) {
                Some(types) => types.iter().any(|t| t == "sliding_attention"),
                None => {
                    let full = match value.get("max_window_layers") {
                        None | Some(serde_json::Value::Null) => 28,
                        Some(v) => v.as_u64().ok_or_else(|| {
                            format!("max_window_layers {v} is not a whole number")
                        })?,
                    };
                    layers as u64 > full
                }
            };
            if !slides {
                return Ok(None);
            }
            value.get("sliding_window")
        }
        _ => return Ok(None),
    };
    match window {
        None => Ok(Some(4096)),
        Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&w| w > 0)
            .and_then(|w| usize::try_from(w).ok())
            .map(Some)
            .ok_or_else(|| format!("sliding_window {v} is not a positive whole number")),
    }
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&value).map_err(|reason| Error::model(path, reason))
    }

    /// Builds and validates the configuration from `config.json`'s contents. A missing
    /// `model_type` means BERT (old BERT checkpoints omit it).
    pub fn from_json(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_value(value.clone())
            .map_err(|e| format!("not a valid config.json: {e}"))?;
        let architecture = match raw.model_type.as_deref() {
            None => Architecture::Bert,
            Some(t) => Architecture::of_model_type(t).ok_or_else(|| {
                format!(
                    "model_type {t:?} is not supported (kn reads bert, llama, mistral, qwen2 \
                     and gpt2 checkpoints)"
                )
            })?,
        };
        let config = match architecture {
            Architecture::Bert => Self::bert(raw)?,
            Architecture::Llama => {
                let mut config = Self::llama(raw)?;
                config.sliding_window = sliding_window(value, config.num_hidden_layers)?;
                config
            }
            Architecture::Gpt2 => Self::gpt2(raw)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn bert(raw: RawConfig) -> std::result::Result<Self, String> {
        let d = Self::default();
        let heads = raw.num_attention_heads.unwrap_or(d.num_attention_heads);
        let hidden = raw.hidden_size.unwrap_or(d.hidden_size);
        Ok(Self {
            architecture: Architecture::Bert,
            vocab_size: raw.vocab_size.ok_or("vocab_size is missing")?,
            hidden_size: hidden,
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(d.num_hidden_layers),
            num_attention_heads: heads,
            intermediate_size: raw.intermediate_size.unwrap_or(d.intermediate_size),
            hidden_act: raw.hidden_act.unwrap_or(d.hidden_act),
            max_position_embeddings: raw
                .max_position_embeddings
                .unwrap_or(d.max_position_embeddings),
            type_vocab_size: raw.type_vocab_size.unwrap_or(d.type_vocab_size),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(d.layer_norm_eps),
            position_embedding_type: raw
                .position_embedding_type
                .unwrap_or(d.position_embedding_type),
            model_type: raw.model_type,
            num_key_value_heads: heads,
            head_dim: hidden / heads.max(1),
            rope_theta: d.rope_theta,
            rope_scaling: None,
            sliding_window: None,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            attention_bias: true,
            bos_token_id: None,
            eos_token_id: None,
        })
    }

    fn llama(raw: RawConfig) -> std::result::Result<Self, String> {
        let rope_scaling = RopeScaling::from_json(raw.rope_scaling.as_ref())?;
        if let Some(f) = raw.partial_rotary_factor.filter(|&f| f != 1.0) {
            return Err(format!(
                "partial_rotary_factor {f} is not supported (every head dimension rotates)"
            ));
        }
        let qwen2 = raw.model_type.as_deref() == Some("qwen2");
        let hidden = raw.hidden_size.ok_or("hidden_size is missing")?;
        let heads = raw
            .num_attention_heads
            .ok_or("num_attention_heads is missing")?;
        Ok(Self {
            architecture: Architecture::Llama,
            vocab_size: raw.vocab_size.ok_or("vocab_size is missing")?,
            hidden_size: hidden,
            num_hidden_layers: raw
                .num_hidden_layers
                .ok_or("num_hidden_layers is missing")?,
            num_attention_heads: heads,
            intermediate_size: raw
                .intermediate_size
                .ok_or("intermediate_size is missing")?,
            hidden_act: raw.hidden_act.unwrap_or_else(|| "silu".into()),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            type_vocab_size: 0,
            layer_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            position_embedding_type: "rotary".into(),
            model_type: raw.model_type,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(hidden / heads.max(1)),
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            sliding_window: None,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(qwen2),
            bos_token_id: token_id(&raw.bos_token_id),
            eos_token_id: token_id(&raw.eos_token_id),
        })
    }

    fn gpt2(raw: RawConfig) -> std::result::Result<Self, String> {
        // Variants of GPT-2's attention that kn does not implement: refuse, rather than
        // compute other numbers than the checkpoint's.
        if raw.scale_attn_by_inverse_layer_idx == Some(true) {
            return Err("scale_attn_by_inverse_layer_idx is not supported".into());
        }
        if raw.reorder_and_upcast_attn == Some(true) {
            return Err("reorder_and_upcast_attn is not supported".into());
        }
        if raw.scale_attn_weights == Some(false) {
            return Err("scale_attn_weights false is not supported".into());
        }
        let hidden = raw.n_embd.or(raw.hidden_size).unwrap_or(768);
        let heads = raw.n_head.or(raw.num_attention_heads).unwrap_or(12);
        Ok(Self {
            architecture: Architecture::Gpt2,
            vocab_size: raw.vocab_size.unwrap_or(50257),
            hidden_size: hidden,
            num_hidden_layers: raw.n_layer.or(raw.num_hidden_layers).unwrap_or(12),
            num_attention_heads: heads,
            intermediate_size: raw.n_inner.unwrap_or(4 * hidden),
            hidden_act: raw.activation_function.unwrap_or_else(|| "gelu_new".into()),
            max_position_embeddings: raw.n_positions.unwrap_or(1024),
            type_vocab_size: 0,
            layer_norm_eps: raw.layer_norm_epsilon.unwrap_or(1e-5),
            position_embedding_type: "absolute".into(),
            model_type: raw.model_type,
            num_key_value_heads: heads,
            head_dim: hidden / heads.max(1),
            rope_theta: 10000.0,
            rope_scaling: None,
            sliding_window: None,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            attention_bias: true,
            bos_token_id: token_id(&raw.bos_token_id),
            eos_token_id: token_id(&raw.eos_token_id),
        })
    }

    /// The FFN activation, checked by [`Config::validate`].
    pub fn activation(&self) -> Activation {
        Activation::parse(&self.hidden_act).unwrap_or(Activation::GeluErf)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The longest prompt, in tokens, that the model computes exactly:
    /// `max_position_embeddings` (times the factor with `dynamic` rope scaling), and no
    /// more than the sliding window.
    pub fn max_prompt_tokens(&self) -> usize {
        let positions = match &self.rope_scaling {
            Some(scaling) => scaling.max_tokens(self.max_position_embeddings),
            None => self.max_position_embeddings,
        };
        self.sliding_window
            .map_or(positions, |window| positions.min(window))
    }

    /// Refuses a prompt of `tokens` tokens longer than [`Config::max_prompt_tokens`],
    /// naming the sliding window when that is the limit.
    pub fn check_prompt_tokens(&self, tokens: usize) -> std::result::Result<(), String> {
        let max = self.max_prompt_tokens();
        if tokens <= max {
            return Ok(());
        }
        Err(match self.sliding_window {
            Some(window) if window == max => format!(
                "prompt is {tokens} tokens long, longer than the model's sliding attention \
                 window of {window} tokens (sliding_window), which kn does not implement: \
                 the model takes at most {max}"
            ),
            _ => format!("prompt is {tokens} tokens long; the model takes at most {max}"),
        })
    }

    /// Checks what the forward pass relies on, including sizes no real model has (a
    /// corrupt config must not make kn allocate without bound).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if Activation::parse(&self.hidden_act).is_none() {
            return Err(format!(
                "hidden_act {:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)",
                self.hidden_act
            ));
        }
        match self.architecture {
            Architecture::Bert if self.position_embedding_type != "absolute" => {
                return Err(format!(
                    "position_embedding_type {:?} is not supported (only \"absolute\")",
                    self.position_embedding_type
                ));
            }
            Architecture::Llama if self.activation() != Activation::Silu => {
                return Err(format!(
                    "hidden_act {:?} is not supported for a Llama-family model (silu)",
                    self.hidden_act
                ));
            }
            _ => {}
        }
        const LIMIT: usize = 1 << 24;
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
            if value > LIMIT {
                return Err(format!(
                    "{name} {value} is larger than any model kn can load"
                ));
            }
        }
        if self.architecture != Architecture::Llama
            && !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.architecture == Architecture::Llama && !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for rotary positions",
                self.head_dim
            ));
        }
        if matches!(self.rope_scaling, Some(RopeScaling::Dynamic { .. })) && self.head_dim <= 2 {
            return Err(format!(
                "head_dim {} is too small for dynamic rope scaling (its base exponent is \
                 d/(d-2))",
                self.head_dim
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(format!("norm epsilon {} is not valid", self.layer_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} is not valid", self.rope_theta));
        }
        Ok(())
    }

    /// The configuration as a Hugging Face `config.json` of its architecture (what an
    /// edited model directory converted from a GGUF file carries).
    pub fn to_json(&self) -> serde_json::Value {
        match self.architecture {
            Architecture::Bert => serde_json::json!({
                "model_type": "bert",
                "architectures": ["BertForMaskedLM"],
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "intermediate_size": self.intermediate_size,
                "hidden_act": self.hidden_act,
                "max_position_embeddings": self.max_position_embeddings,
                "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.layer_norm_eps,
                "position_embedding_type": self.position_embedding_type,
            }),
            Architecture::Llama => {
                let qwen2 = self.model_type.as_deref() == Some("qwen2");
                let (model_type, class) = match self.model_type.as_deref() {
                    Some("qwen2") => ("qwen2", "Qwen2ForCausalLM"),
                    Some("mistral") => ("mistral", "MistralForCausalLM"),
                    _ => ("llama", "LlamaForCausalLM"),
                };
                serde_json::json!({
                    "model_type": model_type,
                    "architectures": [class],
                    "vocab_size": self.vocab_size,
                    "hidden_size": self.hidden_size,
                    "num_hidden_layers": self.num_hidden_layers,
                    "num_attention_heads": self.num_attention_heads,
                    "num_key_value_heads": self.num_key_value_heads,
                    "head_dim": self.head_dim,
                    "intermediate_size": self.intermediate_size,
                    "hidden_act": self.hidden_act,
                    "max_position_embeddings": self.max_position_embeddings,
                    "rms_norm_eps": self.layer_norm_eps,
                    "rope_theta": self.rope_theta,
                    "rope_scaling": self.rope_scaling.as_ref().map(RopeScaling::to_json),
                    "sliding_window": self.sliding_window,
                    "use_sliding_window": qwen2 && self.sliding_window.is_some(),
                    // Qwen2: the window on every layer, as kn reads it.
                    "max_window_layers": 0,
                    "tie_word_embeddings": self.tie_word_embeddings,
                    "attention_bias": self.attention_bias,
                    "bos_token_id": self.bos_token_id,
                    "eos_token_id": self.eos_token_id,
                    "torch_dtype": "float32",
                })
            }
            Architecture::Gpt2 => serde_json::json!({
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "vocab_size": self.vocab_size,
                "n_embd": self.hidden_size,
                "n_layer": self.num_hidden_layers,
                "n_head": self.num_attention_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "activation_function": self.hidden_act,
                "layer_norm_epsilon": self.layer_norm_eps,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_architecture_reads_its_own_names_and_defaults() {
        let gpt2 = Config::from_json(&serde_json::json!({
            "model_type": "gpt2", "vocab_size": 300, "n_embd": 32, "n_layer": 3, "n_head": 4,
            "n_inner": null, "n_positions": 64
        }))
        .unwrap();
        assert_eq!(gpt2.architecture, Architecture::Gpt2);
        assert_eq!(
            (
                gpt2.hidden_size,
                gpt2.num_hidden_layers,
                gpt2.intermediate_size
            ),
            (32, 3, 128)
        );
        assert_eq!(
            (gpt2.activation(), gpt2.layer_norm_eps),
            (Activation::GeluTanh, 1e-5)
        );
        assert!(gpt2.tie_word_embeddings);
        let llama = Config::from_json(&serde_json::json!({
            "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "intermediate_size": 1536, "rms_norm_eps": 1e-5, "rope_theta": 100000,
            "tie_word_embeddings": true, "eos_token_id": [2, 3]
        }))
        .unwrap();
        assert_eq!((llama.head_dim(), llama.num_key_value_heads), (64, 3));
        assert_eq!((llama.layer_norm_eps, llama.rope_theta), (1e-5, 1e5));
        assert_eq!((llama.eos_token_id, llama.attention_bias), (Some(2), false));
        let qwen = Config::from_json(&serde_json::json!({
            "model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 4
        }))
        .unwrap();
        assert!(qwen.attention_bias && !qwen.tie_word_embeddings);
        // A config written back reads as the same configuration.
        for config in [gpt2, llama, qwen, Config::default()] {
            assert_eq!(Config::from_json(&config.to_json()).unwrap(), config);
        }
    }

    /// Llama 3.2's rope_scaling is read (and written back); Mistral's and Qwen2's
    /// sliding windows as transformers 4.57 reads them, and prompts longer than the
    /// window are refused naming it.
    #[test]
    fn rope_scaling_and_sliding_windows() {
        let base = |extra: serde_json::Value| {
            let mut v = serde_json::json!({
                "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 4, "max_position_embeddings": 64,
            });
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            Config::from_json(&v).unwrap()
        };
        let llama = base(serde_json::json!({"model_type": "llama", "rope_scaling": {
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        }}));
        assert_eq!(
            llama.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        assert_eq!(
            (llama.sliding_window, llama.max_prompt_tokens()),
            (None, 64)
        );
        let dynamic = base(serde_json::json!({"model_type": "llama",
            "rope_scaling": {"type": "dynamic", "factor": 2.0}}));
        assert_eq!(dynamic.max_prompt_tokens(), 128);
        // Mistral: 4096 when absent, none when null.
        let windows = [
            (serde_json::json!({"model_type": "mistral"}), Some(4096)),
            (
                serde_json::json!({"model_type": "mistral", "sliding_window": null}),
                None,
            ),
            (
                serde_json::json!({"model_type": "mistral", "sliding_window": 32}),
                Some(32),
            ),
            (
                serde_json::json!({"model_type": "llama", "sliding_window": 32}),
                None,
            ),
            (
                serde_json::json!({"model_type": "qwen2", "sliding_window": 32}),
                None,
            ),
            // Qwen2: the first max_window_layers layers attend fully (default 28).
            (
                serde_json::json!({"model_type": "qwen2", "use_sliding_window": true,
                                "sliding_window": 32}),
                None,
            ),
            (
                serde_json::json!({"model_type": "qwen2", "use_sliding_window": true,
                                "sliding_window": 32, "max_window_layers": 1}),
                Some(32),
            ),
            (
                serde_json::json!({"model_type": "qwen2", "use_sliding_window": true,
                                "sliding_window": 32,
                                "layer_types": ["full_attention", "sliding_attention"]}),
                Some(32),
            ),
        ];
        for (extra, window) in windows {
            let config = base(extra.clone());
            assert_eq!(config.sliding_window, window, "{extra}");
            assert_eq!(
                Config::from_json(&config.to_json()).unwrap(),
                config,
                "{extra}"
            );
        }
        let mistral = base(serde_json::json!({"model_type": "mistral", "sliding_window": 32}));
        assert_eq!(mistral.max_prompt_tokens(), 32);
        assert_eq!(mistral.check_prompt_tokens(32), Ok(()));
        let err = mistral.check_prompt_tokens(33).unwrap_err();
        assert!(
            err.contains("prompt is 33 tokens long")
                && err.contains("sliding attention window of 32 tokens (sliding_window)"),
            "{err}"
        );
        assert_eq!(
            llama.check_prompt_tokens(65).unwrap_err(),
            "prompt is 65 tokens long; the model takes at most 64"
        );
        for config in [llama, dynamic] {
            assert_eq!(Config::from_json(&config.to_json()).unwrap(), config);
        }
    }

    #[test]
    fn unsupported_and_absurd_configs_are_refused_with_the_reason() {
        let refused = |v: serde_json::Value| Config::from_json(&v).unwrap_err();
        assert!(
            refused(serde_json::json!({"model_type": "falcon", "vocab_size": 3}))
                .contains("\"falcon\"")
        );
        for (scaling, name) in [
            (
                serde_json::json!({"rope_type": "longrope", "factor": 8.0}),
                "\"longrope\"",
            ),
            (serde_json::json!({"type": "su", "factor": 8.0}), "\"su\""),
        ] {
            let err = refused(serde_json::json!({
                "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 4,
                "rope_scaling": scaling
            }));
            assert!(
                err.contains(&format!(
                    "rope_scaling type {name} in config.json is not supported"
                )),
                "{err}"
            );
        }
        assert!(refused(serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 4, "partial_rotary_factor": 0.5
        }))
        .contains("partial_rotary_factor 0.5"));
        assert!(refused(serde_json::json!({
            "model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 4, "sliding_window": -3
        }))
        .contains("sliding_window -3"));
        assert!(refused(serde_json::json!({
            "model_type": "gpt2", "vocab_size": 10, "n_embd": 1099511627776u64
        }))
        .contains("larger than any model"));
        assert!(refused(serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 3, "num_key_value_heads": 2, "intermediate_size": 4
        }))
        .contains("num_key_value_heads"));
        assert!(
            refused(serde_json::json!({"model_type": "gpt2", "n_embd": "wide"}))
                .contains("config.json")
        );
    }
}
