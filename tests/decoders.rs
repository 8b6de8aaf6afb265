//! Decoder LMs against an independent implementation: next-token probabilities of kn
//! (the candle forward that predict, probe and edit use, and the attribution engine's
//! normal pass) against transformers on the same checkpoints, with identical token ids.
//! Golden files: scripts/golden/decoder_random_models.py (tiny random GPT-2, Llama and
//! Qwen2, tied and untied, and a GGUF copy) and scripts/golden/smollm2_predict.py (the
//! real SmolLM2-135M GGUF file).

use crate::common;

use std::path::Path;

use candle_core::{DType, Device};
use kn::attribution::flat::Engine;
use kn::model::{LoadedModel, ModelFiles, ModelSource};
use kn::predict::mask_distribution;
use serde::Deserialize;

/// kn's probabilities against transformers': `|kn − reference| ≤ REL · max(reference,
/// FLOOR)`, relative down to FLOOR and absolute below it. Probabilities span orders of
/// magnitude (on SmolLM2's golden, 342 of the 640 top-20 entries are below 1e-2), so an
/// absolute bound alone would let a large relative error through on most of them.
struct Tolerance {
    rel: f64,
    floor: f64,
}

impl Tolerance {
    /// The error as a fraction of what is allowed (≤ 1 passes).
    fn ratio(&self, got: f64, want: f64) -> f64 {
        (got - want).abs() / (self.rel * want.abs().max(self.floor))
    }
}

/// The tiny random decoders (f32 against float64 on the same weights; their 360
/// probabilities are all near 1/360): measured at most 2.5e-5 relative (2026-12-03).
const RANDOM: Tolerance = Tolerance {
    rel: 1e-4,
    floor: 1e-4,
};
/// SmolLM2 (30 layers; f32 against float64 on the same dequantized weights): measured
/// at most 3.5e-5 relative on the answers and the top 20 (2026-12-03); below 1e-4 the
/// bound is 1e-8 absolute.
const SMOLLM2: Tolerance = Tolerance {
    rel: 1e-4,
    floor: 1e-4,
};

#[derive(Deserialize)]
struct RandomGolden {
    models: std::collections::BTreeMap<String, RandomModel>,
}

#[derive(Deserialize)]
struct RandomModel {
    path: String,
    architecture: String,
    prompts: Vec<RandomPrompt>,
}

#[derive(Deserialize)]
struct RandomPrompt {
    text: String,
    ids: Vec<u32>,
    probabilities: Vec<f64>,
}

fn load(path: &Path) -> LoadedModel {
    let source = ModelSource::parse(&path.to_string_lossy(), None).unwrap();
    let files = ModelFiles::locate(&source).unwrap();
    LoadedModel::load(files, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn golden<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// `(largest error as a fraction of the tolerance, at which id)`.
fn worst(kn: &[f32], reference: &[f64], tolerance: &Tolerance) -> (f64, usize) {
    assert_eq!(kn.len(), reference.len(), "vocabulary sizes differ");
    kn.iter()
        .zip(reference)
        .enumerate()
        .map(|(i, (&a, &b))| (tolerance.ratio(f64::from(a), b), i))
        .fold((0.0, 0), |m, d| if d.0 > m.0 { d } else { m })
}

/// Every tiny random decoder (GPT-2 and Llama tied and untied, Qwen2, the GGUF copy):
/// the same token ids, and every probability of the vocabulary within [`RANDOM`] through
/// both of kn's forward passes.
#[test]
fn random_decoders_equal_transformers() {
    let golden: RandomGolden = golden("decoder_random_models.json");
    assert!(golden.models.len() >= 6, "golden file lists every model");
    let mut largest = 0f64;
    for (name, model) in &golden.models {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(&model.path);
        let lm = load(&dir);
        let class = lm.config.to_json()["architectures"][0]
            .as_str()
            .unwrap()
            .to_string();
        assert!(model.architecture.starts_with(&class), "{name}: {class}");
        let engine = Engine::<f32>::from_model(lm.model.clone()).unwrap();
        assert!(!model.prompts.is_empty(), "{name}");
        for prompt in &model.prompts {
            let cloze = format!("{} [MASK]", prompt.text);
            let encoded = lm.tokenizer.encode_prompt(&cloze).unwrap();
            assert_eq!(
                encoded.ids, prompt.ids,
                "{name}: token ids of {:?}",
                prompt.text
            );
            let dist = mask_distribution(&lm, &cloze, &()).unwrap();
            let pass = engine.prepare(&encoded.ids, encoded.mask_position).unwrap();
            for (source, probabilities) in [
                ("forward", &dist.probabilities[..]),
                ("engine", pass.probabilities()),
            ] {
                let (ratio, at) = worst(probabilities, &prompt.probabilities, &RANDOM);
                largest = largest.max(ratio);
                assert!(
                    ratio <= 1.0,
                    "{name} {:?} ({source}): p {} vs {} at id {at}",
                    prompt.text,
                    probabilities[at],
                    prompt.probabilities[at]
                );
            }
        }
    }
    eprintln!("largest error: {largest:.3} of the tolerance");
}

#[derive(Deserialize)]
struct SmolGolden {
    gguf_sha256: String,
    prompts: Vec<SmolPrompt>,
}

#[derive(Deserialize)]
struct SmolPrompt {
    prompt: String,
    ids: Vec<u32>,
    answer: String,
    answer_id: u32,
    answer_probability: f64,
    top: Vec<(u32, String, f64)>,
}

/// SmolLM2-135M from its GGUF file: on every golden prompt, the same token ids and
/// answer id as transformers, and the answer's and the top-20 probabilities within
/// [`SMOLLM2`].
#[test]
fn smollm2_equals_transformers() {
    let golden: SmolGolden = golden("smollm2_predict.json");
    assert!(golden.prompts.len() >= 20);
    let path = common::smollm2();
    let lm = load(&path);
    assert_eq!(lm.files.weights_sha256().unwrap(), golden.gguf_sha256);
    assert_eq!(
        (
            lm.config.num_hidden_layers,
            lm.config.intermediate_size,
            lm.config.hidden_size
        ),
        (30, 1536, 576)
    );
    let engine = Engine::<f32>::from_model(lm.model.clone()).unwrap();
    let mut largest = 0f64;
    for p in &golden.prompts {
        let encoded = lm.tokenizer.encode_prompt(&p.prompt).unwrap();
        assert_eq!(encoded.ids, p.ids, "token ids of {:?}", p.prompt);
        assert_eq!(
            lm.tokenizer.answer_id(&p.answer).unwrap(),
            p.answer_id,
            "{:?}",
            p.answer
        );
        let dist = mask_distribution(&lm, &p.prompt, &()).unwrap();
        let pass = engine.prepare(&encoded.ids, encoded.mask_position).unwrap();
        for (source, probabilities) in [
            ("forward", &dist.probabilities[..]),
            ("engine", pass.probabilities()),
        ] {
            let got = f64::from(probabilities[p.answer_id as usize]);
            let ratio = SMOLLM2.ratio(got, p.answer_probability);
            largest = largest.max(ratio);
            assert!(
                ratio <= 1.0,
                "{source} {:?}: P({}) {got} vs {}",
                p.prompt,
                p.answer,
                p.answer_probability
            );
            assert_eq!(p.top.len(), 20);
            for (id, token, want) in &p.top {
                let got = f64::from(probabilities[*id as usize]);
                let ratio = SMOLLM2.ratio(got, *want);
                largest = largest.max(ratio);
                assert!(
                    ratio <= 1.0,
                    "{source} {:?}: P({token}) {got} vs {want}",
                    p.prompt
                );
            }
        }
    }
    eprintln!("largest error: {largest:.3} of the tolerance");
}

#[derive(Deserialize)]
struct AttributeGolden {
    gguf_sha256: String,
    steps: usize,
    rule: String,
    facts: Vec<GoldenFact>,
}

#[derive(Deserialize)]
struct GoldenFact {
    id: String,
    relation: String,
    answer: String,
    answer_id: u32,
    refined: Vec<(usize, usize)>,
    prompts: Vec<GoldenPrompt>,
}

#[derive(Deserialize)]
struct GoldenPrompt {
    prompt: String,
    gold_probability: f64,
    max_score: f64,
    top: Vec<(usize, usize, f64)>,
    coarse: Vec<(usize, usize, f64)>,
}

/// kn's attribution of SmolLM2 (m = 20, left rule: the paper's settings) against an
/// independent float64 PyTorch implementation (hooks on the `down_proj` input, every
/// point recomputed over the whole sequence), on 2 facts of 5 prompts: the same coarse
/// sets on every prompt and the same refined sets, and every top-50 neuron's score
/// within 1e-4 relative with `--precision f64`, within 1e-4 of the prompt's largest
/// score in kn's default f32.
#[test]
fn smollm2_attribution_equals_pytorch() {
    use kn::attribution::record::Precision;
    // f64: each score to 1e-4 of itself.
    smollm2_attribution_against_pytorch(Precision::F64, |_, score| score.abs());
    // f32: each score to 1e-4 of the largest (single-precision rounding through 30
    // layers leaves about 1e-5 of it on every score).
    smollm2_attribution_against_pytorch(Precision::F32, |max, _| max);
}

fn smollm2_attribution_against_pytorch(
    precision: kn::attribution::record::Precision,
    scale: impl Fn(f64, f64) -> f64,
) {
    use kn::attribution::record::Method;
    use kn::attribution::{AttributeOptions, Attributor, Fact};
    use std::collections::{BTreeSet, HashMap};

    let golden: AttributeGolden = golden("smollm2_attribute.json");
    let mut options = AttributeOptions::paper(Method::IntegratedGradients);
    options.precision = precision;
    // Store scores down to 1% of the max, so that every golden top-50 neuron is there
    // (the coarse and refined sets do not depend on it).
    options.keep = 0.01;
    assert_eq!(
        (options.ig.steps, options.ig.rule.to_string()),
        (golden.steps, golden.rule)
    );
    let lm = load(&common::smollm2());
    assert_eq!(lm.files.weights_sha256().unwrap(), golden.gguf_sha256);
    let attributor = Attributor::new(lm, options).unwrap();
    assert!(golden.facts.len() >= 2);
    for fact in &golden.facts {
        assert!(fact.prompts.len() >= 4);
        let record = attributor
            .attribute(&Fact {
                id: fact.id.clone().into(),
                relation: Some(fact.relation.clone()),
                answer: fact.answer.clone(),
                prompts: fact.prompts.iter().map(|p| p.prompt.clone()).collect(),
            })
            .unwrap();
        assert_eq!(record.answer_id, fact.answer_id, "{}", fact.id);
        assert_eq!(record.prompts.len(), fact.prompts.len(), "{}", fact.id);
        for (got, want) in record.prompts.iter().zip(&fact.prompts) {
            let what = format!("{precision:?} {} {:?}", fact.id, want.prompt);
            assert!(
                SMOLLM2.ratio(got.gold_probability, want.gold_probability) <= 1.0,
                "{what}: P(gold) {} vs {}",
                got.gold_probability,
                want.gold_probability
            );
            let relative = |a: f64, b: f64| (a - b).abs() / b.abs();
            assert!(
                relative(f64::from(got.max_score), want.max_score) < 1e-4,
                "{what}: max"
            );
            let scores: HashMap<(usize, usize), f32> = got
                .coarse
                .iter()
                .chain(&got.kept)
                .map(|n| ((n.layer, n.index), n.score))
                .collect();
            assert_eq!(want.top.len(), 50);
            for &(layer, index, score) in &want.top {
                let kn = scores.get(&(layer, index)).unwrap_or_else(|| {
                    panic!("{what}: {layer}:{index} not among kn's stored neurons")
                });
                let error = (f64::from(*kn) - score).abs() / scale(want.max_score, score);
                assert!(
                    error < 1e-4,
                    "{what}: {layer}:{index} {kn} vs {score} ({error:.1e})"
                );
            }
            let coarse: BTreeSet<(usize, usize)> =
                got.coarse.iter().map(|n| (n.layer, n.index)).collect();
            let want_coarse: BTreeSet<(usize, usize)> =
                want.coarse.iter().map(|&(l, i, _)| (l, i)).collect();
            assert_eq!(coarse, want_coarse, "{what}: coarse set");
        }
        let refined: BTreeSet<(usize, usize)> =
            record.refined.iter().map(|n| (n.layer, n.index)).collect();
        let want: BTreeSet<(usize, usize)> = fact.refined.iter().copied().collect();
        assert!(
            !want.is_empty(),
            "{}: the golden fact has refined neurons",
            fact.id
        );
        assert_eq!(refined, want, "{precision:?} {}: refined set", fact.id);
    }
}

/// f64 against transformers' float64 (same weights, same rope): rounding only.
const ROPE_F64: Tolerance = Tolerance {
    rel: 1e-10,
    floor: 1e-4,
};

/// The tiny random Llamas with rotary scaling (scripts/golden/decoder_rope_models.py:
/// `llama3` with Llama 3.2's factors, `yarn`, `dynamic` NTK past max_position_embeddings,
/// `linear`), on prompts of 10 to 57 tokens (past every original context): the same
/// token ids as transformers, every probability within [`RANDOM`] in f32 and within
/// [`ROPE_F64`] in f64, through the candle forward and the attribution engine. Without
/// its scaling each model's long prompts are off by far more: the scaling is what the
/// golden tests.
#[test]
fn rope_scaled_decoders_equal_transformers() {
    use kn::model::LanguageModel;
    let golden: RandomGolden = golden("decoder_rope_models.json");
    let names: Vec<&str> = golden.models.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "llama-dynamic",
            "llama-linear",
            "llama-yarn",
            "llama3-scaled"
        ]
    );
    let mut largest = [0f64; 2];
    for (name, model) in &golden.models {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(&model.path);
        assert_eq!(model.architecture, "LlamaForCausalLM");
        for (which, dtype) in [(0, DType::F32), (1, DType::F64)] {
            let source = ModelSource::parse(&dir.to_string_lossy(), None).unwrap();
            let lm = LoadedModel::load(ModelFiles::locate(&source).unwrap(), dtype, &Device::Cpu)
                .unwrap();
            let scaling = lm.config.rope_scaling.clone().expect("rope_scaling read");
            assert!(
                name.contains(scaling.name().trim_end_matches('3')),
                "{name}"
            );
            let tolerance = [&RANDOM, &ROPE_F64][which];
            let mut unscaled = lm.model.clone();
            if let LanguageModel::Llama(m) = &mut unscaled {
                m.config.rope_scaling = None;
                m.config.max_position_embeddings = 64;
            }
            let unscaled = Engine::<f64>::from_model(unscaled).unwrap();
            for prompt in &model.prompts {
                let cloze = format!("{} [MASK]", prompt.text);
                let encoded = lm.tokenizer.encode_prompt(&cloze).unwrap();
                assert_eq!(encoded.ids, prompt.ids, "{name}: ids of {:?}", prompt.text);
                let ids = candle_core::Tensor::new(encoded.ids.as_slice(), &Device::Cpu)
                    .and_then(|t| t.unsqueeze(0))
                    .unwrap();
                let forward: Vec<f64> = lm
                    .model
                    .probabilities_at(&ids, None, &[encoded.mask_position], &())
                    .unwrap()
                    .squeeze(0)
                    .and_then(|t| t.to_dtype(DType::F64))
                    .and_then(|t| t.to_vec1())
                    .unwrap();
                let mut sources: Vec<(&str, Vec<f64>)> = vec![("forward", forward)];
                if which == 0 {
                    // kn predict's path (its prompt length check included).
                    let dist = mask_distribution(&lm, &cloze, &()).unwrap();
                    let p = dist.probabilities.iter().map(|&p| f64::from(p)).collect();
                    sources.push(("mask_distribution", p));
                    let engine = Engine::<f32>::from_model(lm.model.clone()).unwrap();
                    let pass = engine.prepare(&encoded.ids, encoded.mask_position).unwrap();
                    let p = pass.probabilities().iter().map(|&p| f64::from(p)).collect();
                    sources.push(("engine f32", p));
                } else {
                    let engine = Engine::<f64>::from_model(lm.model.clone()).unwrap();
                    let pass = engine.prepare(&encoded.ids, encoded.mask_position).unwrap();
                    sources.push(("engine f64", pass.probabilities().to_vec()));
                }
                for (source, probabilities) in &sources {
                    assert_eq!(probabilities.len(), prompt.probabilities.len());
                    for (id, (&got, &want)) in
                        probabilities.iter().zip(&prompt.probabilities).enumerate()
                    {
                        let ratio = tolerance.ratio(got, want);
                        largest[which] = largest[which].max(ratio);
                        assert!(
                            ratio <= 1.0,
                            "{name} {dtype:?} {:?} ({source}): p {got} vs {want} at id {id}",
                            prompt.text
                        );
                    }
                }
                // The same model without its scaling: long prompts differ (the dynamic
                // model's 10-token prompt is within its 16 positions: no change).
                if which == 1 && prompt.ids.len() > 16 {
                    let pass = unscaled
                        .prepare(&encoded.ids, encoded.mask_position)
                        .unwrap();
                    let off = pass
                        .probabilities()
                        .iter()
                        .zip(&prompt.probabilities)
                        .fold(0f64, |m, (a, b)| m.max((a - b).abs() / b));
                    assert!(off > 1e-3, "{name}: unscaled off by only {off:e}");
                }
            }
            // All prompts in one right-padded batch (kn predict's batches): each row as
            // alone (dynamic: the frequencies of the row's own length).
            let encoded: Vec<_> = model
                .prompts
                .iter()
                .map(|p| {
                    let cloze = format!("{} [MASK]", p.text);
                    lm.tokenizer.encode_prompt(&cloze).unwrap()
                })
                .collect();
            let batch = kn::predict::mask_distributions(&lm, &encoded, &()).unwrap();
            for (dist, prompt) in batch.iter().zip(&model.prompts) {
                let (ratio, at) = worst(&dist.probabilities, &prompt.probabilities, &RANDOM);
                assert!(
                    ratio <= 1.0,
                    "{name} {dtype:?} batched {:?}: id {at}",
                    prompt.text
                );
            }
        }
    }
    eprintln!(
        "largest error: f32 {:.3}, f64 {:.3} of the tolerance",
        largest[0], largest[1]
    );
}

/// A Mistral checkpoint with a sliding window (llama-untied's files as `mistral` with
/// `sliding_window` = the longest golden prompt): prompts no longer than the window are
/// exact (llama-untied's golden distributions), a longer one is refused by predict and
/// attribute, naming the window.
#[test]
fn sliding_window_prompts_are_exact_or_refused() {
    use kn::attribution::record::Method;
    use kn::attribution::{AttributeOptions, Attributor, Fact};
    let golden: RandomGolden = golden("decoder_random_models.json");
    let untied = &golden.models["llama-untied"];
    let window = untied.prompts.iter().map(|p| p.ids.len()).max().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mistral");
    common::copy_dir(&common::tiny_decoder("llama-untied"), &dir);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["model_type"] = "mistral".into();
    config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    config["sliding_window"] = window.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let lm = load(&dir);
    assert_eq!(lm.config.sliding_window, Some(window));
    for prompt in &untied.prompts {
        let dist = mask_distribution(&lm, &format!("{} [MASK]", prompt.text), &()).unwrap();
        let (ratio, at) = worst(&dist.probabilities, &prompt.probabilities, &RANDOM);
        assert!(ratio <= 1.0, "{:?}: at id {at}", prompt.text);
    }
    let long = "The capital of France is Paris, and the capital of Japan is [MASK].";
    let err = mask_distribution(&lm, long, &()).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "sliding attention window of {window} tokens (sliding_window)"
        )),
        "{err}"
    );
    let attributor =
        Attributor::new(lm, AttributeOptions::paper(Method::IntegratedGradients)).unwrap();
    let record = attributor.attribute(&Fact {
        id: "long".to_string().into(),
        relation: None,
        answer: "capital".into(),
        prompts: vec![long.into(), long.into(), long.into()],
    });
    let err = format!("{:?}", record.map(|_| ()).expect_err("refused"));
    assert!(err.contains("sliding attention window"), "{err}");
}
