"""Reasoning parsers, chosen by ``--reasoning-parser`` (the names vLLM and SGLang use)."""

from __future__ import annotations

from server.entrypoints.reasoning_parsers.base import ParsedReasoning, ReasoningParser
from server.entrypoints.reasoning_parsers.gpt_oss import GptOssReasoningParser
from server.entrypoints.reasoning_parsers.think_tags import (
    DeepSeekR1ReasoningParser,
    DeepSeekV3ReasoningParser,
    Glm45ReasoningParser,
    KimiK2ReasoningParser,
    KimiReasoningParser,
    MiniMaxM2ReasoningParser,
    Qwen3ReasoningParser,
)

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (
    Qwen3ReasoningParser, DeepSeekR1ReasoningParser, DeepSeekV3ReasoningParser, Glm45ReasoningParser,
    MiniMaxM2ReasoningParser, KimiReasoningParser, KimiK2ReasoningParser, GptOssReasoningParser)}
ALIASES = {"deepseek_r1": "deepseek-r1", "deepseek_v3": "deepseek-v3", "deepseek-v31": "deepseek-v3", "qwen3-thinking":
           "qwen3", "qwq": "qwen3", "glm4_moe": "glm45", "glm46": "glm45", "minimax_m2": "minimax-m2",
           "gpt_oss": "gpt-oss", "openai": "gpt-oss", "kimi-k2": "kimi_k2", "step3": "deepseek-r1"}
REASONING_PARSER_NAMES = (*REASONING_PARSERS, *ALIASES)


def reasoning_parser_class(name: str) -> type[ReasoningParser]:
    """The parser ``--reasoning-parser name`` means; ValueError for an unknown name."""
    if name not in REASONING_PARSERS and name not in ALIASES:
        raise ValueError(f"--reasoning-parser {name!r} is not known; choose one of {', '.join(REASONING_PARSER_NAMES)}")
    return REASONING_PARSERS[ALIASES.get(name, name)]


__all__ = ["REASONING_PARSERS", "REASONING_PARSER_NAMES", "ParsedReasoning", "ReasoningParser",
           "reasoning_parser_class"]
