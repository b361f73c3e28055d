"""GLM-4.5 / 4.6 / 4.7 decoder (``Glm4MoeForCausalLM``): GQA with q/k/v biases, optional per-head q/k RMSNorm
(``use_qk_norm``), RoPE on the first half of each head (``partial_rotary_factor`` 0.5, rotate-half layout), and
MoE MLPs after ``first_k_dense_replace`` dense layers.

The MoE: ``n_routed_experts`` routed experts picked by grouped sigmoid routing (experts in ``n_group`` groups, the
``topk_group`` best groups compete; chosen by ``sigmoid(logit) + e_score_correction_bias``, weighted by the
sigmoid alone, renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``), plus ``n_shared_experts``
always-on experts stored as one MLP of ``n_shared_experts x moe_intermediate_size``, added ungated. The
checkpoints' multi-token-prediction layer (``model.layers.{num_hidden_layers}``) is not served.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from server.layers.moe import SharedExpertMoE
from server.models.common import (
    GATED_MLP_RULES,
    QKV_RULES,
    CausalLM,
    GatedMLP,
    MoEMLP,
    PreNormDecoderLayer,
    stacked_expert_weights,
)
from server.models.config import ModelConfig, MoEConfig, rope_params
from server.models.llama import LlamaAttentionBlock
from server.sp.groups import ParallelState


@dataclass(frozen=True, kw_only=True)
class Glm4MoeConfig(ModelConfig):
    """The attention options, the dense prefix and the routed + shared experts."""

    qk_norm: bool = False
    first_k_dense: int = 1

    required_keys = ModelConfig.required_keys + ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")

    @classmethod
    def family_fields(cls, raw) -> dict:
        return dict(
            qk_norm=bool(raw.get("use_qk_norm", False)),
            first_k_dense=raw.get("first_k_dense_replace", 1),
            rope=MappingProxyType({"partial_rotary_factor": 0.5, **rope_params(raw)}),  # GLM's default: half
            moe=MoEConfig(num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
                          intermediate_size=raw["moe_intermediate_size"],
                          shared_intermediate_size=raw["moe_intermediate_size"] * raw.get("n_shared_experts", 1),
                          norm_topk_prob=bool(raw.get("norm_topk_prob", True)), scoring="sigmoid",
                          n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
                          routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)), correction_bias=True),
        )


class Glm4MoeForCausalLM(CausalLM):
    """GLM-4.5, GLM-4.5-Air, GLM-4.6 and GLM-4.7 checkpoints."""

    config_class = Glm4MoeConfig

    def __init__(self, cfg: Glm4MoeConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        moe = cfg.moe

        def mlp(i: int) -> nn.Module:
            if i < cfg.first_k_dense:
                return GatedMLP(cfg.hidden_size, cfg.intermediate_size, pstate, dtype)
            return MoEMLP(SharedExpertMoE(moe.num_experts, moe.top_k, cfg.hidden_size, moe.intermediate_size,
                                          moe.shared_intermediate_size, pstate, dtype, moe.router(),
                                          correction_bias=True, gated=False), pstate)

        self.layers = nn.ModuleList(
            PreNormDecoderLayer(LlamaAttentionBlock(cfg, pstate, dtype, cfg.attention_bias, cfg.qk_norm), mlp(i),
                                cfg, dtype)
            for i in range(cfg.num_layers))

    def load_weights(self, weights) -> None:
        rules = QKV_RULES + GATED_MLP_RULES + [
            (".mlp.gate.weight", ".mlp.moe.experts.gate", None),
            (".mlp.gate.e_score_correction_bias", ".mlp.moe.experts.e_score_correction_bias", None),
            (".mlp.shared_experts.gate_proj.weight", ".mlp.moe.shared_w13", 0),
            (".mlp.shared_experts.up_proj.weight", ".mlp.moe.shared_w13", 1),
            (".mlp.shared_experts.down_proj.weight", ".mlp.moe.shared_w2", None),
        ]
        experts = stacked_expert_weights(weights, dict(self.named_parameters()), ".mlp.experts.", ".mlp.moe.experts.",
                                         num_layers=self.cfg.num_layers)
        self.load_checkpoint(experts, rules, ignore=("rotary_emb.inv_freq",))
