"""A checkpoint's config.json, parsed once into a typed, frozen object.

:class:`ModelConfig` holds what every family reads (sizes, heads, RoPE, layer kinds, EOS, the context limit) with
its derived fields; a family whose layers need more subclasses it and parses its own keys in
:meth:`ModelConfig.family_fields`. Nothing outside this parse reads config.json keys: model files, the loader, the
engine and the planner take the object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar

from server.layers.moe_routing import Router, make_router

DEFAULT_MAX_POSITIONS = 4096  # a config without max_position_embeddings (old checkpoints)


def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A family's sparse MLPs: ``num_experts`` routed experts of ``intermediate_size``, ``top_k`` per token,
    optionally a shared expert, and how the router scores and picks experts (:mod:`server.layers.moe_routing`);
    which layers are sparse is the family's to say."""

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int = 0
    norm_topk_prob: bool = True
    scoring: str = "softmax"  # or "sigmoid"
    n_group: int = 1  # sigmoid routing: experts in n_group groups, only the topk_group best compete
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # e_score_correction_bias: added to the scores for choosing experts only

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.top_k} must be between 1 and the {self.num_experts} experts")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group {self.n_group} must divide the number of routed experts {self.num_experts}")

    def router(self) -> Router:
        return make_router(self.scoring, self.top_k, renormalize=self.norm_topk_prob,
                           scaling=self.routed_scaling_factor, n_group=self.n_group, topk_group=self.topk_group)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields every model family reads, parsed once from config.json (see :func:`parse_model_config`)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS
    # the longest context the engine serves (max positions, capped where a layer kind is not implemented)
    context_limit: int = DEFAULT_MAX_POSITIONS
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # RoPE settings as :class:`server.layers.rotary.RotaryEmbedding` takes them (rope_theta, rope_type, scaling
    # factors, partial_rotary_factor), merged from transformers' old (rope_scaling) and new (rope_parameters) keys
    rope: Mapping[str, Any] = field(default_factory=lambda: _frozen({"rope_theta": 10000.0}))
    # one kind per layer: "full_attention", "linear_attention", "sliding_attention", ...
    layer_types: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"
    moe: MoEConfig | None = None
    # the checkpoint's quantization_config, as published (FP8 block-scaled, compressed-tensors, ...)
    quantization: Mapping[str, Any] | None = None

    # config.json keys a family must have; a missing one is a start-up error naming it
    required_keys: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads")

    @classmethod
    def family_fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The subclass's own fields from ``raw`` (config.json, text model merged in); overrides of base fields
        (e.g. ``layer_types``) may be returned too."""
        return {}

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        missing = [k for k in cls.required_keys if k not in raw]
        if missing:
            raise KeyError(missing[0])
        heads = raw["num_attention_heads"]
        max_pos = raw.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS
        eos = raw.get("eos_token_id")
        base = dict(
            architecture=(raw.get("architectures") or ["?"])[0],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw.get("intermediate_size") or 0,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            context_limit=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope=_frozen(rope_params(raw)),
            layer_types=tuple(raw.get("layer_types") or ("full_attention",) * raw["num_hidden_layers"]),
            eos_token_ids=tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else [])),
            checkpoint_dtype=raw.get("torch_dtype") or raw.get("dtype") or "float32",
            quantization=_frozen(raw["quantization_config"]) if raw.get("quantization_config") else None,
        )
        own = cls.family_fields(raw)
        names = {f.name for f in fields(cls)}
        unknown = set(own) - names
        if unknown:
            raise TypeError(f"{cls.__name__}.family_fields returned unknown fields {sorted(unknown)}")
        return cls(**{**base, **own})

    @property
    def num_softmax_layers(self) -> int:
        return sum(t in ("full_attention", "sliding_attention") for t in self.layer_types)


def rope_params(raw: Mapping[str, Any]) -> dict:
    """RoPE settings from either transformers>=5's ``rope_parameters`` or the older ``rope_theta`` +
    ``rope_scaling`` keys (a family with its rope in another place passes its own section)."""
    params = dict(raw.get("rope_parameters") or {})
    for key, value in (raw.get("rope_scaling") or {}).items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in raw:
        params.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    return params


def read_config_json(model_path: str) -> dict:
    """config.json of a model directory; a vision-language checkpoint's text model is merged into the top level
    (we serve its language model)."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_path!r} is not a model directory: it has no config.json")
    with open(path) as f:
        raw = json.load(f)
    if "text_config" in raw:
        arch = (raw.get("architectures") or [None])[0]
        raw = {**{k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}, **raw["text_config"],
               "architectures": [arch]}
    return raw
