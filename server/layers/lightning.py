"""Lightning attention core (MiniMax linear attention with per-head decay), local or with LASP.

Per request: split requests run LASP over the SP group (the incoming state is passed in chunk order, or
combined from all-gathered chunk messages, DESIGN 5.3) and every SP rank ends with the final state; other
requests continue from their state in the pool, as a varlen prefill or, for one new token each, the decode
kernel: on every SP rank for an SP request's replicated tokens, on its home rank only for a short request.
States are fp32 ``[H_local, D, D]``.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine.context import ForwardContext
from server.kernels import ops
from server.sp.lasp import lasp_prefill


def minimax_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates of MiniMax layer ``layer_idx``: ALiBi-style ``base^(h+1)`` scaled by a factor that
    shrinks with depth (so later layers remember longer)."""
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads, dtype=torch.float64) + 1)
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (rate * factor).float()


class LightningStatePool:
    """One layer's fp32 recurrent states on this rank: ``[num_slots, heads, d, d]``, one slot per request."""

    def __init__(self, num_slots: int, heads: int, head_dim: int, device: torch.device):
        self.states = torch.zeros(num_slots, heads, head_dim, head_dim, dtype=torch.float32, device=device)


class LightningAttention(nn.Module):
    """q/k/v ``[T, H_local, D]`` -> o ``[T, H_local, D]``; ``slopes`` are this rank's heads' decay rates."""

    def __init__(self, slopes: torch.Tensor):
        super().__init__()
        self.register_buffer("slopes", slopes, persistent=False)
        self.pool: LightningStatePool | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        states = self.pool.states
        if ctx.zero_slots is not None:
            states[ctx.zero_slots] = 0
        out = torch.zeros_like(q)
        ps = ctx.pstate
        lasp = [s for s in ctx.seqs if s.step.split and ps.sp_size > 1]
        local = [s for s in ctx.seqs if not (s.step.split and ps.sp_size > 1) and s.num_rows > 0]
        for seq in lasp:
            rows = slice(seq.row_start, seq.row_start + seq.num_rows)
            o, final = lasp_prefill(q[rows], k[rows], v[rows], self.slopes, seq.chunks, seq.chunk_lens,
                                    states[seq.step.slot], ps, mode=ctx.lasp_mode)
            out[rows] = o
            states[seq.step.slot] = final
        if not local:
            return out
        rows = torch.cat([torch.arange(s.row_start, s.row_start + s.num_rows) for s in local]).to(q.device)
        slots = torch.tensor([s.step.slot for s in local], device=q.device)
        if all(s.num_rows == 1 for s in local):
            out[rows] = ops.lightning_decode(q[rows], k[rows], v[rows], self.slopes, states, slots)
            return out
        cu = torch.tensor([0] + [s.num_rows for s in local]).cumsum(0).to(q.device)
        o, finals = ops.lightning_prefill(q[rows], k[rows], v[rows], self.slopes, cu, states[slots])
        out[rows] = o
        states[slots] = finals
        return out
