"""Tensor-parallel linear layers with per-parameter weight loaders.

Weights are sharded over the TP group and replicated over SP, or with ``--shard-dense-weights`` stored 1/sp per
rank and gathered per layer before use (:mod:`server.layers.row_shard`, :mod:`server.layers.dense_weights`). Each
parameter carries ``weight_loader(param, loaded, shard_id=None)`` where ``loaded`` is a tensor or a lazy safetensors
slice: loaders index only this rank's rows/columns, so a rank never materializes the full checkpoint tensor.

``ColumnSeqParallelLinear`` / ``RowSeqParallelLinear`` (docs/sp.md: Sequence-parallel linears) share weights and
loaders with the plain forms. When the step's forward context says the residual stream is sequence-sharded over TP
(``ctx.seq_sharded``), the column layer all-gathers tokens over TP before its matmul and the row layer
reduce-scatters over tokens after it; otherwise they behave exactly like the plain layers.

FP8: a layer whose loader receives an :class:`server.layers.fp8.Fp8Weight` (a checkpoint's FP8 weight with its
scales) stores FP8 and its per-row scales from then on, and its matmul is :func:`server.kernels.fp8_gemm.fp8_linear`;
:func:`quantize_linear_layers` turns the layers of a high-precision model to FP8 (``--quantization fp8``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.fp8 import FP8, quantize_per_row
from server.kernels.fp8_gemm import fp8_linear
from server.layers.fp8 import Fp8Weight
from server.layers.row_shard import dense_parameter, is_row_sharded, row_window, runs_on_slice
from server.sp.groups import ParallelState


def as_tensor(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def copy_into(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor for {what} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(value.to(param.dtype))


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    copy_into(param, as_tensor(loaded), "a replicated parameter")


# (dim, destination start, checkpoint start, length): one contiguous piece of a weight loaded into a parameter,
# along its output rows (dim 0) or input columns (dim 1)
Piece = tuple[int, int, int, int]


def piece_key(dim: int, src: int, n: int) -> tuple[slice, ...]:
    """The checkpoint index of a whole piece."""
    return (slice(src, src + n),) if dim == 0 else (slice(None), slice(src, src + n))


class QuantizableLinear(nn.Module):
    """What the TP linears share: loading pieces of a checkpoint tensor (high precision, or FP8 with its scales)
    and the matmul that fits how the weight is stored. ``weight_scale [out, kb]`` and ``input_scale`` (a static
    activation scale, or None for per-token scales) exist once the weight is FP8."""

    weight: nn.Parameter
    weight_scale: nn.Parameter  # registered by store_fp8
    block_k: int = 0  # input columns per scale
    input_scale: float | None = None

    @property
    def quantized(self) -> bool:
        return self.weight.dtype == FP8

    def store_fp8(self, block_k: int) -> None:
        """From now on keep the weight in FP8 with a scale per row and block of ``block_k`` input columns; frees the
        high-precision storage."""
        if is_row_sharded(self.weight):
            raise ValueError("--shard-dense-weights does not shard FP8 weights (--quantization fp8 or an FP8 "
                             "checkpoint); drop one of the two")
        block_k = min(block_k, self.weight.shape[1])
        if self.quantized:
            if self.block_k != block_k:
                raise ValueError(f"FP8 weight parts with different scale blocks in one layer ({block_k} vs "
                                 f"{self.block_k} columns)")
            return
        self.block_k = block_k
        kb = -(-self.weight.shape[1] // block_k)
        old = self.weight
        self.weight = nn.Parameter(torch.empty(old.shape, dtype=FP8, device=old.device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(old.shape[0], kb, device=old.device), requires_grad=False)
        old.data = torch.empty(0, dtype=old.dtype, device=old.device)

    def load_pieces(self, param: nn.Parameter, loaded, pieces: list[Piece], what: str) -> None:
        """Copy each piece's checkpoint rows/columns into ``param``; a row-sharded weight
        (:mod:`server.layers.row_shard`) keeps only the part of each piece inside its stored rows."""
        for dim, dst, src, n in pieces:
            if not isinstance(loaded, Fp8Weight):
                key, target = self.piece_target(param, dim, dst, src, n)
                if key is not None:
                    copy_into(target, as_tensor(loaded[key]), what)
                continue
            # FP8 weights are never row-sharded (store_fp8 refuses), and the first piece replaces the parameter
            q, scale = loaded.raw(piece_key(dim, src, n))
            self.store_fp8(loaded.block_k if loaded.scale.shape[-1] > 1 else self.weight.shape[1])
            copy_into(self.weight.data.narrow(dim, dst, n), q, what)
            copy_into(self.weight_scale.data.narrow(0, dst, n) if dim == 0 else self.weight_scale.data, scale,
                      f"the FP8 scales of {what}")
            if loaded.input_scale is not None:
                self.input_scale = max(self.input_scale or 0.0, loaded.input_scale)

    @staticmethod
    def piece_target(param: nn.Parameter, dim: int, dst: int, src: int, n: int) -> tuple[tuple | None, torch.Tensor]:
        """The checkpoint index and the part of ``param`` that a piece fills: for a row-sharded weight only the rows
        it stores (a row piece is clipped to them; a column piece covers them); ``(None, _)`` when none are."""
        if not is_row_sharded(param):
            return piece_key(dim, src, n), param.data.narrow(dim, dst, n)
        lo, hi = row_window(param)
        if dim == 1:
            return ((slice(lo, hi), slice(src, src + n)), param.data[: hi - lo].narrow(1, dst, n)) if hi > lo \
                else (None, param.data)
        a, b = max(dst, lo), min(dst + n, hi)
        if a >= b:
            return None, param.data
        return (slice(src + a - dst, src + b - dst),), param.data.narrow(0, a - lo, b - a)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantized:
            return fp8_linear(x, self.weight, self.weight_scale, self.block_k, bias, self.input_scale)
        if runs_on_slice(self.weight):
            return sliced_linear(x, self.weight, bias, self.pstate)
        return F.linear(x, self.weight, bias)


def sliced_linear(x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None,
                  pstate: ParallelState) -> torch.Tensor:
    """``x W^T (+ b)`` from the rows of W this SP rank stores (:mod:`server.layers.row_shard`), for an ``x`` that is
    the same on every SP rank: each rank computes its rows' outputs ``[T, R]`` and one SP all-gather assembles the
    ``[T, rows]`` result (activations instead of weights: a decode step's few rows are far fewer bytes)."""
    rows = weight.row_shard.rows
    parts = pstate.sp_all_gather_tensor(F.linear(x, weight))  # [P, T, R]
    y = parts.permute(1, 0, 2).reshape(x.shape[0], -1)
    y = y if y.shape[1] == rows else y[:, :rows].contiguous()
    return y if bias is None else y + bias


def quantize_linear_layers(model: nn.Module) -> int:
    """``--quantization fp8`` on a high-precision model: every TP linear that is not FP8 yet stores its weight in FP8
    with one scale per output row (of this rank's columns); returns how many layers were quantized."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantizableLinear) and not m.quantized:
            q, scale = quantize_per_row(m.weight.data)
            m.store_fp8(m.weight.shape[1])
            m.weight.data.copy_(q)
            m.weight_scale.data.copy_(scale)
            n += 1
    return n


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) must be divisible by the tensor-parallel size (--tp-size {b})")
    return a // b


class ColumnParallelLinear(QuantizableLinear):
    """``y = x W^T (+ b)`` with W's output rows split over TP; the output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.pstate = pstate
        self.in_features = in_features
        self.out_per_rank = divide(out_features, pstate.tp_size, "output features of a column-parallel layer")
        self.weight = dense_parameter(self.out_per_rank, in_features, pstate, dtype)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = self.out_per_rank
        self.load_pieces(param, loaded, [(0, 0, self.pstate.tp_rank * n, n)], "a column-parallel layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


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
        if self.groups == 1:
            pieces = [(0, sum(self.out_sizes[:shard_id]), start, size)]
        else:
            g, parts = size // self.groups, len(self.out_sizes)
            pieces = [(0, (i * parts + shard_id) * g, start + i * g, g) for i in range(self.groups)]
        self.load_pieces(param, loaded, pieces, "a merged layer part")


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
        self.load_pieces(param, loaded, [(0, dst, start, n)], f"the {shard_id} projection")


class RowParallelLinear(QuantizableLinear):
    """``y = x W^T (+ b)`` with W's input columns split over TP; partial sums are all-reduced over TP."""

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.pstate = pstate
        self.in_per_rank = divide(in_features, pstate.tp_size, "input features of a row-parallel layer")
        self.weight = dense_parameter(out_features, self.in_per_rank, pstate, dtype)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:  # added once, after the reduction
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = self.in_per_rank
        self.load_pieces(param, loaded, [(1, 0, self.pstate.tp_rank * n, n)], "a row-parallel layer")

    def reduce(self, y: torch.Tensor, seq_sharded: bool) -> torch.Tensor:
        return self.pstate.tp_all_reduce(y)

    def forward(self, x: torch.Tensor, seq_sharded: bool = False) -> torch.Tensor:
        y = self.reduce(self.matmul(x, None), seq_sharded)
        return y if self.bias is None else y + self.bias


class ColumnSeqParallelMixin:
    """Column layer over sequence-sharded input: all-gather this TP group's tokens first (dim 0)."""

    def forward(self, x: torch.Tensor, seq_sharded: bool = False) -> torch.Tensor:
        if seq_sharded:
            x = self.pstate.tp_all_gather(x, dim=0)
        return self.matmul(x, self.bias)


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
