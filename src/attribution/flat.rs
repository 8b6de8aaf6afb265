//! The flat engines of every architecture behind one type ([`Engine`]): BERT's
//! ([`super::bert`]) and the causal decoders' ([`super::decoder`]), chosen by the loaded
//! model. They implement [`super::engine`]'s [`PromptPass`], which the
//! integrated-gradients loop runs.

use super::bert::BertEngine;
use super::decoder::DecoderEngine;
use super::engine::{PromptPass, PromptPasses, Real, Separate};
use crate::error::Result;
use crate::model::LanguageModel;

/// An attribution engine of any architecture: the weights as flat buffers.
#[derive(Debug, Clone)]
pub enum Engine<F> {
    /// BERT masked LMs.
    Bert(BertEngine<F>),
    /// Causal decoders (Llama family, GPT-2).
    Decoder(DecoderEngine<F>),
}

impl<F: Real> Engine<F> {
    /// Moves a loaded model's weights into the engine of its architecture, releasing the
    /// candle model layer by layer.
    pub fn from_model(model: LanguageModel) -> Result<Self> {
        Ok(match model {
            LanguageModel::Bert(m) => Self::Bert(BertEngine::from_model(m)?),
            LanguageModel::Llama(m) => Self::Decoder(DecoderEngine::from_llama(m)?),
            LanguageModel::Gpt2(m) => Self::Decoder(DecoderEngine::from_gpt2(m)?),
        })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        match self {
            Self::Bert(e) => e.layers(),
            Self::Decoder(e) => e.layers(),
        }
    }

    /// Neurons per layer.
    pub fn intermediate(&self) -> usize {
        match self {
            Self::Bert(e) => e.intermediate(),
            Self::Decoder(e) => e.intermediate(),
        }
    }

    /// The normal pass of one prompt's token ids, read at `position` (a BERT's mask, a
    /// causal model's last token).
    pub fn prepare(&self, ids: &[u32], position: usize) -> Result<Box<dyn PromptPass<F> + '_>> {
        Ok(match self {
            Self::Bert(e) => Box::new(e.prepare(ids, position)?),
            Self::Decoder(e) => Box::new(e.prepare(ids, position)?),
        })
    }

    /// The normal passes of several prompts (token ids, answer position), integrated one
    /// prompt at a time.
    pub fn prepare_all(
        &self,
        prompts: &[(&[u32], usize)],
    ) -> Result<Box<dyn PromptPasses<F> + '_>> {
        let passes = prompts
            .iter()
            .map(|&(ids, position)| self.prepare(ids, position))
            .collect::<Result<_>>()?;
        Ok(Box::new(Separate(passes)))
    }
}
