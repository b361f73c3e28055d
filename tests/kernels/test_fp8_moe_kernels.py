"""The grouped FP8 expert matmuls (Triton, under ``TRITON_INTERPRET=1`` without a GPU) against fp64 matmuls of the
dequantized experts: the dense form's sum over experts and the gathered form's per-row experts, with block scales
(uneven last K blocks) and per-row scales; fp32 to summation order, bf16 activations (weight tiles rounded to bf16,
as the GPU multiplies them) to bf16 rounding."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402

from server.kernels.fp8 import dequantize, quantize_per_row  # noqa: E402
from server.kernels.fp8_moe import experts_fp8_matmul, gathered_fp8_matmul  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402


def experts(g: int, n: int, k: int, block_k: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator().manual_seed(seed)
    q, scale = quantize_per_row(torch.randn(g, n, k, generator=gen), block_k)
    return q.to(DEVICE), scale.to(DEVICE), block_k or k


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,g,n,k,block_k", [(5, 3, 70, 80, 16), (33, 1, 130, 40, None), (1, 4, 20, 48, 32)])
def test_experts_fp8_matmul_sums_every_expert(m, g, n, k, block_k, dtype):
    w, scale, bk = experts(g, n, k, block_k, m + g)
    x = torch.randn(m, g * k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    want = torch.einsum("mgk,gnk->mn", x.double().view(m, g, k), dequantize(w, scale, bk).double())
    got = experts_fp8_matmul(x, w, scale, bk)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,e,n,k,block_k", [(7, 5, 70, 80, 16), (3, 2, 24, 64, None)])
def test_gathered_fp8_matmul_takes_each_rows_expert(p, e, n, k, block_k, dtype):
    w, scale, bk = experts(e, n, k, block_k, p + e)
    gen = torch.Generator().manual_seed(p)
    x = torch.randn(p, k, generator=gen).to(DEVICE, dtype)
    index = torch.randint(0, e, (p,), generator=gen).to(DEVICE)
    want = torch.einsum("pk,pnk->pn", x.double(), dequantize(w, scale, bk).double()[index])
    got = gathered_fp8_matmul(x, w, scale, bk, index)
    assert got.dtype == dtype and got.shape == (p, n)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * want.abs().max().item())
