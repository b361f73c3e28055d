"""Kimi-K2 tool calls: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{ARGS}<|tool_call_end|>...<|tool_calls_section_end|>``. The call's id is the model's own
``functions.NAME:IDX`` (the template sends it back in tool results)."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ParsedCall, RegionToolParser, split_regions
from server.entrypoints.tool_parsers.deepseek import normalized

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_END, ARGS = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"


class KimiK2ToolParser(RegionToolParser):
    """Kimi-K2's tool-call section."""

    name = "kimi_k2"
    begin, end = SECTION_BEGIN, SECTION_END
    markers = (SECTION_BEGIN,)
    detect = ("<|tool_calls_section_begin|>",)
    special_tokens = True

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        _, calls = split_regions(body, CALL_BEGIN, CALL_END, final=True)
        out = []
        for call, call_closed in calls:
            call_id, sep, args = call.partition(ARGS)
            if not sep:
                continue
            call_id = call_id.strip()
            name = call_id.removeprefix("functions.").rsplit(":", 1)[0]
            done = call_closed or closed
            out.append(ParsedCall(name, normalized(args) if done else None, id=call_id))
        return out
