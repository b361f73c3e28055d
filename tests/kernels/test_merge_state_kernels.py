"""Triton merge_state (two-way, K-way, in place) vs the torch reference; flashinfer vs Triton on a GPU.

Rows with ``lse = -inf`` in some or all parts must contribute nothing (an all ``-inf`` row gives o = 0 and
lse = -inf). Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` in fp32.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402

from server.kernels import ops  # noqa: E402
from server.kernels.merge_state import (  # noqa: E402
    flashinfer_cascade,
    merge_state_triton,
    merge_states_triton,
)
from server.kernels.merge_state_ref import merge_state_ref, merge_states_ref  # noqa: E402
from server.sp.ring_attention import packed_partials  # noqa: E402
from tests.helpers import DEVICE, gpu, needs_cuda

NEG_INF = float("-inf")


def make_parts(k: int, n: int, h: int, d: int, dtype=torch.float32, seed: int = 0):
    """K partial results with -inf in one part of a row, in all parts of a row, and in all but one part."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(k, n, h, d, generator=g).to(dtype)
    lse = torch.randn(k, n, h, generator=g) * 4
    lse[0, 0, 0] = NEG_INF
    lse[:, 1 % n, h - 1] = NEG_INF
    lse[1:, 2 % n, 0] = NEG_INF
    return o.to(DEVICE), lse.to(DEVICE)


def assert_merged_equal(o, lse, ro, rlse, tol: float, lse_tol: float = 1e-5) -> None:
    assert o.dtype == ro.dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    finite = ~torch.isneginf(rlse)
    assert torch.allclose(lse[finite], rlse[finite], atol=lse_tol, rtol=lse_tol)
    assert torch.allclose(o.float(), ro.float(), atol=tol, rtol=tol)
    assert not o.isnan().any()


@pytest.mark.parametrize("k,d", [(1, 24), (2, 32), (5, 24), (3, 128)])
def test_k_way_merge_matches_reference(k: int, d: int) -> None:
    o, lse = make_parts(k, n=7, h=3, d=d, seed=k)
    assert_merged_equal(*merge_states_triton(o, lse), *merge_states_ref(o, lse), tol=1e-5)


def test_two_way_merge_and_in_place_accumulation() -> None:
    o, lse = make_parts(3, n=9, h=2, d=32, seed=7)
    ro, rlse = merge_state_ref(o[0], lse[0], o[1], lse[1])
    assert_merged_equal(*merge_state_triton(o[0], lse[0], o[1], lse[1]), ro, rlse, tol=1e-5)
    # Accumulate three parts into o[0] in place, as attention pieces are merged.
    acc, acc_lse = o[0].clone(), lse[0].clone()
    for i in (1, 2):
        merge_state_triton(acc, acc_lse, o[i], lse[i], out=acc, out_lse=acc_lse)
    assert_merged_equal(acc, acc_lse, *merge_states_ref(o, lse), tol=1e-5)


def test_two_way_merge_reads_strided_rows() -> None:
    """Row slices of larger buffers (the accumulator of a subset of query rows) merge without copies."""
    o, lse = make_parts(2, n=12, h=2, d=32, seed=8)
    big = torch.zeros(20, 2, 32, device=DEVICE)
    big_lse = torch.full((20, 2), NEG_INF, device=DEVICE)
    big[4:16], big_lse[4:16] = o[0], lse[0]
    merge_state_triton(big[4:16], big_lse[4:16], o[1], lse[1], out=big[4:16], out_lse=big_lse[4:16])
    assert_merged_equal(big[4:16], big_lse[4:16], *merge_state_ref(o[0], lse[0], o[1], lse[1]), tol=1e-5)
    assert (big[:4] == 0).all() and (big[16:] == 0).all()


def test_k_way_merge_of_packed_rows_keeps_unflagged_rows() -> None:
    """The decode-graph form: every rank's o and fp32 lse side by side in one gathered buffer (read through
    strided views, no copies), and rows whose keep flag is 0 return the local o instead of the merge."""
    k, n, h, d = 3, 6, 2, 32
    o, lse = make_parts(k, n, h, d, seed=9)
    packed = torch.cat([o.reshape(k, n, h * d), lse], dim=2)  # fp32: one lse column per head
    keep = torch.tensor([1, 0, 1, 1, 0, 1], device=DEVICE)
    local = torch.randn(n, h, d, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ro, rlse = merge_states_ref(o, lse)
    ro = torch.where(keep[:, None, None] != 0, ro, local)
    got = merge_states_triton(packed[:, :, : h * d].view(k, n, h, d), packed[:, :, h * d :], keep, local)
    assert_merged_equal(*got, ro, rlse, tol=1e-5)
    assert_merged_equal(*merge_states_ref(o, lse, keep, local), ro, rlse, tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_partials_keep_the_fp32_lse_bits_behind_o(dtype: torch.dtype) -> None:
    """The buffer the SP merge gathers: o in its dtype, the fp32 lse's bytes after it, both views of one tensor."""
    packed, o, lse = packed_partials(5, 3, 8, dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    values, o_values = torch.randn(5, 3, generator=g), torch.randn(5, 3, 8, generator=g).to(dtype)
    lse.copy_(values)
    o.copy_(o_values)
    assert packed.shape == (5, 24 + 3 * 4 // packed.element_size())
    assert torch.equal(packed[:, 24:].contiguous().view(torch.float32), values)  # exact: bits, not rounded
    assert torch.equal(packed[:, :24].reshape(5, 3, 8), o_values)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merges_half_precision_gpu(dtype: torch.dtype) -> None:
    o, lse = make_parts(4, n=300, h=8, d=128, dtype=dtype, seed=9)
    assert_merged_equal(*ops.merge_states(o, lse), *merge_states_ref(o, lse), tol=1e-2, lse_tol=1e-4)
    assert_merged_equal(*ops.merge_state(o[0], lse[0], o[1], lse[1]),
                        *merge_state_ref(o[0], lse[0], o[1], lse[1]), tol=1e-2, lse_tol=1e-4)


@gpu
@needs_cuda
@pytest.mark.skipif(flashinfer_cascade() is None, reason="flashinfer is not installed")
def test_flashinfer_and_triton_agree_gpu() -> None:
    o, lse = make_parts(4, n=500, h=32, d=128, dtype=torch.bfloat16, seed=10)
    fo, flse = flashinfer_cascade().merge_state(o[0], lse[0], o[1], lse[1])
    to, tlse = merge_state_triton(o[0], lse[0], o[1], lse[1])
    assert_merged_equal(fo, flse, to, tlse, tol=1e-2, lse_tol=1e-4)
    fo, flse = flashinfer_cascade().merge_states(o.transpose(0, 1).contiguous(), lse.transpose(0, 1).contiguous())
    assert_merged_equal(fo, flse, *merge_states_triton(o, lse), tol=1e-2, lse_tol=1e-4)
