"""Softmax attention over the paged KV cache: the layer and its cache.

The layer holds its cache and calls the step's prepared attention (:class:`server.forward.context.ForwardContext`
``.attention``, built once per step by the attention backend, :mod:`server.backends`), which writes the step's
new K/V, attends locally, runs the ring over SP for split requests and merges replicated rows over SP.
"""

from __future__ import annotations

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.layers.cache_spec import CacheLayer, PagedKVSpec


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


class Attention(CacheLayer, nn.Module):
    """Core attention of one layer (after q/k/v projection and RoPE). q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` on
    this rank's local rows (the first ``ctx.num_rows`` rows are real; the rest is padding). Its cache: K/V pages
    (:class:`server.layers.cache_spec.PagedKVSpec`) in the model dtype."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.cache: PagedKVCache | None = None

    def cache_spec(self) -> PagedKVSpec:
        return PagedKVSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return ctx.attention.forward(q, k, v, self.cache, self.scale)
