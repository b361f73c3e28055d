"""Softmax attention over the paged KV cache, local or sequence-parallel.

For each request in the step: the new K/V rows this rank stores are written to its pages, the rank's KV shard
is read back, and the request's queries attend to all of the request's KV, wherever it lives:
- split requests (zigzag over SP): pass-KV ring (or the all-gather-KV comparison mode) over the SP group;
- requests homed on one SP rank: plain attention there over the local KV;
- other requests (replicated queries: an SP request's tail chunk and decode tokens): each SP rank attends to
  its shard and the partial results are merged by their base-2 LSE over the SP group.
With sp = 1 both reduce to one attention call over the local KV.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine.context import ForwardContext
from server.kernels import ops
from server.sp.ring_attention import allgather_kv_attention, ring_attention, sharded_kv_attention


class PagedKVCache:
    """One layer's K and V pages on this rank: ``[num_pages, page_size, kv_heads, head_dim]`` each."""

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.view(-1, *self.k.shape[2:])[slots] = k
        self.v.view(-1, *self.v.shape[2:])[slots] = v

    def read(self, page_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, *self.k.shape[2:])
        return self.k[page_table].view(shape)[:length], self.v[page_table].view(shape)[:length]


class Attention(nn.Module):
    """Core attention of one layer (after q/k/v projection and RoPE). q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` on
    this rank's local rows (the first ``ctx.num_rows`` rows are real; the rest is TP padding)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.cache: PagedKVCache | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        out = torch.zeros_like(q)
        ps = ctx.pstate
        for seq in ctx.seqs:
            if seq.num_rows == 0:  # a request homed on another SP rank
                continue
            rows = slice(seq.row_start, seq.row_start + seq.num_rows)
            qs, ks, vs = q[rows], k[rows], v[rows]
            if seq.kv_write_slots is not None:
                self.cache.write(seq.kv_write_slots, ks, vs)
            k_shard, v_shard = self.cache.read(seq.page_table, seq.shard_len)
            kv_runs = seq.step.kv_runs
            if seq.step.split and ps.sp_size > 1:
                fn = ring_attention if ctx.ring_mode == "ring" else allgather_kv_attention
                o, _ = fn(qs, k_shard, v_shard, seq.q_runs, kv_runs, self.scale, ps, attn_fn=ops.attention_runs)
            elif seq.step.home:  # all of the request's KV is here
                o, _ = ops.attention_runs(qs, k_shard, v_shard, seq.q_runs, kv_runs[ps.sp_rank], self.scale)
            else:
                o, _ = sharded_kv_attention(qs, k_shard, v_shard, seq.q_runs, kv_runs[ps.sp_rank], self.scale, ps,
                                            attn_fn=ops.attention_runs)
            out[rows] = o
        return out
