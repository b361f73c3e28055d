"""Long-context prefill benchmark: context x sp x tp grid on dummy weights at real model shapes.

Reports TTFT (one request, max_tokens=1), prefill tokens/s, speedup and parallel efficiency against sp=1 at
the same tp, MFU against the device's dense bf16 peak, and per-GPU memory (peak allocated, and the activation
peak above the weights + cache pool). Results: JSON (``--out``), a PNG plot (``--plot``) and a printed table.

    python benchmarks/bench_prefill.py --model llama3-8b minimax-hybrid --context 32768 131072 --sp-size 1 2

``--ulysses-degree 1 2 4`` adds the Ulysses x ring mesh to the grid (every degree that divides the SP size); each
row records its SP method and the bytes one rank sends per softmax layer for it (``server.sp.comm_volume``).
``--quantization none fp8`` and ``--kv-cache-dtype auto fp8_e4m3`` add weight / KV formats to the grid (FP8 weights:
random weights quantized per channel at load); speedups compare rows of the same formats.
``--shard-dense-weights off on`` adds dense weights stored 1/sp per GPU and gathered per layer (docs/sp.md, "Dense
weights over SP") to the grid at sp > 1; both compare against the same sp = 1 row, and each row records the
largest per-GPU weight bytes and gather-buffer bytes.

Contexts run shortest first; the first failure of a config (out of memory, or no KV capacity) ends that config,
so a rising list ``--context 98304 114688 131072 ...`` finds the longest prompt that fits. ``--num-prompts N``
submits N prompts of each context together (short-prompt throughput: with ``--sp-min-tokens 1`` every prompt is
split over the SP group, with the default each short prompt is placed whole on one SP rank).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.model_shapes import SHAPES, prefill_flops, shape_dir  # noqa: E402
from server import LLM, SamplingParams  # noqa: E402
from server.sp.comm_volume import latent_ring_bytes_per_layer, ulysses_bytes_per_layer  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


def device_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    info["git_commit"] = os.environ.get("GIT_COMMIT")  # the host's copy of the tree may carry a stale .git
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    try:
        import flashinfer

        info["flashinfer"] = flashinfer.__version__
    except ImportError:
        info["flashinfer"] = None
    import triton

    info["triton"] = triton.__version__
    return info


def results_log(path: str | None, **extra) -> tuple[list[dict], Callable[[dict], None]]:
    """A result file's rows and ``emit(row)``, which appends a row and rewrites ``path`` (if given) at once, so a
    run cut short keeps what it measured. The file: ``{"environment": device, date, command; **extra; "rows"}``."""
    rows: list[dict] = []
    result = {"environment": {**device_info(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "command": " ".join(sys.argv)}, **extra, "rows": rows}

    def emit(row: dict) -> None:
        rows.append(row)
        if path:
            with open(path, "w") as f:
                json.dump(result, f, indent=1)

    return rows, emit


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def model_dir(model: str) -> str:
    return shape_dir(model) if model in SHAPES else model


def model_config(model: str) -> dict:
    with open(os.path.join(model_dir(model), "config.json")) as f:
        return json.load(f)


def placement(n: int, sp: int, config) -> str:
    """Where the scheduler puts a prompt of n tokens: whole on one SP rank below the split threshold."""
    if sp == 1:
        return "local"
    budget = config.chunked_prefill_size
    return "home" if n < max(min(config.sp_min_tokens, budget), 2 * sp) else "split"


def sp_method(where: str, ulysses: int, sp: int) -> str:
    """How a prompt's softmax layers cross the SP group: ``local`` (no SP traffic), ``ring``, ``ulysses`` (U = P) or
    ``ulysses x ring``."""
    if where != "split":
        return "local"
    return "ring" if ulysses == 1 else "ulysses" if ulysses == sp else "ulysses x ring"


def softmax_bytes_per_layer(cfg: dict, n: int, sp: int, tp: int, ulysses: int, where: str, dtype_bytes: int) -> float:
    """Bytes one rank sends per softmax layer to prefill a split prompt of n tokens in one step (0 if not split)."""
    if where != "split":
        return 0.0
    if "kv_lora_rank" in cfg and ulysses == 1:  # MLA: the ring passes latents
        return latent_ring_bytes_per_layer(n, cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], sp, dtype_bytes)
    heads, kv_heads = cfg["num_attention_heads"] // tp, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // tp
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return ulysses_bytes_per_layer(n, heads, max(kv_heads, 1), head_dim, sp, ulysses, dtype_bytes)


def run_config(model: str, path: str, sp: int, tp: int, ulysses: int, contexts: list[int], args, emit,
               quant: str = "none", kv_dtype: str = "auto", shard_dense: str = "off") -> None:
    """Run one (model, sp, tp, U, weights, KV, dense sharding) config over ``contexts``; every row goes to ``emit``
    as soon as it is measured."""
    cfg = model_config(model)
    softmax_u = ulysses if args.ulysses_layers == "all" else 1  # the softmax layers' mesh (linear: the plain ring)
    kw = dict(
        device=args.device,
        load_format="dummy",
        quantization=None if quant == "none" else quant,
        kv_cache_dtype=kv_dtype,
        sp_size=sp,
        tp_size=tp,
        ulysses_degree=ulysses,
        ulysses_layers=args.ulysses_layers,
        enable_expert_parallel=args.enable_expert_parallel,
        shard_dense_weights=shard_dense == "on",
        max_running_requests=max(2, args.num_prompts),
        chunked_prefill_size=args.chunk or max(contexts) * args.num_prompts,
        sp_min_tokens=args.sp_min_tokens,
        ring_mode=args.ring_mode,
        lasp_mode=args.lasp_mode,
        mem_fraction_static=args.mem_fraction,
        max_model_len=max(contexts) + 8,
        cuda_graph="off",  # prefill only (max_tokens=1): no decode graphs to capture
        # off by default: a repeat of the same prompt must prefill it again, not hit the cache; on, the KV capacity
        # is the server's default one (the cache's linear-state snapshots take part of the budget)
        enable_prefix_cache=args.prefix_cache == "on",
    )
    with LLM(path, **kw) as llm:
        eng = llm.engine
        capacity = eng.cache.capacity_tokens
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        warm = min(4096, min(contexts))
        llm.generate([list(range(warm))], params)  # JIT compiles, allocator warm-up
        stats = eng.memory_stats(reset=True)
        base = {s["rank"]: s["allocated_bytes"] for s in stats}
        weight_bytes = max(s["weight_bytes"] for s in stats)
        gather_bytes = max(s["gather_buffer_bytes"] for s in stats)
        dtype_bytes = torch.empty(0, dtype=eng.runner.dtype).element_size()
        if kv_dtype == "fp8_e4m3" and softmax_u == 1:  # the ring passes the FP8 pages as they are stored
            dtype_bytes = 1
        for n in contexts:
            where = placement(n, sp, eng.config)
            row = dict(
                model=os.path.basename(model.rstrip("/")),
                sp=sp,
                tp=tp,
                ulysses_degree=ulysses,
                ulysses_layers=args.ulysses_layers,
                expert_parallel=args.enable_expert_parallel,
                context=n,
                ring_mode=args.ring_mode,
                lasp_mode=args.lasp_mode,
                sp_method=sp_method(where, softmax_u, sp),
                # one split step of the whole prompt (a chunked prompt moves this per chunk, prefix ring aside)
                softmax_bytes_per_layer=softmax_bytes_per_layer(cfg, n, sp, tp, softmax_u, where, dtype_bytes),
                num_prompts=args.num_prompts,
                sp_min_tokens=args.sp_min_tokens,
                placement=where,
                kv_capacity_tokens=capacity,
                quantization=quant,
                kv_cache_dtype=kv_dtype,
                shard_dense_weights=shard_dense,
                weight_bytes_per_gpu=weight_bytes,  # the largest rank's stored weights ...
                gather_buffer_bytes_per_gpu=gather_bytes,  # ... and the buffers its sharded dense weights fill
            )
            if args.num_prompts * (n + 1 + eng.config.sp_size * eng.config.page_size) > capacity:
                row["error"] = f"does not fit: KV capacity {capacity} tokens"
                emit(row)
                break
            prompts = [torch.randint(0, cfg["vocab_size"], (n,)).tolist() for _ in range(args.num_prompts)]
            try:
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    llm.generate(prompts, params, use_tqdm=False)
                    times.append(time.perf_counter() - t0)
            except Exception as e:  # out of memory (on any rank): a longer context will not fit either
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                emit(row)
                break
            mem = eng.memory_stats(reset=True)
            ttft = min(times)
            flops = prefill_flops(cfg, n) * args.num_prompts
            peak = peak_tflops()
            row.update(
                ttft_s=ttft,
                ttft_all_s=times,
                tokens_per_s=n * args.num_prompts / ttft,
                tflops_per_gpu=flops / ttft / sp / tp / 1e12,
                mfu=(flops / ttft / (sp * tp) / (peak * 1e12)) if peak else None,
                peak_mem_gib=[round(m["peak_bytes"] / 2**30, 2) for m in mem],
                activation_peak_gib=[round((m["peak_bytes"] - base[m["rank"]]) / 2**30, 2) for m in mem],
            )
            emit(row)


def add_speedups(rows: list[dict]) -> None:
    def key(r: dict) -> tuple:
        return (r["model"], r["tp"], r["context"], r.get("num_prompts", 1), r.get("quantization", "none"),
                r.get("kv_cache_dtype", "auto"))

    ref = {key(r): r["ttft_s"] for r in rows if r["sp"] == 1 and "ttft_s" in r}
    for r in rows:
        base = ref.get(key(r))
        if base and "ttft_s" in r:
            r["speedup"] = base / r["ttft_s"]
            r["efficiency"] = r["speedup"] / r["sp"]


CPU_WARNING = ("WARNING: --device cpu: these timings are NOT meaningful. The CPU ranks share the machine's cores "
               "(and gloo is no NVLink), so TTFT, speedup and efficiency here measure contention, not sequence-"
               "parallel prefill; CPU runs check that every configuration runs. Measure on GPUs (--device cuda).")


def print_table(rows: list[dict], cpu: bool = False) -> None:
    """The rows as a table; on CPU without speedup and efficiency (see ``CPU_WARNING``)."""
    print(
        f"{'model':16} {'w/kv':>15} {'sp':>2} {'tp':>2} {'U':>2} {'context':>8} {'n':>3} {'mode':>10} {'MiB/layer':>9} "
        f"{'TTFT s':>8} {'tok/s':>9} {'speedup':>7} {'eff':>5} {'MFU':>5} {'peak GiB/GPU':>13} {'act GiB':>8}"
    )
    for r in rows:
        mode = f"{r.get('ring_mode', '-')[:4]}/{r.get('lasp_mode', '-')[:4]}"
        mib = r.get("softmax_bytes_per_layer")
        fmt = f"{r.get('quantization', 'none')}/{r.get('kv_cache_dtype', 'auto')[:3]}"
        fmt += "/shard" if r.get("shard_dense_weights") == "on" else ""
        head = (f"{r['model']:16} {fmt:>15} {r['sp']:>2} {r['tp']:>2} {r.get('ulysses_degree', 1):>2} "
                f"{r['context'] or '-':>8} "
                f"{r.get('num_prompts', 1):>3} {mode:>10} {'-' if mib is None else f'{mib / 2**20:.1f}':>9}")
        if "ttft_s" not in r:
            print(f"{head}  {r.get('error')}")
            continue
        mfu = f"{r['mfu']:.2f}" if r.get("mfu") is not None else "-"
        speedup = "-" if cpu else f"{r.get('speedup', float('nan')):.2f}"
        eff = "-" if cpu else f"{r.get('efficiency', float('nan')):.2f}"
        print(
            f"{head} {r['ttft_s']:>8.3f} {r['tokens_per_s']:>9.0f} {speedup:>7} {eff:>5} "
            f"{mfu:>5} {max(r['peak_mem_gib']):>13.1f} {max(r['activation_peak_gib']):>8.1f}"
        )
    if cpu:
        print(CPU_WARNING, file=sys.stderr, flush=True)


def default_modes(r: dict) -> bool:
    """One prompt, pass-KV ring and LASP ring: the rows the plot shows."""
    modes = (r.get("ring_mode", "ring"), r.get("lasp_mode", "ring"))
    return r.get("num_prompts", 1) == 1 and modes == ("ring", "ring")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for sp, tp, u in sorted({(r["sp"], r["tp"], r.get("ulysses_degree", 1)) for r in rows if r["model"] == m}):
            pts = sorted(
                (r["context"], r["ttft_s"])
                for r in rows
                if r["model"] == m and (r["sp"], r["tp"], r.get("ulysses_degree", 1)) == (sp, tp, u)
                and "ttft_s" in r and default_modes(r)
            )
            if pts:
                label = f"sp={sp} tp={tp}" + (f" U={u}" if u > 1 else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (s)", title=m)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        nargs="+",
        default=["llama3-8b"],
        help=f"built-in shapes {sorted(SHAPES)} or model directories (their config.json is used)",
    )
    ap.add_argument("--context", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--sp-size", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tp-size", nargs="+", type=int, default=[1])
    ap.add_argument("--ring-mode", default="ring", choices=["ring", "allgather"])
    ap.add_argument("--lasp-mode", default="ring", choices=["ring", "allgather"])
    ap.add_argument("--ulysses-degree", nargs="+", type=int, default=[1],
                    help="Ulysses degrees U to run (U x sp/U mesh); those that do not divide an SP size are skipped")
    ap.add_argument("--ulysses-layers", default="all", choices=["all", "linear"],
                    help="the layers that use the Ulysses mesh (linear: lightning and GDN only, softmax on the ring)")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="MoE models: experts spread over every rank (at one GPU: the dispatch / combine path)")
    ap.add_argument("--chunk", type=int, default=0, help="chunked prefill size (0: the largest context)")
    ap.add_argument("--sp-min-tokens", type=int, default=1024)
    ap.add_argument("--num-prompts", type=int, default=1, help="prompts of each context submitted together")
    ap.add_argument("--mem-fraction", type=float, default=0.85)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prefix-cache", default="off", choices=["on", "off"],
                    help="the prefix cache (off: repeats prefill again; on: the server's default memory plan)")
    ap.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "fp8"],
                    help="weights: none (the model dtype) and/or fp8 (FP8 GEMMs, per-channel scales)")
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "fp8_e4m3"])
    ap.add_argument("--shard-dense-weights", nargs="+", default=["off"], choices=["off", "on"],
                    help="dense weights replicated over SP (off) and/or stored 1/sp per GPU, gathered per layer (on)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--plot", default=None, help="PNG plot file")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="no runs: combine these result files (speedups across them), print, write --out/--plot")
    args = ap.parse_args()
    if args.merge:
        rows = [r for path in args.merge for r in json.load(open(path))["rows"]]
        commands = [json.load(open(path))["command"] for path in args.merge]
    else:
        rows, commands = [], [" ".join(sys.argv)]
    results = dict(command=commands if args.merge else commands[0],
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=device_info(), rows=rows)

    def save() -> None:
        add_speedups(rows)
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, args.out)

    def emit(row: dict) -> None:  # every row is printed and saved at once: a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    cpu = args.device == "cpu"
    if cpu and not args.merge:
        print(CPU_WARNING, file=sys.stderr, flush=True)
    # sharding has no effect at sp = 1: that row is run once, as the baseline of both
    shard = args.shard_dense_weights
    grid = [] if args.merge else [(m, sp, tp, u, q, kv, d) for m in args.model for tp in args.tp_size
                                  for sp in args.sp_size for u in args.ulysses_degree if sp % u == 0
                                  for q in args.quantization for kv in args.kv_cache_dtype
                                  for d in (shard if sp > 1 else shard[:1])]
    for m, sp, tp, u, q, kv, d in tqdm(grid, desc="configs"):
        try:
            run_config(m, model_dir(m), sp, tp, u, sorted(args.context), args, emit, q, kv, d)
        except Exception as e:  # one failing config (e.g. out of memory while loading) must not lose the others
            emit(dict(model=m, sp=sp, tp=tp, ulysses_degree=u, context=None, quantization=q, kv_cache_dtype=kv,
                      shard_dense_weights=d, error=f"{type(e).__name__}: {e}"))
    save()
    print_table(rows, cpu)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
