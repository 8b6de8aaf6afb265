#!/usr/bin/env python3
"""Independent PyTorch/transformers reference for `kn` knowledge-neuron attribution.

What it does
------------
Implements the integrated-gradients (IG) knowledge-neuron attribution of Dai et
al., "Knowledge Neurons in Pretrained Transformers" (ACL 2022), exactly as their
released code does it (left Riemann sum, m = 20, baseline 0), on the AntiBERTy BERT MLM loaded as
`transformers.BertForMaskedLM` (same loader and checks as antiberty_predict.py),
and writes a golden JSON file for the Rust tests.

For every fact line of a JSONL file (`{"id", "relation", "answer", "prompts"}`,
residues separated by spaces, one `[MASK]` per prompt) and every prompt:

  * normal forward: w[L] = post-GELU FFN activation (output of
    `bert.encoder.layer[L].intermediate`, 2048 values) at the [MASK] position for
    every layer L, and P(1) = softmax probability of the gold token at the mask.
  * for each layer L = 0..7, one batch of m = 20 copies of the input in which a
    forward hook REPLACES layer L's intermediate output at the mask position by
    alpha_k * w[L], alpha_k = k/m, k = 0..m-1 ("left" Riemann rule; other
    positions and layers untouched, every layer recomputed from the embeddings).
    P(alpha_k) = softmax probability (not log-prob) of the gold token at the mask;
    g_k = dP/d(replaced vector) at alpha_k * w[L] (autograd).
    Attr[L, i] = w[L, i] * (1/m) * sum_k g_k[i].
  * completeness per layer: sum_i Attr[L, i] vs target P(1) - P(0) (P(0) is the
    k = 0 point of the batch).
  * coarse set: neurons with Attr >= 0.2 * max (max over all layers x neurons of
    the prompt); baseline "activation" method: score = w (no gradients),
    coarse set w >= 0.5 * max.
  * refined set of a fact with n prompts: neurons in the coarse sets of at least
    max(0.7 * n, 3) prompts (count >= that real number); same rule for the
    activation baseline.

Everything is computed in float64 (`model.double()`, hook values float64) so the
file is an accurate reference; `kn` runs float32 and must compare with a relative
tolerance.  Eval mode, one prompt per batch (no padding), attention mask all
ones, token_type_ids all zeros.  Floats are written with Python's shortest
round-trip repr; nothing is rounded.

Output: one JSON object
  {"generator", "torch", "transformers", "dtype": "float64", "model_sha256",
   "steps": 20, "rule": "left", "threshold": 0.2, "share": 0.7,
   "min_prompts": 3, "activation_threshold": 0.5,
   "facts": [{"id", "relation", "answer", "answer_id",
              "prompts": [{"prompt", "mask_position", "gold_probability" (= P(1)),
                           "max_score", "top": [[layer, index, score] x 50,
                           descending score, ties by (layer, index)],
                           "coarse": [[layer, index], ...] sorted,
                           "completeness": [{"layer", "sum", "target"} x 8],
                           "activation_max", "activation_coarse": sorted,
                           "scores" (first prompt of the first fact only):
                              {"7": [2048 Attr], "3": [2048 Attr]}}],
              "refined": sorted, "activation_refined": sorted}]}

Diagnostics (stderr): per prompt P(1), completeness relative error per layer,
coarse sizes, closeness of any neuron to the threshold; per fact refined sizes;
and a central finite-difference check of the IG gradient for one prompt.

Run (from the repository root)
------------------------------
    HF_HUB_OFFLINE=1 /tmp/goldenv/bin/python scripts/golden/antiberty_attribute.py \
        --model models/antiberty \
        --facts tests/data/antiberty_facts.jsonl \
        --out tests/golden/antiberty_attribute.json

Debian's torch calls the reference BLAS (libblas3, ~2 GFLOPS), which makes this
run take hours on 2 cores.  For speed only (float64 results agree to ~1e-15
relative), point the dynamic loader at OpenBLAS without installing it:

    mkdir -p /tmp/openblas && cd /tmp/openblas && apt-get download libopenblas0-pthread \
        && dpkg -x libopenblas0-pthread_*.deb root && cd -
    export LD_LIBRARY_PATH=/tmp/openblas/root/usr/lib/x86_64-linux-gnu/openblas-pthread
    export OPENBLAS_NUM_THREADS=1

With it the run takes about 15-30 minutes on a busy 2-core machine.

Versions used to produce tests/golden/antiberty_attribute.json
---------------------------------------------------------------
    Python 3.11 (Debian /usr/bin/python3), torch 1.13.1 (Debian python3-torch,
    reports __version__ "1.13.0a0"), numpy 1.24.2 (Debian), transformers 4.47.1,
    tokenizers 0.21.4 (PyPI, in a --system-site-packages venv), OpenBLAS 0.3.21
    (Debian libopenblas0-pthread 0.3.21+ds-4, via LD_LIBRARY_PATH as above).
    See scripts/golden/README.md for the venv recipe.
"""

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from antiberty_predict import load_model, sha256_file  # noqa: E402

STEPS = 20
RULE = "left"
THRESHOLD = 0.2
SHARE = 0.7
MIN_PROMPTS = 3
ACTIVATION_THRESHOLD = 0.5
TOP = 50
FULL_SCORE_LAYERS = ("7", "3")
DTYPE = torch.float64


class Hook:
    """Forward hooks on every `intermediate` module (output = post-GELU FFN).

    capture mode (replace is None): stores output[0, pos] for every layer.
    replace mode: for layer `replace_layer`, output[:, pos, :] = replace
    (a [batch, 2048] tensor, possibly requiring grad); other layers untouched.
    """

    def __init__(self, model):
        self.pos = None
        self.capture = {}
        self.replace_layer = None
        self.replace = None
        for li, layer in enumerate(model.bert.encoder.layer):
            layer.intermediate.register_forward_hook(self._make(li))

    def _make(self, li):
        def hook(module, inputs, output):
            assert output.dim() == 3 and output.dtype == DTYPE
            if self.replace is None:
                assert output.shape[0] == 1
                self.capture[li] = output[0, self.pos].detach().clone()
                return None
            if li != self.replace_layer:
                return None
            assert output.shape[0] == self.replace.shape[0]
            out = output.clone()
            out[:, self.pos, :] = self.replace
            return out

        return hook


def encode(tok, prompt):
    input_ids = tok(prompt)["input_ids"]
    words = prompt.split()
    assert len(input_ids) == len(words) + 2, (prompt, len(input_ids), len(words))
    assert input_ids[0] == tok.cls_token_id and input_ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in input_ids, prompt
    assert input_ids.count(tok.mask_token_id) == 1, prompt
    return input_ids, input_ids.index(tok.mask_token_id)


def gold_prob(model, input_ids, pos, answer_id, batch):
    ids = torch.tensor([input_ids] * batch, dtype=torch.long)
    logits = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=torch.zeros_like(ids),
    ).logits[:, pos]
    assert logits.dtype == DTYPE
    return torch.softmax(logits, dim=-1)[:, answer_id]


def ig_layer(model, hook, input_ids, pos, answer_id, w, layer):
    """Returns (attr [2048], grads [m, 2048], probs [m])."""
    alphas = torch.arange(STEPS, dtype=DTYPE) / STEPS  # left rule: k/m, k=0..m-1
    x = (alphas[:, None] * w[None, :]).detach().requires_grad_(True)
    hook.replace_layer, hook.replace = layer, x
    try:
        probs = gold_prob(model, input_ids, pos, answer_id, STEPS)
        (grads,) = torch.autograd.grad(probs.sum(), x)  # batch rows independent
    finally:
        hook.replace_layer, hook.replace = None, None
    attr = w * grads.sum(0) / STEPS
    return attr.detach(), grads.detach(), probs.detach()


def fd_check(model, hook, input_ids, pos, answer_id, w, layer, grads, k, idxs, h=1e-5):
    """Central finite difference of P w.r.t. entry i of the replaced vector at alpha_k."""
    base = (k / STEPS) * w
    rows = []
    for i in idxs:
        for s in (+1.0, -1.0):
            v = base.clone()
            v[i] += s * h
            rows.append(v)
    hook.replace_layer, hook.replace = layer, torch.stack(rows)
    try:
        with torch.no_grad():
            p = gold_prob(model, input_ids, pos, answer_id, len(rows))
    finally:
        hook.replace_layer, hook.replace = None, None
    out = []
    for j, i in enumerate(idxs):
        fd = float((p[2 * j] - p[2 * j + 1]) / (2 * h))
        ig = float(grads[k, i])
        out.append((i, ig, fd, abs(ig - fd) / max(abs(fd), 1e-300)))
    return out


def sorted_pairs(pairs):
    return [list(p) for p in sorted(pairs)]


def coarse_of(scores, t):
    """scores: [layers, 2048]; neurons with score >= t * max (max over all)."""
    mx = float(scores.max())
    cut = t * mx
    sel = (scores >= cut).nonzero().tolist()
    # closest any neuron comes to the cut, relative to max
    gap = float(((scores - cut).abs() / abs(mx)).min())
    return mx, sorted_pairs(tuple(x) for x in sel), gap


def refine(coarse_sets, n):
    need = max(SHARE * n, MIN_PROMPTS)
    counts = {}
    for cs in coarse_sets:
        for p in cs:
            counts[tuple(p)] = counts.get(tuple(p), 0) + 1
    return sorted_pairs(p for p, c in counts.items() if c >= need), counts, need


def f64_list(t):
    return [float(x) for x in t.detach().to(torch.float64).tolist()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--facts", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model.double()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    assert model.config.hidden_act == "gelu"  # exact erf GELU
    n_layers = model.config.num_hidden_layers
    tok = BertTokenizer(os.path.join(args.model, "vocab.txt"), do_lower_case=False)
    hook = Hook(model)

    with open(args.facts) as f:
        facts_in = [json.loads(l) for l in f if l.strip()]

    facts_out = []
    worst_completeness = 0.0
    for fi, fact in enumerate(facts_in):
        answer_id = tok.convert_tokens_to_ids(fact["answer"])
        assert answer_id != tok.unk_token_id, fact["answer"]
        prompts_out, coarse_sets, act_sets = [], [], []
        for pi, prompt in enumerate(fact["prompts"]):
            tp = time.time()
            input_ids, pos = encode(tok, prompt)
            hook.pos = pos

            hook.capture = {}
            with torch.no_grad():
                p1 = float(gold_prob(model, input_ids, pos, answer_id, 1)[0])
            w = torch.stack([hook.capture[l] for l in range(n_layers)])  # [L, 2048]
            hook.capture = {}

            attrs, completeness = [], []
            for layer in range(n_layers):
                attr, grads, probs = ig_layer(model, hook, input_ids, pos, answer_id,
                                              w[layer], layer)
                attrs.append(attr)
                s, target = float(attr.sum()), p1 - float(probs[0])
                completeness.append({"layer": layer, "sum": s, "target": target})
                if fi == 0 and pi == 0 and layer in (3, 7):
                    top_i = int(attr.abs().argmax())
                    idxs = sorted({top_i, 0, 1000, 2047})
                    for k in (0, 10, 19):
                        for i, ig, fd, rel in fd_check(model, hook, input_ids, pos,
                                                       answer_id, w[layer], layer,
                                                       grads, k, idxs):
                            print(f"FD check layer {layer} alpha={k}/{STEPS} i={i}: "
                                  f"autograd={ig:.12e} central_fd={fd:.12e} "
                                  f"rel_err={rel:.2e}", file=sys.stderr)
            scores = torch.stack(attrs)  # [L, 2048]

            mx, coarse, gap = coarse_of(scores, THRESHOLD)
            amx, acoarse, agap = coarse_of(w, ACTIVATION_THRESHOLD)
            flat = [(-float(scores[l, i]), l, i) for l in range(n_layers)
                    for i in range(scores.shape[1])]
            flat.sort()
            top = [[l, i, -ns] for ns, l, i in flat[:TOP]]
            cut = THRESHOLD * mx
            near = sum(1 for _, _, s in top if abs(s - cut) <= 1e-4 * abs(mx))
            # smallest gap between consecutive scores among the top 51 (order and
            # membership of the top-50 list), relative to max
            order_gap = min(flat[j + 1][0] - flat[j][0] for j in range(TOP)) / abs(mx)

            rec = {
                "prompt": prompt,
                "mask_position": pos,
                "gold_probability": p1,
                "max_score": mx,
                "top": top,
                "coarse": coarse,
                "completeness": completeness,
                "activation_max": amx,
                "activation_coarse": acoarse,
            }
            if fi == 0 and pi == 0:
                rec["scores"] = {l: f64_list(scores[int(l)]) for l in FULL_SCORE_LAYERS}
            prompts_out.append(rec)
            coarse_sets.append(coarse)
            act_sets.append(acoarse)

            rel = [abs(c["sum"] - c["target"]) / abs(c["target"]) for c in completeness]
            worst_completeness = max(worst_completeness, max(rel))
            print(f"{fact['id']}[{pi}] pos={pos} P1={p1:.6f} max={mx:.6e} "
                  f"coarse={len(coarse)} act_coarse={len(acoarse)} "
                  f"min_gap/max={gap:.3e} act_min_gap/max={agap:.3e} "
                  f"top50_within_1e-4={near} top51_min_step/max={order_gap:.3e} "
                  f"({time.time() - tp:.0f}s)", file=sys.stderr)
            print("    completeness rel err per layer: "
                  + " ".join(f"L{c['layer']}:{r:.2%}(t={c['target']:.3e},"
                            f"abs={abs(c['sum'] - c['target']):.1e})"
                             for c, r in zip(completeness, rel)), file=sys.stderr)

        refined, counts, need = refine(coarse_sets, len(coarse_sets))
        arefined, acounts, _ = refine(act_sets, len(act_sets))
        facts_out.append({
            "id": fact["id"],
            "relation": fact["relation"],
            "answer": fact["answer"],
            "answer_id": answer_id,
            "prompts": prompts_out,
            "refined": refined,
            "activation_refined": arefined,
        })
        print(f"{fact['id']}: need count >= {need}; refined={refined} "
              f"activation_refined={arefined}", file=sys.stderr)
        # neurons one prompt short of (or just at) the refinement cut
        print(f"    IG counts>=2: " + str(sorted((c, p) for p, c in counts.items() if c >= 2)[-12:]),
              file=sys.stderr)

    print(f"worst completeness relative error: {worst_completeness:.2%}", file=sys.stderr)

    header = {
        "generator": "scripts/golden/antiberty_attribute.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float64",
        "model_sha256": sha256_file(os.path.join(args.model, "pytorch_model.bin")),
        "steps": STEPS,
        "rule": RULE,
        "threshold": THRESHOLD,
        "share": SHARE,
        "min_prompts": MIN_PROMPTS,
        "activation_threshold": ACTIVATION_THRESHOLD,
    }
    # One prompt record per line; the whole file is a single JSON object.
    head = json.dumps(header)[:-1]
    parts = []
    for fo in facts_out:
        fhead = {k: v for k, v in fo.items() if k not in ("prompts", "refined",
                                                            "activation_refined")}
        parts.append(
            json.dumps(fhead)[:-1] + ', "prompts": [\n'
            + ",\n".join(json.dumps(p) for p in fo["prompts"])
            + '\n], "refined": ' + json.dumps(fo["refined"])
            + ', "activation_refined": ' + json.dumps(fo["activation_refined"]) + "}")
    with open(args.out, "w") as f:
        f.write(head + ', "facts": [\n' + ",\n".join(parts) + "\n]}\n")
    with open(args.out) as f:
        back = json.load(f)
    assert back["facts"] == json.loads(json.dumps(facts_out)), "round trip"
    print(f"wrote {args.out} in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
