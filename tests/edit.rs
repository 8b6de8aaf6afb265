//! `kn probe` and `kn edit` on tiny random models: the neuron patch touches exactly the
//! chosen neurons, the update rule changes exactly the chosen columns by the formula,
//! written models reload as edited, revert is byte-identical, a crash leaves no
//! partial directory, and bad input is refused with nothing written.

use crate::common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use kn::attribution::NeuronsFile;
use kn::edit::save::{revert, storage_dtype, write_edited_model, SafetensorsLayout};
use kn::edit::{
    apply_slots, plan_erase, plan_update, EraseOptions, EraseValue, UpdateOptions, UpdateRequest,
    UpdateRule,
};
use kn::model::load::read_tensors;
use kn::model::random::Layout;
use kn::model::{FfnHook, LoadedModel, ModelFiles, ModelSource, Neuron, NeuronOp};
use kn::predict::{encode_prompts, mask_distributions};
use kn::probe::mask_patch;
use serde_json::json;

use common::{attribute_record as record, kn, tiny_model, TINY_PROMPTS as PROMPTS};

/// The BERT inside a loaded tiny model.
fn bert(model: &kn::model::LanguageModel) -> &kn::model::BertMaskedLm {
    match model {
        kn::model::LanguageModel::Bert(m) => m,
        _ => panic!("the tiny test models are BERTs"),
    }
}

fn load(dir: &Path) -> LoadedModel {
    let files = ModelFiles::in_directory(dir, ModelSource::Local(dir.to_path_buf()), None)
        .expect("model files");
    LoadedModel::load(files, DType::F32, &Device::Cpu).expect("load")
}

/// Four facts of two relations; neuron 1:5 is shared by both P1 facts (relation-level).
fn neurons_text() -> String {
    [
        record("a", "P1", "paris", &[(0, 3), (1, 5), (1, 20)]),
        record("b", "P1", "berlin", &[(1, 5), (0, 9)]),
        record("c", "P2", "rome", &[(1, 7), (1, 20)]),
        record("d", "P2", "italy", &[]),
    ]
    .join("\n")
        + "\n"
}

fn neurons_file() -> NeuronsFile {
    NeuronsFile::parse(Path::new("kn.jsonl"), neurons_text().as_bytes()).expect("neurons")
}

/// Records every layer's whole activation `[batch, seq, intermediate]` after `inner`.
struct CaptureAll<H> {
    inner: H,
    layers: RefCell<Vec<Vec<f32>>>,
}

impl<H: FfnHook> FfnHook for CaptureAll<H> {
    fn apply(&self, layer: usize, activation: Tensor) -> kn::Result<Tensor> {
        let activation = self.inner.apply(layer, activation)?;
        self.layers
            .borrow_mut()
            .push(activation.flatten_all()?.to_vec1::<f32>()?);
        Ok(activation)
    }
}

fn capture<H: FfnHook>(
    lm: &LoadedModel,
    prompts: &[kn::model::EncodedPrompt],
    hook: H,
) -> Vec<Vec<f32>> {
    let capture = CaptureAll {
        inner: hook,
        layers: RefCell::new(Vec::new()),
    };
    mask_distributions(lm, prompts, &capture).expect("forward");
    capture.layers.into_inner()
}

#[test]
fn probe_patch_changes_only_the_chosen_neurons_at_the_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = load(&tiny_model(&tmp.path().join("m"), Layout::default()));
    // Prompts of different lengths: the batch is padded.
    let prompts = encode_prompts(&lm, &[PROMPTS[0].to_string(), PROMPTS[1].to_string()]).unwrap();
    let seq = prompts.iter().map(|p| p.ids.len()).max().unwrap();
    let width = lm.config.intermediate_size;
    let chosen = [
        Neuron { layer: 1, index: 4 },
        Neuron {
            layer: 1,
            index: 30,
        },
    ];
    let plain = capture(&lm, &prompts, ());
    for (op, expect) in [
        (
            NeuronOp::Scale(0.0),
            Box::new(|_: f32| 0.0f32) as Box<dyn Fn(f32) -> f32>,
        ),
        (NeuronOp::Scale(2.0), Box::new(|x: f32| 2.0 * x)),
    ] {
        let patched = capture(&lm, &prompts, mask_patch(&prompts, &chosen, op));
        // Layer 0 is below every chosen neuron: bit-identical.
        assert_eq!(plain[0], patched[0]);
        let mut changed = 0;
        for (b, prompt) in prompts.iter().enumerate() {
            for pos in 0..seq {
                for i in 0..width {
                    let at = (b * seq + pos) * width + i;
                    let is_chosen =
                        pos == prompt.mask_position && chosen.iter().any(|n| n.index == i);
                    if is_chosen {
                        assert_eq!(patched[1][at], expect(plain[1][at]), "{b} {pos} {i}");
                        changed += usize::from(plain[1][at] != 0.0);
                    } else {
                        assert_eq!(patched[1][at], plain[1][at], "untouched {b} {pos} {i}");
                    }
                }
            }
        }
        assert!(
            changed > 0,
            "the chosen activations were all zero: the test proves nothing"
        );
    }
}

#[test]
fn relation_level_neurons_are_left_out_of_updates() {
    let neurons = neurons_file();
    let fact = kn::attribution::neurons::KnownFact::from_record(neurons.get(&json!("a")).unwrap());
    // P1 has two facts: 1:5 is in both (share 1.0), 0:3 and 1:20 in one (0.5).
    let own = vec![
        Neuron { layer: 0, index: 3 },
        Neuron {
            layer: 1,
            index: 20,
        },
    ];
    let relation_level = vec![Neuron { layer: 1, index: 5 }];
    assert_eq!(
        kn::edit::update_neurons(&neurons, &fact, 0.6),
        (own.clone(), relation_level.clone())
    );
    // A neuron only this fact holds is its own, even where one fact is over 10%.
    assert_eq!(
        kn::edit::update_neurons(&neurons, &fact, 0.1),
        (own, relation_level)
    );
    let (chosen, shared) = kn::edit::update_neurons(&neurons, &fact, 1.0);
    assert_eq!((chosen.len(), shared.len()), (3, 0));
}

/// Column `index` of a `[rows, cols]` tensor.
fn column(t: &Tensor, index: usize) -> Vec<f32> {
    t.i((.., index)).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn update_changes_exactly_the_chosen_columns_by_the_formula() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), Layout::default());
    let lm = load(&dir);
    let neurons = neurons_file();
    let fact = kn::attribution::neurons::KnownFact::from_record(neurons.get(&json!("a")).unwrap());
    let requests = [UpdateRequest {
        fact,
        new_answer: "rome".into(),
    }];
    let options = UpdateOptions {
        rule: UpdateRule::PAPER,
        max_relation_share: 0.5,
        // A random model answers nothing: edit anyway.
        min_correct: 0.0,
        random_control: None,
    };
    let plan = plan_update(&lm, &neurons, &requests, &options, DType::F32).unwrap();
    assert_eq!(plan.facts.len(), 1);
    let chosen = [
        Neuron { layer: 0, index: 3 },
        Neuron {
            layer: 1,
            index: 20,
        },
    ];
    assert_eq!(plan.facts[0].neurons, chosen);
    let edited = apply_slots(&lm.model, &plan.slots).unwrap();

    // The formula, from the checkpoint's own tensors.
    let tensors: std::collections::HashMap<String, Tensor> = read_tensors(&lm.files.weights)
        .unwrap()
        .into_iter()
        .collect();
    let embeddings = &tensors["bert.embeddings.word_embeddings.weight"];
    let row = |id: u32| embeddings.i(id as usize).unwrap().to_vec1::<f32>().unwrap();
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let (e_old, e_new) = (
        row(lm.tokenizer.answer_id("paris").unwrap()),
        row(lm.tokenizer.answer_id("rome").unwrap()),
    );
    for layer in 0..lm.config.num_hidden_layers {
        let original = &tensors[&format!("bert.encoder.layer.{layer}.output.dense.weight")];
        let after = edited.value_slots(layer).unwrap();
        for index in 0..lm.config.intermediate_size {
            let (v, new) = (column(original, index), column(after, index));
            if chosen.contains(&Neuron { layer, index }) {
                let l1 = norm(&v) / norm(&e_old);
                let l2 = 8.0 * norm(&v) / norm(&e_new);
                for r in 0..v.len() {
                    let expected =
                        f64::from(v[r]) - l1 * f64::from(e_old[r]) + l2 * f64::from(e_new[r]);
                    assert!(
                        (f64::from(new[r]) - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                        "{layer}:{index} row {r}: {} vs {expected}",
                        new[r]
                    );
                }
                assert_ne!(v, new);
            } else {
                assert_eq!(v, new, "column {layer}:{index} must not change");
            }
        }
        // Nothing else in the layer moves.
        assert_eq!(
            bert(&edited).layers[layer]
                .intermediate
                .weight
                .to_vec2::<f32>()
                .unwrap(),
            bert(&lm.model).layers[layer]
                .intermediate
                .weight
                .to_vec2::<f32>()
                .unwrap()
        );
    }
}

#[test]
fn updates_skip_facts_the_model_does_not_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = load(&tiny_model(&tmp.path().join("m"), Layout::default()));
    let neurons = neurons_file();
    let fact = kn::attribution::neurons::KnownFact::from_record(neurons.get(&json!("a")).unwrap());
    let requests = [UpdateRequest {
        fact,
        new_answer: "rome".into(),
    }];
    let options = UpdateOptions {
        rule: UpdateRule::PAPER,
        max_relation_share: 0.5,
        min_correct: 1.0,
        random_control: None,
    };
    let encoded = encode_prompts(&lm, &PROMPTS.map(String::from)).unwrap();
    let paris = lm.tokenizer.answer_id("paris").unwrap();
    let correct = mask_distributions(&lm, &encoded, &())
        .unwrap()
        .iter()
        .filter(|d| d.top_k(1)[0].0 == paris)
        .count();
    let plan = plan_update(&lm, &neurons, &requests, &options, DType::F32).unwrap();
    if correct < PROMPTS.len() {
        assert!(plan.facts.is_empty() && plan.slots.is_empty());
        assert!(
            plan.skipped[0].reason.contains("top-1"),
            "{:?}",
            plan.skipped
        );
    } else {
        assert_eq!(plan.facts.len(), 1);
    }
}

#[test]
fn erase_sets_the_most_frequent_slots() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = load(&tiny_model(&tmp.path().join("m"), Layout::default()));
    let neurons = neurons_file();
    let plan = plan_erase(
        &lm,
        &neurons,
        &["P1".to_string()],
        &EraseOptions {
            top: 2,
            value: EraseValue::Zero,
        },
        DType::F32,
    )
    .unwrap();
    // P1's counts: 1:5 in 2 facts, then 0:3, 0:9, 1:20 in 1 each: the tie goes to (layer, index).
    let erased: Vec<Neuron> = plan.slots.iter().map(|s| s.neuron).collect();
    assert_eq!(
        erased,
        vec![Neuron { layer: 0, index: 3 }, Neuron { layer: 1, index: 5 }]
    );
    assert_eq!(plan.relations[0].neurons[0].facts, 2);
    let edited = apply_slots(&lm.model, &plan.slots).unwrap();
    assert!(column(edited.value_slots(1).unwrap(), 5)
        .iter()
        .all(|&x| x == 0.0));
    assert_ne!(column(edited.value_slots(1).unwrap(), 6), vec![0.0; 16]);
    let unk = plan_erase(
        &lm,
        &neurons,
        &["P1".to_string()],
        &EraseOptions {
            top: 1,
            value: EraseValue::Unk,
        },
        DType::F32,
    )
    .unwrap();
    let unk_row = lm
        .model
        .input_embeddings()
        .i(lm.tokenizer.unk_id().unwrap() as usize)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(unk.slots[0].new, unk_row);
    let missing = plan_erase(
        &lm,
        &neurons,
        &["P9".to_string()],
        &EraseOptions {
            top: 1,
            value: EraseValue::Zero,
        },
        DType::F32,
    );
    assert!(missing.unwrap_err().to_string().contains("P9"));
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn empty_edits(lm: &LoadedModel) -> kn::edit::record::EditsFile {
    kn::edit::record::EditsFile {
        kn_version: "test".into(),
        operation: kn::edit::record::Operation::Update,
        rule: Some(UpdateRule::PAPER),
        value: None,
        source: kn::edit::record::SourceRecord {
            model: kn::attribution::model_info(lm).unwrap(),
            weights_file: "model.safetensors".into(),
        },
        weights_file: String::new(),
        weights_sha256: String::new(),
        restored_sha256: String::new(),
        inputs: vec![],
        facts: vec![],
        relations: vec![],
        skipped: vec![],
        slots: vec![],
        previous_edits: None,
    }
}

#[test]
fn written_model_reloads_as_edited_and_reverts_byte_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tiny_model(&tmp.path().join("m"), Layout::default());
    let lm = load(&source);
    let neurons = neurons_file();
    let plan = plan_erase(
        &lm,
        &neurons,
        &["P1".to_string(), "P2".to_string()],
        &EraseOptions {
            top: 3,
            value: EraseValue::Unk,
        },
        storage_dtype(&lm.files, lm.architecture()).unwrap(),
    )
    .unwrap();
    // P1's top 3 (1:5, then 0:3 and 0:9 by order) and P2's only two.
    assert_eq!(plan.slots.len(), 5);
    let out = tmp.path().join("edited");
    write_edited_model(&lm, &out, &plan.slots, empty_edits(&lm), false).unwrap();

    // It reloads and predicts exactly as the in-memory edit.
    let in_memory = LoadedModel {
        model: apply_slots(&lm.model, &plan.slots).unwrap(),
        ..lm.clone()
    };
    let reloaded = load(&out);
    let prompts = encode_prompts(&lm, &PROMPTS.map(String::from)).unwrap();
    let a = mask_distributions(&in_memory, &prompts, &()).unwrap();
    let b = mask_distributions(&reloaded, &prompts, &()).unwrap();
    let c = mask_distributions(&lm, &prompts, &()).unwrap();
    for ((a, b), c) in a.iter().zip(&b).zip(&c) {
        assert_eq!(a.probabilities, b.probabilities);
        assert_ne!(a.probabilities, c.probabilities, "the edit changed nothing");
    }

    // Only the bytes of the edited columns differ from the source weights.
    let before = std::fs::read(source.join("model.safetensors")).unwrap();
    let after = std::fs::read(out.join("model.safetensors")).unwrap();
    assert_eq!(before.len(), after.len());
    let layout =
        SafetensorsLayout::read(&out.join("model.safetensors"), lm.architecture()).unwrap();
    let differing = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    assert!(
        differing > 0 && differing <= 5 * 16 * 4,
        "{differing} bytes differ"
    );
    for slot in &plan.slots {
        assert_eq!(layout.read_column(slot.neuron).unwrap(), slot.new);
    }
    // Every other file is a byte-identical copy; edits.json is added.
    let edited_files = files_of(&out);
    let names: Vec<&str> = edited_files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "edits.json",
            "model.safetensors",
            "vocab.txt"
        ]
    );
    assert_eq!(
        edited_files[0].1,
        std::fs::read(source.join("config.json")).unwrap()
    );

    // Revert restores the source directory exactly.
    let restored = tmp.path().join("restored");
    revert(&out, &restored, false).unwrap();
    assert_eq!(files_of(&restored), files_of(&source));

    // An existing output is refused without force, replaced with it.
    let err = write_edited_model(&lm, &out, &plan.slots, empty_edits(&lm), false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    write_edited_model(&lm, &out, &plan.slots, empty_edits(&lm), true).unwrap();
    assert_eq!(files_of(&out).len(), 4);
}

#[test]
fn edits_of_edited_models_revert_one_step() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tiny_model(&tmp.path().join("m"), Layout::default());
    let lm = load(&source);
    let neurons = neurons_file();
    let erase = |lm: &LoadedModel, relation: &str| {
        plan_erase(
            lm,
            &neurons,
            &[relation.to_string()],
            &EraseOptions {
                top: 2,
                value: EraseValue::Zero,
            },
            DType::F32,
        )
        .unwrap()
    };
    let first = tmp.path().join("first");
    write_edited_model(
        &lm,
        &first,
        &erase(&lm, "P1").slots,
        empty_edits(&lm),
        false,
    )
    .unwrap();
    let lm1 = load(&first);
    let second = tmp.path().join("second");
    write_edited_model(
        &lm1,
        &second,
        &erase(&lm1, "P2").slots,
        empty_edits(&lm1),
        false,
    )
    .unwrap();
    let back = tmp.path().join("back");
    revert(&second, &back, false).unwrap();
    assert_eq!(
        files_of(&back),
        files_of(&first),
        "one revert undoes the second edit only"
    );
}

/// A model directory, its neurons file and an update file for CLI runs.
fn cli_setup(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let model = tiny_model(&tmp.join("m"), Layout::default());
    let neurons = tmp.join("kn.jsonl");
    std::fs::write(&neurons, neurons_text()).unwrap();
    let update = tmp.join("update.jsonl");
    std::fs::write(&update, "{\"id\": \"a\", \"new_answer\": \"rome\"}\n").unwrap();
    (model, neurons, update)
}

#[test]
fn cli_update_writes_report_and_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, neurons, update) = cli_setup(tmp.path());
    let out = tmp.path().join("edited");
    let report_path = tmp.path().join("report.json");
    let eval = tmp.path().join("eval.jsonl");
    std::fs::write(
        &eval,
        "{\"id\":\"a\",\"relation\":\"P1\",\"answer\":\"paris\",\"prompt\":\"the capital of france is [MASK] .\"}\n\
         {\"id\":\"b\",\"relation\":\"P1\",\"answer\":\"berlin\",\"prompt\":\"the capital of germany is [MASK] .\"}\n\
         {\"id\":\"c\",\"relation\":\"P2\",\"answer\":\"rome\",\"prompts\":[\"the capital of italy is [MASK] .\",\"italy capital is [MASK] .\"]}\n",
    )
    .unwrap();
    let output = kn()
        .args(["edit", "--model"])
        .arg(&model)
        .arg("--neurons")
        .arg(&neurons)
        .arg("--update")
        .arg(&update)
        .args(["--min-correct", "0", "--max-relation-share", "0.5", "--out"])
        .arg(&out)
        .arg("--eval")
        .arg(&eval)
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("1 fact(s) edited"), "{stderr}");
    let report: kn::edit::record::EditReport =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report.relations, ["P1"]);
    let edited = report.edited_facts.unwrap();
    assert_eq!((edited.facts, edited.prompts), (1, 3));
    // Fact a is left out of the evaluation: b is the only P1 fact, c the other relation.
    let same = report.same_relation.unwrap();
    let other = report.other_relation.unwrap();
    assert_eq!((same.facts, same.prompts), (1, 1));
    assert_eq!((other.facts, other.prompts), (1, 2));
    let edits: kn::edit::record::EditsFile =
        serde_json::from_slice(&std::fs::read(out.join("edits.json")).unwrap()).unwrap();
    assert_eq!(edits.slots.len(), 2);
    assert_eq!(edits.inputs.len(), 3);
    assert_eq!(
        edits.slots[0].tensor,
        "bert.encoder.layer.0.output.dense.weight"
    );

    // --dry-run writes nothing but the report, even when given --out: the same
    // edit, measured in memory, reports the same figures as the run that wrote it.
    let dry = tmp.path().join("dry");
    let dry_report = tmp.path().join("dry-report.json");
    let output = kn()
        .args(["edit", "--dry-run", "--model"])
        .arg(&model)
        .arg("--neurons")
        .arg(&neurons)
        .arg("--update")
        .arg(&update)
        .args(["--min-correct", "0", "--max-relation-share", "0.5", "--out"])
        .arg(&dry)
        .arg("--eval")
        .arg(&eval)
        .arg("--report")
        .arg(&dry_report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("kn: dry run: nothing written"), "{stderr}");
    assert!(!dry.exists(), "--dry-run wrote the --out directory");
    assert_eq!(
        std::fs::read_to_string(&dry_report).unwrap(),
        std::fs::read_to_string(&report_path).unwrap(),
        "the dry run's report differs from the written edit's"
    );

    // Revert through the CLI.
    let restored = tmp.path().join("restored");
    kn().args(["edit", "--revert"])
        .arg(&out)
        .arg("--out")
        .arg(&restored)
        .assert()
        .success();
    assert_eq!(files_of(&restored), files_of(&model));
}

#[test]
fn a_crash_while_writing_leaves_no_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, neurons, _) = cli_setup(tmp.path());
    let out = tmp.path().join("edited");
    let erase = |crash: bool| {
        let mut cmd = kn();
        cmd.args(["edit", "--erase", "P1", "--model"])
            .arg(&model)
            .arg("--neurons")
            .arg(&neurons)
            .arg("--out")
            .arg(&out);
        if crash {
            cmd.env("KN_TEST_CRASH_WHILE_WRITING", "1");
        }
        cmd.output().unwrap()
    };
    let crashed = erase(true);
    assert!(!crashed.status.success());
    assert!(!out.exists(), "a crash left a partial output directory");
    let staged: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".kn-partial-"))
        .collect();
    assert_eq!(
        staged.len(),
        1,
        "the crashed run's staging directory is hidden beside --out"
    );
    // The next run succeeds and removes the dead run's staging directory.
    let ok = erase(false);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.join("edits.json").is_file());
    let left = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(left, 0);
}

#[test]
fn bad_edit_input_is_refused_with_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, neurons, _) = cli_setup(tmp.path());
    let out = tmp.path().join("edited");
    let run = |update: &str, extra: &[&str]| {
        let path = tmp.path().join("u.jsonl");
        std::fs::write(&path, update).unwrap();
        let output = kn()
            .args(["edit", "--model"])
            .arg(&model)
            .arg("--neurons")
            .arg(&neurons)
            .arg("--update")
            .arg(&path)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(!output.status.success());
        assert!(!out.exists(), "something was written");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let err = run("{\"id\": \"zz\", \"new_answer\": \"rome\"}\n", &[]);
    assert!(
        err.contains("u.jsonl:1: fact id \"zz\" is not in the neurons file"),
        "{err}"
    );
    let err = run("{\"id\": \"a\", \"new_answer\": \"romes\"}\n", &[]);
    assert!(
        err.contains("u.jsonl:1:") && err.contains("not a single token"),
        "{err}"
    );
    let err = run(
        "{\"id\": \"a\"}\n{\"id\": \"b\", \"new_answer\": \"rome\"}\nnot json\n",
        &[],
    );
    assert!(err.contains("u.jsonl:1: has no \"new_answer\""), "{err}");
    assert!(
        err.contains("u.jsonl:3:"),
        "every bad line is reported: {err}"
    );
    // Unknown relation to erase.
    let output = kn()
        .args(["edit", "--erase", "P1,P7", "--model"])
        .arg(&model)
        .arg("--neurons")
        .arg(&neurons)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success() && !out.exists());
    assert!(String::from_utf8_lossy(&output.stderr).contains("relation P7 has no facts"));
    // Neurons beyond the model.
    let wide = tmp.path().join("wide.jsonl");
    std::fs::write(&wide, record("a", "P1", "paris", &[(1, 32)]) + "\n").unwrap();
    let output = kn()
        .args(["edit", "--erase", "P1", "--model"])
        .arg(&model)
        .arg("--neurons")
        .arg(&wide)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && !out.exists());
    assert!(
        err.contains("wide.jsonl:1: fact \"a\": neuron 1:32 is out of range"),
        "{err}"
    );
    assert!(err.contains("2 layers × 32 neurons"), "{err}");
    // An existing output directory.
    std::fs::create_dir(&out).unwrap();
    let output = kn()
        .args(["edit", "--erase", "P1", "--model"])
        .arg(&model)
        .arg("--neurons")
        .arg(&neurons)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists; pass --force"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn cli_probe_writes_records_and_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, neurons, _) = cli_setup(tmp.path());
    let summary = tmp.path().join("summary.json");
    let output = kn()
        .args(["probe", "--suppress", "--model"])
        .arg(&model)
        .arg("--neurons")
        .arg(&neurons)
        .arg("--summary")
        .arg(&summary)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines = common::json_lines(&output.stdout);
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["skipped"], "no refined neurons");
    assert_eq!(lines[0]["neurons"].as_array().unwrap().len(), 3);
    let control = lines[0]["control"]["neurons"].as_array().unwrap();
    assert_eq!(control.len(), 3);
    assert_eq!(control.iter().filter(|n| n["layer"] == 1).count(), 2);
    for p in lines[0]["prompts"].as_array().unwrap() {
        assert!(p["before"].as_f64().unwrap() > 0.0);
    }
    let summary: kn::probe::ProbeSummary =
        serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(summary.skipped, 1);
    assert_eq!(summary.overall.facts, 3);
    assert_eq!(summary.overall.prompts, 9);
    assert!(stderr.contains("all"), "{stderr}");

    // Facts from a file: an unknown id is reported with its line, the rest go on.
    let facts = tmp.path().join("facts.jsonl");
    std::fs::write(
        &facts,
        "{\"id\":\"c\"}\n{\"id\":\"nope\"}\n{\"id\":\"a\",\"answer\":\"paris\",\"prompt\":\"paris is [MASK] .\"}\n",
    )
    .unwrap();
    let output = kn()
        .args([
            "probe",
            "--amplify",
            "--factor",
            "3",
            "--control",
            "other-relation",
            "--model",
        ])
        .arg(&model)
        .arg("--neurons")
        .arg(&neurons)
        .arg("--fact")
        .arg(&facts)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("facts.jsonl:2: fact id \"nope\" is not in the neurons file"),
        "{stderr}"
    );
    let lines = common::json_lines(&output.stdout);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["factor"], 3.0);
    // c (P2) gets a P1 fact's neurons as control; a's own prompt replaces the file's.
    let other = lines[0]["control"]["fact"].as_str().unwrap();
    assert!(other == "a" || other == "b");
    assert_eq!(lines[1]["prompts"].as_array().unwrap().len(), 1);
}

/// Runs `kn edit --dry-run` with `extra` arguments and returns its report.
fn dry_run_report(
    model: &Path,
    neurons: &Path,
    update: &Path,
    eval: &Path,
    extra: &[&str],
) -> kn::edit::record::EditReport {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let output = kn()
        .args(["edit", "--dry-run", "--model"])
        .arg(model)
        .arg("--neurons")
        .arg(neurons)
        .arg("--update")
        .arg(update)
        .args([
            "--min-correct",
            "0",
            "--max-relation-share",
            "0.5",
            "--eval",
        ])
        .arg(eval)
        .arg("--report")
        .arg(&report)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
}

#[test]
fn each_pools_the_single_edits_and_the_random_control_moves_other_neurons() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, neurons, _) = cli_setup(tmp.path());
    let eval = tmp.path().join("eval.jsonl");
    std::fs::write(
        &eval,
        "{\"id\":\"a\",\"relation\":\"P1\",\"answer\":\"paris\",\"prompts\":[\"the capital of france is [MASK] .\",\"france capital is [MASK] .\"]}\n\
         {\"id\":\"b\",\"relation\":\"P1\",\"answer\":\"berlin\",\"prompt\":\"the capital of germany is [MASK] .\"}\n\
         {\"id\":\"c\",\"relation\":\"P2\",\"answer\":\"rome\",\"prompts\":[\"the capital of italy is [MASK] .\",\"italy capital is [MASK] .\"]}\n",
    )
    .unwrap();
    let write = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = "{\"id\": \"a\", \"new_answer\": \"rome\"}\n";
    let c = "{\"id\": \"c\", \"new_answer\": \"paris\"}\n";
    let both = write("both.jsonl", &format!("{a}{c}"));
    let each = dry_run_report(&model, &neurons, &both, &eval, &["--each"]);
    let ra = dry_run_report(&model, &neurons, &write("a.jsonl", a), &eval, &[]);
    let rc = dry_run_report(&model, &neurons, &write("c.jsonl", c), &eval, &[]);
    assert!(each.each && !ra.each);
    assert_eq!(each.relations, ["P1", "P2"]);
    // The edited facts' metrics: the single edits' over their prompts (3 each).
    let (e, ea, ec) = (
        each.edited_facts.unwrap(),
        ra.edited_facts.unwrap(),
        rc.edited_facts.unwrap(),
    );
    assert_eq!((e.facts, e.prompts), (2, 6));
    for (pooled, x, y) in [
        (
            e.after.change_rate,
            ea.after.change_rate,
            ec.after.change_rate,
        ),
        (e.after.mrr, ea.after.mrr, ec.after.mrr),
        (e.before.mrr, ea.before.mrr, ec.before.mrr),
    ] {
        assert!((pooled - (x + y) / 2.0).abs() < 1e-12, "{pooled} {x} {y}");
    }
    // The evaluation sets: a's edit sees b (1 prompt) in its relation and c (2) in the
    // other; c's edit sees no P2 fact but itself, and a, b (3 prompts) in the others.
    let (same, sa) = (each.same_relation.unwrap(), ra.same_relation.unwrap());
    assert!(rc.same_relation.is_none());
    assert_eq!((same.facts, same.prompts), (sa.facts, sa.prompts));
    assert!((same.after.perplexity - sa.after.perplexity).abs() < 1e-9);
    let (other, oa, oc) = (
        each.other_relation.unwrap(),
        ra.other_relation.unwrap(),
        rc.other_relation.unwrap(),
    );
    assert_eq!((other.facts, other.prompts), (3, 5));
    let pooled = ((2.0 * oa.after.perplexity.ln() + 3.0 * oc.after.perplexity.ln()) / 5.0).exp();
    assert!((other.after.perplexity - pooled).abs() < 1e-9 * pooled);
    let accuracy = (2.0 * oa.before.accuracy + 3.0 * oc.before.accuracy) / 5.0;
    assert!((other.before.accuracy - accuracy).abs() < 1e-12);
    // --each needs --dry-run.
    kn().args(["edit", "--each", "--model"])
        .arg(&model)
        .arg("--neurons")
        .arg(&neurons)
        .arg("--update")
        .arg(&both)
        .arg("--out")
        .arg(tmp.path().join("never"))
        .assert()
        .failure();

    // The random control edits as many neurons, in the same layers, none of the fact's.
    let random = dry_run_report(
        &model,
        &neurons,
        &both,
        &eval,
        &["--each", "--control", "random"],
    );
    assert_eq!(random.control, Some(kn::probe::ControlKind::Random));
    let lm = load(&model);
    let file = neurons_file();
    let fact =
        kn::attribution::neurons::KnownFact::from_record(file.get(&json!("a")).expect("fact a"));
    let options = UpdateOptions {
        rule: UpdateRule::PAPER,
        max_relation_share: 0.5,
        min_correct: 0.0,
        random_control: Some(0),
    };
    let request = UpdateRequest {
        fact,
        new_answer: "rome".into(),
    };
    let plan = plan_update(
        &lm,
        &file,
        std::slice::from_ref(&request),
        &options,
        DType::F32,
    )
    .unwrap();
    let own = [
        Neuron { layer: 0, index: 3 },
        Neuron {
            layer: 1,
            index: 20,
        },
    ];
    let drawn = &plan.facts[0].neurons;
    assert_eq!(drawn.len(), 2);
    assert!(drawn.iter().all(|n| !own.contains(n)), "{drawn:?}");
    let mut layers: Vec<usize> = drawn.iter().map(|n| n.layer).collect();
    layers.sort();
    assert_eq!(layers, [0, 1]);
    assert_eq!(plan.slots.len(), 2);
    assert!(plan.slots.iter().all(|s| drawn.contains(&s.neuron)));
}
