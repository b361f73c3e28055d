"""Plain-torch gated delta rule (Qwen3.5 / Qwen3-Next Gated DeltaNet, Kimi Delta Attention) and its causal
depthwise conv1d.

Per value head h (docs/sp.md: Gated DeltaNet, Kimi Delta Attention), with ``alpha_t = exp(g_t)`` (``g_t <= 0``)
and a state ``S`` of ``[Dk, Dv]``:
``S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T``,  ``o_t = S_t^T q_t``.
The gate is one scalar per head and token (Gated DeltaNet: g ``[T, Hv]``, where the decay commutes with the
Householder factor) or one value per key channel (KDA: g ``[T, Hv, Dk]``); every function here takes either.

Conventions shared by every function here and by the fast kernels behind :mod:`server.kernels.ops`:
- q/k arrive raw (as projected and convolved) with ``Hk`` heads and are L2-normalised over ``Dk`` in fp32
  (eps 1e-6 inside the square root); q is then scaled by ``Dk ** -0.5``. This is what the transformers
  reference does with ``use_qk_l2norm_in_kernel=True`` and fla's default scale.
- v, g, beta have ``Hv`` heads, a multiple of ``Hk``: value head j reads key head ``j // (Hv // Hk)`` (Qwen3.5:
  16 key heads serve 48 value heads, three consecutive value heads per key head).
- States are ``[Hv, Dk, Dv]`` and always fp32 (fp64 in the test recurrence).

A piece of a sequence is an affine map of its incoming state: ``S_out = T S_in + M`` with ``T = A_n ... A_1``
(``A_t = (I - beta_t k_t k_t^T) Diag(alpha_t)``) and ``M`` the final state from zero. Every column of ``S`` evolves on
its own, so running the recurrence once with value columns ``[v | 0]`` from the state ``[0 | I]`` yields in one
pass ``O_loc`` and ``M`` (the first ``Dv`` columns) and ``Q~_t = T_t^T q_t`` and ``T`` (the last ``Dk``), where
``T_t`` is the map up to token t. The output for any incoming state is then ``O = O_loc + Q~ S_in``: one small
matmul after the state is known (:func:`gdn_chunk_affine_ref`, :func:`gdn_state_correction_ref`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GDN_CHUNK = 64


def gdn_normalize_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise q/k ``[..., Dk]`` (computed in fp32 at least) and scale q by ``Dk ** -0.5``."""
    dt = torch.promote_types(q.dtype, torch.float32)
    qf, kf = q.to(dt), k.to(dt)
    qf = qf * torch.rsqrt((qf * qf).sum(-1, keepdim=True) + 1e-6) * q.shape[-1] ** -0.5
    kf = kf * torch.rsqrt((kf * kf).sum(-1, keepdim=True) + 1e-6)
    return qf, kf


def _per_value_head(x: torch.Tensor, hv: int) -> torch.Tensor:
    """Key-head tensor ``[..., Hk, Dk]`` -> ``[..., Hv, Dk]``: each key head serves ``Hv // Hk`` consecutive value
    heads."""
    hk = x.shape[-2]
    if hv % hk:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({hk})")
    return x.repeat_interleave(hv // hk, dim=-2)


def gate_channels(g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The gate as ``[..., Hv, G]``: G = 1 for one decay per head (g shaped like beta ``[..., Hv]``), G = Dk for
    KDA's per-channel decays (g ``[..., Hv, Dk]``)."""
    return g.unsqueeze(-1) if g.dim() == beta.dim() else g


def gdn_recurrence_fp64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence in fp64: the ground truth for tests. One sequence: q/k ``[N, Hk, Dk]``,
    v ``[N, Hv, Dv]``, g ``[N, Hv]`` or ``[N, Hv, Dk]``, beta ``[N, Hv]`` (any dtype), initial_state
    ``[Hv, Dk, Dv]`` or None (zeros).

    Returns ``o [N, Hv, Dv]`` and the final state ``[Hv, Dk, Dv]``, both fp64.
    """
    n, hv, dv = v.shape
    qn, kn = gdn_normalize_qk(q.double(), k.double())
    qn, kn = _per_value_head(qn, hv), _per_value_head(kn, hv)
    state = torch.zeros(hv, q.shape[-1], dv, dtype=torch.float64) if initial_state is None \
        else initial_state.double().clone()
    out = torch.empty(n, hv, dv, dtype=torch.float64)
    for t in range(n):
        kt, bt = kn[t], beta[t].double().view(hv, 1, 1)
        a_state = torch.exp(gate_channels(g[t], beta[t]).double()).unsqueeze(-1) * state  # Diag(alpha_t) S_{t-1}
        state = a_state - bt * kt.unsqueeze(-1) * (kt.unsqueeze(-2) @ a_state) + bt * kt.unsqueeze(-1) * \
            v[t].double().unsqueeze(-2)
        out[t] = (qn[t].unsqueeze(-2) @ state).squeeze(-2)
    return out, state


def _decayed_products(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``P_ij = sum_d a_id b_jd e^(c_id - c_jd)`` for ``j <= i``, else 0: a/b ``[Hv, n, Dk]``, c ``[Hv, n, G]``
    cumulative log decays with ``G = 1`` (one per head: the decay factors out of the dot product) or ``G = Dk``
    (per channel: it does not, so the pairs are formed channel by channel). Every exponent kept is <= 0."""
    n = a.shape[1]
    lower = torch.ones(n, n, dtype=torch.bool, device=a.device).tril()
    if c.shape[-1] == 1:
        diff = c[..., 0].unsqueeze(-1) - c[..., 0].unsqueeze(-2)
        return (a @ b.transpose(1, 2)) * torch.where(lower, diff, -torch.inf).exp()
    diff = c.unsqueeze(2) - c.unsqueeze(1)  # [Hv, n, n, Dk]: c_id - c_jd
    decay = torch.where(lower.unsqueeze(-1), diff, -torch.inf).exp()
    return torch.einsum("hid,hjd,hijd->hij", a, b, decay)


def _gdn_one_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY / UT-transform) form of one sequence in fp32. q/k ``[Hv, N, Dk]`` normalised and per value
    head, v ``[Hv, N, Dv]``, g ``[Hv, N, G]`` (G = 1 or Dk), beta ``[Hv, N]``, state ``[Hv, Dk, Dv]``. Returns
    ``o [Hv, N, Dv]`` and the state.

    In a chunk with cumulative log decays ``c_i = g_0 + ... + g_i`` (per channel), ``Γ_i = Diag(e^c_i)`` and
    incoming state ``S``, the writes ``u_j = beta_j (v_j - (Diag(alpha_j) S_{j-1})^T k_j)`` solve the unit
    lower-triangular system ``(I + L) U = diag(beta) V - diag(beta) (K Γ) S`` with
    ``L_jl = beta_j k_j^T Γ_j Γ_l^-1 k_l`` (l < j); then ``O = (Q Γ) S + P U`` with ``P_il = q_i^T Γ_i Γ_l^-1 k_l``
    (l <= i), and ``S_out = Γ_last S + (K Γ_last Γ^-1)^T U``.
    """
    hv, n, _ = q.shape
    out = torch.empty(hv, n, v.shape[-1], dtype=torch.float32, device=q.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        qc, kc, vc, bc = q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e].unsqueeze(-1)
        c = g[:, s:e].cumsum(1)  # [Hv, n, G]
        eye = torch.eye(e - s, device=q.device)
        system = eye + bc * _decayed_products(kc, kc, c) * (1 - eye)
        rhs = bc * vc - (bc * c.exp() * kc) @ state
        u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        out[:, s:e] = (c.exp() * qc) @ state + _decayed_products(qc, kc, c) @ u
        last = c[:, -1:]  # [Hv, 1, G]
        state = last.exp().transpose(1, 2) * state + (kc * (last - c).exp()).transpose(1, 2) @ u
    return out, state


def gdn_prefill_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    cu_seqlens: torch.Tensor, initial_states: torch.Tensor | None = None, chunk: int = GDN_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen batch, chunked: q/k ``[T, Hk, Dk]``, v ``[T, Hv, Dv]``, g ``[T, Hv]`` or ``[T, Hv, Dk]``, beta
    ``[T, Hv]``, packed by
    ``cu_seqlens [B+1]``; initial_states ``[B, Hv, Dk, Dv]`` fp32 or None (zeros); sequences may be empty.

    Returns ``o [T, Hv, Dv]`` in v's dtype and final states ``[B, Hv, Dk, Dv]`` fp32. Computed in fp32.
    """
    hv, dk, dv = v.shape[1], q.shape[-1], v.shape[-1]
    qn, kn = gdn_normalize_qk(q.float(), k.float())
    qh, kh = (_per_value_head(x, hv).transpose(0, 1) for x in (qn, kn))  # [Hv, T, Dk]
    gh = gate_channels(g.float(), beta).transpose(0, 1)  # [Hv, T, G]
    vh, bh = v.float().transpose(0, 1), beta.float().t()
    cu = cu_seqlens.tolist()
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    finals = torch.zeros(len(cu) - 1, hv, dk, dv, dtype=torch.float32, device=v.device)
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        state = finals[i] if initial_states is None else initial_states[i].float()
        o_i, finals[i] = _gdn_one_sequence(qh[:, s:e], kh[:, s:e], vh[:, s:e], gh[:, s:e], bh[:, s:e], state, chunk)
        o[s:e] = o_i.transpose(0, 1).to(v.dtype)
    return o, finals


PrefillFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def gdn_chunk_affine_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    cu_seqlens: torch.Tensor, prefill: PrefillFn = gdn_prefill_ref,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's affine map from zero state, in one ``prefill`` pass over value columns ``[v | 0]`` from
    states ``[0 | I]`` (see the module docstring). Shapes as :func:`gdn_prefill_ref`.

    Returns ``o_loc [T, Hv, Dv]`` (v's dtype), ``q_tilde [T, Hv, Dk]`` (v's dtype), ``m [B, Hv, Dk, Dv]`` and
    ``t [B, Hv, Dk, Dk]`` (fp32).

    Why this and not a second pass from the true incoming state: the map ``T`` is needed for the SP combine
    anyway, and computing it with the same pass costs only ``Dk`` more value columns (the triangular solve and
    the decays are shared). Everything heavy then happens before any communication; after it, the correction
    :func:`gdn_state_correction_ref` is one ``[n, Dk] x [Dk, Dv]`` matmul per head, where a second pass would
    redo the whole chunk on the critical path.
    """
    b, hv, dk, dv = len(cu_seqlens) - 1, v.shape[1], q.shape[-1], v.shape[-1]
    v_ext = torch.cat([v, v.new_zeros(v.shape[0], hv, dk)], dim=-1)
    init = torch.zeros(b, hv, dk, dv + dk, dtype=torch.float32, device=v.device)
    init[..., dv:] = torch.eye(dk, device=v.device)
    o, final = prefill(q, k, v_ext, g, beta, cu_seqlens, init)
    return o[..., :dv], o[..., dv:], final[..., :dv].contiguous(), final[..., dv:].contiguous()


def gdn_state_correction_ref(
    o_loc: torch.Tensor, q_tilde: torch.Tensor, cu_seqlens: torch.Tensor, states: torch.Tensor
) -> torch.Tensor:
    """``O = O_loc + Q~ S_in`` per sequence: o_loc ``[T, Hv, Dv]``, q_tilde ``[T, Hv, Dk]``, states
    ``[B, Hv, Dk, Dv]`` fp32 (incoming). Returns o ``[T, Hv, Dv]`` in o_loc's dtype, summed in fp32."""
    cu = cu_seqlens.tolist()
    out = o_loc.float().clone()
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        out[s:e] += (q_tilde[s:e].float().transpose(0, 1) @ states[i].float()).transpose(0, 1)
    return out.to(o_loc.dtype)


def gdn_decode_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state_pool: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """One token per request: q/k ``[B, Hk, Dk]``, v ``[B, Hv, Dv]``, g ``[B, Hv]`` or ``[B, Hv, Dk]``, beta
    ``[B, Hv]``; updates
    ``state_pool[slots]`` (fp32 ``[S, Hv, Dk, Dv]``) in place and returns ``o [B, Hv, Dv]`` in v's dtype."""
    hv = v.shape[1]
    qn, kn = gdn_normalize_qk(q.float(), k.float())
    qn, kn = _per_value_head(qn, hv).unsqueeze(-1), _per_value_head(kn, hv).unsqueeze(-1)  # [B, Hv, Dk, 1]
    st = state_pool[slots] * torch.exp(gate_channels(g.float(), beta)).unsqueeze(-1)
    write = beta.float().view(-1, hv, 1) * (v.float() - (kn.transpose(-1, -2) @ st).squeeze(-2))  # [B, Hv, Dv]
    st = st + kn * write.unsqueeze(-2)
    state_pool[slots] = st
    return (qn.transpose(-1, -2) @ st).squeeze(-2).to(v.dtype)


def causal_conv1d_prefill_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
    conv_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over packed sequences: x ``[T, C]``, weight ``[C, K]``, bias ``[C]`` or None,
    conv_states ``[B, C, K-1]`` (each sequence's previous K-1 inputs, oldest first; None = zeros).

    ``y_t = sum_j weight[:, j] * x_{t-K+1+j} (+ bias)`` with the inputs before a sequence taken from its state.
    Returns ``y [T, C]`` in x's dtype (no activation) and the new states ``[B, C, K-1]`` (x's dtype): the last
    K-1 inputs, reaching back into the old state when a sequence is shorter than K-1.
    """
    c, kw = weight.shape
    cu = cu_seqlens.tolist()
    b = len(cu) - 1
    old = conv_states if conv_states is not None else x.new_zeros(b, c, kw - 1)
    y = torch.empty_like(x)
    new = torch.empty(b, c, kw - 1, dtype=x.dtype, device=x.device)
    for i in range(b):
        s, e = cu[i], cu[i + 1]
        seq = torch.cat([old[i].to(x.dtype), x[s:e].t()], dim=1)  # [C, K-1+n]
        new[i] = seq[:, seq.shape[1] - (kw - 1):]
        if e > s:  # an empty sequence (an empty SP chunk) keeps its state
            conv = F.conv1d(seq.unsqueeze(0).to(weight.dtype), weight.unsqueeze(1), bias, groups=c)[0]
            y[s:e] = conv.t().to(x.dtype)
    return y, new


def causal_conv1d_decode_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state_pool: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """One new input per request: x ``[B, C]``; ``state_pool[slots]`` (``[S, C, K-1]``) is read and shifted in
    place. Returns ``y [B, C]`` in x's dtype (no activation)."""
    window = torch.cat([state_pool[slots].to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = (window.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    state_pool[slots] = window[..., 1:].to(state_pool.dtype)
    return y.to(x.dtype)
