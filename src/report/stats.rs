//! The statistics of `kn report`, as plain functions over plain records: where refined
//! neurons lie (the paper's Figure 3), how many a fact has, how many fact pairs share
//! (its statistics table), what suppressing or amplifying them does (Figures 4 and 5).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::input::{ControlKind, ProbeMode, ProbeRecord, ProbeRun};
use crate::attribution::record::{FactRecord, Method};
use crate::model::Neuron;

/// The relation of facts that have none.
pub const NO_RELATION: &str = "(none)";

/// A fact as the neuron statistics see it: its relation and its refined neurons.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    /// Relation name ([`NO_RELATION`] when the input had none).
    pub relation: String,
    /// Refined neurons, sorted, each once.
    pub neurons: Vec<Neuron>,
}

impl Fact {
    /// A fact from relation and neurons (duplicates dropped).
    pub fn new(relation: impl Into<String>, mut neurons: Vec<Neuron>) -> Self {
        neurons.sort();
        neurons.dedup();
        Self {
            relation: relation.into(),
            neurons,
        }
    }

    /// The refined neurons of a `kn attribute` record.
    pub fn from_record(record: &FactRecord) -> Self {
        Self::new(
            record.relation.as_deref().unwrap_or(NO_RELATION),
            record
                .refined
                .iter()
                .map(|n| Neuron {
                    layer: n.layer,
                    index: n.index,
                })
                .collect(),
        )
    }
}

/// Orders names as people read them, numbers by value: `P17` before `P101` (Wikidata
/// relation ids), ties broken by plain string order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> impl Iterator<Item = &str> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (chunk, tail) = rest.split_at(end);
            rest = tail;
            Some(chunk)
        })
    }
    let by_chunks = chunks(a).zip(chunks(b)).map(|(x, y)| {
        let numeric = |c: &str| c.starts_with(|c: char| c.is_ascii_digit());
        if numeric(x) && numeric(y) {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.cmp(y)
        }
    });
    by_chunks
        .fold(Ordering::Equal, Ordering::then)
        .then_with(|| chunks(a).count().cmp(&chunks(b).count()))
        .then_with(|| a.cmp(b))
}

/// The relations of `facts`, in [`natural_cmp`] order, each once.
pub fn relations(facts: &[Fact]) -> Vec<String> {
    let mut names: Vec<String> = facts.iter().map(|f| f.relation.clone()).collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    names.dedup();
    names
}

/// How a set of refined neurons spreads over the layers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerShare {
    /// Refined neurons in the set (a neuron of two facts counts twice).
    pub neurons: usize,
    /// Per layer, how many of them lie there.
    pub counts: Vec<usize>,
    /// Per layer, `counts / neurons` (all 0 when the set is empty).
    pub share: Vec<f64>,
}

impl LayerShare {
    fn new(counts: Vec<usize>) -> Self {
        let neurons: usize = counts.iter().sum();
        let share = counts
            .iter()
            .map(|&c| {
                if neurons == 0 {
                    0.0
                } else {
                    c as f64 / neurons as f64
                }
            })
            .collect();
        Self {
            neurons,
            counts,
            share,
        }
    }
}

/// A [`LayerShare`] of one relation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelationLayerShare {
    /// The relation.
    pub relation: String,
    /// Its neurons over the layers.
    #[serde(flatten)]
    pub layers: LayerShare,
}

/// Refined neurons over layers, overall and per relation (the paper's Figure 3).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerDistribution {
    /// All facts.
    pub overall: LayerShare,
    /// Per relation, in [`natural_cmp`] order.
    pub by_relation: Vec<RelationLayerShare>,
}

/// Counts every fact's refined neurons by layer. Every neuron's layer must be below
/// `layers` (the caller checked it).
pub fn layer_distribution(facts: &[Fact], layers: usize) -> LayerDistribution {
    let mut overall = vec![0; layers];
    let mut by_relation: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for fact in facts {
        let counts = by_relation
            .entry(&fact.relation)
            .or_insert_with(|| vec![0; layers]);
        for n in &fact.neurons {
            overall[n.layer] += 1;
            counts[n.layer] += 1;
        }
    }
    let mut by_relation: Vec<RelationLayerShare> = by_relation
        .into_iter()
        .map(|(relation, counts)| RelationLayerShare {
            relation: relation.to_string(),
            layers: LayerShare::new(counts),
        })
        .collect();
    by_relation.sort_by(|a, b| natural_cmp(&a.relation, &b.relation));
    LayerDistribution {
        overall: LayerShare::new(overall),
        by_relation,
    }
}

/// Refined neurons per fact over a set of facts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountSummary {
    /// Facts.
    pub facts: usize,
    /// Refined neurons of all of them together.
    pub neurons: usize,
    /// Mean per fact (null without facts).
    pub mean: Option<f64>,
    /// Median per fact: the mean of the two middle facts for an even count.
    pub median: Option<f64>,
    /// Fewest.
    pub min: usize,
    /// Most.
    pub max: usize,
    /// Facts with no refined neuron.
    pub zero: usize,
    /// `histogram[k]`: facts with exactly k refined neurons, k = 0..=max.
    pub histogram: Vec<usize>,
}

impl CountSummary {
    /// The summary of per-fact counts, in any order.
    pub fn of(mut counts: Vec<usize>) -> Self {
        counts.sort_unstable();
        let facts = counts.len();
        let max = counts.last().copied().unwrap_or(0);
        let mut histogram = vec![0; max + 1];
        for &c in &counts {
            histogram[c] += 1;
        }
        let neurons: usize = counts.iter().sum();
        let median = match facts {
            0 => None,
            n if n % 2 == 1 => Some(counts[n / 2] as f64),
            n => Some((counts[n / 2 - 1] + counts[n / 2]) as f64 / 2.0),
        };
        Self {
            facts,
            neurons,
            mean: (facts > 0).then(|| neurons as f64 / facts as f64),
            median,
            min: counts.first().copied().unwrap_or(0),
            max,
            zero: histogram[0] * usize::from(facts > 0),
            histogram,
        }
    }
}

/// A [`CountSummary`] of one relation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelationCount {
    /// The relation.
    pub relation: String,
    /// Its facts' refined neurons.
    #[serde(flatten)]
    pub counts: CountSummary,
}

/// Refined neurons per fact, overall and per relation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerFact {
    /// All facts.
    pub overall: CountSummary,
    /// Per relation, in [`natural_cmp`] order.
    pub by_relation: Vec<RelationCount>,
}

/// How many refined neurons each fact has.
pub fn neurons_per_fact(facts: &[Fact]) -> PerFact {
    let mut by_relation: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for fact in facts {
        by_relation
            .entry(&fact.relation)
            .or_default()
            .push(fact.neurons.len());
    }
    let mut by_relation: Vec<RelationCount> = by_relation
        .into_iter()
        .map(|(relation, counts)| RelationCount {
            relation: relation.to_string(),
            counts: CountSummary::of(counts),
        })
        .collect();
    by_relation.sort_by(|a, b| natural_cmp(&a.relation, &b.relation));
    PerFact {
        overall: CountSummary::of(facts.iter().map(|f| f.neurons.len()).collect()),
        by_relation,
    }
}

/// Shared neurons summed over a set of fact pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairMean {
    /// Unordered fact pairs.
    pub pairs: u64,
    /// Σ over those pairs of |refined(a) ∩ refined(b)|.
    pub shared: u64,
    /// `shared / pairs` (null without pairs).
    pub mean: Option<f64>,
}

impl PairMean {
    fn new(pairs: u64, shared: u64) -> Self {
        Self {
            pairs,
            shared,
            mean: (pairs > 0).then(|| shared as f64 / pairs as f64),
        }
    }
}

/// Neurons shared between fact pairs (the paper: 1.23 for same-relation pairs, 0.09 for
/// different-relation pairs), and per relation pair.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SharedNeurons {
    /// Pairs of facts of the same relation.
    pub same_relation: PairMean,
    /// Pairs of facts of different relations.
    pub different_relation: PairMean,
    /// Row and column names of the matrices, in [`natural_cmp`] order.
    pub relations: Vec<String>,
    /// `pairs[r][s]`: fact pairs with one fact in r and one in s (`n_r(n_r−1)/2` on the
    /// diagonal, `n_r·n_s` off it).
    pub pairs: Vec<Vec<u64>>,
    /// `shared[r][s]`: shared neurons summed over those pairs.
    pub shared: Vec<Vec<u64>>,
    /// `mean[r][s] = shared / pairs` (null without pairs: a relation of one fact has no
    /// pair within itself).
    pub mean: Vec<Vec<Option<f64>>>,
}

/// Shared neurons of all unordered fact pairs, by counting per neuron rather than
/// looping over pairs (27k ParaRel facts make 3.6e8 pairs): a neuron held by `c_r`
/// facts of relation r is shared by `c_r(c_r−1)/2` pairs within r and by `c_r·c_s`
/// pairs across r and s. Exact, and linear in the number of refined neurons (times the
/// relations holding a neuron, squared).
pub fn shared_neurons(facts: &[Fact]) -> SharedNeurons {
    let relations = relations(facts);
    let index: HashMap<&str, usize> = relations
        .iter()
        .enumerate()
        .map(|(i, r)| (r.as_str(), i))
        .collect();
    let r = relations.len();
    let mut sizes = vec![0u64; r];
    // Per neuron, per relation: how many facts hold it.
    let mut holders: HashMap<Neuron, BTreeMap<usize, u64>> = HashMap::new();
    for fact in facts {
        let rel = index[fact.relation.as_str()];
        sizes[rel] += 1;
        for &n in &fact.neurons {
            *holders.entry(n).or_default().entry(rel).or_default() += 1;
        }
    }
    let mut shared = vec![vec![0u64; r]; r];
    for counts in holders.values() {
        let counts: Vec<(usize, u64)> = counts.iter().map(|(&k, &v)| (k, v)).collect();
        for (i, &(a, ca)) in counts.iter().enumerate() {
            shared[a][a] += ca * (ca - 1) / 2;
            for &(b, cb) in &counts[i + 1..] {
                shared[a][b] += ca * cb;
                shared[b][a] += ca * cb;
            }
        }
    }
    let pairs: Vec<Vec<u64>> = (0..r)
        .map(|a| {
            (0..r)
                .map(|b| {
                    if a == b {
                        sizes[a] * sizes[a].saturating_sub(1) / 2
                    } else {
                        sizes[a] * sizes[b]
                    }
                })
                .collect()
        })
        .collect();
    let (mut same, mut different) = ((0, 0), (0, 0));
    for a in 0..r {
        same.0 += pairs[a][a];
        same.1 += shared[a][a];
        for b in a + 1..r {
            different.0 += pairs[a][b];
            different.1 += shared[a][b];
        }
    }
    let mean = (0..r)
        .map(|a| {
            (0..r)
                .map(|b| PairMean::new(pairs[a][b], shared[a][b]).mean)
                .collect()
        })
        .collect();
    SharedNeurons {
        same_relation: PairMean::new(same.0, same.1),
        different_relation: PairMean::new(different.0, different.1),
        relations,
        pairs,
        shared,
        mean,
    }
}

/// The gold probabilities of one probed prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbedPrompt {
    /// `P(gold)`, unmodified model.
    pub before: f64,
    /// With the fact's knowledge neurons suppressed or amplified.
    pub after: f64,
    /// With the control neurons treated the same way, when there was a control.
    pub control_after: Option<f64>,
}

/// What suppressing or amplifying did to the gold probability of a set of prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Effect {
    /// Prompts.
    pub prompts: usize,
    /// Mean `P(gold)` before.
    pub before: Option<f64>,
    /// Mean `P(gold)` with the knowledge neurons changed.
    pub after: Option<f64>,
    /// The paper's metric: `(mean after − mean before) / mean before`.
    pub change: Option<f64>,
    /// Prompts with a control.
    pub control_prompts: usize,
    /// Mean `P(gold)` with the control neurons changed.
    pub control_after: Option<f64>,
    /// The same metric for the control, over the prompts that have one (their own
    /// `before`).
    pub control_change: Option<f64>,
}

/// The paper's metric over `prompts`.
pub fn effect<'a>(prompts: impl IntoIterator<Item = &'a ProbedPrompt>) -> Effect {
    let (mut n, mut before, mut after) = (0usize, 0.0, 0.0);
    let (mut nc, mut control_before, mut control_after) = (0usize, 0.0, 0.0);
    for p in prompts {
        n += 1;
        before += p.before;
        after += p.after;
        if let Some(c) = p.control_after {
            nc += 1;
            control_before += p.before;
            control_after += c;
        }
    }
    let mean = |sum: f64, n: usize| (n > 0).then(|| sum / n as f64);
    let change = |after: f64, before: f64, n: usize| {
        (n > 0 && before > 0.0).then(|| (after - before) / before)
    };
    Effect {
        prompts: n,
        before: mean(before, n),
        after: mean(after, n),
        change: change(after, before, n),
        control_prompts: nc,
        control_after: mean(control_after, nc),
        control_change: change(control_after, control_before, nc),
    }
}

/// An [`Effect`] of one relation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelationEffect {
    /// The relation.
    pub relation: String,
    /// Its facts in the probe output.
    pub facts: usize,
    /// Of those, the ones not probed (no refined neurons).
    pub skipped: usize,
    /// What the probe did to their prompts.
    #[serde(flatten)]
    pub effect: Effect,
}

/// One probe run (suppress or amplify of one set of neurons, beside one control): the
/// paper's Figure 4 or 5.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeSummary {
    /// The run's name, also its figure's: `suppress`, `amplify`, then `-other-relation`
    /// for that control and `-activation` for the activation baseline's neurons
    /// (`suppress-other-relation`, `amplify-activation`).
    pub name: String,
    /// Suppress or amplify.
    pub mode: ProbeMode,
    /// How the probed neurons were found: integrated gradients (knowledge neurons) or
    /// the activation baseline.
    pub method: Method,
    /// The factor applied to the neurons (0 to suppress).
    pub factor: f64,
    /// The control's kind (`random`, `other-relation`).
    pub control: ControlKind,
    /// Facts in the probe output.
    pub facts: usize,
    /// Of those, the ones not probed.
    pub skipped: usize,
    /// Over all prompts.
    pub overall: Effect,
    /// Per relation, in [`natural_cmp`] order.
    pub by_relation: Vec<RelationEffect>,
}

/// The name of a probe run (see [`ProbeSummary::name`]).
pub fn probe_run_name(run: &ProbeRun) -> String {
    let mut name = run.mode.name().to_string();
    if run.control != ControlKind::Random {
        name.push('-');
        name.push_str(run.control.name());
    }
    if run.method == Method::Activation {
        name.push_str("-activation");
    }
    name
}

/// Summarises the records of one probe run.
pub fn probe_summary(run: ProbeRun, records: &[&ProbeRecord]) -> ProbeSummary {
    let prompts = |r: &ProbeRecord| -> Vec<ProbedPrompt> {
        r.prompts
            .iter()
            .map(|p| ProbedPrompt {
                before: p.before,
                after: p.after,
                control_after: Some(p.control_after),
            })
            .collect()
    };
    let skipped = |r: &ProbeRecord| r.skipped.is_some();
    let mut by_relation: BTreeMap<&str, (usize, usize, Vec<ProbedPrompt>)> = BTreeMap::new();
    let mut all = Vec::new();
    for r in records {
        let entry = by_relation
            .entry(r.relation.as_deref().unwrap_or(NO_RELATION))
            .or_default();
        entry.0 += 1;
        entry.1 += usize::from(skipped(r));
        let ps = prompts(r);
        all.extend_from_slice(&ps);
        entry.2.extend(ps);
    }
    let mut by_relation: Vec<RelationEffect> = by_relation
        .into_iter()
        .map(|(relation, (facts, skipped, prompts))| RelationEffect {
            relation: relation.to_string(),
            facts,
            skipped,
            effect: effect(&prompts),
        })
        .collect();
    by_relation.sort_by(|a, b| natural_cmp(&a.relation, &b.relation));
    ProbeSummary {
        name: probe_run_name(&run),
        mode: run.mode,
        method: run.method,
        factor: records.first().map_or(0.0, |r| r.params.factor),
        control: run.control,
        facts: records.len(),
        skipped: records.iter().filter(|r| skipped(r)).count(),
        overall: effect(&all),
        by_relation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(layer: usize, index: usize) -> Neuron {
        Neuron { layer, index }
    }

    /// Relation a: facts a1 {0:1, 2:5, 3:7}, a2 {2:5, 3:7}, a3 {};
    /// relation b: b1 {2:5, 1:9}, b2 {3:8}. Four layers.
    fn facts() -> Vec<Fact> {
        vec![
            Fact::new("a", vec![n(0, 1), n(2, 5), n(3, 7)]),
            Fact::new("a", vec![n(3, 7), n(2, 5), n(2, 5)]),
            Fact::new("a", vec![]),
            Fact::new("b", vec![n(2, 5), n(1, 9)]),
            Fact::new("b", vec![n(3, 8)]),
        ]
    }

    #[test]
    fn relations_sort_by_their_numbers() {
        let mut names = vec![
            "P101", "P17", "(none)", "P2", "P17b", "P017", "Q1", "P1412x",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["(none)", "P2", "P017", "P17", "P17b", "P101", "P1412x", "Q1"]
        );
    }

    #[test]
    fn duplicate_neurons_of_a_fact_count_once() {
        assert_eq!(facts()[1].neurons, vec![n(2, 5), n(3, 7)]);
    }

    #[test]
    fn layer_shares_by_hand() {
        let d = layer_distribution(&facts(), 4);
        // Layers of all 8 neurons: 0, 2, 3, 2, 3, 2, 1, 3.
        assert_eq!(d.overall.counts, vec![1, 1, 3, 3]);
        assert_eq!(d.overall.neurons, 8);
        assert_eq!(d.overall.share, vec![0.125, 0.125, 0.375, 0.375]);
        assert_eq!(d.by_relation.len(), 2);
        assert_eq!(d.by_relation[0].relation, "a");
        assert_eq!(d.by_relation[0].layers.counts, vec![1, 0, 2, 2]);
        assert_eq!(d.by_relation[0].layers.share, vec![0.2, 0.0, 0.4, 0.4]);
        assert_eq!(d.by_relation[1].layers.counts, vec![0, 1, 1, 1]);
        let third = 1.0 / 3.0;
        assert_eq!(
            d.by_relation[1].layers.share,
            vec![0.0, third, third, third]
        );
        let empty = layer_distribution(&[Fact::new("x", vec![])], 2);
        assert_eq!(empty.overall.share, vec![0.0, 0.0]);
    }

    #[test]
    fn neurons_per_fact_by_hand() {
        let p = neurons_per_fact(&facts());
        // Counts 3, 2, 0, 2, 1.
        assert_eq!(p.overall.facts, 5);
        assert_eq!(p.overall.neurons, 8);
        assert_eq!(p.overall.mean, Some(1.6));
        assert_eq!(p.overall.median, Some(2.0));
        assert_eq!((p.overall.min, p.overall.max, p.overall.zero), (0, 3, 1));
        assert_eq!(p.overall.histogram, vec![1, 1, 2, 1]);
        // a: 3, 2, 0; b: 2, 1 (even count: the two middle ones averaged).
        assert_eq!(p.by_relation[0].counts.mean, Some(5.0 / 3.0));
        assert_eq!(p.by_relation[0].counts.median, Some(2.0));
        assert_eq!(p.by_relation[1].counts.mean, Some(1.5));
        assert_eq!(p.by_relation[1].counts.median, Some(1.5));
        assert_eq!(p.by_relation[1].counts.zero, 0);
        assert_eq!(p.by_relation[1].counts.histogram, vec![0, 1, 1]);
        let none = CountSummary::of(vec![]);
        assert_eq!((none.mean, none.median, none.zero), (None, None, 0));
    }

    #[test]
    fn shared_neurons_by_hand() {
        let s = shared_neurons(&facts());
        assert_eq!(s.relations, vec!["a", "b"]);
        // Within a: (a1,a2) share 2:5 and 3:7, (a1,a3) and (a2,a3) nothing: 2 over 3 pairs.
        // Within b: (b1,b2) nothing: 0 over 1 pair.
        assert_eq!(s.same_relation, PairMean::new(4, 2));
        assert_eq!(s.same_relation.mean, Some(0.5));
        // Across: 2:5 is in a1, a2 and b1: (a1,b1), (a2,b1); 6 pairs.
        assert_eq!(s.different_relation, PairMean::new(6, 2));
        assert_eq!(s.pairs, vec![vec![3, 6], vec![6, 1]]);
        assert_eq!(s.shared, vec![vec![2, 2], vec![2, 0]]);
        assert_eq!(
            s.mean,
            vec![
                vec![Some(2.0 / 3.0), Some(1.0 / 3.0)],
                vec![Some(1.0 / 3.0), Some(0.0)]
            ]
        );
        let lone = shared_neurons(&[Fact::new("x", vec![n(0, 0)])]);
        assert_eq!(lone.mean, vec![vec![None]]);
        assert_eq!(lone.same_relation.mean, None);
    }

    /// Brute force over all pairs, the definition.
    fn shared_by_pairs(facts: &[Fact]) -> (Vec<String>, Vec<Vec<u64>>, Vec<Vec<u64>>) {
        let rel = relations(facts);
        let at = |f: &Fact| rel.iter().position(|r| *r == f.relation).unwrap();
        let mut pairs = vec![vec![0u64; rel.len()]; rel.len()];
        let mut shared = pairs.clone();
        for i in 0..facts.len() {
            for j in i + 1..facts.len() {
                let (a, b) = (at(&facts[i]), at(&facts[j]));
                let common = facts[i]
                    .neurons
                    .iter()
                    .filter(|x| facts[j].neurons.contains(x))
                    .count() as u64;
                pairs[a][b] += 1;
                shared[a][b] += common;
                if a != b {
                    pairs[b][a] += 1;
                    shared[b][a] += common;
                }
            }
        }
        (rel, pairs, shared)
    }

    #[test]
    fn shared_neurons_by_counting_equal_the_pair_loop() {
        // A small xorshift: the test needs no random crate, and is the same every run.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let facts: Vec<Fact> = (0..300)
            .map(|_| {
                let relation = format!("r{}", next(7));
                let k = next(8) as usize;
                let neurons = (0..k)
                    .map(|_| n(next(4) as usize, next(12) as usize))
                    .collect();
                Fact::new(relation, neurons)
            })
            .collect();
        let fast = shared_neurons(&facts);
        let (relations, pairs, shared) = shared_by_pairs(&facts);
        assert_eq!(fast.relations, relations);
        assert_eq!(fast.pairs, pairs);
        assert_eq!(fast.shared, shared);
        let same: u64 = (0..relations.len()).map(|a| shared[a][a]).sum();
        assert_eq!(fast.same_relation.shared, same);
        assert!(same > 0 && fast.different_relation.shared > 0);
        assert_eq!(
            fast.same_relation.pairs + fast.different_relation.pairs,
            300 * 299 / 2
        );
    }

    #[test]
    fn probe_effect_by_hand() {
        let p = |before, after, control_after| ProbedPrompt {
            before,
            after,
            control_after,
        };
        let prompts = [
            p(0.4, 0.1, Some(0.4)),
            p(0.6, 0.3, Some(0.5)),
            p(0.2, 0.2, None),
        ];
        let e = effect(&prompts);
        assert_eq!(e.prompts, 3);
        assert!((e.before.unwrap() - 0.4).abs() < 1e-12);
        assert!((e.after.unwrap() - 0.2).abs() < 1e-12);
        // (0.2 − 0.4) / 0.4
        assert!((e.change.unwrap() + 0.5).abs() < 1e-12);
        // Control over the first two: before 0.5, after 0.45.
        assert_eq!(e.control_prompts, 2);
        assert!((e.control_after.unwrap() - 0.45).abs() < 1e-12);
        assert!((e.control_change.unwrap() + 0.1).abs() < 1e-12);
        let none = effect(&[]);
        assert_eq!((none.change, none.control_change), (None, None));
    }

    #[test]
    fn probe_summary_by_hand() {
        let record = |relation: &str, prompts: serde_json::Value, skipped: bool| {
            serde_json::from_value::<ProbeRecord>(serde_json::json!({
                "id": 1, "relation": relation, "answer": "x", "answer_id": 0,
                "mode": "suppress", "factor": 0.0, "neurons": [],
                "control": {"kind": "random", "neurons": []}, "prompts": prompts,
                "skipped": if skipped { serde_json::json!("no refined neurons") } else { serde_json::Value::Null },
                "model": {"source": "m", "weights_sha256": "00"},
                "params": {"mode": "suppress", "factor": 0.0, "control": "random", "seed": 0,
                           "neurons_sha256": "00"},
                "kn_version": "0"
            }))
            .unwrap()
        };
        let p = |b: f64, a: f64, c: f64| serde_json::json!({"prompt": "p", "before": b, "after": a, "control_after": c});
        let records = [
            record(
                "a",
                serde_json::json!([p(0.5, 0.1, 0.5), p(0.3, 0.1, 0.2)]),
                false,
            ),
            record("a", serde_json::json!([]), true),
            record("b", serde_json::json!([p(0.2, 0.3, 0.2)]), false),
        ];
        let refs: Vec<&ProbeRecord> = records.iter().collect();
        let run = ProbeRun::of(&records[0]);
        assert_eq!(
            run.method,
            Method::IntegratedGradients,
            "no method: knowledge neurons"
        );
        let s = probe_summary(run, &refs);
        assert_eq!((s.facts, s.skipped), (3, 1));
        assert_eq!(
            (s.name.as_str(), s.control),
            ("suppress", ControlKind::Random)
        );
        assert_eq!(s.factor, 0.0);
        let other = ProbeRun {
            method: Method::Activation,
            mode: ProbeMode::Amplify,
            control: ControlKind::OtherRelation,
        };
        assert_eq!(probe_run_name(&other), "amplify-other-relation-activation");
        // a: before 0.4, after 0.1: −75%; control 0.35: −12.5%.
        let a = &s.by_relation[0];
        assert_eq!(
            (a.relation.as_str(), a.facts, a.skipped, a.effect.prompts),
            ("a", 2, 1, 2)
        );
        assert!((a.effect.change.unwrap() + 0.75).abs() < 1e-12);
        assert!((a.effect.control_change.unwrap() + 0.125).abs() < 1e-12);
        // b: 0.2 → 0.3: +50%.
        assert!((s.by_relation[1].effect.change.unwrap() - 0.5).abs() < 1e-12);
        // All: before (0.5+0.3+0.2)/3, after 0.5/3: −50%; control 0.9/3: −10%.
        assert!((s.overall.change.unwrap() + 0.5).abs() < 1e-12);
        assert!((s.overall.control_change.unwrap() + 0.1).abs() < 1e-12);
    }
}
