"""Kimi-Linear: Kimi Delta Attention (KDA) layers and multi-head latent attention layers without RoPE, a dense MLP
in the first layers and DeepSeek-V3-style routed plus shared experts in the others.

Reads top to bottom: embedding -> N x (RMSNorm, token mixer, residual, RMSNorm, MLP or MoE, residual) -> RMSNorm
-> LM head. Layer i's token mixer is ``layer_types[i]``:
- ``linear_attention`` (KDA): q, k, v projections -> each its own causal depthwise conv1d (kernel 4) + SiLU -> q/k
  L2 norm -> the gated delta rule with ``beta = sigmoid(b_proj x)`` and a per-channel decay
  ``g = -exp(A_log_h) * softplus(f_b_proj(f_a_proj x) + dt_bias)`` (docs/sp.md: Kimi Delta Attention) -> per-head
  RMSNorm gated by ``sigmoid(g_b_proj(g_a_proj x))`` -> o_proj. The conv and the recurrence are
  :class:`server.layers.gdn.GDNAttention` with a ``[T, H, Dk]`` gate: the same state pool, SP state passing, conv
  halo and prefix-cache snapshots as Gated DeltaNet.
- ``full_attention``: :class:`server.layers.mla.MultiHeadLatentAttention` without rotation.

Checkpoints name both mixers ``self_attn`` and the MLP ``block_sparse_moe`` (experts ``w1``/``w3``/``w2``); the
loader maps them to this module's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.forward.context import ForwardContext
from server.layers.gdn import GDNAttention
from server.layers.linear import (
    ColumnSeqParallelLinear,
    MergedColumnSeqParallelLinear,
    RowSeqParallelLinear,
    as_tensor,
    copy_into,
    divide,
)
from server.layers.mla import ReplicatedLinear
from server.layers.norm import GatedRMSNorm, RMSNorm
from server.models.common import CausalLM, GatedMLP, stacked_expert_weights
from server.models.deepseek_v3 import MOE_RULES, DeepseekV3Config, latent_attention, sparse_mlp
from server.sp.groups import ParallelState

# Kimi-Linear's config.json names -> the DeepSeek-V3 names DeepseekV3Config reads
KEY_ALIASES = {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts",
               "num_experts_per_token": "num_experts_per_tok", "num_expert_group": "n_group",
               "moe_renormalize": "norm_topk_prob", "num_shared_experts": "n_shared_experts"}


@dataclass(frozen=True, kw_only=True)
class KimiLinearConfig(DeepseekV3Config):
    """The KDA layers' heads, head size and conv kernel on top of the MLA and MoE fields."""

    linear_num_heads: int = 32
    linear_head_dim: int = 128
    linear_conv_kernel_dim: int = 4

    @classmethod
    def family_fields(cls, raw) -> dict:
        raw = dict(raw)
        for old, new in KEY_ALIASES.items():
            if old in raw and new not in raw:
                raw[new] = raw[old]
        n = raw["num_hidden_layers"]
        lin = raw.get("linear_attn_config") or {}
        kinds = raw.get("layer_types")
        if not kinds and "kda_layers" in lin:  # 1-indexed layer lists in published checkpoints
            kinds = ["linear_attention" if i + 1 in lin["kda_layers"] else "full_attention" for i in range(n)]
        if not kinds:
            raise ValueError("KimiLinearForCausalLM: config.json has neither layer_types nor "
                             "linear_attn_config.kda_layers")
        own = super().family_fields({"topk_method": "noaux_tc", "scoring_func": "sigmoid", **raw})
        mlp_kinds = raw.get("mlp_layer_types")
        if mlp_kinds and own.get("moe"):
            own["sparse_layers"] = frozenset(i for i, k in enumerate(mlp_kinds) if k == "sparse")
        max_pos = raw.get("max_position_embeddings") or raw.get("model_max_length")
        if max_pos:
            own.update(max_position_embeddings=max_pos, context_limit=max_pos)
        own.update(layer_types=tuple(kinds), q_lora_rank=raw.get("q_lora_rank") or None,
                   linear_num_heads=lin.get("num_heads") or raw.get("linear_num_heads", 32),
                   linear_head_dim=lin.get("head_dim") or raw.get("linear_head_dim", 128),
                   linear_conv_kernel_dim=lin.get("short_conv_kernel_size") or raw.get("linear_conv_kernel_dim", 4))
        return own


class KimiDeltaAttentionBlock(nn.Module):
    """Projections, gates and output of a KDA layer around :class:`GDNAttention`; this rank's heads."""

    def __init__(self, cfg: KimiLinearConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        hidden, d = cfg.hidden_size, cfg.linear_head_dim
        self.pstate, self.d = pstate, d
        self.h = divide(cfg.linear_num_heads, pstate.tp_size, "the number of KDA heads")
        width = cfg.linear_num_heads * d
        self.qkv_proj = MergedColumnSeqParallelLinear(hidden, [width] * 3, pstate, False, dtype)
        self.f_a_proj = ReplicatedLinear(hidden, d, False, dtype)
        self.f_b_proj = ColumnSeqParallelLinear(d, width, pstate, False, dtype)
        self.g_a_proj = ReplicatedLinear(hidden, d, False, dtype)
        self.g_b_proj = ColumnSeqParallelLinear(d, width, pstate, False, dtype)
        self.b_proj = ColumnSeqParallelLinear(hidden, cfg.linear_num_heads, pstate, False, dtype)
        self.A_log = nn.Parameter(torch.empty(self.h, dtype=torch.float32), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.h * d, dtype=torch.float32), requires_grad=False)
        self.A_log.weight_loader = self.dt_bias.weight_loader = self._head_rows_loader
        self.attn = GDNAttention(self.h, self.h, d, d, cfg.linear_conv_kernel_dim, pstate, dtype)
        self.o_norm = GatedRMSNorm(d, cfg.rms_norm_eps, dtype, gate="sigmoid")
        self.o_proj = RowSeqParallelLinear(width, hidden, pstate, False, dtype)

    def _head_rows_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """``A_log`` (stored ``[1, 1, H, 1]``) or ``dt_bias`` (``[H x D]``), flattened -> this rank's heads' rows."""
        n = param.shape[0]
        flat = as_tensor(loaded).reshape(-1)
        copy_into(param, flat[self.pstate.tp_rank * n : (self.pstate.tp_rank + 1) * n], "a per-head KDA parameter")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.seq_sharded:  # gather the tokens once for all the column layers
            x = self.pstate.tp_all_gather(x, dim=0)
        n, h, d = x.shape[0], self.h, self.d
        f = self.f_b_proj(self.f_a_proj(x)).float().view(n, h, d) + self.dt_bias.view(h, d)
        g = -torch.exp(self.A_log).view(h, 1) * F.softplus(f)  # [T, H, Dk] per-channel log decays
        o = self.attn(self.qkv_proj(x), g, torch.sigmoid(self.b_proj(x)), ctx)
        gate = self.g_b_proj(self.g_a_proj(x)).view(n, h, d)
        return self.o_proj(self.o_norm(o, gate).flatten(1), ctx.seq_sharded)


class KimiLinearDecoderLayer(nn.Module):
    def __init__(self, cfg: KimiLinearConfig, layer_idx: int, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.is_linear = cfg.layer_types[layer_idx] == "linear_attention"
        if self.is_linear:
            self.linear_attn = KimiDeltaAttentionBlock(cfg, pstate, dtype)
        else:
            self.self_attn = latent_attention(cfg, pstate, dtype, rope=None)
        self.mlp = sparse_mlp(cfg, pstate, dtype) if layer_idx in cfg.sparse_layers else \
            GatedMLP(cfg.hidden_size, cfg.intermediate_size, pstate, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        x = x + mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.seq_sharded, ctx.split_mlp)


RULES = [
    *[(f".linear_attn.{p}_proj.", ".linear_attn.qkv_proj.", i) for i, p in enumerate("qkv")],
    *[(f".linear_attn.{p}_conv1d.weight", ".linear_attn.attn.conv_weight", i) for i, p in enumerate("qkv")],
    *MOE_RULES,
]


class KimiLinearForCausalLM(CausalLM):
    """Kimi-Linear (``KimiLinearForCausalLM`` checkpoints)."""

    config_class = KimiLinearConfig

    def __init__(self, cfg: KimiLinearConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        self.layers = nn.ModuleList(KimiLinearDecoderLayer(cfg, i, pstate, dtype) for i in range(cfg.num_layers))

    def _renamed(self, weights):
        """Checkpoint names -> this module's: KDA layers' ``self_attn`` -> ``linear_attn``, ``block_sparse_moe`` ->
        ``mlp``."""
        for name, t in weights:
            m = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
            if m and self.layers[int(m.group(1))].is_linear:
                name = name.replace(".self_attn.", ".linear_attn.")
            yield name.replace(".block_sparse_moe.", ".mlp."), t

    def load_weights(self, weights) -> None:
        weights = stacked_expert_weights(self._renamed(weights), dict(self.named_parameters()), ".mlp.experts.",
                                         ".mlp.moe.experts.", names=("w1", "w3", "w2"))
        self.load_checkpoint(weights, RULES, ignore=("rotary_emb.inv_freq",))
