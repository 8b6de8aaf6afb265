//! Decoder LMs against an independent implementation: next-token probabilities of kn
//! (the candle forward that predict, probe and edit use, and the attribution engine's
//! normal pass) against transformers on the same checkpoints, with identical token ids.
//! Golden files: scripts/golden/decoder_random_models.py (tiny random GPT-2, Llama and
//! Qwen2, tied and untied, and a GGUF copy) and scripts/golden/smollm2_predict.py (the
//! real SmolLM2-135M GGUF file).

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use kn::attribution::engine::Engine;
use kn::model::{LoadedModel, ModelFiles, ModelSource};
use kn::predict::mask_distribution;
use serde::Deserialize;

/// Largest absolute difference allowed between kn's and transformers' probabilities.
const PROB_TOL: f64 = 1e-4;

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

/// `(largest |kn − reference|, at which id)`.
fn max_diff(kn: &[f32], reference: &[f64]) -> (f64, usize) {
    assert_eq!(kn.len(), reference.len(), "vocabulary sizes differ");
    kn.iter()
        .zip(reference)
        .enumerate()
        .map(|(i, (&a, &b))| ((f64::from(a) - b).abs(), i))
        .fold((0.0, 0), |m, d| if d.0 > m.0 { d } else { m })
}

/// Every tiny random decoder (GPT-2 and Llama tied and untied, Qwen2, the GGUF copy):
/// the same token ids, and probabilities within 1e-4 through both of kn's forward passes.
#[test]
fn random_decoders_equal_transformers() {
    let golden: RandomGolden = golden("decoder_random_models.json");
    assert!(golden.models.len() >= 6, "golden file lists every model");
    for (name, model) in &golden.models {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(&model.path);
        let lm = load(&dir);
        let class = lm.config.to_json()["architectures"][0]
            .as_str()
            .unwrap()
            .to_string();
        assert!(model.architecture.starts_with(&class), "{name}: {class}");
        let engine = Engine::<f32>::from_model(lm.model.clone()).unwrap();
        for prompt in &model.prompts {
            let cloze = format!("{} [MASK]", prompt.text);
            let encoded = lm.tokenizer.encode_prompt(&cloze).unwrap();
            assert_eq!(
                encoded.ids, prompt.ids,
                "{name}: token ids of {:?}",
                prompt.text
            );
            let dist = mask_distribution(&lm, &cloze, &()).unwrap();
            let (diff, at) = max_diff(&dist.probabilities, &prompt.probabilities);
            assert!(
                diff < PROB_TOL,
                "{name} {:?}: |Δp| {diff} at id {at}",
                prompt.text
            );
            let pass = engine.prepare(&encoded.ids, encoded.mask_position).unwrap();
            let (diff, at) = max_diff(pass.probabilities(), &prompt.probabilities);
            assert!(
                diff < PROB_TOL,
                "{name} {:?} (engine): |Δp| {diff} at id {at}",
                prompt.text
            );
        }
    }
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
/// answer id as transformers, and the answer's and the top-20 probabilities within 1e-4.
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
            assert!(
                (got - p.answer_probability).abs() < PROB_TOL,
                "{source} {:?}: P({}) {got} vs {}",
                p.prompt,
                p.answer,
                p.answer_probability
            );
            for (id, token, want) in &p.top {
                let got = f64::from(probabilities[*id as usize]);
                assert!(
                    (got - want).abs() < PROB_TOL,
                    "{source} {:?}: P({token}) {got} vs {want}",
                    p.prompt
                );
            }
        }
    }
}
