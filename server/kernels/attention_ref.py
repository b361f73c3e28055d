"""Plain-torch softmax attention with a position mask and base-2 log-sum-exp.

The reference for every attention backend. Visibility is by global position: key j is visible to query i
iff ``k_pos[j] <= q_pos[i]``, which covers causal prefill, a cached prefix, decode, and the blocks of a
sequence-parallel ring (zigzag chunks) with one rule. A sliding window ``w`` adds ``k_pos[j] > q_pos[i] - w``
(transformers' convention: a query sees itself and the ``w - 1`` keys before it).

LSE convention (project-wide): base 2, ``lse = log2(sum_j 2^(s_ij * log2(e)))`` with ``s = scale * q.k``;
rows with no visible key have ``lse = -inf`` and output 0.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)


def attention_with_lse_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[Nq, Hq, D]``, k/v ``[Nk, Hk, D]`` (``Hq % Hk == 0``, GQA), positions int ``[Nq]``/``[Nk]``; ``window``:
    the sliding window (None: every earlier key).

    Returns ``o [Nq, Hq, D]`` in q's dtype and ``lse [Nq, Hq]`` fp32, base 2. Computed in fp32.
    """
    nq, hq, d = q.shape
    hk = k.shape[1]
    if k.shape[0] == 0:
        return q.new_zeros(nq, hq, v.shape[-1]), torch.full((nq, hq), -math.inf, device=q.device)
    rep = hq // hk
    qf = q.float().view(nq, hk, rep, d)
    kf = k.float()
    vf = v.float()
    # scores [Hk, rep, Nq, Nk]
    s = torch.einsum("qhrd,khd->hrqk", qf, kf) * scale
    visible = k_pos.view(1, -1) <= q_pos.view(-1, 1)  # [Nq, Nk]
    if window is not None:
        visible &= k_pos.view(1, -1) > q_pos.view(-1, 1) - window
    s = s.masked_fill(~visible, -math.inf)
    lse_e = torch.logsumexp(s, dim=-1)  # [Hk, rep, Nq]
    p = torch.exp(s - lse_e.unsqueeze(-1).masked_fill(torch.isinf(lse_e).unsqueeze(-1), 0.0))
    p = p.masked_fill(~visible, 0.0)
    o = torch.einsum("hrqk,khd->qhrd", p, vf).reshape(nq, hq, v.shape[-1])
    lse = (lse_e * LOG2E).permute(2, 0, 1).reshape(nq, hq)
    return o.to(q.dtype), lse.contiguous()
