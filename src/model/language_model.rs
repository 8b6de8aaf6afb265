//! One type for every architecture kn reads: what predict, probe, edit and the
//! attribution engine need of a model, whatever its family. Each architecture's
//! forward pass lives in its own file ([`super::bert`], [`super::llama`], [`super::gpt2`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::bert::{BertMaskedLm, FfnHook};
use super::config::{Architecture, Config};
use super::gpt2::Gpt2;
use super::llama::Llama;
use super::nn::softmax_last_dim;
use crate::error::{Error, Result};

/// A loaded network of any supported architecture.
#[derive(Debug, Clone)]
pub enum LanguageModel {
    /// A BERT masked LM.
    Bert(BertMaskedLm),
    /// A Llama-family causal LM.
    Llama(Llama),
    /// A GPT-2 causal LM.
    Gpt2(Gpt2),
}

/// Maps a checkpoint's tensor names to the names the architecture's loader expects:
/// drops the wrapper prefix (`bert.`, `model.`, `transformer.`) and renames TF-era
/// LayerNorm `gamma`/`beta`. Buffers that are not weights (GPT-2's causal-mask
/// `attn.bias`, `attn.masked_bias`) give `None`.
pub fn normalize_name(architecture: Architecture, name: &str) -> Option<String> {
    match architecture {
        Architecture::Bert => {
            let name = name.strip_prefix("bert.").unwrap_or(name);
            Some(if let Some(stem) = name.strip_suffix(".gamma") {
                format!("{stem}.weight")
            } else if let Some(stem) = name.strip_suffix(".beta") {
                format!("{stem}.bias")
            } else {
                name.to_string()
            })
        }
        Architecture::Llama => Some(name.strip_prefix("model.").unwrap_or(name).to_string()),
        Architecture::Gpt2 => {
            let name = name.strip_prefix("transformer.").unwrap_or(name);
            let buffer = name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias");
            (!buffer).then(|| name.to_string())
        }
    }
}

/// The normalised name of the tensor holding layer `layer`'s value slots, and whether
/// the file stores a slot as a row (GPT-2's Conv1D `[intermediate, hidden]`) rather than
/// a column (`[hidden, intermediate]`).
pub fn value_slot_tensor(architecture: Architecture, layer: usize) -> (String, bool) {
    match architecture {
        Architecture::Bert => (format!("encoder.layer.{layer}.output.dense.weight"), false),
        Architecture::Llama => (format!("layers.{layer}.mlp.down_proj.weight"), false),
        Architecture::Gpt2 => (format!("h.{layer}.mlp.c_proj.weight"), true),
    }
}

impl LanguageModel {
    /// Builds the model of `config`'s architecture from named tensors in any checkpoint
    /// layout (see [`normalize_name`]); `path` names their source in errors. Every shape
    /// is checked against `config` here.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        config: &Config,
        dtype: DType,
        device: &Device,
        path: &Path,
    ) -> Result<Self> {
        let arch = config.architecture;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .filter_map(|(name, t)| Some((normalize_name(arch, &name)?, t)))
            .collect();
        if tensors.is_empty() {
            return Err(Error::model(
                path,
                "holds no tensor kn knows (an empty checkpoint, or not a language model)",
            ));
        }
        if arch == Architecture::Bert && !tensors.keys().any(|k| k.starts_with("cls.predictions."))
        {
            return Err(Error::model(
                path,
                "has no masked-LM head (cls.predictions.*): this checkpoint is an encoder only \
                 (e.g. a sentence-embedding model), not a BERT masked LM",
            ));
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let model = match arch {
            Architecture::Bert => BertMaskedLm::load(vb, config).map(Self::Bert),
            Architecture::Llama => Llama::load(vb, config).map(Self::Llama),
            Architecture::Gpt2 => Gpt2::load(vb, config).map(Self::Gpt2),
        };
        model.map_err(|e| {
            Error::model(
                path,
                format!("does not match config.json (checked at load time): {e}"),
            )
        })
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &Config {
        match self {
            Self::Bert(m) => &m.config,
            Self::Llama(m) => &m.config,
            Self::Gpt2(m) => &m.config,
        }
    }

    /// The model family.
    pub fn architecture(&self) -> Architecture {
        self.config().architecture
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Bert(m) => m.device(),
            Self::Llama(m) => m.device(),
            Self::Gpt2(m) => m.device(),
        }
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Bert(m) => m.dtype(),
            Self::Llama(m) => m.dtype(),
            Self::Gpt2(m) => m.dtype(),
        }
    }

    /// Vocabulary logits `[batch, vocab]` at one position per batch item (a BERT's mask,
    /// a causal model's last prompt token). `keep` `[batch, seq]` is 0 on padding
    /// (causal models take right padding only). The head runs only on those rows.
    pub fn logits_at(
        &self,
        input_ids: &Tensor,
        keep: Option<&Tensor>,
        positions: &[usize],
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let (hidden, head) = match self {
            Self::Bert(m) => return m.logits_at(input_ids, keep, positions, hook),
            Self::Llama(m) => (m.encode(input_ids, keep, hook)?, &m.lm_head),
            Self::Gpt2(m) => (m.encode(input_ids, keep, hook)?, &m.lm_head),
        };
        let rows = BertMaskedLm::rows_at(&hidden, positions)?;
        Ok(rows.matmul(&head.t()?)?)
    }

    /// Vocabulary probabilities `[batch, vocab]` at one position per batch item.
    pub fn probabilities_at(
        &self,
        input_ids: &Tensor,
        keep: Option<&Tensor>,
        positions: &[usize],
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let logits = self.logits_at(input_ids, keep, positions, hook)?;
        Ok(softmax_last_dim(&logits)?)
    }

    /// The input embedding matrix E `[vocab, hidden]` (the update rule's and erase's).
    pub fn input_embeddings(&self) -> &Tensor {
        match self {
            Self::Bert(m) => &m.embeddings.word_embeddings,
            Self::Llama(m) => &m.embed_tokens,
            Self::Gpt2(m) => &m.wte,
        }
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.config().num_hidden_layers
    }

    /// Layer `layer`'s FFN output projection `[hidden, intermediate]`: neuron `i`'s value
    /// slot is its column `i`.
    pub fn value_slots(&self, layer: usize) -> Option<&Tensor> {
        match self {
            Self::Bert(m) => m.layers.get(layer).map(|l| &l.output.weight),
            Self::Llama(m) => m.layers.get(layer).map(|l| &l.mlp.down_proj.weight),
            Self::Gpt2(m) => m.blocks.get(layer).map(|b| &b.c_proj.weight),
        }
    }

    /// Replaces layer `layer`'s FFN output projection (`[hidden, intermediate]`, as
    /// [`Self::value_slots`] gives it).
    pub fn set_value_slots(&mut self, layer: usize, weight: Tensor) -> Result<()> {
        let slot = match self {
            Self::Bert(m) => m.layers.get_mut(layer).map(|l| &mut l.output.weight),
            Self::Llama(m) => m.layers.get_mut(layer).map(|l| &mut l.mlp.down_proj.weight),
            Self::Gpt2(m) => m.blocks.get_mut(layer).map(|b| &mut b.c_proj.weight),
        };
        let slot = slot.ok_or_else(|| Error::Neuron(format!("layer {layer} does not exist")))?;
        if slot.dims() != weight.dims() {
            return Err(Error::Neuron(format!(
                "layer {layer}'s value slots are {:?}, not {:?}",
                slot.dims(),
                weight.dims()
            )));
        }
        *slot = weight;
        Ok(())
    }
}
