"""What every layer of one forward pass reads: the rank's rows of the step and the step's metadata, prepared once.

The model runner builds a :class:`ForwardContext` per step from the plan and its request mirror
(:mod:`server.execution.step_builder`): the local rows (token ids, global positions), the softmax-attention work
(:class:`AttentionStepMeta`, which the attention backend prepares once: plans, index tensors) and the
linear-attention work (:class:`LinearStepMeta`). Layers only read it; nothing in a layer builds metadata or plans
kernels. A decode step run by a CUDA graph uses the same types over static buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.runs import Run
from server.sp.groups import ParallelState
from server.sp.ulysses import UlyssesMesh


@dataclass
class UlyssesRuns:
    """How a split request's attention runs on a U x R mesh (U > 1): the new tokens by Ulysses x ring, the cached
    prefix by the pass-KV ring over the whole SP group. Each SP rank's new rows are the last rows of its shard."""

    new_runs: list[list[Run]]  # per SP rank: its new rows (relative to its first row of the request)
    prefix_runs: list[list[Run]]  # per SP rank: its shard's first rows, cached before this step (may be empty)

    @property
    def has_prefix(self) -> bool:
        """Some SP rank holds cached KV of the request (the same answer on every rank)."""
        return any(n for runs in self.prefix_runs for _, n, _ in runs)


@dataclass
class RingEntry:
    """A split request (sp > 1): its local rows attend to every SP rank's KV shard by the pass-KV ring, or, when
    ``ulysses`` is set, to the new tokens by Ulysses x ring and to the cached prefix by the pass-KV ring."""

    row_start: int
    num_rows: int
    q_runs: list[Run]  # rows relative to row_start
    kv_runs: list[list[Run]]  # per SP rank: its shard after this step
    page_table: torch.Tensor  # this rank's pages of the request (device, long)
    shard_len: int  # rows of this rank's shard
    ulysses: UlyssesRuns | None = None
    # per SP rank: its new rows of the request (relative to its first new row); the window halo reads them
    q_runs_per_rank: list[list[Run]] = field(default_factory=list)
    window_page_table: torch.Tensor | None = None  # this rank's window-layer pages (a window page group)

    @property
    def prefix_len(self) -> int:
        """Rows of this rank's shard stored before this step (the new rows follow them)."""
        return self.shard_len - self.num_rows


@dataclass
class LocalEntry:
    """A request whose local rows attend only to this rank's KV (the backend picks the kernel kind)."""

    row_start: int
    num_rows: int
    pages: list[int]  # this rank's page table of the request
    kv_len: int  # rows of this rank's KV shard, the new rows included when ``stores``
    stores: bool  # this rank stores the new rows' KV (they are the last ``num_rows`` of the shard)
    window_pages: list[int] | None = None  # the window layers' page table (a window page group; rows as ``pages``)


@dataclass
class AttentionStepMeta:
    """This rank's softmax-attention work in one step, shared by every softmax layer."""

    write_rows: torch.Tensor | slice | None  # local rows whose K/V this rank stores (a slice: one contiguous run) ...
    write_slots: torch.Tensor | None  # ... and their flat cache slots (page * page_size + offset)
    window_write_slots: torch.Tensor | None = None  # their slots in the window layers' pages (a window page group)
    ring: list[RingEntry] = field(default_factory=list)
    local: list[LocalEntry] = field(default_factory=list)
    # Rows whose partial results are merged over SP by LSE (replicated queries over SP-sharded KV). Eager steps:
    # the rows, in the same request order on every SP rank. Graph steps: a 0/1 flag per row (merge_mask).
    merge_rows: torch.Tensor | None = None
    merge_mask: torch.Tensor | None = None
    ring_mode: str = "ring"


@dataclass
class SplitLinearEntry:
    """A split request's local rows for linear attention: its two zigzag chunks back to back."""

    row_start: int
    num_rows: int
    chunks: list[tuple[int, int, int]]  # (row_start relative, length, chunk index)
    chunk_lens: list[int]  # all 2P chunk lengths
    slot: int
    ulysses: bool = False  # computed on the U x R mesh (U > 1): all-to-all to heads, state passing across rings


@dataclass
class LinearStepMeta:
    """This rank's linear-attention (lightning, GDN) work in one step: split requests run LASP / GDN state passing;
    every other request with rows here continues from its pooled state, as one varlen call or, when each has one
    row (``all_decode``), the decode kernels."""

    zero_slots: torch.Tensor | None  # slots of requests that start in this step: cleared first
    split: list[SplitLinearEntry]
    local_rows: torch.Tensor | None  # rows of the other requests, request after request (device, long)
    local_slots: torch.Tensor | None  # their state slots
    local_cu: torch.Tensor | None  # cu_seqlens over local_rows (device, int32)
    all_decode: bool
    mode: str = "ring"  # LASP / GDN state passing: "ring" or "allgather"


class AttentionRunner(Protocol):
    """The step's prepared softmax attention (:mod:`server.backends`): one call per layer."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, scale: float) -> torch.Tensor: ...


@dataclass
class ForwardContext:
    """What every layer of one forward pass reads. ``mesh``: the SP group as a U x R Ulysses mesh (the model runner's),
    which linear layers use for split entries marked ``ulysses``."""

    pstate: ParallelState
    input_ids: torch.Tensor  # [T] local rows (padded to a multiple of tp when seq_sharded, to a bucket in graphs)
    positions: torch.Tensor  # [T]
    num_rows: int  # real rows (T before padding)
    seq_sharded: bool  # the residual stream holds this TP rank's 1/tp of the rows
    attention: AttentionRunner | None
    linear: LinearStepMeta | None
    mesh: UlyssesMesh | None = None
    # Every row is computed identically on every SP rank (a decode step of replicated requests): a dense MLP may
    # split its intermediate over the SP ranks, each reading 1/P of its weights (models.common.GatedMLP)
    split_mlp: bool = False
    # Rows every SP rank holds (replicated requests; sp > 1), which expert parallelism dispatches once over the
    # world: eager steps, the count of the leading rows that are; graph-form steps (``static_shapes``), a 0/1 flag
    # per row. ``static_shapes``: a padded step in the CUDA-graph form (no host syncs, fixed shapes)
    replicated_rows: int = 0
    replicated_mask: torch.Tensor | None = None
    static_shapes: bool = False
    shared: dict = field(default_factory=dict)  # values the layers derive once per forward (RoPE's cos/sin)
