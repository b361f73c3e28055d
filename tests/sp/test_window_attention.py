"""Sliding-window attention by KV halo and attention sinks under SP, on real gloo groups, against one fp64
full-sequence softmax (window mask by position, the sink logit in every denominator, as transformers' gpt-oss
computes it).

Every rank builds the same sequence from a seed; a cached prefix is spread unevenly over the ranks in random
pieces, the new tokens are split zigzag. Each rank checks its own rows: the prefill by :func:`window_attention`
then the sink, the same rows by the pass-KV ring (a full-attention layer) then the sink, and decode queries (the
same on every rank) attended on each rank's shard, merged over SP, then the sink. The partials alone (no sink)
must match the reference without a sink, so the sink is counted once.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from server.kernels.ops import attention_runs
from server.kernels.sinks import apply_attention_sinks
from server.runs import runs_to_positions
from server.sp.groups import ParallelState
from server.sp.partition import zigzag_partition
from server.sp.ring_attention import merge_over_sp, ring_attention
from server.sp.window_attention import window_attention
from tests.helpers import FP32_TOL, needs_flashinfer, run_on_group
from tests.sp.test_ring_attention import _runs, _spread

pytestmark = pytest.mark.slow

# (new tokens, cached prefix, window): pieces shorter than the window (halo over several chunks and ranks), a
# window longer than the whole prompt, a prompt shorter than 2P, a window of 1 (no halo at all)
CASES = [(61, 0, 16), (45, 37, 8), (30, 11, 200), (3, 20, 5), (40, 9, 1)]
HQ, HK, D = 4, 2, 8


def reference_fp64(q, k, v, q_pos, k_pos, window: int, sinks: torch.Tensor | None):
    """o, natural-log lse of softmax attention with the window mask and an optional sink column, in fp64."""
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kf) * D**-0.5
    visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
    s = s.masked_fill(~visible, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(-1, s.shape[1], 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])[..., : k.shape[0]]
    return torch.einsum("hqk,khd->qhd", p, vf), lse.T


def _counting_attention(keys_read: list[int], q, k, v, q_runs, k_runs, scale, window=None):
    keys_read.append(k.shape[0])
    return attention_runs(q, k, v, q_runs, k_runs, scale, window)


def _read_rows(k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return k[rows], v[rows]


def _check(pstate: ParallelState) -> None:
    sp, r = pstate.sp_size, pstate.sp_rank
    for case_i, (n_new, n_prefix, window) in enumerate(CASES):
        g = torch.Generator().manual_seed(case_i)
        total = n_prefix + n_new
        q, k, v = (torch.randn(total, h, D, generator=g) for h in (HQ, HK, HK))
        sinks = torch.randn(HQ, generator=g)
        pos = torch.arange(total)
        prefix = _spread(list(range(n_prefix)), sp, g)
        new = [[(n_prefix + a, b - a) for a, b in chunks] for chunks in zigzag_partition(n_new, sp)]
        kv_runs = [_runs(prefix[i] + new[i]) for i in range(sp)]
        q_runs = [_runs(new[i]) for i in range(sp)]  # each rank's new rows, from its first new row
        shard = runs_to_positions(kv_runs[r], "cpu")
        k_shard, v_shard = k[shard], v[shard]
        mine = runs_to_positions(q_runs[r], "cpu")
        keys_read: list[int] = []
        attn_fn = functools.partial(_counting_attention, keys_read)
        read_rows = functools.partial(_read_rows, k_shard, v_shard)
        o, lse = window_attention(q[mine], read_rows, q_runs, kv_runs, D**-0.5, window, pstate, attn_fn)
        # no ring: one call over the local rows and at most w - 1 keys before each of the two chunks
        assert sum(keys_read) <= len(mine) + 2 * (window - 1), f"rank {r}, case {case_i}: {keys_read} keys"
        want_o, want_lse = reference_fp64(q[mine], k, v, mine, pos, window, None)
        msg = f"rank {r}, case {case_i}"
        torch.testing.assert_close(o.double(), want_o, **FP32_TOL, msg=msg)
        torch.testing.assert_close(lse.double() * math.log(2), want_lse, **FP32_TOL, msg=msg)
        o_s, _ = apply_attention_sinks(o, lse, sinks)
        want_o, _ = reference_fp64(q[mine], k, v, mine, pos, window, sinks)
        torch.testing.assert_close(o_s.double(), want_o, **FP32_TOL, msg=msg)

        # a full-attention layer of the same model: the ring's merged partials, then the sink once
        o_r, lse_r = ring_attention(q[mine], k_shard, v_shard, q_runs[r], kv_runs, D**-0.5, pstate)
        o_r, _ = apply_attention_sinks(o_r, lse_r, sinks)
        want_o, _ = reference_fp64(q[mine], k, v, mine, pos, total + 1, sinks)  # a window past every key: full
        torch.testing.assert_close(o_r.double(), want_o, **FP32_TOL, msg=msg + " ring")

        # decode: the last 3 positions' queries on every rank, each rank's whole shard, merged over SP, then sinks
        q_dec = pos[total - 3 :]
        o_p, lse_p = attention_runs(q[q_dec], k_shard, v_shard, [(0, 3, int(q_dec[0]))], kv_runs[r], D**-0.5,
                                    window)
        o_m, lse_m = merge_over_sp(o_p, lse_p, pstate)
        o_m, _ = apply_attention_sinks(o_m, lse_m, sinks)
        want_o, _ = reference_fp64(q[q_dec], k, v, q_dec, pos, window, sinks)
        torch.testing.assert_close(o_m.double(), want_o, **FP32_TOL, msg=msg + " decode")


@pytest.mark.parametrize("sp", [2, 4])
def test_window_halo_and_sinks_match_full_sequence(sp):
    run_on_group(_check, sp)


def test_sinks_on_one_rank_match_reference():
    """sp = 1: the halo path is one call, and a row that sees no key takes the sink alone (o = 0)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(20, h, D, generator=g) for h in (HQ, HK, HK))
    sinks = torch.randn(HQ, generator=g)
    pos = torch.arange(20)
    o, lse = attention_runs(q, k, v, [(0, 20, 0)], [(0, 20, 0)], D**-0.5, 6)
    o, _ = apply_attention_sinks(o, lse, sinks)
    want, _ = reference_fp64(q, k, v, pos, pos, 6, sinks)
    torch.testing.assert_close(o.double(), want, **FP32_TOL)
    empty = torch.full((2, HQ), -math.inf)
    o_e, lse_e = apply_attention_sinks(torch.zeros(2, HQ, D), empty, sinks)
    assert torch.all(o_e == 0) and torch.allclose(lse_e, sinks.expand(2, -1) / math.log(2))


@pytest.mark.gpu
@needs_flashinfer
def test_flashinfer_window_call_matches_reference():
    """The halo's per-chunk call on flashinfer (causal, window_left = w - 1, bf16, head dim 64) against the
    reference on the same inputs."""
    from server.kernels.flashinfer_attention import attention_runs_flashinfer

    g = torch.Generator().manual_seed(3)
    n, lo, a, w = 300, 873, 1000, 128  # queries at [1000, 1300), keys at [873, 1300)
    q = torch.randn(n, 8, 64, generator=g).cuda().bfloat16()
    k, v = (torch.randn(a + n - lo, 2, 64, generator=g).cuda().bfloat16() for _ in range(2))
    q_runs, k_runs = [(0, n, a)], [(0, a + n - lo, lo)]
    o, lse = attention_runs_flashinfer(q, k, v, q_runs, k_runs, 64**-0.5, w)
    want_o, want_lse = attention_runs(q, k, v, q_runs, k_runs, 64**-0.5, w)
    torch.testing.assert_close(o.float(), want_o.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-3)
