//! The editors' metrics of `kn edit --report` (reliability, generalization with
//! `--holdout`, locality and KL) on a tiny random model, checked against the same
//! quantities computed here from the library's own predictions; `--holdout` larger
//! than a fact's prompts; `kn report` on reports with and without them.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kn::attribution::neurons::{KnownFact, NeuronsFile};
use kn::edit::record::EditReport;
use kn::edit::{apply_slots, plan_update, UpdateOptions, UpdateRequest, UpdateRule};
use kn::model::random::Layout;
use kn::model::{LoadedModel, ModelFiles, ModelSource};
use kn::predict::{encode_prompts, mask_distributions, MaskDistribution};
use serde_json::json;

use common::{attribute_record as record, kn, tiny_model, TINY_PROMPTS as PROMPTS};

/// Fact a holds every neuron of the last layer, so that a strong update moves its
/// prompts' answers whatever the random weights.
fn neurons_text() -> String {
    let last_layer: Vec<(usize, usize)> = (0..32).map(|i| (1, i)).collect();
    [
        record("a", "P1", "paris", &last_layer),
        record("b", "P1", "berlin", &[(0, 9)]),
        record("c", "P2", "rome", &[(1, 7)]),
    ]
    .join("\n")
        + "\n"
}

/// Evaluation facts: `z` asks fact a's own first prompt (so an edit that moves a's
/// top-1 must move z's), `b` another P1 fact, `c` a P2 fact with two prompts.
const EVAL: &str = "\
{\"id\":\"z\",\"relation\":\"P1\",\"answer\":\"paris\",\"prompt\":\"the capital of france is [MASK] .\"}
{\"id\":\"b\",\"relation\":\"P1\",\"answer\":\"berlin\",\"prompt\":\"the capital of germany is [MASK] .\"}
{\"id\":\"c\",\"relation\":\"P2\",\"answer\":\"rome\",\"prompts\":[\"the capital of italy is [MASK] .\",\"italy capital is [MASK] .\"]}
";

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    neurons: PathBuf,
    eval: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let model = tiny_model(&dir.join("m"), Layout::default());
    let neurons = dir.join("kn.jsonl");
    std::fs::write(&neurons, neurons_text()).unwrap();
    let eval = dir.join("eval.jsonl");
    std::fs::write(&eval, EVAL).unwrap();
    Setup {
        _tmp: tmp,
        dir,
        model,
        neurons,
        eval,
    }
}

fn load(dir: &Path) -> LoadedModel {
    let files = ModelFiles::in_directory(dir, ModelSource::Local(dir.to_path_buf()), None)
        .expect("model files");
    LoadedModel::load(files, DType::F32, &Device::Cpu).expect("load")
}

/// Runs `kn edit --dry-run` updating fact a to "rome" with the scaled rule (λ̂2 =
/// `lambda_new`) and `extra` arguments; returns the report and stderr.
fn edit(s: &Setup, update: &str, lambda_new: f64, extra: &[&str]) -> (EditReport, String) {
    let update_path = s.dir.join("update.jsonl");
    std::fs::write(&update_path, update).unwrap();
    let report = s.dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let output = kn()
        .args(["edit", "--dry-run", "--model"])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&s.neurons)
        .arg("--update")
        .arg(&update_path)
        .args([
            "--min-correct",
            "0",
            "--max-relation-share",
            "1",
            "--lambda-new",
        ])
        .arg(lambda_new.to_string())
        .arg("--eval")
        .arg(&s.eval)
        .arg("--report")
        .arg(&report)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let report = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (report, stderr)
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

/// What the metrics should be, computed here: fact a updated to `new_answer` (scaled
/// rule, λ̂2 = `lambda_new`) on its first `3 − holdout`
/// prompts, the rest scored as paraphrases, z and b as the same relation, c as other.
struct Expected {
    reliability: f64,
    generalization: Option<f64>,
    same: (f64, f64),
    other: (f64, f64),
    /// Fact a's first prompt: its top-1 before and after.
    first_prompt: (u32, u32),
}

fn expected(s: &Setup, new_answer: &str, lambda_new: f64, holdout: usize) -> Expected {
    let lm = load(&s.model);
    let neurons = NeuronsFile::read(&s.neurons).unwrap();
    let mut fact = KnownFact::from_record(neurons.get(&json!("a")).unwrap());
    let held_out: Vec<String> = fact.prompts.split_off(3 - holdout);
    let options = UpdateOptions {
        rule: UpdateRule::Scaled {
            lambda_old: 1.0,
            lambda_new,
        },
        max_relation_share: 1.0,
        min_correct: 0.0,
        random_control: None,
    };
    let request = UpdateRequest {
        fact,
        new_answer: new_answer.into(),
    };
    let plan = plan_update(
        &lm,
        &neurons,
        std::slice::from_ref(&request),
        &options,
        DType::F32,
    )
    .unwrap();
    assert_eq!(plan.facts.len(), 1, "{:?}", plan.skipped);
    let after = LoadedModel {
        model: apply_slots(&lm.model, &plan.slots).unwrap(),
        ..lm.clone()
    };
    let new_id = lm.tokenizer.answer_id(new_answer).unwrap();
    let share_new = |prompts: &[String]| {
        let encoded = encode_prompts(&lm, prompts).unwrap();
        let d = mask_distributions(&after, &encoded, &()).unwrap();
        d.iter().filter(|d| top1(d) == new_id).count() as f64 / d.len() as f64
    };
    // Fact by fact, as kn runs them: a batch's padding moves the last digits.
    let locality = |facts: &[&[&str]]| {
        let (mut before, mut after_d) = (Vec::new(), Vec::new());
        for prompts in facts {
            let prompts: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
            let encoded = encode_prompts(&lm, &prompts).unwrap();
            before.extend(mask_distributions(&lm, &encoded, &()).unwrap());
            after_d.extend(mask_distributions(&after, &encoded, &()).unwrap());
        }
        let after = after_d;
        let n = before.len() as f64;
        let kept = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| top1(b) == top1(a))
            .count() as f64;
        let kl_sum: f64 = before
            .iter()
            .zip(&after)
            .map(|(b, a)| kl(&b.probabilities, &a.probabilities))
            .sum();
        (kept / n, kl_sum / n)
    };
    let first = encode_prompts(&lm, &[PROMPTS[0].to_string()]).unwrap();
    Expected {
        reliability: share_new(&request.fact.prompts),
        generalization: (holdout > 0).then(|| share_new(&held_out)),
        same: locality(&[&[PROMPTS[0]], &["the capital of germany is [MASK] ."]]),
        other: locality(&[&[
            "the capital of italy is [MASK] .",
            "italy capital is [MASK] .",
        ]]),
        first_prompt: (
            top1(&mask_distributions(&lm, &first, &()).unwrap()[0]),
            top1(&mask_distributions(&after, &first, &()).unwrap()[0]),
        ),
    }
}

fn close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-12 * expected.abs().max(1.0),
        "{actual} vs {expected}"
    );
}

fn check(report: &EditReport, want: &Expected) {
    let e = report.edited_facts.unwrap();
    close(e.reliability.unwrap(), want.reliability);
    // One-token answers: reliability is the paper's success after the edit.
    assert_eq!(e.reliability, Some(e.after.success));
    match (e.generalization, want.generalization) {
        (Some(g), Some(w)) => close(g, w),
        (g, w) => assert_eq!(g, w),
    }
    let same = report.same_relation.as_ref().unwrap();
    let other = report.other_relation.as_ref().unwrap();
    assert_eq!((same.facts, same.prompts), (2, 2));
    assert_eq!((other.facts, other.prompts), (1, 2));
    close(same.locality.unwrap(), want.same.0);
    close(same.kl.unwrap(), want.same.1);
    close(other.locality.unwrap(), want.other.0);
    close(other.kl.unwrap(), want.other.1);
}

#[test]
fn reliability_generalization_and_locality_match_a_computation_by_hand() {
    let s = setup();
    let update = "{\"id\": \"a\", \"new_answer\": \"rome\"}\n";
    let (report, stderr) = edit(&s, update, 8.0, &["--holdout", "1"]);
    let want = expected(&s, "rome", 8.0, 1);
    assert_eq!(report.holdout, 1);
    let e = report.edited_facts.unwrap();
    // Two prompts edit, the third is the paraphrase.
    assert_eq!((e.prompts, e.held_out_prompts), (2, 1));
    check(&report, &want);
    assert!(stderr.contains("reliability (efficacy)"), "{stderr}");
    assert!(stderr.contains("on 1 held-out prompt(s)"), "{stderr}");
    assert!(stderr.contains("locality"), "{stderr}");

    // Without --holdout every prompt is edited with and there is no generalization.
    let (whole, _) = edit(&s, update, 8.0, &[]);
    let e = whole.edited_facts.unwrap();
    assert_eq!(
        (e.prompts, e.held_out_prompts, e.generalization),
        (3, 0, None)
    );
    assert_eq!(whole.holdout, 0);
    check(&whole, &expected(&s, "rome", 8.0, 0));
}

#[test]
fn an_edit_that_moves_a_prompts_answer_is_not_local_there() {
    let s = setup();
    // Updating fact a to "the" moves the top-1 of its first prompt ([CLS] before, in
    // this random model, "city" after; checked here on the library's own predictions),
    // which eval fact z asks too: z's prediction is not local.
    let (report, _) = edit(&s, "{\"id\": \"a\", \"new_answer\": \"the\"}\n", 8.0, &[]);
    let want = expected(&s, "the", 8.0, 0);
    let (before, after) = want.first_prompt;
    assert_ne!(
        before, after,
        "the edit must move the shared prompt's top-1"
    );
    check(&report, &want);
    let same = report.same_relation.unwrap();
    assert!(same.locality.unwrap() <= 0.5, "{same:?}");
    assert!(same.kl.unwrap() > 0.0);
}

#[test]
fn each_reports_every_fact_and_pools_them() {
    let s = setup();
    let a = "{\"id\": \"a\", \"new_answer\": \"rome\"}\n";
    let c = "{\"id\": \"c\", \"new_answer\": \"paris\"}\n";
    let (each, stderr) = edit(&s, &format!("{a}{c}"), 8.0, &["--each", "--holdout", "1"]);
    let (alone_a, _) = edit(&s, a, 8.0, &["--holdout", "1"]);
    let (alone_c, _) = edit(&s, c, 8.0, &["--holdout", "1"]);
    assert!(each.each);
    assert_eq!(each.per_fact.len(), 2);
    assert!(stderr.contains("per fact"), "{stderr}");
    for (fact, alone, id) in [
        (&each.per_fact[0], &alone_a, "a"),
        (&each.per_fact[1], &alone_c, "c"),
    ] {
        assert_eq!(fact.id, json!(id));
        assert_eq!(Some(fact.edited_facts), alone.edited_facts);
        // A fact's own evaluation sets leave only itself out; z and b are not edited.
        let own =
            |g: &Option<kn::edit::record::GroupMetrics>| g.as_ref().map(|g| (g.locality, g.kl));
        assert_eq!(own(&fact.same_relation), own(&alone.same_relation));
        assert_eq!(own(&fact.other_relation), own(&alone.other_relation));
    }
    let pooled = each.edited_facts.unwrap();
    let (ea, ec) = (alone_a.edited_facts.unwrap(), alone_c.edited_facts.unwrap());
    assert_eq!(pooled.held_out_prompts, 2);
    close(
        pooled.generalization.unwrap(),
        (ea.generalization.unwrap() + ec.generalization.unwrap()) / 2.0,
    );
    close(
        pooled.reliability.unwrap(),
        (ea.reliability.unwrap() + ec.reliability.unwrap()) / 2.0,
    );
    // The other relations: a's edit sees c (2 prompts), c's sees z and b (2 prompts).
    let other = each.other_relation.unwrap();
    let (oa, oc) = (
        alone_a.other_relation.unwrap(),
        alone_c.other_relation.unwrap(),
    );
    close(
        other.kl.unwrap(),
        (oa.kl.unwrap() * 2.0 + oc.kl.unwrap() * 2.0) / 4.0,
    );
    close(
        other.locality.unwrap(),
        (oa.locality.unwrap() * 2.0 + oc.locality.unwrap() * 2.0) / 4.0,
    );
}

#[test]
fn a_holdout_as_large_as_a_facts_prompts_names_the_fact_and_line() {
    let s = setup();
    let update = s.dir.join("update.jsonl");
    std::fs::write(
        &update,
        "{\"id\": \"b\", \"new_answer\": \"rome\"}\n{\"id\": \"a\", \"new_answer\": \"rome\", \"prompts\": [\"france capital is [MASK] .\", \"the city of france is [MASK] .\"]}\n",
    )
    .unwrap();
    let report = s.dir.join("never.json");
    let output = kn()
        .args(["edit", "--dry-run", "--holdout", "2", "--model"])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&s.neurons)
        .arg("--update")
        .arg(&update)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    // Line 1 (3 prompts) is fine; line 2 gives 2 prompts and cannot hold out 2.
    assert!(
        stderr.contains("update.jsonl:2: fact \"a\": has 2 prompt(s): --holdout 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("update.jsonl:1:"), "{stderr}");
    assert!(!report.exists());
}

#[test]
fn kn_report_reads_reports_with_and_without_the_editors_metrics() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/report");
    let tmp = tempfile::tempdir().unwrap();
    // The committed report predates the editors' metrics; a copy gets them.
    let old = data.join("update.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&old).unwrap()).unwrap();
    value["edited_facts"]["reliability"] = json!(0.5);
    value["edited_facts"]["held_out_prompts"] = json!(4);
    value["edited_facts"]["generalization"] = json!(0.25);
    value["other_relation"]["locality"] = json!(0.875);
    value["other_relation"]["kl"] = json!(0.0123);
    value["holdout"] = json!(2);
    // One fact's own metrics, as `--each` writes them.
    let mut own = value["edited_facts"].clone();
    own["facts"] = json!(1);
    own["reliability"] = json!(1.0);
    own["generalization"] = json!(0.5);
    value["per_fact"] = json!([{"id": "f1", "relation": "P1", "edited_facts": own,
                                "other_relation": value["other_relation"].clone()}]);
    let new = tmp.path().join("new.json");
    std::fs::write(&new, value.to_string()).unwrap();
    let out = tmp.path().join("report");
    let output = kn()
        .args(["report", "--neurons"])
        .arg(data.join("neurons.jsonl"))
        .arg("--edit-report")
        .arg(&old)
        .arg(&new)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let edits = json["edits"].as_array().unwrap();
    assert!(edits[0]["edited_facts"].get("reliability").is_none());
    assert_eq!(edits[1]["edited_facts"]["generalization"], json!(0.25));
    assert_eq!(edits[1]["other_relation"]["kl"], json!(0.0123));
    assert_eq!(edits[1]["holdout"], json!(2));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    // The paper's table keeps its shape; the editors' table has the new report only.
    let row = "| 0.0% → 50.0% | 50.0% → 100.0% | 0.0% → 66.7% | 0.25 → 0.75 | 1 |";
    assert_eq!(md.matches(row).count(), 2, "{md}");
    assert!(
        md.contains(
            "| `new.json` | update (scaled) | 50.0% | 4 | 25.0% | — | — | 87.5% | 0.0123 |"
        ),
        "{md}"
    );
    assert!(
        !md.contains("| `update.json` | update (scaled) | —"),
        "{md}"
    );
    assert!(
        md.contains("| `new.json` | \"f1\" | P1 | 100.0% | 50.0% | — | — | 87.5% | 0.0123 |"),
        "{md}"
    );
    // The locality table: the new report's cells, and dashes for the old one.
    assert!(
        md.contains(
            "| other relations | 2 | 50.0% → 50.0% | 4.00 → 4.20 (+0.20) | 87.5% | 0.0123 |"
        ),
        "{md}"
    );
    assert!(
        md.contains("| other relations | 2 | 50.0% → 50.0% | 4.00 → 4.20 (+0.20) | — | — |"),
        "{md}"
    );
    // The summary: the old report's line as before, the new one's with the metrics.
    let summary = String::from_utf8_lossy(&output.stdout);
    let line = |name: &str| {
        summary
            .lines()
            .find(|l| l.starts_with(&format!("edit {name}:")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{summary}"))
            .to_string()
    };
    assert!(!line("update.json").contains("reliability"), "{summary}");
    assert!(
        line("new.json").contains(
            "; reliability 50.0%, generalization 25.0%; locality other relations 87.5% (KL 0.0123)"
        ),
        "{summary}"
    );
}
