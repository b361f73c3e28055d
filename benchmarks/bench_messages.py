"""Latency of rank 0's step messages to the workers: ``send_message`` (one fixed-size gloo broadcast) against
``torch.distributed.broadcast_object_list`` (two broadcasts), two ranks on this host, a decode plan of ``--batch``
requests. Prints the median receive-side time per message of each.

    python benchmarks/bench_messages.py --batch 1 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from server.execution.procutil import free_port  # noqa: E402
from server.execution.worker import receive_message, send_message  # noqa: E402
from server.forward.plan import ChunkPlan, Placement, StepPlan  # noqa: E402
from server.sp.groups import destroy_parallel_state, init_parallel_state  # noqa: E402


def decode_plan(batch: int) -> StepPlan:
    return StepPlan([ChunkPlan(i, 2048, 1, Placement.REPLICATED, i % 2, True) for i in range(batch)],
                    list(range(1000, 1000 + batch)))


def _rank(rank: int, port: int, batches: list[int], n: int) -> None:
    pstate = init_parallel_state(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}")
    for batch in batches:
        plan = decode_plan(batch)
        for name in ("send_message", "broadcast_object_list"):
            times = []
            for _ in range(n):
                dist.barrier(group=pstate.world_cpu_group)
                t0 = time.perf_counter()
                if name == "send_message":
                    send_message(pstate, plan) if rank == 0 else receive_message(pstate)
                else:
                    box = [plan] if rank == 0 else [None]
                    dist.broadcast_object_list(box, src=0, group=pstate.world_cpu_group)
                times.append(time.perf_counter() - t0)
            if rank == 1:
                print(f"batch {batch:4}  {name:22} median {sorted(times)[n // 2] * 1e6:7.0f} us", flush=True)
    destroy_parallel_state(pstate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--messages", type=int, default=300)
    args = ap.parse_args()
    mp.spawn(_rank, args=(free_port(), args.batch, args.messages), nprocs=2, join=True)


if __name__ == "__main__":
    main()
