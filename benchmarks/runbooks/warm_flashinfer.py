"""Compile flashinfer's JIT modules used by the engine ahead of time, in parallel processes.

flashinfer builds each kernel variant (kind x dtype x head dim) on first use, about a minute each; one process
meeting them one after another spends several minutes. This runs one tiny call per variant, each in its own
process (flashinfer's file locks make concurrent builds of one module wait for each other), so that tests and
benchmarks started afterwards find every module in ~/.cache/flashinfer.

    python benchmarks/runbooks/warm_flashinfer.py [--dtypes bfloat16 float16] [--head-dims 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

KINDS = ["single", "ragged", "paged_causal", "paged_full", "decode", "merge"]


def warm(kind: str, dtype_name: str, head_dim: int) -> tuple[str, float, str]:

    import torch

    from server.backends.attention import AttentionGeometry, make_batch
    from server.backends.flashinfer_backend import FlashInferAttentionBackend
    from server.forward.context import LocalEntry
    from server.kernels import ops
    from server.kernels.flashinfer_attention import attention_runs_flashinfer
    from server.layers.attention import PagedKVCache
    from server.sp.groups import ParallelState

    t0 = time.perf_counter()
    dtype = getattr(torch, dtype_name)
    dev = torch.device("cuda")
    hq, hk, page = 8, 2, 16
    q = torch.randn(32, hq, head_dim, device=dev, dtype=dtype)
    k = torch.randn(32, hk, head_dim, device=dev, dtype=dtype)
    cache = torch.randn(4, page, hk, head_dim, device=dev, dtype=dtype)
    try:
        if kind == "single":
            attention_runs_flashinfer(q, k, k, [(0, 32, 40)], [(0, 32, 0)], 0.1)  # one full piece
            attention_runs_flashinfer(q, k, k, [(0, 32, 0)], [(0, 32, 0)], 0.1)  # one causal piece
        elif kind == "merge":
            ops.merge_state(q, torch.zeros(32, hq, device=dev), q, torch.zeros(32, hq, device=dev))
        else:
            n = 1 if kind == "decode" else 20
            kv_len = n if kind == "ragged" else 40
            backend = FlashInferAttentionBackend(ParallelState(device=dev), page,
                                                 AttentionGeometry(hq, hk, head_dim, 0.1), dtype)
            batch = make_batch(kind, page, [LocalEntry(0, n, [2, 0, 3], kv_len, kind != "paged_full")], dev)
            backend.plan_batches([batch])
            pages = PagedKVCache(0, cache.shape[1], cache.shape[2], cache.shape[3], cache.dtype, cache.device)
            pages.k = pages.v = cache
            backend.run_batch(batch, q[:n], k[:n], k[:n], pages, 0.1)
        torch.cuda.synchronize()
        status = "ok"
    except Exception as e:  # reported, the others go on
        status = f"{type(e).__name__}: {str(e)[:200]}"
    return f"{kind}/{dtype_name}/d{head_dim}", time.perf_counter() - t0, status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[128])
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    args = ap.parse_args()
    jobs = [(k, dt, d) for d in args.head_dims for dt in args.dtypes for k in args.kinds]
    t0 = time.perf_counter()
    import multiprocessing as mp

    with ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        for name, secs, status in pool.map(warm, *zip(*jobs)):
            print(f"{name:28} {secs:6.1f} s  {status}", flush=True)
    print(f"all variants: {time.perf_counter() - t0:.1f} s wall")


if __name__ == "__main__":
    main()
