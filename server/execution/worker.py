"""Worker processes: one per device. Rank 0 lives in the engine; ranks 1..W-1 run :func:`worker_main`."""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from server.config import EngineConfig
from server.execution.model_runner import ModelRunner
from server.execution.procutil import die_with_parent
from server.execution.profiler import RankProfiler
from server.execution.step_profile import PROFILE
from server.forward.plan import MemoryStatsRequest, ProfileRequest, Shutdown, StepPlan
from server.models.loader import read_model_config
from server.sp.groups import ParallelState, destroy_parallel_state, init_parallel_state
from server.sp.ulysses import init_ulysses_mesh

log = logging.getLogger(__name__)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    dev = config.torch_device()
    if dev.type == "cuda":
        local = rank % config.local_world_size
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return dev


_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any engine in this process changed it


def rank_threads(config: EngineConfig) -> int:
    """Intra-op threads of one rank: this node's CPUs shared by its ranks, never more than torch's default (one per
    physical core, or ``OMP_NUM_THREADS``). Every rank's host work (building a step's index tensors, the CPU
    backend's kernels) runs at the same moment, and torch's default in every rank oversubscribes the CPUs: measured
    on 2x H200 (32 CPUs), a question on a cached 131K-token document spent 19 ms in two host tensor ops at sp = 2
    that take 0.6 ms at sp = 1 (docs/architecture.md, "Host threads")."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(_DEFAULT_THREADS, cpus // config.local_world_size))


def setup_rank(config: EngineConfig, rank: int, model_path: str, init_method: str,
               check_ranks: Callable[[], None] | None = None) -> tuple[ParallelState, ModelRunner]:
    """Join the groups (the Ulysses mesh's too), build this rank's model, agree on the cache size with every rank,
    allocate caches.

    Rank 0 passes ``check_ranks`` (raises if a rank it started has died): it is called while rank 0 waits for
    the others, so a rank that fails during start-up is an error at once instead of a wait for the timeout."""
    device = rank_device(config, rank)
    started = time.monotonic()
    every = os.environ.get("SERVER_STACKS_EVERY_S")
    if every:  # a stuck or slow rank shows where it is: every thread's stack on stderr, every N seconds
        faulthandler.dump_traceback_later(float(every), repeat=True)
    pstate = init_parallel_state(rank, config.sp_size, config.tp_size, device, init_method,
                                 check_ranks=check_ranks, expert_parallel=config.enable_expert_parallel,
                                 shard_dense_weights=config.shard_dense_weights)
    mesh = init_ulysses_mesh(pstate, config.ulysses_degree)  # collective: every rank, right after the groups
    joined = time.monotonic()
    torch.set_num_threads(rank_threads(config))
    runner = ModelRunner(config, model_path, read_model_config(model_path), pstate, mesh)
    built = time.monotonic()
    pages = torch.tensor(runner.plan_cache(), dtype=torch.long)  # [KV pages, state snapshots]
    if pstate.world_size > 1:
        work = dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=pstate.world_cpu_group, async_op=True)
        while check_ranks is not None and not work.is_completed():
            check_ranks()
            time.sleep(0.02)
        work.wait()
    runner.allocate_caches(int(pages[0]), int(pages[1]))
    allocated = time.monotonic()
    runner.enable_decode_graphs()
    log.info("rank %d (sp %d, tp %d) memory: %s", rank, pstate.sp_rank, pstate.tp_rank, runner.footprint_line())
    log.info("rank %d started in %.1f s: groups %.1f s, model %.1f s, caches %.1f s, decode graphs %.1f s", rank,
             time.monotonic() - started, joined - started, built - joined, allocated - built,
             time.monotonic() - allocated)
    return pstate, runner


def release_rank(runner: ModelRunner, pstate: ParallelState, timeout: float = 30.0) -> bool:
    """Free this rank's model, caches and CUDA graphs, then its process groups; False if that did not finish in
    ``timeout`` seconds (logged; shutdown goes on without it).

    The graphs go first: a graph that captured collectives holds their communicators. The wait is bounded because
    both parts can block in the driver (a device sync, a communicator teardown) when a peer is gone."""
    done = threading.Event()

    def release() -> None:
        try:
            runner.release()
            destroy_parallel_state(pstate)
        except Exception as e:  # noqa: BLE001 - shutdown goes on; the log says what failed
            log.error("rank %d: releasing its resources failed: %s: %s", pstate.rank, type(e).__name__, e)
        finally:
            done.set()

    threading.Thread(target=release, name="release-rank", daemon=True).start()
    if done.wait(timeout):
        return True
    log.error("rank %d: releasing its graphs and process groups did not finish in %.0f s; shutting down without it",
              pstate.rank, timeout)
    return False


Message = StepPlan | MemoryStatsRequest | ProfileRequest | Shutdown

# Messages travel pickled in one broadcast of a fixed-size buffer on the gloo message group (its first 8 bytes hold
# the length; the group has no practical timeout, so idle workers wait there for as long as it takes); a larger one
# (a long prompt's token ids) follows in a second broadcast of its exact size. A decode step's plan is a few hundred
# bytes to a few KB: one collective per step, where broadcast_object_list takes two.
MESSAGE_BUFFER_BYTES = 1 << 14  # a decode plan of 256 requests is about 8 KB


@functools.cache
def _message_buffer() -> torch.Tensor:
    """The process's message buffer (a broadcast completes before the call returns: reusing it is safe)."""
    return torch.zeros(MESSAGE_BUFFER_BYTES, dtype=torch.uint8)


def receive_message(pstate: ParallelState) -> Message:
    buf = _message_buffer()
    dist.broadcast(buf, src=0, group=pstate.message_group)
    n = int(buf[:8].view(torch.int64)[0])
    if n <= MESSAGE_BUFFER_BYTES - 8:
        return pickle.loads(buf[8 : 8 + n].numpy().tobytes())
    payload = torch.empty(n, dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=pstate.message_group)
    return pickle.loads(payload.numpy().tobytes())


def send_message(pstate: ParallelState, message: Message) -> None:
    """Rank 0: send a step plan or a control message to every other rank (see ``MESSAGE_BUFFER_BYTES``)."""
    if pstate.world_size == 1:
        return
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    buf = _message_buffer()
    buf[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    small = len(data) <= MESSAGE_BUFFER_BYTES - 8
    if small:
        buf[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=pstate.message_group)
    if not small:
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=pstate.message_group)


def memory_stats(pstate: ParallelState, reset: bool, runner: ModelRunner | None = None) -> dict:
    """This rank's device memory: peak allocated since the last reset, and currently allocated (bytes); with
    ``runner``, also what holds it (:meth:`ModelRunner.footprint`: weights, KV cache, state pools, experts)."""
    dev = pstate.device
    out = {"rank": pstate.rank, "sp_rank": pstate.sp_rank, "tp_rank": pstate.tp_rank, "peak_bytes": 0,
           "allocated_bytes": 0}
    if runner is not None:
        out.update(runner.footprint())
    if dev.type != "cuda":
        return out
    out.update(peak_bytes=torch.cuda.max_memory_allocated(dev), allocated_bytes=torch.cuda.memory_allocated(dev))
    if reset:
        torch.cuda.reset_peak_memory_stats(dev)
    return out


def gather_to_driver(pstate: ParallelState, mine: object) -> list | None:
    """Every rank's ``mine``, by rank, on rank 0 (None on the others)."""
    if pstate.world_size == 1:
        return [mine]
    box = [None] * pstate.world_size if pstate.is_driver else None
    dist.gather_object(mine, box, dst=0, group=pstate.world_cpu_group)
    return box


def gather_memory_stats(pstate: ParallelState, reset: bool, runner: ModelRunner | None = None) -> list[dict] | None:
    return gather_to_driver(pstate, memory_stats(pstate, reset, runner))


def profile_rank(profiler: RankProfiler, pstate: ParallelState, request: ProfileRequest) -> list[dict] | None:
    """Start this rank's profiler, or stop it and gather every rank's summary on rank 0."""
    if request.start:
        profiler.start(request)
        return None
    return gather_to_driver(pstate, profiler.stop())


def worker_main(rank: int, config: EngineConfig, model_path: str, init_method: str, log_level: str = "WARNING") -> None:
    """Ranks 1..W-1: run every step rank 0 broadcasts, until it broadcasts :class:`Shutdown`."""
    die_with_parent()
    logging.basicConfig(level=log_level, format=f"[rank {rank}] %(levelname)s %(message)s")
    try:
        pstate, runner = setup_rank(config, rank, model_path, init_method)
        profiler = RankProfiler(rank, pstate.device)
        while True:
            PROFILE.start()
            message = receive_message(pstate)
            if isinstance(message, StepPlan):
                PROFILE.mark("receive") if message.is_decode else PROFILE.cancel()
                runner.run(message)
                PROFILE.mark("rest")
                PROFILE.end()
            elif isinstance(message, MemoryStatsRequest):
                gather_memory_stats(pstate, message.reset, runner)
            elif isinstance(message, ProfileRequest):
                profile_rank(profiler, pstate, message)
            elif isinstance(message, Shutdown):
                if PROFILE.enabled:
                    log.warning("rank %d step profile: %s", rank, PROFILE.table())
                break
            else:
                raise TypeError(f"unexpected control message {type(message).__name__}")
        release_rank(runner, pstate)
    except Exception as e:
        # One line: rank 0 fails the same way (or reports this rank's death); the traceback is for --log-level debug.
        log.error("worker rank %d failed: %s: %s", rank, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        log.debug("%s", traceback.format_exc())
        os._exit(1)
    # Released in order: skip the interpreter's teardown, whose C++ destructors in a process that used gloo
    # sometimes abort (SIGABRT, "terminate called without an active exception") after a clean shutdown.
    logging.shutdown()
    os._exit(0)


def node_ranks(config: EngineConfig) -> range:
    """Global ranks that run on this node."""
    first = config.node_rank * config.local_world_size
    return range(first, first + config.local_world_size)


def run_worker_node(config: EngineConfig, model_path: str, log_level: str = "WARNING") -> int:
    """A node other than node 0 (``--node-rank k > 0``): run this node's ranks until rank 0 ends them.
    Returns 0 if every rank exited cleanly."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(r, config, model_path, config.dist_init_addr, log_level))
             for r in node_ranks(config)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return node_exit_code([p.exitcode for p in procs])


def node_exit_code(codes: list[int | None]) -> int:
    """The node's exit status from its ranks' exit codes: 0 if all are 0, else the first failure's, a rank killed by
    signal N counting as 128 + N as a shell reports it (``Process.exitcode`` is then -N)."""
    for code in codes:
        if code:
            return 128 - code if code < 0 else code
    return 0
