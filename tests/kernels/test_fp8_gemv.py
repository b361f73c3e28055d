"""The decode-row FP8 GEMV (server/kernels/fp8_gemv.py): its e4m3 -> bf16 bit arithmetic against torch's own
conversion for every code, and the kernel (Triton, under ``TRITON_INTERPRET=1`` without a GPU; the PTX conversion on
a GPU) against fp64 products of the dequantized weight: per-row and block scales (uneven last blocks), K splits,
bias, rows up to 64, and the shapes it declines. Tolerances: bf16 rounding of the output (the weight codes are exact
in bf16 and the products are summed in fp32)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402

from server.kernels.fp8 import FP8, dequantize, quantize_per_row  # noqa: E402
from server.kernels.fp8_gemv import GemvConfig, default_config, e4m3_to_bf16_bits, fp8_gemv  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402

TOL = 1e-2  # of the output's largest magnitude: bf16 output rounding (2^-8) with room for fp32 summation


def test_bit_arithmetic_converts_every_e4m3_code_as_torch_does():
    """All 254 finite codes (subnormals, both zeros, the largest; the two zeros twice to fill whole words), in each
    of the four byte positions of a word."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F] + [0, 0x80], dtype=torch.uint8)
    want = codes.view(FP8).to(torch.bfloat16)
    for shift in range(4):  # each code at each position of its 32-bit word
        rolled = torch.roll(codes, shift)
        got = e4m3_to_bf16_bits(rolled)
        assert torch.equal(got.view(torch.int16), torch.roll(want, shift).view(torch.int16))


def _weight(n: int, k: int, block_k: int | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, scale = quantize_per_row(torch.randn(n, k, generator=gen) * 0.05, block_k)
    return q.to(DEVICE), scale.to(DEVICE), block_k or k


@pytest.mark.parametrize("m", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("n,k,block_k", [(70, 256, 32), (48, 208, None), (130, 200, 64), (64, 96, 16)])
def test_gemv_matches_the_dequantized_product(m, n, k, block_k):
    """Per-row scales and block scales with a short last block (200 = 3 x 64 + 8, 208 = 13 x 16), default tiles."""
    q, scale, bk = _weight(n, k, block_k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, torch.bfloat16)
    got = fp8_gemv(x, q, scale, bk)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    want = x.double() @ dequantize(q, scale, bk).double().t()
    torch.testing.assert_close(got.double(), want, atol=TOL * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("cfg", [GemvConfig(16, 32, 1), GemvConfig(32, 16, 3), GemvConfig(64, 32, 4),
                                 GemvConfig(16, 16, 16)])
def test_k_splits_and_bias(cfg):
    """Splits that add partial sums with atomics (three splits of an uneven number of tiles, more splits than
    tiles), tiles smaller than the scale blocks, and a bias added once."""
    n, k, block_k, m = 40, 176, 32, 5  # 5 blocks of 32 and one of 16
    q, scale, bk = _weight(n, k, block_k, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    got = fp8_gemv(x, q, scale, bk, bias, config=cfg)
    want = x.double() @ dequantize(q, scale, bk).double().t() + bias.double()
    torch.testing.assert_close(got.double(), want, atol=TOL * want.abs().max().item(), rtol=0)


def test_gemv_declines_what_it_does_not_take():
    """fp32 activations, more than 64 rows, blocks that are not a power of two, and tiles wider than the scale
    blocks go to the other paths (None)."""
    q, scale, bk = _weight(32, 96, 32, seed=0)
    x = torch.randn(3, 96).to(DEVICE)
    assert fp8_gemv(x, q, scale, bk) is None
    assert fp8_gemv(x.new_zeros(65, 96, dtype=torch.bfloat16), q, scale, bk) is None
    assert fp8_gemv(x.to(torch.bfloat16), q, scale, bk, config=GemvConfig(32, 64)) is None
    q, scale, bk = _weight(32, 96, 24, seed=1)
    assert fp8_gemv(x.to(torch.bfloat16), q, scale, bk) is None


def test_default_tiles_cover_the_device():
    """Few output tiles (a TP slice, the down projection) split K so that the programs cover the SMs; many
    tiles do not split; block-scaled tiles stay inside a block; rows above 16 take wider output tiles."""
    assert default_config(1, 28672, 4096, None).split_k == 1
    small = default_config(1, 1024, 4096, None)
    assert -(-1024 // small.block_n) * small.split_k >= 132
    assert default_config(1, 4096, 4096, 128).block_k <= 128
    assert default_config(32, 4096, 4096, None).block_n > default_config(1, 4096, 4096, None).block_n


def test_strided_rows_and_transposed_storage():
    """Rows of a wider tensor (row stride > K, as a slice of a fused projection's output) and a weight stored
    transposed (its K not contiguous) give the same product as contiguous copies."""
    q, scale, bk = _weight(48, 128, 32, seed=4)
    wide = torch.randn(6, 200, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    x = wide[:, 40:168]
    assert x.stride(0) == 200
    want = fp8_gemv(x.contiguous(), q, scale, bk)
    torch.testing.assert_close(fp8_gemv(x, q, scale, bk), want, atol=0, rtol=0)
    q_t = q.t().contiguous().t()
    assert q_t.stride(-1) != 1
    torch.testing.assert_close(fp8_gemv(x, q_t, scale, bk), want, atol=0, rtol=0)


def test_one_hot_rows_give_every_code_exactly():
    """One-hot rows of x pick single weight columns, so with unit scales the output is each code's value exactly:
    every finite e4m3 code (subnormals, the largest, both zeros) as the kernel converts it (on a GPU, the PTX)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F] + [0, 0x80], dtype=torch.uint8)
    q = codes.view(FP8).view(16, 16).to(DEVICE)  # N = K = 16
    x = torch.eye(16, dtype=torch.bfloat16, device=DEVICE)
    got = fp8_gemv(x, q, torch.ones(16, 1, device=DEVICE), 16)
    want = q.to(torch.bfloat16).t()  # y[i, n] = w[n, i]
    assert torch.equal(got.float(), want.float())
    assert (want.float().abs() < 2.0**-6).sum() > 10  # subnormal codes are among them


def test_splits_add_in_a_fixed_order():
    """Four K splits of one row give the same bits on every call (the partial sums are not added by atomics)."""
    q, scale, bk = _weight(64, 1024, None, seed=6)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.bfloat16)
    cfg = GemvConfig(32, 64, 4)
    first = fp8_gemv(x, q, scale, bk, config=cfg)
    for _ in range(3):
        assert torch.equal(fp8_gemv(x, q, scale, bk, config=cfg).view(torch.int16), first.view(torch.int16))
