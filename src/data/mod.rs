//! Input and output records: JSONL reading with file/line context, line-flushed writing,
//! and ParaRel's patterns and facts turned into fact JSONL.

pub mod jsonl;
pub mod pararel;

pub use jsonl::{JsonlInput, JsonlWriter, LineErrors};
