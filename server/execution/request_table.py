"""Every rank's mirror of the running requests, updated by each step plan's changes.

A plan (:mod:`server.forward.plan`) carries only what changed; the mirror turns it back into the full picture the
step needs: per request its state slot, the runs of every SP rank's KV shard (the ring needs all of them) and
this rank's page table. The same per-placement rule (:func:`server.forward.plan.stored_pieces`) drives the
scheduler's bookkeeping, so rank 0's scheduler and every mirror agree by construction;
``tests/execution/test_request_table.py`` checks them against a full rebuild.

The page tables live in one host array (rows = state slots) with a device copy; plans append pages, and only
the changed entries travel to the device. A model with a window page group (sliding-window layers beside full
ones, :mod:`server.control.cache_manager`) has a second table of the same shape for its window layers: a chunk
appends as many pages to it, and its entries given back become ``NULL_PAGE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.forward.plan import NULL_PAGE, StepPlan, stored_pieces
from server.runs import Run, append_run


@dataclass
class RequestState:
    """One running request in a rank's mirror: its slot, every SP rank's KV runs, this rank's page table row."""

    slot: int
    runs: list[list[Run]]  # per SP rank: (shard row, length, position) runs of its KV shard
    shard_lens: list[int]  # per SP rank
    num_pages: int = 0  # this rank's pages, in the table's row `slot`
    num_tokens: int = 0  # tokens in the caches (every SP rank's shard together)


class RequestTable:
    """The mirror on one rank. ``page_table`` ``[num_slots, max_pages]`` int32 (host) and ``device_table`` (its
    device copy) hold this rank's pages of each request in the row of its state slot; ``windowed``: also
    ``window_table`` / ``device_window_table``, the window layers' pages (None without a window group)."""

    def __init__(self, sp_size: int, sp_rank: int, num_slots: int, max_pages: int, page_size: int,
                 device: torch.device, windowed: bool = False):
        self.sp_size, self.sp_rank, self.page_size = sp_size, sp_rank, page_size
        self.requests: dict[int, RequestState] = {}
        self.page_table = np.zeros((num_slots, max_pages), dtype=np.int32)
        self.device_table = torch.zeros(num_slots, max_pages, dtype=torch.int32, device=device)
        self.window_table = np.zeros_like(self.page_table) if windowed else None
        self.device_window_table = torch.zeros_like(self.device_table) if windowed else None

    def apply(self, plan: StepPlan) -> None:
        """Drop finished requests, add started ones, append every chunk's runs and this rank's new pages."""
        for req in plan.finished:
            self.requests.pop(req, None)
        rows, cols, pages = [], [], []
        w_rows, w_cols, w_pages = [], [], []  # the window table's changes
        for s in plan.started:
            runs = [list(s.runs[r]) if s.runs else [] for r in range(self.sp_size)]
            st = RequestState(s.slot, runs, [sum(n for _, n, _ in r) for r in runs])
            self.requests[s.req] = st
            mine = s.pages[self.sp_rank] if s.pages else ()
            if mine:
                rows += [s.slot] * len(mine)
                cols += range(len(mine))
                pages += mine
                st.num_pages = len(mine)
            if s.window_pages and s.window_pages[self.sp_rank]:
                w_rows += [s.slot] * len(mine)
                w_cols += range(len(mine))
                w_pages += s.window_pages[self.sp_rank]
            st.num_tokens = max((p + n for run in runs for _, n, p in run), default=0)
        for chunk in plan.chunks:
            st = self.requests[chunk.req]
            for r in range(self.sp_size):
                for pos, n in stored_pieces(chunk, self.sp_size, r):
                    append_run(st.runs[r], st.shard_lens[r], pos, n)
                    st.shard_lens[r] += n
            st.num_tokens += chunk.num_new
            mine = chunk.new_pages[self.sp_rank] if chunk.new_pages else ()
            if chunk.window_freed and chunk.window_freed[self.sp_rank]:
                freed = chunk.window_freed[self.sp_rank]
                w_rows += [st.slot] * len(freed)
                w_cols += freed
                w_pages += [NULL_PAGE] * len(freed)
            if chunk.new_window_pages and chunk.new_window_pages[self.sp_rank]:
                w_rows += [st.slot] * len(mine)
                w_cols += range(st.num_pages, st.num_pages + len(mine))
                w_pages += chunk.new_window_pages[self.sp_rank]
            if mine:
                rows += [st.slot] * len(mine)
                cols += range(st.num_pages, st.num_pages + len(mine))
                pages += mine
                st.num_pages += len(mine)
        self._write(self.page_table, self.device_table, rows, cols, pages)
        if self.window_table is not None:
            self._write(self.window_table, self.device_window_table, w_rows, w_cols, w_pages)

    @staticmethod
    def _write(table: np.ndarray, device_table: torch.Tensor, rows: list[int], cols: list[int],
               pages: list[int]) -> None:
        """Set entries of a page table and of its device copy (only those cross to the device)."""
        if not pages:
            return
        r, c, p = (np.asarray(x, dtype=np.int64) for x in (rows, cols, pages))
        table[r, c] = p
        index = torch.from_numpy(r * table.shape[1] + c).to(device_table.device)
        values = torch.from_numpy(p.astype(np.int32)).to(device_table.device)
        device_table.view(-1).index_copy_(0, index, values)

    def pages(self, req: int) -> np.ndarray:
        """This rank's page table of ``req`` (a view of the host table)."""
        st = self.requests[req]
        return self.page_table[st.slot, : st.num_pages]

    def device_pages(self, req: int) -> torch.Tensor:
        st = self.requests[req]
        return self.device_table[st.slot, : st.num_pages]

    def window_pages(self, req: int) -> np.ndarray | None:
        """This rank's window-layer page table of ``req`` (a view of the host table); None without a window group."""
        if self.window_table is None:
            return None
        st = self.requests[req]
        return self.window_table[st.slot, : st.num_pages]

    def device_window_pages(self, req: int) -> torch.Tensor | None:
        if self.window_table is None:
            return None
        st = self.requests[req]
        return self.device_window_table[st.slot, : st.num_pages]

    def slots_of(self, req: int, rows: np.ndarray, window: bool = False) -> np.ndarray:
        """Flat cache slots (page * page_size + offset) of shard rows ``rows`` of ``req`` on this rank (``window``:
        in the window layers' pages)."""
        table = self.window_pages(req) if window else self.pages(req)
        return table[rows // self.page_size].astype(np.int64) * self.page_size + rows % self.page_size
