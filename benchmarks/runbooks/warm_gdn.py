"""Compile and autotune fla-core's Gated DeltaNet kernels for the benchmarked shapes, ahead of the benchmarks.

fla's chunked and fused-recurrent kernels are Triton kernels that compile and autotune on first use, per head
configuration; on a fresh GPU host that took over two minutes inside the first timed run. This runs each op once
on small random inputs at every benchmarked shape (the chunked prefill, the SP chunk-affine pass with its wider
value columns, the decode step), so later processes find the kernels in Triton's cache (with
``TRITON_CACHE_AUTOTUNING=1``, the tuning results too).

    TRITON_CACHE_AUTOTUNING=1 python benchmarks/runbooks/warm_gdn.py [--shapes qwen3.5-27b qwen3-next-like]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.model_shapes import SHAPES  # noqa: E402
from server.kernels import ops  # noqa: E402


def warm(shape: str, tokens: int = 4096) -> float:
    cfg = SHAPES[shape]
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    dev, dt = torch.device("cuda"), torch.bfloat16
    start = time.perf_counter()
    q, k = (torch.randn(tokens, hk, dk, device=dev, dtype=dt) for _ in range(2))
    v = torch.randn(tokens, hv, dv, device=dev, dtype=dt)
    g = -torch.rand(tokens, hv, device=dev)
    beta = torch.rand(tokens, hv, device=dev)
    cu = torch.tensor([0, tokens // 3, tokens], dtype=torch.int32, device=dev)
    ops.gdn_prefill(q, k, v, g, beta, cu, torch.zeros(2, hv, dk, dv, device=dev))
    ops.gdn_chunk_affine(q, k, v, g, beta, cu)
    for batch in (1, 8, 32):
        pool = torch.zeros(batch + 1, hv, dk, dv, device=dev)
        slots = torch.arange(batch, device=dev)
        ops.gdn_decode(q[:batch], k[:batch], v[:batch], g[:batch], beta[:batch], pool, slots)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=[s for s, c in SHAPES.items() if "linear_num_key_heads" in c])
    args = ap.parse_args()
    for shape in args.shapes:
        print(f"{shape:20} {warm(shape):6.1f} s", flush=True)


if __name__ == "__main__":
    main()
