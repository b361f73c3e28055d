"""Dense weights stored 1/sp per rank (``--shard-dense-weights``): the rows of a TP slice split over the SP group.

A dense layer's weight on TP rank t is ``[rows, cols]`` (its TP slice). With ``ParallelState.dense_shards`` = P > 1
SP rank s stores only rows ``[s * R, (s + 1) * R)`` of it, ``R = ceil(rows / P)`` (the last ranks' tails are
padding), so one all-gather over the SP group (:mod:`server.layers.dense_weights`) rebuilds the whole slice in row
order. Weight loaders ask :func:`row_window` which rows of the slice a parameter holds and load only those.

Between its uses, and during decode steps whose rows every SP rank holds alike, a parameter points at its stored
rows: a layer then runs on its slice (:func:`runs_on_slice`; the outputs of the stored rows are all-gathered over SP
instead of the weights). A layer that reads a weight itself, not through its linear, marks it
(:func:`mark_read_whole`): a model with such weights always gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.sp.groups import ParallelState


@dataclass
class RowShard:
    """Where a parameter's stored rows sit in its whole (TP-slice) weight; ``stored`` is the rank's own storage,
    which the parameter's ``data`` points back to after each gathered use."""

    rows: int  # rows of the whole weight
    per_rank: int  # rows each SP rank stores (the last ranks pad)
    start: int  # the first stored row
    stored: torch.Tensor | None = None  # set once the weights are loaded and the gathers installed
    gathered: bool = False  # the parameter points at the gathered whole weight

    @property
    def end(self) -> int:
        """One past the last real row stored here (``start`` when this rank holds only padding)."""
        return max(self.start, min(self.start + self.per_rank, self.rows))


def dense_parameter(rows: int, cols: int, pstate: ParallelState, dtype: torch.dtype | None) -> nn.Parameter:
    """A ``[rows, cols]`` dense weight, stored whole or, with ``pstate.dense_shards`` > 1, as this SP rank's rows
    (zeros until loaded: the padding rows of the last ranks stay zero)."""
    p = pstate.dense_shards
    if p == 1:
        return nn.Parameter(torch.empty(rows, cols, dtype=dtype), requires_grad=False)
    per = -(-rows // p)
    param = nn.Parameter(torch.zeros(per, cols, dtype=dtype), requires_grad=False)
    param.row_shard = RowShard(rows, per, pstate.sp_rank * per)
    return param


def row_window(param: nn.Parameter) -> tuple[int, int]:
    """The rows ``[start, end)`` of the whole weight that ``param`` stores (all of them when it is not sharded)."""
    shard = getattr(param, "row_shard", None)
    return (0, param.shape[0]) if shard is None else (shard.start, shard.end)


def is_row_sharded(param: nn.Parameter) -> bool:
    """The parameter stores only this SP rank's rows of its weight."""
    return getattr(param, "row_shard", None) is not None


def runs_on_slice(param: nn.Parameter) -> bool:
    """The parameter is sharded and points at its stored rows: its layer computes those rows' outputs only."""
    shard = getattr(param, "row_shard", None)
    return shard is not None and shard.stored is not None and not shard.gathered


def mark_read_whole(param: nn.Parameter) -> None:
    """The owning layer reads this weight itself (not through its linear's matmul): it must be gathered to run."""
    param.read_whole = True
