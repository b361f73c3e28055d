"""FP8 GEMMs ``y = x W^T`` for weights stored as FP8 with per-row scales ``[N, kb]`` (:mod:`server.layers.fp8`).

- Up to ``GEMV_MAX_ROWS`` rows of bf16 / fp16 activations (decode): :func:`server.kernels.fp8_gemv.fp8_gemv`, one
  kernel that reads each FP8 weight byte once, converts it in registers and multiplies x as it is (no activation
  quantization), whatever the scales' blocks.
- ``kb == 1`` (per-channel / per-tensor checkpoints, ``--quantization fp8``): activations quantized per token
  (or with the checkpoint's static scale), one ``torch._scaled_mm`` with row-wise scales (Hopper FP8 tensor cores).
- ``kb > 1`` with at least ``BLOCK_DEQUANT_MIN_ROWS`` rows: the weight dequantized to x's dtype, one dense GEMM.
- ``kb > 1`` (block-scaled checkpoints, blocks of ``bk`` input columns): activations quantized per token in groups
  of ``bk`` columns, then :func:`block_fp8_matmul` (Triton): each K block's FP8 product is scaled by the token's
  group scale and the weight row's block scale and accumulated in fp32.
- CPU (no FP8 GEMM), or shapes ``_scaled_mm`` / the Triton GEMM do not take (blocks that are not a power of two
  >= 16, e.g. the finer blocks a TP slice of MoE experts stores when it cuts the checkpoint's blocks): the torch
  reference, the weight dequantized and a plain matmul in the activations' dtype (fp32 on CPU: what
  ``transformers`` computes on the dequantized weights).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from server.kernels.fp8 import FP8, FP8_MAX, dequantize, dequantize_experts
from server.kernels.fp8_gemv import GEMV_MAX_ROWS, fp8_gemv, gemv_applies
from server.kernels.triton_env import interpreted

# Off CUDA, quantize the activations where a bf16 CUDA run quantizes them (the "scaled_mm" and "block" paths of
# :func:`cuda_path`: per token, or per token and group of ``bk`` columns; the checkpoint's static scale where it has
# one) before the fp32 product: the CPU reference of the GPU's recipe (tests/models/test_fp8_gpu.py). Off by default:
# the CPU path computes what ``transformers`` computes on the dequantized weights.
EMULATE_W8A8 = os.environ.get("SERVER_FP8_EMULATE_W8A8") == "1"
# From this many rows (prefill chunks) a block-scaled FP8 linear dequantizes its weight to x's dtype and runs the
# dense GEMM: on an H100 the Triton block-scaled GEMM took 1.8 to 2.6x bf16's time at 8192 rows (benchmarks/results/
# fp8_h100.md), while the dequantization is one read of the FP8 weight and one write in bf16.
BLOCK_DEQUANT_MIN_ROWS = 1024


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: ``x @ dequantize(w, scale)^T (+ bias)`` in x's dtype."""
    return F.linear(x, dequantize(w, scale, block_k).to(x.dtype), bias)


@triton.jit
def _quantize_groups_kernel(X, Q, S, K, G, KB, s_xm, s_qm, BLOCK: tl.constexpr):
    """One program per (row, group of ``G`` columns): ``S[row, group] = max(amax / 448, 1e-12)`` and
    ``Q = x / S`` in e4m3 (stored as uint8 bits). X ``[M, K]`` with contiguous columns."""
    row, grp = tl.program_id(0), tl.program_id(1)
    cols = grp * G + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < G) & (cols < K)
    x = tl.load(X + row.to(tl.int64) * s_xm + cols, mask=mask, other=0.0).to(tl.float32)
    # IEEE-rounded divisions (div_rn): a plain ``/`` compiles to the GPU's approximate division, whose last-bit
    # differences change the scales and flip FP8 roundings against the torch reference
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), 448.0), 1e-12)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(Q + row.to(tl.int64) * s_qm + cols, q.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
    tl.store(S + row * KB + grp, scale)


def quantize_activations_triton(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_activations` (dynamic scales) in one kernel: one read of x, one write of q."""
    m, k = x.shape
    g = group or k
    kb = -(-k // g)
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    scale = torch.empty(m, kb, dtype=torch.float32, device=x.device)
    if m:
        _quantize_groups_kernel[(m, kb)](x, q, scale, k, g, kb, x.stride(0), q.stride(0),
                                         BLOCK=triton.next_power_of_2(g))
    return q.view(FP8), scale


def quantize_activations(x: torch.Tensor, group: int | None, static_scale: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``q [M, K]`` and fp32 ``scale [M, kb]``: per token (``group`` None, kb = 1) or per token and group of
    ``group`` columns (the last group may be short); ``static_scale`` (per-tensor) replaces the dynamic scales.
    The torch reference; CUDA runs :func:`quantize_activations_triton` for dynamic scales."""
    if x.is_cuda and static_scale is None:
        return quantize_activations_triton(x, group)
    m, k = x.shape
    if static_scale is not None:
        scale = torch.full((m, 1), static_scale, dtype=torch.float32, device=x.device)
        return (x.float() / static_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    g = group or k
    kb = -(-k // g)
    xf = F.pad(x.float(), (0, kb * g - k)).view(m, kb, g)
    scale = (xf.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).view(m, kb * g)[:, :k].to(FP8)
    return q, scale


def cuda_path(rows: int, n: int, k: int, kb: int, block_k: int, dtype: torch.dtype) -> str:
    """The path :func:`fp8_linear` takes on CUDA for ``rows`` of ``dtype`` times ``w [n, k]`` with ``kb`` scale
    blocks of ``block_k`` columns: "gemv", "scaled_mm", "dequantize", "block" or "reference" (module docstring)."""
    if 0 < rows <= GEMV_MAX_ROWS and gemv_applies(rows, kb, block_k, dtype):
        return "gemv"
    if kb == 1 and k % 16 == 0 and n % 16 == 0 and rows > 0:
        return "scaled_mm"
    if kb > 1 and rows >= BLOCK_DEQUANT_MIN_ROWS:
        return "dequantize"
    if kb > 1 and rows > 0 and block_k >= 16 and not block_k & (block_k - 1):
        return "block"
    return "reference"


def _emulated_w8a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int,
                   bias: torch.Tensor | None, input_scale: float | None) -> torch.Tensor:
    """The reference with x first quantized and dequantized as the CUDA path a bf16 run takes would (EMULATE_W8A8)."""
    x2 = x.reshape(-1, x.shape[-1])
    kb = scale.shape[1]
    if cuda_path(x2.shape[0], w.shape[0], x2.shape[1], kb, block_k, torch.bfloat16) in ("scaled_mm", "block"):
        q, xs = quantize_activations(x2, block_k if kb > 1 else None, input_scale)
        x = (q.float() * xs if xs.shape[1] == 1 else dequantize(q, xs, block_k)).to(x.dtype).view(x.shape)
    return fp8_linear_ref(x, w, scale, block_k, bias)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int,
               bias: torch.Tensor | None = None, input_scale: float | None = None,
               emulate: bool = True) -> torch.Tensor:
    """``x [..., K]`` times FP8 ``w [N, K]`` with ``scale [N, kb]`` (blocks of ``block_k`` columns) -> ``[..., N]``
    in x's dtype (see the module docstring for the path each case takes). ``emulate``: whether EMULATE_W8A8 applies
    to this call off CUDA (False for MoE experts, whose CUDA forms never quantize activations)."""
    if not x.is_cuda:
        if EMULATE_W8A8 and emulate and x.numel():
            return _emulated_w8a8(x, w, scale, block_k, bias, input_scale)
        return fp8_linear_ref(x, w, scale, block_k, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n, kb = w.shape[0], scale.shape[1]
    path = cuda_path(x2.shape[0], n, k, kb, block_k, x.dtype)
    if path == "gemv":  # few rows (decode): the weight read once, converted in registers, x as it is
        return fp8_gemv(x2, w, scale, block_k, bias).view(*lead, n)
    if path == "scaled_mm":
        q, xs = quantize_activations(x2, None, input_scale)
        y = torch._scaled_mm(q, w.t(), scale_a=xs, scale_b=scale.view(1, n), out_dtype=torch.bfloat16)
        y = y.to(x.dtype)
    elif path == "dequantize":
        y = F.linear(x2, dequantize_experts(w.unsqueeze(0), scale.unsqueeze(0), block_k, x.dtype)[0])
    elif path == "block":
        q, xs = quantize_activations(x2, block_k, input_scale)
        if input_scale is not None:
            xs = xs.expand(-1, kb)
        y = block_fp8_matmul(q, xs, w, scale, block_k, x.dtype)
    else:
        y = fp8_linear_ref(x2, w, scale, block_k)
    if bias is not None:
        y = y + bias
    return y.view(*lead, n)


@triton.jit
def _block_fp8_matmul_kernel(A, A_SCALE, B, B_SCALE, C, M, N, K, KB,
                             s_am, s_bn, s_cm,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             UPCAST: tl.constexpr):
    """``C [M, N] = sum_j (A_j B_j^T) * a_scale[:, j] b_scale[:, j]`` over K blocks j of ``BLOCK_K`` columns.
    A ``[M, K]`` and B ``[N, K]`` FP8 (as uint8, bitcast here) with contiguous K; scales ``[M, KB]`` and ``[N, KB]``
    fp32. ``UPCAST``: multiply in fp32 (the interpreter has no FP8 dot); blocks of 16 columns multiply in bf16."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, KB):
        k = j * BLOCK_K + offs_k
        a = tl.load(A + offs_m[:, None].to(tl.int64) * s_am + k[None, :], mask=mask_m[:, None] & (k[None, :] < K),
                    other=0).to(tl.float8e4nv, bitcast=True)
        b = tl.load(B + offs_n[None, :].to(tl.int64) * s_bn + k[:, None], mask=mask_n[None, :] & (k[:, None] < K),
                    other=0).to(tl.float8e4nv, bitcast=True)
        sa = tl.load(A_SCALE + offs_m * KB + j, mask=mask_m, other=0.0)
        sb = tl.load(B_SCALE + offs_n * KB + j, mask=mask_n, other=0.0)
        if UPCAST:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32))
        elif BLOCK_K < 32:  # an FP8 dot needs K tiles >= 32; e4m3 values are exact in bf16
            part = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            part = tl.dot(a, b)
        acc += part * sa[:, None] * sb[None, :]
    tl.store(C + offs_m[:, None].to(tl.int64) * s_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def block_fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     block_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 ``a [M, K]`` (scales ``[M, kb]``) times FP8 ``b [N, K]`` (scales ``[N, kb]``)^T -> ``[M, N]``: the
    block-scaled GEMM over K blocks of ``block_k`` columns (a power of two >= 16; the last block may be short)."""
    m, k = a.shape
    n, kb = b.shape[0], b_scale.shape[1]
    bk = block_k
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"the block-scaled FP8 GEMM needs K blocks that are a power of two >= 16, got {bk}")
    a, b = a.contiguous(), b.contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if interpreted() else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _block_fp8_matmul_kernel[grid](a.view(torch.uint8), a_scale.float().contiguous(), b.view(torch.uint8),
                                   b_scale.float().contiguous(), c, m, n, k, kb, a.stride(0), b.stride(0),
                                   c.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk,
                                   UPCAST=interpreted(), num_warps=4, num_stages=3)
    return c


def block_fp8_matmul_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                         block_k: int) -> torch.Tensor:
    """fp32 reference of :func:`block_fp8_matmul`: both operands dequantized, one matmul."""
    return dequantize(a, a_scale, block_k) @ dequantize(b, b_scale, block_k).t()
