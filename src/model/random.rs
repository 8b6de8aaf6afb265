//! Random checkpoints with real shapes: for tests (tiny models in every weight-name
//! layout a real checkpoint uses) and benchmarks (bert-base shapes without a download).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::Config;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// How a checkpoint names and ties its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `bert.` before encoder names, as `BertForMaskedLM` saves them.
    pub bert_prefix: bool,
    /// TF-era LayerNorm names `gamma`/`beta` instead of `weight`/`bias`.
    pub gamma_beta: bool,
    /// Write `cls.predictions.decoder.weight` (a copy of the word embeddings) instead of
    /// leaving it tied.
    pub explicit_decoder: bool,
    /// Name the decoder bias `cls.predictions.decoder.bias` instead of `cls.predictions.bias`.
    pub decoder_bias: bool,
}

impl Default for Layout {
    /// `BertForMaskedLM.save_pretrained`'s layout.
    fn default() -> Self {
        Self {
            bert_prefix: true,
            gamma_beta: false,
            explicit_decoder: false,
            decoder_bias: false,
        }
    }
}

/// Deterministic normal samples: the same seed gives the same weights on every machine.
struct Normal(SplitMix64);

impl Normal {
    fn tensor(&mut self, shape: &[usize], mean: f32, std: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| mean + std * self.0.normal() as f32)
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// Random weights for `cfg`, named as `layout` says. Matrices have standard deviation
/// `std`; LayerNorm scales are near 1.
pub fn random_tensors(
    cfg: &Config,
    layout: Layout,
    seed: u64,
    std: f32,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = Normal(SplitMix64::new(seed));
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let enc = if layout.bert_prefix { "bert." } else { "" };
    let (ln_w, ln_b) = if layout.gamma_beta {
        ("gamma", "beta")
    } else {
        ("weight", "bias")
    };
    let mut out = HashMap::new();
    let word = rng.tensor(&[v, h], 0.0, std)?;
    if layout.explicit_decoder {
        out.insert("cls.predictions.decoder.weight".into(), word.clone());
    }
    out.insert(format!("{enc}embeddings.word_embeddings.weight"), word);
    let positions = rng.tensor(&[cfg.max_position_embeddings, h], 0.0, std)?;
    out.insert(
        format!("{enc}embeddings.position_embeddings.weight"),
        positions,
    );
    let segments = rng.tensor(&[cfg.type_vocab_size.max(1), h], 0.0, std)?;
    out.insert(
        format!("{enc}embeddings.token_type_embeddings.weight"),
        segments,
    );

    let mut linears = Vec::new();
    let mut norms = vec![format!("{enc}embeddings.LayerNorm")];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{enc}encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            linears.push((format!("{p}.attention.self.{m}"), h, h));
        }
        linears.push((format!("{p}.attention.output.dense"), h, h));
        norms.push(format!("{p}.attention.output.LayerNorm"));
        linears.push((format!("{p}.intermediate.dense"), i, h));
        linears.push((format!("{p}.output.dense"), h, i));
        norms.push(format!("{p}.output.LayerNorm"));
    }
    linears.push(("cls.predictions.transform.dense".into(), h, h));
    norms.push("cls.predictions.transform.LayerNorm".into());
    for (name, rows, cols) in linears {
        out.insert(
            format!("{name}.weight"),
            rng.tensor(&[rows, cols], 0.0, std)?,
        );
        out.insert(format!("{name}.bias"), rng.tensor(&[rows], 0.0, std / 4.0)?);
    }
    for name in norms {
        out.insert(format!("{name}.{ln_w}"), rng.tensor(&[h], 1.0, 0.1)?);
        out.insert(format!("{name}.{ln_b}"), rng.tensor(&[h], 0.0, 0.1)?);
    }
    let bias_name = if layout.decoder_bias {
        "cls.predictions.decoder.bias"
    } else {
        "cls.predictions.bias"
    };
    out.insert(bias_name.into(), rng.tensor(&[v], 0.0, std)?);
    Ok(out)
}

/// Writes a complete model directory: `config.json`, `vocab.txt` (from `vocab`, unless
/// empty: then the caller provides tokenizer files) and `model.safetensors`.
pub fn write_checkpoint(
    dir: &Path,
    cfg: &Config,
    vocab: &[&str],
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "position_embedding_type": cfg.position_embedding_type,
    });
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&path, e))?;
    if !vocab.is_empty() {
        let path = dir.join("vocab.txt");
        std::fs::write(&path, vocab.join("\n") + "\n").map_err(|e| Error::io(&path, e))?;
    }
    let path = dir.join("model.safetensors");
    super::load::write_tensors(tensors, &path)
}

/// A small configuration for tests: `layers` × `intermediate` neurons.
pub fn tiny_config(vocab_size: usize, hidden: usize, layers: usize, intermediate: usize) -> Config {
    Config {
        vocab_size,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 2,
        intermediate_size: intermediate,
        hidden_act: "gelu".into(),
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        position_embedding_type: "absolute".into(),
        model_type: Some("bert".into()),
        num_key_value_heads: 2,
        head_dim: hidden / 2,
        ..Config::default()
    }
}

/// A small decoder configuration for tests: Llama (4 heads over 2 key-value heads;
/// `qwen2` adds q/k/v biases) or GPT-2 (4 heads), `layers` × `intermediate` neurons.
pub fn tiny_decoder_config(
    model_type: &str,
    vocab_size: usize,
    hidden: usize,
    layers: usize,
    intermediate: usize,
    tied: bool,
) -> Result<Config> {
    let json = match model_type {
        "gpt2" => serde_json::json!({
            "model_type": "gpt2", "vocab_size": vocab_size, "n_embd": hidden, "n_layer": layers,
            "n_head": 4, "n_inner": intermediate, "n_positions": 32,
            "tie_word_embeddings": tied,
        }),
        _ => serde_json::json!({
            "model_type": model_type, "vocab_size": vocab_size, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": intermediate, "max_position_embeddings": 32,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied,
        }),
    };
    Config::from_json(&json).map_err(|reason| Error::model("tiny decoder", reason))
}

/// Small Llama configurations with rotary scaling for tests, by name: `llama3` (Llama
/// 3.2's factors, original context 8), `yarn` (factor 4, original context 8, a ramp over
/// the middle frequencies, attention factor ≠ 1), `dynamic` (factor 2 over 4 positions:
/// prompts of 5+ tokens get the NTK base). Head width 8 (4 frequencies, spread over the
/// bands), 4 heads over 2 key-value heads, untied.
pub fn tiny_rope_configs(
    vocab_size: usize,
    hidden: usize,
    layers: usize,
    intermediate: usize,
) -> Result<Vec<(String, Config)>> {
    use super::rope::RopeScaling;
    let scalings = [
        (
            "llama3",
            32,
            RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8,
            },
        ),
        (
            "yarn",
            32,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: Some(8),
                attention_factor: None,
                beta_fast: 4.0,
                beta_slow: 0.25,
                mscale: None,
                mscale_all_dim: None,
                truncate: false,
            },
        ),
        ("dynamic", 4, RopeScaling::Dynamic { factor: 2.0 }),
    ];
    scalings
        .into_iter()
        .map(|(name, positions, scaling)| {
            let mut cfg =
                tiny_decoder_config("llama", vocab_size, hidden, layers, intermediate, false)?;
            cfg.head_dim = 8;
            cfg.max_position_embeddings = positions;
            cfg.rope_scaling = Some(scaling);
            cfg.validate()
                .map_err(|reason| Error::model("tiny decoder", reason))?;
            Ok((format!("llama rope={name}"), cfg))
        })
        .collect()
}

/// Random weights for a decoder `cfg` under its Hugging Face names
/// (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `GPT2LMHeadModel`; GPT-2's Conv1D weights
/// `[in, out]`), with `lm_head.weight` only when untied. Norm scales are near 1 and
/// their biases nonzero, so that a mistake in their handling shows.
pub fn random_decoder_tensors(
    cfg: &Config,
    seed: u64,
    std: f32,
) -> Result<HashMap<String, Tensor>> {
    use super::config::Architecture;
    let mut rng = Normal(SplitMix64::new(seed));
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut out = HashMap::new();
    let mut put = |name: String, shape: &[usize], mean: f32, std: f32| -> Result<()> {
        out.insert(name, rng.tensor(shape, mean, std)?);
        Ok(())
    };
    match cfg.architecture {
        Architecture::Gpt2 => {
            put("transformer.wte.weight".into(), &[v, h], 0.0, std)?;
            put(
                "transformer.wpe.weight".into(),
                &[cfg.max_position_embeddings, h],
                0.0,
                std,
            )?;
            for l in 0..cfg.num_hidden_layers {
                let p = format!("transformer.h.{l}");
                for (name, inp, outp) in [
                    ("attn.c_attn", h, 3 * h),
                    ("attn.c_proj", h, h),
                    ("mlp.c_fc", h, i),
                    ("mlp.c_proj", i, h),
                ] {
                    put(format!("{p}.{name}.weight"), &[inp, outp], 0.0, std)?;
                    put(format!("{p}.{name}.bias"), &[outp], 0.0, std / 4.0)?;
                }
                for norm in ["ln_1", "ln_2"] {
                    put(format!("{p}.{norm}.weight"), &[h], 1.0, 0.1)?;
                    put(format!("{p}.{norm}.bias"), &[h], 0.0, 0.1)?;
                }
            }
            put("transformer.ln_f.weight".into(), &[h], 1.0, 0.1)?;
            put("transformer.ln_f.bias".into(), &[h], 0.0, 0.1)?;
        }
        _ => {
            let (d, heads, kv) = (
                cfg.head_dim(),
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
            );
            put("model.embed_tokens.weight".into(), &[v, h], 0.0, std)?;
            for l in 0..cfg.num_hidden_layers {
                let p = format!("model.layers.{l}");
                for (name, rows, cols) in [
                    ("self_attn.q_proj", heads * d, h),
                    ("self_attn.k_proj", kv * d, h),
                    ("self_attn.v_proj", kv * d, h),
                    ("self_attn.o_proj", h, heads * d),
                    ("mlp.gate_proj", i, h),
                    ("mlp.up_proj", i, h),
                    ("mlp.down_proj", h, i),
                ] {
                    put(format!("{p}.{name}.weight"), &[rows, cols], 0.0, std)?;
                    if cfg.attention_bias
                        && name != "self_attn.o_proj"
                        && name.starts_with("self_attn")
                    {
                        put(format!("{p}.{name}.bias"), &[rows], 0.0, std / 4.0)?;
                    }
                }
                for norm in ["input_layernorm", "post_attention_layernorm"] {
                    put(format!("{p}.{norm}.weight"), &[h], 1.0, 0.1)?;
                }
            }
            put("model.norm.weight".into(), &[h], 1.0, 0.1)?;
        }
    }
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, h], 0.0, std)?;
    }
    Ok(out)
}
