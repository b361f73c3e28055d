"""Expert parallelism (EP) over every rank of the sp x tp group: which rank stores which experts, which rank
dispatches which token rows, and the all-to-all exchanges that carry rows to their experts and back.

Layout: the E experts are cut into N = sp x tp contiguous blocks, the first ``E mod N`` ranks holding one more
(:func:`expert_range`); global rank r holds block r whole (no TP slicing). Every token row is dispatched by exactly
one rank (:func:`expert_parallel_forward`):

- rows of one SP rank that its TP ranks all hold (homed and split rows) are cut into ``tp`` contiguous blocks,
  TP rank t dispatching block t;
- rows that every SP rank holds (``ForwardContext.replicated_rows``: tail chunks and decode rows of split prompts)
  are cut into N blocks, global rank r dispatching block r;
- a step whose residual stream is sharded over TP first gathers its TP peers' rows (the all-gather the TP-sliced
  MoE does too), so the rules above apply to whole rows.

The dispatching rank routes its rows, sends each (row, expert) pair to the expert's owner, which returns the
unweighted expert output; the source weights and sums them. Each rank then holds the MoE output of the rows it
dispatched, zeros elsewhere; one sum over the rows' holders (the TP group; the whole world for replicated rows)
gives every holder every row. Adding zeros is exact, so the result does not depend on which rank dispatched a row.

Two forms of the exchange (:meth:`server.layers.moe.FusedMoE.expert_parallel_rows`):

- exact (eager steps): the per-peer pair counts are exchanged first (one small all-to-all and a host sync), then
  the rows travel with uneven splits: no padding, no dropping;
- static (decode steps in graph form, :mod:`server.execution.cuda_graphs`): no host sync and fixed shapes. Every rank
  sends every peer ``ceil(B / tp) * top_k`` pair slots (B the bucket's rows: the most pairs one rank can send one
  peer, so nothing is dropped); unused slots carry expert id -1 and zero rows. The cost: N times the worst-case
  pair count travels and is computed (the receiver runs its experts over all slots in the sync-free form), against
  the real ``B * top_k / tp`` pairs per TP group; at decode batch sizes these are a few hundred rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.sp.groups import ParallelState


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """Experts ``[start, end)`` of rank ``ep_rank``: contiguous blocks, the first ``num_experts % ep_size`` ranks
    holding one more (ranks past ``num_experts`` hold none)."""
    return row_block(num_experts, ep_size, ep_rank)


def row_block(n: int, parts: int, index: int) -> tuple[int, int]:
    """Block ``index`` of ``n`` items cut into ``parts`` contiguous near-equal blocks (the first ``n % parts`` one
    longer)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def expert_owners(num_experts: int, ep_size: int) -> list[int]:
    """The rank that stores each expert."""
    owners = []
    for r in range(ep_size):
        a, b = expert_range(num_experts, ep_size, r)
        owners += [r] * (b - a)
    return owners


def static_pair_capacity(rows: int, tp_size: int, top_k: int) -> int:
    """Pair slots per peer in the static form: a rank dispatches at most ``ceil(rows / tp)`` of a step's rows (its
    replicated rows are a subset of its TP block, see :func:`dispatch_mask`), each with at most ``top_k`` experts on
    one peer."""
    return -(-rows // tp_size) * top_k


def dispatch_mask(rows: int, replicated: torch.Tensor | None, pstate: ParallelState) -> torch.Tensor:
    """Static form: the rows this rank dispatches, as a bool mask (device). Row i is dispatched by TP rank
    ``i mod tp`` of its SP rank, a replicated row by global rank ``i mod N`` (N is a multiple of tp, so that rank is
    one of the former: the mask never holds more than ``ceil(rows / tp)`` rows)."""
    i = torch.arange(rows, device=pstate.device)
    mine = i % pstate.tp_size == pstate.tp_rank
    if replicated is None:
        return mine
    return torch.where(replicated.bool(), i % pstate.world_size == pstate.rank, mine)


def expert_parallel_forward(x: torch.Tensor, pstate: ParallelState, replicated_rows: int,
                            replicated_mask: torch.Tensor | None, static: bool,
                            rows: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """The MoE output of every row of ``x`` ``[T, hidden]`` (this SP rank's rows, the same on its TP ranks), each
    row computed once over the world. ``rows(src, None)`` is the exact form: the MoE output of this rank's source
    rows ``src`` (a collective: every rank calls it); ``rows(x, mask)`` the static form: the output of the rows
    ``mask`` flags, zeros elsewhere. Eager steps: the first ``replicated_rows`` rows are held by every SP rank.
    Static form: ``replicated_mask`` flags the replicated rows (None at sp = 1)."""
    ps = pstate
    if static:
        rep = replicated_mask.bool() if replicated_mask is not None and ps.sp_size > 1 else None
        out = rows(x, dispatch_mask(x.shape[0], rep, ps))
        if rep is None:
            return ps.tp_all_reduce(out)
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        mask = rep.unsqueeze(-1)
        shared = ps.world_all_reduce(torch.where(mask, out, zero))
        local = ps.tp_all_reduce(torch.where(mask, zero, out))
        return torch.where(mask, shared, local)
    t, r = x.shape[0], replicated_rows if ps.sp_size > 1 else 0
    ra, rb = row_block(r, ps.world_size, ps.rank)
    la, lb = row_block(t - r, ps.tp_size, ps.tp_rank)
    y = rows(torch.cat([x[ra:rb], x[r + la : r + lb]]), None)
    out = torch.zeros_like(x)
    out[ra:rb] = y[: rb - ra]
    out[r + la : r + lb] = y[rb - ra :]
    if r:
        ps.world_all_reduce(out[:r])
    if t > r:
        ps.tp_all_reduce(out[r:])
    return out
