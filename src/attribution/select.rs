//! From scores to knowledge neurons: the coarse set of each prompt and the refined set
//! of a fact (the paper's coarse and refined sets; docs/guide/attribute.md), and the released code's adaptive
//! share per relation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Neuron;

/// A neuron and its score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoredNeuron {
    /// Layer, 0-based.
    pub layer: usize,
    /// Unit within the layer.
    pub index: usize,
    /// Attribution (or activation) score.
    pub score: f32,
}

impl ScoredNeuron {
    /// The neuron without its score.
    pub fn neuron(&self) -> Neuron {
        Neuron {
            layer: self.layer,
            index: self.index,
        }
    }
}

/// The largest score over all layers and neurons.
pub fn max_score(scores: &[Vec<f32>]) -> f32 {
    scores
        .iter()
        .flatten()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Neurons with `score ≥ fraction · max`, highest first (ties by layer, index). Empty
/// when no score is positive: a threshold relative to a non-positive maximum would
/// select neurons that argue against the answer.
pub fn above(scores: &[Vec<f32>], fraction: f64) -> Vec<ScoredNeuron> {
    let max = max_score(scores);
    if max.is_nan() || max <= 0.0 {
        return Vec::new();
    }
    let cut = cut(max, fraction);
    let mut out: Vec<ScoredNeuron> = scores
        .iter()
        .enumerate()
        .flat_map(|(layer, row)| {
            row.iter()
                .enumerate()
                .filter(move |(_, &s)| s >= cut)
                .map(move |(index, &score)| ScoredNeuron {
                    layer,
                    index,
                    score,
                })
        })
        .collect();
    sort_by_score(&mut out);
    out
}

/// The score at `fraction · max`, as coarse sets compare against it.
fn cut(max: f32, fraction: f64) -> f32 {
    (fraction * f64::from(max)) as f32
}

/// Splits neurons (highest first) into the coarse set (`score ≥ threshold · max`) and
/// the rest, keeping their order. `kn attribute` and `kn refine` both select through
/// this, so that refining reproduces attributing at the same threshold exactly.
pub fn split_at_threshold(
    neurons: Vec<ScoredNeuron>,
    max: f32,
    threshold: f64,
) -> (Vec<ScoredNeuron>, Vec<ScoredNeuron>) {
    let cut = cut(max, threshold);
    neurons.into_iter().partition(|s| s.score >= cut)
}

/// Highest score first, ties by (layer, index).
pub fn sort_by_score(neurons: &mut [ScoredNeuron]) {
    neurons.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.layer.cmp(&b.layer))
            .then(a.index.cmp(&b.index))
    });
}

/// How many prompts a neuron must be coarse in to be refined: `max(share·n, min_prompts)`.
pub fn required_prompts(prompts: usize, share: f64, min_prompts: usize) -> f64 {
    (share * prompts as f64).max(min_prompts as f64)
}

/// A refined neuron of a fact, with the evidence for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefinedNeuron {
    /// Layer.
    pub layer: usize,
    /// Unit within the layer.
    pub index: usize,
    /// In how many prompts' coarse sets it is.
    pub prompts: usize,
    /// `prompts / n`.
    pub share: f64,
    /// Mean of score / prompt max over the prompts where it is coarse.
    pub mean_relative_score: f64,
}

/// Neurons in the coarse sets of at least [`required_prompts`] prompts, sorted by
/// (layer, index). `coarse[p]` lists prompt p's coarse neurons with its max score.
pub fn refine(
    coarse: &[(f32, Vec<ScoredNeuron>)],
    share: f64,
    min_prompts: usize,
) -> Vec<RefinedNeuron> {
    let n = coarse.len();
    let need = required_prompts(n, share, min_prompts);
    let mut counts: BTreeMap<Neuron, (usize, f64)> = BTreeMap::new();
    for (max, set) in coarse {
        for s in set {
            let entry = counts.entry(s.neuron()).or_default();
            entry.0 += 1;
            entry.1 += f64::from(s.score) / f64::from(*max);
        }
    }
    counts
        .into_iter()
        .filter(|(_, (count, _))| *count as f64 >= need)
        .map(|(neuron, (count, relative))| RefinedNeuron {
            layer: neuron.layer,
            index: neuron.index,
            prompts: count,
            share: count as f64 / n as f64,
            mean_relative_score: relative / count as f64,
        })
        .collect()
}

/// The released code's adaptive share for one relation: starting from `share`, move it
/// by ±0.05 (at most 6 passes) until the mean number of refined neurons per fact is in
/// [2, 5]. `facts[f]` holds fact f's coarse sets. Returns the share used.
pub fn adaptive_share(
    facts: &[Vec<(f32, Vec<ScoredNeuron>)>],
    share: f64,
    min_prompts: usize,
) -> f64 {
    let mean = |p: f64| -> f64 {
        if facts.is_empty() {
            return 0.0;
        }
        let total: usize = facts.iter().map(|f| refine(f, p, min_prompts).len()).sum();
        total as f64 / facts.len() as f64
    };
    let mut p = share;
    for _ in 0..6 {
        let m = mean(p);
        if m < 2.0 {
            p -= 0.05;
        } else if m > 5.0 {
            p += 0.05;
        } else {
            break;
        }
    }
    // Round away the accumulated binary error of the ±0.05 steps.
    (p * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(layer: usize, index: usize, score: f32) -> ScoredNeuron {
        ScoredNeuron {
            layer,
            index,
            score,
        }
    }

    #[test]
    fn coarse_uses_the_max_over_all_layers() {
        let scores = vec![vec![0.1, 0.5, -1.0], vec![1.0, 0.2, 0.19]];
        let got = above(&scores, 0.2);
        assert_eq!(got, vec![n(1, 0, 1.0), n(0, 1, 0.5), n(1, 1, 0.2)]);
        assert!(above(&[vec![-1.0, 0.0]], 0.2).is_empty());
    }

    #[test]
    fn refine_counts_prompts_with_a_floor() {
        let a = (1.0, vec![n(0, 1, 1.0), n(2, 3, 0.5)]);
        let b = (2.0, vec![n(0, 1, 1.0)]);
        let c = (1.0, vec![n(0, 1, 1.0), n(2, 3, 0.4)]);
        // n = 3, p = 0.7: need max(2.1, 3) = 3 prompts.
        let got = refine(&[a.clone(), b.clone(), c.clone()], 0.7, 3);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].layer, got[0].index, got[0].prompts), (0, 1, 3));
        assert!((got[0].mean_relative_score - (1.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
        // Without the floor, 2.1 → 3 prompts still; with p = 0.5, 1.5 → 2 prompts.
        let got = refine(&[a, b, c], 0.5, 1);
        assert_eq!(
            got.iter().map(|r| (r.layer, r.index)).collect::<Vec<_>>(),
            [(0, 1), (2, 3)]
        );
    }

    #[test]
    fn adaptive_share_moves_by_steps_of_five_hundredths_for_at_most_six_passes() {
        // One fact, 4 prompts; k neurons coarse in 3 of the 4.
        let fact = |k: usize| {
            let set: Vec<ScoredNeuron> = (0..k).map(|i| n(0, i, 1.0)).collect();
            vec![
                (1.0, set.clone()),
                (1.0, set.clone()),
                (1.0, set),
                (1.0, vec![]),
            ]
        };
        // 4 refined neurons at p = 0.7 (need 2.8 ≤ 3): already in [2, 5].
        assert_eq!(adaptive_share(&[fact(4)], 0.7, 1), 0.7);
        // 8 at p ≤ 0.75, 0 at 0.8 (need 3.2): 0.7 → 0.75 → 0.8 → 0.75 → 0.8 → 0.75 → 0.8.
        assert_eq!(adaptive_share(&[fact(8)], 0.7, 1), 0.8);
        // 1 neuron: too few, p falls to 0.4 in 6 passes (need 1.6..2.8 ≤ 3 all along).
        assert_eq!(adaptive_share(&[fact(1)], 0.7, 1), 0.4);
    }
}
