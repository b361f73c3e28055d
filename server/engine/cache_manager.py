"""Bookkeeping of KV pages (per SP rank) and lightning state slots, kept by the scheduler on rank 0.

Workers hold the tensors; the scheduler decides which pages and slots each request uses and sends the page
tables with every step. TP ranks of one SP rank share its page numbering (each stores its own KV heads).

Admission reserves a request's worst case on every SP rank it will use, so a running request never waits for
memory and nothing is half-run:
- a request with a home rank (short prompt, DESIGN 5.5) keeps all of its KV there;
- an SP request spreads its split prompt chunks evenly (zigzag rounding adds at most 2 tokens per chunk and
  rank) and keeps its short tail chunk and its decode tokens on its ``decode_rank``.
"""

from __future__ import annotations

from server.engine.sequence import Sequence
from server.kernels.ops import Run


class CacheManager:
    def __init__(self, num_pages: int, page_size: int, sp_size: int, num_slots: int, split_threshold: int,
                 chunk_budget: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.sp_size = sp_size
        self.num_slots = num_slots
        self.split_threshold = split_threshold
        self.chunk_budget = chunk_budget
        # Pages never handed out are counted, not listed: a model without softmax layers has no KV and an
        # effectively unbounded page count.
        self.next_page = [0] * sp_size
        self.freed: list[list[int]] = [[] for _ in range(sp_size)]
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.reserved = [0] * sp_size  # tokens reserved by admitted requests, per SP rank

    @property
    def capacity_per_rank(self) -> int:
        return self.num_pages * self.page_size

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_per_rank * self.sp_size

    def is_short(self, seq: Sequence) -> bool:
        """Short prompts are prefilled whole on one SP rank (their home)."""
        return self.sp_size > 1 and len(seq.prompt_ids) < self.split_threshold

    def reservation(self, seq: Sequence, rank: int) -> list[int]:
        """Tokens to reserve per SP rank if ``seq`` is homed (short) or decodes (SP request) on ``rank``."""
        n, m, page = len(seq.prompt_ids), seq.params.max_tokens, self.page_size
        res = [0] * self.sp_size
        if self.sp_size == 1 or self.is_short(seq):
            res[rank] = n + m + page
            return res
        chunks = -(-n // self.chunk_budget)
        share = -(-n // self.sp_size) + 2 * chunks + page
        res = [share] * self.sp_size
        res[rank] += m + min(n, self.split_threshold)
        return res

    def can_ever_fit(self, seq: Sequence) -> bool:
        return max(self.reservation(seq, 0)) <= self.capacity_per_rank

    def least_reserved_rank(self) -> int:
        return min(range(self.sp_size), key=lambda r: self.reserved[r])

    def can_admit(self, seq: Sequence) -> bool:
        res = self.reservation(seq, self.least_reserved_rank())
        return bool(self.free_slots) and all(a + b <= self.capacity_per_rank for a, b in zip(self.reserved, res))

    def admit(self, seq: Sequence) -> None:
        rank = self.least_reserved_rank()
        seq.slot = self.free_slots.pop()
        seq.home = rank if self.is_short(seq) else None
        seq.decode_rank = rank
        seq.reserved_tokens = self.reservation(seq, rank)
        self.reserved = [a + b for a, b in zip(self.reserved, seq.reserved_tokens)]

    def release(self, seq: Sequence) -> None:
        for r in range(self.sp_size):
            self.freed[r].extend(reversed(seq.pages[r]))
            seq.pages[r] = []
            seq.kv_runs[r] = []
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        if seq.reserved_tokens:
            self.reserved = [a - b for a, b in zip(self.reserved, seq.reserved_tokens)]
            seq.reserved_tokens = []

    def pages_needed(self, seq: Sequence, sp_rank: int, new_tokens: int) -> int:
        total = seq.shard_len(sp_rank) + new_tokens
        return max(0, -(-total // self.page_size) - len(seq.pages[sp_rank]))

    def fits(self, seq: Sequence, per_rank_tokens: list[int]) -> bool:
        return all(self.pages_needed(seq, r, n) <= self.free_count(r) for r, n in enumerate(per_rank_tokens))

    def free_count(self, sp_rank: int) -> int:
        return self.num_pages - self.next_page[sp_rank] + len(self.freed[sp_rank])

    def take_page(self, sp_rank: int) -> int:
        if self.freed[sp_rank]:
            return self.freed[sp_rank].pop()
        self.next_page[sp_rank] += 1
        return self.next_page[sp_rank] - 1

    def append(self, seq: Sequence, sp_rank: int, pos_start: int, length: int) -> None:
        """Store positions ``pos_start..pos_start+length-1`` at the end of the rank's shard."""
        if length == 0:
            return
        for _ in range(self.pages_needed(seq, sp_rank, length)):
            seq.pages[sp_rank].append(self.take_page(sp_rank))
        runs = seq.kv_runs[sp_rank]
        row = seq.shard_len(sp_rank)
        if runs and runs[-1][2] + runs[-1][1] == pos_start:  # extends the last run
            r0, n0, p0 = runs[-1]
            runs[-1] = (r0, n0 + length, p0)
        else:
            runs.append((row, length, pos_start))

    def pages_used(self) -> int:
        return sum(self.num_pages - self.free_count(r) for r in range(self.sp_size))

    def snapshot_runs(self, seq: Sequence) -> list[list[Run]]:
        return [list(r) for r in seq.kv_runs]
