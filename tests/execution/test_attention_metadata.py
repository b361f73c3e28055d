"""The step's attention metadata, driven by the real scheduler, against causal attention over whole requests.

For every step of several request mixes, every SP rank applies the plan to its request mirror, builds its step
rows (:func:`build_step_rows`, split entries marked for a Ulysses mesh; for decode steps also the padded CUDA-graph
form), writes its cache through the metadata's write slots, runs its local batches on the reference (which reads
the same CSR arrays and gather slots as the flashinfer kernels), and the replicated rows are merged over the SP
ranks (``merge_rows`` order, or ``merge_mask`` in the padded form). Every row that does not go through the ring
must equal attention of its query to all keys of its request at positions <= its own. Queries, keys and values are
functions of (request, position), so the expected result is computed without the engine. Split entries' Ulysses
runs must cut every rank's shard into its cached prefix and its new rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.backends.attention import GATHER_MIN_ROWS, decode_batch, sort_into_batches
from server.backends.torch_backend import batch_attention_ref
from server.config import EngineConfig
from server.control.scheduler import Scheduler
from server.control.sequence import Sequence
from server.execution.request_table import RequestTable
from server.execution.step_builder import build_padded_decode, build_step_rows
from server.kernels.attention_ref import attention_with_lse_ref
from server.kernels.merge_state_ref import merge_states_ref
from server.runs import runs_rows, runs_to_positions
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


SLOTS = 16


def _eager_view(rows):
    """(row ids, write rows, write slots, batches, ring rows, merge rows) of an eager step."""
    meta = rows.attention
    pos = rows.positions.tolist()
    ids = [(f"r{lc.chunk.req}", pos[lc.row_start + i]) for lc in rows.chunks for i in range(lc.num_rows)]
    ring = {i for e in meta.ring for i in range(e.row_start, e.row_start + e.num_rows)}
    merge = meta.merge_rows if meta.merge_rows is not None else torch.zeros(0, dtype=torch.long)
    return (ids, meta.write_rows, meta.write_slots, sort_into_batches(meta.local, PAGE, torch.device("cpu")), ring,
            merge)


def _graph_view(step):
    """The same for a padded graph step: every row writes, one decode batch, the merge by flag."""
    n, bucket = step.num_rows, step.inputs.shape[1]
    ids = [(f"r{lc.chunk.req}", int(step.inputs[1, lc.row_start])) for lc in step.chunks if lc.num_rows]
    ids += [("pad", 0)] * (bucket - n)
    batch = decode_batch(PAGE, step.kv_indptr, step.kv_indices, step.last_page_len, step.kv_lens)
    return (ids, torch.arange(bucket), torch.from_numpy(step.inputs[2]), [batch], set(),
            torch.nonzero(torch.from_numpy(step.inputs[4])).flatten())


def _rank_step(view, kc, vc, kinds: set[str]):
    """One rank's local attention of a step on the reference: (row ids, q, out, lse, ring rows, merge rows)."""
    ids, write_rows, write_slots, batches, ring, merge = view
    q, k, v = (torch.stack([vec(n, *rp) for rp in ids]) if ids else torch.zeros(0, H, D) for n in "qkv")
    if write_rows is not None:
        kc.flatten(0, 1)[write_slots] = k[write_rows]
        vc.flatten(0, 1)[write_slots] = v[write_rows]
    out, lse = torch.zeros_like(q), torch.full(q.shape[:2], -math.inf)
    for b in batches:
        kinds.add(b.kind)
        if b.gathered:
            assert min(b.q_lens) >= GATHER_MIN_ROWS
        o_b, lse_b = batch_attention_ref(b, b.take(q), b.take(k), b.take(v), kc, vc, SCALE)
        b.put(out, o_b)
        b.put(lse, lse_b)
    return ids, q, out, lse, ring, merge


def _check_step(ranks) -> None:
    merge = [m for *_, m in ranks]
    if len(merge[0]):  # the same requests and positions, in the same order, on every SP rank
        keys = [[ids[i] for i in m.tolist()] for m, (ids, *_) in zip(merge, ranks)]
        assert all(x == keys[0] for x in keys)
        o, _ = merge_states_ref(torch.stack([out[m] for m, (_, _, out, *_) in zip(merge, ranks)]),
                                torch.stack([lse[m] for m, (_, _, _, lse, *_) in zip(merge, ranks)]))
        for m, (_, _, out, *_) in zip(merge, ranks):
            out[m] = o
    for ids, q, out, _, ring, _ in ranks:
        for i, (rid, pos) in enumerate(ids):
            if i not in ring and rid != "pad":
                torch.testing.assert_close(out[i], expected_row(q[i], rid, pos), atol=1e-5, rtol=1e-5)


def _check_ulysses_runs(steps) -> None:
    """Split entries on a Ulysses mesh: every rank's new rows as that rank computes them, and every rank's cached
    prefix, which its new rows follow in its shard (split requests have rows on every rank, in the same order)."""
    cpu = torch.device("cpu")
    for r, rows in enumerate(steps):
        starts = {lc.row_start: lc.chunk.start for lc in rows.chunks}
        for i, e in enumerate(rows.attention.ring):
            uly = e.ulysses
            assert runs_rows(uly.prefix_runs[r]) == e.prefix_len and uly.has_prefix == (starts[e.row_start] > 0)
            for s, (prefix, new, shard) in enumerate(zip(uly.prefix_runs, uly.new_runs, e.kv_runs, strict=True)):
                assert new == steps[s].attention.ring[i].q_runs
                assert torch.equal(torch.cat([runs_to_positions(prefix, cpu), runs_to_positions(new, cpu)]),
                                   runs_to_positions(shard, cpu))


def run_mix(sp: int, prompts: list[int], sp_min: int, budget: int, max_tokens: int = 3) -> set[str]:
    """Serve the prompts to the end; check every non-ring row of every step on every rank, and every decode step
    in its padded CUDA-graph form too. Returns the kinds."""
    cfg = EngineConfig(sp_size=sp, page_size=PAGE, chunked_prefill_size=budget, sp_min_tokens=sp_min,
                       max_running_requests=SLOTS)
    sched = Scheduler(cfg, 2048, SLOTS, max_model_len=4096)
    for i, n in enumerate(prompts):
        sched.add(Sequence(f"r{i}", [1] * n, SamplingParams(max_tokens=max_tokens), sp))
    caches = [(torch.zeros(2048, PAGE, H, D), torch.zeros(2048, PAGE, H, D)) for _ in range(sp)]
    pstates = [ParallelState(sp_size=sp, sp_rank=r) for r in range(sp)]
    tables = [RequestTable(sp, r, SLOTS + 1, 4096 // PAGE, PAGE, torch.device("cpu")) for r in range(sp)]
    kinds: set[str] = set()
    while sched.has_unfinished():
        plan, seqs = sched.schedule()
        assert plan.chunks, "the scheduler made no progress"
        for t in tables:
            t.apply(plan)
        if plan.is_decode:  # the graph form first: it must leave the caches exactly as the eager form does
            bucket = max(8, len(plan.chunks))
            padded = [build_padded_decode(plan, t, ps, bucket, SLOTS) for t, ps in zip(tables, pstates)]
            saved = [(kc.clone(), vc.clone()) for kc, vc in caches]
            _check_step([_rank_step(_graph_view(step), *c, kinds) for step, c in zip(padded, caches)])
            for (kc, vc), (k0, v0) in zip(caches, saved):
                kc[1:], vc[1:] = k0[1:], v0[1:]  # undo the writes (page 0 is the scratch page)
        steps = [build_step_rows(plan, t, ps, ulysses_degree=sp) for t, ps in zip(tables, pstates)]
        _check_step([_rank_step(_eager_view(rows), *c, kinds) for rows, c in zip(steps, caches)])
        _check_ulysses_runs(steps)
        if sp > 1:  # --ulysses-layers linear: the softmax entries of the plain ring, the linear ones on the mesh
            linear_only = build_step_rows(plan, tables[0], pstates[0], ulysses_degree=sp, ulysses_layers="linear")
            plain = build_step_rows(plan, tables[0], pstates[0])
            assert [e.ulysses for e in linear_only.attention.ring] == [None] * len(plain.attention.ring)
            assert len(linear_only.attention.ring) == len(steps[0].attention.ring)
            assert [e.ulysses for e in linear_only.linear.split] == [e.ulysses for e in steps[0].linear.split]
            assert all(e.ulysses for e in steps[0].linear.split)
        sched.advance(seqs, plan)
        for q, c in zip(seqs, plan.chunks):
            if c.sample:
                q.output_ids.append(2)
                if len(q.output_ids) >= max_tokens:
                    sched.finish(q)
    return kinds


@pytest.mark.parametrize("sp", [1, 2, 4])
def test_local_rows_equal_attention_over_the_whole_request(sp: int) -> None:
    kinds = set()
    # short prompts homed or local; long prompts split, then continued by replicated tail chunks of 150 rows
    # (gathered kinds) and 30 rows (paged kinds); chunked prefills after a cached prefix; decodes
    kinds |= run_mix(sp, [37, 5, 11, 1], sp_min=8, budget=20)
    # a split chunk takes sp x budget tokens; the tail after it (130 or 30 rows) is replicated (or, at sp = 1, a
    # chunk after a cached prefix)
    kinds |= run_mix(sp, [sp * 150 + 130, 3], sp_min=200, budget=150)
    kinds |= run_mix(sp, [sp * 150 + 30], sp_min=200, budget=150)
    kinds |= run_mix(sp, [140, 2], sp_min=300, budget=140)
    kinds |= run_mix(sp, [sp * 20 + 9], sp_min=8, budget=10)  # split chunks after split chunks (a cached prefix)
    expected = {"ragged", "decode", "paged_causal", "gathered_causal"}
    if sp > 1:
        expected |= {"paged_full", "gathered_full"}
    assert expected <= kinds, kinds
