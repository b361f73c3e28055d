"""The step plan: what rank 0's scheduler decides for one step, sent to every rank.

Plans are incremental. Every rank keeps a mirror of the running requests (:class:`server.engine.request_table.
RequestTable`: state slot, KV runs per SP rank, its own page table); a plan names requests that start
(with their state slot), requests that ended, and for each request in the step only what changes: how many new
tokens, where they go (:class:`Placement`), and the pages appended on each SP rank. So a decode step's message is
a few numbers per request, whatever the context length. Control messages are typed too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Placement(enum.IntEnum):
    """Where a request's new tokens of one step are computed and stored, decided once by the scheduler.

    - ``SPLIT``: zigzag over the SP group (:func:`server.sp.partition.rank_chunks`); every rank computes and stores
      its two chunks. Softmax layers run the ring, linear layers LASP / GDN state passing.
    - ``HOMED``: a short request lives on SP rank ``owner``, which computes and stores all of it; the other SP
      ranks have no rows for it.
    - ``REPLICATED``: the tail chunk and the decode tokens of an SP request: every SP rank computes all rows (its KV
      shard is needed), only ``owner`` stores their KV; softmax layers merge every rank's partial result by LSE.
    """

    SPLIT = 0
    HOMED = 1
    REPLICATED = 2


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One request's share of a step, identical on every rank."""

    req: int  # request index (engine-wide, never reused while the request runs)
    start: int  # tokens already in the caches = global position of the first new token
    num_new: int
    placement: Placement
    owner: int  # SP rank that stores the new KV (HOMED, REPLICATED); 0 for SPLIT
    sample: bool  # the last new token is sampled
    new_pages: tuple[tuple[int, ...], ...] = ()  # per SP rank: pages appended to its table this step

    @property
    def holder(self) -> int:
        """SP rank that holds the hidden state of the last new token (split: chunk 2P-1 belongs to rank 0)."""
        return self.owner if self.placement == Placement.HOMED else 0


@dataclass
class StepPlan:
    """One step. ``started``: ``(req, slot)`` of requests whose first tokens are in this step (their state slot is
    cleared first); ``finished``: requests that ended since the last step (dropped from the mirrors);
    ``token_ids``: every chunk's new tokens, chunk after chunk."""

    chunks: list[ChunkPlan] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    started: list[tuple[int, int]] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    seq_sharded: bool = False  # the residual stream is sharded over TP (long SP prefills)
    all_logits: bool = False  # return logits of every new token (prompt scoring), not just the sampled ones

    @property
    def is_decode(self) -> bool:
        """Every request has one new token and none is split: the step CUDA graphs can run."""
        return bool(self.chunks) and all(c.num_new == 1 and c.placement != Placement.SPLIT for c in self.chunks) \
            and not self.all_logits


@dataclass(frozen=True)
class MemoryStatsRequest:
    """Control message: every rank reports its device memory (and resets its peak when ``reset``)."""

    reset: bool = True


@dataclass(frozen=True)
class Shutdown:
    """Control message: the workers leave their loop and exit."""
