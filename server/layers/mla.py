"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, Moonlight, Kimi-Linear's full layers; docs/sp.md: MLA).

Per token the layer projects a latent ``c_kv = RMSNorm(W_DKV x)`` (``kv_lora_rank`` values) and one rotary key
``k_pe`` (``qk_rope_head_dim``) shared by every head; ``kv_b_proj`` expands the latent per head into ``k_nope`` and
``v``. Queries come from ``q_proj`` or, with a q LoRA, ``q_b_proj(RMSNorm(q_a_proj x))``; each head's query is
``[q_nope | q_pe]``. Scores are ``q_nope . k_nope + q_pe . k_pe`` times ``1 / sqrt(qk_nope + qk_rope)`` times the
square of yarn's ``mscale(factor, mscale_all_dim)`` where the config scales RoPE by yarn (as the reference does).
Kimi-Linear's layers apply no rotation (``rope=None``) but keep the shared ``k_pe`` part.

This layer runs the expanded form through the engine's softmax attention: K is ``[k_nope | k_pe]`` per head and V
is zero-padded to the same head size (zero columns add nothing to the output, which is cut back to
``v_head_dim``), so the ring, all-gather-KV mode, paged decode, the SP decode merge, CUDA graphs and the prefix
cache serve MLA unchanged; the paged cache holds the expanded K/V of this rank's heads.

TP: heads split over TP (``q_b_proj`` / ``q_proj`` and ``kv_b_proj`` column-split by head, ``o_proj`` row-split);
the down projections ``q_a_proj`` and ``kv_a_proj_with_mqa`` and their norms are small and replicated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from server.forward.context import ForwardContext
from server.layers.attention import Attention
from server.layers.linear import ColumnSeqParallelLinear, RowSeqParallelLinear, divide
from server.layers.norm import RMSNorm
from server.layers.rotary import RotaryEmbedding
from server.sp.groups import ParallelState


def yarn_softmax_mscale(rope: dict | None) -> float:
    """The factor MLA multiplies its softmax scale by: ``mscale(factor, mscale_all_dim) ** 2`` for yarn RoPE with
    ``mscale_all_dim`` set (``mscale(s, m) = 0.1 m ln s + 1`` for s > 1), else 1."""
    if not rope or rope.get("rope_type", rope.get("type", "default")) in (None, "default"):
        return 1.0
    factor, m = float(rope.get("factor", 1.0)), rope.get("mscale_all_dim") or 0
    if not m or factor <= 1:
        return 1.0
    return (0.1 * m * math.log(factor) + 1.0) ** 2


class LatentPagedCache:
    """One MLA layer's latent pages on this rank: ``[num_pages, page_size, kv_lora_rank + rope_dim]``, each row a
    token's ``[c_kv | k_pe]`` shared by all heads (the input of the absorbed decode,
    :func:`server.sp.mla_sp.mla_decode_over_sp`)."""

    def __init__(self, num_pages: int, page_size: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.kv_lora_rank = kv_lora_rank
        self.pages = torch.zeros(num_pages, page_size, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    def write(self, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        self.pages.view(-1, self.pages.shape[-1])[slots] = torch.cat([c_kv, k_pe], dim=-1).to(self.pages.dtype)

    def read(self, page_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.pages[page_table].view(-1, self.pages.shape[-1])[:length]
        return rows[:, : self.kv_lora_rank], rows[:, self.kv_lora_rank :]


class ReplicatedLinear(nn.Module):
    """``y = x W^T (+ b)`` with the whole W on every rank (small down projections)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MultiHeadLatentAttention(nn.Module):
    """x ``[T, hidden]`` (TP-sequence-sharded when ``ctx.seq_sharded``) -> ``[T, hidden]``; this rank's heads."""

    def __init__(self, hidden: int, num_heads: int, q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, rope: dict | None, rope_interleave: bool, max_position: int,
                 eps: float, bias: bool, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.pstate = pstate
        self.heads = divide(num_heads, pstate.tp_size, "the number of attention heads")
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.kv_lora = kv_lora_rank
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, q_lora_rank, bias, dtype)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps, dtype)
            self.q_b_proj = ColumnSeqParallelLinear(q_lora_rank, num_heads * qk, pstate, False, dtype)
        else:
            self.q_proj = ColumnSeqParallelLinear(hidden, num_heads * qk, pstate, False, dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, kv_lora_rank + qk_rope_head_dim, bias, dtype)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps, dtype)
        self.kv_b_proj = ColumnSeqParallelLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), pstate,
                                                 False, dtype)
        self.o_proj = RowSeqParallelLinear(num_heads * v_head_dim, hidden, pstate, bias, dtype)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope, max_position) if rope is not None else None
        # DeepSeek stores the rotary features as interleaved pairs (x0, x1), (x2, x3), ...; reading them even-first
        # makes that rotation the rotate-half one, and the score q_pe . k_pe does not depend on the order
        order = torch.cat([torch.arange(0, qk_rope_head_dim, 2), torch.arange(1, qk_rope_head_dim, 2)])
        self.register_buffer("rope_order", order if rope_interleave else torch.arange(qk_rope_head_dim),
                             persistent=False)
        self.head_dim = max(qk, v_head_dim)
        scale = qk**-0.5 * yarn_softmax_mscale(rope)
        self.attn = Attention(self.heads, self.heads, self.head_dim, scale)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.seq_sharded:  # gather the tokens once for every projection
            x = self.pstate.tp_all_gather(x, dim=0)
        n, h = x.shape[0], self.heads
        q_nope, q_pe = self._queries(x).view(n, h, -1).split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe, k_pe = q_pe[..., self.rope_order], k_pe[:, self.rope_order].unsqueeze(1)
        if self.rotary is not None:
            q_pe, k_pe = self.rotary(ctx.positions, q_pe.contiguous(), k_pe.contiguous(), ctx.shared)
        k_nope, v = self.kv_b_proj(c_kv).view(n, h, -1).split([self.nope, self.v_dim], dim=-1)
        pad_qk, pad_v = self.head_dim - self.nope - self.rope_dim, self.head_dim - self.v_dim
        q = F.pad(torch.cat([q_nope, q_pe], dim=-1), (0, pad_qk))
        k = F.pad(torch.cat([k_nope, k_pe.expand(n, h, -1)], dim=-1), (0, pad_qk))
        o = self.attn(q, k, F.pad(v, (0, pad_v)), ctx)[..., : self.v_dim]
        return self.o_proj(o.reshape(n, -1), ctx.seq_sharded)
