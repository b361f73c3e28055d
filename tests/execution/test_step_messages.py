"""Rank 0's messages to the workers over the gloo message group (``send_message`` / ``receive_message``): step plans
of every size (one fixed-size broadcast, or a second one beyond ``MESSAGE_BUFFER_BYTES``, sizes around the limit)
and control messages, received equal on every other rank, in order; and a worker waits for the next message for
longer than the groups' collective timeout (an idle server)."""

from __future__ import annotations

import pickle
import time

import torch
import torch.multiprocessing as mp

from server.execution.procutil import free_port
from server.execution.worker import MESSAGE_BUFFER_BYTES, receive_message, send_message
from server.forward.plan import ChunkPlan, MemoryStatsRequest, Placement, Shutdown, StepPlan
from server.sp.groups import ParallelState, destroy_parallel_state, init_parallel_state
from tests.helpers import exit_rank, run_on_group


def messages() -> list:
    small = StepPlan([ChunkPlan(3, 17, 1, Placement.REPLICATED, 1, True)], [42])
    n = MESSAGE_BUFFER_BYTES  # token ids alone pickle to more than the buffer
    big = StepPlan([ChunkPlan(4, 0, n, Placement.SPLIT, 0, True)], list(range(100_000, 100_000 + n)))
    # pickled sizes around the buffer's payload limit (MESSAGE_BUFFER_BYTES - 8): one under, at, one over
    def size(k: int) -> int:
        return len(pickle.dumps(StepPlan(token_ids=[100_000] * k), protocol=pickle.HIGHEST_PROTOCOL))

    limit = MESSAGE_BUFFER_BYTES - 8
    k = next(k for k in range(limit // 5 - 200, limit) if size(k) >= limit)  # the first that does not fit
    assert size(k - 1) < limit <= size(k)
    edge = [StepPlan(token_ids=[100_000] * j) for j in (k - 1, k, k + 1)]
    return [small, big, MemoryStatsRequest(False), *edge, small, Shutdown()]


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


def _idle(rank: int, port: int) -> None:
    pstate = init_parallel_state(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", timeout_s=2)
    try:
        if rank == 0:
            time.sleep(5)  # longer than the groups' 2 s timeout
            send_message(pstate, Shutdown())
        else:
            assert isinstance(receive_message(pstate), Shutdown)
    finally:
        destroy_parallel_state(pstate)
    exit_rank()


def test_an_idle_worker_waits_past_the_collective_timeout() -> None:
    mp.spawn(_idle, args=(free_port(),), nprocs=2, join=True)


class _Releasable:
    """Stands in for a model runner whose release blocks in the driver (what a dead NCCL peer can cause on a GPU,
    and which a CPU cannot reproduce): only ``release`` is called."""

    def __init__(self, block_s: float):
        self.block_s = block_s
        self.released = False

    def release(self) -> None:
        time.sleep(self.block_s)
        self.released = True


def test_release_rank_is_bounded(caplog):
    """Shutdown frees a rank's graphs and groups within a time bound: a release that blocks is left behind with an
    error in the log instead of hanging the shutdown; one that finishes reports so."""
    from server.execution.worker import release_rank

    pstate = ParallelState()  # one rank: no groups to release
    quick = _Releasable(0.0)
    assert release_rank(quick, pstate, timeout=5.0) and quick.released
    stuck = _Releasable(3.0)
    started = time.monotonic()
    assert not release_rank(stuck, pstate, timeout=0.3)
    assert time.monotonic() - started < 2.0 and not stuck.released
    assert "did not finish" in caplog.text


def test_shutdown_frees_the_weights_without_the_cyclic_collector(tmp_path):
    """The modules hold reference cycles (a parameter's weight_loader is a bound method of its module): shutdown
    collects them itself, so the next engine in the process gets the memory back. With the automatic collector off,
    every parameter must be gone once the engine has shut down."""
    import gc
    import weakref

    from server import LLM, SamplingParams
    from tests.helpers import save_tiny_model

    llm = LLM(save_tiny_model("llama", str(tmp_path)), dtype="float32", device="cpu", max_model_len=256)
    llm.generate([list(range(40))], SamplingParams(max_tokens=2))
    params = [weakref.ref(p) for p in llm.engine.runner.model.parameters()]
    assert params
    gc.disable()
    try:
        llm.shutdown()
        alive = sum(r() is not None for r in params)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(params)} parameters outlived the shutdown"
