"""Ulysses and Ulysses x ring (USP) on real gloo groups vs full-sequence references.

Every rank builds the same full sequence from a seed, keeps its TP slice of heads and its zigzag chunks, runs the
U x R mesh, and checks its own output rows (all of its TP rank's heads), LSE, head-sharded KV and final lightning
state against single-process references over the whole sequence: softmax attention in fp64 with a causal mask
(torch's ``scaled_dot_product_attention``) and ``lightning_recurrence_fp64``; Gated DeltaNet (conv1d included)
against torch's conv1d and ``gdn_recurrence_fp64``, with the TP rank's full final states on every rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, pairwise

import pytest
import torch
import torch.nn.functional as F

from server.kernels.gdn_ref import GDN_CHUNK, gdn_recurrence_fp64
from server.kernels.lightning_ref import lightning_recurrence_fp64
from server.kernels.ops import LIGHTNING_BLOCK, attention_runs
from server.runs import Run, runs_to_positions, stack_runs
from server.sp.gdn_sp import GDN_SP_MODES
from server.sp.groups import ParallelState
from server.sp.lasp import LASP_MODES
from server.sp.partition import zigzag_chunks, zigzag_partition
from server.sp.ring_attention import merge_over_sp
from server.sp.ulysses import (
    UlyssesMesh,
    gather_heads,
    heads_to_seq,
    init_ulysses_mesh,
    qkv_seq_to_heads,
    seq_to_heads,
    ulysses_kv_heads,
)
from server.sp.ulysses_attention import HeadShardedKV, ulysses_attention
from server.sp.ulysses_gdn import ulysses_gdn_prefill
from server.sp.ulysses_lightning import ulysses_lightning_prefill
from tests.helpers import FP32_TOL
from tests.sp.sp_testing import run_on_group

BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}
# (sp, ulysses_degree, tp): R = 1 with U = 2 and 4 (KV heads replicated), R = 2 (Ulysses x ring) with tp = 2
MESHES = [(2, 2, 1), (2, 2, 2), (4, 4, 1), (4, 2, 2)]
SLOPES = torch.tensor([0.9, 0.5, 0.3, 0.15, 0.08, 0.04, 0.02, 0.01])  # 8 lightning heads, short and long memories


@dataclass
class AttnCase:
    n_new: int  # prompt tokens split zigzag over SP (queries)
    n_prefix: int  # cached tokens before them, head-sharded KV spread unevenly over the ring groups
    hq: int
    hk: int
    d: int
    seed: int
    dtype: torch.dtype = torch.float32


ATTN_CASES = [
    AttnCase(n_new=37, n_prefix=0, hq=8, hk=2, d=8, seed=0),  # not divisible by 2P; KV heads < U on most meshes
    AttnCase(n_new=3, n_prefix=0, hq=8, hk=4, d=8, seed=1),  # fewer tokens than 2P: empty chunks and shards
    AttnCase(n_new=29, n_prefix=23, hq=8, hk=8, d=16, seed=2),  # cached prefix, MHA
    AttnCase(n_new=41, n_prefix=13, hq=8, hk=2, d=8, seed=3, dtype=torch.bfloat16),
]

# Shapes the fast GPU kernels take (half precision, head dim 128).
GPU_ATTN_CASES = [AttnCase(n_new=301, n_prefix=77, hq=8, hk=2, d=128, seed=4, dtype=torch.bfloat16)]


@dataclass
class LightningCase:
    n: int
    d: int
    cached_prefix: bool  # start from a nonzero state
    seed: int


LIGHTNING_CASES = [
    LightningCase(n=37, d=8, cached_prefix=False, seed=0),
    LightningCase(n=5, d=8, cached_prefix=True, seed=1),  # fewer tokens than 2P on sp = 4
    LightningCase(n=2 * (LIGHTNING_BLOCK + 3) + 5, d=8, cached_prefix=True, seed=2),  # chunks cross kernel blocks
]
GPU_LIGHTNING_CASES = [LightningCase(n=1000, d=128, cached_prefix=True, seed=3)]

# GDN: 2 key heads serve 8 value heads, so at U = 4 (and at tp = 2 with U = 2) the key heads are replicated
GDN_HK, GDN_HV, GDN_DK, GDN_DV, GDN_KERNEL = 2, 8, 8, 4, 4


@dataclass
class GDNCase:
    n: int
    cached_prefix: bool  # start from nonzero recurrent and conv states
    seed: int
    per_channel: bool = False  # KDA: one decay per key channel


GDN_CASES = [
    GDNCase(n=37, cached_prefix=False, seed=0),
    GDNCase(n=5, cached_prefix=True, seed=1),  # fewer tokens than 2P, chunks shorter than K-1
    GDNCase(n=2 * (GDN_CHUNK + 3) + 5, cached_prefix=True, seed=2),  # crosses 64-token GDN chunks
    GDNCase(n=23, cached_prefix=True, seed=3, per_channel=True),
]


def _runs(pieces: list[tuple[int, int]]) -> list[Run]:
    """Runs of rows holding the position ranges ``(start, end)`` back to back."""
    runs, row = [], 0
    for s, e in pieces:
        runs.append((row, e - s, s))
        row += e - s
    return runs


def _tp_heads(n_heads: int, pstate: ParallelState) -> slice:
    per = n_heads // pstate.tp_size
    return slice(pstate.tp_rank * per, (pstate.tp_rank + 1) * per)


def _check_mesh(pstate: ParallelState, mesh: UlyssesMesh) -> None:
    """Ranks, indices and the groups' members, the latter by real collectives over each group."""
    u, tp, t = mesh.ulysses_degree, pstate.tp_size, pstate.tp_rank
    g, j = divmod(pstate.sp_rank, u)
    assert (mesh.sp_size, mesh.sp_rank, mesh.ring_rank, mesh.ulysses_rank) == (pstate.sp_size, pstate.sp_rank, g, j)
    uly = [(g * u + i) * tp + t for i in range(u)]
    ring = [(i * u + j) * tp + t for i in range(pstate.sp_size // u)]
    assert list(mesh.ulysses_ranks) == uly and list(mesh.ring.sp_ranks) == ring
    me = torch.tensor([[pstate.rank]], device=pstate.device)
    assert gather_heads(me, mesh.ulysses_group).flatten().tolist() == uly
    assert [int(x) for x in mesh.ring.sp_all_gather(me)] == ring


def _check_repartition(pstate: ParallelState, mesh: UlyssesMesh) -> None:
    """seq_to_heads against each member's rows (regenerated from seeds), the exact round trip, and the packed q/k/v
    with KV heads replicated."""
    u, j, group = mesh.ulysses_degree, mesh.ulysses_rank, mesh.ulysses_group
    counts = [[5, 0, 3, 7][(i + mesh.ring_rank) % 4] for i in range(u)]

    def rows_of_member(i: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * pstate.tp_rank + 10 * mesh.group_sp_ranks(mesh.ring_rank)[i] + heads)
        return torch.randn(counts[i], heads, 3, generator=g).to(pstate.device, dtype)

    for dtype in (torch.float32, torch.bfloat16):
        h = 2 * u
        x = rows_of_member(j, h, dtype)
        y = seq_to_heads(x, counts, group)
        want = torch.cat([rows_of_member(i, h, dtype)[:, j * 2 : (j + 1) * 2] for i in range(u)])
        assert torch.equal(y, want)
        assert torch.equal(heads_to_seq(y, counts, group), x)
        assert torch.equal(heads_to_seq(y[:, :, 0], counts, group), x[:, :, 0])  # no trailing dims
    hq, hk = 2 * u, 1  # one KV head: every Ulysses rank needs it
    kv_heads = ulysses_kv_heads(hq, hk, u)
    assert kv_heads == [0] * u
    q_h, k_h, v_h = qkv_seq_to_heads(rows_of_member(j, hq, torch.float32), rows_of_member(j, hk, torch.float32),
                                     2 * rows_of_member(j, hk, torch.float32), kv_heads, counts, group)
    assert torch.equal(q_h, torch.cat([rows_of_member(i, hq, torch.float32)[:, 2 * j : 2 * j + 2] for i in range(u)]))
    assert torch.equal(k_h, torch.cat([rows_of_member(i, hk, torch.float32) for i in range(u)]))
    assert torch.equal(v_h, 2 * k_h)


def _attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 softmax attention with the position mask, GQA by repeating KV heads; lse in base 2."""
    rep = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.double().transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
    mask = k_pos.view(1, -1) <= q_pos.view(-1, 1)
    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale).transpose(0, 1)
    scores = (qd @ kd.transpose(1, 2) * scale).masked_fill(~mask, -math.inf)
    return o, (torch.logsumexp(scores, dim=-1) / math.log(2)).transpose(0, 1)


def _spread(n: int, parts: int, g: torch.Generator) -> list[list[tuple[int, int]]]:
    """Positions ``[0, n)`` cut at random into pieces dealt to random parts."""
    bounds = [0, *sorted(torch.randint(0, n + 1, (2 * parts,), generator=g).tolist()), n]
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    for s, e in pairwise(bounds):
        if e > s:
            pieces[int(torch.randint(0, parts, (1,), generator=g))].append((s, e))
    return pieces


def _check_attention(pstate: ParallelState, mesh: UlyssesMesh, case: AttnCase) -> None:
    p, u, r_deg = mesh.sp_size, mesh.ulysses_degree, mesh.ring_degree
    total = case.n_prefix + case.n_new
    g = torch.Generator().manual_seed(case.seed)
    q, k, v = (torch.randn(total, h, case.d, generator=g).to(case.dtype) for h in (case.hq, case.hk, case.hk))
    qs, ks = _tp_heads(case.hq, pstate), _tp_heads(case.hk, pstate)
    q, k, v = q[:, qs], k[:, ks], v[:, ks]
    scale = case.d**-0.5
    positions = torch.arange(total)
    ref_o, ref_lse = _attention_reference(q[case.n_prefix :], k, v, positions[case.n_prefix :], positions, scale)

    new = [[(case.n_prefix + s, case.n_prefix + e) for s, e in chunks] for chunks in zigzag_partition(case.n_new, p)]
    runs_per_rank = [_runs(pieces) for pieces in new]
    rows = runs_to_positions(runs_per_rank[mesh.sp_rank], torch.device("cpu"))
    kv_heads = ulysses_kv_heads(q.shape[1], k.shape[1], u)
    n_kv = len(kv_heads) // u
    mine = kv_heads[mesh.ulysses_rank * n_kv : (mesh.ulysses_rank + 1) * n_kv]
    prefix = None
    if case.n_prefix:
        prefix_runs = [_runs(pieces) for pieces in _spread(case.n_prefix, r_deg, g)]
        prefix_rows = runs_to_positions(prefix_runs[mesh.ring_rank], torch.device("cpu"))
        prefix = HeadShardedKV(k[prefix_rows][:, mine].to(pstate.device), v[prefix_rows][:, mine].to(pstate.device),
                               prefix_runs)
    dev = pstate.device
    out = ulysses_attention(q[rows].to(dev), k[rows].to(dev), v[rows].to(dev), runs_per_rank, scale, mesh, prefix,
                            return_lse=True)
    out_o, out_lse, out_k, out_v = (t.cpu() for t in (out.o, out.lse, out.kv.k, out.kv.v))

    tol = FP32_TOL if case.dtype == torch.float32 else BF16_TOL
    msg = lambda m: f"rank {pstate.rank} {case}: {m}"  # noqa: E731
    assert out_o.dtype == case.dtype and out_lse.dtype == torch.float32
    torch.testing.assert_close(out_o.double(), ref_o[rows - case.n_prefix], **tol, msg=msg)
    torch.testing.assert_close(out_lse.double(), ref_lse[rows - case.n_prefix], **tol, msg=msg)
    # The new KV, head-sharded: this rank's KV heads of its ring group's tokens, in position order (two runs).
    for ring_idx, kv_runs in enumerate(out.kv.runs_per_ring):
        group_pos = torch.cat([runs_to_positions(runs_per_rank[s], torch.device("cpu"))
                               for s in mesh.group_sp_ranks(ring_idx)])
        assert torch.equal(runs_to_positions(kv_runs, torch.device("cpu")), group_pos.sort().values)
        assert len(kv_runs) <= 2 and [row for row, _, _ in kv_runs] == [0, *accumulate(n for _, n, _ in kv_runs)][:-1]
    kv_pos = runs_to_positions(out.kv.runs_per_ring[mesh.ring_rank], torch.device("cpu"))
    assert torch.equal(out_k, k[kv_pos][:, mine]) and torch.equal(out_v, v[kv_pos][:, mine])
    _check_decode(pstate, mesh, q, out.kv, prefix, scale, tol, ref_o[-3:], msg)


def _check_decode(
    pstate: ParallelState, mesh: UlyssesMesh, q: torch.Tensor, kv: HeadShardedKV, prefix: HeadShardedKV | None,
    scale: float, tol: dict[str, float], ref_o: torch.Tensor, msg: Callable[[str], str],
) -> None:
    """Decode from the layout the prefill left: the last 3 positions' queries on every rank, this rank's query heads
    against its KV (its heads, its ring group's tokens), merged over the ring group, heads gathered over Ulysses."""
    h_u = q.shape[1] // mesh.ulysses_degree
    q_dec = q[-3:, mesh.ulysses_rank * h_u : (mesh.ulysses_rank + 1) * h_u].to(pstate.device)
    k_loc, v_loc, runs = kv.k, kv.v, kv.runs_per_ring[mesh.ring_rank]
    if prefix is not None:
        k_loc, v_loc = torch.cat([prefix.k, k_loc]), torch.cat([prefix.v, v_loc])
        runs = stack_runs([prefix.runs_per_ring[mesh.ring_rank], runs])
    o, lse = attention_runs(q_dec, k_loc, v_loc, [(0, 3, q.shape[0] - 3)], runs, scale)
    o, _ = merge_over_sp(o, lse, mesh.ring)
    torch.testing.assert_close(gather_heads(o, mesh.ulysses_group).cpu().double(), ref_o, **tol, msg=msg)


def _check_lightning(pstate: ParallelState, mesh: UlyssesMesh, case: LightningCase) -> None:
    p, r = mesh.sp_size, mesh.sp_rank
    h = len(SLOPES)
    g = torch.Generator().manual_seed(case.seed)
    q, k, v = (torch.randn(case.n, h, case.d, generator=g) * 0.5 for _ in range(3))
    init = torch.randn(h, case.d, case.d, generator=g) if case.cached_prefix else torch.zeros(h, case.d, case.d)
    ref_o, ref_state = lightning_recurrence_fp64(q, k, v, SLOPES, init)
    hs = _tp_heads(h, pstate)
    h_u = (hs.stop - hs.start) // mesh.ulysses_degree
    hu = slice(hs.start + mesh.ulysses_rank * h_u, hs.start + (mesh.ulysses_rank + 1) * h_u)
    (a0, a1), (b0, b1) = zigzag_partition(case.n, p)[r]
    rows = torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)])
    chunk_lens = [e - s for s, e in zigzag_chunks(case.n, p)]
    for mode in LASP_MODES:
        q_loc, k_loc, v_loc = (t[rows][:, hs].to(pstate.device) for t in (q, k, v))
        o, state = ulysses_lightning_prefill(q_loc, k_loc, v_loc, SLOPES[hs].to(pstate.device), chunk_lens,
                                             init[hu].to(pstate.device), mesh, mode=mode)
        o, state = o.cpu(), state.cpu()
        msg = lambda m, mode=mode: f"rank {pstate.rank} {mode} {case}: {m}"  # noqa: E731
        assert o.dtype == torch.float32 and state.dtype == torch.float32
        torch.testing.assert_close(o.double(), ref_o[rows][:, hs], **FP32_TOL, msg=msg)
        torch.testing.assert_close(state.double(), ref_state[hu], **FP32_TOL, msg=msg)


def _check_gdn(pstate: ParallelState, mesh: UlyssesMesh, case: GDNCase) -> None:
    """Conv1d + SiLU + gated delta rule from nonzero states against torch's conv1d over ``[conv state | sequence]``
    and the fp64 recurrence; every rank must end with the TP rank's full recurrent and conv states."""
    p, r, n = mesh.sp_size, mesh.sp_rank, case.n
    g = torch.Generator().manual_seed(case.seed)
    scale = 0.5 if case.cached_prefix else 0.0
    hk, hv = _tp_heads(GDN_HK, pstate), _tp_heads(GDN_HV, pstate)
    x_q, x_k = (torch.randn(n, GDN_HK, GDN_DK, generator=g)[:, hk].flatten(1) for _ in range(2))
    x = torch.cat([x_q, x_k, torch.randn(n, GDN_HV, GDN_DV, generator=g)[:, hv].flatten(1)], dim=1)  # [q | k | v]
    c = x.shape[1]
    w = torch.randn(c, GDN_KERNEL, generator=g)
    conv0 = torch.randn(c, GDN_KERNEL - 1, generator=g) * scale
    gate_shape = (n, GDN_HV, GDN_DK) if case.per_channel else (n, GDN_HV)
    decay, beta = -2 * torch.rand(*gate_shape, generator=g)[:, hv] ** 2, torch.rand(n, GDN_HV, generator=g)[:, hv]
    s0 = torch.randn(GDN_HV, GDN_DK, GDN_DV, generator=g)[hv] * scale
    full = torch.cat([conv0, x.t()], dim=1)
    y = F.silu(F.conv1d(full[None], w[:, None], groups=c)[0].t())
    n_k, n_v = hk.stop - hk.start, hv.stop - hv.start
    q, k, v = y.split([n_k * GDN_DK, n_k * GDN_DK, n_v * GDN_DV], dim=1)
    ref_o, ref_state = gdn_recurrence_fp64(q.reshape(n, n_k, GDN_DK), k.reshape(n, n_k, GDN_DK),
                                           v.reshape(n, n_v, GDN_DV), decay, beta, s0)
    (a0, a1), (b0, b1) = zigzag_partition(n, p)[r]
    rows = torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)])
    chunk_lens = [e - s for s, e in zigzag_chunks(n, p)]
    dev = pstate.device
    for mode in GDN_SP_MODES:
        o, state, conv_state = ulysses_gdn_prefill(x[rows].to(dev), w.to(dev), decay[rows].to(dev),
                                                   beta[rows].to(dev), n_k, GDN_DK, chunk_lens, s0.to(dev),
                                                   conv0.to(dev), mesh, mode=mode)
        msg = lambda m, mode=mode: f"rank {pstate.rank} {mode} {case}: {m}"  # noqa: E731
        torch.testing.assert_close(o.cpu().double(), ref_o[rows], **FP32_TOL, msg=msg)
        torch.testing.assert_close(state.cpu().double(), ref_state, **FP32_TOL, msg=msg)
        torch.testing.assert_close(conv_state.cpu(), full[:, -(GDN_KERNEL - 1) :], **FP32_TOL, msg=msg)


def _worker(pstate: ParallelState, ulysses_degree: int, gpu_cases: bool = False) -> None:
    mesh = init_ulysses_mesh(pstate, ulysses_degree)
    _check_mesh(pstate, mesh)
    _check_repartition(pstate, mesh)
    for case in ATTN_CASES + (GPU_ATTN_CASES if gpu_cases else []):
        _check_attention(pstate, mesh, case)
    for case in LIGHTNING_CASES + (GPU_LIGHTNING_CASES if gpu_cases else []):
        _check_lightning(pstate, mesh, case)
    for case in GDN_CASES:
        _check_gdn(pstate, mesh, case)


@pytest.mark.slow
@pytest.mark.parametrize(("sp", "ulysses_degree", "tp"), MESHES)
def test_ulysses_matches_full_sequence_references(sp: int, ulysses_degree: int, tp: int) -> None:
    run_on_group(functools.partial(_worker, ulysses_degree=ulysses_degree), sp, tp)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ulysses_over_nccl() -> None:
    run_on_group(functools.partial(_worker, ulysses_degree=2, gpu_cases=True), 2, 1, device_type="cuda")


def test_single_rank_mesh_is_one_attention_call() -> None:
    mesh = init_ulysses_mesh(ParallelState(), 1)
    case = ATTN_CASES[2]
    g = torch.Generator().manual_seed(case.seed)
    q, k, v = (torch.randn(case.n_new, h, case.d, generator=g) for h in (case.hq, case.hk, case.hk))
    runs: list[Run] = [(0, case.n_new, 0)]
    out = ulysses_attention(q, k, v, [runs], 0.3, mesh, return_lse=True)
    o, lse = attention_runs(q, k, v, runs, runs, 0.3)
    assert torch.equal(out.o, o) and torch.equal(out.lse, lse)
    assert out.kv.k is k and out.kv.runs_per_ring == [runs]


def test_heads_that_do_not_split_give_an_actionable_error() -> None:
    with pytest.raises(ValueError, match=r"6 query heads per TP rank .*--tp-size.*--ulysses-degree=4"):
        ulysses_kv_heads(6, 2, 4)
    with pytest.raises(ValueError, match=r"3 KV heads .*neither a multiple nor a divisor of --ulysses-degree=2"):
        ulysses_kv_heads(6, 3, 2)
    with pytest.raises(ValueError, match=r"3 heads per TP rank .*--ulysses-degree=2"):
        seq_to_heads(torch.zeros(4, 3, 2), [4, 0], None)
    # the layer entry points check before any communication: a mesh of two ranks without groups suffices
    mesh = UlyssesMesh(2, 0, None, (0, 1), ParallelState())
    x = torch.zeros(4, 3, 8)
    with pytest.raises(ValueError, match="--ulysses-degree=2"):
        ulysses_attention(x, x, x, [[(0, 4, 0)], []], 1.0, mesh)
    with pytest.raises(ValueError, match="--ulysses-degree=2"):
        ulysses_lightning_prefill(x, x, x, SLOPES[:3], [2, 0, 0, 2], torch.zeros(1, 8, 8), mesh)
    with pytest.raises(ValueError, match=r"3 Gated DeltaNet value heads per TP rank .*--ulysses-degree=2"):
        ulysses_gdn_prefill(torch.zeros(4, 2 * 8 + 3 * 4), torch.zeros(28, 4), torch.zeros(4, 3), torch.zeros(4, 3),
                            1, 8, [2, 0, 0, 2], torch.zeros(3, 8, 4), torch.zeros(28, 3), mesh)
    with pytest.raises(ValueError, match="--ulysses-degree=3 must be >= 1 and divide --sp-size=4"):
        init_ulysses_mesh(ParallelState(sp_size=4, sp_ranks=(0, 1, 2, 3)), 3)


def test_kv_heads_split_or_replicate_by_query_group() -> None:
    assert ulysses_kv_heads(8, 8, 4) == list(range(8))  # MHA: like the query heads
    assert ulysses_kv_heads(8, 4, 2) == [0, 1, 2, 3]  # rank 0 gets KV 0-1 (for q 0-3), rank 1 KV 2-3
    assert ulysses_kv_heads(8, 2, 4) == [0, 0, 1, 1]  # q 0-1, 2-3 use KV 0; q 4-5, 6-7 use KV 1
    assert ulysses_kv_heads(4, 1, 4) == [0, 0, 0, 0]
