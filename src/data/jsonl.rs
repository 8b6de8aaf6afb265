//! JSON lines in and out. `-` means stdin or stdout. Where a record came from
//! ([`Origin`]) and how two records' JSON differ ([`differences`]), for the readers that
//! merge inputs (`kn merge`, `kn report`).

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The longest line of a facts or prompts input: far above any real fact (ParaRel's
/// longest is under 4 KiB), far below what would exhaust memory in tokenization. A longer
/// line is reported and skipped without being held in memory.
pub const FACT_LINE_LIMIT: usize = 1 << 20;

/// The longest line of a records input (`kn attribute` output read by `kn refine` and
/// `kn report`): a record keeps every neuron above `keep` of every prompt, megabytes for
/// a large model.
pub const RECORD_LINE_LIMIT: usize = 256 << 20;

/// A JSONL input: a file, or stdin for `-`.
pub struct JsonlInput {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    line: usize,
    limit: usize,
}

impl JsonlInput {
    /// Opens `path` (`-` for stdin).
    pub fn open(path: &Path) -> Result<Self> {
        let reader: Box<dyn BufRead> = if path == Path::new("-") {
            Box::new(BufReader::new(std::io::stdin()))
        } else {
            Box::new(BufReader::new(
                File::open(path).map_err(|e| Error::io(path, e))?,
            ))
        };
        Ok(Self::from_reader(path, reader))
    }

    /// Reads from any reader, reporting errors against `path`.
    pub fn from_reader(path: &Path, reader: Box<dyn BufRead>) -> Self {
        let shown = if path == Path::new("-") {
            PathBuf::from("<stdin>")
        } else {
            path.to_path_buf()
        };
        Self {
            path: shown,
            reader,
            line: 0,
            limit: FACT_LINE_LIMIT,
        }
    }

    /// Lines longer than `limit` bytes are reported and skipped ([`FACT_LINE_LIMIT`] by
    /// default).
    pub fn with_line_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Consumes the rest of an overlong line, up to and with its newline, a buffer at a
    /// time.
    fn skip_rest_of_line(&mut self) -> std::io::Result<()> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.reader.consume(i + 1);
                    return Ok(());
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                }
            }
        }
    }

    /// The path used in messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An [`Error::Input`] for a line of this input.
    pub fn error(&self, line: usize, reason: impl std::fmt::Display) -> Error {
        Error::Input {
            path: self.path.clone(),
            line,
            reason: reason.to_string(),
        }
    }

    /// Parses one line's text as `T`, with file and line in the error.
    pub fn parse<T: DeserializeOwned>(&self, line: usize, text: &str) -> Result<T> {
        serde_json::from_str(text).map_err(|e| self.error(line, format!("not a valid record: {e}")))
    }
}

impl JsonlInput {
    /// The next line that parses as `T`, with its line number. Lines that do not parse
    /// go to `errors` (which may stop the run); `None` at the end of the input; an I/O
    /// error ends the run.
    pub fn next_record<T: DeserializeOwned>(
        &mut self,
        errors: &mut LineErrors,
    ) -> Result<Option<(usize, T)>> {
        while let Some(item) = self.next() {
            let parsed = item.and_then(|(line, text)| Ok((line, self.parse(line, &text)?)));
            match parsed {
                Ok(record) => return Ok(Some(record)),
                Err(e @ Error::Io { .. }) => return Err(e),
                Err(e) => errors.fail(e)?,
            }
        }
        Ok(None)
    }
}

/// What to do with a bad input line: report it and go on (ripgrep's way), or stop at
/// the first (`--fail-fast`). Counts the failures.
pub struct LineErrors<'a> {
    fail_fast: bool,
    report: &'a mut dyn FnMut(&Error),
    /// Bad lines so far.
    pub failed: usize,
}

impl<'a> LineErrors<'a> {
    /// `report` is called once per bad line unless `fail_fast`.
    pub fn new(fail_fast: bool, report: &'a mut dyn FnMut(&Error)) -> Self {
        Self {
            fail_fast,
            report,
            failed: 0,
        }
    }

    /// Records a bad line: `Err` (the same error) when the run must stop.
    pub fn fail(&mut self, error: Error) -> Result<()> {
        self.failed += 1;
        if self.fail_fast {
            return Err(error);
        }
        (self.report)(&error);
        Ok(())
    }
}

impl Iterator for JsonlInput {
    /// `(1-based line number, text)`; blank lines are skipped.
    type Item = Result<(usize, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let mut buf = Vec::new();
            self.line += 1;
            // At most one byte past the limit is read: enough to tell an overlong line.
            let read = (&mut self.reader)
                .take(self.limit as u64 + 1)
                .read_until(b'\n', &mut buf);
            match read {
                Ok(0) => return None,
                Ok(_) if buf.len() > self.limit && buf.last() != Some(&b'\n') => {
                    drop(buf);
                    if let Err(e) = self.skip_rest_of_line() {
                        return Some(Err(Error::io(self.path.clone(), e)));
                    }
                    return Some(Err(self.error(
                        self.line,
                        format!(
                            "the line is longer than {}; skipped unread",
                            human_bytes(self.limit)
                        ),
                    )));
                }
                Ok(_) => {
                    let text = match String::from_utf8(buf) {
                        Ok(t) => t,
                        Err(_) => return Some(Err(self.error(self.line, "not valid UTF-8"))),
                    };
                    if text.trim().is_empty() {
                        continue;
                    }
                    return Some(Ok((self.line, text)));
                }
                Err(e) => return Some(Err(Error::io(self.path.clone(), e))),
            }
        }
    }
}

fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// Remembers the fact ids of an input and the line of each, to refuse a second fact
/// with an id already seen (its records would be ambiguous: `kn merge` and `kn report`
/// refuse them, and `--resume` would count one as the other).
#[derive(Debug, Default)]
pub struct SeenIds {
    lines: std::collections::HashMap<String, usize>,
}

impl SeenIds {
    /// Records `id` at `line`; `Err` with the reason when it was seen before.
    pub fn check(
        &mut self,
        id: &serde_json::Value,
        line: usize,
    ) -> std::result::Result<(), String> {
        let key = id.to_string();
        match self.lines.get(&key) {
            Some(&first) => Err(format!(
                "fact id {key} appears twice, on line {first} and on line {line}; ids must \
                 be unique (this line is skipped)"
            )),
            None => {
                self.lines.insert(key, line);
                Ok(())
            }
        }
    }
}

/// Writes one JSON record per line and flushes each, so that a killed run loses at
/// most the record in flight and a downstream pipe sees records as they are made.
pub struct JsonlWriter<W: Write> {
    out: W,
    path: PathBuf,
    written: usize,
    hint: &'static str,
}

impl<W: Write> JsonlWriter<W> {
    /// Wraps `out`; `path` names it in errors (`-` for stdout).
    pub fn new(out: W, path: impl Into<PathBuf>) -> Self {
        Self {
            out,
            path: path.into(),
            written: 0,
            hint: "",
        }
    }

    /// For `kn attribute`'s output: a write error says how `--resume` continues it.
    pub fn resumable(mut self) -> Self {
        self.hint = ", and a partly written last line is not counted as done \
                     (`kn attribute --resume` drops it and redoes that fact)";
        self
    }

    /// Writes `record` as one line and flushes.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|e| {
            Error::io(
                self.path.clone(),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        // The newline goes last, in the same write: a record cut off by a full disk or a
        // kill is a last line without newline, which readers know is not done.
        line.push(b'\n');
        self.out
            .write_all(&line)
            .and_then(|()| self.out.flush())
            .map_err(|e| Error::Write {
                path: self.path.clone(),
                record: self.written + 1,
                hint: self.hint,
                source: e,
            })?;
        self.written += 1;
        Ok(())
    }
}

/// Where a record came from: a file (`<stdin>` for `-`) and, for JSON lines, its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file as shown in messages.
    pub path: PathBuf,
    /// 1-based line of a JSONL record; `None` for a whole-file JSON input.
    pub line: Option<usize>,
}

impl Origin {
    /// The error for a record from here.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        match self.line {
            Some(line) => Error::Input {
                path: self.path.clone(),
                line,
                reason: reason.into(),
            },
            None => Error::InputFile {
                path: self.path.clone(),
                reason: reason.into(),
            },
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// The fields where two JSON values differ, as `name A here, B there`.
pub fn differences(here: &Value, there: &Value) -> String {
    let (Value::Object(a), Value::Object(b)) = (here, there) else {
        return format!("{here} here, {there} there");
    };
    let show = |v: Option<&Value>| v.map_or_else(|| "absent".to_string(), Value::to_string);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k} {} here, {} there", show(a.get(k)), show(b.get(k))))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlong_line_is_reported_and_the_next_lines_still_read() {
        let text = format!("{{\"a\":1}}\n{}\n{{\"b\":2}}\n", "x".repeat(100));
        let input = JsonlInput::from_reader(
            Path::new("f.jsonl"),
            Box::new(std::io::BufReader::with_capacity(
                8,
                std::io::Cursor::new(text),
            )),
        )
        .with_line_limit(50);
        let items: Vec<_> = input.collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().unwrap().0, 1);
        let err = items[1].as_ref().unwrap_err().to_string();
        assert!(
            err.starts_with("f.jsonl:2: the line is longer than 50 bytes"),
            "{err}"
        );
        assert_eq!(items[2].as_ref().unwrap().0, 3);
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_read() {
        let text = format!("{}\n", "x".repeat(50));
        let input =
            JsonlInput::from_reader(Path::new("f.jsonl"), Box::new(std::io::Cursor::new(text)))
                .with_line_limit(50);
        let items: Vec<_> = input.collect();
        assert!(items[0].is_ok());
    }

    #[test]
    fn a_repeated_id_names_both_lines() {
        let mut seen = SeenIds::default();
        seen.check(&serde_json::json!("a"), 1).unwrap();
        seen.check(&serde_json::json!(1), 2).unwrap();
        let err = seen.check(&serde_json::json!("a"), 5).unwrap_err();
        assert!(err.contains("line 1 and on line 5"), "{err}");
    }

    #[test]
    fn differences_name_each_field() {
        let here = serde_json::json!({"threshold": 0.3, "share": 0.7, "steps": 20});
        let there =
            serde_json::json!({"threshold": 0.2, "share": 0.7, "rule": "left", "steps": 20});
        assert_eq!(
            differences(&here, &there),
            "rule absent here, \"left\" there, threshold 0.3 here, 0.2 there"
        );
    }

    #[test]
    fn a_line_origin_makes_input_errors_and_a_file_origin_file_errors() {
        let line = Origin {
            path: "a.jsonl".into(),
            line: Some(3),
        };
        assert_eq!(line.error("bad").to_string(), "a.jsonl:3: bad");
        let file = Origin {
            path: "r.json".into(),
            line: None,
        };
        assert_eq!(file.error("bad").to_string(), "r.json: bad");
    }
}
