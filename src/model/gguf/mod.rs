//! GGUF files (llama.cpp's checkpoint format) read as Hugging Face checkpoints: the
//! `config.json` fields, every tensor under its Hugging Face name and in its Hugging Face
//! layout (dequantized to f32), and the tokenizer, as transformers 4.47.1's GGUF loader
//! builds them (`modeling_gguf_pytorch_utils.py`, `integrations/ggml.py`).
//!
//! The file is first checked by a small bounded parser of its own (magic, version, counts,
//! lengths, value types, tensor shapes, types and data ranges, each against what the file
//! can hold), and only then handed to candle's GGUF reader, which trusts many of those
//! numbers. A corrupt file is an [`Error::Model`], never a panic or an unbounded
//! allocation: what is allocated is bounded by a small multiple of the file's size (candle
//! keeps each metadata array element as a 32-byte value).
//!
//! Architectures: `llama` (also Mistral-style files), `qwen2` and `gpt2`. llama.cpp's
//! converter permutes the rows of the `llama` q/k projections for its rotary embedding;
//! they are permuted back here, as transformers does. GPT-2's projections are stored
//! transposed (nn.Linear layout) and are transposed back to Hugging Face's Conv1D
//! `[in, out]` layout.
//!
//! [`read`] puts together four parts, one module each: the bounded pre-parse
//! (`container`), the metadata and the config built from it (`metadata`), the tensors'
//! names, layout fixes and shapes (`tensors`), and the tokenizer (`tokenizer`). Their unit
//! tests write small GGUF files with the builder in `test_files`.

mod container;
mod metadata;
mod tensors;
#[cfg(test)]
mod test_files;
mod tokenizer;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use container::scan;
use metadata::{Arch, Hparams, Meta};
use tensors::{check_shapes, hf_name, unpermute_rows, Fix, Loaded};
use tokenizer::{build_tokenizer, TokenizerMeta};

/// A GGUF file read as a Hugging Face checkpoint.
pub struct GgufCheckpoint {
    /// `general.architecture` as found ("llama", "qwen2", "gpt2", ...).
    pub architecture: String,
    /// The equivalent of config.json, with Hugging Face field names.
    pub config: serde_json::Value,
    /// Every tensor under its Hugging Face name, dequantized to f32 on the CPU, in the
    /// Hugging Face layout (q/k rows un-permuted, GPT-2 Conv1D weights `[in, out]`), in
    /// the file's order.
    pub tensors: Vec<(String, Tensor)>,
    /// The tokenizer built from the `tokenizer.ggml.*` metadata.
    pub tokenizer: Tokenizer,
    /// How many tensors of each GGUF type the file holds, most frequent first, e.g.
    /// `[("q4_1", 182), ("f32", 61)]`.
    pub tensor_types: Vec<(String, usize)>,
}

impl std::fmt::Debug for GgufCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufCheckpoint")
            .field("architecture", &self.architecture)
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("tensor_types", &self.tensor_types)
            .finish_non_exhaustive()
    }
}

/// Reads the GGUF file at `path`: checks it, dequantizes every tensor to f32 under its
/// Hugging Face name and builds the config and the tokenizer.
///
/// Errors ([`Error::Model`] naming the file) for anything wrong with the file: a corrupt
/// or truncated header, a tensor type kn cannot dequantize (naming the type and the
/// tensor), an unsupported architecture, tokenizer model or rope scaling, a missing
/// metadata key (naming it), a missing, unknown or mis-shaped tensor (naming it).
pub fn read(path: &Path) -> Result<GgufCheckpoint> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let layout = scan(&mut reader, len)
        .map_err(|reason| Error::model(path, format!("not a valid GGUF file: {reason}")))?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let content = guarded(path, "cannot read the GGUF header", || {
        Content::read(&mut reader)
    })?;
    if content.tensor_infos.len() != layout.tensors.len() {
        return Err(Error::model(
            path,
            format!(
                "candle read {} tensor infos, the file declares {}",
                content.tensor_infos.len(),
                layout.tensors.len()
            ),
        ));
    }
    let meta = Meta {
        map: &content.metadata,
        path,
    };
    let architecture = meta.string_req("general.architecture")?.to_string();
    let arch = match architecture.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "gpt2" => Arch::Gpt2,
        other => {
            return Err(Error::model(
                path,
                format!("GGUF architecture {other:?} is not supported (llama, qwen2, gpt2)"),
            ))
        }
    };
    let hp = Hparams::read(&meta, arch, &architecture)?;
    let vocab = TokenizerMeta::read(&meta)?;
    let tokenizer = build_tokenizer(&vocab, arch).map_err(|reason| Error::model(path, reason))?;

    // Map every tensor name before reading any data, so that an unknown tensor fails fast.
    let mut targets = Vec::with_capacity(layout.tensors.len());
    for entry in &layout.tensors {
        if entry.name == "rope_freqs.weight" {
            return Err(Error::model(
                path,
                "tensor rope_freqs.weight holds per-frequency rotary factors (llama.cpp's form \
                 of Llama 3.1+ rope_scaling \"llama3\"), which kn does not read from GGUF \
                 files: load the Hugging Face checkpoint (config.json with rope_scaling) instead",
            ));
        }
        let target = hf_name(arch, &entry.name, hp.n_layer).ok_or_else(|| {
            Error::model(
                path,
                format!(
                    "tensor {} is not one kn knows for GGUF architecture {architecture:?}",
                    entry.name
                ),
            )
        })?;
        targets.push(target);
    }

    let mut loaded: Vec<Loaded> = Vec::with_capacity(layout.tensors.len());
    for (entry, target) in layout.tensors.iter().zip(targets) {
        let Some((hf, fix)) = target else { continue };
        let what = format!("cannot read tensor {}", entry.name);
        let qtensor = guarded(path, &what, || {
            content.tensor(&mut reader, &entry.name, &Device::Cpu)
        })?;
        let tensor = guarded(path, &what, || {
            qtensor.dequantize(&Device::Cpu)?.to_dtype(DType::F32)
        })?;
        loaded.push(Loaded {
            gguf: entry.name.clone(),
            hf,
            fix,
            tensor,
        });
    }

    let embd = loaded
        .iter()
        .find(|t| t.gguf == "token_embd.weight")
        .ok_or_else(|| Error::model(path, "tensor token_embd.weight is missing"))?;
    let vocab_size = match embd.tensor.dims() {
        [rows, _] => *rows,
        dims => {
            return Err(Error::model(
                path,
                format!("tensor token_embd.weight has shape {dims:?}, expected [vocab, hidden]"),
            ))
        }
    };
    if vocab.tokens.len() != vocab_size {
        return Err(Error::model(
            path,
            format!(
                "token_embd.weight has {vocab_size} rows but tokenizer.ggml.tokens has {} tokens",
                vocab.tokens.len()
            ),
        ));
    }
    if let Some(declared) = meta.usize_opt(&format!("{architecture}.vocab_size"))? {
        if declared != vocab_size {
            return Err(Error::model(
                path,
                format!(
                    "{architecture}.vocab_size is {declared} but token_embd.weight has \
                     {vocab_size} rows"
                ),
            ));
        }
    }

    // GPT-2: llama.cpp's converter writes the (tied) token embedding a second time as
    // output.weight; a Hugging Face GPT-2 checkpoint has no lm_head.weight then.
    if arch == Arch::Gpt2 {
        if let Some(i) = loaded.iter().position(|t| t.gguf == "output.weight") {
            if same_values(&loaded[i].tensor, &embd.tensor) {
                loaded.remove(i);
            }
        }
    }
    let tied = !loaded.iter().any(|t| t.gguf == "output.weight");

    for t in &mut loaded {
        if t.fix == Fix::Transpose && t.tensor.rank() == 2 {
            t.tensor = guarded(path, &format!("cannot transpose {}", t.gguf), || {
                t.tensor.t()?.contiguous()
            })?;
        }
    }
    check_shapes(path, arch, &hp, vocab_size, tied, &loaded)?;
    for t in &mut loaded {
        let n_head = match t.fix {
            Fix::UnpermuteQ => hp.n_head,
            Fix::UnpermuteK => hp.n_kv_head,
            _ => continue,
        };
        t.tensor = guarded(path, &format!("cannot un-permute {}", t.gguf), || {
            unpermute_rows(&t.tensor, n_head)
        })?;
    }

    let q_bias = loaded.iter().any(|t| t.gguf.ends_with(".attn_q.bias"));
    let config = hp.config(arch, vocab_size, tied, (vocab.bos, vocab.eos), q_bias);

    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    for entry in &layout.tensors {
        *counts.entry(entry.type_name).or_default() += 1;
    }
    let mut tensor_types: Vec<(String, usize)> = counts
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    tensor_types.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    Ok(GgufCheckpoint {
        architecture,
        config,
        tensors: loaded.into_iter().map(|t| (t.hf, t.tensor)).collect(),
        tokenizer,
        tensor_types,
    })
}

/// Runs one candle call, turning its error, or a panic, into an error naming the file.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::model(path, format!("{what}: {e}"))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::model(
                path,
                format!("{what}: candle panicked: {msg}"),
            ))
        }
    }
}

/// Whether two tensors have the same shape and bit-identical values.
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    if a.dims() != b.dims() {
        return false;
    }
    match (
        a.flatten_all().and_then(|t| t.to_vec1::<f32>()),
        b.flatten_all().and_then(|t| t.to_vec1::<f32>()),
    ) {
        (Ok(a), Ok(b)) => a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::test_files::*;

    #[test]
    fn gguf_llama_names_layout_config_tokenizer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, expected) = llama_spec(64, 96, 2, false);
        let path = spec.write(dir.path(), "tiny.gguf");
        let ck = read(&path).expect("read");
        assert_eq!(ck.architecture, "llama");
        check_tensors(&ck, &expected);
        // Un-permuted exactly (f32) and within Q8_0 error for layer 1; a permuted matrix
        // would differ by O(1).
        let q0 = &ck.tensors[2].1;
        assert_eq!(max_abs_diff(q0, &expected[2].1), 0.0);

        let c = &ck.config;
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["vocab_size"], 24);
        assert_eq!(c["hidden_size"], 64);
        assert_eq!(c["intermediate_size"], 96);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["head_dim"], 16);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["max_position_embeddings"], 128);
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(c["hidden_act"], "silu");
        assert_eq!(c["attention_bias"], false);
        assert_eq!(
            ck.tensor_types,
            vec![
                ("f32".to_string(), 9),
                ("q8_0".to_string(), 7),
                ("q4_1".to_string(), 5)
            ]
        );

        // The ids transformers 4.47.1 gives for this file (AutoTokenizer with gguf_file):
        // BOS prepended although tokenizer.ggml.add_bos_token is false, digits not split.
        assert_eq!(encode(&ck, "hello world"), [1, 14, 19]);
        assert_eq!(encode(&ck, "12"), [1, 23]);
        assert_eq!(encode(&ck, "1212 hello"), [1, 23, 23, 7, 14]);
        assert_eq!(encode(&ck, "<|im_start|>hello<|im_end|>"), [1, 1, 14, 2]);
        assert_eq!(encode(&ck, " hello world"), [1, 7, 14, 19]);
        assert_eq!(encode(&ck, "hello  world"), [1, 14, 7, 19]);
        // The user-defined token is an added token (transformers: [1, 4, 9, 14]).
        assert_eq!(encode(&ck, "<user>hello"), [1, 20, 14]);
        let decoded = ck.tokenizer.decode(&[1, 14, 19], true).expect("decode");
        assert_eq!(decoded, "hello world");
        assert_eq!(ck.tokenizer.get_vocab_size(true), 24);
    }

    #[test]
    fn gguf_smollm2_real_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("models/smollm2");
        // Missing is a failure, as in tests/common: a skipped test proves nothing.
        assert!(
            dir.join(".complete").is_file(),
            "{} is missing: run `bash scripts/fetch-test-models` (the test command \
             `bash scripts/test` does)",
            dir.display()
        );
        let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let ck = read(&path).expect("read SmolLM2");
        let c = &ck.config;
        assert_eq!(ck.architecture, "llama");
        assert_eq!(c["num_hidden_layers"], 30);
        assert_eq!(c["hidden_size"], 576);
        assert_eq!(c["intermediate_size"], 1536);
        assert_eq!(c["num_attention_heads"], 9);
        assert_eq!(c["num_key_value_heads"], 3);
        assert_eq!(c["head_dim"], 64);
        assert_eq!(c["vocab_size"], 49152);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["max_position_embeddings"], 8192);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(ck.tensors.len(), 272);
        assert_eq!(
            ck.tensor_types,
            vec![
                ("q4_1".to_string(), 210),
                ("f32".to_string(), 61),
                ("q8_0".to_string(), 1)
            ]
        );
        let shape = |name: &str| {
            ck.tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.dims().to_vec())
        };
        assert_eq!(shape("model.embed_tokens.weight"), Some(vec![49152, 576]));
        assert_eq!(
            shape("model.layers.29.self_attn.q_proj.weight"),
            Some(vec![576, 576])
        );
        assert_eq!(
            shape("model.layers.0.self_attn.k_proj.weight"),
            Some(vec![192, 576])
        );
        assert_eq!(
            shape("model.layers.0.mlp.down_proj.weight"),
            Some(vec![576, 1536])
        );
        assert_eq!(shape("lm_head.weight"), None);
        // Values transformers 4.47.1's load_gguf_checkpoint gives (rows 1 and 33: the
        // un-permutation moves them).
        let values = |name: &str, row: usize, n: usize| -> Vec<f32> {
            let (_, t) = ck.tensors.iter().find(|(t, _)| t == name).expect(name);
            let row = t.get(row).and_then(|r| r.to_vec1::<f32>()).expect("row");
            row[..n].to_vec()
        };
        let close = |got: Vec<f32>, want: &[f64]| {
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(g, w)| (f64::from(*g) - w).abs() < 1e-6),
                "{got:?} vs {want:?}"
            );
        };
        let k0 = "model.layers.0.self_attn.k_proj.weight";
        close(
            values(k0, 1, 3),
            &[0.203369140625, 0.09136962890625, 0.203369140625],
        );
        close(values(k0, 33, 2), &[-0.09912109375, 0.22955322265625]);
        let q5 = "model.layers.5.self_attn.q_proj.weight";
        close(
            values(q5, 1, 3),
            &[0.0746612548828125, 0.1134490966796875, -0.0029144287109375],
        );
        close(values(q5, 33, 2), &[0.0168609619140625, -0.0047607421875]);
        close(
            values("model.embed_tokens.weight", 33, 2),
            &[-0.0373992919921875, 0.0157470703125],
        );

        // The ids transformers 4.47.1 gives (scripts/golden/smollm2_predict.py): BOS first.
        assert_eq!(
            encode(&ck, "The capital of France is"),
            [1, 504, 3575, 282, 4649, 314]
        );
        let golden = root.join("tests/golden/smollm2_predict.json");
        if let Ok(text) = std::fs::read_to_string(&golden) {
            let g: serde_json::Value = serde_json::from_str(&text).expect("golden json");
            let prompts = g["prompts"].as_array().expect("prompts");
            assert!(!prompts.is_empty());
            for p in prompts {
                let text = p["input_text"].as_str().expect("input_text");
                let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).expect("ids");
                assert_eq!(encode(&ck, text), ids, "{text:?}");
            }
        }
    }
}
