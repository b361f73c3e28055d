"""What the tests share: devices and markers, dtype tolerances, and tiny random Hugging Face checkpoints (saved
with transformers' save_pretrained).

Checkpoint shapes are uneven on purpose: GQA ratio > 1, head_dim != hidden / heads where the architecture allows
it, odd vocabulary sizes. ``initializer_range`` is larger than real models' so logits are well spread and greedy
decoding is not decided by rounding noise.
"""

from __future__ import annotations

import os

import pytest
import torch

# ---- devices and markers ----------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def _flashinfer_importable() -> bool:
    from server.kernels.flashinfer_attention import flashinfer_module

    return flashinfer_module() is not None


needs_flashinfer = pytest.mark.skipif(not torch.cuda.is_available() or not _flashinfer_importable(),
                                      reason="needs a CUDA GPU with flashinfer")

# ---- tolerances: fp32 results of different summation orders (kernels vs references, ranks vs one rank) ---------
FP32_TOL = {"rtol": 1e-5, "atol": 1e-4}

# ---- tiny checkpoints ------------------------------------------------------------------------------------------

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
    elif arch == "qwen3_5_vl":  # a vision-language checkpoint whose language model is qwen3_5
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=COMMON["hidden_size"],
                      patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
        cfg = tf.Qwen3_5Config(text_config=tiny_config("qwen3_5").to_dict(), vision_config=vision, **over)
    elif arch.startswith(("qwen3_5", "qwen3_next")):
        # GDN: 2 key heads serve 6 value heads, key dim != value dim != attention head dim; two full-attention
        # layers in a row in qwen3_5, the real 3:1 layout and a dense layer among MoE ones in qwen3_next
        gdn = dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16,
                   linear_value_head_dim=12, linear_conv_kernel_dim=4, head_dim=40)
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)
        if arch == "qwen3_next":
            cfg = tf.Qwen3NextConfig(**{**COMMON, **gdn, **moe, "num_hidden_layers": 4, "mlp_only_layers": [1],
                                        "layer_types": ["linear_attention"] * 3 + ["full_attention"], **over})
        else:
            types = ["linear_attention", "full_attention", "full_attention", "linear_attention"]
            cls = tf.Qwen3_5MoeTextConfig if arch == "qwen3_5_moe" else tf.Qwen3_5TextConfig
            cfg = cls(**{**COMMON, **gdn, **(moe if arch == "qwen3_5_moe" else {}), "num_hidden_layers": 4,
                         "layer_types": types, **over})
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
    auto = tf.AutoModelForImageTextToText if arch.endswith("_vl") else tf.AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def hf_model(path: str):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
