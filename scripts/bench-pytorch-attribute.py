#!/usr/bin/env python3
"""The plain PyTorch implementation of the released knowledge-neuron attribution, timed,
for comparison with `kn attribute` (scripts/bench-attribute). Not part of the tests.

Per prompt: a normal forward (activations at the mask, every layer), then per layer one
batch of m = 20 copies whose layer-L FFN activations at the mask are replaced by
alpha_k * w (alpha_k = k/m, the released code's left rule), every layer recomputed from
the embeddings, and autograd for dP(gold)/d(replaced activations). float32, eval mode.

    /tmp/goldenv/bin/python scripts/bench-pytorch-attribute.py MODEL_DIR FACTS.jsonl

MODEL_DIR: a BertForMaskedLM directory (scripts/bench-attribute makes a random
bert-base one with `target/release/examples/random-model bert-base models/minilm DIR`).
Environment: scripts/golden/README.md (Debian's python3-torch + transformers 4.47.1).
"""
import json
import sys
import time

import torch
from transformers import BertForMaskedLM, BertTokenizerFast


def attribute(model, tokenizer, prompt, answer, steps=20):
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    mask = int((ids[0] == tokenizer.mask_token_id).nonzero()[0, 0])
    gold = tokenizer.convert_tokens_to_ids(answer)
    layers = model.bert.encoder.layer
    captured = {}

    def capture(index):
        def hook(_module, _inputs, output):
            captured[index] = output[0, mask].detach().clone()

        return hook

    handles = [l.intermediate.register_forward_hook(capture(i)) for i, l in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()

    scores = []
    batch_ids = ids.repeat(steps, 1)
    for index, layer in enumerate(layers):
        w = captured[index]
        alphas = torch.arange(steps, dtype=torch.float32).unsqueeze(1) / steps
        scaled = (alphas * w).requires_grad_(True)

        def replace(_module, _inputs, output):
            output = output.clone()
            output[:, mask] = scaled
            return output

        handle = layer.intermediate.register_forward_hook(replace)
        logits = model(input_ids=batch_ids).logits[:, mask]
        handle.remove()
        p_gold = torch.softmax(logits, dim=-1)[:, gold]
        (grad,) = torch.autograd.grad(p_gold.sum(), scaled)
        scores.append(w * grad.sum(0) / steps)
    return torch.stack(scores)


def main():
    model_dir, facts_path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    facts = [json.loads(line) for line in open(facts_path) if line.strip()]
    prompts = [(p, f["answer"]) for f in facts for p in f["prompts"]]
    start = time.perf_counter()
    for prompt, answer in prompts:
        attribute(model, tokenizer, prompt, answer)
    seconds = time.perf_counter() - start
    print(
        f"plain PyTorch {torch.__version__} ({torch.get_num_threads()} intra-op threads): "
        f"{len(prompts)} prompts, {seconds / len(prompts):.2f} s per prompt (model load excluded)"
    )


if __name__ == "__main__":
    main()
