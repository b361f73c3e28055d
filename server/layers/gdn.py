"""Gated DeltaNet core (Qwen3.5 / Qwen3-Next linear attention; also Kimi Delta Attention, whose gate is per key
channel): causal conv1d with state, then the gated delta rule with state, local or sequence-parallel.

Per request, like :mod:`server.layers.lightning`: split requests (sp > 1) exchange the conv halo and run the GDN
SP prefill over the SP group (docs/sp.md: Gated DeltaNet), or with ``--ulysses-degree`` > 1 the same on the
Ulysses x ring mesh (:mod:`server.sp.ulysses_gdn`: conv and state passing after an all-to-all to heads), and
every SP rank ends with the request's final recurrent and conv states; other requests continue from their states
in the pool, as one varlen prefill or, for one new token each, the decode kernels: on every SP rank for an SP
request's replicated tokens, on its home rank only for a short request.

TP: key heads, value heads and conv channels are split over TP; this rank's conv channels are its q heads, then
its k heads, then its v heads (the checkpoint's order restricted to this rank's heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.forward.context import ForwardContext
from server.kernels import ops
from server.layers.cache_spec import CacheLayer, StateSpec
from server.layers.linear import as_tensor, copy_into
from server.sp.gdn_sp import conv_halo_exchange, gdn_sp_prefill
from server.sp.groups import ParallelState
from server.sp.ulysses_gdn import ulysses_gdn_prefill


@dataclass
class GDNStatePool:
    """One layer's per-request states on this rank, one slot per request: the recurrent states
    ``[num_slots, Hv_local, Dk, Dv]`` fp32 and the conv states ``[num_slots, C_local, K-1]`` (the last K-1 conv
    inputs, oldest first) in the model dtype."""

    states: torch.Tensor
    conv: torch.Tensor


class GDNAttention(CacheLayer, nn.Module):
    """Conv inputs ``[T, C_local]`` (q, k, v projections of this rank's heads), decays g ``[T, Hv_local]`` (or
    ``[T, Hv_local, Dk]`` for KDA) fp32 and
    beta ``[T, Hv_local]`` -> o ``[T, Hv_local, Dv]`` in the inputs' dtype. Holds the depthwise conv weight
    ``conv_weight [C_local, K]`` (no bias in these models); SiLU follows the conv."""

    def __init__(self, key_heads: int, value_heads: int, key_dim: int, value_dim: int, conv_kernel: int,
                 pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.pstate = pstate
        self.hk, self.hv, self.dk, self.dv = key_heads, value_heads, key_dim, value_dim  # this rank's heads
        self.conv_channels = 2 * key_heads * key_dim + value_heads * value_dim
        self.conv_weight = nn.Parameter(torch.empty(self.conv_channels, conv_kernel, dtype=dtype), requires_grad=False)
        self.conv_weight.weight_loader = self.conv_weight_loader
        self.conv_width = conv_kernel - 1
        self.cache: GDNStatePool | None = None

    def cache_spec(self) -> StateSpec:
        """fp32 recurrent states and conv states in the model dtype, one slot per request."""
        return StateSpec(GDNStatePool, {"states": ((self.hv, self.dk, self.dv), torch.float32),
                                        "conv": ((self.conv_channels, self.conv_width), None)})

    def conv_weight_loader(self, param: nn.Parameter, loaded, shard_id: int | None = None) -> None:
        """Checkpoint ``[C, 1, K]`` over all heads -> this rank's q, k and v channel rows; or, with ``shard_id``
        0, 1 or 2, one of separate q, k, v convs (KDA's ``q_conv1d`` ...) ``[H x D, 1, K]`` -> this rank's rows of
        that part."""
        full = as_tensor(loaded)
        if shard_id is None:
            copy_into(param, full[self.local_channels(full.shape[0])].squeeze(1), "the GDN conv1d")
            return
        qk, vd = self.hk * self.dk, self.hv * self.dv
        start, size = ((0, qk), (qk, qk), (2 * qk, vd))[shard_id]
        r = self.pstate.tp_rank
        copy_into(param.data[start : start + size], full[r * size : (r + 1) * size].squeeze(1),
                  f"the {'qkv'[shard_id]} conv1d")

    def local_channels(self, total: int) -> torch.Tensor:
        """Indices of this rank's conv channels among the ``total`` ones ``[q | k | v]`` of all heads."""
        tp, r = self.pstate.tp_size, self.pstate.tp_rank
        qk, vd = self.hk * self.dk, self.hv * self.dv
        if total != tp * self.conv_channels:
            raise ValueError(f"GDN conv1d has {total} channels, expected {tp * self.conv_channels}")
        return torch.cat([torch.arange(r * qk, (r + 1) * qk), torch.arange(tp * qk + r * qk, tp * qk + (r + 1) * qk),
                          torch.arange(2 * tp * qk + r * vd, 2 * tp * qk + (r + 1) * vd)])

    def _qkv(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qk = self.hk * self.dk
        x = F.silu(conv_out)
        return (x[:, :qk].reshape(-1, self.hk, self.dk), x[:, qk : 2 * qk].reshape(-1, self.hk, self.dk),
                x[:, 2 * qk :].reshape(-1, self.hv, self.dv))

    def forward(self, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        meta, pool, w, ps = ctx.linear, self.cache, self.conv_weight, ctx.pstate
        if meta.zero_slots is not None:
            pool.states[meta.zero_slots] = 0
            pool.conv[meta.zero_slots] = 0
        out = mixed.new_zeros(mixed.shape[0], self.hv, self.dv)
        for e in meta.split:
            rows = slice(e.row_start, e.row_start + e.num_rows)
            if e.ulysses:
                o, final, conv_final = ulysses_gdn_prefill(mixed[rows], w, g[rows], beta[rows], self.hk, self.dk,
                                                           e.chunk_lens, pool.states[e.slot], pool.conv[e.slot],
                                                           ctx.mesh, mode=meta.mode)
                out[rows] = o
                pool.states[e.slot], pool.conv[e.slot] = final, conv_final
                continue
            halos, conv_final = conv_halo_exchange(mixed[rows], e.chunks, e.chunk_lens, pool.conv[e.slot], ps)
            cu = torch.tensor([0] + [row + n for row, n, _ in e.chunks], device=mixed.device)
            conv_out, _ = ops.causal_conv1d_prefill(mixed[rows], w, None, cu, halos)
            o, final = gdn_sp_prefill(*self._qkv(conv_out), g[rows], beta[rows], e.chunks, e.chunk_lens,
                                      pool.states[e.slot], ps, mode=meta.mode)
            out[rows] = o
            pool.states[e.slot], pool.conv[e.slot] = final, conv_final
        if meta.local_rows is None:
            return out
        rows, slots = meta.local_rows, meta.local_slots
        if meta.all_decode:
            q, k, v = self._qkv(ops.causal_conv1d_decode(mixed[rows], w, None, pool.conv, slots))
            out[rows] = ops.gdn_decode(q, k, v, g[rows], beta[rows], pool.states, slots)
            return out
        conv_out, pool.conv[slots] = ops.causal_conv1d_prefill(mixed[rows], w, None, meta.local_cu, pool.conv[slots])
        o, pool.states[slots] = ops.gdn_prefill(*self._qkv(conv_out), g[rows], beta[rows], meta.local_cu,
                                                pool.states[slots])
        out[rows] = o
        return out
