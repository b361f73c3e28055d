"""Scheduler placement and admission on rank 0's bookkeeping alone (no model needed)."""

from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.control.scheduler import Scheduler
from server.control.sequence import Sequence
from server.forward.plan import Placement
from server.messages import RequestRejected
from server.sampling_params import SamplingParams


def make(sp: int, pages: int = 64, page: int = 4, budget: int = 64, sp_min: int = 16, running: int = 8):
    cfg = EngineConfig(sp_size=sp, page_size=page, chunked_prefill_size=budget, sp_min_tokens=sp_min,
                       max_running_requests=running)
    return Scheduler(cfg, pages, running, max_model_len=1024)


def seq(rid: str, n: int, sp: int, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=max_tokens), sp)


def test_short_prompts_are_homed_on_separate_sp_ranks():
    s = make(sp=2)
    for i in range(4):
        s.add(seq(f"s{i}", 5, 2))
    plan, seqs = s.schedule()
    homes = [c.kv_rank for c in plan.chunks]
    assert all(c.placement == Placement.HOMED for c in plan.chunks)
    assert sorted(homes) == [0, 0, 1, 1]  # spread over the SP ranks
    for c, q in zip(plan.chunks, seqs):  # all KV of a homed request is on its home rank
        assert q.shard_len(c.kv_rank) == 5 and len(c.new_pages[c.kv_rank]) == 2  # 5 tokens on pages of 4
        assert all(not q.kv_runs[r] and not c.new_pages[r] for r in range(2) if r != c.kv_rank)


def test_long_prompt_is_split_then_decodes_replicated():
    s = make(sp=2, budget=64)
    long = seq("long", 100, 2, max_tokens=10)
    s.add(long)
    plan, seqs = s.schedule()  # the budget is per SP rank: one split chunk takes the whole 100-token prompt
    c = plan.chunks[0]
    assert c.placement == Placement.SPLIT and c.num_new == 100 and c.sample
    assert [long.shard_len(r) for r in range(2)] == [50, 50]  # zigzag halves
    s.advance(seqs, plan)
    owners = []
    for _ in range(9):  # decode: replicated, stored page by page on the rank with the smaller shard
        long.output_ids.append(7)
        plan, seqs = s.schedule()
        c = plan.chunks[0]
        assert c.placement == Placement.REPLICATED and c.num_new == 1
        owners.append(c.kv_rank)
        s.advance(seqs, plan)
    # 50 + 2 fills rank 0's page; then rank 1 (smaller) fills its page to 52; on a tie it keeps going (a new page
    # of 4 to 56); then rank 0 again
    assert owners == [0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert abs(long.shard_len(0) - long.shard_len(1)) <= 4


def test_unsplittable_budget_defers_instead_of_replicating_a_long_chunk():
    s = make(sp=2, budget=10, sp_min=16)
    for i in range(3):
        s.add(seq(f"short{i}", 3, 2, max_tokens=8))
    s.add(seq("long", 40, 2))
    plan, seqs = s.schedule()
    # 3 short prompts homed on ranks 0, 1, 0 leave 4 and 7 tokens of room: a split chunk (>= 16, about half on
    # each rank) does not fit, so the long prompt waits
    assert [q.rid for q in seqs] == ["short0", "short1", "short2"]
    s.advance(seqs, plan)
    for q in seqs:
        q.output_ids.append(1)
    plan, seqs = s.schedule()  # 3 decode tokens leave 8 and 9: a split chunk of 16 of the long prompt
    long_chunk = next(c for c, q in zip(plan.chunks, seqs) if q.rid == "long")
    assert long_chunk.placement == Placement.SPLIT and long_chunk.num_new == 16


def test_admission_rejects_what_never_fits_and_releases_reservations():
    s = make(sp=2, pages=8, page=4)  # 32 tokens per rank
    with pytest.raises(RequestRejected) as e:
        s.add(seq("big", 30, 2, max_tokens=30))
    assert e.value.code == "cache_full"
    with pytest.raises(RequestRejected) as e:
        s.add(seq("ctx", 1024, 2))
    assert e.value.code == "context_length_exceeded"
    a = seq("a", 10, 2, max_tokens=4)
    s.add(a)
    s.schedule()
    assert sum(s.cache.reserved) > 0
    s.finish(a)
    assert s.cache.reserved == [0, 0] and s.cache.pages_used() == 0 and not s.has_unfinished()


def test_budget_below_sp_min_tokens_still_splits_long_prompts():
    s = make(sp=2, budget=32, sp_min=1000)  # chunks can never reach sp_min_tokens: split at the budget instead
    s.add(seq("long", 100, 2))
    steps = []
    while sum(n for n, _ in steps) < 100:
        plan, seqs = s.schedule()
        steps.append((plan.chunks[0].num_new, plan.chunks[0].placement))
        s.advance(seqs, plan)
    # split chunks of 2 x 32 (each rank computes about the budget); the 36 left are not below the split
    # threshold (min(sp_min, budget) = 32), so they are split too
    assert steps == [(64, Placement.SPLIT), (36, Placement.SPLIT)]


def test_plans_carry_only_what_changed():
    """A decode step's plan does not grow with the context: new pages only when a page fills."""
    s = make(sp=2, pages=4096, budget=512, sp_min=16)
    long = seq("long", 900, 2, max_tokens=64)
    s.add(long)
    while long.prefilling:
        plan, seqs = s.schedule()
        s.advance(seqs, plan)
    sizes = []
    for _ in range(8):
        long.output_ids.append(1)
        plan, seqs = s.schedule()
        s.advance(seqs, plan)
        assert plan.started == [] and plan.token_ids == [1]
        sizes.append(sum(len(p) for p in plan.chunks[0].new_pages))
    assert sizes and max(sizes) <= 1 and sum(sizes) >= 1  # at most one page per step, whatever the context


def test_a_prefix_hit_that_cannot_fit_is_dropped_instead_of_waited_on():
    """A hit pins its whole cache entry. When the entry and the request do not fit together but the request fits
    alone (the entry can be evicted), the request is admitted without the hit, not left waiting for ever."""
    cfg = EngineConfig(page_size=8, chunked_prefill_size=128, max_running_requests=2, enable_prefix_cache=True)
    s = Scheduler(cfg, 17, 2, max_model_len=1024)  # 16 pages of 8: 128 tokens
    first = Sequence("first", list(range(100)), SamplingParams(max_tokens=1), 1)
    s.add(first)
    plan, seqs = s.schedule()
    s.advance(seqs, plan)
    s.finish(first)
    assert s.cache.prefix.entries  # its 100 tokens are cached
    second = Sequence("second", list(range(8)) + list(range(500, 590)), SamplingParams(max_tokens=8), 1)
    assert s.cache.lookup(second).tokens == 8 and not s.cache.can_admit(second, s.cache.lookup(second), None)
    s.add(second)
    plan, seqs = s.schedule()
    assert seqs == [second] and plan.chunks[0].num_new == 98 and second.cached_tokens == 0
    s.advance(seqs, plan)
    s.finish(second)
    assert s.cache.pages_used() == 0 and s.cache.reserved == [0]


def run_prompt(s: Scheduler, sq: Sequence) -> list:
    """Schedule ``sq`` alone until its prompt is computed, then end it; its chunks."""
    s.add(sq)
    chunks = []
    while sq.prefilling:
        plan, seqs = s.schedule()
        chunks += [c for c, q in zip(plan.chunks, seqs) if q is sq]
        s.advance(seqs, plan)
    s.finish(sq)
    return chunks


def test_hybrid_prefix_cut_for_homed_requests_and_not_for_uncached_ones():
    """Short prompts of a hybrid model are homed on one SP rank: a sibling whose shared prefix has no snapshot ends
    its homed chunk where it leaves the cached prompt; a request that does not use the prefix cache (prompt
    logprobs) is not cut; the next sibling starts from the snapshot taken at the cut."""
    cfg = EngineConfig(sp_size=2, page_size=4, chunked_prefill_size=64, sp_min_tokens=64, max_running_requests=4,
                       enable_prefix_cache=True, prefix_cache_snapshots=4)
    s = Scheduler(cfg, 64, 4, max_model_len=1024, has_linear_layers=True, snapshot_slots=4)
    doc = list(range(30))

    def sibling(rid: str, q: int, cache: bool = True) -> Sequence:
        return Sequence(rid, doc + [100 + q] * 5, SamplingParams(max_tokens=1), 2, use_prefix_cache=cache)

    [c] = run_prompt(s, sibling("a", 1))  # snapshot at its prompt end only (35)
    assert c.placement == Placement.HOMED and c.num_new == 35
    uncached = run_prompt(s, sibling("u", 2, cache=False))
    assert [c.num_new for c in uncached] == [35]
    b = sibling("b", 3)
    chunks = run_prompt(s, b)
    assert b.cached_tokens == 0 and [(c.placement, c.num_new) for c in chunks] == [(Placement.HOMED, 30),
                                                                                   (Placement.HOMED, 5)]
    c = sibling("c", 4)
    assert [x.num_new for x in run_prompt(s, c)] == [5] and c.cached_tokens == 30
    assert s.cache.pages_used() == 0 and s.cache.reserved == [0, 0]
