"""FP8 MoE experts: a checkpoint's FP8 expert tensors load as FP8 with their scales (TP slices that cut a scale block
included, and whole experts under expert parallelism), and every compute form (the per-expert loop, the gathered and
dense sync-free forms, the expert-parallel exchange at one rank) equals the same MoE on the dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.kernels.fp8 import FP8, dequantize
from server.layers.fp8 import Fp8Weight, checkpoint_scale
from server.layers.moe import FusedMoE, deferred_expert_storage
from server.sp.groups import ParallelState
from tests.helpers import fp8_dequantize_blocks, fp8_quantize_blocks, gpu, needs_cuda

E, TOP_K, HIDDEN, INTER = 6, 2, 48, 24


def checkpoint_experts(block: tuple[int, int], experts: int = E, hidden: int = HIDDEN, inter: int = INTER
                       ) -> tuple[dict, dict]:
    """Per expert gate / up ``[I, H]`` and down ``[H, I]`` as block-scaled FP8 checkpoint tensors (Fp8Weight, read as
    the loader reads them) and their dequantized fp32 weights."""
    g = torch.Generator().manual_seed(0)
    fp8, full = {}, {}
    for e in range(experts):
        for which, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            q, grid = fp8_quantize_blocks(torch.randn(*shape, generator=g) * 0.3, *block)
            fp8[e, which] = Fp8Weight(q, checkpoint_scale(q.shape, grid, block, which), q.shape, block[1], which)
            full[e, which] = fp8_dequantize_blocks(q, grid, *block)
    return fp8, full


def load(moe: FusedMoE, tensors: dict) -> None:
    for (e, which), t in tensors.items():
        if which == "down":
            moe.w2.weight_loader(moe.w2, t, e)
        else:
            moe.w13.weight_loader(moe.w13, t, (e, 0 if which == "gate" else 1))


def dequantized(moe: FusedMoE, name: str) -> torch.Tensor:
    return dequantize(getattr(moe, name), getattr(moe, name + "_scale"), moe.block_k[name])


def per_token_reference(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE on its experts' dequantized fp32 weights, one token and expert at a time (routed as the layer routes
    ``x`` in its dtype)."""
    w13, w2 = dequantized(moe, "w13"), dequantized(moe, "w2")
    weights, experts = moe.route(x.to(moe.gate.dtype))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True):
            h = F.linear(x[t], w13[e])
            out[t] += w * F.linear(F.silu(h[: moe.inter]) * h[moe.inter :], w2[e])
    return out


@pytest.mark.parametrize("tp,ep", [(1, False), (2, False), (2, True)])
def test_fp8_experts_load_with_their_scales(tp: int, ep: bool) -> None:
    """Blocks of 16 columns: at tp = 2 each rank's 12 down-projection columns cut a block ([0, 12) and [12, 24)),
    stored in blocks of gcd(16, 12) = 4 with their checkpoint block's scale; dequantized, every rank's slice (or its
    whole experts) equals the checkpoint's dequantized weights exactly."""
    fp8, full = checkpoint_experts((32, 16))
    for rank in range(tp):
        ps = ParallelState(tp_size=tp, tp_rank=rank, expert_parallel=ep)
        moe = FusedMoE(E, TOP_K, HIDDEN, INTER, ps)
        load(moe, fp8)
        assert moe.w13.dtype == moe.w2.dtype == FP8
        sliced = tp > 1 and not ep
        kb2 = 3 if sliced else 2  # w2: 24 columns in blocks of 16 (the last short), or 12 in blocks of 4
        assert moe.w13_scale.shape == (moe.num_local_experts, 2 * moe.inter, HIDDEN // 16)
        assert moe.w2_scale.shape == (moe.num_local_experts, HIDDEN, kb2)
        assert moe.block_k == {"w13": 16, "w2": 4 if sliced else 16}
        cols = slice(rank * INTER // tp, (rank + 1) * INTER // tp) if sliced else slice(0, INTER)
        for i, e in enumerate(range(moe.first, moe.end)):
            want13 = torch.cat([full[e, "gate"][cols], full[e, "up"][cols]])
            assert torch.equal(dequantized(moe, "w13")[i], want13)
            assert torch.equal(dequantized(moe, "w2")[i], full[e, "down"][:, cols])


def test_fused_fp8_expert_tensors_load_expert_by_expert():
    """Fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` FP8 tensors (scales ``[E, ...]``) reach the
    experts as FP8 slices of each expert (Fp8Weight.rows), at tp = 2 too."""
    from server.models.common import stacked_expert_weights

    _, full = checkpoint_experts((32, 16))
    fused = {"gate_up_proj": torch.stack([torch.cat([full[e, "gate"], full[e, "up"]]) for e in range(E)]),
             "down_proj": torch.stack([full[e, "down"] for e in range(E)])}
    tensors, want = {}, {}
    for name, w in fused.items():
        q, grid = zip(*(fp8_quantize_blocks(w[e], 32, 16) for e in range(E)), strict=True)
        q, grid = torch.stack(q), torch.stack(grid)
        tensors[f"layers.0.mlp.experts.{name}"] = Fp8Weight(q, checkpoint_scale(q.shape, grid, (32, 16), name),
                                                            q.shape, 16, name)
        want[name] = torch.stack([fp8_dequantize_blocks(q[e], grid[e], 32, 16) for e in range(E)])
    for rank in range(2):
        moe = FusedMoE(E, TOP_K, HIDDEN, INTER, ParallelState(tp_size=2, tp_rank=rank))
        params = {f"layers.0.mlp.{n}": p for n, p in moe.named_parameters()}
        assert list(stacked_expert_weights(tensors.items(), params, ".mlp.experts.", ".mlp.")) == []
        assert moe.w13.dtype == moe.w2.dtype == FP8
        rows = torch.arange(INTER // 2) + rank * INTER // 2
        gate_up = want["gate_up_proj"][:, torch.cat([rows, rows + INTER])]
        assert torch.equal(dequantized(moe, "w13"), gate_up)
        assert torch.equal(dequantized(moe, "w2"), want["down_proj"][:, :, rows])


def test_deferred_expert_storage_allocates_as_the_checkpoint_stores():
    """Built for an FP8 checkpoint (build_model), the experts hold no memory until their first tensor arrives, then
    exist in FP8 only; high-precision tensors give the model dtype; experts never loaded, or a layer mixing FP8 and
    high-precision experts, are errors that say so."""
    fp8, full = checkpoint_experts((32, 16))
    with deferred_expert_storage():
        moes = [FusedMoE(E, TOP_K, HIDDEN, INTER, ParallelState()) for _ in range(3)]
    assert all(m.w13.is_meta and m.w2.is_meta for m in moes)
    load(moes[0], fp8)
    assert moes[0].w13.dtype == FP8 and moes[0].w13.device.type == "cpu" and moes[0].w2_scale.device.type == "cpu"
    load(moes[1], full)
    assert moes[1].w2.dtype == torch.float32 and torch.equal(moes[1].w2[2], full[2, "down"])
    with pytest.raises(ValueError, match="the checkpoint has no expert weights for w13 and w2"):
        moes[2].check_loaded("layers.2.mlp")
    with pytest.raises(ValueError, match="stored in high precision, but other experts of its layer are FP8"):
        moes[0].w2.weight_loader(moes[0].w2, full[0, "down"], 0)


@pytest.mark.parametrize("tokens", [1, 3, 40])  # pairs < experts: gathered; 40 x 2: dense
def test_fp8_expert_compute_forms_match_the_dequantized_reference(tokens: int) -> None:
    torch.manual_seed(tokens)
    moe = FusedMoE(E, TOP_K, HIDDEN, INTER, ParallelState())
    load(moe, checkpoint_experts((32, 16))[0])
    moe.gate.data.normal_(0, 0.3)
    x = torch.randn(tokens, HIDDEN)
    want = per_token_reference(moe, x)
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.forward_sync_free(x, *moe.route(x)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dequant_bytes", [1 << 30, 1])  # every expert at once; one expert at a time
def test_fp8_experts_in_prefill_chunks_take_the_grouped_gemms(dequant_bytes: int, monkeypatch) -> None:
    """More than SYNC_FREE_MAX_TOKENS tokens: the experts dequantized (all at once, or a slice at a time with the
    slices' rows found on the host) and the grouped GEMMs, against the per-token reference; the loop agrees."""
    from server.layers import moe as moe_module

    monkeypatch.setattr(moe_module, "GROUPED_DEQUANT_BYTES", dequant_bytes)
    torch.manual_seed(0)
    moe = FusedMoE(E, TOP_K, HIDDEN, INTER, ParallelState())
    load(moe, checkpoint_experts((32, 16))[0])
    moe.gate.data.normal_(0, 0.3)
    x = torch.randn(moe_module.SYNC_FREE_MAX_TOKENS + 3, HIDDEN)
    assert moe.fp8_grouped_ok(x) and not moe.fp8_grouped_ok(x[:5])
    want = per_token_reference(moe, x)
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    with moe_module.grouped_gemms(False):
        torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)


def test_online_fp8_experts_quantize_each_row_and_run_every_form() -> None:
    """``--quantization fp8``: high-precision experts become FP8 with one scale per row (each row's largest magnitude
    maps to 448), then compute as checkpoint FP8 experts do, the expert-parallel exchange at one rank included."""
    torch.manual_seed(0)
    moe = FusedMoE(E, 3, HIDDEN, INTER, ParallelState(expert_parallel=True))
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    w13 = moe.w13.data.clone()
    assert moe.quantize_experts() and not moe.quantize_experts()  # the second call finds nothing left to quantize
    assert moe.w13.dtype == FP8 and moe.w13_scale.shape == (E, 2 * INTER, 1)
    torch.testing.assert_close(moe.w13_scale.squeeze(-1), w13.abs().amax(-1) / 448)
    x = torch.randn(5, HIDDEN)
    want = per_token_reference(moe, x)
    torch.testing.assert_close(moe.expert_parallel_rows(x), want, atol=1e-5, rtol=1e-5)
    mask = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(moe.expert_parallel_rows(x, mask)[mask], want[mask], atol=1e-5, rtol=1e-5)


@needs_cuda
@gpu
@pytest.mark.parametrize("tokens", [2, 4, 64, 300])  # gathered (4 pairs < 8 experts); dense; dense; the FP8 GEMM loop
def test_fp8_experts_on_gpu_match_the_dequantized_fp32_reference(tokens: int) -> None:
    """bf16 activations on CUDA (FP8 GEMMs with per-token activation scales in the loop form, bf16 matmuls on the
    dequantized experts in the sync-free forms) against fp32 on the dequantized weights: max error relative to the
    largest output printed and bounded."""
    torch.manual_seed(tokens)
    cuda = torch.device("cuda")
    moe = FusedMoE(8, 2, 256, 256, ParallelState(device=cuda), dtype=torch.bfloat16).to(cuda)
    load(moe, checkpoint_experts((128, 128), 8, 256, 256)[0])
    moe.gate.data.normal_(0, 0.1)
    x = torch.randn(tokens, 256, device=cuda)
    want = per_token_reference(moe, x)  # fp32: x, and the dequantized experts
    got = moe(x.bfloat16()).float()
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"FP8 experts on CUDA, {tokens} tokens: max error relative to the largest output {err:.4f}")
    assert err < 0.05


@needs_cuda
@gpu
@pytest.mark.parametrize("tokens", [2, 16])  # the gathered and the dense form
def test_fp8_sync_free_forms_capture_in_a_cuda_graph(tokens: int) -> None:
    """The FP8 experts' sync-free forms captured in a CUDA graph (decode steps) and replayed on new inputs equal the
    same forms run eagerly (bf16): no host sync in the grouped kernels' wrappers."""
    torch.manual_seed(tokens)
    cuda = torch.device("cuda")
    moe = FusedMoE(8, 2, 256, 256, ParallelState(device=cuda), dtype=torch.bfloat16).to(cuda)
    load(moe, checkpoint_experts((128, 128), 8, 256, 256)[0])
    moe.gate.data.normal_(0, 0.1)
    x = torch.randn(tokens, 256, device=cuda, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe(x)  # warm-up (and the kernels' compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(x)
    x.copy_(torch.randn(tokens, 256, device=cuda, dtype=torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(out, moe.forward_sync_free(x, *moe.route(x)), atol=0, rtol=0)
