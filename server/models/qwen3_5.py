"""Qwen3.5 and Qwen3-Next hybrids: Gated DeltaNet layers and gated full-attention layers (3:1 in real checkpoints),
dense or mixture-of-experts MLPs. One class serves ``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM``,
``Qwen3NextForCausalLM`` and the language model of ``Qwen3_5(Moe)ForConditionalGeneration`` checkpoints.

Reads top to bottom: embedding -> N x (norm, token mixer, residual, norm, MLP, residual) -> norm -> LM head, every
norm scaling by ``1 + weight``. Layer i's token mixer is ``layer_types[i]``:
- ``linear_attention``: projections -> causal depthwise conv1d (kernel 4) + SiLU -> q/k L2 norm -> gated delta rule
  with ``beta = sigmoid(b)`` and decay ``g = -exp(A_log) * softplus(a + dt_bias)`` -> per-head RMSNorm gated by
  ``silu(z)`` -> out proj. Qwen3.5 stores the projections as ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` /
  ``in_proj_a``; Qwen3-Next fuses them per key head (``in_proj_qkvz``: q, k, then the v and z of the value heads
  that key head serves; ``in_proj_ba`` likewise), which makes a TP shard of key heads one contiguous row block.
- ``full_attention``: q/k RMSNorm, partial RoPE, softmax attention, output scaled by ``sigmoid(gate)``, where
  ``q_proj`` emits ``[query | gate]`` per head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.forward.context import ForwardContext
from server.layers.attention import Attention
from server.layers.gdn import GDNAttention
from server.layers.linear import (
    ColumnSeqParallelLinear,
    MergedColumnSeqParallelLinear,
    QKVSeqParallelLinear,
    RowSeqParallelLinear,
    as_tensor,
    copy_into,
    divide,
)
from server.layers.moe import SharedExpertMoE
from server.layers.norm import GatedRMSNorm, ZeroCenteredRMSNorm
from server.layers.rotary import RotaryEmbedding
from server.models.common import QKV_RULES, CausalLM, GatedMLP, MoEMLP, stacked_expert_weights
from server.models.config import ModelConfig, MoEConfig
from server.sp.groups import ParallelState

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Qwen3_5Config(ModelConfig):
    """The GDN layers' heads and conv, the layer kinds (every ``full_attention_interval``-th layer softmax unless
    ``layer_types`` says), the Qwen3-Next fused projection layout (``grouped``), and which MLPs are sparse."""

    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    grouped: bool = False  # Qwen3-Next: in_proj_qkvz / in_proj_ba fused per key head
    sparse_layers: frozenset[int] = frozenset()  # layers whose MLP is the MoE (moe is set)

    required_keys = ModelConfig.required_keys + ("linear_num_key_heads", "linear_num_value_heads",
                                                 "linear_key_head_dim", "linear_value_head_dim")

    @classmethod
    def family_fields(cls, raw) -> dict:
        n = raw["num_hidden_layers"]
        every = raw.get("full_attention_interval", 4)
        kinds = raw.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                                           for i in range(n)]
        own = dict(layer_types=tuple(kinds), grouped=(raw.get("architectures") or [""])[0] == "Qwen3NextForCausalLM",
                   linear_conv_kernel_dim=raw.get("linear_conv_kernel_dim", 4),
                   **{k: raw[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                          "linear_value_head_dim")})
        if raw.get("num_experts", 0) > 0:
            own["moe"] = MoEConfig(num_experts=raw["num_experts"], top_k=raw["num_experts_per_tok"],
                                   intermediate_size=raw["moe_intermediate_size"],
                                   shared_intermediate_size=raw["shared_expert_intermediate_size"],
                                   norm_topk_prob=raw.get("norm_topk_prob", True))
            dense = set(raw.get("mlp_only_layers") or [])
            step = raw.get("decoder_sparse_step", 1)
            own["sparse_layers"] = frozenset(i for i in range(n) if i not in dense and (i + 1) % step == 0)
        return own


class GatedDeltaNetBlock(nn.Module):
    """Projections, gates and output of a GDN layer around :class:`GDNAttention`; this rank's key and value heads."""

    def __init__(self, cfg: Qwen3_5Config, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        hidden, tp, grouped = cfg.hidden_size, pstate.tp_size, cfg.grouped
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.hk = divide(hk, tp, "the number of GDN key heads")
        self.hv = divide(hv, tp, "the number of GDN value heads")
        self.pstate, self.grouped = pstate, grouped
        key_dim, value_dim = hk * self.dk, hv * self.dv
        if grouped:
            self.in_proj_qkvz = ColumnSeqParallelLinear(hidden, 2 * key_dim + 2 * value_dim, pstate, False, dtype)
            self.in_proj_ba = ColumnSeqParallelLinear(hidden, 2 * hv, pstate, False, dtype)
        else:
            self.in_proj_qkv = MergedColumnSeqParallelLinear(hidden, [key_dim, key_dim, value_dim], pstate, False,
                                                             dtype)
            self.in_proj_qkv.weight.weight_loader = self._fused_qkv_loader
            self.in_proj_z = ColumnSeqParallelLinear(hidden, value_dim, pstate, False, dtype)
            self.in_proj_b = ColumnSeqParallelLinear(hidden, hv, pstate, False, dtype)
            self.in_proj_a = ColumnSeqParallelLinear(hidden, hv, pstate, False, dtype)
        self.dt_bias = nn.Parameter(torch.empty(self.hv, dtype=dtype), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.hv, dtype=dtype), requires_grad=False)
        self.dt_bias.weight_loader = self.A_log.weight_loader = self._value_head_loader
        self.attn = GDNAttention(self.hk, self.hv, self.dk, self.dv, cfg.linear_conv_kernel_dim, pstate, dtype)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, dtype)
        self.out_proj = RowSeqParallelLinear(value_dim, hidden, pstate, False, dtype)

    def _fused_qkv_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """Qwen3.5's one ``in_proj_qkv`` tensor ``[q | k | v]`` -> the merged layer's three parts."""
        start = 0
        for part, size in enumerate(s * self.pstate.tp_size for s in self.in_proj_qkv.out_sizes):
            self.in_proj_qkv.weight_loader(param, as_tensor(loaded[start : start + size]), part)
            start += size

    def _value_head_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        s = self.pstate.tp_rank * self.hv
        copy_into(param, as_tensor(loaded[s : s + self.hv]), "a per-value-head GDN parameter")

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Conv inputs ``[T, C_local]``, z ``[T, Hv, Dv]``, b and a ``[T, Hv]`` of this rank's heads."""
        n, r = x.shape[0], self.hv // self.hk
        if not self.grouped:
            return (self.in_proj_qkv(x), self.in_proj_z(x).view(n, self.hv, self.dv), self.in_proj_b(x),
                    self.in_proj_a(x))
        q, k, v, z = self.in_proj_qkvz(x).view(n, self.hk, -1).split([self.dk, self.dk, r * self.dv, r * self.dv], -1)
        b, a = self.in_proj_ba(x).view(n, self.hk, 2 * r).split([r, r], -1)
        mixed = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=-1)
        return mixed, z.reshape(n, self.hv, self.dv), b.reshape(n, self.hv), a.reshape(n, self.hv)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.seq_sharded:  # gather the tokens once for all the column layers
            x = self.pstate.tp_all_gather(x, dim=0)
        mixed, z, b, a = self._project(x)
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        o = self.attn(mixed, g, torch.sigmoid(b), ctx)
        return self.out_proj(self.norm(o, z).flatten(1), ctx.seq_sharded)


class GatedAttentionBlock(nn.Module):
    """Softmax attention with q/k RMSNorm (``1 + weight``), partial RoPE and a sigmoid output gate. ``q_proj`` rows
    are ``[query | gate]`` per head, so loading it as the q part of a QKV layer with twice the heads keeps every
    head's pair on one TP rank."""

    def __init__(self, cfg: Qwen3_5Config, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        hidden, d, heads = cfg.hidden_size, cfg.head_dim, cfg.num_heads
        divide(heads, pstate.tp_size, "the number of attention heads")
        self.qkv_proj = QKVSeqParallelLinear(hidden, d, 2 * heads, cfg.num_kv_heads, pstate, cfg.attention_bias,
                                             dtype)
        self.o_proj = RowSeqParallelLinear(heads * d, hidden, pstate, cfg.attention_bias, dtype)
        self.q_norm = ZeroCenteredRMSNorm(d, cfg.rms_norm_eps, dtype)
        self.k_norm = ZeroCenteredRMSNorm(d, cfg.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(d, dict(cfg.rope), cfg.max_position_embeddings)
        self.nh, self.nkv, self.d = self.qkv_proj.num_heads // 2, self.qkv_proj.num_kv_heads, d
        self.attn = Attention(self.nh, self.nkv, d, d**-0.5)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x, ctx.seq_sharded)
        n = qkv.shape[0]
        qg, k, v = qkv.split([2 * self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q, gate = qg.view(n, self.nh, 2 * self.d).split(self.d, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k.view(n, self.nkv, self.d))
        q, k = self.rotary(ctx.positions, q, k, ctx.shared)
        o = self.attn(q, k, v.view(n, self.nkv, self.d), ctx)
        return self.o_proj(o.flatten(1) * torch.sigmoid(gate.reshape(n, -1)), ctx.seq_sharded)


class Qwen3_5DecoderLayer(nn.Module):
    """One Qwen3.5 layer: a GDN or gated-attention token mixer, then a dense or sparse MLP."""

    def __init__(self, cfg: Qwen3_5Config, layer_idx: int, layer_type: str, pstate: ParallelState,
                 dtype: torch.dtype):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNetBlock(cfg, pstate, dtype)
        else:
            self.self_attn = GatedAttentionBlock(cfg, pstate, dtype)
        moe = cfg.moe
        self.mlp = MoEMLP(SharedExpertMoE(moe.num_experts, moe.top_k, cfg.hidden_size, moe.intermediate_size,
                                          moe.shared_intermediate_size, pstate, dtype, moe.router()), pstate) \
            if layer_idx in cfg.sparse_layers else GatedMLP(cfg.hidden_size, cfg.intermediate_size, pstate, dtype)
        self.input_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        x = x + mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.seq_sharded, ctx.split_mlp)


# checkpoint fragment -> parameter fragment (shard id) beyond the q/k/v of QKV_RULES
RULES = [
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
    (".mlp.gate.weight", ".mlp.moe.experts.gate", None),
    (".mlp.shared_expert_gate.weight", ".mlp.moe.shared_gate", None),
    (".mlp.shared_expert.gate_proj.weight", ".mlp.moe.shared_w13", 0),
    (".mlp.shared_expert.up_proj.weight", ".mlp.moe.shared_w13", 1),
    (".mlp.shared_expert.down_proj.weight", ".mlp.moe.shared_w2", None),
    (".linear_attn.conv1d.weight", ".linear_attn.attn.conv_weight", None),
]


class Qwen3_5ForCausalLM(CausalLM):
    """Qwen3.5 (dense or MoE) and Qwen3-Next; text only when the checkpoint also holds a vision tower."""

    config_class = Qwen3_5Config

    def __init__(self, cfg: Qwen3_5Config, pstate: ParallelState, dtype: torch.dtype):
        super().__init__(cfg, pstate, dtype)
        self.norm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.layer_types = list(cfg.layer_types)
        self.layers = nn.ModuleList(
            Qwen3_5DecoderLayer(cfg, i, t, pstate, dtype) for i, t in enumerate(self.layer_types)
        )

    def load_weights(self, weights) -> None:
        params = dict(self.named_parameters())
        skipped_vision = []

        def language_model_only(weights):
            """Vision-language checkpoints keep the text model under ``model.language_model.``; the vision tower
            (``model.visual.``) and the multi-token-prediction head (``mtp.``) are not served."""
            for name, t in weights:
                if name.startswith(("model.visual.", "visual.")):
                    skipped_vision.append(name)
                elif not name.startswith("mtp."):
                    yield name.replace("model.language_model.", "model."), t

        experts = stacked_expert_weights(language_model_only(weights), params, ".mlp.experts.", ".mlp.moe.experts.")
        self.load_checkpoint(experts, QKV_RULES + RULES,
                             ignore=("rotary_emb.inv_freq",))
        if skipped_vision:
            log.info("serving the language model only: skipped %d vision-tower tensors", len(skipped_vision))
