//! Running `kn attribute` over a whole input: sharding, resuming, progress, and bad
//! lines reported with file and line while the rest goes on.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use super::record::{FactLine, ModelInfo, Params};
use super::{Attributor, Fact};
use crate::data::{JsonlInput, JsonlWriter, LineErrors, SeenIds};
use crate::error::{Error, Result};
use crate::predict::RunSummary;

/// Progress of a run; the CLI draws a bar, the library default draws nothing.
pub trait Progress {
    /// The number of facts to do, when known.
    fn set_total(&self, _total: u64) {}
    /// One fact done (or failed).
    fn advance(&self) {}
}

/// No progress display.
pub struct NoProgress;

impl Progress for NoProgress {}

/// `--shard K/N`: the K-th of N disjoint parts of the input (1 ≤ K ≤ N), chosen by a
/// hash of each fact's id, so that it does not depend on line order or on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// K, 1-based.
    pub index: usize,
    /// N.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?}: expected K/N with 1 ≤ K ≤ N, e.g. 3/8");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 {
            return Err(format!("{s:?}: N must be at least 1"));
        }
        if index == 0 || index > count {
            return Err(format!(
                "{s:?}: shard {index} is out of range: K must be between 1 and N = {count}"
            ));
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// Whether the fact with this id belongs to the shard.
    pub fn contains(&self, id: &serde_json::Value) -> bool {
        let hash = crate::data::stable_id_hash(id);
        (hash % self.count as u64) as usize == self.index - 1
    }
}

/// The id of a fact line: its own, or its line number.
pub fn fact_id(line: &FactLine, line_number: usize) -> serde_json::Value {
    line.id
        .clone()
        .unwrap_or_else(|| serde_json::Value::from(line_number))
}

/// Prepares `--resume` on an existing output: checks, reading only, that every whole
/// line is a record made with the same parameters and model (weights, configuration and
/// tokenizer) and that a last line without newline is the start of one (a record cut off
/// by a kill or a full disk); only then drops that cut-off line, so that a file that is
/// not kn's is refused untouched. Returns the ids already done; a missing file resumes
/// nothing.
pub fn prepare_resume(path: &Path, params: &Params, model: &ModelInfo) -> Result<HashSet<String>> {
    let mut done = HashSet::new();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(Error::io(path, e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let want_params = serde_json::to_value(params).unwrap_or_default();
    let want_model = serde_json::to_value(model).unwrap_or_default();
    let refuse = |line: usize, reason: String| Error::Input {
        path: path.to_path_buf(),
        line,
        reason: format!(
            "{reason}; refusing to --resume (use another --out, or remove the file); the file \
             was not changed"
        ),
    };
    let mut lines = 0;
    for (n, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        lines = n + 1;
        let Ok(line) = std::str::from_utf8(line) else {
            return Err(refuse(
                n + 1,
                "not a kn attribute record (not UTF-8)".into(),
            ));
        };
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| refuse(n + 1, format!("not a kn attribute record ({e})")))?;
        if record["params"] != want_params {
            return Err(refuse(
                n + 1,
                format!(
                    "written with other parameters: {} there, {} now",
                    record["params"], want_params
                ),
            ));
        }
        if record["model"] != want_model {
            let reason = if record["model"].get("config_sha256").is_none() {
                format!(
                    "written by a kn that did not record the model's config_sha256, so whether \
                     config.json was the same cannot be told: {} there, {} now",
                    record["model"], want_model
                )
            } else {
                format!(
                    "written with another model: {} there, {} now",
                    record["model"], want_model
                )
            };
            return Err(refuse(n + 1, reason));
        }
        done.insert(record["id"].to_string());
    }
    if complete < bytes.len() {
        // A record is written as one line that starts with its id: anything else after
        // the last newline is not a record cut off by kn, and is not kn's to drop.
        const START: &[u8] = b"{\"id\":";
        let tail = &bytes[complete..];
        let n = tail.len().min(START.len());
        if tail[..n] != START[..n] {
            return Err(refuse(
                // `split` ends with the piece after the last newline: this line.
                lines,
                "the last line has no newline and is not the start of a kn attribute record".into(),
            ));
        }
        // The record in flight when the run was killed: redo that fact.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.set_len(complete as u64)
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(done)
}

/// How a run selects and treats facts.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Only this shard of the facts.
    pub shard: Option<Shard>,
    /// Ids already written (from [`prepare_resume`]).
    pub done: HashSet<String>,
    /// Stop at the first bad line.
    pub fail_fast: bool,
}

impl RunOptions {
    fn wants(&self, id: &serde_json::Value) -> bool {
        self.shard.is_none_or(|s| s.contains(id)) && !self.done.contains(&id.to_string())
    }
}

/// How many facts of a file this run will do (for the progress bar): cheap, it only
/// parses ids. `None` when the input cannot be read ahead (stdin).
pub fn count_pending(path: &Path, options: &RunOptions) -> Option<u64> {
    if path == Path::new("-") {
        return None;
    }
    let input = JsonlInput::open(path).ok()?;
    let mut count = 0;
    for item in input {
        let (line, text) = item.ok()?;
        let id = serde_json::from_str::<FactLine>(&text)
            .map(|f| fact_id(&f, line))
            .unwrap_or_else(|_| serde_json::Value::from(line));
        count += u64::from(options.wants(&id));
    }
    Some(count)
}

/// Attributes every wanted fact of `input`, writing one record per fact. A bad line
/// (not JSON, too long, an id already seen, no answer, no prompts, a prompt or answer
/// the model cannot take) is
/// passed to `report` and skipped, unless `fail_fast`; output and model errors end the run.
pub fn run_attribute<W: Write>(
    attributor: &Attributor,
    mut input: JsonlInput,
    out: &mut JsonlWriter<W>,
    options: &RunOptions,
    progress: &dyn Progress,
    report: &mut dyn FnMut(&Error),
) -> Result<RunSummary> {
    let mut summary = RunSummary::default();
    let mut errors = LineErrors::new(options.fail_fast, report);
    let mut seen = SeenIds::default();
    while let Some((line, parsed)) = input.next_record::<FactLine>(&mut errors)? {
        let id = fact_id(&parsed, line);
        // Checked on every line, in and out of the shard and resumed or not, so that a
        // repeated id is refused the same way in every run over the file.
        if let Err(reason) = seen.check(&id, line) {
            if options.wants(&id) {
                progress.advance();
            }
            errors.fail(input.error(line, reason))?;
            continue;
        }
        if !options.wants(&id) {
            continue;
        }
        let fact = match into_fact(parsed, id) {
            Ok(f) => f,
            Err(reason) => {
                progress.advance();
                errors.fail(input.error(line, reason))?;
                continue;
            }
        };
        let outcome = attributor.attribute(&fact);
        progress.advance();
        match outcome {
            Ok(record) => {
                out.write(&record)?;
                summary.written += 1;
                summary.prompts += record.prompts.len();
            }
            // About this fact (its answer or prompts): report it and go on.
            Err(e @ (Error::Prompt(_) | Error::Tokenizer(_))) => {
                errors.fail(input.error(line, e))?
            }
            Err(e) => return Err(e),
        }
    }
    summary.failed = errors.failed;
    Ok(summary)
}

/// A fact line as a [`Fact`] with `id`, or why it is not one.
pub fn into_fact(line: FactLine, id: serde_json::Value) -> std::result::Result<Fact, String> {
    let answer = line.answer.ok_or("the fact has no \"answer\"")?;
    let prompts = match (line.prompts, line.prompt) {
        (Some(p), None) if !p.is_empty() => p,
        (None, Some(p)) => vec![p],
        (Some(_), Some(_)) => return Err("has both \"prompt\" and \"prompts\"; give one".into()),
        _ => return Err("the fact has no prompts".into()),
    };
    Ok(Fact {
        id,
        relation: line.relation,
        answer,
        prompts,
    })
}
