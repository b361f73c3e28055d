"""Tensor-parallel linear layers with per-parameter weight loaders.

Weights are sharded over the TP group and replicated over SP. Each parameter carries ``weight_loader(param,
loaded, shard_id=None)`` where ``loaded`` is a tensor or a lazy safetensors slice: loaders index only this rank's
rows/columns, so a rank never materializes the full checkpoint tensor.

``ColumnSeqParallelLinear`` / ``RowSeqParallelLinear`` (docs/sp.md: Sequence-parallel linears) share weights and
loaders with the plain forms. When the step's forward context says the residual stream is sequence-sharded over TP
(``ctx.seq_sharded``), the column layer all-gathers tokens over TP before its matmul and the row layer
reduce-scatters over tokens after it; otherwise they behave exactly like the plain layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.sp.groups import ParallelState


def as_tensor(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def copy_into(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor for {what} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(value.to(param.dtype))


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    copy_into(param, as_tensor(loaded), "a replicated parameter")


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) must be divisible by the tensor-parallel size (--tp-size {b})")
    return a // b


class ColumnParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W's output rows split over TP; the output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.pstate = pstate
        self.in_features = in_features
        self.out_per_rank = divide(out_features, pstate.tp_size, "output features of a column-parallel layer")
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = param.shape[0]
        start = self.pstate.tp_rank * n
        copy_into(param, as_tensor(loaded[start : start + n]), "a column-parallel layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (e.g. gate and up projections); each rank holds its
    slice of every part, concatenated. ``shard_id`` is the part's index.

    ``groups`` > 1 (equal parts only) stores the rows in that many groups, each holding 1/groups of every part,
    part after part: ``[gate_0, up_0, gate_1, up_1, ...]``. Group g's rows are then one contiguous block, which an
    SP rank can multiply alone (:meth:`server.models.common.GatedMLP.forward_sp_split`)."""

    def __init__(self, in_features: int, out_sizes: list[int], pstate: ParallelState, bias: bool = False,
                 dtype: torch.dtype | None = None, groups: int = 1):
        self.out_sizes = [divide(s, pstate.tp_size, "a merged column-parallel part") for s in out_sizes]
        if groups > 1 and (len(set(self.out_sizes)) != 1 or self.out_sizes[0] % groups):
            raise ValueError(f"{groups} row groups need equal parts that they divide, got {self.out_sizes}")
        self.groups = groups
        super().__init__(in_features, sum(out_sizes), pstate, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = self.out_sizes[shard_id]
        start = self.pstate.tp_rank * size
        rows = as_tensor(loaded[start : start + size])
        if self.groups == 1:
            offset = sum(self.out_sizes[:shard_id])
            copy_into(param.data[offset : offset + size], rows, "a merged layer part")
            return
        g, parts = size // self.groups, len(self.out_sizes)
        for i in range(self.groups):
            at = (i * parts + shard_id) * g
            copy_into(param.data[at : at + g], rows[i * g : (i + 1) * g], "a merged layer part")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Query heads are split over TP; KV heads too, or replicated when there are fewer
    KV heads than TP ranks (rank r then uses KV head ``r * num_kv_heads // tp``)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, pstate: ParallelState,
                 bias: bool = False, dtype: torch.dtype | None = None):
        tp = pstate.tp_size
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "the number of attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "the number of KV heads")
            self.kv_head_start = pstate.tp_rank * self.num_kv_heads
        else:
            if tp % num_kv_heads:
                raise ValueError(f"tensor-parallel size {tp} must be a multiple of the KV head count {num_kv_heads}")
            self.num_kv_heads = 1
            self.kv_head_start = pstate.tp_rank * num_kv_heads // tp
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden, out, pstate, bias, dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        d = self.head_dim
        if shard_id == "q":
            dst, start, n = 0, self.pstate.tp_rank * self.q_size, self.q_size
        elif shard_id == "k":
            dst, start, n = self.q_size, self.kv_head_start * d, self.kv_size
        elif shard_id == "v":
            dst, start, n = self.q_size + self.kv_size, self.kv_head_start * d, self.kv_size
        else:
            raise ValueError(f"QKV shard id must be q, k or v, got {shard_id!r}")
        copy_into(param.data[dst : dst + n], as_tensor(loaded[start : start + n]), f"the {shard_id} projection")


class RowParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W's input columns split over TP; partial sums are all-reduced over TP."""

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.pstate = pstate
        self.in_per_rank = divide(in_features, pstate.tp_size, "input features of a row-parallel layer")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:  # added once, after the reduction
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = param.shape[1]
        start = self.pstate.tp_rank * n
        copy_into(param, as_tensor(loaded[:, start : start + n]), "a row-parallel layer")

    def reduce(self, y: torch.Tensor, seq_sharded: bool) -> torch.Tensor:
        return self.pstate.tp_all_reduce(y)

    def forward(self, x: torch.Tensor, seq_sharded: bool = False) -> torch.Tensor:
        y = self.reduce(F.linear(x, self.weight), seq_sharded)
        return y if self.bias is None else y + self.bias


class ColumnSeqParallelMixin:
    """Column layer over sequence-sharded input: all-gather this TP group's tokens first (dim 0)."""

    def forward(self, x: torch.Tensor, seq_sharded: bool = False) -> torch.Tensor:
        if seq_sharded:
            x = self.pstate.tp_all_gather(x, dim=0)
        return F.linear(x, self.weight, self.bias)


class ColumnSeqParallelLinear(ColumnSeqParallelMixin, ColumnParallelLinear):
    """:class:`ColumnParallelLinear` that accepts a TP-sequence-sharded residual stream."""


class MergedColumnSeqParallelLinear(ColumnSeqParallelMixin, MergedColumnParallelLinear):
    """:class:`MergedColumnParallelLinear` that accepts a TP-sequence-sharded residual stream."""


class QKVSeqParallelLinear(ColumnSeqParallelMixin, QKVParallelLinear):
    """:class:`QKVParallelLinear` that accepts a TP-sequence-sharded residual stream."""


class RowSeqParallelLinear(RowParallelLinear):
    """:class:`RowParallelLinear` whose output is reduce-scattered over tokens when the stream is sharded:
    the same bytes as an all-reduce, and each TP rank keeps 1/tp of the tokens."""

    def reduce(self, y: torch.Tensor, seq_sharded: bool) -> torch.Tensor:
        return self.pstate.tp_reduce_scatter(y) if seq_sharded else self.pstate.tp_all_reduce(y)
