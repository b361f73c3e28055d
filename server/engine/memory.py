"""What a rank's model stores, in bytes: weights, KV cache per token, linear-attention state per request.

One place for the arithmetic the model runner sizes its caches with and the planning command
(:mod:`server.plan`) prints; both read it off a built model (on the meta device for the planner), so each layer's
own sharding (TP heads, expert blocks) is what is counted.
"""

from __future__ import annotations

import torch
from torch import nn

from server.layers.attention import Attention
from server.layers.gdn import GDNAttention
from server.layers.lightning import LightningAttention


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter of this rank's model (its shard)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(model: nn.Module, kv_dtype: torch.dtype) -> int:
    """KV cache bytes one stored token takes on this rank: K and V of this rank's KV heads, every softmax layer."""
    return sum(2 * a.num_kv_heads * a.head_dim * kv_dtype.itemsize for a in model.modules() if isinstance(a, Attention))


def lightning_head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def state_bytes_per_request(model: nn.Module, cfg: dict, dtype: torch.dtype) -> int:
    """Linear-attention state of one request on this rank: fp32 ``heads x d x d`` per lightning layer, the GDN
    recurrent and conv states per GDN layer."""
    d = lightning_head_dim(cfg)
    total = 0
    for m in model.modules():
        if isinstance(m, LightningAttention):
            total += m.slopes.numel() * d * d * 4
        elif isinstance(m, GDNAttention):
            total += m.state_bytes(dtype)
    return total
