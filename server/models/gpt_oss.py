"""gpt-oss decoder (gpt-oss-20b / 120b): alternating sliding-window (128) and full softmax layers with learned
attention sinks and biases on q/k/v/o, YaRN RoPE, and MoE MLPs (router with bias, softmax over the top-k logits,
clamped SwiGLU experts with biases) on every layer.

Reads top to bottom: embedding -> N x (norm, attention, residual, norm, MoE, residual) -> norm -> LM head. The
window and the sinks live in the attention layer (:class:`server.layers.attention.Attention`); under SP a window
layer's split chunks read a KV halo instead of the ring and sinks are applied once to the merged result
(docs/sp.md). The checkpoint's MXFP4 expert weights (``*_blocks`` / ``*_scales``) are dequantized to the model
dtype at load (:mod:`server.models.mxfp4`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.layers.attention import Attention
from server.layers.gpt_oss_moe import GptOssMoE
from server.layers.linear import RowSeqParallelLinear, as_tensor, copy_into
from server.layers.moe import moe_block_forward
from server.layers.norm import RMSNorm
from server.models.common import QKV_RULES, CausalLM
from server.models.config import ModelConfig, MoEConfig
from server.models.llama import LlamaAttentionBlock
from server.models.mxfp4 import dequantize_mxfp4
from server.sp.groups import ParallelState


@dataclass(frozen=True, kw_only=True)
class GptOssConfig(ModelConfig):
    """gpt-oss: the sliding window of its ``sliding_attention`` layers and the experts' clamped SwiGLU."""

    sliding_window: int = 128
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    required_keys = ModelConfig.required_keys + ("num_local_experts", "num_experts_per_tok", "intermediate_size")

    @classmethod
    def family_fields(cls, raw) -> dict:
        n = raw["num_hidden_layers"]
        kinds = raw.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        return dict(
            layer_types=tuple(kinds),
            sliding_window=raw.get("sliding_window") or 128,
            swiglu_alpha=raw.get("swiglu_alpha", 1.702),
            swiglu_limit=raw.get("swiglu_limit", 7.0),
            attention_bias=bool(raw.get("attention_bias", True)),
            moe=MoEConfig(num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"],
                          intermediate_size=raw["intermediate_size"]),
        )


class GptOssAttentionBlock(LlamaAttentionBlock):
    """Softmax attention with biases on q/k/v and o, per-head sinks and, on sliding layers, the window."""

    def __init__(self, cfg: GptOssConfig, pstate: ParallelState, dtype: torch.dtype, window: int | None):
        super().__init__(cfg, pstate, dtype, qkv_bias=cfg.attention_bias, qk_norm=False)
        d = cfg.head_dim
        self.o_proj = RowSeqParallelLinear(cfg.num_heads * d, cfg.hidden_size, pstate, cfg.attention_bias, dtype)
        self.attn = Attention(self.nh, self.nkv, d, d**-0.5, window=window, sinks=True, dtype=dtype)
        rank_heads = slice(pstate.tp_rank * self.nh, (pstate.tp_rank + 1) * self.nh)

        def sinks_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
            copy_into(param.data, as_tensor(loaded[rank_heads]), "the attention sinks")

        self.attn.sinks.weight_loader = sinks_loader


class GptOssDecoderLayer(nn.Module):
    """One gpt-oss layer: sliding-window or full attention with sinks, then the MoE, pre-norm residuals."""

    def __init__(self, cfg: GptOssConfig, layer_type: str, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.pstate = pstate
        window = cfg.sliding_window if layer_type == "sliding_attention" else None
        self.self_attn = GptOssAttentionBlock(cfg, pstate, dtype, window)
        self.mlp = GptOssMoE(cfg.moe.num_experts, cfg.moe.top_k, cfg.hidden_size, cfg.moe.intermediate_size, pstate,
                             dtype, cfg.swiglu_alpha, cfg.swiglu_limit)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + moe_block_forward(self.mlp, self.post_attention_layernorm(x), ctx)


# checkpoint name fragments -> parameters (biases before the weights whose names they extend)
GPT_OSS_RULES = QKV_RULES + [
    (".self_attn.sinks", ".self_attn.attn.sinks", None),
    (".mlp.router.weight", ".mlp.gate", None),
    (".mlp.router.bias", ".mlp.router_bias", None),
    (".mlp.experts.gate_up_proj_bias", ".mlp.b13", None),
    (".mlp.experts.down_proj_bias", ".mlp.b2", None),
    (".mlp.experts.gate_up_proj", ".mlp.w13", None),
    (".mlp.experts.down_proj", ".mlp.w2", None),
]


def expert_tensors(weights: Iterable[tuple[str, object]], dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    """The checkpoint's expert matrices as ``[E, out, in]`` of ``dtype``: MXFP4 ``*_blocks`` / ``*_scales`` pairs
    (already ``[E, out, in]``) dequantized, dense ``[E, in, out]`` ones (transformers' layout) transposed. Other
    tensors pass through."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights:
        base, _, kind = name.rpartition("_")
        if ".mlp.experts." in name and kind in ("blocks", "scales"):
            parts = pending.setdefault(base, {})
            parts[kind] = as_tensor(t)
            if len(parts) == 2:
                del pending[base]
                yield base, dequantize_mxfp4(parts["blocks"], parts["scales"], dtype)
        elif name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            yield name, as_tensor(t).transpose(1, 2)
        else:
            yield name, t
    if pending:
        raise ValueError(f"MXFP4 tensors without their blocks or scales: {sorted(pending)}")


class GptOssForCausalLM(CausalLM):
    """gpt-oss-20b / 120b: alternating sliding-window and full layers with learned sinks, MoE MLPs."""

    config_class = GptOssConfig

    def __init__(self, cfg: GptOssConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        self.dtype = dtype
        self.layers = nn.ModuleList(GptOssDecoderLayer(cfg, t, pstate, dtype) for t in cfg.layer_types)

    def load_weights(self, weights) -> None:
        self.load_checkpoint(expert_tensors(weights, self.dtype), GPT_OSS_RULES, ignore=("rotary_emb.inv_freq",))
