"""Gated delta rule prefill (Gated DeltaNet, and KDA with its per-channel gate) of one request split zigzag over
the SP group, and its conv1d halo (docs/sp.md: Gated DeltaNet, Kimi Delta Attention).

Each chunk c is an affine map of its incoming state: ``S_{c+1} = T_c S_c + M_c``, and its outputs are
``O_c = O_loc_c + Q~_c S_c`` (:mod:`server.kernels.gdn_ref`). ``O_loc``, ``Q~``, ``M`` and ``T`` need no other
rank: one kernel pass per rank computes them for both of its chunks before any communication. Then the
incoming states, in one of two ways:

- ``"allgather"`` (default): all-gather every rank's ``[M | T]`` for its two chunks (fp32,
  ``2 x Hv x Dk x (Dv + Dk)`` per rank, independent of the prompt length) and let every rank scan the 2P chunks
  in sequence order itself (:func:`gdn_combine_states`); every rank gets the final state with it.
- ``"ring"``: the LASP point-to-point hand-off in chunk order (:func:`server.sp.lasp.ring_chunk_states`), each
  hop one ``T S + M``.

The causal depthwise conv before the GDN reads the ``K-1`` inputs before each row. At a chunk boundary those
rows live on other ranks (and before chunk 0 in the request's conv state), so :func:`conv_halo_exchange`
all-gathers the last ``K-1`` input rows of every chunk and each rank rebuilds, in sequence order, the halo of
its chunks and the prompt's final conv state (what decode continues from). Chunks may be empty or shorter than
``K-1``; the halo then reaches back over several chunks into the conv state.
"""

from __future__ import annotations

import torch

from server.kernels import ops
from server.sp.groups import ParallelState
from server.sp.lasp import local_cu_seqlens, ring_chunk_states
from server.sp.partition import zigzag_owner

GDN_SP_MODES = ("allgather", "ring")


def _advance(state: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``S_out = T S_in + M`` per head: state/m ``[Hv, Dk, Dv]``, t ``[Hv, Dk, Dk]``, fp32."""
    return t @ state + m


def gdn_combine_states(
    initial_state: torch.Tensor, ms: list[torch.Tensor], ts: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prefix scan over chunks in sequence order: ``S_in(c) = T(c-1) S_in(c-1) + M(c-1)``, from the request's
    state ``initial_state [Hv, Dk, Dv]``. Returns every chunk's incoming state and the final state (fp32)."""
    state = initial_state.float()
    incoming = []
    for m, t in zip(ms, ts, strict=True):
        incoming.append(state)
        state = _advance(state, m, t)
    return incoming, state


def _allgather_states(
    m: dict[int, torch.Tensor], t: dict[int, torch.Tensor], initial_state: torch.Tensor, pstate: ParallelState
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One all-gather of every rank's ``[M | T]`` for chunks r and 2P-1-r, then the scan on every rank."""
    p, r = pstate.sp_size, pstate.sp_rank
    dv = initial_state.shape[-1]
    mine = torch.stack([torch.cat([m[c], t[c]], dim=-1) for c in (r, 2 * p - 1 - r)])  # [2, Hv, Dk, Dv + Dk]
    gathered = pstate.sp_all_gather(mine)
    msgs = [gathered[zigzag_owner(c, p)][0 if c < p else 1] for c in range(2 * p)]
    incoming, final = gdn_combine_states(initial_state, [x[..., :dv] for x in msgs], [x[..., dv:] for x in msgs])
    return {r: incoming[r], 2 * p - 1 - r: incoming[2 * p - 1 - r]}, final


def gdn_sp_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    local_chunks: list[tuple[int, int, int]], chunk_lens: list[int], initial_state: torch.Tensor,
    pstate: ParallelState, mode: str = "allgather",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet of one request whose tokens are split zigzag over the SP group.

    q/k ``[N_local, Hk, Dk]`` (raw: normalised inside), v ``[N_local, Hv, Dv]``, g ``[N_local, Hv]`` (or
    ``[N_local, Hv, Dk]``: KDA's per-channel gate), beta ``[N_local, Hv]``: this
    rank's rows, its chunks back to back, listed in ``local_chunks`` as ``(row_start, length, chunk_index)``;
    ``chunk_lens`` the lengths of all 2P chunks (zeros allowed); ``initial_state [Hv, Dk, Dv]`` fp32 the state
    before chunk 0, the same on every SP rank. Returns ``o [N_local, Hv, Dv]`` in v's dtype and the prompt's
    final state ``[Hv, Dk, Dv]`` fp32, the same on every SP rank.
    """
    if mode not in GDN_SP_MODES:
        raise ValueError(f"GDN SP mode must be one of {GDN_SP_MODES}, got {mode!r}")
    if pstate.sp_size == 1:
        cu = torch.tensor([0, v.shape[0]], dtype=torch.int32, device=v.device)
        o, final = ops.gdn_prefill(q, k, v, g, beta, cu, initial_state.float().unsqueeze(0))
        return o, final[0]
    cu = torch.tensor(local_cu_seqlens(local_chunks, chunk_lens, v.shape[0], pstate), dtype=torch.int32,
                      device=v.device)
    o_loc, q_tilde, m_local, t_local = ops.gdn_chunk_affine(q, k, v, g, beta, cu)
    m = {c: m_local[i] for i, (_, _, c) in enumerate(local_chunks)}
    t = {c: t_local[i] for i, (_, _, c) in enumerate(local_chunks)}
    if mode == "ring":
        incoming, final = ring_chunk_states(lambda c, s: _advance(s, m[c], t[c]), initial_state.float(), pstate)
    else:
        incoming, final = _allgather_states(m, t, initial_state.float(), pstate)
    s_in = torch.stack([incoming[c] for _, _, c in local_chunks])
    return ops.gdn_state_correction(o_loc, q_tilde, cu, s_in), final


def conv_halo_exchange(
    x: torch.Tensor, local_chunks: list[tuple[int, int, int]], chunk_lens: list[int], conv_state: torch.Tensor,
    pstate: ParallelState,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv inputs that precede each of this rank's chunks, and the prompt's final conv state.

    x ``[N_local, C]``: this rank's conv inputs, its chunks back to back as in ``local_chunks``;
    ``conv_state [C, K-1]``: the request's last K-1 inputs before chunk 0 (oldest first). Returns ``halos
    [len(local_chunks), C, K-1]`` (each chunk's previous K-1 inputs, usable as conv states for
    :func:`server.kernels.ops.causal_conv1d_prefill` over the local chunks) and the final conv state ``[C, K-1]``,
    the same on every SP rank. One all-gather of ``2 x (K-1) x C`` per rank.
    """
    p = pstate.sp_size
    c_dim, w = conv_state.shape
    tails = x.new_zeros(2, w, c_dim)  # each chunk's last min(n, K-1) rows, right-aligned
    for row, n, c in local_chunks:
        keep = min(n, w)
        tails[0 if c < p else 1, w - keep :] = x[row + n - keep : row + n]
    gathered = pstate.sp_all_gather(tails)
    history = conv_state.to(x.dtype).t()  # [K-1, C] oldest first
    halos = {}
    for c in range(2 * p):
        halos[c] = history.t()
        keep = min(chunk_lens[c], w)
        tail = gathered[zigzag_owner(c, p)][0 if c < p else 1, w - keep :]
        history = torch.cat([history, tail])[-w:] if w else history
    return torch.stack([halos[c] for _, _, c in local_chunks]).contiguous(), history.t().contiguous()
