"""Kernel dispatch: the fast kernel on CUDA where one exists, the plain-torch reference otherwise.

Every op here has the signature and semantics of its ``*_ref`` twin; callers never pick a backend.
"""

from __future__ import annotations

import torch

from server.kernels.lightning_ref import (
    lightning_decode_ref,
    lightning_prefill_ref,
    lightning_state_correction_ref,
)
from server.kernels.merge_state_ref import merge_states_ref

LIGHTNING_BLOCK = 64


def lightning_prefill(q, k, v, slopes, cu_seqlens, initial_states=None):
    """See :func:`server.kernels.lightning_ref.lightning_prefill_ref`."""
    return lightning_prefill_ref(q, k, v, slopes, cu_seqlens, initial_states, LIGHTNING_BLOCK)


def lightning_state_correction(o, q, slopes, cu_seqlens, states):
    """See :func:`server.kernels.lightning_ref.lightning_state_correction_ref`."""
    return lightning_state_correction_ref(o, q, slopes, cu_seqlens, states)


def lightning_decode(q, k, v, slopes, state_pool, slots):
    """See :func:`server.kernels.lightning_ref.lightning_decode_ref`."""
    return lightning_decode_ref(q, k, v, slopes, state_pool, slots)


def merge_states(o: torch.Tensor, lse: torch.Tensor):
    """See :func:`server.kernels.merge_state_ref.merge_states_ref`."""
    return merge_states_ref(o, lse)
