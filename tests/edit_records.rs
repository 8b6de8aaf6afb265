//! `kn edit --update` with CounterFact- and ZsRE-shaped records (their own paraphrases
//! and locality prompts) on a tiny random BERT: the report's generalization and record
//! locality checked against the same quantities computed here from the library's own
//! predictions, in the one-run mode and with `--each`; a malformed record refused by
//! file and line with nothing written.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kn::attribution::neurons::{KnownFact, NeuronsFile};
use kn::edit::record::EditReport;
use kn::edit::solve::SolveOptions;
use kn::edit::{apply_slots, plan_update, UpdateOptions, UpdateRequest, UpdateRule};
use kn::model::random::Layout;
use kn::model::{LoadedModel, ModelFiles, ModelSource};
use kn::predict::{encode_prompts, mask_distributions, MaskDistribution};
use serde_json::json;

use common::{attribute_record, kn, tiny_model};

/// Line 1: a CounterFact record (ROME's counterfact.json layout), case 7: "the capital
/// of france is" paris → rome. Line 2: a ZsRE record (zsre_mend_eval.json layout), no
/// id, so fact 2 by its line: "the capital of italy is" rome → paris.
const UPDATES: &str = r#"{"case_id": 7, "pararel_idx": 11, "requested_rewrite": {"prompt": "the capital of {} is", "relation_id": "P36", "target_new": {"str": " rome", "id": "Q220"}, "target_true": {"str": " paris", "id": "Q90"}, "subject": "france"}, "paraphrase_prompts": ["the capital of france is", "france capital is"], "neighborhood_prompts": ["the capital of germany is", "the city of germany is"], "attribute_prompts": ["the capital of italy is"], "generation_prompts": ["france is"]}
{"subject": "italy", "src": "the capital of italy is", "pred": "rome", "rephrase": "italy capital is", "alt": "paris", "answers": ["rome"], "loc": "germany capital is", "loc_ans": "berlin", "cond": "rome >> paris || the capital of italy is"}
"#;

/// What the records become: the edit's prompt, the paraphrases, the locality prompts
/// and the new answer, per fact (id 7, then id 2).
const FACTS: [(&str, &[&str], &[&str], &str); 2] = [
    (
        "the capital of france is [MASK]",
        &[
            "the capital of france is [MASK]",
            "france capital is [MASK]",
        ],
        &[
            "the capital of germany is [MASK]",
            "the city of germany is [MASK]",
        ],
        "rome",
    ),
    (
        "the capital of italy is [MASK]",
        &["italy capital is [MASK]"],
        &["germany capital is [MASK]"],
        "paris",
    ),
];

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    neurons: PathBuf,
}

/// Fact 7 (P36, paris) holds every neuron of the last layer; fact 2 (P1, rome) a few
/// of the first layer's. Their ids are the JSON numbers the records give.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let model = tiny_model(&dir.join("m"), Layout::default());
    let last_layer: Vec<(usize, usize)> = (0..32).map(|i| (1, i)).collect();
    let record = |id: u64, relation: &str, answer: &str, refined: &[(usize, usize)]| {
        let mut r: serde_json::Value =
            serde_json::from_str(&attribute_record("x", relation, answer, refined)).unwrap();
        r["id"] = json!(id);
        r.to_string()
    };
    let neurons = dir.join("kn.jsonl");
    std::fs::write(
        &neurons,
        [
            record(7, "P36", "paris", &last_layer),
            record(2, "P1", "rome", &[(0, 3), (0, 5), (0, 9)]),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    Setup {
        _tmp: tmp,
        dir,
        model,
        neurons,
    }
}

fn load(dir: &Path) -> LoadedModel {
    let files = ModelFiles::in_directory(dir, ModelSource::Local(dir.to_path_buf()), None)
        .expect("model files");
    LoadedModel::load(files, DType::F32, &Device::Cpu).expect("load")
}

fn top1(d: &MaskDistribution) -> u32 {
    d.top_k(1)[0].0
}

/// KL(p ‖ q) written out here, with q floored at the smallest normal f32 as kn documents.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let mut sum = 0.0;
    for (&p, &q) in p.iter().zip(q) {
        if p > 0.0 {
            sum += f64::from(p) * (f64::from(p).ln() - f64::from(q.max(f32::MIN_POSITIVE)).ln());
        }
    }
    sum
}

/// Counts over some edited facts: paraphrases with the new answer top-1 after, of how
/// many; locality prompts whose top-1 stayed, of how many, and their summed KL.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    generalized: usize,
    paraphrases: usize,
    unchanged: usize,
    locality: usize,
    kl: f64,
}

/// Fact ids 7 and 2 (indices 0 and 1 of [`FACTS`]) updated together (`which` both) or
/// alone, with kn's default rule (scaled, λ̂1 = 1, λ̂2 = 8) or the solved rule with its
/// defaults (`solve`), measured here.
fn expected(s: &Setup, which: &[usize], solve: bool) -> Counts {
    let lm = load(&s.model);
    let neurons = NeuronsFile::read(&s.neurons).unwrap();
    let ids = [7, 2];
    let requests: Vec<UpdateRequest> = which
        .iter()
        .map(|&i| {
            let mut fact = KnownFact::from_record(neurons.get(&json!(ids[i])).unwrap());
            fact.prompts = vec![FACTS[i].0.to_string()];
            UpdateRequest {
                fact,
                new_answer: FACTS[i].3.to_string(),
            }
        })
        .collect();
    let options = UpdateOptions {
        rule: if solve {
            UpdateRule::Solve(SolveOptions::default())
        } else {
            UpdateRule::Scaled {
                lambda_old: 1.0,
                lambda_new: 8.0,
            }
        },
        max_relation_share: 1.0,
        min_correct: 0.0,
        random_control: None,
    };
    let plan = plan_update(&lm, &neurons, &requests, &options, DType::F32).unwrap();
    assert_eq!(plan.facts.len(), which.len(), "{:?}", plan.skipped);
    let after = LoadedModel {
        model: apply_slots(&lm.model, &plan.slots).unwrap(),
        ..lm.clone()
    };
    let mut counts = Counts::default();
    for &i in which {
        let (_, paraphrases, locality, new_answer) = FACTS[i];
        let new_id = lm.tokenizer.answer_id(new_answer).unwrap();
        let strings = |ps: &[&str]| ps.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let encoded = encode_prompts(&lm, &strings(paraphrases)).unwrap();
        for d in mask_distributions(&after, &encoded, &()).unwrap() {
            counts.paraphrases += 1;
            counts.generalized += usize::from(top1(&d) == new_id);
        }
        // Fact by fact, as kn runs them: a batch's padding moves the last digits.
        let encoded = encode_prompts(&lm, &strings(locality)).unwrap();
        let before = mask_distributions(&lm, &encoded, &()).unwrap();
        let after_d = mask_distributions(&after, &encoded, &()).unwrap();
        for (b, a) in before.iter().zip(&after_d) {
            counts.locality += 1;
            counts.unchanged += usize::from(top1(b) == top1(a));
            counts.kl += kl(&b.probabilities, &a.probabilities);
        }
    }
    counts
}

fn close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1e-6),
        "{actual} vs {expected}"
    );
}

/// Runs `kn edit --dry-run` on [`UPDATES`] with `extra` arguments; the report and stderr.
fn edit(s: &Setup, extra: &[&str]) -> (EditReport, String) {
    edit_lines(s, UPDATES, extra)
}

/// Runs `kn edit --dry-run` on the update lines `updates`.
fn edit_lines(s: &Setup, updates: &str, extra: &[&str]) -> (EditReport, String) {
    let update = s.dir.join("update.jsonl");
    std::fs::write(&update, updates).unwrap();
    let report = s.dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let output = kn()
        .args(["edit", "--dry-run", "--model"])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&s.neurons)
        .arg("--update")
        .arg(&update)
        .args([
            "--min-correct",
            "0",
            "--max-relation-share",
            "1",
            "--report",
        ])
        .arg(&report)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let report = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (report, stderr)
}

#[test]
fn records_paraphrases_and_locality_prompts_are_scored_as_computed_by_hand() {
    let s = setup();
    let (report, stderr) = edit(&s, &[]);
    let want = expected(&s, &[0, 1], false);
    assert_eq!((want.paraphrases, want.locality), (3, 3));
    let e = report.edited_facts.unwrap();
    // One edit prompt a record; the paraphrases are scored, never edited with.
    assert_eq!((e.facts, e.prompts), (2, 2));
    assert_eq!(e.held_out_prompts, 3);
    assert_eq!(
        e.generalization,
        Some(want.generalized as f64 / 3.0),
        "{want:?}"
    );
    assert_eq!(e.record_locality_prompts, 3);
    assert_eq!(
        e.record_locality,
        Some(want.unchanged as f64 / 3.0),
        "{want:?}"
    );
    close(e.record_locality_kl.unwrap(), want.kl / 3.0);
    // The edits moved something: a KL of exactly 0 would test nothing.
    assert!(want.kl > 0.0, "{want:?}");
    // The edited facts are the records' ids: CounterFact's case_id, ZsRE's line.
    let relations: Vec<&str> = report.relations.iter().map(String::as_str).collect();
    assert_eq!(relations, ["P1", "P36"]);
    assert!(stderr.contains("on 3 held-out prompt(s)"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "record locality {:.1}% (mean KL {:.4}) on 3 locality prompt(s)",
            100.0 * want.unchanged as f64 / 3.0,
            want.kl / 3.0
        )),
        "{stderr}"
    );
}

#[test]
fn each_pools_every_records_own_prompts() {
    let s = setup();
    // The solved rule makes the new answer win on the edit's own prompt, so CounterFact's
    // first paraphrase, that same prompt, generalizes: 1 of its record's 2.
    let (report, _) = edit(&s, &["--each", "--rule", "solve"]);
    assert!(report.each);
    let (a, b) = (expected(&s, &[0], true), expected(&s, &[1], true));
    assert_eq!((a.generalized, a.paraphrases), (1, 2), "{a:?}");
    assert_eq!(report.per_fact[0].edited_facts.generalization, Some(0.5));
    assert_eq!(report.per_fact.len(), 2);
    assert_eq!(report.per_fact[0].id, json!(7));
    assert_eq!(report.per_fact[1].id, json!(2));
    for (fact, want) in report.per_fact.iter().zip([a, b]) {
        let e = &fact.edited_facts;
        assert_eq!(e.held_out_prompts, want.paraphrases);
        assert_eq!(
            e.generalization,
            Some(want.generalized as f64 / want.paraphrases as f64)
        );
        assert_eq!(e.record_locality_prompts, want.locality);
        assert_eq!(
            e.record_locality,
            Some(want.unchanged as f64 / want.locality as f64)
        );
        close(
            e.record_locality_kl.unwrap(),
            want.kl / want.locality as f64,
        );
    }
    let pooled = report.edited_facts.unwrap();
    assert_eq!(
        (pooled.held_out_prompts, pooled.record_locality_prompts),
        (3, 3)
    );
    close(
        pooled.generalization.unwrap(),
        (a.generalized + b.generalized) as f64 / 3.0,
    );
    close(
        pooled.record_locality.unwrap(),
        (a.unchanged + b.unchanged) as f64 / 3.0,
    );
    close(pooled.record_locality_kl.unwrap(), (a.kl + b.kl) / 3.0);
}

#[test]
fn a_counterfact_record_without_target_new_names_the_file_and_line() {
    let s = setup();
    let lines: Vec<&str> = UPDATES.lines().collect();
    // The ZsRE record first (its fact named by id), the broken CounterFact record on
    // line 2.
    let bad = format!(
        "{}\n{}",
        lines[1].replacen('{', "{\"id\": 2, ", 1),
        lines[0].replace(r#""target_new": {"str": " rome", "id": "Q220"}, "#, "")
    );
    assert!(!bad.contains("target_new"));
    let update = s.dir.join("bad.jsonl");
    std::fs::write(&update, bad + "\n").unwrap();
    let (report, out) = (s.dir.join("never.json"), s.dir.join("never-model"));
    let output = kn()
        .args(["edit", "--model"])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&s.neurons)
        .arg("--update")
        .arg(&update)
        .args([
            "--min-correct",
            "0",
            "--max-relation-share",
            "1",
            "--report",
        ])
        .arg(&report)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:", update.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("CounterFact") && stderr.contains("target_new"),
        "{stderr}"
    );
    assert!(!report.exists());
    assert!(!out.exists());
}

#[test]
fn a_kn_line_with_the_same_prompts_reports_what_the_counterfact_record_does() {
    let s = setup();
    let counterfact = UPDATES.lines().next().unwrap().to_string() + "\n";
    let (from_record, _) = edit_lines(&s, &counterfact, &[]);
    let kn_line = json!({
        "id": 7, "relation": "P36", "answer": "paris", "new_answer": "rome",
        "prompts": [FACTS[0].0],
        "paraphrases": FACTS[0].1,
        "locality": [FACTS[0].2[0], {"prompt": FACTS[0].2[1], "answer": "paris"}],
    })
    .to_string()
        + "\n";
    let (from_kn, _) = edit_lines(&s, &kn_line, &[]);
    let e = from_kn.edited_facts.unwrap();
    assert_eq!((e.held_out_prompts, e.record_locality_prompts), (2, 2));
    assert_eq!(from_kn.edited_facts, from_record.edited_facts);
    assert_eq!(from_kn.relations, ["P36"]);
}
