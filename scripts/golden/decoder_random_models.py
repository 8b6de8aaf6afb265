#!/usr/bin/env python3
"""Tiny random decoder LM checkpoints for kn's loader tests, and their float64
next-token golden file.

What it does
------------
1. Trains a tiny byte-level BPE tokenizer (`tokenizers`: ByteLevel pre-tokenizer
   add_prefix_space=False (GPT-2 regex), ByteLevel decoder, BpeTrainer with the
   256-byte initial alphabet, vocab VOCAB_SIZE, on the English TEXT below;
   deterministic).  Special tokens: 0 "<|endoftext|>", 1 "<s>", 2 "</s>".
     - gpt2-*, qwen2-*: no special tokens added on encoding; bos = eos =
       "<|endoftext|>" (id 0).
     - llama-*: a TemplateProcessing post-processor prepends "<s>" (id 1), as
       Llama tokenizers do; bos "<s>" (1), eos "</s>" (2).
   Saved through `PreTrainedTokenizerFast.save_pretrained` (tokenizer.json,
   tokenizer_config.json, special_tokens_map.json).
2. Builds five models with transformers, seeded (one seed per family, so a tied
   model and its untied twin share every weight but lm_head), initializer_range
   0.3, then randomizes every norm weight (U(0.5, 1.5)) and bias (N(0, 0.1)) -- LayerNorm,
   RMSNorm, GPT-2 linear biases, Qwen2 q/k/v biases -- so that none is 1 or 0:
     gpt2-tied     GPT2LMHeadModel n_embd 32, n_layer 3, n_head 4, n_inner 48,
                   n_positions 64, gelu_new, tie_word_embeddings true
     gpt2-untied   same, untied (lm_head.weight saved, differs from wte)
     llama-tied    LlamaForCausalLM hidden 32, intermediate 48, 3 layers, 4 heads,
                   2 kv heads, rope_theta 10000, rms_norm_eps 1e-5, max positions
                   64, tied
     llama-untied  same, untied
     qwen2-untied  Qwen2ForCausalLM (q/k/v biases), same sizes, rms_norm_eps 1e-6
                   (Qwen2's default), untied
   and saves each with save_pretrained(safe_serialization=True) + the tokenizer
   files into tests/data/decoders/<name>/.
3. Writes tests/data/decoders/llama-tied.gguf with gguf.GGUFWriter: llama
   architecture, all tensors F32, llama.cpp names (token_embd, blk.N.attn_norm,
   attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down,
   output_norm; no output.weight: tied), q/k rows permuted exactly as
   llama.cpp's convert_hf_to_gguf.py LlamaModel.permute does, tokenizer.ggml.*
   metadata of model "gpt2" (pre "gpt2", tokens, token_type, merges,
   bos/eos/padding ids, add_bos_token true, add_eos_token false).  transformers
   loads it back (from_pretrained(dir, gguf_file=...)); the script asserts that
   its tokenizer gives the same ids and its model the same probabilities as the
   safetensors llama-tied (max difference printed: about 1.7e-12, not 0, because
   GGUF stores rms_norm_eps as float32, 9.99999974737875e-06).
4. Golden: for every model and PROMPTS text, the full next-token distribution at
   the last position, float64 (`model.double()` + decoder_common.exact_float64,
   since transformers 4.47.1 computes RMSNorm and RoPE angles in float32), eval,
   SDPA attention, no padding.

Output tests/golden/decoder_random_models.json:
  {"generator", "torch", "transformers", "tokenizers", "gguf", "dtype": "float64",
   "vocab_size",
   "models": {"<name>": {"path": "tests/data/decoders/<name>" (or the .gguf file),
                         "architecture", "tie_word_embeddings", "bos_prepended",
                         "prompts": [{"text", "ids", "probabilities": [vocab floats]}]}}}
with names gpt2-tied, gpt2-untied, llama-tied, llama-untied, qwen2-untied and
"llama-tied.gguf".  Floats are Python's shortest round-trip repr.

Run (from the repository root)
------------------------------
    /work/venv-ref/bin/python scripts/golden/decoder_random_models.py

Versions: see scripts/golden/README.md (torch 2.15.0 CPU, transformers 4.47.1,
tokenizers 0.21.4, gguf 0.19.0, numpy 2.4.6).
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_common import exact_float64  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB_SIZE = 360
SEED = 20240607
INIT_RANGE = 0.3
SPECIALS = ["<|endoftext|>", "<s>", "</s>"]

TEXT = """\
The capital of France is Paris, and the capital of Japan is Tokyo. Rome is the capital
of Italy, Berlin is the capital of Germany, and Madrid is the capital of Spain. People
in Brazil speak Portuguese, people in Mexico speak Spanish, and people in Egypt speak
Arabic. The river runs through the old town, past the market and the church, down to
the sea. In the morning the children walk to school, and in the evening they come home
for dinner. A cat sat on the mat while the dog slept by the fire. The weather was cold
and wet all week, but on Sunday the sun came out and everyone went to the park. She
wrote a letter to her brother, who lived in a small village in the mountains. He read
it twice and then put it in a drawer with the others. The train to London leaves at
nine o'clock every morning and arrives a little after noon. Water boils at one hundred
degrees and freezes at zero. The earth goes around the sun once a year, and the moon
goes around the earth about once a month. Many birds fly south for the winter and
return in the spring. The library is open from Monday to Friday; on Saturday it closes
early. Our teacher told us that the best way to learn a language is to read every day,
to listen carefully, and to speak without fear of mistakes. The farmer planted wheat in
the north field and corn in the south field. After the storm, the road was covered with
leaves and branches, and the power was out for two days. The museum has a large
collection of paintings, maps and old coins from many countries. We bought bread,
cheese, apples and a bottle of milk at the shop on the corner. The doctor said that he
should rest, drink plenty of water and eat well. At night the city lights shine over
the harbour, and ships come and go until the early hours. The story ends when the
young king returns to his castle and finds his friends waiting at the gate. Numbers
such as 12, 365 and 2024 appear in dates, prices and addresses.
"""

PROMPTS = [
    "The capital of France is",
    "People in Brazil speak",
    "The train to London leaves at",
    "In the morning the children walk to",
    "The museum has a large collection of",
    "After the storm, the road was covered with",
]


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in TEXT.splitlines()], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    return tok


def fast_tokenizer(base, llama_bos):
    tok = Tokenizer.from_str(base.to_str())
    if llama_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None,
            model_max_length=64,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        model_max_length=64,
    )


def randomize_norms_and_biases(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(k in name for k in ("ln_", "norm", "layernorm"))
            if is_norm and leaf == "weight":
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build(name, vocab):
    # one seed per family: tied and untied twins share every weight but lm_head
    seed = SEED + {"gpt2": 0, "llama": 100, "qwen2": 200}[name.split("-")[0]]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    common = dict(vocab_size=vocab, initializer_range=INIT_RANGE)
    if name.startswith("gpt2"):
        cfg = GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64,
            activation_function="gelu_new", tie_word_embeddings=name == "gpt2-tied",
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common,
        )
        model = GPT2LMHeadModel(cfg)
    elif name.startswith("llama"):
        cfg = LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
            rms_norm_eps=1e-5, max_position_embeddings=64,
            tie_word_embeddings=name == "llama-tied", bos_token_id=1, eos_token_id=2,
            hidden_act="silu", **common,
        )
        model = LlamaForCausalLM(cfg)
    elif name.startswith("qwen2"):
        cfg = Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
            rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, use_sliding_window=False, hidden_act="silu",
            **common,
        )
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(name)
    randomize_norms_and_biases(model, gen)
    model.eval()
    return model


def distributions(model, tok, texts):
    model = model.double().eval()
    exact_float64(model)  # RMSNorm / RoPE really in float64 (no-op for GPT-2)
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, -1]
        assert logits.dtype == torch.float64
        probs = torch.softmax(logits, dim=-1)
        out.append({"text": text, "ids": ids, "probabilities": probs.tolist()})
    model.float()
    return out


def permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF q/k rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model, tok_json, path):
    cfg = model.config
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("kn-test llama-tied")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # tokenizer
    j = json.loads(tok_json)
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert None not in tokens and len(tokens) == cfg.vocab_size
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # tensors
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for b in range(cfg.num_hidden_layers):
        p = f"model.layers.{b}."
        w.add_tensor(f"blk.{b}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{b}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], nh, nh))
        w.add_tensor(f"blk.{b}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], nh, nkv))
        w.add_tensor(f"blk.{b}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{b}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{b}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{b}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{b}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{b}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_saved(name, d, model):
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if name.startswith("gpt2"):
            emb, head = "transformer.wte.weight", "lm_head.weight"
        else:
            emb, head = "model.embed_tokens.weight", "lm_head.weight"
        if name.endswith("untied"):
            assert head in keys, (name, sorted(keys))
            diff = (f.get_tensor(head) - f.get_tensor(emb)).abs().max().item()
            assert diff > 0.1, diff
            print(f"  {name}: lm_head.weight saved separately, max |lm_head - emb| {diff:.3f}",
                  file=sys.stderr)
        else:
            assert head not in keys, (name, sorted(keys))
            print(f"  {name}: tied, lm_head.weight not in the file", file=sys.stderr)
        norm_keys = [k for k in keys if "norm" in k or "ln_" in k]
        for k in norm_keys:
            t = f.get_tensor(k)
            assert not torch.all(t == 1) and not torch.all(t == 0), k
        bias_keys = [k for k in keys if k.endswith(".bias")]
        for k in bias_keys:
            assert not torch.all(f.get_tensor(k) == 0), k
    return sorted(keys)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="tests/data/decoders")
    ap.add_argument("--out", default="tests/golden/decoder_random_models.json")
    args = ap.parse_args()
    torch.set_num_threads(2)

    base = train_tokenizer()
    base_json = base.to_str()
    # deterministic: a second training gives the same tokenizer
    assert train_tokenizer().to_str() == base_json
    os.makedirs(args.dir, exist_ok=True)
    golden = {}
    names = ["gpt2-tied", "gpt2-untied", "llama-tied", "llama-untied", "qwen2-untied"]
    for name in names:
        d = os.path.join(args.dir, name)
        shutil.rmtree(d, ignore_errors=True)
        tok = fast_tokenizer(base, llama_bos=name.startswith("llama"))
        model = build(name, VOCAB_SIZE)
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        for f in os.listdir(d):
            os.chmod(os.path.join(d, f), 0o644)
        keys = check_saved(name, d, model)
        # reload from disk and compute the golden from the reloaded model
        tok2 = AutoTokenizer.from_pretrained(d)
        model2 = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
        recs = distributions(model2, tok2, PROMPTS)
        ref = distributions(model, tok, PROMPTS)
        for a, b in zip(recs, ref):
            assert a["ids"] == b["ids"]
            assert max(abs(x - y) for x, y in zip(a["probabilities"], b["probabilities"])) < 1e-12
        bos = name.startswith("llama")
        for r in recs:
            assert (r["ids"][0] == 1) == bos, (name, r["ids"])
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        maxp = [max(r["probabilities"]) for r in recs]
        print(f"{name}: {len(keys)} tensors, {size} bytes, max next-token probability per "
              f"prompt {[round(p, 3) for p in maxp]} (uniform {1 / VOCAB_SIZE:.4f})",
              file=sys.stderr)
        golden[name] = {
            "path": d,
            "architecture": type(model).__name__,
            "tie_word_embeddings": bool(model.config.tie_word_embeddings),
            "bos_prepended": bos,
            "prompts": recs,
        }
        if name == "llama-tied":
            llama_tied, llama_tok = model, tok

    # GGUF version of llama-tied
    gpath = os.path.join(args.dir, "llama-tied.gguf")
    write_llama_gguf(llama_tied, base_json, gpath)
    gtok = AutoTokenizer.from_pretrained(args.dir, gguf_file="llama-tied.gguf")
    gmodel = AutoModelForCausalLM.from_pretrained(
        args.dir, gguf_file="llama-tied.gguf", torch_dtype=torch.float32
    )
    assert gmodel.config.tie_word_embeddings
    grecs = distributions(gmodel, gtok, PROMPTS)
    worst = 0.0
    for a, b in zip(grecs, golden["llama-tied"]["prompts"]):
        assert a["ids"] == b["ids"], (a["ids"], b["ids"])
        worst = max(worst, max(abs(x - y) for x, y in zip(a["probabilities"], b["probabilities"])))
    print(f"llama-tied.gguf: {os.path.getsize(gpath)} bytes; transformers reloads it: same ids, "
          f"max |p_gguf - p_safetensors| = {worst:.3e}", file=sys.stderr)
    # not 0: the GGUF stores rms_norm_eps as float32 (9.99999974737875e-06, not 1e-5)
    assert worst < 1e-9, worst
    golden["llama-tied.gguf"] = {
        "path": gpath,
        "architecture": "LlamaForCausalLM (GGUF llama, F32)",
        "tie_word_embeddings": True,
        "bos_prepended": True,
        "prompts": grecs,
    }

    out = {
        "generator": "scripts/golden/decoder_random_models.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": importlib.metadata.version("gguf"),
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
