"""Build a model from a Hugging Face directory (config.json + safetensors) or with dummy weights."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from server.config import EngineConfig, UlyssesLayers
from server.layers.attention import Attention
from server.layers.dense_weights import attach_dense_weight_gather
from server.layers.fp8 import Fp8Scheme, parse_fp8_scheme
from server.layers.gdn import GDNAttention
from server.layers.lightning import LightningAttention
from server.layers.linear import QuantizableLinear, RowParallelLinear, quantize_linear_layers
from server.layers.moe import FusedMoE, deferred_expert_storage
from server.models.config import ModelConfig, read_config_json
from server.models.deepseek_v3 import DeepseekV3ForCausalLM
from server.models.fp8_checkpoint import KV_SCALE_SUFFIXES, iterate_fp8_checkpoint, kv_scale_of, read_kv_scales
from server.models.glm4_moe import Glm4MoeForCausalLM
from server.models.gpt_oss import GptOssForCausalLM
from server.models.kimi_linear import KimiLinearForCausalLM
from server.models.llama import LlamaForCausalLM
from server.models.minimax import MiniMaxForCausalLM
from server.models.minimax_m2 import MiniMaxM2ForCausalLM
from server.models.qwen3_5 import Qwen3_5ForCausalLM
from server.models.qwen3_moe import Qwen3MoeForCausalLM
from server.sp.groups import ParallelState
from server.sp.ulysses import ulysses_kv_heads

log = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MiniMaxForCausalLM": MiniMaxForCausalLM,
    "MiniMaxText01ForCausalLM": MiniMaxForCausalLM,
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5MoeForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForCausalLM,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5ForCausalLM,
    "Qwen3NextForCausalLM": Qwen3_5ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "KimiLinearForCausalLM": KimiLinearForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MiniMaxM2ForCausalLM": MiniMaxM2ForCausalLM,
    "Glm4MoeForCausalLM": Glm4MoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
}


def read_model_config(model_path: str) -> ModelConfig:
    """config.json of ``model_path`` parsed by its family's config class: the one place that reads its keys."""
    raw = read_config_json(model_path)
    arch = (raw.get("architectures") or [None])[0]
    if arch not in MODEL_CLASSES:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {sorted(MODEL_CLASSES)}")
    try:
        return MODEL_CLASSES[arch].config_class.from_hf(raw)
    except KeyError as e:
        raise ValueError(f"{os.path.join(model_path, 'config.json')} has no {e} entry, which {arch} needs") from None


def check_model_parallelism(model_path: str, cfg: ModelConfig, tp_size: int, load_format: str,
                            ulysses_degree: int = 1, ulysses_layers: str = "all",
                            quantization: str | None = None, shard_dense_weights: bool = False) -> None:
    """Build the model of TP rank 0 of ``tp_size`` on the meta device (no memory, no weights), so every layer's
    own shape check runs before any process starts: a model that cannot be split this way (over TP, and each TP
    rank's heads over ``ulysses_degree``; softmax heads only when ``ulysses_layers`` is ``all``), or a config that
    lacks an entry, is one ``ValueError`` here rather than a failure on every rank. Also checks that the weights
    exist unless they are random (``dummy``), and that a quantized checkpoint is a kind this server loads (and is not
    to be sharded by ``--shard-dense-weights``, which keeps high-precision weights only)."""
    try:
        scheme = parse_fp8_scheme(cfg.quantization, quantization)
    except ValueError as e:
        raise ValueError(f"{model_path}: {e}") from None
    if scheme is not None and shard_dense_weights:
        raise ValueError(f"{model_path}: --shard-dense-weights does not shard FP8 weights; serve this model without it")
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.architecture](cfg, ParallelState(tp_size=tp_size, device=torch.device("meta")),
                                                torch.float32)
    if scheme is not None and scheme.block is not None:
        check_fp8_block_shards(model, scheme.block[1], tp_size)
    try:
        check_ulysses_heads(model, ulysses_degree, softmax=ulysses_layers == UlyssesLayers.ALL)
    except ValueError as e:
        raise ValueError(f"{model_path}: {e}") from None
    if load_format != "dummy" and not glob.glob(os.path.join(model_path, "*.safetensors")):
        raise ValueError(f"{model_path!r} has no *.safetensors files (use --load-format dummy for random weights)")


def check_fp8_block_shards(model: nn.Module, block_k: int, tp_size: int) -> None:
    """Raise ``ValueError`` naming ``--tp-size`` when a row-parallel layer's TP shard of input columns would cut the
    checkpoint's FP8 scale blocks of ``block_k`` columns (row cuts are exact: scales are kept per row)."""
    for name, m in model.named_modules():
        if isinstance(m, RowParallelLinear) and tp_size > 1 and m.in_per_rank % block_k:
            raise ValueError(
                f"--tp-size {tp_size} gives {name} {m.in_per_rank} input columns per rank, which cuts the checkpoint's "
                f"FP8 scale blocks of {block_k} columns; choose a --tp-size for which "
                f"{m.in_per_rank * tp_size} / tp is a multiple of {block_k}")


def check_ulysses_heads(model: nn.Module, ulysses_degree: int, softmax: bool = True) -> None:
    """Raise ``ValueError`` (naming ``--ulysses-degree`` and ``--tp-size``) unless every attention layer's heads on a
    TP rank split over the Ulysses group: softmax query heads and lightning heads a multiple of U, softmax KV heads
    and GDN key heads a multiple or a divisor of U (replicated when fewer), GDN value heads a multiple of U.
    ``softmax=False``: the softmax layers do not use the mesh (``--ulysses-layers linear``) and are not checked."""
    for m in model.modules():
        if isinstance(m, Attention) and softmax:
            ulysses_kv_heads(m.num_heads, m.num_kv_heads, ulysses_degree)
        elif isinstance(m, LightningAttention):
            heads = m.slopes.numel()
            ulysses_kv_heads(heads, heads, ulysses_degree, names=("lightning-attention heads", ""))
        elif isinstance(m, GDNAttention):
            ulysses_kv_heads(m.hv, m.hk, ulysses_degree, names=("Gated DeltaNet value heads",
                                                                 "Gated DeltaNet key heads"))


def context_length(config: EngineConfig, cfg: ModelConfig) -> int:
    """The longest context served: ``--max-model-len`` if given, never above the model's own limit."""
    return min(config.max_model_len or cfg.context_limit, cfg.context_limit)


def checkpoint_dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}.get(cfg.checkpoint_dtype, torch.float32)


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU; on CUDA the checkpoint's half dtype (bf16 if the checkpoint is fp32)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    ck = checkpoint_dtype(cfg)
    return ck if ck in (torch.bfloat16, torch.float16) else torch.bfloat16


def iterate_safetensors(model_path: str) -> Iterator[tuple[str, object]]:
    """Every (name, lazy slice) of the directory's safetensors files, one file open at a time."""
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_path!r} has no *.safetensors files (use --load-format dummy for random weights)")
    start = time.monotonic()
    for i, path in enumerate(files, start=1):
        log.info("loading weights: %s (%d/%d, %.2f GB) at %.1f s", os.path.basename(path), i, len(files),
                 os.path.getsize(path) / 1e9, time.monotonic() - start)
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights for benchmarks at real shapes: N(0, 0.02) for matrices, ones for norms. Drawn on the
    parameter's device; each rank's shard is plausible on its own (shards are not slices of one matrix)."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
            continue
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        p.data.normal_(0.0, 0.02, generator=gen)


def build_model(model_path: str, cfg: ModelConfig, pstate: ParallelState, dtype: torch.dtype, load_format: str,
                seed: int = 0, quantization: str | None = None) -> nn.Module:
    """The model of this rank with its weights. FP8 checkpoints keep their FP8 linear and expert weights (with their
    scales); ``quantization="fp8"`` (or random weights of an FP8 config) quantizes the remaining linear weights and
    MoE experts per channel."""
    cls = MODEL_CLASSES[cfg.architecture]
    scheme = parse_fp8_scheme(cfg.quantization, quantization)
    # an FP8 checkpoint's experts are allocated as its tensors arrive, FP8: never the model dtype's twice the bytes
    fp8_checkpoint = scheme is not None and not scheme.online and load_format != "dummy"
    with torch.device(pstate.device), deferred_expert_storage() if fp8_checkpoint else contextlib.nullcontext():
        model = cls(cfg, pstate, dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif scheme is None or scheme.online:
        # KV-cache scales (a checkpoint whose weights are high precision may carry them) are read apart, below
        model.load_weights((name, t) for name, t in iterate_safetensors(model_path)
                           if not name.endswith(KV_SCALE_SUFFIXES))
    else:
        model.load_weights(iterate_fp8_checkpoint(model_path, scheme))
        for name, m in model.named_modules():
            if isinstance(m, FusedMoE):
                m.check_loaded(f"{model_path}: {name}")
    if scheme is not None and (scheme.online or load_format == "dummy"):
        log.info("quantized %d linear layers and %d MoE layers' experts to FP8 (per-channel scales)",
                 quantize_linear_layers(model), sum(m.quantize_experts() for m in model.modules()
                                                    if isinstance(m, FusedMoE)))
    if scheme is not None and pstate.device.type == "cuda":
        torch.cuda.empty_cache()  # the high-precision storage FP8 layers replaced: free memory is sized from here
    if load_format != "dummy":
        set_kv_scales(model, read_kv_scales(model_path))
    attach_dense_weight_gather(model, pstate)  # after loading: the stored rows are final
    return model.eval()


def store_fp8_layout(model: nn.Module, scheme: Fp8Scheme) -> None:
    """Give a model built without weights (the planner's, on the meta device) the storage an FP8 load ends with: every
    TP linear and MoE expert FP8 with its scales in blocks of the scheme's columns (one per row when it has none). A
    checkpoint's layers left in high precision (its ``ignore`` list) are counted FP8 too."""
    bk = scheme.block[1] if scheme.block else None
    for m in model.modules():
        if isinstance(m, QuantizableLinear):
            m.store_fp8(bk or m.weight.shape[1])
        elif isinstance(m, FusedMoE):
            for name in ("w13", "w2"):
                m.store_fp8(name, bk or getattr(m, name).shape[-1])


def set_kv_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Give each softmax layer the checkpoint's per-tensor K/V cache scales (an FP8 KV cache stores ``k / k_scale``);
    layers without them keep 1.0."""
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            block = name.rsplit(".", 1)[0]
            m.k_scale = kv_scale_of(scales, block, "k") or 1.0
            m.v_scale = kv_scale_of(scales, block, "v") or 1.0
