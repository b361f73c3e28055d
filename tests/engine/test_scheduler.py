"""Scheduler placement and admission on rank 0's bookkeeping alone (no model needed)."""

from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.engine.io_struct import RequestRejected
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
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
    plan, _ = s.schedule()
    homes = [st.owner for st in plan.seqs]
    assert all(st.home and not st.split for st in plan.seqs)
    assert sorted(homes) == [0, 0, 1, 1]  # spread over the SP ranks
    for st in plan.seqs:  # all KV of a homed request is on its home rank
        assert sum(n for _, n, _ in st.kv_runs[st.owner]) == 5
        assert all(not runs for r, runs in enumerate(st.kv_runs) if r != st.owner)


def test_long_prompt_is_split_then_decodes_replicated():
    s = make(sp=2, budget=64)
    long = seq("long", 100, 2)
    s.add(long)
    plan, seqs = s.schedule()
    st = plan.seqs[0]
    assert st.split and st.num_new == 64 and not st.sample
    assert [sum(n for _, n, _ in r) for r in st.kv_runs] == [32, 32]  # zigzag halves
    s.advance(seqs, plan)
    plan, seqs = s.schedule()  # the 36-token tail is above the threshold: split too
    assert plan.seqs[0].split and plan.seqs[0].sample
    s.advance(seqs, plan)
    long.output_ids.append(7)
    plan, _ = s.schedule()
    st = plan.seqs[0]
    assert not st.split and not st.home and st.owner == long.decode_rank and st.num_new == 1


def test_unsplittable_budget_defers_instead_of_replicating_a_long_chunk():
    s = make(sp=2, budget=20, sp_min=16)
    for i in range(3):
        s.add(seq(f"short{i}", 3, 2, max_tokens=8))
    s.add(seq("long", 40, 2))
    plan, seqs = s.schedule()
    # 3 short prompts use 9 tokens; the 11 left cannot hold a split chunk of >= 16, so the long prompt waits
    assert [st.rid for st in plan.seqs] == ["short0", "short1", "short2"]
    s.advance(seqs, plan)
    for q in seqs:
        q.output_ids.append(1)
    plan, _ = s.schedule()  # 3 decode tokens leave 17: a split chunk of the long prompt
    long_step = next(st for st in plan.seqs if st.rid == "long")
    assert long_step.split and long_step.num_new == 17


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
        steps.append((plan.seqs[0].num_new, plan.seqs[0].split))
        s.advance(seqs, plan)
    assert steps == [(32, True), (32, True), (32, True), (4, False)]  # the short tail is not split
