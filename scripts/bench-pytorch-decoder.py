#!/usr/bin/env python3
"""The plain PyTorch implementation of the released knowledge-neuron attribution on a
causal LM, timed, for comparison with `kn attribute` on SmolLM2. Not part of the tests.

Done the way EleutherAI's knowledge-neurons library does it: per prompt a normal
forward with hooks that capture every layer's FFN activations at the predicting (last)
position (here: the input of `model.layers[L].mlp.down_proj`, silu(gate) * up), then per
layer one batch of the m = 20 integration points alpha_k * w (alpha_k = k/m, the released
code's left rule), each recomputed over the whole sequence from the embeddings, with a
forward_pre_hook on down_proj replacing the last position, full logits, softmax, and
torch.autograd.grad of the gold probabilities w.r.t. the replaced activations.
Attribution = w * mean_k grad.  float32, eval mode, parameters frozen.

SmolLM2-135M-Instruct is loaded from its GGUF (transformers dequantizes it), as
scripts/fetch-test-models installs it; prompts follow kn's causal rule (text before the
single [MASK], trailing whitespace stripped; the gold token is the one extra token of
`text + " " + answer`).

    /work/venv-ref/bin/python scripts/bench-pytorch-decoder.py \
        --facts tests/data/smollm2_facts.jsonl --steps 20 --threads 2

Prints the time of each prompt and then
    pytorch-decoder: N prompts, X s per prompt (median over prompts), peak RSS Y MiB
Model load is excluded from the timing (peak RSS is the whole process's, load included).
Environment: scripts/golden/README.md (venv with torch 2.15.0, transformers 4.47.1).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))
from decoder_common import (  # noqa: E402
    SMOLLM2_DIR,
    SMOLLM2_GGUF,
    answer_token,
    input_text,
    load_smollm2,
)

import torch  # noqa: E402


def attribute(model, ids, gold, steps):
    layers = model.model.layers
    ids = torch.tensor([ids], dtype=torch.long)
    captured = {}

    def capture(index):
        def hook(_module, args):
            captured[index] = args[0][0, -1].detach().clone()

        return hook

    handles = [l.mlp.down_proj.register_forward_pre_hook(capture(i)) for i, l in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()

    scores = []
    batch_ids = ids.repeat(steps, 1)
    for index, layer in enumerate(layers):
        w = captured[index]
        alphas = torch.arange(steps, dtype=torch.float32).unsqueeze(1) / steps
        scaled = (alphas * w).requires_grad_(True)

        def replace(_module, args):
            x = args[0].clone()
            x[:, -1] = scaled
            return (x,)

        handle = layer.mlp.down_proj.register_forward_pre_hook(replace)
        logits = model(input_ids=batch_ids, use_cache=False).logits[:, -1]
        handle.remove()
        p_gold = torch.softmax(logits, dim=-1)[:, gold]
        (grad,) = torch.autograd.grad(p_gold.sum(), scaled)
        scores.append(w * grad.sum(0) / steps)
    return torch.stack(scores)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", default=SMOLLM2_DIR)
    ap.add_argument("--gguf", default=SMOLLM2_GGUF)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok, model, _ = load_smollm2(args.model, args.gguf, torch.float32)
    facts = [json.loads(line) for line in open(args.facts) if line.strip()]
    prompts = [(p, f["answer"]) for f in facts for p in f["prompts"]]
    times = []
    for prompt, answer in prompts:
        ids, gold = answer_token(tok, input_text(prompt), answer)
        start = time.perf_counter()
        scores = attribute(model, ids, gold, args.steps)
        seconds = time.perf_counter() - start
        times.append(seconds)
        top = divmod(int(scores.argmax()), scores.shape[1])
        print(f"{seconds:8.2f} s  {prompt!r}  (top neuron L{top[0]}.{top[1]})", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(
        f"pytorch-decoder: {len(prompts)} prompts, {statistics.median(times):.2f} s per prompt "
        f"(median over prompts), peak RSS {rss:.0f} MiB"
    )
    print(
        f"(torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"{args.steps} steps, float32; model load excluded)"
    )


if __name__ == "__main__":
    main()
