//! `kn predict`: fill-mask predictions for cloze prompts.
//!
//! # Format
//!
//! Input, one JSON object a line: `"prompt"` (one `[MASK]`) or `"prompts"` (a list of
//! them), optional `"answer"` (one vocabulary token) and `"id"` (any JSON value, copied
//! to the output). Other fields are ignored.
//!
//! Output, one [`Prediction`] a prompt, in input order:
//!
//! ```json
//! {"line":1,"id":"q1","prompt_index":0,"prompt":"The capital of France is [MASK].",
//!  "mask_position":6,"predictions":[{"token":"paris","id":3000,"probability":0.91}, …],
//!  "answer":"Paris","answer_id":3000,"answer_probability":0.91,"answer_rank":1}
//! ```
//!
//! `prompt_index` is the prompt's place in `"prompts"` (0 for `"prompt"`); the answer
//! fields appear only when the line has an answer. `answer_rank` is 1 + the number of
//! tokens with a strictly higher probability.

use std::io::Write;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::{JsonlInput, JsonlWriter, LineErrors};
use crate::error::{Error, Result};
use crate::model::{EncodedPrompt, FfnHook, LanguageModel, LoadedModel};

/// One input line of `kn predict`.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptLine {
    /// Copied to the output.
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    /// A single prompt.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Several prompts (paraphrases).
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    /// The gold answer: one vocabulary token.
    #[serde(default)]
    pub answer: Option<String>,
}

impl PromptLine {
    /// The prompts of the line, whichever field holds them.
    pub fn into_prompts(self) -> std::result::Result<Vec<String>, String> {
        match (self.prompt, self.prompts) {
            (Some(p), None) => Ok(vec![p]),
            (None, Some(ps)) if ps.is_empty() => Err("\"prompts\" is empty".into()),
            (None, Some(ps)) => Ok(ps),
            (Some(_), Some(_)) => Err("has both \"prompt\" and \"prompts\"; give one".into()),
            (None, None) => Err("has neither \"prompt\" nor \"prompts\"".into()),
        }
    }
}

/// A token and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenProbability {
    /// The token as the vocabulary spells it.
    pub token: String,
    /// Its id.
    pub id: u32,
    /// Softmax probability at the mask position.
    pub probability: f64,
}

/// One output line of `kn predict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Input line number (1-based).
    pub line: usize,
    /// The input's `id`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    /// Place of the prompt in the line's `prompts` (0 for `prompt`).
    pub prompt_index: usize,
    /// The prompt as given.
    pub prompt: String,
    /// Index of the mask token in the tokenized input (after `[CLS]`).
    pub mask_position: usize,
    /// The top-k tokens, most probable first.
    pub predictions: Vec<TokenProbability>,
    /// The gold answer, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Its token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_id: Option<u32>,
    /// Its probability at the mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_probability: Option<f64>,
    /// 1 + the number of tokens more probable than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_rank: Option<usize>,
}

/// The probability distribution at the mask of one prompt.
#[derive(Debug, Clone)]
pub struct MaskDistribution {
    /// Index of the mask token.
    pub mask_position: usize,
    /// Probability of every vocabulary token.
    pub probabilities: Vec<f32>,
}

impl MaskDistribution {
    /// The `k` most probable tokens, ties broken by id.
    pub fn top_k(&self, k: usize) -> Vec<(u32, f32)> {
        let mut order: Vec<u32> = (0..self.probabilities.len() as u32).collect();
        order.sort_by(|&a, &b| {
            self.probabilities[b as usize]
                .total_cmp(&self.probabilities[a as usize])
                .then(a.cmp(&b))
        });
        order
            .into_iter()
            .take(k)
            .map(|id| (id, self.probabilities[id as usize]))
            .collect()
    }

    /// 1 + the number of tokens strictly more probable than `id`.
    pub fn rank(&self, id: u32) -> usize {
        let p = self.probabilities[id as usize];
        1 + self.probabilities.iter().filter(|&&q| q > p).count()
    }
}

/// Runs one prompt through the model (with `hook` on the neurons) and returns the
/// distribution at its mask.
pub fn mask_distribution(
    lm: &LoadedModel,
    prompt: &str,
    hook: &dyn FfnHook,
) -> Result<MaskDistribution> {
    let encoded = lm.tokenizer.encode_prompt(prompt)?;
    lm.config
        .check_prompt_tokens(encoded.ids.len())
        .map_err(Error::Prompt)?;
    let ids = Tensor::new(encoded.ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let probs = lm
        .model
        .probabilities_at(&ids, None, &[encoded.mask_position], hook)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(MaskDistribution {
        mask_position: encoded.mask_position,
        probabilities: probs,
    })
}

/// Tokenizes prompts for a batch, naming the failing prompt.
pub fn encode_prompts(lm: &LoadedModel, prompts: &[String]) -> Result<Vec<EncodedPrompt>> {
    if prompts.is_empty() {
        return Err(Error::Prompt("the fact has no prompts".into()));
    }
    prompts
        .iter()
        .enumerate()
        .map(|(n, prompt)| {
            lm.tokenizer
                .encode_prompt(prompt)
                .map_err(|e| Error::Prompt(format!("prompt {}: {e}", n + 1)))
        })
        .collect()
}

/// Runs several prompts as one padded batch (with `hook` on the neurons) and returns
/// the distribution at each one's mask, in order. Padded keys get zero attention weight,
/// so each row equals its own unpadded forward pass.
pub fn mask_distributions(
    lm: &LoadedModel,
    prompts: &[EncodedPrompt],
    hook: &dyn FfnHook,
) -> Result<Vec<MaskDistribution>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let PaddedBatch {
        ids,
        keep,
        positions,
    } = padded_batch(&lm.model, prompts)?;
    let probabilities = lm
        .model
        .probabilities_at(&ids, Some(&keep), &positions, hook)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    Ok(positions
        .into_iter()
        .zip(probabilities)
        .map(|(mask_position, probabilities)| MaskDistribution {
            mask_position,
            probabilities,
        })
        .collect())
}

/// Prompts as one right-padded batch: token ids and the keep mask `[batch, seq]` (0 on
/// padding), and each prompt's answer position.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// Token ids `[batch, seq]`, 0 on padding.
    pub ids: Tensor,
    /// 1 on tokens, 0 on padding `[batch, seq]`.
    pub keep: Tensor,
    /// Each prompt's answer position.
    pub positions: Vec<usize>,
}

/// Pads `prompts` (not empty) into one batch on the model's device, refusing one longer
/// than the model takes (its positions, or a sliding window).
pub fn padded_batch(model: &LanguageModel, prompts: &[EncodedPrompt]) -> Result<PaddedBatch> {
    let seq = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    model
        .config()
        .check_prompt_tokens(seq)
        .map_err(Error::Prompt)?;
    let batch = prompts.len();
    let mut ids = vec![0u32; batch * seq];
    let mut keep = vec![0u32; batch * seq];
    for (b, prompt) in prompts.iter().enumerate() {
        ids[b * seq..b * seq + prompt.ids.len()].copy_from_slice(&prompt.ids);
        keep[b * seq..b * seq + prompt.ids.len()].fill(1);
    }
    let device = model.device();
    Ok(PaddedBatch {
        ids: Tensor::from_vec(ids, (batch, seq), device)?,
        keep: Tensor::from_vec(keep, (batch, seq), device)?,
        positions: prompts.iter().map(|p| p.mask_position).collect(),
    })
}

/// Options of `kn predict`.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// How many tokens to list per prompt.
    pub top_k: usize,
    /// Stop at the first bad line instead of reporting it and going on.
    pub fail_fast: bool,
    /// Prompts per padded batch (1: one at a time).
    pub batch: usize,
}

/// Counts of a run over an input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Records written.
    pub written: usize,
    /// Input lines (or prompts) that failed and were reported.
    pub failed: usize,
    /// Prompts processed in the records written.
    pub prompts: usize,
}

/// A prompt waiting for its batch, with what its output line needs.
struct Pending {
    line: usize,
    id: Option<serde_json::Value>,
    prompt_index: usize,
    prompt: String,
    encoded: EncodedPrompt,
    answer: Option<String>,
    answer_id: Option<u32>,
}

/// Predicts every prompt of `input`, writing [`Prediction`]s to `out` in input order.
/// Prompts run in padded batches of up to `options.batch` (across input lines): the
/// numbers are those of one prompt at a time, to rounding. A bad line or prompt is
/// passed to `report` and skipped (unless `fail_fast`); I/O errors on `out` end the run.
pub fn run_predict<W: Write>(
    lm: &LoadedModel,
    input: JsonlInput,
    out: &mut JsonlWriter<W>,
    options: &PredictOptions,
    report: &mut dyn FnMut(&Error),
) -> Result<RunSummary> {
    let mut summary = RunSummary::default();
    let mut errors = LineErrors::new(options.fail_fast, report);
    let mut lines = input;
    let mut pending: Vec<Pending> = Vec::new();
    while let Some((line, record)) = lines.next_record::<PromptLine>(&mut errors)? {
        let answer = record.answer.clone();
        let id = record.id.clone();
        let prompts = match record.into_prompts() {
            Ok(p) => p,
            Err(reason) => {
                errors.fail(lines.error(line, reason))?;
                continue;
            }
        };
        let answer_id = match answer
            .as_deref()
            .map(|a| lm.tokenizer.answer_id(a))
            .transpose()
        {
            Ok(a) => a,
            Err(e) => {
                errors.fail(lines.error(line, e))?;
                continue;
            }
        };
        for (prompt_index, prompt) in prompts.into_iter().enumerate() {
            // Checked one by one, so that a bad prompt never fails its batch.
            let encoded = match lm.tokenizer.encode_prompt(&prompt) {
                Ok(e) => lm
                    .config
                    .check_prompt_tokens(e.ids.len())
                    .map(|()| e)
                    .map_err(Error::Prompt),
                other => other,
            };
            let encoded = match encoded {
                Ok(e) => e,
                Err(e @ (Error::Prompt(_) | Error::Tokenizer(_))) => {
                    errors.fail(lines.error(line, e))?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            pending.push(Pending {
                line,
                id: id.clone(),
                prompt_index,
                prompt,
                encoded,
                answer: answer.clone(),
                answer_id,
            });
            if pending.len() >= options.batch.max(1) {
                write_batch(lm, &mut pending, out, options, &mut summary)?;
            }
        }
    }
    write_batch(lm, &mut pending, out, options, &mut summary)?;
    summary.failed = errors.failed;
    Ok(summary)
}

/// Runs the pending prompts as one padded batch and writes their predictions in order.
fn write_batch<W: Write>(
    lm: &LoadedModel,
    pending: &mut Vec<Pending>,
    out: &mut JsonlWriter<W>,
    options: &PredictOptions,
    summary: &mut RunSummary,
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let encoded: Vec<EncodedPrompt> = pending.iter().map(|p| p.encoded.clone()).collect();
    let distributions = mask_distributions(lm, &encoded, &())?;
    for (p, dist) in pending.drain(..).zip(distributions) {
        let predictions = dist
            .top_k(options.top_k)
            .into_iter()
            .map(|(id, probability)| TokenProbability {
                token: lm.tokenizer.token(id),
                id,
                probability: f64::from(probability),
            })
            .collect();
        out.write(&Prediction {
            line: p.line,
            id: p.id,
            prompt_index: p.prompt_index,
            prompt: p.prompt,
            mask_position: dist.mask_position,
            predictions,
            answer_probability: p
                .answer_id
                .map(|a| f64::from(dist.probabilities[a as usize])),
            answer_rank: p.answer_id.map(|a| dist.rank(a)),
            answer: p.answer,
            answer_id: p.answer_id,
        })?;
        summary.written += 1;
        summary.prompts += 1;
    }
    Ok(())
}
