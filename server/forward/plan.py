"""The step plan: what rank 0's scheduler decides for one step, sent to every rank.

Plans are incremental. Every rank keeps a mirror of the running requests (:class:`server.execution.request_table.
RequestTable`: state slot, KV runs per SP rank, its own page table); a plan names requests that start
(with their state slot), requests that ended, and for each request in the step only what changes: how many new
tokens, where they go (:class:`Placement`), the pages appended on each SP rank and, for a request that asked for
prompt logprobs, what its rows score (:class:`PromptScoring`). So a decode step's message is a few numbers per
request, whatever the context length. Control messages are typed too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from server.sp.partition import rank_chunks

# Sliding-window layers keep their own page table per request (docs/sp.md, "Sliding-window layers: memory"): a
# page whose rows all lie before every later query's window is given back, and its entry in the table then names
# this page, which is never handed out nor written, and whose token positions are none (its keys are never seen).
NULL_PAGE = 1


class Placement(enum.IntEnum):
    """Where a request's new tokens of one step are computed and stored, decided once by the scheduler.

    - ``SPLIT``: zigzag over the SP group (:func:`server.sp.partition.rank_chunks`); every rank computes and stores
      its two chunks. Softmax layers run the ring, linear layers LASP / GDN state passing.
    - ``HOMED``: a short request lives on its home SP rank (``kv_rank``), which computes and stores all of it; the
      other SP ranks have no rows for it.
    - ``REPLICATED``: the tail chunk and the decode tokens of an SP request: every SP rank computes all rows (its KV
      shard is needed), only ``kv_rank`` stores their KV; softmax layers merge every rank's partial result by LSE.
    """

    SPLIT = 0
    HOMED = 1
    REPLICATED = 2


@dataclass(frozen=True, slots=True)
class PromptScoring:
    """A prefill chunk of a request that asked for prompt logprobs: each of its rows scores the prompt token after
    it. The runner knows the chunk's own tokens from the plan, so only the token after its last row travels here."""

    top_k: int  # alternatives per scored token (0: only the token's own logprob)
    next_token: int | None  # the prompt token after the chunk; None when the chunk ends the prompt (its last row
    # predicts the first output token, which is sampled, not scored)


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One request's share of a step, identical on every rank."""

    req: int  # request index (engine-wide, never reused while the request runs)
    start: int  # tokens already in the caches = global position of the first new token
    num_new: int
    placement: Placement
    kv_rank: int  # SP rank that stores the new KV (HOMED: the home; REPLICATED); 0 for SPLIT
    sample: bool  # the last new token is sampled
    new_pages: tuple[tuple[int, ...], ...] = ()  # per SP rank: pages appended to its table this step
    scoring: PromptScoring | None = None  # prompt logprobs wanted from this chunk's rows
    # models with sliding-window layers, per SP rank: pages appended to the window layers' table (as many as to
    # new_pages), and the window table's entries given back since the request's last chunk (now NULL_PAGE)
    new_window_pages: tuple[tuple[int, ...], ...] = ()
    window_freed: tuple[tuple[int, ...], ...] = ()

    @property
    def num_scored(self) -> int:
        """Rows of this chunk that score the prompt token after them (the first ones)."""
        if self.scoring is None:
            return 0
        return self.num_new - (self.scoring.next_token is None)

    @property
    def sample_rank(self) -> int:
        """SP rank that holds the hidden state of the last new token (split: chunk 2P-1 belongs to rank 0)."""
        return self.kv_rank if self.placement == Placement.HOMED else 0


@dataclass(frozen=True, slots=True)
class StartedRequest:
    """A request whose first tokens are in this step. Its state slot is cleared, or restored from a snapshot of a
    cached prefix (``restored``); a cached prefix also gives it pages and runs on each SP rank up front."""

    req: int
    slot: int
    pages: tuple[tuple[int, ...], ...] = ()  # per SP rank: the cached prefix's pages (shared, or a copy)
    runs: tuple[tuple[tuple[int, int, int], ...], ...] = ()  # per SP rank: the prefix rows' runs
    restored: bool = False
    window_pages: tuple[tuple[int, ...], ...] = ()  # per SP rank: the same for the window layers (NULL_PAGE: none)


@dataclass
class StepPlan:
    """One step. ``started``: requests whose first tokens are in this step; ``finished``: requests that ended since
    the last step (dropped from the mirrors); ``token_ids``: every chunk's new tokens, chunk after chunk.
    Before the forward every rank copies its ``page_copies`` (per SP rank ``(src, dst)`` pages of every softmax
    layer: a cached prefix's last page, copied on write) and then ``state_copies`` (``(src, dst)`` slots of every
    linear-attention layer: snapshots saved, then restored)."""

    chunks: list[ChunkPlan] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    started: list[StartedRequest] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    page_copies: list[list[tuple[int, int]]] = field(default_factory=list)  # per SP rank
    state_copies: list[tuple[int, int]] = field(default_factory=list)
    seq_sharded: bool = False  # the residual stream is sharded over TP (long SP prefills)
    all_logits: bool = False  # return logits of every new token (prompt scoring), not just the sampled ones
    # Some decode rows feed back the previous step's sampled token, which is still on the device: their token id
    # is -(i + 1), i its row among that step's sampled tokens (``ModelRunner.last_tokens``, which rank 0 broadcasts
    # to every rank first). See docs/architecture.md, "Overlapped steps".
    prev_tokens: bool = False
    # expert parallel: after this step's forward every rank all-gathers the pairs it computed in graph-form steps
    # since the last such step, this one included (ModelRunner.collect_graph_pairs); the engine asks every
    # EXPERT_GRAPH_PAIRS_EVERY steps
    collect_expert_pairs: bool = False

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
class ProfileRequest:
    """Control message: every rank starts ``torch.profiler`` (``start``), or stops it and writes its trace and op
    table into ``output_dir`` under the names ``tag`` gives (see :mod:`server.execution.profiler`)."""

    start: bool
    output_dir: str = ""
    tag: str = ""
    record_shapes: bool = False


@dataclass(frozen=True)
class Shutdown:
    """Control message: the workers leave their loop and exit."""


def computed_pieces(chunk: ChunkPlan, sp_size: int, sp_rank: int) -> list[tuple[int, int, int]]:
    """``(pos_start, length, chunk_index)`` of the new tokens SP rank ``sp_rank`` computes (chunk index -1 when
    not split); empty pieces dropped."""
    if chunk.placement == Placement.SPLIT and sp_size > 1:
        return [(chunk.start + a, b - a, c) for a, b, c in rank_chunks(chunk.num_new, sp_size, sp_rank) if b > a]
    if chunk.placement == Placement.HOMED and chunk.kv_rank != sp_rank:
        return []
    return [(chunk.start, chunk.num_new, -1)]


def stored_pieces(chunk: ChunkPlan, sp_size: int, sp_rank: int) -> list[tuple[int, int]]:
    """``(pos_start, length)`` of the new tokens whose KV SP rank ``sp_rank`` stores."""
    if chunk.placement == Placement.REPLICATED and chunk.kv_rank != sp_rank:
        return []
    return [(p, n) for p, n, _ in computed_pieces(chunk, sp_size, sp_rank)]
