//! The library's error type: every variant carries the context (file, line, tensor)
//! a user needs to fix the problem.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `kn`'s library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Writing an output record failed part-way (a full disk, a file system gone
    /// read-only). The records before it are whole; the one in flight may be a partial
    /// last line without its newline, which `--resume` and `kn merge` never count as done.
    #[error(
        "{}: cannot write record {record}: {source}; the {} record(s) before it are \
         complete{hint}",
        path.display(),
        record - 1
    )]
    Write {
        /// The output file (`-` for stdout).
        path: PathBuf,
        /// 1-based number of the record in this run's output.
        record: usize,
        /// What the user can do about the output, when the command can continue it
        /// (`kn attribute --resume`); empty otherwise.
        hint: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// One line of a JSONL input is not valid.
    #[error("{}:{line}: {reason}", path.display())]
    Input {
        /// The input file (`-` for stdin).
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// A whole input file (not one of its lines) cannot be used, e.g. a `kn edit`
    /// report made with another model than the rest of a `kn report`'s inputs.
    #[error("{}: {reason}", path.display())]
    InputFile {
        /// The file (`-` for stdin).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// An output that kn refuses to write: it is also an input, another kn run is
    /// writing it, or it is not the kind of file asked for.
    #[error("{}: {reason}", path.display())]
    Output {
        /// The output as given.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },

    /// A plot of `kn report` could not be drawn or written.
    #[error("{}: cannot draw the plot: {source}", path.display())]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What plotters or the PNG encoder said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A model directory or checkpoint cannot be used.
    #[error("{}: {reason}", path.display())]
    Model {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A data set (a directory or file of it) cannot be used.
    #[error("{}: {reason}", path.display())]
    Data {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A model could not be fetched from the Hugging Face hub.
    #[error("hub model {repo} (revision {revision}): {reason}")]
    Hub {
        /// The repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// What went wrong.
        reason: String,
    },

    /// A prompt or answer cannot be used with this model's tokenizer.
    #[error("{0}")]
    Prompt(String),

    /// A neuron that the model does not have.
    #[error("{0}")]
    Neuron(String),

    /// The requested device is not available.
    #[error("{0}")]
    Device(String),

    /// The device ran out of memory even for the smallest batch.
    #[error(
        "out of {device} memory: {reason}; lower --gpu-memory, or pass --chunk with fewer \
         integration points per batch (down to --chunk 1)"
    )]
    OutOfMemory {
        /// `cuda` (or `cpu`).
        device: String,
        /// What the device said.
        reason: String,
    },

    /// A tokenizer error.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Output`] for `path`.
    pub fn output(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Output {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Model`] for `path`.
    pub fn model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
