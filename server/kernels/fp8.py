"""FP8 (``float8_e4m3fn``) numerics shared by the weight and KV-cache paths: quantize and dequantize with fp32 scales
(the torch reference of every FP8 kernel), and FP8 tensors moved as bytes.

Weights carry ``scale [..., N, kb]``, one fp32 scale per output row and per block of ``bk`` input columns
(docs/kernels.md, "FP8 GEMMs"); KV pages one per-tensor scale (docs/server.md, "FP8").
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def expand_scale(scale: torch.Tensor, k: int, block_k: int) -> torch.Tensor:
    """``[..., N, kb]`` scales -> ``[..., N, k]``: column block j covers columns ``[j*bk, (j+1)*bk)`` (the last one
    may be short); one block (kb = 1) covers every column."""
    return scale.repeat_interleave(block_k, dim=-1)[..., :k] if scale.shape[-1] > 1 else scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """fp32 weight ``q * scale`` of an FP8 ``[..., N, K]`` tensor and its ``[..., N, kb]`` scales of blocks of
    ``block_k`` columns."""
    k, kb = q.shape[-1], scale.shape[-1]
    if kb > 1 and k == kb * block_k:  # whole blocks: broadcast each block's scale, no [..., N, K] copy of the scales
        return (q.float().unflatten(-1, (kb, block_k)) * scale.float().unsqueeze(-1)).flatten(-2)
    return q.float() * expand_scale(scale.float(), k, block_k)


# fp32 bytes one call of dequantize_experts holds at a time: a layer's experts are dequantized a few at a time, so the
# transient is the output (in the compute dtype) plus this, never a whole layer in fp32
DEQUANTIZE_CHUNK_BYTES = 256 << 20


def dequantize_experts(q: torch.Tensor, scale: torch.Tensor, block_k: int, dtype: torch.dtype,
                       index: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 expert weights ``q [E, N, K]`` with scales ``[E, N, kb]`` -> ``[P, N, K]`` in ``dtype``: the experts
    ``index [P]`` names (every expert if None), each value ``q * scale`` in fp32 rounded once to ``dtype``. No host
    sync (CUDA graphs): the chunks of experts are fixed by the shapes."""
    n = q.shape[0] if index is None else index.shape[0]
    out = torch.empty(n, *q.shape[1:], dtype=dtype, device=q.device)
    per = max(1, DEQUANTIZE_CHUNK_BYTES // max(1, q[0].numel() * 4))
    for a in range(0, n, per):
        b = min(n, a + per)
        rows = slice(a, b) if index is None else index[a:b]
        out[a:b] = dequantize(take_rows(q, rows), scale[rows], block_k)
    return out


def quantize_per_row(w: torch.Tensor, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``q`` and fp32 ``scale [..., N, kb]`` with ``w ~= q * scale``: the scale of each row (and block of
    ``block_k`` columns; the whole row if None) maps its largest magnitude to the FP8 maximum."""
    k = w.shape[-1]
    bk = block_k or k
    kb = -(-k // bk)
    pad = kb * bk - k
    wf = torch.nn.functional.pad(w.float(), (0, pad)).unflatten(-1, (kb, bk))
    scale = (wf.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    q = (wf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k].to(FP8)
    return q, scale


def kv_quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """K or V rows -> FP8 pages: ``x / scale`` rounded to e4m3 (saturating at +-448)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def kv_dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """FP8 pages -> ``dtype`` values ``x * scale`` (the same products wherever a kernel or the reference reads them)."""
    return (x.float() * scale).to(dtype)


def kv_round(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` as an FP8 cache stores it: what every reader of the pages sees."""
    return kv_dequantize(kv_quantize(x, scale), scale, x.dtype)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor's storage as uint8 (a view), other tensors as they are: indexing, scatters and transfers move
    bytes, and every device and collective backend handles uint8."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def take_rows(t: torch.Tensor, index) -> torch.Tensor:
    """``t[index]`` for any dtype (FP8 through its bytes)."""
    return raw_bytes(t)[index].view(t.dtype)
