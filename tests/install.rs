//! kn as installed: a copy of the binary away from the repository runs `kn pararel` on
//! the ParaRel built into it (the same bytes as from `data/pararel`), and generates its
//! shell completions and man pages from the clap definitions.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of the test's `kn` binary in a temporary folder, as `cargo install` leaves one:
/// nothing of the repository beside it.
fn installed_kn(dir: &Path) -> PathBuf {
    let built = assert_cmd::cargo::cargo_bin("kn");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let copy = bin.join("kn");
    std::fs::copy(&built, &copy).unwrap();
    copy
}

/// Runs the copy. The tests run in parallel threads, and a fork made by another test
/// while this one's copy was still open for writing holds that write handle until its
/// exec, so the exec of a fresh copy can fail with ETXTBSY ("Text file busy") for a
/// moment: that error is retried.
fn run(kn: &Path, cwd: &Path, args: &[&str]) -> std::process::Output {
    for _ in 0..100 {
        match Command::new(kn).args(args).current_dir(cwd).output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result.expect("running the installed kn"),
        }
    }
    panic!("{}: still busy after 2 s", kn.display());
}

#[test]
fn pararel_runs_without_paths_from_the_copy_built_in() {
    let dir = tempfile::tempdir().unwrap();
    let kn = installed_kn(dir.path());
    let cwd = dir.path().join("elsewhere");
    std::fs::create_dir_all(&cwd).unwrap();

    let bundled = run(&kn, &cwd, &["pararel", "--relations", "P36,P1303"]);
    assert!(
        bundled.status.success(),
        "{}",
        String::from_utf8_lossy(&bundled.stderr)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/pararel");
    let patterns = root.join("patterns");
    let facts = root.join("facts");
    let from_disk = run(
        &kn,
        &cwd,
        &[
            "pararel",
            "--relations",
            "P36,P1303",
            "--patterns",
            patterns.to_str().unwrap(),
            "--facts",
            facts.to_str().unwrap(),
        ],
    );
    assert!(from_disk.status.success());
    assert_eq!(bundled.stdout, from_disk.stdout);
    assert_eq!(bundled.stderr, from_disk.stderr);
    let lines = common::json_lines(&bundled.stdout);
    // P36: 470 distinct facts (see tests/pararel.rs); P1303 after it.
    assert_eq!(lines[0]["relation"], "P36");
    assert_eq!(lines.iter().filter(|l| l["relation"] == "P36").count(), 470);
    assert_eq!(lines.last().unwrap()["relation"], "P1303");
    let stderr = String::from_utf8_lossy(&bundled.stderr);
    assert!(
        stderr.contains("kn: P36: 14 patterns, 470 facts"),
        "{stderr}"
    );

    // The whole of ParaRel, as the paper's pipeline starts: 34 relations kept.
    let all = run(&kn, &cwd, &["pararel", "--quiet"]);
    assert!(all.status.success());
    let facts_all = common::json_lines(&all.stdout);
    let prompts: usize = facts_all
        .iter()
        .map(|f| f["prompts"].as_array().unwrap().len())
        .sum();
    let relations: std::collections::BTreeSet<&str> = facts_all
        .iter()
        .map(|f| f["relation"].as_str().unwrap())
        .collect();
    assert_eq!(relations.len(), 34);
    assert_eq!(prompts, 215_725);

    // A relation the built-in copy lacks is named as a built-in file.
    let missing = run(&kn, &cwd, &["pararel", "--relations", "P9999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "kn: (built in) data/pararel/patterns/P9999.jsonl: relation P9999 was asked for, but this file is missing\n"
    );
}

#[test]
fn completions_and_man_pages_are_generated_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let kn = installed_kn(dir.path());
    let text = |args: &[&str]| {
        let out = run(&kn, dir.path(), args);
        assert!(
            out.status.success(),
            "kn {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = text(&["completions", "bash"]);
    assert!(bash.contains("_kn()"), "bash: a completion function");
    assert!(bash.contains("complete -F _kn"), "bash: registered for kn");
    assert!(bash.contains("--shard") && bash.contains("merge"));
    let zsh = text(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef kn"));
    assert!(zsh.contains("--min-prompts"));
    let fish = text(&["completions", "fish"]);
    assert!(fish.contains("complete -c kn"));
    assert!(fish.contains("-l resume"));

    let man = text(&["man"]);
    assert!(man.contains(".TH kn 1"));
    assert!(man.contains("merge"));
    let attribute = text(&["man", "attribute"]);
    assert!(
        attribute.contains(".TH kn-attribute 1"),
        "{}",
        &attribute[..300.min(attribute.len())]
    );
    assert!(attribute.contains("shard"));
    let bad = run(&kn, dir.path(), &["man", "nonsense"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr)
        .contains("no subcommand \"nonsense\": one of attribute"));

    let pages = dir.path().join("man1");
    text(&["man", "--out-dir", pages.to_str().unwrap()]);
    for page in ["kn.1", "kn-attribute.1", "kn-merge.1", "kn-pararel.1"] {
        let body =
            std::fs::read_to_string(pages.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(body.contains(".TH"), "{page} is a man page");
    }
}
