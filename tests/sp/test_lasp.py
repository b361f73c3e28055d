"""LASP (ring and LASP-2 all-gather) on real gloo groups vs the fp64 token-by-token recurrence.

Every rank builds the same full sequence from a seed, keeps its TP slice of heads and its zigzag chunks, and
checks its output rows and the final state against ``lightning_recurrence_fp64`` over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch

from server.kernels.lightning_ref import lightning_recurrence_fp64
from server.kernels.ops import LIGHTNING_BLOCK
from server.sp.groups import ParallelState
from server.sp.lasp import LASP_MODES, lasp_combine_states, lasp_prefill
from server.sp.partition import zigzag_chunks, zigzag_partition
from tests.helpers import FP32_TOL, run_on_group

SLOPES = torch.tensor([0.9, 0.3, 0.08, 0.02])  # ALiBi-like spread: short and long memories


@dataclass
class Case:
    n: int
    d: int
    cached_prefix: bool  # start from a nonzero state (continuing after a cached prefix)
    seed: int


CASES = [
    Case(n=37, d=8, cached_prefix=False, seed=0),
    Case(n=3, d=8, cached_prefix=True, seed=1),  # fewer tokens than 2P: empty chunks
    Case(n=5, d=8, cached_prefix=True, seed=2),
    Case(n=8 * (LIGHTNING_BLOCK + 2) + 3, d=16, cached_prefix=True, seed=3),  # chunks cross kernel blocks
]
GPU_CASES = [Case(n=1000, d=128, cached_prefix=True, seed=4)]


def _inputs(case: Case) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(case.seed)
    h = len(SLOPES)
    q, k, v = (torch.randn(case.n, h, case.d, generator=g) * 0.5 for _ in range(3))
    init = torch.randn(h, case.d, case.d, generator=g) if case.cached_prefix else torch.zeros(h, case.d, case.d)
    return q, k, v, init


def _check_case(pstate: ParallelState, case: Case) -> None:
    sp, r = pstate.sp_size, pstate.sp_rank
    q, k, v, init = _inputs(case)
    ref_o, ref_state = lightning_recurrence_fp64(q, k, v, SLOPES, init)
    hs = slice(pstate.tp_rank * len(SLOPES) // pstate.tp_size, (pstate.tp_rank + 1) * len(SLOPES) // pstate.tp_size)
    (a0, a1), (b0, b1) = zigzag_partition(case.n, sp)[r]
    rows = torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)])
    local_chunks = [(0, a1 - a0, r), (a1 - a0, b1 - b0, 2 * sp - 1 - r)]
    chunk_lens = [e - s for s, e in zigzag_chunks(case.n, sp)]
    results = {}
    for mode in LASP_MODES:
        q_loc, k_loc, v_loc = (t[rows][:, hs].to(pstate.device) for t in (q, k, v))
        o, state = lasp_prefill(q_loc, k_loc, v_loc, SLOPES[hs].to(pstate.device), local_chunks, chunk_lens,
                                init[hs].to(pstate.device), pstate, mode=mode)
        o, state = o.cpu(), state.cpu()
        msg = lambda m, mode=mode: f"rank {pstate.rank} {mode} {case}: {m}"
        assert o.dtype == torch.float32 and state.dtype == torch.float32
        torch.testing.assert_close(o, ref_o[rows][:, hs].float(), **FP32_TOL, msg=msg)
        torch.testing.assert_close(state, ref_state[hs].float(), **FP32_TOL, msg=msg)
        results[mode] = (o, state)
    torch.testing.assert_close(results["ring"], results["allgather"], **FP32_TOL)


def _worker(pstate: ParallelState) -> None:
    for case in CASES:
        _check_case(pstate, case)


def _gpu_worker(pstate: ParallelState) -> None:
    for case in CASES + GPU_CASES:
        _check_case(pstate, case)


@pytest.mark.slow
@pytest.mark.parametrize(("sp", "tp"), [(2, 1), (4, 1), (2, 2)])
def test_lasp_matches_fp64_recurrence(sp: int, tp: int) -> None:
    run_on_group(_worker, sp, tp)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_lasp_over_nccl() -> None:
    run_on_group(_gpu_worker, 2, 1, device_type="cuda")


def test_sp_size_one_is_one_prefill_from_the_initial_state() -> None:
    case = CASES[3]
    q, k, v, init = _inputs(case)
    ref_o, ref_state = lightning_recurrence_fp64(q, k, v, SLOPES, init)
    chunk_lens = [e - s for s, e in zigzag_chunks(case.n, 1)]
    o, state = lasp_prefill(q, k, v, SLOPES, [(0, chunk_lens[0], 0), (chunk_lens[0], chunk_lens[1], 1)], chunk_lens,
                            init, ParallelState())
    torch.testing.assert_close(o, ref_o.float(), **FP32_TOL)
    torch.testing.assert_close(state, ref_state.float(), **FP32_TOL)


def test_combine_states_chains_chunks_like_the_recurrence() -> None:
    """Scanning per-chunk zero-state finals (M) with decays gives each chunk's true incoming state."""
    case = CASES[3]
    q, k, v, init = _inputs(case)
    bounds = [0, 5, 5, 70, 71, case.n]  # includes an empty chunk
    lens = [e - s for s, e in pairwise(bounds)]
    ms = [lightning_recurrence_fp64(q[s:e], k[s:e], v[s:e], SLOPES)[1].float() for s, e in pairwise(bounds)]
    incoming, final = lasp_combine_states(init, ms, lens, SLOPES)
    for s, s_in in zip(bounds[:-1], incoming, strict=True):
        want = lightning_recurrence_fp64(q[:s], k[:s], v[:s], SLOPES, init)[1] if s else init.double()
        torch.testing.assert_close(s_in, want.float(), **FP32_TOL)
    torch.testing.assert_close(final, lightning_recurrence_fp64(q, k, v, SLOPES, init)[1].float(), **FP32_TOL)


def test_rejects_unknown_mode_and_foreign_chunks() -> None:
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="LASP mode"):
        lasp_prefill(x, x, x, SLOPES, [(0, 1, 0), (1, 1, 1)], [1, 1], torch.zeros(4, 8, 8), ParallelState(), "p2p")
    two_ranks = ParallelState(sp_size=2, sp_ranks=(0, 1))
    with pytest.raises(ValueError, match="owns chunks 0 and 3"):
        lasp_prefill(x, x, x, SLOPES, [(0, 1, 0), (1, 1, 1)], [1, 1, 0, 0], torch.zeros(4, 8, 8), two_ranks)
