"""Every rank's mirror of the running requests, updated by each step plan's changes.

A plan (:mod:`server.forward.plan`) carries only what changed; the mirror turns it back into the full picture the
step needs: per request its state slot, the runs of every SP rank's KV shard (the ring needs all of them) and
this rank's page table. The same per-placement rule (:func:`server.forward.plan.stored_pieces`) drives the
scheduler's bookkeeping, so rank 0's scheduler and every mirror agree by construction;
``tests/execution/test_request_table.py`` checks them against a full rebuild.

The page tables live in one host array (rows = state slots) with a device copy; plans append pages, and only
the appended entries travel to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.forward.plan import StepPlan, stored_pieces
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
    device copy) hold this rank's pages of each request in the row of its state slot."""

    def __init__(self, sp_size: int, sp_rank: int, num_slots: int, max_pages: int, page_size: int,
                 device: torch.device):
        self.sp_size, self.sp_rank, self.page_size = sp_size, sp_rank, page_size
        self.requests: dict[int, RequestState] = {}
        self.page_table = np.zeros((num_slots, max_pages), dtype=np.int32)
        self.device_table = torch.zeros(num_slots, max_pages, dtype=torch.int32, device=device)

    def apply(self, plan: StepPlan) -> None:
        """Drop finished requests, add started ones, append every chunk's runs and this rank's new pages."""
        for req in plan.finished:
            self.requests.pop(req, None)
        rows, cols, pages = [], [], []
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
            st.num_tokens = max((p + n for run in runs for _, n, p in run), default=0)
        for chunk in plan.chunks:
            st = self.requests[chunk.req]
            for r in range(self.sp_size):
                for pos, n in stored_pieces(chunk, self.sp_size, r):
                    append_run(st.runs[r], st.shard_lens[r], pos, n)
                    st.shard_lens[r] += n
            st.num_tokens += chunk.num_new
            mine = chunk.new_pages[self.sp_rank] if chunk.new_pages else ()
            if mine:
                rows += [st.slot] * len(mine)
                cols += range(st.num_pages, st.num_pages + len(mine))
                pages += mine
                st.num_pages += len(mine)
        if pages:
            r, c, p = (np.asarray(x, dtype=np.int64) for x in (rows, cols, pages))
            self.page_table[r, c] = p
            index = torch.from_numpy(r * self.page_table.shape[1] + c).to(self.device_table.device)
            values = torch.from_numpy(p.astype(np.int32)).to(self.device_table.device)
            self.device_table.view(-1).index_copy_(0, index, values)

    def pages(self, req: int) -> np.ndarray:
        """This rank's page table of ``req`` (a view of the host table)."""
        st = self.requests[req]
        return self.page_table[st.slot, : st.num_pages]

    def device_pages(self, req: int) -> torch.Tensor:
        st = self.requests[req]
        return self.device_table[st.slot, : st.num_pages]

    def slots_of(self, req: int, rows: np.ndarray) -> np.ndarray:
        """Flat cache slots (page * page_size + offset) of shard rows ``rows`` of ``req`` on this rank."""
        table = self.pages(req)
        return table[rows // self.page_size].astype(np.int64) * self.page_size + rows % self.page_size
