//! Fetching a checkpoint from the Hugging Face hub into its normal cache.
//!
//! Uses hf-hub's blocking API, so the environment works as for the Python tools:
//! `HF_HOME` (cache location), `HF_ENDPOINT` (mirror or test server), `HF_TOKEN`, and
//! `HF_HUB_OFFLINE=1` (use the cache only, never the network).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::load::{ModelFiles, ModelSource};
use crate::error::{Error, Result};

/// Config first, then the preferred tokenizer and weights files, falling back on the
/// older formats when the repository lacks the newer ones.
const REQUIRED: &[&str] = &["config.json"];
const TOKENIZER_CHOICES: &[&str] = &["tokenizer.json", "vocab.txt"];
const WEIGHTS_CHOICES: &[&str] = &["model.safetensors", "pytorch_model.bin"];
/// Read when present, for `vocab.txt` tokenizers (lower-casing, special tokens).
const OPTIONAL: &[&str] = &["tokenizer_config.json"];

/// Gets one file of the repository: `Ok(None)` when the repository has no such file.
type FetchFile = dyn Fn(&str) -> std::result::Result<Option<PathBuf>, String>;

fn env_truthy(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Downloads (or finds in the cache) the files of `repo` at `revision`.
pub fn fetch(repo: &str, revision: &str) -> Result<ModelFiles> {
    let hub_error = |reason: String| Error::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
        reason,
    };
    let hf_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let fetcher: Box<FetchFile> = if env_truthy("HF_HUB_OFFLINE") {
        let cached = Cache::from_env().repo(hf_repo);
        Box::new(move |file| Ok(cached.get(file)))
    } else {
        let mut builder = ApiBuilder::from_env().with_progress(std::io::stderr().is_terminal());
        if let Ok(token) = std::env::var("HF_TOKEN") {
            builder = builder.with_token(Some(token));
        }
        let api = builder
            .build()
            .map_err(|e| hub_error(format!("cannot set up the hub client: {e}")))?;
        let remote: ApiRepo = api.repo(hf_repo);
        Box::new(move |file| download(&remote, file))
    };
    let offline_hint = if env_truthy("HF_HUB_OFFLINE") {
        " (HF_HUB_OFFLINE is set: only the local cache was searched)"
    } else {
        ""
    };

    let mut snapshot: Option<PathBuf> = None;
    let mut first_of = |choices: &[&str], required: bool| -> Result<()> {
        for file in choices {
            match fetcher(file).map_err(|e| hub_error(format!("{file}: {e}")))? {
                Some(path) => {
                    snapshot.get_or_insert_with(|| parent(&path));
                    return Ok(());
                }
                None => continue,
            }
        }
        if required {
            return Err(hub_error(format!(
                "none of {} found{offline_hint}",
                choices.join(", ")
            )));
        }
        Ok(())
    };
    first_of(REQUIRED, true)?;
    first_of(TOKENIZER_CHOICES, true)?;
    first_of(WEIGHTS_CHOICES, true)?;
    for file in OPTIONAL {
        first_of(&[file], false)?;
    }
    let snapshot = snapshot.ok_or_else(|| hub_error("no files".into()))?;
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
