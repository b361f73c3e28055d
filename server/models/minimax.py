"""MiniMax hybrid decoder: lightning (linear) attention and softmax attention layers, MoE MLPs.

Layer i is lightning or softmax by ``layer_types`` (real checkpoints: seven lightning layers, then one softmax).
Blocks are post-norm with scaled residuals, as in the reference implementation:
``h = norm(x); x = h * alpha + attn(h) * beta`` and likewise for the MoE.
A lightning block: ``q, k, v = silu(x W_qkv)`` (per-head interleaved), lightning attention with per-head decay,
RMSNorm over all heads (sum of squares reduced over TP), a sigmoid output gate, then the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.layers.lightning import LightningAttention, minimax_slopes
from server.layers.linear import (
    ColumnSeqParallelLinear,
    RowSeqParallelLinear,
    divide,
)
from server.layers.moe import FusedMoE
from server.layers.norm import RMSNorm, TPRMSNorm
from server.models.common import QKV_RULES, CausalLM
from server.models.config import ModelConfig, MoEConfig
from server.models.llama import LlamaAttentionBlock
from server.sp.groups import ParallelState


@dataclass(frozen=True, kw_only=True)
class MiniMaxConfig(ModelConfig):
    """MiniMax-Text-01: lightning / softmax layer kinds, MoE on every layer, the post-norm residual factors."""

    linear_attn_alpha: float = 1.0
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = 1.0
    full_attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0

    required_keys = ModelConfig.required_keys + ("num_local_experts", "num_experts_per_tok", "intermediate_size")

    @classmethod
    def family_fields(cls, raw) -> dict:
        if raw.get("layer_types"):
            kinds = list(raw["layer_types"])
        elif raw.get("attn_type_list"):  # original MiniMax-Text-01 configs: 0 = lightning, 1 = softmax
            kinds = ["full_attention" if t else "linear_attention" for t in raw["attn_type_list"]]
        else:
            kinds = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(raw["num_hidden_layers"])]
        return dict(
            layer_types=tuple(kinds),
            moe=MoEConfig(num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"],
                          intermediate_size=raw["intermediate_size"]),
            linear_attn_alpha=raw.get("linear_attn_alpha_factor", 1),
            linear_attn_beta=raw.get("linear_attn_beta_factor", 1),
            full_attn_alpha=raw.get("full_attn_alpha_factor", 1),
            full_attn_beta=raw.get("full_attn_beta_factor", 1),
            mlp_alpha=raw.get("mlp_alpha_factor", 1),
            mlp_beta=raw.get("mlp_beta_factor", 1),
        )


class LightningBlock(nn.Module):
    """MiniMax's lightning-attention token mixer: projections, lightning attention (LASP under SP), norm, gate."""

    def __init__(self, cfg: MiniMaxConfig, layer_idx: int, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        hidden, d, heads = cfg.hidden_size, cfg.head_dim, cfg.num_heads
        self.pstate = pstate
        self.d = d
        self.h = divide(heads, pstate.tp_size, "the number of lightning attention heads")
        self.qkv_proj = ColumnSeqParallelLinear(hidden, 3 * heads * d, pstate, False, dtype)
        self.output_gate = ColumnSeqParallelLinear(hidden, heads * d, pstate, False, dtype)
        self.out_proj = RowSeqParallelLinear(heads * d, hidden, pstate, False, dtype)
        # The reference normalizes the lightning output with its default eps, not rms_norm_eps.
        self.norm = TPRMSNorm(heads * d, 1e-6, pstate, dtype)
        slopes = minimax_slopes(heads, layer_idx, cfg.num_layers)
        self.attn = LightningAttention(slopes[pstate.tp_rank * self.h : (pstate.tp_rank + 1) * self.h], d)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.seq_sharded:  # gather the tokens once for both column layers
            x = self.pstate.tp_all_gather(x, dim=0)
        qkv = torch.nn.functional.silu(self.qkv_proj(x)).view(-1, self.h, 3 * self.d)
        q, k, v = qkv.split(self.d, dim=-1)
        o = self.attn(q.contiguous(), k.contiguous(), v.contiguous(), ctx)
        o = self.norm(o.flatten(1))
        o = torch.sigmoid(self.output_gate(x)) * o
        return self.out_proj(o, ctx.seq_sharded)


class MoEBlock(nn.Module):
    """MiniMax's sparse MLP: the experts' partial sums reduced over TP (or reduce-scattered when seq-sharded)."""

    def __init__(self, cfg: MiniMaxConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.pstate = pstate
        self.experts = FusedMoE(cfg.moe.num_experts, cfg.moe.top_k, cfg.hidden_size, cfg.moe.intermediate_size,
                                pstate, dtype)

    def forward(self, x: torch.Tensor, seq_sharded: bool) -> torch.Tensor:
        if seq_sharded:
            return self.pstate.tp_reduce_scatter(self.experts(self.pstate.tp_all_gather(x, dim=0)))
        return self.pstate.tp_all_reduce(self.experts(x))


class MiniMaxDecoderLayer(nn.Module):
    """One MiniMax layer: post-norm residuals with the config's alpha/beta factors around mixer and MoE."""

    def __init__(self, cfg: MiniMaxConfig, layer_idx: int, layer_type: str, pstate: ParallelState,
                 dtype: torch.dtype):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.self_attn = LightningBlock(cfg, layer_idx, pstate, dtype)
            self.alpha, self.beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
        else:
            self.self_attn = LlamaAttentionBlock(cfg, pstate, dtype, qkv_bias=False, qk_norm=False)
            self.alpha, self.beta = cfg.full_attn_alpha, cfg.full_attn_beta
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha, cfg.mlp_beta
        self.block_sparse_moe = MoEBlock(cfg, pstate, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = h * self.alpha + self.self_attn(h, ctx) * self.beta
        h = self.post_attention_layernorm(x)
        return h * self.mlp_alpha + self.block_sparse_moe(h, ctx.seq_sharded) * self.mlp_beta


class MiniMaxForCausalLM(CausalLM):
    """MiniMax-Text-01: lightning and softmax layers (layer_types), MoE MLPs."""

    config_class = MiniMaxConfig

    def __init__(self, cfg: MiniMaxConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        self.layer_types = list(cfg.layer_types)
        self.layers = nn.ModuleList(
            MiniMaxDecoderLayer(cfg, i, t, pstate, dtype) for i, t in enumerate(self.layer_types)
        )

    def load_weights(self, weights) -> None:
        rules = QKV_RULES + [(".block_sparse_moe.gate.weight", ".block_sparse_moe.experts.gate", None)]
        params = dict(self.named_parameters())

        def dispatch_experts(weights):
            """Per-expert w1/w3 (gate/up) and w2 (down) tensors go to the stacked expert parameters."""
            for name, t in weights:
                base = name.removeprefix("model.")
                if ".block_sparse_moe.experts." in base and base.endswith(".weight"):
                    prefix, rest = base.split(".block_sparse_moe.experts.")
                    expert, which, _ = rest.split(".")
                    e = int(expert)
                    if which == "w2":
                        p = params[prefix + ".block_sparse_moe.experts.w2"]
                        p.weight_loader(p, t, e)
                    else:
                        p = params[prefix + ".block_sparse_moe.experts.w13"]
                        p.weight_loader(p, t, (e, 0 if which == "w1" else 1))
                    continue
                yield name, t

        ignore = ("slope_rate", "query_decay", "key_decay", "diagonal_decay", "rotary_emb.inv_freq")
        self.load_checkpoint(dispatch_experts(weights), rules, ignore)
