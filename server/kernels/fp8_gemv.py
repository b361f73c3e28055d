"""FP8 weights times a few rows of bf16 activations (decode steps): one kernel that reads each FP8 weight byte once.

At decode sizes a linear layer is bound by reading its weight. The W8A8 path (:func:`server.kernels.fp8_gemm.
fp8_linear`: quantize the activations, then ``torch._scaled_mm``) launches two kernels and runs tensor-core tiles
built for many rows; this one reads the FP8 weight tiles, turns them into bf16 in registers and multiplies them with
the activations as they are (no activation quantization, so its error is the weight's alone).

The conversion is the part that must keep up with the memory: about 13 weight bytes per clock per SM on an H100 at
full bandwidth. The hardware converts e4m3 only to f16 (``cvt.rn.f16x2.e4m3x2``), and f16 -> bf16 takes two more
conversions; instead each 32-bit word of four FP8 codes is spread into two bf16 pairs with integer operations
(``prmt``, shift, masks: the e4m3 sign, exponent and mantissa bits land in bf16's fields, which makes the value
``2^-120`` times the code's) and one packed bf16 multiply by ``2^120`` (exact: a power of two, and every e4m3 value,
subnormals included, is a normal bf16 after it). :func:`e4m3_to_bf16_bits` is the same arithmetic in torch, for the
tests.

Scales: per output row (``kb == 1``: ``--quantization fp8``, compressed-tensors per-channel or per-tensor) multiply
the fp32 accumulator once at the end; per row and block of ``block_k`` input columns (block-scaled checkpoints)
multiply each K tile's partial product, a K tile lying inside one block. ``SPLIT_K`` > 1 splits K over programs
(few output tiles: small N), each split's fp32 partial sum stored apart and the splits added in a fixed order after
(deterministic, unlike atomics).

Under ``TRITON_INTERPRET=1`` (CPU tests) the weight tiles convert through Triton's own FP8 type and multiply in fp32
(the interpreter runs no inline PTX).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.triton_env import interpreted, sm_count

# Up to this many rows a CUDA FP8 linear with bf16 / fp16 activations runs :func:`fp8_gemv` (see
# fp8_gemm.fp8_linear); the kernel takes at most 64.
GEMV_MAX_ROWS = int(os.environ.get("SERVER_FP8_GEMV_MAX_ROWS", "32"))

# PTX for four e4m3 codes (one 32-bit word, code i in byte i) -> two bf16 pairs (codes 0, 1 in $0; 2, 3 in $1).
# prmt puts code i in the high byte of a 16-bit lane (sign at bit 15, exponent at 14..11, mantissa at 10..8); the
# shift by 4 moves exponent and mantissa to bf16's bits 10..4 (exponent field bits 3..0, mantissa bits 6..4); the
# sign stays; the product with 2^120 (0x7B80) restores the exponent bias (127 - 7). fma with -0.0 is an exact
# multiply that keeps the sign of zeros (fma.rn.bf16x2: sm_80 and newer).
_E4M3_TO_BF16_PTX = tl.constexpr("""{
.reg .b32 v0, v1, t0, t1, zero, two120, nzero;
mov.b32 zero, 0;
mov.b32 two120, 0x7B807B80;
mov.b32 nzero, 0x80008000;
prmt.b32 v0, $2, zero, 0x1404;
prmt.b32 v1, $2, zero, 0x3424;
shr.b32 t0, v0, 4;
shr.b32 t1, v1, 4;
and.b32 t0, t0, 0x07F007F0;
and.b32 t1, t1, 0x07F007F0;
and.b32 v0, v0, 0x80008000;
and.b32 v1, v1, 0x80008000;
or.b32 v0, v0, t0;
or.b32 v1, v1, t1;
fma.rn.bf16x2 $0, v0, two120, nzero;
fma.rn.bf16x2 $1, v1, two120, nzero;
}""")


def e4m3_to_bf16_bits(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's conversion in torch, word by word as the PTX does it: uint8 codes (a multiple of 4) -> bf16
    values. Used by the tests against torch's own ``float8_e4m3fn -> bfloat16``."""
    words = codes.contiguous().view(-1, 4).to(torch.int64)
    out = []
    for lo, hi in ((0, 1), (2, 3)):  # prmt 0x1404 / 0x3424: codes lo, hi into the high bytes of two 16-bit lanes
        v = (words[:, lo] << 8) | (words[:, hi] << 24)
        v = ((v >> 4) & 0x07F007F0) | (v & 0x80008000)
        out += [v & 0xFFFF, v >> 16]
    bits = torch.stack(out, 1).reshape(-1).to(torch.int32).to(torch.int16)  # two's complement of the 16 bits
    small = bits.view(torch.bfloat16)  # 2^-120 times the code's value (bf16 subnormals for e4m3 subnormals)
    return (small.double() * 2.0**120).to(torch.bfloat16).view(codes.shape)


@triton.jit
def _e4m3_to_bf16(q):
    return tl.inline_asm_elementwise(_E4M3_TO_BF16_PTX, "=r,=r,r", [q], dtype=tl.bfloat16, is_pure=True, pack=4)


@triton.jit
def _fp8_gemv_kernel(X, W, S, BIAS, Y, M, N, K, BK_SCALE, K_PER_SPLIT, s_xm, s_wn, s_sn, s_ym, s_ys,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PER_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, CONVERT: tl.constexpr):
    """``Y[m, n] = sum_k X[m, k] * W[n, k] * S[n, k // BK_SCALE] (+ BIAS[n])``. X ``[M, K]`` bf16 (contiguous K),
    W ``[N, K]`` e4m3 codes as uint8 (contiguous K), S fp32 ``[N, kb]`` (``PER_BLOCK``) or ``[N, 1]``. One program
    per (N tile, K split); rows of X beyond M are masked (no memory traffic). One split: Y ``[M, N]`` in X's dtype;
    S splits: Y ``[S, M, N]`` fp32, one partial sum per split (``s_ys`` apart; the bias added by split 0).
    ``CONVERT``: "ptx" (the integer
    spreading above), "triton" (Triton's own e4m3 -> bf16 conversion, for comparison) or "fp32" (the interpreter:
    both operands in fp32)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :]
    w_ptrs = W + offs_n[None, :].to(tl.int64) * s_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & (k[None, :] < k_end), other=0.0)
        q = tl.load(w_ptrs + k0, mask=mask_n[None, :] & (k[:, None] < k_end), other=0)
        if CONVERT == "fp32":
            part = tl.dot(x.to(tl.float32), q.to(tl.float8e4nv, bitcast=True).to(tl.float32), input_precision="ieee")
        elif CONVERT == "triton":
            part = tl.dot(x, q.to(tl.float8e4nv, bitcast=True).to(x.dtype))
        else:
            part = tl.dot(x, _e4m3_to_bf16(q).to(x.dtype))
        if PER_BLOCK:
            s = tl.load(S + offs_n.to(tl.int64) * s_sn + k0 // BK_SCALE, mask=mask_n, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if not PER_BLOCK:
        acc = acc * tl.load(S + offs_n.to(tl.int64) * s_sn, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + pid_k.to(tl.int64) * s_ys + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class GemvConfig:
    """One launch's tiles: output columns and K columns per program, K splits, warps, pipeline stages."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    convert: str = "ptx"


def default_config(m: int, n: int, k: int, block_k: int | None, sms: int = 132) -> GemvConfig:
    """The tiles for ``m`` rows of ``[n, k]`` (``block_k``: the scale blocks' columns, None for per-row scales):
    wide output tiles from 17 rows (each program reads its rows of x from L2 once per K tile, so narrow tiles would
    multiply that traffic), K tiles inside one scale block, and K split (two K tiles per split at least) until the
    programs cover the SMs twice."""
    bn = 32 if m <= 16 else 64
    bk = 256 if m <= 16 else 128
    if block_k is not None:
        bk = min(bk, block_k)
    tiles = -(-n // bn)
    split = 1
    while tiles * split < 2 * sms and k // (bk * split * 2) >= 2:  # at least two K tiles per split
        split *= 2
    return GemvConfig(bn, bk, split)


def gemv_applies(m: int, kb: int, block_k: int, dtype: torch.dtype) -> bool:
    """Whether :func:`fp8_gemv` (default tiles) takes ``m`` rows of ``dtype`` against scales of ``kb`` blocks of
    ``block_k`` columns on a GPU."""
    return (dtype in (torch.bfloat16, torch.float16) and 0 < m <= 64
            and (kb == 1 or (block_k >= 16 and not block_k & (block_k - 1))))


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int,
             bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor | None:
    """``x [M, K]`` (bf16 or fp16, few rows) times FP8 ``w [N, K]`` with ``scale [N, kb]`` (blocks of ``block_k``
    columns) ``(+ bias)`` -> ``[M, N]`` in x's dtype. None where the kernel does not apply: not CUDA (nor the
    interpreter), fp32 activations, more than 64 rows, scale blocks that are not a power of two >= 16, or a
    ``config`` whose K tiles are wider than the scale blocks."""
    if not (x.is_cuda or interpreted()) or x.dim() != 2:
        return None
    m, k = x.shape
    n, kb = w.shape[0], scale.shape[-1]
    if not gemv_applies(m, kb, block_k, x.dtype):
        return None
    sms = sm_count(x.device) if x.is_cuda else 132
    cfg = config or default_config(m, n, k, block_k if kb > 1 else None, sms)
    if kb > 1 and block_k % cfg.block_k:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    # each split covers whole K tiles (so a tile never straddles two splits, nor, block-scaled, two scale blocks)
    per = -(-k // (cfg.split_k * cfg.block_k)) * cfg.block_k
    splits = -(-k // per)
    # one split: the output in x's dtype; more: fp32 partial sums per split, added in a fixed order below (the
    # same bits every run, unlike atomics)
    y = torch.empty((m, n) if splits == 1 else (splits, m, n), dtype=x.dtype if splits == 1 else torch.float32,
                    device=x.device)
    bias = bias if bias is None or bias.stride(-1) == 1 else bias.contiguous()
    _fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x, w.view(torch.uint8), scale, bias if bias is not None else scale, y, m, n, k,
        block_k if kb > 1 else k, per, x.stride(0), w.stride(0), scale.stride(0), y.stride(-2), m * n,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PER_BLOCK=kb > 1,
        HAS_BIAS=bias is not None, CONVERT="fp32" if interpreted() else cfg.convert, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return y if splits == 1 else y.sum(0).to(x.dtype)
