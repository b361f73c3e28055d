"""Read an FP8 checkpoint: each quantized weight comes with its scales as one :class:`Fp8Weight`.

Scales live beside their weight (``<name>_scale_inv`` for ``quant_method: fp8``, ``<name>_scale`` for
compressed-tensors), possibly in another safetensors file, so every file stays open while the tensors are read
(memory-mapped; nothing is read before a loader slices it). The scale and activation-scale tensors themselves are
not passed on: model loaders see one entry per weight, as in a high-precision checkpoint.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Iterator

from safetensors import safe_open

from server.layers.fp8 import Fp8Scheme, Fp8Weight, checkpoint_scale

log = logging.getLogger(__name__)

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "k_scale", "v_scale")
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")  # per-tensor KV-cache scales (read_kv_scales)
FP8_DTYPES = ("F8_E4M3",)


def iterate_fp8_checkpoint(model_path: str, scheme: Fp8Scheme) -> Iterator[tuple[str, object]]:
    """Every (name, tensor) of the directory's safetensors files: FP8 weights as :class:`Fp8Weight` (their
    scales in the per-row layout of :mod:`server.layers.fp8`), other tensors as lazy slices."""
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_path!r} has no *.safetensors files (use --load-format dummy for random weights)")
    with contextlib.ExitStack() as stack:
        where = {}
        for path in files:
            f = stack.enter_context(safe_open(path, framework="pt"))
            where.update(dict.fromkeys(f.keys(), f))
        fp8 = 0
        for name, f in where.items():
            if name.endswith(SCALE_SUFFIXES):
                continue
            sl = f.get_slice(name)
            if sl.get_dtype() not in FP8_DTYPES:
                yield name, sl
                continue
            scale_name = next((name + s for s in ("_scale_inv", "_scale") if name + s in where), None)
            if scale_name is None:
                raise ValueError(f"{model_path}: FP8 tensor {name!r} has no {name}_scale_inv or {name}_scale")
            shape = tuple(sl.get_shape())
            scale = checkpoint_scale(shape, where[scale_name].get_tensor(scale_name), scheme.block, name)
            prefix = name.removesuffix("weight")
            act = prefix + "input_scale"
            input_scale = float(where[act].get_tensor(act).float().max()) if act in where else None
            fp8 += 1
            block_k = scheme.block[1] if scheme.block else shape[-1]
            yield name, Fp8Weight(sl, scale, shape, block_k, name, input_scale)
        log.info("read %d FP8 weights with their scales (%s)", fp8,
                 f"blocks {list(scheme.block)}" if scheme.block else "per-channel / per-tensor scales")


def read_kv_scales(model_path: str) -> dict[str, float]:
    """The checkpoint's per-tensor KV-cache scales, by tensor name (``...self_attn.k_scale``, ``...v_scale``, also
    under ``attn.`` or ``k_proj.`` / ``v_proj.`` as quantizers write them); empty when it has none."""
    out = {}
    for path in sorted(glob.glob(os.path.join(model_path, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name.endswith(KV_SCALE_SUFFIXES):
                    out[name] = float(f.get_tensor(name).float().max())
    return out


def kv_scale_of(scales: dict[str, float], block: str, which: str) -> float | None:
    """The ``k`` or ``v`` scale of the attention block named ``block`` (``layers.3.self_attn``), if stored."""
    for name in (f"{block}.{which}_scale", f"{block}.attn.{which}_scale", f"{block}.{which}_proj.{which}_scale"):
        for full in (name, "model." + name):
            if full in scales:
                return scales[full]
    return None
