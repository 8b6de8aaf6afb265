//! The paper's findings, measured on one model and one set of facts: how many refined
//! neurons a fact has and where they lie, how many fact pairs share, what suppressing
//! and amplifying them does beside random neurons and the activation baseline's
//! neurons, what updating a fact and erasing a relation do, beside the paper's own
//! numbers (Dai et al. 2022). `examples/findings.rs` prints the table; `tests/findings.rs` asserts
//! it on the bundled fact model.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::attribution::neurons::{KnownFact, NeuronsFile};
use crate::attribution::record::{FactRecord, Method};
use crate::attribution::select::RefinedNeuron;
use crate::attribution::{model_info, AttributeOptions, Attributor, Fact};
use crate::data::{stable_id_hash, JsonlWriter, LineErrors};
use crate::edit::eval::{
    evaluate_edited, evaluate_gold_against, gold_baseline, EditedFact, EvalFact, GoldBaseline,
};
use crate::edit::{
    apply_slots, plan_erase, plan_update, EraseOptions, EraseValue, UpdateOptions, UpdateRequest,
    UpdateRule,
};
use crate::error::Result;
use crate::model::LoadedModel;
use crate::predict::encode_prompts;
use crate::probe::{
    random_control, run_probe, ControlKind, Effect, ProbeMode, ProbeOptions, Prober,
};
use crate::report::stats::{
    layer_distribution, neurons_per_fact, shared_neurons, Fact as StatFact,
};
use crate::rng::SplitMix64;

/// How much of the work to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FindingsOptions {
    /// Facts updated one at a time (spread over the relations).
    pub updates: usize,
    /// Facts per relation on which perplexity and accuracy are measured.
    pub eval_per_relation: usize,
    /// Seed of the random controls.
    pub seed: u64,
}

/// Neuron statistics of one attribution method.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NeuronFindings {
    /// Mean refined neurons per fact.
    pub per_fact: f64,
    /// Share of all refined neurons in each layer.
    pub layer_share: Vec<f64>,
    /// Mean shared refined neurons over same-relation fact pairs.
    pub shared_same: f64,
    /// The same over different-relation pairs.
    pub shared_other: f64,
    /// Suppressing the refined neurons (control: random neurons, same count and layers).
    pub suppress: Effect,
    /// Amplifying them ×2.
    pub amplify: Effect,
}

/// Updates, one fact at a time, averaged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct UpdateFindings {
    /// Facts edited.
    pub facts: usize,
    /// Share of their prompts whose top-1 is no longer the old answer.
    pub change_rate: f64,
    /// Share whose top-1 is the new answer.
    pub success: f64,
    /// Mean perplexity of other facts of the same relation, before.
    pub same_before: f64,
    /// After.
    pub same_after: f64,
    /// Mean perplexity of facts of other relations, before.
    pub other_before: f64,
    /// After.
    pub other_after: f64,
}

/// Erasing one relation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EraseFindings {
    /// The relation.
    pub relation: String,
    /// Its accuracy before → after.
    pub accuracy: (f64, f64),
    /// Its perplexity before → after.
    pub perplexity: (f64, f64),
    /// Accuracy of the other relations before → after.
    pub other_accuracy: (f64, f64),
    /// Perplexity of the other relations before → after.
    pub other_perplexity: (f64, f64),
}

/// Everything measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Findings {
    /// Facts attributed.
    pub facts: usize,
    /// Relations.
    pub relations: usize,
    /// Prompts.
    pub prompts: usize,
    /// Integrated gradients (the paper's method).
    pub knowledge_neurons: NeuronFindings,
    /// The activation baseline.
    pub baseline: NeuronFindings,
    /// Updates through the knowledge neurons.
    pub update: UpdateFindings,
    /// The same updates through random neurons (same count and layers).
    pub update_random: UpdateFindings,
    /// One entry per relation erased.
    pub erase: Vec<EraseFindings>,
}

/// Attributes `facts` with both methods, then probes, updates and erases.
/// `progress` gets a line per stage.
pub fn measure(
    lm: &LoadedModel,
    facts: &[Fact],
    options: &FindingsOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Findings> {
    let attribute = |method: Method, progress: &mut dyn FnMut(&str)| -> Result<NeuronsFile> {
        progress(&format!("attributing {} facts ({method:?})", facts.len()));
        let attributor = Attributor::new(lm.clone(), AttributeOptions::paper(method))?;
        let records = facts
            .iter()
            .map(|f| attributor.attribute(f))
            .collect::<Result<Vec<_>>>()?;
        NeuronsFile::from_records(Path::new(&format!("<{method:?}>")), records)
    };
    let ig = attribute(Method::IntegratedGradients, progress)?;
    let activation = attribute(Method::Activation, progress)?;
    progress("probing");
    let knowledge_neurons = neuron_findings(lm, &ig, options.seed)?;
    let baseline = neuron_findings(lm, &activation, options.seed)?;
    let eval = eval_facts(lm, &ig, options.eval_per_relation)?;
    let baseline_gold = gold_baseline(lm, &eval)?;
    progress("updating");
    let (update, update_random) = updates(lm, &ig, (&eval, &baseline_gold), options)?;
    progress("erasing");
    let erase = erases(lm, &ig, (&eval, &baseline_gold))?;
    Ok(Findings {
        facts: facts.len(),
        relations: ig.relations().len(),
        prompts: facts.iter().map(|f| f.prompts.len()).sum(),
        knowledge_neurons,
        baseline,
        update,
        update_random,
        erase,
    })
}

fn neuron_findings(lm: &LoadedModel, neurons: &NeuronsFile, seed: u64) -> Result<NeuronFindings> {
    let stat_facts: Vec<StatFact> = neurons.records.iter().map(StatFact::from_record).collect();
    let per_fact = neurons_per_fact(&stat_facts).overall.mean.unwrap_or(0.0);
    let layers = layer_distribution(&stat_facts, lm.config.num_hidden_layers);
    let shared = shared_neurons(&stat_facts);
    let probe = |mode| -> Result<Effect> {
        let options = ProbeOptions {
            mode,
            factor: 2.0,
            control: ControlKind::Random,
            seed,
            fail_fast: true,
        };
        let prober = Prober::new(lm, neurons, options, model_info(lm)?)?;
        let mut report = |_: &crate::Error| {};
        let mut errors = LineErrors::new(true, &mut report);
        let mut sink = JsonlWriter::new(std::io::sink(), "<findings>");
        Ok(run_probe(&prober, None, &mut sink, &mut errors)?.1.overall)
    };
    Ok(NeuronFindings {
        per_fact,
        layer_share: layers.overall.share,
        shared_same: shared.same_relation.mean.unwrap_or(0.0),
        shared_other: shared.different_relation.mean.unwrap_or(0.0),
        suppress: probe(ProbeMode::Suppress)?,
        amplify: probe(ProbeMode::Amplify)?,
    })
}

/// Up to `per_relation` facts of each relation, tokenized, to measure edits on.
fn eval_facts(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    per_relation: usize,
) -> Result<Vec<EvalFact>> {
    let mut taken: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    let mut facts = Vec::new();
    for record in &neurons.records {
        let count = taken.entry(record.relation.as_deref()).or_insert(0);
        if *count >= per_relation {
            continue;
        }
        *count += 1;
        let prompts: Vec<String> = record.prompts.iter().map(|p| p.prompt.clone()).collect();
        facts.push(EvalFact {
            id: record.id.clone(),
            relation: record.relation.clone(),
            answer_id: record.answer_id,
            prompts: encode_prompts(lm, &prompts)?,
        });
    }
    Ok(facts)
}

/// Updates facts one at a time (each from the unedited model) to the answer of another
/// fact of their relation, through their knowledge neurons and through random ones.
fn updates(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    (eval, baseline): (&[EvalFact], &GoldBaseline),
    options: &FindingsOptions,
) -> Result<(UpdateFindings, UpdateFindings)> {
    // Facts in turn from each relation, so that a few updates cover them all.
    let mut by_relation: BTreeMap<Option<&str>, Vec<&FactRecord>> = BTreeMap::new();
    for r in &neurons.records {
        by_relation
            .entry(r.relation.as_deref())
            .or_default()
            .push(r);
    }
    let mut order = Vec::new();
    for round in 0.. {
        let before = order.len();
        for members in by_relation.values() {
            if let Some(r) = members.get(round) {
                order.push((*r, members.as_slice()));
            }
        }
        if order.len() == before {
            break;
        }
    }
    let update_options = UpdateOptions {
        rule: UpdateRule::PAPER,
        max_relation_share: 0.1,
        min_correct: 0.5,
        random_control: None,
    };
    let mut sums = [Sums::default(), Sums::default()];
    let mut done = 0;
    for (record, relation_facts) in order {
        if done >= options.updates {
            break;
        }
        let Some(new_answer) = relation_facts
            .iter()
            .map(|r| &r.answer)
            .find(|a| **a != record.answer)
        else {
            continue;
        };
        let mut random_record = record.clone();
        let mut rng = SplitMix64::new(options.seed ^ stable_id_hash(&record.id));
        let chosen = crate::edit::update_neurons(
            neurons,
            &KnownFact::from_record(record),
            update_options.max_relation_share,
        )
        .0;
        random_record.refined = random_control(&chosen, lm.config.intermediate_size, &mut rng)?
            .into_iter()
            .map(|n| RefinedNeuron {
                layer: n.layer,
                index: n.index,
                prompts: 0,
                share: 0.0,
                mean_relative_score: 0.0,
            })
            .collect();
        let mut results = Vec::new();
        for (slot, source) in [record, &random_record].into_iter().enumerate() {
            let request = UpdateRequest {
                fact: KnownFact::from_record(source),
                new_answer: new_answer.clone(),
            };
            // Random neurons are not relation-level by construction: keep them all.
            let mut opts = update_options;
            if slot == 1 {
                opts.max_relation_share = 1.0;
            }
            let plan = plan_update(
                lm,
                neurons,
                std::slice::from_ref(&request),
                &opts,
                candle_core::DType::F32,
            )?;
            if plan.facts.is_empty() {
                break;
            }
            let after = LoadedModel {
                model: apply_slots(&lm.model, &plan.slots)?,
                ..lm.clone()
            };
            let edited = [EditedFact {
                prompts: encode_prompts(lm, &request.fact.prompts)?,
                held_out: Vec::new(),
                locality: Vec::new(),
                old_id: record.answer_id,
                new_id: lm.tokenizer.answer_id(new_answer)?,
            }];
            let metrics = evaluate_edited(lm, &after, &edited)?;
            let relations = record.relation.iter().cloned().collect();
            let exclude: HashSet<String> = HashSet::from([record.id.to_string()]);
            let (same, other, _) =
                evaluate_gold_against(baseline, &after, eval, &relations, &exclude)?;
            results.push((slot, metrics, same, other));
        }
        if results.len() < 2 {
            continue;
        }
        for (slot, metrics, same, other) in results {
            let s = &mut sums[slot];
            s.facts += 1;
            s.change_rate += metrics.after.change_rate;
            s.success += metrics.after.success;
            if let Some(g) = same {
                s.same.0 += g.before.perplexity;
                s.same.1 += g.after.perplexity;
                s.same_n += 1;
            }
            if let Some(g) = other {
                s.other.0 += g.before.perplexity;
                s.other.1 += g.after.perplexity;
                s.other_n += 1;
            }
        }
        done += 1;
    }
    Ok((sums[0].finish(), sums[1].finish()))
}

#[derive(Debug, Default)]
struct Sums {
    facts: usize,
    change_rate: f64,
    success: f64,
    same: (f64, f64),
    same_n: usize,
    other: (f64, f64),
    other_n: usize,
}

impl Sums {
    fn finish(&self) -> UpdateFindings {
        let n = self.facts.max(1) as f64;
        let (sn, on) = (self.same_n.max(1) as f64, self.other_n.max(1) as f64);
        UpdateFindings {
            facts: self.facts,
            change_rate: self.change_rate / n,
            success: self.success / n,
            same_before: self.same.0 / sn,
            same_after: self.same.1 / sn,
            other_before: self.other.0 / on,
            other_after: self.other.1 / on,
        }
    }
}

/// Erases each relation in turn (from the unedited model).
fn erases(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    (eval, baseline): (&[EvalFact], &GoldBaseline),
) -> Result<Vec<EraseFindings>> {
    let options = EraseOptions {
        top: 20,
        value: EraseValue::Zero,
    };
    let mut out = Vec::new();
    for relation in neurons.relations() {
        let relation = relation.to_string();
        let plan = plan_erase(
            lm,
            neurons,
            std::slice::from_ref(&relation),
            &options,
            candle_core::DType::F32,
        )?;
        let after = LoadedModel {
            model: apply_slots(&lm.model, &plan.slots)?,
            ..lm.clone()
        };
        let relations = std::iter::once(relation.clone()).collect();
        let (same, other, _) =
            evaluate_gold_against(baseline, &after, eval, &relations, &HashSet::new())?;
        let (Some(same), Some(other)) = (same, other) else {
            continue;
        };
        out.push(EraseFindings {
            relation,
            accuracy: (same.before.accuracy, same.after.accuracy),
            perplexity: (same.before.perplexity, same.after.perplexity),
            other_accuracy: (other.before.accuracy, other.after.accuracy),
            other_perplexity: (other.before.perplexity, other.after.perplexity),
        });
    }
    Ok(out)
}

impl Findings {
    /// The paper's table with these numbers beside its own (Dai et al. 2022).
    pub fn table(&self) -> String {
        let k = &self.knowledge_neurons;
        let b = &self.baseline;
        let pct = |x: f64| format!("{:+.1}%", 100.0 * x);
        let top_half: f64 = k.layer_share[k.layer_share.len() / 2..].iter().sum();
        let relative = |(before, after): (f64, f64)| (after - before) / before;
        let range = |values: Vec<f64>| {
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{} to {}", pct(lo), pct(hi))
        };
        let u = &self.update;
        let r = &self.update_random;
        let rows: Vec<(String, String, String)> = vec![
            (
                "facts / relations / prompts".into(),
                format!("{} / {} / {}", self.facts, self.relations, self.prompts),
                "27,738 / 34 / 253,448".into(),
            ),
            (
                "refined neurons per fact (KN / activation)".into(),
                format!("{:.2} / {:.2}", k.per_fact, b.per_fact),
                "4.13 / 3.96".into(),
            ),
            (
                "shared neurons, same / different relation (KN)".into(),
                format!("{:.2} / {:.2}", k.shared_same, k.shared_other),
                "1.23 / 0.09".into(),
            ),
            (
                "shared neurons, same / different relation (activation)".into(),
                format!("{:.2} / {:.2}", b.shared_same, b.shared_other),
                "— / 1.92".into(),
            ),
            (
                "share of refined neurons in the top half of the layers".into(),
                format!("{:.0}%", 100.0 * top_half),
                "most in the top layers".into(),
            ),
            (
                "suppress: gold probability change (KN / random / activation)".into(),
                format!(
                    "{} / {} / {}",
                    pct(k.suppress.change),
                    pct(k.suppress.control_change),
                    pct(b.suppress.change)
                ),
                "−29.03% / — / −1.47%".into(),
            ),
            (
                "amplify ×2: gold probability change (KN / random / activation)".into(),
                format!(
                    "{} / {} / {}",
                    pct(k.amplify.change),
                    pct(k.amplify.control_change),
                    pct(b.amplify.change)
                ),
                "+31.17% / — / −1.27%".into(),
            ),
            (
                format!("update ({} facts): change rate / success (KN)", u.facts),
                format!("{:.1}% / {:.1}%", 100.0 * u.change_rate, 100.0 * u.success),
                "48.5% / 34.4%".into(),
            ),
            (
                "update: change rate / success (random neurons)".into(),
                format!("{:.1}% / {:.1}%", 100.0 * r.change_rate, 100.0 * r.success),
                "4.7% / 0.0%".into(),
            ),
            (
                "update: perplexity increase, same / other relations".into(),
                format!(
                    "{:+.3} / {:+.3}",
                    u.same_after - u.same_before,
                    u.other_after - u.other_before
                ),
                "+8.4 / +7.2".into(),
            ),
            (
                "erase: perplexity change of the erased relation".into(),
                range(self.erase.iter().map(|e| relative(e.perplexity)).collect()),
                "+36.7% to +141.2%".into(),
            ),
            (
                "erase: perplexity change of the other relations".into(),
                range(
                    self.erase
                        .iter()
                        .map(|e| relative(e.other_perplexity))
                        .collect(),
                ),
                "+1.1% to +10.1%".into(),
            ),
            (
                "erase: accuracy of the erased relation, before → after (mean)".into(),
                {
                    let n = self.erase.len().max(1) as f64;
                    let before: f64 = self.erase.iter().map(|e| e.accuracy.0).sum::<f64>() / n;
                    let after: f64 = self.erase.iter().map(|e| e.accuracy.1).sum::<f64>() / n;
                    format!("{:.1}% → {:.1}%", 100.0 * before, 100.0 * after)
                },
                "—".into(),
            ),
        ];
        let mut out = String::from(
            "| measure | kn, this model | paper (bert-base-cased, ParaRel) |\n|---|---|---|\n",
        );
        for (measure, ours, paper) in rows {
            out.push_str(&format!("| {measure} | {ours} | {paper} |\n"));
        }
        out
    }
}
