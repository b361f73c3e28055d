"""The MoE's forms against a per-token loop: the grouped GEMMs (``torch._grouped_mm``), the per-expert loop and the
host-sync-free forms (gathered pairs, dense) that devices without grouped GEMMs run in CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.layers import moe as moe_module
from server.layers.moe import SYNC_FREE_MAX_TOKENS, FusedMoE
from server.sp.groups import ParallelState
from tests.helpers import needs_cuda


def per_token_reference(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    weights, experts = moe.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True):
            h = F.linear(x[t], moe.w13[e])
            out[t] += w * F.linear(F.silu(h[: moe.inter]) * h[moe.inter :], moe.w2[e])
    return out


@pytest.mark.parametrize("tokens", [0, 1, 3, 4, 40])  # pairs < experts: gathered; 4 x 2 = 8 and 40: dense
@pytest.mark.parametrize("grouped", [True, False])
def test_forms_match(tokens: int, grouped: bool, monkeypatch) -> None:
    """With grouped GEMMs on, every entry point takes them (CPU fp32); off, the per-expert loop and the sync-free
    forms run."""
    monkeypatch.setattr(moe_module, "GROUPED_MM", grouped)
    torch.manual_seed(tokens)
    moe = FusedMoE(8, 2, 16, 24, ParallelState())
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(tokens, 16)
    assert moe.grouped_ok(x) == grouped
    want = per_token_reference(moe, x)
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.forward_sync_free(x, *moe.route(x)), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.forward_grouped(x, *moe.route(x)), want, atol=1e-5, rtol=1e-5)


def test_grouped_form_with_experts_no_token_chose() -> None:
    """Seven of nine experts get no pair: empty groups before, between and after the two used ones."""
    torch.manual_seed(0)
    moe = FusedMoE(9, 2, 16, 24, ParallelState())
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(6, 16)
    experts = torch.tensor([[2, 7]] * 6)
    weights = torch.rand(6, 2)
    want = sum(weights[:, j : j + 1] * torch.stack([
        F.linear(F.silu(h[: moe.inter]) * h[moe.inter :], moe.w2[e])
        for h, e in ((F.linear(x[t], moe.w13[experts[t, j]]), experts[t, j]) for t in range(6))]) for j in range(2))
    torch.testing.assert_close(moe.forward_grouped(x, weights, experts), want, atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_grouped_form_on_cuda_bf16_eager_and_in_a_cuda_graph(tokens: int) -> None:
    """bf16 experts on a Hopper GPU take the grouped GEMMs, eagerly and captured in a CUDA graph (the same output,
    bit for bit), within bf16 rounding of the per-token reference computed in fp32 on the same weights."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("grouped GEMMs need Hopper or newer")
    torch.manual_seed(tokens)
    moe = FusedMoE(64, 8, 64, 48, ParallelState(device=torch.device("cuda")), torch.bfloat16).cuda()
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    xb = torch.randn(tokens, 64, device="cuda").to(torch.bfloat16)
    assert moe.grouped_ok(xb)
    got = moe(xb)
    # the reference takes the bf16 layer's own routing (a near-tie decided in bf16 is not the kernel's error)
    weights, experts = moe.route(xb)
    want = torch.zeros(tokens, 64, device="cuda")
    for t in range(tokens):
        for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True):
            h = F.linear(xb[t].float(), moe.w13[e].float())
            want[t] += w * F.linear(F.silu(h[: moe.inter]) * h[moe.inter :], moe.w2[e].float())
    torch.testing.assert_close(got.float(), want, atol=0.03 * want.abs().max().item(), rtol=0.02)
    static = xb.clone()
    moe(static)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [5, SYNC_FREE_MAX_TOKENS, SYNC_FREE_MAX_TOKENS + 1])
def test_eager_steps_of_few_tokens_take_the_sync_free_form_on_cuda(tokens: int) -> None:
    """Up to SYNC_FREE_MAX_TOKENS tokens an eager CUDA step runs the sync-free form (bit for bit), above it the
    per-expert loop; both match the per-token reference (fp32: no grouped GEMMs on CUDA)."""
    torch.manual_seed(tokens)
    moe = FusedMoE(64, 8, 32, 48, ParallelState(device=torch.device("cuda"))).cuda()
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(tokens, 32, device="cuda")
    got = moe(x)
    if tokens <= SYNC_FREE_MAX_TOKENS:
        assert torch.equal(got, moe.forward_sync_free(x, *moe.route(x)))
    torch.testing.assert_close(got, per_token_reference(moe, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_expert_parallel_rows_at_one_rank_match(tokens: int) -> None:
    """The dispatch / combine path at EP size 1 (exchanges the identity): the exact form on every row, and the static
    form on the masked rows (zeros on the others), against the per-token loop."""
    torch.manual_seed(tokens)
    moe = FusedMoE(8, 3, 16, 24, ParallelState(expert_parallel=True))
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(tokens, 16)
    ref = per_token_reference(moe, x)
    torch.testing.assert_close(moe.expert_parallel_rows(x), ref, rtol=1e-5, atol=1e-5)
    mask = torch.arange(tokens) % 2 == 0
    static = moe.expert_parallel_rows(x, mask)
    torch.testing.assert_close(static[mask], ref[mask], rtol=1e-5, atol=1e-5)
    assert not static[~mask].any()
    assert sum(moe.take_pairs()) == tokens * 3  # the exact exchange counted every (row, expert) pair


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_expert_parallel_static_form_captures_in_a_cuda_graph(tokens: int) -> None:
    """The static form (graph decode steps) captured in a CUDA graph and replayed on new inputs matches the exact
    form run eagerly (fp32): no host sync, fixed shapes."""
    torch.manual_seed(tokens)
    moe = FusedMoE(64, 8, 32, 48, ParallelState(device=torch.device("cuda"), expert_parallel=True)).cuda()
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(tokens, 32, device="cuda")
    mask = torch.ones(tokens, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe.expert_parallel_rows(x, mask)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.expert_parallel_rows(x, mask)
    x.copy_(torch.randn(tokens, 32, device="cuda"))
    graph.replay()
    torch.testing.assert_close(out, moe.expert_parallel_rows(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, per_token_reference(moe, x), atol=1e-4, rtol=1e-4)
