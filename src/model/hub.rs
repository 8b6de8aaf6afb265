//! Fetching a checkpoint from the Hugging Face hub into its normal cache.
//!
//! Uses hf-hub's blocking API, so the environment works as for the Python tools:
//! `HF_HOME` (cache location), `HF_ENDPOINT` (mirror or test server), `HF_TOKEN`, and
//! `HF_HUB_OFFLINE=1` (use the cache only, never the network).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::load::{ModelFiles, ModelSource, TokenizerFiles};
use crate::error::{Error, Result};

/// Config first, then the preferred tokenizer and weights files, falling back on the
/// older formats when the repository lacks the newer ones.
const REQUIRED: &[&str] = &["config.json"];
const TOKENIZER_CHOICES: &[&str] = &["tokenizer.json", "vocab.txt"];
const WEIGHTS_CHOICES: &[&str] = &["model.safetensors", "pytorch_model.bin"];
/// Read when present: for `vocab.txt` tokenizers (lower-casing, special tokens), and
/// `config.json` to tell a causal model's tokenizer from a masked one's.
const OPTIONAL: &[&str] = &["tokenizer_config.json", "config.json"];

/// Gets one file of the repository: `Ok(None)` when the repository has no such file.
type FetchFile = dyn Fn(&str) -> std::result::Result<Option<PathBuf>, String>;

fn env_truthy(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// A repository at a revision, read through the hub client or, with `HF_HUB_OFFLINE`,
/// from the local cache only.
struct HubRepo {
    repo: String,
    revision: String,
    fetch: Box<FetchFile>,
    /// Appended to "not found" messages.
    offline_hint: &'static str,
    /// The snapshot folder of the first file found: every file of one commit is there.
    snapshot: Option<PathBuf>,
}

impl HubRepo {
    fn open(repo: &str, revision: &str) -> Result<Self> {
        let hf_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
        let offline = env_truthy("HF_HUB_OFFLINE");
        let fetch: Box<FetchFile> = if offline {
            let cached = Cache::from_env().repo(hf_repo);
            Box::new(move |file| Ok(cached.get(file)))
        } else {
            let mut builder = ApiBuilder::from_env().with_progress(std::io::stderr().is_terminal());
            if let Ok(token) = std::env::var("HF_TOKEN") {
                builder = builder.with_token(Some(token));
            }
            let api = builder.build().map_err(|e| Error::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
                reason: format!("cannot set up the hub client: {e}"),
            })?;
            let remote: ApiRepo = api.repo(hf_repo);
            Box::new(move |file| download(&remote, file))
        };
        Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
            fetch,
            offline_hint: if offline {
                " (HF_HUB_OFFLINE is set: only the local cache was searched)"
            } else {
                ""
            },
            snapshot: None,
        })
    }

    fn error(&self, reason: String) -> Error {
        Error::Hub {
            repo: self.repo.clone(),
            revision: self.revision.clone(),
            reason,
        }
    }

    /// Gets the first of `choices` the repository has; an error when none is there and
    /// the file is `required`.
    fn first_of(&mut self, choices: &[&str], required: bool) -> Result<()> {
        for file in choices {
            if let Some(path) =
                (self.fetch)(file).map_err(|e| self.error(format!("{file}: {e}")))?
            {
                self.snapshot.get_or_insert_with(|| parent(&path));
                return Ok(());
            }
        }
        if required {
            return Err(self.error(format!(
                "none of {} found{}",
                choices.join(", "),
                self.offline_hint
            )));
        }
        Ok(())
    }

    /// The snapshot folder holding the files fetched so far.
    fn snapshot(&self) -> Result<PathBuf> {
        self.snapshot
            .clone()
            .ok_or_else(|| self.error("no files".into()))
    }
}

/// Downloads (or finds in the cache) the files of `repo` at `revision`.
pub fn fetch(repo: &str, revision: &str) -> Result<ModelFiles> {
    let mut hub = HubRepo::open(repo, revision)?;
    hub.first_of(REQUIRED, true)?;
    hub.first_of(TOKENIZER_CHOICES, true)?;
    hub.first_of(WEIGHTS_CHOICES, true)?;
    for file in OPTIONAL {
        hub.first_of(&[file], false)?;
    }
    let snapshot = hub.snapshot()?;
    // The cache keeps one snapshot folder per commit: its name is the commit.
    let commit = snapshot
        .file_name()
        .map(|c| c.to_string_lossy().into_owned());
    ModelFiles::in_directory(
        &snapshot,
        ModelSource::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
        },
        commit,
    )
}

/// Downloads (or finds in the cache) only the tokenizer files of `repo` at `revision`.
pub fn fetch_tokenizer(repo: &str, revision: &str) -> Result<TokenizerFiles> {
    let mut hub = HubRepo::open(repo, revision)?;
    hub.first_of(TOKENIZER_CHOICES, true)?;
    for file in OPTIONAL {
        hub.first_of(&[file], false)?;
    }
    TokenizerFiles::in_directory(&hub.snapshot()?)
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `Ok(None)` when the repository has no such file (404), an error for anything else.
fn download(repo: &ApiRepo, file: &str) -> std::result::Result<Option<PathBuf>, String> {
    match repo.get(file) {
        Ok(path) => Ok(Some(path)),
        Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
        Err(ApiError::RequestError(e)) => Err(match *e {
            ureq::Error::Status(code, _) => format!("the hub answered HTTP {code}"),
            ureq::Error::Transport(t) => format!(
                "the hub could not be reached ({t}); pass a local model directory, or set \
                 HF_HUB_OFFLINE=1 to use the local cache"
            ),
        }),
        Err(e) => Err(e.to_string()),
    }
}
