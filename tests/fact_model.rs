//! The bundled fact model (`data/fact-model`, trained by `examples/train-fact-model.rs`)
//! and its facts (`data/facts.jsonl`): top-1 on every prompt, recomputed here with kn's
//! library, equals an independent float64 PyTorch reference
//! (`tests/golden/fact_model_predict.json`, scripts/golden/fact_model_predict.py); the
//! accuracy on training and held-out prompts equals the committed figures
//! (`data/fact-model/training.json`, which kn's code wrote) and meets the targets
//! (≥ 90% and ≥ 50%); the
//! weights carry `BertForMaskedLM`'s names; `kn attribute` finds refined neurons on it.
//! How long that takes is a benchmark figure (docs/speed/README.md), not asserted here.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use kn::attribution::record::FactRecord;
use kn::model::{LoadedModel, ModelFiles, ModelSource};
use kn::predict::mask_distribution;
use serde::Deserialize;

/// P(answer) against float64 PyTorch: `|kn − reference| ≤ PROB_REL_TOL · max(reference,
/// 1e-3)`: relative, absolute below 1e-3. Measured at most 2.0e-6 (2026-12-03).
const PROB_REL_TOL: f64 = 1e-5;

fn data() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data"))
}

fn model_dir() -> PathBuf {
    data().join("fact-model")
}

/// One line of `data/facts.jsonl`.
#[derive(Debug, Deserialize)]
struct FactLine {
    id: String,
    relation: String,
    answer: String,
    prompts: Vec<String>,
    held_out_prompts: Vec<String>,
}

fn facts() -> Vec<FactLine> {
    std::fs::read_to_string(data().join("facts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `tests/golden/fact_model_predict.json`.
#[derive(Deserialize)]
struct Golden {
    model_sha256: String,
    train_prompts: usize,
    train_correct: usize,
    held_out_prompts: usize,
    held_out_correct: usize,
    facts: Vec<GoldenFact>,
}

#[derive(Deserialize)]
struct GoldenFact {
    id: String,
    answer_id: u32,
    held_out: Vec<usize>,
    prompts: Vec<GoldenPrompt>,
}

#[derive(Deserialize)]
struct GoldenPrompt {
    ids: Vec<u32>,
    top: u32,
    margin: f64,
    answer_probability: f64,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/fact_model_predict.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn training_record() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir().join("training.json")).unwrap())
        .unwrap()
}

#[test]
fn top1_accuracy_equals_the_committed_figures_and_meets_the_targets() {
    let lm = LoadedModel::load(
        ModelFiles::locate(&ModelSource::Local(model_dir())).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let facts = facts();
    let golden = golden();
    assert_eq!(lm.files.weights_sha256().unwrap(), golden.model_sha256);
    assert_eq!(golden.facts.len(), facts.len());
    let (mut train, mut train_correct, mut held, mut held_correct) = (0, 0, 0, 0);
    let mut held_out_patterns: BTreeMap<&str, usize> = BTreeMap::new();
    let mut worst = 0f64;
    for (fact, g) in facts.iter().zip(&golden.facts) {
        assert_eq!(fact.id, g.id);
        assert_eq!(fact.prompts.len(), g.prompts.len(), "{}", fact.id);
        assert!(
            !fact.held_out_prompts.is_empty() && fact.held_out_prompts.len() < fact.prompts.len(),
            "{}: some, not all, prompts are held out",
            fact.id
        );
        *held_out_patterns.entry(&fact.relation).or_default() += fact.held_out_prompts.len();
        let answer = lm.tokenizer.answer_id(&fact.answer).unwrap();
        assert_eq!(answer, g.answer_id, "{}", fact.id);
        for held_out in &fact.held_out_prompts {
            assert!(fact.prompts.contains(held_out), "{}: {held_out:?}", fact.id);
        }
        for (i, (prompt, want)) in fact.prompts.iter().zip(&g.prompts).enumerate() {
            let encoded = lm.tokenizer.encode_prompt(prompt).unwrap();
            assert_eq!(encoded.ids, want.ids, "{} {prompt:?}: token ids", fact.id);
            let dist = mask_distribution(&lm, prompt, &()).unwrap();
            let top = dist.top_k(1)[0].0;
            // The reference's smallest margin between the top two is far above f32's
            // error here, so the top-1 must agree on every prompt.
            assert!(want.margin > 1e-4, "{} {prompt:?}: a near tie", fact.id);
            assert_eq!(top, want.top, "{} {prompt:?}: top-1", fact.id);
            let p = f64::from(dist.probabilities[answer as usize]);
            let error = (p - want.answer_probability).abs();
            worst = worst.max(error / want.answer_probability.max(1e-3));
            assert!(
                error <= PROB_REL_TOL * want.answer_probability.max(1e-3),
                "{} {prompt:?}: P(answer) {p} vs {}",
                fact.id,
                want.answer_probability
            );
            let hit = usize::from(top == answer);
            assert_eq!(
                g.held_out.contains(&i),
                fact.held_out_prompts.contains(prompt),
                "{} {prompt:?}: held out",
                fact.id
            );
            if fact.held_out_prompts.contains(prompt) {
                held += 1;
                held_correct += hit;
            } else {
                train += 1;
                train_correct += hit;
            }
        }
    }
    eprintln!(
        "largest P(answer) error against float64 PyTorch: {worst:.2e} (relative, floor 1e-3)"
    );
    let reference = (
        golden.train_prompts,
        golden.train_correct,
        golden.held_out_prompts,
        golden.held_out_correct,
    );
    assert_eq!((train, train_correct, held, held_correct), reference);
    // training.json is kn's own measurement: it stands only as long as it is PyTorch's.
    let record = training_record();
    let count = |key: &str| record[key].as_u64().unwrap() as usize;
    assert_eq!(count("facts"), facts.len());
    assert_eq!(
        (
            count("train_prompts"),
            count("train_correct"),
            count("held_out_prompts"),
            count("held_out_correct")
        ),
        reference,
        "training.json against the PyTorch reference"
    );
    let relations: BTreeSet<&str> = facts.iter().map(|f| f.relation.as_str()).collect();
    assert!(relations.len() >= 8, "{relations:?}");
    assert_eq!(
        held_out_patterns.len(),
        relations.len(),
        "every relation holds patterns out"
    );
    assert!(
        train_correct as f64 >= 0.9 * train as f64,
        "training prompts: {train_correct}/{train}"
    );
    assert!(
        held_correct as f64 >= 0.5 * held as f64,
        "held-out prompts: {held_correct}/{held}"
    );
}

#[test]
fn weights_are_named_as_bert_for_masked_lm_saves_them() {
    let dir = model_dir();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in tensors.keys() {
        assert!(
            name.starts_with("bert.embeddings.")
                || name.starts_with("bert.encoder.layer.")
                || name.starts_with("cls.predictions."),
            "{name}"
        );
    }
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.3.intermediate.dense.weight",
        "bert.encoder.layer.3.output.dense.weight",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.bias",
    ] {
        assert!(tensors.contains_key(name), "{name} missing");
    }
    // The decoder is tied to the word embeddings, as save_pretrained leaves it.
    assert!(!tensors.contains_key("cls.predictions.decoder.weight"));
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "bert");
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    assert_eq!(
        kn::model::files::sha256_file(&dir.join("model.safetensors")).unwrap(),
        training_record()["weights_sha256"].as_str().unwrap(),
        "training.json describes the committed weights"
    );
}

#[test]
fn attribute_finds_refined_neurons_of_the_first_fact() {
    let text = std::fs::read_to_string(data().join("facts.jsonl")).unwrap();
    let first = text.lines().next().unwrap();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("kn"))
        .args(["attribute", "--quiet", "--fact", "-", "--model"])
        .arg(model_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{first}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<FactRecord> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    let fact: FactLine = serde_json::from_str(first).unwrap();
    assert_eq!(record.id, serde_json::Value::from(fact.id));
    assert_eq!(record.prompts.len(), fact.prompts.len());
    assert!(!record.refined.is_empty(), "no refined neurons");
}
