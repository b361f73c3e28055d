"""Kernel benchmarks: lightning prefill (ours vs fla), lightning decode, merge_state, flashinfer ring-step attention,
the decoder layers' pointwise ops (RMSNorm, SiLU-and-multiply, RoPE: Triton vs torch, timed inside CUDA graphs),
one MoE layer through the expert-parallel dispatch / combine path at EP size 1 against the TP-sliced MoE
(``--sections moe_ep``, Qwen3-30B-A3B's expert shapes), the same layer with FP8 experts against bf16 ones
(``--sections moe_fp8``), and a turn's short query over a long cached prefix
(``short_turn_attention``: the attention kinds and KV splits beside the floor; run it after ``ceilings``).

    python benchmarks/bench_kernels.py [--out-dir benchmarks/results] [--sections ...] [--time-budget SECONDS]

Writes ``kernels_<device>.json`` (command, device, versions, date, every measurement) after each section and
``kernels_<device>.md`` (the tables printed at the end). Times are medians of ``triton.testing.do_bench``
(CUDA events, L2 flushed between runs). FLOP and byte counts are stated in the JSON ``counting`` field.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.kernels.lightning import (  # noqa: E402
    lightning_decode_triton,
    lightning_prefill_triton,
    lightning_state_correction_triton,
)
from server.kernels.lightning_ref import lightning_prefill_ref  # noqa: E402
from server.kernels.merge_state import flashinfer_cascade, merge_state_triton, merge_states_triton  # noqa: E402
from server.kernels.pointwise import rms_norm_triton, rope_triton_, silu_and_mul_triton  # noqa: E402
from server.kernels.pointwise_ref import rms_norm_ref, rope_ref, silu_and_mul_ref  # noqa: E402

HEAD_DIM = 128
FLOP_BLOCK = 64
COUNTING = {
    "lightning_prefill_flops": (
        "per token and head 2*C*(Dk+Dv) (intra block: Q K^T and P V over full C x C blocks) + 2*Dk*Dv (Q @ S) "
        "+ 2*Dk*Dv (state update K^T V), C = 64; the same count for ours and fla, so the ratio is the time ratio"
    ),
    "lightning_prefill_bytes": "q, k, v read once and o written once (bf16); states ignored",
    "lightning_correction_bytes": "q and o read, corrected o written (bf16); states ignored",
    "lightning_decode_bytes": "fp32 state read + written (2 * B*H*Dk*Dv*4) + q, k, v, o (bf16)",
    "merge_bytes": "K partial o (bf16) + lse (fp32) read, one o + lse written",
    "attention_flops": "4 * Hq * D per visible (query, key) pair (QK^T and PV); causal counts the lower triangle",
    "copy_bandwidth": "device-to-device copy of 1 GiB, bytes read + bytes written",
    "decode_bytes": "K and V of every request read once (bf16); q and o ignored",
    "pointwise_us": "GPU time per call inside a CUDA graph of 200 calls (replay time / 200): what a decode step "
                    "replayed from a graph pays per op, launch gaps included",
}
# Lightning prefill variants swept per shape: "default" is what ops.lightning_prefill runs (block 64, value slice
# 64, 4 warps, 3 stages, segments for about one program per SM); the others change one knob of it.
PREFILL_CONFIGS: dict[str, dict] = {
    "default": {},
    "s2": dict(num_stages=2),
    "s4": dict(num_stages=4),
    "w8": dict(num_warps=8),
    "v128_w8": dict(block_v=128, num_warps=8),
    "v32_s4": dict(block_v=32, num_stages=4),
    **{f"seg{n}": dict(num_segments=n) for n in (1, 2, 4, 8, 16)},
}


class Budget:
    """Wall-clock budget: sections skip their remaining cases once it is spent (results so far are kept)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def bench_ms(fn: Callable[[], object], rep: int = 60) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def device_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower())).lower()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    commit = os.environ.get("GIT_COMMIT")  # the host's copy of the tree may carry a stale .git
    props = torch.cuda.get_device_properties(0)
    return {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "git_commit": commit,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "flashinfer": package_version("flashinfer-python"),
            "fla": package_version("fla-core"),
        },
    }


def ceilings(res: dict, budget: Budget) -> None:
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(partial(dst.copy_, src))
    res["copy_gbps"] = 2 * src.numel() * 2 / ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(partial(torch.matmul, a, b))
    res["matmul_bf16_tflops"] = 2 * 8192**3 / ms / 1e9


def minimax_slopes(total_heads: int, heads: int) -> torch.Tensor:
    """ALiBi-style slopes of MiniMax's first layer; a tp rank holds the first ``heads`` of them."""
    return torch.tensor([2 ** (-8 * (i + 1) / total_heads) for i in range(heads)], device="cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def lightning_prefill(rows: list, budget: Budget, heads: list[int], tokens: list[int], configs: list[str]) -> None:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        chunk_simple_gla = None
        print(f"fla not importable ({e}); timing ours only", file=sys.stderr)
    cases = [(h, t) for t in tokens for h in heads]
    for h, t in tqdm(cases, desc="lightning prefill", mininterval=5):
        if budget.left() < 0:
            rows.append({"heads": h, "tokens": t, "skipped": "time budget"})
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(t, h, HEAD_DIM, device="cuda", generator=g).mul_(0.5).to(torch.bfloat16)
                   for _ in range(3))
        slopes = minimax_slopes(64, h)
        s0 = torch.randn(1, h, HEAD_DIM, HEAD_DIM, device="cuda", generator=g) * 0.1
        cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
        flops = t * h * (2 * FLOP_BLOCK * 2 * HEAD_DIM + 4 * HEAD_DIM * HEAD_DIM)
        nbytes = 4 * t * h * HEAD_DIM * 2
        row: dict = {"heads": h, "tokens": t, "gflop": flops / 1e9, "ours_ms": {}}
        with torch.inference_mode():
            for name in configs:
                kw = PREFILL_CONFIGS[name]
                try:
                    row["ours_ms"][name] = bench_ms(partial(lightning_prefill_triton, q, k, v, slopes, cu, s0, **kw))
                except Exception as e:  # a config the device cannot run (e.g. out of shared memory)
                    row["ours_ms"][name] = None
                    row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
            ok = {n: ms for n, ms in row["ours_ms"].items() if ms is not None}
            if ok:
                best = min(ok, key=ok.get)
                row["best_config"] = best
                row["ours_default_tflops"] = flops / ok["default"] / 1e9 if "default" in ok else None
                row["ours_default_gbps"] = nbytes / ok["default"] / 1e6 if "default" in ok else None
                row["ours_best_tflops"] = flops / ok[best] / 1e9
                row["ours_best_gbps"] = nbytes / ok[best] / 1e6
            if chunk_simple_gla is not None:
                fla_call = partial(chunk_simple_gla, q[None], k[None], v[None], g_gamma=-slopes, scale=1.0,
                                   initial_state=s0, output_final_state=True)

                try:
                    fla_ms = bench_ms(fla_call)
                    row["fla_ms"] = fla_ms
                    row["fla_tflops"] = flops / fla_ms / 1e9
                    if "default" in ok:
                        row["speedup_default_vs_fla"] = fla_ms / ok["default"]
                        row["speedup_best_vs_fla"] = fla_ms / ok[best]
                    if t == min(tokens):  # agreement of the two implementations (and with the fp32 reference)
                        o, st = lightning_prefill_triton(q, k, v, slopes, cu, s0)
                        fo, fst = fla_call()
                        ro, rst = lightning_prefill_ref(q.float(), k.float(), v.float(), slopes, cu, s0)
                        row["rel_err"] = {"ours_vs_ref_o": rel_err(o, ro), "ours_vs_ref_state": rel_err(st, rst),
                                          "fla_vs_ref_o": rel_err(fo[0], ro), "fla_vs_ref_state": rel_err(fst, rst)}
                except Exception as e:
                    row["fla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()


def lightning_correction(rows: list, budget: Budget) -> None:
    for h, t in tqdm([(64, 32768), (64, 131072), (8, 32768), (8, 131072)], desc="lightning correction", mininterval=5):
        if budget.left() < 0:
            rows.append({"heads": h, "tokens": t, "skipped": "time budget"})
            continue
        q, o = (torch.randn(t, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        states = torch.randn(1, h, HEAD_DIM, HEAD_DIM, device="cuda")
        cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
        ms = bench_ms(partial(lightning_state_correction_triton, o, q, minimax_slopes(64, h), cu, states))
        rows.append({"heads": h, "tokens": t, "ms": ms, "gbps": 3 * t * h * HEAD_DIM * 2 / ms / 1e6})
        del q, o
        torch.cuda.empty_cache()


def lightning_decode(rows: list, budget: Budget) -> None:
    for b, h in tqdm([(64, 64), (256, 64), (64, 8), (256, 8)], desc="lightning decode", mininterval=5):
        if budget.left() < 0:
            rows.append({"batch": b, "heads": h, "skipped": "time budget"})
            continue
        q, k, v = (torch.randn(b, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        pool = torch.randn(2 * b, h, HEAD_DIM, HEAD_DIM, device="cuda")
        slots = torch.randperm(2 * b, device="cuda")[:b]
        slopes = minimax_slopes(64, h)
        ms = bench_ms(partial(lightning_decode_triton, q, k, v, slopes, pool, slots))
        nbytes = 2 * b * h * HEAD_DIM * HEAD_DIM * 4 + 4 * b * h * HEAD_DIM * 2
        rows.append({"batch": b, "heads": h, "ms": ms, "gbps": nbytes / ms / 1e6})
        del pool
        torch.cuda.empty_cache()


def merge_state(rows: list, budget: Budget) -> None:
    cascade = flashinfer_cascade()
    h, d = 32, HEAD_DIM
    for k_parts, n in tqdm([(2, 65536), (4, 32768), (8, 16384)], desc="merge_state", mininterval=5):
        if budget.left() < 0:
            rows.append({"parts": k_parts, "rows": n, "skipped": "time budget"})
            continue
        o = torch.randn(k_parts, n, h, d, device="cuda", dtype=torch.bfloat16)
        lse = torch.randn(k_parts, n, h, device="cuda") * 4
        nbytes = (k_parts + 1) * n * h * (d * 2 + 4)
        row: dict = {"parts": k_parts, "tokens": n, "heads": h, "head_dim": d, "gbps": {}}
        if k_parts == 2:
            impls = {"triton": partial(merge_state_triton, o[0], lse[0], o[1], lse[1])}
            if cascade is not None:
                impls["flashinfer"] = partial(cascade.merge_state, o[0], lse[0], o[1], lse[1])
        else:
            impls = {"triton": partial(merge_states_triton, o, lse)}
            if cascade is not None:
                impls["flashinfer_NKHD"] = partial(cascade.merge_states, o.transpose(0, 1).contiguous(),
                                                   lse.transpose(0, 1).contiguous())
                impls["flashinfer_with_transpose"] = partial(merge_states_transposing, cascade.merge_states, o, lse)
        for name, fn in impls.items():
            row["gbps"][name] = nbytes / bench_ms(fn) / 1e6
        rows.append(row)
        del o, lse
        torch.cuda.empty_cache()


def pages_of(k: torch.Tensor, v: torch.Tensor):
    """A layer's :class:`server.layers.attention.PagedKVCache` over existing K / V page tensors (what a backend's
    ``run_batch`` reads)."""
    from server.layers.attention import PagedKVCache

    cache = PagedKVCache(0, k.shape[1], k.shape[2], k.shape[3], k.dtype, k.device)
    cache.k, cache.v = k, v
    return cache


def graph_us(fn: Callable[[], object], calls: int = 200, reps: int = 5) -> float:
    """Microseconds per call of ``fn`` replayed from one CUDA graph holding ``calls`` calls (median of reps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _rope_torch(rot, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    cos, sin = rot.cos_sin(pos, q.dtype)
    return rope_ref(q, cos, sin), rope_ref(k, cos, sin)


def _rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return rope_triton_(q, cos, sin), rope_triton_(k, cos, sin)


def pointwise(rows: list, budget: Budget) -> None:
    """Llama-3-8B's widths (hidden 4096, MLP 14336, 32 q / 8 kv heads of 128) at decode batches 1 and 32 and a
    prefill chunk of 8192 rows: one call of each op, torch (the reference, several kernels) vs one Triton kernel.
    A layer calls RMSNorm twice, SiLU-and-multiply once and RoPE on q and k."""
    from server.layers.rotary import RotaryEmbedding

    dt = torch.bfloat16
    rot = RotaryEmbedding(HEAD_DIM, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}, 131072).cuda()
    w = torch.randn(4096, device="cuda", dtype=dt)
    for n in tqdm([1, 32, 8192], desc="pointwise", mininterval=5):
        if budget.left() < 0:
            rows.append({"rows": n, "skipped": "time budget"})
            continue
        x = torch.randn(n, 4096, device="cuda", dtype=dt)
        h = torch.randn(n, 2 * 14336, device="cuda", dtype=dt)
        qkv = torch.randn(n, 48 * HEAD_DIM, device="cuda", dtype=dt)
        q, k = qkv[:, : 32 * HEAD_DIM].view(n, 32, HEAD_DIM), qkv[:, 32 * HEAD_DIM : 40 * HEAD_DIM].view(n, 8, HEAD_DIM)
        pos = torch.randint(0, 131072, (n,), device="cuda")
        cos, sin = rot.cos_sin(pos, dt)
        ops = {
            "rms_norm": (partial(rms_norm_ref, x, w, 1e-5), partial(rms_norm_triton, x, w, 1e-5)),
            "silu_and_mul": (partial(silu_and_mul_ref, h), partial(silu_and_mul_triton, h)),
            # torch: cos/sin from the positions in every layer, then q and k; Triton: q and k in place (cos/sin
            # come once per forward)
            "rope_q_k": (partial(_rope_torch, rot, pos, q, k), partial(_rope_triton, q, k, cos, sin)),
        }
        for name, (ref, fast) in ops.items():
            rows.append({"op": name, "rows": n, "torch_us": graph_us(ref), "triton_us": graph_us(fast)})
        del x, h, qkv
        torch.cuda.empty_cache()


def gdn(rows: list, budget: Budget) -> None:
    """Gated DeltaNet kernels at the Qwen3.5-27B layer shape (16 key / 48 value heads of 128, bf16), one sequence
    of T tokens from a nonzero state: the chunked prefill one rank runs without SP (or on its heads under
    Ulysses), the SP chunk-affine pass (value columns ``[v | 0]`` from ``[0 | I]``: the output from zero, the chunk's
    transition and its state contribution), and the correction ``O_loc + Q~ S_in`` after the combine. Their
    ratio is the extra GDN work per token that GDN state passing costs against sp = 1."""
    for t in tqdm([8192, 32768], desc="gdn", mininterval=5):
        if budget.left() < 0:
            rows.append({"tokens": t, "skipped": "time budget"})
            continue
        rows.append(_gdn_case(t))
        torch.cuda.empty_cache()


def _gdn_case(t: int, hk: int = 16, hv: int = 48, d: int = 128, per_channel: bool = False) -> dict:
    from server.kernels import ops

    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k = (torch.randn(t, hk, d, device=dev, dtype=dt) for _ in range(2))
    v = torch.randn(t, hv, d, device=dev, dtype=dt)
    g = -torch.rand(t, hv, *((d,) if per_channel else ()), device=dev) * 0.1
    beta = torch.rand(t, hv, device=dev)
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    state = torch.randn(1, hv, d, d, device=dev) * 0.01
    prefill = bench_ms(partial(ops.gdn_prefill, q, k, v, g, beta, cu, state))
    affine = bench_ms(partial(ops.gdn_chunk_affine, q, k, v, g, beta, cu))
    o_loc, q_tilde, _, _ = ops.gdn_chunk_affine(q, k, v, g, beta, cu)
    correction = bench_ms(partial(ops.gdn_state_correction, o_loc, q_tilde, cu, state))
    return {"tokens": t, "prefill_ms": prefill, "chunk_affine_ms": affine, "correction_ms": correction,
            "prefill_us_per_token": prefill * 1e3 / t, "sp_pass_over_prefill": (affine + correction) / prefill}


def kda(rows: list, budget: Budget) -> None:
    """Kimi Delta Attention at the Kimi-Linear-48B-A3B layer shape (32 heads of 128, per-channel decays, bf16), one
    sequence of T tokens from a nonzero state: fla-core's ``chunk_kda`` called alone, then our dispatched ops (the
    same kernel behind the adapter: empty-sequence handling, head repetition, state copies), the SP chunk-affine pass
    and the correction. ``op_over_fla`` is what the adapter costs; ``sp_pass_over_prefill`` what KDA state passing
    costs against sp = 1."""
    from fla.ops.kda import chunk_kda

    for t in tqdm([8192, 32768], desc="kda", mininterval=5):
        if budget.left() < 0:
            rows.append({"tokens": t, "skipped": "time budget"})
            continue
        row = _gdn_case(t, hk=32, hv=32, per_channel=True)
        dev, dt, h, d = torch.device("cuda"), torch.bfloat16, 32, 128
        q, k, v = (torch.randn(1, t, h, d, device=dev, dtype=dt) for _ in range(3))
        g = -torch.rand(1, t, h, d, device=dev) * 0.1
        beta = torch.rand(1, t, h, device=dev)
        state = torch.randn(1, h, d, d, device=dev) * 0.01
        fla = bench_ms(partial(chunk_kda, q=q, k=k, v=v, g=g, beta=beta, scale=d**-0.5, initial_state=state,
                               output_final_state=True, use_qk_l2norm_in_kernel=True))
        rows.append({**row, "fla_chunk_kda_ms": fla, "op_over_fla": row["prefill_ms"] / fla})
        torch.cuda.empty_cache()


def merge_states_transposing(merge: Callable, o: torch.Tensor, lse: torch.Tensor):
    """flashinfer's K-way merge fed from our ``[K, N, H, D]`` layout: it wants ``[N, K, H, D]``."""
    return merge(o.transpose(0, 1).contiguous(), lse.transpose(0, 1).contiguous())


def ring_attention(rows: list, budget: Budget, tokens: list[int]) -> None:
    from server.kernels.flashinfer_attention import attention_runs_flashinfer, flashinfer_module

    fi = flashinfer_module()
    if fi is None:
        rows.append({"skipped": "flashinfer not importable"})
        return
    hq, hk, d = 32, 8, HEAD_DIM
    scale = d**-0.5
    per_pair = 4 * hq * d
    cases = []
    for n in tokens:
        c = n // 2  # zigzag, P = 4: rank 1 holds chunks 1 and 6 (of 8) of size c
        cases += [
            (n, "causal block", [(0, n, 0)], [(0, n, 0)], per_pair * n * (n + 1) / 2),
            (n, "full block", [(0, n, n)], [(0, n, 0)], per_pair * n * n),
            (n, "zigzag step 0 (own KV)", [(0, c, c), (c, c, 6 * c)], [(0, c, c), (c, c, 6 * c)],
             per_pair * (c * (c + 1) + c * c)),
            (n, "zigzag step 1 (earlier rank)", [(0, c, c), (c, c, 6 * c)], [(0, c, 0), (c, c, 7 * c)],
             per_pair * 2 * c * c),
        ]
    for n, name, q_runs, k_runs, flops in tqdm(cases, desc="ring-step attention", mininterval=5):
        if budget.left() < 0:
            rows.append({"tokens": n, "case": name, "skipped": "time budget"})
            continue
        q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(n, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = bench_ms(partial(attention_runs_flashinfer, q, k, v, q_runs, k_runs, scale))
        row = {"tokens": n, "case": name, "q_heads": hq, "kv_heads": hk, "head_dim": d, "ms": ms,
               "tflops": flops / ms / 1e9}
        if name in ("causal block", "full block"):  # the bare kernel, to show the wrapper's overhead
            raw = bench_ms(partial(fi.single_prefill_with_kv_cache, q, k, v, causal=name == "causal block",
                                   sm_scale=scale, return_lse=True))
            row["raw_single_prefill_tflops"] = flops / raw / 1e9
        rows.append(row)


def _paged_cache(num_tokens: list[int], hk: int, d: int, page: int):
    """Caches holding requests of the given lengths on shuffled pages, and their page tables."""
    counts = [math.ceil(n / page) for n in num_tokens]
    perm = torch.randperm(sum(counts)).tolist()
    tables, used = [], 0
    for c in counts:
        tables.append(perm[used : used + c])
        used += c
    k, v = (torch.randn(sum(counts), page, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return k, v, tables


def _gathered_attention(q, k_cache, v_cache, pages, kv_len: int, q_runs, scale: float):
    """The per-request path the batched calls replaced: gather the pages, then attention_runs."""
    from server.kernels.flashinfer_attention import attention_runs_flashinfer

    ks = k_cache[pages].flatten(0, 1)[:kv_len]
    vs = v_cache[pages].flatten(0, 1)[:kv_len]
    return attention_runs_flashinfer(q, ks, vs, q_runs, [(0, kv_len, 0)], scale)


def _gathered_decode_loop(q, k_cache, v_cache, tables, kv_len: int, scale: float) -> None:
    for i, pages in enumerate(tables):
        _gathered_attention(q[i : i + 1], k_cache, v_cache, pages, kv_len, [(0, 1, kv_len)], scale)


LLAMA_ATTENTION = (32, 8, HEAD_DIM, 16)  # query heads, KV heads, head dim, page size (Llama-3-8B, one GPU)


def llama_backend(rows: list):
    """flashinfer and the engine's flashinfer backend at the Llama-3-8B attention shape, or None (a skip row)."""
    from server.backends.attention import AttentionGeometry
    from server.backends.flashinfer_backend import FlashInferAttentionBackend
    from server.kernels.flashinfer_attention import flashinfer_module
    from server.sp.groups import ParallelState

    fi = flashinfer_module()
    if fi is None:
        rows.append({"skipped": "flashinfer not importable"})
        return None
    hq, hk, d, page = LLAMA_ATTENTION
    dev = torch.device("cuda")
    return fi, FlashInferAttentionBackend(ParallelState(device=dev), page, AttentionGeometry(hq, hk, d, d**-0.5),
                                          torch.bfloat16)


def paged_attention(rows: list, budget: Budget) -> None:
    """The engine's batched local attention (server/backends/flashinfer_backend.py) against the per-request path
    it replaced (gather the request's pages into contiguous K/V, then attention_runs) and the bare kernel."""

    from server.backends.attention import make_batch
    from server.forward.context import LocalEntry

    made = llama_backend(rows)
    if made is None:
        return
    fi, backend = made
    hq, hk, d, page = LLAMA_ATTENTION
    scale = d**-0.5
    dev = torch.device("cuda")

    def run(batch, q, k, v, kc, vc):
        return backend.run_batch(batch, q, k, v, pages_of(kc, vc), scale)

    per_pair = 4 * hq * d
    prefill_cases = [(8192, 0), (32768, 0), (64, 32768), (256, 32768), (1024, 32768), (8192, 24576),
                     (32768, 98304)]
    for n, prefix in tqdm(prefill_cases, desc="paged prefill", mininterval=5):
        if budget.left() < 0:
            rows.append({"case": "prefill", "tokens": n, "prefix": prefix, "skipped": "time budget"})
            continue
        total = n + prefix
        kc, vc, (table,) = _paged_cache([total], hk, d, page)
        q, k, v = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hk, hk))
        flops = per_pair * (n * prefix + n * (n + 1) / 2)
        row = {"case": "prefill", "tokens": n, "prefix": prefix, "tflops": {}}
        for kind in ["ragged"] if prefix == 0 else ["paged_causal", "gathered_causal"]:
            batch = make_batch(kind, page, [LocalEntry(0, n, table, n if prefix == 0 else total, True)], dev)
            backend.plan_batches([batch])
            ms = bench_ms(partial(run, batch, q, k, v, kc, vc))
            row["tflops"][kind] = flops / ms / 1e9
        pages_t = torch.tensor(table, device="cuda")
        old = bench_ms(partial(_gathered_attention, q, kc, vc, pages_t, total, [(0, n, prefix)], scale))
        row["tflops"]["per-request gather + attention_runs"] = flops / old / 1e9
        rows.append(row)
        del kc, vc
        torch.cuda.empty_cache()
    for b, kv_len in tqdm([(64, 4096), (256, 4096), (64, 32768)], desc="paged decode", mininterval=5):
        if budget.left() < 0:
            rows.append({"case": "decode", "batch": b, "kv_len": kv_len, "skipped": "time budget"})
            continue
        kc, vc, tables = _paged_cache([kv_len] * b, hk, d, page)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        batch = make_batch("decode", page, [LocalEntry(i, 1, t, kv_len, False) for i, t in enumerate(tables)], dev)
        backend.plan_batches([batch])
        plan_host_ms = (time.perf_counter() - t0) * 1e3
        ms = bench_ms(partial(run, batch, q, q, q, kc, vc))
        nbytes = 2 * b * kv_len * hk * d * 2
        tables_t = [torch.tensor(t, device="cuda") for t in tables]
        old = bench_ms(partial(_gathered_decode_loop, q, kc, vc, tables_t, kv_len, scale), rep=20)
        rows.append({"case": "decode", "batch": b, "kv_len": kv_len, "ms": ms, "gbps": nbytes / ms / 1e6,
                     "old_loop_ms": old, "make_batch_ms": plan_host_ms})
        del kc, vc
        torch.cuda.empty_cache()


def _paged_prefill(fi, workspace, table: list[int], n: int, prefix: int, hq: int, hk: int, d: int, page: int,
                   scale: float, **plan_kw):
    """A planned paged prefill wrapper for one entry of ``n`` causal queries after ``prefix`` cached keys."""
    total = n + prefix
    pages = -(-total // page)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    w.plan(torch.tensor([0, n], dtype=torch.int32), torch.tensor([0, pages], dtype=torch.int32),
           torch.tensor(table[:pages], dtype=torch.int32),
           torch.tensor([total - (pages - 1) * page], dtype=torch.int32), hq, hk, d, page, causal=True,
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=scale, **plan_kw)
    return w


def _split_kv_prefill(fi, workspace, table: list[int], n: int, prefix: int, hq: int, hk: int, d: int, page: int,
                      scale: float, segments: int):
    """Short queries over a long KV split explicitly into ``segments`` entries of one batch: the queries repeated
    per segment, every segment but the last non-causal (all its keys precede the queries), the last causal over the
    queries' own keys, then the partial results merged by LSE. Returns a callable ``run(q, k_cache, v_cache)``."""
    total = n + prefix
    pages = -(-total // page)
    last = prefix // page  # pages before it hold only keys that precede every query
    per = max(1, -(-last // max(1, segments - 1)))
    full = [(a, min(a + per, last)) for a in range(0, last, per)]
    wf = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD") if full else None
    if full:
        m = len(full)
        wf.plan(torch.arange(m + 1, dtype=torch.int32) * n,
                torch.tensor([0] + [b for _, b in full], dtype=torch.int32),  # segments are consecutive
                torch.tensor(table[: full[-1][1]], dtype=torch.int32), torch.full((m,), page, dtype=torch.int32),
                hq, hk, d, page, causal=False, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                sm_scale=scale)
    wc = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    wc.plan(torch.tensor([0, n], dtype=torch.int32), torch.tensor([0, pages - last], dtype=torch.int32),
            torch.tensor(table[last:pages], dtype=torch.int32),
            torch.tensor([total - (pages - 1) * page], dtype=torch.int32), hq, hk, d, page, causal=True,
            q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=scale)

    def run(q, kc, vc):
        o_c, s_c = wc.run(q, (kc, vc), return_lse=True)
        if not full:
            return o_c
        o_f, s_f = wf.run(q.repeat(len(full), 1, 1), (kc, vc), return_lse=True)
        v = torch.cat([o_f.view(len(full), n, hq, d), o_c[None]]).transpose(0, 1)  # [n, S, H, D]
        lse = torch.cat([s_f.view(len(full), n, hq), s_c[None]]).transpose(0, 1)
        return fi.merge_states(v.contiguous(), lse.contiguous())[0]

    return run, len(full) + 1


def short_turn_attention(rows: list, budget: Budget, ceil: dict) -> None:
    """A turn's short query over a long cached prefix (Llama-3-8B attention: 32 q / 8 kv heads, d = 128, page 16):
    64 / 1K / 4K new tokens over 16K / 128K cached ones, one layer. The kinds the engine runs (``paged_causal``:
    flashinfer's paged prefill with its own split choice; ``gathered_causal``: gather the KV, then ragged prefill)
    beside paged prefill with flashinfer's ``fixed_split_size`` (KV chunks of a fixed number of pages instead of its
    own search) and the KV split explicitly over S entries of one batch (merged by LSE). Reports ms, TFLOP/s, GB/s
    (K/V read once) and time over the floor, max(bytes / copy rate, FLOPs / matmul rate) of the measured ceilings,
    and each variant's largest difference from ``paged_causal``."""
    import inspect

    from server.backends.attention import make_batch
    from server.backends.flashinfer_backend import WORKSPACE_BYTES
    from server.forward.context import LocalEntry

    made = llama_backend(rows)
    if made is None:
        return
    fi, backend = made
    hq, hk, d, page = LLAMA_ATTENTION
    scale = d**-0.5
    dev = torch.device("cuda")
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    has_fixed = "fixed_split_size" in inspect.signature(fi.BatchPrefillWithPagedKVCacheWrapper.plan).parameters
    copy_gbps, tflops_peak = ceil.get("copy_gbps"), ceil.get("matmul_bf16_tflops")
    for prefix in (16384, 131072):
        for n in (64, 1024, 4096):
            if budget.left() < 0:
                rows.append({"tokens": n, "prefix": prefix, "skipped": "time budget"})
                continue
            total = n + prefix
            kc, vc, (table,) = _paged_cache([total], hk, d, page)
            q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
            flops = 4 * hq * d * (n * prefix + n * (n + 1) / 2)
            nbytes = 2 * total * hk * d * 2 + 2 * n * hq * d * 2  # K and V once, q in and o out
            floor_ms = max(nbytes / copy_gbps / 1e6 if copy_gbps else 0, flops / tflops_peak / 1e9 if tflops_peak
                           else 0) or None
            variants: dict[str, Callable[[], object]] = {}
            for kind in ("paged_causal", "gathered_causal"):
                batch = make_batch(kind, page, [LocalEntry(0, n, table, total, True)], dev)
                backend.plan_batches([batch])
                variants[kind] = partial(backend.run_batch, batch, q, None, None, pages_of(kc, vc),
                                         scale)
            if has_fixed:
                for split in (64, 256, 1024):  # pages of KV per chunk
                    w = _paged_prefill(fi, workspace, table, n, prefix, hq, hk, d, page, scale,
                                       fixed_split_size=split)
                    variants[f"paged split {split * page} tokens"] = partial(w.run, q, (kc, vc), return_lse=True)
            for segments in (8, 32) if n <= 1024 else ():  # the queries are repeated per segment
                run, s = _split_kv_prefill(fi, workspace, table, n, prefix, hq, hk, d, page, scale, segments)
                variants[f"split over {s} entries + merge"] = partial(run, q, kc, vc)
            row = {"tokens": n, "prefix": prefix, "floor_ms": floor_ms, "ms": {}, "errors": {}, "max_abs_diff": {}}
            want = variants["paged_causal"]()[0].float()
            for name, fn in variants.items():
                try:
                    out = fn()
                    out = out[0] if isinstance(out, tuple) else out
                    row["max_abs_diff"][name] = (want - out.float()).abs().max().item()
                    row["ms"][name] = bench_ms(fn)
                except Exception as e:  # a variant this flashinfer cannot run: keep the others
                    row["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
            row["tflops"] = {k: flops / ms / 1e9 for k, ms in row["ms"].items()}
            row["gbps"] = {k: nbytes / ms / 1e6 for k, ms in row["ms"].items()}
            rows.append(row)
            print(f"short turn {n} over {prefix}: floor {fmt(floor_ms, 3)} ms; " + "; ".join(
                f"{k} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s, {nbytes / ms / 1e6:.0f} GB/s"
                f"{f', {ms / floor_ms:.1f}x floor' if floor_ms else ''})" for k, ms in row["ms"].items()), flush=True)
            del kc, vc
            torch.cuda.empty_cache()


def moe_ep(rows: list, budget: Budget, tokens: list[int], ceil: dict) -> None:
    """One MoE layer of Qwen3-30B-A3B's shape (hidden 2048, 128 experts of 768, top-8, bf16) on T tokens, with the
    same weights: the TP-sliced forward (tp = 1, what a model without ``--enable-expert-parallel`` runs) as the
    server runs it (grouped GEMMs where the device takes them) and with the forms they replace (the per-expert loop
    above 128 tokens, the sync-free gathered / dense forms up to 128 and in graphs), beside the floor (the used
    experts' weights read once, or the routed FLOPs at the measured matmul rate); the expert-parallel exact path at
    EP size 1 (routing, pair counts, sort by owner, the identity exchanges, the experts, the combine at the source),
    and at decode sizes the static form of graph steps (fixed pair slots), also inside CUDA graphs where they
    capture. The EP / TP difference is the dispatch / combine path's cost without any communication; the all-to-all
    over N ranks adds ``2 * T * top_k * hidden * 2`` bytes per layer on the wire."""
    from server.layers.moe import FusedMoE, grouped_gemms
    from server.sp.groups import ParallelState

    hidden, experts, top_k, inter = 2048, 128, 8, 768
    dev = torch.device("cuda")
    layers = {}
    for ep in (False, True):
        with torch.device(dev):
            m = FusedMoE(experts, top_k, hidden, inter, ParallelState(device=dev, expert_parallel=ep),
                         torch.bfloat16)
        layers[ep] = m
    gen = torch.Generator(device=dev).manual_seed(0)
    for p in layers[False].parameters():
        p.data.normal_(0.0, 0.02, generator=gen)
    for name in ("gate", "w13", "w2"):
        getattr(layers[True], name).data.copy_(getattr(layers[False], name).data)
    copy_gbps, tflops = ceil.get("copy_gbps"), ceil.get("matmul_bf16_tflops")
    for t in tokens:
        if budget.left() <= 0:
            break
        x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        mask = torch.ones(t, dtype=torch.bool, device=dev)
        tp = layers[False]
        ref = tp(x)
        used = tp.route(x)[1].unique().numel()
        nbytes = used * 3 * hidden * inter * 2 + 2 * t * hidden * 2
        flops = 2 * t * top_k * 3 * hidden * inter
        floor_ms = max(nbytes / copy_gbps / 1e6 if copy_gbps else 0, flops / tflops / 1e9 if tflops else 0) or None
        row = {"tokens": t, "experts_used": used, "floor_ms": floor_ms, "grouped": tp.grouped_ok(x),
               "tp_sliced_ms": bench_ms(partial(tp, x)),
               "ep_exact_ms": bench_ms(partial(layers[True].expert_parallel_rows, x)),
               "ep_exact_err": rel_err(layers[True].expert_parallel_rows(x), ref)}
        with grouped_gemms(False):
            row["tp_replaced_ms"] = bench_ms(partial(tp, x))
            row["replaced_err"] = rel_err(tp(x), ref)
            if t <= 256:
                row["tp_replaced_graph_us"] = graph_us(partial(tp, x), calls=20)
        if t <= 256:
            row["ep_static_ms"] = bench_ms(partial(layers[True].expert_parallel_rows, x, mask))
            row["ep_static_err"] = rel_err(layers[True].expert_parallel_rows(x, mask), ref)
            row["tp_sliced_graph_us"] = graph_us(partial(tp, x), calls=20)
            row["ep_static_graph_us"] = graph_us(partial(layers[True].expert_parallel_rows, x, mask), calls=20)
        rows.append(row)
        print(json.dumps(row), flush=True)


GEMV_SWEEP = [(bn, bk, split, 4, stages) for bn in (16, 32, 64) for bk in (256, 512) for split in (1, 2, 4)
              for stages in (4, 6)]


def fp8_linear(rows: list, budget: Budget, ceil: dict) -> None:
    """Llama-3-8B's linear layers (qkv, o, gate/up, down) at decode row counts and one prefill chunk: bf16
    ``F.linear`` against FP8 weights (per-row scales as ``--quantization fp8`` stores them, and 128-column blocks as
    the published block-scaled checkpoints). FP8 columns: ``fp8_linear`` as the server runs it (up to
    ``GEMV_MAX_ROWS`` rows the GEMV of server/kernels/fp8_gemv.py), the W8A8 path the GEMV replaces (activations
    quantized per token, then ``torch._scaled_mm`` or the Triton block GEMM), the GEMV with Triton's own e4m3
    conversion instead of the PTX one, and the fastest tile configuration of a sweep (``GEMV_SWEEP``, per-row scales,
    1 and 32 rows), each beside the weight-read floor (weight bytes over the measured copy bandwidth)."""
    from dataclasses import replace

    from server.kernels import fp8_gemm
    from server.kernels.fp8 import quantize_per_row
    from server.kernels.fp8_gemv import GemvConfig, default_config, fp8_gemv

    copy_gbps = ceil.get("copy_gbps")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).to(torch.bfloat16)
        quant = {"row": quantize_per_row(w.float(), None), "block128": quantize_per_row(w.float(), 128)}
        for m in (1, 8, 16, 32, 64, 8192):
            if budget.left() <= 0:
                return
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = F.linear(x, w)
            row = {"layer": name, "n": n, "k": k, "rows": m, "bf16_ms": bench_ms(partial(F.linear, x, w)),
                   "bf16_floor_ms": n * k * 2 / copy_gbps / 1e6 if copy_gbps else None,
                   "fp8_floor_ms": n * k / copy_gbps / 1e6 if copy_gbps else None,
                   "gemv_max_rows": fp8_gemm.GEMV_MAX_ROWS}
            for kind, (q, scale) in quant.items():
                bk = 128 if kind == "block128" else k
                row[f"{kind}_ms"] = bench_ms(partial(fp8_gemm.fp8_linear, x, q, scale, bk))
                row[f"{kind}_err"] = rel_err(fp8_gemm.fp8_linear(x, q, scale, bk), ref)
                if m <= 64:
                    saved, fp8_gemm.GEMV_MAX_ROWS = fp8_gemm.GEMV_MAX_ROWS, 0
                    try:  # the W8A8 path
                        row[f"{kind}_w8a8_ms"] = bench_ms(partial(fp8_gemm.fp8_linear, x, q, scale, bk))
                    finally:
                        fp8_gemm.GEMV_MAX_ROWS = saved
                    cfg = default_config(m, n, k, 128 if kind == "block128" else None, sms)
                    row[f"{kind}_gemv_ms"] = bench_ms(partial(fp8_gemv, x, q, scale, bk, None, cfg))
                    row[f"{kind}_gemv_err"] = rel_err(fp8_gemv(x, q, scale, bk, None, cfg), ref)
                    row[f"{kind}_gemv_config"] = list(cfg.__dict__.values())
                    tri = replace(cfg, convert="triton")
                    row[f"{kind}_gemv_triton_convert_ms"] = bench_ms(partial(fp8_gemv, x, q, scale, bk, None, tri))
            if m in (1, 32) and budget.left() > 30:
                q, scale = quant["row"]
                best = None
                for bn, bkk, split, warps, stages in GEMV_SWEEP:
                    cfg = GemvConfig(bn, bkk, split, warps, stages)
                    try:
                        ms = bench_ms(partial(fp8_gemv, x, q, scale, k, None, cfg), rep=20)
                    except Exception:  # a tile that does not fit (shared memory): skipped
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, [bn, bkk, split, warps, stages])
                if best:
                    row["row_gemv_best_ms"], row["row_gemv_best_config"] = best
            rows.append(row)
            print(json.dumps(row), flush=True)


def moe_fp8(rows: list, budget: Budget, tokens: list[int]) -> None:
    """One MoE layer of Qwen3-30B-A3B's shape (hidden 2048, 128 experts of 768, top-8) with bf16 experts and with the
    same experts in FP8 (blocks of 128 x 128, as the published FP8 checkpoint): eager ms per call and, up to 128
    tokens, us per call replayed from a CUDA graph. FP8: up to 15 tokens the sync-free gathered form, 16 to 128 the
    dense form (the Triton kernels of server/kernels/fp8_moe.py), above 128 the grouped GEMMs on experts dequantized
    to bf16; bf16: the grouped GEMMs throughout (where the device takes them). ``err``: the FP8 layer's max error
    relative to the bf16 layer's largest output."""
    from server.kernels.fp8 import dequantize, quantize_per_row
    from server.layers.moe import FusedMoE
    from server.sp.groups import ParallelState

    hidden, experts, top_k, inter = 2048, 128, 8, 768
    dev = torch.device("cuda")
    with torch.device(dev):
        bf16, fp8 = (FusedMoE(experts, top_k, hidden, inter, ParallelState(device=dev), torch.bfloat16)
                     for _ in range(2))
    gen = torch.Generator(device=dev).manual_seed(0)
    for p in bf16.parameters():
        p.data.normal_(0.0, 0.02, generator=gen)
    fp8.gate.data.copy_(bf16.gate.data)
    for name in ("w13", "w2"):
        q, scale = quantize_per_row(getattr(bf16, name).data, 128)
        fp8.store_fp8(name, 128)
        getattr(fp8, name).data.copy_(q)
        getattr(fp8, name + "_scale").data.copy_(scale)
        getattr(bf16, name).data.copy_(dequantize(q, scale, 128))  # both layers compute the same weights
    for t in tokens:
        if budget.left() <= 0:
            break
        x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        ref = bf16(x)
        row = {"tokens": t, "bf16_ms": bench_ms(partial(bf16, x)), "fp8_ms": bench_ms(partial(fp8, x)),
               "err": ((fp8(x) - ref).abs().max() / ref.abs().max()).item()}
        if t <= 128:
            row["bf16_graph_us"] = graph_us(partial(bf16, x), calls=20)
            row["fp8_graph_us"] = graph_us(partial(fp8, x), calls=20)
        rows.append(row)
        print(json.dumps(row), flush=True)


def _bandwidth_table(rows: list[dict], copy: float | None, title: str, keys: tuple[str, str]) -> list[str]:
    """A GB/s table (with the fraction of the copy bandwidth) of the measured rows, keyed by two columns."""
    rows = [r for r in rows if "gbps" in r]
    if not rows:
        return []
    lines = [f"## {title}", "", f"| {keys[0]} | {keys[1]} | GB/s | of copy |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r[keys[0]]} | {r[keys[1]]} | {r['gbps']:.0f} | {fmt(r['gbps'] / copy if copy else None, 2)} |"
              for r in rows]
    return [*lines, ""]


def render_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Kernel benchmarks on {env['device']}", "",
             f"{env['date']}, `{env['command']}`; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), ""]
    ceil = res.get("ceilings", {})
    if "copy_gbps" in ceil:
        lines += [f"Measured ceilings: copy {ceil['copy_gbps']:.0f} GB/s (read + write), "
                  f"bf16 matmul {ceil['matmul_bf16_tflops']:.0f} TFLOP/s.", ""]
    pre = [r for r in res.get("lightning_prefill", []) if "gflop" in r]
    if pre:
        copy = ceil.get("copy_gbps")
        lines += ["## Lightning prefill (bf16, d = 128, one sequence, initial state in, final state out)", "",
                  "TFLOP/s by the count in `counting` (the same for both, so ratios are time ratios); GB/s counts",
                  "q, k, v, o once each.", "",
                  "| heads | tokens | ours (default) | fla chunk_simple_gla | ours / fla | ours GB/s (of copy) "
                  "| best variant |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in pre:
            ours, fla, gbps = r.get("ours_default_tflops"), r.get("fla_tflops"), r.get("ours_default_gbps")
            lines.append(
                f"| {r['heads']} | {r['tokens']} | {fmt(ours)} | {fmt(fla)} | "
                f"{fmt(ours / fla if ours and fla else None, 2)}x | {fmt(gbps)} "
                f"({fmt(gbps / copy if gbps and copy else None, 2)}) | {r.get('best_config')} "
                f"{fmt(r.get('ours_best_tflops'))} |")
        lines.append("")
    lines += _bandwidth_table(res.get("lightning_correction", []), ceil.get("copy_gbps"),
                              "LASP state correction (bf16)", ("heads", "tokens"))
    lines += _bandwidth_table(res.get("lightning_decode", []), ceil.get("copy_gbps"),
                              "Lightning decode (fp32 state pool, in place)", ("batch", "heads"))
    mer = [r for r in res.get("merge_state", []) if "gbps" in r]
    if mer:
        copy = ceil.get("copy_gbps")
        lines += ["## merge_state (bf16 o, fp32 lse; 32 heads x 128)", "", "| parts | tokens | impl | GB/s | of copy |",
                  "| ---: | ---: | --- | ---: | ---: |"]
        for r in mer:
            for name, g in r["gbps"].items():
                frac = fmt(g / copy if copy else None, 2)
                lines.append(f"| {r['parts']} | {r['tokens']} | {name} | {g:.0f} | {frac} |")
        lines.append("")
    ring = [r for r in res.get("ring_attention", []) if "tflops" in r]
    if ring:
        lines += ["## Ring-step attention on flashinfer (bf16, 32 q heads / 8 kv heads, d = 128)", "",
                  "| tokens per side | case | TFLOP/s (attention_runs) | TFLOP/s (bare single_prefill) |",
                  "| ---: | --- | ---: | ---: |"]
        lines += [f"| {r['tokens']} | {r['case']} | {r['tflops']:.0f} | {fmt(r.get('raw_single_prefill_tflops'))} |"
                  for r in ring]
        lines.append("")
    paged = [r for r in res.get("paged_attention", []) if "ms" in r or "tflops" in r]
    if paged:
        copy = ceil.get("copy_gbps")
        names = list(dict.fromkeys(n for r in paged if r["case"] == "prefill" for n in r["tflops"]))
        lines += ["## Batched local attention over the paged cache (bf16, 32 q / 8 kv heads, d = 128, page 16)", "",
                  "Prefill: one request of `tokens` new tokens after `prefix` cached ones, TFLOP/s by kind. "
                  "`per-request gather` is what each layer did per request before the batched calls.", "",
                  "| tokens | prefix | " + " | ".join(names) + " |", "| ---: | ---: |" + " ---: |" * len(names)]
        lines += [f"| {r['tokens']} | {r['prefix']} | " + " | ".join(fmt(r["tflops"].get(n)) for n in names) + " |"
                  for r in paged if r["case"] == "prefill"]
        lines += ["", "Decode: one query per request; `old loop` is one gathered call per request.", "",
                  "| batch | kv_len | ms | GB/s (of copy) | old loop ms | batch metadata (ms, host) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['batch']} | {r['kv_len']} | {r['ms']:.3f} | {r['gbps']:.0f} "
                  f"({fmt(r['gbps'] / copy if copy else None, 2)}) | {r['old_loop_ms']:.2f} "
                  f"| {r['make_batch_ms']:.2f} |"
                  for r in paged if r["case"] == "decode"]
        lines.append("")
    turns = [r for r in res.get("short_turn_attention", []) if r.get("ms")]
    if turns:
        names = list(dict.fromkeys(n for r in turns for n in r["ms"]))
        lines += ["## Short turns over a long cached prefix (one layer, bf16, 32 q / 8 kv heads, d = 128, page 16)", "",
                  "ms per kind (time over the floor, max(bytes / copy rate, FLOPs / matmul rate), in brackets).", "",
                  "| tokens | prefix | floor ms | " + " | ".join(names) + " |",
                  "| ---: | ---: | ---: |" + " ---: |" * len(names)]
        for r in turns:
            fl = r.get("floor_ms")
            cells = [f"{r['ms'][n]:.3f} ({fmt(r['ms'][n] / fl if fl else None, 1)}x)" if n in r["ms"] else "-"
                     for n in names]
            lines.append(f"| {r['tokens']} | {r['prefix']} | {fmt(fl, 3)} | " + " | ".join(cells) + " |")
        lines.append("")
    pw = [r for r in res.get("pointwise", []) if "torch_us" in r]
    if pw:
        lines += ["## Pointwise ops of a decoder layer (bf16, Llama-3-8B widths), inside CUDA graphs", "",
                  "| op | rows | torch us / call | Triton us / call | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['op']} | {r['rows']} | {r['torch_us']:.1f} | {r['triton_us']:.1f} | "
                  f"{r['torch_us'] / r['triton_us']:.1f}x |" for r in pw]
        lines.append("")
    gd = [r for r in res.get("gdn", []) if "prefill_ms" in r]
    if gd:
        lines += ["## Gated DeltaNet at the Qwen3.5-27B layer shape (bf16, 16 / 48 heads of 128, one sequence)", "",
                  "| tokens | chunked prefill ms | SP chunk-affine pass ms | correction ms | (affine + correction) / "
                  "prefill |", "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['tokens']} | {r['prefill_ms']:.2f} | {r['chunk_affine_ms']:.2f} | {r['correction_ms']:.2f} | "
                  f"{r['sp_pass_over_prefill']:.2f} |" for r in gd]
        lines.append("")
    moe = [r for r in res.get("moe_ep", []) if "tp_sliced_ms" in r]
    if moe:
        lines += ["## One MoE layer: grouped GEMMs vs the forms they replace; expert-parallel dispatch / combine at "
                  "EP size 1", "",
                  "Qwen3-30B-A3B experts (hidden 2048, 128 x 768, top-8, bf16), the same weights. TP-sliced: what the "
                  "server runs (grouped GEMMs where `grouped`), and the per-expert loop (above 128 tokens) or the "
                  "sync-free forms (up to 128) they replace; floor: the used experts' weights read once or the routed "
                  "FLOPs at the measured matmul rate; graph columns are us per call replayed from a CUDA graph.", "",
                  "| tokens | experts used | floor ms | grouped | TP-sliced ms | of floor | replaced form ms | "
                  "TP-sliced graph us | replaced graph us | EP exact ms | EP / TP | EP static ms | EP static graph us "
                  "| max rel. err |", "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                  "---: | ---: | ---: |"]
        lines += [f"| {r['tokens']} | {r.get('experts_used', '-')} | {fmt(r.get('floor_ms'), 3)} | "
                  f"{r.get('grouped', '-')} | {r['tp_sliced_ms']:.3f} | "
                  f"{fmt(r['floor_ms'] / r['tp_sliced_ms'] if r.get('floor_ms') else None, 2)} | "
                  f"{fmt(r.get('tp_replaced_ms'), 3)} | {fmt(r.get('tp_sliced_graph_us'), 1)} | "
                  f"{fmt(r.get('tp_replaced_graph_us'), 1)} | {r['ep_exact_ms']:.3f} | "
                  f"{r['ep_exact_ms'] / r['tp_sliced_ms']:.2f} | {fmt(r.get('ep_static_ms'), 3)} | "
                  f"{fmt(r.get('ep_static_graph_us'), 1)} | "
                  f"{max(r['ep_exact_err'], r.get('ep_static_err', 0.0), r.get('replaced_err', 0.0)):.1e} |"
                  for r in moe]
        lines.append("")
    mf = [r for r in res.get("moe_fp8", []) if "fp8_ms" in r]
    if mf:
        lines += ["## One MoE layer: FP8 experts (blocks of 128) vs bf16 experts", "",
                  "Qwen3-30B-A3B experts (hidden 2048, 128 x 768, top-8), bf16 activations. FP8: up to 15 tokens the "
                  "gathered form, 16-128 the dense form, above the grouped GEMMs on dequantized experts; bf16: the "
                  "grouped GEMMs; graph columns are us per call.",
                  "", "| tokens | bf16 ms | FP8 ms | FP8 / bf16 | bf16 graph us | FP8 graph us | max rel. err |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['tokens']} | {r['bf16_ms']:.3f} | {r['fp8_ms']:.3f} | {r['fp8_ms'] / r['bf16_ms']:.2f} | "
                  f"{fmt(r.get('bf16_graph_us'), 1)} | {fmt(r.get('fp8_graph_us'), 1)} | {r['err']:.1e} |"
                  for r in mf]
        lines.append("")
    fl = [r for r in res.get("fp8_linear", []) if "bf16_ms" in r]
    if fl:
        lines += ["## FP8 linear layers vs bf16 (Llama-3-8B shapes)", "",
                  "ms per call; `row` = per-row scales, `block128` = 128-column blocks; `server` = `fp8_linear` as the "
                  "server runs it, `w8a8` = activations quantized + FP8 tensor-core GEMM, `gemv` = the decode GEMV "
                  "(default tiles; `tri` with Triton's e4m3 conversion; `best` = the sweep's fastest tiles, per-row); "
                  "floors: the weight bytes over the copy bandwidth.", "",
                  "| layer | rows | bf16 | bf16 floor | row server | row w8a8 | row gemv | row gemv tri | row best "
                  "(tiles) | block128 server | block128 w8a8 | block128 gemv | FP8 floor | server / bf16 | "
                  "gemv rel. err |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | "
                  "---: |"]
        lines += [f"| {r['layer']} | {r['rows']} | {r['bf16_ms']:.4f} | {fmt(r.get('bf16_floor_ms'), 4)} | "
                  f"{r['row_ms']:.4f} | {fmt(r.get('row_w8a8_ms'), 4)} | {fmt(r.get('row_gemv_ms'), 4)} | "
                  f"{fmt(r.get('row_gemv_triton_convert_ms'), 4)} | {fmt(r.get('row_gemv_best_ms'), 4)} "
                  f"{r.get('row_gemv_best_config', '')} | {r['block128_ms']:.4f} | "
                  f"{fmt(r.get('block128_w8a8_ms'), 4)} | {fmt(r.get('block128_gemv_ms'), 4)} | "
                  f"{fmt(r.get('fp8_floor_ms'), 4)} | {min(r['row_ms'], r['block128_ms']) / r['bf16_ms']:.2f} | "
                  f"{r.get('row_gemv_err', float('nan')):.1e} |" for r in fl]
        lines.append("")
    kd = [r for r in res.get("kda", []) if "prefill_ms" in r]
    if kd:
        lines += ["## KDA at the Kimi-Linear-48B-A3B layer shape (bf16, 32 heads of 128, per-channel decays)", "",
                  "| tokens | fla chunk_kda ms | our op ms | op / fla | SP chunk-affine pass ms | correction ms | "
                  "(affine + correction) / prefill |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['tokens']} | {r['fla_chunk_kda_ms']:.2f} | {r['prefill_ms']:.2f} | {r['op_over_fla']:.2f} | "
                  f"{r['chunk_affine_ms']:.2f} | {r['correction_ms']:.2f} | {r['sp_pass_over_prefill']:.2f} |"
                  for r in kd]
        lines.append("")
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--sections", nargs="+", default=["ceilings", "merge_state", "lightning_decode",
                                                      "lightning_correction", "ring_attention", "paged_attention",
                                                      "lightning_prefill", "pointwise", "gdn", "kda",
                                                      "short_turn_attention"])
    p.add_argument("--heads", type=int, nargs="+", default=[64, 32, 16, 8], help="64 / tp for tp = 1, 2, 4, 8")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--configs", nargs="+", default=list(PREFILL_CONFIGS), choices=list(PREFILL_CONFIGS))
    p.add_argument("--ring-tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--moe-tokens", type=int, nargs="+", default=[1, 8, 64, 256, 4096, 32768],
                   help="tokens of the moe_ep and moe_fp8 sections")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later cases are skipped once spent")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    budget = Budget(args.time_budget)
    res = {"environment": environment(), "counting": COUNTING}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels_{device_slug(res['environment']['device'])}"
    runners = {
        "ceilings": lambda r: ceilings(r, budget),
        "lightning_prefill": lambda r: lightning_prefill(r, budget, args.heads, args.tokens, args.configs),
        "ring_attention": lambda r: ring_attention(r, budget, args.ring_tokens),
        "merge_state": lambda r: merge_state(r, budget),
        "lightning_decode": lambda r: lightning_decode(r, budget),
        "lightning_correction": lambda r: lightning_correction(r, budget),
        "paged_attention": lambda r: paged_attention(r, budget),
        "pointwise": lambda r: pointwise(r, budget),
        "gdn": lambda r: gdn(r, budget),
        "moe_ep": lambda r: moe_ep(r, budget, args.moe_tokens, res.get("ceilings", {})),
        "moe_fp8": lambda r: moe_fp8(r, budget, args.moe_tokens),
        "fp8_linear": lambda r: fp8_linear(r, budget, res.get("ceilings", {})),
        "kda": lambda r: kda(r, budget),
        "short_turn_attention": lambda r: short_turn_attention(r, budget, res.get("ceilings", {})),
    }
    for section in args.sections:
        res[section] = {} if section == "ceilings" else []
        try:
            runners[section](res[section])
        except Exception as e:  # keep the other sections' results
            res[f"{section}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"{section} failed: {res[f'{section}_error']}", file=sys.stderr)
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, stem.with_suffix(".json"))
    md = render_markdown(res)
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
