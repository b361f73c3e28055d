"""Attention backends: one interface, ``prepare(step metadata)`` once per step and ``forward`` per layer.

- :mod:`.attention`: the interface and what every backend shares: the per-kind batches of local attention (the kind
  choice and its thresholds, in one place), the KV writes, the ring over SP for split requests, the LSE merge of
  replicated rows over SP.
- :mod:`.torch_backend`: plain-torch references (every device; CPU, fp32, and the tests' reference).
- :mod:`.flashinfer_backend`: flashinfer's batch wrappers on CUDA, planned once per step, and their CUDA-graph
  form for decode.

:func:`make_attention_backend` picks one from ``--attention-backend``, the device and the dtype.
"""

from __future__ import annotations

import torch

from server.backends.attention import AttentionBackend, AttentionGeometry
from server.sp.groups import ParallelState


def make_attention_backend(name: str, pstate: ParallelState, page_size: int, geometry: AttentionGeometry | None,
                           dtype: torch.dtype) -> AttentionBackend:
    """``auto``: flashinfer on CUDA where it takes this model (installed, fp16/bf16, head dim 64/128/256), the torch
    references otherwise; ``flashinfer``: required (ValueError if it cannot run); ``torch``: the references."""
    from server.backends.torch_backend import TorchAttentionBackend

    if name != "torch" and pstate.device.type == "cuda" and geometry is not None:
        from server.backends.flashinfer_backend import FlashInferAttentionBackend, flashinfer_takes

        reason = flashinfer_takes(geometry, dtype)
        if reason is None:
            return FlashInferAttentionBackend(pstate, page_size, geometry, dtype)
        if name == "flashinfer":
            raise ValueError(f"--attention-backend flashinfer cannot run this model: {reason}")
    elif name == "flashinfer":
        raise ValueError("--attention-backend flashinfer needs a CUDA device; use auto or torch")
    return TorchAttentionBackend(pstate, page_size)
