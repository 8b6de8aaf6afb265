//! `kn edit --rule solve`: the solved update changes only the chosen value slots (checked
//! against the written weights file, byte for byte), reverts exactly, makes the new answer
//! top-1 where the paper's rule does not (the bundled fact model), and on SmolLM2 keeps
//! other facts' predictions (a CI-sized subset of the findings facts).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kn::edit::record::{EditReport, EditsFile};

use crate::common::{self, kn};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// From data/facts.jsonl: the first 4 facts of three relations (to attribute), one update
/// per relation (its first fact to the next different answer of the relation), and
/// facts 5–8 of each relation to evaluate on (none of them attributed, so the neurons
/// file's other facts are the solver's anchors).
fn fact_model_inputs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let text = std::fs::read_to_string(root().join("data/facts.jsonl")).unwrap();
    let mut by_relation: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for line in text.lines() {
        let fact: serde_json::Value = serde_json::from_str(line).unwrap();
        let relation = fact["relation"].as_str().unwrap().to_string();
        by_relation.entry(relation).or_default().push(fact);
    }
    let (mut facts, mut updates, mut eval) = (String::new(), String::new(), String::new());
    for relation in ["P103", "P413", "P1303"] {
        let all = &by_relation[relation];
        for f in &all[..4] {
            facts += &format!("{f}\n");
        }
        for f in &all[4..8] {
            eval += &format!("{f}\n");
        }
        let first = &all[0];
        let new = all[1..]
            .iter()
            .map(|f| &f["answer"])
            .find(|a| **a != first["answer"])
            .unwrap();
        updates += &format!(
            "{}\n",
            serde_json::json!({"id": first["id"], "new_answer": new})
        );
    }
    let paths = ["facts.jsonl", "update.jsonl", "eval.jsonl"].map(|n| dir.join(n));
    for (path, text) in paths.iter().zip([facts, updates, eval]) {
        std::fs::write(path, text).unwrap();
    }
    let [facts, updates, eval] = paths;
    let neurons = dir.join("kn.jsonl");
    kn().args(["attribute", "--quiet", "--model"])
        .arg(root().join("data/fact-model"))
        .arg("--fact")
        .arg(&facts)
        .arg("--out")
        .arg(&neurons)
        .assert()
        .success();
    (neurons, updates, eval)
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn solve_changes_only_the_chosen_slots_reverts_exactly_and_beats_the_papers_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let (neurons, updates, eval) = fact_model_inputs(tmp.path());
    let model = root().join("data/fact-model");
    let edit = |rule: &str, out: &str| {
        let mut cmd = kn();
        cmd.args(["edit", "--quiet", "--rule", rule, "--model"])
            .arg(&model)
            .arg("--neurons")
            .arg(&neurons)
            .arg("--update")
            .arg(&updates)
            .arg("--eval")
            .arg(&eval)
            .arg("--report")
            .arg(tmp.path().join(format!("{out}.json")));
        if rule == "solve" {
            cmd.arg("--out").arg(tmp.path().join(out));
        } else {
            cmd.arg("--dry-run");
        }
        cmd.assert().success();
        let bytes = std::fs::read(tmp.path().join(format!("{out}.json"))).unwrap();
        serde_json::from_slice::<EditReport>(&bytes).unwrap()
    };
    let solved = edit("solve", "solved");
    let paper = edit("scaled", "paper");

    // The three facts, edited in turn. Measured (2026-12-03): the paper's rule leaves
    // the old answers top-1 (new answer top-1 on 0 of 14 prompts); solve makes it top-1
    // on 14 of 14, and keeps the top-1 of 58.9% of the edited relations' other facts'
    // prompts (this small model's facts share most of their neurons with their
    // relation's: 12 to 58 refined neurons a fact).
    let (s, p) = (solved.edited_facts.unwrap(), paper.edited_facts.unwrap());
    assert_eq!((s.facts, s.prompts), (3, 14));
    assert!(p.after.success <= 0.1, "paper's rule: {:?}", p.after);
    assert!(s.after.success >= 0.9, "solve: {:?}", s.after);
    let same = solved.same_relation.clone().unwrap();
    assert!(same.locality.unwrap() >= 0.3, "{same:?}");

    // Only the chosen neurons' columns moved, and each of them did.
    let out = tmp.path().join("solved");
    let edits: EditsFile =
        serde_json::from_slice(&std::fs::read(out.join("edits.json")).unwrap()).unwrap();
    let chosen: BTreeSet<(usize, usize)> = edits
        .facts
        .iter()
        .flat_map(|f| f.neurons.iter().map(|n| (n.layer, n.index)))
        .collect();
    assert!(edits.facts.iter().all(|f| f.solved.is_some()));
    let before = tensors(&model.join("model.safetensors"));
    let after = tensors(&out.join("model.safetensors"));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    let mut moved = BTreeSet::new();
    for (name, old) in &before {
        let new = &after[name];
        assert_eq!(old.dims(), new.dims(), "{name}");
        let old_bytes = old.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let new_bytes = new.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let (old_v, new_v) = (
            old_bytes.to_vec1::<f32>().unwrap(),
            new_bytes.to_vec1::<f32>().unwrap(),
        );
        let layer = name
            .strip_prefix("bert.encoder.layer.")
            .and_then(|rest| rest.strip_suffix(".output.dense.weight"))
            .and_then(|l| l.parse::<usize>().ok());
        for (at, (a, b)) in old_v.iter().zip(&new_v).enumerate() {
            if a.to_bits() == b.to_bits() {
                continue;
            }
            let layer = layer.unwrap_or_else(|| panic!("{name}[{at}] changed"));
            let width = old.dims()[1];
            let column = (layer, at % width);
            assert!(
                chosen.contains(&column),
                "{name}[{at}]: neuron {column:?} not chosen"
            );
            moved.insert(column);
        }
    }
    assert_eq!(moved, chosen, "every chosen slot moves");

    // Revert restores the original files byte for byte.
    let restored = tmp.path().join("restored");
    kn().args(["edit", "--revert"])
        .arg(&out)
        .arg("--out")
        .arg(&restored)
        .assert()
        .success();
    let original: Vec<_> = files_of(&model)
        .into_iter()
        .filter(|(name, _)| !name.ends_with(".log") && name != "training.json")
        .collect();
    let back: Vec<_> = files_of(&restored)
        .into_iter()
        .filter(|(name, _)| original.iter().any(|(n, _)| n == name))
        .collect();
    assert_eq!(back, original);
}

#[test]
fn solve_holds_on_a_smollm2_subset() {
    // The 8 findings facts of tests/data (4 relations); evaluation on 4 of them (one of
    // each relation), so the other 4 are the anchors; one prompt of each fact held out.
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("tests/data");
    let facts = std::fs::read_to_string(data.join("smollm2_findings.jsonl")).unwrap();
    let eval: String = facts
        .lines()
        .enumerate()
        .filter(|(n, _)| [0, 1, 4, 7].contains(n))
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let eval_path = tmp.path().join("eval.jsonl");
    std::fs::write(&eval_path, eval).unwrap();
    let report_path = tmp.path().join("report.json");
    kn().args(["edit", "--quiet", "--dry-run", "--each", "--rule", "solve"])
        .args(["--max-relation-share", "1", "--holdout", "1", "--model"])
        .arg(common::smollm2())
        .arg("--neurons")
        .arg(data.join("smollm2_findings_neurons.jsonl"))
        .arg("--update")
        .arg(data.join("smollm2_findings.jsonl"))
        .arg("--eval")
        .arg(&eval_path)
        .arg("--report")
        .arg(&report_path)
        .assert()
        .success();
    let report: EditReport = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    // Measured (2026-12-03, `kn edit … --rule solve` as here): reliability 100% on 46
    // prompts, generalization 100% on 8 held-out prompts, other relations' locality
    // 94.1% (perplexity 4.53 → 4.24). Asserted with margins of about half.
    let edited = report.edited_facts.unwrap();
    assert_eq!(edited.facts, 8);
    assert!(edited.reliability.unwrap() >= 0.5, "{edited:?}");
    assert!(edited.generalization.unwrap() >= 0.5, "{edited:?}");
    let other = report.other_relation.unwrap();
    assert!(other.locality.unwrap() >= 0.47, "{other:?}");
    assert!(
        other.after.perplexity < 1.5 * other.before.perplexity,
        "{other:?}"
    );
    assert!(report
        .per_fact
        .iter()
        .all(|f| f.solved.is_some_and(|s| s.anchors > 0)));
}
