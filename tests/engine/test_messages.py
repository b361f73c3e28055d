"""Rank 0's messages to the workers over the gloo world group (``send_message`` / ``receive_message``): step plans
of every size (one fixed-size broadcast, or a second one beyond ``MESSAGE_BUFFER_BYTES``) and control messages,
received equal on every other rank, in order."""

from __future__ import annotations

from server.engine.worker import MESSAGE_BUFFER_BYTES, receive_message, send_message
from server.forward.plan import ChunkPlan, MemoryStatsRequest, Placement, Shutdown, StepPlan
from server.sp.groups import ParallelState
from tests.sp.sp_testing import run_on_group


def messages() -> list:
    small = StepPlan([ChunkPlan(3, 17, 1, Placement.REPLICATED, 1, True)], [42])
    n = MESSAGE_BUFFER_BYTES  # token ids alone pickle to more than the buffer
    big = StepPlan([ChunkPlan(4, 0, n, Placement.SPLIT, 0, True)], list(range(100_000, 100_000 + n)))
    return [small, big, MemoryStatsRequest(False), small, Shutdown()]


def _check(pstate: ParallelState) -> None:
    sent = messages()
    if pstate.rank == 0:
        for m in sent:
            send_message(pstate, m)
    else:
        got = [receive_message(pstate) for _ in sent]
        assert got == sent, [type(m).__name__ for m in got]


def test_messages_arrive_whole_and_in_order() -> None:
    run_on_group(_check, 3)
