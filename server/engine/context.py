"""Per-step metadata shared by every layer of one forward pass.

The scheduler (rank 0) decides a :class:`StepPlan`; every rank receives the same plan and turns it into its own
:class:`ForwardContext` (its local rows, KV write slots, page tables) with :func:`build_forward_context`.

Placement of a request's new tokens in a step (DESIGN 5):
- ``split``: zigzag over the SP group (2P chunks; rank r computes chunks r and 2P-1-r). KV stays where it is
  computed. Softmax layers use the ring, lightning layers LASP.
- ``home``: a short request lives on one SP rank (``owner``), which computes and stores all of it; the other
  SP ranks have no rows for it and run no collective for it.
- otherwise (the tail chunk and the decode tokens of an SP request): every SP rank computes all new tokens
  (replicated queries); only the ``owner`` SP rank stores their KV. Softmax layers attend to each rank's local
  shard and merge over SP; lightning layers continue from the state every SP rank holds after LASP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.kernels.ops import Run
from server.kernels.paged_attention import KINDS, AttentionBatch, local_kind, make_batch
from server.sp.groups import ParallelState
from server.sp.partition import zigzag_chunks


@dataclass
class SeqStep:
    """One request's share of a step, identical on every rank."""

    rid: str
    slot: int  # state-pool slot (lightning layers); same on every rank
    start: int  # tokens already in the caches = global position of the first new token
    token_ids: list[int]  # the new tokens
    split: bool
    owner: int  # SP rank that stores the new KV when not split
    kv_runs: list[list[Run]]  # per SP rank: runs of its KV shard after this step (rows in shard order)
    pages: list[list[int]]  # per SP rank: page table of its KV shard after this step
    sample: bool  # the last new token is sampled (its logits are computed on SP rank 0)
    home: bool = False  # the whole request lives on SP rank ``owner``

    @property
    def holder(self) -> int:
        """SP rank holding the hidden state of the last new token (split: chunk 2P-1 is rank 0's)."""
        return self.owner if self.home else 0

    @property
    def num_new(self) -> int:
        return len(self.token_ids)


@dataclass
class StepPlan:
    seqs: list[SeqStep]
    seq_sharded: bool = False  # residual stream sharded over TP (long SP prefills)
    zero_slots: list[int] = field(default_factory=list)  # state slots of requests starting fresh
    all_logits: bool = False  # return logits of every new token (prompt scoring), not just the sampled ones


@dataclass
class LocalSeq:
    """This rank's view of one request in the step."""

    step: SeqStep
    row_start: int  # first row of this request in the rank's local batch
    num_rows: int
    q_runs: list[Run]  # rows relative to row_start
    chunks: list[tuple[int, int, int]]  # (row_start rel., length, chunk index) when split
    chunk_lens: list[int]  # all 2P chunk lengths when split
    stores: bool  # this rank stores the KV of the request's new rows
    page_table: torch.Tensor | None  # this rank's pages for the request (ring requests: the shard is read back)
    shard_len: int  # rows of this rank's KV shard after the step


@dataclass
class AttentionMetadata:
    """This rank's softmax-attention work in one step, built once and shared by every softmax layer."""

    write_rows: torch.Tensor | None  # local rows whose K/V this rank stores ...
    write_slots: torch.Tensor | None  # ... and their flat cache slots
    ring_seqs: list[LocalSeq]  # split requests (sp > 1): pass-KV ring over the SP group, one by one
    batches: list[AttentionBatch]  # everything else, one batch per kind (server.kernels.paged_attention)
    merge_rows: torch.Tensor | None  # replicated rows, merged over SP by LSE; same order on every SP rank


@dataclass
class ForwardContext:
    pstate: ParallelState
    plan: StepPlan
    seqs: list[LocalSeq]
    input_ids: torch.Tensor  # [T] local rows (padded to a multiple of tp when seq_sharded)
    positions: torch.Tensor  # [T]
    num_rows: int  # T before padding
    page_size: int
    attn: AttentionMetadata | None = None
    zero_slots: torch.Tensor | None = None  # state slots to clear before this step (fresh requests)
    ring_mode: str = "ring"
    lasp_mode: str = "ring"

    @property
    def seq_sharded(self) -> bool:
        return self.plan.seq_sharded


def _runs(pieces: list[tuple[int, int]]) -> list[Run]:
    """Runs for rows that hold the given (pos_start, pos_end) pieces back to back; empty pieces dropped."""
    out: list[Run] = []
    row = 0
    for s, e in pieces:
        if e > s:
            out.append((row, e - s, s))
            row += e - s
    return out


def build_forward_context(plan: StepPlan, pstate: ParallelState, page_size: int, ring_mode: str = "ring",
                          lasp_mode: str = "ring") -> ForwardContext:
    dev = pstate.device
    r = pstate.sp_rank
    p = pstate.sp_size
    ids: list[int] = []
    pos: list[int] = []
    seqs: list[LocalSeq] = []
    for st in plan.seqs:
        n = st.num_new
        if st.split:
            chunks = zigzag_chunks(n, p)
            mine = [(chunks[r], r), (chunks[2 * p - 1 - r], 2 * p - 1 - r)]
            pieces = [(st.start + a, st.start + b) for (a, b), _ in mine]
            local_chunks, row = [], 0
            for (a, b), c in mine:
                local_chunks.append((row, b - a, c))
                row += b - a
            chunk_lens = [b - a for a, b in chunks]
            stores = True
        elif st.home and st.owner != r:
            pieces, local_chunks, chunk_lens, stores = [], [], [], False
        else:
            pieces = [(st.start, st.start + n)]
            local_chunks, chunk_lens = [], []
            stores = st.owner == r
        q_runs = _runs(pieces)
        num_rows = sum(e - s for s, e in pieces)
        for s, e in pieces:
            ids.extend(st.token_ids[s - st.start : e - st.start])
            pos.extend(range(s, e))
        shard_len = sum(length for _, length, _ in st.kv_runs[r])
        ring = st.split and p > 1
        page_table = torch.tensor(st.pages[r], dtype=torch.long, device=dev) if ring and num_rows else None
        seqs.append(LocalSeq(st, len(pos) - num_rows, num_rows, q_runs, local_chunks, chunk_lens,
                             stores and num_rows > 0, page_table, shard_len))
    num_rows = len(ids)
    if plan.seq_sharded:
        pad = (-num_rows) % pstate.tp_size
        ids += [0] * pad
        pos += [0] * pad
    return ForwardContext(
        pstate=pstate, plan=plan, seqs=seqs,
        input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
        positions=torch.tensor(pos, dtype=torch.long, device=dev),
        num_rows=num_rows, page_size=page_size, ring_mode=ring_mode, lasp_mode=lasp_mode,
        attn=build_attention_metadata(seqs, pstate, page_size),
        zero_slots=torch.tensor(plan.zero_slots, dtype=torch.long, device=dev) if plan.zero_slots else None,
    )


def build_attention_metadata(seqs: list[LocalSeq], pstate: ParallelState, page_size: int) -> AttentionMetadata:
    """Sort the step's requests into the ring, the per-kind local batches and the SP merge (see
    :mod:`server.layers.attention`), and compute every KV write slot, all on the host, once per step."""
    dev, r, p = pstate.device, pstate.sp_rank, pstate.sp_size
    write_rows: list[int] = []
    write_slots: list[torch.Tensor] = []
    ring_seqs: list[LocalSeq] = []
    entries: dict[str, list] = {kind: [] for kind in KINDS}
    merge_rows: list[int] = []
    for ls in seqs:
        st = ls.step
        if ls.num_rows == 0:  # homed on another SP rank
            continue
        rows = list(range(ls.row_start, ls.row_start + ls.num_rows))
        pages = st.pages[r]
        if ls.stores:  # the new rows are the last rows of the shard
            write_rows += rows
            shard_rows = torch.arange(ls.shard_len - ls.num_rows, ls.shard_len)
            table = torch.tensor(pages[: ls.shard_len // page_size + 1], dtype=torch.long)
            write_slots.append(table[shard_rows // page_size] * page_size + shard_rows % page_size)
        if st.split and p > 1:
            ring_seqs.append(ls)
            continue
        if p > 1 and not st.split and not st.home:  # replicated queries over SP-sharded KV
            merge_rows += rows
        if ls.shard_len == 0:  # no keys here: (o, lse) = (0, -inf)
            continue
        kind = local_kind(ls.num_rows, ls.shard_len, ls.stores)
        entries[kind].append((rows, pages, ls.shard_len))

    def tensor(values: list[int]) -> torch.Tensor | None:
        return torch.tensor(values, dtype=torch.long, device=dev) if values else None

    return AttentionMetadata(
        write_rows=tensor(write_rows), write_slots=torch.cat(write_slots).to(dev) if write_slots else None,
        ring_seqs=ring_seqs,
        batches=[make_batch(kind, page_size, e, dev) for kind, e in entries.items() if e],
        merge_rows=tensor(merge_rows),
    )
