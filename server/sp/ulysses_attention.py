"""Ulysses and Ulysses x ring (USP) softmax attention of one SP-split request (docs/sp.md: Ulysses).

On every rank of the U x R mesh (:mod:`server.sp.ulysses`), per layer:

1. one all-to-all inside the Ulysses group trades this rank's token shard of q/k/v (all of the TP rank's heads)
   for the group's tokens of its heads (KV heads fewer than U are replicated, :func:`ulysses_kv_heads`);
2. the gathered rows are put in position order: with zigzag a Ulysses group holds chunks ``gU..gU+U-1`` and their
   mirrors, so in position order its tokens are two runs, the zigzag chunks ``g`` and ``2R-1-g`` of a ring of R
   (the attention kernel gets a few large pieces instead of ``(2U)^2`` small ones);
3. :func:`server.sp.ring_attention.ring_attention` over the ring group (a pass-KV ring of R steps; one call
   when R = 1), each group's cached prefix, if any, in front of its new KV;
4. an all-to-all of o (and, if asked, lse) back to the token shard.

The new KV stays where step 1 put it, in position order: this is the layout the KV cache keeps after a Ulysses
prefill (:class:`HeadShardedKV`). Visibility is by global position, as in :mod:`server.sp.ring_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.kernels import ops
from server.runs import Run, position_order, rows_of, runs_rows, stack_runs
from server.sp.ring_attention import AttnFn, ring_attention
from server.sp.ulysses import UlyssesMesh, heads_to_seq, put_rows, qkv_seq_to_heads, take_rows, ulysses_kv_heads


@dataclass
class HeadShardedKV:
    """KV in the layout of a Ulysses prefill: head-sharded inside the Ulysses group, token-sharded across ring groups.

    k ``[N, n, D]``, v ``[N, n, Dv]``: this rank's KV heads (its block of :func:`ulysses_kv_heads`, n of them) for
    the rows of its ring group; ``runs_per_ring[g]`` describes the rows of ring group g (the same on each of its U
    ranks), so ``runs_per_ring[mesh.ring_rank]`` describes k and v.
    """

    k: torch.Tensor
    v: torch.Tensor
    runs_per_ring: list[list[Run]]


@dataclass
class UlyssesAttentionOutput:
    """o ``[T, Hq, Dv]`` in q's dtype for this rank's rows; lse ``[T, Hq]`` fp32 base 2 when asked for; ``kv`` the
    request's new KV in position order, what the cache stores after the prefill."""

    o: torch.Tensor
    lse: torch.Tensor | None
    kv: HeadShardedKV


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    runs_per_rank: list[list[Run]],
    scale: float,
    mesh: UlyssesMesh,
    prefix: HeadShardedKV | None = None,
    attn_fn: AttnFn = ops.attention_runs,
    return_lse: bool = False,
) -> UlyssesAttentionOutput:
    """Softmax attention of this rank's tokens of one request to all of its tokens and its cached prefix.

    q ``[T, Hq, D]``, k ``[T, Hk, D]``, v ``[T, Hk, Dv]``: this SP rank's rows with the TP rank's heads (Hq and Hk
    per TP rank), described by ``runs_per_rank[sp_rank]``; every rank passes the runs of all P SP ranks (any
    layout: zigzag chunks, uneven, empty). ``prefix``: the request's cached KV in :class:`HeadShardedKV` layout
    (every ring group's runs given), or None. Key j is visible to query i iff ``pos(k_j) <= pos(q_i)``.
    """
    u, r_deg = mesh.ulysses_degree, mesh.ring_degree
    if len(runs_per_rank) != mesh.sp_size:
        raise ValueError(f"runs_per_rank has {len(runs_per_rank)} entries, expected sp_size={mesh.sp_size}")
    kv_heads = ulysses_kv_heads(q.shape[1], k.shape[1], u)
    counts = [runs_rows(runs_per_rank[s]) for s in mesh.group_sp_ranks(mesh.ring_rank)]
    q_h, k_h, v_h = qkv_seq_to_heads(q, k, v, kv_heads, counts, mesh.ulysses_group)
    new_runs, index = [], None
    for g in range(r_deg):
        taken, sorted_runs = position_order(stack_runs([runs_per_rank[s] for s in mesh.group_sp_ranks(g)]))
        new_runs.append(sorted_runs)
        if g == mesh.ring_rank:
            index = rows_of(taken, q.device)
    q_h, k_h, v_h = (take_rows(x, index) for x in (q_h, k_h, v_h))
    k_blk, v_blk, kv_runs = k_h, v_h, new_runs
    if prefix is not None:
        if len(prefix.runs_per_ring) != r_deg or prefix.k.shape[1:] != k_h.shape[1:]:
            raise ValueError(f"prefix must give {r_deg} ring groups' runs and k [N, {k_h.shape[1]}, "
                             f"{k_h.shape[2]}] (this rank's KV heads), got {len(prefix.runs_per_ring)} and "
                             f"{list(prefix.k.shape)}")
        kv_runs = [stack_runs([prefix_runs, runs]) for prefix_runs, runs in zip(prefix.runs_per_ring, new_runs)]
        k_blk, v_blk = torch.cat([prefix.k, k_h]), torch.cat([prefix.v, v_h])
    o_h, lse_h = ring_attention(q_h, k_blk, v_blk, new_runs[mesh.ring_rank], kv_runs, scale, mesh.ring, attn_fn)
    o = heads_to_seq(put_rows(o_h, index), counts, mesh.ulysses_group)
    lse = heads_to_seq(put_rows(lse_h, index), counts, mesh.ulysses_group) if return_lse else None
    return UlyssesAttentionOutput(o, lse, HeadShardedKV(k_h, v_h, new_runs))
