//! Knowledge-neuron attribution: integrated gradients ([`ig`]) on a dedicated
//! activation-gradient engine ([`engine`]), coarse and refined selection ([`select`]),
//! and the records `kn attribute` writes ([`record`]); [`run`] drives a whole input.

pub mod bert;
pub mod decoder;
pub mod engine;
pub mod flat;
pub mod ig;
pub mod kernels;
pub mod merge;
pub mod neurons;
pub mod record;
pub mod refine;
pub mod run;
pub mod select;
mod simd;
pub mod tensor;

use crate::error::{Error, Result};
use crate::model::tokenizer::{EncodedPrompt, MaskTokenizer};
use crate::model::LoadedModel;
use candle_core::DType;
use flat::Engine;
use ig::{IgOptions, Rule};
use record::{FactRecord, Method, ModelInfo, Params, Precision, PromptRecord};
use select::{above, max_score, refine, split_at_threshold};
use tensor::TensorEngine;

pub use neurons::NeuronsFile;

/// Everything that decides what `kn attribute` computes.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeOptions {
    /// Scoring method.
    pub method: Method,
    /// IG points, rule and chunk size.
    pub ig: IgOptions,
    /// Coarse threshold t.
    pub threshold: f64,
    /// Refinement share p.
    pub share: f64,
    /// Refinement floor in prompts.
    pub min_prompts: usize,
    /// Store neurons down to `keep · max` (≤ threshold).
    pub keep: f64,
    /// The engine's float type.
    pub precision: Precision,
    /// Which engine computes the gradients.
    pub engine: EngineChoice,
}

/// Which attribution engine to run (`--engine`). Both give the same scores to rounding
/// (tested to 1e-10 in f64); they differ in where they run fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// The tensor engine on a CUDA device, the flat engine on the CPU.
    #[default]
    Auto,
    /// The flat engine ([`flat::Engine`]): plain buffers, kn's own CPU kernels; the
    /// faster one on a CPU.
    Flat,
    /// The tensor engine ([`tensor::TensorEngine`]): candle ops on the model's device.
    Tensor,
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "flat" => Ok(Self::Flat),
            "tensor" => Ok(Self::Tensor),
            _ => Err(format!("unknown engine {s:?} (auto, flat, tensor)")),
        }
    }
}

impl AttributeOptions {
    /// The paper's settings for `method` (IG: t = 0.2, m = 20, left rule; activation:
    /// t = 0.5), p = 0.7, at least 3 prompts.
    pub fn paper(method: Method) -> Self {
        Self {
            method,
            ig: IgOptions {
                steps: 20,
                rule: Rule::Left,
                chunk: None,
                tolerance: None,
                budget: None,
            },
            threshold: match method {
                Method::IntegratedGradients => 0.2,
                Method::Activation => 0.5,
            },
            share: 0.7,
            min_prompts: 3,
            keep: 0.1,
            precision: Precision::F32,
            engine: EngineChoice::Auto,
        }
    }

    /// Neurons down to this fraction of the max are stored: `keep`, but never above the
    /// threshold (coarse neurons are always stored).
    pub fn stored_fraction(&self) -> f64 {
        self.keep.min(self.threshold)
    }

    /// The parameters as recorded in the output.
    pub fn params(&self) -> Params {
        let ig = self.method == Method::IntegratedGradients;
        Params {
            method: self.method,
            steps: ig.then_some(self.ig.steps),
            rule: ig.then_some(self.ig.rule),
            tolerance: self.ig.tolerance.filter(|_| ig),
            threshold: self.threshold,
            share: self.share,
            min_prompts: self.min_prompts,
            keep: self.stored_fraction(),
            adaptive: None,
            precision: self.precision,
        }
    }
}

/// A fact ready to attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    /// Its id.
    pub id: serde_json::Value,
    /// Its relation.
    pub relation: Option<String>,
    /// The gold answer.
    pub answer: String,
    /// Paraphrased prompts.
    pub prompts: Vec<String>,
}

/// The engine and float type asked for.
enum Engines {
    F32(Engine<f32>),
    F64(Engine<f64>),
    TensorF32(TensorEngine<f32>),
    TensorF64(TensorEngine<f64>),
}

/// Attributes facts with one loaded model.
pub struct Attributor {
    tokenizer: MaskTokenizer,
    /// The model's configuration: how long a prompt it takes.
    config: crate::model::Config,
    engine: Engines,
    options: AttributeOptions,
    model_info: ModelInfo,
}

impl Attributor {
    /// Hashes the weights and moves them into the engine (flat f32 buffers), releasing
    /// the candle model layer by layer: the weights are never held twice in full
    /// (bert-base's are 440 MB).
    pub fn new(lm: LoadedModel, options: AttributeOptions) -> Result<Self> {
        let model_info = model_info(&lm)?;
        let LoadedModel {
            config,
            tokenizer,
            model,
            ..
        } = lm;
        let tensor = match options.engine {
            EngineChoice::Auto => model.device().is_cuda(),
            EngineChoice::Flat => false,
            EngineChoice::Tensor => true,
        };
        Ok(Self {
            tokenizer,
            config: config.clone(),
            engine: match (tensor, options.precision) {
                (false, Precision::F32) => Engines::F32(Engine::from_model(model)?),
                (false, Precision::F64) => Engines::F64(Engine::from_model(model)?),
                (true, Precision::F32) => Engines::TensorF32(TensorEngine::from_model(model)?),
                (true, Precision::F64) => Engines::TensorF64(TensorEngine::from_model(model)?),
                (true, Precision::Bf16) => {
                    Engines::TensorF32(TensorEngine::with_products(model, DType::BF16)?)
                }
                (true, Precision::F16) => {
                    Engines::TensorF32(TensorEngine::with_products(model, DType::F16)?)
                }
                (false, precision @ (Precision::Bf16 | Precision::F16)) => {
                    return Err(Error::Device(format!(
                        "--precision {} runs on the tensor engine (the default on CUDA): add \
                         --engine tensor",
                        precision.name()
                    )))
                }
            },
            options,
            model_info,
        })
    }

    /// The model as recorded in the output.
    pub fn model_info(&self) -> &ModelInfo {
        &self.model_info
    }

    /// The engine that runs: `flat` or `tensor`.
    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engines::F32(_) | Engines::F64(_) => "flat",
            Engines::TensorF32(_) | Engines::TensorF64(_) => "tensor",
        }
    }

    /// The options in use.
    pub fn options(&self) -> &AttributeOptions {
        &self.options
    }

    /// Scores every neuron for every prompt of `fact` and selects its neurons. Errors are
    /// about the fact itself (answer, prompts) and leave nothing half-done.
    pub fn attribute(&self, fact: &Fact) -> Result<FactRecord> {
        if fact.prompts.is_empty() {
            return Err(Error::Prompt("the fact has no prompts".into()));
        }
        let answer_id = self.tokenizer.answer_id(&fact.answer)?;
        let mut prompts = Vec::with_capacity(fact.prompts.len());
        let mut coarse_sets = Vec::with_capacity(fact.prompts.len());
        // Check every prompt before the slow part, so a bad one costs nothing.
        let encoded = fact
            .prompts
            .iter()
            .enumerate()
            .map(|(n, prompt)| {
                self.check_prompt(prompt, &fact.answer, answer_id)
                    .map_err(|e| Error::Prompt(format!("prompt {}: {e}", n + 1)))
            })
            .collect::<Result<Vec<_>>>()?;
        let inputs: Vec<(&[u32], usize)> = encoded
            .iter()
            .map(|e| (&e.ids[..], e.mask_position))
            .collect();
        let attributions = self.scores_of_all(&inputs, answer_id)?;
        for ((prompt, encoded), attribution) in fact.prompts.iter().zip(encoded).zip(attributions) {
            let mask = encoded.mask_position;
            let max = max_score(&attribution.scores);
            let stored = above(&attribution.scores, self.options.stored_fraction());
            let (coarse, kept) = split_at_threshold(stored, max, self.options.threshold);
            coarse_sets.push((max, coarse.clone()));
            let completeness_error = attribution
                .completeness
                .iter()
                .map(|c| c.relative_error())
                .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
            prompts.push(PromptRecord {
                prompt: prompt.clone(),
                mask_position: mask,
                dropped: encoded.dropped,
                gold_probability: attribution.gold_probability,
                max_score: max,
                coarse,
                kept,
                completeness: attribution.completeness,
                completeness_error,
                points: attribution.error_estimate.map(|_| attribution.points),
                error_estimate: attribution.error_estimate,
            });
        }
        Ok(FactRecord {
            id: fact.id.clone(),
            relation: fact.relation.clone(),
            answer: fact.answer.clone(),
            answer_id,
            refined: refine(&coarse_sets, self.options.share, self.options.min_prompts),
            prompts,
            model: self.model_info.clone(),
            params: self.options.params(),
            kn_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// Every neuron's score (all layers, signed) for one prompt and answer.
    pub fn scores(&self, prompt: &str, answer: &str) -> Result<ig::PromptAttribution> {
        let answer_id = self.tokenizer.answer_id(answer)?;
        let encoded = self.check_prompt(prompt, answer, answer_id)?;
        let prompt = (&encoded.ids[..], encoded.mask_position);
        let mut scores = self.scores_of_all(&[prompt], answer_id)?;
        Ok(scores.pop().expect("one prompt"))
    }

    /// The scores of a fact's prompts (token ids, answer position), whose points the
    /// tensor engine evaluates together.
    fn scores_of_all(
        &self,
        prompts: &[(&[u32], usize)],
        answer_id: u32,
    ) -> Result<Vec<ig::PromptAttribution>> {
        match &self.engine {
            Engines::F32(engine) => self.scores_of_passes(engine.prepare_all(prompts)?, answer_id),
            Engines::F64(engine) => self.scores_of_passes(engine.prepare_all(prompts)?, answer_id),
            Engines::TensorF32(engine) => {
                self.scores_of_passes(engine.prepare_all(prompts)?, answer_id)
            }
            Engines::TensorF64(engine) => {
                self.scores_of_passes(engine.prepare_all(prompts)?, answer_id)
            }
        }
    }

    fn scores_of_passes<F: engine::Real>(
        &self,
        passes: Box<dyn engine::PromptPasses<F> + '_>,
        answer_id: u32,
    ) -> Result<Vec<ig::PromptAttribution>> {
        let gold = answer_id as usize;
        match self.options.method {
            Method::IntegratedGradients => {
                ig::integrated_gradients_of_prompts(passes.as_ref(), gold, &self.options.ig)
            }
            Method::Activation => Ok((0..passes.prompts())
                .map(|p| ig::activation_scores(passes.pass(p), gold))
                .collect()),
        }
    }

    /// Tokenizes a prompt and checks it against the model and the answer.
    fn check_prompt(&self, prompt: &str, answer: &str, answer_id: u32) -> Result<EncodedPrompt> {
        let tokenizer = &self.tokenizer;
        let encoded = tokenizer.encode_prompt(prompt)?;
        self.config
            .check_prompt_tokens(encoded.ids.len())
            .map_err(Error::Prompt)?;
        tokenizer.check_answer(prompt, &encoded, answer, answer_id)?;
        Ok(encoded)
    }
}

/// The model's identity for output records.
pub fn model_info(lm: &LoadedModel) -> Result<ModelInfo> {
    use crate::model::ModelSource;
    let (source, revision) = match &lm.files.source {
        ModelSource::Local(p) => (p.display().to_string(), None),
        ModelSource::Hub { repo, revision } => (repo.clone(), Some(revision.clone())),
    };
    Ok(ModelInfo {
        source,
        architecture: lm.architecture(),
        revision,
        commit: lm.files.commit.clone(),
        weights_sha256: lm.files.weights_sha256()?,
        config_sha256: Some(lm.files.config_sha256()?),
        tokenizer_sha256: Some(lm.files.tokenizer_sha256()?),
    })
}
