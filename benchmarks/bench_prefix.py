"""Prefix-cache benchmark: one long document, then questions about it and follow-up turns, with the cache on and
off, at each SP size.

Every turn is one request (greedy, ``--output-len`` tokens) on the offline engine: turn 0 is the document plus the
first question; turns 1..Q are the document plus another question (siblings); then ``--follow-ups`` turns each
extend the previous conversation (the previous prompt, its answer, a new question). TTFT is measured per turn
(``CompletionOutput.ttft_s``), with the prompt tokens the cache served; decode ITL over the answer is reported too
(the cache must not slow decode). Random token ids at real model shapes (dummy weights). Each turn's floor is
beside it: max(bytes it must read (the weights, the KV of the prompt) over the measured copy rate, its FLOPs (the
weights' matmuls of its new tokens, attention to every earlier token) over the measured bf16 matmul rate).
``--cuda-graph-max-extend-tokens`` takes several values: each is a run (0: short turns run eagerly; 256: turns of up
to 256 new tokens replay a CUDA graph).

A short turn over a 128K cached prefix, 64 / 1K / 4K new tokens, with the extend graphs off and on:

    python benchmarks/bench_prefix.py --model llama3-8b --doc-len 131072 --question-len 64 --questions 2 \
        --follow-ups 0 --sp-size 1 --cache on --cuda-graph-max-extend-tokens 0 256 --warmup-len 4096

    python benchmarks/bench_prefix.py --model llama3-8b minimax-hybrid --doc-len 131072 --questions 5 \\
        --sp-size 1 2 --out benchmarks/results/prefix_h200x2.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_prefill import model_config, model_dir, results_log  # noqa: E402
from server import LLM, SamplingParams  # noqa: E402


def turns(args, vocab: int) -> list[list[int]]:
    """The prompts of every turn except the follow-ups (which need the previous answers)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    doc = ids(args.doc_len)
    return [doc + ids(args.question_len) for _ in range(args.questions + 1)]


def device_rates(device: str) -> tuple[float | None, float | None]:
    """Measured copy rate (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s); None off CUDA."""
    if device != "cuda":
        return None, None
    from benchmarks.bench_decode import copy_gbps

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * 8192**3 * 20 / (time.perf_counter() - start) / 1e12
    return copy_gbps(torch.device("cuda")), tflops


def turn_floor_ms(llm: LLM, new: int, cached: int, gbps: float | None, tflops: float | None) -> float | None:
    """A turn's floor on one rank (sp = 1): max(weights + the prompt's KV over the copy rate, the new tokens'
    matmul and attention FLOPs over the matmul rate)."""
    if gbps is None or tflops is None:
        return None
    r = llm.engine.runner
    weights = sum(p.numel() * p.element_size() for p in r.model.parameters())
    matmul_params = sum(p.numel() for n, p in r.model.named_parameters() if p.dim() == 2 and "embed" not in n)
    kv = r.cache_bytes_per_page() // r.config.page_size * (cached + new)
    g = r._geometry()
    softmax_layers = sum(1 for _, spec in r.cache_layers if spec.paged)
    attention = 4 * softmax_layers * g.num_heads * g.head_dim * (new * cached + new * (new + 1) / 2) if g else 0
    flops = 2 * matmul_params * new + attention
    return max((weights + kv) / gbps / 1e6, flops / tflops / 1e9)


def run_config(args, model: str, sp: int, cache: bool, extend: int, rates, emit) -> None:
    vocab = model_config(model)["vocab_size"]
    kw = dict(load_format="dummy", sp_size=sp, enable_prefix_cache=cache, device=args.device, cuda_graph_max_bs=4,
              cuda_graph_max_extend_tokens=extend,
              max_model_len=args.doc_len + (args.follow_ups + 2) * (args.question_len + args.output_len) + 64)
    if args.chunked_prefill_size:
        kw["chunked_prefill_size"] = args.chunked_prefill_size
    if args.device == "cpu":
        kw["cpu_cache_gb"] = args.cpu_cache_gb
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    with LLM(model_dir(model), **kw) as llm:
        if args.warmup_len:  # kernels compile and tune on first use: keep that out of the first turn
            llm.generate([torch.randint(0, vocab, (args.warmup_len,), generator=g).tolist()],
                         SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        prompts = turns(args, vocab)
        names = ["first"] + [f"question {i}" for i in range(1, len(prompts))]
        history = None
        n_turns = len(prompts) + args.follow_ups
        if not cache and args.off_turns:
            n_turns = min(n_turns, args.off_turns)
        for i in tqdm(range(n_turns), desc=f"{model} sp={sp} cache={cache}", mininterval=5):
            if i < len(prompts):
                prompt, name = prompts[i], names[i]
            else:  # the conversation goes on: the previous turn, its answer, a new question
                prompt = history + torch.randint(0, vocab, (args.question_len,), generator=g).tolist()
                name = f"follow-up {i - len(prompts) + 1}"
            start = time.perf_counter()
            [out] = llm.generate([prompt], params, use_tqdm=False)
            total = time.perf_counter() - start
            history = prompt + out.token_ids
            itl = (total - out.ttft_s) / max(1, len(out.token_ids) - 1)
            floor = turn_floor_ms(llm, len(prompt) - out.cached_tokens, out.cached_tokens, *rates) if sp == 1 else None
            emit({"model": model, "sp": sp, "cache": cache, "extend_graph_tokens": extend, "turn": i, "name": name,
                  "prompt_tokens": len(prompt), "cached_tokens": out.cached_tokens, "ttft_s": out.ttft_s,
                  "itl_ms": itl * 1e3, "floor_ms": floor})
        if args.profile and cache:
            question = prompts[0][: args.doc_len] + torch.randint(0, vocab, (args.question_len,), generator=g).tolist()
            emit(profiled_question(args, llm, question, model, sp))


def profiled_question(args, llm: LLM, prompt: list[int], model: str, sp: int) -> dict:
    """One more sibling question, prefill only (one output token), under ``torch.profiler`` on every rank
    (``LLM.start_profile``): where its TTFT goes. Each rank's Chrome trace and op table (by input shape) go to a
    directory beside ``--out``; the row has the TTFT and, by rank, the device time of its kernels (collectives
    included: a kernel waiting for a peer counts as busy) and the host time of its ops."""
    base = os.path.splitext(args.out)[0] if args.out else "bench_prefix"
    out_dir = f"{base}_profile_{os.path.basename(model.rstrip('/'))}_sp{sp}"
    llm.start_profile(out_dir, record_shapes=True)
    try:
        [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    finally:
        ranks = llm.stop_profile()
    return {"model": model, "sp": sp, "cache": True, "turn": -1, "name": "profiled question",
            "prompt_tokens": len(prompt), "cached_tokens": out.cached_tokens, "ttft_s": out.ttft_s, "itl_ms": 0.0,
            "profile_dir": out_dir, "device_ms": [r.get("device_ms") for r in ranks],
            "host_op_ms": [r.get("host_op_ms") for r in ranks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llama3-8b"])
    ap.add_argument("--doc-len", type=int, default=131072)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--follow-ups", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--sp-size", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--chunked-prefill-size", type=int, default=0, help="0: the engine's default")
    ap.add_argument("--off-turns", type=int, default=0,
                    help="with the cache off, run only the first N turns (0: all); a later turn is compared with "
                         "the cache-off turn of the nearest prompt length")
    ap.add_argument("--cache", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--warmup-len", type=int, default=0,
                    help="first run one unmeasured prompt of this many tokens (compiles and tunes the kernels)")
    ap.add_argument("--profile", action="store_true",
                    help="after the cache-on turns, one more question (prefill only) under torch.profiler on every "
                         "rank: traces and op tables in a directory next to --out, device and host times by rank "
                         "in a row named 'profiled question'")
    ap.add_argument("--cuda-graph-max-extend-tokens", nargs="+", type=int, default=[256],
                    help="one run per value: extend steps of up to this many tokens replay a CUDA graph (0: none)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-cache-gb", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, emit = results_log(args.out)
    rates = device_rates(args.device)
    print(f"copy {rates[0] and round(rates[0])} GB/s, bf16 matmul {rates[1] and round(rates[1])} TFLOP/s")

    for model in args.model:
        for sp in args.sp_size:
            for extend in args.cuda_graph_max_extend_tokens:
                for cache in (c == "on" for c in args.cache):
                    run_config(args, model, sp, cache, extend, rates, emit)
    print("| model | sp | extend graphs | turn | prompt | cached | TTFT (ms) | floor (ms) | of floor |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["cache"] and r["turn"] >= 0:
            fl = r["floor_ms"]
            print(f"| {r['model']} | {r['sp']} | {r['extend_graph_tokens']} | {r['name']} | {r['prompt_tokens']} | "
                  f"{r['cached_tokens']} | {r['ttft_s'] * 1e3:.1f} | {fl and round(fl, 1)} | "
                  f"{fl and round(r['ttft_s'] * 1e3 / fl, 2)} |")
    if "on" not in args.cache:
        print("| model | sp | turn | prompt | TTFT without cache (s) | ITL (ms) |")
        print("|---|---:|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['sp']} | {r['name']} | {r['prompt_tokens']} | {r['ttft_s']:.3f} | "
                  f"{r['itl_ms']:.2f} |")
        return
    print("| model | sp | turn | prompt | cached | TTFT on (s) | TTFT off (s) | speedup | ITL on / off (ms) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for on in (r for r in rows if r["cache"]):
        key = ("model", "sp", "extend_graph_tokens")
        offs = [r for r in rows if not r["cache"] and all(r.get(k) == on.get(k) for k in key)]
        if not offs:
            continue
        off = next((r for r in offs if r["turn"] == on["turn"]), None) or \
            min(offs, key=lambda r: abs(r["prompt_tokens"] - on["prompt_tokens"]))
        print(f"| {on['model']} | {on['sp']} | {on['name']} | {on['prompt_tokens']} | {on['cached_tokens']} | "
              f"{on['ttft_s']:.3f} | {off['ttft_s']:.3f} | {off['ttft_s'] / on['ttft_s']:.1f}x | "
              f"{on['itl_ms']:.2f} / {off['itl_ms']:.2f} |")


if __name__ == "__main__":
    main()
