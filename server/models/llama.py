"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): GQA, RoPE, SwiGLU, optional qkv bias and q/k norm.

Reads top to bottom: embedding -> N x (norm, attention, residual, norm, MLP, residual) -> norm -> LM head.
Linear layers are the TP/sequence-parallel forms; ``ctx.seq_sharded`` says whether the residual stream holds
this TP rank's 1/tp of the rows (long SP prefills) or all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.layers.attention import Attention
from server.layers.linear import QKVSeqParallelLinear, RowSeqParallelLinear
from server.layers.norm import RMSNorm
from server.layers.rotary import RotaryEmbedding
from server.models.common import QKV_RULES, CausalLM, GatedMLP
from server.models.config import ModelConfig
from server.sp.groups import ParallelState


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm). A Mistral-style ``sliding_window`` caps the
    context: these layers attend to the whole context, which equals the window up to that length."""

    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def family_fields(cls, raw) -> dict:
        arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
        own = dict(qkv_bias=bool(raw.get("attention_bias", False)) or arch == "Qwen2ForCausalLM",
                   qk_norm=arch == "Qwen3ForCausalLM")
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        if window:
            own["context_limit"] = min(raw.get("max_position_embeddings") or window, window)
        return own


class LlamaAttentionBlock(nn.Module):
    """Softmax attention block: fused QKV (optional bias), optional q/k RMSNorm, RoPE, attention, output
    projection. Also MiniMax's softmax layers."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        hidden, d = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = QKVSeqParallelLinear(hidden, d, cfg.num_heads, cfg.num_kv_heads, pstate, qkv_bias, dtype)
        self.o_proj = RowSeqParallelLinear(cfg.num_heads * d, hidden, pstate, False, dtype)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if qk_norm else None
        self.rotary = RotaryEmbedding(d, dict(cfg.rope), cfg.max_position_embeddings)
        self.nh, self.nkv, self.d = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d
        self.attn = Attention(self.nh, self.nkv, d, d**-0.5)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x, ctx.seq_sharded)
        q, k, v = qkv.split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q, k, v = q.view(-1, self.nh, self.d), k.view(-1, self.nkv, self.d), v.view(-1, self.nkv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(ctx.positions, q, k, ctx.shared)
        o = self.attn(q, k, v, ctx)
        return self.o_proj(o.flatten(1), ctx.seq_sharded)


class LlamaDecoderLayer(nn.Module):
    """One Llama-family layer: pre-norm attention and SwiGLU MLP with residuals."""

    def __init__(self, cfg: LlamaConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.self_attn = LlamaAttentionBlock(cfg, pstate, dtype, cfg.qkv_bias, cfg.qk_norm)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, pstate, dtype, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.seq_sharded, ctx.split_mlp)


class LlamaForCausalLM(CausalLM):
    """Also serves Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm) checkpoints."""

    config_class = LlamaConfig

    def __init__(self, cfg: LlamaConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, pstate, dtype) for _ in range(cfg.num_layers))

    def load_weights(self, weights) -> None:
        rules = QKV_RULES + [(".mlp.gate_proj.", ".mlp.gate_up_proj.", 0), (".mlp.up_proj.", ".mlp.gate_up_proj.", 1)]
        self.load_checkpoint(weights, rules, ignore=("rotary_emb.inv_freq",))
