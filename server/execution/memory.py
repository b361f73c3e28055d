"""What a rank's model stores, in bytes: weights, KV cache per token, per-request state.

The planning command (:mod:`server.plan`) reads them off a model built on the meta device, so each layer's own
sharding (TP heads, expert blocks) is what is counted; the caches are what the layers declare
(:mod:`server.layers.cache_spec`), as the model runner sizes them.
"""

from __future__ import annotations

import torch
from torch import nn

from server.layers.cache_spec import page_bytes


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter of this rank's model (its shard; of a dense weight sharded over SP, the rows it
    stores, also while the parameter points at its gathered whole)."""
    total = 0
    for p in model.parameters():
        shard = getattr(p, "row_shard", None)
        stored = p if shard is None or shard.stored is None else shard.stored
        total += stored.numel() * stored.element_size()
    return total


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes one stored token takes in this rank's paged caches (``dtype``: the model's; a spec may fix its own). With
    a window page group this is one page id's share, which a token of a long context costs: its window-layer
    page goes back to the pool once the window has passed (docs/sp.md, "Sliding-window layers: memory")."""
    return page_bytes([m.cache_spec() for m in model.cache_layers()], 1, dtype)


def state_bytes_per_request(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of one request's slot in this rank's fixed-size caches (linear-attention states)."""
    return sum(spec.unit_bytes(1, dtype) for spec in (m.cache_spec() for m in model.cache_layers())
               if not spec.paged)
