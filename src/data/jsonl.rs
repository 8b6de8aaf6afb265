//! JSON lines in and out. `-` means stdin or stdout.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// A JSONL input: a file, or stdin for `-`.
pub struct JsonlInput {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    line: usize,
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
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => return None,
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

/// Writes one JSON record per line and flushes each, so that a killed run loses at
/// most the record in flight and a downstream pipe sees records as they are made.
pub struct JsonlWriter<W: Write> {
    out: W,
    path: PathBuf,
    written: usize,
}

impl<W: Write> JsonlWriter<W> {
    /// Wraps `out`; `path` names it in errors (`-` for stdout).
    pub fn new(out: W, path: impl Into<PathBuf>) -> Self {
        Self {
            out,
            path: path.into(),
            written: 0,
        }
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
                source: e,
            })?;
        self.written += 1;
        Ok(())
    }
}
