"""Qwen3-MoE decoder (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B / 480B-A35B): Qwen3's attention (GQA,
per-head q/k RMSNorm, RoPE) and a sparse MLP: softmax top-k routing over ``num_experts`` experts, the chosen
weights renormalised when ``norm_topk_prob``. A layer is sparse unless it is in ``mlp_only_layers`` or off the
``decoder_sparse_step`` grid (every layer in the published checkpoints); dense layers run a SwiGLU MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.layers.moe import FusedMoE
from server.models.common import (
    GATED_MLP_RULES,
    QKV_RULES,
    CausalLM,
    GatedMLP,
    MoEMLP,
    PreNormDecoderLayer,
    stacked_expert_weights,
)
from server.models.config import MoEConfig
from server.models.llama import LlamaAttentionBlock, LlamaConfig
from server.sp.groups import ParallelState


@dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(LlamaConfig):
    """Qwen3's attention fields plus the experts and which layers are sparse."""

    sparse_layers: frozenset[int] = frozenset()

    required_keys = LlamaConfig.required_keys + ("num_experts_per_tok", "moe_intermediate_size")

    @classmethod
    def family_fields(cls, raw) -> dict:
        own = super().family_fields(raw)
        # transformers >= 5 saves num_experts as num_local_experts
        experts = raw.get("num_experts") or raw.get("num_local_experts")
        if not experts:
            raise KeyError("num_experts")
        n = raw["num_hidden_layers"]
        dense = set(raw.get("mlp_only_layers") or [])
        step = raw.get("decoder_sparse_step") or 1
        return {**own, "qk_norm": True,
                "moe": MoEConfig(num_experts=experts, top_k=raw["num_experts_per_tok"],
                                 intermediate_size=raw["moe_intermediate_size"],
                                 norm_topk_prob=bool(raw.get("norm_topk_prob", False))),
                "sparse_layers": frozenset(i for i in range(n) if i not in dense and (i + 1) % step == 0)}


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE and Qwen3-Coder MoE checkpoints."""

    config_class = Qwen3MoeConfig

    def __init__(self, cfg: Qwen3MoeConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        moe = cfg.moe
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(
                LlamaAttentionBlock(cfg, pstate, dtype, cfg.qkv_bias, qk_norm=True),
                MoEMLP(FusedMoE(moe.num_experts, moe.top_k, cfg.hidden_size, moe.intermediate_size, pstate, dtype,
                                moe.router()), pstate)
                if i in cfg.sparse_layers else GatedMLP(cfg.hidden_size, cfg.intermediate_size, pstate, dtype),
                cfg, dtype)
            for i in range(cfg.num_layers))

    def load_weights(self, weights) -> None:
        rules = QKV_RULES + GATED_MLP_RULES + [(".mlp.gate.weight", ".mlp.moe.gate", None)]
        experts = stacked_expert_weights(weights, dict(self.named_parameters()), ".mlp.experts.", ".mlp.moe.")
        self.load_checkpoint(experts, rules, ignore=("rotary_emb.inv_freq",))
