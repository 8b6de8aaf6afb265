//! What the integrated-gradients loop ([`super::ig`]) needs of a model, whatever its
//! architecture: one normal pass per prompt ([`PromptPass`]) that keeps what the scaled
//! passes reuse, and those passes' gradients with respect to the neurons. Each
//! architecture's engine is in its own file ([`super::bert`]: BERT; [`super::decoder`]:
//! the causal decoders, Llama and GPT-2), on the shared kernels of [`super::kernels`].
//! The device-generic engine of [`super::tensor`] (what runs on CUDA) implements the
//! same [`PromptPass`] in candle ops, and evaluates the points of several prompts in one
//! batch ([`PromptPasses`]).

use crate::error::{Error, Result};

pub use super::kernels::Real;

/// Refuses a prompt longer than the model's positions or with a token id outside its
/// vocabulary: every engine checks the same before embedding.
pub fn check_token_ids(ids: &[u32], max_positions: usize, vocab: usize) -> Result<()> {
    if ids.len() > max_positions {
        return Err(Error::Prompt(format!(
            "prompt is {} tokens long; the model takes at most {max_positions}",
            ids.len()
        )));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::Prompt(format!(
            "token id {id} is outside the model's vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// One layer's result of [`PromptPass::gradients`].
#[derive(Debug, Clone)]
pub struct LayerGradients<F> {
    /// `P(gold)` at each integration point, `[B]`.
    pub probabilities: Vec<F>,
    /// `dP/d(neurons)` at each point, `[B, I]`.
    pub gradients: Vec<F>,
}

/// One prompt's normal forward pass, kept for every layer's integration.
pub trait PromptPass<F: Real>: Sync {
    /// `neurons()[l]`: layer `l`'s neurons at the answer position, `[I]`.
    fn neurons(&self) -> &[Vec<F>];
    /// Vocabulary probabilities at the answer position.
    fn probabilities(&self) -> &[F];
    /// Bytes [`Self::gradients`] keeps for its backward pass per integration point, when
    /// all layers are stacked (sets the batch size under a memory budget).
    fn cache_bytes_per_point(&self) -> usize;
    /// For each layer of `layers` (ascending, distinct) and each `alphas[b]`: the gold
    /// probability when that layer's neurons at the answer position are replaced by
    /// `alphas[b] · w`, and its gradient with respect to the replaced neurons. An error is
    /// the device's ([`crate::error::Error::OutOfMemory`]: the batch was too large).
    fn gradients(
        &self,
        layers: &[usize],
        alphas: &[F],
        gold: usize,
    ) -> Result<Vec<LayerGradients<F>>>;
}

/// One prompt's share of a batch of [`PromptPasses::gradients`].
#[derive(Debug, Clone, Copy)]
pub struct Request<'a, F> {
    /// The prompt, by its index in the [`PromptPasses`].
    pub prompt: usize,
    /// Its layers to integrate, as [`PromptPass::gradients`] takes them.
    pub layers: &'a [usize],
    /// Its integration points.
    pub alphas: &'a [F],
}

/// The normal passes of a fact's prompts (one gold answer), which an engine may
/// integrate together.
pub trait PromptPasses<F: Real>: Sync {
    /// How many prompts.
    fn prompts(&self) -> usize;
    /// Prompt `prompt`'s pass.
    fn pass(&self, prompt: usize) -> &dyn PromptPass<F>;
    /// Whether [`Self::gradients`] evaluates the requests of several prompts as one
    /// batch (the tensor engine: on a GPU, fuller batches and fewer passes). When not,
    /// the IG loop sends each prompt's points on their own.
    fn joint(&self) -> bool {
        false
    }
    /// For each request, what [`PromptPass::gradients`] of its prompt gives.
    fn gradients(
        &self,
        requests: &[Request<'_, F>],
        gold: usize,
    ) -> Result<Vec<Vec<LayerGradients<F>>>> {
        requests
            .iter()
            .map(|r| self.pass(r.prompt).gradients(r.layers, r.alphas, gold))
            .collect()
    }
}

/// Passes that evaluate one prompt at a time (the flat engines, whose batches are
/// already as large as pays on a CPU).
pub struct Separate<'a, F>(pub Vec<Box<dyn PromptPass<F> + 'a>>);

impl<F: Real> PromptPasses<F> for Separate<'_, F> {
    fn prompts(&self) -> usize {
        self.0.len()
    }

    fn pass(&self, prompt: usize) -> &dyn PromptPass<F> {
        self.0[prompt].as_ref()
    }
}
