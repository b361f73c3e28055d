"""Continuous batching with chunked prefill, sequence-parallel placement and admission control (rank 0).

Each step has a budget of new tokens (``chunked_prefill_size``). Running requests that finished their prompt
decode one token each; the rest of the budget goes to prompt chunks, first of requests already prefilling, then
of waiting requests admitted in arrival order while a state slot and their reserved KV capacity are free. A
prompt with fewer than ``sp_min_tokens`` (or 2P) tokens gets a home SP rank that computes and stores all of it,
prefill and decode (DESIGN 5.5: P short prompts proceed in parallel on the P ranks). A longer prompt's chunks of at
least that size are split zigzag over the SP group; its shorter tail chunk and its decode tokens are computed on
every SP rank (they need the SP-sharded KV) and stored by its decode rank.
"""

from __future__ import annotations

from collections import deque

from server.config import EngineConfig
from server.engine.cache_manager import CacheManager
from server.engine.context import SeqStep, StepPlan
from server.engine.io_struct import RequestRejected
from server.engine.sequence import Sequence, Status
from server.sp.partition import zigzag_chunks


class Scheduler:
    def __init__(self, config: EngineConfig, num_pages: int, num_slots: int, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.sp = config.sp_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.budget = config.chunked_prefill_size if config.chunked_prefill_size > 0 else max_model_len
        # A split chunk must fit one step's budget, or long prompts could never be scheduled.
        self.split_threshold = max(min(config.sp_min_tokens, self.budget), 2 * self.sp)
        self.cache = CacheManager(num_pages, config.page_size, self.sp, num_slots, self.split_threshold, self.budget)

    def add(self, seq: Sequence) -> None:
        n = len(seq.prompt_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty; send at least one token", "invalid_prompt")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{n} tokens, which leaves no room for a completion. Shorten the prompt.",
                "context_length_exceeded")
        seq.params.max_tokens = min(seq.params.max_tokens, self.max_model_len - n)
        if not self.cache.can_ever_fit(seq):
            raise RequestRejected(
                f"the request needs KV cache for {n} prompt + {seq.params.max_tokens} completion tokens, more than "
                f"the {self.cache.capacity_tokens} tokens the cache holds; lower max_tokens, shorten the prompt, "
                "or start the server with more cache memory (--mem-fraction-static, --cpu-cache-gb, --sp-size)",
                "cache_full")
        free_running = max(0, self.config.max_running_requests - len(self.running))
        if len(self.waiting) - free_running >= self.config.max_waiting_requests:
            raise RequestRejected("the request queue is full; retry later", "queue_full")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.cache.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _place(self, seq: Sequence, n: int) -> SeqStep | None:
        """Decide where ``n`` new tokens of ``seq`` go and record them in the cache bookkeeping; None if this
        placement cannot run now (its pages are not free, or a split-size chunk does not fit the budget)."""
        start = seq.num_computed
        home = seq.home is not None
        split = not home and self.sp > 1 and n >= self.split_threshold
        if not home and not split and self.sp > 1 and len(seq.prompt_ids) - start >= self.split_threshold:
            return None  # wait for a step with budget for a split chunk (the reservation assumes one)
        if split:
            chunks = zigzag_chunks(n, self.sp)
            mine = [[chunks[r], chunks[2 * self.sp - 1 - r]] for r in range(self.sp)]
            per_rank = [sum(b - a for a, b in m) for m in mine]
            owner = 0
        else:
            owner = seq.home if home else seq.decode_rank
            per_rank = [n if r == owner else 0 for r in range(self.sp)]
        if not self.cache.fits(seq, per_rank):
            return None
        if split:
            for r in range(self.sp):
                for a, b in mine[r]:
                    self.cache.append(seq, r, start + a, b - a)
        else:
            self.cache.append(seq, owner, start, n)
        ids = seq.all_ids[start : start + n]
        sample = start + n >= len(seq.prompt_ids)
        return SeqStep(seq.rid, seq.slot, start, ids, split, owner, self.cache.snapshot_runs(seq),
                       [list(p) for p in seq.pages], sample, home)

    def schedule(self) -> tuple[StepPlan, list[Sequence]]:
        """The next step's plan and its requests (in plan order)."""
        steps: list[SeqStep] = []
        seqs: list[Sequence] = []
        zero: list[int] = []
        budget = self.budget
        for seq in [s for s in self.running if not s.prefilling]:
            if budget <= 0:
                break
            st = self._place(seq, 1)
            if st is not None:
                steps.append(st)
                seqs.append(seq)
                budget -= 1
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0:
                break
            n = min(len(seq.prompt_ids) - seq.num_computed, budget)
            st = self._place(seq, n)
            if st is not None:
                steps.append(st)
                seqs.append(seq)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            seq = self.waiting[0]
            if not self.cache.can_admit(seq):
                break
            self.waiting.popleft()
            self.cache.admit(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            zero.append(seq.slot)
            n = min(len(seq.prompt_ids), budget)
            st = self._place(seq, n)
            if st is None:
                break
            steps.append(st)
            seqs.append(seq)
            budget -= n
        total = sum(s.num_new for s in steps)
        seq_sharded = (self.config.seq_parallel_tp and self.config.tp_size > 1
                       and total >= self.config.sp_min_tokens)
        return StepPlan(steps, seq_sharded, zero), seqs

    def advance(self, seqs: list[Sequence], plan: StepPlan) -> None:
        for seq, st in zip(seqs, plan.seqs):
            seq.num_computed += st.num_new
