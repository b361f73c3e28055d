"""Run a function on every rank of a real SP x TP group: spawned processes on a free local port, gloo on CPU or
NCCL with one GPU per rank."""

from __future__ import annotations

import socket
import sys
import traceback
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from server.sp.groups import ParallelState, destroy_parallel_state, init_parallel_state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[[ParallelState], None], sp: int, tp: int, port: int, device_type: str) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    pstate = init_parallel_state(rank, sp, tp, device, f"tcp://127.0.0.1:{port}", timeout_s=120)
    try:
        fn(pstate)
    except BaseException:
        # spawn reports only the first rank that exits, often a peer that saw this one's socket close
        print(f"rank {rank} (sp {pstate.sp_rank}, tp {pstate.tp_rank}) failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        raise
    finally:
        destroy_parallel_state(pstate)


def run_on_group(fn: Callable[[ParallelState], None], sp: int, tp: int = 1, device_type: str = "cpu") -> None:
    """Call ``fn(pstate)`` on all ``sp * tp`` ranks; an exception on any rank fails the caller.

    ``fn`` must be a module-level function (it is pickled into the spawned processes); ``pstate.device`` is
    the rank's device (``cuda:rank`` with ``device_type="cuda"``).
    """
    mp.spawn(_entry, args=(fn, sp, tp, free_port(), device_type), nprocs=sp * tp, join=True)
