//! What `kn edit` writes: `edits.json` beside the edited weights ([`EditsFile`]), and
//! the metrics report of `--report` ([`EditReport`]).
//!
//! # `edits.json`
//!
//! ```json
//! {"kn_version":"0.1.0","operation":"update",
//!  "rule":{"name":"scaled","lambda_old":1.0,"lambda_new":8.0},
//!  "source":{"model":{"source":"data/fact-model","weights_sha256":"…"},"weights_file":"model.safetensors"},
//!  "weights_file":"model.safetensors","weights_sha256":"…","restored_sha256":"…",
//!  "inputs":[{"role":"neurons","path":"kn.jsonl","sha256":"…"},{"role":"update","path":"new.jsonl","sha256":"…"}],
//!  "facts":[{"id":"P36:1","relation":"P36","answer":"paris","new_answer":"rome",
//!            "neurons":[{"layer":3,"index":17}],"relation_level":[],"correct_prompts":8,"prompts":8}],
//!  "skipped":[{"id":"P36:7","reason":"the model answers it top-1 on 2 of 8 prompts (needs a share of 0.5)"}],
//!  "slots":[{"layer":3,"index":17,"tensor":"bert.encoder.layer.3.output.dense.weight","old":[0.012,…]}]}
//! ```
//!
//! `slots` lists every changed value slot once, with its values before the edit, so
//! `kn edit --revert` can restore the weights; `restored_sha256` is what the restored
//! weights file hashes to (the source's own when it was a `model.safetensors`).
//!
//! # Report (`--report`)
//!
//! ```json
//! {"operation":"update","rule":"scaled","relations":["P36"],
//!  "model":{…},"kn_version":"0.1.0",
//!  "edited_facts":{"facts":12,"prompts":96,
//!    "before":{"success":0.0,"success_at_5":0.08,"change_rate":0.0,"mrr":0.02},
//!    "after":{"success":0.34,"success_at_5":0.6,"change_rate":0.48,"mrr":0.41},
//!    "reliability":0.34,"held_out_prompts":24,"generalization":0.21},
//!  "same_relation":{"facts":120,"prompts":900,"before":{"accuracy":0.61,"perplexity":12.3},"after":{…},
//!    "locality":0.93,"kl":0.041},
//!  "other_relation":{…},
//!  "per_relation":[{"relation":"P36","facts":120,"prompts":900,"before":{…},"after":{…}}],
//!  "skipped":[{"id":"P36:7","reason":"…"}],"holdout":2}
//! ```
//!
//! Every rate is over prompts. `edited_facts` (updates only) scores the new answer:
//! success = top-1 is the new answer, success@5 = it is among the top 5, change rate =
//! top-1 is no longer the old answer, MRR = mean of 1 / its rank. `same_relation` and
//! `other_relation` (with `--eval`) score the gold answers of the evaluation facts of
//! the edited (erased) relations and of the others, edited facts left out: accuracy
//! (top-1) and perplexity `exp(mean −ln p_gold)`. `"control":"random"` marks updates
//! made through random neurons (the control), `"each":true` facts updated one at a time
//! from the unedited model, with the metrics pooled over the edits (and each fact's own
//! in `per_fact`).
//!
//! The editors' metrics (as the model-editing literature names them) sit beside the
//! paper's: `reliability` (top-1 is the new answer on the prompts the edit used),
//! `generalization` (the same on the `--holdout` prompts, kept out of the edit, and on
//! the update records' own paraphrases), `record_locality` and `record_locality_kl`
//! (on the update records' own locality prompts, over `record_locality_prompts`) and,
//! per evaluation set, `locality` (top-1 unchanged by the edit) and `kl` (mean
//! `KL(before ‖ after)`). Reports without them (older kn) still read.

use serde::{Deserialize, Serialize};

use super::{EraseValue, UpdateRule};
use crate::attribution::record::ModelInfo;
use crate::model::Neuron;
use crate::probe::ControlKind;

/// Update or erase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Replace facts' answers.
    Update,
    /// Erase relations.
    Erase,
}

/// An updated fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactEdit {
    /// Fact id.
    pub id: serde_json::Value,
    /// Relation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// The answer before.
    pub answer: String,
    /// The answer it should have now.
    pub new_answer: String,
    /// The neurons whose slots moved.
    pub neurons: Vec<Neuron>,
    /// Refined neurons left alone because the relation's facts share them.
    pub relation_level: Vec<Neuron>,
    /// Prompts the model answered top-1 before the edit.
    pub correct_prompts: usize,
    /// Prompts of the fact.
    pub prompts: usize,
    /// What the solved rule reached (`--rule solve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solved: Option<super::solve::SolveOutcome>,
}

/// A neuron with the number of a relation's facts that hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountedNeuron {
    /// Layer.
    pub layer: usize,
    /// Unit.
    pub index: usize,
    /// Facts of the relation whose refined set holds it.
    pub facts: usize,
}

/// An erased relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationErase {
    /// Relation.
    pub relation: String,
    /// Its facts in the neurons file.
    pub facts: usize,
    /// Its most frequent refined neurons, erased.
    pub neurons: Vec<CountedNeuron>,
}

/// A fact that was not edited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// Fact id.
    pub id: serde_json::Value,
    /// Why.
    pub reason: String,
}

/// The model an edit started from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Its identity.
    pub model: ModelInfo,
    /// Its weights file's name (`model.safetensors` or `pytorch_model.bin`).
    pub weights_file: String,
}

/// An input file and its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// `neurons`, `update` or `eval`.
    pub role: String,
    /// As given.
    pub path: String,
    /// sha256 of its bytes.
    pub sha256: String,
}

/// A changed value slot and its values before the edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// Layer.
    pub layer: usize,
    /// Unit.
    pub index: usize,
    /// The weights tensor, by its name in the file.
    pub tensor: String,
    /// Column `index` before the edit (`hidden` values, as stored).
    pub old: Vec<f32>,
}

/// `edits.json`: everything needed to know and undo what an edit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditsFile {
    /// `kn`'s version.
    pub kn_version: String,
    /// Update or erase.
    pub operation: Operation,
    /// Update rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<UpdateRule>,
    /// Erase value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<EraseValue>,
    /// The model edited.
    pub source: SourceRecord,
    /// The edited weights file in this directory.
    pub weights_file: String,
    /// Its sha256.
    pub weights_sha256: String,
    /// sha256 of the weights file `kn edit --revert` restores.
    pub restored_sha256: String,
    /// Input files.
    pub inputs: Vec<InputRecord>,
    /// Updated facts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<FactEdit>,
    /// Erased relations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relations: Vec<RelationErase>,
    /// Facts not edited.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
    /// Changed value slots.
    pub slots: Vec<SlotRecord>,
    /// The source directory's own `edits.json`, verbatim, when it was itself an edited
    /// model: `--revert` puts it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_edits: Option<String>,
}

/// Metrics of the new answer on the edited facts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnswerMetrics {
    /// Share of prompts whose top-1 is the new answer.
    pub success: f64,
    /// Share whose top 5 hold it.
    pub success_at_5: f64,
    /// Share whose top-1 is no longer the old answer.
    pub change_rate: f64,
    /// Mean reciprocal rank of the new answer.
    pub mrr: f64,
}

/// Gold-answer metrics of a set of prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GoldMetrics {
    /// Share of prompts whose top-1 is the gold answer.
    pub accuracy: f64,
    /// `exp(mean −ln p_gold)`.
    pub perplexity: f64,
}

/// Edited facts, before and after.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EditedMetrics {
    /// Facts.
    pub facts: usize,
    /// Their prompts.
    pub prompts: usize,
    /// Before the edit.
    pub before: AnswerMetrics,
    /// After.
    pub after: AnswerMetrics,
    /// Reliability (EasyEdit's name; ROME's *efficacy*): the share of the prompts the
    /// edit used whose top-1 after the edit is the new answer. With one-token answers it
    /// is `after.success` under the editors' name; for several tokens it would be the
    /// teacher-forced token accuracy. Absent in reports made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reliability: Option<f64>,
    /// Prompts held out of the edit (`--holdout`), over all edited facts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_out_prompts: usize,
    /// Generalization (EasyEdit; ROME's *paraphrase*): reliability on the held-out
    /// prompts. Absent without `--holdout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generalization: Option<f64>,
    /// The update records' own locality prompts (CounterFact's `neighborhood_prompts`,
    /// ZsRE's `loc`, kn's `locality`), over all edited facts. Absent without them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub record_locality_prompts: usize,
    /// Locality on those prompts: the share whose top-1 is the same after the edit as
    /// before. Absent without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_locality: Option<f64>,
    /// Mean `KL(before ‖ after)` (nats) on those prompts. Absent without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_locality_kl: Option<f64>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A group of evaluation facts, before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMetrics {
    /// The relation (per-relation entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// Facts.
    pub facts: usize,
    /// Their prompts.
    pub prompts: usize,
    /// Before the edit.
    pub before: GoldMetrics,
    /// After.
    pub after: GoldMetrics,
    /// Locality (EasyEdit; ROME's *neighborhood*): the share of these prompts whose
    /// top-1 prediction is the same after the edit as before, whatever the gold answer.
    /// Absent in reports made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<f64>,
    /// Mean over these prompts of `KL(before ‖ after)` (nats) of the distributions at
    /// the answer position (the mask, or a decoder's next token). Absent in older reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

/// One fact's own metrics when facts are updated one at a time (`--each`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactMetrics {
    /// Fact id.
    pub id: serde_json::Value,
    /// Relation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// Its prompts (the paper's metrics, reliability and generalization).
    pub edited_facts: EditedMetrics,
    /// Evaluation facts of its relation, itself left out (with `--eval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_relation: Option<GroupMetrics>,
    /// Evaluation facts of the other relations (with `--eval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_relation: Option<GroupMetrics>,
    /// What the solved rule reached (`--rule solve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solved: Option<super::solve::SolveOutcome>,
}

/// `--report`: what an edit changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditReport {
    /// Update or erase.
    pub operation: Operation,
    /// Update rule name (`scaled`, `fixed`).
    #[serde(default)]
    pub rule: Option<String>,
    /// Erase value.
    #[serde(default)]
    pub value: Option<EraseValue>,
    /// Relations of the edited facts, or the erased relations.
    pub relations: Vec<String>,
    /// The model edited.
    pub model: ModelInfo,
    /// `kn`'s version.
    pub kn_version: String,
    /// The edited facts (updates).
    #[serde(default)]
    pub edited_facts: Option<EditedMetrics>,
    /// Evaluation facts of the edited relations (with `--eval`).
    #[serde(default)]
    pub same_relation: Option<GroupMetrics>,
    /// Evaluation facts of the other relations (with `--eval`).
    #[serde(default)]
    pub other_relation: Option<GroupMetrics>,
    /// Evaluation facts per relation (with `--eval`).
    #[serde(default)]
    pub per_relation: Vec<GroupMetrics>,
    /// Facts not edited.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// `random` when the updates went through as many random neurons, in the same
    /// layers, as each fact's own (`--control random`: the control of the paper's update
    /// table); absent for the facts' own neurons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlKind>,
    /// Each fact was updated alone, from the unedited model (`--each`, the paper's
    /// protocol), and the metrics pooled over the edits: the edited facts' over their
    /// prompts, the evaluation sets' over every (edit, evaluation prompt) pair, so
    /// `facts` and `prompts` there count an evaluation fact once per edit. Absent when
    /// all facts were edited together.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub each: bool,
    /// `--holdout K`: each updated fact's last K prompts were kept out of the edit and
    /// scored as paraphrases (`generalization`). Absent for 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub holdout: usize,
    /// With `each`, every edited fact's own metrics, in the order edited; the pooled
    /// fields above aggregate them. Absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_fact: Vec<FactMetrics>,
}
