"""MiniMax-M2 / M2.1 decoder (``MiniMaxM2ForCausalLM``): GQA softmax attention on every layer and a sparse MLP on
every layer (MiniMax left the lightning layers of MiniMax-Text-01 behind).

Attention: q and k are RMS-normalised over the *whole* projection (all heads together: ``q_norm`` has
``num_heads x head_dim`` weights), then RoPE on the first ``rotary_dim`` features of each head (partial rotary).
Under TP a rank holds only its heads, so the norm is a :class:`server.layers.norm.TPRMSNorm`: each rank sums the
squares of its slice in fp32, the sums are all-reduced over the TP group (one ``[T, 1]`` all-reduce per norm, on
the rows every TP rank holds after the column projection's all-gather), and every rank divides by the full
width, so the result equals the unsharded norm; each rank keeps only its slice of the weight. When there are
fewer KV heads than TP ranks, each KV head is replicated on ``tp / num_kv_heads`` ranks and k's all-reduced sum
is divided by that replication.

MoE: ``num_local_experts`` experts; sigmoid scores, chosen by score + ``e_score_correction_bias``, weighted by the
scores renormalised (:func:`server.layers.moe_routing.sigmoid_topk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from server.layers.moe import FusedMoE
from server.layers.norm import TPRMSNorm
from server.models.common import QKV_RULES, CausalLM, MoEMLP, PreNormDecoderLayer, stacked_expert_weights
from server.models.config import ModelConfig, MoEConfig, rope_params
from server.models.llama import LlamaAttentionBlock
from server.sp.groups import ParallelState


@dataclass(frozen=True, kw_only=True)
class MiniMaxM2Config(ModelConfig):
    """The experts and their router; ``rotary_dim`` becomes the rope's ``partial_rotary_factor``."""

    required_keys = ModelConfig.required_keys + ("num_local_experts", "num_experts_per_tok", "intermediate_size")

    @classmethod
    def family_fields(cls, raw) -> dict:
        if raw.get("use_qk_norm", True) is False or raw.get("qk_norm_type", "per_layer") != "per_layer":
            raise ValueError("MiniMax-M2 checkpoints are served with use_qk_norm and qk_norm_type 'per_layer' only")
        rope = rope_params(raw)
        if raw.get("rotary_dim"):
            head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
            rope.setdefault("partial_rotary_factor", raw["rotary_dim"] / head_dim)
        return dict(
            rope=MappingProxyType(rope),
            moe=MoEConfig(num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"],
                          intermediate_size=raw["intermediate_size"], scoring=raw.get("scoring_func", "sigmoid"),
                          correction_bias=bool(raw.get("use_routing_bias", True))),
        )


class AllHeadsRMSNorm(TPRMSNorm):
    """q or k ``[T, H, D]`` (this rank's heads) normalised over every head of the layer at once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(-2)).view_as(x)


class MiniMaxM2AttentionBlock(LlamaAttentionBlock):
    """:class:`server.models.llama.LlamaAttentionBlock` with q/k RMSNorm over all heads (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype, qkv_bias=False, qk_norm=False)
        d, tp = cfg.head_dim, pstate.tp_size
        self.q_norm = AllHeadsRMSNorm(cfg.num_heads * d, cfg.rms_norm_eps, pstate, dtype)
        self.k_norm = AllHeadsRMSNorm(cfg.num_kv_heads * d, cfg.rms_norm_eps, pstate, dtype,
                                      replicas=max(1, tp // cfg.num_kv_heads))


class MiniMaxM2ForCausalLM(CausalLM):
    """MiniMax-M2 and M2.1 checkpoints."""

    config_class = MiniMaxM2Config

    def __init__(self, cfg: MiniMaxM2Config, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        moe = cfg.moe
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(
                MiniMaxM2AttentionBlock(cfg, pstate, dtype),
                MoEMLP(FusedMoE(moe.num_experts, moe.top_k, cfg.hidden_size, moe.intermediate_size, pstate, dtype,
                                moe.router(), moe.correction_bias), pstate),
                cfg, dtype, mlp_name="block_sparse_moe")
            for _ in range(cfg.num_layers))

    def load_weights(self, weights) -> None:
        rules = QKV_RULES + [
            (".block_sparse_moe.gate.weight", ".block_sparse_moe.moe.gate", None),
            (".block_sparse_moe.e_score_correction_bias", ".block_sparse_moe.moe.e_score_correction_bias", None),
        ]
        experts = stacked_expert_weights(weights, dict(self.named_parameters()), ".block_sparse_moe.experts.",
                                         ".block_sparse_moe.moe.", names=("w1", "w3", "w2"),
                                         num_layers=self.cfg.num_layers)
        self.load_checkpoint(experts, rules, ignore=("rotary_emb.inv_freq",))
