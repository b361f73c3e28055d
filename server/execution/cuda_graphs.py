"""CUDA graphs for padded steps: decode steps per batch-size bucket and short extend steps per token bucket,
captured at start-up.

A decode step (every request one new token, none split) is padded to the smallest bucket that holds the most rows
any SP rank computes, so every rank replays the same bucket and the collectives inside the graphs (the TP
all-reduces, the SP merge of replicated rows) line up. A short extend step (prefill chunks of a few tokens, a turn
over a cached prefix, with or without decode rows beside it; :func:`server.execution.step_builder.extend_fits`) is
padded the same way to a token bucket (16, 32, 64, ... up to ``cuda_graph_max_extend_tokens``) and a fixed number
of attention entries, the padded rows forming padding entries over the scratch page: its attention is one
``paged_causal`` batch, its launches one replay instead of a few hundred small kernels. The step's inputs are
copied into static buffers: token ids, positions, KV write slots (rows this rank does not store write to the
scratch page; a model with a window page group has a second row of them, in its window layers' pages), state
slots (padded rows and entries use the scratch slot), the SP merge mask, the entries' state slots and row offsets,
and the attention backend's fixed index buffers, which its plan refills
(:meth:`server.backends.attention.AttentionBackend.graph_backends`). Then the graph replays. At sp > 1 a decode
bucket has a second graph for steps whose rows are all replicated, in which dense MLPs split over the SP ranks
(``ForwardContext.split_mlp``; docs/sp.md, "Decode: dense MLPs split over the SP ranks"). State copies of the
prefix cache (a hybrid model's restored snapshot) happen before the step, outside the graph, either way.

Modes (``EngineConfig.cuda_graph``): ``auto`` captures on CUDA; ``eager`` pads and fills the same static buffers but
runs the model eagerly (any device: the tests check the graph path's metadata on CPU this way); ``off`` runs every
step eagerly. Extend steps are captured only where the backend's paged prefill is capturable (flashinfer) and the
model keeps no linear-attention state (the varlen chunk kernels of linear layers read their sequence offsets on
the host); in ``eager`` mode they always take the padded path.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

import torch

from server.backends.attention import AttentionBackend, GraphShape, StepAttention, padded_batch
from server.config import CudaGraphMode, EngineConfig
from server.execution.request_table import RequestTable
from server.execution.step_builder import (
    INPUT_ROWS,
    PaddedStep,
    build_padded_step,
    extend_fits,
    rank_row_count,
    take_prev_tokens,
)
from server.execution.step_profile import PROFILE
from server.forward.context import AttentionStepMeta, ForwardContext, LinearStepMeta
from server.forward.plan import Placement, StepPlan, computed_pieces
from server.sp.groups import ParallelState

log = logging.getLogger(__name__)


def extend_buckets(max_tokens: int) -> list[int]:
    """Token buckets of short extend steps: 16, 32, 64, ... doubling up to ``max_tokens`` (itself last)."""
    sizes, n = [], 16
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return sizes + [max_tokens] if max_tokens > 0 else []


def bucket_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond; ``max_bs`` itself last."""
    sizes, bs = [], 1
    while bs < max_bs:
        sizes.append(bs)
        bs = bs * 2 if bs < 8 else bs + (8 if bs < 64 else 16 if bs < 256 else 32)
    return sizes + [max_bs]



class GraphRun(enum.Enum):
    """How this rank runs padded steps: replayed from captured graphs, on the graphs' static buffers but eagerly, or
    as any other step."""

    CAPTURE = "capture"
    EAGER = "eager"
    OFF = "off"


def graph_run(config: EngineConfig, device: torch.device) -> GraphRun:
    """This rank's :class:`GraphRun` (see the module docstring)."""
    if config.cuda_graph == CudaGraphMode.OFF or config.cuda_graph_max_bs <= 0:
        return GraphRun.OFF
    if config.cuda_graph == CudaGraphMode.EAGER:
        return GraphRun.EAGER
    return GraphRun.CAPTURE if device.type == "cuda" else GraphRun.OFF


class StepGraphs:
    """Padded steps: decode steps of up to ``cuda_graph_max_bs`` requests padded to a batch-size bucket, short
    extend steps of up to ``cuda_graph_max_extend_tokens`` rows padded to a token bucket; each shape replayed from
    its CUDA graph (``capture``) or run eagerly on the same static buffers.

    It holds what it reads, passed in: the model, the rank's groups, the request table (page tables), the
    attention backend (which gives one graph-form backend per shape) and ``on_inputs_copied``, called once a
    step's inputs are on the device (the caller then knows when the host buffers may be rewritten)."""

    def __init__(self, model: torch.nn.Module, pstate: ParallelState, config: EngineConfig, backend: AttentionBackend,
                 table: RequestTable, scratch_slot: int, num_slots: int, has_kv: bool, has_state: bool,
                 capture: bool, on_inputs_copied: Callable[[], None]):
        self.model, self.pstate, self.config, self.table = model, pstate, config, table
        self.has_kv, self.capture, self.on_inputs_copied = has_kv, capture, on_inputs_copied
        self.device = dev = pstate.device
        self.buckets = bucket_sizes(min(config.cuda_graph_max_bs, num_slots))
        decode = [GraphShape(bs, bs, True) for bs in self.buckets]
        # an extend bucket of T rows has up to min(T, the largest decode batch) entries, padding entries included
        extend = [GraphShape(t, min(t, self.buckets[-1]), False)
                  for t in extend_buckets(config.cuda_graph_max_extend_tokens)]
        self.backends = backend.graph_backends(decode + extend, table.page_table.shape[1])
        if capture and (has_state or not all(self.backends[s].capturable for s in extend)):
            extend = []  # not capturable here: such steps run as any other step
        self.extend = extend
        self.scratch_slot = scratch_slot
        top = max(s.rows for s in decode + extend)
        top_entries = max(s.entries for s in decode + extend)
        # One static block of per-row inputs (token ids, positions, KV write slots, state slots, merge flags) and
        # one of per-entry inputs (state slots, row offsets), each filled by one host-to-device copy per step
        self.inputs = torch.zeros(INPUT_ROWS, top, dtype=torch.long, device=dev)
        self.inputs[3] = scratch_slot
        self.staging = torch.zeros(INPUT_ROWS, top, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.entry_inputs = torch.zeros(2, top_entries + 1, dtype=torch.long, device=dev)
        self.entry_staging = torch.zeros(2, top_entries + 1, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.entry_cu = torch.zeros(top_entries + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(top, device=dev)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        # sp > 1: a second decode graph per bucket for steps whose rows are all replicated, with the dense MLPs
        # split over the SP ranks (ForwardContext.split_mlp)
        self.variants = [False] + [True] * bool(config.sp_split_mlp and model.sp_split_mlp_ok())
        self.graphs: dict[tuple[GraphShape, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[GraphShape, bool], torch.Tensor] = {}
        self.steps = 0  # decode steps run in the graph form
        self.split_steps = 0  # ... of which with the MLPs split over SP
        self.extend_steps = 0  # extend steps run in the graph form
        if capture:
            self._capture_all(decode, extend)

    def release(self) -> None:
        """Destroy the captured graphs now (not whenever the garbage collector gets to them). A graph that captured
        collectives holds their communicators: they cannot be released while it lives."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def shape_for(self, plan: StepPlan) -> GraphShape | None:
        """The padded shape of ``plan`` (the same on every rank: it counts every rank's rows), None if none fits."""
        ps = self.pstate
        n = max(rank_row_count(plan, ps.sp_size, r) for r in range(ps.sp_size))
        if plan.is_decode:
            return next((GraphShape(b, b, True) for b in self.buckets if b >= n), None)
        if not self.extend or not extend_fits(plan, ps.sp_size):
            return None
        entries = max(sum(1 for c in plan.chunks if computed_pieces(c, ps.sp_size, r)) for r in range(ps.sp_size))
        return next((s for s in self.extend if s.rows >= n and s.entries >= entries + (s.rows > n)), None)

    def _context(self, shape: GraphShape, batches, split: bool, zero_slots: torch.Tensor | None) -> ForwardContext:
        n, e = shape.rows, shape.entries
        meta = AttentionStepMeta(write_rows=slice(0, n), write_slots=self.inputs[2, :n],
                                 merge_mask=self.inputs[4, :n] if self.pstate.sp_size > 1 else None,
                                 window_write_slots=self.inputs[5, :n] if self.table.window_table is not None
                                 else None)
        attention = StepAttention(self.backends[shape], meta, batches) if self.has_kv else None
        if shape.decode:  # one row per entry: the rows' own state slots and offsets
            slots, cu = self.inputs[3, :n], self.cu[: n + 1]
        else:
            slots, cu = self.entry_inputs[0, :e], self.entry_cu[: e + 1]
        linear = LinearStepMeta(zero_slots=zero_slots, split=[], local_rows=self.rows[:n], local_slots=slots,
                                local_cu=cu, all_decode=shape.decode, mode=self.config.lasp_mode)
        return ForwardContext(self.pstate, self.inputs[0, :n], self.inputs[1, :n], n, False, attention, linear,
                              split_mlp=split, replicated_mask=self.inputs[4, :n] if self.pstate.sp_size > 1 else None,
                              static_shapes=True)

    def _load(self, step: PaddedStep, shape: GraphShape, last_tokens: torch.Tensor | None) -> list:
        """Copy a padded step into the static buffers and plan its attention; the step's batches."""
        n, e = shape.rows, shape.entries
        self.staging[:, :n].numpy()[:] = step.inputs
        self.inputs[:, :n].copy_(self.staging[:, :n], non_blocking=True)
        if not shape.decode:
            self.entry_staging[0, :e].numpy()[:] = step.entry_slots
            self.entry_staging[1, : e + 1].numpy()[:] = step.qo_indptr
            self.entry_inputs[:, : e + 1].copy_(self.entry_staging[:, : e + 1], non_blocking=True)
            self.entry_cu[: e + 1].copy_(self.entry_inputs[1, : e + 1])
        if last_tokens is not None:
            take_prev_tokens(self.inputs[0, :n], last_tokens)
        batches = []
        if self.has_kv:
            batches = [padded_batch(self.config.page_size, step.qo_indptr, step.kv_indptr, step.kv_indices,
                                    step.last_page_len, step.kv_lens, step.window_kv_indices)]
            self.backends[shape].plan_batches(batches)
        self.on_inputs_copied()
        return batches

    def run(self, plan: StepPlan, last_tokens: torch.Tensor | None) -> tuple[torch.Tensor, PaddedStep] | None:
        """The step's hidden states ``[rows, hidden]`` (real rows first) and its padded form; None when the step
        does not fit a shape, or an entry has no KV on this rank (it runs eagerly then). ``last_tokens``: the
        previous step's sampled tokens on the device, when the plan's decode rows read them (``plan.prev_tokens``)."""
        shape = self.shape_for(plan)
        if shape is None:
            return None
        step = build_padded_step(plan, self.table, self.pstate, shape.rows, shape.entries, self.scratch_slot)
        if step is None:
            return None
        PROFILE.mark("build")
        batches = self._load(step, shape, last_tokens)
        PROFILE.mark("load")
        # every SP rank computes every row (the same rows in the same order): the MLPs may split over SP
        split = shape.decode and self.variants[-1] and all(c.placement == Placement.REPLICATED for c in plan.chunks)
        if shape.decode:
            self.steps += 1
            self.split_steps += split
        else:
            self.extend_steps += 1
        if self.capture:
            self.graphs[shape, split].replay()
            PROFILE.mark("replay")
            return self.outputs[shape, split], step
        started = [s.slot for s in plan.started if not s.restored]  # eager only: captured steps keep no state
        zero = torch.tensor(started, dtype=torch.long, device=self.device) if started else None
        hidden = self.model(self._context(shape, batches, split, zero))
        PROFILE.mark("forward")
        return hidden, step

    @torch.inference_mode()
    def _capture_all(self, decode: list[GraphShape], extend: list[GraphShape]) -> None:
        start = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        dev = self.device
        forms = [(s, split) for s in reversed(decode) for split in self.variants]
        forms += [(s, False) for s in reversed(extend)]
        for shape, split in sorted(forms, key=lambda f: -f[0].rows):  # the largest first: the smaller ones reuse
            # its memory. Every entry on the scratch page, one row each and the rest on the last
            step = build_padded_step(StepPlan(), self.table, self.pstate, shape.rows, shape.entries, self.scratch_slot)
            batches = []
            if self.has_kv:
                batches = [padded_batch(self.config.page_size, step.qo_indptr, step.kv_indptr, step.kv_indices,
                                        step.last_page_len, step.kv_lens, step.window_kv_indices)]
                self.backends[shape].plan_batches(batches)
            if not shape.decode:  # the padding entries' offsets
                self.entry_cu[: shape.entries + 1].copy_(torch.from_numpy(step.qo_indptr))
            ctx = self._context(shape, batches, split, None)
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisation and autotuning stay out of the graph
                    self.model(ctx)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[shape, split] = self.model(ctx)
            self.graphs[shape, split] = graph
        torch.cuda.synchronize(dev)
        log.info("rank %d: captured %d CUDA graphs (decode batch sizes %s%s; extend tokens %s) in %.1f s",
                 self.pstate.rank, len(self.graphs), ",".join(map(str, self.buckets)),
                 ", each also with the MLPs split over SP" if len(self.variants) > 1 else "",
                 ",".join(str(s.rows) for s in extend) or "none", time.monotonic() - start)
