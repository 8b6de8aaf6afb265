"""The paper's findings table from a `kn report` directory made by
scripts/make-smollm2-findings: SmolLM2's numbers beside bert-base-cased's (the paper's
own numbers). Reads DIR/report.json, DIR/fixed-p/report.json, DIR/run.json
and DIR/known.tsv; prints Markdown.

    python3 scripts/smollm2-table.py docs/smollm2 > docs/smollm2/table.md
"""

import json
import os
import sys


def minus(text):
    """The paper's minus sign."""
    return text.replace("-", "−")


def pct(x, sign=True):
    if x is None:
        return "—"
    if abs(100 * x) < 0.05:
        return "0.0%"
    return minus(f"{100 * x:+.1f}%" if sign else f"{100 * x:.1f}%")


def num(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def top_share(share, fraction):
    k = max(1, -(-len(share) * fraction // 1))
    k = int(min(k, len(share)))
    return sum(share[len(share) - k:])


def main(directory):
    report = json.load(open(os.path.join(directory, "report.json")))
    fixed = json.load(open(os.path.join(directory, "fixed-p", "report.json")))
    run = json.load(open(os.path.join(directory, "run.json")))
    known = [line.rstrip("\n").split("\t") for line in open(os.path.join(directory, "known.tsv"))][1:]
    prompts = sum(int(row[4]) for row in known)
    known_facts = sum(int(row[5]) for row in known)
    probes = {p["name"]: p for p in report["probes"]}
    edits = {os.path.basename(e["file"]): e for e in report["edits"]}
    baseline = report.get("baseline") or {}

    def probe(name, key="change"):
        p = probes.get(name)
        return None if p is None else p["overall"][key]

    def update(name):
        return edits.get(name) or {}

    rows = []
    rows.append((
        "facts / relations / prompts",
        f"{report['facts']} / {len(report['relations'])} / {prompts}",
        "27,738 / 34 / 253,448",
    ))
    rows.append(("facts the model knows (top-1 on most prompts)", f"{known_facts}", "—"))
    rows.append((
        "refined neurons per fact: fixed p = 0.7 / adaptive p / activation baseline",
        f"{num(fixed['neurons_per_fact']['overall']['mean'])} / "
        f"{num(report['neurons_per_fact']['overall']['mean'])} / "
        f"{num(baseline.get('neurons_per_fact', {}).get('overall', {}).get('mean'))}",
        "— / 4.13 / 3.96",
    ))
    rows.append((
        "facts without refined neurons: fixed p / adaptive p",
        f"{fixed['neurons_per_fact']['overall']['zero']} / {report['neurons_per_fact']['overall']['zero']}",
        "—",
    ))
    share = report["layer_distribution"]["overall"]["share"]
    fixed_share = fixed["layer_distribution"]["overall"]["share"]
    rows.append((
        "share of refined neurons in the top half / top quarter of the layers (adaptive; fixed p)",
        f"{pct(top_share(share, 0.5), False)} / {pct(top_share(share, 0.25), False)}; "
        f"{pct(top_share(fixed_share, 0.5), False)} / {pct(top_share(fixed_share, 0.25), False)}",
        "most in the top layers",
    ))
    shared = report["shared_neurons"]
    fixed_shared = fixed["shared_neurons"]
    rows.append((
        "shared neurons per fact pair, same / different relation (adaptive; fixed p)",
        f"{num(shared['same_relation']['mean'])} / {num(shared['different_relation']['mean'])}; "
        f"{num(fixed_shared['same_relation']['mean'])} / {num(fixed_shared['different_relation']['mean'])}",
        "1.23 / 0.09",
    ))
    if baseline:
        b = baseline["shared_neurons"]
        rows.append((
            "shared neurons per fact pair, same / different relation (activation)",
            f"{num(b['same_relation']['mean'])} / {num(b['different_relation']['mean'])}",
            "— / 1.92",
        ))
    known_probed = known_facts
    for mode, paper in (("suppress", "−29.03% / — / — / −1.47%"), ("amplify", "+31.17% / — / — / −1.27%")):
        rows.append((
            f"{mode}{' ×0' if mode == 'suppress' else ' ×2'}, the {known_probed} known facts with neurons: "
            "gold probability change (KN / random neurons / another relation's KN / activation baseline)",
            f"{pct(probe(mode))} / {pct(probe(mode, 'control_change'))} / "
            f"{pct(probe(mode + '-other-relation', 'control_change'))} / "
            f"{pct(probe(mode + '-activation'))}",
            paper,
        ))
    all_facts = os.path.join(directory, "all-facts-suppress.txt")
    if os.path.exists(all_facts):
        for line in open(all_facts):
            cells = line.split()
            if cells and cells[0] == "all":
                rows.append((
                    f"suppress ×0, every fact with neurons ({cells[1]} facts, {cells[2]} prompts): "
                    "KN / random neurons",
                    minus(f"{cells[4]} / {cells[5]}"),
                    "−29.03% / —",
                ))
    for name, label, paper in (
        ("update.scaled.json", "update, rule scaled (paper), KN", "48.5% / 34.4% / — / —"),
        ("update.fixed.json", "update, rule fixed (EleutherAI), KN", "—"),
        ("update.scaled.random.json", "update, rule scaled, random neurons", "4.7% / 0.0% / — / —"),
        ("update.scaled.all-neurons.json", "update, rule scaled, relation-level neurons kept (not the paper's), KN", "—"),
        ("update.scaled.all-neurons.random.json", "update, rule scaled, relation-level neurons kept, random neurons", "—"),
    ):
        e = update(name).get("edited_facts")
        if not e:
            continue
        a = e["after"]
        rows.append((
            f"{label} ({e['facts']} facts): change rate / success / success@5 / MRR",
            f"{pct(a['change_rate'], False)} / {pct(a['success'], False)} / "
            f"{pct(a['success_at_5'], False)} / {num(a['mrr'], 3)}",
            paper,
        ))
    for name, label, paper in (
        ("update.scaled.json", "update, scaled, KN", "+8.4 / +7.2"),
        ("update.fixed.json", "update, fixed, KN", "—"),
        ("update.scaled.random.json", "update, scaled, random neurons", "—"),
        ("update.scaled.all-neurons.json", "update, scaled, relation-level neurons kept, KN", "—"),
        ("update.scaled.all-neurons.random.json", "update, scaled, relation-level neurons kept, random", "—"),
    ):
        e = update(name)
        same, other = e.get("same_relation"), e.get("other_relation")
        if not same or not other:
            continue
        rows.append((
            f"{label}: perplexity before → after, same / other relations",
            f"{num(same['before']['perplexity'], 1)} → {num(same['after']['perplexity'], 1)} / "
            f"{num(other['before']['perplexity'], 1)} → {num(other['after']['perplexity'], 1)}",
            paper + " (increase)",
        ))
    erases = [(n, e) for n, e in sorted(edits.items()) if n.startswith("erase.")]
    if erases:
        def change(set_):
            return set_["after"]["perplexity"] / set_["before"]["perplexity"] - 1
        own = [change(e["same_relation"]) for _, e in erases]
        others = [change(e["other_relation"]) for _, e in erases]
        rel = ", ".join(
            f"{e['relations'][0]} {pct(change(e['same_relation']))} (others {pct(change(e['other_relation']))})"
            for _, e in erases
        )
        rows.append((
            f"erase ({len(erases)} relations): perplexity change, erased relation",
            f"{pct(min(own))} to {pct(max(own))}",
            "+36.7% to +141.2%",
        ))
        rows.append((
            "erase: perplexity change, other relations",
            f"{pct(min(others))} to {pct(max(others))}",
            "+1.1% to +10.1%",
        ))
        rows.append(("erase, per relation", rel, "—"))
        acc = ", ".join(
            f"{e['relations'][0]} {pct(e['same_relation']['before']['accuracy'], False)} → "
            f"{pct(e['same_relation']['after']['accuracy'], False)}"
            for _, e in erases
        )
        rows.append(("erase: accuracy of the erased relation, before → after", acc, "—"))
    seconds = run.get("total_seconds")
    rows.append((
        "time",
        f"{seconds / 60:.0f} min for the whole run on {run['machine']['cores']} cores "
        f"({run['machine']['cpu']}); attribution {run['seconds'].get('attribute', 0) / prompts:.2f} s per prompt",
        "13.3 s per fact (≈9 prompts) on one V100",
    ))
    print("| measure | SmolLM2-135M-Instruct (Q4_1) | paper (bert-base-cased, ParaRel) |")
    print("|---|---|---|")
    for measure, ours, paper in rows:
        print(f"| {measure} | {ours} | {paper} |")


if __name__ == "__main__":
    main(sys.argv[1])
