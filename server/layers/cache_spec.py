"""What a layer keeps per request, declared by the layer: its cache spec.

The engine sizes, allocates, copies and releases every cache by iterating the model's :class:`CacheLayer` s and
their :class:`CacheSpec` s; it never asks a layer's type. A new layer kind (sliding-window KV, latent KV, another
recurrent state, FP8 pages with scales) is its layer file plus its spec.

Two storage kinds exist, because the scheduler accounts for them differently:
- ``paged``: grows with the tokens; lives in the rank's KV pages, whose ids every paged layer shares (the cache
  manager hands out page ids; a prefix-cache hit shares pages and copies the last one on write);
- slots: a fixed-size state per request (plus the prefix cache's snapshots of it), indexed by the request's slot.

Paged specs of sliding-window layers (``window_group``) form a second page group when the model also has full
layers: every request has a second page table for them, with the same rows, whose pages older than the window are
given back to the one pool of page ids both groups draw from (docs/sp.md, "Sliding-window layers: memory").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch


class CacheSpec(ABC):
    """One layer's per-request cache on this rank: its size, allocation and copies."""

    paged: bool = False  # True: per token, in pages; False: one fixed-size slot per request
    window_group: bool = False  # paged pages of a sliding-window layer: the window group's page table

    @abstractmethod
    def unit_bytes(self, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page of ``page_size`` tokens (paged) or of one request's slot. ``dtype``: the model's,
        for the tensors whose dtype the spec does not fix itself (here and in :meth:`allocate`)."""

    @abstractmethod
    def allocate(self, units: int, page_size: int, dtype: torch.dtype, device: torch.device) -> Any:
        """The cache object for ``units`` pages or slots (unit 0 / the last slot may serve as scratch)."""

    @abstractmethod
    def copy(self, cache: Any, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy units ``src`` to ``dst`` (device index tensors of equal length): a cached prefix's last page copied
        on write, a state snapshot saved or restored."""

    def can_share(self, other: CacheSpec) -> bool:
        """Its pages can use ``other``'s tensors (a window layer's K/V pages and a full layer's of one shape)."""
        return False

    def with_kv_dtype(self, kv_dtype: torch.dtype | None) -> CacheSpec:
        """This spec with its K/V pages stored in ``kv_dtype`` (``--kv-cache-dtype``; None: the model's). Only
        softmax KV changes; states keep their own dtypes (linear-attention states stay fp32)."""
        return self


class CacheLayer:
    """Mixin of a layer that keeps per-request state: it declares it (:meth:`cache_spec`) and holds the
    allocated object in ``cache`` (None until the engine allocates it, and after release)."""

    cache: Any = None

    def cache_spec(self) -> CacheSpec:
        raise NotImplementedError


class StateSpec(CacheSpec):
    """Fixed-size per-request tensors, named: ``shapes[name] = (shape of one slot, dtype or None for the model's)``.
    The cache object, ``factory(**tensors)``, has one ``[slots, *shape]`` tensor per name, zero-initialised (the
    layer clears a request's slot when the request starts)."""

    def __init__(self, factory: type, shapes: dict[str, tuple[tuple[int, ...], torch.dtype | None]]):
        self.factory, self.shapes = factory, shapes

    def unit_bytes(self, page_size: int, dtype: torch.dtype) -> int:
        return sum(math.prod(shape) * (own or dtype).itemsize for shape, own in self.shapes.values())

    def allocate(self, units: int, page_size: int, dtype: torch.dtype, device: torch.device) -> Any:
        return self.factory(**{name: torch.zeros(units, *shape, dtype=own or dtype, device=device)
                               for name, (shape, own) in self.shapes.items()})

    def copy(self, cache: Any, src: torch.Tensor, dst: torch.Tensor) -> None:
        for name in self.shapes:
            t = getattr(cache, name)
            t[dst] = t[src]


def window_group_window(specs: list[CacheSpec]) -> int | None:
    """The window by which the window group's pages are given back: the largest sliding window of the window layers,
    when full paged layers sit beside them (else None: one page group, every page kept)."""
    paged = [s for s in specs if s.paged]
    windows = [s.window for s in paged if s.window_group]
    return max(windows) if windows and len(windows) < len(paged) else None


def shared_kv(specs: list[CacheSpec]) -> dict[int, int]:
    """Window layer -> full layer whose K/V tensors it uses (indices into ``specs``): both groups draw page ids from
    one pool and a page id never serves both at once, so one tensor pair serves a layer of each group."""
    if window_group_window(specs) is None:
        return {}
    full = [i for i, s in enumerate(specs) if s.paged and not s.window_group]
    shares = {}
    for i, s in enumerate(specs):
        if s.paged and s.window_group:
            j = next((j for j in full if s.can_share(specs[j])), None)
            if j is not None:
                full.remove(j)
                shares[i] = j
    return shares


def page_bytes(specs: list[CacheSpec], page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page id takes in every paged cache (a window layer that shares a full layer's K/V adds only its
    token positions)."""
    shares = shared_kv(specs)
    return sum(s.unit_bytes(page_size, dtype) - (s.kv_bytes(page_size, dtype) if i in shares else 0)
               for i, s in enumerate(specs) if s.paged)
