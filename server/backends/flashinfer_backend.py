"""flashinfer attention backend (CUDA, fp16/bf16): batch wrappers planned once per step, and their CUDA-graph
form for decode.

Each kind of :mod:`server.backends.attention` runs on one wrapper: ragged prefill for ``ragged`` and
``gathered_*`` (the gathered KV is contiguous), paged prefill for ``paged_*``, paged decode (tensor-core GQA path,
``return_lse``) for ``decode``. :meth:`FlashInferAttentionBackend.plan_batches` plans every kind present in the
step before the first layer runs; every layer then only launches kernels. The ring's blocks run
``single_prefill_with_kv_cache`` per causal / full piece (:mod:`server.kernels.flashinfer_attention`).

For CUDA graphs, one decode wrapper per batch-size bucket is built over fixed index buffers
(``use_cuda_graph=True``); :meth:`plan_graph_decode` refills them before each replay.
"""

from __future__ import annotations

import torch

from server.backends.attention import KINDS, AttentionBackend, AttentionBatch, AttentionGeometry, indptr
from server.kernels.flashinfer_attention import (
    FLASHINFER_HEAD_DIMS,
    attention_runs_flashinfer,
    flashinfer_module,
)

WORKSPACE_BYTES = 256 << 20  # flashinfer's split-KV scratch, shared by all wrappers of a device


def flashinfer_takes(geometry: AttentionGeometry, dtype: torch.dtype) -> str | None:
    """None when flashinfer can run this model's attention, else why not."""
    if flashinfer_module() is None:
        return "flashinfer is not installed (pip install -e '.[gpu]')"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it runs fp16/bf16, not {dtype}"
    if geometry.head_dim not in FLASHINFER_HEAD_DIMS:
        return f"head dim {geometry.head_dim} is not one of {FLASHINFER_HEAD_DIMS}"
    return None


def kv_scales(cache) -> dict:
    """flashinfer's per-tensor K/V scales of FP8 pages (its kernels multiply them in as they load)."""
    return {"k_scale": cache.k_scale, "v_scale": cache.v_scale} if cache.fp8 else {}


class FlashInferAttentionBackend(AttentionBackend):
    """Attention on flashinfer's batch prefill / decode kernels (CUDA, fp16/bf16, head dim 64/128/256)."""

    name = "flashinfer"

    def __init__(self, pstate, page_size: int, geometry: AttentionGeometry, dtype: torch.dtype):
        super().__init__(pstate, page_size)
        self.geometry = geometry
        self.dtype = dtype
        self.fi = flashinfer_module()
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=pstate.device)
        self.wrappers = {kind: self._make_wrapper(kind) for kind in KINDS}

    def _make_wrapper(self, kind: str):
        if kind == "ragged" or kind.startswith("gathered_"):
            return self.fi.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, kv_layout="NHD")
        if kind == "decode":
            return self.fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD", use_tensor_cores=True)
        return self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")

    def plan_batches(self, batches: list[AttentionBatch]) -> None:
        for b in batches:
            self._plan(self.wrappers[b.kind], b)

    def _plan(self, w, b: AttentionBatch) -> None:
        g = self.geometry
        # paged kinds read FP8 pages in the kernel; ragged and gathered ones get model-dtype K/V
        paged = b.kind == "decode" or b.kind.startswith("paged_")
        common = dict(q_data_type=self.dtype, kv_data_type=(g.kv_dtype or self.dtype) if paged else self.dtype,
                      sm_scale=g.scale)
        if b.kind == "ragged":
            w.plan(b.qo_indptr, b.kv_indptr, g.num_heads, g.num_kv_heads, g.head_dim, causal=True, **common)
        elif b.gathered:
            w.plan(b.qo_indptr, indptr(b.kv_lens), g.num_heads, g.num_kv_heads, g.head_dim, causal=b.causal,
                   **common)
        elif b.kind == "decode":
            w.plan(b.kv_indptr, b.kv_indices, b.last_page_len, g.num_heads, g.num_kv_heads, g.head_dim,
                   self.page_size, **common)
        else:
            w.plan(b.qo_indptr, b.kv_indptr, b.kv_indices, b.last_page_len, g.num_heads, g.num_kv_heads,
                   g.head_dim, self.page_size, causal=b.causal, **common)

    def run_batch(self, batch, q, k, v, cache, scale):
        w = self.wrappers[batch.kind]
        if batch.kind == "ragged":  # k/v may be strided views of a fused projection
            return w.run(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
        if batch.gathered:
            k, v = cache.dequantize(*cache.rows(batch.gather_slots), q.dtype)
            return w.run(q.contiguous(), k, v, return_lse=True)
        return w.run(q.contiguous(), (cache.k, cache.v), return_lse=True, **kv_scales(cache))

    def attention_runs(self, q, k, v, q_runs, k_runs, scale):
        return attention_runs_flashinfer(q, k, v, q_runs, k_runs, scale)

    def graph_decode(self, buckets: list[int], max_pages: int) -> dict[int, AttentionBackend]:
        """Backends for CUDA-graph decode steps, one per batch-size bucket: each runs its decode batch on a wrapper
        over fixed index buffers (shared by the buckets; ``max_pages``: the longest page table of a request)."""
        dev = self.pstate.device
        top = max(buckets)
        indptr_buf = torch.zeros(top + 1, dtype=torch.int32, device=dev)
        last_buf = torch.zeros(top, dtype=torch.int32, device=dev)
        indices_buf = torch.zeros(top * max_pages, dtype=torch.int32, device=dev)
        out = {}
        for bs in buckets:
            w = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, kv_layout="NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=indptr_buf[: bs + 1], paged_kv_indices_buffer=indices_buf,
                paged_kv_last_page_len_buffer=last_buf[:bs], backend="fa2")
            out[bs] = FlashInferGraphDecode(self, w)
        return out

    def release(self) -> None:
        self.wrappers.clear()
        self.workspace = None


class FlashInferGraphDecode(AttentionBackend):
    """Decode batches of one CUDA-graph bucket on a fixed-buffer wrapper; planning refills its buffers, so the
    captured kernels read the new step's pages at replay."""

    name = "flashinfer-graph"

    def __init__(self, parent: FlashInferAttentionBackend, wrapper):
        super().__init__(parent.pstate, parent.page_size)
        self.parent = parent
        self.wrapper = wrapper

    def plan_batches(self, batches: list[AttentionBatch]) -> None:
        if [b.kind for b in batches] != ["decode"]:
            raise ValueError(f"a CUDA-graph step runs one decode batch, got {[b.kind for b in batches]}")
        self.parent._plan(self.wrapper, batches[0])

    def run_batch(self, batch, q, k, v, cache, scale):
        return self.wrapper.run(q, (cache.k, cache.v), return_lse=True, **kv_scales(cache))
