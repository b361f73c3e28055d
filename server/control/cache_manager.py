"""Bookkeeping of KV pages (per SP rank), state slots and the prefix cache, kept by the scheduler on rank 0.

Workers hold the tensors and a mirror of each request's pages (:mod:`server.execution.request_table`); the
scheduler decides which pages and slots each request uses and sends only the pages it appends. TP ranks of one
SP rank share its page numbering (each stores its own KV heads). Page 0 of every rank and the state slot
``num_slots`` are scratch space that padded rows of a CUDA-graph step write to; they are never handed out. State
slots above it hold the prefix cache's snapshots.

Pages carry reference counts: the request that wrote a page, later requests that share it as a cached prefix,
and the prefix cache's entries (:mod:`server.control.prefix_cache`). A request that ends leaves its pages to the
cache, which frees them when it evicts the entry; a page is free when nothing holds it.

Admission reserves a request's worst case of new pages on every SP rank it will use, so a running request never
waits for memory and nothing is half-run; cache entries that running requests share are counted as taken, the
others can always be evicted:
- a request with a home rank (a short prompt, docs/architecture.md: One step, end to end) keeps all of its KV there;
- an SP request spreads its split prompt chunks evenly (zigzag rounding adds at most 2 tokens per chunk and
  rank), and its replicated tokens (tail chunk, decode) go to the SP rank with the smallest shard whenever a page
  fills, so every rank holds about 1/P of it.

Models with sliding-window layers beside full ones (``window``) keep two page groups, as vLLM's hybrid KV cache
manager does: every request has a page table for the full layers and one for the window layers, with the same rows
(a chunk appends as many pages to each), and both draw page ids from the one pool of each rank (a page id's memory
holds one full layer and one window layer, :meth:`server.execution.model_runner.ModelRunner.allocate_caches`). Before
a request's next chunk, its window pages whose rows all lie before that chunk's first window (positions
``<= start - window``) are given back: their table entries become ``NULL_PAGE`` (never written, no positions, so no
window sees its keys) and the plan tells the workers. A running request thus holds O(window + page) tokens of window
pages per rank, and one window's pages before each of its branch points (``Sequence.window_points``: its prompt's
end, and where its prompt leaves a cached prefix) for the prefix cache, which can serve a prefix of ``m`` tokens only
when it holds the window pages of the positions ``[m - window + 1, m)`` (docs/sp.md, "Sliding-window layers:
memory").
"""

from __future__ import annotations

import bisect
import time

from server.control.prefix_cache import CacheEntry, PrefixCache, PrefixHit, chain_hashes
from server.control.sequence import Sequence
from server.forward.plan import NULL_PAGE
from server.runs import Run, append_run, row_positions, rows_before, truncate_runs, union_intervals

SCRATCH_PAGE = 0
# windows a running request's window pages cover at most: its current one, its prompt's end, one branch point
WINDOWS_KEPT = 3


class CacheManager:
    """Rank 0's bookkeeping of KV pages per SP rank, state slots and snapshots, reservations and the prefix cache."""

    def __init__(self, num_pages: int, page_size: int, sp_size: int, num_slots: int, split_threshold: int,
                 split_budget: int, prefix_cache: PrefixCache | None = None, snapshot_slots: int = 0,
                 window: int | None = None):
        self.num_pages = num_pages  # per rank, the scratch page (and the null page) included
        self.window = window  # the window group's window (None: one page group)
        self.page_size = page_size
        self.sp_size = sp_size
        self.num_slots = num_slots
        self.split_threshold = split_threshold
        self.split_budget = split_budget  # the largest split chunk (tokens over the whole SP group)
        # Pages never handed out are counted, not listed: a model without softmax layers has no KV and an
        # effectively unbounded page count.
        self.next_page = [self.reserved_pages] * sp_size
        self.freed: list[list[int]] = [[] for _ in range(sp_size)]
        self.refs: list[dict[int, int]] = [{} for _ in range(sp_size)]  # holders of a page (requests + entries)
        self.entry_refs: list[dict[int, int]] = [{} for _ in range(sp_size)]  # entries holding a page
        self.cached_only = [0] * sp_size  # pages only entries hold (evictable), per rank
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.reserved = [0] * sp_size  # new tokens reserved by admitted requests, per SP rank
        self.prefix = prefix_cache
        first = num_slots + 1  # after the scratch slot
        self.free_snapshots = list(range(first + snapshot_slots - 1, first - 1, -1))
        self.snapshot_slots = snapshot_slots
        self.pending_copies: list[tuple[int, int]] = []  # state-slot copies the next plan carries
        self.pending_page_copies: list[list[tuple[int, int]]] = [[] for _ in range(sp_size)]

    @property
    def reserved_pages(self) -> int:
        """Pages never handed out: the scratch page, and ``NULL_PAGE`` with a window group."""
        return NULL_PAGE + 1 if self.window is not None else SCRATCH_PAGE + 1

    @property
    def usable_pages(self) -> int:
        """Pages of one rank that requests and cache entries can hold."""
        return self.num_pages - self.reserved_pages

    @property
    def capacity_per_rank(self) -> int:
        return self.usable_pages * self.page_size

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_per_rank * self.sp_size

    def reservation(self, seq: Sequence, home: int | None, cached: int = 0) -> list[int]:
        """New tokens to reserve per SP rank for ``seq`` (its first ``cached`` tokens from the prefix cache) homed on
        ``home``, or, with ``home`` None, spread as an SP request."""
        n, m, page = len(seq.prompt_ids) - cached, seq.max_new_tokens, self.page_size
        res = [0] * self.sp_size
        if self.sp_size == 1 or home is not None:
            res[home or 0] = self._with_window(n + m + page)
            return res
        chunks = -(-n // self.split_budget)
        # split chunks, zigzag rounding, the tail chunk on one rank, decode rotating page by page
        share = -(-(n + m) // self.sp_size) + 2 * chunks + self.split_threshold + 2 * page
        return [self._with_window(share)] * self.sp_size

    def _with_window(self, tokens: int) -> int:
        """``tokens`` of full-layer pages on a rank and the window pages beside them: at most the same, or the
        windows kept (each within ``window + 2 pages`` of rows) and one step's chunk (a step writes all of its rows
        before any page is given back)."""
        if self.window is None:
            return tokens
        chunk = self.split_budget // self.sp_size + 2 * self.page_size
        return tokens + min(tokens, WINDOWS_KEPT * (self.window + 2 * self.page_size) + chunk)

    def can_ever_fit(self, seq: Sequence, home: int | None) -> bool:
        return max(self.reservation(seq, home)) <= self.capacity_per_rank

    def least_reserved_rank(self) -> int:
        return min(range(self.sp_size), key=lambda r: self.reserved[r])

    def prefix_ranks(self, hit: PrefixHit) -> list[int]:
        """SP ranks that hold rows of ``hit``'s cached prefix."""
        return [r for r in range(self.sp_size) if rows_before(hit.entry.runs[r], hit.tokens)]

    @staticmethod
    def entry_pages(entry: CacheEntry, rank: int) -> int:
        """Pages ``entry`` holds on ``rank``, of both groups."""
        return len(entry.pages[rank]) + (entry.window_held[rank] if entry.window_pages else 0)

    def _shared_tokens(self, rank: int) -> int:
        """Tokens of cache entries that running requests share on ``rank`` (they cannot be evicted)."""
        if self.prefix is None:
            return 0
        return sum(self.entry_pages(e, rank) for e in self.prefix.entries.values() if e.users) * self.page_size

    def lookup(self, seq: Sequence) -> PrefixHit | None:
        """``seq``'s usable cached prefix. For linear-attention models it also sets ``seq.snapshot_at``: where the
        prompt leaves a longer cached prefix than the hit's snapshot covers (a prefill chunk ends there)."""
        if self.prefix is None or not seq.use_prefix_cache:
            return None
        if seq.prompt_hashes is None:
            seq.prompt_hashes = chain_hashes(seq.prompt_ids, self.prefix.block, salt=seq.params.cache_salt)
        hit, shared = self.prefix.search(seq.prompt_ids, seq.prompt_hashes)
        if self.prefix.needs_state and self.snapshot_slots:
            seq.snapshot_at = shared if shared > (hit.tokens if hit else 0) else None
        if self.window is not None and shared > (hit.tokens if hit else 0):
            seq.window_points.add(shared)  # a later request that shares as much finds the window there
        return hit

    def can_admit(self, seq: Sequence, hit: PrefixHit | None, home: int | None) -> bool:
        """A slot is free and ``seq``'s reservation (homed on ``home`` or spread) fits beside the others'."""
        if not self.free_slots:
            return False
        res = self.reservation(seq, home, hit.tokens if hit else 0)
        pinned = hit.entry if hit and not hit.entry.users else None
        return all(
            a + b + self._shared_tokens(r) + (self.entry_pages(pinned, r) * self.page_size if pinned else 0)
            <= self.capacity_per_rank
            for r, (a, b) in enumerate(zip(self.reserved, res)))

    def admit(self, seq: Sequence, hit: PrefixHit | None, home: int | None, kv_rank: int) -> None:
        """Take a slot and the reservation for ``seq`` as the scheduler placed it (``home``; ``kv_rank``: where its
        first unsplit tokens go), and the cached prefix of ``hit``."""
        seq.slot = self.free_slots.pop()
        seq.home = home
        seq.kv_rank = kv_rank
        seq.reserved_tokens = self.reservation(seq, home, hit.tokens if hit else 0)
        self.reserved = [a + b for a, b in zip(self.reserved, seq.reserved_tokens)]
        if self.window is not None:
            seq.window_pages = [[] for _ in range(self.sp_size)]
            seq.window_freed = [[] for _ in range(self.sp_size)]
            seq.window_scan = [0] * self.sp_size
            if self.prefix is not None:
                seq.window_points.add(len(seq.prompt_ids))
        if hit is not None:
            self._take_prefix(seq, hit)

    def _take_prefix(self, seq: Sequence, hit: PrefixHit) -> None:
        """Give ``seq`` the first ``hit.tokens`` tokens of the entry: its full pages shared, the page they end in
        copied (on write), its runs cut there, the state restored from the snapshot."""
        entry, m = hit.entry, hit.tokens
        entry.users += 1
        entry.last_used = time.monotonic()
        seq.prefix_entry = entry
        for r in range(self.sp_size):
            rows = rows_before(entry.runs[r], m)
            full, partial = divmod(rows, self.page_size)
            shared = entry.pages[r][:full]
            self._hold(r, shared)
            seq.pages[r] = shared
            if partial:
                copy = self.take_page(r)
                self.pending_page_copies[r].append((entry.pages[r][full], copy))
                seq.pages[r].append(copy)
            if self.window is not None:  # given-back pages stay NULL_PAGE; the last one is copied (NULL_PAGE too)
                shared = entry.window_pages[r][:full]
                self._hold(r, [p for p in shared if p != NULL_PAGE])
                seq.window_pages[r] = list(shared)
                if partial:
                    copy = self.take_page(r)
                    self.pending_page_copies[r].append((entry.window_pages[r][full], copy))
                    seq.window_pages[r].append(copy)
            seq.kv_runs[r] = truncate_runs(entry.runs[r], m)
        seq.num_computed = seq.cached_tokens = m
        if hit.snapshot is not None:
            self.pending_copies.append((hit.snapshot, seq.slot))
            seq.restored = True
        self.prefix.hit_tokens += m

    def release(self, seq: Sequence) -> None:
        """The request ended: its pages and snapshots go to the prefix cache (or are freed), its slot is freed."""
        if seq.prefix_entry is not None:
            seq.prefix_entry.users -= 1
            seq.prefix_entry = None
        if self.prefix is not None and seq.num_computed > 0 and seq.slot >= 0:
            self._donate(seq)
        else:
            self._drop_pages(seq)
            self.free_snapshots += list(seq.snapshots.values())
        for r in range(self.sp_size):
            seq.pages[r] = []
            seq.kv_runs[r] = []
        seq.window_pages, seq.window_freed, seq.window_scan = [], [], []
        seq.snapshots = {}
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        if seq.reserved_tokens:
            self.reserved = [a - b for a, b in zip(self.reserved, seq.reserved_tokens)]
            seq.reserved_tokens = []

    def _donate(self, seq: Sequence) -> None:
        tokens = seq.token_ids(0, seq.num_computed)
        if self.prefix.needs_state:  # the state after the last computed token (saved before the slot is reused)
            self.snapshot(seq)
        # once for both uses, from the prompt's (hashing 128K tokens takes about 2 ms)
        hashes = chain_hashes(tokens, self.prefix.block, seq.prompt_hashes or (), seq.params.cache_salt)
        same = self.prefix.duplicate_of(tokens, hashes)
        if same is not None:  # the same tokens ended before: keep the older entry, free this copy
            self._drop_pages(seq)
            same.snapshots.update({t: s for t, s in seq.snapshots.items() if t not in same.snapshots})
            self.free_snapshots += [s for t, s in seq.snapshots.items() if same.snapshots.get(t) != s]
            same.last_used = time.monotonic()
            return
        entry = self.prefix.add(tokens, [list(r) for r in seq.kv_runs], [list(p) for p in seq.pages],
                                dict(seq.snapshots), hashes)
        for r in range(self.sp_size):  # the request's hold on its pages passes to the entry
            self._pass_to_entry(r, entry.pages[r])
        if self.window is not None:
            entry.window_pages = [list(p) for p in seq.window_pages]
            entry.window_cover = self._window_cover(entry.runs, entry.window_pages)
            entry.window_held = [sum(p != NULL_PAGE for p in w) for w in entry.window_pages]
            for r in range(self.sp_size):
                self._pass_to_entry(r, [p for p in entry.window_pages[r] if p != NULL_PAGE])

    def _drop_pages(self, seq: Sequence) -> None:
        """The request lets go of its pages of both groups."""
        for r in range(self.sp_size):
            for p in seq.pages[r]:
                self._ref(r, p, -1, 0)
            for p in seq.window_pages[r] if seq.window_pages else ():
                if p != NULL_PAGE:
                    self._ref(r, p, -1, 0)

    def _window_cover(self, runs: list[list[Run]], window_pages: list[list[int]]) -> list[tuple[int, int]]:
        """The positions whose window-layer KV ``window_pages`` still hold (every rank's shard together)."""
        page = self.page_size
        cover = []
        for r in range(self.sp_size):
            shard = sum(n for _, n, _ in runs[r])
            for k, p in enumerate(window_pages[r]):
                if p != NULL_PAGE:
                    cover += row_positions(runs[r], k * page, min((k + 1) * page, shard))
        return union_intervals(cover)

    def slide_window(self, seq: Sequence) -> None:
        """Give back ``seq``'s window pages that no query from its next token on sees: full pages whose rows all lie
        at positions ``<= num_computed - window``, unless they hold the window before one of its
        ``window_points`` (kept for the prefix cache). Their entries go to ``seq.window_freed`` for the plan."""
        if self.window is None:
            return
        edge, page = seq.num_computed - self.window, self.page_size  # the last position no later query sees
        keep = [(t - self.window, t) for t in seq.window_points if t <= seq.num_computed]
        for r in range(self.sp_size):
            pages, runs = seq.window_pages[r], seq.kv_runs[r]
            starts = [row for row, _, _ in runs]
            k, rows = seq.window_scan[r], seq.shard_len(r)
            while (k + 1) * page <= rows:  # full pages only: the last one still takes rows
                if pages[k] != NULL_PAGE:  # (a cached prefix's given-back pages come as NULL_PAGE)
                    last = (k + 1) * page - 1  # the page's last row holds its latest position
                    row, _, pos = runs[bisect.bisect_right(starts, last) - 1]
                    if pos + last - row > edge:
                        break
                    spans = row_positions(runs, k * page, last + 1) if keep else []
                    if not any(lo < hi_k and lo_k < hi for lo, hi in keep for lo_k, hi_k in spans):
                        self._ref(r, pages[k], -1, 0)
                        pages[k] = NULL_PAGE
                        seq.window_freed[r].append(k)
                k += 1
            seq.window_scan[r] = k

    def snapshot(self, seq: Sequence) -> None:
        """Save the state of ``seq``'s slot after its ``num_computed`` tokens (at the start of the next step)."""
        if self.prefix is None or not self.prefix.needs_state or seq.num_computed in seq.snapshots:
            return
        if not self.free_snapshots:
            self.evict(snapshots=1)
        if not self.free_snapshots:
            return  # every snapshot is held by a running request: this point is not cached
        slot = self.free_snapshots.pop()
        self.pending_copies.append((seq.slot, slot))
        seq.snapshots[seq.num_computed] = slot

    def evict(self, pages: int = 0, rank: int = 0, snapshots: int = 0) -> None:
        """Evict unused entries, least recently used first, until ``pages`` pages are free on ``rank`` and
        ``snapshots`` snapshot slots are free (or nothing is left to evict)."""
        if self.prefix is None:
            return
        for entry in self.prefix.evictable():
            if self.free_count(rank) >= pages and len(self.free_snapshots) >= snapshots:
                return
            self.drop(entry)
            self.prefix.evictions += 1

    def drop(self, entry) -> None:
        self.prefix.remove(entry)
        for r in range(self.sp_size):
            for p in entry.pages[r]:
                self._ref(r, p, -1, -1)
            for p in entry.window_pages[r] if entry.window_pages else ():
                if p != NULL_PAGE:
                    self._ref(r, p, -1, -1)
        self.free_snapshots += list(entry.snapshots.values())

    def flush(self) -> int:
        """Drop every cache entry no running request uses; the number dropped."""
        unused = self.prefix.evictable() if self.prefix is not None else []
        for entry in unused:
            self.drop(entry)
        return len(unused)

    def pages_needed(self, seq: Sequence, sp_rank: int, new_tokens: int) -> int:
        """New pages of each group for ``new_tokens`` more rows on ``sp_rank``."""
        total = seq.shard_len(sp_rank) + new_tokens
        return max(0, -(-total // self.page_size) - len(seq.pages[sp_rank]))

    def fits(self, seq: Sequence, per_rank_tokens: list[int]) -> bool:
        groups = 1 + (self.window is not None)
        for r, n in enumerate(per_rank_tokens):
            need = self.pages_needed(seq, r, n) * groups
            if need > self.free_count(r):
                self.evict(pages=need, rank=r)
            if need > self.free_count(r):
                return False
        return True

    def free_count(self, sp_rank: int) -> int:
        return self.num_pages - self.next_page[sp_rank] + len(self.freed[sp_rank])

    def take_page(self, sp_rank: int) -> int:
        if not self.free_count(sp_rank):
            self.evict(pages=1, rank=sp_rank)
        if self.freed[sp_rank]:
            page = self.freed[sp_rank].pop()
        else:
            self.next_page[sp_rank] += 1
            page = self.next_page[sp_rank] - 1
        self._ref(sp_rank, page, 1, 0)
        return page

    def _ref(self, r: int, page: int, holders: int, entries: int) -> None:
        """Change a page's holders (and how many of them are cache entries); free it when nothing holds it."""
        refs, by_entries = self.refs[r], self.entry_refs[r]
        before = refs.get(page, 0), by_entries.get(page, 0)
        after = before[0] + holders, before[1] + entries
        self.cached_only[r] += (after[0] == after[1] > 0) - (before[0] == before[1] > 0)
        for table, value in ((refs, after[0]), (by_entries, after[1])):
            if value:
                table[page] = value
            else:
                table.pop(page, None)
        if not after[0]:
            self.freed[r].append(page)

    def _hold(self, r: int, pages: list[int]) -> None:
        """``_ref(r, p, 1, 0)`` for each of ``pages`` (held already, by an entry): one more request holds them.
        A cached prefix of 128K tokens is 8192 pages, so this loop is written out."""
        refs, by_entries = self.refs[r], self.entry_refs[r]
        was_cached_only = 0
        for p in pages:
            n = refs[p]
            was_cached_only += n == by_entries.get(p, 0)
            refs[p] = n + 1
        self.cached_only[r] -= was_cached_only

    def _pass_to_entry(self, r: int, pages: list[int]) -> None:
        """``_ref(r, p, 0, 1)`` for each of ``pages``, written out: a new entry holds them in place of the request
        that ends (the request's hold passes to the entry, so the holder count stays)."""
        refs, by_entries = self.refs[r], self.entry_refs[r]
        now_cached_only = 0
        for p in pages:
            e = by_entries.get(p, 0) + 1
            by_entries[p] = e
            now_cached_only += refs[p] == e
        self.cached_only[r] += now_cached_only

    def append(self, seq: Sequence, sp_rank: int, pos_start: int, length: int) -> tuple[list[int], list[int]]:
        """Store positions ``pos_start..pos_start+length-1`` at the end of the rank's shard; the new pages of the
        full group and of the window group (none without one)."""
        if length == 0:
            return [], []
        n = self.pages_needed(seq, sp_rank, length)
        new = [self.take_page(sp_rank) for _ in range(n)]
        seq.pages[sp_rank] += new
        new_window = []
        if self.window is not None:
            new_window = [self.take_page(sp_rank) for _ in range(n)]
            seq.window_pages[sp_rank] += new_window
        append_run(seq.kv_runs[sp_rank], seq.shard_len(sp_rank), pos_start, length)
        return new, new_window

    def held_pages(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Pages ``seq`` holds on each SP rank: of the full group, and of the window group (given back: not)."""
        window = [sum(p != NULL_PAGE for p in w) for w in seq.window_pages] if seq.window_pages else \
            [0] * self.sp_size
        return [len(p) for p in seq.pages], window

    def pages_used(self) -> int:
        """Pages running requests hold, every SP rank (pages only the prefix cache holds are apart)."""
        return sum(self.num_pages - self.free_count(r) - self.reserved_pages - self.cached_only[r]
                   for r in range(self.sp_size))

    def pages_cached(self) -> int:
        """Pages only the prefix cache holds (evictable at any time), every SP rank."""
        return sum(self.cached_only)
