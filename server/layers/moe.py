"""Sparse mixture of experts, routed by a router of :mod:`server.layers.moe_routing` (top-k softmax renormalized,
as MiniMax/Mixtral, unless given), optionally beside a shared expert, sigmoid-gated (Qwen3-Next, Qwen3.5-MoE) or
plain (GLM-4.5).

Two layouts of the experts (``ParallelState.expert_parallel``):
- TP-sliced: every TP rank holds each expert's slice of the intermediate dimension (gate/up column-split, down
  row-split), so a token's expert output is a partial sum that the row reduction over TP completes;
- expert parallel: each of the N = sp x tp ranks holds whole experts, ``E / N`` of them, and every token row is
  sent to its experts' owners and back (:mod:`server.layers.expert_parallel`). The router and the shared expert
  are replicated and run on the row's dispatching rank: the router is ``E x hidden`` and the shared expert one
  expert's size, small beside the routed experts, and running them where the row is dispatched computes each row
  once with no reduction of partial sums.

:func:`moe_block_forward` is what a model's MoE block calls: it picks the layout's collectives.

FP8 experts (docs/kernels.md, "FP8 GEMMs: MoE experts"): when a loader first receives a checkpoint's FP8 expert
tensor (:class:`server.layers.fp8.Fp8Weight`), ``w13`` / ``w2`` switch to ``float8_e4m3fn`` with fp32 scales
``w13_scale [E_local, 2 I_local, kb]`` / ``w2_scale [E_local, hidden, kb']``, one per row and block of input columns
as the dense FP8 layers keep them. A TP slice of the down projection's columns that cuts the checkpoint's blocks
stores finer blocks (the gcd of the block and the slice width), each with its checkpoint block's scale: exact.
The per-expert loop multiplies with :func:`server.kernels.fp8_gemm.fp8_linear`; the sync-free forms with the grouped
matmuls of :mod:`server.kernels.fp8_moe`, which dequantize weight tiles in registers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from server.forward.context import ForwardContext
from server.kernels import ops
from server.kernels.fp8 import FP8, dequantize_experts, quantize_per_row
from server.kernels.fp8_gemm import fp8_linear
from server.kernels.fp8_moe import experts_fp8_matmul, gathered_fp8_matmul
from server.layers.expert_parallel import (
    expert_owners,
    expert_parallel_forward,
    expert_range,
    static_pair_capacity,
)
from server.layers.fp8 import Fp8Weight
from server.layers.linear import as_tensor, copy_into, divide
from server.layers.moe_routing import Router, make_router
from server.sp.groups import ParallelState

# On CUDA a step of at most this many tokens runs the sync-free forms even outside a CUDA graph. The dense form
# computes every expert for every token: E / top_k times the FLOPs of the routed ones, but each expert's weights are
# read once either way, and at T tokens the extra FLOPs take T * bandwidth / matmul rate of a weight read (about
# T / 180 on an H200), so up to 128 tokens they cost less than the weights they share. The per-expert loop instead
# launches about six kernels per expert that has tokens and waits for the device once per layer: with 64 or 512
# experts that is thousands of launches for a short prompt or a question over a cached prefix.
SYNC_FREE_MAX_TOKENS = 128

# High-precision experts run as two grouped GEMMs (``torch._grouped_mm``: the pairs sorted by expert, one kernel
# per projection over every expert's rows, offsets on the device) wherever the device takes them: no host sync, so
# also inside CUDA graphs, and each used expert's weights read once in place. That replaces the per-expert loop and
# both sync-free forms (see :meth:`FusedMoE.grouped_ok`); benchmarks turn it off to time the forms it replaces.
GROUPED_MM = True
# FP8 experts in prefill chunks: the grouped GEMMs run on experts dequantized to the activations' dtype, at most
# this many bytes of them at a time (all of a layer's local experts at once below it: no host sync)
GROUPED_DEQUANT_BYTES = 1 << 30


@functools.cache
def _hopper_or_newer(device_index: int | None) -> bool:
    """Whether the CUDA device takes bf16 grouped GEMMs (sm_90 on); asked once per device, not per layer and step."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@contextlib.contextmanager
def grouped_gemms(enabled: bool) -> Iterator[None]:
    """Inside, :data:`GROUPED_MM` is ``enabled`` (benchmarks and tests time or check the forms it replaces)."""
    global GROUPED_MM
    saved, GROUPED_MM = GROUPED_MM, enabled
    try:
        yield
    finally:
        GROUPED_MM = saved

_DEFERRED_STORAGE = contextvars.ContextVar("deferred_expert_storage", default=False)


@contextlib.contextmanager
def deferred_expert_storage() -> Iterator[None]:
    """Inside, a :class:`FusedMoE` built keeps its experts on the meta device until the first checkpoint tensor its
    loaders receive, then allocates them FP8 or in the model dtype, as that tensor is: an FP8 checkpoint's experts
    never exist in the model dtype, so loading one does not peak at twice its bytes (``build_model`` builds FP8
    checkpoints' models in it; experts it never loads are an error there, :meth:`FusedMoE.check_loaded`)."""
    token = _DEFERRED_STORAGE.set(True)
    try:
        yield
    finally:
        _DEFERRED_STORAGE.reset(token)


class FusedMoE(nn.Module):
    """x ``[T, hidden]`` -> ``[T, hidden]``: TP-sliced, a partial sum (sum over TP = the MoE output); expert parallel,
    :meth:`expert_parallel_rows` gives the whole output of the rows this rank dispatches.

    Weights: ``w13 [E_local, 2*I_local, hidden]`` (gate rows then up rows), ``w2 [E_local, hidden, I_local]``, with
    ``E_local = E, I_local = I / tp`` TP-sliced and ``E_local`` = this rank's experts (:func:`expert_range`),
    ``I_local = I`` expert parallel; router ``[E, hidden]`` replicated; with ``correction_bias``, the router's
    ``e_score_correction_bias [E]`` (fp32, replicated). FP8 experts add ``w13_scale`` / ``w2_scale`` (module
    docstring) and their column blocks ``block_k``.
    """

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, pstate: ParallelState,
                 dtype: torch.dtype | None = None, router: Router | None = None, correction_bias: bool = False):
        super().__init__()
        self.pstate = pstate
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = router or make_router("softmax", top_k)
        # fp32 whatever the model dtype: a bias of ~1e-3 steers selection between scores a few 1e-3 apart
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False) if correction_bias else None
        # also at one rank (every expert here, the exchanges the identity): what benchmarks time the path's cost by
        self.expert_parallel = pstate.expert_parallel
        if self.expert_parallel:
            self.first, self.end = expert_range(num_experts, pstate.ep_size, pstate.rank)
            self.inter = intermediate
            owners = expert_owners(num_experts, pstate.ep_size)
            firsts = [expert_range(num_experts, pstate.ep_size, r)[0] for r in owners]
            # per expert: its owner rank and its index among the owner's experts (device lookups, no host sync)
            self.register_buffer("owner", torch.tensor(owners, dtype=torch.long), persistent=False)
            self.register_buffer("local_index", torch.arange(num_experts) - torch.tensor(firsts, dtype=torch.long),
                                 persistent=False)
            # pairs this rank computed in graph-form steps since the last take_graph_pairs() (added on the device,
            # inside the captured graphs; read every few steps by ModelRunner.collect_graph_pairs)
            self.register_buffer("graph_pairs", torch.zeros((), dtype=torch.long), persistent=False)
        else:
            self.first, self.end = 0, num_experts
            self.inter = divide(intermediate, pstate.tp_size, "the MoE intermediate size")
        local = self.end - self.first
        self.gate = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype), requires_grad=False)
        where = "meta" if _DEFERRED_STORAGE.get() and local else None  # None: the ambient device
        self.w13 = nn.Parameter(torch.empty(local, 2 * self.inter, hidden, dtype=dtype, device=where),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, hidden, self.inter, dtype=dtype, device=where), requires_grad=False)
        self.w13.weight_loader = self.w13_loader
        self.w2.weight_loader = self.w2_loader
        # FP8 experts: set by store_fp8 (None while the experts are high precision)
        self.register_parameter("w13_scale", None)
        self.register_parameter("w2_scale", None)
        self.block_k: dict[str, int] = {}  # input columns per scale, by weight name
        # expert parallel: (token, expert) pairs each rank received in the exact exchanges since the last
        # take_pairs() (the graph form's counts stay on the device and are not counted)
        self.pairs: list[int] = []

    def take_pairs(self) -> list[int]:
        """Pairs each rank computed since the last call (empty if none were counted)."""
        pairs, self.pairs = self.pairs, []
        return pairs

    def take_graph_pairs(self) -> torch.Tensor:
        """This rank's pairs of graph-form steps since the last call, a device scalar (no host sync)."""
        taken = self.graph_pairs.clone()
        self.graph_pairs.zero_()
        return taken

    @property
    def num_local_experts(self) -> int:
        return self.end - self.first

    def _slice_start(self) -> int:
        """First intermediate row of this rank's slice (expert parallel: the whole expert)."""
        return 0 if self.expert_parallel else self.pstate.tp_rank * self.inter

    def w13_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int, int]) -> None:
        expert, part = shard_id  # part 0 = gate (w1), 1 = up (w3)
        if not self.first <= expert < self.end:  # stored by another rank
            return
        s = self._slice_start()
        self._load("w13", (expert - self.first, slice(part * self.inter, (part + 1) * self.inter)), loaded,
                   (slice(s, s + self.inter),), f"expert {expert} gate/up")

    def w2_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        if not self.first <= shard_id < self.end:
            return
        s = self._slice_start()
        self._load("w2", (shard_id - self.first,), loaded, (slice(None), slice(s, s + self.inter)),
                   f"expert {shard_id} down")

    def _load(self, name: str, dst: tuple, loaded, key: tuple, what: str) -> None:
        """Checkpoint slice ``loaded[key]`` into ``name[dst]``: FP8 with its scales if the checkpoint's is FP8 (the
        parameter is read from the module: the first FP8 tensor, or deferred storage, replaces it)."""
        w = getattr(self, name)
        if not isinstance(loaded, Fp8Weight):
            if w.dtype == FP8:
                raise ValueError(f"{what} is stored in high precision, but other experts of its layer are FP8: "
                                 "a layer whose experts mix FP8 and high precision is not supported")
            if w.is_meta and self.pstate.device.type != "meta":  # deferred storage: the model dtype after all
                self._replace(name, w.dtype)
            copy_into(getattr(self, name).data[dst], as_tensor(loaded[key]), what)
            return
        k = w.shape[-1]
        if loaded.scale.shape[-1] == 1:  # per channel / per tensor: one block of every column
            block_k = k
        else:  # columns [s, s + k) of the checkpoint's: blocks that divide its blocks and the slice's first column
            block_k = loaded.block_k if k == loaded.shape[-1] else math.gcd(loaded.block_k, k)
        q, scale = loaded.raw(key, block_k)
        self.store_fp8(name, block_k)
        copy_into(getattr(self, name).data[dst], q, what)
        copy_into(getattr(self, name + "_scale").data[dst], scale, f"the FP8 scales of {what}")

    def _replace(self, name: str, dtype: torch.dtype) -> None:
        """A new (uninitialized) ``name`` parameter in ``dtype`` on the layer's device, with the same loader; frees
        the old storage."""
        old = getattr(self, name)
        device = self.pstate.device if old.is_meta else old.device
        new = nn.Parameter(torch.empty(old.shape, dtype=dtype, device=device), requires_grad=False)
        new.weight_loader = old.weight_loader
        setattr(self, name, new)
        old.data = torch.empty(0, dtype=old.dtype, device=old.device)

    def store_fp8(self, name: str, block_k: int) -> None:
        """From now on keep ``name`` (``w13`` or ``w2``) in FP8 with a scale per row and block of ``block_k`` input
        columns; frees the high-precision storage."""
        old = getattr(self, name)
        k = old.shape[-1]
        block_k = min(block_k, k)
        if old.dtype == FP8:
            if self.block_k[name] != block_k:
                raise ValueError(f"FP8 experts with different scale blocks in one layer ({block_k} vs "
                                 f"{self.block_k[name]} columns of {name})")
            return
        rows = old.shape[:-1]
        self._replace(name, FP8)
        scale = torch.ones(*rows, -(-k // block_k), device=getattr(self, name).device)
        setattr(self, name + "_scale", nn.Parameter(scale, requires_grad=False))
        self.block_k[name] = block_k

    def check_loaded(self, where: str) -> None:
        """Raise ``ValueError`` if deferred expert storage never received its checkpoint tensors."""
        missing = [n for n in ("w13", "w2") if getattr(self, n).is_meta and self.pstate.device.type != "meta"]
        if missing:
            raise ValueError(f"{where}: the checkpoint has no expert weights for {' and '.join(missing)} of this "
                             "MoE layer")

    def quantize_experts(self) -> bool:
        """``--quantization fp8``: store the experts that are not FP8 yet in FP8 with one scale per row (of this
        rank's columns), an expert at a time; True if any were."""
        done = False
        for name in ("w13", "w2"):
            w = getattr(self, name)
            if w.dtype == FP8:
                continue
            high = w.data
            self.store_fp8(name, w.shape[-1])
            for e in range(high.shape[0]):
                q, scale = quantize_per_row(high[e])
                getattr(self, name).data[e].copy_(q)
                getattr(self, name + "_scale").data[e].copy_(scale)
            done = True
        return done

    def expert_linear(self, x: torch.Tensor, name: str, e: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` times local expert ``e``'s ``w13`` or ``w2`` (FP8: :func:`fp8_linear`)."""
        w = getattr(self, name)
        if w.dtype == FP8:
            # emulate=False: the CUDA forms of the experts never quantize activations (fp8_gemm.EMULATE_W8A8)
            return fp8_linear(x, w[e], getattr(self, name + "_scale")[e], self.block_k[name], bias, emulate=False)
        return F.linear(x, w[e], bias)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(F.linear(x, self.gate).float(), self.e_score_correction_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        return self.compute(x, weights, experts)

    def grouped_ok(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_grouped` runs here for every step: high-precision experts in x's dtype; on CUDA
        bf16 on Hopper or newer with every row 16-byte aligned (what ``torch._grouped_mm`` takes there), on CPU
        fp32."""
        return self.w13.dtype == x.dtype and self._grouped_device_ok(x)

    def fp8_grouped_ok(self, x: torch.Tensor) -> bool:
        """FP8 experts in steps of more than ``SYNC_FREE_MAX_TOKENS`` tokens outside CUDA graphs (prefill chunks):
        :meth:`forward_grouped` on experts dequantized to x's dtype a slice at a time (see
        ``GROUPED_DEQUANT_BYTES``). Decode steps keep the FP8 kernels, which read each FP8 byte once."""
        return (self.w13.dtype == FP8 and x.shape[0] > SYNC_FREE_MAX_TOKENS
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing()) and self._grouped_device_ok(x))

    def _grouped_device_ok(self, x: torch.Tensor) -> bool:
        if not GROUPED_MM or not hasattr(torch, "_grouped_mm") or self.w13.is_meta:
            return False
        if x.is_cuda:
            widths = (self.w13.shape[-1], self.w13.shape[1], self.w2.shape[-1])
            return (x.dtype == torch.bfloat16 and _hopper_or_newer(x.device.index)
                    and all(w * x.element_size() % 16 == 0 for w in widths))
        return x.device.type == "cpu" and x.dtype == torch.float32

    def forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """:meth:`compute` as two grouped GEMMs over the (token, expert) pairs sorted by expert, no host sync (but
        one for FP8 experts dequantized a slice at a time)."""
        t, k = experts.shape
        if t == 0 or self.num_local_experts == 0:
            return torch.zeros_like(x)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        ids = flat[order]
        # each expert's end among the sorted pairs (searchsorted, not bincount: CUDA's bincount syncs for its size)
        ends = torch.searchsorted(ids, torch.arange(self.num_local_experts, device=x.device), right=True)
        ends = ends.to(torch.int32)
        xs = x[order // k]
        if self.w13.dtype == FP8:
            y = self._grouped_fp8(xs, ids, ends)
        else:
            y = self._grouped_pass(xs, ids, ends, self.w13, self.w2)
        bias = self.down_bias()
        if bias is not None:
            y = y + bias[ids]
        pairs = torch.empty_like(y)
        pairs[order] = y
        # the k weighted outputs of a token summed in one fp32-accumulated product
        return torch.bmm(weights.unsqueeze(1).to(x.dtype), pairs.view(t, k, -1)).squeeze(1)

    def activate(self, h: torch.Tensor, experts: torch.Tensor | None) -> torch.Tensor:
        """``[..., 2 I]`` gate/up projections -> ``[..., I]`` activations (SwiGLU). ``experts``: the local expert of
        each row of ``h`` (an index or an index tensor), or None when ``h`` is ``[T, E_local, 2 I]`` (every
        expert); a layer with gate/up biases adds them here."""
        return ops.silu_and_mul(h)

    def down_bias(self) -> torch.Tensor | None:
        """``[E_local, hidden]`` down-projection biases this rank adds (None: the experts have none)."""
        return None

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Local expert ``e`` on rows ``x``, unweighted."""
        bias = self.down_bias()
        return self.expert_linear(self.activate(self.expert_linear(x, "w13", e), e), "w2", e,
                                  None if bias is None else bias[e])

    def _grouped_pass(self, xs: torch.Tensor, ids: torch.Tensor, ends: torch.Tensor, w13: torch.Tensor,
                      w2: torch.Tensor) -> torch.Tensor:
        """Rows ``xs`` sorted by expert (``ids``; group ``e`` ends at row ``ends[e]``) through experts ``w13`` /
        ``w2`` (one per group): gate/up, activation, down, two grouped GEMMs."""
        h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=ends)
        return torch._grouped_mm(self.activate(h, ids), w2.transpose(1, 2), offs=ends)

    def _grouped_fp8(self, xs: torch.Tensor, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """:meth:`_grouped_pass` over FP8 experts dequantized to xs's dtype: all at once when they fit
        ``GROUPED_DEQUANT_BYTES``, else a slice of experts at a time (their rows found with one host sync)."""
        e, dt = self.num_local_experts, xs.dtype

        def deq(name: str, a: int, b: int) -> torch.Tensor:
            w = getattr(self, name)
            return dequantize_experts(w[a:b], getattr(self, name + "_scale")[a:b], self.block_k[name], dt)

        per_expert = (self.w13[0].numel() + self.w2[0].numel()) * xs.element_size()
        step = max(1, min(e, GROUPED_DEQUANT_BYTES // per_expert))
        if step >= e:
            return self._grouped_pass(xs, ids, ends, deq("w13", 0, e), deq("w2", 0, e))
        out = xs.new_empty(xs.shape[0], self.w2.shape[1])
        bounds = [0, *ends.tolist()]
        for a in range(0, e, step):
            b = min(e, a + step)
            r0, r1 = bounds[a], bounds[b]
            if r0 < r1:
                out[r0:r1] = self._grouped_pass(xs[r0:r1], ids[r0:r1], ends[a:b] - r0, deq("w13", a, b),
                                                deq("w2", a, b))
        return out

    def compute(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``sum_j weights[:, j] * expert_{experts[:, j]}(x)`` over this rank's experts (local indices)."""
        if self.grouped_ok(x) or self.fp8_grouped_ok(x):
            return self.forward_grouped(x, weights, experts)
        # a CUDA graph (no host sync, static shapes), or few tokens (see SYNC_FREE_MAX_TOKENS)
        if x.is_cuda and (torch.cuda.is_current_stream_capturing() or x.shape[0] <= SYNC_FREE_MAX_TOKENS):
            return self.forward_sync_free(x, weights, experts)
        out = torch.zeros_like(x)
        k = experts.shape[1]
        flat = experts.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_local_experts).tolist()
        token_of = order // k
        w_of = weights.view(-1)[order]
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            idx = token_of[start : start + c]
            y = self.expert(x[idx], e) * w_of[start : start + c].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, idx, y)
            start += c
        return out

    def forward_sync_free(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same result without a host sync (decode steps captured in CUDA graphs). Few tokens (fewer
        (token, expert) pairs than experts) run their experts' weights gathered per pair; more run every expert on
        every token, weighted by the routing (zero for the experts a token does not use): decode reads every
        expert's weights once either way."""
        if self.grouped_ok(x):
            return self.forward_grouped(x, weights, experts)
        t, k, e = x.shape[0], experts.shape[1], self.num_local_experts
        if t == 0:
            return torch.zeros_like(x)
        bias = self.down_bias()
        if t * k < e:
            flat = experts.flatten()
            h = self.activate(self.pairs_matmul("w13", x.repeat_interleave(k, 0), flat), flat)
            y = self.pairs_matmul("w2", h, flat)
            if bias is not None:
                y = y + bias[flat]
            return (y.view(t, k, -1) * weights.unsqueeze(-1).to(x.dtype)).sum(1)
        gate = torch.zeros(t, e, dtype=x.dtype, device=x.device)
        gate.scatter_add_(1, experts, weights.to(x.dtype))
        h = self.activate(self.all_experts_matmul("w13", x).view(t, e, -1), None)  # [T, E, I]
        y = self.all_experts_matmul("w2", h * gate.unsqueeze(-1))  # the routing weight (0 if unused) applied
        return y if bias is None else y + gate @ bias

    def pairs_matmul(self, name: str, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Row ``p`` of ``x`` times local expert ``index[p]``'s ``w13`` or ``w2`` (the gathered form): FP8 experts
        through :func:`gathered_fp8_matmul`, which reads each pair's FP8 weights once."""
        w = getattr(self, name)
        if w.dtype == FP8:
            return gathered_fp8_matmul(x, w, getattr(self, name + "_scale"), self.block_k[name], index)
        return torch.bmm(w[index], x.unsqueeze(-1)).squeeze(-1)

    def all_experts_matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Every local expert on every row (the dense form): ``w13``, ``x [T, hidden] -> [T, E * 2I]``; ``w2``,
        ``x [T, E, I]`` (each expert's activations) ``-> [T, hidden]``, summed over the experts. FP8 experts through
        :func:`experts_fp8_matmul`, which reads each FP8 weight once."""
        w, t = getattr(self, name), x.shape[0]
        if w.dtype == FP8:
            scale = getattr(self, name + "_scale")
            if name == "w13":  # one group: the experts' rows stacked
                w, scale = w.view(1, -1, w.shape[-1]), scale.view(1, -1, scale.shape[-1])
            return experts_fp8_matmul(x.reshape(t, -1), w, scale, self.block_k[name])
        if name == "w13":
            return F.linear(x, w.view(-1, w.shape[-1]))
        # plain matmuls over views of the weights: an einsum over (e, i) would permute w2 to [hidden, E * I] first,
        # a copy of every expert's down weights per layer per step
        return torch.bmm(x.transpose(0, 1), w.transpose(1, 2)).sum(0)  # [E, T, hidden] -> [T, hidden]

    # ---- expert parallel -------------------------------------------------------------------------------------
    def _received(self, x: torch.Tensor, ids: torch.Tensor, static: bool) -> torch.Tensor:
        """Unweighted outputs of received pairs ``x [M, hidden]`` for local experts ``ids [M]`` (-1: an unused
        static slot, whose output is zero)."""
        if self.num_local_experts == 0 or x.shape[0] == 0:
            return torch.zeros_like(x)
        used = ids >= 0
        w = used.to(torch.float32).unsqueeze(-1)
        e = torch.where(used, ids, 0).unsqueeze(-1)
        return self.forward_sync_free(x, w, e) if static else self.compute(x, w, e)

    def expert_parallel_rows(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Routed MoE output of this rank's source rows (a collective over every rank). ``mask`` None: every row of
        ``x`` is a source row, exchanged exactly (pair counts first). Otherwise the static form: the rows ``mask``
        flags are dispatched through fixed-size pair slots and the others get zeros (module docstring of
        :mod:`server.layers.expert_parallel`)."""
        ps, n, k, hidden = self.pstate, x.shape[0], self.top_k, x.shape[1]
        weights, experts = self.route(x)
        flat = experts.reshape(-1)
        dest = self.owner[flat]
        ids = self.local_index[flat]
        if mask is None:
            order = torch.argsort(dest, stable=True)
            # every rank's pair count per peer (the one host sync): the exchange's splits, and the step's load
            counts = ps.world_all_gather(torch.bincount(dest, minlength=ps.world_size)).tolist()
            out_rows, in_rows = [c[ps.rank] for c in counts], counts[ps.rank]
            self.pairs = [a + b for a, b in zip(self.pairs, map(sum, zip(*counts)))] if self.pairs else \
                [sum(c) for c in zip(*counts)]
            recv = ps.world_all_to_all(x[order // k], out_rows, in_rows)
            recv_ids = ps.world_all_to_all(ids[order], out_rows, in_rows)
            back = ps.world_all_to_all(self._received(recv, recv_ids, False), in_rows, out_rows)
            pairs = torch.empty_like(back)
            pairs[order] = back
            return (pairs.view(n, k, hidden) * weights.unsqueeze(-1).to(x.dtype)).sum(1)
        cap, peers = static_pair_capacity(n, ps.tp_size, k), ps.world_size
        valid = mask.repeat_interleave(k)
        dest = torch.where(valid, dest, peers)  # peer N: nowhere
        onehot = (dest.unsqueeze(1) == torch.arange(peers + 1, device=x.device)).long()  # one_hot checks on the host
        slot = (onehot.cumsum(0) * onehot).sum(1) - 1  # the pair's place among those for its peer
        index = torch.where(valid, dest * cap + slot, peers * cap)  # slot N * cap: a discarded row
        send = x.new_zeros(peers * cap + 1, hidden).index_copy_(0, index, x.repeat_interleave(k, 0))
        send_ids = torch.full((peers * cap + 1,), -1, dtype=torch.long, device=x.device)
        send_ids.index_copy_(0, index, torch.where(valid, ids, -1))
        recv = ps.world_all_to_all(send[:-1])
        recv_ids = ps.world_all_to_all(send_ids[:-1])
        self.graph_pairs += (recv_ids >= 0).sum()
        back = ps.world_all_to_all(self._received(recv, recv_ids, True))
        pairs = torch.cat([back, back.new_zeros(1, hidden)])[index].view(n, k, hidden)
        w = torch.where(valid.view(n, k), weights, 0.0)
        return (pairs * w.unsqueeze(-1).to(x.dtype)).sum(1)


class SharedExpertMoE(nn.Module):
    """Routed experts plus an always-on shared expert, scaled by ``sigmoid(x w_gate)`` when ``gated``: x
    ``[T, hidden]`` -> partial ``[T, hidden]`` (sum over TP = the output). The gate is a per-token scalar,
    replicated, so it can scale each rank's partial shared-expert sum before the one reduction the caller does for
    both. ``router`` and ``correction_bias`` are :class:`FusedMoE`'s. Expert parallel, the shared expert is stored
    whole on every rank and runs on the row's dispatching rank beside its routed experts."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, shared_intermediate: int,
                 pstate: ParallelState, dtype: torch.dtype | None = None, router: Router | None = None,
                 correction_bias: bool = False, gated: bool = True):
        super().__init__()
        self.experts = FusedMoE(num_experts, top_k, hidden, intermediate, pstate, dtype, router, correction_bias)
        self.expert_parallel = self.experts.expert_parallel
        slices = 1 if self.expert_parallel else pstate.tp_size
        self.shared_inter = divide(shared_intermediate, slices, "the shared expert intermediate size")
        self.shared_w13 = nn.Parameter(torch.empty(2 * self.shared_inter, hidden, dtype=dtype), requires_grad=False)
        self.shared_w2 = nn.Parameter(torch.empty(hidden, self.shared_inter, dtype=dtype), requires_grad=False)
        self.shared_gate = nn.Parameter(torch.empty(1, hidden, dtype=dtype), requires_grad=False) if gated else None
        self.pstate = pstate
        self.shared_w13.weight_loader = self.shared_w13_loader
        self.shared_w2.weight_loader = self.shared_w2_loader

    def _shared_start(self) -> int:
        return 0 if self.expert_parallel else self.pstate.tp_rank * self.shared_inter

    def shared_w13_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        n, s = self.shared_inter, self._shared_start()
        copy_into(param.data[shard_id * n : (shard_id + 1) * n], as_tensor(loaded[s : s + n]),
                  "the shared expert gate/up")

    def shared_w2_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        s = self._shared_start()
        copy_into(param, as_tensor(loaded[:, s : s + self.shared_inter]), "the shared expert down")

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(ops.silu_and_mul(F.linear(x, self.shared_w13)), self.shared_w2)
        return out if self.shared_gate is None else torch.sigmoid(F.linear(x, self.shared_gate)) * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x) + self.shared(x)

    def expert_parallel_rows(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`FusedMoE.expert_parallel_rows` plus the shared expert of the same rows."""
        routed = self.experts.expert_parallel_rows(x, mask)
        if mask is None:
            return routed + self.shared(x)
        return torch.where(mask.unsqueeze(-1), routed + self.shared(x), torch.zeros((), dtype=x.dtype,
                                                                                     device=x.device))


def moe_block_forward(moe: FusedMoE | SharedExpertMoE, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The MoE output of this rank's rows ``x`` (its TP share when ``ctx.seq_sharded``), complete: TP-sliced, the
    partial sums reduced over TP (reduce-scattered over rows when seq-sharded); expert parallel, the rows exchanged
    with the experts' owners (:func:`server.layers.expert_parallel.expert_parallel_forward`)."""
    ps = moe.pstate
    if not moe.expert_parallel:
        if ctx.seq_sharded:
            return ps.tp_reduce_scatter(moe(ps.tp_all_gather(x, dim=0)))
        return ps.tp_all_reduce(moe(x))
    rows = ps.tp_all_gather(x, dim=0) if ctx.seq_sharded else x
    out = expert_parallel_forward(rows, ps, ctx.replicated_rows, ctx.replicated_mask, ctx.static_shapes,
                                  moe.expert_parallel_rows)
    if ctx.seq_sharded:
        n = x.shape[0]
        return out[ps.tp_rank * n : (ps.tp_rank + 1) * n]
    return out
