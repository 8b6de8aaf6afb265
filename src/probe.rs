//! `kn probe`: do the knowledge neurons matter? Suppress (× 0) or amplify (× factor) a
//! fact's refined neurons at the `[MASK]` position and measure the gold probability on
//! each of its prompts, beside the same operation on control neurons (the paper's
//! suppress and amplify experiment).
//!
//! # Format
//!
//! One [`ProbeRecord`] a fact:
//!
//! ```json
//! {"id":"P36:1","relation":"P36","answer":"Paris","answer_id":3000,
//!  "mode":"suppress","factor":0.0,
//!  "neurons":[{"layer":9,"index":1234}],
//!  "control":{"kind":"random","neurons":[{"layer":9,"index":77}]},
//!  "prompts":[{"prompt":"The capital of France is [MASK].","before":0.43,"after":0.12,"control_after":0.41}],
//!  "before":0.43,"after":0.12,"control_after":0.41,
//!  "model":{"source":"data/fact-model","weights_sha256":"…"},
//!  "params":{"mode":"suppress","factor":0.0,"control":"random","seed":0,"neurons_sha256":"…",
//!            "method":"integrated-gradients"},
//!  "kn_version":"0.1.0"}
//! ```
//!
//! A fact without refined neurons has `"skipped":"no refined neurons"`, no prompts and
//! no means. The summary ([`ProbeSummary`]) gives per relation and overall the paper's
//! metric, `change = mean(after − before) / mean(before)` over prompts, and the same for
//! the control.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::attribution::neurons::{refined_neurons, KnownFact, NeuronsFile};
use crate::attribution::record::{FactLine, Method, ModelInfo};
use crate::attribution::run::fact_id;
use crate::data::{stable_id_hash, JsonlInput, JsonlWriter, LineErrors, SeenIds};
use crate::error::{Error, Result};
use crate::model::{EncodedPrompt, LoadedModel, Neuron, NeuronOp, NeuronPatch};
use crate::predict::{encode_prompts, mask_distributions, RunSummary};
use crate::rng::SplitMix64;

/// What is done to the neurons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeMode {
    /// Set to 0 (the paper's Figure 4).
    Suppress,
    /// Multiply by the factor (×2 in the paper's Figure 5).
    Amplify,
}

impl ProbeMode {
    /// `suppress` or `amplify`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Suppress => "suppress",
            Self::Amplify => "amplify",
        }
    }
}

/// Which neurons the control experiment uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlKind {
    /// As many random neurons in the same layers, none of them the fact's.
    Random,
    /// The refined neurons of a random fact of another relation (the paper's control).
    OtherRelation,
}

impl ControlKind {
    /// `random` or `other-relation`, as written in records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::OtherRelation => "other-relation",
        }
    }
}

/// Everything that decides what `kn probe` computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeOptions {
    /// Suppress or amplify.
    pub mode: ProbeMode,
    /// Amplification factor (ignored when suppressing: the factor is 0).
    pub factor: f64,
    /// Control neurons.
    pub control: ControlKind,
    /// Seed of the control draws; each fact's draw also depends on its id only, so a
    /// fact gets the same control whatever else is probed with it.
    pub seed: u64,
    /// Stop at the first bad fact.
    pub fail_fast: bool,
}

impl ProbeOptions {
    /// The factor the neurons are multiplied by.
    pub fn effective_factor(&self) -> f64 {
        match self.mode {
            ProbeMode::Suppress => 0.0,
            ProbeMode::Amplify => self.factor,
        }
    }
}

/// The parameters as recorded in each output line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeParams {
    /// Suppress or amplify.
    pub mode: ProbeMode,
    /// The factor applied (0 for suppress).
    pub factor: f64,
    /// Control kind.
    pub control: ControlKind,
    /// Seed of the control draws.
    pub seed: u64,
    /// sha256 of the neurons file.
    pub neurons_sha256: String,
    /// How the neurons file's neurons were found (its records' method): integrated
    /// gradients (knowledge neurons) or the activation baseline. Absent in records of
    /// earlier versions, which probed knowledge neurons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
}

/// The control neurons of a fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Control {
    /// How they were chosen.
    pub kind: ControlKind,
    /// The neurons.
    pub neurons: Vec<Neuron>,
    /// For `other-relation`: the fact they belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fact: Option<serde_json::Value>,
}

/// Gold probabilities of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptProbe {
    /// The prompt.
    pub prompt: String,
    /// In the unchanged model.
    pub before: f64,
    /// With the fact's neurons changed.
    pub after: f64,
    /// With the control neurons changed.
    pub control_after: f64,
}

/// One output line of `kn probe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// Fact id.
    pub id: serde_json::Value,
    /// Relation, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// Gold answer.
    pub answer: String,
    /// Its token id.
    pub answer_id: u32,
    /// Suppress or amplify.
    pub mode: ProbeMode,
    /// The factor applied.
    pub factor: f64,
    /// The fact's refined neurons.
    pub neurons: Vec<Neuron>,
    /// The control neurons (absent when skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    /// Per prompt, in order.
    pub prompts: Vec<PromptProbe>,
    /// Mean gold probability before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<f64>,
    /// Mean after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<f64>,
    /// Mean after, control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_after: Option<f64>,
    /// Why the fact was not probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The model probed.
    pub model: ModelInfo,
    /// The parameters.
    pub params: ProbeParams,
    /// `kn`'s version.
    pub kn_version: String,
}

/// Probes facts with one model and one neurons file.
pub struct Prober<'a> {
    lm: &'a LoadedModel,
    neurons: &'a NeuronsFile,
    options: ProbeOptions,
    model: ModelInfo,
}

impl<'a> Prober<'a> {
    /// Checks the neurons against the model (layers, width) first.
    pub fn new(
        lm: &'a LoadedModel,
        neurons: &'a NeuronsFile,
        options: ProbeOptions,
        model: ModelInfo,
    ) -> Result<Self> {
        neurons.check_model(&lm.config)?;
        if options.mode == ProbeMode::Amplify && !options.factor.is_finite() {
            return Err(Error::Neuron(format!(
                "amplification factor {} is not a finite number",
                options.factor
            )));
        }
        Ok(Self {
            lm,
            neurons,
            options,
            model,
        })
    }

    /// The parameters as recorded.
    pub fn params(&self) -> ProbeParams {
        ProbeParams {
            mode: self.options.mode,
            factor: self.options.effective_factor(),
            control: self.options.control,
            seed: self.options.seed,
            neurons_sha256: self.neurons.sha256.clone(),
            method: self.neurons.records.first().map(|r| r.params.method),
        }
    }

    /// Probes one fact: its prompts before, with its neurons changed, and with the
    /// control neurons changed. Errors are about the fact (prompts, answer, no control).
    pub fn probe(&self, fact: &KnownFact) -> Result<ProbeRecord> {
        let tokenizer = &self.lm.tokenizer;
        let answer_id = tokenizer.answer_id(&fact.answer)?;
        let encoded = encode_prompts(self.lm, &fact.prompts)?;
        let neurons = refined_neurons(fact.record);
        let mut record = ProbeRecord {
            id: fact.id.clone(),
            relation: fact.relation.clone(),
            answer: fact.answer.clone(),
            answer_id,
            mode: self.options.mode,
            factor: self.options.effective_factor(),
            neurons: neurons.clone(),
            control: None,
            prompts: Vec::new(),
            before: None,
            after: None,
            control_after: None,
            skipped: None,
            model: self.model.clone(),
            params: self.params(),
            kn_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        if neurons.is_empty() {
            record.skipped = Some("no refined neurons".into());
            return Ok(record);
        }
        let control = self.control(fact, &neurons)?;
        let op = NeuronOp::Scale(self.options.effective_factor());
        let before = gold_probabilities(self.lm, &encoded, answer_id, &[], op)?;
        let after = gold_probabilities(self.lm, &encoded, answer_id, &neurons, op)?;
        let control_after = gold_probabilities(self.lm, &encoded, answer_id, &control.neurons, op)?;
        record.prompts = fact
            .prompts
            .iter()
            .zip(before.iter().zip(&after).zip(&control_after))
            .map(
                |(prompt, ((&before, &after), &control_after))| PromptProbe {
                    prompt: prompt.clone(),
                    before,
                    after,
                    control_after,
                },
            )
            .collect();
        record.before = Some(mean(&before));
        record.after = Some(mean(&after));
        record.control_after = Some(mean(&control_after));
        record.control = Some(control);
        Ok(record)
    }

    /// The control neurons of a fact, drawn from a generator seeded by the run's seed
    /// and the fact's id.
    fn control(&self, fact: &KnownFact, neurons: &[Neuron]) -> Result<Control> {
        let mut rng = SplitMix64::new(self.options.seed ^ stable_id_hash(&fact.id));
        match self.options.control {
            ControlKind::Random => Ok(Control {
                kind: ControlKind::Random,
                neurons: random_control(neurons, self.lm.config.intermediate_size, &mut rng)?,
                fact: None,
            }),
            ControlKind::OtherRelation => {
                let pool: Vec<_> = self
                    .neurons
                    .records
                    .iter()
                    .filter(|r| r.relation != fact.relation && !r.refined.is_empty())
                    .collect();
                if pool.is_empty() {
                    return Err(Error::Neuron(format!(
                        "no fact of a relation other than {:?} has refined neurons in {}: \
                         use --control random",
                        fact.relation.as_deref().unwrap_or("(none)"),
                        self.neurons.path.display()
                    )));
                }
                let other = pool[rng.below(pool.len())];
                Ok(Control {
                    kind: ControlKind::OtherRelation,
                    neurons: refined_neurons(other),
                    fact: Some(other.id.clone()),
                })
            }
        }
    }
}

/// As many neurons as `neurons`, in the same layers (one for one), none of them in
/// `neurons` and no two the same.
pub fn random_control(
    neurons: &[Neuron],
    width: usize,
    rng: &mut SplitMix64,
) -> Result<Vec<Neuron>> {
    let mut taken: BTreeSet<Neuron> = neurons.iter().copied().collect();
    let mut control = Vec::with_capacity(neurons.len());
    for neuron in neurons {
        let in_layer = taken.iter().filter(|n| n.layer == neuron.layer).count();
        if in_layer >= width {
            return Err(Error::Neuron(format!(
                "layer {} has no neurons left to draw a control from",
                neuron.layer
            )));
        }
        let pick = loop {
            let candidate = Neuron {
                layer: neuron.layer,
                index: rng.below(width),
            };
            if !taken.contains(&candidate) {
                break candidate;
            }
        };
        taken.insert(pick);
        control.push(pick);
    }
    control.sort();
    Ok(control)
}

/// The patch that applies `op` to `neurons` at each prompt's mask position.
pub fn mask_patch(prompts: &[EncodedPrompt], neurons: &[Neuron], op: NeuronOp) -> NeuronPatch {
    NeuronPatch {
        positions: prompts.iter().map(|p| p.mask_position).collect(),
        edits: neurons.iter().map(|&n| (n, op)).collect(),
    }
}

/// `P(answer)` at each prompt's mask with `op` applied to `neurons` there (none: the
/// unchanged model), all prompts in one batch.
pub fn gold_probabilities(
    lm: &LoadedModel,
    prompts: &[EncodedPrompt],
    answer_id: u32,
    neurons: &[Neuron],
    op: NeuronOp,
) -> Result<Vec<f64>> {
    let patch = mask_patch(prompts, neurons, op);
    Ok(mask_distributions(lm, prompts, &patch)?
        .into_iter()
        .map(|d| f64::from(d.probabilities[answer_id as usize]))
        .collect())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The effect of a probe on a group of facts (a relation, or all of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// The relation (absent for the overall line and for facts without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// Facts probed (skipped ones not counted).
    pub facts: usize,
    /// Their prompts.
    pub prompts: usize,
    /// Mean gold probability before.
    pub before: f64,
    /// Mean after, the fact's neurons changed.
    pub after: f64,
    /// Mean after, the control neurons changed.
    pub control_after: f64,
    /// `(after − before) / before`: the paper's metric.
    pub change: f64,
    /// The same for the control.
    pub control_change: f64,
}

/// Per relation and overall effect of a probe run (the paper's Figures 4 and 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// Suppress or amplify.
    pub mode: ProbeMode,
    /// The factor applied.
    pub factor: f64,
    /// Control kind.
    pub control: ControlKind,
    /// Facts skipped for want of refined neurons.
    pub skipped: usize,
    /// One entry per relation, by name.
    pub relations: Vec<Effect>,
    /// All prompts together.
    pub overall: Effect,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    facts: usize,
    prompts: usize,
    before: f64,
    after: f64,
    control_after: f64,
}

impl Sums {
    fn add(&mut self, record: &ProbeRecord) {
        self.facts += 1;
        for p in &record.prompts {
            self.prompts += 1;
            self.before += p.before;
            self.after += p.after;
            self.control_after += p.control_after;
        }
    }

    fn effect(&self, relation: Option<String>) -> Effect {
        let n = self.prompts.max(1) as f64;
        let relative = |x: f64| {
            if self.before > 0.0 {
                (x - self.before) / self.before
            } else {
                0.0
            }
        };
        Effect {
            relation,
            facts: self.facts,
            prompts: self.prompts,
            before: self.before / n,
            after: self.after / n,
            control_after: self.control_after / n,
            change: relative(self.after),
            control_change: relative(self.control_after),
        }
    }
}

/// Builds a [`ProbeSummary`] from records as they are made.
#[derive(Debug)]
pub struct SummaryBuilder {
    params: ProbeParams,
    skipped: usize,
    relations: BTreeMap<Option<String>, Sums>,
    overall: Sums,
}

impl SummaryBuilder {
    /// An empty summary for a run with `params`.
    pub fn new(params: ProbeParams) -> Self {
        Self {
            params,
            skipped: 0,
            relations: BTreeMap::new(),
            overall: Sums::default(),
        }
    }

    /// Counts one record.
    pub fn add(&mut self, record: &ProbeRecord) {
        if record.skipped.is_some() {
            self.skipped += 1;
            return;
        }
        self.relations
            .entry(record.relation.clone())
            .or_default()
            .add(record);
        self.overall.add(record);
    }

    /// The summary so far.
    pub fn finish(&self) -> ProbeSummary {
        ProbeSummary {
            mode: self.params.mode,
            factor: self.params.factor,
            control: self.params.control,
            skipped: self.skipped,
            relations: self
                .relations
                .iter()
                .map(|(relation, sums)| sums.effect(relation.clone()))
                .collect(),
            overall: self.overall.effect(None),
        }
    }
}

/// Probes every fact of `input` (or, without one, every fact of the neurons file with
/// its own prompts), writing one [`ProbeRecord`] per fact. A bad line (unknown id, an
/// answer or prompt the model cannot take) goes to `errors`; output errors end the run.
pub fn run_probe<W: Write>(
    prober: &Prober,
    input: Option<JsonlInput>,
    out: &mut JsonlWriter<W>,
    errors: &mut LineErrors,
) -> Result<(RunSummary, ProbeSummary)> {
    let mut run = RunSummary::default();
    let mut summary = SummaryBuilder::new(prober.params());
    let mut emit = |record: ProbeRecord| -> Result<()> {
        out.write(&record)?;
        run.written += 1;
        run.prompts += record.prompts.len();
        summary.add(&record);
        Ok(())
    };
    match input {
        Some(mut lines) => {
            let mut seen = SeenIds::default();
            while let Some((line, fact)) = lines.next_record::<FactLine>(errors)? {
                let outcome = seen
                    .check(&fact_id(&fact, line), line)
                    .and_then(|()| prober.neurons.resolve(&fact, line))
                    .map_err(|reason| lines.error(line, reason))
                    .and_then(|known| prober.probe(&known).map_err(|e| lines.error(line, e)));
                match outcome {
                    Ok(record) => emit(record)?,
                    Err(e) => errors.fail(e)?,
                }
            }
        }
        None => {
            for record in &prober.neurons.records {
                let line = prober.neurons.line_of(record);
                match prober.probe(&KnownFact::from_record(record)) {
                    Ok(probe) => emit(probe)?,
                    Err(e) => errors.fail(Error::Input {
                        path: prober.neurons.path.clone(),
                        line,
                        reason: e.to_string(),
                    })?,
                }
            }
        }
    }
    run.failed = errors.failed;
    Ok((run, summary.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_control_matches_layers_and_avoids_the_fact() {
        let neurons = [
            Neuron { layer: 1, index: 3 },
            Neuron { layer: 1, index: 4 },
            Neuron { layer: 3, index: 0 },
        ];
        let mut rng = SplitMix64::new(7);
        let control = random_control(&neurons, 6, &mut rng).unwrap();
        assert_eq!(control.len(), 3);
        assert_eq!(control.iter().filter(|n| n.layer == 1).count(), 2);
        assert_eq!(control.iter().filter(|n| n.layer == 3).count(), 1);
        assert!(control.iter().all(|n| !neurons.contains(n) && n.index < 6));
        let distinct: BTreeSet<_> = control.iter().collect();
        assert_eq!(distinct.len(), 3);
        // The same seed draws the same control.
        assert_eq!(
            control,
            random_control(&neurons, 6, &mut SplitMix64::new(7)).unwrap()
        );
        // A full layer has nothing left to draw.
        let full: Vec<_> = (0..2).map(|index| Neuron { layer: 0, index }).collect();
        assert!(random_control(&full, 2, &mut SplitMix64::new(1)).is_err());
    }

    #[test]
    fn summary_is_the_papers_ratio_of_means() {
        let params = ProbeParams {
            mode: ProbeMode::Suppress,
            factor: 0.0,
            control: ControlKind::Random,
            seed: 0,
            neurons_sha256: String::new(),
            method: None,
        };
        let record = |relation: &str, pairs: &[(f64, f64, f64)]| ProbeRecord {
            id: serde_json::Value::from(1),
            relation: Some(relation.into()),
            answer: "a".into(),
            answer_id: 0,
            mode: ProbeMode::Suppress,
            factor: 0.0,
            neurons: vec![],
            control: None,
            prompts: pairs
                .iter()
                .map(|&(before, after, control_after)| PromptProbe {
                    prompt: String::new(),
                    before,
                    after,
                    control_after,
                })
                .collect(),
            before: None,
            after: None,
            control_after: None,
            skipped: None,
            model: ModelInfo {
                source: String::new(),
                architecture: Default::default(),
                revision: None,
                commit: None,
                weights_sha256: String::new(),
                config_sha256: None,
                tokenizer_sha256: None,
            },
            params: params.clone(),
            kn_version: String::new(),
        };
        let mut builder = SummaryBuilder::new(params.clone());
        builder.add(&record("P1", &[(0.4, 0.1, 0.4), (0.6, 0.3, 0.5)]));
        builder.add(&record("P2", &[(0.2, 0.2, 0.1)]));
        let mut skipped = record("P2", &[]);
        skipped.skipped = Some("no refined neurons".into());
        builder.add(&skipped);
        let summary = builder.finish();
        assert_eq!(summary.skipped, 1);
        let p1 = &summary.relations[0];
        // mean(after − before) / mean(before) = (−0.6 / 2) / (1.0 / 2) = −0.6
        assert!((p1.change + 0.6).abs() < 1e-12, "{p1:?}");
        assert!((p1.control_change + 0.1).abs() < 1e-12, "{p1:?}");
        assert_eq!((p1.facts, p1.prompts), (1, 2));
        let all = &summary.overall;
        // (0.4 + 0.2 − 1.2) / 1.2 over 3 prompts
        assert!((all.change - (0.6 - 1.2) / 1.2).abs() < 1e-12, "{all:?}");
        assert!((all.control_change - (1.0 - 1.2) / 1.2).abs() < 1e-12);
        assert_eq!((all.facts, all.prompts), (2, 3));
    }
}
