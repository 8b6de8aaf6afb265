//! `kn` finds and edits *knowledge neurons* in transformer language models (Dai et al.,
//! "Knowledge Neurons in Pretrained Transformers", ACL 2022): BERT masked LMs, and
//! Llama-family and GPT-2 decoders (Hugging Face directories or GGUF files).
//!
//! The pipeline, module by module:
//! - [`model`]: load a checkpoint (local directory, GGUF file or hub id; safetensors,
//!   PyTorch or GGUF weights; `tokenizer.json`, `vocab.txt` or GGUF metadata) and run it
//!   (BERT, Llama, GPT-2) with access to every FFN neuron (the input of the FFN output
//!   projection) through [`model::FfnHook`]s.
//! - [`predict`]: the answer-position distribution (fill-mask or next token) of cloze prompts.
//! - [`attribution`]: integrated gradients over every FFN neuron at the answer position
//!   ([`attribution::ig`]: the loop; [`attribution::engine`]: what it needs of a model,
//!   with one engine per architecture on shared kernels — [`attribution::bert`], and
//!   [`attribution::decoder`], one row per integration point for causal models), coarse
//!   and refined neuron sets, `kn attribute` / `kn refine`.
//! - [`report`]: the paper's analyses (neurons over layers, per fact, shared by fact
//!   pairs; suppress/amplify; edit metrics) as tables, plots and JSON: `kn report`.
//! - [`data`]: JSONL input with file/line errors, line-flushed JSONL output, and
//!   ParaRel's patterns and facts turned into fact JSONL ([`data::pararel`], `kn pararel`).
//! - [`rng`]: a seeded generator whose stream is the same on every machine.
//! - [`cli`]: the `kn` command line over all of the above.

pub mod attribution;
pub mod cli;
pub mod data;
pub mod edit;
pub mod error;
pub mod findings;
pub mod model;
pub mod predict;
pub mod probe;
pub mod report;
pub mod rng;

pub use error::{Error, Result};
