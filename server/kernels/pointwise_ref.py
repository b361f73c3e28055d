"""Row-wise and element-wise ops of the decoder layers, in plain torch: RMSNorm, SiLU-and-multiply, RoPE.

These are the references (and the CPU path) of :mod:`server.kernels.pointwise`. Each rounds where the reference
models (``transformers``) round: in bf16 a product or sum of two half-precision tensors is computed in fp32 and
rounded once; the Triton kernels round at the same places.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32. Standard: ``weight * norm(x).to(x.dtype)`` (Llama, Qwen,
    MiniMax). ``zero_centered``: ``(norm(x) * (1 + weight)).to(x.dtype)`` in fp32 (Qwen3.5 / Qwen3-Next, whose
    checkpoints store the weight as an offset from one)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def silu_and_mul_ref(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` along the last dim (the merged gate/up projection's output)."""
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``rot = cos.shape[-1]`` features of ``x [T, H, D]`` (the rest pass through);
    ``cos``/``sin [T, rot]`` in x's dtype, each the concatenation of two equal halves."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    out = xr * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)
