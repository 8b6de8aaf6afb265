#!/usr/bin/env python3
"""Independent PyTorch/transformers reference for `kn` next-token predictions of a
causal LM: SmolLM2-135M-Instruct from its GGUF file (Q4_1 blocks, Q8_0 token
embedding, tied output), as scripts/fetch-test-models installs it.

What it does
------------
Loads `AutoModelForCausalLM.from_pretrained("models/smollm2",
gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.float32)`
(transformers dequantizes the GGUF tensors itself and undoes llama.cpp's q/k row
permutation), converts it to float64 (`.double()`), eval mode, SDPA attention,
with decoder_common.exact_float64 (transformers 4.47.1 computes RMSNorm and the
RoPE angles in float32 even in a float64 model; patched to float64), and the tokenizer
transformers builds from the same GGUF (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`).  For every line `{"id", "prompt", "answer"}` of the prompt JSONL
it applies kn's causal prompt rule (decoder_common.py: text before the single
[MASK], trailing whitespace stripped; the answer is the one extra token of
`input_text + " " + answer`) and records the next-token distribution at the last
input position.

NOTE: with transformers 4.47.1 this tokenizer prepends <|im_start|> (id 1, the
GGUF's bos_token_id) to every encoding although the GGUF says
tokenizer.ggml.add_bos_token = false (llama.cpp would not prepend it).  The
golden ids follow transformers (BOS included); `answer_probability_without_bos`
is the same answer probability for the ids without that first id, for reference.

Output: one JSON object
  {"generator", "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256",
   "transformers", "torch", "dtype": "float64", "bos_prepended": true,
   "prompts": [{"id", "prompt", "input_text",
                "ids": [...] (input ids incl. the BOS id 1),
                "tokens": [...] (their vocabulary strings, byte-level: "ĠParis"),
                "answer", "answer_id", "answer_token" (vocabulary string),
                "answer_probability", "answer_rank" (1 = top),
                "answer_probability_without_bos",
                "top": [[id, token_string, probability] x 20]
                       (token_string = vocabulary string; descending
                        probability, ties by id)}]}
Softmax over the whole 49152-token vocabulary, float64, nothing rounded.

Run (from the repository root, after scripts/fetch-test-models)
---------------------------------------------------------------
    /work/venv-ref/bin/python scripts/golden/smollm2_predict.py \
        --prompts tests/data/smollm2_prompts.jsonl \
        --out tests/golden/smollm2_predict.json

Versions: see scripts/golden/README.md (torch 2.15.0 CPU, transformers 4.47.1,
tokenizers 0.21.4, gguf 0.19.0, numpy 2.4.6, Python 3.11).
"""

import argparse
import json
import os
import sys

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

TOP = 20


def next_token_probs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, -1]
    assert logits.dtype == torch.float64
    return torch.softmax(logits, dim=-1)


def top_k(probs, k):
    # descending probability, ties by id (stable sort on the negated values)
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[:k]
    return order


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SMOLLM2_DIR)
    ap.add_argument("--gguf", default=SMOLLM2_GGUF)
    ap.add_argument("--prompts", default="tests/data/smollm2_prompts.jsonl")
    ap.add_argument("--out", default="tests/golden/smollm2_predict.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok, model, sha = load_smollm2(args.model, args.gguf, torch.float64)
    bos = tok.bos_token_id
    records, correct = [], 0
    with open(args.prompts) as f:
        items = [json.loads(line) for line in f if line.strip()]
    for item in items:
        text = input_text(item["prompt"])
        ids, answer_id = answer_token(tok, text, item["answer"])
        assert ids[0] == bos == 1, (ids, bos)
        probs = next_token_probs(model, ids)
        plist = probs.tolist()
        top = top_k(plist, TOP)
        p_answer = plist[answer_id]
        rank = 1 + sum(1 for p in plist if p > p_answer)
        p_nobos = float(next_token_probs(model, ids[1:])[answer_id])
        correct += rank == 1
        rec = {
            "id": item["id"],
            "prompt": item["prompt"],
            "input_text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "answer": item["answer"],
            "answer_id": answer_id,
            "answer_token": tok.convert_ids_to_tokens(answer_id),
            "answer_probability": p_answer,
            "answer_rank": rank,
            "answer_probability_without_bos": p_nobos,
            "top": [[i, tok.convert_ids_to_tokens(i), plist[i]] for i in top],
        }
        records.append(rec)
        print(
            f"{item['id']:>22} P({item['answer']!r})={p_answer:.4f} rank={rank} "
            f"(no BOS {p_nobos:.4f}) top={rec['top'][0][1]!r} {rec['top'][0][2]:.4f}",
            file=sys.stderr,
        )
    print(f"top-1 accuracy: {correct}/{len(records)}", file=sys.stderr)
    header = {
        "generator": "scripts/golden/smollm2_predict.py",
        "model": args.gguf,
        "gguf_sha256": sha,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float64",
        "bos_prepended": True,
    }
    write_json_records(args.out, header, "prompts", records)


if __name__ == "__main__":
    main()
