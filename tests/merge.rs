//! `kn merge` on real shards of `kn attribute` over the bundled fact model: the shards
//! merge to the whole run; identical duplicates are kept once; differing duplicates,
//! other parameters, another model and a cut-off record are refused with file, line and
//! what differs. And the bad outputs of `kn attribute` around sharding: a shard spec out
//! of range, a full disk (/dev/full), an output folder that cannot be written.

use crate::common;

use std::path::{Path, PathBuf};

use common::kn;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/fact-model");

/// The first `n` facts of the bundled fact model, written into `dir`.
fn facts(dir: &Path, n: usize) -> PathBuf {
    let all =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/facts.jsonl")).unwrap();
    let text: String = all.split_inclusive('\n').take(n).collect();
    let path = dir.join("facts.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// `kn attribute` on the fact model; `extra` flags (e.g. a shard) appended.
fn attribute(facts: &Path, out: &Path, extra: &[&str]) {
    kn().args(["attribute", "--quiet", "--model", MODEL, "--fact"])
        .arg(facts)
        .arg("--out")
        .arg(out)
        .args(extra)
        .assert()
        .success();
}

fn sorted_lines(bytes: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

/// A whole run of 9 facts and its three shards.
struct Run {
    dir: tempfile::TempDir,
    whole: PathBuf,
    shards: Vec<PathBuf>,
}

fn run() -> Run {
    let dir = tempfile::tempdir().unwrap();
    let facts = facts(dir.path(), 9);
    let whole = dir.path().join("whole.jsonl");
    attribute(&facts, &whole, &[]);
    let shards: Vec<PathBuf> = (1..=3)
        .map(|k| {
            let out = dir.path().join(format!("kn.{k}.jsonl"));
            attribute(&facts, &out, &["--shard", &format!("{k}/3")]);
            out
        })
        .collect();
    Run { dir, whole, shards }
}

fn merge(inputs: &[&Path], out: &Path) -> assert_cmd::assert::Assert {
    kn().arg("merge")
        .args(inputs)
        .arg("--out")
        .arg(out)
        .assert()
}

fn lines_of(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

#[test]
fn shards_merge_to_the_whole_run_and_identical_duplicates_are_kept_once() {
    let run = run();
    let counts: Vec<usize> = run.shards.iter().map(|s| lines_of(s)).collect();
    assert_eq!(counts.iter().sum::<usize>(), 9);
    assert!(
        counts.iter().all(|&c| c > 0),
        "every shard has facts: {counts:?}"
    );

    let merged = run.dir.path().join("merged.jsonl");
    let shards: Vec<&Path> = run.shards.iter().map(PathBuf::as_path).collect();
    merge(&shards, &merged)
        .success()
        .stderr("kn: merged 3 file(s): 9 records written, 0 identical duplicate(s) dropped\n");
    let merged_bytes = std::fs::read(&merged).unwrap();
    let whole_bytes = std::fs::read(&run.whole).unwrap();
    assert_eq!(merged_bytes.len(), whole_bytes.len());
    assert_eq!(sorted_lines(&merged_bytes), sorted_lines(&whole_bytes));
    // Records are copied in the order of the files given and of their lines.
    let first = std::fs::read(&run.shards[0]).unwrap();
    assert!(merged_bytes.starts_with(&first));

    // A shard given twice (an overlapping rerun) and the whole run over its shards: every
    // copy is identical, so each fact is kept once.
    let again = run.dir.path().join("again.jsonl");
    merge(
        &[shards[0], shards[1], shards[0], &run.whole, shards[2]],
        &again,
    )
    .success()
    .stderr(format!(
        "kn: merged 5 file(s): 9 records written, {} identical duplicate(s) dropped\n",
        counts[0] + 9
    ));
    assert_eq!(
        sorted_lines(&std::fs::read(&again).unwrap()),
        sorted_lines(&whole_bytes)
    );

    // stdout, and an existing --out is refused without --force.
    let out = kn().arg("merge").args(&shards).assert().success();
    assert_eq!(
        sorted_lines(&out.get_output().stdout),
        sorted_lines(&whole_bytes)
    );
    merge(&shards, &merged)
        .failure()
        .stderr(predicates::str::contains("exists; use --force"));
}

/// A copy of `from` with line `line` (1-based) changed by `edit`.
fn edited(from: &Path, to: &Path, line: usize, edit: impl Fn(&mut serde_json::Value)) {
    let text = std::fs::read_to_string(from).unwrap();
    let mut out = String::new();
    for (i, l) in text.lines().enumerate() {
        if i + 1 == line {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            edit(&mut v);
            out += &serde_json::to_string(&v).unwrap();
        } else {
            out += l;
        }
        out.push('\n');
    }
    std::fs::write(to, out).unwrap();
}

#[test]
fn mismatched_shards_and_cut_off_records_are_refused_with_what_differs() {
    let run = run();
    let d = run.dir.path();
    let merged = d.join("merged.jsonl");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&run.shards[0])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let id = first["id"].to_string();

    // The same fact twice, the copies different.
    let changed = d.join("changed.jsonl");
    edited(&run.shards[0], &changed, 1, |v| {
        v["prompts"][0]["gold_probability"] = serde_json::json!(0.5);
        v["answer_id"] = serde_json::json!(7);
    });
    let out = merge(&[&run.shards[0], &changed], &merged)
        .failure()
        .code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    let at = format!("{}:1", run.shards[0].display());
    assert!(
        stderr.contains(&format!(
            "{}:1: fact id {id} is also at {at}",
            changed.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("the two records differ: answer_id 7 here"),
        "{stderr}"
    );
    assert!(stderr.contains("prompts differs"), "{stderr}");
    assert!(!merged.exists(), "a refused merge writes nothing");

    // Other parameters: a shard of another run.
    let facts = facts(d, 9);
    let other = d.join("other.jsonl");
    attribute(&facts, &other, &["--shard", "2/3", "--threshold", "0.3"]);
    let out = merge(&[&run.shards[0], &other], &merged).failure().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!(
            "{}:1: made with other parameters than {at}: threshold 0.3 here, 0.2 there",
            other.display()
        )),
        "{stderr}"
    );

    // Another model.
    let model = d.join("model.jsonl");
    edited(&run.shards[1], &model, 1, |v| {
        v["model"]["weights_sha256"] = serde_json::json!("0123abcd");
    });
    let out = merge(&[&run.shards[0], &model], &merged).failure().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!(
            "{}:1: made with another model than {at}: weights_sha256 0123abcd",
            model.display()
        )),
        "{stderr}"
    );

    // A record cut off mid-write (a killed task, a full disk): not done, refused.
    let cut = d.join("cut.jsonl");
    let mut bytes = std::fs::read(&run.shards[1]).unwrap();
    let lines = bytes.iter().filter(|&&b| b == b'\n').count();
    let other = std::fs::read_to_string(&run.shards[2]).unwrap();
    let record = other.lines().next().unwrap();
    bytes.extend_from_slice(&record.as_bytes()[..record.len() / 2]);
    std::fs::write(&cut, &bytes).unwrap();
    let out = merge(&[&run.shards[0], &cut], &merged).failure().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!(
            "{}:{}: the last record is cut off",
            cut.display(),
            lines + 1
        )),
        "{stderr}"
    );
    assert!(stderr.contains("kn attribute --resume"), "{stderr}");
    assert!(!merged.exists());
}

#[test]
fn shard_specs_out_of_range_are_usage_errors() {
    for (spec, message) in [
        (
            "4/3",
            "\"4/3\": shard 4 is out of range: K must be between 1 and N = 3",
        ),
        (
            "0/3",
            "\"0/3\": shard 0 is out of range: K must be between 1 and N = 3",
        ),
        ("1/0", "\"1/0\": N must be at least 1"),
        ("2", "\"2\": expected K/N with 1 ≤ K ≤ N, e.g. 3/8"),
    ] {
        kn().args([
            "attribute",
            "--model",
            MODEL,
            "--fact",
            "-",
            "--shard",
            spec,
        ])
        .assert()
        .failure()
        .code(2)
        .stderr(predicates::str::contains(message));
    }
}

#[test]
fn a_full_disk_is_an_error_that_says_no_partial_record_counts_as_done() {
    if !Path::new("/dev/full").exists() {
        panic!("/dev/full is missing: this test needs Linux's full device");
    }
    let dir = tempfile::tempdir().unwrap();
    let facts = facts(dir.path(), 2);
    let out = kn()
        .args(["attribute", "--quiet", "--model", MODEL, "--fact"])
        .arg(&facts)
        .args(["--out", "/dev/full", "--force"])
        .assert()
        .failure()
        .code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains("kn: /dev/full: cannot write record 1: No space left on device"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the 0 record(s) before it are complete, and a partly written last line is not counted as done"),
        "{stderr}"
    );
}

#[test]
fn an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let facts = facts(dir.path(), 1);
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    for out in [file.join("kn.jsonl"), dir.path().join("missing/kn.jsonl")] {
        let folder = out.parent().unwrap().to_path_buf();
        // The model does not exist: the error is about the output, so it came first.
        kn().args(["attribute", "--model", "/nonexistent/model", "--fact"])
            .arg(&facts)
            .arg("--out")
            .arg(&out)
            .assert()
            .failure()
            .code(1)
            .stderr(format!(
                "kn: {}: cannot write it: the folder {} does not exist (or is not a folder)\n",
                out.display(),
                folder.display()
            ));
    }
    // A merge into such a folder says so too, and leaves nothing behind.
    let shard = dir.path().join("kn.1.jsonl");
    attribute(&facts, &shard, &[]);
    let out = dir.path().join("missing/merged.jsonl");
    let assert = merge(&[&shard], &out).failure().code(1);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!("{}: cannot open for writing", out.display())),
        "{stderr}"
    );
}

/// A hand-made `kn attribute` record of fact `id` with these parameters.
fn record_with(id: usize, params: &serde_json::Value) -> String {
    serde_json::json!({
        "id": id, "relation": "P36", "answer": "paris", "answer_id": 10, "refined": [],
        "prompts": [{"prompt": "[MASK] .", "mask_position": 1, "gold_probability": 0.5,
                     "max_score": 1.0, "coarse": [], "kept": []}],
        "model": {"source": "m", "weights_sha256": "00"},
        "params": params,
        "kn_version": "0"
    })
    .to_string()
        + "\n"
}

/// Every parameter is compared: shards that differ in any one of them alone are
/// refused, naming it; adaptive shards of different relations may differ in the share.
#[test]
fn every_parameter_is_compared() {
    let dir = tempfile::tempdir().unwrap();
    let base = serde_json::json!({"method": "integrated-gradients", "steps": 20, "rule": "left",
        "threshold": 0.2, "share": 0.7, "min_prompts": 3, "keep": 0.1});
    let first = dir.path().join("first.jsonl");
    std::fs::write(&first, record_with(1, &base)).unwrap();
    let merged = dir.path().join("merged.jsonl");
    let variants = [
        ("method", serde_json::json!("activation")),
        ("steps", serde_json::json!(21)),
        ("rule", serde_json::json!("midpoint")),
        ("tolerance", serde_json::json!(0.001)),
        ("threshold", serde_json::json!(0.3)),
        ("share", serde_json::json!(0.6)),
        ("min_prompts", serde_json::json!(2)),
        ("keep", serde_json::json!(0.05)),
        ("adaptive", serde_json::json!(true)),
        ("precision", serde_json::json!("f64")),
    ];
    for (key, value) in variants {
        let mut params = base.clone();
        params[key] = value.clone();
        let other = dir.path().join(format!("{key}.jsonl"));
        std::fs::write(&other, record_with(2, &params)).unwrap();
        let out = merge(&[&first, &other], &merged).failure().code(1);
        let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
        assert!(
            stderr.contains(&format!(
                "{}:1: made with other parameters than {}:1: {key} {value} here",
                other.display(),
                first.display()
            )),
            "{key}: {stderr}"
        );
        assert!(!merged.exists(), "{key}: a refused merge writes nothing");
    }
    // Adaptive shares are chosen per relation: those may differ, nothing else.
    let mut adaptive = base.clone();
    adaptive["adaptive"] = serde_json::json!(true);
    let a = dir.path().join("a.jsonl");
    std::fs::write(&a, record_with(1, &adaptive)).unwrap();
    adaptive["share"] = serde_json::json!(0.65);
    let b = dir.path().join("b.jsonl");
    std::fs::write(&b, record_with(2, &adaptive)).unwrap();
    merge(&[&a, &b], &merged).success();
    assert_eq!(lines_of(&merged), 2);
}
