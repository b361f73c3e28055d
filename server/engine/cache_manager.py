"""Bookkeeping of KV pages (per SP rank) and state slots, kept by the scheduler on rank 0.

Workers hold the tensors and a mirror of each request's pages (:mod:`server.engine.request_table`); the
scheduler decides which pages and slots each request uses and sends only the pages it appends. TP ranks of one
SP rank share its page numbering (each stores its own KV heads). Page 0 of every rank and the state slot
``num_slots`` are scratch space that padded rows of a CUDA-graph step write to; they are never handed out.

Admission reserves a request's worst case on every SP rank it will use, so a running request never waits for
memory and nothing is half-run:
- a request with a home rank (short prompt, DESIGN 5.5) keeps all of its KV there;
- an SP request spreads its split prompt chunks evenly (zigzag rounding adds at most 2 tokens per chunk and
  rank), and its replicated tokens (tail chunk, decode) go to the SP rank with the smallest shard whenever a page
  fills, so every rank holds about 1/P of it.
"""

from __future__ import annotations

from server.engine.request_table import append_run
from server.engine.sequence import Sequence

SCRATCH_PAGE = 0


class CacheManager:
    def __init__(self, num_pages: int, page_size: int, sp_size: int, num_slots: int, split_threshold: int,
                 split_budget: int):
        self.num_pages = num_pages  # per rank, the scratch page included
        self.page_size = page_size
        self.sp_size = sp_size
        self.num_slots = num_slots
        self.split_threshold = split_threshold
        self.split_budget = split_budget  # the largest split chunk (tokens over the whole SP group)
        # Pages never handed out are counted, not listed: a model without softmax layers has no KV and an
        # effectively unbounded page count.
        self.next_page = [SCRATCH_PAGE + 1] * sp_size
        self.freed: list[list[int]] = [[] for _ in range(sp_size)]
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.reserved = [0] * sp_size  # tokens reserved by admitted requests, per SP rank

    @property
    def capacity_per_rank(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_per_rank * self.sp_size

    def is_short(self, seq: Sequence) -> bool:
        """Short prompts are prefilled whole on one SP rank (their home)."""
        return self.sp_size > 1 and len(seq.prompt_ids) < self.split_threshold

    def reservation(self, seq: Sequence, rank: int) -> list[int]:
        """Tokens to reserve per SP rank if ``seq`` is homed on ``rank`` (short) or an SP request."""
        n, m, page = len(seq.prompt_ids), seq.params.max_tokens, self.page_size
        res = [0] * self.sp_size
        if self.sp_size == 1 or self.is_short(seq):
            res[rank] = n + m + page
            return res
        chunks = -(-n // self.split_budget)
        # split chunks, zigzag rounding, the tail chunk on one rank, decode rotating page by page
        share = -(-(n + m) // self.sp_size) + 2 * chunks + self.split_threshold + 2 * page
        return [share] * self.sp_size

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

    def replicated_owner(self, seq: Sequence) -> int:
        """SP rank that stores ``seq``'s next replicated tokens: the current one while its last page has room,
        then the rank with the smallest shard, so that every rank holds about 1/P of the request."""
        if seq.shard_len(seq.decode_rank) % self.page_size:
            return seq.decode_rank
        seq.decode_rank = min(range(self.sp_size), key=lambda r: (seq.shard_len(r), r != seq.decode_rank))
        return seq.decode_rank

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

    def append(self, seq: Sequence, sp_rank: int, pos_start: int, length: int) -> list[int]:
        """Store positions ``pos_start..pos_start+length-1`` at the end of the rank's shard; the new pages."""
        if length == 0:
            return []
        new = [self.take_page(sp_rank) for _ in range(self.pages_needed(seq, sp_rank, length))]
        seq.pages[sp_rank] += new
        append_run(seq.kv_runs[sp_rank], seq.shard_len(sp_rank), pos_start, length)
        return new

    def pages_used(self) -> int:
        return sum(self.num_pages - self.free_count(r) - 1 for r in range(self.sp_size))
