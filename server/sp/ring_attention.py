"""Softmax attention over KV sharded across the SP group (docs/sp.md: Ring attention; Decode and unsplit chunks).

Every function here returns the partial-attention pair ``(o, lse)``: ``o [Nq, Hq, Dv]`` in q's dtype and
``lse [Nq, Hq]`` fp32 in base 2 (-inf where a query sees no key), exactly what one ``attn_fn`` call over the
union of all ranks' KV would return. Visibility is by global position (key j is visible to query i iff
``pos(k_j) <= pos(q_i)``), described by runs ``(row_start, length, pos_start)`` (:mod:`server.runs`).

- :func:`ring_attention`: pass-KV ring, the default for SP prefill. Each rank sends on the block it holds while
  it attends to it; partials are merged in fp32 as they arrive.
- :func:`allgather_kv_attention`: all-gather every rank's KV, then one attention call (what SGLang/vLLM ship);
  a comparison mode.
- :func:`merge_over_sp`: every rank has the same queries (decode, the tail chunk of an SP prompt) and has
  attended to its local shard; one all-gather of ``(o, lse)`` and a merge.

Each TP rank holds its own KV heads, so all traffic stays inside the SP group (peers with the same tp_rank).
K and V travel as two messages of one batch, so every block reaches ``attn_fn`` contiguous, as received; when the
value is the key tensor itself (MLA's latent, :mod:`server.layers.mla`) a block is one message. FP8 K/V (an FP8 KV
cache) travel as they are stored, half the bytes of bf16, as raw bytes (no collective backend needs to know the
dtype); ``attn_fn`` dequantizes them with the layer's per-tensor scales, which every rank holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from server.kernels import ops
from server.kernels.fp8 import raw_bytes
from server.runs import Run, runs_rows
from server.sp.groups import ParallelState

# attn_fn(q, k, v, q_runs, k_runs, scale) -> (o, lse): the contract of ops.attention_runs.
AttnFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, list[Run], list[Run], float], tuple[torch.Tensor, torch.Tensor]
]


def _shard_rows(k: torch.Tensor, kv_runs_per_rank: list[list[Run]], pstate: ParallelState) -> list[int]:
    """Rows of every SP rank's KV shard; checks that the local shard matches its runs."""
    if len(kv_runs_per_rank) != pstate.sp_size:
        raise ValueError(f"kv_runs_per_rank has {len(kv_runs_per_rank)} entries, expected sp_size={pstate.sp_size}")
    rows = [runs_rows(runs) for runs in kv_runs_per_rank]
    if k.shape[0] != rows[pstate.sp_rank]:
        raise ValueError(f"local KV has {k.shape[0]} rows but kv_runs_per_rank[{pstate.sp_rank}] describes "
                         f"{rows[pstate.sp_rank]}")
    return rows


def _any_visible(q_runs: list[Run], k_runs: list[Run]) -> bool:
    """Whether some key is visible to some query: the earliest key is not after the latest query."""
    last_q = max((p + n - 1 for _, n, p in q_runs if n > 0), default=-1)
    first_k = min((p for _, n, p in k_runs if n > 0), default=math.inf)
    return first_k <= last_q


def _no_keys(q: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of an empty key set: o = 0, lse = -inf (weight 0 in any merge)."""
    return q.new_zeros(q.shape[0], q.shape[1], dv), torch.full(q.shape[:2], -math.inf, device=q.device)


def _merge_fp32(
    acc: tuple[torch.Tensor, torch.Tensor] | None, part: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running two-way merge into an fp32 accumulator, in place, so that rounding does not build up over P steps
    and the merge needs no memory beyond the accumulator (one fp32 copy of the local output)."""
    o, lse = part
    if acc is None:
        return o.float(), lse.float().clone()
    ops.merge_state_into(acc[0], acc[1], o, lse)
    return acc


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    out = x.new_zeros(n, *x.shape[1:])
    out[: x.shape[0]] = x
    return out


def _post_ring_transfer(
    kv: tuple[torch.Tensor, ...], incoming: tuple[torch.Tensor, ...], pstate: ParallelState
) -> list[dist.Work]:
    """Send the block ``kv`` (K and V, or one latent) to the next SP rank and receive the previous rank's block
    into ``incoming``.

    Every rank posts all its ops every step, empty blocks included, so the ring stays in lock-step.
    """
    nxt, prev = pstate.sp_peer(pstate.sp_rank + 1), pstate.sp_peer(pstate.sp_rank - 1)
    ops_ = [dist.P2POp(dist.isend, raw_bytes(t), nxt, pstate.sp_group) for t in kv]
    ops_ += [dist.P2POp(dist.irecv, raw_bytes(t), prev, pstate.sp_group) for t in incoming]
    return dist.batch_isend_irecv(ops_)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_runs: list[Run],
    kv_runs_per_rank: list[list[Run]],
    scale: float,
    pstate: ParallelState,
    attn_fn: AttnFn = ops.attention_runs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-KV ring attention of this rank's queries to the KV of every SP rank.

    q ``[Nq, Hq, D]`` described by ``q_runs``; k/v ``[Nk_r, Hk, D|Dv]``, this rank's shard, described by
    ``kv_runs_per_rank[sp_rank]``. Every rank passes the runs of every rank (they size the receive buffers and
    decide which blocks to skip without looking at data). P steps: at step s this rank holds the KV of rank
    ``(r - s) mod P``, posts its transfer to rank r+1, and attends to it unless none of its keys is visible to
    any local query (such a block is forwarded but never computed nor merged).
    """
    rows = _shard_rows(k, kv_runs_per_rank, pstate)
    p, r = pstate.sp_size, pstate.sp_rank
    if p == 1:
        return attn_fn(q, k, v, q_runs, kv_runs_per_rank[0], scale)
    # one message when the value is the key (MLA's latent): a block carries it once
    kv = (k.contiguous(),) if v is k else (k.contiguous(), v.contiguous())
    acc = None
    for step in range(p):
        src = (r - step) % p
        transfer: list[dist.Work] = []
        incoming = kv
        if step < p - 1:
            n_in = rows[(src - 1) % p]
            incoming = tuple(t.new_empty(n_in, *t.shape[1:]) for t in kv)
            transfer = _post_ring_transfer(kv, incoming, pstate)
        if _any_visible(q_runs, kv_runs_per_rank[src]):
            acc = _merge_fp32(acc, attn_fn(q, kv[0], kv[-1], q_runs, kv_runs_per_rank[src], scale))
        for work in transfer:
            work.wait()
        kv = incoming
    if acc is None:
        return _no_keys(q, v.shape[2])
    return acc[0].to(q.dtype), acc[1]


def allgather_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_runs: list[Run],
    kv_runs_per_rank: list[list[Run]],
    scale: float,
    pstate: ParallelState,
    attn_fn: AttnFn = ops.attention_runs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather KV variant of :func:`ring_attention` (same arguments, same results).

    Shards are padded to the longest one (``all_gather`` needs equal shapes), then the visible shards are
    concatenated and attended to in one call. Holds the whole sequence's KV at once on every rank.
    """
    rows = _shard_rows(k, kv_runs_per_rank, pstate)
    if pstate.sp_size == 1:
        return attn_fn(q, k, v, q_runs, kv_runs_per_rank[0], scale)
    k_shards = pstate.sp_all_gather(_pad_rows(raw_bytes(k), max(rows)))
    v_shards = k_shards if v is k else pstate.sp_all_gather(_pad_rows(raw_bytes(v), max(rows)))
    visible = [i for i, shard_runs in enumerate(kv_runs_per_rank) if _any_visible(q_runs, shard_runs)]
    if not visible:
        return _no_keys(q, v.shape[2])
    runs, offset = [], 0
    for i in visible:
        runs.extend((row + offset, length, pos) for row, length, pos in kv_runs_per_rank[i])
        offset += rows[i]
    k_all = torch.cat([k_shards[i][: rows[i]] for i in visible]).view(k.dtype)
    v_all = torch.cat([v_shards[i][: rows[i]] for i in visible]).view(v.dtype)
    return attn_fn(q, k_all, v_all, q_runs, runs, scale)


def packed_partials(num_rows: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One ``[num_rows, heads * head_dim + lse columns]`` buffer of ``dtype`` and two views into it: ``o`` ``[num_rows,
    heads, head_dim]`` and the fp32 ``lse`` ``[num_rows, heads]`` (its bytes behind each row's o). Attention that
    writes its partial results there hands :func:`merge_over_sp` what it gathers without a copy. None for dtypes
    whose element does not divide 4 bytes."""
    size = torch.empty(0, dtype=dtype).element_size()
    if 4 % size:
        return None
    width = heads * head_dim
    packed = torch.empty(num_rows, width + heads * 4 // size, dtype=dtype, device=device)
    return packed, packed[:, :width].view(num_rows, heads, head_dim), packed[:, width:].view(torch.float32)


def merge_over_sp(o: torch.Tensor, lse: torch.Tensor, pstate: ParallelState, keep: torch.Tensor | None = None,
                  packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every SP rank's partial ``(o, lse)`` of the same query rows: one all-gather of ``o`` in its own dtype
    with the fp32 ``lse`` packed behind it (its bytes viewed as ``o``'s dtype: nothing is rounded, half the bytes
    of an fp32 copy for bf16 ``o``), straight into one tensor, then one K-way merge in fp32. Every rank returns
    the same. Runs inside decode CUDA graphs: no host sync, static shapes.

    ``packed``: ``o`` and ``lse`` are the views of this buffer (:func:`packed_partials`), gathered as they are.
    ``keep`` ``[N]``: rows whose flag is 0 return the local ``o`` unmerged, in the same kernel (decode graph steps
    merge every row and keep the merge for the replicated ones)."""
    if pstate.sp_size == 1:
        return o, lse
    nq, hq, dv = o.shape
    if packed is None:
        lse_bits = lse.float().contiguous().view(o.dtype).reshape(nq, -1)
        packed = torch.cat([o.reshape(nq, hq * dv), lse_bits], dim=1)
    parts = pstate.sp_all_gather_tensor(packed).view(pstate.sp_size, nq, -1)
    o_all = parts[:, :, : hq * dv].view(pstate.sp_size, nq, hq, dv)
    lse_all = parts[:, :, hq * dv :].view(torch.float32)  # a strided view: the merge reads it in place
    merged, merged_lse = ops.merge_states(o_all, lse_all, keep, o if keep is not None else None)
    return merged.to(o.dtype), merged_lse
