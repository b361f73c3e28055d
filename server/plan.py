"""Memory plan of a model at a given sp x tp layout, per GPU, from its config.json alone (no weights, no GPU).

    python -m server.plan --model-path DIR --sp-size 4 --tp-size 2 [--enable-expert-parallel]
    python -m server.plan --shape minimax-text-01 qwen3.5-397b-a17b --sp-size 4 --tp-size 2 --enable-expert-parallel \
        --shard-dense-weights

The model of the rank that stores the most (rank 0: the first ``E mod N`` ranks hold one expert more) is built on
the meta device, so every layer shards itself as it would on a GPU; its parameters give the weight bytes, its
softmax layers the KV bytes per token, its linear-attention layers the state bytes per request
(:mod:`server.execution.memory`). An architecture without a model class here is computed from its config's numbers
(a softmax decoder with dense or MoE MLPs) and marked so. With ``--shard-dense-weights`` the weights are the
rank's 1/sp of every dense weight plus the buffers they are gathered into (two decoder layers' and the
vocabulary's TP slices, :mod:`server.layers.dense_weights`). Per GPU of 80 and 141 GB: the KV tokens that fit in
``--mem-fraction-static`` of it after the weights and ``--max-running-requests`` request states (activations and
CUDA graphs are not counted: keep the fraction below 1 for them), and over the SP group (a long request's KV is
spread over its SP ranks).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from server.config import EngineConfig
from server.execution.memory import kv_bytes_per_token, state_bytes_per_request, weight_bytes
from server.layers.dense_weights import DenseWeightGather
from server.layers.expert_parallel import expert_range
from server.layers.fp8 import parse_fp8_scheme
from server.models.loader import MODEL_CLASSES, read_config_json, resolve_dtype, store_fp8_layout
from server.sp.groups import ParallelState

GPUS = {"80 GB": 80e9, "141 GB": 141e9}
KV_DTYPES = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass
class RankPlan:
    """What one GPU stores: weight bytes, KV bytes per stored token, state bytes per request."""

    weights: int
    kv_per_token: int
    state_per_request: int
    source: str  # "model" (built on meta) or "config arithmetic"


def load_config(model_path: str | None, shape: str | None) -> dict:
    """config.json's keys (a vision-language checkpoint's text model merged in), or a named shape's."""
    if shape is None:
        return read_config_json(model_path)
    from benchmarks.model_shapes import SHAPES

    if shape not in SHAPES:
        raise SystemExit(f"--shape: unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return dict(SHAPES[shape])


def plan_rank(raw: dict, sp: int, tp: int, expert_parallel: bool, kv_dtype: torch.dtype | None,
              shard_dense_weights: bool = False, quantization: str | None = None) -> RankPlan:
    """Rank 0's plan (the most experts of any rank). FP8 checkpoints (or ``quantization="fp8"``) count their linear
    and expert weights at one byte plus their scales (:func:`server.models.loader.store_fp8_layout`); the engine
    does not shard FP8 dense weights over SP, so that pair is a ``ValueError`` here too."""
    arch = raw["architectures"][0]
    if arch not in MODEL_CLASSES:
        return plan_from_arithmetic(raw, sp, tp, expert_parallel, kv_dtype, shard_dense_weights)
    cls = MODEL_CLASSES[arch]
    cfg = cls.config_class.from_hf(raw)
    dtype = resolve_dtype("auto", cfg, torch.device("cuda"))  # what a GPU serves: the checkpoint's half dtype
    pstate = ParallelState(sp_size=sp, tp_size=tp, device=torch.device("meta"), expert_parallel=expert_parallel,
                           shard_dense_weights=shard_dense_weights)
    with torch.device("meta"):
        model = cls(cfg, pstate, dtype)
    scheme = parse_fp8_scheme(cfg.quantization, quantization)
    if scheme is not None:
        if shard_dense_weights:
            raise ValueError("--shard-dense-weights does not shard FP8 weights; drop it or --quantization (or plan "
                             "a high-precision checkpoint)")
        store_fp8_layout(model, scheme)
    gathered = DenseWeightGather(model, pstate).buffer_bytes if pstate.dense_shards > 1 else 0
    return RankPlan(weight_bytes(model) + gathered, kv_bytes_per_token(model, kv_dtype or dtype),
                    state_bytes_per_request(model, dtype), "model")


def plan_from_arithmetic(cfg: dict, sp: int, tp: int, expert_parallel: bool,
                         kv_dtype: torch.dtype | None = None, shard_dense_weights: bool = False) -> RankPlan:
    """A softmax decoder (embedding, attention with q/k norms, dense or MoE MLPs, LM head) counted from config.json's
    keys ``cfg``, in bf16. With ``shard_dense_weights`` the attention, dense MLP and vocabulary weights are 1/sp here,
    plus their gather buffers (two layers' and the vocabulary's TP slices; MoE layers' shared experts and routers are
    not sharded)."""
    dtype = torch.bfloat16
    kv = kv_dtype or dtype
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    heads = cfg["num_attention_heads"] // tp
    kv_heads = max(1, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // tp)
    attn = h * (heads + 2 * kv_heads) * hd + heads * hd * h
    norms = 2 * hd + 2 * h  # q/k norms and the layer's two norms: never sharded
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if experts:
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        if expert_parallel and sp * tp > 1:
            a, b = expert_range(experts, sp * tp, 0)
            mlp = (b - a) * 3 * h * inter
        else:
            mlp = experts * 3 * h * (inter // tp)
        mlp += experts * h + 3 * h * (cfg.get("shared_expert_intermediate_size") or 0) // tp
    else:
        mlp = 3 * h * cfg["intermediate_size"] // tp
    dense = mlp if not experts else 0  # per layer, of the TP slice: what --shard-dense-weights shards besides attention
    tables = (1 if cfg.get("tie_word_embeddings") else 2) * vocab * h // tp
    params = layers * (attn + norms + mlp) + tables + h
    if shard_dense_weights and sp > 1:
        sharded = layers * (attn + dense) + tables
        params += -sharded + sharded // sp + 2 * (attn + dense) + vocab * h // tp
    return RankPlan(params * dtype.itemsize, layers * 2 * kv_heads * hd * kv.itemsize, 0,
                    f"config arithmetic (no {cfg['architectures'][0]} model class here)")


def kv_tokens(plan: RankPlan, gpu_bytes: float, fraction: float, requests: int) -> int:
    """KV tokens one GPU holds in ``fraction`` of ``gpu_bytes`` after the weights and the request states."""
    budget = gpu_bytes * fraction - plan.weights - requests * plan.state_per_request
    if budget <= 0:
        return 0
    return int(budget // plan.kv_per_token) if plan.kv_per_token else sys.maxsize


def describe(name: str, plan: RankPlan, sp: int, fraction: float, requests: int) -> dict:
    """One row of the table."""
    row = {"model": name, "weights_gb": plan.weights / 1e9, "kv_bytes_per_token": plan.kv_per_token,
           "state_mb_per_request": plan.state_per_request / 1e6, "source": plan.source}
    for gpu, size in GPUS.items():
        tokens = kv_tokens(plan, size, fraction, requests)
        row[f"kv_tokens_per_gpu_{gpu}"] = tokens
        row[f"kv_tokens_sp_group_{gpu}"] = tokens * sp
        row[f"fits_{gpu}"] = tokens > 0
    return row


def format_row(row: dict) -> str:
    cells = [row["model"], f"{row['weights_gb']:.1f}", f"{row['kv_bytes_per_token']:,}",
             f"{row['state_mb_per_request']:.1f}"]
    for gpu in GPUS:
        tokens = row[f"kv_tokens_per_gpu_{gpu}"]
        cells.append(f"{tokens / 1e3:,.0f}K ({row[f'kv_tokens_sp_group_{gpu}'] / 1e3:,.0f}K)" if row[f"fits_{gpu}"]
                     else "does not fit")
    return "| " + " | ".join(cells) + " |"


def table_header() -> str:
    gpus = " | ".join(f"KV tokens per GPU (SP group), {g}" for g in GPUS)
    return ("| model | weights per GPU (GB) | KV bytes per token per GPU | state per request (MB) | " + gpus + " |\n"
            "|---|---:|---:|---:|" + "---:|" * len(GPUS))


def main(argv: list[str] | None = None) -> None:
    d = EngineConfig()
    p = argparse.ArgumentParser(prog="python -m server.plan", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="a directory with config.json (weights are not read)")
    src.add_argument("--shape", nargs="+", help="named shapes of benchmarks/model_shapes.py")
    p.add_argument("--sp-size", type=int, default=1)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--shard-dense-weights", action="store_true",
                   help="dense weights 1/sp per GPU, plus the buffers they are gathered into")
    p.add_argument("--kv-cache-dtype", choices=tuple(KV_DTYPES), default="auto",
                   help="auto: the model's dtype; fp8_e4m3: one byte per value")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: a high-precision checkpoint's linear and expert weights at one byte (FP8 checkpoints "
                        "count so without it)")
    p.add_argument("--mem-fraction-static", type=float, default=d.mem_fraction_static)
    p.add_argument("--max-running-requests", type=int, default=d.max_running_requests,
                   help="requests whose linear-attention states are reserved")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of the table")
    a = p.parse_args(argv)
    if a.sp_size < 1 or a.tp_size < 1:
        p.error("--sp-size and --tp-size must be >= 1")
    if not 0 < a.mem_fraction_static < 1:
        p.error(f"--mem-fraction-static must be in (0, 1), got {a.mem_fraction_static}")
    if a.quantization and a.shard_dense_weights:
        p.error("--shard-dense-weights does not shard FP8 weights; drop it or --quantization")
    names = a.shape or [a.model_path]
    rows = []
    for name in names:
        cfg = load_config(None if a.shape else name, name if a.shape else None)
        try:
            plan = plan_rank(cfg, a.sp_size, a.tp_size, a.enable_expert_parallel, KV_DTYPES[a.kv_cache_dtype],
                             a.shard_dense_weights, a.quantization)
        except ValueError as e:  # a layout the engine refuses for this model
            p.error(f"{name}: {e}")
        rows.append(describe(name, plan, a.sp_size, a.mem_fraction_static, a.max_running_requests))
    if a.json:
        for row in rows:
            print(json.dumps(row))
        return
    ep = ", expert parallel" if a.enable_expert_parallel else ""
    ep += ", dense weights sharded over SP" if a.shard_dense_weights and a.sp_size > 1 else ""
    print(f"sp = {a.sp_size} x tp = {a.tp_size}{ep}; KV cache {a.kv_cache_dtype}; {a.mem_fraction_static:g} of each "
          f"GPU; states for {a.max_running_requests} requests")
    print(table_header())
    for row in rows:
        print(format_row(row))
    for row in rows:
        if row["source"] != "model":
            print(f"{row['model']}: {row['source']}")


if __name__ == "__main__":
    main()
