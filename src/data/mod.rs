//! Input and output records: JSONL reading with file/line context, line-flushed writing,
//! output safety (never over an input, one writer, whole or absent), and ParaRel's patterns and facts turned into fact JSONL.

pub mod jsonl;
pub mod output;
pub mod pararel;

/// The placeholder users write in prompts where the answer goes, whatever the model's
/// own mask token is (`model::tokenizer` puts the model's in its place).
pub const MASK_PLACEHOLDER: &str = "[MASK]";

pub use jsonl::{JsonlInput, JsonlWriter, LineErrors, Origin, SeenIds};

/// A hash of a fact id (its JSON text) that is the same on every platform and Rust
/// version: it picks shards and seeds per-fact draws.
pub fn stable_id_hash(id: &serde_json::Value) -> u64 {
    crate::rng::stable_hash(&id.to_string())
}
