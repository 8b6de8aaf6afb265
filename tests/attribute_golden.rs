//! `kn attribute` against an independent implementation: integrated gradients in
//! float64 PyTorch + transformers on real AntiBERTy facts (golden file made by
//! scripts/golden/antiberty_attribute.py).

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device};
use kn::attribution::record::Method;
use kn::attribution::{AttributeOptions, Attributor, Fact};
use kn::model::{LoadedModel, ModelFiles, ModelSource};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    model_sha256: String,
    facts: Vec<GoldenFact>,
}

#[derive(Deserialize)]
struct GoldenFact {
    id: String,
    relation: String,
    answer: String,
    answer_id: u32,
    prompts: Vec<GoldenPrompt>,
    refined: Vec<(usize, usize)>,
    activation_refined: Vec<(usize, usize)>,
}

#[derive(Deserialize)]
struct GoldenPrompt {
    prompt: String,
    mask_position: usize,
    gold_probability: f64,
    max_score: f64,
    top: Vec<(usize, usize, f64)>,
    coarse: Vec<(usize, usize)>,
    completeness: Vec<LayerSum>,
    activation_max: f64,
    activation_coarse: Vec<(usize, usize)>,
    #[serde(default)]
    scores: HashMap<String, Vec<f64>>,
}

#[derive(Deserialize)]
struct LayerSum {
    sum: f64,
    target: f64,
}

fn golden() -> Golden {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/antiberty_attribute.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn antiberty() -> LoadedModel {
    let files = ModelFiles::locate(&ModelSource::Local(common::antiberty())).unwrap();
    LoadedModel::load(files, DType::F32, &Device::Cpu).unwrap()
}

fn fact(g: &GoldenFact) -> Fact {
    Fact {
        id: g.id.clone().into(),
        relation: Some(g.relation.clone()),
        answer: g.answer.clone(),
        prompts: g.prompts.iter().map(|p| p.prompt.clone()).collect(),
    }
}

fn set(pairs: impl IntoIterator<Item = (usize, usize)>) -> BTreeSet<(usize, usize)> {
    pairs.into_iter().collect()
}

/// Integrated gradients (left rule, m = 20, t = 0.2, p = 0.7, ≥ 3 prompts) on every
/// golden fact (4 facts of 5 prompts): every top-50 score to 1e-4 relative, whole layers
/// (where the golden has them), completeness sums, and identical coarse and refined sets.
#[test]
fn integrated_gradients_match_pytorch_float64() {
    let golden = golden();
    let lm = antiberty();
    assert_eq!(lm.files.weights_sha256().unwrap(), golden.model_sha256);
    let mut options = AttributeOptions::paper(Method::IntegratedGradients);
    // Store every neuron with a positive score, so the top 50 can be looked up.
    options.keep = 0.0;
    let attributor = Attributor::new(lm, options).unwrap();
    let mut compared = 0;
    let mut whole_layers = 0;
    assert_eq!(golden.facts.len(), 4);
    for g in &golden.facts {
        let record = attributor.attribute(&fact(g)).unwrap();
        assert_eq!(record.answer_id, g.answer_id);
        assert_eq!(record.prompts.len(), g.prompts.len(), "{}: prompts", g.id);
        for (ours, theirs) in record.prompts.iter().zip(&g.prompts) {
            assert_eq!(ours.mask_position, theirs.mask_position);
            assert!((ours.gold_probability - theirs.gold_probability).abs() < 1e-5);
            let max = theirs.max_score;
            assert!(
                (f64::from(ours.max_score) - max).abs() <= 1e-4 * max,
                "{}: max",
                g.id
            );
            let scores: HashMap<(usize, usize), f64> = ours
                .coarse
                .iter()
                .chain(&ours.kept)
                .map(|s| ((s.layer, s.index), f64::from(s.score)))
                .collect();
            for &(layer, index, score) in &theirs.top {
                let got = scores.get(&(layer, index)).copied().unwrap_or(0.0);
                assert!(
                    (got - score).abs() <= 1e-4 * score.abs().max(1e-2 * max),
                    "{} neuron {layer}:{index}: {got} vs {score}",
                    g.id
                );
                compared += 1;
            }
            if !theirs.scores.is_empty() {
                // Whole layers, signed scores included (records keep only the top).
                let all = attributor.scores(&theirs.prompt, &g.answer).unwrap().scores;
                for (layer, expected) in &theirs.scores {
                    let got = &all[layer.parse::<usize>().unwrap()];
                    assert_eq!(got.len(), expected.len(), "{} layer {layer}", g.id);
                    whole_layers += 1;
                    for (index, (&ours, &score)) in got.iter().zip(expected).enumerate() {
                        let ours = f64::from(ours);
                        assert!(
                            (ours - score).abs() <= 1e-4 * max,
                            "{} {layer}:{index}: {ours} vs {score}",
                            g.id
                        );
                    }
                }
            }
            assert_eq!(
                ours.completeness.len(),
                theirs.completeness.len(),
                "{}",
                g.id
            );
            for (c, e) in ours.completeness.iter().zip(&theirs.completeness) {
                assert!(
                    (c.target - e.target).abs() <= 1e-5,
                    "{}: layer {} target",
                    g.id,
                    c.layer
                );
                assert!(
                    (c.sum - e.sum).abs() <= 1e-4 * e.sum.abs().max(1e-3),
                    "{}: layer {} sum",
                    g.id,
                    c.layer
                );
            }
            let coarse = set(ours.coarse.iter().map(|s| (s.layer, s.index)));
            assert_eq!(
                coarse,
                set(theirs.coarse.iter().copied()),
                "{}: coarse set",
                g.id
            );
        }
        let refined = set(record.refined.iter().map(|r| (r.layer, r.index)));
        assert_eq!(
            refined,
            set(g.refined.iter().copied()),
            "{}: refined set",
            g.id
        );
        assert!(!refined.is_empty());
    }
    assert_eq!(compared, 4 * 5 * 50);
    assert_eq!(
        whole_layers, 2,
        "the golden's whole layers (cys22, layers 3 and 7)"
    );
}

/// The activation baseline (t = 0.5) on all four facts: identical coarse and refined sets.
#[test]
fn activation_method_matches_pytorch() {
    let golden = golden();
    let lm = antiberty();
    let attributor = Attributor::new(lm, AttributeOptions::paper(Method::Activation)).unwrap();
    for g in &golden.facts {
        let record = attributor.attribute(&fact(g)).unwrap();
        assert_eq!(record.prompts.len(), g.prompts.len(), "{}: prompts", g.id);
        for (ours, theirs) in record.prompts.iter().zip(&g.prompts) {
            let max = theirs.activation_max;
            assert!((f64::from(ours.max_score) - max).abs() <= 1e-5 * max.abs());
            let coarse = set(ours.coarse.iter().map(|s| (s.layer, s.index)));
            assert_eq!(
                coarse,
                set(theirs.activation_coarse.iter().copied()),
                "{}",
                g.id
            );
        }
        let refined = set(record.refined.iter().map(|r| (r.layer, r.index)));
        assert!(!refined.is_empty(), "{}: activation refined set", g.id);
        assert_eq!(
            refined,
            set(g.activation_refined.iter().copied()),
            "{}",
            g.id
        );
    }
}
