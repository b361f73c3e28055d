"""Qwen3-Coder's XML tool calls: ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...
</function>\\n</tool_call>``. Values are bare text, read as the type the tool's schema gives them."""

from __future__ import annotations

import re

from server.entrypoints.tool_parsers.base import (
    ParsedCall,
    RegionToolParser,
    json_arguments,
    param_types,
    typed_value,
)

FUNCTION = re.compile(r"<function=([^>\n]+)>")
PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def strip_newline(value: str) -> str:
    """The template writes a newline on each side of a value."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


class Qwen3CoderToolParser(RegionToolParser):
    """``<tool_call><function=...>`` regions (Qwen3-Coder, Qwen3-Next)."""

    name = "qwen3_coder"
    begin, end = "<tool_call>", "</tool_call>"
    markers = (begin,)
    detect = ("<function=", "<parameter=")

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        m = FUNCTION.search(body)
        if not m:
            return []
        name = m.group(1).strip()
        if not closed and "</function>" not in body:
            return [ParsedCall(name)]
        types = param_types(self.tools, name)
        args = {k.strip(): typed_value(strip_newline(v), types.get(k.strip())) for k, v in PARAMETER.findall(body)}
        return [ParsedCall(name, json_arguments(args))]
