"""The attention-backend interface and the work every backend shares.

Per step the backend's :meth:`AttentionBackend.prepare` turns the step's :class:`AttentionStepMeta` into a
:class:`StepAttention`: the local entries sorted into one batch per kernel kind (CSR arrays built once, kernels
planned once), which every softmax layer of the step then runs through :meth:`StepAttention.forward`:

1. the new K/V rows this rank stores are written to its pages in one scatter;
2. every local query row attends to its request's KV on this rank, one call per kind (:func:`local_kind`):
   - ``ragged``: the rank had none of the request's KV before this step and stores the new rows: causal over the
     step's own k/v rows (no cache read);
   - ``*_causal``: the queries are the last rows of the request's KV on this rank, after a cached prefix:
     bottom-right aligned causal mask;
   - ``*_full``: every query sees every key (replicated queries on an SP rank that does not store them);
   - ``decode``: one query per request, which sees every key in the pages;
   ``paged_*`` kinds read K/V from the pages inside the kernel, ``gathered_*`` ones first copy the entries' pages
   into contiguous K/V (gather slots built once per step): with many query rows per entry that is faster than a
   paged kernel at page size 16, with few the paged kernel avoids the copy (``benchmarks/results/kernels_h200.md``);
3. split requests attend to every SP rank's KV shard by the pass-KV ring (or the all-gather-KV comparison mode);
   with ``--ulysses-degree`` > 1, to the step's new tokens by Ulysses x ring on the mesh and to the cached prefix
   by the ring, merged by LSE (the KV cache keeps its token-sharded layout either way, see docs/sp.md);
4. replicated rows (the same queries on every SP rank, KV sharded over SP) merge their partial results by base-2
   LSE over the SP group, all requests in one all-gather.
With sp = 1 only steps 1-2 remain. A CUDA-graph decode step uses the same object over static buffers, with the
merge done for all rows and kept where ``merge_mask`` says (see :mod:`server.execution.cuda_graphs`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from server.config import CommMode
from server.forward.context import AttentionStepMeta, LocalEntry, RingEntry
from server.kernels import ops
from server.kernels.sinks import apply_attention_sinks
from server.runs import Run
from server.sp.groups import ParallelState
from server.sp.ring_attention import allgather_kv_attention, merge_over_sp, packed_partials, ring_attention
from server.sp.ulysses import UlyssesMesh
from server.sp.ulysses_attention import ulysses_attention
from server.sp.window_attention import window_attention

KINDS = ("ragged", "gathered_causal", "gathered_full", "paged_causal", "paged_full", "decode")
GATHER_MIN_ROWS = 64  # entries with at least this many query rows read a gathered copy of their KV


@dataclass(frozen=True)
class AttentionGeometry:
    """What the model's softmax layers look like on this rank (every softmax layer of a model shares it)."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int
    head_dim: int
    scale: float
    kv_dtype: torch.dtype | None = None  # the KV pages' dtype when it is not the model's (FP8)
    window: int | None = None  # the sliding window of the model's window layers (None: it has none)


def local_kind(num_rows: int, kv_len: int, stores: bool) -> str:
    """The kind of an entry with ``num_rows`` query rows and ``kv_len`` KV rows on this rank (the query rows' own KV
    included when this rank ``stores`` them, as the last rows)."""
    if num_rows == 1:
        return "decode"
    if stores and kv_len == num_rows:
        return "ragged"
    source = "gathered" if num_rows >= GATHER_MIN_ROWS else "paged"
    return f"{source}_{'causal' if stores else 'full'}"


def _int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def indptr(lengths: list[int]) -> torch.Tensor:
    return _int32([0, *itertools.accumulate(lengths)])


@dataclass(frozen=True)
class GraphShape:
    """The static shape of a padded (CUDA-graph) step: its rows and attention entries. A decode step has one row per
    entry (``decode``); an extend step's entries hold any number of rows (padding entries may hold none)."""

    rows: int
    entries: int
    decode: bool


@dataclass
class AttentionBatch:
    """The entries of one kind in one step. ``rows`` are local query rows, entry by entry; for ``ragged`` the
    same rows hold the entry's keys. ``kv_indptr``/``kv_indices``/``last_page_len`` describe the pages (host)."""

    kind: str
    page_size: int
    q_lens: list[int]
    rows: torch.Tensor | None  # [sum(q_lens)] long, on the device (None when row_range covers them)
    row_range: tuple[int, int] | None  # (start, end) when rows are one contiguous range
    qo_indptr: torch.Tensor  # int32, host
    kv_indptr: torch.Tensor  # int32, host: pages (ragged: rows) per entry
    kv_indices: torch.Tensor  # int32, host: page ids
    last_page_len: torch.Tensor  # int32, host
    kv_lens: list[int]
    gather_slots: torch.Tensor | None = None  # gathered kinds: flat cache slots of every entry's KV, in order
    # a window page group: the same of the window layers' page tables (same rows, other page ids)
    window_kv_indices: torch.Tensor | None = None
    window_gather_slots: torch.Tensor | None = None
    _window: AttentionBatch | None = field(default=None, repr=False, compare=False)

    def for_window(self) -> AttentionBatch:
        """This batch over the window layers' pages (itself when the model has no window page group)."""
        if self.window_kv_indices is None:
            return self
        if self._window is None:
            self._window = dataclasses.replace(self, kv_indices=self.window_kv_indices,
                                               gather_slots=self.window_gather_slots, window_kv_indices=None,
                                               window_gather_slots=None)
        return self._window

    @property
    def causal(self) -> bool:
        return self.kind == "ragged" or self.kind.endswith("_causal")

    @property
    def gathered(self) -> bool:
        return self.kind.startswith("gathered_")

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This batch's rows of a step tensor (a view when they are contiguous)."""
        if self.row_range is not None:
            return x[self.row_range[0] : self.row_range[1]]
        return x[self.rows]

    def put(self, x: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` into this batch's rows of ``x``."""
        if self.row_range is not None:
            x[self.row_range[0] : self.row_range[1]] = values
        else:
            x[self.rows] = values


def _gather_slots(pages: torch.Tensor, n_pages: list[int], kv_lens: list[int], page_size: int,
                  device: torch.device) -> torch.Tensor:
    """The flat cache slots of every entry's KV, entry after entry, built on the device: only the page ids cross
    (a 131K-token entry has 8,192 pages of 16 slots; expanding them on the host cost milliseconds per step)."""
    slots = (pages.to(device, non_blocking=True).long()[:, None] * page_size
             + torch.arange(page_size, device=device)).flatten()
    if len(kv_lens) == 1:
        return slots[: kv_lens[0]]
    firsts = [0, *itertools.accumulate(n_pages)][:-1]
    return torch.cat([slots[f * page_size : f * page_size + n] for f, n in zip(firsts, kv_lens, strict=True)])


def make_batch(kind: str, page_size: int, entries: list[LocalEntry], device: torch.device) -> AttentionBatch:
    """One kind's batch. For ``ragged`` the page tables are unused and ``kv_len`` equals the number of query rows
    (the keys are those rows)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention batch kind {kind!r}")
    rows = list(itertools.chain.from_iterable(range(e.row_start, e.row_start + e.num_rows) for e in entries))
    q_lens = [e.num_rows for e in entries]
    kv_lens = [e.kv_len for e in entries]
    if any(n <= 0 for n in kv_lens) or any(n <= 0 for n in q_lens):
        raise ValueError("every entry needs at least one query and one key")
    if kind == "decode" and any(n != 1 for n in q_lens):
        raise ValueError("decode entries have one query each")
    gather_slots = window_pages = window_gather_slots = None
    if kind == "ragged":
        if q_lens != kv_lens:
            raise ValueError("ragged entries attend to their own rows")
        pages, n_pages, last = _int32([]), kv_lens, kv_lens
    else:
        n_pages = [-(-n // page_size) for n in kv_lens]
        if any(len(e.pages) < n for e, n in zip(entries, n_pages, strict=True)):
            raise ValueError("a page table is shorter than its kv_len")
        pages = _int32(list(itertools.chain.from_iterable(e.pages[:n] for e, n in zip(entries, n_pages, strict=True))))
        if entries[0].window_pages is not None:
            window_pages = _int32(list(itertools.chain.from_iterable(
                e.window_pages[:n] for e, n in zip(entries, n_pages, strict=True))))
        last = [n - (p - 1) * page_size for n, p in zip(kv_lens, n_pages, strict=True)]
        if kind.startswith("gathered_"):  # every page's slots, cut to each entry's kv_len
            gather_slots = _gather_slots(pages, n_pages, kv_lens, page_size, device)
            if window_pages is not None:
                window_gather_slots = _gather_slots(window_pages, n_pages, kv_lens, page_size, device)
    contiguous = bool(rows) and rows == list(range(rows[0], rows[0] + len(rows)))
    return AttentionBatch(
        kind=kind, page_size=page_size, q_lens=q_lens,
        rows=torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True),
        row_range=(rows[0], rows[0] + len(rows)) if contiguous else None,
        qo_indptr=indptr(q_lens), kv_indptr=indptr(n_pages), kv_indices=pages,
        last_page_len=_int32(last), kv_lens=kv_lens, gather_slots=gather_slots, window_kv_indices=window_pages,
        window_gather_slots=window_gather_slots,
    )


def padded_batch(page_size: int, qo_indptr: np.ndarray, kv_indptr: np.ndarray, kv_indices: np.ndarray,
                 last_page_len: np.ndarray, kv_lens: np.ndarray,
                 window_kv_indices: np.ndarray | None = None) -> AttentionBatch:
    """The one batch of a padded (CUDA-graph) step straight from its CSR arrays: every row, entry by entry, causal
    over each entry's pages; ``decode`` when every entry has one row, else ``paged_causal`` (entries may be empty).
    ``window_kv_indices``: the window layers' pages of a window page group."""
    q_lens = np.diff(qo_indptr).tolist()
    return AttentionBatch(
        kind="decode" if all(n == 1 for n in q_lens) else "paged_causal", page_size=page_size, q_lens=q_lens,
        rows=None, row_range=(0, int(qo_indptr[-1])), qo_indptr=torch.from_numpy(qo_indptr),
        kv_indptr=torch.from_numpy(kv_indptr), kv_indices=torch.from_numpy(kv_indices),
        last_page_len=torch.from_numpy(last_page_len), kv_lens=kv_lens.tolist(),
        window_kv_indices=torch.from_numpy(window_kv_indices) if window_kv_indices is not None else None,
    )


def sort_into_batches(entries: list[LocalEntry], page_size: int, device: torch.device) -> list[AttentionBatch]:
    by_kind: dict[str, list[LocalEntry]] = {kind: [] for kind in KINDS}
    for e in entries:
        by_kind[local_kind(e.num_rows, e.kv_len, e.stores)].append(e)
    return [make_batch(kind, page_size, es, device) for kind, es in by_kind.items() if es]


class AttentionBackend:
    """A backend: how batches and ring pieces are computed. Subclasses implement :meth:`run_batch`,
    :meth:`attention_runs` and :meth:`graph_backends` (the padded-step form: capture and replay go through its
    backends), and may plan kernels in :meth:`plan_batches` (called once per step)."""

    name = "base"
    capturable = False  # runs inside a CUDA graph: no host work and no host syncs after planning

    def __init__(self, pstate: ParallelState, page_size: int):
        self.pstate = pstate
        self.page_size = page_size

    def prepare(self, meta: AttentionStepMeta, mesh: UlyssesMesh | None = None) -> StepAttention:
        """The step's attention, prepared once: batches sorted by kind and planned; ``mesh`` computes the split
        entries that ask for Ulysses."""
        batches = sort_into_batches(meta.local, self.page_size, self.pstate.device)
        self.plan_batches(batches)
        return StepAttention(self, meta, batches, mesh)

    def plan_batches(self, batches: list[AttentionBatch]) -> None:
        """Plan kernels for this step's batches (once per step, before the first layer)."""

    def graph_capturable(self) -> bool:
        """Whether decode steps of this model can be captured in CUDA graphs on this backend."""
        return True

    def run_batch(self, batch: AttentionBatch, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                  cache, scale: float, window: int | None = None,
                  q_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(o, lse)`` of a batch: q the batch's rows, k/v the same rows (read by ``ragged`` only), ``cache`` the
        layer's :class:`server.layers.attention.PagedKVCache`; with a sliding ``window``, ``q_pos`` are the rows'
        global positions and the keys' come from ``cache.pos`` (ragged: the rows' own)."""
        raise NotImplementedError

    def attention_runs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_runs: list[Run],
                       k_runs: list[Run], scale: float,
                       window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Position-run attention (:func:`server.kernels.ops.attention_runs` semantics) for the ring's blocks and
        the window halo."""
        raise NotImplementedError

    def graph_backends(self, shapes: list[GraphShape], max_pages: int) -> dict[GraphShape, AttentionBackend]:
        """Backends for padded steps, one per :class:`GraphShape`, each running the step's one batch; a capturable
        one reads fixed index buffers that its :meth:`plan_batches` refills before a replay (``max_pages``: the
        longest page table of a request)."""
        raise NotImplementedError

    def release(self) -> None:
        """Free what the backend holds on the device."""


def _read_shard_rows(cache, page_table: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of this rank's shard of a request (``page_table``: its pages), read from ``cache`` as ``dtype``
    values (FP8 pages dequantized)."""
    page = cache.k.shape[1]
    return cache.dequantize(*cache.rows(page_table[rows // page] * page + rows % page), dtype)


class StepAttention:
    """One step's softmax attention on one rank, shared by every softmax layer (see the module docstring)."""

    def __init__(self, backend: AttentionBackend, meta: AttentionStepMeta, batches: list[AttentionBatch],
                 mesh: UlyssesMesh | None = None):
        self.backend = backend
        self.meta = meta
        self.batches = batches
        self.mesh = mesh

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, scale: float,
                window: int | None = None, sinks: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` on this rank's local rows -> o ``[T, Hq, D]``. A sliding ``window``
        masks by position (``positions`` ``[T]``, the rows' global positions; the cache keeps its keys' positions)
        and computes split requests by a KV halo instead of the ring (:mod:`server.sp.window_attention`);
        ``sinks`` ``[Hq]`` are applied once, to every row's merged result (:mod:`server.kernels.sinks`)."""
        meta, ps = self.meta, self.backend.pstate
        # a window layer of a model with a window page group reads and writes its own pages (same rows)
        windowed = window is not None and meta.window_write_slots is not None
        if meta.write_rows is not None:
            pos = positions[meta.write_rows] if window is not None else None  # window caches keep positions
            slots = meta.window_write_slots if windowed else meta.write_slots
            cache.write(slots, k[meta.write_rows], v[meta.write_rows], pos)
        merging = meta.merge_rows is not None or meta.merge_mask is not None
        keep_lse = merging or sinks is not None
        # graph steps merge every row: the partial results are written where the SP all-gather reads them
        buffers = packed_partials(*q.shape, q.dtype, q.device) if meta.merge_mask is not None else None
        packed = None
        covered = not meta.ring and len(self.batches) == 1 and self.batches[0].row_range == (0, len(q))
        if buffers is not None:
            packed, out, lse = buffers
            if not covered:  # rows no batch writes are (0, -inf)
                out.zero_()
                lse.fill_(-math.inf)
        elif not keep_lse and covered:
            # one batch of every row (a decode step at sp = 1): its output is the result, no zeroed copy
            return self._run_batch(self.batches[0], q, k, v, cache, scale, window, positions)[0].to(q.dtype)
        else:
            out = torch.zeros_like(q)
            lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device) if keep_lse else None
        for batch in self.batches:
            o_b, lse_b = self._run_batch(batch, q, k, v, cache, scale, window, positions)
            batch.put(out, o_b)
            if lse is not None:
                batch.put(lse, lse_b)
        attn_fn = self._attn_fn(cache, q.dtype)
        if window is not None:
            attn_fn = functools.partial(attn_fn, window=window)
        for e in meta.ring:
            rows = slice(e.row_start, e.row_start + e.num_rows)
            if window is not None:
                table = e.window_page_table if e.window_page_table is not None else e.page_table
                read_rows = functools.partial(_read_shard_rows, cache, table, q.dtype)
                o_e, lse_e = window_attention(q[rows], read_rows, e.q_runs_per_rank, e.kv_runs, scale, window, ps,
                                              attn_fn)
            elif e.ulysses is not None:
                o_e, lse_e = self._ulysses_split(e, q[rows], k[rows], v[rows], cache, scale, attn_fn)
            else:
                k_shard, v_shard = cache.read(e.page_table, e.shard_len)  # FP8 pages travel as they are stored
                o_e, lse_e = self._ring_fn(q[rows], k_shard, v_shard, e.q_runs, e.kv_runs, scale, ps,
                                           attn_fn=attn_fn)
            out[rows] = o_e
            if lse is not None:
                lse[rows] = lse_e
        if meta.merge_rows is not None:
            out[meta.merge_rows], merged = merge_over_sp(out[meta.merge_rows], lse[meta.merge_rows], ps)
            lse[meta.merge_rows] = merged
        elif meta.merge_mask is not None:  # graph steps: merge every row, keep the replicated ones
            out, merged = merge_over_sp(out, lse, ps, keep=meta.merge_mask, packed=packed)
            if sinks is not None:
                lse = torch.where(meta.merge_mask[:, None] != 0, merged, lse)
        if sinks is not None:  # once, after every partial is merged (DESIGN: counted once, not per partial)
            out, _ = apply_attention_sinks(out, lse, sinks)
        return out

    def _run_batch(self, batch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, scale: float,
                   window: int | None = None, positions: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(o, lse)`` of one batch's rows of the step's q (and k/v: ``ragged`` is the only kind that reads them);
        with a ``window``, the rows' positions too, and the window layers' pages."""
        ragged = batch.kind == "ragged"
        extra = {} if window is None else {"window": window, "q_pos": batch.take(positions)}
        if window is not None:
            batch = batch.for_window()
        return self.backend.run_batch(batch, batch.take(q), batch.take(k) if ragged else None,
                                      batch.take(v) if ragged else None, cache, scale, **extra)

    def _attn_fn(self, cache, dtype: torch.dtype):
        """The backend's position-run attention, reading FP8 K/V blocks (the ring's, as received) dequantized."""
        if not cache.fp8:
            return self.backend.attention_runs

        def attend(q, k, v, q_runs, k_runs, scale, window=None):
            return self.backend.attention_runs(q, *cache.dequantize(k, v, dtype), q_runs, k_runs, scale, window)

        return attend

    @property
    def _ring_fn(self):
        return ring_attention if self.meta.ring_mode == CommMode.RING else allgather_kv_attention

    def _ulysses_split(self, e: RingEntry, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                       scale: float, attn_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """A split entry on the U x R mesh: its rows attend to the request's new tokens by Ulysses x ring (q/k/v of
        the step, not the cache) and to its cached prefix, token-sharded over the SP group, by the pass-KV ring (or
        all-gather KV) restricted to every rank's prefix rows; the two partials merge by LSE in fp32."""
        new = ulysses_attention(q, k, v, e.ulysses.new_runs, scale, self.mesh, attn_fn=attn_fn, return_lse=True)
        if not e.ulysses.has_prefix:
            return new.o, new.lse
        k_prefix, v_prefix = cache.read(e.page_table, e.prefix_len)
        o_prefix, lse_prefix = self._ring_fn(q, k_prefix, v_prefix, e.q_runs, e.ulysses.prefix_runs, scale,
                                             self.backend.pstate, attn_fn=attn_fn)
        o, lse = new.o.float(), new.lse
        ops.merge_state_into(o, lse, o_prefix, lse_prefix)
        return o.to(q.dtype), lse

