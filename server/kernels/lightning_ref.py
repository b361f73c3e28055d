"""Plain-torch lightning attention (MiniMax linear attention with per-head exponential decay).

Per head h with ``lambda = exp(-slope_h)``:  ``S_t = lambda * S_{t-1} + k_t^T v_t``,  ``o_t = q_t S_t``
(no softmax, no scale). States are ``[H, D, D]`` (key dim x value dim) and always fp32.

For a block of length n starting with state ``S``, local index i = 0..n-1 (docs/sp.md: LASP):
``O = intra + (Q * lambda^(i+1)) @ S``,  intra_ij = ``lambda^(i-j) q_i.k_j`` for j <= i,
``S_out = lambda^n S + sum_i lambda^(n-1-i) k_i^T v_i``.
Every decay is written ``exp(-slope * n)`` with n >= 0.
"""

from __future__ import annotations

import torch


def _decay(slopes: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``exp(-slope_h * n)`` as ``[H, len(n)]`` for integer n >= 0."""
    return torch.exp(-slopes.view(-1, 1).double() * n.view(1, -1).double()).to(slopes.dtype)


def lightning_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, blockwise. q/k/v ``[N, H, D]``; slopes ``[H]``; initial_state ``[H, D, D]`` fp32 or None.

    Returns ``o [N, H, D]`` in q's dtype and the final state ``[H, D, D]`` fp32. Computed in fp32.
    """
    n_tok, h, d = q.shape
    dev = q.device
    sl = slopes.float().to(dev)
    state = torch.zeros(h, d, v.shape[-1], device=dev) if initial_state is None else initial_state.float().clone()
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))  # [H, N, D]
    out = torch.empty(h, n_tok, v.shape[-1], device=dev)
    for s in range(0, n_tok, block_size):
        e = min(s + block_size, n_tok)
        n = e - s
        idx = torch.arange(n, device=dev)
        qb, kb, vb = qf[:, s:e], kf[:, s:e], vf[:, s:e]
        diff = idx.view(-1, 1) - idx.view(1, -1)
        mask = diff >= 0
        decay = torch.exp(-sl.view(-1, 1, 1) * diff.clamp_min(0).float()) * mask  # [H, n, n]
        intra = ((qb @ kb.transpose(1, 2)) * decay) @ vb
        inter = (qb * _decay(sl, idx + 1).unsqueeze(-1)) @ state
        out[:, s:e] = intra + inter
        k_dec = kb * _decay(sl, n - 1 - idx).unsqueeze(-1)
        state = _decay(sl, torch.tensor([n], device=dev)).view(h, 1, 1) * state + k_dec.transpose(1, 2) @ vb
    return out.transpose(0, 1).to(q.dtype), state


def lightning_recurrence_fp64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence in fp64: the ground truth for tests. Shapes as above; outputs fp64."""
    n_tok, h, d = q.shape
    lam = torch.exp(-slopes.double()).view(h, 1, 1)
    state = (
        torch.zeros(h, d, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state.double().clone()
    )
    out = torch.empty(n_tok, h, v.shape[-1], dtype=torch.float64)
    for t in range(n_tok):
        kt, vt, qt = k[t].double(), v[t].double(), q[t].double()
        state = lam * state + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        out[t] = (qt.unsqueeze(-2) @ state).squeeze(-2)
    return out, state


def lightning_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    cu_seqlens: torch.Tensor,
    initial_states: torch.Tensor | None = None,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen batch: q/k/v ``[T, H, D]`` packed by ``cu_seqlens [B+1]``; initial_states ``[B, H, D, D]`` fp32
    or None (zeros). Returns ``o [T, H, D]`` and final states ``[B, H, D, D]`` fp32.

    With zero initial states the final state of a sequence is its LASP message ``M``.
    """
    cu = cu_seqlens.tolist()
    b = len(cu) - 1
    o = torch.empty_like(q)
    finals = []
    for i in range(b):
        s, e = cu[i], cu[i + 1]
        init = None if initial_states is None else initial_states[i]
        o[s:e], st = lightning_attention_ref(q[s:e], k[s:e], v[s:e], slopes, init, block_size)
        finals.append(st)
    if not finals:
        return o, torch.zeros(0, q.shape[1], q.shape[2], v.shape[2], device=q.device)
    return o, torch.stack(finals)


def lightning_state_correction_ref(
    o: torch.Tensor, q: torch.Tensor, slopes: torch.Tensor, cu_seqlens: torch.Tensor, states: torch.Tensor
) -> torch.Tensor:
    """LASP correction: ``O + (Q * lambda^(i+1)) @ S_in`` per sequence (i = index within the sequence).

    Turns a zero-state output ``O_loc`` into the output for incoming states ``states [B, H, D, D]``.
    """
    cu = cu_seqlens.tolist()
    out = o.float().clone()
    sl = slopes.float().to(q.device)
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        idx = torch.arange(e - s, device=q.device)
        qd = q[s:e].float().transpose(0, 1) * _decay(sl, idx + 1).unsqueeze(-1)  # [H, n, D]
        out[s:e] += (qd @ states[i].float()).transpose(0, 1)
    return out.to(o.dtype)


def lightning_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """One token per request: q/k/v ``[B, H, D]``; updates ``state_pool[slots]`` (fp32 ``[S, H, D, D]``) in place
    and returns ``o [B, H, D]`` in q's dtype."""
    lam = torch.exp(-slopes.float().to(q.device)).view(1, -1, 1, 1)
    st = state_pool[slots] * lam + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    state_pool[slots] = st
    return (q.float().unsqueeze(-2) @ st).squeeze(-2).to(q.dtype)
