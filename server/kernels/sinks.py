"""Attention sinks (gpt-oss): a learned per-head logit ``s_h`` that joins every softmax denominator and adds
nothing to the numerator, ``o = sum_j e^{x_j} v_j / (e^{s_h} + sum_j e^{x_j})``.

Applied once, to the final ``(o, lse)`` of a row after every partial over disjoint key sets has been merged
(ring steps, the window halo, the SP decode merge): a sink applied in each of P partials would be counted P times.
With base-2 LSE (the project's convention) and ``s2 = s_h / ln 2``::

    lse' = log2(2^lse + 2^s2)        o' = o * 2^(lse - lse')

A row that sees no key (``lse = -inf``, ``o = 0``) stays 0 and gets ``lse' = s2``. Plain torch, no host sync:
it runs inside decode CUDA graphs.
"""

from __future__ import annotations

import torch

from server.kernels.attention_ref import LOG2E


def apply_attention_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """o ``[N, H, D]``, lse ``[N, H]`` fp32 base 2 (the merged result over every key), sinks ``[H]`` (natural-log
    logits, this rank's heads) -> ``(o', lse')``, o' in o's dtype, computed in fp32."""
    s2 = sinks.float() * LOG2E
    new_lse = torch.logaddexp2(lse.float(), s2.expand_as(lse))
    return (o.float() * torch.exp2(lse.float() - new_lse).unsqueeze(-1)).to(o.dtype), new_lse
