"""Where the Triton kernels run, asked once: whether Triton interprets them on CPU (``TRITON_INTERPRET=1``, as the
CPU tests set it), and how many streaming multiprocessors a CUDA device has (what grids are sized to fill)."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The SMs to fill: the CUDA device's (its index, or the current device); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
