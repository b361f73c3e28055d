"""Runs: how rows of a tensor map to global token positions, everywhere in the engine.

A run is ``(row_start, length, pos_start)``: rows ``row_start .. row_start + length - 1`` hold the consecutive global
positions ``pos_start .. pos_start + length - 1``. A request's KV shard on an SP rank, a step's query rows, the keys
of one ring block: each is a list of runs, so visibility (``pos(k) <= pos(q)``) can be decided per pair of runs
(full, causal or skipped) without a device sync. Every function that builds, cuts or merges runs lives here.
"""

from __future__ import annotations

import torch

Run = tuple[int, int, int]


def runs_rows(runs: list[Run]) -> int:
    """Rows that ``runs`` describe."""
    return sum(n for _, n, _ in runs)


def append_run(runs: list[Run], row: int, pos_start: int, length: int) -> None:
    """Append positions ``pos_start..+length`` at row ``row``, extending the last run when it continues it in both
    rows and positions; empty runs are dropped. The one rule by which runs merge."""
    if length <= 0:
        return
    if runs and runs[-1][0] + runs[-1][1] == row and runs[-1][2] + runs[-1][1] == pos_start:
        r0, n0, p0 = runs[-1]
        runs[-1] = (r0, n0 + length, p0)
    else:
        runs.append((row, length, pos_start))


def coalesce_runs(runs: list[Run]) -> list[Run]:
    """The same rows with neighbouring runs that continue each other joined, empty runs dropped."""
    out: list[Run] = []
    for row, n, pos in runs:
        append_run(out, row, pos, n)
    return out


def rows_before(runs: list[Run], m: int) -> int:
    """Rows of a shard (runs in position order) whose positions are below ``m``."""
    return sum(min(max(m - pos, 0), n) for _, n, pos in runs)


def truncate_runs(runs: list[Run], m: int) -> list[Run]:
    """The runs of the rows of positions below ``m`` (runs in position order)."""
    out = []
    for row, n, pos in runs:
        if pos >= m:
            break
        out.append((row, min(n, m - pos), pos))
    return out


def stack_runs(runs_per_rank: list[list[Run]]) -> list[Run]:
    """Runs of the rows of several ranks laid end to end in rank order."""
    out: list[Run] = []
    offset = 0
    for runs in runs_per_rank:
        out.extend((row + offset, n, pos) for row, n, pos in runs)
        offset += runs_rows(runs)
    return out


def position_order(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """Rows described by ``runs``, sorted by position: the source runs in the order they are taken, and the runs
    of the sorted rows (back to back from row 0, neighbours joined). Positions must not repeat."""
    taken = sorted((run for run in runs if run[1] > 0), key=lambda run: run[2])
    sorted_runs: list[Run] = []
    row = 0
    for _, n, pos in taken:
        append_run(sorted_runs, row, pos, n)
        row += n
    return taken, sorted_runs


def runs_to_positions(runs: list[Run], device: torch.device) -> torch.Tensor:
    """Global position of every row described by ``runs`` (rows must be covered in order)."""
    if not runs:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(p, p + n, device=device) for _, n, p in runs])


def rows_of(runs: list[Run], device: torch.device) -> torch.Tensor | None:
    """Row index that lays out the rows of ``runs`` in that order; None if it is the identity (no copy needed)."""
    next_row = 0
    for row, n, _ in runs:
        if row != next_row:
            return torch.cat([torch.arange(row, row + n, device=device) for row, n, _ in runs])
        next_row += n
    return None


def runs_in_positions(runs: list[Run], intervals: list[tuple[int, int]]) -> list[Run]:
    """The parts of ``runs`` whose positions lie in ``intervals`` (``[lo, hi)``, disjoint), in row order."""
    out = []
    for row, n, pos in runs:
        for lo, hi in intervals:
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((row + a - pos, b - a, a))
    return sorted(out)


def back_to_back(runs: list[Run]) -> list[Run]:
    """The rows of ``runs``, in that order, laid out from row 0 without gaps."""
    out, row = [], 0
    for _, n, pos in runs:
        out.append((row, n, pos))
        row += n
    return out


def row_positions(runs: list[Run], start: int, end: int) -> list[tuple[int, int]]:
    """The positions ``[lo, hi)`` of rows ``start..end-1`` of ``runs`` (runs in row order), one interval per run."""
    out = []
    for row, n, pos in runs:
        a, b = max(start, row), min(end, row + n)
        if a < b:
            out.append((pos + a - row, pos + b - row))
    return out


def union_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[lo, hi)`` intervals covering the same positions (empty ones dropped)."""
    out: list[list[int]] = []
    for lo, hi in sorted(i for i in intervals if i[1] > i[0]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]
