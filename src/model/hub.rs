//! Fetching a checkpoint from the Hugging Face hub into its normal cache.
//!
//! Uses hf-hub's blocking API, so the environment works as for the Python tools:
//! `HF_HOME` (cache location), `HF_ENDPOINT` (mirror or test server), `HF_TOKEN`, and
//! `HF_HUB_OFFLINE=1` (use the cache only, never the network).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

pub use super::files::check_revision;
use super::files::{ModelFiles, ModelSource, TokenizerFiles};
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
        let cache = Cache::from_env();
        let repo_dir = cache.path().join(hf_repo.folder_name());
        let fetch: Box<FetchFile> = if offline {
            let cached = cache.repo(hf_repo);
            Box::new(move |file| {
                cached
                    .get(file)
                    .map(|path| inside_cache(&repo_dir, path))
                    .transpose()
            })
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
            let cached = cache.repo(hf_repo.clone());
            let remote: ApiRepo = api.repo(hf_repo);
            let token = std::env::var("HF_TOKEN").ok();
            Box::new(move |file| {
                // hf-hub builds cache paths from the hub's answer (ETag, X-Repo-Commit)
                // unchecked: those are checked first, and only a file not yet in the
                // cache is asked for.
                if cached.get(file).is_none() {
                    preflight(&remote.url(file), token.as_deref())?;
                }
                download(&remote, file)?
                    .map(|path| inside_cache(&repo_dir, path))
                    .transpose()
            })
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

/// Whether an ETag or commit from the hub can name a file in the cache: one path part,
/// of the characters hashes are made of.
fn safe_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Asks the hub for a file's ETag and commit as hf-hub will (one byte of it, no
/// redirect) and refuses values that would put a path outside the cache. Anything else
/// (a 404, no network) is left to hf-hub's own request to report.
fn preflight(url: &str, token: Option<&str>) -> std::result::Result<(), String> {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(std::time::Duration::from_secs(60))
        .build();
    let mut request = agent.get(url).set("Range", "bytes=0-0");
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let Ok(response) = request.call() else {
        return Ok(());
    };
    let etag = response
        .header("x-linked-etag")
        .or_else(|| response.header("etag"))
        .map(|e| e.replace('"', ""));
    let commit = response.header("x-repo-commit").map(str::to_string);
    for (header, value) in [("ETag", etag), ("X-Repo-Commit", commit)] {
        if let Some(value) = value.filter(|v| !safe_name(v.trim())) {
            return Err(format!(
                "the hub answered an {header} of {value:?}, which is not a hash; refused \
                 (kn builds cache paths from it)"
            ));
        }
    }
    Ok(())
}

/// `path` (from hf-hub) if it lies inside the repository's cache folder, symlinks
/// followed; an error otherwise.
fn inside_cache(repo_dir: &Path, path: PathBuf) -> std::result::Result<PathBuf, String> {
    let escapes = || {
        format!(
            "the cached file {} lies outside the cache folder {}; refused",
            path.display(),
            repo_dir.display()
        )
    };
    let has_parent_part = path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir));
    let root = repo_dir.canonicalize().map_err(|_| escapes())?;
    let real = path.canonicalize().map_err(|_| escapes())?;
    let snapshot = path
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .ok_or_else(escapes)?;
    if has_parent_part || !real.starts_with(&root) || !snapshot.starts_with(&root) {
        return Err(escapes());
    }
    Ok(path)
}

/// `Ok(None)` when the repository has no such file (404), an error for anything else
/// (a panic in hf-hub included, which a hostile hub's answer can cause).
fn download(repo: &ApiRepo, file: &str) -> std::result::Result<Option<PathBuf>, String> {
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| repo.get(file)))
        .map_err(|_| "the hub client failed on the hub's answer".to_string())?;
    match got {
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
