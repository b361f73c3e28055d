"""MXFP4 checkpoint tensors (OCP Microscaling, as gpt-oss ships its expert weights) dequantized at load.

A block of 32 consecutive values along the last dimension shares one E8M0 scale byte ``s`` (the power of two
``2^(s - 127)``); each value is FP4 E2M1 (1 sign bit, 2 exponent bits with bias 1, 1 mantissa bit), two per byte,
the element with the lower index in the low nibble. ``blocks`` ``[..., G, 16]`` uint8 holds G blocks of 32 values,
``scales`` ``[..., G]`` uint8 their scales; the dequantized tensor is ``[..., G * 32]``.
"""

from __future__ import annotations

import torch


def e2m1_values(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 E2M1 code points by nibble: exponent field e, mantissa m: ``0.5 * m`` when e = 0 (subnormal), else
    ``2^(e - 1) * (1 + m / 2)``; bit 3 is the sign."""
    codes = torch.arange(16)
    e, m, sign = (codes >> 1) & 3, (codes & 1).float(), 1.0 - 2.0 * ((codes >> 3) & 1).float()
    mag = torch.where(e == 0, 0.5 * m, torch.exp2(e.float() - 1) * (1 + m / 2))
    return (sign * mag).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``blocks`` ``[..., G, 16]`` uint8, ``scales`` ``[..., G]`` uint8 -> ``[..., G * 32]`` of ``dtype`` (exact:
    every MXFP4 value is a small power-of-two multiple, representable in bf16 unless its scale over- or
    underflows the type)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                         "(expected blocks [..., G, 16] with scales [..., G])")
    lut = e2m1_values(torch.float32).to(blocks.device)
    b = blocks.to(torch.uint8)
    vals = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], dim=-1).flatten(-2)  # [..., G, 32]
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return vals.flatten(-2).to(dtype)
