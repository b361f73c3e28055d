"""Plain-torch merge of partial attention results by their base-2 log-sum-exp.

Two partials ``(o_a, lse_a)`` and ``(o_b, lse_b)`` over disjoint key sets combine exactly:
``lse = log2(2^lse_a + 2^lse_b)``, ``o = o_a * 2^(lse_a - lse) + o_b * 2^(lse_b - lse)``.
A row with ``lse = -inf`` contributes nothing; if every part is ``-inf`` the result is 0 with ``lse = -inf``.
Accumulation is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch


def merge_states_ref(o: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor | None = None,
                     o_local: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K-way merge. o ``[K, N, H, D]``, lse ``[K, N, H]`` fp32 base 2 -> ``o [N, H, D]`` (o's dtype), ``lse [N, H]``.
    With ``keep`` ``[N]``, the rows whose flag is 0 get ``o_local`` ``[N, H, D]``'s row instead of the merge."""
    lse = lse.float()
    m = lse.max(dim=0).values
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp2(lse - m_safe)  # 0 for -inf rows
    denom = w.sum(dim=0)
    out_lse = torch.where(denom > 0, m_safe + torch.log2(denom.clamp_min(1e-30)), torch.full_like(m, float("-inf")))
    wn = torch.where(denom > 0, w / denom.clamp_min(1e-30), torch.zeros_like(w))
    out = (o.float() * wn.unsqueeze(-1)).sum(dim=0)
    if keep is not None:
        out = torch.where(keep[:, None, None] != 0, out, o_local.float())
    return out.to(o.dtype), out_lse


def merge_state_ref(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-way merge; shapes as in :func:`merge_states_ref` without the leading K."""
    return merge_states_ref(torch.stack([o_a, o_b]), torch.stack([lse_a, lse_b]))
