"""Batched local attention over the paged cache (the backends' ``run_batch``) against attention written out here.

The expected result is computed per request from an explicit list of the request's key slots (not from the
batch's CSR arrays) with ``torch.nn.functional.scaled_dot_product_attention`` and a boolean mask, and the LSE
from the scores in fp64. On CPU this checks the metadata and the reference path; on a GPU the same cases run on
flashinfer's ragged / paged prefill and paged decode wrappers in bf16 and fp16, the plan reused across calls.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from server.backends.attention import GATHER_MIN_ROWS, AttentionGeometry, local_kind, make_batch
from server.backends.torch_backend import TorchAttentionBackend
from server.forward.context import LocalEntry
from server.layers.attention import PagedKVCache
from server.sp.groups import ParallelState
from tests.helpers import gpu, needs_flashinfer

PAGE = 16
# kv lengths across page boundaries: 1, page-1, page, page+1, several pages plus a remainder
KV_LENS = [1, PAGE - 1, PAGE, PAGE + 1, 5 * PAGE + 7, 3 * PAGE]


def make_case(kind: str, hq: int, hk: int, d: int, dtype, seed: int):
    """A step with one batch of ``kind``: requests with shuffled (non-contiguous) pages, q rows interleaved with
    rows of other requests so that the batch's rows are not one range."""
    g = torch.Generator().manual_seed(seed)
    kv_lens = KV_LENS if kind != "ragged" else [1, 7, PAGE + 3, 40]
    if kind == "decode":
        q_lens = [1] * len(kv_lens)
    elif kind == "ragged":
        q_lens = list(kv_lens)
    elif kind.endswith("_causal"):  # the queries are the last rows of the request's KV
        q_lens = [min(n, m) for n, m in zip(kv_lens, [1, 3, PAGE, 2, 30, 9], strict=True)]
    else:
        q_lens = [1, 4, 2, PAGE + 1, 11, 5]
    num_pages = sum(math.ceil(n / PAGE) for n in kv_lens) + 5
    perm = torch.randperm(num_pages, generator=g).tolist()
    k_cache = torch.randn(num_pages, PAGE, hk, d, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, PAGE, hk, d, generator=g).to(dtype)
    total_rows = 2 * sum(q_lens)
    q_all = torch.randn(total_rows, hq, d, generator=g).to(dtype)
    k_all = torch.randn(total_rows, hk, d, generator=g).to(dtype)
    v_all = torch.randn(total_rows, hk, d, generator=g).to(dtype)
    entries, row, used = [], 1, 0
    for nq, nk in zip(q_lens, kv_lens, strict=True):
        n_pages = math.ceil(nk / PAGE)
        pages = perm[used : used + n_pages] + [perm[-1]]  # a page table may be longer than needed
        used += n_pages
        entries.append(LocalEntry(row, nq, pages, nk, stores=kind != "paged_full" and kind != "gathered_full"))
        row += nq + 1  # a row of another request in between
    return entries, (q_all, k_all, v_all), (k_cache, v_cache)


def expected(kind: str, entries, qkv, caches, scale: float):
    q_all, k_all, v_all = (t.double() for t in qkv)
    k_cache, v_cache = (t.double().flatten(0, 1) for t in caches)
    outs, lses = [], []
    for e in entries:
        rows, pages, nk = list(range(e.row_start, e.row_start + e.num_rows)), e.pages, e.kv_len
        q = q_all[rows]
        nq = len(rows)
        if kind == "ragged":
            k, v = k_all[rows], v_all[rows]
        else:
            slots = [pages[i // PAGE] * PAGE + i % PAGE for i in range(nk)]
            k, v = k_cache[slots], v_cache[slots]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if kind == "ragged" or kind.endswith("_causal"):  # query i sits at position nk - nq + i
            mask = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]
        else:
            mask = torch.ones(nq, nk, dtype=torch.bool)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale).transpose(0, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        lse = torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1).T / math.log(2)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


class Cache(PagedKVCache):
    """The layer's page cache over given K/V pages."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.k_scale, self.v_scale = k, v, 1.0, 1.0


def backend_for(device: str, hq: int, hk: int, d: int, dtype, scale: float):
    pstate = ParallelState(device=torch.device(device))
    if device == "cpu":
        return TorchAttentionBackend(pstate, PAGE)
    from server.backends.flashinfer_backend import FlashInferAttentionBackend

    return FlashInferAttentionBackend(pstate, PAGE, AttentionGeometry(hq, hk, d, scale), dtype)


def run_batch(kind, entries, qkv, caches, scale, device, backend=None):
    batch = make_batch(kind, PAGE, entries, torch.device(device))
    q_all, k_all, v_all = (t.to(device) for t in qkv)
    cache = Cache(*(t.to(device) for t in caches))
    backend = backend or backend_for(device, q_all.shape[1], k_all.shape[1], q_all.shape[2], q_all.dtype, scale)
    backend.plan_batches([batch])
    return batch, backend, backend.run_batch(batch, batch.take(q_all), batch.take(k_all), batch.take(v_all), cache,
                                             scale)


KINDS = ["ragged", "gathered_causal", "gathered_full", "paged_causal", "paged_full", "decode"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_batch_matches_explicit_attention_fp32(kind: str, heads) -> None:
    hq, hk = heads
    entries, qkv, caches = make_case(kind, hq, hk, 16, torch.float32, seed=len(kind) + hq)
    _, _, (o, lse) = run_batch(kind, entries, qkv, caches, 0.25, "cpu")
    eo, else_ = expected(kind, entries, qkv, caches, 0.25)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), eo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), else_, atol=1e-5, rtol=1e-5)


def test_contiguous_rows_are_a_view_and_metadata_is_csr() -> None:
    entries = [LocalEntry(0, 3, [7, 3], 6, True), LocalEntry(3, 1, [5, 9, 2], 9, True)]
    b = make_batch("paged_causal", 4, entries, torch.device("cpu"))
    assert b.row_range == (0, 4)
    x = torch.arange(10.0)
    assert b.take(x).data_ptr() == x.data_ptr()
    assert b.qo_indptr.tolist() == [0, 3, 4]
    assert b.kv_indptr.tolist() == [0, 2, 5]
    assert b.kv_indices.tolist() == [7, 3, 5, 9, 2]
    assert b.last_page_len.tolist() == [2, 1]


def test_local_kind() -> None:
    assert local_kind(1, 50, stores=False) == local_kind(1, 50, stores=True) == "decode"
    assert local_kind(300, 300, stores=True) == "ragged"  # no KV before this step
    assert local_kind(GATHER_MIN_ROWS, 900, stores=True) == "gathered_causal"
    assert local_kind(GATHER_MIN_ROWS - 1, 900, stores=True) == "paged_causal"
    assert local_kind(GATHER_MIN_ROWS, 900, stores=False) == "gathered_full"
    assert local_kind(5, 900, stores=False) == "paged_full"


@pytest.mark.parametrize(
    ("kind", "entries", "message"),
    [
        ("decode", [LocalEntry(0, 2, [0], 2, True)], "one query"),
        ("ragged", [LocalEntry(0, 2, [], 3, True)], "their own rows"),
        ("paged_full", [LocalEntry(0, 1, [0], 40, False)], "shorter than its kv_len"),
        ("paged_full", [LocalEntry(0, 1, [0], 0, False)], "at least one"),
        ("sliding", [LocalEntry(0, 1, [0], 1, False)], "unknown"),
    ],
)
def test_bad_batches_are_refused(kind, entries, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_batch(kind, 16, entries, torch.device("cpu"))


@gpu
@needs_flashinfer
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_batch_matches_explicit_attention(kind: str, dtype) -> None:
    """32 query / 8 KV heads of dim 128; the plan made by the first call serves a second call (another layer)."""
    entries, qkv, caches = make_case(kind, 32, 8, 128, dtype, seed=3)
    scale = 128**-0.5
    batch, backend, (o, lse) = run_batch(kind, entries, qkv, caches, scale, "cuda")
    eo, else_ = expected(kind, entries, qkv, caches, scale)
    assert o.dtype == dtype and lse.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(o.double().cpu(), eo, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double().cpu(), else_, atol=tol, rtol=tol)
    # a second "layer" with other data reuses the plan
    _, qkv2, caches2 = make_case(kind, 32, 8, 128, dtype, seed=4)
    q2, k2, v2 = (t.cuda() for t in qkv2)
    o2, _ = backend.run_batch(batch, batch.take(q2), batch.take(k2), batch.take(v2),
                              Cache(caches2[0].cuda(), caches2[1].cuda()), scale)
    eo2, _ = expected(kind, entries, qkv2, caches2, scale)
    torch.testing.assert_close(o2.double().cpu(), eo2, atol=tol, rtol=tol)
