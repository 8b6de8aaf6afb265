//! `kn attribute` and `kn refine` end to end on tiny random models: output records,
//! resume after a kill, shards, re-selection, completeness of the quadrature rules,
//! and bad input.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use kn::attribution::ig::Rule;
use kn::attribution::record::{FactRecord, Method};
use kn::attribution::{AttributeOptions, Attributor};
use kn::model::random::Layout;
use predicates::str::contains;

const FACTS: &str = r#"{"id": "fr", "relation": "capital", "answer": "paris", "prompts": ["the capital of france is [MASK] .", "[MASK] is the capital of france .", "the city of [MASK] is the capital of france ."]}
{"id": "de", "relation": "capital", "answer": "berlin", "prompts": ["the capital of germany is [MASK] .", "[MASK] is the capital of germany .", "the city of [MASK] is the capital of germany ."]}
{"id": "it", "relation": "capital", "answer": "rome", "prompts": ["the capital of italy is [MASK] .", "[MASK] is the capital of italy .", "the city of [MASK] is the capital of italy ."]}
{"relation": "country", "answer": "france", "prompts": ["paris is the capital of [MASK] .", "the city of paris is in [MASK] .", "[MASK] has the capital paris ."]}
{"id": 5, "relation": "country", "answer": "germany", "prompts": ["berlin is the capital of [MASK] .", "the city of berlin is in [MASK] .", "[MASK] has the capital berlin ."]}
{"id": "six", "relation": "country", "answer": "italy", "prompts": ["rome is the capital of [MASK] .", "the city of rome is in [MASK] .", "[MASK] has the capital rome ."]}
"#;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    facts: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let model = common::tiny_model(&root.join("model"), Layout::default());
    let facts = root.join("facts.jsonl");
    std::fs::write(&facts, FACTS).unwrap();
    Setup {
        _dir: dir,
        root,
        model,
        facts,
    }
}

fn attribute(s: &Setup, out: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    common::kn()
        .args(["attribute", "--quiet", "--model"])
        .arg(&s.model)
        .arg("--fact")
        .arg(&s.facts)
        .arg("--out")
        .arg(out)
        .args(extra)
        .assert()
}

fn records(path: &Path) -> Vec<FactRecord> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn records_hold_neurons_evidence_and_provenance() {
    let s = setup();
    let out = s.root.join("kn.jsonl");
    attribute(&s, &out, &[]).success();
    let recs = records(&out);
    assert_eq!(recs.len(), 6);
    assert_eq!(recs[3].id, 4, "a fact without id is named by its line");
    let sha = kn::model::files::sha256_file(&s.model.join("model.safetensors")).unwrap();
    for r in &recs {
        assert_eq!(r.model.weights_sha256, sha);
        assert_eq!(r.params.steps, Some(20));
        assert_eq!(r.params.rule, Some(Rule::Left));
        assert_eq!(
            (r.params.threshold, r.params.share, r.params.min_prompts),
            (0.2, 0.7, 3)
        );
        assert_eq!(r.kn_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(r.prompts.len(), 3);
        for p in &r.prompts {
            // Coarse = score ≥ 0.2 · max, kept = [0.1, 0.2) · max, best first.
            assert!(p.max_score > 0.0);
            assert_eq!(p.coarse[0].score, p.max_score);
            assert!(p.coarse.iter().all(|n| n.score >= 0.2 * p.max_score));
            assert!(p
                .kept
                .iter()
                .all(|n| n.score < 0.2 * p.max_score && n.score >= 0.1 * p.max_score));
            assert!(p.coarse.windows(2).all(|w| w[0].score >= w[1].score));
            assert_eq!(p.completeness.len(), 2);
            assert!(p.completeness_error.is_some());
        }
        // Refined neurons are coarse in every prompt here (3 prompts, floor 3).
        for n in &r.refined {
            assert_eq!(n.prompts, 3);
            for p in &r.prompts {
                assert!(p
                    .coarse
                    .iter()
                    .any(|c| (c.layer, c.index) == (n.layer, n.index)));
            }
        }
    }
    assert!(
        recs.iter().any(|r| !r.refined.is_empty()),
        "no refined neuron at all"
    );
}

/// A run killed while writing, then resumed, ends with exactly the output of one
/// straight run; a cut-off last line is dropped and redone. The killed run reads its
/// facts from a pipe that holds only the first three, so it is certainly killed
/// mid-way (waiting for the fourth) however fast the machine is, and the three
/// records are on disk only if each was flushed when written.
#[test]
fn killed_then_resumed_equals_a_straight_run() {
    let s = setup();
    let straight = s.root.join("straight.jsonl");
    attribute(&s, &straight, &[]).success();
    let expected = std::fs::read_to_string(&straight).unwrap();
    assert_eq!(expected.lines().count(), 6);

    let resumed = s.root.join("resumed.jsonl");
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("kn"))
        .args(["attribute", "--quiet", "--model"])
        .arg(&s.model)
        .args(["--fact", "-", "--out"])
        .arg(&resumed)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in FACTS.lines().take(3) {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    let start = Instant::now();
    // Whole records end with their newline (a read may catch one half written).
    while std::fs::read_to_string(&resumed).map_or(0, |t| t.matches('\n').count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no output");
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before its input ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let partial = std::fs::read_to_string(&resumed).unwrap();
    assert_eq!(
        partial,
        expected.split_inclusive('\n').take(3).collect::<String>()
    );
    // As if killed in the middle of a write: half a record at the end.
    let next = expected.lines().nth(3).unwrap();
    std::fs::write(&resumed, format!("{partial}{}", &next[..next.len() / 2])).unwrap();

    attribute(&s, &resumed, &["--resume"]).success();
    assert_eq!(std::fs::read_to_string(&resumed).unwrap(), expected);
}

#[test]
fn resume_refuses_other_parameters_and_existing_output_is_protected() {
    let s = setup();
    let out = s.root.join("kn.jsonl");
    attribute(&s, &out, &["--steps", "4"]).success();
    let before = std::fs::read(&out).unwrap();
    attribute(&s, &out, &["--steps", "5", "--resume"])
        .code(1)
        .stderr(contains(format!(
            "{}:1: written with other parameters",
            out.display()
        )))
        .stderr(contains("refusing to --resume"));
    attribute(&s, &out, &["--steps", "4"])
        .code(1)
        .stderr(contains("exists; use --resume"));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "nothing already written is lost"
    );
    attribute(&s, &out, &["--steps", "4", "--resume"]).success();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "everything was done already"
    );
}

#[test]
fn shards_split_the_facts_and_concatenate_to_the_whole() {
    let s = setup();
    let whole = s.root.join("whole.jsonl");
    attribute(&s, &whole, &["--steps", "4"]).success();
    let mut ids: Vec<String> = Vec::new();
    let mut by_id = std::collections::HashMap::new();
    for k in 1..=3 {
        let out = s.root.join(format!("shard{k}.jsonl"));
        attribute(&s, &out, &["--steps", "4", "--shard", &format!("{k}/3")]).success();
        for r in records(&out) {
            ids.push(r.id.to_string());
            by_id.insert(r.id.to_string(), r);
        }
    }
    let all = records(&whole);
    assert_eq!(
        ids.len(),
        all.len(),
        "shards overlap or miss facts: {ids:?}"
    );
    for r in all {
        assert_eq!(by_id[&r.id.to_string()], r);
    }
    attribute(&s, &s.root.join("x.jsonl"), &["--shard", "4/3"])
        .code(2)
        .stderr(contains("K/N"));
}

/// `kn refine` at other settings gives what `kn attribute` gives at those settings.
#[test]
fn refine_reselects_without_recomputing() {
    let s = setup();
    let base = s.root.join("base.jsonl");
    attribute(&s, &base, &["--steps", "4"]).success();
    let direct = s.root.join("direct.jsonl");
    let settings = ["--threshold", "0.3", "--share", "0.5", "--min-prompts", "2"];
    attribute(&s, &direct, &[&["--steps", "4"][..], &settings].concat()).success();
    let refined = common::kn()
        .arg("refine")
        .args(settings)
        .arg("--input")
        .arg(&base)
        .assert()
        .success();
    let got: Vec<FactRecord> = String::from_utf8_lossy(&refined.get_output().stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!got.is_empty());
    assert_eq!(got, records(&direct));

    common::kn()
        .args(["refine", "--threshold", "0.05", "--input"])
        .arg(&base)
        .assert()
        .code(1)
        .stderr(contains("below the 0.1 down to which its scores were kept"));

    let adaptive = common::kn()
        .args(["refine", "--adaptive", "--input"])
        .arg(&base)
        .assert()
        .success();
    let adaptive: Vec<FactRecord> = String::from_utf8_lossy(&adaptive.get_output().stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let base_records = records(&base);
    assert!(!base_records.is_empty());
    assert_eq!(adaptive.len(), base_records.len(), "one record per fact");
    // Per relation: one share, moved in steps of 0.05 until the mean refined set has 2
    // to 5 neurons, or 6 steps were taken.
    let mut by_relation: std::collections::BTreeMap<_, Vec<&FactRecord>> = Default::default();
    for (r, b) in adaptive.iter().zip(&base_records) {
        assert_eq!(r.id, b.id);
        assert_eq!(r.params.adaptive, Some(true));
        by_relation.entry(r.relation.clone()).or_default().push(r);
    }
    for (relation, facts) in by_relation {
        let share = facts[0].params.share;
        assert!(
            facts.iter().all(|r| r.params.share == share),
            "{relation:?}"
        );
        let steps = (share - 0.7) / 0.05;
        assert!(
            (steps - steps.round()).abs() < 1e-9 && steps.abs() <= 6.0 + 1e-9,
            "{relation:?}: {share}"
        );
        let mean = facts.iter().map(|r| r.refined.len()).sum::<usize>() as f64 / facts.len() as f64;
        assert!(
            steps.abs() > 6.0 - 1e-9 || (2.0..=5.0).contains(&mean),
            "{relation:?}: share {share}, mean {mean} refined neurons"
        );
    }
}

/// Σ attributions = P(1) − P(0): midpoint and Gauss–Legendre reach 0.1% where the
/// left Riemann sum (the released code) does not, at the same m = 20.
#[test]
fn midpoint_and_gauss_are_complete_where_left_is_not() {
    const STD: f32 = 0.2;
    // Weights of σ = 0.2: with σ = 0.5 the random network's P(α) is so rough that the
    // midpoint rule needs more than 20 points (3.8% error there; Gauss 0.015%).
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model_with_std(dir.path(), Layout::default(), STD);
    let worst = |rule: Rule| -> f64 {
        let source = kn::model::ModelSource::Local(model.clone());
        let files = kn::model::ModelFiles::locate(&source).unwrap();
        let lm = kn::model::LoadedModel::load(files, DType::F32, &Device::Cpu).unwrap();
        let mut options = AttributeOptions::paper(Method::IntegratedGradients);
        options.ig.rule = rule;
        let attributor = Attributor::new(lm, options).unwrap();
        let mut worst = 0f64;
        for prompt in [
            "the capital of france is [MASK] .",
            "[MASK] is the capital of germany .",
        ] {
            for c in attributor.scores(prompt, "paris").unwrap().completeness {
                assert!(
                    c.target.abs() > 1e-3,
                    "layer {}: target too small to judge",
                    c.layer
                );
                worst = worst.max(c.relative_error());
            }
        }
        worst
    };
    let (left, midpoint, gauss) = (worst(Rule::Left), worst(Rule::Midpoint), worst(Rule::Gauss));
    // Measured: left 1.8%, midpoint 0.024%, Gauss 0.00025%.
    assert!(left > 1e-2, "left {left}");
    assert!(midpoint <= 1e-3, "midpoint {midpoint}");
    assert!(gauss <= 1e-3, "gauss {gauss}");
}

/// The accurate mode: adaptive Gauss–Kronrod keeps every score within its tolerance of
/// the exact integral (a 160-point Gauss–Legendre sum, f64) on a random BERT rough
/// enough that 20 midpoint points miss by 3.8%, and on a tiny Llama; a looser tolerance
/// takes fewer points and errs more, and the record's error estimate is an upper bound.
#[test]
fn gauss_kronrod_meets_its_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let bert = common::tiny_model_with_std(dir.path(), Layout::default(), 0.5);
    let llama = common::tiny_decoder("llama-untied");
    let cases = [
        (
            bert,
            "paris",
            [
                "the capital of france is [MASK] .",
                "[MASK] is the capital of germany .",
            ],
        ),
        (
            llama,
            "capital",
            ["Paris is the [MASK]", "Berlin is a [MASK]."],
        ),
    ];
    for (model, answer, prompts) in cases {
        let source = kn::model::ModelSource::Local(model.clone());
        let files = kn::model::ModelFiles::locate(&source).unwrap();
        let lm = kn::model::LoadedModel::load(files, DType::F32, &Device::Cpu).unwrap();
        let attributor = |rule: Rule, steps: usize, tolerance: Option<f64>| {
            let mut options = AttributeOptions::paper(Method::IntegratedGradients);
            options.ig.rule = rule;
            options.ig.steps = steps;
            options.ig.tolerance = tolerance;
            options.precision = kn::attribution::record::Precision::F64;
            Attributor::new(lm.clone(), options).unwrap()
        };
        let exact = attributor(Rule::Gauss, 160, None);
        for prompt in prompts {
            let reference = exact.scores(prompt, answer).unwrap();
            let p = reference.gold_probability;
            let mut runs = Vec::new();
            for tolerance in [1e-2, 1e-6] {
                let got = attributor(Rule::GaussKronrod, 15, Some(tolerance))
                    .scores(prompt, answer)
                    .unwrap();
                let error = got
                    .scores
                    .iter()
                    .flatten()
                    .zip(reference.scores.iter().flatten())
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .fold(0.0, f64::max)
                    / p;
                let estimate = got.error_estimate.expect("an estimate");
                eprintln!(
                    "{}: {prompt:?} tolerance {tolerance:e}: error {error:.2e}, estimate \
                     {estimate:.2e}, {} points",
                    model.display(),
                    got.points
                );
                // f32 scores: 1e-7 of P is rounding, not integration.
                assert!(
                    error <= tolerance + 1e-7,
                    "{prompt:?}: error {error:e} > {tolerance:e}"
                );
                assert!(estimate <= tolerance, "{prompt:?}: estimate {estimate:e}");
                assert!(
                    error <= estimate + 1e-7,
                    "{prompt:?}: the estimate is no bound"
                );
                runs.push((error, got.points));
            }
            let layers = lm.config.num_hidden_layers;
            let ((loose_error, loose_points), (tight_error, tight_points)) = (runs[0], runs[1]);
            assert!(loose_points >= 15 * layers && tight_points > loose_points);
            assert!(
                tight_error < loose_error,
                "{tight_error:e} vs {loose_error:e}"
            );
        }
    }
}

/// `--tolerance` on the command line: recorded in the parameters, each prompt's points
/// and error estimate in its record, and out-of-range or conflicting values refused.
#[test]
fn tolerance_is_recorded_and_checked() {
    let s = setup();
    let out = s.root.join("kronrod.jsonl");
    attribute(&s, &out, &["--tolerance", "1e-4"]).success();
    for r in records(&out) {
        assert_eq!(r.params.rule, Some(Rule::GaussKronrod));
        assert_eq!((r.params.steps, r.params.tolerance), (Some(15), Some(1e-4)));
        for p in &r.prompts {
            assert!(p.points.unwrap() >= 15 * 2, "{:?}", p.points);
            assert!(p.error_estimate.unwrap() <= 1e-4);
        }
    }
    for (args, message) in [
        (
            &["--tolerance", "0"][..],
            "--tolerance must be between 0 and 1",
        ),
        (
            &["--tolerance", "1e-3", "--rule", "midpoint"][..],
            "--tolerance is for --rule gauss-kronrod",
        ),
    ] {
        let out = s.root.join("refused.jsonl");
        attribute(&s, &out, args)
            .failure()
            .stderr(contains(message));
        assert!(!out.exists(), "{args:?}: nothing written");
    }
}

#[test]
fn bad_facts_are_reported_and_the_rest_written() {
    let s = setup();
    let facts = s.root.join("bad.jsonl");
    std::fs::write(
        &facts,
        [
            r#"{"id": "ok", "answer": "paris", "prompts": ["the capital of france is [MASK] ."]}"#,
            r#"{"id": "no-prompts", "answer": "paris", "prompts": []}"#,
            r#"{"id": "no-answer", "prompts": ["the [MASK] ."]}"#,
            r#"{"id": "two-tokens", "answer": "capitals", "prompts": ["the [MASK] ."]}"#,
            r#"{"id": "glued", "answer": "city", "prompts": ["the capital of france is [MASK] .", "the [MASK]s of france ."]}"#,
            r#"{"id": "no-mask", "answer": "paris", "prompts": ["the capital of france is paris ."]}"#,
            "[1, 2",
        ]
        .join("\n"),
    )
    .unwrap();
    let shown = facts.display().to_string();
    let out = common::kn()
        .args(["attribute", "--steps", "2", "--model"])
        .arg(&s.model)
        .arg("--fact")
        .arg(&facts)
        .assert()
        .code(1)
        .stderr(contains(format!("{shown}:2: the fact has no prompts")))
        .stderr(contains(format!("{shown}:3: the fact has no \"answer\"")))
        .stderr(contains(format!(r###"{shown}:4: answer "capitals" is not a single token of the vocabulary: it becomes ["capital", "##s"]"###)))
        .stderr(contains(format!(r###"{shown}:5: prompt 2: the answer "city" does not stand as its own token here"###)))
        .stderr(contains(format!("{shown}:6: prompt 1: prompt has no [MASK]")))
        .stderr(contains(format!("{shown}:7: not a valid record")));
    let written = common::json_lines(&out.get_output().stdout);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["id"], "ok");
}

#[test]
fn resume_needs_a_file() {
    let s = setup();
    attribute(&s, Path::new("-"), &["--resume"])
        .code(1)
        .stderr(contains("--resume needs --out FILE"));
}

/// P(answer) at `prompt`'s mask with layer `layer`'s activations there scaled by `alpha`,
/// through the model's own forward (src/model, not the attribution engine) in f64.
fn scaled_probability(
    lm: &kn::model::LoadedModel,
    prompt: &str,
    answer: u32,
    layer: usize,
    alpha: f64,
) -> f64 {
    use kn::model::{Neuron, NeuronOp, NeuronPatch};
    let encoded = lm.tokenizer.encode_prompt(prompt).unwrap();
    let patch = NeuronPatch {
        positions: vec![encoded.mask_position],
        edits: (0..lm.config.intermediate_size)
            .map(|index| (Neuron { layer, index }, NeuronOp::Scale(alpha)))
            .collect(),
    };
    let ids = candle_core::Tensor::new(encoded.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<f64> = lm
        .model
        .logits_at(&ids, None, &[encoded.mask_position], &patch)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let top = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
    let total: f64 = logits.iter().map(|&x| (x - top).exp()).sum();
    (logits[answer as usize] - top).exp() / total
}

/// The left rule is what the paper's released code computes: per layer, the scores sum
/// to (1/m) Σ_{k<m} P′(k/m), where P(α) is the gold probability with the layer's
/// activations at the mask scaled by α. P′ comes from central finite differences of
/// P(α) through the model's forward in f64, independent of the attribution engine, whose
/// default f32 scores (its own activation slopes, rotary and products) are checked.
#[test]
fn left_rule_scores_sum_the_slopes_of_p_at_k_over_m() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), Layout::default());
    let files = || kn::model::ModelFiles::locate(&kn::model::ModelSource::Local(model.clone()));
    let lm = kn::model::LoadedModel::load(files().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let exact = kn::model::LoadedModel::load(files().unwrap(), DType::F64, &Device::Cpu).unwrap();
    let answer = lm.tokenizer.answer_id("paris").unwrap();
    let h = 1e-4;
    for steps in [1, 20] {
        let mut options = AttributeOptions::paper(Method::IntegratedGradients);
        options.ig.steps = steps;
        assert_eq!(options.ig.rule, Rule::Left);
        let attributor = Attributor::new(lm.clone(), options).unwrap();
        for prompt in [
            "the capital of france is [MASK] .",
            "[MASK] is the capital of germany .",
        ] {
            let scores = attributor.scores(prompt, "paris").unwrap();
            assert_eq!(scores.completeness.len(), lm.config.num_hidden_layers);
            for c in &scores.completeness {
                let p = |alpha: f64| scaled_probability(&exact, prompt, answer, c.layer, alpha);
                let slope = |alpha: f64| (p(alpha + h) - p(alpha - h)) / (2.0 * h);
                let want = (0..steps)
                    .map(|k| slope(k as f64 / steps as f64))
                    .sum::<f64>()
                    / steps as f64;
                // f32 scores summed over the layer: 1e-4 of the sum (measured at most 1.8e-5).
                assert!(
                    (c.sum - want).abs() <= 1e-4 * want.abs().max(1e-4),
                    "m = {steps} {prompt:?} layer {}: Σ scores {} vs (1/m) Σ P′(k/m) {want}",
                    c.layer,
                    c.sum
                );
                // And the target is P(1) − P(0).
                assert!((c.target - (p(1.0) - p(0.0))).abs() <= 1e-6, "target");
            }
        }
    }
}
