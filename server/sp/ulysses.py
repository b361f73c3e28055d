"""Ulysses groups and the all-to-all re-partition between token shards and head shards (docs/sp.md: Ulysses).

The SP group of P ranks is a U x R mesh (U = ``--ulysses-degree``, R = P / U): SP rank ``s`` has ring index
``s // U`` and Ulysses index ``s % U``. The Ulysses group is U adjacent SP ranks (same ring index and tp_rank);
the ring group is the R ranks with the same Ulysses index and tp_rank. Heads are split by TP first, then by U:
Ulysses rank u holds the TP rank's query heads ``[u * Hq / U, (u + 1) * Hq / U)``.

:func:`seq_to_heads` trades a rank's token shard of all heads for the Ulysses group's tokens of its heads, with
uneven shards; :func:`heads_to_seq` is its inverse. The gathered token order is the Ulysses group's rank order,
each rank's rows in its local order: row ``sum(counts[:j]) + i`` is row i of Ulysses rank j.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.distributed as dist

from server.runs import Run, position_order, runs_rows, stack_runs
from server.sp.groups import ParallelState


@dataclass(frozen=True)
class UlyssesMesh:
    """This rank's place in the U x R mesh and its two groups (a group is None when it has one member).

    ``ring`` is a view of the worker's :class:`ParallelState` whose SP fields (``sp_size = R``, ``sp_rank`` =
    ring index, ``sp_group``, ``sp_ranks``) describe the ring group, so :mod:`server.sp.ring_attention` and
    :mod:`server.sp.lasp` run across ring groups unchanged; its ``rank``/``is_driver``/``world_size`` are not the
    worker's and its ``sp_cpu_group`` is None: pass it only to those SP functions.
    """

    ulysses_degree: int
    ulysses_rank: int
    ulysses_group: dist.ProcessGroup | None
    ulysses_ranks: tuple[int, ...]  # global ranks of the Ulysses group, in Ulysses-rank order
    ring: ParallelState

    @property
    def ring_degree(self) -> int:
        return self.ring.sp_size

    @property
    def ring_rank(self) -> int:
        return self.ring.sp_rank

    @property
    def sp_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_degree + self.ulysses_rank

    def group_sp_ranks(self, ring_rank: int) -> range:
        """SP ranks of the Ulysses group with ring index ``ring_rank``."""
        return range(ring_rank * self.ulysses_degree, (ring_rank + 1) * self.ulysses_degree)


def init_ulysses_mesh(pstate: ParallelState, ulysses_degree: int, timeout_s: float = 600.0) -> UlyssesMesh:
    """Build the Ulysses and ring groups of ``pstate``'s SP group.

    Collective over the world: every rank calls it with the same degree (``new_group`` must be called by all
    ranks in the same order). Groups equal to the SP group reuse it; groups of one rank are None.
    """
    p, u, tp = pstate.sp_size, ulysses_degree, pstate.tp_size
    if u < 1 or p % u:
        raise ValueError(f"--ulysses-degree={u} must be >= 1 and divide --sp-size={p}")
    r = p // u
    ring_idx, uly_idx = divmod(pstate.sp_rank, u)
    timeout = datetime.timedelta(seconds=timeout_s)
    grid = torch.arange(p * tp).view(r, u, tp)  # [ring index, Ulysses index, tp_rank] -> global rank

    def new_groups(rows: list[list[int]]) -> dist.ProcessGroup | None:
        """One group per row of ranks; returns the one holding this rank."""
        mine = None
        for ranks in rows:
            group = dist.new_group(ranks, timeout=timeout)
            if pstate.rank in ranks:
                mine = group
        return mine

    uly_group = ring_group = None
    if u == p:
        uly_group = pstate.sp_group
    elif u > 1:
        uly_group = new_groups(grid.permute(0, 2, 1).reshape(-1, u).tolist())
    if u == 1:
        ring_group = pstate.sp_group
    elif r > 1:
        ring_group = new_groups(grid.permute(1, 2, 0).reshape(-1, r).tolist())
    uly_ranks = tuple(grid[ring_idx, :, pstate.tp_rank].tolist())
    ring_ranks = tuple(grid[:, uly_idx, pstate.tp_rank].tolist())
    ring = dataclasses.replace(pstate, sp_size=r, sp_rank=ring_idx, sp_group=ring_group, sp_ranks=ring_ranks,
                               sp_cpu_group=pstate.sp_cpu_group if u == 1 else None)
    return UlyssesMesh(u, uly_idx, uly_group, uly_ranks, ring)


def _heads_error(what: str, heads: int, ulysses_degree: int, need: str = "are not a multiple of") -> ValueError:
    return ValueError(
        f"Ulysses splits each TP rank's heads over the Ulysses group, but the {heads} {what} per TP rank (the "
        f"model's heads / --tp-size) {need} --ulysses-degree={ulysses_degree}: choose a --ulysses-degree that "
        f"divides them, or a --tp-size that leaves a multiple of it"
    )


def ulysses_kv_heads(num_heads: int, num_kv_heads: int, ulysses_degree: int,
                     names: tuple[str, str] = ("query heads", "KV heads")) -> list[int]:
    """The TP rank's KV heads that each Ulysses rank holds, rank after rank: rank u's are entries
    ``[u * n, (u + 1) * n)`` with ``n = max(num_kv_heads / U, 1)`` (heads per TP rank, U = ulysses_degree).

    Query head h uses KV head ``h // (num_heads / num_kv_heads)`` (GQA). With ``num_kv_heads >= U`` the KV heads
    split like the query heads. With fewer (U a multiple of them) each Ulysses rank gets the one KV head its
    query heads use, so every KV head is replicated on ``U / num_kv_heads`` ranks: the all-to-all carries and
    the cache stores ``U / num_kv_heads`` times the KV bytes of an unreplicated split (the same cost as TP's
    replication of KV heads fewer than ``--tp-size``). The same rule serves Gated DeltaNet, whose key heads each
    serve a group of value heads (``names`` says which heads the error talks about).
    """
    u = ulysses_degree
    if num_heads % u:
        raise _heads_error(names[0], num_heads, u)
    if num_kv_heads % u == 0:
        return list(range(num_kv_heads))
    if u % num_kv_heads:
        raise _heads_error(names[1], num_kv_heads, u, need="are neither a multiple nor a divisor of")
    group_size = num_heads // num_kv_heads
    return [(rank * num_heads // u) // group_size for rank in range(u)]


def _group_size_and_rank(counts: list[int], group: dist.ProcessGroup | None) -> tuple[int, int]:
    u = len(counts)
    if u == 1:
        return 1, 0
    if group is None or dist.get_world_size(group) != u:
        raise ValueError(f"counts lists {u} ranks but the group is {group}")
    return u, dist.get_rank(group)


def seq_to_heads(x: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all from a token shard of all heads to all of the group's tokens of this rank's heads.

    x ``[counts[rank], H, *rest]`` (any dtype) on each of the U = ``len(counts)`` ranks of ``group`` (None for a
    group of one). Returns ``[sum(counts), H / U, *rest]``: heads ``[rank * H / U, (rank + 1) * H / U)`` of every
    rank's rows, in group-rank order, each rank's rows in its local order.
    """
    if x.shape[1] % len(counts):
        raise _heads_error("heads", x.shape[1], len(counts))
    u, rank = _group_size_and_rank(counts, group)
    if x.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} of the Ulysses group has {x.shape[0]} rows but counts={counts}")
    if u == 1:
        return x
    t, h, rest = x.shape[0], x.shape[1] // u, x.shape[2:]
    send = x.reshape(t, u, h, *rest).transpose(0, 1).contiguous()  # destination-major: [U, T, H/U, *rest]
    out = x.new_empty(sum(counts), h, *rest)
    dist.all_to_all_single(out, send.view(u * t, h, *rest), output_split_sizes=counts, input_split_sizes=[t] * u,
                           group=group)
    return out


def heads_to_seq(y: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: y ``[sum(counts), H / U, *rest]`` (this rank's heads of the group's tokens,
    in group-rank order) -> ``[counts[rank], H, *rest]`` (this rank's rows, all heads)."""
    u, rank = _group_size_and_rank(counts, group)
    if y.shape[0] != sum(counts):
        raise ValueError(f"y has {y.shape[0]} rows but counts={counts} sum to {sum(counts)}")
    if u == 1:
        return y
    t, h, rest = counts[rank], y.shape[1], y.shape[2:]
    recv = y.new_empty(u * t, h, *rest)
    dist.all_to_all_single(recv, y.contiguous(), output_split_sizes=[t] * u, input_split_sizes=counts, group=group)
    return recv.view(u, t, h, *rest).transpose(0, 1).reshape(t, u * h, *rest)


def qkv_seq_to_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_heads: list[int],
    counts: list[int],
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`seq_to_heads` of q, k and v in one all-to-all (one message per peer instead of three).

    q ``[T, Hq, D]``, k ``[T, Hk, D]``, v ``[T, Hk, Dv]`` of one dtype; ``kv_heads`` from :func:`ulysses_kv_heads`
    picks (and replicates) the KV heads each rank receives. Returns q ``[N, Hq / U, D]``, k ``[N, n, D]``,
    v ``[N, n, Dv]`` (N = sum(counts), n = len(kv_heads) / U), rows in the order of :func:`seq_to_heads`.
    """
    u, t = len(counts), q.shape[0]
    if kv_heads != list(range(k.shape[1])):
        k, v = k[:, kv_heads], v[:, kv_heads]
    if u == 1:
        return q, k, v
    parts = [x.reshape(t, u, x.shape[1] // u * x.shape[2]) for x in (q, k, v)]  # each destination's heads
    out = seq_to_heads(torch.cat(parts, dim=2), counts, group).squeeze(1)
    q_h, k_h, v_h = out.split([x.shape[2] for x in parts], dim=1)
    return tuple(y.reshape(y.shape[0], x.shape[1] // u, x.shape[2]) for x, y in ((q, q_h), (k, k_h), (v, v_h)))


def gather_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather of head shards over the Ulysses group, for rows every rank holds (decode): x ``[B, H / U, *rest]``
    -> ``[B, H, *rest]``, heads in Ulysses-rank order."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def take_rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``x[index]``, contiguous (no copy for the identity, None, if x is contiguous already)."""
    return x.contiguous() if index is None else x[index]


def put_rows(y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`take_rows`: the tensor whose rows ``index`` are ``y``."""
    if index is None:
        return y
    out = torch.empty_like(y)
    out[index] = y
    return out


@dataclass(frozen=True)
class ZigzagGroupLayout:
    """A request split zigzag over the P = U x R SP ranks, seen from one Ulysses group after :func:`seq_to_heads`.

    Ulysses group g holds zigzag chunks ``gU..gU+U-1`` and their mirrors ``2P-U-gU..2P-1-gU``; in sequence order
    these are the ring-level zigzag chunks ``g`` and ``2R-1-g`` of 2R chunks (each U chunks long), the layout LASP
    and GDN SP take with the ring group as their SP group.
    """

    counts: list[int]  # rows of each member of the Ulysses group (its two zigzag chunks)
    order: list[Run]  # the gathered rows' runs, in sequence order: :func:`rows_of` gives the reordering index
    ring_lens: list[int]  # the 2R ring-level chunk lengths, in sequence order
    local_chunks: list[tuple[int, int, int]]  # (row_start, length, ring-level chunk) of the reordered rows


def zigzag_group_layout(chunk_lens: list[int], mesh: UlyssesMesh) -> ZigzagGroupLayout:
    """The layout of this rank's Ulysses group for the 2P zigzag ``chunk_lens`` (zeros allowed)."""
    p, u, r_deg, g = mesh.sp_size, mesh.ulysses_degree, mesh.ring_degree, mesh.ring_rank
    if len(chunk_lens) != 2 * p:
        raise ValueError(f"chunk_lens must list all {2 * p} chunks for sp_size={p}, got {len(chunk_lens)}")
    starts = [0, *accumulate(chunk_lens)]
    members = mesh.group_sp_ranks(g)
    runs = []
    for s in members:  # rank s holds its chunks s and 2P-1-s back to back
        a, b = s, 2 * p - 1 - s
        runs.append([(0, chunk_lens[a], starts[a]), (chunk_lens[a], chunk_lens[b], starts[b])])
    order, _ = position_order(stack_runs(runs))
    ring_lens = [sum(chunk_lens[c * u : (c + 1) * u]) for c in range(2 * r_deg)]
    mirror = 2 * r_deg - 1 - g
    return ZigzagGroupLayout(
        counts=[runs_rows(r) for r in runs], order=order, ring_lens=ring_lens,
        local_chunks=[(0, ring_lens[g], g), (ring_lens[g], ring_lens[mirror], mirror)],
    )
