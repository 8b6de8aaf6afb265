//! The report as text: `report.md` (tables and image links) and the short summary
//! `kn report` prints on stdout.

use std::fmt::Write as _;
use std::path::Path;

use super::input::{ControlKind, EditReport};
use super::plot::{control_name, neurons_name};
use super::stats::{CountSummary, Effect, ProbeSummary};
use super::{LayersFrom, Report};
use crate::edit::record::{AnswerMetrics, GoldMetrics, GroupMetrics, Operation};
use crate::edit::EraseValue;

/// `—` for a missing number.
const NONE: &str = "—";

fn opt(value: Option<f64>, show: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| NONE.to_string(), show)
}

/// A percentage with one decimal: `45.5%`, `−62.5%`, with `sign` also `+41.7%`.
fn percent1(x: f64, sign: bool) -> String {
    let body = format!("{:.1}%", (x * 100.0).abs());
    if body == "0.0%" {
        return body;
    }
    match (x < 0.0, sign) {
        (true, _) => format!("−{body}"),
        (false, true) => format!("+{body}"),
        (false, false) => body,
    }
}

fn pct(value: Option<f64>) -> String {
    opt(value, |v| percent1(v, false))
}

fn signed(value: Option<f64>) -> String {
    opt(value, |v| percent1(v, true))
}

fn num(value: Option<f64>) -> String {
    opt(value, |v| format!("{v:.2}"))
}

/// `before → after`, or `—` when both are missing.
fn arrow(before: Option<f64>, after: Option<f64>, show: fn(Option<f64>) -> String) -> String {
    if before.is_none() && after.is_none() {
        return NONE.to_string();
    }
    format!("{} → {}", show(before), show(after))
}

fn layers_from(report: &Report) -> &'static str {
    match report.layers_from {
        LayersFrom::Option => "from --layers",
        LayersFrom::Completeness => "from the records' completeness",
        LayersFrom::MaxLayer => "the highest layer seen + 1",
    }
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
}

/// The top quarter of the layers (at least one): where the paper finds most knowledge
/// neurons. Returns `(first layer, share of refined neurons there)`.
fn top_layers(report: &Report) -> (usize, f64) {
    let share = &report.layer_distribution.overall.share;
    let k = share.len().div_ceil(4).max(1).min(share.len());
    let first = share.len() - k;
    (first, share[first..].iter().sum())
}

fn probe_line(p: &ProbeSummary) -> String {
    let factor = format!(" (×{})", p.factor);
    let control = if p.overall.control_prompts > 0 {
        format!(
            ", {} with the control ({})",
            signed(p.overall.control_change),
            control_name(p.control)
        )
    } else {
        String::new()
    };
    format!(
        "{}{factor}: gold probability {} with the {}{control}; {} prompts of {} facts, {} \
         skipped",
        p.mode.name(),
        signed(p.overall.change),
        neurons_name(p.method),
        p.overall.prompts,
        p.facts,
        p.skipped
    )
}

/// `update` or `erase`.
fn operation(r: &EditReport) -> &'static str {
    match r.operation {
        Operation::Update => "update",
        Operation::Erase => "erase",
    }
}

/// How an edit was made: `scaled`, `fixed, random neurons, one at a time`, `zero`.
fn how(r: &EditReport) -> String {
    let mut parts = vec![match (&r.rule, r.value) {
        (Some(rule), _) => rule.clone(),
        (None, Some(EraseValue::Zero)) => "zero".into(),
        (None, Some(EraseValue::Unk)) => "unk".into(),
        (None, None) => NONE.into(),
    }];
    if r.control == Some(ControlKind::Random) {
        parts.push("random neurons".into());
    }
    if r.each {
        parts.push("one at a time".into());
    }
    parts.join(", ")
}

/// The text `kn report` prints: one line per analysis.
pub fn summary(report: &Report) -> String {
    let mut s = String::new();
    let per_fact = &report.neurons_per_fact.overall;
    let _ = writeln!(
        s,
        "kn report: {} facts of {} relations; model {} (weights {}); {} layers ({})",
        report.facts,
        report.relations.len(),
        report.model.source,
        report
            .model
            .weights_sha256
            .get(..12)
            .unwrap_or(&report.model.weights_sha256),
        report.layers,
        layers_from(report)
    );
    let _ = writeln!(
        s,
        "refined neurons per fact: mean {}, median {}, min {}, max {}; none in {} of {} facts",
        num(per_fact.mean),
        opt(per_fact.median, |m| m.to_string()),
        per_fact.min,
        per_fact.max,
        per_fact.zero,
        per_fact.facts
    );
    let overall = &report.layer_distribution.overall;
    if overall.neurons > 0 {
        let (first, share) = top_layers(report);
        let (most, most_share) = overall.share.iter().enumerate().fold(
            (0, 0.0),
            |best, (l, &s)| if s > best.1 { (l, s) } else { best },
        );
        let range = if first + 1 == report.layers {
            format!("layer {first}")
        } else {
            format!("layers {first}–{}", report.layers - 1)
        };
        let _ = writeln!(
            s,
            "layers: {} of refined neurons in the top {} of {} layers ({range}); most in layer \
             {most} ({})",
            percent1(share, false),
            report.layers - first,
            report.layers,
            percent1(most_share, false)
        );
    }
    let shared = &report.shared_neurons;
    let _ = writeln!(
        s,
        "shared neurons per fact pair: {} within a relation ({} pairs), {} across relations ({} \
         pairs)",
        num(shared.same_relation.mean),
        shared.same_relation.pairs,
        num(shared.different_relation.mean),
        shared.different_relation.pairs
    );
    for p in &report.probes {
        let _ = writeln!(s, "{}", probe_line(p));
    }
    if let Some(b) = &report.baseline {
        let _ = writeln!(
            s,
            "activation baseline: refined neurons per fact: mean {}, median {}; shared neurons \
             per fact pair: {} within a relation, {} across relations",
            num(b.neurons_per_fact.overall.mean),
            opt(b.neurons_per_fact.overall.median, |m| m.to_string()),
            num(b.shared_neurons.same_relation.mean),
            num(b.shared_neurons.different_relation.mean)
        );
    }
    for e in &report.edits {
        let r = &e.report;
        let relations = r.relations.join(", ");
        let mut parts = Vec::new();
        if let Some(f) = &r.edited_facts {
            parts.push(format!(
                "success {}, change rate {}",
                arrow(Some(f.before.success), Some(f.after.success), pct),
                arrow(Some(f.before.change_rate), Some(f.after.change_rate), pct)
            ));
            // Older reports lack the editors' metrics: their line stays as it was.
            if let Some(reliability) = f.reliability {
                let mut editors = format!("reliability {}", pct(Some(reliability)));
                if let Some(g) = f.generalization {
                    editors.push_str(&format!(", generalization {}", pct(Some(g))));
                }
                if let Some(l) = f.record_locality {
                    editors.push_str(&format!(
                        ", record locality {} on {} prompt(s)",
                        pct(Some(l)),
                        f.record_locality_prompts
                    ));
                }
                parts.push(editors);
            }
        }
        let local: Vec<String> = [
            ("same relation", &r.same_relation),
            ("other relations", &r.other_relation),
        ]
        .into_iter()
        .filter_map(|(name, set)| {
            let set = set.as_ref()?;
            Some(format!(
                "{name} {} (KL {})",
                pct(Some(set.locality?)),
                opt(set.kl, |k| format!("{k:.4}"))
            ))
        })
        .collect();
        if !local.is_empty() {
            parts.push(format!("locality {}", local.join(", ")));
        }
        let ppl = |set: &Option<GroupMetrics>, name: &str| {
            set.as_ref().map(|set| {
                format!(
                    "{name} {}",
                    arrow(Some(set.before.perplexity), Some(set.after.perplexity), num)
                )
            })
        };
        let ppls: Vec<String> = [
            ppl(&r.same_relation, "same relation"),
            ppl(&r.other_relation, "other relations"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !ppls.is_empty() {
            parts.push(format!("perplexity {}", ppls.join(", ")));
        }
        let _ = writeln!(
            s,
            "edit {}: {} ({}) of {}: {}",
            file_name(&e.file),
            operation(r),
            how(r),
            if relations.is_empty() {
                NONE
            } else {
                &relations
            },
            if parts.is_empty() {
                "no metrics".to_string()
            } else {
                parts.join("; ")
            }
        );
    }
    s
}

fn image(s: &mut String, report: &Report, name: &str) {
    if let Some(f) = report.figures.iter().find(|f| f.name == name) {
        let _ = writeln!(s, "![{}]({})\n", f.title, f.file);
    }
}

fn count_row(s: &mut String, name: &str, c: &CountSummary) {
    let _ = writeln!(
        s,
        "| {name} | {} | {} | {} | {} | {} | {} | {} |",
        c.facts,
        c.neurons,
        num(c.mean),
        opt(c.median, |m| m.to_string()),
        c.min,
        c.max,
        c.zero
    );
}

fn effect_row(s: &mut String, name: &str, facts: usize, skipped: usize, e: &Effect) {
    let _ = writeln!(
        s,
        "| {name} | {facts} | {skipped} | {} | {} | {} | {} | {} | {} |",
        e.prompts,
        opt(e.before, |v| format!("{v:.4}")),
        opt(e.after, |v| format!("{v:.4}")),
        signed(e.change),
        opt(e.control_after, |v| format!("{v:.4}")),
        signed(e.control_change)
    );
}

fn eval_cells(m: &GoldMetrics, n: &GoldMetrics) -> String {
    format!(
        "{} | {} ({:+.2})",
        arrow(Some(m.accuracy), Some(n.accuracy), pct),
        arrow(Some(m.perplexity), Some(n.perplexity), num),
        n.perplexity - m.perplexity
    )
}

fn edit_cells(b: &AnswerMetrics, a: &AnswerMetrics) -> String {
    format!(
        "{} | {} | {} | {}",
        arrow(Some(b.success), Some(a.success), pct),
        arrow(Some(b.success_at_5), Some(a.success_at_5), pct),
        arrow(Some(b.change_rate), Some(a.change_rate), pct),
        arrow(Some(b.mrr), Some(a.mrr), num)
    )
}

/// `report.md`: every table, with the plots beside them.
pub fn markdown(report: &Report) -> String {
    let mut s = String::new();
    let p = &report.params;
    let method = match (p.steps, p.rule) {
        (_, Some(rule @ crate::attribution::ig::Rule::GaussKronrod)) => format!(
            "integrated gradients ({rule}, tolerance {})",
            p.tolerance
                .unwrap_or(crate::attribution::ig::DEFAULT_TOLERANCE)
        ),
        (Some(steps), Some(rule)) => format!("integrated gradients ({steps} steps, {rule} rule)"),
        _ => "activation (the paper's baseline)".to_string(),
    };
    let inputs: Vec<String> = report
        .inputs
        .neurons
        .iter()
        .map(|p| format!("`{}`", p.display()))
        .collect();
    let _ = writeln!(s, "# Knowledge neurons report\n");
    let _ = writeln!(
        s,
        "Made by kn {} from {} ({} facts of {} relations). Model `{}` (weights sha256 `{}`); \
         {method}, threshold {}, share {}{}, at least {} prompts. {} layers ({}).\n",
        report.kn_version,
        inputs.join(", "),
        report.facts,
        report.relations.len(),
        report.model.source,
        report.model.weights_sha256,
        p.threshold,
        p.share,
        if p.adaptive == Some(true) {
            " (adaptive per relation)"
        } else {
            ""
        },
        p.min_prompts,
        report.layers,
        layers_from(report)
    );

    let _ = writeln!(s, "## Refined neurons per fact\n");
    let _ = writeln!(
        s,
        "| relation | facts | neurons | mean | median | min | max | facts without any |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|");
    count_row(&mut s, "**all**", &report.neurons_per_fact.overall);
    for r in &report.neurons_per_fact.by_relation {
        count_row(&mut s, &r.relation, &r.counts);
    }
    s.push('\n');
    image(&mut s, report, "neurons-per-fact");

    let _ = writeln!(s, "## Refined neurons over layers (the paper's Figure 3)\n");
    image(&mut s, report, "layers");
    let _ = writeln!(s, "| layer | refined neurons | share |");
    let _ = writeln!(s, "|--:|--:|--:|");
    let overall = &report.layer_distribution.overall;
    for (l, (c, sh)) in overall.counts.iter().zip(&overall.share).enumerate() {
        let _ = writeln!(s, "| {l} | {c} | {} |", percent1(*sh, false));
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "Per relation (share of each relation's refined neurons):\n"
    );
    image(&mut s, report, "layers-by-relation");

    let shared = &report.shared_neurons;
    let _ = writeln!(s, "## Shared neurons between fact pairs\n");
    let _ = writeln!(s, "| fact pairs | pairs | shared neurons | mean per pair |");
    let _ = writeln!(s, "|---|--:|--:|--:|");
    for (name, m) in [
        ("same relation", &shared.same_relation),
        ("different relations", &shared.different_relation),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} |",
            m.pairs,
            m.shared,
            num(m.mean)
        );
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "Mean per relation pair (diagonal: pairs within a relation):\n"
    );
    image(&mut s, report, "shared-neurons");

    if let Some(b) = &report.baseline {
        let _ = writeln!(
            s,
            "## The activation baseline beside the knowledge neurons\n"
        );
        let _ = writeln!(
            s,
            "The same statistics for the neurons of the paper's baseline (score = activation, \
             threshold {}, share {}; {} facts).\n",
            b.params.threshold, b.params.share, b.facts
        );
        let _ = writeln!(
            s,
            "| | knowledge neurons | activation baseline |\n|---|--:|--:|"
        );
        let (k, a) = (
            &report.neurons_per_fact.overall,
            &b.neurons_per_fact.overall,
        );
        let _ = writeln!(
            s,
            "| refined neurons per fact, mean | {} | {} |",
            num(k.mean),
            num(a.mean)
        );
        let median = |c: &CountSummary| opt(c.median, |m| m.to_string());
        let _ = writeln!(
            s,
            "| refined neurons per fact, median | {} | {} |",
            median(k),
            median(a)
        );
        let _ = writeln!(s, "| facts without any | {} | {} |", k.zero, a.zero);
        let top = |share: &[f64]| {
            let k = share.len().div_ceil(4).max(1).min(share.len());
            percent1(share[share.len() - k..].iter().sum(), false)
        };
        let _ = writeln!(
            s,
            "| share in the top quarter of the layers | {} | {} |",
            top(&report.layer_distribution.overall.share),
            top(&b.layer_distribution.overall.share)
        );
        for (name, x, y) in [
            (
                "shared neurons per pair, same relation",
                &report.shared_neurons.same_relation,
                &b.shared_neurons.same_relation,
            ),
            (
                "shared neurons per pair, different relations",
                &report.shared_neurons.different_relation,
                &b.shared_neurons.different_relation,
            ),
        ] {
            let _ = writeln!(s, "| {name} | {} | {} |", num(x.mean), num(y.mean));
        }
        s.push('\n');
    }

    for probe in &report.probes {
        let (title, figure) = match probe.mode {
            super::input::ProbeMode::Suppress => ("Suppressing", 4),
            super::input::ProbeMode::Amplify => ("Amplifying", 5),
        };
        let beside = match probe.control {
            ControlKind::Random => String::new(),
            other => format!(", beside {}", control_name(other)),
        };
        let _ = writeln!(
            s,
            "## {title} {}{beside} (the paper's Figure {figure})\n",
            neurons_name(probe.method)
        );
        let _ = writeln!(
            s,
            "Factor {}, control: {}. Change = (mean after − mean before) / mean before of the \
             gold answer's probability.\n",
            probe.factor,
            probe.control.name()
        );
        image(&mut s, report, &probe.name);
        let _ = writeln!(
            s,
            "| relation | facts | skipped | prompts | P(gold) before | after | change | control \
             after | control change |"
        );
        let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|");
        effect_row(
            &mut s,
            "**all**",
            probe.facts,
            probe.skipped,
            &probe.overall,
        );
        for r in &probe.by_relation {
            effect_row(&mut s, &r.relation, r.facts, r.skipped, &r.effect);
        }
        s.push('\n');
    }

    if !report.edits.is_empty() {
        let _ = writeln!(s, "## Edits\n");
        let updates: Vec<_> = report
            .edits
            .iter()
            .filter(|e| e.report.edited_facts.is_some())
            .collect();
        if !updates.is_empty() {
            let _ = writeln!(s, "Edited facts, before → after:\n");
            let _ = writeln!(
                s,
                "| report | operation | relations | facts | prompts | success | success@5 | change \
                 rate | MRR | skipped |"
            );
            let _ = writeln!(s, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|");
            for e in updates {
                let r = &e.report;
                let Some(f) = &r.edited_facts else { continue };
                let _ = writeln!(
                    s,
                    "| `{}` | {} ({}) | {} | {} | {} | {} | {} |",
                    file_name(&e.file),
                    operation(r),
                    how(r),
                    r.relations.join(", "),
                    f.facts,
                    f.prompts,
                    edit_cells(&f.before, &f.after),
                    r.skipped.len()
                );
            }
            s.push('\n');
        }
        editors_table(&mut s, report);
        let per_fact: Vec<_> = report
            .edits
            .iter()
            .filter(|e| !e.report.per_fact.is_empty())
            .collect();
        if !per_fact.is_empty() {
            let _ = writeln!(s, "Each fact edited alone (`--each`), after the edit:\n");
            let _ = writeln!(
                s,
                "| report | fact | relation | reliability | generalization | locality (same \
                 relation) | KL (same) | locality (other relations) | KL (other) |"
            );
            let _ = writeln!(s, "|---|---|---|--:|--:|--:|--:|--:|--:|");
            for e in per_fact {
                for f in &e.report.per_fact {
                    let same = f.same_relation.as_ref();
                    let other = f.other_relation.as_ref();
                    let kl = |v: Option<f64>| opt(v, |k| format!("{k:.4}"));
                    let _ = writeln!(
                        s,
                        "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
                        file_name(&e.file),
                        f.id,
                        f.relation.as_deref().unwrap_or(NONE),
                        pct(f.edited_facts.reliability),
                        pct(f.edited_facts.generalization),
                        pct(same.and_then(|g| g.locality)),
                        kl(same.and_then(|g| g.kl)),
                        pct(other.and_then(|g| g.locality)),
                        kl(other.and_then(|g| g.kl))
                    );
                }
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "Locality, before → after (perplexity of gold answers, its change in brackets; \
             locality = share of prompts whose top-1 the edit left unchanged, KL = mean \
             KL(before ‖ after) at the answer position):\n"
        );
        let _ = writeln!(
            s,
            "| report | operation | set | facts | accuracy | perplexity | locality | KL |"
        );
        let _ = writeln!(s, "|---|---|---|--:|--:|--:|--:|--:|");
        for e in &report.edits {
            let r = &e.report;
            let how = format!("{} ({})", operation(r), how(r));
            let sets = [
                ("same relation", r.same_relation.as_ref()),
                ("other relations", r.other_relation.as_ref()),
            ];
            let per_relation = r
                .per_relation
                .iter()
                .map(|set| (set.relation.as_deref().unwrap_or(NONE), Some(set)));
            let mut any = false;
            for (name, set) in sets.into_iter().chain(per_relation) {
                let Some(set) = set else { continue };
                any = true;
                let _ = writeln!(
                    s,
                    "| `{}` | {how} | {name} | {} | {} | {} | {} |",
                    file_name(&e.file),
                    set.facts,
                    eval_cells(&set.before, &set.after),
                    pct(set.locality),
                    opt(set.kl, |k| format!("{k:.4}"))
                );
            }
            if !any {
                let _ = writeln!(
                    s,
                    "| `{}` | {how} | (no evaluation set) | {NONE} | {NONE} | {NONE} | {NONE} | \
                     {NONE} |",
                    file_name(&e.file)
                );
            }
        }
        s.push('\n');
    }
    s
}

/// The editors' metrics of the edit reports that have them (reports made before they
/// existed are left out), in a table of their own so the paper's tables keep their shape.
fn editors_table(s: &mut String, report: &Report) {
    let has = |r: &EditReport| {
        r.edited_facts.is_some_and(|f| f.reliability.is_some())
            || [&r.same_relation, &r.other_relation]
                .into_iter()
                .flatten()
                .any(|g| g.locality.is_some())
    };
    let rows: Vec<_> = report.edits.iter().filter(|e| has(&e.report)).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "Editors' metrics, after the edit (reliability: the new answer is top-1 on the \
         prompts the edit used; generalization: the same on the held-out prompts; locality: \
         share of the evaluation prompts whose top-1 the edit left unchanged; KL: mean \
         KL(before ‖ after) at the answer position):\n"
    );
    let _ = writeln!(
        s,
        "| report | operation | reliability | held-out prompts | generalization | locality \
         (same relation) | KL (same) | locality (other relations) | KL (other) |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    let kl = |v: Option<f64>| opt(v, |k| format!("{k:.4}"));
    for e in rows {
        let r = &e.report;
        let f = r.edited_facts.as_ref();
        let same = r.same_relation.as_ref();
        let other = r.other_relation.as_ref();
        let _ = writeln!(
            s,
            "| `{}` | {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
            file_name(&e.file),
            operation(r),
            how(r),
            pct(f.and_then(|f| f.reliability)),
            f.map_or(0, |f| f.held_out_prompts),
            pct(f.and_then(|f| f.generalization)),
            pct(same.and_then(|g| g.locality)),
            kl(same.and_then(|g| g.kl)),
            pct(other.and_then(|g| g.locality)),
            kl(other.and_then(|g| g.kl))
        );
    }
    s.push('\n');
}
