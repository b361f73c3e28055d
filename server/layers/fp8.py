"""FP8 (``float8_e4m3fn``) weights: the checkpoint formats, the lazy per-shard view of a quantized tensor, and the
linear method that stores FP8 weights with their scales (docs/kernels.md: FP8 GEMMs).

One scale layout serves every format: a weight ``[N, K]`` carries ``scale [N, ceil(K / bk)]`` (fp32), one scale per
output row and per block of ``bk`` input columns; ``w ~= q * scale`` (a checkpoint's ``weight_scale_inv`` is that
multiplier, despite its name).

- block-scaled (``quant_method: fp8`` with ``weight_block_size [bn, bk]``): the checkpoint's ``[ceil(N/bn),
  ceil(K/bk)]`` grid repeated over the rows of each block;
- per-channel (compressed-tensors ``strategy: channel``): ``bk = K``, one scale per row;
- per-tensor (compressed-tensors ``strategy: tensor``, fp8 without blocks): the scalar on every row.

Scales per row cost ``4 / bk`` bytes per weight (3 % at 128) and make any row cut exact: a TP shard, or the q/k/v
and gate/up parts fused into one parameter, never splits a scale. A column cut (row-parallel layers over TP) must
fall on a block boundary, or loading stops with an error naming ``--tp-size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

QUANTIZATIONS = (None, "fp8")


@dataclass(frozen=True)
class Fp8Scheme:
    """How a model's linear weights are FP8: ``block`` the checkpoint's ``(bn, bk)`` weight blocks (None for
    per-channel or per-tensor scales), ``static_activations`` whether the checkpoint gives activation scales,
    ``online`` a high-precision checkpoint quantized per channel at load (``--quantization fp8``). Layers a
    checkpoint leaves in high precision (its ``ignore`` / ``modules_to_not_convert``) have no FP8 tensors, so they
    load as they are stored."""

    block: tuple[int, int] | None = None
    static_activations: bool = False
    online: bool = False


def parse_fp8_scheme(qc: Mapping | None, quantization: str | None) -> Fp8Scheme | None:
    """The FP8 scheme of a checkpoint's ``quantization_config`` (``qc``, None if it has none) and the
    ``--quantization`` flag; None when the weights are not FP8. Raises ``ValueError`` for quantized checkpoints
    this server cannot load."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {[q for q in QUANTIZATIONS if q]} or left out, "
                         f"got {quantization!r}")
    if not qc:
        return Fp8Scheme(online=True) if quantization == "fp8" else None
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"FP8 checkpoint format {qc.get('fmt')!r} is not supported (only e4m3)")
        block = qc.get("weight_block_size")
        return Fp8Scheme(block=tuple(block) if block else None,
                         static_activations=qc.get("activation_scheme", "dynamic") == "static")
    if method == "compressed-tensors":
        return compressed_tensors_scheme(qc)
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported; this server loads 'fp8' and "
                     "'compressed-tensors' FP8 checkpoints (or a high-precision checkpoint with --quantization fp8)")


def compressed_tensors_scheme(qc: Mapping) -> Fp8Scheme:
    """A compressed-tensors config whose groups are all FP8 (8-bit float) weights: per-tensor, per-channel or
    block weight scales; dynamic (per-token) or static (per-tensor) activation scales."""
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    blocks, static = set(), set()
    for g in groups:
        w, a = g.get("weights") or {}, g.get("input_activations")
        if w.get("num_bits") != 8 or w.get("type") != "float":
            raise ValueError(f"compressed-tensors weights {w} are not FP8 (num_bits 8, type float): not supported")
        strategy = w.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported "
                             "(tensor, channel or block)")
        blocks.add(tuple(w["block_structure"]) if strategy == "block" else None)
        static.add(a is not None and not a.get("dynamic", True))
    if len(blocks) > 1 or len(static) > 1:
        raise ValueError("compressed-tensors config groups with different FP8 schemes are not supported")
    return Fp8Scheme(block=blocks.pop(), static_activations=static.pop())


# ---- a checkpoint's quantized tensor, sliced per shard -------------------------------------------------------------
def _normalize_key(key, ndim: int) -> tuple:
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        raise TypeError("FP8 weight slices take no Ellipsis")
    key = key + (slice(None),) * (ndim - len(key))
    for k in key:
        if isinstance(k, slice) and k.step not in (None, 1):
            raise TypeError("FP8 weight slices take no step")
    return key


class Fp8Weight:
    """A checkpoint's FP8 weight ``[..., N, K]`` (a tensor or a lazy safetensors slice) and its scales
    ``[..., N, kb]`` (fp32, per row as in the module docstring), read as the weight loaders read tensors:
    ``w[a:b]``, ``w[:, a:b]``, ``w[e]`` give the fp32 dequantized slice, so any loader of a high-precision
    parameter loads it (dequantized at load). :meth:`raw` gives the FP8 slice and its scales, for layers that
    store FP8. ``input_scale``: the checkpoint's static activation scale, if any."""

    def __init__(self, weight, scale: torch.Tensor, shape: tuple[int, ...], block_k: int, name: str,
                 input_scale: float | None = None):
        self.weight, self.scale, self.shape, self.name = weight, scale.float(), tuple(shape), name
        self.block_k, self.input_scale = min(block_k, self.shape[-1]), input_scale
        if self.scale.shape[:-1] != self.shape[:-1] or self.scale.shape[-1] != -(-self.shape[-1] // self.block_k):
            raise ValueError(f"{name}: scales of shape {tuple(self.scale.shape)} do not fit the weight {self.shape} "
                             f"in blocks of {block_k} columns")

    def get_shape(self) -> list[int]:
        return list(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _q(self, key: tuple) -> torch.Tensor:
        q = self.weight[key]
        return q if isinstance(q, torch.Tensor) else torch.as_tensor(q)

    def raw(self, key, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 slice ``self[key]`` and its scales ``[..., rows, kb']``. Raises ``ValueError`` when the slice
        cuts a column block (what to change: ``--tp-size``). ``block_k``: give the scales in blocks of that many
        columns instead, a divisor of the checkpoint's blocks and of the slice's first column, so a slice that
        starts or ends inside a checkpoint block is exact (each finer block repeats its checkpoint block's scale)."""
        key = _normalize_key(key, self.ndim)
        cols = key[-1]
        start, stop, _ = cols.indices(self.shape[-1]) if isinstance(cols, slice) else (cols, cols + 1, 1)
        bk = self.block_k
        if self.scale.shape[-1] > 1 and block_k is not None and block_k != bk:
            if bk % block_k or start % block_k:
                raise ValueError(f"{self.name}: blocks of {block_k} columns do not divide the checkpoint's FP8 scale "
                                 f"blocks of {bk} columns and the slice's first column {start}")
            per_column = self.scale[key[:-1]].repeat_interleave(bk, dim=-1)
            return self._q(key), per_column[..., start:stop:block_k].contiguous()
        if self.scale.shape[-1] > 1 and (start % bk or (stop % bk and stop != self.shape[-1])):
            raise ValueError(
                f"{self.name}: a tensor-parallel shard takes its input columns [{start}, {stop}) of {self.shape[-1]}, "
                f"which cuts the checkpoint's FP8 scale blocks of {bk} columns; choose a --tp-size for which "
                f"{self.shape[-1]} / tp is a multiple of {bk}")
        scale_cols = slice(start // bk, -(-stop // bk)) if self.scale.shape[-1] > 1 else slice(None)
        return self._q(key), self.scale[key[:-1] + (scale_cols,)]

    def rows(self, key) -> Fp8Weight:
        """The FP8 weight of the leading indices / output rows ``key`` (every input column), still with its scales:
        one expert ``w[e]`` or the gate or up half of a fused ``[E, 2I, K]`` tensor, read as it is sliced further."""
        key = _normalize_key(key, self.ndim)
        if key[-1] != slice(None):
            raise TypeError("Fp8Weight.rows takes leading indices and rows, not columns")
        q = self._q(key)
        return Fp8Weight(q, self.scale[key[:-1]], tuple(q.shape), self.block_k, self.name, self.input_scale)

    def __getitem__(self, key) -> torch.Tensor:
        key = _normalize_key(key, self.ndim)
        q = self._q(key).float()
        cols = key[-1]
        idx = torch.arange(self.shape[-1])[cols] // self.block_k
        scale = self.scale[key[:-1]]
        scale = scale[..., idx] if self.scale.shape[-1] > 1 else scale
        if isinstance(cols, int):
            scale = scale.squeeze(-1)
        return q * scale


def checkpoint_scale(weight_shape: tuple[int, ...], scale: torch.Tensor, block: tuple[int, int] | None,
                     name: str) -> torch.Tensor:
    """A checkpoint's weight scale in the per-row layout ``[..., N, kb]``: a block grid ``[..., ceil(N/bn), kb]``
    repeated over each block's rows, per-channel ``[N]`` / ``[N, 1]``, or per-tensor (one value, or one per expert
    of a fused ``[E, N, K]`` weight)."""
    *lead, n, k = weight_shape
    scale = scale.float()
    if block is not None:
        bn, bk = block
        grid = (*lead, -(-n // bn), -(-k // bk))
        if tuple(scale.shape) != grid:
            raise ValueError(f"{name}: block scales have shape {tuple(scale.shape)}, expected {grid} for blocks "
                             f"{list(block)} of a {list(weight_shape)} weight")
        return scale.repeat_interleave(bn, dim=-2)[..., :n, :]
    if scale.numel() == n * (1 if not lead else int(torch.tensor(lead).prod())):
        return scale.reshape(*lead, n, 1)
    if scale.numel() == (1 if not lead else int(torch.tensor(lead).prod())):  # per tensor
        return scale.reshape(*lead, 1, 1).expand(*lead, n, 1).contiguous()
    raise ValueError(f"{name}: weight scale of shape {tuple(scale.shape)} fits neither per-tensor nor per-channel "
                     f"scales of a {list(weight_shape)} weight")


