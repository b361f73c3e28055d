"""MiniMax-M2 tool calls: ``<minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="KEY">VALUE</parameter>\\n
</invoke>\\n...</minimax:tool_call>``, several invokes per region; values are bare text, read by the schema's
type."""

from __future__ import annotations

import re

from server.entrypoints.tool_parsers.base import (
    ParsedCall,
    RegionToolParser,
    json_arguments,
    param_types,
    split_regions,
    typed_value,
)

INVOKE_NAME = re.compile(r'^\s*name="([^"]*)">')
PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.S)


class MiniMaxM2ToolParser(RegionToolParser):
    """``<minimax:tool_call>`` regions of ``<invoke>`` elements (MiniMax-M2)."""

    name = "minimax_m2"
    begin, end = "<minimax:tool_call>", "</minimax:tool_call>"
    markers = (begin,)
    detect = ("<minimax:tool_call>",)

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        _, invokes = split_regions(body, "<invoke", "</invoke>", final=True)
        calls = []
        for inv, inv_closed in invokes:
            m = INVOKE_NAME.match(inv)
            if not m:
                continue
            name = m.group(1)
            if not inv_closed and not closed:
                calls.append(ParsedCall(name))
                continue
            types = param_types(self.tools, name)
            args = {k: typed_value(v.strip("\n"), types.get(k)) for k, v in PARAMETER.findall(inv)}
            calls.append(ParsedCall(name, json_arguments(args)))
        return calls
