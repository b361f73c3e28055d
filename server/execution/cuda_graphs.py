"""CUDA graphs for decode steps, captured per batch-size bucket at start-up.

A decode step (every request one new token, none split) is padded to the smallest bucket that holds the most rows
any SP rank computes, so every rank replays the same bucket and the collectives inside the graphs (the TP
all-reduces, the SP merge of replicated rows) line up. The step's inputs are copied into static buffers: token
ids, positions, KV write slots (rows this rank does not store write to the scratch page), state slots (padded rows
use the scratch slot), the SP merge mask, and the attention backend's fixed index buffers, which its plan refills
(:meth:`server.backends.flashinfer_backend.FlashInferAttentionBackend.graph_decode`). Then the graph replays.
At sp > 1 a bucket has a second graph for steps whose rows are all replicated, in which dense MLPs split over the
SP ranks (``ForwardContext.split_mlp``; docs/sp.md, "Decode: dense MLPs split over the SP ranks").

Modes (``EngineConfig.cuda_graph``): ``auto`` captures on CUDA with the flashinfer backend; ``eager`` pads and
fills the same static buffers but runs the model eagerly (any device: the tests check the graph path's metadata
on CPU this way); ``off`` runs every step eagerly.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from server.backends.attention import AttentionBackend, StepAttention, decode_batch
from server.config import CudaGraphMode, EngineConfig
from server.execution.request_table import RequestTable
from server.execution.step_builder import (
    INPUT_ROWS,
    PaddedDecode,
    build_padded_decode,
    rank_row_count,
    take_prev_tokens,
)
from server.execution.step_profile import PROFILE
from server.forward.context import AttentionStepMeta, ForwardContext, LinearStepMeta
from server.forward.plan import Placement, StepPlan
from server.sp.groups import ParallelState

log = logging.getLogger(__name__)


def bucket_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond; ``max_bs`` itself last."""
    sizes, bs = [], 1
    while bs < max_bs:
        sizes.append(bs)
        bs = bs * 2 if bs < 8 else bs + (8 if bs < 64 else 16 if bs < 256 else 32)
    return sizes + [max_bs]


class GraphRun(enum.Enum):
    """How this rank runs decode steps: replayed from captured graphs, on the graphs' static buffers but eagerly, or
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


class DecodeGraphs:
    """Decode steps of up to ``cuda_graph_max_bs`` requests, padded to a batch-size bucket and replayed from the
    bucket's CUDA graph (``capture``) or run eagerly on the same static buffers.

    It holds what it reads, passed in: the model, the rank's groups, the request table (page tables), the
    attention backend (which gives one graph-form backend per bucket) and ``on_inputs_copied``, called once a
    step's inputs are on the device (the caller then knows when the host buffers may be rewritten)."""

    def __init__(self, model: torch.nn.Module, pstate: ParallelState, config: EngineConfig, backend: AttentionBackend,
                 table: RequestTable, scratch_slot: int, num_slots: int, has_kv: bool, capture: bool,
                 on_inputs_copied: Callable[[], None]):
        self.model, self.pstate, self.config, self.table = model, pstate, config, table
        self.has_kv, self.capture, self.on_inputs_copied = has_kv, capture, on_inputs_copied
        self.device = dev = pstate.device
        self.buckets = bucket_sizes(min(config.cuda_graph_max_bs, num_slots))
        top = self.buckets[-1]
        self.scratch_slot = scratch_slot
        # One static block of per-row inputs (token ids, positions, KV write slots, state slots, merge flags), filled
        # by one host-to-device copy per step from a pinned staging block.
        self.inputs = torch.zeros(INPUT_ROWS, top, dtype=torch.long, device=dev)
        self.inputs[3] = scratch_slot
        self.staging = torch.zeros(INPUT_ROWS, top, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.rows = torch.arange(top, device=dev)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.backends = backend.graph_decode(self.buckets, table.page_table.shape[1])
        # sp > 1: a second graph per bucket for steps whose rows are all replicated, with the dense MLPs split
        # over the SP ranks (ForwardContext.split_mlp)
        self.variants = [False] + [True] * bool(config.sp_split_mlp and model.sp_split_mlp_ok())
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.steps = 0  # decode steps run in the graph form
        self.split_steps = 0  # ... of which with the MLPs split over SP
        if capture:
            self._capture_all()

    def release(self) -> None:
        """Destroy the captured graphs now (not whenever the garbage collector gets to them). A graph that captured
        collectives holds their communicators: they cannot be released while it lives."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def bucket_for(self, plan: StepPlan) -> int | None:
        ps = self.pstate
        n = max(rank_row_count(plan, ps.sp_size, r) for r in range(ps.sp_size))
        return next((b for b in self.buckets if b >= n), None)

    def _context(self, bs: int, batches, split: bool) -> ForwardContext:
        meta = AttentionStepMeta(write_rows=slice(0, bs), write_slots=self.inputs[2, :bs],
                                 merge_mask=self.inputs[4, :bs] if self.pstate.sp_size > 1 else None)
        attention = StepAttention(self.backends[bs], meta, batches) if self.has_kv else None
        linear = LinearStepMeta(zero_slots=None, split=[], local_rows=self.rows[:bs], local_slots=self.inputs[3, :bs],
                                local_cu=self.cu[: bs + 1], all_decode=True, mode=self.config.lasp_mode)
        return ForwardContext(self.pstate, self.inputs[0, :bs], self.inputs[1, :bs], bs, False, attention, linear,
                              split_mlp=split)

    def _load(self, step: PaddedDecode, bs: int, last_tokens: torch.Tensor | None) -> list:
        """Copy a padded step into the static buffers and plan its attention; the step's batches."""
        self.staging[:, :bs].numpy()[:] = step.inputs
        self.inputs[:, :bs].copy_(self.staging[:, :bs], non_blocking=True)
        if last_tokens is not None:
            take_prev_tokens(self.inputs[0, :bs], last_tokens)
        batches = []
        if self.has_kv:
            batches = [decode_batch(self.config.page_size, step.kv_indptr, step.kv_indices,
                                    step.last_page_len, step.kv_lens)]
            self.backends[bs].plan_batches(batches)
        self.on_inputs_copied()
        return batches

    def run(self, plan: StepPlan, last_tokens: torch.Tensor | None) -> tuple[torch.Tensor, PaddedDecode] | None:
        """The step's hidden states ``[bucket, hidden]`` (real rows first) and its padded form; None when the step
        does not fit a bucket, or a row has no KV on this rank (it runs eagerly then). ``last_tokens``: the previous
        step's sampled tokens on the device, when the plan's decode rows read them (``plan.prev_tokens``)."""
        bs = self.bucket_for(plan)
        if bs is None:
            return None
        step = build_padded_decode(plan, self.table, self.pstate, bs, self.scratch_slot)
        if step is None:
            return None
        PROFILE.mark("build")
        batches = self._load(step, bs, last_tokens)
        PROFILE.mark("load")
        # every SP rank computes every row (the same rows in the same order): the MLPs may split over SP
        split = self.variants[-1] and all(c.placement == Placement.REPLICATED for c in plan.chunks)
        self.steps += 1
        self.split_steps += split
        if self.capture:
            self.graphs[bs, split].replay()
            PROFILE.mark("replay")
            return self.outputs[bs, split], step
        hidden = self.model(self._context(bs, batches, split))
        PROFILE.mark("forward")
        return hidden, step

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        page, dev = self.config.page_size, self.device
        for bs, split in itertools.product(reversed(self.buckets), self.variants):  # the largest first: the
            batches = []  # smaller ones reuse its memory
            if self.has_kv:  # every row on the scratch page
                ones = np.ones(bs, dtype=np.int64)
                batches = [decode_batch(page, np.arange(bs + 1, dtype=np.int32), np.zeros(bs, dtype=np.int32),
                                        ones.astype(np.int32), ones)]
                self.backends[bs].plan_batches(batches)
            ctx = self._context(bs, batches, split)
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisation and autotuning stay out of the graph
                    self.model(ctx)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs, split] = self.model(ctx)
            self.graphs[bs, split] = graph
        torch.cuda.synchronize(dev)
        log.info("rank %d: captured %d decode CUDA graphs (batch sizes %s%s) in %.1f s", self.pstate.rank,
                 len(self.graphs), ",".join(map(str, self.buckets)),
                 "; each also with the MLPs split over SP" if len(self.variants) > 1 else "", time.monotonic() - start)
