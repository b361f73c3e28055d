"""HTTP load generator for the OpenAI-compatible server: TTFT, TPOT, ITL, end-to-end latency and throughputs.

Sends ``--num-prompts`` streaming ``/v1/completions`` requests of exactly ``--input-len`` prompt tokens (random
token ids, or text decoded from random ids with ``--prompt-format text``) and ``--output-len`` completion tokens
(``ignore_eos``), either as a Poisson process of ``--request-rate`` requests/s or as fast as
``--max-concurrency`` allows. Prints one JSON line of results (mean, median, p99 of each latency) and appends it to
``--output-file``.

    python launch_server.py --port 30000 &
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000 --num-prompts 200 \\
        --input-len 1024 --output-len 128 --max-concurrency 16

TTFT: request sent -> first streamed token. ITL: time between streamed chunks. TPOT: (E2E - TTFT) / (output
tokens - 1) per request. Token counts come from the server's ``usage``. Requests ask for ``return_token_ids``
(vLLM's field; this server's too), so a token whose text is empty or still held back by the detokenizer (a
tokenizer whose vocabulary is smaller than the model's, as with dummy weights at a real shape) still has its chunk;
``--text-chunks`` leaves the field out, for servers without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `server` (for --prompt-format text) without install


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default=None, help="model name to send; default: the server's (GET /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="completion tokens per request")
    p.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                   help="ids: token-id prompts of exactly --input-len; text: random ids decoded with the tokenizer")
    p.add_argument("--tokenizer-path", default=None, help="tokenizer directory (needed for --prompt-format text)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second (Poisson arrivals); inf sends every request at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--num-warmup", type=int, default=1, help="requests sent (and not measured) before the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout in seconds")
    p.add_argument("--output-file", default=None, help="append the JSON line here too")
    p.add_argument("--text-chunks", action="store_true",
                   help="leave out return_token_ids: a token counts as streamed only when its chunk has text")
    p.add_argument("--disable-tqdm", action="store_true")
    return p.parse_args(argv)


def make_prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int] | str]:
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, vocab_size, size=(args.num_prompts, args.input_len)).tolist()
    if args.prompt_format == "ids":
        return ids
    if args.tokenizer_path is None:
        sys.exit("bench_serving.py: error: --prompt-format text needs --tokenizer-path")
    from server.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer_path)
    return [tok.decode(p) for p in ids]


async def send_request(http: httpx.AsyncClient, body: dict) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0].get("token_ids")):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e_s = time.perf_counter() - start
    res.ok = last is not None
    res.error = "" if res.ok else "no tokens received"
    return res


async def arrivals(n: int, rate: float, rng: np.random.Generator):
    """Yield 0..n-1 at Poisson arrival times of ``rate`` per second (all at once when rate is inf)."""
    for i in range(n):
        yield i
        if math.isfinite(rate):
            await asyncio.sleep(rng.exponential(1.0 / rate))


def stats_ms(values: list[float], name: str) -> dict[str, float]:
    arr = np.array(values or [0.0]) * 1000.0
    return {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
            f"p99_{name}_ms": float(np.percentile(arr, 99))}


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout,
                                 limits=limits) as http:
        card = (await http.get("/v1/models")).raise_for_status().json()["data"][0]
        model = args.model or card["id"]
        prompts = make_prompts(args, card["vocab_size"])
        body = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        if not args.text_chunks:
            body["return_token_ids"] = True
        for i in range(args.num_warmup):
            await send_request(http, {**body, "prompt": prompts[i % len(prompts)], "max_tokens": 2})

        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = tqdm(total=len(prompts), desc="requests", disable=args.disable_tqdm, file=sys.stderr)

        async def one(prompt) -> RequestResult:
            if gate is None:
                result = await send_request(http, {**body, "prompt": prompt})
            else:
                async with gate:
                    result = await send_request(http, {**body, "prompt": prompt})
            bar.update(1)
            return result

        rng = np.random.default_rng(args.seed + 1)
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(prompts[i])) async for i in arrivals(len(prompts), args.request_rate, rng)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return summarize(args, model, results, duration)


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_url": args.base_url,
        "model": model,
        "prompt_format": args.prompt_format,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **stats_ms([r.ttft_s for r in ok], "ttft"),
        **stats_ms(tpot, "tpot"),
        **stats_ms([x for r in ok for x in r.itl_s], "itl"),
        "itl_samples": sum(len(r.itl_s) for r in ok),  # chunks after each request's first
        **stats_ms([r.e2e_s for r in ok], "e2e_latency"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    line = json.dumps(result)
    print(line, flush=True)
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(line + "\n")
    return 0 if result["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
