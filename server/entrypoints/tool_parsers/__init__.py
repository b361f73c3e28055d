"""Tool-call parsers, one module per format, chosen by ``--tool-call-parser`` (the names vLLM and SGLang use).

``auto`` picks the parser whose ``detect`` texts the chat template holds, in the order of ``TOOL_PARSERS``
(more specific formats first: Qwen3-Coder and GLM-4.5 also write ``<tool_call>``).
"""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import CallDelta, ToolParser, ToolsDelta
from server.entrypoints.tool_parsers.deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from server.entrypoints.tool_parsers.glm45 import Glm45ToolParser
from server.entrypoints.tool_parsers.harmony import HarmonyToolParser
from server.entrypoints.tool_parsers.hermes import HermesToolParser
from server.entrypoints.tool_parsers.kimi_k2 import KimiK2ToolParser
from server.entrypoints.tool_parsers.llama3_json import Llama3JsonToolParser
from server.entrypoints.tool_parsers.minimax_m2 import MiniMaxM2ToolParser
from server.entrypoints.tool_parsers.qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (
    Qwen3CoderToolParser, Glm45ToolParser, MiniMaxM2ToolParser, KimiK2ToolParser, DeepSeekV3ToolParser,
    DeepSeekV31ToolParser, HarmonyToolParser, HermesToolParser, Llama3JsonToolParser)}
# the other names peers give the same formats
ALIASES = {"qwen25": "hermes", "qwen": "hermes", "qwen3": "hermes", "llama3": "llama3_json", "llama4_json":
           "llama3_json", "glm4_moe": "glm45", "glm46": "glm45", "glm47": "glm45", "minimax-m2": "minimax_m2",
           "gpt_oss": "gpt-oss", "openai": "gpt-oss", "harmony": "gpt-oss", "deepseekv3": "deepseek_v3",
           "deepseekv31": "deepseek_v31", "deepseek_v32": "deepseek_v31", "kimi-k2": "kimi_k2", "qwen3-coder":
           "qwen3_coder"}
TOOL_PARSER_NAMES = ("auto", *TOOL_PARSERS, *ALIASES)


def tool_parser_class(name: str, chat_template: str | None) -> type[ToolParser] | None:
    """The parser ``--tool-call-parser name`` means (``auto``: by the chat template's text; None if no format
    matches). ValueError for an unknown name."""
    if name == "auto":
        return next((p for p in TOOL_PARSERS.values() if chat_template and all(d in chat_template for d in p.detect)),
                    None)
    if name not in TOOL_PARSERS and name not in ALIASES:
        raise ValueError(f"--tool-call-parser {name!r} is not known; choose one of {', '.join(TOOL_PARSER_NAMES)}")
    return TOOL_PARSERS[ALIASES.get(name, name)]


__all__ = ["TOOL_PARSERS", "TOOL_PARSER_NAMES", "CallDelta", "ToolParser", "ToolsDelta", "tool_parser_class"]
