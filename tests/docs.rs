//! The documentation stays whole: every relative link in README.md, CONTRIBUTING.md and
//! docs/ (and the READMEs beside the golden files) points at a file that exists, and at a
//! heading that exists when it names one; every subcommand `kn --help` lists has its
//! guide page and an example in the README; the README stays a front door.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The README's length limit: longer material belongs in docs/.
const README_MAX_LINES: usize = 350;

/// The Markdown files whose links are checked, relative to `root`: the README,
/// CONTRIBUTING.md, everything under docs/, and the READMEs of tests/ and scripts/.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for name in ["README.md", "CONTRIBUTING.md"] {
        let path = root.join(name);
        if path.is_file() {
            files.push(path);
        }
    }
    for dir in ["docs", "tests", "scripts"] {
        collect_markdown(&root.join(dir), &mut files);
    }
    files.sort();
    files
}

fn collect_markdown(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_markdown(&path, files);
        } else if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
}

/// The text of `line` with inline code spans removed (a link inside backticks is an
/// example, not a link).
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// Link targets in one Markdown text, with their 1-based line numbers: inline links and
/// images `[text](target "title")` and reference definitions `[name]: target`; fenced
/// code blocks and code spans are skipped.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    let mut in_fence = false;
    for (index, raw) in text.lines().enumerate() {
        let line_number = index + 1;
        if raw.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let line = without_code_spans(raw);
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            if let Some(close) = trimmed.find("]:") {
                let target = trimmed[close + 2..].split_whitespace().next().unwrap_or("");
                if !target.is_empty() {
                    targets.push((line_number, target.to_string()));
                }
                continue;
            }
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let inner = after[..end].trim();
            let target = inner.split_whitespace().next().unwrap_or("");
            let target = target.trim_start_matches('<').trim_end_matches('>');
            if !target.is_empty() {
                targets.push((line_number, target.to_string()));
            }
            rest = &after[end..];
        }
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits,
/// spaces, `-` and `_` kept), spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown text's headings, numbered as GitHub numbers repeats
/// (`name`, `name-1`, `name-2`, ...).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(&heading.replace('`', ""));
        let count = seen.entry(base.clone()).or_insert(0);
        let anchor = if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        };
        *count += 1;
        anchors.insert(anchor);
    }
    anchors
}

/// `path` with `.` and `..` folded, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Every broken relative link under `root`, as `file:line: target: why`.
fn broken_links(root: &Path) -> Vec<String> {
    let mut broken = Vec::new();
    for file in markdown_files(root) {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let shown = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (line, target) in link_targets(&text) {
            let external = ["http://", "https://", "mailto:"]
                .iter()
                .any(|p| target.starts_with(p));
            if external {
                continue;
            }
            let (path_part, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let linked = if path_part.is_empty() {
                file.clone()
            } else if path_part.starts_with('/') {
                broken.push(format!(
                    "{shown}:{line}: {target}: absolute path (use a relative link)"
                ));
                continue;
            } else {
                normalize(&file.parent().unwrap_or(root).join(path_part))
            };
            if !linked.starts_with(root) {
                broken.push(format!("{shown}:{line}: {target}: outside the repository"));
                continue;
            }
            if !linked.exists() {
                broken.push(format!("{shown}:{line}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                if linked.extension().is_some_and(|e| e == "md") {
                    let linked_text = std::fs::read_to_string(&linked).unwrap_or_default();
                    if !anchors(&linked_text).contains(anchor) {
                        broken.push(format!(
                            "{shown}:{line}: {target}: no heading with anchor #{anchor}"
                        ));
                    }
                }
            }
        }
    }
    broken
}

/// The subcommands `kn --help` lists (its "Commands:" section, without `help`).
fn subcommands() -> Vec<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_kn"))
        .arg("--help")
        .output()
        .expect("kn --help runs");
    assert!(output.status.success(), "kn --help failed: {output:?}");
    let help = String::from_utf8(output.stdout).expect("kn --help is UTF-8");
    let mut names = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            if !line.starts_with("  ") {
                break;
            }
            if let Some(name) = line.split_whitespace().next() {
                if name != "help" {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn every_relative_link_resolves() {
    let root = Path::new(REPO);
    let files = markdown_files(root);
    assert!(
        files.len() >= 10,
        "expected the README and a docs/ folder, found {files:?}"
    );
    let broken = broken_links(root);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The checker itself finds what it is for: a missing file, a missing heading, a path
/// out of the repository; and passes the good links beside them.
#[test]
fn the_link_check_catches_broken_links() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(root.join("docs/guide")).unwrap();
    std::fs::write(
        root.join("README.md"),
        "# kn\n\n## Set up\n\nSee [the guide](docs/guide/attribute.md#output-records), \
         [set up](#set-up), ![plot](docs/plot.png) and `[code](not/checked.md)`.\n\
         Broken: [a](docs/missing.md) and [b](docs/guide/attribute.md#no-such-heading).\n\
         ```\n[in a block](also/not/checked.md)\n```\n[ref]: ../outside.md\n",
    )
    .unwrap();
    std::fs::write(
        root.join("docs/guide/attribute.md"),
        "# `kn attribute`\n\n## Output records\n",
    )
    .unwrap();
    std::fs::write(root.join("docs/plot.png"), b"png").unwrap();
    let broken = broken_links(&root);
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(
        broken[0].starts_with("README.md:6: docs/missing.md: no such file"),
        "{broken:#?}"
    );
    assert!(
        broken[1].contains("#no-such-heading: no heading"),
        "{broken:#?}"
    );
    assert!(
        broken[2].starts_with("README.md:10: ../outside.md: outside"),
        "{broken:#?}"
    );
}

#[test]
fn slugs_follow_github() {
    let text =
        "# `kn attribute`\n## Speed — CPU (AVX2)\n## Speed — CPU (AVX2)\n## bf16/f16, 2× faster?\n";
    let found = anchors(text);
    let expected: BTreeSet<String> = [
        "kn-attribute",
        "speed--cpu-avx2",
        "speed--cpu-avx2-1",
        "bf16f16-2-faster",
    ]
    .map(String::from)
    .into();
    assert_eq!(found, expected);
}

#[test]
fn every_subcommand_has_a_guide_page_and_a_readme_example() {
    let root = Path::new(REPO);
    let names = subcommands();
    for expected in [
        "attribute",
        "predict",
        "probe",
        "edit",
        "report",
        "pararel",
        "merge",
        "refine",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "kn --help lost {expected}: {names:?}"
        );
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let index =
        std::fs::read_to_string(root.join("docs/README.md")).expect("docs/README.md, the index");
    for name in &names {
        let page = format!("docs/guide/{name}.md");
        assert!(
            root.join(&page).is_file(),
            "`kn {name}` has no guide page {page}"
        );
        assert!(
            readme.contains(&format!("kn {name}")),
            "README.md has no example of `kn {name}`"
        );
        assert!(
            index.contains(&format!("guide/{name}.md")),
            "docs/README.md does not list {page}"
        );
    }
}

#[test]
fn the_readme_is_a_front_door() {
    let root = Path::new(REPO);
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; move material to docs/ (at most {README_MAX_LINES})"
    );
    // The two set-up commands: the main job and the whole suite, which CI runs too.
    assert!(
        readme.contains("bash scripts/test\n"),
        "README.md lost the test command `bash scripts/test`"
    );
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == "exec bash scripts/test"),
        ".ci/run must run the README's test command, `bash scripts/test`"
    );
    assert!(
        root.join("CONTRIBUTING.md").is_file(),
        "CONTRIBUTING.md is missing"
    );
    assert!(
        root.join("docs/architecture.md").is_file(),
        "docs/architecture.md is missing"
    );
}
