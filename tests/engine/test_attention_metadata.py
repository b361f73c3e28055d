"""The step's attention metadata, driven by the real scheduler, against causal attention over whole requests.

For every step of several request mixes, every SP rank builds its ``AttentionMetadata`` from the plan, writes its
cache through the metadata's write slots, runs its local batches on the reference (which reads the same CSR
arrays and gather slots as the flashinfer kernels), and the replicated rows are merged over the SP ranks in
``merge_rows`` order. Every row that does not go through the ring must equal attention of its query to all
keys of its request at positions <= its own. Queries, keys and values are functions of (request, position),
so the expected result is computed without the engine.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.config import EngineConfig
from server.engine.context import build_forward_context
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.kernels.attention_ref import attention_with_lse_ref
from server.kernels.merge_state_ref import merge_states_ref
from server.kernels.paged_attention import GATHER_MIN_ROWS, batch_attention_ref
from server.sampling_params import SamplingParams
from server.sp.groups import ParallelState

H, D, PAGE, SCALE = 2, 8, 4, 0.3


def vec(name: str, rid: str, pos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((name, rid, pos)) % 2**31)
    return torch.randn(H, D, generator=g)


def expected_row(q: torch.Tensor, rid: str, pos: int) -> torch.Tensor:
    ks = torch.stack([vec("k", rid, j) for j in range(pos + 1)])
    vs = torch.stack([vec("v", rid, j) for j in range(pos + 1)])
    return attention_with_lse_ref(q[None], ks, vs, torch.tensor([pos]), torch.arange(pos + 1), SCALE)[0][0]


def run_mix(sp: int, prompts: list[int], sp_min: int, budget: int, max_tokens: int = 3) -> set[str]:
    """Serve the prompts to the end; check every non-ring row of every step on every rank. Returns the kinds."""
    cfg = EngineConfig(sp_size=sp, page_size=PAGE, chunked_prefill_size=budget, sp_min_tokens=sp_min,
                       max_running_requests=16)
    sched = Scheduler(cfg, 2048, 16, max_model_len=4096)
    for i, n in enumerate(prompts):
        sched.add(Sequence(f"r{i}", [1] * n, SamplingParams(max_tokens=max_tokens), sp))
    caches = [(torch.zeros(2048, PAGE, H, D), torch.zeros(2048, PAGE, H, D)) for _ in range(sp)]
    kinds: set[str] = set()
    while sched.has_unfinished():
        plan, seqs = sched.schedule()
        assert plan.seqs, "the scheduler made no progress"
        ranks = []
        for r in range(sp):
            ctx = build_forward_context(plan, ParallelState(sp_size=sp, sp_rank=r), PAGE)
            meta = ctx.attn
            rows = [(ls.step.rid, int(ctx.positions[ls.row_start + i])) for ls in ctx.seqs for i in range(ls.num_rows)]
            q, k, v = (torch.stack([vec(n, *rp) for rp in rows]) if rows else torch.zeros(0, H, D) for n in "qkv")
            kc, vc = caches[r]
            if meta.write_rows is not None:
                kc.flatten(0, 1)[meta.write_slots] = k[meta.write_rows]
                vc.flatten(0, 1)[meta.write_slots] = v[meta.write_rows]
            out, lse = torch.zeros_like(q), torch.full(q.shape[:2], -math.inf)
            for b in meta.batches:
                kinds.add(b.kind)
                if b.gathered:
                    assert min(b.q_lens) >= GATHER_MIN_ROWS
                out[b.rows], lse[b.rows] = batch_attention_ref(b, b.take(q), b.take(k), b.take(v), kc, vc, SCALE)
            ring = {i for ls in meta.ring_seqs for i in range(ls.row_start, ls.row_start + ls.num_rows)}
            ranks.append((meta, rows, q, out, lse, ring))
        merge = [m.merge_rows for m, *_ in ranks]
        assert all(x is None for x in merge) or all(x is not None for x in merge)
        if merge[0] is not None:  # the same requests and positions, in the same order, on every SP rank
            ids = [[rows[i] for i in m.tolist()] for m, (_, rows, *_) in zip(merge, ranks)]
            assert all(x == ids[0] for x in ids)
            o, _ = merge_states_ref(torch.stack([out[m] for m, (*_, out, _, _) in zip(merge, ranks)]),
                                    torch.stack([lse[m] for m, (*_, lse, _) in zip(merge, ranks)]))
            for m, (*_, out, _, _) in zip(merge, ranks):
                out[m] = o
        for _, rows, q, out, _, ring in ranks:
            for i, (rid, pos) in enumerate(rows):
                if i not in ring:
                    torch.testing.assert_close(out[i], expected_row(q[i], rid, pos), atol=1e-5, rtol=1e-5)
        sched.advance(seqs, plan)
        for s, st in zip(seqs, plan.seqs):
            if st.sample:
                s.output_ids.append(2)
                if len(s.output_ids) >= max_tokens:
                    sched.finish(s)
    return kinds


@pytest.mark.parametrize("sp", [1, 2, 4])
def test_local_rows_equal_attention_over_the_whole_request(sp: int) -> None:
    kinds = set()
    # short prompts homed or local; long prompts split, then continued by replicated tail chunks of 150 rows
    # (gathered kinds) and 30 rows (paged kinds); chunked prefills after a cached prefix; decodes
    kinds |= run_mix(sp, [37, 5, 11, 1], sp_min=8, budget=20)
    kinds |= run_mix(sp, [450, 3], sp_min=200, budget=300)
    kinds |= run_mix(sp, [330], sp_min=200, budget=300)
    kinds |= run_mix(sp, [140, 2], sp_min=300, budget=140)
    expected = {"ragged", "decode", "paged_causal", "gathered_causal"}
    if sp > 1:
        expected |= {"paged_full", "gathered_full"}
    assert expected <= kinds, kinds
