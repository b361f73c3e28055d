"""Bookkeeping of KV pages (per SP rank) and lightning state slots, kept by the scheduler on rank 0.

Workers hold the tensors; the scheduler decides which pages and slots each request uses and sends the page
tables with every step. TP ranks of one SP rank share its page numbering (each stores its own KV heads).
Admission reserves a request's worst case (prompt + max_tokens, plus one partial page per SP rank), so a running
request never waits for memory and nothing is half-run.
"""

from __future__ import annotations

from server.engine.sequence import Sequence
from server.kernels.ops import Run


class CacheManager:
    def __init__(self, num_pages: int, page_size: int, sp_size: int, num_slots: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.sp_size = sp_size
        self.num_slots = num_slots
        self.free_pages = [list(range(num_pages - 1, -1, -1)) for _ in range(sp_size)]
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.reserved = 0  # tokens reserved by admitted requests, all SP ranks together

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size * self.sp_size

    def reservation(self, seq: Sequence) -> int:
        return len(seq.prompt_ids) + seq.params.max_tokens + self.sp_size * self.page_size

    def can_ever_fit(self, seq: Sequence) -> bool:
        return self.reservation(seq) <= self.capacity_tokens

    def can_admit(self, seq: Sequence) -> bool:
        return bool(self.free_slots) and self.reserved + self.reservation(seq) <= self.capacity_tokens

    def admit(self, seq: Sequence) -> None:
        seq.slot = self.free_slots.pop()
        seq.reserved_tokens = self.reservation(seq)
        self.reserved += seq.reserved_tokens

    def release(self, seq: Sequence) -> None:
        for r in range(self.sp_size):
            self.free_pages[r].extend(reversed(seq.pages[r]))
            seq.pages[r] = []
            seq.kv_runs[r] = []
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        self.reserved -= seq.reserved_tokens
        seq.reserved_tokens = 0

    def pages_needed(self, seq: Sequence, sp_rank: int, new_tokens: int) -> int:
        total = seq.shard_len(sp_rank) + new_tokens
        return max(0, -(-total // self.page_size) - len(seq.pages[sp_rank]))

    def fits(self, seq: Sequence, per_rank_tokens: list[int]) -> bool:
        return all(self.pages_needed(seq, r, n) <= len(self.free_pages[r]) for r, n in enumerate(per_rank_tokens))

    def append(self, seq: Sequence, sp_rank: int, pos_start: int, length: int) -> None:
        """Store positions ``pos_start..pos_start+length-1`` at the end of the rank's shard."""
        if length == 0:
            return
        for _ in range(self.pages_needed(seq, sp_rank, length)):
            seq.pages[sp_rank].append(self.free_pages[sp_rank].pop())
        runs = seq.kv_runs[sp_rank]
        row = seq.shard_len(sp_rank)
        if runs and runs[-1][2] + runs[-1][1] == pos_start:  # extends the last run
            r0, n0, p0 = runs[-1]
            runs[-1] = (r0, n0 + length, p0)
        else:
            runs.append((row, length, pos_start))

    def most_free_rank(self) -> int:
        return max(range(self.sp_size), key=lambda r: len(self.free_pages[r]))

    def pages_used(self) -> int:
        return sum(self.num_pages - len(f) for f in self.free_pages)

    def snapshot_runs(self, seq: Sequence) -> list[list[Run]]:
        return [list(r) for r in seq.kv_runs]
