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

Sliding-window layers (a model with a window page group) keep only some of their pages: an entry has the window
pages its request still held when it ended (the last window, and the window before each of the request's branch
points: its prompt's end, and where its prompt left a cached prefix), and a prefix of ``m`` tokens is served only
when they hold the positions ``[m - window + 1, m)``; a longer match is cut back to the deepest such ``m``, as for
state snapshots (docs/sp.md, "Sliding-window layers: memory").

Memory: pages carry reference counts (requests and entries). Entries no running request reads are evicted least
recently used first when a page or a snapshot slot is needed, never those in use.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from server.runs import Run


def chain_hashes(tokens: list[int], block: int, known: list[int] = (), salt: str | None = None) -> list[int]:
    """The chain hash of every full ``block`` of ``tokens``: block k's hash covers tokens ``[0, (k+1)*block)``.
    ``known``: the hashes of the first blocks of ``tokens`` already computed (a prompt's, for the prompt and its
    output); only the blocks after them are hashed. ``salt`` (a request's ``cache_salt``) starts the chain, so
    requests of different salts never share a block hash, hence never a cached page."""
    out = list(known[: len(tokens) // block])
    h = out[-1] if out else (0 if salt is None else hash(("cache_salt", salt)))
    for k in range(len(out), len(tokens) // block):
        h = hash((h, tuple(tokens[k * block : (k + 1) * block])))
        out.append(h)
    return out


def window_served(cover: list[tuple[int, int]], window: int, m: int) -> int:
    """The most tokens ``m' <= m`` of a prefix whose window, positions ``[m' - window + 1, m')``, lies in ``cover``
    (sorted, disjoint intervals); 0 if none."""
    if window <= 1:  # a query sees only itself: no earlier position is needed
        return m
    best = 0
    for lo, hi in cover:
        t = min(m, hi)
        if t > 0 and (lo == 0 or t - window + 1 >= lo):
            best = max(best, t)
    return best


def shared_blocks(a: list[int], b: list[int]) -> int:
    """Leading chain hashes two lists have in common. A chain hash covers every token before it, so the lists agree
    on a prefix and differ after it: a binary search finds its end (a hash collision can only shorten or lengthen
    the answer, which the caller checks against the tokens)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class CacheEntry:
    """A cached prefix: its tokens' chain hashes, every SP rank's pages and runs, its state snapshots, users."""

    id: int
    tokens: list[int]  # positions 0..len-1 have KV on the ranks below
    runs: list[list[Run]]  # per SP rank
    pages: list[list[int]]  # per SP rank
    snapshots: dict[int, int] = field(default_factory=dict)  # tokens covered -> state slot holding that state
    users: int = 0  # running requests that share its pages
    last_used: float = field(default_factory=time.monotonic)
    hashes: list[int] = field(default_factory=list)
    # a model with a window page group: per SP rank the window layers' pages (NULL_PAGE: given back), the
    # positions whose window-layer KV they hold
    window_pages: list[list[int]] = field(default_factory=list)
    window_cover: list[tuple[int, int]] = field(default_factory=list)
    window_held: list[int] = field(default_factory=list)  # per SP rank: its window pages not given back


@dataclass
class PrefixHit:
    """The usable part of a cache entry for a new prompt: the entry, the tokens it serves, the snapshot to restore."""

    entry: CacheEntry
    tokens: int  # matched prompt tokens (their KV, and the state after them, come from the entry)
    snapshot: int | None  # the state slot to restore (linear-attention models)


class PrefixCache:
    """The index and the entries. Page reference counts live in the cache manager, which calls back here."""

    def __init__(self, page_size: int, needs_state: bool, window: int | None = None):
        self.block = page_size
        self.needs_state = needs_state
        self.window = window  # the window group's window (see the module docstring); None: no window group
        self.entries: dict[int, CacheEntry] = {}
        self.index: dict[int, set[int]] = {}  # chain hash -> entries holding that block
        self._ids = itertools.count()
        self.hit_tokens = 0  # prompt tokens served from the cache (a counter for metrics)
        self.evictions = 0  # entries dropped to make room

    def _candidates(self, prompt: list[int], hashes: list[int] | None) -> list[tuple[CacheEntry, int, int]]:
        """Every entry that shares at least one full block with ``prompt`` by its chain hashes: ``(entry, d, m)``
        with ``d`` the tokens of the shared full blocks (not yet checked against the tokens: see :meth:`search`)
        and ``m >= d`` the tokens it shares, extended into the next block token by token (at most
        ``len(prompt) - 1``: one prompt token is always left to compute).

        Every entry that shares a block shares the first one, and its depth is where its chain and the prompt's
        part (:func:`shared_blocks`): the cost is a binary search per entry that starts like the prompt, not a walk
        over the prompt's blocks per entry."""
        limit = len(prompt) - 1
        hashes = chain_hashes(prompt, self.block) if hashes is None else hashes
        hashes = hashes[: limit // self.block]
        out = []
        for i in self.index.get(hashes[0], ()) if hashes else ():
            e = self.entries[i]
            d = shared_blocks(e.hashes, hashes) * self.block
            if not d:
                continue
            m, end = d, min(limit, len(e.tokens))
            while m < end and e.tokens[m] == prompt[m]:  # the prefix may end mid-block
                m += 1
            out.append((e, d, m))
        return out

    def search(self, prompt: list[int], hashes: list[int] | None = None) -> tuple[PrefixHit | None, int]:
        """The longest usable cached prefix of ``prompt`` (at least one prompt token is left to compute), and the
        most tokens it shares with one entry, state snapshots aside (0: none). Every entry that shares a block is a
        candidate: for linear-attention models a shallower entry can hold a deeper usable snapshot than the
        deepest one (a request that hit a cached prefix snapshots only its own chunks). ``hashes``: the prompt's
        :func:`chain_hashes`, when known.

        A hash match is trusted only after the tokens compare equal (hashes of token tuples can be made to
        collide): the candidates are checked best first, so a lookup compares the prompt with one or two entries,
        not with every entry that shares its first block."""
        candidates = self._candidates(prompt, hashes)
        checked: dict[int, bool] = {}

        def same_tokens(e: CacheEntry, d: int) -> bool:
            if e.id not in checked:
                checked[e.id] = e.tokens[:d] == prompt[:d]
            return checked[e.id]

        hits = []
        for e, d, m in candidates:
            snapshot = None
            if self.window is not None:
                m = window_served(e.window_cover, self.window, m)
            if self.needs_state:
                usable = [t for t in e.snapshots if t <= m and (self.window is None
                                                                or window_served(e.window_cover, self.window, t) == t)]
                if not usable:
                    continue
                m = max(usable)
                snapshot = e.snapshots[m]
            if m > 0:
                hits.append((m, e.last_used, e.id, d, snapshot))
        best = None
        for m, _, i, d, snapshot in sorted(hits, reverse=True):
            if same_tokens(self.entries[i], d):
                best = PrefixHit(self.entries[i], m, snapshot)
                break
        shared = next((m for e, d, m in sorted(candidates, key=lambda c: c[2], reverse=True) if same_tokens(e, d)), 0)
        return best, shared

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
