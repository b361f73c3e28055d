"""Batched attention of a step's local queries to their requests' KV: one kernel launch per mask kind.

This covers every request a rank attends to without a ring: all requests at sp = 1, requests homed on this SP
rank, and the replicated rows (tail chunk, decode tokens) of SP requests. Each request of a batch is an entry
(its query rows, its KV on this rank) of one kind:

- ``ragged``: the rank had none of the request's KV before this step and stores the new rows: the queries attend
  causally to the step's own k/v rows, taken from the projection output (no cache read);
- ``*_causal``: the queries are the last rows of the request's KV on this rank, after a cached prefix:
  bottom-right aligned causal mask;
- ``*_full``: every query sees every key (replicated queries on an SP rank that does not store them: all of its
  keys come earlier);
- ``decode``: one query per request, which sees every key in the pages.

``paged_*`` kinds read K/V from the pages inside the kernel. ``gathered_*`` kinds first copy the entries' pages
into contiguous K/V (one gather per layer over slot indices built once per step) and run the ragged kernel:
with many query rows per entry (a prefill chunk after a cached prefix) that is faster than flashinfer's paged
kernel at page size 16, while for a few query rows the paged kernel avoids the extra copy (see
``benchmarks/results/kernels_h200.md``). :func:`local_kind` picks the kind.

The host metadata (CSR arrays) is built once per step. On CUDA with flashinfer, each kind runs on its batch
wrapper (ragged prefill, paged prefill, paged decode), planned when the step's first softmax layer runs and
reused by all the others; elsewhere the same metadata drives the plain-torch reference.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from server.kernels.attention_ref import attention_with_lse_ref

KINDS = ("ragged", "gathered_causal", "gathered_full", "paged_causal", "paged_full", "decode")
GATHER_MIN_ROWS = 64  # entries with at least this many query rows read a gathered copy of their KV
WORKSPACE_BYTES = 256 << 20  # flashinfer's split-KV scratch, shared by all wrappers of a device

_serial = itertools.count()


@dataclass
class AttentionBatch:
    """The entries of one kind in one step. ``rows`` are local query rows, entry by entry; for ``ragged`` the
    same rows hold the entry's keys. ``kv_indptr``/``kv_indices``/``last_page_len`` describe the pages."""

    kind: str
    page_size: int
    q_lens: list[int]
    rows: torch.Tensor  # [sum(q_lens)] long, on the device
    row_range: tuple[int, int] | None  # (start, end) when rows are one contiguous range
    qo_indptr: torch.Tensor  # int32, host
    kv_indptr: torch.Tensor  # int32, host: pages (ragged: rows) per entry
    kv_indices: torch.Tensor  # int32, host: page ids
    last_page_len: torch.Tensor  # int32, host
    kv_lens: list[int]
    gather_slots: torch.Tensor | None = None  # gathered kinds: flat cache slots of every entry's KV, in order
    serial: int = field(default_factory=lambda: next(_serial))

    @property
    def causal(self) -> bool:
        return self.kind == "ragged" or self.kind.endswith("_causal")

    @property
    def gathered(self) -> bool:
        return self.kind.startswith("gathered_")

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This batch's rows of a step tensor (a view when they are contiguous)."""
        if self.row_range is not None:
            return x[self.row_range[0] : self.row_range[1]]
        return x[self.rows]

    def put(self, x: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` into this batch's rows of ``x``."""
        if self.row_range is not None:
            x[self.row_range[0] : self.row_range[1]] = values
        else:
            x[self.rows] = values


def _int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _indptr(lengths: list[int]) -> torch.Tensor:
    return _int32([0, *itertools.accumulate(lengths)])


def local_kind(num_rows: int, shard_len: int, stores: bool) -> str:
    """The kind of an entry with ``num_rows`` query rows and ``shard_len`` KV rows on this rank (the query rows'
    own KV included when this rank ``stores`` them, as the last rows)."""
    if num_rows == 1:
        return "decode"
    if stores and shard_len == num_rows:
        return "ragged"
    source = "gathered" if num_rows >= GATHER_MIN_ROWS else "paged"
    return f"{source}_{'causal' if stores else 'full'}"


def make_batch(kind: str, page_size: int, entries: list[tuple[list[int], list[int], int]],
               device: torch.device) -> AttentionBatch:
    """``entries``: ``(query rows, page table, kv_len)`` per request. For ``ragged`` the page table is unused
    and ``kv_len`` equals the number of query rows (the keys are those rows)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention batch kind {kind!r}")
    rows = list(itertools.chain.from_iterable(e[0] for e in entries))
    q_lens = [len(e[0]) for e in entries]
    kv_lens = [e[2] for e in entries]
    if any(n <= 0 for n in kv_lens) or any(n <= 0 for n in q_lens):
        raise ValueError("every entry needs at least one query and one key")
    if kind == "decode" and any(n != 1 for n in q_lens):
        raise ValueError("decode entries have one query each")
    gather_slots = None
    if kind == "ragged":
        if q_lens != kv_lens:
            raise ValueError("ragged entries attend to their own rows")
        pages, n_pages, last = _int32([]), kv_lens, kv_lens
    else:
        n_pages = [-(-n // page_size) for n in kv_lens]
        if any(len(e[1]) < p for e, p in zip(entries, n_pages, strict=True)):
            raise ValueError("a page table is shorter than its kv_len")
        pages = _int32(list(itertools.chain.from_iterable(e[1][:p] for e, p in zip(entries, n_pages, strict=True))))
        last = [n - (p - 1) * page_size for n, p in zip(kv_lens, n_pages, strict=True)]
        if kind.startswith("gathered_"):  # every page's slots, cut to each entry's kv_len
            slots = (pages.long()[:, None] * page_size + torch.arange(page_size)).flatten()
            firsts = [0, *itertools.accumulate(n_pages)][:-1]
            gather_slots = torch.cat([slots[f * page_size : f * page_size + n]
                                      for f, n in zip(firsts, kv_lens, strict=True)]).to(device)
    contiguous = bool(rows) and rows == list(range(rows[0], rows[0] + len(rows)))
    return AttentionBatch(
        kind=kind, page_size=page_size, q_lens=q_lens,
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        row_range=(rows[0], rows[0] + len(rows)) if contiguous else None,
        qo_indptr=_indptr(q_lens), kv_indptr=_indptr(n_pages), kv_indices=pages,
        last_page_len=_int32(last), kv_lens=kv_lens, gather_slots=gather_slots,
    )


def batch_attention_ref(batch: AttentionBatch, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float):
    """The batch on the position-mask reference. q ``[rows, Hq, D]`` (the batch's rows, in order); k/v the
    batch's rows of the step (read by ``ragged`` only); caches ``[pages, page_size, Hk, D]``. Returns
    ``(o, lse base 2)``. Keys are located through the arrays the flashinfer kernels read (``kv_indptr``,
    ``kv_indices``, ``last_page_len``; ``gather_slots`` for gathered kinds), so this checks them too."""
    outs, lses = [], []
    qo, kvp = batch.qo_indptr.tolist(), batch.kv_indptr.tolist()
    last = batch.last_page_len.tolist()
    flat_k = k_cache.flatten(0, 1)
    flat_v = v_cache.flatten(0, 1)
    gathered_start = 0
    for i, nq in enumerate(batch.q_lens):
        qs = q[qo[i] : qo[i + 1]]
        if batch.kind == "ragged":
            ks, vs = k[qo[i] : qo[i + 1]], v[qo[i] : qo[i + 1]]
        else:
            pages = batch.kv_indices[kvp[i] : kvp[i + 1]].to(device=k_cache.device, dtype=torch.long)
            nk = (len(pages) - 1) * batch.page_size + last[i]
            if batch.gathered:
                slots = batch.gather_slots[gathered_start : gathered_start + nk]
                gathered_start += nk
            else:
                slots = (pages[:, None] * batch.page_size + torch.arange(batch.page_size, device=pages.device))
                slots = slots.flatten()[:nk]
            ks, vs = flat_k[slots], flat_v[slots]
        nk = ks.shape[0]
        k_pos = torch.arange(nk, device=q.device)
        # Bottom-right causal: query i is at position nk - nq + i; full: every query after every key.
        q_pos = torch.arange(nk - nq, nk, device=q.device) if batch.causal else torch.full((nq,), nk, device=q.device)
        o, lse = attention_with_lse_ref(qs, ks, vs, q_pos, k_pos, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


# ---------------------------------------------------------------------------------------------------- flashinfer

_workspaces: dict[torch.device, torch.Tensor] = {}
_wrappers: dict[tuple[torch.device, str], object] = {}


def release_wrappers(device: torch.device) -> None:
    """Drop this device's flashinfer wrappers and workspace (the engine releases its memory)."""
    for key in [key for key in _wrappers if key[0] == device]:
        del _wrappers[key]
    _workspaces.pop(device, None)


def _wrapper(kind: str, device: torch.device):
    from server.kernels.flashinfer_attention import flashinfer_module

    key = (device, kind)
    if key not in _wrappers:
        fi = flashinfer_module()
        if device not in _workspaces:
            _workspaces[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        ws = _workspaces[device]
        if kind == "ragged" or kind.startswith("gathered_"):
            w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, kv_layout="NHD")
        elif kind == "decode":
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, kv_layout="NHD", use_tensor_cores=True)
        else:
            w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout="NHD")
        w.planned_for = None
        _wrappers[key] = w
    return _wrappers[key]


def batch_attention_flashinfer(batch: AttentionBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float):
    """:func:`batch_attention_ref` on flashinfer's batch wrappers. The wrapper of the batch's kind is planned
    once for (this batch, these shapes) and reused by every later call with the same key. Runs in inference
    mode, where the engine runs: the wrappers' buffers are updated in place by every plan."""
    with torch.inference_mode():
        return _batch_attention_flashinfer(batch, q, k, v, k_cache, v_cache, scale)


def _batch_attention_flashinfer(batch: AttentionBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float):
    hq, d = q.shape[1], q.shape[2]
    hk = k_cache.shape[2]
    w = _wrapper(batch.kind, q.device)
    key = (batch.serial, hq, hk, d, q.dtype, scale)
    if w.planned_for != key:
        common = dict(q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=scale)
        if batch.kind == "ragged":
            w.plan(batch.qo_indptr, batch.kv_indptr, hq, hk, d, causal=True, **common)
        elif batch.gathered:
            w.plan(batch.qo_indptr, _indptr(batch.kv_lens), hq, hk, d, causal=batch.causal, **common)
        elif batch.kind == "decode":
            w.plan(batch.kv_indptr, batch.kv_indices, batch.last_page_len, hq, hk, d, batch.page_size, **common)
        else:
            w.plan(batch.qo_indptr, batch.kv_indptr, batch.kv_indices, batch.last_page_len, hq, hk, d,
                   batch.page_size, causal=batch.causal, **common)
        w.planned_for = key
    if batch.kind == "ragged":  # k/v may be strided views of a fused projection
        return w.run(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
    if batch.gathered:
        flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
        return w.run(q.contiguous(), flat_k[batch.gather_slots], flat_v[batch.gather_slots], return_lse=True)
    return w.run(q.contiguous(), (k_cache, v_cache), return_lse=True)
