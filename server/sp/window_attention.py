"""Sliding-window attention of a split request over KV sharded across the SP group: a KV halo, no ring
(docs/sp.md, "Sliding-window layers: the KV halo").

With window w a query at position i sees keys j with ``i - w < j <= i``. A rank's query run ``[a, b)`` (one zigzag
chunk) therefore needs the keys ``[a - w + 1, b)``: ``[a, b)`` are its own new rows, stored on this rank in this
step, and the **halo** ``[a - w + 1, a)`` lies in the preceding chunk (another rank's, or this rank's when it owns
both), or further back in the request's cached prefix, which is spread over the SP ranks (chunked prefill, prefix
cache hits). Every rank knows every rank's query runs and shard runs ``(row_start, length, pos_start)``, so each
can work out, without looking at data, which of its rows some rank's halo needs; one all-gather of those rows
(padded to the largest send, at most ``2P (w - 1)`` rows) gives every rank its halo. Each rank then attends its
queries to its own rows in ``[a - w + 1, b)`` plus the halo rows other ranks sent: O(n_local x w) work and
O(P w) bytes per rank, independent of the prompt length, where the ring moves every shard past every rank.

Returns the partial pair ``(o, lse)`` over every key of the request (base-2 LSE; sinks are applied by the caller,
once, after this).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.kernels import ops
from server.runs import Run, back_to_back, position_order, rows_of, runs_in_positions, runs_rows, union_intervals
from server.sp.groups import ParallelState

Interval = tuple[int, int]  # [lo, hi) of positions


def halo_intervals(q_runs: list[Run], window: int) -> list[Interval]:
    """The positions before each query run that its window reaches: ``[a - w + 1, a)`` per run starting at a."""
    return union_intervals([(max(0, p - window + 1), p) for _, n, p in q_runs if n > 0])


def _rows(runs: list[Run], device: torch.device) -> torch.Tensor:
    """The row index of ``runs``, in order."""
    idx = rows_of(runs, device)
    return torch.arange(runs_rows(runs), device=device) if idx is None else idx


def window_attention(
    q: torch.Tensor,
    read_rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    q_runs_per_rank: list[list[Run]],
    kv_runs_per_rank: list[list[Run]],
    scale: float,
    window: int,
    pstate: ParallelState,
    attn_fn=ops.attention_runs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention of this rank's queries to the request's KV on every SP rank, by a KV halo.

    q ``[Nq, Hq, D]`` described by ``q_runs_per_rank[sp_rank]``; ``read_rows(rows)`` returns this rank's shard's
    k/v rows ``[len(rows), Hk, D]`` (the shard described by ``kv_runs_per_rank[sp_rank]``; this step's new rows
    are in it). Every rank passes every rank's runs. ``attn_fn`` has the contract of
    :func:`server.kernels.ops.attention_runs` and takes ``window``."""
    p, r, dev = pstate.sp_size, pstate.sp_rank, q.device
    if len(q_runs_per_rank) != p or len(kv_runs_per_rank) != p:
        raise ValueError(f"window_attention needs the runs of all {p} SP ranks")
    halos = [halo_intervals(runs, window) for runs in q_runs_per_rank]
    wanted = union_intervals([iv for h in halos for iv in h])  # positions some rank's halo needs
    sends = [runs_in_positions(kv_runs_per_rank[s], wanted) for s in range(p)]
    longest = max(runs_rows(runs) for runs in sends)
    # own keys: every row of this shard within some local query's window
    own_runs = runs_in_positions(kv_runs_per_rank[r], union_intervals([(max(0, a - window + 1), a + n)
                                                         for _, n, a in q_runs_per_rank[r] if n > 0]))
    parts_k, parts_v, k_runs = [], [], []
    if own_runs:
        k_own, v_own = read_rows(_rows(own_runs, dev))
        parts_k.append(k_own)
        parts_v.append(v_own)
        k_runs = back_to_back(own_runs)
    if longest and p > 1:
        k_send, v_send = read_rows(_rows(sends[r], dev))  # may be empty: every rank still posts `longest` rows
        buf = torch.zeros(2, longest, *k_send.shape[1:], dtype=k_send.dtype, device=dev)
        buf[0, : len(k_send)] = k_send
        buf[1, : len(v_send)] = v_send
        gathered = pstate.sp_all_gather(buf)
        offset = runs_rows(k_runs)
        for s in range(p):
            if s == r:  # this rank's halo rows are already among its own keys
                continue
            mine = runs_in_positions(back_to_back(sends[s]), halos[r])
            if not mine:
                continue
            idx = _rows(mine, dev)
            parts_k.append(gathered[s][0][idx])
            parts_v.append(gathered[s][1][idx])
            k_runs += [(offset + row, n, pos) for row, n, pos in back_to_back(mine)]
            offset += len(idx)
    out = q.new_zeros(q.shape)
    lse = torch.full(q.shape[:2], float("-inf"), device=dev)
    if not parts_k:
        return out, lse
    k_all, v_all = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in (parts_k, parts_v))
    # one call per query run, over its keys in position order: positions [a - w + 1, b) without a gap, so a
    # kernel's bottom-right aligned causal mask with window_left = w - 1 is exactly the window
    for row, n, a in q_runs_per_rank[r]:
        if n == 0:
            continue
        lo = max(0, a - window + 1)
        keys, _ = position_order(runs_in_positions(k_runs, [(lo, a + n)]))
        if runs_rows(keys) != a + n - lo:
            raise ValueError(f"window_attention: keys of positions [{lo}, {a + n}) are missing from the shards")
        idx = _rows(keys, dev)
        rows = slice(row, row + n)
        out[rows], lse[rows] = attn_fn(q[rows], k_all[idx], v_all[idx], [(0, n, a)], [(0, a + n - lo, lo)], scale,
                                       window=window)
    return out, lse
