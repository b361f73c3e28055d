"""DeepSeek-V3 and the checkpoints that use its architecture (Kimi-K2, Moonlight): multi-head latent attention
(:mod:`server.layers.mla`), dense MLPs in the first ``first_k_dense_replace`` layers, then routed experts (grouped
sigmoid routing with a score-correction bias, :func:`server.layers.moe_routing.grouped_sigmoid_topk`) with ungated
shared experts.

Reads top to bottom: embedding -> N x (RMSNorm, MLA, residual, RMSNorm, MLP or MoE, residual) -> RMSNorm -> LM head.
The multi-token-prediction layers that DeepSeek-V3 checkpoints append (``model.layers.{N}`` and beyond, N =
``num_hidden_layers``) are not served: their tensors are skipped with one log line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.layers.mla import MultiHeadLatentAttention
from server.layers.moe import SharedExpertMoE
from server.layers.norm import RMSNorm
from server.models.common import GATED_MLP_RULES, CausalLM, GatedMLP, MoEMLP, stacked_expert_weights
from server.models.config import ModelConfig, MoEConfig
from server.sp.groups import ParallelState

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DeepseekV3Config(ModelConfig):
    """MLA sizes (``q_lora_rank`` None: no q LoRA), the routing of the sparse layers and which layers are sparse.
    ``head_dim`` is the query/key head size ``qk_nope + qk_rope`` (the cache holds latents, see
    :class:`server.layers.mla.LatentKVSpec`)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    sparse_layers: frozenset[int] = frozenset()
    num_mtp_layers: int = 0

    required_keys = ModelConfig.required_keys + ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                 "v_head_dim")

    @classmethod
    def family_fields(cls, raw) -> dict:
        scoring, method = raw.get("scoring_func", "sigmoid"), raw.get("topk_method", "noaux_tc")
        if scoring != "sigmoid" or method != "noaux_tc":
            raise ValueError(f"DeepseekV3ForCausalLM: routing scoring_func={scoring!r}, topk_method={method!r} is not "
                             "supported (supported: sigmoid with noaux_tc, as DeepSeek-V3, Kimi-K2 and Moonlight)")
        n, qk = raw["num_hidden_layers"], raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"]
        own = dict(q_lora_rank=raw.get("q_lora_rank") or None, num_kv_heads=raw["num_attention_heads"],
                   head_dim=qk, rope_interleave=bool(raw.get("rope_interleave", True)),
                   num_mtp_layers=raw.get("num_nextn_predict_layers") or 0,
                   **{k: raw[k] for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")})
        if raw.get("n_routed_experts"):
            shared = raw.get("n_shared_experts") or 0
            own["moe"] = MoEConfig(num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
                                   intermediate_size=raw["moe_intermediate_size"],
                                   shared_intermediate_size=raw["moe_intermediate_size"] * shared,
                                   norm_topk_prob=bool(raw.get("norm_topk_prob", True)), scoring="sigmoid",
                                   n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
                                   routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
                                   correction_bias=True)
            first, every = raw.get("first_k_dense_replace") or 0, raw.get("moe_layer_freq") or 1
            own["sparse_layers"] = frozenset(i for i in range(n) if i >= first and i % every == 0)
        return own


def latent_attention(cfg: DeepseekV3Config, pstate: ParallelState, dtype: torch.dtype,
                     rope: dict | None) -> MultiHeadLatentAttention:
    """The MLA layer of a config with these fields (``rope`` None: no rotation, Kimi-Linear)."""
    return MultiHeadLatentAttention(cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                                    cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, rope,
                                    cfg.rope_interleave, cfg.max_position_embeddings, cfg.rms_norm_eps,
                                    cfg.attention_bias, pstate, dtype)


def sparse_mlp(cfg: DeepseekV3Config, pstate: ParallelState, dtype: torch.dtype) -> MoEMLP:
    """Routed experts (the config's router, with the score-correction bias) plus the ungated shared experts."""
    moe = cfg.moe
    return MoEMLP(SharedExpertMoE(moe.num_experts, moe.top_k, cfg.hidden_size, moe.intermediate_size,
                                  moe.shared_intermediate_size, pstate, dtype, moe.router(), correction_bias=True,
                                  gated=False), pstate)


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer_idx: int, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.self_attn = latent_attention(cfg, pstate, dtype, dict(cfg.rope))
        self.mlp = sparse_mlp(cfg, pstate, dtype) if layer_idx in cfg.sparse_layers else \
            GatedMLP(cfg.hidden_size, cfg.intermediate_size, pstate, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.seq_sharded, ctx.split_mlp)


# checkpoint fragment -> parameter fragment (shard id) beyond the dense MLP's GATED_MLP_RULES; first match wins
MOE_RULES = [
    (".mlp.shared_experts.gate_proj.weight", ".mlp.moe.shared_w13", 0),
    (".mlp.shared_experts.up_proj.weight", ".mlp.moe.shared_w13", 1),
    (".mlp.shared_experts.down_proj.weight", ".mlp.moe.shared_w2", None),
    (".mlp.gate.e_score_correction_bias", ".mlp.moe.experts.e_score_correction_bias", None),
    (".mlp.gate.weight", ".mlp.moe.experts.gate", None),
    *GATED_MLP_RULES,
]


def served_layers_only(weights, num_layers: int):
    """Drop the tensors of layers at index >= ``num_layers`` (multi-token-prediction layers), logging once."""
    skipped = 0
    for name, t in weights:
        m = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= num_layers:
            skipped += 1
            continue
        yield name, t
    if skipped:
        log.info("multi-token-prediction layers are not served: skipped %d tensors", skipped)


class DeepseekV3ForCausalLM(CausalLM):
    """DeepSeek-V3 / Kimi-K2 / Moonlight (``DeepseekV3ForCausalLM`` checkpoints)."""

    config_class = DeepseekV3Config

    def __init__(self, cfg: DeepseekV3Config, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(cfg, i, pstate, dtype) for i in range(cfg.num_layers))

    def load_weights(self, weights) -> None:
        weights = stacked_expert_weights(served_layers_only(weights, self.cfg.num_layers),
                                         dict(self.named_parameters()), ".mlp.experts.", ".mlp.moe.experts.")
        self.load_checkpoint(weights, MOE_RULES, ignore=("rotary_emb.inv_freq",))
