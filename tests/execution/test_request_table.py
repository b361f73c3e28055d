"""Every rank's request mirror, updated only by the plans' changes, equals a full rebuild from the scheduler's own
bookkeeping (every request's runs on every SP rank, its pages on this rank, its slot) after random sequences of
admissions (on cached prefixes too), chunked and split prefills, decodes, finishes and aborts, for every
placement."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from server.config import EngineConfig
from server.control.scheduler import Scheduler
from server.control.sequence import Sequence
from server.execution.request_table import RequestTable
from server.forward.plan import Placement
from server.sampling_params import SamplingParams

SLOTS, PAGE = 12, 4


def check_mirrors(tables: list[RequestTable], sched: Scheduler, known: set[int]) -> None:
    running = {s.req: s for s in sched.running if s.req in known}
    for t in tables:
        assert set(t.requests) == set(running), (set(t.requests), set(running))
        for req, seq in running.items():
            st = t.requests[req]
            assert st.slot == seq.slot
            assert st.runs == seq.kv_runs
            assert st.shard_lens == [seq.shard_len(r) for r in range(t.sp_size)]
            assert t.pages(req).tolist() == seq.pages[t.sp_rank]
            assert t.device_pages(req).tolist() == seq.pages[t.sp_rank]
            if t.window_table is not None:  # the window layers' pages, given-back ones as NULL_PAGE
                assert t.window_pages(req).tolist() == seq.window_pages[t.sp_rank]
                assert t.device_window_pages(req).tolist() == seq.window_pages[t.sp_rank]


@pytest.mark.parametrize("sp", [1, 2, 4])
@pytest.mark.parametrize("seed,window", [(0, None), (1, None), (0, 10), (1, 5)])
def test_mirrors_equal_a_full_rebuild(sp: int, seed: int, window: int | None) -> None:
    """``window``: a model with a window page group (its pages given back as requests pass them)."""
    rng = random.Random(seed)
    cfg = EngineConfig(sp_size=sp, page_size=PAGE, chunked_prefill_size=24, sp_min_tokens=16,
                       max_running_requests=SLOTS)
    sched = Scheduler(cfg, 512, SLOTS, max_model_len=1024, window=window)
    tables = [RequestTable(sp, r, SLOTS + 1, 1024 // PAGE + 2, PAGE, torch.device("cpu"), windowed=bool(window))
              for r in range(sp)]
    freed = 0
    known: set[int] = set()  # requests some plan has named: the workers know them
    placements: set[Placement] = set()
    for step in range(120):
        for _ in range(rng.choice([0, 0, 1, 2])):
            n = rng.choice([3, 9, 15, 40, 77, 130])
            sched.add(Sequence(f"q{step}-{n}", [1] * n, SamplingParams(max_tokens=rng.randint(1, 12)), sp))
        if sched.running and rng.random() < 0.1:  # an abort, at any stage of the request
            sched.finish(rng.choice(sched.running))
        plan, seqs = sched.schedule()
        if not plan.chunks:
            continue
        plan = pickle.loads(pickle.dumps(plan))  # what the workers receive
        for t in tables:
            t.apply(plan)
        known |= {s.req for s in plan.started}
        placements |= {c.placement for c in plan.chunks}
        freed += sum(len(f) for c in plan.chunks for f in c.window_freed)
        sched.advance(seqs, plan)
        check_mirrors(tables, sched, known)
        for q, c in zip(seqs, plan.chunks):
            if c.sample:
                q.output_ids.append(1)
                if len(q.output_ids) >= q.params.max_tokens:
                    sched.finish(q)
    expected = {Placement.HOMED} if sp == 1 else set(Placement)
    assert placements == expected
    assert sched.cache.prefix.hit_tokens > 0  # requests started on cached prefixes (pages and runs up front)
    for t in tables:  # nothing else lingers in the table rows of live requests
        for st in t.requests.values():
            assert np.all(t.device_table[st.slot, : st.num_pages].numpy() == t.page_table[st.slot, : st.num_pages])
    assert (freed > 0) == bool(window)
    # every reference taken is given back: with the requests ended and the cache flushed, every page is free
    for seq in list(sched.running) + list(sched.waiting):
        sched.finish(seq)
    sched.cache.flush()
    assert [sched.cache.free_count(r) for r in range(sp)] == [sched.cache.usable_pages] * sp
