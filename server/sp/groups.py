"""Process groups for sequence x tensor parallelism.

Layout: ``rank = sp_rank * tp_size + tp_rank``. TP groups are the rows of ``arange(W).view(sp, tp)``
(adjacent devices), SP groups are its columns. Every device group has a gloo twin for control messages.
Layers receive a :class:`ParallelState` explicitly; nothing in a layer asks the world for its size.
"""

from __future__ import annotations

import datetime
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
    tp_cpu_group: dist.ProcessGroup | None = None
    sp_cpu_group: dist.ProcessGroup | None = None
    # Global ranks of the members of this rank's SP and TP groups, in group-rank order.
    sp_ranks: tuple[int, ...] = (0,)
    tp_ranks: tuple[int, ...] = (0,)

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
    def sp_all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Equal-shaped ``x`` of every SP rank, in SP-rank order."""
        if self.sp_size == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.sp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.sp_group)
        return parts

    def sp_peer(self, sp_rank: int) -> int:
        """Global rank of the SP peer with the same tp_rank."""
        return self.sp_ranks[sp_rank % self.sp_size]


def init_parallel_state(
    rank: int,
    sp_size: int,
    tp_size: int,
    device: torch.device,
    init_method: str,
    timeout_s: float = 600.0,
) -> ParallelState:
    """Join the world and build the SP/TP groups (device backend + gloo twins).

    Every rank must call this with the same sizes: ``new_group`` is collective over the world.
    """
    world = sp_size * tp_size
    state = ParallelState(
        sp_size=sp_size, tp_size=tp_size, sp_rank=rank // tp_size, tp_rank=rank % tp_size, device=device
    )
    if world == 1:
        return state
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    grid = torch.arange(world).view(sp_size, tp_size)
    state.world_cpu_group = dist.new_group(list(range(world)), backend="gloo", timeout=timeout)
    for row in grid.tolist():  # TP groups
        dev_g = dist.new_group(row, backend=backend, timeout=timeout)
        cpu_g = dist.new_group(row, backend="gloo", timeout=timeout)
        if rank in row:
            state.tp_group, state.tp_cpu_group, state.tp_ranks = dev_g, cpu_g, tuple(row)
    for col in grid.t().tolist():  # SP groups
        dev_g = dist.new_group(col, backend=backend, timeout=timeout)
        cpu_g = dist.new_group(col, backend="gloo", timeout=timeout)
        if rank in col:
            state.sp_group, state.sp_cpu_group, state.sp_ranks = dev_g, cpu_g, tuple(col)
    return state


def destroy_parallel_state(state: ParallelState) -> None:
    if state.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
