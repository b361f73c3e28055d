"""Continuous batching with chunked prefill, sequence-parallel placement and admission control (rank 0).

Each step has a budget of new tokens per SP rank (``chunked_prefill_size``), so an SP group of P ranks takes P
times the work of one GPU per step. Running requests that finished their prompt decode one token each; the rest
of the budget goes to prompt chunks, first of requests already prefilling, then of waiting requests admitted in
arrival order while a state slot and their reserved KV capacity are free. The scheduler decides each chunk's
:class:`~server.forward.plan.Placement` once:

- a prompt with fewer than ``sp_min_tokens`` (or 2P) tokens gets a home SP rank that computes and stores all of
  it, prefill and decode (HOMED: P short prompts proceed in parallel on the P ranks);
- a longer prompt's chunks of at least that size are split zigzag over the SP group (SPLIT; each rank computes
  about ``chunked_prefill_size`` of a chunk of up to P times that);
- its shorter tail chunk and its decode tokens are computed on every SP rank (they need the SP-sharded KV) and
  stored on the rank with the smallest shard (REPLICATED).

The plan it emits is incremental (:mod:`server.forward.plan`): new requests, ended requests, and per chunk the
tokens and the pages appended on each rank; the prefill chunks of a request that asked for prompt logprobs also say
what their rows score (:class:`~server.forward.plan.PromptScoring`), whatever their placement.
"""

from __future__ import annotations

from collections import deque

from server.config import EngineConfig
from server.control.cache_manager import CacheManager
from server.control.prefix_cache import PrefixCache, PrefixHit
from server.control.sequence import Sequence, Status
from server.forward.plan import ChunkPlan, Placement, PromptScoring, StartedRequest, StepPlan, stored_pieces
from server.messages import RequestRejected


class Scheduler:
    """Rank 0's step planner: admission, chunked prefill under a per-rank token budget, SP placement, plans."""

    def __init__(self, config: EngineConfig, num_pages: int, num_slots: int, max_model_len: int,
                 has_linear_layers: bool = False, snapshot_slots: int | None = None, window: int | None = None):
        self.config = config
        self.max_model_len = max_model_len
        self.sp = config.sp_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.budget = config.chunked_prefill_size if config.chunked_prefill_size > 0 else max_model_len
        # A split chunk must fit one step's budget, or long prompts could never be scheduled.
        self.split_threshold = max(min(config.sp_min_tokens, self.budget), 2 * self.sp)
        # window: a model with sliding-window layers beside full ones keeps a window page group (cache_manager.py)
        prefix = PrefixCache(config.page_size, has_linear_layers, window) if config.enable_prefix_cache else None
        snapshots = 0
        if prefix is not None and has_linear_layers:
            snapshots = snapshot_slots if snapshot_slots is not None else (config.prefix_cache_snapshots or 0)
        self.cache = CacheManager(num_pages, config.page_size, self.sp, num_slots, self.split_threshold,
                                  self.budget * self.sp, prefix, snapshots, window)
        self._finished: list[int] = []  # requests released since the last plan that was sent
        self._started: list[StartedRequest] = []  # requests admitted since then
        self._next_req = 0

    def add(self, seq: Sequence) -> None:
        n = len(seq.prompt_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty; send at least one token", "invalid_prompt")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{n} tokens, which leaves no room for a completion. Shorten the prompt.",
                "context_length_exceeded")
        seq.max_new_tokens = min(seq.params.max_tokens, self.max_model_len - n)  # the request's limit, once
        if not self.cache.can_ever_fit(seq, 0 if self.is_short(seq, None) else None):
            raise RequestRejected(
                f"the request needs KV cache for {n} prompt + {seq.max_new_tokens} completion tokens, more than "
                f"the {self.cache.capacity_tokens} tokens the cache holds; lower max_tokens, shorten the prompt, "
                "or start the server with more cache memory (--mem-fraction-static, --cpu-cache-gb, --sp-size)",
                "cache_full")
        free_running = max(0, self.config.max_running_requests - len(self.running))
        if len(self.waiting) - free_running >= self.config.max_waiting_requests:
            raise RequestRejected("the request queue is full; retry later", "queue_full")
        seq.req = self._next_req
        self._next_req += 1
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        unsent = [s for s in self._started if s.req == seq.req]
        if unsent:  # the workers never heard of it
            self._started.remove(unsent[0])
        elif seq.status == Status.RUNNING:
            self._finished.append(seq.req)
        seq.status = Status.FINISHED
        self.cache.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- placement: every decision about a request's SP ranks is made here and carried in the plan -------------
    def is_short(self, seq: Sequence, hit: PrefixHit | None) -> bool:
        """A request whose prompt tokens still to compute (after its cached prefix) are fewer than the split
        threshold is prefilled whole on one SP rank, its home."""
        return self.sp > 1 and len(seq.prompt_ids) - (hit.tokens if hit else 0) < self.split_threshold

    def home_rank(self, seq: Sequence, hit: PrefixHit | None) -> int | None:
        """The home of a short request: the least reserved SP rank, or the one rank that holds its cached prefix;
        None for an SP request, or when its prefix is spread over several ranks (its new tokens are then computed
        on every rank, like a tail chunk)."""
        if not self.is_short(seq, hit):
            return None
        if hit is None:
            return self.cache.least_reserved_rank()
        ranks = self.cache.prefix_ranks(hit)
        return ranks[0] if len(ranks) == 1 else None

    def replicated_kv_rank(self, seq: Sequence) -> int:
        """SP rank that stores ``seq``'s next replicated tokens: the current one while its last page there has
        room, then the rank with the smallest shard, so that every rank holds about 1/P of the request."""
        if seq.shard_len(seq.kv_rank) % self.config.page_size:
            return seq.kv_rank
        seq.kv_rank = min(range(self.sp), key=lambda r: (seq.shard_len(r), r != seq.kv_rank))
        return seq.kv_rank

    def _place(self, seq: Sequence, n: int, room: list[int]) -> ChunkPlan | None:
        """Decide where ``n`` new tokens of ``seq`` go (at most what ``room`` leaves on each SP rank), record them
        in the cache bookkeeping and take their cost from ``room``; None if they cannot run now."""
        start = seq.num_computed
        remaining_prompt = len(seq.prompt_ids) - start
        # a chunk ends where the prompt leaves a cached prefix, for a state snapshot there (see prefix_cache.py)
        cut = seq.snapshot_at - start if seq.snapshot_at is not None and seq.snapshot_at > start else None
        if seq.home is not None:
            placement, kv_rank = Placement.HOMED, seq.home
            n = min(n, room[kv_rank], cut or n)
        elif self.sp > 1 and remaining_prompt >= self.split_threshold:
            placement, kv_rank = Placement.SPLIT, 0
            n = min(n, self.sp * min(room))
            if cut is not None and 2 * self.sp <= cut < n:
                n = cut  # a split chunk that ends at the cut, shorter than the threshold if it must be
            elif n < self.split_threshold:
                return None  # wait for a step with budget for a split chunk (the reservation assumes one)
        else:
            placement = Placement.REPLICATED if self.sp > 1 else Placement.HOMED
            n = min(n, min(room), cut or n)
            kv_rank = self.replicated_kv_rank(seq) if self.sp > 1 else 0
        if n <= 0:
            return None
        chunk = ChunkPlan(seq.req, start, n, placement, kv_rank, start + n >= len(seq.prompt_ids))
        pieces = [stored_pieces(chunk, self.sp, r) for r in range(self.sp)]
        self.cache.slide_window(seq)  # window pages no query from `start` on sees go back to the pool first
        if not self.cache.fits(seq, [sum(length for _, length in p) for p in pieces]):
            return None
        appended = [[self.cache.append(seq, r, pos, length) for pos, length in p] for r, p in enumerate(pieces)]
        new_pages = tuple(tuple(page for full, _ in a for page in full) for a in appended)
        window = {}
        if seq.window_pages:  # the window group's new pages, and its pages given back since the last chunk
            window = dict(new_window_pages=tuple(tuple(page for _, w in a for page in w) for a in appended),
                          window_freed=tuple(tuple(f) for f in seq.window_freed))
            seq.window_freed = [[] for _ in range(self.sp)]
        for r in range(self.sp):  # what each rank computes
            if placement == Placement.SPLIT:
                room[r] -= -(-n // self.sp)
            elif placement == Placement.REPLICATED or r == kv_rank:
                room[r] -= n
        return ChunkPlan(seq.req, start, n, placement, kv_rank, chunk.sample, new_pages, self._scoring(seq, start + n),
                         **window)

    @staticmethod
    def _scoring(seq: Sequence, end: int) -> PromptScoring | None:
        """What a prefill chunk ending before token ``end`` scores, for a request that asked for prompt logprobs."""
        k = seq.params.prompt_logprobs
        if k is None or end > len(seq.prompt_ids):
            return None
        return PromptScoring(k, seq.prompt_ids[end] if end < len(seq.prompt_ids) else None)

    def schedule(self) -> tuple[StepPlan, list[Sequence]]:
        """The next step's plan and its requests (in plan order)."""
        chunks: list[ChunkPlan] = []
        seqs: list[Sequence] = []
        room = [self.budget] * self.sp

        def add(seq: Sequence, n: int) -> bool:
            chunk = self._place(seq, n, room)
            if chunk is not None:
                chunks.append(chunk)
                seqs.append(seq)
            return chunk is not None

        # a request whose last token is still on the device and is its last one (max_tokens) waits for it
        for seq in [s for s in self.running if not s.prefilling and len(s.output_ids) < s.max_new_tokens]:
            if max(room) <= 0:
                break
            add(seq, 1)
        for seq in [s for s in self.running if s.prefilling]:
            if max(room) <= 0:
                break
            add(seq, len(seq.prompt_ids) - seq.num_computed)
        while self.waiting and max(room) > 0 and len(self.running) < self.config.max_running_requests:
            seq = self.waiting[0]
            hit = self.cache.lookup(seq)
            home = self.home_rank(seq, hit)
            if not self.cache.can_admit(seq, hit, home):
                # a hit pins its whole entry: if the two do not fit together but the request does alone (the
                # entry can then be evicted), compute the prompt instead of waiting for room that never comes
                home = self.home_rank(seq, None)
                if hit is None or not self.cache.can_admit(seq, None, home):
                    break
                hit = None
            self.waiting.popleft()
            self.cache.admit(seq, hit, home, home if home is not None else self.cache.least_reserved_rank())
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._started.append(StartedRequest(
                seq.req, seq.slot, tuple(tuple(p) for p in seq.pages) if hit else (),
                tuple(tuple(r) for r in seq.kv_runs) if hit else (), seq.restored,
                tuple(tuple(p) for p in seq.window_pages) if hit and seq.window_pages else ()))
            if not add(seq, len(seq.prompt_ids) - seq.num_computed):
                break
        total = sum(c.num_new for c in chunks)
        seq_sharded = (self.config.seq_parallel_tp and self.config.tp_size > 1
                       and total >= self.config.sp_min_tokens)
        token_ids = [t for c, s in zip(chunks, seqs) for t in s.token_ids(c.start, c.num_new)]
        if not chunks:  # an empty plan is not sent: the changes wait for the next one
            return StepPlan(seq_sharded=seq_sharded), seqs
        cache = self.cache
        plan = StepPlan(chunks, token_ids, self._started, self._finished, cache.pending_page_copies,
                        cache.pending_copies, seq_sharded,
                        prev_tokens=any(s.token_in_flight for s in seqs))
        self._started, self._finished = [], []
        cache.pending_page_copies, cache.pending_copies = [[] for _ in range(self.sp)], []
        return plan, seqs

    def advance(self, seqs: list[Sequence], plan: StepPlan) -> None:
        """The step ran: its tokens are computed. Prefill chunk ends (and prompt ends) are where the prefix cache
        snapshots linear-attention states."""
        for seq, chunk in zip(seqs, plan.chunks):
            seq.num_computed += chunk.num_new
            if chunk.start < len(seq.prompt_ids):
                self.cache.snapshot(seq)
