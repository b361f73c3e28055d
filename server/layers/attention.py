"""Softmax attention over the paged KV cache: the layer and its cache.

The layer holds its cache and calls the step's prepared attention (:class:`server.forward.context.ForwardContext`
``.attention``, built once per step by the attention backend, :mod:`server.backends`), which writes the step's
new K/V, attends locally, runs the ring over SP for split requests and merges replicated rows over SP.
"""

from __future__ import annotations

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.kernels.fp8 import FP8, kv_dequantize, kv_quantize, kv_round, raw_bytes, take_rows
from server.layers.cache_spec import CacheLayer, PagedKVSpec


class PagedKVCache:
    """One layer's K and V pages on this rank: ``[num_pages, page_size, kv_heads, head_dim]`` each. FP8 pages
    (``fp8``) store ``k / k_scale``, ``v / v_scale``; :meth:`read` returns the pages as stored (the SP ring passes
    them so, half the bytes) and :meth:`dequantize` turns them into values for a kernel that reads no FP8."""

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, k_scale: float = 1.0, v_scale: float = 1.0):
        self.k = torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.k_scale, self.v_scale = k_scale, v_scale

    @property
    def fp8(self) -> bool:
        return self.k.dtype == FP8

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.fp8:
            k, v = kv_quantize(k, self.k_scale), kv_quantize(v, self.v_scale)
        raw_bytes(self.k).view(-1, *self.k.shape[2:])[slots] = raw_bytes(k)
        raw_bytes(self.v).view(-1, *self.v.shape[2:])[slots] = raw_bytes(v)

    def read(self, page_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, *self.k.shape[2:])
        return take_rows(self.k, page_table).view(shape)[:length], take_rows(self.v, page_table).view(shape)[:length]

    def rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of flat cache slots (``page * page_size + offset``), as stored."""
        return take_rows(self.k.flatten(0, 1), slots), take_rows(self.v.flatten(0, 1), slots)

    def dequantize(self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V rows read from these pages (or received from a peer's) as ``dtype`` values."""
        if k.dtype != FP8:
            return k, v
        return kv_dequantize(k, self.k_scale, dtype), kv_dequantize(v, self.v_scale, dtype)

    def round(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's new K/V as the pages will hold them, so that attention to the step's own rows (before they
        are read back) sees the same values as every later read."""
        if not self.fp8:
            return k, v
        return kv_round(k, self.k_scale), kv_round(v, self.v_scale)


class Attention(CacheLayer, nn.Module):
    """Core attention of one layer (after q/k/v projection and RoPE). q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` on
    this rank's local rows (the first ``ctx.num_rows`` rows are real; the rest is padding). Its cache: K/V pages
    (:class:`server.layers.cache_spec.PagedKVSpec`) in the model dtype, or FP8 (``--kv-cache-dtype fp8_e4m3``)
    with the per-tensor ``k_scale`` / ``v_scale`` the checkpoint gives (1.0 without)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_scale = self.v_scale = 1.0
        self.cache: PagedKVCache | None = None

    def cache_spec(self) -> PagedKVSpec:
        return PagedKVSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.scale, k_scale=self.k_scale,
                           v_scale=self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        k, v = self.cache.round(k, v)
        return ctx.attention.forward(q, k, v, self.cache, self.scale)
