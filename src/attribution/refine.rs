//! `kn refine`: redo neuron selection on records `kn attribute` wrote, with another
//! threshold, share or the released code's adaptive per-relation share, without
//! recomputing any gradient.

use std::collections::BTreeMap;

use super::record::FactRecord;
use super::select::{adaptive_share, refine, sort_by_score, split_at_threshold, ScoredNeuron};
use crate::error::{Error, Result};

/// New selection parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reselect {
    /// Coarse threshold t (must be ≥ the records' `keep`); `None` keeps each record's.
    pub threshold: Option<f64>,
    /// Share p (the starting point with `adaptive`); `None` keeps each record's.
    pub share: Option<f64>,
    /// Floor in prompts; `None` keeps each record's.
    pub min_prompts: Option<usize>,
    /// Adapt p per relation (±0.05, at most 6 passes, until 2–5 neurons per fact).
    pub adaptive: bool,
}

/// Re-partitions each prompt's stored neurons at the new threshold and recomputes the
/// refined sets. Records keep their order; `params` says what was used.
pub fn reselect(mut records: Vec<FactRecord>, how: &Reselect) -> Result<Vec<FactRecord>> {
    for (n, record) in records.iter_mut().enumerate() {
        let threshold = how.threshold.unwrap_or(record.params.threshold);
        if threshold < record.params.keep {
            return Err(Error::Prompt(format!(
                "record {} (id {}): threshold {threshold} is below the {} down to which its scores \
                 were kept; rerun kn attribute with --keep {threshold} or lower",
                n + 1,
                record.id,
                record.params.keep
            )));
        }
        for prompt in &mut record.prompts {
            let mut all: Vec<ScoredNeuron> = prompt
                .coarse
                .drain(..)
                .chain(prompt.kept.drain(..))
                .collect();
            sort_by_score(&mut all);
            let (coarse, kept) = split_at_threshold(all, prompt.max_score, threshold);
            prompt.coarse = coarse;
            prompt.kept = kept;
        }
        record.params.threshold = threshold;
        record.params.min_prompts = how.min_prompts.unwrap_or(record.params.min_prompts);
        record.params.share = how.share.unwrap_or(record.params.share);
    }
    let coarse_sets = |r: &FactRecord| -> Vec<(f32, Vec<ScoredNeuron>)> {
        r.prompts
            .iter()
            .map(|p| (p.max_score, p.coarse.clone()))
            .collect()
    };
    if how.adaptive {
        let mut by_relation: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            by_relation.entry(r.relation.clone()).or_default().push(i);
        }
        for members in by_relation.values() {
            let facts: Vec<_> = members.iter().map(|&i| coarse_sets(&records[i])).collect();
            let first = &records[members[0]].params;
            let share = adaptive_share(&facts, first.share, first.min_prompts);
            for &i in members {
                records[i].params.share = share;
                records[i].params.adaptive = Some(true);
            }
        }
    }
    for r in &mut records {
        r.refined = refine(&coarse_sets(r), r.params.share, r.params.min_prompts);
    }
    Ok(records)
}
