"""flashinfer attention backend (CUDA, fp16/bf16): batch wrappers planned once per step, and their CUDA-graph
form for padded steps.

Each kind of :mod:`server.backends.attention` runs on one wrapper: ragged prefill for ``ragged`` and
``gathered_*`` (the gathered KV is contiguous), paged prefill for ``paged_*``, paged decode (tensor-core GQA path,
``return_lse``) for ``decode``. :meth:`FlashInferAttentionBackend.plan_batches` plans every kind present in the
step before the first layer runs; every layer then only launches kernels. The ring's blocks run
``single_prefill_with_kv_cache`` per causal / full piece (:mod:`server.kernels.flashinfer_attention`).

For CUDA graphs, one wrapper per padded-step shape (decode wrappers per batch-size bucket, paged prefill wrappers
per token bucket of short extend steps) is built over fixed index buffers (``use_cuda_graph=True``); planning
refills them before each replay.

Sliding-window layers (gpt-oss): at sp = 1 every entry's KV rows are its positions in order, so a second set of
wrappers planned with ``window_left = w - 1`` (bottom-right aligned) is exactly the window. At sp > 1 a rank's
shard holds scattered positions, so the window's local batches run the torch reference with the stored key
positions (eager decode, no CUDA graph); split chunks run the halo's one windowed call per zigzag chunk.
"""

from __future__ import annotations

import torch

from server.backends.attention import (
    KINDS,
    AttentionBackend,
    AttentionBatch,
    AttentionGeometry,
    GraphShape,
    indptr,
)
from server.backends.torch_backend import batch_attention_ref
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
        # window layers at sp = 1: the same batches planned with window_left (see the module docstring)
        self.windowed = geometry.window is not None and pstate.sp_size == 1
        self.window_wrappers = {kind: self._make_wrapper(kind) for kind in KINDS} if self.windowed else {}

    def _make_wrapper(self, kind: str):
        if kind == "ragged" or kind.startswith("gathered_"):
            return self.fi.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, kv_layout="NHD")
        if kind == "decode":
            return self.fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD", use_tensor_cores=True)
        return self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")

    def graph_capturable(self) -> bool:
        return self.geometry.window is None or self.windowed

    def plan_batches(self, batches: list[AttentionBatch]) -> None:
        for b in batches:
            self._plan(self.wrappers[b.kind], b)
            if self.windowed:  # over the window layers' pages (a window page group)
                self._plan(self.window_wrappers[b.kind], b.for_window(), self.geometry.window)

    def _plan(self, w, b: AttentionBatch, window: int | None = None) -> None:
        g = self.geometry
        # paged kinds read FP8 pages in the kernel; ragged and gathered ones get model-dtype K/V
        paged = b.kind == "decode" or b.kind.startswith("paged_")
        common = dict(q_data_type=self.dtype, kv_data_type=(g.kv_dtype or self.dtype) if paged else self.dtype,
                      sm_scale=g.scale, window_left=-1 if window is None else window - 1)
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

    def run_batch(self, batch, q, k, v, cache, scale, window=None, q_pos=None):
        if window is not None and not self.windowed:  # sp > 1: shards of scattered positions
            return batch_attention_ref(batch, q, k, v, cache.k, cache.v, scale, cache.dequantize, window, q_pos,
                                       cache.pos)
        w = (self.window_wrappers if window is not None else self.wrappers)[batch.kind]
        if batch.kind == "ragged":  # k/v may be strided views of a fused projection
            return w.run(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
        if batch.gathered:
            k, v = cache.dequantize(*cache.rows(batch.gather_slots), q.dtype)
            return w.run(q.contiguous(), k, v, return_lse=True)
        return w.run(q.contiguous(), (cache.k, cache.v), return_lse=True, **kv_scales(cache))

    def attention_runs(self, q, k, v, q_runs, k_runs, scale, window=None):
        return attention_runs_flashinfer(q, k, v, q_runs, k_runs, scale, window)

    def graph_backends(self, shapes: list[GraphShape], max_pages: int) -> dict[GraphShape, AttentionBackend]:
        """Backends for padded steps, one per shape: decode shapes on decode wrappers, extend shapes on paged prefill
        wrappers (causal; flashinfer splits the long KV of a few query tiles over CTAs itself), each over fixed index
        buffers shared by the shapes (``max_pages``: the longest page table of a request)."""
        dev = self.pstate.device
        top = max(s.entries for s in shapes)
        pad_pages = max(s.rows for s in shapes) // self.page_size + top  # padding entries' scratch pages
        qo_buf = torch.zeros(top + 1, dtype=torch.int32, device=dev)
        indptr_buf = torch.zeros(top + 1, dtype=torch.int32, device=dev)
        last_buf = torch.zeros(top, dtype=torch.int32, device=dev)
        indices_buf = torch.zeros(top * max_pages + pad_pages, dtype=torch.int32, device=dev)
        window_indices_buf = torch.zeros_like(indices_buf) if self.windowed else None  # the window layers' pages
        out: dict[GraphShape, AttentionBackend] = {}
        for s in shapes:
            indptr, last = indptr_buf[: s.entries + 1], last_buf[: s.entries]

            def wrapper(s=s, indptr=indptr, last=last, indices_buf=indices_buf):
                if s.decode:
                    return self.fi.BatchDecodeWithPagedKVCacheWrapper(
                        self.workspace, kv_layout="NHD", use_cuda_graph=True, use_tensor_cores=True, backend="fa2",
                        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices_buf,
                        paged_kv_last_page_len_buffer=last)
                # the prefill wrapper names its buffers *_buf
                return self.fi.BatchPrefillWithPagedKVCacheWrapper(
                    self.workspace, kv_layout="NHD", use_cuda_graph=True, qo_indptr_buf=qo_buf[: s.entries + 1],
                    paged_kv_indptr_buf=indptr, paged_kv_indices_buf=indices_buf, paged_kv_last_page_len_buf=last)

            # window layers: a second wrapper, planned with window_left, over the same buffers but the page ids of
            # the window layers' pages
            out[s] = FlashInferGraphStep(self, wrapper(),
                                         wrapper(indices_buf=window_indices_buf) if self.windowed else None)
        return out

    def release(self) -> None:
        self.wrappers.clear()
        self.workspace = None


class FlashInferGraphStep(AttentionBackend):
    """The one batch of a padded step of one shape on a fixed-buffer wrapper (decode or paged prefill); planning
    refills its buffers, so the captured kernels read the new step's pages at replay."""

    name = "flashinfer-graph"
    capturable = True

    def __init__(self, parent: FlashInferAttentionBackend, wrapper, window_wrapper=None):
        super().__init__(parent.pstate, parent.page_size)
        self.parent = parent
        self.wrapper = wrapper
        self.window_wrapper = window_wrapper

    def plan_batches(self, batches: list[AttentionBatch]) -> None:
        if len(batches) != 1 or batches[0].kind not in ("decode", "paged_causal"):
            raise ValueError(f"a padded step runs one decode or paged_causal batch, got {[b.kind for b in batches]}")
        self.parent._plan(self.wrapper, batches[0])
        if self.window_wrapper is not None:
            self.parent._plan(self.window_wrapper, batches[0].for_window(), self.parent.geometry.window)

    def run_batch(self, batch, q, k, v, cache, scale, window=None, q_pos=None):
        w = self.wrapper if window is None else self.window_wrapper
        return w.run(q.contiguous(), (cache.k, cache.v), return_lse=True, **kv_scales(cache))
