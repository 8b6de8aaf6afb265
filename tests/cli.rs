//! The `kn` binary end to end: output records, and bad input reported with file and
//! line while the other lines go on.

use crate::common;

use kn::model::random::Layout;
use predicates::str::contains;

#[test]
fn bad_lines_are_reported_with_file_and_line_and_others_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir.path().join("model"), Layout::default());
    let long = format!("{} [MASK]", "the city ".repeat(20));
    let lines = [
        r#"{"prompt": "the capital of france is [MASK] .", "answer": "paris", "id": 7}"#
            .to_string(),
        r#"{not json"#.to_string(),
        r#"{"prompt": "the capital of france is paris ."}"#.to_string(),
        r#"{"prompt": "[MASK] capital [MASK]"}"#.to_string(),
        r#"{"prompt": "the [MASK] .", "answer": "capitals"}"#.to_string(),
        r#"{"prompt": "the [MASK] .", "answer": "london"}"#.to_string(),
        format!(r#"{{"prompt": "{long}"}}"#),
        r#"{"answer": "paris"}"#.to_string(),
        String::new(),
        r#"{"id": "two", "prompts": ["the city of [MASK] .", "[MASK] is the capital ."]}"#
            .to_string(),
    ];
    let input = dir.path().join("prompts.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let shown = input.display().to_string();
    let out = common::kn()
        .args(["predict", "--top-k", "3", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .assert()
        .code(1)
        .stderr(contains(format!("{shown}:2: not a valid record")))
        .stderr(contains(format!("{shown}:3: prompt has no [MASK]")))
        .stderr(contains(format!("{shown}:4: prompt has 2 [MASK] tokens")))
        .stderr(contains(format!(r###"{shown}:5: answer "capitals" is not a single token of the vocabulary: it becomes ["capital", "##s"]"###)))
        .stderr(contains(format!(r#"{shown}:6: answer "london" is not in the vocabulary (it becomes [UNK])"#)))
        .stderr(contains(format!("{shown}:7: prompt is 43 tokens long; the model takes at most 32")))
        .stderr(contains(format!(r#"{shown}:8: has neither "prompt" nor "prompts""#)))
        .stderr(contains("7 input line(s) could not be processed"));
    let records = common::json_lines(&out.get_output().stdout);
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["line"], 1);
    assert_eq!(records[0]["id"], 7);
    assert_eq!(records[0]["mask_position"], 6);
    assert_eq!(records[0]["answer_id"], 10);
    assert_eq!(records[0]["predictions"].as_array().unwrap().len(), 3);
    let p = records[0]["answer_probability"].as_f64().unwrap();
    let rank = records[0]["answer_rank"].as_u64().unwrap() as usize;
    let better = records[0]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["probability"].as_f64().unwrap() > p)
        .count();
    assert!(
        rank > better.min(2),
        "rank {rank} vs {better} listed tokens above it"
    );
    // The rank against the whole distribution: every token of the vocabulary listed.
    let vocab = common::TINY_VOCAB.len();
    let full = common::kn()
        .args(["predict", "--top-k", &vocab.to_string(), "--model"])
        .arg(&model)
        .arg("--input")
        .arg("-")
        .write_stdin(format!("{}\n", lines[0]))
        .assert()
        .success();
    let full = &common::json_lines(&full.get_output().stdout)[0];
    let all = full["predictions"].as_array().unwrap();
    assert_eq!(all.len(), vocab);
    let listed = all
        .iter()
        .find(|t| t["id"] == 10)
        .expect("the answer among all tokens")["probability"]
        .as_f64()
        .unwrap();
    // Batched with the other lines, the answer's probability differs in rounding only.
    let alone = full["answer_probability"].as_f64().unwrap();
    assert_eq!(listed, alone);
    assert!((alone - p).abs() <= 1e-6 * p, "{alone} alone, {p} batched");
    let above = all
        .iter()
        .filter(|t| t["probability"].as_f64().unwrap() > alone)
        .count();
    assert_eq!(rank, above + 1, "rank against the whole vocabulary");
    assert_eq!(full["answer_rank"], records[0]["answer_rank"]);
    for (record, index) in records[1..].iter().zip(0..) {
        assert_eq!(record["line"], 10);
        assert_eq!(record["id"], "two");
        assert_eq!(record["prompt_index"], index);
        assert!(record.get("answer").is_none());
    }
}

#[test]
fn fail_fast_stops_at_the_first_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir.path().join("model"), Layout::default());
    let input = "{\"prompt\": \"no mask\"}\n{\"prompt\": \"the [MASK] .\"}\n";
    let out = common::kn()
        .args(["predict", "--fail-fast", "--model"])
        .arg(&model)
        .write_stdin(input)
        .assert()
        .code(1)
        .stderr(contains("<stdin>:1: prompt has no [MASK]"));
    assert!(out.get_output().stdout.is_empty());
}

#[test]
fn stdin_is_the_default_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir.path().join("model"), Layout::default());
    let out = common::kn()
        .args(["predict", "--quiet", "--model"])
        .arg(&model)
        .write_stdin("{\"prompt\": \"the capital of [MASK] is paris .\"}\n")
        .assert()
        .success()
        .stderr("");
    let records = common::json_lines(&out.get_output().stdout);
    assert_eq!(records.len(), 1);
    let probs: f64 = records[0]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["probability"].as_f64().unwrap())
        .sum();
    assert!(probs > 0.0 && probs <= 1.0 + 1e-6);
}

#[test]
fn missing_and_broken_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"the [MASK] .\"}\n").unwrap();
    let run = |model: &std::path::Path| {
        common::kn()
            .args(["predict", "--model"])
            .arg(model)
            .arg("--input")
            .arg(&input)
            .assert()
            .code(1)
    };

    run(&dir.path().join("nope")).stderr(contains("no such model directory"));

    let no_weights = common::tiny_model(&dir.path().join("no-weights"), Layout::default());
    std::fs::remove_file(no_weights.join("model.safetensors")).unwrap();
    run(&no_weights).stderr(contains("no model.safetensors or pytorch_model.bin"));

    let truncated = common::tiny_model(&dir.path().join("truncated"), Layout::default());
    let weights = truncated.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    run(&truncated)
        .stderr(contains(weights.display().to_string()))
        .stderr(contains("cannot read weights (truncated or corrupt?)"));

    let truncated_bin = dir.path().join("truncated-bin");
    common::copy_dir(&common::antiberty(), &truncated_bin);
    let bin = truncated_bin.join("pytorch_model.bin");
    let file = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
    file.set_len(file.metadata().unwrap().len() / 3).unwrap();
    run(&truncated_bin)
        .stderr(contains(bin.display().to_string()))
        .stderr(contains("cannot read weights (truncated or corrupt?)"));

    let bad_config = common::tiny_model(&dir.path().join("bad-config"), Layout::default());
    std::fs::write(
        bad_config.join("config.json"),
        "{\"vocab_size\": 18, \"hidden_size\": ",
    )
    .unwrap();
    run(&bad_config).stderr(contains("config.json: not valid JSON"));

    run(&common::minilm()).stderr(contains("no masked-LM head"));

    common::kn()
        .args(["predict", "--model"])
        .arg(common::tiny_model(
            &dir.path().join("ok"),
            Layout::default(),
        ))
        .arg("--input")
        .arg(dir.path().join("missing.jsonl"))
        .assert()
        .code(1)
        .stderr(contains("missing.jsonl: No such file"));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_cpu_build_names_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir.path().join("model"), Layout::default());
    common::kn()
        .args(["predict", "--device", "cuda:0", "--model"])
        .arg(&model)
        .write_stdin("")
        .assert()
        .code(1)
        .stderr(contains("built without CUDA support"))
        .stderr(contains("--features cuda"));
}

#[test]
fn usage_errors_exit_2() {
    common::kn()
        .args(["predict"])
        .assert()
        .code(2)
        .stderr(contains("--model"));
    common::kn()
        .args(["predict", "--model", "x", "--device", "tpu"])
        .assert()
        .code(2)
        .stderr(contains("unknown device"));
}

#[test]
fn closed_stdout_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir.path().join("model"), Layout::default());
    let input: String = (0..2000)
        .map(|_| "{\"prompt\": \"the capital of [MASK] .\"}\n")
        .collect();
    let input_path = dir.path().join("many.jsonl");
    std::fs::write(&input_path, input).unwrap();
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' predict --quiet --model '{}' --input '{}' | head -n 1 >/dev/null",
            assert_cmd::cargo::cargo_bin("kn").display(),
            model.display(),
            input_path.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "kn … | head exited {status}");
}
