"""The MoE's host-sync-free forms (CUDA-graph decode) against its grouped form and against a per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.layers.moe import FusedMoE
from server.sp.groups import ParallelState


def per_token_reference(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    weights, experts = moe.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True):
            h = F.linear(x[t], moe.w13[e])
            out[t] += w * F.linear(F.silu(h[: moe.inter]) * h[moe.inter :], moe.w2[e])
    return out


@pytest.mark.parametrize("tokens", [1, 3, 4, 40])  # pairs < experts: gathered; 4 x 2 = 8 and 40: dense
def test_sync_free_forms_match(tokens: int) -> None:
    torch.manual_seed(tokens)
    moe = FusedMoE(8, 2, 16, 24, ParallelState())
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(tokens, 16)
    want = per_token_reference(moe, x)
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.forward_sync_free(x, *moe.route(x)), want, atol=1e-5, rtol=1e-5)
