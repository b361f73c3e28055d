"""Time one ``sample()`` call on CPU (or --device) for batches with and without the logit controls.

    python benchmarks/bench_sampler.py --batch 32 --vocab 151936

Prints one line per case: mean milliseconds per call over ``--iters`` calls (after warm-up).
"""

from __future__ import annotations

import argparse
import time

import torch

from server.layers.sampler import SampleRequest, sample
from server.sampling_params import SamplingParams

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8, seed=1),
    "top-p+top-k": dict(temperature=0.8, top_p=0.9, top_k=50, seed=1),
    "min-p": dict(temperature=0.8, min_p=0.05, seed=1),
    "logit-bias": dict(temperature=0.0, logit_bias={i: -1.0 for i in range(0, 2000, 20)}),
    "presence+frequency": dict(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5),
    "repetition": dict(temperature=0.0, repetition_penalty=1.1),
}


def time_case(params: SamplingParams, batch: int, vocab: int, prompt_len: int, output_len: int, iters: int,
              device: str) -> float:
    logits = torch.randn(batch, vocab, device=device)
    prompt = list(range(prompt_len))
    output = list(range(output_len))
    reqs = [SampleRequest(params, None if params.greedy else torch.Generator(device).manual_seed(i), [], prompt,
                          output) for i in range(batch)]
    for _ in range(3):
        sample(logits, reqs)
    start = time.perf_counter()
    for _ in range(iters):
        sample(logits, reqs)
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, kw in CASES.items():
        ms = time_case(SamplingParams(**kw), args.batch, args.vocab, args.prompt_len, args.output_len, args.iters,
                       args.device)
        print(f"{name:20s} {ms:8.3f} ms/call  (batch {args.batch}, vocab {args.vocab})")


if __name__ == "__main__":
    main()
