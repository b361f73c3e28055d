"""Kimi-K2 tool calls: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{ARGS}<|tool_call_end|>...<|tool_calls_section_end|>``. The call's id is the model's own
``functions.NAME:IDX`` (the template sends it back in tool results)."""

from __future__ import annotations

from server.entrypoints.tool_parsers.sections import SectionToolParser

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_END, ARGS = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"


class KimiK2ToolParser(SectionToolParser):
    """Kimi-K2's tool-call section."""

    name = "kimi_k2"
    detect = ("<|tool_calls_section_begin|>",)
    section_begin, section_end, call_begin, call_end, head_end = SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_END, ARGS

    def call_head(self, head: str) -> tuple[str, str | None] | None:
        call_id = head.strip()
        return (call_id.removeprefix("functions.").rsplit(":", 1)[0], call_id) if call_id else None
