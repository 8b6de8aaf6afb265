//! Input and output records: JSONL reading with file/line context, line-flushed writing.

pub mod jsonl;

pub use jsonl::{JsonlInput, JsonlWriter, LineErrors};
