"""Gated DeltaNet references (chunked prefill, affine map, decode) and the causal conv1d vs ground truths.

Ground truths: the fp64 token-by-token recurrence (checked once against transformers' own recurrent fallback,
which we did not write), and torch's conv1d over the whole sequence. Lengths straddle the 64-token chunk
(1, 63, 64, 65, 130), several requests are packed in one batch, value heads are 3x the key heads, and every
sequence starts from a nonzero state, where a wrong inter-chunk decay or a lost state column would show.
Tolerance: the references compute in fp32, so ~1e-5 relative to the fp64 truth.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from server.kernels import ops
from server.kernels.gdn_ref import (
    GDN_CHUNK,
    causal_conv1d_decode_ref,
    causal_conv1d_prefill_ref,
    gdn_chunk_affine_ref,
    gdn_decode_ref,
    gdn_prefill_ref,
    gdn_recurrence_fp64,
    gdn_state_correction_ref,
)
from tests.helpers import DEVICE, delta_rule_inputs, delta_rule_truth, needs_cuda

LENS = [1, GDN_CHUNK - 1, GDN_CHUNK, GDN_CHUNK + 1, 2 * GDN_CHUNK + 2]
HK, HV, DK, DV = 2, 6, 16, 12
TOL = 2e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gdn_inputs(lens: list[int], seed: int = 0, hk: int = HK, hv: int = HV, dk: int = DK, dv: int = DV):
    """Per-head log decays in [-2, 0), like softplus-gated ones."""
    return delta_rule_inputs(lens, seed, hk, hv, dk, dv, per_channel=False, decay=2, power=2)


def test_fp64_recurrence_matches_transformers() -> None:
    """Our ground truth vs transformers' token-by-token fallback (it computes in fp32: fp32 tolerance)."""
    import inspect

    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    q, k, v, g, beta, _, s0 = gdn_inputs([70], seed=1)
    o, state = gdn_recurrence_fp64(q, k, v, g, beta, s0[0])
    ref_o, ref_state = inspect.unwrap(torch_recurrent_gated_delta_rule)(  # the torch fallback, not fla's kernel
        q[None], k[None], v[None], g[None], beta[None], initial_state=s0, output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ref_o[0]) < TOL and rel_err(state, ref_state[0]) < TOL


def test_chunked_prefill_matches_recurrence_packed() -> None:
    q, k, v, g, beta, cu, s0 = gdn_inputs(LENS)
    o, finals = gdn_prefill_ref(q, k, v, g, beta, cu, s0)
    assert o.dtype == torch.float32 and finals.dtype == torch.float32
    b = cu.tolist()
    for i, (ro, rs) in enumerate(delta_rule_truth(q, k, v, g, beta, cu, s0)):
        assert rel_err(o[b[i] : b[i + 1]], ro) < TOL, f"output of sequence {i} (len {LENS[i]})"
        assert rel_err(finals[i], rs) < TOL, f"final state of sequence {i} (len {LENS[i]})"


def test_zero_initial_state_and_empty_sequence() -> None:
    lens = [5, 0, 70]
    q, k, v, g, beta, cu, _ = gdn_inputs(lens, seed=2)
    o, finals = gdn_prefill_ref(q, k, v, g, beta, cu, None)
    zeros = torch.zeros(len(lens), HV, DK, DV)
    b = cu.tolist()
    for i, (ro, rs) in enumerate(delta_rule_truth(q, k, v, g, beta, cu, zeros)):
        if lens[i]:
            assert rel_err(o[b[i] : b[i + 1]], ro) < TOL
        torch.testing.assert_close(finals[i], rs.float(), rtol=TOL, atol=1e-6)
    assert finals[1].abs().max() == 0


def test_affine_map_reproduces_outputs_and_state_from_any_incoming_state() -> None:
    """(O_loc, Q~, M, T) from zero state, then O_loc + Q~ S_in and T S_in + M equal the recurrence from S_in."""
    q, k, v, g, beta, cu, s0 = gdn_inputs(LENS, seed=3)
    o_loc, q_tilde, m, t = gdn_chunk_affine_ref(q, k, v, g, beta, cu)
    assert t.shape == (len(LENS), HV, DK, DK) and q_tilde.shape == (q.shape[0], HV, DK)
    o = gdn_state_correction_ref(o_loc, q_tilde, cu, s0)
    b = cu.tolist()
    for i, (ro, rs) in enumerate(delta_rule_truth(q, k, v, g, beta, cu, s0)):
        assert rel_err(o[b[i] : b[i + 1]], ro) < TOL, f"corrected output of sequence {i}"
        assert rel_err(t[i] @ s0[i] + m[i], rs) < TOL, f"T S_in + M of sequence {i}"


def test_decode_steps_continue_the_recurrence() -> None:
    """Prefill 3 requests, then 4 decode tokens each through the pool (slots out of order) == one recurrence."""
    lens, steps = [7, 65, 1], 4
    q, k, v, g, beta, cu, s0 = gdn_inputs([n + steps for n in lens], seed=4)
    b = cu.tolist()
    pool = torch.zeros(5, HV, DK, DV)
    slots = torch.tensor([3, 0, 4])
    prompt_rows = torch.cat([torch.arange(b[i], b[i] + n) for i, n in enumerate(lens)])
    pcu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    _, pool[slots] = gdn_prefill_ref(*(x[prompt_rows] for x in (q, k, v, g, beta)), pcu, s0)
    outs = []
    for j in range(steps):
        rows = torch.tensor([b[i] + n + j for i, n in enumerate(lens)])
        outs.append(gdn_decode_ref(q[rows], k[rows], v[rows], g[rows], beta[rows], pool, slots))
    for i, (ro, rs) in enumerate(delta_rule_truth(q, k, v, g, beta, cu, s0)):
        assert rel_err(torch.stack([o[i] for o in outs]), ro[-steps:]) < TOL
        assert rel_err(pool[slots[i]], rs) < TOL


@pytest.mark.parametrize("kernel", [4, 2])
def test_conv1d_prefill_then_decode_matches_full_conv(kernel: int) -> None:
    """Each sequence cut in two prefill pieces (the second shorter than K-1 for one of them) plus decode
    tokens equals torch's causal conv1d over [state | whole sequence]."""
    g = torch.Generator().manual_seed(5)
    c, lens, cuts, steps = 10, [9, 2, 40], [4, 1, 38], 3
    xs = [torch.randn(n + steps, c, generator=g) for n in lens]
    w, bias = torch.randn(c, kernel, generator=g), torch.randn(c, generator=g)
    init = torch.randn(len(lens), c, kernel - 1, generator=g)
    pool = torch.zeros(4, c, kernel - 1)
    slots = torch.tensor([2, 0, 3])
    pool[slots] = init
    ys: list[list[torch.Tensor]] = [[] for _ in lens]
    for first in (True, False):
        pieces = [x[:m] if first else x[m:n] for x, n, m in zip(xs, lens, cuts)]
        cu = torch.tensor([0, *torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()])
        y, pool[slots] = causal_conv1d_prefill_ref(torch.cat(pieces), w, bias, cu, pool[slots])
        for i in range(len(lens)):
            ys[i].append(y[cu[i] : cu[i + 1]])
    for j in range(steps):
        y = causal_conv1d_decode_ref(torch.stack([x[n + j] for x, n in zip(xs, lens)]), w, bias, pool, slots)
        for i in range(len(lens)):
            ys[i].append(y[i : i + 1])
    for i, x in enumerate(xs):
        full = F.conv1d(torch.cat([init[i], x.t()], dim=1)[None], w[:, None], bias, groups=c)[0].t()
        torch.testing.assert_close(torch.cat(ys[i]), full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[slots[i]], x[-(kernel - 1):].t())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ops_on_cuda_match_recurrence(dtype: torch.dtype) -> None:
    """The dispatched ops (fla-core for bf16 where installed, the references otherwise) at Qwen3.5-like head
    ratios and dims; bf16 inputs round q/k/v to 8 bits of mantissa, hence the looser tolerance."""
    lens = [1, 63, 64, 65, 300, 0]
    q, k, v, g, beta, cu, s0 = gdn_inputs(lens, seed=6, hk=4, hv=12, dk=128, dv=128)
    dev = [x.to(DEVICE) for x in (q.to(dtype), k.to(dtype), v.to(dtype), g, beta, cu, s0)]
    tol = 2e-2 if dtype == torch.bfloat16 else TOL
    o, finals = ops.gdn_prefill(*dev)
    o_loc, q_tilde, m, t = ops.gdn_chunk_affine(*dev[:6])
    o_aff = ops.gdn_state_correction(o_loc, q_tilde, dev[5], dev[6])
    b = cu.tolist()
    for i, (ro, rs) in enumerate(delta_rule_truth(*(x.to(dtype).float() if x.is_floating_point() else x
                                          for x in (q, k, v)), g, beta, cu, s0)):
        if lens[i]:
            assert rel_err(o[b[i] : b[i + 1]], ro) < tol and rel_err(o_aff[b[i] : b[i + 1]], ro) < tol
        assert rel_err(finals[i], rs) < tol and rel_err(t[i] @ dev[6][i] + m[i], rs) < tol
    pool = torch.zeros(8, 12, 128, 128, device=DEVICE)
    slots = torch.tensor([5, 1], device=DEVICE)
    pool[slots] = finals[3:5]
    rows = torch.tensor([b[4] - 1, b[5] - 1], device=DEVICE)  # any token: compare with one recurrence step
    o_dec = ops.gdn_decode(dev[0][rows], dev[1][rows], dev[2][rows], dev[3][rows], dev[4][rows], pool, slots)
    for j, i in enumerate((3, 4)):
        ro, rs = gdn_recurrence_fp64(*(x[rows[j] : rows[j] + 1].cpu().float() for x in dev[:5]), finals[i].cpu())
        assert rel_err(o_dec[j], ro[0]) < tol and rel_err(pool[slots[j]], rs) < tol


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="fla-core is not installed")
def test_fla_decode_adapter_matches_recurrence(monkeypatch) -> None:
    """``ops.gdn_decode`` through fla-core's fused recurrent kernel (without a GPU: under the Triton interpreter),
    several steps from nonzero states in shuffled slots, against the fp64 recurrence: the adapter's argument mapping
    (fla's fifth positional parameter is ``gk``, not beta) and its state layout. bf16 inputs, bf16 outputs."""
    monkeypatch.setattr(ops, "_fast", lambda x: True)  # the fla path on any device
    steps, dk, dv = 3, 32, 32
    q, k, v, g, beta, _, s0 = gdn_inputs([steps] * 2, seed=11, hk=2, hv=4, dk=dk, dv=dv)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    slots = torch.tensor([3, 1])
    pool = torch.zeros(5, 4, dk, dv)
    pool[slots] = s0
    pool, slots = pool.to(DEVICE), slots.to(DEVICE)
    for t in range(steps):
        rows = torch.tensor([t, steps + t])
        o = ops.gdn_decode(*(x[rows].to(DEVICE) for x in (q, k, v, g, beta)), pool, slots)
        for j in range(2):
            s = j * steps
            ro, rs = gdn_recurrence_fp64(q[s : s + t + 1].float(), k[s : s + t + 1].float(), v[s : s + t + 1].float(),
                                         g[s : s + t + 1], beta[s : s + t + 1], s0[j])
            assert rel_err(o[j].float(), ro[-1]) < 2e-2, (t, j)
            assert rel_err(pool[slots[j]], rs) < 1e-3, (t, j)
    assert pool[0].abs().max() == 0 and pool[2].abs().max() == 0 and pool[4].abs().max() == 0  # other slots untouched
