"""Loads a directory written by `kn edit` with Python transformers and compares its
fill-mask probabilities with `kn predict`'s on the same prompts (independent check that
the edited model is a valid Hugging Face checkpoint and means what kn says).

    python3 scripts/golden/check_edited_model.py EDITED_DIR PROMPTS.jsonl KN_PREDICT.jsonl

PROMPTS.jsonl: `kn predict` input lines ({"prompt": …}); KN_PREDICT.jsonl: `kn predict
--model EDITED_DIR` output for them. Prints the largest probability difference.
Environment: scripts/golden/README.md (Debian python3-torch + transformers 4.47.1).
"""
import json
import sys

import torch
from transformers import BertForMaskedLM, BertTokenizer

model_dir, prompts_path, kn_path = sys.argv[1:4]
model = BertForMaskedLM.from_pretrained(model_dir).eval()
tokenizer = BertTokenizer.from_pretrained(model_dir)
kn = [json.loads(line) for line in open(kn_path)]
worst = 0.0
for line, record in zip(open(prompts_path), kn):
    prompt = json.loads(line)["prompt"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    mask = (ids[0] == tokenizer.mask_token_id).nonzero()[0].item()
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, mask].softmax(-1)
    for p in record["predictions"]:
        worst = max(worst, abs(probs[p["id"]].item() - p["probability"]))
    top = probs.argmax().item()
    assert top == record["predictions"][0]["id"], (prompt, top, record["predictions"][0])
print(f"{len(kn)} prompts: same top-1; largest probability difference {worst:.2e}")
