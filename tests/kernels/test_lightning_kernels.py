"""Triton lightning attention (prefill, LASP correction, decode) vs the fp64 recurrence and the torch references.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` in fp32 at small shapes; with one, the same tests run
natively and the gpu-marked tests add bf16 at MiniMax shapes. Lengths straddle block boundaries (1, block-1,
block, block+1, several blocks plus a remainder) with nonzero initial states, where an inter-block decay
error would show.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402

from server.kernels import ops  # noqa: E402
from server.kernels.lightning import (  # noqa: E402
    lightning_decode_triton,
    lightning_prefill_triton,
    lightning_state_correction_triton,
)
from server.kernels.lightning_ref import (  # noqa: E402
    lightning_decode_ref,
    lightning_prefill_ref,
    lightning_recurrence_fp64,
)
from tests.helpers import DEVICE, gpu, needs_cuda  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_batch(lens: list[int], h: int, d: int, dtype=torch.float32, seed: int = 0, with_state: bool = True):
    """q/k/v of MiniMax-like magnitude, slopes from strong (0.9) to weak (1e-3) decay, random initial states."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g) * 0.5 for _ in range(3))
    slopes = torch.logspace(0, -3, h) * 0.9
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    s0 = torch.randn(len(lens), h, d, d, generator=g) * 0.3 if with_state else None
    to = lambda x: None if x is None else x.to(DEVICE)
    return to(q.to(dtype)), to(k.to(dtype)), to(v.to(dtype)), to(slopes), to(cu), to(s0)


def check_against_recurrence(q, k, v, slopes, cu, s0, o, final, tol: float) -> None:
    bounds = cu.tolist()
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        init = None if s0 is None else s0[i].cpu()
        ro, rs = lightning_recurrence_fp64(q[s:e].cpu(), k[s:e].cpu(), v[s:e].cpu(), slopes.cpu(), init)
        if e > s:
            assert rel_err(o[s:e], ro) < tol, f"output of sequence {i} (len {e - s})"
        assert rel_err(final[i], rs) < tol, f"final state of sequence {i} (len {e - s})"


@pytest.mark.parametrize("n", [1, 15, 16, 17, 53])
def test_prefill_across_block_boundaries(n: int) -> None:
    q, k, v, slopes, cu, s0 = make_batch([n], h=2, d=32, seed=n)
    o, final = lightning_prefill_triton(q, k, v, slopes, cu, s0, block=16)
    check_against_recurrence(q, k, v, slopes, cu, s0, o, final, tol=1e-5)


@pytest.mark.parametrize("num_segments,block_v", [(1, None), (3, 16), (5, 32)])
def test_prefill_varlen_mixed_lengths(num_segments: int, block_v: int | None) -> None:
    """Short and long sequences (and an empty one) in one batch; segments cut the long ones mid-sequence."""
    lens = [1, 70, 0, 16, 5, 33]
    q, k, v, slopes, cu, s0 = make_batch(lens, h=3, d=32, seed=1)
    o, final = lightning_prefill_triton(q, k, v, slopes, cu, s0, block=16, block_v=block_v, num_segments=num_segments)
    check_against_recurrence(q, k, v, slopes, cu, s0, o, final, tol=1e-5)


def test_prefill_zero_state_returns_lasp_m() -> None:
    """Without initial states the final state is the chunk's M (docs/sp.md: LASP) and o the zero-state output."""
    q, k, v, slopes, cu, _ = make_batch([40, 9], h=2, d=16, seed=2, with_state=False)
    o, m = lightning_prefill_triton(q, k, v, slopes, cu, None, block=16, num_segments=2)
    ro, rm = lightning_prefill_ref(q, k, v, slopes, cu, None)
    assert rel_err(o, ro) < 1e-5 and rel_err(m, rm) < 1e-5


def test_prefill_real_model_shape() -> None:
    """MiniMax-Text-01 per rank at tp=8 (8 heads of dim 128), default block, across one block boundary."""
    q, k, v, slopes, cu, s0 = make_batch([70, 3], h=8, d=128, seed=3)
    o, final = lightning_prefill_triton(q, k, v, slopes, cu, s0)
    ro, rs = lightning_prefill_ref(q, k, v, slopes, cu, s0)
    assert rel_err(o, ro) < 1e-5 and rel_err(final, rs) < 1e-5


def test_state_correction_turns_local_output_into_full_output() -> None:
    """O_loc + (Q * lambda^(i+1)) @ S_in equals the prefill that started from S_in."""
    lens = [1, 17, 40]
    q, k, v, slopes, cu, s_in = make_batch(lens, h=2, d=32, seed=4)
    o_loc, _ = lightning_prefill_triton(q, k, v, slopes, cu, None, block=16)
    o = lightning_state_correction_triton(o_loc, q, slopes, cu, s_in, block=16)
    check_against_recurrence(q, k, v, slopes, cu, s_in, o, lightning_prefill_ref(q, k, v, slopes, cu, s_in)[1], 1e-5)


def test_decode_continues_prefill_in_place() -> None:
    """Prefill, store the final states in pool slots, decode three tokens: equal to the recurrence over all."""
    lens, steps, h, d = [20, 5], 3, 2, 32
    q, k, v, slopes, cu, s0 = make_batch([n + steps for n in lens], h=h, d=d, seed=5)
    bounds = cu.tolist()
    pre = torch.cat([torch.arange(bounds[i], bounds[i] + n) for i, n in enumerate(lens)]).to(DEVICE)
    cu_pre = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    _, final = lightning_prefill_triton(q[pre], k[pre], v[pre], slopes, cu_pre, s0, block=16)
    pool = torch.randn(4, h, d, d, device=DEVICE)
    slots = torch.tensor([3, 1], device=DEVICE)
    pool[slots] = final
    untouched = pool[[0, 2]].clone()
    ref_pool = pool.clone()
    for step in range(steps):
        rows = torch.tensor([bounds[i] + n + step for i, n in enumerate(lens)], device=DEVICE)
        od = lightning_decode_triton(q[rows], k[rows], v[rows], slopes, pool, slots)
        rd = lightning_decode_ref(q[rows], k[rows], v[rows], slopes, ref_pool, slots)
        assert rel_err(od, rd) < 1e-5
        for i in range(len(lens)):
            s, e = bounds[i], bounds[i] + lens[i] + step + 1
            ro, rs = lightning_recurrence_fp64(q[s:e].cpu(), k[s:e].cpu(), v[s:e].cpu(), slopes.cpu(), s0[i].cpu())
            assert rel_err(od[i], ro[-1]) < 1e-5 and rel_err(pool[slots[i]], rs) < 1e-5
    assert torch.equal(pool[[0, 2]], untouched)


@gpu
@needs_cuda
@pytest.mark.parametrize("h", [64, 8])
def test_prefill_bf16_minimax_shapes(h: int) -> None:
    """bf16 at MiniMax's head dim (64 heads = tp 1, 8 = tp 8), varlen, initial states; auto segmenting."""
    lens = [1, 63, 64, 65, 1000, 3000]
    q, k, v, slopes, cu, s0 = make_batch(lens, h=h, d=128, dtype=torch.bfloat16, seed=6)
    o, final = ops.lightning_prefill(q, k, v, slopes, cu, s0)
    ro, rs = lightning_prefill_ref(q.float(), k.float(), v.float(), slopes, cu, s0)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel_err(o, ro) < 1e-2 and rel_err(final, rs) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("num_segments", [None, 1, 7])
def test_prefill_long_sequence_segments(num_segments: int | None) -> None:
    """One 20K-token sequence at tp=8 heads: the segmented path (default) and forced splits agree with the ref."""
    q, k, v, slopes, cu, s0 = make_batch([20000], h=8, d=128, dtype=torch.bfloat16, seed=7)
    o, final = lightning_prefill_triton(q, k, v, slopes, cu, s0, num_segments=num_segments)
    ro, rs = lightning_prefill_ref(q.float(), k.float(), v.float(), slopes, cu, s0)
    assert rel_err(o, ro) < 1e-2 and rel_err(final, rs) < 1e-2


@gpu
@needs_cuda
def test_correction_and_decode_bf16() -> None:
    q, k, v, slopes, cu, s_in = make_batch([1, 300, 129], h=16, d=128, dtype=torch.bfloat16, seed=8)
    o_loc, _ = ops.lightning_prefill(q, k, v, slopes, cu, None)
    o = ops.lightning_state_correction(o_loc, q, slopes, cu, s_in)
    ro, _ = lightning_prefill_ref(q.float(), k.float(), v.float(), slopes, cu, s_in)
    assert rel_err(o, ro) < 1e-2
    pool = torch.randn(8, 16, 128, 128, device=DEVICE)
    slots = torch.tensor([6, 0, 2], device=DEVICE)
    ref_pool = pool.clone()
    od = ops.lightning_decode(q[:3], k[:3], v[:3], slopes, pool, slots)
    rd = lightning_decode_ref(q[:3].float(), k[:3].float(), v[:3].float(), slopes, ref_pool, slots)
    assert rel_err(od, rd) < 1e-2 and rel_err(pool, ref_pool) < 1e-6
