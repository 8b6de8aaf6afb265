//! Finding a checkpoint (local directory, a GGUF file, or a Hugging Face hub id) and
//! loading its weights (`model.safetensors`, memory-mapped, `pytorch_model.bin`, or a
//! GGUF file dequantized to f32). Every format is a source of named tensors; the
//! architecture's loader ([`LanguageModel::from_tensors`]) builds the model from them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::{Architecture, Config};
use super::language_model::LanguageModel;
use super::tokenizer::MaskTokenizer;
use crate::error::{Error, Result};

/// Where a model comes from, as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory in Hugging Face layout.
    Local(PathBuf),
    /// A hub repository, e.g. `bert-base-cased` or `org/name`, at a revision.
    Hub {
        /// Repository id.
        repo: String,
        /// Branch, tag or commit (`main` by default).
        revision: String,
    },
}

impl ModelSource {
    /// Interprets `--model`: an existing directory or `.gguf` file is local; something
    /// shaped like a hub id (`name` or `org/name`) is a hub repository; anything else is
    /// an error.
    pub fn parse(spec: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() || (path.is_file() && is_gguf_path(path)) {
            if let Some(rev) = revision {
                return Err(Error::model(
                    path,
                    format!("--revision {rev} only applies to hub models, and this is a local directory"),
                ));
            }
            return Ok(Self::Local(path.to_path_buf()));
        }
        if path.exists() {
            return Err(Error::model(
                path,
                "is a file; --model takes a model directory, a .gguf file or a hub id",
            ));
        }
        if is_hub_id(spec) {
            if let Some(rev) = revision {
                super::hub::check_revision(rev).map_err(|reason| Error::Hub {
                    repo: spec.to_string(),
                    revision: rev.escape_debug().to_string(),
                    reason,
                })?;
            }
            return Ok(Self::Hub {
                repo: spec.to_string(),
                revision: revision.unwrap_or("main").to_string(),
            });
        }
        Err(Error::model(
            path,
            "no such model directory (and not a hub id like `bert-base-cased` or `org/name`)",
        ))
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

/// Whether a path names a GGUF file (by its extension).
fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// `name` or `org/name`, with the characters the hub allows.
fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.starts_with('-')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (parts.len() == 1 || parts.len() == 2)
        && parts.iter().all(|p| part_ok(p))
        && !spec.contains("..")
}

/// The weights file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsFile {
    /// `model.safetensors`
    Safetensors(PathBuf),
    /// `pytorch_model.bin` (a zip of pickled tensors, `torch.save`).
    Pytorch(PathBuf),
    /// A GGUF file: weights, configuration and tokenizer in one (llama.cpp's format).
    Gguf(PathBuf),
}

impl WeightsFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors(p) | Self::Pytorch(p) | Self::Gguf(p) => p,
        }
    }
}

/// The tokenizer files of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerFiles {
    /// A `tokenizer.json` from the tokenizers library.
    Json(PathBuf),
    /// A WordPiece `vocab.txt`, with `tokenizer_config.json` when there is one.
    Vocab {
        /// `vocab.txt`
        vocab: PathBuf,
        /// `tokenizer_config.json`
        config: Option<PathBuf>,
    },
    /// The `tokenizer.ggml.*` metadata of a GGUF file.
    Gguf(PathBuf),
}

impl TokenizerFiles {
    /// The tokenizer files of a Hugging Face layout directory: `tokenizer.json`, else
    /// `vocab.txt` with `tokenizer_config.json` when there is one.
    pub fn in_directory(dir: &Path) -> Result<Self> {
        if dir.join("tokenizer.json").is_file() {
            Ok(Self::Json(dir.join("tokenizer.json")))
        } else if dir.join("vocab.txt").is_file() {
            let tc = dir.join("tokenizer_config.json");
            Ok(Self::Vocab {
                vocab: dir.join("vocab.txt"),
                config: tc.is_file().then_some(tc),
            })
        } else {
            Err(Error::model(dir, "no tokenizer.json or vocab.txt"))
        }
    }

    /// The files the tokenizer is read from.
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            Self::Json(p) | Self::Gguf(p) => vec![p.clone()],
            Self::Vocab { vocab, config } => std::iter::once(vocab.clone())
                .chain(config.clone())
                .collect(),
        }
    }

    /// Finds only the tokenizer of `source`: a hub model's weights are not downloaded
    /// (for commands that need a vocabulary, not a network).
    pub fn locate(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::Local(file) if file.is_file() => Ok(Self::Gguf(file.clone())),
            ModelSource::Local(dir) => Self::in_directory(dir),
            ModelSource::Hub { repo, revision } => super::hub::fetch_tokenizer(repo, revision),
        }
    }
}

/// The local files that make up a checkpoint, once found or downloaded.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for.
    pub source: ModelSource,
    /// For hub models, the commit the files come from (when known).
    pub commit: Option<String>,
    /// `config.json` (a GGUF file: the file itself, whose metadata holds it).
    pub config: PathBuf,
    /// Tokenizer files.
    pub tokenizer: TokenizerFiles,
    /// Weights.
    pub weights: WeightsFile,
}

impl ModelFiles {
    /// Finds the files of `source`, downloading hub files into the Hugging Face cache.
    pub fn locate(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::Local(file) if file.is_file() => Ok(Self::gguf(file, source.clone())),
            ModelSource::Local(dir) => Self::in_directory(dir, source.clone(), None),
            ModelSource::Hub { repo, revision } => super::hub::fetch(repo, revision),
        }
    }

    /// A GGUF file: configuration, tokenizer and weights in one.
    pub fn gguf(file: &Path, source: ModelSource) -> Self {
        Self {
            source,
            commit: None,
            config: file.to_path_buf(),
            tokenizer: TokenizerFiles::Gguf(file.to_path_buf()),
            weights: WeightsFile::Gguf(file.to_path_buf()),
        }
    }

    /// The directory whose other files (tokenizer, …) belong to the model; `None` for a
    /// GGUF file, which holds everything itself.
    pub fn directory(&self) -> Option<PathBuf> {
        match self.weights {
            WeightsFile::Gguf(_) => None,
            _ => Some(
                self.config
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from(".")),
            ),
        }
    }

    /// The checkpoint files in a Hugging Face layout directory.
    pub fn in_directory(dir: &Path, source: ModelSource, commit: Option<String>) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::model(
                dir,
                "no config.json: not a Hugging Face model directory",
            ));
        }
        let tokenizer = TokenizerFiles::in_directory(dir)?;
        let weights = if dir.join("model.safetensors").is_file() {
            WeightsFile::Safetensors(dir.join("model.safetensors"))
        } else if dir.join("pytorch_model.bin").is_file() {
            WeightsFile::Pytorch(dir.join("pytorch_model.bin"))
        } else {
            return Err(Error::model(
                dir,
                "no model.safetensors or pytorch_model.bin",
            ));
        };
        Ok(Self {
            source,
            commit,
            config,
            tokenizer,
            weights,
        })
    }

    /// Every file (and the directory) the model is read from: what no output may overwrite.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.config.clone(), self.weights.path().to_path_buf()];
        paths.extend(self.tokenizer.paths());
        paths.extend(self.directory());
        paths
    }

    /// sha256 of `config.json`, hex; a GGUF file's configuration is in its metadata, so
    /// the file's own hash.
    pub fn config_sha256(&self) -> Result<String> {
        match self.weights {
            WeightsFile::Gguf(_) => self.weights_sha256(),
            _ => sha256_file(&self.config),
        }
    }

    /// sha256 of the tokenizer, hex: of `tokenizer.json`, or of the hashes of
    /// `vocab.txt` and `tokenizer_config.json` (when there is one) together; a GGUF
    /// file's own hash.
    pub fn tokenizer_sha256(&self) -> Result<String> {
        match &self.tokenizer {
            TokenizerFiles::Json(p) => sha256_file(p),
            TokenizerFiles::Gguf(_) => self.weights_sha256(),
            TokenizerFiles::Vocab { vocab, config } => {
                let mut text = sha256_file(vocab)?;
                if let Some(config) = config {
                    text.push('\n');
                    text.push_str(&sha256_file(config)?);
                }
                Ok(sha256_bytes(text.as_bytes()))
            }
        }
    }

    /// sha256 of the weights file, hex. Hashing bert-base takes seconds, so the result
    /// is taken from the hub cache's blob name (the LFS sha256) when the file is one, or
    /// from kn's own cache keyed by path, size and modification time.
    pub fn weights_sha256(&self) -> Result<String> {
        let path = self.weights.path();
        if let Some(blob) = std::fs::canonicalize(path).ok().and_then(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let in_blobs = p.parent()?.file_name()? == "blobs";
            (in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                .then_some(name)
        }) {
            return Ok(blob);
        }
        let key = hash_cache_key(path);
        if let Some((entry, stamp)) = &key {
            if let Ok(text) = std::fs::read_to_string(entry) {
                if let Some(hash) = text.strip_prefix(stamp.as_str()) {
                    return Ok(hash.trim().to_string());
                }
            }
        }
        let hash = sha256_file(path)?;
        if let Some((entry, stamp)) = key {
            // A cache that cannot be written only costs time next run.
            if let Some(dir) = entry.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = std::fs::write(entry, format!("{stamp}{hash}\n"));
        }
        Ok(hash)
    }
}

/// Where the cached hash of a weights file lives, and the stamp (canonical path, size,
/// modification time) that must match for it to be reused. `KN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/kn`, else `~/.cache/kn`.
fn hash_cache_key(path: &Path) -> Option<(PathBuf, String)> {
    let dir = std::env::var_os("KN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kn")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/kn")))?;
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let stamp = format!("{}\t{}\t{}\t", canonical.display(), meta.len(), modified);
    let mut hasher = Sha256::new();
    hasher.update(stamp.as_bytes());
    let name: String = hasher.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some((dir.join("sha256").join(name), stamp))
}

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// sha256 of bytes in memory, as lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads every tensor of a weights file, on the CPU, under its name in the file.
pub fn read_tensors(weights: &WeightsFile) -> Result<Vec<(String, Tensor)>> {
    let path = weights.path();
    let unreadable = |e: candle_core::Error| {
        Error::model(
            path,
            format!("cannot read weights (truncated or corrupt?): {e}"),
        )
    };
    match weights {
        WeightsFile::Safetensors(_) => {
            // SAFETY: the file is mapped read-only; kn never writes to a file it has mapped.
            let mmap = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(unreadable)?;
            mmap.tensors()
                .into_iter()
                .map(|(name, _)| {
                    let t = mmap.load(&name, &Device::Cpu).map_err(unreadable)?;
                    Ok((name, t))
                })
                .collect()
        }
        WeightsFile::Pytorch(_) => {
            candle_core::pickle::read_all_with_key(path, None).map_err(unreadable)
        }
        WeightsFile::Gguf(_) => Ok(super::gguf::read(path)?.tensors),
    }
}

/// Writes tensors as a `model.safetensors` that Python `transformers` also loads: with
/// the `{"format": "pt"}` metadata it checks for (candle's own writer leaves it out).
pub fn write_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), path)
        .map_err(|e| Error::model(path, format!("cannot write weights: {e}")))
}

/// A loaded checkpoint: configuration, tokenizer and model. Cloning shares the weights.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// Where the files came from.
    pub files: ModelFiles,
    /// `config.json`
    pub config: Config,
    /// Prompt and answer tokenization.
    pub tokenizer: MaskTokenizer,
    /// The network.
    pub model: LanguageModel,
}

impl LoadedModel {
    /// Loads config, tokenizer and weights (as `dtype` on `device`), checking every
    /// weight's shape against the configuration.
    pub fn load(files: ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let (config, tokenizer, tensors) = match &files.weights {
            WeightsFile::Gguf(path) => {
                let checkpoint = super::gguf::read(path)?;
                let config = Config::from_json(&checkpoint.config)
                    .map_err(|reason| Error::model(path, reason))?;
                let tokenizer = MaskTokenizer::causal(checkpoint.tokenizer, path)?;
                (config, tokenizer, checkpoint.tensors)
            }
            weights => {
                let config = Config::from_file(&files.config)?;
                let tokenizer = if config.architecture.is_causal() {
                    MaskTokenizer::load_causal(&files.tokenizer)?
                } else {
                    MaskTokenizer::load(&files.tokenizer)?
                };
                (config, tokenizer, read_tensors(weights)?)
            }
        };
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::model(
                &files.config,
                format!(
                    "vocab_size {} is smaller than the tokenizer's {} tokens",
                    config.vocab_size,
                    tokenizer.vocab_size()
                ),
            ));
        }
        let mut tokenizer = tokenizer;
        tokenizer.limit_prompt_length(config.max_prompt_tokens());
        let model =
            LanguageModel::from_tensors(tensors, &config, dtype, device, files.weights.path())?;
        Ok(Self {
            files,
            config,
            tokenizer,
            model,
        })
    }

    /// The model family.
    pub fn architecture(&self) -> Architecture {
        self.config.architecture
    }
}

/// Reads a weights file and builds the model, reporting a missing tensor or a shape
/// that disagrees with `config` against the weights file.
pub fn load_weights(
    weights: &WeightsFile,
    config: &Config,
    dtype: DType,
    device: &Device,
) -> Result<LanguageModel> {
    LanguageModel::from_tensors(
        read_tensors(weights)?,
        config,
        dtype,
        device,
        weights.path(),
    )
}

/// Builds a BERT masked LM from named tensors (tests and the fact-model trainer build
/// BERTs directly); `path` names their source in errors.
pub fn model_from_tensors(
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    config: &Config,
    dtype: DType,
    device: &Device,
    path: &Path,
) -> Result<super::BertMaskedLm> {
    match LanguageModel::from_tensors(tensors, config, dtype, device, path)? {
        LanguageModel::Bert(model) => Ok(model),
        other => Err(Error::model(
            path,
            format!("is a {} model, not a BERT", other.architecture()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised() {
        use crate::model::language_model::normalize_name;
        let bert = |name| normalize_name(Architecture::Bert, name).unwrap();
        assert_eq!(
            bert("bert.encoder.layer.0.output.LayerNorm.gamma"),
            "encoder.layer.0.output.LayerNorm.weight"
        );
        assert_eq!(
            bert("bert.embeddings.LayerNorm.beta"),
            "embeddings.LayerNorm.bias"
        );
        assert_eq!(bert("cls.predictions.bias"), "cls.predictions.bias");
        assert_eq!(
            bert("embeddings.word_embeddings.weight"),
            "embeddings.word_embeddings.weight"
        );
        assert_eq!(
            normalize_name(Architecture::Llama, "model.layers.2.mlp.down_proj.weight").unwrap(),
            "layers.2.mlp.down_proj.weight"
        );
        assert_eq!(
            normalize_name(Architecture::Llama, "lm_head.weight").unwrap(),
            "lm_head.weight"
        );
        assert_eq!(
            normalize_name(Architecture::Gpt2, "transformer.h.0.mlp.c_fc.bias").unwrap(),
            "h.0.mlp.c_fc.bias"
        );
        assert_eq!(normalize_name(Architecture::Gpt2, "h.0.attn.bias"), None);
    }

    #[test]
    fn hub_ids_are_told_from_paths() {
        for id in [
            "bert-base-cased",
            "google-bert/bert-base-uncased",
            "org/model.v2",
        ] {
            assert!(is_hub_id(id), "{id}");
        }
        for not_id in [
            "./model",
            "/abs/model",
            "a/b/c",
            "../x",
            "",
            "has space",
            "org/",
        ] {
            assert!(!is_hub_id(not_id), "{not_id}");
        }
    }
}
