//! `kn report` end to end on a small hand-made input (tests/data/report/) whose every
//! statistic is worked out by hand below: report.json, the plots (PNG and SVG, drawn and
//! looked at), the stdout summary (snapshot), merging of shards, stdin, and refusals.
//!
//! The input: six facts, six layers (the records' completeness has layers 0–5; refined
//! neurons lie in layers 1–4 only), refined neurons as layer:index
//!
//! | fact | relation | refined |
//! |---|---|---|
//! | f1 | P1 | 4:10 4:11 3:7 |
//! | f2 | P1 | 4:10 3:7 2:3 |
//! | f3 | P1 | 4:10 |
//! | f4 | P2 | 4:10 1:5 |
//! | f5 | P2 | 1:5 2:8 |
//! | f6 | (none) | — |
//!
//! suppress.jsonl (factor 0, random control), P(gold) before → after (control after):
//! f1 0.5 → 0.1 (0.5), 0.3 → 0.1 (0.3); f2 0.4 → 0.2 (0.3); f3 0.4 → 0.2 (0.4);
//! f4 0.2 → 0.1 (0.2); f5 0.6 → 0.3 (0.6); f6 skipped (no refined neurons).
//! amplify.jsonl (factor 2): the same prompts, after = 1.5 × before for P1, 1.25 × for
//! P2, control after = before.

use crate::common;

use std::path::{Path, PathBuf};

use predicates::str::contains;
use serde_json::Value;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/report");
const SNAPSHOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/snapshots/report_summary.txt"
);

fn data(name: &str) -> PathBuf {
    Path::new(DATA).join(name)
}

/// The whole hand-made input, as `kn report` arguments.
fn all_inputs() -> Vec<PathBuf> {
    vec![
        "--neurons".into(),
        data("neurons.jsonl"),
        "--probe".into(),
        data("suppress.jsonl"),
        data("amplify.jsonl"),
        "--edit-report".into(),
        data("update.json"),
        data("erase.json"),
    ]
}

fn report(args: &[PathBuf], out: &Path) -> assert_cmd::assert::Assert {
    common::kn()
        .arg("report")
        .args(args)
        .arg("--out")
        .arg(out)
        .assert()
}

fn json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn close(value: &Value, expected: f64) {
    let got = value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"));
    assert!((got - expected).abs() < 1e-9, "{got} != {expected}");
}

fn close_all(value: &Value, expected: &[f64]) {
    let got = value.as_array().unwrap();
    assert_eq!(got.len(), expected.len(), "{value}");
    for (g, e) in got.iter().zip(expected) {
        close(g, *e);
    }
}

#[test]
fn every_statistic_of_the_hand_made_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    report(&all_inputs(), &out).success();
    let r = json(&out);
    assert_eq!(r["facts"], 6);
    assert_eq!(r["relations"], serde_json::json!(["(none)", "P1", "P2"]));
    // Layer 5 holds no neuron: only the completeness entries know it exists.
    assert_eq!(
        (r["layers"].as_u64(), r["layers_from"].as_str()),
        (Some(6), Some("completeness"))
    );

    // Per fact: 3, 3, 1, 2, 2, 0 → 11 neurons, mean 11/6, sorted 0 1 2 2 3 3 → median 2.
    let per_fact = &r["neurons_per_fact"]["overall"];
    assert_eq!(per_fact["neurons"], 11);
    close(&per_fact["mean"], 11.0 / 6.0);
    close(&per_fact["median"], 2.0);
    assert_eq!(
        (per_fact["min"].as_u64(), per_fact["max"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(per_fact["zero"], 1);
    assert_eq!(per_fact["histogram"], serde_json::json!([1, 1, 2, 2]));
    let by_relation = &r["neurons_per_fact"]["by_relation"];
    assert_eq!(by_relation[1]["relation"], "P1");
    close(&by_relation[1]["mean"], 7.0 / 3.0);
    close(&by_relation[1]["median"], 3.0);
    close(&by_relation[2]["mean"], 2.0);

    // Layers: 1:5 twice; 2:3, 2:8; 3:7 twice; 4:10 four times and 4:11.
    let layers = &r["layer_distribution"];
    assert_eq!(
        layers["overall"]["counts"],
        serde_json::json!([0, 2, 2, 2, 5, 0])
    );
    let e = 1.0 / 11.0;
    close_all(
        &layers["overall"]["share"],
        &[0.0, 2.0 * e, 2.0 * e, 2.0 * e, 5.0 * e, 0.0],
    );
    assert_eq!(layers["by_relation"][0]["neurons"], 0);
    assert_eq!(
        layers["by_relation"][1]["counts"],
        serde_json::json!([0, 0, 1, 2, 4, 0])
    );
    close_all(
        &layers["by_relation"][2]["share"],
        &[0.0, 0.5, 0.25, 0.0, 0.25, 0.0],
    );

    // Shared: within P1 (f1,f2) 2, (f1,f3) 1, (f2,f3) 1; within P2 (f4,f5) 1: 5 over 4
    // pairs. Across: 4:10 of f1, f2, f3 with f4: 3 over 3·2 + 1·3 + 1·2 = 11 pairs.
    let shared = &r["shared_neurons"];
    assert_eq!(shared["same_relation"]["pairs"], 4);
    assert_eq!(shared["same_relation"]["shared"], 5);
    close(&shared["same_relation"]["mean"], 1.25);
    assert_eq!(shared["different_relation"]["pairs"], 11);
    assert_eq!(shared["different_relation"]["shared"], 3);
    close(&shared["different_relation"]["mean"], 3.0 / 11.0);
    assert_eq!(
        shared["pairs"],
        serde_json::json!([[0, 3, 2], [3, 3, 6], [2, 6, 1]])
    );
    assert_eq!(
        shared["shared"],
        serde_json::json!([[0, 0, 0], [0, 4, 3], [0, 3, 1]])
    );
    assert_eq!(
        shared["mean"][0][0],
        Value::Null,
        "(none) has one fact: no pair"
    );
    close(&shared["mean"][1][1], 4.0 / 3.0);
    close(&shared["mean"][1][2], 0.5);

    // Suppress. P1: before (0.5+0.3+0.4+0.4)/4 = 0.4, after 0.6/4 = 0.15 → −62.5%;
    // control 1.5/4 = 0.375 → −6.25%. P2: 0.4 → 0.2, −50%; control 0%. All six prompts:
    // 0.4 → 1.0/6 → −58.33%; control 2.3/6 → −4.17%.
    let probes = r["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2);
    let suppress = &probes[0];
    assert_eq!(suppress["mode"], "suppress");
    assert_eq!(
        (suppress["facts"].as_u64(), suppress["skipped"].as_u64()),
        (Some(6), Some(1))
    );
    assert_eq!(suppress["control"], "random");
    close(&suppress["factor"], 0.0);
    close(&suppress["overall"]["change"], (1.0 / 6.0 - 0.4) / 0.4);
    close(
        &suppress["overall"]["control_change"],
        (2.3 / 6.0 - 0.4) / 0.4,
    );
    assert_eq!(suppress["overall"]["prompts"], 6);
    let (none, p1, p2) = (
        &suppress["by_relation"][0],
        &suppress["by_relation"][1],
        &suppress["by_relation"][2],
    );
    assert_eq!(
        (none["skipped"].as_u64(), none["prompts"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(none["change"], Value::Null);
    close(&p1["change"], -0.625);
    close(&p1["control_change"], -0.0625);
    close(&p2["change"], -0.5);
    close(&p2["control_change"], 0.0);
    // Amplify: P1 +50%, P2 +25%; all (2.4·1.5 + 0.8·1.25 − 2.4) / 2.4 = +41.67%.
    let amplify = &probes[1];
    assert_eq!(amplify["mode"], "amplify");
    close(&amplify["factor"], 2.0);
    close(&amplify["overall"]["change"], 1.0 / 2.4);
    close(&amplify["by_relation"][1]["change"], 0.5);
    close(&amplify["by_relation"][2]["change"], 0.25);

    // Edit reports: one row each, as given.
    let edits = r["edits"].as_array().unwrap();
    assert_eq!(edits.len(), 2);
    assert_eq!(edits[0]["operation"], "update");
    close(&edits[0]["edited_facts"]["after"]["success"], 0.5);
    assert_eq!(edits[1]["operation"], "erase");
    close(&edits[1]["same_relation"]["after"]["perplexity"], 9.0);

    let names: Vec<&str> = r["figures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "layers.png",
            "layers-by-relation.png",
            "neurons-per-fact.png",
            "shared-neurons.png",
            "suppress.png",
            "amplify.png"
        ]
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "![Refined neurons per layer (11 neurons of 6 facts)](layers.png)",
        "| same relation | 4 | 5 | 1.25 |",
        "| different relations | 11 | 3 | 0.27 |",
        "| P1 | 3 | 0 | 4 | 0.4000 | 0.1500 | −62.5% | 0.3750 | −6.3% |",
        "| **all** | 6 | 1 | 6 | 0.4000 | 0.5667 | +41.7% | 0.4000 | 0.0% |",
        "| `update.json` | update (scaled) | P1 | 2 | 6 | 0.0% → 50.0% | 50.0% → 100.0% | 0.0% → 66.7% | 0.25 → 0.75 | 1 |",
        "| `erase.json` | erase (zero) | same relation | 2 | 50.0% → 0.0% | 4.00 → 9.00 (+5.00) |",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
}

/// Decodes a PNG into (width, height, RGB bytes).
fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Share of pixels that are exactly `rgb`, and share that are not white.
fn pixels(rgb: &[u8], color: [u8; 3]) -> (f64, f64) {
    let n = rgb.len() / 3;
    let (mut same, mut ink) = (0, 0);
    for p in rgb.chunks_exact(3) {
        same += usize::from(p == color);
        ink += usize::from(p != [255, 255, 255]);
    }
    (same as f64 / n as f64, ink as f64 / n as f64)
}

const KN_BLUE: [u8; 3] = [31, 119, 180];
const CONTROL_ORANGE: [u8; 3] = [255, 127, 14];

#[test]
fn plots_render_as_png_with_bars_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("png");
    report(&all_inputs(), &out).success();
    for name in [
        "layers",
        "layers-by-relation",
        "neurons-per-fact",
        "shared-neurons",
        "suppress",
        "amplify",
    ] {
        let path = out.join(format!("{name}.png"));
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size > 5_000, "{name}.png is only {size} bytes");
        let (w, h, rgb) = decode_png(&path);
        assert!(w >= 300 && h >= 200, "{name}.png is {w}×{h}");
        let (_, ink) = pixels(&rgb, KN_BLUE);
        assert!(
            ink > 0.03,
            "{name}.png is nearly blank ({ink:.3} non-white)"
        );
    }
    // Bars in the knowledge neurons' blue, the control's orange beside them.
    let (_, _, rgb) = decode_png(&out.join("layers.png"));
    assert!(pixels(&rgb, KN_BLUE).0 > 0.05);
    let (_, _, rgb) = decode_png(&out.join("suppress.png"));
    assert!(pixels(&rgb, KN_BLUE).0 > 0.02);
    assert!(pixels(&rgb, CONTROL_ORANGE).0 > 0.001);
    // Text was drawn: the title band of the layers plot (above any bar) has dark pixels.
    let (w, _, rgb) = decode_png(&out.join("layers.png"));
    let title_band = &rgb[..(w as usize * 40 * 3)];
    assert!(
        title_band
            .chunks_exact(3)
            .filter(|p| p.iter().all(|&c| c < 80))
            .count()
            > 200,
        "no title text in layers.png"
    );
}

#[test]
fn plots_render_as_svg_with_titles_and_one_bar_per_item() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("svg");
    let mut args = all_inputs();
    args.extend(["--format".into(), "svg".into()]);
    report(&args, &out).success();
    let svg = |name: &str| std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap();
    let blue = "fill=\"#1F77B4\"";
    let orange = "fill=\"#FF7F0E\"";

    let layers = svg("layers");
    assert!(layers.contains("Refined neurons per layer (11 neurons of 6 facts)"));
    assert!(layers.contains("\nlayer\n") && layers.contains("share of refined neurons (%)"));
    assert_eq!(
        layers.matches(blue).count(),
        6,
        "one bar per layer, empty ones too"
    );

    let hist = svg("neurons-per-fact");
    assert!(hist.contains("Refined neurons per fact (6 facts)"));
    assert!(hist.contains("mean 1.83") && hist.contains("median 2"));
    // Four bars (0 to 3 neurons) and the legend's swatch.
    assert_eq!(hist.matches(blue).count(), 5);

    // Rows all relations, (none), P1, P2; (none) has no prompts: 3 bars each, and the
    // legend's swatches.
    let suppress = svg("suppress");
    assert!(suppress.contains("Suppressing knowledge neurons (×0)"));
    assert!(suppress.contains("control (random neurons)"));
    assert_eq!(suppress.matches(blue).count(), 3 + 1);
    assert_eq!(suppress.matches(orange).count(), 3 + 1);
    assert!(suppress.contains("−58%") && suppress.contains("no prompts"));

    let shared = svg("shared-neurons");
    assert!(shared.contains("Shared refined neurons per fact pair"));
    assert!(
        shared.contains("\n1.33\n"),
        "P1's diagonal cell: 4 shared over 3 pairs"
    );
    let heat = svg("layers-by-relation");
    assert!(
        heat.contains("\n57%\n"),
        "P1 has 4 of its 7 neurons in layer 4"
    );
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("(layers.svg)"));
}

#[test]
fn the_summary_matches_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let output = report(&all_inputs(), &dir.path().join("r")).success();
    let stdout = String::from_utf8(output.get_output().stdout.clone()).unwrap();
    let expected = std::fs::read_to_string(SNAPSHOT).unwrap_or_default();
    if stdout != expected && std::env::var_os("KN_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(Path::new(SNAPSHOT).parent().unwrap()).unwrap();
        std::fs::write(SNAPSHOT, &stdout).unwrap();
        // An update never passes: the run that rewrote the file compared nothing.
        panic!("{SNAPSHOT} rewritten: review `git diff` and rerun without KN_UPDATE_SNAPSHOTS");
    }
    assert_eq!(
        stdout, expected,
        "the summary changed; if on purpose, rerun with KN_UPDATE_SNAPSHOTS=1 and commit {SNAPSHOT}"
    );
}

/// report.json without the list of input files.
fn numbers(dir: &Path) -> Value {
    let mut r = json(dir);
    r.as_object_mut().unwrap().remove("inputs");
    r
}

#[test]
fn shards_merge_into_the_report_of_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let split = |name: &str, at: usize| -> (PathBuf, PathBuf) {
        let text = std::fs::read_to_string(data(name)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let (a, b) = (
            root.join(format!("a.{name}")),
            root.join(format!("b.{name}")),
        );
        // Shards of `kn attribute --shard` hold facts in any order.
        std::fs::write(&a, lines[at..].join("\n") + "\n").unwrap();
        std::fs::write(&b, lines[..at].join("\n") + "\n").unwrap();
        (a, b)
    };
    let (n1, n2) = split("neurons.jsonl", 2);
    let (s1, s2) = split("suppress.jsonl", 4);
    let args: Vec<PathBuf> = vec![
        "--neurons".into(),
        n1,
        n2,
        "--probe".into(),
        s1,
        data("amplify.jsonl"),
        s2,
        "--edit-report".into(),
        data("update.json"),
        data("erase.json"),
    ];
    report(&args, &root.join("sharded")).success();
    report(&all_inputs(), &root.join("whole")).success();
    assert_eq!(numbers(&root.join("sharded")), numbers(&root.join("whole")));
}

#[test]
fn a_pipeline_reads_neurons_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("piped");
    common::kn()
        .args(["report", "--quiet", "--neurons", "-", "--out"])
        .arg(&out)
        .write_stdin(std::fs::read(data("neurons.jsonl")).unwrap())
        .assert()
        .success()
        .stderr("");
    let file = dir.path().join("file");
    report(&["--neurons".into(), data("neurons.jsonl")], &file).success();
    assert_eq!(numbers(&out), numbers(&file));
    assert_eq!(json(&out)["probes"], serde_json::json!([]));
}

/// `name` in `dir`: `data(name)` with each line passed through `edit`.
fn edited(dir: &Path, name: &str, edit: impl Fn(usize, &mut Value)) -> PathBuf {
    let text = std::fs::read_to_string(data(name)).unwrap();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            edit(i, &mut v);
            v.to_string()
        })
        .collect();
    let path = dir.join(format!("edited.{name}"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn mixing_models_or_parameters_is_refused_with_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = root.join("never");
    // A shard made with another threshold.
    let other = edited(root, "neurons.jsonl", |_, v| {
        v["params"]["threshold"] = 0.3.into()
    });
    report(
        &["--neurons".into(), data("neurons.jsonl"), other.clone()],
        &out,
    )
    .failure()
    .stderr(contains(
        "edited.neurons.jsonl:1: made with other parameters than",
    ))
    .stderr(contains("neurons.jsonl:1: threshold 0.3 here, 0.2 there"));
    // Another model, from its second line on.
    let other = edited(root, "neurons.jsonl", |i, v| {
        if i == 1 {
            v["model"]["weights_sha256"] = "0123456789abcdef".into();
        }
    });
    report(&["--neurons".into(), other], &out)
        .failure()
        .stderr(contains(
            "edited.neurons.jsonl:2: made with another model than",
        ))
        .stderr(contains(
            "weights_sha256 0123456789ab (models/tiny) here, 5e1f0c2a9b7d (models/tiny) there",
        ));
    // An amplify run with another control seed than the suppress run.
    let other = edited(root, "amplify.jsonl", |_, v| v["params"]["seed"] = 7.into());
    report(
        &[
            "--neurons".into(),
            data("neurons.jsonl"),
            "--probe".into(),
            data("suppress.jsonl"),
            other,
        ],
        &out,
    )
    .failure()
    .stderr(contains(
        "edited.amplify.jsonl:1: made with other parameters than",
    ))
    .stderr(contains(
        "seed 7 here, 0 there; probe runs may differ in mode, factor, control and neurons only",
    ));
    // An edit report of another model.
    let mut edit: Value =
        serde_json::from_str(&std::fs::read_to_string(data("update.json")).unwrap()).unwrap();
    edit["model"] = serde_json::json!({"source": "other", "weights_sha256": "ffffffffffffffff"});
    let other = root.join("other-model.json");
    std::fs::write(&other, edit.to_string()).unwrap();
    report(
        &[
            "--neurons".into(),
            data("neurons.jsonl"),
            "--edit-report".into(),
            other,
        ],
        &out,
    )
    .failure()
    .stderr(contains("other-model.json: made with another model than"))
    .stderr(contains("weights_sha256 ffffffffffff (other) here"));
    // The same file twice (or overlapping shards).
    report(
        &[
            "--neurons".into(),
            data("neurons.jsonl"),
            data("neurons.jsonl"),
        ],
        &out,
    )
    .failure()
    .stderr(contains("neurons.jsonl:1: fact id \"f1\" is also at"));
    assert!(!out.exists(), "a refused input leaves no report directory");
}

#[test]
fn a_bad_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    let good = std::fs::read_to_string(data("neurons.jsonl")).unwrap();
    let first = good.lines().next().unwrap();
    std::fs::write(&bad, format!("{first}\n\n{{\"id\": 3}}\n")).unwrap();
    report(&["--neurons".into(), bad], &dir.path().join("r"))
        .failure()
        .code(1)
        .stderr(contains(
            "bad.jsonl:3: not a kn attribute record: missing field",
        ));
    let probe = dir.path().join("probe.jsonl");
    std::fs::write(&probe, "{\"id\": 1, \"mode\": \"erase\"}\n").unwrap();
    report(
        &[
            "--neurons".into(),
            data("neurons.jsonl"),
            "--probe".into(),
            probe,
        ],
        &dir.path().join("r"),
    )
    .failure()
    .stderr(contains(
        "probe.jsonl:1: not a kn probe record: unknown variant `erase`",
    ));
    let edit = dir.path().join("edit.json");
    std::fs::write(&edit, "{\n\"operation\": \"update\",\n\"model\": 3\n}").unwrap();
    report(
        &[
            "--neurons".into(),
            data("neurons.jsonl"),
            "--edit-report".into(),
            edit,
        ],
        &dir.path().join("r"),
    )
    .failure()
    .stderr(contains("edit.json:3: not a kn edit report: invalid type"));
}

#[test]
fn an_existing_report_directory_is_kept_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    std::fs::create_dir(&out).unwrap();
    // An empty directory is fine.
    report(&["--neurons".into(), data("neurons.jsonl")], &out).success();
    report(&["--neurons".into(), data("neurons.jsonl")], &out)
        .failure()
        .stderr(contains("exists and is not empty; use --force"));
    let mut args = all_inputs();
    args.push("--force".into());
    report(&args, &out).success();
    assert!(out.join("suppress.png").is_file());
}

#[test]
fn the_layer_count_comes_from_the_option_completeness_or_the_highest_layer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut args: Vec<PathBuf> = vec!["--neurons".into(), data("neurons.jsonl")];
    args.extend(["--layers".into(), "12".into()]);
    report(&args, &root.join("twelve")).success();
    let r = json(&root.join("twelve"));
    assert_eq!(
        (r["layers"].as_u64(), r["layers_from"].as_str()),
        (Some(12), Some("option"))
    );
    assert_eq!(
        r["layer_distribution"]["overall"]["counts"]
            .as_array()
            .unwrap()
            .len(),
        12
    );
    args[3] = "4".into();
    report(&args, &root.join("four")).failure().stderr(contains(
        "neurons.jsonl:1: a neuron of layer 4, but --layers 4",
    ));
    // Activation records have no completeness: the highest layer seen (4) + 1.
    let bare = edited(root, "neurons.jsonl", |_, v| {
        for p in v["prompts"].as_array_mut().unwrap() {
            p.as_object_mut().unwrap().remove("completeness");
        }
    });
    report(&["--neurons".into(), bare], &root.join("bare")).success();
    let r = json(&root.join("bare"));
    assert_eq!(
        (r["layers"].as_u64(), r["layers_from"].as_str()),
        (Some(5), Some("max-layer"))
    );
}

#[test]
fn probe_runs_of_other_controls_and_of_the_baseline_are_reported_apart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The same prompts probed beside another relation's neurons, and the activation
    // baseline's neurons (here the same records, marked as that method).
    let other = edited(root, "suppress.jsonl", |_, v| {
        v["params"]["control"] = "other-relation".into();
        v["control"]["kind"] = "other-relation".into();
        // The other relation's neurons halve every gold probability.
        for p in v["prompts"].as_array_mut().unwrap() {
            let before = p["before"].as_f64().unwrap();
            p["control_after"] = (before / 2.0).into();
        }
    });
    let other_path = root.join("other.jsonl");
    std::fs::rename(&other, &other_path).unwrap();
    let activation = edited(root, "suppress.jsonl", |_, v| {
        v["params"]["method"] = "activation".into();
        v["params"]["neurons_sha256"] = "cd34".into();
    });
    let baseline = edited(root, "neurons.jsonl", |_, v| {
        v["params"]["method"] = "activation".into();
        v["params"]["threshold"] = 0.5.into();
        v["params"].as_object_mut().unwrap().remove("steps");
        v["params"].as_object_mut().unwrap().remove("rule");
        // The baseline keeps one neuron per fact: the first refined one.
        let refined = v["refined"].as_array_mut().unwrap();
        refined.truncate(1);
    });
    let out = root.join("r");
    let args: Vec<PathBuf> = vec![
        "--neurons".into(),
        data("neurons.jsonl"),
        "--baseline".into(),
        baseline,
        "--probe".into(),
        activation,
        data("amplify.jsonl"),
        other_path,
        data("suppress.jsonl"),
    ];
    let output = report(&args, &out).success();
    let stdout = String::from_utf8(output.get_output().stdout.clone()).unwrap();
    let r = json(&out);
    let probes = r["probes"].as_array().unwrap();
    let names: Vec<&str> = probes.iter().map(|p| p["name"].as_str().unwrap()).collect();
    // Knowledge neurons first (suppress, its controls, amplify), then the baseline's.
    assert_eq!(
        names,
        [
            "suppress",
            "suppress-other-relation",
            "amplify",
            "suppress-activation"
        ]
    );
    assert_eq!(probes[1]["control"], "other-relation");
    assert_eq!(probes[3]["method"], "activation");
    // The knowledge neurons' change is the same in every suppress run (the same
    // records); the other-relation control halves every probability: −50%.
    for i in [0, 1, 3] {
        close(&probes[i]["overall"]["change"], (1.0 / 6.0 - 0.4) / 0.4);
    }
    close(&probes[1]["overall"]["control_change"], -0.5);
    close(
        &probes[0]["overall"]["control_change"],
        (2.3 / 6.0 - 0.4) / 0.4,
    );
    for name in names {
        assert!(out.join(format!("{name}.png")).is_file(), "{name}.png");
    }
    // The baseline: one neuron for each of the five facts with any (f1 3:7, f2 2:3,
    // f3 4:10, f4 1:5, f5 1:5): within P1 no pair shares, within P2 (f4, f5) one: 1 / 4;
    // no pair across relations shares.
    let b = &r["baseline"];
    close(&b["neurons_per_fact"]["overall"]["mean"], 5.0 / 6.0);
    close(&b["shared_neurons"]["same_relation"]["mean"], 0.25);
    close(&b["shared_neurons"]["different_relation"]["mean"], 0.0);
    assert_eq!(b["params"]["method"], "activation");
    assert!(
        stdout.contains(
            "activation baseline: refined neurons per fact: mean 0.83, median 1; shared neurons \
             per fact pair: 0.25 within a relation, 0.00 across relations"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("with the activation baseline's neurons, −4.2% with the control"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## Suppressing knowledge neurons, beside another relation's neurons (the paper's Figure 4)",
        "## Suppressing activation baseline's neurons (the paper's Figure 4)",
        "| refined neurons per fact, mean | 1.83 | 0.83 |",
        "| shared neurons per pair, same relation | 1.25 | 0.25 |",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    // Two shards of one run still may not differ, and a run's ids are unique.
    let twice: Vec<PathBuf> = vec![
        "--neurons".into(),
        data("neurons.jsonl"),
        "--probe".into(),
        data("suppress.jsonl"),
        data("suppress.jsonl"),
    ];
    report(&twice, &root.join("never"))
        .failure()
        .stderr(contains("suppress id \"f1\" is also at"));
}
