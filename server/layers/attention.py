"""Softmax attention over the paged KV cache: the layer and its cache.

The layer holds its cache and calls the step's prepared attention (:class:`server.forward.context.ForwardContext`
``.attention``, built once per step by the attention backend, :mod:`server.backends`), which writes the step's
new K/V, attends locally, runs the ring over SP for split requests and merges replicated rows over SP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.kernels.fp8 import FP8, kv_dequantize, kv_quantize, kv_round, raw_bytes, take_rows
from server.layers.cache_spec import CacheLayer, CacheSpec

NO_POSITION = -(1 << 30)  # the position of a slot no window layer wrote: outside every window


class PagedKVCache:
    """One layer's K and V pages on this rank: ``[num_pages, page_size, kv_heads, head_dim]`` each. FP8 pages
    (``fp8``) store ``k / k_scale``, ``v / v_scale``; :meth:`read` returns the pages as stored (the SP ring passes
    them so, half the bytes) and :meth:`dequantize` turns them into values for a kernel that reads no FP8. With
    ``positions``, also every slot's global token position ``[num_pages, page_size]`` int32 (sliding-window layers:
    a rank's KV shard holds tokens of scattered positions, and the window is a rule on positions); they start as
    ``NO_POSITION``, which no window sees, and stay so on pages never written (the window table's null page).
    ``share``: another layer's cache whose K/V tensors these pages use (a window layer's pages and a full layer's
    come from one pool of page ids, so one page id's memory serves one layer of each kind)."""

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, k_scale: float = 1.0, v_scale: float = 1.0, positions: bool = False,
                 share: PagedKVCache | None = None):
        if share is not None:
            self.k, self.v = share.k, share.v
        else:
            self.k = torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        self.k_scale, self.v_scale = k_scale, v_scale
        self.pos = (torch.full((num_pages, page_size), NO_POSITION, dtype=torch.int32, device=device)
                    if positions else None)

    @property
    def fp8(self) -> bool:
        return self.k.dtype == FP8

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        if self.fp8:
            k, v = kv_quantize(k, self.k_scale), kv_quantize(v, self.v_scale)
        raw_bytes(self.k).view(-1, *self.k.shape[2:])[slots] = raw_bytes(k)
        raw_bytes(self.v).view(-1, *self.v.shape[2:])[slots] = raw_bytes(v)
        if self.pos is not None:
            self.pos.view(-1)[slots] = pos.to(torch.int32)

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy pages ``src`` onto ``dst`` (a cached prefix's last page, copied on write)."""
        for t in (raw_bytes(self.k), raw_bytes(self.v)):
            t[dst] = t[src]
        if self.pos is not None:
            self.pos[dst] = self.pos[src]

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


class PagedKVSpec(CacheSpec):
    """Softmax attention's K and V: ``[pages, page_size, kv_heads, head_dim]`` each, in ``kv_dtype`` (None: the
    model's). The query heads and scale are the attention geometry the backend plans its kernels for. FP8 pages
    (``float8_e4m3fn``) hold ``k / k_scale`` and ``v / v_scale`` (per-tensor scales of the layer). A sliding
    ``window`` layer also keeps every slot's token position (int32; the window is a rule on positions, and a rank's
    SP shard holds scattered ones) and its pages form a group of their own (:attr:`window_group`): the engine gives
    them their own page table, whose pages older than the window are given back."""

    paged = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 kv_dtype: torch.dtype | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                 window: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_dtype, self.k_scale, self.v_scale = kv_dtype, k_scale, v_scale
        self.window = window

    def with_kv_dtype(self, kv_dtype: torch.dtype | None) -> PagedKVSpec:
        return PagedKVSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.scale, kv_dtype, self.k_scale,
                           self.v_scale, self.window)

    @property
    def geometry(self) -> tuple[int, int, int, float, torch.dtype | None]:
        """(query heads, KV heads, head dim, scale, KV dtype or None for the model's): layers with equal geometry
        share the backend's plans."""
        return self.num_heads, self.num_kv_heads, self.head_dim, self.scale, self.kv_dtype

    @property
    def window_group(self) -> bool:
        return self.window is not None

    def kv_bytes(self, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page's K and V (what a layer of the other group can share)."""
        return 2 * page_size * self.num_kv_heads * self.head_dim * (self.kv_dtype or dtype).itemsize

    def unit_bytes(self, page_size: int, dtype: torch.dtype) -> int:
        return self.kv_bytes(page_size, dtype) + (4 * page_size if self.window is not None else 0)

    def can_share(self, other: CacheSpec) -> bool:
        """Pages of the same shape and dtype as ``other``'s: one K/V tensor pair can serve both layers."""
        return isinstance(other, PagedKVSpec) and (self.num_kv_heads, self.head_dim, self.kv_dtype) == (
            other.num_kv_heads, other.head_dim, other.kv_dtype)

    def allocate(self, units: int, page_size: int, dtype: torch.dtype, device: torch.device,
                 share: Any = None) -> Any:
        return PagedKVCache(units, page_size, self.num_kv_heads, self.head_dim, self.kv_dtype or dtype, device,
                            self.k_scale, self.v_scale, positions=self.window is not None, share=share)

    def copy(self, cache: Any, src: torch.Tensor, dst: torch.Tensor) -> None:
        cache.copy_pages(src, dst)


class Attention(CacheLayer, nn.Module):
    """Core attention of one layer (after q/k/v projection and RoPE). q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` on
    this rank's local rows (the first ``ctx.num_rows`` rows are real; the rest is padding). Its cache: K/V pages
    (:class:`PagedKVSpec`) in the model dtype, or FP8 (``--kv-cache-dtype fp8_e4m3``)
    with the per-tensor ``k_scale`` / ``v_scale`` the checkpoint gives (1.0 without); with token positions for a
    window layer.

    ``window``: a sliding window (a query sees itself and the ``window - 1`` keys before it; its cache keeps token
    positions). ``sinks``: learned per-head sink logits ``[num_heads]`` (this rank's heads), applied once to the
    merged result (:mod:`server.kernels.sinks`)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None = None,
                 sinks: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = window
        self.sinks = nn.Parameter(torch.zeros(num_heads, dtype=dtype), requires_grad=False) if sinks else None
        self.k_scale = self.v_scale = 1.0
        self.cache: PagedKVCache | None = None

    def cache_spec(self) -> PagedKVSpec:
        return PagedKVSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.scale, k_scale=self.k_scale,
                           v_scale=self.v_scale, window=self.window)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        k, v = self.cache.round(k, v)
        if self.window is None and self.sinks is None:
            return ctx.attention.forward(q, k, v, self.cache, self.scale)
        return ctx.attention.forward(q, k, v, self.cache, self.scale, window=self.window, sinks=self.sinks,
                                     positions=ctx.positions)
