"""Hermes / Qwen2.5 / Qwen3 tool calls: ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, one
region per call (the format the Qwen and Hermes chat templates describe to the model)."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ToolParser
from server.entrypoints.tool_parsers.json_call import JsonCall

BEGIN, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    """``<tool_call>`` JSON regions (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"
    detect = ("<tool_call>",)

    def step(self) -> bool:
        if self.state == "text":
            text, mark = self.until((BEGIN,))
            self.content(text)
            if mark:
                self.call, self.state = JsonCall(self, ("arguments", "parameters")), "call"
            return mark is not None
        text, mark = self.until((END,))
        self.call.feed(text)  # text after the object's end, before END, is not content
        if mark:
            self.call.close()
            self.state = "text"
        return mark is not None

    def finish(self) -> None:
        if self.state == "call":
            self.call.close()
