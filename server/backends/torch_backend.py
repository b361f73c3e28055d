"""The plain-torch attention backend: the reference every other backend is checked against (any device, any dtype).

:func:`batch_attention_ref` locates keys through the same arrays the flashinfer kernels read (``kv_indptr``,
``kv_indices``, ``last_page_len``; ``gather_slots`` for gathered kinds), so running it checks them too.
"""

from __future__ import annotations

import math

import torch

from server.backends.attention import AttentionBackend, AttentionBatch, GraphShape
from server.kernels import ops
from server.kernels.attention_ref import attention_with_lse_ref
from server.kernels.fp8 import take_rows


def batch_attention_ref(batch: AttentionBatch, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, dequantize=None,
                        window: int | None = None, q_pos: torch.Tensor | None = None,
                        pos_cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on the position-mask reference. q ``[rows, Hq, D]`` (the batch's rows, in order); k/v the
    batch's rows of the step (read by ``ragged`` only); caches ``[pages, page_size, Hk, D]``, their rows turned into
    q's dtype by ``dequantize(k, v, dtype)`` where given (FP8 pages). With a sliding ``window`` the mask uses true
    positions: ``q_pos`` ``[rows]`` and the keys' from ``pos_cache`` ``[pages, page_size]`` (ragged: the rows'
    own). Returns ``(o, lse base 2)``."""
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
            ks, vs = take_rows(flat_k, slots), take_rows(flat_v, slots)
            if dequantize is not None:
                ks, vs = dequantize(ks, vs, q.dtype)
        nk = ks.shape[0]
        if window is not None:
            qp = q_pos[qo[i] : qo[i + 1]]
            kp = qp if batch.kind == "ragged" else pos_cache.flatten()[slots]
            o, lse = attention_with_lse_ref(qs, ks, vs, qp, kp, scale, window)
            outs.append(o)
            lses.append(lse)
            continue
        k_pos = torch.arange(nk, device=q.device)
        # Bottom-right causal: query i is at position nk - nq + i; full: every query after every key.
        qp = torch.arange(nk - nq, nk, device=q.device) if batch.causal else torch.full((nq,), nk, device=q.device)
        o, lse = attention_with_lse_ref(qs, ks, vs, qp, k_pos, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


class TorchAttentionBackend(AttentionBackend):
    """Attention on the plain-torch references (any device, any dtype): CPU runs and tests."""

    name = "torch"

    def run_batch(self, batch, q, k, v, cache, scale, window=None, q_pos=None):
        return batch_attention_ref(batch, q, k, v, cache.k, cache.v, scale, cache.dequantize, window, q_pos,
                                   cache.pos if window is not None else None)

    def attention_runs(self, q, k, v, q_runs, k_runs, scale, window=None):
        return ops.attention_runs(q, k, v, q_runs, k_runs, scale, window)

    def graph_backends(self, shapes: list[GraphShape], max_pages: int) -> dict[GraphShape, AttentionBackend]:
        """Decode shapes: :class:`TorchGraphDecode` over static buffers (capturable). Extend shapes: this backend, on
        the padded batch's CSR arrays (host work: run eagerly, never captured)."""
        return {s: TorchGraphDecode(self, s.rows, max_pages) if s.decode else self for s in shapes}


class TorchGraphDecode(AttentionBackend):
    """Decode batches of one CUDA-graph bucket on the reference, over static device buffers: every row's page
    table (padded to ``max_pages``) and KV length. Planning copies them in; the attention itself has no host work,
    so it can be captured (fp32 models on a GPU, and the graph form on any device)."""

    name = "torch-graph"
    capturable = True

    def __init__(self, parent: TorchAttentionBackend, bucket: int, max_pages: int):
        super().__init__(parent.pstate, parent.page_size)
        dev = parent.pstate.device
        self.pages = torch.zeros(bucket, max_pages, dtype=torch.long, device=dev)
        self.window_pages = torch.zeros_like(self.pages)  # a window page group: the window layers' pages
        self.windowed = False
        self.kv_lens = torch.ones(bucket, dtype=torch.long, device=dev)

    def plan_batches(self, batches: list[AttentionBatch]) -> None:
        if [b.kind for b in batches] != ["decode"] or len(batches[0].q_lens) != self.pages.shape[0]:
            raise ValueError(f"a CUDA-graph step runs one decode batch of {self.pages.shape[0]} rows")
        b = batches[0]
        ptr = b.kv_indptr.tolist()
        self.windowed = b.window_kv_indices is not None
        for indices, buffer in ((b.kv_indices, self.pages), (b.window_kv_indices, self.window_pages)):
            if indices is None:
                continue
            table = torch.zeros(self.pages.shape, dtype=torch.long)
            for i in range(len(b.q_lens)):
                table[i, : ptr[i + 1] - ptr[i]] = indices[ptr[i] : ptr[i + 1]]
            buffer.copy_(table)
        self.kv_lens.copy_(torch.tensor(b.kv_lens))

    def run_batch(self, batch, q, k, v, cache, scale, window=None, q_pos=None):
        b, hq, d = q.shape
        hk, page = cache.k.shape[2], self.page_size
        pages = self.window_pages if window is not None and self.windowed else self.pages
        slots = (pages[:, :, None] * page + torch.arange(page, device=q.device)).flatten(1)  # [B, L]
        ks, vs = cache.dequantize(*cache.rows(slots), torch.float32)
        ks, vs = ks.float(), vs.float()  # [B, L, Hk, D]
        s = torch.einsum("bhrd,blhd->bhrl", q.float().view(b, hk, hq // hk, d), ks) * scale
        visible = torch.arange(slots.shape[1], device=q.device)[None, :] < self.kv_lens[:, None]  # [B, L]
        if window is not None:  # keys by their stored positions; a shard may hold none in the window
            visible &= cache.pos.flatten()[slots] > q_pos[:, None] - window
        s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        o = torch.einsum("bhrl,blhd->bhrd", torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]), vs)
        return o.reshape(b, hq, vs.shape[-1]).to(q.dtype), (lse / math.log(2)).reshape(b, hq)
