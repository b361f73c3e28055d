"""Lightning attention core (MiniMax linear attention with per-head decay), local or with LASP.

Per request (:class:`server.forward.context.LinearStepMeta`, prepared once per step): split requests run LASP over
the SP group (the incoming state is passed in chunk order, or combined from all-gathered chunk messages), or with
``--ulysses-degree`` > 1 Ulysses x LASP on the mesh (:mod:`server.sp.ulysses_lightning`, its head-sharded final
state then all-gathered over the Ulysses group), and every SP rank ends with the final state; other requests
continue from their state in the pool, as one varlen prefill or, for one new token each, the decode kernel: on
every SP rank for an SP request's replicated tokens, on its home rank only for a short request.
States are fp32 ``[H_local, D, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.kernels import ops
from server.layers.cache_spec import CacheLayer, StateSpec
from server.sp.lasp import lasp_prefill
from server.sp.ulysses import gather_heads
from server.sp.ulysses_lightning import ulysses_lightning_prefill


def minimax_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates of MiniMax layer ``layer_idx``: ALiBi-style ``base^(h+1)`` scaled by a factor that
    shrinks with depth (so later layers remember longer)."""
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads, dtype=torch.float64) + 1)
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (rate * factor).float()


@dataclass
class LightningStatePool:
    """One layer's fp32 recurrent states on this rank: ``[num_slots, heads, d, d]``, one slot per request."""

    states: torch.Tensor


class LightningAttention(CacheLayer, nn.Module):
    """q/k/v ``[T, H_local, D]`` -> o ``[T, H_local, D]``; ``slopes`` are this rank's heads' decay rates. Its cache:
    one fp32 ``[H_local, D, D]`` state per request slot."""

    def __init__(self, slopes: torch.Tensor, head_dim: int):
        super().__init__()
        self.register_buffer("slopes", slopes, persistent=False)
        self.head_dim = head_dim
        self.cache: LightningStatePool | None = None

    def cache_spec(self) -> StateSpec:
        d = self.head_dim
        return StateSpec(LightningStatePool, {"states": ((self.slopes.numel(), d, d), torch.float32)})

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        meta, states = ctx.linear, self.cache.states
        if meta.zero_slots is not None:
            states[meta.zero_slots] = 0
        out = torch.zeros_like(q)
        for e in meta.split:
            rows = slice(e.row_start, e.row_start + e.num_rows)
            if e.ulysses:  # the state of this rank's heads, then every head's: decode continues as after LASP
                mesh = ctx.mesh
                h = self.slopes.numel() // mesh.ulysses_degree
                mine = slice(mesh.ulysses_rank * h, (mesh.ulysses_rank + 1) * h)
                o, final = ulysses_lightning_prefill(q[rows], k[rows], v[rows], self.slopes, e.chunk_lens,
                                                     states[e.slot, mine], mesh, mode=meta.mode)
                final = gather_heads(final[None], mesh.ulysses_group)[0]
            else:
                o, final = lasp_prefill(q[rows], k[rows], v[rows], self.slopes, e.chunks, e.chunk_lens,
                                        states[e.slot], ctx.pstate, mode=meta.mode)
            out[rows] = o
            states[e.slot] = final
        if meta.local_rows is None:
            return out
        rows, slots = meta.local_rows, meta.local_slots
        if meta.all_decode:
            out[rows] = ops.lightning_decode(q[rows], k[rows], v[rows], self.slopes, states, slots)
            return out
        o, finals = ops.lightning_prefill(q[rows], k[rows], v[rows], self.slopes, meta.local_cu, states[slots])
        out[rows] = o
        states[slots] = finals
        return out
