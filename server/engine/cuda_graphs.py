"""CUDA graphs for decode steps, captured per batch-size bucket at start-up.

A decode step (every request one new token, none split) is padded to the smallest bucket that holds the most rows
any SP rank computes, so every rank replays the same bucket and the collectives inside the graphs (the TP
all-reduces, the SP merge of replicated rows) line up. The step's inputs are copied into static buffers: token
ids, positions, KV write slots (rows this rank does not store write to the scratch page), state slots (padded rows
use the scratch slot), the SP merge mask, and the attention backend's fixed index buffers, which its plan refills
(:meth:`server.backends.flashinfer_backend.FlashInferAttentionBackend.graph_decode`). Then the graph replays.

Modes (``EngineConfig.cuda_graph``): ``auto`` captures on CUDA with the flashinfer backend; ``eager`` pads and
fills the same static buffers but runs the model eagerly (any device: the tests check the graph path's metadata
on CPU this way); ``off`` runs every step eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from server.backends.attention import StepAttention, sort_into_batches
from server.engine.step_builder import StepRows, build_padded_decode_rows, rank_row_count
from server.forward.context import AttentionStepMeta, ForwardContext, LinearStepMeta, LocalEntry
from server.forward.plan import StepPlan

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
    if device.type == "cuda" and hasattr(backend, "graph_decode"):
        return "capture"
    return "off"


class DecodeGraphs:
    def __init__(self, runner, capture: bool):
        self.runner = runner
        self.capture = capture
        dev = runner.device
        self.buckets = bucket_sizes(min(runner.config.cuda_graph_max_bs, runner.num_slots))
        top = self.buckets[-1]
        self.ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.pos = torch.zeros(top, dtype=torch.long, device=dev)
        self.write_rows = torch.arange(top, device=dev)
        self.write_slots = torch.zeros(top, dtype=torch.long, device=dev)
        self.slots = torch.full((top,), runner.scratch_slot, dtype=torch.long, device=dev)
        self.merge = torch.zeros(top, dtype=torch.bool, device=dev)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.backends = runner.backend.graph_decode(self.buckets, runner.table.page_table.shape[1])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.steps = 0  # decode steps run in the graph form
        if capture:
            self._capture_all()

    def bucket_for(self, plan: StepPlan) -> int | None:
        ps = self.runner.pstate
        n = max(rank_row_count(plan, ps.sp_size, r) for r in range(ps.sp_size))
        return next((b for b in self.buckets if b >= n), None)

    def _context(self, bs: int, batches) -> ForwardContext:
        r = self.runner
        meta = AttentionStepMeta(write_rows=self.write_rows[:bs], write_slots=self.write_slots[:bs],
                                 merge_mask=self.merge[:bs] if r.pstate.sp_size > 1 else None)
        attention = StepAttention(self.backends[bs], meta, batches) if r.attn_layers else None
        linear = LinearStepMeta(zero_slots=None, split=[], local_rows=self.write_rows[:bs], local_slots=self.slots[:bs],
                                local_cu=self.cu[: bs + 1], all_decode=True, mode=r.config.lasp_mode)
        return ForwardContext(r.pstate, self.ids[:bs], self.pos[:bs], bs, False, attention, linear)

    def _load(self, rows: StepRows, bs: int) -> list:
        """Copy a padded step into the static buffers and plan its attention; the step's batches."""
        self.ids[:bs].copy_(rows.input_ids)
        self.pos[:bs].copy_(rows.positions)
        self.write_slots[:bs].copy_(rows.attention.write_slots)
        self.slots[:bs].copy_(rows.linear.local_slots)
        if rows.attention.merge_mask is not None:
            self.merge[:bs].copy_(rows.attention.merge_mask)
        if not self.runner.attn_layers:
            return []
        batches = sort_into_batches(rows.attention.local, self.runner.config.page_size, self.runner.device)
        self.backends[bs].plan_batches(batches)
        return batches

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, StepRows] | None:
        """The step's hidden states ``[bucket, hidden]`` (real rows first) and its rows; None when the step does not
        fit a bucket, or a row has no KV on this rank (it runs eagerly then)."""
        r = self.runner
        bs = self.bucket_for(plan)
        if bs is None:
            return None
        rows = build_padded_decode_rows(plan, r.table, r.pstate, bs, r.scratch_slot, r.config.lasp_mode)
        if rows is None:
            return None
        batches = self._load(rows, bs)
        self.steps += 1
        if self.capture:
            self.graphs[bs].replay()
            return self.outputs[bs], rows
        return r.model(self._context(bs, batches)), rows

    @torch.inference_mode()
    def _capture_all(self) -> None:
        r = self.runner
        start = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):  # the largest first: the smaller ones reuse its memory
            entries = [LocalEntry(i, 1, [0], 1, False) for i in range(bs)]
            batches = []
            if r.attn_layers:
                batches = sort_into_batches(entries, r.config.page_size, r.device)
                self.backends[bs].plan_batches(batches)
            ctx = self._context(bs, batches)
            stream = torch.cuda.Stream(r.device)
            stream.wait_stream(torch.cuda.current_stream(r.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisation and autotuning stay out of the graph
                    r.model(ctx)
            torch.cuda.current_stream(r.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = r.model(ctx)
            self.graphs[bs] = graph
        torch.cuda.synchronize(r.device)
        log.info("rank %d: captured %d decode CUDA graphs (batch sizes %s) in %.1f s", r.pstate.rank,
                 len(self.buckets), ",".join(map(str, self.buckets)), time.monotonic() - start)

