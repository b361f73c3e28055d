"""The share of a gpt-oss prefill spent in its sliding-window layers' attention, on one GPU.

Measures the TTFT of one prompt (dummy weights, one prefill step) and, at the model's attention shape, one
layer's attention kernel causal over the whole prompt and with the window (flashinfer, ``window_left = w - 1``),
then prints each layer kind's attention time times its layer count, as a share of the TTFT.

    python benchmarks/bench_window_share.py --model gpt-oss-20b --context 131000

(131000: the prompt plus its one output token stay within gpt-oss's 131072 positions.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.model_shapes import SHAPES, shape_dir  # noqa: E402
from server import LLM, SamplingParams  # noqa: E402


def kernel_ms(n: int, cfg: dict, window: int | None, reps: int = 5) -> float:
    """One layer's prefill attention over n tokens (bf16, flashinfer), milliseconds."""
    import flashinfer

    hq, hk, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    left = -1 if window is None else window - 1

    def call():
        flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, sm_scale=d**-0.5, kv_layout="NHD",
                                                return_lse=True, window_left=left)

    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-oss-20b", choices=[m for m in SHAPES if m.startswith("gpt-oss")])
    ap.add_argument("--context", type=int, default=131000)
    args = ap.parse_args()
    cfg, n = SHAPES[args.model], args.context
    with LLM(shape_dir(args.model), device="cuda", load_format="dummy", chunked_prefill_size=n,
             max_model_len=n + 8, cuda_graph="off", enable_prefix_cache=False) as llm:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate([list(range(4096))], params)  # warm-up
        ids = torch.randint(0, cfg["vocab_size"], (n,)).tolist()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            llm.generate([ids], params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
    ttft = min(times) * 1e3
    kinds = cfg["layer_types"]
    win, full = kernel_ms(n, cfg, cfg["sliding_window"]), kernel_ms(n, cfg, None)
    n_win, n_full = kinds.count("sliding_attention"), kinds.count("full_attention")
    print(f"{args.model} context {n}: TTFT {ttft:.1f} ms")
    print(f"  sliding-window attention: {win:.2f} ms/layer x {n_win} = {win * n_win:.1f} ms "
          f"({100 * win * n_win / ttft:.2f}% of TTFT)")
    print(f"  full attention:           {full:.2f} ms/layer x {n_full} = {full * n_full:.1f} ms "
          f"({100 * full * n_full / ttft:.2f}% of TTFT)")


if __name__ == "__main__":
    main()
