//! The solved update (`kn edit --rule solve`): the smallest change of a fact's value
//! slots that makes the new answer win on the edit's prompts while other facts' next-token
//! distributions stay where they were.
//!
//! Only the chosen neurons' value slots change (columns of the FFN output projections),
//! as with the paper's rules. With `Δᵢ` the change of neuron i's slot `vᵢ`, the edited
//! layer's FFN output at every position is `W·a + Σᵢ aᵢ·Δᵢ`: the change acts exactly
//! where the neuron fires. The `Δᵢ` minimise
//!
//! ```text
//! L(Δ) = mean over edit prompts  −log P(new answer)
//!      + locality · mean over anchor prompts  KL(P_before ‖ P_after)
//!      + size · mean over the chosen neurons and hidden units of (aᵢ·Δᵢ / FFN output size)²
//! ```
//!
//! by Adam on the `Δᵢ` alone (candle's autograd through the model's own forward pass; no
//! other weight has a gradient kept), from `Δ = 0`, stopping as soon as the new answer has
//! at least `target` probability on every edit prompt. The step size starts small and
//! grows by `growth` each step (the smallest change that works is found first). Adam's steps are taken in the units
//! of what the change adds to the residual stream: `Δᵢ = sᵢ·Uᵢ` with `sᵢ` the layer's
//! FFN output size (root mean square at the answer position) over the neuron's mean
//! |activation| there, so one step moves the output by about `learning_rate` of the FFN's
//! own output, whatever the model's scale (a neuron that barely fires needs a larger
//! slot change for the same effect). The anchors are other facts'
//! prompts from the neurons file, half of the same relation, drawn from the fact's id (so
//! a run is reproducible); prompts the evaluation uses are never anchors, so locality is
//! measured on facts the solver did not see.

use std::collections::BTreeSet;

use candle_core::{DType, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::attribution::NeuronsFile;
use crate::data::stable_id_hash;
use crate::error::{Error, Result};
use crate::model::{ActivationCapture, EncodedPrompt, LanguageModel, LoadedModel, Neuron};
use crate::predict::{padded_batch, PaddedBatch};
use crate::rng::SplitMix64;

/// Facts the solver must not take anchors from: the evaluation's, so that locality is
/// measured on facts the solver never saw.
#[derive(Debug, Clone, Default)]
pub struct HeldOut {
    /// Fact ids (as JSON text).
    pub ids: BTreeSet<String>,
    /// Prompts, as token ids.
    pub prompts: BTreeSet<Vec<u32>>,
}

/// A fact whose prompts may anchor an edit.
#[derive(Debug, Clone)]
pub struct AnchorFact {
    /// Its id (as JSON text).
    pub id: String,
    /// Its relation.
    pub relation: Option<String>,
    /// Its prompts, tokenized.
    pub prompts: Vec<EncodedPrompt>,
}

/// Where the solver's anchors come from: facts, less those held out.
#[derive(Debug, Clone, Default)]
pub struct AnchorPool {
    /// The candidate facts, in file order.
    pub facts: Vec<AnchorFact>,
    /// Never taken.
    pub held_out: HeldOut,
}

impl AnchorPool {
    /// The facts of a neurons file (the prompts they were attributed on).
    pub fn from_neurons(
        lm: &LoadedModel,
        neurons: &NeuronsFile,
        held_out: HeldOut,
    ) -> Result<Self> {
        let facts = neurons
            .records
            .iter()
            .map(|r| {
                let prompts = r
                    .prompts
                    .iter()
                    .map(|p| lm.tokenizer.encode_prompt(&p.prompt))
                    .collect::<Result<_>>()?;
                Ok(AnchorFact {
                    id: r.id.to_string(),
                    relation: r.relation.clone(),
                    prompts,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { facts, held_out })
    }

    /// The anchors of fact `id`: one prompt of each of up to `count` other facts, half of
    /// them of its relation (when it has that many), drawn from the fact's id; never a
    /// held-out fact or prompt, nor one of `own` prompts.
    pub fn draw(
        &self,
        id: &serde_json::Value,
        relation: Option<&str>,
        own: &[EncodedPrompt],
        count: usize,
    ) -> Vec<EncodedPrompt> {
        let own: BTreeSet<&[u32]> = own.iter().map(|p| &p.ids[..]).collect();
        let key = id.to_string();
        let seed = stable_id_hash(id);
        let mut chosen = Vec::new();
        for (same, wanted) in [(true, count / 2), (false, count)] {
            let mut facts: Vec<&AnchorFact> = self
                .facts
                .iter()
                .filter(|f| f.id != key && (f.relation.as_deref() == relation) == same)
                .filter(|f| !self.held_out.ids.contains(&f.id))
                .collect();
            SplitMix64::new(seed ^ u64::from(same)).shuffle(&mut facts);
            let wanted = wanted.min(count - chosen.len());
            let start = chosen.len();
            for fact in facts {
                if chosen.len() - start == wanted {
                    break;
                }
                let usable = fact
                    .prompts
                    .iter()
                    .find(|p| !self.held_out.prompts.contains(&p.ids) && !own.contains(&p.ids[..]));
                chosen.extend(usable.cloned());
            }
        }
        chosen
    }
}

/// The solver's knobs (`kn edit --rule solve --solve-…`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SolveOptions {
    /// Most Adam steps.
    pub steps: usize,
    /// Adam's first step, as a fraction of the layer's FFN output size at the answer
    /// position.
    pub learning_rate: f64,
    /// Each step's size is the last one's times this: the solver tries small changes
    /// first and grows them only while the target is not reached, so that a model whose
    /// neurons need a small change gets one, and one that needs a large change gets there.
    pub growth: f64,
    /// Stop once the new answer has this probability on every edit prompt.
    pub target: f64,
    /// Weight of the anchors' KL divergence.
    pub locality: f64,
    /// Weight of the change's squared size, in units of the FFN's own output.
    pub size: f64,
    /// Other facts' prompts held to their distributions.
    pub anchors: usize,
}

impl Default for SolveOptions {
    fn default() -> Self {
        Self {
            steps: 100,
            learning_rate: 0.01,
            growth: 1.06,
            target: 0.5,
            locality: 10.0,
            size: 0.01,
            anchors: 16,
        }
    }
}

/// What the solver reached for one fact.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SolveOutcome {
    /// Adam steps taken.
    pub steps: usize,
    /// The new answer's smallest probability over the edit prompts, at the end.
    pub min_probability: f64,
    /// Whether it reached the target.
    pub reached: bool,
    /// Mean KL divergence of the anchors' distributions, at the end.
    pub anchor_kl: f64,
    /// `‖Δ‖ / ‖v‖` over the chosen slots.
    pub relative_change: f64,
    /// Anchor prompts used.
    pub anchors: usize,
}

/// The largest step, in units of the FFN's output size: beyond it Adam's steps overshoot.
const MAX_STEP: f64 = 0.5;

/// Log-probabilities `[batch, vocab]` (f32) at the batch's answer positions.
fn log_probabilities(model: &LanguageModel, batch: &PaddedBatch) -> Result<Tensor> {
    let logits = model
        .logits_at(&batch.ids, Some(&batch.keep), &batch.positions, &())?
        .to_dtype(DType::F32)?;
    Ok(log_softmax(&logits)?)
}

/// `log softmax` over the last dimension from differentiable ops.
fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// One edited layer: its neurons' changes `Δ = U·diag(s)` `[hidden, k]` and the
/// selection `[k, I]` that puts them in their columns.
struct LayerChange {
    layer: usize,
    weight: Tensor,
    delta: Var,
    scale: Tensor,
    selection: Tensor,
}

impl LayerChange {
    /// `Δ` `[hidden, k]`.
    fn change(&self) -> candle_core::Result<Tensor> {
        self.delta.as_tensor().broadcast_mul(&self.scale)
    }
}

/// Each layer's FFN output size (root mean square over the hidden units, mean over the
/// prompts) and each neuron's mean |activation| at the answer positions.
fn activation_sizes(
    model: &LanguageModel,
    batch: &PaddedBatch,
    layers: &[usize],
) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let capture = ActivationCapture::new(batch.positions.clone());
    model.logits_at(&batch.ids, Some(&batch.keep), &batch.positions, &capture)?;
    let captured = capture.into_layers();
    let mut output_sizes = Vec::with_capacity(layers.len());
    let mut activations = Vec::with_capacity(layers.len());
    for &layer in layers {
        let neurons = captured[layer].to_dtype(DType::F32)?; // [batch, I]
        let weight = model
            .value_slots(layer)
            .ok_or_else(|| Error::Neuron(format!("layer {layer} does not exist")))?
            .to_dtype(DType::F32)?;
        let output = neurons.matmul(&weight.t()?)?; // [batch, hidden]
        let rms = output.sqr()?.mean(1)?.sqrt()?.mean(0)?.to_scalar::<f32>()?;
        output_sizes.push(f64::from(rms));
        let mean_abs = neurons.abs()?.mean(0)?.to_vec1::<f32>()?;
        activations.push(mean_abs.into_iter().map(f64::from).collect());
    }
    Ok((output_sizes, activations))
}

/// Solves the change of `slots` (neurons with their current value slots, as `model` has
/// them) that makes `new_id` the answer of `prompts`, holding `anchors` to their
/// distributions. Returns the new slots, in the order given, and what was reached.
pub fn solve_slots(
    model: &LanguageModel,
    slots: &[(Neuron, Vec<f32>)],
    prompts: &[EncodedPrompt],
    new_id: u32,
    anchors: &[EncodedPrompt],
    options: &SolveOptions,
) -> Result<(Vec<Vec<f32>>, SolveOutcome)> {
    if slots.is_empty() || prompts.is_empty() {
        return Err(Error::Neuron(
            "the solved update needs neurons and prompts".into(),
        ));
    }
    let device = model.device().clone();
    let width = model.config().intermediate_size;
    let mut layers: Vec<LayerChange> = Vec::new();
    // The place of each slot: (index into `layers`, column in its Δ).
    let mut places = Vec::with_capacity(slots.len());
    for (neuron, _) in slots {
        let at = match layers.iter().position(|l| l.layer == neuron.layer) {
            Some(at) => at,
            None => {
                let weight = model
                    .value_slots(neuron.layer)
                    .ok_or_else(|| Error::Neuron(format!("layer {} does not exist", neuron.layer)))?
                    .clone();
                layers.push(LayerChange {
                    layer: neuron.layer,
                    weight,
                    delta: Var::zeros((0, 0), DType::F32, &device)?,
                    scale: Tensor::zeros((0, 0), DType::F32, &device)?,
                    selection: Tensor::zeros((0, 0), DType::F32, &device)?,
                });
                layers.len() - 1
            }
        };
        let column = places.iter().filter(|&&(l, _)| l == at).count();
        places.push((at, column));
    }
    let hidden = model.config().hidden_size;
    let edit = padded_batch(model, prompts)?;
    let layer_ids: Vec<usize> = layers.iter().map(|l| l.layer).collect();
    let (output_sizes, activations) = activation_sizes(model, &edit, &layer_ids)?;
    for (at, layer) in layers.iter_mut().enumerate() {
        let indices: Vec<usize> = slots
            .iter()
            .zip(&places)
            .filter(|(_, &(l, _))| l == at)
            .map(|((n, _), _)| n.index)
            .collect();
        let mut selection = vec![0f32; indices.len() * width];
        for (row, &index) in indices.iter().enumerate() {
            selection[row * width + index] = 1.0;
        }
        layer.selection = Tensor::from_vec(selection, (indices.len(), width), &device)?;
        layer.delta = Var::zeros((hidden, indices.len()), DType::F32, &device)?;
        // A neuron that hardly fires would need an unbounded change: its activation is
        // floored at a twentieth of the layer's most active chosen neuron's.
        let active: Vec<f64> = indices.iter().map(|&i| activations[at][i]).collect();
        let floor = active.iter().cloned().fold(0f64, f64::max) / 20.0;
        // A neuron silent at every answer position cannot carry the edit: it stays.
        let scale: Vec<f32> = active
            .iter()
            .map(|&a| {
                if a > 0.0 {
                    (output_sizes[at] / a.max(floor)) as f32
                } else {
                    0.0
                }
            })
            .collect();
        layer.scale = Tensor::from_vec(scale, (1, indices.len()), &device)?;
    }
    let slot_norm_sq: f64 = slots
        .iter()
        .flat_map(|(_, v)| v.iter())
        .map(|&x| f64::from(x) * f64::from(x))
        .sum();
    let anchor = (!anchors.is_empty())
        .then(|| padded_batch(model, anchors))
        .transpose()?;
    let anchor_before = match &anchor {
        Some(batch) => Some(log_probabilities(model, batch)?.detach()),
        None => None,
    };
    let mut optimizer = AdamW::new(
        layers.iter().map(|l| l.delta.clone()).collect(),
        ParamsAdamW {
            lr: options.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let edited = |layers: &[LayerChange]| -> Result<LanguageModel> {
        let mut edited = model.clone();
        for l in layers {
            let change = l.change()?.matmul(&l.selection)?;
            let weight = (l.weight.to_dtype(DType::F32)? + change)?.to_dtype(l.weight.dtype())?;
            edited.set_value_slots(l.layer, weight)?;
        }
        Ok(edited)
    };
    let mut outcome = SolveOutcome {
        steps: 0,
        min_probability: 0.0,
        reached: false,
        anchor_kl: 0.0,
        relative_change: 0.0,
        anchors: anchors.len(),
    };
    // The iterate with the highest smallest probability of the new answer, kept in case
    // the target is not reached (large steps late in a hard solve can overshoot).
    let mut best: Option<(SolveOutcome, Vec<Tensor>)> = None;
    loop {
        let current = edited(&layers)?;
        let log_p = log_probabilities(&current, &edit)?;
        let new_log_p = log_p.narrow(1, new_id as usize, 1)?.squeeze(1)?;
        let min_log_p = new_log_p.min(0)?.to_scalar::<f32>()?;
        outcome.min_probability = f64::from(min_log_p).exp();
        let kl = match (&anchor, &anchor_before) {
            (Some(batch), Some(before)) => {
                let after = log_probabilities(&current, batch)?;
                Some((before.exp()? * (before - after)?)?.sum(1)?.mean(0)?)
            }
            _ => None,
        };
        outcome.anchor_kl = match &kl {
            Some(kl) => f64::from(kl.to_scalar::<f32>()?),
            None => 0.0,
        };
        outcome.reached = outcome.min_probability >= options.target;
        if outcome.reached {
            best = None;
            break;
        }
        if best
            .as_ref()
            .is_none_or(|(b, _)| outcome.min_probability > b.min_probability)
        {
            let snapshot = layers
                .iter()
                .map(|l| l.delta.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            best = Some((outcome, snapshot));
        }
        if outcome.steps >= options.steps {
            break;
        }
        let mut loss = new_log_p.mean(0)?.neg()?;
        if let Some(kl) = kl {
            loss = (loss + (kl * options.locality)?)?;
        }
        let mut size = Tensor::zeros((), DType::F32, &device)?;
        for l in &layers {
            size = (size + l.delta.as_tensor().sqr()?.sum_all()?)?;
        }
        loss = (loss + (size * (options.size / (slots.len() * hidden) as f64))?)?;
        optimizer.backward_step(&loss)?;
        outcome.steps += 1;
        let rate = options.learning_rate * options.growth.powi(outcome.steps as i32);
        optimizer.set_learning_rate(rate.min(MAX_STEP));
    }
    if let Some((kept, snapshot)) = best {
        let steps = outcome.steps;
        outcome = kept;
        outcome.steps = steps;
        for (layer, delta) in layers.iter().zip(snapshot) {
            layer.delta.set(&delta)?;
        }
    }
    let deltas: Vec<Vec<Vec<f32>>> = layers
        .iter()
        .map(|l| l.change()?.t()?.to_vec2::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let mut change_sq = 0f64;
    let new_slots = slots
        .iter()
        .zip(&places)
        .map(|((_, slot), &(at, column))| {
            let delta = &deltas[at][column];
            slot.iter()
                .zip(delta)
                .map(|(&v, &d)| {
                    change_sq += f64::from(d) * f64::from(d);
                    v + d
                })
                .collect()
        })
        .collect();
    outcome.relative_change = (change_sq / slot_norm_sq.max(1e-12)).sqrt();
    Ok((new_slots, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_the_definition() {
        let x = Tensor::new(
            &[[1f32, 2.0, 3.0], [0.0, -1.0, 5.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let got = log_softmax(&x).unwrap().to_vec2::<f32>().unwrap();
        for (row, values) in got.iter().zip([[1f64, 2.0, 3.0], [0.0, -1.0, 5.0]]) {
            let z: f64 = values.iter().map(|v| v.exp()).sum();
            for (g, v) in row.iter().zip(values) {
                assert!((f64::from(*g) - (v - z.ln())).abs() < 1e-6);
            }
        }
    }

    fn prompt(ids: &[u32]) -> EncodedPrompt {
        EncodedPrompt {
            ids: ids.to_vec(),
            tokens: ids.iter().map(|i| i.to_string()).collect(),
            mask_position: ids.len() - 1,
            dropped: None,
        }
    }

    #[test]
    fn anchors_are_other_facts_half_of_the_relation_never_held_out() {
        // Facts 0..10, relation "a" for the even ones, "b" for the odd; fact n's prompts
        // are [n, 0] and [n, 1].
        let facts: Vec<AnchorFact> = (0..10u32)
            .map(|n| AnchorFact {
                id: serde_json::json!(n).to_string(),
                relation: Some(if n % 2 == 0 { "a" } else { "b" }.into()),
                prompts: vec![prompt(&[n, 0]), prompt(&[n, 1])],
            })
            .collect();
        let mut held_out = HeldOut::default();
        held_out.ids.insert(serde_json::json!(4).to_string());
        held_out.prompts.insert(vec![6, 0]);
        let pool = AnchorPool { facts, held_out };
        let own = [prompt(&[2, 0])];
        let anchors = pool.draw(&serde_json::json!(2), Some("a"), &own, 4);
        let firsts: Vec<u32> = anchors.iter().map(|p| p.ids[0]).collect();
        assert_eq!(anchors.len(), 4);
        // Two of relation a (not fact 2 itself, not the held-out fact 4), two of b.
        assert_eq!(firsts.iter().filter(|&&n| n % 2 == 0).count(), 2);
        assert!(!firsts.contains(&2) && !firsts.contains(&4));
        // Fact 6's first prompt is held out: its second one stands in.
        for p in &anchors {
            assert_ne!(p.ids, vec![6, 0]);
            if p.ids[0] != 6 {
                assert_eq!(p.ids[1], 0, "a fact's first usable prompt");
            }
        }
        // The same fact draws the same anchors; another fact other ones.
        let again = pool.draw(&serde_json::json!(2), Some("a"), &own, 4);
        assert_eq!(again, anchors);
        // Too few of the relation: the others fill in.
        let many = pool.draw(&serde_json::json!(2), Some("a"), &own, 12);
        assert_eq!(many.len(), 8, "3 of a (0, 6, 8) and all 5 of b");
    }
}
