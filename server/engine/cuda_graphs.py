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

import itertools
import logging
import time

import numpy as np
import torch

from server.backends.attention import StepAttention, decode_batch
from server.engine.step_builder import INPUT_ROWS, PaddedDecode, build_padded_decode, rank_row_count
from server.engine.step_profile import PROFILE
from server.forward.context import AttentionStepMeta, ForwardContext, LinearStepMeta
from server.forward.plan import Placement, StepPlan

log = logging.getLogger(__name__)


def bucket_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond; ``max_bs`` itself last."""
    sizes, bs = [], 1
    while bs < max_bs:
        sizes.append(bs)
        bs = bs * 2 if bs < 8 else bs + (8 if bs < 64 else 16 if bs < 256 else 32)
    return sizes + [max_bs]


def graph_mode(config, device: torch.device, backend) -> str:
    """``capture``, ``eager`` or ``off`` for this rank (see the module docstring)."""
    if config.cuda_graph == "off" or config.cuda_graph_max_bs <= 0:
        return "off"
    if config.cuda_graph == "eager":
        return "eager"
    if device.type == "cuda" and hasattr(backend, "graph_decode") and backend.graph_capturable():
        return "capture"
    return "off"


class DecodeGraphs:
    def __init__(self, runner, capture: bool):
        self.runner = runner
        self.capture = capture
        dev = runner.device
        self.buckets = bucket_sizes(min(runner.config.cuda_graph_max_bs, runner.num_slots))
        top = self.buckets[-1]
        # One static block of per-row inputs (token ids, positions, KV write slots, state slots, merge flags), filled
        # by one host-to-device copy per step from a pinned staging block.
        self.inputs = torch.zeros(INPUT_ROWS, top, dtype=torch.long, device=dev)
        self.inputs[3] = runner.scratch_slot
        self.staging = torch.zeros(INPUT_ROWS, top, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.rows = torch.arange(top, device=dev)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.backends = runner.backend.graph_decode(self.buckets, runner.table.page_table.shape[1])
        # sp > 1: a second graph per bucket for steps whose rows are all replicated, with the dense MLPs split
        # over the SP ranks (ForwardContext.split_mlp)
        self.variants = [False] + [True] * bool(runner.config.sp_split_mlp and runner.model.sp_split_mlp_ok())
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.steps = 0  # decode steps run in the graph form
        self.split_steps = 0  # ... of which with the MLPs split over SP
        if capture:
            self._capture_all()

    def release(self) -> None:
        """Destroy the captured graphs now (not whenever the garbage collector gets to them). A graph that captured
        collectives holds their communicators: they cannot be released while it lives."""
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def bucket_for(self, plan: StepPlan) -> int | None:
        ps = self.runner.pstate
        n = max(rank_row_count(plan, ps.sp_size, r) for r in range(ps.sp_size))
        return next((b for b in self.buckets if b >= n), None)

    def _context(self, bs: int, batches, split: bool) -> ForwardContext:
        r = self.runner
        meta = AttentionStepMeta(write_rows=slice(0, bs), write_slots=self.inputs[2, :bs],
                                 merge_mask=self.inputs[4, :bs] if r.pstate.sp_size > 1 else None)
        attention = StepAttention(self.backends[bs], meta, batches) if r.attn_layers else None
        linear = LinearStepMeta(zero_slots=None, split=[], local_rows=self.rows[:bs], local_slots=self.inputs[3, :bs],
                                local_cu=self.cu[: bs + 1], all_decode=True, mode=r.config.lasp_mode)
        return ForwardContext(r.pstate, self.inputs[0, :bs], self.inputs[1, :bs], bs, False, attention, linear,
                              split_mlp=split)

    def _load(self, step: PaddedDecode, bs: int, prev_tokens: bool) -> list:
        """Copy a padded step into the static buffers and plan its attention; the step's batches."""
        self.staging[:, :bs].numpy()[:] = step.inputs
        self.inputs[:, :bs].copy_(self.staging[:, :bs], non_blocking=True)
        if prev_tokens:
            self.runner.take_prev_tokens(self.inputs[0, :bs])
        batches = []
        if self.runner.attn_layers:
            batches = [decode_batch(self.runner.config.page_size, step.kv_indptr, step.kv_indices,
                                    step.last_page_len, step.kv_lens)]
            self.backends[bs].plan_batches(batches)
        self.runner.inputs_copied()
        return batches

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, PaddedDecode] | None:
        """The step's hidden states ``[bucket, hidden]`` (real rows first) and its padded form; None when the step
        does not fit a bucket, or a row has no KV on this rank (it runs eagerly then)."""
        r = self.runner
        bs = self.bucket_for(plan)
        if bs is None:
            return None
        step = build_padded_decode(plan, r.table, r.pstate, bs, r.scratch_slot)
        if step is None:
            return None
        if PROFILE:
            PROFILE.mark("build")
        batches = self._load(step, bs, plan.prev_tokens)
        if PROFILE:
            PROFILE.mark("load")
        # every SP rank computes every row (the same rows in the same order): the MLPs may split over SP
        split = self.variants[-1] and all(c.placement == Placement.REPLICATED for c in plan.chunks)
        self.steps += 1
        self.split_steps += split
        if self.capture:
            self.graphs[bs, split].replay()
            if PROFILE:
                PROFILE.mark("replay")
            return self.outputs[bs, split], step
        hidden = r.model(self._context(bs, batches, split))
        if PROFILE:
            PROFILE.mark("forward")
        return hidden, step

    @torch.inference_mode()
    def _capture_all(self) -> None:
        r = self.runner
        start = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        page = r.config.page_size
        for bs, split in itertools.product(reversed(self.buckets), self.variants):  # the largest first: the
            batches = []  # smaller ones reuse its memory
            if r.attn_layers:  # every row on the scratch page
                ones = np.ones(bs, dtype=np.int64)
                batches = [decode_batch(page, np.arange(bs + 1, dtype=np.int32), np.zeros(bs, dtype=np.int32),
                                        ones.astype(np.int32), ones)]
                self.backends[bs].plan_batches(batches)
            ctx = self._context(bs, batches, split)
            stream = torch.cuda.Stream(r.device)
            stream.wait_stream(torch.cuda.current_stream(r.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisation and autotuning stay out of the graph
                    r.model(ctx)
            torch.cuda.current_stream(r.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs, split] = r.model(ctx)
            self.graphs[bs, split] = graph
        torch.cuda.synchronize(r.device)
        log.info("rank %d: captured %d decode CUDA graphs (batch sizes %s%s) in %.1f s", r.pstate.rank,
                 len(self.graphs), ",".join(map(str, self.buckets)),
                 "; each also with the MLPs split over SP" if len(self.variants) > 1 else "", time.monotonic() - start)
