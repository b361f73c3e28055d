"""Host cost of the prefix cache's bookkeeping (no model, no device): a long document, then sibling questions.

The cache manager alone, as the scheduler drives it on rank 0: lookup (the prompt's chain hashes and the search),
admission (taking the cached prefix's pages), appending the new tokens' pages, and the release when the request
ends (its entry added to the index, its pages passed to the entry). The second question finds the state snapshot
the first one left at the document's end (hybrid models), so questions 2.. hit the whole document.

    python benchmarks/bench_prefix_host.py --doc-len 131072 --sp-size 2 --questions 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from server.control.cache_manager import CacheManager  # noqa: E402
from server.control.prefix_cache import PrefixCache  # noqa: E402
from server.control.sequence import Sequence  # noqa: E402
from server.sampling_params import SamplingParams  # noqa: E402


def run_turn(cm: CacheManager, prompt: list[int], name: str, sp: int, output_len: int) -> dict:
    seq = Sequence(rid=name, prompt_ids=prompt, params=SamplingParams(max_tokens=output_len), sp_size=sp)
    t0 = time.perf_counter()
    hit = cm.lookup(seq)
    t1 = time.perf_counter()
    seq.max_new_tokens = output_len
    if not cm.can_admit(seq, hit, None):
        raise RuntimeError("the cache is too small for this run: raise --pages")
    cm.admit(seq, hit, None, 0)
    t2 = time.perf_counter()
    # the prompt's new tokens, split evenly over the ranks in position order; a chunk ends where the prompt leaves
    # a longer cached prefix than the hit's snapshot covers, and the state is snapshotted there
    for end in [c for c in (seq.snapshot_at,) if c] + [len(prompt)]:
        start, n = seq.num_computed, end - seq.num_computed
        part = n // sp
        for r in range(sp):
            cm.append(seq, r, start + r * part, part if r < sp - 1 else n - r * part)
        seq.num_computed = end
        cm.snapshot(seq)
    seq.output_ids = [1] * output_len
    seq.num_computed += output_len - 1
    t3 = time.perf_counter()
    cm.release(seq)
    t4 = time.perf_counter()
    return {"turn": name, "cached_tokens": hit.tokens if hit else 0, "lookup_ms": (t1 - t0) * 1e3,
            "admit_ms": (t2 - t1) * 1e3, "append_ms": (t3 - t2) * 1e3, "release_ms": (t4 - t3) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc-len", type=int, default=131072)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--sp-size", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pages", type=int, default=200_000, help="KV pages per rank")
    ap.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True,
                    help="linear-attention state snapshots (a hybrid model) or not (softmax only)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    rng = random.Random(0)
    doc = [rng.randrange(150_000) for _ in range(args.doc_len)]
    cm = CacheManager(num_pages=args.pages, page_size=args.page_size, sp_size=args.sp_size, num_slots=64,
                      split_threshold=1024, split_budget=16384,
                      prefix_cache=PrefixCache(args.page_size, needs_state=args.hybrid),
                      snapshot_slots=64 if args.hybrid else 0)
    rows = []
    for i in range(args.questions + 1):
        question = [rng.randrange(150_000) for _ in range(args.question_len)]
        rows.append(run_turn(cm, doc + question, "first" if i == 0 else f"question {i}", args.sp_size,
                             args.output_len))
    print("| turn | cached | lookup ms | admit ms | append ms | release ms |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['turn']} | {r['cached_tokens']} | {r['lookup_ms']:.2f} | {r['admit_ms']:.2f} | "
              f"{r['append_ms']:.2f} | {r['release_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "python": platform.python_version(),
                       "cpu": platform.processor() or platform.machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
