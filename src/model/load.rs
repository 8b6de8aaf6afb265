//! Finding a checkpoint (local directory, a GGUF file, or a Hugging Face hub id) and
//! loading its weights (`model.safetensors`, memory-mapped, `pytorch_model.bin`, or a
//! GGUF file dequantized to f32). Every format is a source of named tensors; the
//! architecture's loader ([`LanguageModel::from_tensors`]) builds the model from them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{Architecture, Config};
// Re-exported so that `model::load::{ModelFiles, sha256_file, …}` keep working.
pub use super::files::{
    sha256_bytes, sha256_file, ModelFiles, ModelSource, TokenizerFiles, WeightsFile,
};
use super::language_model::LanguageModel;
use super::tokenizer::MaskTokenizer;
use crate::error::{Error, Result};

/// Finding a model's files: locally, or on the hub (downloading into its cache).
impl ModelFiles {
    /// Finds the files of `source`, downloading hub files into the Hugging Face cache.
    pub fn locate(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::Local(file) if file.is_file() => Ok(Self::gguf(file, source.clone())),
            ModelSource::Local(dir) => Self::in_directory(dir, source.clone(), None),
            ModelSource::Hub { repo, revision } => super::hub::fetch(repo, revision),
        }
    }
}

impl TokenizerFiles {
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
}
