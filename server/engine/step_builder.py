"""Turn a step plan and the rank's request mirror into the step's rows and metadata, once per step.

Local rows are laid out request by request: replicated requests first (the same rows on every SP rank, so their
SP merge lines up), then split and homed requests. Everything here is host work on small per-request numbers;
the tensors it makes travel to the device once per step, in one pinned copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.engine.request_table import RequestTable, computed_pieces, stored_pieces
from server.forward.context import AttentionStepMeta, LinearStepMeta, LocalEntry, RingEntry, SplitLinearEntry
from server.forward.plan import ChunkPlan, Placement, StepPlan
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


def _tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype).to(device, non_blocking=True)


def build_step_rows(plan: StepPlan, table: RequestTable, pstate: ParallelState, ring_mode: str = "ring",
                    lasp_mode: str = "ring") -> StepRows:
    """The rank's rows and metadata of ``plan``; ``table`` must already have applied it."""
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
        attention=_attention_meta(local, table, pstate, ring_mode),
        linear=_linear_meta(plan, local, table, pstate, lasp_mode),
        seq_sharded=plan.seq_sharded,
    )


def _attention_meta(local: list[LocalChunk], table: RequestTable, pstate: ParallelState,
                    ring_mode: str) -> AttentionStepMeta:
    dev, p, r = pstate.device, pstate.sp_size, pstate.sp_rank
    write_rows: list[np.ndarray] = []
    write_slots: list[np.ndarray] = []
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
            write_slots.append(table.slots_of(chunk.req, np.arange(shard_len - lc.num_rows, shard_len)))
        if chunk.placement == Placement.SPLIT and p > 1:
            q_runs, row = [], 0
            for start, n, _ in lc.pieces:
                q_runs.append((row, n, start))
                row += n
            ring.append(RingEntry(lc.row_start, lc.num_rows, q_runs, [list(x) for x in st.runs],
                                  table.device_pages(chunk.req).long(), shard_len))
            continue
        if chunk.placement == Placement.REPLICATED and p > 1:
            merge_rows += range(lc.row_start, lc.row_start + lc.num_rows)
        if shard_len == 0:  # no keys here: (o, lse) = (0, -inf)
            continue
        entries.append(LocalEntry(lc.row_start, lc.num_rows, table.pages(chunk.req).tolist(), shard_len, stores))
    return AttentionStepMeta(
        write_rows=_tensor(np.concatenate(write_rows), torch.long, dev) if write_rows else None,
        write_slots=_tensor(np.concatenate(write_slots), torch.long, dev) if write_slots else None,
        ring=ring, local=entries,
        merge_rows=_tensor(merge_rows, torch.long, dev) if merge_rows else None,
        ring_mode=ring_mode,
    )


def _linear_meta(plan: StepPlan, local: list[LocalChunk], table: RequestTable, pstate: ParallelState,
                 mode: str) -> LinearStepMeta:
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
            split.append(SplitLinearEntry(lc.row_start, lc.num_rows, chunks, lens_all, slot))
        elif lc.num_rows:
            rows += range(lc.row_start, lc.row_start + lc.num_rows)
            slots.append(slot)
            lens.append(lc.num_rows)
    started = [slot for _, slot in plan.started]
    return LinearStepMeta(
        zero_slots=_tensor(started, torch.long, dev) if started else None,
        split=split,
        local_rows=_tensor(rows, torch.long, dev) if rows else None,
        local_slots=_tensor(slots, torch.long, dev) if slots else None,
        local_cu=_tensor(np.cumsum([0] + lens), torch.int32, dev) if lens else None,
        all_decode=bool(lens) and max(lens) == 1,
        mode=mode,
    )


def build_padded_decode_rows(plan: StepPlan, table: RequestTable, pstate: ParallelState, bucket: int,
                             scratch_slot: int, lasp_mode: str = "ring") -> StepRows | None:
    """A decode step (:attr:`StepPlan.is_decode`) padded to ``bucket`` rows, the shape of a CUDA-graph step:
    every row writes its K/V (rows this rank does not store write to the scratch page 0), padded rows attend to
    the scratch page and use state slot ``scratch_slot``, and the SP merge runs over all rows and is kept where
    ``merge_mask`` is set. None if a row has no KV on this rank (the eager path handles that step)."""
    dev, p, r = pstate.device, pstate.sp_size, pstate.sp_rank
    local = [LocalChunk(plan.chunks[i], i, 0, 0, []) for i in row_order(plan)]
    ids = np.zeros(bucket, dtype=np.int64)
    pos = np.zeros(bucket, dtype=np.int64)
    write_slots = np.zeros(bucket, dtype=np.int64)  # 0: the scratch page's first slot
    slots = np.full(bucket, scratch_slot, dtype=np.int64)
    merge = np.zeros(bucket, dtype=bool)
    entries = [LocalEntry(row, 1, [0], 1, False) for row in range(bucket)]
    row = 0
    for lc in local:
        c = lc.chunk
        lc.pieces = computed_pieces(c, p, r)
        if not lc.pieces:
            continue
        st = table.requests[c.req]
        kv_len = st.shard_lens[r]
        if kv_len == 0:
            return None
        lc.row_start, lc.num_rows = row, 1
        ids[row], pos[row], slots[row] = plan.token_ids[lc.index], c.start, st.slot
        stores = bool(stored_pieces(c, p, r))
        if stores:
            write_slots[row] = table.slots_of(c.req, np.array([kv_len - 1]))[0]
        merge[row] = c.placement == Placement.REPLICATED and p > 1
        entries[row] = LocalEntry(row, 1, table.pages(c.req).tolist(), kv_len, stores)
        row += 1
    arange = np.arange(bucket)
    return StepRows(
        chunks=local,
        input_ids=_tensor(ids, torch.long, dev),
        positions=_tensor(pos, torch.long, dev),
        num_rows=row,
        attention=AttentionStepMeta(write_rows=_tensor(arange, torch.long, dev),
                                    write_slots=_tensor(write_slots, torch.long, dev), local=entries,
                                    merge_mask=_tensor(merge, torch.bool, dev) if p > 1 else None),
        linear=LinearStepMeta(zero_slots=None, split=[], local_rows=_tensor(arange, torch.long, dev),
                              local_slots=_tensor(slots, torch.long, dev),
                              local_cu=_tensor(np.arange(bucket + 1), torch.int32, dev), all_decode=True,
                              mode=lasp_mode),
    )
