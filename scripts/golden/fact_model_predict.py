#!/usr/bin/env python3
"""Independent PyTorch/transformers reference for the bundled fact model's top-1.

What it does
------------
Loads `data/fact-model` (a small BERT masked LM trained by
`examples/train-fact-model.rs`: 4 layers, hidden 128, intermediate 512, 4
heads, exact-erf GELU) as `transformers.BertForMaskedLM` in **float64**, checks
that every tensor the MLM needs was loaded from `model.safetensors`, and for
every prompt of every fact of `data/facts.jsonl` (one `[MASK]` each) records,
at the mask position:

  * `ids`        the full encoding, [CLS] ... [SEP] (tokenizer.json through
                 `PreTrainedTokenizerFast`)
  * `top`        the most probable token id
  * `margin`     P(top) - P(second): how far the top-1 is from a tie
  * `answer_probability`

per fact `id`, `answer`, `answer_id`, and `held_out` (the indices of the
prompts in `held_out_prompts`), and overall the top-1 counts that
`data/fact-model/training.json` quotes (`train_prompts`, `train_correct`,
`held_out_prompts`, `held_out_correct`), counted here from `top`.

Eval mode, no_grad, one prompt per forward (no padding), attention mask all
ones, token_type_ids all zeros. Floats are written with Python's shortest
round-trip repr.

Run (from the repository root)
------------------------------
    HF_HUB_OFFLINE=1 /tmp/goldenv/bin/python scripts/golden/fact_model_predict.py \
        --model data/fact-model --facts data/facts.jsonl \
        --out tests/golden/fact_model_predict.json

Versions: see scripts/golden/README.md (the venv recipe); the file records them.
A run takes about 4 minutes on a busy 2-core machine.
"""

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BertForMaskedLM, PreTrainedTokenizerFast  # noqa: E402


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/fact-model")
    parser.add_argument("--facts", default="data/facts.jsonl")
    parser.add_argument("--out", default="tests/golden/fact_model_predict.json")
    args = parser.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, info = BertForMaskedLM.from_pretrained(
        args.model, output_loading_info=True, torch_dtype=torch.float64
    )
    if info["missing_keys"]:
        sys.exit(f"not loaded from the checkpoint: {info['missing_keys']}")
    model = model.double().eval()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(args.model, "tokenizer.json"),
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    mask_id = tokenizer.convert_tokens_to_ids("[MASK]")
    unk_id = tokenizer.convert_tokens_to_ids("[UNK]")

    facts = []
    counts = {"train_prompts": 0, "train_correct": 0, "held_out_prompts": 0, "held_out_correct": 0}
    smallest_margin = 1.0
    with open(args.facts) as f:
        for line in f:
            fact = json.loads(line)
            pieces = tokenizer(fact["answer"], add_special_tokens=False)["input_ids"]
            if len(pieces) != 1 or pieces[0] == unk_id:
                sys.exit(f"{fact['id']}: answer {fact['answer']!r} is not one known token: {pieces}")
            answer_id = pieces[0]
            out = {
                "id": fact["id"],
                "answer": fact["answer"],
                "answer_id": answer_id,
                "held_out": [i for i, p in enumerate(fact["prompts"]) if p in fact["held_out_prompts"]],
                "prompts": [],
            }
            for i, prompt in enumerate(fact["prompts"]):
                ids = tokenizer(prompt)["input_ids"]
                if ids.count(mask_id) != 1:
                    sys.exit(f"{fact['id']} prompt {i}: {ids.count(mask_id)} masks")
                at = ids.index(mask_id)
                with torch.no_grad():
                    logits = model(
                        input_ids=torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        token_type_ids=torch.zeros(1, len(ids), dtype=torch.long),
                    ).logits[0, at]
                probs = torch.softmax(logits, dim=-1)
                best = torch.topk(probs, 2)
                top = int(best.indices[0])
                margin = float(best.values[0] - best.values[1])
                smallest_margin = min(smallest_margin, margin)
                out["prompts"].append(
                    {
                        "ids": ids,
                        "top": top,
                        "margin": margin,
                        "answer_probability": float(probs[answer_id]),
                    }
                )
                kind = "held_out" if i in out["held_out"] else "train"
                counts[f"{kind}_prompts"] += 1
                counts[f"{kind}_correct"] += int(top == answer_id)
            facts.append(out)

    golden = {
        "generator": "scripts/golden/fact_model_predict.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float64",
        "model_sha256": sha256(os.path.join(args.model, "model.safetensors")),
        **counts,
        "smallest_margin": smallest_margin,
        "facts": facts,
    }
    with open(args.out, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(
        f"{len(facts)} facts; top-1 {counts['train_correct']}/{counts['train_prompts']} training, "
        f"{counts['held_out_correct']}/{counts['held_out_prompts']} held out; "
        f"smallest top-1 margin {smallest_margin:.3g}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
