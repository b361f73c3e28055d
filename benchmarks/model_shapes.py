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
    # Qwen3.5-27B's language model (its published config.json): 48 Gated DeltaNet + 16 gated full-attention layers
    # (3:1), GDN 16 key / 48 value heads x 128, attention 24 q / 4 KV heads x 256 with a quarter rotary.
    "qwen3.5-27b": {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": 248320,
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 64,
        "num_attention_heads": 24,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        # 262144 natively; served up to ~1M tokens with YaRN. The positions limit is raised so that 512K prompts
        # run (dummy weights: the RoPE variant does not change the cost).
        "max_position_embeddings": 1048576,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 48,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 16,
    },
    # Qwen3-Next-80B-A3B's layer shapes (GDN 16 key / 32 value heads, attention 16 q / 2 KV x 256, shared expert)
    # at 16 layers and 64 experts (top-10), small enough for one GPU.
    "qwen3-next-like": {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "num_experts": 64,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "norm_topk_prob": True,
        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 4,
    },
    # Qwen3-30B-A3B (Qwen3-30B-A3B-Instruct-2507's published config.json): 48 layers, 32 q / 4 KV heads x 128 with
    # q/k norm, 128 experts of 768 (top-8, renormalised) on every layer; 256K native context.
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": False,
        "rope_theta": 10000000.0,
        "torch_dtype": "bfloat16",
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    # Qwen3-Coder-480B-A35B-Instruct: 62 layers, 96 q / 8 KV heads x 128, 160 experts of 2560 (top-8).
    "qwen3-coder-480b-a35b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 6144,
        "intermediate_size": 8192,
        "num_hidden_layers": 62,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": False,
        "rope_theta": 10000000.0,
        "torch_dtype": "bfloat16",
        "num_experts": 160,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2560,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    # MiniMax-M2: 62 softmax layers, 48 q / 8 KV heads x 128 with q/k norm over all heads and rotary on 64 of 128
    # features, 256 experts of 1536 (top-8, sigmoid routing with a correction bias).
    "minimax-m2": {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "vocab_size": 200064,
        "hidden_size": 3072,
        "intermediate_size": 1536,
        "num_hidden_layers": 62,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rotary_dim": 64,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 196608,
        "tie_word_embeddings": False,
        "rope_theta": 5000000.0,
        "torch_dtype": "bfloat16",
        "num_local_experts": 256,
        "num_experts_per_tok": 8,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
    },
    # GLM-4.6: 92 layers (3 dense, then MoE), 96 q / 8 KV heads x 128 with q/k/v bias and q/k norm, rotary on half of
    # each head, 160 routed experts of 1536 (top-8, sigmoid, x 2.5) and one shared expert; 200K context.
    "glm-4.6": {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": 151552,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "num_hidden_layers": 92,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 202752,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "n_routed_experts": 160,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 1536,
        "first_k_dense_replace": 3,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "eos_token_id": [151329, 151336, 151338],
    },
    # Moonlight-16B-A3B (DeepseekV3ForCausalLM): MLA without q LoRA, 16 heads, 64 experts (top-6) + 2 shared
    "moonlight-16b-a3b": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 163840,
        "hidden_size": 2048,
        "intermediate_size": 11264,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.446,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_theta": 50000.0,
        "rms_norm_eps": 1e-5,
        # 8192 natively; raised so that 32K / 128K prompts run (dummy weights: the cost is the same)
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # DeepSeek-V3 (671B): for the planning command and estimates (it does not fit one node in bf16)
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 163840,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # Kimi-Linear-48B-A3B: 3 KDA layers per MLA layer (MLA without RoPE), KDA 32 heads x 128, 256 experts (top-8)
    "kimi-linear-48b-a3b": {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "vocab_size": 163840,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "moe_intermediate_size": 1024,
        "num_hidden_layers": 27,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_experts": 256,
        "num_shared_experts": 1,
        "num_experts_per_token": 8,
        "first_k_dense_replace": 1,
        "num_expert_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.446,
        "moe_renormalize": True,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rms_norm_eps": 1e-5,
        "model_max_length": 1048576,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "linear_attn_config": {"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
                               "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
                               "kda_layers": [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)]},
    },
}


def shape_dir(name: str) -> str:
    """A directory holding only ``config.json`` for the named shape."""
    path = os.path.join(tempfile.gettempdir(), f"bench-shape-{name}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[name], f)
    return path


def _gdn_flops(cfg: dict, n: int) -> float:
    """One Gated DeltaNet layer on n tokens: projections (q, k, v, z, b, a, out) and the chunked delta rule per value
    head (chunk C: in-chunk ``K K^T``, ``Q K^T`` and ``P U`` products, then three ``Dk x Dv`` state products per
    token: the state read by the writes, by the queries, and the state update)."""
    h, hk, hv = cfg["hidden_size"], cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, c = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], 64
    proj = 2 * n * h * (2 * hk * dk + 2 * hv * dv + 2 * hv) + 2 * n * hv * dv * h
    return proj + hv * (2 * n * c * (2 * dk + dv) + 3 * 2 * n * dk * dv)


def _mla_flops(cfg: dict, n: int) -> float:
    """One MLA layer on n tokens in the absorbed form the engine runs: projections (q, or q LoRA down and up;
    the latent down projection; the per-head absorption of q_nope into latent space and the up-projection of the
    latent output; out) and causal attention of every head over ``L + R`` key and ``L`` value features."""
    h, nh, lat, rope = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, v, ql = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg.get("q_lora_rank")
    qk = nope + rope
    q = h * ql + ql * nh * qk if ql else h * nh * qk
    proj = 2 * n * (q + h * (lat + rope) + nh * nope * lat + nh * lat * v + nh * v * h)
    return proj + nh * 2 * (2 * lat + rope) * n * n / 2


def _kda_flops(cfg: dict, n: int) -> float:
    """One KDA layer: Gated DeltaNet's cost with one key head per value head, plus the low-rank gate projections."""
    lin = cfg["linear_attn_config"]
    gdn = dict(hidden_size=cfg["hidden_size"], linear_num_key_heads=lin["num_heads"],
               linear_num_value_heads=lin["num_heads"], linear_key_head_dim=lin["head_dim"],
               linear_value_head_dim=lin["head_dim"])
    return _gdn_flops(gdn, n) + 2 * n * 2 * (cfg["hidden_size"] + lin["num_heads"] * lin["head_dim"]) * lin["head_dim"]


def _latent_model_flops(cfg: dict, n: int) -> float:
    """DeepSeek-V3 / Kimi-Linear shapes: MLA (or KDA) layers, dense first layers, routed + shared experts."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    top_k = cfg.get("num_experts_per_tok") or cfg["num_experts_per_token"]
    shared = cfg.get("n_shared_experts") or cfg.get("num_shared_experts") or 0
    sparse = 2 * n * 3 * h * cfg["moe_intermediate_size"] * (top_k + shared)
    dense = 2 * n * 3 * h * cfg["intermediate_size"]
    kda = set(cfg.get("linear_attn_config", {}).get("kda_layers", []))
    total = 2 * h * cfg["vocab_size"]  # LM head on the last token only
    for i in range(layers):
        total += _kda_flops(cfg, n) if i + 1 in kda else _mla_flops(cfg, n)
        total += dense if i < cfg.get("first_k_dense_replace", 0) else sparse
    return total


def _mlp_width(cfg: dict, layer: int) -> int:
    """The intermediate width a token's MLP computes in ``layer``: a dense SwiGLU's, or the chosen experts' plus the
    shared expert's (MiniMax's experts: ``intermediate_size`` each; the others': ``moe_intermediate_size``)."""
    if "moe_intermediate_size" not in cfg:
        return cfg["intermediate_size"] * cfg.get("num_experts_per_tok", 1)
    if layer < cfg.get("first_k_dense_replace", 0) or layer in (cfg.get("mlp_only_layers") or []):
        return cfg["intermediate_size"]
    shared = cfg.get("shared_expert_intermediate_size") or cfg["moe_intermediate_size"] * cfg.get("n_shared_experts", 0)
    return cfg["moe_intermediate_size"] * cfg["num_experts_per_tok"] + shared


def prefill_flops(cfg: dict, n: int) -> float:
    """Forward FLOPs of prefilling n tokens (2 per multiply-add), counting work actually needed:
    dense/active-expert matmuls, causal softmax attention (QK^T and PV over the lower triangle), lightning
    attention computed blockwise (intra-block masked products + inter-block state products + state updates) and
    Gated DeltaNet computed chunkwise; MLA in the absorbed form, KDA as Gated DeltaNet."""
    if "kv_lora_rank" in cfg:
        return _latent_model_flops(cfg, n)
    h, d = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    gdn = "linear_num_key_heads" in cfg
    q_out = 2 if gdn else 1  # the hybrids' q projection also emits the output gate
    total = 2 * n * h * cfg["vocab_size"] / n  # LM head on the last token only
    for i, t in enumerate(types):
        mlp = 2 * n * 3 * h * _mlp_width(cfg, i)
        if t == "linear_attention" and gdn:
            proj, attn = _gdn_flops(cfg, n), 0.0
        elif t == "linear_attention":
            proj = 2 * n * h * (3 * nh * d + nh * d + nh * d)  # qkv, output gate, out
            blk = cfg.get("block_size", 256)
            attn = nh * (
                2 * n * blk * d + 2 * n * d * d * 2 + 2 * n * d * d
            )  # intra (avg blk/2, 2 products), inter, state
        else:
            proj = 2 * n * h * (q_out * nh * d + 2 * nkv * d + nh * d)
            attn = nh * 2 * 2 * d * n * n / 2  # causal: half of QK^T and PV
        total += proj + attn + mlp
    return total
