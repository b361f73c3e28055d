"""Decode benchmark: inter-token latency over context x batch x sp x CUDA graphs, beside its memory floor.

For every config (sp, graphs on/off, overlapped steps on/off) one offline engine serves each (context, batch)
cell: ``batch`` prompts of ``context`` random token ids are prefilled, then ``--decode-steps`` decode steps are
timed one by one (each ``Engine.step()``: scheduling, the forward, sampling and the stop checks, as a server runs
them). ITL is reported
as mean, p50 and p99 over the steps, beside the floor: the bytes one step must read on one rank (its weights, its
shard of the batch's KV, its linear-attention states read and written) over the measured copy bandwidth.

    python benchmarks/bench_decode.py --model llama3-8b --context 2048 32768 131072 --batch 1 8 32 \\
        --sp-size 1 2 --graphs on off --overlap on off --out benchmarks/results/decode_h200.json \\
        --plot benchmarks/results/decode.png

``--quantization none fp8`` and ``--kv-cache-dtype auto fp8_e4m3`` run each weight / KV format as its own config
(FP8 weights: random weights quantized per channel at load); every row records the KV tokens the engine holds.
``--shard-dense-weights off on`` (at sp > 1) runs the dense weights stored 1/sp per GPU as its own config: its
decode steps gather each layer, or run on the stored rows when every row is replicated (docs/sp.md, "Dense weights
over SP").

Structured outputs: ``--structured json`` measures every cell twice in the same engine, unconstrained and with
every request constrained to a JSON schema (``--json-schema FILE``, default: an unbounded array of records with
bounded strings, enums, numbers, booleans and a nested object), both sampled at temperature 1 with the same logit
bias (the tokens holding ``]`` at -100, so the outer array never closes and every request decodes every step), and
prints the two ITLs and the grammar's cost per step. A model directory without a tokenizer gets a synthetic
byte-level BPE one of the model's vocabulary size (``benchmarks/synthetic_tokenizer.py``), since the mask's cost
depends on the vocabulary:

    python benchmarks/bench_decode.py --model llama3-8b --context 2048 --batch 32 --sp-size 1 --graphs on \
        --structured json

With ``SERVER_STEP_PROFILE=1`` in the environment, rank 0's host time per stage of the timed steps is printed per
cell, and every worker logs its own at shutdown (:mod:`server.execution.step_profile`).

Cells whose KV does not fit (the engine rejects the requests) are recorded as skipped. JSON: ``{"environment",
"copy_gbps", "rows": [{model, sp, tp, context, batch, graphs, overlap, structured, itl_ms, itl_p50_ms, itl_p99_ms,
floor_ms, ...}]}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_prefill import model_config, model_dir, results_log  # noqa: E402
from benchmarks.synthetic_tokenizer import save_synthetic_tokenizer  # noqa: E402
from server import SamplingParams  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.execution.step_profile import PROFILE  # noqa: E402
from server.layers.moe import FusedMoE  # noqa: E402
from server.messages import GenerateRequest, RequestRejected  # noqa: E402
from server.models.common import GatedMLP  # noqa: E402
from server.sampling_params import StructuredOutput  # noqa: E402
from server.tokenizer import Tokenizer  # noqa: E402

# Records as an agent's tool might ask for them; unbounded in length, and no inner array: a bounded one would force
# a "]" token, which may close the outer array too (see the module docstring)
DEFAULT_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 100000},
    "name": {"type": "string", "maxLength": 16},
    "kind": {"enum": ["file", "directory", "link"]},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "ok": {"type": "boolean"},
    "meta": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 0, "maximum": 1 << 30},
                                              "owner": {"type": "string", "maxLength": 12}}}},
    "required": ["id", "name", "kind", "ok"]}}


def copy_gbps(device: torch.device) -> float | None:
    """Measured device copy bandwidth (bytes read + written per second, GB/s) on a 2 GiB buffer."""
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize(device)
    secs = (time.perf_counter() - start) / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * (1 << 31) / secs / 1e9


def whole_bytes(p: torch.nn.Parameter) -> int:
    """Bytes of a parameter, whole also when it is a dense weight stored 1/sp per rank."""
    shard = getattr(p, "row_shard", None)
    if shard is None:
        return p.numel() * p.element_size()
    return p.numel() // p.shape[0] * shard.rows * p.element_size()


def step_bytes(engine: Engine, context: int, batch: int, split_mlp: bool = False) -> int:
    """Bytes one decode step reads on rank 0: weights, its KV shard of every request, the states (read + write).
    ``split_mlp``: the step split the dense MLPs over the SP ranks (each reads 1/sp of their weights). Of a MoE
    layer's experts only those the batch's tokens choose must be read: with top-k of E chosen uniformly, the
    expected share is ``1 - (1 - k/E)^batch``. Dense weights sharded over SP (``--shard-dense-weights``) count whole:
    a gathered step reads them whole from its buffers (the gathers themselves are not in the floor)."""
    r = engine.runner
    weights = sum(whole_bytes(p) for p in r.model.parameters())
    for m in r.model.modules():
        if isinstance(m, FusedMoE):
            unread = (1 - m.top_k / m.num_experts) ** batch
            weights -= int(unread * sum(p.numel() * p.element_size() for p in (m.w13, m.w2)))
    if split_mlp:
        mlp = sum(p.numel() * p.element_size() for m in r.model.modules() if isinstance(m, GatedMLP)
                  for p in m.parameters())
        weights -= mlp - mlp // engine.config.sp_size
    kv_per_token = r.cache_bytes_per_page() // engine.config.page_size
    kv = batch * (context // engine.config.sp_size + 1) * kv_per_token
    return weights + kv + 2 * batch * r.state_bytes_per_slot()


def structured_setup(args, model: str, vocab_size: int) -> tuple[str | None, dict[int, float]]:
    """The tokenizer directory for ``--structured`` runs (the model's, or a synthetic one) and the logit bias both
    runs of a cell share (see the module docstring)."""
    if args.structured == "none":
        return None, {}
    path = model_dir(model)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = save_synthetic_tokenizer(os.path.join(os.path.dirname(path), f"bench-tokenizer-{vocab_size}"),
                                        vocab_size)
    tok = Tokenizer.from_pretrained(path)
    return path, {i: -100.0 for i in range(tok.vocab_size) if b"]" in tok.token_bytes(i)}


def prefill_steps(context: int, batch: int, budget: int = EngineConfig.chunked_prefill_size) -> int:
    """At most how many steps ``batch`` prompts of ``context`` tokens take to prefill, and to deliver the last first
    token, under the engine's per-step token ``budget`` (the decode rows of requests whose prompt is done share it).
    A request whose prompt finished in the first step decodes one token in each of the others, before the timed
    steps: the context length the benchmark sets must leave room for these tokens besides the timed ones, or that
    request ends at its length limit within the measurement."""
    return -(-batch * context // max(1, budget - batch)) + 1


def measure_cell(engine: Engine, context: int, batch: int, steps: int, seed: int,
                 structured: StructuredOutput | None = None, logit_bias: dict[int, float] | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_cfg.vocab_size
    # Requests that finish their prompt first decode while the others prefill: no limit inside the measurement
    # (the engine's context length leaves room for those tokens too, see prefill_steps).
    if logit_bias:
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=steps + 4096, ignore_eos=True,
                                logit_bias=logit_bias, structured=structured)
    else:
        params = SamplingParams(temperature=0, max_tokens=steps + 4096, ignore_eos=True)
    rids = [f"c{context}-b{batch}-{i}-{seed}-{structured is not None}" for i in range(batch)]
    try:
        for rid in rids:
            ids = torch.randint(0, vocab, (context,), generator=gen).tolist()
            engine.add_request(GenerateRequest(rid, ids, SamplingParams(**vars(params))))
    except RequestRejected:
        for rid in rids:
            engine.abort_request(rid)
        engine.step()
        raise
    started = time.perf_counter()
    firsts: set[str] = set()
    while len(firsts) < batch:  # prefill (every request has its first token)
        firsts |= {o.rid for o in engine.step() if o.new_token_ids}
    prefill_s = time.perf_counter() - started
    times = []
    graphs = engine.runner.graphs
    split_before = graphs.split_steps if graphs else 0
    PROFILE.reset()
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
        got = sum(len(o.new_token_ids) for o in outs)
        # a request that ends here (its length limit, its grammar, an error) would be missing from the next step
        ended = sorted({o.error or o.finish_reason for o in outs if o.finished})
        assert got == batch and not ended, \
            f"every request decodes one token per step and goes on (got {got} of {batch}; ended: {ended})"
    if PROFILE.enabled:
        print(f"rank 0 step profile, context {context} batch {batch}: {PROFILE.table()}", flush=True)
    for rid in rids:
        engine.abort_request(rid)
    engine.step()
    times.sort()
    split = (graphs.split_steps if graphs else 0) - split_before
    return {"split_mlp_steps": split, "itl_ms": statistics.fmean(times), "itl_p50_ms": times[len(times) // 2],
            "itl_p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))], "prefill_s": prefill_s}


def run_config(args, model: str, sp: int, graphs: str, overlap: str, split: str, gbps: float | None, emit,
               quant: str = "none", kv_dtype: str = "auto", ep: str = "off", shard: str = "off") -> None:
    tokenizer, bias = structured_setup(args, model, model_config(model)["vocab_size"])
    kinds = {"none": [None], "json": [None, StructuredOutput("json", args.schema_text)]}[args.structured]
    cfg = EngineConfig(model_path=model_dir(model), tokenizer_path=tokenizer, load_format="dummy", sp_size=sp,
                       tp_size=args.tp_size, quantization=None if quant == "none" else quant, kv_cache_dtype=kv_dtype,
                       enable_expert_parallel=ep == "on", shard_dense_weights=shard == "on",
                       cuda_graph="auto" if graphs == "on" else "off", cuda_graph_max_bs=max(args.batch),
                       sp_split_mlp=split == "on",
                       overlap_schedule=overlap == "on",
                       max_running_requests=max(args.batch), mem_fraction_static=args.mem_fraction_static,
                       max_model_len=max(args.context) + prefill_steps(max(args.context), max(args.batch))
                       + args.decode_steps + 8)
    started = time.perf_counter()
    engine = Engine(cfg)
    startup_s = time.perf_counter() - started
    kv_tokens = (engine.runner.num_pages - 1) * cfg.page_size * sp  # every SP rank holds its shard
    try:
        cells = [(c, b, k) for c in args.context for b in args.batch for k in kinds]
        desc = f"{model} sp={sp} graphs={graphs} overlap={overlap} weights={quant} kv={kv_dtype}"
        for context, batch, kind in tqdm(cells, desc=desc, mininterval=5):
            row = {"model": model, "sp": sp, "tp": args.tp_size, "context": context, "batch": batch,
                   "graphs": graphs == "on", "overlap": overlap == "on", "sp_split_mlp": split == "on",
                   "quantization": quant, "kv_cache_dtype": kv_dtype, "kv_tokens": kv_tokens,
                   "structured": kind.kind if kind else "none", "expert_parallel": ep == "on",
                   "shard_dense_weights": shard == "on", "startup_s": startup_s}
            try:
                row.update(measure_cell(engine, context, batch, args.decode_steps, len(args.batch), kind, bias))
                split_all = row["split_mlp_steps"] == args.decode_steps
                row["floor_ms"] = step_bytes(engine, context, batch, split_all) / gbps / 1e6 if gbps else None
            except RequestRejected as e:
                row["skipped"] = str(e)[:200]
            emit(row)
    finally:
        engine.shutdown()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    done = [r for r in rows if "itl_ms" in r]
    def key_of(r):
        return r["model"], r["sp"], r["batch"], r["graphs"], r.get("overlap", True)

    for key in sorted({key_of(r) for r in done}):
        pts = sorted((r["context"], r["itl_ms"], r["floor_ms"]) for r in done if key_of(r) == key)
        label = (f"{key[0]} sp={key[1]} batch={key[2]} graphs={'on' if key[3] else 'off'}"
                 f"{'' if key[4] else ' no overlap'}")
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)[0]
        if key[3] and all(p[2] for p in pts):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ls=":", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("inter-token latency (ms); dotted: memory floor")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llama3-8b"])
    ap.add_argument("--context", nargs="+", type=int, default=[2048, 32768, 131072])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--sp-size", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--graphs", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--overlap", nargs="+", default=["on"], choices=["on", "off"],
                    help="overlapped steps (the engine's default) and / or steps that wait for their tokens")
    ap.add_argument("--sp-split-mlp", nargs="+", default=["on"], choices=["on", "off"],
                    help="sp > 1: dense MLPs split over the SP ranks in decode steps of replicated requests (the "
                         "engine's default) and / or not")
    ap.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "fp8"],
                    help="weights: none (the model dtype) and/or fp8 (per-channel FP8 linears and MoE experts), each a "
                         "config")
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "fp8_e4m3"],
                    help="KV pages: auto (the model dtype) and/or fp8_e4m3, each a config")
    ap.add_argument("--structured", default="none", choices=["none", "json"],
                    help="json: measure each cell also with every request constrained to a JSON schema")
    ap.add_argument("--json-schema", default=None, help="the schema for --structured json (a JSON file)")
    ap.add_argument("--enable-expert-parallel", nargs="+", default=["off"], choices=["on", "off"],
                    help="MoE models: experts spread over every rank (at one GPU: the dispatch / combine path with "
                         "identity exchanges) and / or TP-sliced")
    ap.add_argument("--shard-dense-weights", nargs="+", default=["off"], choices=["on", "off"],
                    help="dense weights stored 1/sp per GPU and gathered per layer (or decoded on the stored rows)")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    args.schema_text = json.dumps(DEFAULT_SCHEMA)
    if args.json_schema:
        with open(args.json_schema) as f:
            args.schema_text = json.dumps(json.load(f))
    gbps = copy_gbps(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows, emit = results_log(args.out, copy_gbps=gbps)

    for model in args.model:
        for sp in args.sp_size:
            for graphs in args.graphs:
                for overlap, split, quant, kv_dtype, ep, shard in itertools.product(
                        args.overlap, args.sp_split_mlp if sp > 1 else ["on"], args.quantization,
                        args.kv_cache_dtype, args.enable_expert_parallel,
                        args.shard_dense_weights if sp > 1 else args.shard_dense_weights[:1]):
                    try:
                        run_config(args, model, sp, graphs, overlap, split, gbps, emit, quant, kv_dtype, ep, shard)
                    except Exception as e:  # recorded; the other configs still run
                        emit({"model": model, "sp": sp, "tp": args.tp_size, "graphs": graphs == "on",
                              "expert_parallel": ep == "on",
                              "overlap": overlap == "on", "context": None, "batch": None,
                              "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
    print(f"copy bandwidth: {gbps and round(gbps)} GB/s")
    print("| model | weights | KV | KV tokens | sp | tp | context | batch | graphs | overlap | structured "
          "| split MLP steps | ITL ms (p50 / p99) | floor ms | of floor |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---|---|---:|---|---:|---:|")
    for r in rows:
        ep = " (EP)" if r.get("expert_parallel") else ""
        ep += " (sharded)" if r.get("shard_dense_weights") else ""
        cell = (f"| {r['model']}{ep} | {r.get('quantization', '')} | {r.get('kv_cache_dtype', '')} | "
                f"{r.get('kv_tokens', '')} | {r['sp']} | {r['tp']} | {r['context']} | {r['batch']} | {r['graphs']} | "
                f"{r['overlap']} | {r.get('structured', 'none')} | {r.get('split_mlp_steps', '')} | ")
        if "itl_ms" not in r:
            print(cell + "skipped | | |")
            continue
        floor = r["floor_ms"]
        print(cell +
              f"{r['itl_ms']:.2f} ({r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f}) | "
              f"{floor and round(floor, 2)} | {floor and round(floor / r['itl_ms'], 2)} |")
    if args.structured != "none":
        print_structured_cost(rows)
    if args.plot:
        plot(rows, args.plot)


def print_structured_cost(rows: list[dict]) -> None:
    """The grammar's cost per step: each constrained cell's ITL beside the same cell's unconstrained one."""
    def key(r):
        return r["model"], r["sp"], r["context"], r["batch"], r["graphs"], r["overlap"], r.get("sp_split_mlp")

    plain = {key(r): r for r in rows if r.get("structured") == "none" and "itl_ms" in r}
    print("| model | sp | context | batch | graphs | ITL ms unconstrained | ITL ms JSON schema | cost per step |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        base = plain.get(key(r)) if r.get("structured") not in (None, "none") and "itl_ms" in r else None
        if base:
            extra = r["itl_ms"] - base["itl_ms"]
            print(f"| {r['model']} | {r['sp']} | {r['context']} | {r['batch']} | {r['graphs']} | "
                  f"{base['itl_ms']:.2f} | {r['itl_ms']:.2f} | {extra:+.2f} ms ({extra / base['itl_ms']:+.1%}) |")


if __name__ == "__main__":
    main()
