"""One rank's model, caches, request mirror and forward step.

A step: the plan updates the rank's request mirror (:class:`RequestTable`), the step's rows and metadata are
built once (:mod:`server.execution.step_builder`), the attention backend prepares them once (plans, index tensors),
and the model runs, eagerly or, for decode steps and short extend steps, as a CUDA graph replay
(:mod:`server.execution.cuda_graphs`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from server.backends import make_attention_backend
from server.backends.attention import AttentionGeometry
from server.config import EngineConfig
from server.execution.memory import weight_bytes
from server.execution.request_table import RequestTable
from server.execution.step_builder import LocalChunk, StepRows, build_step_rows, driver_rows, take_prev_tokens
from server.execution.step_profile import PROFILE
from server.forward.context import ForwardContext
from server.forward.plan import ChunkPlan, Placement, StepPlan
from server.kernels import ops
from server.kernels.fp8 import FP8
from server.layers.cache_spec import page_bytes, shared_kv, window_group_window
from server.models.config import ModelConfig
from server.models.loader import build_model, context_length, resolve_dtype
from server.sp.groups import ParallelState
from server.sp.ulysses import UlyssesMesh, init_ulysses_mesh

log = logging.getLogger(__name__)

NO_KV_PAGES = 1 << 40  # a model without softmax layers stores no KV: pages are bookkeeping only
AUTO_SNAPSHOTS = 64  # prefix-cache state snapshots by default ...
AUTO_SNAPSHOT_SHARE = 0.25  # ... within this share of the cache budget

# Prompt logprobs are computed from logits a slice of rows at a time: a long prompt's [rows, vocab] logits (and
# their log_softmax) would not fit. A slice holds about this many fp32 logits, and at most SCORE_MAX_ROWS rows.
SCORE_SLICE_LOGITS = 1 << 26
SCORE_MAX_ROWS = 4096


@dataclass
class ScoredRows:
    """One chunk's prompt logprobs (host tensors), one row per scored prompt token in position order: the token's
    logprob, its rank (tokens at least as likely) and the ``top_k`` most likely tokens of the step's largest k."""

    logprobs: torch.Tensor  # [m] fp32
    ranks: torch.Tensor  # [m] int64
    top_ids: torch.Tensor  # [m, k] int64
    top_logprobs: torch.Tensor  # [m, k] fp32


@dataclass
class StepOutput:
    """What one step gives SP rank 0 (and its TP peers): ``logits`` of the sampled requests in plan order (of every
    new token with ``plan.all_logits``), and the prompt logprobs of the chunks that score, by plan index."""

    logits: torch.Tensor | None
    prompt_logprobs: dict[int, ScoredRows] = field(default_factory=dict)


class ModelRunner:
    """Builds the model for this rank, sizes and allocates its caches, and runs steps. ``mesh``: the SP group as
    a U x R Ulysses mesh (:func:`server.sp.ulysses.init_ulysses_mesh`), U = 1 if not given.

    Only the SP group's rank 0 (``sp_rank == 0``; with its TP peers for the vocab-parallel head) computes
    logits. Split requests end in chunk 2P-1, which rank 0 owns, replicated tokens are on every SP rank, and
    requests homed elsewhere send their last hidden row to rank 0. Chunks that score their prompt tokens (prompt
    logprobs) send all their scored rows to rank 0, which computes their logprobs ``score_slice_rows`` rows at a
    time.

    State slots: ``num_slots`` for requests plus one scratch slot (index ``num_slots``) for padded graph rows.
    """

    def __init__(self, config: EngineConfig, model_path: str, model_cfg: ModelConfig, pstate: ParallelState,
                 mesh: UlyssesMesh | None = None):
        self.config = config
        self.pstate = pstate
        self.mesh = mesh if mesh is not None else init_ulysses_mesh(pstate, 1)  # U = 1 builds no group
        self.device = pstate.device
        self.dtype = resolve_dtype(config.dtype, model_cfg, self.device)
        ops.set_kernel_backend(config.attention_backend)
        torch.manual_seed(config.seed)
        self.model = build_model(model_path, model_cfg, pstate, self.dtype, config.load_format, config.seed,
                                 config.quantization)
        # every layer that keeps per-request state, with what it declares (server/layers/cache_spec.py)
        kv_dtype = FP8 if config.kv_cache_dtype == "fp8_e4m3" else None
        self.cache_layers = [(layer, layer.cache_spec().with_kv_dtype(kv_dtype)) for layer in self.model.cache_layers()]
        self.moe_layers = [m for m in self.model.moe_layers() if m.expert_parallel]
        self.graph_pairs: tuple[int, ...] = ()  # the last collect_graph_pairs() result (rank 0)
        self.num_slots = config.max_running_requests
        self.scratch_slot = self.num_slots
        self.snapshot_slots = 0
        if config.enable_prefix_cache and self.has_state:
            self.snapshot_slots = config.prefix_cache_snapshots
            if self.snapshot_slots is None:
                self.snapshot_slots = -1  # sized in plan_cache
        self.backend = make_attention_backend(config.attention_backend, pstate, config.page_size,
                                              self._geometry(), self.dtype)
        self.table: RequestTable | None = None
        self.graphs = None
        # the last step's sampled tokens, on the device (rank 0 writes them; a plan with ``prev_tokens`` reads them)
        self.last_tokens = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
        # recorded once a step's inputs are on the device: the next step's host-side buffers (pinned staging,
        # flashinfer's plan buffers) are rewritten only after that
        self._inputs_copied: torch.cuda.Event | None = None
        self.score_slice_rows = max(1, min(SCORE_MAX_ROWS, SCORE_SLICE_LOGITS // model_cfg.vocab_size))

    @property
    def has_kv(self) -> bool:
        """Some layer keeps paged per-token caches (softmax KV): the step needs attention metadata."""
        return any(spec.paged for _, spec in self.cache_layers)

    @property
    def has_state(self) -> bool:
        """Some layer keeps a per-request state slot (linear attention): the prefix cache snapshots it."""
        return any(not spec.paged for _, spec in self.cache_layers)

    def _geometry(self) -> AttentionGeometry | None:
        shapes = {spec.geometry for _, spec in self.cache_layers if spec.paged}
        windows = {getattr(spec, "window", None) for _, spec in self.cache_layers if spec.paged} - {None}
        if len(shapes) != 1 or len(windows) > 1:
            return None  # no softmax layers, or layers of different shapes: the reference handles any
        return AttentionGeometry(*shapes.pop(), window=windows.pop() if windows else None)

    @property
    def kv_window(self) -> int | None:
        """The window group's window (:func:`server.layers.cache_spec.window_group_window`; None: no window group)."""
        return window_group_window([s for _, s in self.cache_layers])

    def cache_bytes_per_page(self) -> int:
        return page_bytes([s for _, s in self.cache_layers], self.config.page_size, self.dtype)

    @property
    def reserved_pages(self) -> int:
        """Pages never handed out: the scratch page, and the window table's null page (models with a window
        group)."""
        return 1 + (self.kv_window is not None)

    def state_bytes_per_slot(self) -> int:
        return sum(s.unit_bytes(self.config.page_size, self.dtype) for _, s in self.cache_layers if not s.paged)

    def available_cache_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # Keep headroom for activations: the budget is a fraction of the whole device.
            return max(0, int(total * self.config.mem_fraction_static) - used)
        return int(self.config.cpu_cache_gb * (1 << 30))

    def plan_cache(self) -> tuple[int, int]:
        """KV pages this rank can hold (page 0, the scratch page, included) and prefix-cache state snapshots, after
        the state pools are taken out of the budget. By default the snapshots get up to ``AUTO_SNAPSHOTS`` slots
        within ``AUTO_SNAPSHOT_SHARE`` of the budget; an explicit number is taken as given."""
        available = self.available_cache_bytes()
        state = self.state_bytes_per_slot()
        if self.snapshot_slots < 0:
            self.snapshot_slots = min(AUTO_SNAPSHOTS, int(available * AUTO_SNAPSHOT_SHARE) // state)
        budget = available - self.total_slots * state
        per_page = self.cache_bytes_per_page()
        if budget <= 0:
            raise RuntimeError(
                f"no memory left for caches on {self.device} after the weights and {self.num_slots} state slots; "
                "raise --mem-fraction-static / --cpu-cache-gb or lower --max-running-requests")
        if not per_page:
            return NO_KV_PAGES, self.snapshot_slots
        pages = max(1 + self.reserved_pages, budget // per_page)
        if self.config.max_total_tokens is not None:  # the cap counts usable pages (not the scratch / null page)
            pages = min(pages, self.reserved_pages + self.config.max_total_tokens // self.config.page_size)
        return pages, self.snapshot_slots

    @property
    def total_slots(self) -> int:
        """State slots: one per running request, the scratch slot, the prefix cache's snapshots."""
        return self.num_slots + 1 + self.snapshot_slots

    def allocate_caches(self, num_pages: int, snapshot_slots: int) -> None:
        self.num_pages = num_pages
        self.snapshot_slots = snapshot_slots
        slots = self.total_slots
        shares = shared_kv([s for _, s in self.cache_layers])
        for i in sorted(range(len(self.cache_layers)), key=lambda i: i in shares):  # shared tensors first
            layer, spec = self.cache_layers[i]
            extra = {"share": self.cache_layers[shares[i]][0].cache} if i in shares else {}
            layer.cache = spec.allocate(num_pages if spec.paged else slots, self.config.page_size, self.dtype,
                                        self.device, **extra)
        max_pages = -(-self.config_max_len() // self.config.page_size) + 2
        self.table = RequestTable(self.pstate.sp_size, self.pstate.sp_rank, slots, max_pages, self.config.page_size,
                                  self.device, windowed=self.kv_window is not None)
        kv_dtypes = sorted({str(s.kv_dtype or self.dtype).removeprefix("torch.") for _, s in self.cache_layers
                            if s.paged}) or ["none"]
        log.info("rank %d: %d KV pages of %d tokens (%d tokens of KV in %s, %.2f GiB), %d state slots, %s attention",
                 self.pstate.rank, num_pages, self.config.page_size,
                 (num_pages - self.reserved_pages) * self.config.page_size,
                 "/".join(kv_dtypes), num_pages * self.cache_bytes_per_page() / (1 << 30), self.num_slots,
                 self.backend.name)

    def take_expert_pairs(self) -> tuple[int, ...]:
        """Expert parallel: the (token, expert) pairs each rank computed since the last call, summed over the MoE
        layers (eager steps; empty otherwise). Every rank knows every rank's counts (the exchanged splits)."""
        total: list[int] = []
        for m in self.moe_layers:
            pairs = m.take_pairs()
            total = [a + b for a, b in zip(total, pairs)] if total else pairs
        return tuple(total)

    def collect_graph_pairs(self) -> tuple[int, ...]:
        """Expert parallel: the (token, expert) pairs each rank computed in graph-form steps since the last call,
        summed over the MoE layers. A collective: every rank calls it at the same step (``StepPlan.
        collect_expert_pairs``); rank 0 reads the result (one host sync), the others only take part."""
        mine = sum((m.take_graph_pairs() for m in self.moe_layers), torch.zeros((), dtype=torch.long,
                                                                                   device=self.device))
        every = self.pstate.world_all_gather(mine.view(1))
        return tuple(every.view(-1).tolist()) if self.pstate.rank == 0 else ()

    def footprint(self) -> dict:
        """What this rank stores, in bytes: its weights (its TP shard, its experts only with expert parallelism, its
        1/sp of every dense weight with ``--shard-dense-weights``), the buffers its sharded dense weights are gathered
        into (``gather_buffer_bytes``: two decoder layers' and the vocabulary's TP slices; 0 without sharding), its
        KV cache pages and its state slots (zero before the caches are allocated); ``experts``: the ``[first, end)``
        experts of every MoE layer here (None without MoE layers)."""
        allocated = self.table is not None
        moe = next(iter(self.model.moe_layers()), None)
        gather = getattr(self.model, "dense_weight_gather", None)
        return {"weight_bytes": weight_bytes(self.model),
                "gather_buffer_bytes": 0 if gather is None else gather.buffer_bytes,
                "kv_cache_bytes": self.cache_bytes_per_page() * self.num_pages if allocated and self.has_kv else 0,
                "state_bytes": self.state_bytes_per_slot() * self.total_slots if allocated else 0,
                "experts": None if moe is None else (moe.first, moe.end)}

    def footprint_line(self) -> str:
        f = self.footprint()
        experts = "" if f["experts"] is None else f", experts [{f['experts'][0]}, {f['experts'][1]})"
        gathered = f"gather buffers {f['gather_buffer_bytes'] / 2**30:.3f} GiB, " if f["gather_buffer_bytes"] else ""
        return (f"weights {f['weight_bytes'] / 2**30:.3f} GiB, {gathered}"
                f"KV cache {f['kv_cache_bytes'] / 2**30:.3f} GiB, "
                f"states {f['state_bytes'] / 2**30:.3f} GiB{experts}")

    def config_max_len(self) -> int:
        return context_length(self.config, self.model.cfg)

    def enable_decode_graphs(self) -> None:
        """Capture (or, in ``eager`` mode, only pad) decode steps per batch-size bucket and short extend steps per
        token bucket; see cuda_graphs.py."""
        from server.execution.cuda_graphs import GraphRun, StepGraphs, graph_run

        mode = graph_run(self.config, self.device)
        if mode == GraphRun.CAPTURE and not self.backend.graph_capturable():
            mode = GraphRun.OFF
        if mode != GraphRun.OFF:
            self.graphs = StepGraphs(self.model, self.pstate, self.config, self.backend, self.table,
                                     self.scratch_slot, self.num_slots, self.has_kv, self.has_state,
                                     mode == GraphRun.CAPTURE, self.inputs_copied)

    def release(self) -> None:
        """Drop the model and caches so the device memory returns to the allocator's free pool."""
        for layer, _ in self.cache_layers:
            layer.cache = None
        self.model = None
        if self.graphs is not None:
            self.graphs.release()
        self.graphs = None
        self.cache_layers, self.moe_layers = [], []
        self.backend.release()
        # The modules hold reference cycles (a parameter's weight_loader is a bound method of its module), so the
        # weights outlive the last reference until the cyclic collector runs: collect now, or the next engine in
        # this process plans its caches around memory that is no longer used
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepOutput | None:
        """Forward one step; its :class:`StepOutput` on SP rank 0 (and its TP peers), None on the other SP ranks.
        Nothing here waits for the device: rank 0 may prepare the next step while this one runs (except in a step
        that collects the graph-form expert pairs, :meth:`collect_graph_pairs`, this step's included)."""
        out = self._run(plan)
        if plan.collect_expert_pairs and self.moe_layers:
            self.graph_pairs = self.collect_graph_pairs()
        return out

    def _run(self, plan: StepPlan) -> StepOutput | None:
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()
        self.table.apply(plan)
        self._copy(plan)
        if plan.prev_tokens and self.pstate.world_size > 1:
            dist.broadcast(self.last_tokens, src=0)
        PROFILE.mark("apply")
        if self.graphs is not None:
            out = self.graphs.run(plan, self.last_tokens if plan.prev_tokens else None)
            if out is not None:
                hidden, step = out
                result = self._outputs(hidden, plan, step.chunks)
                PROFILE.mark("logits")
                return result
        rows = build_step_rows(plan, self.table, self.pstate, self.config.ring_mode, self.config.lasp_mode,
                               self.mesh.ulysses_degree, self.config.ulysses_layers)
        if plan.prev_tokens:
            take_prev_tokens(rows.input_ids, self.last_tokens)
        ctx = self.context(rows)
        self.inputs_copied()
        hidden = self.model(ctx)
        PROFILE.mark("forward")
        if plan.all_logits:
            every = self._rows_on_driver(hidden, plan, lambda c: c.num_new)
            return None if every is None else StepOutput(self.model.compute_logits(every))
        return self._outputs(hidden, plan, rows.chunks)

    def inputs_copied(self) -> None:
        """Mark the step's inputs as copied to the device (see ``_inputs_copied``)."""
        if self.device.type == "cuda":
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record(torch.cuda.current_stream(self.device))

    def _outputs(self, hidden: torch.Tensor, plan: StepPlan, chunks: list[LocalChunk]) -> StepOutput | None:
        """Sampled logits, then prompt logprobs: every rank runs their collectives in this one order."""
        logits = self._sampled_logits(hidden, chunks)
        scored = self._prompt_logprobs(hidden, plan)
        return None if self.pstate.sp_rank != 0 else StepOutput(logits, scored)

    def _copy(self, plan: StepPlan) -> None:
        """The plan's copies, before the forward: cached-prefix pages copied on write (every softmax layer), then
        state snapshots saved and restored (every linear-attention layer)."""
        pages = plan.page_copies[self.pstate.sp_rank] if plan.page_copies else []
        if pages and self.has_kv:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*pages))
            for layer, spec in self.cache_layers:
                if spec.paged:
                    spec.copy(layer.cache, src, dst)
        for src, dst in plan.state_copies:  # in order: a snapshot may be saved and restored in one step
            s, d = torch.tensor([src], device=self.device), torch.tensor([dst], device=self.device)
            for layer, spec in self.cache_layers:
                if not spec.paged:
                    spec.copy(layer.cache, s, d)

    def context(self, rows: StepRows, backend=None) -> ForwardContext:
        """The forward context of a step's rows, its attention prepared by ``backend`` (default: the rank's)."""
        attention = (backend or self.backend).prepare(rows.attention, self.mesh) if self.has_kv else None
        replicated = sum(lc.num_rows for lc in rows.chunks if lc.chunk.placement == Placement.REPLICATED)
        return ForwardContext(self.pstate, rows.input_ids, rows.positions, rows.num_rows, rows.seq_sharded,
                              attention, rows.linear, self.mesh,
                              replicated_rows=replicated if self.pstate.sp_size > 1 else 0)

    def _sampled_logits(self, hidden: torch.Tensor, chunks: list[LocalChunk]) -> torch.Tensor | None:
        """Logits of the last new token of every sampled request, in plan order, on SP rank 0. Requests homed
        on other SP ranks send their hidden row to rank 0 first (one SP all-gather, only when there are any)."""
        ps = self.pstate
        sampled = sorted((lc for lc in chunks if lc.chunk.sample), key=lambda lc: lc.index)
        if not sampled:
            return None
        counts = [sum(1 for lc in sampled if lc.chunk.sample_rank == r) for r in range(ps.sp_size)]
        mine = [lc.row_start + lc.num_rows - 1 for lc in sampled if lc.chunk.sample_rank == ps.sp_rank]
        if mine == list(range(len(mine))):  # decode: the first rows, in order
            rows = hidden[: len(mine)]
        else:
            rows = hidden[torch.tensor(mine, dtype=torch.long).to(hidden.device)]
        if any(counts[1:]):
            padded = torch.zeros(max(counts), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
            padded[: len(mine)] = rows
            parts = ps.sp_all_gather(padded)
            taken = [0] * ps.sp_size
            ordered = []
            for lc in sampled:
                r = lc.chunk.sample_rank
                ordered.append(parts[r][taken[r]])
                taken[r] += 1
            rows = torch.stack(ordered)
        if ps.sp_rank != 0:
            return None
        return self.model.compute_logits(rows)

    def _rows_on_driver(self, hidden: torch.Tensor, plan: StepPlan, count: Callable[[ChunkPlan], int]
                        ) -> torch.Tensor | None:
        """The hidden rows of the first ``count(chunk)`` new tokens of every chunk, on SP rank 0, request by request
        (plan order) in position order; None on the other SP ranks. Every rank knows every rank's rows from the plan
        (:func:`driver_rows`), so one SP all-gather of the rows (padded to the most any rank sends) is all it takes,
        and none when only rank 0 sends."""
        ps = self.pstate
        sent = [driver_rows(plan, ps.sp_size, r, count) for r in range(ps.sp_size)]
        local, _ = sent[ps.sp_rank]
        rows = hidden[torch.from_numpy(local).to(hidden.device)]
        width = max(len(r) for r, _ in sent)
        if any(len(r) for r, _ in sent[1:]):
            rows = torch.cat(ps.sp_all_gather(torch.nn.functional.pad(rows, (0, 0, 0, width - len(local)))))
        if ps.sp_rank != 0:
            return None
        index = np.concatenate([r * width + np.arange(len(rs)) for r, (rs, _) in enumerate(sent)])
        order = np.argsort(np.concatenate([k for _, k in sent]), kind="stable")
        return rows[torch.from_numpy(index[order]).to(hidden.device)]

    def _prompt_logprobs(self, hidden: torch.Tensor, plan: StepPlan) -> dict[int, ScoredRows]:
        """Prompt logprobs of the step's scoring chunks (see :class:`ScoredRows`), by plan index, on SP rank 0.
        Row p of a chunk scores the token at p + 1: the chunk's next token in the plan, or for its last row the
        chunk's ``scoring.next_token``."""
        scoring = [i for i, c in enumerate(plan.chunks) if c.num_scored > 0]
        if not scoring:
            return {}
        rows = self._rows_on_driver(hidden, plan, lambda c: c.num_scored)
        if rows is None:
            return {}
        offsets = np.cumsum([0] + [c.num_new for c in plan.chunks])
        targets: list[int] = []
        for i in scoring:
            c = plan.chunks[i]
            targets += plan.token_ids[offsets[i] + 1 : offsets[i] + c.num_new]
            if c.scoring.next_token is not None:
                targets.append(c.scoring.next_token)
        k = max(plan.chunks[i].scoring.top_k for i in scoring)
        parts = self._score(rows, torch.tensor(targets, dtype=torch.long, device=rows.device), k)
        split = [plan.chunks[i].num_scored for i in scoring]
        return {i: ScoredRows(*chunk) for i, chunk in zip(scoring, zip(*(p.split(split) for p in parts)))}

    def _score(self, rows: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """``(logprob of target, rank of target, top-k ids, top-k logprobs)`` of every row, computed
        ``score_slice_rows`` rows at a time (``compute_logits`` is a TP collective: every TP peer runs the same
        slices). Host tensors."""
        out: list[tuple[torch.Tensor, ...]] = []
        for a in range(0, rows.shape[0], self.score_slice_rows):
            lp = torch.log_softmax(self.model.compute_logits(rows[a : a + self.score_slice_rows]).float(), dim=-1)
            chosen = lp.gather(1, targets[a : a + self.score_slice_rows, None])
            top = torch.topk(lp, k, dim=-1)
            out.append((chosen[:, 0], (lp >= chosen).sum(dim=-1), top.indices, top.values))
        return tuple(torch.cat(p).cpu() for p in zip(*out))
