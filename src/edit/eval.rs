//! Measuring an edit: the new answer on the edited facts, and gold-answer accuracy and
//! perplexity on evaluation facts of the edited relations and of the others (the
//! paper's update and erase tables), and the model-editing literature's reliability,
//! generalization and locality beside them. Every rate is over prompts.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use candle_core::DType;

use super::record::{
    AnswerMetrics, EditReport, EditedMetrics, FactEdit, FactMetrics, GoldMetrics, GroupMetrics,
    Operation, Skipped,
};
use super::solve::{AnchorFact, AnchorPool, HeldOut};
use super::{
    apply_slots, plan_update_excluding, EditPlan, EraseValue, UpdateOptions, UpdateRequest,
    UpdateRule,
};
use crate::attribution::record::{FactLine, ModelInfo};
use crate::attribution::run::fact_id;
use crate::attribution::NeuronsFile;
use crate::data::{JsonlInput, LineErrors};
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

/// `KL(p ‖ q)` in nats, summed in f64 over the tokens `p` gives weight; `q` is floored
/// as [`probability`] floors it, so a token the edit drove to 0 gives a large but
/// finite divergence.
pub fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(&p, _)| p > 0.0)
        .map(|(&p, &q)| {
            let p = f64::from(p);
            p * (p.ln() - f64::from(q.max(f32::MIN_POSITIVE)).ln())
        })
        .sum()
}

/// Locality counts of some prompts: how many kept their top-1, and the summed
/// `KL(before ‖ after)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct LocalitySums {
    prompts: usize,
    unchanged: usize,
    kl: f64,
}

impl LocalitySums {
    fn of(before: &[MaskDistribution], after: &[MaskDistribution]) -> Self {
        let mut sums = Self::default();
        for (b, a) in before.iter().zip(after) {
            sums.prompts += 1;
            sums.unchanged +=
                usize::from(b.top_k(1).first().map(|t| t.0) == a.top_k(1).first().map(|t| t.0));
            sums.kl += kl_divergence(&b.probabilities, &a.probabilities);
        }
        sums
    }

    fn add(&mut self, other: Self) {
        self.prompts += other.prompts;
        self.unchanged += other.unchanged;
        self.kl += other.kl;
    }

    /// (locality, mean KL), `None` without prompts.
    fn rates(&self) -> (Option<f64>, Option<f64>) {
        if self.prompts == 0 {
            return (None, None);
        }
        let n = self.prompts as f64;
        (Some(self.unchanged as f64 / n), Some(self.kl / n))
    }
}

/// Gold metrics of the evaluation facts: the edited (erased) relations' facts, the
/// others' (each `None` when empty), and one entry per relation.
pub type GoldGroups = (
    Option<GroupMetrics>,
    Option<GroupMetrics>,
    Vec<GroupMetrics>,
);

/// The evaluation facts' gold-answer counts in the unedited model, computed once and
/// shared by every edit measured against it, and what locality needs of the unedited
/// model: its whole distributions, kept when they fit in [`KEPT_PROBABILITIES`], else
/// recomputed per edit (a vocabulary-wide vector per prompt outgrows memory on large
/// sets).
#[derive(Debug, Clone)]
pub struct GoldBaseline {
    sums: Vec<GoldSums>,
    before: LoadedModel,
    distributions: Option<Vec<Vec<MaskDistribution>>>,
}

/// The most unedited-model probabilities a [`GoldBaseline`] keeps (256 MiB of f32).
pub const KEPT_PROBABILITIES: usize = 1 << 26;

/// Scores every evaluation fact in the unedited model.
pub fn gold_baseline(before: &LoadedModel, facts: &[EvalFact]) -> Result<GoldBaseline> {
    let prompts: usize = facts.iter().map(|f| f.prompts.len()).sum();
    let keep = prompts.saturating_mul(before.config.vocab_size) <= KEPT_PROBABILITIES;
    let mut sums = Vec::with_capacity(facts.len());
    let mut kept = Vec::new();
    for f in facts {
        let d = mask_distributions(before, &f.prompts, &())?;
        sums.push(GoldSums::of(&d, f.answer_id));
        if keep {
            kept.push(d);
        }
    }
    Ok(GoldBaseline {
        sums,
        before: before.clone(),
        distributions: keep.then_some(kept),
    })
}

/// Gold accuracy and perplexity of the evaluation facts before and after, and their
/// locality (top-1 unchanged, mean KL), split into the facts of `relations` (same) and
/// the others (`None` when a group has no fact), and per relation. Facts whose id is in
/// `exclude` (the edited ones) are left out.
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
        locality: LocalitySums,
    }
    let mut same = Group::default();
    let mut other = Group::default();
    let mut per_relation: BTreeMap<Option<String>, Group> = BTreeMap::new();
    for (at, (fact, &b)) in facts.iter().zip(&baseline.sums).enumerate() {
        if exclude.contains(&fact.id.to_string()) {
            continue;
        }
        let after_d = mask_distributions(after, &fact.prompts, &())?;
        let a = GoldSums::of(&after_d, fact.answer_id);
        let l = match &baseline.distributions {
            Some(kept) => LocalitySums::of(&kept[at], &after_d),
            None => LocalitySums::of(
                &mask_distributions(&baseline.before, &fact.prompts, &())?,
                &after_d,
            ),
        };
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
            group.locality.add(l);
        }
    }
    let metrics = |relation: Option<String>, g: &Group| {
        let (locality, kl) = g.locality.rates();
        GroupMetrics {
            relation,
            facts: g.facts,
            prompts: g.before.prompts,
            before: g.before.metrics(),
            after: g.after.metrics(),
            locality,
            kl,
        }
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
    /// The prompts the edit used.
    pub prompts: Vec<EncodedPrompt>,
    /// Its prompts held out of the edit (`--holdout`) and its update record's
    /// paraphrases, scored for generalization.
    pub held_out: Vec<EncodedPrompt>,
    /// Its update record's locality prompts, scored for the edit leaving them alone.
    pub locality: Vec<EncodedPrompt>,
    /// The answer before.
    pub old_id: u32,
    /// The answer wanted.
    pub new_id: u32,
}

/// Success, success@5, change rate and MRR of the new answers, before and after, on the
/// prompts the edit used; reliability on those prompts and generalization on the
/// held-out ones (and paraphrases), after; locality and KL on the records' locality
/// prompts, fact by fact.
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
    let (mut held_out, mut generalized) = (0usize, 0usize);
    for fact in facts {
        for d in mask_distributions(after, &fact.held_out, &())? {
            held_out += 1;
            generalized += usize::from(d.top_k(1).first().map(|t| t.0) == Some(fact.new_id));
        }
    }
    let mut locality = LocalitySums::default();
    for fact in facts.iter().filter(|f| !f.locality.is_empty()) {
        locality.add(LocalitySums::of(
            &mask_distributions(before, &fact.locality, &())?,
            &mask_distributions(after, &fact.locality, &())?,
        ));
    }
    let (record_locality, record_locality_kl) = locality.rates();
    Ok(EditedMetrics {
        facts: facts.len(),
        prompts,
        before: before_metrics,
        after: after_metrics,
        // With one-token answers the top-1 test of reliability is success's.
        reliability: Some(after_metrics.success),
        held_out_prompts: held_out,
        generalization: (held_out > 0).then(|| generalized as f64 / held_out as f64),
        record_locality_prompts: locality.prompts,
        record_locality,
        record_locality_kl,
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
    /// Prompts held out of each updated fact (`--holdout`).
    pub holdout: usize,
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
        holdout: inputs.holdout,
        per_fact: Vec::new(),
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
    unchanged: f64,
    kl: f64,
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
        // The groups pooled here were all just measured, so they have locality.
        self.unchanged += g.locality.unwrap_or(0.0) * n;
        self.kl += g.kl.unwrap_or(0.0) * n;
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
            locality: Some(self.unchanged / n),
            kl: Some(self.kl / n),
        }
    }
}

/// Answer metrics pooled over edits, weighted by prompts.
#[derive(Debug, Clone, Copy, Default)]
struct AnswerPool {
    facts: usize,
    prompts: usize,
    sums: [[f64; 4]; 2],
    held_out: usize,
    generalized: f64,
    locality: LocalitySums,
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
        self.held_out += m.held_out_prompts;
        self.generalized += m.generalization.unwrap_or(0.0) * m.held_out_prompts as f64;
        let n = m.record_locality_prompts;
        self.locality.add(LocalitySums {
            prompts: n,
            // Exact: a count over n prompts, rounded back.
            unchanged: (m.record_locality.unwrap_or(0.0) * n as f64).round() as usize,
            kl: m.record_locality_kl.unwrap_or(0.0) * n as f64,
        });
    }

    fn finish(&self) -> EditedMetrics {
        let n = self.prompts.max(1) as f64;
        let metrics = |s: &[f64; 4]| AnswerMetrics {
            success: s[0] / n,
            success_at_5: s[1] / n,
            change_rate: s[2] / n,
            mrr: s[3] / n,
        };
        let after = metrics(&self.sums[1]);
        EditedMetrics {
            facts: self.facts,
            prompts: self.prompts,
            before: metrics(&self.sums[0]),
            after,
            reliability: Some(after.success),
            held_out_prompts: self.held_out,
            generalization: (self.held_out > 0).then(|| self.generalized / self.held_out as f64),
            record_locality_prompts: self.locality.prompts,
            record_locality: self.locality.rates().0,
            record_locality_kl: self.locality.rates().1,
        }
    }
}

/// Takes the last `k` of a fact's prompts (in the order the fact lists them) out of
/// `prompts` and returns them, to be held out of the edit and scored as paraphrases.
/// The fact must keep at least one prompt.
pub fn split_holdout(prompts: &mut Vec<String>, k: usize) -> Result<Vec<String>> {
    if k >= prompts.len() && k > 0 {
        return Err(Error::Prompt(format!(
            "has {} prompt(s): --holdout {k} would leave none to edit with (it needs at \
             least {})",
            prompts.len(),
            k + 1
        )));
    }
    Ok(prompts.split_off(prompts.len() - k))
}

/// Tokenizes held-out prompts; none is no paraphrase, not an error (a fact's own prompts
/// must not be empty, so [`encode_prompts`] refuses an empty list).
pub fn encode_held_out(lm: &LoadedModel, prompts: &[String]) -> Result<Vec<EncodedPrompt>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    encode_prompts(lm, prompts)
}

/// Evaluation facts as the solver's anchor candidates.
pub fn anchor_facts(facts: &[EvalFact]) -> Vec<AnchorFact> {
    facts
        .iter()
        .map(|f| AnchorFact {
            id: f.id.to_string(),
            relation: f.relation.clone(),
            prompts: f.prompts.clone(),
        })
        .collect()
}

/// The evaluation's facts and prompts, which the solved rule takes no anchor from.
pub fn held_out_of(facts: &[EvalFact]) -> HeldOut {
    HeldOut {
        ids: facts.iter().map(|f| f.id.to_string()).collect(),
        prompts: facts
            .iter()
            .flat_map(|f| f.prompts.iter().map(|p| p.ids.clone()))
            .collect(),
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
/// perplexity, locality and KL of the evaluation facts of the edited fact's relation
/// (itself left out) and of the others, over every (edit, evaluation prompt) pair. Each
/// fact's own metrics are kept in the report's `per_fact`.
pub fn update_each(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    requests: &[UpdateRequest],
    options: &UpdateOptions,
    storage: DType,
    eval: Option<&[EvalFact]>,
    model: ModelInfo,
) -> Result<EachOutcome> {
    let requests: Vec<(UpdateRequest, Vec<String>)> =
        requests.iter().map(|r| (r.clone(), Vec::new())).collect();
    let anchors = match options.rule {
        UpdateRule::Solve(_) => {
            AnchorPool::from_neurons(lm, neurons, held_out_of(eval.unwrap_or_default()))?
        }
        _ => AnchorPool::default(),
    };
    update_each_held_out(
        lm, neurons, &requests, options, storage, eval, &anchors, model,
    )
}

/// [`update_each`] with each request's held-out prompts ([`split_holdout`]), scored for
/// generalization (none: no generalization for that fact), and the solved rule's anchors.
#[allow(clippy::too_many_arguments)]
pub fn update_each_held_out(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    requests: &[(UpdateRequest, Vec<String>)],
    options: &UpdateOptions,
    storage: DType,
    eval: Option<&[EvalFact]>,
    anchors: &AnchorPool,
    model: ModelInfo,
) -> Result<EachOutcome> {
    let requests: Vec<(UpdateRequest, FactPrompts)> = requests
        .iter()
        .map(|(r, held_out)| {
            (
                r.clone(),
                FactPrompts {
                    held_out: held_out.clone(),
                    locality: Vec::new(),
                },
            )
        })
        .collect();
    update_each_records(
        lm, neurons, &requests, options, storage, eval, anchors, model,
    )
}

/// An updated fact's prompts that the edit does not use, only the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FactPrompts {
    /// Held out of the edit (`--holdout`) and the update record's paraphrases: scored
    /// for generalization.
    pub held_out: Vec<String>,
    /// The update record's locality prompts: scored for locality and KL.
    pub locality: Vec<String>,
}

/// [`update_each_held_out`] with each request's update-record prompts: paraphrases
/// pooled with the held-out prompts, and locality prompts.
#[allow(clippy::too_many_arguments)]
pub fn update_each_records(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    requests: &[(UpdateRequest, FactPrompts)],
    options: &UpdateOptions,
    storage: DType,
    eval: Option<&[EvalFact]>,
    anchors: &AnchorPool,
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
            holdout: 0,
            per_fact: Vec::new(),
        },
        facts: Vec::new(),
        skipped: Vec::new(),
        slot_changes: 0,
    };
    let mut relations = BTreeSet::new();
    for (request, extra) in requests {
        let plan = plan_update_excluding(
            lm,
            neurons,
            std::slice::from_ref(request),
            options,
            storage,
            anchors,
        )?;
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
            held_out: encode_held_out(lm, &extra.held_out)?,
            locality: encode_held_out(lm, &extra.locality)?,
            old_id: lm.tokenizer.answer_id(&edit.answer)?,
            new_id: lm.tokenizer.answer_id(&edit.new_answer)?,
        };
        let own_metrics = evaluate_edited(lm, &after, std::slice::from_ref(&edited))?;
        answers.add(&own_metrics);
        let mut fact_metrics = FactMetrics {
            id: edit.id.clone(),
            relation: edit.relation.clone(),
            edited_facts: own_metrics,
            same_relation: None,
            other_relation: None,
            solved: edit.solved,
        };
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
            fact_metrics.same_relation = s;
            fact_metrics.other_relation = o;
        }
        outcome.report.per_fact.push(fact_metrics);
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

    fn dist(p: Vec<f32>) -> MaskDistribution {
        MaskDistribution {
            mask_position: 1,
            probabilities: p,
        }
    }

    #[test]
    fn kl_divergence_is_the_hand_computed_sum() {
        // KL((½, ½, 0) ‖ (¼, ¾, 0)) = ½ ln 2 + ½ ln(2/3); the third token has no weight in p.
        let kl = kl_divergence(&[0.5, 0.5, 0.0], &[0.25, 0.75, 0.0]);
        let hand = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl - hand).abs() < 1e-7, "{kl} vs {hand}");
        assert_eq!(kl_divergence(&[0.2, 0.8], &[0.2, 0.8]), 0.0);
        // q = 0 where p > 0 is floored: large but finite.
        let floored = kl_divergence(&[1.0, 0.0], &[0.0, 1.0]);
        assert!(floored.is_finite() && floored > 80.0, "{floored}");
    }

    #[test]
    fn locality_counts_unchanged_top1_and_averages_kl() {
        let before = [dist(vec![0.6, 0.4]), dist(vec![0.1, 0.9])];
        // The first prompt's top-1 moves from token 0 to token 1; the second keeps token 1.
        let after = [dist(vec![0.4, 0.6]), dist(vec![0.1, 0.9])];
        let (locality, kl) = LocalitySums::of(&before, &after).rates();
        assert_eq!(locality, Some(0.5));
        let first = 0.6 * (0.6f64 / 0.4).ln() + 0.4 * (0.4f64 / 0.6).ln();
        assert!((kl.unwrap() - first / 2.0).abs() < 1e-7, "{kl:?}");
        assert_eq!(LocalitySums::default().rates(), (None, None));
    }

    #[test]
    fn holdout_takes_the_last_prompts_and_keeps_one() {
        let mut prompts: Vec<String> = ["p1", "p2", "p3"].map(String::from).to_vec();
        assert_eq!(split_holdout(&mut prompts, 2).unwrap(), ["p2", "p3"]);
        assert_eq!(prompts, ["p1"]);
        assert!(split_holdout(&mut prompts, 0).unwrap().is_empty());
        let err = split_holdout(&mut prompts, 1).unwrap_err().to_string();
        assert!(err.contains("has 1 prompt(s): --holdout 1"), "{err}");
        assert_eq!(prompts, ["p1"]);
    }

    #[test]
    fn pooled_generalization_is_weighted_by_held_out_prompts() {
        let answers = AnswerMetrics {
            success: 0.0,
            success_at_5: 0.0,
            change_rate: 0.0,
            mrr: 0.0,
        };
        let edit = |success: f64, held_out: usize, generalization: Option<f64>| EditedMetrics {
            facts: 1,
            prompts: 2,
            before: answers,
            after: AnswerMetrics { success, ..answers },
            reliability: Some(success),
            held_out_prompts: held_out,
            generalization,
            record_locality_prompts: 0,
            record_locality: None,
            record_locality_kl: None,
        };
        let mut pool = AnswerPool::default();
        pool.add(&edit(1.0, 1, Some(1.0)));
        pool.add(&edit(0.5, 3, Some(1.0 / 3.0)));
        let pooled = pool.finish();
        // Reliability over 4 prompts: (2·1 + 2·½) / 4; generalization over 4 held-out
        // prompts: (1 + 1) / 4.
        assert_eq!(pooled.reliability, Some(0.75));
        assert_eq!(pooled.held_out_prompts, 4);
        assert!((pooled.generalization.unwrap() - 0.5).abs() < 1e-12);
        let mut none = AnswerPool::default();
        none.add(&edit(1.0, 0, None));
        assert_eq!(none.finish().generalization, None);
    }

    #[test]
    fn pooled_record_locality_is_weighted_by_locality_prompts() {
        let answers = AnswerMetrics {
            success: 0.0,
            success_at_5: 0.0,
            change_rate: 0.0,
            mrr: 0.0,
        };
        let edit = |n: usize, locality: Option<f64>, kl: Option<f64>| EditedMetrics {
            facts: 1,
            prompts: 1,
            before: answers,
            after: answers,
            reliability: Some(0.0),
            held_out_prompts: 0,
            generalization: None,
            record_locality_prompts: n,
            record_locality: locality,
            record_locality_kl: kl,
        };
        let mut pool = AnswerPool::default();
        pool.add(&edit(1, Some(0.0), Some(0.4)));
        pool.add(&edit(3, Some(2.0 / 3.0), Some(0.2)));
        pool.add(&edit(0, None, None));
        let pooled = pool.finish();
        // 2 of 4 prompts kept their top-1; KL (0.4 + 3·0.2) / 4.
        assert_eq!(pooled.record_locality_prompts, 4);
        assert_eq!(pooled.record_locality, Some(0.5));
        assert!((pooled.record_locality_kl.unwrap() - 0.25).abs() < 1e-12);
        let mut none = AnswerPool::default();
        none.add(&edit(0, None, None));
        assert_eq!(none.finish().record_locality, None);
    }
}
