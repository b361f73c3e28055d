"""Qwen3-Coder's XML tool calls: ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...
</function>\\n</tool_call>``. Values are bare text, read as the type the tool's schema gives them; the newline the
template writes on each side of a value is not part of it."""

from __future__ import annotations

from server.entrypoints.tool_parsers.xml_calls import XmlCallsToolParser


class Qwen3CoderToolParser(XmlCallsToolParser):
    """``<tool_call><function=...>`` regions (Qwen3-Coder, Qwen3-Next)."""

    name = "qwen3_coder"
    detect = ("<function=", "<parameter=")
    BEGIN, END = "<tool_call>", "</tool_call>"
    CALL, CALL_END, PARAMETER, PARAMETER_END = "<function=", "</function>", "<parameter=", "</parameter>"
    NAME_END = ">"
    NEWLINES = "one"
