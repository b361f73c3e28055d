"""Process groups for sequence x tensor parallelism.

Layout: ``rank = sp_rank * tp_size + tp_rank``. TP groups are the rows of ``arange(W).view(sp, tp)``
(adjacent devices), SP groups are its columns. Every device group has a gloo twin for control messages.
Layers receive a :class:`ParallelState` explicitly; nothing in a layer asks the world for its size.

The rendezvous store (torch's TCPStore, which has no authentication) listens only on the host that
``init_method`` names: the loopback address for one node. On one node gloo and NCCL open their sockets on the
loopback interface too, so nothing the workers open is reachable from the network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    """Ranks and groups of one worker. With ``world_size == 1`` every group is ``None`` and every
    collective below is the identity, so single-device code runs without ``torch.distributed``."""

    sp_size: int = 1
    tp_size: int = 1
    sp_rank: int = 0
    tp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: dist.ProcessGroup | None = None
    sp_group: dist.ProcessGroup | None = None
    world_cpu_group: dist.ProcessGroup | None = None
    # rank 0's step plans and control messages (gloo, no practical timeout: workers wait there while idle)
    message_group: dist.ProcessGroup | None = None
    tp_cpu_group: dist.ProcessGroup | None = None
    sp_cpu_group: dist.ProcessGroup | None = None
    # Global ranks of the members of this rank's SP and TP groups, in group-rank order.
    sp_ranks: tuple[int, ...] = (0,)
    tp_ranks: tuple[int, ...] = (0,)
    # MoE experts stored 1/N per rank over all N = sp x tp ranks (server.layers.expert_parallel), exchanging token
    # rows over ``world_group`` (the device backend, every rank in global-rank order)
    expert_parallel: bool = False
    world_group: dist.ProcessGroup | None = None
    # dense weights (attention projections, dense MLPs, embeddings, LM head) stored 1/sp per rank over the SP group
    # and all-gathered per layer before use over ``weight_group`` (this rank's SP column on the device backend, its
    # own communicator so a prefetch runs beside the layer's SP collectives) (server.layers.dense_weights)
    shard_dense_weights: bool = False
    weight_group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.sp_size * self.tp_size

    @property
    def rank(self) -> int:
        return self.sp_rank * self.tp_size + self.tp_rank

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and returns results."""
        return self.rank == 0

    @property
    def ep_size(self) -> int:
        """Ranks the MoE experts are spread over: every rank with expert parallelism, else 1 (TP-sliced experts)."""
        return self.world_size if self.expert_parallel else 1

    @property
    def dense_shards(self) -> int:
        """Pieces each TP slice of a dense weight is stored in: sp with ``shard_dense_weights``, else 1."""
        return self.sp_size if self.shard_dense_weights else 1

    # ---- world collectives (expert parallelism) --------------------------------------------------
    def world_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over every rank, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.world_group)
        return x

    def world_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's equal-shaped ``x`` stacked along a new leading dim, in rank order."""
        if self.world_size == 1:
            return x.unsqueeze(0)
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.world_group)
        return out.view(self.world_size, *x.shape)

    def world_all_to_all(self, x: torch.Tensor, out_rows: list[int] | None = None,
                         in_rows: list[int] | None = None) -> torch.Tensor:
        """Rank r's ``x`` rows ``in_rows[j]`` go to rank j, which receives ``out_rows[r]`` from r (equal splits of
        dim 0 when both are None)."""
        if self.world_size == 1:
            return x
        out = torch.empty((x.shape[0] if out_rows is None else sum(out_rows), *x.shape[1:]), dtype=x.dtype,
                          device=x.device)
        dist.all_to_all_single(out, x.contiguous(), out_rows, in_rows, group=self.world_group)
        return out

    # ---- tensor-parallel collectives -------------------------------------------------------------
    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate equal-shaped ``x`` of every TP rank along ``dim``."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def tp_reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over TP ranks, each rank keeping its 1/tp slice of dim 0 (which must divide evenly)."""
        if self.tp_size == 1:
            return x
        n = x.shape[0] // self.tp_size
        out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        if x.device.type == "cpu":  # gloo has no reduce_scatter
            dist.all_reduce(x, group=self.tp_group)
            out.copy_(x[self.tp_rank * n : (self.tp_rank + 1) * n])
        else:
            dist.reduce_scatter_tensor(out, x.contiguous(), group=self.tp_group)
        return out

    # ---- sequence-parallel collectives -----------------------------------------------------------
    def sp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the SP group, in place (the same result on every SP rank)."""
        if self.sp_size > 1:
            dist.all_reduce(x, group=self.sp_group)
        return x

    def sp_all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Equal-shaped ``x`` of every SP rank, in SP-rank order."""
        if self.sp_size == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.sp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.sp_group)
        return parts

    def sp_all_gather_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Every SP rank's ``x`` stacked along a new leading dim, gathered straight into one tensor."""
        if self.sp_size == 1:
            return x.unsqueeze(0)
        out = torch.empty((self.sp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.sp_group)
        return out.view(self.sp_size, *x.shape)

    def sp_peer(self, sp_rank: int) -> int:
        """Global rank of the SP peer with the same tp_rank."""
        return self.sp_ranks[sp_rank % self.sp_size]


def _host_port(init_method: str) -> tuple[str, int]:
    url = urllib.parse.urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"the rendezvous address must be tcp://HOST:PORT, got {init_method!r}")
    return url.hostname, url.port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


IDLE_WAIT = datetime.timedelta(days=365 * 10)


def create_store(rank: int, world: int, init_method: str, timeout: datetime.timedelta) -> dist.TCPStore:
    """The rendezvous store; rank 0 serves it on a socket bound to ``init_method``'s host only (torch's own
    server would listen on every interface)."""
    host, port = _host_port(init_method)
    if rank != 0:
        return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=max(128, world))
    return dist.TCPStore(host, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def wait_for_ranks(store: dist.TCPStore, world: int, timeout_s: float, check: Callable[[], None]) -> None:
    """Rank 0: wait until every rank has joined the store, calling ``check`` (which raises if a rank this
    process started has died) between polls, so that a rank that never comes is an error, not a hang."""
    keys = [f"joined/{r}" for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        check()
        if time.monotonic() > deadline:
            missing = [r for r in range(world) if not store.check([f"joined/{r}"])]
            raise TimeoutError(f"ranks {missing} did not join the rendezvous within {timeout_s:g} s")
        time.sleep(0.02)


def init_parallel_state(
    rank: int,
    sp_size: int,
    tp_size: int,
    device: torch.device,
    init_method: str,
    timeout_s: float = 600.0,
    check_ranks: Callable[[], None] | None = None,
    expert_parallel: bool = False,
    shard_dense_weights: bool = False,
) -> ParallelState:
    """Join the world and build the SP/TP groups (device backend + gloo twins).

    Every rank must call this with the same sizes: ``new_group`` is collective over the world. Rank 0 may pass
    ``check_ranks`` (see :func:`wait_for_ranks`). ``expert_parallel``: MoE experts spread over every rank.
    ``shard_dense_weights``: dense weights stored 1/sp per rank (a second device group per SP column gathers them).
    """
    world = sp_size * tp_size
    state = ParallelState(
        sp_size=sp_size, tp_size=tp_size, sp_rank=rank // tp_size, tp_rank=rank % tp_size, device=device,
        expert_parallel=expert_parallel, shard_dense_weights=shard_dense_weights,
    )
    if world == 1:
        return state
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if is_loopback(_host_port(init_method)[0]):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    store = create_store(rank, world, init_method, timeout)
    store.set(f"joined/{rank}", "1")
    if rank == 0 and check_ranks is not None:
        wait_for_ranks(store, world, timeout_s, check_ranks)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    grid = torch.arange(world).view(sp_size, tp_size)
    if expert_parallel:
        state.world_group = dist.new_group(list(range(world)), backend=backend, timeout=timeout)
    state.world_cpu_group = dist.new_group(list(range(world)), backend="gloo", timeout=timeout)
    # Workers block in the message broadcast between steps, for as long as the engine is idle: a finite timeout
    # would end them after that long without a request.
    state.message_group = dist.new_group(list(range(world)), backend="gloo", timeout=IDLE_WAIT)
    for row in grid.tolist():  # TP groups
        dev_g = dist.new_group(row, backend=backend, timeout=timeout)
        cpu_g = dist.new_group(row, backend="gloo", timeout=timeout)
        if rank in row:
            state.tp_group, state.tp_cpu_group, state.tp_ranks = dev_g, cpu_g, tuple(row)
    for col in grid.t().tolist():  # SP groups
        dev_g = dist.new_group(col, backend=backend, timeout=timeout)
        cpu_g = dist.new_group(col, backend="gloo", timeout=timeout)
        weight_g = dist.new_group(col, backend=backend, timeout=timeout) if shard_dense_weights else None
        if rank in col:
            state.sp_group, state.sp_cpu_group, state.sp_ranks = dev_g, cpu_g, tuple(col)
            state.weight_group = weight_g
    return state


def destroy_parallel_state(state: ParallelState) -> None:
    """Release every group of this process, without waiting for the other ranks.

    NCCL's orderly destroy waits for each communicator's peers to destroy theirs too, so a rank that left first
    (or was killed) makes it hang; an abort frees the communicators at once. It is only called between steps, with
    no collective in flight, and leaves the process free to join new groups (a second engine in one process)."""
    if state.world_size > 1 and dist.is_initialized():
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
        else:  # a torch without it: the orderly destroy
            dist.destroy_process_group()
