//! The tensor engine (what `--device cuda` runs), on the CPU device, against the flat
//! engine: whole `kn attribute` records on the AntiBERTy golden fact and on tiny random
//! models of every architecture: in f32, identical coarse and refined sets and the top
//! neurons' scores within 1e-5 of the prompt's max; in f64, every score of every layer
//! equal to 1e-10 of the max plus the one f32 rounding scores are returned in (the f64
//! gradients themselves agree to 1e-10: the `attribution::tensor` unit tests).

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device};
use kn::attribution::record::{FactRecord, Method, Precision};
use kn::attribution::{AttributeOptions, Attributor, EngineChoice, Fact};
use kn::model::random::Layout;
use kn::model::{LoadedModel, ModelFiles, ModelSource};

/// The paper's share p and least prompts of a refined neuron.
const PAPER: (f64, usize) = (0.7, 3);

/// Records keep scores in f32: two f64 scores 1e-13 apart may round one ulp apart.
const F32_ROUNDING: f64 = 2.0 * f32::EPSILON as f64;

fn load(path: &Path) -> LoadedModel {
    let source = ModelSource::parse(&path.to_string_lossy(), None).unwrap();
    LoadedModel::load(
        ModelFiles::locate(&source).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The paper's settings but for the refined set's `(share, min_prompts)`.
fn attributor(
    lm: &LoadedModel,
    engine: EngineChoice,
    precision: Precision,
    (share, min_prompts): (f64, usize),
) -> Attributor {
    let mut options = AttributeOptions::paper(Method::IntegratedGradients);
    options.engine = engine;
    options.precision = precision;
    (options.share, options.min_prompts) = (share, min_prompts);
    // Every positive score stored, so the top neurons can be compared.
    options.keep = 0.0;
    let attributor = Attributor::new(lm.clone(), options).unwrap();
    let want = match engine {
        EngineChoice::Tensor => "tensor",
        _ => "flat",
    };
    assert_eq!(attributor.engine_name(), want);
    attributor
}

fn coarse(record: &FactRecord) -> Vec<BTreeSet<(usize, usize)>> {
    record
        .prompts
        .iter()
        .map(|p| p.coarse.iter().map(|s| (s.layer, s.index)).collect())
        .collect()
}

fn refined(record: &FactRecord) -> BTreeSet<(usize, usize)> {
    record.refined.iter().map(|r| (r.layer, r.index)).collect()
}

/// f32 records of both engines: the same coarse sets on every prompt and the same
/// refined set; the top-50 stored scores, and the completeness sums, within `of_max` of
/// the prompt's largest score. (Per neuron, f32 itself is only about that good: against
/// the f64 engines, the flat f32 engine's top-50 scores are off by up to 4e-5 of
/// themselves on the tiny decoders, the tensor engine's by up to 2e-5.)
/// `shared`: the refined set's share p and least prompts, such that it is not empty.
fn compare_records(name: &str, lm: &LoadedModel, fact: &Fact, of_max: f64, shared: (f64, usize)) {
    let flat = attributor(lm, EngineChoice::Flat, Precision::F32, shared);
    let tensor = attributor(lm, EngineChoice::Tensor, Precision::F32, shared);
    let (a, b) = (
        flat.attribute(fact).unwrap(),
        tensor.attribute(fact).unwrap(),
    );
    assert_eq!(coarse(&b), coarse(&a), "{name}: coarse sets");
    assert_eq!(refined(&b), refined(&a), "{name}: refined set");
    assert!(
        !refined(&a).is_empty(),
        "{name}: an empty refined set compares nothing"
    );
    assert_eq!(a.prompts.len(), fact.prompts.len(), "{name}: flat prompts");
    assert_eq!(
        b.prompts.len(),
        fact.prompts.len(),
        "{name}: tensor prompts"
    );
    for (p, q) in b.prompts.iter().zip(&a.prompts) {
        let max = f64::from(q.max_score);
        assert!(max > 0.0, "{name}: no positive score");
        assert!((p.gold_probability - q.gold_probability).abs() <= 1e-6);
        let stored = |r: &kn::attribution::record::PromptRecord| -> Vec<(usize, usize, f64)> {
            r.coarse
                .iter()
                .chain(&r.kept)
                .map(|s| (s.layer, s.index, f64::from(s.score)))
                .collect()
        };
        let ours: std::collections::HashMap<_, _> =
            stored(p).into_iter().map(|(l, i, s)| ((l, i), s)).collect();
        let theirs = stored(q);
        assert!(theirs.len() >= 10.min(fact.prompts.len()));
        for &(l, i, s) in theirs.iter().take(50) {
            let t = ours.get(&(l, i)).copied().unwrap_or(0.0);
            assert!(
                (t - s).abs() <= of_max * max,
                "{name} {l}:{i}: tensor {t} vs flat {s} (max {max})"
            );
        }
        assert_eq!(p.completeness.len(), lm.config.num_hidden_layers, "{name}");
        assert_eq!(q.completeness.len(), lm.config.num_hidden_layers, "{name}");
        for (c, d) in p.completeness.iter().zip(&q.completeness) {
            assert!(
                (c.sum - d.sum).abs() <= of_max * max.max(d.sum.abs()),
                "{name} completeness layer {}: {} vs {}",
                c.layer,
                c.sum,
                d.sum
            );
        }
    }
}

/// f64 scores of every neuron of every layer, both engines, on `prompts`: equal to the
/// f32 the scores are returned in (1e-10 of the max, plus one f32 rounding).
fn compare_f64_scores(name: &str, lm: &LoadedModel, fact: &Fact, prompts: usize) {
    let flat = attributor(lm, EngineChoice::Flat, Precision::F64, PAPER);
    let tensor = attributor(lm, EngineChoice::Tensor, Precision::F64, PAPER);
    for prompt in fact.prompts.iter().take(prompts) {
        let t = tensor.scores(prompt, &fact.answer).unwrap();
        let f = flat.scores(prompt, &fact.answer).unwrap();
        assert!((t.gold_probability - f.gold_probability).abs() <= 1e-12);
        let max = f
            .scores
            .iter()
            .flatten()
            .fold(0f64, |m, &s| m.max(f64::from(s)));
        assert!(max > 0.0, "{name}: no positive score");
        let layers = lm.config.num_hidden_layers;
        assert_eq!((t.scores.len(), f.scores.len()), (layers, layers), "{name}");
        for (layer, (x, y)) in t.scores.iter().zip(&f.scores).enumerate() {
            assert_eq!(x.len(), lm.config.intermediate_size, "{name} layer {layer}");
            assert_eq!(y.len(), lm.config.intermediate_size, "{name} layer {layer}");
            for (i, (&x, &y)) in x.iter().zip(y).enumerate() {
                let tolerance = 1e-10 * max + F32_ROUNDING * f64::from(y.abs());
                assert!(
                    (f64::from(x) - f64::from(y)).abs() <= tolerance,
                    "{name} f64 {layer}:{i}: tensor {x} vs flat {y}"
                );
            }
        }
        assert_eq!(
            (t.completeness.len(), f.completeness.len()),
            (layers, layers),
            "{name}"
        );
        for (c, d) in t.completeness.iter().zip(&f.completeness) {
            assert!((c.sum - d.sum).abs() <= 1e-10 * max.max(d.sum.abs()));
            assert!((c.target - d.target).abs() <= 1e-12);
        }
    }
}

/// The AntiBERTy golden fact (tests/golden/antiberty_attribute.json, "cys22": a
/// conserved cysteine in 5 real antibodies).
#[test]
fn antiberty_golden_fact() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/antiberty_attribute.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let g = golden["facts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "cys22")
        .unwrap();
    let fact = Fact {
        id: "cys22".into(),
        relation: None,
        answer: g["answer"].as_str().unwrap().to_string(),
        prompts: g["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["prompt"].as_str().unwrap().to_string())
            .collect(),
    };
    let lm = load(&common::antiberty());
    // 8 layers of f32 over 122-token prompts, P(gold) ≈ 0.99 (small gradients): the two
    // engines' f32 roundings differ by up to 2e-5 of the max here (measured 1.95e-5 on the
    // max itself), each engine within 5e-5 of the float64 PyTorch reference
    // (attribute_golden.rs, scripts/gpu-check).
    compare_records("antiberty", &lm, &fact, 5e-5, PAPER);
    // f64 on the CPU is slow at AntiBERTy's 120-token prompts: one prompt.
    compare_f64_scores("antiberty", &lm, &fact, 1);
}

/// A tiny random BERT and every committed tiny random decoder (GPT-2 and Llama tied and
/// untied, Qwen2, the GGUF copy).
#[test]
fn tiny_models_of_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let bert = common::tiny_model(dir.path(), Layout::default());
    let bert_fact = Fact {
        id: "bert".into(),
        relation: None,
        answer: "paris".into(),
        prompts: vec![
            "the capital of france is [MASK] .".into(),
            "[MASK] is the capital of france .".into(),
            "the city of france is [MASK] .".into(),
        ],
    };
    let decoder_fact = Fact {
        id: "decoder".into(),
        relation: None,
        answer: "capital".into(),
        prompts: vec![
            "Paris is the [MASK].".into(),
            "Rome is a [MASK].".into(),
            "Berlin was the [MASK].".into(),
        ],
    };
    let mut cases = vec![("bert".to_string(), bert, bert_fact)];
    for name in [
        "gpt2-tied",
        "gpt2-untied",
        "llama-tied",
        "llama-untied",
        "qwen2-untied",
        "llama-tied.gguf",
        // Rotary scaling: Llama 3.2's llama3 factors, yarn (attention factor on cos, sin).
        "llama3-scaled",
        "llama-yarn",
    ] {
        cases.push((
            name.to_string(),
            common::tiny_decoder(name),
            decoder_fact.clone(),
        ));
    }
    for (name, path, fact) in cases {
        let lm = load(&path);
        // Three prompts of random models share few neurons: p = 0.5 and 2 prompts give
        // the decoders 2 to 5 refined neurons (the paper's p = 0.7 and 3, none on some).
        compare_records(&name, &lm, &fact, 1e-5, (0.5, 2));
        compare_f64_scores(&name, &lm, &fact, fact.prompts.len());
    }
}

/// `kn attribute --engine tensor` (with a tiny --gpu-memory: batches of one point) gives
/// the flat engine's refined neurons; `--gpu-memory` or bf16/f16 with the flat engine
/// and an unknown engine are refused.
#[test]
fn engine_flags_on_the_command_line() {
    let model = common::tiny_decoder("llama-untied");
    let fact = r#"{"id": "a", "answer": "capital", "prompts": ["Paris is the [MASK].", "Rome is a [MASK].", "Berlin was the [MASK]."]}"#;
    let run = |args: &[&str]| {
        let out = common::kn()
            .args(["attribute", "--model"])
            .arg(&model)
            .args(["--fact", "-"])
            // Refined neurons to compare (none at the paper's p = 0.7 and 3 prompts).
            .args(["--share", "0.5", "--min-prompts", "2"])
            .args(args)
            .write_stdin(format!("{fact}\n"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), common::json_lines(&out.stdout), stderr)
    };
    let (code, flat, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("kn: flat engine, f32"), "{stderr}");
    let (code, tensor, stderr) = run(&["--engine", "tensor", "--gpu-memory", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("kn: tensor engine, f32"), "{stderr}");
    let refined = |r: &serde_json::Value| -> Vec<(u64, u64, f64)> {
        r["refined"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let int = |k: &str| n[k].as_u64().unwrap();
                (
                    int("layer"),
                    int("index"),
                    n["mean_relative_score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (f, t) = (refined(&flat[0]), refined(&tensor[0]));
    assert!(!f.is_empty(), "an empty refined set compares nothing");
    assert_eq!(f.len(), t.len(), "{f:?} vs {t:?}");
    for (a, b) in f.iter().zip(&t) {
        // The same neurons; their relative scores to f32 rounding.
        assert_eq!((a.0, a.1), (b.0, b.1));
        assert!((a.2 - b.2).abs() <= 1e-5, "{a:?} vs {b:?}");
    }
    assert_eq!(tensor[0]["params"], flat[0]["params"]);
    let (code, _, stderr) = run(&["--engine", "flat", "--gpu-memory", "100"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("--gpu-memory sizes the tensor engine's batches"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["--engine", "gpu"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unknown engine \"gpu\""), "{stderr}");
    // 16-bit products: the tensor engine only, recorded in the parameters.
    let (code, half, stderr) = run(&["--engine", "tensor", "--precision", "bf16"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("kn: tensor engine, bf16"), "{stderr}");
    assert_eq!(half[0]["params"]["precision"], "bf16");
    let (code, _, stderr) = run(&["--precision", "f16"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("--precision f16 runs on the tensor engine"),
        "{stderr}"
    );
}
