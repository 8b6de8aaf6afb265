//! Tensor names and shapes: each GGUF tensor's Hugging Face name and what it needs to be
//! in the Hugging Face layout (the q/k un-permutation, GPT-2's transposes), and the
//! check that every tensor the configuration needs is there with its shape.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::Tensor;

use super::metadata::{Arch, Hparams};
use crate::error::{Error, Result};

/// What a tensor needs after dequantization to be in the Hugging Face layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fix {
    None,
    /// llama q rows, permuted by llama.cpp with `n_head`.
    UnpermuteQ,
    /// llama k rows, permuted by llama.cpp with `n_kv_head`.
    UnpermuteK,
    /// A GPT-2 Conv1D weight, stored as `[out, in]`.
    Transpose,
}

/// A dequantized tensor under both names.
pub(super) struct Loaded {
    pub(super) gguf: String,
    pub(super) hf: String,
    pub(super) fix: Fix,
    pub(super) tensor: Tensor,
}

/// The Hugging Face name of GGUF tensor `name` and its fix: `None` for a tensor kn does
/// not know, `Some(None)` for one it ignores.
#[allow(clippy::option_option)]
pub(super) fn hf_name(arch: Arch, name: &str, n_layer: usize) -> Option<Option<(String, Fix)>> {
    let top = |hf: &str| Some(Some((hf.to_string(), Fix::None)));
    if let Some(rest) = name.strip_prefix("blk.") {
        let (layer, tail) = rest.split_once('.')?;
        let n: usize = layer.parse().ok().filter(|n| *n < n_layer)?;
        if layer != n.to_string() {
            return None;
        }
        let (part, kind) = tail.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        let (hf, fix) = match arch {
            Arch::Llama | Arch::Qwen2 => {
                let unpermute = |fix| if arch == Arch::Llama { fix } else { Fix::None };
                match part {
                    "attn_norm" => ("input_layernorm", Fix::None),
                    "attn_q" => ("self_attn.q_proj", unpermute(Fix::UnpermuteQ)),
                    "attn_k" => ("self_attn.k_proj", unpermute(Fix::UnpermuteK)),
                    "attn_v" => ("self_attn.v_proj", Fix::None),
                    "attn_output" => ("self_attn.o_proj", Fix::None),
                    "ffn_norm" => ("post_attention_layernorm", Fix::None),
                    "ffn_gate" => ("mlp.gate_proj", Fix::None),
                    "ffn_up" => ("mlp.up_proj", Fix::None),
                    "ffn_down" => ("mlp.down_proj", Fix::None),
                    // The rotary inverse frequencies of old conversions: recomputed.
                    "attn_rot_embd" => return Some(None),
                    _ => return None,
                }
            }
            Arch::Gpt2 => {
                let conv = if kind == "weight" {
                    Fix::Transpose
                } else {
                    Fix::None
                };
                match part {
                    "attn_norm" => ("ln_1", Fix::None),
                    "attn_qkv" => ("attn.c_attn", conv),
                    "attn_output" => ("attn.c_proj", conv),
                    "ffn_norm" => ("ln_2", Fix::None),
                    "ffn_up" => ("mlp.c_fc", conv),
                    "ffn_down" => ("mlp.c_proj", conv),
                    _ => return None,
                }
            }
        };
        let prefix = if arch == Arch::Gpt2 {
            "transformer.h"
        } else {
            "model.layers"
        };
        return Some(Some((format!("{prefix}.{n}.{hf}.{kind}"), fix)));
    }
    match (arch, name) {
        (Arch::Llama | Arch::Qwen2, "token_embd.weight") => top("model.embed_tokens.weight"),
        (Arch::Llama | Arch::Qwen2, "output_norm.weight") => top("model.norm.weight"),
        (Arch::Gpt2, "token_embd.weight") => top("transformer.wte.weight"),
        (Arch::Gpt2, "position_embd.weight") => top("transformer.wpe.weight"),
        (Arch::Gpt2, "output_norm.weight") => top("transformer.ln_f.weight"),
        (Arch::Gpt2, "output_norm.bias") => top("transformer.ln_f.bias"),
        (_, "output.weight") => top("lm_head.weight"),
        _ => None,
    }
}

/// Checks that every tensor the architecture needs is there, with the shape the config
/// gives it (Hugging Face layout), and that nothing is left over.
pub(super) fn check_shapes(
    path: &Path,
    arch: Arch,
    hp: &Hparams,
    vocab: usize,
    tied: bool,
    loaded: &[Loaded],
) -> Result<()> {
    let (h, f) = (hp.hidden, hp.ffn);
    let mul = |a: usize, b: usize| {
        a.checked_mul(b)
            .ok_or_else(|| Error::model(path, format!("{a} × {b} overflows")))
    };
    let q = mul(hp.n_head, hp.head_dim)?;
    let kv = mul(hp.n_kv_head, hp.head_dim)?;
    // Each tensor the configuration needs, checked as soon as named, so that a huge
    // block_count fails at the first missing layer.
    let by_name: HashMap<&str, &Loaded> = loaded.iter().map(|t| (t.gguf.as_str(), t)).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut add = |name: String, shape: Vec<usize>| -> Result<()> {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| Error::model(path, format!("tensor {name} is missing")))?;
        if t.tensor.dims() != shape.as_slice() {
            return Err(Error::model(
                path,
                format!(
                    "tensor {name} ({}) has shape {:?}, expected {shape:?} from the metadata",
                    t.hf,
                    t.tensor.dims()
                ),
            ));
        }
        seen.insert(name);
        Ok(())
    };
    let has = |name: &str| loaded.iter().any(|t| t.gguf == name);
    match arch {
        Arch::Llama | Arch::Qwen2 => {
            add("token_embd.weight".into(), vec![vocab, h])?;
            add("output_norm.weight".into(), vec![h])?;
            if !tied {
                add("output.weight".into(), vec![vocab, h])?;
            }
            // Llama with attention_bias has all four biases; Qwen2 has q/k/v ones.
            let llama_bias = arch == Arch::Llama && has("blk.0.attn_q.bias");
            let qkv_bias = arch == Arch::Qwen2 || llama_bias;
            for n in 0..hp.n_layer {
                let b = |p: &str| format!("blk.{n}.{p}");
                add(b("attn_norm.weight"), vec![h])?;
                add(b("ffn_norm.weight"), vec![h])?;
                add(b("attn_q.weight"), vec![q, h])?;
                add(b("attn_k.weight"), vec![kv, h])?;
                add(b("attn_v.weight"), vec![kv, h])?;
                add(b("attn_output.weight"), vec![h, q])?;
                add(b("ffn_gate.weight"), vec![f, h])?;
                add(b("ffn_up.weight"), vec![f, h])?;
                add(b("ffn_down.weight"), vec![h, f])?;
                if qkv_bias {
                    add(b("attn_q.bias"), vec![q])?;
                    add(b("attn_k.bias"), vec![kv])?;
                    add(b("attn_v.bias"), vec![kv])?;
                }
                if llama_bias {
                    add(b("attn_output.bias"), vec![h])?;
                }
            }
        }
        Arch::Gpt2 => {
            add("token_embd.weight".into(), vec![vocab, h])?;
            add("position_embd.weight".into(), vec![hp.context, h])?;
            add("output_norm.weight".into(), vec![h])?;
            add("output_norm.bias".into(), vec![h])?;
            if !tied {
                add("output.weight".into(), vec![vocab, h])?;
            }
            let h3 = mul(3, h)?;
            for n in 0..hp.n_layer {
                let b = |p: &str| format!("blk.{n}.{p}");
                for norm in ["attn_norm", "ffn_norm"] {
                    add(b(&format!("{norm}.weight")), vec![h])?;
                    add(b(&format!("{norm}.bias")), vec![h])?;
                }
                add(b("attn_qkv.weight"), vec![h, h3])?;
                add(b("attn_qkv.bias"), vec![h3])?;
                add(b("attn_output.weight"), vec![h, h])?;
                add(b("attn_output.bias"), vec![h])?;
                add(b("ffn_up.weight"), vec![h, f])?;
                add(b("ffn_up.bias"), vec![f])?;
                add(b("ffn_down.weight"), vec![f, h])?;
                add(b("ffn_down.bias"), vec![h])?;
            }
        }
    }
    if let Some(extra) = loaded.iter().find(|t| !seen.contains(t.gguf.as_str())) {
        return Err(Error::model(
            path,
            format!(
                "tensor {} ({}) is not expected with this configuration",
                extra.gguf, extra.hf
            ),
        ));
    }
    Ok(())
}

/// Undoes llama.cpp's `permute` of q/k rows (convert_hf_to_gguf.py, `LlamaModel.permute`)
/// as transformers' `reverse_permute_weights` does: rows viewed as
/// `[n_head, head_dim / 2, 2]` become `[n_head, 2, head_dim / 2]`.
pub(super) fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    let rest: usize = dims.iter().skip(1).product();
    if n_head == 0 || rows % (2 * n_head) != 0 {
        candle_core::bail!("{rows} rows do not split into {n_head} heads of pairs")
    }
    let half = rows / n_head / 2;
    t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::super::test_files::*;

    #[test]
    fn gguf_llama_tied_without_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, expected) = llama_spec(32, 32, 1, true);
        let ck = read(&spec.write(dir.path(), "tied.gguf")).expect("read");
        check_tensors(&ck, &expected);
        assert_eq!(ck.config["tie_word_embeddings"], true);
        assert!(ck.tensors.iter().all(|(n, _)| n != "lm_head.weight"));
    }

    #[test]
    fn gguf_qwen2_biases_not_permuted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (hidden, ffn, n_head, n_kv, hd) = (32, 64, 2, 1, 16);
        let mut rng = SplitMix64::new(3);
        let mut spec = Spec {
            meta: Vec::new(),
            tensors: Vec::new(),
        };
        spec.set("general.architecture", s("qwen2"));
        spec.set("qwen2.block_count", Value::U32(1));
        spec.set("qwen2.context_length", Value::U32(64));
        spec.set("qwen2.embedding_length", Value::U32(hidden as u32));
        spec.set("qwen2.feed_forward_length", Value::U32(ffn as u32));
        spec.set("qwen2.attention.head_count", Value::U32(n_head));
        spec.set("qwen2.attention.head_count_kv", Value::U32(n_kv));
        spec.set("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6));
        tokenizer_meta(&mut spec);
        let shapes: Vec<(&str, &str, Vec<usize>)> = vec![
            (
                "token_embd.weight",
                "model.embed_tokens.weight",
                vec![24, hidden],
            ),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
                vec![hidden],
            ),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
                vec![n_head as usize * hd, hidden],
            ),
            (
                "blk.0.attn_q.bias",
                "model.layers.0.self_attn.q_proj.bias",
                vec![n_head as usize * hd],
            ),
            (
                "blk.0.attn_k.weight",
                "model.layers.0.self_attn.k_proj.weight",
                vec![n_kv as usize * hd, hidden],
            ),
            (
                "blk.0.attn_k.bias",
                "model.layers.0.self_attn.k_proj.bias",
                vec![n_kv as usize * hd],
            ),
            (
                "blk.0.attn_v.weight",
                "model.layers.0.self_attn.v_proj.weight",
                vec![n_kv as usize * hd, hidden],
            ),
            (
                "blk.0.attn_v.bias",
                "model.layers.0.self_attn.v_proj.bias",
                vec![n_kv as usize * hd],
            ),
            (
                "blk.0.attn_output.weight",
                "model.layers.0.self_attn.o_proj.weight",
                vec![hidden, n_head as usize * hd],
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                vec![hidden],
            ),
            (
                "blk.0.ffn_gate.weight",
                "model.layers.0.mlp.gate_proj.weight",
                vec![ffn, hidden],
            ),
            (
                "blk.0.ffn_up.weight",
                "model.layers.0.mlp.up_proj.weight",
                vec![ffn, hidden],
            ),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
                vec![hidden, ffn],
            ),
            ("output_norm.weight", "model.norm.weight", vec![hidden]),
        ];
        let mut expected = Vec::new();
        for (g, hf, shape) in shapes {
            let t = randn(&mut rng, &shape);
            spec.tensor(g, &t, GgmlDType::F32);
            expected.push((hf.to_string(), t, 0.0));
        }
        let ck = read(&spec.write(dir.path(), "qwen.gguf")).expect("read");
        check_tensors(&ck, &expected);
        assert_eq!(ck.config["model_type"], "qwen2");
        assert_eq!(ck.config["architectures"], json!(["Qwen2ForCausalLM"]));
        assert_eq!(ck.config["attention_bias"], true);
        assert_eq!(ck.config["rope_theta"], 10000.0);
        assert_eq!(ck.config["rms_norm_eps"], 1e-6);
        assert_eq!(ck.config["tie_word_embeddings"], true);
        // transformers' Qwen2 tokenizer: digits split, no BOS.
        assert_eq!(encode(&ck, "hello world"), [14, 19]);
        assert_eq!(encode(&ck, "12"), [21, 22]);
        assert_eq!(encode(&ck, "1212 hello"), [21, 22, 21, 22, 7, 14]);
        assert_eq!(encode(&ck, "<|im_start|>hello<|im_end|>"), [1, 14, 2]);
    }

    /// A tiny GPT-2 written as llama.cpp's converter writes it: Conv1D weights transposed,
    /// the tied embedding repeated as output.weight.
    fn gpt2_spec() -> (Spec, Expected) {
        let (n, inner, pos, v) = (64, 128, 16, TOKENS.len());
        let mut rng = SplitMix64::new(11);
        let mut spec = Spec {
            meta: Vec::new(),
            tensors: Vec::new(),
        };
        spec.set("general.architecture", s("gpt2"));
        spec.set("gpt2.block_count", Value::U32(1));
        spec.set("gpt2.context_length", Value::U32(pos as u32));
        spec.set("gpt2.embedding_length", Value::U32(n as u32));
        spec.set("gpt2.feed_forward_length", Value::U32(inner as u32));
        spec.set("gpt2.attention.head_count", Value::U32(4));
        spec.set("gpt2.attention.layer_norm_epsilon", Value::F32(1e-5));
        tokenizer_meta(&mut spec);
        spec.remove("tokenizer.ggml.add_bos_token");
        let mut expected = Vec::new();
        let wte = randn(&mut rng, &[v, n]);
        spec.tensor("token_embd.weight", &wte, GgmlDType::F32);
        expected.push(("transformer.wte.weight".to_string(), wte.clone(), 0.0));
        let wpe = randn(&mut rng, &[pos, n]);
        spec.tensor("position_embd.weight", &wpe, GgmlDType::F32);
        expected.push(("transformer.wpe.weight".to_string(), wpe, 0.0));
        // (GGUF part, HF part, HF shape; Conv1D weights are [in, out])
        let parts: Vec<(&str, &str, Vec<usize>, bool)> = vec![
            ("attn_norm.weight", "ln_1.weight", vec![n], false),
            ("attn_norm.bias", "ln_1.bias", vec![n], false),
            (
                "attn_qkv.weight",
                "attn.c_attn.weight",
                vec![n, 3 * n],
                true,
            ),
            ("attn_qkv.bias", "attn.c_attn.bias", vec![3 * n], false),
            ("attn_output.weight", "attn.c_proj.weight", vec![n, n], true),
            ("attn_output.bias", "attn.c_proj.bias", vec![n], false),
            ("ffn_norm.weight", "ln_2.weight", vec![n], false),
            ("ffn_norm.bias", "ln_2.bias", vec![n], false),
            ("ffn_up.weight", "mlp.c_fc.weight", vec![n, inner], true),
            ("ffn_up.bias", "mlp.c_fc.bias", vec![inner], false),
            ("ffn_down.weight", "mlp.c_proj.weight", vec![inner, n], true),
            ("ffn_down.bias", "mlp.c_proj.bias", vec![n], false),
        ];
        for (g, hf, shape, conv) in parts {
            let t = randn(&mut rng, &shape);
            let (stored, dt) = if conv {
                (
                    t.t().and_then(|x| x.contiguous()).expect("t"),
                    GgmlDType::Q8_0,
                )
            } else {
                (t.clone(), GgmlDType::F32)
            };
            spec.tensor(&format!("blk.0.{g}"), &stored, dt);
            expected.push((format!("transformer.h.0.{hf}"), t, tol(dt)));
        }
        for (g, hf) in [("weight", "weight"), ("bias", "bias")] {
            let t = randn(&mut rng, &[n]);
            spec.tensor(&format!("output_norm.{g}"), &t, GgmlDType::F32);
            expected.push((format!("transformer.ln_f.{hf}"), t, 0.0));
        }
        spec.tensor("output.weight", &wte, GgmlDType::F32);
        (spec, expected)
    }

    #[test]
    fn gguf_gpt2_conv1d_layout_and_tied_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spec, expected) = gpt2_spec();
        let ck = read(&spec.write(dir.path(), "gpt2.gguf")).expect("read");
        check_tensors(&ck, &expected);
        let c = &ck.config;
        assert_eq!(c["model_type"], "gpt2");
        assert_eq!(c["architectures"], json!(["GPT2LMHeadModel"]));
        assert_eq!(c["vocab_size"], 24);
        assert_eq!(c["n_embd"], 64);
        assert_eq!(c["n_layer"], 1);
        assert_eq!(c["n_head"], 4);
        assert_eq!(c["n_inner"], 128);
        assert_eq!(c["n_positions"], 16);
        assert_eq!(c["layer_norm_epsilon"], 1e-5);
        assert_eq!(c["activation_function"], "gelu_new");
        assert_eq!(c["tie_word_embeddings"], true);
        // transformers' GPT-2 tokenizer: no BOS.
        assert_eq!(encode(&ck, "hello world"), [14, 19]);
        assert_eq!(encode(&ck, "<|endoftext|>hello"), [0, 14]);

        // A real lm_head (not the embedding) stays, untied.
        let mut rng = SplitMix64::new(5);
        spec.tensor("output.weight", &randn(&mut rng, &[24, 64]), GgmlDType::F32);
        let ck = read(&spec.write(dir.path(), "gpt2-untied.gguf")).expect("read");
        assert_eq!(ck.config["tie_word_embeddings"], false);
        assert_eq!(
            ck.tensors.last().map(|(n, _)| n.as_str()),
            Some("lm_head.weight")
        );
    }
}
