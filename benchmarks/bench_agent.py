"""Agent benchmark: concurrent sessions whose turns each append a tool result to a growing context, with the
prefix cache on and off; per-turn TTFT beside its floor, ITL, and output tokens/s.

A session starts with a ``--initial-len``-token prompt (system prompt and task). Each turn the model answers
``--output-len`` tokens (a tool call; greedy, dummy weights), then a tool result of ``--tool-min``..``--tool-max``
random tokens is appended, and the next turn's prompt is the whole conversation, until it would pass
``--max-context``. ``--sessions`` sessions run at once on one offline engine (each has one turn in flight at a
time, submitted as soon as its previous turn ended), so turns of one session prefill while the others decode, as
an agent server sees them.

With the cache on, a turn's new tokens are its tool result and the previous answer (the rest is cached). Its floor
is ``max(bytes / copy bandwidth, FLOPs / bf16 matmul rate)`` on one GPU: the bytes are the weights, the KV of the
whole context read once and the new tokens' KV written; the FLOPs those of the new tokens over the cached prefix
(``benchmarks/model_shapes.prefill_flops``). With the cache off, a sample of the same prompts (``--off-turns``,
spread over the context lengths) is replayed one at a time, each computing its whole prompt.

    python benchmarks/bench_agent.py --model llama3-8b --sessions 4 --max-context 131072 \\
        --out benchmarks/results/agent_h200.json

JSON: ``{"environment", "copy_gbps", "matmul_tflops", "rows": [{model, sp, cache, session, turn, context,
new_tokens, cached_tokens, ttft_s, floor_s, itl_ms, output_tokens}, ..., {"summary": ...}]}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode import copy_gbps  # noqa: E402
from benchmarks.bench_prefill import model_config, model_dir, results_log  # noqa: E402
from benchmarks.model_shapes import prefill_flops  # noqa: E402
from server import SamplingParams  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.messages import GenerateRequest  # noqa: E402


def matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul rate (8192^3), TFLOP/s."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    return 2 * 8192**3 / ((time.perf_counter() - start) / 10) / 1e12


def turn_floor_s(engine: Engine, cfg: dict, context: int, new: int, gbps: float | None,
                 tflops: float | None) -> float | None:
    """The floor of a turn computing ``new`` tokens over ``context - new`` cached ones (see the module docstring)."""
    if not gbps or not tflops:
        return None
    r = engine.runner
    weights = sum(p.numel() * p.element_size() for p in r.model.parameters())
    kv_per_token = r.cache_bytes_per_page() // engine.config.page_size
    data = weights + context * kv_per_token + new * kv_per_token + 2 * r.state_bytes_per_slot()
    flops = prefill_flops(cfg, context) - prefill_flops(cfg, context - new) + 2 * cfg["hidden_size"] * cfg[
        "vocab_size"]
    return max(data / (gbps * 1e9), flops / (tflops * 1e12))


class Session:
    """One agent conversation: its token ids so far and its turn in flight."""

    def __init__(self, index: int, initial: list[int]):
        self.index, self.ids, self.turn = index, initial, 0
        self.rid: str | None = None
        self.out: list[int] = []
        self.submitted = self.first = self.last = 0.0
        self.ttft = 0.0


def run_trace(args, model: str, sp: int, cache: bool, emit, gbps, tflops) -> list[list[int]]:
    """The trace (every session's turns at once); the prompts it sent, for the cache-off replay."""
    cfg = model_config(model)
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    engine = make_engine(args, model, sp, cache)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    sessions = [Session(i, ids(args.initial_len)) for i in range(args.sessions)]
    prompts: list[list[int]] = []
    started = time.perf_counter()
    output_tokens = 0
    bar = tqdm(desc=f"{model} sp={sp} trace", unit="turn", mininterval=5)
    try:
        live = list(sessions)
        for s in live:
            submit(engine, s, params, prompts)
        while live:
            for o in engine.step():
                s = next(x for x in live if x.rid == o.rid)
                now = time.perf_counter()
                if o.new_token_ids and not s.out:
                    s.first, s.ttft = now, o.ttft_s
                s.out += o.new_token_ids
                s.last = now
                if not o.finished:
                    continue
                output_tokens += len(s.out)
                context = len(s.ids)
                new = context - o.cached_tokens
                emit({"model": model, "sp": sp, "cache": cache, "session": s.index, "turn": s.turn,
                      "context": context, "new_tokens": new, "cached_tokens": o.cached_tokens, "ttft_s": s.ttft,
                      "floor_s": turn_floor_s(engine, cfg, context, new, gbps, tflops),
                      "itl_ms": (s.last - s.first) / max(1, len(s.out) - 1) * 1e3, "output_tokens": len(s.out)})
                bar.update(1)
                tool = ids(int(torch.randint(args.tool_min, args.tool_max + 1, (1,), generator=g)))
                s.ids = s.ids + s.out + tool
                s.turn += 1
                if len(s.ids) + args.output_len > args.max_context:
                    live.remove(s)
                else:
                    submit(engine, s, params, prompts)
        wall = time.perf_counter() - started
        emit({"model": model, "sp": sp, "cache": cache, "summary": "trace", "sessions": args.sessions,
              "wall_s": wall, "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / wall})
    finally:
        bar.close()
        engine.shutdown()
    return prompts


def submit(engine: Engine, s: Session, params: SamplingParams, prompts: list[list[int]]) -> None:
    s.rid, s.out = f"s{s.index}-t{s.turn}", []
    prompts.append(list(s.ids))
    engine.add_request(GenerateRequest(s.rid, list(s.ids), SamplingParams(**vars(params))))


def make_engine(args, model: str, sp: int, cache: bool) -> Engine:
    return Engine(EngineConfig(model_path=model_dir(model), load_format="dummy", sp_size=sp,
                               enable_prefix_cache=cache, max_running_requests=max(args.sessions, 4),
                               cuda_graph_max_bs=max(args.sessions, 4), max_model_len=args.max_context + 64,
                               mem_fraction_static=args.mem_fraction_static, device=args.device,
                               **({"cpu_cache_gb": args.cpu_cache_gb} if args.device == "cpu" else {})))


def replay_without_cache(args, model: str, sp: int, prompts: list[list[int]], emit, gbps, tflops) -> None:
    """``--off-turns`` of the trace's prompts, spread over their lengths, one at a time with the cache off."""
    cfg = model_config(model)
    chosen = sorted(prompts, key=len)
    if args.off_turns < len(chosen):
        step = (len(chosen) - 1) / max(1, args.off_turns - 1)
        chosen = [chosen[round(i * step)] for i in range(args.off_turns)]
    engine = make_engine(args, model, sp, cache=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    try:
        for i, prompt in enumerate(tqdm(chosen, desc=f"{model} sp={sp} no cache", mininterval=5)):
            engine.add_request(GenerateRequest(f"off-{i}", prompt, params))
            out, first, last, ttft = [], 0.0, 0.0, 0.0
            while engine.has_unfinished():
                for o in engine.step():
                    now = time.perf_counter()
                    if o.new_token_ids and not out:
                        first, ttft = now, o.ttft_s
                    out += o.new_token_ids
                    last = now
            emit({"model": model, "sp": sp, "cache": False, "session": 0, "turn": i, "context": len(prompt),
                  "new_tokens": len(prompt), "cached_tokens": 0, "ttft_s": ttft,
                  "floor_s": turn_floor_s(engine, cfg, len(prompt), len(prompt), gbps, tflops),
                  "itl_ms": (last - first) / max(1, len(out) - 1) * 1e3, "output_tokens": len(out)})
    finally:
        engine.shutdown()


def print_summary(rows: list[dict]) -> None:
    """Per context bucket: median TTFT beside the median floor, ITL; then the traces' output tokens/s."""
    turns = [r for r in rows if "turn" in r]
    print("| model | sp | cache | context | turns | new tokens (median) | TTFT ms (median) | floor ms | of floor | "
          "ITL ms |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    edges = [0, 16384, 32768, 65536, 131072, 1 << 40]
    for key in dict.fromkeys((r["model"], r["sp"], r["cache"]) for r in turns):
        for lo, hi in zip(edges, edges[1:]):
            cell = [r for r in turns if (r["model"], r["sp"], r["cache"]) == key and lo <= r["context"] < hi]
            if not cell:
                continue
            ttft = statistics.median(r["ttft_s"] for r in cell) * 1e3
            floors = [r["floor_s"] for r in cell if r["floor_s"]]
            floor = statistics.median(floors) * 1e3 if floors else None
            ratio = f"{ttft / floor:.2f}" if floor else ""
            floor_text = f"{floor:.1f}" if floor else ""
            print(f"| {key[0]} | {key[1]} | {key[2]} | {lo // 1024}K-{min(hi, 1 << 20) // 1024}K | {len(cell)} | "
                  f"{statistics.median(r['new_tokens'] for r in cell):.0f} | {ttft:.1f} | {floor_text} | {ratio} | "
                  f"{statistics.median(r['itl_ms'] for r in cell):.2f} |")
    for r in rows:
        if r.get("summary") == "trace":
            print(f"{r['model']} sp={r['sp']}: {r['sessions']} sessions, {r['output_tokens']} output tokens in "
                  f"{r['wall_s']:.1f} s = {r['output_tokens_per_s']:.1f} tokens/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llama3-8b"])
    ap.add_argument("--sp-size", nargs="+", type=int, default=[1])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--initial-len", type=int, default=4096)
    ap.add_argument("--tool-min", type=int, default=200)
    ap.add_argument("--tool-max", type=int, default=4000)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-context", type=int, default=131072)
    ap.add_argument("--cache", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--off-turns", type=int, default=6, help="prompts of the trace replayed with the cache off")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-cache-gb", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    gbps, tflops = copy_gbps(device), matmul_tflops(device)
    rows, emit = results_log(args.out, copy_gbps=gbps, matmul_tflops=tflops)
    for model in args.model:
        for sp in args.sp_size:
            prompts = run_trace(args, model, sp, "on" in args.cache, emit, gbps, tflops)
            if "off" in args.cache:
                replay_without_cache(args, model, sp, prompts, emit, gbps, tflops)
    print(f"copy bandwidth {gbps and round(gbps)} GB/s, bf16 matmul {tflops and round(tflops)} TFLOP/s")
    print_summary(rows)


if __name__ == "__main__":
    main()
