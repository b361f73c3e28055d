"""FP8 GEMMs vs an fp32 matmul of the dequantized operands (the torch reference).

Without a GPU the block-scaled Triton GEMM runs under ``TRITON_INTERPRET=1`` (products in fp32, so the result is
the reference up to summation order); on a GPU it multiplies in FP8 on the tensor cores, and ``fp8_linear`` is
held to the error of its path: the decode GEMV at few rows (the weight's rounding alone), activations quantized per
token (or per token and group) above.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402

from server.kernels.fp8 import dequantize, expand_scale, quantize_per_row  # noqa: E402
from server.kernels.fp8_gemm import (  # noqa: E402
    block_fp8_matmul,
    block_fp8_matmul_ref,
    fp8_linear,
    quantize_activations,
)
from tests.helpers import DEVICE, gpu, needs_cuda  # noqa: E402


@pytest.mark.parametrize("m,n,k,bk", [(5, 70, 80, 32), (1, 40, 64, 16), (33, 130, 96, 32)])
def test_block_fp8_matmul_matches_dequantized_reference(m, n, k, bk):
    """Uneven last K blocks (80 = 32 + 32 + 16), rows and columns not multiples of the tiles, one-token rows."""
    g = torch.Generator().manual_seed(m + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    qa, sa = quantize_activations(x.to(DEVICE), bk)
    qw, sw = quantize_per_row(w.to(DEVICE), bk)
    out = block_fp8_matmul(qa, sa, qw, sw, bk, torch.float32)
    ref = block_fp8_matmul_ref(qa, sa, qw, sw, bk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_quantized_activations_and_weights_round_trip_within_fp8_precision():
    """e4m3 keeps 3 mantissa bits: every element within 2^-4 of its value, or, where it is FP8-subnormal, within
    2^-9 of its group's scale (half the smallest subnormal step of 2^-9, with room)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 80, generator=g) * torch.logspace(-2, 2, 80)
    for group in (None, 16, 32):
        q, s = quantize_activations(x, group)
        back = dequantize(q, s, group or 80)
        assert s.shape == (6, 1 if group is None else -(-80 // group))
        bound = torch.maximum(x.abs() * 2**-4, expand_scale(s, 80, group or 80) * 2**-9)
        assert ((back - x).abs() <= bound).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["channel", "block"])
def test_fp8_linear_on_gpu_close_to_fp32_matmul_of_dequantized_weights(kind):
    """Llama-3-8B's gate/up shape at 7 tokens (the decode GEMV) and 300 (activations quantized): the FP8 GEMM's max
    relative error vs an fp32 matmul of the dequantized weight and the unquantized activations (at 300 tokens, what
    FP8 activations cost), printed for the report."""
    torch.manual_seed(0)
    n, k = 2 * 14336, 4096
    w = torch.randn(n, k, device="cuda") * 0.02
    qw, sw = quantize_per_row(w, 128 if kind == "block" else None)
    bk = 128 if kind == "block" else k
    for m in (7, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = fp8_linear(x, qw, sw, bk).float()
        ref = x.float() @ dequantize(qw, sw, bk).t()
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"fp8_linear {kind} m={m}: max relative error {rel:.4f}")
        assert rel < 0.03


@pytest.mark.parametrize("m,k,group", [(3, 80, 32), (5, 64, None), (1, 200, 128)])
def test_activation_quantization_kernel_matches_torch(m, k, group):
    """The fused per-token (group) quantization kernel gives the reference's scales and FP8 values. Under the
    interpreter its float-to-e4m3 cast does not carry a rounding overflow into the exponent (31.9 becomes 16, not 32;
    the GPU's conversion does): there, values that round up to a power of two are left out of the comparison."""
    from server.kernels import fp8_gemm

    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(DEVICE)
    q, s = fp8_gemm.quantize_activations_triton(x, group)
    q_ref, s_ref = fp8_gemm.quantize_activations(x.cpu(), group)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)
    ref = q_ref.float()
    compared = torch.ones_like(ref, dtype=torch.bool)
    if not torch.cuda.is_available():
        compared = torch.frexp(ref).mantissa.abs() != 0.5
    assert torch.equal(q.cpu().float()[compared], ref[compared])


def test_emulated_w8a8_quantizes_where_a_bf16_gpu_run_would(monkeypatch):
    """fp8_gemm.EMULATE_W8A8 (the CPU reference of the GPU's recipe): rows a bf16 GPU run gives to the decode GEMV
    and calls that opt out (MoE experts) keep their activations; more rows are quantized per token first."""
    from server.kernels import fp8_gemm
    from server.kernels.fp8 import quantize_per_row

    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_per_row(torch.randn(48, 64, generator=gen), None)
    monkeypatch.setattr(fp8_gemm, "EMULATE_W8A8", True)
    few = torch.randn(fp8_gemm.GEMV_MAX_ROWS, 64, generator=gen)
    torch.testing.assert_close(fp8_gemm.fp8_linear(few, q, scale, 64), fp8_gemm.fp8_linear_ref(few, q, scale, 64),
                               atol=0, rtol=0)
    many = torch.randn(fp8_gemm.GEMV_MAX_ROWS + 8, 64, generator=gen)
    xq, xs = fp8_gemm.quantize_activations(many, None)
    want = fp8_gemm.fp8_linear_ref(xq.float() * xs, q, scale, 64)
    got = fp8_gemm.fp8_linear(many, q, scale, 64)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got, fp8_gemm.fp8_linear_ref(many, q, scale, 64))
    torch.testing.assert_close(fp8_gemm.fp8_linear(many, q, scale, 64, emulate=False),
                               fp8_gemm.fp8_linear_ref(many, q, scale, 64), atol=0, rtol=0)
