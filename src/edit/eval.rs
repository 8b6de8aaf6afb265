//! Measuring an edit: the new answer on the edited facts, and gold-answer accuracy and
//! perplexity on evaluation facts of the edited relations and of the others (the
//! paper's update and erase tables). Every rate is over prompts.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use candle_core::DType;

use super::record::{
    AnswerMetrics, EditReport, EditedMetrics, FactEdit, GoldMetrics, GroupMetrics, Operation,
    Skipped,
};
use super::{
    apply_slots, plan_update, EditPlan, EraseValue, UpdateOptions, UpdateRequest, UpdateRule,
};
use crate::attribution::record::{FactLine, ModelInfo};
use crate::attribution::run::fact_id;
use crate::data::{JsonlInput, LineErrors, NeuronsFile};
use crate::error::{Error, Result};
use crate::model::{EncodedPrompt, LoadedModel};
use crate::predict::encode_prompts;
use crate::predict::{mask_distributions, MaskDistribution};
use crate::probe::ControlKind;

/// A fact to evaluate on, tokenized.
#[derive(Debug, Clone)]
pub struct EvalFact {
    /// Its id (line number when absent).
    pub id: serde_json::Value,
    /// Its relation.
    pub relation: Option<String>,
    /// Gold answer id.
    pub answer_id: u32,
    /// Its prompts.
    pub prompts: Vec<EncodedPrompt>,
}

/// Reads every fact of an evaluation file. Bad lines are all passed to `errors` (which
/// may stop at the first); the caller decides whether a file with bad lines is usable.
pub fn read_eval_facts(
    lm: &LoadedModel,
    path: &Path,
    errors: &mut LineErrors,
) -> Result<Vec<EvalFact>> {
    let mut input = JsonlInput::open(path)?;
    let mut facts = Vec::new();
    while let Some((line, fact)) = input.next_record::<FactLine>(errors)? {
        let id = fact_id(&fact, line);
        let parsed = (|| -> Result<EvalFact> {
            let answer = fact
                .answer
                .as_deref()
                .ok_or_else(|| Error::Prompt("has no \"answer\"".into()))?;
            let prompts = match (fact.prompt.clone(), fact.prompts.clone()) {
                (Some(p), None) => vec![p],
                (None, Some(ps)) => ps,
                _ => {
                    return Err(Error::Prompt(
                        "needs either \"prompt\" or \"prompts\"".into(),
                    ))
                }
            };
            Ok(EvalFact {
                id: id.clone(),
                relation: fact.relation.clone(),
                answer_id: lm.tokenizer.answer_id(answer)?,
                prompts: encode_prompts(lm, &prompts)?,
            })
        })();
        match parsed {
            Ok(f) => facts.push(f),
            Err(e) => errors.fail(input.error(line, e))?,
        }
    }
    Ok(facts)
}

/// Gold-answer counts of some prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct GoldSums {
    prompts: usize,
    correct: usize,
    neg_log_p: f64,
}

impl GoldSums {
    fn of(distributions: &[MaskDistribution], gold: u32) -> Self {
        let mut sums = Self::default();
        for d in distributions {
            sums.prompts += 1;
            sums.correct += usize::from(d.top_k(1).first().map(|t| t.0) == Some(gold));
            sums.neg_log_p -= probability(d, gold).ln();
        }
        sums
    }

    fn add(&mut self, other: Self) {
        self.prompts += other.prompts;
        self.correct += other.correct;
        self.neg_log_p += other.neg_log_p;
    }

    fn metrics(&self) -> GoldMetrics {
        let n = self.prompts.max(1) as f64;
        GoldMetrics {
            accuracy: self.correct as f64 / n,
            perplexity: (self.neg_log_p / n).exp(),
        }
    }
}

/// A token's probability, floored at the smallest normal f32 so that a probability that
/// underflowed to 0 gives a large but finite perplexity.
fn probability(d: &MaskDistribution, id: u32) -> f64 {
    f64::from(d.probabilities[id as usize].max(f32::MIN_POSITIVE))
}

/// Gold metrics of the evaluation facts: the edited (erased) relations' facts, the
/// others' (each `None` when empty), and one entry per relation.
pub type GoldGroups = (
    Option<GroupMetrics>,
    Option<GroupMetrics>,
    Vec<GroupMetrics>,
);

/// The evaluation facts' gold-answer counts in the unedited model, computed once and
/// shared by every edit measured against it.
#[derive(Debug, Clone)]
pub struct GoldBaseline(Vec<GoldSums>);

/// Scores every evaluation fact in the unedited model.
pub fn gold_baseline(before: &LoadedModel, facts: &[EvalFact]) -> Result<GoldBaseline> {
    facts
        .iter()
        .map(|f| {
            Ok(GoldSums::of(
                &mask_distributions(before, &f.prompts, &())?,
                f.answer_id,
            ))
        })
        .collect::<Result<Vec<_>>>()
        .map(GoldBaseline)
}

/// Gold accuracy and perplexity of the evaluation facts before and after, split into
/// the facts of `relations` (same) and the others (`None` when a group has no fact), and
/// per relation. Facts whose id is in `exclude` (the edited ones) are left out.
pub fn evaluate_gold(
    before: &LoadedModel,
    after: &LoadedModel,
    facts: &[EvalFact],
    relations: &BTreeSet<String>,
    exclude: &HashSet<String>,
) -> Result<GoldGroups> {
    let baseline = gold_baseline(before, facts)?;
    evaluate_gold_against(&baseline, after, facts, relations, exclude)
}

/// [`evaluate_gold`] with the unedited model's counts already made.
pub fn evaluate_gold_against(
    baseline: &GoldBaseline,
    after: &LoadedModel,
    facts: &[EvalFact],
    relations: &BTreeSet<String>,
    exclude: &HashSet<String>,
) -> Result<GoldGroups> {
    #[derive(Default)]
    struct Group {
        facts: usize,
        before: GoldSums,
        after: GoldSums,
    }
    let mut same = Group::default();
    let mut other = Group::default();
    let mut per_relation: BTreeMap<Option<String>, Group> = BTreeMap::new();
    for (fact, &b) in facts.iter().zip(&baseline.0) {
        if exclude.contains(&fact.id.to_string()) {
            continue;
        }
        let a = GoldSums::of(
            &mask_distributions(after, &fact.prompts, &())?,
            fact.answer_id,
        );
        let in_same = fact
            .relation
            .as_ref()
            .is_some_and(|r| relations.contains(r));
        let groups = [
            if in_same { &mut same } else { &mut other },
            per_relation.entry(fact.relation.clone()).or_default(),
        ];
        for group in groups {
            group.facts += 1;
            group.before.add(b);
            group.after.add(a);
        }
    }
    let metrics = |relation: Option<String>, g: &Group| GroupMetrics {
        relation,
        facts: g.facts,
        prompts: g.before.prompts,
        before: g.before.metrics(),
        after: g.after.metrics(),
    };
    let nonempty = |g: &Group| (g.facts > 0).then(|| metrics(None, g));
    Ok((
        nonempty(&same),
        nonempty(&other),
        per_relation
            .iter()
            .map(|(relation, g)| metrics(relation.clone(), g))
            .collect(),
    ))
}

/// An edited fact to score: its prompts, old and new answer ids.
#[derive(Debug, Clone)]
pub struct EditedFact {
    /// Prompts.
    pub prompts: Vec<EncodedPrompt>,
    /// The answer before.
    pub old_id: u32,
    /// The answer wanted.
    pub new_id: u32,
}

/// Success, success@5, change rate and MRR of the new answers, before and after.
pub fn evaluate_edited(
    before: &LoadedModel,
    after: &LoadedModel,
    facts: &[EditedFact],
) -> Result<EditedMetrics> {
    let score = |lm: &LoadedModel| -> Result<(AnswerMetrics, usize)> {
        let (mut n, mut success, mut top5, mut changed, mut rr) =
            (0usize, 0usize, 0usize, 0usize, 0f64);
        for fact in facts {
            for d in mask_distributions(lm, &fact.prompts, &())? {
                let rank = d.rank(fact.new_id);
                let top = d.top_k(1).first().map(|t| t.0);
                n += 1;
                success += usize::from(top == Some(fact.new_id));
                top5 += usize::from(rank <= 5);
                changed += usize::from(top != Some(fact.old_id));
                rr += 1.0 / rank as f64;
            }
        }
        let total = n.max(1) as f64;
        Ok((
            AnswerMetrics {
                success: success as f64 / total,
                success_at_5: top5 as f64 / total,
                change_rate: changed as f64 / total,
                mrr: rr / total,
            },
            n,
        ))
    };
    let (before_metrics, prompts) = score(before)?;
    let (after_metrics, _) = score(after)?;
    Ok(EditedMetrics {
        facts: facts.len(),
        prompts,
        before: before_metrics,
        after: after_metrics,
    })
}

/// Everything [`build_report`] measures an edit with.
pub struct ReportInputs<'a> {
    /// The model before.
    pub before: &'a LoadedModel,
    /// The model after.
    pub after: &'a LoadedModel,
    /// What was done.
    pub plan: &'a EditPlan,
    /// The update rule (updates).
    pub rule: Option<UpdateRule>,
    /// The erase value (erases).
    pub value: Option<EraseValue>,
    /// The edited facts, tokenized (updates).
    pub edited: &'a [EditedFact],
    /// Evaluation facts (`--eval`).
    pub eval: Option<&'a [EvalFact]>,
    /// The model's identity.
    pub model: ModelInfo,
}

/// Measures an edit: the edited facts' new answers, and with evaluation facts, gold
/// accuracy and perplexity in the edited relations and the others.
pub fn build_report(inputs: ReportInputs) -> Result<EditReport> {
    let plan = inputs.plan;
    let (operation, relations): (Operation, BTreeSet<String>) = if inputs.value.is_some() {
        (
            Operation::Erase,
            plan.relations.iter().map(|r| r.relation.clone()).collect(),
        )
    } else {
        (
            Operation::Update,
            plan.facts
                .iter()
                .filter_map(|f| f.relation.clone())
                .collect(),
        )
    };
    let edited_facts = match operation {
        Operation::Update if !inputs.edited.is_empty() => {
            Some(evaluate_edited(inputs.before, inputs.after, inputs.edited)?)
        }
        _ => None,
    };
    let exclude: HashSet<String> = plan.facts.iter().map(|f| f.id.to_string()).collect();
    let (same_relation, other_relation, per_relation) = match inputs.eval {
        Some(facts) => evaluate_gold(inputs.before, inputs.after, facts, &relations, &exclude)?,
        None => (None, None, Vec::new()),
    };
    Ok(EditReport {
        operation,
        rule: inputs.rule.map(|r| r.name().to_string()),
        value: inputs.value,
        relations: relations.into_iter().collect(),
        model: inputs.model,
        kn_version: env!("CARGO_PKG_VERSION").to_string(),
        edited_facts,
        same_relation,
        other_relation,
        per_relation,
        skipped: plan.skipped.clone(),
        control: None,
        each: false,
    })
}

/// Gold metrics of evaluation sets pooled over several edits, weighted by prompts:
/// accuracy over all (edit, prompt) pairs, perplexity `exp` of their mean `−ln p_gold`.
#[derive(Debug, Clone, Default)]
struct GroupPool {
    facts: usize,
    prompts: usize,
    correct: (f64, f64),
    neg_log_p: (f64, f64),
}

impl GroupPool {
    fn add(&mut self, g: &GroupMetrics) {
        let n = g.prompts as f64;
        self.facts += g.facts;
        self.prompts += g.prompts;
        self.correct.0 += g.before.accuracy * n;
        self.correct.1 += g.after.accuracy * n;
        self.neg_log_p.0 += g.before.perplexity.ln() * n;
        self.neg_log_p.1 += g.after.perplexity.ln() * n;
    }

    fn finish(&self, relation: Option<String>) -> GroupMetrics {
        let n = self.prompts.max(1) as f64;
        GroupMetrics {
            relation,
            facts: self.facts,
            prompts: self.prompts,
            before: GoldMetrics {
                accuracy: self.correct.0 / n,
                perplexity: (self.neg_log_p.0 / n).exp(),
            },
            after: GoldMetrics {
                accuracy: self.correct.1 / n,
                perplexity: (self.neg_log_p.1 / n).exp(),
            },
        }
    }
}

/// Answer metrics pooled over edits, weighted by prompts.
#[derive(Debug, Clone, Copy, Default)]
struct AnswerPool {
    facts: usize,
    prompts: usize,
    sums: [[f64; 4]; 2],
}

impl AnswerPool {
    fn add(&mut self, m: &EditedMetrics) {
        let n = m.prompts as f64;
        self.facts += m.facts;
        self.prompts += m.prompts;
        for (sums, a) in self.sums.iter_mut().zip([&m.before, &m.after]) {
            for (s, v) in sums
                .iter_mut()
                .zip([a.success, a.success_at_5, a.change_rate, a.mrr])
            {
                *s += v * n;
            }
        }
    }

    fn finish(&self) -> EditedMetrics {
        let n = self.prompts.max(1) as f64;
        let metrics = |s: &[f64; 4]| AnswerMetrics {
            success: s[0] / n,
            success_at_5: s[1] / n,
            change_rate: s[2] / n,
            mrr: s[3] / n,
        };
        EditedMetrics {
            facts: self.facts,
            prompts: self.prompts,
            before: metrics(&self.sums[0]),
            after: metrics(&self.sums[1]),
        }
    }
}

/// An update measured one fact at a time ([`update_each`]).
#[derive(Debug, Clone)]
pub struct EachOutcome {
    /// The pooled report (`each` set).
    pub report: EditReport,
    /// The facts edited, each with its own neurons, in order.
    pub facts: Vec<FactEdit>,
    /// The facts skipped, and why.
    pub skipped: Vec<Skipped>,
    /// Value slots changed, summed over the edits.
    pub slot_changes: usize,
}

/// Updates each fact of `requests` alone, from the unedited model (the paper's
/// protocol), and pools the metrics over the edits: success, success@5, change rate
/// and MRR over the edited facts' prompts; with `eval`, the gold accuracy and
/// perplexity of the evaluation facts of the edited fact's relation (itself left out)
/// and of the others, over every (edit, evaluation prompt) pair.
pub fn update_each(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    requests: &[UpdateRequest],
    options: &UpdateOptions,
    storage: DType,
    eval: Option<&[EvalFact]>,
    model: ModelInfo,
) -> Result<EachOutcome> {
    let baseline = eval.map(|facts| gold_baseline(lm, facts)).transpose()?;
    let mut answers = AnswerPool::default();
    let (mut same, mut other) = (GroupPool::default(), GroupPool::default());
    let mut per_relation: BTreeMap<Option<String>, GroupPool> = BTreeMap::new();
    let mut outcome = EachOutcome {
        report: EditReport {
            operation: Operation::Update,
            rule: Some(options.rule.name().to_string()),
            value: None,
            relations: Vec::new(),
            model,
            kn_version: env!("CARGO_PKG_VERSION").to_string(),
            edited_facts: None,
            same_relation: None,
            other_relation: None,
            per_relation: Vec::new(),
            skipped: Vec::new(),
            control: options.random_control.map(|_| ControlKind::Random),
            each: true,
        },
        facts: Vec::new(),
        skipped: Vec::new(),
        slot_changes: 0,
    };
    let mut relations = BTreeSet::new();
    for request in requests {
        let plan = plan_update(lm, neurons, std::slice::from_ref(request), options, storage)?;
        outcome.skipped.extend(plan.skipped);
        let Some(edit) = plan.facts.into_iter().next() else {
            continue;
        };
        outcome.slot_changes += plan.slots.len();
        let after = LoadedModel {
            model: apply_slots(&lm.model, &plan.slots)?,
            ..lm.clone()
        };
        let edited = EditedFact {
            prompts: encode_prompts(lm, &request.fact.prompts)?,
            old_id: lm.tokenizer.answer_id(&edit.answer)?,
            new_id: lm.tokenizer.answer_id(&edit.new_answer)?,
        };
        answers.add(&evaluate_edited(lm, &after, std::slice::from_ref(&edited))?);
        if let (Some(facts), Some(baseline)) = (eval, &baseline) {
            let own: BTreeSet<String> = edit.relation.iter().cloned().collect();
            let exclude = HashSet::from([edit.id.to_string()]);
            let (s, o, per) = evaluate_gold_against(baseline, &after, facts, &own, &exclude)?;
            if let Some(s) = &s {
                same.add(s);
            }
            if let Some(o) = &o {
                other.add(o);
            }
            for g in &per {
                per_relation.entry(g.relation.clone()).or_default().add(g);
            }
        }
        relations.extend(edit.relation.clone());
        outcome.facts.push(edit);
    }
    let report = &mut outcome.report;
    report.relations = relations.into_iter().collect();
    report.skipped = outcome.skipped.clone();
    if answers.facts > 0 {
        report.edited_facts = Some(answers.finish());
    }
    if eval.is_some() {
        report.same_relation = (same.facts > 0).then(|| same.finish(None));
        report.other_relation = (other.facts > 0).then(|| other.finish(None));
        report.per_relation = per_relation
            .into_iter()
            .map(|(relation, pool)| pool.finish(relation))
            .collect();
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_sums_give_accuracy_and_perplexity() {
        let d = |p: Vec<f32>| MaskDistribution {
            mask_position: 1,
            probabilities: p,
        };
        let sums = GoldSums::of(&[d(vec![0.5, 0.25, 0.25]), d(vec![0.2, 0.8, 0.0])], 0);
        let m = sums.metrics();
        assert_eq!(m.accuracy, 0.5);
        // exp(−(ln 0.5 + ln 0.2) / 2) = 1 / sqrt(0.1)
        assert!((m.perplexity - 1.0 / 0.1f64.sqrt()).abs() < 1e-6, "{m:?}");
        // A probability of 0 is floored: finite perplexity.
        let zero = GoldSums::of(&[d(vec![0.2, 0.8, 0.0])], 2).metrics();
        assert!(zero.perplexity.is_finite() && zero.perplexity > 1e30);
    }
}
