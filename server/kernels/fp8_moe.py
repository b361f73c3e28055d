"""Grouped matmuls of activations with FP8 MoE expert weights that read each FP8 byte once: the weight tiles are
dequantized in registers (``q * scale`` in fp32, rounded once to the activations' dtype, the numbers
:func:`server.kernels.fp8.dequantize_experts` gives), for the sync-free forms of :class:`server.layers.moe.FusedMoE`.

Weights ``w [G, N, K]`` FP8 with scales ``[G, N, kb]`` (per row and block of ``block_k`` columns,
:mod:`server.layers.fp8`):
- :func:`experts_fp8_matmul` ``x [M, G*K] -> sum_g x[:, g] @ w[g]^T [M, N]``: the dense form, every expert on every
  token (gate/up as G = 1 over the flattened ``[E*2I, hidden]``; down as G = E over the routing-weighted activations
  ``[T, E*I]``, the sum over experts done in the kernel);
- :func:`gathered_fp8_matmul` ``x [P, K], index [P] -> x[p] @ w[index[p]]^T [P, N]``: the gathered form, one
  (token, expert) pair per row.

CUDA runs the Triton kernels (also under ``TRITON_INTERPRET=1``, where the tests run them on CPU); other devices, and
scale blocks a tile cannot stay inside (blocks that are not a power of two >= 16), the torch references: the weights
dequantized (:func:`dequantize_experts`) and torch matmuls in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.fp8 import dequantize_experts
from server.kernels.triton_env import interpreted

BLOCK_N = 64


def _tile_k(kb: int, block_k: int) -> int | None:
    """Columns per K tile so that a tile lies inside one scale block (None: no such tile for the kernels)."""
    if kb == 1:
        return 64
    if block_k >= 16 and not block_k & (block_k - 1):
        return min(64, block_k)
    return None


def _use_kernel(x: torch.Tensor, tile: int | None) -> bool:
    return tile is not None and (x.is_cuda or interpreted()) and x.shape[0] > 0


@triton.jit
def _experts_matmul_kernel(X, W, S, OUT, M, N, K, G, G_PER, BK_SCALE, s_xm, s_wg, s_wn, s_sg, s_sn, s_op, s_om,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``OUT[split, m, n] = sum_{g in split's experts} sum_k X[m, g*K + k] * W[g, n, k] * S[g, n, k // BK_SCALE]``.
    X ``[M, G*K]`` (contiguous columns), W ``[G, N, K]`` FP8 as uint8 (contiguous K), S ``[G, N, kb]`` fp32, OUT
    ``[splits, M, N]`` fp32. One program per (M tile, N tile, split of ``G_PER`` experts); a K tile lies inside one
    scale block (``BLOCK_K`` divides ``BK_SCALE``, or one block spans every column). ``UPCAST``: multiply in fp32
    (the interpreter's half-precision dot is wrong; the tile is rounded to x's dtype first either way)."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(pid_s * G_PER, tl.minimum(pid_s * G_PER + G_PER, G)):
        g64 = tl.cast(g, tl.int64)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(X + offs_m[:, None].to(tl.int64) * s_xm + g64 * K + k[None, :],
                        mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
            q = tl.load(W + g64 * s_wg + offs_n[None, :].to(tl.int64) * s_wn + k[:, None],
                        mask=mask_n[None, :] & (k[:, None] < K), other=0).to(tl.float8e4nv, bitcast=True)
            s = tl.load(S + g64 * s_sg + offs_n.to(tl.int64) * s_sn + k0 // BK_SCALE, mask=mask_n, other=0.0)
            w = (q.to(tl.float32) * s[None, :]).to(x.dtype)
            if UPCAST:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(OUT + pid_s.to(tl.int64) * s_op + offs_m[:, None].to(tl.int64) * s_om + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gathered_matmul_kernel(X, W, S, INDEX, OUT, N, K, BK_SCALE, s_xm, s_wg, s_wn, s_sg, s_sn, s_om,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``OUT[p, n] = sum_k X[p, k] * W[g, n, k] * S[g, n, k // BK_SCALE]`` with ``g = INDEX[p]``: one program per
    (row, N tile), a matrix-vector product (rows of different experts share no weight tile). Layouts as
    :func:`_experts_matmul_kernel`'s with G = E; OUT ``[P, N]`` fp32."""
    p, pid_n = tl.program_id(0), tl.program_id(1)
    g = tl.load(INDEX + p).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(X + p.to(tl.int64) * s_xm + k, mask=k < K, other=0.0)
        q = tl.load(W + g * s_wg + offs_n[:, None].to(tl.int64) * s_wn + k[None, :],
                    mask=mask_n[:, None] & (k[None, :] < K), other=0).to(tl.float8e4nv, bitcast=True)
        s = tl.load(S + g * s_sg + offs_n.to(tl.int64) * s_sn + k0 // BK_SCALE, mask=mask_n, other=0.0)
        w = (q.to(tl.float32) * s[:, None]).to(x.dtype)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(OUT + p.to(tl.int64) * s_om + offs_n, acc, mask=mask_n)


def experts_fp8_matmul_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """The reference of :func:`experts_fp8_matmul`: the experts dequantized to x's dtype, one batched matmul, summed
    over experts."""
    g, n, k = w.shape
    deq = dequantize_experts(w, scale, block_k, x.dtype)
    return torch.bmm(x.view(x.shape[0], g, k).transpose(0, 1), deq.transpose(1, 2)).sum(0)


def experts_fp8_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """``x [M, G*K]`` times FP8 ``w [G, N, K]`` (scales ``[G, N, kb]``, blocks of ``block_k`` columns), summed over
    the G experts -> ``[M, N]`` in x's dtype."""
    g, n, k = w.shape
    tile = _tile_k(scale.shape[-1], block_k)
    if not _use_kernel(x, tile):
        return experts_fp8_matmul_ref(x, w, scale, block_k)
    m = x.shape[0]
    x, scale = x.contiguous(), scale.contiguous()
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, BLOCK_N)
    # split the experts over programs when the output has few tiles (the down projection: hidden / 64 tiles), so
    # the weights are read by enough programs to fill the device; the splits' partial sums are added here
    splits = min(g, max(1, triton.cdiv(256, tiles)))
    per = triton.cdiv(g, splits)
    splits = triton.cdiv(g, per)
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _experts_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N), splits)](
        x, w.view(torch.uint8), scale, out, m, n, k, g, per, block_k if scale.shape[-1] > 1 else k,
        x.stride(0), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=tile, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=interpreted())
    return (out[0] if splits == 1 else out.sum(0)).to(x.dtype)


def gathered_fp8_matmul_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int,
                            index: torch.Tensor) -> torch.Tensor:
    """The reference of :func:`gathered_fp8_matmul`: each row's expert dequantized to x's dtype, a batched
    matrix-vector product."""
    deq = dequantize_experts(w, scale, block_k, x.dtype, index)
    return torch.bmm(deq, x.unsqueeze(-1)).squeeze(-1)


def gathered_fp8_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int,
                        index: torch.Tensor) -> torch.Tensor:
    """Row ``p`` of ``x [P, K]`` times FP8 expert ``w[index[p]]`` (``w [E, N, K]``, scales ``[E, N, kb]``) ->
    ``[P, N]`` in x's dtype."""
    _, n, k = w.shape
    tile = _tile_k(scale.shape[-1], block_k)
    if not _use_kernel(x, tile):
        return gathered_fp8_matmul_ref(x, w, scale, block_k, index)
    p = x.shape[0]
    x, scale = x.contiguous(), scale.contiguous()
    out = torch.empty(p, n, dtype=torch.float32, device=x.device)
    _gathered_matmul_kernel[(p, triton.cdiv(n, BLOCK_N))](
        x, w.view(torch.uint8), scale, index.contiguous(), out, n, k, block_k if scale.shape[-1] > 1 else k,
        x.stride(0), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_K=tile)
    return out.to(x.dtype)
