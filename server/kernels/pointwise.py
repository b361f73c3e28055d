"""RMSNorm, SiLU-and-multiply and RoPE as one Triton kernel each (the semantics of :mod:`server.kernels.pointwise_ref`).

In torch these are 8 (RMSNorm), 2 (SiLU and multiply) and about 10 (RoPE on q and k) kernels per call. In a decode
step replayed from a CUDA graph each tiny kernel still costs a few microseconds of GPU time, and a Llama-3-8B layer
calls them ~40 times: about a thousand launches per token, milliseconds against a weight read of ~4 ms. Here each op
is one launch. The kernels round where the torch forms round (every half-precision product or sum rounded once), so
they differ from the references only where fp32 arithmetic differs: RMSNorm's sum of squares in another order, the
exp and rsqrt of another library, and on a GPU a product and a sum that the compiler fuses into one multiply-add
(a rounded intermediate can land one unit in the last place apart; tests/kernels/test_pointwise_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_NORM_WIDTH = 16384  # one program holds a whole row in registers


@triton.jit
def _rms_norm_kernel(X, W, OUT, NB, H, s_xa, s_xb, eps, BLOCK: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    """One program per row; rows are (a, b) pairs of a ``[A, B, H]`` view with strides (s_xa, s_xb, 1)."""
    row = tl.program_id(0)
    a = (row // NB).to(tl.int64)
    b = (row % NB).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(X + a * s_xa + b * s_xb + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd
    if ZERO_CENTERED:
        out = y * (1.0 + w)
    else:
        out = w * y.to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row.to(tl.int64) * H + offs, out.to(OUT.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """:func:`server.kernels.pointwise_ref.rms_norm_ref` for a last dim of at most ``MAX_NORM_WIDTH`` with stride 1;
    the output is a new contiguous tensor of x's shape and dtype."""
    h, shape = x.shape[-1], x.shape
    if x.dim() not in (2, 3):
        x = x.reshape(-1, h)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 2:
        nb, s_xa, s_xb = 1, x.stride(0), 0
    else:
        nb, s_xa, s_xb = x.shape[1], x.stride(0), x.stride(1)
    rows = x.numel() // h
    if rows:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(rows,)](x, weight, out, nb, h, s_xa, s_xb, eps, BLOCK=block, ZERO_CENTERED=zero_centered,
                                  num_warps=min(16, max(4, block // 512)))
    return out.view(shape)


@triton.jit
def _silu_and_mul_kernel(H, OUT, N_INTER, s_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N_INTER
    src = H + row * s_h
    g = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + N_INTER + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * N_INTER + offs, (s * u).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul_triton(h: torch.Tensor) -> torch.Tensor:
    """:func:`server.kernels.pointwise_ref.silu_and_mul_ref` (last dim of stride 1)."""
    two_i = h.shape[-1]
    inter = two_i // 2
    h2 = h.reshape(-1, two_i)
    out = torch.empty(h2.shape[0], inter, dtype=h.dtype, device=h.device)
    if h2.shape[0] and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(h2.shape[0], triton.cdiv(inter, block))](h2, out, inter, h2.stride(0), BLOCK=block)
    return out.view(*h.shape[:-1], inter)


@triton.jit
def _rope_kernel(X, COS, SIN, NH, HALF, s_xt, s_xh, s_ct, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """In place: program (t, head block) rotates the first 2*HALF features of BLOCK_H heads of token t."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HALF
    mask = (heads < NH)[:, None] & mask_d[None, :]
    c = tl.load(COS + t * s_ct + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + t * s_ct + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    ptr = X + t * s_xt + heads.to(tl.int64)[:, None] * s_xh + d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = X.dtype.element_ty
    # as torch computes x * cos + rotate_half(x) * sin in x's dtype: each product and the sum rounded once
    o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(ptr, o1, mask=mask)
    tl.store(ptr + HALF, o2, mask=mask)


def rope_triton_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`server.kernels.pointwise_ref.rope_ref` written into ``x [T, H, D]`` (last dim of stride 1; a view
    into a larger buffer is fine); returns x. ``cos``/``sin [T, rot]`` contiguous in their last dim."""
    t, nh, _ = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    half = cos.shape[-1] // 2
    if t and nh and half:
        block_d = triton.next_power_of_2(half)
        block_h = max(1, min(triton.next_power_of_2(nh), 2048 // block_d))
        _rope_kernel[(t, triton.cdiv(nh, block_h))](x, cos, sin, nh, half, x.stride(0), x.stride(1), cos.stride(0),
                                                    BLOCK_H=block_h, BLOCK_D=block_d)
    return x
