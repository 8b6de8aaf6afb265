"""Shared helpers of the decoder (causal LM) golden scripts.

kn's causal prompt rule
-----------------------
A prompt is a string with exactly one "[MASK]", at the end: whatever follows the
[MASK] (e.g. a final ".") is dropped, and the model input is the text before it with
trailing whitespace stripped:

    "The capital of France is [MASK]."  ->  "The capital of France is"

The gold answer token: tokenize `input_text + " " + answer`; the ids must be the ids
of `input_text` plus exactly one more id, and that id is the answer token (" Paris").
Token ids always come from the tokenizer transformers builds for the model, with its
default special tokens (`add_special_tokens=True`).
"""

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MASK = "[MASK]"
SMOLLM2_DIR = "models/smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_text(prompt):
    """kn's rule: the text before the single [MASK], trailing whitespace stripped."""
    if prompt.count(MASK) != 1:
        raise ValueError(f"prompt needs exactly one {MASK}: {prompt!r}")
    before, after = prompt.split(MASK)
    if MASK in after or after.strip() not in ("", ".", "?", "!"):
        raise ValueError(f"{MASK} must end the prompt (only punctuation after it): {prompt!r}")
    text = before.rstrip()
    if not text:
        raise ValueError(f"nothing before {MASK}: {prompt!r}")
    return text


def encode(tok, text):
    return tok(text)["input_ids"]


def answer_token(tok, text, answer):
    """(ids of text, answer id) by kn's rule; raises if the answer is not one token."""
    ids = encode(tok, text)
    full = encode(tok, text + " " + answer)
    if len(full) != len(ids) + 1 or full[: len(ids)] != ids:
        raise ValueError(
            f"answer {answer!r} is not exactly one extra token after {text!r}: "
            f"{tok.convert_ids_to_tokens(ids)} vs {tok.convert_ids_to_tokens(full)}"
        )
    return ids, full[-1]


def exact_float64(model):
    """Make a transformers Llama/Qwen2 model compute in float64 throughout.

    transformers 4.47.1 silently computes two things in float32 even in a float64
    model: LlamaRMSNorm/Qwen2RMSNorm upcast to float32 (`.to(torch.float32)`), and the
    rotary embedding computes inv_freq and the angles in float32.  Both are replaced
    here by float64 versions (for float64 inputs; float32 inputs are unchanged); a
    scaled rotary embedding (rope_type other than default) by `scaled_rope_forward`,
    transformers' own rope functions run in float64;
    without this a central finite difference disagrees with autograd by tens of per
    cent.  Attention is forced to SDPA (the eager path also softmaxes in float32).
    Returns (RMSNorm modules patched, rotary-embedding modules patched).
    """
    import types

    import torch

    def rms_forward(self, hidden_states):
        if hidden_states.dtype != torch.float64:
            return type(self).forward(self, hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        if x.dtype != torch.float64:
            return type(self).forward(self, x, position_ids)
        freqs = position_ids[:, :, None].to(torch.float64) * self.kn_inv_freq64[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", None):
        raise SystemExit(f"attention implementation {cfg._attn_implementation}, want sdpa")
    norms = ropes = 0
    for m in model.modules():
        name = type(m).__name__
        if name in ("LlamaRMSNorm", "Qwen2RMSNorm"):
            m.forward = types.MethodType(rms_forward, m)
            norms += 1
        elif name in ("LlamaRotaryEmbedding", "Qwen2RotaryEmbedding"):
            if m.rope_type == "default":
                if m.attention_scaling != 1.0:
                    raise SystemExit(f"rope type {m.rope_type} not handled")
                dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
                m.kn_inv_freq64 = 1.0 / (
                    cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
                )
                m.forward = types.MethodType(rope_forward, m)
            else:
                m.forward = types.MethodType(scaled_rope_forward, m)
            ropes += 1
    return norms, ropes


class _Float64Torch:
    """`torch` as transformers' modeling_rope_utils sees it, with `torch.float` and
    `torch.float32` meaning float64: its own rope functions then compute in float64."""

    def __init__(self):
        import torch

        self._torch = torch

    def __getattr__(self, name):
        if name in ("float", "float32"):
            return self._torch.float64
        return getattr(self._torch, name)


def rope_parameters64(config, seq_len=None):
    """(inv_freq float64, attention factor): transformers' own
    `ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len)` (modeling_rope_utils,
    transformers >= 4.48), run with `torch.float`/`torch.float32` mapped to float64 and
    `seq_len` a Python int (so the dynamic base is a float64 too)."""
    from transformers import modeling_rope_utils as mru

    rope_type = "default"
    if getattr(config, "rope_scaling", None):
        rope_type = config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))
    saved = mru.torch
    mru.torch = _Float64Torch()
    try:
        inv_freq, attention = mru.ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len)
    finally:
        mru.torch = saved
    assert inv_freq.dtype == saved.float64, inv_freq.dtype
    return inv_freq, float(attention)


def scaled_rope_forward(self, x, position_ids):
    """A Llama/Qwen2 rotary embedding's forward in float64 for any rope type, as one
    fresh forward over positions 0..S-1: `dynamic` recomputes the frequencies for
    seq_len = max(position_ids) + 1 when that exceeds max_position_embeddings (what
    `dynamic_rope_update` does on a model that has not seen a longer sequence), the
    other types use their fixed frequencies; cos and sin times the attention factor."""
    import torch

    if x.dtype != torch.float64:
        return type(self).forward(self, x, position_ids)
    seq_len = int(position_ids.max()) + 1
    if self.rope_type == "dynamic" and seq_len <= self.config.max_position_embeddings:
        seq_len = None  # the frequencies transformers initializes with
    inv_freq, attention = rope_parameters64(self.config, seq_len)
    freqs = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention, emb.sin() * attention


def load_smollm2(model_dir=SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF, dtype=None):
    """(tokenizer, model in eval mode, gguf sha256) from the GGUF; transformers
    dequantizes Q4_1/Q8_0 itself.  dtype: torch.float64 (default) or float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float64
    path = os.path.join(model_dir, gguf_file)
    sha = sha256_file(path)
    if sha != SMOLLM2_GGUF_SHA256:
        raise SystemExit(f"{path}: sha256 {sha}, expected {SMOLLM2_GGUF_SHA256}")
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=gguf_file, torch_dtype=torch.float32, attn_implementation="sdpa"
    )
    if dtype == torch.float64:
        model = model.double()
        norms, ropes = exact_float64(model)
        assert norms == 2 * model.config.num_hidden_layers + 1 and ropes >= 1, (norms, ropes)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model, sha


def write_json_records(path, header, key, records):
    """One JSON object; header fields first, then `key`: one record per line."""
    import json

    head = json.dumps(header)[:-1]
    body = ",\n".join(json.dumps(r) for r in records)
    with open(path, "w") as f:
        f.write(head + f', "{key}": [\n' + body + "\n]}\n")
    with open(path) as f:
        back = json.load(f)
    assert back[key] == records
