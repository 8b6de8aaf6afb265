//! Input and output records: JSONL reading with file/line context, line-flushed writing.

pub mod jsonl;
pub mod neurons;

pub use jsonl::{JsonlInput, JsonlWriter, LineErrors};
pub use neurons::NeuronsFile;

/// A hash of a fact id (its JSON text) that is the same on every platform and Rust
/// version, unlike `DefaultHasher`: FNV-1a. It picks shards and seeds per-fact draws.
pub fn stable_id_hash(id: &serde_json::Value) -> u64 {
    id.to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}
