"""Softmax attention over the paged KV cache, local or sequence-parallel.

Per step (one :class:`~server.engine.context.AttentionMetadata`, built once and shared by all layers): the new
K/V rows this rank stores are written to its pages in one scatter, then every query row attends to all of its
request's KV, wherever it lives:
- split requests (zigzag over SP): pass-KV ring (or the all-gather-KV comparison mode) over the SP group, the
  rank's KV shard read back from its pages;
- everything else attends to the KV on this rank in one batched call per kind (the step's own rows, KV gathered
  from the pages or read in place, decode: :mod:`server.kernels.paged_attention`);
- the replicated rows of SP requests (tail chunk, decode tokens: the same queries on every SP rank, KV sharded
  over SP) then merge their partial results by base-2 LSE over the SP group, all requests in one all-gather.
With sp = 1 only the batched local calls remain.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from server.engine.context import ForwardContext
from server.kernels import ops
from server.sp.ring_attention import allgather_kv_attention, merge_over_sp, ring_attention


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
        meta = ctx.attn
        ps = ctx.pstate
        if meta.write_rows is not None:
            self.cache.write(meta.write_slots, k[meta.write_rows], v[meta.write_rows])
        out = torch.zeros_like(q)
        lse = None
        if meta.merge_rows is not None:
            lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
        for batch in meta.batches:
            ragged = batch.kind == "ragged"  # the only kind that reads the step's own k/v rows
            o_b, lse_b = ops.batch_attention(batch, batch.take(q), batch.take(k) if ragged else None,
                                             batch.take(v) if ragged else None, self.cache.k, self.cache.v,
                                             self.scale)
            batch.put(out, o_b)
            if lse is not None:
                batch.put(lse, lse_b)
        for seq in meta.ring_seqs:
            rows = slice(seq.row_start, seq.row_start + seq.num_rows)
            k_shard, v_shard = self.cache.read(seq.page_table, seq.shard_len)
            fn = ring_attention if ctx.ring_mode == "ring" else allgather_kv_attention
            out[rows], _ = fn(q[rows], k_shard, v_shard, seq.q_runs, seq.step.kv_runs, self.scale, ps,
                              attn_fn=ops.attention_runs)
        if meta.merge_rows is not None:
            out[meta.merge_rows], _ = merge_over_sp(out[meta.merge_rows], lse[meta.merge_rows], ps)
        return out
