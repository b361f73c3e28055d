"""Real model shapes for benchmarks with dummy weights (``--load-format dummy``): config.json only."""

from __future__ import annotations

import json
import os
import tempfile

SHAPES = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1048576,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # A MiniMax-style hybrid small enough for one GPU: 7:1 lightning:softmax, hidden 4096, 4 experts (top-2).
    "minimax-hybrid": {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": 200064,
        "hidden_size": 4096,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4194304,
        "tie_word_embeddings": False,
        "rope_theta": 10000000.0,
        "torch_dtype": "bfloat16",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "block_size": 256,
        "layer_types": (["linear_attention"] * 7 + ["full_attention"]) * 2,
        "full_attn_alpha_factor": 1.0,
        "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": 1.0,
        "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": 1.0,
        "mlp_beta_factor": 1.0,
    },
}


def shape_dir(name: str) -> str:
    """A directory holding only ``config.json`` for the named shape."""
    path = os.path.join(tempfile.gettempdir(), f"bench-shape-{name}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[name], f)
    return path


def prefill_flops(cfg: dict, n: int) -> float:
    """Forward FLOPs of prefilling n tokens (2 per multiply-add), counting work actually needed:
    dense/active-expert matmuls, causal softmax attention (QK^T and PV over the lower triangle), and lightning
    attention computed blockwise (intra-block masked products + inter-block state products + state updates)."""
    h, d = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    experts = cfg.get("num_experts_per_tok", 1)
    mlp = 2 * n * 3 * h * cfg["intermediate_size"] * experts
    total = 2 * n * h * cfg["vocab_size"] / n  # LM head on the last token only
    for t in types:
        if t == "linear_attention":
            proj = 2 * n * h * (3 * nh * d + nh * d + nh * d)  # qkv, output gate, out
            blk = cfg.get("block_size", 256)
            attn = nh * (
                2 * n * blk * d + 2 * n * d * d * 2 + 2 * n * d * d
            )  # intra (avg blk/2, 2 products), inter, state
        else:
            proj = 2 * n * h * (nh * d + 2 * nkv * d + nh * d)
            attn = nh * 2 * 2 * d * n * n / 2  # causal: half of QK^T and PV
        total += proj + attn + mlp
    return total
