"""Ulysses x LASP lightning-attention prefill of one SP-split request (docs/sp.md: LASP, Ulysses).

Inside a Ulysses group a rank holds every token of its heads after one all-to-all, so the chunked kernel runs over
the group's whole token sequence and the state is passed only across ring groups. With zigzag over P = U x R
ranks, Ulysses group g holds chunks ``gU..gU+U-1`` and their mirrors ``2P-U-gU..2P-1-gU``: in sequence order
these are the zigzag chunks ``g`` and ``2R-1-g`` of 2R chunks (each U chunks long), exactly the layout
:func:`server.sp.lasp.lasp_prefill` takes with the ring group as its SP group. So: all-to-all q/k/v to heads,
reorder the group's rows to sequence order, LASP over the ring (ring or LASP-2 mode; one kernel call when R = 1),
reorder back, all-to-all o to the token shard. The state of a head lives on the one Ulysses rank that holds it.
"""

from __future__ import annotations

import torch

from server.runs import rows_of
from server.sp.lasp import lasp_prefill
from server.sp.ulysses import (
    UlyssesMesh,
    heads_to_seq,
    put_rows,
    qkv_seq_to_heads,
    take_rows,
    ulysses_kv_heads,
    zigzag_group_layout,
)


def ulysses_lightning_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    chunk_lens: list[int],
    initial_state: torch.Tensor,
    mesh: UlyssesMesh,
    mode: str = "ring",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention of one request whose tokens are split zigzag over the SP group of a U x R mesh.

    q/k/v ``[T, H, D|Dv]`` (H heads per TP rank): this SP rank's zigzag chunks ``r`` and ``2P-1-r`` back to back;
    ``chunk_lens`` the lengths of all 2P chunks in sequence order (zeros allowed); slopes ``[H]`` the TP rank's
    heads; ``initial_state [H / U, D, Dv]`` fp32: the state before chunk 0 of this rank's heads (Ulysses rank u
    holds heads ``[u * H / U, (u + 1) * H / U)``; zeros for a fresh prompt). ``mode``: LASP across ring groups,
    ``"ring"`` or ``"allgather"``. Returns ``o [T, H, Dv]`` in q's dtype and the final state ``[H / U, D, Dv]``
    fp32 of this rank's heads (the same on the R ranks with this Ulysses index).
    """
    u = mesh.ulysses_degree
    heads = q.shape[1]
    ulysses_kv_heads(heads, heads, u)  # the heads must split over U
    layout = zigzag_group_layout(chunk_lens, mesh)
    if q.shape[0] != layout.counts[mesh.ulysses_rank]:
        raise ValueError(f"sp rank {mesh.sp_rank} holds chunks of {layout.counts[mesh.ulysses_rank]} rows "
                         f"(chunk_lens={chunk_lens}) but q has {q.shape[0]}")
    q_h, k_h, v_h = qkv_seq_to_heads(q, k, v, list(range(heads)), layout.counts, mesh.ulysses_group)
    index = rows_of(layout.order, q.device)
    q_h, k_h, v_h = (take_rows(x, index) for x in (q_h, k_h, v_h))
    h_u = heads // u
    slopes_u = slopes[mesh.ulysses_rank * h_u : (mesh.ulysses_rank + 1) * h_u]
    o_h, final = lasp_prefill(q_h, k_h, v_h, slopes_u, layout.local_chunks, layout.ring_lens, initial_state,
                              mesh.ring, mode)
    return heads_to_seq(put_rows(o_h, index), layout.counts, mesh.ulysses_group), final
