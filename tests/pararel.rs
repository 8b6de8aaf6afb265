//! `kn pararel` on the real ParaRel data (`data/pararel`): counts and prompts
//! checked against the files read independently here, determinism, facts dropped for a
//! vocabulary, duplicates, and bad input reported with file and line.

use crate::common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use kn::data::pararel::{convert, ConvertOptions, ParaRelDirs, ParaRelFact, RelationOutcome};
use predicates::str::contains;

fn pararel() -> PathBuf {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/pararel"));
    assert!(
        root.join("patterns").is_dir(),
        "{} is missing: ParaRel lives in the repository",
        root.display()
    );
    root
}

fn json_file(path: &Path) -> Vec<serde_json::Value> {
    common::json_lines(&std::fs::read(path).unwrap())
}

/// A relation read straight from its files: distinct patterns and distinct
/// (uuid, subject, object) facts, in file order.
struct Expected {
    patterns: Vec<String>,
    facts: Vec<(String, String, String)>,
    fact_lines: usize,
}

fn expected(relation: &str) -> Expected {
    let root = pararel();
    let mut patterns: Vec<String> = Vec::new();
    for line in json_file(&root.join(format!("patterns/{relation}.jsonl"))) {
        let p = line["pattern"].as_str().unwrap().trim().to_string();
        if !patterns.contains(&p) {
            patterns.push(p);
        }
    }
    let lines = json_file(&root.join(format!("facts/{relation}.jsonl")));
    let (mut seen_pairs, mut seen_ids) = (HashSet::new(), HashSet::new());
    let mut facts = Vec::new();
    for line in &lines {
        let field = |k: &str| line[k].as_str().unwrap().to_string();
        let (id, sub, obj) = (field("uuid"), field("sub_label"), field("obj_label"));
        if seen_ids.insert(id.clone()) & seen_pairs.insert((sub.clone(), obj.clone())) {
            facts.push((id, sub, obj));
        }
    }
    Expected {
        patterns,
        facts,
        fact_lines: lines.len(),
    }
}

fn facts_of(stdout: &[u8]) -> Vec<ParaRelFact> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn pararel_cmd() -> assert_cmd::Command {
    let root = pararel();
    let mut cmd = common::kn();
    cmd.arg("pararel")
        .arg("--patterns")
        .arg(root.join("patterns"))
        .arg("--facts")
        .arg(root.join("facts"));
    cmd
}

#[test]
fn two_relations_give_every_fact_with_every_pattern() {
    let out = pararel_cmd()
        .args(["--relations", "P1376,P36"])
        .assert()
        .success();
    let facts = facts_of(&out.get_output().stdout);
    // Numeric order: P36 before P1376, whatever the order asked for.
    let (p36, p1376) = (expected("P36"), expected("P1376"));
    assert_eq!(p36.patterns.len(), 14);
    assert_eq!(p36.fact_lines, 471);
    assert_eq!(p36.facts.len(), 470, "one repeated (subject, object) pair");
    assert_eq!(facts.len(), p36.facts.len() + p1376.facts.len());
    let wanted = p36
        .facts
        .iter()
        .map(|f| ("P36", f, &p36.patterns))
        .chain(p1376.facts.iter().map(|f| ("P1376", f, &p1376.patterns)));
    for (fact, (relation, (uuid, sub, obj), patterns)) in facts.iter().zip(wanted) {
        assert_eq!(fact.id, format!("{relation}:{uuid}"));
        assert_eq!(fact.relation, relation);
        assert_eq!(&fact.subject, sub);
        assert_eq!(&fact.answer, obj);
        let prompts: Vec<String> = patterns
            .iter()
            .map(|p| p.replace("[X]", sub).replace("[Y]", "[MASK]"))
            .collect();
        assert_eq!(fact.prompts, prompts);
    }
    let prompts = 14 * p36.facts.len() + 14 * p1376.facts.len();
    out.stderr(contains(
        "kn: P36: 14 patterns, 470 facts (1 duplicate lines dropped), 470 written",
    ))
    .stderr(contains(format!(
        "kn: 2 relations kept, 0 dropped; {} facts ({prompts} prompts) written",
        facts.len()
    )));
}

#[test]
fn relations_with_too_few_patterns_or_no_files_are_dropped() {
    let root = pararel();
    let stems = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .map(|p| p.file_stem().unwrap().to_str().unwrap().to_string())
            .collect()
    };
    let (with_patterns, with_facts) = (stems("patterns"), stems("facts"));
    let pattern_count = |r: &str| json_file(&root.join(format!("patterns/{r}.jsonl"))).len();
    let kept: BTreeSet<String> = with_patterns
        .intersection(&with_facts)
        .filter(|r| pattern_count(r) >= 4)
        .cloned()
        .collect();
    // The paper's count: 34 relations with more than 3 patterns.
    assert_eq!(kept.len(), 34);

    let conversion = convert(
        &ConvertOptions {
            dirs: ParaRelDirs::under(&root),
            relations: None,
            min_patterns: 4,
            object_last: false,
            limit: None,
            seed: 0,
        },
        None,
    )
    .unwrap();
    let summary = &conversion.summary;
    let kept_now: BTreeSet<String> = summary.kept().map(|(r, _)| r.to_string()).collect();
    assert_eq!(kept_now, kept);
    let dropped: BTreeSet<String> = summary.dropped().map(|(r, _)| r.to_string()).collect();
    let all: BTreeSet<String> = with_patterns.union(&with_facts).cloned().collect();
    assert_eq!(dropped, all.difference(&kept).cloned().collect());
    for (name, outcome) in &summary.relations {
        let reason = match outcome {
            RelationOutcome::Dropped(reason) => reason.to_string(),
            RelationOutcome::Kept(_) => continue,
        };
        if !with_patterns.contains(name) {
            assert_eq!(reason, "no patterns file", "{name}");
        } else {
            let n = pattern_count(name);
            assert_eq!(
                reason,
                format!("{n} pattern(s), fewer than --min-patterns 4"),
                "{name}"
            );
        }
    }
    let total: usize = kept.iter().map(|r| expected(r).facts.len()).sum();
    assert_eq!(conversion.facts.len(), total);
    assert_eq!(summary.written(), total);
    let prompts: usize = conversion.facts.iter().map(|f| f.prompts.len()).sum();
    assert_eq!(summary.prompts(), prompts);
    let ids: HashSet<&str> = conversion.facts.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids.len(), total, "ids are unique");
}

#[test]
fn output_is_deterministic_and_limit_draws_by_seed() {
    let run = |extra: &[&str]| {
        pararel_cmd()
            .args(["--relations", "P19,P36", "--quiet"])
            .args(extra)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone()
    };
    assert_eq!(run(&[]), run(&[]));
    let a = run(&["--limit", "25", "--seed", "7"]);
    assert_eq!(
        a,
        run(&["--limit", "25", "--seed", "7"]),
        "same seed, same bytes"
    );
    let b = run(&["--limit", "25", "--seed", "8"]);
    assert_ne!(a, b, "another seed draws other facts");
    let facts = facts_of(&a);
    for relation in ["P19", "P36"] {
        let ids: Vec<String> = facts
            .iter()
            .filter(|f| f.relation == relation)
            .map(|f| f.id.clone())
            .collect();
        assert_eq!(ids.len(), 25, "{relation}");
        // Drawn facts keep their file order.
        let order: Vec<String> = expected(relation)
            .facts
            .iter()
            .map(|(uuid, _, _)| format!("{relation}:{uuid}"))
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(ids, order);
    }
    // A relation's draw does not depend on the other relations converted.
    let alone = pararel_cmd()
        .args([
            "--relations",
            "P36",
            "--quiet",
            "--limit",
            "25",
            "--seed",
            "7",
        ])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let p36: Vec<ParaRelFact> = facts.into_iter().filter(|f| f.relation == "P36").collect();
    assert_eq!(facts_of(&alone), p36);
    pararel_cmd()
        .args(["--relations", "P36", "--seed", "7"])
        .assert()
        .code(2)
        .stderr(contains("--limit"));
}

/// Writes a BERT WordPiece vocabulary (no word pieces) of the special tokens and `words`.
fn vocab_dir(dir: &Path, words: &BTreeSet<String>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let lines: Vec<&str> = specials
        .iter()
        .copied()
        .chain(words.iter().map(String::as_str))
        .collect();
    std::fs::write(dir.join("vocab.txt"), lines.join("\n") + "\n").unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"do_lower_case": true}"#,
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn facts_whose_object_is_not_one_token_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let p36 = expected("P36");
    // A vocabulary with the plain ASCII objects of every other P36 fact: the others
    // become [UNK] and must be dropped.
    let words: BTreeSet<String> = p36
        .facts
        .iter()
        .step_by(2)
        .map(|(_, _, obj)| obj.to_lowercase())
        .filter(|o| o.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    let vocab = vocab_dir(&dir.path().join("vocab"), &words);
    let (kept, dropped): (Vec<_>, Vec<_>) = p36
        .facts
        .iter()
        .partition(|(_, _, obj)| words.contains(&obj.to_lowercase()));
    assert!(dropped.len() > 100 && kept.len() > 100);
    let out = pararel_cmd()
        .args(["--relations", "P36", "--vocab"])
        .arg(&vocab)
        .assert()
        .success()
        .stderr(contains(format!(
            "kn: P36: 14 patterns, 470 facts (1 duplicate lines dropped), {} dropped (object not one token of {}), {} written",
            dropped.len(),
            vocab.display(),
            kept.len()
        )))
        .stderr(contains(format!(
            "{} facts dropped because their object is not one token of {}",
            dropped.len(),
            vocab.display()
        )));
    let facts = facts_of(&out.get_output().stdout);
    let answers: Vec<&str> = facts.iter().map(|f| f.answer.as_str()).collect();
    let wanted: Vec<&str> = kept.iter().map(|(_, _, obj)| obj.as_str()).collect();
    assert_eq!(answers, wanted);
}

#[test]
fn bert_base_uncased_has_every_object_of_two_relations_as_one_token() {
    let minilm = common::minilm();
    // Counted with the tokenizers crate directly, not through kn's tokenizer code.
    let mut tokenizer = tokenizers::Tokenizer::from_file(minilm.join("tokenizer.json")).unwrap();
    // The file pads every input to 128 tokens.
    tokenizer.with_padding(None);
    let unk = tokenizer.token_to_id("[UNK]").unwrap();
    let mut not_one = 0;
    let mut total = 0;
    for relation in ["P19", "P1303"] {
        for (_, _, obj) in expected(relation).facts {
            let ids = tokenizer
                .encode(obj.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            not_one += usize::from(ids.len() != 1 || ids[0] == unk);
            total += 1;
        }
    }
    let out = pararel_cmd()
        .args(["--relations", "P19,P1303", "--vocab"])
        .arg(&minilm)
        .assert()
        .success()
        .stderr(contains(format!(
            "{not_one} facts dropped because their object is not one token of {}",
            minilm.display()
        )));
    assert_eq!(facts_of(&out.get_output().stdout).len(), total - not_one);
}

/// A ParaRel copy of P36 under `dir`, whose files the test then edits.
fn copy_of_p36(dir: &Path) -> (PathBuf, PathBuf) {
    let (patterns, facts) = (dir.join("patterns"), dir.join("facts"));
    for (sub, path) in [("patterns", &patterns), ("facts", &facts)] {
        std::fs::create_dir_all(path).unwrap();
        std::fs::copy(
            pararel().join(sub).join("P36.jsonl"),
            path.join("P36.jsonl"),
        )
        .unwrap();
    }
    (patterns, facts)
}

fn append(path: &Path, line: &str) {
    let mut text = std::fs::read_to_string(path).unwrap();
    text.push_str(line);
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

#[test]
fn bad_lines_are_errors_with_file_and_line_and_nothing_is_written() {
    let cases = [
        (
            "patterns",
            "{\"pattern\": \"[X] has capital .\"}",
            15,
            "pattern has 0 [Y], needs exactly one: \"[X] has capital .\"",
        ),
        (
            "patterns",
            "{\"pattern\": \"[X] and [X] are [Y] .\"}",
            15,
            "pattern has 2 [X], needs exactly one",
        ),
        (
            "patterns",
            "{\"lemma\": \"capital\"}",
            15,
            "not a valid record: missing field `pattern`",
        ),
        (
            "facts",
            "{\"sub_label\": \"France\", \"obj_label\": ",
            472,
            "not a valid record: EOF while parsing",
        ),
        (
            "facts",
            "{\"sub_label\": \" \", \"obj_label\": \"Paris\", \"uuid\": \"u\"}",
            472,
            "sub_label is empty",
        ),
    ];
    for (which, line, number, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (patterns, facts) = copy_of_p36(dir.path());
        let file = if which == "patterns" {
            &patterns
        } else {
            &facts
        }
        .join("P36.jsonl");
        append(&file, line);
        let out = dir.path().join("out.jsonl");
        common::kn()
            .arg("pararel")
            .arg("--patterns")
            .arg(&patterns)
            .arg("--facts")
            .arg(&facts)
            .arg("--out")
            .arg(&out)
            .assert()
            .code(1)
            .stderr(contains(format!(
                "kn: {}:{number}: {message}",
                file.display()
            )));
        assert!(!out.exists(), "{which}: nothing written on bad input");
    }
}

#[test]
fn missing_relations_and_existing_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (patterns, facts) = copy_of_p36(dir.path());
    let cmd = || {
        let mut cmd = common::kn();
        cmd.arg("pararel")
            .arg("--patterns")
            .arg(&patterns)
            .arg("--facts")
            .arg(&facts);
        cmd
    };
    cmd()
        .args(["--relations", "P36,P19"])
        .assert()
        .code(1)
        .stderr(contains(format!(
            "kn: {}: relation P19 was asked for, but this file is missing",
            patterns.join("P19.jsonl").display()
        )));
    // A facts file without patterns (and the reverse) is a dropped relation.
    std::fs::write(facts.join("P19.jsonl"), "").unwrap();
    std::fs::write(patterns.join("P20.jsonl"), "").unwrap();
    cmd()
        .assert()
        .success()
        .stderr(contains("kn: P19: dropped: no patterns file"))
        .stderr(contains("kn: P20: dropped: no facts file"))
        .stderr(contains("kn: 1 relations kept, 2 dropped; 470 facts"));

    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "keep me\n").unwrap();
    cmd()
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(contains("exists; use --force to overwrite it"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me\n");
    cmd()
        .arg("--out")
        .arg(&out)
        .arg("--force")
        .assert()
        .success();
    assert_eq!(facts_of(&std::fs::read(&out).unwrap()).len(), 470);
}

#[test]
fn repeated_patterns_and_facts_are_kept_once() {
    let dir = tempfile::tempdir().unwrap();
    let (patterns, facts) = copy_of_p36(dir.path());
    let p36 = expected("P36");
    // The first pattern again, with other fields and spaces around it.
    append(
        &patterns.join("P36.jsonl"),
        &format!(
            r#"{{"pattern": "  {}  ", "lemma": "other"}}"#,
            p36.patterns[0]
        ),
    );
    let (uuid, sub, obj) = &p36.facts[0];
    // The same uuid with another object, and the same pair with another uuid.
    append(
        &facts.join("P36.jsonl"),
        &format!(r#"{{"sub_label": "{sub}", "obj_label": "Elsewhere", "uuid": "{uuid}"}}"#),
    );
    append(
        &facts.join("P36.jsonl"),
        &format!(r#"{{"sub_label": "{sub}", "obj_label": "{obj}", "uuid": "new-uuid"}}"#),
    );
    // The same subject with another object is another fact (N-to-M relations).
    append(
        &facts.join("P36.jsonl"),
        &format!(r#"{{"sub_label": "{sub}", "obj_label": "Other", "uuid": "other-uuid"}}"#),
    );
    let out = common::kn()
        .arg("pararel")
        .arg("--patterns")
        .arg(&patterns)
        .arg("--facts")
        .arg(&facts)
        .assert()
        .success()
        .stderr(contains(
            "kn: P36: 14 patterns (1 duplicate lines dropped), 471 facts (3 duplicate lines dropped), 471 written",
        ));
    let written = facts_of(&out.get_output().stdout);
    assert!(written.iter().all(|f| f.prompts.len() == 14));
    let last = written.last().unwrap();
    assert_eq!(
        (last.id.as_str(), last.answer.as_str()),
        ("P36:other-uuid", "Other")
    );
}

/// `--object-last` keeps exactly the patterns whose `[Y]` ends the sentence (checked
/// against the pattern files read here), counts the others, and applies
/// `--min-patterns` to what is kept; a decoder's `--vocab` implies it, and tokenizes the
/// object after a space.
#[test]
fn object_last_keeps_the_patterns_a_causal_model_can_read() {
    let root = pararel();
    let ends_with_object = |p: &str| {
        let after = p.split("[Y]").nth(1).unwrap_or("x");
        after
            .chars()
            .all(|c| c.is_whitespace() || ".!?,;:".contains(c))
    };
    for relation in ["P36", "P103", "P19"] {
        let patterns: Vec<String> = {
            let mut seen = Vec::new();
            for line in json_file(&root.join(format!("patterns/{relation}.jsonl"))) {
                let p = line["pattern"].as_str().unwrap().trim().to_string();
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
            seen
        };
        let last: Vec<&String> = patterns.iter().filter(|p| ends_with_object(p)).collect();
        assert!(
            !last.is_empty() && last.len() < patterns.len(),
            "{relation}: a real mix"
        );
        let output = pararel_cmd()
            .args([
                "--relations",
                relation,
                "--object-last",
                "--min-patterns",
                "1",
            ])
            .output()
            .unwrap();
        assert!(output.status.success());
        let facts = facts_of(&output.stdout);
        assert_eq!(facts[0].prompts.len(), last.len(), "{relation}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let dropped = format!(
            "({} with text after [Y] dropped)",
            patterns.len() - last.len()
        );
        assert!(stderr.contains(&dropped), "{relation}: {stderr}");
        // --min-patterns counts the patterns kept.
        let output = pararel_cmd()
            .args(["--relations", relation, "--object-last", "--min-patterns"])
            .arg((last.len() + 1).to_string())
            .output()
            .unwrap();
        // Too few patterns left is no fact, not a failure (a crash would also print nothing).
        assert!(
            output.status.success(),
            "{relation}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.stdout.is_empty(), "{relation}: dropped");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = format!(
            "{} pattern(s), fewer than --min-patterns {}",
            last.len(),
            last.len() + 1
        );
        assert!(stderr.contains(&reason), "{relation}: {stderr}");
    }
    // A decoder's vocabulary implies it: every prompt ends with [MASK] after filling.
    let output = pararel_cmd()
        .args(["--relations", "P36", "--vocab"])
        .arg(common::smollm2())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("with text after [Y] dropped"), "{stderr}");
    let facts = facts_of(&output.stdout);
    assert!(facts.len() > 10, "capitals that are one SmolLM2 token");
    for fact in facts {
        for prompt in &fact.prompts {
            assert!(
                prompt.trim_end_matches(['.', ' ']).ends_with("[MASK]"),
                "{prompt}"
            );
        }
    }
}
