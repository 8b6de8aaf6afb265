//! The `general.*` and `{arch}.*` metadata, typed and with errors naming the key, and
//! the hyperparameters as a Hugging Face `config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use crate::error::{Error, Result};

/// Typed access to candle's metadata map, with errors naming the key.
pub(super) struct Meta<'a> {
    pub(super) map: &'a HashMap<String, Value>,
    pub(super) path: &'a Path,
}

impl Meta<'_> {
    pub(super) fn err(&self, reason: String) -> Error {
        Error::model(self.path, reason)
    }

    pub(super) fn missing(&self, key: &str) -> Error {
        self.err(format!("GGUF metadata key {key} is missing"))
    }

    pub(super) fn wrong(&self, key: &str, expected: &str, v: &Value) -> Error {
        self.err(format!(
            "GGUF metadata {key} is a {:?}, expected {expected}",
            v.value_type()
        ))
    }

    pub(super) fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n = match *v {
            Value::U8(x) => Some(u64::from(x)),
            Value::U16(x) => Some(u64::from(x)),
            Value::U32(x) => Some(u64::from(x)),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => return Err(self.wrong(key, "an integer", v)),
        };
        n.map(Some)
            .ok_or_else(|| self.err(format!("GGUF metadata {key} is negative")))
    }

    /// A count or size: an integer of at most 2^32, so that products of two fit.
    pub(super) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.u64_opt(key)? {
            None => Ok(None),
            Some(n) if n <= 1 << 32 => Ok(Some(n as usize)),
            Some(n) => Err(self.err(format!("GGUF metadata {key} is {n}, implausibly large"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float, as the shortest decimal that reads back as the stored value (an f32
    /// `1e-5` is 1e-5, not 9.99999974738e-06).
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(f64::from(*x)))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.wrong(key, "a float", v)),
        }
    }

    fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.missing(key))
    }

    /// A norm's epsilon: finite and not negative (NaN or infinity would make every
    /// activation NaN without an error).
    fn eps_req(&self, key: &str) -> Result<f64> {
        let eps = self.f64_req(key)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(self.err(format!(
                "{key} is {eps}: a norm's epsilon must be a finite number ≥ 0"
            )));
        }
        Ok(eps)
    }

    pub(super) fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }

    fn string_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub(super) fn string_req(&self, key: &str) -> Result<&str> {
        self.string_opt(key)?.ok_or_else(|| self.missing(key))
    }

    pub(super) fn array_opt(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "an array", v)),
        }
    }

    pub(super) fn strings_opt(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(a) = self.array_opt(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(self.wrong(key, "an array of strings", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// The architecture families kn reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arch {
    Llama,
    Qwen2,
    Gpt2,
}

/// The hyperparameters, from `{arch}.*` metadata.
pub(super) struct Hparams {
    pub(super) hidden: usize,
    pub(super) ffn: usize,
    pub(super) n_layer: usize,
    pub(super) n_head: usize,
    pub(super) n_kv_head: usize,
    pub(super) head_dim: usize,
    eps: f64,
    pub(super) rope_theta: f64,
    /// config.json's `rope_scaling` object, from `{arch}.rope.scaling.*`.
    pub(super) rope_scaling: Option<serde_json::Value>,
    pub(super) context: usize,
}

impl Hparams {
    pub(super) fn read(meta: &Meta<'_>, arch: Arch, name: &str) -> Result<Self> {
        let key = |k: &str| format!("{name}.{k}");
        let hidden = meta.usize_req(&key("embedding_length"))?;
        let ffn = meta.usize_req(&key("feed_forward_length"))?;
        let n_layer = meta.usize_req(&key("block_count"))?;
        let n_head = meta.usize_req(&key("attention.head_count"))?;
        let context = meta.usize_req(&key("context_length"))?;
        let positive = |v: usize, k: &str| {
            if v == 0 {
                Err(meta.err(format!("GGUF metadata {} is 0", key(k))))
            } else {
                Ok(v)
            }
        };
        positive(hidden, "embedding_length")?;
        positive(ffn, "feed_forward_length")?;
        positive(n_layer, "block_count")?;
        positive(n_head, "attention.head_count")?;
        if arch == Arch::Gpt2 {
            let eps = meta.eps_req(&key("attention.layer_norm_epsilon"))?;
            if hidden % n_head != 0 {
                return Err(meta.err(format!(
                    "{} {hidden} is not a multiple of {} {n_head}",
                    key("embedding_length"),
                    key("attention.head_count")
                )));
            }
            return Ok(Self {
                hidden,
                ffn,
                n_layer,
                n_head,
                n_kv_head: n_head,
                head_dim: hidden / n_head,
                eps,
                rope_theta: 0.0,
                rope_scaling: None,
                context,
            });
        }
        let n_kv_head = meta
            .usize_opt(&key("attention.head_count_kv"))?
            .unwrap_or(n_head);
        positive(n_kv_head, "attention.head_count_kv")?;
        if n_head % n_kv_head != 0 {
            return Err(meta.err(format!(
                "{} {n_head} is not a multiple of {} {n_kv_head}",
                key("attention.head_count"),
                key("attention.head_count_kv")
            )));
        }
        let head_dim = match meta.usize_opt(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden % n_head == 0 => hidden / n_head,
            None => {
                return Err(meta.err(format!(
                    "{} {hidden} is not a multiple of {} {n_head} and {} is missing",
                    key("embedding_length"),
                    key("attention.head_count"),
                    key("attention.key_length")
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(meta.err(format!(
                "head dimension {head_dim} is not even, as rotary embeddings need"
            )));
        }
        if let Some(v) = meta.usize_opt(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(meta.err(format!(
                    "{} {v} differs from the key length {head_dim}, which kn does not support",
                    key("attention.value_length")
                )));
            }
        }
        if let Some(d) = meta.usize_opt(&key("rope.dimension_count"))? {
            if d != head_dim {
                return Err(meta.err(format!(
                    "{} is {d}, not the head dimension {head_dim}: partial rotary embeddings \
                     are not supported",
                    key("rope.dimension_count")
                )));
            }
        }
        let rope_scaling = Self::rope_scaling(meta, name)?;
        let eps = meta.eps_req(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = meta.f64_opt(&key("rope.freq_base"))?.unwrap_or(10000.0);
        Ok(Self {
            hidden,
            ffn,
            n_layer,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            rope_theta,
            rope_scaling,
            context,
        })
    }

    /// config.json's `rope_scaling` from llama.cpp's `{arch}.rope.scaling.type`,
    /// `.factor` and `.original_context_length` (what convert_hf_to_gguf.py writes):
    /// `linear` (factor), `yarn` (factor, original context; transformers' default
    /// betas), `none` or no type with a factor of 0 or 1 (none). Any other type, or
    /// llama.cpp's YaRN tuning keys, are refused.
    fn rope_scaling(meta: &Meta<'_>, name: &str) -> Result<Option<serde_json::Value>> {
        let key = |k: &str| format!("{name}.rope.scaling.{k}");
        let factor = meta.f64_opt(&key("factor"))?;
        let kind = meta.string_opt(&key("type"))?.unwrap_or("none");
        let positive_factor = || -> Result<f64> {
            match factor {
                Some(f) if f.is_finite() && f > 0.0 => Ok(f),
                Some(f) => Err(meta.err(format!("GGUF metadata {} is {f}", key("factor")))),
                None => Err(meta.err(format!("GGUF metadata {} is missing", key("factor")))),
            }
        };
        match kind {
            "none" => match factor {
                Some(f) if f != 0.0 && f != 1.0 => Err(meta.err(format!(
                    "{} is {f} with no {}: rope scaling of unknown type",
                    key("factor"),
                    key("type")
                ))),
                _ => Ok(None),
            },
            "linear" => Ok(Some(
                json!({"rope_type": "linear", "factor": positive_factor()?}),
            )),
            "yarn" => {
                for tuning in ["attn_factor", "yarn_log_multiplier", "yarn_ext_factor"] {
                    if meta.f64_opt(&key(tuning))?.is_some() {
                        return Err(meta.err(format!(
                            "{} is set: llama.cpp's YaRN tuning is not supported (kn reads \
                             GGUF yarn as transformers' yarn with its default parameters)",
                            key(tuning)
                        )));
                    }
                }
                let mut scaling = json!({"rope_type": "yarn", "factor": positive_factor()?});
                if let Some(n) = meta.usize_opt(&key("original_context_length"))? {
                    scaling["original_max_position_embeddings"] = json!(n);
                }
                Ok(Some(scaling))
            }
            other => Err(meta.err(format!(
                "{} is {other:?}: rope scaling of this type is not supported (kn reads linear \
                 and yarn from GGUF metadata)",
                key("type")
            ))),
        }
    }

    /// The Hugging Face config.json; `q_bias`: the file has a q projection bias.
    pub(super) fn config(
        &self,
        arch: Arch,
        vocab_size: usize,
        tied: bool,
        (bos, eos): (Option<u32>, Option<u32>),
        q_bias: bool,
    ) -> serde_json::Value {
        match arch {
            Arch::Gpt2 => json!({
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "vocab_size": vocab_size,
                "n_embd": self.hidden,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_inner": self.ffn,
                "n_positions": self.context,
                "layer_norm_epsilon": self.eps,
                "activation_function": "gelu_new",
                "tie_word_embeddings": tied,
                "bos_token_id": bos,
                "eos_token_id": eos,
                "torch_dtype": "float32",
            }),
            Arch::Llama | Arch::Qwen2 => {
                let (model_type, class) = if arch == Arch::Llama {
                    ("llama", "LlamaForCausalLM")
                } else {
                    ("qwen2", "Qwen2ForCausalLM")
                };
                let attention_bias = arch == Arch::Qwen2 || q_bias;
                json!({
                    "model_type": model_type,
                    "architectures": [class],
                    "vocab_size": vocab_size,
                    "hidden_size": self.hidden,
                    "intermediate_size": self.ffn,
                    "num_hidden_layers": self.n_layer,
                    "num_attention_heads": self.n_head,
                    "num_key_value_heads": self.n_kv_head,
                    "head_dim": self.head_dim,
                    "rms_norm_eps": self.eps,
                    "rope_theta": self.rope_theta,
                    "rope_scaling": self.rope_scaling,
                    "max_position_embeddings": self.context,
                    "tie_word_embeddings": tied,
                    "bos_token_id": bos,
                    "eos_token_id": eos,
                    "hidden_act": "silu",
                    "attention_bias": attention_bias,
                    "torch_dtype": "float32",
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_files::*;

    /// A change to a valid file's spec.
    type Edit = Box<dyn Fn(&mut Spec)>;

    #[test]
    fn gguf_errors_name_the_key_architecture_model_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, _) = llama_spec(32, 32, 1, true);
        let fresh = || Spec {
            meta: base.meta.clone(),
            tensors: base
                .tensors
                .iter()
                .map(|(n, t)| {
                    let data = t.dequantize(&Device::Cpu).expect("dequantize");
                    (
                        n.clone(),
                        QTensor::quantize(&data, t.dtype()).expect("quantize"),
                    )
                })
                .collect(),
        };
        let cases: Vec<(&str, Edit, &str)> = vec![
            ("no-layers", Box::new(|s| s.remove("llama.block_count")), "llama.block_count is missing"),
            ("no-eps", Box::new(|s| s.remove("llama.attention.layer_norm_rms_epsilon")), "llama.attention.layer_norm_rms_epsilon is missing"),
            ("nan-eps", Box::new(|s| s.set("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::NAN))), "llama.attention.layer_norm_rms_epsilon is NaN"),
            ("inf-eps", Box::new(|s| s.set("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::INFINITY))), "llama.attention.layer_norm_rms_epsilon is inf"),
            ("no-tokens", Box::new(|s| s.remove("tokenizer.ggml.tokens")), "tokenizer.ggml.tokens is missing"),
            ("no-arch", Box::new(|s| s.remove("general.architecture")), "general.architecture is missing"),
            ("falcon", Box::new(|s| s.set("general.architecture", Value::String("falcon".into()))), "GGUF architecture \"falcon\" is not supported (llama, qwen2, gpt2)"),
            ("bert-vocab", Box::new(|s| s.set("tokenizer.ggml.model", Value::String("bert".into()))), "GGUF tokenizer model \"bert\""),
            ("longrope", Box::new(|s| s.set("llama.rope.scaling.type", Value::String("longrope".into()))), "llama.rope.scaling.type is \"longrope\""),
            ("yarn-no-factor", Box::new(|s| s.set("llama.rope.scaling.type", Value::String("yarn".into()))), "llama.rope.scaling.factor is missing"),
            ("yarn-tuned", Box::new(|s| {
                s.set("llama.rope.scaling.type", Value::String("yarn".into()));
                s.set("llama.rope.scaling.factor", Value::F32(4.0));
                s.set("llama.rope.scaling.attn_factor", Value::F32(1.1));
            }), "llama.rope.scaling.attn_factor is set"),
            ("factor-no-type", Box::new(|s| s.set("llama.rope.scaling.factor", Value::F32(4.0))), "rope scaling of unknown type"),
            ("heads-type", Box::new(|s| s.set("llama.attention.head_count", Value::String("2".into()))), "llama.attention.head_count"),
            ("rope-freqs", Box::new(|s| {
                let t = Tensor::ones(8, DType::F32, &Device::Cpu).expect("ones");
                s.tensor("rope_freqs.weight", &t, GgmlDType::F32)
            }), "tensor rope_freqs.weight holds per-frequency rotary factors"),
            ("bad-shape", Box::new(|s| {
                let t = Tensor::ones((32, 64), DType::F32, &Device::Cpu).expect("ones");
                s.tensor("blk.0.ffn_up.weight", &t, GgmlDType::F32)
            }), "tensor blk.0.ffn_up.weight (model.layers.0.mlp.up_proj.weight) has shape [32, 64], expected [32, 32]"),
            ("missing-tensor", Box::new(|s| s.tensors.retain(|(n, _)| n != "blk.0.ffn_gate.weight")), "tensor blk.0.ffn_gate.weight is missing"),
            ("extra-layer", Box::new(|s| {
                let t = Tensor::ones(32, DType::F32, &Device::Cpu).expect("ones");
                s.tensor("blk.1.attn_norm.weight", &t, GgmlDType::F32)
            }), "tensor blk.1.attn_norm.weight is not one kn knows"),
            ("vocab", Box::new(|s| {
                s.set("tokenizer.ggml.tokens", strings(&TOKENS[..20]));
                s.set("tokenizer.ggml.merges", strings(&MERGES[..9]));
                s.set("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); 20]));
            }), "token_embd.weight has 24 rows but tokenizer.ggml.tokens has 20 tokens"),
        ];
        for (name, edit, want) in cases {
            let mut spec = fresh();
            edit(&mut spec);
            let path = spec.write(dir.path(), &format!("{name}.gguf"));
            let err = err_of(&path);
            assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
            assert!(err.contains(&path.display().to_string()), "{name}: {err:?}");
        }
    }

    /// llama.cpp's rope scaling metadata becomes config.json's rope_scaling: linear with
    /// its factor, yarn with its factor and original context; a model loads with it.
    #[test]
    fn gguf_rope_scaling_metadata_becomes_rope_scaling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spec, _) = llama_spec(64, 96, 2, false);
        spec.set("llama.rope.scaling.type", Value::String("linear".into()));
        spec.set("llama.rope.scaling.factor", Value::F32(4.0));
        let ck = read(&spec.write(dir.path(), "linear.gguf")).expect("read");
        assert_eq!(
            ck.config["rope_scaling"],
            json!({"rope_type": "linear", "factor": 4.0})
        );
        let config = crate::model::Config::from_json(&ck.config).expect("config");
        assert_eq!(
            config.rope_scaling,
            Some(crate::model::rope::RopeScaling::Linear { factor: 4.0 })
        );
        let (mut spec, _) = llama_spec(64, 96, 2, false);
        spec.set("llama.rope.scaling.type", Value::String("yarn".into()));
        spec.set("llama.rope.scaling.factor", Value::F32(8.0));
        spec.set("llama.rope.scaling.original_context_length", Value::U32(16));
        let ck = read(&spec.write(dir.path(), "yarn.gguf")).expect("read");
        assert_eq!(
            ck.config["rope_scaling"],
            json!({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16})
        );
        let config = crate::model::Config::from_json(&ck.config).expect("config");
        assert_eq!(config.rope_scaling.as_ref().map(|s| s.name()), Some("yarn"));
        let (mut spec, _) = llama_spec(64, 96, 2, false);
        spec.set("llama.rope.scaling.type", Value::String("none".into()));
        let ck = read(&spec.write(dir.path(), "none.gguf")).expect("read");
        assert!(ck.config["rope_scaling"].is_null());
    }
}
