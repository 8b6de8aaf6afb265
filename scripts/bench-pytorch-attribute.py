#!/usr/bin/env python3
"""The released knowledge-neuron attribution in PyTorch, timed, for comparison with
`kn attribute` (scripts/bench-attribute runs both, alternated). Not part of the tests.

Two ways, both the released algorithm (m = 20 copies per layer whose layer-L FFN
activations at the mask are replaced by alpha_k * w, alpha_k = k/m, the left rule;
autograd for dP(gold)/d(replaced activations); float32, eval mode, no weight gradients):

  --way released   as the released code does it: every layer recomputed from the
                   embeddings for every layer L, the MLM head on every row.
  --way strongest  what a careful user adds (the default): a prefix cache (the layers
                   below L are not recomputed: the batch starts from layer L's input,
                   kept from the normal pass) and the MLM head on the mask row only.

    /tmp/goldenv/bin/python scripts/bench-pytorch-attribute.py MODEL_DIR FACTS.jsonl [--way W]

It prints one line: the way, torch's version and threads, the BLAS core type, seconds
per prompt (model load excluded). With --check it also prints the scores' top neurons
of the first prompt for both ways (they must agree). MODEL_DIR: a BertForMaskedLM
directory; environment: scripts/golden/README.md (Debian's python3-torch 1.13 and
transformers 4.47.1). The BLAS kernels: Debian's torch runs on OpenBLAS, which this
machine's environment pins to its AVX2 kernels (OPENBLAS_CORETYPE=Haswell); on an
AVX-512 CPU the fair baseline sets OPENBLAS_CORETYPE=SkylakeX in its own command
(scripts/bench-attribute does). Threads: KN_TORCH_THREADS (torch's intra-op threads,
default every CPU) and OpenBLAS's OPENBLAS_NUM_THREADS; both at 2 on 2 vCPUs
oversubscribe the cores (2.4 times slower here than one torch thread with 2 OpenBLAS
threads, which scripts/bench-attribute sets).
"""
import argparse
import json
import os
import time

import torch
from transformers import BertForMaskedLM, BertTokenizerFast


def normal_pass(model, ids, mask):
    """Every layer's input (hidden_states[L]) and FFN activations at the mask."""
    layers = model.bert.encoder.layer
    captured = {}

    def capture(index):
        def hook(_module, _inputs, output):
            captured[index] = output[0, mask].detach().clone()

        return hook

    handles = [l.intermediate.register_forward_hook(capture(i)) for i, l in enumerate(layers)]
    with torch.no_grad():
        out = model.bert(input_ids=ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    return out.hidden_states, [captured[i] for i in range(len(layers))]


def attribute(model, tokenizer, prompt, answer, way, steps=20):
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    mask = int((ids[0] == tokenizer.mask_token_id).nonzero()[0, 0])
    gold = tokenizer.convert_tokens_to_ids(answer)
    layers = model.bert.encoder.layer
    hidden_states, activations = normal_pass(model, ids, mask)
    alphas = torch.arange(steps, dtype=torch.float32).unsqueeze(1) / steps
    batch_ids = ids.repeat(steps, 1)

    scores = []
    for index, layer in enumerate(layers):
        w = activations[index]
        scaled = (alphas * w).requires_grad_(True)

        def replace(_module, _inputs, output):
            output = output.clone()
            output[:, mask] = scaled
            return output

        handle = layer.intermediate.register_forward_hook(replace)
        if way == "released":
            logits = model(input_ids=batch_ids).logits[:, mask]
        else:
            x = hidden_states[index].expand(steps, -1, -1)
            for upper in layers[index:]:
                x = upper(x)[0]
            logits = model.cls(x[:, mask])
        handle.remove()
        p_gold = torch.softmax(logits, dim=-1)[:, gold]
        (grad,) = torch.autograd.grad(p_gold.sum(), scaled)
        scores.append(w * grad.sum(0) / steps)
    return torch.stack(scores)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("facts")
    parser.add_argument("--way", choices=["strongest", "released"], default="strongest")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    # Debian's torch may start with one thread on 2 vCPUs; the benchmark says how many.
    torch.set_num_threads(int(os.environ.get("KN_TORCH_THREADS", len(os.sched_getaffinity(0)))))
    torch.manual_seed(0)
    tokenizer = BertTokenizerFast.from_pretrained(args.model_dir)
    model = BertForMaskedLM.from_pretrained(args.model_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    facts = [json.loads(line) for line in open(args.facts) if line.strip()]
    prompts = [(p, f["answer"]) for f in facts for p in f["prompts"]]
    if args.check:
        prompt, answer = prompts[0]
        a = attribute(model, tokenizer, prompt, answer, "strongest")
        b = attribute(model, tokenizer, prompt, answer, "released")
        error = float((a - b).abs().max() / b.abs().max())
        print(f"check: strongest vs released, max |difference| / max |score| = {error:.2e}")
        assert error < 1e-4, error
    attribute(model, tokenizer, *prompts[0], args.way)  # warm-up, not timed
    start = time.perf_counter()
    for prompt, answer in prompts:
        attribute(model, tokenizer, prompt, answer, args.way)
    seconds = time.perf_counter() - start
    coretype = os.environ.get("OPENBLAS_CORETYPE", "auto")
    print(
        f"PyTorch {torch.__version__} {args.way} ({torch.get_num_threads()} threads, "
        f"OPENBLAS_CORETYPE={coretype}): {len(prompts)} prompts, "
        f"{seconds / len(prompts):.3f} s per prompt (model load excluded)"
    )


if __name__ == "__main__":
    main()
