"""--attention-backend: unknown names and a missing flashinfer are start-up errors that say what to do."""

from __future__ import annotations

import importlib.util

import pytest

from server.config import EngineConfig
from server.kernels import ops


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="attention-backend"):
        EngineConfig(attention_backend="triton").validate()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_kernel_backend("bogus")


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None, reason="flashinfer is installed")
def test_flashinfer_backend_needs_flashinfer():
    with pytest.raises(ValueError, match="flashinfer is not installed"):
        ops.set_kernel_backend("flashinfer")
    ops.set_kernel_backend("auto")
