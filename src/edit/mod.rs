//! `kn edit`: change what the model knows through the value slots of its knowledge
//! neurons (the paper's update and erase rules; docs/guide/edit.md), without any training.
//!
//! A neuron (L, i)'s value slot is column i of `encoder.layer.L.output.dense.weight`
//! (`[hidden, intermediate]`): what the neuron adds to the residual stream when it fires.
//! - [`plan_update`]: move a fact's value slots from the old answer's word embedding
//!   toward the new one's.
//! - [`plan_erase`]: zero (or set to the `[UNK]` embedding) the value slots of a
//!   relation's most frequent neurons.
//!
//! Both produce [`SlotEdit`]s (old and new column); [`apply_slots`] makes the edited
//! model in memory, [`save`] writes it as a Hugging Face directory, [`eval`] measures
//! what changed.

pub mod eval;
pub mod record;
pub mod records;
pub mod save;
pub mod solve;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::attribution::neurons::{refined_neurons, KnownFact, NeuronsFile};
use crate::data::stable_id_hash;
use crate::error::{Error, Result};
use crate::model::{LanguageModel, LoadedModel, Neuron};
use crate::predict::encode_prompts;
use crate::predict::mask_distributions;
use crate::probe::random_control;
use crate::rng::SplitMix64;
use record::{FactEdit, RelationErase, Skipped};
use solve::{solve_slots, AnchorPool, HeldOut, SolveOptions};

/// How an update moves a value slot `v` from the old answer's embedding `E_t` to the
/// new one's `E_t′`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum UpdateRule {
    /// The paper: `v ← v − λ1·E_t + λ2·E_t′` with `λ1 = λ̂1·‖v‖/‖E_t‖`,
    /// `λ2 = λ̂2·‖v‖/‖E_t′‖`.
    Scaled {
        /// λ̂1 (paper: 1).
        lambda_old: f64,
        /// λ̂2 (paper: 8).
        lambda_new: f64,
    },
    /// EleutherAI's library: `v ← v − f·E_t + f·E_t′` (f = 2).
    Fixed {
        /// f.
        factor: f64,
    },
    /// Not a rule per slot: the smallest change of the fact's slots that makes the new
    /// answer win while other facts' outputs stay ([`solve`]).
    Solve(SolveOptions),
}

impl UpdateRule {
    /// The paper's rule, λ̂1 = 1, λ̂2 = 8.
    pub const PAPER: Self = Self::Scaled {
        lambda_old: 1.0,
        lambda_new: 8.0,
    };

    /// Its name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Scaled { .. } => "scaled",
            Self::Fixed { .. } => "fixed",
            Self::Solve(_) => "solve",
        }
    }

    /// The new value slot by a rule per slot; `None` for [`Self::Solve`], which changes a
    /// fact's slots together ([`plan_update`] solves them).
    pub fn apply(
        &self,
        slot: &[f32],
        old_embedding: &[f32],
        new_embedding: &[f32],
    ) -> Option<Vec<f32>> {
        let (down, up) = match *self {
            Self::Scaled {
                lambda_old,
                lambda_new,
            } => {
                let v = norm(slot);
                (
                    lambda_old * v / norm(old_embedding),
                    lambda_new * v / norm(new_embedding),
                )
            }
            Self::Fixed { factor } => (factor, factor),
            Self::Solve(_) => return None,
        };
        Some(
            slot.iter()
                .zip(old_embedding.iter().zip(new_embedding))
                .map(|(&v, (&e_old, &e_new))| {
                    (f64::from(v) - down * f64::from(e_old) + up * f64::from(e_new)) as f32
                })
                .collect(),
        )
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// What an erased value slot becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EraseValue {
    /// Zero (the paper).
    Zero,
    /// The `[UNK]` token's word embedding (the paper's variant).
    Unk,
}

/// A value slot changed by an edit.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotEdit {
    /// The neuron whose slot it is.
    pub neuron: Neuron,
    /// The column before any edit of this run.
    pub old: Vec<f32>,
    /// The column after all of them.
    pub new: Vec<f32>,
}

/// Value slots being edited: each column read from the model once, then changed in
/// place, so that two facts sharing a neuron both move it. New values are rounded to the
/// dtype the weights file stores, so the model in memory is the model written.
pub struct SlotEditor<'a> {
    model: &'a LanguageModel,
    storage: DType,
    slots: BTreeMap<Neuron, SlotEdit>,
}

impl<'a> SlotEditor<'a> {
    /// Edits columns of `model`'s FFN output projections, stored as `storage` on disk.
    pub fn new(model: &'a LanguageModel, storage: DType) -> Self {
        Self {
            model,
            storage,
            slots: BTreeMap::new(),
        }
    }

    /// The current value slot of a neuron.
    pub fn slot(&mut self, neuron: Neuron) -> Result<Vec<f32>> {
        Ok(self.entry(neuron)?.new.clone())
    }

    /// Replaces a neuron's value slot.
    pub fn set(&mut self, neuron: Neuron, values: Vec<f32>) -> Result<()> {
        let rounded = round_to(values, self.storage)?;
        self.entry(neuron)?.new = rounded;
        Ok(())
    }

    fn entry(&mut self, neuron: Neuron) -> Result<&mut SlotEdit> {
        if !self.slots.contains_key(&neuron) {
            let old = value_slot(self.model, neuron)?;
            self.slots.insert(
                neuron,
                SlotEdit {
                    neuron,
                    new: old.clone(),
                    old,
                },
            );
        }
        Ok(self.slots.get_mut(&neuron).expect("inserted above"))
    }

    /// The slots changed so far (what [`apply_slots`] needs to see the edits made).
    pub fn changed(&self) -> Vec<SlotEdit> {
        self.slots
            .values()
            .filter(|s| s.old != s.new)
            .cloned()
            .collect()
    }

    /// The slots that changed, by neuron.
    pub fn finish(self) -> Vec<SlotEdit> {
        self.slots
            .into_values()
            .filter(|s| s.old != s.new)
            .collect()
    }
}

/// Neuron `neuron`'s value slot: column `neuron.index` of layer `neuron.layer`'s FFN
/// output projection (BERT `output.dense`, Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`).
pub fn value_slot(model: &LanguageModel, neuron: Neuron) -> Result<Vec<f32>> {
    let weight = model.value_slots(neuron.layer).ok_or_else(|| {
        Error::Neuron(format!(
            "layer {} does not exist: the model has {} layers",
            neuron.layer,
            model.layers()
        ))
    })?;
    let (_, width) = weight.dims2()?;
    if neuron.index >= width {
        return Err(Error::Neuron(format!(
            "neuron {}:{} does not exist: layers have {width} neurons",
            neuron.layer, neuron.index
        )));
    }
    Ok(weight
        .i((.., neuron.index))?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// Row `id` of the input embedding matrix E.
pub fn word_embedding(model: &LanguageModel, id: u32) -> Result<Vec<f32>> {
    Ok(model
        .input_embeddings()
        .i(id as usize)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// Rounds values to what `dtype` can store (exactly as writing and reloading would).
pub fn round_to(values: Vec<f32>, dtype: DType) -> Result<Vec<f32>> {
    if dtype == DType::F32 || dtype == DType::F64 {
        return Ok(values);
    }
    let n = values.len();
    Ok(Tensor::from_vec(values, n, &candle_core::Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// A copy of `model` (sharing every unchanged tensor) with the edited value slots.
pub fn apply_slots(model: &LanguageModel, slots: &[SlotEdit]) -> Result<LanguageModel> {
    let mut edited = model.clone();
    let layers: BTreeSet<usize> = slots.iter().map(|s| s.neuron.layer).collect();
    for layer in layers {
        let weight = model
            .value_slots(layer)
            .ok_or_else(|| Error::Neuron(format!("layer {layer} does not exist")))?;
        let (hidden, width) = weight.dims2()?;
        let (device, dtype) = (weight.device().clone(), weight.dtype());
        let mut values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for slot in slots.iter().filter(|s| s.neuron.layer == layer) {
            for (row, &v) in slot.new.iter().enumerate() {
                values[row * width + slot.neuron.index] = v;
            }
        }
        edited.set_value_slots(
            layer,
            Tensor::from_vec(values, (hidden, width), &device)?.to_dtype(dtype)?,
        )?;
    }
    Ok(edited)
}

/// Settings of an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateOptions {
    /// The rule.
    pub rule: UpdateRule,
    /// Neurons held by more than this share of the relation's facts (and by more than
    /// one fact) are left alone: they carry the relation, not the fact.
    pub max_relation_share: f64,
    /// A fact is edited only if the model's top-1 is its answer on at least this share
    /// of its prompts.
    pub min_correct: f64,
    /// The control of the paper's update table: with a seed, each fact's slots are not
    /// its neurons' but those of as many random neurons in the same layers (none of its
    /// own), drawn as `kn probe --control random` draws them (the seed and the fact's
    /// id decide).
    pub random_control: Option<u64>,
}

/// A fact to update: its known neurons and the answer it should have.
#[derive(Debug, Clone)]
pub struct UpdateRequest<'a> {
    /// The fact, matched with its neurons.
    pub fact: KnownFact<'a>,
    /// The answer it should have.
    pub new_answer: String,
}

/// Which neurons an update touches, and which it leaves alone: the refined set minus
/// the relation-level neurons, those held by more than `max_relation_share` of the
/// relation's facts. A neuron only this fact holds is never relation-level, however few
/// facts the relation has (with fewer than 10 facts, 10% is less than one fact).
pub fn update_neurons(
    neurons: &NeuronsFile,
    fact: &KnownFact,
    max_relation_share: f64,
) -> (Vec<Neuron>, Vec<Neuron>) {
    let refined = refined_neurons(fact.record);
    let Some(relation) = fact.relation.as_deref() else {
        return (refined, Vec::new());
    };
    let facts = neurons.relation_facts(relation).count().max(1);
    let counts = neurons.relation_counts(relation);
    refined.into_iter().partition(|n| {
        let holders = counts.get(n).copied().unwrap_or(0);
        holders <= 1 || holders as f64 / facts as f64 <= max_relation_share
    })
}

/// What an edit run decided: the slots to change and why.
#[derive(Debug, Clone, Default)]
pub struct EditPlan {
    /// The changed slots (old and new values).
    pub slots: Vec<SlotEdit>,
    /// Updated facts.
    pub facts: Vec<FactEdit>,
    /// Erased relations.
    pub relations: Vec<RelationErase>,
    /// Facts not edited, and why.
    pub skipped: Vec<Skipped>,
}

/// Plans the updates of `requests` in order (a neuron shared by two facts moves twice).
/// Facts the model does not answer, or without neurons left, are skipped.
pub fn plan_update(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    requests: &[UpdateRequest],
    options: &UpdateOptions,
    storage: DType,
) -> Result<EditPlan> {
    let anchors = match options.rule {
        UpdateRule::Solve(_) => AnchorPool::from_neurons(lm, neurons, HeldOut::default())?,
        _ => AnchorPool::default(),
    };
    plan_update_excluding(lm, neurons, requests, options, storage, &anchors)
}

/// [`plan_update`] with the solved rule's anchors drawn from `anchors` (by default, the
/// neurons file's facts, none of the evaluation's).
pub fn plan_update_excluding(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    requests: &[UpdateRequest],
    options: &UpdateOptions,
    storage: DType,
    anchors: &AnchorPool,
) -> Result<EditPlan> {
    let mut editor = SlotEditor::new(&lm.model, storage);
    let mut plan = EditPlan::default();
    for request in requests {
        let fact = &request.fact;
        let old_id = lm.tokenizer.answer_id(&fact.answer)?;
        let new_id = lm.tokenizer.answer_id(&request.new_answer)?;
        let skip = |reason: String| Skipped {
            id: fact.id.clone(),
            reason,
        };
        if old_id == new_id {
            plan.skipped
                .push(skip("the new answer is the old one".into()));
            continue;
        }
        let (chosen, relation_level) = update_neurons(neurons, fact, options.max_relation_share);
        if chosen.is_empty() {
            plan.skipped.push(skip(if relation_level.is_empty() {
                "no refined neurons".into()
            } else {
                format!(
                    "all {} refined neurons are shared by more than {} of the relation's facts",
                    relation_level.len(),
                    options.max_relation_share
                )
            }));
            continue;
        }
        let chosen = match options.random_control {
            Some(seed) => {
                let mut rng = SplitMix64::new(seed ^ stable_id_hash(&fact.id));
                random_control(&chosen, lm.config.intermediate_size, &mut rng)?
            }
            None => chosen,
        };
        let encoded = encode_prompts(lm, &fact.prompts)?;
        let correct = mask_distributions(lm, &encoded, &())?
            .iter()
            .filter(|d| d.top_k(1).first().map(|t| t.0) == Some(old_id))
            .count();
        if (correct as f64) < options.min_correct * encoded.len() as f64 {
            plan.skipped.push(skip(format!(
                "the model answers it top-1 on {correct} of {} prompts (needs a share of {})",
                encoded.len(),
                options.min_correct
            )));
            continue;
        }
        let mut solved = None;
        if let UpdateRule::Solve(solve) = options.rule {
            // Solved on the model with this run's earlier edits in it.
            let current = apply_slots(&lm.model, &editor.changed())?;
            let slots = chosen
                .iter()
                .map(|&n| Ok((n, editor.slot(n)?)))
                .collect::<Result<Vec<_>>>()?;
            let own = encode_prompts(lm, &fact.prompts)?;
            let anchors = anchors.draw(&fact.id, fact.relation.as_deref(), &own, solve.anchors);
            let (new_slots, outcome) =
                solve_slots(&current, &slots, &encoded, new_id, &anchors, &solve)?;
            for ((neuron, _), values) in slots.iter().zip(new_slots) {
                editor.set(*neuron, values)?;
            }
            solved = Some(outcome);
        } else {
            let old_embedding = word_embedding(&lm.model, old_id)?;
            let new_embedding = word_embedding(&lm.model, new_id)?;
            for &neuron in &chosen {
                let slot = editor.slot(neuron)?;
                let values = options
                    .rule
                    .apply(&slot, &old_embedding, &new_embedding)
                    .expect("a rule per slot");
                editor.set(neuron, values)?;
            }
        }
        plan.facts.push(FactEdit {
            id: fact.id.clone(),
            relation: fact.relation.clone(),
            answer: fact.answer.clone(),
            new_answer: request.new_answer.clone(),
            neurons: chosen,
            relation_level,
            correct_prompts: correct,
            prompts: encoded.len(),
            solved,
        });
    }
    plan.slots = editor.finish();
    Ok(plan)
}

/// Settings of an erase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EraseOptions {
    /// How many of a relation's most frequent refined neurons to erase (paper: 20).
    pub top: usize,
    /// What their value slots become.
    pub value: EraseValue,
}

/// The `top` refined neurons held by most facts of `relation`, ties broken by
/// (layer, index), with their fact counts.
pub fn relation_top_neurons(
    neurons: &NeuronsFile,
    relation: &str,
    top: usize,
) -> Vec<(Neuron, usize)> {
    let mut counts: Vec<(Neuron, usize)> = neurons.relation_counts(relation).into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts.truncate(top);
    counts
}

/// Plans erasing `relations` (each must have facts in the neurons file).
pub fn plan_erase(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    relations: &[String],
    options: &EraseOptions,
    storage: DType,
) -> Result<EditPlan> {
    let known = neurons.relations();
    let value = match options.value {
        EraseValue::Zero => vec![0.0; lm.config.hidden_size],
        EraseValue::Unk => {
            let unk = lm.tokenizer.unk_id().ok_or_else(|| {
                Error::Prompt("the tokenizer has no unknown token: use --value zero".into())
            })?;
            word_embedding(&lm.model, unk)?
        }
    };
    let mut editor = SlotEditor::new(&lm.model, storage);
    let mut plan = EditPlan::default();
    for relation in relations {
        if !known.contains(relation.as_str()) {
            return Err(Error::Neuron(format!(
                "relation {relation} has no facts in {} (it has: {})",
                neurons.path.display(),
                known.iter().copied().collect::<Vec<_>>().join(", ")
            )));
        }
        let top = relation_top_neurons(neurons, relation, options.top);
        for (neuron, _) in &top {
            editor.set(*neuron, value.clone())?;
        }
        plan.relations.push(RelationErase {
            relation: relation.clone(),
            facts: neurons.relation_facts(relation).count(),
            neurons: top
                .into_iter()
                .map(|(neuron, facts)| record::CountedNeuron {
                    layer: neuron.layer,
                    index: neuron.index,
                    facts,
                })
                .collect(),
        });
    }
    plan.slots = editor.finish();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_rule_is_the_papers_formula() {
        let v = [3.0f32, 4.0]; // ‖v‖ = 5
        let e_old = [1.0f32, 0.0]; // ‖E_t‖ = 1
        let e_new = [0.0f32, 2.0]; // ‖E_t′‖ = 2
        let new = UpdateRule::PAPER.apply(&v, &e_old, &e_new).unwrap();
        // λ1 = 1·5/1 = 5, λ2 = 8·5/2 = 20: v − 5·E_t + 20·E_t′ = (3 − 5, 4 + 40)
        assert_eq!(new, vec![-2.0, 44.0]);
        let fixed = UpdateRule::Fixed { factor: 2.0 }
            .apply(&v, &e_old, &e_new)
            .unwrap();
        assert_eq!(fixed, vec![1.0, 8.0]);
    }

    #[test]
    fn rounding_follows_the_storage_dtype() {
        let x = vec![1.0f32 + f32::EPSILON];
        assert_eq!(round_to(x.clone(), DType::F32).unwrap(), x);
        assert_eq!(round_to(x.clone(), DType::BF16).unwrap(), vec![1.0]);
        assert_eq!(round_to(x, DType::F16).unwrap(), vec![1.0]);
    }
}
