#!/usr/bin/env python3
"""Independent float64 PyTorch/transformers reference for `kn` knowledge-neuron
attribution on a causal LM: SmolLM2-135M-Instruct from its GGUF file.

What it does
------------
Integrated-gradients (IG) knowledge-neuron attribution of Dai et al., "Knowledge
Neurons in Pretrained Transformers" (ACL 2022), as their released code does it
(left Riemann rule, m = 20, gold-token probability), transferred to a Llama-style
decoder: the "neurons" of layer L are the 1536 inputs of
`model.layers[L].mlp.down_proj` (= silu(gate_proj(x)) * up_proj(x)) at the LAST
input position, i.e. the position that predicts the answer token.

Model and tokenizer as in smollm2_predict.py (transformers dequantizes the GGUF,
then `.double()`, eval, and decoder_common.exact_float64 makes RMSNorm and RoPE
really float64: transformers 4.47.1 computes both in float32 even in a float64
model).  kn's causal prompt rule (decoder_common.py): the input is
the text before the single [MASK], trailing whitespace stripped; the gold token is
the one extra token of `input_text + " " + answer`.  The tokenizer prepends the BOS
<|im_start|> (id 1) — see smollm2_predict.py.

For every fact line `{"id", "relation", "answer", "prompts"}` and every prompt:

  * normal forward: w[L] = down_proj input at the last position for every layer L
    (0..29); P(1) = softmax probability of the gold token at the last position.
  * for each layer L: one batch of m = 20 copies of the input in which a
    forward_pre_hook on down_proj REPLACES layer L's down_proj input at the last
    position by alpha_k * w[L], alpha_k = k/m, k = 0..m-1 (left rule; other
    positions and layers untouched, every layer recomputed over the full
    sequence).  P(alpha_k) = gold probability at the last position;
    g_k = dP/d(replaced vector) at alpha_k * w[L] (torch.autograd.grad).
    Attr[L, i] = w[L, i] * (1/m) * sum_k g_k[i].
  * completeness per layer: sum_i Attr[L, i] vs target P(1) - P(0) (P(0) is the
    k = 0 point of the batch).
  * coarse set: neurons with Attr >= 0.2 * max (max over all layers x neurons).
  * refined set of a fact with n prompts: neurons in the coarse sets of at least
    max(0.7 * n, 3) prompts (a count c qualifies when c >= 0.7 n and c >= 3).

Output: one JSON object
  {"generator", "model", "gguf_sha256", "transformers", "torch", "dtype": "float64",
   "bos_prepended": true, "steps": 20, "rule": "left", "threshold": 0.2,
   "share": 0.7, "min_prompts": 3, "neuron": "mlp.down_proj input, last position",
   "fd_check": [{"fact", "prompt", "layer", "index", "k", "h", "autograd",
                 "finite_difference"}],
   "facts": [{"id", "relation", "answer", "answer_id",
              "refined": [[layer, index], ...] sorted by (layer, index),
              "prompts": [{"prompt", "input_text", "ids", "gold_probability" (P(1)),
                           "max_score",
                           "top": [[layer, index, score] x 50, descending score,
                                   ties by (layer, index)],
                           "score_50th": score of the 50th entry of top,
                           "threshold_margin": min over ALL neurons of
                                 |score - 0.2*max| / max,
                           "coarse": [[layer, index, score], ...] sorted by
                                 (layer, index),
                           "completeness": [{"layer", "sum", "target"} x 30],
                           "scores" (first prompt of the first fact only):
                                 {"0": [1536 Attr], "29": [1536 Attr]}}]}]}
Floats are Python's shortest round-trip repr; nothing is rounded.

Diagnostics (stderr): progress per layer, per prompt P(1), max completeness
error, coarse size, 50th score and margin; per fact the refined set; and a
central finite-difference check (h = 1e-4 and 1e-5) of the autograd gradient for
the top and the bottom neuron of layer 29 of the first prompt, at k = 10.

Run (from the repository root, after scripts/fetch-test-models)
---------------------------------------------------------------
    nohup /work/venv-ref/bin/python scripts/golden/smollm2_attribute.py \
        --facts tests/data/smollm2_facts.jsonl \
        --out tests/golden/smollm2_attribute.json > /tmp/smollm2_attribute.log 2>&1 &

Versions: see scripts/golden/README.md (torch 2.15.0 CPU, transformers 4.47.1).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_common import (  # noqa: E402
    SMOLLM2_DIR,
    SMOLLM2_GGUF,
    answer_token,
    input_text,
    load_smollm2,
    write_json_records,
)

import torch  # noqa: E402
import transformers  # noqa: E402

STEPS = 20
RULE = "left"
THRESHOLD = 0.2
SHARE = 0.7
MIN_PROMPTS = 3
TOP = 50
FULL_SCORE_LAYERS = ("0", "29")
DTYPE = torch.float64


class Hook:
    """forward_pre_hooks on every layer's mlp.down_proj (input = silu(gate) * up).

    capture mode (replace is None): stores input[0, -1] for every layer.
    replace mode: for layer `replace_layer`, input[:, -1, :] = replace
    (a [batch, 1536] tensor, possibly requiring grad); other layers untouched.
    """

    def __init__(self, model):
        self.capture = {}
        self.replace_layer = None
        self.replace = None
        for li, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.register_forward_pre_hook(self._make(li))

    def _make(self, li):
        def hook(module, args):
            (x,) = args
            assert x.dim() == 3 and x.dtype == DTYPE
            if self.replace is None:
                assert x.shape[0] == 1
                self.capture[li] = x[0, -1].detach().clone()
                return None
            if li != self.replace_layer:
                return None
            assert x.shape[0] == self.replace.shape[0]
            x = x.clone()
            x[:, -1, :] = self.replace
            return (x,)

        return hook


def gold_prob(model, ids, answer_id, batch):
    t = torch.tensor([ids] * batch, dtype=torch.long)
    # num_logits_to_keep=1: the LM head only at the last position (same values).
    logits = model(input_ids=t, use_cache=False, num_logits_to_keep=1).logits[:, -1]
    assert logits.dtype == DTYPE
    return torch.softmax(logits, dim=-1)[:, answer_id]


def normal_forward(model, hook, ids, answer_id):
    hook.capture = {}
    with torch.no_grad():
        p1 = float(gold_prob(model, ids, answer_id, 1)[0])
    n = len(model.model.layers)
    assert sorted(hook.capture) == list(range(n))
    return p1, [hook.capture[i] for i in range(n)]


def ig_layer(model, hook, ids, answer_id, w, layer):
    """Returns (attr [1536], grads [m, 1536], probs [m])."""
    alphas = torch.arange(STEPS, dtype=DTYPE) / STEPS  # left rule: k/m, k=0..m-1
    x = (alphas[:, None] * w[None, :]).detach().requires_grad_(True)
    hook.replace_layer, hook.replace = layer, x
    try:
        probs = gold_prob(model, ids, answer_id, STEPS)
        (grads,) = torch.autograd.grad(probs.sum(), x)  # batch rows are independent
    finally:
        hook.replace_layer, hook.replace = None, None
    attr = w * grads.sum(0) / STEPS
    return attr.detach(), grads.detach(), probs.detach()


def fd_check(model, hook, ids, answer_id, w, layer, grads, k, idxs, h=1e-4):
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
            p = gold_prob(model, ids, answer_id, len(rows))
    finally:
        hook.replace_layer, hook.replace = None, None
    out = []
    for j, i in enumerate(idxs):
        fd = float((p[2 * j] - p[2 * j + 1]) / (2 * h))
        out.append({"layer": layer, "index": i, "k": k, "h": h,
                    "autograd": float(grads[k, i]), "finite_difference": fd})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SMOLLM2_DIR)
    ap.add_argument("--gguf", default=SMOLLM2_GGUF)
    ap.add_argument("--facts", default="tests/data/smollm2_facts.jsonl")
    ap.add_argument("--out", default="tests/golden/smollm2_attribute.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok, model, sha = load_smollm2(args.model, args.gguf, DTYPE)
    hook = Hook(model)
    n_layers = len(model.model.layers)
    with open(args.facts) as f:
        facts = [json.loads(line) for line in f if line.strip()]

    fact_records, fd_records = [], []
    start = time.time()
    for fi, fact in enumerate(facts):
        prompt_records, coarse_sets, answer_ids = [], [], set()
        for pi, prompt in enumerate(fact["prompts"]):
            t0 = time.time()
            text = input_text(prompt)
            ids, answer_id = answer_token(tok, text, fact["answer"])
            answer_ids.add(answer_id)
            p1, ws = normal_forward(model, hook, ids, answer_id)
            attrs, completeness, worst = [], [], 0.0
            for layer in range(n_layers):
                attr, grads, probs = ig_layer(model, hook, ids, answer_id, ws[layer], layer)
                attrs.append(attr)
                s, target = float(attr.sum()), p1 - float(probs[0])
                completeness.append({"layer": layer, "sum": s, "target": target})
                worst = max(worst, abs(s - target) / max(abs(target), 1e-12))
                if fi == 0 and pi == 0 and layer == n_layers - 1:
                    i_top = int(attr.argmax())
                    i_low = int(attr.argmin())
                    fd_records = [
                        r for h in (1e-4, 1e-5)
                        for r in fd_check(model, hook, ids, answer_id, ws[layer], layer,
                                          grads, STEPS // 2, [i_top, i_low], h=h)
                    ]
                    for r in fd_records:
                        r.update({"fact": fact["id"], "prompt": prompt})
                        print(f"  FD check layer {layer} neuron {r['index']} k={r['k']} h={r['h']:g}: "
                              f"autograd {r['autograd']:.12e} central FD "
                              f"{r['finite_difference']:.12e} rel.diff "
                              f"{abs(r['autograd'] - r['finite_difference']) / max(abs(r['autograd']), 1e-300):.2e}",
                              file=sys.stderr)
                print(f"    [{fact['id']} #{pi}] layer {layer:2d}: sum {s:+.6e} target "
                      f"{target:+.6e} ({time.time() - t0:.0f} s)", file=sys.stderr)
            A = torch.stack(attrs)  # [layers, 1536]
            mx = float(A.max())
            assert mx > 0, "max attribution must be positive"
            flat = [(-float(A[l, i]), l, i) for l in range(A.shape[0]) for i in range(A.shape[1])]
            flat.sort()
            top = [[l, i, -ns] for ns, l, i in flat[:TOP]]
            cut = THRESHOLD * mx
            coarse = sorted([[l, i, -ns] for ns, l, i in flat if -ns >= cut],
                            key=lambda e: (e[0], e[1]))
            margin = float((A - cut).abs().min()) / mx
            coarse_sets.append({(l, i) for l, i, _ in coarse})
            rec = {
                "prompt": prompt,
                "input_text": text,
                "ids": ids,
                "gold_probability": p1,
                "max_score": mx,
                "top": top,
                "score_50th": top[-1][2],
                "threshold_margin": margin,
                "coarse": coarse,
                "completeness": completeness,
            }
            if fi == 0 and pi == 0:
                rec["scores"] = {k: A[int(k)].tolist() for k in FULL_SCORE_LAYERS}
            prompt_records.append(rec)
            print(f"  [{fact['id']} #{pi}] {text!r}: P(1)={p1:.6f} max={mx:.6e} "
                  f"worst completeness rel.err {worst:.2e} coarse {len(coarse)} "
                  f"50th {top[-1][2]:.6e} margin {margin:.3e} "
                  f"({time.time() - t0:.0f} s, total {time.time() - start:.0f} s)",
                  file=sys.stderr)
        assert len(answer_ids) == 1, answer_ids
        n = len(fact["prompts"])
        counts = {}
        for cs in coarse_sets:
            for k in cs:
                counts[k] = counts.get(k, 0) + 1
        refined = sorted([list(k) for k, c in counts.items()
                          if c >= SHARE * n and c >= MIN_PROMPTS])
        print(f"fact {fact['id']}: refined {len(refined)} {refined}", file=sys.stderr)
        fact_records.append({
            "id": fact["id"],
            "relation": fact.get("relation"),
            "answer": fact["answer"],
            "answer_id": answer_ids.pop(),
            "refined": refined,
            "prompts": prompt_records,
        })

    header = {
        "generator": "scripts/golden/smollm2_attribute.py",
        "model": args.gguf,
        "gguf_sha256": sha,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float64",
        "bos_prepended": True,
        "steps": STEPS,
        "rule": RULE,
        "threshold": THRESHOLD,
        "share": SHARE,
        "min_prompts": MIN_PROMPTS,
        "neuron": "mlp.down_proj input, last position",
        "fd_check": fd_records,
    }
    write_json_records(args.out, header, "facts", fact_records)
    print(f"wrote {args.out} ({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
