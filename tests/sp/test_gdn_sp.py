"""Gated DeltaNet and KDA SP prefill (all-gather and ring) and the conv1d halo on real gloo groups vs whole-sequence
truths.

Every rank builds the same full sequence from a seed, keeps its TP slice of heads (key heads and the value
heads they serve) and conv channels and its zigzag chunks, and checks its own output rows and the final state
against ``gdn_recurrence_fp64`` over the whole sequence, and its conv outputs and final conv state against
torch's conv1d over ``[conv state | whole sequence]``. Cases: nonzero initial states, lengths that are not
multiples of the 64-token GDN chunk, prompts shorter than 2P (empty chunks) and chunks shorter than K-1, and KDA's
per-channel gate (the same ``(T, M)`` combine, with a decay per key channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from server.kernels.gdn_ref import GDN_CHUNK, causal_conv1d_prefill_ref, gdn_chunk_affine_ref, gdn_recurrence_fp64
from server.sp.gdn_sp import GDN_SP_MODES, conv_halo_exchange, gdn_combine_states, gdn_sp_prefill
from server.sp.groups import ParallelState
from server.sp.partition import zigzag_chunks, zigzag_partition
from tests.sp.sp_testing import run_on_group

FP32_TOL = {"rtol": 2e-5, "atol": 2e-5}
HK, HV, DK, DV, KERNEL = 2, 6, 8, 12, 4


@dataclass
class Case:
    n: int
    cached_prefix: bool  # nonzero recurrent and conv states (continuing after a cached prefix)
    seed: int
    per_channel: bool = False  # KDA: one decay per key channel


CASES = [
    Case(n=37, cached_prefix=False, seed=0),
    Case(n=3, cached_prefix=True, seed=1),  # fewer tokens than 2P: empty chunks, halo reaches into the state
    Case(n=13, cached_prefix=True, seed=2),  # chunks of 1-2 tokens at sp=4: shorter than K-1
    Case(n=4 * (GDN_CHUNK + 3) + 1, cached_prefix=True, seed=3),  # chunks cross 64-token GDN chunks
    Case(n=13, cached_prefix=True, seed=4, per_channel=True),
    Case(n=2 * (GDN_CHUNK + 5) + 3, cached_prefix=True, seed=5, per_channel=True),
]


def _inputs(case: Case) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(case.seed)
    q, k = torch.randn(case.n, HK, DK, generator=g), torch.randn(case.n, HK, DK, generator=g)
    v = torch.randn(case.n, HV, DV, generator=g)
    gate_shape = (case.n, HV, DK) if case.per_channel else (case.n, HV)
    decay, beta = -2 * torch.rand(*gate_shape, generator=g) ** 2, torch.rand(case.n, HV, generator=g)
    scale = 0.5 if case.cached_prefix else 0.0
    s0 = torch.randn(HV, DK, DV, generator=g) * scale
    x = torch.randn(case.n, 2 * DK, generator=g)  # conv inputs, 2 x DK channels split over TP
    w = torch.randn(2 * DK, KERNEL, generator=g)
    conv0 = torch.randn(2 * DK, KERNEL - 1, generator=g) * scale
    return q, k, v, decay, beta, s0, x, w, conv0


def _check_case(pstate: ParallelState, case: Case) -> None:
    sp, r, tp, tr = pstate.sp_size, pstate.sp_rank, pstate.tp_size, pstate.tp_rank
    q, k, v, decay, beta, s0, x, w, conv0 = _inputs(case)
    ref_o, ref_state = gdn_recurrence_fp64(q, k, v, decay, beta, s0)
    ref_conv = F.conv1d(torch.cat([conv0, x.t()], 1)[None], w[:, None], groups=2 * DK)[0].t()
    ref_conv_state = torch.cat([conv0, x.t()], 1)[:, -(KERNEL - 1):]
    hk, hv, ch = (slice(tr * n // tp, (tr + 1) * n // tp) for n in (HK, HV, 2 * DK))
    (a0, a1), (b0, b1) = zigzag_partition(case.n, sp)[r]
    rows = torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)])
    local_chunks = [(0, a1 - a0, r), (a1 - a0, b1 - b0, 2 * sp - 1 - r)]
    chunk_lens = [e - s for s, e in zigzag_chunks(case.n, sp)]
    msg = lambda m: f"rank {pstate.rank} {case}: {m}"

    halos, conv_final = conv_halo_exchange(x[rows][:, ch], local_chunks, chunk_lens, conv0[ch], pstate)
    cu = torch.tensor([0, a1 - a0, rows.numel()])
    y, _ = causal_conv1d_prefill_ref(x[rows][:, ch], w[ch], None, cu, halos)
    torch.testing.assert_close(y, ref_conv[rows][:, ch], **FP32_TOL, msg=msg("conv outputs"))
    torch.testing.assert_close(conv_final, ref_conv_state[ch], **FP32_TOL, msg=msg("final conv state"))

    results = {}
    for mode in GDN_SP_MODES:
        o, state = gdn_sp_prefill(q[rows][:, hk], k[rows][:, hk], v[rows][:, hv], decay[rows][:, hv],
                                  beta[rows][:, hv], local_chunks, chunk_lens, s0[hv], pstate, mode=mode)
        assert o.dtype == torch.float32 and state.dtype == torch.float32
        torch.testing.assert_close(o, ref_o[rows][:, hv].float(), **FP32_TOL, msg=msg(f"{mode} outputs"))
        torch.testing.assert_close(state, ref_state[hv].float(), **FP32_TOL, msg=msg(f"{mode} final state"))
        results[mode] = (o, state)
    torch.testing.assert_close(results["ring"], results["allgather"], **FP32_TOL)


def _worker(pstate: ParallelState) -> None:
    for case in CASES:
        _check_case(pstate, case)


@pytest.mark.slow
@pytest.mark.parametrize(("sp", "tp"), [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_gdn_sp_matches_fp64_recurrence(sp: int, tp: int) -> None:
    run_on_group(_worker, sp, tp)


def test_sp_size_one_is_one_prefill_and_combine_chains_chunks() -> None:
    """sp=1 is one prefill from the initial state; the scan of per-chunk (M, T) gives the true incoming states."""
    case = CASES[3]
    q, k, v, decay, beta, s0, *_ = _inputs(case)
    ref_o, ref_state = gdn_recurrence_fp64(q, k, v, decay, beta, s0)
    n0 = case.n // 2
    o, state = gdn_sp_prefill(q, k, v, decay, beta, [(0, n0, 0), (n0, case.n - n0, 1)], [n0, case.n - n0], s0,
                              ParallelState())
    torch.testing.assert_close(o, ref_o.float(), **FP32_TOL)
    torch.testing.assert_close(state, ref_state.float(), **FP32_TOL)

    bounds = [0, 5, 5, 70, case.n]  # includes an empty chunk
    cu = torch.tensor(bounds)
    _, _, ms, ts = gdn_chunk_affine_ref(q, k, v, decay, beta, cu)
    incoming, final = gdn_combine_states(s0, list(ms), list(ts))
    for s, s_in in zip(bounds[:-1], incoming, strict=True):
        want = gdn_recurrence_fp64(q[:s], k[:s], v[:s], decay[:s], beta[:s], s0)[1]
        torch.testing.assert_close(s_in, want.float(), **FP32_TOL)
    torch.testing.assert_close(final, ref_state.float(), **FP32_TOL)


def test_rejects_unknown_mode() -> None:
    x = torch.zeros(2, HK, DK)
    with pytest.raises(ValueError, match="GDN SP mode"):
        gdn_sp_prefill(x, x, torch.zeros(2, HV, DV), torch.zeros(2, HV), torch.zeros(2, HV), [(0, 2, 0)], [2],
                       torch.zeros(HV, DK, DV), ParallelState(), "p2p")
