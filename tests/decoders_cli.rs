//! `kn` on decoder LMs through the command line: predict, attribute, probe and edit on
//! the tiny random GPT-2, Llama and Qwen2 checkpoints and the GGUF file; edits change
//! exactly the value slots asked for (GPT-2's Conv1D rows in the file), by the update
//! rule, reload as edited and revert exactly; causal prompt rules and bad input are
//! clear errors.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use kn::model::load::read_tensors;
use kn::model::{LoadedModel, ModelFiles, ModelSource, Neuron};
use kn::predict::mask_distribution;
use serde_json::json;

use common::{json_lines, kn, tiny_decoder};

/// The tiny decoders, as `--model` takes them.
const MODELS: [&str; 7] = [
    "gpt2-tied",
    "gpt2-untied",
    "llama-tied",
    "llama-untied",
    "qwen2-untied",
    "llama-tied.gguf",
    // Llama 3.2's rope_scaling (llama3), kept through an edit.
    "llama3-scaled",
];

const PROMPTS: [&str; 3] = [
    "Paris is the [MASK].",
    "Rome is a [MASK].",
    "Berlin was the [MASK].",
];

fn load(path: &Path) -> LoadedModel {
    let source = ModelSource::parse(&path.to_string_lossy(), None).unwrap();
    LoadedModel::load(
        ModelFiles::locate(&source).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// A `kn attribute` record of fact "a" (answer " capital") with these refined neurons.
fn neurons_record(refined: &[(usize, usize)]) -> String {
    json!({
        "id": "a", "relation": "R1", "answer": "capital", "answer_id": 319,
        "refined": refined.iter().map(|&(layer, index)| json!({
            "layer": layer, "index": index, "prompts": 3, "share": 1.0, "mean_relative_score": 1.0
        })).collect::<Vec<_>>(),
        "prompts": PROMPTS.iter().map(|p| json!({
            "prompt": p, "mask_position": 3, "gold_probability": 0.1, "max_score": 1.0,
            "coarse": [], "kept": []
        })).collect::<Vec<_>>(),
        "model": {"source": "tiny", "weights_sha256": "0"},
        "params": {"method": "integrated-gradients", "steps": 20, "rule": "left", "threshold": 0.2,
                   "share": 0.7, "min_prompts": 3, "keep": 0.1},
        "kn_version": "0"
    })
    .to_string()
        + "\n"
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn slot(lm: &LoadedModel, neuron: Neuron) -> Vec<f32> {
    kn::edit::value_slot(&lm.model, neuron).unwrap()
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Update through the CLI on every decoder: the two chosen slots move by the paper's
/// rule with E the input embeddings, nothing else in the FFN output projections moves,
/// the written model reloads as the in-memory edit predicts, and revert restores the
/// source exactly (a GGUF source: its Hugging Face conversion).
#[test]
fn update_edits_exactly_the_value_slots_and_reverts() {
    let tmp = tempfile::tempdir().unwrap();
    let chosen = [(1, 5), (2, 7)];
    let neurons = write(tmp.path(), "kn.jsonl", &neurons_record(&chosen));
    let update = write(
        tmp.path(),
        "update.jsonl",
        "{\"id\":\"a\",\"new_answer\":\"the\"}\n",
    );
    for name in MODELS {
        let model = tiny_decoder(name);
        let out = tmp.path().join(format!("{name}-edited"));
        let output = kn()
            .args(["edit", "--model"])
            .arg(&model)
            .arg("--neurons")
            .arg(&neurons)
            .arg("--update")
            .arg(&update)
            .args(["--min-correct", "0", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains("1 fact(s) edited, 0 skipped, 2 value slot(s) changed"),
            "{name}: {stderr}"
        );

        let source = load(&model);
        let edited = load(&out);
        assert_eq!(edited.architecture(), source.architecture(), "{name}");
        assert_eq!(
            edited.config.rope_scaling, source.config.rope_scaling,
            "{name}: rope_scaling kept"
        );
        let e = source.model.input_embeddings();
        let row = |id: u32| -> Vec<f32> { e.i(id as usize).unwrap().to_vec1().unwrap() };
        let (old_id, new_id) = (
            source.tokenizer.answer_id("capital").unwrap(),
            source.tokenizer.answer_id("the").unwrap(),
        );
        let (e_old, e_new) = (row(old_id), row(new_id));
        for layer in 0..source.config.num_hidden_layers {
            for index in 0..source.config.intermediate_size {
                let neuron = Neuron { layer, index };
                let (before, after) = (slot(&source, neuron), slot(&edited, neuron));
                if chosen.contains(&(layer, index)) {
                    // v ← v − λ1·E_t + λ2·E_t′, λ1 = ‖v‖/‖E_t‖, λ2 = 8‖v‖/‖E_t′‖.
                    let (l1, l2) = (
                        norm(&before) / norm(&e_old),
                        8.0 * norm(&before) / norm(&e_new),
                    );
                    for h in 0..before.len() {
                        let want = f64::from(before[h]) - l1 * f64::from(e_old[h])
                            + l2 * f64::from(e_new[h]);
                        let got = f64::from(after[h]);
                        assert!(
                            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{name} {layer}:{index}[{h}]: {got} vs {want}"
                        );
                    }
                } else {
                    assert_eq!(
                        before, after,
                        "{name}: slot {layer}:{index} must not change"
                    );
                }
            }
        }
        // The file stores GPT-2's slots as rows of the Conv1D weight, the others' as columns.
        let tensors: std::collections::HashMap<String, Tensor> =
            read_tensors(&edited.files.weights)
                .unwrap()
                .into_iter()
                .collect();
        let (file_name, as_row) = match edited.architecture().name() {
            "gpt2" => ("transformer.h.2.mlp.c_proj.weight", true),
            _ => ("model.layers.2.mlp.down_proj.weight", false),
        };
        let weight = &tensors[file_name];
        let in_file: Vec<f32> = if as_row {
            weight.i(7).unwrap().to_vec1().unwrap()
        } else {
            weight.i((.., 7)).unwrap().to_vec1().unwrap()
        };
        assert_eq!(
            in_file,
            slot(&edited, Neuron { layer: 2, index: 7 }),
            "{name}"
        );

        // The reloaded model predicts what it should: the edited model's probabilities
        // differ from the source's, and are its own on reload.
        let before = mask_distribution(&source, PROMPTS[0], &())
            .unwrap()
            .probabilities;
        let after = mask_distribution(&edited, PROMPTS[0], &())
            .unwrap()
            .probabilities;
        assert_ne!(before, after, "{name}: the edit changes predictions");

        let restored = tmp.path().join(format!("{name}-restored"));
        kn().args(["edit", "--revert"])
            .arg(&out)
            .arg("--out")
            .arg(&restored)
            .assert()
            .success();
        let back = load(&restored);
        let again = mask_distribution(&back, PROMPTS[0], &())
            .unwrap()
            .probabilities;
        assert_eq!(
            again, before,
            "{name}: revert restores the source's predictions exactly"
        );
        if !name.ends_with(".gguf") {
            assert_eq!(
                std::fs::read(restored.join("model.safetensors")).unwrap(),
                std::fs::read(model.join("model.safetensors")).unwrap(),
                "{name}: revert is byte-identical"
            );
        }
    }
}

/// predict, attribute and probe on every decoder, each held to another: the attribution
/// engine's gold probability is the forward's that predict prints; its completeness
/// targets `P(1) − P(0)` per layer are what probe measures with that whole layer
/// suppressed; probe's `before` is predict's probability and its neurons the refined
/// set attribute wrote.
#[test]
fn predict_attribute_and_probe_run_on_every_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let facts = write(
        tmp.path(),
        "facts.jsonl",
        &(json!({"id": "a", "relation": "R1", "answer": "capital", "prompts": PROMPTS})
            .to_string()
            + "\n"),
    );
    let close = |a: f64, b: f64, rel: f64| (a - b).abs() <= rel * b.abs().max(1e-6);
    for name in MODELS {
        let model = tiny_decoder(name);
        let lm = load(&model);
        let (layers, width) = (lm.config.num_hidden_layers, lm.config.intermediate_size);
        let output = kn()
            .args(["predict", "-q", "--top-k", "3", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&facts)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines = json_lines(&output.stdout);
        assert_eq!(lines.len(), 3, "{name}");
        // The answer is read after the last prompt token (with the BOS that the Llama
        // tokenizer adds, and GPT-2's and Qwen2's do not).
        let (ids, _) = lm.tokenizer.encode_text("Paris is the").unwrap();
        let bos = u32::from(!name.starts_with("gpt2") && !name.starts_with("qwen2"));
        assert_eq!(ids[0] == 1, bos == 1, "{name}: BOS");
        assert_eq!(lines[0]["mask_position"], ids.len() - 1, "{name}");
        assert_eq!(lines[0]["answer_id"], 319, "{name}");
        let predicted: Vec<f64> = lines
            .iter()
            .map(|l| l["answer_probability"].as_f64().unwrap())
            .collect();

        let neurons = tmp.path().join(format!("{name}.jsonl"));
        // Loose settings, so that every decoder has refined neurons to probe (10 to 19).
        let output = kn()
            .args(["attribute", "-q", "--threshold", "0.05", "--share", "0.5"])
            .args(["--min-prompts", "2", "--model"])
            .arg(&model)
            .arg("--fact")
            .arg(&facts)
            .arg("--out")
            .arg(&neurons)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let record = &json_lines(&std::fs::read(&neurons).unwrap())[0];
        let arch = if name.starts_with("gpt2") {
            "gpt2"
        } else {
            "llama"
        };
        assert_eq!(record["model"]["architecture"], arch, "{name}");
        assert_eq!(record["prompts"][0]["dropped"], ".", "{name}");
        let prompts = record["prompts"].as_array().unwrap();
        assert_eq!(prompts.len(), 3, "{name}");
        // targets[prompt][layer] = P(1) − P(0) of the attribution's normal pass.
        let mut targets = Vec::new();
        for (p, &want) in prompts.iter().zip(&predicted) {
            let gold = p["gold_probability"].as_f64().unwrap();
            assert!(
                close(gold, want, 1e-5),
                "{name}: P(gold) {gold} vs predict's {want}"
            );
            let completeness = p["completeness"].as_array().unwrap();
            assert_eq!(completeness.len(), layers, "{name}");
            let get = |c: &serde_json::Value, k: &str| c[k].as_f64().unwrap();
            let worst = completeness
                .iter()
                .map(|c| (get(c, "sum") - get(c, "target")).abs() / get(c, "target").abs())
                .fold(0f64, f64::max);
            let error = p["completeness_error"].as_f64().unwrap();
            assert!(
                close(error, worst, 1e-9),
                "{name}: completeness error {error} vs {worst}"
            );
            targets.push(
                completeness
                    .iter()
                    .map(|c| get(c, "target"))
                    .collect::<Vec<_>>(),
            );
        }

        let output = kn()
            .args(["probe", "-q", "--suppress", "--model"])
            .arg(&model)
            .arg("--neurons")
            .arg(&neurons)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let probes = json_lines(&output.stdout);
        assert_eq!(probes.len(), 1, "{name}");
        let pairs = |v: &serde_json::Value| -> Vec<(u64, u64)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|n| (n["layer"].as_u64().unwrap(), n["index"].as_u64().unwrap()))
                .collect()
        };
        assert!(
            !pairs(&record["refined"]).is_empty(),
            "{name}: refined neurons"
        );
        assert_eq!(
            pairs(&probes[0]["neurons"]),
            pairs(&record["refined"]),
            "{name}: probed neurons"
        );
        let probed = probes[0]["prompts"].as_array().unwrap();
        assert_eq!(probed.len(), 3, "{name}");
        for (p, &want) in probed.iter().zip(&predicted) {
            let before = p["before"].as_f64().unwrap();
            assert!(
                close(before, want, 1e-6),
                "{name}: before {before} vs {want}"
            );
            let after = p["after"].as_f64().unwrap();
            assert!(
                !close(after, before, 1e-3),
                "{name}: suppressing changed nothing"
            );
        }

        // One fact per layer whose "refined" set is the whole layer: suppressed, it is
        // the attribution's baseline α = 0 at that layer.
        let whole: String = (0..layers)
            .map(|layer| {
                let all: Vec<(usize, usize)> = (0..width).map(|i| (layer, i)).collect();
                let mut v: serde_json::Value =
                    serde_json::from_str(neurons_record(&all).trim()).unwrap();
                v["id"] = json!(format!("layer{layer}"));
                // Another relation each: the control is another layer's (no neuron of a
                // whole layer is left for a random control).
                v["relation"] = json!(format!("layer{layer}"));
                v.to_string() + "\n"
            })
            .collect();
        let whole = write(tmp.path(), &format!("{name}.layers.jsonl"), &whole);
        let output = kn()
            .args([
                "probe",
                "-q",
                "--suppress",
                "--control",
                "other-relation",
                "--model",
            ])
            .arg(&model)
            .arg("--neurons")
            .arg(&whole)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let probes = json_lines(&output.stdout);
        assert_eq!(probes.len(), layers, "{name}");
        for (layer, probe) in probes.iter().enumerate() {
            let probed = probe["prompts"].as_array().unwrap();
            assert_eq!(probed.len(), 3, "{name}");
            for (prompt, p) in probed.iter().enumerate() {
                let drop = p["before"].as_f64().unwrap() - p["after"].as_f64().unwrap();
                let target = targets[prompt][layer];
                assert!(
                    (drop - target).abs() <= 1e-6 + 1e-4 * target.abs(),
                    "{name} layer {layer} prompt {prompt}: probe P(1) − P(0) {drop} vs \
                     the attribution's target {target}"
                );
            }
        }
    }
}

/// Causal prompt rules and bad decoder input: one clear line each, the other facts go on.
#[test]
fn causal_prompt_rules_and_bad_input_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let facts = write(
        tmp.path(),
        "facts.jsonl",
        &[
            json!({"id": "mid", "answer": "capital", "prompts": ["Paris is the [MASK] of France"]}),
            json!({"id": "pieces", "answer": "Paris", "prompts": ["It is [MASK]."]}),
            json!({"id": "ok", "answer": "capital", "prompts": PROMPTS}),
        ]
        .iter()
        .map(|v| v.to_string() + "\n")
        .collect::<String>(),
    );
    let output = kn()
        .args(["attribute", "-q", "--model"])
        .arg(tiny_decoder("llama-tied"))
        .arg("--fact")
        .arg(&facts)
        .arg("--out")
        .arg(tmp.path().join("out.jsonl"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("facts.jsonl:1: prompt 1: [MASK] must end the prompt"),
        "{stderr}"
    );
    assert!(stderr.contains("\" of France\" follows it"), "{stderr}");
    // The answer's pieces, decoded: " P", "ar", "is".
    assert!(
        stderr.contains("facts.jsonl:2: answer \"Paris\" is not a single token"),
        "{stderr}"
    );
    assert!(stderr.contains("[\" P\", \"ar\", \"is\"]"), "{stderr}");
    let written = std::fs::read_to_string(tmp.path().join("out.jsonl")).unwrap();
    assert_eq!(written.lines().count(), 1, "the good fact is written");

    // An unsupported architecture is named; a truncated GGUF file is an error, not a panic.
    let falcon = tmp.path().join("falcon");
    common::copy_dir(&tiny_decoder("llama-tied"), &falcon);
    let config = std::fs::read_to_string(falcon.join("config.json")).unwrap();
    std::fs::write(
        falcon.join("config.json"),
        config.replace("\"llama\"", "\"falcon\""),
    )
    .unwrap();
    kn().args(["predict", "--model"])
        .arg(&falcon)
        .write_stdin("{\"prompt\": \"a [MASK]\"}\n")
        .assert()
        .code(1)
        .stderr(predicates::str::contains(
            "model_type \"falcon\" is not supported",
        ));
    let gguf = std::fs::read(tiny_decoder("llama-tied.gguf")).unwrap();
    let truncated = tmp.path().join("cut.gguf");
    std::fs::write(&truncated, &gguf[..gguf.len() / 2]).unwrap();
    kn().args(["predict", "--model"])
        .arg(&truncated)
        .write_stdin("{\"prompt\": \"a [MASK]\"}\n")
        .assert()
        .code(1)
        .stderr(predicates::str::contains("cut.gguf"));
}

/// `kn predict` in padded batches across lines (prompts of different lengths, a bad
/// prompt among them) writes the same lines in the same order as one prompt at a time,
/// with the same numbers to rounding, on a BERT and on decoders.
#[test]
fn batched_predict_equals_one_prompt_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = common::tiny_model(
        &tmp.path().join("bert"),
        kn::model::random::Layout::default(),
    );
    let cases = [
        (
            bert,
            "the capital of france is [MASK] .\", \"[MASK] is the city of france .",
            "paris",
        ),
        (
            tiny_decoder("llama-tied"),
            "Paris is the [MASK].\", \"Rome is [MASK]",
            "capital",
        ),
        (
            tiny_decoder("gpt2-untied"),
            "Paris is the [MASK].\", \"Rome is [MASK]",
            "capital",
        ),
    ];
    for (model, prompts, answer) in cases {
        let input = format!(
            "{{\"id\": 1, \"prompts\": [\"{prompts}\"], \"answer\": \"{answer}\"}}\n\
             {{\"prompt\": \"no mask here\"}}\n\
             {{\"id\": 3, \"prompt\": \"{}\"}}\n\
             {{\"id\": 4, \"prompts\": [\"{prompts}\"]}}\n",
            prompts.split('"').next().unwrap()
        );
        let run = |batch: &str| {
            let output = kn()
                .args(["predict", "-q", "--top-k", "5", "--batch", batch, "--model"])
                .arg(&model)
                .write_stdin(input.clone())
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(1), "the bad line fails the run");
            assert!(String::from_utf8_lossy(&output.stderr).contains("<stdin>:2:"));
            json_lines(&output.stdout)
        };
        let (one, batched) = (run("1"), run("4"));
        assert_eq!(one.len(), 5);
        assert_eq!(one.len(), batched.len());
        for (a, b) in one.iter().zip(&batched) {
            for field in [
                "line",
                "id",
                "prompt_index",
                "prompt",
                "mask_position",
                "answer_rank",
            ] {
                assert_eq!(a[field], b[field], "{field}");
            }
            for (p, q) in a["predictions"]
                .as_array()
                .unwrap()
                .iter()
                .zip(b["predictions"].as_array().unwrap())
            {
                assert_eq!(p["id"], q["id"]);
                let (x, y) = (
                    p["probability"].as_f64().unwrap(),
                    q["probability"].as_f64().unwrap(),
                );
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
        }
    }
}
