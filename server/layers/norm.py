"""RMSNorm variants (computed in fp32, as the reference models do)."""

from __future__ import annotations

import torch
from torch import nn

from server.kernels import ops
from server.layers.linear import as_tensor, copy_into
from server.sp.groups import ParallelState


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, ``x * rsqrt(mean(x^2) + eps) * weight`` (computed in fp32)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class TPRMSNorm(nn.Module):
    """RMSNorm over a feature dimension that is split over TP (MiniMax's norm over all heads): the sum of
    squares is all-reduced over TP so every rank normalizes by the full-width mean.

    ``replicas`` > 1: each slice is held by that many adjacent TP ranks (KV heads fewer than TP ranks, see
    :class:`server.layers.linear.QKVParallelLinear`): rank r holds slice ``r // replicas``, and the all-reduced sum
    counts every slice ``replicas`` times, so it is divided by that."""

    def __init__(self, full_size: int, eps: float, pstate: ParallelState, dtype: torch.dtype | None = None,
                 replicas: int = 1):
        super().__init__()
        self.pstate = pstate
        self.eps = eps
        self.full_size = full_size
        self.replicas = replicas
        self.per_rank = full_size * replicas // pstate.tp_size
        self.weight = nn.Parameter(torch.ones(self.per_rank, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        s = self.pstate.tp_rank // self.replicas * self.per_rank
        copy_into(param, as_tensor(loaded[s : s + self.per_rank]), "an all-heads RMSNorm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ss = self.pstate.tp_all_reduce(xf.pow(2).sum(-1, keepdim=True))
        if self.replicas > 1:
            ss = ss / self.replicas
        xf = xf * torch.rsqrt(ss / self.full_size + self.eps)
        return self.weight * xf.to(x.dtype)


class ZeroCenteredRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint weight is stored as an offset from one (Qwen3.5 / Qwen3-Next): scales by
    ``1 + weight``, multiplied in fp32 before the cast back, as the reference does."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__(size, eps, dtype)
        self.weight.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, zero_centered=True)


class GatedRMSNorm(RMSNorm):
    """Per-head RMSNorm of a gated delta rule's output, then the gate: ``norm(x) * weight * act(z)`` with act SiLU
    (Gated DeltaNet) or sigmoid (KDA). x/z ``[..., D]`` (D = the value head dim, so no TP reduction is needed); the
    gate is applied in fp32."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None, gate: str = "silu"):
        super().__init__(size, eps, dtype)
        if gate not in ("silu", "sigmoid"):
            raise ValueError(f"gate activation must be silu or sigmoid, got {gate!r}")
        self.act = torch.nn.functional.silu if gate == "silu" else torch.sigmoid

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (super().forward(x) * self.act(z.float())).to(x.dtype)
