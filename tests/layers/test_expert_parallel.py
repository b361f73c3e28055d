"""Expert-parallel layout rules (no processes): every expert on exactly one rank, every distinct token row
dispatched by exactly one rank of the sp x tp world, in the eager and the static (graph) form."""

from __future__ import annotations

import itertools

import torch

from server.layers.expert_parallel import dispatch_mask, expert_range, row_block, static_pair_capacity
from server.sp.groups import ParallelState


def test_expert_blocks_cover_every_expert_once():
    for experts, ranks in itertools.product((1, 5, 10, 16, 128, 512), (1, 2, 3, 4, 8)):
        blocks = [expert_range(experts, ranks, r) for r in range(ranks)]
        assert [e for a, b in blocks for e in range(a, b)] == list(range(experts))
        sizes = [b - a for a, b in blocks]
        assert max(sizes) - min(sizes) <= 1


def layouts():
    for sp, tp in ((1, 2), (2, 1), (2, 2), (4, 2)):
        yield sp, tp, [ParallelState(sp_size=sp, tp_size=tp, sp_rank=r // tp, tp_rank=r % tp, expert_parallel=True)
                       for r in range(sp * tp)]


def test_eager_rows_dispatched_once():
    """SP rank s holds ``replicated`` rows shared by every SP rank, then ``own[s]`` rows of its own; its TP ranks
    hold the same rows. Row identity: ("rep", i) or (s, i)."""
    for sp, _, ranks in layouts():
        for replicated, own in ((0, [7, 0, 3, 1]), (5, [0, 0, 0, 0]), (3, [2, 9, 1, 4]), (13, [1, 1, 1, 1])):
            seen = []
            for ps in ranks:
                ra, rb = row_block(replicated, ps.world_size, ps.rank)
                la, lb = row_block(own[ps.sp_rank], ps.tp_size, ps.tp_rank)
                seen += [("rep", i) for i in range(ra, rb)] + [(ps.sp_rank, i) for i in range(la, lb)]
            distinct = [("rep", i) for i in range(replicated)] + \
                [(s, i) for s in range(sp) for i in range(own[s])]
            assert sorted(seen, key=str) == sorted(distinct, key=str)


def test_static_rows_dispatched_once_within_capacity():
    """A bucket of B rows: the first ``replicated`` rows are every SP rank's, the rest each SP rank's own."""
    for sp, tp, ranks in layouts():
        for bucket, replicated in ((1, 0), (1, 1), (8, 3), (16, 16), (24, 5)):
            flags = (torch.arange(bucket) < replicated).long() if sp > 1 else None
            seen = []
            for ps in ranks:
                mask = dispatch_mask(bucket, flags, ps)
                assert int(mask.sum()) * 2 <= static_pair_capacity(bucket, tp, 2)  # top-2: every pair has a slot
                seen += [("rep", i) if flags is not None and i < replicated else (ps.sp_rank, i)
                         for i in mask.nonzero().flatten().tolist()]
            rep = replicated if sp > 1 else 0
            distinct = [("rep", i) for i in range(rep)] + [(s, i) for s in range(sp) for i in range(rep, bucket)]
            assert sorted(seen, key=str) == sorted(distinct, key=str)
