#!/usr/bin/env python3
"""Independent PyTorch/transformers reference for `kn` masked-LM predictions.

What it does
------------
Loads the AntiBERTy checkpoint (a BERT masked language model: 8 layers, hidden
512, intermediate 2048, 8 heads, exact-erf GELU) as
`transformers.BertForMaskedLM`, verifies that every tensor the MLM needs was
loaded from the checkpoint, and for every prompt line of a JSONL file
(`{"id", "prompt", "answer"}`, residues separated by spaces, one `[MASK]`)
records:

  * `input_ids`              full encoding incl. [CLS] ... [SEP]
  * `mask_position`          index of the [MASK] id in `input_ids`
  * `logits`                 MLM logits (float32 values) at the mask position
  * `probabilities`          softmax over the whole 25-token vocabulary at the
                             mask position (computed in float64 from the
                             float32 logits)
  * `answer_probability`, `answer_rank` (1 = top; 1 + #tokens with strictly
                             greater probability)
  * `patched_logits`, `patched_probabilities`
                             the same after applying PATCH (below) to the
                             post-GELU FFN activations (output of
                             `bert.encoder.layer[L].intermediate`) at the mask
                             position only, via forward hooks
  * `activations` (first 2 records only): {"0": [...2048], "7": [...2048]}
                             post-GELU intermediate activations at the mask
                             position in the UNPATCHED forward.

Float32 model, eval mode, no_grad, one prompt per forward (no padding),
attention mask all ones, token_type_ids all zeros.  Nothing is rounded:
floats are written with Python's shortest round-trip repr.

Run (from the repository root)
------------------------------
    HF_HUB_OFFLINE=1 /tmp/goldenv/bin/python scripts/golden/antiberty_predict.py \
        --model models/antiberty \
        --prompts tests/data/antiberty_prompts.jsonl \
        --out tests/golden/antiberty_predict.json

Versions used to produce tests/golden/antiberty_predict.json
-------------------------------------------------------------
    Python 3.11 (Debian /usr/bin/python3), torch 1.13.1 (Debian python3-torch,
    reports __version__ "1.13.0a0"), numpy 1.24.2 (Debian), transformers 4.47.1,
    tokenizers 0.21.4 (PyPI, in a --system-site-packages venv).
    See scripts/golden/README.md for the venv recipe.
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
from transformers import BertForMaskedLM, BertTokenizer  # noqa: E402

# The activation patch, applied at the mask position only.
PATCH = (
    [{"layer": 7, "index": i, "op": "scale", "value": 0.0} for i in range(0, 16)]
    + [{"layer": 4, "index": i, "op": "set", "value": 1.5} for i in range(100, 108)]
    + [{"layer": 0, "index": 2047, "op": "scale", "value": 2.0}]
)

ACTIVATION_LAYERS = (0, 7)
ACTIVATION_RECORDS = 2

# Checkpoint keys that BertForMaskedLM legitimately does not use: the pooler
# and AntiBERTy's extra classification heads (species / chain / graft) and
# the NSP head if present.
ALLOWED_UNUSED_PREFIXES = (
    "bert.pooler.",
    "cls.species.",
    "cls.chain.",
    "cls.graft.",
    "cls.seq_relationship.",
)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(model_dir):
    bin_path = os.path.join(model_dir, "pytorch_model.bin")
    ckpt = torch.load(bin_path, map_location="cpu")

    model, info = BertForMaskedLM.from_pretrained(
        model_dir, output_loading_info=True, torch_dtype=torch.float32
    )
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    unexpected = [
        k for k in info["unexpected_keys"] if not k.startswith(ALLOWED_UNUSED_PREFIXES)
    ]
    if missing or unexpected or info["mismatched_keys"] or info["error_msgs"]:
        sys.exit(f"checkpoint did not load cleanly: {info}")

    # Belt and braces: every tensor of the model must come, bit for bit, from
    # the checkpoint.  The MLM decoder weight is tied to the word embeddings
    # and cls.predictions.decoder.bias to cls.predictions.bias; the checkpoint
    # stores both copies, so check each of them against the loaded tensor.
    msd = model.state_dict()
    for k, v in msd.items():
        if k not in ckpt:
            sys.exit(f"model tensor {k} has no counterpart in the checkpoint")
        if not torch.equal(ckpt[k].to(v.dtype), v):
            sys.exit(f"model tensor {k} differs from the checkpoint")
    for k in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
              "cls.predictions.bias", "cls.predictions.transform.dense.weight",
              "cls.predictions.transform.LayerNorm.weight"):
        if k not in msd:
            sys.exit(f"MLM head tensor {k} missing from the model")

    model.eval()
    model.float()
    return model, info


class Hooks:
    """Forward hooks on every `intermediate` module (output = post-GELU FFN)."""

    def __init__(self, model):
        self.mask_position = None
        self.patch = None  # list of patch entries or None
        self.capture = {}  # layer -> tensor [2048] at mask position
        self.handles = []
        for li, layer in enumerate(model.bert.encoder.layer):
            self.handles.append(layer.intermediate.register_forward_hook(self._make(li)))

    def _make(self, li):
        def hook(module, inputs, output):
            assert output.dim() == 3 and output.shape[0] == 1, output.shape
            pos = self.mask_position
            if self.patch is None:
                self.capture[li] = output[0, pos].detach().clone()
                return None
            out = output.clone()
            for p in self.patch:
                if p["layer"] != li:
                    continue
                if p["op"] == "scale":
                    out[0, pos, p["index"]] = out[0, pos, p["index"]] * p["value"]
                elif p["op"] == "set":
                    out[0, pos, p["index"]] = p["value"]
                else:
                    raise ValueError(p)
            return out

        return hook


def f64_list(t):
    return [float(x) for x in t.detach().to(torch.float64).tolist()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, _ = load_model(args.model)
    tok = BertTokenizer(os.path.join(args.model, "vocab.txt"), do_lower_case=False)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    assert len(vocab) == model.config.vocab_size, (len(vocab), model.config.vocab_size)
    mask_id = tok.mask_token_id
    hooks = Hooks(model)

    records = []
    with open(args.prompts) as f:
        lines = [json.loads(l) for l in f if l.strip()]

    correct = 0
    for n, item in enumerate(lines):
        prompt, answer = item["prompt"], item["answer"]
        input_ids = tok(prompt)["input_ids"]
        words = prompt.split()
        assert len(input_ids) == len(words) + 2, (item["id"], len(input_ids), len(words))
        assert input_ids[0] == tok.cls_token_id and input_ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in input_ids, item["id"]
        assert input_ids.count(mask_id) == 1, item["id"]
        pos = input_ids.index(mask_id)
        answer_id = tok.convert_tokens_to_ids(answer)
        assert answer_id != tok.unk_token_id, answer

        ids = torch.tensor([input_ids], dtype=torch.long)
        kw = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            token_type_ids=torch.zeros_like(ids),
        )
        hooks.mask_position = pos

        with torch.no_grad():
            hooks.patch, hooks.capture = None, {}
            logits = model(**kw).logits[0, pos]
            captured = hooks.capture
            hooks.patch = PATCH
            patched_logits = model(**kw).logits[0, pos]
            hooks.patch = None

        assert logits.dtype == torch.float32
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        pprobs = torch.softmax(patched_logits.to(torch.float64), dim=-1)
        p_ans = float(probs[answer_id])
        rank = 1 + int((probs > probs[answer_id]).sum())
        correct += rank == 1

        rec = {
            "id": item["id"],
            "prompt": prompt,
            "answer": answer,
            "input_ids": input_ids,
            "mask_position": pos,
            "logits": f64_list(logits),
            "probabilities": f64_list(probs),
            "answer_probability": p_ans,
            "answer_rank": rank,
            "top_token": vocab[int(probs.argmax())],
            "patched_logits": f64_list(patched_logits),
            "patched_probabilities": f64_list(pprobs),
        }
        if n < ACTIVATION_RECORDS:
            rec["activations"] = {str(l): f64_list(captured[l]) for l in ACTIVATION_LAYERS}
        records.append(rec)
        print(f"{item['id']:>24} answer={answer} top={rec['top_token']} "
              f"p={p_ans:.4f} rank={rank} "
              f"patched_p={float(pprobs[answer_id]):.4f}", file=sys.stderr)

    print(f"top-1 accuracy: {correct}/{len(records)}", file=sys.stderr)

    header = {
        "generator": "scripts/golden/antiberty_predict.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_sha256": sha256_file(os.path.join(args.model, "pytorch_model.bin")),
        "vocab": vocab,
        "patch": PATCH,
    }
    # One record per line; the whole file is a single JSON object.
    head = json.dumps(header)[:-1]  # strip closing brace
    body = ",\n".join(json.dumps(r) for r in records)
    with open(args.out, "w") as f:
        f.write(head + ', "records": [\n' + body + "\n]}\n")
    # Round-trip check.
    with open(args.out) as f:
        back = json.load(f)
    assert back["records"] == records and back["patch"] == PATCH


if __name__ == "__main__":
    main()
