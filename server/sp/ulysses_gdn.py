"""Ulysses x ring Gated DeltaNet prefill of one SP-split request, conv1d included (docs/sp.md: Gated DeltaNet, Ulysses).

The layout is the lightning one (:mod:`server.sp.ulysses_lightning`): one all-to-all inside the Ulysses group gives
each rank every token of the group for its heads, in sequence order the ring-level zigzag chunks ``g`` and
``2R-1-g``; the state passing of :func:`server.sp.gdn_sp.gdn_sp_prefill` (either mode) then runs only across ring
groups, and the chunked kernel sees chunks U times longer.

What moves is the conv input, not q/k/v: the causal depthwise conv1d is per channel, so it runs after the all-to-all
on the rank's channels, and the group's tokens are contiguous in sequence order, so the halo is needed only at the
two ring-level chunk boundaries (:func:`server.sp.gdn_sp.conv_halo_exchange` over the ring group; none with R = 1).

Heads: value heads split over U like query heads; key heads split like KV heads, or, fewer than U, are replicated
(:func:`server.sp.ulysses.ulysses_kv_heads`), so Ulysses rank u holds the key heads its value heads use. A rank's
conv channels are those heads' q, k and v channels, in the layer's ``[q | k | v]`` order.

Unlike the lightning primitive this one takes and returns the request's TP-local states (all heads, all conv
channels): the final states are all-gathered over the Ulysses group, so every SP rank ends with what
:func:`server.sp.gdn_sp.gdn_sp_prefill` and :func:`server.sp.gdn_sp.conv_halo_exchange` leave, and decode continues
unchanged.
"""

from __future__ import annotations

import functools

import torch

from server.kernels import ops
from server.kernels.gdn_ref import gate_channels
from server.runs import rows_of
from server.sp.gdn_sp import conv_halo_exchange, gdn_sp_prefill
from server.sp.ulysses import (
    UlyssesMesh,
    gather_heads,
    heads_to_seq,
    put_rows,
    qkv_seq_to_heads,
    seq_to_heads,
    take_rows,
    ulysses_kv_heads,
    zigzag_group_layout,
)

GDN_HEAD_NAMES = ("Gated DeltaNet value heads", "Gated DeltaNet key heads")


@functools.lru_cache(maxsize=256)
def _channel_index(hk: int, hv: int, dk: int, dv: int, ulysses_degree: int, rank: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv channels (of the layer's ``[q | k | v]``) that Ulysses rank ``rank`` holds, in the order it lays them
    out (its key heads' q channels, their k channels, its value heads' v channels); and for every channel its row in
    all ranks' channels laid end to end (a replicated key head's first copy). Built once per shape and device."""
    u = ulysses_degree
    kv_heads = ulysses_kv_heads(hv, hk, u, names=GDN_HEAD_NAMES)
    n, hv_u = len(kv_heads) // u, hv // u
    per_rank = []
    for j in range(u):
        q = [h * dk + d for h in kv_heads[j * n : (j + 1) * n] for d in range(dk)]
        v = [2 * hk * dk + h * dv + d for h in range(j * hv_u, (j + 1) * hv_u) for d in range(dv)]
        per_rank.append(q + [hk * dk + c for c in q] + v)
    first: dict[int, int] = {}
    for row, c in enumerate(c for channels in per_rank for c in channels):
        first.setdefault(c, row)
    gathered = [first[c] for c in range(2 * hk * dk + hv * dv)]
    return torch.tensor(per_rank[rank], device=device), torch.tensor(gathered, device=device)


def ulysses_gdn_prefill(
    mixed: torch.Tensor,
    conv_weight: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    key_heads: int,
    key_dim: int,
    chunk_lens: list[int],
    initial_state: torch.Tensor,
    conv_state: torch.Tensor,
    mesh: UlyssesMesh,
    mode: str = "allgather",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv1d + SiLU + Gated DeltaNet of one request whose tokens are split zigzag over the SP group of a U x R mesh.

    mixed ``[T, C]``: this SP rank's conv inputs (its zigzag chunks ``r`` and ``2P-1-r`` back to back) of the TP
    rank's channels ``[q (Hk x Dk) | k (Hk x Dk) | v (Hv x Dv)]``; ``conv_weight [C, K]``; g ``[T, Hv]`` (or
    ``[T, Hv, Dk]`` for KDA) fp32 and beta ``[T, Hv]``; ``chunk_lens`` the lengths of all 2P chunks in sequence
    order (zeros allowed);
    ``initial_state [Hv, Dk, Dv]`` fp32 and ``conv_state [C, K-1]`` the request's states before chunk 0. ``mode``:
    GDN state passing across ring groups, ``"allgather"`` or ``"ring"``. Returns ``o [T, Hv, Dv]`` in mixed's dtype,
    the final state ``[Hv, Dk, Dv]`` fp32 and the final conv state ``[C, K-1]``, the same on every SP rank.
    """
    u, rank = mesh.ulysses_degree, mesh.ulysses_rank
    hv, dk = g.shape[1], key_dim
    dv = initial_state.shape[-1]
    hk = key_heads
    if mixed.shape[1] != 2 * hk * dk + hv * dv:
        raise ValueError(f"mixed has {mixed.shape[1]} channels, expected 2 x {hk} x {dk} + {hv} x {dv}")
    kv_heads = ulysses_kv_heads(hv, hk, u, names=GDN_HEAD_NAMES)
    layout = zigzag_group_layout(chunk_lens, mesh)
    t = mixed.shape[0]
    if t != layout.counts[rank]:
        raise ValueError(f"sp rank {mesh.sp_rank} holds chunks of {layout.counts[rank]} rows "
                         f"(chunk_lens={chunk_lens}) but mixed has {t}")
    q, k, v = mixed.split([hk * dk, hk * dk, hv * dv], dim=1)
    # v's heads split like query heads, q's and k's like KV heads: one all-to-all for all three
    v_h, q_h, k_h = qkv_seq_to_heads(v.reshape(t, hv, dv), q.reshape(t, hk, dk), k.reshape(t, hk, dk), kv_heads,
                                     layout.counts, mesh.ulysses_group)
    # the gate (one per head, or one per key channel for KDA) and beta travel together: one all-to-all
    gb_h = seq_to_heads(torch.cat([gate_channels(g.float(), beta), beta.float().unsqueeze(-1)], dim=-1),
                        layout.counts, mesh.ulysses_group)
    index = rows_of(layout.order, mixed.device)
    x = take_rows(torch.cat([q_h.flatten(1), k_h.flatten(1), v_h.flatten(1)], dim=1), index)
    gb_h = take_rows(gb_h, index)
    channels, gathered_index = _channel_index(hk, hv, dk, dv, u, rank, mixed.device)
    halos, conv_final = conv_halo_exchange(x, layout.local_chunks, layout.ring_lens, conv_state[channels], mesh.ring)
    cu = torch.tensor([0, *(row + n for row, n, _ in layout.local_chunks)], device=mixed.device)
    conv_out, _ = ops.causal_conv1d_prefill(x, conv_weight[channels], None, cu, halos)
    conv_out = torch.nn.functional.silu(conv_out)
    n_k, hv_u = q_h.shape[1], hv // u
    q_c, k_c, v_c = conv_out.split([n_k * dk, n_k * dk, hv_u * dv], dim=1)
    o_h, final = gdn_sp_prefill(q_c.reshape(-1, n_k, dk), k_c.reshape(-1, n_k, dk), v_c.reshape(-1, hv_u, dv),
                                gb_h[..., :-1] if g.dim() > beta.dim() else gb_h[..., 0], gb_h[..., -1].to(beta.dtype),
                                layout.local_chunks, layout.ring_lens,
                                initial_state[rank * hv_u : (rank + 1) * hv_u], mesh.ring, mode)
    o = heads_to_seq(put_rows(o_h, index), layout.counts, mesh.ulysses_group)
    final = gather_heads(final[None], mesh.ulysses_group)[0]  # heads are dim 0 of a state
    gathered = gather_heads(conv_final[None], mesh.ulysses_group)[0]  # every rank's channels, rank after rank
    conv_final = gathered[gathered_index]
    return o, final, conv_final
