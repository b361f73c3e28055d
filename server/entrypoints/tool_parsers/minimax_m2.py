"""MiniMax-M2 tool calls: ``<minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="KEY">VALUE</parameter>\\n
</invoke>\\n...</minimax:tool_call>``, several invokes per region; values are bare text, read by the schema's
type."""

from __future__ import annotations

from server.entrypoints.tool_parsers.xml_calls import XmlCallsToolParser


class MiniMaxM2ToolParser(XmlCallsToolParser):
    """``<minimax:tool_call>`` regions of ``<invoke>`` elements (MiniMax-M2)."""

    name = "minimax_m2"
    detect = ("<minimax:tool_call>",)
    BEGIN, END = "<minimax:tool_call>", "</minimax:tool_call>"
    CALL, CALL_END, PARAMETER, PARAMETER_END = '<invoke name="', "</invoke>", '<parameter name="', "</parameter>"
    NAME_END = '">'
    NEWLINES = "all"
