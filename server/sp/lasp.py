"""LASP: lightning-attention prefill of one request split zigzag over the SP group (docs/sp.md: LASP).

Chunk c of length n_c, entered with state ``S_c``, gives (per head, ``lambda = exp(-slope)``):
``O_c = O_loc_c + (Q_c * lambda^(i+1)) @ S_c`` and ``S_{c+1} = lambda^(n_c) S_c + M_c``, where ``O_loc_c`` and
``M_c`` are the chunk's output and final state from a zero state. ``O_loc`` and ``M`` need no other rank, so
they are computed first; only the incoming states ``S_c`` depend on earlier chunks. Two ways to get them:

- ``"ring"`` (LASP): the fp32 state is handed on point to point in chunk order. With zigzag that is
  rank 0 -> 1 -> ... -> P-1 (which owns chunks P-1 and P and hands the state to itself) -> P-2 -> ... -> 0;
  only the ``S_out`` update is on the critical path. Rank 0 ends with the final state and broadcasts it.
- ``"allgather"`` (LASP-2): all-gather every rank's two ``M`` and let each rank scan the 2P chunks itself
  (:func:`lasp_combine_states`); one collective, and every rank gets the final state with it.

States, ``M`` and the combine are fp32; decays are ``exp(-slope * n)`` with n >= 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from server.kernels import ops
from server.sp.groups import ParallelState
from server.sp.partition import zigzag_owner

LASP_MODES = ("ring", "allgather")


def _advance_state(state: torch.Tensor, m: torch.Tensor, n: int, slopes: torch.Tensor) -> torch.Tensor:
    """``S_out = exp(-slope * n) * S_in + M`` for a chunk of n tokens; fp32 ``[H, D, Dv]``."""
    decay = torch.exp(-slopes.double() * n).float().to(state.device).view(-1, 1, 1)
    return decay * state + m


def lasp_combine_states(
    initial_state: torch.Tensor, ms: list[torch.Tensor], chunk_lens: list[int], slopes: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prefix scan over chunks in sequence order: the incoming state of every chunk, and the final state.

    initial_state ``[H, D, Dv]`` fp32 (the state before chunk 0); ``ms[c]`` chunk c's zero-state final state;
    ``chunk_lens[c]`` its length. Returns ``([S_0, ..., S_{C-1}], S_C)``, all fp32.
    """
    state = initial_state.float()
    incoming = []
    for m, n in zip(ms, chunk_lens, strict=True):
        incoming.append(state)
        state = _advance_state(state, m, n, slopes)
    return incoming, state


def ring_chunk_states(
    advance: Callable[[int, torch.Tensor], torch.Tensor], initial_state: torch.Tensor, pstate: ParallelState
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Ring hand-off of the fp32 state in chunk order for this rank's chunks ``a = r`` and ``b = 2P-1-r``:
    ``advance(c, S_in)`` is chunk c's ``S_out``. Returns the incoming states ``{a: S_a, b: S_b}`` and the final
    state (broadcast from rank 0, which ends the chain). Shared by LASP and Gated DeltaNet SP."""
    p, r = pstate.sp_size, pstate.sp_rank
    a, b = r, 2 * p - 1 - r
    group = pstate.sp_group
    sends = []
    if r == 0:
        s_a = initial_state.float()
    else:
        s_a = torch.empty_like(initial_state, dtype=torch.float32)
        dist.recv(s_a, pstate.sp_peer(r - 1), group=group)
    out_a = advance(a, s_a)
    if r < p - 1:
        sends.append(dist.isend(out_a, pstate.sp_peer(r + 1), group=group))
        s_b = torch.empty_like(out_a)
        dist.recv(s_b, pstate.sp_peer(r + 1), group=group)
    else:  # chunk P follows chunk P-1 on the same rank
        s_b = out_a
    out_b = advance(b, s_b)
    if r > 0:
        sends.append(dist.isend(out_b, pstate.sp_peer(r - 1), group=group))
    for work in sends:
        work.wait()
    final = out_b if r == 0 else torch.empty_like(out_b)
    dist.broadcast(final, pstate.sp_peer(0), group=group)
    return {a: s_a, b: s_b}, final


def _allgather_states(
    m: dict[int, torch.Tensor], chunk_lens: list[int], initial_state: torch.Tensor, slopes: torch.Tensor,
    pstate: ParallelState,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """LASP-2: all-gather every rank's ``[M_r, M_{2P-1-r}]`` and scan all chunks locally."""
    p, r = pstate.sp_size, pstate.sp_rank
    gathered = pstate.sp_all_gather(torch.stack([m[r], m[2 * p - 1 - r]]))
    ms = [gathered[zigzag_owner(c, p)][0 if c < p else 1] for c in range(2 * p)]
    incoming, final = lasp_combine_states(initial_state, ms, chunk_lens, slopes)
    return {r: incoming[r], 2 * p - 1 - r: incoming[2 * p - 1 - r]}, final


def local_cu_seqlens(
    local_chunks: list[tuple[int, int, int]], chunk_lens: list[int], n_rows: int, pstate: ParallelState
) -> list[int]:
    """Check that ``local_chunks`` are this rank's zigzag chunks laid out back to back; their cu_seqlens."""
    p, r = pstate.sp_size, pstate.sp_rank
    if len(chunk_lens) != 2 * p:
        raise ValueError(f"chunk_lens must list all {2 * p} chunks for sp_size={p}, got {len(chunk_lens)}")
    if sorted(c for _, _, c in local_chunks) != sorted({r, 2 * p - 1 - r}):
        raise ValueError(f"sp rank {r} owns chunks {r} and {2 * p - 1 - r} (zigzag), got local_chunks={local_chunks}")
    cu = [0]
    for row_start, length, c in local_chunks:
        if row_start != cu[-1] or length != chunk_lens[c]:
            raise ValueError(f"local_chunks={local_chunks} must lie back to back from row 0 with the lengths in "
                             f"chunk_lens={chunk_lens}")
        cu.append(cu[-1] + length)
    if cu[-1] != n_rows:
        raise ValueError(f"local_chunks cover {cu[-1]} rows but q has {n_rows}")
    return cu


def lasp_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    local_chunks: list[tuple[int, int, int]],
    chunk_lens: list[int],
    initial_state: torch.Tensor,
    pstate: ParallelState,
    mode: str = "ring",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention of one request whose tokens are split zigzag over the SP group.

    q/k/v ``[N_local, H, D]``: this rank's rows, its chunks back to back; ``local_chunks`` lists them as
    ``(row_start, length, chunk_index)``; ``chunk_lens`` gives the length of all 2P chunks in sequence order
    (zeros allowed); slopes ``[H]``; ``initial_state [H, D, Dv]`` fp32 is the state before chunk 0, the same on
    every SP rank (zeros for a fresh prompt, the cached prefix's state otherwise). ``mode`` is ``"ring"``
    (LASP) or ``"allgather"`` (LASP-2). Returns ``o [N_local, H, Dv]`` in q's dtype and the prompt's final state
    ``[H, D, Dv]`` fp32, the same on every SP rank.
    """
    if mode not in LASP_MODES:
        raise ValueError(f"LASP mode must be one of {LASP_MODES}, got {mode!r}")
    if pstate.sp_size == 1:
        cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        o, final = ops.lightning_prefill(q, k, v, slopes, cu, initial_state.float().unsqueeze(0))
        return o, final[0]
    cu_list = local_cu_seqlens(local_chunks, chunk_lens, q.shape[0], pstate)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=q.device)
    # Everything that needs no other rank comes before any waiting: O_loc and M from zero states.
    o_loc, m_local = ops.lightning_prefill(q, k, v, slopes, cu, None)
    m = {c: m_local[i].float() for i, (_, _, c) in enumerate(local_chunks)}
    if mode == "ring":
        incoming, final = ring_chunk_states(lambda c, s: _advance_state(s, m[c], chunk_lens[c], slopes),
                                            initial_state.float(), pstate)
    else:
        incoming, final = _allgather_states(m, chunk_lens, initial_state.float(), slopes, pstate)
    s_in = torch.stack([incoming[c] for _, _, c in local_chunks])
    return ops.lightning_state_correction(o_loc, q, slopes, cu, s_in), final
