//! Writes a model directory with random weights of a real architecture's shapes, for
//! benchmarks: `cargo run --release --example random-model -- bert-base TOKENIZER_DIR OUT_DIR`.
//! The tokenizer files (tokenizer.json, vocab.txt, tokenizer_config.json) are copied
//! from TOKENIZER_DIR and the vocabulary size is taken from its vocab.txt.

use std::path::PathBuf;

use anyhow::{bail, Context};
use kn::model::random::{random_tensors, tiny_config, write_checkpoint, Layout};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape, tokenizer, out] = args.as_slice() else {
        bail!("usage: random-model bert-base|bert-large TOKENIZER_DIR OUT_DIR");
    };
    let (tokenizer, out) = (PathBuf::from(tokenizer), PathBuf::from(out));
    let vocab = std::fs::read_to_string(tokenizer.join("vocab.txt"))
        .with_context(|| format!("{}: no vocab.txt", tokenizer.display()))?
        .lines()
        .count();
    let mut cfg = match shape.as_str() {
        "bert-base" => tiny_config(vocab, 768, 12, 3072),
        "bert-large" => tiny_config(vocab, 1024, 24, 4096),
        other => bail!("unknown shape {other}"),
    };
    cfg.num_attention_heads = cfg.hidden_size / 64;
    cfg.max_position_embeddings = 512;
    // BERT's initialiser: N(0, 0.02).
    let tensors = random_tensors(&cfg, Layout::default(), 2022, 0.02)?;
    write_checkpoint(&out, &cfg, &[], &tensors)?;
    for file in ["tokenizer.json", "vocab.txt", "tokenizer_config.json"] {
        if tokenizer.join(file).is_file() {
            std::fs::copy(tokenizer.join(file), out.join(file))?;
        }
    }
    eprintln!(
        "random-model: {shape} ({vocab} tokens) in {}",
        out.display()
    );
    Ok(())
}
