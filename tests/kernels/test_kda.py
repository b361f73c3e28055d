"""Kimi Delta Attention (the gated delta rule with one decay per key channel) through the shared gated-delta-rule
references: chunked prefill, the chunk's affine map ``(T, M)``, decode, vs an fp64 token loop.

Ground truths: our fp64 recurrence, itself checked against transformers' KDA token loop (which we did not write).
Lengths straddle a 16-token chunk (the chunk size is a parameter of the reference; small here so several chunk
boundaries fall inside short sequences), sequences start from nonzero states, and the per-channel decays differ
strongly between channels, so a decay applied per head or on the wrong side of the Householder factor shows.
"""

from __future__ import annotations

import pytest
import torch

from server.kernels import ops
from server.kernels.gdn_ref import (
    gdn_chunk_affine_ref,
    gdn_decode_ref,
    gdn_normalize_qk,
    gdn_prefill_ref,
    gdn_recurrence_fp64,
    gdn_state_correction_ref,
)
from tests.helpers import DEVICE, delta_rule_inputs, delta_rule_truth, needs_cuda

CHUNK = 16
LENS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5, 0]
H, DK, DV = 3, 8, 6
TOL = 2e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def kda_inputs(lens: list[int], seed: int = 0, h: int = H, dk: int = DK, dv: int = DV):
    """Per-channel log decays in (-3, 0]: some channels nearly keep their state, some nearly forget it."""
    return delta_rule_inputs(lens, seed, h, h, dk, dv, per_channel=True, decay=3, power=3)


def test_fp64_recurrence_matches_transformers_kda_loop() -> None:
    import inspect

    from transformers.models.kimi_linear.modeling_kimi_linear import recurrent_kimi_delta_attention

    q, k, v, g, beta, _, s0 = kda_inputs([40], seed=1)
    o, state = gdn_recurrence_fp64(q, k, v, g, beta, s0[0])
    ref_o, ref_state = inspect.unwrap(recurrent_kimi_delta_attention)(  # the torch loop, not fla's kernel
        q[None], k[None], v[None], g[None], beta[None], initial_state=s0, output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ref_o[0]) < TOL and rel_err(state, ref_state[0]) < TOL


def test_per_channel_decay_is_applied_before_the_householder_step() -> None:
    """One token from a state: ``S_1 = (I - b k k^T) Diag(alpha) S_0 + b k v^T``, written out by hand."""
    q, k, v, g, beta, _, s0 = kda_inputs([1], seed=2, h=1)
    _, kn = gdn_normalize_qk(q.double(), k.double())
    kt, b = kn[0, 0].unsqueeze(-1), beta[0, 0].double()
    householder = torch.eye(DK, dtype=torch.float64) - b * kt @ kt.T
    want = householder @ torch.diag(g[0, 0].double().exp()) @ s0[0, 0].double() + b * kt @ v[0, 0].double()[None]
    _, state = gdn_recurrence_fp64(q, k, v, g, beta, s0[0])
    torch.testing.assert_close(state[0], want)


def test_chunked_prefill_matches_recurrence_packed() -> None:
    q, k, v, g, beta, cu, s0 = kda_inputs(LENS)
    o, finals = gdn_prefill_ref(q, k, v, g, beta, cu, s0, chunk=CHUNK)
    b = cu.tolist()
    for i, (ro, rs) in enumerate(delta_rule_truth(q, k, v, g, beta, cu, s0)):
        if LENS[i]:
            assert rel_err(o[b[i] : b[i + 1]], ro) < TOL, f"output of sequence {i} (len {LENS[i]})"
        assert rel_err(finals[i], rs) < TOL, f"final state of sequence {i} (len {LENS[i]})"


def test_chunk_maps_reproduce_outputs_and_state_from_any_incoming_state() -> None:
    """(O_loc, Q~, M, T) from zero state; T is the v = 0 recurrence from S = I; then O_loc + Q~ S_in and
    T S_in + M equal the recurrence from S_in."""
    q, k, v, g, beta, cu, s0 = kda_inputs(LENS, seed=3)
    o_loc, q_tilde, m, t = gdn_chunk_affine_ref(
        q, k, v, g, beta, cu, prefill=lambda *a: gdn_prefill_ref(*a, chunk=CHUNK))
    o = gdn_state_correction_ref(o_loc, q_tilde, cu, s0)
    b = cu.tolist()
    eye = torch.eye(DK, dtype=torch.float64).expand(H, DK, DK)
    for i, (ro, rs) in enumerate(delta_rule_truth(q, k, v, g, beta, cu, s0)):
        s, e = b[i], b[i + 1]
        t_want = gdn_recurrence_fp64(q[s:e], k[s:e], torch.zeros(e - s, H, DK), g[s:e], beta[s:e], eye)[1]
        assert rel_err(t[i], t_want) < TOL, f"T of sequence {i}"
        if e > s:
            assert rel_err(o[s:e], ro) < TOL, f"corrected output of sequence {i}"
        assert rel_err(t[i] @ s0[i] + m[i], rs) < TOL, f"T S_in + M of sequence {i}"


def test_decode_steps_continue_the_recurrence() -> None:
    lens, steps = [7, 20], 3
    q, k, v, g, beta, cu, s0 = kda_inputs([n + steps for n in lens], seed=4)
    b = cu.tolist()
    pool = torch.zeros(4, H, DK, DV)
    slots = torch.tensor([3, 1])
    prompt_rows = torch.cat([torch.arange(b[i], b[i] + n) for i, n in enumerate(lens)])
    pcu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    _, pool[slots] = gdn_prefill_ref(*(x[prompt_rows] for x in (q, k, v, g, beta)), pcu, s0, chunk=CHUNK)
    outs = []
    for j in range(steps):
        rows = torch.tensor([b[i] + n + j for i, n in enumerate(lens)])
        outs.append(gdn_decode_ref(q[rows], k[rows], v[rows], g[rows], beta[rows], pool, slots))
    for i, (ro, rs) in enumerate(delta_rule_truth(q, k, v, g, beta, cu, s0)):
        assert rel_err(torch.stack([o[i] for o in outs]), ro[-steps:]) < TOL
        assert rel_err(pool[slots[i]], rs) < TOL


@pytest.mark.gpu
@needs_cuda
def test_ops_on_cuda_match_recurrence_bf16() -> None:
    """The dispatched ops (fla-core's KDA kernels for bf16) at Kimi-Linear head dims vs the fp64 loop."""
    lens = [1, 63, 64, 65, 300, 0]
    q, k, v, g, beta, cu, s0 = kda_inputs(lens, seed=6, h=4, dk=128, dv=128)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    dev = [x.to(DEVICE) for x in (q, k, v, g, beta, cu, s0)]
    o, finals = ops.gdn_prefill(*dev)
    o_loc, q_tilde, m, t = ops.gdn_chunk_affine(*dev[:6])
    o_aff = ops.gdn_state_correction(o_loc, q_tilde, dev[5], dev[6])
    b = cu.tolist()
    for i, (ro, rs) in enumerate(delta_rule_truth(q.float(), k.float(), v.float(), g, beta, cu, s0)):
        if lens[i]:
            assert rel_err(o[b[i] : b[i + 1]], ro) < 2e-2 and rel_err(o_aff[b[i] : b[i + 1]], ro) < 2e-2
        assert rel_err(finals[i], rs) < 2e-2 and rel_err(t[i] @ dev[6][i] + m[i], rs) < 2e-2
    pool = torch.zeros(8, 4, 128, 128, device=DEVICE)
    slots = torch.tensor([5, 1], device=DEVICE)
    pool[slots] = finals[3:5]
    rows = torch.tensor([b[4] - 1, b[5] - 1], device=DEVICE)
    o_dec = ops.gdn_decode(*(x[rows] for x in dev[:5]), pool, slots)
    for j, i in enumerate((3, 4)):
        ro, rs = gdn_recurrence_fp64(*(x[rows[j] : rows[j] + 1].cpu().float() for x in dev[:5]), finals[i].cpu())
        assert rel_err(o_dec[j], ro[0]) < 2e-2 and rel_err(pool[slots[j]], rs) < 2e-2
