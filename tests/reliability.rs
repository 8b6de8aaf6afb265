//! Issue #29, "nothing lost, nothing written where it was not asked": each test is one
//! of the issue's findings, run on the real binary as a hostile user would (see
//! docs/reliability.md for the promises they check).

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kn::model::random::Layout;
use predicates::str::contains;

const FACTS: &str = r#"{"id": "fr", "relation": "capital", "answer": "paris", "prompts": ["the capital of france is [MASK] .", "[MASK] is the capital of france ."]}
{"id": "de", "relation": "capital", "answer": "berlin", "prompts": ["the capital of germany is [MASK] .", "[MASK] is the capital of germany ."]}
"#;

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    facts: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = common::tiny_model(&dir.path().join("model"), Layout::default());
        let facts = dir.path().join("facts.jsonl");
        std::fs::write(&facts, FACTS).unwrap();
        Self { dir, model, facts }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn kn(&self) -> assert_cmd::Command {
        let mut cmd = common::kn();
        cmd.env("KN_CACHE_DIR", self.path("kn-cache"));
        cmd
    }

    fn attribute(&self, model: &Path, facts: &Path, out: &Path) -> assert_cmd::Command {
        let mut cmd = self.kn();
        cmd.args(["attribute", "--quiet", "--steps", "2", "--model"])
            .arg(model)
            .arg("--fact")
            .arg(facts)
            .arg("--out")
            .arg(out);
        cmd
    }

    /// The names in the temporary folder that start with a dot (what runs leave beside
    /// their outputs), sorted.
    fn hidden(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        names.sort();
        names
    }
}

fn ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect()
}

// 1. `--resume` truncated a file before checking that it was kn's.
#[test]
fn resume_refuses_a_file_that_is_not_kn_records_and_leaves_it_untouched() {
    let s = Setup::new();
    let blob = s.path("weights.bin");
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&blob, &bytes).unwrap();
    let notes = s.path("notes.txt");
    std::fs::write(&notes, "first line\nlast line without newline").unwrap();
    for (file, before) in [
        (&blob, bytes.clone()),
        (&notes, std::fs::read(&notes).unwrap()),
    ] {
        s.attribute(&s.model, &s.facts, file)
            .arg("--resume")
            .assert()
            .code(1)
            .stderr(contains("refusing to --resume"))
            .stderr(contains("the file was not changed"));
        assert_eq!(std::fs::read(file).unwrap(), before, "{}", file.display());
    }
    // A record cut off by a kill is still dropped and redone.
    let out = s.path("r.jsonl");
    s.attribute(&s.model, &s.facts, &out).assert().success();
    let whole = std::fs::read_to_string(&out).unwrap();
    let first_line_end = whole.find('\n').unwrap() + 1;
    std::fs::write(&out, &whole[..first_line_end + 20]).unwrap();
    s.attribute(&s.model, &s.facts, &out)
        .arg("--resume")
        .assert()
        .success();
    assert_eq!(ids(&out), ["\"fr\"", "\"de\""]);
}

// 2. An output that is also an input was overwritten.
#[test]
fn an_output_that_is_an_input_is_refused_before_anything_is_written() {
    let s = Setup::new();
    let weights = s.model.join("model.safetensors");
    let weights_before = std::fs::read(&weights).unwrap();
    let facts_before = std::fs::read(&s.facts).unwrap();
    let link = s.path("link.jsonl");
    std::os::unix::fs::symlink(&s.facts, &link).unwrap();
    for out in [&s.facts, &link, &weights] {
        for flag in ["--force", "--resume"] {
            s.attribute(&s.model, &s.facts, out)
                .arg(flag)
                .assert()
                .code(1)
                .stderr(contains("is also an input"));
        }
    }
    assert_eq!(std::fs::read(&s.facts).unwrap(), facts_before);
    assert_eq!(std::fs::read(&weights).unwrap(), weights_before);

    // refine, and an edit whose --out is the model directory itself.
    let records = s.path("r.jsonl");
    s.attribute(&s.model, &s.facts, &records).assert().success();
    let records_before = std::fs::read(&records).unwrap();
    s.kn()
        .args(["refine", "--force", "--input"])
        .arg(&records)
        .arg("--out")
        .arg(&records)
        .assert()
        .code(1)
        .stderr(contains("is also an input"));
    assert_eq!(std::fs::read(&records).unwrap(), records_before);
    s.kn()
        .args([
            "edit", "--quiet", "--force", "--erase", "capital", "--model",
        ])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&records)
        .arg("--out")
        .arg(&s.model)
        .assert()
        .code(1)
        .stderr(contains("is also an input"));
    assert_eq!(std::fs::read(&weights).unwrap(), weights_before);
}

/// A loopback server that answers every request as a hub file with the given ETag and
/// commit; it stops after `requests` connections.
fn hostile_hub(etag: &'static str, commit: &'static str, requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests).flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = b"{}";
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes 0-1/2\r\n\
                 ETag: \"{etag}\"\r\nX-Repo-Commit: {commit}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let mut stream = &stream;
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    endpoint
}

/// Every file under `root`, recursively.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

// 3. Revisions, ETags and commits were used as paths.
#[test]
fn hub_names_that_would_leave_the_cache_are_refused() {
    let s = Setup::new();
    let home = s.path("a/b/c/hf");
    std::fs::create_dir_all(&home).unwrap();
    let input = "{\"prompt\": \"the capital of france is [MASK] .\"}\n";
    let endpoint = hostile_hub("0123", "0123456789abcdef0123456789abcdef01234567", 16);
    for offline in [false, true] {
        let mut cmd = s.kn();
        cmd.args(["predict", "--quiet", "--model", "org/name", "--revision"])
            .arg("../../../../../escaped-rev")
            .env("HF_HOME", &home)
            .env("HF_ENDPOINT", &endpoint)
            .env_remove("HF_TOKEN")
            .write_stdin(input);
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        } else {
            cmd.env_remove("HF_HUB_OFFLINE");
        }
        cmd.assert().code(1).stderr(contains("--revision"));
    }
    for (etag, commit) in [
        (
            "../../../../escaped-etag",
            "0123456789abcdef0123456789abcdef01234567",
        ),
        ("0123abcd", "../../../../escaped-commit"),
    ] {
        let endpoint = hostile_hub(etag, commit, 16);
        s.kn()
            .args(["predict", "--quiet", "--model", "org/name"])
            .env("HF_HOME", &home)
            .env("HF_ENDPOINT", &endpoint)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .write_stdin(input)
            .assert()
            .code(1)
            .stderr(contains("not a hash"));
    }
    let outside: Vec<PathBuf> = files_under(s.dir.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("escaped"))
        .collect();
    assert!(outside.is_empty(), "written outside the cache: {outside:?}");
}

// 4. A huge prompt line was read and tokenized whole.
#[test]
fn overlong_lines_and_prompts_are_refused_before_tokenizing_and_the_rest_run() {
    let s = Setup::new();
    let facts = s.path("long.jsonl");
    let huge = "a ".repeat(1 << 20);
    let long = "a ".repeat(1500);
    let text = format!(
        "{}\n{{\"id\": \"huge\", \"answer\": \"paris\", \"prompt\": \"{huge}[MASK] .\"}}\n\
         {{\"id\": \"long\", \"answer\": \"paris\", \"prompt\": \"{long}[MASK] .\"}}\n{}",
        FACTS.lines().next().unwrap(),
        FACTS.lines().nth(1).unwrap()
    );
    std::fs::write(&facts, text).unwrap();
    let out = s.path("r.jsonl");
    let started = Instant::now();
    s.attribute(&s.model, &facts, &out)
        .assert()
        .code(1)
        .stderr(contains("long.jsonl:2: the line is longer than 1 MiB"))
        .stderr(contains("long.jsonl:3:"))
        .stderr(contains("prompt is 3008 bytes long"))
        .stderr(contains("refused before tokenizing"));
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(ids(&out), ["\"fr\"", "\"de\""]);
}

// 5. `kn completions bash | head -1` panicked.
#[test]
fn completions_into_a_closed_pipe_exit_zero() {
    for shell in ["bash", "zsh", "fish"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(assert_cmd::cargo::cargo_bin("kn"))
            .args(["completions", shell])
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{shell}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!String::from_utf8_lossy(&output.stderr).contains("panicked"));
    }
}

// 6. Duplicate fact ids were accepted.
#[test]
fn a_repeated_fact_id_is_refused_with_both_lines() {
    let s = Setup::new();
    let facts = s.path("dup.jsonl");
    let first = FACTS.lines().next().unwrap();
    std::fs::write(&facts, format!("{first}\n{FACTS}")).unwrap();
    let out = s.path("r.jsonl");
    for resume in [false, true] {
        let mut cmd = s.attribute(&s.model, &facts, &out);
        if resume {
            cmd.arg("--resume");
        }
        cmd.assert().code(1).stderr(contains(
            "dup.jsonl:2: fact id \"fr\" appears twice, on line 1 and on line 2",
        ));
        assert_eq!(ids(&out), ["\"fr\"", "\"de\""]);
    }
    // edit --update with one id twice: refused, nothing written.
    let update = s.path("update.jsonl");
    std::fs::write(
        &update,
        "{\"id\": \"fr\", \"new_answer\": \"rome\"}\n{\"id\": \"fr\", \"new_answer\": \"berlin\"}\n",
    )
    .unwrap();
    let edited = s.path("edited");
    s.kn()
        .args(["edit", "--quiet", "--min-correct", "0", "--model"])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&out)
        .arg("--update")
        .arg(&update)
        .arg("--out")
        .arg(&edited)
        .assert()
        .code(1)
        .stderr(contains("update.jsonl:2: fact id \"fr\" appears twice"));
    assert!(!edited.exists());
}

/// Starts `cmd` with stdin left open (the run waits on it) and waits until it holds the
/// lock of the output whose lock file is `lock`.
fn hold_lock(mut cmd: Command, lock: &Path) -> Child {
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let started = Instant::now();
    while std::fs::read_to_string(lock).map_or(true, |t| t.trim() != pid) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn finish(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

// 7. Two runs on one output both wrote it.
#[test]
fn a_second_run_on_a_locked_output_is_refused_naming_the_first() {
    let s = Setup::new();
    let out = s.path("r.jsonl");
    let mut first = Command::new(assert_cmd::cargo::cargo_bin("kn"));
    first
        .args([
            "attribute",
            "--quiet",
            "--steps",
            "2",
            "--fact",
            "-",
            "--model",
        ])
        .arg(&s.model)
        .arg("--out")
        .arg(&out)
        .env("KN_CACHE_DIR", s.path("kn-cache"));
    let child = hold_lock(first, &s.path(".r.jsonl.kn-lock"));
    s.attribute(&s.model, &s.facts, &out)
        .arg("--resume")
        .assert()
        .code(1)
        .stderr(contains(format!("another kn run (process {})", child.id())));
    finish(child);
    s.attribute(&s.model, &s.facts, &out)
        .arg("--resume")
        .assert()
        .success();
    assert_eq!(ids(&out), ["\"fr\"", "\"de\""]);

    // Two edits into one directory.
    let edited = s.path("edited");
    let mut first = Command::new(assert_cmd::cargo::cargo_bin("kn"));
    first
        .args([
            "edit",
            "--quiet",
            "--min-correct",
            "0",
            "--update",
            "-",
            "--model",
        ])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&out)
        .arg("--out")
        .arg(&edited)
        .env("KN_CACHE_DIR", s.path("kn-cache"));
    let child = hold_lock(first, &s.path(".edited.kn-lock"));
    s.kn()
        .args([
            "edit", "--quiet", "--force", "--erase", "capital", "--model",
        ])
        .arg(&s.model)
        .arg("--neurons")
        .arg(&out)
        .arg("--out")
        .arg(&edited)
        .assert()
        .code(1)
        .stderr(contains(format!("another kn run (process {})", child.id())));
    finish(child);
}

// 8. config.json was not part of the model's identity.
#[test]
fn records_of_the_same_weights_under_another_config_are_not_mixed() {
    let s = Setup::new();
    let (a, b) = (s.path("a.jsonl"), s.path("b.jsonl"));
    let first = s.path("first.jsonl");
    std::fs::write(&first, format!("{}\n", FACTS.lines().next().unwrap())).unwrap();
    let second = s.path("second.jsonl");
    std::fs::write(&second, format!("{}\n", FACTS.lines().nth(1).unwrap())).unwrap();
    s.attribute(&s.model, &first, &a).assert().success();
    let record: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&a).unwrap().lines().next().unwrap()).unwrap();
    assert!(record["model"]["config_sha256"].is_string(), "{record}");

    // The same directory, the same weights, another config.json.
    let config = s.model.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    value["layer_norm_eps"] = serde_json::json!(1e-3);
    std::fs::write(&config, value.to_string()).unwrap();
    s.attribute(&s.model, &second, &b).assert().success();

    s.kn()
        .args(["merge", "--quiet"])
        .arg(&a)
        .arg(&b)
        .assert()
        .code(1)
        .stderr(contains("config_sha256"));
    s.kn()
        .args(["report", "--quiet", "--neurons"])
        .arg(&a)
        .arg(&b)
        .arg("--out")
        .arg(s.path("report"))
        .assert()
        .code(1)
        .stderr(contains("config_sha256"));
    let before = std::fs::read(&a).unwrap();
    s.attribute(&s.model, &s.facts, &a)
        .arg("--resume")
        .assert()
        .code(1)
        .stderr(contains("written with another model"));
    assert_eq!(std::fs::read(&a).unwrap(), before);

    // A record of an older kn, without config_sha256: refused for --resume, by name.
    let old = s.path("old.jsonl");
    let mut legacy: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&b).unwrap().lines().next().unwrap()).unwrap();
    legacy["model"]
        .as_object_mut()
        .unwrap()
        .remove("config_sha256");
    legacy["model"]
        .as_object_mut()
        .unwrap()
        .remove("tokenizer_sha256");
    std::fs::write(&old, format!("{legacy}\n")).unwrap();
    s.attribute(&s.model, &s.facts, &old)
        .arg("--resume")
        .assert()
        .code(1)
        .stderr(contains("did not record the model's config_sha256"));
}

fn erase(s: &Setup, neurons: &Path, relation: &str, out: &Path) -> assert_cmd::Command {
    let mut cmd = s.kn();
    cmd.args([
        "edit", "--quiet", "--force", "--erase", relation, "--top", "3",
    ])
    .arg("--model")
    .arg(&s.model)
    .arg("--neurons")
    .arg(neurons)
    .arg("--out")
    .arg(out);
    cmd
}

fn erased(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("edits.json")).unwrap();
    let edits: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dir.join("model.safetensors").is_file() && dir.join("config.json").is_file());
    let relations: Vec<serde_json::Value> = edits["relations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["relation"].clone())
        .collect();
    serde_json::Value::from(relations)
}

// 9. `kn edit --out` replaced a directory in two renames.
#[test]
fn an_edited_directory_is_replaced_whole_at_every_kill_point() {
    let s = Setup::new();
    let neurons = s.path("kn.jsonl");
    let records: String = [("a", "P1", 3), ("b", "P2", 5)]
        .iter()
        .map(|(id, relation, index)| {
            serde_json::json!({
                "id": id, "relation": relation, "answer": "paris", "answer_id": 10,
                "refined": [{"layer": 1, "index": index, "prompts": 2, "share": 1.0,
                             "mean_relative_score": 1.0}],
                "prompts": [{"prompt": "the capital of france is [MASK] .", "mask_position": 5,
                             "gold_probability": 0.1, "max_score": 1.0, "coarse": [], "kept": []}],
                "model": {"source": "tiny", "weights_sha256": "0"},
                "params": {"method": "integrated-gradients", "steps": 20, "rule": "left",
                           "threshold": 0.2, "share": 0.7, "min_prompts": 3, "keep": 0.1},
                "kn_version": "0.1.0"
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&neurons, records).unwrap();
    let out = s.path("edited");
    erase(&s, &neurons, "P1", &out).assert().success();
    assert_eq!(erased(&out), serde_json::json!(["P1"]));

    // Killed before the swap: the old directory, whole.
    erase(&s, &neurons, "P2", &out)
        .env("KN_TEST_ABORT_AT", "before-swap")
        .assert()
        .failure();
    assert_eq!(erased(&out), serde_json::json!(["P1"]));
    // Killed after the swap, before the old one is removed: the new one, whole.
    erase(&s, &neurons, "P2", &out)
        .env("KN_TEST_ABORT_AT", "after-swap")
        .assert()
        .failure();
    assert_eq!(erased(&out), serde_json::json!(["P2"]));
    assert!(s
        .hidden()
        .iter()
        .any(|n| n.starts_with(".edited.kn-partial-")));
    // The next run removes what the killed ones left.
    erase(&s, &neurons, "P1", &out).assert().success();
    assert_eq!(erased(&out), serde_json::json!(["P1"]));
    assert_eq!(s.hidden(), Vec::<String>::new());

    // --out naming a regular file: refused, the file untouched, no model written.
    let file = s.path("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    erase(&s, &neurons, "P1", &file)
        .assert()
        .code(1)
        .stderr(contains("is not a directory"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    assert_eq!(s.hidden(), Vec::<String>::new());
}

/// Runs `args` of kn with writes past 1 KiB failing (as on a full disk: `ulimit -f`,
/// with SIGXFSZ ignored so the write returns an error instead of killing kn).
fn with_small_disk(s: &Setup, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 2; exec \"$0\" \"$@\"")
        .arg(assert_cmd::cargo::cargo_bin("kn"))
        .args(args)
        .env("KN_CACHE_DIR", s.path("kn-cache"))
        .output()
        .unwrap()
}

// 10. The smaller findings.
#[test]
fn partial_outputs_are_never_left_behind() {
    let s = Setup::new();
    // A killed merge's partial file is removed by the next merge.
    let records = s.path("r.jsonl");
    s.attribute(&s.model, &s.facts, &records).assert().success();
    let merged = s.path("merged.jsonl");
    std::fs::write(s.path(".merged.jsonl.kn-partial-999999"), "{\"id\":").unwrap();
    s.kn()
        .args(["merge", "--quiet", "--out"])
        .arg(&merged)
        .arg(&records)
        .assert()
        .success();
    assert_eq!(s.hidden(), Vec::<String>::new());

    // pararel on a full disk: no output, no partial file; the rerun needs no --force.
    let facts = s.path("pararel.jsonl");
    let facts_arg = facts.to_str().unwrap();
    let output = with_small_disk(&s, &["pararel", "--quiet", "--out", facts_arg]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(!facts.exists());
    assert_eq!(s.hidden(), Vec::<String>::new());
    s.kn()
        .args(["pararel", "--quiet", "--out"])
        .arg(&facts)
        .assert()
        .success();

    // report on a full disk: no report folder; the rerun needs no --force.
    let report = s.path("report");
    let report_arg = report.to_str().unwrap();
    let records_arg = records.to_str().unwrap();
    let output = with_small_disk(
        &s,
        &[
            "report",
            "--quiet",
            "--neurons",
            records_arg,
            "--out",
            report_arg,
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(!report.exists());
    s.kn()
        .args(["report", "--quiet", "--neurons"])
        .arg(&records)
        .arg("--out")
        .arg(&report)
        .assert()
        .success();

    // edit on a full disk names what it was writing, not the source.
    let edited = s.path("edited");
    let model_arg = s.model.to_str().unwrap();
    let output = with_small_disk(
        &s,
        &[
            "edit",
            "--quiet",
            "--erase",
            "capital",
            "--model",
            model_arg,
            "--neurons",
            records_arg,
            "--out",
            edited.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(".edited.kn-partial-"), "{stderr}");
    assert!(!edited.exists());
    assert_eq!(s.hidden(), Vec::<String>::new());
}

#[test]
fn a_full_stdout_is_reported_once_without_resume_advice() {
    let s = Setup::new();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let output = Command::new(assert_cmd::cargo::cargo_bin("kn"))
        .args(["predict", "--quiet", "--model"])
        .arg(&s.model)
        .arg("--input")
        .arg(&s.facts)
        .env("KN_CACHE_DIR", s.path("kn-cache"))
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("os error 28").count(), 1, "{stderr}");
    assert!(!stderr.contains("--resume"), "{stderr}");
}

#[test]
fn a_killed_resume_never_loses_a_whole_record() {
    // Every prefix of a good output: --resume keeps the whole lines, redoes the rest.
    let s = Setup::new();
    let out = s.path("r.jsonl");
    s.attribute(&s.model, &s.facts, &out).assert().success();
    let whole = std::fs::read(&out).unwrap();
    let newline = whole.iter().position(|&b| b == b'\n').unwrap();
    for cut in [0, 1, 5, newline, newline + 1, newline + 2] {
        std::fs::write(&out, &whole[..cut]).unwrap();
        s.attribute(&s.model, &s.facts, &out)
            .arg("--resume")
            .assert()
            .success();
        assert_eq!(ids(&out), ["\"fr\"", "\"de\""], "cut at {cut}");
    }
}
