"""Turn a step plan and the rank's request mirror into the step's rows and metadata, once per step.

Local rows are laid out request by request: replicated requests first (the same rows on every SP rank, so their
SP merge lines up), then split and homed requests. Everything here is host work on small per-request numbers;
the tensors it makes travel to the device once per step, in one pinned copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from server.config import CommMode, UlyssesLayers
from server.execution.request_table import RequestState, RequestTable
from server.forward.context import (
    AttentionStepMeta,
    LinearStepMeta,
    LocalEntry,
    RingEntry,
    SplitLinearEntry,
    UlyssesRuns,
)
from server.forward.plan import ChunkPlan, Placement, StepPlan, computed_pieces, stored_pieces
from server.runs import Run, runs_rows
from server.sp.groups import ParallelState
from server.sp.partition import rank_chunks, zigzag_chunks

_ROW_ORDER = {Placement.REPLICATED: 0, Placement.SPLIT: 1, Placement.HOMED: 2}


@dataclass
class LocalChunk:
    """One request's rows on this rank."""

    chunk: ChunkPlan
    index: int  # position in the plan
    row_start: int
    num_rows: int
    pieces: list[tuple[int, int, int]]  # (pos_start, length, chunk index) of the computed rows


@dataclass
class StepRows:
    """The rank's rows of one step and their metadata (host side; tensors on the device)."""

    chunks: list[LocalChunk]  # in row order
    input_ids: torch.Tensor
    positions: torch.Tensor
    num_rows: int
    attention: AttentionStepMeta
    linear: LinearStepMeta
    seq_sharded: bool = False  # the residual stream is sharded over TP (rows padded to a multiple of tp)


def row_order(plan: StepPlan) -> list[int]:
    """Plan indices in local row order: replicated requests first, then split, then homed."""
    return sorted(range(len(plan.chunks)), key=lambda i: _ROW_ORDER[plan.chunks[i].placement])


def rank_row_count(plan: StepPlan, sp_size: int, sp_rank: int) -> int:
    """Rows SP rank ``sp_rank`` computes in ``plan`` (every rank can count every other rank's)."""
    return sum(n for c in plan.chunks for _, n, _ in computed_pieces(c, sp_size, sp_rank))


def driver_rows(plan: StepPlan, sp_size: int, sp_rank: int, count: Callable[[ChunkPlan], int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The rows SP rank ``sp_rank`` sends to SP rank 0 when the first ``count(chunk)`` new tokens of every chunk are
    gathered there: their local row indices, and their keys ``plan index << 40 | position`` (the order SP rank 0
    puts them in). Replicated rows are the same on every SP rank, so only rank 0 sends them. Every rank can compute
    every other rank's rows (the layout of :func:`build_step_rows`, and of a padded decode step)."""
    rows: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    row = 0
    for i in row_order(plan):
        chunk = plan.chunks[i]
        end = chunk.start + count(chunk)
        sends = chunk.placement != Placement.REPLICATED or sp_rank == 0
        for start, n, _ in computed_pieces(chunk, sp_size, sp_rank):
            m = min(n, end - start) if sends else 0
            if m > 0:
                rows.append(np.arange(row, row + m))
                keys.append((i << 40) + np.arange(start, start + m))
            row += n
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(keys)


def _tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype).to(device, non_blocking=True)


def build_step_rows(plan: StepPlan, table: RequestTable, pstate: ParallelState,
                    ring_mode: CommMode = CommMode.RING, lasp_mode: CommMode = CommMode.RING, ulysses_degree: int = 1,
                    ulysses_layers: UlyssesLayers = UlyssesLayers.ALL) -> StepRows:
    """The rank's rows and metadata of ``plan``; ``table`` must already have applied it. With ``ulysses_degree``
    > 1 split requests are marked to be computed on the U x R mesh (:class:`UlyssesRuns` for softmax layers unless
    ``ulysses_layers`` is ``linear``, ``SplitLinearEntry.ulysses``)."""
    dev, p, r = pstate.device, pstate.sp_size, pstate.sp_rank
    ids: list[int] = []
    pos: list[int] = []
    local: list[LocalChunk] = []
    offsets = np.cumsum([0] + [c.num_new for c in plan.chunks])
    for i in row_order(plan):
        chunk = plan.chunks[i]
        pieces = computed_pieces(chunk, p, r)
        base = int(offsets[i])
        row_start = len(ids)
        for start, n, _ in pieces:
            rel = start - chunk.start
            ids += plan.token_ids[base + rel : base + rel + n]
            pos += range(start, start + n)
        local.append(LocalChunk(chunk, i, row_start, len(ids) - row_start, pieces))
    num_rows = len(ids)
    if plan.seq_sharded:
        pad = (-num_rows) % pstate.tp_size
        ids += [0] * pad
        pos += [0] * pad
    return StepRows(
        chunks=local,
        input_ids=_tensor(ids, torch.long, dev),
        positions=_tensor(pos, torch.long, dev),
        num_rows=num_rows,
        attention=_attention_meta(local, table, pstate, ring_mode,
                                  ulysses_degree > 1 and ulysses_layers == UlyssesLayers.ALL),
        linear=_linear_meta(plan, local, table, pstate, lasp_mode, ulysses_degree > 1),
        seq_sharded=plan.seq_sharded,
    )


def _piece_runs(pieces: list[tuple[int, int, int]]) -> list[Run]:
    """Runs of rows holding ``pieces`` (``(pos_start, length, _)``) back to back from row 0."""
    runs, row = [], 0
    for start, n, _ in pieces:
        runs.append((row, n, start))
        row += n
    return runs


def _first_rows(runs: list[Run], rows: int) -> list[Run]:
    """The part of ``runs`` (in row order) that covers rows ``[0, rows)``."""
    return [(row, min(n, rows - row), pos) for row, n, pos in runs if row < rows]


def _ulysses_runs(chunk: ChunkPlan, st: RequestState, p: int) -> UlyssesRuns:
    """Every SP rank's new rows of a split chunk, and its cached prefix: its shard without them (the last rows)."""
    new = [_piece_runs(computed_pieces(chunk, p, s)) for s in range(p)]
    prefix = [_first_rows(st.runs[s], st.shard_lens[s] - runs_rows(new[s])) for s in range(p)]
    return UlyssesRuns(new, prefix)


def _attention_meta(local: list[LocalChunk], table: RequestTable, pstate: ParallelState,
                    ring_mode: str, ulysses: bool) -> AttentionStepMeta:
    dev, p, r = pstate.device, pstate.sp_size, pstate.sp_rank
    write_rows: list[np.ndarray] = []
    write_slots: list[np.ndarray] = []
    window_slots: list[np.ndarray] = []  # a window page group: the same rows in the window layers' pages
    windowed = table.window_table is not None
    ring: list[RingEntry] = []
    entries: list[LocalEntry] = []
    merge_rows: list[int] = []
    for lc in local:
        if lc.num_rows == 0:  # homed on another SP rank
            continue
        chunk, st = lc.chunk, table.requests[lc.chunk.req]
        shard_len = st.shard_lens[r]
        stores = bool(stored_pieces(chunk, p, r))
        if stores:  # the new rows are the last rows of this rank's shard
            write_rows.append(np.arange(lc.row_start, lc.row_start + lc.num_rows))
            new_rows = np.arange(shard_len - lc.num_rows, shard_len)
            write_slots.append(table.slots_of(chunk.req, new_rows))
            if windowed:
                window_slots.append(table.slots_of(chunk.req, new_rows, window=True))
        if chunk.placement == Placement.SPLIT and p > 1:
            ring.append(RingEntry(lc.row_start, lc.num_rows, _piece_runs(lc.pieces), [list(x) for x in st.runs],
                                  table.device_pages(chunk.req).long(), shard_len,
                                  _ulysses_runs(chunk, st, p) if ulysses else None,
                                  [_piece_runs(computed_pieces(chunk, p, s)) for s in range(p)],
                                  table.device_window_pages(chunk.req).long() if windowed else None))
            continue
        if chunk.placement == Placement.REPLICATED and p > 1:
            merge_rows += range(lc.row_start, lc.row_start + lc.num_rows)
        if shard_len == 0:  # no keys here: (o, lse) = (0, -inf)
            continue
        entries.append(LocalEntry(lc.row_start, lc.num_rows, table.pages(chunk.req).tolist(), shard_len, stores,
                                  table.window_pages(chunk.req).tolist() if windowed else None))
    rows = np.concatenate(write_rows) if write_rows else None
    if rows is not None and bool(np.all(np.diff(rows) == 1)):  # one ascending run: a view, not a gather
        rows_arg: torch.Tensor | slice | None = slice(int(rows[0]), int(rows[-1]) + 1)
    else:
        rows_arg = _tensor(rows, torch.long, dev) if rows is not None else None
    return AttentionStepMeta(
        write_rows=rows_arg,
        write_slots=_tensor(np.concatenate(write_slots), torch.long, dev) if write_slots else None,
        window_write_slots=_tensor(np.concatenate(window_slots), torch.long, dev) if window_slots else None,
        ring=ring, local=entries,
        merge_rows=_tensor(merge_rows, torch.long, dev) if merge_rows else None,
        ring_mode=ring_mode,
    )


def _linear_meta(plan: StepPlan, local: list[LocalChunk], table: RequestTable, pstate: ParallelState,
                 mode: str, ulysses: bool) -> LinearStepMeta:
    dev, p = pstate.device, pstate.sp_size
    split: list[SplitLinearEntry] = []
    rows: list[int] = []
    slots: list[int] = []
    lens: list[int] = []
    for lc in local:
        slot = table.requests[lc.chunk.req].slot
        if lc.chunk.placement == Placement.SPLIT and p > 1:
            lens_all = [b - a for a, b in zigzag_chunks(lc.chunk.num_new, p)]
            chunks, row = [], 0
            for a, b, c in rank_chunks(lc.chunk.num_new, p, pstate.sp_rank):  # empty chunks kept: LASP visits all
                chunks.append((row, b - a, c))
                row += b - a
            split.append(SplitLinearEntry(lc.row_start, lc.num_rows, chunks, lens_all, slot, ulysses))
        elif lc.num_rows:
            rows += range(lc.row_start, lc.row_start + lc.num_rows)
            slots.append(slot)
            lens.append(lc.num_rows)
    started = [s.slot for s in plan.started if not s.restored]
    return LinearStepMeta(
        zero_slots=_tensor(started, torch.long, dev) if started else None,
        split=split,
        local_rows=_tensor(rows, torch.long, dev) if rows else None,
        local_slots=_tensor(slots, torch.long, dev) if slots else None,
        local_cu=_tensor(np.cumsum([0] + lens), torch.int32, dev) if lens else None,
        all_decode=bool(lens) and max(lens) == 1,
        mode=mode,
    )


@dataclass
class PaddedStep:
    """A step padded to a static shape of ``rows`` rows and ``entries`` attention entries, as host arrays: what a
    CUDA-graph step copies into its static buffers (one pinned host-to-device copy of ``inputs``) and the page CSR
    arrays of its one attention batch for the backend's plan. A decode step has one row per entry."""

    chunks: list[LocalChunk]  # in row order; real rows first
    num_rows: int
    inputs: np.ndarray  # [INPUT_ROWS, rows] int64: token ids, positions, KV write slots, state slots, merge flags
    qo_indptr: np.ndarray  # [entries + 1] int32: rows of each entry (padding entries last)
    entry_slots: np.ndarray  # [entries] int64: state slot of each entry (padding: the scratch slot)
    kv_indptr: np.ndarray  # [entries + 1] int32
    kv_indices: np.ndarray  # int32
    last_page_len: np.ndarray  # [entries] int32
    kv_lens: np.ndarray  # [entries] int64
    window_kv_indices: np.ndarray | None = None  # int32: the window layers' pages (a window page group)


INPUT_ROWS = 6  # ids, positions, write slots, state slots, merge flags, window-layer write slots


def extend_fits(plan: StepPlan, sp_size: int) -> bool:
    """A step that is not decode but may run padded (:func:`build_padded_step`): no split chunk, no logits of every
    row, and every chunk of several rows stored by every rank that computes it (homed, or any chunk at sp = 1), so
    each entry attends causally to its own rank's KV. Every rank decides it from the plan alone."""
    return bool(plan.chunks) and not plan.all_logits and all(
        c.placement != Placement.SPLIT and (c.num_new == 1 or c.placement == Placement.HOMED or sp_size == 1)
        for c in plan.chunks)


def build_padded_step(plan: StepPlan, table: RequestTable, pstate: ParallelState, rows: int, entries: int,
                      scratch_slot: int) -> PaddedStep | None:
    """``plan`` (a decode step, or one :func:`extend_fits` takes) padded to ``rows`` rows and ``entries`` attention
    entries, the shape of a CUDA-graph step. Every row writes its K/V (rows this rank does not store write to slot 0
    of the scratch page 0); the padded rows form padding entries (one row each while there are entries, the rest on
    the last) that attend causally to the scratch page and use state slot ``scratch_slot`` (in both page groups of a
    model with a window group); padding entries without
    rows read one scratch key. The SP merge runs over all rows and is kept where the merge flag is set. None if the
    step does not fit, or an entry has no KV on this rank (the eager path handles that step)."""
    p, r, page = pstate.sp_size, pstate.sp_rank, table.page_size
    inputs = np.zeros((INPUT_ROWS, rows), dtype=np.int64)
    inputs[3] = scratch_slot
    q_lens: list[int] = []
    kv_lens: list[int] = []
    slots: list[int] = []
    tables: list[np.ndarray] = []
    window_tables: list[np.ndarray] = []
    windowed = table.window_table is not None
    local: list[LocalChunk] = []
    offsets = np.cumsum([0] + [c.num_new for c in plan.chunks])
    row = 0
    for i in row_order(plan):
        c = plan.chunks[i]
        pieces = computed_pieces(c, p, r)
        n = c.num_new if pieces else 0
        local.append(LocalChunk(c, i, row, n, pieces))
        if not n:
            continue
        st = table.requests[c.req]
        kv_len = st.shard_lens[r]
        stores = bool(stored_pieces(c, p, r))
        if kv_len == 0 or row + n > rows or len(q_lens) == entries or n > 1 and not stores:
            return None
        end = row + n
        inputs[0, row:end] = plan.token_ids[offsets[i] : offsets[i] + n]
        inputs[1, row:end] = np.arange(c.start, c.start + n)
        if stores:  # the new rows are the last rows of this rank's shard
            inputs[2, row:end] = table.slots_of(c.req, np.arange(kv_len - n, kv_len))
            if windowed:
                inputs[5, row:end] = table.slots_of(c.req, np.arange(kv_len - n, kv_len), window=True)
        inputs[3, row:end] = st.slot
        inputs[4, row:end] = c.placement == Placement.REPLICATED and p > 1
        q_lens.append(n)
        kv_lens.append(kv_len)
        slots.append(st.slot)
        tables.append(table.pages(c.req)[: -(-kv_len // page)])
        if windowed:
            window_tables.append(table.window_pages(c.req)[: -(-kv_len // page)])
        row = end
    pad_rows, pad_entries = rows - row, entries - len(q_lens)
    if pad_rows and not pad_entries:
        return None
    pad = [1] * min(pad_rows, pad_entries) + [0] * max(0, pad_entries - pad_rows)
    if pad_rows > pad_entries:
        pad[-1] += pad_rows - pad_entries
    for n in pad:  # causal over as many scratch keys as rows (page 0, repeated)
        kv_len = max(n, 1)
        q_lens.append(n)
        kv_lens.append(kv_len)
        tables.append(np.zeros(-(-kv_len // page), dtype=np.int32))
        window_tables.append(tables[-1])
    slots += [scratch_slot] * pad_entries
    lens = np.array(kv_lens, dtype=np.int64)
    n_pages = np.array([len(t) for t in tables], dtype=np.int64)
    return PaddedStep(
        chunks=local, num_rows=row, inputs=inputs,
        qo_indptr=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
        entry_slots=np.array(slots, dtype=np.int64),
        kv_indptr=np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32),
        kv_indices=np.concatenate(tables).astype(np.int32),
        last_page_len=(lens - (n_pages - 1) * page).astype(np.int32),
        kv_lens=lens,
        window_kv_indices=np.concatenate(window_tables).astype(np.int32) if windowed else None,
    )


def take_prev_tokens(ids: torch.Tensor, last_tokens: torch.Tensor) -> None:
    """Replace, in place, the token ids -(i + 1) of ``ids`` by ``last_tokens[i]``, the previous step's sampled
    token i (on the device: see docs/architecture.md, "Overlapped steps")."""
    ids.copy_(torch.where(ids < 0, last_tokens[(-ids - 1).clamp(min=0)], ids))
