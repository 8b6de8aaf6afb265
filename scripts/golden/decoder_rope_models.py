#!/usr/bin/env python3
"""Tiny random Llama checkpoints with rotary position scaling (rope_scaling), and their
float64 next-token golden file, for kn's rope tests.

A separate script from decoder_random_models.py on purpose: that one's golden was made
with transformers 4.47.1 (no `truncate` for yarn, older rope code), this one needs
transformers >= 4.48 (written with 4.57.6) and must not rewrite the older models.

What it does
------------
1. Copies the tokenizer files of tests/data/decoders/llama-untied (tokenizer.json,
   tokenizer_config.json, special_tokens_map.json): the same 360-token byte-level BPE
   that prepends "<s>" (id 1).
2. Builds four LlamaForCausalLM models with transformers, seeded, with
   decoder_random_models.py's conventions (initializer_range 0.3, every RMSNorm weight
   U(0.5, 1.5)): hidden 32, intermediate 48, 3 layers, 4 heads, 2 kv heads, head_dim 16
   (q/k/v widths 64/32/32, wider than hidden/heads, so that every rope band shows),
   rope_theta 10000, rms_norm_eps 1e-5, untied, and
     llama3-scaled   rope_scaling {rope_type llama3, factor 32, low_freq_factor 1,
                     high_freq_factor 4, original_max_position_embeddings 32} (Llama
                     3.2's factors), max_position_embeddings 64: frequency 0 is in the
                     high band (kept), 1 in the smoothed band, 2..7 in the low band (/32)
     llama-yarn      {rope_type yarn, factor 4, original_max_position_embeddings 16,
                     beta_fast 4, beta_slow 0.25, truncate false}, max positions 64:
                     the ramp crosses frequency 1; attention factor 0.1 ln 4 + 1
     llama-dynamic   {rope_type dynamic, factor 4}, max_position_embeddings 16: prompts
                     longer than 16 tokens get the NTK base, shorter ones plain rope
     llama-linear    {rope_type linear, factor 4}, max positions 64
   and saves each with save_pretrained(safe_serialization=True) into
   tests/data/decoders/<name>/.
3. Golden: for every model and prompt (one short prompt and long ones of 40 to 60
   tokens, past every original context), the full next-token distribution at the last
   position, float64: `model.double()` + decoder_common.exact_float64, whose rotary
   forward runs transformers' own ROPE_INIT_FUNCTIONS in float64 and, for `dynamic`,
   recomputes the frequencies for seq_len = max(position_ids) + 1 as one fresh forward
   over the whole prompt does (transformers' dynamic_rope_update on a model that has
   not seen a longer sequence; each prompt here is run on its own). Eval, SDPA, no
   padding. The script checks that transformers' stock float32 forward gives the same
   distribution to 1e-4 (so the float64 patch computes the model transformers runs).

Output tests/golden/decoder_rope_models.json, in decoder_random_models.json's format:
  {"generator", "torch", "transformers", "tokenizers", "dtype": "float64", "vocab_size",
   "models": {"<name>": {"path", "architecture", "tie_word_embeddings", "bos_prepended",
                         "rope_scaling", "prompts": [{"text", "ids", "probabilities"}]}}}

Run (from the repository root)
------------------------------
    /work/venv-dec/bin/python scripts/golden/decoder_rope_models.py

Versions: torch 2.15.0 (CPU), transformers 4.57.6, tokenizers 0.22.2.
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_common import exact_float64  # noqa: E402

VOCAB_SIZE = 360
SEED = 20261203
INIT_RANGE = 0.3
TOKENIZER_FROM = "tests/data/decoders/llama-untied"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

MODELS = {
    "llama3-scaled": (64, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-yarn": (64, {"rope_type": "yarn", "factor": 4.0,
                        "original_max_position_embeddings": 16, "beta_fast": 4.0,
                        "beta_slow": 0.25, "truncate": False}),
    "llama-dynamic": (16, {"rope_type": "dynamic", "factor": 4.0}),
    "llama-linear": (64, {"rope_type": "linear", "factor": 4.0}),
}

PROMPTS = [
    "The capital of France is",
    "The capital of Italy is Rome, the capital of Germany is Berlin, the capital of Spain "
    "is Madrid, and the capital of France is",
    "In the morning the children walk to school, and in the evening they come home for "
    "dinner. The train to London leaves at",
    "The weather was cold and wet all week, but on Sunday the sun came out. After the "
    "storm, the road was covered with",
]


def build(name, index):
    max_pos, scaling = MODELS[name]
    torch.manual_seed(SEED + index)
    gen = torch.Generator().manual_seed(SEED + index + 1000)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=max_pos, rope_scaling=dict(scaling),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
        initializer_range=INIT_RANGE,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model.eval()


def distribution(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, -1]
    return torch.softmax(logits, dim=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="tests/data/decoders")
    ap.add_argument("--out", default="tests/golden/decoder_rope_models.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    golden = {}
    for index, name in enumerate(MODELS):
        d = os.path.join(args.dir, name)
        shutil.rmtree(d, ignore_errors=True)
        build(name, index).save_pretrained(d, safe_serialization=True)
        for f in TOKENIZER_FILES:
            shutil.copyfile(os.path.join(TOKENIZER_FROM, f), os.path.join(d, f))
        for f in os.listdir(d):
            os.chmod(os.path.join(d, f), 0o644)
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(
            d, torch_dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        assert model.model.rotary_emb.rope_type == MODELS[name][1]["rope_type"]
        records = []
        for text in PROMPTS:
            ids = tok(text)["input_ids"]
            assert ids[0] == 1 and len(ids) <= 64, (name, len(ids))
            # transformers' own float32 forward, on a fresh model per prompt (dynamic
            # caches the longest sequence it has seen)
            fresh = AutoModelForCausalLM.from_pretrained(
                d, torch_dtype=torch.float32, attn_implementation="sdpa"
            ).eval()
            p32 = distribution(fresh, ids).double()
            m64 = AutoModelForCausalLM.from_pretrained(
                d, torch_dtype=torch.float32, attn_implementation="sdpa"
            ).double().eval()
            norms, ropes = exact_float64(m64)
            assert norms == 7 and ropes >= 1, (norms, ropes)
            p64 = distribution(m64, ids)
            assert p64.dtype == torch.float64
            diff = (p64 - p32).abs().max().item()
            assert diff < 1e-4, (name, text, diff)
            records.append({"text": text, "ids": ids, "probabilities": p64.tolist()})
            print(f"{name}: {len(ids)} tokens, max p {p64.max().item():.4f}, "
                  f"|float64 - stock float32| {diff:.2e}", file=sys.stderr)
        golden[name] = {
            "path": d,
            "architecture": "LlamaForCausalLM",
            "tie_word_embeddings": False,
            "bos_prepended": True,
            "rope_scaling": MODELS[name][1],
            "prompts": records,
        }
    out = {
        "generator": "scripts/golden/decoder_rope_models.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "dtype": "float64",
        "vocab_size": VOCAB_SIZE,
        "models": golden,
    }
    with open(args.out, "w") as f:
        f.write("{")
        head = json.dumps({k: v for k, v in out.items() if k != "models"})[1:-1]
        f.write(head + ', "models": {\n')
        items = []
        for name, m in golden.items():
            meta = json.dumps({k: v for k, v in m.items() if k != "prompts"})[:-1]
            prompts = ",\n".join(json.dumps(p) for p in m["prompts"])
            items.append(json.dumps(name) + ": " + meta + ', "prompts": [\n' + prompts + "\n]}")
        f.write(",\n".join(items) + "\n}}\n")
    with open(args.out) as f:
        assert json.load(f) == json.loads(json.dumps(out))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
