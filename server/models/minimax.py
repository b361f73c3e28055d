"""MiniMax hybrid decoder: lightning (linear) attention and softmax attention layers, MoE MLPs.

Layer i is lightning or softmax by ``layer_types`` (real checkpoints: seven lightning layers, then one softmax).
Blocks are post-norm with scaled residuals, as in the reference implementation:
``h = norm(x); x = h * alpha + attn(h) * beta`` and likewise for the MoE.
A lightning block: ``q, k, v = silu(x W_qkv)`` (per-head interleaved), lightning attention with per-head decay,
RMSNorm over all heads (sum of squares reduced over TP), a sigmoid output gate, then the output projection.
"""

from __future__ import annotations

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.layers.lightning import LightningAttention, minimax_slopes
from server.layers.linear import (
    ColumnSeqParallelLinear,
    RowSeqParallelLinear,
    divide,
)
from server.layers.moe import FusedMoE, moe_block_forward
from server.layers.norm import RMSNorm, TPRMSNorm
from server.models.common import QKV_RULES, CausalLM, head_dim_of
from server.models.llama import LlamaAttentionBlock
from server.sp.groups import ParallelState


def minimax_layer_types(cfg: dict) -> list[str]:
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    if cfg.get("attn_type_list"):  # original MiniMax-Text-01 configs: 0 = lightning, 1 = softmax
        return ["full_attention" if t else "linear_attention" for t in cfg["attn_type_list"]]
    return ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(cfg["num_hidden_layers"])]


class LightningBlock(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        hidden, d, heads = cfg["hidden_size"], head_dim_of(cfg), cfg["num_attention_heads"]
        self.pstate = pstate
        self.d = d
        self.h = divide(heads, pstate.tp_size, "the number of lightning attention heads")
        self.qkv_proj = ColumnSeqParallelLinear(hidden, 3 * heads * d, pstate, False, dtype)
        self.output_gate = ColumnSeqParallelLinear(hidden, heads * d, pstate, False, dtype)
        self.out_proj = RowSeqParallelLinear(heads * d, hidden, pstate, False, dtype)
        # The reference normalizes the lightning output with its default eps, not rms_norm_eps.
        self.norm = TPRMSNorm(heads * d, 1e-6, pstate, dtype)
        slopes = minimax_slopes(heads, layer_idx, cfg["num_hidden_layers"])
        self.attn = LightningAttention(slopes[pstate.tp_rank * self.h : (pstate.tp_rank + 1) * self.h])

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
    def __init__(self, cfg: dict, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.pstate = pstate
        self.experts = FusedMoE(cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"],
                                cfg["intermediate_size"], pstate, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return moe_block_forward(self.experts, x, ctx)


class MiniMaxDecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, layer_type: str, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.self_attn = LightningBlock(cfg, layer_idx, pstate, dtype)
            self.alpha, self.beta = cfg.get("linear_attn_alpha_factor", 1), cfg.get("linear_attn_beta_factor", 1)
        else:
            self.self_attn = LlamaAttentionBlock(cfg, pstate, dtype, qkv_bias=False, qk_norm=False)
            self.alpha, self.beta = cfg.get("full_attn_alpha_factor", 1), cfg.get("full_attn_beta_factor", 1)
        self.mlp_alpha, self.mlp_beta = cfg.get("mlp_alpha_factor", 1), cfg.get("mlp_beta_factor", 1)
        self.block_sparse_moe = MoEBlock(cfg, pstate, dtype)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"], dtype)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"], dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = h * self.alpha + self.self_attn(h, ctx) * self.beta
        h = self.post_attention_layernorm(x)
        return h * self.mlp_alpha + self.block_sparse_moe(h, ctx) * self.mlp_beta


class MiniMaxForCausalLM(CausalLM):
    def __init__(self, cfg: dict, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        self.layer_types = minimax_layer_types(cfg)
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
