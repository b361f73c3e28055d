"""Rotary position embedding (RoPE) with the common Hugging Face ``rope_scaling`` types.

Supported ``rope_type``: default, linear, llama3, yarn. cos/sin are computed in fp32 from global positions
(sequence-parallel ranks hold non-contiguous positions, so the table is indexed, never sliced).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from server.kernels import ops


def rope_inv_freq(head_dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim/2]`` and the cos/sin scale (``attention_factor``) for ``params``."""
    base = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope_type == "default":
        return inv.float(), 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return (inv / factor).float(), 1.0
    if rope_type == "llama3":
        old_ctx = float(params["original_max_position_embeddings"])
        low_wl = old_ctx / float(params["low_freq_factor"])
        high_wl = old_ctx / float(params["high_freq_factor"])
        wavelen = 2 * math.pi / inv
        # Long wavelengths are interpolated by `factor`, short ones kept; the band between is blended.
        smooth = (old_ctx / wavelen - float(params["low_freq_factor"])) / (
            float(params["high_freq_factor"]) - float(params["low_freq_factor"])
        )
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, blended, out).float(), 1.0
    if rope_type == "yarn":
        old_ctx = float(params.get("original_max_position_embeddings") or max_position)
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = params.get("attention_factor")
        if attn_factor is None:
            attn_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
                else get_mscale(factor)
        beta_fast = params.get("beta_fast") or 32
        beta_slow = params.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate (divide by factor)
        inv32 = inv.float()
        return (inv32 / factor) * (1 - keep) + inv32 * keep, float(attn_factor)
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q ``[T, Hq, D]`` and k ``[T, Hk, D]`` at integer ``positions [T]`` (rotate-half layout)."""

    def __init__(self, head_dim: int, params: dict, max_position: int):
        super().__init__()
        inv, self.scale = rope_inv_freq(head_dim, params, max_position)
        self.rot_dim = 2 * inv.numel()
        self.register_buffer("inv_freq", inv, persistent=False)
        # Layers with equal frequencies share one cos/sin per forward (see ``forward``'s ``shared``).
        self.key = ("rope", head_dim, max_position, repr(sorted(params.items())))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` ``[T, rot]`` in ``dtype``: computed in fp32, then rounded, as the reference models do."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                shared: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``shared``: a dict that lives for one forward pass (``ForwardContext.shared``); the first layer stores
        its cos/sin there and the others reuse them (the positions are the same for every layer). On CUDA the
        rotation is written into q and k (see :func:`server.kernels.ops.rope`)."""
        key = (self.key, q.dtype)
        cs = shared.get(key) if shared is not None else None
        if cs is None:
            cs = self.cos_sin(positions, q.dtype)
            if shared is not None:
                shared[key] = cs
        return ops.rope(q, *cs), ops.rope(k, *cs)
