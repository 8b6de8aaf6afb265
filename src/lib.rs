//! `kn` finds and edits *knowledge neurons* in BERT masked language models (Dai et al.,
//! "Knowledge Neurons in Pretrained Transformers", ACL 2022).
//!
//! The pipeline, module by module:
//! - [`model`]: load a Hugging Face checkpoint (local directory or hub id; safetensors or
//!   PyTorch weights; `tokenizer.json` or `vocab.txt`) and run BERT with access to every
//!   FFN neuron (post-activation intermediate unit) through [`model::FfnHook`]s.
//! - [`predict`]: fill-mask probabilities for cloze prompts.
//! - [`attribution`]: integrated gradients over every FFN neuron at the mask
//!   ([`attribution::ig`]: the loop; [`attribution::engine`]: the activation-only
//!   forward/backward it runs on), coarse and refined neuron sets, `kn attribute` / `kn refine`.
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
