"""The prefix cache (rank 0): requests that end leave their KV, and their linear-attention states at prompt ends
and chunk boundaries, for later requests that start with the same tokens.

An entry is one ended request's computed tokens with the layout its KV has on every SP rank (runs and pages per
rank): a cached prefix keeps the layout its prefill gave it, so a hit on a prefix spread over the SP group costs
each rank only its shard. Every SP rank's shard rows are in position order, so the rows of positions ``< m`` are a
prefix of each rank's shard: a hit on the first ``m`` tokens shares each rank's full pages of those rows and gives
the new request a copy of the page they end in (copy on write: its next rows go there).

Lookup: hashed page chains, as vLLM does: an entry indexes the chain hash of every full block of ``page_size``
tokens (a block's hash covers every token before it); a new prompt walks its blocks to the deepest hashed one, then
extends the match token by token into the next block (a prefix may end mid-page), always leaving at least one
prompt token to compute. Linear-attention layers (lightning, GDN) need their state at the prefix's end, so for
such models a match is cut back to the deepest state snapshot it covers. States are snapshotted at prefill-chunk
ends and prompt ends, and where a prompt leaves the longest cached prefix it shares (:meth:`PrefixCache.search`):
the scheduler ends a chunk there, so siblings of a document (the same prefix, different questions) find a
snapshot at the document's end from the second one on, wherever the chunk boundaries fell.

Memory: pages carry reference counts (requests and entries). Entries no running request reads are evicted least
recently used first when a page or a snapshot slot is needed, never those in use.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from server.kernels.ops import Run


def chain_hashes(tokens: list[int], block: int) -> list[int]:
    """The chain hash of every full ``block`` of ``tokens``: block k's hash covers tokens ``[0, (k+1)*block)``."""
    out, h = [], 0
    for k in range(len(tokens) // block):
        h = hash((h, tuple(tokens[k * block : (k + 1) * block])))
        out.append(h)
    return out


def rows_before(runs: list[Run], m: int) -> int:
    """Rows of a shard (runs in position order) whose positions are below ``m``."""
    return sum(min(max(m - pos, 0), n) for _, n, pos in runs)


def truncate_runs(runs: list[Run], m: int) -> list[Run]:
    """The runs of the rows of positions below ``m``."""
    out = []
    for row, n, pos in runs:
        if pos >= m:
            break
        out.append((row, min(n, m - pos), pos))
    return out


@dataclass
class CacheEntry:
    id: int
    tokens: list[int]  # positions 0..len-1 have KV on the ranks below
    runs: list[list[Run]]  # per SP rank
    pages: list[list[int]]  # per SP rank
    snapshots: dict[int, int] = field(default_factory=dict)  # tokens covered -> state slot holding that state
    users: int = 0  # running requests that share its pages
    last_used: float = field(default_factory=time.monotonic)
    hashes: list[int] = field(default_factory=list)


@dataclass
class PrefixHit:
    entry: CacheEntry
    tokens: int  # matched prompt tokens (their KV, and the state after them, come from the entry)
    snapshot: int | None  # the state slot to restore (linear-attention models)


class PrefixCache:
    """The index and the entries. Page reference counts live in the cache manager, which calls back here."""

    def __init__(self, page_size: int, needs_state: bool):
        self.block = page_size
        self.needs_state = needs_state
        self.entries: dict[int, CacheEntry] = {}
        self.index: dict[int, set[int]] = {}  # chain hash -> entries holding that block
        self._ids = itertools.count()
        self.hit_tokens = 0  # prompt tokens served from the cache (a counter for metrics)
        self.evictions = 0  # entries dropped to make room

    def _candidates(self, prompt: list[int]) -> list[tuple[CacheEntry, int]]:
        """Every entry that shares at least one full block with ``prompt``, with the tokens it shares (at most
        ``len(prompt) - 1``: one prompt token is always left to compute)."""
        limit = len(prompt) - 1
        depths: dict[int, int] = {}  # entry -> full blocks of the prompt it holds
        depth = 0
        for h in chain_hashes(prompt[:limit], self.block):
            found = self.index.get(h)
            if not found:
                break
            depth += self.block
            depths.update(dict.fromkeys(found, depth))
        out = []
        for i, d in depths.items():
            e = self.entries[i]
            if e.tokens[:d] != prompt[:d]:  # a hash collision
                continue
            m, end = d, min(limit, len(e.tokens))
            while m < end and e.tokens[m] == prompt[m]:  # the prefix may end mid-block
                m += 1
            out.append((e, m))
        return out

    def search(self, prompt: list[int]) -> tuple[PrefixHit | None, int]:
        """The longest usable cached prefix of ``prompt`` (at least one prompt token is left to compute), and the
        most tokens it shares with one entry, state snapshots aside (0: none). Every entry met on the walk is a
        candidate: for linear-attention models a shallower entry can hold a deeper usable snapshot than the
        deepest one (a request that hit a cached prefix snapshots only its own chunks)."""
        candidates = self._candidates(prompt)
        best: PrefixHit | None = None
        for e, m in candidates:
            snapshot = None
            if self.needs_state:
                usable = [t for t in e.snapshots if t <= m]
                if not usable:
                    continue
                m = max(usable)
                snapshot = e.snapshots[m]
            if m > 0 and (best is None or (m, e.last_used) > (best.tokens, best.entry.last_used)):
                best = PrefixHit(e, m, snapshot)
        return best, max((m for _, m in candidates), default=0)

    def add(self, tokens: list[int], runs: list[list[Run]], pages: list[list[int]],
            snapshots: dict[int, int], hashes: list[int] | None = None) -> CacheEntry:
        """``hashes``: ``chain_hashes(tokens, block)`` when the caller has them already."""
        entry = CacheEntry(next(self._ids), tokens, runs, pages, snapshots)
        entry.hashes = chain_hashes(tokens, self.block) if hashes is None else hashes
        for h in entry.hashes:
            self.index.setdefault(h, set()).add(entry.id)
        self.entries[entry.id] = entry
        return entry

    def duplicate_of(self, tokens: list[int], hashes: list[int] | None = None) -> CacheEntry | None:
        """An entry holding exactly these tokens (the same prompt ended twice)."""
        hashes = chain_hashes(tokens, self.block) if hashes is None else hashes
        pool = self.index.get(hashes[-1], set()) if hashes else set(self.entries)
        return next((self.entries[i] for i in pool if self.entries[i].tokens == tokens), None)

    def remove(self, entry: CacheEntry) -> None:
        for h in entry.hashes:
            ids = self.index.get(h)
            if ids is not None:
                ids.discard(entry.id)
                if not ids:
                    del self.index[h]
        del self.entries[entry.id]

    def evictable(self) -> list[CacheEntry]:
        """Entries no running request uses, least recently used first."""
        return sorted((e for e in self.entries.values() if e.users == 0), key=lambda e: e.last_used)
