//! `kn merge`: the shards of one `kn attribute` (or `kn refine`) run as one file.
//!
//! Shards are the outputs of `kn attribute --shard K/N` (a Slurm array, GNU parallel),
//! possibly rerun after a task died. Merging them is checked where a `cat` would not be:
//!
//! - every record must come from the model (same `weights_sha256`, and `config_sha256`
//!   and `tokenizer_sha256` where recorded) and the parameters of
//!   the first one, or the merge is refused with what differs (as `kn report` refuses);
//! - a fact present twice (a task rerun over an output that another copy of it also
//!   wrote, overlapping shard specs) is kept once when both copies are the same record,
//!   and refused with its id and both places otherwise;
//! - a last line without its newline (a task killed, or out of disk space, while it
//!   wrote a record) is refused: that record is not done, and `kn attribute --resume`
//!   on that shard redoes it.
//!
//! Records are copied as they are (bytes, not re-serialised), in the order of the files
//! given and of their lines, so a merge of the shards of a run holds the same lines as
//! the unsharded run, in another order.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::record::{comparable_params, FactRecord, ModelInfo};
use crate::data::jsonl::{differences, Origin};
use crate::error::{Error, Result};

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeSummary {
    /// Input files read.
    pub files: usize,
    /// Records written.
    pub written: usize,
    /// Records dropped because an identical copy was already written.
    pub duplicates: usize,
}

/// Where the first copy of a fact is, and a digest of its bytes (the records themselves
/// are not kept: a full ParaRel output is gigabytes).
struct Seen {
    origin: Origin,
    digest: [u8; 32],
}

/// Merges the records of `paths` into `out` (see the module documentation). Nothing is
/// checked twice, but everything is checked before the function returns `Ok`: on an
/// error, `out` may hold part of the merge, and the caller should discard it.
pub fn merge<W: Write>(paths: &[PathBuf], out: &mut W, out_name: &Path) -> Result<MergeSummary> {
    let mut summary = MergeSummary::default();
    let mut model: Option<(Origin, ModelInfo)> = None;
    let mut params: Option<(Origin, Value)> = None;
    let mut seen: HashMap<String, Seen> = HashMap::new();
    for path in paths {
        summary.files += 1;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let mut line_number = 0;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            line_number += 1;
            let here = Origin {
                path: path.clone(),
                line: Some(line_number),
            };
            if buf.last() != Some(&b'\n') {
                return Err(here.error(
                    "the last record is cut off (no newline: the task was killed or ran out \
                     of disk space while writing it); it is not done: rerun this shard with \
                     `kn attribute --resume`, which redoes it",
                ));
            }
            let text = std::str::from_utf8(&buf)
                .map_err(|_| here.error("not valid UTF-8"))?
                .trim_end();
            if text.is_empty() {
                continue;
            }
            let record: FactRecord = serde_json::from_str(text)
                .map_err(|e| here.error(format!("not a kn attribute record: {e}")))?;
            match &model {
                None => model = Some((here.clone(), record.model.clone())),
                Some((there, first)) => {
                    if let Some(difference) = record.model.difference(first) {
                        return Err(here.error(format!(
                            "made with another model than {there}: {difference}; kn merge \
                             merges only shards of one run"
                        )));
                    }
                }
            }
            let these = comparable_params(&record.params);
            match &params {
                None => params = Some((here.clone(), these)),
                Some((there, first)) if *first != these => {
                    return Err(here.error(format!(
                        "made with other parameters than {there}: {}; kn merge merges only \
                         shards of one run",
                        differences(&these, first)
                    )))
                }
                Some(_) => {}
            }
            let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            let id = record.id.to_string();
            if let Some(first) = seen.get(&id) {
                if first.digest == digest {
                    summary.duplicates += 1;
                    continue;
                }
                let what = match read_line(&first.origin) {
                    Ok(there) => {
                        let here_value: Value = serde_json::from_str(text).unwrap_or_default();
                        format!(": {}", differing_fields(&here_value, &there))
                    }
                    Err(_) => String::new(),
                };
                return Err(here.error(format!(
                    "fact id {id} is also at {}, and the two records differ{what}; \
                     kn merge keeps a fact twice only when both copies are the same",
                    first.origin
                )));
            }
            seen.insert(
                id,
                Seen {
                    origin: here,
                    digest,
                },
            );
            out.write_all(text.as_bytes())
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|e| Error::io(out_name, e))?;
            summary.written += 1;
        }
    }
    out.flush().map_err(|e| Error::io(out_name, e))?;
    Ok(summary)
}

/// The record at `origin`, read again (to say how two copies of a fact differ).
fn read_line(origin: &Origin) -> Result<Value> {
    let file = std::fs::File::open(&origin.path).map_err(|e| Error::io(&origin.path, e))?;
    let wanted = origin.line.unwrap_or(1);
    let line = BufReader::new(file)
        .lines()
        .nth(wanted - 1)
        .ok_or_else(|| origin.error("gone"))?
        .map_err(|e| Error::io(&origin.path, e))?;
    serde_json::from_str(&line).map_err(|e| origin.error(e.to_string()))
}

/// The top-level fields where two records differ, with both values when they are short
/// (a whole `prompts` list would bury the message).
fn differing_fields(here: &Value, there: &Value) -> String {
    let (Value::Object(a), Value::Object(b)) = (here, there) else {
        return String::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| v.map_or_else(|| "absent".to_string(), Value::to_string);
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let (x, y) = (show(a.get(k)), show(b.get(k)));
            if x.len() + y.len() <= 120 {
                format!("{k} {x} here, {y} there")
            } else {
                format!("{k} differs")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
