"""Ring / all-gather-KV / sharded-KV attention on real gloo groups vs one full-sequence reference call.

Every rank builds the same full sequence from a seed, keeps its TP slice of heads and its SP share of rows,
and checks its own outputs against ``attention_with_lse_ref`` over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch

from server.kernels.attention_ref import attention_with_lse_ref
from server.kernels.ops import attention_runs
from server.runs import Run, runs_to_positions
from server.sp.groups import ParallelState
from server.sp.partition import zigzag_partition
from server.sp.ring_attention import allgather_kv_attention, merge_over_sp, ring_attention
from tests.helpers import FP32_TOL
from tests.sp.sp_testing import run_on_group


@dataclass
class Case:
    n_new: int  # prompt tokens split zigzag over SP (queries)
    n_prefix: int  # cached tokens before them, KV only, spread unevenly over the SP ranks
    hq: int
    hk: int
    d: int
    seed: int
    dtype: torch.dtype = torch.float32


RING_CASES = [
    Case(n_new=37, n_prefix=0, hq=4, hk=2, d=8, seed=0),  # not divisible by 2P
    Case(n_new=3, n_prefix=0, hq=4, hk=2, d=8, seed=1),  # fewer tokens than 2P: empty chunks and shards
    Case(n_new=50, n_prefix=29, hq=8, hk=2, d=16, seed=2),  # GQA 4, cached prefix
    Case(n_new=6, n_prefix=45, hq=4, hk=4, d=8, seed=3),  # short prompt after a long prefix
    Case(n_new=41, n_prefix=13, hq=4, hk=2, d=8, seed=4, dtype=torch.bfloat16),
]
# Shapes the fast GPU backend takes (flashinfer: half precision, head dim 128).
GPU_CASES = [
    Case(n_new=301, n_prefix=77, hq=8, hk=2, d=128, seed=5, dtype=torch.bfloat16),
    Case(n_new=3, n_prefix=20, hq=8, hk=2, d=128, seed=6, dtype=torch.bfloat16),
]


def _spread(positions: list[int], sp: int, g: torch.Generator) -> list[list[tuple[int, int]]]:
    """Cut consecutive ``positions`` into random pieces ``(pos_start, length)`` dealt to random ranks."""
    n = len(positions)
    cuts = sorted(torch.randint(0, n + 1, (2 * sp,), generator=g).tolist())
    bounds = [0, *cuts, n]
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(sp)]
    for s, e in pairwise(bounds):
        if e > s:
            pieces[int(torch.randint(0, sp, (1,), generator=g))].append((positions[s], e - s))
    return pieces


def _runs(pieces: list[tuple[int, int]]) -> list[Run]:
    runs, row = [], 0
    for pos, n in pieces:
        runs.append((row, n, pos))
        row += n
    return runs


def _rows(x: torch.Tensor, runs: list[Run], first_pos: int = 0) -> torch.Tensor:
    """Rows of a tensor indexed by ``position - first_pos``, laid out as ``runs`` describe."""
    return x[runs_to_positions(runs, x.device) - first_pos]


def _sees(q_runs: list[Run], kv_runs: list[Run]) -> bool:
    q_pos, k_pos = runs_to_positions(q_runs, torch.device("cpu")), runs_to_positions(kv_runs, torch.device("cpu"))
    return bool(len(q_pos) and len(k_pos) and k_pos.min() <= q_pos.max())


def _full_tensors(case: Case, n_tok: int, pstate: ParallelState):
    """q/k/v for positions 0..n_tok-1 (same on every rank), and this TP rank's head slices of them."""
    g = torch.Generator().manual_seed(case.seed)
    q = torch.randn(n_tok, case.hq, case.d, generator=g)
    k = torch.randn(n_tok, case.hk, case.d, generator=g)
    v = torch.randn(n_tok, case.hk, case.d, generator=g)
    t, hq, hk = pstate.tp_rank, case.hq // pstate.tp_size, case.hk // pstate.tp_size
    qs, ks = slice(t * hq, (t + 1) * hq), slice(t * hk, (t + 1) * hk)
    return (q, k, v), (q[:, qs], k[:, ks], v[:, ks]), qs, g


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return FP32_TOL if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


class CountingAttention:
    """``attention_runs`` that records calls and fails on a call where no key is visible to any query."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, q, k, v, q_runs, k_runs, scale):
        self.calls += 1
        q_pos, k_pos = runs_to_positions(q_runs, q.device), runs_to_positions(k_runs, q.device)
        assert len(q_pos) and len(k_pos) and k_pos.min() <= q_pos.max(), "attended to an invisible block"
        return attention_runs(q, k, v, q_runs, k_runs, scale)


def _check_prefill_case(pstate: ParallelState, case: Case) -> None:
    sp, r = pstate.sp_size, pstate.sp_rank
    total = case.n_prefix + case.n_new
    full, local, qs, g = _full_tensors(case, total, pstate)
    scale = case.d**-0.5
    positions = torch.arange(total)
    ref_o, ref_lse = attention_with_lse_ref(full[0][case.n_prefix :], full[1], full[2], positions[case.n_prefix :],
                                            positions, scale)
    ref_o, ref_lse = ref_o[:, qs], ref_lse[:, qs]

    prefix = _spread(list(range(case.n_prefix)), sp, g)
    new = [[(case.n_prefix + s, e - s) for s, e in chunks] for chunks in zigzag_partition(case.n_new, sp)]
    kv_runs = [_runs(prefix[i] + new[i]) for i in range(sp)]
    q_runs = _runs(new[r])
    q = _rows(local[0], q_runs).to(pstate.device, case.dtype)
    k, v = (_rows(t, kv_runs[r]).to(pstate.device, case.dtype) for t in local[1:])
    want_o, want_lse = _rows(ref_o, q_runs, case.n_prefix), _rows(ref_lse, q_runs, case.n_prefix)
    counter = CountingAttention()
    o_ring, lse_ring = (t.cpu() for t in ring_attention(q, k, v, q_runs, kv_runs, scale, pstate, attn_fn=counter))
    o_ag, lse_ag = (t.cpu() for t in allgather_kv_attention(q, k, v, q_runs, kv_runs, scale, pstate))

    visible = [_sees(q_runs, kv) for kv in kv_runs]
    assert counter.calls == sum(visible), f"rank {pstate.rank}: {counter.calls} attention calls, visible {visible}"
    assert o_ring.dtype == case.dtype and lse_ring.dtype == torch.float32
    tol = _tolerance(case.dtype)
    for o, lse in ((o_ring, lse_ring), (o_ag, lse_ag)):
        torch.testing.assert_close(o.float(), want_o, **tol, msg=lambda m: f"rank {pstate.rank} {case}: {m}")
        torch.testing.assert_close(lse, want_lse, **tol, msg=lambda m: f"rank {pstate.rank} {case}: {m}")
    torch.testing.assert_close(o_ring, o_ag, **tol)
    torch.testing.assert_close(lse_ring, lse_ag, **tol)


def _check_decode_case(pstate: ParallelState, case: Case, n_queries: int, all_on_rank0: bool) -> None:
    """Queries at the last ``n_queries`` positions, replicated on every SP rank; KV spread over the ranks."""
    sp, r = pstate.sp_size, pstate.sp_rank
    total = case.n_prefix + case.n_new
    full, local, qs, g = _full_tensors(case, total, pstate)
    scale = case.d**-0.5
    positions = torch.arange(total)
    q_pos = positions[total - n_queries :]
    ref_o, ref_lse = attention_with_lse_ref(full[0][q_pos], full[1], full[2], q_pos, positions, scale)

    spread = [[(0, total)]] + [[] for _ in range(sp - 1)] if all_on_rank0 else _spread(list(range(total)), sp, g)
    kv_runs = _runs(spread[r])
    q_runs = [(0, n_queries, total - n_queries)]
    q = local[0][q_pos].to(pstate.device, case.dtype)
    k, v = (_rows(t, kv_runs).to(pstate.device, case.dtype) for t in local[1:])
    # every rank attends to its shard (possibly empty), then the partials are merged over SP
    o, lse = (t.cpu() for t in merge_over_sp(*attention_runs(q, k, v, q_runs, kv_runs, scale), pstate))
    assert o.dtype == case.dtype
    tol = _tolerance(case.dtype)
    torch.testing.assert_close(o.float(), ref_o[:, qs], **tol, msg=lambda m: f"rank {pstate.rank} {case}: {m}")
    torch.testing.assert_close(lse, ref_lse[:, qs], **tol, msg=lambda m: f"rank {pstate.rank} {case}: {m}")


def _check_cases(pstate: ParallelState, cases: list[Case]) -> None:
    for case in cases:
        _check_prefill_case(pstate, case)
        _check_decode_case(pstate, case, n_queries=1, all_on_rank0=False)
        _check_decode_case(pstate, case, n_queries=3, all_on_rank0=False)
    _check_decode_case(pstate, cases[-1], n_queries=1, all_on_rank0=True)


def _worker(pstate: ParallelState) -> None:
    _check_cases(pstate, RING_CASES)


def _gpu_worker(pstate: ParallelState) -> None:
    _check_cases(pstate, RING_CASES + GPU_CASES)


@pytest.mark.slow
@pytest.mark.parametrize(("sp", "tp"), [(2, 1), (4, 1), (2, 2)])
def test_sp_attention_matches_full_sequence_reference(sp: int, tp: int) -> None:
    run_on_group(_worker, sp, tp)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_sp_attention_over_nccl() -> None:
    run_on_group(_gpu_worker, 2, 1, device_type="cuda")


def test_sp_size_one_is_one_attention_call() -> None:
    case = RING_CASES[2]
    pstate = ParallelState()
    total = case.n_prefix + case.n_new
    (q, k, v), _, _, _ = _full_tensors(case, total, pstate)
    runs: list[Run] = [(0, total, 0)]
    ref = attention_runs(q, k, v, runs, runs, 0.3)
    for fn in (ring_attention, allgather_kv_attention):
        counter = CountingAttention()
        out = fn(q, k, v, runs, [runs], 0.3, pstate, attn_fn=counter)
        assert counter.calls == 1
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_shard_rows_must_match_runs() -> None:
    q = k = v = torch.zeros(4, 1, 2)
    with pytest.raises(ValueError, match="local KV has 4 rows"):
        ring_attention(q, k, v, [(0, 4, 0)], [[(0, 3, 0)]], 1.0, ParallelState())
    with pytest.raises(ValueError, match="expected sp_size=1"):
        allgather_kv_attention(q, k, v, [(0, 4, 0)], [[(0, 4, 0)], []], 1.0, ParallelState())

