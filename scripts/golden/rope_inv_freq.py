#!/usr/bin/env python3
"""Rotary inverse frequencies and attention factors of every rope type kn implements,
from transformers' own `modeling_rope_utils.ROPE_INIT_FUNCTIONS` (run in float64 by
decoder_common.rope_parameters64), for the unit tests in src/model/rope.rs.

For each case it prints the LlamaConfig's rope settings, the sequence length, the
attention factor and the inverse frequencies (Python's shortest round-trip repr), and
checks that transformers' unpatched float32 computation agrees to 1e-6 relative (so the
float64 run is the same function).

Run (from the repository root):
    /work/venv-dec/bin/python scripts/golden/rope_inv_freq.py

Versions used for the numbers in src/model/rope.rs: torch 2.15.0, transformers 4.57.6.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_common import rope_parameters64  # noqa: E402

# (name, head_dim, rope_theta, max_position_embeddings, rope_scaling, seq_len)
CASES = [
    ("default", 16, 10000.0, 64, None, None),
    ("linear", 16, 10000.0, 64, {"rope_type": "linear", "factor": 4.0}, None),
    ("linear_legacy_type", 16, 10000.0, 64, {"type": "linear", "factor": 2.5}, None),
    ("dynamic_short", 16, 10000.0, 16, {"rope_type": "dynamic", "factor": 4.0}, 12),
    ("dynamic_long", 16, 10000.0, 16, {"rope_type": "dynamic", "factor": 4.0}, 40),
    ("yarn", 16, 10000.0, 64,
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}, None),
    ("yarn_options", 16, 10000.0, 64,
     {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0,
      "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}, None),
    ("yarn_attention_factor", 64, 1000000.0, 131072,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
      "attention_factor": 1.25}, None),
    ("llama3_tiny", 8, 10000.0, 64,
     {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, None),
    ("llama3_2", 64, 500000.0, 131072,
     {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, None),
]


def main():
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}")
    for name, head_dim, theta, max_pos, scaling, seq_len in CASES:
        cfg = LlamaConfig(
            hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
            rope_theta=theta, max_position_embeddings=max_pos,
            rope_scaling=dict(scaling) if scaling else None,
        )
        inv64, attention = rope_parameters64(cfg, seq_len)
        rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else "default"
        inv32, attention32 = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", seq_len)
        assert inv32.dtype == torch.float32
        rel = ((inv32.double() - inv64).abs() / inv64.abs()).max().item()
        assert rel < 1e-6 and abs(attention32 - attention) < 1e-12, (name, rel)
        print(f"{name}: head_dim {head_dim}, theta {theta}, max_position_embeddings {max_pos}, "
              f"rope_scaling {scaling}, seq_len {seq_len}")
        print(f"  attention_factor {attention!r}")
        print(f"  inv_freq [{', '.join(repr(x) for x in inv64.tolist())}]")


if __name__ == "__main__":
    main()
