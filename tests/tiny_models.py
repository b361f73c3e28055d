"""Tiny random Hugging Face checkpoints (saved with transformers' save_pretrained) for the tests.

Shapes are uneven on purpose: GQA ratio > 1, head_dim != hidden / heads where the architecture allows it,
odd vocabulary sizes. ``initializer_range`` is larger than real models' so logits are well spread and greedy
decoding is not decided by rounding noise.
"""

from __future__ import annotations

import os

import torch

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, initializer_range=0.15, rms_norm_eps=1e-5, tie_word_embeddings=False)


def tiny_config(arch: str, **over):
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(**{**COMMON, "head_dim": 24, "num_hidden_layers": 2,
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                **over})
    elif arch == "llama_tied":
        cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 2, "tie_word_embeddings": True, **over})
    elif arch == "llama_yarn":
        cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 1,
                                "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 128}, **over})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**COMMON, "num_hidden_layers": 2, "sliding_window": None,
                                  "rope_scaling": {"rope_type": "linear", "factor": 2.0}, **over})
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**COMMON, "num_hidden_layers": 2, **over})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**{**COMMON, "head_dim": 40, "num_hidden_layers": 2, **over})
    elif arch.startswith("minimax"):
        n = 8 if arch == "minimax_7to1" else 4
        types = {"minimax_7to1": ["linear_attention"] * 7 + ["full_attention"],
                 "minimax_linear": ["linear_attention"] * n}.get(arch,
                                                                  ["linear_attention", "full_attention"] * (n // 2))
        cfg = tf.MiniMaxConfig(**{**COMMON, "head_dim": 24, "num_hidden_layers": n, "layer_types": types,
                                  "num_local_experts": 4, "num_experts_per_tok": 2, "block_size": 16,
                                  "full_attn_alpha_factor": 1.1, "full_attn_beta_factor": 0.9,
                                  "linear_attn_alpha_factor": 0.8, "linear_attn_beta_factor": 1.2,
                                  "mlp_alpha_factor": 1.05, "mlp_beta_factor": 0.95, **over})
    else:
        raise ValueError(arch)
    return cfg


def save_tiny_model(arch: str, root: str, seed: int = 0, **over) -> str:
    """Save a tiny random ``arch`` checkpoint under ``root`` and return its directory."""
    import transformers as tf

    path = os.path.join(root, arch)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **over)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def hf_model(path: str):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
