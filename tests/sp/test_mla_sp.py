"""Latent attention over SP-sharded latents vs full-sequence expanded attention (which we compute with the plain
softmax reference over per-head K/V expanded from the whole sequence's latents).

- Absorbed form == expanded form on one rank (scores and outputs, causal, odd latent and head sizes).
- The latent ring (and all-gather mode), both forms, at sp = 2 and 4 (x tp = 2: each TP rank its heads): every
  rank's zigzag query rows match full attention, with a cached prefix spread over the ranks.
- Absorbed decode over SP-sharded latent pages, merged in latent space, equals full attention on every rank.
"""

from __future__ import annotations

import pytest
import torch

from server.kernels.mla_ref import mla_absorb_queries, mla_expand, mla_latent_attention, mla_up_project
from server.kernels.ops import attention_runs, runs_to_positions
from server.layers.mla import LatentKVCache, LatentKVSpec
from server.sp.groups import ParallelState
from server.sp.mla_sp import (
    MLA_FORMS,
    expanded_ring_bytes_per_token,
    mla_decode_over_sp,
    mla_ring_bytes_per_token,
    mla_ring_prefill,
)
from server.sp.partition import zigzag_partition
from tests.helpers import run_on_group

H, L, R, DN, DV = 4, 19, 6, 10, 7  # heads, kv_lora_rank, rope dim, nope dim, v dim: all different, L odd
SCALE = (DN + R) ** -0.5 * 1.3
TOL = {"rtol": 2e-5, "atol": 2e-5}


def _inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q_nope, q_pe = torch.randn(n, H, DN, generator=g), torch.randn(n, H, R, generator=g)
    c_kv, k_pe = torch.randn(n, L, generator=g), torch.randn(n, R, generator=g)
    kv_b = torch.randn(H * (DN + DV), L, generator=g) * L**-0.5
    return q_nope, q_pe, c_kv, k_pe, kv_b


def _full(q_nope, q_pe, c_kv, k_pe, kv_b, q_pos, k_pos):
    """Expanded attention over the whole sequence, in fp64."""
    k, v = mla_expand(c_kv.double(), k_pe.double(), kv_b.double(), DN, DV)
    q = torch.cat([q_nope, q_pe], -1).double()
    s = torch.einsum("qhd,khd->hqk", q, k) * SCALE
    s = s.masked_fill(k_pos[None, None] > q_pos[None, :, None], -torch.inf)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def test_absorbed_equals_expanded_on_one_rank() -> None:
    n = 23
    q_nope, q_pe, c_kv, k_pe, kv_b = _inputs(n, 0)
    runs = [(0, n, 0)]
    k, v = mla_expand(c_kv, k_pe, kv_b, DN, DV)
    o_exp, lse_exp = attention_runs(torch.cat([q_nope, q_pe], -1), k, v, runs, runs, SCALE)
    o_lat, lse_lat = mla_latent_attention(mla_absorb_queries(q_nope, q_pe, kv_b, DN, DV), c_kv, k_pe, runs, runs,
                                          SCALE)
    pos = torch.arange(n)
    torch.testing.assert_close(o_exp.double(), _full(q_nope, q_pe, c_kv, k_pe, kv_b, pos, pos), **TOL)
    torch.testing.assert_close(mla_up_project(o_lat, kv_b, DN, DV), o_exp, **TOL)
    torch.testing.assert_close(lse_lat, lse_exp, **TOL)


def test_latent_pages_round_trip_and_ring_bytes() -> None:
    spec = LatentKVSpec(num_heads=H, width=L + R, scale=SCALE)
    cache = spec.allocate(5, 4, torch.float32, torch.device("cpu"))
    assert spec.unit_bytes(4, torch.float32) == 4 * (L + R) * 4 and spec.geometry == (H, 1, L + R, SCALE, None)
    _, _, c_kv, k_pe, _ = _inputs(9, 1)
    latent = torch.cat([c_kv, k_pe], -1).unsqueeze(1)
    pages = torch.tensor([3, 0, 4])
    slots = (pages[:, None] * 4 + torch.arange(4)).flatten()[:9]
    cache.write(slots, latent, latent)
    k, v = cache.read(pages, 9)
    assert torch.equal(k, latent) and v is k  # stored once: key and value are the latent
    spec.copy(cache, torch.tensor([3]), torch.tensor([1]))
    assert torch.equal(cache.k[1], cache.k[3])
    # DeepSeek-V3: 576 values per token against 128 heads x (192 + 128) expanded: 71x fewer bytes
    assert mla_ring_bytes_per_token(512, 64, 2) == 1152
    assert expanded_ring_bytes_per_token(128, 192, 128, 2) // mla_ring_bytes_per_token(512, 64, 2) == 71


def _worker(pstate: ParallelState) -> None:
    sp, r, tp, tr = pstate.sp_size, pstate.sp_rank, pstate.tp_size, pstate.tp_rank
    n_prefix, n_new = 9, 37
    n = n_prefix + n_new
    q_nope, q_pe, c_kv, k_pe, kv_b = _inputs(n, 2)
    heads = slice(tr * H // tp, (tr + 1) * H // tp)
    kv_b_local = kv_b.view(H, DN + DV, L)[heads].reshape(-1, L)
    pos = torch.arange(n)
    full = _full(q_nope, q_pe, c_kv, k_pe, kv_b, pos, pos)[:, heads]
    # the cached prefix is spread unevenly over the ranks; the new tokens zigzag
    prefix = [[(0, 4)], [(4, 5)]] if sp == 2 else [[(0, 2)], [(2, 3)], [(5, 4)], []]
    new = [[(n_prefix + s, e - s) for s, e in chunks] for chunks in zigzag_partition(n_new, sp)]

    def runs(pieces):
        out, row = [], 0
        for p, m in pieces:
            out.append((row, m, p))
            row += m
        return out

    kv_runs = [runs(prefix[i] + new[i]) for i in range(sp)]
    q_runs = runs(new[r])
    q_rows, k_rows = runs_to_positions(q_runs, pos.device), runs_to_positions(kv_runs[r], pos.device)
    for form in MLA_FORMS:
        for mode in ("ring", "allgather"):
            o, _ = mla_ring_prefill(q_nope[q_rows][:, heads], q_pe[q_rows][:, heads], c_kv[k_rows], k_pe[k_rows],
                                    q_runs, kv_runs, kv_b_local, DN, DV, SCALE, pstate, form=form, mode=mode)
            torch.testing.assert_close(o.double(), full[q_rows], **TOL,
                                       msg=lambda m, f=form, md=mode: f"rank {pstate.rank} {f} {md}: {m}")
    # decode: two new tokens (positions n, n + 1) replicated on every rank; the latents stay sharded as prefilled,
    # read from this rank's latent pages
    q2_nope, q2_pe, c2, pe2, _ = _inputs(n + 2, 3)
    all_c, all_pe = torch.cat([c_kv, c2[n:]]), torch.cat([k_pe, pe2[n:]])
    mine = torch.cat([k_rows, torch.tensor([n, n + 1])]) if r == 0 else k_rows  # rank 0 owns the new tokens
    cache = LatentKVCache(num_pages=16, page_size=4, width=L + R, dtype=torch.float32, device=torch.device("cpu"))
    pages = torch.arange(15, 15 - (len(mine) + 3) // 4, -1)
    latent = torch.cat([all_c[mine], all_pe[mine]], -1).unsqueeze(1)
    cache.write((pages[:, None] * 4 + torch.arange(4)).flatten()[: len(mine)], latent, latent)
    local_c, local_pe = cache.read(pages, len(mine))[0][:, 0].split([L, R], dim=-1)
    k_runs = [(i, 1, int(p)) for i, p in enumerate(mine)]
    dq_runs = [(0, 1, n), (1, 1, n + 1)]
    o = mla_decode_over_sp(q2_nope[n:, heads], q2_pe[n:, heads], local_c, local_pe, dq_runs, k_runs, kv_b_local,
                           DN, DV, SCALE, pstate)
    want = _full(q2_nope[n:], q2_pe[n:], all_c, all_pe, kv_b, torch.tensor([n, n + 1]), torch.arange(n + 2))
    torch.testing.assert_close(o.double(), want[:, heads], **TOL, msg=lambda m: f"rank {pstate.rank} decode: {m}")


@pytest.mark.slow
@pytest.mark.parametrize(("sp", "tp"), [(2, 1), (4, 1), (2, 2)])
def test_latent_ring_and_absorbed_decode_match_full_attention(sp: int, tp: int) -> None:
    run_on_group(_worker, sp, tp)


def test_rejects_unknown_form() -> None:
    q_nope, q_pe, c_kv, k_pe, kv_b = _inputs(3, 4)
    with pytest.raises(ValueError, match="MLA form"):
        mla_ring_prefill(q_nope, q_pe, c_kv, k_pe, [(0, 3, 0)], [[(0, 3, 0)]], kv_b, DN, DV, SCALE, ParallelState(),
                         form="dense")
