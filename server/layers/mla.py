"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, Moonlight, Kimi-Linear's full layers; docs/sp.md: MLA).

Per token the layer projects a latent ``c_kv = RMSNorm(W_DKV x)`` (``kv_lora_rank`` values) and one rotary key
``k_pe`` (``qk_rope_head_dim``) shared by every head; ``kv_b_proj`` expands the latent per head into ``k_nope`` and
``v``. Queries come from ``q_proj`` or, with a q LoRA, ``q_b_proj(RMSNorm(q_a_proj x))``; each head's query is
``[q_nope | q_pe]``. Scores are ``q_nope . k_nope + q_pe . k_pe`` times ``1 / sqrt(qk_nope + qk_rope)`` times the
square of yarn's ``mscale(factor, mscale_all_dim)`` where the config scales RoPE by yarn (as the reference does).
Kimi-Linear's layers apply no rotation (``rope=None``) but keep the shared ``k_pe`` part.

The cache holds latents, not per-head K/V (:class:`LatentKVSpec`): ``[c_kv | k_pe]``, ``L + R`` values per token
for all heads (576 at DeepSeek-V3's shapes, against 128 x (192 + 128) expanded). Attention runs in the absorbed
form through the engine's softmax attention as MQA: each head's query ``[W_UK_h^T q_nope_h | q_pe_h]`` against the
one latent key head, the latent as the value; the ring (and all-gather-KV mode) passes latent blocks, paged decode
reads latent pages, replicated rows merge over SP in latent space (``o_lat`` is linear in the probabilities), CUDA
graphs and the prefix cache (latent pages) work unchanged; one up-projection ``o_h = W_UV_h o_lat`` follows.
:mod:`server.sp.mla_sp` has the expanded-per-block ring (``k_nope = W_UK c_kv``, ``v = W_UV c_kv`` on the rank
that receives a block) for comparison.

TP: heads split over TP (``q_b_proj`` / ``q_proj`` and ``kv_b_proj`` column-split by head, ``o_proj`` row-split);
the down projections ``q_a_proj`` and ``kv_a_proj_with_mqa`` and their norms are small and replicated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from server.forward.context import ForwardContext
from server.kernels.mla_ref import mla_absorb_queries, mla_up_project
from server.layers.attention import Attention, PagedKVSpec
from server.layers.linear import ColumnSeqParallelLinear, RowSeqParallelLinear, divide
from server.layers.norm import RMSNorm
from server.layers.rotary import RotaryEmbedding
from server.layers.row_shard import mark_read_whole
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


class LatentKVCache:
    """One MLA layer's latent pages on this rank: ``[num_pages, page_size, 1, kv_lora_rank + rope_dim]``, each row a
    token's ``[c_kv | k_pe]`` shared by all heads. In the absorbed form the latent is both the key and (its first
    ``kv_lora_rank`` columns) the value, so ``k`` and ``v`` are the same tensor and a write stores it once."""

    def __init__(self, num_pages: int, page_size: int, width: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(num_pages, page_size, 1, width, dtype=dtype, device=device)
        self.v = self.k

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.view(-1, *self.k.shape[2:])[slots] = k

    def read(self, page_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.k[page_table].view(-1, *self.k.shape[2:])[:length]
        return rows, rows


class LatentKVSpec(PagedKVSpec):
    """MLA's paged cache: one ``kv_lora_rank + rope_dim`` latent per token for all heads (:class:`LatentKVCache`).
    The backend sees MQA: ``num_heads`` query heads, one KV head of the latent's width."""

    def __init__(self, num_heads: int, width: int, scale: float):
        super().__init__(num_heads, 1, width, scale)

    def unit_bytes(self, page_size: int, dtype: torch.dtype) -> int:
        return page_size * self.head_dim * (self.kv_dtype or dtype).itemsize

    def allocate(self, units: int, page_size: int, dtype: torch.dtype, device: torch.device) -> LatentKVCache:
        return LatentKVCache(units, page_size, self.head_dim, self.kv_dtype or dtype, device)

    def copy(self, cache: LatentKVCache, src: torch.Tensor, dst: torch.Tensor) -> None:
        cache.k[dst] = cache.k[src]


class LatentAttention(Attention):
    """:class:`Attention` over latent pages (:class:`LatentKVSpec`): queries ``[T, H, L + R]`` in latent space,
    key = value = the latent ``[T, 1, L + R]``; returns ``o_lat`` ``[T, H, L + R]`` (its first L columns are the
    attention-weighted latent, the rest is unused)."""

    def __init__(self, num_heads: int, width: int, scale: float):
        super().__init__(num_heads, 1, width, scale)

    def cache_spec(self) -> LatentKVSpec:
        return LatentKVSpec(self.num_heads, self.head_dim, self.scale)


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
        mark_read_whole(self.kv_b_proj.weight)  # absorbed into the queries and the output (forward)
        self.o_proj = RowSeqParallelLinear(num_heads * v_head_dim, hidden, pstate, bias, dtype)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope, max_position) if rope is not None else None
        # DeepSeek stores the rotary features as interleaved pairs (x0, x1), (x2, x3), ...; reading them even-first
        # makes that rotation the rotate-half one, and the score q_pe . k_pe does not depend on the order
        order = torch.cat([torch.arange(0, qk_rope_head_dim, 2), torch.arange(1, qk_rope_head_dim, 2)])
        self.register_buffer("rope_order", order if rope_interleave else torch.arange(qk_rope_head_dim),
                             persistent=False)
        self.attn = LatentAttention(self.heads, kv_lora_rank + qk_rope_head_dim, qk**-0.5 * yarn_softmax_mscale(rope))

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
        kv_b = self.kv_b_proj.weight
        q_lat = mla_absorb_queries(q_nope, q_pe, kv_b, self.nope, self.v_dim)
        latent = torch.cat([c_kv.unsqueeze(1), k_pe], dim=-1)  # [T, 1, L + R]: key and value
        o_lat = self.attn(q_lat, latent, latent, ctx)[..., : self.kv_lora]
        o = mla_up_project(o_lat, kv_b, self.nope, self.v_dim)
        return self.o_proj(o.reshape(n, -1), ctx.seq_sharded)
